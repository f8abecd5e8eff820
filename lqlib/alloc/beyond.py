"""The ablation study of :func:`lqlib.calibrate`: configurations, table rows, the targets' verdicts,
and where the remaining error sits.

* :data:`ABLATIONS` — the calibrated configuration, each idea removed from it (leave one out), and
  each idea added alone to a minimal configuration (fixed step, no RHT, one entropy-model width per
  head, no means, no weights, no sink): keyword arguments of :func:`lqlib.calibrate`.
* :func:`ablation_rows` — table rows from measured results: ΔPPL with its paired 95% interval, the
  gap to the full configuration with its paired interval, the measured rates.
* :func:`target_verdicts` — whether the issue's targets (ΔPPL ≤ +1.5% at ≤ 4.25 measured bits/dim,
  ≤ +8% at ≤ 3.25, on held-out text) are met, with the upper interval ends.
* :func:`headline_rows` — the calibrated cache against uniform E8 + RHT at a few budgets, calibrated on
  some windows and scored on others: the ablation's headline, recomputed at any size.
* :func:`partial_quantizers` — in-loop quantizers that code only keys, only values or only some
  layers (the rest at full precision), to see where the remaining error sits.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
from torch import Tensor

from ..cache.quantized import QuantizeDequantizeCache
from ..evaluation.capture import capture_kv
from ..evaluation.harness import compressed_cache_rate
from ..evaluation.models import LoadedModel
from ..evaluation.perplexity import perplexity
from ..evaluation.stats import paired_delta_pct, paired_gap_pp
from .calibrate import CalibratedCache, calibrate, calibration_statistics
from .schedule import schedule_quantizers, uniform_schedule

__all__ = [
    "FULL",
    "MINIMAL",
    "ABLATIONS",
    "TARGETS",
    "ablation_rows",
    "target_verdicts",
    "headline_rows",
    "partial_quantizers",
    "layer_groups",
]

FULL = "calibrated (all)"
#: The minimal configuration the "alone" rows add one idea to.
MINIMAL = {"pre_rope": False, "means": False, "per_channel": False, "alpha": 0.0, "across_slots": False, "sink": 0}
#: name → (kind, calibrate keyword arguments); kind is "full", "without" (leave one out) or "alone".
ABLATIONS: dict[str, tuple[str, dict]] = {
    FULL: ("full", {}),
    "without pre-RoPE keys": ("without", {"pre_rope": False}),
    "without channel means": ("without", {"means": False}),
    "without per-channel entropy model": ("without", {"per_channel": False}),
    "without weights within a head (α = 0)": ("without", {"alpha": 0.0}),
    "full diagonal weights (α = 1)": ("without", {"alpha": 1.0}),
    "without allocation across slots": ("without", {"across_slots": False}),
    "without sink token": ("without", {"sink": 0}),
    "minimal": ("alone", dict(MINIMAL)),
    "minimal + pre-RoPE keys": ("alone", {**MINIMAL, "pre_rope": True}),
    "minimal + channel means": ("alone", {**MINIMAL, "means": True}),
    "minimal + per-channel entropy model": ("alone", {**MINIMAL, "per_channel": True}),
    "minimal + weights within a head (α = 0.5)": ("alone", {**MINIMAL, "alpha": 0.5}),
    "minimal + allocation across slots": ("alone", {**MINIMAL, "across_slots": True}),
    "minimal + sink token": ("alone", {**MINIMAL, "sink": 1}),
}
#: (measured bits/dim at most, ΔPPL % at most): the issue's acceptance targets.
TARGETS = ((4.25, 1.5), (3.25, 8.0))


def ablation_rows(results: Iterable[dict], baseline_nll, tokens, reference: str = FULL) -> list[dict]:
    """Table rows from results with ``method``, ``budget``, ``window_nll`` (held-out windows) and the
    measured rates (``bits_calibration``, ``bits_heldout``): ΔPPL over ``baseline_nll`` with its paired
    95% interval, and the gap in percentage points to ``reference`` at the same budget (paired)."""
    results = list(results)
    ref = {r["budget"]: r for r in results if r["method"] == reference}
    rows = []
    for r in results:
        ci = paired_delta_pct(r["window_nll"], baseline_nll, tokens)
        row = {
            "method": r["method"],
            "kind": r.get("kind", ""),
            "budget": r["budget"],
            "bits_calibration": r.get("bits_calibration", float("nan")),
            "bits_heldout": r.get("bits_heldout", float("nan")),
            "delta_pct": ci.value,
            "low": ci.low,
            "high": ci.high,
            "gap_pp": float("nan"),
            "gap_low": float("nan"),
            "gap_high": float("nan"),
        }
        base = ref.get(r["budget"])
        if base is not None and base is not r:
            gap = paired_gap_pp(r["window_nll"], base["window_nll"], baseline_nll, tokens)
            row.update(gap_pp=gap.value, gap_low=gap.low, gap_high=gap.high)
        rows.append(row)
    return rows


def target_verdicts(rows: Iterable[dict], method: str = FULL, targets=TARGETS) -> list[dict]:
    """For each target (bits, ΔPPL): the row of ``method`` with the largest held-out measured rate at most
    ``bits`` (rows need ``bits_heldout``, ``delta_pct``, ``high``); met when its ΔPPL is at most the
    target, and ``met_upper`` when even the interval's upper end is."""
    verdicts = []
    for bits, limit in targets:
        eligible = [r for r in rows if r["method"] == method and r["bits_heldout"] <= bits]
        if not eligible:
            verdicts.append({"bits": bits, "limit": limit, "met": False, "met_upper": False, "row": None})
            continue
        row = max(eligible, key=lambda r: r["bits_heldout"])
        verdicts.append(
            {
                "bits": bits,
                "limit": limit,
                "met": bool(row["delta_pct"] <= limit),
                "met_upper": bool(row["high"] <= limit),
                "row": row,
            }
        )
    return verdicts


