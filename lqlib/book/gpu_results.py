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
    "nested_layout_gain",
    "nested_decode_rows",
    "fair_decode_runs",
    "FP16_GRAPH_CACHES",
    "nested_capacity_rows",
    "nested_decode_summary",
    "speed_verdict",
    "KERNEL_CATEGORIES",
    "kernel_category",
    "decode_profile_rows",
]


def load_results(results_dir: str | Path, benchmark: str) -> list[dict]:
    """Every recorded run of ``benchmark`` (e.g. ``"gpu_attention"``), oldest date first.

    Smoke runs (``"smoke": true``, made on a CPU) are left out, and so are runs that name another
    script in their ``"benchmark"`` key (``gpu_nested_*.json`` also matches ``gpu_nested_decode_...``).

    Raises
    ------
    FileNotFoundError
        when ``results_dir`` holds no run of ``benchmark``.
    """
    paths = sorted(Path(results_dir).glob(f"{benchmark}_*.json"))
    runs = [json.loads(path.read_text()) for path in paths]
    script = f"benchmarks/{benchmark}.py"
    runs = [run for run in runs if not run.get("smoke", False) and run.get("benchmark", script) == script]
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
            "run": _run_label(run),
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


def fastest_launch_rows(kernel_rows: list[dict]) -> tuple[list[dict], list[dict]]:
    """(the fastest launch of each kernel in each run, the other launches), in their order: a page shows
    the first and keeps the second closed."""
    best: dict[tuple, float] = {}
    for r in kernel_rows:
        key = (r["card"], r["run"], r["kernel"])
        best[key] = min(best.get(key, r["median_ms"]), r["median_ms"])
    chosen, seen = [], set()
    for r in kernel_rows:
        key = (r["card"], r["run"], r["kernel"])
        chosen.append(r["median_ms"] == best[key] and key not in seen)
        if chosen[-1]:
            seen.add(key)
    return [r for r, c in zip(kernel_rows, chosen) if c], [r for r, c in zip(kernel_rows, chosen) if not c]


def search_quantize_cost(kernel_rows: list[dict]) -> list[dict]:
    """Per run (card, run label) that timed the quantize kernel with the encoder's step search
    (kernel ``"nested quantize, search s"``): the fastest searched launch's time over the fastest
    unsearched launch's of the same run (``slowdown``), and both fractions of the copy rate."""
    out = []
    for key in sorted({(r["card"], r["run"]) for r in kernel_rows}):
        rows = [r for r in kernel_rows if (r["card"], r["run"]) == key]
        plain = [r for r in rows if r["kernel"] == "nested quantize"]
        for kernel in sorted({r["kernel"] for r in rows if r["kernel"].startswith("nested quantize, search ")}):
            if not plain:
                continue
            best_plain = min(plain, key=lambda r: r["median_ms"])
            best = min((r for r in rows if r["kernel"] == kernel), key=lambda r: r["median_ms"])
            out.append(
                {
                    "card": key[0],
                    "run": key[1],
                    "search": int(kernel.rsplit(" ", 1)[1]),
                    "launch": best["launch"],
                    "plain_launch": best_plain["launch"],
                    "slowdown": best["median_ms"] / best_plain["median_ms"],
                    "fraction_of_copy": best["fraction_of_copy"],
                    "plain_fraction_of_copy": best_plain["fraction_of_copy"],
                }
            )
    return out


def nested_attention_rows(runs: list[dict]) -> list[dict]:
    """Decode attention per (card, batch, context): fp16 SDPA, our fp16 split-K kernel (runs that timed
    it), the int8 format's fused kernel and the nested format's fastest launch at that shape (named in
    ``nested_launch``), with the speed-ups over SDPA in the same run (runs that timed no attention, the
    quantize-only ones, give none)."""
    rows = []
    for run in runs:
        for s in run.get("attention_summary", []):
            speedup = s.get("speedup_best", s["speedup_default"])
            rows.append(
                {
                    "card": card_label(run),
                    "run": _run_label(run),
                    "batch": s["batch"],
                    "context": s["context"],
                    "sdpa_ms": s["sdpa_ms"],
                    "fp16_split_k_ms": s.get("fp16_split_k_ms"),
                    "int8_ms": s["int8_ms"],
                    "nested_ms": s.get("nested_best_ms", s["nested_default_ms"]),
                    "nested_launch": s.get("nested_best", "").removeprefix("nested fused "),
                    "int8_speedup": s["int8_speedup"],
                    "nested_speedup": speedup,
                    "target": run["targets"]["attention_speedup"],
                    "met": speedup >= run["targets"]["attention_speedup"],
                }
            )
    return rows


