"""Paper III's page functions: rows, verdict inputs (every outcome reachable), protocols, prose in every branch,
and every paper value of Paper III shown somewhere on the chapter."""

from __future__ import annotations

import math
from dataclasses import replace

import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch

from lqlib.book import paper3 as p3
from lqlib.book import paper3_figures as p3fig
from lqlib.book import paper_values as pv
from lqlib.book.claims import CLAIMS, claims_of_page
from lqlib.book.protocol import protocol_rows
from lqlib.ddt import (
    FixedGradientAdditivity,
    OrderingRun,
    QuantizedRun,
    RealPassAdditivity,
    haar_orthogonal,
    head_median,
    ordering_summary,
    rotation_study,
)
from lqlib.errors import InputError
from lqlib.evaluation.perplexity import PerplexityResult
from lqlib.evaluation.stats import Estimate, paired_delta_pct, spearman

MODEL = "smollm2-135m-instruct"
NAN = float("nan")


# ------------------------------------------------------------------------------------------------ words
def test_words_are_grammatical_in_every_branch():
    assert p3.plural(1, "window") == "1 window" and p3.plural(2, "window") == "2 windows"
    assert p3.plural(0, "window") == "0 windows" and p3.plural(1200, "trial") == "1,200 trials"
    assert p3.windows_text(1, 512) == "1 window of 512 tokens"
    assert p3.windows_text(16, 512) == "16 windows of 512 tokens"
    assert p3.listing([]) == "none" and p3.listing(["a"]) == "a"
    assert p3.listing(["a", "b"]) == "a and b" and p3.listing(["a", "b", "c"]) == "a, b and c"
    assert p3.fmt(Estimate(1.234, 1.0, 1.5)) == "1.23 [1.00, 1.50]"
    assert "undefined" in p3.fmt(_ratio(NAN, NAN, NAN, den_low=-1.0))
    verdicts = p3.theorem_b_verdicts({})
    assert p3.verdict_counts(verdicts) == "6 inconclusive" and p3.verdict_counts([]) == "no claims"


def test_chapter_windows_are_disjoint():
    ids = torch.arange(40).reshape(10, 4)
    w = p3.chapter_windows(ids, ids.clone(), 3, 4)
    assert w.calibration[:, 0].tolist() == [0, 4, 8] and w.evaluation[:, 0].tolist() == [24, 28, 32, 36]
    assert w.window == 4 and torch.equal(w.labels, w.evaluation)
    with pytest.raises(InputError):
        p3.chapter_windows(ids, ids, 6, 5)


def test_protocol_tables_are_valid_rows():
    tables = [
        p3.protocol_permutation(MODEL, "pydoc", 512, 4, 8, [3, 4], 2),
        p3.protocol_theorem_a(MODEL, "pydoc", 512, 1, [3, 4, 5], 50),
        p3.protocol_theorem_b(MODEL, "pydoc", 512, 16, 3, ["baseline", "sorted", "random"], 2, 4.0),
        p3.protocol_theorem_c(MODEL, "pydoc", 512, 4, 8, 180, 1000, [4.0, 3.0]),
    ]
    for rows in tables:
        checked = protocol_rows(rows)
        assert checked[0]["setting"] == "model" and checked[0]["ours"] == MODEL
    assert any(r["ours"] == "16 windows of 512 tokens" for r in tables[2])
    assert any(r["ours"] == "3 per window and ordering (48 window passes each)" for r in tables[2])
    assert any(r["ours"] == "1 window of 512 tokens" for r in tables[1])


# ------------------------------------------------------------------------------------------------ permutation puzzle
def _run(quantizer, bits, ordering, seed, per_token, mse, base, tokens, noise=0.0):
    nll = base + per_token * tokens + noise
    run = QuantizedRun(np.asarray(nll, dtype=np.float64), tokens, mse, np.full((1, 2), mse))
    return OrderingRun(quantizer, bits, ordering, seed, run, paired_delta_pct(nll, base, tokens, draws=500))


