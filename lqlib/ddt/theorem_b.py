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
from ..errors import InputError
from ..evaluation.capture import KVSample
from ..evaluation.models import LoadedModel
from ..evaluation.stats import Estimate, bootstrap, percentile_interval, resample_counts
from .gradients import KVGradients, _layers, _stored, _targets, _window_nll, kv_gradients
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
    "layer_prefixes",
    "Additivity",
    "DitheredTrials",
    "dithered_trials",
    "UNITS",
    "FixedGradientAdditivity",
    "fixed_gradient_additivity",
    "RealPassAdditivity",
    "real_pass_additivity",
    "OrderingTrials",
    "theorem_b_study",
]


def _float64(a) -> Tensor:
    if isinstance(a, Tensor):
        return a.detach().to(device="cpu", dtype=torch.float64)
    return torch.as_tensor(np.ascontiguousarray(a, dtype=np.float64))


@dataclass(frozen=True)
class Additivity:
    """Var of a sum of parts against the sum of the parts' variances (:func:`variance_additivity`).

    Attributes
    ----------
    var_total : Var_S(Σ_parts gᵀe). sum_var_parts : Σ_parts Var_S(gᵀe).
    analytic : E_S Σ g²Δ²/12 (NaN without steps).
    """

    var_total: float
    sum_var_parts: float
    analytic: float

    @property
    def pos_add(self) -> float:
        """var_total / sum_var_parts: 1 when the parts' contributions are uncorrelated."""
        return self.var_total / self.sum_var_parts

    @property
    def pred(self) -> float:
        """var_total / analytic: 1 under the Crypto lemma (NaN without steps)."""
        return self.var_total / self.analytic


def variance_additivity(g_parts, e_parts, step=None) -> Additivity:
    """Does Var(Σ_parts gᵀe) split into Σ_parts Var(gᵀe)? (Theorem B, on samples.)

    Parameters
    ----------
    g_parts : gradients, broadcastable to ``e_parts`` (e.g. fixed per part: (*parts, d)).
    e_parts : errors, shape (S, *parts, d): S independent realisations (e.g. dither draws) of
        the error of every part (layers, positions, …).
    step : quantizer step Δ broadcastable to ``e_parts`` (e.g. (*parts, 1)); enables ``pred``.

    Returns
    -------
    :class:`Additivity`: ``var_total`` = Var_S(Σ_parts gᵀe), ``sum_var_parts`` = Σ_parts Var_S(gᵀe),
    their ratio ``pos_add``, ``analytic`` = E_S Σ ‖g‖²Δ²/12 (elementwise g²Δ²/12 summed) and ``pred`` =
    var_total / analytic (1 under the Crypto lemma; NaN without ``step``).
    """
    e = _float64(e_parts)
    g = torch.broadcast_to(_float64(g_parts), e.shape)
    contributions = (g * e).sum(dim=-1).reshape(e.shape[0], -1)  # (S, parts)
    var_total = float(contributions.sum(dim=1).var())
    sum_var = float(contributions.var(dim=0).sum())
    analytic = float("nan")
    if step is not None:
        analytic = float((g.square() * torch.broadcast_to(_float64(step), e.shape).square() / 12.0).sum() / e.shape[0])
    return Additivity(var_total, sum_var, analytic)


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


