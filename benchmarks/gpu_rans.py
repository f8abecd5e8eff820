"""GPU interleaved multi-lane rANS (lqlib.kernels.rans) at the Llama-3.1-8B KV shape: decode and encode throughput.

1. Codes: the E8 quantize kernel on random normal KV with per-vector scales, shape
   (2·layers, KV heads, tokens, d), cut into pages of ``--page-tokens`` tokens × KV heads × d of one
   layer's keys or values (8192 E8 blocks a page by default).
2. Checks: GPU decode == the codes (every page), GPU pages == CPU encoder pages byte for byte and
   CPU decode of GPU pages == GPU decode of CPU pages on a subset; coded bits/dim against the
   constriction coder (lqlib.coding.rans) on that subset.
3. Timing with CUDA events (median of ``--repeats`` after warm-up): decode and encode for several
   launch configurations and lanes per page. Decode throughput counts fp16-equivalent output,
   n_dims × 2 bytes / median time (issue 5's target: 100 GB/s on an H100); a device-to-device
   ``copy_`` of 1 GiB (bytes read + written) is timed in the same run.

Writes ``gpu_rans_<card>_<date>.json`` under ``--out`` (default ``results/``) and prints a table.
``--smoke`` runs everything on CPU tensors in Triton's interpreter at tiny sizes (wall-clock timings,
JSON into a temporary directory unless ``--out`` is given).

    python benchmarks/gpu_rans.py [--tokens 4096] [--bits 4] [--repeats 10] [--out results] [--smoke]
    PYTHONPATH=/path/to/triton-3.6:. python benchmarks/gpu_rans.py --aot   # registers/spills, no GPU
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

import numpy as np
import torch

# (lanes per program, warps, symbol lookup); lanes other than the first get the first two
# (128 lanes on 4 warps compiles to the same code as 64 on 2: 91 registers, no spills)
sys.path.insert(0, str(Path(__file__).resolve().parent))
if "--smoke" in sys.argv:  # before Triton is first imported (gpu_attention sets it too)
    os.environ["TRITON_INTERPRET"] = "1"
from gpu_attention import time_ms  # noqa: E402  (CUDA events as gpu_codec times them, or the wall clock)

DECODE_CONFIGS = [(32, 1, "packed"), (32, 1, "bucket"), (64, 2, "packed"), (64, 2, "bucket"), (32, 1, "two_level")]
ENCODE_CONFIGS = [(32, 1), (64, 2)]


def aot_report(n_blocks: int, n_lanes: int) -> list[dict]:
    """Compile the kernels for sm_90 without a GPU (``triton.compile`` of the Triton on the path, e.g.
    3.6) and read registers, stack (spills) and SASS instruction counts off the cubins."""
    import subprocess

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from lqlib.kernels import _rans_triton as R
    from lqlib.kernels import rans as KR

    tools = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    k = -(-n_blocks // n_lanes)
    cap = 2 + 41 * k
    layout = {"L": n_lanes, "NB": n_blocks, "K": k}
    dec_sig = dict.fromkeys(
        ["words_ptr", "start_ptr", "count_ptr", "dec_ptr", "sym_ptr", "enc_ptr", "bucket_ptr", "out_ptr", "err_ptr"],
        "*i32",
    ) | {"words_ptr": "*i16", "sym_ptr": "*u8"}
    dec_sig |= dict.fromkeys(["n_lanes_total", "r_free", "r_half", "A"], "i32")
    enc_sig = {"in_ptr": "*i32", "enc_ptr": "*i32", "scratch_ptr": "*i16", "count_ptr": "*i32"}
    enc_sig |= dict.fromkeys(["n_lanes_total", "r_free", "r_half", "A"], "i32")
    pack_sig = {
        "scratch_ptr": "*i16",
        "count_ptr": "*i32",
        "dst_ptr": "*i32",
        "out_ptr": "*i16",
        "n_lanes_total": "i32",
    }
    jobs = [
        (
            f"decode {bl}/{w} {lookup}{' symbols' if sym else ''}",
            R.rans_decode_kernel,
            dec_sig,
            {**layout, "BLOCK": bl, "TO_SYMBOLS": sym, "LOOKUP": KR.LOOKUPS[lookup]},
            w,
        )
        for bl, w, lookup, sym in [*((*c, False) for c in DECODE_CONFIGS), (64, 2, "packed", True)]
    ]
    jobs += [
        (
            f"encode {bl}/{w}",
            R.rans_encode_kernel,
            enc_sig,
            {**layout, "CAP": cap, "BLOCK": bl, "FROM_SYMBOLS": False},
            w,
        )
        for bl, w in ENCODE_CONFIGS
    ]
    jobs.append(("pack 64/2", R.rans_pack_kernel, pack_sig, {"CAP": cap, "BLOCK": 64, "CHUNK": 32}, 2))
    out = []
    for name, kernel, sig, constants, warps in jobs:
        t0 = time.time()
        n_ptr = sum(v.startswith("*") for v in sig.values())
        attrs = {(i,): [["tt.divisibility", 16]] for i in range(n_ptr)}
        compiled = triton.compile(
            ASTSource(kernel, {**sig, **dict.fromkeys(constants, "constexpr")}, constants, attrs),
            target=GPUTarget("cuda", 90, 32),
            options={"num_warps": warps},
        )
        with tempfile.TemporaryDirectory() as tmp:
            cubin = Path(tmp) / "k.cubin"
            cubin.write_bytes(compiled.asm["cubin"])
            usage = subprocess.run(
                [tools / "cuobjdump", "--dump-resource-usage", cubin], capture_output=True, text=True
            ).stdout
            sass = subprocess.run([tools / "cuobjdump", "--dump-sass", cubin], capture_output=True, text=True).stdout
        regs, stack = re.search(r"REG:(\d+) STACK:(\d+)", usage).groups()
        row = {
            "kernel": name,
            "registers": int(regs),
            "stack_bytes": int(stack),
            "sass_instructions": len(re.findall(r"/\*[0-9a-f]{4,}\*/\s+\S", sass)),
            "compile_s": time.time() - t0,
        }
        out.append(row)
        print(
            f"{name:28s} REG {row['registers']:3d}  STACK {row['stack_bytes']:3d}  SASS {row['sass_instructions']:5d}",
            flush=True,
        )
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name, default in (("tokens", 4096), ("layers", 32), ("kv-heads", 8), ("dim", 128), ("page-tokens", 64)):
        ap.add_argument(f"--{name}", type=int, default=default)
    ap.add_argument("--lanes", type=int, nargs="+", default=[32, 64], help="lanes per page (the first is the default)")
    ap.add_argument("--bits", type=float, default=4.0)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--check-pages", type=int, default=32, help="pages checked against the CPU coder")
    ap.add_argument("--out", default=None)
    ap.add_argument("--smoke", action="store_true", help="CPU, Triton interpreter, tiny sizes")
    ap.add_argument(
        "--aot",
        action="store_true",
        help="only compile the kernels for sm_90 (no GPU needed) and print registers, spills and SASS sizes",
    )
    args = ap.parse_args(argv)
    if args.aot:
        import triton

        print(
            f"Triton {triton.__version__}, sm_90, pages of {args.kv_heads * args.page_tokens * args.dim // 8} "
            f"blocks, {args.lanes[0]} lanes"
        )
        aot_report(args.kv_heads * args.page_tokens * args.dim // 8, args.lanes[0])
        return 0
    if args.smoke:
        os.environ["TRITON_INTERPRET"] = "1"  # for main(["--smoke"]) too, as long as Triton is not imported yet
        args.tokens, args.layers, args.kv_heads, args.dim, args.page_tokens = 64, 1, 2, 64, 32
        args.lanes, args.repeats, args.check_pages = [8, 16], 2, 2
        out_dir = Path(args.out or tempfile.mkdtemp(prefix="gpu_rans_smoke_"))
    else:
        if not torch.cuda.is_available():
            raise SystemExit("needs CUDA (or --smoke)")
        out_dir = Path(args.out or "results")
    import triton

    from lqlib import E8Codec
    from lqlib import kernels as K
    from lqlib.coding import rans_lanes as RL
    from lqlib.coding.entropy_model import gaussian_symbol_model
    from lqlib.coding.rans import encode_symbols
    from lqlib.kernels import rans as KR

    cuda = not args.smoke
    device = torch.device("cuda" if cuda else "cpu")
    card = torch.cuda.get_device_name(0) if cuda else f"cpu-interpreter-{platform.machine()}"
    t_start = time.time()
    result: dict = {
        "benchmark": "benchmarks/gpu_rans.py",
        "card": card,
        "smoke": args.smoke,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "bits": args.bits,
        "repeats": args.repeats,
        "timing": "CUDA events, median after warm-up" if cuda else "wall clock (interpreter)",
    }

    # 1. codes from the quantize kernel, cut into pages
    if args.tokens % args.page_tokens:
        raise SystemExit("--tokens must be a multiple of --page-tokens")
    shape = (2 * args.layers, args.kv_heads, args.tokens, args.dim)
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(shape, generator=gen, device=device, dtype=torch.float16)
    x *= torch.exp(torch.randn(*shape[:-1], 1, generator=gen, device=device)).half()
    codec = E8Codec(args.bits, rotation="rht", scale="vector", seed=0)
    codes, _ = K.quantize(codec, x)
    del x
    n_pages = shape[0] * args.tokens // args.page_tokens
    pages = (
        codes.reshape(shape[0], args.kv_heads, args.tokens // args.page_tokens, args.page_tokens, args.dim)
        .permute(0, 2, 1, 3, 4)
        .reshape(n_pages, args.kv_heads, args.page_tokens, args.dim)
        .contiguous()
    )
    del codes
    n_dims = pages.numel()
    n_blocks = n_dims // n_pages // 8
    fp16_bytes = 2 * n_dims
    result["shape"] = {
        "what": "Llama-3.1-8B KV cache (K and V × layers, KV heads, tokens, head dim) in pages of "
        "page_tokens tokens × KV heads × head dim",
        "kv_shape": list(shape),
        "page_tokens": args.page_tokens,
        "pages": n_pages,
        "blocks_per_page": n_blocks,
        "dims": n_dims,
        "fp16_equivalent_bytes": fp16_bytes,
    }
    print(
        f"{card}: {n_pages} pages of {n_blocks} blocks, {n_dims / 1e6:.1f}M dims ({time.time() - t_start:.0f} s)",
        flush=True,
    )

    # 2. copy bandwidth
    if cuda:
        buf = torch.empty(2**30, dtype=torch.uint8, device=device)
        dst = torch.empty_like(buf)
        buf.random_(0, 255)
        t = statistics.median(time_ms(lambda: dst.copy_(buf), args.repeats, cuda))
        copy_gbs = 2 * buf.numel() / (t * 1e-3) / 1e9
        buf = dst = None
        result["copy"] = {
            "what": "torch copy_ of 1 GiB, device to device, read + written",
            "median_ms": t,
            "GB_per_s": copy_gbs,
        }
        print(f"copy: {t:.3f} ms, {copy_gbs:.0f} GB/s (read + written)", flush=True)
    else:
        copy_gbs = None

    def save(result: dict) -> Path:
        out_dir.mkdir(parents=True, exist_ok=True)
        slug = re.sub(r"[^A-Za-z0-9]+", "-", card).strip("-").lower()
        path = out_dir / f"gpu_rans_{slug}_{datetime.date.today().isoformat()}.json"
        path.write_text(json.dumps(result, indent=2) + "\n")
        return path

    # 3. checks and rates, per lane count (the JSON is written after each, marked incomplete until the end)
    sub = min(args.check_pages, n_pages)
    checks, rates, rows = [], [], []
    sub_codes = pages[:sub].cpu().numpy()
    constriction_bits = (
        32
        * encode_symbols(RL.codes_to_symbols(sub_codes).reshape(-1, 9), gaussian_symbol_model(args.bits)).size
        / sub_codes.size
    )
    for lanes in args.lanes:
        batch = KR.encode(pages, args.bits, lanes)
        nbytes = batch.nbytes()
        out, ok = KR.decode(batch)
        roundtrip = bool(ok.all()) and torch.equal(out.reshape(pages.shape), pages)
        gpu_pages = batch.to_pages()[:sub]
        cpu_pages = RL.encode_codes(sub_codes, args.bits, lanes)
        t0 = time.perf_counter()
        cpu_decoded = RL.decode_codes(gpu_pages)
        cpu_decode_s = time.perf_counter() - t0
        gpu_of_cpu, ok2 = KR.decode(KR.PageBatch.from_pages(cpu_pages, device))
        check = {
            "lanes": lanes,
            "gpu_roundtrip_all_pages": roundtrip,
            "pages_checked_on_cpu": sub,
            "gpu_pages_equal_cpu_pages": gpu_pages == cpu_pages,
            "cpu_decode_of_gpu_pages_exact": bool(np.array_equal(cpu_decoded.reshape(sub_codes.shape), sub_codes)),
            "gpu_decode_of_cpu_pages_exact": bool(ok2.all())
            and bool(np.array_equal(gpu_of_cpu.cpu().numpy().reshape(sub_codes.shape), sub_codes)),
            "cpu_numpy_decode_ms_per_page": 1e3 * cpu_decode_s / sub,
        }
        checks.append(check)
        rate = {
            "lanes": lanes,
            "bits_per_dim": 8 * nbytes / n_dims,
            "bits_per_dim_checked_pages": 8 * sum(len(p) for p in gpu_pages) / sub_codes.size,
            "constriction_bits_per_dim_checked_pages": constriction_bits,
        }
        rate["overhead_vs_constriction"] = rate["bits_per_dim_checked_pages"] - constriction_bits
        rates.append(rate)
        print(
            f"lanes {lanes}: checks {check}\n  {rate['bits_per_dim']:.4f} bits/dim "
            f"(constriction {constriction_bits:.4f} on {sub} pages, +{rate['overhead_vs_constriction']:.4f}) "
            f"({time.time() - t_start:.0f} s)",
            flush=True,
        )

        # 4. timing
        for bl, warps, lookup in DECODE_CONFIGS if lanes == args.lanes[0] else DECODE_CONFIGS[:2]:
            times = time_ms(lambda: KR.decode(batch, block=bl, num_warps=warps, lookup=lookup), args.repeats, cuda)
            med = statistics.median(times)
            row = {
                "kernel": "decode",
                "lanes": lanes,
                "block": bl,
                "num_warps": warps,
                "lookup": lookup,
                "median_ms": med,
                "min_ms": min(times),
                "max_ms": max(times),
                "fp16_equivalent_GB_per_s": fp16_bytes / (med * 1e-3) / 1e9,
                "bytes_read_written": nbytes + n_dims,
                "what": "decode() incl. its torch header/offset ops",
            }
            if copy_gbs:
                row["moved_fraction_of_copy"] = (nbytes + n_dims) / (med * 1e-3) / 1e9 / copy_gbs
            o, k = KR.decode(batch, block=bl, num_warps=warps, lookup=lookup)
            row["exact"] = bool(k.all()) and torch.equal(o.reshape(pages.shape), pages)
            o = k = None
            rows.append(row)
            print(
                f"  decode  L={lanes:3d} {bl:3d}/{warps} {lookup:9s} {med:9.3f} ms "
                f"{row['fp16_equivalent_GB_per_s']:8.1f} GB/s fp16-eq"
                f"  exact {row['exact']}",
                flush=True,
            )
        ref, batch, out = batch, None, None
        for bl, warps in ENCODE_CONFIGS if lanes == args.lanes[0] else ENCODE_CONFIGS[1:]:
            times = time_ms(lambda: KR.encode(pages, args.bits, lanes, block=bl, num_warps=warps), args.repeats, cuda)
            med = statistics.median(times)
            row = {
                "kernel": "encode",
                "lanes": lanes,
                "block": bl,
                "num_warps": warps,
                "median_ms": med,
                "min_ms": min(times),
                "max_ms": max(times),
                "fp16_equivalent_GB_per_s": fp16_bytes / (med * 1e-3) / 1e9,
                "what": "encode(): encode kernel, torch prefix sums, pack kernel, headers (no host sync)",
            }
            again = KR.encode(pages, args.bits, lanes, block=bl, num_warps=warps)
            row["exact"] = torch.equal(again.offsets, ref.offsets) and torch.equal(
                again.data[:nbytes], ref.data[:nbytes]
            )
            again = None
            rows.append(row)
            print(
                f"  encode  L={lanes:3d} {bl:3d}/{warps} {med:9.3f} ms "
                f"{row['fp16_equivalent_GB_per_s']:8.1f} GB/s fp16-eq"
                f"  exact {row['exact']}",
                flush=True,
            )
        ref = None
        save({**result, "checks": checks, "rates": rates, "rows": rows, "complete": False})

    result.update(checks=checks, rates=rates, rows=rows, complete=True)
    result["all_checks_pass"] = all(
        c["gpu_roundtrip_all_pages"]
        and c["gpu_pages_equal_cpu_pages"]
        and c["cpu_decode_of_gpu_pages_exact"]
        and c["gpu_decode_of_cpu_pages_exact"]
        for c in checks
    ) and all(r["exact"] for r in rows)
    best_d = max((r for r in rows if r["kernel"] == "decode"), key=lambda r: r["fp16_equivalent_GB_per_s"])
    best_e = max((r for r in rows if r["kernel"] == "encode"), key=lambda r: r["fp16_equivalent_GB_per_s"])
    result["best"] = {
        "decode": best_d,
        "encode": best_e,
        "target_decode_GB_per_s": 100.0,
        "decode_meets_target": best_d["fp16_equivalent_GB_per_s"] >= 100.0,
    }
    result["wall_s"] = time.time() - t_start
    path = save(result)
    print(f"\nall checks pass: {result['all_checks_pass']}")
    print(
        f"best decode L={best_d['lanes']} {best_d['block']}/{best_d['num_warps']} {best_d['lookup']}: "
        f"{best_d['fp16_equivalent_GB_per_s']:.1f} GB/s fp16-equivalent (target 100)"
        + (f", copy {copy_gbs:.0f} GB/s" if copy_gbs else "")
    )
    print(
        f"best encode L={best_e['lanes']} {best_e['block']}/{best_e['num_warps']}: "
        f"{best_e['fp16_equivalent_GB_per_s']:.1f} GB/s fp16-equivalent"
    )
    print(f"wrote {path} ({result['wall_s']:.0f} s)")
    return 0 if result["all_checks_pass"] else 1


if __name__ == "__main__":
    sys.exit(main())
