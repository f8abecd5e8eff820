"""Paper IV's pages: the sensitivities (stored and shared by the chapter's pages), AM/GM with an interval,
the allocation comparison's specifications, rows and verdict inputs, the water-filling widget's pictures,
and the sentences built from numbers — with the column specifications beside them."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from torch import Tensor

from ..alloc.allocation import allocate, am_gm_ratio, predicted_distortion
from ..alloc.schedule import fit_schedule, schedule_quantizers, uniform_schedule
from ..alloc.sensitivity import Sensitivity, measure_sensitivity
from ..cache.quantized import QuantizeDequantizeCache
from ..evaluation.capture import KVSample
from ..evaluation.harness import MethodSpec, compressed_cache_rate, method_ratio
from ..evaluation.models import LoadedModel
from ..evaluation.stats import Estimate, RatioEstimate, bootstrap, paired_delta_pct
from ..store import memo
from . import paper_values as pv

__all__ = [
    "window_sensitivities",
    "pooled",
    "am_gm_estimate",
    "PER_LAYER_COLUMNS",
    "per_layer_rows",
    "AM_GM_COLUMNS",
    "am_gm_rows",
    "plot_profile",
    "SLOT_COLUMNS",
    "slot_rows",
    "plot_slot_check",
    "VARIANTS",
    "allocation_specs",
    "ALLOCATION_COLUMNS",
    "allocation_rows",
    "plot_allocation",
    "plot_schedule",
    "allocation_sentence",
    "paper4_protocol",
    "water_filling_plans",
    "water_filling_renderer",
    "WATER_FILLING_COLUMNS",
    "water_filling_rows",
]


def window_sensitivities(loaded: LoadedModel, input_ids: Tensor) -> list[Sensitivity]:
    """:func:`~lqlib.alloc.sensitivity.measure_sensitivity` of each window (stored, so every page of the
    chapter and every run shares them)."""
    return [
        memo(
            "sensitivity",
            {"model": loaded.fingerprint, "ids": ids[None]},
            lambda ids=ids: measure_sensitivity(loaded, ids[None], progress=False),
        )
        for ids in input_ids
    ]


def pooled(sensitivities: Sequence[Sensitivity]) -> Sensitivity:
    """The windows' sensitivities averaged (every window has the same number of tokens)."""
    fields = ("eta_k", "eta_v", "sigma2_k", "sigma2_v", "weight_k", "weight_v", "gamma")
    return Sensitivity(**{f: np.mean([getattr(s, f) for s in sensitivities], axis=0) for f in fields})


def _am_gm_over_windows(weights: np.ndarray, draws: int) -> Estimate:
    """AM/GM of the window-mean of ``weights`` (windows, ...), with a bootstrap interval over windows."""

    def statistic(index: np.ndarray) -> np.ndarray:
        rows = np.atleast_2d(index)
        out = np.array([am_gm_ratio(weights[i].mean(axis=0)) for i in rows])
        return out if np.ndim(index) > 1 else out[0]

    return bootstrap(statistic, len(weights), draws)


def am_gm_estimate(sensitivities: Sequence[Sensitivity], per_head: bool = False, draws: int = 2000) -> Estimate:
    """AM/GM of the pooled slot weights, with a bootstrap interval over the calibration windows."""
    return _am_gm_over_windows(np.stack([s.slot_weights(per_head=per_head) for s in sensitivities]), draws)


PER_LAYER_COLUMNS = {
    "layer": "layer",
    "gamma": ("Γ_l", 3),
    "eta_k": ("η_K", 4),
    "sigma2_k": ("σ²_K", 3),
    "eta_v": ("η_V", 4),
    "sigma2_v": ("σ²_V", 4),
    "w_k": ("K weight", 2),
    "w_v": ("V weight", 2),
}


def per_layer_rows(sens: Sensitivity) -> list[dict]:
    """Per layer: Γ_l, η and σ² (means over KV heads) and the two slot weights."""
    w = sens.slot_weights()
    return [
        {
            "layer": layer,
            "gamma": sens.gamma[layer],
            "eta_k": sens.eta_k[layer].mean(),
            "sigma2_k": sens.sigma2_k[layer].mean(),
            "eta_v": sens.eta_v[layer].mean(),
            "sigma2_v": sens.sigma2_v[layer].mean(),
            "w_k": w[layer, 0],
            "w_v": w[layer, 1],
        }
        for layer in range(len(w))
    ]


AM_GM_COLUMNS = {"slots": "slots", "n": "count", "am_gm": "AM/GM [95% interval]", "paper": "paper (its model)"}


