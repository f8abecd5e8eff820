"""A calibrated E8 codec: per-channel offsets and scales, one fixed step, a per-channel entropy model.

For one *slot* — a layer's keys or its values, ``heads`` KV heads of dimension ``d`` — the codec
holds, per head and channel j, three calibrated numbers (:class:`ChannelTables`):

* a scale ``g_j = base·2^(scale_code/4)``: lattice units per unit of x (the step is ``1/g_j``), with
  one float32 ``base`` per slot;
* an offset ``o_j`` (an integer, in lattice units): the calibrated mean of the channel, removed
  before quantizing and added back after;
* a width ``s_j = 2^(std_code/8)``: the spread of the channel in lattice units, for the entropy
  model of :mod:`lqlib.coding.channel_model`.

A vector x of head h is coded as the E8 point ``p = Q_E8(x·g − o)`` (coordinates taken in the order
of decreasing width, so that each 8-block holds channels of similar spread) and decoded as
``x̂ = (p + o)·h_j`` with ``h_j = 1/g_j`` (both float32 numbers fixed by the tables). There is no
per-vector step: the error of a channel is set by its scale alone (fixed-slope coding), and the rate
follows the data.

Tables are calibrated (:mod:`lqlib.alloc.calibrate`) and stored once per cache
(:meth:`ChannelTables.to_bytes`, 4 bytes per channel: int8 scale and width codes, int16 offset, and
17 bytes of header and CRC per slot);
every page names the tables it was coded with by their CRC-32.

Invariant: ``decode_page(encode_page(k, v))`` equals ``(quantize(k), quantize(v))`` bit for bit.

Page layout (little-endian)::

    0   4  magic b"LQC8"        4   1  version (1)          5   1  dtype code (lqlib.coding.wire.DTYPES)
    6   4  batch, uint32        10  2  heads, uint16        12  4  tokens, uint32
    16  2  head dim, uint16     18  4  CRC-32 of the key and value tables' CRCs
    22  4  alphabet radius R    26  4  n_words              30  4·n_words  ANS payload (keys, then values)
    end−4  4  CRC-32 of every byte before it
"""

from __future__ import annotations

import math
import struct
import zlib
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import torch
from torch import Tensor

from ..core.lattices import nearest_e8
from ..core.symbols import points_to_symbols, symbols_to_points
from ..errors import ChecksumError, CodecMismatchError, CorruptStreamError, FormatError, InputError
from .channel_model import (
    code_length,
    coset_probabilities,
    decode_channel_symbols,
    encode_channel_symbols,
    symbol_radius,
)
from .wire import DTYPES

__all__ = ["ChannelTables", "ChannelCodec", "encode_page", "decode_page", "page_shape"]

SCALE_STEPS = 4  # scale codes: 2^(k/4)
STD_STEPS = 8  # width codes: 2^(k/8)
_TABLE_MAGIC = b"LQT8"
_TABLE_HEAD = struct.Struct("<4sBHHf")
_PAGE_MAGIC = b"LQC8"
_PAGE_VERSION = 1
_PAGE_HEAD = struct.Struct("<4sBBIHIHIII")
_CRC = struct.Struct("<I")
_MAX_OFFSET = (1 << 15) - 1


def _codes(values: np.ndarray, steps: int, dtype) -> np.ndarray:
    info = np.iinfo(dtype)
    return np.clip(np.round(steps * np.log2(values)), info.min, info.max).astype(dtype)


