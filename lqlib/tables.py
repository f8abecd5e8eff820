"""Writing tables as files: CSV (full precision) and Markdown (rounded, for reading)."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Mapping, Sequence

__all__ = ["write_table", "markdown_table"]


def _cell(value: object, digits: int) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.{digits}f}" if value == value else "—"
    return str(value)


def markdown_table(rows: Sequence[Mapping[str, object]], columns: Mapping[str, str], digits: int = 4) -> str:
    """A GitHub-flavoured Markdown table of ``rows`` restricted to ``columns`` (key → header)."""
    lines = ["| " + " | ".join(columns.values()) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(row[key], digits) for key in columns) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def write_table(rows: Sequence[Mapping[str, object]], stem: str | Path, columns: Mapping[str, str],
                digits: int = 4) -> tuple[Path, Path]:
    """Write ``stem.csv`` (all keys, full precision) and ``stem.md`` (``columns`` only, rounded).

    Returns the two paths.
    """
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    csv_path, md_path = stem.with_suffix(".csv"), stem.with_suffix(".md")
    with csv_path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    md_path.write_text(markdown_table(rows, columns, digits))
    return csv_path, md_path
