"""Triton kernels of decode attention on the E8-coded cache (see :mod:`lqlib.kernels.attention`).

``decode_attention_kernel``: grid (B·Hkv, splits). A program takes one KV head of one batch row
and one contiguous range of tokens; it serves the G = Hq/Hkv query heads of the group at once
(a (BLOCK_G, d) matrix, rows >= G zero). Prologue: the queries times the key scales and the
signs, rotated by ``H`` (a tl.dot with the ±1 matrix), times ``sm_scale·log2(e)/2``. Loop over
tiles of BLOCK_N tokens: the int8 codes of keys and values are loaded once, converted to
float16 (exact) and fed to tl.dot; per token, the step factor ``T[g mod 8]·2^(g div 8)``
(``g = k − 4·shift``, the dequantize kernel's) multiplies the scores (keys) or the softmax
weights (values); online softmax in base 2. Epilogue: the value sum is rotated back by ``H``
and multiplied by the value signs, and the program writes its partial (acc, m, l).

Float16 operands keep their range by normalisation: the rotated query by its row maximum, the
weights ``p·f`` of a tile by their row maximum (so the largest term of each tile is exact to
float16 precision, as in FlashAttention), the value sum (split into float16 high and low parts,
about 22 bits) by its row maximum; the factors are multiplied back in float32.

``combine_splits_kernel``: grid (B·Hq, d / BLOCK_D); the splits' partials merged by their
maxima, divided by the softmax sum, times 1/2 (codes are 2·p), in the output's dtype.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _pow2(n):
    """2^n for int32 n in the normal float32 range, from its bit pattern."""
    return ((n + 127) << 23).to(tl.float32, bitcast=True)


@triton.jit
def _step_factors(steps, tables_ptr, SHIFT: tl.constexpr):
    """step_values(k − 4·SHIFT) of int32 step codes k: T[g mod 8]·2^(g div 8)."""
    g = steps - 4 * SHIFT
    return tl.load(tables_ptr + (g & 7)) * _pow2(g >> 3)


@triton.jit
def _row_max_abs(x):
    """max |x| along axis 1, 1 where that is 0 (a safe divisor)."""
    a = tl.max(tl.abs(x), axis=1)
    return tl.where(a > 0, a, 1.0)


@triton.jit
def decode_attention_kernel(
        q_ptr, kc_ptr, ks_ptr, vc_ptr, vs_ptr, scales_ptr, k_signs_ptr, v_signs_ptr, had_ptr, tables_ptr,
        acc_ptr, ml_ptr, lengths_ptr, length, per_split, qk_scale,
        stride_qb, stride_qh,
        stride_kcb, stride_kch, stride_kcn, stride_ksb, stride_ksh,
        stride_vcb, stride_vch, stride_vcn, stride_vsb, stride_vsh,
        HKV: tl.constexpr, G: tl.constexpr, BLOCK_G: tl.constexpr, D: tl.constexpr, BLOCK_N: tl.constexpr,
        K_SHIFT: tl.constexpr, V_SHIFT: tl.constexpr, K_RHT: tl.constexpr, V_RHT: tl.constexpr,
        HAS_SCALES: tl.constexpr, HAS_LENGTHS: tl.constexpr):
    """Partial attention of one (batch row, KV head) over one range of tokens.

    acc_ptr: (B·Hq, splits, D) float32, the value sums in the original domain (times 2);
    ml_ptr: (B·Hq, 2, splits) float32, the running maxima (base 2) and softmax sums."""
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
    q = tl.load(q_ptr + b * stride_qb + (h * G + rows)[:, None] * stride_qh + dims[None, :],
                mask=row_ok[:, None], other=0.0).to(tl.float32)
    if HAS_SCALES:
        q = q * tl.load(scales_ptr + h * D + dims)[None, :]
    if K_RHT:
        q = q * tl.load(k_signs_ptr + dims)[None, :]
        a = _row_max_abs(q)
        had = tl.load(had_ptr + dims[:, None] * D + dims[None, :])
        q = tl.dot((q / a[:, None]).to(tl.float16), had) * a[:, None]
    q_max = _row_max_abs(q)
    qn = (q / q_max[:, None]).to(tl.float16)
    q_factor = q_max * qk_scale  # scores = (qn · codes) · q_factor · f(k)

    m = tl.full((BLOCK_G,), float("-inf"), tl.float32)
    l = tl.zeros((BLOCK_G,), tl.float32)
    acc = tl.zeros((BLOCK_G, D), tl.float32)
    kc_base = kc_ptr + b.to(tl.int64) * stride_kcb + h.to(tl.int64) * stride_kch
    vc_base = vc_ptr + b.to(tl.int64) * stride_vcb + h.to(tl.int64) * stride_vch
    ks_base = ks_ptr + b.to(tl.int64) * stride_ksb + h.to(tl.int64) * stride_ksh
    vs_base = vs_ptr + b.to(tl.int64) * stride_vsb + h.to(tl.int64) * stride_vsh
    offs_n = tl.arange(0, BLOCK_N)
    for s0 in range(start, end, BLOCK_N):
        tok = s0 + offs_n
        valid = tok < end
        kc = tl.load(kc_base + tok[:, None].to(tl.int64) * stride_kcn + dims[None, :], mask=valid[:, None], other=0)
        k_steps = tl.load(ks_base + tok, mask=valid, other=0).to(tl.int32)
        vc = tl.load(vc_base + tok[:, None].to(tl.int64) * stride_vcn + dims[None, :], mask=valid[:, None], other=0)
        v_steps = tl.load(vs_base + tok, mask=valid, other=0).to(tl.int32)
        fk = _step_factors(k_steps, tables_ptr, K_SHIFT)
        fv = tl.where(valid, _step_factors(v_steps, tables_ptr, V_SHIFT), 0.0)

        s = tl.dot(qn, tl.trans(kc.to(tl.float16)))  # (BLOCK_G, BLOCK_N)
        s = s * q_factor[:, None] * fk[None, :]
        s = tl.where(valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))
        alpha = tl.exp2(m - m_new)
        p = tl.exp2(s - m_new[:, None])
        l = l * alpha + tl.sum(p, axis=1)
        pf = p * fv[None, :]
        r = tl.max(pf, axis=1)
        r = tl.where(r > 0, r, 1.0)
        pn = (pf * (1.0 / r)[:, None]).to(tl.float16)
        acc = acc * alpha[:, None] + tl.dot(pn, vc.to(tl.float16)) * r[:, None]
        m = m_new

    if V_RHT:
        a = _row_max_abs(acc)
        an = acc / a[:, None]
        hi = an.to(tl.float16)
        lo = (an - hi.to(tl.float32)).to(tl.float16)
        had = tl.load(had_ptr + dims[:, None] * D + dims[None, :])
        acc = (tl.dot(hi, had) + tl.dot(lo, had)) * a[:, None] * tl.load(v_signs_ptr + dims)[None, :]
    out_rows = (pid * G + rows).to(tl.int64)
    tl.store(acc_ptr + (out_rows[:, None] * n_splits + split) * D + dims[None, :], acc, mask=row_ok[:, None])
    tl.store(ml_ptr + (out_rows * 2) * n_splits + split, m, mask=row_ok)
    tl.store(ml_ptr + (out_rows * 2 + 1) * n_splits + split, l, mask=row_ok)


@triton.jit
def combine_splits_kernel(acc_ptr, ml_ptr, out_ptr, n_splits,
                          D: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr):
    """out[row, cols] = Σ_s 2^(m_s − M)·acc_s / Σ_s 2^(m_s − M)·l_s / 2, in out_ptr's dtype."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    sp = tl.arange(0, BLOCK_S)
    ok = sp < n_splits
    m = tl.load(ml_ptr + row * 2 * n_splits + sp, mask=ok, other=float("-inf"))
    l = tl.load(ml_ptr + (row * 2 + 1) * n_splits + sp, mask=ok, other=0.0)
    big = tl.max(m, axis=0)
    w = tl.where(ok & (m > float("-inf")), tl.exp2(m - big), 0.0)
    total = tl.sum(w * l, axis=0)
    acc = tl.load(acc_ptr + (row * n_splits + sp[:, None]) * D + cols[None, :], mask=ok[:, None], other=0.0)
    y = tl.sum(acc * w[:, None], axis=0) * (0.5 / total)
    tl.store(out_ptr + row * D + cols, y.to(out_ptr.dtype.element_ty))
