"""Scalar quantizers of Paper I's "scalar barrier": fixed-rate Lloyd–Max and entropy-coded uniform.

* Fixed rate: the MSE-optimal 2^b-level quantizer of the sample (Lloyd's algorithm,
  1-D k-means); at high rate on a Gaussian its distortion is √3·π/2 ≈ 2.72 times
  D*(b) = σ²·4^(−b) (Panter–Dite).
* Entropy coded: a uniform quantizer whose step makes the entropy of its output
  equal to b bits; at high rate its distortion is πe/6 ≈ 1.42 times D*(b).

Everything is vectorised over the sample (sorted once; cell sums by cumulative sums).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

__all__ = [
    "ScalarResult",
    "lloyd_max",
    "lloyd_max_levels",
    "lloyd_max_density",
    "DENSITIES",
    "fixed_rate_scalar",
    "entropy_coded_scalar",
    "empirical_entropy",
]


@dataclass(frozen=True)
class ScalarResult:
    """Distortion (MSE per sample) and rate (bits per sample) of a scalar quantizer on a sample."""

    mse: float
    rate: float


def empirical_entropy(symbols: np.ndarray) -> float:
    """Entropy in bits of the empirical distribution of an integer array (any shape, flattened)."""
    _, counts = np.unique(np.asarray(symbols).reshape(-1), return_counts=True)
    p = counts / counts.sum()
    return float(-(p * np.log2(p)).sum())


def _compander_levels(x_sorted: np.ndarray, levels: int, bins: int = 8192) -> np.ndarray:
    """Panter–Dite start: levels equally spaced in the cumulative of p^(1/3) (p a histogram density)."""
    hist, edges = np.histogram(x_sorted, bins=bins)
    cum = np.concatenate([[0.0], np.cumsum(np.cbrt(hist))])
    return np.interp((np.arange(levels) + 0.5) / levels * cum[-1], cum, edges)


def _kde_compander_levels(x_sorted: np.ndarray, levels: int, bins: int = 4096) -> np.ndarray:
    """Panter–Dite start: levels equally spaced in the cumulative of p^(1/3), with p a Gaussian-kernel
    density estimate of the sample (Silverman's bandwidth) on a grid that reaches past the extremes, so
    that the sparse tails get the levels the high-rate optimum gives them."""
    n = x_sorted.size
    spread = float(x_sorted[-1] - x_sorted[0]) or 1.0
    width = 1.06 * (float(x_sorted.std()) or spread) * n ** (-0.2)
    lo, hi = x_sorted[0] - 4.0 * width, x_sorted[-1] + 4.0 * width
    hist, edges = np.histogram(x_sorted, bins=bins, range=(lo, hi))
    cell = edges[1] - edges[0]
    half = int(np.ceil(4.0 * width / cell))
    kernel = np.exp(-0.5 * (np.arange(-half, half + 1) * cell / width) ** 2)
    density = np.convolve(hist.astype(np.float64), kernel / kernel.sum(), mode="same")
    cum = np.concatenate([[0.0], np.cumsum(np.cbrt(np.maximum(density, 0.0)))])
    return np.interp((np.arange(levels) + 0.5) / levels * cum[-1], cum, edges)


def lloyd_max_levels(
    samples: np.ndarray, levels: int, iterations: int = 100_000, rtol: float = 1e-9, check_every: int = 20
) -> np.ndarray:
    """MSE-optimal codebook of ``levels`` levels (any count ≥ 1) for ``samples`` (1-D), by Lloyd's algorithm.

    Starts from the high-rate optimum (the Panter–Dite compander: level density ∝ p^(1/3), p a kernel
    density estimate) and iterates until the distortion falls by less than ``rtol`` (relative) over
    ``check_every`` iterations: with many levels Lloyd's steps become tiny long before the distortion
    stops improving, so the distortion, not the step, decides. One iteration costs O(levels · log n).

    Returns
    -------
    np.ndarray, shape (levels,), sorted levels.
    """
    x = np.sort(np.asarray(samples, dtype=np.float64).reshape(-1))
    if levels < 1 or x.size < levels:
        raise ValueError(f"need 1 <= levels <= number of samples, got {levels} levels for {x.size} samples")
    prefix = np.concatenate([[0.0], np.cumsum(x)])
    prefix2 = np.concatenate([[0.0], np.cumsum(x * x)])
    codebook = _kde_compander_levels(x, levels) if levels > 1 else np.array([x.mean()])
    previous = np.inf
    for step in range(iterations):
        edges = np.searchsorted(x, 0.5 * (codebook[1:] + codebook[:-1]))
        bounds = np.concatenate([[0], edges, [x.size]])
        counts = np.diff(bounds)
        sums = prefix[bounds[1:]] - prefix[bounds[:-1]]
        if step % check_every == 0:
            squares = prefix2[bounds[1:]] - prefix2[bounds[:-1]]
            distortion = float((squares - 2.0 * codebook * sums + codebook**2 * counts).sum())
            if previous - distortion <= rtol * abs(distortion):
                break
            previous = distortion
        codebook = np.where(counts > 0, sums / np.maximum(counts, 1), codebook)
    return codebook


def lloyd_max(samples: np.ndarray, bits: int, iterations: int = 2000, tol: float = 1e-9) -> np.ndarray:
    """MSE-optimal codebook of 2^bits levels for ``samples`` (1-D), by Lloyd's algorithm.

    Starts from the high-rate optimum (the Panter–Dite compander: level density
    ∝ p^(1/3)) and stops when no level moves by more than ``tol`` times the
    sample's standard deviation. One iteration costs O(2^bits · log n).

    Returns
    -------
    np.ndarray, shape (2^bits,), sorted levels.
    """
    x = np.sort(np.asarray(samples, dtype=np.float64).reshape(-1))
    levels = 2 ** int(bits)
    if x.size < levels:
        raise ValueError(f"need at least {levels} samples for {bits} bits, got {x.size}")
    prefix = np.concatenate([[0.0], np.cumsum(x)])
    codebook = _compander_levels(x, levels)
    scale = x.std() or 1.0
    for _ in range(iterations):
        edges = np.searchsorted(x, 0.5 * (codebook[1:] + codebook[:-1]))
        bounds = np.concatenate([[0], edges, [x.size]])
        counts = np.diff(bounds)
        sums = prefix[bounds[1:]] - prefix[bounds[:-1]]
        updated = np.where(counts > 0, sums / np.maximum(counts, 1), codebook)
        moved = np.abs(updated - codebook).max()
        codebook = updated
        if moved < tol * scale:
            break
    return codebook


#: Unit-variance densities whose Lloyd–Max quantizers :func:`lloyd_max_density` designs exactly.
DENSITIES = ("gaussian", "laplace")


_erf = np.vectorize(math.erf, otypes=[np.float64])


def _cell_moments(source: str, t: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """∫_{-∞}^t x^k p(x) dx for k = 0, 1, 2 at the points ``t`` (±inf allowed)."""
    finite = np.isfinite(t)
    u = np.where(finite, t, 0.0)
    if source == "gaussian":
        pdf = np.where(finite, np.exp(-0.5 * u * u) / math.sqrt(2.0 * math.pi), 0.0)
        cdf = np.where(finite, 0.5 * (1.0 + _erf(u / math.sqrt(2.0))), (t > 0).astype(np.float64))
        return cdf, -pdf, cdf - u * pdf
    beta = 1.0 / math.sqrt(2.0)  # unit variance
    left, right = np.exp(np.minimum(u, 0.0) / beta), np.exp(-np.maximum(u, 0.0) / beta)
    neg = u < 0
    m0 = np.where(neg, 0.5 * left, 1.0 - 0.5 * right)
    m1 = np.where(neg, 0.5 * (u - beta) * left, -0.5 * (u + beta) * right)
    m2 = np.where(
        neg,
        0.5 * left * (u * u - 2 * beta * u + 2 * beta**2),
        2 * beta**2 - 0.5 * right * (u * u + 2 * beta * u + 2 * beta**2),
    )
    top = (t > 0).astype(np.float64)
    return np.where(finite, m0, top), np.where(finite, m1, 0.0), np.where(finite, m2, top * 2 * beta**2)


def _density(source: str, t: np.ndarray) -> np.ndarray:
    """p(t) of the unit-variance source (0 at ±inf)."""
    u = np.where(np.isfinite(t), t, 0.0)
    if source == "gaussian":
        p = np.exp(-0.5 * u * u) / math.sqrt(2.0 * math.pi)
    else:
        beta = 1.0 / math.sqrt(2.0)
        p = np.exp(-np.abs(u) / beta) / (2.0 * beta)
    return np.where(np.isfinite(t), p, 0.0)


def _compander_start(source: str, levels: int) -> np.ndarray:
    """Levels equally spaced in the cumulative of p^(1/3): a Gaussian (Laplace) of three times the
    variance (scale)."""
    u = (np.arange(levels, dtype=np.float64) + 0.5) / levels
    if source == "gaussian":
        return math.sqrt(3.0) * torch.special.ndtri(torch.from_numpy(u)).numpy()
    scale = 3.0 / math.sqrt(2.0)
    return np.where(u < 0.5, scale * np.log(2.0 * u), -scale * np.log(2.0 - 2.0 * u))


def _tridiagonal_solve(lower: np.ndarray, diag: np.ndarray, upper: np.ndarray, rhs: np.ndarray) -> np.ndarray:
    """Solve a tridiagonal system (Thomas algorithm); ``lower[0]`` and ``upper[-1]`` are ignored."""
    n = diag.size
    lo, di, up, r = lower.tolist(), diag.tolist(), upper.tolist(), rhs.tolist()
    c, d = [0.0] * n, [0.0] * n
    c[0], d[0] = up[0] / di[0], r[0] / di[0]
    for i in range(1, n):
        denominator = di[i] - lo[i] * c[i - 1]
        c[i] = up[i] / denominator
        d[i] = (r[i] - lo[i] * d[i - 1]) / denominator
    x = [0.0] * n
    x[-1] = d[-1]
    for i in range(n - 2, -1, -1):
        x[i] = d[i] - c[i] * x[i + 1]
    return np.array(x)


def _lloyd_state(source: str, c: np.ndarray) -> tuple[float, np.ndarray, np.ndarray, np.ndarray]:
    """Distortion, centroids, and the derivatives of each centroid by its lower and upper threshold."""
    t = np.concatenate([[-np.inf], 0.5 * (c[1:] + c[:-1]), [np.inf]])
    m0, m1, m2 = (np.diff(m) for m in _cell_moments(source, t))
    distortion = float((m2 - 2.0 * c * m1 + c * c * m0).sum())
    mass = np.maximum(m0, 1e-300)
    centroid = m1 / mass
    p, finite = _density(source, t), np.where(np.isfinite(t), t, 0.0)
    return distortion, centroid, p[:-1] * (centroid - finite[:-1]) / mass, p[1:] * (finite[1:] - centroid) / mass


def _newton_step(source: str, c: np.ndarray, state: tuple) -> tuple[np.ndarray, tuple] | None:
    """A Newton step on the Lloyd–Max conditions, halved until it lowers the distortion and keeps the
    levels in order; None when no such step is found (the Jacobian can be singular, e.g. a Laplace's
    tail cells move with their thresholds)."""
    distortion, centroid, by_lower, by_upper = state
    lower, upper = -0.5 * by_lower, -0.5 * by_upper  # I - J, J the tridiagonal Jacobian of the centroids
    try:
        step = _tridiagonal_solve(lower, 1.0 + lower + upper, upper, centroid - c)
    except ZeroDivisionError:
        return None
    if not np.all(np.isfinite(step)):
        return None
    for _ in range(30):
        trial = c + step
        if np.all(np.diff(trial) > 0):
            new = _lloyd_state(source, trial)
            if new[0] <= distortion:
                return trial, new
        step = 0.5 * step
    return None


def lloyd_max_density(source: str, levels: int, iterations: int = 200, tol: float = 1e-12) -> tuple[np.ndarray, float]:
    """The Lloyd–Max quantizer of a unit-variance ``"gaussian"`` or ``"laplace"`` density, designed on the
    density itself (cell probabilities and centroids in closed form), not on a sample.

    Solves the Lloyd–Max conditions (every level the centroid of its cell, every threshold halfway
    between its levels) by Newton's method from the Panter–Dite compander (the Jacobian of the centroids
    is tridiagonal), falling back to a plain Lloyd step where Newton's step does not lower the
    distortion; stops when no level is more than ``tol`` from its centroid.

    Returns
    -------
    (levels, distortion): the sorted levels, shape (levels,), and the exact MSE of the quantizer.
    """
    if source not in DENSITIES:
        raise ValueError(f"source must be one of {DENSITIES}, got {source!r}")
    if levels < 1:
        raise ValueError(f"need at least one level, got {levels}")
    c = _compander_start(source, levels) if levels > 1 else np.zeros(1)
    state = _lloyd_state(source, c)
    for _ in range(iterations):
        if float(np.abs(state[1] - c).max()) < tol:
            break
        newton = _newton_step(source, c, state)
        c, state = newton if newton is not None else (state[1], _lloyd_state(source, state[1]))
    return c, state[0]


def fixed_rate_scalar(samples: np.ndarray, bits: int) -> ScalarResult:
    """Lloyd–Max quantizer designed and evaluated on ``samples``: (MSE, rate = bits)."""
    x = np.asarray(samples, dtype=np.float64).reshape(-1)
    codebook = lloyd_max(x, bits)
    index = np.searchsorted(0.5 * (codebook[1:] + codebook[:-1]), x)
    return ScalarResult(float(np.mean((x - codebook[index]) ** 2)), float(bits))


def entropy_coded_scalar(samples: np.ndarray, bits: float, iterations: int = 60) -> ScalarResult:
    """Uniform quantizer (midtread, step Δ) whose output entropy is ``bits``; Δ by bisection.

    Returns the MSE and the entropy actually reached (within 1e-3 bits of ``bits``
    unless the sample is too small to carry that much entropy).
    """
    x = np.asarray(samples, dtype=np.float64).reshape(-1)
    lo, hi = np.log(x.std() * 1e-4), np.log(x.std() * 1e2)  # log Δ bracket: entropy decreases in Δ
    for _ in range(iterations):
        mid = 0.5 * (lo + hi)
        if empirical_entropy(np.round(x / np.exp(mid)).astype(np.int64)) > bits:
            lo = mid
        else:
            hi = mid
    step = np.exp(0.5 * (lo + hi))
    q = np.round(x / step)
    return ScalarResult(float(np.mean((x - q * step) ** 2)), empirical_entropy(q.astype(np.int64)))
