"""Animations for the talk: W = W0 + (alpha/r) B A built up; delta_W by truncated SVD (chapter 2).

Each animation is built from a list of frames computed by a pure function
(``decomposition_frames``, ``svd_frames``), which tests check; the animation keeps them as
``anim._lorabook_frames``. Large matrices are shown as their top-left ``max_size`` x ``max_size``
block: cropping commutes with the product, (B A)[:m, :n] = B[:m] A[:, :n], so the block shown is
exactly the block of the full product.
Colour scales are fixed across frames. Show in a notebook with ``HTML(anim.to_jshtml())``; save
for slides with ``save_animation``. Nothing here touches pyplot's global state.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib as mpl
import numpy as np
import torch
from matplotlib import animation
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from lorabook.analysis import relative_error
from lorabook.viz.plots import DIVERGING, PALETTE, STYLE

TITLE, LABEL, TICK = 24, 21, 20  # pt: the 17-inch frames show at ~0.4 scale in the page: >= 8 pt (export checks)
Frame = dict[str, Any]
Matrix = torch.Tensor | np.ndarray


def _matrix(M: Matrix, name: str) -> np.ndarray:
    array = M.detach().to("cpu", torch.float64).numpy() if isinstance(M, torch.Tensor) \
        else np.asarray(M, dtype=np.float64)
    if array.ndim != 2:
        raise ValueError(f"{name} must be a 2-D matrix, got shape {array.shape}")
    return array


def _check_positive(value: int, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    return value


def _block_note(shape: tuple[int, int], rows: int, cols: int) -> str:
    if (rows, cols) == tuple(shape):
        return f"full {rows} × {cols} matrix"
    return f"top-left {rows} × {cols} block of {shape[0]} × {shape[1]}"


def decomposition_frames(W0: Matrix, A: Matrix, B: Matrix, scaling: float = 1.0,
                         blend_frames: int = 8, max_size: int = 64,
                         max_build: int = 16) -> list[Frame]:
    """Frames: W0, then B A one rank-1 term at a time, then W = W0 + t scaling B A (chapter 2).

    Frame keys: "stage" ("W0", "build" or "add"), "caption", "rank" (terms of B A shown), "t",
    and the cropped arrays "W0", "B", "A" (unused components NaN), "delta", "W". The last frame
    has t = 1: its "W" is the block of W0 + scaling * B @ A.
    """
    W0, A, B = _matrix(W0, "W0"), _matrix(A, "A"), _matrix(B, "B")
    out_f, in_f = W0.shape
    r = A.shape[0]
    if A.shape != (r, in_f) or B.shape != (out_f, r):
        raise ValueError(f"expected W0 (out, in), A (r, in), B (out, r); got W0 {W0.shape}, "
                         f"A {A.shape}, B {B.shape}")
    blend_frames, max_size = _check_positive(blend_frames, "blend_frames"), _check_positive(
        max_size, "max_size")
    rows, cols = min(out_f, max_size), min(in_f, max_size)
    W0c, Ac, Bc = W0[:rows, :cols], A[:, :cols], B[:rows]  # (rows, cols), (r, cols), (rows, r)
    delta = scaling * Bc @ Ac  # (rows, cols) = block of scaling * B @ A
    note = _block_note(W0.shape, rows, cols)
    blank = np.full_like(delta, np.nan)

    def frame(stage, caption, k, t, current_delta, W):
        Bk, Ak = np.full_like(Bc, np.nan), np.full_like(Ac, np.nan)
        Bk[:, :k], Ak[:k] = Bc[:, :k], Ac[:k]
        return {"stage": stage, "caption": caption, "rank": k, "t": t, "W0": W0c, "B": Bk,
                "A": Ak, "delta": current_delta, "W": W, "block": note}

    frames = [frame("W0", "W0: the frozen pre-trained weight", 0, 0.0, blank, W0c)]
    build = np.unique(np.linspace(1, r, min(r, _check_positive(max_build, "max_build")))
                      .round().astype(int))
    for k in build:
        partial = scaling * Bc[:, :k] @ Ac[:k]  # sum of the first k rank-1 terms b_i a_i^T
        frames.append(frame("build", f"B A = sum of rank-1 terms b_i a_iᵀ: {k} of r = {r}",
                            int(k), 0.0, partial, W0c))
    for t in np.linspace(0, 1, blend_frames + 1)[1:]:
        frames.append(frame("add", f"W = W0 + {t:.2f} × scaling · B A  (scaling = {scaling:g})",
                            r, float(t), delta, W0c + t * delta))
    return frames


def _halfrange(frames: list[Frame], *keys: str) -> float:
    values = [np.nanmax(np.abs(f[k])) for f in frames for k in keys
              if np.isfinite(f[k]).any()]
    top = max(values, default=0.0)
    return float(top) if top > 0 else 1.0


def _new_figure(figsize: tuple[float, float]) -> Figure:
    fig = Figure(figsize=figsize, dpi=100)
    FigureCanvasAgg(fig)  # a canvas of its own: no pyplot, no global figure manager
    return fig


def decomposition_animation(W0: Matrix, A: Matrix, B: Matrix, scaling: float = 1.0,
                            blend_frames: int = 8, max_size: int = 64,
                            interval_ms: int = 700) -> animation.FuncAnimation:
    """Animate W0, B A forming, and W = W0 + scaling · B A as heatmaps (chapter 2)."""
    frames = decomposition_frames(W0, A, B, scaling, blend_frames, max_size)
    first, last = frames[0], frames[-1]
    rows, cols = first["W0"].shape
    r = first["A"].shape[0]
    lim = {"W": _halfrange(frames, "W0", "W"), "B": _halfrange(frames, "B"),
           "A": _halfrange(frames, "A"), "delta": _halfrange(frames, "delta")}
    with mpl.rc_context(STYLE):
        fig = _new_figure((17, 8))
        side = max(r, rows // 6), max(r, cols // 6)  # A's height, B's width on screen
        grid = fig.add_gridspec(2, 4, height_ratios=[side[0], rows],
                                width_ratios=[cols, side[1], cols, cols],
                                left=0.05, right=0.91, top=0.84, bottom=0.09, wspace=0.62)
        axes = {"W0": fig.add_subplot(grid[1, 0]), "B": fig.add_subplot(grid[1, 1]),
                "A": fig.add_subplot(grid[0, 2]), "delta": fig.add_subplot(grid[1, 2]),
                "W": fig.add_subplot(grid[1, 3])}
        titles = {"W0": "W0 (frozen)", "B": "B (out × r)", "A": "A (r × in)",
                  "delta": "scaling · B A", "W": "W = W0 + scaling · B A"}
        images = {}
        for key, ax in axes.items():
            scale = lim["W" if key in ("W0", "W") else key]
            images[key] = ax.imshow(first[key], cmap=DIVERGING, vmin=-scale, vmax=scale,
                                    aspect="auto", interpolation="nearest")
            ax.set_title(titles[key], fontsize=LABEL, pad=6)
            ax.tick_params(labelsize=TICK)
            ax.grid(False)
        axes["W0"].set_xlabel("input feature (index)", fontsize=LABEL)
        axes["W0"].set_ylabel("output feature (index)", fontsize=LABEL)
        axes["B"].set_xlabel("rank component", fontsize=LABEL)
        axes["A"].set_ylabel("rank", fontsize=TICK)
        ends = [0, r - 1] if r > 1 else [0]  # whole components only: the narrow panels have room for two
        axes["B"].set_xticks(ends)
        axes["A"].set_yticks(ends)
        for key in ("B", "delta", "W"):  # rows are W0's rows: its labels serve all
            axes[key].tick_params(labelleft=False)
        axes["A"].tick_params(labelbottom=False)  # columns are the panel below's
        bars = {}
        for key, label in (("W", "weight value (W0 and W)"), ("delta", "")):
            bars[key] = fig.colorbar(images[key], ax=axes[key], fraction=0.05, pad=0.02)
            bars[key].ax.tick_params(labelsize=TICK)
            bars[key].set_label(label, fontsize=TICK)
        pos = {key: ax.get_position() for key, ax in axes.items()}
        middle = (pos["W0"].y0 + pos["W0"].y1) / 2
        after_bar = bars["delta"].ax.get_position().x1 + 0.07  # past its tick labels
        fig.text((pos["W0"].x1 + pos["B"].x0) / 2, middle, "+", fontsize=34, ha="center",
                 va="center")
        fig.text((after_bar + pos["W"].x0) / 2, middle, "=", fontsize=34, ha="center",
                 va="center")
        title = fig.suptitle(first["caption"], fontsize=TITLE, y=0.97)
        fig.text(0.5, 0.9, f"LoRA: W = W0 + (alpha/r) B A, r = {r}; showing the "
                 f"{last['block']}", ha="center", fontsize=LABEL, color=PALETTE["random"])

    def update(i: int):
        for key, image in images.items():
            image.set_data(frames[i][key])
        title.set_text(frames[i]["caption"])
        return [*images.values(), title]

    anim = animation.FuncAnimation(fig, update, frames=len(frames), interval=interval_ms,
                                   blit=False)
    anim._lorabook_frames = frames
    return anim


def _default_ranks(k: int) -> list[int]:
    ranks = [2**p for p in range(0, k.bit_length()) if 2**p < k]
    return [*ranks, k]  # 1, 2, 4, ..., then full rank


def svd_frames(delta_W: Matrix, ranks: Sequence[int] | None = None,
               max_size: int = 64) -> list[Frame]:
    """Frames of delta_W's best rank-r approximations with their relative errors (chapter 2).

    Frame keys: "rank", "approx" (cropped), "target" (cropped delta_W), "error" (relative
    Frobenius error on the full matrix), "energy" (fraction of ||delta_W||_F^2 kept). The default
    ranks are 1, 2, 4, ... and full rank, where "approx" equals delta_W.
    """
    M = _matrix(delta_W, "delta_W")
    k = min(M.shape)
    ranks = _default_ranks(k) if ranks is None else [_check_positive(r, "rank") for r in ranks]
    if any(r > k for r in ranks) or any(b <= a for a, b in zip(ranks, ranks[1:], strict=False)):
        raise ValueError(f"ranks must increase strictly within 1..{k}, got {list(ranks)}")
    max_size = _check_positive(max_size, "max_size")
    rows, cols = min(M.shape[0], max_size), min(M.shape[1], max_size)
    U, S, Vh = np.linalg.svd(M, full_matrices=False)  # (m, k), (k,), (k, n)
    total = float((S**2).sum()) or 1.0
    note = _block_note(M.shape, rows, cols)
    frames = []
    for r in ranks:
        approx = (U[:, :r] * S[:r]) @ Vh[:r]  # (m, n)
        frames.append({"rank": r, "approx": approx[:rows, :cols], "target": M[:rows, :cols],
                       "error": relative_error(torch.from_numpy(M), torch.from_numpy(approx)),
                       "energy": float((S[:r] ** 2).sum()) / total, "block": note})
    return frames


def _spaced_ticks(ranks: Sequence[int], ratio: float = 3.5) -> list[int]:
    """Ranks to label on a log axis, each at least ``ratio`` times the previous; ends at the last."""
    shown: list[int] = []
    for r in ranks:
        if not shown or r / shown[-1] >= ratio:
            shown.append(r)
    if ranks and shown[-1] != ranks[-1]:
        if ranks[-1] / shown[-1] < 3 and len(shown) > 1:
            shown[-1] = ranks[-1]
        else:
            shown.append(ranks[-1])
    return shown


def svd_approximation_animation(delta_W: Matrix, ranks: Sequence[int] | None = None,
                                max_size: int = 64, interval_ms: int = 900
                                ) -> animation.FuncAnimation:
    """Animate delta_W approximated at rank 1, 2, 4, ... with its error curve (chapter 2)."""
    frames = svd_frames(delta_W, ranks, max_size)
    ranks = [f["rank"] for f in frames]
    errors = [f["error"] for f in frames]
    scale = _halfrange(frames, "target")
    with mpl.rc_context(STYLE):
        fig = _new_figure((17, 6.5))
        grid = fig.add_gridspec(1, 3, width_ratios=[1, 1, 1.2], left=0.06, right=0.98,
                                top=0.80, bottom=0.15, wspace=0.7)
        ax_target, ax_approx, ax_err = (fig.add_subplot(grid[0, i]) for i in range(3))
        ax_target.imshow(frames[0]["target"], cmap=DIVERGING, vmin=-scale, vmax=scale,
                         aspect="auto", interpolation="nearest")
        image = ax_approx.imshow(frames[0]["approx"], cmap=DIVERGING, vmin=-scale, vmax=scale,
                                 aspect="auto", interpolation="nearest")
        ax_target.set_title("delta_W", fontsize=LABEL)
        for ax in (ax_target, ax_approx):
            ax.set_xlabel("input feature (index)", fontsize=LABEL)
            ax.tick_params(labelsize=TICK)
            ax.grid(False)
        ax_target.set_ylabel("output feature (index)", fontsize=LABEL)
        bar = fig.colorbar(image, ax=ax_approx, fraction=0.05, pad=0.02)
        bar.ax.tick_params(labelsize=TICK)
        bar.set_label("update value", fontsize=TICK)
        ax_err.plot(ranks, errors, color=PALETTE["random"], lw=1.5, ls="--", marker="o", ms=5)
        (line,) = ax_err.plot(ranks[:1], errors[:1], color=PALETTE["lora"], lw=3, marker="o",
                              ms=9)
        ax_err.set_xscale("log", base=2)
        shown = _spaced_ticks(ranks)
        ax_err.set_xticks(shown, [str(r) for r in shown])
        ax_err.minorticks_off()
        ax_err.set_ylim(-0.03, 1.03)
        ax_err.set_xlabel("rank r (log scale)", fontsize=LABEL)
        ax_err.set_ylabel("‖ΔW − ΔW_r‖_F / ‖ΔW‖_F", fontsize=LABEL)
        ax_err.set_title("error at rank r", fontsize=LABEL)
        ax_err.tick_params(labelsize=TICK)
        title = fig.suptitle("", fontsize=TITLE, y=0.97)
        fig.text(0.5, 0.875, f"truncated SVD of delta_W; heatmaps show the {frames[0]['block']}",
                 ha="center", fontsize=LABEL, color=PALETTE["random"])

    def update(i: int):
        f = frames[i]
        image.set_data(f["approx"])
        ax_approx.set_title(f"best rank-{f['rank']} approximation", fontsize=LABEL)
        line.set_data(ranks[: i + 1], errors[: i + 1])
        title.set_text(f"rank {f['rank']}: relative error {f['error']:.1%}, "
                       f"{f['energy']:.1%} of ‖ΔW‖² kept")
        return [image, line, title]

    update(0)
    anim = animation.FuncAnimation(fig, update, frames=len(frames), interval=interval_ms,
                                   blit=False)
    anim._lorabook_frames = frames
    return anim


def to_jshtml(anim: animation.Animation, dpi: int = 80) -> str:
    """The animation as self-contained HTML + JavaScript, frames at ``dpi`` (chapter 2).

    ``anim.to_jshtml()`` renders at ``savefig.dpi`` (150 in the book's style); 80 dpi keeps a
    12-frame animation near 1-2 MB in the page. Show it with ``IPython.display.HTML``.
    """
    dpi = _check_positive(dpi, "dpi")
    with mpl.rc_context({"savefig.dpi": dpi}):
        return offline_jshtml(anim.to_jshtml())


# matplotlib's player loads Font Awesome 4.4 from a CDN for its nine button icons; offline the
# buttons would be blank. The same icons as plain Unicode characters need no font download.
_FA_LINK = re.compile(r"<link[^>]*font-awesome[^>]*>\s*", re.IGNORECASE)
_FA_ICON = re.compile(r'<i class="fa (fa-[a-z-]+)( fa-flip-horizontal)?"></i>')
_ICONS = {"fa-minus": "−", "fa-plus": "+", "fa-fast-backward": "⏮", "fa-step-backward": "⏴︎❙",
          "fa-play": "▶︎", "fa-pause": "❚❚", "fa-step-forward": "❙⏵︎", "fa-fast-forward": "⏭"}


def offline_jshtml(page: str) -> str:
    """matplotlib's JS player HTML with no network load: icons as Unicode, no Font Awesome (chapter 2)."""
    if not isinstance(page, str):
        raise TypeError(f"page must be the str of to_jshtml(), got {type(page).__name__}")

    def icon(match: re.Match) -> str:
        glyph = _ICONS.get(match.group(1), "•")
        if match.group(2):  # the "play backwards" button
            glyph = "◀︎"
        return f'<span class="anim-icon" aria-hidden="true">{glyph}</span>'

    return _FA_ICON.sub(icon, _FA_LINK.sub("", page))


def save_animation(anim: animation.Animation, path: str | os.PathLike, fps: float = 2,
                   dpi: int = 100) -> Path:
    """Save an animation as .gif (pillow) or .mp4 (needs ffmpeg) for slides (chapter 2)."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".gif":
        writer = animation.PillowWriter(fps=fps)
    elif suffix == ".mp4":
        if not animation.writers.is_available("ffmpeg"):
            raise RuntimeError("saving .mp4 needs the ffmpeg program on PATH; install it, "
                               "or save a .gif instead")
        writer = animation.FFMpegWriter(fps=fps)
    else:
        raise ValueError(f"save_animation writes .gif or .mp4, got {path.name!r}")
    anim.save(str(path), writer=writer, dpi=dpi)
    return path
