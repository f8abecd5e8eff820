"""Where a one-graph decode step spends its GPU time: the kernels of one step, per cache (CUDA).

For each cache of ``--kinds`` (the fair float16 baseline ``static_split_k_graph``, ``nested_graph``,
``int8_graph``; see benchmarks/gpu_nested_decode.py) at one context × batch on the Llama-3.1-8B shape
(random weights), the prompt is prefilled, the whole step recorded as one CUDA graph, and
``--steps`` replays are traced with ``torch.profiler`` (CUPTI reports the kernels a graph launches).
Printed per cache: the step time (CUDA events, untraced), the summed kernel time per step, and the
kernels grouped by name with their count and time per step, largest first; the groups that differ
between caches are what the coded caches add or save. Writes
``gpu_step_profile_<card>_<date>_<context>_b<batch>.json`` under ``--out``; the Paper II GPU page
folds it into kernel categories (:func:`lqlib.book.gpu_results.decode_profile_rows`).

    python benchmarks/gpu_step_profile.py [--context 32768] [--batch 1] [--out results]
"""

from __future__ import annotations

import argparse
import datetime
import re
import statistics
import sys
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_decode import Timer, build_model, llama_8b_config, write_record  # noqa: E402
from gpu_nested_decode import FLAGS, add_choice_arguments, apply_choices, make_cache  # noqa: E402


def kernel_group(name: str) -> str:
    """A short, stable name for a kernel: Triton kernels by their function, others by their first words."""
    name = re.sub(r"<.*", "", name)  # template arguments
    name = re.sub(r"\(.*", "", name)
    return name[:90]


@torch.inference_mode()
def profile_kind(kind: str, model, ids: torch.Tensor, steps: int, timer: Timer, search: int = 0) -> dict:
    from torch.profiler import ProfilerActivity, profile

    from lqlib.cache.decode_graph import GraphedDecoder

    n = ids.shape[1]
    cache = make_cache(kind, model, n + steps * 3 + 16, search)
    decoder = GraphedDecoder(model, cache, warmup=2)
    decoder.prefill(ids, chunk=4096)
    decoder.decode(2)
    blocks = [timer(lambda: decoder.decode(steps)) / steps for _ in range(3)]
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        decoder.decode(steps)
        torch.cuda.synchronize()
    groups: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])
    for ev in prof.events():
        if ev.device_type.name != "CUDA":
            continue
        g = groups[kernel_group(ev.name)]
        g[0] += 1
        g[1] += ev.device_time_total  # microseconds
    rows = sorted(
        ({"kernel": k, "per_step": c / steps, "us_per_step": t / steps} for k, (c, t) in groups.items()),
        key=lambda r: -r["us_per_step"],
    )
    return {
        "cache": kind,
        "ms_per_step": statistics.median(blocks),
        "kernel_ms_per_step": sum(r["us_per_step"] for r in rows) / 1e3,
        "kernels_per_step": sum(r["per_step"] for r in rows),
        "graphed": decoder.graphed,
        "kernels": rows,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--context", type=int, default=32768)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--kinds", nargs="+", default=["static_split_k_graph", "nested_graph", "int8_graph"])
    ap.add_argument("--out", default="results")
    add_choice_arguments(ap)
    args = ap.parse_args(argv)
    kn = apply_choices(args)
    if not torch.cuda.is_available():
        print("needs CUDA")
        return 2
    device = torch.device("cuda")
    card = torch.cuda.get_device_name()
    model = build_model(llama_8b_config(False), device, torch.float16)
    ids = torch.randint(0, model.config.vocab_size, (args.batch, args.context), device=device)
    result = {
        "benchmark": "benchmarks/gpu_step_profile.py",
        "card": card,
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="minutes"),
        "torch": torch.__version__,
        "context": args.context,
        "batch": args.batch,
        "steps_traced": args.steps,
        "lean_pairs": kn.LEAN_PAIRS,
        "nested_flags": {flag: getattr(kn, flag) for flag in FLAGS},
        "nested_search": args.search,
        "caches": [],
    }
    for kind in args.kinds:
        row = profile_kind(kind, model, ids, args.steps, Timer(device), args.search)
        result["caches"].append(row)
        print(
            f"\n== {kind}: {row['ms_per_step']:.3f} ms/step (events), kernels {row['kernel_ms_per_step']:.3f} ms in "
            f"{row['kernels_per_step']:.0f} launches/step, graphed={row['graphed']}"
        )
        for r in row["kernels"][:25]:
            print(f"  {r['us_per_step']:9.1f} us  x{r['per_step']:5.0f}  {r['kernel']}")
        torch.cuda.empty_cache()
    suffix = f"_{args.context}_b{args.batch}" + (f"_{args.tag}" if args.tag else "_lean" if args.lean else "")
    print(f"\nwrote {write_record(result, args.out, 'gpu_step_profile', suffix)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
