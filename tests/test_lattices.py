"""Nearest-point maps: lattice membership, optimality against brute force, G(Λ) against exact values."""

import itertools
import math

import pytest
import torch

from lqlib.core.lattices import (
    LATTICES,
    nearest_a2,
    nearest_dn,
    nearest_e8,
    nearest_zn,
    normalized_second_moment,
)
from tests.conftest import DEVICES


def is_e8(p: torch.Tensor) -> torch.Tensor:
    """E8 = {p ∈ Z^8 ∪ (Z+½)^8 : Σp even}."""
    frac = p - torch.floor(p)
    same_coset = (frac == frac[..., :1]).all(-1) & ((frac[..., 0] == 0) | (frac[..., 0] == 0.5))
    total = p.sum(-1)
    return same_coset & (torch.remainder(total, 2) == 0)


def brute_force(x: torch.Tensor, candidates_fn) -> torch.Tensor:
    """Squared distance from each x to the nearest of its candidate lattice points."""
    best = []
    for row in x:
        cand = candidates_fn(row)
        best.append((cand - row).square().sum(-1).min())
    return torch.stack(best)


def e8_candidates(row: torch.Tensor) -> torch.Tensor:
    # The covering radius of E8 is 1, so each coordinate of the nearest point is within 1 of x.
    out = []
    for shift in (0.0, 0.5):
        base = torch.floor(row - shift)
        offsets = torch.tensor(list(itertools.product((0.0, 1.0), repeat=8)), dtype=row.dtype)
        pts = base + offsets + shift
        out.append(pts[torch.remainder(pts.sum(-1), 2) == 0])
    return torch.cat(out)


def dn_candidates(row: torch.Tensor) -> torch.Tensor:
    n = row.numel()
    offsets = torch.tensor(list(itertools.product((-1.0, 0.0, 1.0, 2.0), repeat=n)), dtype=row.dtype)
    pts = torch.floor(row) + offsets
    return pts[torch.remainder(pts.sum(-1), 2) == 0]


def a2_candidates(row: torch.Tensor) -> torch.Tensor:
    i, j = torch.meshgrid(torch.arange(-6, 7, dtype=row.dtype), torch.arange(-6, 7, dtype=row.dtype), indexing="ij")
    pts = torch.stack([i + 0.5 * j, j * math.sqrt(3) / 2], -1).reshape(-1, 2)
    shift = torch.round(row[1] / (math.sqrt(3) / 2))
    base = torch.tensor([torch.round(row[0] - 0.5 * shift), 0.0], dtype=row.dtype) + torch.tensor(
        [0.5 * shift, shift * math.sqrt(3) / 2], dtype=row.dtype
    )
    return pts + base


