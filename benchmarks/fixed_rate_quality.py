"""Quality of the fixed-rate nested E8 format on the default model, on the CPU: ΔPPL against the
entropy-coded codec at the same measured bits, the int8 device format and TurboQuant-style at 4 bits,
same windows, paired 95% intervals (:mod:`lqlib.evaluation.fixed_rate`); and the mean squared error
of each quantizer on Gaussian vectors against 4^-4.

Writes ``fixed_rate_quality_<date>.json`` and ``.md`` under ``--out``.

    python benchmarks/fixed_rate_quality.py [--windows 24] [--window 512] [--out results]
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import time
from pathlib import Path

import torch

from lqlib.evaluation.capture import capture_kv
from lqlib.evaluation.corpus import load_corpus
from lqlib.evaluation.fixed_rate import fixed_rate_specs, gaussian_gaps, quality_verdicts
from lqlib.evaluation.harness import compare_methods
from lqlib.evaluation.models import load
from lqlib.evaluation.perplexity import token_windows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--windows", type=int, default=24)
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--gaussian-vectors", type=int, default=20000)
    ap.add_argument("--searches", type=int, nargs="+", default=[0, 1], help="the nested encoder's step searches")
    ap.add_argument("--tag", default="", help="a suffix for the record's file name")
    ap.add_argument("--out", default="results")
    args = ap.parse_args(argv)
    t0 = time.time()
    loaded = load()
    text = load_corpus()
    ids, labels = token_windows(loaded.tokenizer, text.text, args.window, max_windows=args.windows)
    kv = capture_kv(loaded, ids[:1])
    specs = fixed_rate_specs(kv, searches=tuple(args.searches))
    rows = compare_methods(loaded, specs, ids, labels, kv, progress=False)
    methods, ratios = quality_verdicts(rows)
    result = {
        "benchmark": "benchmarks/fixed_rate_quality.py",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": f"CPU ({platform.machine()}), torch {torch.__version__}, {torch.get_num_threads()} threads",
        "model": loaded.name,
        "corpus": text.name,
        "window": args.window,
        "windows": int(ids.shape[0]),
        "methods": methods,
        "ratios": ratios,
        "searches": args.searches,
        "gaussian": gaussian_gaps(n=args.gaussian_vectors, searches=tuple(args.searches)),
        "rows": [{k: v for k, v in r.items() if k not in ("window_nll", "window_tokens")} for r in rows],
        "window_nll": {r["method"]: r["window_nll"] for r in rows},
        "wall_s": time.time() - t0,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"fixed_rate_quality_{datetime.date.today().isoformat()}{'_' + args.tag if args.tag else ''}"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    lines = [
        f"# Fixed-rate nested E8 format: quality ({result['date']}, {result['machine']})",
        "",
        f"{loaded.name}, {result['windows']} windows × {args.window} tokens of {text.name}; paired 95% intervals.",
        "",
        "| method | bits/dim | PPL | ΔPPL % | 95% interval |",
        "| --- | ---: | ---: | ---: | --- |",
    ]
    for m in methods:
        lines.append(
            f"| {m['method']} | {m['bits_per_dim']:.3f} | {m['ppl']:.3f} | {m['delta_pct']:.2f} | "
            f"[{m['low']:.2f}, {m['high']:.2f}] |"
        )
    lines += [
        "",
        "| nested | ΔPPL(nested) / ΔPPL(baseline) | ratio | 95% interval | target | verdict |",
        "| --- | --- | ---: | --- | ---: | --- |",
    ]
    for r in ratios:
        lines.append(
            f"| {r['nested']} | {r['baseline']} | {r['ratio']:.3f} | [{r['low']:.3f}, {r['high']:.3f}] | "
            f"≤ {r['target']} | {r['verdict']} |"
        )
    lines += ["", "| d | method | bits/dim | MSE / 4^-4 |", "| ---: | --- | ---: | ---: |"]
    for g in result["gaussian"]:
        lines.append(f"| {g['dim']} | {g['method']} | {g['bits_per_dim']:.3f} | {g['mse_over_bound']:.3f} |")
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"wrote {stem}.json/.md ({result['wall_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
