"""Closed forms of Paper I."""

import math

import numpy as np
import pytest

from lqlib.core import theory
from lqlib.core.lattices import LATTICES


def test_scalar_barrier_decomposes():
    assert pytest.approx(2.72070, abs=5e-6) == theory.PANTER_DITE_GAP
    assert pytest.approx(1.42329, abs=5e-6) == theory.CELL_SHAPE_GAP
    assert pytest.approx(1.91156, abs=5e-6) == theory.FIXED_RATE_GAP
    assert pytest.approx(theory.PANTER_DITE_GAP, rel=1e-14) == theory.CELL_SHAPE_GAP * theory.FIXED_RATE_GAP


def test_entropy_coded_gaps():
    assert theory.entropy_coded_gap("E8") == pytest.approx(1.2243, abs=5e-5)
    assert theory.entropy_coded_gap("Z") == pytest.approx(theory.CELL_SHAPE_GAP, rel=1e-14)
    assert pytest.approx(0.058550, abs=5e-7) == theory.SPHERE_BOUND_G
    assert all(LATTICES[k].G > theory.SPHERE_BOUND_G for k in LATTICES)


def test_gaussian_bound():
    assert theory.gaussian_distortion_bound(4.0) == 4.0**-4
    assert theory.gaussian_distortion_bound(2.0, sigma2=3.0) == pytest.approx(3.0 / 16)
    # 6.02 dB per bit
    ratio = theory.gaussian_distortion_bound(3.0) / theory.gaussian_distortion_bound(4.0)
    assert 10 * math.log10(ratio) == pytest.approx(6.0206, abs=1e-4)


def test_kv_cache_bytes():
    # Llama-3.1-8B: 32 layers, 8 KV heads, head dim 128; fp16 at 128K tokens is 16 GiB
    assert theory.kv_cache_bytes(32, 8, 128, 131072, 16) == 16 * 2**30
    assert theory.kv_cache_bytes(30, 3, 64, 1, 4.0) == 2 * 30 * 3 * 64 * 4 / 8


@pytest.mark.parametrize("n", [1, 2, 8, 64])
def test_fixed_rate_block_gap_is_zadors_integral(n):
    """Zador: fixed-rate D = G·(∫ p_n^α)^(1/α)·4^-R per dimension, α = n/(n+2), against G·2πe·4^-R entropy
    coded; the n-dim integral of a unit Gaussian is the 1-d one to the n-th power, so the gap is
    (∫ p^α)^(n+2) / (2πe), here by quadrature; n = 1 is 3√3/e; the gap shrinks with n."""
    alpha = n / (n + 2)
    t = np.linspace(-60.0, 60.0, 400001)
    p = np.exp(-0.5 * t * t) / math.sqrt(2 * math.pi)
    integral = float(np.sum(p**alpha) * (t[1] - t[0]))
    assert theory.fixed_rate_block_gap(n) == pytest.approx(integral ** (n + 2) / (2 * math.pi * math.e), rel=1e-9)
    assert theory.fixed_rate_block_gap(n) < theory.fixed_rate_block_gap(max(n // 2, 1)) or n == 1
    with pytest.raises(ValueError):
        theory.fixed_rate_block_gap(0)


def test_fixed_rate_block_gap_of_one_dimension_is_the_scalar_one():
    assert theory.fixed_rate_block_gap(1) == pytest.approx(theory.FIXED_RATE_GAP, rel=1e-14)
