"""Paper II's pages: table rows with the paper's values beside ours, the estimates its verdicts read, its
figures, and the sentences built from numbers — with the column specifications beside the functions
that fill them.

Windows: the chapter evaluates perplexity on the book's shared windows (``token_windows(tokenizer,
text, 512)``, the first ``n``), so the stored evaluations of the Paper I chapter are reused.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from ..coding.codec import E8Codec
from ..coding.wire import steps_nbytes
from ..evaluation.capture import KVSample, capture_kv
from ..evaluation.harness import compressed_cache_rate
from ..evaluation.models import LoadedModel
from ..evaluation.perplexity import PerplexityResult
from ..evaluation.rate_distortion import byte_budget
from ..evaluation.stats import Estimate, bootstrap, paired_delta_pct
from . import paper_values as pv
from .prose import plural

__all__ = [
    "PAGE_PARTS",
    "PAGE_BUDGET_COLUMNS",
    "real_pages",
    "page_budget_rows",
    "page_layout",
    "plot_page_budget",
    "plot_page_layout",
    "ppl_estimate",
    "delta_estimate",
    "window_rates",
    "compression_estimate",
    "END_TO_END_COLUMNS",
    "end_to_end_row",
    "paper2_protocol",
    "chunking_sentence",
    "fork_sentence",
    "same_prefix",
    "GENERATE_COLUMNS",
    "unit_relative_mse",
    "mse_ratio_estimate",
    "bits_saved_estimate",
    "MSE_COLUMNS",
    "ALL_METHODS_COLUMNS",
    "EQUAL_RATE_COLUMNS",
    "equal_rate_rows",
    "plot_all_methods",
    "equal_rate_sentence",
    "greedy",
    "generate_rows",
    "fork_candidates",
    "cache_growth",
    "plot_cache_growth",
]

#: The parts of a page's bits, in the order they are drawn.
PAGE_PARTS = ("free_coordinates", "last_coordinate", "coset", "steps", "header_crc", "tables")
PAGE_BUDGET_COLUMNS = {
    "target_bits": ("b", 1),
    "free_coordinates": "z0..z6",
    "last_coordinate": "floor(z7/2)",
    "coset": "coset bit",
    "steps": "step codes",
    "header_crc": "header + CRC",
    "tables": "tables",
    "total_bits_per_dim": "total",
    "compression_vs_fp16": ("× vs fp16", 2),
}


def real_pages(kv: KVSample, page_size: int) -> list[Tensor]:
    """The pages a :class:`lqlib.CompressedKVCache` seals from a captured cache: K and V of ``page_size``
    tokens of every KV head stacked, each (2, 1, kv_heads, page_size, head_dim); full pages only."""
    layers, _, tokens, _ = kv.keys.shape
    return [
        torch.stack([t[layer, None, :, s : s + page_size] for t in (kv.keys, kv.values)])
        for layer in range(layers)
        for s in range(0, tokens - page_size + 1, page_size)
    ]


def page_budget_rows(pages: Sequence[Tensor], bits_list: Sequence[float]) -> list[dict]:
    """Bits per dimension of a page by part (:func:`lqlib.evaluation.rate_distortion.byte_budget`),
    averaged over ``pages``, one row per rate; ``compression_vs_fp16`` = 16 / total."""
    rows = []
    for b in bits_list:
        budgets = [byte_budget(E8Codec(b), page) for page in pages]
        total = float(np.mean([x["total_bits_per_dim"] for x in budgets]))
        rows.append(
            {
                "target_bits": float(b),
                **{k: float(np.mean([x[k] for x in budgets])) for k in PAGE_PARTS},
                "total_bits_per_dim": total,
                "compression_vs_fp16": 16.0 / total,
            }
        )
    return rows


def page_layout(codec: E8Codec, page: Tensor) -> list[tuple[str, int]]:
    """The bytes of one sealed page by section, in stream order: header, step codes, payload, CRC-32."""
    encoded = codec.encode(page)
    steps, payload = steps_nbytes(encoded.header, encoded.step_codes), 4 * encoded.words.size
    return [
        ("header", encoded.nbytes() - steps - payload - 4),
        ("step codes", steps),
        ("rANS payload: coset bits, z0..z6, floor(z7/2), escapes", payload),
        ("CRC-32", 4),
    ]


def plot_page_budget(rows: Sequence[dict]):
    """Stacked horizontal bars: where a page's bits go at each rate."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 0.9 + 0.6 * len(rows)))
    left = np.zeros(len(rows))
    for part, colour in zip(PAGE_PARTS[:-1], ["#4c72b0", "#55a868", "#c44e52", "#8172b2", "#ccb974"]):
        values = np.array([r[part] for r in rows])
        ax.barh(
            [f"b = {r['target_bits']:g}" for r in rows],
            values,
            left=left,
            color=colour,
            label=PAGE_BUDGET_COLUMNS[part],
        )
        left += values
    ax.set(xlabel="bits per dimension")
    ax.legend(ncol=3, fontsize=8, loc="lower center", bbox_to_anchor=(0.5, 1.0))
    return fig


