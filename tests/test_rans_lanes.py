"""Interleaved multi-lane rANS (lqlib.coding.rans_lanes) and its Triton kernels (lqlib.kernels.rans).

CPU coder: exact round trips, escapes, corruption, rate against constriction. Kernels (Triton's
interpreter without CUDA): byte-identical pages to the CPU encoder, and each side decodes the other's.
"""

import os
import struct

import numpy as np
import pytest
import torch

from lqlib.coding import rans_lanes as RL
from lqlib.coding.entropy_model import gaussian_symbol_model
from lqlib.coding.rans import encode_symbols
from lqlib.core.lattices import nearest_e8
from lqlib.errors import CorruptStreamError, FormatError, InputError


def gaussian_codes(n_pages: int, page_shape: tuple, bits: float, seed: int) -> np.ndarray:
    """Codes 2·p (int8) of E8 points of Gaussian data at the entropy-coded scale of ``bits``."""
    s = 2.0**bits / np.sqrt(2 * np.pi * np.e)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n_pages, *page_shape, generator=gen, dtype=torch.float64) * s
    points = nearest_e8(x.reshape(*x.shape[:-1], -1, 8)).reshape(x.shape)
    return (points * 2).to(torch.int8).numpy()


def with_escapes(symbols: np.ndarray) -> np.ndarray:
    """Some values far outside the tables (int32 extremes included)."""
    s = symbols.copy()
    s[0, 1, 3] = 2**31 - 1
    s[0, 1, 8] = -(2**31)
    s[-1, -1, 1] = 1000
    s[-1, 0, 7] = -77
    s[:, 5, 1:] = 12345  # every symbol of a block escaped, in every page
    return s


def test_tables_are_exact_and_deterministic():
    for bits in (0.5, 2.0, 3.0, 4.0, 5.0, 6.5, 7.0, 10.0):  # from 7 bits, the fallback quantization
        t = RL.lane_tables(bits)
        again = RL.lane_tables.__wrapped__(bits)
        assert all(np.array_equal(getattr(t, a), getattr(again, a)) for a in ("freq", "cum", "enc", "dec"))
        m = 1 << RL.PRECISION
        assert t.freq[0, :2].min() >= 1 and t.freq[0, 2:].max() == 0
        for table in range(1, 5):
            r = t.radius(table)
            f = t.freq[table]
            assert f[: 2 * r + 2].min() >= 1 and f[2 * r + 2 :].max(initial=0) == 0  # escape included
        assert np.array_equal(t.freq.sum(axis=1), np.full(5, m))
        # the slot table inverts the cumulative frequencies
        slots = np.arange(m)
        for table in range(5):
            e = t.dec[table].astype(np.int64) & 0xFFFFFFFF
            sym, freq, bias = e >> 24, ((e >> 12) & 4095) + 1, e & 4095
            assert np.array_equal(freq, t.freq[table][sym])
            assert np.array_equal(slots - bias, t.cum[table][sym])
            assert np.all((bias >= 0) & (bias < freq))


@pytest.mark.parametrize("bits", [3.0, 4.0, 5.0, 7.0])
def test_cpu_round_trip_with_escapes_and_a_ragged_last_lane(bits):
    codes = gaussian_codes(3, (13, 64), bits, seed=int(bits))  # 104 blocks: 7 lanes of 15, one short
    symbols = with_escapes(RL.codes_to_symbols(codes).reshape(3, -1, 9))
    pages = RL.encode_pages(symbols, bits, n_lanes=7)
    assert np.array_equal(RL.decode_pages(pages), symbols)
    assert np.array_equal(RL.decode_codes(RL.encode_codes(codes, bits, 7)).reshape(codes.shape), codes)
    # one lane and one block per lane are layouts too
    assert np.array_equal(RL.decode_pages(RL.encode_pages(symbols, bits, 1)), symbols)
    assert np.array_equal(RL.decode_pages(RL.encode_pages(symbols, bits, 104)), symbols)


def test_pages_decode_alone():
    symbols = with_escapes(RL.codes_to_symbols(gaussian_codes(4, (8, 64), 4.0, seed=7)).reshape(4, -1, 9))
    pages = RL.encode_pages(symbols, 4.0, n_lanes=8)
    for k in range(4):
        assert np.array_equal(RL.decode_pages([pages[k]])[0], symbols[k])
        assert pages[k] == RL.encode_pages(symbols[k : k + 1], 4.0, n_lanes=8)[0]  # nothing shared between pages


