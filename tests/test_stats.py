"""The one statistics module: bootstrap intervals against closed forms, scipy, coverage, and pairing."""

from __future__ import annotations

import math

import numpy as np
import pytest

from lqlib import InputError
from lqlib.evaluation import stats


def test_estimate_formatting_and_membership():
    e = stats.Estimate(1.2345, 1.0, 1.5, 0.95, 12)
    assert str(e) == "1.23 [1.00, 1.50]" and e.format(1, "%") == "1.2% [1.0%, 1.5%]"
    assert e.contains(1.0) and e.contains(1.5) and not e.contains(1.51) and e.finite
    assert not stats.Estimate(1.0, float("nan"), float("nan")).finite


def test_bootstrap_covers_the_mean_about_as_often_as_stated():
    """The percentile interval of a mean of 40 normal samples holds the true mean in about 90% of 200
    experiments at level 0.9 (a binomial 99.9% band around 0.9 is roughly 0.83–0.96)."""
    rng = np.random.default_rng(0)
    hits = []
    for t in range(200):
        x = rng.normal(1.0, 2.0, 40)
        e = stats.bootstrap(lambda index, x=x: x[index].mean(axis=-1), 40, draws=800, level=0.9, seed=t)
        assert e.value == pytest.approx(x.mean(), rel=1e-12) and e.n == 40 and e.level == 0.9
        hits.append(e.contains(1.0))
    assert 0.83 <= np.mean(hits) <= 0.96


def test_the_same_seed_resamples_the_same_units():
    assert np.array_equal(stats.resample(10, 5, seed=3), stats.resample(10, 5, seed=3))
    counts = stats.resample_counts(10, 7, seed=1)
    assert counts.shape == (7, 10) and (counts.sum(axis=1) == 10).all()
    with pytest.raises(InputError):
        stats.resample(0)
    assert stats.percentile_interval([np.nan, np.inf]) == (pytest.approx(float("nan"), nan_ok=True),) * 2 or all(
        math.isnan(v) for v in stats.percentile_interval([np.nan, np.inf])
    )


def test_paired_delta_pct_and_gap():
    rng = np.random.default_rng(0)
    tokens = rng.integers(100, 200, 30)
    base = rng.uniform(2, 3, 30) * tokens
    # the same per-token increase c in every window: ΔPPL = 100·(e^c − 1), and no bootstrap spread
    c = 0.02
    exact = stats.paired_delta_pct(base + c * tokens, base, tokens)
    assert exact.value == pytest.approx(100 * np.expm1(c), rel=1e-12)
    assert exact.high - exact.low < 1e-9 and exact.n == 30
    # agrees with the perplexity ratio and brackets it when windows differ
    noisy_nll = base + rng.normal(c, 0.02, 30) * tokens
    noisy = stats.paired_delta_pct(noisy_nll, base, tokens)
    ppl = np.exp(noisy_nll.sum() / tokens.sum()) / np.exp(base.sum() / tokens.sum())
    assert noisy.value == pytest.approx(100 * (ppl - 1), rel=1e-10)
    assert noisy.low < noisy.value < noisy.high and noisy.high - noisy.low > 0.1
    # the paired gap: a − b with b = a + shared noise cancels it; a against itself is exactly 0
    shared = rng.normal(0, 0.05, 30) * tokens
    a, b = base + c * tokens + shared, base + 1.5 * c * tokens + shared
    gap = stats.paired_gap_pp(b, a, base, tokens)
    ci_a, ci_b = stats.paired_delta_pct(a, base, tokens), stats.paired_delta_pct(b, base, tokens)
    assert gap.value == pytest.approx(ci_b.value - ci_a.value, rel=1e-12)
    assert 0 < gap.low < gap.value < gap.high
    assert gap.high - gap.low < 0.2 * min(ci_a.high - ci_a.low, ci_b.high - ci_b.low)
    same = stats.paired_gap_pp(a, a, base, tokens)
    assert same.value == same.low == same.high == 0.0
    for bad in ((a[:5], base, tokens), (a, base, np.zeros(30))):
        with pytest.raises(InputError):
            stats.paired_delta_pct(*bad)
    with pytest.raises(InputError):
        stats.paired_delta_pct(a, base, tokens, level=1.5)


def test_paired_ratio_and_an_undefined_denominator():
    rng = np.random.default_rng(0)
    fp = rng.uniform(300, 400, 40)
    tokens = np.full(40, 127)
    a = fp + rng.uniform(1, 3, 40)
    b = fp + 2 * (a - fp)
    exact = stats.paired_ratio(b, a, fp, tokens)
    expected = np.expm1(2 * (a - fp).sum() / (127 * 40)) / np.expm1((a - fp).sum() / (127 * 40))
    assert exact.value == pytest.approx(expected) and exact.low <= exact.value <= exact.high
    assert exact.high - exact.low < 0.01 and exact.defined and exact.denominator.low > 0
    noisy = stats.paired_ratio(b + rng.normal(0, 0.5, 40), a, fp, tokens)
    assert noisy.low < noisy.value < noisy.high and noisy.high - noisy.low > 0.02
    assert stats.paired_ratio(a, a, fp, tokens).value == 1.0
    # a baseline whose increase straddles zero: the ratio is undefined, not infinite or negative
    flat = fp + rng.normal(0, 0.5, 40)
    undefined = stats.paired_ratio(a, flat, fp, tokens)
    assert not undefined.defined and math.isnan(undefined.value) and undefined.denominator.low <= 0
    assert undefined.numerator.value > 0


def test_spearman_matches_scipy_and_covers():
    from scipy.stats import spearmanr

    rng = np.random.default_rng(0)
    x = rng.standard_normal(50)
    y = np.round(x + rng.standard_normal(50), 1)  # ties in y
    result = stats.spearman(x, y, draws=2000, seed=1)
    assert result.value == pytest.approx(spearmanr(x, y)[0], rel=1e-12)
    assert result.low < result.value < result.high and result.n == 50
    index = rng.integers(0, 50, 50)  # resamples have ties from repeated pairs
    assert stats.spearman(x[index], y[index], draws=10).value == pytest.approx(spearmanr(x[index], y[index])[0])
    exact = stats.spearman(x, np.exp(x), draws=500)
    assert exact.value == exact.low == exact.high == pytest.approx(1.0)
    assert stats.spearman(x, -x, draws=500).high == pytest.approx(-1.0)
    covered = [
        stats.spearman(rng.standard_normal(50), rng.standard_normal(50), draws=400, level=0.9, seed=t).low < 0
        for t in range(100)
    ]
    assert 0.75 <= np.mean(covered) <= 1.0
    with pytest.raises(InputError):
        stats.spearman(x[:2], y[:2])


def test_pearson_matches_numpy_and_covers():
    rng = np.random.default_rng(0)
    x = rng.normal(size=40)
    line = stats.pearson(x, 3 * x - 1)
    assert line.value == pytest.approx(1.0) and line.low == pytest.approx(1.0) and line.n == 40
    assert stats.pearson(x, -x).high == pytest.approx(-1.0)
    y = x + 0.7 * rng.normal(size=40)
    noisy = stats.pearson(x, y)
    assert noisy.value == pytest.approx(np.corrcoef(x, y)[0, 1])
    assert noisy.low < noisy.value < noisy.high and noisy.low > 0
    unrelated = stats.pearson(x, rng.normal(size=40))
    assert unrelated.low < 0 < unrelated.high
    with pytest.raises(InputError):
        stats.pearson(x[:2], x[:2])
