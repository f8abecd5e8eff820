"""GPU interleaved multi-lane rANS (format: :mod:`lqlib.rans_lanes`): pages of E8 codes ↔ page bytes.

* :func:`encode` codes ``2·p`` (n_pages, ..., d) int8, or symbols (n_pages, n_blocks, 9) int32,
  into a :class:`PageBatch`: the pages back to back in one uint8 tensor, byte for byte what
  :func:`lqlib.rans_lanes.encode_pages` makes on the CPU.
* :func:`decode` a :class:`PageBatch` (made here, or from CPU pages with :meth:`PageBatch.from_pages`)
  into codes (n_pages, n_blocks·8) int8, or symbols, and a per-page validity flag.

No host synchronisation: the encoder writes each lane into a scratch row of the worst-case length
(:func:`lqlib.rans_lanes.max_lane_words`), the pages' offsets come from prefix sums of the lanes' word
counts (``torch.cumsum``) and a pack kernel moves the words into place, so the page bytes live in a
buffer of worst-case capacity whose used length is a device scalar (``offsets[-1]``). Only
:meth:`PageBatch.nbytes` / :meth:`PageBatch.to_pages` (the caller needs the byte count or the bytes)
and ``decode(..., check=True)`` synchronise. The GPU decoder checks the headers, the lengths and each
lane's final state and word count; these flags, not exceptions, report corruption unless ``check``.

Triton is imported on first use; on CPU tensors the kernels run in Triton's interpreter
(``TRITON_INTERPRET=1``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from ..coding import rans_lanes as RL
from ..errors import CorruptStreamError, InputError
from ..kernels import check_kernel_device

__all__ = ["PageBatch", "encode", "decode", "launch_config", "LOOKUPS"]

_HEADER_WORDS = RL.HEADER_BYTES // 2
_INT32_MAX = 2**31 - 1


def _kernels():
    try:
        from ..kernels import _rans_triton
    except ImportError as err:
        raise ImportError("lqlib.kernels.rans needs Triton: pip install 'lqlib[gpu]' (or pip install triton)") from err
    return _rans_triton


@dataclass
class PageBatch:
    """Pages of one layout back to back on a device.

    Attributes
    ----------
    data : uint8 tensor (capacity,), capacity even; page p is ``data[offsets[p]:offsets[p + 1]]``.
    offsets : int64 tensor (n_pages + 1,) on the same device, even byte offsets, ``offsets[0] = 0``.
    n_lanes, n_blocks, bits : the pages' layout and rate (as in their headers).
    """

    data: Tensor
    offsets: Tensor
    n_lanes: int
    n_blocks: int
    bits: float

    @property
    def n_pages(self) -> int:
        return self.offsets.numel() - 1

    def nbytes(self) -> int:
        """Bytes used by the pages (synchronises with the device)."""
        return int(self.offsets[-1])

    def to_pages(self) -> list[bytes]:
        """The pages as bytes objects (synchronises; copies the used bytes to the host)."""
        off = self.offsets.cpu().numpy()
        raw = self.data[: int(off[-1])].cpu().numpy().tobytes()
        return [raw[off[p] : off[p + 1]] for p in range(self.n_pages)]

    @classmethod
    def from_pages(cls, pages: list[bytes], device: torch.device | str) -> PageBatch:
        """Pages from the CPU encoder (or :meth:`to_pages`) onto ``device``: headers checked, all pages
        of one layout (else CorruptStreamError / InputError)."""
        if not pages:
            raise InputError("no pages")
        infos = {RL.page_info(p) for p in pages}
        if len(infos) != 1:
            raise InputError(f"pages of different layouts cannot be batched: {sorted(infos)}")
        n_lanes, n_blocks, bits = infos.pop()
        sizes = np.array([len(p) for p in pages], dtype=np.int64)
        offsets = np.concatenate([[0], np.cumsum(sizes)])
        data = torch.frombuffer(bytearray(b"".join(pages)), dtype=torch.uint8)
        return cls(data.to(device), torch.from_numpy(offsets).to(device), n_lanes, n_blocks, bits)


_TABLES: dict[tuple[float, torch.device], tuple[Tensor, ...]] = {}
LOOKUPS = {"packed": 0, "two_level": 1, "bucket": 2}


def _tables(bits: float, device: torch.device) -> tuple[Tensor, ...]:
    """enc (5, A) int32, dec (5, M) int32, dec_sym (5, M) uint8, bucket (5, M/16) int32 on ``device``
    (cached), and the LaneTables."""
    tables = RL.lane_tables(bits)
    key = (float(bits), device)
    if key not in _TABLES:
        _TABLES[key] = tuple(
            torch.from_numpy(t).to(device) for t in (tables.enc, tables.dec, tables.dec_sym, tables.bucket)
        )
    return (*_TABLES[key], tables)


def _header_words(n_lanes: int, n_blocks: int, bits: float, device: torch.device) -> Tensor:
    head = np.frombuffer(RL.page_header(n_lanes, n_blocks, bits), dtype="<i2").astype(np.int16)
    return torch.from_numpy(head.copy()).to(device)


def launch_config(device: torch.device, block: int | None, num_warps: int | None) -> tuple[int, int]:
    """Lanes per program and warps: one lane per thread on CUDA (default 64 lanes on 2 warps);
    in the interpreter, few large programs."""
    if device.type == "cpu":
        return block or 256, num_warps or 1
    num_warps = num_warps or 2
    return block or 32 * num_warps, num_warps


def encode(
    x: Tensor,
    bits: float,
    n_lanes: int = RL.DEFAULT_LANES,
    *,
    symbols: bool = False,
    block: int | None = None,
    num_warps: int | None = None,
) -> PageBatch:
    """Kernel: pages of codes (or symbols) → page bytes, as :func:`lqlib.rans_lanes.encode_pages`.

    Parameters
    ----------
    x : codes ``2·p`` of E8 points, int8 (n_pages, ..., d) with d a multiple of 8 (page p = ``x[p]``,
        blocks in C order), or with ``symbols=True`` int32 symbols (n_pages, n_blocks, 9). Not
        validated (that would synchronise): codes must be E8 points, coset bits 0 or 1.
    bits : the rate (selects the tables).
    n_lanes : lanes per page.
    block, num_warps : lanes per program and warps (speed only).

    Memory: a scratch of worst-case lane length and a page buffer of the same capacity, each
    2·n_pages·n_lanes·(2 + 41·ceil(n_blocks/n_lanes)) bytes (about 10× the coded size); indices are
    int32, so one call takes up to 2^31 words of capacity (8192-block pages at 32 lanes: 4096 pages,
    the Llama-3.1-8B KV cache of 4096 tokens); split larger batches.
    """
    if not isinstance(x, Tensor):
        raise InputError(f"expected a torch.Tensor, got {type(x).__name__}")
    if symbols:
        if x.dtype != torch.int32 or x.dim() != 3 or x.shape[2] != 9:
            raise InputError(f"expected int32 symbols (pages, blocks, 9), got {tuple(x.shape)} {x.dtype}")
        n_pages, n_blocks = x.shape[0], x.shape[1]
        src = x.contiguous().reshape(-1)
    else:
        if x.dtype != torch.int8 or x.dim() < 2 or x.shape[-1] % 8:
            raise InputError(f"expected int8 codes (pages, ..., d), d a multiple of 8, got {tuple(x.shape)} {x.dtype}")
        n_pages = x.shape[0]
        n_blocks = x[0].numel() // 8 if n_pages else 0
        src = x.contiguous().reshape(-1).view(torch.int32)
    RL._check_layout(n_blocks, n_lanes)
    if n_pages == 0:
        raise InputError("no pages to encode")
    device = x.device
    enc, *_, tables = _tables(bits, device)
    n_total = n_pages * n_lanes
    cap = RL.max_lane_words(n_blocks, n_lanes)
    head_bytes = RL.HEADER_BYTES + 2 * n_lanes
    capacity = n_pages * head_bytes + 2 * n_total * cap
    if capacity // 2 > _INT32_MAX or n_pages * n_blocks * 9 > _INT32_MAX:
        raise InputError("too many pages for one call (int32 indices): split the batch")
    k = _kernels()
    check_kernel_device(src, k.rans_encode_kernel)
    bl, warps = launch_config(device, block, num_warps)
    scratch = torch.empty(n_total, cap, dtype=torch.int16, device=device)
    counts = torch.empty(n_total, dtype=torch.int32, device=device)
    grid = (-(-n_total // bl),)
    k.rans_encode_kernel[grid](
        src,
        enc,
        scratch,
        counts,
        n_total,
        tables.r_free,
        tables.r_half,
        tables.enc.shape[1],
        L=n_lanes,
        NB=n_blocks,
        K=-(-n_blocks // n_lanes),
        CAP=cap,
        BLOCK=bl,
        FROM_SYMBOLS=symbols,
        num_warps=warps,
    )
    per_lane = counts.view(n_pages, n_lanes).to(torch.int64)
    offsets = torch.zeros(n_pages + 1, dtype=torch.int64, device=device)
    offsets[1:] = torch.cumsum(head_bytes + 2 * per_lane.sum(dim=1), dim=0)
    base = offsets[:-1] // 2
    dst = (base[:, None] + (_HEADER_WORDS + n_lanes) + torch.cumsum(per_lane, dim=1) - per_lane).to(torch.int32)
    data = torch.empty(capacity, dtype=torch.uint8, device=device)
    words = data.view(torch.int16)
    k.rans_pack_kernel[grid](
        scratch, counts, dst.reshape(-1), words, n_total, CAP=cap, BLOCK=bl, CHUNK=32, num_warps=warps
    )
    head = _header_words(n_lanes, n_blocks, bits, device)
    words[base[:, None] + torch.arange(_HEADER_WORDS, device=device)] = head.expand(n_pages, -1)
    words[base[:, None] + _HEADER_WORDS + torch.arange(n_lanes, device=device)] = per_lane.to(torch.int16)
    return PageBatch(data, offsets, n_lanes, n_blocks, float(bits))


def decode(
    batch: PageBatch,
    *,
    symbols: bool = False,
    check: bool = False,
    block: int | None = None,
    num_warps: int | None = None,
    lookup: str = "packed",
) -> tuple[Tensor, Tensor]:
    """Kernel: page bytes → codes ``2·p`` (n_pages, n_blocks·8) int8 (or symbols (n_pages, n_blocks, 9) int32).

    Returns
    -------
    (out, ok): ``ok`` is a bool tensor (n_pages,) on the device, False where a page's header or
    length is wrong or a lane fails the end-of-lane checks (its output is then garbage). With
    ``check=True`` this synchronises and raises CorruptStreamError instead.
    Codes wrap modulo 256 where a decoded value does not fit int8 (use ``symbols=True`` then).
    ``block``, ``num_warps`` (lanes per program, warps) and ``lookup`` change the speed only:
    ``"packed"`` (one gather in a 16 KB slot table per symbol), ``"two_level"`` (a byte slot table,
    then a per-symbol table) or ``"bucket"`` (a 1 KB table of 16-slot buckets, the slot table only
    where a bucket straddles two symbols); see ``_rans_triton._decode_symbol``.
    """
    if not isinstance(batch, PageBatch):
        raise InputError(f"expected a PageBatch, got {type(batch).__name__}")
    n_pages, n_lanes, n_blocks = batch.n_pages, batch.n_lanes, batch.n_blocks
    device = batch.data.device
    if batch.data.dtype != torch.uint8 or batch.data.numel() % 2:
        raise InputError("page data must be a uint8 tensor of even length")
    if batch.data.numel() // 2 > _INT32_MAX or n_pages * n_blocks * 9 > _INT32_MAX:
        raise InputError("too many pages for one call (int32 indices): split the batch")
    if lookup not in LOOKUPS:
        raise InputError(f"lookup must be one of {sorted(LOOKUPS)}, got {lookup!r}")
    enc, dec, dec_sym, bucket, tables = _tables(batch.bits, device)
    words = batch.data.view(torch.int16)
    n_words = words.numel()
    base = batch.offsets[:-1] // 2
    page_end = batch.offsets[1:] // 2
    lane_cols = torch.arange(n_lanes, device=device)
    table_at = (base[:, None] + _HEADER_WORDS + lane_cols).clamp(max=n_words - 1)
    counts = words[table_at].to(torch.int64) & 0xFFFF
    starts = base[:, None] + _HEADER_WORDS + n_lanes + torch.cumsum(counts, dim=1) - counts
    head_at = (base[:, None] + torch.arange(_HEADER_WORDS, device=device)).clamp(max=n_words - 1)
    ok = (words[head_at] == _header_words(n_lanes, n_blocks, batch.bits, device)).all(dim=1)
    ok &= page_end == base + _HEADER_WORDS + n_lanes + counts.sum(dim=1)
    ok &= (batch.offsets[1:] <= batch.data.numel()) & (batch.offsets[:-1] % 2 == 0)
    starts = torch.minimum(starts, page_end[:, None]).clamp(max=n_words)  # never read outside a page
    counts = torch.minimum(counts, page_end[:, None] - starts).clamp(min=0)
    k = _kernels()
    check_kernel_device(batch.data, k.rans_decode_kernel)
    bl, warps = launch_config(device, block, num_warps)
    n_total = n_pages * n_lanes
    err = torch.empty(n_total, dtype=torch.int32, device=device)
    if symbols:
        out = torch.empty(n_pages, n_blocks, 9, dtype=torch.int32, device=device)
        dst = out
    else:
        out = torch.empty(n_pages, n_blocks * 8, dtype=torch.int8, device=device)
        dst = out.view(torch.int32)
    k.rans_decode_kernel[(-(-n_total // bl),)](
        words,
        starts.to(torch.int32).reshape(-1),
        counts.to(torch.int32).reshape(-1),
        dec,
        dec_sym,
        enc,
        bucket,
        dst,
        err,
        n_total,
        tables.r_free,
        tables.r_half,
        tables.enc.shape[1],
        L=n_lanes,
        NB=n_blocks,
        K=-(-n_blocks // n_lanes),
        BLOCK=bl,
        TO_SYMBOLS=symbols,
        LOOKUP=LOOKUPS[lookup],
        num_warps=warps,
    )
    ok &= err.view(n_pages, n_lanes).amax(dim=1) == 0
    if check and not bool(ok.all()):
        bad = torch.nonzero(~ok).flatten().tolist()
        raise CorruptStreamError(f"{len(bad)} page(s) do not decode (first: page {bad[0]}): corrupted")
    return out, ok
