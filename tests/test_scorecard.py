"""The scorecard reads the chapters' tables: statuses follow the measured numbers."""

from lqlib.scorecard import _paper2, _paper4
from lqlib.tables import write_table


def test_paper4_rows_follow_the_allocation_table(tmp_path):
    write_table([{"slots": "layer × {K, V}", "n": 60, "am_gm": 1.62}], tmp_path / "am_gm", {"slots": "slots"})
    rows = [{"method": "full precision", "budget": 16.0, "delta_pct": 0.0, "ratio": "nan", "ci": ""},
            {"method": "uniform 4", "budget": 4.0, "delta_pct": 5.0, "ratio": 1.0, "ci": ""},
            {"method": "optimal 4", "budget": 4.0, "delta_pct": 2.0, "ratio": 0.4, "ci": "[0.3, 0.5]"}]
    write_table(rows, tmp_path / "allocation", {"method": "method"})
    out = _paper4(tmp_path)
    assert [r["paper_id"] for r in out] == ["IV", "IV"]
    assert "1.620" in out[0]["ours"] and out[1]["status"] == "reproduced" and "0.40 [0.3, 0.5]" in out[1]["ours"]
    rows[2]["ratio"] = 0.7
    write_table(rows, tmp_path / "allocation", {"method": "method"})
    assert _paper4(tmp_path)[1]["status"].startswith("differs")


def test_paper2_equal_rate_row(tmp_path):
    rows = [{"method": "full precision", "bits_per_dim": 16, "delta_pct": 0.0, "ratio": "nan", "ci": ""},
            {"method": "TurboQuant-style 4", "bits_per_dim": 4.25, "delta_pct": 7.6, "ratio": 1.0, "ci": ""},
            {"method": "E8 + EC", "bits_per_dim": 4.249, "delta_pct": 3.3, "ratio": 0.43, "ci": "[0.37, 0.49]"}]
    write_table(rows, tmp_path / "equal_rate", {"method": "method"})
    (row,) = _paper2(tmp_path)
    assert row["status"] == "reproduced" and "ratio 0.43 [0.37, 0.49]" in row["ours"]
