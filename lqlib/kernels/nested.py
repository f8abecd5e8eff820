"""GPU kernels of the nested E8 format (:mod:`lqlib.coding.nested`): quantize, dequantize, decode attention.

* :func:`quantize` ``x`` (..., d) → (words (..., d/8) int32, step codes (...) int16, flags (..., ceil(d/64))
  uint8), bit for bit :meth:`lqlib.coding.nested.NestedE8Codec.encode`;
* :func:`dequantize` → values (..., d), bit for bit :meth:`~lqlib.coding.nested.NestedE8Codec.decode`;
* :func:`decode_attention` — one query token per batch row attends to the cached words, steps and
  flags without decoding them to memory (split-K, as :func:`lqlib.kernels.attention.decode_attention`,
  whose math it shares: scores are dot products of the rotated query with ``β·2p``, values are summed
  in the rotated domain and rotated back once per head); :func:`reference_decode_attention` computes
  the same with torch operations from :func:`dequantize`'s reference, the tests' ground truth.

Triton is optional, as for :mod:`lqlib.kernels`; the kernels run on CUDA tensors or, under
``TRITON_INTERPRET=1``, on CPU tensors (tests). Head dims: powers of two from 8 to 256 (attention: 16 to 256).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..coding.nested import NestedCodes, NestedE8Codec, flag_bytes
from ..errors import InputError
from . import KERNEL_DTYPES, _constants, _launch_config, _tables, check_kernel_device, triton_cdiv
from .attention import AttentionConfig, combine_splits, hadamard_matrix, split_plan, triton_next_pow2

__all__ = [
    "quantize",
    "quantize_into",
    "dequantize",
    "decode_attention",
    "reference_decode_attention",
    "QUERY_DTYPES",
    "MAX_DIM",
    "NESTED_CONFIG",
    "QUANTIZE_SPLIT",
    "SMALL_QUANTIZE_VECTORS",
    "SMALL_QUANTIZE_LAUNCH",
    "GPU_MIN_BLOCK_N",
    "PAIRS_MIN_DIM",
    "LEAN_PAIRS",
    "KEYS_AS_A",
    "UNROTATE_IN_COMBINE",
    "ROTATE_QUERIES_IN_REGISTERS",
]

QUERY_DTYPES = (torch.float16, torch.bfloat16)
MAX_DIM = 256  # flag bits of a vector fit one int32
NESTED_CONFIG = AttentionConfig(block_n=128, num_warps=4, num_stages=3)
"""Default launch of :func:`decode_attention`: the fastest of eight launches at 32K and 128K tokens,
batch 1 and 8 (H100, 2026-12-06, results/gpu_nested_*.json), with the operands in pairs of lanes."""
GPU_MIN_BLOCK_N = 64
PAIRS_MIN_DIM = 128
"""The launch shapes the GPU-only paths are used with. On an H100 with Triton 3.6 (2026-12-06,
results/cuda_nested_attention_configs_h100_2026-12-06.log) the inline-PTX word decoding gave wrong
results with tiles of 16 tokens, and the pairs-of-lanes layout (portable decoding too) with tiles of 16
tokens and at head dim 64; the shapes of few words per thread, where Triton's layouts replicate
elements across threads, are the common factor (the interpreter, which has no layouts, gets them
right). The portable, joined path was right at every shape tried; smaller tiles or head dims use it."""
QUANTIZE_SPLIT = 3
"""Halvings of a quantize tile whose parts the E8 stage takes in turn: three roundings per block of a
whole tile (128 values a thread at d = 128) spilled registers to local memory (ptxas: a 10 KB stack);
with 2^3 or 2^4 parts few or none do (Triton 3.9, sm_90), and 2^3 ran fastest on an H100 (5.3 times the
whole tile's speed, 2026-12-06)."""
SMALL_QUANTIZE_VECTORS = 1024
SMALL_QUANTIZE_LAUNCH = {"block_v": 1, "num_warps": 2, "split": 0}
"""On CUDA, a quantize of at most :data:`SMALL_QUANTIZE_VECTORS` vectors (a decode step's keys and values)
runs one vector per program on two warps, the whole tile at once: its latency, not its throughput,
is what a step pays. For the 16 vectors of one token at batch 1 (Llama-3.1-8B shape) it took 2.86 µs a
launch against 19.79 µs for the throughput launch (H100, 2026-12-06,
results/gpu_nested_quantize_latency_h100_2026-12-06.log); in a decode step the throughput launch
took 1.50 ms of 11.24 (results/gpu_step_profile_*_32768_b1.json)."""
LEAN_PAIRS = False
"""Whether :func:`decode_attention` decodes the pairs of lanes leanly (``lean``) when not told. Off: right
on an H100 but slower, 0.94–0.95 times the full decoding's speed at 32K and 128K tokens, batch 1 and 8
(2026-12-06, results/gpu_nested_variants_*.json): halving the instructions a word takes does not help
a loop bound by latency."""
KEYS_AS_A = False
"""Whether the pairs-of-lanes kernel computes transposed scores, the decoded keys (BLOCK_N, d/4) as the
dots' first operand against the transposed queries (``keys_as_a``), when not told (and the key flags
lie on word boundaries). Off: right on an H100 but slower, 0.75–0.84 times the default's speed at 32K
and 128K tokens, batch 1 and 8 (2026-12-06, results/gpu_nested_variants_*_keys-a.json). Compiled for
sm_90 (Triton 3.6) the decoded keys go into the wgmma from registers where the default sends every pair
through shared memory (the values still do), at the price of two more (BLOCK_N, d/8) int32 loads a tile
for the key flags, the probabilities transposed through shared memory and 84 KB of shared memory a
program (47 KB); both use 255 registers. Not with the lean decoding."""
ROTATE_QUERIES_IN_REGISTERS = True
"""Whether the pairs-of-lanes kernel rotates its queries by butterflies in registers (float32) rather
than by four dots of the float16-rounded queries against columns of H read from L2. On: 1.06–1.40 times
as fast on an H100 (the most at 32K, batch 1, where each split holds only eight tiles; 2026-12-06,
results/gpu_nested_variants_*.json)."""
UNROTATE_IN_COMBINE = True
"""Whether :func:`decode_attention` undoes the values' rotation once a row, in the kernel that merges the
splits (a fast Walsh–Hadamard transform in registers), rather than in every split's program (two dots
of depth d per pair of lanes against rows of H read from L2) when not told. On, as the end-to-end runs
measured it; with the queries rotated in registers it is neither faster nor slower (0.98–1.00 times,
same record)."""
FAST_CVT_ON_CUDA = True
"""Whether :func:`decode_attention` decodes words with inline PTX on CUDA when ``fast_cvt`` is not given
(a benchmark that finds the PTX path failing on its card turns this off and records it)."""


_FLAG_SHIFTS: dict[tuple[int, torch.device], Tensor] = {}


def _flag_shifts(c: int, device: torch.device) -> Tensor:
    """int32 (4, c), entry (r, j) = 8r + j: the bit of block j's flag in the int32 word whose byte r starts a
    token's flags (the ``keys_as_a`` kernel reads the key flags as words)."""
    if (c, device) not in _FLAG_SHIFTS:
        table = 8 * torch.arange(4, dtype=torch.int32)[:, None] + torch.arange(c, dtype=torch.int32)[None, :]
        _FLAG_SHIFTS[(c, device)] = table.to(device)
    return _FLAG_SHIFTS[(c, device)]


def _kernels():
    try:
        from . import _nested_triton
    except ImportError as err:
        raise ImportError(
            "lqlib.kernels.nested needs Triton: pip install 'lqlib[gpu]' (or pip install triton)"
        ) from err
    return _nested_triton


def _check(codec: NestedE8Codec, dim: int) -> None:
    if not isinstance(codec, NestedE8Codec):
        raise InputError(f"expected a NestedE8Codec, got {type(codec).__name__}")
    if dim < 8 or dim > MAX_DIM or dim & (dim - 1):
        raise InputError(f"the nested kernels need a power-of-two head dim in [8, {MAX_DIM}], got {dim}")


def _shift(codec: NestedE8Codec, dim: int) -> int:
    return codec._codec._log2_dim(dim)


def quantize(
    codec: NestedE8Codec,
    x: Tensor,
    *,
    block_v: int | None = None,
    num_warps: int | None = None,
    split: int | None = None,
    maxnreg: int | None = None,
    chunk_major: bool | None = None,
) -> NestedCodes:
    """Kernel: ``x`` (..., d) float16/bfloat16/float32, finite (not checked: no host synchronisation)
    → :class:`~lqlib.coding.nested.NestedCodes`. ``block_v``/``num_warps``, ``split`` (the E8 stage
    runs on 2^split parts of a tile in turn, default :data:`QUANTIZE_SPLIT`), ``maxnreg`` (a cap on
    registers per thread) and ``chunk_major`` (the tile's load order) change the speed only."""
    _check_quantize_input(codec, x)
    d = x.shape[-1]
    x2 = x.detach().contiguous().reshape(-1, d)
    n = x2.shape[0]
    words = torch.empty(n, d // 8, dtype=torch.int32, device=x.device)
    steps = torch.empty(n, dtype=torch.int16, device=x.device)
    flags = torch.empty(n, flag_bytes(d), dtype=torch.uint8, device=x.device)
    launch = {
        "block_v": block_v,
        "num_warps": num_warps,
        "split": split,
        "maxnreg": maxnreg,
        "chunk_major": chunk_major,
    }
    _launch_quantize(codec, x2, (words, steps, flags), max(n, 1), 0, 0, None, launch)
    lead = x.shape[:-1]
    return NestedCodes(words.reshape(*lead, d // 8), steps.reshape(lead), flags.reshape(*lead, flag_bytes(d)))


def quantize_into(codec: NestedE8Codec, x: Tensor, store: NestedCodes, position: int | Tensor) -> None:
    """Kernel: quantize ``x`` (..., t, d) straight into a cache ``store`` of shape (..., capacity, d) (words
    (..., capacity, d/8), steps (..., capacity), flags (..., capacity, ceil(d/64)), each contiguous) at
    tokens ``position .. position + t - 1``: the same words, steps and flags as :func:`quantize`, with no
    intermediate tensor and no copy kernels. ``position`` is an int, or a (1,) int64 tensor on the
    device read by the kernel (a decode step's position under a CUDA graph; ``position + t <= capacity``
    is then not checked: no host synchronisation)."""
    _check_quantize_input(codec, x)
    d = x.shape[-1]
    if x.dim() < 2:
        raise InputError(f"expected x of shape (..., t, d), got {tuple(x.shape)}")
    lead, t = x.shape[:-2], x.shape[-2]
    words, steps, flags = store.words, store.steps, store.flags
    cap = steps.shape[-1] if steps.dim() else 0
    want = ((*lead, cap, d // 8), (*lead, cap), (*lead, cap, flag_bytes(d)))
    for part, shape, dtype in zip((words, steps, flags), want, (torch.int32, torch.int16, torch.uint8)):
        if tuple(part.shape) != shape or part.dtype != dtype or part.device != x.device or not part.is_contiguous():
            raise InputError(
                f"store parts must be contiguous {shape} {dtype} on {x.device}, got {tuple(part.shape)} {part.dtype} "
                f"on {part.device}"
            )
    if isinstance(position, Tensor):
        if position.shape != (1,) or position.dtype != torch.int64 or position.device != x.device:
            raise InputError(
                f"position must be a (1,) int64 tensor on {x.device}, got {position.shape} {position.dtype}"
            )
        first, pos = 0, position
    else:
        first, pos = int(position), None
        if first < 0 or first + t > cap:
            raise InputError(f"tokens {first}..{first + t - 1} do not fit a store of capacity {cap}")
    if t == 0:
        return
    x2 = x.detach().contiguous().reshape(-1, d)
    _launch_quantize(codec, x2, (words, steps, flags), t, cap, first, pos, {})


def _check_quantize_input(codec: NestedE8Codec, x: Tensor) -> None:
    if not isinstance(x, Tensor) or x.dtype not in KERNEL_DTYPES or x.dim() == 0:
        raise InputError(f"expected a (..., d) tensor of one of {KERNEL_DTYPES}, got {getattr(x, 'dtype', type(x))}")
    _check(codec, x.shape[-1])


def _launch_quantize(
    codec: NestedE8Codec,
    x2: Tensor,
    out: tuple[Tensor, Tensor, Tensor],
    rows_per_group: int,
    group_stride: int,
    first_row: int,
    position: Tensor | None,
    launch: dict,
) -> None:
    """One quantize launch over the rows of ``x2`` (n, d): input row r goes to output row
    ``(r // rows_per_group)·group_stride + first_row (+ position) + r % rows_per_group`` of ``out``."""
    n, d = x2.shape
    if not n:
        return
    kernels = _kernels()
    words, steps, flags = out
    check_kernel_device(x2, kernels.nested_quantize_kernel)
    if x2.is_cuda and n <= SMALL_QUANTIZE_VECTORS and all(v is None for v in launch.values()):
        launch = SMALL_QUANTIZE_LAUNCH
    bv, warps, cm = _launch_config(
        "quantize", x2.device, launch.get("block_v"), launch.get("num_warps"), launch.get("chunk_major")
    )
    split = launch.get("split")
    maxnreg = launch.get("maxnreg")
    shift = _shift(codec, d)
    n0, t = _constants(codec.peak_bits, 1 << shift)
    kernels.nested_quantize_kernel[(triton_cdiv(n, bv),)](
        x2,
        words,
        steps,
        flags,
        codec._codec._signs(d, x2.device, torch.float32),
        _tables(x2.device),
        steps if position is None else position,  # a placeholder pointer when unused
        n,
        rows_per_group,
        group_stride,
        first_row,
        n0,
        *t,
        D=d,
        LOG2C=(d // 8).bit_length() - 1,
        SHIFT=shift,
        RHT=codec.rotation == "rht",
        FB=flag_bytes(d),
        BLOCK_V=bv,
        CHUNK_MAJOR=cm,
        SPLIT=min(QUANTIZE_SPLIT if split is None else int(split), (d // 8).bit_length() - 1),
        HAS_POS=position is not None,
        SEARCH=codec.search,
        num_warps=warps,
        enable_fp_fusion=False,
        **({} if maxnreg is None else {"maxnreg": maxnreg}),
    )


def dequantize(
    codec: NestedE8Codec,
    coded: NestedCodes,
    dtype: torch.dtype = torch.float16,
    *,
    block_v: int | None = None,
    num_warps: int | None = None,
) -> Tensor:
    """Kernel: nested codes → values (..., d) in ``dtype``, bit for bit ``codec.decode(coded, dtype)``."""
    if dtype not in KERNEL_DTYPES:
        raise InputError(f"dtype {dtype} is not supported by the kernels; use one of {KERNEL_DTYPES}")
    words, steps, flags = coded.words, coded.steps, coded.flags
    d = 8 * words.shape[-1]
    _check(codec, d)
    lead = tuple(words.shape[:-1])
    if tuple(steps.shape) != lead or tuple(flags.shape) != (*lead, flag_bytes(d)):
        raise InputError(
            f"words {tuple(words.shape)}, steps {tuple(steps.shape)} and flags {tuple(flags.shape)} do not match"
        )
    if words.dtype != torch.int32 or steps.dtype != torch.int16 or flags.dtype != torch.uint8:
        raise InputError("nested codes are int32 words, int16 step codes and uint8 flags")
    kernels = _kernels()
    w2 = words.contiguous().reshape(-1, d // 8)
    n = w2.shape[0]
    out = torch.empty(n, d, dtype=dtype, device=words.device)
    if n:
        check_kernel_device(w2, kernels.nested_dequantize_kernel)
        bv, warps, cm = _launch_config("dequantize", words.device, block_v, num_warps, None)
        kernels.nested_dequantize_kernel[(triton_cdiv(n, bv),)](
            w2,
            steps.contiguous().reshape(-1),
            flags.contiguous().reshape(-1),
            out,
            codec._codec._signs(d, words.device, torch.float32),
            _tables(words.device),
            n,
            D=d,
            LOG2C=(d // 8).bit_length() - 1,
            SHIFT=_shift(codec, d),
            RHT=codec.rotation == "rht",
            FB=flag_bytes(d),
            BLOCK_V=bv,
            CHUNK_MAJOR=cm,
            num_warps=warps,
            enable_fp_fusion=False,
        )
    return out.reshape(*lead, d)


def _validate_attention(
    q: Tensor, keys: NestedCodes, values: NestedCodes, length, k_codec, v_codec, key_scales
) -> tuple[int, int, int, int, int]:
    """Check shapes, dtypes and devices; return (B, Hq, Hkv, cap, d)."""
    if not isinstance(q, Tensor) or q.dim() != 3 or q.dtype not in QUERY_DTYPES:
        raise InputError(f"q must be a (batch, q_heads, head_dim) tensor of {QUERY_DTYPES}")
    b, hq, d = q.shape
    for name, coded in (("keys", keys), ("values", values)):
        w, s, f = coded.words, coded.steps, coded.flags
        if w.dim() != 4 or w.shape[0] != b or 8 * w.shape[-1] != d:
            raise InputError(f"{name}' words must be (batch={b}, kv_heads, capacity, {d // 8}), got {tuple(w.shape)}")
        if w.dtype != torch.int32 or s.dtype != torch.int16 or f.dtype != torch.uint8:
            raise InputError(f"{name} must be int32 words, int16 step codes and uint8 flags")
        if tuple(s.shape) != tuple(w.shape[:-1]) or tuple(f.shape) != (*w.shape[:-1], flag_bytes(d)):
            raise InputError(f"{name}' words, steps and flags do not describe one cache")
        if w.stride(-1) != 1 or s.stride(-1) != 1 or f.stride(-1) != 1 or f.stride(-2) != f.shape[-1]:
            raise InputError(f"{name}' words, steps and flags must be contiguous along tokens and their last dim")
    if tuple(keys.words.shape) != tuple(values.words.shape):
        raise InputError(f"keys {tuple(keys.words.shape)} and values {tuple(values.words.shape)} differ in shape")
    _, hkv, cap, _ = keys.words.shape
    if hkv == 0 or hq % hkv:
        raise InputError(f"q_heads ({hq}) must be a multiple of kv_heads ({hkv})")
    _check(k_codec, d)
    _check(v_codec, d)
    if d < 16:
        raise InputError(f"decode attention needs head_dim >= 16, got {d}")
    devices = {t.device for t in (q, keys.words, keys.steps, keys.flags, values.words, values.steps, values.flags)}
    if key_scales is not None:
        if not isinstance(key_scales, Tensor) or tuple(key_scales.shape) != (hkv, d):
            raise InputError(f"key_scales must be a ({hkv}, {d}) tensor")
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
    keys: NestedCodes,
    values: NestedCodes,
    length: int | Tensor,
    k_codec: NestedE8Codec,
    v_codec: NestedE8Codec,
    *,
    key_scales: Tensor | None = None,
    sm_scale: float | None = None,
) -> Tensor:
    """What :func:`decode_attention` computes, with torch operations: decode the cache with the CPU
    reference (float32), multiply the keys by the key scales, float32 softmax attention over the
    first ``length`` tokens. Returns (B, Hq, d) in q.dtype."""
    b, hq, hkv, cap, d = _validate_attention(q, keys, values, length, k_codec, v_codec, key_scales)
    k = k_codec.decode(keys, torch.float32)
    v = v_codec.decode(values, torch.float32)
    if key_scales is not None:
        k = k * key_scales.to(torch.float32)[None, :, None, :]
    g = hq // hkv
    qf = q.to(torch.float32).reshape(b, hkv, g, d)
    scale = 1.0 / math.sqrt(d) if sm_scale is None else float(sm_scale)
    scores = torch.einsum("bhgd,bhnd->bhgn", qf, k) * scale
    lengths = (torch.full((b,), length, device=q.device) if isinstance(length, int) else length).to(q.device)
    valid = torch.arange(cap, device=q.device)[None, :] < lengths[:, None]
    scores = scores.masked_fill(~valid[:, None, None, :], float("-inf"))
    out = torch.einsum("bhgn,bhnd->bhgd", torch.softmax(scores, dim=-1), v)
    return out.reshape(b, hq, d).to(q.dtype)


def decode_attention(
    q: Tensor,
    keys: NestedCodes,
    values: NestedCodes,
    length: int | Tensor,
    k_codec: NestedE8Codec,
    v_codec: NestedE8Codec,
    *,
    key_scales: Tensor | None = None,
    sm_scale: float | None = None,
    config: AttentionConfig | None = None,
    fast_cvt: bool | None = None,
    pairs: bool | None = None,
    lean: bool | None = None,
    keys_as_a: bool | None = None,
    unrotate_in_combine: bool | None = None,
) -> Tensor:
    """Fused decode attention on a nested-format cache (Triton; CUDA, or CPU under ``TRITON_INTERPRET=1``).

    Parameters
    ----------
    q : (B, Hq, d) float16/bfloat16, one query token per batch row.
    keys, values : :class:`~lqlib.coding.nested.NestedCodes` of shape (B, Hkv, capacity, d): words
        (B, Hkv, capacity, d/8), steps (B, Hkv, capacity), flags (B, Hkv, capacity, ceil(d/64)),
        contiguous along tokens and their last dim.
    length : int in [1, capacity], or a (B,) int32/int64 tensor on q's device (each in [1, capacity],
        not checked: no host synchronisation).
    k_codec, v_codec : the formats that wrote the keys and values (their RHT signs).
    key_scales : optional (Hkv, d) per-channel scales the keys were divided by before coding.
    sm_scale : softmax scale (default 1/sqrt(d)).
    config : launch parameters (default :data:`NESTED_CONFIG`).
    fast_cvt : decode the words with inline PTX (``lop3``/``f16x2``; default: on CUDA with block_n >=
        :data:`GPU_MIN_BLOCK_N`) or with plain integer operations and conversions (the interpreter's
        path; same values, slower on a GPU).
    pairs : feed the tensor cores four operands of depth d/4, each a pair of lanes of the blocks
        (default where d >= :data:`PAIRS_MIN_DIM` and block_n >= :data:`GPU_MIN_BLOCK_N`; on the CPU
        interpreter d >= 64 may ask for it), or one operand of depth d assembled from all eight lanes.
        Same values up to float32 summation order.
    lean : with pairs, decode the lanes without the coset bit and parity (half the instructions a word)
        and add those through one more dot of depth d/4 per operand (default :data:`LEAN_PAIRS`).
        Same values up to float32 summation order.
    keys_as_a : with pairs and without lean, compute the scores transposed, the decoded keys as the
        dots' first operand (default :data:`KEYS_AS_A`, off with lean); the key flags are read as int32
        words, so each (batch row, head) of them must start 4-byte aligned. Same values up to float32
        summation order.
    unrotate_in_combine : undo the values' rotation once a row when merging the splits, not in every
        split (default :data:`UNROTATE_IN_COMBINE`). Same values up to float32 summation order.

    Returns
    -------
    (B, Hq, d) in q.dtype: softmax attention over the decoded cache (keys times the key scales).
    """
    b, hq, hkv, cap, d = _validate_attention(q, keys, values, length, k_codec, v_codec, key_scales)
    kernels = _kernels()

    cfg = config or NESTED_CONFIG
    if cfg.block_n < 16 or cfg.block_n & (cfg.block_n - 1):
        raise InputError(f"block_n must be a power of two >= 16, got {cfg.block_n}")
    dev = q.device
    on_gpu = dev.type == "cuda"
    use_pairs = (d >= PAIRS_MIN_DIM and cfg.block_n >= GPU_MIN_BLOCK_N) if pairs is None else bool(pairs)
    if use_pairs and (d < 64 or (on_gpu and (d < PAIRS_MIN_DIM or cfg.block_n < GPU_MIN_BLOCK_N))):
        raise InputError(
            f"pairs of lanes need head_dim >= 64, and on the GPU head_dim >= {PAIRS_MIN_DIM} and block_n >= "
            f"{GPU_MIN_BLOCK_N} (smaller shapes gave wrong results on an H100), got head_dim {d}, block_n {cfg.block_n}"
        )
    use_lean = (use_pairs and LEAN_PAIRS) if lean is None else bool(lean)
    if use_lean and not use_pairs:
        raise InputError("lean decoding needs the pairs-of-lanes layout (pairs=True)")
    kf = keys.flags
    aligned = kf.data_ptr() % 4 == 0 and kf.stride(0) % 4 == 0 and kf.stride(1) % 4 == 0
    use_keys_a = (use_pairs and not use_lean and aligned and KEYS_AS_A) if keys_as_a is None else bool(keys_as_a)
    if use_keys_a and (not use_pairs or use_lean):
        raise InputError("keys as the first operand (keys_as_a) need the pairs-of-lanes layout (pairs=True), not lean")
    if use_keys_a and not aligned:
        raise InputError(
            "keys as the first operand (keys_as_a) read the key flags as int32 words: each (batch row, "
            "head) of keys.flags must start 4-byte aligned"
        )
    fast = (on_gpu and FAST_CVT_ON_CUDA and cfg.block_n >= GPU_MIN_BLOCK_N) if fast_cvt is None else bool(fast_cvt)
    if fast and on_gpu and cfg.block_n < GPU_MIN_BLOCK_N:
        raise InputError(
            f"the inline-PTX word decoding needs block_n >= {GPU_MIN_BLOCK_N} on the GPU (smaller tiles gave wrong "
            f"results on an H100), got {cfg.block_n}"
        )
    v_rht = v_codec.rotation == "rht"
    late = v_rht and (UNROTATE_IN_COMBINE if unrotate_in_combine is None else bool(unrotate_in_combine))
    g = hq // hkv
    tokens = length if isinstance(length, int) else cap
    splits, per_split = split_plan(cfg, b * hkv, tokens, dev)
    q = q.contiguous()
    part_acc = torch.empty((b * hq, splits, d), dtype=torch.float32, device=dev)
    part_ml = torch.empty((b * hq, 2, splits), dtype=torch.float32, device=dev)
    out = torch.empty_like(q)
    signs_k = k_codec._codec._signs(d, dev, torch.float32)
    signs_v = v_codec._codec._signs(d, dev, torch.float32)
    scales = key_scales.to(device=dev, dtype=torch.float32).contiguous() if key_scales is not None else signs_k
    lengths = length if isinstance(length, Tensor) else part_ml  # a placeholder pointer when unused
    scale = 1.0 / math.sqrt(d) if sm_scale is None else float(sm_scale)
    kw, vw, ks, vs, vf = keys.words, values.words, keys.steps, values.steps, values.flags
    check_kernel_device(q, kernels.nested_attention_kernel)
    kernels.nested_attention_kernel[(b * hkv, splits)](
        q,
        kw,
        ks,
        kf,
        vw,
        vs,
        vf,
        scales,
        signs_k,
        signs_v,
        hadamard_matrix(d, dev, torch.float16),
        _tables(dev),
        _flag_shifts(d // 8, dev) if use_keys_a else part_ml,  # a placeholder pointer when unused
        part_acc,
        part_ml,
        lengths,
        tokens,
        per_split,
        scale * math.log2(math.e) * 0.5,
        q.stride(0),
        q.stride(1),
        kw.stride(0),
        kw.stride(1),
        kw.stride(2),
        ks.stride(0),
        ks.stride(1),
        kf.stride(0),
        kf.stride(1),
        vw.stride(0),
        vw.stride(1),
        vw.stride(2),
        vs.stride(0),
        vs.stride(1),
        vf.stride(0),
        vf.stride(1),
        HKV=hkv,
        G=g,
        BLOCK_G=max(16, triton_next_pow2(g)),
        D=d,
        FB=flag_bytes(d),
        BLOCK_N=cfg.block_n,
        K_SHIFT=_shift(k_codec, d),
        V_SHIFT=_shift(v_codec, d),
        K_RHT=k_codec.rotation == "rht",
        V_RHT=v_rht and not late,
        HAS_SCALES=key_scales is not None,
        HAS_LENGTHS=isinstance(length, Tensor),
        FAST_CVT=fast,
        PAIRS=use_pairs,
        LEAN=use_lean,
        Q_FWHT=ROTATE_QUERIES_IN_REGISTERS,
        LOG2C=(d // 8).bit_length() - 1,
        KEYS_A=use_keys_a,
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
        **({} if cfg.maxnreg is None else {"maxnreg": cfg.maxnreg}),
    )
    return combine_splits(part_acc, part_ml, out, signs_v if late else None)
