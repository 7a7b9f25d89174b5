"""Figures of the runs of record: scores with 95% intervals, the rank series, score against
trainable parameters, learning curves (chapters 1, 3, 4 and the claims ledger).

Every score axis starts at 0 and ends at 1 (a stated origin: no truncated axis magnifies a
difference), and every point carries its bootstrap interval from ``lorabook.evidence``.
"""

from __future__ import annotations

from collections.abc import Sequence

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from lorabook.evidence import FORMAT_NAMES, MIN_SEEDS
from lorabook.viz.plots import color, use_style

METHOD_COLOR = {"full": "full", "lora": "lora", "qlora": "qlora", "adapter": "adapter", "prefix": "prefix",
                "none": "base", "constant": "random"}


def _finish(fig: Figure, ax, title: str, xlabel: str, ylabel: str) -> Figure:
    """Score axis 0-1, labels, title, legend at the lower right: the end of every score figure."""
    ax.set_ylim(0, 1)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(loc="lower right")
    fig.tight_layout()
    return fig


def _err(table: pd.DataFrame) -> np.ndarray:
    return np.vstack([table["score"] - table["low"], table["high"] - table["score"]])


def scores_figure(table: pd.DataFrame, title: str, xlabel: str) -> Figure:
    """One row per configuration: mean score and its 95% interval, on a 0-1 axis (chapter 1)."""
    use_style()
    table = table.reset_index(drop=True)
    fig, ax = plt.subplots(figsize=(10, 0.5 * len(table) + 1.8))
    y = np.arange(len(table))[::-1]
    colors = [color(METHOD_COLOR.get(m, "lora")) for m in table["method"]]
    ax.barh(y, table["score"], color=colors, alpha=0.35)
    ax.errorbar(table["score"], y, xerr=_err(table), fmt="o", color="black", capsize=4)
    labels = [f"{lab}  ({s} seed{'s' if s != 1 else ''})" for lab, s in
              zip(table["label"], table["seeds"], strict=True)]
    ax.set_yticks(y, labels)
    ax.set_xlim(0, 1)
    ax.set_xlabel(xlabel)
    ax.set_title(title)
    fig.tight_layout()
    return fig


def _series(ax, series: Sequence[tuple[str, str, pd.DataFrame]], dodge: float = 0.0) -> list[int]:
    """Score against r for each (name, colour, rows) with intervals; a point on fewer than
    ``MIN_SEEDS`` seeds is labelled with its seeds. ``dodge`` shifts the series apart by that
    fraction of a doubling of r, so that their intervals at one rank do not hide each other.
    Returns the ranks drawn."""
    styles = ["-o", "--s", ":^", "-.D", "-v"]
    for i, (name, col, g) in enumerate(series):
        g = g.sort_values("r")
        x = g["r"] * 2.0 ** (dodge * (i - (len(series) - 1) / 2))
        ax.errorbar(x, g["score"], yerr=_err(g), fmt=styles[i % len(styles)], capsize=4,
                    label=name, color=col, mec="0.2" if dodge else None)
        for xi, (_, row) in zip(x[g["seeds"] < MIN_SEEDS], g[g["seeds"] < MIN_SEEDS].iterrows(),
                                strict=True):  # a provisional point says so
            ax.annotate(f"{row['seeds']} seed{'' if row['seeds'] == 1 else 's'}",
                        (xi, row["score"]), xytext=(6, 6), textcoords="offset points",
                        fontsize=10, color="0.25")
    return sorted({int(r) for _, _, g in series for r in g["r"]})


def _finish_ranks(fig: Figure, ax, ranks: Sequence[int], full: pd.Series | None, title: str,
                  ylabel: str) -> Figure:
    """Full fine-tuning's band, a log2 rank axis, then ``_finish``."""
    if full is not None:
        ax.axhspan(full["low"], full["high"], color=color("full"), alpha=0.2)
        ax.axhline(full["score"], color=color("full"), label="full fine-tuning (95% interval)")
    ax.set_xscale("log", base=2)
    ax.set_xticks(ranks, [str(r) for r in ranks])
    return _finish(fig, ax, title, "LoRA rank r (log scale)", ylabel)


