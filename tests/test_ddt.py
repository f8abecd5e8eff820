"""Paper III (Directional Distortion Theory): gradients by finite differences, moments, bounds, Theorems A and B."""

import math
import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from lqlib.cache.quantized import QuantizeDequantizeCache
from lqlib.coding.codec import E8Codec
from lqlib.core.scalar import empirical_entropy
from lqlib.ddt import (
    Dithered,
    Permuted,
    ScalarBlockQuantizer,
    bias_drift,
    block_permutation,
    directional_risk,
    error_moments,
    error_moments_for_cache,
    first_order_term,
    gradient_moments,
    hlp_bounds,
    k_path_share,
    kv_gradients,
    loss_change,
    master_identity,
    variance_additivity,
)
from lqlib.evaluation.capture import capture_kv
from lqlib.evaluation.models import LoadedModel


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models run hundreds of times faster on one thread when the machine is busy."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _float64_rms_norm(self, hidden_states):
    """LlamaRMSNorm without its float32 detour, so the whole forward is float64 (smooth to ~1e-16)."""
    variance = hidden_states.pow(2).mean(-1, keepdim=True)
    return self.weight * (hidden_states * torch.rsqrt(variance + self.variance_epsilon))


@pytest.fixture(scope="module")
def tiny():
    """A random GQA Llama: 2 layers, 4 query heads, 2 KV heads of dim 16, all in float64.

    transformers' RMSNorm computes in float32 even in a float64 model; its rounding (~1e-7) would
    swamp finite differences and second-order terms, so this model's norms are patched."""
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


def _summed_nll(model, ids, cache=None) -> float:
    with torch.no_grad():
        logits = model(ids, cache=cache, use_cache=cache is not None).logits
    return float(F.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="sum"))


def _bump(shape, index, delta):
    bump = torch.zeros(shape, dtype=torch.float64)
    bump[index] = delta
    return lambda x: x + bump


def _cache_fd(loaded, ids, layer, path, index, h=1e-4, frozen=None):
    """Central difference of the summed NLL in one element of one layer's cached K (path 0) or V (1).

    ``frozen``: {layer: (keys, values)} replaces those layers' cache writes by fixed tensors."""
    n = loaded.config.num_hidden_layers
    shape = (ids.shape[0], loaded.config.num_key_value_heads, ids.shape[1], 16)
    losses = []
    for delta in (h, -h):
        fns = [[lambda x: x] * n, [lambda x: x] * n]
        for other, (k, v) in (frozen or {}).items():
            fns[0][other], fns[1][other] = (lambda x, k=k: k), (lambda x, v=v: v)
        fns[path][layer] = _bump(shape, index, delta)
        losses.append(_summed_nll(loaded.model, ids, QuantizeDequantizeCache(fns[0], loaded.config, fns[1])))
    return (losses[0] - losses[1]) / (2 * h)


def _indices(rng, count=4, windows=2, heads=2, tokens=24, dim=16):
    """Random (window, head, position, dim) entries, avoiding the last position (its gradient is 0)."""
    return [
        (int(rng.integers(windows)), int(rng.integers(heads)), int(rng.integers(tokens - 1)), int(rng.integers(dim)))
        for _ in range(count)
    ]


@pytest.mark.parametrize("path", [0, 1])
def test_cache_gradients_match_finite_differences(tiny, path):
    loaded, ids = tiny
    grads = kv_gradients(loaded, ids, progress=False)
    assert grads.grad_keys.shape == grads.grad_values.shape == (2, 2, 2, 24, 16)
    g = grads.grad_keys if path == 0 else grads.grad_values
    assert torch.all(g[:, :, :, -1] == 0)  # the last position scores nothing
    rng = np.random.default_rng(path)
    for layer in (0, 1):
        for index in _indices(rng):
            fd = _cache_fd(loaded, ids, layer, path, index)
            assert float(g[(layer, *index)]) == pytest.approx(fd, rel=1e-5, abs=1e-9 * float(g.abs().max()))
    assert grads.nll.sum() == pytest.approx(_summed_nll(loaded.model, ids), rel=1e-12)
    assert list(grads.tokens) == [23, 23]


