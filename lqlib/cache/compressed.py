"""A transformers KV cache that really stores the E8 bitstream, and lets attention read it.

Each layer holds its history as

* **sealed pages**: the keys and values of ``page_size`` consecutive tokens of all batch
  rows and KV heads, a (2, batch, kv_heads, page_size, head_dim) tensor coded by
  :class:`lqlib.E8Codec` (RHT, one log-grid step per vector, parity-aware rANS) and kept
  only as the bytes of :meth:`lqlib.Encoded.to_bytes` (one header and CRC per page); when
  keys and values have different rates (a bit schedule), a page is two bitstreams;
* a **full-precision tail** of the tokens not sealed yet: fewer than
  ``page_size + recent_window`` tokens.

Attention reads ``decode(pages) ++ quantize(tail[:-recent_window]) ++ tail[-recent_window:]``:
with ``recent_window = 0`` (the default) every key and value it reads has passed through
the codec, and since the codec works vector by vector this is bit for bit what the
in-loop path (:class:`lqlib.quantized_cache.QuantizeDequantizeCache`) gives.

Decoding budget: pages are decoded inside ``update`` for that call only; nothing decoded
is kept between calls (no dequantized copy of the history stays resident).
Per-channel key scales (calibrated per layer and KV head, held as float16 and counted in
:meth:`CompressedKVCache.nbytes`) divide the keys before coding and multiply them after (the
product saturated to the dtype's finite range, like the codec's reconstruction).
Beam search, ``crop`` and batch reshaping raise :class:`NotImplementedError`.

Updates are transactional: the new tokens are checked, pages sealed and the history read before
any state changes, so an update that raises (NaN, a value out of the codec's range, a wrong
shape) leaves the layer exactly as it was, and later valid updates proceed as if it never came.
"""

from __future__ import annotations

import numbers
from abc import abstractmethod

import numpy as np
import torch
from torch import Tensor
from transformers.cache_utils import Cache, CacheLayerMixin

from ..coding.codec import E8Codec, Encoded, saturate
from ..errors import InputError

__all__ = [
    "CompressedKVCache",
    "CompressedKVLayer",
    "CodedHistoryLayer",
    "schedule_codecs",
    "layer_codecs",
    "check_key_scales",
]


