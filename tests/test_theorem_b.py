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
    layer_prefixes,
    loss_change,
    ordering_steps,
    real_pass_additivity,
    theorem_b_study,
    trial_seed,
    variance_additivity,
)
from lqlib.errors import InputError
from lqlib.evaluation.capture import capture_kv
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


def _synthetic_trials(parts: np.ndarray, analytic: np.ndarray, delta: np.ndarray | None = None) -> DitheredTrials:
    """Wrap (S, L, 2, W, T) first-order parts and (L, 2, W, T) analytic variances as DitheredTrials (ΔL = X
    per trial and window unless ``delta`` (S, W) is given)."""
    delta = parts.sum(axis=(1, 2, 4)) if delta is None else delta
    windows = parts.shape[3]
    slots = np.ones(parts.shape[1:3], dtype=bool)
    return DitheredTrials(delta, parts, analytic, analytic, slots, np.zeros(windows), 0, 0)


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
    result = fixed_gradient_additivity(_synthetic_trials((g * e).sum(axis=-1), exact), position_blocks=4, unit="trials")
    assert result.analytic == pytest.approx(float(exact.sum()), rel=1e-12)
    assert result.n_parts == 3 * 2 * 4 and result.n_windows == 1 and result.n_trials == 400
    assert result.pos_add.contains(1) and result.pred.contains(1)
    assert abs(result.z) < 3
    # the same estimate as variance_additivity on the raw elements, parts = (layer, path, window, block)
    blocks = e.reshape(400, 3, 2, 1, 4, 4 * 8)
    raw = variance_additivity(
        g.reshape(3, 2, 1, 4, 32), blocks, np.broadcast_to(step, g.shape).reshape(3, 2, 1, 4, 32).copy()
    )
    assert result.pos_add.value == pytest.approx(raw.pos_add, rel=1e-10)
    assert result.pred.value == pytest.approx(raw.pred, rel=1e-10)
    with pytest.raises(InputError):  # one window cannot be resampled
        fixed_gradient_additivity(_synthetic_trials((g * e).sum(axis=-1), exact), unit="windows")


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
    assert result.analytic == pytest.approx(exact, rel=1e-12)
    assert result.sum_var_parts == pytest.approx(exact * (draws + 1) / draws, rel=1e-9)


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
    options = {"position_blocks": tokens, "unit": "trials"}
    together = fixed_gradient_additivity(_synthetic_trials(e.sum(axis=-1), analytic), **options)
    assert together.pos_add.low > 5 and together.pred.low > 5
    sign = np.where(np.arange(layers * 2).reshape(layers, 2) % 2 == 0, 1.0, -1.0)[None, :, :, None, None]
    cancel = fixed_gradient_additivity(_synthetic_trials(sign * e.sum(axis=-1), analytic), **options)
    assert cancel.pos_add.high < 0.1 and cancel.pred.high < 0.1
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
    ok = fixed_gradient_additivity(_synthetic_trials(fresh.sum(axis=-1), analytic), **options)
    assert ok.pos_add.contains(1) and ok.pred.contains(1)


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
        result = fixed_gradient_additivity(
            _synthetic_trials(x, analytic), position_blocks=1, draws=400, seed=r, unit="trials"
        )
        widths.append(result.pred.high - result.pred.low)
        covered += result.pred.contains(1.0)
    theory = 2 * 1.96 * math.sqrt(2 / (draws - 1))
    assert np.median(widths) == pytest.approx(theory, rel=0.2)
    assert 0.88 <= covered / replicates <= 0.99


def test_pooled_windows_and_their_bootstrap():
    """W windows of S trials each, with different variances per window: the pooled estimate is the ratio of
    summed per-window variances, and the interval over windows has the normal-theory width
    √(2/(W(S−1))) when the windows are alike, and covers 1 about 95% of the time."""
    windows, trials, parts = 40, 5, 6
    rng = np.random.default_rng(8)
    scale = rng.uniform(0.5, 2.0, windows)  # per-window spread
    analytic = np.broadcast_to((scale**2)[None, None, :, None] * np.ones((parts, 1, 1, 1)), (parts, 1, windows, 1))
    x = rng.standard_normal((trials, parts, 1, windows, 1)) * scale[None, None, None, :, None]
    result = fixed_gradient_additivity(_synthetic_trials(x, analytic.copy()), position_blocks=1, draws=1000)
    per_window = x.sum(axis=(1, 2, 4)).var(axis=0, ddof=1)
    assert result.pred.value == pytest.approx(per_window.sum() / analytic.sum(), rel=1e-12)
    assert result.pred.n == windows and result.n_windows == windows
    covered, widths = 0, []
    for r in range(150):
        x = rng.standard_normal((trials, parts, 1, windows, 1))
        flat = np.ones((parts, 1, windows, 1))
        pred = fixed_gradient_additivity(_synthetic_trials(x, flat), position_blocks=1, draws=400, seed=r).pred
        covered += pred.contains(1.0)
        widths.append(pred.high - pred.low)
    assert np.median(widths) == pytest.approx(2 * 1.96 * math.sqrt(2 / (windows * (trials - 1))), rel=0.25)
    assert 0.85 <= covered / 150 <= 0.99


