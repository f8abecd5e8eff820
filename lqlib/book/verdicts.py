"""Verdicts on the papers' claims: one rule per claim, stated before the data, judged on our intervals.

A :class:`Claim` names what a paper claims, the paper's value as printed and the :class:`Rule` that
decides it; the rule is fixed in :mod:`lqlib.book.claims` before any data is seen and its wording
(:meth:`Rule.describe`) is shown in the chapter before the result. :func:`judge` applies the rule to
our :class:`~lqlib.evaluation.stats.Estimate` and returns a :class:`Verdict`, whose outcome is one of

* ``"reproduced"`` — our whole interval satisfies the claim (inside the tolerance band, or on the
  claimed side of a threshold);
* ``"differs"`` — our whole interval contradicts it;
* ``"inconclusive"`` — the interval straddles an edge (a small or noisy run says this often: it is
  the honest answer, never a pass);
* ``"not run here"`` — the claim is about a model or setting this build did not run; the verdict
  carries the command that runs it.

A chapter judges its claims with :func:`judge` and shows them with :func:`show_verdicts`, which also
writes them as ``verdicts_<page>.csv``; the scorecard only collects those files
(:func:`collect_verdicts`), so the two can never disagree.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ..errors import InputError
from ..evaluation.stats import Estimate, RatioEstimate
from .prose import plural

__all__ = [
    "OUTCOMES",
    "Rule",
    "Band",
    "AtMost",
    "AtLeast",
    "Claim",
    "Verdict",
    "judge",
    "not_run_here",
    "unmeasured",
    "judge_here",
    "verdict_rows",
    "show_verdicts",
    "show_criteria",
    "collect_verdicts",
    "VERDICT_COLUMNS",
]

OUTCOMES = ("reproduced", "differs", "inconclusive", "not run here")


def _num(x: float, digits: int) -> str:
    return f"{x:.{digits}f}" if math.isfinite(x) else "—"


@dataclass(frozen=True)
class Rule:
    """How a claim is decided from an interval [low, high]. Subclasses define :meth:`decide`."""

    digits: int = 3

    def describe(self) -> str:  # pragma: no cover - abstract
        raise NotImplementedError

    def decide(self, estimate: Estimate) -> tuple[str, str]:  # pragma: no cover - abstract
        raise NotImplementedError


@dataclass(frozen=True)
class Band(Rule):
    """A claimed value with a tolerance band [lo, hi]: reproduced when our interval lies inside the band,
    differs when it lies wholly outside, inconclusive when it crosses an edge."""

    lo: float = -math.inf
    hi: float = math.inf

    def __post_init__(self) -> None:
        if not self.lo <= self.hi:
            raise InputError(f"a band needs lo <= hi, got [{self.lo}, {self.hi}]")

    @classmethod
    def around(cls, value: float, rel: float = 0.0, abs: float = 0.0, digits: int = 3) -> Band:  # noqa: A002
        """The band value ± max(rel·|value|, abs)."""
        half = max(rel * math.fabs(value), abs)
        return cls(digits, value - half, value + half)

    def describe(self) -> str:
        d = self.digits
        return (
            f"reproduced if our 95% interval lies inside [{_num(self.lo, d)}, {_num(self.hi, d)}], differs if it "
            "lies wholly outside, inconclusive if it crosses an edge"
        )

    def decide(self, estimate: Estimate) -> tuple[str, str]:
        d, low, high = self.digits, estimate.low, estimate.high
        band = f"[{_num(self.lo, d)}, {_num(self.hi, d)}]"
        ours = f"[{_num(low, d)}, {_num(high, d)}]"
        if not (math.isfinite(low) and math.isfinite(high)):
            return "inconclusive", f"our interval {ours} is not defined"
        if self.lo <= low and high <= self.hi:
            return "reproduced", f"our interval {ours} lies inside {band}"
        if high < self.lo or low > self.hi:
            return "differs", f"our interval {ours} lies outside {band}"
        return "inconclusive", f"our interval {ours} crosses an edge of {band}"


@dataclass(frozen=True)
class AtMost(Rule):
    """A claimed upper bound (e.g. a ratio ≤ 0.5): reproduced when our whole interval is ≤ the threshold,
    differs when it is wholly above, inconclusive otherwise. A ratio whose denominator is not
    distinguishable from zero (:class:`RatioEstimate` not ``defined``) is inconclusive."""

    threshold: float = 0.0

    def describe(self) -> str:
        t = _num(self.threshold, self.digits)
        return (
            f"reproduced if our 95% interval lies at or below {t}, differs if it lies wholly above, "
            "inconclusive otherwise"
        )

    def decide(self, estimate: Estimate) -> tuple[str, str]:
        return _one_sided(estimate, self.threshold, self.digits, below=True)


@dataclass(frozen=True)
class AtLeast(Rule):
    """A claimed lower bound (e.g. a speed-up ≥ 1): the mirror image of :class:`AtMost`."""

    threshold: float = 0.0

    def describe(self) -> str:
        t = _num(self.threshold, self.digits)
        return (
            f"reproduced if our 95% interval lies at or above {t}, differs if it lies wholly below, "
            "inconclusive otherwise"
        )

    def decide(self, estimate: Estimate) -> tuple[str, str]:
        return _one_sided(estimate, self.threshold, self.digits, below=False)


def _one_sided(estimate: Estimate, threshold: float, digits: int, below: bool) -> tuple[str, str]:
    if isinstance(estimate, RatioEstimate) and not estimate.defined:
        den = estimate.denominator
        where = f" ({den.format(digits)})" if den is not None else ""
        return "inconclusive", f"the ratio's denominator{where} is not distinguishable from zero"
    low, high, t = estimate.low, estimate.high, threshold
    ours, edge = f"[{_num(low, digits)}, {_num(high, digits)}]", _num(t, digits)
    if not (math.isfinite(low) and math.isfinite(high)):
        return "inconclusive", f"our interval {ours} is not defined"
    if (high <= t) if below else (low >= t):
        return "reproduced", f"our interval {ours} lies {'at or below' if below else 'at or above'} {edge}"
    if (low > t) if below else (high < t):
        return "differs", f"our interval {ours} lies wholly {'above' if below else 'below'} {edge}"
    return "inconclusive", f"our interval {ours} contains {edge}"


@dataclass(frozen=True)
class Claim:
    """One claim of the papers, fixed before any data.

    Attributes
    ----------
    id : stable key, e.g. ``"I.table3.gap"`` (the scorecard and the tests read it).
    paper : ``"I"``, ``"II"``, ``"III"`` or ``"IV"``.
    item : what is claimed, in a few words.
    paper_value : the paper's value as printed, with its model or setting.
    rule : how our interval decides it.
    page : the book page that judges it (e.g. ``"paper1/03_e8_entropy_coding"``).
    model : the model the claim is about, when it is one (its results are "not run here" on another).
    """

    id: str
    paper: str
    item: str
    paper_value: str
    rule: Rule
    page: str
    model: str = ""

    @property
    def criterion(self) -> str:
        return self.rule.describe()


@dataclass(frozen=True)
class Verdict:
    """A claim judged: outcome, our value (with its interval), and the sentence that says why."""

    claim: Claim
    outcome: str
    ours: str
    why: str

    def __post_init__(self) -> None:
        if self.outcome not in OUTCOMES:
            raise InputError(f"outcome must be one of {OUTCOMES}, got {self.outcome!r}")

    def row(self) -> dict[str, str]:
        c = self.claim
        return {
            "claim": c.id,
            "paper": c.paper,
            "item": c.item,
            "paper_value": c.paper_value,
            "ours": self.ours,
            "criterion": c.criterion,
            "status": self.outcome,
            "why": self.why,
            "page": c.page,
        }


def judge(claim: Claim, estimate: Estimate, ours: str | None = None, note: str = "") -> Verdict:
    """Apply ``claim.rule`` to ``estimate``; ``ours`` is how our value is shown (default: the estimate
    with its interval), ``note`` a clause added to the reason (e.g. "another model")."""
    outcome, why = claim.rule.decide(estimate)
    shown = ours if ours is not None else estimate.format(claim.rule.digits)
    return Verdict(claim, outcome, shown, why + (f"; {note}" if note else ""))


def not_run_here(claim: Claim, command: str, ours: str = "—") -> Verdict:
    """The verdict of a claim this build cannot test (another model or setting), with the command that
    tests it on a reader's own weights."""
    return Verdict(claim, "not run here", ours, f"needs {claim.model or 'another setting'}: run `{command}`")


