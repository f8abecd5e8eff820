"""Fast Walsh–Hadamard transform and the randomized Hadamard transform."""

import pytest
import scipy.linalg
import torch

from lqlib.core.rht import RandomizedHadamard, fwht, random_signs
from tests.conftest import DEVICES


@pytest.mark.parametrize("d", [1, 2, 8, 64, 128])
def test_fwht_matches_hadamard_matrix(d):
    x = torch.randn(4, 3, d, dtype=torch.float64)
    H = torch.tensor(scipy.linalg.hadamard(d), dtype=torch.float64)
    assert torch.allclose(fwht(x), x @ H, atol=1e-12)


@pytest.mark.parametrize("device", DEVICES)
def test_rht_is_orthonormal_and_inverts(device):
    rht = RandomizedHadamard(128, seed=7)
    x = torch.randn(10, 4, 128, dtype=torch.float64, device=device)
    w = rht.forward(x)
    assert torch.allclose(w.norm(dim=-1), x.norm(dim=-1), rtol=1e-12)
    assert torch.allclose(rht.inverse(w), x, atol=1e-12)
    x32 = x.float()
    assert (rht.inverse(rht.forward(x32)) - x32).abs().max() < 1e-5


def test_signs_are_seeded():
    assert torch.equal(random_signs(64, 3), random_signs(64, 3))
    assert not torch.equal(random_signs(64, 3), random_signs(64, 4))
    assert set(random_signs(64, 3).tolist()) == {-1.0, 1.0}


def test_rht_spreads_energy():
    # all energy in one coordinate becomes flat: every |w_i| = |x_0| / sqrt(d)
    x = torch.zeros(64)
    x[5] = 8.0
    assert torch.allclose(RandomizedHadamard(64, 0).forward(x).abs(), torch.full((64,), 1.0))


def test_non_power_of_two_rejected():
    with pytest.raises(ValueError, match="power-of-two"):
        RandomizedHadamard(96)
    with pytest.raises(ValueError, match="power-of-two"):
        fwht(torch.zeros(3, 12))


def test_rht_matrix_is_the_butterfly_transform():
    rht = RandomizedHadamard(64, seed=5)
    x = torch.randn(7, 64, dtype=torch.float64)
    butterfly = fwht(x * rht.signs.double()) / 8.0
    assert torch.allclose(rht.forward(x), butterfly, atol=1e-13)
    m = rht.matrix(dtype=torch.float64)
    assert torch.allclose(m @ m.T, torch.eye(64, dtype=torch.float64), atol=1e-13)
