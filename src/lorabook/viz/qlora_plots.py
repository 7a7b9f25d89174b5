"""Figures of chapter 7 (QLoRA performance): memory against model size, ranks and 4-bit bases.

- ``budget_rows`` + ``memory_figure``: training memory of full fine-tuning, LoRA and QLoRA against
  the number of parameters, computed with ``lorabook.qlora.memory_budget`` for published
  architectures (135M to 7B), our own measured points on top, and a 16 GB GPU as a line.
- ``aggregate`` + ``rank_figure``: sweep records (``lorabook.sweep``) averaged over seeds, one
  panel per metric against the rank r, one line per storage of the frozen base.
- ``formats_figure``: NF4, FP4 and Int4 as the frozen base: weight error and score side by side.

Every function returns a matplotlib ``Figure`` in the book's style, titled, axes labelled with
units; none calls ``plt.show()``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

import matplotlib as mpl
import matplotlib.ticker as mticker
import numpy as np
from matplotlib.figure import Figure

from lorabook.qlora import ARCHITECTURES, TARGETS, Architecture, memory_budget, parameter_counts
from lorabook.viz.plots import (
    PALETTE,
    STYLE,
    WIDE_STYLE,
    WIDE_TEXT_PT,
    color,
    legend_in,
    new_figure,
    panel_grid,
)
from lorabook.viz.quant_plots import FORMAT_COLORS

GiB = 2**30
METHODS = ("full", "lora", "qlora")
METHOD_NAMES = {"full": "full fine-tuning", "lora": "LoRA", "qlora": "QLoRA (NF4 base)"}
BASE_COLORS = {"float": PALETTE["lora"], "nf4": PALETTE["nf4"], "fp4": PALETTE["fp4"],
               "int4": FORMAT_COLORS["int4"]}  # the frozen base under the adapter
BASE_NAMES = {"float": "LoRA, float base", "nf4": "QLoRA, NF4 base", "fp4": "LoRA on an FP4 base",
              "int4": "LoRA on an Int4 base"}
RANK_METRICS = {  # record key -> (axis label, divisor)
    "score": ("held-out score", 1.0),
    "step_s": ("time per training step (s)", 1.0),
    "memory_increase_bytes": ("memory for training (MiB)", 2.0**20),  # rise during training
}


def budget_rows(architectures: Iterable[Architecture] | None = None,
                methods: Sequence[str] = METHODS, r: int = 8,
                targets: Sequence[str] = TARGETS, weight_bytes: float = 2) -> list[dict]:
    """``memory_budget`` of each architecture and method, plus its base parameter count (chapter 7).

    Defaults: every model of ``qlora.ARCHITECTURES``, 16-bit weights (the GPU recipe), adapters
    of rank ``r`` on all linear layers. Each row is memory_budget's dict (bytes) with
    ``base_params``, the parameters of the model without adapters.
    """
    archs = list(ARCHITECTURES.values()) if architectures is None else list(architectures)
    if not archs:
        raise ValueError("budget_rows needs at least one architecture")
    rows = []
    for arch in archs:
        n = parameter_counts(arch)["total"]
        rows += [{**memory_budget(arch, m, r=r, targets=targets, weight_bytes=weight_bytes),
                  "base_params": n} for m in methods]
    return rows


def _check_method(method: str) -> None:
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")


def _count(v: float, _pos=None) -> str:
    """A parameter count as a tick label: 1e8 -> '100M', 1e9 -> '1B'."""
    for div, unit in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "k")):
        if v >= div:
            return f"{v / div:g}{unit}"
    return f"{v:g}"


def memory_figure(computed: Sequence[Mapping], measured: Sequence[Mapping] = (),
                  gpu_gib: float = 16.0, gpu_name: str = "16 GB GPU (Colab T4)",
                  title: str = "Training memory against model size") -> Figure:
    """Memory of full fine-tuning, LoRA and QLoRA against parameters, log-log (chapter 7).

    ``computed``: rows of ``budget_rows`` (keys ``model``, ``method``, ``base_params``,
    ``total`` in bytes), drawn as one line per method through the models. ``measured``: rows
    with ``method``, ``params`` and ``bytes`` (and optionally ``label``), drawn as large stars
    with a black edge. A horizontal line marks a GPU of ``gpu_gib`` GiB.
    """
    if not computed:
        raise ValueError("memory_figure needs at least one computed row (see budget_rows)")
    for row in [*computed, *measured]:
        _check_method(row["method"])
    fig = new_figure((11, 6))
    with mpl.rc_context(STYLE):
        ax = fig.subplots()
        for method in METHODS:
            rows = sorted((r for r in computed if r["method"] == method),
                          key=lambda r: r["base_params"])
            if rows:
                ax.plot([r["base_params"] for r in rows], [r["total"] / GiB for r in rows], "o-",
                        color=color(method), ms=8, label=f"{METHOD_NAMES[method]} (computed)")
        lowest: dict[str, Mapping] = {}
        for r in computed:  # name each model once, under its lowest point
            if r["model"] not in lowest or r["total"] < lowest[r["model"]]["total"]:
                lowest[r["model"]] = r
        offset, previous = -20, None
        for name, r in sorted(lowest.items(), key=lambda kv: kv[1]["base_params"]):
            close = previous is not None and r["base_params"] / previous < 1.3
            offset = offset - 15 if close else -20  # stagger the names of models of similar size
            previous = r["base_params"]
            ax.annotate(name, (r["base_params"], r["total"] / GiB), textcoords="offset points",
                        xytext=(0, offset), ha="center", fontsize=12, color="0.3")
        for r in measured:
            ax.scatter(r["params"], r["bytes"] / GiB, marker="*", s=420, color=color(r["method"]),
                       edgecolors="black", linewidths=1.2, zorder=4,
                       label=r.get("label") or f"{METHOD_NAMES[r['method']]} (measured here)")
        ax.axhline(gpu_gib, color="black", ls="--", lw=1.5)
        ax.annotate(gpu_name, (max(r["base_params"] for r in computed), gpu_gib), ha="right",
                    va="bottom", fontsize=13)
        ax.set_xscale("log")
        ax.set_yscale("log")
        xs = [r["base_params"] for r in computed] + [r["params"] for r in measured]
        ax.set_xticks([t for t in (1e8, 3e8, 1e9, 3e9, 1e10, 3e10, 1e11)
                       if min(xs) / 2 <= t <= max(xs) * 2])
        ax.set_xlim(min(xs) / 1.3, max(xs) * 1.3)
        ys = [r["total"] / GiB for r in computed] + [r["bytes"] / GiB for r in measured]
        ax.set_ylim(min(ys) / 2.6, max(max(ys), gpu_gib) * 2.5)  # room for the names and legend
        ax.xaxis.set_major_formatter(mticker.FuncFormatter(_count))
        ax.xaxis.set_minor_formatter(mticker.NullFormatter())
        ax.yaxis.set_major_formatter(mticker.FuncFormatter(lambda v, _: f"{v:g}"))
        ax.set_xlabel("parameters of the base model (log scale)")
        ax.set_ylabel("training memory (GiB, log scale)")
        ax.set_title(title)
        ax.legend(loc="upper left", fontsize=12)
        fig.tight_layout()
    return fig


def aggregate(records: Iterable[Mapping], metric: str, x: str = "r",
              group: str = "base") -> dict[str, dict]:
    """Mean, std and n of ``metric`` over seeds, by ``group`` and then by ``x`` (chapter 7).

    Records without the metric (or with None/NaN) are left out. Returns
    {group value: {x value: (mean, std, n)}}, std the sample std (0 when n = 1), x sorted.
    """
    values: dict[str, dict] = {}
    for rec in records:
        v = rec.get(metric)
        if v is None or (isinstance(v, float) and math.isnan(v)):
            continue
        values.setdefault(rec.get(group), {}).setdefault(rec.get(x), []).append(float(v))
    out = {}
    for g, by_x in values.items():
        out[g] = {}
        for k in sorted(by_x, key=lambda v: (v is None, v)):
            a = np.asarray(by_x[k])
            out[g][k] = (float(a.mean()), float(a.std(ddof=1)) if a.size > 1 else 0.0, int(a.size))
    return out


def rank_figure(records: Sequence[Mapping], metrics: Mapping[str, tuple[str, float]] | None = None,
                title: str = "LoRA on a float base and on 4-bit bases, by rank") -> Figure:
    """One panel per metric against the rank r, a line per base storage, mean +- std (chapter 7).

    Every y axis starts at 0 (the metrics are scores, times and bytes: none is negative).

    ``records`` are sweep results (keys ``method``, ``r``, ``base`` and the metrics). LoRA
    records (method "lora") are lines over r; full fine-tuning records (method "full") a dashed
    horizontal line with its mean. ``metrics``: record key -> (axis label, divisor); default
    score, seconds per step and the rise of memory during training in MiB.
    """
    metrics = dict(RANK_METRICS if metrics is None else metrics)
    lora = [r for r in records if r.get("method") == "lora" and r.get("r") is not None]
    if not lora:
        raise ValueError("rank_figure needs LoRA records (method 'lora') with a rank r")
    full = [r for r in records if r.get("method") == "full"]
    # side by side, three a row, in WIDE_STYLE: legible in the book's column and on a slide
    cols = min(3, len(metrics))
    n_rows = math.ceil(len(metrics) / cols)
    fig = new_figure((4.2 * cols + 0.3, 4.3 * n_rows + 1.5))
    with mpl.rc_context(WIDE_STYLE):
        axes, spare = panel_grid(fig, len(metrics), cols)
        ranks = sorted({r["r"] for r in lora})
        for ax, (key, (label, div)) in zip(axes, metrics.items(), strict=True):
            for base, by_r in aggregate(lora, key).items():
                mean = np.array([m for m, _, _ in by_r.values()]) / div
                std = np.array([s for _, s, _ in by_r.values()]) / div
                ax.errorbar(np.asarray(list(by_r), dtype=float), mean, yerr=std, fmt="o-", capsize=4,
                            color=BASE_COLORS.get(base, "0.4"), label=BASE_NAMES.get(base, base))
            f = [float(r[key]) for r in full if r.get(key) is not None]
            if f:
                ax.axhline(np.mean(f) / div, color=color("full"), ls="--", lw=1.8,
                           label="full fine-tuning")
            ax.set_xscale("log", base=2)
            ax.set_xticks(ranks, [str(k) for k in ranks])
            ax.minorticks_off()
            ax.yaxis.set_major_locator(mticker.MaxNLocator(5))
            ax.set_xlabel("rank r (log scale)")
            ax.set_ylabel(label)
            ax.set_ylim(bottom=0)  # from 0: a truncated axis magnifies single-seed differences
            ax.set_title(label.split(" (")[0].capitalize())
        handles, labels = axes[0].get_legend_handles_labels()
        if spare:
            legend_in(fig, axes[0], spare, fontsize=WIDE_TEXT_PT)
        else:  # under the panels
            fig.legend(handles, labels, loc="lower center", ncols=min(len(labels), 3),
                       frameon=False, fontsize=WIDE_TEXT_PT)
        fig.suptitle(title)
        legend_rows = 0 if spare else math.ceil(len(labels) / 3)
        fig.tight_layout(rect=(0, (0.1 + 0.35 * legend_rows) / fig.get_size_inches()[1], 1, 1))
    return fig


def formats_figure(error: Mapping[str, float], scores: Mapping[str, Sequence[float]],
                   error_label: str = "mean |W - Q(W)| / std(W)",
                   score_label: str = "held-out score",
                   title: str = "The frozen base in three 4-bit formats") -> Figure:
    """Weight error of each 4-bit format (left) and the score of LoRA on it (right) (chapter 7).

    ``error``: format -> quantization error of the base's weights; ``scores``: format -> the
    scores of its runs (one per seed), drawn as dots with their mean as a bar.
    """
    if not error or not scores:
        raise ValueError("formats_figure needs the error and the scores of at least one format")
    fig = new_figure((11, 5))  # 11 inches: its 12-13 pt text stays legible at the page's width
    with mpl.rc_context(STYLE):
        left, right = fig.subplots(1, 2)
        names = list(error)
        bars = left.bar(names, [error[n] for n in names],
                        color=[BASE_COLORS.get(n, "0.5") for n in names])
        for b, n in zip(bars, names, strict=True):
            left.annotate(f"{error[n]:.3f}", (b.get_x() + b.get_width() / 2, b.get_height()),
                          xytext=(0, 3), textcoords="offset points", ha="center", va="bottom",
                          fontsize=12)
        left.set_ylim(0, max(error.values()) * 1.18 or 1.0)  # room for the values
        left.set_title("Error of the frozen weights")
        left.set_xlabel("storage of W0")
        left.set_ylabel(error_label)
        names = list(scores)
        for i, n in enumerate(names):
            vals = np.asarray(scores[n], dtype=float)
            right.bar(i, vals.mean() if vals.size else 0.0, color=BASE_COLORS.get(n, "0.5"),
                      alpha=0.45)
            right.plot(np.full(vals.size, i), vals, "o", color=BASE_COLORS.get(n, "0.5"),
                       mec="black", ms=8)
            if vals.size:  # the mean, over the bar and every dot
                right.annotate(f"{vals.mean():.3f}", (i, max(vals.max(), vals.mean())),
                               xytext=(0, 8), textcoords="offset points", ha="center",
                               va="bottom", fontsize=12)
        tops = [float(np.max(scores[n])) for n in names if len(scores[n])]
        right.set_ylim(0, max(tops, default=1.0) * 1.2 or 1.0)
        right.set_xticks(range(len(names)), names)
        right.set_title("LoRA trained on that base")
        right.set_xlabel("storage of W0 (dots: seeds, bar: mean)")
        right.set_ylabel(score_label)
        for ax in (left, right):
            ax.grid(axis="x", visible=False)
        fig.suptitle(title)
        fig.tight_layout()
    return fig
