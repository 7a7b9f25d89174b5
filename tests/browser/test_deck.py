"""The talk's deck (book/slides): it builds from exported figures, offline, and its map is complete.

The build test needs no built book (it exports two figures of its own), so it runs with the unit
tests; the Chromium check of the built deck carries the `browser` marker.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import pytest  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from lorabook.viz import export  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
SLIDES = ROOT / "book" / "slides"
DECK = Path(os.environ.get("LORABOOK_SLIDES", ROOT / "_build" / "slides"))  # `make slides`
SHOTS = Path(os.environ.get("LORABOOK_SCREENSHOTS", ROOT / "_build" / "screenshots"))
FRAME = (1280, 720)  # the deck's own width and height, and the window it is shown in

# The current slide against its frame: what sticks out, and whether the slide number and the
# navigation arrows overlap. Reveal scales `.slides` (the frame) to the window.
SLIDE_STATE = """
const slide = Reveal.getCurrentSlide();
const frame = document.querySelector(".reveal .slides").getBoundingClientRect();
const out = {indices: Reveal.getIndices(), title: (slide.querySelector("h1, h2, h3") || {}).textContent,
             outside: [], overlap: false, math: slide.querySelectorAll(".math").length,
             typeset: slide.querySelectorAll(".math mjx-container").length};
