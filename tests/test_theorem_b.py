"""Paper III, Theorem B: variance additivity under independent dither — synthetic parts and real passes."""

import itertools
import math
import types

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from lqlib.ddt import (
    Dithered,
    DitheredTrials,
    ScalarBlockQuantizer,
    block_permutation,
    dithered_quantizers,
    dithered_trials,
    first_order_term,
    fixed_gradient_additivity,
    kv_gradients,
    layer_groups,
    loss_change,
    ordering_steps,
    real_pass_additivity,
    trial_seed,
    variance_additivity,
)
from lqlib.evaluation.models import LoadedModel


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _float64_rms_norm(self, hidden_states):
    variance = hidden_states.pow(2).mean(-1, keepdim=True)
    return self.weight * (hidden_states * torch.rsqrt(variance + self.variance_epsilon))


@pytest.fixture(scope="module")
def tiny():
    """A random GQA Llama in float64 (2 layers, 2 KV heads of dim 16) and two windows of 24 tokens."""
    config = LlamaConfig(
        vocab_size=53,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).double().eval()
    for module in model.modules():
        if type(module).__name__ == "LlamaRMSNorm":
            module.forward = types.MethodType(_float64_rms_norm, module)
    return LoadedModel(model, None, "tiny"), torch.randint(0, 53, (2, 24))


def _synthetic_trials(parts: np.ndarray, analytic: np.ndarray) -> DitheredTrials:
    """Wrap (S, L, 2, W, T) first-order parts and (L, 2, W, T) analytic variances as DitheredTrials."""
    return DitheredTrials(
        parts.sum(axis=(1, 2, 3, 4)), parts, analytic, analytic, np.ones(parts.shape[1:3], dtype=bool), 0.0, 0, 0
    )


def _fixed_gradient_case(draws: int, seed: int):
    """Fixed inputs and gradients, (L=3, 2, W=1, T=16, d=8), independent dither in every trial and element."""
    rng = np.random.default_rng(seed)
    shape = (3, 2, 1, 16, 8)
    g = rng.standard_normal(shape) * rng.uniform(0.2, 2.0, shape[:-1] + (1,))
    step = rng.uniform(0.05, 0.5, shape[:-1] + (1,))
    x = torch.as_tensor(np.broadcast_to(rng.standard_normal(shape), (draws, *shape)).copy())
    steps = torch.as_tensor(np.broadcast_to(step, x.shape).copy())
    e = (Dithered(lambda _x: steps, seed=seed)(x) - x).numpy()
    return g, step, e


def test_additivity_and_crypto_prediction_hold_under_independent_dither():
    g, step, e = _fixed_gradient_case(400, seed=1)
    exact = (g**2 * step**2 / 12).sum(axis=-1)  # Var(gᵀe) of every part, closed form
    result = fixed_gradient_additivity(_synthetic_trials((g * e).sum(axis=-1), exact), position_blocks=4)
    assert result["analytic"] == pytest.approx(float(exact.sum()), rel=1e-12)
    assert result["n_parts"] == 3 * 2 * 1 * 4
    assert result["pos_add_low"] < 1 < result["pos_add_high"]
    assert result["pred_low"] < 1 < result["pred_high"]
    assert abs(result["z"]) < 3
    # the same estimate as variance_additivity on the raw elements, parts = (layer, path, window, block)
    blocks = e.reshape(400, 3, 2, 1, 4, 4 * 8)
    raw = variance_additivity(
        g.reshape(3, 2, 1, 4, 32), blocks, np.broadcast_to(step, g.shape).reshape(3, 2, 1, 4, 32).copy()
    )
    assert result["pos_add"] == pytest.approx(raw["pos_add"], rel=1e-10)
    assert result["pred"] == pytest.approx(raw["pred"], rel=1e-10)


