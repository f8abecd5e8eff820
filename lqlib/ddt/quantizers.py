"""Quantizers for the Paper III studies: uniform scalar blocks, dims reordered inside blocks, subtractive dither.

A *quantizer* here is a callable on a (..., d) tensor, or an object with a ``quantize`` method
(e.g. :class:`lqlib.E8Codec`); a sequence of them gives one per layer (a schedule).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import Tensor

__all__ = ["SCALAR_STEP_FACTOR", "Permuted", "block_permutation", "ScalarBlockQuantizer", "Dithered"]


Quantizer = Callable[[Tensor], Tensor]  # or any object with a ``quantize`` method, e.g. E8Codec


Quantizers = Quantizer | Sequence[Quantizer]


# Δ = SCALAR_STEP_FACTOR · rms · 2^(−b): the step whose uniform quantizer has an output entropy of
# about b bits on a Gaussian at high rate (h(X) − log2 Δ = b); the E8 codec uses the same formula.
SCALAR_STEP_FACTOR = math.sqrt(2.0 * math.pi * math.e)


def _as_quantizer(quantizer) -> Quantizer:
    """A callable, or an object with a ``quantize`` method (e.g. :class:`~lqlib.E8Codec`)."""
    return quantizer.quantize if hasattr(quantizer, "quantize") else quantizer


def _per_layer(quantizer: Quantizers, n_layers: int) -> list[Quantizer]:
    """One quantizer per layer from a quantizer or a sequence of them (a schedule)."""
    if callable(quantizer) or hasattr(quantizer, "quantize"):
        return [_as_quantizer(quantizer)] * n_layers
    quantizer = [_as_quantizer(q) for q in quantizer]
    if len(quantizer) != n_layers:
        raise ValueError(f"need one quantizer per layer ({n_layers}), got {len(quantizer)}")
    return quantizer


def _check_permutation(permutation, d: int | None = None) -> Tensor:
    perm = torch.as_tensor(np.asarray(permutation), dtype=torch.int64).reshape(-1)
    if d is not None and perm.numel() != d:
        raise ValueError(f"permutation has {perm.numel()} entries for vectors of dim {d}")
    if not torch.equal(torch.sort(perm).values, torch.arange(perm.numel())):
        raise ValueError("not a permutation of 0..d−1")
    return perm


class Permuted:
    """``quantizer`` applied to the dims in another order: x ↦ q(x[..., p])[..., p⁻¹].

    The order decides which dims share an 8-block (E8 point, block step). A reordering *inside*
    a block changes neither E8 (its points are closed under coordinate permutations) nor a
    per-block scalar quantizer; what matters is which dims end up together.
    """

    def __init__(self, quantizer: Quantizer, permutation) -> None:
        self.inner = quantizer
        self.quantizer = _as_quantizer(quantizer)
        self.permutation = _check_permutation(permutation)
        self.inverse = torch.argsort(self.permutation)

    def cache_key(self) -> tuple:
        """The inner quantizer (keyed by the result store as it keys any value) and the permutation."""
        return ("permuted", self.inner, self.permutation)

    def __call__(self, x: Tensor) -> Tensor:
        perm = self.permutation.to(x.device)
        return self.quantizer(x[..., perm])[..., self.inverse.to(x.device)]


def block_permutation(kind: str, d: int, sample: Tensor | None = None, seed: int = 0) -> Tensor:
    """An ordering of d dims for the permutation puzzle: int64 (d,).

    ``"identity"``; ``"sorted"``: by decreasing second moment of ``sample`` (..., d) per dim, so
    dims of similar scale share blocks; ``"random"``: a seeded uniform permutation.
    """
    if kind == "identity":
        return torch.arange(d)
    if kind == "random":
        return torch.randperm(d, generator=torch.Generator().manual_seed(seed))
    if kind == "sorted":
        if sample is None or sample.shape[-1] != d:
            raise ValueError("'sorted' needs a sample of shape (..., d)")
        second = sample.detach().to(torch.float64).reshape(-1, d).square().mean(dim=0).cpu()
        return torch.argsort(second, descending=True, stable=True)
    raise ValueError(f"kind must be 'identity', 'sorted' or 'random', got {kind!r}")


def _work(x: Tensor) -> Tensor:
    return x.detach().to(torch.float64 if x.dtype == torch.float64 else torch.float32)


class ScalarBlockQuantizer:
    """Uniform scalar quantizer with one step per block of ``block`` dims, set by the bit width.

    For a block with mean square ms, ``Δ = factor · sqrt(ms) · 2^(−bits)`` (default factor
    √(2πe), :data:`SCALAR_STEP_FACTOR`, the E8 codec's formula); x̂ = Δ·round(x/Δ). At high rate
    on Gaussian data the output entropy is about ``bits`` per dim and the MSE is
    Δ²/12 = (πe/6)·ms·4^(−bits): each extra bit divides the MSE by 4. (The original proxy's step
    ignored the bit width.) A block of zeros stays zero. The step needs one scale per block as
    side information, not counted here.

    Parameters
    ----------
    bits : rate b > 0 (bits/dim).
    block : dims per step; must divide d. ``block = d`` gives one step per vector.
    permutation : optional ordering of the d dims applied before blocking and undone after
        (see :class:`Permuted`, :func:`block_permutation`).
    """

    def __init__(self, bits: float, block: int = 8, permutation=None, factor: float = SCALAR_STEP_FACTOR) -> None:
        if not bits > 0:
            raise ValueError(f"bits must be positive, got {bits}")
        if block < 1:
            raise ValueError(f"block must be positive, got {block}")
        self.bits, self.block, self.factor = float(bits), int(block), float(factor)
        self.permutation = None if permutation is None else _check_permutation(permutation)

    def __repr__(self) -> str:
        perm = "" if self.permutation is None else ", permuted"
        return f"ScalarBlockQuantizer(bits={self.bits}, block={self.block}{perm})"

    def cache_key(self) -> tuple:
        """What determines the output: bits, block, step factor and permutation."""
        return ("scalar block", self.bits, self.block, self.factor, self.permutation)

    def _order(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        if self.permutation is None:
            return x, None
        if self.permutation.numel() != x.shape[-1]:
            raise ValueError(f"permutation has {self.permutation.numel()} entries for vectors of dim {x.shape[-1]}")
        perm = self.permutation.to(x.device)
        return x[..., perm], torch.argsort(perm)

    def _blocks(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
        """(permuted x as blocks (..., d/block, block), step per block (..., d/block, 1), inverse)."""
        d = x.shape[-1]
        if d % self.block:
            raise ValueError(f"block {self.block} does not divide the dim {d}")
        ordered, inverse = self._order(_work(x))
        blocks = ordered.reshape(*x.shape[:-1], d // self.block, self.block)
        step = self.factor * blocks.square().mean(dim=-1, keepdim=True).sqrt() * 2.0 ** (-self.bits)
        return blocks, torch.where(step > 0, step, torch.ones_like(step)), inverse

    @staticmethod
    def _unblock(blocks: Tensor, inverse: Tensor | None) -> Tensor:
        flat = blocks.flatten(-2)
        return flat if inverse is None else flat[..., inverse]

    def step(self, x: Tensor) -> Tensor:
        """The step of every element of ``x`` (..., d), in x's own dim order."""
        blocks, step, inverse = self._blocks(x)
        return self._unblock(step.expand_as(blocks), inverse).to(x.dtype)

    def symbols(self, x: Tensor) -> Tensor:
        """Integer symbols round(x/Δ), int64 (..., d) in x's dim order (for entropy/rate estimates)."""
        blocks, step, inverse = self._blocks(x)
        return self._unblock(torch.round(blocks / step), inverse).to(torch.int64)

    def __call__(self, x: Tensor) -> Tensor:
        blocks, step, inverse = self._blocks(x)
        return self._unblock(torch.round(blocks / step) * step, inverse).to(x.dtype)


class Dithered:
    """Subtractive dithered uniform quantization: x̂ = Δ·(round(x/Δ + u) − u), u ~ U[−½, ½) per element.

    Crypto lemma: e = x̂ − x is uniform on [−Δ/2, Δ/2) and independent of x (given Δ), whatever
    the input; so E e = 0 and E e² = Δ²/12. The dither is a fixed pseudo-random function of
    (seed, shape): the decoder can regenerate it, and the same input gives the same output (so
    a captured cache and the in-loop pass see the same dither). Give each layer its own seed
    for dither independent across layers; elements of one call always get independent dither.

    Parameters
    ----------
    step : Δ, a float or a function x ↦ steps broadcastable to x (e.g.
        ``ScalarBlockQuantizer(b).step``); computed from the input, before the dither.
    seed : seed of the dither.
    """

    def __init__(self, step: float | Callable[[Tensor], Tensor], seed: int = 0) -> None:
        self.step = step
        self.seed = int(seed)

    def __repr__(self) -> str:
        return f"Dithered(step={self.step!r}, seed={self.seed})"

    def steps(self, x: Tensor) -> Tensor:
        """Δ for ``x``, broadcastable to it (work dtype); zero steps are replaced by 1."""
        work = _work(x)
        step = self.step(x) if callable(self.step) else torch.tensor(float(self.step))
        step = torch.as_tensor(step, device=x.device).to(work.dtype)
        return torch.where(step > 0, step, torch.ones_like(step))

    def dither(self, x: Tensor) -> Tensor:
        """u ~ U[−½, ½) of x's shape, in step units (work dtype, x's device)."""
        generator = torch.Generator(device=x.device).manual_seed(self.seed)
        return torch.rand(x.shape, generator=generator, device=x.device, dtype=_work(x).dtype) - 0.5

    def quantize_with_steps(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(x̂, the steps Δ it used), computing the steps once."""
        work, step, u = _work(x), self.steps(x), self.dither(x)
        return ((torch.round(work / step + u) - u) * step).to(x.dtype), step

    def __call__(self, x: Tensor) -> Tensor:
        return self.quantize_with_steps(x)[0]