def test_rate_close_to_constriction():
    """At the layout of a Llama-3.1-8B page (64 tokens × 8 KV heads × 16 blocks = 8192 blocks, 32 lanes of
    256 blocks), coded bits/dim over the constriction coder's: at most 0.01 bit/dim for the 12-bit tables
    (0.002–0.006 bit/symbol by their cross-entropy) on top of the fixed costs, at most 48 bits per lane
    (state flush, word count) and 20 header bytes per page, 0.0259 bit/dim. Measured: 0.023, 0.025,
    0.028 bit/dim at 3, 4, 5 bits (0.6% of the rate at 4 bits); 0.043–0.046 with 64 lanes."""
    for bits in (3.0, 4.0, 5.0):
        codes = gaussian_codes(1, (64, 8, 128), bits, seed=11)
        pages = RL.encode_codes(codes, bits, n_lanes=32)
        dims = codes.size
        ours = 8 * sum(len(p) for p in pages) / dims
        words = encode_symbols(RL.codes_to_symbols(codes).reshape(-1, 9), gaussian_symbol_model(bits))
        theirs = 32 * words.size / dims
        fixed = (8 * RL.HEADER_BYTES + 48 * 32) / dims
        assert 0 < ours - theirs < fixed + 0.01, (bits, ours, theirs, fixed)


def corrupted_pages(pages: list[bytes]) -> dict[str, list[bytes]]:
    n_lanes = RL.page_info(pages[0])[0]
    body = RL.HEADER_BYTES + 2 * n_lanes
    flip = bytearray(pages[1])
    flip[body + 40] ^= 0x10  # a bit in a lane's words
    lane_table = bytearray(pages[1])  # one word moved from lane 0 to lane 1: lengths still add up
    counts = np.frombuffer(bytes(lane_table[RL.HEADER_BYTES : body]), dtype="<u2").copy()
    counts[0] -= 1
    counts[1] += 1
    lane_table[RL.HEADER_BYTES : body] = counts.astype("<u2").tobytes()
    magic = bytearray(pages[1])
    magic[0] ^= 1
    rate = bytearray(pages[1])
    rate[12:20] = struct.pack("<d", 1e9)
    return {
        "flipped bit": [pages[0], bytes(flip)],
        "lane table": [pages[0], bytes(lane_table)],
        "truncated": [pages[0], pages[1][:-2]],
        "extended": [pages[0], pages[1] + b"\0\0"],
        "header": [pages[0], bytes(magic)],
        "rate": [pages[0], bytes(rate)],
    }


def test_cpu_decoder_rejects_corrupted_pages():
    symbols = RL.codes_to_symbols(gaussian_codes(2, (16, 64), 4.0, seed=3)).reshape(2, -1, 9)
    pages = RL.encode_pages(symbols, 4.0, n_lanes=8)
    for what, bad in corrupted_pages(pages).items():
        with pytest.raises(CorruptStreamError):
            RL.decode_pages(bad)
        assert np.array_equal(RL.decode_pages(bad[:1])[0], symbols[0]), what  # the sound page alone still decodes


def test_pages_that_declare_more_than_they_hold():
    """Memory bombs of the page format (no CRC here): 65535 lanes of 2 words each may declare 104 M blocks in
    393 KB; the max_numel guard refuses that at once, and a raised block count within it is refused by the
    lanes' end states (the decoder stops early once every lane has read past its words)."""
    import time

    symbols = RL.codes_to_symbols(gaussian_codes(1, (16, 64), 4.0, seed=4)).reshape(1, -1, 9)
    page = RL.encode_pages(symbols, 4.0, n_lanes=8)[0]
    lanes = 0xFFFF
    blocks = (0xFFFF - 2) // 41 * lanes
    bomb = RL.page_header(lanes, blocks, 4.0) + np.full(lanes, 2, "<u2").tobytes() + bytes(4 * lanes)
    start = time.perf_counter()
    with pytest.raises(FormatError, match="max_numel"):
        RL.decode_pages([bomb])
    assert time.perf_counter() - start < 0.5
    raised = RL.page_header(8, 128 * 100, 4.0) + page[RL.HEADER_BYTES :]
    start = time.perf_counter()
    with pytest.raises(CorruptStreamError):
        RL.decode_pages([raised])
    assert time.perf_counter() - start < 2.0
    with pytest.raises(FormatError, match="max_numel"):
        RL.decode_pages([page], max_numel=128 * 8 - 1)
    assert np.array_equal(RL.decode_pages([page], max_numel=None), symbols)
    with pytest.raises(InputError, match="sequence of pages"):
        RL.decode_pages(page)


def test_bad_input():
    from lqlib.coding import codec

    assert (RL.MIN_BITS, RL.MAX_BITS) == (codec.MIN_BITS, codec.MAX_BITS)
    with pytest.raises(InputError):
        RL.encode_pages(np.zeros((1, 4, 9), np.int32), 12.0)
    with pytest.raises(InputError):
        RL.encode_pages(np.zeros((1, 4, 8), np.int32), 4.0)
    with pytest.raises(InputError):
        RL.encode_pages(np.full((1, 4, 9), 2, np.int32), 4.0)  # coset bit 2
    with pytest.raises(InputError):
        RL.encode_pages(np.zeros((1, 70000, 9), np.int32), 4.0, n_lanes=1)  # a lane could overflow u16 counts
    with pytest.raises(InputError):
        RL.codes_to_symbols(np.array([[1, 2, 0, 0, 0, 0, 0, 0]]))  # mixed cosets
    with pytest.raises(InputError):
        RL.codes_to_symbols(np.array([[2, 0, 0, 0, 0, 0, 0, 0]]))  # odd sum
    with pytest.raises(InputError):
        RL.decode_pages([])


