"""The recorded quality sweep (``benchmarks/quality_sweep.py``) for the book's "Beyond the papers" section.

The sweep runs the full held-out protocol (every method and every ablation, each on the same held-out
windows) once, on a machine of many cores, so the book shows its recorded table
(``results/quality_sweep_<date>.json``), labelled with its date and machine, beside what the notebook
recomputes on fewer windows (:func:`lqlib.alloc.beyond.headline_rows`).
"""

from __future__ import annotations

import json
from pathlib import Path

from ..alloc.beyond import FULL, TARGETS
from .prose import windows_text

__all__ = [
    "load_sweep",
    "sweep_rows",
    "curve_series",
    "verdict_text",
    "CURVE_FAMILIES",
    "ABLATION_COLUMNS",
    "SPLIT_COLUMNS",
    "curve_figure",
    "windows_text",
]

#: Columns of the ablation tables (rows of :func:`lqlib.alloc.beyond.ablation_rows`).
ABLATION_COLUMNS = {
    "method": "configuration",
    "budget": ("budget", 2),
    "bits_calibration": ("bits (calibration)", 3),
    "bits_heldout": ("bits (held-out)", 3),
    "delta_pct": ("ΔPPL %", 2),
    "low": ("95% low", 2),
    "high": ("95% high", 2),
    "gap_pp": ("− full (pp)", 2),
    "gap_low": ("low", 2),
    "gap_high": ("high", 2),
}
#: Columns of the table of where the error sits (part of the cache coded).
SPLIT_COLUMNS = {
    "method": "coded",
    "budget": ("budget", 2),
    "delta_pct": ("ΔPPL %", 2),
    "low": ("95% low", 2),
    "high": ("95% high", 2),
}

#: The curve's families in plotting order.
CURVE_FAMILIES = (
    FULL,
    "allocated E8 + RHT (Paper IV)",
    "uniform E8 + RHT",
    "TurboQuant-style",
    "KIVI-style",
    "HF QuantizedCache (quanto)",
)


def load_sweep(results_dir: str | Path) -> dict:
    """The newest recorded sweep under ``results_dir`` (``quality_sweep_<date>.json``).

    Raises
    ------
    FileNotFoundError
        when there is none.
    """
    paths = sorted(Path(results_dir).glob("quality_sweep_2*.json"))
    if not paths:
        raise FileNotFoundError(f"no recorded quality sweep (quality_sweep_<date>.json) under {results_dir}")
    return json.loads(paths[-1].read_text())


def sweep_rows(record: dict, part: str) -> list[dict]:
    """The table rows of one part (``"ablation"``, ``"split"`` or ``"curve"``) of a recorded sweep."""
    return [dict(row) for row in record["rows"] if row["part"] == part]


def curve_series(rows: list[dict], families=CURVE_FAMILIES) -> dict[str, list[tuple[float, float, float, float]]]:
    """Per family, its points (held-out measured bits/dim, ΔPPL %, low, high) in order of rate; rows whose
    method is not a family (or that have no measured rate) are left out."""
    series: dict[str, list[tuple[float, float, float, float]]] = {}
    for family in families:
        points = [
            (r["bits_heldout"], r["delta_pct"], r["low"], r["high"])
            for r in rows
            if r["method"] == family and r["bits_heldout"] == r["bits_heldout"]
        ]
        if points:
            series[family] = sorted(points)
    return series


def verdict_text(verdicts: list[dict]) -> str:
    """One sentence per target of :func:`lqlib.alloc.beyond.target_verdicts`, numbers from its rows."""
    parts = []
    for v, (bits, limit) in zip(verdicts, TARGETS):
        row = v["row"]
        if row is None:
            parts.append(f"no calibrated run measured at most {bits:g} bits/dim on held-out text")
            continue
        status = "met" if v["met"] else "missed"
        upper = "also" if v["met_upper"] else "not"
        parts.append(
            f"target ΔPPL ≤ +{limit:g}% at ≤ {bits:g} bits/dim {status}: {row['delta_pct']:+.2f}% "
            f"(95% interval {row['low']:+.2f}% to {row['high']:+.2f}%, whose upper end is {upper} within the "
            f"target) at {row['bits_heldout']:.3f} measured bits/dim"
        )
    return "; ".join(parts) + "."


def curve_figure(series: dict[str, list[tuple[float, float, float, float]]]):
    """ΔPPL (log scale, 95% intervals as error bars) against measured bits/dim, one line per family of
    :func:`curve_series`; the calibrated cache drawn solid with circles, E8 + RHT with squares."""
    import matplotlib.pyplot as plt
    import numpy as np

    styles = {FULL: "o-", "allocated E8 + RHT (Paper IV)": "s-", "uniform E8 + RHT": "s--"}
    fig, ax = plt.subplots(figsize=(7.5, 4.4))
    for family in CURVE_FAMILIES:
        if family in series:
            bits, delta, low, high = map(np.array, zip(*series[family]))
            yerr = [delta - low, high - delta]
            ax.errorbar(bits, delta, yerr=yerr, fmt=styles.get(family, "^:"), ms=4, capsize=2, label=family)
    ax.set(
        xlabel="measured total bits/dim (held-out windows)",
        ylabel="PPL increase (%)",
        yscale="log",
        title="Held-out perplexity cost against stored bits",
    )
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    return fig
