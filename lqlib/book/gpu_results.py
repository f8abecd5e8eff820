"""The GPU benchmarks' recorded results (``results/*.json``) as table rows for the book.

The benchmarks (``benchmarks/gpu_*.py``) run on a lent GPU and write one JSON file per run,
named ``<benchmark>_<card>_<date>.json``; the book cannot re-run them on a CPU, so the Paper II
chapter reads these files. Every row carries the card and date it was measured on, and every
ratio is against a baseline timed in the same run on the same card.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..evaluation.stats import Estimate

__all__ = [
    "load_results",
    "codec_rows",
    "attention_rows",
    "rans_rows",
    "rans_rate_rows",
    "decode_rows",
    "decode_speed_estimate",
    "card_label",
    "nested_runs",
    "nested_kernel_rows",
    "nested_attention_rows",
    "nested_decode_rows",
    "nested_capacity_rows",
    "nested_decode_summary",
]


def load_results(results_dir: str | Path, benchmark: str) -> list[dict]:
    """Every recorded run of ``benchmark`` (e.g. ``"gpu_attention"``), oldest date first.

    Smoke runs (``"smoke": true``, made on a CPU) are left out.

    Raises
    ------
    FileNotFoundError
        when ``results_dir`` holds no run of ``benchmark``.
    """
    paths = sorted(Path(results_dir).glob(f"{benchmark}_*.json"))
    runs = [json.loads(path.read_text()) for path in paths]
    runs = [run for run in runs if not run.get("smoke", False)]
    if not runs:
        raise FileNotFoundError(f"no recorded {benchmark} run under {results_dir}")
    return sorted(runs, key=lambda run: (run["date"], run["card"]))


def card_label(run: dict) -> str:
    """``"<card>, <YYYY-MM-DD>"``: the card a number was measured on, and when."""
    return f"{run['card']}, {run['date'][:10]}"


def codec_rows(runs: list[dict]) -> list[dict]:
    """Best quantize and dequantize kernel per run: median time, GB/s (read + written), fraction of copy,
    and which kernel source ran (the first hex digits of the SHA-256 of ``_e8_triton.py``; runs
    recorded before the benchmark kept it say "earlier")."""
    rows = []
    for run in runs:
        for kernel in ("quantize", "dequantize"):
            best = run["best"][kernel]
            rows.append(
                {
                    "card": card_label(run),
                    "kernel": kernel,
                    "launch": best["label"],
                    "kernel_source": run.get("kernel_source_sha256", "")[:8] or "earlier (not recorded)",
                    "median_ms": best["median_ms"],
                    "GB_per_s": best["GB_per_s"],
                    "copy_GB_per_s": run["copy"]["GB_per_s"],
                    "fraction_of_copy": best["fraction_of_copy"],
                    "bit_identical": run["bit_identical_everywhere"],
                }
            )
    return rows


def attention_rows(runs: list[dict]) -> list[dict]:
    """Fused decode attention at its default launch against PyTorch's fp16 SDPA, per (card, batch, context)."""
    rows = []
    for run in runs:
        for s in run["summary"]:
            rows.append(
                {
                    "card": card_label(run),
                    "batch": s["batch"],
                    "context": s["context"],
                    "baseline": s["baseline"],
                    "baseline_ms": s["baseline_ms"],
                    "fused_ms": s["fused_default_ms"],
                    "speedup": s["fused_default_speedup"],
                    "correct": run["correctness"]["all_ok"],
                }
            )
    return rows


def rans_rows(runs: list[dict]) -> list[dict]:
    """GPU multi-lane rANS, every timed launch: fp16-equivalent GB/s (2 bytes per decoded dimension)
    and whether its output matched the CPU coder's exactly."""
    rows = []
    for run in runs:
        for r in run["rows"]:
            launch = f"{r['block']} lanes/program, {r['num_warps']} warp(s)" + (
                f", {r['lookup']}" if "lookup" in r else ""
            )
            rows.append(
                {
                    "card": card_label(run),
                    "kernel": r["kernel"],
                    "lanes_per_page": r["lanes"],
                    "launch": launch,
                    "median_ms": r["median_ms"],
                    "fp16_GB_per_s": r["fp16_equivalent_GB_per_s"],
                    "exact": r["exact"],
                }
            )
    return rows


