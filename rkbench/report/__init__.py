"""Markdown report (with PNG plots) of a sweep, read from MLflow only.

    python -m rkbench report [--parent RUN_ID] [--pivot METRIC:ROW:COL] [--no-plots]
                             [--baseline RUN_ID --gate METRIC:-TOL,METRIC:+TOL%]
"""

from __future__ import annotations

import re
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional

from rkbench.report.accuracy import sections as accuracy_sections
from rkbench.report.frontier import frontiers
from rkbench.report.gate import Row
from rkbench.report.markdown import pivot_title, render
from rkbench.report.plots import pareto_figure, pivot_figure, save
from rkbench.report.runs import Pivot, Selection, default_pivots, load_selection, pivots
from rkbench.report.validity import Limits


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.=-]+", "-", text).strip("-") or "x"


def write_report(sel: Selection, out_dir: Path, pivot: list[tuple[str, str, Optional[str]]] | None = None,
                 plots: bool = True, limits: Limits = Limits(), gate: Optional[list[Row]] = None,
                 baseline: str = "") -> Path:
    """Write `<out_dir>/<experiment>-<sweep id[:8] | all>.md` with its PNG plots beside it (same prefix);
    returns the markdown's path. `pivot` None means the default pivots."""
    specs = default_pivots(sel) if pivot is None else list(pivot)
    tables: list[Pivot] = [p for spec in specs for p in pivots(sel, spec)]
    fronts = frontiers(sel, limits)

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    name = _slug(f"{sel.experiment}-{sel.parent.run_id[:8] if sel.parent else 'all'}")
    pngs: list[str] = []

    def plot(fig, stem: str) -> str:
        pngs.append(f"{name}-{len(pngs) + 1:02d}-{_slug(stem)}.png")   # numbered: slugs of metrics may collide
        save(fig, out / pngs[-1])
        return pngs[-1]

    linked = [(p, plot(pivot_figure(p), pivot_title(p).replace(" by ", "_by_").replace(" x ", "_x_")) if plots else None)
              for p in tables]
    fronted = [(f, plot(pareto_figure(f), f"pareto_{f.stem}") if plots else None) for f in fronts]
    studies = accuracy_sections(sel, plot if plots else None)
    path = out / f"{name}.md"
    path.write_text(render(sel, linked, datetime.now(timezone.utc), limits, fronted, gate, baseline, studies))
    return path


def build_report(tracking_uri: str, experiment: str, out_dir: Path, parent_run_id: str | None = None,
                 pivot: list[tuple[str, str, Optional[str]]] | None = None, plots: bool = True,
                 limits: Limits = Limits()) -> Path:
    """The report of a sweep (the latest of the experiment by default); raises DataError when there is
    nothing to report."""
    return write_report(load_selection(tracking_uri, experiment, parent_run_id), out_dir, pivot, plots, limits)


__all__ = ["build_report", "write_report"]
