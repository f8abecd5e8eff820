"""Entropy coding of parity-aware E8 symbols with one Gaussian per coordinate (an adaptive model).

:mod:`lqlib.coding.entropy_model` models every coordinate of every block with the same Gaussian,
whose width follows from the rate alone (no side information); that fits vectors whose coordinates
all have the same spread, which the RHT arranges. Coded *without* the RHT, the coordinates of real
keys and values have very different spreads (a few channels carry most of the energy), and a model
with one width per coordinate, measured on calibration data, codes them in fewer bits: the
transform-coding gain ½·log2(AM/GM) of the coordinates' variances.

Model, in lattice units, for a block with coordinate widths s_0..s_7 and coset bit c:

* coset: P(c) ∝ the Gaussian mass of D8 + c/2 (theta sums, one product over the 8 coordinates),
  clipped to [2^-12, 1 − 2^-12];
* free integer part z_j (j < 7) given c: a Gaussian of mean −c/2 and width s_j quantized to unit bins
  (``P(z = k) = Φ((k + c/2 + ½)/s_j) − Φ((k + c/2 − ½)/s_j)``);
* m = floor(z_7 / 2) given c: the mass of z_7 ∈ {2m, 2m + 1}, a Gaussian of mean −¼ − c/4 and width
  s_7 / 2 quantized to unit bins.

Symbols are coded with ``constriction``'s per-symbol ``QuantizedGaussian`` over the alphabet
[−R, R], with R the largest magnitude in the stream (stored by the caller): every symbol is in the
alphabet, so there are no escapes, and the mass the coder reserves for the rest of the alphabet
((2R + 1)·2^-24 per symbol) costs nothing measurable for R in the hundreds.

Stream layout (one ANS stack, decoding order): the coset bits of all blocks, then the seven free
symbols of every block, then every block's floor(z_7 / 2).
"""

from __future__ import annotations

import constriction
import numpy as np
import torch
from torch import Tensor

from ..errors import CorruptStreamError, InputError

__all__ = [
    "MAX_RADIUS",
    "coset_probabilities",
    "code_length",
    "encode_channel_symbols",
    "decode_channel_symbols",
    "symbol_radius",
]

#: Largest symbol magnitude the coder accepts: (2R + 1) must stay well below the coder's 2^24 slots.
MAX_RADIUS = (1 << 20) - 1
_MIN_COSET = 2.0**-12
_Gaussian = constriction.stream.model.QuantizedGaussian
_Categorical = constriction.stream.model.Categorical(perfect=False)


def coset_probabilities(stds: np.ndarray) -> np.ndarray:
    """P(c = 1) of a block whose coordinates have Gaussian widths ``stds`` (..., 8) in lattice units.

    The mass of D8 + c/2 is ½·(Π_j A_j + Π_j B_j) with A_j = Σ_k φ((k + c/2)/s_j) and
    B_j = Σ_k (−1)^k φ((k + c/2)/s_j) (the parity-even half of Z^8 + c/2). Returns float64 of shape
    (...,), clipped to [2^-12, 1 − 2^-12]."""
    s = np.asarray(stds, dtype=np.float64)
    if s.shape[-1:] != (8,) or not np.all(s > 0) or not np.all(np.isfinite(s)):
        raise InputError(f"stds must be finite and > 0 with a last dim of 8, got shape {s.shape}")
    radius = int(np.ceil(12.0 * s.max())) + 3
    k = np.arange(-radius, radius + 1, dtype=np.float64)
    sign = 1.0 - 2.0 * np.remainder(k, 2.0)
    col = s[..., None]
    pdf_int = np.exp(-0.5 * (k / col) ** 2)
    pdf_half = np.exp(-0.5 * ((k + 0.5) / col) ** 2)
    a_int = pdf_int.sum(-1)
    ratio_b = (sign * pdf_int).sum(-1) / a_int  # each factor normalised by A_j (cancels in the ratio)
    ratio_ah = pdf_half.sum(-1) / a_int
    ratio_bh = (sign * pdf_half).sum(-1) / a_int
    mass_int = 1.0 + ratio_b.prod(-1)
    mass_half = ratio_ah.prod(-1) + ratio_bh.prod(-1)
    return np.clip(mass_half / (mass_int + mass_half), _MIN_COSET, 1.0 - _MIN_COSET)


def symbol_radius(symbols: np.ndarray) -> int:
    """R = the largest |symbol| among the free and half symbols (columns 1..8), at least 1."""
    if symbols.size == 0:
        return 1
    radius = max(1, int(np.abs(symbols[:, 1:]).max()))
    if radius > MAX_RADIUS:
        raise InputError(
            f"a lattice coordinate of magnitude {radius} exceeds {MAX_RADIUS}: the input lies far outside the "
            "range the calibrated step was made for"
        )
    return radius


