"""Paper IV's sensitivities and bit schedules: first-order formulas against simulation, budgets met."""

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from lqlib.alloc.schedule import (
    channel_scales,
    fit_schedule,
    schedule_quantizers,
    uniform_schedule,
)
from lqlib.alloc.sensitivity import attention_sensitivity, propagation_factors
from lqlib.cache.compressed import CompressedKVCache
from lqlib.cache.quantized import QuantizeDequantizeCache
from lqlib.evaluation.capture import capture_kv
from lqlib.evaluation.harness import compressed_cache_rate
from lqlib.evaluation.models import LoadedModel
from lqlib.evaluation.perplexity import perplexity


@pytest.fixture(scope="module")
def tiny():
    """A random GQA Llama: 2 layers, 4 query heads, 2 KV heads of dim 16, in float64."""
    config = LlamaConfig(
        vocab_size=53,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).double().eval()
    return LoadedModel(model, None, "tiny"), torch.randint(0, 53, (2, 24))


def _noisy_attention_output(loaded, ids, layer, path, sigma, trials=200):
    """Mean over positions of E‖δo_i‖² at layer ``layer``'s o_proj input when the K or V of that layer
    gets independent noise of per-dimension variance sigma²·ms(vector)."""
    captured = {}
    attn = loaded.model.model.layers[layer].self_attn
    handle = attn.o_proj.register_forward_pre_hook(lambda _m, inputs: captured.__setitem__("o", inputs[0]))
    generator = torch.Generator().manual_seed(1)

    def noise(x):
        ms = x.square().mean(-1, keepdim=True)
        return x + sigma * ms.sqrt() * torch.randn(x.shape, generator=generator, dtype=x.dtype)

    ident = [lambda t: t] * 2
    try:
        with torch.no_grad():
            loaded.model(ids, use_cache=False)
            clean = captured["o"].clone()
            total = 0.0
            for _ in range(trials):
                keys, values = list(ident), list(ident)
                (keys if path == 0 else values)[layer] = noise
                loaded.model(ids, cache=QuantizeDequantizeCache(keys, loaded.config, values), use_cache=True)
                total += float((captured["o"] - clean).square().sum()) / (ids.shape[0] * ids.shape[1])
    finally:
        handle.remove()
    return total / trials


@pytest.mark.parametrize("path", [0, 1])
@pytest.mark.slow
def test_weights_match_noise_simulation(tiny, path):
    """V: the first-order formula is exact (attention is linear in V); K: small noise, first order."""
    loaded, ids = tiny
    stats = attention_sensitivity(loaded, ids, progress=False)
    sigma = 1e-3
    for layer in (0, 1):
        predicted = (stats["weight_k"] if path == 0 else stats["weight_v"])[layer].sum() * sigma**2
        measured = _noisy_attention_output(loaded, ids, layer, path, sigma)
        assert measured == pytest.approx(predicted, rel=0.12), (layer, path)


def test_eta_sigma_factors(tiny):
    """η_V = mean ‖a_i‖² lies in [1/T-ish, group size]; σ² are mean squares; weights ≈ d·η·σ² in size."""
    loaded, ids = tiny
    stats = attention_sensitivity(loaded, ids, progress=False)
    group = 2
    assert np.all(stats["eta_v"] > 0) and np.all(stats["eta_v"] <= group + 1e-9)
    kv = capture_kv(loaded, ids[:1])
    assert np.all(stats["sigma2_v"] > 0) and np.all(stats["sigma2_k"] > 0)
    ratio = stats["weight_v"] / (16 * stats["eta_v"] * stats["sigma2_v"])
    assert np.all((ratio > 0.2) & (ratio < 5))
    assert kv.keys.shape[:2] == stats["eta_k"].shape


def test_propagation_is_linear_in_small_noise(tiny):
    loaded, ids = tiny
    small = propagation_factors(loaded, ids, relative_noise=1e-4, progress=False)
    smaller = propagation_factors(loaded, ids, relative_noise=1e-5, progress=False)
    assert np.all(small > 0)
    np.testing.assert_allclose(small, smaller, rtol=0.05)


def test_fit_schedule_meets_the_measured_budget(tiny):
    loaded, _ = tiny
    kv = capture_kv(loaded, torch.randint(0, 53, (1, 256)))  # 4 full pages, no tail
    weights = np.array([[8.0, 1.0], [4.0, 2.0]])
    schedule, rate = fit_schedule(weights, 4.0, kv, grid=0.125)
    assert rate <= 4.0 and rate > 4.0 - 0.2
    assert schedule[0, 0] > schedule[1, 0] > schedule[1, 1] and schedule[0, 0] > schedule[0, 1]
    assert np.all(np.remainder(schedule, 0.125) == 0)
    # one weight per path (a K/V split): an excess below one grid increment must still be worked off
    split = np.array([[78.4, 16.3], [78.4, 16.3]])
    for target in (3.5, 4.0, 4.3):
        schedule, rate = fit_schedule(split, target, kv, grid=0.125)
        assert rate <= target and np.all(schedule[:, 0] >= schedule[:, 1])
    uniform = uniform_schedule(4.0, kv)
    assert np.ptp(uniform) == 0
    scales = channel_scales(kv)
    scaled = uniform_schedule(4.0, kv, key_scales=scales)
    assert scaled[0, 0] < uniform[0, 0]  # the scales' bytes come out of the same budget
    assert compressed_cache_rate(kv, scaled, key_scales=scales) == pytest.approx(4.0, abs=0.002)


def test_scheduled_in_loop_path_equals_the_cache_with_key_scales(tiny):
    loaded, ids = tiny
    config = loaded.config
    schedule = np.array([[5.0, 3.0], [4.0, 4.0]])
    scales = channel_scales(capture_kv(loaded, ids[:1]))
    assert scales.shape == (2, 2, 16) and scales.dtype == torch.float16
    keys, values = schedule_quantizers(schedule, key_scales=scales)
    a = perplexity(
        loaded.model,
        ids,
        ids.clone(),
        lambda: QuantizeDequantizeCache(keys, config, values),
        chunk_size=8,
        progress=False,
    )
    b = perplexity(
        loaded.model,
        ids,
        ids.clone(),
        lambda: CompressedKVCache(config, schedule, page_size=8, key_scales=scales),
        chunk_size=8,
        progress=False,
    )
    assert a.nll == pytest.approx(b.nll, rel=1e-9)


def test_sensitivity_rows_round_trip(tiny, tmp_path):
    from lqlib.alloc.sensitivity import Sensitivity
    from lqlib.book.tables import read_table, write_table

    loaded, ids = tiny
    stats = attention_sensitivity(loaded, ids, progress=False)
    sens = Sensitivity(gamma=np.array([2.0, 0.5]), **stats)
    write_table(sens.to_rows(), tmp_path / "sensitivity", {"layer": "layer"})
    back = Sensitivity.from_rows(read_table(tmp_path / "sensitivity"))
    np.testing.assert_allclose(back.slot_weights(per_head=True), sens.slot_weights(per_head=True), rtol=1e-15)
    assert back.slot_weights().shape == (2, 2)
    np.testing.assert_allclose(
        sens.predicted_distortion(np.array([[4.0, 3.0], [4.0, 3.0]]))[:, 1],
        sens.slot_weights()[:, 1] * 1.2243 * 4.0**-3,
        rtol=1e-3,
    )
