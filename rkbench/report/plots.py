"""PNG plots: a pivot (the metric against the row axis, one line per value of the column axis) and the
Pareto front of latency vs mAP50-95.

Uses matplotlib's object API with the Agg canvas (no pyplot, so no global backend switch and no
display needed) and pins the bundled DejaVu Sans font, so nothing is looked up on the system or network.
Figures are built and returned apart from saving, so what they show can be checked before it is written.
A host, simulator or emulator time is never NPU latency: its plot says so on the image itself (and in
the PNG's `Caveat` text chunk)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

from rkbench.metrics import where
from rkbench.report.frontier import Frontier
from rkbench.report.runs import Pivot, numeric

STYLE = {"font.family": "DejaVu Sans", "font.size": 9, "axes.grid": True, "grid.alpha": 0.3}
CAVEAT = "host/simulator time: not NPU latency"
AXIS_UNITS = {"resolution": "px", "calib.size": "images", "batch": "images per call"}
METRIC_UNITS = (("_mib", "MiB"), ("_fps", "frames/s"), ("_ms", "ms"), ("_s", "s"), ("_pct", "%"))


def axis_label(param: str) -> str:
    return f"{param} ({AXIS_UNITS[param]})" if param in AXIS_UNITS else param


def metric_label(metric: str) -> str:
    """`eval/map50_95` -> mAP50-95, `latency/simulator_infer_ms_p50` -> simulator infer p50 (ms), ..."""
    group, _, name = metric.partition("/")
    if group == "latency":
        stem, _, stat = name.rpartition("_")
        return f"{stem.removesuffix('_ms').replace('_', ' ')} {stat}" + ("" if stat == "cv" else " (ms)")
    if group in ("eval", "eval_float") and name.startswith("map"):
        label = "mAP" + name[3:].replace("_", "-")
        return label if group == "eval" else f"float {label} (ONNX Runtime)"
    unit = next((u for suffix, u in METRIC_UNITS if name.endswith(suffix)), "")
    return f"{metric} ({unit})" if unit else metric


def caveat(metric: str) -> Optional[str]:
    """The caveat a plot of this metric must carry: any time not taken on a real board's NPU."""
    timed = metric.startswith(("latency/", "throughput/", "tiling/"))
    return CAVEAT if timed and where(metric) in ("host", "simulator", "emulator") else None


def _is_map(metric: str) -> bool:
    return metric.startswith(("eval/map", "eval_float/map"))


def _figure(title: str, xlabel: str, ylabel: str, note: Optional[str]):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.2), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if note:
        fig.text(0.01, 0.01, note, color="firebrick", fontsize=8, fontweight="bold")
    return fig, ax


def pivot_figure(p: Pivot):
    """mAP axes start at 0 unless the float reference is drawn (dashed) to read the int8 loss against."""
    import matplotlib

    with matplotlib.rc_context(STYLE):
        fixed = ", ".join(f"{k}={v}" for k, v in p.fixed.items())
        fig, ax = _figure(f"{metric_label(p.metric)} vs {p.row}" + (f"\n({fixed})" if fixed else ""),
                          axis_label(p.row), metric_label(p.metric), caveat(p.metric))
        # Numeric axes (resolution) keep their spacing; anything else is evenly spaced categories.
        xs = [float(v) for v in p.rows] if numeric(p.rows) else list(range(len(p.rows)))
        colours = {}
        for col in p.cols:
            ys = [p.cells.get((row, col), math.nan) for row in p.rows]
            (line,) = ax.plot(xs, ys, marker="o", label=f"{p.col}={col}" if p.col else metric_label(p.metric))
            colours[col] = line.get_color()
        ref = {row: {p.reference[(row, c)] for c in p.cols if (row, c) in p.reference} for row in p.rows}
        if any(ref.values()):
            if all(len(v) <= 1 for v in ref.values()):       # the reference does not depend on the column
                ax.plot(xs, [min(ref[row], default=math.nan) for row in p.rows], "k--", label="float reference")
            else:
                for col in p.cols:
                    ax.plot(xs, [p.reference.get((row, col), math.nan) for row in p.rows], "--",
                            color=colours[col], label=f"float reference, {p.col}={col}")
        elif _is_map(p.metric):
            ax.set_ylim(bottom=0)
        ax.set_xticks(xs, labels=p.rows)
        ax.legend(loc="best")
        fig.tight_layout(rect=(0, 0.04, 1, 1))
    return fig


def pareto_figure(f: Frontier):
    """Every configuration as a point (INVALID latencies greyed, never on the front), the front as steps."""
    import matplotlib

    with matplotlib.rc_context(STYLE):
        xlabel = metric_label(f"latency/{f.stem}_p50")
        fig, ax = _figure(f"mAP50-95 vs {xlabel.removesuffix(' (ms)')}: Pareto front", xlabel, "mAP50-95",
                          caveat(f"latency/{f.stem}_p50"))
        valid = [pt for pt in f.points if pt.valid]
        invalid = [pt for pt in f.points if not pt.valid]
        if valid:
            ax.plot([pt.latency for pt in valid], [pt.map for pt in valid], "o", color="tab:blue", label="VALID latency")
        if invalid:
            ax.plot([pt.latency for pt in invalid], [pt.map for pt in invalid], "x", color="grey",
                    label="INVALID latency (not on the front)")
        if f.front:
            ax.step([pt.latency for pt in f.front], [pt.map for pt in f.front], where="post", color="tab:red",
                    label="Pareto front")
        for pt in f.points:
            note = ax.annotate(pt.short, (pt.latency, pt.map), textcoords="offset points", xytext=(5, 3),
                               fontsize=7)
            note.set_in_layout(False)           # a long label must not shrink the axes
        ax.set_ylim(bottom=0, top=max([pt.map for pt in f.points] + [0.0]) * 1.15 or 1.0)
        ax.set_xlim(left=0, right=max([pt.latency for pt in f.points] + [0.0]) * 1.3 or 1.0)
        ax.legend(loc="lower right", title=" / ".join(f.axes) or None)
        fig.tight_layout(rect=(0, 0.04, 1, 1))
    return fig


def save(fig, path: Path) -> Path:
    """Write the PNG with its title and caveat as text chunks (readable back with PIL's Image.text)."""
    texts = [t.get_text() for t in fig.texts]
    meta = {"Title": fig.axes[0].get_title().replace("\n", " ")}
    if CAVEAT in texts:
        meta["Caveat"] = CAVEAT
    fig.savefig(path, metadata=meta)
    return path
