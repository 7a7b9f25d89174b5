"""The talk's deck (book/slides): it builds from exported figures, offline, and its map is complete.

The build test needs no built book (it exports two figures of its own), so it runs with the unit
tests; the Chromium check of the built deck carries the `browser` marker.
"""

from __future__ import annotations

import importlib.util
import json
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
    export.export(_figure(), "ch2_delta_w_spectrum", chapter=2, mode="cpu", dpi=40)
    export.export(_figure(), "ch5_absmax", chapter=5, mode="fast", dpi=40)
    export.export(_figure(), "ch5_absmax", chapter=5, mode="cpu", dpi=40)
    export.export(_figure(), "ch5_codebooks", chapter=5, mode="fast", dpi=40)
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
    export.export(_figure(), "ch3_latency", chapter=3, mode="gpu", dpi=30)
    path, meta = export.find("ch3_latency")
    assert path.parent.name == "gpu" and meta["chapter"] == 3
    assert json.loads((tmp_path / "gpu" / "ch3_latency.json").read_text())["file"] == path.name
