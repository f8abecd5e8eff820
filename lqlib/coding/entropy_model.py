"""Parametric probability tables for parity-aware E8 symbols.

With the entropy-coded scale ``a = sqrt(2πe·σ²)·2^(-b)`` a Gaussian source
of variance σ² has, in lattice units, the standard deviation
``s = σ/a = 2^b / sqrt(2πe)`` whatever σ is. The tables therefore depend on
the rate ``b`` only and cost no side information.

Model, with Φ the standard normal CDF and ``c`` the coset bit:

* free integer part ``z`` (positions 0..6) given ``c``:
  ``P(z = k) = Φ((k + c/2 + ½)/s) − Φ((k + c/2 − ½)/s)``;
* ``m = floor(z7 / 2)`` given ``c``: the mass of ``z7 ∈ {2m, 2m + 1}``;
* the coset bit: the Gaussian mass on D8 against D8 + ½·1 (theta sums).

Each table covers ``[-R, R]`` with R about 9 standard deviations, plus one
escape symbol (index ``2R + 1``) of probability at least ``2^-16`` for values
outside; escaped values are sent raw. On Gaussian data the model's
cross-entropy is within 0.0002 bit/dim of the empirical entropy of the
symbols (measured, see the tests).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np

__all__ = ["SymbolModel", "gaussian_symbol_model", "ESCAPE_PROBABILITY"]

ESCAPE_PROBABILITY = 2.0**-16
_TAIL_SIGMAS = 9.0


@dataclass(frozen=True, eq=False)  # compared and hashed by identity (one instance per rate)
class SymbolModel:
    """Probability tables for one rate.

    Attributes
    ----------
    radius : R; table index ``i`` stands for the value ``i − R``, index ``2R + 1`` is the escape.
    coset : shape (2,), float64, P(c = 0), P(c = 1).
    free : shape (2, 2R + 2), float64, table of z0..z6 given c (rows sum to 1).
    half : shape (2, 2R + 2), float64, table of floor(z7/2) given c.
    min_bits_per_block : a lower bound on the coded length of one block, in bits.
    """

    radius: int
    coset: np.ndarray
    free: np.ndarray
    half: np.ndarray
    min_bits_per_block: float

    @property
    def escape_index(self) -> int:
        return 2 * self.radius + 1


def _normal_cdf(t: np.ndarray) -> np.ndarray:
    return np.array([0.5 * math.erfc(-v / math.sqrt(2.0)) for v in t.tolist()])


def _with_escape(mass: np.ndarray) -> np.ndarray:
    escape = max(ESCAPE_PROBABILITY, 1.0 - mass.sum())
    table = np.append(mass, 0.0)
    table[:-1] *= (1.0 - escape) / mass.sum()
    table[-1] = escape
    return table


@functools.lru_cache(maxsize=64)
def gaussian_symbol_model(bits: float) -> SymbolModel:
    """Tables for rate ``bits`` (bits/dim), computed once and cached.

    Parameters
    ----------
    bits : target rate b in bits/dim, the value stored in the wire header.
    """
    s = 2.0**bits / math.sqrt(2.0 * math.pi * math.e)
    radius = int(math.ceil(_TAIL_SIGMAS * s)) + 2
    values = np.arange(-radius, radius + 1, dtype=np.float64)
    free = np.empty((2, 2 * radius + 2))
    half = np.empty((2, 2 * radius + 2))
    for c in (0, 1):
        shift = 0.5 * c
        free[c] = _with_escape(_normal_cdf((values + shift + 0.5) / s) - _normal_cdf((values + shift - 0.5) / s))
        half[c] = _with_escape(
            _normal_cdf((2.0 * values + shift + 1.5) / s) - _normal_cdf((2.0 * values + shift - 0.5) / s)
        )
    # theta sums: Gaussian mass on D8 and on D8 + 1/2, each over its parity-even half
    k = np.arange(-radius - 1, radius + 2, dtype=np.float64)
    sign = 1.0 - 2.0 * np.remainder(k, 2.0)
    pdf_int = np.exp(-0.5 * (k / s) ** 2)
    pdf_half = np.exp(-0.5 * ((k + 0.5) / s) ** 2)
    theta_int = pdf_int.sum() ** 8 + (sign * pdf_int).sum() ** 8
    theta_half = pdf_half.sum() ** 8 + (sign * pdf_half).sum() ** 8
    p_int = float(np.clip(theta_int / (theta_int + theta_half), 2.0**-12, 1.0 - 2.0**-12))
    coset = np.array([p_int, 1.0 - p_int])
    min_bits = float(-np.log2(coset.max()) - 7 * np.log2(free.max()) - np.log2(half.max()))
    return SymbolModel(radius, coset, free, half, min_bits)
