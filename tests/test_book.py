"""The whole book in smoke mode: every notebook through papermill, a strict build, and a reader's checks.

The book is built once, in a copy of the sources (notebooks, prose, _toc.yml, _config.yml), so that a
developer's full build in the checkout is left alone. The checks read the built HTML as a reader
would: every written figure and table is on its page, every paper value stands beside ours, the
scorecard agrees with every chapter, no internal reference or raw LaTeX leaks into the text, and in
Chromium every page loads offline without console errors, is at most about 8 screens long, and every
control of every widget changes the picture.
"""

from __future__ import annotations

import functools
import http.server
import math
import os
import re
import shutil
import threading
import time
from pathlib import Path

import pytest
from bs4 import BeautifulSoup

from lqlib.book import paper_values as pv
from lqlib.book import runner as book

pytestmark = pytest.mark.book

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = "/usr/bin/chromium"
CLAIM_ID = re.compile(r"^(I|II|III|IV)\.\S+$")
MAX_SCREENS = 8.5  # about 8 screens at 1280 × 720, the default width


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    reuse = os.environ.get("LQLIB_TEST_BUILT_BOOK")  # a smoke build made by this fixture (for local reruns)
    if reuse:
        root = Path(reuse)
        return root, root / "_build" / "html"
    root = Path(os.environ.get("LQLIB_TEST_BOOK_DIR") or tmp_path_factory.mktemp("book"))
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
    start = time.perf_counter()
    runs = book.execute_notebooks(root, smoke=True, progress=False, jobs=2)
    executed = time.perf_counter()
    html = book.build_html(root, strict=True)
    done = time.perf_counter()
    print(f"smoke book: notebooks {executed - start:.0f} s, HTML {done - executed:.0f} s")
    for run in runs:
        print(f"  {run.path}: {run.seconds:.1f} s")
    return root, html


def _pages(html: Path) -> dict[str, BeautifulSoup]:
    return {
        path.relative_to(html).with_suffix("").as_posix(): BeautifulSoup(path.read_text(), "html.parser")
        for path in sorted((html / "book").rglob("*.html"))
    }


@pytest.fixture(scope="module")
def pages(built):
    return _pages(built[1])


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def _tables(soup: BeautifulSoup) -> list[tuple[list[str], list[list[str]]]]:
    """Every HTML table as (headers, rows of cell texts)."""
    out = []
    for table in soup.find_all("table"):
        headers = [th.get_text(" ", strip=True) for th in table.find_all("th")]
        rows = [[td.get_text(" ", strip=True) for td in tr.find_all("td")] for tr in table.find_all("tr")]
        out.append((headers, [r for r in rows if r]))
    return out


def test_every_page_is_built_and_every_written_output_is_shown(built, pages):
    """Each figure and table a notebook writes under its part's figures/ and tables/ is shown (by its label)
    on a page of that part; no page shows an error or unresolved glue."""
    root, _ = built
    for name, soup in pages.items():
        text = soup.get_text(" ")
        assert "Traceback" not in text and "{glue:" not in text, name
    unshown = []
    for folder in sorted(p for p in (root / "book").rglob("*") if p.is_dir() and p.name in ("figures", "tables")):
        part = folder.parent.relative_to(root).as_posix()  # book/paper1 or book
        ids = set()
        for name, soup in pages.items():
            if name.rsplit("/", 1)[0] == part or (part == "book" and name.count("/") == 1):
                ids |= {tag.get("id") for tag in soup.find_all(id=True)}
        kind = "fig" if folder.name == "figures" else "tbl"
        suffix = ".png" if kind == "fig" else ".csv"
        for path in sorted(folder.glob(f"*{suffix}")):
            if _slug(f"{kind}-{path.stem}") not in ids:
                unshown.append(f"{part}/{folder.name}/{path.name}")
    assert not unshown, f"written but not shown on any page of its part: {unshown}"


def test_no_internal_references_raw_latex_or_stray_outputs(pages):
    patterns = {
        "internal reference": re.compile(r"RESEARCH\.md|§\s?\d|\bissue \d+\b|book's note on"),
        "raw LaTeX escape": re.compile(r"\\text\{[^}]*\\_"),
        "stray output": re.compile(r"PosixPath\(|<Figure size|<IPython\.core"),
        "broken plural": re.compile(r"\b1 (windows|tokens|configurations|trials|bits)\b"),
    }
    found = []
    for name, soup in pages.items():
        text = soup.get_text(" ")
        found += [f"{name}: {what}: {m.group(0)!r}" for what, rx in patterns.items() for m in rx.finditer(text)]
    assert not found, "\n".join(found)


def _verdicts(soup: BeautifulSoup) -> dict[str, str]:
    """{claim id: verdict} of every verdict table on a page (tables whose first column holds claim ids)."""
    out = {}
    for headers, rows in _tables(soup):
        if headers[:1] == ["id"] and "verdict" in headers:
            at = headers.index("verdict")
            for row in rows:
                if CLAIM_ID.match(row[0]) and at < len(row):
                    out[row[0]] = row[at]
    return out


def test_the_scorecard_says_what_each_chapter_says(pages):
    scorecard = _verdicts(pages["book/scorecard"])
    chapters = {}
    for name, soup in pages.items():
        if name != "book/scorecard":
            for claim, verdict in _verdicts(soup).items():
                assert claim not in chapters, f"{claim} is judged on two pages"
                chapters[claim] = (name, verdict)
    assert scorecard, "the scorecard shows no verdicts"
    assert "missing" not in scorecard.values(), [c for c, v in scorecard.items() if v == "missing"]
    disagree = [
        f"{c}: scorecard {v}, {chapters.get(c, ('no page', '—'))}"
        for c, v in scorecard.items()
        if chapters.get(c, (None, None))[1] != v
    ]
    assert not disagree, "\n".join(disagree)
    outcomes = set(scorecard.values())
    assert outcomes <= {"reproduced", "differs", "inconclusive", "not run here"}


