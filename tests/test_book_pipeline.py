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


def test_parameters_reach_the_notebook_and_runs_are_cached(tmp_path, monkeypatch):
    root = make_root(
        tmp_path,
        {
            "first": "import os; open('smoke.txt', 'w').write(str(smoke) + os.environ['TQDM_DISABLE'])",
            "second": "open('out.txt', 'w').write(out_dir)",
        },
    )
    log = book.execute_notebooks(root, smoke=True, progress=False)
    assert all("ran in" in line for line in log)
    assert (root / "book" / "part" / "smoke.txt").read_text() == "True1"  # progress bars off in the kernel
    executed = nbformat.read(root / "book" / "part" / "first.ipynb", as_version=4)
    injected = [c for c in executed.cells if "injected-parameters" in c.metadata.get("tags", [])]
    assert len(injected) == 1 and "remove-cell" in injected[0].metadata["tags"]
    assert "TQDM_DISABLE" not in __import__("os").environ
    assert book.execute_notebooks(root, smoke=True, progress=False) == [
        "book/part/second.ipynb: up to date",
        "book/part/first.ipynb: up to date",
    ]
    # another parameter set, or any change of the library, re-runs everything
    assert all("ran in" in line for line in book.execute_notebooks(root, smoke=False, progress=False))
    monkeypatch.setattr(book, "_library_digest", lambda: "changed")
    assert all("ran in" in line for line in book.execute_notebooks(root, smoke=False, progress=False))
    # a change in an earlier notebook re-runs the later ones too
    nb = nbformat.read(root / "notebooks" / "part" / "second.ipynb", as_version=4)
    nb.cells.append(nbformat.v4.new_code_cell("z = 3"))
    nbformat.write(nb, root / "notebooks" / "part" / "second.ipynb")
    assert all("ran in" in line for line in book.execute_notebooks(root, smoke=False, progress=False))


def test_a_failing_notebook_names_its_cell_and_error(tmp_path):
    root = make_root(tmp_path, {"first": "x = 1", "second": "raise ValueError('the planted failure')"})
    with pytest.raises(
        book.BookBuildError,
        match=r"second.ipynb failed at In \[3\] \(ValueError: the planted failure\); the cell starts with \"raise",
    ):
        book.execute_notebooks(root, progress=False)
    assert not (root / "book" / "part" / "first.ipynb").exists()  # later notebooks do not run
