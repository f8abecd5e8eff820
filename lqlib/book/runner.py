"""Regenerating the book: papermill runs every notebook, then Jupyter Book builds the HTML.

Layout (paths relative to the repository root)::

    notebooks/<part>/<name>.ipynb   source notebooks (committed, no outputs)
    book/<part>/<name>.ipynb        executed copies (ignored by git), beside their
    book/<part>/figures|tables/     figures (PNG + SVG) and tables (CSV + Markdown)
    _toc.yml, _config.yml, book/*.md  the book itself
    _build/html                     the built book

Notebooks run in the order of ``_toc.yml``, each in its output folder, with the
parameters ``smoke`` (small sizes for CI) and ``out_dir``. A notebook is re-run
unless a stamp shows that its source, every ``lqlib`` source file, the
parameters and every notebook before it are unchanged, so library changes are
never served from a stale cache.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from ..errors import LqlibError

__all__ = ["NotebookJob", "notebook_jobs", "execute_notebooks", "build_html", "BookBuildError"]

LIBRARY = Path(__file__).resolve().parent
_QUIET_KERNEL = {"TQDM_DISABLE": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}


class BookBuildError(LqlibError, RuntimeError):
    """A notebook failed (its path, cell and error are in the message) or Sphinx reported a problem."""


@dataclass(frozen=True)
class NotebookJob:
    """One notebook to execute: its source and where the executed copy goes."""

    source: Path
    output: Path

    @property
    def stamp(self) -> Path:
        return self.output.with_name(f".{self.output.stem}.stamp")


def _toc_files(toc: dict) -> list[str]:
    files = []

    def walk(node):
        if isinstance(node, dict):
            if "file" in node:
                files.append(node["file"])
            for key in ("parts", "chapters", "sections"):
                for child in node.get(key, []):
                    walk(child)
        elif isinstance(node, list):
            for child in node:
                walk(child)

    files.append(toc["root"])
    walk(toc)
    return files


def notebook_jobs(root: Path) -> list[NotebookJob]:
    """The notebooks of ``_toc.yml`` that have a source under ``notebooks/``, in book order."""
    toc = yaml.safe_load((root / "_toc.yml").read_text())
    jobs = []
    for entry in _toc_files(toc):
        relative = Path(entry).relative_to("book") if entry.startswith("book/") else Path(entry)
        source = root / "notebooks" / relative.with_suffix(".ipynb")
        if source.is_file():
            jobs.append(NotebookJob(source, root / "book" / relative.with_suffix(".ipynb")))
    return jobs


def _library_digest() -> str:
    digest = hashlib.sha256()
    for path in sorted(LIBRARY.rglob("*.py")):
        digest.update(path.relative_to(LIBRARY).as_posix().encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def _restore(name: str, value: str | None) -> None:
    if value is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = value


def _hide_injected_parameters(path: Path) -> None:
    """Tag papermill's injected-parameters cell ``remove-cell`` so the book shows the defaults only once."""
    import nbformat

    notebook = nbformat.read(path, as_version=4)
    for cell in notebook.cells:
        tags = cell.metadata.get("tags", [])
        if "injected-parameters" in tags and "remove-cell" not in tags:
            cell.metadata["tags"] = [*tags, "remove-cell"]
    nbformat.write(notebook, path)


def execute_notebooks(root: Path, smoke: bool = False, force: bool = False, progress: bool = True) -> list[str]:
    """Run every notebook with papermill (skipping up-to-date ones); return a log line per notebook.

    Raises
    ------
    BookBuildError
        naming the notebook, the failing cell and the error, when a notebook fails.
    """
    import papermill
    from papermill.exceptions import PapermillExecutionError

    library = _library_digest()
    chain = hashlib.sha256(f"smoke={smoke}".encode())
    log = []
    for job in notebook_jobs(root):
        chain.update(job.source.read_bytes())
        chain.update(library.encode())
        key = chain.hexdigest()
        if not force and job.output.is_file() and job.stamp.is_file() and job.stamp.read_text() == key:
            log.append(f"{job.output.relative_to(root)}: up to date")
            continue
        job.output.parent.mkdir(parents=True, exist_ok=True)
        job.stamp.unlink(missing_ok=True)
        start = time.perf_counter()
        print(f"running {job.source.relative_to(root)} (smoke={smoke})", flush=True)
        saved = {name: os.environ.get(name) for name in _QUIET_KERNEL}
        try:
            # the kernel inherits this environment: no progress bars in the book's pages; papermill's
            # own bar (this process) is switched on explicitly, which outranks the variable
            os.environ.update(_QUIET_KERNEL)
            papermill.execute_notebook(
                str(job.source),
                str(job.output),
                parameters={"smoke": smoke, "out_dir": "."},
                cwd=str(job.output.parent),
                kernel_name="python3",
                request_save_on_cell_execute=False,
                progress_bar={"disable": not progress, "unit": "cell", "desc": job.source.stem},
            )
        except PapermillExecutionError as exc:
            first_line = exc.source.strip().splitlines()[0] if exc.source.strip() else ""
            raise BookBuildError(
                f"notebook {job.source.relative_to(root)} failed at In [{exc.exec_count}] ({exc.ename}: {exc.evalue}); "
                f"the cell starts with {first_line!r}; the executed copy with the traceback is {job.output}"
            ) from exc
        finally:
            for name, value in saved.items():
                _restore(name, value)
        _hide_injected_parameters(job.output)
        job.stamp.write_text(key)
        log.append(f"{job.output.relative_to(root)}: ran in {time.perf_counter() - start:.1f} s")
    return log


def build_html(root: Path, strict: bool = True) -> Path:
    """Build the HTML book from the executed notebooks (``jupyter-book build --all``, ``-W -n`` if strict).

    MathJax and the widget JavaScript are fetched from the npm registry at build
    time by the Sphinx extension :mod:`lqlib.book_assets` (named in ``_config.yml``).
    """
    shutil.rmtree(root / "_build" / "html", ignore_errors=True)
    command = [sys.executable, "-c", "from jupyter_book.cli.main import main; main()", "build", str(root), "--all"]
    if strict:
        command += ["-W", "-n", "--keep-going"]
    done = subprocess.run(command, cwd=root, capture_output=True, text=True)
    if done.returncode != 0:
        raise BookBuildError(f"jupyter-book build failed:\n{done.stdout[-6000:]}\n{done.stderr[-6000:]}")
    return root / "_build" / "html"
