"""Figures and the rank animation of chapter 4 (LoRA performance), from sweep records.

The figure functions take the records of ``lorabook.sweep`` (dicts with "method", "targets",
"r", "scaling", "base", "seed", "score", ...), average over seeds and return a ``Figure`` in the
book's style: titled, axes labelled with units, LoRA configurations by target set, full
fine-tuning as a horizontal line. The animation is built from frames computed by the pure
function ``rank_frames``, which the tests check; nothing here calls ``plt.show()``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import matplotlib as mpl
import matplotlib.ticker as mticker
import numpy as np
import torch
from matplotlib import animation
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from lorabook.results import summarize
from lorabook.viz.plots import (
    PALETTE,
    SEQUENCE,
    STYLE,
    WIDE_STYLE,
    WIDE_TEXT_PT,
    legend_in,
    new_figure,
    panel_grid,
)

TARGET_COLORS = {"q": SEQUENCE[5], "qv": PALETTE["lora"], "attn": SEQUENCE[2], "all": SEQUENCE[4]}
TARGET_NAMES = {"q": "W_q", "qv": "W_q, W_v", "attn": "attention (q, k, v, o)",
                "all": "all linear layers"}
_DASHES = ["-", "--", ":", "-."]
Frame = dict[str, Any]


def _groups(records: Sequence[dict], metric: str) -> tuple[dict, Any]:
    """{(targets, scaling, base): summary rows sorted by r}, and full fine-tuning's summary row."""
    records = list(records)
    if not records:
        raise ValueError("no records to plot")
    lora = [r for r in records if r.get("method") == "lora"]
    full = [r for r in records if r.get("method") == "full"]
    if not lora:
        raise ValueError("the records hold no LoRA run")
    table = summarize(lora, by=("targets", "scaling", "base", "r"), metrics=(metric,)).reset_index()
    groups = {}
    for key, rows in table.groupby(["targets", "scaling", "base"], sort=False):
        groups[key] = rows.sort_values("r")
    ref = summarize(full, by=("method",), metrics=(metric,)).iloc[0] if full else None
    return groups, ref


def _group_style(key: tuple, keys: list[tuple]) -> dict:
    targets, scaling, base = key
    variants = sorted({(s, b) for _, s, b in keys})
    label = TARGET_NAMES.get(targets, targets)
    extras = [x for x in (scaling if scaling != "lora" else "", base if base != "float" else "") if x]
    if extras:
        label += f" ({', '.join(extras)})"
    return {"color": TARGET_COLORS.get(targets, PALETTE["random"]), "label": label,
            "ls": _DASHES[variants.index((scaling, base)) % len(_DASHES)]}


def _log2_ranks(ax, ranks: Sequence[int]) -> None:
    ax.set_xscale("log", base=2)
    ax.set_xticks(list(ranks), [str(r) for r in ranks])
    ax.minorticks_off()


def _full_line(ax, ref, metric: str, unit: float = 1.0) -> None:
    if ref is None:
        return
    mean, std, n = ref[f"{metric}_mean"] * unit, ref[f"{metric}_std"] * unit, int(ref["n"])
    ax.axhline(mean, color=PALETTE["full"], lw=2.5,
               label=f"full fine-tuning ({n} seed{'s' if n > 1 else ''})")
    if std == std and std > 0:  # NaN for one seed: no band
        ax.axhspan(mean - std, mean + std, color=PALETTE["full"], alpha=0.12, lw=0)


def _legend_under(ax) -> None:
    """The legend under the x label, two entries a row: error bars and labels stay uncovered."""
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, 0), borderaxespad=4, ncols=2, fontsize=11,
              frameon=False)


