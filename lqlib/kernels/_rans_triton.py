"""Triton kernels of the interleaved multi-lane rANS coder (format: :mod:`lqlib.rans_lanes`).

Imported only through :mod:`lqlib.kernels.rans`, which keeps Triton optional. One program codes
``BLOCK`` lanes (global lane ``g`` = page ``g // L``, lane ``g % L``), one lane per thread: the lane
axis is the vector axis, every step of the loop codes one symbol of every lane. The state is
uint32 (``[2^16, 2^32)``); indices are int32 (the wrappers check the sizes), except the encoder's
scratch row base.

* :func:`rans_decode_kernel`: words (int16 view of the page bytes), per-lane word start and count
  → codes ``2·p`` (written as int32 words of 4 codes, one 8-byte store per block and thread, adjacent
  across threads) or symbols (int32, 9 per block), and a per-lane error flag (1 when the lane did not
  end in the state 2^16 having read exactly its words).
* :func:`rans_encode_kernel`: codes (int32 view, 8 per block) or symbols → each lane's words
  written backwards from the end of its scratch row (so they end up in decoding order, the two state
  words first), and the lane's word count.
* :func:`rans_pack_kernel`: copies each lane's words from its scratch row to its place in the
  pages (the offsets come from a prefix sum of the counts in torch).
"""

from __future__ import annotations

import triton
import triton.language as tl

_LOWER = tl.constexpr(65536)
_SLOTS = tl.constexpr(4096)  # 2^PRECISION


@triton.jit
def _renorm(x, ptr, end, bad, need, words_ptr):
    """Read one word into lanes whose state fell below 2^16 (those in ``need``)."""
    need = need & (x < _LOWER)
    ok = need & (ptr < end)
    w = tl.load(words_ptr + ptr, mask=ok, other=0).to(tl.uint16, bitcast=True).to(tl.uint32)
    x = tl.where(need, (x << 16) | w, x)
    bad = bad | (need & (ptr >= end))
    return x, ptr + need.to(tl.int32), bad


