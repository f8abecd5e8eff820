"""Paper I's chapter: rows built from our measurements with the paper's values beside them, the column
specifications shared by the chapter and the command line, the inputs of the verdicts, and the sentences
the chapter builds from numbers (grammatical for every value).

Pictures are in :mod:`lqlib.book.paper1_pictures`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from ..core.lattices import LATTICES, E8Trace, normalized_second_moment
from ..core.rht import RandomizedHadamard
from ..core.theory import FIXED_LENGTH_WASTE_BITS, SPHERE_BOUND_G
from ..errors import InputError
from ..evaluation.rate_distortion import Ladder, gap_ladders
from ..evaluation.stats import Estimate
from .paper_values import TABLE1_G, TABLE3_CODED_RATE, TABLE3_GAP, TABLE5_PPL, TABLE5_PPL_LLAMA31_8B
from .verdicts import Claim, Verdict, judge, not_run_here

__all__ = [
    "student_t",
    "TABLE3_COLUMNS",
    "table3_rows",
    "TABLE3_BOOK_COLUMNS",
    "PARITY_COLUMNS",
    "table3_estimates",
    "parity_rows",
    "RHT_COLUMNS",
    "rht_rows",
    "rht_estimates",
    "TABLE4_COLUMNS",
    "table4_rows",
    "table4_estimates",
    "bits_text",
    "count_text",
    "interval_text",
    "BARRIER_COLUMNS",
    "barrier_rows",
    "barrier_estimates",
    "ladder_sentence",
    "source_note",
    "kv_sources",
    "MOMENT_COLUMNS",
    "moment_rows",
    "plane_sentence",
    "plane_title",
    "e8_trace_sentence",
    "moment_estimate",
    "source_ladders",
    "ladder_caption",
    "envelope",
    "judge_claims",
    "TABLE5_PAPER_COLUMNS",
    "table5_paper_rows",
    "TABLE5_COLUMNS",
    "table5_rows",
    "table5_estimates",
    "MEMORY_SHAPES",
    "memory_rows",
]

#: Paper I, Table 3: row key → header (and digits) for :func:`lqlib.book.tables.write_table`.
TABLE3_COLUMNS = {
    "target_bits": ("target b", 1),
    "coded_bits": "coded bits/dim (ours)",
    "paper_coded_bits": ("coded bits/dim (paper)", 3),
    "rate_vs_paper": "ours / paper − 1",
    "gap": "gap D/D* (ours)",
    "exact_gap": "2πe·G(E8)",
    "gap_vs_exact": "ours / exact − 1",
    "paper_gap": ("gap (paper)", 3),
    "lossless": "decode = quantize",
}


def table3_rows(measured: list[dict]) -> list[dict]:
    """:func:`lqlib.evaluation.rate_distortion.gaussian_validation`'s rows with the paper's coded rate
    and gap beside ours (``paper_coded_bits``, ``rate_vs_paper``, ``paper_gap``; NaN where the paper
    has no value for a rate), and our intervals as text (``coded_bits_ci``, ``gap_ci``) where measured."""
    rows = []
    for row in measured:
        paper_rate = TABLE3_CODED_RATE.get(float(row["target_bits"]), float("nan"))
        extra = {}
        if "coded_bits_low" in row:
            extra["coded_bits_ci"] = interval_text(row["coded_bits"], row["coded_bits_low"], row["coded_bits_high"], 4)
            extra["gap_ci"] = interval_text(row["gap"], row["gap_low"], row["gap_high"], 4)
        rows.append(
            {
                **row,
                "paper_coded_bits": paper_rate,
                "rate_vs_paper": row["coded_bits"] / paper_rate - 1.0,
                "paper_gap": TABLE3_GAP,
                **extra,
            }
        )
    return rows


#: Table 3 as the chapter shows it: ours with 95% intervals, the paper's beside.
TABLE3_BOOK_COLUMNS = {
    "target_bits": ("target b", 1),
    "coded_bits_ci": "coded bits/dim (ours)",
    "paper_coded_bits": ("coded bits/dim (paper)", 3),
    "gap_ci": "gap D/D*(b) (ours)",
    "exact_gap": "2πe·G(E8)",
    "paper_gap": ("gap (paper)", 3),
    "lossless": "decode = quantize",
}

#: The parity saving table: model code lengths with and without the parity trick, and the saving.
PARITY_COLUMNS = {
    "target_bits": ("b", 1),
    "coded_bits": "coded bits/dim (actual bytes)",
    "model_bits_parity_aware": "model bits/dim, parity-aware",
    "model_bits_naive": "model bits/dim, full z7",
    "saving_ci": "saving (bits/dim)",
}


def table3_estimates(rows: Sequence[dict], saving: Sequence[dict], saving_bits: float = 4.0) -> dict[str, Estimate]:
    """The estimates Table 3's claims are judged on: the coded rate at each b (``I.table3.rate.<b>``), the
    gap at every rate (``I.table3.gap``, the :func:`envelope` of the rows' gaps) and the parity saving at
    ``saving_bits`` (``I.parity_saving``); rows as :func:`table3_rows` returns them, ``saving`` as
    :func:`~lqlib.evaluation.rate_distortion.parity_saving` does."""
    out = {
        f"I.table3.rate.{row['target_bits']:g}": Estimate(
            row["coded_bits"], row["coded_bits_low"], row["coded_bits_high"], n=row["n_blocks"]
        )
        for row in rows
    }
    out["I.table3.gap"] = envelope([Estimate(r["gap"], r["gap_low"], r["gap_high"], n=r["n_blocks"]) for r in rows])
    for row in saving:
        if row["target_bits"] == saving_bits:
            out["I.parity_saving"] = Estimate(row["saving"], row["saving_low"], row["saving_high"], n=row["n_blocks"])
    return out


def parity_rows(saving: Sequence[dict]) -> list[dict]:
    """:func:`~lqlib.evaluation.rate_distortion.parity_saving`'s rows with the saving's interval as text."""
    return [
        {**row, "saving_ci": interval_text(row["saving"], row["saving_low"], row["saving_high"], 4)} for row in saving
    ]


#: Table 2 redone: rates at b = 4, MSE at an equal measured rate, and their ratio with its interval.
RHT_COLUMNS = {
    "source": "source",
    "rate_none": ("rate at b = 4, no RHT", 3),
    "rate_rht": ("rate at b = 4, RHT", 3),
    "mse_equal_rate_none": ("MSE/σ² at equal rate, no RHT", 5),
    "mse_equal_rate_rht": ("MSE/σ² at equal rate, RHT", 5),
    "ratio_ci": "no RHT / RHT (95%)",
}


def _mse_at(points, rate: float) -> float:
    rates = np.array([float(p.rate()) for p in points])
    logs = np.log([float(p.mse()) for p in points])
    order = np.argsort(rates)
    if not rates.min() <= rate <= rates.max():
        return math.nan
    return float(np.exp(np.interp(rate, rates[order], logs[order])))


def rht_rows(curves: dict, compare_rate: float, seed: int = 0) -> list[dict]:
    """One row per source of ``curves`` ({(source, "none" | "rht"): [ChunkedPoint per b]}): the measured rates
    at b = 4, the MSE over σ² of each at ``compare_rate`` (interpolated in log MSE) and the ratio no RHT / RHT
    with a bootstrap interval over the chunks (``ratio_low``, ``ratio_high``, as text ``ratio_ci``)."""
    from ..evaluation.rate_distortion import equal_rate_ratio

    rows = []
    for source in dict.fromkeys(name for name, _ in curves):
        none, rht = curves[(source, "none")], curves[(source, "rht")]
        sigma2 = float(none[0].power.sum() / none[0].count.sum())
        at4 = {
            rot: next((p for p in pts if p.target_bits == 4.0), pts[0]) for rot, pts in (("none", none), ("rht", rht))
        }
        ratio = equal_rate_ratio(none, rht, compare_rate, seed=seed)
        rows.append(
            {
                "source": source,
                "rate_none": float(at4["none"].rate()),
                "rate_rht": float(at4["rht"].rate()),
                "mse_equal_rate_none": _mse_at(none, compare_rate) / sigma2,
                "mse_equal_rate_rht": _mse_at(rht, compare_rate) / sigma2,
                "ratio_equal_rate": ratio.value,
                "ratio_low": ratio.low,
                "ratio_high": ratio.high,
                "ratio_ci": ratio.format(3),
                "chunks": ratio.n,
            }
        )
    return rows


def rht_estimates(rows: Sequence[dict]) -> dict[str, Estimate]:
    """Table 2's claims: the ratio no RHT / RHT at equal rate on the real keys and on the real values."""
    by = {
        row["source"]: Estimate(row["ratio_equal_rate"], row["ratio_low"], row["ratio_high"], n=row["chunks"])
        for row in rows
    }
    return {"I.table2.rht_real_kv.K": by["real keys"], "I.table2.rht_real_kv.V": by["real values"]}


#: Table 4 on our model: rate from the bytes, gaps at the target and at the measured rate, cosine similarity,
#: and the paper's range (Llama-3.2-1B) beside.
TABLE4_COLUMNS = {
    "bits": ("target b", 1),
    "kind": "K/V",
    "rate": ("coded bits/dim", 3),
    "gap_ci": "gap D/D*(b) (ours, 95%)",
    "gap_at_rate": ("gap D/D*(R)", 3),
    "cosine": ("cosine similarity", 5),
    "paper_gap_range": "gap (paper, Llama-3.2-1B)",
}


def table4_rows(keys, values, bits_list: Sequence[float], chunks: int, seed: int = 0) -> list[dict]:
    """Paper I, Table 4 on captured keys and values (..., tokens, head_dim): per b and path, the codec's
    rate from its bytes, the gap at the target b with a bootstrap interval over ``chunks`` token chunks, the
    gap at the measured rate, the mean cosine similarity, and the paper's range as text."""
    from ..coding.codec import E8Codec
    from ..evaluation.rate_distortion import codec_point, gap_at_target
    from .paper_values import TABLE4_GAP_RANGE

    lo, hi = TABLE4_GAP_RANGE
    rows = []
    for bits in bits_list:
        codec = E8Codec(bits)
        for kind, x in (("K", keys), ("V", values)):
            point = codec_point(codec, x)
            gap = gap_at_target(x, codec.quantize(x), bits, chunks, seed=seed)
            rows.append(
                {
                    "bits": bits,
                    "kind": kind,
                    **point,
                    "gap_low": gap.low,
                    "gap_high": gap.high,
                    "gap_ci": gap.format(4),
                    "chunks": chunks,
                    "paper_gap_range": f"{lo}–{hi}",
                }
            )
    return rows


def table4_estimates(rows: Sequence[dict]) -> dict[str, Estimate]:
    """Table 4's claim (the gap stays in the paper's range at every rate, K and V): the :func:`envelope` of
    every row's gap at the target."""
    estimates = [Estimate(r["gap_at_target"], r["gap_low"], r["gap_high"], n=r["chunks"]) for r in rows]
    return {"I.table4.gap_real_kv": envelope(estimates)}


# ----------------------------------------------------------------------------- words from numbers


def bits_text(bits: float) -> str:
    """``"1 bit/dim"``, ``"1.5 bits/dim"``, ``"8 bits/dim"``."""
    return f"{bits:g} bit/dim" if bits == 1 else f"{bits:g} bits/dim"


def count_text(n: int, noun: str, plural: str | None = None) -> str:
    """``"1 window"``, ``"16 windows"`` (thousands separated)."""
    return f"{n:,} {noun if n == 1 else (plural or noun + 's')}"


def interval_text(value: float, low: float, high: float, digits: int = 3) -> str:
    """``"1.224 [1.221, 1.227]"`` (a dash for a number that is not finite)."""
    return Estimate(value, low, high).format(digits)


# ----------------------------------------------------------------------------- the scalar barrier and the ladder

#: The scalar-barrier table: b, the three gaps with intervals, and the fixed-rate penalty.
BARRIER_COLUMNS = {
    "bits": ("b", 0),
    "fixed_rate_ci": "Lloyd–Max gap",
    "entropy_coded_ci": "scalar + EC gap (cell shape)",
    "penalty_ci": "fixed-rate penalty",
    "e8_ci": "E8 + EC gap",
    "levels": ("Lloyd–Max levels", 0),
}


def barrier_rows(ladders: Sequence[Ladder]) -> list[dict]:
    """One row per ladder (usually the Gaussian's at integer b): the gaps of Lloyd–Max, scalar + EC and
    E8 + EC and the fixed-rate penalty, each with its 95% interval (``*_low``/``*_high`` and as text)."""
    rows = []
    for ladder in ladders:
        fixed, coded, e8 = (ladder.rung(n) for n in ("Lloyd–Max", "scalar + EC", "E8 + EC"))
        penalty = ladder.factor("scalar + EC", "Lloyd–Max").value
        row = {"bits": ladder.bits, "levels": fixed.levels, "entropy_coded_rate": coded.rate}
        for key, column, estimate in (
            ("fixed_rate", "fixed_rate_gap", fixed.gap),
            ("entropy_coded", "entropy_coded_gap", coded.gap),
            ("penalty", "fixed_rate_penalty", penalty),
            ("e8", "e8_gap", e8.gap),
        ):
            row.update({column: estimate.value, f"{key}_low": estimate.low, f"{key}_high": estimate.high})
            row[f"{key}_ci"] = estimate.format(3)
        rows.append(row)
    return rows


def barrier_estimates(ladder: Ladder) -> dict[str, Estimate]:
    """The estimates the scalar-barrier claims are judged on, keyed by claim id (one ladder, e.g. b = 8)."""
    return {
        "I.barrier.fixed_rate": ladder.rung("Lloyd–Max").gap,
        "I.barrier.cell_shape": ladder.rung("scalar + EC").gap,
        "I.barrier.fixed_rate_penalty": ladder.factor("scalar + EC", "Lloyd–Max").value,
    }


def _near(estimate: Estimate, limit: float, tolerance: float) -> bool:
    return math.isfinite(limit) and abs(estimate.value / limit - 1.0) <= tolerance


def source_note(ladder: Ladder) -> str:
    """What the limit ticks of a ladder mean for its source (empty for a Gaussian)."""
    if ladder.limits == "gaussian":
        return ""
    if ladder.limits == "laplace":
        return (
            "The ticks are this Laplace source's own limits: the Gaussian bound σ²·4^(−R) lies above its "
            "rate–distortion function, so its gaps sit below the Gaussian's and the fixed-rate penalty "
            "tends to a larger value."
        )
    return (
        "The ticks are a Gaussian's limits, for reference only: for real keys or values σ²·4^(−R) is the bound "
        "of a Gaussian with the same second moment, not theirs, so a gap below 1 does not beat Shannon; only "
        "the factors between lattices tend to the same limits for every smooth source."
    )


def ladder_sentence(ladder: Ladder, tolerance: float = 0.03) -> str:
    """Why the factors of ``ladder`` are (or are not yet) at their high-rate limits, from its numbers.

    Three regimes: fixed rate beats entropy coding (the fixed-rate factor's interval below 1, as at
    b = 1 on a Gaussian; or not distinguishable from 1), the factors still short of their limits (more
    than ``tolerance`` away), or every headline factor within ``tolerance`` of its limit.
    """
    fixed, coded = ladder.rung("Lloyd–Max"), ladder.rung("scalar + EC")
    penalty = ladder.factor("scalar + EC", "Lloyd–Max")
    cell, total = ladder.factor("bound", "scalar + EC"), ladder.factor("bound", "Lloyd–Max")
    e8 = ladder.factor("bound", "E8 + EC")
    at = f"At b = {bits_text(ladder.bits)}"
    waste = max(fixed.rate - fixed.index_entropy, 0.0)
    levels = count_text(fixed.levels, "level")
    note = source_note(ladder)
    tail = f" {note}" if note else ""
    if penalty.value.low <= 1.0:
        verdict = (
            "fixed rate beats entropy coding" if penalty.value.high < 1.0 else "fixed rate and entropy coding are level"
        )
        likely = "are equally likely" if waste < 5e-4 else "are nearly equally likely"
        return (
            f"{at} {verdict} (factor {penalty.value.value:.3f}): the Lloyd–Max quantizer's {levels} {likely}, so "
            f"its fixed-length code spends only {waste:.3f} bits/dim more than an entropy code of the same cells, "
            f"while the uniform quantizer with entropy coding puts {coded.cell_mass:.0%} of the samples into its "
            f"zero cell and reconstructs every cell at its grid point, not at its centroid.{tail}"
        )
    headline = [("fixed-rate penalty", penalty), ("cell shape", cell), ("total", total), ("E8", e8)]
    far = [(name, f) for name, f in headline if not _near(f.value, f.limit, tolerance)]
    if not far:
        return (
            f"{at} every factor is within {tolerance:.0%} of its high-rate limit: the total "
            f"{total.value.value:.3f} ({total.limit:.3f}) is the cell-shape factor {cell.value.value:.3f} "
            f"({cell.limit:.3f}) times the fixed-rate penalty {penalty.value.value:.3f} ({penalty.limit:.3f}), "
            f"and E8's gap is {e8.value.value:.3f} ({e8.limit:.3f}).{tail}"
        )
    listed = ", ".join(f"{name} {f.value.value:.3f} of {f.limit:.3f}" for name, f in far)
    limit = FIXED_LENGTH_WASTE_BITS.get(ladder.limits)
    at_high = f" (at high rate {limit:.3f} bits/dim, a factor {4.0**limit:.2f})" if limit is not None else ""
    text = (
        f"{at} the factors have not reached their limits yet ({listed}). A fixed-length code of {levels} spends "
        f"{waste:.3f} bits/dim more than the entropy of the Lloyd–Max index, a factor {4.0**waste:.2f} in "
        f"distortion{at_high}: this waste, and with it the fixed-rate penalty, grows as the levels multiply."
    )
    if any(name in ("cell shape", "E8") for name, _ in far):
        text += (
            f" The uniform quantizer still puts {coded.cell_mass:.0%} of the samples into its zero cell: the "
            "high-rate picture, a nearly flat density across every cell, does not hold yet."
        )
    return text + tail


def kv_sources(keys, values, layers: Sequence[int], seed: int = 0) -> dict[str, np.ndarray]:
    """Real sources for the ladder: each chosen layer's keys and values (float tensors (layers, heads,
    tokens, head_dim)) after the codec's randomized Hadamard transform, flattened, labelled
    ``"keys, layer 15"``; blocks of 8 consecutive values lie inside one vector."""
    rht = RandomizedHadamard(keys.shape[-1], seed)
    out = {}
    for layer in layers:
        if not 0 <= layer < keys.shape[0]:
            raise InputError(f"layer {layer} is outside the model's {keys.shape[0]} layers")
        for name, x in (("keys", keys), ("values", values)):
            out[f"{name}, layer {layer}"] = rht.forward(x[layer].float()).double().numpy().reshape(-1)
    return out


def source_ladders(samples: dict[str, np.ndarray], bits: Sequence[float]) -> dict[str, list[Ladder]]:
    """The gap ladders of every source at every rate: ``"Gaussian"`` and ``"Laplace"`` (unit variance) with
    their own limits and Lloyd–Max designed on their densities, any other label as a sample (Lloyd–Max
    cross-fitted, the Gaussian's limits as reference)."""
    kinds = {"Gaussian": "gaussian", "Laplace": "laplace"}
    return {
        label: gap_ladders(x, tuple(bits), kinds.get(label, "sample"), design=kinds.get(label, "crossfit"))
        for label, x in samples.items()
    }


def ladder_caption(ladder: Ladder) -> str:
    """The sentence under a ladder picture, as HTML."""
    import html

    return f'<p style="max-width:52em;font-size:14px;line-height:1.45">{html.escape(ladder_sentence(ladder))}</p>'


# ----------------------------------------------------------------------------- lattices (Table 1)

#: Table 1 as the chapter shows it: exact G, our Monte Carlo estimate with its standard error, the paper's.
MOMENT_COLUMNS = {
    "lattice": "Λ",
    "dim": ("n", 0),
    "G_exact": ("G exact", 6),
    "source": "exact value",
    "G_measured": ("G measured (ours)", 6),
    "standard_error": ("s.e.", 6),
    "z": ("z", 2),
    "gap_2pieG": ("2πe·G", 4),
    "paper_G": ("G (paper)", 4),
}


def moment_rows(n_samples: int, seed: int = 0) -> list[dict]:
    """One row per lattice of :data:`~lqlib.core.lattices.LATTICES` (and the sphere bound): exact G, the
    Monte Carlo estimate (uniform points modulo the lattice) with its standard error and z-score where we
    have a quantizer, 2πe·G, and the paper's printed G where it gives one."""
    rows = []
    for name, lat in LATTICES.items():
        measured, se = normalized_second_moment(name, n_samples, seed) if lat.nearest else (math.nan, math.nan)
        rows.append(
            {
                "lattice": name,
                "dim": lat.dim,
                "G_exact": lat.G,
                "source": lat.source,
                "G_measured": measured,
                "standard_error": se,
                "z": (measured - lat.G) / se if lat.nearest else math.nan,
                "gap_2pieG": 2 * math.pi * math.e * lat.G,
                "paper_G": TABLE1_G.get(name, math.nan),
            }
        )
    rows.append(
        {
            "lattice": "sphere bound",
            "dim": math.inf,
            "G_exact": SPHERE_BOUND_G,
            "source": "1/(2πe)",
            "G_measured": math.nan,
            "standard_error": math.nan,
            "z": math.nan,
            "gap_2pieG": 1.0,
            "paper_G": math.nan,
        }
    )
    return rows


def moment_estimate(row: dict) -> Estimate:
    """A Table 1 row's Monte Carlo G as an estimate with its 95% normal interval."""
    half = 1.959963984540054 * row["standard_error"]
    return Estimate(row["G_measured"], row["G_measured"] - half, row["G_measured"] + half)


def plane_title(name: str, row: dict, point) -> str:
    """Two-line title of one lattice's panel: the closed form and our Monte Carlo G, then what this
    cloud measured (``point`` a :class:`~lqlib.evaluation.rate_distortion.PlanePoint`)."""
    return (
        f"{name}: G = {row['source']} = {row['G_exact']:.5f}, measured {row['G_measured']:.5f} ± "
        f"{row['standard_error']:.5f}\non this cloud: D/area {point.normalized:.4f}, entropy {point.entropy:.2f} "
        f"bits/dim"
    )


def plane_sentence(square, hexagon, bits: float) -> str:
    """What the two lattices did to the same cloud at one cell size (two PlanePoints, Z² first)."""
    import html

    less = 1.0 - hexagon.normalized / square.normalized
    exact = 1.0 - LATTICES["A2"].G / LATTICES["Z"].G
    compare = f"{abs(less):.1%} {'less' if less >= 0 else 'more'}"
    text = (
        f"Cells of area {square.area:.3f}σ² (a Gaussian codes at about {bits_text(bits)}): on this cloud the "
        f"hexagons' distortion per unit area is {hexagon.normalized:.4f} against the squares' "
        f"{square.normalized:.4f}, {compare} (the closed forms differ by {exact:.1%}). With ideal entropy coding "
        f"the gaps are {hexagon.gap:.3f} (A2, {hexagon.entropy:.2f} bits/dim) and {square.gap:.3f} (Z², "
        f"{square.entropy:.2f} bits/dim)."
    )
    if bits < 1.5:
        text += " With so few cells across the cloud, the cells at its edge are far from uniformly filled."
    return f'<p style="max-width:52em;font-size:14px;line-height:1.45">{html.escape(text)}</p>'


def _fix_clause(coset, half: bool) -> str:
    total = int(round(float(np.sum(coset.rounded - (0.5 if half else 0.0)))))
    parity = "odd" if coset.parity else "even"
    start = f"the integer parts sum to {total} ({parity})"
    if coset.fixed is None:
        return f"{start}, so no fix is needed"
    i = coset.fixed
    return (
        f"{start}, so x{i}, the coordinate with the largest rounding error ({coset.error[i]:+.3f}), is re-rounded "
        f"the other way, to {coset.point[i]:g}"
    )


def e8_trace_sentence(trace: E8Trace) -> str:
    """The steps of one E8 search in words: both cosets' parity fixes and the choice between them."""
    even, odd = trace.even, trace.odd
    chosen = "integer (D8)" if trace.coset == 0 else "half-integer (D8 + ½)"
    tie = " (a tie goes to the integer point)" if even.distance2 == odd.distance2 else ""
    return (
        f"Rounding to integers, {_fix_clause(even, False)}. Rounding to half-integers, {_fix_clause(odd, True)}. "
        f"The D8 point lies at squared distance {even.distance2:.3f} from x/a and the D8 + ½ point at "
        f"{odd.distance2:.3f}: E8's nearest point is the {chosen} one{tie}, coset bit {trace.coset}."
    )


# ----------------------------------------------------------------------------- verdict inputs


def envelope(estimates: Sequence[Estimate]) -> Estimate:
    """One estimate for a claim about every one of several values ("the gap stays in a range at every
    rate"): the value farthest from the middle of the values and the union of the intervals, so that the
    claim is reproduced only when every interval satisfies it."""
    if not estimates:
        raise InputError("an envelope needs at least one estimate")
    values = np.array([e.value for e in estimates])
    middle = float(np.median(values))
    worst = float(values[np.argmax(np.abs(values - middle))])
    return Estimate(
        worst,
        min(e.low for e in estimates),
        max(e.high for e in estimates),
        estimates[0].level,
        sum(e.n for e in estimates),
    )


def judge_claims(claims: Sequence[Claim], estimates: dict[str, Estimate], model: str = "") -> list[Verdict]:
    """Verdicts of ``claims`` in order: judged on ``estimates[claim.id]``; a claim about another model is
    "not run here" (with its command); a claim without an estimate is refused (nothing is skipped silently)."""
    from .claims import command_for, runs_here

    verdicts = []
    for claim in claims:
        if not runs_here(claim, model):
            verdicts.append(not_run_here(claim, command_for(claim)))
        elif claim.id in estimates:
            verdicts.append(judge(claim, estimates[claim.id]))
        else:
            raise InputError(f"no estimate for claim {claim.id}")
    return verdicts


# ----------------------------------------------------------------------------- Table 5

#: The paper's Table 5 as the chapter shows it (every model), with the increases computed from it.
TABLE5_PAPER_COLUMNS = {
    "model": "model (paper, WikiText-2)",
    "fp16": ("fp16", 2),
    "5": ("5 b", 2),
    "4": ("4 b", 2),
    "3.5": ("3.5 b", 2),
    "3": ("3 b", 2),
    "delta_4_pct": ("Δ% at 4 b", 1),
}


def table5_paper_rows() -> list[dict]:
    """The paper's Table 5 for every model it ran (NaN where it reports no value), with Δ% at 4 bits."""
    rows = []
    for model, values in TABLE5_PPL.items():
        row = {"model": model, **{k: values.get(k, float("nan")) for k in ("fp16", "5", "4", "3.5", "3")}}
        row["delta_4_pct"] = 100.0 * (values["4"] / values["fp16"] - 1.0) if "4" in values else float("nan")
        rows.append(row)
    return rows


#: Table 5 on this build's model: our perplexities and increases (95% intervals over the windows), with the
#: paper's Llama-3.1-8B column beside.
TABLE5_COLUMNS = {
    "kv": "KV cache",
    "bits_per_dim": ("bits/dim (measured)", 3),
    "ppl": ("PPL (ours)", 3),
    "delta_ci": "Δ% (ours, 95%)",
    "paper_ppl": ("PPL Llama-3.1-8B (paper)", 2),
    "paper_delta_pct": ("Δ% (paper)", 1),
}


def table5_rows(runs: dict, rates: dict[float, float], draws: int = 4000, seed: int = 0) -> list[dict]:
    """Rows of Table 5 on our model: ``runs`` maps ``"fp"`` and each b to a
    :class:`~lqlib.evaluation.perplexity.PerplexityResult` on the same windows, ``rates`` each b to its
    measured bits/dim. Increases come with paired bootstrap intervals over the windows."""
    from ..evaluation.stats import paired_delta_pct

    fp = runs["fp"]
    paper_fp = TABLE5_PPL_LLAMA31_8B["fp16"]
    rows = [
        {
            "kv": "full precision",
            "bits": math.nan,
            "bits_per_dim": 16.0,
            "ppl": fp.ppl,
            "delta_pct": 0.0,
            "delta_low": 0.0,
            "delta_high": 0.0,
            "delta_ci": "—",
            "paper_ppl": paper_fp,
            "paper_delta_pct": 0.0,
        }
    ]
    for bits, run in ((b, r) for b, r in runs.items() if b != "fp"):
        delta = paired_delta_pct(run.window_nll, fp.window_nll, fp.window_tokens, draws=draws, seed=seed)
        paper = TABLE5_PPL_LLAMA31_8B.get(f"{bits:g}", math.nan)
        rows.append(
            {
                "kv": f"E8 + EC, b = {bits:g}",
                "bits": bits,
                "bits_per_dim": rates[bits],
                "ppl": run.ppl,
                "delta_pct": delta.value,
                "delta_low": delta.low,
                "delta_high": delta.high,
                "delta_ci": delta.format(2, "%"),
                "paper_ppl": paper,
                "paper_delta_pct": 100.0 * (paper / paper_fp - 1.0),
                "windows": delta.n,
            }
        )
    return rows


def table5_estimates(rows: Sequence[dict]) -> dict[str, Estimate]:
    """The 4-bit PPL increase (%) with its interval, for every model's Table 5 claim: each claim is judged
    only when the build runs that claim's model (otherwise it is "not run here")."""
    four = next((r for r in rows if r["bits"] == 4.0), None)
    if four is None:
        return {}
    estimate = Estimate(four["delta_pct"], four["delta_low"], four["delta_high"], n=four["windows"])
    return {f"I.table5.{model}": estimate for model in TABLE5_PPL}


#: Llama-3.1-8B's KV shape (layers, KV heads, head dim), the paper's Table 6 model.
MEMORY_SHAPES = {"Llama-3.1-8B": (32, 8, 128)}


def memory_rows(
    shapes: dict[str, tuple[int, int, int]], rates: dict[float, float], tokens: Sequence[int]
) -> list[dict]:
    """Table 6: KV bytes 2·L·H·d·T·b/8 in GiB for each model shape and context length, fp16 and E8 at each
    measured rate (``rates``: b → bits/dim)."""
    from ..core.theory import kv_cache_bytes

    rows = []
    for name, (layers, heads, dim) in shapes.items():
        for t in tokens:
            row = {"model": name, "tokens": t, "fp16_GiB": kv_cache_bytes(layers, heads, dim, t, 16) / 2**30}
            for bits, rate in rates.items():
                row[f"e8_{bits:g}_GiB"] = kv_cache_bytes(layers, heads, dim, t, rate) / 2**30
            rows.append(row)
    return rows


def student_t(n: int, d: int, dof: int, generator: torch.Generator) -> torch.Tensor:
    """(n, d) i.i.d. Student-t samples with ``dof`` degrees of freedom, drawn from ``generator`` only
    (Z / sqrt(χ²/dof) with χ² a sum of ``dof`` squared normals), so a seeded page draws the same ones."""
    if dof < 1:
        raise InputError(f"dof must be a positive integer, got {dof}")
    z = torch.randn(n, d, generator=generator)
    chi2 = torch.randn(n, d, dof, generator=generator).square().sum(-1)
    return z / (chi2 / dof).sqrt()
