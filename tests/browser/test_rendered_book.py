"""The built book as a reader sees it, offline: every page in headless Chromium (issues 7, 17).

Run after the book is built (`make book` or `make book-fast`): `make test-browser`. Every page
of `_build/html` (or `$LORABOOK_HTML`) is served from 127.0.0.1 and must:

- load every figure (local or inline, lazy ones included) and show no error output, traceback
  or dead widget; chapters that make animations show their players;
- render its math with the local MathJax 3: every `.math` element holds a typeset
  `mjx-container`, and no raw `\\(`, `\\[` or `$...\\cmd...$` is left in the visible text
  (code input excluded);
- show every progress bar finished: no `0%|` text;
- request nothing from any host but the local server (Chromium's performance log), and log no
  console error;
- show no absolute path of the build machine (the checkout, the home folder, the virtualenv,
  a kernel's connection file), neither in its text nor in its HTML;
- keep each output table's box inside the text column (a wider table scrolls in its box);
- show figures wider than the text column at `lorabook.viz.plots.BOOK_COLUMN_PX`, the width at
  which `lorabook.viz.export` checks that no figure text shows below 8 pt.

Screenshots of each whole page go to `_build/screenshots/` (JPEG, in parts of 8,000 px). Skipped, with
the reason, when the book is not built or the browser is missing.
"""

from __future__ import annotations

import json
import os
import re
import sys
import tempfile
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest
from headless import (
    Server,
    chromium,
    console_errors,
    remote_requests,
    requests_made,
    screenshot,
    set_viewport,
)

from lorabook.viz.plots import BOOK_COLUMN_PX

pytestmark = pytest.mark.browser

ROOT = Path(__file__).resolve().parents[2]
HTML = Path(os.environ.get("LORABOOK_HTML", ROOT / "_build" / "html"))
SHOTS = Path(os.environ.get("LORABOOK_SCREENSHOTS", ROOT / "_build" / "screenshots"))
NOTEBOOKS = sorted((HTML / "notebooks").glob("*.html")) if (HTML / "notebooks").is_dir() else []
PAGES = [p for p in NOTEBOOKS if re.match(r"\d\d_", p.name)]  # the chapters: 01_..., 02_...
# prose pages, and executed pages that are not chapters (e.g. a ledger of claims): the offline checks
PROSE = (sorted((HTML / "book").glob("*.html")) if (HTML / "book").is_dir() else []) + [
    p for p in NOTEBOOKS if p not in PAGES]
WIDTH, HEIGHT = 1280, 900  # the window the issue was seen in
MAX_SHOT_PX = 120_000  # whole pages, in parts of 8,000 px

# This machine's absolute paths: none may reach a page.
MACHINE_PATHS = sorted({str(p) for p in (ROOT, Path.home(), Path(sys.prefix)) if str(p) != "/"},
                       key=len, reverse=True)
KERNEL_FILE = re.compile(r"ipykernel_launcher\S*\s+-f\s+/|" + re.escape(tempfile.gettempdir())
                         + r"/tmp\w+\.json")
RAW_MATH = re.compile(r"\\\(|\\\)|\\\[|\\\]|\$[^$\n]*\\[A-Za-z]+[^$\n]*\$|\$[^$\s][^$\n]*[_^]\{")
UNFINISHED_BAR = re.compile(r"(?<![0-9])0%\|")
# a Markdown table shown as text: its rule row "| --- |" (Sphinx turns "---" into an em dash)
RAW_TABLE = re.compile(r"\|\s*(?::?-+:?|\u2014|\u2013)\s*\|\s*(?::?-+:?|\u2014|\u2013)\s*\|")