@dataclass(frozen=True, eq=False)
class ChannelTables:
    """Calibrated tables of one slot, each of shape (heads, d).

    Attributes
    ----------
    scale_codes : int8, ``g = base·2^(code/4)`` lattice units per unit of x.
    std_codes : int8, widths ``s = 2^(code/8)`` in lattice units.
    offsets : int16, the channel means in lattice units (rounded).
    base : the slot's base scale (a float32 value): the fine, continuous part of every g.
    """

    scale_codes: np.ndarray
    std_codes: np.ndarray
    offsets: np.ndarray
    base: float = 1.0

    def __post_init__(self) -> None:
        shapes = {self.scale_codes.shape, self.std_codes.shape, self.offsets.shape}
        if len(shapes) != 1 or self.scale_codes.ndim != 2 or self.scale_codes.shape[1] % 8:
            raise InputError(f"tables must share one (heads, d) shape with d a multiple of 8, got {shapes}")
        if not (math.isfinite(self.base) and self.base > 0 and float(np.float32(self.base)) == self.base):
            raise InputError(f"the base scale must be a finite positive float32 value, got {self.base}")

    @classmethod
    def from_statistics(
        cls, mean: np.ndarray, std: np.ndarray, scale: np.ndarray, pool_widths: bool = False
    ) -> ChannelTables:
        """Tables from a slot's channel means and standard deviations (units of x, (heads, d)) and the
        scales g (lattice units per unit of x) chosen for it; every value is rounded to its code (g to
        a quarter octave around the geometric mean of ``scale``, which is stored as the base). The
        entropy model's widths are ``std·g`` (g as stored), or with ``pool_widths`` their RMS over
        each head's channels (one width per head)."""
        mean, std, scale = (np.asarray(a, dtype=np.float64) for a in (mean, std, scale))
        if not (np.isfinite(mean).all() and np.isfinite(std).all() and np.isfinite(scale).all()):
            raise InputError("channel statistics must be finite")
        if not (scale > 0).all():
            raise InputError("channel scales must be > 0")
        base = float(np.float32(np.exp(np.log(scale).mean())))
        scale_codes = _codes(scale / base, SCALE_STEPS, np.int8)
        g = base * 2.0 ** (scale_codes / SCALE_STEPS)
        width = std * g
        if pool_widths:
            width = np.broadcast_to(np.sqrt((width**2).mean(axis=-1, keepdims=True)), width.shape)
        offsets = np.clip(np.round(mean * g), -_MAX_OFFSET, _MAX_OFFSET).astype(np.int16)
        return cls(scale_codes, _codes(np.maximum(width, 2.0**-15), STD_STEPS, np.int8), offsets, base)

    @property
    def shape(self) -> tuple[int, int]:
        return self.scale_codes.shape

    def scales(self) -> np.ndarray:
        """g = base·2^(code/4), float64 (heads, d)."""
        return self.base * 2.0 ** (self.scale_codes.astype(np.float64) / SCALE_STEPS)

    def to_bytes(self) -> bytes:
        """magic, version, heads, d, base (float32); int8 scale codes, int8 width codes, int16 offsets; CRC-32."""
        heads, dim = self.shape
        body = b"".join(
            [
                _TABLE_HEAD.pack(_TABLE_MAGIC, 1, heads, dim, self.base),
                np.ascontiguousarray(self.scale_codes, dtype=np.int8).tobytes(),
                np.ascontiguousarray(self.std_codes, dtype=np.int8).tobytes(),
                np.ascontiguousarray(self.offsets, dtype="<i2").tobytes(),
            ]
        )
        return body + _CRC.pack(zlib.crc32(body))

    @classmethod
    def from_bytes(cls, data: bytes) -> ChannelTables:
        """Inverse of :meth:`to_bytes`; raises :class:`lqlib.FormatError` on foreign or corrupted bytes."""
        data = bytes(data)
        if len(data) < _TABLE_HEAD.size + _CRC.size or data[:4] != _TABLE_MAGIC:
            raise FormatError("not lqlib channel tables (bad magic or too short)")
        if zlib.crc32(data[:-4]) != _CRC.unpack(data[-4:])[0]:
            raise ChecksumError("channel tables checksum mismatch: the data is corrupted or truncated")
        _, version, heads, dim, base = _TABLE_HEAD.unpack(data[: _TABLE_HEAD.size])
        n = heads * dim
        if version != 1 or len(data) != _TABLE_HEAD.size + 4 * n + _CRC.size:
            raise FormatError(f"channel tables of version {version} and length {len(data)} do not match {heads}×{dim}")
        at = _TABLE_HEAD.size
        scale = np.frombuffer(data, np.int8, n, at).reshape(heads, dim).copy()
        std = np.frombuffer(data, np.int8, n, at + n).reshape(heads, dim).copy()
        offsets = np.frombuffer(data, "<i2", n, at + 2 * n).reshape(heads, dim).astype(np.int16)
        try:
            return cls(scale, std, offsets, base)
        except InputError as exc:
            raise FormatError(f"channel tables hold an invalid base scale: {exc}") from exc

    def nbytes(self) -> int:
        return _TABLE_HEAD.size + 4 * self.scale_codes.size + _CRC.size


