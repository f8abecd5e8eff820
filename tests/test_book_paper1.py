"""Paper I's chapter: the gap ladder, the exact Lloyd–Max designs, the E8 walk-through, the sentences built
from numbers (every branch), the verdict inputs, the pictures and the notebooks' conventions."""

from __future__ import annotations

import ast
import json
import math
import re
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from lqlib.book import paper1
from lqlib.book.claims import CLAIMS, claims_of_page
from lqlib.book.paper1_pictures import e8_trace_html, ladder_svg
from lqlib.book.paper_values import TABLE5_PPL
from lqlib.core import theory
from lqlib.core.lattices import LATTICES, nearest_e8, trace_e8
from lqlib.core.scalar import lloyd_max_density, lloyd_max_levels
from lqlib.errors import InputError
from lqlib.evaluation.rate_distortion import (
    LADDER_RUNGS,
    Factor,
    Ladder,
    RungPoint,
    chunked_point,
    equal_rate_ratio,
    gap_at_target,
    gap_ladders,
    make_source,
    plane_point,
)
from lqlib.evaluation.stats import Estimate

ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- core: E8 walk-through, Lloyd–Max


@given(st.lists(st.floats(-50, 50, allow_nan=False), min_size=8, max_size=8), st.floats(0.05, 20.0))
def test_e8_trace_chooses_the_nearest_e8_point(coords, scale):
    x = np.array(coords) / scale
    trace = trace_e8(x)
    nearest = nearest_e8(torch.from_numpy(x).reshape(1, 8))[0].numpy()
    # the same point as the vectorised map, or one at the same distance (the two break ties differently)
    assert np.sum((x - trace.point) ** 2) == pytest.approx(np.sum((x - nearest) ** 2), rel=1e-12, abs=1e-12)
    for coset, shift in ((trace.even, 0.0), (trace.odd, 0.5)):
        integer = coset.point - shift
        assert np.array_equal(integer, np.round(integer)) and int(integer.sum()) % 2 == 0  # a point of the coset
        assert coset.distance2 == pytest.approx(float(np.sum((x - coset.point) ** 2)))
        if coset.fixed is None:
            assert coset.parity == 0 and np.array_equal(coset.point, coset.rounded)
        else:  # the largest rounding error is re-rounded the other way
            assert coset.parity == 1 and abs(coset.error[coset.fixed]) == np.abs(coset.error).max()
            assert abs(coset.point[coset.fixed] - coset.rounded[coset.fixed]) == 1.0
    assert trace.coset == int(trace.odd.distance2 < trace.even.distance2)


def test_e8_trace_refuses_other_shapes():
    with pytest.raises(ValueError):
        trace_e8(np.zeros(7))
    with pytest.raises(ValueError):
        trace_e8(np.array([np.nan] + [0.0] * 7))


def test_lloyd_max_density_matches_max_and_the_lloyd_conditions():
    levels, d = lloyd_max_density("gaussian", 2)
    assert levels == pytest.approx([-math.sqrt(2 / math.pi), math.sqrt(2 / math.pi)], abs=1e-12)
    assert d == pytest.approx(1 - 2 / math.pi, abs=1e-12)
    for n, known in ((4, 0.1175), (8, 0.03454)):  # Max (1960)
        assert lloyd_max_density("gaussian", n)[1] == pytest.approx(known, rel=2e-3)
    assert lloyd_max_density("laplace", 2)[1] == pytest.approx(0.5, abs=1e-12)  # levels ±E|x|, D = 1 − E|x|²
    assert lloyd_max_density("laplace", 3)[1] == pytest.approx(0.2642, abs=1e-4)  # Adams & Giesler
    # levels are the centroids of their cells, checked on a large sample
    x = make_source("gaussian", 2_000_000, seed=5)
    c, _ = lloyd_max_density("gaussian", 16)
    cell = np.searchsorted(0.5 * (c[1:] + c[:-1]), x)
    means = np.bincount(cell, weights=x) / np.bincount(cell)
    assert np.abs(means - c)[2:-2].max() < 0.01
    # the Panter–Dite limit is approached from below
    high = lloyd_max_density("gaussian", 256)[1] * 256**2
    assert 0.99 * theory.PANTER_DITE_GAP < high < theory.PANTER_DITE_GAP
    with pytest.raises(ValueError):
        lloyd_max_density("cauchy", 4)