def test_trial_zero_is_loss_change_and_first_order_term(tiny):
    loaded, ids = tiny
    step = ScalarBlockQuantizer(5).step
    trials = dithered_trials(loaded, ids, step, n_trials=3, seed=11, batch_size=2, progress=False)
    kq, vq = dithered_quantizers(2, step, trial=0, seed=11)
    assert trials.window_delta_loss.shape == (3, 2) and trials.window_nll.shape == (2,)
    assert trials.delta_loss[0] == pytest.approx(
        loss_change(loaded, ids, kq, vq, batch_size=2, progress=False), rel=1e-9, abs=1e-10
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
    assert run.window_delta_loss[1] == pytest.approx(per_batch, rel=1e-9, abs=1e-10)
    with pytest.raises(ValueError):
        dithered_trials(loaded, ids, ScalarBlockQuantizer(4), n_trials=2, gradients=grads, progress=False)
    with pytest.raises(ValueError):
        dithered_trials(loaded, ids[:, :12], 0.05, n_trials=2, gradients=grads, progress=False)
    with pytest.raises(ValueError):
        dithered_trials(loaded, ids, 0.05, n_trials=1, gradients=grads, progress=False)


def test_real_passes_add_up_for_small_steps(tiny):
    """On the tiny model with a fine step, ΔL ≈ X: the real-pass pos_add (layer 0 switched on, then layer 1)
    and pred are 1 within their intervals (pred to 0.5% with the control variate, which narrows it)."""
    loaded, ids = tiny
    grads = kv_gradients(loaded, ids, progress=False)
    step = ScalarBlockQuantizer(6, block=16).step
    common = {"gradients": grads, "batch_size": 2, "progress": False}
    everything = dithered_trials(loaded, ids, step, n_trials=300, seed=1, **common)
    (prefix,) = [
        dithered_trials(loaded, ids, step, n_trials=200, seed=1, slots=m, **common) for m in layer_prefixes(2, 2)
    ]
    np.testing.assert_allclose(prefix.parts[:, 0], everything.parts[:200, 0], rtol=1e-12)  # paired: layer 0 alike
    result = real_pass_additivity(everything, [prefix], draws=1000, unit="trials")
    assert result.n_groups == 2 and result.increment_trials == 200 and result.n_windows == 2
    assert result.pos_add_direct.contains(1) and result.pred_direct.contains(1)
    assert result.pos_add_direct.high - result.pos_add_direct.low < 0.6
    assert result.pos_add.value == pytest.approx(1, abs=0.01)
    assert result.pos_add.high - result.pos_add.low < 0.1 * (result.pos_add_direct.high - result.pos_add_direct.low)
    # the control variate sees the tiny second-order departure that the plain estimate cannot
    assert result.pred.value == pytest.approx(1, abs=0.005) and result.pred_direct.contains(result.pred.value)
    assert result.pred.high - result.pred.low < 0.05 * (result.pred_direct.high - result.pred_direct.low)
    assert result.corr > 0.99 and result.var_ratio.value == pytest.approx(1, abs=0.02)
    assert abs(result.bias) < 0.2 * math.sqrt(result.var_total)
    alone = real_pass_additivity(everything, unit="trials", draws=1000)
    assert math.isnan(alone.pos_add.value) and alone.pred == result.pred and alone.n_groups == 1
    unpaired = dithered_trials(loaded, ids, step, n_trials=5, seed=2, slots=layer_prefixes(2, 2)[0], **common)
    with pytest.raises(InputError):  # another seed: not paired
        real_pass_additivity(everything, [unpaired])
    with pytest.raises(InputError):  # a nested run must leave slots for the next
        real_pass_additivity(everything, [everything])


def test_the_control_variate_is_unbiased_and_sharper():
    """ΔL = (1 + a)·X + noise with Var X known exactly: the control-variate pred and the plain one estimate
    the same Var(ΔL)/Var(X) = (1 + a)² + σ²/A; the first with a far narrower interval."""
    rng = np.random.default_rng(9)
    windows, trials, a, sigma = 30, 4, -0.15, 0.3
    estimates = {"cv": [], "direct": []}
    for r in range(60):
        parts = rng.standard_normal((trials, 4, 1, windows, 1))  # Var X = 4 per window
        x = parts.sum(axis=(1, 2, 4))
        delta = (1 + a) * x + sigma * rng.standard_normal((trials, windows))
        result = real_pass_additivity(_synthetic_trials(parts, np.ones((4, 1, windows, 1)), delta), draws=300, seed=r)
        estimates["cv"].append(result.pred)
        estimates["direct"].append(result.pred_direct)
    truth = (1 + a) ** 2 + sigma**2 / 4
    for name, runs in estimates.items():
        assert np.mean([e.value for e in runs]) == pytest.approx(truth, abs=0.03), name
        assert np.mean([e.contains(truth) for e in runs]) >= 0.8, name
    width = {name: np.median([e.high - e.low for e in runs]) for name, runs in estimates.items()}
    assert width["cv"] < 0.5 * width["direct"]


def test_theorem_b_study_runs_every_mode_with_its_nested_runs(tiny):
    loaded, ids = tiny
    calibration = capture_kv(loaded, ids[:1])
    study = theorem_b_study(loaded, ids, 5.0, ["baseline", "sorted"], 2, calibration=calibration, n_groups=2)
    assert list(study) == ["baseline", "sorted"] and study["sorted"].kind == "sorted"
    for i, runs in enumerate(study.values()):
        assert runs.everything.seed == 1000 * i and len(runs.nested) == 1 and runs.nested[0].seed == 1000 * i
        assert runs.everything.n_trials == 2 and np.array_equal(runs.nested[0].slots, layer_prefixes(2, 2)[0])
    direct = dithered_trials(loaded, ids, ordering_steps(5.0, "identity", 2, 16)[0], n_trials=2, progress=False)
    np.testing.assert_allclose(study["baseline"].everything.window_delta_loss, direct.window_delta_loss, rtol=1e-12)
    with pytest.raises(InputError):
        theorem_b_study(loaded, ids, 5.0, ["reversed"], 2, calibration=calibration)


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
    prefixes = layer_prefixes(30, 3)
    assert len(prefixes) == 2 and [int(m[:, 0].sum()) for m in prefixes] == [10, 20] and prefixes[1][:, 1].sum() == 20
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
