"""Mutation fuzzing of the decoders: a corpus of sound streams, mutation classes, and what a decoder did.

Two decoders read bytes that may have been damaged or forged: :meth:`lqlib.Encoded.from_bytes` +
:meth:`lqlib.E8Codec.decode` (the wire format, with a CRC-32) and
:func:`lqlib.coding.rans_lanes.decode_pages` (the GPU page format, no checksum). A *case* is one
sound stream of the corpus, one mutation class and one CRC mode:

* ``"intact"``: the mutated bytes as they are (the stored CRC no longer matches: the CRC must catch it);
* ``"forged"``: the CRC-32 recomputed over the mutated bytes (the format's own checks must catch what
  they can; rANS is a bijection, so a forged payload may decode to other values: *silent wrong*);
* ``"none"``: lane pages, which carry no checksum.

Mutation classes (:data:`MUTATIONS`): bit flips, byte substitutions, truncations, extensions, splices of
two streams, header-field edits, step-code edits (the largest and smallest codes, raw edits of the packed
codes), and memory bombs (shapes raised past the payload, zero payload words, huge declared sizes).

Outcomes (:data:`OUTCOMES`): ``clean_error`` (an :class:`lqlib.LqlibError`), ``decoded_correctly`` (the
original's values, bit for bit), ``silent_wrong`` (other values, all finite), ``infinities`` (a NaN or
±Inf in the output), ``foreign_exception`` (any other exception); the campaign script adds ``crash``
and ``hang`` (a worker process that died or ran past its time limit). Every case is derandomized: its
bytes depend on (seed, class, index) only.

Used by ``tests/test_fuzz.py`` (about 10^4 cases in CI) and ``benchmarks/fuzz_campaign.py`` (10^5+).
"""

from __future__ import annotations

import hashlib
import struct
import time
import zlib
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import torch

from ..core.lattices import nearest_e8
from ..core.steps import CODE_MAX, CODE_MIN
from ..errors import LqlibError
from . import rans_lanes as RL
from .codec import DEFAULT_MAX_NUMEL, E8Codec, Encoded
from .entropy_model import gaussian_symbol_model
from .wire import DTYPES, MAX_NDIM, WireHeader, pack, unpack

__all__ = [
    "MUTATIONS",
    "OUTCOMES",
    "CRC_MODES",
    "Original",
    "Case",
    "Result",
    "corpus",
    "cases",
    "mutate",
    "run_case",
    "summarize",
    "markdown_table",
]

MUTATIONS = (
    "bit_flip",
    "substitution",
    "truncation",
    "extension",
    "splice",
    "header_edit",
    "step_code_edit",
    "memory_bomb",
)
OUTCOMES = ("clean_error", "decoded_correctly", "silent_wrong", "infinities", "foreign_exception", "crash", "hang")
CRC_MODES = ("intact", "forged", "none")
_SHAPE_AT = 17  # offset of the shape in the wire header (after the 17 fixed bytes)


@dataclass(frozen=True)
class Original:
    """A sound stream of the corpus and what it decodes to.

    ``kind`` is ``"e8"`` (wire bytes, decoded by ``codec``) or ``"lanes"`` (one LQRL page); ``expected``
    is the decoded tensor (e8) or the symbols (lanes, shape (1, n_blocks, 9)). ``large`` streams serve
    the memory-bomb class only (their sound decode takes a while)."""

    name: str
    kind: str
    data: bytes
    codec: E8Codec | None
    expected: torch.Tensor | np.ndarray
    large: bool = False


@dataclass(frozen=True)
class Case:
    """One fuzz case: original ``original`` (index into the corpus), mutation class, CRC mode, case index."""

    original: int
    mutation: str
    crc: str
    index: int


@dataclass(frozen=True)
class Result:
    """What a decoder did with a case's bytes: outcome, seconds, a digest of its output (or error type)
    for determinism checks, and a short detail (an exception's type and message)."""

    case: Case
    outcome: str
    seconds: float
    digest: str
    detail: str = ""


