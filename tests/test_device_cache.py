"""The device-resident E8 cache: the CPU cache's numbers, the codec's codes, real bytes, clear errors.

Runs the Triton kernels on CPU tensors in Triton's interpreter (conftest sets TRITON_INTERPRET=1
without CUDA), or on the GPU where there is one (models and inputs on ``DEVICE``). Tolerances: prefill logits are
bit for bit those of
:class:`lqlib.cache.compressed.CompressedKVCache` (the dequantize kernel is the codec's bits and
both run SDPA); decode logits differ by the decode-attention kernel's float16 dot products
(rotated query and codes in float16, float32 accumulation; float32 models round the query to
float16), about float16 precision on the attention output (relative 5e-4): at most 5e-3 on logits of
magnitude about 1 (observed at most 2.4e-3 over five prompts in either dtype; attending to one token
too few moves them by 0.4).
"""

import numpy as np
import pytest
import torch
from transformers import DynamicCache, LlamaConfig

import lqlib
from lqlib import E8Codec
from lqlib.cache.compressed import CompressedKVCache, CompressedKVLayer
from lqlib.cache.device import (
    ATTENTION,
    DeviceKVCache,
    DeviceKVLayer,
    PagedHistory,
    _Graph,
    cache_kwarg,
)
from lqlib.kernels import reference_quantize

from ._llama import tiny_llama

pytest.importorskip("triton")

DECODE_ATOL = 5e-3
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def dev(*tensors: torch.Tensor):
    """The tensors on DEVICE (one tensor, or a tuple)."""
    moved = tuple(t.to(DEVICE) for t in tensors)
    return moved[0] if len(moved) == 1 else moved