def plot_page_layout(boxes: Sequence[tuple[str, int]]):
    """One page's bytes as a bar of sections (labels inside wide sections, rotated in narrow ones)."""
    import matplotlib.pyplot as plt

    colours = ["#ccb974", "#8172b2", "#4c72b0", "#c44e52"]
    fig, ax = plt.subplots(figsize=(9, 1.6))
    start = 0
    for (label, size), colour in zip(boxes, colours):
        wide = size > 0.08 * sum(s for _, s in boxes)
        ax.barh(0, size, left=start, color=colour, edgecolor="white")
        ax.text(
            start + size / 2,
            0,
            f"{label}: {size} B",
            ha="center",
            va="center",
            fontsize=7,
            color="white" if wide else "black",
            rotation=0 if wide else 90,
        )
        start += size
    ax.set(xlim=(0, start), yticks=[], xlabel="bytes of one page")
    ax.grid(False)
    return fig


def ppl_estimate(result: PerplexityResult, draws: int = 4000, seed: int = 0) -> Estimate:
    """Perplexity exp(Σ NLL / Σ tokens) with a bootstrap interval over windows."""
    nll = np.asarray(result.window_nll, dtype=np.float64)
    tokens = np.asarray(result.window_tokens, dtype=np.float64)
    return bootstrap(lambda i: np.exp(nll[i].sum(axis=-1) / tokens[i].sum(axis=-1)), nll.size, draws, seed=seed)


def delta_estimate(result: PerplexityResult, baseline: PerplexityResult, draws: int = 4000, seed: int = 0) -> Estimate:
    """PPL increase in percent over ``baseline`` on the same windows, with a paired bootstrap interval."""
    return paired_delta_pct(result.window_nll, baseline.window_nll, baseline.window_tokens, draws=draws, seed=seed)


def window_rates(loaded: LoadedModel, input_ids: Tensor, bits: float, page_size: int = 64) -> np.ndarray:
    """The real cache's total bits/dim on each window (every byte it holds after the window: pages with
    headers, step codes and CRCs, and the tail), shape (windows,)."""
    return np.array(
        [compressed_cache_rate(capture_kv(loaded, ids[None]), bits, page_size=page_size) for ids in input_ids]
    )


def compression_estimate(rates: np.ndarray, draws: int = 4000, seed: int = 0) -> Estimate:
    """Compression against fp16, 16 / (mean bits/dim), with a bootstrap interval over windows."""
    rates = np.asarray(rates, dtype=np.float64)
    return bootstrap(lambda i: 16.0 / rates[i].mean(axis=-1), rates.size, draws, seed=seed)


