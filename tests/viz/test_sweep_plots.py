"""lorabook.viz.sweep_plots: figures from sweep records, heatmaps, and the rank animation's frames."""

import matplotlib

matplotlib.use("Agg")

import math  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from lorabook.viz import plots, sweep_plots  # noqa: E402


def _records():
    out = [{"method": "full", "targets": None, "scaling": None, "base": "float", "r": None,
            "seed": s, "score": 0.8 + 0.02 * s, "trainable": 1000, "adapter_bytes": 4000,
            "step_s": 1.0} for s in (0, 1)]
    for targets, per_r in (("q", 10), ("qv", 20)):
        for r in (1, 4, 16):
            for s in (0, 1):
                out.append({"method": "lora", "targets": targets, "scaling": "lora",
                            "base": "float", "r": r, "seed": s, "score": 0.6 + 0.01 * r + 0.1 * s,
                            "trainable": per_r * r, "adapter_bytes": 4 * per_r * r,
                            "step_s": 0.5})
    return out


def test_rank_score_figure_has_one_line_per_target_set_and_the_full_reference():
    fig = sweep_plots.rank_score_figure(_records(), "Encoder", "held-out accuracy (fraction)")
    ax = fig.axes[0]
    assert ax.get_title().startswith("Encoder") and "2 seeds" in ax.get_title()
    assert ax.get_xlabel() == "LoRA rank r (log scale)"
    assert ax.get_ylabel() == "held-out accuracy (fraction)"
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels == ["full fine-tuning (2 seeds)", "W_q", "W_q, W_v"]
    full = [line for line in ax.get_lines() if line.get_color() == plots.color("full")]
    assert full and full[0].get_ydata()[0] == pytest.approx(0.81)  # mean of 0.80, 0.82
    means = ax.containers[0].lines[0].get_ydata()  # W_q's error-bar line: mean over seeds
    assert np.allclose(means, [0.66, 0.69, 0.81])


def test_rank_score_figure_says_which_lines_have_fewer_seeds():
    records = [r for r in _records() if not (r["targets"] == "qv" and r["seed"] == 1)]
    ax = sweep_plots.rank_score_figure(records, "Encoder", "accuracy (fraction)").axes[0]
    assert ax.get_title() == "Encoder (mean ± std over the seeds in the legend)"
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels == ["full fine-tuning (2 seeds)", "W_q (2 seeds)", "W_q, W_v (1 seed)"]


def test_params_and_cost_figures_are_labelled_with_units():
    fig = sweep_plots.params_score_figure(_records(), "Budget", "accuracy (fraction)")
    ax = fig.axes[0]
    assert "trainable parameters" in ax.get_xlabel() and ax.get_xscale() == "log"
    assert sorted(t.get_text() for t in ax.texts)[:2] == ["r=1", "r=1"]
    fig = sweep_plots.cost_figure(_records(), "Costs")
    assert fig._suptitle.get_text() == "Costs"
    units = [ax.get_ylabel() for ax in fig.axes]
    assert "(count)" in units[0] and "(MiB)" in units[1] and "(s)" in units[2]
    line = fig.axes[1].get_lines()[0]  # W_q's MiB against r
    assert np.allclose(line.get_ydata(), [40 * r / 2**20 for r in (1, 4, 16)])


def test_figures_need_lora_records():
    with pytest.raises(ValueError, match="no LoRA run"):
        sweep_plots.rank_score_figure(_records()[:2], "t", "y")
    with pytest.raises(ValueError, match="no records"):
        sweep_plots.rank_score_figure([], "t", "y")


def test_subspace_heatmaps_are_on_a_fixed_0_1_scale():
    grids = {"r=8 vs r=64": torch.rand(8, 64, dtype=torch.float64), "seeds": np.eye(8)}
    labels = {"r=8 vs r=64": ("i (r = 8)", "j (r = 64)"), "seeds": ("i (seed 0)", "j (seed 1)")}
    fig = sweep_plots.subspace_heatmaps(grids, labels, "Subspace similarity")
    image = fig.axes[0].get_images()[0]
    assert image.get_clim() == (0, 1) and fig.axes[0].get_xlabel() == "j (r = 64)"
    assert fig.axes[1].get_title() == "seeds" and "φ" in fig.axes[-1].get_ylabel()
    with pytest.raises(ValueError, match="axis_labels lacks"):
        sweep_plots.subspace_heatmaps(grids, {}, "t")


