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
    top, bottom = fig.axes
    assert top.get_title() == "Singular values of ΔW, layer 1" and "0, 1" in bottom.get_title()
    assert top.get_xlabel() and top.get_ylabel() and bottom.get_xlabel() and bottom.get_ylabel()
    assert top.get_yscale() == "log" and bottom.get_xscale() == "log"
    def colours(ax):
        legend = ax.get_legend()
        return {t.get_text(): h.get_color()
                for t, h in zip(legend.get_texts(), legend.legend_handles, strict=True)}

    top_colour, bottom_colour = colours(top), colours(bottom)
    assert top_colour["q_proj"] == bottom_colour["q_proj"] != top_colour["v_proj"]
    assert top_colour["v_proj"] == bottom_colour["v_proj"]
    assert set(bottom_colour) == {"q_proj", "v_proj", "o_proj", "random, same shape and norm"}
    q_line = top.get_lines()[0]  # q_proj's ΔW: its singular values against their index
    np.testing.assert_allclose(q_line.get_ydata(), spectra["q_proj"][0].numpy())
    assert len(bottom.get_lines()) == 2 * len(energy) + 1  # ΔW, its twin per matrix; the 90% line


def test_delta_w_spectrum_figure_is_legible_at_the_book_width():
    spectra, energy = _inputs()
    fig = spectrum_plots.delta_w_spectrum_figure(spectra, energy, 1, [0, 1])
    assert plots.smallest_text_pt(fig) >= plots.MIN_TEXT_PT


def test_delta_w_spectrum_figure_bad_input():
    spectra, energy = _inputs()
    with pytest.raises(ValueError, match="at least one"):
        spectrum_plots.delta_w_spectrum_figure({}, energy, 1, [1])
    with pytest.raises(ValueError, match="1-D"):
        spectrum_plots.delta_w_spectrum_figure({"q_proj": (torch.ones(2, 2), torch.ones(2))},
                                               energy, 1, [1])
