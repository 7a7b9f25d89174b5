"""lorabook.paths: this machine's absolute paths shown relative to the repository or ``~``."""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import pytest

from lorabook import paths


def test_short_path_relative_to_repo_and_home(tmp_path):
    repo = tmp_path / "checkout"
    assert paths.short_path(repo / "notebooks" / "x.ipynb", root=repo) == "notebooks/x.ipynb"
    assert paths.short_path(Path.home() / ".cache" / "lorabook", root=repo) == "~/.cache/lorabook"
    assert paths.short_path("relative/file.txt", root=repo) == "relative/file.txt"
    with pytest.raises(TypeError, match="path"):
        paths.short_path(3)


def test_scrub_kernel_command_and_cache():
    venv_python = f"{sys.prefix}/bin/python3.11"
    cmd = f"{venv_python} -m ipykernel_launcher -f {tempfile.gettempdir()}/tmpab12cd.json"
    assert paths.scrub(cmd) == "python -m ipykernel_launcher -f <kernel connection file>"
    launcher = f"{sys.prefix}/lib/python3.11/site-packages/ipykernel_launcher.py -f /tmp/tmpx1.json"
    assert paths.scrub(launcher) == "ipykernel_launcher.py -f <kernel connection file>"
    home_file = f"{Path.home()}/.cache/lorabook/runs/r8.json"
    assert paths.scrub(f"saved to {home_file}") == "saved to ~/.cache/lorabook/runs/r8.json"


def test_scrub_any_checkout(tmp_path):
    root = tmp_path / "wt"
    text = f"ran {root}/notebooks/03.ipynb and /some/other/clone/src/lorabook/sweep.py in {root}"
    assert paths.scrub(text, root=root) == "ran notebooks/03.ipynb and src/lorabook/sweep.py in ."


def test_scrub_leaves_ordinary_text():
    text = "ratio 3/4, r=8/16, ~/x, a/b/c, $500 to LN-48213"
    assert paths.scrub(text) == text
    with pytest.raises(TypeError, match="text"):
        paths.scrub(None)


def test_scrub_outputs_in_place():
    nb = {"cells": [{"outputs": [
        {"output_type": "stream", "name": "stdout", "text": f"{Path.home()}/x\n"},
        {"output_type": "execute_result", "data": {"text/plain": f"'{Path.home()}/y'",
                                                   "image/png": "iVBOR"}}]}]}
    assert paths.scrub_outputs(nb) == 2
    outs = nb["cells"][0]["outputs"]
    assert outs[0]["text"] == "~/x\n" and outs[1]["data"]["text/plain"] == "'~/y'"
    assert outs[1]["data"]["image/png"] == "iVBOR"


def test_scrub_is_fast_on_inline_images_and_leaves_them_intact():
    """An animation's frames are megabytes of base64, full of "/": scrubbed around, in linear time."""
    import base64
    import os
    import time

    blob = base64.b64encode(os.urandom(1_500_000)).decode()
    frame = "data:image/png;base64," + "\\\n".join(blob[i:i + 76] for i in range(0, len(blob), 76))
    page = f'<img src="{frame}"> saved in {Path.home()}/.cache/x and /tmp/tmpab.json'
    start = time.perf_counter()
    out = paths.scrub(page)
    assert time.perf_counter() - start < 2.0
    assert frame in out and f"{Path.home()}/" not in out and "<kernel connection file>" in out
    plain = "/".join(["abc"] * 200_000)  # no data URI at all: still linear
    start = time.perf_counter()
    paths.scrub(plain)
    assert time.perf_counter() - start < 2.0
