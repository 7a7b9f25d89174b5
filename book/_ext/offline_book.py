"""The rendered book, offline and as it ran: a Sphinx extension of the book (issue 17).

Loaded from ``_config.yml`` (``sphinx.local_extensions``). What it does, and why:

- **Executed chapters**: after myst-nb executes (or reads from the cache) a notebook, each
  tqdm widget output becomes the text of the bar's *final* state
  (``lorabook.progress.finish_progress_bars``), and this machine's absolute paths in outputs
  become relative ones (``lorabook.paths.scrub_outputs``). The notebooks are not changed: live
  in Jupyter and Colab the bars stay widgets.
- **No network**: every page drops scripts and stylesheets served from another host (require.js
  and the widget manager, which no page needs once no widget view is left; thebe, whose
  configuration sphinx-thebe declares twice, a SyntaxError in the console, and which the book
  does not use); the Colab badge comes from ``_static``; animation players get Unicode icons
  instead of Font Awesome from a CDN (``lorabook.viz.animations.offline_jshtml``).
  MathJax 3 itself is served from ``_static/mathjax`` by ``sphinx-mathjax-offline``.
- **The site's front door**: ``index.html`` redirects to the first page, as the one
  sphinx-external-toc writes, but with a title and the book's icon inline (a data URI): a page
  without an icon makes the browser ask the server for ``/favicon.ico``, a 404 in the console.
- **Readable outputs**: ``static/lorabook.css`` (wide tables scroll in their own box; only cells
  of long text, marked by ``lorabook.viz.tables.mark_long_cells``, wrap, at a readable width).
"""

from __future__ import annotations

import base64
import html
import re
from pathlib import Path

HERE = Path(__file__).resolve().parent
STATIC = HERE / "static"
REMOTE = re.compile(r"^(?:[a-z][a-z0-9+.-]*:)?//", re.IGNORECASE)
COLAB_BADGE = "https://colab.research.google.com/assets/colab-badge.svg"


def tidy_notebook(nb) -> dict:
    """Finished progress bars, relative paths, long table cells marked, in an executed notebook."""
    from lorabook import paths, progress
    from lorabook.viz.tables import mark_long_cells

    done = {"bars": progress.finish_progress_bars(nb), "paths": paths.scrub_outputs(nb)}
    for cell in nb.get("cells", []):
        for output in cell.get("outputs", []) or []:
            data = output.get("data") or {}
            if isinstance(data.get("text/html"), str) and "<table" in data["text/html"]:
                data["text/html"] = mark_long_cells(data["text/html"])
    return done


def _patch_myst_nb() -> None:
    """Run tidy_notebook on every notebook myst-nb hands to the renderer (executed or cached)."""
    from myst_nb.core.execute.base import NotebookClientBase

    if getattr(NotebookClientBase, "_lorabook_tidy", False):
        return
    enter = NotebookClientBase.__enter__

    def __enter__(self):
        client = enter(self)
        tidy_notebook(self.notebook)
        return client

    NotebookClientBase.__enter__ = __enter__
    NotebookClientBase._lorabook_tidy = True


def _is_thebe(script) -> bool:
    filename = getattr(script, "filename", None) or ""
    body = (getattr(script, "attributes", None) or {}).get("body", "")
    return filename.endswith("sphinx-thebe.js") or "THEBE_JS_URL" in body


def _local_only(app, pagename, templatename, context, doctree) -> None:
    """Drop remote and thebe scripts, remote stylesheets; point network images at _static."""
    from lorabook.viz.animations import offline_jshtml

    if "script_files" in context:
        kept, seen = [], set()
        for script in context["script_files"]:
            filename = getattr(script, "filename", None) or ""
            body = (getattr(script, "attributes", None) or {}).get("body", "")
            key = (filename, body)
            if REMOTE.match(filename) or _is_thebe(script) or key in seen:
                continue
            seen.add(key)
            kept.append(script)
        context["script_files"][:] = kept  # in place: the template and later handlers share it
    if "css_files" in context:
        context["css_files"][:] = [c for c in context["css_files"]
                                   if not REMOTE.match(getattr(c, "filename", None) or str(c))]
    body = context.get("body")
    if body:
        if COLAB_BADGE in body:
            body = body.replace(COLAB_BADGE, context["pathto"]("_static/colab-badge.svg", 1))
        if "font-awesome" in body or 'class="fa fa-' in body:
            body = offline_jshtml(body)
        context["body"] = body


def _add_static(app) -> None:
    app.config.html_static_path.append(str(STATIC))


def index_redirect(target: str, title: str, icon: Path = STATIC / "favicon.svg") -> str:
    """The root ``index.html``: a redirect to ``target`` that names its icon inline."""
    data = base64.b64encode(icon.read_bytes()).decode("ascii")
    url = html.escape(target, quote=True)
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{html.escape(title)}</title>"
            f'<link rel="icon" type="image/svg+xml" href="data:image/svg+xml;base64,{data}">'
            f'<meta http-equiv="Refresh" content="0; url={url}"></head>\n'
            f'<body><a href="{url}">{html.escape(title)}</a></body></html>\n')


def _write_index(app, exception) -> None:
    """Before sphinx-external-toc's build-finished handler, which keeps an index.html it finds."""
    if exception is not None or app.builder.name != "html" or app.config.root_doc == "index":
        return
    title = app.config.html_title or app.config.project
    (Path(app.outdir) / "index.html").write_text(
        index_redirect(f"{app.config.root_doc}.html", title), encoding="utf-8")


def setup(app):
    _patch_myst_nb()
    app.connect("builder-inited", _add_static)
    app.connect("build-finished", _write_index, priority=400)  # sphinx-external-toc's runs at 500
    app.connect("html-page-context", _local_only, priority=900)  # after the others added theirs
    app.add_css_file("lorabook.css")
    return {"version": "1", "parallel_read_safe": True, "parallel_write_safe": True}