def _numbers(text: str) -> list[float]:
    return [float(x.replace(",", "")) for x in re.findall(r"-?\d[\d,]*\.?\d*", text) if x.strip(",")]


def _paper_values() -> list[tuple[str, float]]:
    """Every number of lqlib.book.paper_values with where it comes from."""
    values = []

    def walk(path: str, value) -> None:
        if isinstance(value, dict):
            for key, item in value.items():
                walk(f"{path}[{key!r}]", item)
        elif isinstance(value, (tuple, list)):
            for i, item in enumerate(value):
                walk(f"{path}[{i}]", item)
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            values.append((path, float(value)))

    for name in pv.__all__:
        if name != "PAPER_MODELS":
            walk(name, getattr(pv, name))
    return values


def test_every_paper_value_stands_beside_ours(pages):
    """Each number quoted from the papers appears in a table column labelled as the paper's, somewhere."""
    shown = []
    for soup in pages.values():
        for headers, rows in _tables(soup):
            whole = bool(headers) and "paper" in headers[0].lower()  # e.g. "model (paper, WikiText-2)": all of it
            columns = [i for i, h in enumerate(headers) if whole or "paper" in h.lower()]
            for row in rows:
                in_row = range(len(row)) if row and "paper" in row[0].lower() else columns  # a row labelled paper
                for i in in_row:
                    if i < len(row):
                        shown += _numbers(row[i])
    missing = [
        path
        for path, value in _paper_values()
        if not any(math.isclose(value, x, rel_tol=1e-9, abs_tol=1e-12) for x in shown)
    ]
    assert not missing, f"paper values shown nowhere in a paper column: {missing}"


@pytest.fixture(scope="module")
def server(built):
    _, html = built
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(html))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


PICTURES = ".jupyter-widgets img, .widget-image, .widget-html svg, .widget-html table"
_VISIBLE_PICTURE = (
    """() => {
    const pictures = [...document.querySelectorAll('"""
    + PICTURES
    + """')];
    const shown = pictures.filter(i => i.offsetParent !== null && i.getBoundingClientRect().width > 0);
    const hash = t => [...t].reduce((h, c) => (Math.imul(h, 31) + c.charCodeAt(0)) | 0, 7);
    const key = i => i.src ? i.src.slice(-64) : 'html' + hash(i.outerHTML);
    return shown.map(key).join('|');
}"""
)


@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="Debian's chromium is not installed (make test installs it)")
def test_pages_in_a_browser(server, pages, tmp_path):
    """Offline (no request leaves the page), no console errors, at most ~8 screens, and every widget
    control (each toggle button, each slider step) changes the picture."""
    from playwright.sync_api import sync_playwright

    heights, moved, frozen = {}, 0, []
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
        page = browser.new_page(viewport={"width": 1280, "height": 720})
        failed, foreign, errors = [], [], []
        page.on("requestfailed", lambda r: failed.append(f"{r.url} {r.failure}"))
        page.on("response", lambda r: failed.append(f"{r.url} {r.status}") if r.status >= 400 else None)
        page.on(
            "request", lambda r: foreign.append(r.url) if not r.url.startswith((server, "data:", "blob:")) else None
        )
        page.on("console", lambda m: errors.append(f"{page.url}: {m.text}") if m.type == "error" else None)
        for name in pages:
            page.goto(f"{server}/{name}.html", wait_until="networkidle")
            heights[name] = page.evaluate("document.documentElement.scrollHeight") / 720
            if not page.query_selector(".jupyter-widgets"):
                continue
            if page.query_selector(".math"):
                page.wait_for_selector("mjx-container", state="attached", timeout=20_000)
            page.wait_for_selector(PICTURES, timeout=30_000)
            for i in range(page.locator(".widget-toggle-button").count()):
                button = page.locator(".widget-toggle-button").nth(i)
                if "mod-active" in (button.get_attribute("class") or ""):
                    continue
                before = page.evaluate(_VISIBLE_PICTURE)
                button.click()
                page.wait_for_timeout(300)
                after = page.evaluate(_VISIBLE_PICTURE)
                if after == before:
                    frozen.append(f"{name}: button {button.inner_text()!r}")
                moved += 1
            handles = page.locator(".widget-slider .noUi-handle, .widget-slider .ui-slider-handle")
            for i in range(handles.count()):
                before = page.evaluate(_VISIBLE_PICTURE)
                handles.nth(i).focus()
                page.keyboard.press("ArrowRight")
                page.wait_for_timeout(300)
                after = page.evaluate(_VISIBLE_PICTURE)
                if after == before:
                    frozen.append(f"{name}: slider {i}")
                moved += 1
            page.screenshot(path=str(tmp_path / f"{name.replace('/', '_')}.png"))
        browser.close()
    assert not failed, failed
    assert not foreign, foreign
    assert not errors, errors
    assert moved > 0 and not frozen, f"controls that do not change the picture: {frozen}"
    long = {name: round(h, 1) for name, h in heights.items() if h > MAX_SCREENS}
    assert not long, f"pages longer than {MAX_SCREENS} screens: {long}"
