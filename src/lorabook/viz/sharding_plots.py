"""Figure of chapter 9: training memory per GPU against the number of GPUs, under FSDP.

``per_gpu_figure`` draws ``sharding.budget_table``'s rows: one panel per method (full
fine-tuning, LoRA, QLoRA), one line per model, GiB per GPU on a log axis against 1, 2, 4, 8 GPUs,
with an 80 GB and a 16 GB GPU as lines. Returns a matplotlib ``Figure``; never shows it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import matplotlib as mpl
import matplotlib.ticker as mticker
from matplotlib.figure import Figure

from lorabook.viz.plots import WIDE_STYLE, WIDE_TEXT_PT, new_figure
from lorabook.viz.qlora_plots import METHOD_NAMES, METHODS

GPU_LINES = {"80 GB GPU": 80 * 1e9 / 2**30, "16 GB GPU": 16 * 1e9 / 2**30}  # GiB; vendors count GB
MODEL_STYLES = ("o-", "s-", "^-", "D-", "v-", "P-")


def gpu_counts(row: Mapping) -> dict[int, float]:
    """{GPUs: GiB per GPU} from one row of ``sharding.budget_table`` (columns "1 GPU", "2 GPUs", ...)."""
    return {int(k.split()[0]): float(v) for k, v in row.items() if k.split()[-1] in ("GPU", "GPUs")}


def per_gpu_figure(rows: Sequence[Mapping], title: str = "Training memory per GPU under FSDP") -> Figure:
    """GiB per GPU against GPUs, one panel per method, one line per model (chapter 9).

    The panels side by side on one GiB scale, one legend under them (``plots.WIDE_STYLE``):
    legible in the book's column and on a slide.
    """
    if not rows:
        raise ValueError("per_gpu_figure needs the rows of sharding.budget_table")
    methods = [m for m in METHODS if any(r["method"] == m for r in rows)]
    models = list(dict.fromkeys(r["model"] for r in rows))
    fig = new_figure((4.1 * len(methods) + 0.4, 6.0))
    with mpl.rc_context(WIDE_STYLE):
        panels = list(fig.subplots(1, len(methods), sharey=True, squeeze=False)[0])
        for k, (ax, method) in enumerate(zip(panels, methods, strict=True)):
            for i, model in enumerate(models):
                row = next((r for r in rows if r["model"] == model and r["method"] == method), None)
                if row is None:
                    continue
                counts = gpu_counts(row)
                ax.plot(list(counts), list(counts.values()), MODEL_STYLES[i % len(MODEL_STYLES)],
                        color=f"C{i}", ms=7, label=model)
            for (name, gib), ls in zip(GPU_LINES.items(), ("--", ":"), strict=True):
                ax.axhline(gib, color="black", ls=ls, lw=1.3, label=name)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.xaxis.set_major_formatter(mticker.FuncFormatter(lambda v, _: f"{v:g}"))
            ax.yaxis.set_major_formatter(mticker.FuncFormatter(lambda v, _: f"{v:g}"))
            ax.yaxis.set_minor_formatter(mticker.NullFormatter())  # decades only: few labels
            ax.set_xlabel("GPUs (FSDP full shard)")
            if k == 0:
                ax.set_ylabel("GiB per GPU (log)")
            ax.set_title(METHOD_NAMES[method])
        handles, labels = panels[0].get_legend_handles_labels()
        ncols = 4
        fig.legend(handles, labels, loc="lower center", ncols=ncols, frameon=False,
                   fontsize=WIDE_TEXT_PT)
        fig.suptitle(title)
        legend_in_rows = -(-len(labels) // ncols)
        fig.tight_layout(rect=(0, (0.1 + 0.33 * legend_in_rows) / fig.get_size_inches()[1], 1, 1))
    return fig
