"""The notebook runner: order from _toc.yml, stale-cache detection, clear failures."""

import nbformat
import pytest

from lqlib.book import runner as book


def make_root(tmp_path, cells):
    (tmp_path / "notebooks" / "part").mkdir(parents=True)
    (tmp_path / "book").mkdir()
    (tmp_path / "book" / "intro.md").write_text("# Intro\n")
    (tmp_path / "_toc.yml").write_text(
        "format: jb-book\nroot: book/intro\nparts:\n  - caption: P\n    chapters:\n"
        "      - file: book/part/second\n      - file: book/part/first\n"
    )
    for name, source in cells.items():
        nb = nbformat.v4.new_notebook()
        params = nbformat.v4.new_code_cell("smoke = False\nout_dir = '.'")
        params.metadata["tags"] = ["parameters"]
        nb.cells = [params, nbformat.v4.new_code_cell(source)]
        nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
        nbformat.write(nb, tmp_path / "notebooks" / "part" / f"{name}.ipynb")
    return tmp_path


def test_jobs_follow_the_toc(tmp_path):
    root = make_root(tmp_path, {"first": "x = 1", "second": "y = 2"})
    jobs = book.notebook_jobs(root)
    assert [j.source.stem for j in jobs] == ["second", "first"]
    assert jobs[0].output == root / "book" / "part" / "second.ipynb"


@pytest.mark.slow
def test_parameters_reach_the_notebook_and_runs_are_cached(tmp_path, monkeypatch):
    root = make_root(
        tmp_path,
        {
            "first": "import os; open('smoke.txt', 'w').write(str(smoke) + os.environ['TQDM_DISABLE'])",
            "second": "open('out.txt', 'w').write(out_dir)",
        },
    )
    log = [str(run) for run in book.execute_notebooks(root, smoke=True, progress=False)]
    assert all("ran in" in line for line in log)
    assert (root / "book" / "part" / "smoke.txt").read_text() == "True1"  # progress bars off in the kernel
    executed = nbformat.read(root / "book" / "part" / "first.ipynb", as_version=4)
    injected = [c for c in executed.cells if "injected-parameters" in c.metadata.get("tags", [])]
    assert len(injected) == 1 and "hide-input" in injected[0].metadata["tags"]  # shown collapsed
    params = [c for c in executed.cells if "parameters" in c.metadata.get("tags", [])]
    assert "remove-cell" in params[0].metadata["tags"]  # the defaults are not shown
    assert "TQDM_DISABLE" not in __import__("os").environ
    assert [str(run) for run in book.execute_notebooks(root, smoke=True, progress=False)] == [
        "book/part/second.ipynb: up to date",
        "book/part/first.ipynb: up to date",
    ]
    # another parameter set, or any change of the library, re-runs everything
    assert all(run.ran for run in book.execute_notebooks(root, smoke=False, progress=False))
    monkeypatch.setattr(book, "_library_digest", lambda: "changed")
    assert all(run.ran for run in book.execute_notebooks(root, smoke=False, progress=False))
    # a change in an earlier notebook re-runs the later ones too
    nb = nbformat.read(root / "notebooks" / "part" / "second.ipynb", as_version=4)
    nb.cells.append(nbformat.v4.new_code_cell("z = 3"))
    nbformat.write(nb, root / "notebooks" / "part" / "second.ipynb")
    assert all(run.ran for run in book.execute_notebooks(root, smoke=False, progress=False))


def test_a_failing_notebook_names_its_cell_and_error(tmp_path):
    root = make_root(tmp_path, {"first": "x = 1", "second": "raise ValueError('the planted failure')"})
    with pytest.raises(
        book.BookBuildError,
        match=r"second.ipynb failed at In \[3\] \(ValueError: the planted failure\); the cell starts with \"raise",
    ):
        book.execute_notebooks(root, progress=False)
    assert not (root / "book" / "part" / "first.ipynb").exists()  # later notebooks do not run


def test_settings_reach_the_notebooks_that_declare_them(tmp_path):
    """--model/--corpus/--device/--dtype go to every notebook whose parameters cell names them (others run
    without them), a change of settings re-runs, and the build report records what ran where."""
    root = make_root(
        tmp_path,
        {
            "first": "open('seen.txt', 'w').write(f'{model}|{corpus}|{device}|{dtype}|{smoke}')",
            "second": "open('plain.txt', 'w').write(str(smoke))",
        },
    )
    nb = nbformat.read(root / "notebooks" / "part" / "first.ipynb", as_version=4)
    nb.cells[0].source += "\nmodel = 'default'\ncorpus = 'pydoc'\ndevice = 'auto'\ndtype = 'float32'"
    nbformat.write(nb, root / "notebooks" / "part" / "first.ipynb")
    settings = book.BookSettings(smoke=True, model="/models/tiny", corpus="wikitext2", device="cpu", dtype="bfloat16")
    runs = book.execute_notebooks(root, progress=False, settings=settings)
    assert (root / "book" / "part" / "seen.txt").read_text() == "/models/tiny|wikitext2|cpu|bfloat16|True"
    assert (root / "book" / "part" / "plain.txt").read_text() == "True"
    assert [run.ran for run in book.execute_notebooks(root, progress=False, settings=settings)] == [False, False]
    other = book.BookSettings(smoke=True, model="/models/other")
    assert all(run.ran for run in book.execute_notebooks(root, progress=False, settings=other))
    report = book.build_report(root, settings, runs, 12.0, 3.0)
    data = __import__("json").loads(report.to_json())
    assert data["mode"] == "smoke" and data["total_s"] == 15.0 and data["settings"]["dtype"] == "bfloat16"
    assert [n["path"] for n in data["notebooks"]] == ["book/part/second.ipynb", "book/part/first.ipynb"]
    assert {"python", "torch", "transformers", "lqlib_digest"} <= set(data["versions"])
    assert data["machine"]["cores"] >= 1
    with pytest.raises(book.InputError if hasattr(book, "InputError") else ValueError):
        book.BookSettings(dtype="int8")


