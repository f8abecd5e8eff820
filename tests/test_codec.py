"""The E8 codec: exact lossless round trips, rates and gaps against closed forms, input checks."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import lqlib
from lqlib import E8Codec, Encoded
from lqlib.book.paper1 import table3_rows
from lqlib.book.paper_values import TABLE3_CODED_RATE
from lqlib.coding.codec import supported_rms
from lqlib.coding.entropy_model import gaussian_symbol_model
from lqlib.core.lattices import nearest_e8
from lqlib.core.steps import step_values
from lqlib.core.symbols import points_to_symbols
from lqlib.core.theory import entropy_coded_gap
from lqlib.evaluation.rate_distortion import gaussian_validation
from tests.conftest import DEVICES

CONFIGS = [(rot, sc) for rot in ("none", "rht") for sc in ("vector", "tensor")]


def round_trip(codec: E8Codec, x: torch.Tensor) -> torch.Tensor:
    return codec.decode(Encoded.from_bytes(codec.encode(x).to_bytes()), device=x.device)


@pytest.mark.parametrize("rotation,scale", CONFIGS)
@pytest.mark.parametrize("device", DEVICES)
def test_decode_equals_quantize_exactly(rotation, scale, device):
    codec = E8Codec(4.0, rotation=rotation, scale=scale, seed=11)
    x = torch.randn(3, 40, 64, device=device) * torch.logspace(-2, 2, 40, device=device)[:, None]
    y = round_trip(codec, x)
    q = codec.quantize(x)
    assert y.shape == x.shape and y.dtype == x.dtype and y.device == x.device
    assert torch.equal(y, q)


@settings(max_examples=40, deadline=None)
@given(
    lead=st.lists(st.integers(0, 6), min_size=0, max_size=3),
    d=st.sampled_from([8, 16, 64, 128]),
    bits=st.floats(0.5, 10.0),
    scale=st.floats(1e-3, 1e3),
    rotation=st.sampled_from(["none", "rht"]),
    granularity=st.sampled_from(["vector", "tensor"]),
    dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16, torch.float64]),
    seed=st.integers(0, 2**32 - 1),
)
def test_round_trip_property(lead, d, bits, scale, rotation, granularity, dtype, seed):
    gen = torch.Generator().manual_seed(seed % 2**31)
    x = (torch.randn(*lead, d, generator=gen, dtype=torch.float64) * scale).to(dtype)
    codec = E8Codec(bits, rotation=rotation, scale=granularity, seed=seed)
    enc = codec.encode(x)
    data = enc.to_bytes()
    assert len(data) == enc.nbytes()
    assert codec.bits_per_dim(enc) == 8 * len(data) / max(x.numel(), 1)
    y = codec.decode(Encoded.from_bytes(data))
    assert y.dtype == dtype and y.shape == x.shape
    assert torch.equal(y, codec.quantize(x))


@pytest.mark.parametrize("bits", [2.0, 4.0, 6.0])
def test_gaussian_gap_and_rate_on_small_sample(bits):
    x = torch.randn(100_000, 8, generator=torch.Generator().manual_seed(0))
    codec = E8Codec(bits, rotation="none", scale="tensor")
    enc = codec.encode(x)
    y = codec.decode(enc)
    gap = (y - x).double().square().mean().item() / (x.double().square().mean().item() * 4.0**-bits)
    assert gap == pytest.approx(entropy_coded_gap("E8"), rel=0.01)
    assert codec.bits_per_dim(enc) == pytest.approx(TABLE3_CODED_RATE[bits], rel=0.015)


@pytest.mark.slow
def test_gaussian_validation_acceptance():
    """Paper I, Table 3 on 10^6 blocks: gap within 0.5% of 2πe·G(E8), rate within 1.5% of the paper's."""
    rows = table3_rows(gaussian_validation(n_blocks=1_000_000, progress=False))
    assert [r["target_bits"] for r in rows] == list(TABLE3_CODED_RATE)
    for r in rows:
        assert r["lossless"]
        assert abs(r["gap_vs_exact"]) < 0.005, r
        assert abs(r["rate_vs_paper"]) < 0.015, r


