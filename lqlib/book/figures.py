"""Figures as files (PNG and SVG) and as numbered MyST figures in the book."""

from __future__ import annotations

import io
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

__all__ = ["save_figure", "show_figure", "png_bytes", "glue"]

plt.rcParams.update(
    {
        "figure.dpi": 100,
        "savefig.bbox": "tight",
        "axes.grid": True,
        "grid.alpha": 0.3,
        "axes.spines.top": False,
        "axes.spines.right": False,
        "font.size": 10,
    }
)


def save_figure(fig, name: str, out_dir: str | Path = "figures") -> tuple[Path, Path]:
    """Write ``name.png`` (150 dpi) and ``name.svg`` under ``out_dir``; return both paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    png, svg = out / f"{name}.png", out / f"{name}.svg"
    fig.savefig(png, dpi=150)
    fig.savefig(svg)
    return png, svg


def show_figure(fig, name: str, caption: str, out_dir: str | Path = "figures", width: str = "90%"):
    """Save ``fig`` (PNG + SVG), close it, and return a MyST ``{figure}`` labelled ``fig-<name>``.

    The returned object renders as a numbered figure in the book (MyST-NB parses
    Markdown outputs as MyST) and as Markdown in Jupyter.
    """
    from IPython.display import Markdown

    png, _ = save_figure(fig, name, out_dir)
    plt.close(fig)
    return Markdown(f"```{{figure}} {png.as_posix()}\n:name: fig-{name}\n:width: {width}\n\n{caption}\n```\n")


def png_bytes(fig, dpi: int = 80) -> bytes:
    """The figure as PNG bytes (for image widgets); closes the figure."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    plt.close(fig)
    return buffer.getvalue()


def glue(name: str, value: object) -> None:
    """Make ``value`` quotable in the book's prose as ``{glue:text}`name```; shows nothing."""
    from myst_nb import glue as myst_glue

    myst_glue(name, value, display=False)
