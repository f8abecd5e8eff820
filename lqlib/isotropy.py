"""Paper III, Theorem C (isotropic safety): the risk tr(M·UΣUᵀ) of an error under rotations U.

Setting
-------
M (d×d, symmetric PSD) is the gradient second moment of a cached vector (see :mod:`lqlib.ddt`), Σ
the second moment of its error. Rotating the error by an orthogonal U changes its risk to
R(U) = tr(M·UΣUᵀ); its MSE tr Σ does not change.

* **Mean.** Over Haar-random U, E R(U) = tr(M)·tr(Σ)/d, the *isotropic risk* ("iso"): the risk
  of Σ's isotropic counterpart (tr Σ/d)·I, which every U leaves alone.
* **Theorem C.** Write M = (tr M/d)·I + M₀ and Σ = (tr Σ/d)·I + Σ₀ (traceless parts). Then
  R(U) = iso + tr(M₀·UΣ₀Uᵀ), and the second term vanishes for every U only if M₀ = 0 or Σ₀ = 0:
  for an unknown M, Σ = s²I is the unique error covariance whose risk does not depend on U.
* **Exact extremes** (von Neumann / Ruhe trace inequality; for PSD matrices the
  Hardy–Littlewood–Pólya rearrangement of the eigenvalues): with λ↓ the eigenvalues of M and
  μ↓ those of Σ, both in decreasing order,
  Σ_i λ↓_i μ↓_{d+1−i} ≤ R(U) ≤ Σ_i λ↓_i μ↓_i,
  the upper bound reached by the U that puts Σ's eigenvectors on M's in the same order, the lower
  by the reversed order (:func:`extreme_rotations`).
* **Spread.** Over Haar U on O(d) (d ≥ 2), Var R(U) = 2·‖M₀‖_F²·‖Σ₀‖_F² / ((d−1)(d+2)): R
  concentrates around iso like 1/√d while the exact range does not, so a range measured over a
  few thousand random U is far inside the exact one.
* **range/iso** = (max − min)/iso of R over a set of rotations, the Paper III statistic.

Sampling: R(U) = Σ_ij λ_i μ_j W_ij² with W = V_Mᵀ·U·V_Σ (V the eigenvector matrices). W is Haar
when U is, so :func:`sampled_rotation_range` draws W directly, once for all heads (each head's
sample is exactly Haar; the heads share the draws). :func:`rotation_risk` evaluates
tr(M·UΣUᵀ) for given U, the definition, as a second implementation.

M variants (:func:`m_variant`), all with the trace of M (range/iso does not depend on M's scale):
``"actual"`` M; ``"rank-1"`` tr(M)·v vᵀ with v M's top eigenvector; ``"near-isotropic"``
(1 − ε)·(tr M/d)·I + ε·M, whose traceless part is ε·M₀, so its range/iso is exactly ε times
that of M for the same rotations (it holds by construction).

Noise for end-to-end checks (:class:`GaussianNoise`): e = √r·‖x‖·F·z, z ~ N(0, I), F Fᵀ = C with
C a unit-trace "shape" per KV head (:func:`error_shapes`): isotropic I/d, or 1/k times the
projector on M's top k (bottom k, or a random k-dim) eigen-directions. Every shape has the same
expected relative MSE E‖e‖²/‖x‖² = r per vector and E[e eᵀ] = r·E‖x‖²·C: equal MSE, different
directions.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from .ddt import directional_risk, error_moments_for_cache
from .kv_capture import capture_kv
from .models import LoadedModel

__all__ = [
    "M_TYPES", "haar_orthogonal", "rotation_risk", "spectral_rotation_risk", "isotropic_risk",
    "rotation_extremes", "extreme_rotations", "rotation_risk_variance", "anisotropy", "range_over_iso",
    "m_variant",
    "RotationRange", "sampled_rotation_range", "SHAPES", "error_shapes", "GaussianNoise",
    "relative_risk", "risk_ratio", "noise_quantizers", "paired_delta_pct", "plane_rotations",
    "rotation_study", "error_second_moments",
]

M_TYPES = ("actual", "rank-1", "near-isotropic")
SHAPES = ("isotropic", "top", "bottom", "random")


# ===================================================================== helpers
def _square(a, name: str) -> np.ndarray:
    a = np.asarray(a, dtype=np.float64)
    if a.ndim < 2 or a.shape[-1] != a.shape[-2]:
        raise ValueError(f"{name} must have shape (..., d, d), got {a.shape}")
    return a


# Batches of small matrices go through torch's LAPACK on one thread: on many 64×64 problems
# NumPy's OpenBLAS threads, or torch's intra-op threads, can be tens to hundreds of times slower
# on a busy machine.
@contextmanager
def _one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _eigh(a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Eigenvalues (ascending) and eigenvectors (columns) of symmetric a (..., d, d), float64."""
    with _one_thread():
        vals, vecs = torch.linalg.eigh(torch.from_numpy(np.ascontiguousarray(a, dtype=np.float64)))
    return vals.numpy(), vecs.numpy()


