"""lqlib.calibrate: the factory's caches meet the rate they report, are exact twins of the in-loop path,
and the study helpers (weights, margins, ablation rows, verdicts) do what they say."""

import math
from statistics import NormalDist

import numpy as np
import pytest
import torch

import lqlib
from lqlib import CompressedKVCache, InputError
from lqlib.alloc.beyond import (
    ABLATIONS,
    FULL,
    MINIMAL,
    ablation_rows,
    headline_rows,
    layer_groups,
    partial_quantizers,
    target_verdicts,
)
from lqlib.alloc.calibrate import calibration_statistics, channel_weights, rate_margin
from lqlib.alloc.schedule import schedule_quantizers, uniform_schedule
from lqlib.cache.quantized import QuantizeDequantizeCache
from lqlib.evaluation.capture import capture_kv
from lqlib.evaluation.corpus import load_corpus
from lqlib.evaluation.perplexity import perplexity, token_windows
from lqlib.evaluation.stats import paired_delta_pct, paired_gap_pp


def test_weights_interpolate_between_flat_and_the_gradient_moments():
    m = np.exp(np.random.default_rng(0).normal(size=(2, 2, 3, 8)))
    np.testing.assert_allclose(channel_weights(m, alpha=1.0), m)
    flat = channel_weights(m, alpha=0.0)
    np.testing.assert_allclose(flat, np.broadcast_to(m.mean(-1, keepdims=True), m.shape))
    half = channel_weights(m, alpha=0.5)
    np.testing.assert_allclose(half, np.sqrt(m * m.mean(-1, keepdims=True)))
    within = channel_weights(m, alpha=0.5, across_slots=False)
    np.testing.assert_allclose(np.exp(np.log(within).mean(-1)), 1.0)
    np.testing.assert_allclose(within / within[..., :1], half / half[..., :1])  # same shape inside a head
    assert (channel_weights(np.zeros((1, 1, 1, 8)) + [0, 1, 1, 1, 1, 1, 1, 1], 1.0) > 0).all()


def test_rate_margin_is_a_one_sided_normal_bound():
    rates = [4.20, 4.24, 4.26, 4.30]
    expected = NormalDist().inv_cdf(0.95) * np.std(rates, ddof=1) / 2.0
    assert rate_margin(rates, 0.95) == pytest.approx(expected)
    assert rate_margin([4.2], 0.95) == 0.0 and rate_margin(rates, 0.0) == 0.0


def test_ablation_table_and_verdicts():
    rng = np.random.default_rng(1)
    tokens = np.full(6, 500)
    base = rng.normal(1500, 50, 6)
    results = [
        {"method": FULL, "budget": 4.25, "bits_heldout": 4.24, "window_nll": base + 3.0},
        {"method": "other", "budget": 4.25, "bits_heldout": 4.20, "window_nll": base + 9.0},
        {"method": FULL, "budget": 3.25, "bits_heldout": 3.27, "window_nll": base + 20.0},
    ]
    rows = ablation_rows(results, base, tokens)
    assert rows[0]["delta_pct"] == pytest.approx(paired_delta_pct(base + 3.0, base, tokens).value)
    assert rows[0]["delta_pct"] == pytest.approx(100 * math.expm1(3.0 / 500))
    gap = paired_gap_pp(base + 9.0, base + 3.0, base, tokens)
    assert rows[1]["gap_pp"] == pytest.approx(gap.value) and rows[1]["gap_low"] == pytest.approx(gap.low)
    assert math.isnan(rows[0]["gap_pp"])
    verdicts = target_verdicts(rows)
    assert verdicts[0]["met"] and verdicts[0]["row"]["budget"] == 4.25  # 0.6% at 4.24 bits
    assert verdicts[1]["row"] is None and not verdicts[1]["met"]  # 3.27 > 3.25 measured: not eligible


def test_ablation_configurations():
    assert ABLATIONS[FULL] == ("full", {})
    alone = [settings for kind, settings in ABLATIONS.values() if kind == "alone"]
    assert alone[0] == MINIMAL
    for settings in alone[1:]:  # each differs from the minimal configuration in exactly one choice
        assert sum(settings[k] != MINIMAL[k] for k in MINIMAL) == 1
    assert [len(g) for g in layer_groups(30, 6)] == [5] * 6 and sum(layer_groups(7, 3), []) == list(range(7))


