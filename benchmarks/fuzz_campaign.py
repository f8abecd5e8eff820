"""The full fuzz campaign of the decoders: 10^5+ mutated streams, CRC intact and forged, in worker processes.

Runs the cases of :mod:`lqlib.coding.fuzz` (every mutation class × CRC mode ``--per-class`` times, on a
corpus of sound E8 streams in every rotation, scale mode, dtype and four rates, lane pages, and two
~1 MB low-rate streams for the memory bombs) in ``--workers`` processes, each pinned to one thread and
limited to ``--memory-gb`` of address space. A worker that dies is a *crash*, one silent for
``--timeout`` seconds a *hang* (it is killed and replaced; the campaign goes on). Peak memory: the
largest growth of a worker's peak RSS over its level after warm-up that one case caused, per row.

``FUZZ_CAMPAIGN_INJECT="crash@5,hang@9"`` makes the workers abort at case 5 and sleep at case 9: a
check of the crash and hang detection itself (both must be reported, and the campaign go on).

Baseline, measured in the same run: decoding the sound streams themselves (time and memory). The script
prints the slowest mutated decode and the largest memory growth next to the sound streams' values.

Writes ``fuzz_campaign_<date>.json`` and ``.md`` under ``--out`` (default ``results/``): date, versions,
parameters, the table (streams per mutation class and CRC mode; outcomes; slowest decode; peak memory),
the baseline, and samples of any foreign exception, infinity, crash, hang or silent wrong output with
the CRC intact (the acceptance: none of these).

    python benchmarks/fuzz_campaign.py [--per-class 4200] [--workers 2] [--timeout 120] [--out results]
    python benchmarks/fuzz_campaign.py --smoke     # 20 per class, into a temporary directory
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import multiprocessing as mp
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from multiprocessing.connection import wait
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _worker(conn, per_class: int, seed: int, start: int, stop: int, memory_gb: float) -> None:
    """Run cases ``start .. stop - 1`` of the campaign's fixed order, one message per case."""
    os.environ["OMP_NUM_THREADS"] = "1"
    limit = int(memory_gb * 2**30)
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    import torch

    from lqlib.coding import fuzz as F

    torch.set_num_threads(1)
    originals = F.corpus(seed, large=True)
    all_cases = list(F.cases(originals, per_class, seed))
    baseline = _sound_decodes(originals)  # also the warm-up: every decoder path loaded once
    conn.send(("ready", baseline, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss))
    inject = dict(item.split("@")[::-1] for item in os.environ.get("FUZZ_CAMPAIGN_INJECT", "").split(",") if item)
    for i in range(start, stop):
        if inject.get(str(i)) == "crash":  # FUZZ_CAMPAIGN_INJECT="crash@5,hang@9": tests of the detection itself
            os.abort()
        if inject.get(str(i)) == "hang":
            time.sleep(1e6)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        result = F.run_case(originals, all_cases[i], seed)
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        conn.send((i, result, before, after))
    conn.send(("done",))