def schedule_codecs(
    bits: float | np.ndarray, n_layers: int, rotation: str = "rht", seed: int = 0
) -> list[tuple[E8Codec, E8Codec]]:
    """(key codec, value codec) of every layer for one rate or a (layers, 2) bit schedule;
    layers at the same rate share one codec (and so its cached RHT and tables)."""
    try:
        schedule = np.asarray(bits, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise InputError(f"bits must be a rate or a (layers, 2) array of rates, got {bits!r}") from err
    if schedule.ndim == 0:
        schedule = np.full((n_layers, 2), float(schedule))
    if schedule.shape != (n_layers, 2):
        raise InputError(f"a bit schedule must have shape (layers, 2) = ({n_layers}, 2), got {schedule.shape}")
    codecs = {float(b): E8Codec(float(b), rotation=rotation, scale="vector", seed=seed) for b in np.unique(schedule)}
    return [(codecs[float(kb)], codecs[float(vb)]) for kb, vb in schedule]


_SCALE_RANGE = (float(torch.finfo(torch.float16).tiny), float(torch.finfo(torch.float16).max))


def check_key_scales(key_scales: Tensor | None) -> None:
    """Raise unless ``key_scales`` is None or a (kv_heads, head_dim) real tensor whose float16 values
    (how the caches hold them) are normal positive numbers, in [6.1e-05, 65504]: checked after the
    cast, since 1e-8 or 1e6 would become 0 or Inf there."""
    if key_scales is None:
        return
    if not isinstance(key_scales, Tensor) or key_scales.device.type == "meta" or key_scales.dim() != 2:
        raise InputError("key_scales must be a (kv_heads, head_dim) tensor of finite positive scales")
    if key_scales.is_complex() or key_scales.dtype == torch.bool:
        raise InputError(f"key_scales must be real numbers, got dtype {key_scales.dtype}")
    held = key_scales.detach().to(torch.float16)
    low, high = _SCALE_RANGE
    if not bool(((held >= low) & (held <= high)).all()):
        raise InputError(
            f"key_scales are held as float16 and must lie in [{low:.3g}, {high:g}] after that cast "
            "(positive, finite, not subnormal); rescale them"
        )


def layer_codecs(
    config, bits: float | np.ndarray, rotation: str, seed: int, key_scales: Tensor | None, name: str
) -> list[tuple[E8Codec, E8Codec]]:
    """The (key, value) codecs of every layer of ``config`` (full attention only), with the
    (layers, kv_heads, head_dim) shape of ``key_scales`` checked; ``name`` is the cache's, for errors."""
    if not hasattr(config, "get_text_config"):
        raise InputError(f"{name} needs the model's transformers config (model.config), got {type(config).__name__}")
    text = config.get_text_config(decoder=True)
    kinds = set(getattr(text, "layer_types", None) or ["full_attention"])
    if kinds != {"full_attention"}:
        raise InputError(f"{name} supports full-attention layers only, this model has {sorted(kinds)}")
    n_layers = text.num_hidden_layers
    codecs = schedule_codecs(bits, n_layers, rotation, seed)
    if key_scales is not None and (key_scales.dim() != 3 or key_scales.shape[0] != n_layers):
        raise InputError(f"key_scales must have shape (layers={n_layers}, kv_heads, head_dim)")
    return codecs


class CodedHistoryLayer(CacheLayerMixin):
    """What the coded caches' layers share: a token count ``n_tokens`` (set by ``_reset_storage``),
    the mask sizes of full attention, and clear errors for what immutable coded history cannot do."""

    is_compileable = False
    is_croppable = False
    is_sliding = False
    _cache_name = "this cache"
    _why = ""

    @abstractmethod
    def _reset_storage(self) -> None:
        """Drop the history and set ``n_tokens`` to 0."""

    def get_seq_length(self) -> int:
        return self.n_tokens

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.n_tokens + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self._reset_storage()
        self.is_initialized = False

    def _unsupported(self, what: str):
        raise NotImplementedError(f"{self._cache_name} does not support {what}{self._why}")

    def reorder_cache(self, beam_idx) -> None:
        self._unsupported("beam search (reorder_cache)")

    def crop(self, *args, **kwargs) -> None:
        self._unsupported("crop (assisted or speculative decoding)")

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._unsupported("batch_repeat_interleave (repeating the rows of a filled cache)")

    def batch_select_indices(self, indices) -> None:
        self._unsupported("batch_select_indices")

    def offload(self):
        self._unsupported("offloading")

    def prefetch(self):
        self._unsupported("offloading")


class CompressedKVLayer(CodedHistoryLayer):
    """One attention layer's compressed history (see the module docstring).

    Parameters
    ----------
    codec : the E8 codec of the keys (its rotation needs a power-of-two head dim).
    page_size : tokens per sealed page.
    recent_window : most recent tokens that attention reads at full precision (0 allowed).
    value_codec : the codec of the values (default: ``codec``).
    key_scales : per-channel key scales, shape (kv_heads, head_dim), positive (default: none).
    """

    _cache_name = "CompressedKVCache"
    _why = ": its pages are immutable bitstreams; use greedy or sampling decoding (num_return_sequences works)"

    def __init__(
        self,
        codec: E8Codec,
        page_size: int = 64,
        recent_window: int = 0,
        value_codec: E8Codec | None = None,
        key_scales: Tensor | None = None,
    ) -> None:
        super().__init__()
        if not all(isinstance(n, numbers.Integral) and not isinstance(n, bool) for n in (page_size, recent_window)):
            raise InputError(f"page_size and recent_window must be integers, got {page_size!r}, {recent_window!r}")
        if page_size < 1 or recent_window < 0:
            raise InputError(f"need page_size >= 1 and recent_window >= 0, got {page_size}, {recent_window}")
        self._check_codecs(codec, value_codec or codec)
        check_key_scales(key_scales)
        self.codec = codec
        self.value_codec = value_codec or codec
        self.joint = repr(self.codec) == repr(self.value_codec)
        self.key_scales = None if key_scales is None else key_scales.to(torch.float16)
        self.page_size = int(page_size)
        self.recent_window = int(recent_window)
        self._reset_storage()

    @staticmethod
    def _check_codecs(codec, value_codec) -> None:
        """Raise unless both codecs are :class:`~lqlib.E8Codec` (subclasses with their own codecs override)."""
        for c in (codec, value_codec):
            if not isinstance(c, E8Codec):
                raise InputError(f"codec and value_codec must be lqlib.E8Codec instances, got {type(c).__name__}")

    def _reset_storage(self) -> None:
        self.pages: list[tuple[bytes, ...]] = []
        self.key_tail: Tensor | None = None
        self.value_tail: Tensor | None = None
        self.n_tokens = 0

    # ------------------------------------------------------------------ transformers API
    def lazy_initialization(self, key_states: Tensor, value_states: Tensor) -> None:
        if key_states.shape != value_states.shape or key_states.dim() != 4:
            raise InputError(
                f"keys {tuple(key_states.shape)} and values {tuple(value_states.shape)} must share a "
                "(batch, kv_heads, tokens, head_dim) shape"
            )
        self.dtype, self.device = key_states.dtype, key_states.device
        if self.key_scales is not None and self.key_scales.shape != (key_states.shape[1], key_states.shape[-1]):
            raise InputError(
                f"key_scales {tuple(self.key_scales.shape)} do not match {key_states.shape[1]} KV heads "
                f"of dim {key_states.shape[-1]}"
            )
        self.key_tail = key_states[..., :0, :]
        self.value_tail = value_states[..., :0, :]
        self.is_initialized = True

    def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs) -> tuple[Tensor, Tensor]:
        """Append new tokens, seal full pages, and return the keys and values attention reads.

        Transactional: the new tokens are checked, full pages sealed and the history read first; the
        layer's state changes only after all of that succeeded (see the module docstring)."""
        fresh = not self.is_initialized
        if fresh:
            self.lazy_initialization(key_states, value_states)
        try:
            self._check_new_tokens(key_states, value_states)
            key_tail = torch.cat([self.key_tail, key_states], dim=-2)
            value_tail = torch.cat([self.value_tail, value_states], dim=-2)
            sealed = []
            while key_tail.shape[-2] - self.recent_window >= self.page_size:
                index = len(self.pages) + len(sealed)
                page = (key_tail[..., : self.page_size, :], value_tail[..., : self.page_size, :])
                sealed.append(self._seal(*page, index))
                key_tail = key_tail[..., self.page_size :, :].clone()
                value_tail = value_tail[..., self.page_size :, :].clone()
            read = self._read(self.pages + sealed, key_tail, value_tail)
        except BaseException:
            if fresh:
                self.reset()
            raise
        # commit: nothing below can fail
        self.pages.extend(sealed)
        self.key_tail, self.value_tail = key_tail, value_tail
        self.n_tokens += key_states.shape[-2]
        return read

    def _check_new_tokens(self, key_states: Tensor, value_states: Tensor) -> None:
        """Raise :class:`InputError` unless the new tokens continue the cached layout and every one of them
        can be coded (finite, within the codecs' range, keys still finite once divided by their scales):
        a bad token is refused when it comes, not when its page is sealed later."""
        if not isinstance(key_states, Tensor) or not isinstance(value_states, Tensor):
            raise InputError(f"keys and values must be tensors, got {type(key_states).__name__}")
        if key_states.dtype != self.dtype or value_states.dtype != self.dtype:
            raise InputError(f"this cache holds {self.dtype}, got keys {key_states.dtype}, values {value_states.dtype}")
        if (
            key_states.shape != value_states.shape
            or key_states.dim() != 4
            or key_states.shape[:2] != self.key_tail.shape[:2]
            or key_states.shape[-1] != self.key_tail.shape[-1]
        ):
            raise InputError(
                f"new keys {tuple(key_states.shape)} / values {tuple(value_states.shape)} do not continue the "
                f"cached {tuple(self.key_tail.shape[:2])} × {self.key_tail.shape[-1]} layout"
            )
        if key_states.device != self.device or value_states.device != self.device:
            raise InputError(f"this cache lives on {self.device}, got tensors on {key_states.device}")
        keys = key_states
        if self.key_scales is not None:
            if not bool(torch.isfinite(keys).all()):
                raise InputError("keys contain NaN or Inf")
            keys = keys / self._scales(keys.dtype)
            if not bool(torch.isfinite(keys).all()):
                raise InputError(
                    f"keys divided by their key_scales exceed {self.dtype}'s range; use larger key_scales "
                    "or a wider dtype"
                )
        self._check_codable(keys, value_states)

    def _check_codable(self, keys: Tensor, values: Tensor) -> None:
        """Raise :class:`InputError` unless the codecs can code these (scaled) keys and values."""
        self.codec.check(keys)
        self.value_codec.check(values)

    def _scales(self, dtype: torch.dtype) -> Tensor:
        return self.key_scales.to(device=self.device, dtype=dtype)[:, None, :]  # (kv_heads, 1, head_dim)

    def _seal(self, keys: Tensor, values: Tensor, index: int = 0) -> tuple[bytes, ...]:
        """Page ``index`` (positions index·page_size onward) coded as bitstreams."""
        if self.key_scales is not None:
            keys = keys / self._scales(keys.dtype)
        if self.joint:
            return (self.codec.encode(torch.stack([keys, values])).to_bytes(),)
        return self.codec.encode(keys).to_bytes(), self.value_codec.encode(values).to_bytes()

    def _open(self, page: tuple[bytes, ...]) -> Tensor:
        """A sealed page decoded: (2, batch, kv_heads, page_size, head_dim), keys still scaled."""
        if len(page) == 1:
            return self.codec.decode(Encoded.from_bytes(page[0]), device=self.device)
        return torch.stack(
            [
                self.codec.decode(Encoded.from_bytes(page[0]), device=self.device),
                self.value_codec.decode(Encoded.from_bytes(page[1]), device=self.device),
            ]
        )

    def _read(self, pages: list[tuple[bytes, ...]], key_tail: Tensor, value_tail: Tensor) -> tuple[Tensor, Tensor]:
        """Decode ``pages`` and append the tail: the (keys, values) attention reads."""
        pending = key_tail.shape[-2] - min(self.recent_window, key_tail.shape[-2])
        keys, values = key_tail[..., :pending, :], value_tail[..., :pending, :]
        if self.key_scales is not None:
            keys = keys / self._scales(keys.dtype)
        parts = [self._open(page) for page in pages]
        if pending:
            parts.append(
                self.codec.quantize(torch.stack([keys, values]))
                if self.joint
                else torch.stack([self.codec.quantize(keys), self.value_codec.quantize(values)])
            )
        coded = torch.cat(parts, dim=-2) if parts else None
        if coded is not None and self.key_scales is not None:
            coded = torch.stack([saturate(coded[0] * self._scales(coded.dtype), coded.dtype), coded[1]])
        recent = torch.stack([key_tail[..., pending:, :], value_tail[..., pending:, :]])
        history = recent if coded is None else torch.cat([coded, recent], dim=-2)
        return history[0], history[1]

    def nbytes(self) -> int:
        """Bytes held: the sealed pages' bitstreams, the full-precision tail and the key scales."""
        tail = 0 if self.key_tail is None else 2 * self.key_tail.numel() * self.key_tail.element_size()
        scales = 0 if self.key_scales is None else 2 * self.key_scales.numel()
        return sum(len(stream) for page in self.pages for stream in page) + tail + scales


