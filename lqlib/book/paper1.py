"""Paper I's chapter: rows built from our measurements with the paper's values beside them, the column
specifications shared by the chapter and the command line, the inputs of the verdicts, and the sentences
the chapter builds from numbers (grammatical for every value).

Pictures are in :mod:`lqlib.book.paper1_pictures`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from ..core.theory import FIXED_LENGTH_WASTE_BITS
from ..errors import InputError
from ..evaluation.rate_distortion import Ladder
from ..evaluation.stats import Estimate
from .paper_values import TABLE3_CODED_RATE, TABLE3_GAP, TABLE5_PPL
from .verdicts import Claim, Verdict, judge, not_run_here

__all__ = [
    "TABLE3_COLUMNS",
    "table3_rows",
    "bits_text",
    "count_text",
    "interval_text",
    "BARRIER_COLUMNS",
    "barrier_rows",
    "barrier_estimates",
    "ladder_sentence",
    "source_note",
    "envelope",
    "judge_claims",
    "TABLE5_PAPER_COLUMNS",
    "table5_paper_rows",
    "table5_verdicts",
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


def table5_verdicts(claims: Sequence[Claim], model: str, estimates: dict[str, Estimate] | None = None) -> list[Verdict]:
    """Table 5's verdicts: each claim is about one of the paper's models, judged when this build runs that
    model (on ``estimates`` of its 4-bit PPL increase in %) and "not run here" otherwise."""
    return judge_claims(claims, estimates or {}, model)