def _sound_decodes(originals) -> dict:
    """Decoding every sound stream once: the slowest (s) and the largest peak-RSS growth (MB)."""
    from lqlib.coding import rans_lanes as RL
    from lqlib.coding.codec import Encoded

    slowest, grew = 0.0, 0.0
    for o in originals:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        t0 = time.perf_counter()
        o.codec.decode(Encoded.from_bytes(o.data)) if o.kind == "e8" else RL.decode_pages([o.data])
        slowest = max(slowest, time.perf_counter() - t0)
        grew = max(grew, (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024)
    largest = max(len(o.data) for o in originals)
    return {"sound_streams": len(originals), "slowest_sound_decode_s": slowest, "largest_stream_bytes": largest}


class Pool:
    """Worker processes over the fixed case order, each given the next unclaimed stretch of cases."""

    def __init__(self, args) -> None:
        self.args = args
        self.ctx = mp.get_context("spawn")
        self.workers: dict = {}  # connection -> [process, next case index, stop index, ready RSS]

    def start(self, begin: int, stop: int) -> None:
        parent, child = self.ctx.Pipe()
        proc = self.ctx.Process(
            target=_worker, args=(child, self.args.per_class, self.args.seed, begin, stop, self.args.memory_gb)
        )
        proc.start()
        child.close()
        self.workers[parent] = [proc, begin, stop, None]

    def stop(self, conn) -> None:
        proc = self.workers.pop(conn)[0]
        if proc.is_alive():
            proc.kill()
        proc.join()
        conn.close()


def run(args) -> dict:
    from lqlib.coding import fuzz as F

    originals = F.corpus(args.seed, large=True)
    all_cases = list(F.cases(originals, args.per_class, args.seed))
    n = len(all_cases)
    bounds = [round(k * n / args.workers) for k in range(args.workers + 1)]
    pool = Pool(args)
    for k in range(args.workers):
        pool.start(bounds[k], bounds[k + 1])
    results, failures, peak, baseline, worst_rss = [], [], {}, None, 0.0
    last_seen = {conn: time.monotonic() for conn in pool.workers}
    start = time.perf_counter()
    while pool.workers:
        ready = wait(list(pool.workers), timeout=5.0)
        now = time.monotonic()
        for conn in list(pool.workers):
            proc, index, stop, ready_rss = pool.workers[conn]
            if conn in ready:
                try:
                    message = conn.recv()
                except (EOFError, OSError):
                    message = ("died",)
            elif now - last_seen.get(conn, now) > args.timeout + (300 if ready_rss is None else 0):
                message = ("timeout",)
            else:
                continue
            last_seen[conn] = now
            if message[0] == "ready":
                baseline = baseline or message[1]
                pool.workers[conn][3] = message[2]
            elif message[0] in ("died", "timeout"):  # the case it was on: a crash or a hang; go on after it
                outcome = "crash" if message[0] == "died" else "hang"
                pool.stop(conn)
                seconds = float(args.timeout) if outcome == "hang" else 0.0
                results.append(F.Result(all_cases[index], outcome, seconds, outcome))
                failures.append({"case": repr(all_cases[index]), "outcome": outcome, "exitcode": proc.exitcode})
                if index + 1 < stop:
                    pool.start(index + 1, stop)
                    last_seen.update({c: now for c in pool.workers if c not in last_seen})
            elif message[0] == "done":
                pool.stop(conn)
            else:
                i, result, before, after = message
                results.append(result)
                key = (result.case.mutation, result.case.crc)
                peak[key] = max(peak.get(key, 0.0), max(after - max(before, ready_rss), 0) / 1024)
                worst_rss = max(worst_rss, after / 1024)
                pool.workers[conn][1] = i + 1
                if len(results) % 10_000 == 0:
                    print(f"{len(results)}/{n} streams, {time.perf_counter() - start:.0f} s", flush=True)
    elapsed = time.perf_counter() - start
    rows = F.summarize(results, peak_mb=peak)
    samples = [
        {"case": repr(r.case), "original": originals[r.case.original].name, "outcome": r.outcome, "detail": r.detail}
        for r in results
        if r.outcome in ("foreign_exception", "infinities") or (r.outcome == "silent_wrong" and r.case.crc == "intact")
    ][:50]
    return {
        "rows": rows,
        "elapsed_s": elapsed,
        "baseline": baseline,
        "worst_worker_peak_rss_mb": worst_rss,
        "failures": failures,
        "samples": samples,
        "corpus": [o.name for o in originals],
    }


def versions() -> dict:
    names = ("torch", "numpy", "constriction", "transformers")
    out = {"python": platform.python_version(), **{n: importlib.metadata.version(n) for n in names}}
    try:
        git = ["git", "-C", str(REPO)]
        commit = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True)
        dirty = subprocess.run([*git, "status", "--porcelain", "lqlib"], capture_output=True, text=True)
        out["lqlib_commit"] = commit.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except OSError:
        out["lqlib_commit"] = "unknown"
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--per-class", type=int, default=4200, help="cases per mutation class and CRC mode (× 24)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--timeout", type=float, default=120.0, help="seconds without a result: a hang")
    ap.add_argument("--memory-gb", type=float, default=8.0, help="address-space limit per worker")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None)
    ap.add_argument("--smoke", action="store_true", help="20 cases per class, JSON into a temporary directory")
    args = ap.parse_args(argv)
    if args.smoke:
        args.per_class = 20
    out_dir = Path(args.out or (tempfile.mkdtemp() if args.smoke else REPO / "results"))
    out_dir.mkdir(parents=True, exist_ok=True)
    date = datetime.date.today().isoformat()
    report = run(args)
    from lqlib.coding import fuzz as F

    report = {
        "date": date,
        "versions": versions(),
        "parameters": {k: v for k, v in vars(args).items() if k != "out"},
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        **report,
    }
    total = report["rows"][-1]
    base = report["baseline"] or {}
    summary = (
        f"{total['streams']} streams in {report['elapsed_s']:.0f} s on {args.workers} workers: "
        f"{total['foreign_exception']} foreign exceptions, {total['infinities']} infinities, {total['crash']} crashes, "
        f"{total['hang']} hangs, {sum(r['silent_wrong'] for r in report['rows'][:-1] if r['crc'] == 'intact')} "
        f"silent wrong with the CRC intact. Slowest mutated decode {total['slowest_s']:.3f} s vs "
        f"{base.get('slowest_sound_decode_s', float('nan')):.3f} s for the slowest sound stream "
        f"({base.get('largest_stream_bytes', 0)} bytes); largest memory growth of one case {total['peak_mb']:.0f} MB, "
        f"worker peak RSS {report['worst_worker_peak_rss_mb']:.0f} MB."
    )
    report["summary"] = summary
    stem = out_dir / f"fuzz_campaign_{date}"
    stem.with_suffix(".json").write_text(json.dumps(report, indent=1) + "\n")
    markdown = (
        f"# Decoder fuzz campaign, {date}\n\n{summary}\n\nVersions: "
        + ", ".join(f"{k} {v}" for k, v in report["versions"].items())
        + f"\n\nParameters: {report['parameters']}\n\n"
        + F.markdown_table(report["rows"])
        + "\nRows: mutation class × CRC mode (intact: the mutated bytes as they are; forged: the CRC-32 "
        "recomputed; none: GPU lane pages, which carry no checksum). slowest_s: the slowest decode of a row; "
        "peak_mb: the largest growth of a worker's peak RSS that one case of the row caused.\n"
    )
    stem.with_suffix(".md").write_text(markdown)
    print(markdown)
    print(f"written: {stem}.json, {stem}.md")


if __name__ == "__main__":
    main(sys.argv[1:])
