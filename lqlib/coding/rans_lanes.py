"""Interleaved multi-lane rANS: the E8 symbols' entropy coder that a GPU encodes and decodes in parallel.

The CPU coder of :mod:`lqlib.rans` writes one sequential stack per tensor; this module defines a
format that thousands of GPU threads code at once, one *lane* per thread, and that numpy codes
the same way (vectorised over every lane of every page, a loop over positions only), so that
streams made on either side decode exactly on the other (the Triton kernels are
:mod:`lqlib.kernels.rans`).

Format ("LQRL" version 1)
-------------------------
**Tables.** Five tables per rate ``b``, quantized from :func:`lqlib.entropy_model.gaussian_symbol_model`
to ``M = 2^12`` (:data:`PRECISION`): table 0 is the coset bit, 1 + c the free symbols z0..z6
given the coset c, 3 + c the symbol floor(z7/2) given c. A free (half) table covers the values
``[-r, r]`` with ``r = r_free`` (``r_half``) the smallest radius whose outside mass in the model is at
most 2^-18 (at most :data:`MAX_RADIUS`), index ``v + r``; index ``2r + 1`` is the escape, which
takes the mass outside. Frequencies are ``max(1, round(p·M))`` with the rounding surplus put on
the most probable symbol (first on ties): integer, deterministic, every symbol (escape included)
at least 1. Decoding uses a slot table of M entries per table, packed in an int32 as
``symbol << 24 | (freq − 1) << 12 | (slot − cum)``.

The tables hold at most 254 symbols and 2^12 slots: they suit rates up to about 6 bits/dim
(3–6 bits: 0.001–0.016 bit/symbol over the model's entropy); above, more and more values escape.

**Coder.** rANS with a 32-bit state ``x ∈ [2^16, 2^32)`` and 16-bit renormalisation words (at most
one word per coded symbol). Encoding symbol ``(f, c)``: if ``x ≥ f·2^20``, emit ``x mod 2^16`` and
``x ← x div 2^16``; then ``x ← (x div f)·M + x mod f + c``. Decoding: ``s = x mod M`` finds the
symbol, ``x ← f·(x div M) + s − c``, and if ``x < 2^16`` then ``x ← x·2^16 + next word``. An escaped
value ``v`` (int32) follows as four uniform sub-symbols (frequency 16, cumulative ``16·byte``), the
bytes of ``(v + 2^31) mod 2^32`` from the least significant: a lane needs nothing outside itself.

**Lanes.** A page holds ``n_blocks`` E8 blocks (9 symbols each, :mod:`lqlib.symbols`) coded by
``n_lanes`` independent coders: block ``i`` goes to lane ``i mod n_lanes`` at position
``i div n_lanes``. With this striping, the threads of a warp code adjacent blocks at every step:
the decoder writes its output (8 bytes of codes per block and thread) with fully coalesced
stores, and the encoder reads its input the same way. The words are read from each lane's own
run (below): a 2-byte gather per thread, from a cache line that then serves the lane's next ~60
words (a lane reads ~128 bytes per 32 blocks at 4 bits/dim), so it stays in L1; a warp-interleaved
word order would make these reads coalesced too, at the price of a prefix sum across the warp
per symbol, and is not used. The slot-table gathers (random slots, 16 KB a table) cost more L1
traffic than the word reads. In decoding order a lane codes, for each of its blocks: the coset bit, the 8
symbols ``z0..z6, floor(z7/2)``, then the escaped values among those 8 in order. A lane's words
are ``[x_hi, x_lo, w...]``: its final encoder state (where decoding starts), then the
renormalisation words in the order the decoder reads them. Decoding must end in the state 2^16
having read exactly the lane's words: a decoder checks both (besides the header and the lengths).

**Page bytes** (little-endian): a 20-byte header ``b"LQRL"``, version u8 (1), precision u8 (12),
``n_lanes`` u16, ``n_blocks`` u32, the rate ``b`` float64; then ``n_lanes`` word counts (u16, state
words included); then the lanes' words, lane 0 first. Pages share nothing but the tables (which
depend on ``b`` only): each decodes alone.

Codes ``2·p`` (what the Triton quantizer writes and attention reads) map to symbols and back with
:func:`codes_to_symbols` / :func:`symbols_to_codes` (``c = code0 mod 2``, ``z = code >> 1``,
``floor(z7/2) = code7 >> 2``).
"""

from __future__ import annotations

