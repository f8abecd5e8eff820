"""Closed forms of Paper I: the scalar barrier, lattice gaps, the Gaussian bound, KV bytes.

All distortions are mean squared error per dimension; rates are in bits per dimension.
"""

from __future__ import annotations

import math

from .lattices import LATTICES

__all__ = [
    "PANTER_DITE_GAP",
    "CELL_SHAPE_GAP",
    "FIXED_RATE_GAP",
    "SPHERE_BOUND_G",
    "gaussian_distortion_bound",
    "entropy_coded_gap",
    "kv_cache_bytes",
]

#: Fixed-rate optimal scalar quantizer on a Gaussian at high rate (Panter–Dite): D / D*(b) = √3·π/2.
PANTER_DITE_GAP = math.sqrt(3.0) * math.pi / 2.0
#: Entropy-coded uniform scalar quantizer: D / D*(b) = 2πe·G(Z) = πe/6.
CELL_SHAPE_GAP = math.pi * math.e / 6.0
#: What fixed-length codes add on top of the cell shape: 3√3/e (CELL_SHAPE_GAP × this = PANTER_DITE_GAP).
FIXED_RATE_GAP = 3.0 * math.sqrt(3.0) / math.e
#: G of an n-sphere as n → ∞, the limit no lattice beats: 1/(2πe).
SPHERE_BOUND_G = 1.0 / (2.0 * math.pi * math.e)


def gaussian_distortion_bound(bits: float, sigma2: float = 1.0) -> float:
    """Shannon's D*(b) = σ²·4^(−b) for a memoryless Gaussian source of variance σ²."""
    return sigma2 * 4.0 ** (-bits)


def entropy_coded_gap(lattice: str) -> float:
    """High-rate gap D / D*(b) of an entropy-coded lattice quantizer: 2πe·G(Λ)."""
    return 2.0 * math.pi * math.e * LATTICES[lattice].G


def kv_cache_bytes(layers: int, kv_heads: int, head_dim: int, tokens: int, bits: float) -> float:
    """Bytes of a KV cache: 2 (K and V) · layers · kv_heads · head_dim · tokens · b / 8."""
    return 2.0 * layers * kv_heads * head_dim * tokens * bits / 8.0
