"""End-to-end greedy decode with the whole step in one CUDA graph: the nested E8 device cache against
transformers' float16 StaticCache in one graph (the fair baseline) and the eager DynamicCache; the
bandwidth floor; the longest context the card holds with each (CUDA; ``--smoke``: CPU interpreter).

Model: Llama-3.1-8B shapes with random weights (benchmarks/gpu_decode.py builds it; float16; nothing
is downloaded). For each context × batch, a prompt of random ids is prefilled in chunks of
``--chunk`` tokens, then greedy decoding is timed (median of ``--repeats`` blocks of ``--new-tokens``
steps after the warm-up, CUDA events) with

* ``dynamic_eager``: ``DynamicCache``, SDPA, one eager forward per step (transformers' default);
* ``static_graph``: ``StaticCache`` (capacity = prompt + steps), SDPA with the query heads of a KV
  head as its rows (:func:`lqlib.cache.decode_graph.gqa_decode_attention_forward`: K/V read once), the
  whole step recorded once as a CUDA graph by :class:`lqlib.cache.decode_graph.GraphedDecoder` and replayed;
  SDPA with a mask does not split the sequence across programs and reads the whole capacity;
* ``static_split_k_graph``: the same with the float16 split-K kernel
  (:func:`lqlib.cache.decode_graph.split_k_decode_attention_forward`: the coded caches' kernel design
  on the float16 cache, reading only the tokens written) — the strongest float16 baseline we have;
* ``static_compile``: ``StaticCache`` with transformers' SDPA and the forward compiled by
  ``torch.compile(mode="reduce-overhead")`` (Inductor's kernels and CUDA graphs), prefill eager;
* ``nested_graph``: :class:`lqlib.cache.device.DeviceKVCache` with ``format="nested"`` (capacity
  reserved), decode attention over the words, the whole step in one graph;
* ``int8_graph``: the same with the int8 format (for reference).

Bandwidth floor per step: (weight bytes + the KV bytes the step must read) / the copy rate measured
in the same run (a 1 GiB ``copy_``, read + written). The static cache reads its whole capacity.

Capacity (batch 1): after the weights, the free memory less ``--reserve-gib`` over the bytes per
token of each cache gives a token count; one decode step is then run at that length (StaticCache:
``cache_position`` at the end of a zero cache; nested: the device lengths set to it over zero words)
and the count lowered by 4% until the step runs. The ratio of the two counts is the capacity gain.

Agreement (short context): the graphed nested decoder against the eager nested cache (the same
kernels: identical logits expected) and the eager cache against a quantize–dequantize cache through
the same format with SDPA.

Writes ``gpu_nested_decode_<card>_<date>.json`` under ``--out`` after every case.

    python benchmarks/gpu_nested_decode.py [--contexts 8192 32768] [--batches 1 8] [--out results]
    python benchmarks/gpu_nested_decode.py --smoke
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

if "--smoke" in sys.argv:  # before Triton is imported
    os.environ["TRITON_INTERPRET"] = "1"

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_decode import Timer, build_model, llama_8b_config  # noqa: E402

from lqlib.book.gpu_results import FP16_GRAPH_CACHES, RUN_CHOICES  # noqa: E402

FLAGS = tuple(RUN_CHOICES)  # the lqlib.kernels.nested flags --flags may turn on


def add_choice_arguments(ap: argparse.ArgumentParser) -> None:
    """``--lean``, ``--flags`` (nested-kernel choices to turn on for the run) and ``--tag`` (a file-name suffix)."""
    ap.add_argument("--lean", action="store_true", help="the nested cache decodes pairs of lanes leanly")
    ap.add_argument("--tag", default="", help="a suffix for the record's file name")
    ap.add_argument("--flags", nargs="*", default=[], help="lqlib.kernels.nested flags to turn on", choices=FLAGS)
    ap.add_argument("--search", type=int, default=0, help="the nested caches' encoder step search (0 = none)")


def apply_choices(args: argparse.Namespace):
    """Turn on the choices of :func:`add_choice_arguments` in :mod:`lqlib.kernels.nested`; return the module."""
    from lqlib.kernels import nested as kn

    kn.LEAN_PAIRS = kn.LEAN_PAIRS or args.lean
    for flag in args.flags:
        setattr(kn, flag, True)
    return kn


KINDS = ("dynamic_eager", "static_graph", "static_split_k_graph", "static_compile", "nested_graph", "int8_graph")
ALL_KINDS = (*KINDS, "static_graph_sdpa")
FP16_KINDS = FP16_GRAPH_CACHES  # the float16 one-graph baselines: ratios are against the fastest in the case
TARGETS = {1: 1.0, 8: 1.5}  # nested_graph tokens/s over static_graph's at 32K, per batch
TARGET_CAPACITY = 3.5


def write(result: dict, path: Path) -> None:
    path.write_text(json.dumps(result, indent=2) + "\n")


def make_cache(kind: str, model, capacity: int, search: int = 0):
    from transformers import DynamicCache, StaticCache

    from lqlib.cache.device import ATTENTION, DeviceKVCache

    if kind == "dynamic_eager":
        model.set_attn_implementation("sdpa")
        return DynamicCache(config=model.config)
    if kind == "static_graph":  # SDPA with the query heads of a KV head as rows: K/V read once
        from lqlib.cache.decode_graph import register_fp16_decode_attention

        model.set_attn_implementation(register_fp16_decode_attention())
        return StaticCache(config=model.config, max_cache_len=capacity)
    if kind == "static_split_k_graph":
        from lqlib.cache.decode_graph import register_fp16_decode_attention

        model.set_attn_implementation(register_fp16_decode_attention(split_k=True))
        return StaticCache(config=model.config, max_cache_len=capacity)
    if kind in ("static_graph_sdpa", "static_compile"):  # transformers' SDPA path (repeats K/V for its mask)
        model.set_attn_implementation("sdpa")
        return StaticCache(config=model.config, max_cache_len=capacity)
    model.set_attn_implementation(ATTENTION)
    if kind == "nested_graph":
        return DeviceKVCache(model.config, 4.0, capacity=capacity, format="nested", search=search)
    return DeviceKVCache(model.config, 4.0, capacity=capacity, format="int8")


def kv_bytes(kind: str, cache, config, batch: int, tokens: int, capacity: int) -> tuple[int, int]:
    """(bytes held, bytes a decode step reads) of the KV cache."""
    if kind in ("nested_graph", "int8_graph"):
        held = cache.nbytes()
        return held, held
    per_token = 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim * 2 * batch
    whole = kind in ("static_graph", "static_graph_sdpa", "static_compile")  # SDPA with a mask reads it all
    return per_token * tokens, per_token * (capacity if whole else tokens)


@torch.inference_mode()
def prefill(model, cache, ids: torch.Tensor, chunk: int, kw: str) -> torch.Tensor:
    """Feed ``ids`` (batch, n) in chunks; returns the greedy next tokens (batch, 1)."""
    n = ids.shape[1]
    for start in range(0, n, chunk):
        part = ids[:, start : start + chunk]
        out = model(
            input_ids=part,
            cache_position=torch.arange(start, start + part.shape[1], device=ids.device),
            use_cache=True,
            logits_to_keep=1,
            **{kw: cache},
        )
    return out.logits[:, -1].argmax(-1, keepdim=True)


def run_case(kind, model, ids, args, timer, device) -> dict:
    from lqlib.cache.decode_graph import GraphedDecoder
    from lqlib.cache.device import cache_kwarg

    kw = cache_kwarg(model)
    batch, n = ids.shape
    steps = args.warmup + 2 + args.repeats * args.new_tokens
    capacity = n + steps + 8
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    cache = make_cache(kind, model, capacity, args.search)
    t0 = time.time()
    if kind == "dynamic_eager":
        tok = prefill(model, cache, ids, args.chunk, kw)
        state = {"tok": tok}

        @torch.inference_mode()
        def decode(k: int) -> None:
            t = state["tok"]
            for _ in range(k):
                t = model(input_ids=t, use_cache=True, **{kw: cache}).logits[:, -1].argmax(-1, keepdim=True)
            state["tok"] = t

        decode(args.warmup)
    elif kind == "static_compile":
        tok = prefill(model, cache, ids, args.chunk, kw)
        step = torch.compile(model.forward, mode="reduce-overhead", fullgraph=False)
        state = {"tok": tok, "pos": torch.full((1,), n, device=ids.device, dtype=torch.long)}

        @torch.inference_mode()
        def decode(k: int) -> None:
            t, pos = state["tok"], state["pos"]
            for _ in range(k):
                out = step(input_ids=t, cache_position=pos, use_cache=True, **{kw: cache})
                t = out.logits[:, -1].argmax(-1, keepdim=True)
                pos = pos + 1
            state["tok"], state["pos"] = t, pos

        decode(args.warmup)  # compiles (and records its graphs) here
    else:
        decoder = GraphedDecoder(model, cache, warmup=args.warmup)
        decoder.prefill(ids, chunk=args.chunk)
        decode = decoder.decode
    prefill_s = time.time() - t0
    blocks = [timer(lambda: decode(args.new_tokens)) for _ in range(args.repeats)]
    med = statistics.median(blocks)
    tokens_held = cache.get_seq_length() if not kind.startswith("static") else n + steps
    held, read = kv_bytes(kind, cache, model.config, batch, tokens_held, capacity)
    row = {
        "cache": kind,
        "batch": batch,
        "context": n,
        "prefill_s": prefill_s,
        "block_ms": blocks,
        "ms_per_step": med / args.new_tokens,
        "tokens_per_s": batch * args.new_tokens / (med * 1e-3),
        "kv_bytes": held,
        "kv_bytes_read_per_step": read,
        "capacity_tokens": capacity,
    }
    if device.type == "cuda":
        row["max_memory_allocated"] = torch.cuda.max_memory_allocated()
    cache = None
    return row


@torch.inference_mode()
def agreement(model, args, device) -> dict:
    """The graphed nested decoder against the eager nested cache, and the eager cache against a
    quantize-dequantize DynamicCache through the same format (SDPA), at a short context."""
    from lqlib.cache.decode_graph import GraphedDecoder
    from lqlib.cache.device import ATTENTION, DeviceKVCache, cache_kwarg
    from lqlib.cache.quantized import QuantizeDequantizeCache
    from lqlib.coding.nested import NestedE8Codec
    from lqlib.kernels import nested as kn

    codec = NestedE8Codec()
    kw = cache_kwarg(model)
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, model.config.vocab_size, (2, args.check_context), generator=gen).to(device)
    steps = args.check_steps

    def eager(cache, impl):
        model.set_attn_implementation(impl)
        logits = [model(input_ids=ids, use_cache=True, logits_to_keep=1, **{kw: cache}).logits[:, -1].float()]
        for _ in range(steps):
            tok = logits[-1].argmax(-1, keepdim=True)
            logits.append(model(input_ids=tok, use_cache=True, **{kw: cache}).logits[:, -1].float())
        return torch.stack(logits)

    def through_format(x):
        return kn.dequantize(codec, kn.quantize(codec, x), x.dtype)

    a = eager(DeviceKVCache(model.config, capacity=args.check_context + steps + 8, format="nested"), ATTENTION)
    b = eager(QuantizeDequantizeCache(through_format, model.config), "sdpa")
    model.set_attn_implementation(ATTENTION)
    cache = DeviceKVCache(model.config, capacity=args.check_context + steps + 8, format="nested")
    decoder = GraphedDecoder(model, cache, warmup=1)
    decoder.prefill(ids)
    graphed = [decoder.logits.float().clone()]  # after the warm-up step: a's step 1
    for _ in range(steps - 1):
        decoder.step()
        graphed.append(decoder.logits.float().clone())
    graphed = torch.stack(graphed)
    return {
        "context": args.check_context,
        "batch": 2,
        "steps": steps,
        "recorded_as_graph": decoder.graphed,
        "graph_logits_identical_to_eager": bool(torch.equal(graphed, a[1:])),
        "graph_max_abs_logit_diff": float((graphed - a[1:]).abs().max()),
        "prefill_logits_identical_to_reference": bool(torch.equal(a[0], b[0])),
        "decode_max_abs_logit_diff_vs_reference": float((a - b).abs().max()),
        "max_abs_logit": float(b.abs().max()),
        "greedy_tokens_agree": bool(torch.equal(a.argmax(-1), b.argmax(-1))),
    }


@torch.inference_mode()
def capacity(model, args, device, weights_bytes: int) -> dict:
    """Longest batch-1 context whose cache fits beside the weights and runs one decode step."""
    from transformers import StaticCache

    from lqlib.cache.device import ATTENTION, DeviceKVCache, cache_kwarg

    cfg = model.config
    kw = cache_kwarg(model)
    per_token = {
        "fp16_static": 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * 2,
        "nested": 2
        * cfg.num_hidden_layers
        * cfg.num_key_value_heads
        * (cfg.head_dim // 2 + 2 + -(-cfg.head_dim // 64)),
    }
    out = {"per_token_bytes": per_token, "reserve_gib": args.reserve_gib, "weights_bytes": weights_bytes}
    for kind, nbytes in per_token.items():
        torch.cuda.empty_cache()
        free, total = torch.cuda.mem_get_info()
        tokens = int((free - args.reserve_gib * 2**30) // nbytes) // 256 * 256
        tries = []
        while tokens > 0 and len(tries) < 6:
            try:
                tok = torch.zeros(1, 1, dtype=torch.long, device=device)
                pos = torch.full((1, 1), tokens - 1, dtype=torch.long, device=device)
                if kind == "fp16_static":
                    from lqlib.cache.decode_graph import register_fp16_decode_attention

                    model.set_attn_implementation(register_fp16_decode_attention())
                    cache = StaticCache(config=cfg, max_cache_len=tokens)
                    model(input_ids=tok, position_ids=pos, cache_position=pos[0], use_cache=True, **{kw: cache})
                else:
                    model.set_attn_implementation(ATTENTION)
                    cache = DeviceKVCache(cfg, 4.0, capacity=tokens, format="nested")
                    model(input_ids=tok[:, :0].new_zeros(1, 1), **{kw: cache})  # allocates (one token)
                    for layer in cache.layers:  # the whole capacity minus one, zero words
                        for t in (layer.words, layer.steps, layer.flags):
                            t.zero_()
                        layer.position.fill_(tokens - 1)
                        layer.lengths.fill_(tokens - 1)
                        layer.n_tokens = tokens - 1
                    model(input_ids=tok, position_ids=pos, cache_position=pos[0], use_cache=True, **{kw: cache})
                torch.cuda.synchronize()
                tries.append({"tokens": tokens, "ok": True})
                del cache
                break
            except torch.OutOfMemoryError as err:
                tries.append({"tokens": tokens, "ok": False, "error": str(err)[:300]})
                err = None
                cache = None
                gc.collect()
                torch.cuda.empty_cache()
                tokens = int(tokens * 0.96) // 256 * 256
        out[kind] = {
            "free_bytes_before": free,
            "total_bytes": total,
            "tries": tries,
            "tokens": tries[-1]["tokens"] if tries and tries[-1]["ok"] else 0,
        }
        torch.cuda.empty_cache()
    fp16, ours = out["fp16_static"]["tokens"], out["nested"]["tokens"]
    out["ratio"] = ours / fp16 if fp16 else float("nan")
    out["meets_target"] = bool(fp16 and ours / fp16 >= TARGET_CAPACITY)
    return out


def probe_fast_cvt(device) -> dict:
    """Run the attention kernel's inline-PTX word decoding once against the reference; if it fails or
    disagrees, the caches of this run use the portable decoding (recorded in the result)."""
    from lqlib.coding.nested import NestedE8Codec
    from lqlib.kernels import nested as kn

    codec = NestedE8Codec()
    gen = torch.Generator(device=device).manual_seed(0)
    k, v = torch.randn(2, 2, 4, 300, 128, generator=gen, device=device, dtype=torch.float16)
    keys, values = kn.quantize(codec, k), kn.quantize(codec, v)
    q = torch.randn(2, 16, 128, generator=gen, device=device, dtype=torch.float16)
    ref = kn.reference_decode_attention(q, keys, values, 299, codec, codec)
    try:
        got = kn.decode_attention(q, keys, values, 299, codec, codec, fast_cvt=True)
        err = float((got.float() - ref.float()).abs().max())
        ok = err <= 5e-4 * float(ref.float().abs().max()) + 2e-3
        row = {"used": ok, "max_abs_error": err}
    except Exception as exc:  # noqa: BLE001 - recorded; the portable decoding is used instead
        row = {"used": False, "error": repr(exc)[:600]}
    kn.FAST_CVT_ON_CUDA = row["used"]
    return row


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--contexts", type=int, nargs="+", default=[8192, 32768])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--kinds", nargs="+", default=list(KINDS), choices=ALL_KINDS)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=4)
    ap.add_argument("--chunk", type=int, default=4096)
    ap.add_argument("--check-context", type=int, default=512)
    ap.add_argument("--check-steps", type=int, default=6)
    ap.add_argument("--reserve-gib", type=float, default=2.0)
    ap.add_argument("--no-capacity", action="store_true")
    ap.add_argument("--out", default="results")
    ap.add_argument("--smoke", action="store_true")
    add_choice_arguments(ap)
    args = ap.parse_args(argv)
    kn = apply_choices(args)
    if args.smoke:
        args.contexts, args.batches, args.new_tokens, args.repeats, args.warmup = [40], [1, 2], 2, 1, 1
        args.chunk, args.check_context, args.check_steps, args.no_capacity = 16, 24, 2, True
        if args.out == "results":
            args.out = tempfile.mkdtemp(prefix="gpu_nested_decode_smoke_")
        device = torch.device("cpu")
    else:
        if not torch.cuda.is_available():
            raise SystemExit("needs CUDA (or --smoke)")
        device = torch.device("cuda")
    import transformers
    import triton

    t_start = time.time()
    torch.backends.cuda.matmul.allow_tf32 = False
    config = llama_8b_config(args.smoke)
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu-interpreter"
    result: dict = {
        "benchmark": "benchmarks/gpu_nested_decode.py",
        "card": card,
        "smoke": args.smoke,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "transformers": transformers.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "model": "Llama-3.1-8B shapes, random weights (normal std 0.02), float16" if not args.smoke else "tiny",
        "new_tokens_per_block": args.new_tokens,
        "repeats": args.repeats,
        "warmup_steps": args.warmup,
        "targets": {"vs_static_graph_at_32k": TARGETS, "capacity": TARGET_CAPACITY},
        "static_graph_attention": "lqlib_fp16_decode",  # the fp16 baseline's attention (K/V read once)
        "lean_pairs": kn.LEAN_PAIRS,
        "nested_flags": {flag: getattr(kn, flag) for flag in FLAGS},
        "nested_search": args.search,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    slug = re.sub(r"[^A-Za-z0-9]+", "-", card).strip("-").lower()
    suffix = f"_{args.tag}" if args.tag else "_lean" if args.lean else ""
    path = out / f"gpu_nested_decode_{slug}_{datetime.date.today().isoformat()}{suffix}.json"
    model = build_model(config, device, torch.float16)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    result["weights_bytes"] = weights
    if device.type == "cuda":
        buf = torch.empty(2**29, dtype=torch.float16, device=device).normal_()
        dst = torch.empty_like(buf)
        for _ in range(3):
            dst.copy_(buf)
        times = []
        for _ in range(10):
            times.append(Timer(device)(lambda: dst.copy_(buf)))
        result["copy_GB_per_s"] = 2 * buf.numel() * 2 / (statistics.median(times) * 1e-3) / 1e9
        del buf, dst
        torch.cuda.empty_cache()
    copy = result.get("copy_GB_per_s")
    if device.type == "cuda":
        result["fast_cvt"] = probe_fast_cvt(device)
        print(f"fast word decoding (inline PTX): {result['fast_cvt']}", flush=True)
    t0 = time.time()
    try:
        result["agreement"] = agreement(model, args, device)
    except Exception as err:  # noqa: BLE001 - recorded; the timings still run
        result["agreement"] = {"error": repr(err)[:600]}
    print(f"agreement: {result['agreement']} ({time.time() - t0:.0f} s)", flush=True)
    write(result, path)
    timer = Timer(device)
    rows, summary = [], []
    for n in args.contexts:
        for b in args.batches:
            gen = torch.Generator().manual_seed(n + b)
            ids = torch.randint(0, config.vocab_size, (b, n), generator=gen).to(device)
            case = {}
            for kind in args.kinds:
                t0 = time.time()
                try:
                    row = run_case(kind, model, ids, args, timer, device)
                except Exception as err:  # noqa: BLE001 - one failing kind must not cost the others
                    row = {"cache": kind, "batch": b, "context": n, "error": repr(err)[:600]}
                    print(f"  {kind} b={b} n={n} FAILED {row['error']}", flush=True)
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
                    rows.append(row)
                    continue
                if copy:
                    row["floor_ms"] = (weights + row["kv_bytes_read_per_step"]) / (copy * 1e9) * 1e3
                rows.append(row)
                case[kind] = row
                print(
                    f"  n={n:6d} b={b} {kind:13s} {row['ms_per_step']:7.2f} ms/step {row['tokens_per_s']:8.1f} tok/s "
                    f"KV {row['kv_bytes'] / 2**20:9.1f} MiB floor {row.get('floor_ms', float('nan')):.2f} ms "
                    f"[{time.time() - t0:.0f} s]",
                    flush=True,
                )
                result["rows"] = rows
                write(result, path)
            fp16 = [case[k] for k in FP16_KINDS if k in case]
            base = min(fp16, key=lambda r: r["ms_per_step"]) if fp16 else None
            for kind, row in case.items():
                if base is None or kind == base["cache"]:
                    continue
                summary.append(
                    {
                        "context": n,
                        "batch": b,
                        "cache": kind,
                        "ms_per_step": row["ms_per_step"],
                        "baseline": base["cache"],
                        "static_graph_ms_per_step": base["ms_per_step"],
                        "speedup_vs_static_graph": base["ms_per_step"] / row["ms_per_step"],
                        "floor_ms": row.get("floor_ms"),
                        "static_floor_ms": base.get("floor_ms"),
                        "kv_ratio_vs_fp16": base["kv_bytes"] / row["kv_bytes"] if row["kv_bytes"] else None,
                    }
                )
            result["summary"] = summary
            write(result, path)
            del ids
    if not args.no_capacity and device.type == "cuda":
        t0 = time.time()
        result["capacity"] = capacity(model, args, device, weights)
        c = result["capacity"]
        print(
            f"capacity: fp16 {c['fp16_static']['tokens']} tokens, nested {c['nested']['tokens']} "
            f"({c['ratio']:.2f}x) [{time.time() - t0:.0f} s]",
            flush=True,
        )
    result["wall_s"] = time.time() - t_start
    write(result, path)
    print(f"\n{'ctx':>6} {'b':>2} {'cache':>13} {'ms/step':>8} {'static':>8} {'ratio':>6} {'floor':>6}")
    for s in summary:
        print(
            f"{s['context']:6d} {s['batch']:2d} {s['cache']:>13} {s['ms_per_step']:8.2f} "
            f"{s['static_graph_ms_per_step']:8.2f} "
            f"{s['speedup_vs_static_graph']:6.2f} {s['floor_ms'] or float('nan'):6.2f}"
        )
    print(f"wrote {path} ({result['wall_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
