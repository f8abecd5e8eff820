"""CompressedKVCache with a calibrated channel profile: the same numbers as its in-loop twin, real bytes,
sink tokens, pre-RoPE keys, and the old configuration unchanged."""

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from lqlib import InputError
from lqlib.cache.channel import ChannelProfile, ChannelQuantizer, held_bytes
from lqlib.cache.compressed import CompressedKVCache
from lqlib.cache.invariances import rotary_frame
from lqlib.cache.quantized import QuantizeDequantizeCache
from lqlib.coding.channel_codec import ChannelCodec, ChannelTables, decode_page

HEADS, DIM = 2, 32


def tiny_config(layers: int = 2) -> LlamaConfig:
    return LlamaConfig(
        num_hidden_layers=layers,
        hidden_size=64,
        intermediate_size=128,
        num_attention_heads=4,
        num_key_value_heads=HEADS,
        head_dim=DIM,
        vocab_size=97,
    )


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    config = tiny_config()
    return config, LlamaForCausalLM(config).eval()


def random_tables(seed: int) -> ChannelTables:
    rng = np.random.default_rng(seed)
    return ChannelTables.from_statistics(
        rng.normal(size=(HEADS, DIM)), rng.uniform(0.3, 2.0, (HEADS, DIM)), rng.uniform(2.0, 16.0, (HEADS, DIM))
    )


def profile(config, sink: int = 2, pre_rope: bool = True) -> ChannelProfile:
    tables = tuple((random_tables(2 * i), random_tables(2 * i + 1)) for i in range(config.num_hidden_layers))
    return ChannelProfile(tables, rotary_frame(config) if pre_rope else None, sink)


def in_loop(config, prof):
    keys, values = prof.quantizers()
    return QuantizeDequantizeCache(keys, config, values)


def chunked_logits(model, ids, cache, chunk):
    with torch.no_grad():
        return torch.cat(
            [model(ids[:, s : s + chunk], cache=cache, use_cache=True).logits for s in range(0, ids.shape[1], chunk)], 1
        )


@pytest.mark.parametrize(
    "sink,pre_rope,chunk",
    [(0, False, None), (2, True, None), (5, True, 17), (2, True, 64), pytest.param(3, True, 1, marks=pytest.mark.slow)],
)
def test_cache_reads_what_the_in_loop_twin_gives(tiny, sink, pre_rope, chunk):
    """One pass or chunk by chunk (sinks and pages split across chunks): identical logits."""
    config, model = tiny
    prof = profile(config, sink, pre_rope)
    ids = torch.randint(0, 97, (2, 80 if chunk == 1 else 130), generator=torch.Generator().manual_seed(1))
    chunk = chunk or ids.shape[1]
    real = chunked_logits(model, ids, CompressedKVCache(config, page_size=32, profile=prof), chunk)
    twin = chunked_logits(model, ids, in_loop(config, prof), chunk)
    assert torch.equal(real, twin)


@pytest.mark.slow
def test_generate_matches_the_twin(tiny):
    config, model = tiny
    prof = profile(config)
    ids = torch.randint(0, 97, (1, 12), generator=torch.Generator().manual_seed(2))
    out = model.generate(
        ids, max_new_tokens=25, do_sample=False, cache=CompressedKVCache(config, page_size=8, profile=prof)
    )
    twin = model.generate(ids, max_new_tokens=25, do_sample=False, cache=in_loop(config, prof))
    assert torch.equal(out, twin)