def rans_rate_rows(runs: list[dict]) -> list[dict]:
    """Coded bits/dim of the lane format against the CPU coder (constriction) on the same pages."""
    return [
        {
            "card": card_label(run),
            "lanes_per_page": r["lanes"],
            "bits_per_dim": r["bits_per_dim_checked_pages"],
            "constriction_bits_per_dim": r["constriction_bits_per_dim_checked_pages"],
            "overhead": r["overhead_vs_constriction"],
        }
        for run in runs
        for r in run["rates"]
    ]


def decode_rows(runs: list[dict]) -> list[dict]:
    """End-to-end greedy decode at batch 1: tokens/s of the compressed cache against transformers'
    fp16 DynamicCache (SDPA) in the same run, with the KV bytes each holds and the peak memory."""
    rows = []
    for run in runs:
        for s in run["summary"]:
            rows.append(
                {
                    "card": card_label(run),
                    "context": s["context"],
                    "ours": "eager" if s["cache"] == "device" else "CUDA graphs",
                    "dynamic_tok_s": s["tokens_per_s_dynamic"],
                    "ours_tok_s": s["tokens_per_s_device_cache"],
                    "ratio": s["ratio"],
                    "kv_mib_dynamic": s["kv_bytes_dynamic"] / 2**20,
                    "kv_mib_ours": s["kv_bytes_device_cache"] / 2**20,
                    "peak_gib_dynamic": s["peak_gib_dynamic"],
                    "peak_gib_ours": s["peak_gib_device_cache"],
                }
            )
    return rows


def decode_speed_estimate(run: dict, context: int, cache: str = "device") -> Estimate:
    """Decode speed of our cache (``cache``: ``"device"`` eager or ``"device_graphs"``) over fp16
    ``DynamicCache`` at ``context`` tokens in one recorded run: the ratio of the median block times, and
    as its interval the smallest and largest ratio over every pairing of the repeated timed blocks (a
    range over the run's repeats, not a confidence interval: a GPU run is a handful of blocks).

    Raises
    ------
    KeyError
        when the run has no such rows.
    """
    rows = {(r["cache"], r["context"]): r for r in run["rows"]}
    base, ours = rows[("dynamic", context)], rows[(cache, context)]
    ratios = [b / o for b in base["block_ms"] for o in ours["block_ms"]]
    value = base["median_block_ms"] / ours["median_block_ms"]
    return Estimate(value, min(ratios), max(ratios), n=len(ours["block_ms"]))


def nested_runs(results_dir: str | Path, benchmark: str) -> list[dict]:
    """The recorded runs of ``benchmark`` (``"gpu_nested"`` or ``"gpu_nested_decode"``): file names of
    the first also match the second's pattern, so runs are kept by the benchmark they name."""
    script = f"benchmarks/{benchmark}.py"
    runs = [run for run in load_results(results_dir, benchmark) if run.get("benchmark") == script]
    if not runs:
        raise FileNotFoundError(f"no recorded {benchmark} run under {results_dir}")
    return runs


def nested_kernel_rows(runs: list[dict]) -> list[dict]:
    """The nested format's quantize and dequantize kernels and the int8 format's quantize, each launch:
    median time, GB/s (read + written) and fraction of the copy rate measured in the same run."""
    return [
        {
            "card": card_label(run),
            "kernel": r["kernel"],
            "launch": r["launch"],
            "median_ms": r["median_ms"],
            "GB_per_s": r["GB_per_s"],
            "copy_GB_per_s": run["copy"]["GB_per_s"],
            "fraction_of_copy": r["fraction_of_copy"],
            "bit_identical": run["bit_identical_everywhere"],
        }
        for run in runs
        for r in run["quantize"]
    ]


