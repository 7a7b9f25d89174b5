"""Build the talk's deck: `python book/slides/build.py` (what `make slides` runs, after `make book`).

1. copies book/slides to _build/slides_src;
2. for every ```{deck-figure} NAME``` in the slides, copies the best file the chapters exported
   (lorabook.viz.export: gpu, then cpu, then fast) and its sidecar JSON into figures/;
3. runs `sphinx-build -b revealjs -W` into _build/slides (reveal.js from sphinx-revealjs);
4. fails if the deck references anything on the network (scripts, styles, images, fonts).

A name no chapter has exported yet is not an error: its slide shows a placeholder.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
from pathlib import Path

from lorabook.viz import export

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
FIGURE = re.compile(r"^```\{deck-figure\}\s+(\S+)", re.MULTILINE)
# what a page makes the browser fetch: src/href of script, link, img, source, iframe, video
FETCHED = re.compile(r"""<(?:script|link|img|source|iframe|video|audio|embed)\b[^>]*?"""
                     r"""\s(?:src|href|poster)\s*=\s*["']([^"']+)["']""", re.IGNORECASE)
CSS_URL = re.compile(r"""(?:url\(\s*["']?|@import\s+["'])([^"')\s]+)""", re.IGNORECASE)
REMOTE = re.compile(r"^(?:[a-z][a-z0-9+.-]*:)?//", re.IGNORECASE)  # http://, https://, //host


def figure_names(src: Path) -> list[str]:
    """Export names the slides ask for, in slide order."""
    names: list[str] = []
    for md in sorted(src.rglob("*.md")):
        names += [n for n in FIGURE.findall(md.read_text(encoding="utf-8")) if n not in names]
    return names


def collect(names: list[str], dest: Path, figures: Path, modes: tuple[str, ...]) -> dict:
    """Copy each name's best exported file and sidecar into dest; returns name -> its mode,
    "record" for a figure drawn from stored runs of record (whatever setting drew it), or None."""
    dest.mkdir(parents=True, exist_ok=True)
    found = {}
    for name in names:
        hit = export.find(name, figures, modes)
        found[name] = None if hit is None else "record" if hit[1].get("records") else hit[1]["mode"]
        if hit is not None:
            path, _ = hit
            shutil.copy2(path, dest / path.name)
            shutil.copy2(path.with_name(f"{name}.json"), dest / f"{name}.json")
    return found


def remote_references(out: Path) -> list[str]:
    """Every URL the built deck's pages, and the stylesheets they load, fetch from the network.

    Scripts and styles are followed from each HTML page (and CSS @import / url() from each
    stylesheet it loads); files the pages never load (reveal.js' other themes) do not count.
    """
    hits, seen = [], set()
    todo = [p for p in sorted(out.rglob("*.html"))]
    while todo:
        path = todo.pop()
        if path in seen or not path.is_file():
            continue
        seen.add(path)
        text = path.read_text(encoding="utf-8", errors="replace")
        pattern = CSS_URL if path.suffix == ".css" else FETCHED
        for url in pattern.findall(text):
            if REMOTE.match(url):
                hits.append(f"{path.relative_to(out)}: {url}")
            elif not url.startswith(("data:", "#")) and path.suffix != ".js":
                local = (path.parent / url.split("?")[0].split("#")[0]).resolve()
                if local.suffix == ".css":
                    todo.append(local)
    return hits


def build(out: Path, figures: Path, modes: tuple[str, ...], staging: Path) -> dict:
    """Stage the sources and figures, run sphinx-build, check the output; returns the report."""
    if staging.exists():
        shutil.rmtree(staging)
    shutil.copytree(HERE, staging, ignore=shutil.ignore_patterns("__pycache__", "build.py",
                                                                 "figures"))
    found = collect(figure_names(staging), staging / "figures", figures, modes)
    if out.exists():
        shutil.rmtree(out)
    cmd = [sys.executable, "-m", "sphinx", "-b", "revealjs", "-W", "--keep-going", "-q",
           str(staging), str(out)]
    subprocess.run(cmd, check=True)
    remote = remote_references(out)
    if remote:
        raise SystemExit("the deck fetches from the network:\n" + "\n".join(remote))
    return found


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "_build" / "slides")
    parser.add_argument("--figures", type=Path, default=None,
                        help="exported figures (default: lorabook.viz.export.figures_dir())")
    parser.add_argument("--modes", default=",".join(export.MODES),
                        help="run settings to take figures from, best first (default gpu,cpu,fast)")
    args = parser.parse_args(argv)
    figures = args.figures or export.figures_dir()
    modes = tuple(m for m in args.modes.split(",") if m)
    found = build(args.out, figures, modes, args.out.parent / "slides_src")
    missing = [n for n, m in found.items() if m is None]
    fast = [n for n, m in found.items() if m == "fast"]
    records = [n for n, m in found.items() if m == "record"]
    print(f"deck: {args.out / 'index.html'}; {len(found)} figures from {figures}: "
          f"{len(records)} from runs of record, "
          f"{len(found) - len(missing) - len(fast) - len(records)} from cpu/gpu runs, "
          f"{len(fast)} from fast runs (marked on their slides), "
          f"{len(missing)} not exported yet (placeholders)")
    for name in missing:
        print(f"  placeholder: {name} (run chapter {name[2]})")


if __name__ == "__main__":
    main()
