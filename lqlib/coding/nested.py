"""A fixed-rate E8 code of 4 bits/dim that attention can decode in registers: E8 nested in 16·Z^8.

Each block of 8 coordinates is one 32-bit word, every word decodes on its own (random access),
and decoding is a few integer operations per coordinate, no search. The format:

* the same randomized Hadamard transform as :class:`lqlib.E8Codec` (``u = H·(signs ⊙ x)``);
* one step code ``k`` per vector (int16, the grid ``2^(k/8)`` of :mod:`lqlib.core.steps`), here
  chosen from the vector's **largest** rotated coordinate: the smallest grid step with
  ``max|w| / step <= peak`` (``w = u/√d``, the orthonormal rotation; ``peak`` = 11 lattice units
  by default), by the exact float64 thresholds of :func:`lqlib.core.steps.step_codes_of_sum`
  applied to ``max u²``;
* per block, a point ``p`` of E8 inside the cube ``floor(p_i) ∈ [-8, 7]`` — the E8 points modulo
  16·Z^8 (a nested lattice code: fine lattice E8, coarse lattice 16·Z^8, whose Voronoi cell is
  that cube), 2^32 of them — and one **scale flag**: the block is ``p`` (flag 0) or ``1.5·p``
  (flag 1). The encoder takes the nearest E8 point of the block in lattice units ``y``; if it
  leaves the cube, the nearest point of ``y·(2/3)`` (flag 1); if that leaves it too (rare), the
  nearest point of ``y·(2/3)`` clamped to [-7, 6.5]^8, which always lies inside;
* optionally (``search`` = s > 0), an encoder-side search over the step: the encoder codes the vector
  at each of the step codes ``k0, k0 − 1, …, k0 − s`` (``k0`` the peak's, above; never below the
  grid's smallest code) and keeps the one of least squared error, compared exactly in integers: per
  candidate ``j`` the error ``Σ trunc(1024·(y − β·p))²`` over the vector's coordinates in lattice units,
  times ``round(2^14 · 2^(−j/4))`` (the squared step ratio), first candidate on ties. The decoder does
  not change: a searched vector is one more valid code of the same format;
* reconstruction as the codec's: ``x̂ = signs ⊙ H·(β ⊙ p) · 2^((k − 4·log2 d)/8)``, ``β`` 1 or 1.5
  per block (:meth:`lqlib.E8Codec._synthesise` on ``β ⊙ p``), saturated to the output dtype's finite
  range (:func:`lqlib.coding.codec.saturate`).

Word layout of a block (little-endian nibbles, nibble ``i`` at bits ``4i .. 4i+3``): write
``p = z + b·½·1`` with ``z ∈ D8`` (even sum) and ``b`` the coset bit; nibbles ``0..6`` hold
``z_i + 8``; nibble 7 holds ``z_7 − par + b + 8`` with ``par`` the parity of ``z_0 + … + z_6``
(= that of ``z_7``), so its low bit is ``b``. Decoding: ``b = n_7 & 1``, ``par = (n_0 + … + n_6) & 1``,
``z_i = n_i − 8``, ``z_7 = n_7 − 8 − b + par``; in codes ``2p``: ``2n_i − 16 + b`` (i < 7) and
``2n_7 − 16 − b + 2·par``. Flags: bit ``j mod 8`` of byte ``j div 8`` of a vector's flag bytes
(``ceil(d/64)`` bytes) is block ``j``'s.

Storage per vector: ``4·d`` bits of words + 16 (step code) + ``8·ceil(d/64)`` (flags): 4.25
bits/dim at d = 128 (3.76× below float16), 4.375 at d = 64. On Gaussian vectors (d = 64 to 128)
the mean squared error is about 1.6–1.8× the Gaussian bound ``4^-4``, against 1.22× for the
entropy-coded codec at the same payload rate and about 2.4× for a 4-bit Lloyd–Max scalar code
(numbers from our runs; ``lqlib.evaluation.fixed_rate`` measures them).

Why this shaping and not E8's own Voronoi cell (16·E8, as NestQuant): decoding a 16·E8 Voronoi
code needs a nearest-point search in E8 for every block (about twenty operations per
coordinate), which would make attention over the codes compute-bound; the cube needs none.
The per-block scale flag buys back most of what the cube loses to a spherical region.

The search lowers the Gaussian mean squared error by about 8% (s = 1) to 10% (s = 2) at d = 64 and
128 for (s + 2)× the encoder's work (``benchmarks/nested_step_search.py`` measures it), and the
default model's perplexity increase from 5.47% to 4.87% with s = 1 (220 windows,
results/fixed_rate_quality_2026-12-06_w220-search.md).

Every operation is one IEEE float32 operation in a fixed order (no fused multiply-add), and the
search's comparison is in integers, so the Triton kernels of :mod:`lqlib.kernels.nested` produce the
same words, step codes, flags and values bit for bit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import torch
from torch import Tensor

from ..core.lattices import nearest_e8
from ..core.rht import fwht
from ..core.steps import CODE_MIN, step_codes_of_sum
from ..errors import FormatError, InputError
from .codec import E8Codec, saturate

__all__ = [
    "NestedE8Codec",
    "NestedCodes",
    "PEAK",
    "BETA",
    "SEARCH_MAX",
    "search_weights",
    "pack_words",
    "unpack_words",
    "pack_flags",
    "unpack_flags",
    "flag_bytes",
    "bits_per_dim",
]

PEAK = 11.0
"""Default target of the largest |rotated coordinate| in lattice units (tuned on Gaussian vectors,
d = 64 and 128: the mean squared error is flat within 3% between 10.5 and 11.5)."""
BETA = 1.5
"""The flagged blocks' scale (exact in float16 times any code)."""
INV_BETA = float(np.float32(1.0 / BETA))
"""What the encoder multiplies by (float32 of 2/3; a product is one IEEE operation on every device)."""
CUBE_LOW, CUBE_HIGH = -8.0, 7.5  # p inside the cube: floor(p_i) in [-8, 7]
SAFE_LOW, SAFE_HIGH = -7.0, 6.5  # the nearest E8 point of a block inside these bounds lies in the cube
LIMIT = 64.0  # lattice units are clamped here first (a no-op but for steps clamped at 2^±100)
SEARCH_MAX = 3
"""The most finer step codes the encoder may try (``search``)."""
DECISION_SCALE = 1024.0
"""The search compares errors in units of 1/1024 lattice unit, truncated to integers (exact, any order)."""
_WEIGHT_BITS = 14
_STEPS_DTYPE = torch.int16
_WORDS_DTYPE = torch.int32
_FLAGS_DTYPE = torch.uint8


