"""lorabook.viz.qlora_plots: chapter 7's figures draw the numbers they are given, titled and labelled."""

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from lorabook.qlora import ARCHITECTURES, memory_budget, parameter_counts  # noqa: E402
from lorabook.viz import plots, qlora_plots  # noqa: E402

GiB = 2**30


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def _labelled(fig) -> None:
    for ax in fig.axes:
        if not ax.axison:  # a panel that only holds the legend
            continue
        assert ax.get_title(), "every panel has a title"
        assert ax.get_xlabel() and ax.get_ylabel(), "every panel labels both axes"


def test_budget_rows_are_memory_budget_with_the_base_parameter_count():
    rows = qlora_plots.budget_rows(r=16, weight_bytes=2)
    assert len(rows) == 3 * len(ARCHITECTURES)
    row = next(r for r in rows if r["model"] == "Llama-2-7B" and r["method"] == "qlora")
    arch = ARCHITECTURES["Llama-2-7B"]
    assert row["total"] == memory_budget(arch, "qlora", r=16, weight_bytes=2)["total"]
    assert row["base_params"] == parameter_counts(arch)["total"]
    with pytest.raises(ValueError, match="at least one architecture"):
        qlora_plots.budget_rows([])


def test_memory_figure_draws_computed_lines_measured_stars_and_the_gpu_line():
    rows = qlora_plots.budget_rows()
    measured = [{"method": "full", "params": 134_515_008, "bytes": 3 * GiB},
                {"method": "qlora", "params": 134_515_008, "bytes": 0.5 * GiB, "label": "ours"}]
    fig = qlora_plots.memory_figure(rows, measured, gpu_gib=16)
    _labelled(fig)
    ax = fig.axes[0]
    assert ax.get_xscale() == "log" and ax.get_yscale() == "log"
    assert "GiB" in ax.get_ylabel() and "parameters" in ax.get_xlabel()
    lines = {line.get_label(): line for line in ax.get_lines()}
    for method in qlora_plots.METHODS:  # one line per method through every model, in GiB
        line = lines[f"{qlora_plots.METHOD_NAMES[method]} (computed)"]
        want = sorted((r["base_params"], r["total"] / GiB) for r in rows if r["method"] == method)
        np.testing.assert_allclose(np.c_[line.get_xdata(), line.get_ydata()], want)
        assert line.get_color() == plots.color(method)
    gpu = [ln for ln in ax.get_lines() if ln.get_linestyle() == "--"]
    assert len(gpu) == 1 and gpu[0].get_ydata()[0] == 16
    stars = ax.collections
    assert len(stars) == 2
    np.testing.assert_allclose(stars[1].get_offsets()[0], [134_515_008, 0.5])
    labels = ax.get_legend_handles_labels()[1]
    assert "ours" in labels and "full fine-tuning (measured here)" in labels


def test_memory_figure_rejects_bad_rows():
    with pytest.raises(ValueError, match="computed row"):
        qlora_plots.memory_figure([])
    with pytest.raises(ValueError, match="method must be one of"):
        qlora_plots.memory_figure(qlora_plots.budget_rows(),
                                  [{"method": "adapter", "params": 1, "bytes": 1}])


RECORDS = [
    {"method": "lora", "base": "float", "r": 4, "seed": 0, "score": 0.5, "step_s": 1.0,
     "memory_increase_bytes": 100 * 2**20},
    {"method": "lora", "base": "float", "r": 4, "seed": 1, "score": 0.7, "step_s": 1.2,
     "memory_increase_bytes": 102 * 2**20},
    {"method": "lora", "base": "float", "r": 16, "seed": 0, "score": 0.8, "step_s": 1.1,
     "memory_increase_bytes": 104 * 2**20},
    {"method": "lora", "base": "nf4", "r": 4, "seed": 0, "score": 0.4, "step_s": 2.0,
     "memory_increase_bytes": 60 * 2**20},
    {"method": "lora", "base": "nf4", "r": 16, "seed": 0, "score": None, "step_s": 2.1,
     "memory_increase_bytes": 61 * 2**20},
    {"method": "full", "base": "float", "r": None, "seed": 0, "score": 0.9, "step_s": 3.0,
     "memory_increase_bytes": 300 * 2**20},
]


