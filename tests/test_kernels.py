"""The Triton kernels of the E8 codec against the CPU codec: same codes, step codes and values, bit for bit.

Without CUDA the kernels run in Triton's interpreter (``TRITON_INTERPRET=1``, set by conftest) on
CPU tensors; with CUDA they are compiled for the GPU, and compared with the codec on CPU tensors.
"""

import math
import os

import numpy as np
import pytest
import torch

triton = pytest.importorskip("triton")
tl = pytest.importorskip("triton.language")

from lqlib import E8Codec, Encoded, InputError
from lqlib import kernels as K
from lqlib.coding.codec import saturate, supported_rms
from lqlib.core.symbols import points_to_symbols
from lqlib.kernels._e8_triton import _nearest_e8_codes

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("the kernels need CUDA, or TRITON_INTERPRET=1 before Triton is imported", allow_module_level=True)

_BITS = {torch.float16: torch.int16, torch.bfloat16: torch.int16, torch.float32: torch.int32}


def bits_of(t: torch.Tensor) -> torch.Tensor:
    """The IEEE bit patterns: equality of these is equality to the bit, signed zeros included."""
    return t.contiguous().view(_BITS[t.dtype])


def check(codec: E8Codec, x: torch.Tensor, **launch) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernels on DEVICE against the CPU codec on CPU tensors: codes, step codes, values."""
    codes, steps = K.quantize(codec, x.to(DEVICE), **launch)
    assert codes.shape == x.shape and steps.shape == x.shape[:-1] and codes.device.type == DEVICE
    ref_codes, ref_steps = K.reference_quantize(codec, x.cpu(), codes_dtype=codes.dtype)
    assert torch.equal(steps.cpu(), ref_steps), (steps.cpu() != ref_steps).sum()
    assert torch.equal(codes.cpu(), ref_codes), (codes.cpu() != ref_codes).sum()
    y = K.dequantize(codec, codes, steps, x.dtype, **{k: v for k, v in launch.items() if k != "split"})
    assert y.dtype == x.dtype and y.shape == x.shape
    assert torch.equal(bits_of(y.cpu()), bits_of(codec.quantize(x.cpu())))
    return codes, steps


def check_unsupported(codec: E8Codec, x: torch.Tensor) -> None:
    """Input outside the codec's supported range: the codec refuses it; the kernels (which check
    nothing that needs a host synchronisation) give the codec's unchecked analysis, step codes
    clamped at ±800, and its saturated reconstruction, bit for bit."""
    with pytest.raises(InputError, match="out of range"):
        codec.quantize(x)
    codes, steps = K.quantize(codec, x.to(DEVICE))
    ref_codes, ref_steps = K.reference_quantize(codec, x.cpu(), codes_dtype=codes.dtype)
    assert torch.equal(steps.cpu(), ref_steps) and torch.equal(codes.cpu(), ref_codes)
    y = K.dequantize(codec, codes, steps, x.dtype)
    assert torch.equal(bits_of(y.cpu()), bits_of(K.reference_dequantize(codec, ref_codes, ref_steps, x.dtype)))


def sample(n: int, d: int, seed: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Vectors with norms from 1e-3 to 1e3 and heavy-tailed coordinates (no zeros)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=gen, dtype=torch.float64)
    x = x * torch.exp(torch.randn(n, d, generator=gen, dtype=torch.float64))  # heavy tails
    x = x * torch.logspace(-3, 3, n, dtype=torch.float64)[:, None]
    if dtype == torch.float16:  # within float16's range (the heavy tails pass 65504 in large samples)
        x = x.clamp(-6e4, 6e4)
    return x.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.slow
def test_random_vectors_match_the_codec(d, dtype):
    codec = E8Codec(4.0, rotation="rht", seed=d)
    check(codec, sample(300, d, seed=d + len(str(dtype)), dtype=dtype))


@pytest.mark.parametrize("rotation", ["rht", "none"])
@pytest.mark.parametrize("bits", [0.5, 2.5, 5.5, 9.0])
@pytest.mark.slow
def test_rates_and_rotations(bits, rotation):
    codec = E8Codec(bits, rotation=rotation, seed=3)
    codes, _ = check(codec, sample(130, 64, seed=int(bits * 10), dtype=torch.float16))
    assert codes.dtype == K.code_dtype(codec, 64)


@pytest.mark.slow
def test_launch_layouts_agree():
    """Block size, warps, load order and the split of the E8 stage change nothing."""
    codec = E8Codec(3.0, seed=9)
    x = sample(100, 128, seed=9, dtype=torch.float16)
    launches = [{"block_v": 32, "num_warps": 1, "split": 1}, {"block_v": 128, "num_warps": 4, "split": 0}]
    if DEVICE == "cpu":  # on the GPU, these layouts compile to much slower code (and take long to compile)
        launches += [{"block_v": 16, "chunk_major": True, "split": 2}, {"block_v": 8, "chunk_major": False, "split": 0}]
    for launch in launches:
        check(codec, x, **launch)


@pytest.mark.filterwarnings("ignore:overflow encountered in cast")  # float16 near 65504 rounds to inf, on both sides
@pytest.mark.slow
def test_edge_cases():
    """Zero, one-hot, constant and dyadic vectors (exact ties in the rounding and between the E8
    cosets), tiny and huge norms, subnormals, one huge coordinate among tiny ones."""
    gen = torch.Generator().manual_seed(4)
    d = 64
    rows = [torch.zeros(4, d), torch.eye(d)[:8] * 3.0, -torch.eye(d)[8:12], torch.ones(3, d), -0.25 * torch.ones(2, d)]
    for scale in (2.0**-6, 1.0, 2.0**5):  # small integers, halves and quarters: ties everywhere
        rows.append(torch.randint(-8, 9, (24, d), generator=gen).float() / 4 * scale)
    rows.append(torch.randint(-1, 2, (16, d), generator=gen).float() * 0.5)
    spiky = torch.randn(6, d, generator=gen) * 1e-3
    spiky[:, 5] = 300.0
    rows.append(spiky)
    x = torch.cat(rows)
    for rotation in ("rht", "none"):
        for bits in (2.0, 4.0):
            codec = E8Codec(bits, rotation=rotation, seed=1)
            for dtype in (torch.float32, torch.float16, torch.bfloat16):
                check(codec, x.to(dtype))
    codec = E8Codec(4.0, seed=2)
    base = torch.randn(32, d, generator=gen).clamp(-4, 4)
    for dtype, scales in (
        (torch.float32, (1e-30, 1e30, 1e-38)),
        (torch.bfloat16, (1e-30, 1e30, 1e-38)),
        (torch.float16, (6e-8, 1e-5, 65504 / 4)),
    ):
        for s in scales:
            x = (base * s).to(dtype)
            low, high = supported_rms(codec.bits)
            rms = x.double().square().mean(-1).sqrt()
            if bool(((rms > 0) & ((rms < low) | (rms >= high))).any()):
                check_unsupported(codec, x)  # the codec refuses, the kernels code with saturated steps
            else:
                check(codec, x)
    # float16 at its maximum: reconstructions past 65504 saturate (the codec's and the kernels' alike)
    signs = torch.randint(0, 2, (16, d), generator=gen).float() * 2 - 1
    for rotation in ("rht", "none"):
        spread = signs * torch.rand(16, d, generator=gen) * 65504
        top = torch.cat([torch.full((2, d), 65504.0), signs * 65504.0, spread]).to(torch.float16)
        for bits in (2.0,):
            sat_codec = E8Codec(bits, rotation=rotation, seed=3)
            check(sat_codec, top)
            unsaturated = sat_codec._synthesise(*sat_codec._analyse(sat_codec._validate(top)))
            assert bool((unsaturated.abs() > 65504).any())  # the reconstruction does pass the maximum
    # float16 subnormals only, and an all-zero vector beside them
    tiny = (torch.randint(-3, 4, (8, d), generator=gen).float() * 2.0**-24).to(torch.float16)
    check(codec, tiny)


def test_shapes():
    codec = E8Codec(4.0, seed=5)
    x = sample(2 * 3 * 5, 64, seed=5, dtype=torch.float16).reshape(2, 3, 5, 64)
    check(codec, x)
    check(codec, x[0, 0, 0])  # one vector
    check(codec, x.transpose(0, 1))  # not contiguous
    codes, steps = K.quantize(codec, torch.zeros(0, 64, dtype=torch.float16, device=DEVICE))
    assert codes.shape == (0, 64) and steps.shape == (0,)
    assert K.dequantize(codec, codes, steps).shape == (0, 64)


def test_codes_fit_their_dtype():
    """The int8/int16 choice holds for the worst vectors: one-hot without a rotation (|q_0| = ‖x‖/a)."""
    for d in (64, 128):
        for bits in (1.0, 4.0, 4.5, 6.0, 10.0):
            codec = E8Codec(bits, rotation="none")
            x = torch.eye(d) * torch.logspace(-2, 2, d)[:, None]
            points, _ = codec._analyse(x)
            largest = int((points * 2).abs().max())
            dtype = K.code_dtype(codec, d)
            assert largest <= torch.iinfo(dtype).max, (d, bits, largest, dtype)
            bound = 2 * (math.sqrt(d / (2 * math.pi * math.e)) * 2 ** (bits + 1 / 16) + 1)
            assert largest <= bound


def test_codes_are_the_entropy_coders_points():
    """The kernel's codes are the lattice points the encoder codes; decoding the bitstream gives
    what the dequantize kernel gives."""
    codec = E8Codec(4.0, seed=6)
    x = sample(64, 128, seed=6, dtype=torch.float16)
    codes, steps = K.quantize(codec, x.to(DEVICE))
    points, _ = codec._analyse(codec._validate(x))
    assert torch.equal(K.codes_to_symbols(codes.cpu()), points_to_symbols(points.reshape(64, 16, 8)))
    enc = codec.encode(x)
    assert np.array_equal(enc.step_codes, steps.cpu().numpy().astype(np.int32))
    decoded = codec.decode(Encoded.from_bytes(enc.to_bytes()))
    assert torch.equal(bits_of(decoded), bits_of(K.dequantize(codec, codes, steps).cpu()))


def test_references_need_no_triton_and_match():
    codec = E8Codec(5.0, seed=7)
    x = sample(40, 64, seed=7, dtype=torch.bfloat16)
    codes, steps = K.reference_quantize(codec, x)
    assert torch.equal(bits_of(K.reference_dequantize(codec, codes, steps, torch.bfloat16)), bits_of(codec.quantize(x)))


def test_bad_inputs_rejected():
    x = torch.randn(4, 64, device=DEVICE)
    with pytest.raises(InputError, match="per-vector"):
        K.quantize(E8Codec(4.0, scale="tensor"), x)
    with pytest.raises(InputError, match="power-of-two"):
        K.quantize(E8Codec(4.0, rotation="none"), torch.randn(4, 24, device=DEVICE))
    with pytest.raises(InputError, match="dtype"):
        K.quantize(E8Codec(4.0), x.double())
    with pytest.raises(InputError, match="E8Codec"):
        K.quantize("codec", x)
    codes, steps = K.quantize(E8Codec(4.0), x)
    with pytest.raises(InputError, match="do not match"):
        K.dequantize(E8Codec(4.0), codes, steps[:2])
    with pytest.raises(InputError, match="dtype"):
        K.dequantize(E8Codec(4.0), codes, steps, torch.float64)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_torch_codec_matches_cpu_codec():
    """The codec's own torch path gives the same bits on CUDA as on the CPU (and as the kernels)."""
    codec = E8Codec(4.0, seed=8)
    x = sample(4096, 128, seed=8, dtype=torch.float16)
    points_cpu, codes_cpu = codec._analyse(codec._validate(x))
    points_gpu, codes_gpu = codec._analyse(codec._validate(x.cuda()))
    assert torch.equal(points_gpu.cpu(), points_cpu) and torch.equal(codes_gpu.cpu(), codes_cpu)
    assert torch.equal(bits_of(codec.quantize(x.cuda()).cpu()), bits_of(codec.quantize(x)))


