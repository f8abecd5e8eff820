"""The reproduction scorecard: every claim of the four papers, the paper's value, ours, a status.

Our values are read from the tables the chapters wrote (CSV); nothing is typed in.
Statuses: "reproduced" (within the stated tolerance), "differs" (with why),
"pending" (the chapter that measures it is not built yet).
"""

from __future__ import annotations

import csv
from pathlib import Path

from . import paper_values as pv

__all__ = ["scorecard"]


def _read(tables: Path, name: str) -> list[dict] | None:
    path = tables / f"{name}.csv"
    if not path.is_file():
        return None
    with path.open() as handle:
        return list(csv.DictReader(handle))


def _status(ok: bool, why: str) -> str:
    return "reproduced" if ok else f"differs: {why}"


def _paper1(tables: Path) -> list[dict]:
    rows = []
    barrier = _read(tables, "scalar_barrier")
    if barrier:
        top = barrier[-1]
        for key, column, label in (
            ("fixed_rate", "fixed_rate_gap", "fixed-rate scalar gap → 2.72"),
            ("cell_shape", "entropy_coded_gap", "entropy-coded scalar gap → 1.42"),
            ("fixed_rate_penalty", "fixed_rate_penalty", "fixed-rate penalty → 1.91"),
        ):
            ours = float(top[column])
            rows.append(
                {
                    "item": f"Fig. 1: {label}",
                    "paper": f"{pv.SCALAR_GAPS[key]:.2f}",
                    "ours": f"{ours:.3f} at b = {top['bits']}",
                    "status": _status(
                        abs(ours / pv.SCALAR_GAPS[key] - 1) < 0.03,
                        "more than 3% off at the largest measured b (a high-rate limit)",
                    ),
                }
            )
    moments = _read(tables, "normalized_second_moments")
    if moments:
        e8 = next(r for r in moments if r["lattice"] == "E8")
        ours = float(e8["G_measured"])
        rows.append(
            {
                "item": "Table 1: G(E8)",
                "paper": f"{pv.TABLE1_G['E8']}",
                "ours": f"{ours:.5f} ± {float(e8['standard_error']):.5f}",
                "status": _status(
                    abs(ours - pv.TABLE1_G["E8"]) < 3 * float(e8["standard_error"]) + 5e-5, "outside 3 standard errors"
                ),
            }
        )
    rht = _read(tables, "rht_ablation")
    if rht:
        ratios = ", ".join(f"{r['source']} {float(r['ratio_equal_rate']):.2f}" for r in rht)
        rows.append(
            {
                "item": "Table 2: RHT ablation",
                "paper": "MSE at a fixed step",
                "ours": f"MSE no-RHT / RHT at equal measured rate: {ratios}",
                "status": "differs: redone at equal measured rate (the paper's fixed-step MSE omits the rate)",
            }
        )
    table3 = _read(tables, "table3_gaussian")
    if table3:
        worst_rate = max(abs(float(r["rate_vs_paper"])) for r in table3)
        gaps = [float(r["gap"]) for r in table3]
        rows.append(
            {
                "item": "Table 3: coded rate (Gaussian)",
                "paper": "2.075 … 6.001",
                "ours": f"{float(table3[0]['coded_bits']):.3f} … {float(table3[-1]['coded_bits']):.3f} "
                f"(max deviation {100 * worst_rate:.2f}%)",
                "status": _status(worst_rate < 0.015, "more than 1.5% from the paper's rate"),
            }
        )
        rows.append(
            {
                "item": "Table 3: gap E8 + EC",
                "paper": f"{pv.TABLE3_GAP}",
                "ours": f"{min(gaps):.4f} … {max(gaps):.4f}",
                "status": _status(all(abs(g / pv.TABLE3_GAP - 1) < 0.005 for g in gaps), "more than 0.5% off"),
            }
        )
    table4 = _read(tables, "table4_real_kv")
    if table4:
        gaps = [float(r["gap_at_target"]) for r in table4]
        lo, hi = pv.TABLE4_GAP_RANGE
        rows.append(
            {
                "item": "Table 4: gap on real KV",
                "paper": f"{lo}–{hi} (Llama-3.2-1B)",
                "ours": f"{min(gaps):.3f}–{max(gaps):.3f} (SmolLM2-135M)",
                "status": _status(
                    min(gaps) > lo - 0.01 and max(gaps) < hi + 0.01, "outside the paper's range ± 0.01 (another model)"
                ),
            }
        )
    table5 = _read(tables, "table5_perplexity")
    if table5:
        four = next((r for r in table5 if r["kv"].endswith("b = 4")), None)
        if four:
            rows.append(
                {
                    "item": "Table 5: PPL increase at 4 bits",
                    "paper": f"{float(four['paper_delta_pct']):.2f}% (Llama-3.1-8B, WikiText-2)",
                    "ours": f"{float(four['delta_pct']):.2f}% (SmolLM2-135M)",
                    "status": "differs: another model and corpus; the trend is compared in the chapter",
                }
            )
    if _read(tables, "table6_memory"):
        rows.append(
            {
                "item": "Table 6: KV memory",
                "paper": "2·L·H·d·T·b/8",
                "ours": "same formula at measured bits/dim",
                "status": "reproduced",
            }
        )
    for row in rows:
        row["paper_id"] = "I"
    return rows