def rank_score_figure(records: Sequence[dict], title: str, ylabel: str,
                      metric: str = "score") -> Figure:
    """Score against r per target set, mean and std over seeds, full FT as a line (chapter 4)."""
    groups, ref = _groups(records, metric)
    keys = list(groups)
    fig = new_figure((9, 6.5))  # 11 pt legend: >= plots.MIN_TEXT_PT at the page's width
    with mpl.rc_context(STYLE):
        ax = fig.add_subplot()
        ranks = sorted({int(r) for rows in groups.values() for r in rows["r"]})
        seeds = {key: sorted({int(n) for n in rows["n"]}) for key, rows in groups.items()}
        uneven = len({n for ns in seeds.values() for n in ns}) > 1  # some lines have fewer seeds
        for k, (key, rows) in enumerate(groups.items()):
            style = _group_style(key, keys)
            if uneven:
                style["label"] += f" ({'-'.join(map(str, seeds[key]))} seed{'s' if max(seeds[key]) > 1 else ''})"
            shift = 2 ** (0.05 * (k - (len(keys) - 1) / 2))  # side by side, not on top
            ax.errorbar(rows["r"] * shift, rows[f"{metric}_mean"],
                        yerr=rows[f"{metric}_std"].fillna(0), marker="o", ms=7, capsize=4,
                        color=style["color"], ls=style["ls"], label=style["label"])
        _full_line(ax, ref, metric)
        _log2_ranks(ax, ranks)
        n_seeds = max(max(ns) for ns in seeds.values())
        spread = " (mean ± std over the seeds in the legend)" if uneven else (
            f" (mean ± std over {n_seeds} seeds)" if n_seeds > 1 else "")
        ax.set(xlabel="LoRA rank r (log scale)", ylabel=ylabel, title=title + spread)
        _legend_under(ax)
        fig.tight_layout()
    return fig


def params_score_figure(records: Sequence[dict], title: str, ylabel: str,
                        metric: str = "score") -> Figure:
    """Score against trainable parameters, one point per (target set, r), labelled by r (chapter 4)."""
    groups, ref = _groups(records, metric)
    params = {}
    for rec in records:
        if rec.get("method") == "lora":
            params[(rec["targets"], rec["scaling"], rec["base"], rec["r"])] = rec["trainable"]
    keys = list(groups)
    fig = new_figure((9, 6.5))  # 11 pt labels: >= plots.MIN_TEXT_PT at the page's width
    with mpl.rc_context(STYLE):
        ax = fig.add_subplot()
        for key, rows in groups.items():
            style = _group_style(key, keys)
            x = [params[(*key, r)] for r in rows["r"]]
            ax.errorbar(x, rows[f"{metric}_mean"], yerr=rows[f"{metric}_std"].fillna(0),
                        marker="o", ms=7, capsize=4, color=style["color"], ls=style["ls"],
                        label=style["label"])
            for xi, yi, r in zip(x, rows[f"{metric}_mean"], rows["r"], strict=True):
                ax.annotate(f"r={int(r)}", (xi, yi), textcoords="offset points", xytext=(4, 6),
                            fontsize=11, color=style["color"])
        _full_line(ax, ref, metric)
        ax.set_xscale("log")
        ax.set(xlabel="trainable parameters (count, log scale)", ylabel=ylabel, title=title)
        _legend_under(ax)
        fig.tight_layout()
    return fig


def cost_figure(records: Sequence[dict], title: str) -> Figure:
    """Trainable parameters, stored adapter MiB and seconds per step against r (chapter 4)."""
    panels = (("trainable", 1.0, "trainable parameters (count), log scale"),
              ("adapter_bytes", 2.0**-20, "stored per task (MiB), log scale"),
              ("step_s", 1.0, "median time per step (s)"))
    fig = new_figure((11.2, 8.6))  # 2 x 2, the legend in the fourth cell: legible at page width
    with mpl.rc_context(STYLE):
        axes, spare = panel_grid(fig, len(panels))
        for ax, (metric, unit, ylabel) in zip(axes, panels, strict=True):
            groups, ref = _groups(records, metric)
            keys = list(groups)
            for key, rows in groups.items():
                style = _group_style(key, keys)
                ax.plot(rows["r"], rows[f"{metric}_mean"] * unit, marker="o", color=style["color"],
                        ls=style["ls"], label=style["label"])
            _full_line(ax, ref, metric, unit)
            _log2_ranks(ax, sorted({int(r) for rows in groups.values() for r in rows["r"]}))
            if metric == "step_s":  # a time: linear, from zero, so that flat looks flat
                ax.set_ylim(0, ax.get_ylim()[1] * 1.1)
            else:  # counts and bytes span orders of magnitude
                ax.set_yscale("log")
            ax.set(xlabel="LoRA rank r (log scale)", ylabel=ylabel)
        legend_in(fig, axes[0], spare)
        fig.suptitle(title)
        fig.tight_layout()
    return fig


