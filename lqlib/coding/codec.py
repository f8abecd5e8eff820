"""The E8 codec: rotate → scale → E8 nearest point → parity-aware symbols → rANS → bytes.

Shapes: a tensor ``x`` of shape (..., d) is a batch of vectors of dimension d
(for a KV cache, d is the head dim); d must be a multiple of 8, and a power of
two when the RHT is on. The step size is ``a = sqrt(2πe·σ²)·2^(-b)`` with σ²
the mean square of the (rotated) data it covers: one step per vector or one
per tensor. Steps are causal (computed from the vectors being coded only).
Per-vector steps are rounded to the grid ``2^(k/8)`` before use and stored as the
integer codes k (:mod:`lqlib.steps`, about 3–4 bits per vector); a per-tensor step
is stored as a float32. Either way the decoder multiplies by exactly the value the
encoder divided by.

The RHT is applied unnormalised, ``u = H·(signs ⊙ x)`` by the butterfly stages of
:func:`lqlib.rht.fwht` (so ``u = sqrt(d)·w`` with ``w`` the orthonormal rotation), and the
factor ``1/sqrt(d)`` is folded into the step: ``sqrt(d) = 2^(4·log2(d)/8)`` lies on the step
grid. With per-vector steps, the encoder computes ``u · R(k − 4·log2 d)·2^(-log2 d)`` and
the decoder ``signs ⊙ H·p · 2^((k − 4·log2 d)/8)`` (grid values of :mod:`lqlib.steps`);
the step code comes from the float64 sum of squares of ``x`` (equal to that of ``w``).
Every operation is one IEEE operation in a fixed order, with no fused multiply-add and no
library reduction, so the CUDA tensors' result, the CPU's and that of the Triton kernels in
:mod:`lqlib.kernels` are the same bits.

Invariant: ``decode(encode(x))`` equals ``quantize(x)`` bit for bit on the
device ``x`` lives on.

Supported range (what is refused, what is saturated):

* **Refused** (:class:`lqlib.InputError`, nothing coded): NaN or ±Inf anywhere, and any nonzero
  vector (per-vector steps) or tensor (one step) whose step ``sqrt(2πe)·RMS·2^(-b)`` would leave
  ``[2^-100, 2^100]``: a clamped step would zero a tiny vector (relative error 1) or code a huge one
  at many times the rate. :func:`supported_rms` gives the bounds at rate ``b``, about
  ``[2^(b-102.1), 2^(b+98))``; at every rate in [0.5, 10] and in both modes, every RMS in
  ``[2^-92, 2^98]`` (about 2e-28 to 3e29) is coded. All-zero vectors are coded exactly. float16's
  whole finite range lies inside; bfloat16, float32 and float64 values beyond it are refused.
* **Saturated**: the reconstruction is rounded to the output dtype with values beyond its finite
  range set to ± its largest finite value (:func:`saturate`), on the CPU and in the Triton kernels
  alike, so that ``quantize`` and ``decode`` never return ±Inf for a finite input or for any stream.
  Near float16's maximum (65504) a reconstruction can exceed it; saturating it moves it towards the
  input (which lies within the range), so the error never grows.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from ..core.lattices import nearest_e8, pairwise_sum
from ..core.rht import RandomizedHadamard, fwht
from ..core.steps import (
    CODE_MAX,
    CODE_MIN,
    exact_step_code,
    exact_step_out_of_range,
    exact_step_value,
    inverse_step_values,
    step_codes_of_sum,
    step_codes_out_of_range,
    step_values,
    valid_exact_code,
)
from ..core.symbols import points_to_symbols, symbols_to_points
from ..errors import CodecMismatchError, CorruptStreamError, FormatError, InputError
from .entropy_model import gaussian_symbol_model
from .rans import decode_symbols, encode_symbols
from .wire import DTYPES, ROTATIONS, SCALES, WireHeader, pack, packed_size, unpack

__all__ = ["E8Codec", "Encoded", "MIN_BITS", "MAX_BITS", "DEFAULT_MAX_NUMEL", "saturate", "supported_rms"]

MIN_BITS = 0.5
MAX_BITS = 10.0
DEFAULT_MAX_NUMEL = 1 << 27  # decode refuses larger tensors unless told otherwise (512 MiB as float32)
_MAX_POINT = 2.0**30  # symbols must fit int32 with room to spare
_LOG2_ROOT_TWO_PI_E = 0.5 * math.log2(2.0 * math.pi * math.e)
_EXACT_CLAMPS = tuple(int(c) for c in np.array([2.0**-100, 2.0**100], dtype=np.float32).view(np.int32))


def saturate(y: Tensor, dtype: torch.dtype) -> Tensor:
    """``y`` (any float dtype) in ``dtype``, values beyond ``dtype``'s finite range (±Inf included) set to
    ± its largest finite value: one comparison each way, then one rounding, the same bits on every
    device and in the kernels. NaN stays NaN (the codec never makes one)."""
    limit = torch.finfo(dtype).max
    return y.clamp(-limit, limit).to(dtype)


def supported_rms(bits: float, scale: str = "vector") -> tuple[float, float]:
    """(lowest, highest) RMS of a nonzero vector (``scale="vector"``) or tensor (``"tensor"``) that
    :class:`E8Codec` codes at rate ``bits``: its step ``sqrt(2πe)·RMS·2^(-bits)`` lies within
    ``[2^-100, 2^100]`` (per vector, to the log grid's half step of 1/16 octave). Outside, ``encode``
    and ``quantize`` raise :class:`lqlib.InputError`. Bounds in float64, exact to a rounding."""
    if scale not in SCALES:
        raise InputError(f"scale must be one of {SCALES}, got {scale!r}")
    half = 0.5 / 8 if scale == "vector" else 0.0
    low = float(bits) - 100.0 - half - _LOG2_ROOT_TWO_PI_E
    high = float(bits) + 100.0 + half - _LOG2_ROOT_TWO_PI_E
    return 2.0**low, 2.0**high


@dataclass(frozen=True)
class Encoded:
    """A coded tensor: header, step codes and the ANS payload.

    Attributes
    ----------
    header : codec settings, dtype and shape of the decoded tensor.
    step_codes : int32, one per vector (shape ``shape[:-1]`` flattened): codes k of the steps
        ``2^(k/8)``; or one in all: the float32 step's bit pattern.
    words : uint32 ANS words.
    """

    header: WireHeader
    step_codes: np.ndarray
    words: np.ndarray

    @property
    def shape(self) -> tuple[int, ...]:
        return self.header.shape

    @property
    def numel(self) -> int:
        return self.header.numel

    def to_bytes(self) -> bytes:
        """The wire format of :mod:`lqlib.wire` (header, step codes, payload, CRC-32)."""
        return pack(self.header, self.step_codes, self.words)

    @classmethod
    def from_bytes(cls, data: bytes) -> Encoded:
        """Parse and check bytes made by :meth:`to_bytes` (versions 2 and 3); raises :class:`lqlib.FormatError`.

        The CRC-32 catches accidental corruption, not tampering: see the README for a keyed MAC."""
        header, codes, words = unpack(data)
        return cls(header, codes, words)

    def nbytes(self) -> int:
        """Size of :meth:`to_bytes` in bytes, without building it."""
        return packed_size(self.header, self.step_codes, self.words.size)


class E8Codec:
    """E8 lattice quantizer with parity-aware rANS entropy coding.

    Parameters
    ----------
    bits : target rate b in bits/dim, in [0.5, 10]; stored as float32. With a
        Gaussian source the coded rate is about b (slightly above at b <= 3).
    rotation : ``"rht"`` (randomized Hadamard transform of each vector before
        quantizing, seeded by ``seed``) or ``"none"``.
    scale : ``"vector"`` (one step per vector, about 3–4 bits of side
        information per vector) or ``"tensor"`` (one step per call).
    seed : seed of the RHT signs, an integer in [0, 2^32).

    The supported range of the inputs (what is refused, what is saturated) is in the module docstring.
    """

    def __init__(self, bits: float = 4.0, rotation: str = "rht", scale: str = "vector", seed: int = 0) -> None:
        if isinstance(bits, bool) or not isinstance(bits, numbers.Real):
            raise InputError(f"bits must be a real number in [{MIN_BITS}, {MAX_BITS}], got {bits!r}")
        bits = float(np.float32(bits))
        if not MIN_BITS <= bits <= MAX_BITS:
            raise InputError(f"bits must lie in [{MIN_BITS}, {MAX_BITS}], got {bits}")
        if not isinstance(rotation, str) or rotation not in ROTATIONS:
            raise InputError(f"rotation must be one of {ROTATIONS}, got {rotation!r}")
        if not isinstance(scale, str) or scale not in SCALES:
            raise InputError(f"scale must be one of {SCALES}, got {scale!r}")
        if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or not 0 <= seed < 2**32:
            raise InputError(f"seed must be an integer in [0, 2^32), got {seed!r}")
        self.bits = bits
        self.rotation = rotation
        self.scale = scale
        self.seed = int(seed)
        self._rhts: dict[int, RandomizedHadamard] = {}
        self._signs_cache: dict[tuple[int, torch.device, torch.dtype], Tensor] = {}

    def __repr__(self) -> str:
        return f"E8Codec(bits={self.bits}, rotation={self.rotation!r}, scale={self.scale!r}, seed={self.seed})"

    def cache_key(self) -> str:
        """What determines this codec's output (for :func:`lqlib.store.memo`): its settings."""
        return repr(self)

    # ----------------------------------------------------------------- core (no host syncs)
    def _rht(self, dim: int) -> RandomizedHadamard:
        if dim not in self._rhts:
            self._rhts[dim] = RandomizedHadamard(dim, self.seed)
        return self._rhts[dim]

    def _signs(self, dim: int, device: torch.device, dtype: torch.dtype) -> Tensor:
        """The RHT's ±1 signs of dimension ``dim`` on ``device`` in ``dtype`` (cached)."""
        key = (dim, torch.device(device), dtype)
        if key not in self._signs_cache:
            self._signs_cache[key] = self._rht(dim).signs.to(device=key[1], dtype=dtype)
        return self._signs_cache[key]

    def _log2_dim(self, dim: int) -> int:
        """log2(d) with the RHT (its unnormalised output is sqrt(d) times the rotation's), else 0."""
        return dim.bit_length() - 1 if self.rotation == "rht" else 0

    def _step_codes(self, x: Tensor) -> Tensor:
        """int32 step codes, broadcastable to ``x`` (one per vector, or one in all).

        The mean square is that of ``x``, which the orthonormal rotation keeps."""
        squares = x.to(torch.float64).square()
        if self.scale == "vector":
            return step_codes_of_sum(pairwise_sum(squares), x.shape[-1], self.bits)
        mean_square = (squares.sum() / max(x.numel(), 1)).reshape([1] * x.dim())
        return exact_step_code(mean_square, self.bits)

    def _to_lattice_units(self, transformed: Tensor, codes: Tensor) -> Tensor:
        """The transformed vectors in lattice units: ``u · R(k − 4·log2 d)·2^-log2(d)`` per vector,
        ``u / (a·sqrt(d))`` with one step ``a`` for the tensor."""
        shift = self._log2_dim(transformed.shape[-1])
        if self.scale == "vector":
            return transformed * inverse_step_values(codes - 4 * shift, transformed.dtype, shift)
        return transformed / (exact_step_value(codes, transformed.dtype) * math.sqrt(2**shift))

    def _synthesis_factors(self, codes: Tensor, dim: int, dtype: torch.dtype) -> Tensor:
        """Factors that take lattice points back to the transformed domain (``H·p · factor``)."""
        shift = self._log2_dim(dim)
        if self.scale == "vector":
            return step_values(codes - 4 * shift, dtype)
        return exact_step_value(codes, dtype) / math.sqrt(2**shift)

    def _analyse(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x (..., d) in the work dtype → (E8 points in lattice units (..., d), step codes)."""
        d = x.shape[-1]
        transformed = fwht(x * self._signs(d, x.device, x.dtype)) if self.rotation == "rht" else x
        codes = self._step_codes(x)
        scaled = self._to_lattice_units(transformed, codes)
        points = nearest_e8(scaled.reshape(*x.shape[:-1], d // 8, 8)).reshape(x.shape)
        return points + 0.0, codes  # + 0.0: no negative zeros, whatever the rounding's path

    def _synthesise(self, points: Tensor, codes: Tensor) -> Tensor:
        """Inverse of :meth:`_analyse` up to the quantization error."""
        d = points.shape[-1]
        factors = self._synthesis_factors(codes, d, points.dtype)
        if self.rotation == "rht":
            return fwht(points) * factors * self._signs(d, points.device, points.dtype)
        return points * factors

    # ----------------------------------------------------------------- checks
    def _validate(self, x: Tensor) -> Tensor:
        """Check the input and return it in the work dtype (float64 stays float64, else float32)."""
        if not isinstance(x, Tensor):
            raise InputError(f"expected a torch.Tensor, got {type(x).__name__}")
        if x.device.type == "meta":
            raise InputError("a meta tensor holds no values to code; pass a tensor on a real device")
        if x.layout != torch.strided:
            raise InputError(f"expected a dense tensor, got layout {x.layout}; call .to_dense() first")
        if x.dtype not in DTYPES:
            raise InputError(f"dtype {x.dtype} is not supported; use one of {DTYPES}")
        if x.dim() == 0:
            raise InputError("expected a tensor of shape (..., d), got a scalar")
        d = x.shape[-1]
        if d == 0 or d % 8:
            raise InputError(
                f"the last dim must be a positive multiple of 8 (E8 blocks), got {d}; "
                "pad the vectors yourself if you must"
            )
        if self.rotation == "rht" and d & (d - 1):
            raise InputError(f"the RHT needs a power-of-two last dim, got {d}; use rotation='none'")
        x = x.detach().to(torch.float64 if x.dtype == torch.float64 else torch.float32)
        if x.numel() and not bool(torch.isfinite(x).all()):
            raise InputError("input contains NaN or Inf")
        return x

    def _out_of_range(self, x: Tensor, codes: Tensor) -> bool:
        """Whether a nonzero vector (or the tensor) needs a step outside [2^-100, 2^100]: exactly where
        a step code sits at a clamp, checked from the sums of squares (rare: one comparison otherwise)."""
        if self.scale == "vector":
            if not bool(((codes == CODE_MIN) | (codes == CODE_MAX)).any()):
                return False
            sums = pairwise_sum(x.to(torch.float64).square())
            return bool(step_codes_out_of_range(sums, x.shape[-1], self.bits).any())
        if not bool(((codes == _EXACT_CLAMPS[0]) | (codes == _EXACT_CLAMPS[1])).any()):
            return False
        mean_square = x.to(torch.float64).square().sum() / max(x.numel(), 1)
        return bool(exact_step_out_of_range(mean_square, self.bits))

    def _range_error(self) -> InputError:
        low, high = supported_rms(self.bits, self.scale)
        what = "a vector" if self.scale == "vector" else "the tensor"
        return InputError(
            f"input magnitude is out of range: {what} has an RMS outside [{low:.3g}, {high:.3g}], "
            f"the range supported at {self.bits} bits/dim (its step would leave [2^-100, 2^100]); "
            "multiply the input by a power of two and divide the result by it, or zero such vectors"
        )

    def _checked_analysis(self, x: Tensor) -> tuple[Tensor, Tensor]:
        points, codes = self._analyse(x)
        if x.numel() and self._out_of_range(x, codes):
            raise self._range_error()
        if points.numel() and not bool(points.abs().amax() < _MAX_POINT):
            advice = "use scale='vector'" if self.scale == "tensor" else "rescale the input"
            raise InputError(f"input magnitude is out of range: its lattice points exceed 2^30 ({advice})")
        return points, codes

    # ----------------------------------------------------------------- public API
    def check(self, x: Tensor) -> None:
        """Raise :class:`lqlib.InputError` where :meth:`encode` and :meth:`quantize` would refuse ``x``
        (type, dtype, shape, NaN/Inf, the supported range), without quantizing it (per-vector steps:
        the step codes only)."""
        work = self._validate(x)
        if self.scale == "tensor":
            self._checked_analysis(work)
        elif work.numel() and self._out_of_range(work, self._step_codes(work)):
            raise self._range_error()

    def quantize(self, x: Tensor) -> Tensor:
        """Quantize-dequantize without entropy coding; same shape, dtype and device as ``x``
        (saturated to the dtype's finite range, see :func:`saturate`)."""
        work = self._validate(x)
        points, codes = self._checked_analysis(work)
        return saturate(self._synthesise(points, codes), x.dtype)

    def encode(self, x: Tensor) -> Encoded:
        """Quantize ``x`` (..., d) and entropy-code it."""
        work = self._validate(x)
        points, codes = self._checked_analysis(work)
        symbols = points_to_symbols(points.reshape(-1, 8)).cpu().numpy()
        header = WireHeader(self.rotation, self.scale, x.dtype, self.bits, self.seed, tuple(x.shape))
        words = encode_symbols(symbols, gaussian_symbol_model(self.bits))
        return Encoded(header, codes.reshape(-1).cpu().numpy(), words)

    def decode(
        self, encoded: Encoded, device: torch.device | str = "cpu", max_numel: int | None = DEFAULT_MAX_NUMEL
    ) -> Tensor:
        """Reconstruct the tensor; equals ``quantize(x)`` bit for bit on the same device.

        ``max_numel``: the largest tensor (in elements) this call may allocate, a guard against
        streams that declare a huge shape over a small payload (memory bombs); ``None`` for no limit.
        Raises :class:`lqlib.FormatError` (:class:`lqlib.CorruptStreamError` where the payload does
        not decode to exactly the declared tensor, e.g. a shape raised past what the payload holds)
        and :class:`lqlib.CodecMismatchError` for streams of other settings."""
        if not isinstance(encoded, Encoded):
            raise InputError(
                f"decode takes an lqlib.Encoded, got {type(encoded).__name__}; for bytes, pass "
                "lqlib.Encoded.from_bytes(data)"
            )
        try:
            device = torch.device(device)
        except (RuntimeError, TypeError) as err:
            raise InputError(f"device must name a torch device, got {device!r}") from err
        if max_numel is not None and (
            isinstance(max_numel, bool) or not isinstance(max_numel, numbers.Integral) or max_numel < 0
        ):
            raise InputError(f"max_numel must be a non-negative integer or None, got {max_numel!r}")
        h = encoded.header
        mine = (self.rotation, self.scale, self.bits, self.seed)
        if (h.rotation, h.scale, h.bits, h.seed) != mine:
            raise CodecMismatchError(
                f"bitstream was made with rotation={h.rotation!r}, scale={h.scale!r}, "
                f"bits={h.bits}, seed={h.seed}; this codec is {self!r}"
            )
        if (
            len(h.shape) == 0
            or h.shape[-1] == 0
            or h.shape[-1] % 8
            or (h.rotation == "rht" and h.shape[-1] & (h.shape[-1] - 1))
        ):
            raise CorruptStreamError(f"bitstream declares an impossible shape {h.shape}")
        model = gaussian_symbol_model(h.bits)
        n_blocks = h.numel // 8
        sentinel = h.version >= 3
        if 0.5 * n_blocks * model.min_bits_per_block + (32 if sentinel else 0) > 32 * (encoded.words.size + 2):
            raise CorruptStreamError(f"{encoded.words.size} payload words cannot hold {n_blocks} blocks")
        if max_numel is not None and h.numel > max_numel:
            raise FormatError(
                f"bitstream declares {h.numel} elements, more than max_numel={max_numel}; if you trust it, "
                "pass a larger max_numel (or None)"
            )
        codes = np.asarray(encoded.step_codes)
        in_range = (
            valid_exact_code(codes)
            if h.scale == "tensor"
            else not codes.size or (codes.min() >= CODE_MIN and codes.max() <= CODE_MAX)
        )
        if codes.shape != (h.n_scales,) or not in_range:
            raise CorruptStreamError(
                f"bitstream holds {codes.size} step codes for {h.n_scales} steps, or step codes out of range"
            )
        symbols = decode_symbols(encoded.words, n_blocks, model, sentinel=sentinel)
        work_dtype = torch.float64 if h.dtype == torch.float64 else torch.float32
        points = symbols_to_points(torch.from_numpy(symbols).to(device), work_dtype).reshape(h.shape)
        steps_shape = [1] * len(h.shape) if h.scale == "tensor" else [*h.shape[:-1], 1]
        codes = torch.from_numpy(codes.astype(np.int32)).to(device).reshape(steps_shape)
        return saturate(self._synthesise(points, codes), h.dtype)

    def bits_per_dim(self, encoded: Encoded) -> float:
        """Coded rate: every stored byte (header, step codes, payload, CRC) × 8 / number of elements."""
        return 8.0 * encoded.nbytes() / max(encoded.numel, 1)
