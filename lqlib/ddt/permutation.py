"""The permutation puzzle (Paper III): does the order of the dims inside a cached vector matter?

A block quantizer (E8 without rotation, or a scalar quantizer with one step per 8-block)
codes each cached vector (d = head dim) as d/8 blocks of 8 consecutive dims. Reordering the dims
*inside* a block changes nothing (E8 is closed under coordinate permutations; a per-block step
sees the same mean square), so an ordering matters only through *which* dims share a block.
This module builds such orderings per layer and path from a captured cache, runs the in-loop
quantized cache with them, and measures both the loss (per window, for paired bootstrap
intervals) and the relative MSE of the errors the quantizers really inject.

Shapes: a captured cache (:class:`~lqlib.kv_capture.KVSample`) holds keys and values of shape
(layers, kv_heads, tokens, d); an ordering is an int64 permutation of shape (d,).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from ..cache.quantized import QuantizeDequantizeCache
from ..errors import InputError
from ..evaluation.capture import KVSample
from ..evaluation.models import LoadedModel
from ..evaluation.perplexity import perplexity
from ..evaluation.stats import (
    Estimate,
    RatioEstimate,
    paired_delta_pct,
    paired_gap_pp,
    percentile_interval,
    resample,
)
from .gradients import _stored
from .moments import directional_risk, error_moments_for_cache
from .quantizers import Permuted, Quantizer, Quantizers, _per_layer, block_permutation

__all__ = [
    "ORDERINGS",
    "cache_orderings",
    "permuted_quantizers",
    "ErrorMeter",
    "QuantizedRun",
    "measure_quantized",
    "within_block_permutation",
    "ordering_change",
    "permutation_configurations",
    "OrderingRun",
    "run_ordering",
    "ordering_risk",
    "SPREAD_KINDS",
    "OrderingSpread",
    "ordering_ratio",
    "ordering_summary",
]

#: The orderings of the puzzle.
ORDERINGS = ("identity", "sorted", "random")


def cache_orderings(kind: str, kv: KVSample, seed: int = 0) -> tuple[list[Tensor], list[Tensor]]:
    """One ordering per layer for the keys and one for the values, from a calibration cache.

    Parameters
    ----------
    kind : ``"identity"``, ``"sorted"`` (dims by decreasing second moment of that layer's
        calibration keys or values, pooled over KV heads and tokens, so dims of similar scale
        share a block) or ``"random"`` (an independent seeded permutation per layer and path).
    kv : calibration cache, keys and values (layers, kv_heads, tokens, d).
    seed : seed of the random orderings (the permutation of layer l, path p uses the seed
        ``seed · 2·layers + 2·l + p``, so different seeds give disjoint streams).

    Returns
    -------
    (key_orderings, value_orderings): two lists of ``layers`` int64 tensors of shape (d,).
    """
    if kind not in ORDERINGS:
        raise ValueError(f"kind must be one of {ORDERINGS}, got {kind!r}")
    if kv.keys.dim() != 4 or kv.keys.shape != kv.values.shape:
        raise ValueError(
            f"expected keys and values of one shape (layers, heads, tokens, d), got "
            f"{tuple(kv.keys.shape)} and {tuple(kv.values.shape)}"
        )
    layers, d = kv.keys.shape[0], kv.keys.shape[-1]
    out: tuple[list[Tensor], list[Tensor]] = ([], [])
    for layer in range(layers):
        for path, x in enumerate((kv.keys, kv.values)):
            out[path].append(block_permutation(kind, d, sample=x[layer], seed=seed * 2 * layers + 2 * layer + path))
    return out


def permuted_quantizers(quantizer, orderings: Sequence[Tensor]) -> list[Quantizer]:
    """``quantizer`` (a callable or an object with ``quantize``, e.g. an E8 codec) under each
    layer's ordering: one :class:`~lqlib.ddt.Permuted` per entry of ``orderings``."""
    return [Permuted(quantizer, order) for order in orderings]


