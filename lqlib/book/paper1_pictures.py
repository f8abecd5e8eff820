"""Paper I's pictures: the gap ladder, the scalar barrier over the rate, lattices in the plane, one E8 search.

Every function takes measured results (from :mod:`lqlib.evaluation.rate_distortion` and
:mod:`lqlib.core.lattices`) and returns a matplotlib figure, PNG bytes or an HTML fragment; nothing here
computes a number that the chapter reports.
"""

from __future__ import annotations

import html
import io
import math

import numpy as np

from ..evaluation.rate_distortion import Ladder
from .figures import plt

__all__ = [
    "compact_png",
    "RUNG_COLOURS",
    "ladder_svg",
    "barrier_figure",
    "lattice_cloud_figure",
    "e8_trace_html",
    "table3_rate_figure",
    "rht_figure",
    "real_kv_figure",
    "perplexity_figure",
]

#: One colour per rung (lattices in blues, entropy-coded scalar in orange, fixed rate in red).
RUNG_COLOURS = {
    "E8 + EC": "#1f4e79",
    "D4 + EC": "#2f75b5",
    "A2 + EC": "#6fa8dc",
    "scalar + EC": "#e69138",
    "Lloyd–Max": "#c0392b",
}
_LIMIT_STYLE = {"color": "black", "marker": "|", "markersize": 16, "markeredgewidth": 2.0, "linestyle": "none"}


def compact_png(fig, dpi: int = 80, colours: int = 64) -> bytes:
    """The figure as a palette PNG (``colours`` colours, a few times smaller than RGBA); closes it."""
    from PIL import Image

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    plt.close(fig)
    image = Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")
    out = io.BytesIO()
    image.quantize(colours, method=Image.Quantize.MEDIANCUT).save(out, format="png", optimize=True)
    return out.getvalue()


def _factor_label(lower: str, upper: str) -> str:
    short = {"bound": "bound", "scalar + EC": "scalar+EC", "Lloyd–Max": "Lloyd–Max"}
    name = f"{short.get(upper, upper.split()[0])} / {short.get(lower, lower.split()[0])}"
    if (lower, upper) == ("bound", "scalar + EC"):
        return f"cell shape = {name}"
    if (lower, upper) == ("bound", "Lloyd–Max"):
        return f"total = {name}"
    if (lower, upper) == ("scalar + EC", "Lloyd–Max"):
        return f"fixed rate = {name}"
    return name


def _text(x: float, y: float, text: str, size: int = 11, anchor: str = "start", **style: str) -> str:
    extra = "".join(f' {k.replace("_", "-")}="{v}"' for k, v in style.items())
    return f'<text x="{x:.1f}" y="{y:.1f}" font-size="{size}" text-anchor="{anchor}"{extra}>{html.escape(text)}</text>'


def _svg_panel(x0: float, width: float, top: float, rows: list[tuple], xmax: float) -> list[str]:
    """A log-scale bar panel: rows of (label, estimate, limit, colour), bars from 1, 95% intervals, limits
    as black ticks, values printed; the axis below the rows."""
    lo, row_h = 0.7, 24.0

    def x(v: float) -> float:
        return x0 + width * math.log(max(v, lo) / lo) / math.log(xmax / lo)

    bottom = top + row_h * len(rows)
    out = []
    placed: list[float] = []
    for t in (1.0, 2.0, 0.8, 1.5, 3.0, 4.0, 1.25, 2.5, 5.0):  # the most telling first; none closer than 18 px
        if t < xmax and all(abs(x(t) - x(u)) >= 18 for u in placed):
            placed.append(t)
            out.append(f'<line x1="{x(t):.1f}" y1="{top - 4:.1f}" x2="{x(t):.1f}" y2="{bottom:.1f}" stroke="#e3e3e3"/>')
            out.append(_text(x(t), bottom + 13, f"{t:g}", 10, "middle", fill="#444"))
    for i, (label, estimate, limit, colour) in enumerate(rows):
        y = top + row_h * i + row_h / 2
        v = estimate.value
        out.append(_text(x0 - 8, y + 4, label, 11, "end"))
        left, right = sorted((x(1.0), x(v)))
        out.append(f'<rect x="{left:.1f}" y="{y - 8:.1f}" width="{right - left:.1f}" height="16" fill="{colour}"/>')
        a, b = x(estimate.low), x(estimate.high)
        out.append(
            f'<path d="M{a:.1f},{y:.1f}H{b:.1f}M{a:.1f},{y - 3:.1f}V{y + 3:.1f}M{b:.1f},{y - 3:.1f}'
            f'V{y + 3:.1f}" stroke="black" stroke-width="1" fill="none"/>'
        )
        end = max(b, x(v))
        if math.isfinite(limit):
            out.append(
                f'<line x1="{x(limit):.1f}" y1="{y - 11:.1f}" x2="{x(limit):.1f}" y2="{y + 11:.1f}" '
                'stroke="black" stroke-width="2.5"/>'
            )
            end = max(end, x(limit) + 1)
        out.append(_text(end + 4, y + 4, f"{v:.3f}", 11))
    out.append(f'<line x1="{x(1.0):.1f}" y1="{top - 6:.1f}" x2="{x(1.0):.1f}" y2="{bottom:.1f}" stroke="black"/>')
    return out


