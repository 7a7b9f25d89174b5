"""The built book as a reader sees it: every chapter page in headless Chromium (issue 7).

Run after the book is built (`make book` or `make book-fast`): `make test-browser`. Each chapter
page of `_build/html/notebooks/` (or `$LORABOOK_HTML/notebooks/`) must load, show every figure
(each local or inline image has naturalWidth > 0, lazy images included), show the animation players of the chapters that make
animations, and show no error output, traceback or dead widget. A screenshot of each page goes to
`_build/screenshots/`. Debian's `chromium` and `chromium-driver` drive it (`.ci/run` installs
them); Selenium is pointed at /usr/bin/chromedriver, so it never downloads a driver. Skipped, with
the reason, when the book is not built or the browser is missing.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest

pytestmark = pytest.mark.browser

ROOT = Path(__file__).resolve().parents[2]
HTML = Path(os.environ.get("LORABOOK_HTML", ROOT / "_build" / "html"))
SHOTS = Path(os.environ.get("LORABOOK_SCREENSHOTS", ROOT / "_build" / "screenshots"))
DRIVER = Path(os.environ.get("CHROMEDRIVER", "/usr/bin/chromedriver"))
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
PAGES = sorted((HTML / "notebooks").glob("*.html")) if (HTML / "notebooks").is_dir() else []
PROSE = sorted((HTML / "book").glob("*.html")) if (HTML / "book").is_dir() else []
MAX_SHOT_PX = 12000  # screenshots cover the first 12,000 px of a page (JPEG, for size)

# One pass over the page, in the browser: what a reader would see go wrong. Images served from
# the web (the Colab badge) are listed apart: offline they cannot load, and they are not figures.
INSPECT = """
const out = {title: document.title, images: 0, broken: [], remote: [], players: 0, errors: [],
             widgets: 0};
for (const img of document.images) {
  // the book's own figures are files or data: URIs; a badge on a web server (Colab's) is not
  // ours to check, and cannot load offline
  if (/^https?:/.test(img.src)) { out.remote.push(img.src); continue; }
  out.images += 1;
  if (!img.complete || img.naturalWidth === 0) out.broken.push(img.src.slice(0, 120));
}
out.figures = document.querySelectorAll(".cell_output img").length;
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
return out;
"""


def _expects_animation(page: Path) -> bool:
    """Whether the chapter's source notebook shows an animation (to_jshtml)."""
    source = ROOT / "notebooks" / f"{page.stem}.ipynb"
    return source.is_file() and "to_jshtml" in source.read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def browser():
    if not PAGES:
        pytest.skip(f"no built book in {HTML}: run `make book` (or `make book-fast`) first")
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed")
    if not DRIVER.is_file() or not Path(CHROMIUM).exists():
        pytest.skip("headless Chromium needs Debian's chromium and chromium-driver "
                    f"(apt-get install chromium chromium-driver); missing {DRIVER} or {CHROMIUM}")
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="lorabook-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--disable-background-networking", "--disable-component-update",
                "--disable-sync", "--no-first-run", "--hide-scrollbars",
                "--window-size=1280,1000", f"--user-data-dir={profile}"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(executable_path=str(DRIVER)), options=options)
    driver.set_page_load_timeout(120)
    SHOTS.mkdir(parents=True, exist_ok=True)
    yield driver
    driver.quit()
    shutil.rmtree(profile, ignore_errors=True)


def _load(driver, page: Path) -> dict:
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get(page.as_uri())
    # lazy images below the fold would never load in a headless window: load them all now
    driver.execute_script("for (const i of document.images) i.loading = 'eager';")
    WebDriverWait(driver, 60).until(lambda d: d.execute_script(
        "return document.readyState === 'complete' && "
        "Array.from(document.images).every(i => i.complete);"))
    return driver.execute_script(INSPECT)


def _screenshot(driver, page: Path) -> Path:
    import base64

    height = driver.execute_script("return document.documentElement.scrollHeight;")
    shot = driver.execute_cdp_cmd("Page.captureScreenshot", {
        "format": "jpeg", "quality": 70, "captureBeyondViewport": True,
        "clip": {"x": 0, "y": 0, "width": 1280, "height": min(height, MAX_SHOT_PX), "scale": 1}})
    path = SHOTS / f"{page.parent.name}_{page.stem}.jpg"
    path.write_bytes(base64.b64decode(shot["data"]))
    return path


def _params(pages: list[Path]):
    """The pages, or one placeholder that skips with the reason when the book is not built."""
    if pages:
        return [pytest.param(p, id=p.stem) for p in pages]
    return [pytest.param(None, id="no-built-book")]


@pytest.mark.parametrize("page", _params(PAGES))
def test_chapter_page_renders(browser, page):
    state = _load(browser, page)
    shot = _screenshot(browser, page)
    assert shot.stat().st_size > 10_000, f"blank screenshot? {shot}"
    assert re.search(r"Chapter \d", state["title"]), f"not a chapter page: {state['title']!r}"
    assert state["figures"] > 0, "no figure in any cell output: was the chapter executed?"
    assert not state["broken"], f"images that did not load: {state['broken']}"
    assert not state["errors"], f"error output on the page: {state['errors']}"
    assert state["widgets"] == 0, ("a widget view is embedded: it is blank without a kernel; "
                                   "show it through lorabook.widgets' *_explorer functions")
    if _expects_animation(page):
        assert state["players"] > 0, "the chapter makes an animation but no player is on the page"


@pytest.mark.parametrize("page", _params(PROSE))
def test_prose_page_renders(browser, page):
    state = _load(browser, page)
    assert not state["broken"], f"images that did not load: {state['broken']}"
    assert not state["errors"], f"error output on the page: {state['errors']}"


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
