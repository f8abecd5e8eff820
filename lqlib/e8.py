"""The original LatticeQuant quick-start API (``core.e8_quantizer``), kept for compatibility.

>>> from lqlib.e8 import encode_e8, compute_scale
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .core.lattices import nearest_e8

__all__ = ["encode_e8", "compute_scale"]


def encode_e8(x: Tensor) -> Tensor:
    """Nearest E8 points of ``x``, shape (..., 8k), block by block along the last axis."""
    if x.shape[-1] % 8:
        raise ValueError(f"the last dim must be a multiple of 8, got {x.shape[-1]}")
    return nearest_e8(x.reshape(*x.shape[:-1], -1, 8)).reshape(x.shape)


def compute_scale(sigma2: float | Tensor, bits: float) -> float | Tensor:
    """Step a = sqrt(2πe·σ²)·2^(−b), which makes the entropy-coded rate about b bits/dim."""
    if isinstance(sigma2, Tensor):
        return torch.sqrt(2.0 * math.pi * math.e * sigma2) * 2.0 ** (-bits)
    return math.sqrt(2.0 * math.pi * math.e * sigma2) * 2.0 ** (-bits)