# One pass over the page, in the browser: what a reader would see go wrong.
INSPECT = """
const out = {title: document.title, images: 0, broken: [], players: 0, errors: [], widgets: 0};
// a page that names no icon makes the browser ask the server for /favicon.ico (a 404)
out.icon = document.querySelector('link[rel~="icon"]') !== null;
for (const img of document.images) {
  out.images += 1;
  if (!img.complete || img.naturalWidth === 0) out.broken.push(img.src.slice(0, 120));
}
out.figures = document.querySelectorAll(".cell_output img").length;
// figures wider than the column are shown at its width: lorabook.viz.export sizes their text by it
out.scaled_widths = Array.from(document.querySelectorAll(".cell_output img"))
  .filter(i => i.naturalWidth > i.clientWidth + 1 && i.clientWidth > 0).map(i => i.clientWidth);
out.players = document.querySelectorAll("div.animation").length;
for (const el of document.querySelectorAll(".output.traceback, .output.error, .cell_output .error")) {
  out.errors.push(el.innerText.slice(0, 300));
}
for (const el of document.querySelectorAll(".cell_output")) {
  const text = el.innerText;
  if (text.includes("Traceback (most recent call last)")) out.errors.push(text.slice(0, 300));
}
out.errors = Array.from(new Set(out.errors));
out.widgets = document.querySelectorAll(
  'script[type="application/vnd.jupyter.widget-view+json"]').length;
// math: Sphinx marks each formula with .math; MathJax 3 puts an mjx-container inside it
const maths = Array.from(document.querySelectorAll(".bd-article .math"));
out.math = maths.length;
out.math_unrendered = maths.filter(m => !m.querySelector("mjx-container"))
                           .map(m => m.textContent.slice(0, 80));
// the text a reader sees, without code input, scripts and typeset math
const skip = "script, style, noscript, mjx-container, mjx-assistive-mml, .cell_input, " +
             ".bd-sidebar-primary, .bd-sidebar-secondary, .bd-header, nav";
const parts = [];
const article = document.querySelector(".bd-article") || document.body;
const walker = document.createTreeWalker(article, NodeFilter.SHOW_TEXT);
while (walker.nextNode()) {
  const el = walker.currentNode.parentElement;
  if (!el || el.closest(skip)) continue;
  if (el.closest(".highlight, code") && !el.closest(".cell_output")) continue;  // code in prose
  parts.push(walker.currentNode.textContent);
}
out.text = parts.join(" ");
// "What we measured": its computed summary is a list or a table, not lines of printed text
out.summary = null;
for (const h of document.querySelectorAll(".bd-article h2")) {
  if (!h.textContent.startsWith("What we measured")) continue;
  const section = h.closest("section") || h.parentElement;
  out.summary = {lists: section.querySelectorAll(".cell_output ul, .cell_output table").length,
                 printed: Array.from(section.querySelectorAll(".cell_output pre"))
                   .filter(p => /^- \\S/m.test(p.innerText)).length};
}
// output tables: their box stays in the text column, and a wider table scrolls inside it
const column = article.getBoundingClientRect();
out.wide_tables = [];
for (const t of document.querySelectorAll(".cell_output table")) {
  const box = t.closest(".output") || t.parentElement;
  const b = box.getBoundingClientRect(), r = t.getBoundingClientRect();
  const scrolls = ["auto", "scroll"].includes(getComputedStyle(box).overflowX);
  if (r.width > 0 && (b.right > column.right + 2 || (r.width > b.width + 2 && !scrolls))) {
    out.wide_tables.push(Math.round(r.width));
  }
}
return out;
"""

WAIT_FOR_MATH = """
const done = arguments[arguments.length - 1];
if (window.MathJax && MathJax.startup && MathJax.startup.promise) {
  MathJax.startup.promise.then(() => done("typeset")).catch(e => done("error: " + e));
} else { done("no mathjax"); }
"""


# Chapters whose "What we measured" is still printed as text lines (issue 17: render it with
# lorabook.viz.tables.claims_markdown in the notebook, then delete its name here).
PRINTED_SUMMARIES: set[str] = set()


def _expects_animation(page: Path) -> bool:
    """Whether the chapter's source notebook shows an animation (to_jshtml)."""
    source = ROOT / "notebooks" / f"{page.stem}.ipynb"
    return source.is_file() and "to_jshtml" in source.read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def browser():
    if not PAGES:
        pytest.skip(f"no built book in {HTML}: run `make book` (or `make book-fast`) first")
    server = Server(HTML)
    driver, profile = chromium(WIDTH, HEIGHT)
    SHOTS.mkdir(parents=True, exist_ok=True)
    yield driver, server
    driver.quit()
    server.close()
    import shutil

    shutil.rmtree(profile, ignore_errors=True)


