"""The book's reading of the recorded GPU benchmark files."""

import json
from pathlib import Path

import pytest

from lqlib.book import gpu_results as g

RESULTS = Path(__file__).resolve().parents[1] / "results"


def test_recorded_runs_give_consistent_rows():
    for row in g.decode_rows(g.load_results(RESULTS, "gpu_decode")):
        assert row["ratio"] == pytest.approx(row["ours_tok_s"] / row["dynamic_tok_s"], rel=1e-12)
        assert row["kv_mib_ours"] < row["kv_mib_dynamic"]
    for row in g.attention_rows(g.load_results(RESULTS, "gpu_attention")):
        assert row["speedup"] == pytest.approx(row["baseline_ms"] / row["fused_ms"], rel=1e-9)
    for row in g.codec_rows(g.load_results(RESULTS, "gpu_codec")):
        assert row["fraction_of_copy"] == pytest.approx(row["GB_per_s"] / row["copy_GB_per_s"], rel=1e-9)
    assert all(row["exact"] for row in g.rans_rows(g.load_results(RESULTS, "gpu_rans")))
    for row in g.rans_rate_rows(g.load_results(RESULTS, "gpu_rans")):
        assert row["overhead"] == pytest.approx(row["bits_per_dim"] - row["constriction_bits_per_dim"], abs=1e-9)


def test_smoke_runs_are_left_out_and_missing_runs_raise(tmp_path):
    run = json.loads(next(RESULTS.glob("gpu_decode_*.json")).read_text())
    (tmp_path / "gpu_decode_cpu_2026-01-01.json").write_text(json.dumps({**run, "smoke": True}))
    with pytest.raises(FileNotFoundError, match="gpu_decode"):
        g.load_results(tmp_path, "gpu_decode")
    (tmp_path / "gpu_decode_x_2026-01-02.json").write_text(json.dumps(run))
    assert len(g.load_results(tmp_path, "gpu_decode")) == 1
    other = {**run, "benchmark": "benchmarks/gpu_decode_other.py"}  # another benchmark sharing the prefix
    (tmp_path / "gpu_decode_other_x_2026-01-03.json").write_text(json.dumps(other))
    assert len(g.load_results(tmp_path, "gpu_decode")) == 1
    assert len(g.load_results(tmp_path, "gpu_decode_other")) == 1


def test_step_profile_categories_add_up_to_the_kernel_time():
    assert g.kernel_category("nested_attention_kernel") == "attention"
    assert g.kernel_category("void cublasLt::splitKreduce_kernel") == "weight GEMMs"
    assert g.kernel_category("nested_quantize_kernel") == "KV quantize"
    assert g.kernel_category("combine_unrotate_kernel") == g.kernel_category("combine_splits_kernel") == "split combine"
    assert g.kernel_category("void at::native::index_elementwise_kernel") == "KV copy"
    assert g.kernel_category("triton_red_fused_rms_norm") == "other"
    runs = g.load_results(RESULTS, "gpu_step_profile")
    rows = g.decode_profile_rows(runs)
    assert len(rows) == sum(len(run["caches"]) for run in runs)
    parts = [f"{c}_ms" for c, _ in g.KERNEL_CATEGORIES] + ["other_ms"]
    for r in rows:
        assert sum(r[p] for p in parts) == pytest.approx(r["kernel_ms"], rel=1e-9)
        assert r["card"] and r["code"]
    # the fp16 baseline quantizes nothing; the coded caches copy no float16 K/V
    assert all(r["KV quantize_ms"] == 0 for r in rows if r["cache"].startswith("static"))
    assert all(r["KV quantize_ms"] > 0 for r in rows if r["cache"] in ("nested_graph", "int8_graph"))


def test_decode_speed_estimate_is_the_summary_ratio_within_the_block_range():
    for run in g.load_results(RESULTS, "gpu_decode"):
        for s in run["summary"]:
            est = g.decode_speed_estimate(run, s["context"], s["cache"])
            assert est.value == pytest.approx(s["ratio"], rel=1e-9)  # tokens/s ratio = block-time ratio
            assert est.low <= est.value <= est.high
    fake = {
        "rows": [
            {"cache": "dynamic", "context": 8, "block_ms": [4.0, 6.0], "median_block_ms": 5.0},
            {"cache": "device", "context": 8, "block_ms": [2.0, 3.0], "median_block_ms": 2.5},
        ]
    }
    est = g.decode_speed_estimate(fake, 8)
    assert (est.value, est.low, est.high) == (2.0, 4.0 / 3.0, 3.0)
    with pytest.raises(KeyError):
        g.decode_speed_estimate(fake, 16)


