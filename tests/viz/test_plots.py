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
