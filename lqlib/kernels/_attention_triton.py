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

from ._e8_triton import _fwht


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
def _split_codes(x, FAST_CVT: tl.constexpr, BIASED: tl.constexpr):
    """int16 pairs of int8 codes → (even codes, odd codes) as float16, exactly (little-endian:
    the low byte is the even one), plus ``BIAS`` if BIASED and FAST_CVT. On the GPU with byte
    permutes: the float16 with bits 0x6400 | (c + 128) is 1024 + c + 128 = c + BIAS, exactly;
    four codes in three instructions, five unbiased (I2F converts one value per instruction at an
    eighth of the FP32 rate)."""
    if FAST_CVT:
        if BIASED:
            return tl.inline_asm_elementwise(
                asm="""{
                .reg .b32 t, hi;
                xor.b32 t, $2, 0x80808080;
                mov.b32 hi, 0x64646464;
                prmt.b32 $0, t, hi, 0x4240;
                prmt.b32 $1, t, hi, 0x4341;
                }""",
                constraints="=r,=r,r",
                args=[x],
                dtype=(tl.float16, tl.float16),
                is_pure=True,
                pack=2,
            )
        else:
            return tl.inline_asm_elementwise(
                asm="""{
                .reg .b32 t, hi, off;
                xor.b32 t, $2, 0x80808080;
                mov.b32 hi, 0x64646464;
                mov.b32 off, 0x64806480;
                prmt.b32 $0, t, hi, 0x4240;
                prmt.b32 $1, t, hi, 0x4341;
                sub.f16x2 $0, $0, off;
                sub.f16x2 $1, $1, off;
                }""",
                constraints="=r,=r,r",
                args=[x],
                dtype=(tl.float16, tl.float16),
                is_pure=True,
                pack=2,
            )
    else:
        return ((x << 8) >> 8).to(tl.float16), (x >> 8).to(tl.float16)


@triton.jit
def _tile(
    q_even,
    q_odd,
    s_init,
    factor,
    m,
    l,
    acc_even,
    acc_odd,
    kc_base,
    vc_base,
    ks_base,
    vs_base,
    tables_ptr,
    s0,
    end,
    stride_kcn,
    stride_vcn,
    BLOCK_N: tl.constexpr,
    HALF: tl.constexpr,
    K_SHIFT: tl.constexpr,
    V_SHIFT: tl.constexpr,
    FAST_CVT: tl.constexpr,
    MASKED: tl.constexpr,
):
    """One tile of BLOCK_N tokens from s0 (masked at ``end`` if MASKED): the online-softmax update."""
    tok = s0 + tl.arange(0, BLOCK_N)
    pairs = tl.arange(0, HALF)
    k_ptrs = kc_base + tok[:, None].to(tl.int64) * stride_kcn + pairs[None, :]
    v_ptrs = vc_base + tok[:, None].to(tl.int64) * stride_vcn + pairs[None, :]
    if MASKED:
        valid = tok < end
        kc = tl.load(k_ptrs, mask=valid[:, None], other=0)
        k_steps = tl.load(ks_base + tok, mask=valid, other=0).to(tl.int32)
        vc = tl.load(v_ptrs, mask=valid[:, None], other=0)
        v_steps = tl.load(vs_base + tok, mask=valid, other=0).to(tl.int32)
    else:
        kc = tl.load(k_ptrs)
        k_steps = tl.load(ks_base + tok).to(tl.int32)
        vc = tl.load(v_ptrs)
        v_steps = tl.load(vs_base + tok).to(tl.int32)
    fk = _step_factors(k_steps, tables_ptr, K_SHIFT) * factor
    fv = _step_factors(v_steps, tables_ptr, V_SHIFT)
    if MASKED:
        fv = tl.where(valid, fv, 0.0)

    k_even, k_odd = _split_codes(kc, FAST_CVT, True)  # (BLOCK_N, HALF) each; s_init removes the bias
    s = tl.dot(q_odd, tl.trans(k_odd), tl.dot(q_even, tl.trans(k_even), s_init))  # (BLOCK_G, BLOCK_N)
    s = s * fk[None, :]
    if MASKED:
        s = tl.where(valid[None, :], s, float("-inf"))
    m_new = tl.maximum(m, tl.max(s, axis=1))
    alpha = tl.exp2(m - m_new)
    p = tl.exp2(s - m_new[:, None])
    l = l * alpha + tl.sum(p, axis=1)
    fv_max = tl.max(fv, axis=0)
    fv_max = tl.where(fv_max > 0, fv_max, 1.0)
    pn = (p * (fv * (1.0 / fv_max))[None, :]).to(tl.float16)  # p·f/max f, at most 1
    v_even, v_odd = _split_codes(vc, FAST_CVT, False)
    acc_even = acc_even * alpha[:, None] + tl.dot(pn, v_even) * fv_max
    acc_odd = acc_odd * alpha[:, None] + tl.dot(pn, v_odd) * fv_max
    return m_new, l, acc_even, acc_odd


