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
    # float32's whole range is fine: the step stops at 2^100, the points stay below 2^30
    huge = torch.full((1, 8), 3e38)
    assert torch.isfinite(E8Codec(4.0, rotation="none").quantize(huge)).all()


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
