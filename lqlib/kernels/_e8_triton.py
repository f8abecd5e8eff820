"""Triton kernels of the E8 codec (per-vector steps): quantize to lattice codes, dequantize.

Imported only through :mod:`lqlib.kernels`, which keeps Triton optional. Each kernel repeats
the CPU codec's operations (:meth:`lqlib.E8Codec._analyse` / ``_synthesise``) one for one, in
the same order and with the same IEEE operations, and is compiled without fused multiply-add
(``enable_fp_fusion=False``), so its results are the CPU codec's bits:

* the RHT is :func:`lqlib.rht.fwht` of ``signs ⊙ x``: butterfly stages h = 1, 2, 4, ..., d/2,
  each combining elements i and i + h as ``(a + b, a - b)``: the same roundings;
* the step code comes from the float64 sum of squares of ``x`` in the pairwise order of
  :func:`lqlib.lattices.pairwise_sum`, by exponent and threshold (:func:`lqlib.steps.code_constants`);
* lattice units are ``u · R[g mod 8]·2^(-(g div 8) - shift)`` (a product, not a division:
  Triton's float32 division is not correctly rounded);
* E8 is :func:`lqlib.lattices.nearest_e8`: round half to even (by adding and subtracting
  2^23, exact below 2^23), first index of the largest error, pairwise sums of 8;
* decoding is ``((H·p) · 2^(g/8)) · signs``, then one rounding to the output dtype.

A tile holds ``BLOCK_V`` vectors as a (d/8, BLOCK_V, 8) tensor: the last axis is one E8
block, the first the d/8 blocks of a vector. ``CHUNK_MAJOR`` only changes how the tile is
addressed when loaded and stored (which axis Triton spreads over threads first).
"""

from __future__ import annotations

import triton
import triton.language as tl
from triton.language.extra import libdevice

_TWO_23 = tl.constexpr(8388608.0)  # 2^23: float32 numbers at or above it are integers
_MANTISSA = tl.constexpr(0xFFFFFFFFFFFFF)  # float64 mantissa bits
_HALF_EXPONENT = tl.constexpr(0x3FE0000000000000)  # float64 exponent bits of [0.5, 1)


@triton.jit
def _sum8(v):
    """(C, B, 8) → (C, B): ((v0 + v1) + (v2 + v3)) + ((v4 + v5) + (v6 + v7))."""
    C: tl.constexpr = v.shape[0]
    B: tl.constexpr = v.shape[1]
    a, b = tl.split(tl.reshape(v, (C, B, 4, 2)))
    a, b = tl.split(tl.reshape(a + b, (C, B, 2, 2)))
    a, b = tl.split(a + b)
    return a + b


