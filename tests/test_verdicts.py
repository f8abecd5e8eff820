"""Verdict rules: each takes every one of its outcomes on synthetic intervals, and only on the right ones."""

from __future__ import annotations

import math

import pytest

from lqlib import InputError
from lqlib.book.verdicts import AtLeast, AtMost, Band, Claim, collect_verdicts, judge, not_run_here, show_verdicts
from lqlib.evaluation.stats import Estimate, RatioEstimate


def est(low, high, value=None):
    return Estimate((low + high) / 2 if value is None else value, low, high, 0.95, 10)


def claim(rule, cid="X.test"):
    return Claim(cid, "I", "a test claim", "1.0 (paper)", rule, "paper1/test", model="")


@pytest.mark.parametrize(
    ("low", "high", "outcome"),
    [
        (0.99, 1.01, "reproduced"),
        (1.2, 1.3, "differs"),
        (0.5, 0.7, "differs"),
        (1.0, 1.1, "inconclusive"),
        (0.8, 1.2, "inconclusive"),
        (math.nan, math.nan, "inconclusive"),
    ],
)
def test_band(low, high, outcome):
    rule = Band.around(1.0, rel=0.05)
    assert (rule.lo, rule.hi) == pytest.approx((0.95, 1.05))
    verdict = judge(claim(rule), est(low, high))
    assert verdict.outcome == outcome
    assert "[0.950, 1.050]" in rule.describe()


def test_a_wider_interval_is_never_an_easier_pass():
    """The failure the old scorecard had: an interval that merely contains the paper's value passed."""
    rule = Band.around(0.71, abs=0.1)
    assert judge(claim(rule), est(-0.95, 1.0, value=-0.04)).outcome == "inconclusive"
    assert judge(claim(rule), est(0.65, 0.75)).outcome == "reproduced"


@pytest.mark.parametrize(
    ("rule", "low", "high", "outcome"),
    [
        (AtMost(threshold=0.5), 0.3, 0.45, "reproduced"),
        (AtMost(threshold=0.5), 0.55, 0.7, "differs"),
        (AtMost(threshold=0.5), 0.4, 0.6, "inconclusive"),
        (AtLeast(threshold=1.0), 1.1, 1.5, "reproduced"),
        (AtLeast(threshold=1.0), 0.5, 0.9, "differs"),
        (AtLeast(threshold=1.0), 0.9, 1.1, "inconclusive"),
    ],
)
def test_one_sided(rule, low, high, outcome):
    assert judge(claim(rule), est(low, high)).outcome == outcome


def test_point_estimates_do_not_decide():
    """−0.09 with interval [−0.29, 0.03] is not 'reproduced' for a claim 'at most 0' (the old bug)."""
    assert judge(claim(AtMost(threshold=0.0)), est(-0.29, 0.03, value=-0.09)).outcome == "inconclusive"


def test_a_ratio_with_an_undefined_denominator_is_inconclusive():
    nan = math.nan
    den = Estimate(0.1, -0.2, 0.4, 0.95, 10)
    ratio = RatioEstimate(nan, nan, nan, 0.95, 10, Estimate(3.0, 2.0, 4.0), den)
    verdict = judge(claim(AtMost(threshold=0.5)), ratio)
    assert verdict.outcome == "inconclusive" and "denominator" in verdict.why
    fine = RatioEstimate(0.3, 0.2, 0.4, 0.95, 10, Estimate(3.0, 2.0, 4.0), Estimate(10.0, 8.0, 12.0))
    assert judge(claim(AtMost(threshold=0.5)), fine).outcome == "reproduced"