def test_partial_gradients_hold_the_other_layers_fixed(tiny):
    """downstream=False: layer 0's derivative with layer 1's cache frozen; it differs from the total one."""
    loaded, ids = tiny
    total = kv_gradients(loaded, ids, progress=False)
    partial = kv_gradients(loaded, ids, progress=False, downstream=False)
    frozen = {1: (total.keys[1], total.values[1])}
    rng = np.random.default_rng(7)
    for path, g in ((0, partial.grad_keys), (1, partial.grad_values)):
        for index in _indices(rng, count=3):
            fd = _cache_fd(loaded, ids, 0, path, index, frozen=frozen)
            assert float(g[(0, *index)]) == pytest.approx(fd, rel=1e-5, abs=1e-9 * float(g.abs().max()))
    torch.testing.assert_close(partial.grad_keys[1], total.grad_keys[1], rtol=1e-10, atol=1e-14)  # last layer
    difference = (partial.grad_values[0] - total.grad_values[0]).norm() / total.grad_values[0].norm()
    assert difference > 1e-3


def test_pre_rope_gradients_match_finite_differences(tiny):
    loaded, ids = tiny
    pre = kv_gradients(loaded, ids, pre_rope=True, progress=False)
    post = kv_gradients(loaded, ids, progress=False)
    rng = np.random.default_rng(3)
    for layer in (0, 1):
        k_proj = loaded.model.model.layers[layer].self_attn.k_proj
        for b, head, t, i in _indices(rng, count=3):
            losses = []
            for delta in (1e-4, -1e-4):

                def bump(_module, _inputs, output, where=(b, t, head * 16 + i), delta=delta):
                    output = output.clone()
                    output[where] += delta
                    return output

                handle = k_proj.register_forward_hook(bump)
                try:
                    losses.append(_summed_nll(loaded.model, ids))
                finally:
                    handle.remove()
            fd = (losses[0] - losses[1]) / 2e-4
            assert float(pre.grad_keys[layer, b, head, t, i]) == pytest.approx(fd, rel=1e-5, abs=1e-12)
    # RoPE rotates each key: same gradient norms per vector (to the float32 accuracy of transformers'
    # cos/sin tables), different directions; values untouched
    torch.testing.assert_close(pre.grad_keys.norm(dim=-1), post.grad_keys.norm(dim=-1), rtol=1e-6, atol=1e-14)
    assert (pre.grad_keys - post.grad_keys).norm() > 1e-2 * post.grad_keys.norm()
    torch.testing.assert_close(pre.grad_values, post.grad_values, rtol=1e-12, atol=0)
    layer0 = loaded.model.model.layers[0]
    with torch.no_grad():  # pre-RoPE keys are the k_proj output per head
        k = layer0.self_attn.k_proj(layer0.input_layernorm(loaded.model.model.embed_tokens(ids)))
    torch.testing.assert_close(pre.keys[0], k.view(2, 24, 2, 16).transpose(1, 2), rtol=1e-12, atol=1e-12)


def test_gradient_moments_are_mean_outer_products(tiny):
    loaded, ids = tiny
    grads = kv_gradients(loaded, ids, progress=False)
    moments = gradient_moments(loaded, ids, progress=False)
    M = moments.M
    assert M.shape == (2, 2, 2, 16, 16) and M.dtype == np.float64 and moments.count == 48
    naive = np.zeros_like(M)
    mean = np.zeros(M.shape[:-1])
    for layer in range(2):
        for path, g in enumerate((grads.grad_keys, grads.grad_values)):
            for head in range(2):
                for vector in g[layer, :, head].reshape(-1, 16).numpy():
                    naive[layer, path, head] += np.outer(vector, vector) / 48
                    mean[layer, path, head] += vector / 48
    np.testing.assert_allclose(M, naive, rtol=1e-10, atol=1e-18)
    np.testing.assert_allclose(moments.mean_gradient, mean, rtol=1e-10, atol=1e-18)
    np.testing.assert_array_equal(M, np.swapaxes(M, -1, -2))
    assert np.linalg.eigvalsh(M).min() > -1e-12 * np.abs(M).max()
    batched = gradient_moments(loaded, ids, batch_size=2, progress=False)
    np.testing.assert_allclose(batched.M, M, rtol=1e-9, atol=1e-18)
    assert batched.nll == pytest.approx(_summed_nll(loaded.model, ids), rel=1e-12)
    assert batched.scored_tokens == 46
    pre = gradient_moments(loaded, ids, pre_rope=True, progress=False).M  # RoPE keeps tr M (float32 cos/sin)
    np.testing.assert_allclose(np.trace(pre, axis1=-2, axis2=-1), np.trace(M, axis1=-2, axis2=-1), rtol=1e-6)