@pytest.mark.parametrize("scale", [0.3, 1.0, 7.0])
def test_e8_is_nearest_point(scale):
    x = torch.randn(300, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * scale
    p = nearest_e8(x)
    assert is_e8(p).all()
    ours = (p - x).square().sum(-1)
    assert torch.allclose(ours, brute_force(x, e8_candidates), rtol=0, atol=1e-12)


def test_d4_is_nearest_point():
    x = torch.randn(300, 4, generator=torch.Generator().manual_seed(2), dtype=torch.float64) * 3
    p = nearest_dn(x)
    assert (p == torch.round(p)).all() and (torch.remainder(p.sum(-1), 2) == 0).all()
    assert torch.allclose((p - x).square().sum(-1), brute_force(x, dn_candidates), rtol=0, atol=1e-12)


def test_a2_is_nearest_point():
    x = torch.randn(300, 2, generator=torch.Generator().manual_seed(3), dtype=torch.float64) * 2
    p = nearest_a2(x)
    # membership: p = i·(1,0) + j·(½, √3/2) with integer i, j
    j = p[:, 1] / (math.sqrt(3) / 2)
    i = p[:, 0] - 0.5 * j
    assert torch.allclose(j, torch.round(j), atol=1e-9) and torch.allclose(i, torch.round(i), atol=1e-9)
    assert torch.allclose((p - x).square().sum(-1), brute_force(x, a2_candidates), rtol=0, atol=1e-12)


def test_zn_rounds():
    x = torch.tensor([[0.4, -1.6, 2.5001]])
    assert torch.equal(nearest_zn(x), torch.tensor([[0.0, -2.0, 3.0]]))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_e8_any_leading_shape_dtype_device(device, dtype):
    x = torch.randn(2, 3, 5, 8, dtype=dtype, device=device) * 4
    p = nearest_e8(x)
    assert p.shape == x.shape and p.dtype == dtype and p.device.type == device
    assert is_e8(p.cpu()).all()
    assert torch.equal(p.reshape(-1, 8), nearest_e8(x.reshape(-1, 8)))


def textbook_e8(x):
    """Conway & Sloane's rule as usually written: both cosets' D8 points, the smaller summed squared distance."""
    even, odd = nearest_dn(x), nearest_dn(x - 0.5) + 0.5
    d_even, d_odd = (x - even).square().sum(-1, keepdim=True), (x - odd).square().sum(-1, keepdim=True)
    return torch.where(d_odd < d_even, odd, even)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.slow
def test_e8_coset_choice_agrees_with_summed_distances(dtype):
    """The choice by Σ|e| (no squares) against summed squared distances: the same points except at
    ties (quarter and half-integer inputs: other points at exactly the same distance) and, in
    float32, near-ties within rounding (distance within 1e-6)."""
    gen = torch.Generator().manual_seed(21)
    x = torch.cat([torch.randn(200_000, 8, generator=gen) * s for s in (0.3, 1.0, 4.0, 30.0)]).to(dtype)
    ours, theirs = nearest_e8(x), textbook_e8(x)
    dist = lambda p: (x.double() - p.double()).square().sum(-1)  # noqa: E731
    assert (dist(ours) - dist(theirs)).max() <= (1e-6 if dtype == torch.float32 else 0.0)
    assert (ours != theirs).any(-1).float().mean() < 1e-5
    ties = (torch.randint(-6, 7, (100_000, 8), generator=gen) / 4).to(dtype)
    ours, theirs = nearest_e8(ties), textbook_e8(ties)
    assert is_e8(ours).all() and (ours != theirs).any()  # other choices at ties ...
    assert torch.equal((ties - ours).square().sum(-1), (ties - theirs).square().sum(-1))  # ... at equal distance


def test_e8_points_are_fixed_points():
    p = nearest_e8(torch.randn(1000, 8, dtype=torch.float64) * 5)
    assert torch.equal(nearest_e8(p), p)


def test_e8_wrong_dim():
    with pytest.raises(ValueError, match="8"):
        nearest_e8(torch.zeros(3, 7))


@pytest.mark.parametrize("name", ["Z", "A2", "D4", "E8"])
def test_normalized_second_moment_matches_exact(name):
    est, se = normalized_second_moment(name, n_samples=400_000, seed=5)
    assert abs(est - LATTICES[name].G) < 4 * se, (est, se, LATTICES[name].G)


def test_exact_constants():
    assert pytest.approx(0.0716821, abs=5e-8) == LATTICES["E8"].G
    assert pytest.approx(0.080188, abs=5e-7) == LATTICES["A2"].G
    assert pytest.approx(0.076603, abs=5e-7) == LATTICES["D4"].G
    order = [LATTICES[k].G for k in ("Z", "A2", "D4", "E8", "BW16", "Leech")]
    assert order == sorted(order, reverse=True)
    with pytest.raises(ValueError):
        normalized_second_moment("Leech")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_quantizer_core_has_no_host_syncs_on_cuda():
    """The nearest-point maps, the RHT and the codec's analysis/synthesis never synchronise with the host."""
    from lqlib import E8Codec
    from lqlib.core.lattices import nearest_a2, nearest_dn

    x = torch.randn(64, 32, 128, device="cuda")
    codec = E8Codec(4.0, rotation="rht", scale="vector")
    codec._rht(128).matrix(x.device, x.dtype)  # one-off host-to-device copies, made before watching
    codec._signs(128, x.device, x.dtype)
    codec._analyse(x[:1])  # and the step tables
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        nearest_e8(x.reshape(-1, 8))
        nearest_dn(x.reshape(-1, 4))
        nearest_a2(x.reshape(-1, 2))
        points, steps = codec._analyse(x)
        codec._synthesise(points, steps)
    finally:
        torch.cuda.set_sync_debug_mode("default")
