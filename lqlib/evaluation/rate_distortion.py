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
    ScalarResult,
    empirical_entropy,
    entropy_coded_scalar,
    fixed_rate_scalar,
)
from ..core.steps import exact_step_code, exact_step_value
from ..core.symbols import points_to_symbols
from ..core.theory import entropy_coded_gap, gaussian_distortion_bound

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
    "byte_budget",
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
    for the whole tensor, as in the paper.
    """
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n_blocks, 8, generator=gen)
    exact_gap = entropy_coded_gap("E8")
    rows = []
    for b in tqdm(bits, desc="Gaussian validation", disable=not progress):
        point = measure(E8Codec(b, rotation="none", scale="tensor"), x)
        rows.append(
            {
                **asdict(point),
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


def symbol_group_bits(symbols: np.ndarray, bits: float, parity_aware: bool = True) -> dict[str, float]:
    """Bits the Gaussian tables spend on each symbol group of (n_blocks, 9) symbols: Σ −log2 p.

    Groups: ``coset`` (the coset bits), ``free`` (z0..z6) and ``last`` (floor(z7/2), or the
    full z7 under the free-coordinate table when ``parity_aware`` is False, i.e. what
    coding all eight integer parts would cost).
    """
    model = gaussian_symbol_model(bits)
    coset = symbols[:, 0]
    out = {"coset": float(-np.log2(model.coset[coset]).sum()), "free": 0.0, "last": 0.0}
    for c in (0, 1):
        rows = symbols[coset == c].astype(np.int64)
        out["free"] -= float(np.log2(model.free[c][rows[:, 1:8] + model.radius]).sum())
        if parity_aware:
            out["last"] -= float(np.log2(model.half[c][rows[:, 8] + model.radius]).sum())
        else:
            z7 = 2 * rows[:, 8] + np.remainder(rows[:, 1:8].sum(axis=1), 2)
            out["last"] -= float(np.log2(model.free[c][np.clip(z7 + model.radius, 0, 2 * model.radius)]).sum())
    return out


def model_code_length(symbols: np.ndarray, bits: float, parity_aware: bool = True) -> float:
    """Total of :func:`symbol_group_bits`: the bits the tables spend on all the symbols."""
    return sum(symbol_group_bits(symbols, bits, parity_aware).values())


def parity_saving(bits: float, n_blocks: int = 200_000, seed: int = 0) -> dict:
    """Measured saving of parity-aware coding on a Gaussian source, in bits/dim.

    Returns the codec's coded rate (actual bytes) and the model code lengths with
    and without the parity trick (Σ −log2 p under the same tables).
    """
    x = torch.randn(n_blocks, 8, generator=torch.Generator().manual_seed(seed))
    codec = E8Codec(bits, rotation="none", scale="tensor")
    encoded = codec.encode(x)
    symbols = points_to_symbols(codec._analyse(x)[0].reshape(-1, 8)).numpy()
    aware = float(model_code_length(symbols, bits, True)) / x.numel()
    naive = float(model_code_length(symbols, bits, False)) / x.numel()
    return {
        "target_bits": bits,
        "coded_bits": codec.bits_per_dim(encoded),
        "model_bits_parity_aware": aware,
        "model_bits_naive": naive,
        "saving": naive - aware,
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
