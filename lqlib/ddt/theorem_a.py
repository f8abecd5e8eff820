"""Paper III, Theorem A (master identity): ΔL = Q1 + Q2 + …, and the predictor study over many configurations.

See :mod:`lqlib.ddt.gradients` for the loss and gradient conventions.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from ..cache.quantized import QuantizeDequantizeCache
from ..evaluation.capture import KVSample
from ..evaluation.models import LoadedModel
from ..evaluation.stats import Estimate, bootstrap
from .gradients import (
    _Probe,
    _probe_pass,
    _slot_quantizers,
    _stored,
    _window_nll,
    _windows,
    gradient_moments,
)
from .quantizers import (
    Permuted,
    Quantizer,
    Quantizers,
    ScalarBlockQuantizer,
    block_permutation,
)

__all__ = [
    "MasterIdentity",
    "master_identity",
    "first_order_term",
    "loss_change",
    "PredictorStudy",
    "predictor_study",
    "theorem_a_configurations",
    "theorem_a_family",
    "log_log_slope",
]


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
def _quantized_pass(
    loaded: LoadedModel, ids: Tensor, targets: Tensor, kq: list[Quantizer], vq: list[Quantizer]
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
    return sum(
        _dot(g, errors[(i, p)])
        for p, grads in enumerate((probe.grad_keys, probe.grad_values))
        for i, g in enumerate(grads)
    )


@torch.no_grad()
def _clean_errors(probe: _Probe, kq: list[Quantizer], vq: list[Quantizer]) -> dict:
    """e = q(x) − x on the clean cache of a probe pass, {(layer, path): e}."""
    return {
        (i, p): q[i](x[i]) - x[i]
        for p, (x, q) in enumerate(((probe.keys, kq), (probe.values, vq)))
        for i in range(len(kq))
    }


@dataclass(frozen=True)
class MasterIdentity:
    """Theorem A on some windows for one configuration (:func:`master_identity`); nats, summed over windows.

    Attributes
    ----------
    nll : clean summed NLL. delta_loss : ΔL = φ(1) − φ(0). delta_loss_mirror : ΔL with −e injected.
    q1 : Q1 = Σ gᵀe with the injected errors. q1_clean : Q1 with the errors of the clean cache.
    scored_tokens : targets scored.
    """

    nll: float
    delta_loss: float
    delta_loss_mirror: float
    q1: float
    q1_clean: float
    scored_tokens: int

    @property
    def odd(self) -> float:
        """(ΔL(e) − ΔL(−e))/2 = Q1 + O(e³)."""
        return 0.5 * (self.delta_loss - self.delta_loss_mirror)

    @property
    def even(self) -> float:
        """(ΔL(e) + ΔL(−e))/2 = ½ eᵀHe + O(e⁴)."""
        return 0.5 * (self.delta_loss + self.delta_loss_mirror)


def master_identity(
    loaded: LoadedModel,
    input_ids: Tensor,
    key_quantizers: Quantizers,
    value_quantizers: Quantizers | None = None,
    batch_size: int = 1,
    progress: bool = True,
    *,
    labels: Tensor | None = None,
) -> MasterIdentity:
    """Theorem A on real windows: Q1, ΔL, and ΔL of the mirrored errors, in one go.

    Per batch: a differentiated clean pass (g, clean K/V), the in-loop quantized pass (ΔL and
    the errors e it injects, post-RoPE) and a mirror pass injecting −e. With φ(s) the summed NLL
    when s·e is injected, ΔL = φ(1) − φ(0); ``odd`` = (φ(1) − φ(−1))/2 = Q1 + O(e³) and
    ``even`` = (φ(1) + φ(−1))/2 − φ(0) = Q2 + O(e⁴) = ½ eᵀHe + O(e⁴).

    Returns
    -------
    :class:`MasterIdentity`.
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
    return MasterIdentity(**out, scored_tokens=scored)


def first_order_term(
    loaded: LoadedModel,
    input_ids: Tensor,
    key_quantizers: Quantizers,
    value_quantizers: Quantizers | None = None,
    errors: str = "injected",
    batch_size: int = 1,
    progress: bool = True,
    *,
    labels: Tensor | None = None,
) -> float:
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
        e = _quantized_pass(loaded, ids, targets, kq, vq)[1] if errors == "injected" else _clean_errors(probe, kq, vq)
        total += _first_order(probe, e)
    return total


