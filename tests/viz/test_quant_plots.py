"""lorabook.viz.quant_plots: chapter 5's figures are titled and labelled; the frames are right."""

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from lorabook.quant import (  # noqa: E402
    dequantize_nf4,
    fp4_codebook,
    int4_codebook,
    nf4_codebook,
    quantize_nf4,
)
from lorabook.viz import quant_plots  # noqa: E402

NF4 = nf4_codebook()


def _labelled(fig) -> None:
    for ax in fig.axes:
        assert ax.get_title(), "every panel has a title"
        assert ax.get_xlabel(), "every panel labels its x axis"


def test_nearest_levels_is_the_package_rounding():
    x = torch.linspace(-1, 1, 1001)
    codes = quant_plots.nearest_levels(x, NF4)
    from lorabook.quant import nearest_code

    assert np.array_equal(codes, nearest_code(x, NF4).numpy())


def test_blockwise_roundtrip_equals_the_package_at_an_allowed_blocksize():
    torch.manual_seed(0)
    x = torch.randn(64 * 5) * 0.02
    ours = quant_plots.blockwise_roundtrip(x, 64, NF4)
    package = dequantize_nf4(*quantize_nf4(x, 64)).double().numpy()
    np.testing.assert_allclose(ours, package, rtol=0, atol=1e-7)  # fp64 vs fp32 products
    with pytest.raises(ValueError, match="blocksize"):
        quant_plots.blockwise_roundtrip(x, 0, NF4)
    with pytest.raises(ValueError, match="16 values"):
        quant_plots.blockwise_roundtrip(x, 8, NF4[:8])


def test_snapping_frames_start_scaled_and_end_on_the_levels():
    torch.manual_seed(1)
    block = torch.randn(64) * 0.05
    frames = quant_plots.snapping_frames(block, NF4, n_frames=12)
    assert len(frames) == 12
    absmax = block.abs().max().item()
    scaled = block.double().numpy() / absmax
    np.testing.assert_allclose(frames[0]["values"], scaled)
    np.testing.assert_allclose(frames[-1]["values"], NF4.double().numpy()[frames[-1]["codes"]])
    brute = np.abs(scaled[:, None] - NF4.double().numpy()).argmin(axis=1)
    assert np.array_equal(frames[-1]["codes"], brute)
    moved = [f["mean_abs_error"] for f in frames]
    assert moved[0] == 0 and all(a <= b for a, b in zip(moved, moved[1:], strict=False))
    assert frames[0]["absmax"] == pytest.approx(absmax)


@pytest.mark.parametrize("bad", [torch.zeros(8), torch.randn(2, 4), torch.randn(0)])
def test_snapping_frames_bad_input(bad):
    with pytest.raises(ValueError):
        quant_plots.snapping_frames(bad, NF4)


def test_snapping_frames_needs_two_frames():
    with pytest.raises(ValueError, match="n_frames"):
        quant_plots.snapping_frames(torch.randn(8), NF4, n_frames=1)


def test_snapping_animation_keeps_its_frames_and_renders():
    anim = quant_plots.snapping_animation(torch.randn(32), NF4, n_frames=3)
    assert len(anim._lorabook_frames) == 3
    _labelled(anim._fig)
    with matplotlib.rc_context({"savefig.dpi": 20}):
        html = anim.to_jshtml()
    assert html.count("data:image/png;base64") == 3  # one image per frame
    from lorabook.viz import plots

    # chapter 5 exports the GIF at dpi 80: 10 x 5.2 in fits the deck's box unscaled
    assert plots.smallest_text_pt(anim._fig, tight=False) >= plots.MIN_TEXT_PT
    assert plots.deck_smallest_text_px(anim._fig, dpi=80, tight=False) >= plots.DECK_MIN_TEXT_PX


def test_figures_are_titled_and_labelled():
    torch.manual_seed(2)
    W = torch.randn(64, 128) * 0.02
    p_pos = torch.linspace(0.9677083, 0.5, 9)[:-1]
    p_neg = torch.linspace(0.9677083, 0.5, 8)[:-1]
    figures = [
        quant_plots.weight_histograms({"W": W, "two": [W, W * 3]}, 64, NF4,
                                      reference_numel=4096),
        quant_plots.quantile_figure(p_pos, p_neg, NF4),
        quant_plots.codebook_figure({"NF4": NF4, "FP4": fp4_codebook(), "Int4": int4_codebook()}),
        quant_plots.rounding_figure(torch.tensor([-0.8, 0.05, 0.5]), NF4),
        quant_plots.absmax_figure(W.reshape(-1)[:32], 8, NF4),
        quant_plots.bits_figure({"NF4": {"codes": 4.0, "absmax": 0.5}}),
        quant_plots.error_figure({"N(0, 1)": [{"quant_type": "nf4", "blocksize": 64, "mae_over_std": 0.07},
                                              {"quant_type": "nf4", "blocksize": 128, "mae_over_std": 0.08}]},
                                 anchors={"nf4": {64: 0.0728}}),
        quant_plots.format_figure([{"format": "fp32", "model_bytes": 4e6, "ppl": 10.0},
                                   {"format": "nf4", "model_bytes": 1e6, "ppl": 11.0}],
                                  {"ppl": "perplexity"}),
    ]
    for fig in figures:
        _labelled(fig)
    plt.close("all")


