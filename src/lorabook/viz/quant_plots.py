"""Figures and the snapping animation of chapter 5 (NF4 from scratch).

Every function returns a matplotlib ``Figure`` (or an animation) in the book's style, titled,
axes labelled with units; none calls ``plt.show()``. The animation is built from frames computed
by the pure function ``snapping_frames``, which the tests check.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import matplotlib as mpl
import numpy as np
import torch
from matplotlib import animation
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from lorabook.quant.nf4 import blockwise_scale
from lorabook.viz.plots import (
    PALETTE,
    SEQUENCE,
    STYLE,
    WIDE_STYLE,
    WIDE_TEXT_PT,
    new_figure,
    panel_grid,
)

FORMAT_COLORS = {"fp32": PALETTE["base"], "bf16": PALETTE["random"], "nf4": PALETTE["nf4"],
                 "nf4+dq": PALETTE["nf4"], "fp4": PALETTE["fp4"], "int4": "#B8A200"}  # int4 darker
FORMAT_NAMES = {"nf4": "NF4", "fp4": "FP4", "int4": "Int4"}
Frame = dict[str, Any]


def _np(x: torch.Tensor | np.ndarray | Sequence[float]) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().to("cpu", torch.float64).numpy()
    return np.asarray(x, dtype=np.float64)


def _vector(x, name: str) -> np.ndarray:
    v = _np(x)
    if v.ndim != 1 or v.size == 0:
        raise ValueError(f"{name} must be a non-empty 1-D vector, got shape {v.shape}")
    return v


def _codebook(codebook) -> np.ndarray:
    c = _vector(codebook, "codebook")
    if c.size != 16:
        raise ValueError(f"expected a codebook of 16 values, got {c.size}")
    return c


def nearest_levels(x, codebook) -> np.ndarray:
    """Index of the nearest codebook value for each x, by brute force argmin |x - c| (chapter 5)."""
    x, c = _np(x), _np(codebook)
    return np.abs(x[..., None] - c).argmin(axis=-1)


def blockwise_roundtrip(x, blocksize: int, codebook) -> np.ndarray:
    """Quantize and dequantize a vector with any blocksize (teaching version, no packing) (chapter 5)."""
    x, c = _vector(x, "x"), _codebook(codebook)
    if not isinstance(blocksize, int) or blocksize < 1:
        raise ValueError(f"blocksize must be an int >= 1, got {blocksize!r}")
    out = np.empty_like(x)
    for start in range(0, x.size, blocksize):  # a handful of blocks in a figure: a loop is clear
        block = x[start:start + blocksize]
        absmax = np.abs(block).max()
        scaled = block / absmax if absmax > 0 else block
        out[start:start + blocksize] = c[nearest_levels(scaled, c)] * absmax
    return out


def weight_histograms(groups: Mapping[str, torch.Tensor | Sequence[torch.Tensor]],
                      blocksize: int = 64, codebook=None, bins: int = 121,
                      reference_numel: int = 1 << 20, seed: int = 0) -> Figure:
    """Real weights against N(0, 1): standardised (left), absmax-normalised per block (right) (chapter 5).

    Each group is a tensor or a list of tensors (matrices); each matrix is divided by its own
    std (left) or cut into blocks and divided by each block's absmax (right). The grey reference
    is N(0, 1): its density on the left, ``reference_numel`` samples block-normalised on the right.
    ``codebook`` (e.g. NF4) is drawn as vertical lines on the right.
    """
    if not groups:
        raise ValueError("weight_histograms needs at least one group of weights")
    gen = torch.Generator().manual_seed(seed)
    ref = blockwise_scale(torch.randn(reference_numel, generator=gen), blocksize)[0]
    fig = new_figure((13, 4.8))
    with mpl.rc_context(STYLE):
        left, right = fig.subplots(1, 2)
        z = np.linspace(-8, 8, 801)
        left.plot(z, np.exp(-z**2 / 2) / math.sqrt(2 * math.pi), color="0.45", lw=3, label="N(0, 1)")
        edges = np.linspace(-1, 1, bins + 1)
        right.hist(_np(ref), bins=edges, density=True, histtype="stepfilled", color="0.8",
                   label=f"N(0, 1), per block of {blocksize}")
        for i, (name, tensors) in enumerate(groups.items()):
            tensors = [tensors] if isinstance(tensors, torch.Tensor) else list(tensors)
            std = torch.cat([(W.detach().float() / W.detach().float().std()).reshape(-1)
                             for W in tensors])
            scaled = torch.cat([blockwise_scale(W.detach().float(), blocksize)[0][:W.numel()]
                                for W in tensors])
            colour = SEQUENCE[i % len(SEQUENCE)]
            left.hist(_np(std), bins=np.linspace(-8, 8, 161), density=True, histtype="step",
                      lw=2, color=colour, label=name)
            right.hist(_np(scaled), bins=edges, density=True, histtype="step", lw=2,
                       color=colour, label=name)
        if codebook is not None:
            for value in _codebook(codebook):
                right.axvline(value, color=PALETTE["nf4"], lw=0.8, alpha=0.6)
        left.set_yscale("log")
        left.set_ylim(1e-6, 1)
        left.set_title("Weights / std(W): the tails")
        left.set_xlabel("weight in standard deviations of its matrix")
        left.set_ylabel("density (log scale)")
        right.set_title(f"Weights / absmax of their block of {blocksize}")
        right.set_xlabel("normalised weight (NF4 levels as vertical lines)")
        right.set_ylabel("density")
        left.legend(loc="lower center", fontsize=10)
        right.legend(loc="upper left", fontsize=9)
        fig.tight_layout()
    return fig


def quantile_figure(p_pos, p_neg, codebook) -> Figure:
    """How NF4's levels come from N(0, 1) quantiles: the CDF (left), the 16 levels (right) (chapter 5).

    Side by side in ``plots.WIDE_STYLE``: legible in the book's column and on a slide.
    """
    p_pos, p_neg, c = _vector(p_pos, "p_pos"), _vector(p_neg, "p_neg"), _codebook(codebook)
    q_pos = _np(torch.special.ndtri(torch.as_tensor(p_pos)))
    q_neg = -_np(torch.special.ndtri(torch.as_tensor(p_neg)))
    fig = new_figure((12.6, 5.2))
    with mpl.rc_context(WIDE_STYLE):
        left, right = fig.subplots(1, 2)
        z = np.linspace(-2.6, 2.6, 400)
        cdf = 0.5 * (1 + np.vectorize(math.erf)(z / math.sqrt(2)))
        left.plot(z, cdf, color="black", lw=2, label="Φ(z), CDF of N(0, 1)")
        for q, p, colour, label in ((q_pos, p_pos, PALETTE["lora"], "8 positive quantiles"),
                                    (q_neg, 1 - p_neg, PALETTE["full"], "7 negative quantiles")):
            left.hlines(p, -2.6, q, color=colour, lw=0.8, alpha=0.6)
            left.vlines(q, 0, p, color=colour, lw=0.8, alpha=0.6)
            left.plot(q, p, "o", color=colour, label=label)
        left.plot([0], [0.5], "s", color=PALETTE["nf4"], ms=9, label="exact zero")
        left.set_xlim(-2.6, 2.6)
        left.set_xticks([-2, -1, 0, 1, 2])
        left.set_title("Step 1: quantiles of N(0, 1)")
        left.set_xlabel("z (standard deviations)")
        left.set_ylabel("probability Φ(z)")
        left.legend(loc="upper left", fontsize=WIDE_TEXT_PT - 1, handlelength=1.2)
        pdf_x = np.linspace(-1, 1, 400)
        scale = max(q_pos.max(), -q_neg.min())
        right.fill_between(pdf_x, np.exp(-(pdf_x * scale) ** 2 / 2), color="0.9")
        colours = [PALETTE["full"] if v < 0 else PALETTE["lora"] if v > 0 else PALETTE["nf4"]
                   for v in c]
        right.vlines(c, 0, 1, colors=colours, lw=2)
        for i, v in enumerate(c):  # two rows of indices: neighbours near zero do not overlap
            right.annotate(str(i), (v, 1.02 + 0.1 * (i % 2)), ha="center", fontsize=WIDE_TEXT_PT)
        right.set_ylim(0, 1.24)
        right.set_yticks([0, 0.5, 1])
        right.set_xticks([-1, -0.5, 0, 0.5, 1])
        right.grid(axis="x", visible=False)
        right.set_title("Step 2: divide by the largest: 16 levels", pad=4)
        right.set_xlabel("normalised value (code index above)")
        right.set_ylabel("N(0, 1) rescaled: density (grey)")
        fig.tight_layout()
    return fig


def codebook_figure(codebooks: Mapping[str, torch.Tensor]) -> Figure:
    """The 16 levels of several 4-bit formats on one number line each (chapter 5)."""
    if not codebooks:
        raise ValueError("codebook_figure needs at least one codebook")
    fig = new_figure((9, 1.5 + 0.8 * len(codebooks)))
    with mpl.rc_context(STYLE):
        ax = fig.subplots()
        for row, (name, code) in enumerate(codebooks.items()):
            values = np.unique(_codebook(code))  # Int4 repeats 1.0: 15 distinct levels
            y = len(codebooks) - 1 - row
            ax.hlines(y, -1, 1, color="0.7", lw=1)
            ax.plot(values, np.full(values.size, y), "|", ms=22, mew=3,
                    color=FORMAT_COLORS.get(name.lower(), SEQUENCE[row % len(SEQUENCE)]))
            ax.annotate(f"{values.size} levels", (1.05, y), va="center", fontsize=12)
        ax.set_yticks(range(len(codebooks)), list(codebooks)[::-1])
        ax.set_xlim(-1.08, 1.4)
        ax.set_ylim(-0.6, len(codebooks) - 0.4)
        ax.grid(axis="y", visible=False)
        ax.set_title("Where each 4-bit format puts its levels")
        ax.set_xlabel("normalised value (weight / block absmax)")
        fig.tight_layout()
    return fig


def rounding_figure(values, codebook) -> Figure:
    """Nearest code by midpoints: levels, the 15 midpoints, and each value's arrow to its code (chapter 5)."""
    x, c = _vector(values, "values"), _codebook(codebook)
    order = np.sort(c)
    mids = (order[:-1] + order[1:]) / 2
    idx = nearest_levels(x, c)
    fig = new_figure((13, 3.6))
    with mpl.rc_context(STYLE):
        ax = fig.subplots()
        ax.vlines(c, 0, 0.25, color=PALETTE["nf4"], lw=2.5, label="the 16 levels")
        ax.vlines(mids, -0.1, 1.1, color="0.55", lw=1, ls="--", label="the 15 midpoints")
        for i, v in enumerate(c):
            ax.annotate(str(i), (v, -0.22), ha="center", fontsize=9)
        for k, (v, j) in enumerate(zip(x, idx, strict=True)):
            y = 0.95 - 0.5 * (k % 2)
            ax.annotate("", (c[j], 0.27), (v, y),
                        arrowprops={"arrowstyle": "->", "color": PALETTE["lora"], "lw": 1.5})
            ax.plot(v, y, "o", color=PALETTE["lora"])
            ax.annotate(f"{v:+.2f}", (v, y + 0.06), ha="center", fontsize=9)
        ax.set_xlim(-1.05, 1.05)
        ax.set_ylim(-0.3, 1.45)
        ax.set_yticks([])
        ax.grid(False)
        ax.set_title("Nearest code: count the midpoints below the value")
        ax.set_xlabel("normalised value (code index under each level)")
        ax.legend(loc="upper center", fontsize=10, ncols=2)
        fig.tight_layout()
    return fig


