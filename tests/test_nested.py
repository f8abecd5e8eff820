"""The fixed-rate nested E8 format: its CPU reference (exact word packing, a fixed size, the E8
codec's rotation and step grid), the Triton kernels bit for bit against it, the device cache that
stores it and the one-graph greedy decoder.

Without CUDA the kernels run in Triton's interpreter (``TRITON_INTERPRET=1``, set by conftest) on CPU
tensors, at small shapes. Attention tolerances are those of ``tests/test_device_cache.py``: the fused
kernel rounds the rotated query to float16 and sums in float32 (relative error about 5e-4).
"""

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import lqlib
from lqlib.cache.quantized import QuantizeDequantizeCache
from lqlib.coding.nested import (
    BETA,
    NestedCodes,
    NestedE8Codec,
    bits_per_dim,
    flag_bytes,
    pack_flags,
    pack_words,
    unpack_flags,
    unpack_words,
)
from lqlib.core.lattices import nearest_e8
from lqlib.core.rht import fwht
from lqlib.evaluation.fixed_rate import NestedE8, verdict
from lqlib.evaluation.stats import Estimate, RatioEstimate

from ._llama import graphed_logits, tiny_llama

triton = pytest.importorskip("triton")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
_BITS = {torch.float16: torch.int16, torch.bfloat16: torch.int16, torch.float32: torch.int32}


