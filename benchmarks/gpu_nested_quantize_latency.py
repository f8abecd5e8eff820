"""Latency of the nested quantize kernel at decode sizes: one token's keys and values per layer
(2 · batch · KV heads vectors of head dim 128), per launch shape (CUDA).

A decode step quantizes a few vectors per layer, so the kernel's latency, not its throughput, is
what a step pays, 32 times. For each launch shape (vectors per program, warps, load order, parts of
the E8 stage) the words, steps and flags are checked equal to the default launch's, then 64 launches
are recorded as one CUDA graph and replayed (median of ``--repeats``): microseconds per launch. The
default launch and a ``copy_`` of the same input (a bandwidth-trivial kernel: the floor of any launch
in a graph) are timed in the same run. Writes ``gpu_nested_quantize_latency_<card>_<date>.json``.

``--format int8`` times the int8 device format's quantize kernel (:func:`lqlib.kernels.quantize`) the
same way (its decode steps use the throughput launch too).

    python benchmarks/gpu_nested_quantize_latency.py [--vectors 16 128] [--format nested|int8] [--out results]
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_decode import write_record  # noqa: E402


def graph_us(fn, launches: int = 64, repeats: int = 7) -> float:
    """Median microseconds per call of ``fn`` replayed ``launches`` times inside one CUDA graph."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(launches):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / launches)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    from lqlib.coding.nested import NestedE8Codec
    from lqlib.kernels import nested as kn

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--vectors", type=int, nargs="+", default=[16, 128])
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--block-v", type=int, nargs="+", default=[1, 4, 16, 32])
    ap.add_argument("--warps", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--chunk-major", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--splits", type=int, nargs="+", default=[0, 3])
    ap.add_argument("--format", choices=["nested", "int8"], default="nested")
    ap.add_argument("--out", default="results")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("needs CUDA")
        return 2
    dev = torch.device("cuda")
    card = torch.cuda.get_device_name()
    if args.format == "nested":
        codec = NestedE8Codec()

        def quantize(x, **kw):
            got = kn.quantize(codec, x, **kw)
            return got.words, got.steps, got.flags
    else:
        import lqlib
        from lqlib.kernels import quantize as int8_quantize

        codec = lqlib.E8Codec(4.0)

        def quantize(x, **kw):
            return int8_quantize(codec, x, **{k: (1 if k == "split" and v is None else v) for k, v in kw.items()})

    shapes = list(itertools.product(args.block_v, args.warps, [bool(c) for c in args.chunk_major], args.splits))
    result = {
        "benchmark": "benchmarks/gpu_nested_quantize_latency.py",
        "format": args.format,
        "card": card,
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="minutes"),
        "torch": torch.__version__,
        "cases": [],
    }
    for n in args.vectors:
        x = torch.randn(n, args.dim, device=dev, dtype=torch.float16)
        ref = quantize(x)
        sink = torch.empty_like(x)
        case = {
            "vectors": n,
            "dim": args.dim,
            "copy_us": graph_us(lambda: sink.copy_(x)),
            "default_us": graph_us(lambda: quantize(x)),  # the library's choice for n vectors
            "launches": [],
        }
        print(f"\n{n} vectors of {args.dim}: copy_ {case['copy_us']:.2f} us,", end=" ")
        print(f"default launch {case['default_us']:.2f} us")
        for bv, w, cm, sp in shapes:
            kw = {"block_v": bv, "num_warps": w, "chunk_major": cm, "split": sp}
            try:
                got = quantize(x, **kw)
                same = all(torch.equal(a, b) for a, b in zip(got, ref))
                us = graph_us(lambda kw=kw: quantize(x, **kw))
                row = {**kw, "us": us, "identical": same}
            except Exception as exc:  # noqa: BLE001 - recorded: a launch shape Triton cannot compile
                row = {**kw, "error": repr(exc)[:300]}
            case["launches"].append(row)
            print(f"  {kw}: {row.get('us', float('nan')):8.2f} us  identical={row.get('identical')}")
        ok = [r for r in case["launches"] if r.get("identical")]
        best = min(ok, key=lambda r: r["us"]) if ok else None
        case["fastest"] = best
        if best:
            print(f"fastest: {best} = {case['default_us'] / best['us']:.2f}x the default launch")
        result["cases"].append(case)
    suffix = "" if args.format == "nested" else f"_{args.format}"
    print(f"wrote {write_record(result, args.out, 'gpu_nested_quantize_latency', suffix)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