#: Paper II's end-to-end table: ours and the paper's (Llama-3.1-8B) side by side.
END_TO_END_COLUMNS = {
    "kv": "KV cache",
    "bits_per_dim": ("bits/dim (measured)", 3),
    "ppl": ("PPL", 3),
    "delta_pct": ("Δ%", 2),
    "compression": ("× vs fp16", 2),
    "kv_MiB": ("KV MiB per window", 3),
    "tokens_per_s": ("tok/s (this CPU)", 2),
    "paper_ppl": ("PPL (paper)", 2),
    "paper_MB": ("MB (paper)", 1),
    "paper_compression": ("× (paper)", 2),
    "paper_tokens_per_s": ("tok/s (paper, GPU)", 1),
}


def end_to_end_row(
    label: str,
    paper_key: str | None,
    bits_per_dim: float,
    ppl: float,
    fp_ppl: float,
    fp16_bytes: float,
    tokens_per_s: float,
) -> dict:
    """One row of :data:`END_TO_END_COLUMNS`: ours from the arguments, the paper's from ``PAPER2_TABLE``
    under ``paper_key`` ("fp16", "3", "4", "5"; None: no paper value)."""
    paper = pv.PAPER2_TABLE.get(paper_key, (math.nan,) * 4) if paper_key else (math.nan,) * 4
    return {
        "kv": label,
        "bits_per_dim": bits_per_dim,
        "ppl": ppl,
        "delta_pct": 100.0 * (ppl / fp_ppl - 1.0),
        "compression": 16.0 / bits_per_dim,
        "kv_MiB": fp16_bytes * bits_per_dim / 16.0 / 2**20,
        "tokens_per_s": tokens_per_s,
        "paper_ppl": paper[0],
        "paper_MB": paper[1],
        "paper_compression": paper[2],
        "paper_tokens_per_s": paper[3],
    }


def paper2_protocol(model: str, corpus: str, windows: int, window: int, device: str) -> list[dict]:
    """How this build's Paper II protocol differs from the paper's (rows for the protocol table)."""
    return [
        {"setting": "model", "paper": "Llama-3.1-8B, weights in 8 bits (BitsAndBytes)", "ours": model},
        {"setting": "corpus", "paper": "WikiText-2 (test)", "ours": corpus},
        {"setting": "perplexity windows", "paper": "2,048-token windows", "ours": f"{windows} × {window} tokens"},
        {
            "setting": "what attention reads",
            "paper": "a dequantized bf16 copy (entropy coding off)",
            "ours": "the stored bitstreams, decoded (identical to the in-loop path)",
        },
        {"setting": "bits counted", "paper": "payload only", "ours": "every stored byte (headers, steps, CRC, tail)"},
        {"setting": "speed", "paper": "RTX 4070 Ti", "ours": f"this machine ({device}); the GPU section below"},
    ]


def chunking_sentence(one_pass_identical: bool, chunked_gap_pct: float, chunk_effect_pct: float, chunk: int) -> str:
    """What the real cache against the in-loop path shows, in one or two sentences (every branch tested)."""
    first = (
        "In one forward pass over a window the real cache and the in-loop path give identical perplexities"
        if one_pass_identical
        else "In one forward pass over a window the real cache and the in-loop path do not give identical "
        "perplexities, which is a defect"
    )
    agree = "identical" if chunked_gap_pct == 0 else f"within {chunked_gap_pct:.5f}%"
    return (
        f"{first}; fed in chunks of {plural(chunk, 'token')} they are {agree}. Chunking itself moves the "
        f"quantized perplexity by {chunk_effect_pct:.2f}%: attention over a chunk rounds differently in the "
        "last bits, and the quantizer turns a few of those differences into other lattice points."
    )


def same_prefix(ids: Sequence[int], reference: Sequence[int]) -> int:
    """How many tokens ``ids`` share with ``reference`` from the start."""
    return next((i for i, (x, y) in enumerate(zip(ids, reference)) if x != y), min(len(ids), len(reference)))


