"""viz.record_plots: every score figure has a 0-1 axis, labels, a title and its intervals."""

import pandas as pd
import pytest

from lorabook.viz import record_plots


@pytest.fixture
def table():
    rows = [("full", None, None, None, None, 134_000_000), ("lora", "all", 1, "rslora", None, 3e5),
            ("lora", "all", 8, "rslora", None, 2.4e6), ("lora", "all", 8, "lora", None, 2.4e6),
            ("adapter", None, None, None, 8, 5.9e5), ("none", None, None, None, None, 0)]
    return pd.DataFrame([{"method": m, "targets": t, "r": r, "scaling": s, "size": z,
                          "trainable": n, "label": f"{m} {r or z or ''}", "short": m, "seeds": 2,
                          "score": 0.5 + 0.05 * i, "low": 0.45 + 0.05 * i, "high": 0.55 + 0.05 * i}
                         for i, (m, t, r, s, z, n) in enumerate(rows)])


def _axes(fig):
    ax = fig.axes[0]
    return ax, ax.get_title(), ax.get_xlabel(), ax.get_ylabel()


def test_scores_figure(table):
    ax, title, xlabel, _ = _axes(record_plots.scores_figure(table, "T", "exact match"))
    assert (title, xlabel, ax.get_xlim()) == ("T", "exact match", (0.0, 1.0))
    assert len(ax.get_yticklabels()) == len(table)


def test_rank_series_and_params_figures(table):
    full = table[table["method"] == "full"].iloc[0]
    ax, title, xlabel, ylabel = _axes(record_plots.rank_series_figure(table, full, "R", "score"))
    assert (title, ylabel, ax.get_ylim()) == ("R", "score", (0.0, 1.0)) and "rank" in xlabel
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert any("alpha / r" in x for x in labels) and any("sqrt" in x for x in labels)
    assert {t.get_text() for t in ax.texts} == {"2 seeds"}  # the fixture's points: provisional
    ax, title, xlabel, _ = _axes(record_plots.params_figure(table, "P", "score"))
    assert ax.get_xscale() == "log" and "trainable" in xlabel
    assert "none" not in [t.get_text() for t in ax.get_legend().get_texts()]  # nothing trained


def test_curves_figure():
    runs = [{"method": "full", "label": "full", "seed": s,
             "curve": [{"step": 50, "score": 0.6}, {"step": 100, "score": 0.7}]} for s in (0, 1)]
    ax, _, xlabel, _ = _axes(record_plots.curves_figure(runs, "C", "exact"))
    assert xlabel == "optimiser step" and len(ax.get_lines()) == 2


def test_base_series_figure():
    rows = [{"base": b, "r": r, "seeds": 3 if b != "int4" else 2, "score": 0.6, "low": 0.5,
             "high": 0.7} for b in ("nf4", "float", "int4") for r in (2, 8, 64)]
    table = pd.DataFrame(rows)
    full = pd.Series({"score": 0.8, "low": 0.75, "high": 0.85})
    ax, title, xlabel, ylabel = _axes(record_plots.base_series_figure(table, full, "B", "exact"))
    assert (title, ylabel, ax.get_ylim(), ax.get_xscale()) == ("B", "exact", (0.0, 1.0), "log")
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels[0].startswith("full fine-tuning")
    assert labels[1:] == [record_plots.BASE_NAMES[b] for b in ("float", "nf4", "int4")]  # fixed order
    assert [t.get_text() for t in ax.get_xticklabels()] == ["2", "8", "64"]
    assert [t.get_text() for t in ax.texts] == ["2 seeds"] * 3  # Int4's provisional points say so
    with pytest.raises(ValueError, match="no name for base"):
        record_plots.base_series_figure(table.assign(base="int8"), None, "B", "exact")
