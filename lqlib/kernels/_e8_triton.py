"""Triton kernels of the E8 codec (per-vector steps): quantize to lattice codes, dequantize.

Imported only through :mod:`lqlib.kernels`, which keeps Triton optional. Each kernel repeats
the CPU codec's operations (:meth:`lqlib.E8Codec._analyse` / ``_synthesise``) one for one, in
the same order and with the same IEEE operations, and is compiled without fused multiply-add
(``enable_fp_fusion=False``), so its results are the CPU codec's bits:

* the RHT is :func:`lqlib.rht.fwht` of ``signs ⊙ x``: butterfly stages h = 1, 2, 4, ..., d/2,
  each combining elements i and i + h as ``(a + b, a - b)``: the same roundings;
* the step code comes from the float64 sum of squares of ``x`` in the pairwise order of
  :func:`lqlib.lattices.pairwise_sum`, by exponent and threshold (:func:`lqlib.steps.code_constants`);
  a float32 estimate decides it unless it lies within 2^-18 of a boundary (then the program sums
  in float64);
* lattice units are ``u · R[g mod 8]·2^(-(g div 8) - shift)`` (a product, not a division:
  Triton's float32 division is not correctly rounded);
* E8 is :func:`lqlib.lattices.nearest_e8` (both cosets from one rounding, chosen by the same
  float32 terms in the same pairwise order): round half to even by adding and subtracting 1.5·2^23
  (exact for |x| < 2^21, i.e. wherever the codes fit int16), the first index of the largest and
  smallest error by tournaments; the codes come from the rounded sums' bits (no float-to-integer
  conversions);
* decoding is ``((H·p) · 2^(g/8)) · signs``, saturated to the output dtype's finite range (one
  comparison each way, :func:`lqlib.coding.codec.saturate`), then one rounding to that dtype.

A tile holds ``BLOCK_V`` vectors as a (d/8, BLOCK_V, 8) tensor: the last axis is one E8
block, the first the d/8 blocks of a vector. ``CHUNK_MAJOR`` only changes how the tile is
addressed when loaded and stored (which axis Triton spreads over threads first).
"""

from __future__ import annotations

import triton
import triton.language as tl

_MAGIC = tl.constexpr(12582912.0)  # 1.5·2^23: x + it rounds x half to even to an integer (|x| < 2^22)
_MANTISSA = tl.constexpr(0xFFFFFFFFFFFFF)  # float64 mantissa bits
_HALF_EXPONENT = tl.constexpr(0x3FE0000000000000)  # float64 exponent bits of [0.5, 1)
_BELOW = tl.constexpr(1.0 - 2.0**-18)  # bounds of the float64 sum of squares around its float32 estimate
_ABOVE = tl.constexpr(1.0 + 2.0**-18)
_TINY = tl.constexpr(2.0**-100)  # float32 sums of squares trusted between these
_HUGE = tl.constexpr(2.0**100)


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
    for _ in tl.static_range(LOG2C):
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
def _bits(v):
    """float32 → its int32 bit pattern."""
    return v.to(tl.int32, bitcast=True)


