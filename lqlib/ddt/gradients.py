"""Paper III: loss gradients at the KV cache, and the model passes that measure them.

Conventions
-----------
* **Loss.** L is the *summed* token NLL (nats) of a window: Σ over the scored targets
  ``ids[:, 1:]`` (or ``labels[:, 1:]`` ≠ −100) of −log p. With the sum, the gradient of one
  cached vector does not depend on how many windows share a batch or on a 1/T convention;
  divide by the number of scored tokens to get per-token quantities. Every ΔL and Q1 below is
  in these units, summed over all windows.
* **Gradient.** g = ∂L/∂x for a cached vector x *as the cache sees it*: keys after RoPE, of
  shape (batch, kv_heads, tokens, head_dim). It is the derivative with respect to an error
  added to that cache write, measured by adding a zero leaf tensor δ to every write
  (``x + δ``) and differentiating at δ = 0. By default (``downstream=True``) the graph is
  intact, so g also carries the error's effect through every later layer's keys and values
  (an error in layer 0 moves the hidden states that layer 1 projects into its K and V): this
  is the derivative that the in-loop quantized cache realises, where each layer's quantizer
  acts on whatever arrives. ``downstream=False`` detaches the inputs of ``k_proj``/``v_proj``,
  which gives the partial derivative with every other layer's cache contents held fixed.
  The key of the last position has g = 0 (its query scores no target) and is still counted.
* **Pre-RoPE.** ``pre_rope=True`` differentiates with respect to the ``k_proj`` output
  instead (per head). RoPE is a rotation R_t per position, so g_pre = R_tᵀ g_post (same norm).
  Values are not rotated: their gradients are the same either way.
* **Moments.** Per (layer l, path X ∈ {K = 0, V = 1}, KV head h), over all cached vectors t:
  M = E_t[g gᵀ], Σ = E_t[e eᵀ] (uncentred), Σ_c = Σ − ē ēᵀ with e = x̂ − x. Arrays are
  float64 of shape (layers, 2, kv_heads, d, d) and the functions on them work on any
  leading axes.
* **Master identity (Theorem A).** ΔL = Q1 + Q2 + …, Q1 = Σ_t gᵀe over every cached vector.
  :func:`first_order_term` takes e as the quantized pass really injects it (``errors=
  "injected"``: layer l's quantizer sees inputs already moved by the errors of layers < l)
  or from the clean cache (``"clean"``; exact for layer 0 only). :func:`master_identity`
  also runs the *mirror* pass that injects −e: the odd part (ΔL(e) − ΔL(−e))/2 equals Q1 up to
  third order, the even part is Q2 up to fourth order. (transformers' RMSNorm computes in
  float32 even in a float64 model, which puts a ~1e-7 relative noise floor under such checks.)
  :func:`predictor_study` gives ΔL, Q1 and the error moments of many configurations on the
  same windows, sharing the gradients.
* **Risks.** directional risk tr(MΣ) ≈ E[(gᵀe)²] per vector; MSE tr(Σ); HLP bounds
  λ_min(M)·tr(Σ) ≤ tr(MΣ) ≤ λ_max(M)·tr(Σ) for PSD M and Σ.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from ..cache.quantized import QuantizeDequantizeCache
from ..errors import InputError
from ..evaluation.models import LoadedModel
from ..store import fingerprint, memo
from .quantizers import Quantizer, Quantizers, _per_layer

__all__ = ["KVGradients", "GradientMoments", "kv_gradients", "gradient_moments"]

T = TypeVar("T")


def _stored(loaded: LoadedModel, name: str, inputs: dict, compute: Callable[[], T]) -> T:
    """``compute()`` through the result store (:func:`lqlib.store.memo`), keyed by the model's fingerprint and
    ``inputs``. Computed without the store when the model has no source identity (built in memory, e.g. in
    tests: its name alone would not tell two such models apart) or when an input cannot be keyed (e.g. a
    quantizer given as a plain function)."""
    if not loaded.source_id:
        return compute()
    inputs = {"model": loaded.fingerprint, **inputs}
    try:
        fingerprint(inputs)
    except InputError:
        return compute()
    return memo(name, inputs, compute)


def _layers(model) -> list:
    inner = getattr(model, "model", model)
    return list(inner.layers)


def _targets(ids: Tensor, labels: Tensor | None) -> Tensor:
    return (ids if labels is None else labels.to(ids.device))[:, 1:]


def _window_nll(logits: Tensor, targets: Tensor) -> Tensor:
    """Summed NLL (nats) of each window's scored targets, shape (B,); logits (B, T, V), targets (B, T−1)
    with −100 = unscored. Computed in float32 at least, with the vocabulary as the contiguous last axis (about
    five times faster on the CPU than a (B, V, T) layout)."""
    work = logits[:, :-1].to(torch.promote_types(logits.dtype, torch.float32))
    flat = F.cross_entropy(work.reshape(-1, work.shape[-1]), targets.reshape(-1), ignore_index=-100, reduction="none")
    return flat.view(targets.shape).sum(-1)


def _windows(loaded: LoadedModel, input_ids: Tensor, labels: Tensor | None, batch_size: int, desc: str, progress: bool):
    """Yield (ids, targets) per batch of windows, on the model's device."""
    for start in tqdm(range(0, input_ids.shape[0], batch_size), desc=desc, disable=not progress, leave=False):
        ids = input_ids[start : start + batch_size].to(loaded.model.device)
        yield ids, _targets(ids, None if labels is None else labels[start : start + batch_size])


