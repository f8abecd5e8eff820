"""Bit schedules for the cache: per-layer key and value rates that meet a *measured* budget.

A schedule is a float64 array of shape (layers, 2): the codec rate of each layer's keys
(column 0) and values (column 1). Its stored rate — what :class:`lqlib.CompressedKVCache`
really holds, step codes, headers and checksums included — is measured on a captured cache
by :func:`lqlib.evaluate.compressed_cache_rate`; it lies about 0.09 bit above the schedule's
mean at head dim 64. :func:`fit_schedule` water-fills the codec rates (:mod:`lqlib.allocation`)
and moves the payload budget until the measured rate meets the target without exceeding it.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor

from ..cache.compressed import schedule_codecs
from ..coding.codec import E8Codec
from ..errors import InputError
from ..evaluation.capture import KVSample
from ..evaluation.harness import compressed_cache_rate, e8_bits_for_rate
from .allocation import allocate

__all__ = ["uniform_schedule", "fit_schedule", "schedule_quantizers", "channel_scales"]


def uniform_schedule(
    target_bits: float, kv: KVSample, rotation: str = "rht", key_scales: Tensor | None = None
) -> np.ndarray:
    """Every slot at the one codec rate whose real cache (with ``key_scales``, if any) stores
    ``target_bits`` bits/dim on ``kv``."""
    b = e8_bits_for_rate(target_bits, kv, rotation, key_scales=key_scales)
    return np.full((kv.keys.shape[0], 2), b)


def fit_schedule(
    weights: np.ndarray,
    target_bits: float,
    kv: KVSample,
    grid: float = 0.125,
    b_min: float = 1.0,
    b_max: float = 8.0,
    key_scales: Tensor | None = None,
    iterations: int = 8,
) -> tuple[np.ndarray, float]:
    """Water-fill ``weights`` (layers, 2) into a schedule whose measured rate on ``kv`` is at most
    ``target_bits`` and as close to it as the grid allows.

    Returns (schedule, measured bits/dim). The payload budget starts at the target minus the
    uniform schedule's side information and is moved by the measured excess at each step; the
    best schedule that does not exceed the target is kept.
    """
    weights = np.asarray(weights, dtype=np.float64)
    if weights.shape != (kv.keys.shape[0], 2):
        raise InputError(f"weights must have shape (layers, 2) = ({kv.keys.shape[0]}, 2), got {weights.shape}")
    budget = target_bits - (compressed_cache_rate(kv, target_bits, key_scales=key_scales) - target_bits)
    best: tuple[np.ndarray, float] | None = None
    previous = None
    for _ in range(iterations):
        budget = min(max(budget, b_min), b_max)
        schedule = allocate(weights, budget, grid=grid, b_min=b_min, b_max=b_max).bits.reshape(weights.shape)
        rate = compressed_cache_rate(kv, schedule, key_scales=key_scales)
        if rate <= target_bits and (best is None or rate > best[1]):
            best = (np.array(schedule), rate)
        if rate > target_bits and previous is not None and np.array_equal(schedule, previous):
            # an excess smaller than one grid increment does not move the rounding: step down by one
            budget -= grid / weights.size
        else:
            budget += target_bits - rate
        previous = schedule
    if best is None:
        raise InputError(f"no schedule on a {grid}-bit grid stores at most {target_bits} bits/dim on this cache")
    return best


def schedule_quantizers(
    schedule: np.ndarray, rotation: str = "rht", key_scales: Tensor | None = None
) -> tuple[list[Callable[[Tensor], Tensor]], list[Callable[[Tensor], Tensor]]]:
    """Per-layer key and value quantizers for :class:`lqlib.quantized_cache.QuantizeDequantizeCache`,
    the in-loop twin of ``CompressedKVCache(config, schedule, key_scales=...)``."""
    schedule = np.asarray(schedule, dtype=np.float64)
    keys, values = [], []
    for layer, (codec, value_codec) in enumerate(schedule_codecs(schedule, len(schedule), rotation)):
        if key_scales is None:
            keys.append(codec.quantize)
        else:
            scale = key_scales[layer].to(torch.float16)[:, None, :]

            def scaled(x: Tensor, codec: E8Codec = codec, scale: Tensor = scale) -> Tensor:
                s = scale.to(device=x.device, dtype=x.dtype)
                return codec.quantize(x / s) * s

            keys.append(scaled)
        values.append(value_codec.quantize)
    return keys, values


def channel_scales(kv: KVSample) -> Tensor:
    """Per-channel key scales from calibration keys: the RMS of each (layer, KV head, channel)
    over tokens, divided by its mean over channels. Shape (layers, kv_heads, head_dim), float16."""
    rms = kv.keys.double().square().mean(dim=-2).sqrt()
    scales = rms / rms.mean(dim=-1, keepdim=True)
    return scales.clamp_min(2.0**-14).to(torch.float16)