def ladder_svg(ladder: Ladder, label: str) -> str:
    """The ladder at one rate as an SVG picture: each rung's gap D/D*(R) (left) and the factors between
    rungs (right), with 95% Monte Carlo intervals and the high-rate limits as black ticks."""
    rungs = list(ladder.rungs)[::-1]  # Lloyd–Max on top
    factors = list(ladder.factors)
    ordered = factors[:5][::-1] + factors[5:]
    top_value = max([r.gap.high for r in rungs] + [f.value.high for f in factors] + [r.limit for r in rungs])
    xmax = max(3.3, 1.25 * top_value)
    width, row_h, top = 760, 24, 66
    parts = _svg_panel(84, 160, top, [(r.rung, r.gap, r.limit, RUNG_COLOURS[r.rung]) for r in rungs], xmax)
    colours = [RUNG_COLOURS[f.upper] for f in factors[:5]][::-1] + ["#9a9a9a", "#555555"]
    rows = [(_factor_label(f.lower, f.upper), f.value, f.limit, c) for f, c in zip(ordered, colours)]
    parts += _svg_panel(524, 176, top, rows, xmax)
    sep = top + row_h * 5
    parts.append(
        f'<line x1="300" y1="{sep:.1f}" x2="{width - 4}" y2="{sep:.1f}" stroke="#888" stroke-dasharray="3,3"/>'
    )
    fixed = ladder.rung("Lloyd–Max")
    cell, total, penalty = ladder.factor("bound", "scalar + EC"), ladder.factor("bound", "Lloyd–Max"), factors[4]
    rate = "bit/dim" if ladder.bits == 1 else "bits/dim"
    parts.append(_text(6, 18, f"{label}, b = {ladder.bits:g} {rate}", 14, font_weight="bold"))
    parts.append(_text(6, 36, f"Lloyd–Max: {fixed.levels} levels, {fixed.rate:.3f} bits/dim", 11, fill="#444"))
    parts.append(_text(164, top - 10, "gap D / D*(R), log scale", 11, "middle"))
    parts.append(
        _text(
            width - 6,
            18,
            f"total {total.value.value:.2f} = cell shape {cell.value.value:.2f} × fixed rate {penalty.value.value:.2f}",
            13,
            "end",
            font_weight="bold",
        )
    )
    parts.append(
        _text(
            width - 6,
            36,
            f"high-rate limits: {total.limit:.2f} = {cell.limit:.2f} × {penalty.limit:.2f}",
            11,
            "end",
            fill="#444",
        )
    )
    parts.append(_text(612, top - 10, "ratio of two rungs' gaps, log scale", 11, "middle"))
    height = top + row_h * 7 + 40
    limits = "high-rate limits" + (" of a Gaussian, for reference" if ladder.limits == "gaussian reference" else "")
    parts.append(
        _text(6, height - 6, f"bars: measured, 95% Monte Carlo intervals; black ticks: {limits}", 10, fill="#444")
    )
    body = "".join(parts)
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" font-family="DejaVu Sans, Helvetica, Arial, sans-serif">'
        f'<rect width="100%" height="100%" fill="white"/>{body}</svg>'
    )