def greedy(model, cache, impl: str, ids: torch.Tensor, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Prefill ``ids``, then ``steps`` greedy steps.

    Returns (last-position logits (steps + 1, B, V) float32, tokens (B, steps))."""
    model.set_attn_implementation(impl)
    kw = cache_kwarg(model)
    ids = ids.to(model.device)
    logits, tokens = [], []
    with torch.inference_mode():
        out = model(ids, **{kw: cache}).logits[:, -1]
        for _ in range(steps):
            logits.append(out.float())
            tok = out.argmax(-1, keepdim=True)
            tokens.append(tok)
            out = model(tok, **{kw: cache}).logits[:, -1]
    logits.append(out.float())
    return torch.stack(logits).cpu(), (torch.cat(tokens, 1) if tokens else ids[:, :0]).cpu()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.slow
def test_prefill_and_greedy_decode_match_the_cpu_cache(dtype):
    config, model = tiny_llama(dtype=dtype)
    ids = torch.randint(0, 97, (2, 20), generator=torch.Generator().manual_seed(1))
    ref_logits, ref_tokens = greedy(model, CompressedKVCache(config, 4.0, page_size=8, recent_window=0), "sdpa", ids, 4)
    cache = DeviceKVCache(config, 4.0)
    logits, tokens = greedy(model, cache, ATTENTION, ids, 4)
    assert torch.equal(logits[0], ref_logits[0])  # prefill: the same dequantized keys/values, the same SDPA
    diff = (logits[1:] - ref_logits[1:]).abs().max()
    assert 0 < diff <= DECODE_ATOL, diff  # decode: the fused kernel over the codes (not a dequantized copy)
    assert torch.equal(tokens, ref_tokens)
    assert cache.get_seq_length() == 24 and all(layer.n_tokens == 24 for layer in cache.layers)


def test_stored_codes_are_the_codecs_points_and_dequantize_to_the_cpu_cache():
    codec = E8Codec(4.0)
    layer, cpu = DeviceKVLayer(codec, page_size=16), CompressedKVLayer(codec, page_size=8)
    gen = torch.Generator().manual_seed(2)
    chunks = [torch.randn(2, 2, 2, t, 64, generator=gen) * 3 for t in (11, 1, 1, 5, 1)]
    for kv in chunks:
        markers = layer.update(*dev(kv[0], kv[1]))
        keys, values = cpu.update(kv[0], kv[1])
    assert all(isinstance(m, PagedHistory) and m.layer is layer for m in markers)
    assert markers[0].shape == (2, 2, 19, 64) and (markers[0].part, markers[1].part) == (0, 1)
    everything = torch.cat(chunks, dim=-2)  # (2, B, Hkv, 19, d)
    codes, steps = reference_quantize(codec, everything)
    assert torch.equal(layer.codes[..., :19, :].cpu(), codes) and layer.codes.dtype == torch.int8
    assert torch.equal(layer.steps[..., :19].cpu(), steps) and layer.steps.dtype == torch.int16
    dk, dv = layer.dequantized()
    assert torch.equal(dk.cpu(), keys) and torch.equal(dv.cpu(), values)  # bit for bit the CPU cache's history
    assert layer.position.item() == 19 and layer.lengths.tolist() == [19, 19]


@pytest.mark.slow
def test_bit_schedule_and_key_scales_match_the_cpu_cache():
    """Keys and values at different rates (two quantize calls per update) and per-channel key scales."""
    config, model = tiny_llama()
    schedule = np.array([[4.5, 3.0], [3.5, 3.5]])
    scales = dev(torch.rand(2, 2, 64, generator=torch.Generator().manual_seed(3)) + 0.5)
    ids = torch.randint(0, 97, (1, 17), generator=torch.Generator().manual_seed(4))
    ref_logits, ref_tokens = greedy(
        model, CompressedKVCache(config, schedule, page_size=8, key_scales=scales), "sdpa", ids, 3
    )
    cache = DeviceKVCache(config, schedule, key_scales=scales)
    logits, tokens = greedy(model, cache, ATTENTION, ids, 3)
    assert not cache.layers[0].joint and cache.layers[1].joint
    assert torch.equal(logits[0], ref_logits[0])
    assert (logits - ref_logits).abs().max() <= DECODE_ATOL
    assert torch.equal(tokens, ref_tokens)
    # the stored keys are the codec's points of keys / float16 scales
    layer, s16 = (
        DeviceKVLayer(E8Codec(4.5), E8Codec(3.0), key_scales=scales[0]),
        scales[0].cpu().half().float()[:, None],
    )
    k, v = torch.randn(1, 2, 6, 64), torch.randn(1, 2, 6, 64)
    layer.update(*dev(k, v))
    assert torch.equal(layer.codes[0, ..., :6, :].cpu(), reference_quantize(E8Codec(4.5), k / s16)[0])
    assert torch.equal(layer.codes[1, ..., :6, :].cpu(), reference_quantize(E8Codec(3.0), v)[0])


@pytest.mark.slow
def test_bytes_held_and_capacity_growth():
    config, model = tiny_llama()
    ids = torch.randint(0, 97, (2, 20), generator=torch.Generator().manual_seed(5))
    cache = DeviceKVCache(config, 4.0, page_size=16)
    _, _ = greedy(model, cache, ATTENTION, ids, 0)
    layer = cache.layers[0]
    assert layer.capacity == 32  # 20 tokens rounded up to the page
    per_token = 2 * 2 * 2 * (64 * 1 + 2)  # K and V × batch × KV heads × (int8 codes + int16 step code)
    assert cache.nbytes() == 2 * per_token * 20
    assert cache.allocated_nbytes() == 2 * per_token * 32
    before = layer.codes[..., :20, :].clone()
    ref_logits, _ = greedy(model, CompressedKVCache(config, 4.0, page_size=8), "sdpa", ids, 13)
    cache = DeviceKVCache(config, 4.0, page_size=16)
    logits, _ = greedy(model, cache, ATTENTION, ids, 13)  # 33 tokens: the capacity doubles to 64
    layer = cache.layers[0]
    assert layer.capacity == 64 and cache.nbytes() == 2 * per_token * 33
    assert torch.equal(layer.codes[..., :20, :], before.to(layer.codes.device))
    assert (logits - ref_logits).abs().max() <= DECODE_ATOL
    reserved = DeviceKVCache(config, 4.0, capacity=100, page_size=16)
    greedy(model, reserved, ATTENTION, ids, 1)
    assert reserved.layers[0].capacity == 112
    scaled = DeviceKVLayer(E8Codec(4.0), key_scales=torch.ones(2, 64))
    assert scaled.nbytes() == 2 * 2 * 64  # float16 key scales count even before any token


@pytest.mark.slow
def test_generate_and_two_caches_in_one_process():
    config, model = tiny_llama()
    kw = cache_kwarg(model)
    ids = dev(torch.randint(0, 97, (1, 12), generator=torch.Generator().manual_seed(6)))
    model.set_attn_implementation("sdpa")
    reference = model.generate(ids, max_new_tokens=5, do_sample=False, **{kw: CompressedKVCache(config, 4.0)})
    model.set_attn_implementation(ATTENTION)
    out = model.generate(ids, max_new_tokens=5, do_sample=False, **{kw: DeviceKVCache(config, 4.0)})
    assert torch.equal(out, reference)
    # two caches (different rates) advanced in turn: each sees only its own pages
    alone = {bits: greedy(model, DeviceKVCache(config, bits), ATTENTION, ids, 2)[0] for bits in (4.0, 2.0)}
    caches = {bits: DeviceKVCache(config, bits) for bits in (4.0, 2.0)}
    with torch.inference_mode():
        outs = {bits: [model(ids, **{kw: c}).logits[:, -1]] for bits, c in caches.items()}
        for _ in range(2):
            for bits, c in caches.items():
                outs[bits].append(model(outs[bits][-1].argmax(-1, keepdim=True), **{kw: c}).logits[:, -1])
    for bits in caches:
        assert torch.equal(torch.stack(outs[bits]).cpu(), alone[bits])
    assert not torch.equal(alone[4.0], alone[2.0])


@pytest.mark.slow
def test_cuda_graph_bookkeeping_records_once_and_replays(monkeypatch):
    """The decode step as the CUDA graphs replay it (graphs stood in by a recorder on CPU): one eager
    step per storage address, then one recording, then replays into the same output buffer;
    recorded again after the storage grows; the same numbers as the eager path."""
    recorded = []

    class FakeGraph:  # keeps the function; replay runs it on the recorded buffers, as a CUDA graph would
        def __init__(self, fn, buffers):
            self.fn, self.buffers, self.owner = fn, buffers, None

        def replay(self):
            result = self.fn(*self.buffers)
            if result is not None:  # a graph's output is one buffer, overwritten by every replay
                out = self.owner.output
                self.owner.output = result if out is None else out.copy_(result)

    def record(fn, inputs, key, pool):
        buffers = [x.clone() for x in inputs]
        graph = FakeGraph(fn, buffers)
        graph.owner = _Graph(graph, buffers, None, key)
        recorded.append(key)
        return graph.owner

    monkeypatch.setattr(_Graph, "record", staticmethod(record))
    codec = E8Codec(4.0)
    eager, graphed = DeviceKVLayer(codec, page_size=8), DeviceKVLayer(codec, page_size=8)
    gen = torch.Generator().manual_seed(7)
    prompt = dev(torch.randn(2, 1, 2, 5, 64, generator=gen).half())
    eager.update(*prompt)
    graphed.update(*prompt)
    graphed._graphs_on = True
    for _step in range(6):  # 5 + 6 = 11 tokens: the capacity grows from 8 to 16 at the 9th
        k, v = dev(torch.randn(2, 1, 2, 1, 64, generator=gen).half())
        q = dev(torch.randn(1, 4, 64, generator=gen).half())
        eager.update(k, v)
        graphed.update(k, v)
        a, b = eager.attend_one(q, 0.125), graphed.attend_one(q, 0.125)
        assert torch.equal(a, b)
    assert torch.equal(eager.codes[..., :11, :], graphed.codes[..., :11, :])
    assert graphed.position.item() == 11 and graphed.n_tokens == 11
    # steps 1-3 at capacity 8: eager, record, replay; step 4 grows: eager; 5: record; 6: replay
    assert len(recorded) == 4 and len({k[0] for k in recorded}) == 2


@pytest.mark.slow
def test_unsupported_uses_are_clear_errors():
    config, model = tiny_llama()
    kw = cache_kwarg(model)
    ids = dev(torch.randint(0, 97, (1, 6)))
    model.set_attn_implementation("sdpa")
    with pytest.raises(lqlib.InputError, match=ATTENTION), torch.inference_mode():
        model(ids, **{kw: DeviceKVCache(config, 4.0)})
    model.set_attn_implementation(ATTENTION)
    with pytest.raises(lqlib.InputError, match="DeviceKVCache"), torch.inference_mode():
        model(ids, **{kw: DynamicCache(config=config)})
    with pytest.raises(NotImplementedError, match="beam search|num_return_sequences"):
        model.generate(ids, max_new_tokens=2, num_beams=2, **{kw: DeviceKVCache(config, 4.0)})
    with pytest.raises(NotImplementedError, match="crop"):
        DeviceKVLayer(E8Codec(4.0)).crop(1)
    padded = dev(torch.ones(2, 6, dtype=torch.long))
    padded[0, :2] = 0
    with pytest.raises(NotImplementedError, match="padded"):
        model.generate(
            dev(torch.randint(0, 97, (2, 6))),
            attention_mask=padded,
            max_new_tokens=2,
            do_sample=False,
            **{kw: DeviceKVCache(config, 4.0)},
        )
    with pytest.raises(lqlib.InputError, match="int8"):
        DeviceKVLayer(E8Codec(6.0)).update(*dev(torch.randn(1, 2, 3, 64), torch.randn(1, 2, 3, 64)))
    with pytest.raises(lqlib.InputError, match="power-of-two"):
        DeviceKVLayer(E8Codec(4.0)).update(*dev(torch.randn(1, 2, 3, 24), torch.randn(1, 2, 3, 24)))
    ok = DeviceKVLayer(E8Codec(4.0))
    ok.update(*dev(torch.randn(1, 2, 3, 64), torch.randn(1, 2, 3, 64)))
    with pytest.raises(lqlib.InputError, match="holds torch.float32"):
        ok.update(*dev(torch.randn(1, 2, 1, 64).half(), torch.randn(1, 2, 1, 64).half()))
    with pytest.raises(lqlib.InputError, match="continue"):
        ok.update(*dev(torch.randn(2, 2, 1, 64), torch.randn(2, 2, 1, 64)))
    with pytest.raises(lqlib.InputError, match="float64|dtype"):
        DeviceKVLayer(E8Codec(4.0)).update(
            *dev(torch.randn(1, 2, 3, 64, dtype=torch.float64), torch.randn(1, 2, 3, 64, dtype=torch.float64))
        )
    with pytest.raises(lqlib.InputError, match="key_scales"):
        DeviceKVLayer(E8Codec(4.0), key_scales=torch.ones(3, 64)).update(
            *dev(torch.randn(1, 2, 3, 64), torch.randn(1, 2, 3, 64))
        )
    with pytest.raises(lqlib.InputError, match="torch operation|attn_implementation"):
        ok.update(*dev(torch.randn(1, 2, 1, 64), torch.randn(1, 2, 1, 64)))[0] + 1
    with pytest.raises(lqlib.InputError, match="full-attention"):
        DeviceKVCache(LlamaConfig(num_hidden_layers=2, layer_types=["sliding_attention", "full_attention"]))


@pytest.mark.model
def test_default_model_generates_the_cpu_caches_tokens(default_model):
    """SmolLM2-135M (30 layers, 9 query heads, 3 KV heads): the same greedy tokens (slow in the interpreter)."""
    model, tok, config = default_model.model, default_model.tokenizer, default_model.config
    kw = cache_kwarg(model)
    prompt = tok("The capital of France is", return_tensors="pt")
    previous = model.config._attn_implementation
    model.to(DEVICE)
    prompt = prompt.to(DEVICE)
    try:
        model.set_attn_implementation("sdpa")
        reference = model.generate(**prompt, max_new_tokens=3, do_sample=False, **{kw: CompressedKVCache(config, 4.0)})
        model.set_attn_implementation(ATTENTION)
        out = model.generate(**prompt, max_new_tokens=3, do_sample=False, **{kw: DeviceKVCache(config, 4.0)})
    finally:
        model.set_attn_implementation(previous)
        model.to("cpu")
    assert torch.equal(out, reference)