def test_stratified_dither_gives_the_crypto_variance_exactly():
    """With the dither of each element running over the S strata of [−½, ½) (a Latin hypercube), the
    sample variance of the Dithered error is exactly Δ²/12 · (S+1)/S, whatever the input."""

    class Stratified(Dithered):
        def dither(self, x):
            generator = torch.Generator().manual_seed(self.seed)
            ranks = torch.argsort(torch.rand(x.shape, generator=generator, dtype=torch.float64), dim=0)
            return (ranks.to(torch.float64) + 0.5) / x.shape[0] - 0.5

    draws, parts = 64, 40
    rng = np.random.default_rng(2)
    step, g = rng.uniform(0.1, 1.0, (parts, 1)), rng.standard_normal((parts, 1))
    x = torch.as_tensor(np.broadcast_to(rng.standard_normal((parts, 1)) * 3, (draws, parts, 1)).copy())
    steps = torch.as_tensor(np.broadcast_to(step, x.shape).copy())
    e = (Stratified(lambda _x: steps, seed=3)(x) - x).numpy()
    result = variance_additivity(g, e, step)
    exact = float((g**2 * step**2).sum() / 12)
    assert result["analytic"] == pytest.approx(exact, rel=1e-12)
    assert result["sum_var_parts"] == pytest.approx(exact * (draws + 1) / draws, rel=1e-9)


def test_correlated_errors_are_detected():
    """The pitfall trial_seed avoids: one dither reused for every part. With inputs a whole number of steps
    apart the parts' errors are identical, so the variance of the sum is parts × the sum of variances;
    with alternating gradients they cancel. Both intervals exclude 1."""
    draws, layers, tokens, d, step = 200, 4, 8, 8, 0.2
    rng = np.random.default_rng(4)
    base = torch.as_tensor(rng.standard_normal((draws, 1, 1, 1, tokens, d)))
    shifts = torch.arange(layers * 2, dtype=torch.float64).reshape(1, layers, 2, 1, 1, 1) * step
    x = base + shifts  # (S, L, 2, 1, T, d)
    reused = Dithered(step, seed=5)
    e = torch.stack([reused(x[:, l, p]) - x[:, l, p] for l in range(layers) for p in range(2)], dim=1)
    e = e.reshape(x.shape).numpy()
    analytic = np.full((layers, 2, 1, tokens), d * step**2 / 12)
    together = fixed_gradient_additivity(_synthetic_trials(e.sum(axis=-1), analytic), position_blocks=tokens)
    assert together["pos_add_low"] > 5 and together["pred_low"] > 5
    sign = np.where(np.arange(layers * 2).reshape(layers, 2) % 2 == 0, 1.0, -1.0)[None, :, :, None, None]
    cancel = fixed_gradient_additivity(_synthetic_trials(sign * e.sum(axis=-1), analytic), position_blocks=tokens)
    assert cancel["pos_add_high"] < 0.1 and cancel["pred_high"] < 0.1
    # the same inputs with fresh dither per slot (as dithered_trials does) pass
    fresh = (
        torch.stack(
            [
                Dithered(step, seed=trial_seed(5, 0, l, p))(x[:, l, p]) - x[:, l, p]
                for l in range(layers)
                for p in range(2)
            ],
            dim=1,
        )
        .reshape(x.shape)
        .numpy()
    )
    ok = fixed_gradient_additivity(_synthetic_trials(fresh.sum(axis=-1), analytic), position_blocks=tokens)
    assert ok["pos_add_low"] < 1 < ok["pos_add_high"] and ok["pred_low"] < 1 < ok["pred_high"]


def test_bootstrap_intervals_match_normal_theory_and_cover():
    """For Gaussian parts the sample variance has relative standard error √(2/(S−1)): the bootstrap
    interval of pred has about that half-width, and 95% intervals cover the truth about 95% of the time."""
    draws, parts = 100, 10
    rng = np.random.default_rng(6)
    analytic = np.full((parts, 1, 1, 1), 1.0)
    widths, covered = [], 0
    replicates = 200
    for r in range(replicates):
        x = rng.standard_normal((draws, parts, 1, 1, 1))
        result = fixed_gradient_additivity(_synthetic_trials(x, analytic), position_blocks=1, n_boot=400, seed=r)
        widths.append(result["pred_high"] - result["pred_low"])
        covered += result["pred_low"] < 1.0 < result["pred_high"]
    theory = 2 * 1.96 * math.sqrt(2 / (draws - 1))
    assert np.median(widths) == pytest.approx(theory, rel=0.2)
    assert 0.88 <= covered / replicates <= 0.99