def barrier_figure(ladders: list[Ladder]):
    """The scalar barrier of one source over the rate: the gaps of Lloyd–Max, scalar + EC and E8 + EC
    (left), and the three factors of the decomposition (right), with their high-rate limits dashed."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(9.0, 3.4))
    bits = [lad.bits for lad in ladders]
    for rung in ("Lloyd–Max", "scalar + EC", "E8 + EC"):
        gaps = [lad.rung(rung).gap for lad in ladders]
        _curve(left, bits, gaps, RUNG_COLOURS[rung], rung)
        left.axhline(ladders[0].rung(rung).limit, color=RUNG_COLOURS[rung], ls="--", lw=0.8)
    left.set(xlabel="rate b (bits/dim)", ylabel="D / D*(R)", title="gaps (dashed: high-rate limits)")
    left.legend(fontsize=8)
    for (lower, upper), name in (
        (("bound", "Lloyd–Max"), "total"),
        (("scalar + EC", "Lloyd–Max"), "fixed-rate penalty"),
        (("bound", "scalar + EC"), "cell shape"),
    ):
        values = [lad.factor(lower, upper).value for lad in ladders]
        colour = {"total": "#555555", "fixed-rate penalty": "#c0392b", "cell shape": "#e69138"}[name]
        _curve(right, bits, values, colour, name)
        limit = ladders[0].factor(lower, upper).limit
        right.axhline(limit, color=colour, ls="--", lw=0.8)
        right.text(bits[0], limit * 1.02, f"{limit:.3f}", color=colour, fontsize=7)
    right.axhline(1.0, color="black", lw=0.6)
    right.set(xlabel="rate b (bits/dim)", ylabel="factor", title="total = cell shape × fixed-rate penalty")
    right.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    return fig


def _curve(ax, bits, estimates, colour, label) -> None:
    values = np.array([e.value for e in estimates])
    low, high = np.array([e.low for e in estimates]), np.array([e.high for e in estimates])
    ax.errorbar(
        bits, values, yerr=[values - low, high - values], fmt="o-", ms=3, lw=1.2, color=colour, capsize=2, label=label
    )


def _cells(ax, lattice: str, scale: float, extent: float, colour: str) -> None:
    """Outline the Voronoi cells of Z² or A2 (scaled by ``scale``) inside [-extent, extent]²."""
    from matplotlib.patches import Polygon

    if lattice == "Z":
        corners = 0.5 * np.array([[1, 1], [-1, 1], [-1, -1], [1, -1]], dtype=float)
        centres = [(i, j) for i in range(-12, 13) for j in range(-12, 13)]
    else:
        r = 1.0 / math.sqrt(3.0)  # circumradius of A2's hexagon for minimal vectors of length 1
        corners = np.array(
            [
                [r * math.cos(math.pi / 6 + k * math.pi / 3), r * math.sin(math.pi / 6 + k * math.pi / 3)]
                for k in range(6)
            ]
        )
        centres = [(i + 0.5 * j, j * math.sqrt(3.0) / 2) for i in range(-16, 17) for j in range(-14, 15)]
    for cx, cy in centres:
        if abs(cx * scale) < extent + scale and abs(cy * scale) < extent + scale:
            ax.add_patch(Polygon((corners + (cx, cy)) * scale, closed=True, fill=False, ec=colour, lw=0.6))


def lattice_cloud_figure(panels: list[dict], extent: float = 2.6):
    """Z² and A2 side by side: Voronoi cells at the same cell area, a Gaussian cloud and each point's move
    to its lattice point. ``panels``: one dict per lattice with ``lattice`` ("Z" or "A2"), ``scale`` (the
    step, lattice units → plane), ``points`` (m, 2), ``quantized`` (m, 2) and ``title``."""
    fig, axes = plt.subplots(1, len(panels), figsize=(4.1 * len(panels), 4.0))
    for ax, panel in zip(np.atleast_1d(axes), panels):
        _cells(ax, panel["lattice"], panel["scale"], extent, "#9aa7b8")
        x, q = panel["points"], panel["quantized"]
        ax.plot(np.stack([x[:, 0], q[:, 0]]), np.stack([x[:, 1], q[:, 1]]), color="#c0392b", lw=0.6, alpha=0.7)
        ax.plot(x[:, 0], x[:, 1], ".", color="#c0392b", ms=2.5)
        ax.plot(*np.unique(q, axis=0).T, "o", color="#1f4e79", ms=3.5)
        ax.set(xlim=(-extent, extent), ylim=(-extent, extent), aspect="equal", xticks=[], yticks=[])
        ax.set_title(panel["title"], fontsize=9)
        ax.grid(False)
    fig.tight_layout()
    return fig


def _cell(value, style: str = "") -> str:
    text = value if isinstance(value, str) else (f"{value:+.3f}" if isinstance(value, float) else str(value))
    return f'<td style="padding:1px 6px;text-align:right;{style}">{html.escape(text)}</td>'


def e8_trace_html(trace, caption: str) -> str:
    """One E8 nearest-point search as an HTML table: the block, each coset's rounding, its errors, the
    parity fix (highlighted), the coset's point and distance, and the chosen point."""
    fix = "background:#f6d7a7;font-weight:bold"
    rows = [("x / a", trace.x, None, "")]
    for name, coset in (("D8", trace.even), ("D8 + ½", trace.odd)):
        rows += [
            (f"{name}: rounded", coset.rounded, coset.fixed, ""),
            (f"{name}: error", coset.error, coset.fixed, "color:#666"),
            (f"{name}: point", coset.point, coset.fixed, ""),
        ]
    rows.append(("E8 point", trace.point, None, "font-weight:bold;background:#dbe7f3"))
    head = "".join(f'<th style="padding:1px 6px">x{i}</th>' for i in range(8))
    body = []
    for label, values, fixed, style in rows:
        cells = "".join(
            _cell(float(v), fix if (fixed == i and "error" not in label) else style) for i, v in enumerate(values)
        )
        body.append(f'<tr><th style="text-align:left;padding:1px 6px">{html.escape(label)}</th>{cells}</tr>')
    return (
        f'<table style="font-size:12px;border-collapse:collapse;font-family:monospace">'
        f"<tr><th></th>{head}</tr>{''.join(body)}</table>"
        f'<p style="font-size:13px;max-width:46em">{html.escape(caption)}</p>'
    )


