"""Real key/value vectors from a model's cache, for codec studies on real data.

Keys are taken as the cache stores them (after RoPE), values as computed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..store import memo
from .models import LoadedModel

__all__ = ["KVSample", "capture_kv"]


@dataclass(frozen=True)
class KVSample:
    """Keys and values of one text window.

    Attributes
    ----------
    keys, values : float32, shape (layers, kv_heads, tokens, head_dim).
    source : what was run (model name, corpus, token range).
    """

    keys: Tensor
    values: Tensor
    source: str

    @property
    def head_dim(self) -> int:
        return self.keys.shape[-1]

    def cache_key(self) -> tuple[Tensor, Tensor]:
        """The tensors (the description ``source`` does not change what is computed from them)."""
        return self.keys, self.values


def capture_kv(loaded: LoadedModel, input_ids: Tensor, source: str = "") -> KVSample:
    """Run ``input_ids`` (shape (1, tokens)) through the model and return every layer's K and V
    (stored: :func:`lqlib.store.memo`, keyed by the model's fingerprint and the ids)."""
    if input_ids.dim() != 2 or input_ids.shape[0] != 1:
        raise ValueError(f"expected input_ids of shape (1, tokens), got {tuple(input_ids.shape)}")
    sample = memo("capture_kv", {"model": loaded.fingerprint, "ids": input_ids}, lambda: _capture(loaded, input_ids))
    return KVSample(sample.keys, sample.values, source or f"{loaded.name}, {input_ids.shape[1]} tokens")


@torch.no_grad()
def _capture(loaded: LoadedModel, input_ids: Tensor) -> KVSample:
    from transformers import DynamicCache

    if input_ids.dim() != 2 or input_ids.shape[0] != 1:
        raise ValueError(f"expected input_ids of shape (1, tokens), got {tuple(input_ids.shape)}")
    cache = DynamicCache(config=loaded.config)
    loaded.model(input_ids.to(loaded.model.device), cache=cache, use_cache=True)
    keys = torch.stack([layer.keys[0] for layer in cache.layers]).float().cpu()
    values = torch.stack([layer.values[0] for layer in cache.layers]).float().cpu()
    return KVSample(keys, values, "")