@torch.no_grad()
def loss_change(
    loaded: LoadedModel,
    input_ids: Tensor,
    key_quantizers: Quantizers,
    value_quantizers: Quantizers | None = None,
    batch_size: int = 1,
    progress: bool = True,
    *,
    labels: Tensor | None = None,
) -> float:
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
        columns = {
            "delta_loss": self.delta_loss,
            "q1": self.q1,
            "risk": self.risk,
            "mse": self.mse,
            "k_path_share": self.k_path_share,
            "bias_drift": self.bias_drift,
        }
        if self.delta_loss_mirror is not None:
            columns.update(delta_loss_mirror=self.delta_loss_mirror, odd=self.odd, even=self.even)
        return [
            {"config": c, **{name: float(values[c]) for name, values in columns.items()}}
            for c in range(len(self.delta_loss))
        ]


def predictor_study(
    loaded: LoadedModel,
    input_ids: Tensor,
    configs: Sequence[Quantizers],
    value_configs: Sequence[Quantizers | None] | None = None,
    *,
    mirror: bool | Sequence[bool] = False,
    keep_sigma: bool = False,
    batch_size: int = 1,
    progress: bool = True,
    labels: Tensor | None = None,
) -> PredictorStudy:
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
    PredictorStudy; :meth:`PredictorStudy.rows` gives one row per configuration. Stored
    (:mod:`lqlib.store`) under the model, windows, labels, configurations and options when every
    configuration can be keyed (codecs and the study quantizers can; plain functions cannot).
    """
    configs = list(configs)
    values = [None] * len(configs) if value_configs is None else list(value_configs)
    mirrors = [bool(mirror)] * len(configs) if isinstance(mirror, bool) else [bool(m) for m in mirror]
    inputs = {
        "ids": input_ids,
        "labels": labels,
        "configs": configs,
        "values": values,
        "mirror": mirrors,
        "keep_sigma": keep_sigma,
        "batch": batch_size,
    }
    return _stored(
        loaded,
        "predictor_study",
        inputs,
        lambda: _predictor_study(loaded, input_ids, configs, values, mirrors, keep_sigma, batch_size, progress, labels),
    )


def _predictor_study(
    loaded: LoadedModel,
    input_ids: Tensor,
    configs: list,
    values: list,
    mirrors: list[bool],
    keep_sigma: bool,
    batch_size: int,
    progress: bool,
    labels: Tensor | None,
) -> PredictorStudy:
    if not configs:
        raise ValueError("need at least one configuration")
    if len(values) != len(configs):
        raise ValueError(f"{len(values)} value configurations for {len(configs)} key configurations")
    if len(mirrors) != len(configs):
        raise ValueError(f"{len(mirrors)} mirror flags for {len(configs)} configurations")
    slots = [_slot_quantizers(loaded, k, v) for k, v in zip(configs, values)]  # validates every config

    moments = gradient_moments(loaded, input_ids, batch_size=batch_size, progress=progress, labels=labels)
    device = loaded.model.device
    M = torch.as_tensor(moments.M, device=device)  # (L, 2, H, d, d)
    n_layers, _, heads, d, _ = M.shape
    n_configs = len(configs)
    delta = np.zeros(n_configs)
    mirrored = np.where(mirrors, 0.0, np.nan) if any(mirrors) else None
    slot_q1 = torch.zeros(n_configs, n_layers, 2, heads, dtype=torch.float64, device=device)
    square_sum = torch.zeros_like(slot_q1)  # Σ_t e eᵀ contracted with M
    trace_sum = torch.zeros_like(slot_q1)
    error_sum = torch.zeros(n_configs, n_layers, 2, heads, d, dtype=torch.float64, device=device)
    sigma_sum = (
        torch.zeros(n_configs, n_layers, 2, heads, d, d, dtype=torch.float64, device=device) if keep_sigma else None
    )

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
                nll_m, _ = _quantized_pass(
                    loaded,
                    ids,
                    targets,
                    [_shifted(-errors[(i, 0)]) for i in range(n_layers)],
                    [_shifted(-errors[(i, 1)]) for i in range(n_layers)],
                )
                mirrored[c] += float(nll_m.double().sum()) - clean
            with torch.no_grad():
                for (i, p), e in errors.items():  # e: (B, H, T, d)
                    e = e.to(torch.float64)
                    slot_q1[c, i, p] += (grads[p][i] * e).sum(dim=(0, 2, 3))
                    outer = torch.einsum("bhti,bhtj->hij", e, e)  # Σ_t e eᵀ per head
                    square_sum[c, i, p] += (M[i, p] * outer).sum(dim=(-1, -2))  # tr(M·outer), both symmetric
                    trace_sum[c, i, p] += e.square().sum(dim=(0, 2, 3))
                    error_sum[c, i, p] += e.sum(dim=(0, 2))
                    if keep_sigma:
                        sigma_sum[c, i, p] += outer
            bar.update()
    bar.close()

    count = moments.count
    mean_error = error_sum / count
    bias = torch.einsum("clphi,lphij,clphj->clph", mean_error, M, mean_error)  # ēᵀMē
    risk = square_sum / count
    sigma = None
    if keep_sigma:
        sigma = sigma_sum / count
        sigma = (0.5 * (sigma + sigma.transpose(-1, -2))).cpu().numpy()
    return PredictorStudy(
        delta_loss=delta,
        q1=slot_q1.sum(dim=(1, 2, 3)).cpu().numpy(),
        slot_q1=slot_q1.cpu().numpy(),
        slot_risk=risk.cpu().numpy(),
        slot_risk_centred=(risk - bias).cpu().numpy(),
        slot_trace=(trace_sum / count).cpu().numpy(),
        mean_error=mean_error.cpu().numpy(),
        M=moments.M,
        count=count,
        nll=moments.nll,
        scored_tokens=moments.scored_tokens,
        delta_loss_mirror=mirrored,
        sigma=sigma,
    )


def theorem_a_configurations(
    bits: float, sample: KVSample, *, e8_seeds: int = 12, random_orders: int = 10, mixtures: int = 13
) -> list[dict]:
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
    from ..coding.codec import E8Codec

    layers, d = sample.keys.shape[0], sample.keys.shape[-1]
    if d % 32:
        raise ValueError(f"the family needs a head dim divisible by 32, got {d}")
    sorted_orders = [
        [block_permutation("sorted", d, sample.keys[l]) for l in range(layers)],
        [block_permutation("sorted", d, sample.values[l]) for l in range(layers)],
    ]

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
    out += [
        config(f"E8 {kind}" + (f" {seed}" if kind == "random" else ""), "E8, permuted", ordered(e8, kind, seed))
        for kind, seed in orders
    ]
    out += [
        config(
            f"scalar {block} {kind}" + (f" {seed}" if kind == "random" else ""),
            "scalar block",
            ordered(scalar(block), kind, seed),
        )
        for block in (8, 16, 32)
        for kind, seed in orders[:4]
    ]
    out.append(config(f"scalar {d}", "scalar block", ordered(scalar(d), "identity")))
    menu = [
        ([E8Codec(bits, seed=0)] * layers,) * 2,
        ordered(e8, "identity"),
        ordered(e8, "random", 1),
        ordered(scalar(8), "identity"),
        ordered(scalar(16), "sorted"),
        ordered(scalar(32), "random", 1),
    ]
    for seed in range(mixtures):
        pick = np.random.default_rng(seed).integers(0, len(menu), (2, layers))
        out.append(
            config(
                f"mix {seed}", "per-layer mix", tuple([menu[pick[p, l]][p][l] for l in range(layers)] for p in (0, 1))
            )
        )
    return out


def theorem_a_family(bit_widths: Sequence[float], sample: KVSample, stride: int = 1) -> list[dict]:
    """:func:`theorem_a_configurations` at every bit width (every ``stride``-th member), each entry with its
    ``bits`` and a ``mirror`` flag set for the first member of each family (the configurations that also run
    the mirror pass)."""
    if stride < 1:
        raise ValueError(f"stride must be positive, got {stride}")
    out = []
    for bits in bit_widths:
        members = theorem_a_configurations(float(bits), sample)[::stride]
        firsts = {m["family"]: i for i, m in reversed(list(enumerate(members)))}
        out += [dict(m, bits=float(bits), mirror=i in firsts.values()) for i, m in enumerate(members)]
    return out


def log_log_slope(x, y, draws: int = 2000, level: float = 0.95, seed: int = 0) -> Estimate:
    """Least-squares slope of log y on log x over the pairs with x, y > 0, with a percentile bootstrap
    interval over those pairs (:func:`lqlib.evaluation.stats.bootstrap`).

    Used for the Taylor check: a remainder ΔL − Q1 that is second order in the error grows with the MSE
    with slope 1 on log axes.
    """
    x, y = np.asarray(x, dtype=np.float64).reshape(-1), np.asarray(y, dtype=np.float64).reshape(-1)
    keep = (x > 0) & (y > 0)
    lx, ly = np.log(x[keep]), np.log(y[keep])
    if lx.size < 3:
        nan = float("nan")
        return Estimate(nan, nan, nan, level, int(lx.size))

    def slope(index: np.ndarray) -> np.ndarray:
        a, b = lx[index], ly[index]
        ac = a - a.mean(axis=-1, keepdims=True)
        with np.errstate(invalid="ignore", divide="ignore"):
            return (ac * (b - b.mean(axis=-1, keepdims=True))).sum(axis=-1) / (ac * ac).sum(axis=-1)

    return bootstrap(slope, lx.size, draws, level, seed)
