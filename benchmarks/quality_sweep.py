"""Quality beyond the paper (issue 18): the full held-out protocol for :func:`lqlib.calibrate`.

On the default model and corpus: calibration on the first ``--calibration-windows`` windows of 512
tokens, held-out perplexity on ``--windows`` windows from ``--eval-start`` on (never used for
calibration). Every KV method runs in-loop on the same windows (the calibrated caches through
their in-loop twin, which gives the real cache's numbers bit for bit; the real cache is run too, once
per target budget, and its NLL recorded beside). Rates are measured from the bytes the real cache
holds: on the calibration windows (what ``calibrate`` meets) and on every held-out window.

Parts (``--parts``):

* ``ablation`` — at each ``--budgets``: the calibrated configuration, each idea left out, each idea
  added alone to a minimal configuration, and the E8 + RHT baselines (uniform and Paper IV's
  allocation), with paired 95% intervals (ΔPPL, and the gap to the full configuration);
* ``split`` — the full configuration with only keys, only values, or only one group of layers coded:
  where the remaining error sits;
* ``curve`` — ΔPPL against measured bits from 2.5 to 5 for uniform, allocated and calibrated E8,
  TurboQuant-style, KIVI-style and HF's quantized cache (quanto).

Every run is appended to a JSON-lines log (``--log``) as it finishes, and runs already in the log are
not repeated (a crashed sweep resumes). At the end the table is written to ``--out`` (JSON with every
window's NLL, and Markdown beside it) with the date, and the ratio of the calibrated configuration's
ΔPPL to the strongest baseline's (allocated E8 + RHT) measured in the same run is printed.

    OMP_NUM_THREADS=1 python benchmarks/quality_sweep.py [--smoke] [--parts ablation split curve]
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch

from lqlib.alloc.beyond import ABLATIONS, FULL, ablation_rows, layer_groups, partial_quantizers, target_verdicts
from lqlib.alloc.calibrate import calibrate, calibration_statistics
from lqlib.alloc.schedule import fit_schedule, schedule_quantizers, uniform_schedule
from lqlib.alloc.sensitivity import measure_sensitivity
from lqlib.book.beyond import ABLATION_COLUMNS
from lqlib.book.tables import write_table
from lqlib.cache.quantized import QuantizeDequantizeCache
from lqlib.evaluation.baselines import KiviStyle, TurboQuantStyle
from lqlib.evaluation.capture import capture_kv
from lqlib.evaluation.corpus import load_corpus
from lqlib.evaluation.harness import compressed_cache_rate, hf_quantized_cache
from lqlib.evaluation.models import load
from lqlib.evaluation.perplexity import perplexity, token_windows

CURVE_BITS = [2.5, 3.0, 3.5, 4.0, 4.5, 5.0]
COLUMNS = {"part": "part", **ABLATION_COLUMNS}


class Sweep:
    """The model, the windows and the log; :meth:`run` scores one method (or takes it from the log)."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.loaded = load()
        ids, labels = token_windows(self.loaded.tokenizer, load_corpus().text, args.window)
        if args.eval_start < args.calibration_windows:
            raise SystemExit("held-out windows must not overlap the calibration windows")
        self.calibration = ids[: args.calibration_windows]
        self.ids = ids[args.eval_start : args.eval_start + args.windows]
        self.labels = labels[args.eval_start : args.eval_start + args.windows]
        self.held_kv = [capture_kv(self.loaded, self.ids[i : i + 1]) for i in range(self.ids.shape[0])]
        self.calib_kv = [capture_kv(self.loaded, self.calibration[i : i + 1]) for i in range(self.calibration.shape[0])]
        self.log_path = Path(args.log)
        self.done = read_logs([*args.extra_logs, self.log_path])  # runs found in any log are not repeated
        fp = self.run("reference", "full precision", 16.0, None, lambda kv: 16.0, {})
        self.fp_nll, self.tokens = fp["window_nll"], fp["window_tokens"]
        self.stats: dict[tuple[bool, int], object] = {}

    @staticmethod
    def _key(row: dict) -> str:
        return json.dumps([row["part"], row["method"], row["budget"], row["windows"], row["eval_start"]])

    def run(self, part, method, budget, make_cache, rate, extra, chunk_size=None, all_rates=False) -> dict:
        """Score ``make_cache`` (None: no cache) on the held-out windows; ``rate(kv)`` is its measured rate on a
        window, taken on every ``--rate-every``-th held-out window (on all of them with ``all_rates``)."""
        row = {"part": part, "method": method, "budget": budget, "windows": self.args.windows}
        row["eval_start"] = self.args.eval_start
        if self._key(row) in self.done:
            return self.done[self._key(row)]
        start = time.perf_counter()
        result = perplexity(
            self.loaded.model, self.ids, self.labels, make_cache, batch_size=2, chunk_size=chunk_size, progress=False
        )
        held = [rate(kv) for kv in (self.held_kv if all_rates else self.held_kv[:: self.args.rate_every])]
        row.update(
            extra,
            ppl=result.ppl,
            window_nll=list(result.window_nll),
            window_tokens=list(result.window_tokens),
            bits_heldout=float(np.mean(held)),
            bits_heldout_windows=held,
            seconds=time.perf_counter() - start,
            time=datetime.datetime.now().isoformat(timespec="seconds"),
        )
        with self.log_path.open("a") as log:
            log.write(json.dumps(row) + "\n")
        self.done[self._key(row)] = row
        if part != "reference":
            pct = 100 * np.expm1((np.sum(row["window_nll"]) - np.sum(self.fp_nll)) / np.sum(self.tokens))
            print(f"{part:9s} {method:45s} {budget:5.2f}  bits {row['bits_heldout']:.3f}  ΔPPL {pct:+.2f}%", flush=True)
        return row

    def statistics(self, pre_rope: bool, sink: int):
        key = (pre_rope, sink)
        if key not in self.stats:
            # captures are shared by all, gradient moments by the same frame (they do not depend on the sink)
            same_frame = [s for (p, _), s in self.stats.items() if p == pre_rope]
            reuse = same_frame[0] if same_frame else next(iter(self.stats.values()), None)
            self.stats[key] = calibration_statistics(
                self.loaded, self.calibration, pre_rope=pre_rope, sink=sink, reuse=reuse
            )
        return self.stats[key]

    def calibrated(self, part, method, budget, settings, quantizers=None, real=False):
        """Calibrate with ``settings`` at ``budget`` and score it (in-loop; also the real cache if ``real``)."""
        kwargs = {"alpha": 0.5, "sink": 1, "pre_rope": True, **settings}
        factory = calibrate(
            self.loaded, budget, statistics=self.statistics(kwargs["pre_rope"], kwargs["sink"]), **kwargs
        )
        keys, values = quantizers(factory) if quantizers else factory.quantizers()
        extra = {"bits_calibration": factory.bits_per_dim, "step": factory.step, "settings": factory.settings}
        row = self.run(
            part,
            method,
            budget,
            lambda: QuantizeDequantizeCache(keys, self.loaded.config, values),
            (lambda kv: factory.rate([kv])) if quantizers is None else (lambda kv: float("nan")),
            extra,
            all_rates=real,
        )
        if real:
            # the real cache, pages coded and decoded on every forward pass: a check that its NLL is the twin's
            self.run(part, method + " [real cache]", budget, factory, lambda kv: float("nan"), extra)
        return row

    def e8(self, part, method, budget, schedule):
        keys, values = schedule_quantizers(schedule)
        extra = {"bits_calibration": compressed_cache_rate(self.calib_kv[0], schedule), "schedule": schedule.tolist()}
        return self.run(
            part,
            method,
            budget,
            lambda: QuantizeDequantizeCache(keys, self.loaded.config, values),
            lambda kv: compressed_cache_rate(kv, schedule),
            extra,
        )

    def sensitivity_weights(self) -> np.ndarray:
        """Paper IV's slot weights, measured as its chapter does: on the first four calibration windows."""
        if not hasattr(self, "_weights"):
            self._weights = measure_sensitivity(self.loaded, self.calibration[:4], progress=False).slot_weights()
        return self._weights


