"""The wire format: header fields, and clear errors on truncated, corrupted or foreign bytes."""

import struct
import zlib

import numpy as np
import pytest
import torch

import lqlib
from lqlib import E8Codec, Encoded
from lqlib.coding.wire import MAGIC, VERSION, WireHeader
from lqlib.core.steps import (
    CODE_MAX,
    CODE_MIN,
    pack_codes,
    packed_codes_size,
    unpack_codes,
)


@pytest.fixture(scope="module")
def sample():
    codec = E8Codec(4.0, seed=3)
    x = torch.randn(2, 5, 64, generator=torch.Generator().manual_seed(0))
    return codec, x, codec.encode(x).to_bytes()


def with_crc(body: bytes) -> bytes:
    return body + struct.pack("<I", zlib.crc32(body))


def test_header_fields(sample):
    codec, x, data = sample
    enc = Encoded.from_bytes(data)
    h = enc.header
    assert data[:4] == MAGIC and data[4] == VERSION
    assert (h.rotation, h.scale, h.bits, h.seed, h.shape, h.dtype) == (
        "rht",
        "vector",
        4.0,
        3,
        (2, 5, 64),
        torch.float32,
    )
    assert enc.step_codes.shape == (10,) and enc.words.dtype == np.uint32


def test_every_truncation_is_a_clear_error(sample):
    _, _, data = sample
    for n in range(len(data)):
        with pytest.raises(lqlib.FormatError):
            Encoded.from_bytes(data[:n])


def test_bit_flips_are_detected(sample):
    _, _, data = sample
    rng = np.random.default_rng(0)
    for pos in rng.choice(len(data), size=200, replace=False):
        flipped = bytearray(data)
        flipped[pos] ^= 1 << int(rng.integers(8))
        with pytest.raises(lqlib.FormatError):
            Encoded.from_bytes(bytes(flipped))


def test_foreign_and_extended_input(sample):
    _, _, data = sample
    for junk in (b"", b"PK\x03\x04" + bytes(60), bytes(1000), b"LQE8", "LQE8", None, data + b"\x00"):
        with pytest.raises(lqlib.FormatError):
            Encoded.from_bytes(junk)


def test_unknown_version_and_codes(sample):
    _, _, data = sample
    body = bytearray(data[:-4])
    for offset, value, message in (
        (4, VERSION + 1, "version"),
        (5, 9, "unknown code"),
        (7, 9, "unknown code"),
        (16, 0, "dimensions"),
        (16, 99, "dimensions"),
    ):
        changed = bytearray(body)
        changed[offset] = value
        with pytest.raises(lqlib.FormatError, match=message):
            Encoded.from_bytes(with_crc(bytes(changed)))


def test_forged_huge_shape_is_rejected_without_allocating(sample):
    codec, _, data = sample
    body = bytearray(data[:-4])
    # keep 10 vectors (the scale count) but claim a last dim of 2^24: parses, refuses to decode
    struct.pack_into("<I", body, 17 + 8, 2**24)
    with pytest.raises(lqlib.CorruptStreamError, match="cannot hold"):
        codec.decode(Encoded.from_bytes(with_crc(bytes(body))))
    # a last dim that is no multiple of 8
    struct.pack_into("<I", body, 17 + 8, 63)
    with pytest.raises(lqlib.CorruptStreamError, match="impossible shape"):
        codec.decode(Encoded.from_bytes(with_crc(bytes(body))))
    # a tensor-scale stream claiming 2^36 elements over a tiny payload
    enc = E8Codec(4.0, scale="tensor").encode(torch.randn(4, 64))
    body = bytearray(enc.to_bytes()[:-4])
    struct.pack_into("<II", body, 17, 2**28, 256)
    forged = Encoded.from_bytes(with_crc(bytes(body)))
    with pytest.raises(lqlib.CorruptStreamError, match="cannot hold"):
        E8Codec(4.0, scale="tensor").decode(forged)


