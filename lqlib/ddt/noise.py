"""Error with a chosen direction at a chosen MSE, for end-to-end checks of Theorem C.

:class:`GaussianNoise`: e = √r·‖x‖·F·z, z ~ N(0, I), F Fᵀ = C with C a unit-trace "shape" per KV head
(:func:`error_shapes`): isotropic I/d, or 1/k times the projector on M's top k (bottom k, or a
random k-dim) eigen-directions. Every shape has the same expected relative MSE E‖e‖²/‖x‖² = r per
vector and E[e eᵀ] = r·E‖x‖²·C: equal MSE, different directions.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from ..cache.quantized import QuantizeDequantizeCache
from ..evaluation.harness import stored_perplexity
from ..evaluation.models import LoadedModel
from ..evaluation.perplexity import PerplexityResult
from .isotropy import SHAPES, _eigh, _square, _trace, haar_orthogonal
from .moments import directional_risk

__all__ = ["error_shapes", "GaussianNoise", "relative_risk", "risk_ratio", "noise_quantizers", "shaped_noise_runs"]


def error_shapes(M, kind: str, k: int = 8, seed: int = 0) -> np.ndarray:
    """Unit-trace error covariance shapes C per leading index of M (..., d, d) → (..., d, d).

    ``"isotropic"``: I/d. ``"top"`` / ``"bottom"``: the projector on the eigenvectors of M's k
    largest / smallest eigenvalues, divided by k. ``"random"``: the projector on a seeded
    random k-dim subspace (one per leading index), divided by k: as anisotropic as "top"
    but not aligned with M.
    """
    M = _square(M, "M")
    d = M.shape[-1]
    if not 1 <= k <= d:
        raise ValueError(f"k must lie in [1, {d}], got {k}")
    if kind == "isotropic":
        return np.broadcast_to(np.eye(d) / d, M.shape).copy()
    if kind in ("top", "bottom"):
        _, vecs = _eigh(M)  # ascending
        basis = vecs[..., -k:] if kind == "top" else vecs[..., :k]
    elif kind == "random":
        lead = int(np.prod(M.shape[:-2]))
        basis = haar_orthogonal(d, lead, seed=seed)[..., :k].reshape(*M.shape[:-2], d, k)
    else:
        raise ValueError(f"kind must be one of {SHAPES}, got {kind!r}")
    return np.matmul(basis, np.swapaxes(basis, -1, -2)) / k


class GaussianNoise:
    """A quantizer-like callable adding Gaussian error of a given per-head shape at a relative MSE.

    For a write x of shape (batch, kv_heads, T, d): e = √rel_mse · ‖x‖ · F_h z, z ~ N(0, I_d)
    per vector, F_h F_hᵀ = C_h (head h's unit-trace shape). So E[‖e‖² | x] = rel_mse·‖x‖²
    (the error scales with each vector's norm, like a codec with a per-vector scale) and
    E[e eᵀ] = rel_mse · E‖x‖² · C_h. The draws come from a generator seeded by ``seed`` and
    advanced by each call: two instances with the same seed draw the same z sequence on the
    same shapes of input (common random numbers across shapes).

    Parameters
    ----------
    shape : unit-trace PSD matrices, (kv_heads, d, d) or (d, d) for all heads.
    rel_mse : r ≥ 0, the expected ‖e‖²/‖x‖² per vector.
    seed : seed of the Gaussian draws.
    """

    def __init__(self, shape, rel_mse: float, seed: int = 0) -> None:
        shape = _square(shape, "shape")
        if shape.ndim not in (2, 3):
            raise ValueError(f"shape must be (d, d) or (kv_heads, d, d), got {shape.shape}")
        if not rel_mse >= 0:
            raise ValueError(f"rel_mse must be non-negative, got {rel_mse}")
        if not np.allclose(_trace(shape), 1.0, rtol=1e-9, atol=1e-12):
            raise ValueError("each shape must have unit trace")
        vals, vecs = _eigh(0.5 * (shape + np.swapaxes(shape, -1, -2)))
        if vals.min() < -1e-9:
            raise ValueError("each shape must be positive semi-definite")
        self.factor = torch.as_tensor(vecs * np.sqrt(np.clip(vals, 0.0, None))[..., None, :])  # F = V √Λ
        self.rel_mse, self.seed = float(rel_mse), int(seed)
        self._generator: torch.Generator | None = None

    def __repr__(self) -> str:
        return f"GaussianNoise(rel_mse={self.rel_mse}, seed={self.seed})"

    def cache_key(self) -> tuple:
        """What a fresh instance's draws depend on: the shape's factor, the relative MSE and the seed."""
        return ("gaussian noise", self.factor, self.rel_mse, self.seed)

    def noise(self, x: Tensor) -> Tensor:
        """The error e for ``x`` (batch, kv_heads, T, d) in float32/64 (x's work dtype), x's device."""
        if x.dim() != 4 or x.shape[-1] != self.factor.shape[-1]:
            raise ValueError(f"expected x of shape (batch, kv_heads, T, {self.factor.shape[-1]}), got {tuple(x.shape)}")
        if self.factor.dim() == 3 and self.factor.shape[0] != x.shape[1]:
            raise ValueError(f"shape has {self.factor.shape[0]} heads, x has {x.shape[1]}")
        work = x.detach().to(torch.float64 if x.dtype == torch.float64 else torch.float32)
        if self._generator is None or self._generator.device != work.device:
            self._generator = torch.Generator(device=work.device).manual_seed(self.seed)
        z = torch.randn(work.shape, generator=self._generator, device=work.device, dtype=work.dtype)
        factor = self.factor.to(device=work.device, dtype=work.dtype)
        shaped = torch.matmul(z, factor.transpose(-1, -2))  # F_h z per vector; (H, d, d) batches over heads
        return (self.rel_mse**0.5) * work.norm(dim=-1, keepdim=True) * shaped

    def __call__(self, x: Tensor) -> Tensor:
        work = x.detach().to(torch.float64 if x.dtype == torch.float64 else torch.float32)
        return (work + self.noise(x)).to(x.dtype)


def relative_risk(M, shape) -> np.ndarray:
    """tr(M·C)/(tr(M)/d): the risk of a unit-trace error shape C against the isotropic I/d at equal MSE.

    M, shape : (..., d, d), broadcasting; returns shape (...). 1 for C = I/d; between
    d·λ_min/tr M and d·λ_max/tr M for any C.
    """
    M, shape = _square(M, "M"), _square(shape, "shape")
    return directional_risk(M, shape) / (_trace(M) / M.shape[-1]) / _trace(shape)


def risk_ratio(M, shape, weight=1.0) -> float:
    """Σ w·tr(M·C) / Σ w·tr(M)/d over all leading indices: the summed risk of errors of shape C
    against isotropic errors of the same MSE per slot.

    Parameters
    ----------
    M, shape : (..., d, d). weight : broadcastable to (...), e.g. the mean ‖x‖² of each slot
        (an error of relative MSE r has Σ = r·E‖x‖²·C, so the weight makes slots count by size).
    """
    M, shape = _square(M, "M"), _square(shape, "shape")
    w = np.asarray(weight, dtype=np.float64)
    iso = w * _trace(M) / M.shape[-1] * _trace(shape)
    return float((w * directional_risk(M, shape)).sum() / np.broadcast_to(iso, _trace(M).shape).sum())


def noise_quantizers(shapes, rel_mse: float, seed: int = 0) -> tuple[list[GaussianNoise], list[GaussianNoise]]:
    """Per-layer key and value noise injectors for a ``QuantizeDequantizeCache``.

    Parameters
    ----------
    shapes : (layers, 2, kv_heads, d, d) unit-trace shapes (path 0 = keys, 1 = values), e.g.
        :func:`error_shapes` of the gradient moments M.
    rel_mse : relative MSE of every vector.
    seed : base seed; layer l, path p draws with seed ``seed + 2l + p`` (independent slots).

    Returns
    -------
    (key injectors, value injectors), one per layer. Make fresh ones for each run to replay
    the same draws.
    """
    shapes = _square(shapes, "shapes")
    if shapes.ndim != 5 or shapes.shape[1] != 2:
        raise ValueError(f"shapes must be (layers, 2, kv_heads, d, d), got {shapes.shape}")
    return (
        [GaussianNoise(shapes[l, 0], rel_mse, seed + 2 * l) for l in range(shapes.shape[0])],
        [GaussianNoise(shapes[l, 1], rel_mse, seed + 2 * l + 1) for l in range(shapes.shape[0])],
    )


def shaped_noise_runs(
    loaded: LoadedModel,
    input_ids: Tensor,
    labels: Tensor,
    shapes: dict,
    rel_mse: float,
    seed: int = 0,
    batch_size: int = 2,
) -> dict[str, PerplexityResult]:
    """Perplexity with Gaussian error of each shape at one relative MSE in every cached key and value.

    Parameters
    ----------
    shapes : {name: unit-trace shapes (layers, 2, kv_heads, d, d)} (e.g. :func:`error_shapes` of M).
    rel_mse : the relative MSE of every vector, for every shape (equal MSE, different directions).
    seed : seed of the draws (:func:`noise_quantizers`): every shape draws the same z sequence.

    Returns
    -------
    {name: PerplexityResult} on the same windows, each stored (:func:`~lqlib.evaluation.harness.stored_perplexity`)
    under the model, windows and the injectors' shapes, level and seed.
    """
    out = {}
    for name, shape in shapes.items():
        keys, values = noise_quantizers(shape, rel_mse, seed=seed)
        out[name] = stored_perplexity(
            loaded,
            input_ids,
            labels,
            ("shaped noise", keys, values),
            lambda keys=keys, values=values: QuantizeDequantizeCache(keys, loaded.config, values),
            batch_size=batch_size,
            progress=False,
        )
    return out
