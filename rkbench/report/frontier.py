"""Latency vs accuracy: per place measured, every configuration as (latency p50, mAP50-95), the Pareto
front of the VALID ones, and the fastest VALID configuration that keeps the best mAP within a margin."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from rkbench.metrics import EVAL_MAP
from rkbench.report.runs import RunRecord, Selection, config_label, latency_stem, latest_per_config
from rkbench.report.validity import Limits, validity

MARGINS = (0.01, 0.02, 0.05)    # "fastest with mAP >= best - margin"


@dataclass(frozen=True)
class Point:
    latency: float          # ms, p50
    map: float
    run: RunRecord
    label: str              # axis=value, ...
    short: str              # the values alone, for the plot
    valid: bool
    reasons: tuple[str, ...]


@dataclass
class Frontier:
    stem: str                                           # latency/<stem>_p50, e.g. simulator_infer_ms
    axes: list[str]                                     # what Point.short lists the values of
    points: list[Point]
    front: list[Point] = field(default_factory=list)    # valid points no other valid point beats, fastest first


def front(points: list[Point]) -> list[Point]:
    """Valid points that no other valid point matches on both latency (lower) and mAP (higher)."""
    out: list[Point] = []
    for pt in sorted((p for p in points if p.valid), key=lambda p: (p.latency, -p.map)):
        if not out or pt.map > out[-1].map:
            out.append(pt)
    return out


def frontiers(sel: Selection, limits: Limits = Limits()) -> list[Frontier]:
    """One frontier per place/latency measured (runs.latency_stem), over the latest run of each
    configuration that has both numbers."""
    by_stem: dict[str, list[Point]] = {}
    for r in latest_per_config(sel.runs, sel.axes):
        stem = latency_stem(r)
        if stem and EVAL_MAP in r.metrics:
            ok, reasons = validity(r, stem, limits)
            by_stem.setdefault(stem, []).append(Point(r.metrics[f"latency/{stem}_p50"], r.metrics[EVAL_MAP], r,
                                                      config_label(r, sel.axes),
                                                      "/".join(r.param(a) for a in sel.axes) or r.name, ok,
                                                      tuple(reasons)))
    return [Frontier(stem, sel.axes, pts, front(pts)) for stem, pts in sorted(by_stem.items())]


def fastest(f: Frontier, margins: tuple[float, ...] = MARGINS) -> list[tuple[float, float, Optional[Point]]]:
    """(margin, mAP floor = best mAP - margin, the fastest VALID point reaching it or None). The best mAP
    is over every point: an accuracy is not made invalid by a bad timing."""
    best = max(p.map for p in f.points)
    out = []
    for margin in margins:
        floor = best - margin
        ok = [p for p in f.points if p.valid and p.map >= floor - 1e-12]
        out.append((margin, floor, min(ok, key=lambda p: p.latency) if ok else None))
    return out
