"""PNG plots of pivots: the metric against the row axis, one line per value of the column axis.

Uses matplotlib's object API with the Agg canvas (no pyplot, so no global backend switch and no
display needed) and pins the bundled DejaVu Sans font, so nothing is looked up on the system or network."""

from __future__ import annotations

import math
from pathlib import Path

from rkbench.report.runs import Pivot, sort_key

STYLE = {"font.family": "DejaVu Sans", "font.size": 9, "axes.grid": True, "grid.alpha": 0.3}


def plot_pivot(p: Pivot, path: Path) -> Path:
    import matplotlib
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    # Numeric axes (resolution) keep their spacing; anything else is evenly spaced categories.
    numeric_x = all(sort_key(v)[0] == 0 for v in p.rows)
    xs = [float(v) for v in p.rows] if numeric_x else list(range(len(p.rows)))
    with matplotlib.rc_context(STYLE):
        fig = Figure(figsize=(6.0, 3.8), dpi=110)
        FigureCanvasAgg(fig)
        ax = fig.add_subplot()
        for col in p.cols:
            ys = [p.cells.get((row, col), math.nan) for row in p.rows]
            ax.plot(xs, ys, marker="o", label=f"{p.col}={col}")
        ax.set_xticks(xs, labels=p.rows)
        ax.set_xlabel(p.row)
        ax.set_ylabel(p.metric)
        fixed = ", ".join(f"{k}={v}" for k, v in p.fixed.items())
        ax.set_title(f"{p.metric} vs {p.row}" + (f"\n({fixed})" if fixed else ""))
        ax.legend(loc="best")
        fig.tight_layout()
        fig.savefig(path)
    return path
