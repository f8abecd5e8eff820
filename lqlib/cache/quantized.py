"""The in-loop quantize-dequantize KV cache: the fast path for perplexity studies.

Every key and value written to the cache is replaced by ``quantizer(x)`` before
attention reads it — the current chunk's own keys and values included — so a
single forward pass over a window measures the model with a quantized cache.
It stores the dequantized values (it is a simulation of the codec's effect on
attention, not a memory saving; the compressed cache is another class).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from torch import Tensor
from transformers import DynamicCache

__all__ = ["QuantizeDequantizeCache"]

Quantizer = Callable[[Tensor], Tensor]


class QuantizeDequantizeCache(DynamicCache):
    """A ``DynamicCache`` whose writes pass through ``quantizer``.

    Parameters
    ----------
    quantizer : maps a (batch, kv_heads, tokens, head_dim) tensor to one of the same
        shape and dtype, e.g. ``lqlib.E8Codec(4.0).quantize``; vector-wise and causal.
        A sequence gives one quantizer per layer (a bit schedule). A quantizer with a true
        ``positional`` attribute is called as ``quantizer(x, start)``, ``start`` the position of
        the first token of x (the number of tokens the layer held before).
    config : the model config (lets transformers lay out the layers).
    value_quantizer : a different quantizer (or sequence) for the values (default: ``quantizer``).
    """

    def __init__(
        self,
        quantizer: Quantizer | Sequence[Quantizer],
        config=None,
        value_quantizer: Quantizer | Sequence[Quantizer] | None = None,
    ) -> None:
        super().__init__(config=config)
        self.quantizer = quantizer
        self.value_quantizer = value_quantizer or quantizer

    def update(self, key_states: Tensor, value_states: Tensor, layer_idx: int, *args, **kwargs):
        key_q = self.quantizer if callable(self.quantizer) else self.quantizer[layer_idx]
        value_q = self.value_quantizer if callable(self.value_quantizer) else self.value_quantizer[layer_idx]
        start = self.get_seq_length(layer_idx) if len(self.layers) > layer_idx else 0
        return super().update(
            _apply(key_q, key_states, start), _apply(value_q, value_states, start), layer_idx, *args, **kwargs
        )


def _apply(quantizer: Quantizer, x: Tensor, start: int) -> Tensor:
    """``quantizer(x)``, or ``quantizer(x, start)`` for a positional one (``quantizer.positional``): x holds
    positions start, start + 1, ... (e.g. :class:`lqlib.cache.channel.ChannelQuantizer`)."""
    return quantizer(x, start) if getattr(quantizer, "positional", False) else quantizer(x)