@triton.jit
def _pairs(v):
    """(c, B, n) → elements 2j and 2j + 1 along the last axis, (c, B, n/2) each: the pairs of
    :func:`lqlib.lattices.pairwise_sum`'s first level (the left one has the lower index)."""
    return tl.split(tl.reshape(v, (v.shape[0], v.shape[1], v.shape[2] // 2, 2)))


@triton.jit
def _first_extreme(err, idx, LARGEST: tl.constexpr):
    """Tournament over the last axis of (c, B, 8) in the pairwise tree: the error of largest (or
    smallest) |err|, the first such (the left, lower-index side wins ties: torch.argmax's and
    argmin's choice), with its ``idx``; (c, B) each."""
    for _ in tl.static_range(3):
        el, er = _pairs(err)
        il, ir = _pairs(idx)
        if LARGEST:
            left = tl.abs(el) >= tl.abs(er)
        else:
            left = tl.abs(el) <= tl.abs(er)
        err = tl.where(left, el, er)
        idx = tl.where(left, il, ir)
    c: tl.constexpr = err.shape[0]
    B: tl.constexpr = err.shape[1]
    return tl.reshape(err, (c, B)), tl.reshape(idx, (c, B))


@triton.jit
def _odd_parity(n):
    """(c, B, 8) int32 → (c, B): parity of the sum along the last axis (its low bit)."""
    return tl.xor_sum(n, axis=2) & 1


@triton.jit
def _nearest_e8_codes(x):
    """Codes ``2·nearest_e8(x)`` (int32 modulo 2^16: their low 8 or 16 bits) of (c, B, 8) float32
    with |x| < 2^21, bit for bit :func:`lqlib.lattices.nearest_e8`'s points.

    One rounding serves both cosets: f = round(x) half to even as ``(x + 1.5·2^23) - 1.5·2^23``,
    whose sum's bits hold f in their low bits (parities and codes without conversions); e = x - f;
    the odd coset is g = f - t, t the sign bit of e. Each coset's parity fix moves the coordinate
    found by a tournament in the pairwise tree (first largest |e|, first smallest |e|); the
    coset comes from the sign of ``Σ|e| - 2 + [Σf odd](1 - 2|e_w|) - [Σg odd]·2|e_v|``.
    """
    lane = tl.arange(0, 8)[None, None, :]
    lanes = tl.zeros(x.shape, tl.int32) + lane
    a = x + _MAGIC
    err = x - (a - _MAGIC)  # exact
    A = _bits(a)  # bits(1.5·2^23) + f: f in the low bits
    t = (_bits(err) < 0).to(tl.int32)  # sign bit: the odd coset's neighbour is g + 1/2 = f - 1/2
    # even coset: f, the first largest |e| moved towards x where Σf is odd
    par_e = _odd_parity(A)
    err_w, w_e = _first_extreme(err, lanes, True)
    # odd coset: g = f - t, the first smallest |e| moved towards x where Σg is odd
    par_o = _odd_parity(A ^ t)
    err_v, w_o = _first_extreme(err, lanes, False)
    # the nearer coset: d_even - d_odd > 0 takes the odd one
    gap = _sum8(tl.abs(err)) - 2.0
    gap = gap + tl.where(par_e != 0, 1.0 - 2.0 * tl.abs(err_w), 0.0)
    gap = gap - tl.where(par_o != 0, 2.0 * tl.abs(err_v), 0.0)
    take_odd = gap > 0.0
    # codes 2·f (+ 2·move), or 2·g + 1 (+ 2·move)
    odd = take_odd.to(tl.int32)
    n = A - t * odd[:, :, None]
    move = tl.where(take_odd, tl.where(_bits(err_v) < 0, 1, -1) * par_o, tl.where(err_w >= 0, 1, -1) * par_e)
    w = tl.where(take_odd, w_o, w_e)
    return 2 * n + tl.where(lane == w[:, :, None], (2 * move + odd)[:, :, None], odd[:, :, None])


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
def _part(v, J: tl.constexpr, SPLIT: tl.constexpr):
    """Part J of 2^SPLIT equal parts of (C, B, 8) along the first axis: blocks J·C/2^SPLIT onwards."""
    for level in tl.static_range(SPLIT):
        v0, v1 = _halves(v)
        if (J >> (SPLIT - 1 - level)) & 1:
            v = v1
        else:
            v = v0
    return v


@triton.jit
def _step_code(s, n0, t1, t2, t3, t4):
    """Step codes (B,) int32 of float64 sums of squares (B,): ``4e + n0 - 4 + #{j : m >= t_j}`` with
    ``s = m·2^e``, m in [0.5, 1) (thresholds as mantissa bit patterns), -800 for 0, clamped to ±800."""
    bits = s.to(tl.int64, bitcast=True)
    exponent = ((bits >> 52) & 0x7FF).to(tl.int32) - 1022
    mantissa = (bits & _MANTISSA) | _HALF_EXPONENT
    k = 4 * exponent + (n0 - 4)
    k += (mantissa >= t1).to(tl.int32) + (mantissa >= t2).to(tl.int32)
    k += (mantissa >= t3).to(tl.int32) + (mantissa >= t4).to(tl.int32)
    k = tl.where(s > 0, k, -800)
    return tl.minimum(tl.maximum(k, -800), 800)


@triton.jit
def _e8_store(q, codes_ptr, rows, row_ok, FIRST: tl.constexpr, D: tl.constexpr):
    """Store ``2·nearest_e8(q)`` of a part (c, B, 8) of a tile: blocks FIRST .. FIRST + c - 1 of the rows."""
    c: tl.constexpr = q.shape[0]
    codes = _nearest_e8_codes(q)
    block = FIRST + tl.arange(0, c)
    offs = rows.to(tl.int64)[None, :, None] * D + (block[:, None, None] * 8 + tl.arange(0, 8)[None, None, :])
    tl.store(codes_ptr + offs, codes.to(codes_ptr.dtype.element_ty), mask=row_ok[None, :, None])


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
def _saturate(y, dtype: tl.constexpr):
    """float32 ``y`` clamped to ± the largest finite value of ``dtype`` (±Inf included), as the codec's
    :func:`lqlib.coding.codec.saturate` does before its rounding."""
    if dtype == tl.float16:
        limit = 65504.0
    elif dtype == tl.bfloat16:
        limit = 3.3895313892515355e38
    else:
        limit = 3.4028234663852886e38
    return tl.minimum(tl.maximum(y, -limit), limit)


@triton.jit
def e8_quantize_kernel(
    x_ptr,
    codes_ptr,
    steps_ptr,
    signs_ptr,
    tables_ptr,
    n_vectors,
    n0,
    t1,
    t2,
    t3,
    t4,
    D: tl.constexpr,
    LOG2C: tl.constexpr,
    SHIFT: tl.constexpr,
    RHT: tl.constexpr,
    BLOCK_V: tl.constexpr,
    CHUNK_MAJOR: tl.constexpr,
    SPLIT: tl.constexpr,
):
    """x (n_vectors, D) → codes 2·p (n_vectors, D) in codes_ptr's integer dtype, step codes (n_vectors,)."""
    C: tl.constexpr = D // 8
    pid = tl.program_id(0)
    offs, rows, row_ok, mask = _tile_offsets(pid, n_vectors, D, BLOCK_V, CHUNK_MAJOR)
    x = _to_tile(tl.load(x_ptr + offs, mask=mask, other=0.0), CHUNK_MAJOR).to(tl.float32)

    # step code of the float64 sum of squares of x in pairwise order. Estimated from the float32
    # sum (relative error below 2^-20: exact squares of float16/bfloat16, 7 levels of rounding);
    # the code is monotone in the sum, so where the codes at s·(1 ± 2^-18) agree that is the
    # code; else (rare: near a boundary, or a sum out of float32's comfortable range) the
    # program computes the float64 sum.
    s32 = _sum_blocks(_sum8(x * x), LOG2C)
    s_est = s32.to(tl.float64)
    k = _step_code(s_est * _BELOW, n0, t1, t2, t3, t4)
    unsure = (k != _step_code(s_est * _ABOVE, n0, t1, t2, t3, t4)) | (s32 < _TINY) | (s32 > _HUGE)
    if tl.max(unsure.to(tl.int32), axis=0) != 0:
        x64 = x.to(tl.float64)
        k = _step_code(_sum_blocks(_sum8(x64 * x64), LOG2C), n0, t1, t2, t3, t4)

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
    for j in tl.static_range(1 << SPLIT):
        _e8_store(_part(q, j, SPLIT), codes_ptr, rows, row_ok, j * (C >> SPLIT), D)
    tl.store(steps_ptr + rows, k.to(steps_ptr.dtype.element_ty), mask=row_ok)


@triton.jit
def e8_dequantize_kernel(
    codes_ptr,
    steps_ptr,
    out_ptr,
    signs_ptr,
    tables_ptr,
    n_vectors,
    D: tl.constexpr,
    LOG2C: tl.constexpr,
    SHIFT: tl.constexpr,
    RHT: tl.constexpr,
    BLOCK_V: tl.constexpr,
    CHUNK_MAJOR: tl.constexpr,
):
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
    y = _saturate(y, out_ptr.dtype.element_ty)
    tl.store(out_ptr + offs, _round_to(_from_tile(y, CHUNK_MAJOR), out_ptr.dtype.element_ty), mask=mask)
