"""Markdown report (with PNG plots) of a sweep, read from MLflow only.

    python -m rkbench report [--parent RUN_ID] [--pivot METRIC:ROW:COL] [--no-plots]
"""

from __future__ import annotations

import re
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional

from rkbench.report.markdown import render
from rkbench.report.runs import Pivot, default_pivots, load_selection, pivots


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.=-]+", "-", text).strip("-") or "x"


def build_report(tracking_uri: str, experiment: str, out_dir: Path, parent_run_id: str | None = None,
                 pivot: list[tuple[str, str, str]] | None = None, plots: bool = True) -> Path:
    """Write `<out_dir>/<experiment>-<sweep id[:8] | all>.md` with its PNG plots beside it (same prefix);
    returns the markdown's path.
    `pivot` None means the default pivots; raises DataError when there is nothing to report."""
    sel = load_selection(tracking_uri, experiment, parent_run_id)
    specs = default_pivots(sel) if pivot is None else list(pivot)
    tables: list[Pivot] = [p for spec in specs for p in pivots(sel, spec)]

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    name = _slug(f"{sel.experiment}-{sel.parent.run_id[:8] if sel.parent else 'all'}")
    linked: list[tuple[Pivot, Optional[str]]] = []
    for p in tables:
        png = None
        if plots:
            from rkbench.report.plots import plot_pivot

            stem = _slug(f"{p.metric}_by_{p.row}_x_{p.col}" + "".join(f"_{k}={v}" for k, v in p.fixed.items()))
            png = f"{name}-{len(linked) + 1:02d}-{stem}.png"     # numbered: slugs of different metrics may collide
            plot_pivot(p, out / png)
        linked.append((p, png))
    path = out / f"{name}.md"
    path.write_text(render(sel, linked, datetime.now(timezone.utc)))
    return path


__all__ = ["build_report"]
