"""Greedy decoding with the whole step — the model's forward pass, the cache writes, attention and the
next token's argmax — recorded once as one CUDA graph and replayed, as serving engines do.

:class:`GraphedDecoder` works with any cache whose storage does not move while it decodes:
transformers' ``StaticCache`` (the fp16 baseline) and :class:`lqlib.cache.device.DeviceKVCache` with its
capacity reserved up front and ``cuda_graphs=False`` (its per-layer graphs would nest). The step reads
three device buffers — the token ids (batch, 1), their positions (batch, 1) and the cache position
(1,) — and the graph itself writes the greedy next token back into the ids and moves both positions
on, so a replay needs no host value at all.

Host-side bookkeeping that transformers or the cache keep in Python (a token count) advances once
while the graph is recorded, not at replays: the decoder puts it back after recording and moves it
by one token per replay (:meth:`GraphedDecoder._advance`), so ``cache.get_seq_length()`` and
``nbytes()`` stay true. On a device without CUDA graphs (the CPU) :meth:`step` runs the same function
eagerly, which the tests compare against a plain decode loop.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import InputError
from .device import DeviceKVCache, cache_kwarg

__all__ = [
    "GraphedDecoder",
    "FP16_DECODE_ATTENTION",
    "FP16_SPLIT_K_ATTENTION",
    "gqa_decode_attention_forward",
    "split_k_decode_attention_forward",
    "mask_lengths",
    "register_fp16_decode_attention",
]

FP16_DECODE_ATTENTION = "lqlib_fp16_decode"
"""The attention implementation of the float16 baseline with SDPA (:func:`gqa_decode_attention_forward`)."""
FP16_SPLIT_K_ATTENTION = "lqlib_fp16_split_k"
"""The attention implementation of the float16 baseline with the split-K kernel
(:func:`split_k_decode_attention_forward`)."""


def gqa_decode_attention_forward(
    module: torch.nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[Tensor, None]:
    """transformers attention for the float16 baseline: one query token per row attends with SDPA
    with the query heads of a KV head as its query rows, (B, Hkv, G, d) against the cache (B, Hkv, L, d),
    so the keys and values are read once, not repeated G times (transformers' SDPA path repeats them
    whenever it passes a mask, as with ``StaticCache``). Several query tokens: transformers' SDPA.
    Returns (B, q_len, Hq, d) and no weights."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    b, hq, q_len, d = query.shape
    hkv = key.shape[1]
    if q_len != 1 or dropout or hq % hkv:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    mask = None if attention_mask is None else attention_mask[..., : key.shape[-2]]  # (B, 1, 1, L)
    out = F.scaled_dot_product_attention(query.reshape(b, hkv, hq // hkv, d), key, value, attn_mask=mask, scale=scaling)
    return out.reshape(b, hq, 1, d).transpose(1, 2).contiguous(), None


def mask_lengths(attention_mask: Tensor | None, kv_length: int, batch: int) -> Tensor | int:
    """Tokens each row attends to, from SDPA's decode mask (B, 1, 1, L) (boolean, True = attend, or
    additive, 0 = attend), as a (B,) int64 tensor computed on the device (no host synchronisation);
    ``kv_length`` when there is no mask. The count equals the valid prefix only when the attended
    positions are a prefix (no padding), as in greedy decoding from unpadded prompts."""
    if attention_mask is None:
        return kv_length
    row = attention_mask[:, 0, -1, :kv_length]
    attend = row if row.dtype == torch.bool else row == 0
    return attend.sum(-1).expand(batch)


def split_k_decode_attention_forward(
    module: torch.nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[Tensor, None]:
    """transformers attention for the float16 baseline: one float16 query token per row attends with
    :func:`lqlib.kernels.fp16_attention.decode_attention` (split-K, K/V read once, only the tokens the
    mask lets it see: :func:`mask_lengths`); anything else goes to :func:`gqa_decode_attention_forward`.
    Returns (B, q_len, Hq, d) and no weights."""
    b, hq, q_len, d = query.shape
    if q_len != 1 or dropout or query.dtype != torch.float16 or hq % key.shape[1] or d < 16 or d & (d - 1):
        return gqa_decode_attention_forward(
            module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs
        )
    from ..kernels import fp16_attention

    lengths = mask_lengths(attention_mask, key.shape[-2], b)
    out = fp16_attention.decode_attention(query[:, :, 0], key, value, lengths, sm_scale=scaling)
    return out[:, None], None


def register_fp16_decode_attention(split_k: bool = False) -> str:
    """Register the float16 baseline's attention with transformers (with SDPA's mask builder):
    :func:`gqa_decode_attention_forward` as :data:`FP16_DECODE_ATTENTION`, or with ``split_k``
    :func:`split_k_decode_attention_forward` as :data:`FP16_SPLIT_K_ATTENTION`; returns the name.
    Idempotent."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    name, forward = (
        (FP16_SPLIT_K_ATTENTION, split_k_decode_attention_forward)
        if split_k
        else (FP16_DECODE_ATTENTION, gqa_decode_attention_forward)
    )
    AttentionInterface.register(name, forward)
    AttentionMaskInterface.register(name, sdpa_mask)
    return name


class GraphedDecoder:
    """One greedy decode step of ``model`` with ``cache``, as a replayable CUDA graph.

    Parameters
    ----------
    model : a transformers causal LM on its device, in eval mode, with the attention implementation
        the cache needs already set.
    cache : ``StaticCache`` or a :class:`~lqlib.cache.device.DeviceKVCache` (capacity reserved,
        ``cuda_graphs=False``) with room for the prompt and every step.
    warmup : eager steps before recording (they compile kernels and allocate lazily built tables).
    """

    def __init__(self, model, cache, warmup: int = 2) -> None:
        if isinstance(cache, DeviceKVCache) and any(layer.cuda_graphs for layer in cache.layers):
            raise InputError("record the whole step with a DeviceKVCache built with cuda_graphs=False")
        if warmup < 1:
            raise InputError(f"warmup must be at least 1 step (kernels compile there), got {warmup}")
        self.model, self.cache, self.warmup = model, cache, warmup
        self.kw = cache_kwarg(model)
        self.device = next(model.parameters()).device
        self.graph: torch.cuda.CUDAGraph | None = None
        self.ids = self.positions = self.cache_position = self.logits = None
        self.steps = 0

    @property
    def graphed(self) -> bool:
        """Whether steps replay a recorded graph (CUDA), rather than run eagerly."""
        return self.graph is not None

    def _forward(self) -> None:
        """The step: forward one token per row at the buffers' positions, argmax into ``ids``, move on."""
        out = self.model(
            input_ids=self.ids,
            position_ids=self.positions,
            cache_position=self.cache_position,
            use_cache=True,
            **{self.kw: self.cache},
        )
        logits = out.logits[:, -1]
        if self.logits is None:
            self.logits = torch.empty_like(logits)
        self.logits.copy_(logits)
        self.ids.copy_(logits.argmax(-1, keepdim=True))
        self.positions += 1
        self.cache_position += 1

    def _host_counts(self) -> list[int] | None:
        if isinstance(self.cache, DeviceKVCache):
            return [layer.n_tokens for layer in self.cache.layers]
        return None

    def _set_host_counts(self, counts: list[int] | None, plus: int = 0) -> None:
        if counts is not None:
            for layer, n in zip(self.cache.layers, counts):
                layer.n_tokens = n + plus

    def _advance(self) -> None:
        counts = self._host_counts()
        if counts is not None and counts[0] + 1 > self.cache.layers[0].capacity:
            raise InputError(
                f"the cache is full ({self.cache.layers[0].capacity} tokens): reserve more capacity up front"
            )
        self._set_host_counts(counts, 1)

    @torch.inference_mode()
    def prefill(self, input_ids: Tensor, chunk: int | None = None) -> Tensor:
        """Run the prompt (batch, tokens) eagerly (in pieces of ``chunk`` tokens, if given), then the
        warm-up steps, then record the step (CUDA). Returns the greedy token that follows the prompt
        (batch, 1); the warm-up steps have consumed it and those after it."""
        if input_ids.dim() != 2 or input_ids.shape[1] < 1:
            raise InputError(f"input_ids must be (batch, tokens) with tokens >= 1, got {tuple(input_ids.shape)}")
        batch, tokens = input_ids.shape
        input_ids = input_ids.to(self.device)
        chunk = chunk or tokens
        for start in range(0, tokens, chunk):
            out = self.model(
                input_ids=input_ids[:, start : start + chunk],
                cache_position=torch.arange(start, min(start + chunk, tokens), device=self.device),
                use_cache=True,
                logits_to_keep=1,
                **{self.kw: self.cache},
            )
        self.ids = out.logits[:, -1].argmax(-1, keepdim=True)
        self.positions = torch.full((batch, 1), tokens, dtype=torch.long, device=self.device)
        self.cache_position = torch.full((1,), tokens, dtype=torch.long, device=self.device)
        first = self.ids.clone()
        for _ in range(self.warmup):
            self._forward()
            self.steps += 1
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            counts = self._host_counts()
            saved = (self.ids.clone(), self.positions.clone(), self.cache_position.clone())
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self._forward()
            self._set_host_counts(counts)  # recording ran the Python once, not the kernels
            for buffer, value in zip((self.ids, self.positions, self.cache_position), saved):
                buffer.copy_(value)
        return first

    @torch.inference_mode()
    def step(self) -> Tensor:
        """One greedy step from the current token; returns the next tokens (batch, 1) (a view of the
        graph's buffer: copy it to keep it)."""
        if self.ids is None:
            raise InputError("call prefill() first")
        if self.graph is not None:
            self._advance()
            self.graph.replay()
        else:
            self._forward()
        self.steps += 1
        return self.ids

    @torch.inference_mode()
    def decode(self, steps: int) -> None:
        """``steps`` greedy steps without reading anything back (for timing)."""
        for _ in range(steps):
            self.step()