def layer_prefixes(n_layers: int, n_groups: int) -> list[np.ndarray]:
    """The nested slot masks of :func:`real_pass_additivity`: for ``n_groups`` contiguous groups of layers
    (:func:`layer_groups`), the (layers, 2) masks of the first 1, 2, …, n_groups − 1 groups (both paths).
    With the all-slot run they switch the groups on one after another."""
    groups = layer_groups(n_layers, n_groups)
    return [np.logical_or.reduce(groups[: k + 1]) for k in range(n_groups - 1)]


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
    """S in-loop quantized passes over the same W windows, each with fresh independent dither.

    Attributes
    ----------
    window_delta_loss : float64 (S, W): real ΔL of each trial and window, summed NLL (nats) of the
        quantized pass minus the clean one (as :func:`loss_change` computes it).
    parts : float64 (S, layers, 2, W, tokens): the fixed-gradient first-order terms gᵀe of each
        (layer, path, window, position), summed over KV heads and dims; g from one shared clean
        differentiated pass, e the error the quantized pass injected.
    analytic_parts : float64 (layers, 2, W, tokens): Crypto-lemma variance of each part, Σ g²Δ²/12
        over heads and dims, with the steps Δ the quantizers really used, averaged over the trials
        (the exact Var of the first-order sum is their sum: it is a martingale-difference sum).
    analytic_clean_parts : the same with the steps of the clean cache (a prediction available
        before any quantized pass).
    slots : bool (layers, 2): the dithered slots (others exact, their parts zero).
    window_nll : float64 (W,): summed NLL of each clean window (nats); scored_tokens : targets scored.
    seed : the dither seed of the run (:func:`trial_seed`); runs that share it are paired.
    """

    window_delta_loss: np.ndarray
    parts: np.ndarray
    analytic_parts: np.ndarray
    analytic_clean_parts: np.ndarray
    slots: np.ndarray
    window_nll: np.ndarray
    scored_tokens: int
    seed: int

    @property
    def n_trials(self) -> int:
        return int(self.window_delta_loss.shape[0])

    @property
    def n_windows(self) -> int:
        return int(self.window_delta_loss.shape[1])

    @property
    def delta_loss(self) -> np.ndarray:
        """ΔL of each trial over all windows, float64 (S,)."""
        return self.window_delta_loss.sum(axis=1)

    @property
    def window_first_order(self) -> np.ndarray:
        """X = Σ gᵀe of each trial and window, float64 (S, W)."""
        return self.parts.sum(axis=(1, 2, 4))

    @property
    def first_order(self) -> np.ndarray:
        """X = Σ_parts gᵀe per trial over all windows, float64 (S,)."""
        return self.window_first_order.sum(axis=1)

    @property
    def window_analytic(self) -> np.ndarray:
        """Σ ‖g‖²Δ²/12 of each window (realised steps), float64 (W,)."""
        return self.analytic_parts.sum(axis=(0, 1, 3))

    @property
    def analytic(self) -> float:
        """Σ ‖g‖²Δ²/12 over all parts (realised steps): the Crypto-lemma Var(X)."""
        return float(self.analytic_parts.sum())

    @property
    def analytic_clean(self) -> float:
        return float(self.analytic_clean_parts.sum())

    @property
    def nll(self) -> float:
        return float(self.window_nll.sum())


