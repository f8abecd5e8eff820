"""One call from a model to a calibrated compressed cache: :func:`calibrate`.

What it measures, on a few calibration windows (by default the first eight 512-token windows of the
default corpus; evaluations of a calibrated cache score other windows):

* per (layer, K/V, KV head, channel): the mean and standard deviation of the cached vectors, keys
  taken in the pre-RoPE frame (:mod:`lqlib.cache.invariances`), sink tokens left out;
* the diagonal of the loss-gradient second moment ``M = E_t[g gᵀ]`` (Paper III's
  :func:`lqlib.ddt.gradient_moments`, g = ∂(summed NLL)/∂x, with every downstream path): to first
  order, an error e on a cached vector raises the expected loss by about ``½·Σ_j M_jj·e_j²``.

What it decides (:func:`channel_weights`): each channel gets the weight ``w_j = M_jj^α · m̄^(1−α)``
with m̄ the mean of M_jj over the head's channels, and the scale ``g_j = sqrt(w_j)/Δ`` with one step
Δ for the whole model. Quantizing ``x·g`` on E8 gives every channel of every head and layer the same
weighted error ``w_j·e_j² ≈ G(E8)·Δ²`` — fixed-slope coding, the high-rate solution of Paper IV's
water-filling carried down to channels (α = 1; α < 1 trusts the per-channel part of M less). The rate
then follows the data through the per-channel entropy model; Δ is set so that the cache's measured
total rate on the calibration windows — pages, headers, float16 sink tokens and the tables, every
byte — meets ``bits`` without exceeding it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from statistics import NormalDist

import numpy as np
import torch
from torch import Tensor

from ..cache.channel import ChannelKVLayer, ChannelProfile, held_bytes
from ..cache.compressed import CompressedKVCache
from ..cache.invariances import RotaryFrame, rotary_frame
from ..cache.quantized import QuantizeDequantizeCache
from ..coding.channel_codec import ChannelTables
from ..ddt.gradients import gradient_moments
from ..errors import InputError
from ..evaluation.capture import KVSample, capture_kv
from ..evaluation.corpus import load_corpus
from ..evaluation.harness import MethodSpec
from ..evaluation.models import LoadedModel
from ..evaluation.perplexity import token_windows

__all__ = [
    "CALIBRATION_WINDOWS",
    "CALIBRATION_WINDOW",
    "CalibrationStatistics",
    "CalibratedCache",
    "default_calibration_ids",
    "calibration_statistics",
    "channel_weights",
    "profile_for_step",
    "profile_rate",
    "profile_rates",
    "rate_margin",
    "payload_estimate",
    "calibrate",
]

CALIBRATION_WINDOWS = 8
CALIBRATION_WINDOW = 512


def default_calibration_ids(
    loaded: LoadedModel, windows: int = CALIBRATION_WINDOWS, window: int = CALIBRATION_WINDOW
) -> Tensor:
    """The default calibration text: the first ``windows`` windows of ``window`` tokens of the default corpus."""
    ids, _ = token_windows(loaded.tokenizer, load_corpus().text, window, max_windows=windows)
    return ids


@dataclass(frozen=True, eq=False)
class CalibrationStatistics:
    """What :func:`calibrate` measures; arrays of shape (layers, 2, kv_heads, d), path 0 = keys, 1 = values.

    Attributes
    ----------
    mean, std : per-channel mean and standard deviation of the cached vectors (keys in ``frame``).
    fisher : diagonal of M = E_t[g gᵀ] in the same frame.
    windows : the calibration windows' keys and values as the cache receives them (after RoPE).
    frame : the rotary frame of the keys (None: keys after RoPE).
    sink : leading tokens left out of the statistics.
    """

    mean: np.ndarray
    std: np.ndarray
    fisher: np.ndarray
    windows: tuple[KVSample, ...]
    frame: RotaryFrame | None
    sink: int


def calibration_statistics(
    loaded: LoadedModel,
    calibration_ids: Tensor | None = None,
    pre_rope: bool = True,
    sink: int = 1,
    progress: bool = False,
    reuse: CalibrationStatistics | None = None,
) -> CalibrationStatistics:
    """Channel means, standard deviations and loss-gradient moments on the calibration windows (n, T).

    ``reuse``: statistics of the same windows with another sink or frame; its captured windows are
    reused, and its gradient moments too when its frame is of the same kind (they do not depend on
    the sink)."""
    ids = calibration_ids if calibration_ids is not None else default_calibration_ids(loaded)
    if ids.dim() != 2 or ids.shape[1] <= sink:
        raise InputError(f"calibration_ids must have shape (windows, tokens > sink), got {tuple(ids.shape)}")
    frame = rotary_frame(loaded.config) if pre_rope else None
    if reuse is not None and len(reuse.windows) != ids.shape[0]:
        raise InputError("the statistics to reuse were measured on other windows")
    windows = (
        reuse.windows if reuse is not None else tuple(capture_kv(loaded, ids[i : i + 1]) for i in range(ids.shape[0]))
    )
    # every window's positions start at 0: its coded tokens hold positions sink, sink + 1, ...
    keys = torch.cat(
        [
            w.keys[:, :, sink:].double() if frame is None else frame.unrotate(w.keys[:, :, sink:].double(), sink)
            for w in windows
        ],
        dim=2,
    )  # (layers, heads, n, d)
    values = torch.cat([w.values[:, :, sink:] for w in windows], dim=2).double()
    data = torch.stack([keys, values], dim=1)  # (layers, 2, heads, n, d)
    if reuse is not None and (reuse.frame is None) == (frame is None):
        fisher = reuse.fisher
    else:
        moments = gradient_moments(loaded, ids, pre_rope=pre_rope, progress=progress)
        fisher = np.diagonal(moments.M, axis1=-2, axis2=-1).copy()
    return CalibrationStatistics(
        mean=data.mean(dim=-2).numpy(),
        std=data.std(dim=-2, correction=0).numpy(),
        fisher=fisher,
        windows=windows,
        frame=frame,
        sink=sink,
    )


def channel_weights(fisher: np.ndarray, alpha: float = 0.5, across_slots: bool = True) -> np.ndarray:
    """w_j = M_jj^α · m̄^(1−α) per (..., d), m̄ the mean of M_jj over the last axis (a head's channels).

    ``across_slots=False`` divides each head's weights by their geometric mean: the heads, layers and
    K/V paths then get the same weighted error per channel whatever their sensitivity (no allocation
    across slots, only within)."""
    m = np.asarray(fisher, dtype=np.float64)
    m = np.maximum(m, 1e-12 * m.mean(axis=-1, keepdims=True) + 1e-300)
    w = m**alpha * m.mean(axis=-1, keepdims=True) ** (1.0 - alpha)
    if not across_slots:
        w = w / np.exp(np.log(w).mean(axis=-1, keepdims=True))
    return w


def profile_for_step(
    stats: CalibrationStatistics, weights: np.ndarray, step: float, means: bool = True, per_channel: bool = True
) -> ChannelProfile:
    """The profile with scales ``g = sqrt(weights)/step``; ``means=False`` codes around zero, and
    ``per_channel=False`` gives every channel of a head the head's RMS width (one Gaussian per head)."""
    mean = stats.mean if means else np.zeros_like(stats.mean)
    spread = stats.std if means else np.sqrt(stats.std**2 + stats.mean**2)
    scale = np.sqrt(weights) / step
    tables = [
        tuple(
            ChannelTables.from_statistics(mean[layer, path], spread[layer, path], scale[layer, path], not per_channel)
            for path in (0, 1)
        )
        for layer in range(mean.shape[0])
    ]
    return ChannelProfile(tuple(tables), stats.frame, stats.sink)


def profile_rates(profile: ChannelProfile, windows, page_size: int = 64) -> list[float]:
    """Measured total bits/dim of a cache with ``profile`` holding each window alone (batch 1): every byte
    of its pages, float16 sink tokens, tail and tables, × 8 / (2 · numel); one rate per window."""
    codecs = profile.codecs()
    rates = []
    for kv in windows:
        total = sum(
            held_bytes(
                ChannelKVLayer(key_codec, value_codec, profile.frame, profile.sink, page_size),
                kv.keys[layer, None],
                kv.values[layer, None],
            )
            for layer, (key_codec, value_codec) in enumerate(codecs)
        )
        rates.append(8.0 * total / (2 * kv.keys.numel()))
    return rates


def profile_rate(profile: ChannelProfile, windows, page_size: int = 64) -> float:
    """The mean of :func:`profile_rates` over the windows."""
    return float(np.mean(profile_rates(profile, windows, page_size)))


def rate_margin(rates, confidence: float) -> float:
    """z·s/√n: what a one-sided ``confidence`` upper bound on the mean rate of windows like these adds to
    their mean (s the sample standard deviation of the per-window rates; 0 for one window)."""
    rates = np.asarray(rates, dtype=np.float64)
    if rates.size < 2 or confidence <= 0:
        return 0.0
    return float(NormalDist().inv_cdf(confidence) * rates.std(ddof=1) / math.sqrt(rates.size))


def payload_estimate(profile: ChannelProfile, windows) -> float:
    """Ideal entropy-coded bits/dim of the coded tokens of ``windows`` (no headers, sinks or tables):
    the fast part of :func:`profile_rate`, for searching the step."""
    keys = torch.cat([kv.keys[None] for kv in windows])  # (windows, layers, heads, tokens, d)
    values = torch.cat([kv.values[None] for kv in windows])
    start = profile.sink
    bits = 0.0
    for layer, (key_codec, value_codec) in enumerate(profile.codecs()):
        k = keys[:, layer, :, start:]
        if profile.frame is not None:
            k = profile.frame.unrotate(k.double(), start).to(keys.dtype)
        bits += key_codec.code_length(k) + value_codec.code_length(values[:, layer, :, start:])
    return bits / (keys.numel() + values.numel())


@dataclass(frozen=True, eq=False)
class CalibratedCache:
    """What :func:`calibrate` returns: call it for a fresh :class:`~lqlib.CompressedKVCache`.

    Attributes
    ----------
    config : the model config the caches are made for.
    profile : the calibrated configuration (tables, rotary frame, sink tokens).
    bits : the requested rate (bits/dim).
    bits_per_dim : the measured total rate on the calibration windows, never above ``bits``.
    step : the fixed-slope step Δ.
    page_size : tokens per page of the caches it makes.
    settings : the calibration choices (alpha, sink, pre_rope, means, per_channel, across_slots,
        rate_confidence).
    calibration_rates : the measured rate of each calibration window (their mean is ``bits_per_dim``).
    """

    config: object
    profile: ChannelProfile
    bits: float
    bits_per_dim: float
    step: float
    page_size: int = 64
    settings: dict = field(default_factory=dict)
    calibration_rates: tuple[float, ...] = ()

    def __call__(self) -> CompressedKVCache:
        return CompressedKVCache(self.config, page_size=self.page_size, profile=self.profile)

    def quantizers(self):
        """Per-layer (key, value) in-loop quantizers: the same bits as the cache, faster for studies."""
        return self.profile.quantizers()

    def in_loop_cache(self) -> QuantizeDequantizeCache:
        """A fresh in-loop twin of ``self()`` (what attention reads is the same, bit for bit)."""
        keys, values = self.quantizers()
        return QuantizeDequantizeCache(keys, self.config, values)

    def rate(self, windows) -> float:
        """Measured total bits/dim of these caches on other windows (:class:`KVSample` list)."""
        return profile_rate(self.profile, windows, self.page_size)

    def method_spec(self, label: str | None = None) -> MethodSpec:
        """This configuration as a row of the evaluation harness (:func:`lqlib.evaluation.harness.compare_methods`):
        scored through the in-loop twin, its rate measured from the real cache's bytes on the harness's window."""
        return MethodSpec(
            label or f"calibrated E8 {self.bits:g}",
            make_cache=lambda config: self.in_loop_cache(),
            bits_per_dim=lambda kv: self.rate([kv]),
            family="calibrated E8 (lqlib.calibrate)",
        )


def _initial_step(stats: CalibrationStatistics, weights: np.ndarray, bits: float) -> float:
    """High-rate guess: mean_j log2(sqrt(2πe)·σ_j·sqrt(w_j)) − log2 Δ = bits."""
    spread = np.maximum(stats.std, 1e-30) * np.sqrt(weights) * math.sqrt(2 * math.pi * math.e)
    return float(2.0 ** (np.log2(spread).mean() - bits))


def calibrate(
    loaded: LoadedModel,
    bits: float,
    calibration_ids: Tensor | None = None,
    *,
    alpha: float = 0.5,
    sink: int = 1,
    pre_rope: bool = True,
    means: bool = True,
    per_channel: bool = True,
    across_slots: bool = True,
    page_size: int = 64,
    tolerance: float = 0.004,
    rate_confidence: float = 0.95,
    statistics: CalibrationStatistics | None = None,
    progress: bool = False,
) -> CalibratedCache:
    """Calibrate a compressed KV cache for ``loaded`` at ``bits`` measured bits/dim.

    Parameters
    ----------
    loaded : the model (:func:`lqlib.evaluation.models.load`).
    bits : the total rate to meet, bits/dim, every stored byte counted (at the calibration windows'
        length, batch 1).
    calibration_ids : (windows, tokens) token ids to calibrate on (default: the first eight 512-token
        windows of the default corpus).
    alpha, sink, pre_rope, means, per_channel, across_slots : the configuration (defaults: the one
        that won on held-out text; see the book's "Beyond the papers" section): weight exponent, float16
        sink tokens, keys coded before RoPE, channel means removed, one entropy-model width per channel,
        errors weighted across heads/layers/paths by their sensitivity.
    page_size : tokens per page of the caches.
    tolerance : how far below its limit the measured rate may stay.
    rate_confidence : the fixed step lets the rate follow the text; the mean rate on the calibration
        windows is kept at most ``bits − z·s/√n`` (:func:`rate_margin`: s the spread of the per-window
        rates, n the number of windows), a one-sided bound at this confidence for windows like them
        (0: the mean itself at most ``bits``).
    statistics : reuse :func:`calibration_statistics` of an earlier call (same sink and frame).

    Returns
    -------
    CalibratedCache: call it for a fresh cache; ``bits_per_dim`` is the measured mean rate on the
    calibration windows (≤ ``bits`` minus the margin).
    """
    if not 0.5 <= bits <= 16:
        raise InputError(f"bits must lie in [0.5, 16], got {bits}")
    if statistics is None:
        statistics = calibration_statistics(loaded, calibration_ids, pre_rope, sink, progress)
    elif statistics.sink != sink or (statistics.frame is not None) != pre_rope:
        raise InputError("the given statistics were measured with another sink or rotary frame")
    weights = channel_weights(statistics.fisher, alpha, across_slots)

    def profile(log_step: float) -> ChannelProfile:
        return profile_for_step(statistics, weights, 2.0**log_step, means, per_channel)

    def estimate(log_step: float, overhead: float) -> float:
        return payload_estimate(profile(log_step), statistics.windows) + overhead

    def search(log_step: float, overhead: float, goal: float) -> float:
        """log2(step) whose estimated rate (payload + overhead) is within 0.0005 of ``goal`` (the rate falls
        as the step grows): a bracket by doubling, then regula falsi (Illinois) inside it."""
        lo = hi = log_step
        r_lo = r_hi = estimate(log_step, overhead)
        while r_lo < goal and lo > log_step - 40:
            hi, r_hi, lo = lo, r_lo, lo - 1.0
            r_lo = estimate(lo, overhead)
        while r_hi > goal and hi < log_step + 40:
            lo, r_lo, hi = hi, r_hi, hi + 1.0
            r_hi = estimate(hi, overhead)
        if not r_hi <= goal <= r_lo:
            raise InputError(f"no step gives {goal:.3f} bits/dim on the calibration windows")
        f_lo, f_hi, side = r_lo - goal, r_hi - goal, 0  # f falls from f_lo >= 0 to f_hi <= 0
        for _ in range(60):
            if f_lo - f_hi <= 1e-12 or hi - lo < 1e-9:
                break
            x = hi - f_hi * (hi - lo) / (f_hi - f_lo)
            f = estimate(x, overhead) - goal
            if abs(f) <= 0.0005:
                return x
            if f > 0:
                lo, f_lo = x, f
                f_hi = f_hi / 2 if side == 1 else f_hi  # Illinois: the same end twice halves the other's value
                side = 1
            else:
                hi, f_hi = x, f
                f_lo = f_lo / 2 if side == -1 else f_lo
                side = -1
        return hi  # the side at or below the goal

    # the bytes beyond the ideal payload (headers, flushes, sinks, tables) hardly depend on the step:
    # measure them exactly, search on the fast estimate, then check the exact rate
    x = math.log2(_initial_step(statistics, weights, bits))
    best = None
    for _ in range(8):
        candidate = profile(x)
        rates = profile_rates(candidate, statistics.windows, page_size)
        exact, limit = float(np.mean(rates)), bits - rate_margin(rates, rate_confidence)
        if exact <= limit and (best is None or exact > best[1]):
            best = (x, exact, candidate, limit, rates)
        if best is not None and best[3] - best[1] <= tolerance:
            break
        overhead = exact - payload_estimate(candidate, statistics.windows)
        x = search(x, overhead, limit - tolerance / 2)
    if best is None:
        raise InputError(f"no step meets {bits} bits/dim on the calibration windows")
    x, rate, profile, _, rates = best
    return CalibratedCache(
        loaded.config,
        profile,
        float(bits),
        rate,
        2.0**x,
        page_size,
        {
            "alpha": alpha,
            "sink": sink,
            "pre_rope": pre_rope,
            "means": means,
            "per_channel": per_channel,
            "across_slots": across_slots,
            "rate_confidence": rate_confidence,
        },
        tuple(rates),
    )
