"""Writing tables as files: CSV (full precision) and Markdown (rounded, for reading)."""

from __future__ import annotations

import csv
from collections.abc import Mapping, Sequence
from pathlib import Path

__all__ = ["read_table", "write_table", "markdown_table", "show_table"]


def _escape(text: str) -> str:
    """A cell's text with its pipes escaped, so that ``|z|`` stays inside one cell."""
    return text.replace("|", "\\|")


def _cell(value: object, digits: int) -> str:
    if value is None:  # not measured
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.{digits}f}" if value == value else "—"
    return _escape(str(value))


Columns = Mapping[str, "str | tuple[str, int]"]


def _header_digits(spec: str | tuple[str, int], digits: int) -> tuple[str, int]:
    return (spec, digits) if isinstance(spec, str) else spec


def markdown_table(rows: Sequence[Mapping[str, object]], columns: Columns, digits: int = 4) -> str:
    """A GitHub-flavoured Markdown table of ``rows`` restricted to ``columns``.

    ``columns`` maps a row key to its header, or to (header, digits) to round that
    column differently from ``digits`` (e.g. to show a paper's value as printed).
    """
    specs = {key: _header_digits(spec, digits) for key, spec in columns.items()}
    lines = ["| " + " | ".join(_escape(h) for h, _ in specs.values()) + " |", "|" + "---|" * len(specs)]
    lines += ["| " + " | ".join(_cell(row[key], d) for key, (_, d) in specs.items()) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def write_table(
    rows: Sequence[Mapping[str, object]], stem: str | Path, columns: Columns, digits: int = 4
) -> tuple[Path, Path]:
    """Write ``stem.csv`` (every scalar key, full precision) and ``stem.md`` (``columns`` only, rounded).

    List- or dict-valued keys (e.g. per-window NLLs) stay out of the tidy CSV.

    Returns the two paths.
    """
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    csv_path, md_path = stem.with_suffix(".csv"), stem.with_suffix(".md")
    with csv_path.open("w", newline="") as handle:
        scalar_rows = [{k: v for k, v in row.items() if not isinstance(v, (list, tuple, dict))} for row in rows]
        fieldnames = list(dict.fromkeys(key for row in scalar_rows for key in row))  # union, first-seen order
        writer = csv.DictWriter(handle, fieldnames=fieldnames, restval="")
        writer.writeheader()
        writer.writerows(scalar_rows)
    md_path.write_text(markdown_table(rows, columns, digits))
    return csv_path, md_path


def read_table(stem: str | Path) -> list[dict[str, str]]:
    """The rows of ``stem.csv`` written by :func:`write_table` (values as strings)."""
    with Path(stem).with_suffix(".csv").open(newline="") as handle:
        return list(csv.DictReader(handle))


def show_table(
    rows: Sequence[Mapping[str, object]],
    name: str,
    columns: Columns,
    caption: str,
    out_dir: str | Path = "tables",
    digits: int = 4,
    collapsed: str = "",
):
    """Write ``name.csv`` and ``name.md`` under ``out_dir`` and return a MyST ``{table}`` labelled ``tbl-<name>``;
    with ``collapsed`` (a title), the table sits closed under that title (a ``{dropdown}``, plain HTML
    ``<details>``: it opens without JavaScript)."""
    from IPython.display import Markdown

    _, md_path = write_table(rows, Path(out_dir) / name, columns, digits)
    table = f"```{{table}} {caption}\n:name: tbl-{name}\n\n{md_path.read_text()}```\n"
    if collapsed:
        table = f"````{{dropdown}} {collapsed}\n{table}````\n"
    return Markdown(table)