def test_speed_verdict_takes_every_value_and_the_decode_rows_use_the_block_range():
    assert g.speed_verdict(1.02, 1.05, 1.0) == "met"
    assert g.speed_verdict(0.97, 0.99, 1.0) == "not met"
    assert g.speed_verdict(0.98, 1.01, 1.0) == "inconclusive"
    assert g.speed_verdict(None, None, 1.0) == g.speed_verdict(0.9, 1.1, None) == "—"
    runs = g.fair_decode_runs(g.nested_runs(RESULTS, "gpu_nested_decode"))
    rows = [r for r in g.nested_decode_rows(runs) if r["cache"] == "nested_graph" and r["baseline"]]
    assert rows
    for r in rows:
        assert r["vs_fp16_low"] <= r["vs_fp16"] <= r["vs_fp16_high"]
        assert r["target"] == ({1: 1.0, 8: 1.5}[r["batch"]] if r["context"] == 32768 else None)
    for s in g.nested_decode_summary(g.nested_decode_rows(runs)):
        if s["nested_graph_ms"] is not None:
            r = next(x for x in rows if (x["run"], x["context"], x["batch"]) == (s["run"], s["context"], s["batch"]))
            assert s["verdict"] == g.speed_verdict(r["vs_fp16_low"], r["vs_fp16_high"], r["target"])


def test_a_run_label_names_the_kernel_choices_turned_on():
    run = {"date": "2026-12-06T17:30:00+00:00"}
    assert g._run_label(run) == "2026-12-06 17:30"
    assert g._run_label({**run, "lean_pairs": True}) == "2026-12-06 17:30 (lean words)"
    flags = {"LEAN_PAIRS": False, "UNROTATE_IN_COMBINE": True, "ROTATE_QUERIES_IN_REGISTERS": True}
    label = g._run_label({**run, "lean_pairs": False, "nested_flags": flags})
    assert label == "2026-12-06 17:30 (V in merge, Q by butterflies)"
    label = g._run_label({**run, "nested_flags": {"KEYS_AS_A": True}, "nested_search": 1})
    assert label == "2026-12-06 17:30 (keys as A, step search 1)"


def test_the_newest_run_of_each_shape_is_split_from_the_earlier_ones():
    rows = [
        {"card": "A, 2026-12-06", "run": "2026-12-06 14:32", "batch": 1, "x": 1},
        {"card": "A, 2026-12-06", "run": "2026-12-06 14:32", "batch": 8, "x": 2},
        {"card": "A, 2026-12-06", "run": "2026-12-06 17:00 (lean decoding)", "batch": 1, "x": 3},
        {"card": "B, 2026-11-28", "run": "2026-11-28 09:00", "batch": 1, "x": 4},
        {"card": "A, 2026-12-06", "run": "2026-12-06 17:46", "batch": 1, "x": 5},
    ]
    newest, earlier = g.split_newest_run(rows, ("batch",))
    assert [r["x"] for r in newest] == [2, 4, 5] and [r["x"] for r in earlier] == [1, 3]
    assert g.split_newest_run([], ("batch",)) == ([], [])
    runs = g.nested_runs(RESULTS, "gpu_nested")
    for rows, keys in (
        (g.nested_kernel_rows(runs), ("kernel", "launch")),
        (g.nested_attention_rows(runs), ("batch", "context")),
        (
            g.nested_decode_summary(
                g.nested_decode_rows(g.fair_decode_runs(g.nested_runs(RESULTS, "gpu_nested_decode")))
            ),
            ("context", "batch"),
        ),
    ):
        newest, earlier = g.split_newest_run(rows, keys)
        assert newest and len(newest) + len(earlier) == len(rows)
        shapes = [(r["card"], *(r[k] for k in keys)) for r in newest]
        assert len(shapes) == len(set(shapes))  # one row a shape


def test_profile_bars_put_earlier_nested_runs_before_the_newest_run_of_each_batch():
    rows = g.decode_profile_rows(g.load_results(RESULTS, "gpu_step_profile"))
    bars, labels = g.profile_bars(rows)
    assert len(bars) == len(labels) == len(set(labels))
    newest = [b for b, label in zip(bars, labels) if "," not in label]
    assert {(b["batch"], b["cache"]) for b in newest} == {(r["batch"], r["cache"]) for r in rows}
    for b in newest:  # each the newest run of its batch and cache
        assert b["run"] == max(r["run"] for r in rows if (r["batch"], r["cache"]) == (b["batch"], b["cache"]))
    earlier = [b for b in bars if b not in newest]
    assert all(b["cache"] == "nested_graph" for b in earlier) and len(bars) == len(newest) + len(earlier)