def test_lloyd_max_levels_any_count():
    x = make_source("gaussian", 200_000, seed=2)
    for n in (3, 6, 11):
        book = lloyd_max_levels(x, n)
        exact, d = lloyd_max_density("gaussian", n)
        assert book.shape == (n,) and np.all(np.diff(book) > 0)
        assert np.abs(book - exact).max() < 0.05
    with pytest.raises(ValueError):
        lloyd_max_levels(x[:3], 4)


def test_high_rate_limits():
    g, lap = theory.high_rate_gaps("gaussian"), theory.high_rate_gaps("laplace")
    assert g["Z"] == pytest.approx(theory.CELL_SHAPE_GAP) and g["fixed"] == theory.PANTER_DITE_GAP
    assert g["E8"] == pytest.approx(1.2243, abs=1e-4)
    assert lap["E8"] == pytest.approx(2 * math.e**2 * LATTICES["E8"].G) and lap["fixed"] == 4.5
    assert theory.FIXED_LENGTH_WASTE_BITS["gaussian"] == pytest.approx(0.3116, abs=1e-4)
    # the waste of the exact 256-level Lloyd–Max index is close to its high-rate value
    c, _ = lloyd_max_density("gaussian", 256)
    x = make_source("gaussian", 2_000_000, seed=4)
    p = np.bincount(np.searchsorted(0.5 * (c[1:] + c[:-1]), x), minlength=256) / x.size
    waste = 8 - float(-(p[p > 0] * np.log2(p[p > 0])).sum())
    assert waste == pytest.approx(theory.FIXED_LENGTH_WASTE_BITS["gaussian"], abs=0.02)
    with pytest.raises(ValueError):
        theory.high_rate_gaps("uniform")


# ----------------------------------------------------------------------------- the gap ladder


@pytest.fixture(scope="module")
def ladders():
    x = make_source("gaussian", 1 << 18, seed=11)
    return {lad.bits: lad for lad in gap_ladders(x, (1.0, 2.5, 6.0), "gaussian", design="gaussian")}


def _within(estimate: Estimate, value: float, widths: float = 3.0) -> bool:
    half = 0.5 * (estimate.high - estimate.low)
    return abs(estimate.value - value) <= widths * half + 1e-12


@pytest.mark.slow
def test_ladder_at_high_rate_meets_the_closed_forms(ladders):
    lad = ladders[6.0]
    assert [r.rung for r in lad.rungs] == list(LADDER_RUNGS)
    for rung in lad.rungs[:4]:
        assert rung.rate == 6.0 and rung.gap.low < rung.gap.value < rung.gap.high
        assert _within(rung.gap, rung.limit * 1.003, 4.0), rung  # ≈ 2πe·G(Λ) at 6 bits
    fixed = lad.rung("Lloyd–Max")
    assert fixed.levels == 64 and fixed.rate == 6.0
    assert _within(fixed.gap, lloyd_max_density("gaussian", 64)[1] * 64**2)  # the exact design, measured
    assert 0.0 < fixed.rate - fixed.index_entropy < theory.FIXED_LENGTH_WASTE_BITS["gaussian"]


def test_ladder_factors_multiply_and_pair(ladders):
    lad = ladders[2.5]
    steps = lad.factors[:5]
    assert [f.name for f in steps][0] == "bound → E8 + EC"
    assert math.prod(f.value.value for f in steps) == pytest.approx(lad.factor("bound", "Lloyd–Max").value.value)
    assert lad.factor("bound", "scalar + EC").value.value == pytest.approx(math.prod(f.value.value for f in steps[:4]))
    assert lad.factor("scalar + EC", "Lloyd–Max").limit == pytest.approx(theory.FIXED_RATE_GAP)
    ratio = lad.factor("E8 + EC", "D4 + EC").value
    assert ratio.low < ratio.value < ratio.high and ratio.n == lad.n_units
    fixed = lad.rung("Lloyd–Max")
    assert fixed.levels == 6 and fixed.rate == pytest.approx(math.log2(6))  # round(2^2.5) levels


def test_ladder_at_one_bit_fixed_rate_wins(ladders):
    lad = ladders[1.0]
    assert lad.factor("scalar + EC", "Lloyd–Max").value.high < 1.0
    fixed = lad.rung("Lloyd–Max")
    assert fixed.index_entropy == pytest.approx(1.0, abs=1e-3)  # two equally likely cells
    assert 0.5 < lad.rung("scalar + EC").cell_mass < 1.0


