"""lorabook.viz.tables: "What we measured" as Markdown, score tables with r in numeric order."""

from __future__ import annotations

import re

import numpy as np
import pandas as pd
import pytest

from lorabook.viz import tables


def test_claims_markdown_is_a_list_with_escaped_text():
    md = tables.claims_markdown([("NF4 is best", "error 0.0728 at $5 per run; a_b * c"),
                                 ("memory", "538 MB -> 134 MB")]).data
    lines = md.splitlines()
    assert lines[0] == r"- **NF4 is best**: error 0.0728 at \$5 per run; a\_b \* c"
    assert lines[1] == r"- **memory**: 538 MB -\> 134 MB"


def test_claims_markdown_from_a_verdict_table():
    df = pd.DataFrame({"measured here": ["0.83"], "verdict": ["yes"]},
                      index=pd.Index(["claim one"], name="claim"))
    assert tables.claims_markdown(df).data == "- **claim one**: measured here: 0.83 · verdict: yes"


def test_claims_markdown_rejects_bad_input():
    with pytest.raises(ValueError, match="empty"):
        tables.claims_markdown([])
    with pytest.raises(TypeError, match="pair"):
        tables.claims_markdown([("only one",)])


def test_by_rank_orders_r_numerically_and_names_missing_runs():
    index = pd.MultiIndex.from_tuples([("q", 1), ("q", 2), ("q", 8), ("qv", 4), ("q", 4)],
                                      names=["targets", "r"])
    series = pd.Series([0.1, 0.2, 0.8, 0.44, 0.4], index=index)
    styler = tables.by_rank(series)
    assert list(styler.data.columns) == [1, 2, 4, 8]
    assert styler.data.loc["q", 4] == 0.4 and np.isnan(styler.data.loc["qv", 1])
    html = styler.to_html()
    assert html.count("not run") == 3 and "0.440" in html and "nan" not in html.lower()
    with pytest.raises(ValueError, match="level"):
        tables.by_rank(series, level="rank")


def test_mark_long_cells_marks_only_long_text():
    long = "I pay £841.00 a month. Is it possible to switch my payment date to the 22nd?"
    df = pd.DataFrame({"message": [long, "short"], "score": [0.5, 0.25]})
    html = tables.mark_long_cells(df.to_html())
    assert html.count('class="long-text"') == 1 and f'<td class="long-text">{long}</td>' in html
    assert "<td>short</td>" in html and "<td>0.50</td>" in html
    assert tables.mark_long_cells(html) == html  # idempotent
    assert tables.mark_long_cells("no table <td>x</td>") == "no table <td>x</td>"
    with pytest.raises(TypeError, match="html"):
        tables.mark_long_cells(None)


def test_text_table_is_an_html_table_with_blank_missing_cells_and_no_index():
    df = pd.DataFrame({"claim": ["LoRA r = 8 reaches full fine-tuning", "no runs yet"],
                       "difference": [-0.16234, np.nan], "seeds": [3, 0]},
                      index=pd.Index([7, 9], name="row"))
    html = tables.text_table(df).to_html()
    cells = [c.strip() for c in re.findall(r"<td[^>]*>(.*?)</td>", html, re.DOTALL)]
    assert cells == ["LoRA r = 8 reaches full fine-tuning", "-0.162", "3", "no runs yet", "", "0"]
    assert "<th" in html and ">row<" not in html and ">7<" not in html  # the index is hidden
    assert 'class="dataframe"' in html  # the theme pads and rules only these
    marked = tables.mark_long_cells(html, threshold=20)  # the book marks its long cells
    assert 'long-text' in marked and marked.count("long-text") == 1
    assert re.findall(r"<td[^>]*>(.*?)</td>", tables.text_table(df, digits=1).to_html())[1] \
        .strip() == "-0.2"


def test_text_table_rejects_bad_input():
    with pytest.raises(TypeError, match="DataFrame"):
        tables.text_table("| a | b |")
    with pytest.raises(ValueError, match="digits"):
        tables.text_table(pd.DataFrame({"a": [1.0]}), digits=-1)
