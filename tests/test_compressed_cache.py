"""The compressed KV cache: same numbers as the in-loop path, real bytes, generate(), clear errors."""

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import lqlib
from lqlib import E8Codec, Encoded
from lqlib.cache.compressed import CompressedKVCache, CompressedKVLayer
from lqlib.cache.quantized import QuantizeDequantizeCache
from lqlib.evaluation.corpus import load_corpus
from lqlib.evaluation.perplexity import perplexity, token_windows


@pytest.fixture(scope="module")
def windows(default_model):
    return token_windows(default_model.tokenizer, load_corpus().text, window=192, max_windows=2)


@pytest.mark.model
def test_same_perplexity_as_the_in_loop_path(default_model, windows):
    """Single forward and chunked (prefill + steps): the same NLL as the quantize-dequantize cache.

    Only what is exact is compared: each path against the other under the same feeding. Chunked
    against one-pass feeding is not compared: the model's last bits differ between the two, and the
    quantizer turns such differences into other lattice points (Paper II's chapter measures that).
    """
    ids, labels = windows
    model, config = default_model.model, default_model.config
    in_loop = perplexity(
        model, ids, labels, lambda: QuantizeDequantizeCache(E8Codec(4.0).quantize, config), progress=False
    )
    real = perplexity(model, ids, labels, lambda: CompressedKVCache(config, 4.0, page_size=32), progress=False)
    assert real.nll == in_loop.nll
    chunked_loop = perplexity(
        model,
        ids,
        labels,
        lambda: QuantizeDequantizeCache(E8Codec(4.0).quantize, config),
        chunk_size=48,
        progress=False,
    )
    chunked_real = perplexity(
        model, ids, labels, lambda: CompressedKVCache(config, 4.0, page_size=32), chunk_size=48, progress=False
    )
    assert chunked_real.nll == chunked_loop.nll


@pytest.mark.model
def test_real_bytes_and_no_resident_copy(default_model, windows):
    config = default_model.config
    cache = CompressedKVCache(config, 4.0, page_size=64)
    with torch.no_grad():
        default_model.model(windows[0][:1, :150], cache=cache, use_cache=True)
    layer = cache.layers[0]
    assert len(layer.pages) == 2 and layer.key_tail.shape[-2] == 150 - 128
    pages = sum(len(s) for l in cache.layers for p in l.pages for s in p)
    tail = sum(2 * l.key_tail.numel() * 4 for l in cache.layers)
    assert cache.nbytes() == pages + tail
    # every page is a self-contained lqlib bitstream whose rate the codec accounts for
    assert all(len(p) == 1 for p in layer.pages)  # keys and values at one rate: one bitstream per page
    page = Encoded.from_bytes(layer.pages[0][0])
    assert page.shape == (2, 1, 3, 64, 64) and len(layer.pages[0][0]) == page.nbytes()
    # no tensor of the sealed history stays on the layer
    tensors = [v for v in vars(layer).values() if isinstance(v, torch.Tensor)]
    assert sum(t.shape[-2] for t in tensors) == 2 * (150 - 128)


@pytest.mark.model
def test_four_bits_is_at_least_3_7x_smaller_than_fp16(default_model, windows):
    config = default_model.config
    cache = CompressedKVCache(config, 4.0, page_size=64)
    with torch.no_grad():
        default_model.model(windows[0][:1, :192], cache=cache, use_cache=True)
    fp16 = 2 * 30 * 3 * 64 * 192 * 2
    assert fp16 / cache.nbytes() >= 3.7, fp16 / cache.nbytes()


@pytest.mark.model
def test_generate_greedy_sampling_and_batches(default_model):
    model, tok, config = default_model.model, default_model.tokenizer, default_model.config
    prompt = tok("The capital of France is", return_tensors="pt")
    greedy = model.generate(
        **prompt, max_new_tokens=12, do_sample=False, cache=CompressedKVCache(config, 6.0, page_size=4)
    )
    reference = model.generate(**prompt, max_new_tokens=12, do_sample=False)
    assert greedy.shape == reference.shape and "Paris" in tok.decode(greedy[0])
    torch.manual_seed(0)
    sampled = model.generate(
        **prompt, max_new_tokens=8, do_sample=True, cache=CompressedKVCache(config, 4.0, page_size=4)
    )
    assert sampled.shape == (1, prompt.input_ids.shape[1] + 8)
    tok.padding_side = "left"
    batch = tok(["The capital of France is", "One, two, three,"], return_tensors="pt", padding=True)
    out = model.generate(**batch, max_new_tokens=6, do_sample=False, cache=CompressedKVCache(config, 6.0, page_size=4))
    single = model.generate(
        **tok("One, two, three,", return_tensors="pt"),
        max_new_tokens=6,
        do_sample=False,
        cache=CompressedKVCache(config, 6.0, page_size=4),
    )
    assert out.shape[0] == 2 and tok.decode(out[1, -6:]) == tok.decode(single[0, -6:])


