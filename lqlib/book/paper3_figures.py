"""Paper III's figures and widget pictures, built from the rows of :mod:`lqlib.book.paper3` and the results of
:mod:`lqlib.ddt`. Each function returns a matplotlib figure (or PNG bytes for a widget) and draws nothing
it does not get: the pages show them with :func:`lqlib.book.figures.show_figure`."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.lines import Line2D
from matplotlib.ticker import FixedLocator, FormatStrFormatter, NullFormatter

from . import paper_values as pv
from .figures import png_bytes

__all__ = [
    "permutation_figure",
    "risk_figure",
    "rho_figure",
    "scatter_figure",
    "taylor_figure",
    "theorem_b_figure",
    "first_order_figure",
    "range_figure",
    "direction_picture",
    "rotation_picture",
]

ORDER_COLORS = {"identity": "#4c72b0", "sorted": "#dd8452", "random": "#55a868"}
QUANTIZER_MARKERS = {"E8 (no RHT)": "o", "E8 (RHT)": "^", "scalar 8-block": "s"}


def _legend(skip=()) -> list[Line2D]:
    orders = [Line2D([], [], color=c, marker="o", ls="", label=o) for o, c in ORDER_COLORS.items() if o not in skip]
    marks = [Line2D([], [], color="0.3", marker=m, ls="", label=q) for q, m in QUANTIZER_MARKERS.items()]
    return orders + marks


def permutation_figure(rows: Sequence[Mapping]) -> plt.Figure:
    """ΔPPL (with its interval) against the relative MSE, one panel per bit width, colour by ordering and marker
    by quantizer (rows of :func:`~lqlib.book.paper3.permutation_rows`); points nudged sideways for legibility."""
    bit_widths = sorted({r["bits"] for r in rows})
    fig, axes = plt.subplots(1, len(bit_widths), figsize=(3.6 * len(bit_widths), 3.4), squeeze=False)
    for ax, b in zip(axes[0], bit_widths):
        panel = [r for r in rows if r["bits"] == b]
        mses = [r["rel_mse"] for r in panel]
        nudge = 0.012 * (max(mses) - min(mses) or max(mses))
        for r in panel:
            same = [s for s in panel if s["quantizer"][:2] == r["quantizer"][:2]]
            x = r["rel_mse"] + (same.index(r) - (len(same) - 1) / 2) * nudge
            err = [[r["delta_pct"] - r["ci_low"]], [r["ci_high"] - r["delta_pct"]]]
            color = ORDER_COLORS[r["ordering"].split()[0]]
            ax.errorbar(
                x, r["delta_pct"], yerr=err, fmt=QUANTIZER_MARKERS[r["quantizer"]], color=color, ms=5, capsize=2
            )
        ax.set(title=f"{b:g} bits", xlabel="relative MSE of the cache")
        ax.xaxis.set_major_locator(plt.MaxNLocator(4))
    axes[0, 0].set_ylabel("ΔPPL vs full precision (%)")
    axes[0, -1].legend(handles=_legend(), fontsize=7, loc="best")
    fig.tight_layout()
    return fig


def risk_figure(rows: Sequence[Mapping]) -> plt.Figure:
    """ΔPPL ratio to the identity ordering against the MSE ratio (left) and the risk ratio (right), log axes
    (rows of :func:`~lqlib.book.paper3.risk_rows` whose ΔPPL ratio is defined)."""
    shown = [r for r in rows if np.isfinite(r["dppl_ratio_value"]) and r["dppl_ratio_value"] > 0]
    fig, axes = plt.subplots(1, 2, figsize=(8, 3.5), sharex=True, sharey=True)
    values = [r[k] for r in shown for k in ("mse_ratio", "risk_ratio", "dppl_ratio_value")] or [1.0]
    lims = [min(values) / 1.15, max(values) * 1.15]
    for ax, key, label in ((axes[0], "mse_ratio", "MSE / identity's"), (axes[1], "risk_ratio", "tr(MΣ) / identity's")):
        for r in shown:
            low, high = max(r["dppl_ratio_low"], lims[0]), min(r["dppl_ratio_high"], lims[1])
            err = [[r["dppl_ratio_value"] - low], [high - r["dppl_ratio_value"]]]
            color = ORDER_COLORS[r["ordering"].split()[0]]
            ax.errorbar(r[key], r["dppl_ratio_value"], yerr=err, fmt=QUANTIZER_MARKERS[r["quantizer"]], color=color)
        ax.plot(lims, lims, "k--", lw=0.8)
        ax.set(xlabel=label, xscale="log", yscale="log", xlim=lims, ylim=lims)
        ticks = [t for t in (0.5, 0.8, 1, 1.25, 1.6, 2, 2.5, 3, 4) if lims[0] <= t <= lims[1]]
        for axis in (ax.xaxis, ax.yaxis):
            axis.set_major_locator(FixedLocator(ticks))
            axis.set_major_formatter(FormatStrFormatter("%g"))
            axis.set_minor_formatter(NullFormatter())
    axes[0].set_ylabel("ΔPPL / identity's")
    axes[1].legend(handles=_legend(skip=("identity",)), fontsize=7, loc="best")
    fig.tight_layout()
    return fig


def rho_figure(rows: Sequence[Mapping]) -> plt.Figure:
    """Spearman ρ per bit width and predictor with intervals (rows of :func:`~lqlib.book.paper3.rho_rows`),
    the paper's values as dashed lines."""
    predictors = list(dict.fromkeys(r["predictor"] for r in rows))
    bit_widths = sorted({r["bits"] for r in rows})
    fig, ax = plt.subplots(figsize=(6.2, 3.4))
    for k, name in enumerate(predictors):
        sel = [r for r in rows if r["predictor"] == name]
        x = np.array([r["bits"] for r in sel]) + (k - 1) * 0.08
        rho = np.array([r["rho"] for r in sel])
        err = [rho - [r["ci_low"] for r in sel], [r["ci_high"] for r in sel] - rho]
        ax.errorbar(x, rho, yerr=err, fmt="o", color=f"C{k}", capsize=3, label=f"ours: {name}")
        ax.axhline(sel[0]["paper"], color=f"C{k}", ls="--", lw=1, label=f"paper (Llama-3.1-8B): {name}")
    ax.axhline(0, color="k", lw=0.8)
    ax.set(xlabel="bits/dim", ylabel="Spearman ρ with ΔL", xticks=bit_widths, ylim=(-1.05, 1.05))
    ax.legend(fontsize=7, ncol=2, loc="lower left")
    return fig