def test_smoke_sizes_are_injected_and_shown(tmp_path):
    """A smoke build passes the notebook's SMOKE sizes as parameters, so the page shows the sizes it ran."""
    root = make_root(tmp_path, {"first": "open('n.txt', 'w').write(str(n))", "second": "x = 1"})
    path = root / "notebooks" / "part" / "first.ipynb"
    nb = nbformat.read(path, as_version=4)
    nb.cells[0].source += "\nn = 1_000_000"
    sizes = nbformat.v4.new_code_cell("SMOKE = {'n': 20}\nif smoke:\n    globals().update(SMOKE)")
    sizes.metadata["tags"] = ["smoke-sizes", "remove-cell"]
    nb.cells.insert(1, sizes)
    nbformat.write(nb, path)
    assert book.effective_parameters(path, book.BookSettings(smoke=True))["n"] == 20
    assert book.effective_parameters(path, book.BookSettings(smoke=False))["n"] == 1_000_000
    book.execute_notebooks(root, smoke=True, progress=False)
    assert (root / "book" / "part" / "n.txt").read_text() == "20"
    executed = nbformat.read(root / "book" / "part" / "first.ipynb", as_version=4)
    injected = next(c for c in executed.cells if "injected-parameters" in c.metadata.get("tags", []))
    assert "n = 20" in injected.source and injected.source.startswith("# the parameters this page was built with")


@pytest.mark.slow
def test_parts_run_side_by_side_and_a_failure_stops_the_rest(tmp_path):
    """jobs=2: two parts run concurrently, each in order; the book-level notebook runs after both; a
    failing notebook stops its part and nothing after it starts."""
    root = tmp_path
    (root / "book").mkdir()
    (root / "book" / "intro.md").write_text("# Intro\n")
    toc = "format: jb-book\nroot: book/intro\nparts:\n"
    sources = {
        "a/one": "import time; time.sleep(2); open('/'.join(['..', 'a_one.txt']), 'w').write('1'); open('mine', 'w')",
        "a/two": "import os; assert os.path.exists('../a_one.txt'); open('../a_two.txt', 'w').write('2')",
        "b/one": "open('mine_b', 'w'); import time; time.sleep(2); open('../b_one.txt', 'w').write('3')",
        "last": "import os; assert all(os.path.exists(f) for f in ('a_one.txt', 'a_two.txt', 'b_one.txt'))",
    }
    for name, source in sources.items():
        (root / "notebooks" / name).parent.mkdir(parents=True, exist_ok=True)
        nb = nbformat.v4.new_notebook()
        params = nbformat.v4.new_code_cell("smoke = False\nout_dir = '.'")
        params.metadata["tags"] = ["parameters"]
        nb.cells = [params, nbformat.v4.new_code_cell(source)]
        nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
        nbformat.write(nb, root / "notebooks" / f"{name}.ipynb")
    toc += "  - caption: A\n    chapters:\n      - file: book/a/one\n      - file: book/a/two\n"
    toc += "  - caption: B\n    chapters:\n      - file: book/b/one\n"
    toc += "  - caption: End\n    chapters:\n      - file: book/last\n"
    (root / "_toc.yml").write_text(toc)
    # the notebooks of a part run in book/<part>/: their '..' is book/, where 'last' looks
    start = __import__("time").perf_counter()
    runs = book.execute_notebooks(root, progress=False, jobs=2)
    assert [r.path for r in runs] == ["book/a/one.ipynb", "book/a/two.ipynb", "book/b/one.ipynb", "book/last.ipynb"]
    assert all(r.ran for r in runs)
    # each kernel ran in its own part's folder, even while the other part's kernel started
    assert (root / "book" / "a" / "mine").is_file() and (root / "book" / "b" / "mine_b").is_file()
    assert __import__("time").perf_counter() - start < sum(r.seconds for r in runs)  # they overlapped
    stamps = {p: p.read_text() for p in (root / "book" / "a" / ".two.stamp", root / "book" / ".last.stamp")}
    nb = nbformat.read(root / "notebooks" / "a" / "one.ipynb", as_version=4)
    nb.cells[1].source = "raise RuntimeError('planted')"
    nbformat.write(nb, root / "notebooks" / "a" / "one.ipynb")
    with pytest.raises(book.BookBuildError, match="planted"):
        book.execute_notebooks(root, progress=False, jobs=2)
    assert all(path.read_text() == old for path, old in stamps.items())  # neither ran again
