"""What an encoder-side search could buy the fixed-rate nested format: the mean squared error on
standard Gaussian vectors (over 4^-4, the rate–distortion bound at 4 bits) of
:class:`lqlib.coding.nested.NestedE8Codec` as it is (the step code from the largest rotated
coordinate) and of the same format when the encoder tries the step codes k0 − 3 … k0 + 1 around it
and keeps, per vector, the one with the smallest error (the decoder unchanged).

    python benchmarks/nested_step_search.py [--vectors 20000]
"""

from __future__ import annotations

import argparse

import torch

from lqlib.coding.nested import INV_BETA, LIMIT, SAFE_HIGH, SAFE_LOW, NestedE8Codec, _in_cube
from lqlib.core.lattices import nearest_e8
from lqlib.core.rht import fwht

DELTAS = (-3, -2, -1, 0, 1)


def searched_error(codec: NestedE8Codec, x: torch.Tensor) -> torch.Tensor:
    """Per-vector squared error (n,) of the best of the step codes k0 + DELTAS."""
    d = x.shape[-1]
    u = fwht(x * codec._codec._signs(d, x.device, x.dtype))
    k0 = codec.step_codes(u)
    best = None
    for delta in DELTAS:
        codes = k0 + delta
        blocks = codec._codec._to_lattice_units(u, codes).clamp(-LIMIT, LIMIT).reshape(-1, d // 8, 8)
        first = nearest_e8(blocks)
        fits = _in_cube(first)
        shrunk = blocks * INV_BETA
        second = nearest_e8(shrunk)
        second = torch.where(_in_cube(second)[..., None], second, nearest_e8(shrunk.clamp(SAFE_LOW, SAFE_HIGH)))
        points = torch.where(fits[..., None], first, second).reshape(x.shape)
        err = ((codec.synthesise(points, ~fits, codes) - x) ** 2).sum(-1)
        best = err if best is None else torch.minimum(best, err)
    return best


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vectors", type=int, default=20000)
    args = ap.parse_args(argv)
    gen = torch.Generator().manual_seed(0)
    print(f"{'d':>4} {'as is':>8} {'searched':>9}  (MSE / 4^-4, {args.vectors} Gaussian vectors)")
    for d in (64, 128):
        codec = NestedE8Codec()
        x = torch.randn(args.vectors, d, generator=gen)
        plain = float(((codec.quantize(x) - x) ** 2).mean()) / 4.0**-4
        searched = float(searched_error(codec, x).mean()) / d / 4.0**-4
        print(f"{d:4d} {plain:8.3f} {searched:9.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
