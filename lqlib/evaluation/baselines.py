"""KV quantizers to compare the E8 codec against, each with its total rate.

Every method maps a tensor of K or V vectors, shape (..., tokens, head_dim), to its
quantized-dequantized version (the in-loop path) and reports its total bits per
dimension on that tensor, side information (scales, zero points, norms, flags,
full-precision windows) included, from the storage format it implies:

* ``IntPerToken`` — b-bit asymmetric integer per vector (fp16 scale and zero point);
* ``KiviStyle`` — keys per channel over groups of ``group`` tokens, values per token over
  groups of ``group`` channels, the last ``residual`` tokens (and an unfinished key group)
  kept in fp16 (KIVI, Liu et al. 2024);
* ``TurboQuantStyle`` — RHT, fp16 vector norm, and a b-bit Lloyd–Max codebook for the
  rotated unit-variance coordinates (after Zandieh et al. 2025);
* ``E8FixedRate`` — E8 without entropy coding: 8b bits per block (coset bit, seven b-bit
  integer parts, floor(z7/2) on b − 1 bits) in a cube of half-width ``load``·σ (σ the
  vector's RMS, fp16 step per vector), and an overload fallback that doubles the step of a
  block up to twice (2 flag bits per block); load 1.25 is the measured MSE optimum on
  Gaussian vectors at 3–5 bits;
* ``E8Entropy`` — the codec itself (:class:`lqlib.E8Codec`), rate from the bytes written.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from ..coding.codec import E8Codec
from ..core.lattices import nearest_e8
from ..core.rht import RandomizedHadamard
from ..core.scalar import lloyd_max

__all__ = ["KVMethod", "IntPerToken", "KiviStyle", "TurboQuantStyle", "E8FixedRate", "E8Entropy", "standard_methods"]

_FP16_BITS = 16.0


@dataclass(frozen=True)
class KVMethod:
    """Base: a named quantizer with a total-rate accounting. Subclasses implement both."""

    bits: float

    @property
    def name(self) -> str:
        return f"{type(self).__name__}({self.bits:g})"

    def quantize(self, x: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def bits_per_dim(self, x: Tensor) -> float:  # pragma: no cover - abstract
        raise NotImplementedError

    def __call__(self, x: Tensor) -> Tensor:
        return self.quantize(x)


def _asymmetric(x: Tensor, bits: int, dim: int) -> Tensor:
    """b-bit asymmetric rounding with min/max (stored as fp16) over ``dim``."""
    lo = x.amin(dim=dim, keepdim=True).to(torch.float16).to(x.dtype)
    hi = x.amax(dim=dim, keepdim=True).to(torch.float16).to(x.dtype)
    levels = 2**bits - 1
    scale = ((hi - lo) / levels).clamp_min(torch.finfo(torch.float16).tiny)
    return (torch.round((x - lo) / scale).clamp(0, levels) * scale + lo).to(x.dtype)


@dataclass(frozen=True)
class IntPerToken(KVMethod):
    """b-bit asymmetric integer quantization of each vector (fp16 min and max)."""

    def quantize(self, x: Tensor) -> Tensor:
        return _asymmetric(x, int(self.bits), dim=-1)

    def bits_per_dim(self, x: Tensor) -> float:
        return self.bits + 2 * _FP16_BITS / x.shape[-1]


@dataclass(frozen=True)
class KiviStyle(KVMethod):
    """KIVI: keys per channel (groups of ``group`` tokens), values per token (groups of ``group`` channels)."""

    group: int = 32
    residual: int = 32
    is_key: bool = True

    @property
    def name(self) -> str:
        return f"KIVI-{int(self.bits)} g{self.group} r{self.residual} ({'K' if self.is_key else 'V'})"

    def _quantized_tokens(self, tokens: int) -> int:
        """Tokens stored quantized: keys only in whole groups, outside the recent window."""
        old = max(tokens - self.residual, 0)
        return old - old % self.group if self.is_key else old

    def quantize(self, x: Tensor) -> Tensor:
        n = self._quantized_tokens(x.shape[-2])
        if n == 0:
            return x
        old = x[..., :n, :]
        if self.is_key:  # per channel: min/max over each group of tokens
            grouped = old.reshape(*old.shape[:-2], n // self.group, self.group, old.shape[-1])
            q = _asymmetric(grouped, int(self.bits), dim=-2).reshape(old.shape)
        else:  # per token: min/max over each group of channels
            d = old.shape[-1]
            g = math.gcd(self.group, d)
            grouped = old.reshape(*old.shape[:-1], d // g, g)
            q = _asymmetric(grouped, int(self.bits), dim=-1).reshape(old.shape)
        return torch.cat([q, x[..., n:, :]], dim=-2)

    def bits_per_dim(self, x: Tensor) -> float:
        tokens, d = x.shape[-2], x.shape[-1]
        n = self._quantized_tokens(tokens)
        side = 2 * _FP16_BITS / (self.group if self.is_key else math.gcd(self.group, d))
        return (n * (self.bits + side) + (tokens - n) * _FP16_BITS) / tokens


@functools.lru_cache(maxsize=16)
def _rht(dim: int, seed: int) -> RandomizedHadamard:
    """One RHT per (dim, seed), so its cached matrix is built once, not at every call."""
    return RandomizedHadamard(dim, seed)


@functools.lru_cache(maxsize=16)
def _gaussian_codebook(bits: int) -> np.ndarray:
    """Lloyd–Max levels for N(0, 1) at ``bits`` bits, designed on 2·10^6 seeded samples."""
    return lloyd_max(np.random.default_rng(12345).standard_normal(2_000_000), bits)


@dataclass(frozen=True)
class TurboQuantStyle(KVMethod):
    """RHT + fp16 norm + b-bit Lloyd–Max codebook of the rotated, unit-variance coordinates."""

    seed: int = 0

    def quantize(self, x: Tensor) -> Tensor:
        d = x.shape[-1]
        rht = _rht(d, self.seed)
        w = rht.forward(x.float())
        norm = w.norm(dim=-1, keepdim=True).to(torch.float16).float()
        unit = w / norm.clamp_min(1e-30) * math.sqrt(d)
        levels = torch.from_numpy(_gaussian_codebook(int(self.bits))).float().to(x.device)
        index = torch.bucketize(unit, (levels[1:] + levels[:-1]) / 2)
        return rht.inverse(levels[index] * norm / math.sqrt(d)).to(x.dtype)

    def bits_per_dim(self, x: Tensor) -> float:
        return self.bits + _FP16_BITS / x.shape[-1]


@dataclass(frozen=True)
class E8FixedRate(KVMethod):
    """E8 at a fixed 8b bits per block, per-block step doubling on overload (2 flag bits)."""

    seed: int = 0
    load: float = 1.25

    def quantize(self, x: Tensor) -> Tensor:
        d, bits = x.shape[-1], int(self.bits)
        rht = _rht(d, self.seed)
        w = rht.forward(x.float())
        rms = w.square().mean(dim=-1, keepdim=True).sqrt()
        step = (self.load * rms / 2 ** (bits - 1)).to(torch.float16).float().clamp_min(1e-30)
        blocks = (w / step).reshape(*w.shape[:-1], d // 8, 8)
        limit = 2 ** (bits - 1)  # integer parts in [-limit, limit - 1]
        best = None
        for doubling in (4.0, 2.0, 1.0):  # the smallest step that fits wins
            p = nearest_e8(blocks / doubling)
            fits = ((torch.floor(p) >= -limit) & (torch.floor(p) <= limit - 1)).all(dim=-1, keepdim=True)
            candidate = torch.clamp(p, -limit, limit - 0.5) * doubling
            best = candidate if best is None else torch.where(fits, candidate, best)
        return rht.inverse(best.reshape(w.shape) * step).to(x.dtype)

    def bits_per_dim(self, x: Tensor) -> float:
        return self.bits + 2.0 / 8 + _FP16_BITS / x.shape[-1]


@dataclass(frozen=True)
class E8Entropy(KVMethod):
    """The E8 codec (RHT or not, one log-grid step per vector, parity-aware rANS); rate from bytes."""

    rotation: str = "rht"

    @property
    def name(self) -> str:
        return f"E8+EC({self.bits:g}{', no RHT' if self.rotation == 'none' else ''})"

    @property
    def codec(self) -> E8Codec:
        return E8Codec(self.bits, rotation=self.rotation)

    def quantize(self, x: Tensor) -> Tensor:
        return self.codec.quantize(x)

    def bits_per_dim(self, x: Tensor) -> float:
        codec = self.codec
        return codec.bits_per_dim(codec.encode(x))


def standard_methods(bits: int) -> list[tuple[str, str, KVMethod, KVMethod]]:
    """(label, family, key method, value method) for every baseline family at integer rate ``bits``."""
    return [
        (f"int{bits} per token", "int per token", IntPerToken(bits), IntPerToken(bits)),
        (f"KIVI-{bits}", "KIVI", KiviStyle(bits, is_key=True), KiviStyle(bits, is_key=False)),
        (f"TurboQuant-style {bits}", "TurboQuant-style", TurboQuantStyle(bits), TurboQuantStyle(bits)),
        (f"E8 fixed-rate {bits}", "E8 fixed-rate", E8FixedRate(bits), E8FixedRate(bits)),
        (f"E8 + EC {bits}, no RHT", "E8 + EC, no RHT", E8Entropy(bits, "none"), E8Entropy(bits, "none")),
        (f"E8 + EC {bits}", "E8 + EC", E8Entropy(bits), E8Entropy(bits)),
    ]
