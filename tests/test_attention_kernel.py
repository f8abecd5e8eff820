"""Fused decode attention on E8-coded pages (lqlib.kernels.attention) against its torch reference and
against the CPU codec path (codec.quantize of the original K/V, then SDPA).

Without CUDA the kernel runs in Triton's interpreter (``TRITON_INTERPRET=1``, set by conftest) on CPU
tensors. Tolerance: the output is float16 and the kernel rounds the rotated query, the softmax weights
``p·f/max f`` and the value sum's halves to float16 (relative 2^-11 each) and accumulates in float32,
so it stays within ``ATOL_REL = 4e-3`` of the largest output magnitude (about 4 float16 ulps of it).
"""

import math
import os

import pytest
import torch
import torch.nn.functional as F

triton = pytest.importorskip("triton")

from lqlib import E8Codec, InputError
from lqlib import kernels as K
from lqlib.core.rht import fwht
from lqlib.kernels.attention import (
    AttentionConfig,
    decode_attention,
    hadamard_matrix,
    reference_decode_attention,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("the kernels need CUDA, or TRITON_INTERPRET=1 before Triton is imported", allow_module_level=True)

ATOL_REL = 4e-3


def cache(b, hkv, cap, d, kc, vc, seed, scales=True):
    """Original K/V (float16, keys already multiplied by their scales), key scales, and the coded cache."""
    gen = torch.Generator().manual_seed(seed)
    k = torch.randn(b, hkv, cap, d, generator=gen) * torch.exp(torch.randn(b, hkv, cap, 1, generator=gen))
    v = torch.randn(b, hkv, cap, d, generator=gen) * torch.exp(torch.randn(b, hkv, cap, 1, generator=gen))
    ks = (0.5 + torch.rand(hkv, d, generator=gen)).half() if scales else None
    k = k.half()
    coded_k = k / ks[None, :, None, :] if scales else k
    k_codes, k_steps = K.reference_quantize(kc, coded_k)
    v_codes, v_steps = K.reference_quantize(vc, v.half())

    def to(t):
        return t.to(DEVICE)

    return (k, v.half(), None if ks is None else to(ks), to(k_codes), to(k_steps), to(v_codes), to(v_steps))


def close(out, ref):
    err = (out.float().cpu() - ref.float().cpu()).abs().max().item()
    bound = ATOL_REL * ref.float().abs().max().item()
    assert err <= bound, (err, bound)
    return err


def test_hadamard_matrix_is_the_fwht():
    x = torch.randint(-1000, 1000, (5, 128)).double()  # integers: both sums are exact
    assert torch.equal(x @ hadamard_matrix(128, torch.device("cpu"), torch.float64), fwht(x))


@pytest.mark.parametrize(
    "d,g,length,cfg",
    [
        (64, 2, 137, AttentionConfig(block_n=32, splits=3)),  # partial tiles, length < capacity
        (128, 4, 200, AttentionConfig(block_n=64)),  # full capacity, splits from the heuristic
        (64, 4, 45, AttentionConfig(block_n=16, splits=7)),  # more splits than tiles: empty programs
    ],
)
def test_matches_reference(d, g, length, cfg):
    kc, vc = E8Codec(4.0, seed=1), E8Codec(3.0, seed=2)  # different rates and signs for K and V
    _, _, ks, k_codes, k_steps, v_codes, v_steps = cache(2, 2, 200, d, kc, vc, seed=d + g)
    q = torch.randn(2, 2 * g, d, generator=torch.Generator().manual_seed(g)).half().to(DEVICE)
    out = decode_attention(q, k_codes, k_steps, v_codes, v_steps, length, kc, vc, key_scales=ks, config=cfg)
    ref = reference_decode_attention(q, k_codes, k_steps, v_codes, v_steps, length, kc, vc, key_scales=ks)
    assert out.shape == q.shape and out.dtype == q.dtype
    close(out, ref)


def test_matches_the_codec_then_sdpa():
    """Same as dequantizing with the CPU codec (E8Codec.quantize of the originals) then SDPA."""
    kc = vc = E8Codec(4.0, seed=5)
    k, v, ks, k_codes, k_steps, v_codes, v_steps = cache(1, 2, 160, 64, kc, vc, seed=5)
    q = torch.randn(1, 8, 64, generator=torch.Generator().manual_seed(5)).half()
    n = 151
    out = decode_attention(
        q.to(DEVICE), k_codes, k_steps, v_codes, v_steps, n, kc, vc, key_scales=ks, config=AttentionConfig(block_n=32)
    )
    k_hat = kc.quantize(k / ks.cpu()[None, :, None, :]).float() * ks.cpu().float()[None, :, None, :]
    v_hat = vc.quantize(v).float()
    sdpa = F.scaled_dot_product_attention(q.float()[:, :, None], k_hat[:, :, :n], v_hat[:, :, :n], enable_gqa=True)[
        :, :, 0
    ]
    close(out, sdpa)


@pytest.mark.parametrize("rotation", ["none", "rht"])
def test_rotations_bfloat16_lengths_tensor_and_sm_scale(rotation):
    kc, vc = E8Codec(4.0, rotation=rotation, seed=3), E8Codec(4.0, rotation="none", seed=4)
    _, _, _, k_codes, k_steps, v_codes, v_steps = cache(2, 2, 96, 64, kc, vc, seed=7, scales=False)
    q = torch.randn(2, 4, 64, generator=torch.Generator().manual_seed(7)).bfloat16().to(DEVICE)
    lengths = torch.tensor([96, 33], device=DEVICE)
    out = decode_attention(
        q,
        k_codes,
        k_steps,
        v_codes,
        v_steps,
        lengths,
        kc,
        vc,
        sm_scale=0.3,
        config=AttentionConfig(block_n=16, splits=2),
    )
    ref = reference_decode_attention(q, k_codes, k_steps, v_codes, v_steps, lengths, kc, vc, sm_scale=0.3)
    assert out.dtype == torch.bfloat16
    # bfloat16 output: 8-bit mantissa, so 2^-8 of the largest magnitude
    err = (out.float().cpu() - ref.float().cpu()).abs().max().item()
    assert err <= 2**-7 * ref.float().abs().max().item(), err
    # the second row sees only its 33 tokens: same as a cache cut at 33
    cut = reference_decode_attention(
        q[1:],
        k_codes[1:, :, :33],
        k_steps[1:, :, :33],
        v_codes[1:, :, :33],
        v_steps[1:, :, :33],
        33,
        kc,
        vc,
        sm_scale=0.3,
    )
    assert (out[1:].float().cpu() - cut.float().cpu()).abs().max().item() <= 2**-7 * cut.float().abs().max().item()


def test_one_token_is_its_value():
    """length 1: softmax weight 1, the output is the dequantized value of token 0."""
    kc = vc = E8Codec(4.0, seed=8)
    _, _, ks, k_codes, k_steps, v_codes, v_steps = cache(1, 2, 40, 64, kc, vc, seed=8)
    q = torch.randn(1, 4, 64).half().to(DEVICE)
    out = decode_attention(q, k_codes, k_steps, v_codes, v_steps, 1, kc, vc, key_scales=ks)
    value = K.reference_dequantize(vc, v_codes[:, :, :1], v_steps[:, :, :1], torch.float32)[:, :, 0]
    expected = value.repeat_interleave(2, dim=1)
    assert (out.float() - expected).abs().max().item() <= ATOL_REL * expected.abs().max().item()


def test_bad_inputs():
    kc = E8Codec(4.0, seed=1)
    _, _, ks, k_codes, k_steps, v_codes, v_steps = cache(1, 2, 32, 64, kc, kc, seed=1)
    q = torch.randn(1, 4, 64).half().to(DEVICE)
    ok = (q, k_codes, k_steps, v_codes, v_steps, 32, kc, kc)
    for fn in (decode_attention, reference_decode_attention):
        with pytest.raises(InputError, match="q must be"):
            fn(q.float(), *ok[1:])
        with pytest.raises(InputError, match="multiple of kv_heads"):
            fn(q[:, :3], *ok[1:])
        with pytest.raises(InputError, match="int8"):
            fn(q, k_codes.to(torch.int16), *ok[2:])
        with pytest.raises(InputError, match="k_steps"):
            fn(q, k_codes, k_steps[..., :-1], *ok[3:])
        with pytest.raises(InputError, match="length"):
            fn(*ok[:5], 33, kc, kc)
        with pytest.raises(InputError, match="length"):
            fn(*ok[:5], 0, kc, kc)
        with pytest.raises(InputError, match="key_scales"):
            fn(*ok, key_scales=ks[:1])
        with pytest.raises(InputError, match="per-vector"):
            fn(*ok[:6], E8Codec(4.0, scale="tensor"), kc)
        with pytest.raises(InputError, match="head_dim"):
            fn(q, k_codes[..., :32], *ok[2:])
    with pytest.raises(InputError, match="block_n"):
        decode_attention(*ok, config=AttentionConfig(block_n=24))
    assert math.isfinite(decode_attention(*ok).float().abs().max().item())
