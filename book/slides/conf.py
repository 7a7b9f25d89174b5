"""Sphinx configuration of the talk's deck (reveal.js, bundled by sphinx-revealjs: no CDN).

Built by `make slides` (book/slides/build.py), which copies this folder to _build/slides_src,
adds the figures the executed chapters exported (lorabook.viz.export) and runs
`sphinx-build -b revealjs` into _build/slides.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent / "_ext"))

project = "LoRA and QLoRA, from scratch"
author = "The lorabook authors"
copyright = "2026"
# sphinx-mathjax-offline: MathJax 3 from its wheel into _static/mathjax, so formulas (myst's
# $...$) render with no network, as in the book
extensions = ["myst_parser", "sphinx_revealjs", "deck_figures", "sphinx-mathjax-offline"]
myst_enable_extensions = ["colon_fence", "deflist", "dollarmath"]
root_doc = "index"
exclude_patterns = ["_build", "sections"]  # sections/ are included by index.md, not pages
language = "en"

revealjs_style_theme = "white"  # dist/theme/white.css: local fonts, nothing fetched
revealjs_static_path = ["_static"]
html_favicon = "_static/favicon.svg"  # a local icon: the browser asks no server for /favicon.ico
revealjs_css_files = ["deck.css"]
revealjs_script_conf = {
    "hash": True,  # each slide has its own URL (#/3/1)
    "slideNumber": "c/t",
    "width": 1280,  # a 16:9 projector; every slide's content fits this frame (tests/browser)
    "height": 720,
    "margin": 0.03,
    "transition": "none",  # projectors and GIFs: no sliding
    "navigationMode": "linear",  # the right arrow (and space) walks every slide, in order
}
revealjs_script_plugins = [  # all from the bundled reveal.js: speaker notes and zoom
    {"name": "RevealNotes", "src": "revealjs/plugin/notes/notes.js"},
    {"name": "RevealZoom", "src": "revealjs/plugin/zoom/zoom.js"},
]
