"""The ``deck-figure`` directive: a figure a chapter exported, or a visible placeholder.

    ```{deck-figure} ch2_decomposition
    :cell: 5. The animations the talk is missing
    :width: 90%
    ```

``book/slides/build.py`` copies the best exported file of each name (gpu, then cpu, then fast)
and its sidecar JSON into ``<srcdir>/figures``. The directive shows the file (an image, or the
HTML of a table) with a line saying where it came from; a figure from the fast (CI) setting gets
a visible note; a name no chapter has exported yet becomes a placeholder saying which chapter to
run. No case is a build error: the deck always builds.
"""

from __future__ import annotations

import html
import json
import re
from pathlib import Path

from docutils import nodes
from docutils.parsers.rst import directives
from sphinx.util.docutils import SphinxDirective

CHAPTERS = {1: "01_fine_tuning", 2: "02_lora_from_scratch", 3: "03_lora_in_practice",
            4: "04_lora_performance", 5: "05_nf4_from_scratch", 6: "06_qlora",
            7: "07_qlora_performance"}


def _raw(text: str) -> nodes.raw:
    return nodes.raw("", text, format="html")


class DeckFigure(SphinxDirective):
    """One exported figure, animation or table, by its export name."""

    required_arguments = 1
    has_content = True  # an optional caption, in markdown
    option_spec = {"cell": directives.unchanged, "width": directives.unchanged,
                   "height": directives.unchanged}

    def run(self) -> list[nodes.Node]:
        name = self.arguments[0]
        match = re.match(r"^ch(\d)_[a-z0-9_]+$", name)
        if not match:
            raise self.error(f"deck-figure names look like ch2_decomposition, got {name!r}")
        chapter = int(match.group(1))
        notebook = CHAPTERS.get(chapter, f"chapter {chapter}")
        section = f", § {self.options['cell']}" if "cell" in self.options else ""
        where = f"chapter {chapter}{section}"
        folder = Path(self.env.srcdir) / "figures"
        sidecar = folder / f"{name}.json"
        self.env.note_dependency(str(sidecar))
        out: list[nodes.Node] = []
        if not sidecar.is_file():
            out.append(_raw(
                f'<div class="deck-missing" data-figure="{name}"><p>figure not yet exported: '
                f'run chapter {chapter}</p><p><code>notebooks/{notebook}.ipynb</code>'
                f'{html.escape(section)} exports <code>{name}</code></p></div>'))
            return out
        meta = json.loads(sidecar.read_text(encoding="utf-8"))
        path = folder / meta["file"]
        if meta["kind"] == "table":
            out.append(_raw(f'<div class="deck-table" data-figure="{name}">'
                            f'{path.read_text(encoding="utf-8")}</div>'))
        else:
            image = nodes.image(uri=f"figures/{meta['file']}", alt=f"{name} ({where})")
            for key in ("width", "height"):
                if key in self.options:
                    image[key] = self.options[key]
            image["classes"].append("deck-figure")
            out.append(image)
        if self.content:
            caption = nodes.container(classes=["deck-caption"])
            self.state.nested_parse(self.content, self.content_offset, caption)
            out.append(caption)
        source = (f"{where} · {meta['mode']} setting · commit {meta.get('commit', '?')} · "
                  f"{meta.get('created', '')}")
        out.append(_raw(f'<p class="deck-source">{html.escape(source)}</p>'))
        if meta["mode"] == "fast":
            out.append(_raw(
                '<p class="deck-fast">fast (CI) setting: a few steps only. Run <code>make book</code>'
                ' then <code>make slides</code> for the figure of the cpu setting.</p>'))
        return out


def setup(app):
    app.add_directive("deck-figure", DeckFigure)
    return {"version": "1", "parallel_read_safe": True, "parallel_write_safe": True}