def am_gm_rows(sensitivities: Sequence[Sensitivity]) -> list[dict]:
    """AM/GM of the weights over three slot sets, with intervals over windows, and the paper's values."""
    sens = pooled(sensitivities)
    paper = f"{pv.PAPER4['am_gm_llama']} (Llama-3.1-8B), {pv.PAPER4['am_gm_qwen']} (Qwen2.5-7B)"
    kv_only = _am_gm_over_windows(np.stack([s.slot_weights().sum(axis=0) for s in sensitivities]), 2000)
    return [
        {
            "slots": "layer × {K, V}",
            "n": sens.slot_weights().size,
            "am_gm": am_gm_estimate(sensitivities).format(3),
            "paper": paper,
        },
        {
            "slots": "layer × {K, V} × KV head",
            "n": sens.slot_weights(per_head=True).size,
            "am_gm": am_gm_estimate(sensitivities, per_head=True).format(3),
            "paper": "—",
        },
        {"slots": "{K, V} only", "n": 2, "am_gm": kv_only.format(3), "paper": "—"},
    ]


def plot_profile(sens: Sensitivity):
    """Slot weights (top) and propagation factors Γ_l (bottom) per layer."""
    import matplotlib.pyplot as plt

    w = sens.slot_weights()
    layers = np.arange(len(w))
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 4.6), sharex=True)
    top.semilogy(layers, w[:, 0], "o-", label="keys: Γ·weight")
    top.semilogy(layers, w[:, 1], "s-", label="values: Γ·weight")
    top.set(ylabel="slot weight")
    top.legend()
    bottom.semilogy(layers, sens.gamma, "d-", color="#8172b2")
    bottom.set(xlabel="layer", ylabel="Γ_l")
    return fig


SLOT_COLUMNS = {"statistic": "statistic", "value": "value"}


def slot_rows(predicted: np.ndarray, measured: dict) -> tuple[list[dict], dict]:
    """The one-slot check summarised: rank correlations with their intervals over slots, and the spread
    of measured / predicted (rows of :data:`SLOT_COLUMNS`), and the same numbers as a dict."""
    from ..evaluation.stats import spearman

    ratio = measured["hidden"] / predicted
    rho_hidden = spearman(predicted.ravel(), measured["hidden"].ravel())
    rho_nll = spearman(predicted.ravel(), measured["delta_nll"].ravel())
    values = {
        "rho_hidden": rho_hidden,
        "rho_nll": rho_nll,
        "ratio_median": float(np.median(ratio)),
        "ratio_min": float(ratio.min()),
        "ratio_max": float(ratio.max()),
    }
    rows = [
        {"statistic": "Spearman ρ, predicted vs measured hidden-state distortion", "value": rho_hidden.format(3)},
        {"statistic": "Spearman ρ, predicted distortion vs measured ΔNLL", "value": rho_nll.format(3)},
        {
            "statistic": "measured / predicted distortion: median [min, max] over slots",
            "value": f"{values['ratio_median']:.2f} [{values['ratio_min']:.2f}, {values['ratio_max']:.2f}]",
        },
    ]
    return rows, values


def plot_slot_check(predicted: np.ndarray, measured: dict):
    """Predicted against measured hidden-state distortion (left) and ΔNLL (right), one point per slot."""
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.6))
    for p, marker in ((0, "o"), (1, "s")):
        left.loglog(predicted[:, p], measured["hidden"][:, p], marker, label="KV"[p])
        right.semilogx(predicted[:, p], measured["delta_nll"][:, p], marker, label="KV"[p])
    lims = [predicted.min() / 2, predicted.max() * 2]
    left.plot(lims, lims, "k--", lw=1, label="measured = predicted")
    left.set(xlabel="predicted E‖Δh‖²", ylabel="measured E‖Δh‖²")
    left.legend(fontsize=8)
    right.axhline(0, color="k", lw=0.8)
    right.set(xlabel="predicted E‖Δh‖²", ylabel="measured ΔNLL (nats/token)")
    right.legend(fontsize=8)
    return fig


#: The schedules compared, in order; those marked False run at the largest budget only.
VARIANTS = {
    "uniform": True,
    "optimal": True,
    "K/V split": False,
    "uniform + channel keys": False,
    "optimal + channel keys": False,
}


def _spec(label: str, family: str, schedule: np.ndarray, key_scales: Tensor | None) -> MethodSpec:
    keys, values = schedule_quantizers(schedule, key_scales=key_scales)
    return MethodSpec(
        label,
        make_cache=lambda config: QuantizeDequantizeCache(keys, config, values),
        bits_per_dim=lambda kv: compressed_cache_rate(kv, schedule, key_scales=key_scales),
        family=family,
        identity=("E8 schedule", schedule.tobytes(), None if key_scales is None else key_scales.numpy().tobytes()),
    )


