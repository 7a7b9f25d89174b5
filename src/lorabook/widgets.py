"""Two live controls for the notebooks, each with a pre-rendered equivalent for the static book.

- ``rank_slider(delta_W)`` (chapter 2): a slider over r re-approximates a real delta_W with
  ``analysis.low_rank_approx`` and shows the approximation and its relative error.
- ``quantizer_selector(W)`` (chapter 5): blocksize, 4-bit format and double quantization; shows
  the round-trip error (``quant.compare.quantization_error``) and the bytes
  (``quant.bits_per_parameter``).
- ``rank_static`` / ``quantizer_static``: every setting at once, as one figure.
- ``rank_explorer`` / ``quantizer_explorer``: what a chapter's cell shows. The live widget when a
  person is at the notebook (a frontend that accepts input: Jupyter, Colab, VS Code); the
  static figure when the notebook is executed headless (the book build, nbval), so no widget
  state is saved into the executed notebook and the rendered page never shows a dead widget.
  ``LORABOOK_WIDGETS=on|off`` forces either.

Figures are drawn on their own Agg canvas (no pyplot); nothing here prints.
"""

from __future__ import annotations

import base64
import html
import io
import os
from collections.abc import Callable, Sequence

import ipywidgets as widgets
import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from lorabook import analysis
from lorabook.quant import ALLOWED_BLOCKSIZES, QUANT_TYPES, bits_per_parameter, quantize_4bit
from lorabook.quant.compare import quantization_error
from lorabook.viz.plots import DIVERGING, MIN_TEXT_PT, PALETTE, smallest_text_pt

WIDGETS_ENV = "LORABOOK_WIDGETS"  # "on" / "off" force the live widget or the static figure


def _figure(figsize: tuple[float, float]) -> Figure:
    fig = Figure(figsize=figsize, dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _png(fig: Figure, dpi: int = 80) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, facecolor="white")
    return buf.getvalue()


def _matrix(M: torch.Tensor, name: str) -> torch.Tensor:
    if not isinstance(M, torch.Tensor) or M.ndim != 2:
        raise ValueError(f"{name} must be a 2-D torch.Tensor, got {getattr(M, 'shape', type(M))}")
    return M.detach().to("cpu", torch.float32)


# --- the rank slider (chapter 2) -----------------------------------------------------------

def rank_errors(delta_W: torch.Tensor) -> np.ndarray:
    """Relative error of the best rank-r approximation for r = 1..min(out, in) (chapter 2).

    Eckart-Young: ||delta_W - delta_W_r||_F / ||delta_W||_F = sqrt(1 - energy kept at r).
    """
    kept = analysis.energy_captured(_matrix(delta_W, "delta_W")).numpy()  # (k,)
    return np.sqrt(np.clip(1.0 - kept, 0.0, None))


def rank_state(delta_W: torch.Tensor, r: int, max_size: int = 64) -> dict:
    """delta_W at rank r: "approx" and "target" (top-left block), "error", "params" (chapter 2)."""
    M = _matrix(delta_W, "delta_W")
    k = min(M.shape)
    if isinstance(r, bool) or not isinstance(r, int) or not 1 <= r <= k:
        raise ValueError(f"r must be an int from 1 to min(out, in) = {k}, got {r!r}")
    approx = analysis.low_rank_approx(M, r)  # (out, in)
    rows, cols = min(M.shape[0], max_size), min(M.shape[1], max_size)
    return {"r": r, "error": analysis.relative_error(M, approx),
            "params": r * (M.shape[0] + M.shape[1]), "full_params": M.numel(),
            "target": M[:rows, :cols].numpy(), "approx": approx[:rows, :cols].numpy()}


