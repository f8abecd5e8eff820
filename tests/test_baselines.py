"""Baseline KV quantizers: their rates against their formats, their distortions against closed forms."""

import math

import pytest
import torch

from lqlib.cache.compressed import CompressedKVCache
from lqlib.core.theory import entropy_coded_gap
from lqlib.evaluation.baselines import (
    E8Entropy,
    E8FixedRate,
    IntPerToken,
    KiviStyle,
    TurboQuantStyle,
    _gaussian_codebook,
    standard_methods,
)
from lqlib.evaluation.capture import capture_kv
from lqlib.evaluation.corpus import load_corpus
from lqlib.evaluation.harness import (
    compare_methods,
    compressed_cache_rate,
    e8_bits_for_rate,
    hf_quantized_cache,
    method_specs,
    tensor_nbytes,
)
from lqlib.evaluation.perplexity import token_windows


@pytest.fixture(scope="module")
def x():
    return torch.randn(2, 3, 256, 64, generator=torch.Generator().manual_seed(0))


def rel_mse(method, x):
    return ((method.quantize(x) - x).square().mean() / x.square().mean()).item()


@pytest.mark.slow
def test_shapes_dtypes_and_rates(x):
    for bits in (3, 4, 5):
        for _, _, key, value in standard_methods(bits):
            for method in (key, value):
                y = method.quantize(x)
                assert y.shape == x.shape and y.dtype == x.dtype and torch.isfinite(y).all()
    assert IntPerToken(4).bits_per_dim(x) == 4 + 32 / 64
    assert TurboQuantStyle(4).bits_per_dim(x) == 4 + 16 / 64
    assert E8FixedRate(4).bits_per_dim(x) == 4 + 2 / 8 + 16 / 64
    # KIVI: keys quantized in whole groups of 32 outside the 32-token window, the rest in fp16
    kivi = KiviStyle(2, group=32, residual=32, is_key=True)
    assert kivi.bits_per_dim(x) == pytest.approx((224 * (2 + 1) + 32 * 16) / 256)
    assert torch.equal(kivi.quantize(x)[..., 224:, :], x[..., 224:, :])


def test_distortions_follow_theory(x):
    # uniform b-bit quantizer on each vector's range: MSE = step²/12 with step = (max − min)/(2^b − 1)
    step = (x.amax(-1) - x.amin(-1)) / 15
    assert rel_mse(IntPerToken(4), x) == pytest.approx(
        (step.square() / 12).mean().item() / x.square().mean().item(), rel=0.05
    )
    # TurboQuant-style = Lloyd-Max on ~Gaussian coordinates: its known 4-bit distortion 0.009497
    assert rel_mse(TurboQuantStyle(4), x) == pytest.approx(0.009497, rel=0.06)
    # E8 + EC: 2πe·G(E8)·4^-b relative to the second moment
    assert rel_mse(E8Entropy(4), x) == pytest.approx(entropy_coded_gap("E8") * 4.0**-4, rel=0.03)
    # at about the same total rate (4.25 bits/dim) E8 + EC has at most ~0.55x TurboQuant-style's MSE
    assert rel_mse(E8Entropy(4), x) < 0.55 * rel_mse(TurboQuantStyle(4), x)
    levels = _gaussian_codebook(1)
    assert levels == pytest.approx([-math.sqrt(2 / math.pi), math.sqrt(2 / math.pi)], abs=2e-3)


def test_e8_fixed_rate_stays_in_its_codebook(x):
    q = E8FixedRate(3).quantize(x)
    assert torch.isfinite(q).all()
    assert rel_mse(E8FixedRate(5), x) < rel_mse(E8FixedRate(4), x) < rel_mse(E8FixedRate(3), x)


def test_tensor_nbytes_unpacks_subclasses():
    assert tensor_nbytes(torch.zeros(3, 4)) == 48
    assert tensor_nbytes(torch.zeros(0)) == 0 and tensor_nbytes(None) == 0


@pytest.mark.model
def test_harness_on_the_default_model(default_model):
    ids, labels = token_windows(default_model.tokenizer, load_corpus().text, window=128, max_windows=2)
    kv = capture_kv(default_model, ids[:1])
    specs = [spec for spec in method_specs(4) if "TurboQuant" in spec.label or spec.label == "E8 + EC 4"]
    specs.append(hf_quantized_cache(4))
    rows = compare_methods(default_model, specs, ids, labels, kv, progress=False)
    by = {r["method"]: r for r in rows}
    assert by["full precision"]["delta_pct"] == 0.0 and all(r["tokens"] == 2 * 127 for r in rows)
    assert all(
        len(r["window_nll"]) == 2
        and sum(r["window_nll"]) == pytest.approx(r["ppl"] and math.log(r["ppl"]) * r["tokens"], rel=1e-9)
        for r in rows
    )
    # E8 + EC's rate is the real cache's: 4 bits + step codes + page headers (the cache in a forward
    # pass holds slightly different K/V past layer 0, since attention there reads quantized history)
    cache = CompressedKVCache(default_model.config, 4.0)
    with torch.no_grad():
        default_model.model(ids[:1], cache=cache, use_cache=True)
    assert by["E8 + EC 4"]["bits_per_dim"] == pytest.approx(8 * cache.nbytes() / (2 * kv.keys.numel()), rel=1e-3)
    assert 4.0 < by["E8 + EC 4"]["bits_per_dim"] < 4.12
    assert by["HF QuantizedCache quanto int4"]["bits_per_dim"] == pytest.approx(5.0, abs=0.01)
    assert by["E8 + EC 4"]["mse_k"] < by["TurboQuant-style 4"]["mse_k"]


@pytest.mark.model
def test_e8_bits_for_a_target_rate(default_model):
    ids, _ = token_windows(default_model.tokenizer, load_corpus().text, window=128, max_windows=1)
    kv = capture_kv(default_model, ids)
    b = e8_bits_for_rate(4.25, kv)
    assert compressed_cache_rate(kv, b) == pytest.approx(4.25, abs=0.002) and 4.1 < b < 4.25
    assert compressed_cache_rate(kv, 3.0) < compressed_cache_rate(kv, 3.5) < compressed_cache_rate(kv, 4.0)
