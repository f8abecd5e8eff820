"""Parity-aware symbols of E8 points.

An E8 point p (one 8-block) is written as p = z + c/2 with the coset bit
c ∈ {0, 1} (integer or half-integer coordinates) and integer parts z ∈ Z^8
whose sum is even. Since the parity of z7 follows from z0..z6, only
floor(z7 / 2) is stored: 9 symbols per block, 1 bit less than storing z7.

Symbol layout per block (int32): ``[c, z0, ..., z6, floor(z7 / 2)]``.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["SYMBOLS_PER_BLOCK", "points_to_symbols", "symbols_to_points"]

SYMBOLS_PER_BLOCK = 9


def points_to_symbols(points: Tensor) -> Tensor:
    """Map E8 points to parity-aware symbols.

    Parameters
    ----------
    points : Tensor, shape (..., 8), floating; exact E8 points (as returned by
        :func:`lqlib.lattices.nearest_e8`, possibly scaled back by 1).

    Returns
    -------
    Tensor, shape (..., 9), int32.
    """
    floor = torch.floor(points)
    coset = (points[..., :1] - floor[..., :1]) * 2.0  # 0.0 or 1.0
    z = floor.to(torch.int32)
    z7_half = torch.div(z[..., 7:], 2, rounding_mode="floor")
    return torch.cat([coset.to(torch.int32), z[..., :7], z7_half], dim=-1)


def symbols_to_points(symbols: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """Inverse of :func:`points_to_symbols`.

    Parameters
    ----------
    symbols : Tensor, shape (..., 9), integer.
    dtype : floating dtype of the returned points.

    Returns
    -------
    Tensor, shape (..., 8), ``dtype``: the E8 points.
    """
    symbols = symbols.to(torch.int64)
    coset = symbols[..., :1]
    free = symbols[..., 1:8]
    parity = torch.remainder(free.sum(dim=-1, keepdim=True), 2)
    z7 = 2 * symbols[..., 8:] + parity
    z = torch.cat([free, z7], dim=-1)
    return z.to(dtype) + coset.to(dtype) * 0.5