def _random_psd(rng, d, rank):
    a = rng.standard_normal((d, rank))
    return a @ a.T


def test_hlp_bounds_hold_and_are_tight():
    rng = np.random.default_rng(0)
    for _trial in range(200):
        d = int(rng.integers(2, 17))
        M, S = _random_psd(rng, d, int(rng.integers(1, d + 1))), _random_psd(rng, d, int(rng.integers(1, d + 1)))
        low, high = hlp_bounds(M, S)
        risk = directional_risk(M, S)
        assert risk == pytest.approx(np.trace(M @ S), rel=1e-12)
        assert low <= risk * (1 + 1e-12) + 1e-12 and risk <= high * (1 + 1e-12)
    M = _random_psd(rng, 8, 8)
    _, vectors = np.linalg.eigh(M)
    for k, bound in ((0, 0), (-1, 1)):
        S = 3.0 * np.outer(vectors[:, k], vectors[:, k])  # Σ along one eigenvector of M
        assert directional_risk(M, S) == pytest.approx(hlp_bounds(M, S)[bound], rel=1e-10)
    stack_M = np.stack([_random_psd(rng, 4, 4) for _ in range(6)]).reshape(2, 3, 4, 4)
    stack_S = np.stack([_random_psd(rng, 4, 2) for _ in range(6)]).reshape(2, 3, 4, 4)
    low, high = hlp_bounds(stack_M, stack_S)
    assert low.shape == high.shape == directional_risk(stack_M, stack_S).shape == (2, 3)
    assert np.all(low <= directional_risk(stack_M, stack_S)) and np.all(directional_risk(stack_M, stack_S) <= high)


def test_k_path_share_and_bias_drift():
    rng = np.random.default_rng(1)
    M = np.stack([_random_psd(rng, 8, 8) for _ in range(2 * 2 * 3)]).reshape(2, 2, 3, 8, 8)
    S = np.broadcast_to(np.eye(8), M.shape).copy()
    risk = np.trace(M, axis1=-2, axis2=-1)
    assert k_path_share(M, S) == pytest.approx(risk[:, 0].sum() / risk.sum(), rel=1e-12)
    S[:, 1] *= 3.0  # V errors 3× larger in power
    assert k_path_share(M, S) == pytest.approx(risk[:, 0].sum() / (risk[:, 0].sum() + 3 * risk[:, 1].sum()))
    assert k_path_share(np.stack([M, M]), np.stack([S, S])).shape == (2,)
    mean = rng.standard_normal(M.shape[:-1]) * 0.3
    S_c = S - mean[..., :, None] * mean[..., None, :]
    drift = bias_drift(M, S, S_c)
    expected = np.einsum("...i,...ij,...j->...", mean, M, mean) / directional_risk(M, S)
    np.testing.assert_allclose(drift, expected, rtol=1e-10)
    total = bias_drift(M, S, S_c, axis=(0, 1, 2))
    assert total == pytest.approx(np.einsum("...i,...ij,...j->...", mean, M, mean).sum() / directional_risk(M, S).sum())
    assert np.all(bias_drift(M, S, S) == 0)