def test_bytes_held_and_page_contents(tiny):
    config, model = tiny
    prof = profile(config, sink=3)
    cache = CompressedKVCache(config, page_size=32, profile=prof)
    ids = torch.randint(0, 97, (1, 100), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        model(ids, cache=cache, use_cache=True)
    layer = cache.layers[1]
    assert layer.sink_keys.shape[-2] == 3 and layer.sink_keys.dtype == torch.float16
    assert len(layer.pages) == 3 and layer.key_tail.shape[-2] == 100 - 96  # pages stay aligned to positions
    pages = sum(len(p[0]) for p in layer.pages)
    tail = 2 * layer.key_tail.numel() * 4
    sinks = 2 * 3 * HEADS * DIM * 2
    tables = prof.tables[1][0].nbytes() + prof.tables[1][1].nbytes()
    assert layer.nbytes() == pages + tail + sinks + tables
    assert cache.nbytes() == sum(l.nbytes() for l in cache.layers)
    # a page decodes by itself to the codec's quantization of the pre-RoPE keys it holds
    codec_k, codec_v = ChannelCodec(prof.tables[1][0]), ChannelCodec(prof.tables[1][1])
    keys, values = decode_page(codec_k, codec_v, layer.pages[0][0])
    assert keys.shape == (1, HEADS, 32 - 3, DIM) and values.shape == keys.shape  # page 0 after the sinks
    assert decode_page(codec_k, codec_v, layer.pages[1][0])[0].shape == (1, HEADS, 32, DIM)
    # no decoded copy of the sealed history stays on the layer
    tensors = [v for v in vars(layer).values() if isinstance(v, torch.Tensor)]
    assert sum(t.shape[-2] for t in tensors) == 2 * (3 + 100 - 96)
    # the measuring shortcut holds the same bytes
    keys = torch.randn(1, HEADS, 77, DIM, generator=torch.Generator().manual_seed(8))
    values = torch.randn(1, HEADS, 77, DIM, generator=torch.Generator().manual_seed(9))
    fresh = CompressedKVCache(config, page_size=32, profile=prof).layers[1]
    measured = held_bytes(fresh, keys, values)
    assert fresh.n_tokens == 0 and not fresh.pages
    fresh.update(keys, values)
    assert measured == fresh.nbytes()


def test_a_failed_update_leaves_no_sink_tokens_behind(tiny, monkeypatch):
    """Sealing the first page sets the float16 sink tokens before the parent commits; an update that
    fails after that (here: reading the history) leaves the layer as it was, bytes included."""
    config, _ = tiny
    layer = CompressedKVCache(config, page_size=32, profile=profile(config, sink=3)).layers[0]
    gen = torch.Generator().manual_seed(11)
    keys, values = torch.randn(2, 1, HEADS, 40, DIM, generator=gen)
    layer.update(keys[..., :20, :], values[..., :20, :])  # no page yet: no sink tokens
    before = (layer.nbytes(), layer.n_tokens, len(layer.pages))
    assert layer.sink_keys is None

    def fail(*args):
        raise RuntimeError("read failed")

    monkeypatch.setattr(layer, "_read", fail)
    with pytest.raises(RuntimeError, match="read failed"):
        layer.update(keys[..., 20:, :], values[..., 20:, :])  # seals page 0, then fails
    assert layer.sink_keys is None and layer.sink_values is None
    assert (layer.nbytes(), layer.n_tokens, len(layer.pages)) == before
    monkeypatch.undo()
    layer.update(keys[..., 20:, :], values[..., 20:, :])
    assert len(layer.pages) == 1 and layer.sink_keys.shape[-2] == 3


def test_sink_tokens_are_float16_and_the_rest_coded():
    frame = rotary_frame(tiny_config())
    q = ChannelQuantizer(ChannelCodec(random_tables(9)), frame, sink=4)
    x = torch.randn(1, HEADS, 10, DIM, generator=torch.Generator().manual_seed(4))
    y = q(x, 0)
    assert torch.equal(y[..., :4, :], x[..., :4, :].half().float())
    assert torch.equal(y[..., 4:, :], q.coded(x[..., 4:, :], 4))
    # positions are what matter, not the chunking
    assert torch.equal(torch.cat([q(x[..., :3, :], 0), q(x[..., 3:, :], 3)], dim=-2), y)
    assert q(x[..., :0, :], 5).shape[-2] == 0


def test_profile_must_fit_the_model(tiny):
    config, _ = tiny
    prof = profile(tiny_config(layers=3))
    with pytest.raises(InputError):
        CompressedKVCache(config, profile=prof)
    with pytest.raises(InputError):
        ChannelProfile(prof.tables, prof.frame, sink=-1)
    with pytest.raises(InputError):
        CompressedKVCache(config, page_size=4, profile=profile(config, sink=4))


def test_the_old_configuration_is_unchanged(tiny):
    """Without a profile, the cache is the E8 + rANS cache it was (pages are lqlib E8 bitstreams)."""
    config, model = tiny
    cache = CompressedKVCache(config, 4.0, page_size=32)
    with torch.no_grad():
        model(torch.randint(0, 97, (1, 70)), cache=cache, use_cache=True)
    assert cache.profile is None and cache.layers[0].pages[0][0][:4] == b"LQE8"
