"""GPU kernels of the E8 codec (layer 2: imports only the math core).

Quantize ``x`` (..., d) of float16/bfloat16/float32 to the codec's lattice points and step
codes, and dequantize them, with Triton kernels whose results are bit for bit those of
:class:`lqlib.E8Codec` (per-vector steps, ``rotation`` "rht" or "none") on any device:

* ``codes`` (..., d), int8 or int16: ``2·p`` with ``p`` the E8 points in lattice units
  (``codec._analyse``'s points; :func:`codes_to_symbols` gives the entropy coder's symbols);
* ``step_codes`` (...,), int16: the codes ``k`` of the steps (``Encoded.step_codes``);
* ``dequantize(codec, codes, step_codes, dtype)`` equals ``codec.quantize(x)`` (saturated to the
  dtype's finite range like the codec's reconstruction: never ±Inf).

Unlike the codec, :func:`quantize` checks nothing it would need a host synchronisation for: NaN/Inf
and values outside the codec's supported range (:func:`lqlib.coding.codec.supported_rms`) are not
refused; their step codes saturate at ±800 as in the codec's unchecked analysis
(:func:`reference_quantize`).

Triton is optional (``pip install lqlib[gpu]``): this module imports without it, and the
kernels' module is imported on first use. The kernels run on CUDA tensors, or on CPU tensors
when ``TRITON_INTERPRET=1`` was set before the first use (Triton's interpreter, for tests).
:func:`reference_quantize` / :func:`reference_dequantize` compute the same with torch
operations through the codec, on any device and without Triton.
"""

from __future__ import annotations

import math
from functools import cache

import numpy as np
import torch
from torch import Tensor

from ..coding.codec import E8Codec, saturate
from ..core.steps import FRACTIONS, INVERSE_FRACTIONS, code_constants
from ..core.symbols import points_to_symbols
from ..errors import InputError

__all__ = [
    "triton_available",
    "quantize",
    "dequantize",
    "reference_quantize",
    "reference_dequantize",
    "code_dtype",
    "codes_to_symbols",
    "KERNEL_DTYPES",
]

KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
STEP_DTYPE = torch.int16


def triton_available() -> bool:
    """Whether Triton can be imported (the kernels need it; the references do not)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _kernels():
    try:
        from ..kernels import _e8_triton
    except ImportError as err:
        raise ImportError("lqlib.kernels needs Triton: pip install 'lqlib[gpu]' (or pip install triton)") from err
    return _e8_triton


def check_kernel_device(x: Tensor, kernel) -> None:
    """A clear error where ``kernel`` (a Triton function) cannot take ``x``: compiled kernels take
    CUDA tensors only; the interpreter (``TRITON_INTERPRET=1`` before the first use) takes CPU ones."""
    if x.device.type != "cuda" and type(kernel).__name__ != "InterpretedFunction":
        raise InputError(
            f"the Triton kernels take CUDA tensors, got a {x.device.type} tensor (on CPU, set "
            "TRITON_INTERPRET=1 before lqlib.kernels is first used, or use the codec itself)"
        )


def _check_codec(codec: E8Codec, dim: int) -> None:
    if not isinstance(codec, E8Codec):
        raise InputError(f"expected an E8Codec, got {type(codec).__name__}")
    if codec.scale != "vector":
        raise InputError("the kernels implement per-vector steps only (scale='vector')")
    if dim < 8 or dim & (dim - 1):
        raise InputError(f"the kernels need a power-of-two last dim of at least 8, got {dim}")


def code_dtype(codec: E8Codec, dim: int) -> torch.dtype:
    """int8 when every ``2·p`` fits, else int16.

    A vector's step is at least ``sqrt(2πe·ms)·2^(-b - 1/16)`` (the grid rounds log2 of the
    step to 1/8 of an octave), so ``|p_i| <= sqrt(d/(2πe))·2^(b + 1/16) + 1``. That holds unless
    the step was clamped at 2^100, i.e. for vectors whose RMS is above about 2^96 (bfloat16 or
    float32 only).
    """
    bound = 2.0 * (math.sqrt(dim / (2.0 * math.pi * math.e)) * 2.0 ** (codec.bits + 1 / 16) * (1 + 2.0**-9) + 1.0)
    if bound <= 127:
        return torch.int8
    if bound <= 32767:
        return torch.int16
    raise InputError(f"codes of {codec.bits} bits/dim at d={dim} do not fit int16")


@cache
def _constants(bits: float, dim: int) -> tuple[int, tuple[int, int, int, int]]:
    """n0 and the thresholds' float64 bit patterns (the kernel compares mantissas as integers)."""
    n0, taus = code_constants(bits, dim)
    return n0, tuple(int(np.array(t, dtype=np.float64).view(np.int64)) for t in taus)


