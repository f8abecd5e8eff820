"""The one statistics module: percentile bootstrap intervals, returned as a small frozen :class:`Estimate`.

Every interval in the book comes from here. Units are resampled with replacement (perplexity windows,
quantizer configurations, dithered trials); ``seed`` fixes the resampled units, so two statistics
bootstrapped with the same seed over the same units are *paired* (each draw resamples the same units
for both), and their difference or ratio keeps only the variation they do not share.

Conventions: ``draws`` resamples, ``level`` the two-sided coverage (0.95), intervals are the
``(1 − level)/2`` and ``(1 + level)/2`` percentiles of the resampled statistic (NaN resamples, e.g. a
ratio whose denominator vanished in that resample, are left out; all NaN gives a NaN interval).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike

from ..errors import InputError

__all__ = [
    "Estimate",
    "RatioEstimate",
    "resample",
    "resample_counts",
    "percentile_interval",
    "bootstrap",
    "paired_delta_pct",
    "paired_gap_pp",
    "paired_ratio",
    "spearman",
    "pearson",
]

DRAWS = 4000
LEVEL = 0.95


@dataclass(frozen=True)
class Estimate:
    """A statistic on all units and its percentile bootstrap interval.

    Attributes
    ----------
    value : the statistic on all ``n`` units.
    low, high : the interval's ends (``low ≤ high``; NaN if no resample gave a finite value).
    level : coverage of the interval, e.g. 0.95.
    n : number of resampled units (windows, configurations, trials).
    """

    value: float
    low: float
    high: float
    level: float = LEVEL
    n: int = 0

    def contains(self, x: float) -> bool:
        """True if ``low ≤ x ≤ high``."""
        return bool(self.low <= x <= self.high)

    @property
    def finite(self) -> bool:
        return all(math.isfinite(v) for v in (self.value, self.low, self.high))

    def format(self, digits: int = 2, unit: str = "") -> str:
        """``"1.23 [1.01, 1.45]"`` (``unit`` after each number, e.g. ``"%"``)."""

        def f(v: float) -> str:
            return f"{v:.{digits}f}{unit}" if math.isfinite(v) else "—"

        return f"{f(self.value)} [{f(self.low)}, {f(self.high)}]"

    def __str__(self) -> str:
        return self.format()


@dataclass(frozen=True)
class RatioEstimate(Estimate):
    """A ratio of two paired statistics, with the denominator's own interval.

    When the denominator's interval reaches zero or below, the ratio is not defined on every resample:
    ``value``, ``low`` and ``high`` are then NaN and :attr:`defined` is False (a verdict must treat
    that case explicitly instead of reading an infinite or negative ratio).
    """

    numerator: Estimate | None = None
    denominator: Estimate | None = None

    @property
    def defined(self) -> bool:
        return self.denominator is not None and self.denominator.low > 0 and self.finite


def _check(draws: int, level: float) -> None:
    if draws < 1:
        raise InputError(f"draws must be positive, got {draws}")
    if not 0.0 < level < 1.0:
        raise InputError(f"level must lie in (0, 1), got {level}")


def resample(n: int, draws: int = DRAWS, seed: int = 0) -> np.ndarray:
    """Indices (draws, n) of ``draws`` resamples of ``n`` units with replacement (same seed, same draws)."""
    if n < 1:
        raise InputError(f"need at least one unit to resample, got {n}")
    return np.random.default_rng(seed).integers(0, n, (draws, n))


def resample_counts(n: int, draws: int = DRAWS, seed: int | np.random.Generator = 0) -> np.ndarray:
    """Multiplicities (draws, n), float64, of the same kind of resampling (for weighted statistics)."""
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    return rng.multinomial(n, np.full(n, 1.0 / n), size=draws).astype(np.float64)


def percentile_interval(samples: ArrayLike, level: float = LEVEL) -> tuple[float, float]:
    """The percentile interval of bootstrap samples, ignoring NaN and infinite ones (NaN if none is finite)."""
    samples = np.asarray(samples, dtype=np.float64).reshape(-1)
    samples = samples[np.isfinite(samples)]
    if samples.size == 0:
        return float("nan"), float("nan")
    low, high = np.percentile(samples, [50.0 * (1.0 - level), 50.0 * (1.0 + level)])
    return float(low), float(high)


def bootstrap(
    statistic: Callable[[np.ndarray], np.ndarray], n: int, draws: int = DRAWS, level: float = LEVEL, seed: int = 0
) -> Estimate:
    """Percentile bootstrap of ``statistic`` over ``n`` units.

    ``statistic`` takes an index array of shape (..., n) — the units of one sample along the last axis
    — and returns one value per leading index, vectorised: it is called once with ``arange(n)`` (the
    value) and once with the (draws, n) resampled indices.
    """
    _check(draws, level)
    value = float(np.asarray(statistic(np.arange(n))))
    low, high = percentile_interval(statistic(resample(n, draws, seed)), level)
    return Estimate(value, low, high, level, n)


def _windows(*nlls: ArrayLike, tokens: ArrayLike) -> tuple[list[np.ndarray], np.ndarray]:
    arrays = [np.asarray(a, dtype=np.float64).reshape(-1) for a in nlls]
    weights = np.asarray(tokens, dtype=np.float64).reshape(-1)
    if weights.size == 0 or any(a.shape != weights.shape for a in arrays):
        raise InputError(
            f"need per-window NLLs and token counts of one non-empty length, got {[a.size for a in arrays]} "
            f"NLLs and {weights.size} token counts"
        )
    if not np.all(weights > 0):
        raise InputError("every window needs at least one scored token")
    return arrays, weights


def _pct(excess: np.ndarray, weights: np.ndarray, index: np.ndarray) -> np.ndarray:
    """100·(exp(Σ excess / Σ tokens) − 1) over the windows ``index`` selects."""
    return 100.0 * np.expm1(excess[index].sum(axis=-1) / weights[index].sum(axis=-1))


def paired_delta_pct(
    window_nll: ArrayLike,
    baseline_window_nll: ArrayLike,
    tokens: ArrayLike,
    draws: int = DRAWS,
    level: float = LEVEL,
    seed: int = 0,
) -> Estimate:
    """PPL increase over a baseline in percent, 100·(PPL/PPL_base − 1), resampling windows.

    Parameters
    ----------
    window_nll, baseline_window_nll : summed NLL (nats) of each window, shape (windows,), on the same
        windows (e.g. ``PerplexityResult.window_nll``).
    tokens : scored tokens per window, shape (windows,).
    """
    (a, base), weights = _windows(window_nll, baseline_window_nll, tokens=tokens)
    return bootstrap(lambda index: _pct(a - base, weights, index), a.size, draws, level, seed)


def paired_gap_pp(
    window_nll_a: ArrayLike,
    window_nll_b: ArrayLike,
    baseline_window_nll: ArrayLike,
    tokens: ArrayLike,
    draws: int = DRAWS,
    level: float = LEVEL,
    seed: int = 0,
) -> Estimate:
    """ΔPPL(a) − ΔPPL(b) in percentage points over one baseline; a, b and the baseline resampled together."""
    (a, b, base), weights = _windows(window_nll_a, window_nll_b, baseline_window_nll, tokens=tokens)

    def gap(index: np.ndarray) -> np.ndarray:
        return _pct(a - base, weights, index) - _pct(b - base, weights, index)

    return bootstrap(gap, a.size, draws, level, seed)


def paired_ratio(
    window_nll_a: ArrayLike,
    window_nll_b: ArrayLike,
    baseline_window_nll: ArrayLike,
    tokens: ArrayLike,
    draws: int = DRAWS,
    level: float = LEVEL,
    seed: int = 0,
) -> RatioEstimate:
    """ΔPPL(a) / ΔPPL(b) over one baseline, resampling windows for all three together.

    The denominator ΔPPL(b) gets its own interval; where it reaches 0 or below the ratio is left
    undefined (NaN, :attr:`RatioEstimate.defined` False) rather than read as infinite or negative.
    """
    (a, b, base), weights = _windows(window_nll_a, window_nll_b, baseline_window_nll, tokens=tokens)
    index = resample(a.size, draws, seed)
    numerator = _pct(a - base, weights, index)
    denominator = _pct(b - base, weights, index)
    num = Estimate(
        float(_pct(a - base, weights, np.arange(a.size))), *percentile_interval(numerator, level), level, a.size
    )
    den = Estimate(
        float(_pct(b - base, weights, np.arange(a.size))), *percentile_interval(denominator, level), level, a.size
    )
    if not den.low > 0:
        nan = float("nan")
        return RatioEstimate(nan, nan, nan, level, a.size, num, den)
    low, high = percentile_interval(numerator / denominator, level)
    return RatioEstimate(num.value / den.value, low, high, level, a.size, num, den)


def _ranks(a: np.ndarray) -> np.ndarray:
    """Ranks 1..n along the last axis, ties sharing their average rank (as scipy's ``rankdata``)."""
    below = (a[..., :, None] > a[..., None, :]).sum(axis=-1)
    equal = (a[..., :, None] == a[..., None, :]).sum(axis=-1)
    return below + 0.5 * (equal - 1) + 1.0


def _pearson_rows(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Pearson correlation along the last axis; NaN where either side has no spread."""
    xc = x - x.mean(axis=-1, keepdims=True)
    yc = y - y.mean(axis=-1, keepdims=True)
    denominator = np.sqrt((xc * xc).sum(axis=-1) * (yc * yc).sum(axis=-1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denominator > 0, (xc * yc).sum(axis=-1) / denominator, np.nan)


def _pairs(x: ArrayLike, y: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    x, y = np.asarray(x, dtype=np.float64).reshape(-1), np.asarray(y, dtype=np.float64).reshape(-1)
    if x.shape != y.shape or x.size < 3:
        raise InputError(f"need two samples of one length of at least 3, got {x.size} and {y.size}")
    return x, y


def spearman(x: ArrayLike, y: ArrayLike, draws: int = 2000, level: float = LEVEL, seed: int = 0) -> Estimate:
    """Spearman's rank correlation of paired samples, with a percentile bootstrap over the pairs
    (ranks recomputed in every resample)."""
    x, y = _pairs(x, y)

    def rho(index: np.ndarray) -> np.ndarray:
        return _pearson_rows(_ranks(x[index]), _ranks(y[index]))

    return bootstrap(rho, x.size, draws, level, seed)


def pearson(x: ArrayLike, y: ArrayLike, draws: int = DRAWS, level: float = LEVEL, seed: int = 0) -> Estimate:
    """Pearson's correlation of paired samples, with a percentile bootstrap over the pairs."""
    x, y = _pairs(x, y)
    return bootstrap(lambda index: _pearson_rows(x[index], y[index]), x.size, draws, level, seed)
