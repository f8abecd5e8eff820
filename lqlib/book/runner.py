"""Regenerating the book: papermill runs every notebook, then Jupyter Book builds the HTML.

Layout (paths relative to the repository root)::

    notebooks/<part>/<name>.ipynb   source notebooks (committed, no outputs)
    book/<part>/<name>.ipynb        executed copies (ignored by git), beside their
    book/<part>/figures|tables/     figures (PNG + SVG) and tables (CSV + Markdown)
    _toc.yml, _config.yml, book/*.md  the book itself
    _build/html                     the built book

Notebooks run in the order of ``_toc.yml``, each in its output folder, with the
parameters ``smoke`` (small sizes for CI) and ``out_dir``, and — where the notebook's
``parameters`` cell declares them — the :class:`BookSettings` ``model``, ``corpus``, ``device``
and ``dtype``. A notebook is re-run unless a stamp shows that its source, every ``lqlib``
source file, the settings and every notebook before it are unchanged, so library changes are
never served from a stale cache. :func:`build_report` records what a build did and where.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml

from ..errors import InputError, LqlibError
from ..store import library_digest

__all__ = [
    "BookSettings",
    "NotebookJob",
    "NotebookRun",
    "notebook_jobs",
    "execute_notebooks",
    "build_html",
    "build_report",
    "BuildReport",
    "effective_parameters",
    "BookBuildError",
]

_QUIET_KERNEL = {"TQDM_DISABLE": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1", "TRANSFORMERS_VERBOSITY": "error"}


class BookBuildError(LqlibError, RuntimeError):
    """A notebook failed (its path, cell and error are in the message) or Sphinx reported a problem."""


@dataclass(frozen=True)
class BookSettings:
    """What every notebook runs on: sizes (``smoke``), the model and corpus, the device and dtype.

    ``model`` is the embedded default, a local folder or ``.gguf`` file, or a Hugging Face id;
    ``corpus`` one of ``pydoc``, ``wikitext2``, ``auto``; ``device`` ``auto`` (CUDA when available),
    ``cpu`` or ``cuda``; ``dtype`` ``float32``, ``bfloat16`` or ``float16``.
    """

    smoke: bool = False
    model: str = "smollm2-135m-instruct"
    corpus: str = "pydoc"
    device: str = "auto"
    dtype: str = "float32"

    def __post_init__(self) -> None:
        if self.corpus not in ("pydoc", "wikitext2", "auto"):
            raise InputError(f"corpus must be pydoc, wikitext2 or auto, got {self.corpus!r}")
        if self.dtype not in ("float32", "bfloat16", "float16", "float64"):
            raise InputError(f"dtype must be float32, bfloat16, float16 or float64, got {self.dtype!r}")
        if not (self.device in ("auto", "cpu") or self.device.startswith("cuda")):
            raise InputError(f"device must be auto, cpu or cuda[:n], got {self.device!r}")

    @property
    def is_default(self) -> bool:
        """True for the embedded model and corpus at full size in float32 on the CPU (the committed build)."""
        return (self.model, self.corpus, self.dtype, self.smoke) == ("smollm2-135m-instruct", "pydoc", "float32", False)

    def parameters(self) -> dict[str, object]:
        return {
            "smoke": self.smoke,
            "model": self.model,
            "corpus": self.corpus,
            "device": self.device,
            "dtype": self.dtype,
        }


@dataclass(frozen=True)
class NotebookRun:
    """One notebook of a build: its path (relative to the root), whether it ran, and its seconds."""

    path: str
    ran: bool
    seconds: float

    def __str__(self) -> str:
        return f"{self.path}: ran in {self.seconds:.1f} s" if self.ran else f"{self.path}: up to date"


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
    return library_digest()


def _literal(code: str) -> object:
    """The value of a literal's source (``1_000_000``, ``[2, 4]``, ``"pydoc"``), or raise ValueError."""
    import ast

    return ast.literal_eval(code.strip())


def effective_parameters(source: Path, settings: BookSettings) -> dict[str, object]:
    """Every parameter a notebook runs with: the defaults of its ``parameters`` cell (those written as
    literals), then — for a smoke build — the sizes of its ``smoke-sizes`` cell (``SMOKE = {...}``),
    then the :class:`BookSettings` it declares (``smoke`` always). Injected in full, so the executed
    page shows exactly what it was built with."""
    import ast

    import nbformat
    import papermill

    declared = papermill.inspect_notebook(str(source))
    parameters: dict[str, object] = {}
    for name, info in declared.items():
        with contextlib.suppress(ValueError, SyntaxError, TypeError):  # an expression: the notebook's own
            parameters[name] = _literal(info["default"])
    if settings.smoke:
        notebook = nbformat.read(source, as_version=4)
        for cell in notebook.cells:
            if "smoke-sizes" in cell.metadata.get("tags", []):
                for node in ast.parse(cell.source).body:
                    if isinstance(node, ast.Assign) and [getattr(t, "id", "") for t in node.targets] == ["SMOKE"]:
                        parameters.update(ast.literal_eval(node.value))
    parameters.update({k: v for k, v in settings.parameters().items() if k in declared or k == "smoke"})
    parameters.pop("out_dir", None)
    return parameters


