"""Figures, animations and tables exported from the executed chapters for the slides (chapter 2).

``export(obj, name, chapter)`` writes ``<figures_dir()>/<mode>/<name>.<ext>`` and a sidecar
``<name>.json`` saying where it came from (chapter, run setting, commit, time). A Figure becomes
a PNG, an animation a GIF, a DataFrame an HTML table. Each run setting has its own folder, so a
``fast`` run (CI) never overwrites the ``cpu`` or ``gpu`` figures the deck is built from;
``book/slides/build.py`` picks the best setting available for each name. A figure drawn from
stored runs of record names their files (``records=``): what it shows does not depend on the
setting that executed the chapter, and the deck says so instead of marking it as a fast figure.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from matplotlib import animation
from matplotlib.figure import Figure

from lorabook import config, models
from lorabook.viz.animations import save_animation
from lorabook.viz.plots import (
    DECK_FIGURE_HEIGHT_PX,
    DECK_FIGURE_WIDTH_PX,
    DECK_MIN_TEXT_PX,
    MIN_TEXT_PT,
    deck_smallest_text_px,
    smallest_text_pt,
)

FIGURES_ENV = "LORABOOK_FIGURES"  # overrides where exported figures go
MODES = ("gpu", "cpu", "fast")  # run settings, best first: the deck takes the first it finds
NAME = re.compile(r"^ch[1-9]_[a-z0-9_]+$")  # e.g. ch2_decomposition: chapter prefix, snake case


def figures_dir() -> Path:
    """Root of the exported figures: ``$LORABOOK_FIGURES`` or ``cache_dir()/figures`` (chapter 2)."""
    return Path(os.environ.get(FIGURES_ENV) or models.cache_dir() / "figures").expanduser()


def _commit() -> str:
    root = Path(__file__).resolve().parents[3]
    try:
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "--short=12", "HEAD"],
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() or "unknown"


def _check(name: str, chapter: int) -> None:
    if isinstance(chapter, bool) or not isinstance(chapter, int) or not 1 <= chapter <= 9:
        raise ValueError(f"chapter must be an int from 1 to 9, got {chapter!r}")
    if not isinstance(name, str) or not NAME.match(name) or not name.startswith(f"ch{chapter}_"):
        raise ValueError(f"name must look like 'ch{chapter}_what_it_shows' (lower case, digits, "
                         f"underscores, prefixed by its chapter), got {name!r}")


def export(obj: Any, name: str, chapter: int, *, fps: float = 1.5, dpi: int = 100,
           mode: str | None = None, records: Sequence[str | os.PathLike] | None = None) -> Path:
    """Save a Figure (PNG), animation (GIF) or DataFrame (HTML) for the slides (chapter 2).

    Returns the path written, ``figures_dir()/<mode>/<name>.<ext>``, next to ``<name>.json``
    (chapter, name, mode, commit, created, file; for figures and animations the smallest text
    as the book shows it, ``smallest_text_pt``, and as a slide of the deck shows the file saved
    at ``dpi``, ``deck_smallest_text_px``). ``mode`` defaults to ``LORABOOK_MODE``. A figure
    whose text would show below ``plots.MIN_TEXT_PT`` at the book's width, or below
    ``plots.DECK_MIN_TEXT_PX`` in the deck's figure box, is refused (ValueError): every
    chapter's exported figure is checked this way when nbval runs it.

    ``records`` names the results files a figure of the runs of record reads (e.g.
    ``evidence.ledger_paths("qlora")``): the sidecar keeps their names as ``records``, and the
    deck shows them as the figure's source, whatever setting exported it. Empty is refused: a
    figure that read no records must not claim to show them.
    """
    _check(name, chapter)
    mode = mode or config.get_settings().mode
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    sidecar: dict[str, Any] = {"chapter": chapter, "name": name}
    if records is not None:
        names = [] if isinstance(records, (str, os.PathLike)) else [Path(p).name for p in records]
        if not names:
            raise ValueError(f"{name}: records must be a non-empty list of the results files the "
                             f"figure reads, got {records!r}")
        sidecar["records"] = names
    if isinstance(obj, (Figure, animation.Animation)):
        # what the book shows must be legible: every text >= MIN_TEXT_PT at the page's width
        fig = obj if isinstance(obj, Figure) else obj._fig  # an animation's frames: whole figure
        sidecar["smallest_text_pt"] = round(smallest_text_pt(fig, tight=fig is obj), 2)
        if sidecar["smallest_text_pt"] < MIN_TEXT_PT:
            raise ValueError(f"{name}: its smallest text shows at {sidecar['smallest_text_pt']} pt in "
                             f"the book's column (below {MIN_TEXT_PT} pt): enlarge that text or "
                             f"narrow the figure ({fig.get_size_inches()[0]:.1f} in wide)")
        # what the deck shows must be legible too: a slide scales a tall figure to 470 px high
        sidecar["deck_smallest_text_px"] = round(deck_smallest_text_px(fig, dpi, tight=fig is obj), 2)
        if sidecar["deck_smallest_text_px"] < DECK_MIN_TEXT_PX:
            w, h = fig.get_size_inches()
            raise ValueError(f"{name}: its smallest text shows at {sidecar['deck_smallest_text_px']} "
                             f"px on a slide (below {DECK_MIN_TEXT_PX} px) when saved at dpi {dpi}: the "
                             f"deck fits it in {DECK_FIGURE_WIDTH_PX} x {DECK_FIGURE_HEIGHT_PX} px, "
                             f"so set a tall figure's panels side by side ({w:.1f} x {h:.1f} in "
                             "now), enlarge its text or raise the dpi")
    folder = figures_dir() / mode
    folder.mkdir(parents=True, exist_ok=True)
    if isinstance(obj, Figure):
        path = folder / f"{name}.png"
        obj.savefig(path, dpi=dpi, bbox_inches="tight", facecolor="white")
        kind = "figure"
    elif isinstance(obj, animation.Animation):
        path = save_animation(obj, folder / f"{name}.gif", fps=fps, dpi=dpi)
        kind = "animation"
    elif hasattr(obj, "to_html") and hasattr(obj, "columns"):  # a pandas DataFrame
        path = folder / f"{name}.html"
        html = obj.to_html(classes="lorabook-table", border=0, float_format="{:.4g}".format)
        path.write_text(html, encoding="utf-8")
        kind = "table"
    else:
        raise TypeError("export saves a matplotlib Figure, a matplotlib Animation or a pandas "
                        f"DataFrame, got {type(obj).__name__}")
    sidecar.update(kind=kind, file=path.name, mode=mode, commit=_commit(),
                   created=time.strftime("%Y-%m-%d %H:%M:%S"))
    (folder / f"{name}.json").write_text(json.dumps(sidecar, indent=1) + "\n", encoding="utf-8")
    return path


def find(name: str, root: Path | None = None,
         modes: tuple[str, ...] = MODES) -> tuple[Path, dict] | None:
    """The best exported file of ``name`` and its sidecar: gpu, then cpu, then fast (chapter 2)."""
    root = figures_dir() if root is None else Path(root)
    for mode in modes:
        sidecar = root / mode / f"{name}.json"
        if sidecar.is_file():
            meta = json.loads(sidecar.read_text(encoding="utf-8"))
            path = sidecar.parent / meta["file"]
            if path.is_file():
                return path, meta
    return None