def headline_rows(
    loaded: LoadedModel,
    calibration_ids: Tensor,
    held_ids: Tensor,
    held_labels: Tensor,
    budgets: Iterable[float],
    statistics=None,
) -> list[dict]:
    """The calibrated cache (:data:`FULL`) and uniform E8 + RHT at each budget (bits/dim), both calibrated on
    ``calibration_ids`` (n, T) and scored in-loop on ``held_ids`` / ``held_labels`` (m, T'), the windows
    never used for calibration: rows of :func:`ablation_rows` (ΔPPL against full precision on the same
    windows, paired 95% intervals, measured rates on the calibration and held-out windows).
    ``statistics``: :func:`~lqlib.alloc.calibrate.calibration_statistics` of ``calibration_ids`` if
    already measured."""
    held_kv = [capture_kv(loaded, held_ids[i : i + 1]) for i in range(held_ids.shape[0])]
    fp = perplexity(loaded.model, held_ids, held_labels, progress=False)
    stats = statistics if statistics is not None else calibration_statistics(loaded, calibration_ids)
    results = []
    for bits in budgets:
        factory = calibrate(loaded, bits, statistics=stats)
        run = perplexity(loaded.model, held_ids, held_labels, factory.in_loop_cache, progress=False)
        rates = (factory.bits_per_dim, factory.rate(held_kv))
        results.append(_result(FULL, bits, rates, run.window_nll))
        schedule = uniform_schedule(bits, stats.windows[0])
        keys, values = schedule_quantizers(schedule)
        run = perplexity(
            loaded.model,
            held_ids,
            held_labels,
            lambda keys=keys, values=values: QuantizeDequantizeCache(keys, loaded.config, values),
            progress=False,
        )
        held = float(np.mean([compressed_cache_rate(kv, schedule) for kv in held_kv]))
        rates = (compressed_cache_rate(stats.windows[0], schedule), held)
        results.append(_result("uniform E8 + RHT", bits, rates, run.window_nll))
    return ablation_rows(results, fp.window_nll, fp.window_tokens)


def _result(method: str, budget: float, rates: tuple[float, float], window_nll) -> dict:
    return {
        "method": method,
        "budget": float(budget),
        "bits_calibration": rates[0],
        "bits_heldout": rates[1],
        "window_nll": list(window_nll),
    }


def _identity(x, start: int = 0):
    return x


_identity.positional = True


def partial_quantizers(
    factory: CalibratedCache, keys: bool = True, values: bool = True, layers: Iterable[int] | None = None
):
    """(key, value) in-loop quantizers of ``factory`` with only the chosen paths and layers coded; the rest
    stay at full precision."""
    key_q, value_q = factory.quantizers()
    chosen = set(range(len(key_q))) if layers is None else set(layers)
    return (
        [q if keys and i in chosen else _identity for i, q in enumerate(key_q)],
        [q if values and i in chosen else _identity for i, q in enumerate(value_q)],
    )


def layer_groups(n_layers: int, groups: int) -> list[list[int]]:
    """``groups`` runs of consecutive layers, as equal as possible."""
    return [list(map(int, part)) for part in np.array_split(np.arange(n_layers), groups)]
