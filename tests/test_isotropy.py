"""Paper III, Theorem C: Haar rotations, rotation risk, its exact extremes and variance, noise injectors."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from lqlib.cache.quantized import QuantizeDequantizeCache
from lqlib.ddt import (
    M_TYPES,
    GaussianNoise,
    ScalarBlockQuantizer,
    anisotropy,
    error_moments_for_cache,
    error_second_moments,
    error_shapes,
    extreme_rotations,
    haar_orthogonal,
    isotropic_risk,
    m_variant,
    noise_quantizers,
    plane_rotations,
    range_over_iso,
    relative_risk,
    risk_ratio,
    rotation_extremes,
    rotation_risk,
    rotation_risk_variance,
    rotation_study,
    sampled_rotation_range,
    spectral_rotation_risk,
)
from lqlib.evaluation.capture import capture_kv
from lqlib.evaluation.models import LoadedModel
from lqlib.evaluation.stats import paired_delta_pct


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models run much faster on one thread when the machine is busy."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _psd(d, seed, decay=0.5):
    """A random symmetric PSD matrix with geometrically decaying spectrum (clearly anisotropic)."""
    rng = np.random.default_rng(seed)
    q = haar_orthogonal(d, seed=seed + 1000)
    vals = decay ** np.arange(d) * rng.uniform(0.5, 1.5, d)
    return (q * vals) @ q.T


def test_haar_matrices_are_orthogonal_and_rotation_invariant():
    d, n = 6, 8000
    U = haar_orthogonal(d, n, seed=3)
    assert U.shape == (n, d, d)
    np.testing.assert_allclose(U @ U.transpose(0, 2, 1), np.broadcast_to(np.eye(d), U.shape), atol=1e-12)
    dets = np.linalg.det(U)
    np.testing.assert_allclose(np.abs(dets), 1.0, atol=1e-10)
    assert 0.45 < (dets > 0).mean() < 0.55  # O(d), both components
    # moments of a Haar matrix: E U_ij = 0, E U_ij² = 1/d, E U_ij⁴ = 3/(d(d+2)) for every entry
    sq = U**2
    se2 = math.sqrt((3 / (d * (d + 2)) - 1 / d**2) / n)
    assert np.abs(sq.mean(axis=0) - 1 / d).max() < 5 * se2
    assert np.abs(U.mean(axis=0)).max() < 5 / math.sqrt(d * n)
    assert (sq**2).mean() == pytest.approx(3 / (d * (d + 2)), rel=0.03)
    # invariance: for a fixed A, E tr(AU) = 0 and E tr(AU)² = ‖A‖_F²/d (E U_ij U_kl = δ_ik δ_jl / d)
    A = np.random.default_rng(0).standard_normal((d, d))
    t = np.einsum("ji,nij->n", A, U)
    assert abs(t.mean()) < 5 * math.sqrt((A**2).sum() / d / n)
    assert (t**2).mean() == pytest.approx((A**2).sum() / d, rel=0.06)
    # the sign fix matters: the raw QR factor has a biased first column
    raw = np.linalg.qr(np.random.default_rng(3).standard_normal((n, d, d)))[0]
    assert abs(raw[:, 0, 0].mean()) > 20 / math.sqrt(d * n)
    # seeded
    np.testing.assert_array_equal(haar_orthogonal(d, 3, seed=1), haar_orthogonal(d, 3, seed=1))
    assert haar_orthogonal(d, seed=1).shape == (d, d)


def test_isotropic_error_has_the_same_risk_under_every_rotation():
    d = 16
    M = _psd(d, 0)
    U = haar_orthogonal(d, 200, seed=0)
    s2 = 0.37
    risks = rotation_risk(M, s2 * np.eye(d), U)
    iso = isotropic_risk(M, s2 * np.eye(d))
    assert iso == pytest.approx(s2 * np.trace(M), rel=1e-14)
    np.testing.assert_allclose(risks, iso, rtol=1e-12)
    assert range_over_iso(risks, iso) < 1e-12
    lo, hi = rotation_extremes(M, s2 * np.eye(d))
    assert (hi - lo) / iso < 1e-12
    # and an anisotropic Σ of the same trace does depend on U (uniqueness, on a sample)
    Sigma = _psd(d, 1)
    Sigma *= s2 * d / np.trace(Sigma)
    assert range_over_iso(rotation_risk(M, Sigma, U), iso) > 0.1


def test_spectral_risk_is_the_definition_in_the_eigenbases():
    d = 10
    M, Sigma = _psd(d, 2), _psd(d, 3, decay=0.7)
    U = haar_orthogonal(d, 50, seed=4)
    _, vm = np.linalg.eigh(M)
    _, vs = np.linalg.eigh(Sigma)
    W = vm.T @ U @ vs
    direct = rotation_risk(M, Sigma, U)
    spectral = spectral_rotation_risk(np.linalg.eigvalsh(M), np.linalg.eigvalsh(Sigma), W)
    np.testing.assert_allclose(spectral, direct, rtol=1e-12)
    # tr(M UΣUᵀ) by the plain formula
    plain = np.array([np.trace(M @ u @ Sigma @ u.T) for u in U[:5]])
    np.testing.assert_allclose(direct[:5], plain, rtol=1e-12)
    # batched over leading axes
    both = rotation_risk(np.stack([M, 2 * M]), Sigma, U)
    np.testing.assert_allclose(both[1], 2 * direct, rtol=1e-12)


def test_exact_extremes_bound_the_samples_and_are_reached():
    d = 12
    M = np.stack([_psd(d, 5), _psd(d, 6, decay=0.8)])
    Sigma = np.stack([_psd(d, 7, decay=0.6), _psd(d, 8)])
    lo, hi = rotation_extremes(M, Sigma)
    assert np.all(lo < hi)
    result = sampled_rotation_range(M, Sigma, n_rotations=3000, seed=1, chunk=700)
    assert result.n_rotations == 3000
    np.testing.assert_allclose(result.exact_min, lo, rtol=1e-12)
    np.testing.assert_allclose(result.exact_max, hi, rtol=1e-12)
    assert np.all(result.exact_min <= result.sampled_min + 1e-12)
    assert np.all(result.sampled_max <= result.exact_max + 1e-12)
    assert np.all(result.range_iso < result.exact_range_iso)
    u_min, u_max = extreme_rotations(M, Sigma)
    np.testing.assert_allclose(u_max @ np.swapaxes(u_max, -1, -2), np.broadcast_to(np.eye(d), M.shape), atol=1e-12)
    for i in range(2):
        reached = rotation_risk(M[i], Sigma[i], np.stack([u_min[i], u_max[i]]))
        np.testing.assert_allclose(reached, [lo[i], hi[i]], rtol=1e-12)
    # nothing beats them: local perturbations of the extreme rotations only move inwards
    small = np.stack(
        [np.linalg.qr(np.eye(d) + 0.05 * np.random.default_rng(s).standard_normal((d, d)))[0] for s in range(50)]
    )
    assert rotation_risk(M[0], Sigma[0], u_max[0] @ small).max() <= hi[0] * (1 + 1e-12)
    assert rotation_risk(M[0], Sigma[0], u_min[0] @ small).min() >= lo[0] * (1 - 1e-12)


def test_extremes_in_two_dimensions_by_brute_force():
    """d = 2: every orthogonal U is a rotation or a reflection by an angle; scan them all."""
    M, Sigma = np.array([[3.0, 1.0], [1.0, 1.0]]), np.array([[0.5, -0.2], [-0.2, 2.0]])
    t = np.linspace(0, 2 * np.pi, 20001)
    c, s = np.cos(t), np.sin(t)
    rot = np.stack([np.stack([c, -s], -1), np.stack([s, c], -1)], -2)
    ref = rot @ np.diag([1.0, -1.0])
    risks = rotation_risk(M, Sigma, np.concatenate([rot, ref]))
    lo, hi = rotation_extremes(M, Sigma)
    assert risks.min() == pytest.approx(lo, rel=1e-7)
    assert risks.max() == pytest.approx(hi, rel=1e-7)


def test_haar_mean_is_iso_and_variance_matches_the_closed_form():
    d, n = 5, 40000
    M, Sigma = _psd(d, 9, decay=0.4), _psd(d, 10, decay=0.6)
    risks = rotation_risk(M, Sigma, haar_orthogonal(d, n, seed=11))
    var = rotation_risk_variance(M, Sigma)
    assert risks.mean() == pytest.approx(isotropic_risk(M, Sigma), abs=5 * math.sqrt(var / n))
    assert risks.var() == pytest.approx(var, rel=0.05)
    # 2×2 check by hand: M₀ = Σ₀ = diag(1, −1) gives R = 2cos 2θ (rotations), variance 2
    assert rotation_risk_variance(np.diag([1.0, -1.0]), np.diag([1.0, -1.0])) == pytest.approx(2.0)
    assert rotation_risk_variance(np.eye(4), Sigma[:4, :4]) == pytest.approx(0.0, abs=1e-15)


def test_m_variants():
    d = 16
    M = _psd(d, 12)
    Sigma = _psd(d, 13, decay=0.7)
    variants = {kind: m_variant(M, kind, eps=0.05) for kind in ("actual", "rank-1", "near-isotropic")}
    for V in variants.values():
        assert np.trace(V) == pytest.approx(np.trace(M), rel=1e-12)
        np.testing.assert_allclose(V, V.T, atol=1e-15)
    np.testing.assert_array_equal(variants["actual"], M)
    vals, vecs = np.linalg.eigh(M)
    assert np.linalg.matrix_rank(variants["rank-1"], tol=1e-10 * np.trace(M)) == 1
    np.testing.assert_allclose(variants["rank-1"] @ vecs[:, -1], np.trace(M) * vecs[:, -1], atol=1e-12)
    # near-isotropic: range/iso is exactly eps times the actual one, for the same rotations
    a = sampled_rotation_range(M, Sigma, 500, seed=2)
    n = sampled_rotation_range(variants["near-isotropic"], Sigma, 500, seed=2)
    np.testing.assert_allclose(n.range_iso, 0.05 * a.range_iso, rtol=1e-9)
    np.testing.assert_allclose(n.exact_range_iso, 0.05 * a.exact_range_iso, rtol=1e-9)
    # rank-1: the exact range/iso is d·(μ_max − μ_min)/tr Σ
    r = sampled_rotation_range(variants["rank-1"], Sigma, 10, seed=2)
    mu = np.linalg.eigvalsh(Sigma)
    assert float(r.exact_range_iso) == pytest.approx(d * (mu[-1] - mu[0]) / np.trace(Sigma), rel=1e-10)
    with pytest.raises(ValueError):
        m_variant(M, "rank-2")


def test_error_shapes_and_relative_risk():
    d, k = 16, 4
    M = np.stack([_psd(d, 14), _psd(d, 15)])
    vals = np.linalg.eigvalsh(M)
    for kind in ("isotropic", "top", "bottom", "random"):
        C = error_shapes(M, kind, k=k, seed=1)
        assert C.shape == M.shape
        np.testing.assert_allclose(np.trace(C, axis1=-2, axis2=-1), 1.0, rtol=1e-12)
        assert np.linalg.eigvalsh(C).min() > -1e-12
    np.testing.assert_allclose(relative_risk(M, error_shapes(M, "isotropic")), 1.0, rtol=1e-12)
    top = relative_risk(M, error_shapes(M, "top", k=k))
    bottom = relative_risk(M, error_shapes(M, "bottom", k=k))
    trace = vals.sum(-1)
    np.testing.assert_allclose(top, d * vals[:, -k:].mean(-1) / trace, rtol=1e-10)
    np.testing.assert_allclose(bottom, d * vals[:, :k].mean(-1) / trace, rtol=1e-10)
    assert np.all(bottom < 1) and np.all(top > 1)


def test_gaussian_noise_has_the_requested_covariance():
    d, heads, T, r = 8, 2, 40000, 0.02
    M = np.stack([_psd(d, 16), _psd(d, 17)])
    C = error_shapes(M, "top", k=3)
    x = torch.randn(1, heads, T, d, generator=torch.Generator().manual_seed(0)) * torch.linspace(0.5, 2.0, T)[:, None]
    noise = GaussianNoise(C, r, seed=5)
    out = noise(x)
    assert out.shape == x.shape and out.dtype == x.dtype
    e = (out - x).double()
    norm2 = x.double().square().sum(-1)
    # E[e eᵀ] = r·E‖x‖²·C per head; and the relative MSE is r
    sigma = torch.einsum("bhti,bhtj->hij", e, e).numpy() / T
    expected = r * norm2.mean().item() * C
    for h in range(heads):
        err = np.linalg.norm(sigma[h] - expected[h]) / np.linalg.norm(expected[h])
        assert err < 0.03
    assert (e.square().sum(-1) / norm2).mean().item() == pytest.approx(r, rel=0.02)
    # the error lives in the shape's range: nothing outside the top-3 eigenspace
    _, vecs = np.linalg.eigh(M)
    outside = torch.einsum("bhtd,hdk->bhtk", e, torch.as_tensor(vecs[..., :-3]))
    assert outside.abs().max().item() < 1e-5 * e.abs().max().item()
    # seeded: a fresh instance replays the draws; another seed does not; a second call draws anew
    torch.testing.assert_close(GaussianNoise(C, r, seed=5)(x), out)
    assert not torch.equal(GaussianNoise(C, r, seed=6)(x), out)
    assert not torch.equal(noise(x), out)
    # isotropic shape: covariance r·E‖x‖²·I/d
    e_iso = (GaussianNoise(np.eye(d) / d, r, seed=1)(x) - x).double().reshape(-1, d)
    np.testing.assert_allclose(
        np.cov(e_iso.T.numpy(), bias=True),
        r * norm2.mean().item() * np.eye(d) / d,
        atol=0.03 * r * norm2.mean().item() / d,
    )
    with pytest.raises(ValueError):
        GaussianNoise(2 * C, r)  # not unit trace
    with pytest.raises(ValueError):
        noise(x[0])  # not (batch, heads, T, d)


@pytest.fixture(scope="module")
def tiny():
    """A random GQA Llama (float32): 2 layers, 2 KV heads of dim 16; two windows of 24 tokens."""
    config = LlamaConfig(
        vocab_size=53,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    torch.manual_seed(0)
    return LoadedModel(LlamaForCausalLM(config).eval(), None, "tiny"), torch.randint(0, 53, (2, 24))


def test_plane_rotation_of_an_anisotropic_error():
    """Σ₀ = tr Σ·((1 − α)I/d + α·u uᵀ) rotated from M's top to its bottom eigenvector: the risk/iso is
    (1 − α) + α·d·(cos²θ λ_max + sin²θ λ_min)/tr M, and reaches the exact extremes at 0 and 90°."""
    d, alpha = 12, 0.6
    M = _psd(d, 20)
    vals, vecs = np.linalg.eigh(M)
    top, bottom = vecs[:, -1], vecs[:, 0]
    thetas = np.linspace(0, np.pi, 13)
    U = plane_rotations(top, bottom, thetas)
    np.testing.assert_allclose(U @ U.transpose(0, 2, 1), np.broadcast_to(np.eye(d), U.shape), atol=1e-12)
    np.testing.assert_allclose(U[3] @ top, np.cos(thetas[3]) * top + np.sin(thetas[3]) * bottom, atol=1e-12)
    other = vecs[:, 5]
    np.testing.assert_allclose(U[3] @ other, other, atol=1e-12)  # identity off the plane
    sigma0 = 2.0 * ((1 - alpha) * np.eye(d) / d + alpha * np.outer(top, top))
    ratio = rotation_risk(M, sigma0, U) / isotropic_risk(M, sigma0)
    expected = (1 - alpha) + alpha * d * (np.cos(thetas) ** 2 * vals[-1] + np.sin(thetas) ** 2 * vals[0]) / vals.sum()
    np.testing.assert_allclose(ratio, expected, rtol=1e-12)
    lo, hi = rotation_extremes(M, sigma0)
    iso = isotropic_risk(M, sigma0)
    assert ratio[0] == pytest.approx(hi / iso, rel=1e-12) and ratio[6] == pytest.approx(lo / iso, rel=1e-12)
    with pytest.raises(ValueError):
        plane_rotations(top, top, thetas)


def test_risk_ratio_weights_the_slots():
    d = 8
    M = np.stack([_psd(d, 21), 10 * _psd(d, 22)])
    C = error_shapes(M, "top", k=2)
    per_slot = relative_risk(M, C)
    w = np.array([1.0, 3.0])
    iso = w * np.trace(M, axis1=1, axis2=2) / d
    assert risk_ratio(M, C, w) == pytest.approx((per_slot * iso).sum() / iso.sum(), rel=1e-12)
    assert risk_ratio(M[:1], C[:1]) == pytest.approx(per_slot[0], rel=1e-12)
    assert risk_ratio(M, error_shapes(M, "isotropic"), w) == pytest.approx(1.0, rel=1e-12)


def test_rotation_study_and_error_moments_on_a_model(tiny):
    loaded, ids = tiny
    quantizers = {"scalar": ScalarBlockQuantizer(3.0, block=8), "noise": GaussianNoise(np.eye(16) / 16, 0.01)}
    second = error_second_moments(loaded, ids, quantizers)
    sigmas, norm2 = second.sigma, second.norm2
    assert second.vectors == 2 * 24
    assert sigmas["scalar"].shape == (2, 2, 2, 16, 16) and norm2.shape == (2, 2, 2)
    kvs = [capture_kv(loaded, ids[i : i + 1]) for i in range(2)]
    expected = sum(error_moments_for_cache(kv, quantizers["scalar"]).sigma for kv in kvs) / 2
    np.testing.assert_allclose(sigmas["scalar"], expected, rtol=1e-12)
    keys = torch.stack([kv.keys for kv in kvs]).double()
    np.testing.assert_allclose(norm2[:, 0], keys.square().sum(-1).mean(dim=(0, 3)).numpy(), rtol=1e-10)
    # isotropic noise: trace of Σ is 0.01·E‖x‖² per slot (sampling error ~ 1/√(2·24·16))
    np.testing.assert_allclose(np.trace(sigmas["noise"], axis1=-2, axis2=-1) / norm2, 0.01, rtol=0.2)
    M = np.broadcast_to(_psd(16, 23), sigmas["scalar"].shape)
    study = rotation_study(M, sigmas, eps=0.1, n_rotations=300, seed=4)
    assert set(study) == {(m, s) for m in M_TYPES for s in sigmas}
    np.testing.assert_allclose(
        study[("near-isotropic", "scalar")].range_iso, 0.1 * study[("actual", "scalar")].range_iso, rtol=1e-9
    )
    single = sampled_rotation_range(M, sigmas["noise"], 300, seed=4)
    np.testing.assert_array_equal(study[("actual", "noise")].sampled_max, single.sampled_max)


def test_noise_quantizers_in_the_cache(tiny):
    loaded, ids = tiny
    model, config = loaded.model, loaded.config
    M = np.stack([[[_psd(16, 10 * l + 2 * p + h) for h in range(2)] for p in range(2)] for l in range(2)])

    def nll(cache=None):
        with torch.no_grad():
            logits = model(ids, cache=cache, use_cache=cache is not None).logits
        return F.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none").double().sum(-1).numpy()

    clean = nll()
    for kind in ("isotropic", "top"):
        kq, vq = noise_quantizers(error_shapes(M, kind, k=4), 0.0)
        np.testing.assert_allclose(nll(QuantizeDequantizeCache(kq, config, vq)), clean, rtol=1e-6)
    kq, vq = noise_quantizers(error_shapes(M, "isotropic"), 0.05, seed=3)
    noisy = nll(QuantizeDequantizeCache(kq, config, vq))
    assert np.abs(noisy - clean).max() > 1e-4
    assert [q.seed for q in kq] == [3, 5] and [q.seed for q in vq] == [4, 6]
    kq2, vq2 = noise_quantizers(error_shapes(M, "isotropic"), 0.05, seed=3)
    np.testing.assert_allclose(nll(QuantizeDequantizeCache(kq2, config, vq2)), noisy, rtol=1e-12)

    # the paired bootstrap on these numbers: identity, closed form, interval around the estimate
    tokens = np.full(2, 23)
    same = paired_delta_pct(clean, clean, tokens)
    assert (same.value, same.low, same.high) == (0.0, 0.0, 0.0)
    noisy_ci = paired_delta_pct(noisy, clean, tokens, draws=500)
    assert noisy_ci.value == pytest.approx(100 * math.expm1((noisy - clean).sum() / 46), rel=1e-12)
    assert noisy_ci.low <= noisy_ci.value <= noisy_ci.high


def test_anisotropy_index():
    d, n = 32, 4096
    assert anisotropy(0.3 * np.eye(d)) == pytest.approx(0.0, abs=1e-7)
    mu = np.linspace(1.0, 3.0, d)
    q = haar_orthogonal(d, seed=2)
    assert anisotropy((q * mu) @ q.T) == pytest.approx(mu.std() / mu.mean(), rel=1e-10)
    # sample second moment of n isotropic Gaussian vectors: about √(d/n)
    z = np.random.default_rng(0).standard_normal((n, d))
    assert anisotropy(z.T @ z / n) == pytest.approx(math.sqrt(d / n), rel=0.1)