def test_ladder_on_other_sources():
    lap = gap_ladders(make_source("laplace", 1 << 17, seed=3), (6.0,), "laplace", design="laplace")[0]
    assert lap.limits == "laplace"
    assert _within(lap.rung("E8 + EC").gap, theory.high_rate_gaps("laplace")["E8"] * 1.003, 4.0)
    real = gap_ladders(make_source("gaussian", 1 << 14, seed=1) ** 3, (3.0,), "cubes")[0]
    assert real.limits == "gaussian reference" and real.rung("Lloyd–Max").levels == 8
    with pytest.raises(InputError):
        gap_ladders(np.zeros(10), (2.0,))
    with pytest.raises(InputError):
        gap_ladders(make_source("gaussian", 4096), (2.0,), design="kmeans")


# ----------------------------------------------------------------------------- sentences (every branch)


def _estimate(v: float, half: float = 0.01) -> Estimate:
    return Estimate(v, v - half, v + half, 0.95, 100)


def _ladder(bits: float, penalty: float, cell: float, e8: float, source: str = "gaussian", waste: float = 0.1):
    limits = theory.high_rate_gaps("gaussian" if source == "gaussian reference" else source)
    gaps = {"E8 + EC": e8, "D4 + EC": e8 * 1.07, "A2 + EC": e8 * 1.12, "scalar + EC": cell}
    gaps["Lloyd–Max"] = cell * penalty
    levels = max(2, round(2**bits))
    rungs = tuple(
        RungPoint(
            name,
            bits,
            math.log2(levels) if name == "Lloyd–Max" else bits,
            1e-3,
            _estimate(gaps[name]),
            limits[{"E8 + EC": "E8", "D4 + EC": "D4", "A2 + EC": "A2", "scalar + EC": "Z", "Lloyd–Max": "fixed"}[name]],
            levels=levels if name == "Lloyd–Max" else 0,
            index_entropy=math.log2(levels) - waste if name == "Lloyd–Max" else math.nan,
            cell_mass=0.41 if name == "scalar + EC" else math.nan,
        )
        for name in LADDER_RUNGS
    )
    chain = ["bound", *LADDER_RUNGS]
    limit = {r.rung: r.limit for r in rungs} | {"bound": 1.0}
    value = {r.rung: r.gap.value for r in rungs} | {"bound": 1.0}
    pairs = [*zip(chain[:-1], chain[1:]), ("bound", "scalar + EC"), ("bound", "Lloyd–Max")]
    factors = tuple(Factor(lo, up, _estimate(value[up] / value[lo]), limit[up] / limit[lo]) for lo, up in pairs)
    return Ladder("test", bits, rungs, factors, source, 100)


def _grammatical(text: str) -> None:
    assert text.endswith(".") and "  " not in text and "1 bits" not in text and " 1 levels" not in text
    assert not re.search(r"\b1 bits/dim", text)


def test_ladder_sentence_branches():
    beats = paper1.ladder_sentence(_ladder(1.0, 0.776, 1.87, 1.99, waste=0.0))
    assert beats.startswith("At b = 1 bit/dim fixed rate beats entropy coding (factor 0.776)")
    assert "2 levels are equally likely" in beats and "41% of the samples" in beats
    level = paper1.ladder_sentence(_ladder(1.5, 1.0, 1.7, 1.6, waste=0.02))
    assert "fixed rate and entropy coding are level" in level and "nearly equally likely" in level
    far = paper1.ladder_sentence(_ladder(3.0, 1.52, 1.50, 1.258))
    assert "have not reached their limits yet (fixed-rate penalty 1.520 of 1.912" in far
    assert "8 levels spends 0.100 bits/dim" in far and "at high rate 0.312 bits/dim" in far
    assert "cell shape 1.500 of 1.423" in far and "zero cell" in far  # the cell shape is 5% off its limit
    assert "zero cell" not in paper1.ladder_sentence(_ladder(3.0, 1.52, 1.456, 1.258))  # 2.3% and 2.7% off
    near = paper1.ladder_sentence(_ladder(8.0, 1.89, 1.425, 1.223))
    assert near.startswith("At b = 8 bits/dim every factor is within 3% of its high-rate limit")
    reference = paper1.ladder_sentence(_ladder(3.0, 1.4, 1.45, 1.25, source="gaussian reference"))
    assert "a Gaussian's limits, for reference only" in reference and "(at high rate" not in reference
    laplace = paper1.ladder_sentence(_ladder(8.0, 3.6, 1.23, 1.06, source="laplace"))
    assert "Laplace source's own limits" in laplace
    for text in (beats, level, far, near, reference, laplace):
        _grammatical(text)
    assert "zero cell" not in paper1.ladder_sentence(_ladder(5.0, 1.7, 1.425, 1.225))


