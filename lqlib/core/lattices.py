"""Nearest-point maps (closest-vector quantizers) for Z^n, A2, D_n and E8.

All maps act on the last axis of a float tensor of any leading shape, work on
CPU and CUDA in float32/float64, and are written with ``where``/``gather``
only: no boolean indexing, no ``.item()``, hence no host synchronisation.

Sums over a block (the D_n parity, E8's choice between its two cosets) are taken
in one fixed order, :func:`pairwise_sum`, not in whatever order a library's
reduction picks: every device, and the Triton kernels of :mod:`lqlib.kernels`,
then make the same decision on the same input, ties and near-ties included.

The algorithms are those of Conway & Sloane, "Fast quantizing and decoding
algorithms for lattice quantizers and codes" (IEEE Trans. IT, 1982).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "Lattice",
    "LATTICES",
    "nearest_zn",
    "nearest_a2",
    "nearest_dn",
    "nearest_e8",
    "normalized_second_moment",
    "pairwise_sum",
    "CosetTrace",
    "E8Trace",
    "trace_e8",
]

_SQRT3 = math.sqrt(3.0)


def pairwise_sum(x: Tensor) -> Tensor:
    """Sum over the last axis in a fixed order: adjacent pairs, then pairs of pairs, and so on.

    ``((x0 + x1) + (x2 + x3)) + ((x4 + x5) + (x6 + x7))`` for 8 values; a length that is not
    a power of two is padded with zeros. Returns shape (..., 1). Each addition is one IEEE
    operation, so the result is the same on every device.
    """
    n = x.shape[-1]
    width = 1 << max(n - 1, 0).bit_length()
    if width != n:
        x = torch.cat([x, x.new_zeros(*x.shape[:-1], width - n)], dim=-1)
    while x.shape[-1] > 1:
        pairs = x.reshape(*x.shape[:-1], x.shape[-1] // 2, 2)
        x = pairs[..., 0] + pairs[..., 1]
    return x


def nearest_zn(x: Tensor) -> Tensor:
    """Closest point of the integer lattice Z^n: coordinate-wise rounding.

    Parameters
    ----------
    x : Tensor, shape (..., n), floating.
    """
    return torch.round(x)


def _parity(points: Tensor) -> Tensor:
    """Parity of the sum of integer coordinates over the last axis: (..., 1), 0.0 or 1.0."""
    total = pairwise_sum(points)
    return total - 2.0 * torch.floor(total / 2.0)


def nearest_dn(x: Tensor) -> Tensor:
    """Closest point of the checkerboard lattice D_n = {z in Z^n : sum(z) even}.

    Round every coordinate; where the coordinate sum is odd, re-round the
    coordinate with the largest rounding error towards its other neighbour.

    Parameters
    ----------
    x : Tensor, shape (..., n) with n >= 2, floating.
    """
    f = torch.round(x)
    err = x - f
    worst = err.abs().argmax(dim=-1, keepdim=True)  # the first largest
    away = torch.where(err.gather(-1, worst) >= 0, 1.0, -1.0).to(x.dtype)
    return f.scatter_add(-1, worst, away * _parity(f))


def nearest_e8(x: Tensor) -> Tensor:
    """Closest point of the Gosset lattice E8 = D8 ∪ (D8 + ½·1).

    Both cosets come from one rounding, f = round(x) with errors e = x - f (exact in floats):

    * even coset: D8 at x, i.e. f with, where Σf is odd, the coordinate of largest |e| (the first
      such) moved one step towards x;
    * odd coset: the nearest half-integers are g + ½ with g = f - t, t = 1 where e's sign bit is
      set (e < 0, or e = -0 at x = -0; f itself is never -0) and 0 elsewhere; their errors are
      |o| = ½ - |e|, so where Σg is odd the coordinate of largest |o| is that of smallest |e| (the
      first such), moved towards x (up where t = 1, down where t = 0);
    * choice: e_i² - o_i² = |e_i| - ¼ and a moved coordinate adds 1 - 2|e_w| (even) or
      1 - 2|o_w| = 2|e_v| (odd), so ``d_even - d_odd = Σ|e| - 2 + [Σf odd](1 - 2|e_w|) - [Σg odd]·2|e_v|``;
      the odd coset wins where this is > 0 (ties go to the even one).

    Every sum is :func:`pairwise_sum`, so the Triton kernels take the same decisions bit for bit.
    All choices at ties (t at e = 0, the first index) are between points at equal distance.

    Parameters
    ----------
    x : Tensor, shape (..., 8), floating.

    Returns
    -------
    Tensor, shape (..., 8): points whose coordinates are all integers or all
    half-integers, with an even sum of the integer parts.
    """
    if x.shape[-1] != 8:
        raise ValueError(f"E8 acts on blocks of 8 coordinates, got last dim {x.shape[-1]}")
    f = torch.round(x) + 0.0  # no negative zeros: e = -0 only where x = -0
    err = x - f
    size = err.abs()
    t = torch.signbit(err).to(x.dtype)
    # even coset
    odd_f = _parity(f)
    w = size.argmax(dim=-1, keepdim=True)  # the first largest |e|
    err_w = err.gather(-1, w)
    even = f.scatter_add(-1, w, torch.where(err_w >= 0, 1.0, -1.0).to(x.dtype) * odd_f)
    # odd coset
    g = f - t
    odd_g = _parity(g)
    v = size.argmin(dim=-1, keepdim=True)  # the first smallest |e|: largest |o|
    up = torch.where(t.gather(-1, v) > 0, 1.0, -1.0).to(x.dtype)
    odd = g.scatter_add(-1, v, up * odd_g) + 0.5
    gap = ((pairwise_sum(size) - 2.0) + odd_f * (1.0 - 2.0 * err_w.abs())) - odd_g * (2.0 * size.gather(-1, v))
    return torch.where(gap > 0, odd, even)


@dataclass(frozen=True)
class CosetTrace:
    """The nearest point of one coset of E8 (D8, or D8 + ½·1) to a block, step by step.

    Attributes
    ----------
    rounded : each coordinate rounded to the coset's grid (integers, or integers + ½), shape (8,).
    error : x − rounded, shape (8,).
    parity : parity of the sum of the integer parts of ``rounded`` (0 even, 1 odd).
    fixed : the coordinate re-rounded the other way when the parity is odd (the largest |error|), or None.
    point : the coset's nearest point (even sum of integer parts), shape (8,).
    distance2 : squared distance from x to ``point``.
    """

    rounded: np.ndarray
    error: np.ndarray
    parity: int
    fixed: int | None
    point: np.ndarray
    distance2: float


@dataclass(frozen=True)
class E8Trace:
    """Conway & Sloane's nearest-point search in E8 = D8 ∪ (D8 + ½·1) on one block: both cosets and the choice.

    Attributes
    ----------
    x : the block, shape (8,) (already divided by the step).
    even, odd : the searches in D8 and in D8 + ½·1.
    coset : 0 when the even coset's point is chosen (ties included), 1 for the odd one.
    point : the nearest E8 point, shape (8,).
    """

    x: np.ndarray
    even: CosetTrace
    odd: CosetTrace
    coset: int
    point: np.ndarray


def _coset_trace(x: np.ndarray, shift: float) -> CosetTrace:
    rounded = np.round(x - shift) + shift
    error = x - rounded
    parity = int(np.round(np.sum(rounded - shift))) % 2
    point, fixed = rounded.copy(), None
    if parity:
        fixed = int(np.argmax(np.abs(error)))  # the first largest error
        point[fixed] += 1.0 if error[fixed] >= 0 else -1.0
    return CosetTrace(rounded, error, parity, fixed, point, float(np.sum((x - point) ** 2)))


def trace_e8(block: np.ndarray | Tensor) -> E8Trace:
    """The steps of the nearest E8 point to one block of 8 coordinates (the textbook algorithm, kept for
    reading; :func:`nearest_e8` computes the same point vectorised): in each coset round every
    coordinate, and where the sum of the integer parts is odd re-round the coordinate with the largest
    rounding error the other way; keep the closer of the two points (the even one at a tie)."""
    x = np.asarray(block.detach().cpu() if isinstance(block, Tensor) else block, dtype=np.float64).reshape(-1)
    if x.shape != (8,) or not np.all(np.isfinite(x)):
        raise ValueError(f"need one block of 8 finite coordinates, got shape {x.shape}")
    even, odd = _coset_trace(x, 0.0), _coset_trace(x, 0.5)
    coset = int(odd.distance2 < even.distance2)
    return E8Trace(x, even, odd, coset, (odd if coset else even).point.copy())


def nearest_a2(x: Tensor) -> Tensor:
    """Closest point of the hexagonal lattice A2 with basis (1, 0), (½, √3/2).

    A2 is the union of the rectangular lattices Z × √3Z and its translate by
    (½, √3/2); the nearer of the two rectangular candidates wins.

    Parameters
    ----------
    x : Tensor, shape (..., 2), floating.
    """
    if x.shape[-1] != 2:
        raise ValueError(f"A2 acts on pairs of coordinates, got last dim {x.shape[-1]}")
    u, v = x[..., 0], x[..., 1] / _SQRT3
    first = torch.stack([torch.round(u), torch.round(v) * _SQRT3], dim=-1)
    second = torch.stack([torch.round(u - 0.5) + 0.5, (torch.round(v - 0.5) + 0.5) * _SQRT3], dim=-1)
    d_first = (x - first).square().sum(dim=-1, keepdim=True)
    d_second = (x - second).square().sum(dim=-1, keepdim=True)
    return torch.where(d_second < d_first, second, first)


@dataclass(frozen=True)
class Lattice:
    """A lattice quantizer with its exact normalized second moment.

    Attributes
    ----------
    name : short name used in tables ("Z", "A2", "D4", "E8", ...).
    dim : dimension n.
    covolume : volume of a Voronoi cell of the lattice as ``nearest`` scales it.
    G : exact (or tabulated) normalized second moment, dimensionless.
    nearest : closest-point map, or None for lattices only quoted from tables.
    fundamental_box : sides of an axis-aligned box spanned by lattice vectors, so
        a uniform sample of the box is uniform modulo the lattice (None for
        lattices quoted from tables).
    source : where the value of G comes from.
    """

    name: str
    dim: int
    covolume: float
    G: float
    nearest: Callable[[Tensor], Tensor] | None
    fundamental_box: tuple[float, ...] | None
    source: str


LATTICES: dict[str, Lattice] = {
    "Z": Lattice("Z", 1, 1.0, 1.0 / 12.0, nearest_zn, (1.0,), "1/12"),
    "A2": Lattice("A2", 2, _SQRT3 / 2.0, 5.0 / (36.0 * _SQRT3), nearest_a2, (1.0, _SQRT3), "5/(36·√3)"),
    "D4": Lattice("D4", 4, 2.0, 13.0 / (120.0 * math.sqrt(2.0)), nearest_dn, (2.0,) * 4, "13/(120·√2)"),
    "E8": Lattice("E8", 8, 1.0, 929.0 / 12960.0, nearest_e8, (2.0,) * 8, "929/12960"),
    "BW16": Lattice("BW16", 16, float("nan"), 0.068299, None, None, "Conway & Sloane, Table 2.3"),
    "Leech": Lattice("Leech", 24, float("nan"), 0.065771, None, None, "Conway & Sloane, Table 2.3"),
}


def normalized_second_moment(
    lattice: Lattice | str,
    n_samples: int = 1_000_000,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
) -> tuple[float, float]:
    """Monte-Carlo estimate of G(Λ) = E‖x − Q(x)‖² / (n · V^(2/n)).

    ``x`` is uniform on a box whose sides are lattice vectors, hence uniform
    modulo the lattice, so the estimate is unbiased.

    Returns
    -------
    (estimate, standard_error), both dimensionless.
    """
    lat = LATTICES[lattice] if isinstance(lattice, str) else lattice
    if lat.nearest is None or lat.fundamental_box is None:
        raise ValueError(f"{lat.name} has no nearest-point map here; its G is quoted only")
    gen = torch.Generator().manual_seed(seed)
    box = torch.tensor(lat.fundamental_box, dtype=dtype)
    x = torch.rand(n_samples, lat.dim, generator=gen, dtype=dtype) * box
    per_sample = (x - lat.nearest(x)).square().sum(dim=-1) / (lat.dim * lat.covolume ** (2.0 / lat.dim))
    return per_sample.mean().item(), (per_sample.std() / math.sqrt(n_samples)).item()