def _rank_figure(states: Sequence[dict], errors: np.ndarray, title: str) -> Figure:
    n = len(states) + 2  # delta_W, one heatmap per state, the error curve
    cols = min(n, 2)  # two a row: the book's column is 688 px wide (plots.BOOK_COLUMN_PX)
    rows = -(-n // cols)
    height = 3.9 * rows + 0.7
    fig = _figure((4.2 * cols, height))
    grid = fig.add_gridspec(rows, cols, wspace=0.45, hspace=0.45, left=0.12, right=0.97,
                            top=1 - 0.9 / height, bottom=0.6 / height)
    scale = float(np.abs(states[0]["target"]).max()) or 1.0
    panels = [("ΔW (top-left block)", states[0]["target"])]
    panels += [(f"rank {s['r']}: error {s['error']:.0%}", s["approx"]) for s in states]
    for i, (label, block) in enumerate(panels):
        ax = fig.add_subplot(grid[i // cols, i % cols])
        ax.imshow(block, cmap=DIVERGING, vmin=-scale, vmax=scale, aspect="auto",
                  interpolation="nearest")
        ax.set_title(label, fontsize=13)
        ax.set_xlabel("input feature (index)", fontsize=12)
        ax.set_ylabel("output feature (index)", fontsize=12)
        ax.tick_params(labelsize=11)
    ax = fig.add_subplot(grid[(n - 1) // cols, (n - 1) % cols])
    ranks = np.arange(1, len(errors) + 1)
    ax.plot(ranks, errors, color=PALETTE["lora"], lw=2)
    ax.plot([s["r"] for s in states], [s["error"] for s in states], "o", ms=8,
            color=PALETTE["base"])
    ax.set_xscale("log", base=2)
    ticks = [t for t in (1, 4, 16, 64, 256, 1024, 4096) if t <= len(errors)]
    ax.set_xticks(ticks, [str(t) for t in ticks])
    ax.minorticks_off()
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("rank r (log scale)", fontsize=12)
    ax.set_ylabel("‖ΔW − ΔW_r‖_F / ‖ΔW‖_F", fontsize=12)
    ax.tick_params(labelsize=11)
    ax.set_title("relative error of the best rank r", fontsize=13)
    ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=15)
    return fig


def rank_slider(delta_W: torch.Tensor, r: int = 8, max_size: int = 64) -> widgets.VBox:
    """A slider over r showing delta_W's best rank-r approximation and its error (chapter 2)."""
    M = _matrix(delta_W, "delta_W")
    k = min(M.shape)
    errors = rank_errors(M)
    slider = widgets.IntSlider(value=min(max(r, 1), k), min=1, max=k, description="rank r",
                               continuous_update=False)
    caption, image = widgets.HTML(), widgets.Image(format="png")
    box = widgets.VBox([slider, caption, image])

    def update(_change=None) -> None:
        s = rank_state(M, slider.value, max_size)
        caption.value = (f"<b>r = {s['r']}</b>: relative error {s['error']:.1%}; the factors hold "
                         f"r (out + in) = {s['params']:,} numbers, ΔW holds {s['full_params']:,}")
        image.value = _png(_rank_figure([s], errors, f"ΔW {tuple(M.shape)} at rank {s['r']}"))
        box.state = s

    slider.observe(update, names="value")
    update()
    return box


def rank_static(delta_W: torch.Tensor, ranks: Sequence[int] = (1, 4, 16, 64),
                max_size: int = 64) -> Figure:
    """The rank slider pre-rendered: delta_W at several ranks and the whole error curve (chapter 2)."""
    M = _matrix(delta_W, "delta_W")
    ranks = [r for r in ranks if r <= min(M.shape)] or [min(M.shape)]
    states = [rank_state(M, r, max_size) for r in ranks]
    return _rank_figure(states, rank_errors(M), f"ΔW {tuple(M.shape)} at ranks "
                        f"{', '.join(map(str, ranks))}")


# --- the quantizer selector (chapter 5) ----------------------------------------------------

def quantizer_table(W: torch.Tensor, blocksizes: Sequence[int] = ALLOWED_BLOCKSIZES,
                    quant_types: Sequence[str] = QUANT_TYPES) -> list[dict]:
    """Error and bytes of W in every (format, double quant, blocksize) setting (chapter 5).

    Row keys: quant_type, double_quant, blocksize, mae, mae_over_std, rel_fro,
    bits_per_parameter, bytes (packed codes + absmax statistics for this W).
    """
    if not isinstance(W, torch.Tensor):
        raise TypeError(f"W must be a torch.Tensor, got {type(W).__name__}")
    W = W.detach().to("cpu", torch.float32)
    for bs in blocksizes:
        if bs not in ALLOWED_BLOCKSIZES:
            raise ValueError(f"blocksize must be one of {ALLOWED_BLOCKSIZES}, got {bs!r}")
    bits = {}  # the storage does not depend on the codebook: measure it once per setting
    for bs in blocksizes:
        for dq in (False, True):
            packed, state = quantize_4bit(W, "nf4", bs, dq)
            bits[bs, dq] = bits_per_parameter(state, packed)
    rows = []
    for qt in quant_types:
        for dq in (False, True):
            for bs in blocksizes:
                err = quantization_error(W, qt, bs, double_quant=dq)
                rows.append({"quant_type": qt, "double_quant": dq, "blocksize": bs,
                             "mae": err["mae"], "mae_over_std": err["mae_over_std"],
                             "rel_fro": err["rel_fro"], "bits_per_parameter": bits[bs, dq],
                             "bytes": bits[bs, dq] * W.numel() / 8})
    return rows


def _quantizer_figure(rows: Sequence[dict], numel: int, title: str,
                      selected: dict | None = None) -> Figure:
    fig = _figure((8, 10))  # stacked: the book's column is 688 px wide (plots.BOOK_COLUMN_PX)
    ax_err, ax_bits = fig.add_subplot(2, 1, 1), fig.add_subplot(2, 1, 2)
    for qt in dict.fromkeys(r["quant_type"] for r in rows):
        for dq, ls in ((False, "-"), (True, "--")):
            sel = [r for r in rows if r["quant_type"] == qt and r["double_quant"] == dq]
            ax_err.plot([r["blocksize"] for r in sel], [r["mae_over_std"] for r in sel], ls,
                        marker="o", color=PALETTE.get(qt), label=f"{qt}{' + DQ' if dq else ''}")
    for dq, ls in ((False, "-"), (True, "--")):
        sel = [r for r in rows if r["quant_type"] == rows[0]["quant_type"] and r["double_quant"] == dq]
        ax_bits.plot([r["blocksize"] for r in sel], [r["bits_per_parameter"] for r in sel], ls,
                     marker="o", color=PALETTE["base"], label="double quant" if dq else "fp32 absmax")
    if selected is not None:
        ax_err.plot(selected["blocksize"], selected["mae_over_std"], "*", ms=22, color="black")
        ax_bits.plot(selected["blocksize"], selected["bits_per_parameter"], "*", ms=22,
                     color="black")
    sizes = sorted({r["blocksize"] for r in rows})
    for ax in (ax_err, ax_bits):
        ax.set_xscale("log", base=2)
        ax.set_xticks(sizes, [str(b) for b in sizes])
        ax.minorticks_off()
        ax.set_xlabel("blocksize (weights per absmax, log scale)")
        ax.grid(alpha=0.3)
        ax.tick_params(labelsize=11)
        ax.xaxis.label.set_fontsize(12)
        ax.yaxis.label.set_fontsize(12)
        ax.legend(fontsize=11, ncols=3 if ax is ax_err else 1)
    ax_err.set_ylabel("mean |W − Q(W)| / std(W)")
    ax_err.set_title("round-trip error (dashed: with double quantization)")
    ax_bits.set_ylabel("bits per weight (codes + absmax)")
    ax_bits.set_title(f"storage: {numel:,} weights")
    kib = ax_bits.secondary_yaxis("right", functions=(lambda b: b * numel / 8 / 1024,
                                                      lambda k: k * 1024 * 8 / numel))
    kib.set_ylabel("KiB for this matrix", fontsize=12)
    kib.tick_params(labelsize=11)
    fig.suptitle(title, fontsize=14)
    fig.tight_layout()
    return fig


def quantizer_selector(W: torch.Tensor, blocksize: int = 64, quant_type: str = "nf4",
                       double_quant: bool = True) -> widgets.VBox:
    """Blocksize, format and double quantization of W, with its error and bytes (chapter 5)."""
    if not isinstance(W, torch.Tensor):
        raise TypeError(f"W must be a torch.Tensor, got {type(W).__name__}")
    if blocksize not in ALLOWED_BLOCKSIZES or quant_type not in QUANT_TYPES:
        raise ValueError(f"blocksize must be one of {ALLOWED_BLOCKSIZES} and quant_type one of "
                         f"{QUANT_TYPES}, got {blocksize!r}, {quant_type!r}")
    W = W.detach().to("cpu", torch.float32)
    rows = quantizer_table(W)
    pick_bs = widgets.Dropdown(options=list(ALLOWED_BLOCKSIZES), value=blocksize,
                               description="blocksize")
    pick_qt = widgets.ToggleButtons(options=list(QUANT_TYPES), value=quant_type,
                                    description="format")
    pick_dq = widgets.Checkbox(value=double_quant, description="double quantization")
    caption, image = widgets.HTML(), widgets.Image(format="png")
    box = widgets.VBox([widgets.HBox([pick_bs, pick_dq]), pick_qt, caption, image])
    n = W.numel()

    def update(_change=None) -> None:
        row = next(r for r in rows if r["blocksize"] == pick_bs.value
                   and r["quant_type"] == pick_qt.value and r["double_quant"] == pick_dq.value)
        caption.value = (
            f"<b>{row['quant_type'].upper()}, blocksize {row['blocksize']}"
            f"{', double quantization' if row['double_quant'] else ''}</b>: mean |W − Q(W)| = "
            f"{row['mae']:.3g} ({row['mae_over_std']:.4f} std), relative error "
            f"{row['rel_fro']:.2%}; {row['bits_per_parameter']:.3f} bits per weight = "
            f"{row['bytes'] / 1024:,.1f} KiB (bf16: {2 * n / 1024:,.1f} KiB, fp32: "
            f"{4 * n / 1024:,.1f} KiB)")
        image.value = _png(_quantizer_figure(rows, n, "4-bit round trip of W", selected=row))
        box.state = row

    for control in (pick_bs, pick_qt, pick_dq):
        control.observe(update, names="value")
    update()
    return box


def quantizer_static(W: torch.Tensor) -> Figure:
    """The quantizer selector pre-rendered: every format and blocksize in one figure (chapter 5)."""
    return _quantizer_figure(quantizer_table(W), W.numel(),
                             "4-bit round trip of W, every setting")


# --- live or static --------------------------------------------------------------------------

def live_frontend() -> bool:
    """True when a person is at the notebook: its frontend accepts input (chapter 2).

    Headless executors (nbclient in the book build, nbval, papermill) send ``allow_stdin=False``
    with every cell; Jupyter, Colab and VS Code send True. ``LORABOOK_WIDGETS`` overrides.
    """
    forced = os.environ.get(WIDGETS_ENV, "").lower()
    if forced in ("on", "off"):
        return forced == "on"
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    kernel = getattr(get_ipython(), "kernel", None)
    return bool(getattr(kernel, "_allow_stdin", False))


class StaticView:
    """A pre-rendered figure with a note, shown as HTML (an <img> with the PNG inline) (chapter 2)."""

    def __init__(self, figure: Figure, note: str, dpi: int = 80):
        self.smallest_text_pt = smallest_text_pt(figure, tight=False, dpi=dpi)
        if self.smallest_text_pt < MIN_TEXT_PT:  # the rule lorabook.viz.export applies
            raise ValueError(f"{figure.get_suptitle() or note!r}: its smallest text shows at "
                             f"{self.smallest_text_pt:.1f} pt in the book's column (below "
                             f"{MIN_TEXT_PT} pt): enlarge that text or narrow the figure")
        self.png = _png(figure, dpi)
        self.note = note
        self.alt = figure.get_suptitle() or note

    def _repr_html_(self) -> str:
        data = base64.b64encode(self.png).decode("ascii")
        return (f'<div class="lorabook-static"><p><em>{html.escape(self.note)}</em></p>'
                f'<img src="data:image/png;base64,{data}" alt="{html.escape(self.alt)}" '
                'style="max-width: 100%"></div>')

    def __repr__(self) -> str:
        return f"StaticView({self.note!r})"


def explore(live: Callable[[], widgets.Widget], static: Callable[[], Figure],
            note: str) -> widgets.Widget | StaticView:
    """``live()`` in a notebook a person is using, else ``StaticView(static(), note)`` (chapter 2)."""
    return live() if live_frontend() else StaticView(static(), note)


def rank_explorer(delta_W: torch.Tensor, r: int = 8, ranks: Sequence[int] = (1, 4, 16, 64),
                  max_size: int = 64) -> widgets.Widget | StaticView:
    """The rank slider, or its pre-rendered frames where no kernel runs (chapter 2)."""
    note = ("Static view of the rank slider (frames at r = " + ", ".join(map(str, ranks))
            + "): run this notebook in Jupyter or Colab to move it.")
    return explore(lambda: rank_slider(delta_W, r, max_size),
                   lambda: rank_static(delta_W, ranks, max_size), note)


def quantizer_explorer(W: torch.Tensor, blocksize: int = 64, quant_type: str = "nf4",
                       double_quant: bool = True) -> widgets.Widget | StaticView:
    """The quantizer selector, or every setting pre-rendered where no kernel runs (chapter 5)."""
    note = ("Static view of the quantizer selector (every format and blocksize): run this "
            "notebook in Jupyter or Colab to pick one.")
    return explore(lambda: quantizer_selector(W, blocksize, quant_type, double_quant),
                   lambda: quantizer_static(W), note)


__all__ = ["StaticView", "explore", "live_frontend", "quantizer_explorer",
           "quantizer_selector", "quantizer_static", "quantizer_table", "rank_errors",
           "rank_explorer", "rank_slider", "rank_state", "rank_static"]
