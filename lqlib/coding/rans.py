"""rANS entropy coding of parity-aware E8 symbols (CPU, through ``constriction``).

One ANS stack holds, in decoding order:

1. the coset bits of all blocks;
2. the 8 remaining symbols of the integer-coset blocks (z0..z6, then floor(z7/2));
3. the same for the half-integer-coset blocks;
4. the raw values of escaped symbols, 32 bits each;
5. (wire version 3) a 32-bit sentinel, :data:`SENTINEL`, as two uniform 16-bit symbols.

Every group is pushed with one vectorised ``encode_reverse`` call, so there is
no Python loop over blocks.

The sentinel is pushed first and so decoded last: a decoder that reads more symbols than were
coded (a header claiming more blocks than the payload holds) finds, in its place, what an
exhausted ANS stack yields (zeros in ``constriction``) or other symbols' bits, and one that reads
fewer leaves data behind; either way it raises. A payload decodes with a wrong block count
unnoticed with probability about 2^-32. It costs 4 bytes per stream on average (measured:
see ``tests/test_fuzz.py``).
"""

from __future__ import annotations

import functools

import constriction
import numpy as np

from ..errors import CorruptStreamError
from .entropy_model import SymbolModel

__all__ = ["encode_symbols", "decode_symbols", "coder_models", "SENTINEL"]

_Categorical = constriction.stream.model.Categorical
_UNIFORM_16 = constriction.stream.model.Uniform(1 << 16)
_ESCAPE_OFFSET = 1 << 31
SENTINEL = 0x4C51E8A5  # "LQ", 0xE8A5: two 16-bit halves, neither zero (what an empty stack decodes)
_SENTINEL_HALVES = np.array([SENTINEL >> 16, SENTINEL & 0xFFFF], dtype=np.int32)


@functools.lru_cache(maxsize=64)
def coder_models(model: SymbolModel) -> tuple:
    """constriction models for ``model``: the coset model, then (free, half) per coset."""
    return (
        _Categorical(model.coset, perfect=False),
        [(_Categorical(model.free[c], perfect=False), _Categorical(model.half[c], perfect=False)) for c in (0, 1)],
    )


def encode_symbols(symbols: np.ndarray, model: SymbolModel, sentinel: bool = True) -> np.ndarray:
    """Entropy-code parity-aware symbols.

    Parameters
    ----------
    symbols : shape (n_blocks, 9), int32, as made by :func:`lqlib.symbols.points_to_symbols`.
    model : probability tables for the rate the symbols were quantized at.
    sentinel : push :data:`SENTINEL` under the symbols (wire version 3; version 2 had none).

    Returns
    -------
    np.ndarray of uint32 words (the ANS stack, ready for :func:`decode_symbols`).
    """
    coset_model, per_coset = coder_models(model)
    coset = np.ascontiguousarray(symbols[:, 0], dtype=np.int32)
    index = symbols[:, 1:].astype(np.int32) + model.radius  # |symbols| < 2^30: no overflow
    outside = (index < 0) | (index > 2 * model.radius)
    any_escape = bool(outside.any())
    if any_escape:
        index[outside] = model.escape_index
    groups, escaped = [], []
    for c in (0, 1):
        in_coset = coset == c
        rows = index[in_coset]
        groups.append((rows[:, :7].reshape(-1), np.ascontiguousarray(rows[:, 7])))
        if any_escape:
            values, out = symbols[in_coset, 1:], outside[in_coset]
            escaped += [values[:, :7][out[:, :7]], values[:, 7][out[:, 7]]]

    coder = constriction.stream.stack.AnsCoder()
    if sentinel:
        coder.encode_reverse(_SENTINEL_HALVES, _UNIFORM_16)
    if any_escape:
        raw = (np.concatenate(escaped).astype(np.int64) + _ESCAPE_OFFSET).astype(np.uint32)
        coder.encode_reverse(np.stack([raw >> 16, raw & 0xFFFF], axis=1).reshape(-1).astype(np.int32), _UNIFORM_16)
    for c in (1, 0):
        free_idx, half_idx = groups[c]
        coder.encode_reverse(half_idx, per_coset[c][1])
        coder.encode_reverse(free_idx, per_coset[c][0])
    coder.encode_reverse(coset, coset_model)
    return coder.get_compressed()


def decode_symbols(words: np.ndarray, n_blocks: int, model: SymbolModel, sentinel: bool = True) -> np.ndarray:
    """Inverse of :func:`encode_symbols` (``sentinel`` as it was encoded).

    Raises
    ------
    CorruptStreamError
        if the words do not decode to exactly ``n_blocks`` blocks (with the sentinel: if it is not
        found right after them, or data is left over; without: if data is left over).
    """
    coset_model, per_coset = coder_models(model)
    try:
        coder = constriction.stream.stack.AnsCoder(np.ascontiguousarray(words, dtype=np.uint32))
        coset = coder.decode(coset_model, n_blocks)
        symbols = np.empty((n_blocks, 9), dtype=np.int32)
        symbols[:, 0] = coset
        escape_slots = []
        for c in (0, 1):
            count = int(np.count_nonzero(coset == c))
            free_idx = coder.decode(per_coset[c][0], 7 * count)
            half_idx = coder.decode(per_coset[c][1], count)
            block = np.concatenate([free_idx.reshape(count, 7), half_idx[:, None]], axis=1)
            escape_slots.append(block == model.escape_index)
            symbols[coset == c, 1:] = block - model.radius
        n_escaped = int(sum(int(s.sum()) for s in escape_slots))
        if n_escaped:
            halves = coder.decode(_UNIFORM_16, 2 * n_escaped).astype(np.int64).reshape(-1, 2)
            raw = ((halves[:, 0] << 16) | halves[:, 1]) - _ESCAPE_OFFSET
            # escaped values come in the encoder's order: per coset, all free symbols, then halves
            ordered = []
            for c in (0, 1):
                rows = np.flatnonzero(coset == c)
                slots = escape_slots[c]
                free_pos = np.argwhere(slots[:, :7])
                half_pos = np.flatnonzero(slots[:, 7])
                ordered.append((rows[free_pos[:, 0]], 1 + free_pos[:, 1]))
                ordered.append((rows[half_pos], np.full(half_pos.size, 8)))
            row_index = np.concatenate([r for r, _ in ordered])
            col_index = np.concatenate([k for _, k in ordered])
            symbols[row_index, col_index] = raw.astype(np.int32)
        found = coder.decode(_UNIFORM_16, 2) if sentinel else _SENTINEL_HALVES
        empty = coder.is_empty()
    except (ValueError, RuntimeError, OverflowError) as exc:
        raise CorruptStreamError(f"entropy-coded payload does not decode: {exc}") from exc
    if not np.array_equal(found, _SENTINEL_HALVES):
        raise CorruptStreamError(
            "entropy-coded payload does not end where its header says: the declared shape needs more or "
            "fewer symbols than it holds (forged or corrupted)"
        )
    if not empty:
        raise CorruptStreamError("entropy-coded payload has trailing data: it does not match its header")
    return symbols
