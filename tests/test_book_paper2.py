"""Paper II's page logic: rows with the paper's values, estimates against closed forms, sentences in every branch."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lqlib import E8Codec
from lqlib.book import paper2
from lqlib.book import paper_values as pv
from lqlib.evaluation.capture import KVSample
from lqlib.evaluation.perplexity import PerplexityResult
from lqlib.evaluation.stats import Estimate


def test_pages_and_their_layout():
    gen = torch.Generator().manual_seed(0)
    kv = KVSample(torch.randn(2, 3, 130, 64, generator=gen), torch.randn(2, 3, 130, 64, generator=gen), "test")
    pages = paper2.real_pages(kv, 64)
    assert len(pages) == 4 and pages[0].shape == (2, 1, 3, 64, 64)
    assert torch.equal(pages[1][0, 0], kv.keys[0, :, 64:128])
    boxes = paper2.page_layout(E8Codec(4.0), pages[0])
    assert sum(size for _, size in boxes) == E8Codec(4.0).encode(pages[0]).nbytes() and boxes[-1] == ("CRC-32", 4)
    (row,) = paper2.page_budget_rows(pages[:2], [4.0])
    parts = sum(row[k] for k in paper2.PAGE_PARTS)
    assert parts == pytest.approx(row["total_bits_per_dim"], rel=1e-9)
    assert row["compression_vs_fp16"] == pytest.approx(16 / row["total_bits_per_dim"])


def test_end_to_end_rows_carry_the_paper_table():
    row = paper2.end_to_end_row("E8 + EC, b = 4", "4", 4.0, 22.0, 20.0, 2**20, 3.0)
    assert (row["paper_ppl"], row["paper_MB"], row["paper_compression"]) == pv.PAPER2_TABLE["4"][:3]
    assert row["delta_pct"] == pytest.approx(10.0) and row["kv_MiB"] == pytest.approx(0.25)
    assert math.isnan(paper2.end_to_end_row("HF", None, 5.0, 21.0, 20.0, 2**20, 1.0)["paper_ppl"])


def test_estimates_over_windows():
    result = PerplexityResult(30.0, 30, (10.0, 10.0, 10.0), (10, 10, 10))
    e = paper2.ppl_estimate(result)
    assert e.value == pytest.approx(math.e) and e.low == e.high == pytest.approx(math.e)
    base = PerplexityResult(27.0, 30, (9.0, 9.0, 9.0), (10, 10, 10))
    assert paper2.delta_estimate(result, base).value == pytest.approx(100 * math.expm1(0.1))
    c = paper2.compression_estimate(np.array([4.0, 4.0, 4.0]))
    assert c.value == c.low == c.high == 4.0


def test_mse_ratio_and_bits_saved_against_closed_forms():
    """A curve MSE = 4^-R per unit: a point at rate 4 with twice the curve's MSE at 4 saves exactly ½ bit."""
    rng = np.random.default_rng(0)
    units = rng.uniform(0.5, 1.5, 40)
    rates = [3.0, 3.5, 4.0, 4.5]
    curve = [units * 4.0**-r for r in rates]
    point = 2 * units * 4.0**-4.0
    ratio = paper2.mse_ratio_estimate(point, curve[2])
    assert ratio.value == pytest.approx(2.0) and ratio.low == pytest.approx(2.0)
    saved = paper2.bits_saved_estimate(rates, curve, 4.0, point)
    assert saved.value == pytest.approx(0.5, abs=1e-9) and saved.low == pytest.approx(0.5, abs=1e-9)
    outside = paper2.bits_saved_estimate(rates, curve, 2.0, 40 * units)
    assert math.isnan(outside.value)


def test_sentences_in_every_branch():
    s = paper2.chunking_sentence(True, 0.0, 0.27, 128)
    assert "identical perplexities; fed in chunks of 128 tokens they are identical" in s and "0.27%" in s
    assert "defect" in paper2.chunking_sentence(
        False, 1e-6, 0.1, 1
    ) and "chunks of 1 token " in paper2.chunking_sentence(False, 1e-6, 0.1, 1)
    assert (
        paper2.fork_sentence(5.0, 8, 8)
        == "At 5 bits the compressed cache reproduces all 8 tokens of the full-precision text."
    )
    assert paper2.fork_sentence(5.0, 1, 8).endswith("first 1 token of the full-precision text.")
    s = paper2.fork_sentence(5.0, 16, 48, [(" tiny", 0.405), (" molecules", 0.312)])
    assert "weighs ' tiny' (0.405) against ' molecules' (0.312)" in s
    assert paper2.same_prefix([1, 2, 3], [1, 2, 4]) == 2 and paper2.same_prefix([1, 2], [1, 2, 3]) == 2
    args = (4.25, Estimate(1.7, 1.4, 2.0), 4.25, Estimate(6.5, 4.5, 8.6))
    below = paper2.equal_rate_sentence(*args, Estimate(0.26, 0.17, 0.43), 48, 0.5)
    assert "lies at or below 0.5" in below and "48 windows" in below
    assert "lies above 0.5" in paper2.equal_rate_sentence(*args, Estimate(0.7, 0.6, 0.8), 1, 0.5)
    assert "1 window do not decide" in paper2.equal_rate_sentence(*args, Estimate(0.5, 0.3, 0.7), 1, 0.5)
    assert "not defined" in paper2.equal_rate_sentence(*args, Estimate(math.nan, math.nan, math.nan), 2, 0.5)


def test_protocol_rows():
    rows = paper2.paper2_protocol("smollm2", "pydoc", 16, 512, "cpu")
    assert [r["setting"] for r in rows][:3] == ["model", "corpus", "perplexity windows"] and rows[2][
        "ours"
    ] == "16 × 512 tokens"
