"""Paper III's pages: table rows with their column specifications, the verdicts' inputs, the protocol tables,
the paper's values beside ours, and the sentences built from numbers.

Every function takes results of :mod:`lqlib.ddt` (or plain numbers) and returns rows (dicts), verdicts
(:class:`~lqlib.book.verdicts.Verdict`) or text; the notebooks only call them and display what they return.
Sentences are grammatical in every branch (``plural(1, "window")`` is "1 window").
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from ..core.theory import CELL_SHAPE_GAP, entropy_coded_gap
from ..errors import InputError
from ..evaluation.stats import Estimate, RatioEstimate, paired_delta_pct, paired_gap_pp, paired_ratio, pearson, spearman
from . import paper_values as pv
from .claims import CLAIMS, claims_of_page, command_for, runs_here
from .prose import plural, windows_text
from .verdicts import Band, Claim, Verdict, judge, not_run_here, unmeasured

__all__ = [
    "PAGE_PERMUTATION",
    "PAGE_THEOREM_A",
    "PAGE_THEOREM_B",
    "PAGE_THEOREM_C",
    "plural",
    "windows_text",
    "listing",
    "fmt",
    "ChapterWindows",
    "chapter_windows",
    "PAPER_VALUE_COLUMNS",
    "paper_value_rows",
    "protocol_permutation",
    "protocol_theorem_a",
    "protocol_theorem_b",
    "protocol_theorem_c",
    "PERMUTATION_COLUMNS",
    "permutation_rows",
    "SUMMARY_COLUMNS",
    "summary_rows",
    "MSE_COLUMNS",
    "pinned_mse_rows",
    "RISK_COLUMNS",
    "risk_rows",
    "risk_correlations",
    "permutation_verdicts",
    "risk_reading",
    "OUTCOME_WORDS",
    "permutation_finding",
    "TheoremAData",
    "theorem_a_data",
    "RHO_COLUMNS",
    "rho_rows",
    "TAYLOR_COLUMNS",
    "taylor_rows",
    "taylor_reading",
    "theorem_a_paper_values",
    "theorem_a_finding",
    "SHARE_COLUMNS",
    "share_rows",
    "config_range",
    "theorem_a_verdicts",
    "THEOREM_B_COLUMNS",
    "theorem_b_rows",
    "THEOREM_B_DETAIL_COLUMNS",
    "theorem_b_detail_rows",
    "theorem_b_verdicts",
    "decisive_factor",
    "theorem_b_finding",
    "THEOREM_C_COLUMNS",
    "theorem_c_rows",
    "END_TO_END_COLUMNS",
    "end_to_end_rows",
    "theorem_c_reading",
    "end_to_end_reading",
    "median_anisotropy_head",
    "near_isotropic_paper_values",
    "theorem_c_finding",
    "theorem_c_verdicts",
    "verdict_counts",
]

PAGE_PERMUTATION = "paper3/01_permutation_puzzle"
PAGE_THEOREM_A = "paper3/02_theorem_a"
PAGE_THEOREM_B = "paper3/03_theorem_b"
PAGE_THEOREM_C = "paper3/04_theorem_c"


# --------------------------------------------------------------------------------------------- words
def listing(items: Sequence[str]) -> str:
    """``"a"``, ``"a and b"``, ``"a, b and c"``; ``"none"`` for no items."""
    items = [str(i) for i in items]
    if not items:
        return "none"
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def fmt(estimate: Estimate, digits: int = 2, unit: str = "") -> str:
    """An estimate with its interval, ``"1.23 [1.01, 1.45]"``; a ratio whose denominator is not
    distinguishable from zero says so instead of printing a number."""
    if isinstance(estimate, RatioEstimate) and not estimate.defined:
        return "undefined (the denominator's interval reaches 0)"
    return estimate.format(digits, unit)


NAN_ = float("nan")


# --------------------------------------------------------------------------------------------- windows
@dataclass(frozen=True)
class ChapterWindows:
    """The windows a page uses: calibration windows from the start of the corpus (orderings, M, Σ) and
    evaluation windows from its end, disjoint (ids and labels as from ``token_windows``)."""

    calibration: object
    evaluation: object
    labels: object

    @property
    def window(self) -> int:
        return int(self.evaluation.shape[1])


def chapter_windows(ids, labels, calibration: int, evaluation: int) -> ChapterWindows:
    """The first ``calibration`` and the last ``evaluation`` windows of ``ids`` (n, T), which must not overlap."""
    n = int(ids.shape[0])
    if calibration < 1 or evaluation < 1 or calibration + evaluation > n:
        raise InputError(
            f"need 1 <= calibration, 1 <= evaluation and calibration + evaluation <= {n} windows, "
            f"got {calibration} and {evaluation}: use a shorter window or fewer windows"
        )
    return ChapterWindows(ids[:calibration], ids[n - evaluation :], labels[n - evaluation :])


# --------------------------------------------------------------------------------------------- paper values
#: Columns of the tables that set the paper's values not judged by a verdict beside ours.
PAPER_VALUE_COLUMNS = {"quantity": "quantity", "paper": "paper (as printed)", "ours": "ours (this build)"}


def paper_value_rows(entries: Sequence[tuple[str, str, str]]) -> list[dict[str, str]]:
    """Rows (quantity, paper, ours) for :data:`PAPER_VALUE_COLUMNS`."""
    return [{"quantity": q, "paper": p, "ours": o} for q, p, o in entries]


# --------------------------------------------------------------------------------------------- protocols
def _rows(*entries: tuple[str, str, str]) -> list[dict]:
    return [{"setting": setting, "paper": paper, "ours": ours} for setting, paper, ours in entries]


def _bits(bit_widths) -> str:
    return listing([f"{float(b):g}" for b in bit_widths])


def _model_rows(model: str, corpus: str, paper_model: str = "Llama-3.1-8B") -> list[dict]:
    return _rows(
        ("model", paper_model, model),
        ("corpus", "not stated (WikiText-2 for the papers' perplexities)", corpus),
    )


def protocol_permutation(
    model: str, corpus: str, window: int, calibration: int, evaluation: int, bit_widths, random_orderings: int
) -> list[dict]:
    """The permutation puzzle's protocol, the paper's against this build's."""
    return _model_rows(model, corpus, "not stated") + _rows(
        (
            "quantizer",
            "per-block proxy, step independent of the bit width",
            "per-block scalar (step set by the bit width), E8 without and with RHT",
        ),
        ("bit widths", "not stated", _bits(bit_widths)),
        ("orderings", "identity, sorted, random", f"identity, sorted, {plural(random_orderings, 'random ordering')}"),
        ("evaluation", "not stated", windows_text(evaluation, window) + ", no overlap"),
        ("orderings and M from", "not stated", windows_text(calibration, window)),
        ("intervals", "none", "95% paired bootstrap over windows"),
    )


