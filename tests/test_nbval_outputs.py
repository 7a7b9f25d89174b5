"""tests/nbval_outputs.py: what nbval executed is stored where myst-nb's cache mode finds it."""

import re
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
from jupyter_cache import get_cache

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # `tests` as a package, as `-p tests.nbval_outputs` imports it
from tests import nbval_outputs  # noqa: E402


def _notebook(*sources: str) -> nbformat.NotebookNode:
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.cells = [nbformat.v4.new_markdown_cell("# A chapter")]
    nb.cells += [nbformat.v4.new_code_cell(s) for s in sources]
    return nb


def _run_nbval(path: Path, store: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pytest", "--nbval-lax", "--nbval-current-env", "-q",
         "-p", "no:cacheprovider", "-p", "tests.nbval_outputs", "--nbval-keep-outputs", str(store),
         str(path)], cwd=ROOT, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_a_passing_notebook_is_kept_with_the_outputs_nbval_saw(tmp_path):
    path, store = tmp_path / "chapter.ipynb", tmp_path / "store"
    nbformat.write(_notebook("import os\nprint('pid', os.getpid())", "6 * 7"), path)
    run = _run_nbval(path, store)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "chapter.ipynb kept in" in run.stdout
    cache = get_cache(str(store))
    fresh = nbformat.read(path, as_version=4)  # as the book build reads it: no outputs
    assert all(not c.get("outputs") for c in fresh.cells if c.cell_type == "code")
    _, merged = cache.merge_match_into_notebook(fresh)  # what myst-nb renders
    printed, result = (c.outputs for c in merged.cells if c.cell_type == "code")
    assert printed[0]["name"] == "stdout" and re.fullmatch(r"pid \d+\n", printed[0]["text"])
    assert result[0]["output_type"] == "execute_result" and result[0]["data"]["text/plain"] == "42"
    assert [c.execution_count for c in merged.cells if c.cell_type == "code"] == [1, 2]


@pytest.mark.slow
def test_a_failing_notebook_is_not_kept(tmp_path):
    path, store = tmp_path / "broken.ipynb", tmp_path / "store"
    nbformat.write(_notebook("x = 1", "raise RuntimeError('boom')"), path)
    run = _run_nbval(path, store)
    assert run.returncode != 0
    assert "broken.ipynb not kept" in run.stdout
    with pytest.raises(KeyError):
        get_cache(str(store)).match_cache_notebook(nbformat.read(path, as_version=4))


def test_executed_notebook_needs_every_code_cell():
    nb = _notebook("a = 1", "b = 2")
    kept = nbval_outputs._Kept(nb)
    kept.outputs[0] = []
    assert nbval_outputs.executed_notebook(kept) is None  # cell 1 never ran
    kept.outputs[1] = [nbformat.v4.new_output("stream", name="stdout", text="2\n")]
    done = nbval_outputs.executed_notebook(kept)
    assert [c.execution_count for c in done.cells if c.cell_type == "code"] == [1, 2]
    assert done.cells[2].outputs[0]["text"] == "2\n"
    assert not nb.cells[2].outputs  # the collected notebook itself is left as it was
    kept.complete = False
    assert nbval_outputs.executed_notebook(kept) is None


@pytest.mark.slow
def test_progress_bars_keep_their_final_state(tmp_path):
    """nbval drops widget messages; the plugin keeps them, so the book shows a finished bar."""
    from lorabook.progress import finish_progress_bars

    path, store = tmp_path / "bars.ipynb", tmp_path / "store"
    nbformat.write(_notebook("from tqdm.auto import tqdm\nfor _ in tqdm(range(5), desc='steps'):\n"
                             "    pass"), path)
    run = _run_nbval(path, store)
    assert run.returncode == 0, run.stdout + run.stderr
    _, merged = get_cache(str(store)).merge_match_into_notebook(nbformat.read(path, as_version=4))
    assert "widgets" in merged.metadata
    (output,) = [c for c in merged.cells if c.cell_type == "code"][0].outputs
    assert "0%" in output["data"]["text/plain"]  # what the page showed before
    assert finish_progress_bars(merged) == 1
    assert output["data"]["text/plain"].startswith("steps: 100%|██████████| 5/5 [")


def test_widget_state_is_kept_as_nbclient_writes_it():
    kept = nbval_outputs._Kept(_notebook("x = 1"))
    kept.record({"msg_type": "comm_open", "content": {"comm_id": "m1", "data": {
        "state": {"_model_name": "FloatProgressModel", "value": 0, "max": 4}}}})
    kept.record({"msg_type": "comm_msg", "content": {"comm_id": "m1", "data": {
        "method": "update", "state": {"value": 4}}}})
    kept.record({"msg_type": "stream", "content": {"name": "stdout", "text": "x"}})
    widgets = kept.widgets_metadata()["application/vnd.jupyter.widget-state+json"]
    assert widgets["state"]["m1"]["model_name"] == "FloatProgressModel"
    assert widgets["state"]["m1"]["state"]["value"] == 4