def test_error_moments(tiny):
    loaded, ids = tiny
    x = torch.randn(3, 2, 50, 16, dtype=torch.float64) + 0.5
    codec = E8Codec(3.0)
    moments = error_moments(x, codec)
    sigma, sigma_c, mean = moments.sigma, moments.sigma_c, moments.mean
    e = (codec.quantize(x) - x).numpy()
    assert sigma.shape == sigma_c.shape == (3, 2, 16, 16) and mean.shape == (3, 2, 16)
    np.testing.assert_allclose(sigma[1, 0], e[1, 0].T @ e[1, 0] / 50, rtol=1e-12)
    np.testing.assert_allclose(mean, e.mean(axis=-2), rtol=1e-12)
    np.testing.assert_allclose(sigma - sigma_c, mean[..., :, None] * mean[..., None, :], rtol=1e-12, atol=1e-18)
    assert np.linalg.eigvalsh(sigma_c).min() > -1e-14
    kv = capture_kv(loaded, ids[:1])
    coarse, fine = ScalarBlockQuantizer(3), ScalarBlockQuantizer(6)
    cached = error_moments_for_cache(kv, [coarse, fine], fine)
    S, S_c, m = cached.sigma, cached.sigma_c, cached.mean
    assert S.shape == S_c.shape == (2, 2, 2, 16, 16) and m.shape == (2, 2, 2, 16)
    np.testing.assert_allclose(S[0, 0], error_moments(kv.keys[0][None], coarse).sigma[0], rtol=1e-12)
    mse = np.trace(S, axis1=-2, axis2=-1) / 16
    assert mse[0, 0].mean() / mse[1, 0].mean() > 20  # 3 bits against 6 bits on the keys


def test_scalar_block_quantizer_scales_with_the_bit_width():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(4096, 64, generator=generator, dtype=torch.float64)
    mse = {b: float((ScalarBlockQuantizer(b)(x) - x).square().mean()) for b in range(3, 9)}
    for b in range(3, 8):
        assert mse[b] / mse[b + 1] == pytest.approx(4.0, rel=0.1), b
    for b in range(4, 9):  # Δ²/12 with Δ = sqrt(2πe)·rms·2^(−b): (πe/6)·E[ms]·4^(−b), E[ms] = 1
        assert mse[b] == pytest.approx(math.pi * math.e / 6 * 4.0**-b, rel=0.05), b
        entropy = empirical_entropy(ScalarBlockQuantizer(b).symbols(x).numpy())
        assert entropy == pytest.approx(b, abs=0.1), b  # the rate is about b bits/dim
    q = ScalarBlockQuantizer(5)
    blocks = x[:3].reshape(3, 8, 8)
    expected = math.sqrt(2 * math.pi * math.e) * blocks.square().mean(-1, keepdim=True).sqrt() / 32
    torch.testing.assert_close(q.step(x[:3]), expected.expand_as(blocks).reshape(3, 64), rtol=1e-14, atol=0)
    assert torch.all(ScalarBlockQuantizer(4)(torch.zeros(2, 16)) == 0)
    assert ScalarBlockQuantizer(4)(x.float()).dtype == torch.float32


def test_permutations_are_applied_and_undone_exactly():
    generator = torch.Generator().manual_seed(1)
    scales = torch.logspace(-1, 1, 32, dtype=torch.float64)
    x = torch.randn(2000, 32, generator=generator, dtype=torch.float64) * scales
    for kind in ("identity", "sorted", "random"):
        perm = block_permutation(kind, 32, sample=x, seed=2)
        assert torch.equal(torch.sort(perm).values, torch.arange(32))
        q = ScalarBlockQuantizer(4, permutation=perm)
        inverse = torch.argsort(perm)
        assert torch.equal(q(x), ScalarBlockQuantizer(4)(x[:, perm])[:, inverse])
        assert torch.equal(Permuted(ScalarBlockQuantizer(4), perm)(x), q(x))
    assert torch.equal(block_permutation("sorted", 32, sample=x), torch.arange(31, -1, -1))
    assert torch.equal(block_permutation("random", 32, seed=5), block_permutation("random", 32, seed=5))
    identity = ScalarBlockQuantizer(4)(x)
    assert torch.equal(ScalarBlockQuantizer(4, permutation=torch.arange(32))(x), identity)
    random = ScalarBlockQuantizer(4, permutation=block_permutation("random", 32, seed=2))(x)
    assert not torch.equal(random, identity)  # other dims share a step
    inside = torch.cat([torch.randperm(8, generator=generator) + 8 * k for k in range(4)])
    # same blocks, same steps (up to the summation order of the block's mean square)
    torch.testing.assert_close(ScalarBlockQuantizer(4, permutation=inside)(x), identity, rtol=1e-12, atol=1e-12)
    e8 = E8Codec(4.0, rotation="none")  # E8 is closed under coordinate permutations
    torch.testing.assert_close(Permuted(e8, inside)(x), e8.quantize(x), rtol=1e-12, atol=1e-12)
    assert not torch.allclose(Permuted(e8, block_permutation("random", 32, seed=2))(x), e8.quantize(x))
    with pytest.raises(ValueError):
        ScalarBlockQuantizer(4, permutation=[0, 0, 1])
    with pytest.raises(ValueError):
        ScalarBlockQuantizer(4, permutation=torch.arange(16))(x)


