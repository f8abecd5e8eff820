"""The scorecard reads the chapters' tables: statuses follow the measured numbers."""

from lqlib.book.scorecard import _paper2, _paper3, _paper4
from lqlib.book.tables import write_table


def test_paper4_rows_follow_the_allocation_table(tmp_path):
    write_table([{"slots": "layer × {K, V}", "n": 60, "am_gm": 1.62}], tmp_path / "am_gm", {"slots": "slots"})
    rows = [
        {"method": "full precision", "budget": 16.0, "delta_pct": 0.0, "ratio": "nan", "ci": ""},
        {"method": "uniform 4", "budget": 4.0, "delta_pct": 5.0, "ratio": 1.0, "ci": ""},
        {"method": "optimal 4", "budget": 4.0, "delta_pct": 2.0, "ratio": 0.4, "ci": "[0.3, 0.5]"},
    ]
    write_table(rows, tmp_path / "allocation", {"method": "method"})
    out = _paper4(tmp_path)
    assert [r["paper_id"] for r in out] == ["IV", "IV"]
    assert "1.620" in out[0]["ours"] and out[1]["status"] == "reproduced" and "0.40 [0.3, 0.5]" in out[1]["ours"]
    rows[2]["ratio"] = 0.7
    write_table(rows, tmp_path / "allocation", {"method": "method"})
    assert _paper4(tmp_path)[1]["status"].startswith("differs")


def test_paper2_equal_rate_row(tmp_path):
    rows = [
        {"method": "full precision", "bits_per_dim": 16, "delta_pct": 0.0, "ratio": "nan", "ci": ""},
        {"method": "TurboQuant-style 4", "bits_per_dim": 4.25, "delta_pct": 7.6, "ratio": 1.0, "ci": ""},
        {"method": "E8 + EC", "bits_per_dim": 4.249, "delta_pct": 3.3, "ratio": 0.43, "ci": "[0.37, 0.49]"},
    ]
    write_table(rows, tmp_path / "equal_rate", {"method": "method"})
    row, gpu = _paper2(tmp_path)
    assert row["status"] == "reproduced" and "ratio 0.43 [0.37, 0.49]" in row["ours"]
    assert gpu["status"].startswith("pending")


def test_paper2_gpu_decode_rows(tmp_path):
    rows = [
        {
            "card": "H100, 2026-11-28",
            "context": 8192,
            "ours": ours,
            "dynamic_tok_s": 20.0,
            "ours_tok_s": tok,
            "ratio": tok / 20.0,
        }
        for ours, tok in (("eager", 18.0), ("CUDA graphs", 30.0))
    ]
    write_table(rows, tmp_path / "gpu_decode", {"card": "card"})
    (row,) = _paper2(tmp_path)
    assert "18.0 vs 20.0 tok/s (0.90×" in row["ours"] and "8K" in row["item"]
    assert row["status"].startswith("differs: slower") and "0.52×" in row["status"]


def test_paper3_rows_follow_the_chapter_tables(tmp_path):
    puzzle = [
        {
            "quantizer": "scalar",
            "bits": 4,
            "ordering": o,
            "seed": 0,
            "rel_mse": m,
            "delta_pct": d,
            "ci_low": 0,
            "ci_high": 0,
        }
        for o, m, d in (("identity", 0.010, 4.0), ("sorted", 0.0102, 6.0))
    ]
    write_table(puzzle, tmp_path / "permutation_puzzle", {"ordering": "ordering"})
    rho = [
        {"bits": b, "predictor": p, "rho": 0.3, "ci_low": 0.1, "ci_high": 0.5, "n_configs": 50}
        for b in (3, 4)
        for p in ("Q1", "tr(MΣ)", "tr(Σ)")
    ]
    write_table(rho, tmp_path / "theorem_a_rho", {"bits": "bits"})
    additivity = [
        {
            "mode": "baseline",
            "version": v,
            "n_trials": 100,
            "pos_add": 1.01,
            "pos_add_low": 0.9,
            "pos_add_high": 1.1,
            "pred": 0.98,
            "pred_low": 0.9,
            "pred_high": 1.05,
            "mean_z": 0.1,
        }
        for v in ("real passes", "fixed gradient")
    ]
    additivity.append(dict(additivity[0], mode="sorted", pos_add_low=1.2))
    write_table(additivity, tmp_path / "theorem_b", {"mode": "mode"})
    isotropy = [
        {
            "m_type": m,
            "sigma_source": "E8",
            "heads": 180,
            "range_iso_median": v,
            "range_iso_p05": v / 2,
            "range_iso_p95": 2 * v,
            "exact_range_iso_median": 2 * v,
        }
        for m, v in (("actual", 0.2), ("rank-1", 0.5), ("near-isotropic", 0.01))
    ]
    write_table(isotropy, tmp_path / "theorem_c", {"m_type": "M"})
    out = _paper3(tmp_path)
    assert {r["paper_id"] for r in out} == {"III"} and len(out) == 1 + 3 + 2 + 3
    assert out[0]["status"].startswith("differs") and "1.50×" in out[0]["ours"]
    assert [r["status"].split(":")[0] for r in out[1:4]] == ["differs", "reproduced", "reproduced"]  # 0.71, 0.39, 0.43
    assert [r["status"] for r in out[4:6]] == ["reproduced", "reproduced"]  # baseline rows only
    assert [r["status"].split(":")[0] for r in out[6:]] == ["reproduced", "differs", "reproduced"]
    rho[0]["ci_high"] = 0.8
    rho[3]["ci_high"] = 0.8
    write_table(rho, tmp_path / "theorem_a_rho", {"bits": "bits"})
    assert _paper3(tmp_path)[1]["status"] == "reproduced"


def test_markdown_table_keeps_pipes_inside_their_cells():
    from markdown_it import MarkdownIt

    from lqlib.book.tables import markdown_table

    text = markdown_table([{"mode": "a|b", "z": 0.5}], {"mode": "mode", "z": "E[X] |z|"})
    tokens = MarkdownIt("commonmark").enable("table").parse(text)
    headers = [t for t in tokens if t.type == "th_open"]
    cells = [tokens[i + 1].content for i, t in enumerate(tokens) if t.type in ("th_open", "td_open")]
    assert len(headers) == 2
    assert cells == ["mode", "E[X] |z|", "a|b", "0.5000"]
