"""Paper IV's sensitivities: how much a KV error at each (layer, K or V, KV head) moves the output.

The codec's error on a vector x has, per dimension, variance ``c·ms(x)·4^(−b)`` (ms the mean
square; E8 with entropy coding: c = 2πe·G(E8) ≈ 1.2243), independent across tokens and
isotropic (RHT). To first order, the attention output of query i (softmax scaling s,
weights a_ik, μ_i = Σ_k a_ik v_k) then moves by, in expectation,

* V path: ``Σ_k a_ik² · d · ms(v_k)``                  × c·4^(−b)
* K path: ``Σ_k a_ik² · ‖v_k − μ_i‖² · s²‖q_i‖² · ms(k_k)`` × c·4^(−b)

summed over the query heads that share the KV head (GQA) and averaged over query positions:
these are ``weight_k`` and ``weight_v``. Paper IV factors them as ``d·η·σ²`` with σ² the mean
square of the vectors, η_V = mean_i ‖a_i‖² and η_K = (1/d²)·mean_i ‖q_i‖² Σ_k a_ik² ‖v_k − μ_i‖²;
both factors are reported, the weights keep the per-token products. ``Γ_l = E‖Δh‖² / E‖ε‖²``
carries an error ε at layer l's attention output (the input of ``o_proj``) to the final hidden
state h; it is measured by injecting small Gaussian noise there. A slot's predicted output
distortion at rate b is ``Γ_l · weight · c · 4^(−b)``.

Queries and keys are taken before RoPE: a rotation changes neither ‖q‖ nor ms(k).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from ..cache.quantized import QuantizeDequantizeCache
from ..coding.codec import E8Codec
from ..core.theory import entropy_coded_gap
from ..evaluation.models import LoadedModel

__all__ = [
    "Sensitivity",
    "attention_sensitivity",
    "propagation_factors",
    "measure_sensitivity",
    "slot_distortion",
    "E8_DISTORTION_CONSTANT",
]

E8_DISTORTION_CONSTANT = entropy_coded_gap("E8")  # c: MSE per dim = c · ms · 4^(−b) at high rate
_PER_HEAD = ("eta_k", "eta_v", "sigma2_k", "sigma2_v", "weight_k", "weight_v")


@dataclass(frozen=True, eq=False)
class Sensitivity:
    """Per-(layer, KV head) sensitivities, each an array of shape (layers, kv_heads); ``gamma`` (layers,)."""

    eta_k: np.ndarray
    eta_v: np.ndarray
    sigma2_k: np.ndarray
    sigma2_v: np.ndarray
    weight_k: np.ndarray
    weight_v: np.ndarray
    gamma: np.ndarray

    def slot_weights(self, per_head: bool = False) -> np.ndarray:
        """Γ_l·weight: shape (layers, 2) for the (K, V) slots of each layer, or (layers, 2, kv_heads)."""
        w = np.stack([self.weight_k, self.weight_v], axis=1) * self.gamma[:, None, None]
        return w if per_head else w.sum(axis=-1)

    def to_rows(self) -> list[dict]:
        """One tidy row per (layer, KV head): every field (Γ repeated per head)."""
        layers, heads = self.eta_k.shape
        return [
            {
                "layer": l,
                "kv_head": h,
                "gamma": float(self.gamma[l]),
                **{name: float(getattr(self, name)[l, h]) for name in _PER_HEAD},
            }
            for l in range(layers)
            for h in range(heads)
        ]

    @classmethod
    def from_rows(cls, rows: list[dict]) -> Sensitivity:
        """Inverse of :meth:`to_rows` (values may be strings, as read from CSV)."""
        layers = 1 + max(int(r["layer"]) for r in rows)
        heads = 1 + max(int(r["kv_head"]) for r in rows)
        fields = {name: np.zeros((layers, heads)) for name in _PER_HEAD}
        gamma = np.zeros(layers)
        for r in rows:
            l, h = int(r["layer"]), int(r["kv_head"])
            gamma[l] = float(r["gamma"])
            for name in _PER_HEAD:
                fields[name][l, h] = float(r[name])
        return cls(gamma=gamma, **fields)

    def predicted_distortion(self, bits: np.ndarray | float, per_head: bool = False) -> np.ndarray:
        """Γ_l·weight·c·4^(−b) for rates ``bits`` broadcastable to :meth:`slot_weights`."""
        return self.slot_weights(per_head) * E8_DISTORTION_CONSTANT * 4.0 ** (-np.asarray(bits, dtype=np.float64))


def _layers(model) -> list:
    inner = getattr(model, "model", model)
    return list(inner.layers)


@contextlib.contextmanager
def _eager_attention(model):
    """Temporarily switch to eager attention, whose modules return their attention weights."""
    previous = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        yield
    finally:
        model.set_attn_implementation(previous)


def _spread(weights: Tensor, v: Tensor, mu: Tensor) -> Tensor:
    """Σ_k W_ik ‖v_k − μ_i‖² for W (..., g, T, T), v (..., T, d), μ (..., g, T, d) → (..., g, T)."""
    v = v.unsqueeze(-3)
    vn2 = v.square().sum(-1, keepdim=True)  # (..., 1, T, 1)
    return (weights @ vn2).squeeze(-1) - 2.0 * ((weights @ v) * mu).sum(-1) + mu.square().sum(-1) * weights.sum(-1)


@torch.no_grad()
def attention_sensitivity(
    loaded: LoadedModel, input_ids: Tensor, batch_size: int = 1, progress: bool = True
) -> dict[str, np.ndarray]:
    """η, σ² and the per-token weights of every (layer, K/V, KV head) over windows ``input_ids`` (n, T).

    Returns a dict of float64 arrays of shape (layers, kv_heads): ``eta_k``, ``eta_v``,
    ``sigma2_k``, ``sigma2_v``, ``weight_k``, ``weight_v`` (means over windows and query positions).
    """
    model = loaded.model
    layers = _layers(model)
    n_kv = layers[0].self_attn.config.num_key_value_heads
    names = ("eta_k", "eta_v", "sigma2_k", "sigma2_v", "weight_k", "weight_v")
    sums = {name: torch.zeros(len(layers), n_kv, dtype=torch.float64) for name in names}
    captured: dict[str, Tensor] = {}

    def keep(name):
        def hook(_module, _inputs, output):
            captured[name] = output

        return hook

    def attention_hook(index):
        def hook(module, _inputs, output):
            a = output[1]  # (B, Hq, T, T), softmax weights
            b, hq, t, _ = a.shape
            d, g = module.head_dim, module.num_key_value_groups
            work = torch.promote_types(a.dtype, torch.float32)  # at least float32
            q = captured["q"].to(work).view(b, t, hq, d).transpose(1, 2).reshape(b, hq // g, g, t, d)
            k = captured["k"].to(work).view(b, t, hq // g, d).transpose(1, 2)
            v = captured["v"].to(work).view(b, t, hq // g, d).transpose(1, 2)
            a = a.to(work).view(b, hq // g, g, t, t)
            a2 = a.square()
            ms_k, ms_v = k.square().mean(-1), v.square().mean(-1)  # (B, Hkv, T)
            mu = a @ v.unsqueeze(2)  # (B, Hkv, g, T, d)
            q2 = q.square().sum(-1) * module.scaling**2  # s²‖q‖², (B, Hkv, g, T)
            per_query = {
                "eta_v": a2.sum(-1),
                "eta_k": q2 * _spread(a2, v, mu) / d,
                "weight_v": d * (a2 * ms_v[:, :, None, None, :]).sum(-1),
                "weight_k": q2 * _spread(a2 * ms_k[:, :, None, None, :], v, mu),
            }
            for name, value in per_query.items():  # Σ over the group, mean over queries
                sums[name][index] += value.sum(2).mean(-1).double().sum(0)
            sums["sigma2_k"][index] += ms_k.mean(-1).double().sum(0)
            sums["sigma2_v"][index] += ms_v.mean(-1).double().sum(0)

        return hook

    handles = []
    try:
        for index, layer in enumerate(layers):
            attn = layer.self_attn
            handles += [
                attn.q_proj.register_forward_hook(keep("q")),
                attn.k_proj.register_forward_hook(keep("k")),
                attn.v_proj.register_forward_hook(keep("v")),
                attn.register_forward_hook(attention_hook(index)),
            ]
        with _eager_attention(model):
            for start in tqdm(
                range(0, input_ids.shape[0], batch_size), desc="attention statistics", disable=not progress, leave=False
            ):
                model(input_ids[start : start + batch_size].to(model.device), use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return {name: (total / input_ids.shape[0]).numpy() for name, total in sums.items()}


def _final_hidden(model, ids: Tensor, cache=None) -> tuple[Tensor, Tensor]:
    """(final hidden states after the last norm, logits) of one forward pass."""
    out = model(ids, cache=cache, use_cache=cache is not None, output_hidden_states=True)
    return out.hidden_states[-1].float(), out.logits.float()


@torch.no_grad()
def propagation_factors(
    loaded: LoadedModel, input_ids: Tensor, relative_noise: float = 1e-2, seed: int = 0, progress: bool = True
) -> np.ndarray:
    """Γ_l for every layer: E‖Δh_final‖² / E‖ε‖² for Gaussian noise ε of RMS ``relative_noise`` × the
    RMS of layer l's ``o_proj`` input, added there at every position. Shape (layers,)."""
    model = loaded.model
    layers = _layers(model)
    ids = input_ids.to(model.device)
    clean, _ = _final_hidden(model, ids)
    rms: dict[int, float] = {}

    def measure(index):
        def hook(_module, inputs):
            rms[index] = float(inputs[0].float().square().mean().sqrt())

        return hook

    handles = [layer.self_attn.o_proj.register_forward_pre_hook(measure(i)) for i, layer in enumerate(layers)]
    try:
        _final_hidden(model, ids)
    finally:
        for handle in handles:
            handle.remove()
    gamma = np.zeros(len(layers))
    for index, layer in enumerate(tqdm(layers, desc="propagation Γ_l", disable=not progress, leave=False)):
        generator = torch.Generator(device=ids.device).manual_seed(seed + index)
        noise_power = []

        def inject(_module, inputs, index=index, generator=generator, noise_power=noise_power):
            x = inputs[0]
            eps = torch.randn(x.shape, generator=generator, device=x.device, dtype=torch.float32)
            eps = eps * (relative_noise * rms[index])
            noise_power.append(float(eps.double().square().sum()))
            return (x + eps.to(x.dtype),) + tuple(inputs[1:])

        handle = layer.self_attn.o_proj.register_forward_pre_hook(inject)
        try:
            noisy, _ = _final_hidden(model, ids)
        finally:
            handle.remove()
        gamma[index] = float((noisy - clean).double().square().sum()) / sum(noise_power)
    return gamma


