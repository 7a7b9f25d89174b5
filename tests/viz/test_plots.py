"""lorabook.viz.plots: figures are titled and labelled, colours come from one palette."""

import matplotlib

matplotlib.use("Agg")

import pytest  # noqa: E402

from lorabook.viz import plots  # noqa: E402


def test_bar_chart_is_titled_labelled_and_annotated():
    fig = plots.bar_chart({"base": 1.0, "lora": 1.02}, title="Latency", ylabel="ratio to base")
    ax = fig.axes[0]
    assert ax.get_title() == "Latency" and ax.get_ylabel() == "ratio to base"
    assert [t.get_text() for t in ax.texts] == ["1", "1.02"]


def test_loss_curves_label_steps_and_units():
    fig = plots.loss_curves({"full": [3, 2, 1], "lora": [3, 2.5, 2]}, colors=plots.PALETTE)
    ax = fig.axes[0]
    assert ax.get_xlabel() == "optimiser step" and "nats" in ax.get_ylabel()
    assert [line.get_label() for line in ax.get_lines()] == ["full", "lora"]
    assert ax.get_lines()[0].get_color() == plots.color("full")


def test_unknown_colour_is_a_clear_error():
    with pytest.raises(ValueError, match="known"):
        plots.color("adapterz")


def test_ratio_bars_draw_the_spread_from_p10_to_p90():
    import pandas as pd

    index = pd.MultiIndex.from_product([["1 x 16", "8 x 16"], ["base", "LoRA merged"]],
                                       names=["batch x tokens", "variant"])
    table = pd.DataFrame({"ratio to base": [1.0, 0.9, 1.0, 1.2], "ratio p10": [1.0, 0.7, 1.0, 1.1],
                          "ratio p90": [1.0, 1.3, 1.0, 1.5]}, index=index)
    fig = plots.ratio_bars(table, title="Latency")
    ax = fig.axes[0]
    heights = [p.get_height() for p in ax.patches]
    assert heights == pytest.approx([1.0, 0.9, 1.0, 1.2])
    whiskers = [seg for coll in ax.collections for seg in coll.get_segments()]
    spans = sorted((round(seg[0][1], 6), round(seg[1][1], 6)) for seg in whiskers)
    assert (0.7, 1.3) in spans and (1.1, 1.5) in spans  # p10 to p90 around each median
    assert ax.get_title() == "Latency" and ax.get_ylabel()
    with pytest.raises(ValueError, match="lacks"):
        plots.ratio_bars(table.drop(columns="ratio p90"))


def _text_figure(width_in: float, size: float, dpi: int = 100):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width_in, 2), dpi=dpi)
    # two texts at the figure's edges: the tight box spans (almost) the whole width
    fig.text(0.0, 0.5, "left", fontsize=size, ha="left")
    fig.text(1.0, 0.5, "right", fontsize=size + 4, ha="right")
    return fig


def test_smallest_text_keeps_its_size_when_the_figure_fits_the_column():
    # 5 in at 100 dpi = 500 px < 688 px: shown at natural size, 10 pt = 10 * 100 / 72 px = 10.42 CSS pt
    fig = _text_figure(5.0, 10)
    assert plots.smallest_text_pt(fig) == pytest.approx(10 * 100 / 96)


def test_smallest_text_shrinks_with_a_figure_wider_than_the_column():
    fig = _text_figure(20.0, 13)  # ~2000 px wide: scaled to 688 px, about a third
    width_px = fig.get_tightbbox(fig._get_renderer()).width * fig.dpi
    assert width_px > 1900
    expected = 13 * 100 / 96 * plots.BOOK_COLUMN_PX / width_px
    assert plots.smallest_text_pt(fig) == pytest.approx(expected)
    assert plots.smallest_text_pt(fig) < plots.MIN_TEXT_PT
    # the same figure at another dpi shows the same text: the column, not the dpi, sets the scale
    assert plots.smallest_text_pt(_text_figure(20.0, 13, dpi=50)) == pytest.approx(expected, rel=0.02)


def test_a_figure_without_text_has_nothing_to_read():
    from matplotlib.figure import Figure

    assert plots.smallest_text_pt(Figure(figsize=(3, 2))) == float("inf")
    assert plots.deck_smallest_text_px(Figure(figsize=(3, 2)), dpi=100) == float("inf")


def _tall_figure(size: float):
    """9 x 10 in, like the stacked panels that pass the book's check: texts at all four edges."""
    fig = _text_figure(9.0, size)
    fig.set_size_inches(9.0, 10.0)
    fig.text(0.5, 0.0, "bottom", fontsize=size, ha="center", va="bottom")
    fig.text(0.5, 1.0, "top", fontsize=size, ha="center", va="top")
    return fig


def test_on_a_slide_a_tall_figure_shrinks_to_the_decks_height():
    fig = _tall_figure(13)
    box = fig.get_tightbbox(fig._get_renderer())
    height_px = (box.height + 2 * matplotlib.rcParams["savefig.pad_inches"]) * 100  # as saved
    assert height_px > 990
    expected = 13 * 100 / 72 * plots.DECK_FIGURE_HEIGHT_PX / height_px
    assert plots.deck_smallest_text_px(fig, dpi=100) == pytest.approx(expected, rel=1e-3)
    assert plots.deck_smallest_text_px(fig, dpi=100) < plots.DECK_MIN_TEXT_PX
    assert plots.smallest_text_pt(fig) >= plots.MIN_TEXT_PT  # while the book's column reads it
    # the height, not the dpi, sets the scale of a figure larger than the box
    assert plots.deck_smallest_text_px(fig, dpi=150) == pytest.approx(expected, rel=0.02)


def test_on_a_slide_a_small_figure_keeps_its_natural_size_so_the_dpi_counts():
    fig = _text_figure(5.0, 10)  # 5 in wide, one line high: inside the deck's box at any dpi here
    assert plots.deck_smallest_text_px(fig, dpi=100) == pytest.approx(10 * 100 / 72)
    assert plots.deck_smallest_text_px(fig, dpi=50) == pytest.approx(10 * 50 / 72)
    # the frames of an animation keep the whole figure: 5 x 10 in at dpi 100 is 1000 px high
    fig.set_size_inches(5.0, 10.0)
    expected = 10 * 100 / 72 * plots.DECK_FIGURE_HEIGHT_PX / 1000
    assert plots.deck_smallest_text_px(fig, dpi=100, tight=False) == pytest.approx(expected)
