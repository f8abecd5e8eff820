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
    "ENTROPY_POWER_RATIO",
    "PANTER_DITE_CONSTANT",
    "high_rate_gaps",
    "FIXED_LENGTH_WASTE_BITS",
    "fixed_rate_block_gap",
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


#: Entropy power over variance, 2^(2h) / (2πe·σ²), of the unit-variance sources with closed forms: 1 for a
#: Gaussian (the largest), e/π for a Laplace. An entropy-coded quantizer's high-rate gap against the
#: Gaussian bound σ²·4^(−R) is 2πe·G(Λ) times this.
ENTROPY_POWER_RATIO = {"gaussian": 1.0, "laplace": math.e / math.pi}
#: Panter–Dite constant (∫p^(1/3))³/12 / σ² of the same sources: the high-rate D·4^b/σ² of the optimal
#: fixed-rate scalar quantizer (√3·π/2 for a Gaussian, 9/2 for a Laplace).
PANTER_DITE_CONSTANT = {"gaussian": PANTER_DITE_GAP, "laplace": 4.5}


def high_rate_gaps(source: str) -> dict[str, float]:
    """High-rate limits of D / (σ²·4^(−R)) for ``"gaussian"`` or ``"laplace"``: entropy-coded ``"E8"``,
    ``"D4"``, ``"A2"``, ``"Z"`` (2πe·G(Λ) times the entropy power ratio) and ``"fixed"`` (Panter–Dite)."""
    if source not in ENTROPY_POWER_RATIO:
        raise ValueError(f"high-rate limits are known here for {sorted(ENTROPY_POWER_RATIO)}, got {source!r}")
    limits = {name: entropy_coded_gap(name) * ENTROPY_POWER_RATIO[source] for name in ("E8", "D4", "A2", "Z")}
    limits["fixed"] = PANTER_DITE_CONSTANT[source]
    return limits


#: Bits/dim a fixed-length code of the Lloyd–Max index spends over the index's entropy at high rate: the
#: relative entropy D(p ‖ λ) of the source from the Panter–Dite point density λ ∝ p^(1/3) (a Gaussian of
#: three times the variance, a Laplace of three times the scale): (ln 3 + 1/3 − 1)/2 nats for a Gaussian,
#: ln 3 + 1/3 − 1 nats for a Laplace. 4 to this power is the share of the fixed-rate penalty it explains.
FIXED_LENGTH_WASTE_BITS = {
    "gaussian": 0.5 * (math.log(3.0) + 1.0 / 3.0 - 1.0) / math.log(2.0),
    "laplace": (math.log(3.0) + 1.0 / 3.0 - 1.0) / math.log(2.0),
}


def fixed_rate_block_gap(n: int) -> float:
    """High-rate MSE of the best fixed-rate code of n-dimensional blocks of a Gaussian over that of an
    entropy-coded quantizer with the same cells and rate (Zador): ``(1 + 2/n)^((n + 2)/2) / e``.

    The optimal fixed-rate point density is ``p^(n/(n+2))``; n = 1 gives :data:`FIXED_RATE_GAP`
    (3√3/e), n = 8 (one E8 block) 1.25^5/e, and the gap falls to 1 as n grows."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"the block dimension must be a positive integer, got {n!r}")
    return (1.0 + 2.0 / n) ** ((n + 2) / 2.0) / math.e