def _load(browser, page: Path) -> dict:
    from selenium.webdriver.support.ui import WebDriverWait

    driver, server = browser
    requests_made(driver), console_errors(driver)  # forget the previous page's
    driver.get("about:blank")
    set_viewport(driver, WIDTH, HEIGHT)
    driver.get(server.url(page))
    # lazy images below the fold would never load in a headless window: load them all now
    driver.execute_script("for (const i of document.images) i.loading = 'eager';")
    WebDriverWait(driver, 60).until(lambda d: d.execute_script(
        "return document.readyState === 'complete' && "
        "Array.from(document.images).every(i => i.complete);"))
    state = driver.execute_script(INSPECT)
    state["mathjax"] = driver.execute_async_script(WAIT_FOR_MATH)
    if state["math"]:
        state.update({k: v for k, v in driver.execute_script(INSPECT).items()
                      if k.startswith("math")})
    state["remote"] = remote_requests(requests_made(driver), server.base)
    state["console"] = console_errors(driver)
    return state


def _params(pages: list[Path]):
    """The pages, or one placeholder that skips with the reason when the book is not built."""
    if pages:
        return [pytest.param(p, id=p.stem) for p in pages]
    return [pytest.param(None, id="no-built-book")]


def _offline_problems(state: dict, page: Path) -> list[str]:
    """What every page, chapter or prose, must not show."""
    problems = []
    if state["broken"]:
        problems.append(f"images that did not load: {state['broken']}")
    if state["errors"]:
        problems.append(f"error output on the page: {state['errors']}")
    if state["remote"]:
        problems.append(f"requests to other hosts than the local server: {state['remote']}")
    if state["console"]:
        problems.append(f"console errors: {state['console']}")
    if not state["icon"]:
        problems.append("no <link rel=icon>: the browser asks the server for /favicon.ico")
    if state["math"] and state["mathjax"] != "typeset":
        problems.append(f"{state['math']} formulas but MathJax did not run: {state['mathjax']}")
    if state["math_unrendered"]:
        problems.append(f"formulas MathJax did not typeset: {state['math_unrendered'][:5]}")
    raw = sorted({m.group(0)[:60] for m in RAW_MATH.finditer(state["text"])})
    if raw:
        problems.append(f"raw TeX in the visible text: {raw[:8]}")
    bars = [state["text"][max(0, m.start() - 40):m.end() + 30]
            for m in UNFINISHED_BAR.finditer(state["text"])]
    if bars:
        problems.append(f"progress bars that never finished: {bars[:5]}")
    tables = [state["text"][max(0, m.start() - 60):m.end() + 20]
              for m in RAW_TABLE.finditer(state["text"])]
    if tables:
        problems.append(f"Markdown tables shown as text, not as tables: {tables[:3]}")
    html = page.read_text(encoding="utf-8", errors="replace")
    for where, text in (("text", state["text"]), ("HTML", html)):
        found = [p for p in MACHINE_PATHS if p in text] + KERNEL_FILE.findall(text)
        if found:
            problems.append(f"absolute paths of this machine in the page's {where}: {found}")
    if state["wide_tables"]:
        problems.append(f"tables cut or sticking out of the text column (px): {state['wide_tables']}")
    return problems


MATH = re.compile(r"\$\$|\$[^\s$][^$\n]*\$|\\\(|\\\[")  # $$, $x$, \( or \[ in Markdown


def _has_math(source: Path) -> bool:
    """Whether a notebook's Markdown cells hold math (a `$s` in a code cell's shell line is not)."""
    if not source.is_file():
        return False
    cells = json.loads(source.read_text(encoding="utf-8"))["cells"]
    return any(MATH.search("".join(c["source"])) for c in cells if c["cell_type"] == "markdown")