def _recording_steps(quantizer: Dithered, store: dict, key: tuple[int, int]) -> Quantizer:
    """``quantizer`` that also records (error injected, steps used) under ``key``."""

    def write(x: Tensor) -> Tensor:
        out, steps = quantizer.quantize_with_steps(x)
        store[key] = ((out - x).detach(), steps)
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
    and records, per window, (a) the real ΔL of the pass, (b) the fixed-gradient first-order terms gᵀe
    of every (layer, path, position), g from one clean differentiated pass shared by all trials and e
    the error the pass injected (post-RoPE keys), and (c) the Crypto-lemma variances Σ g²Δ²/12 of those
    parts. The clean NLL is the differentiated pass's (the same forward computation). Trial 0 with one
    batch of windows is ``loss_change(loaded, input_ids, *dithered_quantizers(..., trial=0, seed=seed))``.

    Parameters
    ----------
    input_ids : (windows, T) token ids.
    key_step, value_step : as for :func:`dithered_quantizers`.
    n_trials : number of dithered passes S ≥ 2.
    slots : boolean (layers, 2) mask of the dithered slots (default all); the nested runs of
        :func:`real_pass_additivity` dither the first groups of layers and leave the rest exact (with
        the all-slot run's ``seed`` they draw the same dither per slot and trial: paired runs).
    gradients : :func:`kv_gradients` of the same windows (post-RoPE, downstream, same labels),
        to share one differentiated pass between several runs; computed here when None.
    batch_size : windows per forward pass (each batch gets its own dither seeds).

    Returns
    -------
    :class:`DitheredTrials`. Cost: ``n_trials`` quantized passes per batch of windows (plus the
    differentiated pass when ``gradients`` is None).
    """
    if n_trials < 2:
        raise InputError(f"need at least 2 trials, got {n_trials}")
    n = len(_layers(loaded.model))
    mask = _slot_mask(slots, n)
    windows, tokens = input_ids.shape
    if gradients is None:
        gradients = kv_gradients(loaded, input_ids, progress=False, labels=labels, batch_size=batch_size)
    if gradients.pre_rope:
        raise InputError("dithered_trials needs post-RoPE gradients (the cache's keys)")
    if tuple(gradients.grad_keys.shape[1:4:2]) != (windows, tokens):
        raise InputError(
            f"gradients are for {tuple(gradients.grad_keys.shape[1:4:2])} (windows, tokens), "
            f"input_ids has {(windows, tokens)}"
        )
    steps = (_per_layer_steps(key_step, n), _per_layer_steps(key_step if value_step is None else value_step, n))
    parts = np.zeros((n_trials, n, 2, windows, tokens))
    analytic = np.zeros((n, 2, windows, tokens))
    analytic_clean = np.zeros((n, 2, windows, tokens))
    delta = np.zeros((n_trials, windows))
    clean_nll = np.asarray(gradients.nll, dtype=np.float64)
    scored = 0
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
            scored += int((targets != -100).sum())
            for trial in range(n_trials):
                kq, vq = dithered_quantizers(n, steps[0], steps[1], trial=trial, seed=seed, batch=batch, slots=mask)
                store: dict[tuple[int, int], tuple[Tensor, Tensor]] = {}
                kq = [_recording_steps(q, store, (l, 0)) if mask[l, 0] else q for l, q in enumerate(kq)]
                vq = [_recording_steps(q, store, (l, 1)) if mask[l, 1] else q for l, q in enumerate(vq)]
                cache = QuantizeDequantizeCache(kq, loaded.config, vq)
                quantized = _window_nll(loaded.model(ids, cache=cache, use_cache=True).logits, targets)
                delta[trial, start:stop] = quantized.double().cpu().numpy() - clean_nll[start:stop]
                for (l, p), (e, step) in store.items():
                    g = grads[p][l].to(torch.float64)
                    parts[trial, l, p, start:stop] = (g * e.to(torch.float64)).sum(dim=(1, 3)).cpu().numpy()
                    analytic[l, p, start:stop] += _crypto_variance(g, step).cpu().numpy() / n_trials
                bar.update()
    bar.close()
    return DitheredTrials(delta, parts, analytic, analytic_clean, mask, clean_nll, scored, int(seed))


# --------------------------------------------------------------------- estimators and their sampling error
#: What the intervals resample: whole windows (their per-window variances fixed), or trials within each
#: window (every window keeps its own trials).
UNITS = ("windows", "trials")


def _variances(x: np.ndarray, counts: np.ndarray | None, y: np.ndarray | None = None) -> np.ndarray:
    """Per-window sample (co)variances over trials, ddof 1: x, y (S, W, ...) → (W, ...); with resampling
    multiplicities ``counts`` (D, W, S) → (D, W, ...)."""
    y = x if y is None else y
    s = x.shape[0]
    if counts is None:
        xc = x - x.mean(axis=0)
        return (xc * (y - y.mean(axis=0))).sum(axis=0) / (s - 1)
    first_x = np.einsum("dws,sw...->dw...", counts, x)
    first_y = first_x if y is x else np.einsum("dws,sw...->dw...", counts, y)
    second = np.einsum("dws,sw...->dw...", counts, x * y)
    return (second - first_x * first_y / s) / (s - 1)


def _pooled_ratio(
    moments: Callable[[np.ndarray | None], tuple[np.ndarray, np.ndarray]],
    n_windows: int,
    n_trials: int,
    unit: str,
    draws: int,
    level: float,
    seed: int,
) -> Estimate:
    """Σ_w num_w / Σ_w den_w with a percentile bootstrap interval.

    ``moments(counts)`` gives the per-window numerators and denominators (W,) for ``counts`` None, or
    (D, W) for trial multiplicities (D, W, S). ``unit="windows"`` resamples windows (each window's
    terms fixed), ``"trials"`` resamples trials within every window.
    """
    num, den = moments(None)
    value = float(num.sum() / den.sum())
    if unit == "windows":
        if n_windows < 2:
            raise InputError("resampling windows needs at least 2 windows; pass unit='trials'")

        def statistic(index: np.ndarray) -> np.ndarray:
            with np.errstate(invalid="ignore", divide="ignore"):
                return num[index].sum(axis=-1) / den[index].sum(axis=-1)

        estimate = bootstrap(statistic, n_windows, draws, level, seed)
        return Estimate(value, estimate.low, estimate.high, level, n_windows)
    counts = resample_counts(n_trials, draws * n_windows, seed).reshape(draws, n_windows, n_trials)
    num_b, den_b = moments(counts)
    with np.errstate(invalid="ignore", divide="ignore"):
        ratios = num_b.sum(axis=-1) / np.broadcast_to(den_b, num_b.shape).sum(axis=-1)
    low, high = percentile_interval(ratios, level)
    return Estimate(value, low, high, level, n_trials * n_windows)


def _check_options(unit: str, draws: int, level: float) -> None:
    if unit not in UNITS:
        raise InputError(f"unit must be one of {UNITS}, got {unit!r}")
    if draws < 1:
        raise InputError(f"draws must be positive, got {draws}")
    if not 0.0 < level < 1.0:
        raise InputError(f"level must lie in (0, 1), got {level}")


def _mean_and_se(x: np.ndarray) -> tuple[float, float]:
    """Σ_w mean_s x and its standard error √(Σ_w Var_s x / S) for x (S, W) (windows independent)."""
    s = x.shape[0]
    return float(x.mean(axis=0).sum()), float(math.sqrt(_variances(x, None).sum() / s))


def _z(mean: float, se: float) -> float:
    return mean / se if se > 0 else float("nan")


@dataclass(frozen=True)
class FixedGradientAdditivity:
    """Theorem B for the fixed-gradient first-order sum X = Σ gᵀe (:func:`fixed_gradient_additivity`).

    Variances are per window over trials, summed over windows (windows are independent passes).

    Attributes
    ----------
    n_trials, n_windows : trials per window and windows. n_parts : parts per window.
    var_total : Σ_w Var(X_w). sum_var_parts : Σ_w Σ_parts Var(part). analytic : Σ ‖g‖²Δ²/12 (realised
        steps); analytic_clean : with the clean cache's steps.
    pos_add : var_total / sum_var_parts; pred : var_total / analytic (both 1 under the theorem).
    mean, se : E X summed over windows and its standard error (E X = 0 under the theorem).
    """

    n_trials: int
    n_windows: int
    n_parts: int
    var_total: float
    sum_var_parts: float
    analytic: float
    analytic_clean: float
    pos_add: Estimate
    pred: Estimate
    mean: float
    se: float

    @property
    def z(self) -> float:
        """mean / se: how many standard errors the mean of X lies from 0."""
        return _z(self.mean, self.se)


def fixed_gradient_additivity(
    trials: DitheredTrials,
    position_blocks: int = 8,
    draws: int = 2000,
    level: float = 0.95,
    seed: int = 0,
    unit: str = "windows",
) -> FixedGradientAdditivity:
    """pos_add and pred of the fixed-gradient first-order sum X = Σ gᵀe over the trials.

    Parts are (dithered layer, path, block of positions) within a window: the positions are cut into
    ``position_blocks`` contiguous blocks. Per window w, Var(X_w) and the parts' variances are sample
    variances over the trials; pos_add = Σ_w Var(X_w) / Σ_w Σ_parts Var(part) and pred = Σ_w Var(X_w) /
    Σ ‖g‖²Δ²/12. With one window this is :func:`variance_additivity` on those parts. Intervals:
    percentile bootstrap (:mod:`lqlib.evaluation.stats`) over windows (``unit="windows"``, the default)
    or over the trials of every window (``"trials"``); the analytic variance is held fixed.
    """
    _check_options(unit, draws, level)
    tokens = trials.parts.shape[-1]
    if not 1 <= position_blocks <= tokens:
        raise InputError(f"need 1 <= position_blocks <= tokens ({tokens}), got {position_blocks}")
    cuts = np.array_split(np.arange(tokens), position_blocks)
    blocks = np.stack([trials.parts[..., c].sum(axis=-1) for c in cuts], axis=-1)  # (S, L, 2, W, blocks)
    contributions = np.moveaxis(blocks[:, trials.slots], 2, 1)  # (S, W, slots, blocks)
    contributions = contributions.reshape(trials.n_trials, trials.n_windows, -1)  # (S, W, parts)
    x = contributions.sum(axis=-1)  # (S, W)
    analytic_w = trials.window_analytic

    def pos_add(counts):
        return _variances(x, counts), _variances(contributions, counts).sum(axis=-1)

    def pred(counts):
        return _variances(x, counts), analytic_w

    common = (trials.n_windows, trials.n_trials, unit, draws, level, seed)
    mean, se = _mean_and_se(x)
    return FixedGradientAdditivity(
        n_trials=trials.n_trials,
        n_windows=trials.n_windows,
        n_parts=int(contributions.shape[-1]),
        var_total=float(_variances(x, None).sum()),
        sum_var_parts=float(_variances(contributions, None).sum()),
        analytic=trials.analytic,
        analytic_clean=trials.analytic_clean,
        pos_add=_pooled_ratio(pos_add, *common),
        pred=_pooled_ratio(pred, *common),
        mean=mean,
        se=se,
    )


@dataclass(frozen=True)
class RealPassAdditivity:
    """Theorem B on the real loss change ΔL of dithered quantized passes (:func:`real_pass_additivity`).

    Variances are per window over trials, summed over windows.

    Attributes
    ----------
    n_trials, n_windows : trials per window of the all-slot run, and windows.
    n_groups : groups of layers switched on one after another (1 without nested runs).
    increment_trials : trials per window behind pos_add (the fewest of the paired runs; 0 without).
    var_total : Σ_w Var(ΔL_w). var_first_order : Σ_w Var(X_w), X the fixed-gradient first-order sum of
        the same trials. sum_var_increments : Σ_w Σ_g Var(D_g,w) over the increments (NaN without).
    analytic : Σ ‖g‖²Δ²/12 (realised steps) = Var X exactly; analytic_clean : with the clean steps.
    pos_add : Var(ΔL) / Σ_g Var(D_g), with the first-order sums as control variates (see the function;
        NaN estimate without nested runs). pos_add_direct : Σ_w Var(ΔL_w) / Σ_w Σ_g Var(D_g,w), plain.
    pred : Var(ΔL) / analytic, estimated with X as a control variate (see the function).
    pred_direct : Σ_w Var(ΔL_w) / analytic, the plain estimate (wider).
    var_ratio : Var(ΔL) / Var(X) over the same trials.
    mean, se : E ΔL summed over windows and its standard error (≠ 0: the second-order term ½eᵀHe has
        a mean of its own). bias, bias_se : the mean of the remainder ΔL − X (E X = 0, so E ΔL is this
        bias, measured more precisely). corr : pooled within-window correlation of ΔL and X.
    """

    n_trials: int
    n_windows: int
    n_groups: int
    increment_trials: int
    var_total: float
    var_first_order: float
    sum_var_increments: float
    analytic: float
    analytic_clean: float
    pos_add: Estimate
    pos_add_direct: Estimate
    pred: Estimate
    pred_direct: Estimate
    var_ratio: Estimate
    mean: float
    se: float
    bias: float
    bias_se: float
    corr: float

    @property
    def z(self) -> float:
        return _z(self.mean, self.se)


def _check_nested(trials: DitheredTrials, nested: Sequence[DitheredTrials]) -> None:
    previous = np.zeros_like(trials.slots)
    for run in nested:
        if run.window_delta_loss.shape[1] != trials.n_windows or run.parts.shape[1:] != trials.parts.shape[1:]:
            raise InputError("nested runs must cover the same windows as the all-slot run")
        if run.seed != trials.seed:
            raise InputError("nested runs must share the all-slot run's seed (paired runs: the same dither per slot)")
        if not (np.all(run.slots <= trials.slots) and np.all(previous <= run.slots)):
            raise InputError("nested runs must dither growing sets of the all-slot run's slots (layer_prefixes)")
        if np.array_equal(run.slots, previous) or np.array_equal(run.slots, trials.slots):
            raise InputError("every nested run must add slots and leave some for the next")
        previous = run.slots


def real_pass_additivity(
    trials: DitheredTrials,
    nested: Sequence[DitheredTrials] = (),
    draws: int = 2000,
    level: float = 0.95,
    seed: int = 0,
    unit: str = "windows",
) -> RealPassAdditivity:
    """pos_add and pred of the real ΔL of dithered quantized passes.

    **pos_add.** ``nested`` are paired runs (the all-slot run's ``seed``, see :func:`trial_seed`) that
    dither growing prefixes of the layers (:func:`layer_prefixes`): with P_0 = 0, the nested runs
    P_1 … P_{G−1} and P_G = ΔL, the increments D_g = P_g − P_{g−1} are the loss changes that each group
    of layers adds when it is switched on after the ones before it, so ΔL = Σ_g D_g trial by trial.
    Theorem B says they are martingale differences: pos_add = Var(ΔL) / Σ_g Var(D_g) = 1. Computed over
    the first n trials of every run, n the fewest; G − 1 extra passes per trial.

    **Control variates.** The fixed-gradient sum X of a trial has Var X = A = Σ ‖g‖²Δ²/12 (realised
    steps) exactly: independent subtractive dither makes it a martingale-difference sum with those
    conditional variances. So is the sum X_g over each group's slots, with its own A_g (in a paired
    nested run the first groups inject exactly the all-slot run's errors). Each variance of a real loss
    change is therefore estimated as its first-order part's known variance plus the sample difference,
    e.g. Var(ΔL) ≈ A + Σ_w [Var(ΔL_w) − Var(X_w)]: unbiased like the plain Σ_w Var(ΔL_w), and far less
    noisy when ΔL follows X, since the noise of the sample variance of X cancels.

    **pred** = Var(ΔL) / A, and **pos_add** = Var(ΔL) / Σ_g Var(D_g), both with these estimates
    (``pred_direct`` and ``pos_add_direct`` are the plain ratios of sample variances).

    Intervals: percentile bootstrap over windows (``unit="windows"``: each window's per-window
    variances are fixed) or over the trials of every window (``"trials"``); A held fixed.
    """
    _check_options(unit, draws, level)
    _check_nested(trials, nested)
    delta, first = trials.window_delta_loss, trials.window_first_order  # (S, W)
    analytic_w = trials.window_analytic
    common = (trials.n_windows, trials.n_trials, unit, draws, level, seed)

    def pred(counts):
        return analytic_w + _variances(delta, counts) - _variances(first, counts), analytic_w

    def pred_direct(counts):
        return _variances(delta, counts), analytic_w

    def var_ratio(counts):
        return _variances(delta, counts), _variances(first, counts)

    nan = float("nan")
    pos_add = pos_add_direct = Estimate(nan, nan, nan, level, 0)
    sum_increments, n = nan, 0
    if nested:
        n = min(min(run.n_trials for run in nested), trials.n_trials)
        levels = np.stack([run.window_delta_loss[:n] for run in nested] + [delta[:n]], axis=-1)  # (n, W, G)
        increments = np.diff(levels, axis=-1, prepend=0.0)
        # the first-order sums and analytic variances of the groups (slots each nested run adds)
        masks = [run.slots for run in nested] + [trials.slots]
        groups = [m & ~p for m, p in zip(masks, [np.zeros_like(trials.slots)] + masks[:-1])]
        x_groups = np.stack([trials.parts[:n, g].sum(axis=(1, 3)) for g in groups], axis=-1)  # (n, W, G)
        a_groups = np.stack([trials.analytic_parts[g].sum(axis=(0, 2)) for g in groups], axis=-1)  # (W, G)
        total, x_total = levels[..., -1], x_groups.sum(axis=-1)

        def pos_cv(counts):
            numerator = analytic_w + _variances(total, counts) - _variances(x_total, counts)
            parts = a_groups + _variances(increments, counts) - _variances(x_groups, counts)
            return numerator, parts.sum(axis=-1)

        def pos_plain(counts):
            return _variances(total, counts), _variances(increments, counts).sum(axis=-1)

        pos_add = _pooled_ratio(pos_cv, trials.n_windows, n, unit, draws, level, seed)
        pos_add_direct = _pooled_ratio(pos_plain, trials.n_windows, n, unit, draws, level, seed)
        sum_increments = float(_variances(increments, None).sum())
    mean, se = _mean_and_se(delta)
    bias, bias_se = _mean_and_se(delta - first)
    var_delta, var_first = _variances(delta, None), _variances(first, None)
    return RealPassAdditivity(
        n_trials=trials.n_trials,
        n_windows=trials.n_windows,
        n_groups=len(nested) + 1,
        increment_trials=n,
        var_total=float(var_delta.sum()),
        var_first_order=float(var_first.sum()),
        sum_var_increments=sum_increments,
        analytic=trials.analytic,
        analytic_clean=trials.analytic_clean,
        pos_add=pos_add,
        pos_add_direct=pos_add_direct,
        pred=_pooled_ratio(pred, *common),
        pred_direct=_pooled_ratio(pred_direct, *common),
        var_ratio=_pooled_ratio(var_ratio, *common),
        mean=mean,
        se=se,
        bias=bias,
        bias_se=bias_se,
        corr=float(_variances(delta, None, first).sum() / math.sqrt(var_delta.sum() * var_first.sum())),
    )


# --------------------------------------------------------------------- the study behind the chapter
@dataclass(frozen=True)
class OrderingTrials:
    """The dithered runs of one block ordering (:func:`theorem_b_study`): the all-slot run and its nested
    paired runs (the first groups of layers dithered)."""

    mode: str
    kind: str
    bits: float
    everything: DitheredTrials
    nested: tuple[DitheredTrials, ...]


def _kind(mode: str) -> str:
    kind = {"baseline": "identity"}.get(mode, mode.split()[0])
    if kind not in ("identity", "sorted", "random"):
        raise InputError(f"a mode is 'baseline', 'sorted' or 'random[ k]', got {mode!r}")
    return kind


def theorem_b_study(
    loaded: LoadedModel,
    input_ids: Tensor,
    bits: float,
    modes: Sequence[str],
    n_trials: int,
    *,
    calibration: KVSample,
    n_groups: int = 2,
    batch_size: int = 1,
    labels: Tensor | None = None,
    progress: bool = False,
) -> dict[str, OrderingTrials]:
    """Dithered trials of the scalar block quantizer under several block orderings, on the same windows.

    Mode i (``"baseline"``: the model's order, ``"sorted"``: dims by second moment on ``calibration``,
    ``"random"``: a seeded random order per layer and path, see :func:`ordering_steps` with seed i)
    gets an all-slot run of ``n_trials`` trials with dither seed 1000·i and, for ``n_groups`` > 1, its
    nested paired runs (:func:`layer_prefixes`). One differentiated pass (:func:`kv_gradients`) serves
    every run. Stored (:mod:`lqlib.store`) under the model, windows and every argument.

    Cost: n_trials · n_groups quantized passes per window and mode, plus one differentiated pass per
    window.
    """
    modes = list(modes)
    kinds = [_kind(mode) for mode in modes]
    inputs = {
        "ids": input_ids,
        "labels": labels,
        "bits": float(bits),
        "modes": modes,
        "trials": n_trials,
        "calibration": calibration,
        "groups": n_groups,
        "batch": batch_size,
    }

    def compute() -> dict[str, OrderingTrials]:
        n_layers, d = calibration.keys.shape[0], calibration.keys.shape[-1]
        grads = kv_gradients(loaded, input_ids, progress=False, labels=labels, batch_size=batch_size)
        common = {"gradients": grads, "batch_size": batch_size, "progress": progress, "labels": labels}
        out = {}
        for i, (mode, kind) in enumerate(zip(modes, kinds)):
            steps = ordering_steps(bits, kind, n_layers, d, keys=calibration.keys, values=calibration.values, seed=i)
            runs = [
                dithered_trials(loaded, input_ids, *steps, n_trials, seed=1000 * i, slots=mask, **common)
                for mask in [*layer_prefixes(n_layers, n_groups), None]
            ]
            out[mode] = OrderingTrials(mode, kind, float(bits), runs[-1], tuple(runs[:-1]))
        return out

    return _stored(loaded, "theorem_b_study", inputs, compute)