def _puzzle(scalar_rates, e8_rates, bits=4.0, noise=None):
    rng = np.random.default_rng(0)
    tokens = np.full(12, 100)
    base = rng.uniform(300, 400, 12)
    runs = []
    for name, rates in (("scalar 8-block", scalar_rates), ("E8 (no RHT)", e8_rates)):
        for (ordering, seed), rate in zip((("identity", None), ("sorted", None), ("random", 0)), rates):
            extra = 0.0 if noise is None else noise * rng.standard_normal(12)
            runs.append(_run(name, bits, ordering, seed, rate, 0.01, base, tokens, extra))
    return runs, base, tokens


def test_permutation_rows_summary_and_each_verdict_outcome():
    # a 50x spread: reproduced; a 1.5x spread: differs
    runs, base, tokens = _puzzle([0.001, 0.05, 0.02], [0.02, 0.03, 0.025])
    summary = ordering_summary(runs, base, tokens, draws=500)
    rows = p3.permutation_rows(runs)
    assert rows[1]["ordering"] == "sorted" and rows[2]["ordering"] == "random (seed 0)"
    assert rows[0]["delta"].startswith(f"{runs[0].delta.value:.2f} [")
    table = p3.summary_rows(summary)
    assert table[0]["pair"] == "sorted / identity" and table[0]["finding"] == p3.SPREAD_WORDS[summary[0].kind]
    verdicts = {v.claim.id: v for v in p3.permutation_verdicts(summary)}
    assert verdicts["III.permutation"].outcome == "reproduced"
    assert verdicts["III.permutation.e8"].outcome == "differs"
    assert "sorted / identity" in verdicts["III.permutation"].ours
    text = p3.permutation_finding(list(verdicts.values()))
    assert "reproduced" in text and "it differs from the paper" in text and "~50×" in text
    # a best ordering whose ΔPPL cannot be told from zero: the ratio is undefined, the verdict inconclusive
    runs, base, tokens = _puzzle([0.0, 0.05, 0.02], [0.02, 0.03, 0.025], noise=3.0)
    undecided = p3.permutation_verdicts(ordering_summary(runs, base, tokens, draws=500))[0]
    assert undecided.outcome == "inconclusive" and "undefined" in undecided.ours
    # a bit width the build did not run
    missing = p3.permutation_verdicts(summary, bits=3.0)
    assert {v.outcome for v in missing} == {"inconclusive"}


def test_pinned_mse_and_risk_comparisons():
    runs, base, tokens = _puzzle([0.01, 0.02, 0.015], [0.02, 0.03, 0.025])
    mse = p3.pinned_mse_rows(runs)
    assert {r["quantizer"] for r in mse} == {"scalar 8-block", "E8 (no RHT)"}
    scalar = next(r for r in mse if r["quantizer"] == "scalar 8-block")
    assert scalar["predicted"] == pytest.approx(math.pi * math.e / 6 * 4.0**-4) and scalar["measured"] == 0.01
    risks = [1.0, 2.0, 1.5, 1.0, 1.2, 1.1]
    rows = p3.risk_rows(runs, risks, base, tokens, draws=500)
    assert len(rows) == 4 and [r["risk_ratio"] for r in rows] == pytest.approx([2.0, 1.5, 1.2, 1.1])
    assert rows[0]["dppl_ratio_value"] == pytest.approx(np.expm1(0.02) / np.expm1(0.01))
    risk, mse_corr, n = p3.risk_correlations(rows, draws=500)
    assert n == 4 and risk.value > 0.9 and math.isnan(mse_corr.value)  # every MSE ratio is 1: no spread
    few, _, n = p3.risk_correlations(rows[:2])
    assert n == 2 and not few.finite
    assert p3.risk_reading(few, few) == "There are too few comparisons to correlate."
    assert "where the MSE does less well" in p3.risk_reading(Estimate(0.9, 0.5, 1.0), Estimate(0.2, -0.5, 0.7))
    assert "no better than" in p3.risk_reading(Estimate(0.5, 0.1, 0.8), Estimate(0.7, 0.2, 0.9))
    assert "holds 0" in p3.risk_reading(Estimate(0.5, -0.1, 0.8), Estimate(0.7, 0.2, 0.9))