def test_words_from_numbers():
    assert paper1.bits_text(1) == "1 bit/dim" and paper1.bits_text(1.5) == "1.5 bits/dim"
    assert paper1.count_text(1, "window") == "1 window" and paper1.count_text(1600, "window") == "1,600 windows"
    assert paper1.interval_text(1.2, 1.1, 1.3, 2) == "1.20 [1.10, 1.30]"


def test_e8_trace_sentence_branches():
    no_fix = trace_e8(np.array([0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1]))  # rounds to 0: even sum, chosen
    text = paper1.e8_trace_sentence(no_fix)
    assert "integer parts sum to 0 (even), so no fix is needed" in text and "integer (D8) one, coset bit 0" in text
    odd = trace_e8(np.array([0.4, 0.45, 0.6, 0.4, 0.45, 0.55, 0.5, 0.45]))
    text = paper1.e8_trace_sentence(odd)
    assert "half-integer (D8 + ½) one, coset bit 1" in text
    fixed = trace_e8(np.array([0.9, 0.1, 0.0, 0.0, 0.0, 0.0, 0.0, 0.3]))  # rounds to a sum of 1: x7 re-rounded
    assert (
        "(odd), so x7, the coordinate with the largest rounding error (+0.300), is re-rounded the other way, to 1"
        in (paper1.e8_trace_sentence(fixed))
    )
    tie = trace_e8(np.full(8, 0.25))
    assert "a tie goes to the integer point" in paper1.e8_trace_sentence(tie)
    html = e8_trace_html(fixed, "caption")
    ET.fromstring(f"<div>{html.replace('&', '&amp;').replace('&amp;amp;', '&amp;')}</div>")  # well-formed
    assert html.count("<tr>") == 9 and "background:#f6d7a7" in html


def test_plane_point_and_sentence():
    x = np.random.default_rng(0).standard_normal((100_000, 2))
    square, hexagon = plane_point(x, "Z", 3.0), plane_point(x, "A2", 3.0)
    assert square.area == pytest.approx(hexagon.area)
    assert square.normalized == pytest.approx(LATTICES["Z"].G, rel=0.02)
    assert hexagon.normalized == pytest.approx(LATTICES["A2"].G, rel=0.02)
    text = paper1.plane_sentence(square, hexagon, 3.0)
    assert "less (the closed forms differ by 3.8%)" in text and "few cells" not in text
    assert "few cells" in paper1.plane_sentence(plane_point(x, "Z", 1.0), plane_point(x, "A2", 1.0), 1.0)
    with pytest.raises(InputError):
        plane_point(x, "D4", 2.0)


# ----------------------------------------------------------------------------- verdict inputs and rows


def test_envelope_passes_only_when_every_interval_does():
    inside = [_estimate(1.22, 0.002), _estimate(1.225, 0.002)]
    env = paper1.envelope(inside)
    assert (env.low, env.high) == (1.218, 1.227)
    band = CLAIMS["I.table4.gap_real_kv"].rule
    assert band.decide(env)[0] == "reproduced"
    assert band.decide(paper1.envelope([*inside, _estimate(1.40, 0.002)]))[0] == "inconclusive"
    assert paper1.envelope([_estimate(1.5), _estimate(1.52), _estimate(1.6)]).value == 1.6  # farthest from 1.52
    with pytest.raises(InputError):
        paper1.envelope([])


def test_judge_claims_of_every_paper1_page():
    verdicts = paper1.judge_claims(claims_of_page("paper1/06_perplexity"), {}, "smollm2-135m-instruct")
    assert {v.outcome for v in verdicts} == {"not run here"}
    assert {v.claim.model for v in verdicts} == set(TABLE5_PPL)
    assert all("--model" in v.why for v in verdicts)
    with pytest.raises(InputError):
        paper1.judge_claims(claims_of_page("paper1/02_lattices"), {})
    row = {"G_measured": 0.07168, "standard_error": 1e-5}
    (verdict,) = paper1.judge_claims(
        claims_of_page("paper1/02_lattices"), {"I.table1.g_e8": paper1.moment_estimate(row)}
    )
    assert verdict.outcome == "reproduced"
    assert {c.id for c in claims_of_page("paper1/04_rht")} == {"I.table2.rht_real_kv.K", "I.table2.rht_real_kv.V"}


