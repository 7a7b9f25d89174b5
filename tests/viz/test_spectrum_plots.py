"""lorabook.viz.spectrum_plots: chapter 2's spectrum figure, labelled, coloured by kind, legible."""

import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from lorabook import analysis  # noqa: E402
from lorabook.viz import plots, spectrum_plots  # noqa: E402


def _inputs():
    g = torch.Generator().manual_seed(0)
    deltas = {f"model.layers.{layer}.self_attn.{kind}": torch.randn(24, 16, generator=g)
              for layer in (0, 1) for kind in ("q_proj", "v_proj", "o_proj")}
    spectra = {kind: (analysis.singular_values(deltas[f"model.layers.1.self_attn.{kind}"]),
                      analysis.singular_values(analysis.random_like_spectrum(
                          deltas[f"model.layers.1.self_attn.{kind}"])))
               for kind in ("q_proj", "v_proj")}
    energy = {n: (analysis.energy_captured(d),
                  analysis.energy_captured(analysis.random_like_spectrum(d)))
              for n, d in deltas.items()}
    return spectra, energy


def test_delta_w_spectrum_figure_colours_each_kind_alike_in_both_panels():
    spectra, energy = _inputs()
    fig = spectrum_plots.delta_w_spectrum_figure(spectra, energy, 1, [0, 1])
    left, right = fig.axes
    assert left.get_title() == "Singular values of ΔW, layer 1" and "0, 1" in right.get_title()
    assert left.get_xlabel() and left.get_ylabel() and right.get_xlabel() and right.get_ylabel()
    assert left.get_yscale() == "log" and right.get_xscale() == "log"
    (legend,) = fig.legends  # one legend for both panels, under them
    colour = {t.get_text(): h.get_color()
              for t, h in zip(legend.get_texts(), legend.legend_handles, strict=True)}
    assert {"q_proj", "v_proj", "o_proj"} <= set(colour) and colour["q_proj"] != colour["v_proj"]
    q_line = left.get_lines()[0]  # q_proj's ΔW: its singular values against their index
    np.testing.assert_allclose(q_line.get_ydata(), spectra["q_proj"][0].numpy())
    assert q_line.get_color() == colour["q_proj"]
    # the right panel: per matrix its random twin (grey) then ΔW, coloured by kind as on the left
    by_name = dict(zip(energy, right.get_lines()[1::2], strict=False))
    assert by_name["model.layers.0.self_attn.q_proj"].get_color() == colour["q_proj"]
    assert by_name["model.layers.1.self_attn.v_proj"].get_color() == colour["v_proj"]
    assert right.get_lines()[0].get_color() == plots.color("random")
    assert len(right.get_lines()) == 2 * len(energy) + 1  # ΔW, its twin per matrix; the 90% line


def test_delta_w_spectrum_figure_is_legible_in_the_book_and_on_a_slide():
    spectra, energy = _inputs()
    fig = spectrum_plots.delta_w_spectrum_figure(spectra, energy, 1, [0, 1])
    assert plots.smallest_text_pt(fig) >= plots.MIN_TEXT_PT
    assert plots.deck_smallest_text_px(fig, dpi=100) >= plots.DECK_MIN_TEXT_PX  # as exported


def test_delta_w_spectrum_figure_bad_input():
    spectra, energy = _inputs()
    with pytest.raises(ValueError, match="at least one"):
        spectrum_plots.delta_w_spectrum_figure({}, energy, 1, [1])
    with pytest.raises(ValueError, match="1-D"):
        spectrum_plots.delta_w_spectrum_figure({"q_proj": (torch.ones(2, 2), torch.ones(2))},
                                               energy, 1, [1])