def scatter_figure(data, rho: Mapping, predictors: Sequence[str] = ("Q1",)) -> plt.Figure:
    """ΔL against each of ``predictors``, one row per predictor and one panel per bit width, colour by family
    (``data``: a :class:`~lqlib.book.paper3.TheoremAData`; ``rho``: {(bits, predictor): Estimate})."""
    bit_widths = sorted(set(data.bits.tolist()))
    families = list(dict.fromkeys(data.families.tolist()))
    columns = {"Q1": (data.q1 / data.tokens, "Q1 (nats/token)"), "tr(MΣ)": (data.risk, "risk N·Σ tr(MΣ) (nats²)")}
    columns["tr(Σ)"] = (data.mse, "MSE per element")
    fig, axes = plt.subplots(len(predictors), len(bit_widths), figsize=(3.2 * len(bit_widths), 2.6 * len(predictors)))
    axes = np.asarray(axes).reshape(len(predictors), len(bit_widths))
    for i, name in enumerate(predictors):
        x, label = columns[name]
        for j, b in enumerate(bit_widths):
            ax, at = axes[i, j], data.bits == b
            for k, f in enumerate(families):
                sel = at & (data.families == f)
                ax.plot(x[sel], data.delta_loss[sel] / data.tokens, "o", ms=3.5, alpha=0.8, color=f"C{k}", label=f)
            ax.ticklabel_format(axis="x", style="sci", scilimits=(-2, 3))
            ax.set_title(f"{b:g} bits, ρ = {rho[(b, name)].value:.2f}", fontsize=9)
            ax.set(xlabel=label, ylabel="ΔL (nats/token)" if j == 0 else None)
    axes[0, 0].legend(fontsize=7)
    fig.tight_layout()
    return fig