def fork_sentence(bits: float, same: int, total: int, candidates: Sequence[tuple[str, float]] = ()) -> str:
    """Where a quantized greedy text leaves the full-precision one, and how close the model's own top two
    candidates were there (``candidates``: the full-precision model's top tokens and probabilities at the
    first differing position; empty when the texts never part)."""
    if same >= total:
        every = plural(total, "token")
        return f"At {bits:g} bits the compressed cache reproduces all {every} of the full-precision text."
    start = (
        f"At {bits:g} bits the compressed cache reproduces the first {plural(same, 'token')} of the full-precision text"
    )
    if len(candidates) < 2:
        return start + "."
    (a, pa), (b, pb) = candidates[:2]
    return (
        f"{start}; where they part, the full-precision model itself weighs {a!r} ({pa:.3f}) against {b!r} "
        f"({pb:.3f}), so the codec's small error only has to tip a near-tie."
    )


GENERATE_COLUMNS = {
    "kv": "KV cache",
    "same_prefix": ("tokens equal to full precision", 0),
    "tokens_per_s": ("tok/s (this CPU)", 2),
    "kv_bytes": ("bytes held at the end", 0),
    "text": "text",
}


def unit_relative_mse(quantize, kv: KVSample) -> np.ndarray:
    """Relative MSE Σ(x̂ − x)² / Σx² of every (layer, K or V, KV head) of a captured cache, shape
    (layers · 2 · kv_heads,): the units the MSE intervals resample."""
    out = []
    for x in (kv.keys, kv.values):
        x64 = x.to(torch.float64)
        err = (quantize(x).to(torch.float64) - x64).square().sum(dim=(-1, -2))
        out.append((err / x64.square().sum(dim=(-1, -2))).numpy())  # (layers, heads)
    return np.stack(out, axis=1).reshape(-1)


def mse_ratio_estimate(mse_a: np.ndarray, mse_b: np.ndarray, draws: int = 4000, seed: int = 0) -> Estimate:
    """mean(mse_a) / mean(mse_b) over the same units, with a paired bootstrap over units."""
    a, b = np.asarray(mse_a, dtype=np.float64), np.asarray(mse_b, dtype=np.float64)
    return bootstrap(lambda i: a[i].mean(axis=-1) / b[i].mean(axis=-1), a.size, draws, seed=seed)


def bits_saved_estimate(
    curve_rates: Sequence[float],
    curve_mse: Sequence[np.ndarray],
    rate: float,
    mse: np.ndarray,
    draws: int = 4000,
    seed: int = 0,
) -> Estimate:
    """Bits/dim a method on a measured rate–MSE curve (``curve_rates``, per-unit MSEs ``curve_mse``) saves
    against a point (``rate``, per-unit ``mse``) at equal MSE: ``rate`` − the curve's rate at that MSE
    (interpolated linearly in log-MSE; NaN outside the curve). Paired bootstrap over the units."""
    rates = np.asarray(curve_rates, dtype=np.float64)
    curve = np.stack([np.asarray(m, dtype=np.float64) for m in curve_mse])  # (points, units)
    point = np.asarray(mse, dtype=np.float64)

    def saved(index: np.ndarray) -> np.ndarray:
        index = np.atleast_2d(index)
        means = np.log2(curve[:, index].mean(axis=-1))  # (points, draws)
        target = np.log2(point[index].mean(axis=-1))  # (draws,)
        out = np.empty(index.shape[0])
        for k in range(index.shape[0]):
            order = np.argsort(means[:, k])
            lo, hi = means[order[0], k], means[order[-1], k]
            out[k] = rate - np.interp(target[k], means[order, k], rates[order]) if lo <= target[k] <= hi else np.nan
        return out if out.size > 1 else out[0]

    return bootstrap(saved, point.size, draws, seed=seed)


MSE_COLUMNS = {
    "turbo": "TurboQuant-style",
    "bits_per_dim": ("its bits/dim", 3),
    "mse_turbo": ("its MSE/σ²", 5),
    "e8_bits": ("E8 codec b at that rate", 3),
    "mse_e8": ("E8 + EC MSE/σ² at that rate", 5),
    "mse_ratio": "ratio [95% interval]",
    "bits_saved": "bits saved at equal MSE [95%]",
}