# ------------------------------------------------------------------------------------------------
# the Triton kernels

triton_missing = False
try:
    import triton  # noqa: F401
except ImportError:
    triton_missing = True
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
needs_kernels = pytest.mark.skipif(
    triton_missing or (DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1"),
    reason="the kernels need Triton, and CUDA or TRITON_INTERPRET=1",
)


@needs_kernels
@pytest.mark.slow
def test_kernels_match_the_cpu_coder_both_ways():
    from lqlib.kernels import rans as KR

    bits, n_lanes = 4.0, 6
    codes = gaussian_codes(3, (5, 64), bits, seed=5)  # 40 blocks per page: 6 lanes of 7, ragged
    codes[1, 2, 8:16] = [122, 2, 0, 0, 0, 0, 0, 0]  # z0 = 61: escaped, though the code fits int8
    codes[0, 0, 0:8] = [-119, 1, 1, 1, 1, 1, 1, 1]  # z0 = -60 in the half-integer coset
    cpu_pages = RL.encode_codes(codes, bits, n_lanes)
    batch = KR.encode(torch.from_numpy(codes).to(DEVICE), bits, n_lanes)
    assert batch.to_pages() == cpu_pages  # byte-identical
    assert batch.nbytes() == sum(len(p) for p in cpu_pages)
    for lookup in KR.LOOKUPS:
        out, ok = KR.decode(KR.PageBatch.from_pages(cpu_pages, DEVICE), check=True, lookup=lookup)
        assert bool(ok.all()) and torch.equal(out.cpu().reshape(codes.shape), torch.from_numpy(codes))
    assert np.array_equal(RL.decode_codes(batch.to_pages()).reshape(codes.shape), codes)

    symbols = with_escapes(RL.codes_to_symbols(codes).reshape(3, -1, 9))
    cpu_pages = RL.encode_pages(symbols, bits, n_lanes)
    batch = KR.encode(torch.from_numpy(symbols).to(DEVICE), bits, n_lanes, symbols=True)
    assert batch.to_pages() == cpu_pages
    out, ok = KR.decode(KR.PageBatch.from_pages(cpu_pages, DEVICE), symbols=True, lookup="bucket")
    assert bool(ok.all()) and np.array_equal(out.cpu().numpy(), symbols)
    # page k alone
    alone, ok = KR.decode(KR.PageBatch.from_pages(cpu_pages[2:], DEVICE), symbols=True)
    assert bool(ok.all()) and np.array_equal(alone.cpu().numpy()[0], symbols[2])


@needs_kernels
@pytest.mark.slow
def test_kernel_decoder_flags_corrupted_pages():
    from lqlib.kernels import rans as KR

    codes = gaussian_codes(2, (16, 64), 4.0, seed=3)
    pages = RL.encode_codes(codes, 4.0, n_lanes=8)
    out, ok = KR.decode(KR.PageBatch.from_pages(pages, DEVICE))
    assert ok.tolist() == [True, True]
    for what, bad in corrupted_pages(pages).items():
        try:
            batch = KR.PageBatch.from_pages(bad, DEVICE)
        except CorruptStreamError:  # header or length checked on the host when batching bytes
            assert what in ("header", "rate", "truncated", "extended"), what
            # the same bytes handed over raw: the kernel path flags them itself
            sizes = np.cumsum([0] + [len(p) + len(p) % 2 for p in bad])
            data = torch.frombuffer(bytearray(b"".join(p + b"\0" * (len(p) % 2) for p in bad)), dtype=torch.uint8)
            batch = KR.PageBatch(data.to(DEVICE), torch.from_numpy(sizes).to(DEVICE), 8, 128, 4.0)
        out, ok = KR.decode(batch)
        assert ok.tolist() == [True, False], what
        assert torch.equal(out[0].cpu(), torch.from_numpy(codes[0].reshape(-1)))
        with pytest.raises(CorruptStreamError):
            KR.decode(batch, check=True)


def test_imports_without_triton():
    """The CPU coder and the kernels' wrapper import without Triton; only the kernels need it."""
    import subprocess
    import sys

    probe = """
import sys
sys.modules["triton"] = None
import numpy as np, torch
from lqlib.coding import rans_lanes as RL
from lqlib.kernels import rans as KR
sym = np.zeros((1, 16, 9), np.int32)
assert np.array_equal(RL.decode_pages(RL.encode_pages(sym, 4.0, 4)), sym)
try:
    KR.encode(torch.zeros(1, 128, dtype=torch.int8), 4.0, 4)
except ImportError as err:
    assert "lqlib[gpu]" in str(err)
else:
    raise AssertionError("encoded without Triton")
"""
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