def test_crypto_lemma():
    """Subtractive dither: error uniform on [−Δ/2, Δ/2), mean 0, variance Δ²/12, uncorrelated with x —
    even for an input whose plain rounding error is a deterministic function of it."""
    n, step = 200_000, 0.1
    generator = torch.Generator().manual_seed(3)
    offsets = torch.randint(-5, 5, (n,), generator=generator).double()
    x = (offsets + 0.4 * torch.rand(n, generator=generator, dtype=torch.float64)) * step
    e = Dithered(step, seed=4)(x) - x
    assert float(e.min()) >= -step / 2 - 1e-12 and float(e.max()) <= step / 2 + 1e-12
    se = step / math.sqrt(12 * n)
    assert abs(float(e.mean())) < 5 * se
    assert float(e.var()) == pytest.approx(step**2 / 12, rel=5 * math.sqrt(0.8 / n))
    quantiles = torch.quantile(e[:100_000] / step, torch.linspace(0.05, 0.95, 19, dtype=torch.float64))
    torch.testing.assert_close(quantiles, torch.linspace(-0.45, 0.45, 19, dtype=torch.float64), atol=0.01, rtol=0)
    assert abs(float(torch.corrcoef(torch.stack([x, e]))[0, 1])) < 5 / math.sqrt(n)
    plain = torch.round(x / step) * step - x  # no dither: e = −(x mod Δ), fully correlated
    assert float(torch.corrcoef(torch.stack([x - torch.round(x / step) * step, plain]))[0, 1]) < -0.99
    # per-vector steps from the bit width: e/Δ is uniform whatever the scale
    y = torch.randn(20_000, 16, generator=generator, dtype=torch.float64) * torch.logspace(-2, 2, 16)
    dithered = Dithered(ScalarBlockQuantizer(3, block=16).step, seed=5)
    ratio = (dithered(y) - y) / ScalarBlockQuantizer(3, block=16).step(y)
    assert float(ratio.abs().max()) <= 0.5 + 1e-9
    assert float(ratio.square().mean()) == pytest.approx(1 / 12, rel=0.02)
    assert torch.equal(dithered(y), dithered(y)) and not torch.equal(Dithered(0.1, 1)(y), Dithered(0.1, 2)(y))


def test_variance_additivity_under_dither_and_its_failure_without():
    """Theorem B on synthetic parts: dithered errors add up in variance, correlated rounding errors do not."""
    rng = np.random.default_rng(0)
    draws, parts, d = 20_000, 12, 8
    g = rng.standard_normal((parts, d)) * rng.uniform(0.2, 2.0, (parts, 1))
    step = rng.uniform(0.05, 0.5, (parts, 1))
    x = torch.as_tensor(np.broadcast_to(rng.standard_normal((parts, d)), (draws, parts, d)).copy())
    steps = torch.as_tensor(np.broadcast_to(step, x.shape).copy())
    e = Dithered(lambda _x: steps, seed=1)(x) - x  # same inputs, independent dither per draw
    result = variance_additivity(g, e.numpy(), step)
    assert result.pos_add == pytest.approx(1.0, abs=0.06)
    assert result.pred == pytest.approx(1.0, abs=0.06)
    assert result.analytic == pytest.approx(float((g**2 * step**2 / 12).sum()), rel=1e-12)
    # no dither, every part gets the same input (and gradient): the errors are perfectly correlated
    same = torch.as_tensor(np.broadcast_to(rng.standard_normal((draws, 1, d)), (draws, parts, d)).copy())
    rounding = (torch.round(same / 0.3) * 0.3 - same).numpy()
    bad = variance_additivity(np.ones((parts, d)), rounding, 0.3)
    assert bad.pos_add > 0.8 * parts
    assert bad.pred > 0.8 * parts


