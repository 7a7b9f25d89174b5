"""Tables and lists as a reader should see them in the rendered book (chapter 2).

- ``claims_markdown(claims)``: a chapter's "What we measured", each (claim, what the cells
  measured) pair as one item of a Markdown list, so that long results wrap in the page instead
  of running off a line of printed code text. Markdown characters in the text are escaped
  (``$`` too: a dollar amount must not become math).
- ``by_rank(series)``: a score by (row, r) as a table with one column per r, the columns in
  numeric order (1, 2, 4, 8, not the order the runs happened in), and the combinations that were
  never run shown as such instead of NaN.

- ``text_table(table)``: a DataFrame of claims, verdicts and numbers as an HTML table (floats to
  ``digits``, missing cells blank, no index), so that the book's stylesheet and
  ``mark_long_cells`` apply: its long claims wrap, its numbers stay on one line. (A Markdown table
  in a cell output is not one: myst-nb renders outputs as CommonMark, which has no tables, and the
  page showed its rows as one paragraph of pipes.)
- ``mark_long_cells(html)``: the cells of an HTML table whose text is long get the class
  ``long-text``; the book's stylesheet lets only those wrap (at a readable width) and keeps
  numbers and short labels on one line, the table scrolling in its own box when it is wider than
  the page (the book's ``offline_book`` extension applies it to every output table).

``claims_markdown``, ``by_rank`` and ``text_table`` return objects that Jupyter and the book
display (``IPython.display.Markdown``, a pandas ``Styler``); nothing here prints.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import pandas as pd
from IPython.display import Markdown

_MD_SPECIAL = re.compile(r"([\\`*_{}\[\]<>#|$~])")
_CELL = re.compile(r"<(td|th)((?:\s[^>]*)?)>(.*?)</\1>", re.DOTALL)
_TAG = re.compile(r"<[^>]+>")
LONG_TEXT = 40  # characters: a cell longer than this may wrap
# A Styler's table has no class; the book's theme pads and rules only tables of class "dataframe"
# (what DataFrame.to_html writes), so without it the numbers of adjacent cells run together.
DATAFRAME = 'class="dataframe"'


def escape_markdown(text: str) -> str:
    """``text`` with Markdown's (and MyST's ``$``) special characters backslash-escaped (chapter 2)."""
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    return _MD_SPECIAL.sub(r"\\\1", text)


def claims_markdown(claims: Iterable[tuple[str, str]] | pd.DataFrame) -> Markdown:
    """A "What we measured" list: ``- **claim**: result`` per (claim, result) pair (chapter 2).

    ``claims`` is a sequence of (claim, result) string pairs, or a DataFrame whose index is the
    claim and whose columns are joined with " · " into the result.
    """
    if isinstance(claims, pd.DataFrame):
        pairs = [(str(index), " · ".join(f"{col}: {row[col]}" for col in claims.columns))
                 for index, row in claims.iterrows()]
    else:
        pairs = []
        for item in claims:
            if not (isinstance(item, tuple) and len(item) == 2
                    and all(isinstance(x, str) for x in item)):
                raise TypeError(f"each claim must be a (claim, result) pair of str, got {item!r}")
            pairs.append(item)
    if not pairs:
        raise ValueError("claims is empty: a chapter's summary needs at least one claim")
    lines = [f"- **{escape_markdown(claim)}**: {escape_markdown(result)}" for claim, result in pairs]
    return Markdown("\n".join(lines))


def _numeric_order(values) -> list:
    def key(v):
        try:
            return (0, float(v), "")
        except (TypeError, ValueError):
            return (1, 0.0, str(v))
    return sorted(values, key=key)


def by_rank(series: pd.Series, level: str = "r", precision: int = 3,
            missing: str = "not run") -> pd.io.formats.style.Styler:
    """``series`` indexed by (..., ``level``) as a table, one column per r in numeric order (chapter 4).

    Cells of combinations that were never run show ``missing`` instead of NaN.
    """
    if not isinstance(series, pd.Series):
        raise TypeError(f"series must be a pandas Series, got {type(series).__name__}")
    if level not in (series.index.names or []):
        raise ValueError(f"series has no index level {level!r}; its levels: {series.index.names}")
    table = series.unstack(level)
    table = table[_numeric_order(table.columns)]
    table.columns.name = level
    return table.style.format(precision=precision, na_rep=missing).set_table_attributes(DATAFRAME)


def text_table(table: pd.DataFrame, digits: int = 3, missing: str = ""
               ) -> pd.io.formats.style.Styler:
    """``table`` without its index, floats to ``digits`` places, missing cells as ``missing`` (chapter 4)."""
    if not isinstance(table, pd.DataFrame):
        raise TypeError(f"table must be a pandas DataFrame, got {type(table).__name__}")
    if not isinstance(digits, int) or digits < 0:
        raise ValueError(f"digits must be a non-negative int, got {digits!r}")
    return (table.style.format(precision=digits, na_rep=missing).hide(axis="index")
            .set_table_attributes(DATAFRAME)
            .set_table_styles([{"selector": "th", "props": "text-align: left;"}]))  # as the cells


def mark_long_cells(html: str, threshold: int = LONG_TEXT) -> str:
    """``html`` with class ``long-text`` on every table cell whose text exceeds ``threshold`` (chapter 2)."""
    if not isinstance(html, str):
        raise TypeError(f"html must be a str, got {type(html).__name__}")

    def mark(m: re.Match) -> str:
        tag, attrs, inner = m.groups()
        if len(_TAG.sub("", inner).strip()) <= threshold or "long-text" in attrs:
            return m.group(0)
        if 'class="' in attrs:
            attrs = attrs.replace('class="', 'class="long-text ', 1)
        else:
            attrs += ' class="long-text"'
        return f"<{tag}{attrs}>{inner}</{tag}>"

    return _CELL.sub(mark, html) if "<table" in html else html


__all__ = ["by_rank", "claims_markdown", "escape_markdown", "mark_long_cells", "text_table"]