def _schedule(
    name: str, budget: float, kv: KVSample, weights: np.ndarray, split: np.ndarray, grid: float, scales: Tensor
) -> tuple[np.ndarray, Tensor | None]:
    """The (layers, 2) schedule of one variant at one measured budget, and its key scales (or None)."""
    if name == "uniform":
        return uniform_schedule(budget, kv), None
    if name == "optimal":
        return fit_schedule(weights, budget, kv, grid=grid)[0], None
    if name == "K/V split":
        return fit_schedule(split, budget, kv, grid=grid)[0], None
    if name == "uniform + channel keys":
        return uniform_schedule(budget, kv, key_scales=scales), scales
    return fit_schedule(weights, budget, kv, grid=grid, key_scales=scales)[0], scales


def allocation_specs(
    kv: KVSample, weights: np.ndarray, budgets: Sequence[float], grid: float, scales: Tensor, extra: bool = True
) -> tuple[list[MethodSpec], dict]:
    """Harness specs of every schedule at every budget (:data:`VARIANTS`; ``extra=False`` keeps uniform and
    optimal only), and {(variant, budget): schedule}. Each schedule's *measured* rate on ``kv`` meets its
    budget without exceeding it."""
    split = np.broadcast_to(weights.mean(axis=0), weights.shape)
    top = max(budgets)
    specs, schedules = [], {}
    for b in budgets:
        for name, everywhere in VARIANTS.items():
            if everywhere or (extra and b == top):
                schedule, key_scales = _schedule(name, b, kv, weights, split, grid, scales)
                schedules[name, b] = schedule
                specs.append(_spec(f"{name} {b:g}", name, schedule, key_scales))
    return specs, schedules


ALLOCATION_COLUMNS = {
    "method": "schedule",
    "bits_per_dim": ("bits/dim (measured)", 3),
    "ppl": ("PPL", 3),
    "delta": "Δ% [95% interval]",
    "ratio": "Δ / uniform Δ [95% interval]",
}


def allocation_rows(rows: Sequence[dict]) -> tuple[list[dict], dict[float, RatioEstimate]]:
    """Harness rows (full precision first, labels "<variant> <budget>") with each ΔPPL's interval and its
    ratio to the uniform schedule's at the same budget (paired), and {budget: ratio of optimal / uniform}."""
    fp = rows[0]
    table, optimal = [], {}
    for r in rows[1:]:
        name, budget = r["method"].rsplit(" ", 1)
        delta = paired_delta_pct(r["window_nll"], fp["window_nll"], fp["window_tokens"])
        ratio = None if name == "uniform" else method_ratio(list(rows), r["method"], f"uniform {budget}")
        if name == "optimal":
            optimal[float(budget)] = ratio
        table.append(
            {
                "method": r["method"],
                "family": r["family"],
                "budget": float(budget),
                "bits_per_dim": r["bits_per_dim"],
                "ppl": r["ppl"],
                "delta_pct": r["delta_pct"],
                "delta": delta.format(2, "%"),
                "ratio": ratio.format(2) if ratio else "1 (the reference)",
            }
        )
    return table, optimal


def plot_allocation(table: Sequence[dict]):
    """Held-out ΔPPL against measured rate, one line per schedule family."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.8))
    for family in VARIANTS:
        points = sorted((r["bits_per_dim"], max(r["delta_pct"], 1e-3)) for r in table if r["family"] == family)
        if points:
            ax.plot(*zip(*points), "o-" if "optimal" in family else "s--", label=family)
    ax.set(xlabel="measured total bits/dim", ylabel="PPL increase (%)", yscale="log")
    ax.legend(fontsize=8)
    return fig


def plot_schedule(schedule: np.ndarray, uniform_rate: float, budget: float):
    """The codec rate of each layer's keys and values in a schedule, against the uniform rate."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 2.8))
    layers = np.arange(len(schedule))
    ax.step(layers, schedule[:, 0], where="mid", label="keys")
    ax.step(layers, schedule[:, 1], where="mid", label="values")
    ax.axhline(uniform_rate, color="k", lw=0.8, ls="--", label="uniform")
    ax.set(xlabel="layer", ylabel="codec rate b (bits/dim)", title=f"{budget:g} measured bits/dim")
    ax.legend(fontsize=8)
    return fig