def _restore(name: str, value: str | None) -> None:
    if value is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = value


def _show_effective_parameters(path: Path) -> None:
    """In the executed copy, hide the notebook's default ``parameters`` cell and show papermill's injected
    cell in its place, collapsed (``hide-input``): the page shows the values it was built with."""
    import nbformat

    notebook = nbformat.read(path, as_version=4)
    for cell in notebook.cells:
        tags = list(cell.metadata.get("tags", []))
        if "injected-parameters" in tags:
            cell.metadata["tags"] = [t for t in tags if t != "remove-cell"] + ["hide-input"]
            cell.source = "# the parameters this page was built with\n" + cell.source.split("\n", 1)[-1]
        elif "parameters" in tags and "remove-cell" not in tags:
            cell.metadata["tags"] = [*tags, "remove-cell"]
    nbformat.write(notebook, path)


def _run_one(job: NotebookJob, root: Path, key: str, settings: BookSettings, progress: bool) -> NotebookRun:
    """Execute one notebook with papermill into its output folder; stamp it when it succeeded."""
    import papermill
    from papermill.exceptions import PapermillExecutionError

    job.output.parent.mkdir(parents=True, exist_ok=True)
    job.stamp.unlink(missing_ok=True)
    start = time.perf_counter()
    print(f"running {job.source.relative_to(root)} (smoke={settings.smoke})", flush=True)
    try:
        papermill.execute_notebook(
            str(job.source),
            str(job.output),
            parameters={**effective_parameters(job.source, settings), "out_dir": "."},
            # the kernel starts in the notebook's folder (nbclient's resources path), not through papermill's
            # cwd=, which changes the whole process's directory and races when parts run side by side
            resources={"metadata": {"path": str(job.output.parent)}},
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
    _show_effective_parameters(job.output)
    job.stamp.write_text(key)
    return NotebookRun(str(job.output.relative_to(root)), True, time.perf_counter() - start)


def _previous_seconds(root: Path) -> dict[str, float]:
    """Seconds per notebook in the last build report of this root (for scheduling), empty if none."""
    for path in (root / "_build" / "book_build.json", root / "results" / "book_build.json"):
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
            report = json.loads(path.read_text())
            return {n["path"]: float(n["seconds"]) for n in report["notebooks"] if n.get("ran")}
    return {}


def _chains(jobs: list[NotebookJob], root: Path) -> tuple[list[list[int]], list[int]]:
    """Indices of the notebooks of each part (``book/<part>/``, run in order, one part after another
    or side by side) and of the book-level notebooks (``book/*.ipynb``, e.g. the scorecard, run last)."""
    parts: dict[str, list[int]] = {}
    last = []
    for i, job in enumerate(jobs):
        relative = job.output.relative_to(root / "book")
        if len(relative.parts) == 1:
            last.append(i)
        else:
            parts.setdefault(relative.parts[0], []).append(i)
    return list(parts.values()), last


def execute_notebooks(
    root: Path,
    smoke: bool = False,
    force: bool = False,
    progress: bool = True,
    settings: BookSettings | None = None,
    jobs: int = 1,
) -> list[NotebookRun]:
    """Run every notebook with papermill (skipping up-to-date ones); return one :class:`NotebookRun` each,
    in book order.

    ``settings`` (default: :class:`BookSettings` with ``smoke``) reach every notebook that declares
    them in its ``parameters`` cell; ``smoke`` and ``out_dir`` reach every notebook. With ``jobs`` > 1
    the parts of the book run side by side (each part's notebooks in order, since a section may read
    what an earlier one of its part wrote), each kernel with ``cores // jobs`` threads; the book-level
    notebooks (the scorecard) run after all parts.

    Raises
    ------
    BookBuildError
        naming the notebook, the failing cell and the error, when a notebook fails (notebooks not yet
        started do not run).
    """
    import threading
    from concurrent.futures import ThreadPoolExecutor

    settings = settings or BookSettings(smoke=smoke)
    if jobs < 1:
        raise InputError(f"jobs must be at least 1, got {jobs}")
    library = _library_digest()
    chain = hashlib.sha256(json.dumps(settings.parameters(), sort_keys=True).encode())
    plan = notebook_jobs(root)
    keys, runs = [], [None] * len(plan)
    for i, job in enumerate(plan):
        chain.update(job.source.read_bytes())
        chain.update(library.encode())
        keys.append(chain.hexdigest())
        if not force and job.output.is_file() and job.stamp.is_file() and job.stamp.read_text() == keys[-1]:
            runs[i] = NotebookRun(str(job.output.relative_to(root)), False, 0.0)
    stop = threading.Event()

    def run_chain(indices: list[int]) -> None:
        for i in indices:
            if runs[i] is not None:
                continue
            if stop.is_set():
                return
            try:
                runs[i] = _run_one(plan[i], root, keys[i], settings, progress)
            except BaseException:
                stop.set()
                raise

    environment = dict(_QUIET_KERNEL)
    if jobs > 1:
        threads = str(max(1, (os.cpu_count() or 1) // jobs))
        environment.update(OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads)
    saved = {name: os.environ.get(name) for name in environment}
    parts, last = _chains(plan, root)
    seconds = _previous_seconds(root)
    parts.sort(key=lambda part: -sum(seconds.get(str(plan[i].output.relative_to(root)), 60.0) for i in part))
    try:
        # the kernels inherit this environment: no progress bars in the book's pages; papermill's own bar
        # (this process) is switched on explicitly, which outranks the variable
        os.environ.update(environment)
        if jobs == 1:
            run_chain(list(range(len(plan))))
        else:
            with ThreadPoolExecutor(max_workers=jobs) as pool:
                futures = [pool.submit(run_chain, part) for part in parts]  # the longest part first
                errors = [f.exception() for f in futures if f.exception() is not None]
            if errors:
                raise errors[0]
            run_chain(last)
    finally:
        for name, value in saved.items():
            _restore(name, value)
    return [run for run in runs if run is not None]


def build_html(root: Path, strict: bool = True) -> Path:
    """Build the HTML book from the executed notebooks (``jupyter-book build --all``, ``-W -n`` if strict).

    MathJax and the widget JavaScript are fetched from the npm registry at build
    time by the Sphinx extension :mod:`lqlib.book.assets` (named in ``_config.yml``).
    """
    shutil.rmtree(root / "_build" / "html", ignore_errors=True)
    command = [sys.executable, "-c", "from jupyter_book.cli.main import main; main()", "build", str(root), "--all"]
    if strict:
        command += ["-W", "-n", "--keep-going"]
    done = subprocess.run(command, cwd=root, capture_output=True, text=True)
    if done.returncode != 0:
        raise BookBuildError(f"jupyter-book build failed:\n{done.stdout[-6000:]}\n{done.stderr[-6000:]}")
    return root / "_build" / "html"


def _versions() -> dict[str, str]:
    from importlib import metadata

    versions = {"python": platform.python_version()}
    for name in ("torch", "transformers", "numpy", "constriction", "papermill", "jupyter-book", "triton"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    versions["lqlib_digest"] = library_digest()[:16]
    return versions


def _machine() -> dict[str, object]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory = None
    try:
        pages, size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
        memory = round(pages * size / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_gib": memory, "platform": platform.platform()}


def _git_commit(root: Path) -> str:
    done = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=root, capture_output=True, text=True)
    dirty = subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=no"], cwd=root, capture_output=True, text=True
    )
    commit = done.stdout.strip() if done.returncode == 0 else "unknown"
    return commit + ("+changes" if dirty.returncode == 0 and dirty.stdout.strip() else "")


@dataclass
class BuildReport:
    """What one ``python -m lqlib book`` did: settings, per-notebook seconds, totals, versions, machine."""

    settings: dict
    notebooks: list[dict]
    execute_s: float
    html_s: float
    total_s: float
    versions: dict = field(default_factory=_versions)
    machine: dict = field(default_factory=_machine)
    date: str = field(
        default_factory=lambda: datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    )
    commit: str = ""

    @property
    def mode(self) -> str:
        return "smoke" if self.settings.get("smoke") else "full"

    def to_json(self) -> str:
        return json.dumps({"mode": self.mode, **asdict(self)}, indent=1)


def build_report(
    root: Path, settings: BookSettings, runs: list[NotebookRun], execute_s: float, html_s: float
) -> BuildReport:
    """The report of a build (see :class:`BuildReport`); ``runs`` as :func:`execute_notebooks` returned them."""
    notebooks = [{"path": run.path, "ran": run.ran, "seconds": round(run.seconds, 1)} for run in runs]
    return BuildReport(
        settings.parameters(),
        notebooks,
        round(execute_s, 1),
        round(html_s, 1),
        round(execute_s + html_s, 1),
        commit=_git_commit(root),
    )
