"""A device-resident KV cache of E8 codes, and the attention that reads it (transformers).

Each layer holds its whole history as fixed-rate codes on the model's device:

* ``codes`` (2, batch, kv_heads, capacity, head_dim) int8: ``2·p`` with ``p`` the E8 points of the
  keys (index 0) and values (index 1), in lattice units, as :func:`lqlib.kernels.quantize` writes them;
* ``steps`` (2, batch, kv_heads, capacity) int16: each vector's step code ``k`` (step ``2^(k/8)``);
* optional per-channel key scales (kv_heads, head_dim), float16, as in
  :class:`lqlib.compressed_cache.CompressedKVCache`: keys are divided by them before coding and
  multiplied after.

Every token is quantized by the Triton kernel when it arrives, at prefill and at each decoded
token: fixed-rate codes can be appended token by token, so there is no full-precision tail and
every key and value attention reads has passed through the codec (the CPU cache with
``recent_window=0`` reads the same numbers). The capacity grows by doubling (rounded up to
``page_size`` tokens), or is reserved up front (``capacity=``). Memory held: :meth:`nbytes`
(codes + steps of the tokens held + key scales) and :meth:`allocated_nbytes` (the whole capacity).
Entropy-coded storage (the CPU cache's sealed rANS pages) is not done here: these codes are the
fixed-rate int8 form, 1 byte per coordinate + 2 bytes per vector.

Attention (the function registered as ``attn_implementation="lqlib_pages"``, see
:func:`register_attention`):

* decode (one query token): :func:`lqlib.kernels.attention.decode_attention` over the codes, with
  no decompressed copy of the history;
* prefill or a chunk of several tokens: the history is dequantized
  (:func:`lqlib.kernels.dequantize`, bit for bit the CPU codec's values), and attention is
  transformers' SDPA (causal) over ``[history ++ new tokens]``; the dequantized copy lives for
  that call only.

Host overhead: a decode step is a handful of launches per layer (stack K and V, quantize, two
``index_copy_`` at a device-side position, the attention and its split combine), with the
position and lengths kept on the device, so a step needs no host value but the token count. With
``cuda_graphs=True`` (CUDA only) each layer records them once as two CUDA graphs (write, attend)
and replays them at every decoded token: a few copies and two replays per layer instead of about
ten launches. The graphs are recorded again after the storage grows (one eager step first, which
compiles any new kernel specialisation).

The layer's ``update`` stores the new tokens and returns two *marker* tensors of the history's
shape (:class:`PagedHistory`, no storage of their own) that carry a reference to their layer; the
attention function reads its layer's codes through them, so two caches in one process never
share state. Any other attention implementation that receives them raises a clear error.
Beam search, ``crop``, batch reshaping, offloading and padded batches at decode raise
:class:`NotImplementedError`.
"""

from __future__ import annotations

import inspect

import numpy as np
import torch
from torch import Tensor
from transformers.cache_utils import Cache

from .. import kernels
from ..coding.codec import E8Codec
from ..errors import InputError
from .compressed import CodedHistoryLayer, check_key_scales, layer_codecs

__all__ = [
    "ATTENTION",
    "DeviceKVCache",
    "DeviceKVLayer",
    "PagedHistory",
    "paged_attention_forward",
    "register_attention",
    "cache_kwarg",
]

ATTENTION = "lqlib_pages"
"""The ``attn_implementation`` name of :func:`paged_attention_forward`."""

CODES_DTYPE = torch.int8
_QUERY_DTYPES = (torch.float16, torch.bfloat16)  # decode_attention's; float32 queries are rounded to float16
STEPS_DTYPE = torch.int16