def test_kernels_refuse_tensors_they_cannot_take():
    """A compiled (not interpreted) kernel and a CPU tensor: a clear error, not Triton's."""
    from lqlib.kernels import check_kernel_device

    with pytest.raises(InputError, match="CUDA tensors"):
        check_kernel_device(torch.zeros(8), object())
    if DEVICE == "cpu":  # the interpreter takes CPU tensors
        check_kernel_device(torch.zeros(8), K._kernels().e8_quantize_kernel)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_large_sample_on_the_gpu():
    for d in (64, 128):
        for dtype in (torch.float16, torch.bfloat16, torch.float32):
            check(E8Codec(4.0, seed=d), sample(20_000, d, seed=d, dtype=dtype))


@pytest.mark.slow
def test_step_codes_at_their_boundaries():
    """Sums of squares within float32 rounding of each step-code boundary (the kernel's float32
    estimate cannot tell the side, so the program recomputes in float64), among ordinary vectors."""
    from lqlib.core.steps import code_constants

    d, bits = 64, 4.0
    codec = E8Codec(bits, rotation="none", seed=11)
    _, taus = code_constants(bits, d)
    rows = []
    for e in (-3, 0, 5):
        for tau in (0.5, *taus):
            c = math.sqrt(tau * 2.0**e / d)
            for rel in (-3e-7, 0.0, 3e-7):
                rows.append(torch.full((d,), c * (1 + rel), dtype=torch.float64))
    x = torch.stack(rows)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        xs = x.to(dtype)
        s = (xs.double() ** 2).sum(-1)
        assert (s > 0).all()
        check(codec, xs)
        check(codec, torch.cat([sample(40, d, seed=12, dtype=dtype), xs]))  # fast and exact path in one program


