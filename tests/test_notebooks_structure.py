"""Every chapter notebook follows the book's contract (nbval executes them; this checks their form)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))


def _toc_files() -> set[str]:
    toc = yaml.safe_load((ROOT / "_toc.yml").read_text())
    files = {toc["root"]}
    for part in toc.get("parts", []):
        files.update(ch["file"] for ch in part["chapters"])
    return files


def test_there_are_chapters():
    assert len(NOTEBOOKS) >= 1


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_contract(path: Path):
    nb = json.loads(path.read_text())
    cells = nb["cells"]
    # committed without outputs: the book build executes them
    assert all(not c.get("outputs") and c.get("execution_count") is None
               for c in cells if c["cell_type"] == "code"), f"{path.name} has stored outputs"
    first = "".join(cells[0]["source"])
    assert cells[0]["cell_type"] == "markdown" and first.startswith("# Chapter ")
    assert f"colab.research.google.com/github/lorabook/lorabook/blob/main/notebooks/{path.name}" in first
    setup = "".join(cells[1]["source"])
    assert '"google.colab" in sys.modules' in setup and "colab_setup.sh" in setup
    third = "".join(cells[2]["source"])
    assert "config.describe()" in third and "seed_everything" in third
    code = "\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "code")
    assert "sys.path" not in code, "notebooks import the installed package, never via sys.path"
    text = "\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "markdown")
    assert "## What we measured" in text and "## Exercises" in text
    assert f"notebooks/{path.stem}" in _toc_files(), f"{path.name} is not in _toc.yml"


def test_toc_entries_exist():
    for f in _toc_files():
        assert any((ROOT / f"{f}{ext}").exists() for ext in (".md", ".ipynb")), f