class PagedHistory(Tensor):
    """Stands for a layer's coded history where transformers expects its keys or values.

    Shape (batch, kv_heads, tokens, head_dim) and the model's dtype, but no data (a broadcast NaN):
    ``layer`` is the :class:`DeviceKVLayer` that holds the codes, ``part`` 0 (keys) or 1 (values).
    Reading shape, dtype or device works; any torch operation on it raises :class:`InputError`.
    """

    layer: DeviceKVLayer
    part: int

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in ("__get__", "size", "dim"):  # shape, dtype, device, ...
            with torch._C.DisableTorchFunctionSubclass():
                return func(*args, **(kwargs or {}))
        raise InputError(
            f"{getattr(func, '__name__', func)} on the keys/values of a DeviceKVCache: they are "
            f"E8 codes on the device; run the model with attn_implementation={ATTENTION!r} "
            "(lqlib.device_cache.register_attention registers it)"
        )

    def __repr__(self) -> str:
        return f"PagedHistory(part={self.part}, shape={tuple(self.shape)}, dtype={self.dtype})"


class DeviceKVLayer(CodedHistoryLayer):
    """One attention layer's history as device-resident E8 codes (see the module docstring).

    Parameters
    ----------
    codec : the keys' E8 codec (per-vector steps; its codes at the head dim must fit int8).
    value_codec : the values' codec (default: ``codec``).
    key_scales : per-channel key scales (kv_heads, head_dim), finite and positive; held as float16.
    capacity : tokens to reserve at the first update (0: what the first update needs, rounded up to
        ``page_size``); the capacity doubles when it runs out.
    page_size : the capacity's granularity in tokens.
    cuda_graphs : record each decode step's launches as CUDA graphs and replay them (CUDA only;
        ignored on other devices).
    graph_pool : a CUDA graph memory pool to share (:class:`DeviceKVCache` gives its layers one).
    """

    _cache_name = "DeviceKVCache"
    _why = "; use greedy or sampling decoding with one unpadded sequence per batch row"

    def __init__(
        self,
        codec: E8Codec,
        value_codec: E8Codec | None = None,
        key_scales: Tensor | None = None,
        capacity: int = 0,
        page_size: int = 256,
        cuda_graphs: bool = False,
        graph_pool=None,
    ) -> None:
        super().__init__()
        if page_size < 1 or capacity < 0:
            raise InputError(f"need page_size >= 1 and capacity >= 0, got {page_size}, {capacity}")
        for c in (codec, value_codec or codec):
            if not isinstance(c, E8Codec) or c.scale != "vector":
                raise InputError(f"the device cache needs E8 codecs with per-vector steps, got {c!r}")
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
        self.codes: Tensor | None = None
        self.steps: Tensor | None = None
        self.position: Tensor | None = None  # (1,) int64 on the device: tokens held (where the next one goes)
        self.lengths: Tensor | None = None  # (batch,) int32 on the device: tokens held, for decode_attention
        self.n_tokens = 0
        self._graphs: dict[str, _Graph] = {}
        self._warm: set[tuple] = set()

    @property
    def capacity(self) -> int:
        """Tokens the allocated storage can hold."""
        return 0 if self.codes is None else self.codes.shape[-2]

    # ------------------------------------------------------------------ transformers API
    def lazy_initialization(self, key_states: Tensor, value_states: Tensor) -> None:
        if key_states.shape != value_states.shape or key_states.dim() != 4:
            raise InputError(
                f"keys {tuple(key_states.shape)} and values {tuple(value_states.shape)} must share a "
                "(batch, kv_heads, tokens, head_dim) shape"
            )
        if key_states.dtype not in kernels.KERNEL_DTYPES:
            raise InputError(f"dtype {key_states.dtype} is not supported; use one of {kernels.KERNEL_DTYPES}")
        batch, heads, _, dim = key_states.shape
        if dim < 8 or dim & (dim - 1):
            raise InputError(f"the device cache needs a power-of-two head dim of at least 8, got {dim}")
        self._check_code_width(dim)
        if self.key_scales is not None:
            if self.key_scales.shape != (heads, dim):
                raise InputError(
                    f"key_scales {tuple(self.key_scales.shape)} do not match {heads} KV heads of dim {dim}"
                )
            self.key_scales = self.key_scales.to(key_states.device)
            self._scales_cache = {}
            self.key_scales32 = self.key_scales.to(torch.float32)  # what decode_attention reads (no cast per call)
        self.dtype, self.device = key_states.dtype, key_states.device
        self.batch, self.heads, self.dim = batch, heads, dim
        self._stub = torch.full((1, 1, 1, 1), float("nan"), dtype=self.dtype, device=self.device)
        self.position = torch.zeros(1, dtype=torch.int64, device=self.device)
        self.lengths = torch.zeros(batch, dtype=torch.int32, device=self.device)
        self._graphs_on = self.cuda_graphs and self.device.type == "cuda"
        self.is_initialized = True

    def _check_code_width(self, dim: int) -> None:
        """Raise unless the codecs' codes at head dim ``dim`` fit the int8 storage."""
        for c in (self.codec, self.value_codec):
            if kernels.code_dtype(c, dim) != CODES_DTYPE:
                raise InputError(
                    f"{c!r} at head dim {dim} needs codes wider than int8; the device cache stores "
                    "int8 codes (lower the rate)"
                )

    def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs) -> tuple[Tensor, Tensor]:
        """Quantize and append the new tokens (batch, kv_heads, tokens, head_dim); return the markers
        (:class:`PagedHistory`) of the whole history that :func:`paged_attention_forward` reads.

        The inputs must be finite (not checked: a check would synchronise with the device)."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if key_states.dtype != self.dtype or value_states.dtype != self.dtype:
            raise InputError(f"this cache holds {self.dtype}, got keys {key_states.dtype}, values {value_states.dtype}")
        if (
            key_states.shape != value_states.shape
            or key_states.dim() != 4
            or key_states.shape[:2] != (self.batch, self.heads)
            or key_states.shape[-1] != self.dim
        ):
            raise InputError(
                f"new keys {tuple(key_states.shape)} / values {tuple(value_states.shape)} do not continue "
                f"the cached ({self.batch}, {self.heads}, tokens, {self.dim}) layout"
            )
        if key_states.device != self.device:
            raise InputError(f"this cache lives on {self.device}, got tensors on {key_states.device}")
        n, t = self.n_tokens, key_states.shape[-2]
        self.reserve(n + t)
        if t == 1:
            if self._graphs_on:
                self._graphed("write", self._write_one, key_states, value_states, key=(self.codes.data_ptr(),))
            else:
                self._write_one(key_states, value_states)
        else:
            self._write_many(key_states, value_states, n)
        self.n_tokens = n + t
        return self._marker(0), self._marker(1)

    def _coded(self, key_states: Tensor, value_states: Tensor) -> list[tuple[Tensor, Tensor]]:
        """Codes and step codes of new tokens: [(codes (2, B, Hkv, T, d), steps (2, B, Hkv, T))] when
        keys and values share a codec, else one pair per part."""
        keys = key_states if self.key_scales is None else key_states / self._scales(key_states.dtype)
        if self.joint:
            return [kernels.quantize(self.codec, torch.stack([keys, value_states]))]
        return [kernels.quantize(self.codec, keys), kernels.quantize(self.value_codec, value_states)]

    def _write_one(self, key_states: Tensor, value_states: Tensor) -> None:
        """Store one token at the device-side position (no host value: what a CUDA graph records)."""
        coded = self._coded(key_states, value_states)
        if len(coded) == 1:
            self.codes.index_copy_(3, self.position, coded[0][0])
            self.steps.index_copy_(3, self.position, coded[0][1])
        else:
            for part, (codes, steps) in enumerate(coded):
                self.codes[part].index_copy_(2, self.position, codes)
                self.steps[part].index_copy_(2, self.position, steps)
        self.position += 1
        self.lengths += 1

    def _write_many(self, key_states: Tensor, value_states: Tensor, n: int) -> None:
        """Store a chunk of tokens at [n, n + T) (prefill), and move the device-side counters."""
        t = key_states.shape[-2]
        coded = self._coded(key_states, value_states)
        if len(coded) == 1:
            self.codes[..., n : n + t, :].copy_(coded[0][0])
            self.steps[..., n : n + t].copy_(coded[0][1])
        else:
            for part, (codes, steps) in enumerate(coded):
                self.codes[part, ..., n : n + t, :].copy_(codes)
                self.steps[part, ..., n : n + t].copy_(steps)
        self.position.fill_(n + t)
        self.lengths.fill_(n + t)

    def attend_one(self, q: Tensor, sm_scale: float | None) -> Tensor:
        """Decode attention of one query token per row, q (B, Hq, d), over the codes held: (B, Hq, d)."""
        from ..kernels.attention import decode_attention

        def attend(q: Tensor) -> Tensor:
            return decode_attention(
                q,
                self.codes[0],
                self.steps[0],
                self.codes[1],
                self.steps[1],
                self.lengths,
                self.codec,
                self.value_codec,
                key_scales=self.key_scales32,
                sm_scale=sm_scale,
            )

        if self._graphs_on:
            return self._graphed("attend", attend, q, key=(self.codes.data_ptr(), sm_scale, q.dtype, tuple(q.shape)))
        return attend(q)

    def _graphed(self, name: str, fn, *inputs: Tensor, key: tuple):
        """Run ``fn(*inputs)`` through a CUDA graph recorded for ``key`` (the storage's address and the
        launch's settings): the first call for a key runs eagerly (compiling kernels), the second
        records the graph; later calls copy the inputs into its buffers and replay it."""
        graph = self._graphs.get(name)
        if graph is None or graph.key != key:
            if (name, key) not in self._warm:
                self._warm.add((name, key))
                return fn(*inputs)
            graph = _Graph.record(fn, inputs, key, self.graph_pool)
            self._graphs[name] = graph
        else:
            for buffer, x in zip(graph.inputs, inputs):
                buffer.copy_(x)
        graph.graph.replay()
        return graph.output

    def _marker(self, part: int) -> PagedHistory:
        marker = Tensor._make_subclass(PagedHistory, self._stub.expand(self.batch, self.heads, self.n_tokens, self.dim))
        marker.layer, marker.part = self, part
        return marker

    def _scales(self, dtype: torch.dtype) -> Tensor:
        """The key scales (kv_heads, 1, head_dim) in ``dtype`` (cached: no cast per call)."""
        cached = self._scales_cache.get(dtype)
        if cached is None:
            cached = self._scales_cache[dtype] = self.key_scales.to(dtype)[:, None, :]
        return cached

    def reserve(self, tokens: int) -> None:
        """Make room for ``tokens`` tokens in all (doubling the capacity, rounded up to ``page_size``)."""
        if tokens <= self.capacity:
            return
        want = max(tokens, self.reserved, 2 * self.capacity)
        want = -(-want // self.page_size) * self.page_size
        codes = torch.empty(2, self.batch, self.heads, want, self.dim, dtype=CODES_DTYPE, device=self.device)
        steps = torch.empty(2, self.batch, self.heads, want, dtype=STEPS_DTYPE, device=self.device)
        if self.n_tokens:
            codes[..., : self.n_tokens, :].copy_(self.codes[..., : self.n_tokens, :])
            steps[..., : self.n_tokens].copy_(self.steps[..., : self.n_tokens])
        self.codes, self.steps = codes, steps

    def dequantized(self, dtype: torch.dtype | None = None) -> tuple[Tensor, Tensor]:
        """The keys and values attention reads, (batch, kv_heads, tokens, head_dim) each, in ``dtype``
        (default: the model's): bit for bit the CPU codec's ``quantize`` of what was written
        (keys multiplied back by their scales in that dtype)."""
        dtype = dtype or self.dtype
        n = self.n_tokens
        if self.joint:
            kv = kernels.dequantize(self.codec, self.codes[..., :n, :], self.steps[..., :n], dtype)
            keys, values = kv[0], kv[1]
        else:
            keys = kernels.dequantize(self.codec, self.codes[0, ..., :n, :], self.steps[0, ..., :n], dtype)
            values = kernels.dequantize(self.value_codec, self.codes[1, ..., :n, :], self.steps[1, ..., :n], dtype)
        if self.key_scales is not None:
            keys = keys * self._scales(dtype)
        return keys, values

    def nbytes(self) -> int:
        """Bytes of the history held: int8 codes and int16 step codes of the tokens stored, key scales."""
        if self.codes is None:
            return 0 if self.key_scales is None else 2 * self.key_scales.numel()
        per_token = 2 * self.batch * self.heads * (self.dim * self.codes.element_size() + self.steps.element_size())
        return per_token * self.n_tokens + (0 if self.key_scales is None else 2 * self.key_scales.numel())

    def allocated_nbytes(self) -> int:
        """Bytes allocated: codes and step codes of the whole capacity, key scales."""
        held = (
            0
            if self.codes is None
            else (self.codes.numel() * self.codes.element_size() + self.steps.numel() * self.steps.element_size())
        )
        return held + (0 if self.key_scales is None else 2 * self.key_scales.numel())


class _Graph:
    """A recorded CUDA graph: its input buffers, its output and the key it was recorded for."""

    def __init__(self, graph, inputs: list[Tensor], output, key: tuple) -> None:
        self.graph, self.inputs, self.output, self.key = graph, inputs, output, key

    @classmethod
    def record(cls, fn, inputs: tuple[Tensor, ...], key: tuple, pool) -> _Graph:
        """Record ``fn`` on copies of ``inputs`` (not run: replay it)."""
        buffers = [x.clone(memory_format=torch.contiguous_format) for x in inputs]
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool):
            output = fn(*buffers)
        return cls(graph, buffers, output, key)


class DeviceKVCache(Cache):
    """A KV cache of E8 codes on the model's device; run the model with ``attn_implementation="lqlib_pages"``.

    Parameters
    ----------
    config : the model's config (every layer must be full attention).
    bits : the codecs' rate (bits/dim), or a (layers, 2) schedule of key and value rates (as
        :class:`lqlib.compressed_cache.CompressedKVCache`); the codes must fit int8 (at head dim 128:
        up to about 4.9 bits/dim).
    rotation, seed : the codecs' rotation (``"rht"`` or ``"none"``) and RHT seed.
    key_scales : optional per-channel key scales, shape (layers, kv_heads, head_dim).
    capacity : tokens to reserve in every layer at the first update (0: grow as needed).
    page_size : the capacity's granularity in tokens.
    cuda_graphs : replay each layer's decode step as CUDA graphs (CUDA only; see the module docstring).
    format : ``"int8"`` (the codec's int8 codes ``2·p`` and int16 step codes, 8 + 16/d bits/dim) or
        ``"nested"`` (the fixed-rate nested E8 format of :mod:`lqlib.coding.nested`: int32 words of 8
        coordinates, int16 step codes, scale-flag bytes; 4.25 bits/dim at d = 128; ``bits`` must be 4).
    search : with ``format="nested"``, how many finer step codes the encoder also tries (the codec's
        ``search``; same format and bits, lower error, more quantize work: with 1, about 0.09 ms more a
        decode step at 32K on an H100 and 8.9 times the quantize time at prefill, 2026-12-06,
        results/gpu_nested_notes.md); 0 otherwise.
    """

    def __init__(
        self,
        config,
        bits: float | np.ndarray = 4.0,
        rotation: str = "rht",
        seed: int = 0,
        key_scales: Tensor | None = None,
        capacity: int = 0,
        page_size: int = 256,
        cuda_graphs: bool = False,
        format: str = "int8",
        search: int = 0,
    ) -> None:
        codecs = layer_codecs(config, bits, rotation, seed, key_scales, "DeviceKVCache")
        if search and format != "nested":
            raise InputError(f"search is an option of the nested format, not of format={format!r}")
        if format == "nested":
            from ..coding.nested import NestedE8Codec
            from .nested_device import NestedDeviceKVLayer

            if np.ndim(bits) or float(bits) != 4.0:
                raise InputError(f"the nested format stores 4 bits/dim per coordinate; got bits={bits!r}")
            nested = NestedE8Codec(rotation, seed, search=search)
            codecs, layer_class = [(nested, nested)] * len(codecs), NestedDeviceKVLayer
        elif format == "int8":
            layer_class = DeviceKVLayer
        else:
            raise InputError(f"format must be 'int8' or 'nested', got {format!r}")
        self.format = format
        register_attention()
        pool = torch.cuda.graph_pool_handle() if cuda_graphs and torch.cuda.is_available() else None
        layers = [
            layer_class(k, v, None if key_scales is None else key_scales[i], capacity, page_size, cuda_graphs, pool)
            for i, (k, v) in enumerate(codecs)
        ]
        super().__init__(layers=layers)

    def nbytes(self) -> int:
        """Bytes of the history held by all layers (codes + step codes of the tokens stored + key scales)."""
        return sum(layer.nbytes() for layer in self.layers)

    def allocated_nbytes(self) -> int:
        """Bytes allocated by all layers (the whole capacity)."""
        return sum(layer.allocated_nbytes() for layer in self.layers)


# ---------------------------------------------------------------------- attention
def paged_attention_forward(
    module: torch.nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[Tensor, None]:
    """transformers attention over a :class:`DeviceKVLayer`'s codes.

    ``query`` (batch, heads, q_len, head_dim); ``key``/``value`` the markers its cache's ``update``
    returned. One query token: :func:`lqlib.kernels.attention.decode_attention` over the codes
    (no mask: a padded batch raises). Several: SDPA over the dequantized history (causal, or the
    mask transformers built). Returns (batch, q_len, heads, head_dim) and no weights.
    """
    if not isinstance(key, PagedHistory) or not isinstance(value, PagedHistory) or key.layer is not value.layer:
        raise InputError(f"attn_implementation={ATTENTION!r} needs a lqlib.device_cache.DeviceKVCache as the cache")
    layer = key.layer
    if dropout:
        raise NotImplementedError("dropout in attention (training) is not supported by the device cache")
    if kwargs.get("output_attentions"):
        raise NotImplementedError("output_attentions is not supported by the device cache")
    if query.shape[-2] == 1:
        if attention_mask is not None:
            raise NotImplementedError(
                "decoding with an attention mask (a padded batch) is not supported by the "
                "device cache: give each batch row the same unpadded length"
            )
        q = query[:, :, 0, :]
        out = layer.attend_one(q if q.dtype in _QUERY_DTYPES else q.to(torch.float16), scaling)
        return out[:, None].to(query.dtype), None
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    keys, values = layer.dequantized(query.dtype)
    return sdpa_attention_forward(module, query, keys, values, attention_mask, dropout=0.0, scaling=scaling, **kwargs)


def register_attention() -> None:
    """Register :func:`paged_attention_forward` (and SDPA's mask builder) with transformers as
    ``"lqlib_pages"``. Idempotent; the registry maps the name to a function and holds no cache state."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    def decode_mask(*args, **kwargs):
        """SDPA's mask builder, but no mask for one unpadded query token: transformers builds one
        while a CUDA graph records (it cannot tell a capture from tracing), which the decode path refuses."""
        q_length = kwargs.get("q_length")
        if q_length is None:  # transformers before 5.2x: the query's cache positions
            positions = kwargs.get("cache_position", args[1] if len(args) > 1 else None)
            q_length = positions.shape[0] if isinstance(positions, Tensor) else positions
        if q_length == 1 and kwargs.get("attention_mask") is None and kwargs.get("local_size") is None:
            return None
        return sdpa_mask(*args, **kwargs)

    AttentionInterface.register(ATTENTION, paged_attention_forward)
    AttentionMaskInterface.register(ATTENTION, decode_mask)


def cache_kwarg(model: torch.nn.Module) -> str:
    """The keyword a model's ``forward`` takes its cache by: ``"cache"`` where it has that parameter
    (transformers 5.24 deprecates ``past_key_values``), else ``"past_key_values"`` (5.17, where an
    unknown ``cache=`` would be swallowed by ``**kwargs`` and no cache used)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


register_attention()