# ------------------------------------------------------------------------------------------------ corpus


def _tensor(rng: np.random.Generator, shape: tuple[int, ...], dtype: torch.dtype, style: int) -> torch.Tensor:
    """Test data of a few kinds: Gaussian, heavy tails (escapes), zero vectors, values near the dtype's top."""
    x = rng.standard_normal(shape)
    if style == 1:
        x = x * np.exp(2.0 * rng.standard_normal(shape))  # heavy tails: escaped symbols
    elif style == 2:
        x.reshape(-1, shape[-1])[::2] = 0.0  # every other vector zero
    elif style == 3 and dtype == torch.float16:
        x = np.clip(x * 30000.0, -65504.0, 65504.0)  # reconstructions past 65504: saturated
    return torch.from_numpy(x).to(dtype)


def corpus(seed: int = 0, large: bool = False) -> list[Original]:
    """Sound streams: every rotation × scale mode × dtype at four rates (0.5, 2, 4, 7 bits/dim) with
    small shapes of several kinds, and lane pages at three rates and three lane counts. ``large`` adds
    two bigger low-rate streams (about 1 MB) on which a raised shape reaches the ``max_numel`` guard."""
    rng = np.random.default_rng(seed)
    out = []
    for rotation in ("none", "rht"):
        for scale in ("vector", "tensor"):
            for dtype in DTYPES:
                for i, bits in enumerate((0.5, 2.0, 4.0, 7.0)):
                    d = int(rng.choice([8, 16, 64])) if rotation == "none" else int(rng.choice([8, 64]))
                    lead = tuple(int(n) for n in rng.integers(1, 5, size=int(rng.integers(1, 3))))
                    codec = E8Codec(bits, rotation=rotation, scale=scale, seed=int(rng.integers(2**32)))
                    x = _tensor(rng, (*lead, d), dtype, style=i)
                    data = codec.encode(x).to_bytes()
                    name = f"e8 {rotation}/{scale}/{str(dtype)[6:]}/{bits}b {tuple(x.shape)}"
                    out.append(Original(name, "e8", data, codec, codec.decode(Encoded.from_bytes(data))))
    for bits in (2.0, 4.0, 6.0):
        for n_lanes in (1, 4, 8):
            n_blocks = int(rng.integers(8, 40))
            s = 2.0**bits / np.sqrt(2 * np.pi * np.e)
            points = nearest_e8(torch.from_numpy(rng.standard_normal((n_blocks, 8)) * s))
            symbols = RL.codes_to_symbols((points * 2).to(torch.int64).numpy()).reshape(1, n_blocks, 9)
            if n_lanes == 4:
                symbols[0, 0, 3] = 1000  # an escape
            page = RL.encode_pages(symbols, bits, n_lanes)[0]
            out.append(Original(f"lanes {bits}b {n_lanes} lanes {n_blocks} blocks", "lanes", page, None, symbols))
    if large:
        for scale in ("tensor", "vector"):
            codec = E8Codec(0.5, rotation="none", scale=scale)
            x = torch.from_numpy(rng.standard_normal((65536 if scale == "tensor" else 16384, 64))).float()
            data = codec.encode(x).to_bytes()
            expected = codec.decode(Encoded.from_bytes(data))
            out.append(Original(f"e8 large 0.5b {scale} {tuple(x.shape)}", "e8", data, codec, expected, True))
    return out


# ------------------------------------------------------------------------------------------------ mutations


def _with_crc(body: bytes) -> bytes:
    return body + struct.pack("<I", zlib.crc32(body))


def _e8_layout(data: bytes) -> tuple[int, int, int]:
    """(offset of n_words, offset of the step codes, offset of the payload) of a sound stream."""
    ndim = data[16]
    words_at = _SHAPE_AT + 4 * ndim
    (n_words,) = struct.unpack_from("<I", data, words_at)
    payload_at = len(data) - 4 - 4 * n_words
    return words_at, words_at + 4, payload_at