def ablation(sweep: Sweep, budgets, alone_only: bool = False) -> None:
    """Baselines and leave-one-out rows at every budget first, then the rows that add one idea alone."""
    for budget in [] if alone_only else budgets:
        kv = sweep.calib_kv[0]
        sweep.e8("ablation", "uniform E8 + RHT", budget, uniform_schedule(budget, kv))
        weights = sweep.sensitivity_weights()
        sweep.e8("ablation", "allocated E8 + RHT (Paper IV)", budget, fit_schedule(weights, budget, kv)[0])
        for name, (kind, settings) in ABLATIONS.items():
            if kind != "alone":
                sweep.calibrated("ablation", name, budget, settings, real=name == FULL)
    for budget in budgets:
        for name, (kind, settings) in ABLATIONS.items():
            if kind == "alone":
                sweep.calibrated("ablation", name, budget, settings)


def split(sweep: Sweep, budgets, groups: int = 6) -> None:
    n_layers = sweep.loaded.config.num_hidden_layers
    for budget in budgets:
        sweep.calibrated("split", "keys only", budget, {}, lambda f: partial_quantizers(f, values=False))
        sweep.calibrated("split", "values only", budget, {}, lambda f: partial_quantizers(f, keys=False))
        for group in layer_groups(n_layers, groups):
            name = f"layers {group[0]}-{group[-1]} only"
            sweep.calibrated("split", name, budget, {}, lambda f, g=group: partial_quantizers(f, layers=g))


