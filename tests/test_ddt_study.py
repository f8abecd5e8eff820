"""Paper III, Theorem A over many configurations: predictor_study against the one-configuration tools."""

import types

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from lqlib.coding.codec import E8Codec
from lqlib.ddt import (
    Dithered,
    ScalarBlockQuantizer,
    bias_drift,
    block_permutation,
    directional_risk,
    error_moments_for_cache,
    first_order_term,
    gradient_moments,
    k_path_share,
    kv_gradients,
    loss_change,
    master_identity,
    predictor_study,
    theorem_a_configurations,
)
from lqlib.evaluation.capture import capture_kv
from lqlib.evaluation.models import LoadedModel
from tests.test_ddt import _float64_rms_norm


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models run far faster on one thread when the machine is busy."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def tiny():
    """The random float64 GQA Llama of tests/test_ddt.py (2 layers, 2 KV heads of dim 16), 2 windows of 24."""
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


def _configs():
    """Keys and values of three configurations of the 2-layer tiny model: one quantizer everywhere, a
    per-layer schedule, and other quantizers for the values than for the keys."""
    scalar = ScalarBlockQuantizer(4, block=8, permutation=block_permutation("random", 16, seed=1))
    keys = [E8Codec(5.0), [ScalarBlockQuantizer(3, block=16), E8Codec(4.0, rotation="none")], E8Codec(4.0, seed=3)]
    values = [None, [E8Codec(6.0), scalar], ScalarBlockQuantizer(3, block=8)]
    return keys, values


def _recorder(quantizer, store, key):
    """The quantizer, also appending the error it injects (in-loop) to ``store[key]``."""
    q = quantizer.quantize if hasattr(quantizer, "quantize") else quantizer

    def write(x):
        out = q(x)
        store.setdefault(key, []).append((out - x).detach())
        return out

    return write


def _per_layer(config, n=2):
    return list(config) if isinstance(config, list) else [config] * n


def test_study_agrees_with_the_one_configuration_tools(tiny):
    """ΔL, Q1 and the mirror pass equal loss_change / first_order_term / master_identity of each configuration;
    the moments are those of the errors the quantized pass really injects; the risks follow from them."""
    loaded, ids = tiny
    keys, values = _configs()
    study = predictor_study(loaded, ids, keys, values, mirror=True, keep_sigma=True, progress=False)
    moments = gradient_moments(loaded, ids, progress=False)
    np.testing.assert_allclose(study.M, moments.M, rtol=1e-12, atol=0)
    assert study.count == 48 and study.scored_tokens == 46
    assert study.nll == pytest.approx(moments.nll, rel=1e-12)
    grads = kv_gradients(loaded, ids, progress=False)
    rows = study.rows()
    assert [row["config"] for row in rows] == [0, 1, 2]
    for c, (k, v) in enumerate(zip(keys, values)):
        assert study.delta_loss[c] == pytest.approx(loss_change(loaded, ids, k, v, progress=False), rel=1e-10)
        assert study.q1[c] == pytest.approx(first_order_term(loaded, ids, k, v, progress=False), rel=1e-10)
        mi = master_identity(loaded, ids, k, v, progress=False)
        assert study.delta_loss_mirror[c] == pytest.approx(mi.delta_loss_mirror, rel=1e-10)
        assert study.odd[c] == pytest.approx(mi.odd, rel=1e-9) and study.even[c] == pytest.approx(mi.even, rel=1e-9)
        assert rows[c]["q1"] == study.q1[c] and rows[c]["delta_loss"] == study.delta_loss[c]

        # a second implementation of the moments: record the injected errors window by window
        store = {}
        kq = [_recorder(q, store, (i, 0)) for i, q in enumerate(_per_layer(k))]
        vq = [_recorder(q, store, (i, 1)) for i, q in enumerate(_per_layer(k if v is None else v))]
        loss_change(loaded, ids, kq, vq, progress=False)
        sigma = np.zeros(study.sigma.shape[1:])
        mean = np.zeros(study.mean_error.shape[1:])
        q1 = np.zeros(study.slot_q1.shape[1:])
        for (layer, path), chunks in store.items():
            e = torch.cat(chunks).numpy()  # (windows, heads, T, d)
            g = (grads.grad_keys if path == 0 else grads.grad_values)[layer].numpy()
            for head in range(2):
                flat = e[:, head].reshape(-1, 16)
                sigma[layer, path, head] = flat.T @ flat / 48
                mean[layer, path, head] = flat.mean(axis=0)
                q1[layer, path, head] = (g[:, head] * e[:, head]).sum()
        np.testing.assert_allclose(study.sigma[c], sigma, rtol=1e-10, atol=1e-14 * np.abs(sigma).max())
        np.testing.assert_allclose(study.mean_error[c], mean, rtol=1e-9, atol=1e-14)
        np.testing.assert_allclose(study.slot_q1[c], q1, rtol=1e-7, atol=1e-12 * np.abs(q1).max())
        assert study.slot_q1[c].sum() == pytest.approx(study.q1[c], rel=1e-12)
        sigma_c = sigma - mean[..., :, None] * mean[..., None, :]
        M = moments.M
        np.testing.assert_allclose(study.slot_trace[c], np.trace(sigma, axis1=-2, axis2=-1), rtol=1e-10)
        np.testing.assert_allclose(study.slot_risk[c], directional_risk(M, sigma), rtol=1e-9)
        np.testing.assert_allclose(study.slot_risk_centred[c], directional_risk(M, sigma_c), rtol=1e-8)
        assert study.risk[c] == pytest.approx(48 * directional_risk(M, sigma).sum(), rel=1e-9)
        assert study.mse[c] == pytest.approx(np.trace(sigma, axis1=-2, axis2=-1).mean() / 16, rel=1e-10)
        assert study.k_path_share[c] == pytest.approx(float(k_path_share(M, sigma)), rel=1e-9)
        assert study.bias_drift[c] == pytest.approx(float(bias_drift(M, sigma, sigma_c, axis=(0, 1, 2))), rel=1e-7)
    assert len({round(float(s), 6) for s in study.k_path_share}) == 3  # the configurations differ


