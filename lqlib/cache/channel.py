"""The calibrated configuration of :class:`lqlib.CompressedKVCache`: channel codecs, pre-RoPE keys, sink tokens.

A :class:`ChannelProfile` holds, for every layer, the :class:`~lqlib.coding.channel_codec.ChannelTables`
of its keys and of its values (calibrated by :func:`lqlib.calibrate`), whether keys are coded in the
pre-RoPE frame (:mod:`lqlib.cache.invariances`) and how many leading *sink* tokens are kept as
float16 (the first tokens of a sequence draw a large share of the attention of every later query,
and an error there reaches every query).

:class:`ChannelKVLayer` is :class:`~lqlib.cache.compressed.CompressedKVLayer` with these codecs:
tokens wait in the tail and, ``page_size`` at a time, become pages of
:func:`~lqlib.coding.channel_codec.encode_page` (keys and values in one ANS stream); the first
``sink`` tokens of page 0 go to a float16 store instead. A page's keys are unrotated with the
positions they hold before coding and rotated back after decoding. The tables are held once per
layer as bytes and counted in :meth:`ChannelKVLayer.nbytes`.

:class:`ChannelQuantizer` is the in-loop twin for :class:`~lqlib.cache.quantized.QuantizeDequantizeCache`:
it gives, bit for bit, the keys and values the cache's attention reads (with ``recent_window = 0``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..coding.channel_codec import ChannelCodec, ChannelTables, decode_page, encode_page
from ..errors import InputError
from .compressed import CompressedKVLayer
from .invariances import RotaryFrame

__all__ = ["ChannelProfile", "ChannelKVLayer", "ChannelQuantizer", "channel_layers", "held_bytes", "sink_dtype"]


def sink_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype sink tokens are stored in: bfloat16 stays bfloat16, everything else becomes float16."""
    return torch.bfloat16 if dtype == torch.bfloat16 else torch.float16


def _to_sink(x: Tensor) -> Tensor:
    stored = x.to(sink_dtype(x.dtype))
    if stored.numel() and not bool(torch.isfinite(stored).all()):
        raise InputError("a sink token does not fit float16 (NaN, Inf or |x| > 65504)")
    return stored


@dataclass(frozen=True, eq=False)
class ChannelProfile:
    """A calibrated cache configuration.

    Attributes
    ----------
    tables : per layer, the (key, value) :class:`ChannelTables`.
    frame : the rotary frame keys are coded in (None: keys coded as cached, after RoPE).
    sink : leading tokens stored as float16 instead of coded.
    """

    tables: tuple[tuple[ChannelTables, ChannelTables], ...]
    frame: RotaryFrame | None = None
    sink: int = 1

    def __post_init__(self) -> None:
        if self.sink < 0:
            raise InputError(f"sink must be >= 0, got {self.sink}")
        if self.frame is not None and any(k.shape[1] != self.frame.head_dim for k, _ in self.tables):
            raise InputError("the rotary frame's head dim does not match the tables")

    @property
    def n_layers(self) -> int:
        return len(self.tables)

    def codecs(self) -> list[tuple[ChannelCodec, ChannelCodec]]:
        """One (key, value) codec pair per layer."""
        return [(ChannelCodec(k), ChannelCodec(v)) for k, v in self.tables]

    def quantizers(self) -> tuple[list[ChannelQuantizer], list[ChannelQuantizer]]:
        """Per-layer key and value quantizers for :class:`~lqlib.cache.quantized.QuantizeDequantizeCache`."""
        pairs = self.codecs()
        keys = [ChannelQuantizer(k, self.frame, self.sink) for k, _ in pairs]
        values = [ChannelQuantizer(v, None, self.sink) for _, v in pairs]
        return keys, values

    def tables_nbytes(self) -> int:
        """Bytes of every layer's tables, as each cache holds them."""
        return sum(k.nbytes() + v.nbytes() for k, v in self.tables)