ALL_METHODS_COLUMNS = {
    "method": "method",
    "bits_per_dim": ("bits/dim (measured)", 3),
    "ppl": ("PPL", 3),
    "delta_pct": ("Δ%", 2),
    "mse_k": ("MSE K / σ²", 5),
    "mse_v": ("MSE V / σ²", 5),
}
EQUAL_RATE_COLUMNS = {
    "method": "method",
    "bits_per_dim": ("bits/dim (measured)", 3),
    "ppl": ("PPL", 3),
    "delta_pct": "Δ% [95% interval]",
    "ratio": "Δ / TurboQuant-style Δ [95%]",
}


def equal_rate_rows(rows: Sequence[dict], baseline: str, draws: int = 4000) -> tuple[list[dict], dict]:
    """The equal-rate comparison's rows (:func:`~lqlib.evaluation.harness.compare_methods` output, full
    precision first) with each method's ΔPPL interval and its ratio to ``baseline``'s (paired over windows),
    and {method: RatioEstimate}."""
    from ..evaluation.harness import method_ratio
    from ..evaluation.stats import paired_delta_pct

    fp = rows[0]
    out, ratios = [], {}
    for r in rows[1:]:
        delta = paired_delta_pct(r["window_nll"], fp["window_nll"], fp["window_tokens"], draws=draws)
        ratio = method_ratio(list(rows), r["method"], baseline, draws=draws) if r["method"] != baseline else None
        if ratio is not None:
            ratios[r["method"]] = ratio
        out.append(
            {
                "method": r["method"],
                "bits_per_dim": r["bits_per_dim"],
                "ppl": r["ppl"],
                "delta_pct": delta.format(2, "%"),
                "ratio": ratio.format(2) if ratio else "1 (the baseline)",
            }
        )
    return out, ratios