def unmeasured(claim: Claim, why: str) -> Verdict:
    """An inconclusive verdict for a claim this build did not measure (e.g. a rate left out of a smoke
    build), with the reason."""
    return Verdict(claim, "inconclusive", "—", f"not measured in this build: {why}")


def judge_here(
    claim: Claim,
    model_name: str,
    estimate: Estimate | None,
    command: str,
    ours: str | None = None,
    note: str = "",
    missing: str = "",
) -> Verdict:
    """The verdict of a claim in this build: "not run here" (with ``command``) when the claim is about a
    model other than ``model_name``; inconclusive when ``estimate`` is None (``missing`` says why); else
    :func:`judge`."""
    from .claims import runs_here

    if not runs_here(claim, model_name):
        return not_run_here(claim, command)
    if estimate is None:
        return unmeasured(claim, missing or "no estimate")
    return judge(claim, estimate, ours, note)


#: Column specification of a chapter's verdict table (the criteria table above it states each claim by id;
#: the CSV keeps every field, the claim's text included).
VERDICT_COLUMNS = {
    "claim": "id",
    "paper_value": "paper",
    "ours": "ours",
    "status": "verdict",
    "why": "why",
}


def verdict_rows(verdicts: Sequence[Verdict]) -> list[dict[str, str]]:
    """One table row per verdict (see :meth:`Verdict.row`); claim ids must be unique."""
    ids = [v.claim.id for v in verdicts]
    if len(set(ids)) != len(ids):
        raise InputError(f"a claim is judged twice: {sorted(i for i in ids if ids.count(i) > 1)}")
    return [v.row() for v in verdicts]