def _eigvalsh(a: np.ndarray) -> np.ndarray:
    """Eigenvalues (ascending) of symmetric a (..., d, d), float64."""
    with _one_thread():
        return torch.linalg.eigvalsh(torch.from_numpy(np.ascontiguousarray(a, dtype=np.float64))).numpy()


def _qr(a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    with _one_thread():
        q, r = torch.linalg.qr(torch.from_numpy(np.ascontiguousarray(a, dtype=np.float64)))
    return q.numpy(), r.numpy()


def _trace(a: np.ndarray) -> np.ndarray:
    return np.trace(a, axis1=-2, axis2=-1)


def _traceless_norm2(a: np.ndarray) -> np.ndarray:
    """‖a − (tr a/d)·I‖_F² for symmetric a (..., d, d)."""
    d = a.shape[-1]
    return np.square(a).sum(axis=(-2, -1)) - _trace(a) ** 2 / d


# ===================================================================== rotations
def haar_orthogonal(d: int, n: int | None = None, seed: int = 0) -> np.ndarray:
    """Haar-random orthogonal matrices (uniform on O(d)).

    QR of a standard Gaussian matrix G = QR, then Q·diag(sign R_ii): without the sign fix Q is
    not Haar (its distribution depends on the QR routine's sign convention).

    Parameters
    ----------
    d : dimension (≥ 1).
    n : number of matrices; None gives a single (d, d) matrix.
    seed : seed of the Gaussian draws (numpy ``default_rng``).

    Returns
    -------
    float64 array of shape (n, d, d), or (d, d) when ``n`` is None.
    """
    if d < 1:
        raise ValueError(f"d must be positive, got {d}")
    if n is not None and n < 0:
        raise ValueError(f"n must be non-negative, got {n}")
    g = np.random.default_rng(seed).standard_normal((1 if n is None else n, d, d))
    q, r = _qr(g)
    signs = np.sign(np.diagonal(r, axis1=-2, axis2=-1))
    q = q * np.where(signs == 0, 1.0, signs)[..., None, :]
    return q[0] if n is None else q


def rotation_risk(M, Sigma, U) -> np.ndarray:
    """R(U) = tr(M·UΣUᵀ) for every rotation U (the definition, vectorised).

    Parameters
    ----------
    M, Sigma : symmetric, shape (..., d, d) (broadcasting over leading axes).
    U : shape (n, d, d): the rotations (any square matrices, in fact).

    Returns
    -------
    float64 array of shape (..., n). Memory: the leading size × n × d² floats; for many
    heads and rotations use :func:`sampled_rotation_range`.
    """
    M, Sigma, U = _square(M, "M"), _square(Sigma, "Sigma"), _square(U, "U")
    if U.ndim != 3 or not M.shape[-1] == Sigma.shape[-1] == U.shape[-1]:
        raise ValueError(f"need M, Sigma (..., d, d) and U (n, d, d); got {M.shape}, {Sigma.shape}, {U.shape}")
    mu = np.matmul(M[..., None, :, :], U)              # (..., n, d, d): M U
    us = np.matmul(U, Sigma[..., None, :, :])          # (..., n, d, d): U Σ
    return np.einsum("...ij,...ij->...", mu, us)       # tr(MU (UΣ)ᵀ) = tr(M U Σ Uᵀ), Σ symmetric


def spectral_rotation_risk(m_eigs, s_eigs, W) -> np.ndarray:
    """R = Σ_ij λ_i μ_j W_ij² = tr(diag λ · W diag μ Wᵀ) for every W.

    With M = V_M diag(λ) V_Mᵀ and Σ = V_Σ diag(μ) V_Σᵀ, this is tr(M·UΣUᵀ) at
    U = V_M W V_Σᵀ.

    Parameters
    ----------
    m_eigs, s_eigs : eigenvalues (..., d), broadcasting against each other.
    W : rotations (n, d, d).

    Returns
    -------
    float64 array of shape (..., n).
    """
    m_eigs, s_eigs = np.asarray(m_eigs, dtype=np.float64), np.asarray(s_eigs, dtype=np.float64)
    W = _square(W, "W")
    if W.ndim != 3 or not m_eigs.shape[-1] == s_eigs.shape[-1] == W.shape[-1]:
        raise ValueError(f"need eigenvalues (..., d) and W (n, d, d); got {m_eigs.shape}, {s_eigs.shape}, "
                         f"{W.shape}")
    n, d = W.shape[0], W.shape[-1]
    lead = np.broadcast_shapes(m_eigs.shape[:-1], s_eigs.shape[:-1])
    lam = np.broadcast_to(m_eigs, lead + (d,)).reshape(-1, d)           # (H, d)
    mu = np.broadcast_to(s_eigs, lead + (d,)).reshape(-1, d)
    p = np.square(W).reshape(n * d, d)                                   # W∘W, doubly stochastic
    y = (p @ mu.T).reshape(n, d, -1)                                     # (n, d, H): P μ, one GEMM
    return np.einsum("nih,hi->hn", y, lam).reshape(lead + (n,))          # λᵀ P μ


def isotropic_risk(M, Sigma) -> np.ndarray:
    """iso = tr(M)·tr(Σ)/d = E_U tr(M·UΣUᵀ) over Haar U = tr(M·(tr Σ/d)·I); shape (...)."""
    M, Sigma = _square(M, "M"), _square(Sigma, "Sigma")
    return _trace(M) * _trace(Sigma) / M.shape[-1]


def rotation_extremes(M, Sigma) -> tuple[np.ndarray, np.ndarray]:
    """(min, max) over orthogonal U of tr(M·UΣUᵀ): Σ λ↓_i μ↑_i and Σ λ↓_i μ↓_i; each of shape (...)."""
    lam = _eigvalsh(_square(M, "M"))        # ascending
    mu = _eigvalsh(_square(Sigma, "Sigma"))
    return (lam * mu[..., ::-1]).sum(axis=-1), (lam * mu).sum(axis=-1)


def extreme_rotations(M, Sigma) -> tuple[np.ndarray, np.ndarray]:
    """(U_min, U_max) reaching :func:`rotation_extremes`, each (..., d, d).

    U_max = V_M V_Σᵀ maps Σ's k-th eigenvector (ascending) onto M's k-th; U_min onto M's
    (d+1−k)-th.
    """
    _, vm = _eigh(_square(M, "M"))
    _, vs = _eigh(_square(Sigma, "Sigma"))
    vst = np.swapaxes(vs, -1, -2)
    return np.matmul(vm[..., ::-1], vst), np.matmul(vm, vst)


def plane_rotations(u, v, thetas) -> np.ndarray:
    """Rotations by each angle θ in the plane of orthonormal u, v (d,), identity elsewhere: (n, d, d).

    U_θ u = cos θ·u + sin θ·v and U_θ v = −sin θ·u + cos θ·v.
    """
    u, v = np.asarray(u, dtype=np.float64), np.asarray(v, dtype=np.float64)
    if u.ndim != 1 or u.shape != v.shape:
        raise ValueError(f"u and v must be vectors of one length, got {u.shape} and {v.shape}")
    if not np.allclose([u @ u, v @ v, u @ v], [1.0, 1.0, 0.0], atol=1e-10):
        raise ValueError("u and v must be orthonormal")
    t = np.asarray(thetas, dtype=np.float64).reshape(-1, 1, 1)
    uu, vv, vu = np.outer(u, u), np.outer(v, v), np.outer(v, u)
    return np.eye(u.size) + (np.cos(t) - 1.0) * (uu + vv) + np.sin(t) * (vu - vu.T)


def rotation_risk_variance(M, Sigma) -> np.ndarray:
    """Var over Haar U ∈ O(d) of tr(M·UΣUᵀ): 2‖M₀‖_F²‖Σ₀‖_F² / ((d−1)(d+2)) (d ≥ 2); shape (...)."""
    M, Sigma = _square(M, "M"), _square(Sigma, "Sigma")
    d = M.shape[-1]
    if d < 2:
        raise ValueError("the variance formula needs d >= 2")
    return 2.0 * _traceless_norm2(M) * _traceless_norm2(Sigma) / ((d - 1) * (d + 2))


def anisotropy(Sigma) -> np.ndarray:
    """√d·‖Σ₀‖_F / tr Σ: the RMS of Σ's eigenvalues about their mean, relative to the mean; shape (...).

    0 exactly for Σ = s²I. The sample second moment of n isotropic Gaussian vectors has about
    √(d/n) (Marchenko–Pastur), the floor below which a measured Σ cannot be told from s²I.
    """
    Sigma = _square(Sigma, "Sigma")
    return np.sqrt(Sigma.shape[-1] * np.clip(_traceless_norm2(Sigma), 0.0, None)) / _trace(Sigma)


def range_over_iso(risks, iso) -> np.ndarray:
    """(max − min)/iso over the last axis of ``risks`` (..., n); ``iso`` broadcastable to (...)."""
    risks = np.asarray(risks, dtype=np.float64)
    return (risks.max(axis=-1) - risks.min(axis=-1)) / np.asarray(iso, dtype=np.float64)


def m_variant(M, kind: str, eps: float = 0.05) -> np.ndarray:
    """A variant of M with the same trace (per leading index), shape (..., d, d).

    ``"actual"``: M itself; ``"rank-1"``: tr(M)·v vᵀ, v the eigenvector of λ_max(M);
    ``"near-isotropic"``: (1 − eps)·(tr M/d)·I + eps·M (traceless part eps·M₀).
    """
    M = _square(M, "M")
    if kind == "actual":
        return M.copy()
    if kind == "rank-1":
        _, vecs = _eigh(M)
        v = vecs[..., :, -1]
        return _trace(M)[..., None, None] * v[..., :, None] * v[..., None, :]
    if kind == "near-isotropic":
        if not 0.0 <= eps <= 1.0:
            raise ValueError(f"eps must lie in [0, 1], got {eps}")
        d = M.shape[-1]
        return (1.0 - eps) * (_trace(M) / d)[..., None, None] * np.eye(d) + eps * M
    raise ValueError(f"kind must be one of {M_TYPES}, got {kind!r}")


@dataclass(frozen=True)
class RotationRange:
    """Risk under rotations, per leading index (e.g. (layers, 2, kv_heads)); all float64 arrays.

    Attributes
    ----------
    sampled_min, sampled_max : min and max of tr(M·UΣUᵀ) over the sampled U.
    iso : tr(M)·tr(Σ)/d.
    exact_min, exact_max : the extremes over all of O(d) (:func:`rotation_extremes`).
    std : the exact standard deviation over Haar U (:func:`rotation_risk_variance`).
    n_rotations : number of sampled rotations.
    """

    sampled_min: np.ndarray
    sampled_max: np.ndarray
    iso: np.ndarray
    exact_min: np.ndarray
    exact_max: np.ndarray
    std: np.ndarray
    n_rotations: int

    @property
    def range_iso(self) -> np.ndarray:
        """(sampled max − sampled min)/iso: the Paper III statistic."""
        return (self.sampled_max - self.sampled_min) / self.iso

    @property
    def exact_range_iso(self) -> np.ndarray:
        """(exact max − exact min)/iso."""
        return (self.exact_max - self.exact_min) / self.iso

    @property
    def std_iso(self) -> np.ndarray:
        """Haar standard deviation / iso."""
        return self.std / self.iso


def _haar_chunks(d: int, n_rotations: int, seed: int, chunk: int) -> list[np.ndarray]:
    if n_rotations < 1 or chunk < 1:
        raise ValueError(f"n_rotations and chunk must be positive, got {n_rotations}, {chunk}")
    return [haar_orthogonal(d, min(chunk, n_rotations - start), seed=seed * 100_003 + i)
            for i, start in enumerate(range(0, n_rotations, chunk))]


def _range_from_spectra(M: np.ndarray, Sigma: np.ndarray, chunks: list[np.ndarray]) -> RotationRange:
    lam, mu = _eigvalsh(M), _eigvalsh(Sigma)                 # ascending
    lo = hi = None
    for W in chunks:
        risks = spectral_rotation_risk(lam, mu, W)
        lo = risks.min(axis=-1) if lo is None else np.minimum(lo, risks.min(axis=-1))
        hi = risks.max(axis=-1) if hi is None else np.maximum(hi, risks.max(axis=-1))
    exact_min, exact_max = (lam * mu[..., ::-1]).sum(axis=-1), (lam * mu).sum(axis=-1)  # as rotation_extremes
    return RotationRange(lo, hi, isotropic_risk(M, Sigma), exact_min, exact_max,
                         np.sqrt(rotation_risk_variance(M, Sigma)), sum(len(W) for W in chunks))


def sampled_rotation_range(M, Sigma, n_rotations: int = 1000, seed: int = 0, chunk: int = 256) -> RotationRange:
    """Min and max of tr(M·UΣUᵀ) over ``n_rotations`` Haar U, beside the exact extremes.

    The same Haar draws W serve every leading index (the risk is λᵀ(W∘W)μ in the eigenbases,
    see the module notes), drawn in chunks of ``chunk`` rotations to bound memory.

    Parameters
    ----------
    M, Sigma : symmetric PSD, shape (..., d, d), broadcasting against each other.
    """
    M, Sigma = _square(M, "M"), _square(Sigma, "Sigma")
    return _range_from_spectra(M, Sigma, _haar_chunks(M.shape[-1], n_rotations, seed, chunk))


# ===================================================================== noise for end-to-end checks
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
        _, vecs = _eigh(M)                         # ascending
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

    def noise(self, x: Tensor) -> Tensor:
        """The error e for ``x`` (batch, kv_heads, T, d) in float32/64 (x's work dtype), x's device."""
        if x.dim() != 4 or x.shape[-1] != self.factor.shape[-1]:
            raise ValueError(f"expected x of shape (batch, kv_heads, T, {self.factor.shape[-1]}), got "
                             f"{tuple(x.shape)}")
        if self.factor.dim() == 3 and self.factor.shape[0] != x.shape[1]:
            raise ValueError(f"shape has {self.factor.shape[0]} heads, x has {x.shape[1]}")
        work = x.detach().to(torch.float64 if x.dtype == torch.float64 else torch.float32)
        if self._generator is None or self._generator.device != work.device:
            self._generator = torch.Generator(device=work.device).manual_seed(self.seed)
        z = torch.randn(work.shape, generator=self._generator, device=work.device, dtype=work.dtype)
        factor = self.factor.to(device=work.device, dtype=work.dtype)
        shaped = torch.matmul(z, factor.transpose(-1, -2))     # F_h z per vector; (H, d, d) batches over heads
        return (self.rel_mse ** 0.5) * work.norm(dim=-1, keepdim=True) * shaped

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
    return ([GaussianNoise(shapes[l, 0], rel_mse, seed + 2 * l) for l in range(shapes.shape[0])],
            [GaussianNoise(shapes[l, 1], rel_mse, seed + 2 * l + 1) for l in range(shapes.shape[0])])


def paired_delta_pct(window_nll, clean_window_nll, window_tokens, n_boot: int = 4000, seed: int = 0
                     ) -> tuple[float, float, float]:
    """100·(PPL/PPL_clean − 1) over windows, with a 95% paired bootstrap interval over windows.

    Parameters
    ----------
    window_nll, clean_window_nll : summed NLL (nats) per window, (n,), same windows.
    window_tokens : scored tokens per window, (n,).

    Returns
    -------
    (delta_pct, low, high); the interval resamples windows (the same ones for both runs).
    """
    a = np.asarray(window_nll, dtype=np.float64)
    b = np.asarray(clean_window_nll, dtype=np.float64)
    t = np.asarray(window_tokens, dtype=np.float64)
    if not a.shape == b.shape == t.shape or a.ndim != 1 or a.size == 0:
        raise ValueError(f"need three equal 1-d arrays, got {a.shape}, {b.shape}, {t.shape}")

    def delta(index: np.ndarray) -> np.ndarray:
        return 100.0 * np.expm1((a - b)[index].sum(axis=-1) / t[index].sum(axis=-1))

    draws = delta(np.random.default_rng(seed).integers(0, a.size, (n_boot, a.size)))
    low, high = np.percentile(draws, [2.5, 97.5])
    return float(delta(np.arange(a.size))), float(low), float(high)


# ===================================================================== studies on a model
def rotation_study(M, sigmas: dict, eps: float = 0.05, n_rotations: int = 1000, seed: int = 0
                   ) -> dict[tuple[str, str], RotationRange]:
    """:func:`sampled_rotation_range` for every M variant × error source.

    Parameters
    ----------
    M : (..., d, d) gradient moments (e.g. (layers, 2, kv_heads, d, d)).
    sigmas : {source name: Σ of the same shape}.
    eps : the near-isotropic mixing weight (:func:`m_variant`).

    Returns
    -------
    {(m_type, source): RotationRange}, every entry drawn with the same rotations (``seed``).
    """
    M = _square(M, "M")
    variants = {kind: m_variant(M, kind, eps) for kind in M_TYPES}
    chunks = _haar_chunks(M.shape[-1], n_rotations, seed, 256)   # drawn once, shared by all entries
    return {(kind, name): _range_from_spectra(variants[kind], _square(sigma, name), chunks)
            for kind in M_TYPES for name, sigma in sigmas.items()}


def error_second_moments(loaded: LoadedModel, input_ids: Tensor, quantizers: dict
                         ) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Σ = E[e eᵀ] of each quantizer's error on the clean cache of the windows, and E‖x‖².

    Each window's cache is captured once (:func:`~lqlib.kv_capture.capture_kv`) and every
    quantizer is applied to it as one write per layer (:func:`~lqlib.ddt.error_moments_for_cache`);
    the moments are averaged over windows (equal tokens each).

    Parameters
    ----------
    input_ids : (n, T) windows.
    quantizers : {name: quantizer} (a callable or an object with ``quantize``), used for keys
        and values alike.

    Returns
    -------
    ({name: Σ float64 (layers, 2, kv_heads, d, d)}, mean square norm E‖x‖² float64
    (layers, 2, kv_heads)).
    """
    if input_ids.dim() != 2 or input_ids.shape[0] < 1:
        raise ValueError(f"input_ids must be (n, T) with n >= 1, got {tuple(input_ids.shape)}")
    sums: dict[str, np.ndarray] = {}
    norm2 = 0.0
    for window in input_ids:
        kv = capture_kv(loaded, window[None])
        for name, quantizer in quantizers.items():
            sigma = error_moments_for_cache(kv, quantizer)[0]
            sums[name] = sums.get(name, 0.0) + sigma
        norm2 = norm2 + torch.stack([kv.keys, kv.values], dim=1).double().square().sum(-1).mean(-1).numpy()
    n = input_ids.shape[0]
    return {name: total / n for name, total in sums.items()}, norm2 / n
