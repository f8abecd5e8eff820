"""Perplexity windows, the in-loop quantized cache and KV capture, on the default model."""

import pytest
import torch

from lqlib import E8Codec
from lqlib.cache.quantized import QuantizeDequantizeCache
from lqlib.evaluation.capture import capture_kv
from lqlib.evaluation.corpus import load_corpus
from lqlib.evaluation.perplexity import perplexity, token_windows


class CharTokenizer:
    def __call__(self, text, return_tensors="pt"):
        class Out:
            input_ids = torch.tensor([[ord(c) for c in text]])

        return Out()


def test_token_windows_disjoint_and_strided():
    ids, labels = token_windows(CharTokenizer(), "abcdefghij", window=4)
    assert ids.tolist() == [[97, 98, 99, 100], [101, 102, 103, 104]]
    assert torch.equal(labels, ids)
    ids, labels = token_windows(CharTokenizer(), "abcdefghij", window=4, stride=2, max_windows=3)
    assert ids[:, 0].tolist() == [97, 99, 101]
    # after the first window only the last `stride` tokens are scored
    assert (labels[1:, :2] == -100).all() and torch.equal(labels[1:, 2:], ids[1:, 2:])
    with pytest.raises(ValueError, match="fewer than one window"):
        token_windows(CharTokenizer(), "abc", window=4)
    with pytest.raises(ValueError, match="stride"):
        token_windows(CharTokenizer(), "abcdef", window=4, stride=5)


@pytest.fixture(scope="module")
def windows(default_model):
    return token_windows(default_model.tokenizer, load_corpus().text, window=128, max_windows=2)


@pytest.mark.model
def test_identity_cache_changes_nothing(default_model, windows):
    ids, labels = windows
    plain = perplexity(default_model.model, ids, labels, progress=False)
    same = perplexity(
        default_model.model,
        ids,
        labels,
        lambda: QuantizeDequantizeCache(lambda t: t, default_model.config),
        progress=False,
    )
    assert same.tokens == plain.tokens == 2 * 127
    assert same.nll == pytest.approx(plain.nll, rel=1e-6)
    assert 1 < plain.ppl < 100


@pytest.mark.model
def test_codec_in_the_loop(default_model, windows):
    """Attention reads exactly codec.quantize(K), codec.quantize(V); more bits, smaller PPL increase."""
    ids, labels = windows
    codec = E8Codec(4.0)
    cache = QuantizeDequantizeCache(codec.quantize, default_model.config)
    with torch.no_grad():
        default_model.model(ids[:1], cache=cache, use_cache=True)
    raw = capture_kv(default_model, ids[:1])
    # layer 0 sees the unquantized input, so its cache holds exactly the codec's output
    assert torch.equal(cache.layers[0].keys[0], codec.quantize(raw.keys[0]))
    assert torch.equal(cache.layers[0].values[0], codec.quantize(raw.values[0]))
    # deeper layers see the effect of quantization upstream, and differ from the raw pass
    assert not torch.equal(cache.layers[5].keys[0], raw.keys[5])
    fp = perplexity(default_model.model, ids, labels, progress=False).ppl
    deltas = [
        perplexity(
            default_model.model,
            ids,
            labels,
            lambda b=b: QuantizeDequantizeCache(E8Codec(b).quantize, default_model.config),
            progress=False,
        ).ppl
        / fp
        - 1
        for b in (3.0, 6.0)
    ]
    assert deltas[0] > deltas[1] and abs(deltas[1]) < 0.01


@pytest.mark.model
def test_capture_kv_shapes(default_model, windows):
    kv = capture_kv(default_model, windows[0][:1, :50])
    assert kv.keys.shape == kv.values.shape == (30, 3, 50, 64)
    assert kv.keys.dtype == torch.float32 and torch.isfinite(kv.keys).all()
    with pytest.raises(ValueError, match="shape"):
        capture_kv(default_model, windows[0][:, :10])
