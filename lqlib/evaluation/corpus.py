"""Evaluation text: an offline default corpus, and WikiText-2 when it can be loaded.

* ``"pydoc"`` — the Python language reference topics shipped in the standard
  library (``pydoc_data.topics``, ≈0.47 M characters of English prose with code),
  always available offline; the default.
* ``"wikitext2"`` — WikiText-2 (raw, v1) through ``datasets.load_dataset``, from
  the Hugging Face hub or its cache, or from a local copy of the dataset
  repository (``source=``, a folder with ``wikitext-2-raw-v1/test-*.parquet``
  and the hub's README). Rows are joined with ``"\\n\\n"`` as in the usual
  perplexity protocol.
* ``"auto"`` — WikiText-2 if it loads, else the default, with a warning.
"""

from __future__ import annotations

import os
import socket
import warnings
from dataclasses import dataclass

from ..errors import ResourceNotFoundError

__all__ = ["Corpus", "load_corpus", "CORPORA", "WIKITEXT_SOURCE"]

CORPORA = ("pydoc", "wikitext2", "auto")
WIKITEXT_SOURCE = "Salesforce/wikitext"
_WIKITEXT_CONFIG = "wikitext-2-raw-v1"
_HUB_HOST = "huggingface.co"


@dataclass(frozen=True)
class Corpus:
    """A text and its provenance (``name``, ``source``, ``split``)."""

    name: str
    source: str
    split: str
    text: str


def _pydoc() -> Corpus:
    import pydoc_data.topics

    topics = pydoc_data.topics.topics
    text = "\n\n".join(topics[key].strip() for key in sorted(topics))
    return Corpus("pydoc", "pydoc_data.topics (CPython standard library)", "all", text)


def _wikitext(split: str, source: str) -> Corpus:
    try:
        import datasets
    except ImportError as exc:
        raise ResourceNotFoundError("WikiText-2 needs the 'datasets' package: pip install datasets") from exc
    try:
        rows = datasets.load_dataset(source, _WIKITEXT_CONFIG, split=split)
    except Exception as exc:  # datasets raises many kinds (ConnectionError, FileNotFoundError, ...)
        raise ResourceNotFoundError(f"cannot load WikiText-2 ({source}, {split}): {exc}") from exc
    return Corpus("wikitext2", source, split, "\n\n".join(list(rows["text"])))


def _hub_answers(timeout: float = 2.0) -> bool:
    try:
        socket.create_connection((_HUB_HOST, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def load_corpus(name: str = "pydoc", split: str = "test", source: str | None = None) -> Corpus:
    """Load an evaluation corpus.

    Parameters
    ----------
    name : ``"pydoc"``, ``"wikitext2"`` or ``"auto"``.
    split : WikiText-2 split (``"test"``, ``"validation"``, ``"train"``); ignored for ``"pydoc"``.
    source : WikiText-2 location: a hub id or a local folder (default: the
        ``LQLIB_WIKITEXT`` environment variable, else ``"Salesforce/wikitext"``).
    """
    if name not in CORPORA:
        raise ValueError(f"corpus must be one of {CORPORA}, got {name!r}")
    source = source or os.environ.get("LQLIB_WIKITEXT", WIKITEXT_SOURCE)
    if name == "pydoc":
        return _pydoc()
    if name == "wikitext2":
        return _wikitext(split, source)
    local = os.path.isdir(source)
    offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "") or os.environ.get(
        "HF_DATASETS_OFFLINE", "0"
    ) not in ("0", "")
    if local or offline or _hub_answers():
        try:
            return _wikitext(split, source)
        except ResourceNotFoundError as exc:
            warnings.warn(f"WikiText-2 not available, using the offline default corpus: {exc}", stacklevel=2)
    else:
        warnings.warn("the Hugging Face hub does not answer: using the offline default corpus", stacklevel=2)
    return _pydoc()
