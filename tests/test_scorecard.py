"""The scorecard collects the chapters' verdicts: nothing judged twice, nothing silently missing."""

from __future__ import annotations

import json

import pytest

from lqlib.book.claims import CLAIMS
from lqlib.book.scorecard import build_rows, counts_sentence, environment_rows, scorecard_rows, status_counts
from lqlib.book.verdicts import AtMost, judge, not_run_here, show_verdicts
from lqlib.errors import InputError
from lqlib.evaluation.stats import Estimate


def test_rows_come_from_the_chapters_and_missing_claims_are_listed(tmp_path):
    gap = CLAIMS["I.table3.gap"]
    llama = CLAIMS["I.table5.Llama-3.1-8B"]
    verdicts = [judge(gap, Estimate(1.2243, 1.223, 1.2256)), not_run_here(llama, "python -m lqlib book --model x")]
    show_verdicts(verdicts, "paper1/03_e8_entropy_coding", "caption", tmp_path / "paper1" / "tables")
    rows = scorecard_rows(tmp_path)
    assert len(rows) == len(CLAIMS) and [r["claim"] for r in rows] == list(CLAIMS)
    by_id = {r["claim"]: r for r in rows}
    assert (
        by_id["I.table3.gap"]["status"] == "reproduced" and by_id["I.table5.Llama-3.1-8B"]["status"] == "not run here"
    )
    assert (
        by_id["III.permutation"]["status"] == "missing"
        and by_id["III.permutation"]["page"] == "paper3/01_permutation_puzzle"
    )
    counts = status_counts(rows)
    assert counts[0]["paper"] == "I" and counts[0]["reproduced"] == 1 and counts[0]["not run here"] == 1
    assert counts[-1]["total"] == len(CLAIMS) and counts[-1]["missing"] == len(CLAIMS) - 2


def test_counts_sentence_is_grammatical_in_every_branch():
    def counts(**kw):
        base = {"reproduced": 0, "differs": 0, "inconclusive": 0, "not run here": 0, "missing": 0}
        base.update({k.replace("_", " "): v for k, v in kw.items()})
        return [{**base, "paper": "all", "total": sum(base.values())}]

    assert counts_sentence(counts(reproduced=1)) == "Of 1 claim, 1 is reproduced."
    assert counts_sentence(counts(reproduced=2, differs=1)) == "Of 3 claims, 2 are reproduced and 1 differs."
    assert counts_sentence(counts(differs=2, inconclusive=1, not_run_here=1)) == (
        "Of 4 claims, 2 differ, 1 is inconclusive and 1 is not run here."
    )
    assert counts_sentence(counts(missing=1)) == "Of 1 claim, 1 has no verdict in this build."
    assert counts_sentence(counts()) == "No claim was judged in this build."


def test_environment_and_build_report(tmp_path):
    names = [r["component"] for r in environment_rows()]
    assert names[0] == "Python" and "torch" in names and "transformers" in names
    assert build_rows(tmp_path / "absent.json") == ([], {})
    report = {
        "notebooks": [{"path": "book/paper1/01_x.ipynb", "ran": True, "seconds": 12.5}],
        "html_s": 30.0,
        "total_s": 42.5,
        "date": "2026-12-06",
    }
    (tmp_path / "r.json").write_text(json.dumps(report))
    rows, loaded = build_rows(tmp_path / "r.json")
    assert rows[0] == {"notebook": "paper1/01_x", "seconds": 12.5} and rows[-1]["seconds"] == 42.5
    assert loaded["date"] == "2026-12-06"
    assert AtMost(threshold=1.0).describe()


def test_paper_summary_names_every_outcome_it_has():
    from lqlib.book.scorecard import paper_summary

    counts = [
        {"paper": "I", "reproduced": 1, "differs": 1, "inconclusive": 0, "not run here": 2, "missing": 0, "total": 4},
        {"paper": "II", "reproduced": 0, "differs": 2, "inconclusive": 0, "not run here": 0, "missing": 1, "total": 3},
        {"paper": "III", "reproduced": 0, "differs": 0, "inconclusive": 0, "not run here": 0, "missing": 0, "total": 0},
    ]
    assert paper_summary(counts, "I") == "Paper I: 4 claims (1 reproduced, 1 differs, 2 not run here)"
    assert paper_summary(counts, "II") == "Paper II: 3 claims (2 differ, 1 missing)"
    assert paper_summary(counts, "III") == "Paper III: 0 claims"
    with pytest.raises(InputError):
        paper_summary(counts, "IV")
