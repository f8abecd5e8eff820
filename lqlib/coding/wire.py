"""The versioned wire format of an E8-coded tensor.

All integers little-endian. Layout (version 3)::

    offset       size        field
    0            4           magic b"LQE8"
    4            1           version (3; 2 is read too)
    5            1           rotation code (0 none, 1 RHT)
    6            1           scale code (0 one per tensor, 1 one per vector)
    7            1           dtype code of the decoded tensor (0 f32, 1 f16, 2 bf16, 3 f64)
    8            4           rate b, float32, bits/dim
    12           4           RHT seed, uint32
    16           1           ndim
    17           4·ndim      shape, uint32 each
    17+4·ndim    4           n_words of the ANS payload, uint32
    ...          see steps   one per vector: codes k of the steps a = 2^(k/8), packed by
                             :func:`lqlib.steps.pack_codes` (about 3–4 bits each);
                 4           one per tensor: the step as a float32 (its bit pattern, int32)
    ...          4·n_words   ANS payload, uint32 words
    end−4        4           CRC-32 of every byte before it

Version 3 differs from version 2 in the payload only: its ANS stack ends with a 32-bit sentinel
(:data:`lqlib.coding.rans.SENTINEL`) that lets the decoder refuse a payload that does not hold
exactly the declared shape, whatever the scale mode (version 2 could decode past its payload when
a forged shape kept the step-code count, e.g. with one step per tensor). Version-2 streams still
decode, without that check; an :class:`~lqlib.Encoded` keeps its version when written again.

Every byte counts towards :meth:`lqlib.codec.E8Codec.bits_per_dim`.

The CRC-32 detects accidental corruption (storage, transit, truncation); it is no protection
against deliberate tampering, since anyone can recompute it. Streams kept where others can
write should carry a keyed MAC (e.g. HMAC-SHA256 of these bytes, checked before decoding; the
README shows how).
"""

from __future__ import annotations

import math
import struct
import zlib
from dataclasses import dataclass

import numpy as np
import torch

from ..core.steps import pack_codes, packed_codes_size, unpack_codes
from ..errors import ChecksumError, FormatError

__all__ = [
    "MAGIC",
    "VERSION",
    "READABLE_VERSIONS",
    "ROTATIONS",
    "SCALES",
    "DTYPES",
    "WireHeader",
    "pack",
    "packed_size",
    "steps_nbytes",
    "unpack",
]

MAGIC = b"LQE8"
VERSION = 3
READABLE_VERSIONS = (2, 3)
ROTATIONS = ("none", "rht")
SCALES = ("tensor", "vector")
DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
MAX_NDIM = 16
MAX_NUMEL = 1 << 40

_FIXED = struct.Struct("<4sBBBBfIB")
_WORDS = struct.Struct("<I")
_CRC = struct.Struct("<I")


@dataclass(frozen=True)
class WireHeader:
    """Everything but the data: codec settings, decoded dtype and shape, and the format version
    (3 for new streams: the payload ends with the sentinel; 2: it does not)."""

    rotation: str
    scale: str
    dtype: torch.dtype
    bits: float
    seed: int
    shape: tuple[int, ...]
    version: int = VERSION

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def n_scales(self) -> int:
        return 1 if self.scale == "tensor" else math.prod(self.shape[:-1])


def steps_nbytes(header: WireHeader, step_codes: np.ndarray) -> int:
    """Bytes the step codes take in the wire format."""
    return 4 if header.scale == "tensor" else packed_codes_size(step_codes)


def packed_size(header: WireHeader, step_codes: np.ndarray, n_words: int) -> int:
    """Length in bytes of :func:`pack`'s output, computed without packing."""
    return (
        _FIXED.size + 4 * len(header.shape) + _WORDS.size + steps_nbytes(header, step_codes) + 4 * n_words + _CRC.size
    )


