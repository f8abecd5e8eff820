"""Paper III, Directional Distortion Theory: loss gradients at the KV cache against quantization errors.

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

Quantizers for the studies: :class:`ScalarBlockQuantizer` (uniform, one step per block, the
step set by the bit width), :class:`Permuted` (any quantizer under a reordering of the dims,
the "permutation puzzle") and :class:`Dithered` (subtractive dither: error uniform and
independent of the input, Theorem B; :func:`variance_additivity` checks the variance split).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from .kv_capture import KVSample
from .models import LoadedModel
from .quantized_cache import QuantizeDequantizeCache

__all__ = [
    "KVGradients", "kv_gradients", "gradient_moments",
    "error_moments", "error_moments_for_cache",
    "directional_risk", "hlp_bounds", "k_path_share", "bias_drift",
    "first_order_term", "loss_change", "master_identity",
    "SCALAR_STEP_FACTOR", "ScalarBlockQuantizer", "Permuted", "block_permutation", "Dithered",
    "variance_additivity",
]

Quantizer = Callable[[Tensor], Tensor]  # or any object with a ``quantize`` method, e.g. E8Codec
Quantizers = Quantizer | Sequence[Quantizer]

# Δ = SCALAR_STEP_FACTOR · rms · 2^(−b): the step whose uniform quantizer has an output entropy of
# about b bits on a Gaussian at high rate (h(X) − log2 Δ = b); the E8 codec uses the same formula.
SCALAR_STEP_FACTOR = math.sqrt(2.0 * math.pi * math.e)


# ===================================================================== model passes
def _layers(model) -> list:
    inner = getattr(model, "model", model)
    return list(inner.layers)


def _as_quantizer(quantizer) -> Quantizer:
    """A callable, or an object with a ``quantize`` method (e.g. :class:`~lqlib.E8Codec`)."""
    return quantizer.quantize if hasattr(quantizer, "quantize") else quantizer


def _per_layer(quantizer: Quantizers, n_layers: int) -> list[Quantizer]:
    """One quantizer per layer from a quantizer or a sequence of them (a schedule)."""
    if callable(quantizer) or hasattr(quantizer, "quantize"):
        return [_as_quantizer(quantizer)] * n_layers
    quantizer = [_as_quantizer(q) for q in quantizer]
    if len(quantizer) != n_layers:
        raise ValueError(f"need one quantizer per layer ({n_layers}), got {len(quantizer)}")
    return quantizer


def _targets(ids: Tensor, labels: Tensor | None) -> Tensor:
    return (ids if labels is None else labels.to(ids.device))[:, 1:]


def _window_nll(logits: Tensor, targets: Tensor) -> Tensor:
    """Summed NLL (nats) of each window's scored targets, shape (B,); logits (B, T, V), targets (B, T−1)
    with −100 = unscored. Computed in float32 at least."""
    work = logits[:, :-1].to(torch.promote_types(logits.dtype, torch.float32))
    return F.cross_entropy(work.transpose(1, 2), targets, ignore_index=-100, reduction="none").sum(-1)


def _windows(loaded: LoadedModel, input_ids: Tensor, labels: Tensor | None, batch_size: int, desc: str,
             progress: bool):
    """Yield (ids, targets) per batch of windows, on the model's device."""
    for start in tqdm(range(0, input_ids.shape[0], batch_size), desc=desc, disable=not progress, leave=False):
        ids = input_ids[start:start + batch_size].to(loaded.model.device)
        yield ids, _targets(ids, None if labels is None else labels[start:start + batch_size])