@triton.jit
def _decode_symbol(x, ptr, end, bad, live, table, tabs, words_ptr, LOOKUP: tl.constexpr):
    """One symbol of table ``table`` (int32 per lane); ``tabs`` = (dec, dec_sym, enc, bucket, A).

    LOOKUP 0: one gather in the packed slot table (16 KB a table). 1: the symbol in a byte slot
    table (4 KB), then its ``freq << 16 | cum`` (a few lines). 2: the bucket table (1 KB) of 16-slot
    buckets, and the packed slot table only for lanes whose bucket straddles two symbols (9% of slots
    at 4 bits). Fewer cache lines per warp and gather in 1 and 2, a dependent load more in latency.
    """
    dec_ptr, sym_ptr, enc_ptr, bucket_ptr, A = tabs
    slot = (x & 4095).to(tl.int32)
    if LOOKUP == 1:
        sym = tl.load(sym_ptr + table * _SLOTS + slot).to(tl.int32)
        e = tl.load(enc_ptr + table * A + sym)
        freq = (e >> 16).to(tl.uint32)
        x = tl.where(live, freq * (x >> 12) + slot.to(tl.uint32) - (e & 65535).to(tl.uint32), x)
    else:
        if LOOKUP == 2:
            b = tl.load(bucket_ptr + table * (_SLOTS // 16) + (slot >> 4))
            mixed = ((b >> 24) & 255) == 255
            e = tl.load(dec_ptr + table * _SLOTS + slot, mask=mixed & live, other=0)
            e = tl.where(mixed, e, b + slot - 2 * (b & 4095))  # sym << 24 | (freq - 1) << 12 | (slot - cum)
        else:
            e = tl.load(dec_ptr + table * _SLOTS + slot)
        sym = (e >> 24) & 255
        freq = (((e >> 12) & 4095) + 1).to(tl.uint32)
        x = tl.where(live, freq * (x >> 12) + (e & 4095).to(tl.uint32), x)
    x, ptr, bad = _renorm(x, ptr, end, bad, live, words_ptr)
    return sym, x, ptr, bad


@triton.jit
def _decode_escape(x, ptr, end, bad, esc, value, words_ptr):
    """Four uniform bytes, least significant first: the raw value ``v + 2^31``."""
    raw = tl.zeros_like(x)
    for b in tl.static_range(4):
        slot = x & 4095
        x = tl.where(esc, 16 * (x >> 12) + (slot & 15), x)
        raw = raw | ((slot >> 4) << (8 * b))
        x, ptr, bad = _renorm(x, ptr, end, bad, esc, words_ptr)
    return tl.where(esc, (raw ^ 0x80000000).to(tl.int32, bitcast=True), value), x, ptr, bad


@triton.jit
def _pack4(a, b, c, d):
    return (a & 255) | ((b & 255) << 8) | ((c & 255) << 16) | (d << 24)


@triton.jit
def rans_decode_kernel(
    words_ptr,
    start_ptr,
    count_ptr,
    dec_ptr,
    sym_ptr,
    enc_ptr,
    bucket_ptr,
    out_ptr,
    err_ptr,
    n_lanes_total,
    r_free,
    r_half,
    A,
    L: tl.constexpr,
    NB: tl.constexpr,
    K: tl.constexpr,
    BLOCK: tl.constexpr,
    TO_SYMBOLS: tl.constexpr,
    LOOKUP: tl.constexpr,
):
    g = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    lane_ok = g < n_lanes_total
    page = g // L
    lane = g % L
    start = tl.load(start_ptr + g, mask=lane_ok, other=0)
    end = start + tl.load(count_ptr + g, mask=lane_ok, other=0)
    has_state = lane_ok & (end - start >= 2)
    hi = tl.load(words_ptr + start, mask=has_state, other=1).to(tl.uint16, bitcast=True).to(tl.uint32)
    lo = tl.load(words_ptr + start + 1, mask=has_state, other=0).to(tl.uint16, bitcast=True).to(tl.uint32)
    x = (hi << 16) | lo
    ptr = start + 2
    bad = lane_ok & ((x < _LOWER) | (end - start < 2))
    block0 = page * NB + lane
    zero = tl.zeros_like(lane)
    tabs = (dec_ptr, sym_ptr, enc_ptr, bucket_ptr, A)
    for j in range(K):
        i = j * L + lane
        live = lane_ok & (i < NB)
        s0, x, ptr, bad = _decode_symbol(x, ptr, end, bad, live, zero, tabs, words_ptr, LOOKUP)
        c = s0 & 1
        tf = 1 + c
        s1, x, ptr, bad = _decode_symbol(x, ptr, end, bad, live, tf, tabs, words_ptr, LOOKUP)
        s2, x, ptr, bad = _decode_symbol(x, ptr, end, bad, live, tf, tabs, words_ptr, LOOKUP)
        s3, x, ptr, bad = _decode_symbol(x, ptr, end, bad, live, tf, tabs, words_ptr, LOOKUP)
        s4, x, ptr, bad = _decode_symbol(x, ptr, end, bad, live, tf, tabs, words_ptr, LOOKUP)
        s5, x, ptr, bad = _decode_symbol(x, ptr, end, bad, live, tf, tabs, words_ptr, LOOKUP)
        s6, x, ptr, bad = _decode_symbol(x, ptr, end, bad, live, tf, tabs, words_ptr, LOOKUP)
        s7, x, ptr, bad = _decode_symbol(x, ptr, end, bad, live, tf, tabs, words_ptr, LOOKUP)
        s8, x, ptr, bad = _decode_symbol(x, ptr, end, bad, live, tf + 2, tabs, words_ptr, LOOKUP)
        ef = 2 * r_free + 1
        eh = 2 * r_half + 1
        v1 = s1 - r_free
        v2 = s2 - r_free
        v3 = s3 - r_free
        v4 = s4 - r_free
        v5 = s5 - r_free
        v6 = s6 - r_free
        v7 = s7 - r_free
        v8 = s8 - r_half
        any_esc = live & (
            (s1 == ef) | (s2 == ef) | (s3 == ef) | (s4 == ef) | (s5 == ef) | (s6 == ef) | (s7 == ef) | (s8 == eh)
        )
        if tl.max(any_esc.to(tl.int32), axis=0) > 0:  # rare: one uniform branch per block
            v1, x, ptr, bad = _decode_escape(x, ptr, end, bad, live & (s1 == ef), v1, words_ptr)
            v2, x, ptr, bad = _decode_escape(x, ptr, end, bad, live & (s2 == ef), v2, words_ptr)
            v3, x, ptr, bad = _decode_escape(x, ptr, end, bad, live & (s3 == ef), v3, words_ptr)
            v4, x, ptr, bad = _decode_escape(x, ptr, end, bad, live & (s4 == ef), v4, words_ptr)
            v5, x, ptr, bad = _decode_escape(x, ptr, end, bad, live & (s5 == ef), v5, words_ptr)
            v6, x, ptr, bad = _decode_escape(x, ptr, end, bad, live & (s6 == ef), v6, words_ptr)
            v7, x, ptr, bad = _decode_escape(x, ptr, end, bad, live & (s7 == ef), v7, words_ptr)
            v8, x, ptr, bad = _decode_escape(x, ptr, end, bad, live & (s8 == eh), v8, words_ptr)
        blk = block0 + j * L
        if TO_SYMBOLS:
            o = out_ptr + blk * 9
            tl.store(o, c, mask=live)
            tl.store(o + 1, v1, mask=live)
            tl.store(o + 2, v2, mask=live)
            tl.store(o + 3, v3, mask=live)
            tl.store(o + 4, v4, mask=live)
            tl.store(o + 5, v5, mask=live)
            tl.store(o + 6, v6, mask=live)
            tl.store(o + 7, v7, mask=live)
            tl.store(o + 8, v8, mask=live)
        else:
            parity = (v1 + v2 + v3 + v4 + v5 + v6 + v7) & 1
            z7 = 2 * v8 + parity
            w0 = _pack4(2 * v1 + c, 2 * v2 + c, 2 * v3 + c, 2 * v4 + c)
            w1 = _pack4(2 * v5 + c, 2 * v6 + c, 2 * v7 + c, 2 * z7 + c)
            tl.store(out_ptr + 2 * blk, w0, mask=live)
            tl.store(out_ptr + 2 * blk + 1, w1, mask=live)
    bad = bad | (x != _LOWER) | (ptr != end)
    tl.store(err_ptr + g, bad.to(tl.int32), mask=lane_ok)


@triton.jit
def _push(x, pos, live, entry, row_ptr):
    """Encode one symbol (``entry`` = freq << 16 | cum) in lanes ``live``; words go to ``row_ptr[pos - 1]``."""
    freq = (entry >> 16).to(tl.uint32)
    cum = (entry & 65535).to(tl.uint32)
    emit = live & (x >= (freq << 20))
    pos = pos - emit.to(tl.int32)
    tl.store(row_ptr + pos, (x & 65535).to(tl.int32).to(tl.int16), mask=emit)
    x = tl.where(emit, x >> 16, x)
    f = tl.where(live, freq, 1)
    q = x // f
    x = tl.where(live, (q << 12) + (x - q * f) + cum, x)
    return x, pos


@triton.jit
def _push_escape(x, pos, esc, value, row_ptr):
    raw = value.to(tl.uint32, bitcast=True) ^ 0x80000000
    for b in tl.static_range(4):
        byte = (raw >> (8 * (3 - b))) & 255
        x, pos = _push(x, pos, esc, ((16 << 16) | (byte << 4)).to(tl.int32), row_ptr)
    return x, pos


@triton.jit
def _index(v, r):
    """Table index of value ``v`` in a table of radius ``r`` (escape ``2r + 1``)."""
    idx = v + r
    esc = (idx < 0) | (idx > 2 * r)
    return tl.where(esc, 2 * r + 1, idx), esc


@triton.jit
def _byte(w, k: tl.constexpr):
    """Signed byte k of int32 words w."""
    return (w << (24 - 8 * k)) >> 24


@triton.jit
def rans_encode_kernel(
    in_ptr,
    enc_ptr,
    scratch_ptr,
    count_ptr,
    n_lanes_total,
    r_free,
    r_half,
    A,
    L: tl.constexpr,
    NB: tl.constexpr,
    K: tl.constexpr,
    CAP: tl.constexpr,
    BLOCK: tl.constexpr,
    FROM_SYMBOLS: tl.constexpr,
):
    g = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    lane_ok = g < n_lanes_total
    page = g // L
    lane = g % L
    row_ptr = scratch_ptr + g.to(tl.int64) * CAP
    pos = tl.full([BLOCK], CAP, tl.int32)
    x = tl.full([BLOCK], 65536, tl.uint32)
    block0 = page * NB + lane
    for jj in range(K):
        j = K - 1 - jj
        i = j * L + lane
        live = lane_ok & (i < NB)
        blk = block0 + j * L
        if FROM_SYMBOLS:
            src = in_ptr + blk * 9
            c = tl.load(src, mask=live, other=0) & 1
            z0 = tl.load(src + 1, mask=live, other=0)
            z1 = tl.load(src + 2, mask=live, other=0)
            z2 = tl.load(src + 3, mask=live, other=0)
            z3 = tl.load(src + 4, mask=live, other=0)
            z4 = tl.load(src + 5, mask=live, other=0)
            z5 = tl.load(src + 6, mask=live, other=0)
            z6 = tl.load(src + 7, mask=live, other=0)
            h = tl.load(src + 8, mask=live, other=0)
        else:
            w0 = tl.load(in_ptr + 2 * blk, mask=live, other=0)
            w1 = tl.load(in_ptr + 2 * blk + 1, mask=live, other=0)
            c = w0 & 1
            z0 = _byte(w0, 0) >> 1
            z1 = _byte(w0, 1) >> 1
            z2 = _byte(w0, 2) >> 1
            z3 = _byte(w0, 3) >> 1
            z4 = _byte(w1, 0) >> 1
            z5 = _byte(w1, 1) >> 1
            z6 = _byte(w1, 2) >> 1
            h = _byte(w1, 3) >> 2
        i0, e0 = _index(z0, r_free)
        i1, e1 = _index(z1, r_free)
        i2, e2 = _index(z2, r_free)
        i3, e3 = _index(z3, r_free)
        i4, e4 = _index(z4, r_free)
        i5, e5 = _index(z5, r_free)
        i6, e6 = _index(z6, r_free)
        i7, e7 = _index(h, r_half)
        any_esc = live & (e0 | e1 | e2 | e3 | e4 | e5 | e6 | e7)
        if tl.max(any_esc.to(tl.int32), axis=0) > 0:  # rare: escaped values go last in a block, so first here
            x, pos = _push_escape(x, pos, live & e7, h, row_ptr)
            x, pos = _push_escape(x, pos, live & e6, z6, row_ptr)
            x, pos = _push_escape(x, pos, live & e5, z5, row_ptr)
            x, pos = _push_escape(x, pos, live & e4, z4, row_ptr)
            x, pos = _push_escape(x, pos, live & e3, z3, row_ptr)
            x, pos = _push_escape(x, pos, live & e2, z2, row_ptr)
            x, pos = _push_escape(x, pos, live & e1, z1, row_ptr)
            x, pos = _push_escape(x, pos, live & e0, z0, row_ptr)
        tf = (1 + c) * A
        x, pos = _push(x, pos, live, tl.load(enc_ptr + tf + 2 * A + i7, mask=live, other=1 << 16), row_ptr)
        x, pos = _push(x, pos, live, tl.load(enc_ptr + tf + i6, mask=live, other=1 << 16), row_ptr)
        x, pos = _push(x, pos, live, tl.load(enc_ptr + tf + i5, mask=live, other=1 << 16), row_ptr)
        x, pos = _push(x, pos, live, tl.load(enc_ptr + tf + i4, mask=live, other=1 << 16), row_ptr)
        x, pos = _push(x, pos, live, tl.load(enc_ptr + tf + i3, mask=live, other=1 << 16), row_ptr)
        x, pos = _push(x, pos, live, tl.load(enc_ptr + tf + i2, mask=live, other=1 << 16), row_ptr)
        x, pos = _push(x, pos, live, tl.load(enc_ptr + tf + i1, mask=live, other=1 << 16), row_ptr)
        x, pos = _push(x, pos, live, tl.load(enc_ptr + tf + i0, mask=live, other=1 << 16), row_ptr)
        x, pos = _push(x, pos, live, tl.load(enc_ptr + c, mask=live, other=1 << 16), row_ptr)
    pos = pos - 2
    tl.store(row_ptr + pos, (x >> 16).to(tl.int32).to(tl.int16), mask=lane_ok)
    tl.store(row_ptr + pos + 1, (x & 65535).to(tl.int32).to(tl.int16), mask=lane_ok)
    tl.store(count_ptr + g, CAP - pos, mask=lane_ok)


@triton.jit
def rans_pack_kernel(
    scratch_ptr, count_ptr, dst_ptr, out_ptr, n_lanes_total, CAP: tl.constexpr, BLOCK: tl.constexpr, CHUNK: tl.constexpr
):
    """Lane g's ``count`` words at the end of its scratch row → ``out[dst[g] :]``; a (BLOCK, CHUNK) tile per step."""
    g = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    lane_ok = g < n_lanes_total
    count = tl.load(count_ptr + g, mask=lane_ok, other=0)
    dst = tl.load(dst_ptr + g, mask=lane_ok, other=0)
    src = g.to(tl.int64) * CAP + (CAP - count)
    most = tl.max(count, axis=0)
    cols = tl.arange(0, CHUNK)
    for k0 in range(0, most, CHUNK):
        k = k0 + cols[None, :]
        m = k < count[:, None]
        w = tl.load(scratch_ptr + src[:, None] + k, mask=m)
        tl.store(out_ptr + dst[:, None] + k, w, mask=m)
