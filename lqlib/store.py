"""A content-addressed store of computed results, shared between notebooks and runs.

A result is filed under the SHA-256 of everything it depends on: the name of the computation, its
inputs (tensors and arrays by their bytes, dtype and shape; numbers, strings, sequences and mappings
by value; dataclass instances by their fields; other objects by their ``cache_key()``, and anything
else is refused rather than guessed), and the *library
digest* — a hash of every ``lqlib`` source file and of the torch, transformers and numpy versions.
Any change to the code or the stack therefore misses the store and recomputes: a stale result is
never served. Writes are atomic (a temporary file renamed into place), so concurrent notebooks can
share one store.

Where: ``$LQLIB_CACHE_DIR`` if set, else ``$XDG_CACHE_HOME/lqlib``, else ``~/.cache/lqlib``;
results under ``results/``, converted models under ``models/`` (:mod:`lqlib.evaluation.models`).
``LQLIB_STORE=off`` switches the result store off (every call computes).

Example::

    nll = memo("perplexity", {"model": loaded.fingerprint, "ids": ids, "method": "E8 4"}, lambda: run())
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import io
import math
import os
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

from .errors import InputError

__all__ = ["cache_dir", "library_digest", "fingerprint", "memo", "store_enabled", "stats", "clear_stats"]

T = TypeVar("T")
LIBRARY = Path(__file__).resolve().parent
_STATS = {"hits": 0, "misses": 0}


def cache_dir() -> Path:
    """The user's lqlib cache folder (created on first use)."""
    root = os.environ.get("LQLIB_CACHE_DIR")
    if not root:
        xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        root = os.path.join(xdg, "lqlib")
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def store_enabled() -> bool:
    """False when ``LQLIB_STORE`` is ``off`` / ``0`` / ``false``."""
    return os.environ.get("LQLIB_STORE", "on").lower() not in ("off", "0", "false", "no")


@functools.cache
def library_digest() -> str:
    """SHA-256 of every lqlib source file (path and bytes) and of the numeric stack's versions."""
    import numpy
    import torch

    digest = hashlib.sha256()
    for path in sorted(LIBRARY.rglob("*.py")):
        digest.update(path.relative_to(LIBRARY).as_posix().encode())
        digest.update(path.read_bytes())
    try:
        import transformers

        transformers_version = transformers.__version__
    except ImportError:  # the math core runs without it
        transformers_version = "none"
    digest.update(f"torch={torch.__version__};numpy={numpy.__version__};transformers={transformers_version}".encode())
    return digest.hexdigest()


def _feed(digest: Any, value: object) -> None:
    """Hash ``value`` into ``digest`` unambiguously (type-tagged, length-prefixed)."""
    import numpy as np
    import torch

    def tag(name: str, payload: bytes = b"") -> None:
        digest.update(f"<{name}:{len(payload)}>".encode())
        digest.update(payload)

    if value is None or isinstance(value, bool):
        tag(f"const {value!r}")
    elif isinstance(value, int):
        tag("int", str(value).encode())
    elif isinstance(value, float):
        tag("float", (repr(value) if math.isfinite(value) else str(value)).encode())
    elif isinstance(value, str):
        tag("str", value.encode())
    elif isinstance(value, bytes):
        tag("bytes", value)
    elif isinstance(value, torch.Tensor):
        t = value.detach().cpu().contiguous()
        tag(f"tensor {t.dtype} {tuple(t.shape)}", t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    elif isinstance(value, np.ndarray):
        a = np.ascontiguousarray(value)
        tag(f"ndarray {a.dtype.str} {a.shape}", a.tobytes())
    elif isinstance(value, (np.integer, np.floating)):
        _feed(digest, value.item())
    elif isinstance(value, Mapping):
        tag(f"map {len(value)}")
        for key in sorted(value, key=str):
            _feed(digest, str(key))
            _feed(digest, value[key])
    elif isinstance(value, (Sequence, set, frozenset)) and not isinstance(value, (str, bytes)):
        items = sorted(value, key=repr) if isinstance(value, (set, frozenset)) else list(value)
        tag(f"seq {type(value).__name__} {len(items)}")
        for item in items:
            _feed(digest, item)
    elif hasattr(value, "cache_key"):
        tag(f"obj {type(value).__module__}.{type(value).__qualname__}")
        _feed(digest, value.cache_key())
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        tag(f"dataclass {type(value).__module__}.{type(value).__qualname__}")
        for field in dataclasses.fields(value):
            _feed(digest, field.name)
            _feed(digest, getattr(value, field.name))
    else:
        raise InputError(
            f"cannot key a {type(value).__qualname__}: pass what determines the result (numbers, strings, "
            "tensors, dataclasses), or give the object a cache_key() method"
        )


def fingerprint(*parts: object) -> str:
    """Hex SHA-256 of ``parts`` (see the module docstring for how each kind of value is hashed)."""
    digest = hashlib.sha256()
    for part in parts:
        _feed(digest, part)
    return digest.hexdigest()


def _path(name: str, key: str) -> Path:
    safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in name)
    return cache_dir() / "results" / safe / key[:2] / f"{key}.pt"


def memo(name: str, inputs: object, compute: Callable[[], T]) -> T:
    """``compute()``, or its stored result for the same ``name``, ``inputs`` and library digest.

    The result must be picklable by ``torch.save`` (tensors, arrays, numbers, dataclasses of them).
    Returns exactly what ``compute`` returned the first time (loaded on CPU).
    """
    import torch

    if not store_enabled():
        return compute()
    path = _path(name, fingerprint(name, inputs, library_digest()))
    if path.is_file():
        try:
            value = torch.load(path, map_location="cpu", weights_only=False)
        except Exception:  # a damaged file (e.g. a disk filled mid-write elsewhere): recompute it
            path.unlink(missing_ok=True)
        else:
            _STATS["hits"] += 1
            return value
    _STATS["misses"] += 1
    value = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    torch.save(value, buffer)
    with tempfile.NamedTemporaryFile(dir=path.parent, delete=False, suffix=".tmp") as handle:
        handle.write(buffer.getvalue())
    os.replace(handle.name, path)
    return value


def stats() -> dict[str, int]:
    """Hits and misses of :func:`memo` in this process."""
    return dict(_STATS)


def clear_stats() -> None:
    _STATS.update(hits=0, misses=0)