import functools
import struct
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ..errors import CorruptStreamError, FormatError, InputError
from .codec import DEFAULT_MAX_NUMEL
from .entropy_model import gaussian_symbol_model

__all__ = [
    "PRECISION",
    "MAX_RADIUS",
    "DEFAULT_LANES",
    "HEADER_BYTES",
    "VERSION",
    "MAGIC",
    "LaneTables",
    "lane_tables",
    "page_header",
    "max_lane_words",
    "encode_pages",
    "decode_pages",
    "encode_codes",
    "decode_codes",
    "codes_to_symbols",
    "symbols_to_codes",
    "page_info",
]

PRECISION = 12
MAX_RADIUS = 126  # symbol indices fit 8 bits in the slot table
DEFAULT_LANES = 32  # per page: 0.025 bit/dim over constriction at 8192 blocks a page (64: 0.044)
MAGIC = b"LQRL"
VERSION = 1
_HEADER = struct.Struct("<4sBBHId")
HEADER_BYTES = _HEADER.size  # 20
BUCKET_SLOTS = 16  # slots per entry of the decoder's bucket table
MIN_BITS, MAX_BITS = 0.5, 10.0  # the codec's range (lqlib.codec); the rate in a header must lie in it
_TAIL_MASS = 2.0**-18
_LOWER = 1 << 16  # the state's lower bound (and the initial / final state)
_ESCAPE_OFFSET = 1 << 31
_MAX_LANE_WORDS = 0xFFFF


@dataclass(frozen=True, eq=False)
class LaneTables:
    """Quantized tables of one rate (see the module docstring).

    Attributes
    ----------
    bits : the rate the model was made for.
    r_free, r_half : radii of the free and half tables (escape index ``2r + 1``).
    freq, cum : shape (5, A) int32, ``A = 2·max(r_free, r_half) + 2``; unused entries have freq 0.
    enc : shape (5, A) int32, ``freq << 16 | cum`` (what the GPU encoder reads).
    dec : shape (5, M) int32, ``symbol << 24 | (freq − 1) << 12 | (slot − cum)`` per slot.
    dec_sym : shape (5, M) uint8, the symbol of each slot (a smaller table for two-level lookups).
    bucket : shape (5, M / 16) int32, per bucket of 16 slots ``symbol << 24 | (freq − 1) << 12 | cum``
        where the bucket lies in one symbol's slots, else ``255 << 24`` (look the slot up in ``dec``).
    """

    bits: float
    r_free: int
    r_half: int
    freq: np.ndarray
    cum: np.ndarray
    enc: np.ndarray
    dec: np.ndarray
    dec_sym: np.ndarray
    bucket: np.ndarray

    def radius(self, table: int) -> int:
        return self.r_free if table in (1, 2) else self.r_half


def _quantize(p: np.ndarray) -> np.ndarray:
    """Probabilities → integer frequencies summing to M, each at least 1: ``max(1, round(p·M))`` with
    the surplus on the most probable symbol; where that would leave it below 1 (flat tables, above
    about 6.5 bits/dim), ``1 + floor(p·(M − n))`` with the remainder there instead."""
    m = 1 << PRECISION
    top = int(np.argmax(p))
    f = np.maximum(1, np.floor(p * m + 0.5)).astype(np.int64)
    f[top] += m - int(f.sum())
    if f[top] < 1:
        f = 1 + np.floor(p * (m - p.size)).astype(np.int64)
        f[top] += m - int(f.sum())
    return f


def _trim_radius(tables: np.ndarray, radius: int) -> int:
    values = np.abs(np.arange(-radius, radius + 1))
    for r in range(1, radius + 1):
        if max(float(t[:-1][values > r].sum()) for t in tables) <= _TAIL_MASS:
            return min(r, MAX_RADIUS)
    return min(radius, MAX_RADIUS)


