"""Paper III, Theorem B: additivity of Var(Σ gᵀe) over layers and positions under independent dither."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from ..cache.quantized import QuantizeDequantizeCache
from ..evaluation.models import LoadedModel
from ..evaluation.stats import percentile_interval, resample_counts
from .gradients import KVGradients, _layers, _targets, _window_nll, kv_gradients
from .quantizers import (
    Dithered,
    Permuted,
    Quantizer,
    ScalarBlockQuantizer,
    block_permutation,
)

__all__ = [
    "variance_additivity",
    "trial_seed",
    "dithered_quantizers",
    "ordering_steps",
    "layer_groups",
    "DitheredTrials",
    "dithered_trials",
    "fixed_gradient_additivity",
    "real_pass_additivity",
]


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
    contributions = (g * e).sum(dim=-1).reshape(e.shape[0], -1)  # (S, parts)
    var_total = float(contributions.sum(dim=1).var())
    sum_var = float(contributions.var(dim=0).sum())
    analytic = float("nan")
    if step is not None:
        analytic = float((g.square() * torch.broadcast_to(_float64(step), e.shape).square() / 12.0).sum() / e.shape[0])
    return {
        "var_total": var_total,
        "sum_var_parts": sum_var,
        "pos_add": var_total / sum_var,
        "analytic": analytic,
        "pred": var_total / analytic,
    }


Step = float | Callable[[Tensor], Tensor]


Steps = Step | Sequence[Step]


_SEED_LAYERS, _SEED_BATCHES, _SEED_TRIALS = 256, 64, 2**17


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
    if not (0 <= trial < _SEED_TRIALS and 0 <= batch < _SEED_BATCHES and 0 <= layer < _SEED_LAYERS and path in (0, 1)):
        raise ValueError(
            f"need 0 <= trial < {_SEED_TRIALS}, 0 <= batch < {_SEED_BATCHES}, "
            f"0 <= layer < {_SEED_LAYERS}, path 0 or 1; got {(trial, batch, layer, path)}"
        )
    offset = int(np.random.SeedSequence(int(seed)).generate_state(1, np.uint32)[0])
    slot = ((int(trial) * _SEED_BATCHES + int(batch)) * _SEED_LAYERS + int(layer)) * 2 + int(path)
    return (offset + slot) % 2**32


def _check_step(step) -> Step:
    if isinstance(step, (ScalarBlockQuantizer, Dithered, Permuted)):
        raise ValueError(
            f"a step is a float or a function x -> steps, got the quantizer {step!r} "
            "(pass its .step, e.g. ScalarBlockQuantizer(4).step)"
        )
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


def dithered_quantizers(
    n_layers: int,
    key_step: Steps,
    value_step: Steps | None = None,
    *,
    trial: int = 0,
    seed: int = 0,
    batch: int = 0,
    slots=None,
) -> tuple[list[Quantizer], list[Quantizer]]:
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
    steps = (
        _per_layer_steps(key_step, n_layers),
        _per_layer_steps(key_step if value_step is None else value_step, n_layers),
    )
    return tuple(
        [
            Dithered(steps[p][l], trial_seed(seed, trial, l, p, batch)) if mask[l, p] else _identity
            for l in range(n_layers)
        ]
        for p in (0, 1)
    )


def ordering_steps(
    bits: float,
    kind: str,
    n_layers: int,
    d: int,
    *,
    keys: Tensor | None = None,
    values: Tensor | None = None,
    seed: int = 0,
    block: int = 8,
) -> tuple[list[Step], list[Step]]:
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


def dithered_trials(
    loaded: LoadedModel,
    input_ids: Tensor,
    key_step: Steps,
    value_step: Steps | None = None,
    n_trials: int = 100,
    *,
    seed: int = 0,
    slots=None,
    gradients: KVGradients | None = None,
    batch_size: int = 1,
    progress: bool = True,
    labels: Tensor | None = None,
) -> DitheredTrials:
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
        raise ValueError(
            f"gradients are for {tuple(gradients.grad_keys.shape[1:4:2])} (windows, tokens), "
            f"input_ids has {(windows, tokens)}"
        )
    steps = (_per_layer_steps(key_step, n), _per_layer_steps(key_step if value_step is None else value_step, n))
    parts = np.zeros((n_trials, n, 2, windows, tokens))
    analytic = np.zeros((n, 2, windows, tokens))
    analytic_clean = np.zeros((n, 2, windows, tokens))
    delta = np.zeros(n_trials)
    nll, scored = 0.0, 0
    device = loaded.model.device
    bar = tqdm(
        total=n_trials * math.ceil(windows / batch_size), desc="dithered trials", disable=not progress, leave=False
    )
    with torch.no_grad():
        for batch, start in enumerate(range(0, windows, batch_size)):
            stop = min(start + batch_size, windows)
            ids = input_ids[start:stop].to(device)
            targets = _targets(ids, None if labels is None else labels[start:stop])
            grads = [
                [gradients.grad_keys[l, start:stop].to(device) for l in range(n)],
                [gradients.grad_values[l, start:stop].to(device) for l in range(n)],
            ]
            clean_x = (gradients.keys, gradients.values)
            for l, p in zip(*np.nonzero(mask)):
                x = clean_x[p][l, start:stop].to(device)
                analytic_clean[l, p, start:stop] = (
                    _crypto_variance(grads[p][l], Dithered(steps[p][l]).steps(x)).cpu().numpy()
                )
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
def _weighted_variance(counts: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Sample variances (ddof 1) of x (S, P) under resampling multiplicities (B, S): (B, P)."""
    s = x.shape[0]
    first, second = counts @ x, counts @ np.square(x)
    return np.maximum(second - first**2 / s, 0.0) / (s - 1)  # ≥ 0 despite rounding