def _slot_quantizers(loaded: LoadedModel, keys: Quantizers, values: Quantizers | None
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
                handles += [attn.k_proj.register_forward_pre_hook(detach_input),
                            attn.v_proj.register_forward_pre_hook(detach_input)]
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
    return _Probe(nll.detach(), grad_keys, [grads[(i, 1)] for i in range(n)],
                  [clean[(i, 0)] for i in range(n)], [clean[(i, 1)] for i in range(n)])


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


def kv_gradients(loaded: LoadedModel, input_ids: Tensor, pre_rope: bool = False, progress: bool = True, *,
                 labels: Tensor | None = None, downstream: bool = True, batch_size: int = 1) -> KVGradients:
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


def gradient_moments(loaded: LoadedModel, input_ids: Tensor, pre_rope: bool = False, batch_size: int = 1,
                     progress: bool = True, *, labels: Tensor | None = None, downstream: bool = True) -> dict:
    """M = E_t[g gᵀ] per (layer, K/V, KV head), accumulated window batch by window batch.

    Only the running sums stay in memory (float64 on the model's device); each batch's
    gradients are dropped after use.

    Returns
    -------
    dict with ``M`` float64 (layers, 2, kv_heads, d, d) (path 0 = keys, 1 = values),
    ``mean_gradient`` float64 (layers, 2, kv_heads, d), ``count`` (cached vectors per head:
    windows × tokens), ``nll`` (summed NLL of all windows, nats) and ``scored_tokens``.
    """
    m_sum = g_sum = None
    count, nll, scored = 0, 0.0, 0
    for ids, targets in _windows(loaded, input_ids, labels, batch_size, "gradient moments", progress):
        probe = _probe_pass(loaded, ids, targets, pre_rope, downstream)
        for layer, (gk, gv) in enumerate(zip(probe.grad_keys, probe.grad_values)):
            g = torch.stack([gk, gv]).to(torch.float64)                     # (2, B, H, T, d)
            if m_sum is None:
                shape = (len(probe.grad_keys), 2, g.shape[2], g.shape[-1])
                m_sum = torch.zeros(*shape, g.shape[-1], dtype=torch.float64, device=g.device)
                g_sum = torch.zeros(shape, dtype=torch.float64, device=g.device)
            m_sum[layer] += torch.einsum("pbhti,pbhtj->phij", g, g)
            g_sum[layer] += g.sum(dim=(1, 3))
        count += ids.shape[0] * ids.shape[1]
        nll += float(probe.nll.double().sum())
        scored += int((targets != -100).sum())
    m_sum = 0.5 * (m_sum + m_sum.transpose(-1, -2))                          # exactly symmetric
    return {"M": (m_sum / count).cpu().numpy(), "mean_gradient": (g_sum / count).cpu().numpy(),
            "count": count, "nll": nll, "scored_tokens": scored}


# ===================================================================== error moments and risks
def error_moments(x: Tensor, quantizer: Quantizer) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Σ, Σ_c and ē of the error e = quantizer(x) − x, per head.

    Parameters
    ----------
    x : shape (..., kv_heads, T, d); ``quantizer`` is applied to it as a whole (as the cache
        applies it to a (batch, kv_heads, T, d) write).

    Returns
    -------
    (Sigma, Sigma_c, mean_error), float64 arrays of shapes (..., kv_heads, d, d),
    (..., kv_heads, d, d) and (..., kv_heads, d): moments over the T axis only.
    """
    e = _as_quantizer(quantizer)(x).to(torch.float64) - x.to(torch.float64)
    sigma = torch.einsum("...ti,...tj->...ij", e, e) / e.shape[-2]
    sigma = 0.5 * (sigma + sigma.transpose(-1, -2))                          # exactly symmetric
    mean = e.mean(dim=-2)
    sigma_c = sigma - mean[..., :, None] * mean[..., None, :]
    return sigma.cpu().numpy(), sigma_c.cpu().numpy(), mean.cpu().numpy()


def error_moments_for_cache(kv: KVSample, key_quantizer: Quantizers, value_quantizer: Quantizers | None = None
                            ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`error_moments` of a captured cache, layer by layer (a quantizer or one per layer).

    Each layer's keys (values) are quantized as one (1, kv_heads, T, d) write, as
    :class:`~lqlib.quantized_cache.QuantizeDequantizeCache` does for one window.

    Returns
    -------
    (Sigma, Sigma_c, mean_error): float64 (layers, 2, kv_heads, d, d) twice and (layers, 2, kv_heads, d).
    """
    n = kv.keys.shape[0]
    kq = _per_layer(key_quantizer, n)
    vq = _per_layer(key_quantizer if value_quantizer is None else value_quantizer, n)

    def one_write(x: Tensor, quantizer: Quantizer) -> list[np.ndarray]:   # (H, T, d) → moments without batch axis
        return [moment[0] for moment in error_moments(x[None], quantizer)]

    slots = [[one_write(kv.keys[l], kq[l]), one_write(kv.values[l], vq[l])] for l in range(n)]
    return tuple(np.array([[slot[i] for slot in layer] for layer in slots]) for i in range(3))


def _trace_product(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.einsum("...ij,...ji->...", np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64))


def directional_risk(M: np.ndarray, Sigma: np.ndarray) -> np.ndarray:
    """tr(M·Σ) over the last two axes (broadcasting over the leading ones): E[(gᵀe)²] for independent g, e."""
    return _trace_product(M, Sigma)


def hlp_bounds(M: np.ndarray, Sigma: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(λ_min(M)·tr Σ, λ_max(M)·tr Σ): bounds on tr(MΣ) for symmetric PSD M and Σ, per leading index.

    Tight: the lower (upper) bound is reached by Σ ∝ v vᵀ with v the eigenvector of λ_min (λ_max).
    """
    eig = np.linalg.eigvalsh(np.asarray(M, dtype=np.float64))
    trace = np.trace(np.asarray(Sigma, dtype=np.float64), axis1=-2, axis2=-1)
    return eig[..., 0] * trace, eig[..., -1] * trace


def k_path_share(M: np.ndarray, Sigma: np.ndarray) -> np.ndarray:
    """tr(MΣ)_K / (tr(MΣ)_K + tr(MΣ)_V) summed over layers and heads.

    M, Sigma : shape (..., layers, 2, kv_heads, d, d); returns shape (...).
    """
    risk = directional_risk(M, Sigma)                    # (..., layers, 2, kv_heads)
    k, v = risk[..., 0, :].sum(axis=(-1, -2)), risk[..., 1, :].sum(axis=(-1, -2))
    return k / (k + v)


def bias_drift(M: np.ndarray, Sigma: np.ndarray, Sigma_c: np.ndarray,
               axis: int | tuple[int, ...] | None = None) -> np.ndarray:
    """|tr(MΣ) − tr(MΣ_c)| / tr(MΣ): the share of the directional risk due to the mean error
    (= ēᵀMē / tr MΣ).

    With ``axis``, the risks are first summed over those axes of the (leading-axes) risk array,
    e.g. ``axis=(0, 1, 2)`` on (layers, 2, kv_heads, d, d) inputs gives one model-level number.
    """
    risk, centred = directional_risk(M, Sigma), directional_risk(M, Sigma_c)
    if axis is not None:
        risk, centred = risk.sum(axis=axis), centred.sum(axis=axis)
    return np.abs(risk - centred) / risk


# ===================================================================== Theorem A: Q1 against ΔL
def _recording(quantizer: Quantizer, store: dict, key: tuple[int, int]) -> Quantizer:
    """``quantizer`` that also records the error it injects (x̂ − x) under ``key``."""
    def write(x: Tensor) -> Tensor:
        out = quantizer(x)
        store[key] = (out - x).detach()
        return out
    return write


def _shifted(shift: Tensor) -> Quantizer:
    return lambda x: x + shift.to(x.dtype)


@torch.no_grad()
def _quantized_pass(loaded: LoadedModel, ids: Tensor, targets: Tensor, kq: list[Quantizer], vq: list[Quantizer]
                    ) -> tuple[Tensor, dict]:
    """Summed NLL per window with the in-loop quantized cache, and the injected errors {(layer, path): e}."""
    errors: dict[tuple[int, int], Tensor] = {}
    keys = [_recording(q, errors, (i, 0)) for i, q in enumerate(kq)]
    values = [_recording(q, errors, (i, 1)) for i, q in enumerate(vq)]
    logits = loaded.model(ids, cache=QuantizeDequantizeCache(keys, loaded.config, values), use_cache=True).logits
    return _window_nll(logits, targets), errors


def _dot(g: Tensor, e: Tensor) -> float:
    return float((g.to(torch.float64) * e.to(torch.float64)).sum())


def _first_order(probe: _Probe, errors: dict) -> float:
    return sum(_dot(g, errors[(i, p)]) for p, grads in enumerate((probe.grad_keys, probe.grad_values))
               for i, g in enumerate(grads))


@torch.no_grad()
def _clean_errors(probe: _Probe, kq: list[Quantizer], vq: list[Quantizer]) -> dict:
    """e = q(x) − x on the clean cache of a probe pass, {(layer, path): e}."""
    return {(i, p): q[i](x[i]) - x[i] for p, (x, q) in enumerate(((probe.keys, kq), (probe.values, vq)))
            for i in range(len(kq))}


def master_identity(loaded: LoadedModel, input_ids: Tensor, key_quantizers: Quantizers,
                    value_quantizers: Quantizers | None = None, batch_size: int = 1, progress: bool = True, *,
                    labels: Tensor | None = None) -> dict:
    """Theorem A on real windows: Q1, ΔL, and ΔL of the mirrored errors, in one go.

    Per batch: a differentiated clean pass (g, clean K/V), the in-loop quantized pass (ΔL and
    the errors e it injects, post-RoPE) and a mirror pass injecting −e. With φ(s) the summed NLL
    when s·e is injected, ΔL = φ(1) − φ(0); ``odd`` = (φ(1) − φ(−1))/2 = Q1 + O(e³) and
    ``even`` = (φ(1) + φ(−1))/2 − φ(0) = Q2 + O(e⁴) = ½ eᵀHe + O(e⁴).

    Returns
    -------
    dict of floats (nats, summed over windows): ``nll`` (clean), ``delta_loss``,
    ``delta_loss_mirror``, ``q1`` (injected errors), ``q1_clean`` (errors of the clean cache),
    ``odd``, ``even``; and ``scored_tokens``.
    """
    kq, vq = _slot_quantizers(loaded, key_quantizers, value_quantizers)
    out = dict.fromkeys(("nll", "delta_loss", "delta_loss_mirror", "q1", "q1_clean"), 0.0)
    scored = 0
    for ids, targets in _windows(loaded, input_ids, labels, batch_size, "master identity", progress):
        probe = _probe_pass(loaded, ids, targets, pre_rope=False, downstream=True)
        nll_q, errors = _quantized_pass(loaded, ids, targets, kq, vq)
        mirror_k = [_shifted(-errors[(i, 0)]) for i in range(len(kq))]
        mirror_v = [_shifted(-errors[(i, 1)]) for i in range(len(vq))]
        nll_m, _ = _quantized_pass(loaded, ids, targets, mirror_k, mirror_v)
        clean = float(probe.nll.double().sum())
        out["nll"] += clean
        out["delta_loss"] += float(nll_q.double().sum()) - clean
        out["delta_loss_mirror"] += float(nll_m.double().sum()) - clean
        out["q1"] += _first_order(probe, errors)
        out["q1_clean"] += _first_order(probe, _clean_errors(probe, kq, vq))
        scored += int((targets != -100).sum())
    out["odd"] = 0.5 * (out["delta_loss"] - out["delta_loss_mirror"])
    out["even"] = 0.5 * (out["delta_loss"] + out["delta_loss_mirror"])
    out["scored_tokens"] = scored
    return out


def first_order_term(loaded: LoadedModel, input_ids: Tensor, key_quantizers: Quantizers,
                     value_quantizers: Quantizers | None = None, errors: str = "injected", batch_size: int = 1,
                     progress: bool = True, *, labels: Tensor | None = None) -> float:
    """Q1 = Σ gᵀe over every cached key and value of the windows (nats, summed NLL convention).

    Parameters
    ----------
    key_quantizers, value_quantizers : a quantizer or one per layer, as for
        :class:`~lqlib.quantized_cache.QuantizeDequantizeCache` (values default to the keys').
    errors : ``"injected"``: e as the in-loop quantized pass injects it (one extra forward
        pass; exact first-order term of :func:`loss_change`); ``"clean"``: e = q(x) − x on the
        clean cache (what a captured cache gives; exact for layer 0, approximate later,
        because there the quantizer really sees inputs moved by earlier errors).
    """
    if errors not in ("injected", "clean"):
        raise ValueError(f"errors must be 'injected' or 'clean', got {errors!r}")
    kq, vq = _slot_quantizers(loaded, key_quantizers, value_quantizers)
    total = 0.0
    for ids, targets in _windows(loaded, input_ids, labels, batch_size, "first-order term", progress):
        probe = _probe_pass(loaded, ids, targets, pre_rope=False, downstream=True)
        e = (_quantized_pass(loaded, ids, targets, kq, vq)[1] if errors == "injected"
             else _clean_errors(probe, kq, vq))
        total += _first_order(probe, e)
    return total


@torch.no_grad()
def loss_change(loaded: LoadedModel, input_ids: Tensor, key_quantizers: Quantizers,
                value_quantizers: Quantizers | None = None, batch_size: int = 1, progress: bool = True, *,
                labels: Tensor | None = None) -> float:
    """ΔL: summed NLL with the in-loop quantized cache minus the clean one (nats, summed over windows).

    Divide by the number of scored tokens for the change in mean NLL.
    """
    kq, vq = _slot_quantizers(loaded, key_quantizers, value_quantizers)
    total = 0.0
    for ids, targets in _windows(loaded, input_ids, labels, batch_size, "loss change", progress):
        clean = _window_nll(loaded.model(ids, use_cache=False).logits, targets)
        quantized, _ = _quantized_pass(loaded, ids, targets, kq, vq)
        total += float(quantized.double().sum() - clean.double().sum())
    return total


# ===================================================================== Theorem A: many configurations at once
@dataclass(frozen=True)
class PredictorStudy:
    """ΔL and its predictors for many quantizer configurations on the same windows (:func:`predictor_study`).

    C configurations; per-slot arrays are indexed (config, layer, path K = 0 / V = 1, kv_head). All
    losses are summed NLL in nats over every window (the module's conventions); N = ``count``
    cached vectors per head (windows × tokens).

    Attributes
    ----------
    delta_loss : (C,) ΔL of the in-loop quantized pass, nats.
    q1 : (C,) Q1 = Σ gᵀe with the injected errors, nats.
    slot_q1 : (C, layers, 2, kv_heads) Q1 split by slot (sums to ``q1``).
    slot_risk : (C, layers, 2, kv_heads) tr(M Σ) per slot, nats² per vector, with M and Σ the
        means over all N vectors of the same windows (Σ uncentred).
    slot_risk_centred : same with Σ_c = Σ − ē ēᵀ (= ``slot_risk`` − ēᵀMē).
    slot_trace : (C, layers, 2, kv_heads) tr Σ per slot (mean squared error norm per vector).
    mean_error : (C, layers, 2, kv_heads, d) ē per slot.
    M : (layers, 2, kv_heads, d, d) gradient moments of the windows (:func:`gradient_moments`).
    count : N; nll : clean summed NLL (nats); scored_tokens : number of scored targets.
    delta_loss_mirror : (C,) ΔL with −e injected (NaN for configurations without the mirror pass),
        or None when no configuration had it.
    sigma : (C, layers, 2, kv_heads, d, d) Σ per slot (``keep_sigma=True``), else None.
    """

    delta_loss: np.ndarray
    q1: np.ndarray
    slot_q1: np.ndarray
    slot_risk: np.ndarray
    slot_risk_centred: np.ndarray
    slot_trace: np.ndarray
    mean_error: np.ndarray
    M: np.ndarray
    count: int
    nll: float
    scored_tokens: int
    delta_loss_mirror: np.ndarray | None = None
    sigma: np.ndarray | None = None

    @property
    def risk(self) -> np.ndarray:
        """(C,) directional risk N·Σ_slots tr(M_s Σ_s), nats².

        Second order: the expected Σ_t (g_tᵀe_t)² over all cached vectors if each g_t were
        independent of its e_t, i.e. the variance Q1 would have if every vector's contribution
        were independent with mean zero (Theorem B). Compare it with ΔL by rank, or take its
        square root (nats) to set it beside |Q1|.
        """
        return self.count * self.slot_risk.sum(axis=(1, 2, 3))

    @property
    def mse(self) -> np.ndarray:
        """(C,) mean squared error per cached element: Σ_slots tr Σ_s / (slots · d)."""
        slots = np.prod(self.slot_trace.shape[1:])
        return self.slot_trace.sum(axis=(1, 2, 3)) / (slots * self.mean_error.shape[-1])

    @property
    def k_path_share(self) -> np.ndarray:
        """(C,) tr(MΣ)_K / (tr(MΣ)_K + tr(MΣ)_V) summed over layers and heads (see :func:`k_path_share`)."""
        k, v = self.slot_risk[:, :, 0].sum(axis=(1, 2)), self.slot_risk[:, :, 1].sum(axis=(1, 2))
        return k / (k + v)

    @property
    def bias_drift(self) -> np.ndarray:
        """(C,) |tr(MΣ) − tr(MΣ_c)| / tr(MΣ) summed over all slots (see :func:`bias_drift`)."""
        risk = self.slot_risk.sum(axis=(1, 2, 3))
        return np.abs(risk - self.slot_risk_centred.sum(axis=(1, 2, 3))) / risk

    @property
    def odd(self) -> np.ndarray | None:
        """(C,) (ΔL(e) − ΔL(−e))/2 = Q1 + O(e³), or None without the mirror pass."""
        return None if self.delta_loss_mirror is None else 0.5 * (self.delta_loss - self.delta_loss_mirror)

    @property
    def even(self) -> np.ndarray | None:
        """(C,) (ΔL(e) + ΔL(−e))/2 = ½ eᵀHe + O(e⁴), or None without the mirror pass."""
        return None if self.delta_loss_mirror is None else 0.5 * (self.delta_loss + self.delta_loss_mirror)

    def rows(self) -> list[dict]:
        """One dict of floats per configuration: ``config`` (index), ``delta_loss``, ``q1``, ``risk``,
        ``mse``, ``k_path_share``, ``bias_drift`` and, when any configuration had the mirror pass,
        ``delta_loss_mirror``, ``odd`` and ``even`` (NaN for the others)."""
        columns = {"delta_loss": self.delta_loss, "q1": self.q1, "risk": self.risk, "mse": self.mse,
                   "k_path_share": self.k_path_share, "bias_drift": self.bias_drift}
        if self.delta_loss_mirror is not None:
            columns.update(delta_loss_mirror=self.delta_loss_mirror, odd=self.odd, even=self.even)
        return [{"config": c, **{name: float(values[c]) for name, values in columns.items()}}
                for c in range(len(self.delta_loss))]


def predictor_study(loaded: LoadedModel, input_ids: Tensor, configs: Sequence[Quantizers],
                    value_configs: Sequence[Quantizers | None] | None = None, *,
                    mirror: bool | Sequence[bool] = False,
                    keep_sigma: bool = False, batch_size: int = 1, progress: bool = True,
                    labels: Tensor | None = None) -> PredictorStudy:
    """Theorem A for many quantizer configurations on the same windows, sharing the gradients.

    First M = E_t[g gᵀ] over all windows (:func:`gradient_moments`, one differentiated pass per
    batch). Then per window batch: one differentiated clean pass (g and the clean NLL), and for
    each configuration the in-loop quantized pass, which gives ΔL and the errors e it injects;
    from those, Q1 = Σ gᵀe and the error moments, accumulated over the windows. Only running
    sums per configuration stay in memory (O(C · layers · heads · d) floats, plus Σ itself with
    ``keep_sigma``); the batch's gradients and errors are dropped after use.

    For each configuration the values equal :func:`loss_change` and :func:`first_order_term`
    (``errors="injected"``) of that configuration, and the moments are those of the injected
    errors, so tr(MΣ) and tr Σ are measured on the same windows and vectors as ΔL and Q1.

    Parameters
    ----------
    input_ids : (n, T) windows.
    configs : C key quantizers, each a quantizer or one per layer (as for
        :class:`~lqlib.quantized_cache.QuantizeDequantizeCache`).
    value_configs : C value quantizers (an entry None: the keys'); default: the keys'.
    mirror : also run the mirror pass injecting −e (one more pass per configuration and batch)
        for the odd / even parts of ΔL (:attr:`PredictorStudy.odd`, :attr:`PredictorStudy.even`):
        for every configuration, or one bool per configuration.
    keep_sigma : also return Σ per configuration and slot (C · layers · 2 · heads · d² floats).
    labels : (n, T) targets with −100 for unscored tokens.

    Returns
    -------
    PredictorStudy; :meth:`PredictorStudy.rows` gives one row per configuration.
    """
    configs = list(configs)
    if not configs:
        raise ValueError("need at least one configuration")
    values = [None] * len(configs) if value_configs is None else list(value_configs)
    if len(values) != len(configs):
        raise ValueError(f"{len(values)} value configurations for {len(configs)} key configurations")
    mirrors = [bool(mirror)] * len(configs) if isinstance(mirror, bool) else [bool(m) for m in mirror]
    if len(mirrors) != len(configs):
        raise ValueError(f"{len(mirrors)} mirror flags for {len(configs)} configurations")
    slots = [_slot_quantizers(loaded, k, v) for k, v in zip(configs, values)]   # validates every config

    moments = gradient_moments(loaded, input_ids, batch_size=batch_size, progress=progress, labels=labels)
    device = loaded.model.device
    M = torch.as_tensor(moments["M"], device=device)                             # (L, 2, H, d, d)
    n_layers, _, heads, d, _ = M.shape
    n_configs = len(configs)
    delta = np.zeros(n_configs)
    mirrored = np.where(mirrors, 0.0, np.nan) if any(mirrors) else None
    slot_q1 = torch.zeros(n_configs, n_layers, 2, heads, dtype=torch.float64, device=device)
    square_sum = torch.zeros_like(slot_q1)                                       # Σ_t e eᵀ contracted with M
    trace_sum = torch.zeros_like(slot_q1)
    error_sum = torch.zeros(n_configs, n_layers, 2, heads, d, dtype=torch.float64, device=device)
    sigma_sum = (torch.zeros(n_configs, n_layers, 2, heads, d, d, dtype=torch.float64, device=device)
                 if keep_sigma else None)

    batches = math.ceil(input_ids.shape[0] / batch_size)
    bar = tqdm(total=batches * n_configs, desc="predictor study", disable=not progress, leave=False)
    for ids, targets in _windows(loaded, input_ids, labels, batch_size, "", False):
        probe = _probe_pass(loaded, ids, targets, pre_rope=False, downstream=True)
        clean = float(probe.nll.double().sum())
        grads = [[g.to(torch.float64) for g in probe.grad_keys], [g.to(torch.float64) for g in probe.grad_values]]
        del probe
        for c, (kq, vq) in enumerate(slots):
            nll_q, errors = _quantized_pass(loaded, ids, targets, kq, vq)
            delta[c] += float(nll_q.double().sum()) - clean
            if mirrors[c]:
                nll_m, _ = _quantized_pass(loaded, ids, targets,
                                           [_shifted(-errors[(i, 0)]) for i in range(n_layers)],
                                           [_shifted(-errors[(i, 1)]) for i in range(n_layers)])
                mirrored[c] += float(nll_m.double().sum()) - clean
            with torch.no_grad():
                for (i, p), e in errors.items():                                 # e: (B, H, T, d)
                    e = e.to(torch.float64)
                    slot_q1[c, i, p] += (grads[p][i] * e).sum(dim=(0, 2, 3))
                    outer = torch.einsum("bhti,bhtj->hij", e, e)                 # Σ_t e eᵀ per head
                    square_sum[c, i, p] += (M[i, p] * outer).sum(dim=(-1, -2))   # tr(M·outer), both symmetric
                    trace_sum[c, i, p] += e.square().sum(dim=(0, 2, 3))
                    error_sum[c, i, p] += e.sum(dim=(0, 2))
                    if keep_sigma:
                        sigma_sum[c, i, p] += outer
            bar.update()
    bar.close()

    count = moments["count"]
    mean_error = error_sum / count
    bias = torch.einsum("clphi,lphij,clphj->clph", mean_error, M, mean_error)     # ēᵀMē
    risk = square_sum / count
    sigma = None
    if keep_sigma:
        sigma = sigma_sum / count
        sigma = (0.5 * (sigma + sigma.transpose(-1, -2))).cpu().numpy()
    return PredictorStudy(
        delta_loss=delta, q1=slot_q1.sum(dim=(1, 2, 3)).cpu().numpy(), slot_q1=slot_q1.cpu().numpy(),
        slot_risk=risk.cpu().numpy(), slot_risk_centred=(risk - bias).cpu().numpy(),
        slot_trace=(trace_sum / count).cpu().numpy(), mean_error=mean_error.cpu().numpy(),
        M=moments["M"], count=count, nll=moments["nll"], scored_tokens=moments["scored_tokens"],
        delta_loss_mirror=mirrored, sigma=sigma)


def _average_ranks(a: np.ndarray) -> np.ndarray:
    """Ranks 1..n along the last axis, ties sharing their average rank (as scipy's ``rankdata``)."""
    below = (a[..., :, None] > a[..., None, :]).sum(axis=-1)
    equal = (a[..., :, None] == a[..., None, :]).sum(axis=-1)
    return below + 0.5 * (equal - 1) + 1.0


def _pearson_rows(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    x, y = x - x.mean(axis=-1, keepdims=True), y - y.mean(axis=-1, keepdims=True)
    denominator = np.sqrt((x * x).sum(axis=-1) * (y * y).sum(axis=-1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denominator > 0, (x * y).sum(axis=-1) / denominator, np.nan)


def spearman_bootstrap(x, y, draws: int = 2000, level: float = 0.95, seed: int = 0) -> dict:
    """Spearman ρ of paired samples with a percentile bootstrap interval over the pairs.

    Parameters
    ----------
    x, y : (n,) paired values (e.g. one per quantizer configuration).
    draws : bootstrap resamples of the n pairs (with replacement; ties get average ranks).
    level : coverage of the interval.

    Returns
    -------
    dict: ``rho``, ``ci_low``, ``ci_high`` (floats; draws with a constant side are dropped) and ``n``.
    """
    x, y = np.asarray(x, dtype=np.float64).ravel(), np.asarray(y, dtype=np.float64).ravel()
    if x.shape != y.shape or x.size < 3:
        raise ValueError(f"need two equally long samples of at least 3 values, got {x.size} and {y.size}")
    if not 0 < level < 1:
        raise ValueError(f"level must lie in (0, 1), got {level}")
    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        raise ValueError("the samples must be finite")
    rho = float(_pearson_rows(_average_ranks(x), _average_ranks(y)))
    index = np.random.default_rng(seed).integers(0, x.size, (draws, x.size))
    boot = _pearson_rows(_average_ranks(x[index]), _average_ranks(y[index]))
    tail = 50.0 * (1.0 - level)
    low, high = np.nanpercentile(boot, [tail, 100.0 - tail])
    return {"rho": rho, "ci_low": float(low), "ci_high": float(high), "n": int(x.size)}


def theorem_a_configurations(bits: float, sample: KVSample, *, e8_seeds: int = 12, random_orders: int = 10,
                             mixtures: int = 13) -> list[dict]:
    """A fixed family of quantizer configurations at one bit width that differ in error direction.

    With the defaults, 50 configurations in four families (in this order):

    * ``"E8 + RHT"``: :class:`~lqlib.E8Codec` with a randomized Hadamard transform, RHT seeds
      0 … e8_seeds−1 (e8_seeds).
    * ``"E8, permuted"``: E8 without RHT on the dims in another order: identity, sorted by
      second moment (per layer and path, from ``sample``), random orders 1 … random_orders
      (2 + random_orders).
    * ``"scalar block"``: :class:`ScalarBlockQuantizer` with blocks of 8, 16, 32 dims, each in
      the identity, sorted, random-1 and random-2 orders, and one step per vector (block = d)
      (13).
    * ``"per-layer mix"``: every (layer, K/V) slot draws, with numpy seed 0 … mixtures−1, one
      of E8 + RHT (seed 0), E8 identity, E8 random-1, scalar 8 identity, scalar 16 sorted and
      scalar 32 random-1 (mixtures).

    Every member has the same nominal rate ``bits`` (the E8 codec's and the scalar quantizer's
    step rule; side information not counted).

    Parameters
    ----------
    bits : nominal bits/dim.
    sample : a captured cache (calibration text) for the sorted orders.

    Returns
    -------
    list of dicts: ``name``, ``family``, ``keys`` and ``values`` (one quantizer per layer).
    """
    from .codec import E8Codec

    layers, d = sample.keys.shape[0], sample.keys.shape[-1]
    if d % 32:
        raise ValueError(f"the family needs a head dim divisible by 32, got {d}")
    sorted_orders = [[block_permutation("sorted", d, sample.keys[l]) for l in range(layers)],
                     [block_permutation("sorted", d, sample.values[l]) for l in range(layers)]]

    def ordered(make: Callable[[Tensor | None], Quantizer], kind: str, seed: int = 0) -> tuple[list, list]:
        if kind == "sorted":
            return tuple([make(order) for order in orders] for orders in sorted_orders)
        quantizer = make(None if kind == "identity" else block_permutation(kind, d, seed=seed))
        return [quantizer] * layers, [quantizer] * layers

    def e8(order: Tensor | None) -> Quantizer:
        codec = E8Codec(bits, rotation="none")
        return codec if order is None else Permuted(codec, order)

    def scalar(block: int) -> Callable[[Tensor | None], Quantizer]:
        return lambda order: ScalarBlockQuantizer(bits, block=block, permutation=order)

    def config(name: str, family: str, slots: tuple[list, list]) -> dict:
        return {"name": name, "family": family, "keys": slots[0], "values": slots[1]}

    out = [config(f"E8 RHT seed {s}", "E8 + RHT", ([E8Codec(bits, seed=s)] * layers,) * 2) for s in range(e8_seeds)]
    orders = [("identity", 0), ("sorted", 0)] + [("random", s) for s in range(1, random_orders + 1)]
    out += [config(f"E8 {kind}" + (f" {seed}" if kind == "random" else ""), "E8, permuted", ordered(e8, kind, seed))
            for kind, seed in orders]
    out += [config(f"scalar {block} {kind}" + (f" {seed}" if kind == "random" else ""), "scalar block",
                   ordered(scalar(block), kind, seed))
            for block in (8, 16, 32) for kind, seed in orders[:4]]
    out.append(config(f"scalar {d}", "scalar block", ordered(scalar(d), "identity")))
    menu = [([E8Codec(bits, seed=0)] * layers,) * 2, ordered(e8, "identity"), ordered(e8, "random", 1),
            ordered(scalar(8), "identity"), ordered(scalar(16), "sorted"), ordered(scalar(32), "random", 1)]
    for seed in range(mixtures):
        pick = np.random.default_rng(seed).integers(0, len(menu), (2, layers))
        out.append(config(f"mix {seed}", "per-layer mix",
                          tuple([menu[pick[p, l]][p][l] for l in range(layers)] for p in (0, 1))))
    return out


__all__ += ["PredictorStudy", "predictor_study", "spearman_bootstrap", "theorem_a_configurations"]


# ===================================================================== quantizers for the studies
def _check_permutation(permutation, d: int | None = None) -> Tensor:
    perm = torch.as_tensor(np.asarray(permutation), dtype=torch.int64).reshape(-1)
    if d is not None and perm.numel() != d:
        raise ValueError(f"permutation has {perm.numel()} entries for vectors of dim {d}")
    if not torch.equal(torch.sort(perm).values, torch.arange(perm.numel())):
        raise ValueError("not a permutation of 0..d−1")
    return perm


class Permuted:
    """``quantizer`` applied to the dims in another order: x ↦ q(x[..., p])[..., p⁻¹].

    The order decides which dims share an 8-block (E8 point, block step). A reordering *inside*
    a block changes neither E8 (its points are closed under coordinate permutations) nor a
    per-block scalar quantizer; what matters is which dims end up together.
    """

    def __init__(self, quantizer: Quantizer, permutation) -> None:
        self.quantizer = _as_quantizer(quantizer)
        self.permutation = _check_permutation(permutation)
        self.inverse = torch.argsort(self.permutation)

    def __call__(self, x: Tensor) -> Tensor:
        perm = self.permutation.to(x.device)
        return self.quantizer(x[..., perm])[..., self.inverse.to(x.device)]


def block_permutation(kind: str, d: int, sample: Tensor | None = None, seed: int = 0) -> Tensor:
    """An ordering of d dims for the permutation puzzle: int64 (d,).

    ``"identity"``; ``"sorted"``: by decreasing second moment of ``sample`` (..., d) per dim, so
    dims of similar scale share blocks; ``"random"``: a seeded uniform permutation.
    """
    if kind == "identity":
        return torch.arange(d)
    if kind == "random":
        return torch.randperm(d, generator=torch.Generator().manual_seed(seed))
    if kind == "sorted":
        if sample is None or sample.shape[-1] != d:
            raise ValueError("'sorted' needs a sample of shape (..., d)")
        second = sample.detach().to(torch.float64).reshape(-1, d).square().mean(dim=0).cpu()
        return torch.argsort(second, descending=True, stable=True)
    raise ValueError(f"kind must be 'identity', 'sorted' or 'random', got {kind!r}")


def _work(x: Tensor) -> Tensor:
    return x.detach().to(torch.float64 if x.dtype == torch.float64 else torch.float32)


class ScalarBlockQuantizer:
    """Uniform scalar quantizer with one step per block of ``block`` dims, set by the bit width.

    For a block with mean square ms, ``Δ = factor · sqrt(ms) · 2^(−bits)`` (default factor
    √(2πe), :data:`SCALAR_STEP_FACTOR`, the E8 codec's formula); x̂ = Δ·round(x/Δ). At high rate
    on Gaussian data the output entropy is about ``bits`` per dim and the MSE is
    Δ²/12 = (πe/6)·ms·4^(−bits): each extra bit divides the MSE by 4. (The original proxy's step
    ignored the bit width.) A block of zeros stays zero. The step needs one scale per block as
    side information, not counted here.

    Parameters
    ----------
    bits : rate b > 0 (bits/dim).
    block : dims per step; must divide d. ``block = d`` gives one step per vector.
    permutation : optional ordering of the d dims applied before blocking and undone after
        (see :class:`Permuted`, :func:`block_permutation`).
    """

    def __init__(self, bits: float, block: int = 8, permutation=None, factor: float = SCALAR_STEP_FACTOR) -> None:
        if not bits > 0:
            raise ValueError(f"bits must be positive, got {bits}")
        if block < 1:
            raise ValueError(f"block must be positive, got {block}")
        self.bits, self.block, self.factor = float(bits), int(block), float(factor)
        self.permutation = None if permutation is None else _check_permutation(permutation)

    def __repr__(self) -> str:
        perm = "" if self.permutation is None else ", permuted"
        return f"ScalarBlockQuantizer(bits={self.bits}, block={self.block}{perm})"

    def _order(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        if self.permutation is None:
            return x, None
        if self.permutation.numel() != x.shape[-1]:
            raise ValueError(f"permutation has {self.permutation.numel()} entries for vectors of dim {x.shape[-1]}")
        perm = self.permutation.to(x.device)
        return x[..., perm], torch.argsort(perm)

    def _blocks(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
        """(permuted x as blocks (..., d/block, block), step per block (..., d/block, 1), inverse)."""
        d = x.shape[-1]
        if d % self.block:
            raise ValueError(f"block {self.block} does not divide the dim {d}")
        ordered, inverse = self._order(_work(x))
        blocks = ordered.reshape(*x.shape[:-1], d // self.block, self.block)
        step = self.factor * blocks.square().mean(dim=-1, keepdim=True).sqrt() * 2.0 ** (-self.bits)
        return blocks, torch.where(step > 0, step, torch.ones_like(step)), inverse

    @staticmethod
    def _unblock(blocks: Tensor, inverse: Tensor | None) -> Tensor:
        flat = blocks.flatten(-2)
        return flat if inverse is None else flat[..., inverse]

    def step(self, x: Tensor) -> Tensor:
        """The step of every element of ``x`` (..., d), in x's own dim order."""
        blocks, step, inverse = self._blocks(x)
        return self._unblock(step.expand_as(blocks), inverse).to(x.dtype)

    def symbols(self, x: Tensor) -> Tensor:
        """Integer symbols round(x/Δ), int64 (..., d) in x's dim order (for entropy/rate estimates)."""
        blocks, step, inverse = self._blocks(x)
        return self._unblock(torch.round(blocks / step), inverse).to(torch.int64)

    def __call__(self, x: Tensor) -> Tensor:
        blocks, step, inverse = self._blocks(x)
        return self._unblock(torch.round(blocks / step) * step, inverse).to(x.dtype)


class Dithered:
    """Subtractive dithered uniform quantization: x̂ = Δ·(round(x/Δ + u) − u), u ~ U[−½, ½) per element.

    Crypto lemma: e = x̂ − x is uniform on [−Δ/2, Δ/2) and independent of x (given Δ), whatever
    the input; so E e = 0 and E e² = Δ²/12. The dither is a fixed pseudo-random function of
    (seed, shape): the decoder can regenerate it, and the same input gives the same output (so
    a captured cache and the in-loop pass see the same dither). Give each layer its own seed
    for dither independent across layers; elements of one call always get independent dither.

    Parameters
    ----------
    step : Δ, a float or a function x ↦ steps broadcastable to x (e.g.
        ``ScalarBlockQuantizer(b).step``); computed from the input, before the dither.
    seed : seed of the dither.
    """

    def __init__(self, step: float | Callable[[Tensor], Tensor], seed: int = 0) -> None:
        self.step = step
        self.seed = int(seed)

    def __repr__(self) -> str:
        return f"Dithered(step={self.step!r}, seed={self.seed})"

    def steps(self, x: Tensor) -> Tensor:
        """Δ for ``x``, broadcastable to it (work dtype); zero steps are replaced by 1."""
        work = _work(x)
        step = self.step(x) if callable(self.step) else torch.tensor(float(self.step))
        step = torch.as_tensor(step, device=x.device).to(work.dtype)
        return torch.where(step > 0, step, torch.ones_like(step))

    def dither(self, x: Tensor) -> Tensor:
        """u ~ U[−½, ½) of x's shape, in step units (work dtype, x's device)."""
        generator = torch.Generator(device=x.device).manual_seed(self.seed)
        return torch.rand(x.shape, generator=generator, device=x.device, dtype=_work(x).dtype) - 0.5

    def __call__(self, x: Tensor) -> Tensor:
        work, step, u = _work(x), self.steps(x), self.dither(x)
        return ((torch.round(work / step + u) - u) * step).to(x.dtype)


# ===================================================================== Theorem B
def _float64(a) -> Tensor:
    if isinstance(a, Tensor):
        return a.detach().to(device="cpu", dtype=torch.float64)
    return torch.as_tensor(np.ascontiguousarray(a, dtype=np.float64))


def variance_additivity(g_parts, e_parts, step=None) -> dict:
    """Does Var(Σ_parts gᵀe) split into Σ_parts Var(gᵀe)? (Theorem B, on samples.)

    Parameters
    ----------
    g_parts : gradients, broadcastable to ``e_parts`` (e.g. fixed per part: (*parts, d)).
    e_parts : errors, shape (S, *parts, d): S independent realisations (e.g. dither draws) of
        the error of every part (layers, positions, …).
    step : quantizer step Δ broadcastable to ``e_parts`` (e.g. (*parts, 1)); enables ``pred``.

    Returns
    -------
    dict of floats: ``var_total`` = Var_S(Σ_parts gᵀe), ``sum_var_parts`` = Σ_parts Var_S(gᵀe),
    ``pos_add`` = their ratio (1 when the parts' contributions are uncorrelated),
    ``analytic`` = E_S Σ ‖g‖²Δ²/12 (elementwise g²Δ²/12 summed) and ``pred`` =
    var_total / analytic (1 under the Crypto lemma); NaN without ``step``.
    """
    e = _float64(e_parts)
    g = torch.broadcast_to(_float64(g_parts), e.shape)
    contributions = (g * e).sum(dim=-1).reshape(e.shape[0], -1)          # (S, parts)
    var_total = float(contributions.sum(dim=1).var())
    sum_var = float(contributions.var(dim=0).sum())
    analytic = float("nan")
    if step is not None:
        analytic = float((g.square() * torch.broadcast_to(_float64(step), e.shape).square() / 12.0).sum()
                         / e.shape[0])
    return {"var_total": var_total, "sum_var_parts": sum_var, "pos_add": var_total / sum_var,
            "analytic": analytic, "pred": var_total / analytic}


# ===================================================================== Theorem B: dithered trials
__all__ += ["trial_seed", "dithered_quantizers", "ordering_steps", "layer_groups", "DitheredTrials", "dithered_trials",
            "fixed_gradient_additivity", "real_pass_additivity"]

Step = float | Callable[[Tensor], Tensor]
Steps = Step | Sequence[Step]


_SEED_LAYERS, _SEED_BATCHES, _SEED_TRIALS = 256, 64, 2 ** 17


def trial_seed(seed: int, trial: int, layer: int, path: int, batch: int = 0) -> int:
    """Dither seed of one (trial, window batch, layer, path) of the run ``seed``: a 32-bit integer.

    torch's CPU generator keeps only the low 32 bits of a seed, so a hash into 64 bits would not
    protect against collisions; instead the slots of a run are numbered, ``offset(seed) +
    ((trial·64 + batch)·256 + layer)·2 + path`` mod 2³², with the offset a NumPy ``SeedSequence``
    hash of ``seed``. Within one run distinct (trial, batch, layer, path) thus get distinct seeds
    (for trial < 2¹⁷, batch < 64, layer < 256), so every slot of every trial and batch gets its
    own dither. (Reusing one seed for window batches of equal shape would apply the same dither
    u to other inputs: their errors would be deterministic functions of each other.) Other runs
    start elsewhere; a run that shares ``seed`` shares the dither of each slot (paired runs).
    """
    if not (0 <= trial < _SEED_TRIALS and 0 <= batch < _SEED_BATCHES and 0 <= layer < _SEED_LAYERS
            and path in (0, 1)):
        raise ValueError(f"need 0 <= trial < {_SEED_TRIALS}, 0 <= batch < {_SEED_BATCHES}, "
                         f"0 <= layer < {_SEED_LAYERS}, path 0 or 1; got {(trial, batch, layer, path)}")
    offset = int(np.random.SeedSequence(int(seed)).generate_state(1, np.uint32)[0])
    slot = ((int(trial) * _SEED_BATCHES + int(batch)) * _SEED_LAYERS + int(layer)) * 2 + int(path)
    return (offset + slot) % 2 ** 32


def _check_step(step) -> Step:
    if isinstance(step, (ScalarBlockQuantizer, Dithered, Permuted)):
        raise ValueError(f"a step is a float or a function x -> steps, got the quantizer {step!r} "
                         "(pass its .step, e.g. ScalarBlockQuantizer(4).step)")
    if not (callable(step) or isinstance(step, (int, float))):
        raise ValueError(f"a step is a float or a function x -> steps, got {type(step).__name__}")
    return step


def _per_layer_steps(step: Steps, n_layers: int) -> list[Step]:
    if callable(step) or isinstance(step, (int, float)):
        return [_check_step(step)] * n_layers
    steps = [_check_step(s) for s in step]
    if len(steps) != n_layers:
        raise ValueError(f"need one step per layer ({n_layers}), got {len(steps)}")
    return steps


def _slot_mask(slots, n_layers: int) -> np.ndarray:
    """Boolean (layers, 2) mask of the dithered (layer, path) slots; (layers,) means both paths."""
    if slots is None:
        return np.ones((n_layers, 2), dtype=bool)
    mask = np.asarray(slots, dtype=bool)
    if mask.shape == (n_layers,):
        mask = np.repeat(mask[:, None], 2, axis=1)
    if mask.shape != (n_layers, 2):
        raise ValueError(f"slots must have shape ({n_layers}, 2) or ({n_layers},), got {mask.shape}")
    return mask


def _identity(x: Tensor) -> Tensor:
    return x


def dithered_quantizers(n_layers: int, key_step: Steps, value_step: Steps | None = None, *, trial: int = 0,
                        seed: int = 0, batch: int = 0, slots=None) -> tuple[list[Quantizer], list[Quantizer]]:
    """Key and value quantizers of one trial: ``Dithered(step, trial_seed(seed, trial, layer, path, batch))``.

    Parameters
    ----------
    key_step, value_step : Δ for the keys (values; default the keys'): a float, a function
        x ↦ steps (e.g. ``ScalarBlockQuantizer(4).step``) or one of those per layer.
    slots : boolean (layers, 2) or (layers,) mask of the dithered slots; the others pass their
        input unchanged (default: all dithered).

    Returns
    -------
    (key quantizers, value quantizers), one per layer, for
    :class:`~lqlib.quantized_cache.QuantizeDequantizeCache` or :func:`loss_change`.
    """
    mask = _slot_mask(slots, n_layers)
    steps = (_per_layer_steps(key_step, n_layers),
             _per_layer_steps(key_step if value_step is None else value_step, n_layers))
    return tuple([Dithered(steps[p][l], trial_seed(seed, trial, l, p, batch)) if mask[l, p] else _identity
                  for l in range(n_layers)] for p in (0, 1))


def ordering_steps(bits: float, kind: str, n_layers: int, d: int, *, keys: Tensor | None = None,
                   values: Tensor | None = None, seed: int = 0, block: int = 8) -> tuple[list[Step], list[Step]]:
    """Per-layer key and value steps of :class:`ScalarBlockQuantizer` ``(bits, block)`` under a dim ordering.

    The ordering decides which dims share a block, hence a step (the permutation puzzle's modes).

    Parameters
    ----------
    kind : ``"identity"`` (the baseline order), ``"sorted"`` (per layer and path by decreasing
        second moment of the calibration sample, see :func:`block_permutation`) or ``"random"``
        (a seeded uniform ordering per layer and path).
    keys, values : calibration vectors of shape (layers, ..., d), needed for ``"sorted"`` (e.g.
        captured keys and values of windows other than the evaluated ones).
    seed : seed of the ``"random"`` orderings (layer l, path p uses ``trial_seed(seed, 0, l, p)``).

    Returns
    -------
    (key steps, value steps): one function x ↦ steps (x's shape, x's dim order) per layer, for
    :func:`dithered_trials`.
    """
    if kind == "sorted":
        if keys is None or values is None or keys.shape[0] != n_layers or values.shape[0] != n_layers:
            raise ValueError(f"'sorted' needs calibration keys and values of shape ({n_layers}, ..., {d})")
    elif kind not in ("identity", "random"):
        raise ValueError(f"kind must be 'identity', 'sorted' or 'random', got {kind!r}")

    def step(layer: int, path: int) -> Step:
        sample = None if kind != "sorted" else (keys, values)[path][layer]
        perm = block_permutation(kind, d, sample=sample, seed=trial_seed(seed, 0, layer, path))
        return ScalarBlockQuantizer(bits, block=block, permutation=None if kind == "identity" else perm).step

    return [step(l, 0) for l in range(n_layers)], [step(l, 1) for l in range(n_layers)]


def layer_groups(n_layers: int, n_groups: int) -> list[np.ndarray]:
    """``n_groups`` contiguous groups of layers (both paths) as (layers, 2) slot masks that partition all slots."""
    if not 1 <= n_groups <= n_layers:
        raise ValueError(f"need 1 <= n_groups <= n_layers ({n_layers}), got {n_groups}")
    masks = []
    for chunk in np.array_split(np.arange(n_layers), n_groups):
        mask = np.zeros((n_layers, 2), dtype=bool)
        mask[chunk] = True
        masks.append(mask)
    return masks


@dataclass(frozen=True)
class DitheredTrials:
    """N in-loop quantized passes over the same windows, each with fresh independent dither.

    Attributes
    ----------
    delta_loss : float64 (S,): real ΔL of each trial, summed NLL (nats, all windows) of the
        quantized pass minus the clean one (computed as :func:`loss_change` does).
    parts : float64 (S, layers, 2, windows, tokens): the fixed-gradient first-order terms gᵀe of
        each (layer, path, window, position), summed over KV heads and dims; g from one shared
        clean differentiated pass, e the error the quantized pass injected. X = parts summed.
    analytic_parts : float64 (layers, 2, windows, tokens): Crypto-lemma variance of each part,
        Σ g²Δ²/12 over heads and dims, with the steps Δ the quantizers really used, averaged over
        the trials (the exact Var(X) is their sum: X is a martingale-difference sum).
    analytic_clean_parts : the same with the steps of the clean cache (a prediction available
        before any quantized pass).
    slots : bool (layers, 2): the dithered slots (others exact, their parts zero).
    nll : summed NLL of the clean windows (nats); scored_tokens : targets scored.
    seed : the dither seed of the run (:func:`trial_seed`).
    """

    delta_loss: np.ndarray
    parts: np.ndarray
    analytic_parts: np.ndarray
    analytic_clean_parts: np.ndarray
    slots: np.ndarray
    nll: float
    scored_tokens: int
    seed: int

    @property
    def n_trials(self) -> int:
        return int(self.delta_loss.shape[0])

    @property
    def first_order(self) -> np.ndarray:
        """X = Σ_parts gᵀe per trial, float64 (S,)."""
        return self.parts.sum(axis=(1, 2, 3, 4))

    @property
    def analytic(self) -> float:
        """Σ ‖g‖²Δ²/12 over all parts (realised steps): the Crypto-lemma Var(X)."""
        return float(self.analytic_parts.sum())

    @property
    def analytic_clean(self) -> float:
        return float(self.analytic_clean_parts.sum())


def _recording_steps(quantizer: Dithered, store: dict, key: tuple[int, int]) -> Quantizer:
    """``quantizer`` that also records (error injected, steps used) under ``key``."""
    def write(x: Tensor) -> Tensor:
        out = quantizer(x)
        store[key] = ((out - x).detach(), quantizer.steps(x))
        return out
    return write


def _crypto_variance(g: Tensor, step: Tensor) -> Tensor:
    """Σ over heads and dims of g²Δ²/12 for g (B, H, T, d) and steps broadcastable to it: (B, T) float64."""
    g = g.to(torch.float64)
    return (g.square() * torch.broadcast_to(step.to(torch.float64), g.shape).square()).sum(dim=(1, 3)) / 12.0


def dithered_trials(loaded: LoadedModel, input_ids: Tensor, key_step: Steps, value_step: Steps | None = None,
                    n_trials: int = 100, *, seed: int = 0, slots=None, gradients: KVGradients | None = None,
                    batch_size: int = 1, progress: bool = True, labels: Tensor | None = None) -> DitheredTrials:
    """Theorem B on real passes: ``n_trials`` in-loop quantized passes with independent subtractive dither.

    Trial s quantizes every dithered (layer, path) slot with its own
    ``Dithered(step, trial_seed(seed, s, layer, path, batch))`` (see :func:`dithered_quantizers`)
    and records (a) the real ΔL of the pass, (b) the fixed-gradient first-order terms gᵀe of
    every (layer, path, window, position), g from one clean differentiated pass shared by all
    trials and e the error the pass injected (post-RoPE keys), and (c) the Crypto-lemma
    variances Σ g²Δ²/12 of those parts. Trial 0 with one batch of windows is exactly
    ``loss_change(loaded, input_ids, *dithered_quantizers(..., trial=0, seed=seed))``.

    Parameters
    ----------
    input_ids : (windows, T) token ids.
    key_step, value_step : as for :func:`dithered_quantizers`.
    n_trials : number of dithered passes S ≥ 2.
    slots : boolean (layers, 2) mask of the dithered slots (default all); group-only runs for
        :func:`real_pass_additivity` dither one group and leave the rest exact (with the
        all-slot run's ``seed`` they draw the same dither per slot and trial: paired runs).
    gradients : :func:`kv_gradients` of the same windows (post-RoPE, downstream, same labels),
        to share one differentiated pass between several runs; computed here when None.
    batch_size : windows per forward pass (each batch gets its own dither seeds).

    Returns
    -------
    :class:`DitheredTrials`. Cost: one clean pass per batch and ``n_trials`` quantized passes per
    batch (plus the differentiated pass when ``gradients`` is None).
    """
    if n_trials < 2:
        raise ValueError(f"need at least 2 trials, got {n_trials}")
    n = len(_layers(loaded.model))
    mask = _slot_mask(slots, n)
    windows, tokens = input_ids.shape
    if gradients is None:
        gradients = kv_gradients(loaded, input_ids, progress=False, labels=labels, batch_size=batch_size)
    if gradients.pre_rope:
        raise ValueError("dithered_trials needs post-RoPE gradients (the cache's keys)")
    if tuple(gradients.grad_keys.shape[1:4:2]) != (windows, tokens):
        raise ValueError(f"gradients are for {tuple(gradients.grad_keys.shape[1:4:2])} (windows, tokens), "
                         f"input_ids has {(windows, tokens)}")
    steps = (_per_layer_steps(key_step, n), _per_layer_steps(key_step if value_step is None else value_step, n))
    parts = np.zeros((n_trials, n, 2, windows, tokens))
    analytic = np.zeros((n, 2, windows, tokens))
    analytic_clean = np.zeros((n, 2, windows, tokens))
    delta = np.zeros(n_trials)
    nll, scored = 0.0, 0
    device = loaded.model.device
    bar = tqdm(total=n_trials * math.ceil(windows / batch_size), desc="dithered trials", disable=not progress,
               leave=False)
    with torch.no_grad():
        for batch, start in enumerate(range(0, windows, batch_size)):
            stop = min(start + batch_size, windows)
            ids = input_ids[start:stop].to(device)
            targets = _targets(ids, None if labels is None else labels[start:stop])
            grads = [[gradients.grad_keys[l, start:stop].to(device) for l in range(n)],
                     [gradients.grad_values[l, start:stop].to(device) for l in range(n)]]
            clean_x = (gradients.keys, gradients.values)
            for l, p in zip(*np.nonzero(mask)):
                x = clean_x[p][l, start:stop].to(device)
                analytic_clean[l, p, start:stop] = _crypto_variance(
                    grads[p][l], Dithered(steps[p][l]).steps(x)).cpu().numpy()
            clean = _window_nll(loaded.model(ids, use_cache=False).logits, targets)
            nll += float(clean.double().sum())
            scored += int((targets != -100).sum())
            for trial in range(n_trials):
                kq, vq = dithered_quantizers(n, steps[0], steps[1], trial=trial, seed=seed, batch=batch, slots=mask)
                store: dict[tuple[int, int], tuple[Tensor, Tensor]] = {}
                kq = [_recording_steps(q, store, (l, 0)) if mask[l, 0] else q for l, q in enumerate(kq)]
                vq = [_recording_steps(q, store, (l, 1)) if mask[l, 1] else q for l, q in enumerate(vq)]
                cache = QuantizeDequantizeCache(kq, loaded.config, vq)
                quantized = _window_nll(loaded.model(ids, cache=cache, use_cache=True).logits, targets)
                delta[trial] += float(quantized.double().sum() - clean.double().sum())
                for (l, p), (e, step) in store.items():
                    g = grads[p][l].to(torch.float64)
                    parts[trial, l, p, start:stop] = (g * e.to(torch.float64)).sum(dim=(1, 3)).cpu().numpy()
                    analytic[l, p, start:stop] += _crypto_variance(g, step).cpu().numpy() / n_trials
                bar.update()
    bar.close()
    return DitheredTrials(delta, parts, analytic, analytic_clean, mask, nll, scored, int(seed))


# --------------------------------------------------------------------- sampling error
def _bootstrap_counts(n: int, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """Multiplicities (n_boot, n) of resampling n trials with replacement."""
    return rng.multinomial(n, np.full(n, 1.0 / n), size=n_boot).astype(np.float64)


def _weighted_variance(counts: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Sample variances (ddof 1) of x (S, P) under resampling multiplicities (B, S): (B, P)."""
    s = x.shape[0]
    first, second = counts @ x, counts @ np.square(x)
    return np.maximum(second - first ** 2 / s, 0.0) / (s - 1)      # ≥ 0 despite rounding


def _ratio(numerator: np.ndarray, denominator: np.ndarray | float) -> np.ndarray:
    """numerator / denominator, NaN where a resample has no spread at all (possible for a handful of trials)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(np.asarray(denominator) > 0, numerator / denominator, np.nan)


def _interval(samples: np.ndarray, level: float) -> tuple[float, float]:
    """Percentile interval of the bootstrap samples, ignoring NaN resamples (NaN if all are)."""
    tail = 50.0 * (1.0 - level)
    samples = samples[np.isfinite(samples)]
    if samples.size == 0:
        return float("nan"), float("nan")
    low, high = np.percentile(samples, [tail, 100.0 - tail])
    return float(low), float(high)


def _check_bootstrap(n_boot: int, level: float) -> None:
    if n_boot < 1:
        raise ValueError(f"n_boot must be positive, got {n_boot}")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must lie in (0, 1), got {level}")


def _mean_stats(x: np.ndarray, prefix: str) -> dict:
    mean, se = float(x.mean()), float(x.std(ddof=1) / math.sqrt(x.shape[0]))
    return {f"{prefix}mean": mean, f"{prefix}se": se, f"{prefix}z": mean / se if se > 0 else float("nan")}


def fixed_gradient_additivity(trials: DitheredTrials, position_blocks: int = 8, n_boot: int = 2000,
                              level: float = 0.95, seed: int = 0) -> dict:
    """pos_add and pred of the fixed-gradient first-order sum X = Σ gᵀe over the trials.

    Parts are (dithered layer, path, window, block of positions): the positions of a window are
    cut into ``position_blocks`` contiguous blocks. The point estimates come from
    :func:`variance_additivity` applied to those parts (each part a scalar gᵀe whose
    Crypto-lemma variance is the sum of its elements' g²Δ²/12); the intervals are percentile
    bootstrap intervals over trials (the analytic variance is held fixed).

    Returns
    -------
    dict: ``n_trials``, ``n_parts``, ``var_total``, ``sum_var_parts``, ``analytic``,
    ``analytic_clean``, ``pos_add`` (+ ``_low``, ``_high``), ``pred`` (+ ``_low``, ``_high``),
    and ``mean``, ``se``, ``z`` of X (E X = 0 under the theorem).
    """
    _check_bootstrap(n_boot, level)
    tokens = trials.parts.shape[-1]
    if not 1 <= position_blocks <= tokens:
        raise ValueError(f"need 1 <= position_blocks <= tokens ({tokens}), got {position_blocks}")
    cuts = np.array_split(np.arange(tokens), position_blocks)
    blocks = np.stack([trials.parts[..., c].sum(axis=-1) for c in cuts], axis=-1)   # (S, L, 2, W, blocks)
    variances = np.stack([trials.analytic_parts[..., c].sum(axis=-1) for c in cuts], axis=-1)
    contributions = blocks[:, trials.slots].reshape(trials.n_trials, -1)             # (S, parts)
    analytic_parts = variances[trials.slots].reshape(-1)
    point = variance_additivity(np.ones((analytic_parts.size, 1)), contributions[..., None],
                                np.sqrt(12.0 * analytic_parts)[:, None])
    counts = _bootstrap_counts(trials.n_trials, n_boot, np.random.default_rng(seed))
    var_total = _weighted_variance(counts, contributions.sum(axis=1, keepdims=True))[:, 0]
    sum_var = _weighted_variance(counts, contributions).sum(axis=1)
    pos_low, pos_high = _interval(_ratio(var_total, sum_var), level)
    pred_low, pred_high = _interval(_ratio(var_total, point["analytic"]), level)
    return {"n_trials": trials.n_trials, "n_parts": int(analytic_parts.size), "var_total": point["var_total"],
            "sum_var_parts": point["sum_var_parts"], "analytic": point["analytic"],
            "analytic_clean": trials.analytic_clean, "pos_add": point["pos_add"], "pos_add_low": pos_low,
            "pos_add_high": pos_high, "pred": point["pred"], "pred_low": pred_low, "pred_high": pred_high,
            **_mean_stats(contributions.sum(axis=1), "")}


def real_pass_additivity(trials: DitheredTrials, groups: Sequence[DitheredTrials] = (), n_boot: int = 2000,
                         level: float = 0.95, seed: int = 0) -> dict:
    """pos_add and pred of the real ΔL of dithered quantized passes.

    ``pred`` = Var(ΔL)/analytic, the analytic Crypto-lemma variance Σ ‖g‖²Δ²/12 of ``trials``.
    ``pos_add`` = Var(ΔL, all slots dithered) / Σ_groups Var(ΔL, only that group dithered): the
    group-only runs must dither disjoint slot sets whose union is the slots of ``trials`` (e.g.
    :func:`layer_groups`); NaN without groups.

    **Paired runs.** Group runs made with the same ``seed`` (and windows and batch size) as
    ``trials`` draw, in trial s, the same dither u in every slot as trial s of the all-slot run
    (:func:`trial_seed` does not depend on the mask). Then pos_add is computed over the first
    n = min(group trials) trials of every run, resampled together: numerator and denominator
    share their randomness and the ratio is far more precise than from independent runs. The
    expectation is unchanged: each variance is still that of its own run. Otherwise every run is
    resampled on its own. Intervals: percentile bootstrap over trials (analytic held fixed).

    Also the mean of ΔL (not zero: the second-order term ½eᵀHe has a mean of its own), the
    remainder R = ΔL − X with X the fixed-gradient first-order sum (its mean is the second-order
    bias, measured far more precisely than E ΔL because X, of mean zero, carries most of ΔL's
    spread), and ``var_ratio`` = Var(ΔL)/Var(X) over the same trials: how far the real passes'
    variance departs from the first-order one, with a paired interval.

    Returns
    -------
    dict: ``n_trials``, ``group_trials`` (list), ``paired``, ``pos_add_trials`` (trials behind
    pos_add, per run), ``var_total``, ``sum_var_groups``, ``analytic``, ``analytic_clean``,
    ``pos_add`` (+ ``_low``, ``_high``), ``pred`` (+ ``_low``, ``_high``), ``var_ratio`` (+
    ``_low``, ``_high``); ``mean``, ``se``, ``z`` of ΔL; ``remainder_mean``, ``remainder_se``,
    ``remainder_z``; ``remainder_var_share`` = Var(R)/Var(ΔL); ``corr`` = corr(ΔL, X).
    """
    _check_bootstrap(n_boot, level)
    if groups:
        union = np.zeros_like(trials.slots)
        for group in groups:
            if group.delta_loss.ndim != 1 or group.parts.shape[1:] != trials.parts.shape[1:]:
                raise ValueError("group runs must cover the same windows as the all-slot run")
            if np.any(union & group.slots):
                raise ValueError("group runs must dither disjoint sets of slots")
            union |= group.slots
        if not np.array_equal(union, trials.slots):
            raise ValueError("the groups' slots must add up to the slots of the all-slot run")
    rng = np.random.default_rng(seed)
    delta, first = trials.delta_loss, trials.first_order
    var_total = float(delta.var(ddof=1))
    counts = _bootstrap_counts(delta.size, n_boot, rng)
    boot_total = _weighted_variance(counts, delta[:, None])[:, 0]
    boot_first = _weighted_variance(counts, first[:, None])[:, 0]
    paired = bool(groups) and all(g.seed == trials.seed for g in groups)
    pos_add = pos_low = pos_high = sum_var = float("nan")
    pos_trials: list[int] = []
    if paired:
        n = min(min(g.n_trials for g in groups), trials.n_trials)
        runs = np.stack([trials.delta_loss[:n]] + [g.delta_loss[:n] for g in groups], axis=1)   # (n, 1 + G)
        variances = runs.var(axis=0, ddof=1)
        sum_var = float(variances[1:].sum())
        pos_add = float(variances[0] / sum_var)
        boot = _weighted_variance(_bootstrap_counts(n, n_boot, rng), runs)
        pos_low, pos_high = _interval(_ratio(boot[:, 0], boot[:, 1:].sum(axis=1)), level)
        pos_trials = [n] * (1 + len(groups))
    elif groups:
        sum_var = float(sum(g.delta_loss.var(ddof=1) for g in groups))
        boot_sum = sum(_weighted_variance(_bootstrap_counts(g.n_trials, n_boot, rng), g.delta_loss[:, None])[:, 0]
                       for g in groups)
        pos_add = var_total / sum_var
        pos_low, pos_high = _interval(_ratio(boot_total, boot_sum), level)
        pos_trials = [trials.n_trials] + [g.n_trials for g in groups]
    pred_low, pred_high = _interval(_ratio(boot_total, trials.analytic), level)
    ratio_low, ratio_high = _interval(_ratio(boot_total, boot_first), level)
    remainder = delta - first
    return {"n_trials": trials.n_trials, "group_trials": [g.n_trials for g in groups], "paired": paired,
            "pos_add_trials": pos_trials, "var_total": var_total, "sum_var_groups": sum_var,
            "analytic": trials.analytic, "analytic_clean": trials.analytic_clean,
            "pos_add": pos_add, "pos_add_low": pos_low, "pos_add_high": pos_high,
            "pred": var_total / trials.analytic, "pred_low": pred_low, "pred_high": pred_high,
            "var_ratio": var_total / float(first.var(ddof=1)), "var_ratio_low": ratio_low,
            "var_ratio_high": ratio_high, **_mean_stats(delta, ""), **_mean_stats(remainder, "remainder_"),
            "remainder_var_share": float(remainder.var(ddof=1) / var_total),
            "corr": float(np.corrcoef(delta, first)[0, 1])}