@functools.lru_cache(maxsize=32)
def lane_tables(bits: float) -> LaneTables:
    """The quantized tables of rate ``bits`` (cached; the same on every machine: integer results
    of float64 operations on the model's float64 tables)."""
    model = gaussian_symbol_model(bits)
    radius = model.radius
    r_free = _trim_radius(model.free, radius)
    r_half = _trim_radius(model.half, radius)
    width = 2 * max(r_free, r_half) + 2
    freq = np.zeros((5, width), dtype=np.int64)
    freq[0, :2] = _quantize(model.coset)
    for t, (source, r) in enumerate(
        [(model.free[0], r_free), (model.free[1], r_free), (model.half[0], r_half), (model.half[1], r_half)], start=1
    ):
        core = source[radius - r : radius + r + 1]
        escape = source[-1] + (source[:-1].sum() - core.sum())
        freq[t, : 2 * r + 2] = _quantize(np.append(core, escape))
    cum = np.concatenate([np.zeros((5, 1), np.int64), np.cumsum(freq, axis=1)[:, :-1]], axis=1)
    cum[freq == 0] = 0
    m = 1 << PRECISION
    dec = np.empty((5, m), dtype=np.int64)
    for t in range(5):  # five tables, not a data loop
        sym = np.repeat(np.arange(width), freq[t])
        slots = np.arange(m)
        dec[t] = (sym << 24) | ((freq[t][sym] - 1) << 12) | (slots - cum[t][sym])
    enc = (freq << 16) | cum
    as32 = lambda a: np.ascontiguousarray(a.astype(np.int64).astype(np.uint32).view(np.int32))  # noqa: E731
    slot_sym = (dec >> 24).reshape(5, -1, BUCKET_SLOTS)
    first = slot_sym[:, :, 0]
    whole = np.all(slot_sym == first[:, :, None], axis=2)
    fc = np.take_along_axis(freq, first, axis=1)
    cc = np.take_along_axis(cum, first, axis=1)
    bucket = np.where(whole, (first << 24) | ((fc - 1) << 12) | cc, 255 << 24)
    return LaneTables(
        float(bits),
        r_free,
        r_half,
        as32(freq),
        as32(cum),
        as32(enc),
        as32(dec),
        np.ascontiguousarray(slot_sym.reshape(5, m).astype(np.uint8)),
        as32(bucket),
    )


def page_header(n_lanes: int, n_blocks: int, bits: float) -> bytes:
    """The 20 header bytes of a page."""
    return _HEADER.pack(MAGIC, VERSION, PRECISION, n_lanes, n_blocks, float(bits))


