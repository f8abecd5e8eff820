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
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch

from ..evaluation.stats import Estimate, bootstrap

__all__ = [
    "M_TYPES",
    "SHAPES",
    "haar_orthogonal",
    "rotation_risk",
    "spectral_rotation_risk",
    "isotropic_risk",
    "rotation_extremes",
    "extreme_rotations",
    "plane_rotations",
    "rotation_risk_variance",
    "anisotropy",
    "range_over_iso",
    "m_variant",
    "RotationRange",
    "sampled_rotation_range",
    "rotation_study",
    "head_median",
]


M_TYPES = ("actual", "rank-1", "near-isotropic")


SHAPES = ("isotropic", "top", "bottom", "random")


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
    mu = np.matmul(M[..., None, :, :], U)  # (..., n, d, d): M U
    us = np.matmul(U, Sigma[..., None, :, :])  # (..., n, d, d): U Σ
    return np.einsum("...ij,...ij->...", mu, us)  # tr(MU (UΣ)ᵀ) = tr(M U Σ Uᵀ), Σ symmetric


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
        raise ValueError(f"need eigenvalues (..., d) and W (n, d, d); got {m_eigs.shape}, {s_eigs.shape}, {W.shape}")
    n, d = W.shape[0], W.shape[-1]
    lead = np.broadcast_shapes(m_eigs.shape[:-1], s_eigs.shape[:-1])
    lam = np.broadcast_to(m_eigs, lead + (d,)).reshape(-1, d)  # (H, d)
    mu = np.broadcast_to(s_eigs, lead + (d,)).reshape(-1, d)
    p = np.square(W).reshape(n * d, d)  # W∘W, doubly stochastic
    y = (p @ mu.T).reshape(n, d, -1)  # (n, d, H): P μ, one GEMM
    return np.einsum("nih,hi->hn", y, lam).reshape(lead + (n,))  # λᵀ P μ


def isotropic_risk(M, Sigma) -> np.ndarray:
    """iso = tr(M)·tr(Σ)/d = E_U tr(M·UΣUᵀ) over Haar U = tr(M·(tr Σ/d)·I); shape (...)."""
    M, Sigma = _square(M, "M"), _square(Sigma, "Sigma")
    return _trace(M) * _trace(Sigma) / M.shape[-1]


def rotation_extremes(M, Sigma) -> tuple[np.ndarray, np.ndarray]:
    """(min, max) over orthogonal U of tr(M·UΣUᵀ): Σ λ↓_i μ↑_i and Σ λ↓_i μ↓_i; each of shape (...)."""
    lam = _eigvalsh(_square(M, "M"))  # ascending
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
    return [
        haar_orthogonal(d, min(chunk, n_rotations - start), seed=seed * 100_003 + i)
        for i, start in enumerate(range(0, n_rotations, chunk))
    ]


def _range_from_spectra(M: np.ndarray, Sigma: np.ndarray, chunks: list[np.ndarray]) -> RotationRange:
    lam, mu = _eigvalsh(M), _eigvalsh(Sigma)  # ascending
    lo = hi = None
    for W in chunks:
        risks = spectral_rotation_risk(lam, mu, W)
        lo = risks.min(axis=-1) if lo is None else np.minimum(lo, risks.min(axis=-1))
        hi = risks.max(axis=-1) if hi is None else np.maximum(hi, risks.max(axis=-1))
    exact_min, exact_max = (lam * mu[..., ::-1]).sum(axis=-1), (lam * mu).sum(axis=-1)  # as rotation_extremes
    return RotationRange(
        lo,
        hi,
        isotropic_risk(M, Sigma),
        exact_min,
        exact_max,
        np.sqrt(rotation_risk_variance(M, Sigma)),
        sum(len(W) for W in chunks),
    )


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


def rotation_study(
    M, sigmas: dict, eps: float = 0.05, n_rotations: int = 1000, seed: int = 0
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
    chunks = _haar_chunks(M.shape[-1], n_rotations, seed, 256)  # drawn once, shared by all entries
    return {
        (kind, name): _range_from_spectra(variants[kind], _square(sigma, name), chunks)
        for kind in M_TYPES
        for name, sigma in sigmas.items()
    }


def head_median(values, draws: int = 4000, level: float = 0.95, seed: int = 0) -> Estimate:
    """The median of a per-head statistic over every head (all axes flattened, e.g. (layers, 2, kv_heads)),
    with a percentile bootstrap interval over heads (:func:`lqlib.evaluation.stats.bootstrap`)."""
    x = np.asarray(values, dtype=np.float64).reshape(-1)
    return bootstrap(lambda index: np.median(x[index], axis=-1), x.size, draws, level, seed)