def show_verdicts(verdicts: Sequence[Verdict], page: str, caption: str, out_dir: str | Path = "tables"):
    """Write ``verdicts_<page>.csv`` (every field) and return a MyST table of the verdicts for display."""
    from .tables import show_table

    name = "verdicts_" + page.replace("/", "_")
    return show_table(verdict_rows(verdicts), name, VERDICT_COLUMNS, caption, out_dir)


#: Column specification of criteria tables (what is claimed and how it is decided, before the data).
CRITERIA_COLUMNS = {
    "claim": "id",
    "item": "claim",
    "paper_value": "paper",
    "criterion": "how we decide (fixed before the data)",
}


def show_criteria(claims: Sequence[Claim], page: str, out_dir: str | Path = "tables", caption: str = ""):
    """Write ``criteria_<page>.csv`` and return a MyST table of the claims' criteria, shown before the
    results so that the rule is stated before the data."""
    from .tables import show_table

    rows = [{"claim": c.id, "item": c.item, "paper_value": c.paper_value, "criterion": c.criterion} for c in claims]
    name = "criteria_" + page.replace("/", "_")
    caption = caption or "What the papers claim here, and the rule that decides each claim (fixed before the data)."
    title = f"The {plural(len(rows), 'claim')} of this page and the rules that decide them (fixed before the data)"
    return show_table(rows, name, CRITERIA_COLUMNS, caption, out_dir, collapsed=title)


def collect_verdicts(book_dir: str | Path) -> list[dict[str, str]]:
    """Every verdict row written by the chapters under ``book_dir`` (``*/tables/verdicts_*.csv``), in the
    order of the papers and then of the files."""
    rows = []
    for path in sorted(Path(book_dir).glob("*/tables/verdicts_*.csv")):
        with path.open(newline="") as handle:
            rows += list(csv.DictReader(handle))
    order = {"I": 0, "II": 1, "III": 2, "IV": 3}
    return sorted(rows, key=lambda r: order.get(r["paper"], 9))