def max_lane_words(n_blocks: int, n_lanes: int) -> int:
    """An upper bound on a lane's word count: 2 state words, then at most one word per coded
    symbol: 9 per block and 4 per escaped value (at most 8 per block)."""
    return 2 + 41 * (-(-n_blocks // n_lanes))


def _check_layout(n_blocks: int, n_lanes: int) -> None:
    if not 1 <= n_lanes <= 0xFFFF:
        raise InputError(f"n_lanes must be in [1, 65535], got {n_lanes}")
    if n_blocks < 1:
        raise InputError("a page needs at least one block")
    if max_lane_words(n_blocks, n_lanes) > _MAX_LANE_WORDS:
        raise InputError(f"{n_blocks} blocks over {n_lanes} lanes: a lane could exceed 65535 words; use more lanes")


# ---------------------------------------------------------------------------------------------
# symbols <-> codes


def codes_to_symbols(codes: np.ndarray) -> np.ndarray:
    """Codes ``2·p`` (..., 8k) of E8 points → symbols (..., k, 9) int32.

    Raises InputError when a block is not an E8 point (mixed parities or an odd sum).
    """
    c = np.asarray(codes).astype(np.int32).reshape(*np.shape(codes)[:-1], -1, 8)
    coset = c[..., 0] & 1
    if np.any((c & 1) != coset[..., None]):
        raise InputError("codes are not E8 points: a block mixes integer and half-integer coordinates")
    z = c >> 1
    if np.any(z.sum(axis=-1) & 1):
        raise InputError("codes are not E8 points: a block's integer parts have an odd sum")
    return np.concatenate([coset[..., None], z[..., :7], z[..., 7:] >> 1], axis=-1).astype(np.int32)


def symbols_to_codes(symbols: np.ndarray, dtype=np.int8) -> np.ndarray:
    """Symbols (..., k, 9) → codes ``2·p`` (..., 8k) in ``dtype`` (wrapping if they do not fit)."""
    s = np.asarray(symbols).astype(np.int64)
    coset = s[..., :1]
    free = s[..., 1:8]
    z7 = 2 * s[..., 8:] + (free.sum(axis=-1, keepdims=True) & 1)
    codes = 2 * np.concatenate([free, z7], axis=-1) + coset
    return codes.reshape(*s.shape[:-2], -1).astype(dtype)


# ---------------------------------------------------------------------------------------------
# encoder


def _lane_major(symbols: np.ndarray, n_lanes: int) -> tuple[np.ndarray, np.ndarray]:
    """(P, nb, 9) → (P·L, K, 9) with block i at lane i mod L, position i div L; and the valid mask (P·L, K)."""
    p, nb, _ = symbols.shape
    k = -(-nb // n_lanes)
    padded = np.zeros((p, k * n_lanes, 9), dtype=np.int64)
    padded[:, :nb] = symbols
    valid = np.zeros((p, k * n_lanes), dtype=bool)
    valid[:, :nb] = True
    lanes = padded.reshape(p, k, n_lanes, 9).transpose(0, 2, 1, 3).reshape(p * n_lanes, k, 9)
    return lanes, valid.reshape(p, k, n_lanes).transpose(0, 2, 1).reshape(p * n_lanes, k)


def _indices(lanes: np.ndarray, tables: LaneTables) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Table per symbol (N, K, 9), table index per symbol, escape flags."""
    coset = lanes[..., 0]
    table = np.empty(lanes.shape, dtype=np.int64)
    table[..., 0] = 0
    table[..., 1:8] = (1 + coset)[..., None]
    table[..., 8] = 3 + coset
    radius = np.full(9, tables.r_free)
    radius[8] = tables.r_half
    index = lanes + radius
    index[..., 0] = coset
    escape = (index < 0) | (index > 2 * radius)
    escape[..., 0] = False
    index = np.where(escape, 2 * radius + 1, index)
    return table, index, escape


def encode_pages(symbols: np.ndarray, bits: float, n_lanes: int = DEFAULT_LANES) -> list[bytes]:
    """Encode pages of symbols, each page on its own (CPU, numpy).

    Parameters
    ----------
    symbols : shape (n_pages, n_blocks, 9), integer (int32 range), coset bit 0 or 1: the
        parity-aware symbols of each page's E8 blocks, in page order.
    bits : the rate that selects the tables (stored in each page's header).
    n_lanes : independent coders per page (block i → lane i mod n_lanes).

    Returns
    -------
    list of ``n_pages`` bytes objects, one page each (format in the module docstring).
    """
    symbols = np.asarray(symbols)
    if symbols.ndim != 3 or symbols.shape[2] != 9 or not np.issubdtype(symbols.dtype, np.integer):
        raise InputError(f"expected integer symbols of shape (pages, blocks, 9), got {symbols.shape} {symbols.dtype}")
    n_pages, n_blocks, _ = symbols.shape
    _check_layout(n_blocks, n_lanes)
    if n_pages == 0:
        return []
    if np.any((symbols[..., 0] != 0) & (symbols[..., 0] != 1)):
        raise InputError("coset bits must be 0 or 1")
    if symbols.min() < -(1 << 31) or symbols.max() >= 1 << 31:
        raise InputError("symbols must fit int32")
    if not MIN_BITS <= bits <= MAX_BITS:
        raise InputError(f"bits must lie in [{MIN_BITS}, {MAX_BITS}], got {bits}")
    tables = lane_tables(bits)
    lanes, valid = _lane_major(symbols, n_lanes)
    table, index, escape = _indices(lanes, tables)
    freq = tables.freq.astype(np.int64)[table, index]
    cum = tables.cum.astype(np.int64)[table, index]
    raw = (lanes + _ESCAPE_OFFSET) & 0xFFFFFFFF
    n, k = valid.shape
    cap = max_lane_words(n_blocks, n_lanes)
    words = np.zeros((n, cap), dtype=np.uint16)
    pos = np.full(n, cap, dtype=np.int64)
    x = np.full(n, _LOWER, dtype=np.uint64)
    rows = np.arange(n)

    def push(mask: np.ndarray, f: np.ndarray, c: np.ndarray) -> None:
        nonlocal x
        f = np.where(mask, f, 1).astype(np.uint64)
        emit = mask & (x >= (f << np.uint64(32 - PRECISION)))
        pos[emit] -= 1
        words[rows[emit], pos[emit]] = (x[emit] & np.uint64(0xFFFF)).astype(np.uint16)
        x = np.where(emit, x >> np.uint64(16), x)
        coded = ((x // f) << np.uint64(PRECISION)) + x % f + c.astype(np.uint64)
        x = np.where(mask, coded, x)

    for j in range(k - 1, -1, -1):  # positions within a lane, in reverse (rANS is a stack)
        live = valid[:, j]
        if escape[:, j].any():
            for s in range(8, 0, -1):
                esc = escape[:, j, s] & live
                for b in range(3, -1, -1):
                    byte = (raw[:, j, s] >> (8 * b)) & 0xFF
                    push(esc, np.full(n, 16), byte * 16)
        for s in range(8, -1, -1):
            push(live, freq[:, j, s], cum[:, j, s])
    pos -= 2
    words[rows, pos] = (x >> np.uint64(16)).astype(np.uint16)
    words[rows, pos + 1] = (x & np.uint64(0xFFFF)).astype(np.uint16)
    counts = (cap - pos).reshape(n_pages, n_lanes)
    flat = words[np.arange(cap)[None, :] >= pos[:, None]]  # every lane's words, lane after lane
    ends = np.cumsum(counts.sum(axis=1))
    header = page_header(n_lanes, n_blocks, bits)
    return [
        header + counts[p].astype("<u2").tobytes() + flat[ends[p] - counts[p].sum() : ends[p]].astype("<u2").tobytes()
        for p in range(n_pages)
    ]


def encode_codes(codes: np.ndarray, bits: float, n_lanes: int = DEFAULT_LANES) -> list[bytes]:
    """Encode pages of codes ``2·p``: shape (n_pages, ..., d) with d a multiple of 8, one page per
    leading index (its blocks in C order)."""
    codes = np.asarray(codes)
    if codes.ndim < 2 or codes.shape[-1] % 8:
        raise InputError(f"expected codes of shape (pages, ..., d) with d a multiple of 8, got {codes.shape}")
    symbols = codes_to_symbols(codes).reshape(codes.shape[0], -1, 9)
    return encode_pages(symbols, bits, n_lanes)


# ---------------------------------------------------------------------------------------------
# decoder


def page_info(page: bytes) -> tuple[int, int, float]:
    """(n_lanes, n_blocks, bits) of a page, after checking its header and length.

    Raises CorruptStreamError on a foreign, truncated or inconsistent page.
    """
    if not isinstance(page, (bytes, bytearray, memoryview)):
        raise InputError(f"a page is bytes, got {type(page).__name__}")
    if len(page) < HEADER_BYTES:
        raise CorruptStreamError(f"page of {len(page)} bytes is shorter than its header")
    magic, version, precision, n_lanes, n_blocks, bits = _HEADER.unpack_from(page)
    if magic != MAGIC or version != VERSION or precision != PRECISION:
        raise CorruptStreamError(
            f"not an LQRL v{VERSION} page (magic {magic!r}, version {version}, precision {precision})"
        )
    if (
        n_lanes < 1
        or n_blocks < 1
        or not MIN_BITS <= bits <= MAX_BITS
        or max_lane_words(n_blocks, n_lanes) > _MAX_LANE_WORDS
    ):
        raise CorruptStreamError(f"page header is inconsistent: {n_lanes} lanes, {n_blocks} blocks, {bits} bits")
    if len(page) < HEADER_BYTES + 2 * n_lanes:
        raise CorruptStreamError("page is truncated inside its lane table")
    counts = np.frombuffer(page, dtype="<u2", count=n_lanes, offset=HEADER_BYTES)
    if len(page) != HEADER_BYTES + 2 * n_lanes + 2 * int(counts.sum()):
        raise CorruptStreamError(
            f"page has {len(page)} bytes, its header and lane table say "
            f"{HEADER_BYTES + 2 * n_lanes + 2 * int(counts.sum())}"
        )
    if np.any(counts < 2):
        raise CorruptStreamError("a lane has fewer than its 2 state words")
    return n_lanes, n_blocks, bits


def decode_pages(pages: Sequence[bytes], max_numel: int | None = DEFAULT_MAX_NUMEL) -> np.ndarray:
    """Decode pages made by :func:`encode_pages` (or the GPU encoder), all lanes of all pages at once.

    Parameters
    ----------
    pages : page bytes, all with the same lane count, block count and rate.
    max_numel : the most coordinates (8 per block, all pages) this call may decode: a guard against
        headers that declare huge pages over few bytes (a lane's word count does not bound its
        blocks: frequent symbols cost no word); ``None`` for no limit.

    Returns
    -------
    np.ndarray, shape (n_pages, n_blocks, 9), int32.

    Raises
    ------
    CorruptStreamError
        on a bad header or length, or when a lane does not end in the state 2^16 having read
        exactly its words (what corruption of the words causes, short of a 2^-16 chance per lane).
    FormatError
        when the pages hold more than ``max_numel`` coordinates.
    """
    if isinstance(pages, (bytes, bytearray, memoryview)):
        raise InputError("decode_pages takes a sequence of pages; for one page, pass [page]")
    if len(pages) == 0:
        raise InputError("no pages to decode")
    infos = {page_info(p) for p in pages}
    if len(infos) != 1:
        raise InputError(f"pages of different layouts cannot be decoded together: {sorted(infos)}")
    n_lanes, n_blocks, bits = infos.pop()
    if max_numel is not None and 8 * n_blocks * len(pages) > max_numel:
        raise FormatError(
            f"{len(pages)} page(s) of {n_blocks} blocks hold {8 * n_blocks * len(pages)} coordinates, more than "
            f"max_numel={max_numel}; if you trust them, pass a larger max_numel (or None)"
        )
    tables = lane_tables(bits)
    n_pages = len(pages)
    counts = np.concatenate([np.frombuffer(p, dtype="<u2", count=n_lanes, offset=HEADER_BYTES) for p in pages])
    stream = np.concatenate([np.frombuffer(p, dtype="<u2", offset=HEADER_BYTES + 2 * n_lanes) for p in pages])
    stream = np.append(stream, np.zeros(1, np.uint16)).astype(np.uint64)  # one dummy word for masked reads
    dummy = stream.size - 1
    starts = np.cumsum(counts) - counts
    ends = starts + counts
    n = n_pages * n_lanes
    k = -(-n_blocks // n_lanes)
    valid = _lane_major(np.zeros((n_pages, n_blocks, 9), np.int64), n_lanes)[1]
    x = (stream[starts] << np.uint64(16)) | stream[starts + 1]
    ptr = starts + 2
    bad = x < _LOWER
    dec = tables.dec.view(np.uint32).astype(np.uint64)
    mask12 = np.uint64((1 << PRECISION) - 1)
    out = np.zeros((n, k, 9), dtype=np.int64)

    def renorm(mask: np.ndarray) -> None:
        nonlocal x, ptr, bad
        need = mask & (x < _LOWER)
        bad = bad | (need & (ptr >= ends))
        w = stream[np.where(need & (ptr < ends), ptr, dummy)]
        x = np.where(need, (x << np.uint64(16)) | w, x)
        ptr = ptr + need

    def symbol(mask: np.ndarray, table: np.ndarray) -> np.ndarray:
        nonlocal x
        slot = x & mask12
        e = dec[table, slot.astype(np.int64)]
        f = ((e >> np.uint64(12)) & mask12) + np.uint64(1)
        x = np.where(mask, f * (x >> np.uint64(PRECISION)) + (e & mask12), x)
        renorm(mask)
        return (e >> np.uint64(24)).astype(np.int64)

    for j in range(k):
        live = valid[:, j]
        coset = symbol(live, np.zeros(n, np.int64)) & 1
        values = [coset]
        escapes = []
        for s in range(1, 9):
            table = (1 if s < 8 else 3) + coset
            r = tables.r_free if s < 8 else tables.r_half
            idx = symbol(live, table)
            escapes.append(live & (idx == 2 * r + 1))
            values.append(idx - r)
        if any(e.any() for e in escapes):
            for s in range(1, 9):
                esc = escapes[s - 1]
                raw = np.zeros(n, np.int64)
                for b in range(4):
                    slot = x & mask12
                    x = np.where(esc, np.uint64(16) * (x >> np.uint64(PRECISION)) + (slot & np.uint64(15)), x)
                    raw |= (slot >> np.uint64(4)).astype(np.int64) << (8 * b)
                    renorm(esc)
                values[s] = np.where(esc, raw - _ESCAPE_OFFSET, values[s])
        out[:, j] = np.stack(values, axis=1)
        if bad.all():  # every lane already read past its words (a forged header): nothing left to learn
            break
    bad |= (x != _LOWER) | (ptr != ends)
    if bad.any():
        lanes = np.flatnonzero(bad)
        raise CorruptStreamError(
            f"{lanes.size} lane(s) do not decode (first: page {lanes[0] // n_lanes}, "
            f"lane {lanes[0] % n_lanes}): the page is corrupted"
        )
    blocks = out.reshape(n_pages, n_lanes, k, 9).transpose(0, 2, 1, 3).reshape(n_pages, k * n_lanes, 9)
    return np.ascontiguousarray(blocks[:, :n_blocks]).astype(np.int32)


def decode_codes(pages: Sequence[bytes], dtype=np.int8, max_numel: int | None = DEFAULT_MAX_NUMEL) -> np.ndarray:
    """Decode pages to codes ``2·p``: shape (n_pages, n_blocks·8) in ``dtype`` (reshape to your page shape)."""
    return symbols_to_codes(decode_pages(pages, max_numel), dtype)