def test_variant_rows_are_ratios_within_one_run():
    runs = g.load_results(RESULTS, "gpu_nested_variants")
    rows = g.nested_variant_rows(runs)
    assert len(rows) == sum(len(run["rows"]) * len(run["variants"]) for run in runs)
    for r in rows:
        src = next(
            x
            for run in runs
            for x in run["rows"]
            if g._run_label(run) == r["run"] and (x["context"], x["batch"]) == (r["context"], r["batch"])
        )
        assert r["vs_sdpa"] == pytest.approx(src["sdpa ms"] / r["ms"], rel=1e-12)
        first = next(x for x in rows if (x["run"], x["context"], x["batch"]) == (r["run"], r["context"], r["batch"]))
        assert r["vs_first"] == pytest.approx(first["ms"] / r["ms"], rel=1e-12)
        assert r["max_rel_diff"] is None or r["max_rel_diff"] < 2e-3  # the same attention, summation order aside


def test_a_quantize_only_nested_run_gives_kernel_rows_and_no_attention_rows():
    run = next(r for r in g.nested_runs(RESULTS, "gpu_nested") if "attention_summary" in r)
    quantize_only = {k: v for k, v in run.items() if k not in ("attention", "attention_summary")}
    assert len(g.nested_kernel_rows([quantize_only])) == len(run["quantize"])
    assert g.nested_attention_rows([quantize_only]) == [] and g.nested_layout_gain([quantize_only]) == []
    assert len(g.nested_attention_rows([run, quantize_only])) == len(run["attention_summary"])


def test_step_search_rows_pair_each_searched_run_with_the_newest_plain_one():
    runs = g.fair_decode_runs(g.nested_runs(RESULTS, "gpu_nested_decode"))
    plain = max((r for r in runs if not r.get("nested_search")), key=lambda r: r["date"])
    searched = {**plain, "date": "2999-01-01T00:00+00:00", "nested_search": 1}
    searched["rows"] = [
        {**r, "ms_per_step": 2 * r["ms_per_step"], "block_ms": [2 * x for x in r["block_ms"]]}
        if r["cache"] == "nested_graph" and "ms_per_step" in r
        else r
        for r in plain["rows"]
    ]
    rows = g.step_search_rows([plain, searched])
    timed = [r for r in plain["rows"] if r["cache"] == "nested_graph" and "ms_per_step" in r]
    assert len(rows) == len(timed) > 0
    for row in rows:
        assert row["search"] == 1 and row["searched_ms"] == pytest.approx(2 * row["plain_ms"], rel=1e-12)
        assert row["step_cost_ms"] == pytest.approx(row["plain_ms"], rel=1e-12)
        assert row["searched_vs_fp16"] == pytest.approx(row["plain_vs_fp16"] / 2, rel=1e-12)
        assert "step search 1" in row["searched_run"] and "step search" not in row["plain_run"]
    other_flags = {**searched, "nested_flags": {"KEYS_AS_A": True}}
    assert g.step_search_rows([plain, other_flags]) == [] and g.step_search_rows([plain]) == []


def test_search_quantize_cost_compares_the_fastest_launches_of_one_run():
    rows = g.nested_kernel_rows(g.nested_runs(RESULTS, "gpu_nested"))
    costs = g.search_quantize_cost(rows)
    assert costs, "the recorded runs hold a quantize timing with the step search"
    for c in costs:
        same = [r for r in rows if (r["card"], r["run"]) == (c["card"], c["run"])]
        plain = min(r["median_ms"] for r in same if r["kernel"] == "nested quantize")
        searched = min(r["median_ms"] for r in same if r["kernel"] == f"nested quantize, search {c['search']}")
        assert c["slowdown"] == pytest.approx(searched / plain, rel=1e-12) and c["slowdown"] > 1
    assert g.search_quantize_cost([r for r in rows if "search" not in r["kernel"]]) == []


def test_fastest_launch_rows_keep_one_row_per_kernel_and_run():
    rows = g.nested_kernel_rows(g.nested_runs(RESULTS, "gpu_nested"))
    fastest, rest = g.fastest_launch_rows(rows)
    assert len(fastest) + len(rest) == len(rows)
    keys = [(r["card"], r["run"], r["kernel"]) for r in fastest]
    assert len(keys) == len(set(keys)) == len({(r["card"], r["run"], r["kernel"]) for r in rows})
    for r in fastest:
        same = [
            x["median_ms"] for x in rows if (x["card"], x["run"], x["kernel"]) == (r["card"], r["run"], r["kernel"])
        ]
        assert r["median_ms"] == min(same)