def test_first_order_term_predicts_the_loss_change(tiny):
    """Theorem A: Q1 is ΔL's first-order term — ΔL ≈ Q1 for small errors, the odd part of ΔL equals Q1 to
    third order and ΔL − Q1 is the even (second-order) part."""
    loaded, ids = tiny
    small = master_identity(loaded, ids, E8Codec(10.0), progress=False)
    assert abs(small.delta_loss - small.q1) < 0.02 * abs(small.q1)
    assert small.q1 == pytest.approx(small.odd, rel=1e-5)
    assert loss_change(loaded, ids, E8Codec(10.0), progress=False) == pytest.approx(small.delta_loss, rel=1e-9)
    assert first_order_term(loaded, ids, E8Codec(10.0), progress=False) == pytest.approx(small.q1, rel=1e-12)
    mid = master_identity(loaded, ids, E8Codec(6.0), progress=False)
    assert mid.q1 == pytest.approx(mid.odd, rel=2e-3)
    remainder = mid.delta_loss - mid.q1
    assert remainder == pytest.approx(mid.even, rel=0.1)
    assert abs(remainder) < 0.1 * abs(mid.q1)
    # a dithered quantizer with a tiny step, other seeds per layer
    tiny_steps = [Dithered(1e-5, seed=s) for s in (1, 2)]
    dithered = master_identity(loaded, ids, tiny_steps, [Dithered(1e-5, seed=s) for s in (3, 4)], progress=False)
    assert abs(dithered.delta_loss - dithered.q1) < 1e-3 * abs(dithered.q1)


def test_clean_errors_are_exact_for_layer_zero_only(tiny):
    """With only layer 0 quantized, the clean cache's errors are the injected ones; with later layers too,
    those layers' quantizers see inputs moved by earlier errors and the clean errors miss it."""
    loaded, ids = tiny
    codec = E8Codec(6.0)
    first = master_identity(loaded, ids, [codec, lambda x: x], progress=False)
    assert first.q1_clean == pytest.approx(first.q1, rel=1e-12)
    assert first_order_term(loaded, ids, [codec, lambda x: x], errors="clean", progress=False) == pytest.approx(
        first.q1, rel=1e-12
    )
    both = master_identity(loaded, ids, codec, progress=False)
    assert abs(both.q1_clean - both.q1) > 0.05 * abs(both.q1)
    with pytest.raises(ValueError):
        first_order_term(loaded, ids, codec, errors="mirror", progress=False)


def test_labels_follow_the_perplexity_protocol(tiny):
    """With context-only tokens (labels −100) the summed NLL is the perplexity harness's; context tokens'
    keys and values still get gradients through the scored queries."""
    from lqlib.evaluation.perplexity import perplexity

    loaded, ids = tiny
    labels = ids.clone()
    labels[:, :12] = -100
    grads = kv_gradients(loaded, ids, progress=False, labels=labels, batch_size=2)
    reference = perplexity(loaded.model, ids, labels, progress=False)
    assert grads.nll.sum() == pytest.approx(reference.nll, rel=1e-6)  # the harness scores in float32
    assert list(grads.tokens) == list(reference.window_tokens) == [12, 12]
    moments = gradient_moments(loaded, ids, progress=False, labels=labels)
    assert moments.scored_tokens == 24 and moments.nll == pytest.approx(grads.nll.sum(), rel=1e-12)
    # queries before position 11 score nothing, but their keys and values feed later queries
    assert float(grads.grad_values[:, :, :, :11].abs().min(dim=-1).values.max()) > 0
    assert torch.all(grads.grad_values[:, :, :, -1] == 0)