def test_rank_frames_keep_the_top_r_singular_values_and_their_energy():
    spectra = [[3.0, 0.0, 0.0], [4.0, 3.0, 1e-9, 0.0], torch.tensor([1.0, 1.0, 1.0, 1.0])]
    frames = sweep_plots.rank_frames([1, 2, 4], [0.6, 0.7, 0.75], spectra, full_score=0.8)
    assert [len(f["sigma"]) for f in frames] == [1, 2, 4]
    assert frames[1]["top1"] == pytest.approx(16 / 25)
    assert frames[2]["top1"] == pytest.approx(0.25)
    assert frames[1]["ranks"] == [1, 2] and frames[1]["scores"] == [0.6, 0.7]
    assert "r = 2: score 0.700 (full fine-tuning 0.800)" in frames[1]["caption"]
    assert "64%" in frames[1]["caption"]
    with pytest.raises(ValueError, match="strictly increasing"):
        sweep_plots.rank_frames([4, 2], [0.1, 0.2], spectra[:2])
    with pytest.raises(ValueError, match="same non-zero length"):
        sweep_plots.rank_frames([1, 2], [0.1], spectra[:2])


def test_rank_animation_steps_through_r():
    g = torch.Generator().manual_seed(0)
    spectra = [torch.linalg.svdvals(torch.randn(16, r, generator=g) @ torch.randn(r, 16, generator=g))
               for r in (1, 2, 8)]
    anim = sweep_plots.rank_animation([1, 2, 8], [0.5, 0.6, 0.65], spectra, full_score=0.7,
                                      layer="layer 3, W_q")
    frames = anim._lorabook_frames
    assert len(frames) == 3 and math.isclose(frames[-1]["score"], 0.65)
    ax_s, ax_v = anim._fig.axes
    anim._func(2)
    assert list(ax_s.get_lines()[1].get_xdata()) == [1, 2, 8]
    assert "σ_i" in ax_v.get_ylabel() and "layer 3, W_q" in ax_v.get_title()
    assert anim._fig._suptitle.get_text().startswith("r = 8")
    html = anim.to_jshtml()
    assert "<img" in html or "data:image" in html


def test_figures_and_animation_are_legible_in_the_book_and_on_a_slide():
    """Chapter 4's figures and the animation's frames: every text >= MIN_TEXT_PT in the column,
    and >= DECK_MIN_TEXT_PX in the deck's figure box at the dpi chapter 4 exports them with."""
    long_title = "encoder, stored sweep"
    panels = ["W_q: A, r=8 vs r=64", "W_q: ΔW, r=8 vs r=64", "W_q: A, seed 0 vs seed 1 (r=8)"]
    heatmaps = sweep_plots.subspace_heatmaps(
        {panels[0]: torch.rand(8, 64), panels[1]: torch.rand(8, 64), panels[2]: torch.rand(8, 8)},
        {panels[0]: ("i, top directions at r = 8", "j, top directions at r = 64"),
         panels[1]: ("i, top directions at r = 8", "j, top directions at r = 64"),
         panels[2]: ("i, top directions, seed 0", "j, top directions, seed 1")},
        "Subspace similarity φ(i, j), encoder block 3, query projection")
    for fig in (sweep_plots.rank_score_figure(_records(), long_title, "held-out accuracy (fraction)"),
                sweep_plots.params_score_figure(_records(), f"{long_title}: score against trainable "
                                                "parameters", "held-out accuracy (fraction)"),
                heatmaps):
        assert plots.smallest_text_pt(fig) >= plots.MIN_TEXT_PT
        assert plots.deck_smallest_text_px(fig, dpi=100) >= plots.DECK_MIN_TEXT_PX
    spectra = [torch.ones(r) for r in (1, 2, 4)]
    anim = sweep_plots.rank_animation([1, 2, 4], [0.5, 0.6, 0.65], spectra, full_score=0.7,
                                      ylabel="held-out accuracy (fraction)", layer="block 3, W_q")
    assert plots.smallest_text_pt(anim._fig, tight=False) >= plots.MIN_TEXT_PT  # frames: whole figure
    # chapter 4 exports the GIF at dpi 90: its frames fit the deck's box unscaled
    assert plots.deck_smallest_text_px(anim._fig, dpi=90, tight=False) >= plots.DECK_MIN_TEXT_PX
    anim._draw_was_started = True  # built, not shown: no warning when it is collected