def table3_rate_figure(rows: list[dict]):
    """Coded rate over the target rate, ours with 95% intervals and the paper's (Table 3 rows)."""
    fig, ax = plt.subplots(figsize=(6.2, 3.2))
    targets = np.array([r["target_bits"] for r in rows])
    ours = np.array([[r["coded_bits"], r["coded_bits_low"], r["coded_bits_high"]] for r in rows]) / targets[:, None]
    ax.errorbar(targets, ours[:, 0], yerr=[ours[:, 0] - ours[:, 1], ours[:, 2] - ours[:, 0]], fmt="o-", label="ours")
    ax.plot(targets, [r["paper_coded_bits"] / r["target_bits"] for r in rows], "x--", label="paper")
    ax.set(xlabel="target b (bits/dim)", ylabel="coded rate / b", title="Coded rate relative to the target")
    ax.legend()
    return fig


def rht_figure(curves: dict, sources: list[str]):
    """Rate–distortion curves (MSE/σ² against measured bits/dim) with and without the RHT, one panel per
    source; ``curves`` maps (source, "none" | "rht") to ChunkedPoints over the bit widths."""
    fig, axes = plt.subplots(1, len(sources), figsize=(2.6 * len(sources), 3.0))
    for ax, name in zip(np.atleast_1d(axes), sources):
        for rot, style in (("none", "o--"), ("rht", "s-")):
            pts = curves[(name, rot)]
            sigma2 = [p.power.sum() / p.count.sum() for p in pts]
            ax.semilogy([p.rate() for p in pts], [p.mse() / s for p, s in zip(pts, sigma2)], style, ms=4, label=rot)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("measured bits/dim")
    np.atleast_1d(axes)[0].set_ylabel("MSE / σ²")
    np.atleast_1d(axes)[0].legend()
    fig.tight_layout()
    return fig


def real_kv_figure(rows: list[dict], paper_range: tuple[float, float]):
    """Table 4 rows: the gap at the target with 95% intervals (the paper's range shaded) and the cosine
    dissimilarity, keys and values."""
    fig, axes = plt.subplots(1, 2, figsize=(8.5, 3.2))
    for kind, marker in (("K", "o-"), ("V", "s-")):
        sel = [r for r in rows if r["kind"] == kind]
        bits, gap = [r["bits"] for r in sel], np.array([r["gap_at_target"] for r in sel])
        err = [gap - [r["gap_low"] for r in sel], [r["gap_high"] for r in sel] - gap]
        axes[0].errorbar(bits, gap, yerr=err, fmt=marker, label=kind, capsize=2)
        axes[1].plot(bits, [1 - r["cosine"] for r in sel], marker, label=kind)
    axes[0].axhspan(*paper_range, color="gray", alpha=0.2, label="paper (Llama-3.2-1B)")
    axes[0].set(xlabel="target b", ylabel="D / D*(b)", title="gap on real KV")
    axes[1].set(xlabel="target b", ylabel="1 − cosine similarity", yscale="log", title="direction error")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    return fig


def perplexity_figure(rows: list[dict], label: str, paper: dict[str, dict[str, float]], models: list[str]):
    """PPL increase (%) against bits: ours with 95% intervals (Table 5 rows) and the paper's ``models``."""
    fig, ax = plt.subplots(figsize=(6, 3.4))
    ours = [r for r in rows if r["bits"] == r["bits"]]
    delta = np.array([r["delta_pct"] for r in ours])
    err = [delta - [r["delta_low"] for r in ours], [r["delta_high"] for r in ours] - delta]
    ax.errorbar([r["bits"] for r in ours], delta, yerr=err, fmt="o-", capsize=2, label=f"{label} (ours)")
    for name in models:
        points = sorted((float(b), 100 * (p / paper[name]["fp16"] - 1)) for b, p in paper[name].items() if b != "fp16")
        ax.plot(*zip(*points), "x--", label=f"{name} (paper)")
    ax.set(
        xlabel="target b (bits/dim)",
        ylabel="PPL increase (%)",
        yscale="symlog",
        title="Perplexity cost of the KV codec",
    )
    ax.legend(fontsize=8)
    return fig
