"""Perplexity with a (possibly quantized) KV cache: the protocol of RESEARCH.md §6.

Token-weighted negative log-likelihood over fixed windows of ``window`` tokens
taken every ``stride`` tokens; with ``stride < window`` only the last ``stride``
tokens of each window (after the first) are scored, so every token is scored
once with at least ``window − stride`` tokens of context.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

__all__ = ["PerplexityResult", "token_windows", "perplexity"]


@dataclass(frozen=True)
class PerplexityResult:
    """Summed NLL (nats) over the scored tokens, their count, and exp(mean NLL); also per window."""

    nll: float
    tokens: int
    window_nll: tuple[float, ...] = ()
    window_tokens: tuple[int, ...] = ()

    @property
    def ppl(self) -> float:
        return math.exp(self.nll / self.tokens)


def token_windows(
    tokenizer, text: str, window: int, stride: int | None = None, max_windows: int | None = None
) -> tuple[Tensor, Tensor]:
    """Tokenize ``text`` and cut it into windows.

    Returns
    -------
    (input_ids, labels), both int64 of shape (n_windows, window); labels are −100
    where a token is context only.
    """
    stride = stride or window
    if not 0 < stride <= window:
        raise ValueError(f"need 0 < stride <= window, got stride={stride}, window={window}")
    ids = tokenizer(text, return_tensors="pt").input_ids[0]
    starts = list(range(0, ids.numel() - window + 1, stride))[:max_windows]
    if not starts:
        raise ValueError(f"text has {ids.numel()} tokens, fewer than one window of {window}")
    input_ids = torch.stack([ids[s : s + window] for s in starts])
    labels = input_ids.clone()
    labels[1:, : window - stride] = -100
    return input_ids, labels


@torch.no_grad()
def perplexity(
    model,
    input_ids: Tensor,
    labels: Tensor,
    make_cache: Callable[[], object] | None = None,
    batch_size: int = 2,
    chunk_size: int | None = None,
    progress: bool = True,
    desc: str = "perplexity",
) -> PerplexityResult:
    """Score windows with ``model``; ``make_cache()`` gives a fresh cache per batch (None: the model's default).

    With ``chunk_size`` each window is fed in consecutive chunks through the same cache,
    so later chunks attend to what the cache stored for earlier ones (prefill, then
    decode-like steps); without it, one forward pass per batch of windows.
    """
    window_nll, window_tokens = [], []
    batches = range(0, input_ids.shape[0], batch_size)
    for start in tqdm(batches, desc=desc, disable=not progress, leave=False):
        ids = input_ids[start : start + batch_size].to(model.device)
        target = labels[start : start + batch_size].to(model.device)
        cache = make_cache() if make_cache is not None else None
        if chunk_size is None:
            logits = model(ids, cache=cache, use_cache=cache is not None).logits
        else:
            if cache is None:
                raise ValueError("chunked scoring needs a cache (make_cache)")
            logits = torch.cat(
                [
                    model(ids[:, s : s + chunk_size], cache=cache, use_cache=True).logits
                    for s in range(0, ids.shape[1], chunk_size)
                ],
                dim=1,
            )
        logits = logits[:, :-1].float()
        shifted = target[:, 1:]
        per_token = F.cross_entropy(logits.transpose(1, 2), shifted, ignore_index=-100, reduction="none")
        window_nll += per_token.double().sum(dim=1).tolist()
        window_tokens += (shifted != -100).sum(dim=1).tolist()
    return PerplexityResult(float(sum(window_nll)), int(sum(window_tokens)), tuple(window_nll), tuple(window_tokens))