def test_forged_payload_with_valid_checksum(sample):
    """Past the CRC, the ANS end-state check catches most forged payloads; the rest decode to
    finite tensors of the declared shape (rANS is a bijection, its only redundancy is the end state)."""
    codec, x, data = sample
    enc = Encoded.from_bytes(data)
    rng = np.random.default_rng(1)
    detected = 0
    for _trial in range(200):
        words = enc.words.copy()
        words[rng.integers(words.size)] ^= np.uint32(1 << int(rng.integers(32)))
        forged = Encoded.from_bytes(Encoded(enc.header, enc.step_codes, words).to_bytes())
        try:
            y = codec.decode(forged)
        except lqlib.CorruptStreamError:
            detected += 1
        else:
            assert y.shape == x.shape and bool(torch.isfinite(y).all())
    assert detected >= 160


def test_forged_step_codes_rejected(sample):
    codec, _, data = sample
    enc = Encoded.from_bytes(data)
    for bad in (CODE_MIN - 1, CODE_MAX + 1, 2**30):
        codes = enc.step_codes.copy()
        codes[3] = bad
        with pytest.raises(lqlib.CorruptStreamError, match="step codes"):
            codec.decode(Encoded(enc.header, codes, enc.words))
    with pytest.raises(lqlib.CorruptStreamError, match="step codes"):
        codec.decode(Encoded(enc.header, enc.step_codes[:-1], enc.words))
    # inside the wire format: an offset width no code range needs
    n_groups = 1
    offset = len(data) - 4 - 4 * enc.words.size - (len(pack_codes(enc.step_codes)))
    body = bytearray(data[:-4])
    body[offset + 2 * n_groups] = 40
    with pytest.raises(lqlib.FormatError, match="wider"):
        Encoded.from_bytes(with_crc(bytes(body)))
    tensor_codec = E8Codec(4.0, scale="tensor")
    tenc = tensor_codec.encode(torch.randn(4, 64))
    for bad in (np.float32(0.0), np.float32(-1.0), np.float32(np.inf), np.float32(np.nan), np.float32(1.0001)):
        with pytest.raises(lqlib.CorruptStreamError, match="step codes"):
            tensor_codec.decode(Encoded(tenc.header, np.array([bad]).view(np.int32), tenc.words))


@pytest.mark.parametrize("n", [1, 2, 63, 64, 65, 200, 1000])
def test_step_codes_round_trip(n):
    rng = np.random.default_rng(n)
    for codes in (rng.integers(CODE_MIN, CODE_MAX + 1, n), rng.integers(-3, 4, n) - 40, np.full(n, CODE_MAX)):
        data = pack_codes(codes)
        assert len(data) == packed_codes_size(codes)
        back, end = unpack_codes(data + b"tail", 0, n)
        assert end == len(data) and np.array_equal(back, codes)
        for cut in range(len(data)):
            with pytest.raises(lqlib.FormatError):
                unpack_codes(data[:cut], 0, n)


def test_step_codes_are_compact_on_real_like_steps():
    """Neighbouring vectors' codes within a few grid steps cost about 3 bits each, not 16."""
    codes = np.random.default_rng(0).integers(-4, 4, 6400)
    assert 8 * packed_codes_size(codes) / codes.size == pytest.approx(3 + 24 / 64)


# ------------------------------------------------------------------ version 3: the payload's sentinel