def taylor_figure(data) -> plt.Figure:
    """Left: |Q1|/|ΔL| per configuration by bit width; right: |ΔL − Q1| against the MSE, and the even part of
    the mirrored configurations (``data``: a :class:`~lqlib.book.paper3.TheoremAData`)."""
    bit_widths = sorted(set(data.bits.tolist()))
    remainder = np.abs(data.delta_loss - data.q1)
    fig, (left, right) = plt.subplots(1, 2, figsize=(9.5, 3.4))
    for k, b in enumerate(bit_widths):
        at = data.bits == b
        jitter = np.random.default_rng(k).uniform(-0.15, 0.15, at.sum())
        left.plot(b + jitter, np.abs(data.q1[at]) / np.abs(data.delta_loss[at]), "o", ms=3, alpha=0.6, color=f"C{k}")
        right.loglog(
            data.mse[at], remainder[at] / data.tokens, "o", ms=3, alpha=0.6, color=f"C{k}", label=f"{b:g} bits"
        )
        m = at & data.mirror
        right.loglog(data.mse[m], np.abs(data.even[m]) / data.tokens, "x", ms=6, color=f"C{k}")
    left.axhline(1, color="k", lw=0.8, ls="--")
    left.set(xlabel="bits/dim", ylabel="|Q1| / |ΔL|", xticks=bit_widths, yscale="log")
    right.plot([], [], "kx", label="mirrored: |even part|")
    right.set(xlabel="MSE per element", ylabel="|ΔL − Q1| (nats/token)")
    right.legend(fontsize=7)
    fig.tight_layout()
    return fig


def theorem_b_figure(rows: Sequence[Mapping]) -> plt.Figure:
    """pos_add and pred per ordering, real passes against the fixed gradient (rows of
    :func:`~lqlib.book.paper3.theorem_b_rows`), with the paper's values (stars, band for random orderings)."""
    modes = list(dict.fromkeys(r["mode"] for r in rows))
    fig, axes = plt.subplots(1, 2, figsize=(8.5, 3.3), sharey=True)
    x = np.arange(len(modes))
    for ax, stat in zip(axes, ("pos_add", "pred")):
        for shift, version, marker in ((-0.12, "real passes", "o"), (0.12, "fixed gradient", "s")):
            sel = [next(r for r in rows if (r["mode"], r["version"]) == (m, version)) for m in modes]
            centre = np.array([r[stat] for r in sel])
            err = [centre - [r[f"{stat}_low"] for r in sel], [r[f"{stat}_high"] for r in sel] - centre]
            ax.errorbar(x + shift, centre, yerr=err, fmt=marker, capsize=3, label=version)
        paper = [(i, pv.PAPER3_THEOREM_B[m][stat]) for i, m in enumerate(modes) if m in pv.PAPER3_THEOREM_B]
        if paper:
            ax.plot(*zip(*paper), "k*", ms=9, label="paper (Llama)")
        random = [i for i, m in enumerate(modes) if m.startswith("random")]
        if random:
            band = pv.PAPER3_RANGES[f"theorem_b_{stat}_random"]
            ax.fill_between(
                [min(random) - 0.3, max(random) + 0.3], *band, color="0.8", alpha=0.6, label="paper, random"
            )
        ax.axhspan(0.9, 1.1, color="C2", alpha=0.08, label="band of the verdict")
        ax.axhline(1, color="k", lw=0.8)
        ax.set(xticks=x, title=stat)
        ax.set_xticklabels(modes)
    axes[0].set_ylabel("ratio")
    axes[0].legend(fontsize=7, loc="best")
    fig.tight_layout()
    return fig


