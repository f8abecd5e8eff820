"""Randomized Hadamard transform (RHT): w = H · diag(signs) · v / sqrt(d).

``H`` is the d × d Sylvester–Hadamard matrix (d a power of two), applied by the
fast Walsh–Hadamard transform in log2(d) vectorised butterfly stages. The
transform is orthonormal, so the inverse is v = diag(signs) · H · w / sqrt(d).
The random signs come from a seed, so encoder and decoder agree on them.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["fwht", "random_signs", "RandomizedHadamard"]


def fwht(x: Tensor) -> Tensor:
    """Unnormalised fast Walsh–Hadamard transform along the last axis.

    Parameters
    ----------
    x : Tensor, shape (..., d), floating, d a power of two.

    Returns
    -------
    Tensor, shape (..., d): ``x @ H`` with ``H`` the Sylvester–Hadamard matrix (entries ±1).
    """
    d = x.shape[-1]
    if d < 1 or d & (d - 1):
        raise ValueError(f"the Hadamard transform needs a power-of-two last dim, got {d}")
    lead = x.shape[:-1]
    h = 1
    while h < d:
        pairs = x.reshape(*lead, d // (2 * h), 2, h)
        x = torch.stack([pairs[..., 0, :] + pairs[..., 1, :], pairs[..., 0, :] - pairs[..., 1, :]], dim=-2)
        h *= 2
    return x.reshape(*lead, d)


def random_signs(dim: int, seed: int) -> Tensor:
    """A reproducible vector of ±1 (float32, CPU) of length ``dim`` from ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 2, (dim,), generator=gen).to(torch.float32) * 2.0 - 1.0


class RandomizedHadamard:
    """The RHT of dimension ``dim`` with seeded signs; call ``forward``/``inverse``.

    Parameters
    ----------
    dim : d, a power of two.
    seed : seed of the random signs.
    """

    def __init__(self, dim: int, seed: int = 0) -> None:
        if dim < 1 or dim & (dim - 1):
            raise ValueError(f"the RHT needs a power-of-two dimension, got {dim}")
        self.dim = dim
        self.seed = seed
        self._signs = {(torch.device("cpu"), torch.float32): random_signs(dim, seed)}
        self._norm = 1.0 / math.sqrt(dim)

    def _signs_like(self, x: Tensor) -> Tensor:
        """The signs on ``x``'s device and dtype, copied there once and cached."""
        key = (x.device, x.dtype)
        if key not in self._signs:
            self._signs[key] = self._signs[(torch.device("cpu"), torch.float32)].to(device=x.device, dtype=x.dtype)
        return self._signs[key]

    def forward(self, x: Tensor) -> Tensor:
        """Rotate ``x`` of shape (..., dim)."""
        return fwht(x * self._signs_like(x)) * self._norm

    def inverse(self, w: Tensor) -> Tensor:
        """Undo :meth:`forward` (exact up to floating-point rounding)."""
        return fwht(w) * self._norm * self._signs_like(w)