def rank_series_figure(table: pd.DataFrame, full: pd.Series | None, title: str,
                       ylabel: str) -> Figure:
    """Score against r (log2 axis) per series (targets, scaling), with intervals and full FT's band;
    a point on fewer than ``MIN_SEEDS`` seeds is labelled with its seeds (chapter 4)."""
    use_style()
    fig, ax = plt.subplots(figsize=(9, 5.5))
    lora = table[table["method"] == "lora"]
    series_colors = [color("lora"), color("adapter"), color("qlora"), color("prefix")]
    series = [(f"LoRA on {targets}, " + ("alpha / sqrt(r)" if scaling == "rslora" else "alpha / r"),
               series_colors[i % len(series_colors)] if scaling == "rslora" else color("random"), g)
              for i, ((targets, scaling), g) in enumerate(lora.groupby(["targets", "scaling"],
                                                                       sort=True))]
    return _finish_ranks(fig, ax, _series(ax, series), full, title, ylabel)


BASE_NAMES = {"float": "16-bit base (LoRA)",  # then each 4-bit format, named as in the ledger
              **{f: f"{name} base" + (" (QLoRA)" if f == "nf4" else "")
                 for f, name in FORMAT_NAMES.items()}}


def base_series_figure(table: pd.DataFrame, full: pd.Series | None, title: str,
                       ylabel: str) -> Figure:
    """Score against r (log2 axis) per frozen base (float, NF4, FP4, Int4), with intervals and
    full FT's band; the bases are set slightly apart at each rank (chapter 7). ``table`` is
    ``evidence.summary_table(runs, by=("base", "r"))``."""
    use_style()
    fig, ax = plt.subplots(figsize=(9, 5.5))
    unknown = sorted(set(table["base"]) - set(BASE_NAMES))
    if unknown:
        raise ValueError(f"no name for base(s) {unknown}; known: {sorted(BASE_NAMES)}")
    series = [(name, color("lora" if base == "float" else base), table[table["base"] == base])
              for base, name in BASE_NAMES.items() if (table["base"] == base).any()]
    return _finish_ranks(fig, ax, _series(ax, series, dodge=0.08), full, title, ylabel)


# where params_figure writes a point's label: (offset in points, alignment), by method
# (prefix tuning below its point: above it, P = 32's label fell on LoRA r = 1's, 17% fewer parameters)
LABEL_SIDE = {"lora": ((6, -14), "left"), "full": ((-8, -14), "right"),
              "adapter": ((6, 8), "left"), "prefix": ((6, -20), "left")}


def params_figure(table: pd.DataFrame, title: str, ylabel: str) -> Figure:
    """Score against trainable parameters (log axis) for every method, with intervals (chapter 4)."""
    use_style()
    fig, ax = plt.subplots(figsize=(10, 5.5))
    trained = table[table["trainable"].fillna(0) > 0]
    for method, g in trained.groupby("method", sort=False):
        ax.errorbar(g["trainable"], g["score"], yerr=_err(g), fmt="o", capsize=4, ms=7,
                    color=color(METHOD_COLOR.get(method, "lora")), label=method)
        # labels on different sides per method: adapters, prefixes and ranks 1-2 have about the
        # same parameter counts, and their labels overlapped on one side
        (dx, dy), ha = LABEL_SIDE.get(method, ((6, -14), "left"))
        for _, row in g.iterrows():  # LoRA: the rank series on all layers only (no clutter)
            if method != "lora" or (row["targets"] == "all" and row["scaling"] == "rslora"):
                ax.annotate(row["short"], (row["trainable"], row["score"]), ha=ha,
                            textcoords="offset points", xytext=(dx, dy), fontsize=11)
    ax.set_xscale("log")
    return _finish(fig, ax, title, "trainable parameters (log scale)", ylabel)


def curves_figure(runs: Sequence[dict], title: str, ylabel: str) -> Figure:
    """Held-out score every few steps (the learning curve of each run) (chapter 1)."""
    use_style()
    fig, ax = plt.subplots(figsize=(9, 5))
    styles = ["-o", "--s", ":^", "-.D", "-v"]
    for i, run in enumerate(runs):
        steps = [p["step"] for p in run["curve"]]
        ax.plot(steps, [p["score"] for p in run["curve"]], styles[i % len(styles)], alpha=0.8,
                color=color(METHOD_COLOR.get(run["method"], "lora")),
                label=f"{run['label']}, seed {run['seed']}")
    return _finish(fig, ax, title, "optimiser step", ylabel)