def first_order_figure(delta: np.ndarray, first: np.ndarray) -> plt.Figure:
    """The real loss change against the fixed-gradient first-order sum, trial by trial, each centred on its
    window's mean (``delta``, ``first``: (trials, windows)), with the line ΔL = X and the least-squares slope."""
    dx = (first - first.mean(axis=0)).reshape(-1)
    dy = (delta - delta.mean(axis=0)).reshape(-1)
    fig, ax = plt.subplots(figsize=(4.4, 3.6))
    ax.plot(dx, dy, ".", alpha=0.7)
    line = np.linspace(dx.min(), dx.max(), 2)
    slope = float((dx * dy).sum() / (dx * dx).sum())
    ax.plot(line, line, "k--", lw=1, label="ΔL = X")
    ax.plot(line, slope * line, "C3-", lw=1, label=f"least squares, slope {slope:.2f}")
    ax.set(xlabel="X − window mean (nats)", ylabel="ΔL − window mean (nats)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def range_figure(study: Mapping, sources: Sequence[str], m_types: Sequence[str], n_rotations: int) -> plt.Figure:
    """Range/iso over all heads per M type and Σ source: sampled (left) and exact (right), log scale, with the
    paper's values as bands."""
    colors = ["#4c72b0", "#55a868", "#c44e52", "#8172b2"]
    fig, axes = plt.subplots(1, 2, figsize=(9.5, 3.6), sharey=True)
    width = 0.8 / len(sources)
    keys = {"actual": "theorem_c_actual", "rank-1": "theorem_c_rank1", "near-isotropic": "theorem_c_near_isotropic"}
    for ax, attr, title in (
        (axes[0], "range_iso", f"{n_rotations:,} random rotations"),
        (axes[1], "exact_range_iso", "exact"),
    ):
        for j, source in enumerate(sources):
            data = [np.log10(getattr(study[(m, source)], attr).ravel()) for m in m_types]
            pos = np.arange(len(m_types)) + (j - (len(sources) - 1) / 2) * width
            parts = ax.violinplot(data, positions=pos, widths=width * 0.95, showmedians=True)
            for body in parts["bodies"]:
                body.set_facecolor(colors[j])
                body.set_alpha(0.6)
            for key in ("cmedians", "cmins", "cmaxes", "cbars"):
                parts[key].set_color(colors[j])
            ax.plot([], [], color=colors[j], lw=6, alpha=0.6, label=source)
        ax.set_xticks(range(len(m_types)), m_types)
        ax.set_title(title, fontsize=10)
    for i, m_type in enumerate(m_types):
        lo, hi = np.log10(pv.PAPER3_RANGES[keys[m_type]])
        axes[0].fill_between([i - 0.45, i + 0.45], lo - 0.02, hi + 0.02, color="#dd8452", alpha=0.5, lw=0)
    axes[0].plot([], [], color="#dd8452", alpha=0.5, lw=6, label="paper (Llama-3.1-8B, one head)")
    ticks = np.array([0.003, 0.01, 0.03, 0.1, 0.3, 1, 3, 10, 30])
    axes[0].set_yticks(np.log10(ticks), [f"{t:g}" for t in ticks])
    axes[0].set_ylabel("range/iso (log scale)")
    axes[0].legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    return fig


def direction_picture(eigenvalues: np.ndarray, eigenvectors: np.ndarray, k: int, title: str) -> bytes:
    """The whole error of a head on M's k-th eigenvector (descending, 1-based): left, the risk against
    isotropic error of the same MSE, d·λ_i/tr M, for every i with the chosen one marked; right, the
    eigenvector in the cache's coordinates. PNG bytes for a widget."""
    d = eigenvalues.size
    rel = d * eigenvalues / eigenvalues.sum()
    fig, (left, right) = plt.subplots(1, 2, figsize=(7.5, 2.6), gridspec_kw={"width_ratios": [3, 2]})
    left.semilogy(np.arange(1, d + 1), rel, "-", color="#4c72b0", lw=1.2)
    left.axhline(1.0, color="k", ls="--", lw=0.8, label="isotropic")
    left.semilogy([k], [rel[k - 1]], "o", color="#c44e52", ms=8, label=f"error on v_{k}")
    left.set(xlabel="eigen-index k", ylabel="risk / iso", ylim=(rel.min() / 2, rel.max() * 2))
    left.set_title(f"risk / iso = {rel[k - 1]:.3g}", fontsize=9)
    left.legend(fontsize=7, loc="lower left")
    right.bar(np.arange(d), eigenvectors[:, k - 1], width=1.0, color="#c44e52")
    right.set(xlabel="coordinate", ylim=(-1, 1))
    right.set_title(f"v_{k} ({title})", fontsize=9)
    fig.tight_layout()
    return png_bytes(fig, dpi=72)


def rotation_picture(thetas: np.ndarray, curve: np.ndarray, bounds: tuple[float, float], theta: float, alpha: float,
                     ylim: tuple[float, float]) -> bytes:  # fmt: skip
    """Risk / iso of an error rotated by θ in a plane (``curve`` over ``thetas`` in degrees), the exact extremes
    over all rotations (``bounds``, relative to iso) and the point at ``theta``. PNG bytes for a widget."""
    fig, ax = plt.subplots(figsize=(6.2, 2.6))
    ax.plot(thetas, curve, color="#4c72b0", lw=1.5, label="rotated error")
    ax.axhline(1.0, color="k", ls="--", lw=0.8, label="isotropic (= mean over random U)")
    for j, bound in enumerate(bounds):
        ax.axhline(bound, color="#8c8c8c", ls=":", lw=1, label="exact min, max" if j else None)
    value = float(np.interp(theta, thetas, curve))
    ax.plot([theta], [value], "o", color="#c44e52", ms=8)
    ax.set_yscale("log")
    ax.set(xlabel="θ (degrees)", ylabel="risk / iso", xlim=(0, 180), ylim=ylim)
    ax.set_title(f"α = {alpha:g}, θ = {theta:g}°: risk / iso = {value:.3g}", fontsize=9)
    ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    return png_bytes(fig, dpi=72)