def test_study_batches_and_layer_zero(tiny):
    """Batches of windows change nothing; with only layer 0 quantized the injected errors are the clean
    cache's, so Σ equals the captured cache's error moments; without the options nothing extra is kept."""
    loaded, ids = tiny
    codec = E8Codec(4.0)
    identity = lambda x: x  # noqa: E731
    configs = [[codec, identity], codec]
    one = predictor_study(loaded, ids, configs, keep_sigma=True, progress=False)
    two = predictor_study(loaded, ids, configs, keep_sigma=True, batch_size=2, progress=False)
    np.testing.assert_allclose(two.delta_loss, one.delta_loss, rtol=1e-9)
    np.testing.assert_allclose(two.q1, one.q1, rtol=1e-9)
    np.testing.assert_allclose(two.sigma, one.sigma, rtol=1e-9, atol=1e-15)
    np.testing.assert_allclose(two.slot_risk, one.slot_risk, rtol=1e-9, atol=1e-18)
    sigma = np.mean([error_moments_for_cache(capture_kv(loaded, ids[w : w + 1]), codec).sigma for w in (0, 1)], axis=0)
    np.testing.assert_allclose(one.sigma[0, 0], sigma[0], rtol=0, atol=1e-5 * np.abs(sigma[0]).max())  # float32 capture
    assert np.all(one.sigma[0, 1] == 0) and np.all(one.slot_risk[0, 1] == 0)
    assert one.slot_trace[1, 1].min() > 0
    plain = predictor_study(loaded, ids, configs, progress=False)
    assert plain.sigma is None and plain.delta_loss_mirror is None and plain.odd is None
    assert set(plain.rows()[0]) == {"config", "delta_loss", "q1", "risk", "mse", "k_path_share", "bias_drift"}


