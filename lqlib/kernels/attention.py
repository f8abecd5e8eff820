"""Decode attention over an E8-coded KV cache, reading the fixed-rate pages directly.

One new query token per batch row attends to the ``length`` cached tokens of its KV head
(grouped-query attention: query head ``h`` reads KV head ``h // (Hq/Hkv)``, as
``torch.nn.functional.scaled_dot_product_attention(..., enable_gqa=True)``). The cache holds,
per KV head and token, the codes ``2·p`` (int8, ``d`` of them) and the step code ``k`` (int16)
that :func:`lqlib.kernels.quantize` writes; keys may have been divided by per-channel key
scales (Hkv, d) before coding (:class:`lqlib.compressed_cache.CompressedKVCache`).

The math. With the RHT, the codec's reconstruction is ``x̂ = signs ⊙ (H·p) · f(k)`` with ``H``
the unnormalised Sylvester–Hadamard matrix (symmetric), ``p = codes/2`` and
``f(k) = step_values(k − 4·log2 d)`` (:meth:`lqlib.E8Codec._synthesis_factors`, the 1/√d of the
orthonormal rotation folded in). Hence, with ``s`` the key scales,

* ``q·(s ⊙ x̂_j) = f(k_j) · ⟨H·(signs ⊙ s ⊙ q), codes_j⟩ / 2``: the query is rotated once and
  every score is a dot product of the cached integer codes with it, times a per-token factor;
* ``Σ_j a_j x̂_j = signs ⊙ H·(Σ_j a_j f(k_j) codes_j) / 2``: the values are summed in the
  rotated domain and the sum is rotated back once per head.

No key or value is ever decompressed. Without the RHT (``rotation="none"``), ``H`` and the
signs drop out. :func:`decode_attention` runs a Triton split-K kernel (``_attention_triton``);
:func:`reference_decode_attention` dequantizes with :func:`lqlib.kernels.reference_dequantize`
and computes float32 softmax attention with torch operations: the ground truth of the tests.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from ..coding.codec import E8Codec
from ..core.rht import fwht
from ..errors import InputError
from ..kernels import (
    _check_codec,
    _tables,
    check_kernel_device,
    reference_dequantize,
    triton_cdiv,
)

__all__ = ["decode_attention", "reference_decode_attention", "AttentionConfig", "QUERY_DTYPES"]

QUERY_DTYPES = (torch.float16, torch.bfloat16)
MAX_SPLITS = 128


@dataclass(frozen=True)
class AttentionConfig:
    """Launch parameters of the split-K kernel (they change the speed, not the result beyond rounding).

    block_n: tokens per tile (a power of two, >= 16); num_warps, num_stages: Triton's;
    splits: programs per (batch row, KV head) along the sequence (None: from the SM count);
    maxnreg: a cap on registers per thread (None: the compiler's choice; the nested kernel only),
    which lets more programs reside on an SM (their number sizes the default splits).
    """

    block_n: int = 256
    num_warps: int = 4
    num_stages: int = 2
    splits: int | None = None
    maxnreg: int | None = None

    def resident_per_sm(self) -> int:
        """Programs an SM holds at once, as far as registers go (2 without a cap: ~255 registers)."""
        if self.maxnreg is None:
            return 2
        return max(2, 65536 // (self.maxnreg * 32 * self.num_warps))


def _validate(
    q: Tensor,
    k_codes: Tensor,
    k_steps: Tensor,
    v_codes: Tensor,
    v_steps: Tensor,
    length: int | Tensor,
    k_codec: E8Codec,
    v_codec: E8Codec,
    key_scales: Tensor | None,
) -> tuple[int, int, int, int, int]:
    """Check shapes, dtypes and devices; return (B, Hq, Hkv, cap, d)."""
    for name, t in (("q", q), ("k_codes", k_codes), ("k_steps", k_steps), ("v_codes", v_codes), ("v_steps", v_steps)):
        if not isinstance(t, Tensor):
            raise InputError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if q.dim() != 3:
        raise InputError(f"q must have shape (batch, q_heads, head_dim), got {tuple(q.shape)}")
    if q.dtype not in QUERY_DTYPES:
        raise InputError(f"q must be one of {QUERY_DTYPES}, got {q.dtype}")
    b, hq, d = q.shape
    if k_codes.dim() != 4 or k_codes.shape[0] != b or k_codes.shape[-1] != d:
        raise InputError(
            f"k_codes must have shape (batch={b}, kv_heads, capacity, head_dim={d}), got {tuple(k_codes.shape)}"
        )
    if tuple(v_codes.shape) != tuple(k_codes.shape):
        raise InputError(f"v_codes {tuple(v_codes.shape)} do not match k_codes {tuple(k_codes.shape)}")
    _, hkv, cap, _ = k_codes.shape
    for name, t in (("k_steps", k_steps), ("v_steps", v_steps)):
        if tuple(t.shape) != (b, hkv, cap):
            raise InputError(f"{name} must have shape {(b, hkv, cap)}, got {tuple(t.shape)}")
        if t.dtype != torch.int16:
            raise InputError(f"{name} must be int16 step codes, got {t.dtype}")
    for name, t in (("k_codes", k_codes), ("v_codes", v_codes)):
        if t.dtype != torch.int8:
            raise InputError(f"{name} must be int8 codes 2·p (lqlib.kernels.code_dtype), got {t.dtype}")
    if hkv == 0 or hq % hkv:
        raise InputError(f"q_heads ({hq}) must be a multiple of kv_heads ({hkv})")
    _check_codec(k_codec, d)
    _check_codec(v_codec, d)
    if d < 16:
        raise InputError(f"decode attention needs head_dim >= 16, got {d}")
    devices = {t.device for t in (q, k_codes, k_steps, v_codes, v_steps)}
    if key_scales is not None:
        if not isinstance(key_scales, Tensor) or tuple(key_scales.shape) != (hkv, d):
            raise InputError(
                f"key_scales must be a ({hkv}, {d}) tensor, got "
                f"{tuple(key_scales.shape) if isinstance(key_scales, Tensor) else type(key_scales)}"
            )
        devices.add(key_scales.device)
    if isinstance(length, Tensor):
        if tuple(length.shape) != (b,) or length.dtype not in (torch.int32, torch.int64):
            raise InputError(f"a length tensor must be ({b},) int32/int64, got {tuple(length.shape)} {length.dtype}")
        devices.add(length.device)
    elif isinstance(length, int) and not isinstance(length, bool):
        if not 1 <= length <= cap:
            raise InputError(f"length must be in [1, capacity={cap}], got {length}")
    else:
        raise InputError(f"length must be an int or a (batch,) tensor, got {type(length).__name__}")
    if len(devices) != 1:
        raise InputError(f"all tensors must be on one device, got {sorted(str(x) for x in devices)}")
    return b, hq, hkv, cap, d


def reference_decode_attention(
    q: Tensor,
    k_codes: Tensor,
    k_steps: Tensor,
    v_codes: Tensor,
    v_steps: Tensor,
    length: int | Tensor,
    k_codec: E8Codec,
    v_codec: E8Codec,
    *,
    key_scales: Tensor | None = None,
    sm_scale: float | None = None,
) -> Tensor:
    """What :func:`decode_attention` computes, with torch operations: dequantize the cache
    (:func:`lqlib.kernels.reference_dequantize`, float32), multiply the keys by the key scales,
    then float32 softmax attention over the first ``length`` tokens. Returns (B, Hq, d) in q.dtype."""
    b, hq, hkv, cap, d = _validate(q, k_codes, k_steps, v_codes, v_steps, length, k_codec, v_codec, key_scales)
    keys = reference_dequantize(k_codec, k_codes, k_steps, torch.float32)  # (B, Hkv, cap, d)
    values = reference_dequantize(v_codec, v_codes, v_steps, torch.float32)
    if key_scales is not None:
        keys = keys * key_scales.to(torch.float32)[None, :, None, :]
    g = hq // hkv
    qf = q.to(torch.float32).reshape(b, hkv, g, d)
    scale = 1.0 / math.sqrt(d) if sm_scale is None else float(sm_scale)
    scores = torch.einsum("bhgd,bhnd->bhgn", qf, keys) * scale
    lengths = (torch.full((b,), length, device=q.device) if isinstance(length, int) else length).to(q.device)
    valid = torch.arange(cap, device=q.device)[None, :] < lengths[:, None]  # (B, cap)
    scores = scores.masked_fill(~valid[:, None, None, :], float("-inf"))
    out = torch.einsum("bhgn,bhnd->bhgd", torch.softmax(scores, dim=-1), values)
    return out.reshape(b, hq, d).to(q.dtype)


_HADAMARD: dict[tuple[int, torch.device, torch.dtype], Tensor] = {}


def hadamard_matrix(d: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """The unnormalised Sylvester–Hadamard matrix (d, d), entries ±1: ``x @ H == lqlib.rht.fwht(x)``."""
    key = (d, torch.device(device), dtype)
    if key not in _HADAMARD:
        _HADAMARD[key] = fwht(torch.eye(d, dtype=torch.float64)).to(device=key[1], dtype=dtype)
    return _HADAMARD[key]


_SM_COUNT: dict[torch.device, int] = {}


def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 4
    if device not in _SM_COUNT:
        _SM_COUNT[device] = torch.cuda.get_device_properties(device).multi_processor_count
    return _SM_COUNT[device]


def choose_splits(
    batch_heads: int, tokens: int, block_n: int, device: torch.device, per_sm: int = 2
) -> tuple[int, int]:
    """(splits, tokens per split): about one wave of programs (B·Hkv per split; ``per_sm`` resident
    per SM: two with the default launch, 255 registers and 2 × 64 KB of shared memory each), each with
    at least two tiles, at most ``MAX_SPLITS``. One wave measured best on an H200 (a partial second
    wave costs a whole tile loop: 0.79 ms → 0.57 ms at batch 8, 128K)."""
    slots = per_sm * _sm_count(device)
    splits = max(1, min(MAX_SPLITS, round(slots / batch_heads), triton_cdiv(tokens, 2 * block_n)))
    per_split = triton_cdiv(triton_cdiv(tokens, splits), block_n) * block_n
    return triton_cdiv(tokens, per_split), per_split


def split_plan(cfg: AttentionConfig, batch_heads: int, tokens: int, device: torch.device) -> tuple[int, int]:
    """(splits, tokens per split) of a launch: ``cfg.splits`` programs per (batch row, KV head) if
    given (at most ``MAX_SPLITS``, whole tiles each, empty ones dropped), else :func:`choose_splits`
    for the programs an SM holds under ``cfg``."""
    if cfg.block_n < 16 or cfg.block_n & (cfg.block_n - 1):
        raise InputError(f"block_n must be a power of two >= 16, got {cfg.block_n}")
    if cfg.splits is None:
        return choose_splits(batch_heads, tokens, cfg.block_n, device, cfg.resident_per_sm())
    if cfg.splits < 1:
        raise InputError(f"splits must be >= 1, got {cfg.splits}")
    per_split = triton_cdiv(triton_cdiv(tokens, min(cfg.splits, MAX_SPLITS)), cfg.block_n) * cfg.block_n
    return triton_cdiv(tokens, per_split), per_split


def combine_splits(part_acc: Tensor, part_ml: Tensor, out: Tensor, signs: Tensor | None = None) -> Tensor:
    """Merge the split-K partials of a decode attention launch into ``out`` (B, Hq, d) and return it:
    ``part_acc`` (B·Hq, splits, d) float32 (value sums, doubled), ``part_ml`` (B·Hq, 2, splits) float32
    (maxima in base 2, softmax sums), as every kernel of this package writes them. With ``signs`` (d,)
    float32 the partials are in the rotated domain and each merged row ``y`` leaves as ``(y @ H)·signs``
    (H the unnormalised Sylvester–Hadamard matrix, :func:`hadamard_matrix`)."""
    from . import _attention_triton

    rows, splits, d = part_acc.shape
    if signs is not None:
        _attention_triton.combine_unrotate_kernel[(rows,)](
            part_acc,
            part_ml,
            signs,
            out,
            splits,
            D=d,
            LOG2_D=d.bit_length() - 1,
            BLOCK_S=triton_next_pow2(splits),
            CHUNK_S=min(16, triton_next_pow2(splits)),
            num_warps=4 if d >= 128 else 1,
        )
        return out
    block_d = min(d, 32)
    _attention_triton.combine_splits_kernel[(rows, d // block_d)](
        part_acc, part_ml, out, splits, D=d, BLOCK_S=triton_next_pow2(splits), BLOCK_D=block_d, num_warps=1
    )
    return out


def decode_attention(
    q: Tensor,
    k_codes: Tensor,
    k_steps: Tensor,
    v_codes: Tensor,
    v_steps: Tensor,
    length: int | Tensor,
    k_codec: E8Codec,
    v_codec: E8Codec,
    *,
    key_scales: Tensor | None = None,
    sm_scale: float | None = None,
    config: AttentionConfig | None = None,
) -> Tensor:
    """Fused decode attention on the coded cache (Triton; CUDA, or CPU under ``TRITON_INTERPRET=1``).

    Parameters
    ----------
    q : (B, Hq, d) float16/bfloat16, one query token per batch row.
    k_codes, v_codes : (B, Hkv, capacity, d) int8, the codes ``2·p``; the last dim contiguous.
    k_steps, v_steps : (B, Hkv, capacity) int16 step codes; the last dim contiguous.
    length : int in [1, capacity], or a (B,) int32/int64 tensor of lengths on q's device (each
        in [1, capacity]: not checked, no host synchronisation).
    k_codec, v_codec : the codecs that wrote the keys and values (scale="vector"; "rht" or "none").
    key_scales : optional (Hkv, d) per-channel scales the keys were divided by before coding.
    sm_scale : softmax scale (default 1/sqrt(d)).
    config : launch parameters (default :class:`AttentionConfig`).

    Returns
    -------
    (B, Hq, d) in q.dtype: ``softmax(q·Kᵀ·sm_scale)·V`` over the first ``length`` tokens, K and V the
    dequantized cache (keys times the key scales). Hq must be a multiple of Hkv.
    """
    b, hq, hkv, cap, d = _validate(q, k_codes, k_steps, v_codes, v_steps, length, k_codec, v_codec, key_scales)
    try:
        from ..kernels import _attention_triton as kernels
    except ImportError as err:
        raise ImportError("lqlib.kernels.attention needs Triton: pip install 'lqlib[gpu]'") from err
    cfg = config or AttentionConfig()
    for name, t in (("k_codes", k_codes), ("v_codes", v_codes), ("k_steps", k_steps), ("v_steps", v_steps)):
        if t.stride(-1) != 1:
            raise InputError(f"{name} must be contiguous in its last dim")
    dev = q.device
    g = hq // hkv
    tokens = length if isinstance(length, int) else cap
    splits, per_split = split_plan(cfg, b * hkv, tokens, dev)
    q = q.contiguous()
    part_acc = torch.empty((b * hq, splits, d), dtype=torch.float32, device=dev)
    part_ml = torch.empty((b * hq, 2, splits), dtype=torch.float32, device=dev)
    out = torch.empty_like(q)
    k_rht, v_rht = k_codec.rotation == "rht", v_codec.rotation == "rht"
    signs_k = k_codec._signs(d, dev, torch.float32)
    signs_v = v_codec._signs(d, dev, torch.float32)
    had = hadamard_matrix(d, dev, torch.float16)
    scales = key_scales.to(device=dev, dtype=torch.float32).contiguous() if key_scales is not None else signs_k
    lengths = length if isinstance(length, Tensor) else part_ml  # a placeholder pointer when unused
    scale = 1.0 / math.sqrt(d) if sm_scale is None else float(sm_scale)
    k_pairs, v_pairs = k_codes.view(torch.int16), v_codes.view(torch.int16)  # codes 2j, 2j+1 in one int16
    check_kernel_device(q, kernels.decode_attention_kernel)
    kernels.decode_attention_kernel[(b * hkv, splits)](
        q,
        k_pairs,
        k_steps,
        v_pairs,
        v_steps,
        scales,
        signs_k,
        signs_v,
        had,
        _tables(dev),
        part_acc,
        part_ml,
        lengths,
        tokens,
        per_split,
        scale * math.log2(math.e) * 0.5,
        q.stride(0),
        q.stride(1),
        k_pairs.stride(0),
        k_pairs.stride(1),
        k_pairs.stride(2),
        k_steps.stride(0),
        k_steps.stride(1),
        v_pairs.stride(0),
        v_pairs.stride(1),
        v_pairs.stride(2),
        v_steps.stride(0),
        v_steps.stride(1),
        HKV=hkv,
        G=g,
        BLOCK_G=max(16, triton_next_pow2(g)),
        D=d,
        BLOCK_N=cfg.block_n,
        K_SHIFT=k_codec._log2_dim(d),
        V_SHIFT=v_codec._log2_dim(d),
        K_RHT=k_rht,
        V_RHT=v_rht,
        HAS_SCALES=key_scales is not None,
        HAS_LENGTHS=isinstance(length, Tensor),
        FAST_CVT=dev.type == "cuda",
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )
    return combine_splits(part_acc, part_ml, out)


def triton_next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())