@triton.jit
def _sum_blocks(v, LOG2C: tl.constexpr):
    """(C, B) → (B,): pairwise over the first axis (adjacent blocks, then pairs of them ...)."""
    B: tl.constexpr = v.shape[1]
    for i in tl.static_range(LOG2C):
        a, b = tl.split(tl.permute(tl.reshape(v, (v.shape[0] // 2, 2, B)), (0, 2, 1)))
        v = a + b
    return tl.reshape(v, (B,))


@triton.jit
def _fwht(v, LOG2C: tl.constexpr):
    """Unnormalised Walsh–Hadamard transform of (C, B, 8) tiles along the flattened (C·8) axis:
    stages h = 1, 2, 4 inside each block of 8, then h = 8, 16, ... across blocks, each stage in place
    (element i with i + h), so that every stage hands on the layout it was given."""
    C: tl.constexpr = v.shape[0]
    B: tl.constexpr = v.shape[1]
    for i in tl.static_range(3):  # h = 2^i
        w = tl.permute(tl.reshape(v, (C, B, 4 >> i, 2, 1 << i)), (0, 1, 2, 4, 3))
        a, b = tl.split(w)
        v = tl.reshape(tl.permute(tl.join(a + b, a - b), (0, 1, 2, 4, 3)), (C, B, 8))
    for i in tl.static_range(LOG2C):  # h = 8·2^i
        w = tl.permute(tl.reshape(v, (C >> (i + 1), 2, 1 << i, B, 8)), (0, 2, 3, 4, 1))
        a, b = tl.split(w)
        v = tl.reshape(tl.permute(tl.join(a + b, a - b), (0, 4, 1, 2, 3)), (C, B, 8))
    return v


@triton.jit
def _rint(x, FAST_ROUND: tl.constexpr):
    """Round half to even (torch.round): one instruction on the GPU, or exactly the same with
    two additions (Triton's interpreter has no libdevice)."""
    if FAST_ROUND:
        r = libdevice.rint(x)
    else:
        t = tl.abs(x)
        r = (t + _TWO_23) - _TWO_23
        r = tl.where(t < _TWO_23, r, t)
        r = tl.where(x < 0, -r, r)
    return r


@triton.jit
def _nearest_d8(x, FAST_ROUND: tl.constexpr):
    """:func:`lqlib.lattices.nearest_dn` on (C, B, 8). The worst coordinate is the first index
    of the largest |error| (torch.argmax's choice), found as the least index attaining the max."""
    f = _rint(x, FAST_ROUND)
    err = x - f
    total = _sum8(f)
    odd = total - 2.0 * tl.floor(total * 0.5)
    size = tl.abs(err)
    largest = tl.max(size, axis=2)
    lane = tl.arange(0, 8)[None, None, :]
    worst = tl.min(tl.where(size == largest[:, :, None], lane, 8), axis=2)
    odd = odd[:, :, None]
    away_odd = tl.where(err >= 0, odd, -odd)  # the values of (±1)·odd, -0.0 included
    return f + tl.where(lane == worst[:, :, None], away_odd, 0.0)


@triton.jit
def _nearest_e8(x, FAST_ROUND: tl.constexpr):
    """:func:`lqlib.lattices.nearest_e8` on (C, B, 8)."""
    even = _nearest_d8(x, FAST_ROUND)
    odd = _nearest_d8(x - 0.5, FAST_ROUND) + 0.5
    e = x - even
    o = x - odd
    d_even = _sum8(e * e)
    d_odd = _sum8(o * o)
    return tl.where((d_odd < d_even)[:, :, None], odd, even)


@triton.jit
def _pow2(n):
    """2^n for int32 n in the normal float32 range, from its bit pattern."""
    return ((n + 127) << 23).to(tl.float32, bitcast=True)


@triton.jit
def _tile_offsets(pid, n_vectors, D: tl.constexpr, BLOCK_V: tl.constexpr, CHUNK_MAJOR: tl.constexpr):
    """Element offsets of a tile of vectors, (C, B, 8) or (B, C, 8) as loaded; their row indices (B,);
    the row mask (B,) and the element mask (broadcastable to the offsets)."""
    C: tl.constexpr = D // 8
    rows = pid * BLOCK_V + tl.arange(0, BLOCK_V)
    chunk = tl.arange(0, C)
    lane = tl.arange(0, 8)
    row_ok = rows < n_vectors
    if CHUNK_MAJOR:
        offs = rows.to(tl.int64)[None, :, None] * D + (chunk[:, None, None] * 8 + lane[None, None, :])
        mask = row_ok[None, :, None]
    else:
        offs = rows.to(tl.int64)[:, None, None] * D + (chunk[None, :, None] * 8 + lane[None, None, :])
        mask = row_ok[:, None, None]
    return offs, rows, row_ok, mask


@triton.jit
def _to_tile(v, CHUNK_MAJOR: tl.constexpr):
    """A loaded tile in (C, B, 8) order."""
    if not CHUNK_MAJOR:
        v = tl.permute(v, (1, 0, 2))
    return v


@triton.jit
def _from_tile(v, CHUNK_MAJOR: tl.constexpr):
    """A (C, B, 8) tile in the order of its offsets."""
    if not CHUNK_MAJOR:
        v = tl.permute(v, (1, 0, 2))
    return v


@triton.jit
def _halves(v):
    """(C, B, 8) → its first and second halves along the first axis, (C/2, B, 8) each."""
    C: tl.constexpr = v.shape[0]
    B: tl.constexpr = v.shape[1]
    return tl.split(tl.permute(tl.reshape(v, (2, C // 2, B, 8)), (1, 2, 3, 0)))


@triton.jit
def _e8_store(q, codes_ptr, rows, row_ok, FIRST: tl.constexpr, D: tl.constexpr, FAST_ROUND: tl.constexpr):
    """Store ``2·nearest_e8(q)`` of a part (c, B, 8) of a tile: blocks FIRST .. FIRST + c - 1 of the rows."""
    c: tl.constexpr = q.shape[0]
    p = _nearest_e8(q, FAST_ROUND)
    block = FIRST + tl.arange(0, c)
    offs = rows.to(tl.int64)[None, :, None] * D + (block[:, None, None] * 8 + tl.arange(0, 8)[None, None, :])
    tl.store(codes_ptr + offs, (p * 2.0).to(codes_ptr.dtype.element_ty), mask=row_ok[None, :, None])


@triton.jit
def _round_to(y, dtype: tl.constexpr):
    """float32 → ``dtype``, rounding to nearest even. bfloat16 by integer arithmetic (the same on
    the GPU; Triton's interpreter truncates instead)."""
    if dtype == tl.bfloat16:
        bits = y.to(tl.uint32, bitcast=True)
        bits = (bits + (0x7FFF + ((bits >> 16) & 1))) >> 16
        return bits.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return y.to(dtype)


@triton.jit
def e8_quantize_kernel(x_ptr, codes_ptr, steps_ptr, signs_ptr, tables_ptr, n_vectors,
                       n0, t1, t2, t3, t4,
                       D: tl.constexpr, LOG2C: tl.constexpr, SHIFT: tl.constexpr, RHT: tl.constexpr,
                       BLOCK_V: tl.constexpr, CHUNK_MAJOR: tl.constexpr, FAST_ROUND: tl.constexpr,
                       SPLIT: tl.constexpr):
    """x (n_vectors, D) → codes 2·p (n_vectors, D) in codes_ptr's integer dtype, step codes (n_vectors,)."""
    C: tl.constexpr = D // 8
    pid = tl.program_id(0)
    offs, rows, row_ok, mask = _tile_offsets(pid, n_vectors, D, BLOCK_V, CHUNK_MAJOR)
    x = _to_tile(tl.load(x_ptr + offs, mask=mask, other=0.0), CHUNK_MAJOR).to(tl.float32)

    # step code from the float64 sum of squares of x (exact squares, pairwise order)
    x64 = x.to(tl.float64)
    s = _sum_blocks(_sum8(x64 * x64), LOG2C)
    bits = s.to(tl.int64, bitcast=True)
    exponent = ((bits >> 52) & 0x7FF).to(tl.int32) - 1022
    mantissa = (bits & _MANTISSA) | _HALF_EXPONENT
    k = 4 * exponent + (n0 - 4)
    k += (mantissa >= t1).to(tl.int32) + (mantissa >= t2).to(tl.int32)
    k += (mantissa >= t3).to(tl.int32) + (mantissa >= t4).to(tl.int32)
    k = tl.where(s > 0, k, -800)
    k = tl.minimum(tl.maximum(k, -800), 800)

    # to lattice units: u · R[g mod 8] · 2^(-(g div 8) - SHIFT), g = k - 4·SHIFT
    g = k - 4 * SHIFT
    factor = tl.load(tables_ptr + 8 + (g & 7)) * _pow2(-(g >> 3) - SHIFT)
    if RHT:
        signs = tl.load(signs_ptr + tl.arange(0, C)[:, None, None] * 8 + tl.arange(0, 8)[None, None, :])
        u = _fwht(x * signs, LOG2C)
    else:
        u = x
    # E8, a part of the tile at a time (SPLIT halvings: fewer values live at once)
    q = u * factor[None, :, None]
    if SPLIT == 0:
        _e8_store(q, codes_ptr, rows, row_ok, 0, D, FAST_ROUND)
    elif SPLIT == 1:
        q0, q1 = _halves(q)
        _e8_store(q0, codes_ptr, rows, row_ok, 0, D, FAST_ROUND)
        _e8_store(q1, codes_ptr, rows, row_ok, C // 2, D, FAST_ROUND)
    else:
        q0, q1 = _halves(q)
        q00, q01 = _halves(q0)
        _e8_store(q00, codes_ptr, rows, row_ok, 0, D, FAST_ROUND)
        _e8_store(q01, codes_ptr, rows, row_ok, C // 4, D, FAST_ROUND)
        q10, q11 = _halves(q1)
        _e8_store(q10, codes_ptr, rows, row_ok, C // 2, D, FAST_ROUND)
        _e8_store(q11, codes_ptr, rows, row_ok, 3 * (C // 4), D, FAST_ROUND)
    tl.store(steps_ptr + rows, k.to(steps_ptr.dtype.element_ty), mask=row_ok)


@triton.jit
def e8_dequantize_kernel(codes_ptr, steps_ptr, out_ptr, signs_ptr, tables_ptr, n_vectors,
                         D: tl.constexpr, LOG2C: tl.constexpr, SHIFT: tl.constexpr, RHT: tl.constexpr,
                         BLOCK_V: tl.constexpr, CHUNK_MAJOR: tl.constexpr):
    """codes 2·p (n_vectors, D) and step codes (n_vectors,) → values (n_vectors, D) in out_ptr's dtype."""
    C: tl.constexpr = D // 8
    pid = tl.program_id(0)
    offs, rows, row_ok, mask = _tile_offsets(pid, n_vectors, D, BLOCK_V, CHUNK_MAJOR)
    p = _to_tile(tl.load(codes_ptr + offs, mask=mask, other=0), CHUNK_MAJOR).to(tl.float32) * 0.5
    k = tl.load(steps_ptr + rows, mask=row_ok, other=0).to(tl.int32)
    g = k - 4 * SHIFT
    step = (tl.load(tables_ptr + (g & 7)) * _pow2(g >> 3))[None, :, None]
    if RHT:
        signs = tl.load(signs_ptr + tl.arange(0, C)[:, None, None] * 8 + tl.arange(0, 8)[None, None, :])
        y = (_fwht(p, LOG2C) * step) * signs
    else:
        y = p * step
    tl.store(out_ptr + offs, _round_to(_from_tile(y, CHUNK_MAJOR), out_ptr.dtype.element_ty), mask=mask)
