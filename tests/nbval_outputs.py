"""A pytest plugin that keeps what nbval executed, so that `make test` executes each chapter once.

`make test` runs every chapter under nbval, then builds the book in the same (fast) setting and
checks it in a browser. Executing every chapter a second time for the build took about as long as
nbval itself. With ``--nbval-keep-outputs DIR`` this plugin stores every notebook whose code cells
all ran and passed, with the outputs nbval received from the kernel, in a jupyter-cache at DIR,
the store myst-nb reads with ``execute_notebooks: cache``. The Makefile's
``book-fast-from-nbval`` builds with that setting and DIR, so a chapter is rendered from the run
nbval just checked, and executed only if it is not in DIR. ``make book`` and ``make book-fast``
always execute (``force`` in _config.yml).

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


_KEPT = pytest.StashKey[dict]()  # config.stash: notebook path -> _Kept


def _is_nbval_cell(item: pytest.Item) -> bool:
    return hasattr(item, "test_outputs") and hasattr(item, "cell_num") and hasattr(item.parent, "nb")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    report = (yield).get_result()
    if not item.config.getoption("nbval_keep_outputs") or not _is_nbval_cell(item):
        return
    kept_by_path = item.config.stash.setdefault(_KEPT, {})
    path = Path(str(item.parent.fspath))
    kept = kept_by_path.setdefault(path, _Kept(item.parent.nb))
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