def nested_variant_rows(runs: list[dict]) -> list[dict]:
    """The attention variants of ``benchmarks/gpu_nested_variants.py``, one row per (card, run, context,
    batch, variant): ms, the speed over SDPA and over the run's first variant (its baseline), all timed in
    the same run, and the largest relative difference from that baseline's output (None: other codes)."""
    rows = []
    for run in runs:
        names = list(run["variants"])
        for r in run["rows"]:
            for name in names:
                rows.append(
                    {
                        "card": card_label(run),
                        "run": _run_label(run),
                        "context": r["context"],
                        "batch": r["batch"],
                        "variant": name,
                        "ms": r[f"{name} ms"],
                        "vs_sdpa": r["sdpa ms"] / r[f"{name} ms"],
                        "vs_first": r[f"{names[0]} ms"] / r[f"{name} ms"],
                        "max_rel_diff": r.get(f"{name} max_rel_diff"),
                    }
                )
    return rows


FP16_GRAPH_CACHES = ("static_graph", "static_split_k_graph", "static_compile")
"""The float16 one-graph baselines of benchmarks/gpu_nested_decode.py: a run's ratios are against the
fastest of them at each context and batch."""


RUN_CHOICES = {
    "LEAN_PAIRS": "lean words",
    "UNROTATE_IN_COMBINE": "V in merge",
    "ROTATE_QUERIES_IN_REGISTERS": "Q by butterflies",
    "KEYS_AS_A": "keys as A",
}
"""The nested kernels' flags a benchmark may turn on for a run (``--flags``), as a run's label names them:
the lean word decoding, the values' rotation undone once a row in the merge of the splits, the queries
rotated by butterflies in registers, the decoded keys as the score dots' first operand."""


def _run_label(run: dict) -> str:
    """A run's start, ``YYYY-MM-DD HH:MM`` UTC (runs of one day and card differ by it), and the kernel
    choices it turned on, if any (``"nested_flags"``, or ``"lean_pairs"`` alone in earlier runs), and the
    nested caches' encoder step search (``"nested_search"``) where it was on."""
    flags = run.get("nested_flags") or {"LEAN_PAIRS": run.get("lean_pairs", False)}
    on = [RUN_CHOICES.get(name, name) for name, value in flags.items() if value]
    if run.get("nested_search"):
        on.append(f"step search {run['nested_search']}")
    return run["date"][:16].replace("T", " ") + (f" ({', '.join(on)})" if on else "")


def split_newest_run(rows: list[dict], keys: tuple[str, ...]) -> tuple[list[dict], list[dict]]:
    """(for each card and each measurement — the fields ``keys``, e.g. context and batch — the rows of the
    newest run that made it; the rest), in their order: a page shows the newest measurement of each shape
    and keeps the earlier ones closed. Rows carry ``card`` and ``run`` (which starts with the date)."""
    newest: dict[tuple, str] = {}
    for r in rows:
        key = (r["card"], *(r[k] for k in keys))
        newest[key] = max(newest.get(key, r["run"]), r["run"])
    is_newest = [r["run"] == newest[(r["card"], *(r[k] for k in keys))] for r in rows]
    return [r for r, n in zip(rows, is_newest) if n], [r for r, n in zip(rows, is_newest) if not n]


def fair_decode_runs(runs: list[dict]) -> list[dict]:
    """The decode runs that timed the float16 split-K baseline (reading only the tokens written); earlier
    runs compared against SDPA with a mask, which reads the whole capacity and splits no sequence."""
    return [run for run in runs if any(r.get("cache") == "static_split_k_graph" for r in run["rows"])]


def nested_decode_rows(runs: list[dict]) -> list[dict]:
    """End-to-end greedy decode, one row per (card, run, context, batch, cache): ms per step, tokens/s,
    the bandwidth floor (weights + KV read over the copy rate of the same run), the KV held, and the
    speed over the fastest float16 one-graph baseline of the same run, context and batch (``baseline``
    names it; ``static_attention`` says which attention a ``static_graph`` row used)."""
    rows = []
    for run in runs:
        done = [r for r in run["rows"] if "ms_per_step" in r]
        fp16: dict[tuple, dict] = {}
        for r in done:
            key = (r["context"], r["batch"])
            if r["cache"] in FP16_GRAPH_CACHES and (key not in fp16 or r["ms_per_step"] < fp16[key]["ms_per_step"]):
                fp16[key] = r
        for r in done:
            b = fp16.get((r["context"], r["batch"]))
            pairs = [x / y for x in b["block_ms"] for y in r["block_ms"]] if b else []
            rows.append(
                {
                    "card": card_label(run),
                    "run": _run_label(run),
                    "static_attention": run.get("static_graph_attention", "sdpa"),
                    "context": r["context"],
                    "batch": r["batch"],
                    "cache": r["cache"],
                    "ms_per_step": r["ms_per_step"],
                    "tokens_per_s": r["tokens_per_s"],
                    "floor_ms": r.get("floor_ms"),
                    "kv_mib": r["kv_bytes"] / 2**20,
                    "baseline": b["cache"] if b else None,
                    "vs_fp16": b["ms_per_step"] / r["ms_per_step"] if b else None,
                    "vs_fp16_low": min(pairs) if pairs else None,
                    "vs_fp16_high": max(pairs) if pairs else None,
                    "target": _decode_target(run, r["context"], r["batch"]),
                    "kv_ratio_vs_fp16": b["kv_bytes"] / r["kv_bytes"] if b and r["kv_bytes"] else None,
                }
            )
    return rows


