"""The permutation puzzle's tools: orderings per layer, the error meter, paired ΔPPL intervals."""

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from lqlib.cache.quantized import QuantizeDequantizeCache
from lqlib.coding.codec import E8Codec
from lqlib.ddt import Permuted, ScalarBlockQuantizer, error_moments_for_cache
from lqlib.ddt.permutation import (
    ErrorMeter,
    cache_orderings,
    measure_quantized,
    ordering_summary,
    permuted_quantizers,
)
from lqlib.evaluation.capture import KVSample, capture_kv
from lqlib.evaluation.models import LoadedModel
from lqlib.evaluation.perplexity import perplexity
from lqlib.evaluation.stats import paired_delta_pct


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def tiny():
    """A random GQA Llama: 3 layers, 4 query heads, 2 KV heads of dim 16 (float32)."""
    config = LlamaConfig(
        vocab_size=61,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    torch.manual_seed(0)
    return LoadedModel(LlamaForCausalLM(config).eval(), None, "tiny")


def test_orderings_per_layer_and_path():
    gen = torch.Generator().manual_seed(0)
    layers, d = 3, 16
    # keys of layer l: dim i has scale 2^(i + l) (so sorted = reversed); values: scales reversed (sorted = identity)
    scales = 2.0 ** (torch.arange(d) + torch.arange(layers)[:, None])  # (layers, d)
    keys = torch.randn(layers, 2, 500, d, generator=gen) * scales[:, None, None]
    values = torch.randn(layers, 2, 500, d, generator=gen) * scales.flip(-1)[:, None, None]
    kv = KVSample(keys, values, "synthetic")
    k_sorted, v_sorted = cache_orderings("sorted", kv)
    assert all(torch.equal(p, torch.arange(d - 1, -1, -1)) for p in k_sorted)
    assert all(torch.equal(p, torch.arange(d)) for p in v_sorted)
    k_id, v_id = cache_orderings("identity", kv)
    assert all(torch.equal(p, torch.arange(d)) for p in k_id + v_id)
    k0, v0 = cache_orderings("random", kv, seed=0)
    k1, _ = cache_orderings("random", kv, seed=1)
    assert torch.equal(torch.stack(k0), torch.stack(cache_orderings("random", kv, seed=0)[0]))  # reproducible
    every = [tuple(p.tolist()) for p in k0 + v0 + k1]
    assert len(set(every)) == len(every)  # distinct per layer, path and seed
    assert all(sorted(p) == list(range(d)) for p in every)
    with pytest.raises(ValueError):
        cache_orderings("shuffled", kv)
    with pytest.raises(ValueError):
        cache_orderings("sorted", KVSample(keys, values[..., :8], "bad"))


def test_error_meter_closed_form_and_agreement_with_the_captured_cache(tiny):
    ids = torch.randint(0, 61, (2, 24), generator=torch.Generator().manual_seed(1))
    # x ↦ 1.1·x injects e = 0.1·x in every slot whatever reaches it: relative MSE exactly 0.01
    run = measure_quantized(tiny, ids, ids.clone(), lambda x: 1.1 * x, batch_size=1)
    np.testing.assert_allclose(run.slot_rel_mse, 0.01, rtol=1e-5)
    assert run.rel_mse == pytest.approx(0.01, rel=1e-5)
    # ΔNLL per window agrees with the perplexity harness run directly with the same cache
    q = ScalarBlockQuantizer(3)
    orders_k, orders_v = cache_orderings("random", capture_kv(tiny, ids[:1]), seed=3)
    kq, vq = permuted_quantizers(q, orders_k), permuted_quantizers(q, orders_v)
    run = measure_quantized(tiny, ids, ids.clone(), kq, vq, batch_size=2)
    direct = perplexity(
        tiny.model, ids, ids.clone(), lambda: QuantizeDequantizeCache(kq, tiny.config, vq), progress=False
    )
    np.testing.assert_allclose(run.window_nll, direct.window_nll, rtol=1e-6)
    assert run.ppl == pytest.approx(direct.ppl, rel=1e-6)
    assert run.window_tokens.tolist() == list(direct.window_tokens)
    # layer 0 sees the clean cache: its relative MSE equals tr Σ / E‖x‖² of the captured cache
    kv = capture_kv(tiny, ids[:1])
    one = measure_quantized(tiny, ids[:1], ids[:1].clone(), kq, vq)
    sigma, _, _ = error_moments_for_cache(kv, kq, vq)
    for path, x in enumerate((kv.keys, kv.values)):
        expected = np.trace(sigma[0, path], axis1=-2, axis2=-1).sum() / x[0].double().square().sum(-1).mean(-1).sum()
        assert one.slot_rel_mse[0, path] == pytest.approx(float(expected), rel=1e-6)
    meter = ErrorMeter(2)
    with pytest.raises(ValueError):
        meter.wrap(q, 2, 0)
    with pytest.raises(ValueError):
        meter.relative_mse()


def test_orderings_matter_only_across_blocks(tiny):
    """A within-block reordering leaves the block quantizers' output unchanged; one across blocks does not."""
    x = capture_kv(tiny, torch.randint(0, 61, (1, 40), generator=torch.Generator().manual_seed(2))).keys
    x = torch.cat([x, 3 * x], dim=-1)  # d = 32: four 8-blocks, two scales
    inside = torch.cat([torch.randperm(8, generator=torch.Generator().manual_seed(k)) + 8 * k for k in range(4)])
    across = torch.cat([torch.arange(0, 32, 4) + k for k in range(4)])
    for q in (ScalarBlockQuantizer(4), E8Codec(4.0, rotation="none")):
        plain = Permuted(q, torch.arange(32))(x)
        torch.testing.assert_close(Permuted(q, inside)(x), plain, rtol=1e-6, atol=1e-6)
        assert (Permuted(q, across)(x) - plain).abs().max() > 1e-3


def test_ordering_summary_spreads_and_verdicts():
    rng = np.random.default_rng(3)
    tokens = np.full(20, 100)
    base = rng.uniform(200, 300, 20)
    noise = rng.normal(0, 0.3, (4, 20)) * 100  # independent per configuration

    def row(quantizer, ordering, seed, per_token, mse, noise_row):
        nll = base + per_token * tokens + noise_row
        ci = paired_delta_pct(nll, base, tokens)
        return {
            "quantizer": quantizer,
            "bits": 3,
            "ordering": ordering,
            "seed": seed,
            "rel_mse": mse,
            "delta_pct": ci.value,
            "ci_low": ci.low,
            "ci_high": ci.high,
            "window_nll": nll,
        }

    rows = [
        row("A", "identity", "", 0.05, 0.0200, 0),
        row("A", "sorted", "", 0.10, 0.0201, 0),  # equal MSE
        row("B", "identity", "", 0.05, 0.0200, 0),
        row("B", "random", 1, 0.10, 0.0300, 0),  # follows MSE
        row("C", "identity", "", 0.05, 0.0300, 0),
        row("C", "sorted", "", 0.10, 0.0200, 0),  # against MSE
        row("D", "identity", "", 0.05, 0.0200, noise[0]),
        row("D", "sorted", "", 0.05, 0.0200, noise[1]),
        # random orderings that differ among themselves as much as sorted differs from identity
        row("E", "identity", "", 0.05, 0.02, 0),
        row("E", "sorted", "", 0.08, 0.02, 0),
        row("E", "random", 0, 0.04, 0.02, 0),
        row("E", "random", 1, 0.09, 0.02, 0),
    ]
    summary = {s["quantizer"]: s for s in ordering_summary(rows, base, tokens, mse_tolerance_pct=5.0)}
    assert list(summary) == ["A", "B", "C", "D", "E"]
    a = summary["A"]
    assert a["mse_spread_pct"] == pytest.approx(0.5) and a["bits"] == 3
    assert a["dppl_spread"] == pytest.approx(100 * (np.expm1(0.10) - np.expm1(0.05)))
    assert a["dppl_spread_ci"].startswith("yes") and a["verdict"].startswith("ΔPPL differs at nearly equal MSE")
    assert a["details"]["worst"] == "sorted" and a["details"]["best"] == "identity"
    assert a["details"]["ratio"] == pytest.approx(np.expm1(0.10) / np.expm1(0.05))
    assert summary["B"]["verdict"].startswith("ΔPPL follows MSE") and "random (seed 1) worst" in summary["B"]["verdict"]
    assert summary["C"]["verdict"].startswith("ΔPPL against MSE")
    assert (
        summary["D"]["dppl_spread_ci"].startswith("no") and summary["D"]["verdict"] == "no ΔPPL difference beyond noise"
    )
    e = summary["E"]
    assert e["details"]["random_spread"] == pytest.approx(100 * (np.expm1(0.09) - np.expm1(0.04)))
    assert e["dppl_spread"] == pytest.approx(e["details"]["random_spread"])
    assert e["verdict"].startswith("within the random orderings' own spread")
    assert np.isnan(a["details"]["random_spread"])
    assert set(a) == {"quantizer", "bits", "mse_spread_pct", "dppl_spread", "dppl_spread_ci", "verdict", "details"}
    with pytest.raises(ValueError):
        ordering_summary([], base, tokens)
