"""Fused decode attention on E8-coded pages vs PyTorch's float16 SDPA (CUDA; ``--smoke``: CPU interpreter).

Shapes: Llama-3.1-8B attention (32 query heads, 8 KV heads, head dim 128), one new token per
batch row, contexts ``--contexts`` (32K and 128K) at batch ``--batches`` (1 and 8), float16.
Random keys and values with per-vector scales, coded at ``--bits`` bits/dim (RHT, per-vector
steps) by the quantize kernel; key scales per channel. Timed with CUDA events (median of
``--repeats`` after warm-up):

(a) ``scaled_dot_product_attention`` on the float16 cache, ``enable_gqa=True``;
(b) the same on K/V repeated to 32 heads (``repeat_interleave`` done beforehand, only SDPA timed);
    the baseline is the faster of (a) and (b);
(c) the dequantize kernel (keys and values to float16, keys times their scales) then SDPA as (a);
(d) :func:`lqlib.kernels.attention.decode_attention` under each launch configuration of ``CONFIGS``.

Effective bandwidth = bytes the method must read (float16 K/V, or int8 codes + int16 step codes)
/ median time, next to a device-to-device ``copy_`` of 1 GiB timed in the same run (read + written).
Correctness on the GPU: the fused kernel against :func:`reference_decode_attention` at one shape.

Writes ``gpu_attention_<card>_<date>.json`` under ``--out`` (default ``results/``) and prints a table.

    python benchmarks/gpu_attention.py [--contexts 32768 131072] [--batches 1 8] [--repeats 20] [--out results]
    python benchmarks/gpu_attention.py --smoke      # CPU, TRITON_INTERPRET=1, tiny sizes, JSON to a temp dir
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

if "--smoke" in sys.argv:  # must be set before Triton is imported
    os.environ["TRITON_INTERPRET"] = "1"

import torch
import torch.nn.functional as F

from lqlib import E8Codec
from lqlib import kernels as K
from lqlib.kernels.attention import (
    AttentionConfig,
    decode_attention,
    reference_decode_attention,
)

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_codec import time_ms as cuda_time_ms  # noqa: E402

# (block_n, num_warps, num_stages); the first is the library's default
CONFIGS = [(256, 4, 2), (128, 4, 3), (128, 4, 2)]
SMOKE_CONFIGS = [(64, 4, 3), (32, 4, 3)]


def time_ms(fn, repeats: int, cuda: bool, warmup: int = 3) -> list[float]:
    """Times in ms: CUDA events as benchmarks/gpu_codec.py (GPU busy while the host queues), or the
    wall clock in the interpreter."""
    if cuda:
        return cuda_time_ms(fn, repeats, warmup)
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t0) * 1e3)
    return out


def row(label: str, times: list[float], nbytes: int, copy_gbs: float | None, **extra) -> dict:
    med = statistics.median(times)
    r = {
        "method": label,
        "median_ms": med,
        "min_ms": min(times),
        "max_ms": max(times),
        "bytes_read": nbytes,
        "GB_per_s": nbytes / (med * 1e-3) / 1e9,
        **extra,
    }
    if copy_gbs:
        r["fraction_of_copy"] = r["GB_per_s"] / copy_gbs
    return r


def make_cache(b: int, hkv: int, n: int, d: int, codec: E8Codec, dev: str, seed: int):
    """float16 K/V (B, Hkv, n, d) with per-vector scales, key scales (Hkv, d), and their codes."""
    gen = torch.Generator(device=dev).manual_seed(seed)
    k = torch.randn(b, hkv, n, d, generator=gen, device=dev, dtype=torch.float16)
    k *= torch.exp(0.5 * torch.randn(b, hkv, n, 1, generator=gen, device=dev)).half()
    v = torch.randn(b, hkv, n, d, generator=gen, device=dev, dtype=torch.float16)
    v *= torch.exp(0.5 * torch.randn(b, hkv, n, 1, generator=gen, device=dev)).half()
    key_scales = (0.5 + torch.rand(hkv, d, generator=gen, device=dev)).half()
    k *= key_scales[None, :, None, :]  # channels of different sizes, which the scales undo
    kc, ks = K.quantize(codec, k / key_scales[None, :, None, :])
    vc, vs = K.quantize(codec, v)
    return k, v, key_scales, kc, ks, vc, vs


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--contexts", type=int, nargs="+", default=[32768, 131072])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--q-heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--bits", type=float, default=4.0)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--out", default="results")
    ap.add_argument("--smoke", action="store_true", help="CPU interpreter at tiny sizes, JSON to a temp dir")
    args = ap.parse_args(argv)
    cuda = torch.cuda.is_available() and not args.smoke
    if not cuda and not args.smoke:
        raise SystemExit("needs CUDA (or --smoke)")
    configs = CONFIGS
    if args.smoke:
        args.contexts, args.batches, args.q_heads, args.kv_heads, args.dim, args.repeats = (
            [200, 333],
            [1, 2],
            8,
            2,
            64,
            2,
        )
        args.out = tempfile.mkdtemp(prefix="gpu_attention_smoke_")
        configs = SMOKE_CONFIGS
    dev = "cuda" if cuda else "cpu"
    import triton

    t_start = time.time()
    props = torch.cuda.get_device_properties(0) if cuda else None
    card = props.name if cuda else "cpu-interpreter"
    result: dict = {
        "benchmark": "benchmarks/gpu_attention.py",
        "card": card,
        "multiprocessors": props.multi_processor_count if cuda else None,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "bits": args.bits,
        "repeats": args.repeats,
        "smoke": args.smoke,
        "shape": {"q_heads": args.q_heads, "kv_heads": args.kv_heads, "head_dim": args.dim, "dtype": "float16"},
        "configs": [{"block_n": c[0], "num_warps": c[1], "num_stages": c[2]} for c in configs],
    }
    codec = E8Codec(args.bits, rotation="rht", scale="vector", seed=0)
    hq, hkv, d = args.q_heads, args.kv_heads, args.dim

    # copy bandwidth of this card
    copy_gbs = None
    if cuda:
        buf = torch.empty(2**30, dtype=torch.uint8, device=dev)
        dst = torch.empty_like(buf)
        copy = row("copy_ 1 GiB", time_ms(lambda: dst.copy_(buf), args.repeats, cuda), 2 * buf.numel(), None)
        buf = dst = None
        copy_gbs = copy["GB_per_s"]
        result["copy"] = copy
        print(f"copy: {copy['median_ms']:.3f} ms, {copy_gbs:.0f} GB/s (read + written)", flush=True)

    # correctness on this device at one shape, against the torch reference (and float16 SDPA on the originals)
    n0 = min(args.contexts)
    k, v, ks_, kc, ksc, vc, vsc = make_cache(1, hkv, n0, d, codec, dev, seed=1)
    q = torch.randn(1, hq, d, device=dev, dtype=torch.float16)
    length = n0 - 37
    checks = []
    for cfg in configs:
        out = decode_attention(q, kc, ksc, vc, vsc, length, codec, codec, key_scales=ks_, config=AttentionConfig(*cfg))
        ref = reference_decode_attention(q, kc, ksc, vc, vsc, length, codec, codec, key_scales=ks_)
        err = (out.float() - ref.float()).abs().max().item()
        checks.append(
            {
                "config": list(cfg),
                "length": length,
                "max_abs_error_vs_reference": err,
                "reference_max_abs": ref.abs().max().item(),
                "ok": err <= 2e-3 * max(1.0, ref.abs().max().item()),
            }
        )
    sdpa = F.scaled_dot_product_attention(q[:, :, None], k[:, :, :length], v[:, :, :length], enable_gqa=True)[:, :, 0]
    result["correctness"] = {
        "checks": checks,
        "all_ok": all(c["ok"] for c in checks),
        "max_abs_vs_sdpa_on_unquantized": (out.float() - sdpa.float()).abs().max().item(),
        "sdpa_max_abs": sdpa.abs().max().item(),
    }
    print(
        f"correctness vs reference (length {length}): "
        + ", ".join(f"{c['config']}: {c['max_abs_error_vs_reference']:.2e}" for c in checks)
        + f"; all ok: {result['correctness']['all_ok']}; vs SDPA on the unquantized cache "
        f"{result['correctness']['max_abs_vs_sdpa_on_unquantized']:.3f} (quantization error)",
        flush=True,
    )
    del k, v, kc, ksc, vc, vsc

    rows = []
    summary = []
    for n in args.contexts:
        for b in args.batches:
            k, v, ks_, kc, ksc, vc, vsc = make_cache(b, hkv, n, d, codec, dev, seed=n + b)
            q = torch.randn(b, hq, d, device=dev, dtype=torch.float16)
            q4 = q[:, :, None]
            fp16_bytes = 2 * k.numel() * 2
            coded_bytes = 2 * (kc.numel() + ksc.numel() * 2)
            shape = {"batch": b, "context": n}
            r_a = row(
                "sdpa fp16 enable_gqa",
                time_ms(lambda: F.scaled_dot_product_attention(q4, k, v, enable_gqa=True), args.repeats, cuda),
                fp16_bytes,
                copy_gbs,
                **shape,
            )
            kr, vr = k.repeat_interleave(hq // hkv, dim=1), v.repeat_interleave(hq // hkv, dim=1)
            r_b = row(
                "sdpa fp16 repeat_interleave",
                time_ms(lambda: F.scaled_dot_product_attention(q4, kr, vr), args.repeats, cuda),
                fp16_bytes * (hq // hkv),
                copy_gbs,
                **shape,
            )
            kr = vr = None  # free them (not del: the lambdas above name them)
            scales4 = ks_[None, :, None, :]

            def dequant_sdpa():
                kd = K.dequantize(codec, kc, ksc, torch.float16) * scales4
                vd = K.dequantize(codec, vc, vsc, torch.float16)
                return F.scaled_dot_product_attention(q4, kd, vd, enable_gqa=True)

            r_c = row(
                "dequantize kernel + sdpa", time_ms(dequant_sdpa, args.repeats, cuda), coded_bytes, copy_gbs, **shape
            )
            fused = []
            for cfg in configs:
                conf = AttentionConfig(*cfg)
                fused.append(
                    row(
                        f"fused {cfg[0]}/{cfg[1]}/{cfg[2]}",
                        time_ms(
                            lambda: decode_attention(q, kc, ksc, vc, vsc, n, codec, codec, key_scales=ks_, config=conf),
                            args.repeats,
                            cuda,
                        ),
                        coded_bytes,
                        copy_gbs,
                        config=list(cfg),
                        **shape,
                    )
                )
            base = min((r_a, r_b), key=lambda r: r["median_ms"])
            best = min(fused, key=lambda r: r["median_ms"])
            default = fused[0]
            for r in (r_a, r_b, r_c, *fused):
                r["speedup_vs_baseline"] = base["median_ms"] / r["median_ms"]
                rows.append(r)
            summary.append(
                {
                    **shape,
                    "baseline": base["method"],
                    "baseline_ms": base["median_ms"],
                    "fused_default_ms": default["median_ms"],
                    "fused_default_speedup": base["median_ms"] / default["median_ms"],
                    "fused_best": best["method"],
                    "fused_best_ms": best["median_ms"],
                    "fused_best_speedup": base["median_ms"] / best["median_ms"],
                    "fused_best_fraction_of_copy": best.get("fraction_of_copy"),
                }
            )
            print(
                f"B={b} n={n}: "
                + "  ".join(f"{r['method']} {r['median_ms']:.3f} ms" for r in (r_a, r_b, r_c))
                + "\n    fused: "
                + "  ".join(f"{r['method'][6:]} {r['median_ms']:.3f}" for r in fused)
                + f"  -> best {best['median_ms']:.3f} ms, {base['median_ms'] / best['median_ms']:.2f}x vs "
                f"{base['method']}"
                + (f", {best['GB_per_s']:.0f} GB/s = {best['fraction_of_copy']:.0%} of copy" if cuda else "")
                + f"  [{time.time() - t_start:.0f} s]",
                flush=True,
            )
            k = v = kc = ksc = vc = vsc = q = q4 = None
            if cuda:
                torch.cuda.empty_cache()
    result["rows"] = rows
    result["summary"] = summary
    result["wall_s"] = time.time() - t_start
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    slug = re.sub(r"[^A-Za-z0-9]+", "-", card).strip("-").lower()
    path = out / f"gpu_attention_{slug}_{datetime.date.today().isoformat()}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\n{'batch':>5} {'context':>8} {'baseline ms':>12} {'fused ms':>9} {'speedup':>8}  best config")
    for s in summary:
        print(
            f"{s['batch']:>5} {s['context']:>8} {s['baseline_ms']:>12.3f} {s['fused_best_ms']:>9.3f} "
            f"{s['fused_best_speedup']:>7.2f}x  {s['fused_best']}"
        )
    print(f"wrote {path} ({result['wall_s']:.0f} s)")
    return 0 if result["correctness"]["all_ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