def test_barrier_rows_and_estimates(ladders):
    rows = paper1.barrier_rows([ladders[1.0], ladders[6.0]])
    assert [r["bits"] for r in rows] == [1.0, 6.0] and set(paper1.BARRIER_COLUMNS) <= set(rows[0])
    assert rows[0]["fixed_rate_penalty"] < 1 < rows[1]["fixed_rate_penalty"]
    estimates = paper1.barrier_estimates(ladders[6.0])
    assert set(estimates) == {c.id for c in claims_of_page("paper1/01_scalar_barrier")}


def test_table3_estimates_and_rows():
    measured = [
        {
            "target_bits": b,
            "coded_bits": b + 0.01,
            "coded_bits_low": b,
            "coded_bits_high": b + 0.02,
            "gap": 1.224,
            "gap_low": 1.222,
            "gap_high": 1.226,
            "n_blocks": 10,
        }
        for b in (2.0, 2.5, 3.0, 4.0, 5.0, 6.0)
    ]
    rows = paper1.table3_rows(measured)
    assert rows[0]["paper_coded_bits"] == 2.075 and rows[0]["gap_ci"] == "1.2240 [1.2220, 1.2260]"
    saving = [{"target_bits": 4.0, "saving": 0.12, "saving_low": 0.119, "saving_high": 0.121, "n_blocks": 10}]
    estimates = paper1.table3_estimates(rows, saving)
    assert set(estimates) == {c.id for c in claims_of_page("paper1/03_e8_entropy_coding")}
    assert paper1.parity_rows(saving)[0]["saving_ci"] == "0.1200 [0.1190, 0.1210]"


def test_chunked_points_ratio_and_gap():
    x = torch.randn(2, 64, 64, generator=torch.Generator().manual_seed(0))
    from lqlib import E8Codec

    curve = [chunked_point(E8Codec(b), x, 8) for b in (3.0, 4.0, 5.0)]
    assert curve[1].count.sum() == x.numel() and np.all(curve[1].bits > 0)
    same = equal_rate_ratio(curve, curve, float(curve[1].rate()), draws=200)
    assert (same.value, same.low, same.high) == (1.0, 1.0, 1.0)
    codec = E8Codec(4.0)
    gap = gap_at_target(x, codec.quantize(x), 4.0, 8, draws=200)
    whole = ((codec.quantize(x).double() - x.double()).square().mean() / x.double().square().mean()).item() * 4**4
    assert gap.value == pytest.approx(whole) and gap.low <= gap.value <= gap.high
    rows = paper1.rht_rows({("real keys", "none"): curve, ("real keys", "rht"): curve}, float(curve[1].rate()))
    assert rows[0]["ratio_ci"] == "1.000 [1.000, 1.000]"
    with pytest.raises(InputError):
        chunked_point(codec, x, 65)


def test_table5_rows_and_every_models_paper_rows():
    from lqlib.evaluation.perplexity import PerplexityResult

    fp = PerplexityResult(40.0, 20, (10.0, 10.0, 10.0, 10.0), (5, 5, 5, 5))
    four = PerplexityResult(41.0, 20, (10.2, 10.3, 10.2, 10.3), (5, 5, 5, 5))
    rows = paper1.table5_rows({"fp": fp, 4.0: four}, {4.0: 4.08}, draws=200)
    assert rows[1]["kv"].endswith("b = 4") and rows[1]["delta_pct"] == pytest.approx(100 * (math.exp(1 / 20) - 1))
    assert rows[1]["delta_low"] <= rows[1]["delta_pct"] <= rows[1]["delta_high"]
    assert set(paper1.table5_estimates(rows)) == {f"I.table5.{m}" for m in TABLE5_PPL}
    paper_rows = paper1.table5_paper_rows()
    assert [r["model"] for r in paper_rows] == list(TABLE5_PPL)
    assert paper_rows[0]["delta_4_pct"] == pytest.approx(100 * (5.75 / 5.64 - 1))
    assert math.isnan(paper_rows[2]["5"])  # Mistral: no 5-bit value in the paper
    memory = paper1.memory_rows(paper1.MEMORY_SHAPES, {4.0: 4.08}, (131072,))
    assert memory[0]["fp16_GiB"] == 16.0 and memory[0]["e8_4_GiB"] == pytest.approx(16.0 * 4.08 / 16)


