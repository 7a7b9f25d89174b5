"""The ``deck-figure`` directive: a figure a chapter exported, or a visible placeholder.

    ```{deck-figure} ch2_decomposition
    :cell: 5. The animations the talk is missing
    :width: 90%
    ```

A table can be cut to the rows that make the point, so that it fits the slide: ``:rows: 4``
keeps its first four body rows, ``:rows: 1,3,5`` those rows (1-based); a line under it says
how many rows the chapter's table has. ``:columns: 0,2,3`` keeps those columns (0 is the
index). Column headers in snake_case are shown as words (``exact_match`` -> "exact match").

``book/slides/build.py`` copies the best exported file of each name (gpu, then cpu, then fast)
and its sidecar JSON into ``<srcdir>/figures``. The directive shows the file (an image, or the
HTML of a table) with a line saying where it came from; a figure from the fast (CI) setting gets
a visible note, unless it was drawn from stored runs of record (its sidecar's ``records``: the
setting that drew it changes nothing in it, and the line names the files instead); a name no
chapter has exported yet becomes a placeholder saying which chapter to run. No case is a build
error: the deck always builds.
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


ROW = re.compile(r"<tr\b.*?</tr>\s*", re.DOTALL)
CELL = re.compile(r"<t([hd])\b[^>]*>.*?</t\1>\s*", re.DOTALL)
SNAKE_HEADER = re.compile(r"(<th\b[^>]*>)\s*([a-z0-9]+(?:_[a-z0-9]+)+)\s*(</th>)")


ACRONYMS = {"json": "JSON", "mb": "MB", "gib": "GiB", "mib": "MiB", "lm": "LM", "ppl": "perplexity"}


def _words(snake: str) -> str:
    """exact_match -> "exact match", valid_json -> "valid JSON"."""
    return " ".join(ACRONYMS.get(w, w) for w in snake.split("_"))


def _indices(spec: str, name: str) -> list[int]:
    try:
        return [int(x) for x in spec.replace(" ", "").split(",") if x]
    except ValueError:
        raise ValueError(f":{name}: takes a number or comma-separated numbers, got {spec!r}") from None


def cut_table(table: str, rows: str | None = None, columns: str | None = None) -> tuple[str, int]:
    """The HTML table with only the chosen body rows and columns; returns (html, body rows before)."""
    head, sep, rest = table.partition("<tbody>")
    body, sep2, tail = rest.partition("</tbody>")
    body_rows = ROW.findall(body) if sep else []
    n = len(body_rows)
    if rows and sep:
        picked = _indices(rows, "rows")
        keep = body_rows[:picked[0]] if len(picked) == 1 else [
            body_rows[i - 1] for i in picked if 1 <= i <= n]
        table = head + sep + "\n" + "".join(keep) + sep2 + tail
    if columns:
        wanted = set(_indices(columns, "columns"))

        def keep_cells(row: re.Match) -> str:
            cells = CELL.findall(row.group(0))
            if not cells:
                return row.group(0)
            kept = [m.group(0) for i, m in enumerate(CELL.finditer(row.group(0))) if i in wanted]
            start = row.group(0)[:row.group(0).index(">") + 1]
            return start + "".join(kept) + "</tr>\n"

        table = ROW.sub(keep_cells, table)
    table = re.sub(r"\\n(?:&nbsp;|\s)*", " ", table)  # to_html shows a reply's newlines as \n
    table = SNAKE_HEADER.sub(lambda m: m.group(1) + _words(m.group(2)) + m.group(3), table)
    return table, n


class DeckFigure(SphinxDirective):
    """One exported figure, animation or table, by its export name."""

    required_arguments = 1
    has_content = True  # an optional caption, in markdown
    option_spec = {"cell": directives.unchanged, "width": directives.unchanged,
                   "height": directives.unchanged, "rows": directives.unchanged,
                   "columns": directives.unchanged}

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
            try:
                table, n = cut_table(path.read_text(encoding="utf-8"), self.options.get("rows"),
                                     self.options.get("columns"))
            except ValueError as e:
                raise self.error(str(e)) from None
            shown = len(ROW.findall(table.partition("<tbody>")[2]))
            note = (f'<p class="deck-cut">{shown} of the {n} rows of the chapter\'s table</p>'
                    if shown < n else "")
            out.append(_raw(f'<div class="deck-table" data-figure="{name}">{table}</div>{note}'))
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
        drawn_from = (f"runs of record ({', '.join(meta['records'])}), drawn in the "
                      f"{meta['mode']} setting" if meta.get("records") else f"{meta['mode']} setting")
        source = f"{where} · {drawn_from} · commit {meta.get('commit', '?')} · {meta.get('created', '')}"
        out.append(_raw(f'<p class="deck-source">{html.escape(source)}</p>'))
        if meta["mode"] == "fast" and not meta.get("records"):
            out.append(_raw(
                '<p class="deck-fast">fast (CI) setting: a few steps only. Run <code>make book</code>'
                ' then <code>make slides</code> for the figure of the cpu setting.</p>'))
        return out


def setup(app):
    app.add_directive("deck-figure", DeckFigure)
    return {"version": "1", "parallel_read_safe": True, "parallel_write_safe": True}