def bits_of(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(_BITS[t.dtype])


def wide_range(n: int, d: int, seed: int, dtype=torch.float32) -> torch.Tensor:
    """Heavy-tailed vectors of norms 1e-3 to 1e3 (every step code and many flagged blocks)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=gen) * torch.exp(torch.randn(n, d, generator=gen))
    return (x * torch.logspace(-3, 3, n)[:, None]).to(dtype)


# ---------------------------------------------------------------------------------------------- CPU reference
@given(st.integers(0, 2**31 - 1))
def test_every_word_is_one_e8_point_in_the_cube_and_packs_back(seed):
    """The 2^32 words and the E8 points modulo 16·Z^8 (cube floor(p) in [-8, 7]) are in bijection."""
    gen = torch.Generator().manual_seed(seed)
    words = torch.randint(-(2**31), 2**31, (64, 3), generator=gen, dtype=torch.int64).to(torch.int32)
    points = unpack_words(words)
    assert points.shape == (64, 24)
    blocks = points.reshape(64, 3, 8)
    assert torch.equal(nearest_e8(blocks), blocks)  # each block is an E8 point
    assert bool((blocks.floor() >= -8).all() and (blocks.floor() <= 7).all())
    assert torch.equal(pack_words(points), words)


def test_pack_words_refuses_points_outside_the_cube():
    p = torch.zeros(8)
    p[0], p[1] = 8.0, 0.0  # floor 8: outside (sum 8 is even: an E8 point)
    with pytest.raises(lqlib.InputError, match="cube"):
        pack_words(p)


@given(st.integers(1, 40), st.integers(0, 2**31 - 1))
def test_flags_pack_and_unpack(blocks, seed):
    flags = torch.rand(3, blocks, generator=torch.Generator().manual_seed(seed)) < 0.3
    packed = pack_flags(flags)
    assert packed.shape == (3, -(-blocks // 8)) and packed.dtype == torch.uint8
    assert torch.equal(unpack_flags(packed, blocks), flags)


def test_stored_size_is_fixed_and_counts_all_side_information():
    assert bits_per_dim(128) == 4.25 and bits_per_dim(64) == 4.375 and flag_bytes(256) == 4
    assert 16 / bits_per_dim(128) >= 3.7  # the bound on the cache size against float16
    codec = NestedE8Codec()
    coded = codec.encode(wide_range(50, 128, 0))
    assert coded.nbytes() * 8 == 50 * 128 * 4.25
    assert codec.bits_per_dim(128) == 4.25


@pytest.mark.parametrize("rotation", ["rht", "none"])
@pytest.mark.parametrize("d", [8, 64, 128])
def test_decode_is_quantize_bit_for_bit(rotation, d):
    codec = NestedE8Codec(rotation)
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        x = wide_range(60, d, d, dtype)
        coded = codec.encode(x)
        assert coded.shape == x.shape and coded.steps.shape == x.shape[:-1]
        y = codec.decode(coded, dtype)
        assert y.dtype == dtype and torch.equal(bits_of(y), bits_of(codec.quantize(x)))


def test_scaling_by_two_moves_the_step_code_by_eight_and_keeps_the_words():
    codec = NestedE8Codec()
    x = wide_range(80, 64, 1, torch.float64)
    a, b = codec.encode(x), codec.encode(2 * x)
    assert torch.equal(b.steps.long(), a.steps.long() + 8)
    assert torch.equal(a.words, b.words) and torch.equal(a.flags, b.flags)


def test_unflagged_blocks_are_the_nearest_e8_points_and_flagged_ones_left_the_cube():
    codec = NestedE8Codec()
    x = wide_range(200, 64, 2)
    points, flags, codes = codec.analyse(x)
    y = codec._codec._to_lattice_units(fwht(x * codec._codec._signs(64, x.device, x.dtype)), codes)
    blocks, pts = y.reshape(200, 8, 8), points.reshape(200, 8, 8)
    nearest = nearest_e8(blocks)
    assert torch.equal(pts[~flags], nearest[~flags])
    outside = (nearest[flags] < -8).any(-1) | (nearest[flags] >= 8).any(-1)
    assert bool(outside.all()) and 0.05 < flags.float().mean() < 0.6
    # the largest coordinate sits near the peak: the step is the smallest with max |y| <= peak
    peak = blocks.abs().amax((-1, -2))
    assert bool((peak <= codec.peak + 1e-4).all() and (peak > codec.peak * 2 ** (-1 / 8) - 1e-4).all())


def test_gaussian_error_between_the_bound_and_a_scalar_code():
    """Mean squared error per coordinate over 4^-4 (the Gaussian bound at 4 bits): above 1 (it cannot
    beat the bound), below 2 (a 4-bit Lloyd-Max scalar code is about 2.4)."""
    x = torch.randn(4000, 128, generator=torch.Generator().manual_seed(3))
    mse = float((NestedE8Codec().quantize(x).double() - x.double()).square().mean())
    assert 1.2 < mse / 4.0**-4 < 2.0


@pytest.mark.parametrize("search", [1, 2, 3])
def test_step_search_keeps_the_format_and_never_codes_worse(search):
    """A searched code decodes like any other (decode ∘ encode = quantize), its step lies in k0 − s .. k0,
    its exact decision error (in k0's unit) is at most the peak step's, and where it keeps k0 the words
    are the unsearched ones; on Gaussian vectors the mean squared error drops by at least 7%."""
    from lqlib.coding.nested import _decision_errors, _points_in_cube, search_weights

    plain, searched = NestedE8Codec(), NestedE8Codec(search=search)
    x = wide_range(300, 64, 5 + search)
    coded, base = searched.encode(x), plain.encode(x)
    assert torch.equal(bits_of(searched.decode(coded)), bits_of(searched.quantize(x)))
    shift = (coded.steps.long() - base.steps.long()).neg()
    assert bool(((shift >= 0) & (shift <= search)).all()) and bool((shift > 0).any())
    same = shift == 0
    assert torch.equal(coded.words[same], base.words[same]) and torch.equal(coded.flags[same], base.flags[same])

    # the kept step is the first argmin of the weighted decision errors of k0, k0 − 1, …, k0 − s
    u = fwht(x * plain._codec._signs(64, x.device, x.dtype))
    weights = search_weights(search)
    kept = (
        _decision_errors(
            plain._blocks(u, coded.steps.to(torch.int32)[:, None]),
            unpack_words(coded.words).reshape(300, 8, 8),
            unpack_flags(coded.flags, 8),
        )
        * torch.tensor(weights)[shift]
    )
    for j, weight in enumerate(weights):
        blocks = plain._blocks(u, base.steps.to(torch.int32)[:, None] - j)
        points, flags = _points_in_cube(blocks)
        err = _decision_errors(blocks, points, flags) * weight
        assert bool((kept <= err).all()) and bool((kept[shift > j] < err[shift > j]).all())
    g = torch.randn(4000, 64, generator=torch.Generator().manual_seed(9))
    mse = [float((c.quantize(g).double() - g.double()).square().mean()) for c in (plain, searched)]
    assert mse[1] < 0.93 * mse[0]


def test_in_loop_method_and_verdicts():
    x = wide_range(10, 64, 4)
    method = NestedE8()
    assert torch.equal(method.quantize(x), NestedE8Codec().quantize(x)) and method.bits_per_dim(x) == 4.375
    baseline = Estimate(value=2.0, low=1.0, high=3.0, n=24)
    cases = {(0.9, 1.1): "met", (1.2, 1.5): "not met", (1.0, 1.3): "inconclusive"}
    for (low, high), expected in cases.items():
        ratio = RatioEstimate(value=(low + high) / 2, low=low, high=high, n=24, denominator=baseline)
        assert verdict(ratio, 1.15) == expected
    reaches_zero = Estimate(value=0.5, low=-0.1, high=1.0, n=24)
    assert verdict(RatioEstimate(value=1.0, low=0.5, high=2.0, n=24, denominator=reaches_zero), 1.15) == "undefined"


def test_quality_verdicts_compare_each_nested_row_with_both_baselines():
    """Synthetic windows whose ΔPPL ratios are known: nested at twice the entropy-coded codec's excess
    NLL and half TurboQuant-style's (not met / met), the searched row at 1.1 and 0.55 of them."""
    from lqlib.evaluation.fixed_rate import (
        EC_LABEL,
        INT8_LABEL,
        NESTED_LABEL,
        TURBO_LABEL,
        nested_label,
        quality_verdicts,
        ratio_text,
    )

    gen = torch.Generator().manual_seed(0)
    fp = 1000.0 + 100.0 * torch.rand(40, generator=gen, dtype=torch.float64)
    tokens = [511] * 40
    excess = {NESTED_LABEL: 0.02, nested_label(1): 0.011, EC_LABEL: 0.01, INT8_LABEL: 0.015, TURBO_LABEL: 0.02 / 0.5}
    rows = [
        {
            "method": "full precision",
            "bits_per_dim": 32.0,
            "ppl": 10.0,
            "window_nll": fp.tolist(),
            "window_tokens": tokens,
        }
    ]
    for name, e in excess.items():
        nll = (fp * (1 + e * (1 + 0.01 * torch.rand(40, generator=gen, dtype=torch.float64)))).tolist()
        rows.append({"method": name, "bits_per_dim": 4.375, "ppl": 10.5, "window_nll": nll, "window_tokens": tokens})
    methods, ratios = quality_verdicts(rows, draws=400)
    assert [m["method"] for m in methods] == list(excess)
    got = {(r["nested"], r["baseline"]): r for r in ratios}
    assert set(got) == {(n, b) for n in (NESTED_LABEL, nested_label(1)) for b in (EC_LABEL, TURBO_LABEL)}
    assert (
        got[(NESTED_LABEL, EC_LABEL)]["verdict"] == "not met" and got[(NESTED_LABEL, TURBO_LABEL)]["verdict"] == "met"
    )
    assert got[(nested_label(1), EC_LABEL)]["verdict"] == "met"  # 1.1 ≤ 1.15
    assert got[(nested_label(1), TURBO_LABEL)]["verdict"] == "met"  # 0.275 ≤ 0.6
    for r in ratios:
        assert r["low"] <= r["ratio"] <= r["high"]
    assert 1.8 < got[(NESTED_LABEL, EC_LABEL)]["ratio"] < 2.2 and 1.0 < got[(nested_label(1), EC_LABEL)]["ratio"] < 1.2
    text, verdict_ = ratio_text(ratios, nested_label(1), TURBO_LABEL)
    r = got[(nested_label(1), TURBO_LABEL)]
    assert text == f"{r['ratio']:.2f}× [{r['low']:.2f}, {r['high']:.2f}]" and verdict_ == "met"
    with pytest.raises(lqlib.InputError, match="no ratio"):
        ratio_text(ratios, nested_label(2), TURBO_LABEL)


def test_clear_errors():
    with pytest.raises(lqlib.InputError, match="peak"):
        NestedE8Codec(peak=2.0)
    for bad in (-1, 4, 1.0, True):
        with pytest.raises(lqlib.InputError, match="search"):
            NestedE8Codec(search=bad)
    with pytest.raises(lqlib.InputError, match="power-of-two|power of two|head dim"):
        NestedE8Codec().encode(torch.randn(3, 24))
    coded = NestedE8Codec().encode(torch.randn(3, 64))
    with pytest.raises(lqlib.FormatError, match="int32"):
        NestedE8Codec().decode(NestedCodes(coded.words.long(), coded.steps, coded.flags))
    with pytest.raises(lqlib.FormatError, match="one tensor"):
        NestedE8Codec().decode(NestedCodes(coded.words, coded.steps[:2], coded.flags))


# ---------------------------------------------------------------------------------------------- kernels
kernels_ok = DEVICE == "cuda" or __import__("os").environ.get("TRITON_INTERPRET") == "1"
needs_kernels = pytest.mark.skipif(not kernels_ok, reason="the kernels need CUDA or TRITON_INTERPRET=1")


@needs_kernels
@pytest.mark.parametrize("rotation", ["rht", "none"])
@pytest.mark.slow
def test_kernels_are_the_cpu_reference_bit_for_bit(rotation):
    from lqlib.kernels import nested as kn

    codec = NestedE8Codec(rotation)
    for d, dtype in ((16, torch.float32), (64, torch.bfloat16), (128, torch.float16)):
        x = wide_range(33, d, d, dtype).clamp(-6e4, 6e4)
        got, ref = kn.quantize(codec, x.to(DEVICE)), codec.encode(x)
        small = kn.quantize(codec, x.to(DEVICE), **kn.SMALL_QUANTIZE_LAUNCH)  # a decode step's launch
        assert all(torch.equal(getattr(small, f).cpu(), getattr(ref, f)) for f in ("words", "steps", "flags"))
        assert torch.equal(got.words.cpu(), ref.words) and got.words.shape == (33, d // 8)
        assert torch.equal(got.steps.cpu(), ref.steps) and torch.equal(got.flags.cpu(), ref.flags)
        y = kn.dequantize(codec, got, dtype)
        assert torch.equal(bits_of(y.cpu()), bits_of(codec.decode(ref, dtype)))


@needs_kernels
@pytest.mark.parametrize(
    ("d", "dtype", "rotation", "search"), [(64, torch.bfloat16, "rht", 3), (128, torch.float16, "none", 1)]
)
def test_searched_quantize_kernel_is_the_cpu_reference_bit_for_bit(d, dtype, rotation, search):
    """The kernel's step search (its integer error comparison, ties, the clamp at the smallest code)
    gives the reference's words, steps and flags, in the default and the decode step's launch."""
    from lqlib.kernels import nested as kn

    codec = NestedE8Codec(rotation, search=search)
    x = wide_range(12, d, d + search, dtype).clamp(-6e4, 6e4)
    x[3] = 0.0  # the smallest step code: no finer candidate
    ref = codec.encode(x)
    assert bool((ref.steps != NestedE8Codec(rotation).encode(x).steps).any())
    for launch in ({}, kn.SMALL_QUANTIZE_LAUNCH):
        got = kn.quantize(codec, x.to(DEVICE), **launch)
        assert all(torch.equal(getattr(got, f).cpu(), getattr(ref, f)) for f in ("words", "steps", "flags"))


@needs_kernels
@pytest.mark.parametrize("device_position", [False, True])
def test_quantize_into_writes_the_same_codes_at_the_position_and_nothing_else(device_position):
    from lqlib.kernels import nested as kn

    codec = NestedE8Codec()
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 3, 5, 64, generator=gen).to(DEVICE, torch.float16)  # (groups..., t = 5, d)
    cap, pos = 11, 4
    store = NestedCodes(
        torch.full((2, 3, cap, 8), 7, dtype=torch.int32, device=DEVICE),
        torch.full((2, 3, cap), -5, dtype=torch.int16, device=DEVICE),
        torch.full((2, 3, cap, 1), 9, dtype=torch.uint8, device=DEVICE),
    )
    before = NestedCodes(store.words.clone(), store.steps.clone(), store.flags.clone())
    position = torch.tensor([pos], device=DEVICE) if device_position else pos
    kn.quantize_into(codec, x, store, position)
    ref = kn.quantize(codec, x)
    window = slice(pos, pos + 5)
    for name in ("words", "steps", "flags"):
        got, old, want = getattr(store, name), getattr(before, name), getattr(ref, name)
        assert torch.equal(got[:, :, window], want)
        assert torch.equal(got[:, :, :pos], old[:, :, :pos]) and torch.equal(got[:, :, pos + 5 :], old[:, :, pos + 5 :])


@needs_kernels
def test_quantize_into_refuses_a_store_that_does_not_fit():
    from lqlib.kernels import nested as kn

    codec = NestedE8Codec()
    x = torch.zeros(2, 3, 64, device=DEVICE)
    store = kn.quantize(codec, torch.zeros(2, 4, 64, device=DEVICE))  # capacity 4
    with pytest.raises(lqlib.InputError, match="do not fit"):
        kn.quantize_into(codec, x, store, 2)
    with pytest.raises(lqlib.InputError, match="contiguous"):
        kn.quantize_into(codec, x, NestedCodes(store.words[:, ::2], store.steps[:, ::2], store.flags[:, ::2]), 0)
    with pytest.raises(lqlib.InputError, match="int64"):
        kn.quantize_into(codec, x, store, torch.tensor([0], dtype=torch.int32, device=DEVICE))
    with pytest.raises(lqlib.InputError, match="contiguous"):
        kn.quantize_into(codec, torch.zeros(3, 3, 64, device=DEVICE), store, 0)


@needs_kernels
@pytest.mark.slow
@pytest.mark.parametrize(
    "d, rotation, pairs, with_scales, block_n",
    [
        (64, "rht", None, True, 16),
        (64, "rht", False, True, 64),
        (128, "rht", True, True, 64),
        (128, "none", None, False, 64),
        (32, "rht", False, False, 16),
    ],
)
def test_fused_attention_matches_the_reference(d, rotation, pairs, with_scales, block_n):
    """Both operand layouts (the library's choice where ``pairs`` is None) against the reference; on the
    GPU the default decoding (inline PTX from 64 tokens a tile), on the CPU the interpreter's."""
    from lqlib.kernels import nested as kn
    from lqlib.kernels.attention import AttentionConfig

    b, hkv, hq, n = 2, 2, 4, 45
    gen = torch.Generator().manual_seed(5)
    kc, vc = NestedE8Codec(rotation, seed=0), NestedE8Codec(rotation, seed=1)
    k, v = torch.randn(2, b, hkv, n, d, generator=gen) * 2
    scales = torch.rand(hkv, d, generator=gen) + 0.5 if with_scales else torch.ones(hkv, d)
    keys, values = kn.quantize(kc, (k / scales[:, None]).to(DEVICE)), kn.quantize(vc, v.to(DEVICE))
    q = torch.randn(b, hq, d, generator=gen).half().to(DEVICE)
    lengths = torch.tensor([n, 29], device=DEVICE)
    cfg = AttentionConfig(block_n=block_n, splits=2)
    key_scales = scales.to(DEVICE) if with_scales else None
    got = kn.decode_attention(q, keys, values, lengths, kc, vc, key_scales=key_scales, config=cfg, pairs=pairs)
    ref = kn.reference_decode_attention(q, keys, values, lengths, kc, vc, key_scales=key_scales)
    err = (got.float() - ref.float()).abs().max()
    assert err <= 5e-4 * ref.float().abs().max() + 2e-3, err
    # one token fewer changes the result by far more than the tolerance
    fewer = kn.reference_decode_attention(q, keys, values, lengths - 1, kc, vc, key_scales=key_scales)
    assert (fewer.float() - ref.float()).abs().max() > 20 * err
    with pytest.raises(lqlib.InputError, match="kv_heads|multiple"):
        kn.decode_attention(q[:, :3], keys, values, n, kc, vc)
    with pytest.raises(lqlib.InputError, match="length"):
        kn.decode_attention(q, keys, values, n + 1, kc, vc)
    with pytest.raises(lqlib.InputError, match="NestedE8Codec"):
        kn.decode_attention(q, keys, values, n, lqlib.E8Codec(4.0), vc)
    if d < 64 or (DEVICE == "cuda" and d < kn.PAIRS_MIN_DIM):
        with pytest.raises(lqlib.InputError, match="pairs"):
            kn.decode_attention(q, keys, values, n, kc, vc, pairs=True)
    if DEVICE == "cuda":  # the GPU-only decoding refuses the tiles it got wrong on an H100
        with pytest.raises(lqlib.InputError, match="block_n"):
            kn.decode_attention(q, keys, values, n, kc, vc, config=AttentionConfig(block_n=16), fast_cvt=True)


@needs_kernels
@pytest.mark.slow
@pytest.mark.parametrize("d, rotation, with_scales", [(128, "rht", True)])
def test_lean_decoding_is_the_full_decoding_up_to_summation_order(d, rotation, with_scales):
    """Lanes without the coset bit and parity, those added by a side dot: the same attention as the
    full decoding (float32 summation order aside) and the reference, with flagged blocks present."""
    from lqlib.kernels import nested as kn
    from lqlib.kernels.attention import AttentionConfig

    if DEVICE == "cuda" and d < kn.PAIRS_MIN_DIM:
        pytest.skip("pairs of lanes are refused on the GPU below PAIRS_MIN_DIM")
    b, hkv, hq, n = 2, 1, 4, 100
    gen = torch.Generator().manual_seed(11)
    codec = NestedE8Codec(rotation, seed=2)
    k, v = torch.randn(2, b, hkv, n, d, generator=gen) * 3
    k[..., :8] *= 4  # a few large blocks: some overload the cube and are flagged
    scales = torch.rand(hkv, d, generator=gen) + 0.5 if with_scales else None
    keys = kn.quantize(codec, (k if scales is None else k / scales[:, None]).to(DEVICE))
    values = kn.quantize(codec, v.to(DEVICE))
    assert bool((keys.flags != 0).any()) and bool((values.flags != 0).any())
    q = torch.randn(b, hq, d, generator=gen).half().to(DEVICE)
    lengths = torch.tensor([n, 77], device=DEVICE)  # whole and partial tiles
    key_scales = None if scales is None else scales.to(DEVICE)
    cfg = AttentionConfig(block_n=64, splits=1)
    full, lean = (
        kn.decode_attention(
            q, keys, values, lengths, codec, codec, key_scales=key_scales, config=cfg, pairs=True, lean=x
        )
        for x in (False, True)
    )
    ref = kn.reference_decode_attention(q, keys, values, lengths, codec, codec, key_scales=key_scales)
    scale = ref.float().abs().max()  # outputs are float16: one unit in the last place is scale / 1024
    assert (lean.float() - full.float()).abs().max() <= 1e-3 * scale + 2e-3
    assert (lean.float() - ref.float()).abs().max() <= 1e-3 * scale + 2e-3
    with pytest.raises(lqlib.InputError, match="lean"):
        kn.decode_attention(q, keys, values, n, codec, codec, pairs=False, lean=True)


@needs_kernels
@pytest.mark.slow
def test_keys_as_first_operand_are_the_default_decoding_up_to_summation_order(with_scales=True):
    """Transposed scores, the decoded keys as the dots' first operand against the transposed queries:
    the same attention as the default pairs of lanes (float32 summation order aside) and the reference,
    with flagged blocks, whole and partial tiles (the key flags read as int32 words); refused without pairs,
    with the lean decoding, or with key flags off a word boundary."""
    from lqlib.kernels import nested as kn
    from lqlib.kernels.attention import AttentionConfig

    d, block = 128, 64
    b, hkv, hq, n = 2, 1, 4, 2 * block
    gen = torch.Generator().manual_seed(13)
    codec = NestedE8Codec("rht", seed=4)
    k, v = torch.randn(2, b, hkv, n, d, generator=gen) * 3
    k[..., :8] *= 4  # a few large blocks: some overload the cube and are flagged
    scales = torch.rand(hkv, d, generator=gen) + 0.5 if with_scales else None
    keys = kn.quantize(codec, (k if scales is None else k / scales[:, None]).to(DEVICE))
    values = kn.quantize(codec, v.to(DEVICE))
    assert bool((keys.flags != 0).any())
    q = torch.randn(b, hq, d, generator=gen).half().to(DEVICE)
    lengths = torch.tensor([n, block + 13], device=DEVICE)  # whole and partial tiles
    key_scales = None if scales is None else scales.to(DEVICE)
    cfg = AttentionConfig(block_n=block, splits=1)
    default, keys_a = (
        kn.decode_attention(
            q, keys, values, lengths, codec, codec, key_scales=key_scales, config=cfg, pairs=True, keys_as_a=x
        ).float()
        for x in (False, True)
    )
    ref = kn.reference_decode_attention(q, keys, values, lengths, codec, codec, key_scales=key_scales).float()
    scale = ref.abs().max()  # outputs are float16: one unit in the last place is scale / 1024
    assert (keys_a - default).abs().max() <= 1e-3 * scale + 2e-3
    assert (keys_a - ref).abs().max() <= 1e-3 * scale + 2e-3
    with pytest.raises(lqlib.InputError, match="keys_as_a"):
        kn.decode_attention(q, keys, values, n, codec, codec, pairs=False, keys_as_a=True)
    with pytest.raises(lqlib.InputError, match="keys_as_a"):
        kn.decode_attention(q, keys, values, n, codec, codec, pairs=True, lean=True, keys_as_a=True)
    shifted = torch.zeros(keys.flags.numel() + 1, dtype=torch.uint8, device=DEVICE)[1:].view(keys.flags.shape)
    shifted.copy_(keys.flags)  # the same flags one byte off a word boundary: not read as int32 words
    with pytest.raises(lqlib.InputError, match="aligned"):
        kn.decode_attention(
            q, NestedCodes(keys.words, keys.steps, shifted), values, n, codec, codec, pairs=True, keys_as_a=True
        )


@needs_kernels
@pytest.mark.parametrize("d, splits", [(8, 1), (64, 5), (128, 37)])
def test_combine_undoes_the_rotation_once_a_row(d, splits):
    """Merging rotated partials with signs: the merged rows times H (unnormalised Sylvester) times the
    signs, to float32 rounding; splits past one chunk of the merge loop and an empty split included."""
    from lqlib.kernels.attention import combine_splits, hadamard_matrix

    gen = torch.Generator().manual_seed(d + splits)
    rows = 6
    acc = torch.randn(rows, splits, d, generator=gen)
    m = torch.randn(rows, splits, generator=gen) * 4
    l = torch.rand(rows, splits, generator=gen) + 0.5
    if splits > 1:
        m[0, 1] = float("-inf")  # a split that saw no token
        l[0, 1] = 0.0
    signs = torch.where(torch.rand(d, generator=gen) < 0.5, -1.0, 1.0)
    w = torch.exp2(m - m.max(dim=1, keepdim=True).values)
    merged = (acc * w[..., None]).sum(1) / (w * l).sum(1, keepdim=True) / 2
    expected = (merged.double() @ hadamard_matrix(d, "cpu", torch.float64)) * signs.double()
    out = torch.empty(rows, d)
    ml = torch.stack([m, l], dim=1).contiguous()
    got = combine_splits(acc.to(DEVICE), ml.to(DEVICE), out.to(DEVICE), signs.to(DEVICE)).cpu()
    assert (got.double() - expected).abs().max() <= 1e-5 * expected.abs().max()


@needs_kernels
@pytest.mark.slow
@pytest.mark.parametrize("d, pairs", [(128, True), (64, False)])
def test_rotations_in_registers_and_in_the_combine_are_the_same_attention(d, pairs, monkeypatch):
    """The values' rotation undone once a row when merging the splits, and (pairs of lanes) the queries
    rotated by butterflies in registers: the same attention as the dots against H in every split
    (float32 summation order aside) and the reference."""
    from lqlib.kernels import nested as kn
    from lqlib.kernels.attention import AttentionConfig

    if DEVICE == "cuda" and pairs and d < kn.PAIRS_MIN_DIM:
        pytest.skip("pairs of lanes are refused on the GPU below PAIRS_MIN_DIM")
    block = 64 if DEVICE == "cuda" else 32  # the GPU refuses smaller tiles with pairs; the interpreter is slow
    b, hkv, hq, n = 2, 1, 4, 2 * block + 2
    gen = torch.Generator().manual_seed(12)
    codec = NestedE8Codec("rht", seed=3)
    k, v = torch.randn(2, b, hkv, n, d, generator=gen) * 3
    keys, values = kn.quantize(codec, k.to(DEVICE)), kn.quantize(codec, v.to(DEVICE))
    q = torch.randn(b, hq, d, generator=gen).half().to(DEVICE)
    lengths = torch.tensor([n, block + 5], device=DEVICE)  # whole and partial tiles, an empty split
    cfg = AttentionConfig(block_n=block, splits=3)
    ref = kn.reference_decode_attention(q, keys, values, lengths, codec, codec).float()
    scale = ref.abs().max()

    def attend(late: bool, in_registers: bool) -> torch.Tensor:
        monkeypatch.setattr(kn, "ROTATE_QUERIES_IN_REGISTERS", in_registers)
        return kn.decode_attention(
            q, keys, values, lengths, codec, codec, config=cfg, pairs=pairs, unrotate_in_combine=late
        ).float()

    each = attend(False, False)
    assert (each - ref).abs().max() <= 1e-3 * scale + 2e-3
    for late, in_registers in [(True, False)] + [(True, True)] * pairs:
        got = attend(late, in_registers)
        assert (got - each).abs().max() <= 1e-3 * scale + 2e-3
        assert (got - ref).abs().max() <= 1e-3 * scale + 2e-3


# ---------------------------------------------------------------------------------------------- device cache
@pytest.mark.slow
@needs_kernels
def test_nested_device_cache_matches_the_format_in_the_loop():
    """Prefill logits bit for bit those of a quantize-dequantize cache through the format (both SDPA
    over the same values); decode through the fused kernel within float16 precision; the stored words
    are the CPU reference's; bytes held are 4.375 bits/dim at d = 64."""
    from lqlib.cache.device import ATTENTION, DeviceKVCache, cache_kwarg

    config, model = tiny_llama()
    codec = NestedE8Codec()
    kw = cache_kwarg(model)
    ids = torch.randint(0, 97, (2, 13), generator=torch.Generator().manual_seed(6)).to(DEVICE)

    def greedy(cache, impl, steps=2):
        model.set_attn_implementation(impl)
        out, logits = model(ids, **{kw: cache}).logits[:, -1], []
        for _ in range(steps):
            logits.append(out.float())
            out = model(out.argmax(-1, keepdim=True), **{kw: cache}).logits[:, -1]
        logits.append(out.float())
        return torch.stack(logits).cpu()

    with torch.inference_mode():
        ref = greedy(QuantizeDequantizeCache(codec.quantize, config), "sdpa")
        cache = DeviceKVCache(config, 4.0, format="nested")
        got = greedy(cache, ATTENTION)
    assert torch.equal(got[0], ref[0])
    assert 0 < (got[1:] - ref[1:]).abs().max() <= 5e-3
    layer = cache.layers[0]
    assert layer.n_tokens == 15 and cache.get_seq_length() == 15
    assert cache.nbytes() == 2 * 2 * 2 * 15 * (32 + 2 + 1) * 2  # layers·(K,V)·batch·heads·tokens·bytes
    assert cache.nbytes() * 8 / (2 * 2 * 2 * 2 * 15 * 64) == bits_per_dim(64)
    keys, values = layer.dequantized(torch.float32)
    coded = NestedCodes(layer.words[0, ..., :15, :], layer.steps[0, ..., :15], layer.flags[0, ..., :15, :])
    assert torch.equal(
        keys.cpu(), codec.decode(NestedCodes(*(t.cpu() for t in (coded.words, coded.steps, coded.flags))))
    )
    assert values.shape == keys.shape == (2, 2, 15, 64)


def test_nested_device_cache_errors():
    from lqlib.cache.device import DeviceKVCache

    config, _ = tiny_llama(1)
    with pytest.raises(lqlib.InputError, match="4 bits"):
        DeviceKVCache(config, 3.0, format="nested")
    with pytest.raises(lqlib.InputError, match="format"):
        DeviceKVCache(config, 4.0, format="int4")
    with pytest.raises(lqlib.InputError, match="search"):
        DeviceKVCache(config, 4.0, format="int8", search=1)
    from lqlib.cache.nested_device import NestedDeviceKVLayer

    with pytest.raises(lqlib.InputError, match="NestedE8Codec"):
        NestedDeviceKVLayer(lqlib.E8Codec(4.0))


@needs_kernels
def test_nested_device_cache_with_the_step_search_stores_the_searched_codes():
    """search=1: the layer's words, steps and flags are the searched encoder's, bit for bit, and differ
    from the unsearched codes (the kernel searched inside the cache)."""
    from lqlib.cache.device import DeviceKVCache

    config, _ = tiny_llama(1)
    gen = torch.Generator().manual_seed(7)
    k, v = (torch.randn(1, 2, 6, 64, generator=gen) * torch.exp(torch.randn(1, 2, 6, 1, generator=gen)) for _ in "kv")
    layer = DeviceKVCache(config, 4.0, format="nested", search=1).layers[0]
    layer.update(k.to(DEVICE), v.to(DEVICE))
    for part, x in enumerate((k, v)):
        stored = [t[part, ..., :6, :] if t.dim() == 5 else t[part, ..., :6] for t in (layer.words, layer.flags)]
        ref, plain = NestedE8Codec(search=1).encode(x), NestedE8Codec().encode(x)
        assert torch.equal(stored[0].cpu(), ref.words) and torch.equal(stored[1].cpu(), ref.flags)
        assert torch.equal(layer.steps[part, ..., :6].cpu(), ref.steps) and not torch.equal(ref.steps, plain.steps)


# ---------------------------------------------------------------------------------------------- one-graph decoder
def test_graphed_decoder_steps_are_a_plain_greedy_loop():
    """On the CPU the decoder runs its step eagerly: the same tokens and logits as a plain loop with
    transformers' StaticCache (the graph on CUDA replays exactly this function)."""
    from transformers import StaticCache

    from lqlib.cache.decode_graph import GraphedDecoder

    config, model = tiny_llama()
    model.set_attn_implementation("sdpa")
    ids = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(8)).to(DEVICE)
    with torch.inference_mode():
        cache = StaticCache(config=config, max_cache_len=20)
        out = model(ids, past_key_values=cache, use_cache=True).logits[:, -1]
        tokens, logits = [], []
        for _ in range(4):
            tok = out.argmax(-1, keepdim=True)
            tokens.append(tok)
            out = model(tok, past_key_values=cache, use_cache=True).logits[:, -1]
            logits.append(out.float())
    decoder = GraphedDecoder(model, StaticCache(config=config, max_cache_len=20), warmup=1)
    first = decoder.prefill(ids)
    assert torch.equal(first, tokens[0]) and torch.equal(decoder.logits.float(), logits[0])
    for i in range(1, 4):
        assert torch.equal(decoder.ids, tokens[i])
        decoder.step()
        assert torch.equal(decoder.logits.float(), logits[i])
    assert decoder.steps == 4 and decoder.graphed == (DEVICE == "cuda")
    with pytest.raises(lqlib.InputError, match="warmup"):
        GraphedDecoder(model, StaticCache(config=config, max_cache_len=20), warmup=0)
    with pytest.raises(lqlib.InputError, match="prefill"):
        GraphedDecoder(model, StaticCache(config=config, max_cache_len=20)).step()


def test_fixed_rate_size_constant():
    assert math.isclose(16 / bits_per_dim(128), 3.765, abs_tol=1e-3) and BETA == 1.5


def test_fp16_baseline_attention_reads_each_kv_head_once_and_matches_sdpa():
    """The float16 baseline's decode attention (query heads of a KV head as SDPA rows) gives
    transformers' SDPA logits with StaticCache (float32 model: within 1e-5)."""
    from lqlib.cache.decode_graph import register_fp16_decode_attention

    config, model = tiny_llama()
    ids = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(9)).to(DEVICE)
    a, b = (graphed_logits(model, config, ids, impl) for impl in ("sdpa", register_fp16_decode_attention()))
    assert torch.allclose(a, b, atol=1e-5, rtol=0) and a.abs().max() > 0.1


