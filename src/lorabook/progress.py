"""Progress bars in the static book: each tqdm widget shown in its final state (chapter 1).

In Jupyter and Colab, ``tqdm.auto`` draws a bar as an ipywidgets ``HBox`` (a label, a
``FloatProgress`` and a second label) and updates it through the kernel. An executed notebook
keeps each bar twice: the output holds the widget's *first* text (``0%| | 0/N``), and the
notebook's widget state (``metadata.widgets``) holds its *last* values. A static page has no
kernel to draw the widget, so without help every run would read as if it never started.

``finish_progress_bars(nb)`` rewrites each such output as the text of the bar's final state, e.g.
``train: 100%|██████████| 24/24 [00:31<00:00, 1.30s/it, loss=0.412]``, and drops the widget
state once no widget view is left. The book's Sphinx extension (``book/_ext/offline_book.py``)
applies it to every executed chapter; the notebooks themselves are untouched, so live they keep
their widgets. Nothing here prints.
"""

from __future__ import annotations

import html
import re
from typing import Any

WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"
WIDGET_STATE = "application/vnd.jupyter.widget-state+json"
BAR_WIDTH = 10  # characters of the text bar, as tqdm draws one when it cannot measure a terminal
_MODEL_REF = re.compile(r"^IPY_MODEL_([0-9a-f]+)$")
_TAGS = re.compile(r"<[^>]+>")


def _text(value: Any) -> str:
    """A label widget's value (HTML-escaped by tqdm) as plain text."""
    text = html.unescape(_TAGS.sub("", str(value or "")))
    return text.replace("\u2007", " ").strip()  # tqdm pads with figure spaces for HTML


def text_bar(fraction: float, width: int = BAR_WIDTH) -> str:
    """tqdm's text bar for a fraction in [0, 1], e.g. '██████▍   ' (chapter 1)."""
    if not isinstance(width, int) or width < 1:
        raise ValueError(f"width must be an int >= 1, got {width!r}")
    fraction = min(max(float(fraction), 0.0), 1.0)
    eighths = " ▏▎▍▌▋▊▉█"
    full, rest = divmod(int(fraction * width * 8), 8)
    bar = "█" * full + (eighths[rest] if full < width else "")
    return bar.ljust(width)


def final_text(states: dict, model_id: str) -> str | None:
    """The final text of the tqdm bar whose HBox is ``model_id``, or None if it is not one (chapter 1).

    ``states`` maps model ids to ``{"model_name": ..., "state": {...}}``, as nbclient saves them.
    A tqdm bar is an HBox of (HTML label, FloatProgress, HTML label).
    """
    if not isinstance(states, dict):
        raise TypeError(f"states must be a dict of widget states, got {type(states).__name__}")
    box = states.get(model_id)
    if not box or box.get("model_name") != "HBoxModel":
        return None
    children = []
    for ref in box.get("state", {}).get("children", []):
        match = _MODEL_REF.match(str(ref))
        children.append(states.get(match.group(1)) if match else None)
    names = [c.get("model_name") if c else None for c in children]
    if names != ["HTMLModel", "FloatProgressModel", "HTMLModel"]:
        return None
    left, progress, right = (c.get("state", {}) for c in children)
    total = progress.get("max") or 0
    value = progress.get("value") or 0
    fraction = value / total if total else 1.0
    left_text, right_text = _text(left.get("value")), _text(right.get("value"))
    return f"{left_text}|{text_bar(fraction)}| {right_text}".strip()


def finish_progress_bars(nb: Any) -> int:
    """Replace each tqdm widget output of ``nb`` by its final text, in place; returns how many (chapter 1).

    Other widget views are left as they are; the widget state is removed from the notebook's
    metadata when no widget view remains (nothing then asks the page for a widget manager).
    """
    widgets = (nb.get("metadata", {}) or {}).get("widgets") or {}
    states = (widgets.get(WIDGET_STATE) or {}).get("state") or {}
    done, views_left = 0, 0
    for cell in nb.get("cells", []):
        for output in cell.get("outputs", []) or []:
            data = output.get("data") or {}
            view = data.get(WIDGET_VIEW)
            if not view:
                continue
            text = final_text(states, view.get("model_id", "")) if states else None
            if text is None:
                views_left += 1
                continue
            output["data"] = {"text/plain": text}
            done += 1
    if views_left == 0 and "widgets" in nb.get("metadata", {}):
        del nb["metadata"]["widgets"]
    return done


__all__ = ["final_text", "finish_progress_bars", "text_bar"]
