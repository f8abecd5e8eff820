"""The float16 split-K decode attention (the coded caches' baseline) against its torch reference."""

from __future__ import annotations

import os

import pytest
import torch

import lqlib

from ._llama import graphed_logits, tiny_llama

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
kernels_ok = DEVICE == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"
needs_kernels = pytest.mark.skipif(not kernels_ok, reason="the kernels need CUDA or TRITON_INTERPRET=1")


@needs_kernels
@pytest.mark.parametrize("d, splits", [(64, 3), (32, None)])
def test_split_k_attention_matches_the_reference(d, splits):
    dtype = torch.float16
    from lqlib.kernels import fp16_attention as fa
    from lqlib.kernels.attention import AttentionConfig

    b, hkv, hq, cap = 2, 2, 6, 70
    gen = torch.Generator().manual_seed(3)
    k, v = (torch.randn(2, b, hkv, cap, d, generator=gen) * 2).to(dtype).to(DEVICE)
    q = torch.randn(b, hq, d, generator=gen).to(dtype).to(DEVICE)
    lengths = torch.tensor([cap, 23], device=DEVICE)
    cfg = AttentionConfig(block_n=16, splits=splits)
    for length in (lengths, 41):
        got = fa.decode_attention(q, k, v, length, config=cfg).float()
        ref = fa.reference_decode_attention(q, k, v, length).float()
        assert (got - ref).abs().max() <= 3e-3 * ref.abs().max(), (got - ref).abs().max()
    # the tokens past a row's length are not read: changing them changes nothing
    k2 = k.clone()
    k2[1, :, 23:] = 1e3
    assert torch.equal(
        fa.decode_attention(q, k2, v, lengths, config=cfg), fa.decode_attention(q, k, v, lengths, config=cfg)
    )
    assert not torch.equal(
        fa.decode_attention(q, k2, v, cap, config=cfg), fa.decode_attention(q, k, v, cap, config=cfg)
    )


def test_clear_errors():
    from lqlib.kernels import fp16_attention as fa

    q = torch.zeros(1, 4, 64, dtype=torch.float16)
    k = torch.zeros(1, 2, 8, 64, dtype=torch.float16)
    with pytest.raises(lqlib.InputError, match="length"):
        fa.reference_decode_attention(q, k, k, 9)
    with pytest.raises(lqlib.InputError, match="multiple"):
        fa.reference_decode_attention(q[:, :3], k, k, 4)
    with pytest.raises(lqlib.InputError, match="dtype"):
        fa.reference_decode_attention(q, k.float(), k.float(), 4)
    with pytest.raises(lqlib.InputError, match="float16"):
        fa.reference_decode_attention(q.bfloat16(), k.bfloat16(), k.bfloat16(), 4)


def test_mask_lengths_count_the_attended_prefix():
    from lqlib.cache.decode_graph import mask_lengths

    mask = torch.zeros(2, 1, 1, 10, dtype=torch.bool)
    mask[0, ..., :7] = True
    mask[1, ..., :3] = True
    assert mask_lengths(mask, 10, 2).tolist() == [7, 3]
    additive = torch.where(mask, 0.0, float("-inf"))
    assert mask_lengths(additive, 10, 2).tolist() == [7, 3]
    assert mask_lengths(mask[:1], 10, 2).tolist() == [7, 7]  # one mask row broadcast over the batch
    assert mask_lengths(None, 10, 2) == 10


@needs_kernels
@pytest.mark.slow
def test_split_k_baseline_in_a_model_gives_sdpa_logits(monkeypatch):
    """A float16 Llama with StaticCache gives logits within float16 rounding of SDPA's with the split-K
    attention, and the kernel serves its decode steps."""
    from lqlib.cache.decode_graph import register_fp16_decode_attention
    from lqlib.kernels import fp16_attention

    calls = []
    kernel = fp16_attention.decode_attention
    monkeypatch.setattr(fp16_attention, "decode_attention", lambda *a, **k: calls.append(a[3]) or kernel(*a, **k))
    config, model = tiny_llama(dtype=torch.float16)
    ids = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(9)).to(DEVICE)
    logits = {impl: graphed_logits(model, config, ids, impl) for impl in ("sdpa", register_fp16_decode_attention(True))}
    a, b = logits.values()
    assert torch.allclose(a, b, atol=2e-2, rtol=0) and a.abs().max() > 0.1, (a - b).abs().max()
    # the kernel served every decode step of both layers, with the lengths the mask allows (10 .. 13);
    # on CUDA the steps after the recorded one replay its graph without calling Python
    if DEVICE == "cpu":
        assert len(calls) == 2 * 4 and [int(c[0]) for c in calls[::2]] == [10, 11, 12, 13]
    else:
        assert len(calls) >= 2 * 2 and int(calls[0][0]) == 10
