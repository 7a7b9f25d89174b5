"""lorabook.progress: a tqdm widget's final state, as text, from the saved widget state.

Oracle: real ``tqdm.notebook`` bars run here (ipywidgets needs no kernel to hold state), their
state read back with ipywidgets' own ``get_manager_state`` (the layout nbclient saves), and
tqdm's own text meter for the same final counts.
"""

from __future__ import annotations

import contextlib
import io

import ipywidgets
import pytest
from tqdm.notebook import tqdm as notebook_tqdm
from tqdm.std import tqdm as std_tqdm

from lorabook import progress


def _run_bar(total: int, stop: int, **kw):
    with contextlib.redirect_stdout(io.StringIO()):  # display() prints the repr outside a kernel
        bar = notebook_tqdm(total=total, **kw)
        for _ in range(stop):
            bar.update(1)
        bar.refresh()
        bar.close()
    return bar


def _notebook(bar, extra_output=None) -> dict:
    states = ipywidgets.Widget.get_manager_state()["state"]
    view = {"version_major": 2, "version_minor": 0, "model_id": bar.container.model_id}
    outputs = [{"output_type": "display_data",
                "data": {progress.WIDGET_VIEW: view, "text/plain": "  0%|          | 0/24"}}]
    if extra_output:
        outputs.append(extra_output)
    return {"metadata": {"widgets": {progress.WIDGET_STATE: {"state": states}}},
            "cells": [{"cell_type": "code", "outputs": outputs}]}


def test_final_text_is_tqdm_final_meter():
    bar = _run_bar(24, 24, desc="train")
    states = ipywidgets.Widget.get_manager_state()["state"]
    text = progress.final_text(states, bar.container.model_id)
    assert text.startswith("train: 100%|██████████| 24/24 [")
    # the same counts through tqdm's text meter: only the rate and times may differ
    meter = std_tqdm.format_meter(24, 24, 1.0, prefix="train", ncols=None)
    assert text.split("[")[0] == meter.split("[")[0]


def test_unfinished_bar_shows_where_it_stopped():
    bar = _run_bar(24, 6, desc="sweep")
    states = ipywidgets.Widget.get_manager_state()["state"]
    text = progress.final_text(states, bar.container.model_id)
    assert text.startswith("sweep:  25%|██▌       | 6/24")


def test_finish_progress_bars_rewrites_the_output_and_drops_the_state():
    bar = _run_bar(10, 10, desc="load")
    nb = _notebook(bar)
    assert progress.finish_progress_bars(nb) == 1
    out = nb["cells"][0]["outputs"][0]["data"]
    assert list(out) == ["text/plain"] and out["text/plain"].startswith("load: 100%|")
    assert "widgets" not in nb["metadata"]


def test_other_widgets_are_kept():
    slider = ipywidgets.IntSlider()
    bar = _run_bar(3, 3)
    other = {"output_type": "display_data",
             "data": {progress.WIDGET_VIEW: {"model_id": slider.model_id}, "text/plain": "slider"}}
    nb = _notebook(bar, other)
    assert progress.finish_progress_bars(nb) == 1
    assert progress.WIDGET_VIEW in nb["cells"][0]["outputs"][1]["data"]
    assert "widgets" in nb["metadata"]  # the slider still needs its state


def test_text_bar_and_errors():
    assert progress.text_bar(0.0) == " " * 10
    assert progress.text_bar(1.0) == "█" * 10
    assert progress.text_bar(0.55) == "█████▌    "
    with pytest.raises(ValueError, match="width"):
        progress.text_bar(0.5, width=0)
    with pytest.raises(TypeError, match="states"):
        progress.final_text(["not", "a", "dict"], "x")
    assert progress.final_text({}, "missing") is None