@triton.jit
def _row_max_abs(x):
    """max |x| along axis 1, 1 where that is 0 (a safe divisor)."""
    a = tl.max(tl.abs(x), axis=1)
    return tl.where(a > 0, a, 1.0)


@triton.jit
def decode_attention_kernel(
    q_ptr,
    kc_ptr,
    ks_ptr,
    vc_ptr,
    vs_ptr,
    scales_ptr,
    k_signs_ptr,
    v_signs_ptr,
    had_ptr,
    tables_ptr,
    acc_ptr,
    ml_ptr,
    lengths_ptr,
    length,
    per_split,
    qk_scale,
    stride_qb,
    stride_qh,
    stride_kcb,
    stride_kch,
    stride_kcn,
    stride_ksb,
    stride_ksh,
    stride_vcb,
    stride_vch,
    stride_vcn,
    stride_vsb,
    stride_vsh,
    HKV: tl.constexpr,
    G: tl.constexpr,
    BLOCK_G: tl.constexpr,
    D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    K_SHIFT: tl.constexpr,
    V_SHIFT: tl.constexpr,
    K_RHT: tl.constexpr,
    V_RHT: tl.constexpr,
    HAS_SCALES: tl.constexpr,
    HAS_LENGTHS: tl.constexpr,
    FAST_CVT: tl.constexpr,
):
    """Partial attention of one (batch row, KV head) over one range of tokens.

    kc_ptr, vc_ptr: the int8 codes viewed as int16 pairs (B, Hkv, capacity, D/2), strides in pairs;

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

    HALF: tl.constexpr = D // 2
    rows = tl.arange(0, BLOCK_G)
    row_ok = rows < G
    dims = tl.arange(0, D)
    q = tl.load(
        q_ptr + b * stride_qb + (h * G + rows)[:, None] * stride_qh + dims[None, :], mask=row_ok[:, None], other=0.0
    ).to(tl.float32)
    if HAS_SCALES:
        q = q * tl.load(scales_ptr + h * D + dims)[None, :]
    if K_RHT:
        q = q * tl.load(k_signs_ptr + dims)[None, :]
        a = _row_max_abs(q)
        had = tl.load(had_ptr + dims[:, None] * D + dims[None, :])
        q = tl.dot((q / a[:, None]).to(tl.float16), had) * a[:, None]
    q_max = tl.max(_row_max_abs(q), axis=0)  # one scale for the group: it folds into the step factors
    qn = (q / q_max).to(tl.float16)
    q_even, q_odd = tl.split(tl.reshape(qn, (BLOCK_G, HALF, 2)))  # the codes' even and odd dims
    factor = q_max * qk_scale  # scores = (qn · codes) · factor · f(k)
    if FAST_CVT:  # the keys come biased by 1152 (_split_codes): start the dot product at -1152·Σ qn
        s_init = tl.zeros((BLOCK_G, BLOCK_N), tl.float32) - 1152.0 * tl.sum(qn.to(tl.float32), axis=1)[:, None]
    else:
        s_init = tl.zeros((BLOCK_G, BLOCK_N), tl.float32)

    m = tl.full((BLOCK_G,), float("-inf"), tl.float32)
    l = tl.zeros((BLOCK_G,), tl.float32)
    acc_even = tl.zeros((BLOCK_G, HALF), tl.float32)
    acc_odd = tl.zeros((BLOCK_G, HALF), tl.float32)
    kc_base = kc_ptr + b.to(tl.int64) * stride_kcb + h.to(tl.int64) * stride_kch
    vc_base = vc_ptr + b.to(tl.int64) * stride_vcb + h.to(tl.int64) * stride_vch
    ks_base = ks_ptr + b.to(tl.int64) * stride_ksb + h.to(tl.int64) * stride_ksh
    vs_base = vs_ptr + b.to(tl.int64) * stride_vsb + h.to(tl.int64) * stride_vsh
    full_end = start + tl.maximum(end - start, 0) // BLOCK_N * BLOCK_N
    for s0 in range(start, full_end, BLOCK_N):  # whole tiles, no masks
        m, l, acc_even, acc_odd = _tile(
            q_even,
            q_odd,
            s_init,
            factor,
            m,
            l,
            acc_even,
            acc_odd,
            kc_base,
            vc_base,
            ks_base,
            vs_base,
            tables_ptr,
            s0,
            end,
            stride_kcn,
            stride_vcn,
            BLOCK_N,
            HALF,
            K_SHIFT,
            V_SHIFT,
            FAST_CVT,
            False,
        )
    if full_end < end:  # the last, partial tile
        m, l, acc_even, acc_odd = _tile(
            q_even,
            q_odd,
            s_init,
            factor,
            m,
            l,
            acc_even,
            acc_odd,
            kc_base,
            vc_base,
            ks_base,
            vs_base,
            tables_ptr,
            full_end,
            end,
            stride_kcn,
            stride_vcn,
            BLOCK_N,
            HALF,
            K_SHIFT,
            V_SHIFT,
            FAST_CVT,
            True,
        )

    acc = tl.reshape(tl.join(acc_even, acc_odd), (BLOCK_G, D))
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
def _split_weights(ml_ptr, row, n_splits, sp, big):
    """``2^(m_s − M)`` for the splits ``sp`` of a row (0 for splits past ``n_splits`` or that saw no token);
    ``ml_ptr``: (rows, 2, n_splits) maxima (base 2) and softmax sums."""
    ok = sp < n_splits
    m = tl.load(ml_ptr + row * 2 * n_splits + sp, mask=ok, other=float("-inf"))
    return tl.where(ok & (m > float("-inf")), tl.exp2(m - big), 0.0)


@triton.jit
def _split_total(ml_ptr, row, n_splits, BLOCK_S: tl.constexpr):
    """(M, Σ_s 2^(m_s − M)·l_s) of a row: the largest maximum over its splits and the merged softmax sum."""
    sp = tl.arange(0, BLOCK_S)
    ok = sp < n_splits
    m = tl.load(ml_ptr + row * 2 * n_splits + sp, mask=ok, other=float("-inf"))
    l = tl.load(ml_ptr + (row * 2 + 1) * n_splits + sp, mask=ok, other=0.0)
    big = tl.max(m, axis=0)
    return big, tl.sum(tl.where(ok & (m > float("-inf")), tl.exp2(m - big), 0.0) * l, axis=0)


@triton.jit
def combine_splits_kernel(
    acc_ptr, ml_ptr, out_ptr, n_splits, D: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr
):
    """out[row, cols] = Σ_s 2^(m_s − M)·acc_s / Σ_s 2^(m_s − M)·l_s / 2, in out_ptr's dtype."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    sp = tl.arange(0, BLOCK_S)
    big, total = _split_total(ml_ptr, row, n_splits, BLOCK_S)
    w = _split_weights(ml_ptr, row, n_splits, sp, big)
    acc = tl.load(
        acc_ptr + (row * n_splits + sp[:, None]) * D + cols[None, :], mask=(sp < n_splits)[:, None], other=0.0
    )
    y = tl.sum(acc * w[:, None], axis=0) * (0.5 / total)
    tl.store(out_ptr + row * D + cols, y.to(out_ptr.dtype.element_ty))


