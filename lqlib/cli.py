"""Command line: ``python -m lqlib <command>``.

Commands
--------
gaussian-table : Paper I, Table 3 from actual bytes (CSV + Markdown).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from .rate_distortion import gaussian_validation
from .tables import write_table

__all__ = ["main"]

GAUSSIAN_COLUMNS = {
    "target_bits": ("target b", 1),
    "coded_bits": "coded bits/dim (ours)",
    "paper_coded_bits": ("coded bits/dim (paper)", 3),
    "rate_vs_paper": "ours / paper − 1",
    "gap": "gap D/D* (ours)",
    "exact_gap": "2πe·G(E8)",
    "gap_vs_exact": "ours / exact − 1",
    "paper_gap": ("gap (paper)", 3),
    "lossless": "lossless",
}


def _gaussian_table(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    rows = gaussian_validation(n_blocks=args.blocks, seed=args.seed)
    csv_path, md_path = write_table(rows, Path(args.out) / "gaussian_validation", GAUSSIAN_COLUMNS)
    print(md_path.read_text())
    print(f"wrote {csv_path} and {md_path} in {time.perf_counter() - start:.1f} s")
    return 0 if all(row["lossless"] for row in rows) else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lqlib", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    gauss = sub.add_parser("gaussian-table", help="Paper I, Table 3 on a Gaussian source, from actual bytes")
    gauss.add_argument("--blocks", type=int, default=1_000_000, help="number of 8-dim blocks (default 10^6)")
    gauss.add_argument("--seed", type=int, default=0)
    gauss.add_argument("--out", default="build/tables", help="output folder")
    gauss.set_defaults(run=_gaussian_table)
    args = parser.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
