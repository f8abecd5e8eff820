"""Layer 6, the book: the papermill + Jupyter Book runner, offline assets, figures, tables, widgets, the
papers' values, the recorded GPU results and the reproduction scorecard.

Modules: :mod:`~lqlib.book.runner`, :mod:`~lqlib.book.assets`, :mod:`~lqlib.book.figures`,
:mod:`~lqlib.book.tables`, :mod:`~lqlib.book.widgets`, :mod:`~lqlib.book.paper_values`,
:mod:`~lqlib.book.gpu_results`, :mod:`~lqlib.book.scorecard`.
"""

from .runner import (
    BookBuildError,
    NotebookJob,
    build_html,
    execute_notebooks,
    notebook_jobs,
)

__all__ = ["BookBuildError", "NotebookJob", "build_html", "execute_notebooks", "notebook_jobs"]