def absmax_figure(x, blocksize: int, codebook) -> Figure:
    """One absmax for the whole vector against one per block: values (top), |error| (bottom) (chapter 5)."""
    x, c = _vector(x, "x"), _codebook(codebook)
    err_one = np.abs(blockwise_roundtrip(x, x.size, c) - x)
    err_blocks = np.abs(blockwise_roundtrip(x, blocksize, c) - x)
    pos = np.arange(x.size)
    fig = new_figure((9, 7))
    with mpl.rc_context(STYLE):
        top, bottom = fig.subplots(2, 1, sharex=True)
        top.bar(pos, x, color=PALETTE["full"], width=0.7)
        top.axhline(np.abs(x).max(), color="black", ls=":", lw=1.5, label="absmax of the whole vector")
        top.axhline(-np.abs(x).max(), color="black", ls=":", lw=1.5)
        for k, start in enumerate(range(0, x.size, blocksize)):
            am = np.abs(x[start:start + blocksize]).max()
            stop = min(start + blocksize, x.size)
            top.hlines([am, -am], start - 0.5, stop - 0.5, color=PALETTE["lora"], lw=2.5,
                       label="absmax of each block" if k == 0 else None)
            if start:
                for ax in (top, bottom):
                    ax.axvline(start - 0.5, color="0.5", lw=1)
        top.set_title(f"Blockwise absmax: blocks of {blocksize} values")
        top.set_ylabel("weight value")
        top.set_xlabel("position in the vector")
        top.legend(loc="lower right", fontsize=12)
        width = 0.4
        bottom.bar(pos - width / 2, err_one, width, color="black",
                   label=f"one absmax: mean {err_one.mean():.3f}")
        bottom.bar(pos + width / 2, err_blocks, width, color=PALETTE["lora"],
                   label=f"per block: mean {err_blocks.mean():.3f}")
        bottom.set_ylabel("|W - Q(W)|")
        bottom.set_xlabel("position in the vector")
        bottom.set_title("Rounding error of each value")
        bottom.legend(loc="upper right", fontsize=12)
        fig.tight_layout()
    return fig