def step_search_rows(runs: list[dict]) -> list[dict]:
    """The encoder's step search in the decode runs: for each run whose nested cache searched
    (``nested_search`` > 0) and each (context, batch) it timed, its nested ms/step and speed over the
    float16 baseline of that run, beside those of the newest run on the same card with the same kernel
    flags and no search that timed the shape (``plain_*``; two processes, so the step cost
    ``searched_ms − plain_ms`` is only as steady as the card between them)."""
    rows = []
    plain_runs = [run for run in runs if not run.get("nested_search")]
    for run in runs:
        if not run.get("nested_search"):
            continue
        for r in nested_decode_rows([run]):
            if r["cache"] != "nested_graph":
                continue
            same = [
                x
                for other in plain_runs
                if other["card"] == run["card"] and other.get("nested_flags") == run.get("nested_flags")
                for x in nested_decode_rows([other])
                if (x["cache"], x["context"], x["batch"]) == ("nested_graph", r["context"], r["batch"])
            ]
            if not same:
                continue
            plain = max(same, key=lambda x: x["run"])
            rows.append(
                {
                    "card": r["card"],
                    "context": r["context"],
                    "batch": r["batch"],
                    "search": run["nested_search"],
                    "searched_run": r["run"],
                    "plain_run": plain["run"],
                    "searched_ms": r["ms_per_step"],
                    "plain_ms": plain["ms_per_step"],
                    "step_cost_ms": r["ms_per_step"] - plain["ms_per_step"],
                    "searched_vs_fp16": r["vs_fp16"],
                    "plain_vs_fp16": plain["vs_fp16"],
                }
            )
    return rows


def _decode_target(run: dict, context: int, batch: int) -> float | None:
    """The run's end-to-end speed target over float16 at ``context`` × ``batch`` (only 32K has one)."""
    if context != 32768:
        return None
    return run.get("targets", {}).get("vs_static_graph_at_32k", {}).get(str(batch))


def speed_verdict(low: float | None, high: float | None, target: float | None) -> str:
    """A speed-up of at least ``target``, judged on the range [low, high] of the run's block-time ratios
    (every pairing of the baseline's and our repeated blocks): "met" where the whole range reaches the
    target, "not met" where it stays below, "inconclusive" where it straddles it, "—" without a target
    or a range."""
    if target is None or low is None or high is None:
        return "—"
    if low >= target:
        return "met"
    if high < target:
        return "not met"
    return "inconclusive"


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
    """:func:`nested_decode_rows` folded to one row per (card, run, context, batch): ms per step of each
    cache, the fastest float16 baseline's name, time and floor, the nested cache's floor, its speed over
    that baseline and its KV bytes against float16."""
    out: dict[tuple, dict] = {}
    for r in rows:
        key = (r["card"], r["run"], r["context"], r["batch"])
        row = out.setdefault(key, {"card": key[0], "run": key[1], "context": key[2], "batch": key[3]})
        row[f"{r['cache']}_ms"] = r["ms_per_step"]
        if r["cache"] == r["baseline"]:
            row.update(baseline=r["cache"], fp16_ms=r["ms_per_step"], fp16_floor_ms=r["floor_ms"])
        if r["cache"] == "nested_graph":
            row["nested_floor_ms"] = r["floor_ms"]
            row["nested_vs_fp16"] = r["vs_fp16"]
            row["nested_vs_fp16_range"] = (
                f"[{r['vs_fp16_low']:.3f}, {r['vs_fp16_high']:.3f}]" if r["vs_fp16_low"] is not None else None
            )
            row["target"] = r["target"]
            row["verdict"] = speed_verdict(r["vs_fp16_low"], r["vs_fp16_high"], r["target"])
            row["kv_ratio_vs_fp16"] = r["kv_ratio_vs_fp16"]
    caches = {r["cache"] for r in rows} | {*FP16_GRAPH_CACHES, "dynamic_eager", "int8_graph", "nested_graph"}
    keys = {f"{c}_ms" for c in caches} | {"baseline", "fp16_ms", "fp16_floor_ms", "nested_floor_ms"}
    keys |= {"nested_vs_fp16", "nested_vs_fp16_range", "target", "verdict", "kv_ratio_vs_fp16"}
    return [{**dict.fromkeys(sorted(keys)), **row} for row in out.values()]  # None: not timed in that run


