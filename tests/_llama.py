"""A tiny random-weight Llama for the cache tests, and greedy graphed decoding of its logits."""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def tiny_llama(layers: int = 2, dtype: torch.dtype = torch.float32):
    """(config, model): 4 query heads, 2 KV heads, head dim 64, vocabulary 97, seeded weights."""
    config = LlamaConfig(
        vocab_size=97,
        hidden_size=256,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=64,
    )
    torch.manual_seed(0)
    return config, LlamaForCausalLM(config).eval().to(device=DEVICE, dtype=dtype)


def graphed_logits(model, config, ids: torch.Tensor, attention: str, steps: int = 3) -> torch.Tensor:
    """Logits (steps + 1, batch, vocab) float32 of a StaticCache (capacity 20) decoded greedily by
    :class:`lqlib.cache.decode_graph.GraphedDecoder` with ``attention`` set on the model."""
    from transformers import StaticCache

    from lqlib.cache.decode_graph import GraphedDecoder

    model.set_attn_implementation(attention)
    decoder = GraphedDecoder(model, StaticCache(config=config, max_cache_len=20), warmup=1)
    decoder.prefill(ids)
    out = [decoder.logits.float().clone()]
    for _ in range(steps):
        decoder.step()
        out.append(decoder.logits.float().clone())
    return torch.stack(out)
