"""Widgets that keep working in the static HTML book: precomputed pictures switched by jslink.

A picture is precomputed for every combination of the controls' values and held
in nested ``ipywidgets.Stack`` widgets; each control's ``index`` is linked in the
browser (``jslink``) to the ``selected_index`` of the stacks of its level. No
kernel is needed to move a control, so the embedded widget state of the
executed notebook is enough for the book, and nothing is requested from a server.

A picture is PNG bytes, an SVG document (a string starting with ``<svg``, shown as an image), an HTML
string (a table, a sentence), or a sequence of them shown one under the other (e.g. a figure and the
sentence that reads it).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence

from ..errors import InputError

__all__ = ["picture_grid", "CONTROL_KINDS"]

#: How a control is drawn: a slider (ordered values), toggle buttons (a few labels) or a dropdown (many).
CONTROL_KINDS = ("slider", "buttons", "dropdown")


def _kind(kind: bool | str) -> str:
    if isinstance(kind, bool):  # the original signature: True for a slider, False for buttons
        return "slider" if kind else "buttons"
    if kind not in CONTROL_KINDS:
        raise InputError(f"a control is one of {CONTROL_KINDS} (or True/False), got {kind!r}")
    return kind


def _control(label: str, options: Sequence[str], kind: bool | str):
    import ipywidgets as widgets

    style = {"description_width": "initial"}
    kind = _kind(kind)
    if kind == "slider":
        return widgets.SelectionSlider(
            options=list(options),
            description=label,
            continuous_update=True,
            style=style,
            layout=widgets.Layout(width="420px"),
        )
    if kind == "dropdown":
        return widgets.Dropdown(options=list(options), description=label, style=style)
    return widgets.ToggleButtons(options=list(options), description=label, style=style)


def _widget(picture):
    """The widget of one precomputed picture: an Image for PNG bytes, HTML for text, a VBox for several."""
    import ipywidgets as widgets

    if isinstance(picture, bytes):
        return widgets.Image(value=picture, format="png")
    if isinstance(picture, str) and picture.lstrip().startswith("<svg"):
        return widgets.Image(value=picture.encode(), format="svg+xml")
    if isinstance(picture, str):
        return widgets.HTML(value=picture)
    if isinstance(picture, Sequence) and picture:
        return widgets.VBox([_widget(part) for part in picture])
    raise InputError(f"a picture is PNG bytes, an HTML string or a sequence of them, got {type(picture).__name__}")


def picture_grid(
    axes: Sequence[tuple[str, Sequence[str], bool | str]],
    render: Callable[..., bytes | str | Sequence[bytes | str]],
    progress: bool = False,
):
    """A box of controls over a picture chosen from a precomputed grid.

    Parameters
    ----------
    axes : one (label, option labels, kind) per control, outermost first; kind is ``"slider"``,
        ``"buttons"`` or ``"dropdown"`` (True / False still mean slider / buttons).
    render : called with one option label per axis (in order); returns PNG bytes, an SVG document, an HTML
        string, or a sequence of them (shown one under the other).
    progress : ignored (kept for callers of the first version; the book shows no progress bars).

    Returns
    -------
    ipywidgets.VBox: the controls above the picture.
    """
    import ipywidgets as widgets

    del progress
    if not axes or any(not options for _, options, _ in axes):
        raise InputError("a picture grid needs at least one control, each with at least one option")
    controls = [_control(label, options, kind) for label, options, kind in axes]
    sizes = [len(options) for _, options, _ in axes]
    pictures = {}
    for combo in itertools.product(*[range(n) for n in sizes]):
        labels = [axes[level][1][i] for level, i in enumerate(combo)]
        pictures[combo] = _widget(render(*labels))

    def stack(prefix: tuple[int, ...]):
        level = len(prefix)
        if level == len(axes):
            return pictures[prefix]
        node = widgets.Stack([stack(prefix + (i,)) for i in range(sizes[level])], selected_index=0)
        widgets.jslink((controls[level], "index"), (node, "selected_index"))
        return node

    return widgets.VBox([*controls, stack(())])