@pytest.fixture(scope="module")
def calibration(default_model):
    ids, labels = token_windows(default_model.tokenizer, load_corpus().text, 128, max_windows=3)
    stats = calibration_statistics(default_model, ids[:1], progress=False)
    return ids, labels, stats


@pytest.mark.model
@pytest.mark.parametrize("bits", [3.0, 4.25])
def test_factory_meets_its_rate_and_its_caches_hold_it(default_model, calibration, bits):
    ids, _, stats = calibration
    factory = lqlib.calibrate(default_model, bits, statistics=stats)
    assert bits - 0.004 <= factory.bits_per_dim <= bits  # one window: no margin
    first, second = factory(), factory()
    assert isinstance(first, CompressedKVCache) and first is not second and first.profile is factory.profile
    # the rate is what a real cache holds for the calibration window, byte for byte
    kv = stats.windows[0]
    for layer, held in enumerate(first.layers):
        held.update(kv.keys[layer, None], kv.values[layer, None])
    assert 8 * first.nbytes() / (2 * kv.keys.numel()) == pytest.approx(factory.bits_per_dim, rel=1e-12)


@pytest.mark.model
def test_calibrated_cache_equals_its_in_loop_twin(default_model, calibration):
    ids, labels, stats = calibration
    factory = lqlib.calibrate(default_model, 3.5, statistics=stats)
    model = default_model.model
    real = perplexity(model, ids[1:], labels[1:], factory, progress=False)
    twin = perplexity(model, ids[1:], labels[1:], factory.in_loop_cache, progress=False)
    assert real.nll == twin.nll
    clean = perplexity(model, ids[1:], labels[1:], progress=False)
    assert 0 < real.nll - clean.nll < 0.05 * clean.nll
    keys_only = partial_quantizers(factory, values=False)
    assert keys_only[1][0](kv := capture_kv(default_model, ids[1:2]).values[0, None], 0) is kv
    assert not torch.equal(keys_only[0][0](kv, 0), kv)


@pytest.mark.model
def test_bad_calls_are_refused(default_model, calibration):
    _, _, stats = calibration
    with pytest.raises(InputError):
        lqlib.calibrate(default_model, 0.1, statistics=stats)
    with pytest.raises(InputError):
        lqlib.calibrate(default_model, 4.0, statistics=stats, sink=0)  # statistics measured with sink 1


@pytest.mark.model
def test_headline_rows_score_held_out_windows_at_their_measured_rates(default_model, calibration):
    ids, labels, stats = calibration
    rows = headline_rows(default_model, ids[:1], ids[1:], labels[1:], [3.25], statistics=stats)
    assert [(r["method"], r["budget"]) for r in rows] == [(FULL, 3.25), ("uniform E8 + RHT", 3.25)]
    calibrated, uniform = rows
    assert calibrated["bits_calibration"] <= 3.25 and abs(uniform["bits_calibration"] - 3.25) < 0.02
    for row in rows:  # held-out rates are measured, so near the budget but not equal to it
        assert abs(row["bits_heldout"] - 3.25) < 0.25 and row["bits_heldout"] != row["bits_calibration"]
        assert row["low"] <= row["delta_pct"] <= row["high"]
    # the uniform row is the in-loop E8 + RHT cache run by hand on the same windows
    keys, values = schedule_quantizers(uniform_schedule(3.25, stats.windows[0]))
    clean = perplexity(default_model.model, ids[1:], labels[1:], progress=False)
    make = lambda: QuantizeDequantizeCache(keys, default_model.config, values)  # noqa: E731
    run = perplexity(default_model.model, ids[1:], labels[1:], make, progress=False)
    assert uniform["delta_pct"] == pytest.approx(100 * math.expm1((run.nll - clean.nll) / clean.tokens), rel=1e-9)
    assert math.isfinite(uniform["gap_pp"])