def nested_layout_gain(runs: list[dict]) -> list[dict]:
    """Per (card, batch, context) of the runs that timed both operand layouts of the nested attention
    kernel: the fastest launch with one operand of depth d assembled from all eight lanes
    (``joined``), the fastest with four operands of pairs of lanes (``pairs``), and joined ÷ pairs."""
    out = []
    for run in runs:
        shapes = sorted({(r["batch"], r["context"]) for r in run.get("attention", []) if "median_ms" in r})
        for b, n in shapes:
            rows = [r for r in run["attention"] if (r["batch"], r["context"]) == (b, n) and "median_ms" in r]
            best = {}
            for layout in ("joined", "pairs"):
                times = [
                    r["median_ms"]
                    for r in rows
                    if r["method"].startswith("nested fused ") and f" {layout}" in r["method"]
                ]
                if times:
                    best[layout] = min(times)
            if len(best) == 2:
                out.append(
                    {
                        "card": card_label(run),
                        "run": _run_label(run),
                        "batch": b,
                        "context": n,
                        "joined_ms": best["joined"],
                        "pairs_ms": best["pairs"],
                        "gain": best["joined"] / best["pairs"],
                    }
                )
    return out


PROFILE_NAMES = {"static_split_k_graph": "fp16 split-K", "nested_graph": "nested", "int8_graph": "int8"}


def profile_bars(rows: list[dict]) -> tuple[list[dict], list[str]]:
    """The bars of the step-profile figure from :func:`decode_profile_rows`: the nested cache of every
    earlier run (oldest first, labelled by the code that ran), then every cache of the newest run of each
    batch; and their labels (``"b1 nested, 0e429a4"``, ``"b8 fp16 split-K"``)."""
    newest, earlier = split_newest_run(rows, ("batch", "cache"))
    earlier = sorted((r for r in earlier if r["cache"] == "nested_graph"), key=lambda r: (r["run"], r["batch"]))
    newest = sorted(newest, key=lambda r: (r["batch"], r["cache"]))
    labels = [f"b{r['batch']} nested, {r['code'].split()[0] if r['code'] else r['run']}" for r in earlier]
    labels += [f"b{r['batch']} {PROFILE_NAMES.get(r['cache'], r['cache'])}" for r in newest]
    return earlier + newest, labels


KERNEL_CATEGORIES = (
    ("attention", ("attention_kernel",)),
    ("split combine", ("combine_splits", "combine_unrotate")),
    ("KV quantize", ("quantize_kernel",)),
    ("KV copy", ("index_elementwise",)),
    ("weight GEMMs", ("nvjet", "gemm", "splitkreduce", "cutlass", "sm90_xmma")),
)
"""Kernel categories of a decode step, in the order they are tried: (category, name fragments,
lower case). Anything else (norms, rotary, activations, argmax, copies) is ``"other"``."""


def kernel_category(name: str) -> str:
    """The :data:`KERNEL_CATEGORIES` category of a kernel's name, or ``"other"``."""
    low = name.lower()
    for category, fragments in KERNEL_CATEGORIES:
        if any(f in low for f in fragments):
            return category
    return "other"


def decode_profile_rows(runs: list[dict]) -> list[dict]:
    """One row per (card, run, context, batch, cache) of ``benchmarks/gpu_step_profile.py`` runs: the
    step time (CUDA events), its kernels' summed time, launches per step, and milliseconds per step in
    each kernel category (:func:`kernel_category`); ``code`` says which version of the code ran."""
    rows = []
    names = [c for c, _ in KERNEL_CATEGORIES] + ["other"]
    for run in runs:
        for cache in run["caches"]:
            per = dict.fromkeys(names, 0.0)
            for k in cache["kernels"]:
                per[kernel_category(k["kernel"])] += k["us_per_step"] / 1e3
            rows.append(
                {
                    "card": card_label(run),
                    "run": _run_label(run),
                    "code": run.get("code", ""),
                    "context": run["context"],
                    "batch": run["batch"],
                    "cache": cache["cache"],
                    "ms_per_step": cache["ms_per_step"],
                    "kernel_ms": cache["kernel_ms_per_step"],
                    "launches": cache["kernels_per_step"],
                    **{f"{name}_ms": per[name] for name in names},
                }
            )
    return rows