def test_kv_sources_rotate_and_label():
    keys, values = torch.randn(3, 2, 16, 64), torch.randn(3, 2, 16, 64)
    sources = paper1.kv_sources(keys, values, [0, 2])
    assert list(sources) == ["keys, layer 0", "values, layer 0", "keys, layer 2", "values, layer 2"]
    assert np.sum(sources["keys, layer 2"] ** 2) == pytest.approx(float(keys[2].double().square().sum()), rel=1e-5)
    with pytest.raises(InputError):
        paper1.kv_sources(keys, values, [3])


# ----------------------------------------------------------------------------- pictures and widgets


def test_ladder_svg_is_well_formed_and_complete(ladders):
    for bits, lad in ladders.items():
        svg = ladder_svg(lad, "Gaussian")
        root = ET.fromstring(svg)
        text = " ".join(t.text or "" for t in root.iter("{http://www.w3.org/2000/svg}text"))
        assert all(rung in text for rung in LADDER_RUNGS)
        assert ("b = 1 bit/dim" in text) == (bits == 1.0)
        assert "high-rate limits: 2.72 = 1.42 × 1.91" in text
        assert f"{lad.rung('Lloyd–Max').gap.value:.3f}" in text


def test_picture_grid_switches_every_kind_of_picture():
    import ipywidgets as widgets

    from lqlib.book.widgets import picture_grid

    svg = '<svg xmlns="http://www.w3.org/2000/svg" width="2" height="2"></svg>'
    box = picture_grid(
        [("a", ["x", "y"], "dropdown"), ("b", ["1", "2", "3"], "slider")],
        lambda a, b: [svg, f"<p>{a}{b}</p>"] if a == "x" else b.encode(),
    )
    dropdown, slider, stack = box.children
    assert isinstance(dropdown, widgets.Dropdown) and isinstance(slider, widgets.SelectionSlider)
    leaves = [leaf for child in stack.children for leaf in child.children]
    assert len(leaves) == 6
    assert isinstance(leaves[0], widgets.VBox) and leaves[0].children[0].format == "svg+xml"
    assert leaves[0].children[1].value == "<p>x1</p>" and leaves[3].format == "png"
    with pytest.raises(InputError):
        picture_grid([("a", ["x"], "knob")], lambda a: b"")
    with pytest.raises(InputError):
        picture_grid([("a", ["x"], True)], lambda a: 3)


# ----------------------------------------------------------------------------- the notebooks


NOTEBOOKS = sorted((ROOT / "notebooks" / "paper1").glob("0*.ipynb"))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_conventions(path):
    cells = json.loads(path.read_text())["cells"]
    tags = [c.get("metadata", {}).get("tags", []) for c in cells]
    sources = ["".join(c["source"]) for c in cells]
    first = next(i for i, t in enumerate(tags) if "parameters" in t)
    assert "smoke-sizes" in tags[first + 1] and "remove-cell" in tags[first + 1]
    smoke = ast.parse(sources[first + 1]).body[0]
    assert isinstance(smoke, ast.Assign) and isinstance(ast.literal_eval(smoke.value), dict)
    assert "hide-input" in tags[first + 2]  # the imports
    for source, cell in zip(sources, cells):
        if cell["cell_type"] == "code":
            assert len(source.splitlines()) <= 30, source[:80]
            assert "tqdm" not in source
        else:
            assert not re.search(r"RESEARCH|§|issue \d|\\text\{[^}]*\\_", source), source[:80]
    page = f"paper1/{path.stem}"
    code = "\n".join(sources)
    if claims_of_page(page):
        assert f'PAGE = "{page}"' in code and "show_criteria(" in code and "show_verdicts(" in code
        criteria, verdicts = code.index("show_criteria("), code.index("show_verdicts(")
        assert criteria < verdicts  # the rule is stated before the result


def test_student_t_is_seeded_and_heavy_tailed():
    from lqlib.book.paper1 import student_t

    a = student_t(20000, 4, 3, torch.Generator().manual_seed(7))
    b = student_t(20000, 4, 3, torch.Generator().manual_seed(7))
    assert a.shape == (20000, 4) and torch.equal(a, b)  # the generator alone decides the draw
    # t3: P(|T| > 3.182) = 0.05 (the 97.5% quantile); a normal would give 0.0015
    tail = (a.abs() > 3.182).double().mean().item()
    assert abs(tail - 0.05) < 0.005
    assert abs(a.median().item()) < 0.02
