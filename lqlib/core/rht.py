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

    The transform is applied as one matrix product with the orthonormal matrix
    ``M = diag(signs) · H / sqrt(d)`` (built once per device and dtype by
    :func:`fwht`): for head dims up to a few hundred a BLAS product is faster
    than log2(d) butterfly passes. Keep TF32 matmuls off on CUDA (PyTorch's
    default) for float32 accuracy.

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
        self.signs = random_signs(dim, seed)
        self._matrices: dict[tuple[torch.device, torch.dtype], Tensor] = {}

    def matrix(self, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> Tensor:
        """M = diag(signs) · H / sqrt(d), shape (d, d), cached per device and dtype."""
        key = (torch.device(device), dtype)
        if key not in self._matrices:
            m = fwht(torch.diag(self.signs.to(torch.float64))) / math.sqrt(self.dim)
            self._matrices[key] = m.to(device=key[0], dtype=dtype)
        return self._matrices[key]

    def forward(self, x: Tensor) -> Tensor:
        """Rotate ``x`` of shape (..., dim): w = H · diag(signs) · x / sqrt(d)."""
        return x @ self.matrix(x.device, x.dtype)

    def inverse(self, w: Tensor) -> Tensor:
        """Undo :meth:`forward` (exact up to floating-point rounding): x = diag(signs) · H · w / sqrt(d)."""
        return w @ self.matrix(w.device, w.dtype).T
