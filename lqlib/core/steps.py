"""Step sizes on a log grid, and their compact storage.

The codec's step for a group of values with mean square σ² is
``a = sqrt(2πe·σ²)·2^(-b)`` rounded to the nearest point of the grid ``2^(k/8)``:
the stored side information is the integer code ``k``. Rounding log2(a) to 1/8 of an
octave changes a vector's rate by at most ±1/16 bit/dim and leaves the mean rate and
the mean squared error as they were to within 0.3% (the rounding is symmetric in log2).

Every device gets the same float for a code: ``a = ldexp(T[k mod 8], k div 8)`` with
``T[j]`` the float16 value of ``2^(j/8)``; multiplying by a power of two is exact. The
encoder multiplies by the reciprocal ``ldexp(R[k mod 8], -(k div 8))`` with ``R[j]`` the
float32 value of ``1/T[j]`` (a product is one IEEE operation everywhere; a Triton division
is not correctly rounded).

The code itself is computed without a logarithm: from the sum of squares ``S = m·2^e``
(float64, ``m`` in [0.5, 1)) of the ``n`` values a step covers, ``k = 4e + n0 − 4 + #{j :
m ≥ τ_j}`` with four thresholds ``τ_j`` and an integer ``n0`` that depend on the rate and
``n`` only (:func:`code_constants`). That is ``round(8·log2(sqrt(2πe·S/n)·2^-b))`` with
its boundaries held as float64 numbers: every device, and the Triton kernels, get the same
code from the same ``S``.

A single step for a whole tensor is not rounded to the grid: it is rounded to an 11-bit
mantissa (float16 precision, float32 range) and its code is its IEEE float32 bit pattern
(:func:`exact_step_code`), 32 bits once.

Storage (:func:`pack_codes`): the codes are cut into groups of ``GROUP`` consecutive
vectors; a group stores its smallest code (int16), the bit width ``w`` of its offsets
(uint8) and each offset ``k − min`` on ``w`` bits, little-endian bit order, the groups'
bits concatenated and padded to a byte. Codes of neighbouring KV vectors of one head lie
within about an octave, so a vector costs about 3–4 bits instead of a float16's 16.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch
from torch import Tensor

from ..errors import FormatError, InputError

__all__ = [
    "STEPS_PER_OCTAVE",
    "CODE_MIN",
    "CODE_MAX",
    "GROUP",
    "step_codes",
    "step_codes_of_sum",
    "step_codes_out_of_range",
    "exact_step_out_of_range",
    "step_values",
    "inverse_step_values",
    "code_constants",
    "pow2",
    "FRACTIONS",
    "INVERSE_FRACTIONS",
    "exact_step_code",
    "exact_step_value",
    "valid_exact_code",
    "pack_codes",
    "unpack_codes",
    "packed_codes_size",
]

STEPS_PER_OCTAVE = 8
CODE_MIN = -100 * STEPS_PER_OCTAVE  # steps from 2^-100 ...
CODE_MAX = 100 * STEPS_PER_OCTAVE  # ... to 2^100: normal float32 numbers
GROUP = 64
_MAX_WIDTH = int(CODE_MAX - CODE_MIN).bit_length()
_TWO_PI_E = 2.0 * math.pi * math.e
# T[j] = 2^(j/8) to float16 precision, and R[j] = 1/T[j] to float32 precision (both float32 arrays).
FRACTIONS = np.array([2.0 ** (j / STEPS_PER_OCTAVE) for j in range(STEPS_PER_OCTAVE)], dtype=np.float16).astype(
    np.float32
)
INVERSE_FRACTIONS = (1.0 / FRACTIONS.astype(np.float64)).astype(np.float32)
_FRACTIONS = FRACTIONS  # the name older code imports


def code_constants(bits: float, count: int) -> tuple[int, tuple[float, float, float, float]]:
    """``(n0, (τ_1, ..., τ_4))`` of the step code of a sum of squares of ``count`` values at ``bits``.

    With ``S = m·2^e``, ``m`` in [0.5, 1): ``k = 4e + n0 − 4 + #{j : m ≥ τ_j}``, which is
    ``floor(4·log2(2πe·S/count) − 8·bits + 1/2)`` with the boundaries rounded to float64.
    """
    offset = 4.0 * math.log2(_TWO_PI_E / count) - 8.0 * float(bits) + 0.5
    n0 = math.floor(offset)
    frac = offset - n0
    return n0, tuple(2.0 ** ((j - 4 - frac) / 4.0) for j in range(1, 5))


def step_codes_of_sum(sum_squares: Tensor, count: int, bits: float) -> Tensor:
    """Codes ``k`` (int32, same shape) of the steps ``sqrt(2πe·sum_squares/count)·2^(-bits)``.

    Computed in float64 by exponent and four comparisons (see the module docstring); a zero
    sum gets ``CODE_MIN``, codes are clamped to [CODE_MIN, CODE_MAX]. No host synchronisation.
    """
    s = sum_squares.to(torch.float64)
    codes = torch.where(s > 0, _unclamped_codes(s, count, bits), CODE_MIN)
    codes = torch.where(torch.isinf(s), CODE_MAX, codes)
    return codes.clamp(CODE_MIN, CODE_MAX).to(torch.int32)


def _unclamped_codes(s: Tensor, count: int, bits: float) -> Tensor:
    """int64 codes of positive finite float64 sums of squares ``s``, before any clamping."""
    n0, taus = code_constants(bits, count)
    mantissa, exponent = torch.frexp(s)
    codes = 4 * exponent.to(torch.int64) + (n0 - 4)
    for tau in taus:
        codes = codes + (mantissa >= tau).to(torch.int64)
    return codes


def step_codes_out_of_range(sum_squares: Tensor, count: int, bits: float) -> Tensor:
    """bool, same shape: where a nonzero sum of squares needs a step outside ``[2^-100, 2^100]``
    (to the grid's half step: its code would leave [CODE_MIN, CODE_MAX] and be clamped), or is infinite.

    The codec refuses such vectors (:class:`lqlib.InputError`): a clamped step would zero a tiny vector
    or code a huge one at many times the rate."""
    s = sum_squares.to(torch.float64)
    codes = _unclamped_codes(torch.where(s > 0, s, 1.0), count, bits)
    return (s > 0) & (torch.isinf(s) | (codes < CODE_MIN) | (codes > CODE_MAX))


def step_codes(mean_square: Tensor, bits: float) -> Tensor:
    """Codes ``k`` (int32, same shape) of the steps ``sqrt(2πe·mean_square)·2^(-bits)``.

    A zero mean square gets ``CODE_MIN``; codes are clamped to [CODE_MIN, CODE_MAX].
    No host synchronisation.
    """
    return step_codes_of_sum(mean_square, 1, bits)


def pow2(exponents: Tensor, dtype: torch.dtype) -> Tensor:
    """``2^n`` of integer ``exponents`` (normal range of ``dtype``), built from its bit pattern: exact."""
    n = exponents.to(torch.int64)
    if dtype == torch.float64:
        return ((n + 1023) << 52).view(torch.float64)
    return ((n + 127) << 23).to(torch.int32).view(torch.float32).to(dtype)


@functools.cache
def _table(which: str, device: torch.device, dtype: torch.dtype) -> Tensor:
    """FRACTIONS or INVERSE_FRACTIONS on ``device`` in ``dtype``, copied there once (a host-to-device
    copy synchronises; the quantizer must not)."""
    return torch.from_numpy({"fractions": FRACTIONS, "inverse": INVERSE_FRACTIONS}[which]).to(
        device=device, dtype=dtype
    )


def step_values(codes: Tensor, dtype: torch.dtype) -> Tensor:
    """The steps ``2^(k/8)`` of integer ``codes``, exactly the same floats on every device."""
    codes = codes.to(torch.int64)
    fractions = _table("fractions", codes.device, dtype)
    return fractions[codes % STEPS_PER_OCTAVE] * pow2(codes // STEPS_PER_OCTAVE, dtype)


def inverse_step_values(codes: Tensor, dtype: torch.dtype, shift: int = 0) -> Tensor:
    """``R[k mod 8]·2^(-(k div 8) - shift)``: the encoder's factor for the steps of ``codes``
    (``1/2^(k/8)`` to float32 precision), times ``2^-shift``; exactly the same floats on every device."""
    codes = codes.to(torch.int64)
    fractions = _table("inverse", codes.device, dtype)
    return fractions[codes % STEPS_PER_OCTAVE] * pow2(-(codes // STEPS_PER_OCTAVE) - shift, dtype)


_LOW_MANTISSA = (1 << 13) - 1  # float32 mantissa bits below float16's 10


def exact_step_code(mean_square: Tensor, bits: float) -> Tensor:
    """The step ``sqrt(2πe·mean_square)·2^(-bits)``, clamped to [2^-100, 2^100] and rounded to an
    11-bit mantissa, as the int32 bit pattern of its float32."""
    step = (torch.sqrt(_TWO_PI_E * mean_square) * 2.0 ** (-bits)).to(torch.float32)
    pattern = step.clamp(2.0**-100, 2.0**100).view(torch.int32)
    return (pattern + (1 << 12)) & ~_LOW_MANTISSA


def exact_step_out_of_range(mean_square: Tensor, bits: float) -> Tensor:
    """bool, same shape: where a nonzero mean square needs a one-per-tensor step outside
    ``[2^-100, 2^100]`` (:func:`exact_step_code` would clamp it), or is infinite."""
    ms = mean_square.to(torch.float64)
    step = torch.sqrt(_TWO_PI_E * ms) * 2.0 ** (-bits)
    return (ms > 0) & ((step < 2.0**-100) | (step > 2.0**100) | torch.isinf(ms))


def exact_step_value(codes: Tensor, dtype: torch.dtype) -> Tensor:
    """Inverse of :func:`exact_step_code`: the float32 steps, in ``dtype``."""
    return codes.to(torch.int32).view(torch.float32).to(dtype)


def valid_exact_code(codes: np.ndarray) -> bool:
    """Whether int32 bit patterns are float32 steps in [2^-100, 2^100] (what a decoder accepts)."""
    codes = np.asarray(codes, dtype=np.int32)
    steps = codes.view(np.float32)
    return bool(np.all((steps >= 2.0**-100) & (steps <= 2.0**100.01) & (codes & _LOW_MANTISSA == 0)))


def _groups(n: int) -> tuple[np.ndarray, np.ndarray]:
    """Start index and size of each group of ``GROUP`` codes (the last may be shorter)."""
    starts = np.arange(0, n, GROUP)
    return starts, np.minimum(GROUP, n - starts)


def _widths(span: np.ndarray) -> np.ndarray:
    """Bits needed for offsets in [0, span]: the bit length of ``span``."""
    return np.frexp(span.astype(np.float64))[1].astype(np.int64)


def packed_codes_size(codes: np.ndarray) -> int:
    """Bytes :func:`pack_codes` writes for ``codes``, without packing them."""
    codes = np.asarray(codes, dtype=np.int64).reshape(-1)
    if codes.size == 0:
        return 0
    starts, sizes = _groups(codes.size)
    span = np.maximum.reduceat(codes, starts) - np.minimum.reduceat(codes, starts)
    return 3 * starts.size + -(-int((_widths(span) * sizes).sum()) // 8)


def pack_codes(codes: np.ndarray) -> bytes:
    """Serialise integer step codes (any shape, flattened in C order); see the module docstring."""
    codes = np.asarray(codes, dtype=np.int64).reshape(-1)
    if codes.size == 0:
        return b""
    if codes.min() < CODE_MIN or codes.max() > CODE_MAX:
        raise InputError(f"step codes must lie in [{CODE_MIN}, {CODE_MAX}]")
    starts, sizes = _groups(codes.size)
    base = np.minimum.reduceat(codes, starts)
    width = _widths(np.maximum.reduceat(codes, starts) - base)
    offsets = codes - np.repeat(base, sizes)
    per_code = np.repeat(width, sizes)
    owner = np.repeat(np.arange(codes.size), per_code)
    bit_index = np.arange(owner.size) - np.repeat(np.cumsum(per_code) - per_code, per_code)
    bits = ((offsets[owner] >> bit_index) & 1).astype(np.uint8)
    return b"".join(
        [base.astype("<i2").tobytes(), width.astype(np.uint8).tobytes(), np.packbits(bits, bitorder="little").tobytes()]
    )


def unpack_codes(data: bytes, offset: int, n_codes: int) -> tuple[np.ndarray, int]:
    """Read ``n_codes`` codes written by :func:`pack_codes` at ``offset``; return (int32 codes, end offset).

    Raises :class:`lqlib.FormatError` on truncation, impossible widths or codes out of range.
    """
    if n_codes == 0:
        return np.zeros(0, dtype=np.int32), offset
    n_groups = -(-n_codes // GROUP)
    if offset + 3 * n_groups > len(data):
        raise FormatError(
            f"lqlib bitstream is truncated: {n_groups} step-code groups need {3 * n_groups} bytes at offset {offset}"
        )
    starts, sizes = _groups(n_codes)
    base = np.frombuffer(data, dtype="<i2", count=n_groups, offset=offset).astype(np.int64)
    width = np.frombuffer(data, dtype=np.uint8, count=n_groups, offset=offset + 2 * n_groups).astype(np.int64)
    if (width > _MAX_WIDTH).any():
        raise FormatError(f"lqlib bitstream declares step-code offsets wider than {_MAX_WIDTH} bits")
    per_code = np.repeat(width, sizes)
    n_bytes = -(-int(per_code.sum()) // 8)
    start = offset + 3 * n_groups
    if start + n_bytes > len(data):
        raise FormatError(f"lqlib bitstream is truncated: step-code offsets need {n_bytes} bytes at offset {start}")
    bits = np.unpackbits(np.frombuffer(data, dtype=np.uint8, count=n_bytes, offset=start), bitorder="little")
    owner = np.repeat(np.arange(n_codes), per_code)
    bit_index = np.arange(owner.size) - np.repeat(np.cumsum(per_code) - per_code, per_code)
    offsets = np.zeros(n_codes, dtype=np.int64)
    np.add.at(offsets, owner, bits[: owner.size].astype(np.int64) << bit_index)
    codes = np.repeat(base, sizes) + offsets
    if codes.min() < CODE_MIN or codes.max() > CODE_MAX:
        raise FormatError(f"lqlib bitstream holds step codes outside [{CODE_MIN}, {CODE_MAX}]")
    return codes.astype(np.int32), start + n_bytes
