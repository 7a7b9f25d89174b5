"""One palette and one style for every figure, readable on a projector (chapter 1).

Figures double as slides: large fonts, thick lines, a title and labelled axes with units.
Functions return the ``Figure``; they never call ``plt.show()``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import matplotlib as mpl
import matplotlib.pyplot as plt

# Colour-blind-safe (Okabe-Ito). The same method has the same colour in every chapter.
PALETTE = {
    "base": "#000000",  # the frozen pre-trained model
    "full": "#0072B2",  # full fine-tuning
    "lora": "#D55E00",  # LoRA
    "qlora": "#CC79A7",  # QLoRA
    "adapter": "#009E73",  # bottleneck adapter layers
    "prefix": "#E69F00",  # prefix tuning
    "nf4": "#CC79A7",
    "fp4": "#56B4E9",
    "int4": "#F0E442",
    "random": "#999999",  # random baselines
}
SEQUENCE = ["#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#F0E442", "#000000"]
DIVERGING = "RdBu_r"  # heatmaps of signed weights, centred on zero

STYLE = {
    "figure.figsize": (9, 5),
    "figure.dpi": 100,
    "savefig.dpi": 150,
    "font.size": 13,
    "axes.titlesize": 15,
    "axes.labelsize": 13,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "lines.linewidth": 2.2,
    "legend.fontsize": 11,
    "axes.prop_cycle": mpl.cycler(color=SEQUENCE),
}


def use_style() -> None:
    """Apply the book's matplotlib style (the one global setting a chapter opts into) (chapter 1)."""
    mpl.rcParams.update(STYLE)


def color(name: str) -> str:
    """The palette colour of a method name, e.g. ``color("lora")`` (chapter 1)."""
    if name not in PALETTE:
        raise ValueError(f"no palette colour for {name!r}; known: {sorted(PALETTE)}")
    return PALETTE[name]


def new_figure(figsize: tuple[float, float] = STYLE["figure.figsize"]):
    """A pyplot figure made outside ``rc_context`` so notebooks keep showing figures (chapter 1).

    The first pyplot figure of an IPython session switches the inline backend on, which sets
    ``rcParams["interactive"]``; made inside ``rc_context`` that setting would be undone on exit
    and the notebook would stop showing figures.
    """
    return plt.figure(figsize=figsize)


# Wide figures for the book and the deck (chapter 2): panels side by side, about 12-13.4 in wide
# and 4.5-5.5 in tall. The book's column shrinks a W-inch figure by 688 / (100 W), so every text
# needs >= 1.12 W pt (15 pt up to 13.4 in); the deck's 470-px box then shows 15 pt at >= 15 px.
WIDE_STYLE = {**STYLE, "font.size": 15, "axes.titlesize": 16, "axes.labelsize": 15,
              "xtick.labelsize": 15, "ytick.labelsize": 15, "legend.fontsize": 15,
              "figure.titlesize": 17}
WIDE_TEXT_PT = 15  # the size of annotations and legends set by hand in a WIDE_STYLE figure

PAGE_WIDTH_IN = 11.5  # widest figure whose 13 pt text stays >= ~8 pt at the book's page width
# A cell output's width in the rendered book, CSS px, at the 1280 x 900 window of the browser test
# (tests/browser/test_rendered_book.py measures it, so this number cannot go stale silently).
BOOK_COLUMN_PX = 688
MIN_TEXT_PT = 8.0  # the smallest text a figure may show at that width
# The deck's figure box, in slide px: book/slides/conf.py makes a slide 1280 x 720 and
# book/slides/_static/deck.css caps `img.deck-figure` at `max-height: 470px; max-width: 100%`,
# 100% of the slide's <section>, which has no padding (1280 px, measured in the built deck).
# A figure larger than the box is scaled down to fit it; a smaller one is shown at natural size.
DECK_FIGURE_WIDTH_PX = 1280
DECK_FIGURE_HEIGHT_PX = 470
# The smallest text a figure may show on a slide, in slide px (a 1280 x 720 projector shows
# 0.97 of that: reveal's 3 % margin). The deck's own smallest notes are 12 px (`.deck-cut`, 0.4em
# of deck.css's 30 px) and 13.5 px (`.deck-source`): a figure's tick labels may be a pixel smaller,
# not more. 12 px would also refuse figures that read well at 11.6-11.8 px (ch4_rank_sweep,
# ch4_target_modules, ch5_absmax) and would have to be reworked for a pixel.
DECK_MIN_TEXT_PX = 11.0


