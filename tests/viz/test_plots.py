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