def _np(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().to("cpu", torch.float64).numpy()
    return np.asarray(x, dtype=np.float64)


def subspace_heatmaps(grids: Mapping[str, Any], axis_labels: Mapping[str, tuple[str, str]],
                      title: str) -> Figure:
    """Heatmaps of phi(A1, A2, i, j) in [0, 1], one panel per grid (the paper's Figures 3, 4) (chapter 4).

    ``axis_labels[name]`` = (label of i, the rows; label of j, the columns).
    """
    if not grids:
        raise ValueError("subspace_heatmaps needs at least one grid")
    missing = [name for name in grids if name not in axis_labels]
    if missing:
        raise ValueError(f"axis_labels lacks {missing}")
    cols = min(3, len(grids))  # side by side, three a row: legible in the book and on a slide
    rows = -(-len(grids) // cols)
    fig = new_figure((3.8 * cols + 1.5, 4.3 * rows + 0.8))
    with mpl.rc_context(WIDE_STYLE):
        axes, spare = panel_grid(fig, len(grids), cols)
        for ax in spare:
            ax.remove()
        top = 1 - 0.8 / fig.get_size_inches()[1]  # room for the title
        fig.subplots_adjust(left=0.07, right=0.88, bottom=0.16 / rows, top=top, hspace=0.5,
                            wspace=0.4)
        for ax, (name, grid) in zip(axes, grids.items(), strict=True):
            g = _np(grid)
            if g.ndim != 2:
                raise ValueError(f"grid {name!r} must be 2-D, got shape {g.shape}")
            image = ax.imshow(g, cmap="viridis", vmin=0, vmax=1, aspect="auto",
                              origin="lower", interpolation="nearest",
                              extent=(0.5, g.shape[1] + 0.5, 0.5, g.shape[0] + 0.5))
            ax.set_title(name, fontsize=WIDE_TEXT_PT)
            ax.set_ylabel(axis_labels[name][0])
            ax.set_xlabel(axis_labels[name][1])
            ax.xaxis.set_major_locator(mticker.MaxNLocator(4, integer=True))
            ax.yaxis.set_major_locator(mticker.MaxNLocator(4, integer=True))
            ax.grid(False)
        bar = fig.colorbar(image, cax=fig.add_axes((0.9, 0.16 / rows, 0.015, top - 0.16 / rows)))
        bar.set_label("φ(i, j), subspace similarity")
        fig.suptitle(title)
    return fig


def rank_frames(ranks: Sequence[int], scores: Sequence[float], spectra: Sequence[Any],
                full_score: float | None = None) -> list[Frame]:
    """One frame per r: scores so far, and the singular values of the learned delta_W (chapter 4).

    ``spectra[k]`` are the singular values of delta_W = scaling * B A at rank ``ranks[k]``
    (any length: only the top ``ranks[k]`` can be non-zero; those are kept). Frame keys:
    "rank", "score", "ranks" and "scores" (up to this frame), "sigma" (the top-r singular
    values), "top1" (share of ||delta_W||_F^2 in the first direction), "caption".
    """
    ranks, scores = [int(r) for r in ranks], [float(s) for s in scores]
    if not (len(ranks) == len(scores) == len(spectra)) or not ranks:
        raise ValueError(f"ranks, scores and spectra must have the same non-zero length, got "
                         f"{len(ranks)}, {len(scores)}, {len(spectra)}")
    if any(r < 1 for r in ranks) or any(b <= a for a, b in zip(ranks, ranks[1:], strict=False)):
        raise ValueError(f"ranks must be >= 1 and strictly increasing, got {ranks}")
    frames = []
    for k, (r, score, s) in enumerate(zip(ranks, scores, spectra, strict=True)):
        sigma = np.sort(_np(s).ravel())[::-1][:r]
        energy = float((sigma**2).sum())
        top1 = float(sigma[0] ** 2 / energy) if energy > 0 else float("nan")
        caption = f"r = {r}: score {score:.3f}"
        if full_score is not None:
            caption += f" (full fine-tuning {full_score:.3f})"
        caption += f"; the top direction holds {top1:.0%} of ‖ΔW‖²"  # one line: a wide figure
        frames.append({"rank": r, "score": score, "ranks": ranks[: k + 1],
                       "scores": scores[: k + 1], "sigma": sigma, "top1": top1,
                       "caption": caption})
    return frames


def rank_animation(ranks: Sequence[int], scores: Sequence[float], spectra: Sequence[Any],
                   full_score: float | None = None, ylabel: str = "held-out score",
                   layer: str = "", interval_ms: int = 1200) -> animation.FuncAnimation:
    """Step through r: the score so far (left) and delta_W's spectrum at this r (right) (chapter 4).

    The panels sit side by side, 12.6 x 5 in, in ``plots.WIDE_STYLE``: every text stays >=
    ``plots.MIN_TEXT_PT`` when a frame is scaled to the book's column, and a GIF saved at dpi
    <= 94 fits the deck's 470-px box unscaled (15 pt at dpi 90 is 19 px).
    """
    frames = rank_frames(ranks, scores, spectra, full_score)
    ranks = frames[-1]["ranks"]
    top = max(float(f["sigma"].max()) for f in frames) * 2
    low = min(float(f["sigma"][f["sigma"] > 0].min()) for f in frames if (f["sigma"] > 0).any()) / 2 \
        if any((f["sigma"] > 0).any() for f in frames) else 1e-6
    with mpl.rc_context(WIDE_STYLE):
        fig = Figure(figsize=(12.6, 5), dpi=100)
        FigureCanvasAgg(fig)  # no pyplot: the animation is not also shown as a still figure
        ax_s, ax_v = fig.subplots(1, 2)
        values = [*frames[-1]["scores"], *([full_score] if full_score is not None else [])]
        pad = max(0.02, 0.1 * (max(values) - min(values)))
        ax_s.set_ylim(min(values) - pad, max(values) + pad)
        if full_score is not None:
            ax_s.axhline(full_score, color=PALETTE["full"], lw=2.5, label="full fine-tuning")
        (done,) = ax_s.plot([], [], "o-", color=PALETTE["lora"], ms=8, label="LoRA")
        (now,) = ax_s.plot([], [], "o", color=PALETTE["lora"], ms=16, alpha=0.4)
        _log2_ranks(ax_s, ranks)
        ax_s.set_xlim(ranks[0] / 1.5, ranks[-1] * 1.5)
        ax_s.set(xlabel="LoRA rank r (log scale)", ylabel=ylabel, title="score against r")
        ax_s.yaxis.set_major_locator(mticker.MaxNLocator(5))
        ax_s.legend(loc="lower right", fontsize=WIDE_TEXT_PT)
        ghosts = [ax_v.plot([], [], "o-", color=PALETTE["random"], lw=1, ms=3, alpha=0.5)[0]
                  for _ in frames]
        (spec,) = ax_v.plot([], [], "o-", color=PALETTE["lora"], ms=5)
        ax_v.set(xscale="log", yscale="log", xlim=(0.8, ranks[-1] * 1.25), ylim=(low, top),
                 xlabel="index i of σ_i (log scale)",
                 ylabel="σ_i of ΔW (weight units)",
                 title=f"spectrum of the learned ΔW{', ' + layer if layer else ''}")
        title = fig.suptitle("", fontsize=WIDE_TEXT_PT + 1)
        fig.tight_layout(rect=(0, 0, 1, 0.92))  # room for the caption

    def update(i: int):
        f = frames[i]
        done.set_data(f["ranks"], f["scores"])
        now.set_data([f["rank"]], [f["score"]])
        for k, ghost in enumerate(ghosts):  # earlier ranks stay, faded
            sigma = frames[k]["sigma"] if k < i else []
            ghost.set_data(np.arange(1, len(sigma) + 1), sigma)
        spec.set_data(np.arange(1, len(f["sigma"]) + 1), f["sigma"])
        title.set_text(f["caption"])
        return [done, now, spec, title, *ghosts]

    update(0)
    anim = animation.FuncAnimation(fig, update, frames=len(frames), interval=interval_ms,
                                   blit=False)
    anim._lorabook_frames = frames
    return anim