def _random_bytes(rng: np.random.Generator, n: int) -> bytes:
    return rng.integers(0, 256, n, dtype=np.uint8).tobytes()


def _flip(body: bytearray, rng: np.random.Generator) -> None:
    for _ in range(int(rng.choice([1, 1, 1, 2, 3, 8]))):
        pos = int(rng.integers(len(body)))
        body[pos] ^= 1 << int(rng.integers(8))


def _substitute(body: bytearray, rng: np.random.Generator) -> None:
    n = int(rng.choice([1, 1, 2, 4, 16]))
    pos = int(rng.integers(len(body)))
    for k in range(pos, min(pos + n, len(body))):
        body[k] = (body[k] + int(rng.integers(1, 256))) % 256  # always a different byte


def _e8_header_edit(body: bytearray, rng: np.random.Generator) -> None:
    ndim = body[16]
    field = int(rng.integers(10))
    if field == 0:
        body[4] = int(rng.choice([0, 1, 2, 3, 4, 255]))  # version
    elif field in (1, 2, 3):
        body[4 + field] = int(rng.choice([0, 1, 2, 3, 4, 5, 255]))  # rotation, scale, dtype
    elif field == 4:
        value = rng.choice([0.5, 2.0, 4.0, 7.0, 10.0, 11.0, -1.0, np.nan, np.inf, float(rng.uniform(0, 12))])
        struct.pack_into("<f", body, 8, float(value))  # rate
    elif field == 5:
        struct.pack_into("<I", body, 12, int(rng.integers(2**32)))  # seed
    elif field == 6:
        body[16] = int(rng.choice([0, max(ndim - 1, 0), ndim + 1, MAX_NDIM + 1, 255]))  # ndim
    elif field in (7, 8):
        k = int(rng.integers(ndim))
        (dim,) = struct.unpack_from("<I", body, _SHAPE_AT + 4 * k)
        value = rng.choice([0, 1, dim + 1, max(dim - 1, 0), 2 * dim, dim // 2, dim + 8, 2**31, 2**32 - 1])
        struct.pack_into("<I", body, _SHAPE_AT + 4 * k, int(value) % 2**32)  # a dimension
    else:
        words_at = _SHAPE_AT + 4 * ndim
        (n,) = struct.unpack_from("<I", body, words_at)
        value = rng.choice([0, n + 1, max(n - 1, 0), 2 * n, 2**32 - 1])
        struct.pack_into("<I", body, words_at, int(value) % 2**32)  # payload word count


def _e8_step_edit(data: bytes, body: bytearray, rng: np.random.Generator) -> bytearray:
    header, codes, words = unpack(data)
    style = int(rng.integers(4))
    if style < 2:  # re-packed with extreme codes that the format holds
        codes = codes.copy()
        if header.scale == "tensor":
            extremes = np.array([2.0**100, 2.0**-100, 1.0, 2.0**99], dtype=np.float32).view(np.int32)
            codes[:] = extremes[int(rng.integers(4))]
        else:
            where = slice(None) if style == 0 else int(rng.integers(codes.size))
            codes[where] = int(rng.choice([CODE_MAX, CODE_MIN, int(rng.integers(CODE_MIN, CODE_MAX + 1))]))
        return bytearray(pack(header, codes, words)[:-4])
    _, steps_at, payload_at = _e8_layout(data)
    if payload_at <= steps_at:
        return body
    pos = int(rng.integers(steps_at, payload_at))
    if style == 2:
        body[pos] = int(rng.integers(256))  # a raw byte of the step codes (base, width or offset bits)
    elif payload_at - steps_at >= 4:  # four bytes at once: float32 specials for one step per tensor
        value = rng.choice([0x7FFFFFFF, 0x7F800000, 0xFF800000, 0x7FC00000, 0, 0x0000FFFF, 0x8000])
        struct.pack_into("<I", body, steps_at, int(value))
    return body


def _e8_bomb(data: bytes, rng: np.random.Generator) -> bytes:
    """Bodies (no CRC) that declare more than the payload holds."""
    header, codes, words = unpack(data)
    style = int(rng.integers(5))
    shape = list(header.shape)
    if style == 0:  # the leading dim raised by one (the 4 → 5), or doubled
        shape[0] = shape[0] + 1 if rng.integers(2) else 2 * shape[0]
    elif style == 1:  # zero payload words under a larger shape (the 37-byte stream)
        words = words[:0]
        shape = [int(rng.choice([74, 1000, 2**20])), 8] if header.scale == "tensor" else shape
    elif style == 2:  # a huge declared size
        shape[0] = int(rng.choice([2**20, 2**24, 2**28, 2**31]))
    elif style == 3:  # the last dim raised (keeps the vector count, so per-vector streams parse)
        shape[-1] = shape[-1] * int(rng.choice([2, 8, 1024, 2**16]))
    else:  # as many blocks as the decoder's cheap bound lets through (on large streams: near max_numel)
        blocks = int(2 * 32 * (words.size + 1) / max(gaussian_symbol_model(header.bits).min_bits_per_block, 1e-9))
        if header.scale == "tensor":
            shape = [max(1, 8 * blocks // shape[-1]), shape[-1]]
        else:
            shape[-1] = max(shape[-1], 8 * 2 ** int(np.log2(max(blocks // max(codes.size, 1), 1))))
    if header.scale == "vector" and int(np.prod(shape[:-1])) != codes.size:
        codes = np.resize(codes, int(min(np.prod(shape[:-1]), 1 << 16)))  # more vectors than codes: truncated
    forged = WireHeader(header.rotation, header.scale, header.dtype, header.bits, header.seed, tuple(shape))
    try:
        return pack(forged, codes, words)[:-4]
    except (LqlibError, struct.error, OverflowError, ValueError):
        return pack(header, codes, words[:0])[:-4]


def _lane_header_edit(body: bytearray, rng: np.random.Generator) -> None:
    field = int(rng.integers(6))
    if field == 0:
        body[int(rng.integers(4))] ^= 1 << int(rng.integers(8))  # magic
    elif field == 1:
        body[4] = int(rng.choice([0, 2, 255]))  # version
    elif field == 2:
        body[5] = int(rng.choice([0, 11, 13, 16, 255]))  # precision
    elif field == 3:
        (n,) = struct.unpack_from("<H", body, 6)
        struct.pack_into("<H", body, 6, int(rng.choice([0, 1, n + 1, max(n - 1, 0), 0xFFFF])))  # lanes
    elif field == 4:
        (n,) = struct.unpack_from("<I", body, 8)
        struct.pack_into("<I", body, 8, int(rng.choice([0, 1, n + 1, max(n - 1, 0), 2 * n, 2**32 - 1])))  # blocks
    else:
        value = rng.choice([0.5, 2.0, 4.0, 6.0, 10.0, 12.0, -1.0, np.nan, np.inf, float(rng.uniform(0, 12))])
        struct.pack_into("<d", body, 12, float(value))  # rate


def _lane_table_edit(page: bytes, body: bytearray, rng: np.random.Generator) -> None:
    n_lanes = struct.unpack_from("<H", page, 6)[0]
    counts = np.frombuffer(page, dtype="<u2", count=n_lanes, offset=RL.HEADER_BYTES).astype(np.int64)
    a, b = int(rng.integers(n_lanes)), int(rng.integers(n_lanes))
    delta = int(rng.choice([1, 2, 5]))
    if a != b and rng.integers(2):
        counts[a] -= delta  # words moved between lanes: the total still matches the page's length
        counts[b] += delta
    else:
        counts[a] += int(rng.choice([-1, 1, 1000]))
    body[RL.HEADER_BYTES : RL.HEADER_BYTES + 2 * n_lanes] = (counts % 2**16).astype("<u2").tobytes()


def _lane_bomb(page: bytes, rng: np.random.Generator) -> bytes:
    """Pages whose header claims many more blocks (or lanes) than their words code."""
    n_lanes, n_blocks, bits = RL.page_info(page)
    if rng.integers(2):  # the most blocks the format allows over all its lanes, every lane 2 words long
        lanes = int(rng.choice([n_lanes, 0xFFFF]))
        blocks = (0xFFFF - 2) // 41 * lanes
        return RL.page_header(lanes, blocks, bits) + np.full(lanes, 2, "<u2").tobytes() + bytes(4 * lanes)
    blocks = min(n_blocks * int(rng.choice([2, 16, 1000])), (0xFFFF - 2) // 41 * n_lanes)
    return RL.page_header(n_lanes, blocks, bits) + page[RL.HEADER_BYTES :]


def mutate(originals: list[Original], case: Case, seed: int = 0) -> bytes:
    """The bytes of ``case``: its original mutated by its class (derandomized by seed, class and index),
    never the original bytes themselves (a draw that changes nothing is drawn again)."""
    for attempt in range(16):
        key = [seed, MUTATIONS.index(case.mutation), CRC_MODES.index(case.crc), case.index, attempt]
        data = _mutated(originals[case.original], originals, case, np.random.default_rng(key))
        if data != originals[case.original].data:
            return data
    return data


def _mutated(original: Original, originals: list[Original], case: Case, rng: np.random.Generator) -> bytes:
    data = original.data
    lanes = original.kind == "lanes"
    body = bytearray(data if lanes else data[:-4])
    kind = case.mutation
    if kind == "bit_flip":
        target = bytearray(data) if case.crc == "intact" else body
        _flip(target, rng)
        body = target
    elif kind == "substitution":
        target = bytearray(data) if case.crc == "intact" else body
        _substitute(target, rng)
        body = target
    elif kind == "truncation":
        cut = int(rng.integers(len(data)))
        return data[:cut] if case.crc != "forged" or cut < 4 else _with_crc(data[: cut - 4])
    elif kind == "extension":
        extra = _random_bytes(rng, int(rng.choice([1, 2, 4, 8, 100])))
        if rng.integers(3) == 0:
            extra = bytes(len(extra))  # zeros
        if case.crc != "forged":
            return data + extra
        body = bytearray(data[:-4] + extra)
    elif kind == "splice":
        others = [o for o in originals if o.kind == original.kind and not o.large and o.data != data]
        other = others[int(rng.integers(len(others)))].data
        cut_a, cut_b = int(rng.integers(len(data) + 1)), int(rng.integers(len(other) + 1))
        spliced = data[:cut_a] + other[cut_b:]
        if case.crc != "forged" or len(spliced) < 4:
            return spliced
        body = bytearray(spliced[:-4])
    elif kind == "header_edit":
        (_lane_header_edit if lanes else _e8_header_edit)(body, rng)
    elif kind == "step_code_edit":
        if lanes:
            _lane_table_edit(data, body, rng)  # the page format's side information: its lane table
        else:
            body = _e8_step_edit(data, body, rng)
    elif kind == "memory_bomb":
        body = bytearray(_lane_bomb(data, rng) if lanes else _e8_bomb(data, rng))
    else:
        raise ValueError(f"unknown mutation class {kind!r}")
    if lanes:
        return bytes(body)
    if case.crc == "forged":
        return _with_crc(bytes(body))
    if kind in ("bit_flip", "substitution"):
        return bytes(body)  # mutated with the CRC in place (the CRC bytes themselves may be hit)
    return bytes(body) + data[-4:]  # the original CRC, which no longer matches


def cases(originals: list[Original], per_class: int, seed: int = 0) -> Iterator[Case]:
    """``per_class`` cases per mutation class and CRC mode (e8: intact and forged; lanes: none), the
    originals in turn, in a fixed order."""
    e8 = [i for i, o in enumerate(originals) if o.kind == "e8" and not o.large]
    bombs = e8 + [i for i, o in enumerate(originals) if o.large]
    lanes = [i for i, o in enumerate(originals) if o.kind == "lanes"]
    for mutation in MUTATIONS:
        pool = bombs if mutation == "memory_bomb" else e8
        for crc, originals_of_mode in (("intact", pool), ("forged", pool), ("none", lanes)):
            for k in range(per_class):
                yield Case(originals_of_mode[k % len(originals_of_mode)], mutation, crc, k)


# ------------------------------------------------------------------------------------------------ decoding


def _digest(array: np.ndarray) -> str:
    return hashlib.sha1(np.ascontiguousarray(array).tobytes()).hexdigest()[:16]


def run_case(originals: list[Original], case: Case, seed: int = 0, max_numel: int | None = DEFAULT_MAX_NUMEL) -> Result:
    """Mutate, decode with the original's decoder, classify (see the module docstring)."""
    original = originals[case.original]
    data = mutate(originals, case, seed)
    start = time.perf_counter()
    try:
        if original.kind == "e8":
            out = original.codec.decode(Encoded.from_bytes(data), max_numel=max_numel)
            values = out.view(torch.int16).numpy() if out.dtype == torch.bfloat16 else out.numpy()
            finite = bool(torch.isfinite(out).all())
            same = out.dtype == original.expected.dtype and torch.equal(out, original.expected)
        else:
            values = RL.decode_pages([data], max_numel=max_numel)
            finite = True
            same = values.shape == original.expected.shape and np.array_equal(values, original.expected)
    except LqlibError as err:
        return Result(case, "clean_error", time.perf_counter() - start, type(err).__name__)
    except Exception as err:  # noqa: BLE001 - what the campaign looks for
        detail = f"{type(err).__name__}: {str(err)[:200]}"
        return Result(case, "foreign_exception", time.perf_counter() - start, type(err).__name__, detail)
    seconds = time.perf_counter() - start
    outcome = "infinities" if not finite else "decoded_correctly" if same else "silent_wrong"
    return Result(case, outcome, seconds, _digest(values), "" if same else f"shape {tuple(values.shape)}")


# ------------------------------------------------------------------------------------------------ tables


def summarize(results: Iterable[Result], peak_mb: dict[tuple[str, str], float] | None = None) -> list[dict]:
    """One row per (mutation class, CRC mode): the number of streams, each outcome's count, the slowest
    decode (s) and, where given, the peak memory (MB) a case of that row added to a decoding process."""
    counts: dict[tuple[str, str], Counter] = {}
    slowest: dict[tuple[str, str], float] = {}
    for r in results:
        key = (r.case.mutation, r.case.crc)
        counts.setdefault(key, Counter())[r.outcome] += 1
        slowest[key] = max(slowest.get(key, 0.0), r.seconds)
    rows = []
    for mutation in MUTATIONS:
        for crc in CRC_MODES:
            key = (mutation, crc)
            if key not in counts:
                continue
            row = {"mutation": mutation, "crc": crc, "streams": sum(counts[key].values())}
            row.update({o: counts[key][o] for o in OUTCOMES})
            row["slowest_s"] = round(slowest[key], 4)
            if peak_mb is not None:
                row["peak_mb"] = round(peak_mb.get(key, 0.0), 1)
            rows.append(row)
    total = {"mutation": "all", "crc": "all", "streams": sum(r["streams"] for r in rows)}
    total.update({o: sum(r[o] for r in rows) for o in OUTCOMES})
    total["slowest_s"] = max((r["slowest_s"] for r in rows), default=0.0)
    if peak_mb is not None:
        total["peak_mb"] = max((r["peak_mb"] for r in rows), default=0.0)
    return [*rows, total]


def markdown_table(rows: list[dict]) -> str:
    """The rows of :func:`summarize` as a Markdown table."""
    columns = list(rows[0])
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(row[c]) for c in columns) + " |" for row in rows]
    return "\n".join(lines) + "\n"