def smallest_text_pt(fig, tight: bool = True, dpi: float | None = None) -> float:
    """The smallest text of ``fig`` as the book shows it, in CSS points (chapter 1).

    The inline backend saves a figure at ``fig.dpi`` with a tight bounding box (an animation's
    frames keep the whole figure: ``tight=False``; a PNG saved at another ``dpi`` says so);
    the page shows it at its natural size, or scaled down to ``BOOK_COLUMN_PX`` when wider. A
    nominal size of s pt is then s * dpi / 72 image pixels, times that scale, at 0.75 pt per CSS
    px. Only visible, non-empty texts count (titles, labels, tick labels, legends, annotations).
    """
    from matplotlib.text import Text

    dpi = fig.dpi if dpi is None else dpi
    renderer = fig._get_renderer()  # what tight_layout uses; works for a bare Figure too
    width_in = fig.get_tightbbox(renderer).width if tight else fig.get_size_inches()[0]
    width_px = width_in * dpi
    scale = min(1.0, BOOK_COLUMN_PX / width_px)
    # tick labels of ticks outside the view count too: they share the drawn ones' size
    sizes = [t.get_fontsize() for t in fig.findobj(Text) if t.get_visible() and t.get_text().strip()]
    if not sizes:
        return float("inf")  # no text: nothing to read
    return min(sizes) * dpi / 72 * scale * 0.75


def deck_smallest_text_px(fig, dpi: float, tight: bool = True) -> float:
    """The smallest text of ``fig`` as a slide of the deck shows it, in slide px (chapter 2).

    ``export`` saves the figure at ``dpi`` with a tight bounding box and savefig's padding (an
    animation's frames keep the whole figure: ``tight=False``); the deck shows that image at its
    natural size, or scaled down to fit ``DECK_FIGURE_WIDTH_PX`` x ``DECK_FIGURE_HEIGHT_PX``.
    A nominal size of s pt is s * dpi / 72 image pixels, times that scale.
    """
    from matplotlib.text import Text

    if tight:
        box = fig.get_tightbbox(fig._get_renderer())
        pad = 2 * mpl.rcParams["savefig.pad_inches"]
        width_in, height_in = box.width + pad, box.height + pad
    else:
        width_in, height_in = fig.get_size_inches()
    scale = min(1.0, DECK_FIGURE_WIDTH_PX / (width_in * dpi), DECK_FIGURE_HEIGHT_PX / (height_in * dpi))
    sizes = [t.get_fontsize() for t in fig.findobj(Text) if t.get_visible() and t.get_text().strip()]
    if not sizes:
        return float("inf")  # no text: nothing to read
    return min(sizes) * dpi / 72 * scale


def panel_grid(fig, n: int, cols: int = 2, **subplots_kw):
    """``n`` panels, at most ``cols`` a row, and the free cells left over (chapter 4).

    Wide rows of three or more panels shrink every label below legibility at the page's width;
    two a row, with the legend in a free cell (``legend_in``), keep the figure under
    ``PAGE_WIDTH_IN`` inches. ``subplots_kw`` go to ``fig.subplots`` (e.g. ``sharey=True``).
    """
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be an int >= 1, got {n!r}")
    cols = min(cols, n)
    rows = -(-n // cols)
    cells = list(fig.subplots(rows, cols, squeeze=False, **subplots_kw).ravel())
    return cells[:n], cells[n:]


def legend_in(fig, source_ax, spare: Sequence, fontsize: float = 13) -> None:
    """The legend of ``source_ax``: in the first spare cell if any, else under the panels (chapter 4)."""
    handles, labels = source_ax.get_legend_handles_labels()
    for ax in spare[1:]:
        ax.remove()
    if not handles:
        if spare:
            spare[0].remove()
        return
    if spare:
        spare[0].axis("off")
        spare[0].legend(handles, labels, loc="center", fontsize=fontsize, frameon=False)
    else:
        fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 3),
                   fontsize=fontsize - 1, frameon=False)