def bits_figure(parts: Mapping[str, Mapping[str, float]]) -> Figure:
    """Stacked bits per weight: {layout: {component: bits}} as horizontal bars (chapter 5)."""
    if not parts:
        raise ValueError("bits_figure needs at least one layout")
    components = list(dict.fromkeys(k for p in parts.values() for k in p))
    rows = -(-len(components) // 2)  # the legend under the bars, two entries a row
    fig = new_figure((9, 1.9 + 0.9 * len(parts) + 0.35 * rows))
    with mpl.rc_context(STYLE):
        ax = fig.subplots()
        names = list(parts)[::-1]
        left = np.zeros(len(names))
        for j, comp in enumerate(components):
            vals = np.array([parts[n].get(comp, 0.0) for n in names])
            ax.barh(names, vals, left=left, color=SEQUENCE[j % len(SEQUENCE)], label=comp)
            left += vals
        for i, total in enumerate(left):
            ax.annotate(f"{total:.3f} bits", (total + 0.03, i), va="center", fontsize=12)
        ax.set_xlim(0, left.max() * 1.18)
        ax.set_title("Bits stored per weight, measured from the tensors")
        ax.set_xlabel("bits per weight")
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, 0), borderaxespad=3.6,  # under the label
                  ncols=2, fontsize=12, frameon=False)
        ax.grid(axis="y", visible=False)
        fig.tight_layout()
    return fig


