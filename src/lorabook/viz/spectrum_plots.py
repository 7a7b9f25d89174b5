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

from lorabook.viz.plots import SEQUENCE, STYLE, color, new_figure

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
    """Singular values of ΔW against random twins (top), energy held by the top r (bottom) (chapter 2).

    ``spectra``: {kind, e.g. "q_proj": (singular values of ΔW, of a Gaussian matrix of its shape
    and norm)}, for the matrices of layer ``layer``. ``energy``: {matrix name: (fraction of
    ‖ΔW‖² in the top r directions for r = 1..k, the same for its random twin)}, for the matrices
    of ``layers``; each line is coloured by the matrix's kind (the name's last part), the random
    twins in grey.
    """
    if not spectra or not energy:
        raise ValueError("delta_w_spectrum_figure needs at least one spectrum and one energy curve")
    # the top panel's kinds first: their colours stay those of the bottom panel
    kinds = list(dict.fromkeys([*spectra, *sorted({_kind(n) for n in energy})]))
    colours = {k: SEQUENCE[i % len(SEQUENCE)] for i, k in enumerate(kinds)}
    fig = new_figure((9, 10.5))
    with mpl.rc_context(STYLE):
        ax_s, ax_e = fig.subplots(2, 1)
        for kind, (s, s_random) in spectra.items():
            s, s_random = _np(s, f"spectra[{kind!r}]"), _np(s_random, f"spectra[{kind!r}] (random)")
            ax_s.plot(np.arange(1, s.size + 1), s, color=colours[kind])
            ax_s.plot(np.arange(1, s_random.size + 1), s_random, color=colours[kind], ls="--",
                      lw=1.3)
        handles = [Line2D([], [], color=colours[k], label=k) for k in spectra]
        handles += [Line2D([], [], color="black", label="ΔW (solid)"),
                    Line2D([], [], color="black", ls="--", lw=1.3,
                           label="random, same shape and norm (dashed)")]
        ax_s.legend(handles=handles, loc="lower left", fontsize=12)
        ax_s.set(xscale="log", yscale="log", xlabel="index i of the singular value (log scale)",
                 ylabel="singular value σ_i (weight units)",
                 title=f"Singular values of ΔW, layer {layer}")
        for name, (e, e_random) in energy.items():
            e, e_random = _np(e, f"energy[{name!r}]"), _np(e_random, f"energy[{name!r}] (random)")
            ax_e.plot(np.arange(1, e_random.size + 1), e_random, color=color("random"), lw=0.8,
                      alpha=0.6)
            ax_e.plot(np.arange(1, e.size + 1), e, color=colours[_kind(name)], lw=1.4)
        handles = [Line2D([], [], color=colours[k], label=k) for k in kinds if
                   any(_kind(n) == k for n in energy)]
        handles.append(Line2D([], [], color=color("random"), label="random, same shape and norm"))
        ax_e.axhline(0.9, color="black", lw=0.8, ls=":")
        ax_e.set(xscale="log", ylim=(0, 1.02), xlabel="rank r (log scale)",
                 ylabel="fraction of ‖ΔW‖²_F\nin the top r directions",
                 title=f"Energy captured, layers {', '.join(map(str, layers))}")
        # under the axes: the curves fill the panel, and 8 entries would hide some of them
        ax_e.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, 0), borderaxespad=3.6,
                    ncols=3, fontsize=12, frameon=False)
        fig.tight_layout()
    return fig