_TABLES: dict[torch.device, Tensor] = {}


def _tables(device: torch.device) -> Tensor:
    """float32 [T[0..7], R[0..7]] on ``device``: the grid fractions and their reciprocals."""
    if device not in _TABLES:
        _TABLES[device] = torch.from_numpy(np.concatenate([FRACTIONS, INVERSE_FRACTIONS])).to(device)
    return _TABLES[device]


def _launch_config(
    kernel: str, device: torch.device, block_v: int | None, num_warps: int | None, chunk_major: bool | None
) -> tuple[int, int, bool]:
    """Vectors per program, warps and load order: the fastest measured (results/gpu_codec_*.json).

    Quantize: 32 vectors on one warp, one vector per thread, so that the transform's butterflies
    and the E8 blocks stay in registers (fastest on an H200 with Triton 3.6, 2026-11-28, with
    ``split=1``: 0.998 ms, 64 on two warps 1.054 ms; on an H100 the previous kernel ran 6% faster
    on two warps than on one); the tile is addressed vector-major (``chunk_major=False``), which
    Triton 3.6 and 3.9 both lay out that way (chunk-major, Triton 3.6 spreads a vector over threads
    and the kernel runs 50 times slower). Dequantize: 16 vectors over 4 warps, chunk-major.
    """
    if device.type == "cpu":  # the interpreter: few, large programs
        return block_v or 64, num_warps or 1, bool(chunk_major)
    if kernel == "quantize":
        num_warps = num_warps or 1
        return block_v or 32 * num_warps, num_warps, False if chunk_major is None else chunk_major
    return block_v or 16, num_warps or 4, True if chunk_major is None else chunk_major