@pytest.mark.parametrize("page", _params(PAGES))
def test_chapter_page_renders(browser, page):
    state = _load(browser, page)
    shots = screenshot(browser[0], SHOTS / f"{page.parent.name}_{page.stem}.jpg", WIDTH,
                       MAX_SHOT_PX)
    assert shots[0].stat().st_size > 10_000, f"blank screenshot? {shots[0]}"
    assert re.search(r"Chapter \d", state["title"]), f"not a chapter page: {state['title']!r}"
    assert state["figures"] > 0, "no figure in any cell output: was the chapter executed?"
    assert state["widgets"] == 0, ("a widget view is embedded: it is blank without a kernel; "
                                   "show it through lorabook.widgets' *_explorer functions")
    if _expects_animation(page):
        assert state["players"] > 0, "the chapter makes an animation but no player is on the page"
    if _has_math(ROOT / "notebooks" / f"{page.stem}.ipynb"):
        assert state["math"] > 0, "the chapter's source has math but the page has no formula"
    # the width lorabook.viz.export assumes when it refuses figures whose text would show below
    # plots.MIN_TEXT_PT: if the theme changes it, the text-size check must follow
    off = sorted({w for w in state["scaled_widths"] if abs(w - BOOK_COLUMN_PX) > 4})
    assert not off, (f"figures scaled to {off} px, not the {BOOK_COLUMN_PX} px column that "
                     "lorabook.viz.plots.BOOK_COLUMN_PX (the text-size check) assumes")
    summary = state["summary"]
    if summary is not None and page.stem not in PRINTED_SUMMARIES:
        assert summary["lists"] > 0 and summary["printed"] == 0, (
            f"'What we measured' is printed text, not a list or table: {summary}")
    problems = _offline_problems(state, page)
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("page", _params(PROSE))
def test_prose_page_renders(browser, page):
    state = _load(browser, page)
    screenshot(browser[0], SHOTS / f"{page.parent.name}_{page.stem}.jpg", WIDTH, MAX_SHOT_PX)
    problems = _offline_problems(state, page)
    assert not problems, "\n".join(problems)


def test_index_page_renders(browser):
    page = HTML / "index.html"
    if not page.is_file():
        pytest.skip("no index.html")
    # the redirect leaves before the browser may ask for an icon: read the file itself too
    assert 'rel="icon"' in page.read_text(encoding="utf-8"), "index.html names no icon"
    state = _load(browser, page)
    problems = [p for p in _offline_problems(state, page) if not p.startswith("absolute")]
    assert not problems, "\n".join(problems)


def test_raw_math_pattern_catches_what_it_should():
    """The pattern the pages are checked with: TeX left unrendered, not dollar amounts."""
    for raw in (r"energy of $\|\Delta W\|_F^2$", r"\(W_0\)", r"\[ h = W_0 x \]", r"$W_{0}$"):
        assert RAW_MATH.search(raw), raw
    for fine in ("$500 to LN-48213 and $1,200", "cost: $3 per hour", "W₀ + (α/r) B A"):
        assert not RAW_MATH.search(fine), fine
    assert UNFINISHED_BAR.search("train:   0%|          | 0/24")
    assert not UNFINISHED_BAR.search("train: 100%|██████████| 24/24 [00:31<00:00]")
    for raw in ("| claim | A | | --- | --- | | r = 8 | 0.609 |", "| claim | A | | \u2014 | \u2014 |"):
        assert RAW_TABLE.search(raw), raw
    for fine in ("train: 100%|██████████| 24/24", "lm|full|base=float|seed=2|lr=0.0001",
                 "a | b | c"):
        assert not RAW_TABLE.search(fine), fine


HREF = re.compile(r"""<(?:a|link|img|script)\b[^>]*?\s(?:href|src)\s*=\s*["']([^"']+)["']""",
                  re.IGNORECASE)


def test_no_broken_internal_links():
    """Every local href/src of every built page points at a file that exists."""
    if not PAGES:
        pytest.skip(f"no built book in {HTML}: run `make book` (or `make book-fast`) first")
    broken = []
    for page in sorted(HTML.rglob("*.html")):
        if "_static" in page.parts or "_sources" in page.parts:
            continue
        for url in HREF.findall(page.read_text(encoding="utf-8", errors="replace")):
            parts = urlsplit(url)
            if parts.scheme or url.startswith(("//", "#", "data:", "mailto:")) or not parts.path:
                continue
            if not (page.parent / unquote(parts.path)).exists():
                broken.append(f"{page.relative_to(HTML)} -> {url}")
    assert not broken, "broken internal links:\n" + "\n".join(broken[:50])
