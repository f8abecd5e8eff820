"""lqlib: E8 lattice quantization with entropy coding for LLM KV caches.

The companion library of the LatticeQuant papers, in layers, each a folder that imports only from
the ones before it (``tests/test_layers.py`` checks this):

1. ``core/`` — lattices, closed forms, the randomized Hadamard transform, symbols, step codes, scalar
   quantizers; ``coding/`` — entropy models, rANS, the wire format, the E8 codec;
2. ``kernels/`` — Triton kernels (imported lazily);
3. ``cache/`` — transformers KV caches (in-loop, compressed bitstream, GPU device codes);
4. ``evaluation/`` — models, corpora, captured K/V, perplexity, baselines, the harness;
5. ``ddt/`` (Paper III) and ``alloc/`` (Paper IV);
6. ``book/`` — the book's runner and helpers; ``cli`` — ``python -m lqlib``.

``errors`` and ``store`` (the content-addressed result store) are shared by all layers.
"""

from . import store
from .coding.codec import E8Codec, Encoded
from .core.lattices import (
    LATTICES,
    nearest_a2,
    nearest_dn,
    nearest_e8,
    nearest_zn,
    normalized_second_moment,
)
from .core.rht import RandomizedHadamard, fwht
from .errors import (
    ChecksumError,
    CodecMismatchError,
    CorruptStreamError,
    FormatError,
    InputError,
    LqlibError,
    ResourceNotFoundError,
)

__version__ = "0.1.0"


_LAZY = {
    "CompressedKVCache": ("cache.compressed", "CompressedKVCache"),
    "DeviceKVCache": ("cache.device", "DeviceKVCache"),
    "QuantizeDequantizeCache": ("cache.quantized", "QuantizeDequantizeCache"),
    "load_model": ("evaluation.models", "load"),
    "load_corpus": ("evaluation.corpus", "load_corpus"),
    "models": ("evaluation.models", None),
    "calibrate": ("alloc.calibrate", "calibrate"),
}


def __getattr__(name: str):
    """Lazy public names whose modules import transformers (kept out of ``import lqlib``)."""
    if name in _LAZY:
        import importlib

        module, attribute = _LAZY[name]
        loaded = importlib.import_module(f".{module}", __name__)
        return loaded if attribute is None else getattr(loaded, attribute)
    raise AttributeError(f"module 'lqlib' has no attribute {name!r}")


__all__ = [
    "E8Codec",
    "Encoded",
    "CompressedKVCache",
    "DeviceKVCache",
    "QuantizeDequantizeCache",
    "load_model",
    "load_corpus",
    "models",
    "store",
    "calibrate",
    "LATTICES",
    "RandomizedHadamard",
    "fwht",
    "nearest_zn",
    "nearest_a2",
    "nearest_dn",
    "nearest_e8",
    "normalized_second_moment",
    "LqlibError",
    "InputError",
    "FormatError",
    "ChecksumError",
    "CorruptStreamError",
    "CodecMismatchError",
    "ResourceNotFoundError",
]