@triton.jit
def combine_unrotate_kernel(
    acc_ptr,
    ml_ptr,
    signs_ptr,
    out_ptr,
    n_splits,
    D: tl.constexpr,
    LOG2_D: tl.constexpr,
    BLOCK_S: tl.constexpr,
    CHUNK_S: tl.constexpr,
):
    """:func:`combine_splits_kernel` for partials in the rotated domain, one program a row (D >= 8): the
    merged row ``y`` (D,) leaves as ``(y @ H)·signs``, H the unnormalised Sylvester–Hadamard matrix (the
    value rotation undone once a row, not once a split)."""
    row = tl.program_id(0).to(tl.int64)
    big, total = _split_total(ml_ptr, row, n_splits, BLOCK_S)
    cols = tl.arange(0, D)
    y = tl.zeros((D,), tl.float32)
    for s0 in range(0, n_splits, CHUNK_S):
        cs = s0 + tl.arange(0, CHUNK_S)
        wc = _split_weights(ml_ptr, row, n_splits, cs, big)
        acc = tl.load(
            acc_ptr + (row * n_splits + cs[:, None]) * D + cols[None, :], mask=(cs < n_splits)[:, None], other=0.0
        )
        y += tl.sum(acc * wc[:, None], axis=0)
    y = tl.reshape(_fwht(tl.reshape(y, (D // 8, 1, 8)), LOG2_D - 3), (D,))
    y = y * tl.load(signs_ptr + cols) * (0.5 / total)
    tl.store(out_ptr + row * D + cols, y.to(out_ptr.dtype.element_ty))
