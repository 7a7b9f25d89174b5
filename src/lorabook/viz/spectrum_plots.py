"""The spectrum of a real weight change against random matrices (chapter 2).

``delta_w_spectrum_figure`` draws what ``lorabook.analysis`` measures of chapter 1's full
fine-tuning: singular values of ΔW next to those of a Gaussian matrix of the same shape and
norm (top), and the fraction of ‖ΔW‖² held by the top r directions (bottom). One colour per
kind of matrix in both panels; the panels are stacked so that the figure stays legible at the
book's column width (``plots.MIN_TEXT_PT``). Nothing here calls ``plt.show()``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import matplotlib as mpl
import numpy as np
import torch
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from lorabook.viz.plots import SEQUENCE, WIDE_STYLE, WIDE_TEXT_PT, color, new_figure

Vector = torch.Tensor | np.ndarray | Sequence[float]


def _np(x: Vector, name: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().to("cpu", torch.float64).numpy()
    v = np.asarray(x, dtype=np.float64)
    if v.ndim != 1 or v.size == 0:
        raise ValueError(f"{name} must be a non-empty 1-D vector, got shape {v.shape}")
    return v


def _kind(name: str) -> str:
    return name.rsplit(".", 1)[-1]  # "model.layers.15.self_attn.q_proj" -> "q_proj"


def delta_w_spectrum_figure(spectra: Mapping[str, tuple[Vector, Vector]],
                            energy: Mapping[str, tuple[Vector, Vector]],
                            layer: int, layers: Sequence[int]) -> Figure:
    """Singular values of ΔW against random twins (left), energy held by the top r (right) (chapter 2).

    ``spectra``: {kind, e.g. "q_proj": (singular values of ΔW, of a Gaussian matrix of its shape
    and norm)}, for the matrices of layer ``layer``. ``energy``: {matrix name: (fraction of
    ‖ΔW‖² in the top r directions for r = 1..k, the same for its random twin)}, for the matrices
    of ``layers``; each line is coloured by the matrix's kind (the name's last part), the random
    twins dashed on the left, grey on the right. One legend under both panels: side by side, the
    figure reads in the book's column and in the deck's 470-px box (``plots.WIDE_STYLE``).
    """
    if not spectra or not energy:
        raise ValueError("delta_w_spectrum_figure needs at least one spectrum and one energy curve")
    # the left panel's kinds first: their colours stay those of the right panel
    kinds = list(dict.fromkeys([*spectra, *sorted({_kind(n) for n in energy})]))
    colours = {k: SEQUENCE[i % len(SEQUENCE)] for i, k in enumerate(kinds)}
    fig = new_figure((12.6, 5.6))
    with mpl.rc_context(WIDE_STYLE):
        ax_s, ax_e = fig.subplots(1, 2)
        for kind, (s, s_random) in spectra.items():
            s, s_random = _np(s, f"spectra[{kind!r}]"), _np(s_random, f"spectra[{kind!r}] (random)")
            ax_s.plot(np.arange(1, s.size + 1), s, color=colours[kind])
            ax_s.plot(np.arange(1, s_random.size + 1), s_random, color=colours[kind], ls="--",
                      lw=1.3)
        ax_s.set(xscale="log", yscale="log", xlabel="index i of σ_i (log scale)",
                 ylabel="singular value σ_i (weight units)",
                 title=f"Singular values of ΔW, layer {layer}")
        for name, (e, e_random) in energy.items():
            e, e_random = _np(e, f"energy[{name!r}]"), _np(e_random, f"energy[{name!r}] (random)")
            ax_e.plot(np.arange(1, e_random.size + 1), e_random, color=color("random"), lw=0.8,
                      alpha=0.6)
            ax_e.plot(np.arange(1, e.size + 1), e, color=colours[_kind(name)], lw=1.4)
        ax_e.axhline(0.9, color="black", lw=0.8, ls=":")
        ax_e.set(xscale="log", ylim=(0, 1.02), xlabel="rank r (log scale)",
                 ylabel="share of ‖ΔW‖²_F in the top r",
                 title=f"Energy captured, layers {', '.join(map(str, layers))}")
        # one legend for both panels, under them: the curves fill the panels
        handles = [Line2D([], [], color=colours[k], label=k) for k in kinds]
        handles += [Line2D([], [], color="black", label="ΔW (solid)"),
                    Line2D([], [], color=color("random"), ls="--", lw=1.3,
                           label="random twin: same shape, norm")]
        n_rows = -(-len(handles) // 5)
        fig.legend(handles=handles, loc="lower center", ncols=min(5, len(handles)),
                   frameon=False, fontsize=WIDE_TEXT_PT)
        fig.tight_layout(rect=(0, 0.02 + 0.07 * n_rows, 1, 1))
    return fig