def error_figure(tables: Mapping[str, Sequence[Mapping[str, float]]], value: str = "mae_over_std",
                 anchors: Mapping[str, Mapping[int, float]] | None = None,
                 ylabel: str = "mean |W - Q(W)| / std(W)") -> Figure:
    """Error against blocksize, one panel per data source, one line per format (chapter 5).

    ``tables`` maps a panel title to ``compare.error_table`` rows; ``anchors`` ({quant_type:
    {blocksize: error}}, e.g. bitsandbytes' published figures) are marked on the first panel.
    Up to three panels side by side (more wrap, three a row), one error scale, one legend under
    them: ``plots.WIDE_STYLE``, legible in the book's column and on a slide.
    """
    if not tables:
        raise ValueError("error_figure needs at least one table")
    cols = min(3, len(tables))
    n_rows = -(-len(tables) // cols)
    fig = new_figure((4.2 * cols + 0.6, 4.3 * n_rows + 0.7))
    with mpl.rc_context(WIDE_STYLE):
        axes, spare = panel_grid(fig, len(tables), cols, sharey=True)
        for ax in spare:
            ax.remove()
        for k, (ax, (title, rows)) in enumerate(zip(axes, tables.items(), strict=True)):
            for qt in dict.fromkeys(r["quant_type"] for r in rows):
                pts = sorted((r["blocksize"], r[value]) for r in rows if r["quant_type"] == qt)
                ax.plot(*zip(*pts, strict=True), "o-", color=FORMAT_COLORS.get(qt),
                        label=FORMAT_NAMES.get(qt, qt))
            if anchors and k == 0:
                for i, points in enumerate(anchors.values()):
                    ax.plot(list(points), list(points.values()), "x", color="black", ms=11, mew=2.5,
                            label="bitsandbytes' tests" if i == 0 else None)
            ax.set_xscale("log", base=2)
            sizes = sorted({r["blocksize"] for r in rows})
            ticks = sizes[1::2] if len(sizes) > 4 else sizes  # every other one: each legible
            ax.set_xticks(ticks, [str(b) for b in ticks])
            ax.minorticks_off()
            ax.set_title(title, fontsize=WIDE_TEXT_PT)
            ax.set_xlabel("blocksize (values / absmax)")
            if k % cols == 0:
                ax.set_ylabel(ylabel)
        handles, labels = axes[0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="lower center", ncols=len(labels), frameon=False,
                   fontsize=WIDE_TEXT_PT)
        fig.tight_layout(rect=(0, 0.55 / fig.get_size_inches()[1], 1, 1))
    return fig


def format_figure(rows: Sequence[Mapping[str, Any]], metrics: Mapping[str, str]) -> Figure:
    """Bars per storage format: model size, then each metric ({row key: axis label}) (chapter 5).

    Up to three panels side by side (more wrap, three a row) in ``plots.WIDE_STYLE``: legible
    in the book's column and on a slide.
    """
    if not rows:
        raise ValueError("format_figure needs at least one row")
    names = [r["format"] for r in rows]
    colours = [FORMAT_COLORS.get(n, "0.5") for n in names]
    panels = {"model_bytes": "model size (MB)", **metrics}
    cols = min(3, len(panels))
    n_rows = -(-len(panels) // cols)
    fig = new_figure((4.2 * cols + 0.4, 4.6 * n_rows + 0.4))
    with mpl.rc_context(WIDE_STYLE):
        axes, spare = panel_grid(fig, len(panels), cols)
        for ax, (key, label) in zip(axes, panels.items(), strict=True):
            vals = [r[key] / 1e6 if key == "model_bytes" else r[key] for r in rows]
            bars = ax.bar(names, vals, color=colours, edgecolor="black",
                          hatch=["//" if n == "nf4+dq" else "" for n in names])
            for b, v in zip(bars, vals, strict=True):
                ax.annotate(f"{v:.3g}", (b.get_x() + b.get_width() / 2, b.get_height()),
                            ha="center", va="bottom", fontsize=WIDE_TEXT_PT)
            ax.margins(y=0.12)  # room for the value over the tallest bar (bars keep 0 at the bottom)
            ax.set_title(label.split(" (")[0])
            ax.set_ylabel(label)
            ax.set_xlabel("storage format of W0")
            ax.tick_params(axis="x", rotation=40)
            for tick in ax.get_xticklabels():  # anchored at the bar: neighbours do not overlap
                tick.set(ha="right", rotation_mode="anchor")
            ax.grid(axis="x", visible=False)
        for ax in spare:
            ax.remove()
        fig.tight_layout()
    return fig


def snapping_frames(block, codebook, n_frames: int = 12) -> list[Frame]:
    """Frames of one block's values moving to their nearest level, t = 0..1 (chapter 5).

    Frame keys: ``t`` (0 = the block / absmax, 1 = the levels), ``values`` (positions at t),
    ``scaled`` (block / absmax), ``target`` (nearest level of each value), ``codes`` (their
    indices), ``absmax``, ``mean_abs_error`` (of the positions at t against ``scaled``).
    """
    x, c = _vector(block, "block"), _codebook(codebook)
    if isinstance(n_frames, bool) or not isinstance(n_frames, int) or n_frames < 2:
        raise ValueError(f"n_frames must be an int >= 2, got {n_frames!r}")
    absmax = float(np.abs(x).max())
    if absmax == 0:
        raise ValueError("the block is all zeros: nothing to scale")
    scaled = x / absmax
    codes = nearest_levels(scaled, c)
    target = c[codes]
    frames = []
    for t in np.linspace(0.0, 1.0, n_frames):
        ease = t * t * (3 - 2 * t)  # smoothstep: start and stop gently
        values = (1 - ease) * scaled + ease * target
        frames.append({"t": float(t), "values": values, "scaled": scaled, "target": target,
                       "codes": codes, "absmax": absmax,
                       "mean_abs_error": float(np.abs(values - scaled).mean())})
    return frames


def snapping_animation(block, codebook, n_frames: int = 12, interval_ms: int = 450,
                       dpi: int = 80, title: str = "One block snapping to the 16 NF4 levels"):
    """An animation of ``snapping_frames``; show it with ``HTML(anim.to_jshtml())`` (chapter 5)."""
    frames = snapping_frames(block, codebook, n_frames)
    c = _codebook(codebook)
    first = frames[0]
    pos = np.arange(first["values"].size)
    with mpl.rc_context(STYLE):
        fig = Figure(figsize=(10, 5.2), dpi=dpi)
        FigureCanvasAgg(fig)
        ax = fig.add_subplot()
        for v in np.unique(c):
            ax.axhline(v, color=PALETTE["nf4"], lw=0.9, alpha=0.7)
        ax.vlines(pos, first["scaled"], first["target"], color="0.8", lw=1)
        dots = ax.scatter(pos, first["values"], s=28, c=first["codes"], cmap="viridis",
                          vmin=0, vmax=15, zorder=3)
        ax.set_xlim(-1, pos.size)
        ax.set_ylim(-1.32, 1.08)  # room below -1 for the caption, clear of the lowest level
        ax.set_yticks([-1, -0.5, 0, 0.5, 1])
        ax.set_title(title, fontsize=15)
        ax.set_xlabel("position in the block", fontsize=13)
        ax.set_ylabel("weight / absmax (lines: the 16 levels)", fontsize=12)
        caption = ax.text(0.01, 0.02, "", transform=ax.transAxes, fontsize=12,
                          bbox={"facecolor": "white", "alpha": 0.85, "edgecolor": "0.7"})
        fig.tight_layout()

    def update(i: int):
        f = frames[i]
        dots.set_offsets(np.column_stack([pos, f["values"]]))
        caption.set_text(f"t = {f['t']:.2f}   absmax = {f['absmax']:.4f}   "
                         f"mean |moved| = {f['mean_abs_error']:.4f}")
        return dots, caption

    update(0)
    anim = animation.FuncAnimation(fig, update, frames=len(frames), interval=interval_ms, blit=False)
    anim._lorabook_frames = frames
    return anim
