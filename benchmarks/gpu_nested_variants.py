"""Variants of the nested decode attention against each other and fp16 SDPA, in one run (CUDA).

Each variant is the library's kernel with one choice changed (see ``VARIANTS``): the lean word
decoding (``lean=True``), the values' rotation undone once a row in the split merge
(``unrotate_in_combine``), the queries rotated by butterflies in registers
(``ROTATE_QUERIES_IN_REGISTERS``), both, both with the decoded keys as the score dots' first operand
(``keys_as_a=True``), and a split count halved or doubled; ``no-rotation`` (a
codec without RHT, its own codes) bounds what the rotations cost. For each context × batch
(Llama-3.1-8B attention: 32 query heads, 8 KV heads, head dim 128, random keys and values) it checks
every variant against the first (max |difference| over the output's largest |value|), then times
each (median of ``--repeats`` CUDA-event blocks of ``--iters`` calls, queued behind a GPU sleep so that
no host time is inside) and SDPA on the same keys and
values in float16. Writes ``gpu_nested_variants_<card>_<date>.json``.

    python benchmarks/gpu_nested_variants.py [--contexts 32768 131072] [--batches 1 8] [--variants ...]
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_decode import write_record  # noqa: E402

PER_SPLIT = {"unrotate_in_combine": False, "flags": {"ROTATE_QUERIES_IN_REGISTERS": False}}
ONCE = {"unrotate_in_combine": True, "flags": {"ROTATE_QUERIES_IN_REGISTERS": True}}
VARIANTS = {
    "per-split rotations": PER_SPLIT,
    "lean": {**PER_SPLIT, "lean": True},
    "late-v": {**PER_SPLIT, "unrotate_in_combine": True},
    "fwht-q": {**PER_SPLIT, "flags": {"ROTATE_QUERIES_IN_REGISTERS": True}},
    "both": ONCE,
    "both+lean": {**ONCE, "lean": True},
    "keys as A": {**ONCE, "keys_as_a": True},
    "both/2 splits": {**ONCE, "splits": 0.5},
    "both*2 splits": {**ONCE, "splits": 2.0},
    "both 128/4/2 r168": {**ONCE, "launch": {"block_n": 128, "num_warps": 4, "num_stages": 2, "maxnreg": 168}},
    "no-rotation": {"rotation": "none"},
}
"""name → changes: keyword arguments of ``decode_attention``, module ``flags``, a factor on the split
count :func:`lqlib.kernels.attention.split_plan` chooses, another ``launch`` (three blocks an SM at
168 registers and two stages), or the codec's ``rotation``."""


def timed_ms(fn, iters: int, repeats: int) -> float:
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda._sleep(10_000_000)  # the GPU waits while the host queues the calls: no host time inside
        start.record()
        for _ in range(iters):
            fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / iters)
    return statistics.median(times)


@contextlib.contextmanager
def module_flags(module, flags: dict):
    old = {name: getattr(module, name) for name in flags}
    try:
        for name, value in flags.items():
            setattr(module, name, value)
        yield
    finally:
        for name, value in old.items():
            setattr(module, name, value)


def variant_call(name: str, q, data: dict, n: int):
    """A no-argument call of the kernel as variant ``name`` (``data``: rotation → (codec, keys, values))."""
    from lqlib.kernels import nested as kn
    from lqlib.kernels.attention import AttentionConfig, split_plan

    spec = VARIANTS[name]
    codec, keys, values = data[spec.get("rotation", "rht")]
    kwargs = {k: spec[k] for k in ("lean", "keys_as_a", "unrotate_in_combine") if k in spec}
    if "splits" in spec:
        b, hkv = keys.words.shape[:2]
        splits, _ = split_plan(kn.NESTED_CONFIG, b * hkv, n, q.device)
        cfg = kn.NESTED_CONFIG
        scaled = max(1, round(splits * spec["splits"]))
        kwargs["config"] = AttentionConfig(cfg.block_n, cfg.num_warps, cfg.num_stages, splits=scaled)
    if "launch" in spec:
        kwargs["config"] = AttentionConfig(**spec["launch"])

    def call():
        with module_flags(kn, spec.get("flags", {})):
            return kn.decode_attention(q, keys, values, n, codec, codec, **kwargs)

    return call


def main(argv: list[str] | None = None) -> int:
    import torch.nn.functional as F

    from lqlib.coding.nested import NestedE8Codec
    from lqlib.kernels import nested as kn

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--contexts", type=int, nargs="+", default=[32768, 131072])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--tag", default="", help="a suffix for the record's file name")
    ap.add_argument("--out", default="results")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("needs CUDA")
        return 2
    dev = torch.device("cuda")
    hq, hkv, d = 32, 8, 128
    result = {
        "benchmark": "benchmarks/gpu_nested_variants.py",
        "card": torch.cuda.get_device_name(),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="minutes"),
        "torch": torch.__version__,
        "config": repr(kn.NESTED_CONFIG),
        "variants": {name: repr(VARIANTS[name]) for name in args.variants},
        "rows": [],
    }
    gen = torch.Generator(device=dev).manual_seed(0)
    out = None
    for n in args.contexts:
        for b in args.batches:
            k = torch.randn(b, hkv, n, d, generator=gen, device=dev, dtype=torch.float16)
            v = torch.randn(b, hkv, n, d, generator=gen, device=dev, dtype=torch.float16)
            q = torch.randn(b, hq, d, generator=gen, device=dev, dtype=torch.float16)
            data = {}
            for rotation in sorted({VARIANTS[name].get("rotation", "rht") for name in args.variants}):
                codec = NestedE8Codec(rotation)
                data[rotation] = (codec, kn.quantize(codec, k), kn.quantize(codec, v))
            row = {"context": n, "batch": b}
            first = None
            for name in args.variants:
                call = variant_call(name, q, data, n)
                got = call().float()
                if VARIANTS[name].get("rotation", "rht") == "rht":
                    first = got if first is None else first
                    row[f"{name} max_rel_diff"] = float((got - first).abs().max() / first.abs().max())
                row[f"{name} ms"] = timed_ms(call, args.iters, args.repeats)
            qs = q[:, :, None, :]
            row["sdpa ms"] = timed_ms(
                lambda: F.scaled_dot_product_attention(qs, k, v, enable_gqa=True), args.iters, args.repeats
            )
            for name in args.variants:
                row[f"{name} vs sdpa"] = row["sdpa ms"] / row[f"{name} ms"]
            result["rows"].append(row)
            suffix = f"_{args.tag}" if args.tag else ""
            out = write_record(result, args.out, "gpu_nested_variants", suffix)  # after every shape
            print(f"n={n} b={b} sdpa {row['sdpa ms']:.4f} ms", flush=True)
            for name in args.variants:
                diff = row.get(f"{name} max_rel_diff", float("nan"))
                ms, ratio = row[f"{name} ms"], row[f"{name} vs sdpa"]
                print(f"  {name:14s} {ms:.4f} ms  {ratio:.3f}x sdpa  diff {diff:.1e}", flush=True)
            k = v = data = None  # free before the next shape
            torch.cuda.empty_cache()
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