def _paper2(tables: Path) -> list[dict]:
    rows = []
    end = _read(tables, "end_to_end")
    if end:
        fp = end[0]
        four = next((r for r in end if r["kv"].endswith("b = 4")), None)
        if four:
            ratio = float(four["compression"])
            rows.append(
                {
                    "item": "End-to-end: KV compression at 4 bits (real bytes)",
                    "paper": f"{pv.PAPER2_HEADLINE['compression_4b']}×",
                    "ours": f"{ratio:.2f}×",
                    "status": _status(
                        ratio >= 0.9 * pv.PAPER2_HEADLINE["compression_4b"],
                        "the paper's count leaves out side information; ours counts every byte",
                    ),
                }
            )
            rows.append(
                {
                    "item": "End-to-end: PPL increase at 4 bits",
                    "paper": f"+{pv.PAPER2_HEADLINE['ppl_increase_pct_4b']}% (Llama-3.1-8B)",
                    "ours": f"+{float(four['delta_pct']):.2f}% (SmolLM2-135M)",
                    "status": "differs: another model and corpus",
                }
            )
            speed = float(four["tokens_per_s"]) / float(fp["tokens_per_s"])
            paper_speed = pv.PAPER2_HEADLINE["tok_s"] / pv.PAPER2_HEADLINE["fp16_tok_s"]
            rows.append(
                {
                    "item": "Decode speed relative to fp16",
                    "paper": f"{paper_speed:.2f} (GPU)",
                    "ours": f"{speed:.2f} (CPU, real bitstreams)",
                    "status": "differs: CPU entropy decoding of the whole history per step; GPU path pending (issue 5)",
                }
            )
    mse = _read(tables, "mse_vs_turboquant")
    if mse:
        four = next((r for r in mse if r["turbo"].startswith("TurboQuantStyle(4")), None)
        if four and four["mse_ratio"] not in ("", "nan"):
            ratio = float(four["mse_ratio"])
            paper_ratio = pv.PAPER2_MSE["turboquant"] / pv.PAPER2_MSE["latticequant"]
            rows.append(
                {
                    "item": "MSE vs TurboQuant at equal rate",
                    "paper": f"{paper_ratio:.1f}× lower",
                    "ours": f"{ratio:.2f}× lower (real KV, {float(four['bits_per_dim']):.2f} bits/dim)",
                    "status": _status(ratio >= 0.9 * paper_ratio, "less than 90% of the paper's ratio"),
                }
            )
            saved = float(four["bits_saved"])
            rows.append(
                {
                    "item": "Bits saved at equal MSE",
                    "paper": f"{pv.PAPER2_BITS_SAVED}",
                    "ours": f"{saved:.3f}",
                    "status": _status(abs(saved - pv.PAPER2_BITS_SAVED) < 0.1, "more than 0.1 bit/dim off"),
                }
            )
    equal = _read(tables, "equal_rate")
    if equal:
        by = {r["method"]: r for r in equal}
        if "E8 + EC" in by and "TurboQuant-style 4" in by:
            e8, tq = by["E8 + EC"], by["TurboQuant-style 4"]
            ratio = float(e8["ratio"])
            rows.append(
                {
                    "item": "ΔPPL at TurboQuant-style 4-bit rate: E8 + EC at most half of it (our target)",
                    "paper": "E8 better (no PPL given for TurboQuant)",
                    "ours": f"{float(e8['delta_pct']):.2f}% vs {float(tq['delta_pct']):.2f}% at "
                    f"{float(e8['bits_per_dim']):.3f} / {float(tq['bits_per_dim']):.3f} bits/dim: "
                    f"ratio {ratio:.2f} {e8['ci']}",
                    "status": _status(ratio <= 0.5, "E8's increase is more than half of the baseline's"),
                }
            )
    gpu = _read(tables, "gpu_decode")
    paper_ratio = pv.PAPER2_HEADLINE["tok_s"] / pv.PAPER2_HEADLINE["fp16_tok_s"]
    for row in [r for r in gpu or [] if r["ours"] == "eager"]:
        ratio = float(row["ratio"])
        rows.append(
            {
                "item": f"Decode speed vs fp16 cache, {int(row['context']) // 1024}K context (GPU)",
                "paper": f"{pv.PAPER2_HEADLINE['tok_s']:g} vs {pv.PAPER2_HEADLINE['fp16_tok_s']:g} tok/s "
                f"({paper_ratio:.2f}×)",
                "ours": f"{float(row['ours_tok_s']):.1f} vs {float(row['dynamic_tok_s']):.1f} tok/s "
                f"({ratio:.2f}×, {row['card']}, random-weight Llama-3.1-8B)",
                "status": f"differs: {'faster' if ratio >= 1.0 else 'slower'} than the fp16 cache "
                f"(the paper's system ran at {paper_ratio:.2f}×)",
            }
        )
    if not gpu:
        rows.append(
            {
                "item": "Decode speed vs fp16 cache (GPU)",
                "paper": f"{pv.PAPER2_HEADLINE['tok_s']:g} vs {pv.PAPER2_HEADLINE['fp16_tok_s']:g} tok/s",
                "ours": "—",
                "status": "pending: no recorded GPU decode run (results/gpu_decode_*.json)",
            }
        )
    for row in rows:
        row["paper_id"] = "II"
    return rows