def protocol_theorem_a(
    model: str, corpus: str, window: int, windows: int, bit_widths, configs_per_bits: int
) -> list[dict]:
    """Theorem A's protocol, the paper's against this build's."""
    return _model_rows(model, corpus) + _rows(
        (
            "quantizers",
            "a proxy whose step ignored the bit width",
            "E8 ± RHT, orderings, block scalar, per-layer mixes; step set by the bit width",
        ),
        ("configurations", "not stated per bit width", f"{configs_per_bits} per bit width ({_bits(bit_widths)} bits)"),
        ("windows", "not stated", windows_text(windows, window)),
        ("intervals", "none", "95% bootstrap over configurations"),
    )


def protocol_theorem_b(
    model: str, corpus: str, window: int, windows: int, trials: int, modes: Sequence[str], groups: int, bits: float
) -> list[dict]:
    """Theorem B's protocol, the paper's against this build's."""
    return _model_rows(model, corpus) + _rows(
        (
            "passes",
            "a fixed gradient (holds by construction)",
            "real dithered forward passes, and the fixed gradient of the same passes",
        ),
        ("bits", "not stated", f"{bits:g}"),
        ("orderings", "baseline, sorted, 3 random", listing(list(modes))),
        ("windows", "not stated", windows_text(windows, window)),
        ("trials", "500", f"{trials} per window and ordering ({trials * windows:,} window passes each)"),
        (
            "pos_add parts",
            "layers and positions (fixed gradient)",
            f"{plural(groups, 'group')} of layers switched on in turn (real passes)",
        ),
        ("intervals", "none", "95% bootstrap over windows"),
    )


def protocol_theorem_c(
    model: str,
    corpus: str,
    window: int,
    calibration: int,
    evaluation: int,
    heads: int,
    rotations: int,
    levels: Sequence[float],
) -> list[dict]:
    """Theorem C's protocol, the paper's against this build's."""
    return _model_rows(model, corpus) + _rows(
        ("heads", "one", f"all {heads} (layers × K, V × KV heads)"),
        ("Σ from", "not stated", f"real quantizer errors on {windows_text(calibration, window)}"),
        ("random rotations", "not stated", f"{rotations:,} Haar, and the exact range"),
        (
            "end to end",
            "none",
            f"{windows_text(evaluation, window)}, at the E8 codec's MSE at {_bits(levels)} bits",
        ),
    )


# --------------------------------------------------------------------------------------------- permutation puzzle
#: Columns of the permutation puzzle's configuration table.
PERMUTATION_COLUMNS = {
    "quantizer": "quantizer",
    "bits": ("bits", 0),
    "ordering": "ordering",
    "rel_mse": ("relative MSE", 5),
    "delta": "ΔPPL % [95% CI]",
}


def permutation_rows(runs) -> list[dict]:
    """One row per :class:`~lqlib.ddt.OrderingRun`: quantizer, bits, ordering (with seed), relative MSE and
    ΔPPL with its interval (``delta_pct``, ``ci_low``, ``ci_high`` kept for the CSV)."""
    return [
        {
            "quantizer": r.quantizer,
            "bits": float(r.bits),
            "ordering": r.name,
            "seed": "" if r.seed is None else r.seed,
            "rel_mse": r.run.rel_mse,
            "delta_pct": r.delta.value,
            "ci_low": r.delta.low,
            "ci_high": r.delta.high,
            "delta": fmt(r.delta, 2),
        }
        for r in runs
    ]


#: Short descriptions of :data:`lqlib.ddt.SPREAD_KINDS`.
SPREAD_WORDS = {
    "noise": "no difference beyond noise",
    "random spread": "within the random orderings' own spread",
    "equal MSE": "ΔPPL differs at nearly equal MSE",
    "follows MSE": "ΔPPL follows the MSE",
    "against MSE": "ΔPPL moves against the MSE",
}

#: Columns of the spread-over-orderings table.
SUMMARY_COLUMNS = {
    "quantizer": "quantizer",
    "bits": ("bits", 0),
    "mse_spread_pct": ("MSE spread %", 2),
    "pair": "worst / best ordering",
    "gap": "ΔPPL gap, pp [paired CI]",
    "ratio": "ΔPPL ratio [CI]",
    "finding": "finding",
}


def summary_rows(spreads) -> list[dict]:
    """One row per :class:`~lqlib.ddt.OrderingSpread`."""
    return [
        {
            "quantizer": s.quantizer,
            "bits": float(s.bits),
            "mse_spread_pct": s.mse_spread_pct,
            "pair": f"{s.worst} / {s.best}",
            "gap": fmt(s.gap, 2),
            "gap_pp": s.gap.value,
            "gap_low": s.gap.low,
            "gap_high": s.gap.high,
            "ratio": fmt(s.ratio, 2),
            "finding": SPREAD_WORDS[s.kind],
        }
        for s in spreads
    ]


#: Columns of the pinned-MSE table.
MSE_COLUMNS = {
    "quantizer": "quantizer",
    "bits": ("bits", 0),
    "measured": ("relative MSE (mean over orderings)", 5),
    "predicted": ("high-rate prediction", 5),
    "formula": "formula",
}


def pinned_mse_rows(runs) -> list[dict]:
    """The relative MSE of each quantizer and bit width, averaged over the orderings, beside the value every
    ordering shares at high rate: (πe/6)·4^−b for the per-block scalar quantizer, 2πe·G(E8)·4^−b for E8."""
    predicted = {
        "scalar 8-block": (CELL_SHAPE_GAP, "(πe/6)·4^−b"),
        "E8 (no RHT)": (entropy_coded_gap("E8"), "2πe·G(E8)·4^−b"),
    }
    rows = []
    for quantizer, (gap, formula) in predicted.items():
        for bits in sorted({r.bits for r in runs if r.quantizer == quantizer}):
            mse = [r.run.rel_mse for r in runs if (r.quantizer, r.bits) == (quantizer, bits)]
            rows.append(
                {
                    "quantizer": quantizer,
                    "bits": float(bits),
                    "measured": float(np.mean(mse)),
                    "predicted": gap * 4.0 ** -float(bits),
                    "formula": formula,
                }
            )
    return rows