def test_aggregate_is_mean_std_n_over_seeds_and_skips_missing_values():
    agg = qlora_plots.aggregate(RECORDS[:5], "score")
    mean, std, n = agg["float"][4]
    assert (mean, n) == (pytest.approx(0.6), 2)
    assert std == pytest.approx(np.std([0.5, 0.7], ddof=1))
    assert agg["float"][16] == (0.8, 0.0, 1)
    assert list(agg["nf4"]) == [4]  # the run without a score is left out
    assert list(qlora_plots.aggregate(RECORDS[:3], "score", x="seed")["float"]) == [0, 1]


def test_rank_figure_plots_the_means_by_base_and_full_ft_as_a_line():
    fig = qlora_plots.rank_figure(RECORDS)
    _labelled(fig)
    assert len(fig.axes) == 3  # three metrics side by side, one legend under them
    score_ax, _, memory_ax = fig.axes
    (legend,) = fig.legends
    assert {t.get_text() for t in legend.get_texts()} == {
        qlora_plots.BASE_NAMES["float"], qlora_plots.BASE_NAMES["nf4"], "full fine-tuning"}
    assert score_ax.get_xscale() == "log"
    by_label = {c.get_label(): c for c in score_ax.containers}
    float_line = by_label[qlora_plots.BASE_NAMES["float"]].lines[0]
    np.testing.assert_allclose(float_line.get_xdata(), [4, 16])
    np.testing.assert_allclose(float_line.get_ydata(), [0.6, 0.8])
    full = [ln for ln in score_ax.get_lines() if ln.get_label() == "full fine-tuning"]
    assert len(full) == 1 and full[0].get_ydata()[0] == pytest.approx(0.9)
    mem = {c.get_label(): c for c in memory_ax.containers}[qlora_plots.BASE_NAMES["nf4"]]
    np.testing.assert_allclose(mem.lines[0].get_ydata(), [60, 61])  # MiB
    assert "MiB" in memory_ax.get_ylabel()
    assert score_ax.get_ylim()[0] == 0 and memory_ax.get_ylim()[0] == 0  # axes from 0, not truncated
    with pytest.raises(ValueError, match="LoRA records"):
        qlora_plots.rank_figure(RECORDS[5:])


def test_formats_figure_shows_each_error_and_mean_score():
    fig = qlora_plots.formats_figure({"nf4": 0.08, "fp4": 0.10, "int4": 0.12},
                                     {"nf4": [0.5, 0.7], "fp4": [0.4], "int4": [0.3, 0.3]})
    _labelled(fig)
    left, right = fig.axes
    np.testing.assert_allclose([b.get_height() for b in left.patches], [0.08, 0.10, 0.12])
    np.testing.assert_allclose([b.get_height() for b in right.patches], [0.6, 0.4, 0.3])
    assert fig._suptitle is not None and fig._suptitle.get_text()
    with pytest.raises(ValueError, match="at least one format"):
        qlora_plots.formats_figure({}, {"nf4": [0.5]})


def test_rank_figure_wraps_four_metrics_three_a_row_with_the_legend_in_the_free_cell():
    metrics = {**qlora_plots.RANK_METRICS, "token_accuracy": ("held-out token accuracy", 1.0)}
    recs = [dict(r, token_accuracy=0.5) for r in RECORDS]
    fig = qlora_plots.rank_figure(recs, metrics)
    _labelled(fig)
    *panels, legend_ax = fig.axes
    assert len(panels) == 4 and not legend_ax.axison and legend_ax.get_legend() is not None
    assert {ax.get_ylabel() for ax in panels} == {label for label, _ in metrics.values()}


def test_rank_figure_as_chapter_7_calls_it_is_legible_in_the_book_and_on_a_slide():
    metrics = {"score": ("held-out exact match", 1.0),
               "token_accuracy": ("held-out token accuracy", 1.0),
               "memory_increase_bytes": ("memory for training (MiB)", 2.0**20)}
    recs = [dict(r, token_accuracy=0.5) for r in RECORDS]
    recs += [dict(r, base=base) for r in recs if r["method"] == "lora" for base in ("fp4", "int4")]
    fig = qlora_plots.rank_figure(recs, metrics, title="Stored sweep (cpu setting, 3 seed(s)): "
                                  "LoRA by base storage and rank (y axes from 0)")
    assert plots.smallest_text_pt(fig) >= plots.MIN_TEXT_PT
    assert plots.deck_smallest_text_px(fig, dpi=100) >= plots.DECK_MIN_TEXT_PX  # as exported