class ErrorMeter:
    """Counts the energy of the errors that quantizers inject and of what they were given.

    Wrap each layer's key (path 0) and value (path 1) quantizer with :meth:`wrap`; every call
    adds Σ‖x̂ − x‖² and Σ‖x‖² (float64, on x's device, no host sync) to that slot's totals.
    """

    def __init__(self, layers: int) -> None:
        if layers < 1:
            raise ValueError(f"need at least one layer, got {layers}")
        self.layers = int(layers)
        self._error: dict[tuple[int, int], Tensor] = {}
        self._signal: dict[tuple[int, int], Tensor] = {}

    def wrap(self, quantizer: Quantizer, layer: int, path: int) -> Quantizer:
        """``quantizer`` that also records its errors under slot (layer, path), path 0 = K, 1 = V."""
        if not (0 <= layer < self.layers and path in (0, 1)):
            raise ValueError(f"slot ({layer}, {path}) is outside {self.layers} layers × {{0, 1}}")
        quantize = quantizer.quantize if hasattr(quantizer, "quantize") else quantizer
        key = (layer, path)

        def write(x: Tensor) -> Tensor:
            out = quantize(x)
            x64 = x.detach().to(torch.float64)
            error = (out.detach().to(torch.float64) - x64).square().sum()
            signal = x64.square().sum()
            self._error[key] = self._error[key] + error if key in self._error else error
            self._signal[key] = self._signal[key] + signal if key in self._signal else signal
            return out

        return write

    def _totals(self) -> tuple[np.ndarray, np.ndarray]:
        error, signal = np.zeros((self.layers, 2)), np.zeros((self.layers, 2))
        for key, value in self._error.items():
            error[key] = float(value)
            signal[key] = float(self._signal[key])
        return error, signal

    def slot_relative_mse(self) -> np.ndarray:
        """Σ‖e‖² / Σ‖x‖² per slot, float64 (layers, 2); NaN for a slot never written."""
        error, signal = self._totals()
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(signal > 0, error / np.where(signal > 0, signal, 1.0), np.nan)

    def relative_mse(self) -> float:
        """Σ‖e‖² / Σ‖x‖² pooled over every slot written (tr Σ / E‖x‖² of the whole cache)."""
        error, signal = self._totals()
        if not signal.sum() > 0:
            raise ValueError("nothing was measured (or only zeros)")
        return float(error.sum() / signal.sum())


@dataclass(frozen=True)
class QuantizedRun:
    """One configuration scored on some windows with the in-loop quantized cache.

    Attributes
    ----------
    window_nll : float64 (windows,): summed NLL of each window's scored tokens (nats).
    window_tokens : int64 (windows,): scored tokens per window.
    rel_mse : Σ‖e‖² / Σ‖x‖² of the injected errors over all layers, paths, heads and tokens.
    slot_rel_mse : float64 (layers, 2): the same per layer and path (0 = K, 1 = V).
    """

    window_nll: np.ndarray
    window_tokens: np.ndarray
    rel_mse: float
    slot_rel_mse: np.ndarray

    @property
    def ppl(self) -> float:
        return float(np.exp(self.window_nll.sum() / self.window_tokens.sum()))


def measure_quantized(
    loaded: LoadedModel,
    input_ids: Tensor,
    labels: Tensor,
    key_quantizers: Quantizers,
    value_quantizers: Quantizers | None = None,
    batch_size: int = 2,
    progress: bool = False,
) -> QuantizedRun:
    """Perplexity windows with an in-loop quantized cache, and the relative MSE of what it injects.

    Parameters
    ----------
    input_ids, labels : (windows, T) as from :func:`~lqlib.perplexity.token_windows`.
    key_quantizers, value_quantizers : a quantizer or one per layer (values default to the
        keys'), as for :class:`~lqlib.quantized_cache.QuantizeDequantizeCache`.

    The errors are the injected ones: layer l's quantizer sees inputs already moved by the
    errors of the layers before it, exactly as in the scored pass. Stored (:mod:`lqlib.store`) under the
    model, windows, quantizers and batch size when the quantizers can be keyed.
    """
    inputs = {
        "ids": input_ids,
        "labels": labels,
        "keys": key_quantizers,
        "values": value_quantizers,
        "batch": batch_size,
    }
    return _stored(
        loaded,
        "quantized_run",
        inputs,
        lambda: _measure_quantized(loaded, input_ids, labels, key_quantizers, value_quantizers, batch_size, progress),
    )


