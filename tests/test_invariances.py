"""Exact invariances of attention, and the rotary frame the channel codec codes keys in."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

from lqlib import InputError
from lqlib.cache.invariances import RotaryFrame, rotary_frame
from lqlib.cache.quantized import QuantizeDequantizeCache


def tiny_config(**kw) -> LlamaConfig:
    base = {
        "num_hidden_layers": 2,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 32,
        "vocab_size": 97,
    }
    return LlamaConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    config = tiny_config()
    return config, LlamaForCausalLM(config).eval().double()


def attention(q, k, v):
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def test_key_shift_leaves_attention_unchanged():
    """softmax(q·(k_t + c)) = softmax(q·k_t): one vector added to every key of a head changes nothing."""
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 3, 50, 16, generator=g, dtype=torch.float64) for _ in range(3))
    c = 5.0 * torch.randn(2, 3, 1, 16, generator=g, dtype=torch.float64)
    torch.testing.assert_close(attention(q, k + c, v), attention(q, k, v), rtol=1e-12, atol=1e-12)
    # a shift that varies over tokens is no invariance
    varying = torch.randn(2, 3, 50, 16, generator=g, dtype=torch.float64)
    assert (attention(q, k + varying, v) - attention(q, k, v)).abs().max() > 1e-3


def test_value_mean_can_be_added_after_attention():
    """Σ_t p_t = 1: attention over v − c, plus c, is attention over v."""
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(1, 2, 40, 16, generator=g, dtype=torch.float64) for _ in range(3))
    c = 3.0 * torch.randn(1, 2, 1, 16, generator=g, dtype=torch.float64)
    torch.testing.assert_close(attention(q, k, v - c) + c, attention(q, k, v), rtol=1e-12, atol=1e-12)


def test_key_shift_in_a_model_changes_no_logit(tiny):
    """In a whole model (causal mask, GQA, every layer), shifting each head's cached keys by a constant
    vector leaves the logits unchanged up to float rounding."""
    config, model = tiny
    shift = torch.randn(1, 2, 1, 32, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    ids = torch.randint(0, 97, (2, 60), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        clean = model(ids).logits
        shifted = model(ids, cache=QuantizeDequantizeCache(lambda k: k + shift, config, lambda v: v), use_cache=True)
    torch.testing.assert_close(shifted.logits, clean, rtol=1e-10, atol=1e-10)


def test_rotary_frame_is_the_models_rope(tiny):
    config, _ = tiny
    frame = rotary_frame(config)
    x = torch.randn(1, 2, 70, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    emb = LlamaRotaryEmbedding(config)
    positions = torch.arange(30, 100)[None]
    cos, sin = emb(x.float(), positions)
    _, theirs = apply_rotary_pos_emb(x, x, cos.double(), sin.double())
    # transformers computes the angles in float32: agreement to its rounding
    torch.testing.assert_close(frame.rotate(x, 30), theirs, rtol=1e-4, atol=2e-5)
    torch.testing.assert_close(frame.unrotate(frame.rotate(x, 30), 30), x, rtol=1e-12, atol=1e-12)
    # norms are kept: a rotation per position
    torch.testing.assert_close(frame.rotate(x, 5).norm(dim=-1), x.norm(dim=-1), rtol=1e-12, atol=0)


def test_unrotated_cache_keys_are_the_key_projection(tiny):
    """What the cache receives, unrotated at its positions, is k_proj's output: the pre-RoPE frame."""
    config, model = tiny
    frame = rotary_frame(config)
    seen, projected = [], []
    ids = torch.randint(0, 97, (1, 40), generator=torch.Generator().manual_seed(6))
    hook = model.model.layers[1].self_attn.k_proj.register_forward_hook(
        lambda _m, _i, out: projected.append(out.view(1, 40, 2, 32).transpose(1, 2))
    )

    def record(k):
        seen.append(k)
        return k

    try:
        with torch.no_grad():
            model(ids, cache=QuantizeDequantizeCache(record, config, lambda v: v), use_cache=True)
    finally:
        hook.remove()
    # (transformers' cos and sin are float32 even in a float64 model: agreement to that rounding)
    torch.testing.assert_close(frame.unrotate(seen[1], 0), projected[0], rtol=1e-5, atol=1e-6)


def test_frames_that_a_cache_cannot_reproduce_are_refused():
    with pytest.raises(InputError):
        rotary_frame(tiny_config(partial_rotary_factor=0.5))
    with pytest.raises(InputError):
        rotary_frame(tiny_config(rope_parameters={"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0}))
    with pytest.raises(InputError):
        RotaryFrame(np.array([]))
    with pytest.raises(InputError):
        rotary_frame(tiny_config()).rotate(torch.zeros(1, 1, 2, 16), 0)