def _ratio(numerator: np.ndarray, denominator: np.ndarray | float) -> np.ndarray:
    """numerator / denominator, NaN where a resample has no spread at all (possible for a handful of trials)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(np.asarray(denominator) > 0, numerator / denominator, np.nan)


def _check_bootstrap(n_boot: int, level: float) -> None:
    if n_boot < 1:
        raise ValueError(f"n_boot must be positive, got {n_boot}")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must lie in (0, 1), got {level}")


def _mean_stats(x: np.ndarray, prefix: str) -> dict:
    mean, se = float(x.mean()), float(x.std(ddof=1) / math.sqrt(x.shape[0]))
    return {f"{prefix}mean": mean, f"{prefix}se": se, f"{prefix}z": mean / se if se > 0 else float("nan")}


def fixed_gradient_additivity(
    trials: DitheredTrials, position_blocks: int = 8, n_boot: int = 2000, level: float = 0.95, seed: int = 0
) -> dict:
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
    blocks = np.stack([trials.parts[..., c].sum(axis=-1) for c in cuts], axis=-1)  # (S, L, 2, W, blocks)
    variances = np.stack([trials.analytic_parts[..., c].sum(axis=-1) for c in cuts], axis=-1)
    contributions = blocks[:, trials.slots].reshape(trials.n_trials, -1)  # (S, parts)
    analytic_parts = variances[trials.slots].reshape(-1)
    point = variance_additivity(
        np.ones((analytic_parts.size, 1)), contributions[..., None], np.sqrt(12.0 * analytic_parts)[:, None]
    )
    counts = resample_counts(trials.n_trials, n_boot, np.random.default_rng(seed))
    var_total = _weighted_variance(counts, contributions.sum(axis=1, keepdims=True))[:, 0]
    sum_var = _weighted_variance(counts, contributions).sum(axis=1)
    pos_low, pos_high = percentile_interval(_ratio(var_total, sum_var), level)
    pred_low, pred_high = percentile_interval(_ratio(var_total, point["analytic"]), level)
    return {
        "n_trials": trials.n_trials,
        "n_parts": int(analytic_parts.size),
        "var_total": point["var_total"],
        "sum_var_parts": point["sum_var_parts"],
        "analytic": point["analytic"],
        "analytic_clean": trials.analytic_clean,
        "pos_add": point["pos_add"],
        "pos_add_low": pos_low,
        "pos_add_high": pos_high,
        "pred": point["pred"],
        "pred_low": pred_low,
        "pred_high": pred_high,
        **_mean_stats(contributions.sum(axis=1), ""),
    }


def real_pass_additivity(
    trials: DitheredTrials,
    groups: Sequence[DitheredTrials] = (),
    n_boot: int = 2000,
    level: float = 0.95,
    seed: int = 0,
) -> dict:
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
    counts = resample_counts(delta.size, n_boot, rng)
    boot_total = _weighted_variance(counts, delta[:, None])[:, 0]
    boot_first = _weighted_variance(counts, first[:, None])[:, 0]
    paired = bool(groups) and all(g.seed == trials.seed for g in groups)
    pos_add = pos_low = pos_high = sum_var = float("nan")
    pos_trials: list[int] = []
    if paired:
        n = min(min(g.n_trials for g in groups), trials.n_trials)
        runs = np.stack([trials.delta_loss[:n]] + [g.delta_loss[:n] for g in groups], axis=1)  # (n, 1 + G)
        variances = runs.var(axis=0, ddof=1)
        sum_var = float(variances[1:].sum())
        pos_add = float(variances[0] / sum_var)
        boot = _weighted_variance(resample_counts(n, n_boot, rng), runs)
        pos_low, pos_high = percentile_interval(_ratio(boot[:, 0], boot[:, 1:].sum(axis=1)), level)
        pos_trials = [n] * (1 + len(groups))
    elif groups:
        sum_var = float(sum(g.delta_loss.var(ddof=1) for g in groups))
        boot_sum = sum(
            _weighted_variance(resample_counts(g.n_trials, n_boot, rng), g.delta_loss[:, None])[:, 0] for g in groups
        )
        pos_add = var_total / sum_var
        pos_low, pos_high = percentile_interval(_ratio(boot_total, boot_sum), level)
        pos_trials = [trials.n_trials] + [g.n_trials for g in groups]
    pred_low, pred_high = percentile_interval(_ratio(boot_total, trials.analytic), level)
    ratio_low, ratio_high = percentile_interval(_ratio(boot_total, boot_first), level)
    remainder = delta - first
    return {
        "n_trials": trials.n_trials,
        "group_trials": [g.n_trials for g in groups],
        "paired": paired,
        "pos_add_trials": pos_trials,
        "var_total": var_total,
        "sum_var_groups": sum_var,
        "analytic": trials.analytic,
        "analytic_clean": trials.analytic_clean,
        "pos_add": pos_add,
        "pos_add_low": pos_low,
        "pos_add_high": pos_high,
        "pred": var_total / trials.analytic,
        "pred_low": pred_low,
        "pred_high": pred_high,
        "var_ratio": var_total / float(first.var(ddof=1)),
        "var_ratio_low": ratio_low,
        "var_ratio_high": ratio_high,
        **_mean_stats(delta, ""),
        **_mean_stats(remainder, "remainder_"),
        "remainder_var_share": float(remainder.var(ddof=1) / var_total),
        "corr": float(np.corrcoef(delta, first)[0, 1]),
    }
