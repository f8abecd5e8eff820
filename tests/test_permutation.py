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
    OrderingRun,
    QuantizedRun,
    cache_orderings,
    measure_quantized,
    ordering_ratio,
    ordering_summary,
    permuted_quantizers,
)
from lqlib.errors import InputError
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
    sigma = error_moments_for_cache(kv, kq, vq).sigma
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


def _run(quantizer, ordering, seed, nll, mse, base, tokens, bits=3):
    run = QuantizedRun(np.asarray(nll, dtype=np.float64), tokens, mse, np.full((1, 2), mse))
    return OrderingRun(quantizer, bits, ordering, seed, run, paired_delta_pct(nll, base, tokens))


def test_ordering_summary_spreads_and_kinds():
    rng = np.random.default_rng(3)
    tokens = np.full(20, 100)
    base = rng.uniform(200, 300, 20)
    noise = rng.normal(0, 0.3, (4, 20)) * 100  # independent per configuration

    def run(quantizer, ordering, seed, per_token, mse, noise_row):
        return _run(quantizer, ordering, seed, base + per_token * tokens + noise_row, mse, base, tokens)

    runs = [
        run("A", "identity", None, 0.05, 0.0200, 0),
        run("A", "sorted", None, 0.10, 0.0201, 0),  # equal MSE
        run("B", "identity", None, 0.05, 0.0200, 0),
        run("B", "random", 1, 0.10, 0.0300, 0),  # follows MSE
        run("C", "identity", None, 0.05, 0.0300, 0),
        run("C", "sorted", None, 0.10, 0.0200, 0),  # against MSE
        run("D", "identity", None, 0.05, 0.0200, noise[0]),
        run("D", "sorted", None, 0.05, 0.0200, noise[1]),
        # random orderings that differ among themselves as much as sorted differs from identity
        run("E", "identity", None, 0.05, 0.02, 0),
        run("E", "sorted", None, 0.08, 0.02, 0),
        run("E", "random", 0, 0.04, 0.02, 0),
        run("E", "random", 1, 0.09, 0.02, 0),
    ]
    summary = {s.quantizer: s for s in ordering_summary(runs, base, tokens, mse_tolerance_pct=5.0)}
    assert list(summary) == ["A", "B", "C", "D", "E"]
    a = summary["A"]
    assert a.mse_spread_pct == pytest.approx(0.5) and a.bits == 3 and a.n_orderings == 2
    assert a.dppl_spread == pytest.approx(100 * (np.expm1(0.10) - np.expm1(0.05)))
    assert a.apart and a.significant and a.kind == "equal MSE" and a.nearly_equal_mse
    assert a.worst == "sorted" and a.best == "identity"
    assert a.ratio.value == pytest.approx(np.expm1(0.10) / np.expm1(0.05)) and a.ratio.defined
    assert summary["B"].kind == "follows MSE" and summary["B"].worst == "random (seed 1)"
    assert summary["C"].kind == "against MSE"
    assert not summary["D"].significant and summary["D"].kind == "noise"
    e = summary["E"]
    assert e.random_spread == pytest.approx(100 * (np.expm1(0.09) - np.expm1(0.04)))
    assert e.dppl_spread == pytest.approx(e.random_spread) and e.kind == "random spread"
    assert np.isnan(a.random_spread)
    with pytest.raises(ValueError):
        ordering_summary([], base, tokens)


def test_ordering_ratio_reselects_the_pair_and_refuses_a_vanishing_denominator():
    rng = np.random.default_rng(5)
    tokens = np.full(30, 200)
    base = rng.uniform(400, 600, 30)
    # three exchangeable configurations (the same true ΔPPL) with window noise: the selected max / min
    # ratio is above 1 in every resample, and its interval is that of the re-selected pair
    same = [base + 0.04 * tokens + rng.normal(0, 2, 30) for _ in range(3)]
    ratio = ordering_ratio(same, base, tokens, draws=2000)
    assert ratio.defined and ratio.low >= 1.0 and ratio.value >= 1.0
    deltas = [paired_delta_pct(n, base, tokens).value for n in same]
    assert ratio.value == pytest.approx(max(deltas) / min(deltas))
    assert ratio.numerator.value == pytest.approx(max(deltas)) and ratio.denominator.value == pytest.approx(min(deltas))
    # a clear 2x: the interval holds 2
    double = [base + 0.02 * tokens + rng.normal(0, 0.5, 30), base + 0.04 * tokens + rng.normal(0, 0.5, 30)]
    two = ordering_ratio(double, base, tokens)
    assert 1.8 < two.low < two.value < two.high < 2.2
    # a best configuration whose ΔPPL is not distinguishable from zero: undefined, never infinite
    zero = [base + rng.normal(0, 2, 30), base + 0.04 * tokens]
    undefined = ordering_ratio(zero, base, tokens)
    assert not undefined.defined and np.isnan(undefined.value) and undefined.denominator.low <= 0
    with pytest.raises(InputError):
        ordering_ratio(same[:1], base, tokens)
