"""Correctness of the nested format's fused decode attention on the GPU across launch shapes: the
largest |difference| from :func:`lqlib.kernels.nested.reference_decode_attention` for each head dim
(64, 128), length (a (batch,) tensor, or an int), tokens per tile, word decoding (inline PTX or
portable) and operand layout (pairs of lanes or one joined operand). Lines over 1e-2 are marked BAD.

Run on the H100 on 2026-12-06 (results/cuda_nested_attention_configs_h100_2026-12-06.log), before
:func:`lqlib.kernels.nested.decode_attention` refused the failing shapes: tiles of fewer than 64
tokens with either GPU-only path, and pairs of lanes below head dim 128 (Triton 3.6). The rows with
``--guarded`` go through the library's own choice of layout and decoding.

    python benchmarks/gpu_nested_attention_configs.py [--guarded]
"""

from __future__ import annotations

import itertools
import sys

import torch

from lqlib.coding.nested import NestedE8Codec
from lqlib.errors import InputError
from lqlib.kernels import nested as kn
from lqlib.kernels.attention import AttentionConfig


def main(argv: list[str] | None = None) -> int:
    guarded = "--guarded" in (argv if argv is not None else sys.argv[1:])
    dev = "cuda"
    bad = 0
    for d in (64, 128):
        b, hkv, hq, n = 2, 2, 4, 45
        gen = torch.Generator().manual_seed(5)
        kc, vc = NestedE8Codec(seed=0), NestedE8Codec(seed=1)
        k, v = torch.randn(2, b, hkv, n, d, generator=gen) * 2
        keys, values = kn.quantize(kc, k.to(dev)), kn.quantize(vc, v.to(dev))
        q = torch.randn(b, hq, d, generator=gen).half().to(dev)
        for length in (torch.tensor([n, 29], device=dev), n, 29):
            ref = kn.reference_decode_attention(q, keys, values, length, kc, vc).float()
            choices = [(None, None)] if guarded else list(itertools.product((True, False), (True, False)))
            for bn, (fast, pairs) in itertools.product((16, 64, 128), choices):
                cfg = AttentionConfig(block_n=bn, splits=2)
                try:
                    got = kn.decode_attention(q, keys, values, length, kc, vc, config=cfg, fast_cvt=fast, pairs=pairs)
                    err = (got.float() - ref).abs().max().item()
                except InputError as e:
                    err = f"refused: {e}"[:90]
                mark = "" if isinstance(err, str) or err < 1e-2 else "  <-- BAD"
                bad += bool(mark)
                shown = "T" if isinstance(length, torch.Tensor) else length
                print(f"d={d} len={shown} bn={bn} fast={fast} pairs={pairs}: {err}{mark}", flush=True)
    print(f"{bad} bad")
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
