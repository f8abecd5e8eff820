"""End-to-end greedy decode: the device-resident E8 cache against transformers' fp16 DynamicCache.

A Llama-3.1-8B-shaped model with random weights (32 layers, 32 query heads, 8 KV heads, head dim
128, hidden 4096, intermediate 14336, vocab 128256; float16, normal std 0.02, built on the device;
nothing is downloaded) reads a prompt of random token ids of ``--contexts`` tokens (batch 1), then
decodes greedily. For each context and each cache:

* DynamicCache with ``attn_implementation="sdpa"`` (fp16 keys and values);
* :class:`lqlib.cache.device.DeviceKVCache` with ``attn_implementation="lqlib_pages"`` (int8 E8 codes
  + int16 step codes written by the quantize kernel; decode attention over the codes; prefill by
  SDPA over the dequantized history), capacity reserved up front, its per-layer launches issued
  eagerly ("device") and replayed as per-layer CUDA graphs ("device_graphs"; the rest of the model
  stays eager in every case);

prefill (not timed), ``--warmup`` decode steps (Triton compiles happen here), then ``--repeats``
blocks of ``--new-tokens`` greedy steps timed with CUDA events (host overhead included: each
block is the wall time of its steps on the GPU stream); tokens/s is the median over blocks. Memory:
the bytes of KV storage each cache holds after the run, and ``torch.cuda.max_memory_allocated``
over prefill + decode (weights included; also given net of the memory before the run).

Agreement check (short context): the same model decoded with the device cache and with a
quantize-dequantize DynamicCache (every key and value through the kernels, SDPA everywhere: what
the CPU cache computes): prefill logits identical, decode logits' largest difference, tokens.

Writes ``gpu_decode_<card>_<date>.json`` under ``--out`` (default ``results/``) and prints a table.

    python benchmarks/gpu_decode.py [--contexts 8192 32768] [--new-tokens 32] [--bits 4] [--out results]
    python benchmarks/gpu_decode.py --smoke   # CPU, Triton's interpreter, a tiny model, JSON to a temp dir
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

import torch

TARGET = 0.9  # tokens/s of the device cache / DynamicCache's, at least
KINDS = ("dynamic", "device", "device_graphs")


def llama_8b_config(smoke: bool):
    from transformers import LlamaConfig

    if smoke:
        return LlamaConfig(
            vocab_size=97,
            hidden_size=256,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=64,
            max_position_embeddings=4096,
        )
    return LlamaConfig(
        vocab_size=128256,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=128,
        max_position_embeddings=131072,
        rope_theta=500000.0,
        rms_norm_eps=1e-5,
        initializer_range=0.02,
        tie_word_embeddings=False,
        bos_token_id=128000,
        eos_token_id=128001,
    )


def build_model(config, device: torch.device, dtype: torch.dtype):
    """Random weights of the config's shapes, initialised on ``device`` (normal, std 0.02)."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM._from_config(config, dtype=dtype, attn_implementation="sdpa")
    return model.eval()


def write_record(result: dict, out_dir: str | Path, benchmark: str, suffix: str = "") -> Path:
    """Write ``result`` as ``<benchmark>_<card slug>_<YYYY-MM-DD><suffix>.json`` under ``out_dir``
    (the card and date read from ``result``); return the path."""
    slug = re.sub(r"[^a-z0-9]+", "-", result["card"].lower()).strip("-")
    path = Path(out_dir) / f"{benchmark}_{slug}_{result['date'][:10]}{suffix}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    return path