def test_not_run_here_and_rows(tmp_path):
    c = Claim("I.t5.llama", "I", "Table 5, Llama-3.1-8B", "5.75", Band.around(5.75, abs=0.05), "paper1/06", "Llama")
    v = not_run_here(c, "python -m lqlib book --model meta-llama/Llama-3.1-8B")
    assert v.outcome == "not run here" and "--model meta-llama/Llama-3.1-8B" in v.why
    tables = tmp_path / "paper1" / "tables"
    show_verdicts([v, judge(claim(AtMost(threshold=1.0)), est(0.1, 0.2))], "paper1/06", "caption", tables)
    rows = collect_verdicts(tmp_path)
    assert [r["claim"] for r in rows] == ["I.t5.llama", "X.test"] and rows[1]["status"] == "reproduced"
    with pytest.raises(InputError):
        show_verdicts([v, v], "paper1/06", "caption", tables)
    with pytest.raises(InputError):
        Band(3, 1.0, 0.0)


def test_the_claims_registry():
    """Unique ids, every claim on a page of the book, every paper model runnable by a command."""
    import yaml

    from lqlib.book import claims as registry
    from lqlib.book import paper_values as pv

    root = __import__("pathlib").Path(__file__).resolve().parents[1]
    pages = {
        entry.removeprefix("book/")
        for entry in __import__("re").findall(r"file: (\S+)", (root / "_toc.yml").read_text())
    }
    assert yaml.safe_load((root / "_toc.yml").read_text())["root"] == "book/intro"
    assert {c.page for c in registry.CLAIMS.values()} <= pages
    assert len(registry.CLAIMS) > 40 and all(c.paper in ("I", "II", "III", "IV") for c in registry.CLAIMS.values())
    for claim in registry.CLAIMS.values():
        assert claim.criterion and claim.paper_value
        if claim.model:
            assert claim.model in pv.PAPER_MODELS
            assert not registry.runs_here(claim, "smollm2-135m-instruct")
            assert registry.runs_here(claim, pv.PAPER_MODELS[claim.model])
            assert f"--model {pv.PAPER_MODELS[claim.model]}" in registry.command_for(claim)
    assert [c.id for c in registry.claims_of_page("paper1/03_e8_entropy_coding")][:2] == [
        "I.table3.rate.2",
        "I.table3.rate.2.5",
    ]


def test_criteria_and_protocol_tables(tmp_path):
    from lqlib.book.claims import claims_of_page
    from lqlib.book.protocol import protocol_rows, show_protocol
    from lqlib.book.verdicts import show_criteria

    claims = claims_of_page("paper1/03_e8_entropy_coding")
    shown = show_criteria(claims, "paper1/03_e8_entropy_coding", tmp_path)
    assert "fixed before the data" in shown.data and "Table 3: coded rate at b = 2" in shown.data
    assert (tmp_path / "criteria_paper1_03_e8_entropy_coding.csv").is_file()
    rows = protocol_rows(
        [{"setting": "windows", "paper": "all", "ours": 16}, {"setting": "tokens", "paper": "?", "ours": 8192}]
    )
    assert rows[1]["ours"] == "8,192"
    assert "this build" in show_protocol(rows, "paper1/06", "caption", tmp_path).data
    with pytest.raises(InputError):
        protocol_rows([{"setting": "x", "paper": "y"}])
    with pytest.raises(InputError):
        protocol_rows([{"setting": "x", "paper": "y", "ours": 1}] * 2)


def test_judge_here_dispatches_on_the_model_and_the_estimate():
    from lqlib.book.claims import CLAIMS, command_for
    from lqlib.book.verdicts import judge_here

    llama = CLAIMS["II.ppl_increase_4b"]
    v = judge_here(llama, "smollm2-135m-instruct", est(1.8, 2.0), command_for(llama))
    assert v.outcome == "not run here" and "meta-llama/Llama-3.1-8B" in v.why
    v = judge_here(llama, "meta-llama/Llama-3.1-8B", est(1.8, 2.0), command_for(llama))
    assert v.outcome == "reproduced"
    mine = CLAIMS["II.compression.3"]
    v = judge_here(mine, "smollm2-135m-instruct", None, "", missing="3 bits is not in a smoke build")
    assert v.outcome == "inconclusive" and "smoke" in v.why