def allocation_sentence(
    budget: float, uniform: Estimate, optimal: Estimate, ratio: Estimate, predicted_ratio: float
) -> str:
    """The allocation result at one budget, decided by the ratio's interval (every branch tested)."""
    head = (
        f"At {budget:g} measured bits per dimension the uniform schedule raises the held-out perplexity by "
        f"{uniform.format(2, '%')}, the water-filled one by {optimal.format(2, '%')}: a ratio of {ratio.format(2)}"
    )
    if not math.isfinite(ratio.high):
        verdict = ", undefined because the uniform schedule's own increase is not distinguishable from zero"
    elif ratio.high <= 1.0:
        verdict = ", so allocation helps: the whole interval lies below 1"
    elif ratio.low > 1.0:
        verdict = ", so allocation hurts here: the whole interval lies above 1"
    else:
        verdict = "; its interval contains 1, so these windows cannot tell the two schedules apart"
    return f"{head}{verdict}. The model predicted a distortion ratio of {predicted_ratio:.2f} for this schedule."


def paper4_protocol(model: str, corpus: str, calibration: int, evaluation: int, window: int) -> list[dict]:
    """How this build's Paper IV protocol differs from the paper's."""
    return [
        {"setting": "model", "paper": "Llama-3.1-8B and Qwen2.5-7B", "ours": model},
        {"setting": "corpus", "paper": "WikiText-2", "ours": corpus},
        {"setting": "calibration", "paper": "not stated", "ours": f"{calibration} × {window} tokens"},
        {"setting": "held-out evaluation", "paper": "not stated", "ours": f"{evaluation} × {window} tokens"},
        {"setting": "rate", "paper": "nominal bits", "ours": "measured bits/dim of the real cache"},
    ]


def water_filling_plans(weights: np.ndarray, budgets: Sequence[float], grid: float, b_min: float, b_max: float) -> dict:
    """:func:`~lqlib.alloc.allocation.allocate` at each budget: {budget: Allocation}."""
    return {float(b): allocate(weights, b, grid=grid, b_min=b_min, b_max=b_max) for b in budgets}


def water_filling_renderer(weights: np.ndarray, plans: dict, b_max: float):
    """A function budget label → PNG of the water-filling picture, every picture on the same axes (so the
    picture does not jump when the slider moves)."""
    from .figures import png_bytes

    layers = np.arange(len(weights))
    curves = [predicted_distortion(np.full(weights.shape, b), weights).sum(axis=1) for b in plans]
    curves += [predicted_distortion(p.bits.reshape(weights.shape), weights).sum(axis=1) for p in plans.values()]
    low, high = min(c.min() for c in curves) / 1.5, max(c.max() for c in curves) * 1.5

    def render(label: str) -> bytes:
        import matplotlib.pyplot as plt

        b = float(label)
        plan = plans[b]
        bits = plan.bits.reshape(weights.shape)
        fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 4.6), sharex=True)
        top.bar(layers - 0.2, bits[:, 0], 0.4, label="keys")
        top.bar(layers + 0.2, bits[:, 1], 0.4, label="values")
        top.axhline(b, color="k", lw=0.8, ls="--", label="budget")
        top.set(ylabel="bits/dim", ylim=(0, b_max), title=f"budget {b:g} bits/dim")
        top.legend(fontsize=8, ncol=3)
        bottom.semilogy(
            layers, predicted_distortion(np.full(weights.shape, b), weights).sum(axis=1), "k--", label="uniform"
        )
        bottom.semilogy(layers, predicted_distortion(bits, weights).sum(axis=1), "o-", label="allocated")
        bottom.set(xlabel="layer", ylabel="predicted distortion", ylim=(low, high))
        bottom.legend(fontsize=8, title=f"uniform / allocated = {plan.predicted_ratio:.2f}", title_fontsize=8)
        return png_bytes(fig)

    return render


WATER_FILLING_COLUMNS = {
    "budget": ("budget", 2),
    "mean_bits": ("mean rate", 3),
    "k_bits": ("K mean", 3),
    "v_bits": ("V mean", 3),
    "predicted_ratio": ("D uniform / D allocated", 3),
    "am_gm": ("AM/GM", 3),
}


def water_filling_rows(plans: dict, shape: tuple[int, ...]) -> list[dict]:
    """One row per budget: the achieved mean rate, the K and V means, the predicted gain and AM/GM."""
    return [
        {
            "budget": b,
            "mean_bits": p.mean_bits,
            "predicted_ratio": p.predicted_ratio,
            "am_gm": p.am_gm,
            "k_bits": p.bits.reshape(shape)[:, 0].mean(),
            "v_bits": p.bits.reshape(shape)[:, 1].mean(),
        }
        for b, p in plans.items()
    ]
