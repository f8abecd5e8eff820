"""Small helpers for sentences built from numbers: agreement in number, lists in words."""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["plural", "listing", "windows_text"]

_IRREGULAR = {"is": "are", "was": "were", "has": "have", "differs": "differ"}


def plural(n: int, word: str, plural_form: str | None = None) -> str:
    """``"1 window"``, ``"2 windows"``, ``"0 windows"`` (``plural_form`` for irregular nouns)."""
    if n == 1:
        return f"{n:,} {word}"
    return f"{n:,} {plural_form or _IRREGULAR.get(word, word + 's')}"


def windows_text(n: int, tokens: int) -> str:
    """``"16 windows of 512 tokens"`` / ``"1 window of 512 tokens"``."""
    return f"{plural(n, 'window')} of {tokens:,} tokens"


def listing(items: Sequence[str], conjunction: str = "and") -> str:
    """``"a"``, ``"a and b"``, ``"a, b and c"``; empty for no items."""
    items = list(items)
    if len(items) <= 1:
        return "".join(items)
    return ", ".join(items[:-1]) + f" {conjunction} " + items[-1]
