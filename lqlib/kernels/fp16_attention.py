"""Split-K decode attention on a float16 KV cache: the fair baseline of the coded caches' kernels.

:func:`decode_attention` is :func:`lqlib.kernels.attention.decode_attention`'s design (one program per
KV head and range of tokens serving the head's G query heads, the keys and values read once, the
splits merged by :func:`lqlib.kernels._attention_triton.combine_splits_kernel`) on an uncoded cache,
with the valid lengths read from a device tensor, so a decode step with a static cache can be
recorded in one CUDA graph and still read only the tokens written, not the whole capacity
(PyTorch's SDPA with a mask cannot split a long sequence across programs and reads it all).
:func:`reference_decode_attention` computes the same with torch operations (the tests' ground truth).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..errors import InputError
from . import check_kernel_device
from .attention import AttentionConfig, combine_splits, split_plan, triton_next_pow2

__all__ = ["decode_attention", "reference_decode_attention", "FP16_CONFIG"]

FP16_CONFIG = AttentionConfig(block_n=64, num_warps=4, num_stages=2)
"""Default launch (tokens per tile, warps, stages)."""


def _validate(q: Tensor, k: Tensor, v: Tensor, length) -> tuple[int, int, int, int, int]:
    if not isinstance(q, Tensor) or q.dim() != 3 or q.dtype != torch.float16:
        raise InputError("q must be a (batch, q_heads, head_dim) float16 tensor")
    b, hq, d = q.shape
    if not isinstance(k, Tensor) or not isinstance(v, Tensor) or k.shape != v.shape or k.dim() != 4:
        raise InputError("k and v must be (batch, kv_heads, capacity, head_dim) tensors of one shape")
    if k.shape[0] != b or k.shape[-1] != d or k.dtype != q.dtype or v.dtype != q.dtype:
        raise InputError(f"k and v must be ({b}, kv_heads, capacity, {d}) in q's dtype {q.dtype}")
    if k.stride(-1) != 1 or v.stride(-1) != 1:
        raise InputError("k and v must be contiguous in their last dim")
    if d < 16 or d & (d - 1):
        raise InputError(f"head_dim must be a power of two >= 16, got {d}")
    _, hkv, cap, _ = k.shape
    if hkv == 0 or hq % hkv:
        raise InputError(f"q_heads ({hq}) must be a multiple of kv_heads ({hkv})")
    if isinstance(length, Tensor):
        if tuple(length.shape) != (b,) or length.dtype not in (torch.int32, torch.int64):
            raise InputError(f"a length tensor must be ({b},) int32/int64, got {tuple(length.shape)} {length.dtype}")
    elif isinstance(length, int) and not isinstance(length, bool):
        if not 1 <= length <= cap:
            raise InputError(f"length must be in [1, capacity={cap}], got {length}")
    else:
        raise InputError(f"length must be an int or a (batch,) tensor, got {type(length).__name__}")
    if len({t.device for t in (q, k, v) + ((length,) if isinstance(length, Tensor) else ())}) != 1:
        raise InputError("q, k, v (and a length tensor) must be on one device")
    return b, hq, hkv, cap, d


def reference_decode_attention(
    q: Tensor, k: Tensor, v: Tensor, length: int | Tensor, *, sm_scale: float | None = None
) -> Tensor:
    """What :func:`decode_attention` computes, in float32 torch operations: (B, Hq, d) in q.dtype."""
    b, hq, hkv, cap, d = _validate(q, k, v, length)
    g = hq // hkv
    scale = 1.0 / math.sqrt(d) if sm_scale is None else float(sm_scale)
    scores = torch.einsum("bhgd,bhnd->bhgn", q.float().reshape(b, hkv, g, d), k.float()) * scale
    lengths = (torch.full((b,), length, device=q.device) if isinstance(length, int) else length).to(q.device)
    valid = torch.arange(cap, device=q.device)[None, :] < lengths[:, None]
    scores = scores.masked_fill(~valid[:, None, None, :], float("-inf"))
    out = torch.einsum("bhgn,bhnd->bhgd", torch.softmax(scores, dim=-1), v.float())
    return out.reshape(b, hq, d).to(q.dtype)


def decode_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    length: int | Tensor,
    *,
    sm_scale: float | None = None,
    config: AttentionConfig | None = None,
) -> Tensor:
    """Decode attention of one query token per row over the first ``length`` tokens of a float cache.

    Parameters
    ----------
    q : (B, Hq, d) float16.
    k, v : (B, Hkv, capacity, d) float16, contiguous in the last dim.
    length : int in [1, capacity], or a (B,) int32/int64 tensor on q's device (each in [1, capacity],
        not checked: no host synchronisation). With a tensor the splits cover the whole capacity and
        programs past a row's length return at once.
    sm_scale : softmax scale (default 1/sqrt(d)).
    config : launch parameters (default :data:`FP16_CONFIG`).

    Returns (B, Hq, d) in q.dtype.
    """
    b, hq, hkv, cap, d = _validate(q, k, v, length)
    from . import _fp16_attention_triton

    cfg = config or FP16_CONFIG
    dev = q.device
    tokens = length if isinstance(length, int) else cap
    splits, per_split = split_plan(cfg, b * hkv, tokens, dev)
    q = q.contiguous()
    part_acc = torch.empty((b * hq, splits, d), dtype=torch.float32, device=dev)
    part_ml = torch.empty((b * hq, 2, splits), dtype=torch.float32, device=dev)
    out = torch.empty_like(q)
    scale = 1.0 / math.sqrt(d) if sm_scale is None else float(sm_scale)
    kernel = _fp16_attention_triton.fp16_decode_attention_kernel
    check_kernel_device(q, kernel)
    kernel[(b * hkv, splits)](
        q,
        k,
        v,
        part_acc,
        part_ml,
        length if isinstance(length, Tensor) else part_ml,
        tokens,
        per_split,
        scale * math.log2(math.e),
        q.stride(0),
        q.stride(1),
        k.stride(0),
        k.stride(1),
        k.stride(2),
        v.stride(0),
        v.stride(1),
        v.stride(2),
        HKV=hkv,
        G=hq // hkv,
        BLOCK_G=max(16, triton_next_pow2(hq // hkv)),
        D=d,
        BLOCK_N=cfg.block_n,
        HAS_LENGTHS=isinstance(length, Tensor),
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )
    return combine_splits(part_acc, part_ml, out)
