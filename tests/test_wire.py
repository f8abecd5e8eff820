"""The wire format: header fields, and clear errors on truncated, corrupted or foreign bytes."""

import struct
import zlib

import numpy as np
import pytest
import torch

import lqlib
from lqlib import E8Codec, Encoded
from lqlib.coding.wire import MAGIC, VERSION
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