def test_risk_is_the_variance_of_q1_under_independent_dither(tiny):
    """Units of the risk: with subtractive dither (errors independent of everything, independent across
    slots and elements), E[Q1²] = Σ_t ‖g_t‖² Δ²/12, and N·Σ tr(MΣ) estimates the same sum."""
    loaded, ids = tiny
    step, n = 0.05, 300
    keys = [[Dithered(step, seed=4 * c), Dithered(step, seed=4 * c + 1)] for c in range(n)]
    values = [[Dithered(step, seed=4 * c + 2), Dithered(step, seed=4 * c + 3)] for c in range(n)]
    study = predictor_study(loaded, ids, keys, values, batch_size=2, progress=False)  # one batch: fresh dither
    grads = kv_gradients(loaded, ids, progress=False)
    analytic = float((grads.grad_keys.square().sum() + grads.grad_values.square().sum()) * step**2 / 12)
    assert study.risk.mean() == pytest.approx(analytic, rel=0.02)
    assert np.mean(study.q1**2) == pytest.approx(analytic, rel=0.3)  # 300 draws: ±8% s.e.
    assert abs(study.q1.mean()) < 4 * np.sqrt(analytic / n)
    assert study.mse.mean() == pytest.approx(step**2 / 12, rel=0.02)


def test_study_rejects_bad_configurations(tiny):
    loaded, ids = tiny
    with pytest.raises(ValueError):
        predictor_study(loaded, ids, [], progress=False)
    with pytest.raises(ValueError):
        predictor_study(loaded, ids, [E8Codec(4.0)], [None, None], progress=False)
    with pytest.raises(ValueError):
        predictor_study(loaded, ids, [[E8Codec(4.0)] * 3], progress=False)


def test_mirror_for_some_configurations_only(tiny):
    loaded, ids = tiny
    configs = [E8Codec(5.0), ScalarBlockQuantizer(4, block=8)]
    study = predictor_study(loaded, ids, configs, mirror=[False, True], progress=False)
    full = predictor_study(loaded, ids, configs, mirror=True, progress=False)
    assert np.isnan(study.delta_loss_mirror[0]) and np.isnan(study.odd[0]) and np.isnan(study.rows()[0]["even"])
    assert study.delta_loss_mirror[1] == full.delta_loss_mirror[1]
    np.testing.assert_array_equal(study.delta_loss, full.delta_loss)
    with pytest.raises(ValueError):
        predictor_study(loaded, ids, configs, mirror=[True], progress=False)


def test_theorem_a_configurations():
    """50 configurations in four families at one bit width; same nominal rate (MSE ∝ 4^−b), other errors."""
    from lqlib.evaluation.capture import KVSample

    generator = torch.Generator().manual_seed(0)
    scales = torch.logspace(-1, 1, 64)[torch.randperm(64, generator=generator)]
    keys = torch.randn(2, 3, 256, 64, generator=generator) * scales
    sample = KVSample(keys, torch.randn(2, 3, 256, 64, generator=generator), "synthetic")
    configs = {b: theorem_a_configurations(b, sample) for b in (4.0, 5.0)}
    four = configs[4.0]
    assert len(four) == 50 and len({c["name"] for c in four}) == 50
    families = [c["family"] for c in four]
    assert [families.count(f) for f in ("E8 + RHT", "E8, permuted", "scalar block", "per-layer mix")] == [
        12,
        12,
        13,
        13,
    ]
    assert all(len(c["keys"]) == len(c["values"]) == 2 for c in four)
    x = keys[:1, :, :, :]  # (1, heads, T, d) like one cache write
    outputs = []
    for c4, c5 in zip(four, configs[5.0]):
        e4 = c4["keys"][0](x) - x if callable(c4["keys"][0]) else c4["keys"][0].quantize(x) - x
        e5 = c5["keys"][0](x) - x if callable(c5["keys"][0]) else c5["keys"][0].quantize(x) - x
        assert e4.shape == x.shape
        assert 2.5 < float(e4.square().mean() / e5.square().mean()) < 6.5, c4["name"]  # about 4 per bit
        outputs.append(e4)
    distinct = {tuple(np.round(e.flatten()[:256].numpy(), 6)) for e in outputs[:37]}
    assert len(distinct) == 37  # the non-mixed members all err differently
    mixes = {tuple(id(q) for q in c["keys"] + c["values"]) for c in four[37:]}
    assert len(mixes) == 13  # each mixture its own slot assignment
    sorted_e8 = next(c for c in four if c["name"] == "E8 sorted")
    assert torch.equal(sorted_e8["keys"][1].permutation, block_permutation("sorted", 64, keys[1]))
    assert torch.equal(sorted_e8["values"][0].permutation, block_permutation("sorted", 64, sample.values[0]))
    with pytest.raises(ValueError):
        theorem_a_configurations(4.0, KVSample(keys[..., :16], keys[..., :16], "small"))