# ------------------------------------------------------------------------------------------------ Theorem A
def _theorem_a_data(n=12, rho_q1=0.9):
    rng = np.random.default_rng(1)
    bits = np.repeat([3.0, 4.0, 5.0], n)
    dl = rng.uniform(1, 2, bits.size) * 4.0 ** -(bits - 3)
    q1 = rho_q1 * dl + (1 - rho_q1) * rng.uniform(1, 2, bits.size) * 4.0 ** -(bits - 3)
    mirror = np.tile(np.arange(n) % 4 == 0, 3)
    return p3.TheoremAData(
        bits=bits,
        families=np.tile(np.array(["E8 + RHT", "scalar block"] * (n // 2)), 3),
        names=np.array([f"c{i}" for i in range(bits.size)]),
        delta_loss=dl,
        q1=0.2 * q1,
        risk=rng.uniform(1, 2, bits.size),
        mse=4.0**-bits,
        k_share=rng.uniform(0.30, 0.45, bits.size),
        drift=rng.uniform(0.08, 0.2, bits.size),
        mirror=mirror,
        odd=np.where(mirror, 0.21 * q1, NAN),
        even=np.where(mirror, 0.8 * dl, NAN),
        nll=100.0,
        tokens=511,
    )


def test_rho_rows_are_the_stats_module_spearman():
    data = _theorem_a_data()
    rows, rho = p3.rho_rows(data.bits, data.delta_loss, data.predictors, draws=300)
    assert len(rows) == 9 and rows[0]["bits"] == 3.0 and rows[0]["predictor"] == "Q1"
    at = data.bits == 4.0
    expected = spearman(data.delta_loss[at], data.q1[at], draws=300)
    assert rho[(4.0, "Q1")] == expected and rows[3]["paper"] == pv.PAPER3["theorem_a_rho_llama"]
    assert data.configs_per_bits == 12


def test_theorem_a_verdicts_reach_every_outcome():
    rho = {
        (4.0, "Q1"): Estimate(0.7, 0.6, 0.8, n=50),  # inside [0.56, 0.86]
        (4.0, "tr(MΣ)"): Estimate(-0.2, -0.4, 0.0, n=50),  # below [0.24, 0.54]
        (4.0, "tr(Σ)"): Estimate(0.4, 0.1, 0.7, n=50),  # crosses
        (3.0, "Q1"): Estimate(0.1, -0.1, 0.3, n=50),
    }
    share, drift = Estimate(36.0, 31.0, 40.0, 1.0, 50), Estimate(3.0, 2.0, 4.0, 1.0, 50)
    verdicts = {v.claim.id: v for v in p3.theorem_a_verdicts(rho, share, drift, MODEL)}
    assert set(verdicts) == {c.id for c in claims_of_page(p3.PAGE_THEOREM_A)}
    assert verdicts["III.theorem_a.Q1"].outcome == "reproduced"
    assert verdicts["III.theorem_a.tr(MΣ)"].outcome == "differs"
    assert verdicts["III.theorem_a.tr(Σ)"].outcome == "inconclusive"
    assert verdicts["III.theorem_a.Q1.3b"].outcome == "differs"
    assert verdicts["III.theorem_a.Q1.5b"].outcome == "inconclusive"  # no 5-bit configurations in this build
    assert verdicts["III.k_path_share"].outcome == "reproduced" and verdicts["III.bias_drift"].outcome == "differs"
    for qwen in ("III.theorem_a.qwen", "III.k_path_share.qwen", "III.bias_drift.qwen"):
        assert verdicts[qwen].outcome == "not run here" and "--model Qwen/Qwen2.5-7B" in verdicts[qwen].why
    # on Qwen itself the Qwen claims are judged
    on_qwen = {v.claim.id: v for v in p3.theorem_a_verdicts(rho, share, drift, "Qwen/Qwen2.5-7B")}
    assert on_qwen["III.theorem_a.qwen"].outcome == "differs" and on_qwen["III.k_path_share.qwen"].outcome == "differs"
    text = p3.theorem_a_finding(list(verdicts.values()))
    assert text.startswith("At 4 bits the Spearman ρ of ΔL is with Q1 0.70 [0.60, 0.80] (paper 0.71: reproduced)")
    assert "Over every bit width shown the ρ claims are" in text


def test_taylor_and_shares():
    data = _theorem_a_data()
    rows = p3.taylor_rows(data.bits, data.delta_loss, data.q1, data.nll, data.mirror, data.odd, data.even)
    assert [r["bits"] for r in rows] == [3.0, 4.0, 5.0] and rows[0]["n_mirror"] == 3
    assert rows[0]["odd_minus_q1"] == pytest.approx(0.05) and rows[0]["even_over_dl"] == pytest.approx(0.8)
    text = p3.taylor_reading(rows)
    assert "the first-order term is the smaller part of ΔL" in text and "as the identity says" in text
    larger = [dict(r, q1_over_dl=0.9, odd_minus_q1=0.5, spread_ratio=2.0) for r in rows]
    text = p3.taylor_reading(larger)
    assert "larger part" in text and "third-order term is not small" in text and "blurs any ranking" in text
    mixed = [dict(r, q1_over_dl=q, spread_ratio=s) for r, q, s in zip(rows, (0.2, 0.6, 0.7), (0.5, 2.0, 2.0))]
    text = p3.taylor_reading(mixed)
    assert "depends on the bit width" in text and "only at 3 bits" in text
    shares = p3.share_rows(data.bits, data.families, data.k_share, data.drift)
    assert [(r["bits"], r["family"]) for r in shares][:2] == [(4.0, "E8 + RHT"), (4.0, "scalar block")]
    assert shares[-1]["family"] == "all" and shares[-1]["n_configs"] == 12
    at4 = data.bits == 4.0
    share = p3.config_range(data.k_share[at4])
    assert share.low == pytest.approx(100 * data.k_share[at4].min()) and share.level == 1.0 and share.n == 12
    assert shares[-2]["share_max"] == pytest.approx(share.high)
    values = p3.theorem_a_paper_values(rows, {(3.0, "Q1"): Estimate(0.1, 0, 0.2), (4.0, "Q1"): Estimate(0.3, 0, 1)})
    assert values[2][2] == "0.10 to 0.30 over 2 bit widths" and values[0][1] == "≈ 17%"


def test_theorem_a_data_checks_lengths():
    class Study:
        delta_loss = np.zeros(2)

    with pytest.raises(InputError):
        p3.theorem_a_data([{"bits": 4, "family": "f", "name": "n", "mirror": False}], Study())


# ------------------------------------------------------------------------------------------------ Theorem B
def _real(pos=(1.0, 0.95, 1.05), pred=(1.0, 0.95, 1.05), trials=3, windows=16):
    e = Estimate(1.0, 0.9, 1.1, n=windows)
    return RealPassAdditivity(
        n_trials=trials,
        n_windows=windows,
        n_groups=2,
        increment_trials=trials,
        var_total=1.0,
        var_first_order=1.0,
        sum_var_increments=1.0,
        analytic=1.0,
        analytic_clean=1.0,
        pos_add=Estimate(*pos, n=windows),
        pos_add_direct=e,
        pred=Estimate(*pred, n=windows),
        pred_direct=e,
        var_ratio=Estimate(0.8, 0.7, 0.9, n=windows),
        mean=10.0,
        se=1.0,
        bias=9.0,
        bias_se=0.5,
        corr=0.95,
    )


def _fixed(windows=16):
    e = Estimate(1.0, 0.8, 1.2, n=windows)
    return FixedGradientAdditivity(3, windows, 480, 1.0, 1.0, 1.0, 1.0, e, e, 0.5, 1.0)


def test_theorem_b_rows_verdicts_and_sample_sizes():
    results = {
        "baseline": (_real(), _fixed()),  # reproduced
        "sorted": (_real(pos=(0.7, 0.6, 0.8), pred=(0.95, 0.7, 1.2)), _fixed()),  # differs, inconclusive
        "random 1": (_real(pred=(1.2, 1.05, 1.35)), _fixed()),  # reproduced, inconclusive
    }
    rows = p3.theorem_b_rows(results)
    assert len(rows) == 6 and rows[0]["paper_pos_add"] == "0.975" and rows[4]["paper_pred"] == "0.97–1.08"
    detail = p3.theorem_b_detail_rows(results)
    assert detail[0]["z_x"] == "0.50 (0.02)" and detail[2]["z_x"] == "0.50 (< 0.05)"
    verdicts = {v.claim.id: v for v in p3.theorem_b_verdicts(results)}
    assert [verdicts[f"III.theorem_b.baseline.{s}"].outcome for s in ("pos_add", "pred")] == ["reproduced"] * 2
    assert verdicts["III.theorem_b.sorted.pos_add"].outcome == "differs"
    assert verdicts["III.theorem_b.sorted.pred"].outcome == "inconclusive"
    assert verdicts["III.theorem_b.random.pred"].outcome == "inconclusive"
    assert "3 trials × 16 windows" in verdicts["III.theorem_b.random.pos_add"].ours
    band = CLAIMS["III.theorem_b.sorted.pred"].rule
    # centre 0.95, half-width 0.25, nearest edge 0.05 away: 25 times the sample
    assert p3.decisive_factor(Estimate(0.95, 0.7, 1.2), band) == pytest.approx(25.0)
    assert p3.decisive_factor(Estimate(1.0, 0.95, 1.05), band) == pytest.approx(0.25)
    assert math.isinf(p3.decisive_factor(Estimate(1.1, 1.0, 1.2), band))
    assert math.isnan(p3.decisive_factor(Estimate(NAN, NAN, NAN), band))
    text = p3.theorem_b_finding(results, list(verdicts.values()), 3, 16)
    assert text.startswith("With 3 trials on each of 16 windows, the baseline ordering's real passes")
    assert "varies less than its first-order part" in text and "pred (sorted) about 25×" in text
    assert p3.theorem_b_finding({}, [], 3, 16) == "No ordering was run."
    one = p3.theorem_b_finding({"baseline": (_real(trials=1, windows=1), _fixed(1))}, [], 1, 1)
    assert one.startswith("With 1 trial on each of 1 window,")


# ------------------------------------------------------------------------------------------------ Theorem C
def _psd(d, seed, decay=1.0):
    q = haar_orthogonal(d, seed=seed)
    return q @ np.diag(np.exp(-decay * np.arange(d) / d * 5)) @ q.T


def test_theorem_c_rows_readings_and_verdicts():
    d = 8
    M = np.stack([np.stack([_psd(d, 10 * l + p) for p in range(2)]) for l in range(3)])[:, :, None]  # (3, 2, 1, d, d)
    sigmas = {"codec": np.broadcast_to(0.01 * np.eye(d) + 0.001 * _psd(d, 99), M.shape).copy()}
    sigmas["noise"] = np.broadcast_to(0.01 * np.eye(d) + 1e-5 * _psd(d, 98), M.shape).copy()
    sigmas["exact"] = np.broadcast_to(0.01 * np.eye(d), M.shape).copy()
    study = rotation_study(M, sigmas, eps=0.05, n_rotations=200, seed=1)
    rows = p3.theorem_c_rows(study, sigmas, "noise", ("actual", "rank-1", "near-isotropic"))
    assert [r["source"] for r in rows] == ["paper (Llama-3.1-8B, one head)", "codec", "noise", "exact"]
    assert rows[0]["actual"] == "0.16–0.25" and rows[0]["near-isotropic"] == "0.01" and math.isnan(rows[0]["exact"])
    assert rows[1]["heads"] == 6 and rows[1]["actual"].startswith(f"{rows[1]['actual_median']:.3f} (")
    assert rows[1]["near_isotropic_median"] == pytest.approx(0.05 * rows[1]["actual_median"], rel=1e-9)
    assert rows[3]["actual_median"] == pytest.approx(0.0, abs=1e-12)  # Σ = s²I: no rotation moves the risk
    assert rows[2]["anisotropy"] == pytest.approx(1.0) and rows[1]["anisotropy"] > 10 and rows[3]["anisotropy"] == 0
    text = p3.theorem_c_reading(study, "codec", 0.05)
    assert text.startswith("The near-isotropic row is 0.0500 times the actual one") and "200 draws" in text
    assert p3.median_anisotropy_head(M[:, 0]) in {(layer, 0) for layer in range(3)}
    with pytest.raises(InputError):
        p3.median_anisotropy_head(M[0, 0, 0])
    estimate = head_median(study[("actual", "codec")].range_iso, draws=300)
    assert estimate.n == 6 and estimate.value == pytest.approx(np.median(study[("actual", "codec")].range_iso))
    gaps = {(4.0, "top"): Estimate(2.0, 1.0, 3.0), (4.0, "bottom"): Estimate(0.5, -0.2, 1.0)}
    ranges = {"actual": Estimate(0.2, 0.18, 0.22, n=180), "rank-1": Estimate(0.5, 0.4, 0.6, n=180)}
    verdicts = {v.claim.id: v for v in p3.theorem_c_verdicts(ranges, gaps, MODEL)}
    assert set(verdicts) == {c.id for c in claims_of_page(p3.PAGE_THEOREM_C)}
    assert verdicts["III.theorem_c.actual"].outcome == "reproduced"
    assert verdicts["III.theorem_c.rank-1"].outcome == "differs"
    assert verdicts["III.theorem_c.top"].outcome == "reproduced"
    assert verdicts["III.theorem_c.bottom"].outcome == "inconclusive"
    assert verdicts["III.theorem_c.actual.qwen"].outcome == "not run here"
    assert p3.theorem_c_verdicts(ranges, gaps, MODEL, bits=3.0)[4].outcome == "inconclusive"
    finding = p3.theorem_c_finding(list(verdicts.values()))
    assert finding.startswith("Range/iso with the actual M: 0.200 [0.180, 0.220] (median of 180 heads) (reproduced)")
    assert p3.theorem_c_finding([]) == "No claim was judged."


def test_end_to_end_rows_pair_every_shape_with_isotropic_error():
    rng = np.random.default_rng(3)
    tokens = tuple([100] * 10)
    base = rng.uniform(300, 400, 10)

    def result(rate):
        nll = base + rate * 100 + rng.normal(0, 0.5, 10)
        return PerplexityResult(float(nll.sum()), 1000, tuple(nll), tokens)

    clean = PerplexityResult(float(base.sum()), 1000, tuple(base), tokens)
    results = {
        4.0: {"isotropic": result(0.02), "top": result(0.08), "bottom": result(0.01), "E8 (no RHT)": result(0.02)}
    }
    rows, gaps = p3.end_to_end_rows(
        results, {4.0: 0.003}, {"top": 4.0, "bottom": 0.2, "isotropic": 1.0}, clean, draws=500
    )
    assert [r["error"] for r in rows] == ["isotropic", "top", "bottom", "E8 (no RHT)"] and rows[0]["gap"] == "—"
    assert set(gaps) == {(4.0, "top"), (4.0, "bottom"), (4.0, "E8 (no RHT)")}
    assert gaps[(4.0, "top")].low > 0 and gaps[(4.0, "bottom")].high < 0
    assert math.isnan(rows[3]["predicted"]) and rows[1]["predicted"] == 4.0
    text = p3.end_to_end_reading(gaps, {"top": 4.0, "bottom": 0.2})
    assert text.startswith("At the E8 codec's 4-bit MSE, ΔPPL minus isotropic error's: top ")
    assert "(risk 4.00× isotropic's) and bottom" in text


# ------------------------------------------------------------------------------------------------ paper values
def _numbers(value) -> list[str]:
    if isinstance(value, dict):
        return [n for v in value.values() for n in _numbers(v)]
    if isinstance(value, tuple):
        return [n for v in value for n in _numbers(v)]
    return [f"{value:g}"]


def test_every_paper3_value_is_shown_beside_ours():
    """Each number of PAPER3, PAPER3_RANGES (Paper III's), PAPER3_THEOREM_B, PAPER3_THEOREM_B_RANDOM_Z_MAX and
    PAPER3_QWEN appears in what the chapter shows: its claims' paper values (criteria and verdict tables), the
    paper-value table, the Theorem B and C tables' paper columns and the glued sentences."""
    shown = [c.paper_value for c in CLAIMS.values() if c.paper == "III"]
    shown += [p for _, p, _ in p3.theorem_a_paper_values([], {})]
    results = {m: (_real(), _fixed()) for m in ("baseline", "sorted", "random")}
    shown += [r["paper_pos_add"] + " " + r["paper_pred"] for r in p3.theorem_b_rows(results)]
    shown += [r["z_x"] for r in p3.theorem_b_detail_rows(results)]
    shown += [p3._paper_c(m) for m in ("actual", "rank-1", "near-isotropic")]
    shown += [p3.near_isotropic_paper_values(), p3.permutation_finding([])]
    text = " ".join(shown)
    for table in (pv.PAPER3, pv.PAPER3_RANGES, pv.PAPER3_THEOREM_B, pv.PAPER3_THEOREM_B_RANDOM_Z_MAX, pv.PAPER3_QWEN):
        for number in _numbers(table):
            assert number in text, f"the paper's {number} is shown nowhere on the Paper III pages"


# ------------------------------------------------------------------------------------------------ figures
def test_figures_draw_from_the_rows():
    runs, base, tokens = _puzzle([0.01, 0.02, 0.015], [0.02, 0.03, 0.025])
    rows = p3.permutation_rows(runs)
    figures = [p3fig.permutation_figure(rows)]
    figures.append(p3fig.risk_figure(p3.risk_rows(runs, [1, 2, 1.5, 1, 1.2, 1.1], base, tokens, draws=200)))
    data = _theorem_a_data()
    rho_table, rho = p3.rho_rows(data.bits, data.delta_loss, data.predictors, draws=200)
    figures += [p3fig.rho_figure(rho_table), p3fig.scatter_figure(data, rho), p3fig.taylor_figure(data)]
    results = {m: (_real(), _fixed()) for m in ("baseline", "sorted", "random")}
    figures.append(p3fig.theorem_b_figure(p3.theorem_b_rows(results)))
    figures.append(p3fig.first_order_figure(np.random.default_rng(0).normal(size=(3, 4)), np.ones((3, 4))))
    for fig in figures:
        assert fig.axes and all(ax.has_data() for ax in fig.axes)
        plt.close(fig)
    vals, vecs = np.linalg.eigh(_psd(8, 1))
    png = p3fig.direction_picture(vals[::-1], vecs[:, ::-1], 2, "K, layer 0, head 0")
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    theta = np.linspace(0, 180, 19)
    assert (
        p3fig.rotation_picture(theta, 1 + np.cos(np.radians(theta)) / 2, (0.5, 1.5), 30.0, 0.5, (0.1, 10))[:4]
        == b"\x89PNG"
    )


def test_a_replaced_estimate_changes_the_outcome():
    """No fixed text: the same claim with another estimate gets another verdict."""
    results = {"baseline": (_real(), _fixed())}
    first = p3.theorem_b_verdicts(results)[0]
    moved = {"baseline": (replace(_real(), pos_add=Estimate(1.5, 1.4, 1.6)), _fixed())}
    assert first.outcome == "reproduced" and p3.theorem_b_verdicts(moved)[0].outcome == "differs"


def _ratio(value, low, high, den_low):
    from lqlib.evaluation.stats import RatioEstimate

    return RatioEstimate(value, low, high, 0.95, 10, Estimate(1, 0.5, 1.5), Estimate(0.1, den_low, 0.5))