#: Columns of the risk-against-ΔPPL comparison table.
RISK_COLUMNS = {
    "quantizer": "quantizer",
    "bits": ("bits", 0),
    "ordering": "ordering",
    "mse_ratio": ("MSE ratio", 3),
    "risk_ratio": ("tr(MΣ) ratio", 3),
    "dppl_ratio": "ΔPPL ratio [paired CI]",
}


def risk_rows(runs, risks: Sequence[float], baseline_window_nll, tokens, draws: int = 4000) -> list[dict]:
    """Every ordering against the identity ordering of the same quantizer and bit width: the ratios of
    relative MSE, of the directional risk ``risks`` (one per run, same order) and of ΔPPL (paired interval
    over windows, :func:`~lqlib.evaluation.stats.paired_ratio`; undefined when the identity's ΔPPL is not
    distinguishable from 0)."""
    rows = []
    for run, risk in zip(runs, risks):
        if run.ordering == "identity":
            continue
        ref = [
            i for i, r in enumerate(runs) if (r.quantizer, r.bits, r.ordering) == (run.quantizer, run.bits, "identity")
        ]
        if not ref:
            continue
        identity = runs[ref[0]]
        ratio = paired_ratio(run.run.window_nll, identity.run.window_nll, baseline_window_nll, tokens, draws=draws)
        rows.append(
            {
                "quantizer": run.quantizer,
                "bits": float(run.bits),
                "ordering": run.name,
                "mse_ratio": run.run.rel_mse / identity.run.rel_mse,
                "risk_ratio": float(risk) / float(risks[ref[0]]),
                "dppl_ratio_value": ratio.value,
                "dppl_ratio_low": ratio.low,
                "dppl_ratio_high": ratio.high,
                "dppl_ratio": fmt(ratio, 2),
            }
        )
    return rows


def risk_correlations(rows: Sequence[Mapping], draws: int = 4000) -> tuple[Estimate, Estimate, int]:
    """Pearson correlation of log ΔPPL ratio with log risk ratio and with log MSE ratio over the comparisons
    whose ΔPPL ratio is defined and positive (bootstrap over comparisons), and their number; NaN estimates
    with fewer than 3 comparisons."""
    usable = [r for r in rows if math.isfinite(r["dppl_ratio_value"]) and r["dppl_ratio_value"] > 0]
    if len(usable) < 3:
        nan = float("nan")
        empty = Estimate(nan, nan, nan, 0.95, len(usable))
        return empty, empty, len(usable)
    log_dppl = np.log([r["dppl_ratio_value"] for r in usable])
    risk = pearson(np.log([r["risk_ratio"] for r in usable]), log_dppl, draws=draws)
    mse = pearson(np.log([r["mse_ratio"] for r in usable]), log_dppl, draws=draws)
    return risk, mse, len(usable)


def risk_reading(corr_risk: Estimate, corr_mse: Estimate) -> str:
    """One sentence on whether the risk ratio follows the ΔPPL ratio better than the MSE ratio does."""
    if not corr_risk.finite:
        return "There are too few comparisons to correlate."
    if corr_risk.low > 0 and corr_mse.finite and corr_risk.value > corr_mse.value:
        return "The risk follows the orderings' effect on ΔPPL where the MSE does less well."
    if corr_risk.low > 0:
        return "The risk follows the orderings' effect on ΔPPL, but no better than the MSE does."
    return "Neither ratio follows the orderings' effect clearly: the risk's interval holds 0."


#: How a verdict's outcome reads in a sentence.
OUTCOME_WORDS = {
    "reproduced": "reproduced",
    "differs": "it differs from the paper",
    "inconclusive": "inconclusive at this sample",
    "not run here": "not run in this build",
}


def permutation_finding(verdicts: Sequence[Verdict]) -> str:
    """The puzzle's result in one sentence per judged quantizer: the ratio with its interval and the verdict."""
    labels = {"III.permutation": "the scalar proxy", "III.permutation.e8": "E8 without RHT"}
    parts = [
        f"for {labels[v.claim.id]}, {v.ours} ({OUTCOME_WORDS[v.outcome]})" for v in verdicts if v.claim.id in labels
    ]
    paper = f"{pv.PAPER3['permutation_ppl_ratio_equal_mse']:g}"
    return (
        f"The largest over the smallest ΔPPL among the orderings at 4 bits, against the paper's ~{paper}×: "
        + "; ".join(parts)
        + "."
    )


def _missing(claim: Claim, what: str) -> Verdict:
    """Inconclusive: a setting of this model that the build left out ("not run here" is for other models)."""
    return unmeasured(claim, f"no {what}")


def permutation_verdicts(spreads, bits: float = 4.0) -> list[Verdict]:
    """The puzzle's claims, judged on the ordering ratio of the scalar proxy and of E8 without RHT at ``bits``
    (:attr:`~lqlib.ddt.OrderingSpread.ratio`: the largest over the smallest ΔPPL, re-selected in every
    resample; an undefined ratio is inconclusive)."""
    by = {(s.quantizer, float(s.bits)): s for s in spreads}
    verdicts = []
    for claim_id, quantizer in (("III.permutation", "scalar 8-block"), ("III.permutation.e8", "E8 (no RHT)")):
        claim, spread = CLAIMS[claim_id], by.get((quantizer, float(bits)))
        if spread is None:
            verdicts.append(_missing(claim, f"{bits:g}-bit run of {quantizer}"))
            continue
        ours = f"{fmt(spread.ratio, 2)}× ({spread.worst} / {spread.best}; MSE spread {spread.mse_spread_pct:.2f}%)"
        verdicts.append(judge(claim, spread.ratio, ours=ours))
    return verdicts


# --------------------------------------------------------------------------------------------- Theorem A
#: The predictors of Theorem A, in the paper's order, with the paper's ρ (Llama-3.1-8B).
PREDICTORS = {
    "Q1": pv.PAPER3["theorem_a_rho_llama"],
    "tr(MΣ)": pv.PAPER3["theorem_a_rho_risk_llama"],
    "tr(Σ)": pv.PAPER3["theorem_a_rho_mse_llama"],
}