@pytest.mark.model
def test_unsupported_generation_modes_are_clear_errors(default_model):
    model, tok, config = default_model.model, default_model.tokenizer, default_model.config
    prompt = tok("Hello", return_tensors="pt")
    with pytest.raises(NotImplementedError, match="beam search|num_return_sequences"):
        model.generate(**prompt, max_new_tokens=3, num_beams=2, cache=CompressedKVCache(config, 4.0))
    layer = CompressedKVLayer(E8Codec(4.0))
    with pytest.raises(NotImplementedError, match="crop"):
        layer.crop(-1)


def test_recent_window_is_read_at_full_precision():
    layer = CompressedKVLayer(E8Codec(4.0), page_size=4, recent_window=3)
    k, v = torch.randn(2, 3, 9, 64), torch.randn(2, 3, 9, 64)
    keys, values = layer.update(k, v)
    assert len(layer.pages) == 1  # 9 - 3 = 6 >= 4: one page sealed, 5 tokens stay in the tail
    codec = E8Codec(4.0)
    assert torch.equal(keys[..., 6:, :], k[..., 6:, :])  # recent window: exact
    assert torch.equal(keys[..., :6, :], codec.quantize(k[..., :6, :]))  # the rest: through the codec
    assert torch.equal(values[..., :4, :], codec.quantize(v[..., :4, :]))
    keys2, _ = layer.update(torch.randn(2, 3, 1, 64), torch.randn(2, 3, 1, 64))
    assert keys2.shape[-2] == 10 and torch.equal(keys2[..., :6, :], keys[..., :6, :])


def test_bad_inputs_are_clear_errors():
    layer = CompressedKVLayer(E8Codec(4.0))
    bad = torch.randn(1, 2, 5, 64)
    bad[0, 1, 2, 3] = float("nan")
    with pytest.raises(lqlib.InputError, match="NaN"):
        layer.update(bad, torch.randn(1, 2, 5, 64))
    with pytest.raises(lqlib.InputError, match="power-of-two"):
        CompressedKVLayer(E8Codec(4.0)).update(torch.randn(1, 2, 3, 24), torch.randn(1, 2, 3, 24))
    ok = CompressedKVLayer(E8Codec(4.0))
    ok.update(torch.randn(1, 2, 3, 64), torch.randn(1, 2, 3, 64))
    with pytest.raises(lqlib.InputError, match="holds torch.float32"):
        ok.update(torch.randn(1, 2, 1, 64, dtype=torch.float64), torch.randn(1, 2, 1, 64, dtype=torch.float64))
    with pytest.raises(lqlib.InputError, match="continue"):
        ok.update(torch.randn(2, 2, 1, 64), torch.randn(2, 2, 1, 64))
    with pytest.raises(lqlib.InputError, match="share"):
        CompressedKVLayer(E8Codec(4.0)).update(torch.randn(1, 2, 3, 64), torch.randn(1, 2, 4, 64))
    config = LlamaConfig(num_hidden_layers=2, layer_types=["sliding_attention", "full_attention"])
    with pytest.raises(lqlib.InputError, match="full-attention"):
        CompressedKVCache(config)