class ChannelQuantizer:
    """In-loop quantizer of one slot: positions < sink → float16, later ones → the channel codec
    (keys in the rotary frame when ``frame`` is given). Called as ``q(x, start)`` for x of shape
    (batch, heads, tokens, d) holding positions start, start + 1, ..."""

    positional = True

    def __init__(self, codec: ChannelCodec, frame: RotaryFrame | None, sink: int) -> None:
        self.codec, self.frame, self.sink = codec, frame, sink

    def coded(self, x: Tensor, start: int) -> Tensor:
        """The codec's quantize-dequantize of tokens at positions ≥ ``sink`` (no sink handling)."""
        if self.frame is None:
            return self.codec.quantize(x)
        work = torch.float64 if x.dtype == torch.float64 else torch.float32
        inner = self.frame.unrotate(x.to(work), start).to(x.dtype)
        return self.frame.rotate(self.codec.quantize(inner).to(work), start).to(x.dtype)

    def __call__(self, x: Tensor, start: int = 0) -> Tensor:
        n = min(max(self.sink - start, 0), x.shape[-2])
        if x.shape[-2] == 0:
            return x
        parts = []
        if n:
            parts.append(_to_sink(x[..., :n, :]).to(x.dtype))
        if n < x.shape[-2]:
            parts.append(self.coded(x[..., n:, :], start + n))
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=-2)


class ChannelKVLayer(CompressedKVLayer):
    """One layer of a :class:`~lqlib.CompressedKVCache` configured by a :class:`ChannelProfile`.

    Pages cover positions [i·page_size, (i + 1)·page_size) as in the parent; when page 0 is sealed its
    first ``sink`` tokens move to a float16 store and the page codes the rest. Until then they wait in
    the tail like every token, and are read float16-rounded (as the in-loop twin gives them)."""

    def __init__(
        self,
        key_codec: ChannelCodec,
        value_codec: ChannelCodec,
        frame: RotaryFrame | None,
        sink: int,
        page_size: int = 64,
        recent_window: int = 0,
    ) -> None:
        if not 0 <= sink < page_size:
            raise InputError(f"need 0 <= sink < page_size, got sink={sink}, page_size={page_size}")
        self.key_quantizer = ChannelQuantizer(key_codec, frame, sink)
        self.value_quantizer = ChannelQuantizer(value_codec, None, sink)
        self.sink = sink
        self.table_bytes = key_codec.tables.to_bytes() + value_codec.tables.to_bytes()
        super().__init__(None, page_size, recent_window)

    @staticmethod
    def _check_codecs(codec, value_codec) -> None:
        """The parent's E8 codecs are unused here: the channel codecs were checked by their quantizers."""

    def _reset_storage(self) -> None:
        super()._reset_storage()
        self.sink_keys: Tensor | None = None
        self.sink_values: Tensor | None = None

    def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs) -> tuple[Tensor, Tensor]:
        """The parent's transactional update; the float16 sink tokens, which sealing the first page sets
        before the parent commits, go back to what they were if the update fails."""
        sink = (self.sink_keys, self.sink_values)
        try:
            return super().update(key_states, value_states, *args, **kwargs)
        except BaseException:
            self.sink_keys, self.sink_values = sink
            raise

    def _seal(self, keys: Tensor, values: Tensor, index: int = 0) -> tuple[bytes, ...]:
        start = index * self.page_size
        if start == 0 and self.sink:
            self.sink_keys, self.sink_values = (
                _to_sink(keys[..., : self.sink, :]),
                _to_sink(values[..., : self.sink, :]),
            )
            keys, values, start = keys[..., self.sink :, :], values[..., self.sink :, :], self.sink
        return (
            encode_page(self.key_quantizer.codec, self.value_quantizer.codec, _frame_in(self, keys, start), values),
        )

    def _open_at(self, page: tuple[bytes, ...], start: int) -> Tensor:
        keys, values = decode_page(self.key_quantizer.codec, self.value_quantizer.codec, page[0], self.device)
        frame = self.key_quantizer.frame
        if frame is not None:
            work = torch.float64 if keys.dtype == torch.float64 else torch.float32
            keys = frame.rotate(keys.to(work), start).to(keys.dtype)
        return torch.stack([keys, values])

    def _check_codable(self, keys: Tensor, values: Tensor) -> None:
        self.key_quantizer.codec.check(keys)
        self.value_quantizer.codec.check(values)

    def _read(self, pages: list[tuple[bytes, ...]], key_tail: Tensor, value_tail: Tensor) -> tuple[Tensor, Tensor]:
        """Sink tokens, every decoded page, the quantized pending tail and the recent window."""
        pending = key_tail.shape[-2] - min(self.recent_window, key_tail.shape[-2])
        parts = []
        if pages and self.sink:
            parts.append(torch.stack([self.sink_keys, self.sink_values]).to(self.dtype))
        parts += [self._open_at(page, max(i * self.page_size, self.sink)) for i, page in enumerate(pages)]
        if pending:
            start = len(pages) * self.page_size
            parts.append(
                torch.stack(
                    [
                        self.key_quantizer(key_tail[..., :pending, :], start),
                        self.value_quantizer(value_tail[..., :pending, :], start),
                    ]
                )
            )
        parts.append(torch.stack([key_tail[..., pending:, :], value_tail[..., pending:, :]]))
        history = torch.cat(parts, dim=-2)
        return history[0], history[1]

    def nbytes(self) -> int:
        """Bytes held: pages, the full-precision tail, the float16 sink tokens and the tables."""
        sink = 0 if self.sink_keys is None else 2 * self.sink_keys.numel() * self.sink_keys.element_size()
        return super().nbytes() + sink + len(self.table_bytes)


