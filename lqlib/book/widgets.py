"""Widgets that keep working in the static HTML book: precomputed pictures switched by jslink.

A picture is precomputed for every combination of the controls' values and held
in nested ``ipywidgets.Stack`` widgets; each control's ``index`` is linked in the
browser (``jslink``) to the ``selected_index`` of the stacks of its level. No
kernel is needed to move a control, so the embedded widget state of the
executed notebook is enough for the book.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence

__all__ = ["picture_grid"]


def _control(label: str, options: Sequence[str], slider: bool):
    import ipywidgets as widgets

    style = {"description_width": "initial"}
    if slider:
        return widgets.SelectionSlider(
            options=list(options),
            description=label,
            continuous_update=True,
            style=style,
            layout=widgets.Layout(width="420px"),
        )
    return widgets.ToggleButtons(options=list(options), description=label, style=style)


def picture_grid(axes: Sequence[tuple[str, Sequence[str], bool]], render: Callable[..., bytes], progress: bool = True):
    """A box of controls over a picture chosen from a precomputed grid.

    Parameters
    ----------
    axes : one (label, option labels, as_slider) per control, outermost first.
    render : called with one option label per axis (in order), returns PNG bytes.

    Returns
    -------
    ipywidgets.VBox: the controls above the picture.
    """
    import ipywidgets as widgets
    from tqdm.auto import tqdm

    controls = [_control(label, options, slider) for label, options, slider in axes]
    sizes = [len(options) for _, options, _ in axes]
    combos = list(itertools.product(*[range(n) for n in sizes]))
    pictures = {}
    for combo in tqdm(combos, desc="precomputing pictures", disable=not progress, leave=False):
        labels = [axes[level][1][i] for level, i in enumerate(combo)]
        pictures[combo] = widgets.Image(value=render(*labels), format="png")

    def stack(prefix: tuple[int, ...]):
        level = len(prefix)
        if level == len(axes):
            return pictures[prefix]
        node = widgets.Stack([stack(prefix + (i,)) for i in range(sizes[level])], selected_index=0)
        widgets.jslink((controls[level], "index"), (node, "selected_index"))
        return node

    return widgets.VBox([*controls, stack(())])