def pack(header: WireHeader, step_codes: np.ndarray, words: np.ndarray) -> bytes:
    """Serialise a header, integer step codes and uint32 ANS words into bytes."""
    if header.version not in READABLE_VERSIONS:
        raise FormatError(f"cannot write wire version {header.version}; versions {READABLE_VERSIONS} exist")
    fixed = _FIXED.pack(
        MAGIC,
        header.version,
        ROTATIONS.index(header.rotation),
        SCALES.index(header.scale),
        DTYPES.index(header.dtype),
        header.bits,
        header.seed,
        len(header.shape),
    )
    body = b"".join(
        [
            fixed,
            struct.pack(f"<{len(header.shape)}I", *header.shape),
            _WORDS.pack(words.size),
            (
                np.ascontiguousarray(step_codes, dtype="<i4").tobytes()
                if header.scale == "tensor"
                else pack_codes(step_codes)
            ),
            np.ascontiguousarray(words, dtype="<u4").tobytes(),
        ]
    )
    return body + _CRC.pack(zlib.crc32(body))


def _take(data: bytes, offset: int, size: int, what: str) -> bytes:
    if offset + size > len(data):
        raise FormatError(
            f"lqlib bitstream is truncated: {what} needs {size} bytes at offset {offset}, "
            f"only {len(data) - offset} left"
        )
    return data[offset : offset + size]


def unpack(data: bytes) -> tuple[WireHeader, np.ndarray, np.ndarray]:
    """Parse bytes made by :func:`pack`; return (header, int32 step codes, uint32 words).

    Raises
    ------
    FormatError
        foreign, truncated or over-long input, or an unknown version or code.
    ChecksumError
        the CRC-32 does not match.
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise FormatError(f"expected bytes, got {type(data).__name__}")
    data = bytes(data)
    magic = _take(data, 0, 4, "magic")
    if magic != MAGIC:
        raise FormatError(f"not an lqlib E8 bitstream (magic {magic!r}, expected {MAGIC!r})")
    if len(data) < _FIXED.size + _CRC.size:
        raise FormatError("lqlib bitstream is truncated: shorter than its fixed header")
    (stored_crc,) = _CRC.unpack(data[-4:])
    if zlib.crc32(data[:-4]) != stored_crc:
        raise ChecksumError("lqlib bitstream checksum mismatch: the data is corrupted or truncated")
    _, version, rot, scale, dtype, bits, seed, ndim = _FIXED.unpack(_take(data, 0, _FIXED.size, "header"))
    if version not in READABLE_VERSIONS:
        raise FormatError(
            f"lqlib bitstream version {version} is not supported (this lqlib reads versions {READABLE_VERSIONS})"
        )
    if rot >= len(ROTATIONS) or scale >= len(SCALES) or dtype >= len(DTYPES):
        raise FormatError(f"lqlib bitstream has an unknown code (rotation {rot}, scale {scale}, dtype {dtype})")
    if not 1 <= ndim <= MAX_NDIM:
        raise FormatError(f"lqlib bitstream declares {ndim} dimensions (1..{MAX_NDIM} allowed)")
    offset = _FIXED.size
    shape = struct.unpack(f"<{ndim}I", _take(data, offset, 4 * ndim, "shape"))
    offset += 4 * ndim
    header = WireHeader(ROTATIONS[rot], SCALES[scale], DTYPES[dtype], bits, seed, tuple(shape), version)
    if header.numel > MAX_NUMEL:
        raise FormatError(f"lqlib bitstream declares {header.numel} elements (at most {MAX_NUMEL})")
    (n_words,) = _WORDS.unpack(_take(data, offset, 4, "word count"))
    offset += 4
    if header.scale == "tensor":
        codes = np.frombuffer(_take(data[: -_CRC.size], offset, 4, "step"), dtype="<i4").astype(np.int32)
        offset += 4
    else:
        codes, offset = unpack_codes(data[: -_CRC.size], offset, header.n_scales)
    expected = offset + 4 * n_words + _CRC.size
    if expected != len(data):
        raise FormatError(f"lqlib bitstream length {len(data)} does not match its header ({expected} bytes)")
    words = np.frombuffer(data, dtype="<u4", count=n_words, offset=offset)
    return header, codes, words.astype(np.uint32)
