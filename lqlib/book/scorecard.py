"""The reproduction scorecard: every claim of the four papers, the paper's value, ours, and its verdict.

Nothing is judged here. The chapters judge their claims (:mod:`lqlib.book.verdicts`) and write them as
``verdicts_<page>.csv``; the scorecard collects those rows, so it cannot disagree with a chapter. A
claim of the registry (:mod:`lqlib.book.claims`) that no chapter judged in this build is listed as
"missing" (a build defect the book's tests refuse). The page also shows the environment the book was
built with and the last full build's report (``results/book_build.json``).
"""

from __future__ import annotations

import json
import platform
from collections import Counter
from importlib import metadata
from pathlib import Path

from ..store import library_digest
from .claims import CLAIMS
from .prose import plural
from .verdicts import OUTCOMES, collect_verdicts

__all__ = [
    "SCORECARD_COLUMNS",
    "COUNT_COLUMNS",
    "scorecard_rows",
    "status_counts",
    "environment_rows",
    "build_rows",
    "counts_sentence",
]

#: The scorecard's table (one per paper).
SCORECARD_COLUMNS = {
    "claim": "id",
    "item": "claim",
    "paper_value": "paper",
    "ours": "ours",
    "status": "verdict",
    "page": "judged on",
}
#: Counts per paper and outcome.
COUNT_COLUMNS = {"paper": "paper", **{o: o for o in OUTCOMES}, "missing": "missing", "total": "total"}
_PAPERS = ("I", "II", "III", "IV")


def scorecard_rows(book_dir: str | Path) -> list[dict[str, str]]:
    """Every verdict the chapters under ``book_dir`` wrote, in registry order, and a "missing" row for each
    registered claim that no chapter judged (``page`` links to the chapter that should)."""
    judged = {row["claim"]: row for row in collect_verdicts(book_dir)}
    rows = []
    for claim in CLAIMS.values():
        row = judged.pop(claim.id, None)
        if row is None:
            row = {
                "claim": claim.id,
                "paper": claim.paper,
                "item": claim.item,
                "paper_value": claim.paper_value,
                "ours": "—",
                "criterion": claim.criterion,
                "status": "missing",
                "why": "no chapter judged this claim in this build",
                "page": claim.page,
            }
        rows.append(row)
    rows += judged.values()  # claims a chapter added beyond the registry
    return rows


def status_counts(rows: list[dict[str, str]]) -> list[dict[str, object]]:
    """One row per paper and a total: how many claims have each outcome."""
    table = []
    for paper in (*_PAPERS, "all"):
        selected = [r for r in rows if paper == "all" or r["paper"] == paper]
        counts = Counter(r["status"] for r in selected)
        table.append({"paper": paper, **{o: counts.get(o, 0) for o in (*OUTCOMES, "missing")}, "total": len(selected)})
    return table


def counts_sentence(counts: list[dict[str, object]]) -> str:
    """The totals as a sentence: "Of 58 claims, 20 are reproduced, 15 differ, 13 are inconclusive and 10
    are not run here." (singular and plural agree; zero outcomes are left out; missing ones named last)."""
    total = counts[-1]
    parts = []
    for outcome, one, many in (
        ("reproduced", "is reproduced", "are reproduced"),
        ("differs", "differs", "differ"),
        ("inconclusive", "is inconclusive", "are inconclusive"),
        ("not run here", "is not run here", "are not run here"),
        ("missing", "has no verdict in this build", "have no verdict in this build"),
    ):
        n = int(total[outcome])
        if n:
            parts.append(f"{n} {one if n == 1 else many}")
    if not parts:
        return "No claim was judged in this build."
    listed = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    return f"Of {plural(int(total['total']), 'claim')}, {listed}."


def environment_rows() -> list[dict[str, str]]:
    """The versions this page was built with (Python, the numeric stack, the book tools, the library)."""
    rows = [{"component": "Python", "version": platform.python_version()}]
    for name in ("torch", "transformers", "numpy", "constriction", "papermill", "jupyter-book", "matplotlib", "triton"):
        try:
            version = metadata.version(name)
        except metadata.PackageNotFoundError:
            version = "not installed"
        rows.append({"component": name, "version": version})
    rows.append({"component": "lqlib (source digest)", "version": library_digest()[:16]})
    rows.append({"component": "machine", "version": f"{platform.machine()}, {platform.system()}"})
    return rows


def build_rows(report_path: str | Path) -> tuple[list[dict[str, object]], dict]:
    """The per-notebook seconds of a recorded build report and the report itself ({} and [] if absent)."""
    path = Path(report_path)
    if not path.is_file():
        return [], {}
    report = json.loads(path.read_text())
    rows = [
        {"notebook": n["path"].removeprefix("book/").removesuffix(".ipynb"), "seconds": n["seconds"]}
        for n in report["notebooks"]
    ]
    rows.append({"notebook": "HTML build", "seconds": report.get("html_s", float("nan"))})
    rows.append({"notebook": "total", "seconds": report["total_s"]})
    return rows, report
