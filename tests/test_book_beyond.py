"""The book's reading of the recorded quality sweep."""

import json

import pytest

from lqlib.alloc.beyond import FULL, target_verdicts
from lqlib.book.beyond import curve_series, load_sweep, sweep_rows, verdict_text


def row(method, bits, delta, part="curve", low=None, high=None):
    return {
        "part": part,
        "method": method,
        "budget": bits,
        "bits_heldout": bits,
        "delta_pct": delta,
        "low": delta - 0.5 if low is None else low,
        "high": delta + 0.5 if high is None else high,
    }


def test_newest_sweep_is_read(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_sweep(tmp_path)
    for date, value in (("2026-12-01", 1), ("2026-12-06", 2)):
        (tmp_path / f"quality_sweep_{date}.json").write_text(json.dumps({"date": date, "rows": [], "v": value}))
    (tmp_path / "quality_sweep_log.jsonl").write_text("not json")
    assert load_sweep(tmp_path)["v"] == 2


def test_curve_series_and_rows():
    rows = [row(FULL, 4.0, 1.0), row(FULL, 3.0, 3.0), row("KIVI-style", 4.25, 9.0), row("unknown", 4.0, 1.0)]
    rows.append({**row("uniform E8 + RHT", 4.0, 2.0), "bits_heldout": float("nan")})
    series = curve_series(rows)
    assert list(series) == [FULL, "KIVI-style"]
    assert [p[0] for p in series[FULL]] == [3.0, 4.0]
    record = {"rows": rows + [row(FULL, 4.0, 1.0, part="ablation")]}
    assert len(sweep_rows(record, "ablation")) == 1 and len(sweep_rows(record, "curve")) == 5


def test_verdict_text_states_the_numbers():
    rows = [row(FULL, 4.2, 1.2, part="ablation", high=1.6), row(FULL, 3.2, 2.0, part="ablation", high=3.0)]
    text = verdict_text(target_verdicts(rows))
    assert "≤ +1.5% at ≤ 4.25 bits/dim met: +1.20%" in text and "is not within" in text
    assert "≤ +8% at ≤ 3.25 bits/dim met: +2.00%" in text and "is also within" in text
    assert "no calibrated run" in verdict_text(target_verdicts([row(FULL, 4.3, 1.0, part="ablation")]))


def test_curve_figure_draws_one_line_per_family_with_its_intervals():
    from lqlib.book.beyond import curve_figure

    series = curve_series([row(FULL, 4.0, 1.0), row(FULL, 3.0, 3.0, low=2.0, high=4.5), row("KIVI-style", 4.25, 9.0)])
    ax = curve_figure(series).axes[0]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == [FULL, "KIVI-style"]
    assert list(ax.lines[0].get_xdata()) == [3.0, 4.0] and list(ax.lines[0].get_ydata()) == [3.0, 1.0]
    assert ax.get_yscale() == "log"