def plot_all_methods(rows: Sequence[dict]):
    """ΔPPL (log) against measured bits/dim, one line per family (E8 rows drawn solid)."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for family in sorted({r["family"] for r in rows[1:]}):
        points = sorted((r["bits_per_dim"], max(r["delta_pct"], 1e-3)) for r in rows[1:] if r["family"] == family)
        ax.plot(*zip(*points), "o-" if "E8 + EC" in family else "s--", label=family, ms=5)
    ax.set(
        xlabel="measured total bits/dim",
        ylabel="PPL increase (%)",
        yscale="log",
        title="Perplexity cost against stored bits",
    )
    ax.legend(fontsize=7, ncol=2)
    return fig


def equal_rate_sentence(
    e8_bits: float, e8_delta: Estimate, tq_bits: float, tq_delta: Estimate, ratio: Estimate, windows: int, target: float
) -> str:
    """The equal-rate result in words, with the interval deciding "at most" / "more than" the target."""
    if not math.isfinite(ratio.high):
        judged = "the ratio is not defined: the baseline's own increase is not distinguishable from zero"
    elif ratio.high <= target:
        judged = f"its whole interval lies at or below {target:g}"
    elif ratio.low > target:
        judged = f"its whole interval lies above {target:g}"
    else:
        judged = f"its interval contains {target:g}, so these {plural(windows, 'window')} do not decide"
    return (
        f"At the same measured rate, E8 with entropy coding ({e8_bits:.3f} bits/dim) raises the perplexity by "
        f"{e8_delta.format(2, '%')}, the TurboQuant-style baseline ({tq_bits:.3f} bits/dim) by "
        f"{tq_delta.format(2, '%')} over {plural(windows, 'window')}: a ratio of {ratio.format(2)}; {judged}."
    )


@torch.no_grad()
def greedy(loaded: LoadedModel, prompt: dict, new_tokens: int, make_cache=None) -> tuple[list[int], float, object]:
    """Greedy generation of exactly ``new_tokens`` tokens: (token ids, tokens/s, the cache used or None)."""
    import time

    kwargs = {"cache": make_cache()} if make_cache else {}
    start = time.perf_counter()
    out = loaded.model.generate(
        **prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, **kwargs
    )
    new = out[0, prompt["input_ids"].shape[1] :]
    return new.tolist(), new.numel() / (time.perf_counter() - start), kwargs.get("cache")


def generate_rows(
    loaded: LoadedModel, prompt: dict, new_tokens: int, bits_list: Sequence[float], page_size: int = 64
) -> list[dict]:
    """Full precision, then the compressed cache at each rate: how many tokens each keeps equal to full
    precision, its speed, the bytes it holds at the end and the text (rows of :data:`GENERATE_COLUMNS`)."""
    from ..cache.compressed import CompressedKVCache

    reference, speed, _ = greedy(loaded, prompt, new_tokens)
    decode = loaded.tokenizer.decode
    rows = [
        {
            "kv": "full precision",
            "bits": math.nan,
            "same_prefix": len(reference),
            "tokens_per_s": speed,
            "kv_bytes": math.nan,
            "text": decode(reference, skip_special_tokens=True),
            "ids": reference,
        }
    ]
    for b in bits_list:
        ids, speed, cache = greedy(
            loaded, prompt, new_tokens, lambda b=b: CompressedKVCache(loaded.config, b, page_size=page_size)
        )
        rows.append(
            {
                "kv": f"E8 + EC, b = {b:g}",
                "bits": float(b),
                "same_prefix": same_prefix(ids, reference),
                "tokens_per_s": speed,
                "kv_bytes": cache.nbytes(),
                "text": decode(ids, skip_special_tokens=True),
                "ids": ids,
            }
        )
    return rows


@torch.no_grad()
def fork_candidates(loaded: LoadedModel, prompt: dict, reference: Sequence[int], fork: int) -> list[tuple[str, float]]:
    """The full-precision model's two most likely next tokens (text, probability) after ``fork`` tokens of
    its own greedy text; empty when ``fork`` is past the end."""
    if fork >= len(reference):
        return []
    context = torch.cat([prompt["input_ids"][0], torch.tensor(reference[:fork], dtype=torch.long)])[None]
    probs = loaded.model(context.to(loaded.model.device)).logits[0, -1].float().softmax(-1)
    top = probs.topk(2)
    return [(loaded.tokenizer.decode([int(i)]), float(p)) for i, p in zip(top.indices, top.values)]


@torch.no_grad()
def cache_growth(loaded: LoadedModel, ids: Tensor, bits_list: Sequence[float], page_size: int = 64) -> dict:
    """Bytes a compressed cache holds after each page of ``ids`` (shape (1, tokens)) is fed: {bits: [bytes]}
    and the token counts under ``"tokens"``."""
    from ..cache.compressed import CompressedKVCache

    steps = list(range(page_size, ids.shape[1] + 1, page_size))
    held = {"tokens": steps}
    for b in bits_list:
        cache = CompressedKVCache(loaded.config, b, page_size=page_size)
        held[b] = []
        for start in range(0, steps[-1], page_size):
            loaded.model(ids[:, start : start + page_size].to(loaded.model.device), cache=cache, use_cache=True)
            held[b].append(cache.nbytes())
    return held


def plot_cache_growth(held: dict, fp16_bytes_per_token: float):
    """KiB held against tokens: fp16 (dashed) and the compressed cache at each rate."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.4))
    tokens = held["tokens"]
    ax.plot(tokens, [fp16_bytes_per_token * t / 1024 for t in tokens], "k--", label="fp16")
    for b, values in held.items():
        if b != "tokens":
            ax.plot(tokens, [v / 1024 for v in values], "o-", label=f"E8 + EC, b = {b:g}")
    ax.set(xlabel="tokens in the cache", ylabel="KiB held", title="Bytes held as the context grows")
    ax.legend()
    return fig
