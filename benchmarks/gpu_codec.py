"""GPU throughput of the E8 codec's Triton kernels next to the card's own copy bandwidth (CUDA only).

1. Bit identity: the kernels on the GPU against the CPU codec on CPU tensors (codes, step codes,
   dequantized values), for float16/bfloat16/float32 inputs at d = 64 and 128, every launch
   configuration timed below included.
2. Timing with CUDA events (median of ``--repeats`` after warm-up) at a real shape: the KV cache of
   Llama-3.1-8B (32 layers × 8 KV heads × head dim 128, keys and values) for ``--tokens`` tokens,
   random normal data with per-vector scales. Throughput counts bytes read + written (input,
   codes, step codes, output), and is set against a device-to-device ``copy_`` of a 1 GiB buffer
   timed the same way in the same run (bytes read + written).

Writes ``gpu_codec_<card>_<date>.json`` under ``--out`` (default ``results/``) and prints a table.

    python benchmarks/gpu_codec.py [--tokens 8192] [--bits 4] [--repeats 30] [--out results]
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import platform
import re
import statistics
import time
from pathlib import Path

import torch

from lqlib import E8Codec
from lqlib import kernels as K

# (block_v, num_warps, split, chunk_major, maxnreg): block_v = 32·num_warps puts one vector on each
# thread; maxnreg caps the registers (None: up to 255, 8 warps per multiprocessor at d = 128)
QUANTIZE_CONFIGS = [
    (32, 1, 1, False, None),
    (32, 1, 2, False, None),
    (64, 2, 1, False, None),
    (64, 2, 2, False, None),
    (128, 4, 1, False, None),
    (32, 1, 1, False, 168),
]
DEQUANTIZE_CONFIGS = [(16, 4, False), (16, 4, True), (64, 2, False), (128, 4, False)]
_BITS = {torch.float16: torch.int16, torch.bfloat16: torch.int16, torch.float32: torch.int32}


def bits_of(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(_BITS[t.dtype])


def sample(n: int, d: int, seed: int, dtype: torch.dtype) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=gen) * torch.exp(torch.randn(n, 1, generator=gen) * 2)
    x[::97] = 0.0  # some zero vectors
    return x.to(dtype)


def identical(codec: E8Codec, x: torch.Tensor, qcfg: dict, dcfg: dict) -> dict:
    """Kernel on the GPU vs the CPU codec on CPU tensors."""
    codes, steps = K.quantize(codec, x.cuda(), **qcfg)
    ref_codes, ref_steps = K.reference_quantize(codec, x, codes_dtype=codes.dtype)
    y = K.dequantize(codec, codes, steps, x.dtype, **dcfg)
    same_codes = torch.equal(codes.cpu(), ref_codes)
    same_steps = torch.equal(steps.cpu(), ref_steps)
    same_values = torch.equal(bits_of(y.cpu()), bits_of(codec.quantize(x)))
    return {
        "codes": same_codes,
        "step_codes": same_steps,
        "values": same_values,
        "codes_differing": int((codes.cpu() != ref_codes).sum()),
        "vectors": x.shape[0],
    }


def label_of(cfg: dict) -> str:
    """A quantize launch configuration in a few characters: vectors/warps/split/load order/register cap."""
    regs = "" if cfg["maxnreg"] is None else f"/r{cfg['maxnreg']}"
    return f"{cfg['block_v']}/{cfg['num_warps']}/split{cfg['split']}/cm{cfg['chunk_major']:d}{regs}"


def time_ms(fn, repeats: int, warmup: int = 3) -> list[float]:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    out = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda._sleep(2_000_000)  # keeps the GPU busy while the host queues the launch: no host time inside
        start.record()
        fn()
        end.record()
        end.synchronize()
        out.append(start.elapsed_time(end))
    return out


def summary(times: list[float], nbytes: int, copy_gbs: float | None) -> dict:
    med = statistics.median(times)
    gbs = nbytes / (med * 1e-3) / 1e9
    row = {"median_ms": med, "min_ms": min(times), "max_ms": max(times), "bytes": nbytes, "GB_per_s": gbs}
    if copy_gbs:
        row["fraction_of_copy"] = gbs / copy_gbs
    return row


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--bits", type=float, default=4.0)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--identity-vectors", type=int, default=20_000)
    ap.add_argument("--out", default="results")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("needs CUDA")
    import triton

    torch.backends.cuda.matmul.allow_tf32 = False
    dev = torch.cuda.get_device_properties(0)
    result: dict = {
        "benchmark": "benchmarks/gpu_codec.py",
        "card": dev.name,
        "multiprocessors": dev.multi_processor_count,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "bits": args.bits,
        "repeats": args.repeats,
        "kernel_source_sha256": hashlib.sha256(Path(K._kernels().__file__).read_bytes()).hexdigest(),
    }
    codec = E8Codec(args.bits, rotation="rht", scale="vector", seed=0)

    # 1. bit identity against the CPU codec
    t0 = time.time()
    checks = []
    for d in (64, 128):
        for dtype in (torch.float16, torch.bfloat16, torch.float32):
            x = sample(args.identity_vectors, d, seed=d, dtype=dtype)
            c = E8Codec(args.bits, seed=d)
            checks.append({"dim": d, "dtype": str(dtype), "config": "default", **identical(c, x, {}, {})})
    x = sample(4096, args.dim, seed=1, dtype=torch.float16)
    for bv, warps, split, cm, regs in QUANTIZE_CONFIGS:
        cfg = {"block_v": bv, "num_warps": warps, "split": split, "chunk_major": cm, "maxnreg": regs}
        checks.append(
            {
                "dim": args.dim,
                "dtype": "torch.float16",
                "config": "quantize " + label_of(cfg),
                **identical(codec, x, cfg, {}),
            }
        )
    for bv, warps, cm in DEQUANTIZE_CONFIGS:
        checks.append(
            {
                "dim": args.dim,
                "dtype": "torch.float16",
                "config": f"dequantize {bv}/{warps}/cm{cm:d}",
                **identical(codec, x, {}, {"block_v": bv, "num_warps": warps, "chunk_major": cm}),
            }
        )
    result["bit_identity"] = checks
    result["bit_identical_everywhere"] = all(c["codes"] and c["step_codes"] and c["values"] for c in checks)
    print(f"bit identity: {result['bit_identical_everywhere']} ({len(checks)} checks, {time.time() - t0:.0f} s)")
    for c in checks:
        if not (c["codes"] and c["step_codes"] and c["values"]):
            print("  MISMATCH", c)

    # 2. copy bandwidth of this card, then the kernels
    buf = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(buf)
    buf.random_(0, 255)
    copy = summary(time_ms(lambda src=buf, out=dst: out.copy_(src), args.repeats), 2 * buf.numel(), None)
    del buf, dst
    copy_gbs = copy["GB_per_s"]
    result["copy"] = {"what": "torch copy_ of 1 GiB, device to device", **copy}
    print(f"copy: {copy['median_ms']:.3f} ms, {copy_gbs:.0f} GB/s (read + written)")

    n = 2 * args.layers * args.kv_heads * args.tokens
    shape = (2 * args.layers, args.kv_heads, args.tokens, args.dim)
    result["shape"] = {
        "what": "Llama-3.1-8B KV cache: (K and V × layers, KV heads, tokens, head dim)",
        "shape": list(shape),
        "vectors": n,
    }
    rows = []

    def run_quantize(x, cfg, label):
        codes, steps = K.quantize(codec, x, **cfg)
        nbytes = x.numel() * x.element_size() + codes.numel() * codes.element_size() + steps.numel() * 2
        times = time_ms(lambda: K.quantize(codec, x, **cfg), args.repeats)
        again = statistics.median(time_ms(lambda: K.quantize(codec, x, **cfg), args.repeats))
        row = {
            "kernel": "quantize",
            "label": label,
            "input_dtype": str(x.dtype),
            "dim": x.shape[-1],
            "codes_dtype": str(codes.dtype),
            **cfg,
            **summary(times, nbytes, copy_gbs),
            "median_ms_again": again,
        }
        rows.append(row)
        print(
            f"{label:38s} {row['median_ms']:8.3f} ms {row['GB_per_s']:7.0f} GB/s {row['fraction_of_copy']:6.1%}"
            f"  (again {again:.3f} ms)"
        )
        return codes, steps

    def run_dequantize(codes, steps, dtype, cfg, label):
        out = K.dequantize(codec, codes, steps, dtype, **cfg)
        nbytes = codes.numel() * codes.element_size() + steps.numel() * 2 + out.numel() * out.element_size()
        times = time_ms(lambda: K.dequantize(codec, codes, steps, dtype, **cfg), args.repeats)
        again = statistics.median(time_ms(lambda: K.dequantize(codec, codes, steps, dtype, **cfg), args.repeats))
        row = {
            "kernel": "dequantize",
            "label": label,
            "output_dtype": str(dtype),
            "dim": codes.shape[-1],
            "codes_dtype": str(codes.dtype),
            **cfg,
            **summary(times, nbytes, copy_gbs),
            "median_ms_again": again,
        }
        rows.append(row)
        print(
            f"{label:38s} {row['median_ms']:8.3f} ms {row['GB_per_s']:7.0f} GB/s {row['fraction_of_copy']:6.1%}"
            f"  (again {again:.3f} ms)"
        )

    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(shape, generator=gen, device="cuda", dtype=torch.float16)
    x *= torch.exp(torch.randn(*shape[:-1], 1, generator=gen, device="cuda")).half()
    codes = steps = None
    for bv, warps, split, cm, regs in QUANTIZE_CONFIGS:
        cfg = {"block_v": bv, "num_warps": warps, "split": split, "chunk_major": cm, "maxnreg": regs}
        c, s = run_quantize(x, cfg, f"quantize fp16 d={args.dim} " + label_of(cfg))
        codes, steps = (c, s) if codes is None else (codes, steps)
    for bv, warps, cm in DEQUANTIZE_CONFIGS:
        run_dequantize(
            codes,
            steps,
            torch.float16,
            {"block_v": bv, "num_warps": warps, "chunk_major": cm},
            f"dequantize fp16 d={args.dim} {bv}/{warps}/cm{cm:d}",
        )
    best_q = min((r for r in rows if r["kernel"] == "quantize"), key=lambda r: r["median_ms"])
    best_d = min((r for r in rows if r["kernel"] == "dequantize"), key=lambda r: r["median_ms"])
    qcfg = {k: best_q[k] for k in ("block_v", "num_warps", "split", "chunk_major", "maxnreg")}
    dcfg = {k: best_d[k] for k in ("block_v", "num_warps", "chunk_major")}
    run_quantize(x.to(torch.bfloat16), qcfg, f"quantize bf16 d={args.dim} best")
    run_dequantize(codes, steps, torch.bfloat16, dcfg, f"dequantize bf16 d={args.dim} best")
    del x, codes, steps
    x64 = torch.randn(
        2 * args.layers * args.kv_heads * args.tokens * 2, 64, generator=gen, device="cuda", dtype=torch.float16
    )
    c64, s64 = run_quantize(x64, qcfg, "quantize fp16 d=64 best")
    run_dequantize(c64, s64, torch.float16, dcfg, "dequantize fp16 d=64 best")
    del x64, c64, s64

    # the codec's own torch path on CUDA, one layer's keys (what the cache did before the kernels)
    xl = torch.randn(args.kv_heads, args.tokens, args.dim, generator=gen, device="cuda", dtype=torch.float16)
    tq = statistics.median(time_ms(lambda: codec.quantize(xl), 5, warmup=1))
    rows.append(
        {
            "kernel": "torch codec.quantize (quantize + dequantize, torch ops on CUDA)",
            "label": "one layer's K",
            "dim": args.dim,
            "vectors": xl.numel() // args.dim,
            "median_ms": tq,
            "GB_per_s": 2 * xl.numel() * 2 / (tq * 1e-3) / 1e9,
        }
    )
    print(f"torch codec.quantize, {xl.numel() // args.dim} vectors: {tq:.3f} ms")
    result["rows"] = rows
    result["best"] = {
        "quantize": {k: best_q[k] for k in ("label", "median_ms", "GB_per_s", "fraction_of_copy")},
        "dequantize": {k: best_d[k] for k in ("label", "median_ms", "GB_per_s", "fraction_of_copy")},
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    card = re.sub(r"[^A-Za-z0-9]+", "-", dev.name).strip("-").lower()
    path = out / f"gpu_codec_{card}_{datetime.date.today().isoformat()}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(
        f"\nbest quantize {best_q['label']}: {best_q['GB_per_s']:.0f} GB/s = {best_q['fraction_of_copy']:.1%} of copy; "
        f"best dequantize {best_d['label']}: {best_d['GB_per_s']:.0f} GB/s = {best_d['fraction_of_copy']:.1%} of copy"
    )
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
