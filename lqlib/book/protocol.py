"""The protocol table every chapter shows: how our full-mode protocol differs from the paper's."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from ..errors import InputError

__all__ = ["PROTOCOL_COLUMNS", "protocol_rows", "show_protocol"]

#: Column specification of protocol tables.
PROTOCOL_COLUMNS = {"setting": "setting", "paper": "paper", "ours": "this build"}


def protocol_rows(rows: Sequence[Mapping[str, object]]) -> list[dict[str, str]]:
    """Checked protocol rows: each has ``setting``, ``paper`` and ``ours``; values become text (integers
    with thousands separators), settings are unique."""
    out = []
    for row in rows:
        if set(row) != {"setting", "paper", "ours"}:
            raise InputError(f"a protocol row needs exactly setting, paper and ours, got {sorted(row)}")
        out.append({k: f"{v:,}" if isinstance(v, int) and not isinstance(v, bool) else str(v) for k, v in row.items()})
    settings = [r["setting"] for r in out]
    if len(set(settings)) != len(settings):
        raise InputError(f"a setting appears twice: {settings}")
    return out


def show_protocol(
    rows: Sequence[Mapping[str, object]],
    page: str,
    caption: str,
    out_dir: str | Path = "tables",
    collapsed: str = "The paper's protocol beside this build's (table)",
):
    """Write ``protocol_<page>.csv`` and return a MyST table of the protocol (paper against this build),
    closed under ``collapsed`` (empty: open)."""
    from .tables import show_table

    name = "protocol_" + page.replace("/", "_")
    return show_table(protocol_rows(rows), name, PROTOCOL_COLUMNS, caption, out_dir, collapsed=collapsed)