class CompressedKVCache(Cache):
    """A KV cache whose history is stored as E8 + rANS bitstreams; pass it to a model as ``cache=``.

    Parameters
    ----------
    config : the model's config (the number of layers is read from it; every layer must be
        full attention).
    bits : the codec's target rate (bits/dim), or a bit schedule: an array of shape
        (layers, 2) holding each layer's key and value rates. The stored rate adds the step
        codes (about 3–4 bits per head vector) and each page's header and CRC (45 bytes).
    page_size : tokens per page (per batch row and KV head).
    recent_window : most recent tokens read at full precision (0: none).
    rotation, seed : the codec's rotation (``"rht"`` or ``"none"``) and RHT seed.
    key_scales : optional per-channel key scales, shape (layers, kv_heads, head_dim).
    profile : a calibrated configuration (:class:`lqlib.cache.channel.ChannelProfile`, made by
        :func:`lqlib.calibrate`): channel codecs with calibrated tables, pre-RoPE keys and float16 sink
        tokens instead of ``bits``, ``rotation``, ``seed`` and ``key_scales``.
    """

    def __init__(
        self,
        config,
        bits: float | np.ndarray = 4.0,
        page_size: int = 64,
        recent_window: int = 0,
        rotation: str = "rht",
        seed: int = 0,
        key_scales: Tensor | None = None,
        profile=None,
    ) -> None:
        self.profile = profile
        if profile is not None:
            from .channel import channel_layers  # imports this module

            self.codec = None
            super().__init__(layers=channel_layers(config, profile, page_size, recent_window))
            return
        codecs = layer_codecs(config, bits, rotation, seed, key_scales, "CompressedKVCache")
        self.codec = codecs[0][0]
        layers = [
            CompressedKVLayer(
                key_codec, page_size, recent_window, value_codec, None if key_scales is None else key_scales[i]
            )
            for i, (key_codec, value_codec) in enumerate(codecs)
        ]
        super().__init__(layers=layers)

    def update(
        self, key_states: Tensor, value_states: Tensor, layer_idx: int, *args, **kwargs
    ) -> tuple[Tensor, Tensor]:
        """transformers' ``Cache.update``, with ``layer_idx`` checked against the config's layer count."""
        n = len(self.layers)
        if isinstance(layer_idx, bool) or not isinstance(layer_idx, numbers.Integral) or not 0 <= layer_idx < n:
            raise InputError(
                f"layer_idx must be an integer in [0, {n}) (this cache was made for a config of {n} layers), "
                f"got {layer_idx!r}; build the cache from the config of the model that uses it"
            )
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)

    def nbytes(self) -> int:
        """Real bytes held by all layers: page bitstreams (headers, step codes, payload, CRC) and tails."""
        return sum(layer.nbytes() for layer in self.layers)