def curve(sweep: Sweep, bits_list, baselines: bool = True) -> None:
    kv = sweep.calib_kv[0]
    for budget in bits_list:
        sweep.calibrated("curve", FULL, budget, {})
        sweep.e8("curve", "uniform E8 + RHT", budget, uniform_schedule(budget, kv))
        sweep.e8(
            "curve", "allocated E8 + RHT (Paper IV)", budget, fit_schedule(sweep.sensitivity_weights(), budget, kv)[0]
        )
    if not baselines:
        return
    for b in (2, 3, 4, 5):
        for name, key, value in (
            ("TurboQuant-style", TurboQuantStyle(b), TurboQuantStyle(b)),
            ("KIVI-style", KiviStyle(b, is_key=True), KiviStyle(b, is_key=False)),
        ):
            sweep.run(
                "curve",
                name,
                float(b),
                lambda k=key, v=value: QuantizeDequantizeCache(
                    k.quantize, sweep.loaded.config, value_quantizer=v.quantize
                ),
                lambda x, k=key, v=value: 0.5 * (k.bits_per_dim(x.keys) + v.bits_per_dim(x.values)),
                {},
            )
    for b in (2, 4):
        spec = hf_quantized_cache(b)
        sweep.run(
            "curve",
            "HF QuantizedCache (quanto)",
            float(b),
            spec.cache_factory(sweep.loaded.config),
            spec.bits_per_dim,
            {},
            chunk_size=spec.chunk_size,
        )


def read_logs(paths) -> dict:
    """Every run found in the JSON-lines logs ``paths`` (missing ones skipped), keyed as :class:`Sweep` keys them."""
    done = {}
    for path in paths:
        if Path(path).exists():
            for line in Path(path).read_text().splitlines():
                row = json.loads(line)
                done[Sweep._key(row)] = row
    return done


PART_ORDER = ("ablation", "split", "curve")
BASELINES = ("uniform E8 + RHT", "allocated E8 + RHT (Paper IV)")


