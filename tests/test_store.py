"""The content-addressed result store: keys from inputs and the library, hits return what was computed."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lqlib import E8Codec, InputError, store


@pytest.fixture
def tmp_store(tmp_path, monkeypatch):
    monkeypatch.setenv("LQLIB_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("LQLIB_STORE", raising=False)
    store.clear_stats()
    return tmp_path


def test_memo_computes_once_and_returns_the_same_value(tmp_store):
    calls = []

    def compute():
        calls.append(1)
        return {"nll": torch.tensor([1.5, 2.5], dtype=torch.float64), "tokens": 7}

    inputs = {"ids": torch.arange(12).reshape(3, 4), "codec": E8Codec(4.0)}
    first = store.memo("demo", inputs, compute)
    again = store.memo("demo", {"codec": E8Codec(4.0), "ids": torch.arange(12).reshape(3, 4)}, compute)
    assert len(calls) == 1 and store.stats() == {"hits": 1, "misses": 1}
    assert torch.equal(first["nll"], again["nll"]) and again["tokens"] == 7
    assert list(tmp_store.glob("results/demo/*/*.pt"))


@pytest.mark.parametrize(
    "other",
    [
        {"ids": torch.arange(12).reshape(4, 3), "codec": E8Codec(4.0)},  # same bytes, other shape
        {"ids": torch.arange(12).reshape(3, 4).to(torch.int32), "codec": E8Codec(4.0)},  # other dtype
        {"ids": torch.arange(12).reshape(3, 4), "codec": E8Codec(4.0, rotation="none")},  # other settings
        {"ids": torch.arange(12).reshape(3, 4), "codec": E8Codec(4.0), "extra": 0},
    ],
)
def test_any_change_of_the_inputs_is_a_miss(tmp_store, other):
    base = {"ids": torch.arange(12).reshape(3, 4), "codec": E8Codec(4.0)}
    assert store.fingerprint(base) != store.fingerprint(other)
    store.memo("demo", base, lambda: 1)
    assert store.memo("demo", other, lambda: 2) == 2


def test_keys_tell_values_apart_that_print_alike():
    assert store.fingerprint(1) != store.fingerprint(1.0) != store.fingerprint("1")
    assert store.fingerprint([1, 2]) != store.fingerprint((1, 2)) != store.fingerprint([[1, 2]])
    assert store.fingerprint(np.zeros(3, np.float32)) != store.fingerprint(np.zeros(3, np.float64))
    assert store.fingerprint({"a": 1, "b": 2}) == store.fingerprint({"b": 2, "a": 1})


def test_a_library_change_is_a_miss(tmp_store, monkeypatch):
    store.memo("demo", 1, lambda: "old")
    monkeypatch.setattr(store, "library_digest", lambda: "another library")
    assert store.memo("demo", 1, lambda: "new") == "new"


def test_switched_off_and_lambdas_refused(tmp_store, monkeypatch):
    with pytest.raises(InputError, match="cache_key"):
        store.fingerprint(lambda x: x)
    with pytest.raises(InputError, match="cache_key"):
        store.fingerprint(object())
    monkeypatch.setenv("LQLIB_STORE", "off")
    store.memo("demo", 1, lambda: "a")
    assert store.memo("demo", 1, lambda: "b") == "b" and not list(tmp_store.glob("results/**/*.pt"))


def test_a_damaged_file_is_recomputed(tmp_store):
    store.memo("demo", 3, lambda: [1, 2, 3])
    (path,) = tmp_store.glob("results/demo/*/*.pt")
    path.write_bytes(b"not a pickle")
    assert store.memo("demo", 3, lambda: [4]) == [4]
    assert store.memo("demo", 3, lambda: [5]) == [4]


def test_the_harness_stores_perplexities_by_what_they_compute(tmp_store):
    """Two notebooks asking for the same method on the same windows share one evaluation; another codec,
    other windows or another batch size are other results."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from lqlib.cache.quantized import QuantizeDequantizeCache
    from lqlib.evaluation.harness import stored_perplexity
    from lqlib.evaluation.models import LoadedModel

    config = LlamaConfig(
        vocab_size=61,
        hidden_size=64,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=32,
    )
    torch.manual_seed(0)
    loaded = LoadedModel(LlamaForCausalLM(config).eval(), None, "tiny", "test:tiny")
    ids = torch.randint(0, 61, (2, 24))
    calls = []

    def make(codec):
        def factory():
            calls.append(repr(codec))
            return QuantizeDequantizeCache(codec.quantize, config)

        return factory

    codec = E8Codec(3.0)
    first = stored_perplexity(loaded, ids, ids, codec, make(codec), progress=False)
    again = stored_perplexity(loaded, ids, ids, E8Codec(3.0), make(codec), progress=False)
    assert first == again and len(calls) == 1  # one batch of two windows: one cache, made once
    other = stored_perplexity(loaded, ids, ids, E8Codec(4.0), make(E8Codec(4.0)), progress=False)
    assert other != first and len(calls) == 2
    stored_perplexity(loaded, ids, ids, codec, make(codec), batch_size=1, progress=False)
    assert len(calls) == 4  # another batch size: computed again (two batches)
    with pytest.raises(InputError, match="key"):
        stored_perplexity(loaded, ids, ids, None, make(codec), progress=False)