def _parameters(coset: np.ndarray, stds: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(free means, free widths, half means, half widths) of every symbol, flattened in stream order."""
    shift = 0.5 * coset.astype(np.float64)
    free_mean = np.repeat(-shift, 7)
    free_std = np.ascontiguousarray(stds[:, :7]).reshape(-1)
    half_mean = -0.25 - 0.5 * shift
    half_std = np.ascontiguousarray(0.5 * stds[:, 7])
    return free_mean, free_std, half_mean, half_std


def _check(stds: np.ndarray, p_half: np.ndarray, n_blocks: int) -> tuple[np.ndarray, np.ndarray]:
    stds = np.ascontiguousarray(stds, dtype=np.float64)
    p_half = np.ascontiguousarray(p_half, dtype=np.float64).reshape(-1)
    if stds.shape != (n_blocks, 8) or p_half.shape != (n_blocks,):
        raise InputError(
            f"need stds ({n_blocks}, 8) and coset probabilities ({n_blocks},), got {stds.shape}, {p_half.shape}"
        )
    return stds, p_half


def encode_channel_symbols(
    symbols: np.ndarray, stds: np.ndarray, p_half: np.ndarray, radius: int | None = None
) -> tuple[np.ndarray, int]:
    """Entropy-code parity-aware symbols with per-coordinate widths.

    Parameters
    ----------
    symbols : (n_blocks, 9) int32, from :func:`lqlib.core.symbols.points_to_symbols`.
    stds : (n_blocks, 8) float64, each coordinate's Gaussian width in lattice units (> 0).
    p_half : (n_blocks,) float64, P(c = 1) of each block (:func:`coset_probabilities`).
    radius : alphabet half-width R (default: :func:`symbol_radius` of ``symbols``).

    Returns
    -------
    (uint32 words, R): the decoder needs R, the widths and the coset probabilities.
    """
    symbols = np.ascontiguousarray(symbols, dtype=np.int32)
    n_blocks = symbols.shape[0]
    stds, p_half = _check(stds, p_half, n_blocks)
    radius = symbol_radius(symbols) if radius is None else int(radius)
    coset = np.ascontiguousarray(symbols[:, 0])
    free_mean, free_std, half_mean, half_std = _parameters(coset, stds)
    model = _Gaussian(-radius, radius)
    coder = constriction.stream.stack.AnsCoder()
    coder.encode_reverse(np.ascontiguousarray(symbols[:, 8]), model, half_mean, half_std)
    coder.encode_reverse(np.ascontiguousarray(symbols[:, 1:8]).reshape(-1), model, free_mean, free_std)
    coder.encode_reverse(coset, _Categorical, np.stack([1.0 - p_half, p_half], axis=1))
    return coder.get_compressed(), radius


def decode_channel_symbols(
    words: np.ndarray, n_blocks: int, stds: np.ndarray, p_half: np.ndarray, radius: int
) -> np.ndarray:
    """Inverse of :func:`encode_channel_symbols`: (n_blocks, 9) int32 symbols.

    Raises
    ------
    CorruptStreamError
        if the words do not decode to exactly ``n_blocks`` blocks.
    """
    stds, p_half = _check(stds, p_half, n_blocks)
    if not 1 <= radius <= MAX_RADIUS:
        raise CorruptStreamError(f"alphabet radius {radius} is out of range")
    model = _Gaussian(-radius, radius)
    try:
        coder = constriction.stream.stack.AnsCoder(np.ascontiguousarray(words, dtype=np.uint32))
        coset = coder.decode(_Categorical, np.stack([1.0 - p_half, p_half], axis=1)).astype(np.int32)
        free_mean, free_std, half_mean, half_std = _parameters(coset, stds)
        free = coder.decode(model, free_mean, free_std)
        half = coder.decode(model, half_mean, half_std)
        empty = coder.is_empty()
    except (ValueError, RuntimeError, OverflowError) as exc:
        raise CorruptStreamError(f"entropy-coded payload does not decode: {exc}") from exc
    if not empty:
        raise CorruptStreamError("entropy-coded payload has trailing data: it does not match its header")
    symbols = np.empty((n_blocks, 9), dtype=np.int32)
    symbols[:, 0] = coset
    symbols[:, 1:8] = free.reshape(n_blocks, 7)
    symbols[:, 8] = half
    return symbols


def _interval_mass(lower: Tensor, upper: Tensor) -> Tensor:
    """P(lower < N < upper) for a standard normal N, accurate in both tails."""
    upper_tail = lower >= 0
    mass = torch.where(
        upper_tail,
        torch.special.ndtr(-lower) - torch.special.ndtr(-upper),
        torch.special.ndtr(upper) - torch.special.ndtr(lower),
    )
    return mass.clamp_min(2.0**-24)  # the coder gives no symbol less than one slot in 2^24


def code_length(points: Tensor, widths: Tensor, p_half: Tensor) -> float:
    """Ideal code length in bits of E8 points under the model: −Σ log2 P of every coset bit, free symbol
    and floor(z_7 / 2) — what :func:`encode_channel_symbols` writes, to within its few words of flush.

    Parameters
    ----------
    points : (..., 8) E8 points in lattice units.
    widths : widths in lattice units, broadcastable to ``points``.
    p_half : P(c = 1) per block, broadcastable to ``points.shape[:-1]``.
    """
    p = points.to(torch.float64)
    s = torch.as_tensor(widths, dtype=torch.float64, device=p.device).expand_as(p)
    q = torch.as_tensor(p_half, dtype=torch.float64, device=p.device).expand(p.shape[:-1])
    floor = torch.floor(p)
    coset = p[..., 0] - floor[..., 0]  # 0 or ½
    bits = -torch.where(coset > 0, q, 1.0 - q).log2().sum()
    shift = coset[..., None]
    free = floor[..., :7]
    bits -= _interval_mass((free + shift - 0.5) / s[..., :7], (free + shift + 0.5) / s[..., :7]).log2().sum()
    half = torch.div(floor[..., 7:], 2, rounding_mode="floor")
    bits -= _interval_mass((2 * half + shift - 0.5) / s[..., 7:], (2 * half + shift + 1.5) / s[..., 7:]).log2().sum()
    return float(bits)
