"""Command line: ``python -m lqlib <command>``.

Commands
--------
gaussian-table : Paper I, Table 3 from actual bytes (CSV + Markdown).
book : run every notebook (papermill) and build the Jupyter Book (HTML in _build/html).
evaluate : every KV method through the same perplexity windows (CSV + JSON).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from .book.paper1 import TABLE3_COLUMNS, table3_rows
from .book.tables import write_table
from .evaluation.rate_distortion import gaussian_validation

__all__ = ["main"]


def _gaussian_table(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    rows = table3_rows(gaussian_validation(n_blocks=args.blocks, seed=args.seed))
    csv_path, md_path = write_table(rows, Path(args.out) / "gaussian_validation", TABLE3_COLUMNS)
    print(md_path.read_text())
    print(f"wrote {csv_path} and {md_path} in {time.perf_counter() - start:.1f} s")
    return 0 if all(row["lossless"] for row in rows) else 1


def _book(args: argparse.Namespace) -> int:
    from .book.runner import BookBuildError, BookSettings, build_html, build_report, execute_notebooks

    root = Path(args.root).resolve()
    settings = BookSettings(args.smoke, args.model, args.corpus, args.device, args.dtype)
    start = time.perf_counter()
    try:
        runs = execute_notebooks(root, force=args.force, settings=settings, jobs=args.jobs)
        for run in runs:
            print(run, flush=True)
        executed = time.perf_counter()
        if not args.no_build:
            html = build_html(root, strict=not args.lenient)
            print(f"built {html / 'index.html'}")
    except BookBuildError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    report = build_report(root, settings, runs, executed - start, time.perf_counter() - executed)
    (root / "_build").mkdir(exist_ok=True)
    (root / "_build" / "book_build.json").write_text(report.to_json())
    if settings.is_default and all(run.ran for run in runs) and not args.no_build:
        (root / "results" / "book_build.json").write_text(report.to_json())
        print("wrote results/book_build.json (a full build from scratch on the default model)")
    print(f"book done in {report.total_s:.0f} s (smoke={settings.smoke})")
    return 0


def _calibrated_specs(loaded, text: str, args: argparse.Namespace, scored: int) -> list:
    """``lqlib.calibrate`` at every rate, calibrated on the windows right after the scored ones (never scored)."""
    from .alloc.calibrate import calibrate, calibration_statistics
    from .evaluation.perplexity import token_windows

    ids, _ = token_windows(loaded.tokenizer, text, args.window, max_windows=scored + args.calibration_windows)
    calibration = ids[scored:]
    if calibration.shape[0] == 0:
        print("no text left after the scored windows: the calibrated rows are skipped", file=sys.stderr)
        return []
    print(f"calibrating on windows {scored}..{scored + calibration.shape[0] - 1} (not scored)", file=sys.stderr)
    stats = calibration_statistics(loaded, calibration)
    return [calibrate(loaded, float(b), statistics=stats).method_spec(f"calibrated E8 {b}") for b in args.bits]


def _evaluate(args: argparse.Namespace) -> int:
    import json

    from .evaluation.capture import capture_kv
    from .evaluation.corpus import load_corpus
    from .evaluation.harness import compare_methods, hf_quantized_cache, method_specs
    from .evaluation.models import load
    from .evaluation.perplexity import token_windows

    loaded = load(args.model)
    text = load_corpus(args.corpus)
    input_ids, labels = token_windows(loaded.tokenizer, text.text, args.window, max_windows=args.windows)
    kv = capture_kv(loaded, input_ids[:1])
    specs = [spec for b in args.bits for spec in method_specs(b)]
    if not args.no_hf:
        specs += [hf_quantized_cache(b) for b in args.bits if b in (2, 4)]
    if args.calibration_windows > 0:
        specs += _calibrated_specs(loaded, text.text, args, input_ids.shape[0])
    rows = compare_methods(loaded, specs, input_ids, labels, kv)
    for row in rows:
        row.update(model=loaded.name, corpus=text.name, window=args.window, windows=input_ids.shape[0])
    out = Path(args.out)
    write_table(
        rows,
        out / "evaluation",
        {
            "method": "method",
            "bits_per_dim": ("bits/dim", 3),
            "ppl": ("PPL", 3),
            "delta_pct": ("Δ%", 2),
            "mse_k": ("MSE K", 5),
            "mse_v": ("MSE V", 5),
        },
    )
    (out / "evaluation.json").write_text(json.dumps(rows, indent=1))
    print((out / "evaluation.md").read_text())
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
    book.add_argument(
        "--model",
        default="smollm2-135m-instruct",
        help="the embedded default, a local folder or .gguf file, or a Hugging Face id",
    )
    book.add_argument("--corpus", default="pydoc", choices=["pydoc", "wikitext2", "auto"])
    book.add_argument(
        "--jobs",
        type=int,
        default=min(os.cpu_count() or 1, 4),
        help="parts of the book run side by side (default: the cores, at most 4)",
    )
    book.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda or cuda:N")
    book.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16", "float64"])
    book.set_defaults(run=_book)
    ev = sub.add_parser("evaluate", help="perplexity and rate of every KV method on the same windows")
    ev.add_argument("--model", default="smollm2-135m-instruct", help="default model, HF id or local path")
    ev.add_argument("--corpus", default="pydoc", choices=["pydoc", "wikitext2", "auto"])
    ev.add_argument("--bits", type=int, nargs="+", default=[3, 4, 5])
    ev.add_argument("--window", type=int, default=512)
    ev.add_argument("--windows", type=int, default=8)
    ev.add_argument("--no-hf", action="store_true", help="skip HF QuantizedCache (needs optimum-quanto)")
    ev.add_argument(
        "--calibration-windows",
        type=int,
        default=8,
        help="windows after the scored ones that lqlib.calibrate measures its tables on (0: no calibrated rows)",
    )
    ev.add_argument("--out", default="build/evaluation")
    ev.set_defaults(run=_evaluate)
    args = parser.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
