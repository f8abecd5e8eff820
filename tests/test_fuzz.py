"""Fuzzing the decoders in CI: about 10^4 mutated streams of every mutation class, derandomized.

The full campaign (10^5+ streams in worker processes, with crash and hang detection and peak memory)
is ``benchmarks/fuzz_campaign.py``; this runs the same cases in-process at a tenth of the size.
"""

import time

import pytest

from lqlib.coding import fuzz as F

PER_CLASS = 420  # 8 classes × (intact, forged, none) × 420 = 10,080 streams
MAX_NUMEL = 1 << 20  # the decoders' guard, lowered so that memory bombs stay cheap here


@pytest.fixture(scope="module")
def fuzzed():
    originals = F.corpus(seed=0)
    all_cases = list(F.cases(originals, PER_CLASS))
    start = time.perf_counter()
    results = [F.run_case(originals, case, max_numel=MAX_NUMEL) for case in all_cases]
    elapsed = time.perf_counter() - start
    print(f"\n{len(results)} fuzzed streams in {elapsed:.1f} s\n" + F.markdown_table(F.summarize(results)))
    return originals, results, elapsed


@pytest.mark.slow
def test_every_mutation_is_a_clean_error_or_finite(fuzzed):
    """No foreign exception and no NaN/Inf anywhere; with the CRC intact, every mutated stream is refused
    (no silent wrong output); forged streams exercise the checks past the CRC (each class refuses some)."""
    _, results, _ = fuzzed
    rows = F.summarize(results)
    by = {(r["mutation"], r["crc"]): r for r in rows}
    total = by[("all", "all")]
    assert total["streams"] >= 10_000
    assert total["foreign_exception"] == 0, [r.detail for r in results if r.outcome == "foreign_exception"][:5]
    assert total["infinities"] == 0
    for mutation in F.MUTATIONS:
        intact, forged, lanes = (by[(mutation, crc)] for crc in ("intact", "forged", "none"))
        assert intact["clean_error"] == intact["streams"] == PER_CLASS, intact
        assert forged["clean_error"] > 0 and lanes["clean_error"] > 0, (forged, lanes)
        assert forged["streams"] == lanes["streams"] == PER_CLASS
    # the decoding-past-the-payload class: refused whatever the CRC says (sentinel, end state, max_numel)
    assert by[("memory_bomb", "forged")]["clean_error"] == PER_CLASS
    assert by[("memory_bomb", "none")]["clean_error"] == PER_CLASS
    assert total["slowest_s"] < 2.0


@pytest.mark.slow
def test_fuzzing_is_deterministic(fuzzed):
    """The same case gives the same outcome and the same output bits on a second run."""
    originals, results, _ = fuzzed
    for result in results[::20]:
        again = F.run_case(originals, result.case, max_numel=MAX_NUMEL)
        assert (again.outcome, again.digest) == (result.outcome, result.digest), result.case


def test_mutations_change_the_bytes_and_are_reproducible():
    originals = F.corpus(seed=0)
    for case in F.cases(originals, 3):
        data = F.mutate(originals, case)
        assert data != originals[case.original].data, case
        assert data == F.mutate(originals, case), case


def test_summary_rows_count_every_outcome():
    originals = F.corpus(seed=0)
    results = [F.run_case(originals, case, max_numel=MAX_NUMEL) for case in F.cases(originals, 2)]
    rows = F.summarize(results, peak_mb={("bit_flip", "intact"): 1.5})
    assert rows[-1]["streams"] == len(results) == 2 * 3 * len(F.MUTATIONS)
    assert all(sum(row[o] for o in F.OUTCOMES) == row["streams"] for row in rows)
    assert rows[0]["peak_mb"] == 1.5
    table = F.markdown_table(rows)
    assert table.count("\n") == len(rows) + 2 and table.startswith("| mutation | crc | streams |")
