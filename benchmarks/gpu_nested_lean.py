"""Lean against full word decoding in the nested decode attention, and fp16 SDPA, in one run (CUDA).

The lean decoding (``lean=True``) produces lanes ``β(2n − 16)`` with half the instructions a word and
adds the coset bits and parities through one more tensor-core dot of depth d/4 per operand. For each
context × batch (Llama-3.1-8B attention: 32 query heads, 8 KV heads, head dim 128, random keys and
values in the nested format) it checks the two decodings agree (max |difference| over the output's
largest |value|), then times each (median of ``--repeats`` CUDA-event blocks of ``--iters`` calls) and
SDPA on the same keys and values in float16. Writes ``gpu_nested_lean_<card>_<date>.json``.

    python benchmarks/gpu_nested_lean.py [--contexts 32768 131072] [--batches 1 8]
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_decode import write_record  # noqa: E402


def timed_ms(fn, iters: int, repeats: int) -> float:
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / iters)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    import torch.nn.functional as F

    from lqlib.coding.nested import NestedE8Codec
    from lqlib.kernels import nested as kn

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--contexts", type=int, nargs="+", default=[32768, 131072])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default="results")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("needs CUDA")
        return 2
    dev = torch.device("cuda")
    card = torch.cuda.get_device_name()
    codec = NestedE8Codec()
    hq, hkv, d = 32, 8, 128
    result = {
        "benchmark": "benchmarks/gpu_nested_lean.py",
        "card": card,
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="minutes"),
        "torch": torch.__version__,
        "config": repr(kn.NESTED_CONFIG),
        "rows": [],
    }
    gen = torch.Generator(device=dev).manual_seed(0)
    out = None
    for n in args.contexts:
        for b in args.batches:
            k = torch.randn(b, hkv, n, d, generator=gen, device=dev, dtype=torch.float16)
            v = torch.randn(b, hkv, n, d, generator=gen, device=dev, dtype=torch.float16)
            keys, values = kn.quantize(codec, k), kn.quantize(codec, v)
            q = torch.randn(b, hq, d, generator=gen, device=dev, dtype=torch.float16)
            full = kn.decode_attention(q, keys, values, n, codec, codec, lean=False)
            lean = kn.decode_attention(q, keys, values, n, codec, codec, lean=True)
            diff = float((lean.float() - full.float()).abs().max() / full.float().abs().max())
            row = {"context": n, "batch": b, "max_rel_diff": diff}
            row["full_ms"] = timed_ms(
                lambda: kn.decode_attention(q, keys, values, n, codec, codec, lean=False), args.iters, args.repeats
            )
            row["lean_ms"] = timed_ms(
                lambda: kn.decode_attention(q, keys, values, n, codec, codec, lean=True), args.iters, args.repeats
            )
            qs = q[:, :, None, :]
            row["sdpa_ms"] = timed_ms(
                lambda: F.scaled_dot_product_attention(qs, k, v, enable_gqa=True), args.iters, args.repeats
            )
            row["lean_gain"] = row["full_ms"] / row["lean_ms"]
            row["lean_vs_sdpa"] = row["sdpa_ms"] / row["lean_ms"]
            row["full_vs_sdpa"] = row["sdpa_ms"] / row["full_ms"]
            result["rows"].append(row)
            out = write_record(result, args.out, "gpu_nested_lean")  # after every shape
            print({key: round(x, 4) if isinstance(x, float) else x for key, x in row.items()}, flush=True)
            k = v = keys = values = None  # free before the next shape
            torch.cuda.empty_cache()
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