def test_model_cross_entropy_matches_empirical_entropy():
    """The parametric tables cost at most 0.002 bit/dim over the symbols' empirical entropy."""
    for bits in (2.0, 4.0):
        x = torch.randn(200_000, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
        a = math.sqrt(2 * math.pi * math.e) * 2**-bits
        s = points_to_symbols(nearest_e8(x / a)).numpy()
        model = gaussian_symbol_model(bits)

        def entropy(v):
            _, counts = np.unique(v, return_counts=True)
            p = counts / counts.sum()
            return -(p * np.log2(p)).sum() * v.size

        empirical = entropy(s[:, 0])
        cross = -np.log2(model.coset[s[:, 0]]).sum()
        for c in (0, 1):
            rows = s[s[:, 0] == c]
            for j in range(1, 9):
                empirical += entropy(rows[:, j])
                table = model.free[c] if j < 8 else model.half[c]
                cross += -np.log2(table[rows[:, j] + model.radius]).sum()
        excess = (cross - empirical) / s.size * 9 / 8
        assert 0 <= excess < 0.002, (bits, excess)


def test_coded_rate_tracks_model_entropy():
    """The rANS payload is within 0.1% of the model's cross-entropy (constriction's precision)."""
    x = torch.randn(50_000, 8, generator=torch.Generator().manual_seed(2))
    codec = E8Codec(4.0, rotation="none", scale="tensor")
    enc = codec.encode(x)
    model = gaussian_symbol_model(4.0)
    s = points_to_symbols(codec._analyse(x)[0].reshape(-1, 8)).numpy()
    cross = -np.log2(model.coset[s[:, 0]]).sum()
    for c in (0, 1):
        rows = s[s[:, 0] == c]
        cross += -np.log2(model.free[c][rows[:, 1:8] + model.radius]).sum()
        cross += -np.log2(model.half[c][rows[:, 8] + model.radius]).sum()
    assert 32 * enc.words.size == pytest.approx(cross, rel=1e-3)


def test_vector_scales_are_causal():
    """With one scale per vector, a vector's code does not depend on any other vector."""
    codec = E8Codec(3.0, rotation="rht", scale="vector")
    x = torch.randn(20, 64)
    full = codec.quantize(x)
    for k in (1, 7, 20):
        assert torch.equal(codec.quantize(x[:k]), full[:k])
    enc = codec.encode(x)
    assert enc.step_codes.dtype == np.int32 and enc.step_codes.shape == (20,)


def test_steps_are_on_the_log_grid_and_used_as_stored():
    codec = E8Codec(4.0, rotation="none", scale="vector")
    x = torch.randn(5, 16, dtype=torch.float64) * torch.logspace(-3, 3, 5, dtype=torch.float64)[:, None]
    enc = codec.encode(x)
    exact = np.sqrt(2 * np.pi * np.e * (x.numpy() ** 2).mean(-1)) * 2**-4
    stored = step_values(torch.from_numpy(enc.step_codes), torch.float64).numpy()
    # the nearest grid point 2^(k/8) (held to float16 precision): within 1/16 octave of the exact step
    assert np.allclose(stored, 2.0 ** (enc.step_codes / 8.0), rtol=2**-11, atol=0)
    assert np.all(np.abs(np.log2(stored / exact)) <= 1 / 16 + 1e-3)
    # decoding multiplies the points by exactly the stored steps
    points = codec._analyse(x)[0]
    assert torch.equal(codec.decode(enc), points * torch.from_numpy(stored)[:, None])


def test_zero_vectors_and_empty_tensors():
    codec = E8Codec(4.0)
    x = torch.zeros(4, 64)
    x[1] = torch.randn(64)
    y = round_trip(codec, x)
    assert torch.equal(y[[0, 2, 3]], torch.zeros(3, 64))
    for shape in [(0, 64), (3, 0, 64)]:
        empty = torch.zeros(shape)
        assert round_trip(codec, empty).shape == empty.shape
    assert round_trip(E8Codec(4.0, scale="tensor"), torch.zeros(0, 8)).shape == (0, 8)


def test_escapes_for_heavy_tails():
    """Values far outside the Gaussian tables are escaped and still round-trip exactly."""
    codec = E8Codec(4.0, rotation="none", scale="tensor")
    x = torch.randn(2000, 8) * 0.01
    x[17, 3] = 500.0
    x[1999, 7] = -800.0
    x[400] = 300.0
    y = round_trip(codec, x)
    assert torch.equal(y, codec.quantize(x))
    assert (y - x).abs().max() < 2 * 1.0 * math.sqrt(2 * math.pi * math.e * x.square().mean()) * 2**-4 * 8


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_input_rejected(bad):
    x = torch.randn(4, 64)
    x[2, 5] = bad
    for method in ("encode", "quantize"):
        with pytest.raises(lqlib.InputError, match="NaN or Inf"):
            getattr(E8Codec(4.0), method)(x)


def test_bad_inputs_rejected():
    codec = E8Codec(4.0)
    with pytest.raises(lqlib.InputError, match="multiple of 8"):
        codec.encode(torch.randn(3, 12))
    with pytest.raises(lqlib.InputError, match="power-of-two"):
        codec.encode(torch.randn(3, 24))
    assert E8Codec(4.0, rotation="none").encode(torch.randn(3, 24)).shape == (3, 24)
    with pytest.raises(lqlib.InputError, match="dtype"):
        codec.encode(torch.ones(3, 8, dtype=torch.int32))
    with pytest.raises(lqlib.InputError, match="scalar"):
        codec.encode(torch.tensor(1.0))
    with pytest.raises(lqlib.InputError, match="torch.Tensor"):
        codec.encode(np.zeros((2, 8)))
    for kwargs in ({"bits": 0.1}, {"bits": 11}, {"rotation": "dct"}, {"scale": "block"}, {"seed": -1}):
        with pytest.raises(lqlib.InputError):
            E8Codec(**{"bits": 4.0, **kwargs})
    with pytest.raises(lqlib.InputError, match="out of range"):
        E8Codec(0.5, rotation="none", scale="tensor").encode(torch.full((1, 8), 1e40, dtype=torch.float64))
    # float32 near its maximum needs a step above 2^100: refused, with the supported range in the message
    # (wire version 2 coded it with a clamped step: 48 payload bits/dim at a 4-bit target, measured)
    huge = torch.full((1, 8), 3e38)
    with pytest.raises(lqlib.InputError, match="out of range.*supported at 4.0 bits/dim"):
        E8Codec(4.0, rotation="none").quantize(huge)


def test_codec_mismatch_rejected():
    enc = E8Codec(4.0, seed=1).encode(torch.randn(2, 64))
    for other in (
        E8Codec(3.0, seed=1),
        E8Codec(4.0, seed=2),
        E8Codec(4.0, rotation="none", seed=1),
        E8Codec(4.0, scale="tensor", seed=1),
    ):
        with pytest.raises(lqlib.CodecMismatchError):
            other.decode(enc)


def test_half_precision_inputs_keep_dtype():
    for dtype in (torch.float16, torch.bfloat16):
        x = torch.randn(6, 128).to(dtype)
        y = round_trip(E8Codec(5.0), x)
        assert y.dtype == dtype
        rel = (y.float() - x.float()).square().mean() / x.float().square().mean()
        assert rel < 4.0**-5 * 2.5


# ------------------------------------------------------------------ range: saturation, refusals, scaling


def _finite_top(dtype: torch.dtype) -> float:
    return float(torch.finfo(dtype).max)


@settings(max_examples=60, deadline=None)
@given(
    dtype=st.sampled_from([torch.float16, torch.bfloat16, torch.float32, torch.float64]),
    rotation=st.sampled_from(["none", "rht"]),
    granularity=st.sampled_from(["vector", "tensor"]),
    bits=st.sampled_from([0.5, 2.0, 4.0, 7.0]),
    fraction=st.floats(0.25, 1.0),
    seed=st.integers(0, 2**31 - 1),
)
def test_near_the_largest_values_nothing_is_infinite(dtype, rotation, granularity, bits, fraction, seed):
    """Inputs up to the largest value each dtype supports (float16: 65504; the others: the top of the codec's
    supported range): quantize and decode agree, every output is finite, and saturation never moves a
    reconstruction away from its input (the error is at most the unsaturated one, coordinate by coordinate)."""
    codec = E8Codec(bits, rotation=rotation, scale=granularity, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(6, 64, generator=gen, dtype=torch.float64)
    x[0] = x[0].sign()  # every coordinate at the top
    if dtype == torch.float16:
        x = (x / x.abs().amax() * 65504.0 * fraction).to(dtype)
    else:
        top = supported_rms(bits, granularity)[1] * 0.99
        x = (x / x.square().mean(-1).sqrt().amax() * top * fraction).to(dtype)
    y = codec.decode(Encoded.from_bytes(codec.encode(x).to_bytes()))
    assert torch.equal(y, codec.quantize(x)) and bool(torch.isfinite(y).all())
    # y is the unsaturated reconstruction rounded to the dtype, except where that passes the dtype's range:
    # there it is ± the largest finite value, never farther from x than the unsaturated value
    unsaturated = codec._synthesise(*codec._analyse(codec._validate(x)))
    beyond = unsaturated.abs() > _finite_top(dtype)
    assert torch.equal(y[~beyond], unsaturated[~beyond].to(dtype))
    assert torch.equal(y[beyond], unsaturated[beyond].sign().to(dtype) * _finite_top(dtype))
    assert bool(((y.double() - x.double()).abs()[beyond] <= (unsaturated.double() - x.double()).abs()[beyond]).all())
    if dtype != torch.float16:
        assert not bool(beyond.any())  # the supported range stays clear of the top


def test_the_issues_float16_cases_are_finite():
    """The issue's reproductions: 65504 everywhere, randn·20000 (clipped to float16), and a forged stream whose
    step codes are the largest the format holds, in every dtype."""
    y = E8Codec(4.0).quantize(torch.full((1, 8), 65504.0, dtype=torch.float16))
    assert bool(torch.isfinite(y).all()) and bool((y == 65504.0).all())
    x = (torch.randn(1000, 64, generator=torch.Generator().manual_seed(0)) * 20000).clamp(-65504, 65504).half()
    for rotation in ("rht", "none"):
        codec = E8Codec(4.0, rotation=rotation)
        unsaturated = codec._synthesise(*codec._analyse(codec._validate(x)))
        assert int(torch.isinf(unsaturated.half()).sum()) > 0  # what it gave before saturation
        assert bool(torch.isfinite(codec.quantize(x)).all())
    for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        for rotation in ("rht", "none"):
            codec = E8Codec(4.0, rotation=rotation, seed=2)
            enc = codec.encode(torch.randn(8, 64).to(dtype))
            codes = np.full_like(enc.step_codes, 800)
            forged = Encoded.from_bytes(Encoded(enc.header, codes, enc.words).to_bytes())
            y = codec.decode(forged)
            assert bool(torch.isfinite(y).all()), (dtype, rotation)
            if dtype in (torch.float16, torch.bfloat16, torch.float32):  # 2^100 steps pass float16's range
                assert bool((y.abs() == _finite_top(dtype)).any()) == (dtype == torch.float16)


@pytest.mark.parametrize("granularity", ["vector", "tensor"])
@pytest.mark.parametrize("rotation", ["none", "rht"])
def test_powers_of_two_scale_the_code_exactly_across_the_supported_range(rotation, granularity):
    """Scaling the input by 2^m scales the output by 2^m exactly and keeps the coded size (same symbols, steps
    shifted on the grid), from the bottom to the top of the supported range: tiny and huge inputs are coded
    at the stated rate and relative error. Just outside, the codec refuses with a clear error."""
    bits = 4.0
    codec = E8Codec(bits, rotation=rotation, scale=granularity, seed=5)
    gen = torch.Generator().manual_seed(9)
    x = torch.randn(5, 64, generator=gen, dtype=torch.float64)
    x = x / (x.square().mean(-1, keepdim=True).sqrt() if granularity == "vector" else x.square().mean().sqrt())
    low, high = supported_rms(bits, granularity)
    reference = codec.quantize(x)
    size = codec.encode(x).nbytes()
    spread = float(x.square().mean(-1).sqrt().amax() / x.square().mean(-1).sqrt().amin())
    m_low = math.ceil(math.log2(low)) + 1
    m_high = math.floor(math.log2(high / (spread if granularity == "vector" else 1.0))) - 1
    for m in range(m_low, m_high + 1, 7):
        scaled = x * 2.0**m
        assert torch.equal(codec.quantize(scaled), reference * 2.0**m), m
        assert codec.encode(scaled).nbytes() == size, m
    for m in (m_low - 2, m_high + 3):
        with pytest.raises(lqlib.InputError, match="out of range"):
            codec.encode(x * 2.0**m)
    # float32 inputs too, where the range lies inside float32's normal numbers
    x32 = x.float()
    for m in (-80, 90):
        assert torch.equal(codec.quantize(x32 * 2.0**m), codec.quantize(x32) * 2.0**m)


@pytest.mark.parametrize("bits", [0.5, 4.0, 10.0])
@pytest.mark.parametrize("granularity", ["vector", "tensor"])
def test_supported_rms_is_where_the_codec_refuses(bits, granularity):
    """supported_rms gives the boundary: constant vectors just inside are coded, just outside refused; and the
    README's statement holds (every RMS in [2^-92, 2^98] is coded at every rate, in either mode)."""
    codec = E8Codec(bits, rotation="none", scale=granularity)
    low, high = supported_rms(bits, granularity)
    for rms, inside in ((low * (1 + 1e-9), True), (low * (1 - 1e-9), False), (high * (1 - 1e-9), True)):
        x = torch.full((2, 16), rms, dtype=torch.float64)
        if inside:
            y = codec.quantize(x)
            assert bool((y > 0).all()) and float(((y - x) / x).abs().max()) < 1.0
        else:
            with pytest.raises(lqlib.InputError, match="out of range"):
                codec.quantize(x)
    with pytest.raises(lqlib.InputError, match="out of range"):
        codec.quantize(torch.full((2, 16), high * (1 + 1e-9), dtype=torch.float64))
    assert low <= 2.0**-92 and high >= 2.0**98
    assert torch.equal(codec.quantize(torch.zeros(3, 16)), torch.zeros(3, 16))  # zero is always fine


def test_issue_extremes_are_refused_not_silently_degraded():
    """The issue's extremes: RMS 1e-32 used to be zeroed (relative error 1), 1e35 coded at about 6x the rate."""
    for scale in (1e-32, 1e35):
        with pytest.raises(lqlib.InputError, match="out of range"):
            E8Codec(4.0).encode(torch.randn(4, 64) * scale)
    # a zero vector among ordinary ones, and a single huge vector among tiny ones in tensor mode, are fine
    x = torch.randn(4, 64)
    x[1] = 0.0
    assert torch.equal(E8Codec(4.0).quantize(x)[1], torch.zeros(64))


def test_misuse_gets_lqlib_errors_that_say_what_to_do():
    codec = E8Codec(4.0)
    data = codec.encode(torch.randn(2, 64)).to_bytes()
    with pytest.raises(lqlib.InputError, match="Encoded.from_bytes"):
        codec.decode(data)
    for seed in ("a", None, 1.5, True, -1, 2**32):
        with pytest.raises(lqlib.InputError, match="seed"):
            E8Codec(4.0, seed=seed)
    assert E8Codec(4.0, seed=np.uint32(7)).seed == 7
    for bits in ("4", None, float("nan"), True):
        with pytest.raises(lqlib.InputError, match="bits"):
            E8Codec(bits)
    for rotation in (["rht"], None):
        with pytest.raises(lqlib.InputError, match="rotation"):
            E8Codec(4.0, rotation=rotation)
    with pytest.raises(lqlib.InputError, match="meta"):
        codec.encode(torch.empty(2, 64, device="meta"))
    with pytest.raises(lqlib.InputError, match="dense"):
        codec.encode(torch.randn(2, 64).to_sparse())
    enc = Encoded.from_bytes(data)
    with pytest.raises(lqlib.InputError, match="device"):
        codec.decode(enc, device="nowhere")
    with pytest.raises(lqlib.InputError, match="max_numel"):
        codec.decode(enc, max_numel=-1)
    with pytest.raises(lqlib.FormatError, match="max_numel"):
        codec.decode(enc, max_numel=127)
    assert codec.decode(enc, max_numel=128).shape == (2, 64)
    assert codec.decode(enc, max_numel=None).shape == (2, 64)
    # check() refuses what encode refuses, without coding
    with pytest.raises(lqlib.InputError, match="NaN"):
        codec.check(torch.tensor([[float("nan")] * 64]))
    with pytest.raises(lqlib.InputError, match="out of range"):
        codec.check(torch.full((1, 64), 1e35))
    codec.check(torch.randn(3, 64))
    # the range error no longer advises scale='vector' to a codec that has it
    with pytest.raises(lqlib.InputError) as refused:
        codec.encode(torch.full((1, 64), 1e35))
    assert "scale='vector'" not in str(refused.value) and "multiply the input" in str(refused.value)
