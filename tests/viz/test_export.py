"""lorabook.viz.export: files land per run setting with their provenance; the deck finds the best."""

from __future__ import annotations

import json

import matplotlib

matplotlib.use("Agg")

import pandas as pd  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from PIL import Image  # noqa: E402

from lorabook.viz import export  # noqa: E402
from lorabook.viz.animations import svd_approximation_animation  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:Animation was deleted:UserWarning")


@pytest.fixture
def figures(tmp_path, monkeypatch):
    monkeypatch.setenv(export.FIGURES_ENV, str(tmp_path / "figs"))
    monkeypatch.setenv("LORABOOK_MODE", "fast")
    return tmp_path / "figs"


def _figure(width=4.0):
    fig = Figure(figsize=(width, 3))
    ax = fig.add_subplot()
    ax.plot([0, 1], [1, 0])
    ax.set_title("a line")
    return fig


def test_figures_dir_follows_the_environment(figures):
    assert export.figures_dir() == figures


def test_figure_becomes_png_with_sidecar(figures):
    path = export.export(_figure(), "ch1_line", chapter=1)
    assert path == figures / "fast" / "ch1_line.png"
    with Image.open(path) as im:
        assert im.format == "PNG" and im.width > 50
    meta = json.loads((figures / "fast" / "ch1_line.json").read_text())
    assert meta["chapter"] == 1 and meta["name"] == "ch1_line" and meta["mode"] == "fast"
    assert meta["kind"] == "figure" and meta["file"] == "ch1_line.png"
    assert meta["commit"] and meta["created"][:2] == "20"


def test_animation_becomes_gif_with_every_frame(figures):
    g = torch.Generator().manual_seed(0)
    anim = svd_approximation_animation(torch.randn(12, 10, generator=g), ranks=[1, 2, 10],
                                       max_size=12)
    path = export.export(anim, "ch2_svd", chapter=2, dpi=60)  # the chapter's dpi
    assert path.suffix == ".gif"
    with Image.open(path) as im:
        assert im.n_frames == 3


def test_table_becomes_html(figures):
    df = pd.DataFrame({"blocksize": [64, 256], "error": [0.0728, 0.0803]}).set_index("blocksize")
    path = export.export(df, "ch5_errors", chapter=5)
    text = path.read_text()
    assert path.suffix == ".html" and "<table" in text and "0.0728" in text


def test_fast_run_never_touches_the_cpu_figure(figures, monkeypatch):
    monkeypatch.setenv("LORABOOK_MODE", "cpu")
    cpu_path = export.export(_figure(), "ch1_line", chapter=1)
    before = cpu_path.read_bytes()
    monkeypatch.setenv("LORABOOK_MODE", "fast")
    fast_path = export.export(_figure(width=6), "ch1_line", chapter=1)
    assert fast_path.parent.name == "fast" and cpu_path.parent.name == "cpu"
    assert cpu_path.read_bytes() == before
    # the deck prefers the cpu figure, and falls back to fast only when asked to or when alone
    assert export.find("ch1_line")[0] == cpu_path
    assert export.find("ch1_line", modes=("fast",))[0] == fast_path
    assert export.find("ch9_missing") is None


def test_a_figure_of_the_runs_of_record_names_the_files_it_read(figures, tmp_path):
    files = [tmp_path / "results" / "qlora_record.jsonl", tmp_path / "results" / "lm_record.jsonl"]
    export.export(_figure(), "ch7_bases", chapter=7, records=files)
    meta = json.loads((figures / "fast" / "ch7_bases.json").read_text())
    assert meta["records"] == ["qlora_record.jsonl", "lm_record.jsonl"]  # names, not this machine's paths
    assert meta["mode"] == "fast"  # the setting that drew it is still said
    export.export(_figure(), "ch7_bases", chapter=7, records=(p for p in files))  # any iterable
    assert json.loads((figures / "fast" / "ch7_bases.json").read_text())["records"] == meta["records"]
    export.export(_figure(), "ch7_plain", chapter=7)
    assert "records" not in json.loads((figures / "fast" / "ch7_plain.json").read_text())
    for bad in ([], "qlora_record.jsonl", files[0]):  # nothing read, or one path taken for a list
        with pytest.raises(ValueError, match="records"):
            export.export(_figure(), "ch7_bad", chapter=7, records=bad)
    assert not (figures / "fast" / "ch7_bad.json").exists()