def _pending() -> list[dict]:
    """Items no chapter measures yet (none at present)."""
    return []


def _range(key: str) -> str:
    lo, hi = pv.PAPER3_RANGES[key]
    return f"{lo:g}" if lo == hi else f"{lo:g}–{hi:g}"


def _paper3(tables: Path) -> list[dict]:
    rows = []
    puzzle = _read(tables, "permutation_puzzle")
    if puzzle:
        worst = None
        for key in {(r["quantizer"], r["bits"]) for r in puzzle}:
            group = [r for r in puzzle if (r["quantizer"], r["bits"]) == key]
            mse = [float(r["rel_mse"]) for r in group]
            delta = [float(r["delta_pct"]) for r in group]
            ratio = max(delta) / min(delta) if min(delta) > 0 else float("inf")
            if worst is None or ratio > worst[0]:
                worst = (ratio, 100 * (max(mse) / min(mse) - 1), key)
        ratio, mse_spread, (quantizer, bits) = worst
        paper = pv.PAPER3["permutation_ppl_ratio_equal_mse"]
        rows.append(
            {
                "item": "Permutation puzzle: ΔPPL ratio across orderings at nearly equal MSE",
                "paper": f"~{paper:g}× (a proxy whose step ignored the bit width)",
                "ours": f"at most {ratio:.2f}× ({quantizer}, {bits} bits; MSE spread {mse_spread:.1f}%)",
                "status": _status(
                    ratio >= paper / 2, "no large PPL change at nearly equal MSE once the step follows the bit width"
                ),
            }
        )
    rho = _read(tables, "theorem_a_rho")
    if rho:
        for predictor, key in (
            ("Q1", "theorem_a_rho_llama"),
            ("tr(MΣ)", "theorem_a_rho_risk_llama"),
            ("tr(Σ)", "theorem_a_rho_mse_llama"),
        ):
            ours = [r for r in rho if r["predictor"] == predictor]
            if not ours:
                continue
            paper = pv.PAPER3[key]
            text = "; ".join(
                f"{float(r['bits']):g} b: {float(r['rho']):.2f} [{float(r['ci_low']):.2f}, {float(r['ci_high']):.2f}]"
                for r in ours
            )
            inside = all(float(r["ci_low"]) <= paper <= float(r["ci_high"]) for r in ours)
            rows.append(
                {
                    "item": f"Theorem A: Spearman ρ of ΔL vs {predictor}, within one bit width",
                    "paper": f"{paper} (Llama-3.1-8B)",
                    "ours": f"{text} (n = {ours[0]['n_configs']} per bit width)",
                    "status": _status(inside, "the paper's value lies outside our 95% interval at some bit width"),
                }
            )
    additivity = _read(tables, "theorem_b")
    if additivity:
        for r in additivity:
            if r["mode"] != additivity[0]["mode"]:
                continue
            low, high = float(r["pos_add_low"]), float(r["pos_add_high"])
            rows.append(
                {
                    "item": f"Theorem B: pos_add, {r['mode']} ordering, {r['version']}",
                    "paper": f"{pv.PAPER3['theorem_b_pos_add']} (pred {pv.PAPER3['theorem_b_pred']})",
                    "ours": f"{float(r['pos_add']):.3f} [{low:.3f}, {high:.3f}], pred {float(r['pred']):.3f} "
                    f"[{float(r['pred_low']):.3f}, {float(r['pred_high']):.3f}], N = {r['n_trials']}",
                    "status": _status(low <= 1.0 <= high, "additivity (pos_add = 1) lies outside our 95% interval"),
                }
            )
    isotropy = _read(tables, "theorem_c")
    if isotropy:
        source = isotropy[0]["sigma_source"]
        for m_type, key in (
            ("actual", "theorem_c_actual"),
            ("rank-1", "theorem_c_rank1"),
            ("near-isotropic", "theorem_c_near_isotropic"),
        ):
            r = next((r for r in isotropy if r["m_type"] == m_type and r["sigma_source"] == source), None)
            if r is None:
                continue
            lo, hi = pv.PAPER3_RANGES[key]
            median = float(r["range_iso_median"])
            rows.append(
                {
                    "item": f"Theorem C: range/iso over random rotations, M {m_type}",
                    "paper": f"{_range(key)} (Llama-3.1-8B, one head)",
                    "ours": f"median {median:.3f} [5–95%: {float(r['range_iso_p05']):.3f}–"
                    f"{float(r['range_iso_p95']):.3f}] over {r['heads']} heads; exact range over all "
                    f"rotations {float(r['exact_range_iso_median']):.3f} (Σ: {source})",
                    "status": _status(
                        lo - 0.01 <= median <= hi + 0.01,
                        "our median over all heads lies outside the paper's range ± 0.01",
                    ),
                }
            )
    for row in rows:
        row["paper_id"] = "III"
    return rows


