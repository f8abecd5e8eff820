"""A transformers KV cache that really stores the E8 bitstream, and lets attention read it.

Each layer holds its history as

* **sealed pages**: ``page_size`` consecutive tokens of all batch rows and KV heads,
  coded by :class:`lqlib.E8Codec` (RHT, one float16 scale per vector, parity-aware
  rANS) and kept only as the bytes of :meth:`lqlib.Encoded.to_bytes`;
* a **full-precision tail** of the tokens not sealed yet: fewer than
  ``page_size + recent_window`` tokens.

Attention reads ``decode(pages) ++ quantize(tail[:-recent_window]) ++ tail[-recent_window:]``:
with ``recent_window = 0`` (the default) every key and value it reads has passed through
the codec, and since the codec works vector by vector this is bit for bit what the
in-loop path (:class:`lqlib.quantized_cache.QuantizeDequantizeCache`) gives.

Decoding budget: pages are decoded inside ``update`` for that call only; nothing decoded
is kept between calls (no dequantized copy of the history stays resident).
Beam search, ``crop`` and batch reshaping raise :class:`NotImplementedError`.
"""

from __future__ import annotations

import torch
from torch import Tensor
from transformers.cache_utils import Cache, CacheLayerMixin

from .codec import E8Codec, Encoded
from .errors import InputError

__all__ = ["CompressedKVCache", "CompressedKVLayer"]


class CompressedKVLayer(CacheLayerMixin):
    """One attention layer's compressed history (see the module docstring).

    Parameters
    ----------
    codec : the E8 codec (its rotation needs a power-of-two head dim).
    page_size : tokens per sealed page.
    recent_window : most recent tokens that attention reads at full precision (0 allowed).
    """

    is_compileable = False
    is_croppable = False
    is_sliding = False

    def __init__(self, codec: E8Codec, page_size: int = 64, recent_window: int = 0) -> None:
        super().__init__()
        if page_size < 1 or recent_window < 0:
            raise InputError(f"need page_size >= 1 and recent_window >= 0, got {page_size}, {recent_window}")
        self.codec = codec
        self.page_size = page_size
        self.recent_window = recent_window
        self._reset_storage()

    def _reset_storage(self) -> None:
        self.key_pages: list[bytes] = []
        self.value_pages: list[bytes] = []
        self.key_tail: Tensor | None = None
        self.value_tail: Tensor | None = None
        self.n_tokens = 0

    # ------------------------------------------------------------------ transformers API
    def lazy_initialization(self, key_states: Tensor, value_states: Tensor) -> None:
        if key_states.shape != value_states.shape or key_states.dim() != 4:
            raise InputError(f"keys {tuple(key_states.shape)} and values {tuple(value_states.shape)} must share a "
                             "(batch, kv_heads, tokens, head_dim) shape")
        self.dtype, self.device = key_states.dtype, key_states.device
        self.key_tail = key_states[..., :0, :]
        self.value_tail = value_states[..., :0, :]
        self.is_initialized = True

    def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs) -> tuple[Tensor, Tensor]:
        """Append new tokens, seal full pages, and return the keys and values attention reads."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if key_states.dtype != self.dtype or value_states.dtype != self.dtype:
            raise InputError(f"this cache holds {self.dtype}, got keys {key_states.dtype}, values {value_states.dtype}")
        if key_states.shape[:2] != self.key_tail.shape[:2] or key_states.shape[-1] != self.key_tail.shape[-1]:
            raise InputError(f"new keys {tuple(key_states.shape)} do not continue the cached "
                             f"{tuple(self.key_tail.shape[:2])} × {self.key_tail.shape[-1]} layout")
        self.n_tokens += key_states.shape[-2]
        self.key_tail = torch.cat([self.key_tail, key_states], dim=-2)
        self.value_tail = torch.cat([self.value_tail, value_states], dim=-2)
        while self.key_tail.shape[-2] - self.recent_window >= self.page_size:
            self.key_pages.append(self.codec.encode(self.key_tail[..., : self.page_size, :]).to_bytes())
            self.value_pages.append(self.codec.encode(self.value_tail[..., : self.page_size, :]).to_bytes())
            self.key_tail = self.key_tail[..., self.page_size:, :].clone()
            self.value_tail = self.value_tail[..., self.page_size:, :].clone()
        return self._read(self.key_pages, self.key_tail), self._read(self.value_pages, self.value_tail)

    def _read(self, pages: list[bytes], tail: Tensor) -> Tensor:
        decoded = [self.codec.decode(Encoded.from_bytes(page), device=self.device) for page in pages]
        pending = tail.shape[-2] - min(self.recent_window, tail.shape[-2])
        parts = decoded + [self.codec.quantize(tail[..., :pending, :]), tail[..., pending:, :]]
        return torch.cat([p for p in parts if p.shape[-2]], dim=-2) if any(p.shape[-2] for p in parts) else tail

    def get_seq_length(self) -> int:
        return self.n_tokens

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.n_tokens + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self._reset_storage()
        self.is_initialized = False

    def nbytes(self) -> int:
        """Bytes held: the sealed pages' bitstreams plus the full-precision tail."""
        tail = 0 if self.key_tail is None else 2 * self.key_tail.numel() * self.key_tail.element_size()
        return sum(map(len, self.key_pages)) + sum(map(len, self.value_pages)) + tail

    # ------------------------------------------------------------------ unsupported
    def _unsupported(self, what: str):
        raise NotImplementedError(f"CompressedKVCache does not support {what}: its pages are immutable "
                                  "bitstreams; use greedy or sampling decoding with one sequence per prompt")

    def reorder_cache(self, beam_idx) -> None:
        self._unsupported("beam search (reorder_cache)")

    def crop(self, tokens_to_remove: int) -> None:
        self._unsupported("crop (assisted or speculative decoding)")

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._unsupported("batch_repeat_interleave (num_return_sequences > 1 or beam search)")

    def batch_select_indices(self, indices) -> None:
        self._unsupported("batch_select_indices")

    def offload(self):
        self._unsupported("offloading")


class CompressedKVCache(Cache):
    """A KV cache whose history is stored as E8 + rANS bitstreams; pass it to a model as ``cache=``.

    Parameters
    ----------
    config : the model's config (the number of layers is read from it; every layer must be
        full attention).
    bits : the codec's target rate (bits/dim); the stored rate adds the float16 scales
        (16 bits per head vector) and each page's header.
    page_size : tokens per page (per batch row and KV head).
    recent_window : most recent tokens read at full precision (0: none).
    rotation, seed : the codec's rotation (``"rht"`` or ``"none"``) and RHT seed.
    """

    def __init__(self, config, bits: float = 4.0, page_size: int = 64, recent_window: int = 0,
                 rotation: str = "rht", seed: int = 0) -> None:
        text = config.get_text_config(decoder=True)
        kinds = set(getattr(text, "layer_types", None) or ["full_attention"])
        if kinds != {"full_attention"}:
            raise InputError(f"CompressedKVCache supports full-attention layers only, this model has {sorted(kinds)}")
        self.codec = E8Codec(bits, rotation=rotation, scale="vector", seed=seed)
        layers = [CompressedKVLayer(self.codec, page_size, recent_window) for _ in range(text.num_hidden_layers)]
        super().__init__(layers=layers)

    def nbytes(self) -> int:
        """Real bytes held by all layers: page bitstreams (headers, scales, payload, CRC) and tails."""
        return sum(layer.nbytes() for layer in self.layers)