def test_bad_names_and_objects_are_refused(figures):
    with pytest.raises(ValueError, match="ch2_"):
        export.export(_figure(), "decomposition", chapter=2)
    with pytest.raises(ValueError, match="ch2_"):
        export.export(_figure(), "ch3_wrong_chapter", chapter=2)
    with pytest.raises(ValueError, match="chapter"):
        export.export(_figure(), "ch2_x", chapter=0)
    with pytest.raises(ValueError, match="mode"):
        export.export(_figure(), "ch2_x", chapter=2, mode="tpu")
    with pytest.raises(TypeError, match="Figure"):
        export.export([1, 2, 3], "ch2_x", chapter=2)
    assert not (figures / "fast" / "ch2_x.json").exists()


def test_a_figure_too_wide_to_read_is_refused_and_a_legible_one_records_its_text_size(figures):
    wide = Figure(figsize=(24, 3))
    wide.text(0.0, 0.5, "left", ha="left")
    wide.text(1.0, 0.5, "right", ha="right")
    with pytest.raises(ValueError, match="smallest text shows at .* pt"):
        export.export(wide, "ch1_wide", chapter=1)
    assert not (figures / "fast" / "ch1_wide.json").exists()
    export.export(_figure(), "ch1_line", chapter=1)
    meta = json.loads((figures / "fast" / "ch1_line.json").read_text())
    assert meta["smallest_text_pt"] >= export.MIN_TEXT_PT
    assert meta["deck_smallest_text_px"] >= export.DECK_MIN_TEXT_PX


def _tall(fontsize: float) -> Figure:
    """Two panels stacked, 9 x 10 in: the book's column reads 13 pt text at 9 in wide."""
    fig = Figure(figsize=(9, 10))
    for ax in fig.subplots(2, 1):
        ax.plot([0, 1], [1, 0])
        ax.set_title("a panel", fontsize=fontsize)
        ax.set_xlabel("x (units)", fontsize=fontsize)
        ax.tick_params(labelsize=fontsize)
    return fig


def test_a_tall_figure_the_book_reads_is_refused_for_the_deck(figures):
    from lorabook.viz import plots

    tall = _tall(13)
    assert plots.smallest_text_pt(tall) >= export.MIN_TEXT_PT  # the book's check alone passes it
    with pytest.raises(ValueError, match=r"smallest text shows at .* px on a slide"):
        export.export(tall, "ch2_tall", chapter=2)
    assert not (figures / "fast" / "ch2_tall.json").exists()
    # the same panels side by side, 12 x 4.5 in, with 14 pt text: legible in the book and the deck
    wide = Figure(figsize=(12, 4.5))
    for ax in wide.subplots(1, 2):
        ax.plot([0, 1], [1, 0])
        ax.set_title("a panel", fontsize=14)
        ax.set_xlabel("x (units)", fontsize=14)
        ax.tick_params(labelsize=14)
    export.export(wide, "ch2_wide", chapter=2)
    meta = json.loads((figures / "fast" / "ch2_wide.json").read_text())
    assert meta["smallest_text_pt"] >= export.MIN_TEXT_PT
    assert meta["deck_smallest_text_px"] >= plots.DECK_MIN_TEXT_PX
    assert meta["deck_smallest_text_px"] == pytest.approx(plots.deck_smallest_text_px(wide, 100), abs=0.01)
    with Image.open(figures / "fast" / "ch2_wide.png") as im:  # the estimate is the saved file's
        scale = min(1, plots.DECK_FIGURE_WIDTH_PX / im.width, plots.DECK_FIGURE_HEIGHT_PX / im.height)
    assert meta["deck_smallest_text_px"] == pytest.approx(14 * 100 / 72 * scale, rel=0.01)