def measure_sensitivity(loaded: LoadedModel, input_ids: Tensor, progress: bool = True) -> Sensitivity:
    """:func:`attention_sensitivity` and :func:`propagation_factors` on the same windows."""
    stats = attention_sensitivity(loaded, input_ids, progress=progress)
    gamma = propagation_factors(loaded, input_ids, progress=progress)
    return Sensitivity(gamma=gamma, **stats)


@torch.no_grad()
def slot_distortion(loaded: LoadedModel, input_ids: Tensor, bits: float, progress: bool = True) -> dict:
    """Quantize one (layer, K/V) slot at a time with the E8 codec at ``bits``; measure what it does.

    Returns a dict of arrays of shape (layers, 2): ``hidden`` (E‖Δh_final‖² per position, the
    quantity :meth:`Sensitivity.predicted_distortion` predicts) and ``delta_nll`` (mean NLL
    increase per scored token, nats).
    """
    model, config = loaded.model, loaded.config
    n_layers = len(_layers(model))
    ids = input_ids.to(model.device)
    clean, clean_logits = _final_hidden(model, ids)
    targets = ids[:, 1:]

    def nll(logits: Tensor) -> float:
        return float(F.cross_entropy(logits[:, :-1].transpose(1, 2), targets, reduction="mean"))

    base = nll(clean_logits)
    codec = E8Codec(bits)
    hidden, delta = np.zeros((n_layers, 2)), np.zeros((n_layers, 2))
    slots = [(layer, path) for layer in range(n_layers) for path in (0, 1)]
    for layer, path in tqdm(slots, desc=f"one slot at {bits:g} bits", disable=not progress, leave=False):
        keys = [codec.quantize if (i == layer and path == 0) else (lambda t: t) for i in range(n_layers)]
        values = [codec.quantize if (i == layer and path == 1) else (lambda t: t) for i in range(n_layers)]
        h, logits = _final_hidden(model, ids, QuantizeDequantizeCache(keys, config, values))
        hidden[layer, path] = float((h - clean).double().square().sum()) / (ids.shape[0] * ids.shape[1])
        delta[layer, path] = nll(logits) - base
    return {"hidden": hidden, "delta_nll": delta}
