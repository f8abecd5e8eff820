"""Parity-aware symbols: exact round trip, one bit saved per block."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lqlib.core.lattices import nearest_e8
from lqlib.core.symbols import SYMBOLS_PER_BLOCK, points_to_symbols, symbols_to_points


@settings(max_examples=60, deadline=None)
@given(scale=st.floats(0.01, 1e4), seed=st.integers(0, 2**31 - 1), n=st.integers(1, 300))
def test_round_trip(scale, seed, n):
    x = torch.randn(n, 8, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * scale
    p = nearest_e8(x)
    s = points_to_symbols(p)
    assert s.shape == (n, SYMBOLS_PER_BLOCK) and s.dtype == torch.int32
    assert torch.equal(symbols_to_points(s, torch.float64), p)


def test_layout():
    p = torch.tensor(
        [
            [0.5, -0.5, 1.5, 0.5, 0.5, 0.5, 0.5, -3.5],  # half-integer coset
            [1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 2.0],
        ]
    )  # integer coset
    s = points_to_symbols(p)
    assert s[0].tolist() == [1, 0, -1, 1, 0, 0, 0, 0, -2]  # z7 = -4 → floor(-4/2) = -2
    assert s[1].tolist() == [0, 1, 1, 0, 0, 0, 0, 0, 1]
    assert torch.equal(symbols_to_points(s), p)


def test_last_coordinate_parity_is_implied():
    # z7 and z7 + 1 share floor(z7/2) only when they differ in parity: the even-sum rule picks one
    p = nearest_e8(torch.randn(5000, 8) * 3)
    s = points_to_symbols(p)
    z = torch.floor(p)
    assert torch.equal(torch.remainder(z.sum(-1), 2), torch.zeros(5000))
    assert torch.equal(s[:, 8], torch.div(z[:, 7], 2, rounding_mode="floor").to(torch.int32))
