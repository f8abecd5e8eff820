"""What attention leaves unchanged, and the rotary frame keys are coded in.

Exact invariances of softmax attention ``o_i = Σ_t p_it·v_t`` with ``p_i = softmax(s·q_i·K)``:

* **key shift**: adding one vector c to every key of a head adds the constant ``s·q_i·c`` to every
  logit of query i, and softmax ignores constants: the attention weights, hence the output, do not
  change. A key mean removed before quantizing need not even be added back.
* **value shift**: since ``Σ_t p_it = 1``, removing one vector c from every value and adding it to
  the output gives the same output: a value mean removed before quantizing can be added back after
  attention, once per query instead of once per value.

The codecs of :mod:`lqlib.coding.channel_codec` remove a calibrated mean of each channel and add it
back to every decoded vector, which is exact whatever the mean is (these invariances say the key's
could even be skipped).

**Pre-RoPE frame.** A Llama-style model caches keys after the rotary embedding, ``k_t = R_t·κ_t``
with R_t a rotation by angles ``t·θ_i`` in the planes of channels (i, i + d/2). Channel outliers of κ
(the key before RoPE) sit in fixed channels; R_t smears them over each plane as t grows. A cache that
knows each token's position t can code ``κ_t = R_tᵀ·k_t`` and give attention ``R_t·κ̂_t``: the error
keeps its norm and the channel statistics stay put. :func:`unrotate` and :func:`rotate` compute
these maps from the model config, in float64 angles, identically on every path (in-loop quantizer
and cache), so both give the same bits.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from ..errors import InputError

__all__ = ["RotaryFrame", "rotary_frame"]


class RotaryFrame:
    """The rotary embedding of one model: rotations R_t of half-split channel pairs (HF's ``rotate_half``).

    Parameters
    ----------
    inverse_frequencies : θ_i, shape (d/2,), float64 (angles t·θ_i).
    scaling : the factor the model multiplies cos and sin by (1 for the default RoPE); the frame uses
        the pure rotation, so a scaled model's pre-RoPE frame is its keys times this factor.
    """

    def __init__(self, inverse_frequencies: np.ndarray, scaling: float = 1.0) -> None:
        freq = np.asarray(inverse_frequencies, dtype=np.float64).reshape(-1)
        if freq.size == 0 or not np.isfinite(freq).all():
            raise InputError("rotary inverse frequencies must be a non-empty finite vector")
        self.inverse_frequencies = freq
        self.scaling = float(scaling)
        self.head_dim = 2 * freq.size

    def cos_sin(self, start: int, tokens: int, device: torch.device, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """cos and sin of positions start..start + tokens − 1, each (tokens, d) in ``dtype``."""
        angles = np.arange(start, start + tokens, dtype=np.float64)[:, None] * self.inverse_frequencies[None]
        angles = np.concatenate([angles, angles], axis=1)
        return (
            torch.from_numpy(np.cos(angles)).to(device=device, dtype=dtype),
            torch.from_numpy(np.sin(angles)).to(device=device, dtype=dtype),
        )

    def _apply(self, x: Tensor, start: int, sign: float) -> Tensor:
        if x.shape[-1] != self.head_dim:
            raise InputError(f"this rotary frame acts on head dim {self.head_dim}, got {x.shape[-1]}")
        cos, sin = self.cos_sin(start, x.shape[-2], x.device, x.dtype)
        half = self.head_dim // 2
        turned = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
        return x * cos + turned * (sin * sign)

    def rotate(self, x: Tensor, start: int) -> Tensor:
        """R_t·x for x (..., tokens, d) at positions start, start + 1, ... (the model's RoPE, unscaled)."""
        return self._apply(x, start, 1.0)

    def unrotate(self, x: Tensor, start: int) -> Tensor:
        """R_tᵀ·x: the inverse rotation (up to float rounding)."""
        return self._apply(x, start, -1.0)


def rotary_frame(config) -> RotaryFrame:
    """The rotary frame of a transformers config with Llama-style RoPE (``rope_parameters`` or ``rope_theta``).

    Raises :class:`lqlib.InputError` for partial rotary embeddings and position-dependent (dynamic)
    RoPE variants, whose frame a cache cannot reproduce from positions alone."""
    text = config.get_text_config(decoder=True)
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    params = dict(getattr(text, "rope_parameters", None) or {})
    partial = params.get("partial_rotary_factor", getattr(text, "partial_rotary_factor", None))
    if partial not in (None, 1.0):
        raise InputError("pre-RoPE coding needs a rotary embedding over the whole head (partial_rotary_factor = 1)")
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type == "default":
        theta = params.get("rope_theta", getattr(text, "rope_theta", None))
        if theta is None:
            raise InputError("the config names no rope_theta")
        freq = 1.0 / (float(theta) ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
        return RotaryFrame(freq)
    if "dynamic" in rope_type or rope_type == "longrope":
        raise InputError(
            f"rope type {rope_type!r} changes with the sequence length; pre-RoPE coding does not support it"
        )
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    if rope_type not in ROPE_INIT_FUNCTIONS:
        raise InputError(f"unknown rope type {rope_type!r}")
    freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](text, "cpu")
    return RotaryFrame(freq.double().numpy(), scaling)
