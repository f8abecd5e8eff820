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
from ..evaluation.capture import KVSample
from ..evaluation.models import LoadedModel
from ..evaluation.perplexity import perplexity
from ..evaluation.stats import paired_gap_pp
from .quantizers import Permuted, Quantizer, Quantizers, _per_layer, block_permutation

__all__ = [
    "ORDERINGS",
    "cache_orderings",
    "permuted_quantizers",
    "ErrorMeter",
    "QuantizedRun",
    "measure_quantized",
    "ordering_summary",
]

#: The orderings of the puzzle (RESEARCH.md §3).
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
    errors of the layers before it, exactly as in the scored pass.
    """
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


def ordering_summary(
    rows: Sequence[dict], baseline_window_nll, tokens, mse_tolerance_pct: float = 5.0, n_boot: int = 4000, seed: int = 0
) -> list[dict]:
    """How far ΔPPL and the relative MSE move over the orderings, per quantizer and bit width.

    Parameters
    ----------
    rows : one per configuration with keys ``quantizer``, ``bits``, ``ordering``, ``rel_mse``,
        ``delta_pct``, ``ci_low``, ``ci_high`` (percent) and ``window_nll`` (per-window summed
        NLL on the evaluation windows, the same windows for every row).
    baseline_window_nll, tokens : the full-precision per-window NLL and scored tokens.
    mse_tolerance_pct : MSE spreads up to this (max/min − 1, in %) count as "nearly equal MSE".

    Returns
    -------
    One dict per (quantizer, bits), in first-seen order: ``quantizer``, ``bits``,
    ``mse_spread_pct`` (100·(max/min − 1) of rel_mse over the orderings), ``dppl_spread``
    (max − min of delta_pct, percentage points), ``dppl_spread_ci`` (text: "yes" when the
    extreme configurations' intervals do not overlap, "paired only" when only the paired
    bootstrap interval of their gap excludes 0, else "no"; with the half-widths and the paired
    interval), ``verdict`` (text), and ``details`` (a dict, left out of CSV files): the worst
    and best rows' orderings and seeds, the ΔPPL ratio worst/best, the paired gap interval,
    and ``random_spread``, the ΔPPL spread among the random orderings alone (NaN with fewer
    than two). Random orderings are exchangeable, so their spread is a floor for what an
    ordering effect must exceed: the window bootstrap does not see that the quantization
    noise itself is one realisation among many.

    Verdicts: "no ΔPPL difference beyond noise" (the paired interval holds 0); "within the
    random orderings' own spread" (it does not, but the gap is no larger than the random
    orderings' spread); otherwise "ΔPPL differs at nearly equal MSE" (MSE spread within the
    tolerance), "ΔPPL follows MSE" or "ΔPPL against MSE" (by whether the worst ordering has the
    larger MSE).
    """
    if not rows:
        raise ValueError("no configurations to summarise")
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row["quantizer"], row["bits"]), []).append(row)
    out = []
    for (quantizer, bits), group in groups.items():
        mse = np.array([r["rel_mse"] for r in group], dtype=np.float64)
        worst = max(group, key=lambda r: r["delta_pct"])
        best = min(group, key=lambda r: r["delta_pct"])
        gap = paired_gap_pp(
            worst["window_nll"], best["window_nll"], baseline_window_nll, tokens, draws=n_boot, seed=seed
        )
        half = [(r["ci_high"] - r["ci_low"]) / 2 for r in (worst, best)]
        apart = worst["ci_low"] > best["ci_high"]
        paired = gap.low > 0
        mse_spread = 100.0 * (mse.max() / mse.min() - 1.0)
        label = "yes" if apart else "paired only" if paired else "no"
        spread_ci = f"{label} (CIs ±{half[0]:.2f}, ±{half[1]:.2f} pp; paired gap CI {gap.low:.2f} to {gap.high:.2f} pp)"
        names = f"{_name(worst)} worst, {_name(best)} best"
        random = [r["delta_pct"] for r in group if r["ordering"] == "random"]
        random_spread = max(random) - min(random) if len(random) > 1 else float("nan")
        if not paired:
            verdict = "no ΔPPL difference beyond noise"
        elif worst["delta_pct"] - best["delta_pct"] <= random_spread:
            verdict = f"within the random orderings' own spread ({names})"
        elif mse_spread <= mse_tolerance_pct:
            verdict = f"ΔPPL differs at nearly equal MSE ({names})"
        elif worst["rel_mse"] > best["rel_mse"]:
            verdict = f"ΔPPL follows MSE ({names})"
        else:
            verdict = f"ΔPPL against MSE ({names})"
        out.append(
            {
                "quantizer": quantizer,
                "bits": bits,
                "mse_spread_pct": mse_spread,
                "dppl_spread": worst["delta_pct"] - best["delta_pct"],
                "dppl_spread_ci": spread_ci,
                "verdict": verdict,
                "details": {
                    "worst": _name(worst),
                    "best": _name(best),
                    "ratio": worst["delta_pct"] / best["delta_pct"],
                    "gap_low": gap.low,
                    "gap_high": gap.high,
                    "significant": paired,
                    "nearly_equal_mse": mse_spread <= mse_tolerance_pct,
                    "random_spread": random_spread,
                },
            }
        )
    return out


def _name(row: dict) -> str:
    seed = row.get("seed", "")
    return row["ordering"] if seed in ("", None) else f"{row['ordering']} (seed {seed})"
