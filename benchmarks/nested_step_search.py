"""What the encoder-side step search buys the fixed-rate nested format: the mean squared error on
standard Gaussian vectors (over 4^-4, the rate–distortion bound at 4 bits) of
:class:`lqlib.coding.nested.NestedE8Codec` with ``search`` = 0 (the step code from the largest rotated
coordinate) to :data:`~lqlib.coding.nested.SEARCH_MAX` (the encoder also tries that many finer step
codes and keeps the best; the decoder and the stored bits unchanged), and each one's ratio to the
unsearched error, measured in the same run on the same vectors.

    python benchmarks/nested_step_search.py [--vectors 20000]
"""

from __future__ import annotations

import argparse

import torch

from lqlib.coding.nested import SEARCH_MAX, NestedE8Codec


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vectors", type=int, default=20000)
    args = ap.parse_args(argv)
    gen = torch.Generator().manual_seed(0)
    print(f"{'d':>4} {'search':>6} {'MSE/4^-4':>9} {'vs search 0':>11}  ({args.vectors} Gaussian vectors)")
    for d in (64, 128):
        x = torch.randn(args.vectors, d, generator=gen)
        plain = None
        for search in range(SEARCH_MAX + 1):
            mse = float((NestedE8Codec(search=search).quantize(x).double() - x.double()).square().mean()) / 4.0**-4
            plain = plain or mse
            print(f"{d:4d} {search:6d} {mse:9.3f} {mse / plain:11.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
