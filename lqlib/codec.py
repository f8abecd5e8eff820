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

Invariant: ``decode(encode(x))`` equals ``quantize(x)`` bit for bit on the
device ``x`` lives on.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from .entropy_model import gaussian_symbol_model
from .errors import CodecMismatchError, CorruptStreamError, InputError
from .lattices import nearest_e8
from .rans import decode_symbols, encode_symbols
from .rht import RandomizedHadamard
from .steps import (CODE_MAX, CODE_MIN, exact_step_code, exact_step_value, step_codes, step_values,
                    valid_exact_code)
from .symbols import points_to_symbols, symbols_to_points
from .wire import DTYPES, ROTATIONS, SCALES, WireHeader, pack, packed_size, unpack

__all__ = ["E8Codec", "Encoded", "MIN_BITS", "MAX_BITS"]

MIN_BITS = 0.5
MAX_BITS = 10.0
_MAX_POINT = 2.0 ** 30  # symbols must fit int32 with room to spare


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
    def from_bytes(cls, data: bytes) -> "Encoded":
        """Parse and check bytes made by :meth:`to_bytes`; raises :class:`lqlib.FormatError`."""
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
    seed : seed of the RHT signs.
    """

    def __init__(self, bits: float = 4.0, rotation: str = "rht", scale: str = "vector", seed: int = 0) -> None:
        bits = float(np.float32(bits))
        if not MIN_BITS <= bits <= MAX_BITS:
            raise InputError(f"bits must lie in [{MIN_BITS}, {MAX_BITS}], got {bits}")
        if rotation not in ROTATIONS:
            raise InputError(f"rotation must be one of {ROTATIONS}, got {rotation!r}")
        if scale not in SCALES:
            raise InputError(f"scale must be one of {SCALES}, got {scale!r}")
        if not 0 <= seed < 2 ** 32:
            raise InputError(f"seed must fit in uint32, got {seed}")
        self.bits = bits
        self.rotation = rotation
        self.scale = scale
        self.seed = int(seed)
        self._rhts: dict[int, RandomizedHadamard] = {}

    def __repr__(self) -> str:
        return f"E8Codec(bits={self.bits}, rotation={self.rotation!r}, scale={self.scale!r}, seed={self.seed})"

    # ----------------------------------------------------------------- core (no host syncs)
    def _rht(self, dim: int) -> RandomizedHadamard:
        if dim not in self._rhts:
            self._rhts[dim] = RandomizedHadamard(dim, self.seed)
        return self._rhts[dim]

    def _step_codes(self, rotated: Tensor) -> Tensor:
        """int32 step codes, broadcastable to ``rotated`` (one per vector, or one in all)."""
        if self.scale == "vector":
            return step_codes(rotated.square().mean(dim=-1, keepdim=True), self.bits)
        mean_square = (rotated.square().sum() / max(rotated.numel(), 1)).reshape([1] * rotated.dim())
        return exact_step_code(mean_square, self.bits)

    def _step_values(self, codes: Tensor, dtype: torch.dtype) -> Tensor:
        return step_values(codes, dtype) if self.scale == "vector" else exact_step_value(codes, dtype)

    def _analyse(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x (..., d) in the work dtype → (E8 points in lattice units (..., d), step codes)."""
        rotated = self._rht(x.shape[-1]).forward(x) if self.rotation == "rht" else x
        codes = self._step_codes(rotated)
        blocks = (rotated / self._step_values(codes, rotated.dtype)).reshape(*x.shape[:-1], x.shape[-1] // 8, 8)
        return nearest_e8(blocks).reshape(x.shape), codes

    def _synthesise(self, points: Tensor, codes: Tensor) -> Tensor:
        """Inverse of :meth:`_analyse` up to the quantization error."""
        scaled = points * self._step_values(codes, points.dtype)
        return self._rht(points.shape[-1]).inverse(scaled) if self.rotation == "rht" else scaled

    # ----------------------------------------------------------------- checks
    def _validate(self, x: Tensor) -> Tensor:
        """Check the input and return it in the work dtype (float64 stays float64, else float32)."""
        if not isinstance(x, Tensor):
            raise InputError(f"expected a torch.Tensor, got {type(x).__name__}")
        if x.dtype not in DTYPES:
            raise InputError(f"dtype {x.dtype} is not supported; use one of {DTYPES}")
        if x.dim() == 0:
            raise InputError("expected a tensor of shape (..., d), got a scalar")
        d = x.shape[-1]
        if d == 0 or d % 8:
            raise InputError(f"the last dim must be a positive multiple of 8 (E8 blocks), got {d}; "
                             "pad the vectors yourself if you must")
        if self.rotation == "rht" and d & (d - 1):
            raise InputError(f"the RHT needs a power-of-two last dim, got {d}; use rotation='none'")
        x = x.detach().to(torch.float64 if x.dtype == torch.float64 else torch.float32)
        if x.numel() and not bool(torch.isfinite(x).all()):
            raise InputError("input contains NaN or Inf")
        return x

    def _checked_analysis(self, x: Tensor) -> tuple[Tensor, Tensor]:
        points, codes = self._analyse(x)
        if points.numel() and not bool(points.abs().amax() < _MAX_POINT):
            raise InputError("input magnitude is out of range: its lattice points exceed 2^30 "
                             "(use scale='vector', or values below 2^100)")
        return points, codes

    # ----------------------------------------------------------------- public API
    def quantize(self, x: Tensor) -> Tensor:
        """Quantize-dequantize without entropy coding; same shape, dtype and device as ``x``."""
        work = self._validate(x)
        points, codes = self._checked_analysis(work)
        return self._synthesise(points, codes).to(x.dtype)

    def encode(self, x: Tensor) -> Encoded:
        """Quantize ``x`` (..., d) and entropy-code it."""
        work = self._validate(x)
        points, codes = self._checked_analysis(work)
        symbols = points_to_symbols(points.reshape(-1, 8)).cpu().numpy()
        header = WireHeader(self.rotation, self.scale, x.dtype, self.bits, self.seed, tuple(x.shape))
        words = encode_symbols(symbols, gaussian_symbol_model(self.bits))
        return Encoded(header, codes.reshape(-1).cpu().numpy(), words)

    def decode(self, encoded: Encoded, device: torch.device | str = "cpu") -> Tensor:
        """Reconstruct the tensor; equals ``quantize(x)`` bit for bit on the same device."""
        h = encoded.header
        mine = (self.rotation, self.scale, self.bits, self.seed)
        if (h.rotation, h.scale, h.bits, h.seed) != mine:
            raise CodecMismatchError(f"bitstream was made with rotation={h.rotation!r}, scale={h.scale!r}, "
                                     f"bits={h.bits}, seed={h.seed}; this codec is {self!r}")
        if len(h.shape) == 0 or h.shape[-1] == 0 or h.shape[-1] % 8 or (
                h.rotation == "rht" and h.shape[-1] & (h.shape[-1] - 1)):
            raise CorruptStreamError(f"bitstream declares an impossible shape {h.shape}")
        model = gaussian_symbol_model(h.bits)
        n_blocks = h.numel // 8
        if 0.5 * n_blocks * model.min_bits_per_block > 32 * (encoded.words.size + 2):
            raise CorruptStreamError(f"{encoded.words.size} payload words cannot hold {n_blocks} blocks")
        codes = np.asarray(encoded.step_codes)
        in_range = (valid_exact_code(codes) if h.scale == "tensor"
                    else not codes.size or (codes.min() >= CODE_MIN and codes.max() <= CODE_MAX))
        if codes.shape != (h.n_scales,) or not in_range:
            raise CorruptStreamError(f"bitstream holds {codes.size} step codes for {h.n_scales} steps, or step "
                                     "codes out of range")
        symbols = decode_symbols(encoded.words, n_blocks, model)
        work_dtype = torch.float64 if h.dtype == torch.float64 else torch.float32
        points = symbols_to_points(torch.from_numpy(symbols).to(device), work_dtype).reshape(h.shape)
        steps_shape = [1] * len(h.shape) if h.scale == "tensor" else [*h.shape[:-1], 1]
        codes = torch.from_numpy(codes.astype(np.int32)).to(device).reshape(steps_shape)
        return self._synthesise(points, codes).to(h.dtype)

    def bits_per_dim(self, encoded: Encoded) -> float:
        """Coded rate: every stored byte (header, step codes, payload, CRC) × 8 / number of elements."""
        return 8.0 * encoded.nbytes() / max(encoded.numel, 1)
