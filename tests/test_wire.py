"""The wire format: header fields, and clear errors on truncated, corrupted or foreign bytes."""

import struct
import zlib

import numpy as np
import pytest
import torch

import lqlib
from lqlib import E8Codec, Encoded
from lqlib.wire import MAGIC, VERSION


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
    assert (h.rotation, h.scale, h.bits, h.seed, h.shape, h.dtype) == ("rht", "vector", 4.0, 3, (2, 5, 64),
                                                                      torch.float32)
    assert enc.scales.shape == (10,) and enc.words.dtype == np.uint32


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
    for offset, value, message in ((4, VERSION + 1, "version"), (5, 9, "unknown code"), (7, 9, "unknown code"),
                                   (16, 0, "dimensions"), (16, 99, "dimensions")):
        changed = bytearray(body)
        changed[offset] = value
        with pytest.raises(lqlib.FormatError, match=message):
            Encoded.from_bytes(with_crc(bytes(changed)))


def test_forged_huge_shape_is_rejected_without_allocating(sample):
    codec, _, data = sample
    body = bytearray(data[:-4])
    # keep 10 vectors (the scale count) but claim a last dim of 2^24: parses, refuses to decode
    struct.pack_into("<I", body, 17 + 8, 2 ** 24)
    with pytest.raises(lqlib.CorruptStreamError, match="cannot hold"):
        codec.decode(Encoded.from_bytes(with_crc(bytes(body))))
    # a last dim that is no multiple of 8
    struct.pack_into("<I", body, 17 + 8, 63)
    with pytest.raises(lqlib.CorruptStreamError, match="impossible shape"):
        codec.decode(Encoded.from_bytes(with_crc(bytes(body))))
    # a tensor-scale stream claiming 2^36 elements over a tiny payload
    enc = E8Codec(4.0, scale="tensor").encode(torch.randn(4, 64))
    body = bytearray(enc.to_bytes()[:-4])
    struct.pack_into("<II", body, 17, 2 ** 28, 256)
    forged = Encoded.from_bytes(with_crc(bytes(body)))
    with pytest.raises(lqlib.CorruptStreamError, match="cannot hold"):
        E8Codec(4.0, scale="tensor").decode(forged)


def test_forged_payload_with_valid_checksum(sample):
    codec, x, data = sample
    enc = Encoded.from_bytes(data)
    rng = np.random.default_rng(1)
    for trial in range(20):
        words = enc.words.copy()
        words[rng.integers(words.size)] ^= np.uint32(1 << int(rng.integers(32)))
        forged = Encoded(enc.header, enc.scales, words)
        with pytest.raises(lqlib.CorruptStreamError):
            codec.decode(Encoded.from_bytes(forged.to_bytes()))


def test_forged_scales_rejected(sample):
    codec, _, data = sample
    enc = Encoded.from_bytes(data)
    for bad in (np.float16(np.inf), np.float16(np.nan), np.float16(0.0), np.float16(-1.0)):
        scales = enc.scales.copy()
        scales[3] = bad
        with pytest.raises(lqlib.CorruptStreamError, match="step sizes"):
            codec.decode(Encoded(enc.header, scales, enc.words))