# Streams written by lqlib's wire version 2 (commit 89e5e31), with what that version decoded them to
# (float32 bytes). x = sin(0.37·arange(96)).reshape(2, 3, 16) · (1, 30, 0.01) per middle row.
V2_VECTOR = (
    "4c514538020101000000804007000000030200000003000000100000000d000000b7ff07b62ea0c6050063be9606239b4504070d3492"
    "729ec3debd29eb01cf716354d73ab0f47a63cfa94f6d4b0e5a214f311d1ac9ee0024a99eeeb60500f61c0779"
)
V2_TENSOR = (
    "4c514538020000000000404000000000030200000003000000100000000a0000000020c840a213fedfab9502147a65fda3e1a37acc"
    "73e2704bf779936fc59988fc094d8379e38a0986296f0000142b700c"
)
V2_VECTOR_VALUES = (
    "000000000060c53e00b42c3f000c5e3f00b8763f00b8763f00b42c3f00b8f63e0060453e006045be00b42cbf000c5ebf00b876bf00b876bf"
    "000c5ebf00b42cbf00c007c1000000800000354100609e4100a0cb410040e2410040e24100a0cb41004062410000b5400000b5c0004062c1"
    "00a0cbc10040e2c10040e2c100a0cbc100c0eabb00c06abb0000000000c06a3b0068cd3b0064213c0064213c0064213c00b8123c0010b03b"
    "00c0ea3a00c0eaba0068cdbb000c04bc006421bc006421bc004062bf000035bf0000b5be000000800000b53e0000353f0040623f00c0873f"
    "0040623f0000353f00c0073f0000353e000035be00c007bf004062bf00c087bf0040e4c10080cfc1004091c1000026c10000264000002641"
    "004091410080cf410040e4410080cf4100c0ba4100007941000026400000a6c0004091c10080cfc100b812bc001030bc00b812bc00c0eabb"
    "00c06abb0000000000c06a3b00c0ea3b00b8123c0010303c00b8123c00c0ea3b0010b03b00c0ea3a00c0eaba0010b0bb"
)


def v2_input() -> torch.Tensor:
    x = (torch.arange(96, dtype=torch.float64).reshape(2, 3, 16) * 0.37).sin()
    return (x * torch.tensor([1.0, 30.0, 0.01], dtype=torch.float64)[:, None]).to(torch.float32)


def test_version_2_streams_still_decode():
    """Committed version-2 bytes decode to what version 2 decoded them to (and to quantize(x) today); an
    Encoded read from them is written back as the same version-2 bytes."""
    vector_codec, tensor_codec = E8Codec(4.0, seed=7), E8Codec(3.0, rotation="none", scale="tensor")
    for codec, text in ((vector_codec, V2_VECTOR), (tensor_codec, V2_TENSOR)):
        data = bytes.fromhex(text)
        enc = Encoded.from_bytes(data)
        assert enc.header.version == 2 and data[4] == 2
        y = codec.decode(enc)
        assert torch.equal(y, codec.quantize(v2_input()))
        assert enc.to_bytes() == data
    values = np.frombuffer(bytes.fromhex(V2_VECTOR_VALUES), dtype="<f4").reshape(2, 3, 16).copy()
    assert np.array_equal(vector_codec.decode(Encoded.from_bytes(bytes.fromhex(V2_VECTOR))).numpy(), values)
    # the same tensor in version 3: one sentinel more in the payload, the same values
    v3 = vector_codec.encode(v2_input())
    assert v3.header.version == VERSION == 3 and torch.equal(vector_codec.decode(v3), torch.from_numpy(values))


def test_the_sentinel_costs_a_few_bytes_per_stream():
    """Extra payload bytes of the 32-bit sentinel over 120 streams of 2 to 5 bits/dim: 0 or 4 bytes each
    (whole words; about 2.5 on average), against the same symbols coded without it."""
    from lqlib.coding.entropy_model import gaussian_symbol_model
    from lqlib.coding.rans import encode_symbols
    from lqlib.core.symbols import points_to_symbols

    gen = torch.Generator().manual_seed(0)
    extra = []
    for i in range(120):
        codec = E8Codec([2.0, 3.0, 4.0, 5.0][i % 4], seed=i)
        points, _ = codec._analyse(codec._validate(torch.randn(1 + i % 5, 3, 16, 64, generator=gen)))
        symbols = points_to_symbols(points.reshape(-1, 8)).numpy()
        model = gaussian_symbol_model(codec.bits)
        extra.append(4 * (encode_symbols(symbols, model).size - encode_symbols(symbols, model, sentinel=False).size))
    extra = np.array(extra)
    print(f"sentinel: {extra.mean():.2f} bytes per stream on average (min {extra.min()}, max {extra.max()})")
    assert set(extra.tolist()) <= {0, 4} and 1.0 < extra.mean() < 4.0


