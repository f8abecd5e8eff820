"""Error moments Σ, Σ_c and the risks built from them: tr(MΣ), the HLP bounds, the K-path share, bias drift.

Shapes: moments are float64 arrays (..., kv_heads, d, d); functions work on any leading axes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from ..evaluation.capture import KVSample, capture_kv
from ..evaluation.models import LoadedModel
from .quantizers import Quantizer, Quantizers, _as_quantizer, _per_layer

__all__ = [
    "ErrorMoments",
    "ErrorSecondMoments",
    "error_moments",
    "error_moments_for_cache",
    "directional_risk",
    "hlp_bounds",
    "k_path_share",
    "bias_drift",
    "error_second_moments",
]


@dataclass(frozen=True)
class ErrorMoments:
    """Second moments of a quantizer's error e = x̂ − x, per head (float64 arrays).

    Attributes
    ----------
    sigma : Σ = E[e eᵀ] (uncentred), shape (..., kv_heads, d, d), exactly symmetric.
    sigma_c : Σ_c = Σ − ē ēᵀ, same shape.
    mean : ē, shape (..., kv_heads, d).
    """

    sigma: np.ndarray
    sigma_c: np.ndarray
    mean: np.ndarray


def error_moments(x: Tensor, quantizer: Quantizer) -> ErrorMoments:
    """Σ, Σ_c and ē of the error e = quantizer(x) − x, per head.

    Parameters
    ----------
    x : shape (..., kv_heads, T, d); ``quantizer`` is applied to it as a whole (as the cache
        applies it to a (batch, kv_heads, T, d) write).

    Returns
    -------
    :class:`ErrorMoments` of shapes (..., kv_heads, d, d), (..., kv_heads, d, d) and (..., kv_heads, d):
    moments over the T axis only.
    """
    e = _as_quantizer(quantizer)(x).to(torch.float64) - x.to(torch.float64)
    sigma = torch.einsum("...ti,...tj->...ij", e, e) / e.shape[-2]
    sigma = 0.5 * (sigma + sigma.transpose(-1, -2))  # exactly symmetric
    mean = e.mean(dim=-2)
    sigma_c = sigma - mean[..., :, None] * mean[..., None, :]
    return ErrorMoments(sigma.cpu().numpy(), sigma_c.cpu().numpy(), mean.cpu().numpy())


def error_moments_for_cache(
    kv: KVSample, key_quantizer: Quantizers, value_quantizer: Quantizers | None = None
) -> ErrorMoments:
    """:func:`error_moments` of a captured cache, layer by layer (a quantizer or one per layer).

    Each layer's keys (values) are quantized as one (1, kv_heads, T, d) write, as
    :class:`~lqlib.quantized_cache.QuantizeDequantizeCache` does for one window.

    Returns
    -------
    :class:`ErrorMoments` of shapes (layers, 2, kv_heads, d, d) twice and (layers, 2, kv_heads, d).
    """
    n = kv.keys.shape[0]
    kq = _per_layer(key_quantizer, n)
    vq = _per_layer(key_quantizer if value_quantizer is None else value_quantizer, n)

    def one_write(x: Tensor, quantizer: Quantizer) -> ErrorMoments:  # (H, T, d): one batch of one
        moments = error_moments(x[None], quantizer)
        return ErrorMoments(moments.sigma[0], moments.sigma_c[0], moments.mean[0])

    slots = [[one_write(kv.keys[l], kq[l]), one_write(kv.values[l], vq[l])] for l in range(n)]
    return ErrorMoments(
        *(
            np.array([[getattr(slot, name) for slot in layer] for layer in slots])
            for name in ("sigma", "sigma_c", "mean")
        )
    )


def _trace_product(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.einsum("...ij,...ji->...", np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64))


def directional_risk(M: np.ndarray, Sigma: np.ndarray) -> np.ndarray:
    """tr(M·Σ) over the last two axes (broadcasting over the leading ones): E[(gᵀe)²] for independent g, e."""
    return _trace_product(M, Sigma)


def hlp_bounds(M: np.ndarray, Sigma: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(λ_min(M)·tr Σ, λ_max(M)·tr Σ): bounds on tr(MΣ) for symmetric PSD M and Σ, per leading index.

    Tight: the lower (upper) bound is reached by Σ ∝ v vᵀ with v the eigenvector of λ_min (λ_max).
    """
    eig = np.linalg.eigvalsh(np.asarray(M, dtype=np.float64))
    trace = np.trace(np.asarray(Sigma, dtype=np.float64), axis1=-2, axis2=-1)
    return eig[..., 0] * trace, eig[..., -1] * trace


def k_path_share(M: np.ndarray, Sigma: np.ndarray) -> np.ndarray:
    """tr(MΣ)_K / (tr(MΣ)_K + tr(MΣ)_V) summed over layers and heads.

    M, Sigma : shape (..., layers, 2, kv_heads, d, d); returns shape (...).
    """
    risk = directional_risk(M, Sigma)  # (..., layers, 2, kv_heads)
    k, v = risk[..., 0, :].sum(axis=(-1, -2)), risk[..., 1, :].sum(axis=(-1, -2))
    return k / (k + v)


def bias_drift(
    M: np.ndarray, Sigma: np.ndarray, Sigma_c: np.ndarray, axis: int | tuple[int, ...] | None = None
) -> np.ndarray:
    """|tr(MΣ) − tr(MΣ_c)| / tr(MΣ): the share of the directional risk due to the mean error
    (= ēᵀMē / tr MΣ).

    With ``axis``, the risks are first summed over those axes of the (leading-axes) risk array,
    e.g. ``axis=(0, 1, 2)`` on (layers, 2, kv_heads, d, d) inputs gives one model-level number.
    """
    risk, centred = directional_risk(M, Sigma), directional_risk(M, Sigma_c)
    if axis is not None:
        risk, centred = risk.sum(axis=axis), centred.sum(axis=axis)
    return np.abs(risk - centred) / risk


@dataclass(frozen=True)
class ErrorSecondMoments:
    """Σ of several quantizers' errors on the clean cache of some windows (:func:`error_second_moments`).

    Attributes
    ----------
    sigma : {quantizer name: Σ float64 (layers, 2, kv_heads, d, d)}.
    norm2 : E‖x‖², float64 (layers, 2, kv_heads): the mean square norm of the cached vectors.
    vectors : cached vectors per head behind each Σ (windows × tokens).
    """

    sigma: dict[str, np.ndarray]
    norm2: np.ndarray
    vectors: int


def error_second_moments(loaded: LoadedModel, input_ids: Tensor, quantizers: dict) -> ErrorSecondMoments:
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
    :class:`ErrorSecondMoments`.
    """
    if input_ids.dim() != 2 or input_ids.shape[0] < 1:
        raise ValueError(f"input_ids must be (n, T) with n >= 1, got {tuple(input_ids.shape)}")
    sums: dict[str, np.ndarray] = {}
    norm2 = 0.0
    for window in input_ids:
        kv = capture_kv(loaded, window[None])
        for name, quantizer in quantizers.items():
            sigma = error_moments_for_cache(kv, quantizer).sigma
            sums[name] = sums.get(name, 0.0) + sigma
        norm2 = norm2 + torch.stack([kv.keys, kv.values], dim=1).double().square().sum(-1).mean(-1).numpy()
    n = input_ids.shape[0]
    return ErrorSecondMoments({name: total / n for name, total in sums.items()}, norm2 / n, int(input_ids.numel()))
