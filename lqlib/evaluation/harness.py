"""The evaluation harness: every KV method through the same windows, model and protocol, in one run.

For each method it reports the measured total bits/dim (side information included),
the perplexity and its increase over full precision, and the relative MSE of K and V
on the same captured cache. Methods run in-loop (``QuantizeDequantizeCache``) in one
forward pass per window, except HF's ``QuantizedCache``, which keeps its first chunk
and a residual window in full precision and so runs chunk by chunk (``chunk_size``).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from ..cache.compressed import CompressedKVLayer, schedule_codecs
from ..cache.quantized import QuantizeDequantizeCache
from ..coding.codec import MAX_BITS, MIN_BITS
from ..errors import InputError
from ..store import memo
from .baselines import E8Entropy, KVMethod, standard_methods
from .capture import KVSample
from .models import LoadedModel
from .perplexity import PerplexityResult, perplexity
from .stats import RatioEstimate, paired_ratio

__all__ = [
    "method_ratio",
    "stored_perplexity",
    "MethodSpec",
    "compare_methods",
    "tensor_nbytes",
    "hf_quantized_cache",
    "generate_throughput",
    "compressed_cache_rate",
    "e8_bits_for_rate",
    "method_specs",
    "e8_spec",
]


@dataclass(frozen=True)
class MethodSpec:
    """A KV method for the harness: separate key and value quantizers, or a cache factory.

    Attributes
    ----------
    label : name in tables.
    key, value : in-loop quantizers with their rate accounting (None for ``make_cache`` methods).
    make_cache : builds a transformers cache for the model config (for HF's own caches).
    bits_per_dim : measures the total rate on a captured cache (for ``make_cache`` methods).
    chunk_size : feed windows in chunks of this many tokens (None: one forward pass).
    identity : what ``make_cache`` and ``bits_per_dim`` compute, as plain values (e.g. ``("quanto", 4, 32,
        64)``), so that results can be stored (:mod:`lqlib.store`); empty: results are not stored.
    """

    label: str
    key: KVMethod | None = None
    value: KVMethod | None = None
    make_cache: Callable[[object], object] | None = None
    bits_per_dim: Callable[[KVSample], float] | None = None
    chunk_size: int | None = None
    family: str = ""
    identity: tuple = ()

    def cache_key(self) -> tuple | None:
        """What determines this method's results; None when a callable is not described by ``identity``."""
        if (self.make_cache is not None or self.bits_per_dim is not None) and not self.identity:
            return None
        return (self.key, self.value, self.chunk_size, self.identity)

    def rate(self, kv: KVSample) -> float:
        if self.bits_per_dim is not None:
            return self.bits_per_dim(kv)
        return 0.5 * (self.key.bits_per_dim(kv.keys) + self.value.bits_per_dim(kv.values))

    def cache_factory(self, config) -> Callable[[], object]:
        if self.make_cache is not None:
            return lambda: self.make_cache(config)
        return lambda: QuantizeDequantizeCache(self.key.quantize, config, value_quantizer=self.value.quantize)


def stored_perplexity(
    loaded: LoadedModel,
    input_ids: Tensor,
    labels: Tensor,
    key: object,
    make_cache: Callable[[], object] | None = None,
    batch_size: int = 2,
    chunk_size: int | None = None,
    progress: bool = True,
    desc: str = "perplexity",
) -> PerplexityResult:
    """:func:`~lqlib.evaluation.perplexity.perplexity` through the result store: computed once per model,
    windows, ``key`` (what ``make_cache`` does — a codec, a quantizer, a spec, a string — or None for
    full precision), batch and chunk sizes, and library version, then shared by every notebook and run.
    ``key=None`` with a ``make_cache`` is refused (the result would be filed as full precision)."""
    if key is None and make_cache is not None:
        raise InputError("name what make_cache does (key=...) so that its result is stored under that name")
    inputs = {
        "model": loaded.fingerprint,
        "ids": input_ids,
        "labels": labels,
        "method": key,
        "batch": batch_size,
        "chunk": chunk_size,
    }
    return memo(
        "perplexity",
        inputs,
        lambda: perplexity(loaded.model, input_ids, labels, make_cache, batch_size, chunk_size, progress, desc),
    )


def _relative_mse(method: KVMethod, x: Tensor) -> float:
    return ((method.quantize(x).double() - x.double()).square().mean() / x.double().square().mean()).item()


def compare_methods(
    loaded: LoadedModel,
    specs: list[MethodSpec],
    input_ids: Tensor,
    labels: Tensor,
    kv: KVSample,
    batch_size: int = 2,
    progress: bool = True,
) -> list[dict]:
    """Full precision first, then every method on the same windows; one row per method."""
    config = loaded.config
    fp = stored_perplexity(
        loaded, input_ids, labels, None, batch_size=batch_size, progress=progress, desc="full precision"
    )
    rows = [
        {
            "method": "full precision",
            "family": "fp16",
            "bits_per_dim": 16.0,
            "ppl": fp.ppl,
            "delta_pct": 0.0,
            "mse_k": 0.0,
            "mse_v": 0.0,
            "tokens": fp.tokens,
            "window_nll": list(fp.window_nll),
            "window_tokens": list(fp.window_tokens),
        }
    ]
    for spec in specs:
        start = time.perf_counter()
        key = spec.cache_key()
        run = stored_perplexity if key is not None else _unstored_perplexity
        result = run(
            loaded,
            input_ids,
            labels,
            key,
            spec.cache_factory(config),
            batch_size=batch_size,
            chunk_size=spec.chunk_size,
            progress=progress,
            desc=spec.label,
        )
        rate = (
            spec.rate(kv)
            if key is None
            else memo("method_rate", {"spec": key, "kv": kv}, lambda spec=spec: spec.rate(kv))
        )
        rows.append(
            {
                "method": spec.label,
                "family": spec.family or spec.label,
                "bits_per_dim": rate,
                "ppl": result.ppl,
                "delta_pct": 100.0 * (result.ppl / fp.ppl - 1.0),
                "mse_k": _relative_mse(spec.key, kv.keys) if spec.key else float("nan"),
                "mse_v": _relative_mse(spec.value, kv.values) if spec.value else float("nan"),
                "tokens": result.tokens,
                "seconds": time.perf_counter() - start,
                "window_nll": list(result.window_nll),
            }
        )
    return rows


def _unstored_perplexity(loaded, input_ids, labels, key, make_cache, **kwargs) -> PerplexityResult:
    return perplexity(loaded.model, input_ids, labels, make_cache, **kwargs)


def method_ratio(rows: list[dict], method: str, baseline: str, draws: int = 4000, seed: int = 0) -> RatioEstimate:
    """ΔPPL of ``method`` over ΔPPL of ``baseline`` (rows of :func:`compare_methods`, full precision
    first), with a paired bootstrap interval over windows (:func:`lqlib.evaluation.stats.paired_ratio`)."""
    by_name = {r["method"]: r for r in rows}
    fp = rows[0]
    return paired_ratio(
        by_name[method]["window_nll"],
        by_name[baseline]["window_nll"],
        fp["window_nll"],
        fp["window_tokens"],
        draws=draws,
        seed=seed,
    )


def tensor_nbytes(obj) -> int:
    """Bytes of a tensor, unpacking tensor subclasses (e.g. quanto's packed tensors) into their parts."""
    if isinstance(obj, Tensor):
        flatten = getattr(type(obj), "__tensor_flatten__", None)
        if flatten is not None and type(obj) is not Tensor:
            names, _ = obj.__tensor_flatten__()
            return sum(tensor_nbytes(getattr(obj, name)) for name in names)
        return obj.numel() * obj.element_size()
    return 0


def hf_quantized_cache(
    nbits: int, residual_length: int = 32, q_group_size: int = 64, chunk_size: int = 32
) -> MethodSpec:
    """HF ``QuantizedCache`` (quanto backend), fed in chunks; its rate from the real buffers after a window."""
    from transformers import QuantizedCache

    def make(config):
        return QuantizedCache("quanto", config, nbits=nbits, residual_length=residual_length, q_group_size=q_group_size)

    def rate(kv: KVSample) -> float:
        # replay the captured keys and values chunk by chunk through one layer's cache and weigh its buffers
        layers, heads, tokens, dim = kv.keys.shape
        total_bits = 0.0
        for layer in range(layers):
            cache = make(_OneLayerConfig())
            for start in range(0, tokens, chunk_size):
                sl = slice(start, start + chunk_size)
                cache.update(kv.keys[layer, None, :, sl], kv.values[layer, None, :, sl], 0)
            held = cache.layers[0]
            total_bits += 8 * sum(
                tensor_nbytes(t) for t in (held._quantized_keys, held._quantized_values, held.keys, held.values)
            )
        return total_bits / (2 * kv.keys.numel())

    return MethodSpec(
        f"HF QuantizedCache quanto int{nbits}",
        make_cache=make,
        bits_per_dim=rate,
        chunk_size=chunk_size,
        family="HF QuantizedCache",
        identity=("HF QuantizedCache", "quanto", nbits, residual_length, q_group_size),
    )


def compressed_cache_rate(
    kv: KVSample, bits: float | np.ndarray, rotation: str = "rht", page_size: int = 64, key_scales: Tensor | None = None
) -> float:
    """Total bits/dim :class:`lqlib.CompressedKVCache` holds for a captured cache: every byte of its
    pages (headers, step codes, payload, CRCs), of its full-precision tail and of its key scales,
    × 8 / (2 · numel). ``bits`` is one rate or a (layers, 2) schedule of key and value rates;
    ``key_scales`` (layers, kv_heads, head_dim) are optional per-channel key scales. Stored
    (:func:`lqlib.store.memo`)."""
    inputs = {"kv": kv, "bits": bits, "rotation": rotation, "page": page_size, "key_scales": key_scales}
    return memo("compressed_cache_rate", inputs, lambda: _cache_rate(kv, bits, rotation, page_size, key_scales))


def _cache_rate(kv: KVSample, bits, rotation: str, page_size: int, key_scales: Tensor | None) -> float:
    total = 0
    for layer, (key_codec, value_codec) in enumerate(schedule_codecs(bits, kv.keys.shape[0], rotation)):
        held = CompressedKVLayer(
            key_codec, page_size, value_codec=value_codec, key_scales=None if key_scales is None else key_scales[layer]
        )
        held.update(kv.keys[layer, None], kv.values[layer, None])
        total += held.nbytes()
    return 8.0 * total / (2 * kv.keys.numel())


def e8_bits_for_rate(
    total_bits: float,
    kv: KVSample,
    rotation: str = "rht",
    page_size: int = 64,
    tolerance: float = 0.002,
    key_scales: Tensor | None = None,
) -> float:
    """The codec rate b whose real cache stores ``total_bits`` bits/dim on ``kv`` (to ``tolerance``),
    by bisection: the stored rate grows with b. ``key_scales`` count as the cache holds them. Stored."""
    inputs = {
        "total": total_bits,
        "kv": kv,
        "rotation": rotation,
        "page": page_size,
        "tol": tolerance,
        "key_scales": key_scales,
    }
    return memo(
        "e8_bits_for_rate", inputs, lambda: _bisect_rate(total_bits, kv, rotation, page_size, tolerance, key_scales)
    )


def _bisect_rate(
    total_bits: float, kv: KVSample, rotation: str, page_size: int, tolerance: float, key_scales: Tensor | None
) -> float:
    lo, hi = MIN_BITS, MAX_BITS
    for _ in range(40):
        mid = 0.5 * (lo + hi)
        rate = compressed_cache_rate(kv, mid, rotation, page_size, key_scales)
        if abs(rate - total_bits) <= tolerance:
            return mid
        lo, hi = (mid, hi) if rate < total_bits else (lo, mid)
    raise InputError(f"no codec rate stores {total_bits} bits/dim within {tolerance} on this cache")


def e8_spec(bits: float, rotation: str = "rht", label: str | None = None, page_size: int = 64) -> MethodSpec:
    """E8 + entropy coding for the harness: in-loop codec, rate from the real cache's bytes."""
    method = E8Entropy(bits, rotation)
    label = label or f"E8 + EC {bits:g}{', no RHT' if rotation == 'none' else ''}"
    return MethodSpec(
        label,
        method,
        method,
        family="E8 + EC" + (", no RHT" if rotation == "none" else ""),
        bits_per_dim=lambda kv: compressed_cache_rate(kv, bits, rotation, page_size),
        identity=("E8 real cache rate", bits, rotation, page_size),
    )


def method_specs(bits: int) -> list[MethodSpec]:
    """Every baseline family at integer rate ``bits``; the E8 + EC rows take their rate from the real cache."""
    specs = []
    for label, family, key, value in standard_methods(bits):
        if isinstance(key, E8Entropy):
            specs.append(e8_spec(float(bits), key.rotation, label))
        else:
            specs.append(MethodSpec(label, key, value, family=family))
    return specs


class _OneLayerConfig:
    """The least config HF's QuantizedCache needs to lay out a single full-attention layer."""

    def get_text_config(self, decoder: bool = True):
        from transformers import LlamaConfig

        return LlamaConfig(num_hidden_layers=1)


@torch.no_grad()
def generate_throughput(
    loaded: LoadedModel, prompt: str, new_tokens: int, make_cache: Callable[[], object] | None = None
) -> dict:
    """Greedy generation of ``new_tokens`` tokens; tokens/s and the generated text."""
    tok, model = loaded.tokenizer, loaded.model
    inputs = tok(prompt, return_tensors="pt").to(model.device)
    kwargs = {"cache": make_cache()} if make_cache is not None else {}
    start = time.perf_counter()
    out = model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, **kwargs)
    seconds = time.perf_counter() - start
    generated = out[0, inputs.input_ids.shape[1] :]
    return {
        "tokens_per_s": generated.numel() / seconds,
        "seconds": seconds,
        "ids": generated.tolist(),
        "text": tok.decode(generated, skip_special_tokens=True),
        "cache_nbytes": kwargs["cache"].nbytes() if hasattr(kwargs.get("cache"), "nbytes") else None,
    }
