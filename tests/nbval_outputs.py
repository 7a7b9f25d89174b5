"""A pytest plugin that keeps what nbval executed, so that `make test` executes each chapter once.

`make test` runs every chapter under nbval, then builds the book in the same (fast) setting and
checks it in a browser. Executing every chapter a second time for the build took about as long as
nbval itself. With ``--nbval-keep-outputs DIR`` this plugin stores every notebook whose code cells
all ran and passed, with the outputs nbval received from the kernel, in a jupyter-cache at DIR,
the store myst-nb reads with ``execute_notebooks: cache``. The Makefile's
``book-fast-from-nbval`` builds with that setting and DIR, so a chapter is rendered from the run
nbval just checked, and executed only if it is not in DIR. ``make book`` and ``make book-fast``
always execute (``force`` in _config.yml).

nbval drops the kernel's widget messages; this plugin listens to them too and stores the widgets'
last state in the notebook's metadata, as nbclient does when the book build executes. The book's
``offline_book`` extension renders each progress bar from that state in its final form
(``lorabook.progress``): without it a bar would read ``0%`` in the page.

Loaded with ``-p tests.nbval_outputs`` (see the Makefile's ``test-notebooks``).
"""

from __future__ import annotations

import copy
from pathlib import Path

import nbformat
import pytest


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--nbval-keep-outputs", metavar="DIR", default=None,
                     help="store each notebook that passed under nbval, with its outputs, in the "
                          "jupyter-cache at DIR (for `jupyter-book build` with execute_notebooks: cache)")


class _Kept:
    """The outputs of one notebook's cells, as nbval ran them, by code-cell number."""

    def __init__(self, nb: nbformat.NotebookNode):
        self.nb = nb
        self.outputs: dict[int, list] = {}
        self.complete = True  # False once a cell failed or was skipped
        self.widget_state: dict[str, dict] = {}  # comm id (= model id) -> the widget's last state

    def record(self, msg: dict) -> None:
        """Keep a widget's state from a comm message, as nbclient's handle_comm_msg does."""
        if msg.get("msg_type") not in ("comm_open", "comm_msg"):
            return
        content = msg.get("content") or {}
        data = content.get("data") or {}
        if "state" in data and "comm_id" in content:
            self.widget_state.setdefault(content["comm_id"], {}).update(data["state"])

    def widgets_metadata(self) -> dict | None:
        """The notebook metadata ``widgets`` entry nbclient would write, or None."""
        state = {model_id: {"model_name": s.get("_model_name"), "model_module": s.get("_model_module"),
                            "model_module_version": s.get("_model_module_version"), "state": s}
                 for model_id, s in self.widget_state.items() if "_model_name" in s}
        if not state:
            return None
        return {"application/vnd.jupyter.widget-state+json":
                {"state": state, "version_major": 2, "version_minor": 0}}


_KEPT = pytest.StashKey[dict]()  # config.stash: notebook path -> _Kept


def _is_nbval_cell(item: pytest.Item) -> bool:
    return hasattr(item, "test_outputs") and hasattr(item, "cell_num") and hasattr(item.parent, "nb")


def _kept(item: pytest.Item) -> _Kept:
    kept_by_path = item.config.stash.setdefault(_KEPT, {})
    return kept_by_path.setdefault(Path(str(item.parent.fspath)), _Kept(item.parent.nb))


def pytest_runtest_setup(item: pytest.Item) -> None:
    """Before a notebook's first cell: listen to the kernel's messages for widget states."""
    if not item.config.getoption("nbval_keep_outputs") or not _is_nbval_cell(item):
        return
    notebook = item.parent
    if getattr(notebook, "_lorabook_widget_tap", False):
        return
    kept, receive = _kept(item), notebook.get_kernel_message

    def get_kernel_message(timeout=None, stream="iopub"):
        msg = receive(timeout=timeout, stream=stream)
        kept.record(msg)
        return msg

    notebook.get_kernel_message = get_kernel_message
    notebook._lorabook_widget_tap = True


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    report = (yield).get_result()
    if not item.config.getoption("nbval_keep_outputs") or not _is_nbval_cell(item):
        return
    kept = _kept(item)
    if report.failed or report.skipped:
        kept.complete = False
    elif call.when == "call":
        kept.outputs[item.cell_num] = list(item.test_outputs or [])


def executed_notebook(kept: _Kept) -> nbformat.NotebookNode | None:
    """The notebook with nbval's outputs and execution counts 1, 2, ...; None if not all ran."""
    nb = copy.deepcopy(kept.nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    if not kept.complete or sorted(kept.outputs) != list(range(len(code))):
        return None
    for count, cell in enumerate(code, start=1):
        cell.execution_count = count
        cell.outputs = [nbformat.from_dict(dict(o)) for o in kept.outputs[count - 1]]
        for out in cell.outputs:
            if out.get("output_type") == "execute_result":
                out["execution_count"] = count
    widgets = kept.widgets_metadata()
    if widgets:
        nb.metadata["widgets"] = widgets
    nbformat.validate(nb)
    return nb


def pytest_sessionfinish(session: pytest.Session) -> None:
    target = session.config.getoption("nbval_keep_outputs")
    kept_by_path = session.config.stash.get(_KEPT, {})
    if not target or not kept_by_path:
        return
    from jupyter_cache import get_cache
    from jupyter_cache.base import CacheBundleIn

    cache = get_cache(str(Path(target).resolve()))
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    for path, kept in sorted(kept_by_path.items()):
        nb = executed_notebook(kept)
        if nb is None:
            line = f"nbval outputs: {path.name} not kept (a cell failed or was skipped)"
        else:
            cache.cache_notebook_bundle(CacheBundleIn(nb, str(path), data={"executed_by": "nbval"}),
                                        check_validity=True, overwrite=True)
            line = f"nbval outputs: {path.name} kept in {target}"
        if reporter is not None:
            reporter.ensure_newline()
            reporter.write_line(line)
