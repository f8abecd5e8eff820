"""Triton kernels of the nested E8 format (:mod:`lqlib.coding.nested`): quantize, dequantize, decode attention.

Imported only through :mod:`lqlib.kernels.nested`. The quantize and dequantize kernels repeat
:meth:`lqlib.coding.nested.NestedE8Codec.analyse` / ``synthesise`` operation for operation (the
RHT's butterflies, the E8 rounding and the step code are those of :mod:`lqlib.kernels._e8_triton`),
compiled without fused multiply-add, so their words, step codes, flags and values are the CPU
reference's bits.

A quantize tile holds ``BLOCK_V`` vectors as (d/8, BLOCK_V, 8), one vector per thread (as the E8
codec's kernel). The E8 stage takes the tile in 2^SPLIT parts of blocks in turn (three roundings of a
whole tile spill registers). Per block: the nearest E8 point of ``y``; of ``y·(2/3)`` where that
leaves the cube (scale flag); of ``y·(2/3)`` clamped to [-7, 6.5] where that leaves it too (computed
only when some block of the part needs it). The words are the nibbles' XOR (disjoint bits).

Decode attention (``nested_attention_kernel``, grid (B·Hkv, splits)) is the split-K kernel of
:mod:`lqlib.kernels._attention_triton` with the int8 codes replaced by words: per tile, the words
and the flags of BLOCK_N tokens are loaded once and turned into float16 ``β·2p`` in registers, which
feed tl.dot against the rotated queries (keys) and the softmax weights (values). Nothing decoded is
written to memory. Two operand layouts (``PAIRS``):

* pairs of lanes (``_lanes``, ``_tile_pairs``): a word decodes into its eight lanes (on the GPU by
  integer and f16x2 instructions only), lanes i and i + 4 of every block form one operand of depth
  d/4, and four dots per operand sum the scores (keys) or fill four accumulators (values); the
  queries are rotated straight into the four lane orders (``_pair_queries``: by butterflies in
  registers, ``_rotated_pairs``, or by dots against columns of H) and the value sums rotated back
  from them (``_store_pairs``), or once a row by the merge of the splits
  (:func:`lqlib.kernels._attention_triton.combine_unrotate_kernel`); with ``KEYS_A`` the decoded keys
  are the score dots' first operand against the transposed queries (transposed scores (BLOCK_N,
  BLOCK_G), softmax along tokens = axis 0): on sm_90 a first operand may stay in registers, a second
  goes through shared memory; the key flags are then read as int32 words (``_flag_lanes``) so that,
  like the words, they load from shared memory straight into the operand's layout;
* joined (``_operand``, ``_tile``): the eight lanes are joined into one operand of depth d.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ._attention_triton import _row_max_abs, _step_factors
from ._e8_triton import _fwht, _nearest_e8_codes, _part, _round_to, _saturate, _step_code, _tile_offsets, _to_tile
from ._e8_triton import _pow2 as _pow2

_INV_BETA = tl.constexpr(0.6666666865348816)  # float32(2/3), as lqlib.coding.nested.INV_BETA
_LIMIT = tl.constexpr(64.0)


@triton.jit
def _codes2p(y):
    """Codes ``2·nearest_e8(y)`` of (c, B, 8) float32 (|y| <= 64) as int32 (sign-extended low 16 bits)."""
    return (_nearest_e8_codes(y) << 16) >> 16


@triton.jit
def _inside(c):
    """(c, B, 8) codes 2p → (c, B) int32: 1 where every code lies in [-16, 15] (floor(p) in [-8, 7])."""
    ok = ((c >= -16) & (c <= 15)).to(tl.int32)
    return tl.min(ok, axis=2)


@triton.jit
def _words(c):
    """(c, B, 8) codes 2p inside the cube → (c, B) int32 words (see lqlib.coding.nested)."""
    lane = tl.arange(0, 8)[None, None, :]
    z = c >> 1  # floor(p)
    par = tl.sum(tl.where(lane < 7, z, 0), axis=2) & 1
    b = tl.sum(tl.where(lane == 7, c & 1, 0), axis=2)
    nib = tl.where(lane == 7, z - par[:, :, None] + b[:, :, None] + 8, z + 8)
    return tl.xor_sum(nib << (4 * lane), axis=2)


@triton.jit
def _choose(y):
    """(c, B, 8) lattice units → (codes 2p (c, B, 8) inside the cube, flags (c, B) int32): the nearest
    E8 point of y; of y·(2/3) where that leaves the cube (flag 1); of y·(2/3) clamped to [-7, 6.5]
    where that leaves it too (computed only when some block of the part needs it)."""
    first = _codes2p(y)
    fits = _inside(first)
    shrunk = y * _INV_BETA
    second = _codes2p(shrunk)
    fits2 = _inside(second)
    if tl.max(tl.max((1 - fits) * (1 - fits2), axis=1), axis=0) != 0:  # rare: clamp into the safe box
        third = _codes2p(tl.minimum(tl.maximum(shrunk, -7.0), 6.5))
        second = tl.where(fits2[:, :, None] != 0, second, third)
    return tl.where(fits[:, :, None] != 0, first, second), 1 - fits


@triton.jit
def _lattice_units(u, k, tables_ptr, SHIFT: tl.constexpr):
    """(C, B, 8) transformed vectors at step codes k (B,) → lattice units, clamped to ±64."""
    g = k - 4 * SHIFT
    factor = tl.load(tables_ptr + 8 + (g & 7)) * _pow2(-(g >> 3) - SHIFT)
    y = u * factor[None, :, None]
    return tl.minimum(tl.maximum(y, -_LIMIT), _LIMIT)


@triton.jit
def _decision_error(y, codes, flagged):
    """(c, B, 8) lattice units, their codes 2p and flags (c, B) → (B,) int64 ``Σ trunc(1024·(y − β·p))²``
    (as lqlib.coding.nested._decision_errors: β·p = codes·(β/2) exactly, one float32 subtraction)."""
    half_beta = tl.where(flagged != 0, 0.75, 0.5)
    q = ((y - codes.to(tl.float32) * half_beta[:, :, None]) * 1024.0).to(tl.int64)
    return tl.sum(tl.sum(q * q, axis=2), axis=0)


@triton.jit
def _search_weight(J: tl.constexpr):
    """round(2^14·2^(−J/4)) (lqlib.coding.nested.search_weights)."""
    if J == 0:
        w: tl.constexpr = 16384
    elif J == 1:
        w: tl.constexpr = 13777
    elif J == 2:
        w: tl.constexpr = 11585
    else:
        w: tl.constexpr = 9742
    return w


@triton.jit
def nested_quantize_kernel(
    x_ptr,
    words_ptr,
    steps_ptr,
    flags_ptr,
    signs_ptr,
    tables_ptr,
    pos_ptr,
    n_vectors,
    rows_per_group,
    group_stride,
    first_row,
    n0,
    t1,
    t2,
    t3,
    t4,
    D: tl.constexpr,
    LOG2C: tl.constexpr,
    SHIFT: tl.constexpr,
    RHT: tl.constexpr,
    FB: tl.constexpr,
    BLOCK_V: tl.constexpr,
    CHUNK_MAJOR: tl.constexpr,
    SPLIT: tl.constexpr,
    HAS_POS: tl.constexpr,
    SEARCH: tl.constexpr,
):
    """x (n_vectors, D) → words (·, D/8) int32, step codes (·,) int16, flags (·, FB) uint8 at output row
    ``(r // rows_per_group)·group_stride + first_row (+ *pos_ptr if HAS_POS) + r % rows_per_group`` for
    input row r: consecutive rows in place, or groups of rows written into a cache at a position. With
    SEARCH > 0 the step codes k0 .. k0 − SEARCH are each coded once for their errors, and the best
    once more for its words."""
    C: tl.constexpr = D // 8
    pid = tl.program_id(0)
    offs, rows, row_ok, mask = _tile_offsets(pid, n_vectors, D, BLOCK_V, CHUNK_MAJOR)
    out_rows = (rows // rows_per_group).to(tl.int64) * group_stride + (rows % rows_per_group) + first_row
    if HAS_POS:
        out_rows += tl.load(pos_ptr).to(tl.int64)
    x = _to_tile(tl.load(x_ptr + offs, mask=mask, other=0.0), CHUNK_MAJOR).to(tl.float32)
    if RHT:
        signs = tl.load(signs_ptr + tl.arange(0, C)[:, None, None] * 8 + tl.arange(0, 8)[None, None, :])
        u = _fwht(x * signs, LOG2C)
    else:
        u = x
    # step code of the largest |u| (float64 square: exact), as lqlib.coding.nested.NestedE8Codec.step_codes
    m = tl.max(tl.max(tl.abs(u), axis=2), axis=0).to(tl.float64)
    k = _step_code(m * m, n0, t1, t2, t3, t4)
    if SEARCH > 0:  # the finer step codes' errors, compared in integers (ties keep the coarser)
        best = tl.zeros((BLOCK_V,), tl.int64)
        choice = k
        for j in tl.static_range(SEARCH + 1):
            kj = tl.maximum(k - j, -800)
            yj = _lattice_units(u, kj, tables_ptr, SHIFT)
            err = tl.zeros((BLOCK_V,), tl.int64)
            for i in tl.static_range(1 << SPLIT):
                part = _part(yj, i, SPLIT)
                codes, flagged = _choose(part)
                err += _decision_error(part, codes, flagged)
            err = err * _search_weight(j)
            if j == 0:
                best = err
            else:
                better = err < best
                best = tl.where(better, err, best)
                choice = tl.where(better, kj, choice)
        k = choice
    y = _lattice_units(u, k, tables_ptr, SHIFT)

    bits = tl.zeros((BLOCK_V,), tl.int32)  # block j's scale flag at bit j
    for j in tl.static_range(1 << SPLIT):  # a part of the tile at a time: fewer values live at once
        yj = _part(y, j, SPLIT)
        codes, flagged = _choose(yj)
        part_blocks = j * (C >> SPLIT) + tl.arange(0, C >> SPLIT)
        w_offs = out_rows[None, :] * C + part_blocks[:, None]
        tl.store(words_ptr + w_offs, _words(codes), mask=row_ok[None, :])
        bits = bits | tl.xor_sum(flagged << part_blocks[:, None], axis=0)
    tl.store(steps_ptr + out_rows, k.to(steps_ptr.dtype.element_ty), mask=row_ok)
    for i in tl.static_range(FB):
        tl.store(flags_ptr + out_rows * FB + i, ((bits >> (8 * i)) & 255).to(tl.uint8), mask=row_ok)


@triton.jit
def _flag_bits(flags_ptr, rows, row_ok, FB: tl.constexpr):
    """The flag bytes of ``rows`` as one int32 each (block j at bit j)."""
    bits = tl.zeros(rows.shape, tl.int32)
    for i in tl.static_range(FB):
        byte = tl.load(flags_ptr + rows.to(tl.int64) * FB + i, mask=row_ok, other=0).to(tl.int32) & 255
        bits = bits | (byte << (8 * i))
    return bits


@triton.jit
def _flag_lanes(flags_ptr, shifts_ptr, tok, valid, C: tl.constexpr, FB: tl.constexpr, MASKED: tl.constexpr):
    """The flag bits of ``tok``'s blocks as (N, C) int32 (0/1), from two (N, C) int32 gathers: the word that
    holds a token's FB flag bytes (``flags_ptr`` 4-byte aligned, FB in {1, 2, 4}) and, from ``shifts_ptr``
    ((4, C): 8r + j), the position of block j's bit in it. Loads of (N, C) int32 only, so that the
    pipeliner copies them to shared memory and the decoded keys load into a dot operand's layout."""
    blocks = tl.arange(0, C)
    byte = tok * FB
    words = flags_ptr.to(tl.pointer_type(tl.int32)) + (byte >> 2)[:, None] + 0 * blocks[None, :]
    shifts = shifts_ptr + ((byte & 3) * C)[:, None] + blocks[None, :]
    if MASKED:
        word = tl.load(words, mask=valid[:, None], other=0)
        shift = tl.load(shifts, mask=valid[:, None], other=0)
    else:
        word = tl.load(words)
        shift = tl.load(shifts)
    return (word >> shift) & 1


@triton.jit
def _unpack_codes(w):
    """Words (..., C) int32 → codes 2p (..., C, 8) int32."""
    lane = tl.arange(0, 8)
    nib = (w[:, :, None] >> (4 * lane)[None, None, :]) & 15
    b = ((w >> 28) & 1)[:, :, None]
    x = w & 0x01111111  # the low bits of nibbles 0..6
    x = x ^ (x >> 16)
    x = x ^ (x >> 8)
    x = x ^ (x >> 4)
    par = (x & 1)[:, :, None]
    return tl.where(lane[None, None, :] == 7, 2 * nib - 16 - b + 2 * par, 2 * nib - 16 + b)


@triton.jit
def nested_dequantize_kernel(
    words_ptr,
    steps_ptr,
    flags_ptr,
    out_ptr,
    signs_ptr,
    tables_ptr,
    n_vectors,
    D: tl.constexpr,
    LOG2C: tl.constexpr,
    SHIFT: tl.constexpr,
    RHT: tl.constexpr,
    FB: tl.constexpr,
    BLOCK_V: tl.constexpr,
    CHUNK_MAJOR: tl.constexpr,
):
    """words, step codes, flags → values (n_vectors, D) in out_ptr's dtype."""
    C: tl.constexpr = D // 8
    pid = tl.program_id(0)
    offs, rows, row_ok, mask = _tile_offsets(pid, n_vectors, D, BLOCK_V, CHUNK_MAJOR)
    block = tl.arange(0, C)
    w = tl.load(words_ptr + rows.to(tl.int64)[:, None] * C + block[None, :], mask=row_ok[:, None], other=0)
    codes = _unpack_codes(w)  # (B, C, 8)
    flagged = (_flag_bits(flags_ptr, rows, row_ok, FB)[:, None] >> block[None, :]) & 1
    beta = tl.where(flagged != 0, 1.5, 1.0)
    p = tl.permute((codes.to(tl.float32) * 0.5) * beta[:, :, None], (1, 0, 2))  # (C, B, 8)
    k = tl.load(steps_ptr + rows, mask=row_ok, other=0).to(tl.int32)
    g = k - 4 * SHIFT
    step = (tl.load(tables_ptr + (g & 7)) * _pow2(g >> 3))[None, :, None]
    if RHT:
        signs = tl.load(signs_ptr + tl.arange(0, C)[:, None, None] * 8 + tl.arange(0, 8)[None, None, :])
        y = (_fwht(p, LOG2C) * step) * signs
    else:
        y = p * step
    y = _saturate(y, out_ptr.dtype.element_ty)
    if not CHUNK_MAJOR:
        y = tl.permute(y, (1, 0, 2))
    tl.store(out_ptr + offs, _round_to(y, out_ptr.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------------------- attention
@triton.jit
def _half_bits(v):
    """float32 values exact in float16 → their float16 bit patterns in the low 16 bits of an int32."""
    return v.to(tl.float16).to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF


@triton.jit
def _operand(w, flags, FAST_CVT: tl.constexpr):
    """Words (N, C) int32 and flag bits (N,) int32 → the float16 operand β·2p, (N, 8·C), exactly."""
    N: tl.constexpr = w.shape[0]
    C: tl.constexpr = w.shape[1]
    beta_on = (flags[:, None] >> tl.arange(0, C)[None, :]) & 1
    if FAST_CVT:
        b = (w >> 28) & 1
        x = w & 0x01111111
        x = x ^ (x >> 16)
        x = x ^ (x >> 8)
        x = x ^ (x >> 4)
        par = x & 1
        beta = tl.where(beta_on != 0, 1.5, 1.0)
        add = _half_bits(beta * b.to(tl.float32))
        add7 = _half_bits(beta * (2 * par - b).to(tl.float32))
        two_beta = _half_bits(2.0 * beta)
        c0, c1, c2, c3, c4, c5, c6, c7 = tl.inline_asm_elementwise(
            asm="""{
            .reg .b32 t0, t1, t2, t3, m, a, a7, s;
            mov.b32 m, 0x64086408;
            prmt.b32 s, $9, $9, 0x1010;
            prmt.b32 a, $10, $10, 0x1010;
            prmt.b32 a7, $10, $11, 0x5410;
            lop3.b32 t0, $8, 0x000F000F, 0x64006400, 0xEA;
            shr.u32 t1, $8, 4;
            lop3.b32 t1, t1, 0x000F000F, 0x64006400, 0xEA;
            shr.u32 t2, $8, 8;
            lop3.b32 t2, t2, 0x000F000F, 0x64006400, 0xEA;
            shr.u32 t3, $8, 12;
            lop3.b32 t3, t3, 0x000F000F, 0x64006400, 0xEA;
            sub.f16x2 t0, t0, m;
            sub.f16x2 t1, t1, m;
            sub.f16x2 t2, t2, m;
            sub.f16x2 t3, t3, m;
            fma.rn.f16x2 t0, t0, s, a;
            fma.rn.f16x2 t1, t1, s, a;
            fma.rn.f16x2 t2, t2, s, a;
            fma.rn.f16x2 t3, t3, s, a7;
            mov.b32 {$0, $4}, t0;
            mov.b32 {$1, $5}, t1;
            mov.b32 {$2, $6}, t2;
            mov.b32 {$3, $7}, t3;
            }""",
            constraints="=h,=h,=h,=h,=h,=h,=h,=h,r,r,r,r",
            args=[w, two_beta, add, add7],
            dtype=(tl.float16,) * 8,
            is_pure=True,
            pack=1,
        )
        # nested joins put the innermost pair's index first when flattened: pair k with k + 4 innermost
        v = tl.join(tl.join(tl.join(c0, c4), tl.join(c2, c6)), tl.join(tl.join(c1, c5), tl.join(c3, c7)))
    else:
        beta = tl.where(beta_on != 0, 1.5, 1.0)
        v = (_unpack_codes(w).to(tl.float32) * beta[:, :, None]).to(tl.float16)
    return tl.reshape(v, (N, 8 * C))


@triton.jit
def _lanes(w, beta_on, FAST_CVT: tl.constexpr):
    """Words (N, C) int32 and their blocks' flag bits (N, C) int32 (0/1) → the float16 operand β·2p as
    eight (N, C) tensors, lane i holding coordinate i of every block. On the GPU one word takes 21
    integer and 8 f16x2 instructions (no conversions): each nibble pair ``(n_i, n_{i+4})`` is masked,
    shifted to bits 1..4 of two halves under the exponent of 1024 (float16 1024 + 2n, exact), minus
    1040 − b (lane 7: 1040 + b − 2·par, the constants' bit patterns are 0x6410 ∓ …), times β; the
    parity of nibbles 0..6 is bit 28 of ``(w & 0x01111111)·0x11111111``."""
    if FAST_CVT:
        c0, c1, c2, c3, c4, c5, c6, c7 = tl.inline_asm_elementwise(
            asm="""{
            .reg .b32 t0, t1, t2, t3, b, x, p, m, m7, beta, lo;
            shr.u32 b, $8, 28;
            and.b32 b, b, 1;
            and.b32 x, $8, 0x01111111;
            mul.lo.u32 x, x, 0x11111111;
            shr.u32 p, x, 28;
            and.b32 p, p, 1;
            mul.lo.u32 lo, b, 0x00010001;
            mov.b32 m, 0x64106410;
            sub.u32 m, m, lo;
            sub.u32 x, b, p;
            shl.b32 x, x, 17;
            add.u32 m7, m, x;
            mul.lo.u32 beta, $9, 0x02000200;
            or.b32 beta, beta, 0x3C003C00;
            shl.b32 t0, $8, 1;
            lop3.b32 t0, t0, 0x001E001E, 0x64006400, 0xEA;
            shr.u32 t1, $8, 3;
            lop3.b32 t1, t1, 0x001E001E, 0x64006400, 0xEA;
            shr.u32 t2, $8, 7;
            lop3.b32 t2, t2, 0x001E001E, 0x64006400, 0xEA;
            shr.u32 t3, $8, 11;
            lop3.b32 t3, t3, 0x001E001E, 0x64006400, 0xEA;
            sub.f16x2 t0, t0, m;
            sub.f16x2 t1, t1, m;
            sub.f16x2 t2, t2, m;
            sub.f16x2 t3, t3, m7;
            mul.f16x2 t0, t0, beta;
            mul.f16x2 t1, t1, beta;
            mul.f16x2 t2, t2, beta;
            mul.f16x2 t3, t3, beta;
            mov.b32 {$0, $4}, t0;
            mov.b32 {$1, $5}, t1;
            mov.b32 {$2, $6}, t2;
            mov.b32 {$3, $7}, t3;
            }""",
            constraints="=h,=h,=h,=h,=h,=h,=h,=h,r,r",
            args=[w, beta_on],
            dtype=(tl.float16,) * 8,
            is_pure=True,
            pack=1,
        )
    else:
        beta = tl.where(beta_on != 0, 1.5, 1.0)
        b = (w >> 28) & 1
        x = w & 0x01111111
        x = x ^ (x >> 16)
        x = x ^ (x >> 8)
        x = x ^ (x >> 4)
        par = x & 1
        c0 = ((2 * (w & 15) - 16 + b).to(tl.float32) * beta).to(tl.float16)
        c1 = ((2 * ((w >> 4) & 15) - 16 + b).to(tl.float32) * beta).to(tl.float16)
        c2 = ((2 * ((w >> 8) & 15) - 16 + b).to(tl.float32) * beta).to(tl.float16)
        c3 = ((2 * ((w >> 12) & 15) - 16 + b).to(tl.float32) * beta).to(tl.float16)
        c4 = ((2 * ((w >> 16) & 15) - 16 + b).to(tl.float32) * beta).to(tl.float16)
        c5 = ((2 * ((w >> 20) & 15) - 16 + b).to(tl.float32) * beta).to(tl.float16)
        c6 = ((2 * ((w >> 24) & 15) - 16 + b).to(tl.float32) * beta).to(tl.float16)
        c7 = ((2 * ((w >> 28) & 15) - 16 - b + 2 * par).to(tl.float32) * beta).to(tl.float16)
    return c0, c1, c2, c3, c4, c5, c6, c7


@triton.jit
def _lanes_lean(w, beta_on, FAST_CVT: tl.constexpr):
    """Words (N, C) int32 and their blocks' flag bits (N, C) int32 (0/1) → ``β·(2n_i − 16)`` as eight (N, C)
    float16 lanes, without the coset bit and parity (:func:`_side` carries them). On the GPU one word
    takes 2 integer multiplies, 2 adds, 3 shifts, 4 ``lop3`` and 4 ``fma.f16x2``: ``(1024 + n)·2β − 2064β``,
    exact in one rounding (constants 2β = 0x4000/0x4200 and −2064β = 0xE808/0xEA0C)."""
    if FAST_CVT:
        c0, c1, c2, c3, c4, c5, c6, c7 = tl.inline_asm_elementwise(
            asm="""{
            .reg .b32 t0, t1, t2, t3, s, o;
            mul.lo.u32 s, $9, 0x02000200;
            add.u32 s, s, 0x40004000;
            mul.lo.u32 o, $9, 0x02040204;
            add.u32 o, o, 0xE808E808;
            lop3.b32 t0, $8, 0x000F000F, 0x64006400, 0xEA;
            shr.u32 t1, $8, 4;
            lop3.b32 t1, t1, 0x000F000F, 0x64006400, 0xEA;
            shr.u32 t2, $8, 8;
            lop3.b32 t2, t2, 0x000F000F, 0x64006400, 0xEA;
            shr.u32 t3, $8, 12;
            lop3.b32 t3, t3, 0x000F000F, 0x64006400, 0xEA;
            fma.rn.f16x2 t0, t0, s, o;
            fma.rn.f16x2 t1, t1, s, o;
            fma.rn.f16x2 t2, t2, s, o;
            fma.rn.f16x2 t3, t3, s, o;
            mov.b32 {$0, $4}, t0;
            mov.b32 {$1, $5}, t1;
            mov.b32 {$2, $6}, t2;
            mov.b32 {$3, $7}, t3;
            }""",
            constraints="=h,=h,=h,=h,=h,=h,=h,=h,r,r",
            args=[w, beta_on],
            dtype=(tl.float16,) * 8,
            is_pure=True,
            pack=1,
        )
    else:
        beta = tl.where(beta_on != 0, 1.5, 1.0)
        c0 = ((2 * (w & 15) - 16).to(tl.float32) * beta).to(tl.float16)
        c1 = ((2 * ((w >> 4) & 15) - 16).to(tl.float32) * beta).to(tl.float16)
        c2 = ((2 * ((w >> 8) & 15) - 16).to(tl.float32) * beta).to(tl.float16)
        c3 = ((2 * ((w >> 12) & 15) - 16).to(tl.float32) * beta).to(tl.float16)
        c4 = ((2 * ((w >> 16) & 15) - 16).to(tl.float32) * beta).to(tl.float16)
        c5 = ((2 * ((w >> 20) & 15) - 16).to(tl.float32) * beta).to(tl.float16)
        c6 = ((2 * ((w >> 24) & 15) - 16).to(tl.float32) * beta).to(tl.float16)
        c7 = ((2 * ((w >> 28) & 15) - 16).to(tl.float32) * beta).to(tl.float16)
    return c0, c1, c2, c3, c4, c5, c6, c7


@triton.jit
def _side(w, beta_on):
    """Words (N, C) and flag bits (N, C) → (N, 2C) float16, columns 2j, 2j + 1 = ``β·b`` and ``β·par`` of
    block j: with :func:`_lanes_lean`, code i of a block is ``β(2n_i − 16) + β·b`` (i < 7) and
    ``β(2n_7 − 16) − β·b + 2β·par`` (i = 7)."""
    b = (w >> 28) & 1
    par = (((w & 0x01111111) * 0x11111111) >> 28) & 1
    beta = tl.where(beta_on != 0, 1.5, 1.0)
    sb = (b.to(tl.float32) * beta).to(tl.float16)
    sp = (par.to(tl.float32) * beta).to(tl.float16)
    return tl.reshape(tl.join(sb, sp), (w.shape[0], 2 * w.shape[1]))


@triton.jit
def _side_queries(q0, q1, q2, q3):
    """The four pairs' queries (BLOCK_G, 2C) float16 → the side operand's query (BLOCK_G, 2C), columns
    2j, 2j + 1 = ``q_0 + … + q_6 − q_7`` and ``2·q_7`` of block j, as float16 high and low parts."""
    G: tl.constexpr = q0.shape[0]
    C2: tl.constexpr = q0.shape[1]
    l0, l4 = tl.split(tl.reshape(q0.to(tl.float32), (G, C2 // 2, 2)))
    l1, l5 = tl.split(tl.reshape(q1.to(tl.float32), (G, C2 // 2, 2)))
    l2, l6 = tl.split(tl.reshape(q2.to(tl.float32), (G, C2 // 2, 2)))
    l3, l7 = tl.split(tl.reshape(q3.to(tl.float32), (G, C2 // 2, 2)))
    qb = ((l0 + l1) + (l2 + l3)) + ((l4 + l5) + l6) - l7
    qs = tl.reshape(tl.join(qb, 2.0 * l7), (G, C2))
    hi = qs.to(tl.float16)
    return hi, (qs - hi.to(tl.float32)).to(tl.float16)


@triton.jit
def _add_side_values(a0, a1, a2, a3, sv):
    """Add the value side sums sv (BLOCK_G, 2C) (columns ``Σ p·β·b``, ``Σ p·β·par`` per block) to the pairs'
    sums: ``+Σβb`` on lanes 0..6, ``−Σβb + 2Σβpar`` on lane 7 (pair 3's odd columns)."""
    G: tl.constexpr = sv.shape[0]
    C2: tl.constexpr = sv.shape[1]
    vb, vp = tl.split(tl.reshape(sv, (G, C2 // 2, 2)))
    both = tl.reshape(tl.join(vb, vb), (G, C2))
    return a0 + both, a1 + both, a2 + both, a3 + tl.reshape(tl.join(vb, 2.0 * vp - vb), (G, C2))


@triton.jit
def _pair(a, b):
    """Lanes i and i + 4, (N, C) each → (N, 2C): column 2j is block j's coordinate i, 2j + 1 its i + 4."""
    return tl.reshape(tl.join(a, b), (a.shape[0], 2 * a.shape[1]))


@triton.jit
def _pair_columns(K: tl.constexpr, C: tl.constexpr):
    """The coordinates (2C,) that pair K's columns hold: 8·(m // 2) + K + 4·(m % 2)."""
    m = tl.arange(0, 2 * C)
    return 8 * (m // 2) + K + 4 * (m % 2)


@triton.jit
def _tile_pairs(
    q0,
    q1,
    q2,
    q3,
    factor,
    m,
    l,
    a0,
    a1,
    a2,
    a3,
    qs_hi,
    qs_lo,
    sv,
    kw_base,
    vw_base,
    ks_base,
    vs_base,
    kf_base,
    vf_base,
    tables_ptr,
    shifts_ptr,
    s0,
    end,
    stride_kwn,
    stride_vwn,
    BLOCK_N: tl.constexpr,
    C: tl.constexpr,
    FB: tl.constexpr,
    K_SHIFT: tl.constexpr,
    V_SHIFT: tl.constexpr,
    FAST_CVT: tl.constexpr,
    MASKED: tl.constexpr,
    LEAN: tl.constexpr,
    KEYS_A: tl.constexpr,
):
    """:func:`_tile` with the operands split in four pairs of lanes (four dots of depth 2C for keys and
    for values, no reshaping of the decoded words into one (N, D) operand). With LEAN the lanes carry
    ``β(2n − 16)`` only and the coset bits and parities go through one more dot of depth 2C per operand
    (:func:`_side`; ``qs_hi``/``qs_lo`` the keys' side query, ``sv`` the values' side sums). With KEYS_A
    (not with LEAN) the queries come transposed, (2C, BLOCK_G) each, and the decoded keys are the dots'
    first operand: transposed scores (BLOCK_N, BLOCK_G), the softmax along axis 0."""
    tok = s0 + tl.arange(0, BLOCK_N)
    blocks = tl.arange(0, C)
    k_ptrs = kw_base + tok[:, None].to(tl.int64) * stride_kwn + blocks[None, :]
    v_ptrs = vw_base + tok[:, None].to(tl.int64) * stride_vwn + blocks[None, :]
    if MASKED:
        valid = tok < end
        kw = tl.load(k_ptrs, mask=valid[:, None], other=0)
        vw = tl.load(v_ptrs, mask=valid[:, None], other=0)
        k_steps = tl.load(ks_base + tok, mask=valid, other=0).to(tl.int32)
        v_steps = tl.load(vs_base + tok, mask=valid, other=0).to(tl.int32)
    else:
        valid = tok >= 0
        kw = tl.load(k_ptrs)
        vw = tl.load(v_ptrs)
        k_steps = tl.load(ks_base + tok).to(tl.int32)
        v_steps = tl.load(vs_base + tok).to(tl.int32)
    if KEYS_A:
        kf = _flag_lanes(kf_base, shifts_ptr, tok, valid, C, FB, MASKED)
    else:
        kf = (_flag_bits(kf_base, tok, valid, FB)[:, None] >> blocks[None, :]) & 1
    vf = (_flag_bits(vf_base, tok, valid, FB)[:, None] >> blocks[None, :]) & 1
    fk = _step_factors(k_steps, tables_ptr, K_SHIFT) * factor
    fv = _step_factors(v_steps, tables_ptr, V_SHIFT)
    if MASKED:
        fv = tl.where(valid, fv, 0.0)

    fv_max = tl.max(fv, axis=0)
    fv_max = tl.where(fv_max > 0, fv_max, 1.0)
    if KEYS_A:  # keys (BLOCK_N, 2C) as the first operand, queries (2C, BLOCK_G): no transposed keys
        tl.static_assert(not LEAN, "KEYS_A is for the full decoding only")
        k0, k1, k2, k3, k4, k5, k6, k7 = _lanes(kw, kf, FAST_CVT)
        st = tl.dot(_pair(k0, k4), q0)  # (BLOCK_N, BLOCK_G)
        st = tl.dot(_pair(k1, k5), q1, st)
        st = tl.dot(_pair(k2, k6), q2, st)
        st = tl.dot(_pair(k3, k7), q3, st)
        st = st * fk[:, None]
        if MASKED:
            st = tl.where(valid[:, None], st, float("-inf"))
        m_new = tl.maximum(m, tl.max(st, axis=0))
        alpha = tl.exp2(m - m_new)
        pt = tl.exp2(st - m_new[None, :])
        l = l * alpha + tl.sum(pt, axis=0)
        pn = tl.trans((pt * (fv * (1.0 / fv_max))[:, None]).to(tl.float16))  # (BLOCK_G, BLOCK_N)
    else:
        if LEAN:
            k0, k1, k2, k3, k4, k5, k6, k7 = _lanes_lean(kw, kf, FAST_CVT)
            side_k = tl.trans(_side(kw, kf))
            s = tl.dot(qs_hi, side_k)
            s = tl.dot(qs_lo, side_k, s)
            s = tl.dot(q0, tl.trans(_pair(k0, k4)), s)
        else:
            k0, k1, k2, k3, k4, k5, k6, k7 = _lanes(kw, kf, FAST_CVT)
            s = tl.dot(q0, tl.trans(_pair(k0, k4)))
        s = tl.dot(q1, tl.trans(_pair(k1, k5)), s)
        s = tl.dot(q2, tl.trans(_pair(k2, k6)), s)
        s = tl.dot(q3, tl.trans(_pair(k3, k7)), s)
        s = s * fk[None, :]
        if MASKED:
            s = tl.where(valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))
        alpha = tl.exp2(m - m_new)
        p = tl.exp2(s - m_new[:, None])
        l = l * alpha + tl.sum(p, axis=1)
        pn = (p * (fv * (1.0 / fv_max))[None, :]).to(tl.float16)  # p·f/max f, at most 1
    if LEAN:
        v0, v1, v2, v3, v4, v5, v6, v7 = _lanes_lean(vw, vf, FAST_CVT)
        sv = sv * alpha[:, None] + tl.dot(pn, _side(vw, vf)) * fv_max
    else:
        v0, v1, v2, v3, v4, v5, v6, v7 = _lanes(vw, vf, FAST_CVT)
    a0 = a0 * alpha[:, None] + tl.dot(pn, _pair(v0, v4)) * fv_max
    a1 = a1 * alpha[:, None] + tl.dot(pn, _pair(v1, v5)) * fv_max
    a2 = a2 * alpha[:, None] + tl.dot(pn, _pair(v2, v6)) * fv_max
    a3 = a3 * alpha[:, None] + tl.dot(pn, _pair(v3, v7)) * fv_max
    return m_new, l, a0, a1, a2, a3, sv


@triton.jit
def _tile(
    qn,
    factor,
    m,
    l,
    acc,
    kw_base,
    vw_base,
    ks_base,
    vs_base,
    kf_base,
    vf_base,
    tables_ptr,
    s0,
    end,
    stride_kwn,
    stride_vwn,
    BLOCK_N: tl.constexpr,
    C: tl.constexpr,
    FB: tl.constexpr,
    K_SHIFT: tl.constexpr,
    V_SHIFT: tl.constexpr,
    FAST_CVT: tl.constexpr,
    MASKED: tl.constexpr,
):
    """One tile of BLOCK_N tokens from s0 (masked at ``end`` if MASKED): the online-softmax update."""
    tok = s0 + tl.arange(0, BLOCK_N)
    blocks = tl.arange(0, C)
    k_ptrs = kw_base + tok[:, None].to(tl.int64) * stride_kwn + blocks[None, :]
    v_ptrs = vw_base + tok[:, None].to(tl.int64) * stride_vwn + blocks[None, :]
    if MASKED:
        valid = tok < end
        kw = tl.load(k_ptrs, mask=valid[:, None], other=0)
        vw = tl.load(v_ptrs, mask=valid[:, None], other=0)
        k_steps = tl.load(ks_base + tok, mask=valid, other=0).to(tl.int32)
        v_steps = tl.load(vs_base + tok, mask=valid, other=0).to(tl.int32)
    else:
        valid = tok >= 0
        kw = tl.load(k_ptrs)
        vw = tl.load(v_ptrs)
        k_steps = tl.load(ks_base + tok).to(tl.int32)
        v_steps = tl.load(vs_base + tok).to(tl.int32)
    kf = _flag_bits(kf_base, tok, valid, FB)
    vf = _flag_bits(vf_base, tok, valid, FB)
    fk = _step_factors(k_steps, tables_ptr, K_SHIFT) * factor
    fv = _step_factors(v_steps, tables_ptr, V_SHIFT)
    if MASKED:
        fv = tl.where(valid, fv, 0.0)

    s = tl.dot(qn, tl.trans(_operand(kw, kf, FAST_CVT)))  # (BLOCK_G, BLOCK_N)
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
    acc = acc * alpha[:, None] + tl.dot(pn, _operand(vw, vf, FAST_CVT)) * fv_max
    return m_new, l, acc


@triton.jit
def _pair_query(
    qn,
    a,
    had_ptr,
    q_ptr,
    scales_ptr,
    b,
    h,
    stride_qb,
    stride_qh,
    rows,
    row_ok,
    K: tl.constexpr,
    G: tl.constexpr,
    D: tl.constexpr,
    K_RHT: tl.constexpr,
    HAS_SCALES: tl.constexpr,
):
    """Pair K's columns (:func:`_pair_columns`) of the query times the key scales, rotated if K_RHT:
    (BLOCK_G, 2C) float32."""
    cols = _pair_columns(K, D // 8)
    if K_RHT:
        dims = tl.arange(0, D)
        had = tl.load(had_ptr + dims[:, None] * D + cols[None, :])
        return tl.dot(qn, had) * a[:, None]
    else:
        v = tl.load(
            q_ptr + b * stride_qb + (h * G + rows)[:, None] * stride_qh + cols[None, :], mask=row_ok[:, None], other=0.0
        ).to(tl.float32)
        if HAS_SCALES:
            v = v * tl.load(scales_ptr + h * D + cols)[None, :]
        return v


@triton.jit
def _rotated_pairs(q, D: tl.constexpr, LOG2C: tl.constexpr):
    """Rows (BLOCK_G, D) float32 → ``q @ H`` (H unnormalised Sylvester) as four pairs of lanes (BLOCK_G, 2C)
    float32: pair K's column 2j + t holds coordinate 8j + K + 4t (:func:`_pair_columns`)."""
    G: tl.constexpr = q.shape[0]
    C: tl.constexpr = D // 8
    v = _fwht(tl.permute(tl.reshape(q, (G, C, 8)), (1, 0, 2)), LOG2C)  # (C, G, 8)
    even, odd = tl.split(tl.reshape(v, (C, G, 2, 2, 2)))  # lane 4t + 2u + v: v = 0, 1
    p0, p2 = tl.split(even)  # u = 0, 1: (C, G, 2) each, last axis t
    p1, p3 = tl.split(odd)
    return (
        tl.reshape(tl.permute(p0, (1, 0, 2)), (G, 2 * C)),
        tl.reshape(tl.permute(p1, (1, 0, 2)), (G, 2 * C)),
        tl.reshape(tl.permute(p2, (1, 0, 2)), (G, 2 * C)),
        tl.reshape(tl.permute(p3, (1, 0, 2)), (G, 2 * C)),
    )


@triton.jit
def _pair_queries(
    q_ptr,
    scales_ptr,
    k_signs_ptr,
    had_ptr,
    b,
    h,
    stride_qb,
    stride_qh,
    G: tl.constexpr,
    BLOCK_G: tl.constexpr,
    D: tl.constexpr,
    K_RHT: tl.constexpr,
    HAS_SCALES: tl.constexpr,
    Q_FWHT: tl.constexpr,
    LOG2C: tl.constexpr,
):
    """The group's queries times the key scales (times the signs and rotated, if K_RHT: by butterflies
    in registers if Q_FWHT, else by dots against rows of H) as four pairs of lanes (BLOCK_G, 2C)
    float16, divided by their common largest |value|; and that value."""
    rows = tl.arange(0, BLOCK_G)
    row_ok = rows < G
    dims = tl.arange(0, D)
    a = tl.full((BLOCK_G,), 1.0, tl.float32)
    qn = tl.zeros((BLOCK_G, D), tl.float16)
    if K_RHT:
        q = tl.load(
            q_ptr + b * stride_qb + (h * G + rows)[:, None] * stride_qh + dims[None, :], mask=row_ok[:, None], other=0.0
        ).to(tl.float32)
        if HAS_SCALES:
            q = q * tl.load(scales_ptr + h * D + dims)[None, :]
        q = q * tl.load(k_signs_ptr + dims)[None, :]
        a = _row_max_abs(q)
        qn = (q / a[:, None]).to(tl.float16)
    if K_RHT and Q_FWHT:
        p0, p1, p2, p3 = _rotated_pairs(q, D, LOG2C)
    else:
        p0 = _pair_query(
            qn, a, had_ptr, q_ptr, scales_ptr, b, h, stride_qb, stride_qh, rows, row_ok, 0, G, D, K_RHT, HAS_SCALES
        )
        p1 = _pair_query(
            qn, a, had_ptr, q_ptr, scales_ptr, b, h, stride_qb, stride_qh, rows, row_ok, 1, G, D, K_RHT, HAS_SCALES
        )
        p2 = _pair_query(
            qn, a, had_ptr, q_ptr, scales_ptr, b, h, stride_qb, stride_qh, rows, row_ok, 2, G, D, K_RHT, HAS_SCALES
        )
        p3 = _pair_query(
            qn, a, had_ptr, q_ptr, scales_ptr, b, h, stride_qb, stride_qh, rows, row_ok, 3, G, D, K_RHT, HAS_SCALES
        )
    top = tl.maximum(tl.maximum(_row_max_abs(p0), _row_max_abs(p1)), tl.maximum(_row_max_abs(p2), _row_max_abs(p3)))
    q_max = tl.max(top, axis=0)  # one scale for the group: it folds into the step factors
    return (
        (p0 / q_max).to(tl.float16),
        (p1 / q_max).to(tl.float16),
        (p2 / q_max).to(tl.float16),
        (p3 / q_max).to(tl.float16),
        q_max,
    )


@triton.jit
def _unrotate_pair(acc, a, had_ptr, K: tl.constexpr, D: tl.constexpr):
    """Pair K's share of ``acc·H`` (BLOCK_G, D): its columns' rows of H, in float16 high and low parts."""
    an = acc / a[:, None]
    hi = an.to(tl.float16)
    lo = (an - hi.to(tl.float32)).to(tl.float16)
    cols = _pair_columns(K, D // 8)
    dims = tl.arange(0, D)
    had = tl.load(had_ptr + cols[:, None] * D + dims[None, :])
    return tl.dot(hi, had) + tl.dot(lo, had)


@triton.jit
def _store_pairs(
    acc_ptr,
    ml_ptr,
    v_signs_ptr,
    had_ptr,
    a0,
    a1,
    a2,
    a3,
    m,
    l,
    pid,
    split,
    n_splits,
    G: tl.constexpr,
    BLOCK_G: tl.constexpr,
    D: tl.constexpr,
    V_RHT: tl.constexpr,
):
    """Write a program's partial (acc in the original coordinates, m, l) from the four pairs' sums."""
    rows = tl.arange(0, BLOCK_G)
    row_ok = rows < G
    out_rows = (pid * G + rows).to(tl.int64)
    base = acc_ptr + (out_rows[:, None] * n_splits + split) * D
    if V_RHT:
        a = tl.maximum(tl.maximum(_row_max_abs(a0), _row_max_abs(a1)), tl.maximum(_row_max_abs(a2), _row_max_abs(a3)))
        acc = _unrotate_pair(a0, a, had_ptr, 0, D) + _unrotate_pair(a1, a, had_ptr, 1, D)
        acc = acc + _unrotate_pair(a2, a, had_ptr, 2, D) + _unrotate_pair(a3, a, had_ptr, 3, D)
        dims = tl.arange(0, D)
        acc = acc * a[:, None] * tl.load(v_signs_ptr + dims)[None, :]
        tl.store(base + dims[None, :], acc, mask=row_ok[:, None])
    else:
        C: tl.constexpr = D // 8
        tl.store(base + _pair_columns(0, C)[None, :], a0, mask=row_ok[:, None])
        tl.store(base + _pair_columns(1, C)[None, :], a1, mask=row_ok[:, None])
        tl.store(base + _pair_columns(2, C)[None, :], a2, mask=row_ok[:, None])
        tl.store(base + _pair_columns(3, C)[None, :], a3, mask=row_ok[:, None])
    tl.store(ml_ptr + (out_rows * 2) * n_splits + split, m, mask=row_ok)
    tl.store(ml_ptr + (out_rows * 2 + 1) * n_splits + split, l, mask=row_ok)


@triton.jit
def nested_attention_kernel(
    q_ptr,
    kw_ptr,
    ks_ptr,
    kf_ptr,
    vw_ptr,
    vs_ptr,
    vf_ptr,
    scales_ptr,
    k_signs_ptr,
    v_signs_ptr,
    had_ptr,
    tables_ptr,
    shifts_ptr,
    acc_ptr,
    ml_ptr,
    lengths_ptr,
    length,
    per_split,
    qk_scale,
    stride_qb,
    stride_qh,
    stride_kwb,
    stride_kwh,
    stride_kwn,
    stride_ksb,
    stride_ksh,
    stride_kfb,
    stride_kfh,
    stride_vwb,
    stride_vwh,
    stride_vwn,
    stride_vsb,
    stride_vsh,
    stride_vfb,
    stride_vfh,
    HKV: tl.constexpr,
    G: tl.constexpr,
    BLOCK_G: tl.constexpr,
    D: tl.constexpr,
    FB: tl.constexpr,
    BLOCK_N: tl.constexpr,
    K_SHIFT: tl.constexpr,
    V_SHIFT: tl.constexpr,
    K_RHT: tl.constexpr,
    V_RHT: tl.constexpr,
    HAS_SCALES: tl.constexpr,
    HAS_LENGTHS: tl.constexpr,
    FAST_CVT: tl.constexpr,
    PAIRS: tl.constexpr,
    LEAN: tl.constexpr,
    Q_FWHT: tl.constexpr,
    LOG2C: tl.constexpr,
    KEYS_A: tl.constexpr,
):
    """Partial attention of one (batch row, KV head) over one range of tokens.

    kw/vw: words (B, Hkv, capacity, D/8) int32; ks/vs: step codes (B, Hkv, capacity) int16;
    kf/vf: flags (B, Hkv, capacity, FB) uint8 (token stride FB; with KEYS_A each (batch row, head) of kf
    4-byte aligned, read as int32 words with the bit positions shifts_ptr (4, D/8) int32 holds, 8r + j);
    acc_ptr: (B·Hq, splits, D) float32, the value sums in the original domain (times 2); ml_ptr:
    (B·Hq, 2, splits), maxima (base 2) and sums."""
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

    C: tl.constexpr = D // 8
    kw_base = kw_ptr + b.to(tl.int64) * stride_kwb + h.to(tl.int64) * stride_kwh
    vw_base = vw_ptr + b.to(tl.int64) * stride_vwb + h.to(tl.int64) * stride_vwh
    ks_base = ks_ptr + b.to(tl.int64) * stride_ksb + h.to(tl.int64) * stride_ksh
    vs_base = vs_ptr + b.to(tl.int64) * stride_vsb + h.to(tl.int64) * stride_vsh
    kf_base = kf_ptr + b.to(tl.int64) * stride_kfb + h.to(tl.int64) * stride_kfh
    vf_base = vf_ptr + b.to(tl.int64) * stride_vfb + h.to(tl.int64) * stride_vfh
    if PAIRS:  # four dots of depth 2C per operand (D >= 64)
        q0, q1, q2, q3, q_max = _pair_queries(
            q_ptr,
            scales_ptr,
            k_signs_ptr,
            had_ptr,
            b,
            h,
            stride_qb,
            stride_qh,
            G,
            BLOCK_G,
            D,
            K_RHT,
            HAS_SCALES,
            Q_FWHT,
            LOG2C,
        )
        factor = q_max * qk_scale  # scores = (qn · β·2p) · factor · f(k)
        m = tl.full((BLOCK_G,), float("-inf"), tl.float32)
        l = tl.zeros((BLOCK_G,), tl.float32)
        a0 = tl.zeros((BLOCK_G, 2 * C), tl.float32)
        a1 = tl.zeros((BLOCK_G, 2 * C), tl.float32)
        a2 = tl.zeros((BLOCK_G, 2 * C), tl.float32)
        a3 = tl.zeros((BLOCK_G, 2 * C), tl.float32)
        sv = tl.zeros((BLOCK_G, 2 * C), tl.float32)
        if LEAN:
            qs_hi, qs_lo = _side_queries(q0, q1, q2, q3)
        else:
            qs_hi = q0
            qs_lo = q0
        if KEYS_A:  # the queries as the dots' second operand, (2C, BLOCK_G), transposed once
            q0 = tl.trans(q0)
            q1 = tl.trans(q1)
            q2 = tl.trans(q2)
            q3 = tl.trans(q3)
        full_end = start + tl.maximum(end - start, 0) // BLOCK_N * BLOCK_N
        for s0 in range(start, full_end, BLOCK_N):  # whole tiles, no masks
            m, l, a0, a1, a2, a3, sv = _tile_pairs(
                q0,
                q1,
                q2,
                q3,
                factor,
                m,
                l,
                a0,
                a1,
                a2,
                a3,
                qs_hi,
                qs_lo,
                sv,
                kw_base,
                vw_base,
                ks_base,
                vs_base,
                kf_base,
                vf_base,
                tables_ptr,
                shifts_ptr,
                s0,
                end,
                stride_kwn,
                stride_vwn,
                BLOCK_N,
                C,
                FB,
                K_SHIFT,
                V_SHIFT,
                FAST_CVT,
                False,
                LEAN,
                KEYS_A,
            )
        if full_end < end:  # the last, partial tile
            m, l, a0, a1, a2, a3, sv = _tile_pairs(
                q0,
                q1,
                q2,
                q3,
                factor,
                m,
                l,
                a0,
                a1,
                a2,
                a3,
                qs_hi,
                qs_lo,
                sv,
                kw_base,
                vw_base,
                ks_base,
                vs_base,
                kf_base,
                vf_base,
                tables_ptr,
                shifts_ptr,
                full_end,
                end,
                stride_kwn,
                stride_vwn,
                BLOCK_N,
                C,
                FB,
                K_SHIFT,
                V_SHIFT,
                FAST_CVT,
                True,
                LEAN,
                KEYS_A,
            )
        if LEAN:
            a0, a1, a2, a3 = _add_side_values(a0, a1, a2, a3, sv)
        _store_pairs(
            acc_ptr, ml_ptr, v_signs_ptr, had_ptr, a0, a1, a2, a3, m, l, pid, split, n_splits, G, BLOCK_G, D, V_RHT
        )
    else:  # one dot of depth D per operand
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
        factor = q_max * qk_scale  # scores = (qn · β·2p) · factor · f(k)

        m = tl.full((BLOCK_G,), float("-inf"), tl.float32)
        l = tl.zeros((BLOCK_G,), tl.float32)
        acc = tl.zeros((BLOCK_G, D), tl.float32)
        full_end = start + tl.maximum(end - start, 0) // BLOCK_N * BLOCK_N
        for s0 in range(start, full_end, BLOCK_N):  # whole tiles, no masks
            m, l, acc = _tile(
                qn,
                factor,
                m,
                l,
                acc,
                kw_base,
                vw_base,
                ks_base,
                vs_base,
                kf_base,
                vf_base,
                tables_ptr,
                s0,
                end,
                stride_kwn,
                stride_vwn,
                BLOCK_N,
                C,
                FB,
                K_SHIFT,
                V_SHIFT,
                FAST_CVT,
                False,
            )
        if full_end < end:  # the last, partial tile
            m, l, acc = _tile(
                qn,
                factor,
                m,
                l,
                acc,
                kw_base,
                vw_base,
                ks_base,
                vs_base,
                kf_base,
                vf_base,
                tables_ptr,
                full_end,
                end,
                stride_kwn,
                stride_vwn,
                BLOCK_N,
                C,
                FB,
                K_SHIFT,
                V_SHIFT,
                FAST_CVT,
                True,
            )

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