def test_gqa_random_model_round_trip():
    """A random GQA Llama (8 query heads, 2 KV heads, head dim 32): compressed cache == in-loop path."""
    config = LlamaConfig(
        vocab_size=97,
        hidden_size=256,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=8,
        num_key_value_heads=2,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    ids = torch.randint(0, 97, (2, 40))
    labels = ids.clone()
    a = perplexity(
        model,
        ids,
        labels,
        lambda: CompressedKVCache(config, 3.0, page_size=16),
        chunk_size=10,
        batch_size=2,
        progress=False,
    )
    b = perplexity(
        model,
        ids,
        labels,
        lambda: QuantizeDequantizeCache(E8Codec(3.0).quantize, config),
        chunk_size=10,
        batch_size=2,
        progress=False,
    )
    assert a.nll == b.nll


def _random_gqa_model(layers: int = 3):
    config = LlamaConfig(
        vocab_size=97,
        hidden_size=256,
        intermediate_size=256,
        num_hidden_layers=layers,
        num_attention_heads=8,
        num_key_value_heads=2,
    )
    torch.manual_seed(0)
    return config, LlamaForCausalLM(config).eval()


def test_bit_schedule_matches_the_in_loop_path_and_its_bytes():
    """Per-layer K/V rates: pages with two bitstreams where K and V differ, one where they agree."""
    config, model = _random_gqa_model()
    schedule = np.array([[5.0, 3.0], [4.0, 4.0], [3.5, 2.5]])
    ids = torch.randint(0, 97, (2, 48))
    a = perplexity(
        model,
        ids,
        ids.clone(),
        lambda: CompressedKVCache(config, schedule, page_size=16),
        chunk_size=12,
        batch_size=2,
        progress=False,
    )
    keys = [E8Codec(k).quantize for k, _ in schedule]
    values = [E8Codec(v).quantize for _, v in schedule]
    b = perplexity(
        model,
        ids,
        ids.clone(),
        lambda: QuantizeDequantizeCache(keys, config, values),
        chunk_size=12,
        batch_size=2,
        progress=False,
    )
    assert a.nll == b.nll
    cache = CompressedKVCache(config, schedule, page_size=16)
    with torch.no_grad():
        model(ids, cache=cache, use_cache=True)
    assert [len(layer.pages[0]) for layer in cache.layers] == [2, 1, 2]
    first = cache.layers[0].pages[0]
    assert Encoded.from_bytes(first[0]).header.bits == 5.0 and Encoded.from_bytes(first[1]).header.bits == 3.0
    with pytest.raises(lqlib.InputError, match="schedule"):
        CompressedKVCache(config, np.full((2, 2), 4.0))


def test_per_channel_key_scales():
    """Keys are divided by their channel scales before coding and multiplied after; bytes counted."""
    scales = torch.rand(2, 64) + 0.5
    layer = CompressedKVLayer(E8Codec(4.0), page_size=4, key_scales=scales)
    k, v = torch.randn(1, 2, 9, 64), torch.randn(1, 2, 9, 64)
    keys, values = layer.update(k, v)
    s16 = scales.to(torch.float16).float()[:, None, :]
    assert torch.equal(keys, E8Codec(4.0).quantize(k / s16) * s16)
    assert torch.equal(values, E8Codec(4.0).quantize(v))
    assert layer.nbytes() == sum(len(x) for p in layer.pages for x in p) + 2 * k[..., 8:, :].numel() * 4 + 2 * 128
    with pytest.raises(lqlib.InputError, match="key_scales"):
        CompressedKVLayer(E8Codec(4.0), key_scales=-scales)
    with pytest.raises(lqlib.InputError, match="key_scales"):
        CompressedKVLayer(E8Codec(4.0), key_scales=torch.ones(3, 64)).update(k, v)


# ------------------------------------------------------------------ transactional updates, clear errors


def _layer_state(layer: CompressedKVLayer) -> tuple:
    tails = (layer.key_tail.clone(), layer.value_tail.clone()) if layer.key_tail is not None else (None, None)
    return layer.n_tokens, [tuple(p) for p in layer.pages], tails, layer.is_initialized


def _same_state(a: tuple, b: tuple) -> bool:
    (na, pa, (ka, va), ia), (nb, pb, (kb, vb), ib) = a, b
    tails = (ka is None and kb is None) or (torch.equal(ka, kb) and torch.equal(va, vb))
    return na == nb and pa == pb and ia == ib and tails


@pytest.mark.parametrize("recent_window", [0, 3])
@pytest.mark.parametrize("scaled", [False, True])
def test_a_failed_update_leaves_no_trace(recent_window, scaled):
    """A NaN token, an out-of-range token and a wrong shape, each between valid updates: the failing update
    raises and changes nothing; afterwards the layer holds the same bytes and state, and returns the same
    keys and values, as a layer that never saw the bad token (before, the count and tail had advanced and
    every later update raised again)."""
    gen = torch.Generator().manual_seed(0)
    scales = torch.rand(2, 64, generator=gen) + 0.5 if scaled else None
    steps = [torch.randn(2, 1, 2, n, 64, generator=gen) for n in (5, 1, 3, 1, 4, 1)]
    nan = torch.randn(2, 1, 2, 1, 64, generator=gen)
    nan[0, 0, 1, 0, 7] = float("nan")
    huge = torch.full((2, 1, 2, 2, 64), 1e35)
    bad_inputs = [nan, huge, torch.randn(2, 1, 3, 1, 64)]

    def make():
        return CompressedKVLayer(E8Codec(4.0), page_size=4, recent_window=recent_window, key_scales=scales)

    clean, dirty = make(), make()
    with pytest.raises(lqlib.InputError):  # a bad first update: the layer stays uninitialised
        dirty.update(*nan)
    assert not dirty.is_initialized and dirty.n_tokens == 0
    for i, (k, v) in enumerate(steps):
        expected = clean.update(k, v)
        got = dirty.update(k, v)
        assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
        assert _same_state(_layer_state(dirty), _layer_state(clean))
        before = _layer_state(dirty)
        with pytest.raises(lqlib.InputError):
            dirty.update(*bad_inputs[i % len(bad_inputs)])
        assert _same_state(_layer_state(dirty), before)
    assert dirty.nbytes() == clean.nbytes() and len(dirty.pages) >= 2


def test_float16_keys_at_the_top_come_back_finite():
    """float16 keys of 65000 (the issue's case): the cache returns finite keys; with key scales the product
    after decoding saturates too, and keys that their scales would push past float16 are refused clearly."""
    k = torch.full((1, 2, 5, 64), 65000.0, dtype=torch.float16)
    k[..., 1::2] = -65000.0
    v = torch.randn(1, 2, 5, 64).half()
    keys, values = CompressedKVLayer(E8Codec(4.0), page_size=4).update(k, v)
    assert bool(torch.isfinite(keys).all()) and bool(torch.isfinite(values).all())
    scaled = CompressedKVLayer(E8Codec(4.0), page_size=4, key_scales=torch.full((2, 64), 2.0))
    keys, _ = scaled.update(k, v)
    assert bool(torch.isfinite(keys).all()) and bool((keys.abs() == 65504).any())
    shrinking = CompressedKVLayer(E8Codec(4.0), page_size=4, key_scales=torch.full((2, 64), 0.5))
    with pytest.raises(lqlib.InputError, match="key_scales exceed"):
        shrinking.update(k, v)
    assert shrinking.n_tokens == 0


def test_key_scales_are_checked_as_float16():
    """1e-8 and 1e6 pass a float check but become 0 and Inf as float16: refused at construction, saying why."""
    for bad in (1e-8, 1e-6, 1e6, float("nan"), float("inf"), -1.0, 0.0):
        scales = torch.ones(2, 64)
        scales[1, 3] = bad
        with pytest.raises(lqlib.InputError, match="float16|key_scales"):
            CompressedKVLayer(E8Codec(4.0), key_scales=scales)
    for bad in ([[1.0] * 64] * 2, torch.ones(2, 64, dtype=torch.complex64), torch.ones(2, 64, device="meta")):
        with pytest.raises(lqlib.InputError, match="key_scales"):
            CompressedKVLayer(E8Codec(4.0), key_scales=bad)
    CompressedKVLayer(E8Codec(4.0), key_scales=torch.full((2, 64), 6.2e-5))  # float16's smallest normal: fine


def test_misuse_of_the_cache_gets_lqlib_errors():
    config, _ = _random_gqa_model(layers=2)
    for kwargs in ({"page_size": 2.5}, {"page_size": 0}, {"recent_window": 1.5}, {"page_size": True}):
        with pytest.raises(lqlib.InputError, match="page_size"):
            CompressedKVCache(config, **kwargs)
    with pytest.raises(lqlib.InputError, match="bits"):
        CompressedKVCache(config, bits="four")
    with pytest.raises(lqlib.InputError, match="config"):
        CompressedKVCache({"num_hidden_layers": 2})
    with pytest.raises(lqlib.InputError, match="E8Codec"):
        CompressedKVLayer("codec")
    cache = CompressedKVCache(config, 4.0, page_size=4)
    k = torch.randn(1, 2, 3, 32)
    with pytest.raises(lqlib.InputError, match=r"layer_idx must be an integer in \[0, 2\)"):
        cache.update(k, k, 5)
    with pytest.raises(lqlib.InputError, match="layer_idx"):
        cache.update(k, k, -1)
    cache.update(k, k, 1)
    meta = torch.empty(1, 2, 1, 32, device="meta")
    with pytest.raises(lqlib.InputError):
        cache.update(meta, meta, 1)
    assert cache.layers[1].n_tokens == 3


def test_sampling_with_several_return_sequences_works():
    """generate repeats the prompt before the cache fills, so num_return_sequences > 1 works (the old
    NotImplementedError text said otherwise); only a filled cache cannot repeat its rows."""
    config, model = _random_gqa_model(layers=2)
    ids = torch.randint(0, 97, (1, 6), generator=torch.Generator().manual_seed(1))
    torch.manual_seed(0)
    out = model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        do_sample=True,
        num_return_sequences=3,
        max_new_tokens=5,
        cache=CompressedKVCache(config, 4.0, page_size=4),
        pad_token_id=0,
    )
    assert out.shape == (3, 11)
    layer = CompressedKVLayer(E8Codec(4.0))
    with pytest.raises(NotImplementedError) as refused:
        layer.batch_repeat_interleave(2)
    message = str(refused.value)
    assert "num_return_sequences > 1" not in message and "filled cache" in message