def search_weights(search: int) -> list[int]:
    """Integer weights ``round(2^14·2^(−j/4))``, j = 0..search: candidate ``k0 − j``'s squared step
    relative to ``k0``'s, so that ``error_j · weight_j`` compares errors in one unit (< 2^63 for d <= 256)."""
    return [round(2.0 ** (_WEIGHT_BITS - j / 4)) for j in range(search + 1)]


def flag_bytes(dim: int) -> int:
    """Bytes of scale flags per vector of dimension ``dim``: one bit per block of 8."""
    return -(-(dim // 8) // 8)


def bits_per_dim(dim: int) -> float:
    """Stored bits per coordinate at head dim ``dim``: words, int16 step code and flag bytes."""
    return (4 * dim + 16 + 8 * flag_bytes(dim)) / dim


def pack_words(points: Tensor) -> Tensor:
    """E8 points inside the cube, (..., 8k) float → words (..., k) int32 (see the module docstring)."""
    two_p = (points * 2.0).to(torch.int64).reshape(*points.shape[:-1], -1, 8)
    z = two_p >> 1  # floor(p)
    b = two_p[..., 7] & 1
    par = z[..., :7].sum(-1) & 1
    nibbles = z + 8
    nibbles[..., 7] = z[..., 7] - par + b + 8
    if bool(((nibbles < 0) | (nibbles > 15)).any()):
        raise InputError("points outside the cube floor(p) in [-8, 7] cannot be packed")
    word = (nibbles << (4 * torch.arange(8, device=points.device))).sum(-1)
    return torch.where(word >= 2**31, word - 2**32, word).to(_WORDS_DTYPE)


def unpack_words(words: Tensor) -> Tensor:
    """Words (..., k) int32 → E8 points (..., 8k) float32 (exact: halves and integers in [-8, 7.5])."""
    w = words.to(torch.int64) & 0xFFFFFFFF
    nibbles = (w[..., None] >> (4 * torch.arange(8, device=words.device))) & 15
    b = nibbles[..., 7] & 1
    par = nibbles[..., :7].sum(-1) & 1
    two_p = 2 * nibbles - 16 + b[..., None]
    two_p[..., 7] = 2 * nibbles[..., 7] - 16 - b + 2 * par
    return (two_p.to(torch.float32) * 0.5).reshape(*words.shape[:-1], -1)


def pack_flags(flags: Tensor) -> Tensor:
    """Block flags (..., k) bool → bytes (..., ceil(k/8)) uint8, block j at bit j mod 8 of byte j div 8."""
    k = flags.shape[-1]
    width = -(-k // 8) * 8
    bits = torch.zeros(*flags.shape[:-1], width, dtype=torch.int64, device=flags.device)
    bits[..., :k] = flags.to(torch.int64)
    weights = 1 << torch.arange(8, device=flags.device)
    return (bits.reshape(*flags.shape[:-1], -1, 8) * weights).sum(-1).to(_FLAGS_DTYPE)


def unpack_flags(data: Tensor, blocks: int) -> Tensor:
    """Inverse of :func:`pack_flags`: bytes (..., ceil(blocks/8)) → (..., blocks) bool."""
    bits = (data.to(torch.int64)[..., None] >> torch.arange(8, device=data.device)) & 1
    return bits.reshape(*data.shape[:-1], -1)[..., :blocks].bool()


@dataclass(frozen=True)
class NestedCodes:
    """A tensor of shape ``shape`` = (..., d) in the nested E8 format.

    Attributes
    ----------
    words : (..., d/8) int32, one per block of 8.
    steps : (...) int16, the step codes k.
    flags : (..., ceil(d/64)) uint8, the blocks' scale flags.
    """

    words: Tensor
    steps: Tensor
    flags: Tensor

    @property
    def shape(self) -> tuple[int, ...]:
        return (*self.words.shape[:-1], 8 * self.words.shape[-1])

    def nbytes(self) -> int:
        """Bytes stored: words, step codes and flags."""
        return sum(t.numel() * t.element_size() for t in (self.words, self.steps, self.flags))


def _in_cube(points: Tensor) -> Tensor:
    """(..., 8) → (...) bool: every coordinate's floor in [-8, 7]."""
    return ((points >= CUBE_LOW) & (points <= CUBE_HIGH)).all(-1)


def _points_in_cube(blocks: Tensor) -> tuple[Tensor, Tensor]:
    """Blocks (..., 8) in lattice units → (points p in the cube (..., 8) float32, flags (...) bool): the
    nearest E8 point; of ``y·(2/3)`` where that leaves the cube; of it clamped to the safe box where
    that leaves it too."""
    first = nearest_e8(blocks)
    fits = _in_cube(first)
    shrunk = blocks * INV_BETA
    second = nearest_e8(shrunk)
    third = nearest_e8(shrunk.clamp(SAFE_LOW, SAFE_HIGH))
    second = torch.where(_in_cube(second)[..., None], second, third)
    return torch.where(fits[..., None], first, second) + 0.0, ~fits  # + 0.0: no negative zeros


def _decision_errors(blocks: Tensor, points: Tensor, flags: Tensor) -> Tensor:
    """Blocks (..., C, 8) in lattice units, their points and flags → (...) int64 ``Σ trunc(1024·(y − β·p))²``
    (``y − β·p`` one float32 subtraction; the rest exact)."""
    beta = torch.where(flags, BETA, 1.0).to(blocks.dtype)[..., None]
    q = ((blocks - points * beta) * DECISION_SCALE).to(torch.int64)
    return (q * q).sum((-1, -2))


class NestedE8Codec:
    """The fixed-rate nested E8 format (see the module docstring).

    Parameters
    ----------
    rotation : ``"rht"`` (randomized Hadamard transform, seeded by ``seed``; head dim a power of two)
        or ``"none"``.
    seed : seed of the RHT signs (the same signs as ``E8Codec(seed=seed)``).
    peak : the largest |rotated coordinate| in lattice units the step aims for (default :data:`PEAK`).
    search : how many finer step codes the encoder also tries, 0 to :data:`SEARCH_MAX` (default 0: the
        peak's step alone). Decoding is the same for every value.
    """

    def __init__(self, rotation: str = "rht", seed: int = 0, peak: float = PEAK, search: int = 0) -> None:
        if not 4.0 <= float(peak) <= 64.0:
            raise InputError(f"peak must lie in [4, 64] lattice units, got {peak}")
        if isinstance(search, bool) or not isinstance(search, int) or not 0 <= search <= SEARCH_MAX:
            raise InputError(f"search must be an integer in [0, {SEARCH_MAX}], got {search!r}")
        # the codec lends its RHT signs, lattice-unit factors and synthesis (validated there)
        self._codec = E8Codec(4.0, rotation=rotation, scale="vector", seed=seed)
        self.rotation = rotation
        self.seed = int(seed)
        self.peak = float(peak)
        self.search = search

    def __repr__(self) -> str:
        return f"NestedE8Codec(rotation={self.rotation!r}, seed={self.seed}, peak={self.peak:g}, search={self.search})"

    @cached_property
    def peak_bits(self) -> float:
        """The rate whose step-code thresholds give ``ceil(8·log2(max|w| / peak))``: with
        ``S = max u²`` over ``2^shift`` values, :func:`step_codes_of_sum` computes
        ``floor(8·log2(sqrt(2πe·S/2^shift)·2^-bits) + 1/2)``, which this makes ``floor(v + 1)``."""
        return 0.5 * math.log2(2.0 * math.pi * math.e) + math.log2(self.peak) - 1.0 / 16.0

    # ------------------------------------------------------------------ analysis / synthesis
    def _validate(self, x: Tensor) -> Tensor:
        work = self._codec._validate(x)
        d = work.shape[-1]
        if d < 8 or (self.rotation == "rht" and d & (d - 1)):
            raise InputError(f"the nested format needs a head dim of at least 8 (a power of two with the RHT), got {d}")
        return work

    def step_codes(self, u: Tensor) -> Tensor:
        """int32 step codes (..., 1) of transformed vectors ``u`` (..., d): the smallest grid step
        with ``max|u| / (step·√(2^shift)) <= peak``, from float64 ``max u²`` (exact)."""
        shift = self._codec._log2_dim(u.shape[-1])
        peak_square = u.to(torch.float64).square().amax(dim=-1, keepdim=True)
        return step_codes_of_sum(peak_square, 1 << shift, self.peak_bits)

    def analyse(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """x (..., d) in the work dtype → (points p in the cube (..., d) float32, flags (..., d/8) bool,
        step codes (..., 1) int32). ``β ⊙ p`` are the lattice points the decoder scales back."""
        d = x.shape[-1]
        u = fwht(x * self._codec._signs(d, x.device, x.dtype)) if self.rotation == "rht" else x
        peak_codes = codes = self.step_codes(u)
        blocks = self._blocks(u, codes)
        points, flags = _points_in_cube(blocks)
        if self.search:
            weights = search_weights(self.search)
            best = _decision_errors(blocks, points, flags) * weights[0]
            for j, weight in enumerate(weights[1:], start=1):
                finer = (peak_codes - j).clamp(min=CODE_MIN)
                blocks = self._blocks(u, finer)
                p, f = _points_in_cube(blocks)
                err = _decision_errors(blocks, p, f) * weight
                better = err < best  # ties keep the coarser step
                best = torch.where(better, err, best)
                codes = torch.where(better[..., None], finer, codes)
                points = torch.where(better[..., None, None], p, points)
                flags = torch.where(better[..., None], f, flags)
        return points.reshape(x.shape), flags, codes

    def _blocks(self, u: Tensor, codes: Tensor) -> Tensor:
        """Transformed vectors (..., d) at step codes (..., 1) → lattice units as blocks (..., d/8, 8)."""
        y = self._codec._to_lattice_units(u, codes).clamp(-LIMIT, LIMIT)
        return y.reshape(*u.shape[:-1], u.shape[-1] // 8, 8)

    def synthesise(self, points: Tensor, flags: Tensor, codes: Tensor) -> Tensor:
        """Points (..., d) in the cube, flags (..., d/8), step codes (..., 1) → vectors in the work dtype."""
        d = points.shape[-1]
        beta = torch.where(flags, BETA, 1.0).to(points.dtype)
        scaled = (points.reshape(*points.shape[:-1], d // 8, 8) * beta[..., None]).reshape(points.shape)
        return self._codec._synthesise(scaled, codes)

    # ------------------------------------------------------------------ public API
    def encode(self, x: Tensor) -> NestedCodes:
        """Quantize ``x`` (..., d) (float16/bfloat16/float32/float64, finite) into the format."""
        work = self._validate(x)
        points, flags, codes = self.analyse(work.to(torch.float32))
        return NestedCodes(pack_words(points), codes[..., 0].to(_STEPS_DTYPE), pack_flags(flags))

    def decode(self, coded: NestedCodes, dtype: torch.dtype = torch.float32) -> Tensor:
        """The vectors (..., d) in ``dtype``: equals :meth:`quantize` of what was encoded, bit for bit."""
        words, steps, flags = coded.words, coded.steps, coded.flags
        if words.dtype != _WORDS_DTYPE or steps.dtype != _STEPS_DTYPE or flags.dtype != _FLAGS_DTYPE:
            raise FormatError(
                f"nested codes are int32 words, int16 steps and uint8 flags; got {words.dtype}, {steps.dtype}, "
                f"{flags.dtype}"
            )
        d = 8 * words.shape[-1]
        if tuple(steps.shape) != tuple(words.shape[:-1]) or tuple(flags.shape) != (*words.shape[:-1], flag_bytes(d)):
            raise FormatError(
                f"words {tuple(words.shape)}, steps {tuple(steps.shape)} and flags {tuple(flags.shape)} do not "
                "describe one tensor"
            )
        points = unpack_words(words)
        out = self.synthesise(points, unpack_flags(flags, d // 8), steps.to(torch.int32)[..., None])
        return saturate(out, dtype)

    def quantize(self, x: Tensor) -> Tensor:
        """Quantize-dequantize (the in-loop path): same shape, dtype and device as ``x``."""
        work = self._validate(x).to(torch.float32)
        points, flags, codes = self.analyse(work)
        return saturate(self.synthesise(points, flags, codes), x.dtype)

    def bits_per_dim(self, dim: int) -> float:
        """Stored bits per coordinate at head dim ``dim`` (side information included)."""
        return bits_per_dim(dim)