def test_trial_zero_is_loss_change_and_first_order_term(tiny):
    loaded, ids = tiny
    step = ScalarBlockQuantizer(5).step
    trials = dithered_trials(loaded, ids, step, n_trials=3, seed=11, batch_size=2, progress=False)
    kq, vq = dithered_quantizers(2, step, trial=0, seed=11)
    assert trials.delta_loss[0] == pytest.approx(
        loss_change(loaded, ids, kq, vq, batch_size=2, progress=False), rel=1e-12
    )
    assert trials.first_order[0] == pytest.approx(
        first_order_term(loaded, ids, kq, vq, batch_size=2, progress=False), rel=1e-10
    )
    assert len(set(trials.delta_loss.tolist())) == 3  # every trial its own dither
    again = dithered_trials(loaded, ids, step, n_trials=3, seed=11, batch_size=2, progress=False)
    assert np.array_equal(again.delta_loss, trials.delta_loss) and np.array_equal(again.parts, trials.parts)
    # analytic variance: layer 0's quantizer sees the clean cache, so its realised steps are the clean ones
    grads = kv_gradients(loaded, ids, progress=False)
    for p, (g, x) in enumerate(((grads.grad_keys, grads.keys), (grads.grad_values, grads.values))):
        closed = (g.double() ** 2 * step(x).double() ** 2).sum(dim=(2, 4)).numpy() / 12  # (layers, W, T)
        np.testing.assert_allclose(trials.analytic_clean_parts[:, p], closed, rtol=1e-12)
        np.testing.assert_allclose(trials.analytic_parts[0, p], closed[0], rtol=1e-12)
    assert trials.scored_tokens == 46 and trials.analytic == pytest.approx(trials.analytic_parts.sum())


def test_group_runs_dither_only_their_slots(tiny):
    loaded, ids = tiny
    grads = kv_gradients(loaded, ids, progress=False)
    values_only = np.array([[False, True], [False, True]])
    run = dithered_trials(loaded, ids, 0.05, n_trials=2, slots=values_only, gradients=grads, progress=False)
    assert np.all(run.parts[:, :, 0] == 0) and np.all(run.parts[:, :, 1, :, :-1] != 0)  # last position: g = 0
    assert np.all(run.analytic_parts[:, 0] == 0)
    # one window per batch (batch_size 1): each batch has its own dither seeds
    per_batch = [
        loss_change(
            loaded, ids[b : b + 1], *dithered_quantizers(2, 0.05, trial=1, batch=b, slots=values_only), progress=False
        )
        for b in (0, 1)
    ]
    assert run.delta_loss[1] == pytest.approx(sum(per_batch), rel=1e-12)
    with pytest.raises(ValueError):
        dithered_trials(loaded, ids, ScalarBlockQuantizer(4), n_trials=2, gradients=grads, progress=False)
    with pytest.raises(ValueError):
        dithered_trials(loaded, ids[:, :12], 0.05, n_trials=2, gradients=grads, progress=False)
    with pytest.raises(ValueError):
        dithered_trials(loaded, ids, 0.05, n_trials=1, gradients=grads, progress=False)


