"""lqlib: E8 lattice quantization with entropy coding for LLM KV caches.

The companion library of the LatticeQuant papers. Layers (each imports only
from the ones before it): math core (lattices, theory, rht, symbols,
entropy_model, rans, wire, codec), kernels, models/corpus, evaluation,
analysis, book helpers and CLI.
"""

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


def __getattr__(name: str):
    """Lazy public names whose modules import transformers (kept out of ``import lqlib``)."""
    if name == "CompressedKVCache":
        from .cache.compressed import CompressedKVCache

        return CompressedKVCache
    if name == "calibrate":
        from .alloc.calibrate import calibrate

        return calibrate
    raise AttributeError(f"module 'lqlib' has no attribute {name!r}")


__all__ = [
    "E8Codec",
    "Encoded",
    "CompressedKVCache",
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
