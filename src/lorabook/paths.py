"""Paths as a reader should see them: relative to the repository or to ``~`` (chapter 1).

A run's record keeps the command that made it and the files it wrote, with the absolute paths of
the machine that ran it (``/root/.cache/lorabook/...``, a virtualenv's ``python -m
ipykernel_launcher -f /tmp/tmpXXXX.json``). ``short_path`` and ``scrub`` rewrite them for
display: the repository becomes relative, the home folder ``~``, a kernel's connection file
``<kernel connection file>``, an interpreter ``python``. Nothing here reads or writes files.
"""

from __future__ import annotations

import os
import re
import sys
import tempfile
from pathlib import Path

# the repository this package sits in, when installed from a checkout (editable or PYTHONPATH)
_PACKAGE_ROOT = Path(__file__).resolve().parents[2]
REPO_ROOT = _PACKAGE_ROOT if (_PACKAGE_ROOT / "pyproject.toml").is_file() else None
# folders that only a checkout of this repository has: a path through one of them, in any
# checkout, is shown from that folder on (`/other/clone/notebooks/x` -> `notebooks/x`)
# Every pattern is bounded (segments without "/", at most 12 of them), so that a long run of
# base64 (which holds "/") cannot make a search quadratic.
_SEG = r"/[^\s'\"<>:/]+"
_CHECKOUT = re.compile(rf"(?<![\w~.])(?:{_SEG}){{1,12}}/(?=(?:src/lorabook|notebooks|benchmarks|"
                       r"book|tests|\.venv|_build)/)")
_PYTHON = re.compile(rf"(?<![\w~.])(?:{_SEG}){{0,12}}/bin/python[0-9.]*")
_SITE_PACKAGES = re.compile(rf"(?<![\w~.])(?:{_SEG}){{1,12}}/site-packages/")  # a module's file
_KERNEL_FILE = re.compile(rf"(?:{_SEG}){{0,12}}/(?:kernel-[\w-]+|tmp\w+)\.json")
# inline images and animation frames: never paths, and megabytes long
_DATA_URI = re.compile(r"(data:[\w/+.-]+;base64,(?:[A-Za-z0-9+/=]|\\\n)+)")  # JS: "\" + newline


def short_path(path: str | os.PathLike, root: str | os.PathLike | None = None) -> str:
    """``path`` relative to the repository (or ``root``), else from ``~``, else as given (chapter 1)."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__}")
    p = Path(path).expanduser()
    base = Path(root) if root is not None else REPO_ROOT
    if p.is_absolute():
        if base is not None and p.is_relative_to(base):
            return p.relative_to(base).as_posix() or "."
        home = Path.home()
        if p.is_relative_to(home):
            return "~/" + p.relative_to(home).as_posix() if p != home else "~"
    return Path(path).as_posix()


def scrub(text: str, root: str | os.PathLike | None = None) -> str:
    """``text`` with this machine's absolute paths made relative or shortened (chapter 1).

    In order: a kernel's connection file, an interpreter's path, an installed module's path
    (from its package on: ``ipykernel_launcher.py``), the repository (``root``,
    default the checkout this package is in) and any other checkout of it, the virtualenv,
    the temporary folder, the home folder.
    """
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    if "base64," in text:  # scrub around inline data, never inside it
        return "".join(part if i % 2 else scrub(part, root)
                       for i, part in enumerate(_DATA_URI.split(text)))
    text = _KERNEL_FILE.sub("<kernel connection file>", text)
    text = _PYTHON.sub("python", text)
    text = _SITE_PACKAGES.sub("", text)
    base = Path(root) if root is not None else REPO_ROOT
    if base is not None:
        text = re.sub(re.escape(str(base)) + r"(?=/)/?", "", text)
        text = re.sub(re.escape(str(base)) + r"\b", ".", text)
    text = _CHECKOUT.sub("", text)
    for prefix, short in ((sys.prefix, "<venv>"), (tempfile.gettempdir(), "<tmp>"),
                          (str(Path.home()), "~")):
        if prefix and prefix not in ("/", "."):
            text = re.sub(re.escape(prefix) + r"(?=/|\b)", short, text)
    return text


def scrub_outputs(nb) -> int:
    """Apply ``scrub`` to every text output of an executed notebook, in place; returns how many changed (chapter 1)."""
    changed = 0
    for cell in nb.get("cells", []):
        for output in cell.get("outputs", []) or []:
            if output.get("output_type") == "stream":
                new = scrub(output.get("text", ""))
                changed += new != output.get("text", "")
                output["text"] = new
            for mime, value in (output.get("data") or {}).items():
                if mime.startswith("text/") and isinstance(value, str):
                    new = scrub(value)
                    changed += new != value
                    output["data"][mime] = new
    return changed


__all__ = ["REPO_ROOT", "scrub", "scrub_outputs", "short_path"]