def test_real_passes_add_up_for_small_steps(tiny):
    """On the tiny model with a fine step, ΔL ≈ X: the real-pass pos_add (one group per layer) and pred
    are 1 within their intervals, and the remainder ΔL − X is a small share of the variance."""
    loaded, ids = tiny
    grads = kv_gradients(loaded, ids, progress=False)
    step = ScalarBlockQuantizer(6, block=16).step
    common = {"gradients": grads, "batch_size": 2, "progress": False}
    everything = dithered_trials(loaded, ids, step, n_trials=300, seed=1, **common)
    groups = [
        dithered_trials(loaded, ids, step, n_trials=300, seed=2 + i, slots=mask, **common)
        for i, mask in enumerate(layer_groups(2, 2))
    ]
    result = real_pass_additivity(everything, groups, n_boot=1000)
    assert result["pos_add_low"] < 1 < result["pos_add_high"]
    assert result["pred_low"] < 1 < result["pred_high"]
    assert result["pos_add_high"] - result["pos_add_low"] < 0.6
    assert result["corr"] > 0.99 and result["remainder_var_share"] < 0.02
    assert abs(result["remainder_mean"]) < 0.2 * math.sqrt(result["var_total"])
    with pytest.raises(ValueError):  # overlapping groups
        real_pass_additivity(everything, [groups[0], groups[0]])
    with pytest.raises(ValueError):  # groups missing a slot
        real_pass_additivity(everything, groups[:1])
    alone = real_pass_additivity(everything)
    assert math.isnan(alone["pos_add"]) and alone["pred"] == result["pred"]
    assert not result["paired"] and result["var_ratio"] == pytest.approx(1, abs=0.01)  # ΔL ≈ X trial by trial
    # paired group runs (the all-slot run's seed): the same dither per slot and trial, so layer 0 (whose
    # input is clean in both runs) gets identical errors, and pos_add is more precise
    paired = [
        dithered_trials(loaded, ids, step, n_trials=300, seed=1, slots=mask, **common) for mask in layer_groups(2, 2)
    ]
    np.testing.assert_allclose(paired[0].parts[:, 0], everything.parts[:, 0], rtol=1e-12)
    both = real_pass_additivity(everything, paired, n_boot=1000)
    assert both["paired"] and both["pos_add_trials"] == [300, 300, 300]
    assert both["pos_add_low"] < 1 < both["pos_add_high"]
    assert both["pos_add_high"] - both["pos_add_low"] < 0.75 * (result["pos_add_high"] - result["pos_add_low"])


def test_seeds_and_groups():
    """Seeds are 32-bit (torch's CPU generator ignores higher bits) and distinct within a run."""
    assert torch.equal(
        torch.rand(4, generator=torch.Generator().manual_seed(5)),
        torch.rand(4, generator=torch.Generator().manual_seed(5 + 2**32)),
    )
    for run in (0, 123456789):
        seeds = {trial_seed(run, t, l, p, b) for t, l, p, b in itertools.product(range(500), range(30), (0, 1), (0, 3))}
        assert len(seeds) == 500 * 30 * 2 * 2 and all(0 <= s < 2**32 for s in seeds)
    assert trial_seed(0, 0, 0, 0) != trial_seed(1, 0, 0, 0)
    with pytest.raises(ValueError):
        trial_seed(0, 0, 256, 0)
    masks = layer_groups(30, 4)
    assert sum(m.astype(int) for m in masks).min() == 1 and sum(m.astype(int) for m in masks).max() == 1
    assert [int(m[:, 0].sum()) for m in masks] == [8, 8, 7, 7]
    with pytest.raises(ValueError):
        layer_groups(3, 4)


def test_ordering_steps_follow_the_blocks():
    """Sorted: dims of similar second moment share a step; random: per-slot seeded orderings; identity: the
    plain block steps."""
    rng = torch.Generator().manual_seed(7)
    scale = torch.logspace(-1, 1, 16, dtype=torch.float64)[torch.randperm(16, generator=rng)]
    keys = torch.randn(2, 2, 1000, 16, generator=rng, dtype=torch.float64) * scale
    values = torch.randn(2, 2, 50, 16, generator=rng, dtype=torch.float64)
    x = torch.randn(3, 2, 5, 16, generator=rng, dtype=torch.float64) * scale
    key_steps, value_steps = ordering_steps(4, "sorted", 2, 16, keys=keys, values=values)
    perm = block_permutation("sorted", 16, sample=keys[1])
    torch.testing.assert_close(key_steps[1](x), ScalarBlockQuantizer(4, permutation=perm).step(x))
    high = torch.argsort(scale, descending=True)[:8]
    assert torch.all(key_steps[0](x)[..., high] == key_steps[0](x)[..., high[:1]])  # the 8 largest dims: one block
    plain = ordering_steps(4, "identity", 2, 16)[0][0](x)
    torch.testing.assert_close(plain, ScalarBlockQuantizer(4).step(x))
    first, again = ordering_steps(4, "random", 2, 16, seed=3), ordering_steps(4, "random", 2, 16, seed=3)
    torch.testing.assert_close(first[1][0](x), again[1][0](x))
    assert not torch.equal(first[0][0](x), first[0][1](x)) and not torch.equal(first[0][0](x), plain)
    with pytest.raises(ValueError):
        ordering_steps(4, "sorted", 2, 16)
    with pytest.raises(ValueError):
        ordering_steps(4, "reversed", 2, 16)