def _frame_in(layer: ChannelKVLayer, keys: Tensor, start: int) -> Tensor:
    """Keys in the frame they are coded in (unrotated at positions start, start + 1, ... if pre-RoPE)."""
    frame = layer.key_quantizer.frame
    if frame is None:
        return keys
    work = torch.float64 if keys.dtype == torch.float64 else torch.float32
    return frame.unrotate(keys.to(work), start).to(keys.dtype)


def held_bytes(layer: ChannelKVLayer, keys: Tensor, values: Tensor) -> int:
    """The bytes ``layer`` (empty) would hold after ``update(keys, values)``, without decoding anything:
    for rate measurements (equal to ``nbytes()`` after the update; tested)."""
    if layer.n_tokens or layer.is_initialized:
        raise InputError("held_bytes measures an empty layer")
    tokens = keys.shape[-2]
    full = max(tokens - layer.recent_window, 0) // layer.page_size * layer.page_size
    try:
        layer.lazy_initialization(keys, values)
        for start in range(0, full, layer.page_size):
            span = slice(start, start + layer.page_size)
            layer.pages.append(layer._seal(keys[..., span, :], values[..., span, :], start // layer.page_size))
        layer.key_tail, layer.value_tail = keys[..., full:, :], values[..., full:, :]
        return layer.nbytes()
    finally:
        layer.reset()


def channel_layers(config, profile: ChannelProfile, page_size: int, recent_window: int) -> list[ChannelKVLayer]:
    """The layers of a cache for ``config`` configured by ``profile`` (one per layer, shapes checked)."""
    text = config.get_text_config(decoder=True)
    kinds = set(getattr(text, "layer_types", None) or ["full_attention"])
    if kinds != {"full_attention"}:
        raise InputError(f"CompressedKVCache supports full-attention layers only, this model has {sorted(kinds)}")
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    shape = (getattr(text, "num_key_value_heads", None) or text.num_attention_heads, head_dim)
    if profile.n_layers != text.num_hidden_layers or any(
        k.shape != shape or v.shape != shape for k, v in profile.tables
    ):
        raise InputError(
            f"the profile holds {profile.n_layers} layers of tables {profile.tables[0][0].shape}; this model has "
            f"{text.num_hidden_layers} layers of {shape[0]} KV heads of dim {shape[1]}"
        )
    return [
        ChannelKVLayer(key_codec, value_codec, profile.frame, profile.sink, page_size, recent_window)
        for key_codec, value_codec in profile.codecs()
    ]