def bar_chart(values: Mapping[str, float], title: str, ylabel: str,
              colors: Sequence[str] | None = None, fmt: str = "{:.3g}", log: bool = False):
    """A labelled bar chart with each bar's value printed on it (chapter 1)."""
    fig = new_figure()
    with mpl.rc_context(STYLE):
        ax = fig.add_subplot()
        names, vals = list(values), list(values.values())
        bars = ax.bar(names, vals, color=colors or SEQUENCE[: len(vals)])
        for b, v in zip(bars, vals, strict=True):
            ax.annotate(fmt.format(v), (b.get_x() + b.get_width() / 2, b.get_height()),
                        ha="center", va="bottom", fontsize=11)
        if log:
            ax.set_yscale("log")
        ax.set_title(title)
        ax.set_ylabel(ylabel)
        ax.grid(axis="x", visible=False)
        fig.tight_layout()
    return fig


def ratio_bars(table, value: str = "ratio to base", low: str = "ratio p10",
               high: str = "ratio p90", colors: Mapping[str, str] | None = None,
               title: str = "Forward pass against the base",
               ylabel: str = "median latency / base latency"):
    """Grouped bars of a ratio with its spread: whiskers from ``low`` to ``high`` (chapter 3).

    ``table``: a DataFrame indexed by (group, variant), e.g. (batch x tokens, variant), with
    columns ``value``, ``low`` and ``high`` (e.g. the median ratio and its per-round p10 and
    p90). One cluster of bars per variant, one bar per group (the first solid, the others
    lighter), and a dashed line at 1.
    """
    import pandas as pd  # the one figure here that reads a table

    if not isinstance(table, pd.DataFrame) or table.index.nlevels != 2:
        raise ValueError("table must be a DataFrame indexed by (group, variant)")
    missing = [c for c in (value, low, high) if c not in table.columns]
    if missing:
        raise ValueError(f"table lacks the columns {missing}; it has {list(table.columns)}")
    groups = list(dict.fromkeys(table.index.get_level_values(0)))
    variants = list(dict.fromkeys(table.index.get_level_values(1)))
    width = 0.8 / len(groups)
    fig = new_figure((9, 5))
    with mpl.rc_context(STYLE):
        ax = fig.add_subplot()
        for j, group in enumerate(groups):
            rows = table.loc[group].reindex(variants)
            xs = [i + (j - (len(groups) - 1) / 2) * width for i in range(len(variants))]
            mid = rows[value].to_numpy(dtype=float)
            spread = [mid - rows[low].to_numpy(dtype=float), rows[high].to_numpy(dtype=float) - mid]
            ax.bar(xs, mid, width, yerr=spread, capsize=5, edgecolor="black",
                   color=[(colors or {}).get(v, SEQUENCE[i % len(SEQUENCE)])
                          for i, v in enumerate(variants)],
                   alpha=1.0 if j == 0 else 0.5, error_kw={"elinewidth": 1.5},
                   label=f"{group}")
        ax.axhline(1.0, color="black", lw=1, ls="--")
        ax.set_xticks(range(len(variants)), variants)
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.grid(axis="x", visible=False)
        legend = ax.legend(title="solid / light: " + " / ".join(map(str, groups)), loc="upper left")
        legend.get_title().set_fontsize(11)
        fig.tight_layout()
    return fig


def loss_curves(histories: Mapping[str, Sequence[float]], title: str = "Training loss",
                colors: Mapping[str, str] | None = None):
    """Training loss per optimiser step for several runs on one axis (chapter 1)."""
    fig = new_figure()
    with mpl.rc_context(STYLE):
        ax = fig.add_subplot()
        for name, loss in histories.items():
            ax.plot(range(1, len(loss) + 1), loss, label=name,
                    color=(colors or {}).get(name))
        ax.set_title(title)
        ax.set_xlabel("optimiser step")
        ax.set_ylabel("cross-entropy loss (nats/token)")
        ax.legend()
        fig.tight_layout()
    return fig