@pytest.mark.parametrize("rotation", ["none", "rht"])
@pytest.mark.parametrize("scale", ["vector", "tensor"])
def test_decoding_past_the_payload_is_refused_in_every_scale_mode(rotation, scale):
    """The issue's forgeries, CRC recomputed: a leading dim raised from 4 to 5 (one step per tensor keeps the
    step count), or lowered; zero payload words under a (74, 8) header (the 37-byte stream)."""
    codec = E8Codec(4.0, rotation=rotation, scale=scale, seed=1)
    enc = codec.encode(torch.randn(4, 64, generator=torch.Generator().manual_seed(2)))
    for rows in (5, 3, 8):
        header = WireHeader(rotation, scale, torch.float32, 4.0, 1, (rows, 64))
        codes = np.resize(enc.step_codes, 1 if scale == "tensor" else rows)
        forged = Encoded.from_bytes(Encoded(header, codes, enc.words).to_bytes())
        with pytest.raises(lqlib.CorruptStreamError):
            codec.decode(forged)
    if scale == "tensor":
        tiny = E8Codec(0.5, rotation=rotation, scale="tensor", seed=1)
        empty = Encoded(WireHeader(rotation, "tensor", torch.float32, 0.5, 1, (74, 8)), enc.step_codes, enc.words[:0])
        data = empty.to_bytes()
        assert len(data) == 37
        with pytest.raises(lqlib.CorruptStreamError):
            tiny.decode(Encoded.from_bytes(data))
        # version 2 had no sentinel: the same forgery decoded to a (74, 8) tensor of garbage
        old = Encoded(
            WireHeader(rotation, "tensor", torch.float32, 0.5, 1, (74, 8), version=2), enc.step_codes, enc.words[:0]
        )
        assert tiny.decode(Encoded.from_bytes(old.to_bytes())).shape == (74, 8)


def test_memory_bombs_are_refused_before_allocating():
    """A low-rate stream whose header declares far more than it holds: the cheap bound or max_numel refuses it
    in milliseconds, whatever the CRC says."""
    import time

    codec = E8Codec(0.5, rotation="none", scale="tensor")
    enc = codec.encode(torch.randn(65536, 64, generator=torch.Generator().manual_seed(3)))
    for rows in (2**22, 2**26, 2**31):
        header = WireHeader("none", "tensor", torch.float32, 0.5, 0, (rows, 64))
        forged = Encoded.from_bytes(Encoded(header, enc.step_codes, enc.words).to_bytes())
        start = time.perf_counter()
        with pytest.raises(lqlib.FormatError, match="max_numel|cannot hold"):
            codec.decode(forged)
        assert time.perf_counter() - start < 0.5
    # a header raised within what the payload could hold is decoded, then refused by the sentinel
    header = WireHeader("none", "tensor", torch.float32, 0.5, 0, (65536 + 1024, 64))
    with pytest.raises(lqlib.CorruptStreamError):
        codec.decode(Encoded.from_bytes(Encoded(header, enc.step_codes, enc.words).to_bytes()))


def test_a_keyed_mac_over_the_bytes_catches_what_the_crc_cannot():
    """The README's recipe: HMAC-SHA256 over to_bytes(), checked before decoding. A forged stream with a
    recomputed CRC passes from_bytes but not the MAC."""
    import hashlib
    import hmac

    key = b"a secret of 32 bytes or more ...."
    codec = E8Codec(4.0)
    data = codec.encode(torch.randn(4, 64)).to_bytes()
    tag = hmac.new(key, data, hashlib.sha256).digest()
    body = bytearray(data[:-4])
    body[-1] ^= 1  # a payload bit, CRC recomputed
    forged = with_crc(bytes(body))
    Encoded.from_bytes(forged)  # the CRC is satisfied
    assert hmac.compare_digest(hmac.new(key, data, hashlib.sha256).digest(), tag)
    assert not hmac.compare_digest(hmac.new(key, forged, hashlib.sha256).digest(), tag)
