"""The whole book in smoke mode: every notebook through papermill, a strict build, and a browser check.

The book is built in a copy of the sources (notebooks, prose, _toc.yml, _config.yml) so that a
developer's full build in the checkout is left alone.
"""

from __future__ import annotations

import functools
import http.server
import shutil
import threading
from pathlib import Path

import pytest

from lqlib.book import runner as book

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = "/usr/bin/chromium"
PAGES = [
    "book/paper1/01_scalar_barrier",
    "book/paper1/02_lattices",
    "book/paper1/03_e8_entropy_coding",
    "book/paper1/04_rht",
    "book/paper1/05_real_kv",
    "book/paper1/06_perplexity",
    "book/paper2/01_system",
    "book/paper2/02_end_to_end",
    "book/paper2/03_mse_vs_turboquant",
    "book/paper2/04_all_methods",
    "book/paper2/05_generate",
    "book/paper2/06_gpu",
    "book/paper3/01_permutation_puzzle",
    "book/paper3/02_theorem_a",
    "book/paper3/03_theorem_b",
    "book/paper3/04_theorem_c",
    "book/paper4/01_sensitivity",
    "book/paper4/02_allocation",
    "book/paper4/03_water_filling",
    "book/paper4/04_beyond",
    "book/scorecard",
]
SLIDER_PAGES = ["book/paper1/01_scalar_barrier", "book/paper3/04_theorem_c", "book/paper4/03_water_filling"]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("book")
    for name in ("notebooks", "book", "_static", "results"):
        shutil.copytree(
            ROOT / name,
            root / name,
            ignore=shutil.ignore_patterns("*.ipynb_checkpoints", ".*.stamp", "figures", "tables"),
        )
    for path in (root / "book").rglob("*.ipynb"):
        path.unlink()  # executed copies from a checkout's own build
    for name in ("_toc.yml", "_config.yml"):
        shutil.copy(ROOT / name, root / name)
    book.execute_notebooks(root, smoke=True, progress=False)
    html = book.build_html(root, strict=True)
    return root, html


def test_every_page_is_built_with_its_figures_tables_and_glue(built):
    root, html = built
    for page in PAGES:
        text = (html / f"{page}.html").read_text()
        assert "Traceback" not in text, f"an error output in {page}"
        assert "{glue:" not in text, f"unresolved glue in {page}"
    scalar = (html / "book/paper1/01_scalar_barrier.html").read_text()
    assert 'id="fig-scalar-barrier"' in scalar and "Fig. 1" in scalar
    assert 'id="tbl-scalar-barrier"' in scalar and "Table 1" in scalar
    assert "application/vnd.jupyter.widget-state+json" in scalar
    for figure in (
        "scalar_barrier",
        "voronoi_z2_a2",
        "table3_rate",
        "rht_rate_distortion",
        "real_kv_gap",
        "perplexity_vs_bits",
    ):
        part = root / "book" / "paper1" / "figures"
        assert (part / f"{figure}.png").stat().st_size > 1000 and (part / f"{figure}.svg").is_file()
    for table in (
        "scalar_barrier",
        "normalized_second_moments",
        "table3_gaussian",
        "parity_saving",
        "one_block",
        "rht_ablation",
        "table4_real_kv",
        "table5_perplexity",
        "table6_memory",
    ):
        assert (root / "book" / "paper1" / "tables" / f"{table}.csv").is_file()
        assert (root / "book" / "paper1" / "tables" / f"{table}.md").is_file()
    for figure in ("page_budget", "mse_vs_turboquant", "all_methods", "cache_growth", "gpu_attention", "gpu_decode"):
        assert (root / "book" / "paper2" / "figures" / f"{figure}.png").stat().st_size > 1000
    for table in (
        "page_budget",
        "end_to_end",
        "mse_vs_turboquant",
        "all_methods",
        "generate",
        "gpu_codec",
        "gpu_attention",
        "gpu_rans",
        "gpu_rans_rate",
        "gpu_decode",
    ):
        assert (root / "book" / "paper2" / "tables" / f"{table}.csv").is_file()
    paper3 = root / "book" / "paper3"
    for figure in ("theorem_a_rho", "theorem_a_scatter", "taylor_check", "theorem_c_range"):
        assert (paper3 / "figures" / f"{figure}.png").stat().st_size > 1000
    for table in ("theorem_a_rho", "taylor_check", "k_path_share", "bias_drift", "theorem_c", "theorem_c_end_to_end"):
        assert (paper3 / "tables" / f"{table}.csv").is_file()
    for figure in ("sensitivity_profile", "slot_check", "allocation", "schedule", "beyond_curve"):
        assert (root / "book" / "paper4" / "figures" / f"{figure}.png").stat().st_size > 1000
    paper4_tables = ("sensitivity", "sensitivity_per_layer", "am_gm", "slot_check", "allocation", "water_filling")
    for table in (*paper4_tables, "beyond_ablation", "beyond_split"):
        assert (root / "book" / "paper4" / "tables" / f"{table}.csv").is_file()
    scorecard = (html / "book/scorecard.html").read_text()
    assert "reproduced" in scorecard and "pending" in scorecard and "MSE vs TurboQuant" in scorecard
    assert "Optimal vs uniform allocation" in scorecard
    assert "Theorem A: Spearman ρ" in scorecard and "Theorem C: range/iso" in scorecard


@pytest.fixture(scope="module")
def server(built):
    _, html = built
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(html))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="Debian's chromium is not installed (make test installs it)")
def test_pages_render_offline_and_the_slider_changes_the_picture(server, tmp_path):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=CHROMIUM,
            args=[
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
            ],
        )
        page = browser.new_page()
        failed, foreign = [], []
        page.on("requestfailed", lambda r: failed.append(f"{r.url} {r.failure}"))
        page.on("response", lambda r: failed.append(f"{r.url} {r.status}") if r.status >= 400 else None)
        page.on(
            "request", lambda r: foreign.append(r.url) if not r.url.startswith((server, "data:", "blob:")) else None
        )
        for name in PAGES:
            page.goto(f"{server}/{name}.html", wait_until="networkidle")
        assert not failed, failed
        assert not foreign, foreign

        def visible_picture() -> str:
            return page.evaluate("""() => {
                const imgs = [...document.querySelectorAll('.jupyter-widgets img, .widget-image')];
                const shown = imgs.filter(i => i.offsetParent !== null && i.getBoundingClientRect().width > 0);
                return shown.map(i => i.src).join('|');
            }""")

        changes = {}
        for name in SLIDER_PAGES:
            page.goto(f"{server}/{name}.html", wait_until="networkidle")
            page.wait_for_selector("mjx-container", timeout=20_000)
            page.wait_for_selector(".widget-slider .noUi-handle, .widget-slider .ui-slider-handle", timeout=30_000)
            before = visible_picture()
            handle = page.locator(".widget-slider .noUi-handle, .widget-slider .ui-slider-handle").first
            handle.focus()
            page.keyboard.press("ArrowRight")
            page.wait_for_timeout(500)
            after = visible_picture()
            page.screenshot(path=str(tmp_path / f"{name.replace('/', '_')}.png"))
            changes[name] = (before, after)
        browser.close()
    for name, (before, after) in changes.items():
        assert before, f"no widget picture is visible on {name}"
        assert after and after != before, f"the slider does not change the picture on {name}"