@triton.jit
def _e8_codes_kernel(x_ptr, out_ptr, B: tl.constexpr):
    """(n, 8) float32 → the kernels' E8 codes 2·p (n, 8) int32 (low 16 bits), B blocks per program."""
    offs = (tl.program_id(0) * B + tl.arange(0, B))[None, :, None] * 8 + tl.arange(0, 8)[None, None, :]
    tl.store(out_ptr + offs, _nearest_e8_codes(tl.load(x_ptr + offs)))


@pytest.mark.slow
def test_nearest_e8_adversarial():
    """The kernel's E8 rounding against :func:`lqlib.core.lattices.nearest_e8` on blocks built for its
    tie rules: equal largest errors, exact halves, integers (cosets at equal distance), tiny and
    negative values whose x - 1/2 is not exact in float32, signed zeros."""
    from lqlib.core.lattices import nearest_e8

    gen = torch.Generator().manual_seed(13)
    n = 512
    parts = [
        torch.randint(-6, 7, (n, 8), generator=gen).float() / 4,  # quarters: ties everywhere
        torch.randint(-6, 7, (n, 8), generator=gen).float() / 2,  # halves and integers
        (torch.rand(n, 8, generator=gen) - 0.5) * 2.0**-20,  # tiny: x - 1/2 rounds
        -(torch.rand(n, 8, generator=gen) + 0.5) * torch.randint(1, 5, (n, 1), generator=gen).float(),  # negative
        torch.randn(n, 8, generator=gen) * 20,
    ]
    x = torch.cat(parts)
    x[::7, 3] = -0.0
    x[1::7] = torch.nextafter(x[1::7], torch.full_like(x[1::7], 100.0))  # one ulp off the ties
    x = x.contiguous()
    out = torch.empty(x.shape, dtype=torch.int32, device=DEVICE)
    _e8_codes_kernel[(x.shape[0] // 64,)](x.to(DEVICE), out, B=64)
    got = out.cpu().to(torch.int16)  # the codes are defined modulo 2^16 (stored as int8 or int16)
    ref = (nearest_e8(x) * 2).to(torch.int16)
    assert torch.equal(got, ref), (got != ref).any(-1).sum()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_dequantize_saturates_like_the_codec(dtype):
    """Codes and step codes whose values pass the dtype's range (forged, or near its maximum): the kernel
    saturates to ± the largest finite value, bit for bit the codec's reconstruction; never ±Inf. Step
    codes over the whole stored range [-800, 800] (tiny values round to subnormals or zero alike).
    float16 saturates from step codes of about 80; bfloat16 and float32 cannot be reached by int16
    codes (|2·p| < 2^15, steps at most 2^100): their largest values are checked against the codec."""
    gen = torch.Generator().manual_seed(21)
    d, n = 64, 192
    limit = torch.finfo(dtype).max
    wide = dtype != torch.float16
    for rotation in ("rht", "none"):
        codec = E8Codec(4.0, rotation=rotation, seed=4)
        top = 2**15 - 1 if wide else 127
        codes = torch.randint(-top, top + 1, (n, d), generator=gen, dtype=torch.int16 if wide else torch.int8)
        codes[: n // 4] = top  # every coordinate at its largest: the transform's largest outputs
        steps = torch.randint(-800, 801, (n,), generator=gen, dtype=torch.int16)
        near = (760, 800) if wide else (40, 120)
        steps[: n // 2] = torch.randint(near[0], near[1] + 1, (n // 2,), generator=gen).to(torch.int16)
        steps[0], steps[1] = 800, -800
        y = K.dequantize(codec, codes.to(DEVICE), steps.to(DEVICE), dtype).cpu()
        ref = K.reference_dequantize(codec, codes, steps, dtype)
        assert torch.equal(bits_of(y), bits_of(ref))
        assert bool(torch.isfinite(y).all()) and bool((y.abs() < limit).any())
        assert bool((y.abs() == limit).any()) != wide  # float16: both sides of the limit
        # the same as rounding the unsaturated float32 reconstruction after clamping it
        unsaturated = codec._synthesise(codes.float() * 0.5, steps.to(torch.int32)[:, None])
        assert torch.equal(bits_of(ref), bits_of(saturate(unsaturated, dtype)))
        assert bool(torch.isinf(unsaturated.to(dtype)).any()) != wide  # what saturation prevents