def test_codebook_figure_counts_distinct_levels():
    fig = quant_plots.codebook_figure({"Int4": int4_codebook(), "NF4": NF4})
    notes = [t.get_text() for t in fig.axes[0].texts]
    assert notes == ["15 levels", "16 levels"]  # Int4 repeats 1.0 in its 16th code


def test_absmax_figure_shows_the_blockwise_gain():
    x = torch.full((16,), 0.01)
    x[3] = 1.0  # one outlier: a single absmax crushes the small values of the other block to 0
    fig = quant_plots.absmax_figure(x, 8, NF4)
    labels = [t.get_text() for t in fig.axes[1].get_legend().get_texts()]
    one, blocks = (float(s.rsplit(" ", 1)[1]) for s in labels)
    assert blocks < one


def test_empty_inputs_raise():
    with pytest.raises(ValueError):
        quant_plots.weight_histograms({})
    with pytest.raises(ValueError):
        quant_plots.error_figure({})
    with pytest.raises(ValueError):
        quant_plots.format_figure([], {})


def test_chapter_figures_are_legible_in_the_book_and_on_a_slide():
    """As chapter 5 calls them: every text >= MIN_TEXT_PT in the book's column and >=
    DECK_MIN_TEXT_PX in the deck's figure box, saved at export's dpi (export checks both)."""
    from lorabook.viz import plots

    p_pos = torch.linspace(0.9677083, 0.5, 9)[:-1]
    p_neg = torch.linspace(0.9677083, 0.5, 8)[:-1]
    rows = [{"quant_type": qt, "blocksize": b, "mae_over_std": 0.07 + 0.01 * i}
            for qt in ("nf4", "fp4", "int4") for i, b in enumerate((32, 64, 128, 256, 512, 1024, 2048, 4096))]
    cost = [{"format": f, "model_bytes": 1e8, "held-out ppl": 100.0, "target ppl": 12.0}
            for f in ("fp32", "bf16", "nf4", "nf4+dq", "fp4", "int4")]
    figures = {
        "quantiles": quant_plots.quantile_figure(p_pos, p_neg, NF4),
        "codebooks": quant_plots.codebook_figure({"NF4": NF4, "FP4": fp4_codebook(),
                                                  "Int4": int4_codebook()}),
        "absmax": quant_plots.absmax_figure(torch.randn(32) * 0.02, 8, NF4),
        "bits": quant_plots.bits_figure({"NF4, blocksize 64": {"4-bit codes": 4.0, "absmax (fp32)": 0.5},
                                         "NF4 + double quantization": {
                                             "4-bit codes": 4.0, "absmax (8-bit codes)": 0.125,
                                             "2nd-level absmax + offset (fp32)": 0.002}}),
        "errors": quant_plots.error_figure({"N(0, 1), 1024 x 1024": rows, "MiniLM encoder": rows,
                                            "SmolLM2 decoder (Q4_1 grid)": rows},
                                           anchors={"nf4": {64: 0.0728}, "fp4": {64: 0.0966}}),
        "formats": quant_plots.format_figure(cost, {"held-out ppl": "held-out perplexity",
                                                    "target ppl": "task-target perplexity"}),
    }
    small = {name: round(plots.smallest_text_pt(fig), 2) for name, fig in figures.items()}
    assert all(pt >= plots.MIN_TEXT_PT for pt in small.values()), small
    deck = {name: round(plots.deck_smallest_text_px(fig, dpi=100), 2) for name, fig in figures.items()}
    assert all(px >= plots.DECK_MIN_TEXT_PX for px in deck.values()), deck
    errors = figures["errors"]
    assert len([ax for ax in errors.axes if ax.get_lines()]) == 3  # a panel per source, side by side
    assert errors.axes[0].get_shared_y_axes().joined(errors.axes[0], errors.axes[2])  # one error scale
    plt.close("all")