def _paper4(tables: Path) -> list[dict]:
    rows = []
    am_gm = _read(tables, "am_gm")
    if am_gm:
        ours = float(am_gm[0]["am_gm"])
        rows.append(
            {
                "item": "AM/GM of layer × {K, V} sensitivities",
                "paper": f"Llama-3.1-8B {pv.PAPER4['am_gm_llama']}, Qwen2.5-7B {pv.PAPER4['am_gm_qwen']}",
                "ours": f"{ours:.3f} (SmolLM2-135M)",
                "status": "differs: another model",
            }
        )
    allocation = _read(tables, "allocation")
    if allocation:
        by = {r["method"]: r for r in allocation}
        top = max(float(r["budget"]) for r in allocation[1:])
        opt, uni = by.get(f"optimal {top:g}"), by.get(f"uniform {top:g}")
        if opt and uni:
            ratio = float(opt["ratio"])
            rows.append(
                {
                    "item": f"Optimal vs uniform allocation at {top:g} measured bits (ours: ΔPPL ratio ≤ 0.6)",
                    "paper": f"Qwen2.5-7B PPL {pv.PAPER4['qwen_uniform_4b']:.0f} → {pv.PAPER4['qwen_optimal_4b']:.0f}",
                    "ours": f"+{float(uni['delta_pct']):.2f}% → +{float(opt['delta_pct']):.2f}%: ratio {ratio:.2f} "
                    f"{opt['ci']}",
                    "status": _status(ratio <= 0.6, "the allocated schedule's increase is above 0.6 of uniform's"),
                }
            )
    for row in rows:
        row["paper_id"] = "IV"
    return rows


def scorecard(
    paper1_tables: str | Path,
    paper2_tables: str | Path | None = None,
    paper4_tables: str | Path | None = None,
    paper3_tables: str | Path | None = None,
) -> list[dict]:
    """All scorecard rows: Papers I–IV from the chapters' CSV tables, then pending items."""
    rows = _paper1(Path(paper1_tables))
    if not rows:
        raise FileNotFoundError(f"no Paper I tables in {paper1_tables}: run the Paper I notebooks first")
    if paper2_tables is not None:
        rows += _paper2(Path(paper2_tables))
    if paper3_tables is not None:
        rows += _paper3(Path(paper3_tables))
    if paper4_tables is not None:
        rows += _paper4(Path(paper4_tables))
    return rows + _pending()
