"""Baseline gate for CI on model changes: compare a sweep (or run) with a baseline, metric by metric.

    --gate "eval/map50_95:-0.01,latency/board_py_total_ms_p50:+5%"

Each term is METRIC:TOLERANCE. The sign says which way is worse (- : a drop is a regression, + : a rise
is), the size how much of it is tolerated, absolute or, with %, relative to the baseline value.

A change is a REGRESSION only when it is worse than the tolerance AND than the measured noise. Noise is
known for timings, from the runs' own `_cv` and iteration counts (validity.timing): the p50 of n samples
has a standard error of about 1.25 x cv x value / sqrt(n); the noise of a difference is twice the two
errors combined. Where the count is unknown n is taken as 1 (the spread of a single call: conservative).
Metrics without a cv (mAP, sizes) are deterministic for a given model and data: noise 0.

Configurations are matched by their values of the swept axes (of either side); a configuration of the
current sweep that the baseline lacks is listed as new and judged on nothing. A metric the baseline has
and the current configuration lacks (it failed) is a regression."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Optional

from rkbench.errors import ConfigError, DataError
from rkbench.report.runs import RunRecord, Selection, config_label, latest_per_config
from rkbench.report.validity import timing

TERM = re.compile(r"^(?P<metric>[^:\s]+):(?P<sign>[+-])(?P<size>\d+(?:\.\d*)?|\.\d+)(?P<pct>%?)$")
STATS = re.compile(r"^latency/(?P<stem>.+)_(?:p50|p90|p99|mean|min)$")


@dataclass(frozen=True)
class Term:
    metric: str
    worse: int          # +1: a rise is worse (latency), -1: a drop is worse (mAP)
    size: float
    relative: bool

    def allowed(self, base: float) -> float:
        return self.size / 100.0 * abs(base) if self.relative else self.size

    def __str__(self) -> str:
        return f"{'+' if self.worse > 0 else '-'}{self.size:g}{'%' if self.relative else ''}"


@dataclass(frozen=True)
class Row:
    config: str
    metric: str
    term: Term
    baseline: Optional[float]
    current: Optional[float]
    noise: float
    verdict: str        # REGRESSION, missing, ok, better, within noise, no baseline, new

    @property
    def fails(self) -> bool:
        return self.verdict in ("REGRESSION", "missing")

    @property
    def delta(self) -> Optional[float]:
        return None if self.baseline is None or self.current is None else self.current - self.baseline


def parse(text: str) -> list[Term]:
    terms = []
    for part in (p.strip() for p in text.split(",") if p.strip()):
        found = TERM.match(part)
        if not found:
            raise ConfigError(f"--gate term '{part}' is not METRIC:+TOLERANCE or METRIC:-TOLERANCE[%], "
                              "e.g. eval/map50_95:-0.01,latency/board_py_total_ms_p50:+5%")
        terms.append(Term(found["metric"], 1 if found["sign"] == "+" else -1, float(found["size"]), bool(found["pct"])))
    if not terms:
        raise ConfigError("--gate is empty: give METRIC:-TOLERANCE terms, e.g. eval/map50_95:-0.01")
    return terms


def _error(run: RunRecord, metric: str) -> float:
    """Standard error of a timing metric (0 for metrics without a recorded cv)."""
    found = STATS.match(metric)
    if not found:
        return 0.0
    t = timing(run, found["stem"])
    if t.cv is None or math.isnan(t.cv):
        return 0.0
    return 1.2533 * t.cv * abs(run.metrics[metric]) / math.sqrt(t.iterations or 1)


def judge(term: Term, base: RunRecord, cur: RunRecord) -> tuple[Optional[float], Optional[float], float, str]:
    b, c = base.metrics.get(term.metric), cur.metrics.get(term.metric)
    if b is None:
        return b, c, 0.0, "no baseline"
    if c is None:
        return b, c, 0.0, "missing"
    noise = 2.0 * math.hypot(_error(base, term.metric), _error(cur, term.metric))
    worse_by = (c - b) * term.worse
    if worse_by > max(term.allowed(b), noise):
        return b, c, noise, "REGRESSION"
    if worse_by > term.allowed(b):
        return b, c, noise, "within noise"
    return b, c, noise, "better" if worse_by < 0 else "ok"


def compare(baseline: Selection, current: Selection, terms: list[Term]) -> list[Row]:
    known = {m for r in baseline.runs for m in r.metrics}
    for term in terms:
        if term.metric not in known:
            raise ConfigError(f"--gate {term.metric}: the baseline has no such metric: pick one of "
                              + ", ".join(sorted(m for m in known if m.startswith(("eval/", "latency/")))[:12]))
    axes = list(dict.fromkeys(current.axes + baseline.axes))
    base = {tuple(r.param(a) for a in axes): r for r in latest_per_config(baseline.runs, axes)}
    rows = []
    for run in latest_per_config(current.runs, axes):
        label = config_label(run, axes)
        match = base.get(tuple(run.param(a) for a in axes))
        for term in terms:
            if match is None:
                rows.append(Row(label, term.metric, term, None, run.metrics.get(term.metric), 0.0, "new"))
            else:
                rows.append(Row(label, term.metric, term, *judge(term, match, run)))
    if all(r.verdict == "new" for r in rows):
        raise DataError(f"no configuration matches the baseline on {', '.join(axes) or 'its params'}: pass a "
                        "--baseline swept over the same axes and values")
    return rows