def row_order(row: dict) -> tuple:
    """The order a one-process sweep writes: by part; ablation rows by budget, baselines, then
    :data:`ABLATIONS` (each real-cache check after its row); split rows by budget; curve rows by family."""
    method = row["method"].removesuffix(" [real cache]")
    names = [*BASELINES, *ABLATIONS]
    rank = names.index(method) if method in names else len(names)
    real = row["method"].endswith("[real cache]")
    if row["part"] == "curve":
        return (PART_ORDER.index("curve"), rank, row["method"], row["budget"])
    return (PART_ORDER.index(row["part"]), row["budget"], rank, real)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: a check that the script runs")
    parser.add_argument("--parts", nargs="*", default=["ablation", "split", "curve"])
    parser.add_argument("--budgets", type=float, nargs="+", default=[3.25, 4.25])
    parser.add_argument("--curve-bits", type=float, nargs="+", default=CURVE_BITS)
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--windows", type=int, default=24)
    parser.add_argument("--eval-start", type=int, default=8)
    parser.add_argument("--calibration-windows", type=int, default=8)
    parser.add_argument(
        "--rate-every",
        type=int,
        default=3,
        help="held-out rates on every n-th window (all of them for the headline rows)",
    )
    date = datetime.date.today().isoformat()
    parser.add_argument("--out", default=f"results/quality_sweep_{date}.json")
    parser.add_argument("--log", default="results/quality_sweep_log.jsonl")
    parser.add_argument(
        "--assemble", action="store_true", help="write the record from the logs alone (a sweep run elsewhere)"
    )
    parser.add_argument("--machine", default="", help="with --assemble: the machine the logs ran on (JSON)")
    parser.add_argument(
        "--alone-only", action="store_true", help="ablation: only the rows that add one idea to the minimal one"
    )
    parser.add_argument(
        "--no-curve-baselines",
        action="store_true",
        help="curve: only the E8 rows (the scalar baselines run in another process of a parallel sweep)",
    )
    parser.add_argument("--extra-logs", nargs="*", default=[], help="more logs to read (e.g. of a parallel run)")
    args = parser.parse_args(argv)
    if args.smoke:
        args.window, args.windows, args.eval_start, args.calibration_windows = 128, 2, 2, 1
        args.budgets, args.curve_bits, args.parts = [4.25], [4.0], ["ablation"]
        args.out, args.log = "build/quality_sweep_smoke.json", "build/quality_sweep_smoke_log.jsonl"
        Path(args.log).unlink(missing_ok=True)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.log).parent.mkdir(parents=True, exist_ok=True)
    machine = {"platform": platform.platform(), "torch": torch.__version__, "threads": torch.get_num_threads()}
    if args.assemble:  # the record from the logs of a (parallel) sweep that ran elsewhere: no model, no runs
        done = read_logs([*args.extra_logs, args.log])
        model_name, machine = "smollm2-135m-instruct", json.loads(args.machine) if args.machine else machine
    else:
        sweep = Sweep(args)
        for part in args.parts:
            {
                "ablation": lambda: ablation(sweep, args.budgets, args.alone_only),
                "split": lambda: split(sweep, args.budgets),
                "curve": lambda: curve(sweep, args.curve_bits, not args.no_curve_baselines),
            }[part]()
        done, model_name = sweep.done, sweep.loaded.name
    same = [r for r in done.values() if r["windows"] == args.windows and r["eval_start"] == args.eval_start]
    reference = next(r for r in same if r["part"] == "reference")
    fp_nll, tokens = reference["window_nll"], reference["window_tokens"]
    results = sorted((r for r in same if r["part"] != "reference"), key=row_order)
    rows = []
    for part in ("ablation", "split", "curve"):
        part_rows = ablation_rows([r for r in results if r["part"] == part], fp_nll, tokens)
        for row, source in zip(part_rows, [r for r in results if r["part"] == part]):
            row["part"] = part
            row["kind"] = ABLATIONS.get(source["method"], ("baseline" if part == "ablation" else part,))[0]
        rows += part_rows
    verdicts = target_verdicts([r for r in rows if r["part"] == "ablation"])
    ratios = {}
    for budget in args.budgets:
        at = {r["method"]: r for r in rows if r["part"] == "ablation" and r["budget"] == budget}
        if FULL in at and "allocated E8 + RHT (Paper IV)" in at:
            ratios[budget] = at[FULL]["delta_pct"] / at["allocated E8 + RHT (Paper IV)"]["delta_pct"]
            print(f"at {budget:g} bits/dim: ΔPPL calibrated / ΔPPL allocated E8 + RHT = {ratios[budget]:.3f}")
    for v in verdicts:
        r = v["row"]
        got = (
            "no row"
            if r is None
            else f"{r['delta_pct']:+.2f}% [{r['low']:+.2f}, {r['high']:+.2f}] at {r['bits_heldout']:.3f} bits"
        )
        print(f"target ≤ {v['limit']}% at ≤ {v['bits']} bits: {'met' if v['met'] else 'missed'} ({got})")
    record = {
        "date": datetime.date.today().isoformat(),
        "protocol": {
            "model": model_name,
            "corpus": "pydoc",
            "window": args.window,
            "calibration_windows": args.calibration_windows,
            "eval_start": args.eval_start,
            "windows": args.windows,
            "rates": "bytes the real cache holds, calibration and held-out windows (batch 1)",
        },
        "machine": machine,
        "rows": rows,
        "verdicts": verdicts,
        "ratio_to_allocated": ratios,
        "results": results,
        "reference": {"window_nll": fp_nll, "window_tokens": tokens},
    }
    Path(args.out).write_text(json.dumps(record, indent=1))
    write_table(rows, Path(args.out).with_suffix(""), COLUMNS)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