def _slot_quantizers(
    loaded: LoadedModel, keys: Quantizers, values: Quantizers | None
) -> tuple[list[Quantizer], list[Quantizer]]:
    """Per-layer key and value quantizers (values default to the keys')."""
    n = len(_layers(loaded.model))
    return _per_layer(keys, n), _per_layer(keys if values is None else values, n)


@dataclass
class _Probe:
    """What one differentiated forward pass gives: per layer, gradients and the cached (clean) vectors.

    Each list holds one tensor per layer of shape (batch, kv_heads, tokens, head_dim).
    """

    nll: Tensor  # (batch,), summed NLL of each window
    grad_keys: list[Tensor]
    grad_values: list[Tensor]
    keys: list[Tensor]
    values: list[Tensor]


def _probe_pass(loaded: LoadedModel, ids: Tensor, targets: Tensor, pre_rope: bool, downstream: bool) -> _Probe:
    """One forward pass with zero leaves added to the K and V writes, then ∂(summed NLL)/∂leaves."""
    model = loaded.model
    layers = _layers(model)
    n = len(layers)
    leaves: dict[tuple[int, int], Tensor] = {}
    clean: dict[tuple[int, int], Tensor] = {}

    def probe(index: int, path: int) -> Quantizer:
        def write(x: Tensor) -> Tensor:
            clean[(index, path)] = x.detach()
            delta = torch.zeros_like(x.detach()).requires_grad_()
            leaves[(index, path)] = delta
            return x + delta

        return write

    def key_projection(index: int, heads: int):
        def hook(_module, _inputs, output):
            delta = torch.zeros_like(output.detach()).requires_grad_()
            leaves[(index, 0)] = delta
            b, t, _ = output.shape
            clean[(index, 0)] = output.detach().view(b, t, heads, -1).transpose(1, 2)
            return output + delta

        return hook

    def detach_input(_module, inputs):
        return (inputs[0].detach(),) + tuple(inputs[1:])

    handles = []
    try:
        for index, layer in enumerate(layers):
            attn = layer.self_attn
            if not downstream:
                handles += [
                    attn.k_proj.register_forward_pre_hook(detach_input),
                    attn.v_proj.register_forward_pre_hook(detach_input),
                ]
            if pre_rope:
                heads = attn.config.num_key_value_heads
                handles.append(attn.k_proj.register_forward_hook(key_projection(index, heads)))
        keys = [(lambda x: x) if pre_rope else probe(i, 0) for i in range(n)]  # pre-RoPE: probed at k_proj
        values = [probe(i, 1) for i in range(n)]
        with torch.enable_grad():
            logits = model(ids, cache=QuantizeDequantizeCache(keys, loaded.config, values), use_cache=True).logits
            nll = _window_nll(logits, targets)
            order = [(i, p) for i in range(n) for p in (0, 1)]
            grads = torch.autograd.grad(nll.sum(), [leaves[k] for k in order], allow_unused=True)
    finally:
        for handle in handles:
            handle.remove()
    grads = {k: torch.zeros_like(leaves[k]) if g is None else g for k, g in zip(order, grads)}
    grad_keys = [grads[(i, 0)] for i in range(n)]
    if pre_rope:  # (B, T, H·d) → (B, H, T, d)
        grad_keys = [g.view(*g.shape[:2], clean[(i, 0)].shape[1], -1).transpose(1, 2) for i, g in enumerate(grad_keys)]
    return _Probe(
        nll.detach(),
        grad_keys,
        [grads[(i, 1)] for i in range(n)],
        [clean[(i, 0)] for i in range(n)],
        [clean[(i, 1)] for i in range(n)],
    )


@dataclass(frozen=True)
class KVGradients:
    """Loss gradients at every cached vector of some windows (see the module's conventions).

    Attributes
    ----------
    grad_keys, grad_values : shape (layers, windows, kv_heads, tokens, head_dim), in the cache's
        dtype (the model's), on the CPU; ∂(summed NLL of the window)/∂x.
    keys, values : the clean cached vectors they belong to, same shape (pre-RoPE keys when
        ``pre_rope``).
    nll : float64, shape (windows,): summed NLL of each window (nats).
    tokens : int64, shape (windows,): scored tokens of each window.
    pre_rope : whether the key gradients are taken before RoPE.
    """

    grad_keys: Tensor
    grad_values: Tensor
    keys: Tensor
    values: Tensor
    nll: np.ndarray
    tokens: np.ndarray
    pre_rope: bool


