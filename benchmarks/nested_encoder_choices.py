"""Two encoder-side changes to the fixed-rate nested format, measured before deciding on them: the mean
squared error on standard Gaussian vectors (over 4^-4, the rate–distortion bound at 4 bits) of

* ``current``: :class:`lqlib.coding.nested.NestedE8Codec`'s rule: a block's nearest E8 point if it lies in
  the cube, else the flagged point of ``y·(2/3)`` (clamped into the safe box if that leaves the cube too);
* ``least-error safe`` / ``least-error wide``: where the nearest point leaves the cube, the encoder
  also codes the block unflagged with ``y`` clamped into the cube (to the safe box [-7, 6.5], or to
  [-7.5, 7] with the safe box as fallback) and keeps whichever of the two has the smaller error;

each at several ``peak`` targets (the largest |rotated coordinate| in lattice units the step aims for),
with ratios to ``current`` at the codec's default peak, in the same run on the same vectors. Both
changes keep the stored format and the decoder; they would need the quantize kernel changed too.

    python benchmarks/nested_encoder_choices.py [--vectors 20000] [--peaks 10 11 12 13]
"""

from __future__ import annotations

import argparse

import torch

from lqlib.coding import nested
from lqlib.core.lattices import nearest_e8
from lqlib.core.rht import fwht

CLAMPS = {"least-error safe": (nested.SAFE_LOW, nested.SAFE_HIGH), "least-error wide": (-7.5, 7.0)}


def _block_error(y: torch.Tensor, points: torch.Tensor, flags: torch.Tensor) -> torch.Tensor:
    beta = torch.where(flags, nested.BETA, 1.0)[..., None]
    return (y - points * beta).square().sum(-1)


def choose(blocks: torch.Tensor, rule: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Blocks (..., 8) in lattice units → (points in the cube, flags) under ``rule``."""
    points, flags = nested._points_in_cube(blocks)
    if rule == "current":
        return points, flags
    low, high = CLAMPS[rule]
    clamped = nearest_e8(blocks.clamp(low, high))
    safe = nearest_e8(blocks.clamp(nested.SAFE_LOW, nested.SAFE_HIGH))
    clamped = torch.where(nested._in_cube(clamped)[..., None], clamped, safe)
    unflagged = torch.zeros_like(flags)
    keep_flagged = _block_error(blocks, points, flags) < _block_error(blocks, clamped, unflagged)
    use_clamped = flags & ~keep_flagged  # only blocks whose nearest point left the cube are flagged
    return torch.where(use_clamped[..., None], clamped, points), flags & keep_flagged


def mse(x: torch.Tensor, peak: float, rule: str) -> float:
    codec = nested.NestedE8Codec(peak=peak)
    d = x.shape[-1]
    u = fwht(x * codec._codec._signs(d, x.device, x.dtype))
    codes = codec.step_codes(u)
    points, flags = choose(codec._blocks(u, codes), rule)
    decoded = codec.synthesise(points.reshape(x.shape), flags, codes)
    return float((decoded.double() - x.double()).square().mean()) / 4.0**-4


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vectors", type=int, default=20000)
    ap.add_argument("--peaks", type=float, nargs="+", default=[10.0, 11.0, 12.0, 13.0])
    args = ap.parse_args(argv)
    gen = torch.Generator().manual_seed(0)
    rules = ["current", *CLAMPS]
    print(f"{'d':>4} {'peak':>5}  " + "  ".join(f"{r:>26}" for r in rules) + f"  ({args.vectors} Gaussian vectors)")
    for d in (64, 128):
        x = torch.randn(args.vectors, d, generator=gen)
        base = mse(x, nested.PEAK, "current")
        for peak in args.peaks:
            cells = [mse(x, peak, rule) for rule in rules]
            print(f"{d:4d} {peak:5.1f}  " + "  ".join(f"{v:9.3f} ({v / base:5.3f}× default)" for v in cells))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
