"""Attention-aware bit allocation of Paper IV: reverse water-filling of a mean bit budget over slots.

A *slot* is whatever gets one rate: a (layer, K/V) pair, a head, ... Slot i holds n_i dimensions
(``sizes``; default all equal) and has a sensitivity weight w_i > 0. Rates b_i are in bits per
dimension. The distortion model (up to a constant) is

    D(b) = Σ_i n_i · w_i · 4^(−b_i),

the Gaussian D*(b) = σ²·4^(−b) per dimension, weighted by how much the slot's error moves the output.
Minimising D at the dimension-weighted mean rate Σ n_i b_i / Σ n_i = b̄ (the budget) gives reverse
water-filling, b_i = b̄ + ½·log2(w_i / GM_n(w)) with GM_n the n-weighted geometric mean; the
distortion ratio uniform / optimal is then AM_n(w) / GM_n(w) ≥ 1. With clamps b_min ≤ b_i ≤ b_max the
exact (KKT) solution is b_i = clip(θ + ½·log2 w_i, b_min, b_max) with one water level θ set by the
budget (:func:`water_fill`). A cache stores rates on a grid; :func:`round_to_grid` moves the
continuous solution onto it without ever exceeding the budget, and :func:`allocate` does both.

Everything is vectorised over slots; the only Python loops run over breakpoints (a binary search) and
over grid increments handed out by the rounding (about one per slot).
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass
from decimal import Decimal
from fractions import Fraction

import numpy as np
from numpy.typing import ArrayLike

from ..errors import InputError

__all__ = ["Allocation", "allocate", "am_gm_ratio", "predicted_distortion", "round_to_grid", "water_fill"]


def _as_weights(weights: ArrayLike) -> tuple[np.ndarray, tuple[int, ...]]:
    """Weights flattened to float64, with their shape; finite and > 0 or an :class:`InputError`."""
    w = np.asarray(weights, dtype=np.float64)
    if w.size == 0:
        raise InputError("weights must not be empty")
    flat = w.reshape(-1)
    if not np.isfinite(flat).all():
        bad = np.flatnonzero(~np.isfinite(flat))
        raise InputError(
            f"weights must be finite: {bad.size} entries are NaN or ±inf "
            f"(first at index {np.unravel_index(bad[0], w.shape)}: {flat[bad[0]]})"
        )
    if not (flat > 0).all():
        bad = np.flatnonzero(flat <= 0)
        raise InputError(
            f"weights must be > 0: {bad.size} entries are ≤ 0 "
            f"(first at index {np.unravel_index(bad[0], w.shape)}: {flat[bad[0]]})"
        )
    return flat, w.shape


def _as_sizes(sizes: ArrayLike | None, shape: tuple[int, ...]) -> np.ndarray:
    """Slot sizes n_i flattened to float64 (all ones when ``None``); same shape as the weights, finite, > 0."""
    if sizes is None:
        return np.ones(math.prod(shape))
    n = np.asarray(sizes, dtype=np.float64)
    if n.shape != shape:
        raise InputError(f"sizes must have the shape of weights {shape}, got {n.shape}")
    n = n.reshape(-1)
    if not (np.isfinite(n).all() and (n > 0).all()):
        raise InputError("sizes must be finite and > 0")
    return n


def _check_bounds(budget: float, b_min: float, b_max: float) -> None:
    """``budget`` finite and within [b_min, b_max]; b_min < +inf, b_max > −inf, b_min ≤ b_max."""
    if not math.isfinite(budget):
        raise InputError(f"budget must be finite, got {budget}")
    if math.isnan(b_min) or math.isnan(b_max) or b_min == math.inf or b_max == -math.inf:
        raise InputError(f"need −inf ≤ b_min < inf and −inf < b_max ≤ inf, got b_min={b_min}, b_max={b_max}")
    if not b_min <= budget <= b_max:
        raise InputError(f"budget {budget} must lie within [b_min, b_max] = [{b_min}, {b_max}]")


def _half_log2(w: np.ndarray) -> np.ndarray:
    """½·log2(w / max w): the water-filling offsets, shifted so equal weights give exact zeros."""
    return 0.5 * np.log2(w / w.max())


def am_gm_ratio(weights: ArrayLike, sizes: ArrayLike | None = None) -> float:
    """AM_n(w) / GM_n(w), the n-weighted arithmetic over geometric mean of the weights (≥ 1).

    It is the predicted distortion ratio D(uniform) / D(optimal) of unclamped water-filling at any
    budget. Computed on w / max w in log space (no overflow); exactly 1.0 for equal weights.
    """
    w, shape = _as_weights(weights)
    n = _as_sizes(sizes, shape)
    r = w / w.max()
    log_am = math.log(float((n * r).sum() / n.sum()))
    log_gm = float((n * (np.log(w) - math.log(w.max()))).sum() / n.sum())
    return math.exp(log_am - log_gm)


def predicted_distortion(bits: ArrayLike, weights: ArrayLike, sizes: ArrayLike | None = None) -> np.ndarray:
    """Per-slot model distortion n_i · w_i · 4^(−b_i), shape of ``weights`` (``bits`` must match it)."""
    w, shape = _as_weights(weights)
    n = _as_sizes(sizes, shape)
    b = np.asarray(bits, dtype=np.float64)
    if b.shape != shape:
        raise InputError(f"bits must have the shape of weights {shape}, got {b.shape}")
    return (n * w * 4.0 ** (-b.reshape(-1))).reshape(shape)


def _clamped_sum(theta: float, c: np.ndarray, n: np.ndarray, lo: float, hi: float) -> float:
    """Σ n_i · clip(θ + c_i, lo, hi): nondecreasing and piecewise linear in θ."""
    return float((n * np.clip(theta + c, lo, hi)).sum())


def water_fill(
    weights: ArrayLike, budget: float, b_min: float = 0.0, b_max: float = math.inf, sizes: ArrayLike | None = None
) -> np.ndarray:
    """Continuous rates minimising Σ n_i w_i 4^(−b_i) at mean rate ``budget``, clamped to [b_min, b_max].

    Parameters
    ----------
    weights : array, any shape, finite and > 0
        Sensitivity weights w_i, one per slot.
    budget : float
        Target n-weighted mean rate b̄ (bits per dimension), within [b_min, b_max].
    b_min, b_max : float
        Rate clamps (b_min may be −inf, b_max may be +inf).
    sizes : array of the shape of ``weights``, > 0, optional
        Dimensions per slot n_i (default all equal).

    Returns
    -------
    np.ndarray, shape of ``weights``: b_i = clip(θ + ½·log2 w_i, b_min, b_max) with Σ n_i b_i = b̄·Σ n_i.
    Without active clamps this is b̄ + ½·log2(w_i / GM_n(w)).

    Notes
    -----
    These are the KKT conditions of the convex problem, hence the exact optimum. θ is found exactly:
    the budget Σ n_i clip(θ + c_i, ...) is piecewise linear in θ with breakpoints b_min − c_i and
    b_max − c_i; a binary search finds the linear piece holding the budget and θ is solved on it in
    closed form. (Clamping every violating slot on both sides at once and re-spreading, repeated, is
    *not* exact when both clamps bind: a slot clamped low in an early round may end up free.)
    """
    w, shape = _as_weights(weights)
    n = _as_sizes(sizes, shape)
    budget, lo, hi = float(budget), float(b_min), float(b_max)
    _check_bounds(budget, lo, hi)
    if budget in (lo, hi):  # every slot must sit at that bound
        return np.full(shape, budget)
    c = _half_log2(w)
    target = budget * n.sum()
    knots = np.unique(np.concatenate([lo - c, hi - c]))
    knots = knots[np.isfinite(knots)]
    # largest k with f(knots[k]) ≤ target (k = −1 when none): θ lies in [knots[k], knots[k+1]]
    left, right = -1, knots.size
    while right - left > 1:
        mid = (left + right) // 2
        if _clamped_sum(knots[mid], c, n, lo, hi) <= target:
            left = mid
        else:
            right = mid
    if knots.size == 0:  # no finite clamp at all
        probe = 0.0
    elif left == -1:
        probe = knots[0] - 1.0
    elif left == knots.size - 1:
        probe = knots[-1] + 1.0
    else:
        probe = 0.5 * (knots[left] + knots[left + 1])
    raw = probe + c
    free = (raw > lo) & (raw < hi)
    if not free.any():  # flat piece exactly at the budget: every slot clamped
        return np.where(raw >= hi, hi, lo).reshape(shape)
    fixed = float((n * np.where(raw >= hi, hi, lo))[~free].sum())
    theta = (target - fixed - float((n * c)[free].sum())) / float(n[free].sum())
    return np.clip(theta + c, lo, hi).reshape(shape)


def _as_grid(grid: ArrayLike) -> np.ndarray:
    """Allowed rates as a 1-D float64 array: non-empty, finite, strictly increasing."""
    g = np.asarray(grid, dtype=np.float64)
    if g.ndim != 1 or g.size == 0:
        raise InputError(f"grid must be a non-empty 1-D array of rates, got shape {g.shape}")
    if not np.isfinite(g).all():
        raise InputError("grid rates must be finite")
    if not (np.diff(g) > 0).all():
        raise InputError("grid must be sorted in strictly increasing order")
    return g


def _step_grid(step: float, low: float, high: float) -> np.ndarray:
    """Multiples k·step in [low, high] (both finite); ends within 1e-9 steps of a bound snap onto it.

    Each multiple is the float nearest to k times the step's shortest decimal form (so a step of 0.1
    gives 1.3, not 13·0.1 = 1.3000000000000003, and a budget of 1.3 can be met exactly)."""
    if not (math.isfinite(step) and step > 0):
        raise InputError(f"grid step must be finite and > 0, got {step}")
    k0 = math.ceil(low / step - 1e-9)
    k1 = math.floor(high / step + 1e-9)
    decimal_step = Decimal(repr(step))
    levels = np.array([float(k * decimal_step) for k in range(k0, k1 + 1)], dtype=np.float64)
    return np.unique(np.clip(levels, low, high))


def _gain_key(w_log2: ArrayLike, a: ArrayLike, b: ArrayLike) -> np.ndarray:
    """log2 of the distortion decrease per bit of a slot moving from rate a to b: w(4^−a − 4^−b)/(b − a).

    In log space so that extreme weights or rates neither overflow nor underflow; elementwise.
    """
    d = np.asarray(b, dtype=np.float64) - np.asarray(a, dtype=np.float64)
    return np.asarray(w_log2) - 2.0 * np.asarray(a) + np.log2(-np.expm1(-d * math.log(4.0)) / d)


def round_to_grid(
    bits: ArrayLike,
    weights: ArrayLike,
    budget: float,
    grid: ArrayLike | float,
    sizes: ArrayLike | None = None,
    b_max: float | None = None,
) -> np.ndarray:
    """Move rates onto ``grid`` so that Σ n_i b_i ≤ budget·Σ n_i, spending leftover budget greedily.

    Parameters
    ----------
    bits : array, shape of ``weights``
        Continuous rates, normally :func:`water_fill`'s solution at ``budget``.
    weights, sizes : as in :func:`water_fill`.
    budget : float
        Mean rate not to be exceeded: Σ n_i b_i ≤ budget·Σ n_i holds exactly, in rational arithmetic
        on the given floats (no tolerance; a zero budget with a grid starting at 0 gives all zeros).
    grid : 1-D sorted array of allowed rates, or a float step
        A step s means the multiples of s from 0 to b_max (finite) or one step above max(bits, budget).
    b_max : float, optional
        Grid rates above it are not used (default: none dropped).

    Returns
    -------
    np.ndarray, shape of ``weights``, every entry a grid rate.

    Notes
    -----
    Each slot starts at the largest grid rate ≤ its continuous rate (the smallest grid rate if
    there is none; if that start breaks the budget, every slot starts at the smallest rate). The
    leftover budget is handed out one grid increment at a time to the slot with the largest marginal
    gain per bit, w_i·(4^−b − 4^−b_next)/(b_next − b), among increments that still fit the budget;
    one that does not fit is dropped (the spent budget only grows).

    With equal sizes and a uniform grid, and ``bits`` the water-filling solution clamped to the
    grid's ends (what :func:`allocate` passes), the result is an exact optimum of the discrete
    problem: every increment costs the same and each slot's gains decrease (4^−b is convex), so the
    optimum is the set of the largest gains; and every increment below a slot's start has gain
    ≥ μ·4^s while every one above has gain < μ·4^s (μ = 4^−θ the water level, s the step), so the
    start is part of that set and the greedy completes it. With unequal sizes or an uneven grid the
    greedy is a heuristic (a knapsack), close to but not always at the optimum.
    """
    w, shape = _as_weights(weights)
    n = _as_sizes(sizes, shape)
    b = np.asarray(bits, dtype=np.float64)
    if b.shape != shape:
        raise InputError(f"bits must have the shape of weights {shape}, got {b.shape}")
    b = b.reshape(-1)
    if not np.isfinite(b).all():
        raise InputError("bits must be finite")
    budget = float(budget)
    if not math.isfinite(budget):
        raise InputError(f"budget must be finite, got {budget}")
    if np.ndim(grid) == 0:
        step = float(grid)
        if not (math.isfinite(step) and step > 0):
            raise InputError(f"grid step must be finite and > 0, got {grid}")
        top = b_max if b_max is not None and math.isfinite(b_max) else max(float(b.max()), budget) + step
        levels = _step_grid(step, 0.0, max(top, 0.0))
    else:
        levels = _as_grid(grid)
    if b_max is not None:
        levels = levels[levels <= b_max]
        if levels.size == 0:
            raise InputError(f"no grid rate is ≤ b_max = {b_max}")
    # exact accounting: every float is a rational, so the budget test cannot be fooled by rounding
    size, rate = [Fraction(x) for x in n.tolist()], [Fraction(x) for x in levels.tolist()]
    cap = Fraction(budget) * sum(size)
    if rate[0] * sum(size) > cap:
        raise InputError(f"even the smallest grid rate {levels[0]} in every slot exceeds the budget {budget}")
    idx = np.clip(np.searchsorted(levels, b, side="right") - 1, 0, levels.size - 1)
    used = sum(s * rate[k] for s, k in zip(size, idx.tolist()))
    if used > cap:
        idx[:] = 0
        used = rate[0] * sum(size)
    w_log2 = np.log2(w)
    # max-heap (negated keys) of each slot's next increment; ties go to the lower slot index
    open_ = np.flatnonzero(idx + 1 < levels.size)
    keys = _gain_key(w_log2[open_], levels[idx[open_]], levels[idx[open_] + 1])
    heap = list(zip((-keys).tolist(), open_.tolist()))
    heapq.heapify(heap)
    wl, at = w_log2.tolist(), idx.tolist()
    while heap:
        _, i = heapq.heappop(heap)
        k = at[i]
        cost = size[i] * (rate[k + 1] - rate[k])
        if used + cost > cap:
            continue
        used += cost
        at[i] = k + 1
        if k + 2 < len(rate):
            heapq.heappush(heap, (-float(_gain_key(wl[i], levels[k + 1], levels[k + 2])), i))
    return levels[np.asarray(at, dtype=np.intp)].reshape(shape)


@dataclass(frozen=True, eq=False)
class Allocation:
    """A bit allocation and what the model predicts for it. Arrays have the shape of the weights (read-only).

    Attributes
    ----------
    bits : final rates (on the grid when one was given), bits per dimension.
    continuous : the clamped continuous water-filling solution they were rounded from.
    budget : the requested n-weighted mean rate b̄.
    mean_bits : achieved n-weighted mean rate Σ n_i b_i / Σ n_i (≤ budget).
    am_gm : AM_n(w) / GM_n(w), the predicted gain of unclamped, unrounded water-filling.
    predicted_ratio : D(uniform at b̄) / D(bits) under the model, with the final (clamped, rounded) bits.
    predicted_distortion : per slot n_i · w_i · 4^(−b_i) with the final bits.
    """

    bits: np.ndarray
    continuous: np.ndarray
    budget: float
    mean_bits: float
    am_gm: float
    predicted_ratio: float
    predicted_distortion: np.ndarray


def _exact_mean(bits: np.ndarray, n: np.ndarray) -> float:
    """Σ n_i b_i / Σ n_i rounded once to the nearest float (so a sum within the budget reads ≤ budget)."""
    total = sum(Fraction(x) for x in n.tolist())
    return float(sum(Fraction(s) * Fraction(b) for s, b in zip(n.tolist(), bits.reshape(-1).tolist())) / total)


def _readonly(a: np.ndarray) -> np.ndarray:
    a = np.array(a, dtype=np.float64)
    a.setflags(write=False)
    return a


def allocate(
    weights: ArrayLike,
    budget: float,
    grid: ArrayLike | float | None = None,
    b_min: float = 0.0,
    b_max: float = math.inf,
    sizes: ArrayLike | None = None,
) -> Allocation:
    """Water-fill ``budget`` over the slots, round onto ``grid`` within the budget, and report the model.

    Parameters
    ----------
    weights, budget, b_min, b_max, sizes : as in :func:`water_fill`.
    grid : None, float step or 1-D sorted array of allowed rates
        ``None`` keeps the continuous rates. A step s allows the multiples of s in [b_min, b_max]
        (b_min must then be finite). Only grid rates in [b_min, b_max] are used, and the continuous
        solution is clamped to the smallest and largest of them (so rounding starts inside the grid).

    Returns
    -------
    Allocation

    Raises
    ------
    InputError (a ValueError)
        Bad weights or sizes, budget outside [b_min, b_max], a bad grid, a budget below the
        smallest usable grid rate or above the largest.
    """
    w, shape = _as_weights(weights)
    n = _as_sizes(sizes, shape)
    budget, b_min, b_max = float(budget), float(b_min), float(b_max)
    _check_bounds(budget, b_min, b_max)
    if grid is None:
        continuous = water_fill(w, budget, b_min, b_max, n)
        bits = continuous
    else:
        if np.ndim(grid) == 0:
            if not math.isfinite(b_min):
                raise InputError("a grid step needs a finite b_min")
            c = _half_log2(w)
            top = budget - float((n * c).sum() / n.sum())  # largest unclamped rate; clamps only lower it
            levels = _step_grid(float(grid), b_min, min(b_max, top + float(grid)))
        else:
            levels = _as_grid(grid)
            levels = levels[(levels >= b_min) & (levels <= b_max)]
        if levels.size == 0:
            raise InputError(f"no grid rate lies within [b_min, b_max] = [{b_min}, {b_max}]")
        if budget < levels[0]:
            raise InputError(f"even the smallest grid rate {levels[0]} in every slot exceeds the budget {budget}")
        hi = b_max if np.ndim(grid) == 0 and b_max == math.inf else float(levels[-1])
        if budget > hi:
            raise InputError(f"budget {budget} is above the largest usable grid rate {hi}")
        continuous = water_fill(w, budget, float(levels[0]), hi, n)
        bits = round_to_grid(continuous, w, budget, levels, n)
    distortion = n * w * 4.0 ** (-bits)
    r = w / w.max()
    ratio = float((n * r).sum() / (n * r * 4.0 ** (budget - bits)).sum())
    return Allocation(
        bits=_readonly(bits.reshape(shape)),
        continuous=_readonly(continuous.reshape(shape)),
        budget=budget,
        mean_bits=_exact_mean(bits, n),
        am_gm=am_gm_ratio(w, n),
        predicted_ratio=ratio,
        predicted_distortion=_readonly(distortion.reshape(shape)),
    )
