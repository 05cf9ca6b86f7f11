"""Every table rkbench prints or writes, through pandas (DataFrame.to_markdown, i.e. tabulate): the
console's result table, the report's markdown tables and doctor's facts."""

from __future__ import annotations

import math
from typing import Optional, Sequence


def fmt(value: object) -> str:
    """Numbers to 4 significant digits (whole numbers as integers), NaN as n/a, None as -."""
    if value is None:
        return "-"
    if isinstance(value, float):
        if math.isnan(value):
            return "n/a"
        if value.is_integer() and abs(value) < 1e9:
            return str(int(value))
        return f"{value:.4g}"
    return str(value)


def _frame(header: Sequence[str], rows: Sequence[Sequence[object]], clean=lambda text: text):
    import pandas as pd

    body = [[clean(fmt(c)) for c in row] for row in rows]
    if any(len(r) != len(header) for r in body):
        raise ValueError("every row needs one cell per header column")
    return pd.DataFrame(body, columns=[clean(str(h)) for h in header], dtype=object)


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\r", " ").replace("\n", " ").strip() or " "


def markdown(header: Sequence[str], rows: Sequence[Sequence[object]], numeric: Optional[Sequence[bool]] = None) -> str:
    """A GitHub-flavoured markdown table; numeric columns right-aligned. Cells are formatted with fmt()."""
    align = ["right" if n else "left" for n in (numeric or [False] * len(header))]
    frame = _frame(header, rows, _md_cell)
    return frame.to_markdown(index=False, tablefmt="pipe", colalign=align, disable_numparse=True)


def text(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A plain console table: columns padded, a dashed rule under the header."""
    return _frame(header, rows).to_markdown(index=False, tablefmt="simple", disable_numparse=True)
