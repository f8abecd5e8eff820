"""Scalar quantizers and the rate–distortion measurements behind the Paper I chapter."""

import math

import numpy as np
import pytest
import torch

from lqlib.core import theory
from lqlib.core.scalar import (
    empirical_entropy,
    entropy_coded_scalar,
    fixed_rate_scalar,
    lloyd_max,
)
from lqlib.evaluation.rate_distortion import (
    FAMILIES,
    explain_block,
    family_point,
    lattice_entropy_coded,
    make_source,
    mse_at_rate,
    parity_saving,
)


@pytest.fixture(scope="module")
def gauss():
    return make_source("gaussian", 400_000, seed=3)


def test_lloyd_max_matches_known_gaussian_quantizers(gauss):
    # Max (1960): MSE of the optimal 1-, 2- and 3-bit quantizers of a unit Gaussian
    for bits, known in ((1, 0.3634), (2, 0.1175), (3, 0.03454)):
        assert fixed_rate_scalar(gauss, bits).mse == pytest.approx(known, rel=0.01)
    # 1 bit: levels ±sqrt(2/π)
    assert np.allclose(lloyd_max(gauss, 1), [-math.sqrt(2 / math.pi), math.sqrt(2 / math.pi)], atol=0.01)


def test_lloyd_max_on_uniform_is_uniform():
    x = make_source("uniform", 400_000, seed=1)
    for bits in (2, 4):
        step = 2 * math.sqrt(3) / 2**bits
        assert fixed_rate_scalar(x, bits).mse == pytest.approx(step**2 / 12, rel=0.02)


def test_panter_dite_limit_approached(gauss):
    gap = fixed_rate_scalar(gauss, 7).mse / 4.0**-7
    assert gap == pytest.approx(theory.PANTER_DITE_GAP, rel=0.03)


def test_entropy_coded_scalar_hits_rate_and_cell_shape_gap(gauss):
    result = entropy_coded_scalar(gauss, 5.0)
    assert result.rate == pytest.approx(5.0, abs=1e-3)
    assert result.mse / 4.0**-result.rate == pytest.approx(theory.CELL_SHAPE_GAP, rel=0.01)


def test_empirical_entropy():
    assert empirical_entropy(np.array([0, 1, 2, 3] * 10)) == pytest.approx(2.0)
    assert empirical_entropy(np.zeros(7, dtype=int)) == 0.0


@pytest.mark.parametrize("lattice", ["D4", "E8"])
def test_lattice_gap_at_high_rate(gauss, lattice):
    result = lattice_entropy_coded(gauss, lattice, 6.0)
    gap = result.mse / theory.gaussian_distortion_bound(result.rate, float(np.mean(gauss**2)))
    assert gap == pytest.approx(theory.entropy_coded_gap(lattice), rel=0.02)
    assert result.rate == pytest.approx(6.0, abs=0.02)


def test_family_point_and_sources(gauss):
    for name in ("gaussian", "laplace", "uniform"):
        assert np.mean(make_source(name, 200_000) ** 2) == pytest.approx(1.0, rel=0.02)
    rows = [family_point(gauss[:50_000], f, 4) for f in FAMILIES]
    gaps = [r["gap"] for r in rows]
    assert gaps == sorted(gaps, reverse=True)  # fixed-rate > scalar EC > D4 > E8 on a Gaussian
    with pytest.raises(ValueError):
        family_point(gauss, "BW16", 4)
    with pytest.raises(ValueError):
        make_source("cauchy", 10)


def test_mse_at_rate_interpolates_log_linearly():
    points = [{"rate": r, "mse": 4.0**-r} for r in (3.0, 4.0, 5.0)]
    assert mse_at_rate(points, 4.5) == pytest.approx(4.0**-4.5, rel=1e-12)
    with pytest.raises(ValueError, match="outside"):
        mse_at_rate(points, 6.0)


def test_parity_saving_is_one_bit_per_block_at_high_rate():
    result = parity_saving(6.0, n_blocks=50_000)
    assert result["saving"] == pytest.approx(0.125, abs=0.002)
    assert result["coded_bits"] == pytest.approx(result["model_bits_parity_aware"], rel=2e-3)


def test_explain_block_agrees_with_the_codec():
    from lqlib import E8Codec

    block = np.random.default_rng(4).standard_normal(8)
    rows, summary = explain_block(block, 4.0)
    codec = E8Codec(4.0, rotation="none", scale="tensor")
    x = torch.tensor(block).reshape(1, 8)
    step = float(codec._synthesis_factors(codec._analyse(x)[1], 8, torch.float64).reshape(-1)[0])
    # same point as the codec when the codec's step equals the explained one (sigma2 = its mean square)
    rows2, summary2 = explain_block(block, 4.0, sigma2=float(np.mean(block**2)))
    assert summary2["step"] == pytest.approx(step)
    assert np.allclose([r["E8 point"] for r in rows2], (codec.quantize(x) / step).numpy().reshape(-1))
    assert min(summary["d2_even"], summary["d2_odd"]) <= max(summary["d2_even"], summary["d2_odd"])
    assert summary["total_bits"] > 0