class ChannelCodec:
    """The codec of one slot (see the module docstring); vectors of shape (batch, heads, tokens, d)."""

    def __init__(self, tables: ChannelTables) -> None:
        self.tables = tables
        heads, dim = tables.shape
        widths = 2.0 ** (tables.std_codes.astype(np.float64) / STD_STEPS)
        # channels in order of decreasing width (stable: ties keep the channel order)
        self.permutation = np.argsort(-tables.std_codes.astype(np.int64), axis=1, kind="stable")
        self.widths = np.take_along_axis(widths, self.permutation, axis=1).reshape(heads, dim // 8, 8)
        self.p_half = coset_probabilities(self.widths)  # (heads, blocks)
        scales = np.take_along_axis(tables.scales(), self.permutation, axis=1)
        self._forward, self._inverse = scales, 1.0 / scales
        self._offsets = np.take_along_axis(tables.offsets.astype(np.float64), self.permutation, axis=1)
        self._cache: dict[tuple, tuple[Tensor, ...]] = {}

    def __repr__(self) -> str:
        return f"ChannelCodec(heads={self.tables.shape[0]}, d={self.tables.shape[1]})"

    @cached_property
    def fingerprint_bytes(self) -> bytes:
        return self.tables.to_bytes()

    def _constants(self, device: torch.device, dtype: torch.dtype) -> tuple[Tensor, ...]:
        """(permutation, inverse permutation, g, 1/g, offsets) on ``device`` in ``dtype`` (cached)."""
        key = (torch.device(device), dtype)
        if key not in self._cache:
            perm = torch.from_numpy(self.permutation).to(device)
            self._cache[key] = (
                perm,
                torch.argsort(perm, dim=1),
                *(
                    torch.from_numpy(a).to(device=device, dtype=dtype)[:, None, :]
                    for a in (self._forward, self._inverse)
                ),
                torch.from_numpy(self._offsets).to(device=device, dtype=dtype)[:, None, :],
            )
        return self._cache[key]

    def check(self, x: Tensor) -> None:
        """Raise :class:`InputError` unless ``x`` (batch, heads, tokens, d) can be coded: shape, dtype, finite."""
        self._check(x)

    def _check(self, x: Tensor) -> Tensor:
        if not isinstance(x, Tensor) or x.dim() != 4 or tuple(x.shape[1::2]) != self.tables.shape:
            raise InputError(
                f"expected a (batch, heads={self.tables.shape[0]}, tokens, d={self.tables.shape[1]}) tensor, got "
                f"{tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__}"
            )
        if x.dtype not in DTYPES:
            raise InputError(f"dtype {x.dtype} is not supported; use one of {DTYPES}")
        work = x.detach().to(torch.float64 if x.dtype == torch.float64 else torch.float32)
        if work.numel() and not bool(torch.isfinite(work).all()):
            raise InputError("input contains NaN or Inf")
        return work

    def points(self, x: Tensor) -> Tensor:
        """E8 points in lattice units, channels permuted: (batch, heads, tokens, d) in the work dtype."""
        work = self._check(x)
        perm, _, forward, _, offsets = self._constants(work.device, work.dtype)
        b, h, t, d = work.shape
        u = torch.gather(work, -1, perm[None, :, None, :].expand(b, h, t, d)) * forward - offsets
        return nearest_e8(u.reshape(b, h, t, d // 8, 8)).reshape(b, h, t, d) + 0.0

    def reconstruct(self, points: Tensor, dtype: torch.dtype) -> Tensor:
        """x̂ = (p + o)·(1/g), channels back in their order, cast to ``dtype``."""
        _, inverse_perm, _, inverse, offsets = self._constants(points.device, points.dtype)
        b, h, t, d = points.shape
        y = (points + offsets) * inverse
        return torch.gather(y, -1, inverse_perm[None, :, None, :].expand(b, h, t, d)).to(dtype)

    def quantize(self, x: Tensor) -> Tensor:
        """Quantize-dequantize (no entropy coding); same shape, dtype and device as ``x``."""
        return self.reconstruct(self.points(x), x.dtype)

    def code_length(self, x: Tensor) -> float:
        """Ideal entropy-coded size of ``x`` (batch, heads, tokens, d) in bits (no header): for fast rate estimates."""
        points = self.points(x)
        b, h, t, d = points.shape
        widths = torch.from_numpy(self.widths)[None, :, None]  # (1, heads, 1, blocks, 8)
        p_half = torch.from_numpy(self.p_half)[None, :, None]
        return code_length(points.reshape(b, h, t, d // 8, 8).cpu(), widths, p_half)

    def stream_parameters(self, batch: int, tokens: int) -> tuple[np.ndarray, np.ndarray]:
        """Per-block widths (n_blocks, 8) and P(c = 1) (n_blocks,) in stream order (batch, heads, tokens, block)."""
        heads, blocks = self.p_half.shape
        widths = np.broadcast_to(self.widths[None, :, None], (batch, heads, tokens, blocks, 8)).reshape(-1, 8)
        p_half = np.broadcast_to(self.p_half[None, :, None], (batch, heads, tokens, blocks)).reshape(-1)
        return widths, p_half


def page_shape(data: bytes) -> tuple[int, int, int, int]:
    """(batch, heads, tokens, d) declared by a page's header (no checks beyond the magic)."""
    if len(data) < _PAGE_HEAD.size or data[:4] != _PAGE_MAGIC:
        raise FormatError("not an lqlib channel page")
    fields = _PAGE_HEAD.unpack(data[: _PAGE_HEAD.size])
    return fields[3], fields[4], fields[5], fields[6]


def _fingerprint(key_codec: ChannelCodec, value_codec: ChannelCodec) -> int:
    """CRC-32 of the two tables' own CRC-32s (a CRC over bytes that end in their CRC is a constant)."""
    return zlib.crc32(key_codec.fingerprint_bytes[-4:] + value_codec.fingerprint_bytes[-4:])


def encode_page(key_codec: ChannelCodec, value_codec: ChannelCodec, keys: Tensor, values: Tensor) -> bytes:
    """Code a page of keys and values (batch, heads, tokens, d) into one ANS stream with its header and CRC."""
    if keys.shape != values.shape or keys.dtype != values.dtype:
        raise InputError(f"keys {tuple(keys.shape)} and values {tuple(values.shape)} must share shape and dtype")
    b, h, t, d = keys.shape
    parts = [codec.points(x) for codec, x in ((key_codec, keys), (value_codec, values))]
    symbols = np.concatenate([points_to_symbols(p.reshape(-1, 8)).cpu().numpy() for p in parts])
    widths, p_half = zip(*(codec.stream_parameters(b, t) for codec in (key_codec, value_codec)))
    words, radius = encode_channel_symbols(
        symbols, np.concatenate(widths), np.concatenate(p_half), symbol_radius(symbols)
    )
    head = _PAGE_HEAD.pack(
        _PAGE_MAGIC,
        _PAGE_VERSION,
        DTYPES.index(keys.dtype),
        b,
        h,
        t,
        d,
        _fingerprint(key_codec, value_codec),
        radius,
        words.size,
    )
    body = head + np.ascontiguousarray(words, dtype="<u4").tobytes()
    return body + _CRC.pack(zlib.crc32(body))


def decode_page(
    key_codec: ChannelCodec, value_codec: ChannelCodec, data: bytes, device: torch.device | str = "cpu"
) -> tuple[Tensor, Tensor]:
    """Inverse of :func:`encode_page`: (keys, values), each (batch, heads, tokens, d), equal bit for bit
    to the codecs' :meth:`ChannelCodec.quantize` of what was encoded.

    Raises :class:`lqlib.FormatError` / :class:`lqlib.ChecksumError` on foreign or corrupted bytes and
    :class:`lqlib.CodecMismatchError` when the page was coded with other tables."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise FormatError(f"expected bytes, got {type(data).__name__}")
    data = bytes(data)
    if len(data) < _PAGE_HEAD.size + _CRC.size or data[:4] != _PAGE_MAGIC:
        raise FormatError("not an lqlib channel page (bad magic or too short)")
    if zlib.crc32(data[:-4]) != _CRC.unpack(data[-4:])[0]:
        raise ChecksumError("channel page checksum mismatch: the data is corrupted or truncated")
    _, version, dtype_code, b, h, t, d, fingerprint, radius, n_words = _PAGE_HEAD.unpack(data[: _PAGE_HEAD.size])
    if version != _PAGE_VERSION or dtype_code >= len(DTYPES):
        raise FormatError(f"channel page version {version} / dtype code {dtype_code} is not supported")
    if len(data) != _PAGE_HEAD.size + 4 * n_words + _CRC.size:
        raise FormatError(f"channel page length {len(data)} does not match its header")
    if fingerprint != _fingerprint(key_codec, value_codec):
        raise CodecMismatchError("this page was coded with other channel tables than this cache's")
    if (h, d) != key_codec.tables.shape or (h, d) != value_codec.tables.shape:
        raise CorruptStreamError(f"page declares {h} heads of dim {d}, the tables hold {key_codec.tables.shape}")
    words = np.frombuffer(data, dtype="<u4", count=n_words, offset=_PAGE_HEAD.size)
    widths, p_half = zip(*(codec.stream_parameters(b, t) for codec in (key_codec, value_codec)))
    n_blocks = 2 * b * h * t * (d // 8)
    symbols = decode_channel_symbols(words, n_blocks, np.concatenate(widths), np.concatenate(p_half), radius)
    dtype = DTYPES[dtype_code]
    work = torch.float64 if dtype == torch.float64 else torch.float32
    points = symbols_to_points(torch.from_numpy(symbols).to(device), work).reshape(2, b, h, t, d)
    return key_codec.reconstruct(points[0], dtype), value_codec.reconstruct(points[1], dtype)