def _check_input(codec: E8Codec, x: Tensor) -> None:
    if not isinstance(x, Tensor):
        raise InputError(f"expected a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in KERNEL_DTYPES:
        raise InputError(f"dtype {x.dtype} is not supported by the kernels; use one of {KERNEL_DTYPES}")
    if x.dim() == 0:
        raise InputError("expected a tensor of shape (..., d), got a scalar")
    _check_codec(codec, x.shape[-1])


def quantize(
    codec: E8Codec,
    x: Tensor,
    *,
    codes_dtype: torch.dtype | None = None,
    block_v: int | None = None,
    num_warps: int | None = None,
    chunk_major: bool | None = None,
    split: int = 1,
    maxnreg: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Kernel: ``x`` (..., d) → (codes ``2·p`` (..., d) int8/int16, step codes (...) int16).

    The input must be finite (not checked: no host synchronisation); the codec raises on NaN/Inf.
    ``block_v`` (vectors per program), ``num_warps``, ``chunk_major`` (load order), ``split``
    (the E8 stage runs on 2^split parts of a tile in turn) and ``maxnreg`` (a cap on registers per
    thread: more warps per multiprocessor, more spills) change the speed, never the result.
    """
    _check_input(codec, x)
    kernels = _kernels()
    d = x.shape[-1]
    x2 = x.detach().contiguous().reshape(-1, d)
    n = x2.shape[0]
    codes = torch.empty(x2.shape, dtype=codes_dtype or code_dtype(codec, d), device=x.device)
    steps = torch.empty(n, dtype=STEP_DTYPE, device=x.device)
    if n:
        check_kernel_device(x2, kernels.e8_quantize_kernel)
        bv, warps, cm = _launch_config("quantize", x.device, block_v, num_warps, chunk_major)
        n0, t = _constants(codec.bits, d)
        rht = codec.rotation == "rht"
        signs = codec._signs(d, x.device, torch.float32)
        kernels.e8_quantize_kernel[(triton_cdiv(n, bv),)](
            x2,
            codes,
            steps,
            signs,
            _tables(x.device),
            n,
            n0,
            *t,
            D=d,
            LOG2C=(d // 8).bit_length() - 1,
            SHIFT=codec._log2_dim(d),
            RHT=rht,
            BLOCK_V=bv,
            CHUNK_MAJOR=cm,
            SPLIT=min(split, (d // 8).bit_length() - 1),
            num_warps=warps,
            enable_fp_fusion=False,
            **({} if maxnreg is None else {"maxnreg": maxnreg}),
        )
    return codes.reshape(x.shape), steps.reshape(x.shape[:-1])


def dequantize(
    codec: E8Codec,
    codes: Tensor,
    step_codes: Tensor,
    dtype: torch.dtype = torch.float16,
    *,
    block_v: int | None = None,
    num_warps: int | None = None,
    chunk_major: bool | None = None,
) -> Tensor:
    """Kernel: codes ``2·p`` (..., d) and step codes (...) → values (..., d) in ``dtype``."""
    if dtype not in KERNEL_DTYPES:
        raise InputError(f"dtype {dtype} is not supported by the kernels; use one of {KERNEL_DTYPES}")
    d = codes.shape[-1]
    _check_codec(codec, d)
    if tuple(step_codes.shape) != tuple(codes.shape[:-1]):
        raise InputError(f"step codes of shape {tuple(step_codes.shape)} do not match codes {tuple(codes.shape)}")
    kernels = _kernels()
    c2 = codes.contiguous().reshape(-1, d)
    n = c2.shape[0]
    out = torch.empty(c2.shape, dtype=dtype, device=codes.device)
    if n:
        check_kernel_device(codes, kernels.e8_dequantize_kernel)
        bv, warps, cm = _launch_config("dequantize", codes.device, block_v, num_warps, chunk_major)
        kernels.e8_dequantize_kernel[(triton_cdiv(n, bv),)](
            c2,
            step_codes.contiguous().reshape(-1),
            out,
            codec._signs(d, codes.device, torch.float32),
            _tables(codes.device),
            n,
            D=d,
            LOG2C=(d // 8).bit_length() - 1,
            SHIFT=codec._log2_dim(d),
            RHT=codec.rotation == "rht",
            BLOCK_V=bv,
            CHUNK_MAJOR=cm,
            num_warps=warps,
            enable_fp_fusion=False,
        )
    return out.reshape(codes.shape)


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


def reference_quantize(codec: E8Codec, x: Tensor, codes_dtype: torch.dtype | None = None) -> tuple[Tensor, Tensor]:
    """What :func:`quantize` returns, computed by the codec with torch operations (any device, no Triton)."""
    _check_input(codec, x)
    points, steps = codec._analyse(codec._validate(x))
    codes = (points * 2.0).to(codes_dtype or code_dtype(codec, x.shape[-1]))
    return codes, steps.reshape(x.shape[:-1]).to(STEP_DTYPE)


def reference_dequantize(
    codec: E8Codec, codes: Tensor, step_codes: Tensor, dtype: torch.dtype = torch.float16
) -> Tensor:
    """What :func:`dequantize` returns, computed by the codec with torch operations."""
    _check_codec(codec, codes.shape[-1])
    points = codes.to(torch.float32) * 0.5
    return saturate(codec._synthesise(points, step_codes.to(torch.int32)[..., None]), dtype)


def codes_to_symbols(codes: Tensor) -> Tensor:
    """The entropy coder's parity-aware symbols (..., d/8, 9) of codes ``2·p`` (see :mod:`lqlib.symbols`)."""
    return points_to_symbols((codes.to(torch.float32) * 0.5).reshape(*codes.shape[:-1], -1, 8))
