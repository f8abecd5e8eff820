"""Measured rate and distortion of the codec, and the Gaussian validation of Paper I, Table 3.

Rates are bits/dim counted from the bytes the codec actually produced (all side
information included); distortion is MSE per dim; the gap is D / D*(b) with
D*(b) = σ²·4^(−b) at the *target* rate b and σ² the source's measured second moment.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from ..coding.codec import E8Codec
from ..coding.entropy_model import gaussian_symbol_model
from ..coding.wire import steps_nbytes
from ..core.lattices import LATTICES, nearest_dn, nearest_e8
from ..core.scalar import (
    DENSITIES,
    ScalarResult,
    empirical_entropy,
    entropy_coded_scalar,
    fixed_rate_scalar,
    lloyd_max_density,
    lloyd_max_levels,
)
from ..core.steps import exact_step_code, exact_step_value
from ..core.symbols import points_to_symbols
from ..core.theory import entropy_coded_gap, gaussian_distortion_bound, high_rate_gaps
from ..errors import InputError
from .stats import Estimate

__all__ = [
    "RatePoint",
    "measure",
    "gaussian_validation",
    "SOURCES",
    "FAMILIES",
    "make_source",
    "lattice_entropy_coded",
    "family_point",
    "model_code_length",
    "parity_saving",
    "explain_block",
    "codec_point",
    "mse_at_rate",
    "symbol_group_bits",
    "block_code_lengths",
    "byte_budget",
    "LADDER_RUNGS",
    "RungPoint",
    "Factor",
    "Ladder",
    "gap_ladders",
    "ChunkedPoint",
    "chunked_point",
    "equal_rate_ratio",
    "gap_at_target",
    "PlanePoint",
    "plane_point",
]

#: Synthetic sources of unit variance (real KV is passed in as a sample).
SOURCES = ("gaussian", "laplace", "uniform")
#: Quantizer families of the scalar-barrier comparison.
FAMILIES = ("scalar fixed-rate", "scalar + EC", "D4 + EC", "E8 + EC")


@dataclass(frozen=True)
class RatePoint:
    """One codec run on one source.

    Attributes
    ----------
    target_bits : the codec's b (bits/dim).
    coded_bits : bits/dim of the stored bytes.
    mse : mean squared error per dim.
    sigma2 : mean square of the source per dim.
    gap : mse / (sigma2 · 4^(−target_bits)).
    lossless : whether decode(encode(x)) == quantize(x) held exactly.
    """

    target_bits: float
    coded_bits: float
    mse: float
    sigma2: float
    gap: float
    lossless: bool


def measure(codec: E8Codec, x: Tensor) -> RatePoint:
    """Encode ``x``, serialise, parse, decode; report the rate and distortion actually reached."""
    encoded = codec.encode(x)
    decoded = codec.decode(type(encoded).from_bytes(encoded.to_bytes()), device=x.device)
    x64 = x.to(torch.float64)
    mse = (decoded.to(torch.float64) - x64).square().mean().item()
    sigma2 = x64.square().mean().item()
    lossless = torch.equal(decoded, codec.quantize(x))
    return RatePoint(
        codec.bits,
        codec.bits_per_dim(encoded),
        mse,
        sigma2,
        mse / gaussian_distortion_bound(codec.bits, sigma2),
        lossless,
    )


#: The target rates of Paper I, Table 3.
TABLE3_BITS = (2.0, 2.5, 3.0, 4.0, 5.0, 6.0)


def gaussian_validation(
    bits: tuple[float, ...] = TABLE3_BITS, n_blocks: int = 1_000_000, seed: int = 0, progress: bool = True
) -> list[dict]:
    """Paper I, Table 3 from actual bytes: one row per target rate (measured values only; the
    book's :func:`lqlib.book.paper1.table3_rows` sets the paper's values beside them).

    The source is i.i.d. N(0, 1) in float32, ``n_blocks`` blocks of 8; the codec
    runs without rotation (a Gaussian is rotation invariant) and with one scale
    for the whole tensor, as in the paper. Each row carries 95% Monte Carlo intervals: ``coded_bits_low``
    / ``_high`` from the spread of the per-block code lengths under the codec's tables, ``gap_low`` /
    ``_high`` from the per-block squared errors and second moments (delta method).
    """
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n_blocks, 8, generator=gen)
    exact_gap = entropy_coded_gap("E8")
    x64 = x.to(torch.float64).numpy()
    power = (x64**2).mean(axis=1)
    rows = []
    for b in tqdm(bits, desc="Gaussian validation", disable=not progress):
        codec = E8Codec(b, rotation="none", scale="tensor")
        point = measure(codec, x)
        err = ((codec.quantize(x).to(torch.float64).numpy() - x64) ** 2).mean(axis=1)
        symbols = points_to_symbols(codec._analyse(x)[0].reshape(-1, 8)).numpy()
        lengths = block_code_lengths(symbols, b) / 8.0
        rate_half = _Z95 * float(lengths.std(ddof=1)) / math.sqrt(n_blocks)
        gap = _interval(point.gap, (err - err.mean()) / err.mean() - (power - power.mean()) / power.mean())
        rows.append(
            {
                **asdict(point),
                "coded_bits_low": point.coded_bits - rate_half,
                "coded_bits_high": point.coded_bits + rate_half,
                "gap_low": gap.low,
                "gap_high": gap.high,
                "rate_over_target": point.coded_bits / point.target_bits,
                "exact_gap": exact_gap,
                "gap_vs_exact": point.gap / exact_gap - 1.0,
                "n_blocks": n_blocks,
            }
        )
    return rows


def make_source(name: str, n: int, seed: int = 0) -> np.ndarray:
    """``n`` i.i.d. samples of a unit-variance ``"gaussian"``, ``"laplace"`` or ``"uniform"`` source."""
    rng = np.random.default_rng(seed)
    if name == "gaussian":
        return rng.standard_normal(n)
    if name == "laplace":
        return rng.laplace(scale=1.0 / math.sqrt(2.0), size=n)
    if name == "uniform":
        return rng.uniform(-math.sqrt(3.0), math.sqrt(3.0), size=n)
    raise ValueError(f"source must be one of {SOURCES}, got {name!r}")


def lattice_entropy_coded(samples: np.ndarray, lattice: str, bits: float) -> ScalarResult:
    """D_n or E8 quantizer with ideal parity-aware entropy coding, per dimension.

    The step makes a Gaussian of the sample's variance code at about ``bits``:
    a = sqrt(2πe·σ²)·2^(−b) / V^(1/n) (V the covolume). The rate is the sum of
    the empirical entropies of the parity-aware symbols (coset bit for E8, the
    n − 1 free integer parts, floor(z_{n−1}/2)), each conditioned on the coset,
    divided by n: what a coder with tables fitted to this sample spends.
    """
    lat = LATTICES[lattice]
    n = lat.dim
    x = np.asarray(samples, dtype=np.float64).reshape(-1)
    x = x[: x.size - x.size % n].reshape(-1, n)
    sigma2 = float(np.mean(x**2))
    step = math.sqrt(2.0 * math.pi * math.e * sigma2) * 2.0 ** (-bits) / lat.covolume ** (1.0 / n)
    points = lat.nearest(torch.from_numpy(x / step)).numpy()
    mse = float(np.mean((x - points * step) ** 2))
    coset = (points[:, 0] - np.floor(points[:, 0])) * 2  # 0 for D_n, 0/1 for E8
    z = np.floor(points).astype(np.int64)
    z[:, -1] = np.floor_divide(z[:, -1], 2)
    bits_total = empirical_entropy(coset.astype(np.int64)) * coset.size
    for c in np.unique(coset):
        rows = z[coset == c]
        bits_total += sum(empirical_entropy(rows[:, j]) for j in range(n)) * rows.shape[0]
    return ScalarResult(mse, bits_total / x.size)


def family_point(samples: np.ndarray, family: str, bits: float) -> dict:
    """Distortion, rate and gap D / (σ²·4^(−R)) of one quantizer family at target ``bits``.

    R is the measured rate (bits for fixed rate, empirical entropies otherwise) and σ²
    the sample's second moment, so the gap is measured against the Gaussian bound.
    """
    if family == "scalar fixed-rate":
        result = fixed_rate_scalar(samples, int(round(bits)))
    elif family == "scalar + EC":
        result = entropy_coded_scalar(samples, bits)
    elif family in ("D4 + EC", "E8 + EC"):
        result = lattice_entropy_coded(samples, family.split()[0], bits)
    else:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
    sigma2 = float(np.mean(np.asarray(samples, dtype=np.float64) ** 2))
    return {
        "family": family,
        "target_bits": bits,
        "rate": result.rate,
        "mse": result.mse,
        "sigma2": sigma2,
        "gap": result.mse / gaussian_distortion_bound(result.rate, sigma2),
    }


def _group_bits(symbols: np.ndarray, bits: float, parity_aware: bool) -> dict[str, np.ndarray]:
    """Per-block bits (n_blocks,) the Gaussian tables spend on each symbol group (see symbol_group_bits)."""
    model = gaussian_symbol_model(bits)
    coset = symbols[:, 0].astype(np.int64)
    rows = symbols.astype(np.int64)
    free = np.stack([model.free[0], model.free[1]])[coset[:, None], rows[:, 1:8] + model.radius]
    out = {"coset": -np.log2(model.coset[coset]), "free": -np.log2(free).sum(axis=1)}
    if parity_aware:
        out["last"] = -np.log2(np.stack([model.half[0], model.half[1]])[coset, rows[:, 8] + model.radius])
    else:
        z7 = 2 * rows[:, 8] + np.remainder(rows[:, 1:8].sum(axis=1), 2)
        table = np.stack([model.free[0], model.free[1]])
        out["last"] = -np.log2(table[coset, np.clip(z7 + model.radius, 0, 2 * model.radius)])
    return out


def symbol_group_bits(symbols: np.ndarray, bits: float, parity_aware: bool = True) -> dict[str, float]:
    """Bits the Gaussian tables spend on each symbol group of (n_blocks, 9) symbols: Σ −log2 p.

    Groups: ``coset`` (the coset bits), ``free`` (z0..z6) and ``last`` (floor(z7/2), or the
    full z7 under the free-coordinate table when ``parity_aware`` is False, i.e. what
    coding all eight integer parts would cost).
    """
    return {name: float(values.sum()) for name, values in _group_bits(symbols, bits, parity_aware).items()}


def block_code_lengths(symbols: np.ndarray, bits: float, parity_aware: bool = True) -> np.ndarray:
    """Bits the Gaussian tables spend on each block of (n_blocks, 9) symbols, shape (n_blocks,): the
    per-block terms of :func:`model_code_length` (their spread gives the Monte Carlo error of a rate)."""
    return sum(_group_bits(symbols, bits, parity_aware).values())


def model_code_length(symbols: np.ndarray, bits: float, parity_aware: bool = True) -> float:
    """Total of :func:`symbol_group_bits`: the bits the tables spend on all the symbols."""
    return sum(symbol_group_bits(symbols, bits, parity_aware).values())


def parity_saving(bits: float, n_blocks: int = 200_000, seed: int = 0) -> dict:
    """Measured saving of parity-aware coding on a Gaussian source, in bits/dim.

    Returns the codec's coded rate (actual bytes) and the model code lengths with
    and without the parity trick (Σ −log2 p under the same tables), and the saving's 95% Monte Carlo
    interval (``saving_low`` / ``saving_high``) from the per-block differences.
    """
    x = torch.randn(n_blocks, 8, generator=torch.Generator().manual_seed(seed))
    codec = E8Codec(bits, rotation="none", scale="tensor")
    encoded = codec.encode(x)
    symbols = points_to_symbols(codec._analyse(x)[0].reshape(-1, 8)).numpy()
    aware_blocks = block_code_lengths(symbols, bits, True) / 8.0
    saving_blocks = block_code_lengths(symbols, bits, False) / 8.0 - aware_blocks
    half = _Z95 * float(saving_blocks.std(ddof=1)) / math.sqrt(n_blocks)
    aware = float(aware_blocks.mean())
    saving = float(saving_blocks.mean())
    return {
        "target_bits": bits,
        "coded_bits": codec.bits_per_dim(encoded),
        "model_bits_parity_aware": aware,
        "model_bits_naive": aware + saving,
        "saving": saving,
        "saving_low": saving - half,
        "saving_high": saving + half,
        "n_blocks": n_blocks,
    }


def explain_block(block: np.ndarray, bits: float, sigma2: float = 1.0) -> tuple[list[dict], dict]:
    """One 8-block through the quantizer and the entropy coder, coordinate by coordinate.

    Returns (rows, summary): per coordinate the input, the scaled value x/a, the
    D8 and D8 + ½ candidates, the chosen point, the integer part, the stored
    symbol and its code length −log2 p; the summary holds the step, both
    candidates' squared distances, the coset bit and its code length.
    """
    x = torch.as_tensor(np.asarray(block, dtype=np.float64)).reshape(1, 8)
    step = float(exact_step_value(exact_step_code(torch.tensor(float(sigma2)), bits), torch.float64))
    y = x / step
    even = nearest_dn(y)
    odd = nearest_dn(y - 0.5) + 0.5
    point = nearest_e8(y)
    symbols = points_to_symbols(point)[0].numpy()
    model = gaussian_symbol_model(bits)
    c = int(symbols[0])
    rows = []
    for j in range(8):
        table = model.free[c] if j < 7 else model.half[c]
        sym = int(symbols[j + 1])
        rows.append(
            {
                "coordinate": j,
                "x": float(x[0, j]),
                "x / a": float(y[0, j]),
                "D8 candidate": float(even[0, j]),
                "D8 + 1/2 candidate": float(odd[0, j]),
                "E8 point": float(point[0, j]),
                "stored symbol": sym if j < 7 else f"floor(z7/2) = {sym}",
                "code length (bits)": float(-np.log2(table[sym + model.radius])),
            }
        )
    summary = {
        "step": step,
        "d2_even": float((y - even).square().sum()),
        "d2_odd": float((y - odd).square().sum()),
        "coset": c,
        "coset_bits": float(-np.log2(model.coset[c])),
        "total_bits": float(-np.log2(model.coset[c])) + sum(r["code length (bits)"] for r in rows),
    }
    return rows, summary


def codec_point(codec: E8Codec, x: Tensor) -> dict:
    """Rate (actual bytes), MSE, gaps and mean cosine similarity of ``codec`` on vectors ``x`` (..., d)."""
    encoded = codec.encode(x)
    y = codec.decode(encoded).to(torch.float64)
    x64 = x.to(torch.float64)
    rate = codec.bits_per_dim(encoded)
    mse = (y - x64).square().mean().item()
    sigma2 = x64.square().mean().item()
    cosine = (
        torch.nn.functional.cosine_similarity(y.reshape(-1, x.shape[-1]), x64.reshape(-1, x.shape[-1]), dim=-1)
        .mean()
        .item()
    )
    return {
        "target_bits": codec.bits,
        "rate": rate,
        "mse": mse,
        "sigma2": sigma2,
        "gap_at_target": mse / gaussian_distortion_bound(codec.bits, sigma2),
        "gap_at_rate": mse / gaussian_distortion_bound(rate, sigma2),
        "cosine": cosine,
    }


def mse_at_rate(points: list[dict], rate: float) -> float:
    """MSE at a measured ``rate`` by linear interpolation of log2(MSE) against rate (points sorted by rate)."""
    rates = np.array([p["rate"] for p in points])
    order = np.argsort(rates)
    log_mse = np.log2(np.array([p["mse"] for p in points]))[order]
    if not rates.min() <= rate <= rates.max():
        raise ValueError(f"rate {rate} outside the measured range [{rates.min():.3f}, {rates.max():.3f}]")
    return float(2.0 ** np.interp(rate, rates[order], log_mse))


def byte_budget(codec: E8Codec, x: Tensor) -> dict:
    """Where the bytes of ``codec.encode(x)`` go: header and CRC, step codes, and the payload
    split into coset bits, free coordinates and the last coordinate in proportion to their
    model code lengths (the tables themselves cost nothing: they are parametric).
    """
    encoded = codec.encode(x)
    total = encoded.nbytes()
    steps = steps_nbytes(encoded.header, encoded.step_codes)
    payload = 4 * encoded.words.size
    symbols = points_to_symbols(codec._analyse(codec._validate(x))[0].reshape(-1, 8)).numpy()
    groups = symbol_group_bits(symbols, codec.bits)
    share = payload / max(sum(groups.values()) / 8.0, 1e-12)
    n = x.numel()
    return {
        "target_bits": codec.bits,
        "total_bits_per_dim": 8.0 * total / n,
        "header_crc": 8.0 * (total - steps - payload) / n,
        "steps": 8.0 * steps / n,
        "coset": groups["coset"] * share / n,
        "free_coordinates": groups["free"] * share / n,
        "last_coordinate": groups["last"] * share / n,
        "tables": 0.0,
    }


# ----------------------------------------------------------------------------- the gap ladder (Paper I)

#: Rungs of the gap ladder, from the bound up: entropy-coded lattice quantizers, then the fixed-rate scalar one.
LADDER_RUNGS = ("E8 + EC", "D4 + EC", "A2 + EC", "scalar + EC", "Lloyd–Max")
_RUNG_LATTICE = {"E8 + EC": "E8", "D4 + EC": "D4", "A2 + EC": "A2", "scalar + EC": "Z"}
_RUNG_LIMIT = {"E8 + EC": "E8", "D4 + EC": "D4", "A2 + EC": "A2", "scalar + EC": "Z", "Lloyd–Max": "fixed"}
_Z95 = 1.959963984540054
_BLOCK = 8  # the unit every rung is measured on (one E8 block): rungs on the same sample are paired by it


@dataclass(frozen=True)
class RungPoint:
    """One rung of the ladder at one target rate.

    Attributes
    ----------
    rung : one of :data:`LADDER_RUNGS`.
    bits : the target rate b (bits/dim).
    rate : the rate the gap is taken at: b for the entropy-coded rungs (their step is calibrated so that
        the measured entropy is b), log2(levels) for Lloyd–Max.
    mse : mean squared error per dim at that rate.
    gap : D / (σ²·4^(−rate)) with its 95% Monte Carlo interval (σ² the sample's second moment).
    limit : the gap's high-rate limit for this source (NaN if unknown).
    levels : Lloyd–Max levels, round(2^b) (0 for the entropy-coded rungs).
    index_entropy : Lloyd–Max only: entropy of its index in bits, so ``rate - index_entropy`` is what its
        fixed-length code spends over an entropy code of the same cells (NaN for the other rungs).
    cell_mass : scalar + EC only: the share of samples in the cell at zero (NaN for the other rungs).
    """

    rung: str
    bits: float
    rate: float
    mse: float
    gap: Estimate
    limit: float
    levels: int = 0
    index_entropy: float = float("nan")
    cell_mass: float = float("nan")


@dataclass(frozen=True)
class Factor:
    """The ratio of two rungs' gaps on the same sample (``upper / lower``; ``"bound"`` has gap 1), with a
    paired 95% interval and its high-rate limit (NaN if unknown)."""

    lower: str
    upper: str
    value: Estimate
    limit: float

    @property
    def name(self) -> str:
        return f"{self.lower} → {self.upper}"


@dataclass(frozen=True)
class Ladder:
    """The gap ladder of one source at one target rate: every rung and the factors between them.

    ``factors`` holds, in order, the five steps bound → E8 + EC → D4 + EC → A2 + EC → scalar + EC →
    Lloyd–Max (their product is the total), then the cell-shape factor (bound → scalar + EC) and the
    total (bound → Lloyd–Max). ``limits`` names whose high-rate limits they are: the source's own
    (``"gaussian"``, ``"laplace"``), or ``"gaussian reference"`` for a source without closed forms (then
    only the factors between lattices, ratios of G(Λ), are this source's limits too).
    """

    source: str
    bits: float
    rungs: tuple[RungPoint, ...]
    factors: tuple[Factor, ...]
    limits: str
    n_units: int

    def rung(self, name: str) -> RungPoint:
        return next(r for r in self.rungs if r.rung == name)

    def factor(self, lower: str, upper: str) -> Factor:
        return next(f for f in self.factors if (f.lower, f.upper) == (lower, upper))


def _units(samples: np.ndarray) -> np.ndarray:
    x = np.asarray(samples, dtype=np.float64).reshape(-1)
    n = x.size - x.size % _BLOCK
    if n < 16 * _BLOCK or not np.all(np.isfinite(x[:n])):
        raise InputError(f"need at least {16 * _BLOCK} finite samples, got {x.size}")
    return x[:n].reshape(-1, _BLOCK)


def _lattice_symbols(lattice: str, points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(coset (blocks,), integer symbols (blocks, k)) of lattice points: E8 and D_n drop the parity of
    the last coordinate (floor(z/2)); A2's points are (u, v·√3) in two rectangular cosets."""
    if lattice == "A2":
        u = points[:, 0]
        coset = np.rint(2.0 * (u - np.floor(u))).astype(np.int64)
        z = np.stack([np.floor(u), np.rint(points[:, 1] / math.sqrt(3.0) - 0.5 * coset)], axis=1)
        return coset, z.astype(np.int64)
    if lattice == "E8":
        coset = np.rint(2.0 * (points[:, 0] - np.floor(points[:, 0]))).astype(np.int64)
        z = np.floor(points).astype(np.int64)
    else:
        coset, z = np.zeros(points.shape[0], dtype=np.int64), np.rint(points).astype(np.int64)
    if lattice != "Z":
        z[:, -1] = np.floor_divide(z[:, -1], 2)
    return coset, z


def _code_lengths(coset: np.ndarray, z: np.ndarray) -> tuple[np.ndarray, float]:
    """Per-block code lengths (bits) under tables fitted to the sample (the coset bit, then each symbol
    column conditioned on the coset), and the Miller–Madow correction of their mean (bits per block):
    the plug-in entropy of a table with K used values from n samples is low by about (K − 1)/(2n·ln 2)."""
    n = coset.size
    cosets = np.bincount(coset)
    bits = -np.log2(cosets[coset] / n)
    used = np.count_nonzero(cosets) - 1
    for column in z.T:
        span = int(column.max() - column.min()) + 1
        key = coset * span + (column - column.min())
        counts = np.bincount(key)
        bits -= np.log2(counts[key] / cosets[coset])
        used += np.count_nonzero(counts) - np.count_nonzero(cosets)
    return bits, used / (2.0 * n * math.log(2.0))


@dataclass(frozen=True)
class _Measured:
    log_step: float
    rate: float
    mse: float
    unit_bits: np.ndarray  # (units,) bits per dim of each unit
    unit_err: np.ndarray  # (units,) squared error per dim of each unit


def _measure_lattice(units: np.ndarray, lattice: str, log_step: float) -> _Measured:
    lat = LATTICES[lattice]
    step = 2.0**log_step
    blocks = units.reshape(-1, lat.dim) / step
    points = lat.nearest(torch.from_numpy(blocks)).numpy()
    err = ((blocks - points) ** 2).reshape(units.shape[0], -1).sum(axis=1) * step**2 / _BLOCK
    bits, correction = _code_lengths(*_lattice_symbols(lattice, points))
    unit_bits = bits.reshape(units.shape[0], -1).sum(axis=1) / _BLOCK
    rate = float(unit_bits.mean()) + correction / lat.dim
    return _Measured(log_step, rate, float(err.mean()), unit_bits, err)


def _calibrated(
    units: np.ndarray, lattice: str, bits: float, start: float, tol: float = 2e-4, iterations: int = 16
) -> tuple[_Measured, float]:
    """The lattice's measurement at the log2 step where its measured rate is ``bits`` (secant iterations
    on log2 step, started at ``start``), and the local slope d ln D / dR."""
    history = [_measure_lattice(units, lattice, start)]
    while abs(history[-1].rate - bits) > tol and len(history) < iterations:
        last = history[-1]
        move = last.rate - bits  # at high rate one bit of rate per halving of the step
        if len(history) > 1:
            prev = history[-2]
            slope = (last.rate - prev.rate) / (last.log_step - prev.log_step)
            if slope < -0.05:
                move = -(last.rate - bits) / slope
        history.append(_measure_lattice(units, lattice, last.log_step + float(np.clip(move, -2.0, 2.0))))
    near = sorted(history, key=lambda m: abs(m.rate - bits))[:2]
    slope = -2.0 * math.log(2.0)
    if len(near) == 2 and abs(near[0].rate - near[1].rate) > 1e-6:
        slope = (math.log(near[0].mse) - math.log(near[1].mse)) / (near[0].rate - near[1].rate)
    return near[0], slope


def _lloyd_max_rung(units: np.ndarray, levels: int, design: str) -> tuple[np.ndarray, np.ndarray]:
    """Per-unit squared error per dim and the index of each sample, for the Lloyd–Max quantizer with
    ``levels`` levels: designed on the density (``design`` a name of :data:`~lqlib.core.scalar.DENSITIES`,
    unit variance) or, for ``design="crossfit"``, on the other half of the units (even units design the
    quantizer of the odd ones and the other way round), so that no sample is measured by a quantizer
    fitted to it."""
    x = units.reshape(-1)
    if design in DENSITIES:
        books = [lloyd_max_density(design, levels)[0]]
        part = np.zeros(units.shape[0], dtype=np.int64)
    elif design == "crossfit":
        part = np.arange(units.shape[0]) % 2
        books = [lloyd_max_levels(units[part == 1 - k].reshape(-1), levels) for k in (0, 1)]
    else:
        raise InputError(f"design must be one of {DENSITIES} or 'crossfit', got {design!r}")
    index = np.empty(x.size, dtype=np.int64)
    err = np.empty(x.size)
    owner = np.repeat(part, _BLOCK)
    for k, book in enumerate(books):
        mine = owner == k
        index[mine] = np.searchsorted(0.5 * (book[1:] + book[:-1]), x[mine])
        err[mine] = (x[mine] - book[index[mine]]) ** 2
    return err.reshape(units.shape).mean(axis=1), index


def _interval(value: float, influence: np.ndarray) -> Estimate:
    """A ratio-scale 95% interval value·exp(±z·se) from per-unit influence values of its logarithm."""
    se = float(influence.std(ddof=1)) / math.sqrt(influence.size)
    return Estimate(value, value * math.exp(-_Z95 * se), value * math.exp(_Z95 * se), 0.95, influence.size)


def _ladder_limits(source: str) -> tuple[dict[str, float], str]:
    if source in ("gaussian", "laplace"):
        return high_rate_gaps(source), source
    return high_rate_gaps("gaussian"), "gaussian reference"


def gap_ladders(
    samples: np.ndarray, bits_list: tuple[float, ...] | list[float], source: str = "sample", design: str = "crossfit"
) -> list[Ladder]:
    """The gap ladder of one sample at each target rate: E8, D4, A2 and scalar with ideal entropy coding
    (tables fitted to the sample, step calibrated so that the measured entropy is b), and Lloyd–Max with
    round(2^b) levels (rate log2 of that), all measured on the same sample.

    Parameters
    ----------
    samples : 1-D sample (its length is cut to a multiple of 8); blocks of 8 consecutive samples are the
        units: every rung is measured on the same units, so ratios between rungs are paired.
    bits_list : target rates b (bits/dim), e.g. 1, 1.5, ..., 8.
    source : ``"gaussian"`` or ``"laplace"`` (unit variance: their high-rate limits are known) or any other
        name (the Gaussian's limits are then a reference only).
    design : how Lloyd–Max is designed: on the ``"gaussian"`` or ``"laplace"`` density, or ``"crossfit"``.

    Intervals are 95% Monte Carlo intervals from the per-unit squared errors and code lengths (delta
    method: a unit's code length moves the rate, which moves the distortion at rate b along the measured
    slope); factors between rungs pair the units. Rates include the Miller–Madow correction of the
    fitted tables' entropy.
    """
    units = _units(samples)
    sigma2 = float(np.mean(units**2))
    unit_power = (units**2).mean(axis=1)
    power_term = (unit_power - sigma2) / sigma2
    limits, limits_of = _ladder_limits(source)
    starts = {}
    ladders = []
    for bits in sorted(float(b) for b in bits_list):
        gaps, influence, rungs = {}, {}, []
        for rung, lattice in _RUNG_LATTICE.items():
            lat = LATTICES[lattice]
            start = starts.get(rung)
            if start is None:
                start = 0.5 * math.log2(2 * math.pi * math.e * sigma2) - bits - math.log2(lat.covolume) / lat.dim
            measured, slope = _calibrated(units, lattice, bits, start)
            starts[rung] = measured.log_step - 0.5
            mse = measured.mse * math.exp(slope * (bits - measured.rate))
            gaps[rung] = mse * 4.0**bits / sigma2
            influence[rung] = (measured.unit_err - measured.mse) / measured.mse - slope * (
                measured.unit_bits - measured.rate
            )
            mass = float("nan")
            if lattice == "Z":
                mass = float(np.mean(np.abs(units) < 0.5 * 2.0**measured.log_step))
            rungs.append(
                RungPoint(
                    rung,
                    bits,
                    bits,
                    mse,
                    _interval(gaps[rung], influence[rung] - power_term),
                    limits[lat.name],
                    cell_mass=mass,
                )
            )
        levels = max(2, round(2.0**bits))
        err, index = _lloyd_max_rung(units, levels, design)
        mse = float(err.mean())
        rate = math.log2(levels)
        gaps["Lloyd–Max"] = mse * 4.0**rate / sigma2
        influence["Lloyd–Max"] = (err - mse) / mse
        counts = np.bincount(index, minlength=levels)
        entropy = empirical_entropy(index) + (np.count_nonzero(counts) - 1) / (2.0 * index.size * math.log(2.0))
        rungs.append(
            RungPoint(
                "Lloyd–Max",
                bits,
                rate,
                mse,
                _interval(gaps["Lloyd–Max"], influence["Lloyd–Max"] - power_term),
                limits["fixed"],
                levels=levels,
                index_entropy=entropy,
            )
        )
        factors = []
        chain = ["bound", *LADDER_RUNGS]
        pairs = [*zip(chain[:-1], chain[1:]), ("bound", "scalar + EC"), ("bound", "Lloyd–Max")]
        for lower, upper in pairs:
            up_limit = limits[_RUNG_LIMIT[upper]]
            if lower == "bound":
                value = _interval(gaps[upper], influence[upper] - power_term)
                limit = up_limit
            else:
                value = _interval(gaps[upper] / gaps[lower], influence[upper] - influence[lower])
                limit = up_limit / limits[_RUNG_LIMIT[lower]]
            factors.append(Factor(lower, upper, value, limit))
        ladders.append(Ladder(source, bits, tuple(rungs), tuple(factors), limits_of, units.shape[0]))
    return ladders


# ------------------------------------------------------------------ real data in chunks (Paper I, Tables 2 and 4)


@dataclass(frozen=True)
class ChunkedPoint:
    """One codec on a tensor cut into chunks along its token axis (dim −2), each encoded on its own.

    Attributes (arrays of shape (chunks,)): ``bits`` stored per chunk (every byte counted), ``err`` summed
    squared error, ``power`` summed squares of the input, ``count`` values; and ``target_bits``.
    """

    target_bits: float
    bits: np.ndarray
    err: np.ndarray
    power: np.ndarray
    count: np.ndarray

    def rate(self, index: np.ndarray | slice = slice(None)) -> np.ndarray:
        return self.bits[index].sum(axis=-1) / self.count[index].sum(axis=-1)

    def mse(self, index: np.ndarray | slice = slice(None)) -> np.ndarray:
        return self.err[index].sum(axis=-1) / self.count[index].sum(axis=-1)


def _chunks(x: Tensor, chunks: int) -> list[Tensor]:
    if x.dim() < 2 or not 1 <= chunks <= x.shape[-2]:
        raise InputError(f"need a tensor (..., tokens, dim) with at least {chunks} tokens, got {tuple(x.shape)}")
    return list(torch.tensor_split(x, chunks, dim=-2))


def chunked_point(codec: E8Codec, x: Tensor, chunks: int) -> ChunkedPoint:
    """Encode each of ``chunks`` token chunks of ``x`` (..., tokens, dim) separately; rate from the bytes."""
    bits, err, power, count = [], [], [], []
    for part in _chunks(x, chunks):
        encoded = codec.encode(part)
        y = codec.decode(encoded).to(torch.float64)
        p64 = part.to(torch.float64)
        bits.append(8.0 * encoded.nbytes())
        err.append((y - p64).square().sum().item())
        power.append(p64.square().sum().item())
        count.append(float(part.numel()))
    return ChunkedPoint(codec.bits, *(np.array(v) for v in (bits, err, power, count)))


def equal_rate_ratio(
    first: list[ChunkedPoint], second: list[ChunkedPoint], rate: float, draws: int = 4000, seed: int = 0
) -> Estimate:
    """MSE of ``first`` over MSE of ``second`` at the same measured ``rate`` (each curve's log MSE
    interpolated linearly in rate between its bit widths), with a percentile bootstrap over the chunks
    (both curves resampled together: the same chunks of the same data). A resample whose curves do not
    reach ``rate`` is left out."""
    from .stats import bootstrap

    n = first[0].bits.size
    if any(p.bits.size != n for p in (*first, *second)):
        raise InputError("every point needs the same chunks")

    def at_rate(points: list[ChunkedPoint], index: np.ndarray) -> np.ndarray:
        rates = np.stack([p.rate(index) for p in points], axis=-1).reshape(-1, len(points))
        logs = np.log(np.stack([p.mse(index) for p in points], axis=-1)).reshape(-1, len(points))
        out = np.full(rates.shape[0], np.nan)
        for i, (r, m) in enumerate(zip(rates, logs)):
            order = np.argsort(r)
            if r[order[0]] <= rate <= r[order[-1]]:
                out[i] = np.interp(rate, r[order], m[order])
        return out

    def ratio(index: np.ndarray) -> np.ndarray:
        values = np.exp(at_rate(first, index) - at_rate(second, index))
        return values.reshape(index.shape[:-1]) if index.ndim > 1 else values[0]

    return bootstrap(ratio, n, draws, seed=seed)


def gap_at_target(x: Tensor, y: Tensor, bits: float, chunks: int, draws: int = 4000, seed: int = 0) -> Estimate:
    """D / (σ²·4^(−b)) of a reconstruction ``y`` of ``x`` (..., tokens, dim) at the target rate ``bits``,
    with a percentile bootstrap over ``chunks`` token chunks (errors and second moments resampled together)."""
    from .stats import bootstrap

    err = np.array(
        [(b.double() - a.double()).square().sum().item() for a, b in zip(_chunks(x, chunks), _chunks(y, chunks))]
    )
    power = np.array([a.double().square().sum().item() for a in _chunks(x, chunks)])
    return bootstrap(
        lambda index: err[index].sum(axis=-1) / power[index].sum(axis=-1) * 4.0**bits, chunks, draws, seed=seed
    )


@dataclass(frozen=True)
class PlanePoint:
    """A 2-D lattice quantizer (``"Z"`` meaning Z², or ``"A2"``) on a cloud of points at cell area ``area``.

    Attributes: ``step`` (lattice units → plane), ``quantized`` (n, 2) points, ``mse`` per dim,
    ``normalized`` = mse / area (→ G(Λ) as the cells shrink against the cloud), ``entropy`` of the
    quantized points per dim (joint, plug-in) and ``gap`` = mse·4^entropy / σ².
    """

    lattice: str
    step: float
    area: float
    quantized: np.ndarray
    mse: float
    normalized: float
    entropy: float
    gap: float


def plane_point(points: np.ndarray, lattice: str, bits: float) -> PlanePoint:
    """Quantize ``points`` (n, 2) with Z² or A2 at the cell area that makes a Gaussian of the cloud's
    second moment code at about ``bits`` bits/dim (area = 2πe·σ²·4^(−b)); both lattices get the same area."""
    x = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    sigma2 = float(np.mean(x**2))
    area = 2.0 * math.pi * math.e * sigma2 * 4.0**-bits
    if lattice == "Z":
        nearest, covolume = LATTICES["Z"].nearest, 1.0
    elif lattice == "A2":
        nearest, covolume = LATTICES["A2"].nearest, LATTICES["A2"].covolume
    else:
        raise InputError(f"lattice must be 'Z' or 'A2', got {lattice!r}")
    step = math.sqrt(area / covolume)
    quantized = nearest(torch.from_numpy(x / step)).numpy() * step
    mse = float(np.mean((x - quantized) ** 2))
    _, counts = np.unique(np.round(quantized / step, 6), axis=0, return_counts=True)
    p = counts / counts.sum()
    entropy = float(-(p * np.log2(p)).sum()) / 2.0
    return PlanePoint(lattice, step, area, quantized, mse, mse / area, entropy, mse * 4.0**entropy / sigma2)