def nested_attention_rows(runs: list[dict]) -> list[dict]:
    """Decode attention per (card, batch, context): fp16 SDPA, the int8 format's fused kernel and the
    nested format's (default launch), with the speed-ups over SDPA in the same run."""
    return [
        {
            "card": card_label(run),
            "batch": s["batch"],
            "context": s["context"],
            "sdpa_ms": s["sdpa_ms"],
            "int8_ms": s["int8_ms"],
            "nested_ms": s["nested_default_ms"],
            "int8_speedup": s["int8_speedup"],
            "nested_speedup": s["speedup_default"],
            "target": run["targets"]["attention_speedup"],
            "met": s["speedup_default"] >= run["targets"]["attention_speedup"],
        }
        for run in runs
        for s in run["attention_summary"]
    ]


def nested_decode_rows(runs: list[dict]) -> list[dict]:
    """End-to-end greedy decode, one row per (card, context, batch, cache): ms per step, tokens/s, the
    bandwidth floor (weights + KV read over the copy rate of the same run), the KV held, and the speed
    over the one-graph float16 StaticCache of the same run (``static_attention`` says which attention
    that baseline used: ``"sdpa"``, transformers' path that repeats K/V, or ``"lqlib_fp16_decode"``)."""
    rows = []
    for run in runs:
        base = {(r["context"], r["batch"]): r for r in run["rows"] if r["cache"] == "static_graph"}
        for r in run["rows"]:
            if "ms_per_step" not in r:
                continue
            b = base.get((r["context"], r["batch"]))
            rows.append(
                {
                    "card": card_label(run),
                    "static_attention": run.get("static_graph_attention", "sdpa"),
                    "context": r["context"],
                    "batch": r["batch"],
                    "cache": r["cache"],
                    "ms_per_step": r["ms_per_step"],
                    "tokens_per_s": r["tokens_per_s"],
                    "floor_ms": r.get("floor_ms"),
                    "kv_mib": r["kv_bytes"] / 2**20,
                    "vs_static_graph": b["ms_per_step"] / r["ms_per_step"] if b else None,
                    "kv_ratio_vs_fp16": b["kv_bytes"] / r["kv_bytes"] if b and r["kv_bytes"] else None,
                }
            )
    return rows


def nested_capacity_rows(runs: list[dict]) -> list[dict]:
    """Longest batch-1 context that ran one decode step beside the weights: float16 StaticCache and the
    nested cache, and their ratio (runs that measured it)."""
    return [
        {
            "card": card_label(run),
            "static_attention": run.get("static_graph_attention", "sdpa"),
            "fp16_tokens": run["capacity"]["fp16_static"]["tokens"],
            "nested_tokens": run["capacity"]["nested"]["tokens"],
            "ratio": run["capacity"]["ratio"],
            "target": run["targets"]["capacity"],
            "met": bool(run["capacity"]["meets_target"]),
        }
        for run in runs
        if "capacity" in run
    ]


def nested_decode_summary(rows: list[dict]) -> list[dict]:
    """:func:`nested_decode_rows` folded to one row per (card, fp16 baseline attention, context, batch):
    ms per step of each cache, the floors of the fp16 and nested caches, the nested cache's speed over
    the one-graph fp16 StaticCache and its KV bytes against fp16."""
    out: dict[tuple, dict] = {}
    for r in rows:
        key = (r["card"], r["static_attention"], r["context"], r["batch"])
        row = out.setdefault(key, {"card": key[0], "static_attention": key[1], "context": key[2], "batch": key[3]})
        row[f"{r['cache']}_ms"] = r["ms_per_step"]
        if r["cache"] == "static_graph":
            row["fp16_floor_ms"] = r["floor_ms"]
        if r["cache"] == "nested_graph":
            row["nested_floor_ms"] = r["floor_ms"]
            row["nested_vs_static"] = r["vs_static_graph"]
            row["kv_ratio_vs_fp16"] = r["kv_ratio_vs_fp16"]
    return list(out.values())
