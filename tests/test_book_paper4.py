"""Paper IV's page logic: pooled sensitivities, AM/GM intervals, allocation rows and sentences, water-filling."""

from __future__ import annotations

import numpy as np
import pytest

from lqlib.alloc.allocation import am_gm_ratio
from lqlib.alloc.sensitivity import Sensitivity
from lqlib.book import paper4
from lqlib.evaluation.stats import Estimate


def sensitivity(scale: float, layers: int = 3, heads: int = 2) -> Sensitivity:
    rng = np.random.default_rng(int(scale * 10))
    arrays = {
        f: rng.uniform(0.5, 2.0, (layers, heads)) * scale
        for f in ("eta_k", "eta_v", "sigma2_k", "sigma2_v", "weight_k", "weight_v")
    }
    return Sensitivity(gamma=rng.uniform(1, 3, layers), **arrays)


def test_pooled_and_am_gm_over_windows():
    windows = [sensitivity(1.0), sensitivity(2.0), sensitivity(3.0)]
    pooled = paper4.pooled(windows)
    np.testing.assert_allclose(pooled.weight_k, np.mean([w.weight_k for w in windows], axis=0))
    estimate = paper4.am_gm_estimate(windows)
    assert estimate.value == pytest.approx(am_gm_ratio(np.mean([w.slot_weights() for w in windows], axis=0)))
    assert estimate.low <= estimate.value <= estimate.high and estimate.n == 3
    same = paper4.am_gm_estimate([windows[0]] * 4)
    assert same.low == same.high == pytest.approx(am_gm_ratio(windows[0].slot_weights()))
    rows = paper4.am_gm_rows(windows)
    assert [r["n"] for r in rows] == [6, 12, 2] and "1.36 (Llama-3.1-8B)" in rows[0]["paper"]
    assert len(paper4.per_layer_rows(pooled)) == 3


def test_allocation_sentence_in_every_branch():
    u, o = Estimate(3.7, 2.3, 5.1), Estimate(0.3, 0.2, 0.3)
    assert "allocation helps" in paper4.allocation_sentence(4, u, o, Estimate(0.07, 0.06, 0.1), 0.8)
    assert "allocation hurts" in paper4.allocation_sentence(4, u, o, Estimate(1.5, 1.2, 1.9), 0.8)
    assert "cannot tell" in paper4.allocation_sentence(4, u, o, Estimate(0.9, 0.5, 1.3), 0.8)
    nan = float("nan")
    assert "undefined" in paper4.allocation_sentence(4, u, o, Estimate(nan, nan, nan), 0.8)


def test_allocation_rows_pair_each_schedule_with_uniform():
    rng = np.random.default_rng(0)
    fp = rng.uniform(300, 400, 12)
    tokens = [100] * 12
    rows = [
        {
            "method": "full precision",
            "family": "fp16",
            "bits_per_dim": 16.0,
            "ppl": 1.0,
            "delta_pct": 0.0,
            "window_nll": fp.tolist(),
            "window_tokens": tokens,
        }
    ]
    for name, extra in (("uniform", 4.0), ("optimal", 1.0)):
        nll = fp + extra + rng.normal(0, 0.1, 12)
        rows.append(
            {
                "method": f"{name} 4",
                "family": name,
                "bits_per_dim": 3.99,
                "ppl": 1.0,
                "delta_pct": 100 * np.expm1((nll - fp).sum() / 1200),
                "window_nll": nll.tolist(),
            }
        )
    table, ratios = paper4.allocation_rows(rows)
    assert table[0]["ratio"] == "1 (the reference)" and set(ratios) == {4.0}
    assert ratios[4.0].value == pytest.approx(np.expm1(1.0 / 100) / np.expm1(4.0 / 100), rel=0.05)
    assert ratios[4.0].high < 1


def test_water_filling_rows_and_fixed_axes():
    weights = np.array([[4.0, 1.0], [2.0, 0.5], [8.0, 1.0]])
    plans = paper4.water_filling_plans(weights, [3.0, 4.0], 0.125, 1.0, 8.0)
    rows = paper4.water_filling_rows(plans, weights.shape)
    assert [r["budget"] for r in rows] == [3.0, 4.0] and all(r["mean_bits"] <= r["budget"] for r in rows)
    render = paper4.water_filling_renderer(weights, plans, 8.0)
    assert render("3").startswith(b"\x89PNG") and render("4") != render("3")
    protocol = paper4.paper4_protocol("m", "pydoc", 4, 24, 512)
    assert protocol[3]["ours"] == "24 × 512 tokens"