class Timer:
    """CUDA events on the GPU, wall clock on the CPU."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def __call__(self, fn) -> float:
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end)
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3


def kv_bytes_dynamic(cache) -> int:
    return sum(
        layer.keys.numel() * layer.keys.element_size() + layer.values.numel() * layer.values.element_size()
        for layer in cache.layers
    )


def run_case(model, kind: str, ids: torch.Tensor, args, device: torch.device, timer: Timer) -> dict:
    """Prefill ``ids``, warm up, time ``repeats`` blocks of ``new_tokens`` greedy steps."""
    from transformers import DynamicCache

    from lqlib.cache.device import ATTENTION, DeviceKVCache, cache_kwarg

    kw = cache_kwarg(model)
    steps = args.warmup + args.repeats * args.new_tokens
    if kind == "dynamic":
        model.set_attn_implementation("sdpa")
        cache = DynamicCache(config=model.config)
    else:
        model.set_attn_implementation(ATTENTION)
        cache = DeviceKVCache(
            model.config, args.bits, capacity=ids.shape[1] + steps, cuda_graphs=kind == "device_graphs"
        )
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    state = {}

    def prefill():
        logits = model(input_ids=ids, **{kw: cache}, use_cache=True, logits_to_keep=1).logits
        state["tok"] = logits[:, -1].argmax(-1, keepdim=True)

    def decode(n: int):
        tok = state["tok"]
        for _ in range(n):
            tok = model(input_ids=tok, **{kw: cache}, use_cache=True).logits[:, -1].argmax(-1, keepdim=True)
        state["tok"] = tok

    prefill_ms = timer(prefill)
    warm_ms = timer(lambda: decode(args.warmup))
    blocks = [timer(lambda: decode(args.new_tokens)) for _ in range(args.repeats)]
    med = statistics.median(blocks)
    row = {
        "cache": kind,
        "attn_implementation": model.config._attn_implementation,
        "context": ids.shape[1],
        "prefill_ms": prefill_ms,
        "warmup_steps": args.warmup,
        "warmup_ms": warm_ms,
        "block_ms": blocks,
        "median_block_ms": med,
        "ms_per_token": med / args.new_tokens,
        "tokens_per_s": args.new_tokens / (med * 1e-3),
        "tokens_held": cache.get_seq_length(),
    }
    if kind == "dynamic":
        row["kv_bytes"] = kv_bytes_dynamic(cache)
    else:
        row["kv_bytes"] = cache.nbytes()
        row["kv_bytes_allocated"] = cache.allocated_nbytes()
        row["bits"] = args.bits
        row["cuda_graphs_recorded"] = sum(len(layer._graphs) for layer in cache.layers)
    if device.type == "cuda":
        row["max_memory_allocated"] = torch.cuda.max_memory_allocated()
        row["memory_before_run"] = before
        row["max_memory_allocated_net"] = row["max_memory_allocated"] - before
    return row


def greedy_logits(model, cache, kw: str, ids: torch.Tensor, steps: int, feed: torch.Tensor | None) -> dict:
    """Prefill and ``steps`` decode steps fed ``feed`` (or the greedy tokens): last-position logits
    (steps + 1, B, V) float32 and the greedy tokens (B, steps)."""
    logits = [model(input_ids=ids, **{kw: cache}, use_cache=True, logits_to_keep=1).logits[:, -1].float()]
    toks = []
    for i in range(steps):
        tok = logits[-1].argmax(-1, keepdim=True)
        toks.append(tok)
        nxt = tok if feed is None else feed[:, i : i + 1]
        logits.append(model(input_ids=nxt, **{kw: cache}, use_cache=True).logits[:, -1].float())
    return {"logits": torch.stack(logits), "tokens": torch.cat(toks, 1)}


def agreement(model, args, device: torch.device, vocab: int) -> dict:
    """Device cache (decode kernel) vs a quantize-dequantize DynamicCache through the same kernels (SDPA)."""
    from lqlib import E8Codec
    from lqlib import kernels as K
    from lqlib.cache.device import ATTENTION, DeviceKVCache, cache_kwarg
    from lqlib.cache.quantized import QuantizeDequantizeCache

    codec = E8Codec(args.bits)

    def through_codec(x: torch.Tensor) -> torch.Tensor:
        return K.dequantize(codec, *K.quantize(codec, x), x.dtype)

    kw = cache_kwarg(model)
    gen = torch.Generator(device="cpu").manual_seed(1)
    ids = torch.randint(0, vocab, (1, args.check_context), generator=gen).to(device)
    runs = {}
    for name, impl, make in (
        ("device_cache", ATTENTION, lambda: DeviceKVCache(model.config, args.bits)),
        ("quantize_dequantize_sdpa", "sdpa", lambda: QuantizeDequantizeCache(through_codec, model.config)),
        ("device_cache_graphs", ATTENTION, lambda: DeviceKVCache(model.config, args.bits, cuda_graphs=True)),
    ):
        model.set_attn_implementation(impl)
        # every run is fed the first run's tokens, so that the logits compare step by step
        feed = runs["device_cache"]["tokens"] if runs else None
        try:
            runs[name] = greedy_logits(model, make(), kw, ids, args.check_steps, feed)
        except Exception as err:  # noqa: BLE001 - a failing graphs path must not cost the other numbers
            if name != "device_cache_graphs":
                raise
            runs[name] = {"error": repr(err)}
    a, b, g = runs["device_cache"], runs["quantize_dequantize_sdpa"], runs["device_cache_graphs"]
    diff = (a["logits"] - b["logits"]).abs().amax(dim=(1, 2))
    return {
        "context": args.check_context,
        "decode_steps": args.check_steps,
        "graphs_logits_identical_to_eager": g.get("error") or bool(torch.equal(a["logits"], g["logits"])),
        "prefill_logits_identical": bool(torch.equal(a["logits"][0], b["logits"][0])),
        "max_abs_logit_diff_per_step": diff.tolist(),
        "max_abs_logit": float(b["logits"].abs().max()),
        "greedy_tokens_agree": bool(torch.equal(a["tokens"], b["tokens"])),
        "tokens_device_cache": a["tokens"][0].tolist(),
        "tokens_reference": b["tokens"][0].tolist(),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--contexts", type=int, nargs="+", default=[8192, 32768])
    ap.add_argument("--new-tokens", type=int, default=32, help="greedy steps per timed block")
    ap.add_argument("--repeats", type=int, default=3, help="timed blocks (median)")
    ap.add_argument("--warmup", type=int, default=16, help="untimed decode steps (covers Triton's specialisations)")
    ap.add_argument("--bits", type=float, default=4.0)
    ap.add_argument("--check-context", type=int, default=1024)
    ap.add_argument("--check-steps", type=int, default=8)
    ap.add_argument("--out", default="results")
    ap.add_argument("--smoke", action="store_true", help="CPU, Triton's interpreter, a tiny model, tiny contexts")
    args = ap.parse_args(argv)
    if args.smoke:
        if os.environ.get("TRITON_INTERPRET") != "1":  # Triton reads it at import: rerun ourselves with it set
            os.environ["TRITON_INTERPRET"] = "1"
            os.execv(sys.executable, [sys.executable, *sys.argv])
        args.contexts, args.new_tokens, args.repeats, args.warmup = [40, 72], 3, 2, 2
        args.check_context, args.check_steps = 24, 3
        if args.out == "results":
            args.out = tempfile.mkdtemp(prefix="gpu_decode_smoke_")
        device = torch.device("cpu")
    else:
        if not torch.cuda.is_available():
            raise SystemExit("needs CUDA (or --smoke)")
        device = torch.device("cuda")
    import transformers
    import triton

    t_start = time.time()
    torch.backends.cuda.matmul.allow_tf32 = False
    dtype = torch.float16
    config = llama_8b_config(args.smoke)
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu-interpreter"
    result: dict = {
        "benchmark": "benchmarks/gpu_decode.py",
        "card": card,
        "smoke": args.smoke,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "transformers": transformers.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "model": {
            "what": "Llama-3.1-8B shapes, random weights (normal std 0.02), float16"
            if not args.smoke
            else "tiny random Llama (smoke)",
            **{
                k: getattr(config, k)
                for k in (
                    "num_hidden_layers",
                    "num_attention_heads",
                    "num_key_value_heads",
                    "head_dim",
                    "hidden_size",
                    "intermediate_size",
                    "vocab_size",
                )
            },
        },
        "batch": 1,
        "bits": args.bits,
        "new_tokens_per_block": args.new_tokens,
        "repeats": args.repeats,
        "warmup_steps": args.warmup,
        "target_ratio": TARGET,
    }
    print(f"{card}: building the model ...", flush=True)
    t0 = time.time()
    model = build_model(config, device, dtype)
    result["model_build_s"] = time.time() - t0
    if device.type == "cuda":
        torch.cuda.synchronize()
        result["weights_bytes"] = sum(p.numel() * p.element_size() for p in model.parameters())
    print(f"  built in {result['model_build_s']:.1f} s", flush=True)
    timer = Timer(device)
    rows, summary = [], []
    with torch.inference_mode():
        print(f"agreement check at context {args.check_context} ...", flush=True)
        t0 = time.time()
        result["agreement"] = agreement(model, args, device, config.vocab_size)
        print(
            f"  graphs == eager: {result['agreement']['graphs_logits_identical_to_eager']}; "
            f"prefill logits identical: {result['agreement']['prefill_logits_identical']}, decode max |dlogit| "
            f"{max(result['agreement']['max_abs_logit_diff_per_step']):.2e} (|logit| <= "
            f"{result['agreement']['max_abs_logit']:.2f}), tokens agree: "
            f"{result['agreement']['greedy_tokens_agree']} ({time.time() - t0:.1f} s)",
            flush=True,
        )
        for context in args.contexts:
            gen = torch.Generator(device="cpu").manual_seed(context)
            ids = torch.randint(0, config.vocab_size, (1, context), generator=gen).to(device)
            pair = {}
            for kind in KINDS:
                t0 = time.time()
                try:
                    row = run_case(model, kind, ids, args, device, timer)
                except Exception as err:  # noqa: BLE001 - the graphs path must not cost the other numbers
                    if kind != "device_graphs":
                        raise
                    rows.append({"cache": kind, "context": context, "error": repr(err)})
                    print(f"  context {context:6d} {kind:13s} FAILED: {err!r}", flush=True)
                    continue
                rows.append(row)
                pair[kind] = row
                mem = f", peak {row['max_memory_allocated'] / 2**30:.2f} GiB" if "max_memory_allocated" in row else ""
                print(
                    f"  context {context:6d} {kind:13s} prefill {row['prefill_ms']:8.0f} ms, decode "
                    f"{row['tokens_per_s']:7.2f} tok/s ({row['ms_per_token']:.2f} ms/token), KV "
                    f"{row['kv_bytes'] / 2**20:9.1f} MiB{mem} ({time.time() - t0:.1f} s)",
                    flush=True,
                )
            base = pair["dynamic"]
            for kind in [k for k in KINDS[1:] if k in pair]:
                ratio = pair[kind]["tokens_per_s"] / base["tokens_per_s"]
                summary.append(
                    {
                        "context": context,
                        "cache": kind,
                        "tokens_per_s_dynamic": base["tokens_per_s"],
                        "tokens_per_s_device_cache": pair[kind]["tokens_per_s"],
                        "ratio": ratio,
                        "meets_target": ratio >= TARGET,
                        "kv_bytes_dynamic": base["kv_bytes"],
                        "kv_bytes_device_cache": pair[kind]["kv_bytes"],
                        "kv_memory_ratio": base["kv_bytes"] / pair[kind]["kv_bytes"],
                        "peak_gib_dynamic": base.get("max_memory_allocated", 0) / 2**30,
                        "peak_gib_device_cache": pair[kind].get("max_memory_allocated", 0) / 2**30,
                    }
                )
    result["rows"] = rows
    result["summary"] = summary
    result["wall_s"] = time.time() - t_start
    print(
        f"\n{'context':>8} {'ours':>13} {'DynamicCache tok/s':>19} {'ours tok/s':>11} {'ratio':>6} {'>=0.9':>6} "
        f"{'KV fp16 MiB':>12} {'KV codes MiB':>13} {'smaller':>8} {'peak GiB dyn/ours':>18}"
    )
    for s in summary:
        print(
            f"{s['context']:8d} {s['cache']:>13} {s['tokens_per_s_dynamic']:19.2f} "
            f"{s['tokens_per_s_device_cache']:11.2f} {s['ratio']:6.3f} {'ok' if s['meets_target'] else 'MISSED':>6} "
            f"{s['kv_bytes_dynamic'] / 2**20:12.1f} {s['kv_bytes_device_cache'] / 2**20:13.1f} "
            f"{s['kv_memory_ratio']:7.2f}x {s['peak_gib_dynamic']:8.2f}/{s['peak_gib_device_cache']:<8.2f}"
        )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    slug = re.sub(r"[^A-Za-z0-9]+", "-", card).strip("-").lower()
    path = out / f"gpu_decode_{slug}_{datetime.date.today().isoformat()}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path} ({result['wall_s']:.0f} s in all)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