@dataclass(frozen=True)
class TheoremAData:
    """The predictor study's numbers per configuration, float64 arrays of shape (C,) unless stated.

    Attributes
    ----------
    bits : bit width. families, names : str arrays. delta_loss, q1 : ΔL and Q1 (nats, summed over the
    windows). risk : N·Σ tr(MΣ) (nats²). mse : per element. k_share, drift : K-path share and bias drift.
    mirror : bool, the configurations with the mirror pass; odd, even : their parts of ΔL (NaN elsewhere).
    nll : clean summed NLL (nats); tokens : scored tokens.
    """

    bits: np.ndarray
    families: np.ndarray
    names: np.ndarray
    delta_loss: np.ndarray
    q1: np.ndarray
    risk: np.ndarray
    mse: np.ndarray
    k_share: np.ndarray
    drift: np.ndarray
    mirror: np.ndarray
    odd: np.ndarray
    even: np.ndarray
    nll: float
    tokens: int

    @property
    def predictors(self) -> dict[str, np.ndarray]:
        """The three predictors of ΔL, in the paper's order."""
        return {"Q1": self.q1, "tr(MΣ)": self.risk, "tr(Σ)": self.mse}

    @property
    def configs_per_bits(self) -> int:
        return int(self.bits.size // max(1, len(set(self.bits.tolist()))))


def theorem_a_data(family: Sequence[Mapping], study) -> TheoremAData:
    """:class:`TheoremAData` from :func:`~lqlib.ddt.theorem_a_family`'s entries and the
    :class:`~lqlib.ddt.PredictorStudy` run on them (same order)."""
    n = len(family)
    if len(study.delta_loss) != n:
        raise InputError(f"{len(study.delta_loss)} study results for {n} configurations")
    nan = np.full(n, np.nan)
    return TheoremAData(
        bits=np.array([float(c["bits"]) for c in family]),
        families=np.array([c["family"] for c in family]),
        names=np.array([c["name"] for c in family]),
        delta_loss=np.asarray(study.delta_loss, dtype=np.float64),
        q1=np.asarray(study.q1, dtype=np.float64),
        risk=np.asarray(study.risk, dtype=np.float64),
        mse=np.asarray(study.mse, dtype=np.float64),
        k_share=np.asarray(study.k_path_share, dtype=np.float64),
        drift=np.asarray(study.bias_drift, dtype=np.float64),
        mirror=np.array([bool(c["mirror"]) for c in family]),
        odd=nan if study.odd is None else np.asarray(study.odd, dtype=np.float64),
        even=nan if study.even is None else np.asarray(study.even, dtype=np.float64),
        nll=float(study.nll),
        tokens=int(study.scored_tokens),
    )


#: Columns of the rank-correlation table.
RHO_COLUMNS = {"bits": ("bits", 0), "predictor": "predictor", "rho_text": "Spearman ρ [95% CI]", "paper": ("paper", 2)}


def rho_rows(bits: np.ndarray, delta_loss: np.ndarray, predictors: Mapping[str, np.ndarray], draws: int = 2000):
    """Spearman ρ of ΔL against each predictor within each bit width (bootstrap over configurations): rows
    with ``bits``, ``predictor``, ``rho``, ``ci_low``, ``ci_high``, ``n_configs``, ``rho_text`` (for display) and
    the paper's value, and a dict {(bits, predictor): Estimate}."""
    rows, estimates = [], {}
    for b in sorted(set(np.asarray(bits).tolist())):
        at = np.asarray(bits) == b
        for name, values in predictors.items():
            r = spearman(delta_loss[at], np.asarray(values)[at], draws=draws)
            estimates[(float(b), name)] = r
            rows.append(
                {
                    "bits": float(b),
                    "predictor": name,
                    "rho_text": fmt(r, 2),
                    "rho": r.value,
                    "ci_low": r.low,
                    "ci_high": r.high,
                    "n_configs": r.n,
                    "paper": PREDICTORS.get(name, float("nan")),
                }
            )
    return rows, estimates


#: Columns of the Taylor-check table.
TAYLOR_COLUMNS = {
    "bits": ("bits", 0),
    "dl_over_l": ("ΔL / L", 3),
    "q1_over_dl": ("|Q1| / |ΔL|", 3),
    "odd_minus_q1": ("|odd − Q1| / |Q1|", 3),
    "even_over_dl": ("even / ΔL", 3),
    "spread_ratio": ("SD(ΔL − Q1) / SD(Q1)", 3),
}


def taylor_rows(bits, delta_loss, q1, nll: float, mirror, odd, even) -> list[dict]:
    """Medians per bit width over its configurations: ΔL/L, |Q1|/|ΔL|, on the mirrored configurations
    |odd − Q1|/|Q1| and even/ΔL, and the spread of the remainder ΔL − Q1 against the spread of Q1 across
    configurations (standard deviations)."""
    bits, dl, q1 = np.asarray(bits), np.asarray(delta_loss), np.asarray(q1)
    mirror = np.asarray(mirror, dtype=bool)
    rows = []
    for b in sorted(set(bits.tolist())):
        at = bits == b
        m = at & mirror
        rows.append(
            {
                "bits": float(b),
                "n_configs": int(at.sum()),
                "dl_over_l": float(np.median(dl[at] / nll)),
                "q1_over_dl": float(np.median(np.abs(q1[at]) / np.abs(dl[at]))),
                "n_mirror": int(m.sum()),
                "odd_minus_q1": float(np.median(np.abs(odd[m] - q1[m]) / np.abs(q1[m]))) if m.any() else float("nan"),
                "even_over_dl": float(np.median(even[m] / dl[m])) if m.any() else float("nan"),
                "spread_ratio": float(np.std(dl[at] - q1[at], ddof=1) / np.std(q1[at], ddof=1))
                if at.sum() > 1
                else float("nan"),
            }
        )
    return rows


def taylor_reading(rows: Sequence[Mapping]) -> str:
    """Sentences on the Taylor check's rows (:func:`taylor_rows`): how much of ΔL the first-order term is,
    whether the odd part matches Q1, and whether the remainder or Q1 varies more across configurations."""
    share = [r["q1_over_dl"] for r in rows]
    per_bits = listing([f"{r['q1_over_dl']:.2f} at {r['bits']:g} bits" for r in rows])
    if max(share) < 0.5:
        part = "the first-order term is the smaller part of ΔL"
    elif min(share) > 0.5:
        part = "the first-order term is the larger part of ΔL"
    else:
        part = "the first-order term's part of ΔL depends on the bit width"
    out = [f"The median |Q1| / |ΔL| is {per_bits}: {part}."]
    odd = [r["odd_minus_q1"] for r in rows if math.isfinite(r["odd_minus_q1"])]
    if odd:
        verdict = (
            "the odd part is the first-order term, as the identity says"
            if max(odd) < 0.25
            else "at these error sizes the third-order term is not small against Q1 itself"
        )
        out.append(
            f"On the mirrored configurations the odd part differs from Q1 by at most {max(odd):.0%} of |Q1|: {verdict}."
        )
    spread = [r for r in rows if math.isfinite(r["spread_ratio"])]
    steady = [r for r in spread if r["spread_ratio"] < 1]
    if spread and len(steady) == len(spread):
        out.append(
            "Across the configurations of one bit width the remainder ΔL − Q1 varies less than Q1, which "
            "carries the differences between them."
        )
    elif spread and not steady:
        out.append(
            "Across the configurations of one bit width the remainder ΔL − Q1 varies at least as much as Q1 and "
            "blurs any ranking by Q1."
        )
    elif spread:
        bits = listing([f"{r['bits']:g}" for r in steady])
        out.append(
            f"The remainder ΔL − Q1 varies less than Q1 across configurations only at {bits} bits; elsewhere it "
            "varies at least as much."
        )
    return " ".join(out)


def theorem_a_paper_values(
    taylor: Sequence[Mapping], rho: Mapping[tuple[float, str], Estimate], bits: float = 4.0
) -> list[tuple[str, str, str]]:
    """The paper's Theorem A numbers that no verdict judges, beside ours: ΔL/L (the regime; Llama and Qwen)
    at ``bits`` (rows of :func:`taylor_rows`), and the range of within-bit ρ(Q1) that re-runs of the original
    study found (not the paper) beside ours over the bit widths ({(bits, predictor): Estimate})."""
    ours = [r for r in taylor if r["bits"] == bits]
    q1 = [e.value for (_, name), e in rho.items() if name == "Q1"]
    rho_text = f"{min(q1):.2f} to {max(q1):.2f} over {plural(len(q1), 'bit width')}" if q1 else "—"
    dl = f"{100 * ours[0]['dl_over_l']:.2f}% (median, {bits:g} bits)" if ours else "—"
    lo, hi = pv.PAPER3_RANGES["theorem_a_rerun_rho"]
    return [
        ("ΔL / L, Llama-3.1-8B (moderate regime)", f"≈ {pv.PAPER3['theorem_a_dl_over_l_llama_pct']:g}%", dl),
        ("ΔL / L, Qwen2.5-7B (catastrophic regime)", f"> {pv.PAPER3_QWEN['theorem_a_dl_over_l_above_pct']:g}%", dl),
        (
            "ρ(Q1) within one bit width, re-runs with 50 configurations (not the paper)",
            f"mostly {lo:g} to {hi:g}",
            rho_text,
        ),
    ]


def theorem_a_finding(verdicts: Sequence[Verdict]) -> str:
    """The 4-bit ρ of each predictor with its verdict, and the count of outcomes over every bit width."""
    main = {"III.theorem_a.Q1": "Q1", "III.theorem_a.tr(MΣ)": "tr(MΣ)", "III.theorem_a.tr(Σ)": "tr(Σ)"}
    parts = [
        f"with {main[v.claim.id]} {v.ours.split(' (n')[0]} (paper {v.claim.paper_value.split(' ')[0]}: "
        f"{OUTCOME_WORDS[v.outcome]})"
        for v in verdicts
        if v.claim.id in main
    ]
    rho = [v for v in verdicts if v.claim.id.startswith("III.theorem_a.") and not v.claim.model]
    head = f"At 4 bits the Spearman ρ of ΔL is {listing(parts)}." if parts else ""
    return (head + f" Over every bit width shown the ρ claims are {verdict_counts(rho)}.").strip()


#: Columns of the K-path share and bias drift table.
SHARE_COLUMNS = {
    "bits": ("bits", 0),
    "family": "family",
    "n_configs": "configurations",
    "k_path_share": "K-path share, % (range)",
    "bias_drift": "bias drift, % (range)",
}


def config_range(values: Sequence[float], scale: float = 100.0) -> Estimate:
    """The mean of a per-configuration quantity with its range (min, max) as the interval (``level`` 1: every
    configuration lies inside), scaled (percent by default)."""
    x = scale * np.asarray(values, dtype=np.float64)
    return Estimate(float(x.mean()), float(x.min()), float(x.max()), 1.0, int(x.size))


def _range_text(e: Estimate, digits: int = 1) -> str:
    return f"{e.value:.{digits}f} ({e.low:.{digits}f}–{e.high:.{digits}f})"


def share_rows(bits, families, k_share, drift, detail_bits: float = 4.0) -> list[dict]:
    """K-path share and bias drift (percent, mean with the range over configurations): every family at
    ``detail_bits``, and all configurations at every bit width."""
    bits, families = np.asarray(bits, dtype=np.float64), np.asarray(families)
    k_share, drift = np.asarray(k_share), np.asarray(drift)
    rows = []
    groups = [(detail_bits, f) for f in dict.fromkeys(families[bits == detail_bits].tolist())]
    groups += [(b, "all") for b in sorted(set(bits.tolist()))]
    for b, family in groups:
        at = (bits == b) & ((families == family) if family != "all" else True)
        if not np.any(at):
            continue
        share, bias = config_range(k_share[at]), config_range(drift[at])
        rows.append(
            {
                "bits": float(b),
                "family": family,
                "n_configs": int(np.sum(at)),
                "k_path_share": _range_text(share),
                "bias_drift": _range_text(bias),
                "share_mean": share.value,
                "share_min": share.low,
                "share_max": share.high,
                "drift_mean": bias.value,
                "drift_min": bias.low,
                "drift_max": bias.high,
            }
        )
    return rows


def theorem_a_verdicts(
    rho: Mapping[tuple[float, str], Estimate], k_share: Estimate | None, drift: Estimate | None, model: str
) -> list[Verdict]:
    """Theorem A's claims: ρ per predictor at 4, 3 and 5 bits (those the build ran), the K-path share and
    bias drift at 4 bits (their range over the configurations as the interval), and the Qwen claims (not run
    here unless the build runs Qwen2.5-7B)."""
    verdicts = []
    for claim in claims_of_page(PAGE_THEOREM_A):
        if not runs_here(claim, model):
            verdicts.append(not_run_here(claim, command_for(claim)))
        elif claim.id.startswith("III.theorem_a."):
            predictor, _, suffix = claim.id.removeprefix("III.theorem_a.").partition(".")
            bits = float(suffix.removesuffix("b")) if suffix else 4.0
            estimate = rho.get((bits, predictor))
            if predictor == "qwen":  # the build runs Qwen itself: ρ of Q1 at 4 bits
                estimate = rho.get((4.0, "Q1"))
            if estimate is None:
                verdicts.append(_missing(claim, f"configurations at {bits:g} bits"))
            else:
                verdicts.append(judge(claim, estimate, ours=f"{fmt(estimate, 2)} (n = {estimate.n})"))
        else:
            estimate = k_share if "k_path_share" in claim.id else drift
            if estimate is None:
                verdicts.append(_missing(claim, "configurations at 4 bits"))
            else:
                ours = f"{estimate.value:.1f}% (range {estimate.low:.1f}–{estimate.high:.1f}%, n = {estimate.n})"
                verdicts.append(judge(claim, estimate, ours=ours))
    return verdicts


# --------------------------------------------------------------------------------------------- Theorem B
#: Columns of the Theorem B table.
THEOREM_B_COLUMNS = {
    "mode": "ordering",
    "version": "version",
    "pos_add_text": "pos_add [95% CI]",
    "pred_text": "pred [95% CI]",
    "paper_pos_add": "paper pos_add",
    "paper_pred": "paper pred",
}


def _paper_b(mode: str) -> tuple[str, str, str]:
    if mode in pv.PAPER3_THEOREM_B:
        row = pv.PAPER3_THEOREM_B[mode]
        return f"{row['pos_add']:g}", f"{row['pred']:g}", f"{row['z']:g}"
    lo, hi = pv.PAPER3_RANGES["theorem_b_pos_add_random"]
    plo, phi = pv.PAPER3_RANGES["theorem_b_pred_random"]
    return f"{lo:g}–{hi:g}", f"{plo:g}–{phi:g}", f"< {pv.PAPER3_THEOREM_B_RANDOM_Z_MAX:g}"


def theorem_b_rows(results: Mapping[str, tuple]) -> list[dict]:
    """Two rows per ordering (real passes, fixed gradient) from {mode: (RealPassAdditivity,
    FixedGradientAdditivity)}, with the paper's values beside ours (the paper's are for a fixed gradient)."""
    rows = []
    for mode, (real, fixed) in results.items():
        paper_pos, paper_pred, _ = _paper_b(mode)
        for version, r in (("real passes", real), ("fixed gradient", fixed)):
            rows.append(
                {
                    "mode": mode,
                    "version": version,
                    "n_trials": r.n_trials,
                    "n_windows": r.n_windows,
                    "pos_add_text": fmt(r.pos_add, 3),
                    "pred_text": fmt(r.pred, 3),
                    "pos_add": r.pos_add.value,
                    "pos_add_low": r.pos_add.low,
                    "pos_add_high": r.pos_add.high,
                    "pred": r.pred.value,
                    "pred_low": r.pred.low,
                    "pred_high": r.pred.high,
                    "paper_pos_add": paper_pos,
                    "paper_pred": paper_pred,
                }
            )
    return rows


#: Columns of the Theorem B detail table.
THEOREM_B_DETAIL_COLUMNS = {
    "mode": "ordering",
    "var_ratio": "Var ΔL / Var X [CI]",
    "corr": ("corr(ΔL, X)", 3),
    "plain": "plain pos_add; pred [CI]",
    "mean": "mean ΔL, nats ± se",
    "bias": "mean(ΔL − X) ± se",
    "z_x": "z of mean X (paper |z|)",
}


def theorem_b_detail_rows(results: Mapping[str, tuple]) -> list[dict]:
    """Per ordering: Var ΔL / Var X, corr(ΔL, X), the plain (no control variate) estimates, the mean loss
    change and the second-order bias mean(ΔL − X) with standard errors, and the fixed-gradient mean's z
    beside the paper's |z|."""
    rows = []
    for mode, (real, fixed) in results.items():
        rows.append(
            {
                "mode": mode,
                "var_ratio": fmt(real.var_ratio, 3),
                "corr": real.corr,
                "plain": f"{fmt(real.pos_add_direct, 2)}; {fmt(real.pred_direct, 2)}",
                "mean": f"{real.mean:.2f} ± {real.se:.2f}",
                "bias": f"{real.bias:.2f} ± {real.bias_se:.2f}",
                "z_x": f"{fixed.z:.2f} ({_paper_b(mode)[2]})",
                "mean_dl": real.mean,
                "mean_dl_se": real.se,
                "bias_value": real.bias,
                "bias_se": real.bias_se,
                "z_fixed": fixed.z,
            }
        )
    return rows


def theorem_b_verdicts(results: Mapping[str, tuple]) -> list[Verdict]:
    """pos_add and pred of the real passes per ordering (``"baseline"``, ``"sorted"``, ``"random"`` or
    ``"random k"`` — the first random one), judged against their claims."""
    verdicts = []
    for claim in claims_of_page(PAGE_THEOREM_B):
        mode, stat = claim.id.split(".")[2:4]
        found = [m for m in results if m == mode or (mode == "random" and m.startswith("random"))]
        if not found:
            verdicts.append(_missing(claim, f"{mode} ordering"))
            continue
        real = results[found[0]][0]
        estimate = getattr(real, stat)
        ours = f"{fmt(estimate, 3)} ({plural(real.n_trials, 'trial')} × {plural(real.n_windows, 'window')})"
        verdicts.append(judge(claim, estimate, ours=ours))
    return verdicts


def decisive_factor(estimate: Estimate, band: Band) -> float:
    """How many times the present sample an interval of the same centre would need to lie wholly inside or
    wholly outside ``band``: (half-width / distance to the nearest edge)², the half-width shrinking as
    1/√sample. 1 or less when the interval already decides; infinite at an edge; NaN when undefined."""
    if not estimate.finite:
        return float("nan")
    half = 0.5 * (estimate.high - estimate.low)
    edge = min(abs(estimate.value - band.lo), abs(estimate.value - band.hi))
    if edge == 0:
        return math.inf
    return (half / edge) ** 2


def _relation(estimate: Estimate, value: float = 1.0) -> str:
    if estimate.high < value:
        return "less than"
    if estimate.low > value:
        return "more than"
    return "as much as"


def theorem_b_finding(results: Mapping[str, tuple], verdicts: Sequence[Verdict], trials: int, windows: int) -> str:
    """Theorem B's result in a few sentences: the first ordering's real-pass and fixed-gradient ratios, how
    the real loss change's variance compares with its first-order part's, the verdicts, and for the
    inconclusive ones how much larger a sample would decide them (:func:`decisive_factor`)."""
    if not results:
        return "No ordering was run."
    mode, (real, fixed) = next(iter(results.items()))
    out = [
        f"With {plural(trials, 'trial')} on each of {plural(windows, 'window')}, the {mode} ordering's real passes "
        f"give pos_add = {fmt(real.pos_add, 3)} and pred = {fmt(real.pred, 3)}; the fixed gradient of the same "
        f"passes gives pos_add = {fmt(fixed.pos_add, 3)} and pred = {fmt(fixed.pred, 3)}.",
        f"The real loss change varies {_relation(real.var_ratio)} its first-order part (Var ΔL / Var X = "
        f"{fmt(real.var_ratio, 3)}, correlation {real.corr:.3f}).",
        f"The verdicts on the real passes: {verdict_counts(verdicts)}.",
    ]
    undecided = []
    for v in verdicts:
        if v.outcome != "inconclusive" or not isinstance(v.claim.rule, Band):
            continue
        mode, stat = v.claim.id.split(".")[2:4]
        found = [m for m in results if m == mode or (mode == "random" and m.startswith("random"))]
        factor = decisive_factor(getattr(results[found[0]][0], stat), v.claim.rule) if found else math.nan
        if math.isfinite(factor):
            undecided.append(f"{stat} ({mode}) about {max(2, math.ceil(factor - 1e-9))}×")
    if undecided:
        out.append(
            "An interval of the same centre would decide the inconclusive ones with "
            f"{listing(undecided)} as many trials (the half-width shrinks as one over the square root)."
        )
    return " ".join(out)


# --------------------------------------------------------------------------------------------- Theorem C
#: Columns of the Theorem C table: one row per Σ source, range/iso per M type (median over heads, 5–95%).
THEOREM_C_COLUMNS = {
    "source": "Σ from",
    "actual": "actual M",
    "rank-1": "rank-1 M",
    "near-isotropic": "near-isotropic M",
    "exact": ("exact, actual M", 3),
    "anisotropy": ("anisotropy of Σ / floor", 2),
}


def _paper_c(m_type: str) -> str:
    key = {"actual": "theorem_c_actual", "rank-1": "theorem_c_rank1", "near-isotropic": "theorem_c_near_isotropic"}
    lo, hi = pv.PAPER3_RANGES[key[m_type]]
    return f"{lo:g}" if lo == hi else f"{lo:g}–{hi:g}"


def theorem_c_rows(
    study: Mapping[tuple[str, str], object], sigmas: Mapping[str, np.ndarray], floor: str, m_types: Sequence[str]
) -> list[dict]:
    """The paper's row (Llama-3.1-8B, one head), then one row per Σ source (``sigmas``' order) of
    :func:`~lqlib.ddt.rotation_study`: range/iso per M type as "median (5%–95%)" over heads (and the numbers),
    the median exact range/iso of the actual M, and the median over heads of the anisotropy of Σ
    (:func:`~lqlib.ddt.anisotropy`) relative to the sample floor (isotropic noise from as many vectors,
    source ``floor``)."""
    from ..ddt.isotropy import anisotropy

    rows = [
        {
            "source": "paper (Llama-3.1-8B, one head)",
            **{m: _paper_c(m) for m in m_types},
            "exact": NAN_,
            "anisotropy": NAN_,
        }
    ]
    base = anisotropy(sigmas[floor])
    for source, sigma in sigmas.items():
        row = {"source": source, "heads": int(study[(m_types[0], source)].iso.size)}
        for m in m_types:
            r = study[(m, source)].range_iso
            p05, median, p95 = np.percentile(r, [5, 50, 95])
            key = m.replace("-", "_")
            row.update({m: f"{median:.3f} ({p05:.3f}–{p95:.3f})", f"{key}_median": median, f"{key}_p05": p05})
            row[f"{key}_p95"] = p95
        row["exact"] = float(np.median(study[(m_types[0], source)].exact_range_iso))
        row["anisotropy"] = float(np.median(anisotropy(sigma) / base))
        rows.append(row)
    return rows


#: Columns of the end-to-end table.
END_TO_END_COLUMNS = {
    "bits": ("level of", 0),
    "error": "error",
    "rel_mse": ("relative MSE", 4),
    "delta": "ΔPPL % [95% CI]",
    "gap": "− isotropic, pp [paired CI]",
    "predicted": ("risk / isotropic's", 2),
}


def end_to_end_rows(
    results: Mapping[float, Mapping[str, object]],
    levels: Mapping[float, float],
    predicted: Mapping[str, float],
    clean,
    draws: int = 4000,
) -> tuple[list[dict], dict[tuple[float, str], Estimate]]:
    """ΔPPL of every error at every level, and its paired gap to isotropic error at the same level.

    Parameters
    ----------
    results : {bits: {error name: PerplexityResult}}, each level with an ``"isotropic"`` entry.
    levels : {bits: relative MSE}; predicted : {error name: predicted risk ratio to isotropic}.
    clean : the full-precision PerplexityResult of the same windows.

    Returns
    -------
    (rows, {(bits, error name): paired gap Estimate in pp}).
    """
    rows, gaps = [], {}
    base, tokens = clean.window_nll, clean.window_tokens
    for bits, by_error in results.items():
        iso = by_error["isotropic"].window_nll
        for name, result in by_error.items():
            delta = paired_delta_pct(result.window_nll, base, tokens, draws=draws)
            gap = None if name == "isotropic" else paired_gap_pp(result.window_nll, iso, base, tokens, draws=draws)
            if gap is not None:
                gaps[(float(bits), name)] = gap
            rows.append(
                {
                    "bits": float(bits),
                    "error": name,
                    "rel_mse": float(levels[bits]),
                    "delta": fmt(delta, 2),
                    "delta_pct": delta.value,
                    "ci_low": delta.low,
                    "ci_high": delta.high,
                    "gap": "—" if gap is None else fmt(gap, 2),
                    "predicted": float(predicted.get(name, float("nan"))),
                }
            )
    return rows, gaps


def theorem_c_reading(study: Mapping[tuple[str, str], object], source: str, eps: float) -> str:
    """Sentences on the rotation study for one Σ source: the near-isotropic row is ε times the actual one by
    construction, the exact range against the sampled one, and how little random rotations move the risk."""
    actual, near = study[("actual", source)], study[("near-isotropic", source)]
    ratio = float(np.median(near.range_iso / actual.range_iso))
    exact = float(np.median(actual.exact_range_iso / actual.range_iso))
    spread = float(np.median((actual.sampled_max - actual.sampled_min) / actual.std))
    return (
        f"The near-isotropic row is {ratio:.4f} times the actual one for every head (ε = {eps:g}): its traceless "
        f"part is ε·M₀, so its range/iso is ε times the actual one whatever M and Σ are, and it says nothing about "
        f"the model; it is shown, not judged. Over all of O(d) the range is {exact:.1f} times the sampled one "
        f"(median over heads, {source}): random rotations concentrate, the risk's standard deviation over Haar U "
        f"being {float(np.median(actual.std_iso)):.4f} of iso, so {actual.n_rotations:,} draws span only about "
        f"{spread:.1f} standard deviations. The sampled range/iso measures how typical a random basis is, not how "
        "bad a structured one can be."
    )


def end_to_end_reading(gaps: Mapping[tuple[float, str], Estimate], predicted: Mapping[str, float]) -> str:
    """Sentences on the end-to-end gaps to isotropic error at equal MSE, per level, with the risk ratios the
    directional risk predicts."""
    out = []
    for bits in sorted({b for b, _ in gaps}):
        parts = [
            f"{name} {fmt(gaps[(bits, name)], 2)} pp (risk {predicted.get(name, math.nan):.2f}× isotropic's)"
            for name in ("top", "bottom", "random")
            if (bits, name) in gaps
        ]
        out.append(f"At the E8 codec's {bits:g}-bit MSE, ΔPPL minus isotropic error's: {listing(parts)}.")
    return " ".join(out)


def median_anisotropy_head(M: np.ndarray) -> tuple[int, int]:
    """(layer, head) of the head of median anisotropy d·λ_max(M)/tr M among M of shape (layers, heads, d, d)."""
    M = np.asarray(M, dtype=np.float64)
    if M.ndim != 4:
        raise InputError(f"need M of shape (layers, heads, d, d), got {M.shape}")
    ratio = np.linalg.eigvalsh(M)[..., -1] * M.shape[-1] / np.trace(M, axis1=-2, axis2=-1)
    pick = int(np.argsort(ratio.ravel())[ratio.size // 2])
    layer, head = divmod(pick, M.shape[1])
    return layer, head


def near_isotropic_paper_values() -> str:
    """The paper's near-isotropic range/iso for Llama-3.1-8B and Qwen2.5-7B, as printed."""
    lo, hi = pv.PAPER3_RANGES["theorem_c_near_isotropic"]
    qlo, qhi = pv.PAPER3_QWEN["theorem_c_near_isotropic"]
    one = pv.PAPER3["theorem_c_range_iso_near_isotropic"]

    def text(a: float, b: float) -> str:
        return f"{a:g}" if a == b else f"{a:g}–{b:g}"

    return f"{text(lo, hi)} (Llama-3.1-8B; {one:g} in its summary) and {text(qlo, qhi)} (Qwen2.5-7B)"


def theorem_c_finding(verdicts: Sequence[Verdict]) -> str:
    """One sentence per judged Theorem C claim: our value and the verdict's outcome."""
    labels = {
        "III.theorem_c.actual": "range/iso with the actual M",
        "III.theorem_c.rank-1": "range/iso with a rank-1 M",
        "III.theorem_c.top": "error on M's top directions minus isotropic error",
        "III.theorem_c.bottom": "error on M's bottom directions minus isotropic error",
    }
    parts = [f"{labels[v.claim.id]}: {v.ours} ({OUTCOME_WORDS[v.outcome]})" for v in verdicts if v.claim.id in labels]
    return ("; ".join(parts)[:1].upper() + "; ".join(parts)[1:] + ".") if parts else "No claim was judged."


def theorem_c_verdicts(
    range_iso: Mapping[str, Estimate], gaps: Mapping[tuple[float, str], Estimate], model: str, bits: float = 4.0
) -> list[Verdict]:
    """Theorem C's claims: range/iso for actual and rank-1 M ({m_type: head median Estimate}), the Qwen
    claims (not run here), and the end-to-end gaps of the top and bottom shapes at ``bits``
    ({(bits, "top"|"bottom"): Estimate})."""
    verdicts = []
    for claim in claims_of_page(PAGE_THEOREM_C):
        if not runs_here(claim, model):
            verdicts.append(not_run_here(claim, command_for(claim)))
            continue
        kind = claim.id.split(".")[2]
        if kind in ("top", "bottom"):
            gap = gaps.get((float(bits), kind))
            if gap is None:
                verdicts.append(_missing(claim, f"end-to-end run at the {bits:g}-bit level"))
            else:
                verdicts.append(judge(claim, gap, ours=f"{fmt(gap, 2)} pp"))
        else:
            estimate = range_iso.get(kind)
            if estimate is None:
                verdicts.append(_missing(claim, f"{kind} M"))
            else:
                verdicts.append(judge(claim, estimate, ours=f"{fmt(estimate, 3)} (median of {estimate.n} heads)"))
    return verdicts


def verdict_counts(verdicts: Sequence[Verdict]) -> str:
    """``"2 reproduced, 1 differs and 3 inconclusive"`` (outcomes that occur, in a fixed order)."""
    order = ("reproduced", "differs", "inconclusive", "not run here")
    counts = {o: sum(v.outcome == o for v in verdicts) for o in order}
    return listing([f"{n} {o}" for o, n in counts.items() if n]) if verdicts else "no claims"
