"""Triton kernel of split-K decode attention on a float16 cache (see :mod:`lqlib.kernels.fp16_attention`).

``fp16_decode_attention_kernel``: grid (B·Hkv, splits), as :mod:`lqlib.kernels._attention_triton`'s
kernel for the coded caches: a program serves the G query heads of one KV head over one range of
tokens (a (BLOCK_G, d) matrix, rows >= G zero), loads each tile of keys and values once, and writes
its partial (acc, m, l) in base 2 for :func:`lqlib.kernels._attention_triton.combine_splits_kernel`,
which halves: the value sums are stored doubled.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def fp16_decode_attention_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    acc_ptr,
    ml_ptr,
    lengths_ptr,
    length,
    per_split,
    qk_scale,
    stride_qb,
    stride_qh,
    stride_kb,
    stride_kh,
    stride_kn,
    stride_vb,
    stride_vh,
    stride_vn,
    HKV: tl.constexpr,
    G: tl.constexpr,
    BLOCK_G: tl.constexpr,
    D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HAS_LENGTHS: tl.constexpr,
):
    """q (B, Hq, D) float16; k, v (B, Hkv, capacity, D) float16; acc_ptr (B·Hq, splits, D) float32 (doubled
    value sums), ml_ptr (B·Hq, 2, splits) float32 (maxima in base 2, softmax sums)."""
    pid = tl.program_id(0)
    split = tl.program_id(1)
    n_splits = tl.num_programs(1)
    b = pid // HKV
    h = pid % HKV
    if HAS_LENGTHS:
        n = tl.load(lengths_ptr + b).to(tl.int32)
    else:
        n = length
    start = split * per_split
    end = tl.minimum(start + per_split, n)
    rows = tl.arange(0, BLOCK_G)
    row_ok = rows < G
    dims = tl.arange(0, D)
    q = tl.load(
        q_ptr + b * stride_qb + (h * G + rows)[:, None] * stride_qh + dims[None, :], mask=row_ok[:, None], other=0.0
    )
    k_base = k_ptr + b.to(tl.int64) * stride_kb + h.to(tl.int64) * stride_kh
    v_base = v_ptr + b.to(tl.int64) * stride_vb + h.to(tl.int64) * stride_vh
    m = tl.full((BLOCK_G,), float("-inf"), tl.float32)
    l = tl.zeros((BLOCK_G,), tl.float32)
    acc = tl.zeros((BLOCK_G, D), tl.float32)
    for s0 in range(start, end, BLOCK_N):
        tok = s0 + tl.arange(0, BLOCK_N)
        valid = tok < end
        k = tl.load(k_base + tok[:, None].to(tl.int64) * stride_kn + dims[None, :], mask=valid[:, None], other=0.0)
        v = tl.load(v_base + tok[:, None].to(tl.int64) * stride_vn + dims[None, :], mask=valid[:, None], other=0.0)
        s = tl.dot(q, tl.trans(k)) * qk_scale
        s = tl.where(valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))
        alpha = tl.exp2(m - m_new)
        p = tl.exp2(s - m_new[:, None])
        l = l * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m = m_new
    out_rows = (pid * G + rows).to(tl.int64)
    tl.store(acc_ptr + (out_rows[:, None] * n_splits + split) * D + dims[None, :], 2.0 * acc, mask=row_ok[:, None])
    tl.store(ml_ptr + (out_rows * 2) * n_splits + split, m, mask=row_ok)
    tl.store(ml_ptr + (out_rows * 2 + 1) * n_splits + split, l, mask=row_ok)