def _measure_quantized(loaded, input_ids, labels, key_quantizers, value_quantizers, batch_size, progress):
    layers = loaded.config.num_hidden_layers
    kq = _per_layer(key_quantizers, layers)
    vq = _per_layer(key_quantizers if value_quantizers is None else value_quantizers, layers)
    meter = ErrorMeter(layers)
    keys = [meter.wrap(q, layer, 0) for layer, q in enumerate(kq)]
    values = [meter.wrap(q, layer, 1) for layer, q in enumerate(vq)]
    result = perplexity(
        loaded.model,
        input_ids,
        labels,
        lambda: QuantizeDequantizeCache(keys, loaded.config, values),
        batch_size=batch_size,
        progress=progress,
    )
    return QuantizedRun(
        np.asarray(result.window_nll, dtype=np.float64),
        np.asarray(result.window_tokens, dtype=np.int64),
        meter.relative_mse(),
        meter.slot_relative_mse(),
    )


def within_block_permutation(d: int, block: int = 8, seed: int = 0) -> Tensor:
    """A seeded permutation of d dims that shuffles dims only inside each block of ``block``: int64 (d,)."""
    if d % block:
        raise InputError(f"block {block} does not divide the dim {d}")
    generator = torch.Generator().manual_seed(seed)
    return torch.cat([torch.randperm(block, generator=generator) + block * k for k in range(d // block)])


def ordering_change(quantizer, x: Tensor, permutation) -> float:
    """‖q_p(x) − q(x)‖ / ‖q(x) − x‖: how far the ordering ``permutation`` moves a quantizer's output, in units
    of its quantization error (``q_p`` = :class:`~lqlib.ddt.Permuted`; 0 for an ordering inside the blocks)."""
    plain = Permuted(quantizer, torch.arange(x.shape[-1]))(x)
    return float((Permuted(quantizer, permutation)(x) - plain).norm() / (plain - x).norm())


def permutation_configurations(
    quantizers: Sequence[str], bit_widths: Sequence[float], random_seeds: int, rht: str = "", rht_bits=(), rht_seeds=1
) -> list[tuple[str, float, str, int | None]]:
    """The puzzle's configurations as (quantizer, bits, ordering, seed): every quantizer of ``quantizers`` at
    every bit width with the identity, sorted and ``random_seeds`` random orderings; the quantizer ``rht`` only
    at ``rht_bits``, with ``rht_seeds`` random orderings."""
    out = []
    for bits in bit_widths:
        for name in [*quantizers, *([rht] if rht and bits in rht_bits else [])]:
            seeds = rht_seeds if name == rht else random_seeds
            orders = [("identity", None), ("sorted", None)] + [("random", s) for s in range(seeds)]
            out += [(name, float(bits), ordering, seed) for ordering, seed in orders]
    return out


@dataclass(frozen=True)
class OrderingRun:
    """One configuration of the puzzle: a quantizer at a bit width under one ordering, scored.

    Attributes
    ----------
    quantizer : the quantizer's name. bits : its bit width. ordering : ``"identity"``, ``"sorted"`` or
    ``"random"``. seed : the random ordering's seed (None otherwise). run : the scored run.
    delta : ΔPPL in percent against full precision on the same windows, with its paired interval.
    """

    quantizer: str
    bits: float
    ordering: str
    seed: int | None
    run: QuantizedRun
    delta: Estimate

    @property
    def name(self) -> str:
        """The ordering's name, with the seed of a random one (``"random (seed 1)"``)."""
        return self.ordering if self.seed is None else f"{self.ordering} (seed {self.seed})"


def run_ordering(
    loaded: LoadedModel,
    input_ids: Tensor,
    labels: Tensor,
    quantizer,
    orderings: tuple[Sequence[Tensor], Sequence[Tensor]],
    baseline,
    *,
    name: str,
    bits: float,
    ordering: str,
    seed: int | None = None,
    batch_size: int = 2,
    draws: int = 4000,
) -> OrderingRun:
    """Score ``quantizer`` under per-layer key and value ``orderings`` (:func:`cache_orderings`) in the loop
    (:func:`measure_quantized`), with ΔPPL against ``baseline`` (the full-precision
    :class:`~lqlib.evaluation.perplexity.PerplexityResult` of the same windows) and its paired interval."""
    keys, values = (permuted_quantizers(quantizer, o) for o in orderings)
    run = measure_quantized(loaded, input_ids, labels, keys, values, batch_size)
    delta = paired_delta_pct(run.window_nll, baseline.window_nll, baseline.window_tokens, draws=draws)
    return OrderingRun(name, float(bits), ordering, seed, run, delta)


def ordering_risk(
    M: np.ndarray, kv: KVSample, quantizer, orderings: tuple[Sequence[Tensor], Sequence[Tensor]]
) -> float:
    """Σ over layers, paths and heads of the directional risk tr(MΣ), with Σ the error moments of ``quantizer``
    under ``orderings`` on the captured cache ``kv`` (:func:`~lqlib.ddt.error_moments_for_cache`) and M of
    shape (layers, 2, kv_heads, d, d)."""
    keys, values = (permuted_quantizers(quantizer, o) for o in orderings)
    return float(directional_risk(M, error_moments_for_cache(kv, keys, values).sigma).sum())


#: How an :class:`OrderingSpread` classifies the orderings' effect on ΔPPL (see :func:`ordering_summary`).
SPREAD_KINDS = ("noise", "random spread", "equal MSE", "follows MSE", "against MSE")


@dataclass(frozen=True)
class OrderingSpread:
    """How far ΔPPL and the relative MSE move over the orderings of one quantizer and bit width.

    Attributes
    ----------
    quantizer, bits : the group. n_orderings : configurations in it.
    mse_spread_pct : 100·(max/min − 1) of the relative MSE over the orderings.
    worst, best : the orderings with the largest and smallest ΔPPL (names with seeds).
    dppl_spread : ΔPPL(worst) − ΔPPL(best), percentage points.
    gap : the paired bootstrap estimate of that gap (windows resampled for both together).
    apart : the two configurations' own intervals do not overlap.
    ratio : ΔPPL(worst) / ΔPPL(best), both re-selected in every resample (:func:`ordering_ratio`).
    random_spread : the ΔPPL spread among the random orderings alone (NaN with fewer than two): random
        orderings are exchangeable, so this is a floor that an ordering effect must exceed.
    nearly_equal_mse : mse_spread_pct is within the tolerance.
    kind : one of :data:`SPREAD_KINDS`.
    """

    quantizer: str
    bits: float
    n_orderings: int
    mse_spread_pct: float
    worst: str
    best: str
    dppl_spread: float
    gap: Estimate
    apart: bool
    ratio: RatioEstimate
    random_spread: float
    nearly_equal_mse: bool
    kind: str

    @property
    def significant(self) -> bool:
        """The paired interval of the gap excludes 0."""
        return bool(self.gap.low > 0)


def ordering_ratio(
    window_nlls: Sequence, baseline_window_nll, tokens, draws: int = 4000, level: float = 0.95, seed: int = 0
) -> RatioEstimate:
    """The largest over the smallest ΔPPL among several configurations on the same windows.

    In every resample of the windows (:func:`lqlib.evaluation.stats.resample`, all configurations and
    the baseline together) the ΔPPL of every configuration is recomputed and the largest and smallest
    are taken again, so the selection of the pair is part of the interval. The denominator (the
    smallest ΔPPL) gets its own interval; where it reaches 0 or below the ratio is left undefined
    (NaN, :attr:`RatioEstimate.defined` False), as :func:`~lqlib.evaluation.stats.paired_ratio` does.

    Parameters
    ----------
    window_nlls : per-window summed NLLs (windows,) of each configuration (at least 2).
    baseline_window_nll, tokens : the full-precision per-window NLL and scored tokens.
    """
    nll = np.asarray([np.asarray(w, dtype=np.float64) for w in window_nlls])  # (C, W)
    base = np.asarray(baseline_window_nll, dtype=np.float64).reshape(-1)
    weights = np.asarray(tokens, dtype=np.float64).reshape(-1)
    if nll.ndim != 2 or nll.shape[0] < 2 or nll.shape[1] != base.size or base.size != weights.size:
        raise InputError(
            f"need at least 2 configurations' window NLLs of the baseline's length, got {nll.shape} for "
            f"{base.size} windows and {weights.size} token counts"
        )

    def delta(index: np.ndarray) -> np.ndarray:  # (..., C)
        excess = (nll - base)[:, index].sum(axis=-1)  # (C, ...)
        return np.moveaxis(100.0 * np.expm1(excess / weights[index].sum(axis=-1)), 0, -1)

    whole, draws_ = delta(np.arange(base.size)), delta(resample(base.size, draws, seed))
    top, bottom = draws_.max(axis=-1), draws_.min(axis=-1)
    n = base.size
    numerator = Estimate(float(whole.max()), *percentile_interval(top, level), level, n)
    denominator = Estimate(float(whole.min()), *percentile_interval(bottom, level), level, n)
    if not denominator.low > 0:
        nan = float("nan")
        return RatioEstimate(nan, nan, nan, level, n, numerator, denominator)
    low, high = percentile_interval(top / bottom, level)
    return RatioEstimate(numerator.value / denominator.value, low, high, level, n, numerator, denominator)


def ordering_summary(
    runs: Sequence[OrderingRun],
    baseline_window_nll,
    tokens,
    mse_tolerance_pct: float = 5.0,
    draws: int = 4000,
    seed: int = 0,
) -> list[OrderingSpread]:
    """One :class:`OrderingSpread` per (quantizer, bits), in first-seen order.

    The worst and best orderings are those of the largest and smallest ΔPPL; their gap gets a paired
    bootstrap interval over windows. Classification (:data:`SPREAD_KINDS`): ``"noise"`` (the paired
    interval of the gap holds 0); ``"random spread"`` (it does not, but the gap is no larger than the
    random orderings' own spread); otherwise ``"equal MSE"`` (MSE spread within ``mse_tolerance_pct``),
    ``"follows MSE"`` or ``"against MSE"`` (by whether the worst ordering has the larger MSE).
    """
    if not runs:
        raise InputError("no configurations to summarise")
    groups: dict[tuple, list[OrderingRun]] = {}
    for run in runs:
        groups.setdefault((run.quantizer, run.bits), []).append(run)
    out = []
    for (quantizer, bits), group in groups.items():
        mse = np.array([r.run.rel_mse for r in group], dtype=np.float64)
        worst = max(group, key=lambda r: r.delta.value)
        best = min(group, key=lambda r: r.delta.value)
        gap = paired_gap_pp(
            worst.run.window_nll, best.run.window_nll, baseline_window_nll, tokens, draws=draws, seed=seed
        )
        mse_spread = 100.0 * (mse.max() / mse.min() - 1.0)
        random = [r.delta.value for r in group if r.ordering == "random"]
        random_spread = max(random) - min(random) if len(random) > 1 else float("nan")
        spread = worst.delta.value - best.delta.value
        if not gap.low > 0:
            kind = "noise"
        elif spread <= random_spread:
            kind = "random spread"
        elif mse_spread <= mse_tolerance_pct:
            kind = "equal MSE"
        else:
            kind = "follows MSE" if worst.run.rel_mse > best.run.rel_mse else "against MSE"
        ratio = ordering_ratio([r.run.window_nll for r in group], baseline_window_nll, tokens, draws, seed=seed)
        out.append(
            OrderingSpread(
                quantizer=quantizer,
                bits=bits,
                n_orderings=len(group),
                mse_spread_pct=float(mse_spread),
                worst=worst.name,
                best=best.name,
                dppl_spread=float(spread),
                gap=gap,
                apart=bool(worst.delta.low > best.delta.high),
                ratio=ratio,
                random_spread=float(random_spread),
                nearly_equal_mse=bool(mse_spread <= mse_tolerance_pct),
                kind=kind,
            )
        )
    return out