def test_recorded_gpu_runs_read_for_the_book():
    """The recorded H100 runs (results/gpu_nested*_*.json) as the book's rows: each ratio is its two
    times of the same run, the cache sizes count every side byte, the kernels matched the CPU."""
    from pathlib import Path

    from lqlib.book import gpu_results as g

    results = Path(__file__).resolve().parent.parent / "results"
    kernels = g.nested_runs(results, "gpu_nested")
    decode = g.nested_runs(results, "gpu_nested_decode")
    assert all(run["benchmark"] == "benchmarks/gpu_nested_decode.py" for run in decode)
    assert all(r["bit_identical"] for r in g.nested_kernel_rows(kernels))
    attention = g.nested_attention_rows(kernels)
    for r in attention:
        assert math.isclose(r["nested_speedup"], r["sdpa_ms"] / r["nested_ms"], rel_tol=1e-9)
        assert r["met"] == (r["nested_speedup"] >= 2.5)
    assert all(r["fp16_split_k_ms"] > 0 and r["nested_launch"] for r in attention)
    gains = g.nested_layout_gain(kernels)
    assert {(r["batch"], r["context"]) for r in gains} == {(r["batch"], r["context"]) for r in attention}
    for r in gains:
        run = next(run for run in kernels if g._run_label(run) == r["run"])
        timed = [x for x in run["attention"] if (x["batch"], x["context"]) == (r["batch"], r["context"])]
        assert r["pairs_ms"] == min(
            x["median_ms"] for x in timed if x["method"].startswith("nested fused") and " pairs" in x["method"]
        )
        assert math.isclose(r["gain"], r["joined_ms"] / r["pairs_ms"])
    rows = g.nested_decode_rows(decode)
    nested = [r for r in rows if r["cache"] == "nested_graph"]
    assert nested and all(3.7 <= r["kv_ratio_vs_fp16"] <= 16 / bits_per_dim(128) + 1e-3 for r in nested)
    assert all(r["floor_ms"] < r["ms_per_step"] for r in rows)
    # each ratio is against the fastest float16 one-graph baseline of its own run, context and batch
    for r in nested:
        same = [
            x
            for x in rows
            if (x["run"], x["context"], x["batch"]) == (r["run"], r["context"], r["batch"])
            and x["cache"] in g.FP16_GRAPH_CACHES
        ]
        fastest = min(same, key=lambda x: x["ms_per_step"])
        assert r["baseline"] == fastest["cache"]
        assert math.isclose(r["vs_fp16"], fastest["ms_per_step"] / r["ms_per_step"], rel_tol=1e-9)
    fair = g.fair_decode_runs(decode)
    assert fair and len(fair) < len(decode)
    assert all(any(r["cache"] == "static_split_k_graph" for r in run["rows"]) for run in fair)
    summary = g.nested_decode_summary(g.nested_decode_rows(fair))
    assert len(summary) == len({(r["card"], r["run"], r["context"], r["batch"]) for r in g.nested_decode_rows(fair)})
    for s in summary:
        if s["nested_graph_ms"] is not None:
            assert math.isclose(s["nested_vs_fp16"], s["fp16_ms"] / s["nested_graph_ms"], rel_tol=1e-9)
            assert s["baseline"] == "static_split_k_graph"  # the strongest float16 baseline in every fair run
    capacity = [r for r in g.nested_capacity_rows(decode) if r["static_attention"] == "lqlib_fp16_decode"]
    assert capacity and all(r["nested_tokens"] > r["fp16_tokens"] > 0 for r in capacity)