for (const el of slide.querySelectorAll("*")) {
  const r = el.getBoundingClientRect();
  if (r.width === 0 || r.height === 0 || el.closest("aside.notes")) continue;
  const by = Math.max(frame.top - r.top, r.bottom - frame.bottom, frame.left - r.left, r.right - frame.right);
  if (by > 2) out.outside.push(`${el.tagName.toLowerCase()}.${el.className} by ${Math.round(by)} px`);
}
const a = document.querySelector(".reveal .slide-number"), b = document.querySelector(".reveal .controls");
if (a && b && getComputedStyle(a).display !== "none") {
  const ra = a.getBoundingClientRect(), rb = b.getBoundingClientRect();
  const arrows = Array.from(b.querySelectorAll("button")).filter(x => getComputedStyle(x).display !== "none"
    && getComputedStyle(x).visibility !== "hidden" && getComputedStyle(x).opacity !== "0")
    .map(x => x.getBoundingClientRect());
  out.overlap = arrows.some(r => r.width > 0 && !(ra.right <= r.left || r.right <= ra.left ||
                                                 ra.bottom <= r.top || r.bottom <= ra.top));
}
return out;
"""


def _build_module():
    spec = importlib.util.spec_from_file_location("deck_build", SLIDES / "build.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _figure():
    fig = Figure(figsize=(4, 3))
    ax = fig.add_subplot()
    ax.plot([0, 1, 2], [2, 0, 1])
    ax.set_title("test figure")
    return fig


@pytest.fixture(scope="module")
def deck(tmp_path_factory):
    """The deck built from a figures folder with one cpu figure, one fast figure, nothing else."""
    tmp = tmp_path_factory.mktemp("deck")
    figures = tmp / "figures"
    mp = pytest.MonkeyPatch()
    mp.setenv(export.FIGURES_ENV, str(figures))
    export.export(_figure(), "ch2_delta_w_spectrum", chapter=2, mode="cpu")
    export.export(_figure(), "ch5_absmax", chapter=5, mode="fast")
    export.export(_figure(), "ch5_absmax", chapter=5, mode="cpu")
    export.export(_figure(), "ch5_codebooks", chapter=5, mode="fast")
    export.export(_figure(), "ch7_record_bases", chapter=7, mode="fast",
                  records=["qlora_record.jsonl", "lm_record_gpu.jsonl"])
    mp.undo()
    build = _build_module()
    out = tmp / "slides"
    found = build.build(out, figures, export.MODES, tmp / "slides_src")
    return {"out": out, "found": found, "html": (out / "index.html").read_text(encoding="utf-8"),
            "build": build}


def test_deck_takes_the_best_setting_and_marks_the_rest(deck):
    found, html = deck["found"], deck["html"]
    assert found["ch2_delta_w_spectrum"] == "cpu"
    assert found["ch5_absmax"] == "cpu"  # the cpu figure wins over the fast one
    assert found["ch5_codebooks"] == "fast"
    assert (deck["out"] / "_images" / "ch2_delta_w_spectrum.png").is_file()
    assert "fast (CI) setting" in html  # the fast figure says so on its slide
    assert 'data-figure="ch4_record_rank"' in html and "run chapter 4" in html  # placeholder
    assert "cpu setting · commit" in html
    # a figure of the runs of record drawn by a fast build shows the records, not "a few steps"
    assert found["ch7_record_bases"] == "record"
    slide = html[html.index('ch7_record_bases.png'):]
    source = slide[slide.index('class="deck-source"'):][:400]
    assert "runs of record (qlora_record.jsonl, lm_record_gpu.jsonl), drawn in the fast setting" in source
    assert html.count('class="deck-fast"') == 1  # only ch5_codebooks, the fast figure


def test_deck_follows_the_talk_outline(deck):
    sections = re.findall(r"<h2>([^<]+)", deck["html"])
    assert [s.strip() for s in sections] == [
        "Introduction", "Fine-tuning", "LoRA", "LoRA: advantages and drawbacks",
        "LoRA performance", "QLoRA", "QLoRA: advantages and drawbacks", "QLoRA performance",
        "Discussion points", "Questions"]
    assert re.search(r"<h1>LoRA and QLoRA, from scratch", deck["html"])
    assert len(re.findall(r"<h3>\d\. ", deck["html"])) == 3  # three discussion points


def test_deck_fetches_nothing_from_the_network(deck):
    assert deck["build"].remote_references(deck["out"]) == []
    scripts = re.findall(r'<script[^>]*src="([^"]+)"', deck["html"])
    styles = re.findall(r'<link[^>]*href="([^"]+)"', deck["html"])
    assert scripts and styles
    for url in scripts + styles:
        assert not re.match(r"^(https?:)?//", url), url
        assert (deck["out"] / url.split("?")[0]).is_file(), url


def test_remote_check_catches_a_cdn(tmp_path):
    build = _build_module()
    (tmp_path / "index.html").write_text(
        '<link rel="stylesheet" href="local.css"><script src="https://cdn.example/x.js"></script>')
    (tmp_path / "local.css").write_text("@import url(https://fonts.example/f.css);")
    (tmp_path / "unused.css").write_text("@import url(https://never.loaded/f.css);")
    hits = build.remote_references(tmp_path)
    assert len(hits) == 2 and any("cdn.example" in h for h in hits)
    assert any("fonts.example" in h for h in hits) and not any("never.loaded" in h for h in hits)


def test_slide_map_lists_every_figure_of_the_deck():
    names = _build_module().figure_names(SLIDES)
    assert len(names) > 20
    page = (ROOT / "book" / "slide_map.md").read_text(encoding="utf-8")
    missing = [n for n in names if f"`{n}`" not in page]
    assert not missing, f"book/slide_map.md does not map {missing}"


@pytest.mark.browser
def test_built_deck_shows_its_figures_in_chromium(deck, tmp_path):
    """The deck opens from disk in headless Chromium: its images load, reveal.js starts."""
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed")
    driver_path = Path("/usr/bin/chromedriver")
    chromium = shutil.which("chromium")
    if not driver_path.is_file() or not chromium:
        pytest.skip("needs Debian's chromium and chromium-driver")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1280,800", f"--user-data-dir={tmp_path / 'profile'}"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(executable_path=str(driver_path)), options=options)
    try:
        driver.get((deck["out"] / "index.html").as_uri() + "#/3/1")
        state = driver.execute_script(
            "return {ready: typeof Reveal !== 'undefined' && Reveal.isReady(), "
            "total: Reveal.getTotalSlides(), "
            "broken: Array.from(document.images).filter(i => i.naturalWidth === 0).length, "
            "images: document.images.length};")
    finally:
        driver.quit()
    assert state["ready"] and state["total"] > 30
    assert state["images"] >= 3 and state["broken"] == 0


def test_sidecar_names_the_chapter(tmp_path, monkeypatch):
    monkeypatch.setenv(export.FIGURES_ENV, str(tmp_path))
    export.export(_figure(), "ch3_latency", chapter=3, mode="gpu")
    path, meta = export.find("ch3_latency")
    assert path.parent.name == "gpu" and meta["chapter"] == 3
    assert json.loads((tmp_path / "gpu" / "ch3_latency.json").read_text())["file"] == path.name


@pytest.mark.browser
def test_built_deck_fits_its_frame_and_walks_with_the_right_arrow():
    """The deck `make slides` built: every slide inside 1280 x 720, linear, offline (issue 17).

    The right arrow alone visits every slide once, in order; no slide's content leaves the
    frame; the slide number never sits under the arrows; formulas are typeset by the local
    MathJax; nothing is requested from another host; no console error. A screenshot of every
    slide goes to `_build/screenshots/deck/`.
    """
    index = DECK / "index.html"
    if not index.is_file():
        pytest.skip(f"no built deck in {DECK}: run `make slides` (after the book) first")
    from headless import (
        Server,
        chromium,
        console_errors,
        remote_requests,
        requests_made,
        viewport_screenshot,
    )
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    server = Server(DECK)
    driver, profile = chromium(*FRAME)
    try:
        driver.get(server.url(index))
        WebDriverWait(driver, 60).until(lambda d: d.execute_script(
            "return typeof Reveal !== 'undefined' && Reveal.isReady() && "
            "Array.from(document.images).every(i => i.complete);"))
        config = driver.execute_script(
            "const c = Reveal.getConfig(); return [c.width, c.height, c.navigationMode];")
        assert config == [*FRAME, "linear"]
        total = driver.execute_script("return Reveal.getTotalSlides();")
        body = driver.find_element(By.TAG_NAME, "body")
        seen, problems = [], []
        for step in range(total):
            if step:
                body.send_keys(Keys.ARROW_RIGHT)
            driver.execute_script("return document.fonts.ready;")
            state = driver.execute_script(SLIDE_STATE)
            where = f"{state['indices']['h']}.{state['indices']['v']}"
            seen.append(where)
            viewport_screenshot(driver, SHOTS / "deck" / f"slide_{step:02d}_{where}.jpg")
            if state["outside"]:
                problems.append(f"slide {where} ({state['title']}): outside the frame: "
                                f"{state['outside'][:4]}")
            if state["overlap"]:
                problems.append(f"slide {where}: the slide number overlaps the arrows")
            if state["math"] != state["typeset"]:
                problems.append(f"slide {where}: {state['math'] - state['typeset']} formulas "
                                "not typeset")
        remote = remote_requests(requests_made(driver), server.base)
        console = console_errors(driver)
    finally:
        driver.quit()
        server.close()
        shutil.rmtree(profile, ignore_errors=True)
    assert len(set(seen)) == total, f"the right arrow visited {len(set(seen))} of {total}: {seen}"
    assert not remote, f"the deck requested other hosts: {remote}"
    assert not console, f"console errors: {console}"
    assert not problems, "\n".join(problems)
