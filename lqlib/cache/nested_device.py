"""The device cache in the nested E8 format (:mod:`lqlib.coding.nested`): 4.25 bits/dim at head dim 128.

:class:`NestedDeviceKVLayer` is :class:`lqlib.cache.device.DeviceKVLayer` with its storage replaced:

* ``words`` (2, batch, kv_heads, capacity, head_dim/8) int32 — keys (index 0) and values (index 1);
* ``steps`` (2, batch, kv_heads, capacity) int16 — step codes;
* ``flags`` (2, batch, kv_heads, capacity, ceil(head_dim/64)) uint8 — the blocks' scale flags.

Every token is quantized when it arrives (prefill and each decoded token) by
:func:`lqlib.kernels.nested.quantize_into`, straight into the storage at the position kept on the
device; decode attention is :func:`lqlib.kernels.nested.decode_attention` over the words, with no
decompressed copy; prefill attends with SDPA over the dequantized history (kept for that call only),
as the int8 layer does. Per-layer CUDA graphs, markers, the position kept on the device and the
errors are the int8 layer's. Built by ``DeviceKVCache(config, format="nested")``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..coding.nested import NestedCodes, NestedE8Codec, flag_bytes
from ..errors import InputError
from ..kernels import KERNEL_DTYPES
from .compressed import CodedHistoryLayer, check_key_scales
from .device import DeviceKVLayer

__all__ = ["NestedDeviceKVLayer"]

_MAX_DIM = 256


class NestedDeviceKVLayer(DeviceKVLayer):
    """One attention layer's history as device-resident nested E8 codes (see the module docstring).

    Parameters
    ----------
    codec, value_codec : the keys' and values' formats (default: the same for both).
    key_scales, capacity, page_size, cuda_graphs, graph_pool : as :class:`~lqlib.cache.device.DeviceKVLayer`.
    """

    def __init__(
        self,
        codec: NestedE8Codec,
        value_codec: NestedE8Codec | None = None,
        key_scales: Tensor | None = None,
        capacity: int = 0,
        page_size: int = 256,
        cuda_graphs: bool = False,
        graph_pool=None,
    ) -> None:
        CodedHistoryLayer.__init__(self)
        if page_size < 1 or capacity < 0:
            raise InputError(f"need page_size >= 1 and capacity >= 0, got {page_size}, {capacity}")
        for c in (codec, value_codec or codec):
            if not isinstance(c, NestedE8Codec):
                raise InputError(f"the nested device cache needs NestedE8Codec formats, got {c!r}")
        check_key_scales(key_scales)
        self.codec = codec
        self.value_codec = value_codec or codec
        self.joint = repr(self.codec) == repr(self.value_codec)
        self.key_scales = None if key_scales is None else key_scales.to(torch.float16)
        self.key_scales32: Tensor | None = None
        self._scales_cache: dict[torch.dtype, Tensor] = {}
        self.page_size = page_size
        self.reserved = capacity
        self.cuda_graphs = cuda_graphs
        self.graph_pool = graph_pool
        self._reset_storage()

    def _reset_storage(self) -> None:
        super()._reset_storage()
        self.words: Tensor | None = None
        self.flags: Tensor | None = None

    def lazy_initialization(self, key_states: Tensor, value_states: Tensor) -> None:
        if key_states.dim() == 4 and key_states.dtype in KERNEL_DTYPES:
            dim = key_states.shape[-1]
            if not 16 <= dim <= _MAX_DIM or dim & (dim - 1):
                raise InputError(
                    f"the nested device cache needs a power-of-two head dim in [16, {_MAX_DIM}], got {dim}"
                )
        super().lazy_initialization(key_states, value_states)

    def _check_code_width(self, dim: int) -> None:
        """Nothing to check: words hold every point of the format."""

    # ------------------------------------------------------------------ storage
    def _write(self, key_states: Tensor, value_states: Tensor, position: int | Tensor) -> None:
        """Quantize the keys and values straight into the storage at ``position`` (one kernel a part)."""
        from ..kernels import nested as kn

        keys = key_states if self.key_scales is None else key_states / self._scales(key_states.dtype)
        if self.joint:
            kn.quantize_into(self.codec, torch.stack([keys, value_states]), self._store(), position)
            return
        for part, (codec, x) in enumerate(((self.codec, keys), (self.value_codec, value_states))):
            kn.quantize_into(codec, x, self._store(part), position)

    def _store(self, part: int | None = None) -> NestedCodes:
        if part is None:
            return NestedCodes(self.words, self.steps, self.flags)
        return NestedCodes(self.words[part], self.steps[part], self.flags[part])

    def _parts(self):
        return (self.words, self.steps, self.flags)

    def _write_one(self, key_states: Tensor, value_states: Tensor) -> None:
        self._write(key_states, value_states, self.position)
        self.position += 1
        self.lengths += 1

    def _write_many(self, key_states: Tensor, value_states: Tensor, n: int) -> None:
        self._write(key_states, value_states, n)
        t = key_states.shape[-2]
        self.position.fill_(n + t)
        self.lengths.fill_(n + t)

    def _history(self, part: int, n: int | None = None) -> NestedCodes:
        end = self.capacity if n is None else n
        return NestedCodes(self.words[part, :, :, :end], self.steps[part, :, :, :end], self.flags[part, :, :, :end])

    def attend_one(self, q: Tensor, sm_scale: float | None) -> Tensor:
        """Decode attention of one query token per row, q (B, Hq, d), over the codes held: (B, Hq, d)."""
        from ..kernels import nested as kn

        def attend(q: Tensor) -> Tensor:
            return kn.decode_attention(
                q,
                self._history(0),
                self._history(1),
                self.lengths,
                self.codec,
                self.value_codec,
                key_scales=self.key_scales32,
                sm_scale=sm_scale,
            )

        if self._graphs_on:
            return self._graphed("attend", attend, q, key=(self.words.data_ptr(), sm_scale, q.dtype, tuple(q.shape)))
        return attend(q)

    def reserve(self, tokens: int) -> None:
        """Make room for ``tokens`` tokens in all (doubling the capacity, rounded up to ``page_size``)."""
        if tokens <= self.capacity:
            return
        want = max(tokens, self.reserved, 2 * self.capacity)
        want = -(-want // self.page_size) * self.page_size
        shape = (2, self.batch, self.heads, want)
        words = torch.empty(*shape, self.dim // 8, dtype=torch.int32, device=self.device)
        steps = torch.empty(*shape, dtype=torch.int16, device=self.device)
        flags = torch.empty(*shape, flag_bytes(self.dim), dtype=torch.uint8, device=self.device)
        n = self.n_tokens
        if n:
            words[:, :, :, :n].copy_(self.words[:, :, :, :n])
            steps[..., :n].copy_(self.steps[..., :n])
            flags[:, :, :, :n].copy_(self.flags[:, :, :, :n])
        self.words, self.steps, self.flags = words, steps, flags
        self.codes = words  # what the int8 layer's capacity and graph keys read

    def dequantized(self, dtype: torch.dtype | None = None) -> tuple[Tensor, Tensor]:
        """The keys and values attention reads, (batch, kv_heads, tokens, head_dim) each, in ``dtype``
        (default: the model's): bit for bit the CPU reference's decode of what was written."""
        from ..kernels import nested as kn

        dtype = dtype or self.dtype
        n = self.n_tokens
        keys = kn.dequantize(self.codec, self._history(0, n), dtype)
        values = kn.dequantize(self.value_codec, self._history(1, n), dtype)
        if self.key_scales is not None:
            keys = keys * self._scales(dtype)
        return keys, values

    def _bytes_per_token(self) -> int:
        return 2 * self.batch * self.heads * (4 * (self.dim // 8) + 2 + flag_bytes(self.dim))

    def nbytes(self) -> int:
        """Bytes of the history held: words, step codes and flags of the tokens stored, key scales."""
        scales = 0 if self.key_scales is None else 2 * self.key_scales.numel()
        if self.words is None:
            return scales
        return self._bytes_per_token() * self.n_tokens + scales

    def allocated_nbytes(self) -> int:
        """Bytes allocated: words, step codes and flags of the whole capacity, key scales."""
        scales = 0 if self.key_scales is None else 2 * self.key_scales.numel()
        if self.words is None:
            return scales
        return sum(t.numel() * t.element_size() for t in self._parts()) + scales