def kv_gradients(
    loaded: LoadedModel,
    input_ids: Tensor,
    pre_rope: bool = False,
    progress: bool = True,
    *,
    labels: Tensor | None = None,
    downstream: bool = True,
    batch_size: int = 1,
) -> KVGradients:
    """∂L/∂x for every cached key and value of the windows ``input_ids`` (n, T); L the summed NLL.

    Keeps everything: memory grows as 4 × the KV cache of all windows. For many windows use
    :func:`gradient_moments`, which streams.

    Parameters
    ----------
    pre_rope : differentiate the keys before RoPE (the ``k_proj`` output, per head).
    labels : (n, T) targets with −100 for unscored tokens (default: every next token).
    downstream : include the paths through later layers' keys and values (default); False
        gives the partial derivative with every other layer's cache held fixed.
    """
    parts: dict[str, list[Tensor]] = {"grad_keys": [], "grad_values": [], "keys": [], "values": []}
    nll, tokens = [], []
    for ids, targets in _windows(loaded, input_ids, labels, batch_size, "KV gradients", progress):
        probe = _probe_pass(loaded, ids, targets, pre_rope, downstream)
        for name in parts:
            parts[name].append(torch.stack(getattr(probe, name)).cpu())
        nll += probe.nll.double().tolist()
        tokens += (targets != -100).sum(-1).tolist()
    stacked = {name: torch.cat(chunks, dim=1) for name, chunks in parts.items()}
    return KVGradients(**stacked, nll=np.asarray(nll), tokens=np.asarray(tokens), pre_rope=pre_rope)


@dataclass(frozen=True)
class GradientMoments:
    """M = E_t[g gᵀ] per (layer, K/V, KV head) over some windows (:func:`gradient_moments`).

    Attributes
    ----------
    M : float64 (layers, 2, kv_heads, d, d), path 0 = keys (post-RoPE unless ``pre_rope``), 1 = values;
        exactly symmetric.
    mean_gradient : float64 (layers, 2, kv_heads, d).
    count : cached vectors per head (windows × tokens).
    nll : summed NLL of all windows (nats); scored_tokens : targets scored.
    """

    M: np.ndarray
    mean_gradient: np.ndarray
    count: int
    nll: float
    scored_tokens: int


def gradient_moments(
    loaded: LoadedModel,
    input_ids: Tensor,
    pre_rope: bool = False,
    batch_size: int = 1,
    progress: bool = True,
    *,
    labels: Tensor | None = None,
    downstream: bool = True,
) -> GradientMoments:
    """M = E_t[g gᵀ] per (layer, K/V, KV head), accumulated window batch by window batch.

    Only the running sums stay in memory (float64 on the model's device); each batch's gradients are
    dropped after use. The result is stored (:mod:`lqlib.store`) under the model, the windows, the labels
    and the options, so pages that need M of the same windows compute it once.
    """
    inputs = {
        "ids": input_ids,
        "labels": labels,
        "pre_rope": pre_rope,
        "downstream": downstream,
        "batch": batch_size,
    }
    return _stored(
        loaded,
        "gradient_moments",
        inputs,
        lambda: _gradient_moments(loaded, input_ids, pre_rope, batch_size, progress, labels, downstream),
    )


def _gradient_moments(
    loaded: LoadedModel,
    input_ids: Tensor,
    pre_rope: bool,
    batch_size: int,
    progress: bool,
    labels: Tensor | None,
    downstream: bool,
) -> GradientMoments:
    m_sum = g_sum = None
    count, nll, scored = 0, 0.0, 0
    for ids, targets in _windows(loaded, input_ids, labels, batch_size, "gradient moments", progress):
        probe = _probe_pass(loaded, ids, targets, pre_rope, downstream)
        for layer, (gk, gv) in enumerate(zip(probe.grad_keys, probe.grad_values)):
            g = torch.stack([gk, gv]).to(torch.float64)  # (2, B, H, T, d)
            if m_sum is None:
                shape = (len(probe.grad_keys), 2, g.shape[2], g.shape[-1])
                m_sum = torch.zeros(*shape, g.shape[-1], dtype=torch.float64, device=g.device)
                g_sum = torch.zeros(shape, dtype=torch.float64, device=g.device)
            m_sum[layer] += torch.einsum("pbhti,pbhtj->phij", g, g)
            g_sum[layer] += g.sum(dim=(1, 3))
        count += ids.shape[0] * ids.shape[1]
        nll += float(probe.nll.double().sum())
        scored += int((targets != -100).sum())
    m_sum = 0.5 * (m_sum + m_sum.transpose(-1, -2))  # exactly symmetric
    return GradientMoments((m_sum / count).cpu().numpy(), (g_sum / count).cpu().numpy(), count, nll, scored)
