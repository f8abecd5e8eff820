"""Command line: ``python -m lqlib <command>``.

Commands
--------
gaussian-table : Paper I, Table 3 from actual bytes (CSV + Markdown).
book : run every notebook (papermill) and build the Jupyter Book (HTML in _build/html).
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


def _book(args: argparse.Namespace) -> int:
    from .book import BookBuildError, build_html, execute_notebooks

    root = Path(args.root).resolve()
    start = time.perf_counter()
    try:
        for line in execute_notebooks(root, smoke=args.smoke, force=args.force):
            print(line, flush=True)
        if not args.no_build:
            html = build_html(root, strict=not args.lenient)
            print(f"built {html / 'index.html'}")
    except BookBuildError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"book done in {time.perf_counter() - start:.0f} s (smoke={args.smoke})")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lqlib", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    gauss = sub.add_parser("gaussian-table", help="Paper I, Table 3 on a Gaussian source, from actual bytes")
    gauss.add_argument("--blocks", type=int, default=1_000_000, help="number of 8-dim blocks (default 10^6)")
    gauss.add_argument("--seed", type=int, default=0)
    gauss.add_argument("--out", default="build/tables", help="output folder")
    gauss.set_defaults(run=_gaussian_table)
    book = sub.add_parser("book", help="execute the notebooks and build the book")
    book.add_argument("--smoke", action="store_true", help="small sizes (CI)")
    book.add_argument("--force", action="store_true", help="re-run notebooks even if up to date")
    book.add_argument("--no-build", action="store_true", help="execute notebooks only")
    book.add_argument("--lenient", action="store_true", help="build without -W -n")
    book.add_argument("--root", default=".", help="repository root (with _toc.yml)")
    book.set_defaults(run=_book)
    args = parser.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
