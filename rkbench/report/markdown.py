"""Markdown rendering of a report: a small table formatter and the report's sections.

The formatter is hand-written: pandas' DataFrame.to_markdown needs the `tabulate` package, which is not
a dependency."""

from __future__ import annotations

import re
from datetime import datetime, timezone
from typing import Optional, Sequence

from rkbench import tables
from rkbench.metrics import EVAL_MAP, WHERE, where
from rkbench.report.frontier import Frontier, fastest
from rkbench.report.gate import Row
from rkbench.report.plots import metric_label
from rkbench.report.studies import section as study_section
from rkbench.report.runs import Pivot, RunRecord, Selection, config_label, latency_stem, latest_per_config
from rkbench.report.validity import Limits, as_text, timing, validity

# Counts columns in the runs table (at the lowest logged threshold) and in the counts section.
COUNT_FIELDS = ("gt", "correct", "false", "missed", "correct_ratio", "false_ratio", "missed_ratio")
LATENCY_STATS = ("p50", "p90", "p99", "mean", "std", "min", "cv")
FLOAT_MAP = "eval_float/map50_95"
DROP = "map50_95 - float"      # runs-table column: eval/map50_95 - eval_float/map50_95 (the quantization loss)
CPP = re.compile(r"latency/(?P<place>[a-z]+)_cpp_(?P<part>\w+)_ms_p50")


table = tables.markdown     # the report's tables (rkbench/tables.py)


def _utc(ms: Optional[int]) -> str:
    return datetime.fromtimestamp(ms / 1000, tz=timezone.utc).strftime("%Y-%m-%d %H:%M UTC") if ms else "-"


def _label(metric: str) -> str:
    """Column header: `eval/` dropped, `counts/c0.25/correct` as `correct@0.25`."""
    if metric.startswith("counts/c"):
        conf, name = metric.removeprefix("counts/c").split("/", 1)
        return f"{name}@{conf}"
    return metric.removeprefix("eval/")


def count_conf(runs: list[RunRecord]) -> list[str]:
    """The thresholds of the logged count tables (`counts/c0.25/...`), lowest first."""
    confs = {m.split("/")[1][1:] for r in runs for m in r.metrics if m.startswith("counts/c")}
    return sorted(confs, key=float)


def run_columns(runs: list[RunRecord]) -> list[str]:
    """Key metrics present in at least one run, in reading order (DROP is computed, see value())."""
    present = {m for r in runs for m in r.metrics}
    fixed = [m for m in (EVAL_MAP, "eval/map50", FLOAT_MAP) if m in present]
    drop = [DROP] if {EVAL_MAP, FLOAT_MAP} <= present else []
    latency = sorted(m for m in present if m.startswith("latency/") and m.endswith("_p50"))
    rest = sorted(m for m in present if m.startswith("throughput/")) + [
        m for m in ("convert/build_s", "convert/rknn_mib") if m in present]
    confs = count_conf(runs)
    counts = [f"counts/c{confs[0]}/{k}" for k in ("correct", "false", "missed")] if confs else []
    return fixed + drop + latency + rest + [c for c in counts if c in present]


def value(run: RunRecord, column: str) -> Optional[float]:
    if column == DROP:
        a, b = run.metrics.get(EVAL_MAP), run.metrics.get(FLOAT_MAP)
        return None if a is None or b is None else a - b
    return run.metrics.get(column)


def _header(sel: Selection, generated: datetime) -> list[str]:
    runs = sel.runs
    by_status: dict[str, int] = {}
    for r in runs:
        by_status[r.status] = by_status.get(r.status, 0) + 1
    scope = (f"sweep run **{sel.parent.name}** (`{sel.parent.run_id}`)" if sel.parent
             else "every config run of the experiment (no sweep run found)")
    ends = [r.end_ms for r in runs if r.end_ms]
    return [
        f"# rkbench report: {sel.experiment}",
        "",
        f"- Generated: {generated.strftime('%Y-%m-%d %H:%M UTC')} from `{sel.tracking_uri}`, experiment `{sel.experiment}`",
        f"- Scope: {scope}; {len(runs)} configuration runs ("
        + ", ".join(f"{n} {s}" for s, n in sorted(by_status.items())) + ")",
        f"- Runs from {_utc(min(r.start_ms for r in runs))} to {_utc(max(ends) if ends else None)}",
        f"- Swept axes: {', '.join(f'`{a}`' for a in sel.axes) or 'none'}",
    ]


def _distinct(runs: list[RunRecord], tag: str) -> list[str]:
    return sorted({r.tags[tag] for r in runs if r.tags.get(tag)})


def _where(sel: Selection) -> list[str]:
    kinds: dict[str, int] = {}
    for r in sel.runs:
        kind = r.tags.get("rkbench.device_kind")
        if kind:
            kinds[kind] = kinds.get(kind, 0) + 1
    lines = ["", "## Where it was measured", ""]
    if not kinds:
        lines.append("No run carries an `rkbench.device_kind` tag (runs that failed before measuring).")
    for kind, n in sorted(kinds.items()):
        lines.append(f"- `{kind}` ({n} run{'s' if n != 1 else ''}): measured {WHERE.get(kind, 'at an unknown place')}")
    for tag, what in (("rkbench.soc", "Target SoC"), ("rkbench.runtime", "Runtime"), ("rkbench.host", "Host"),
                      ("rkbench.dataset", "Dataset"), ("rkbench.git_sha", "rkbench git sha")):
        values = _distinct(sel.runs, tag)
        if values:
            lines.append(f"- {what}: {', '.join(f'`{v}`' for v in values)}")
    measures = _distinct(sel.runs, "rkbench.measure")
    if measures:
        lines += ["- How latency was taken:"] + [f"  - {m}" for m in measures]
    versions = sorted({k for r in sel.runs for k in r.tags if k.startswith("versions.")})
    if versions:
        lines.append("- Versions: " + ", ".join(f"{k.removeprefix('versions.')} {' / '.join(_distinct(sel.runs, k))}"
                                                for k in versions))
    lines += ["", "Host and simulator times are measured on the x86 host (ONNX Runtime, rknn-toolkit2 simulator); "
                  "they compare configurations with each other, they are not NPU latency."]
    return lines


def _runs_table(sel: Selection, limits: Limits) -> list[str]:
    metrics = run_columns(sel.runs)
    timed = any(latency_stem(r) for r in sel.runs)

    def valid(r: RunRecord) -> Optional[str]:
        return ("VALID" if validity(r, None, limits)[0] else "INVALID") if latency_stem(r) else None

    header = ["run", "status"] + sel.axes + [_label(m) for m in metrics]
    rows = [[r.name, r.status] + [r.param(a) for a in sel.axes] + [value(r, m) for m in metrics] for r in sel.runs]
    numeric = [False, False] + [False] * len(sel.axes) + [True] * len(metrics)
    if not timed:
        return ["", "## Runs", "", table(header, rows, numeric)]
    rows = [row + [valid(r)] for row, r in zip(rows, sel.runs)]
    return ["", "## Runs", "", table(header + ["latency"], rows, numeric + [False]), "",
            "latency: whether the run's own latency (at the place it was measured) is VALID; the reasons are in "
            "Latency details."]


def _failures(sel: Selection) -> list[str]:
    failed = [r for r in sel.runs if r.status not in ("FINISHED", "REUSED")]
    if not failed:
        return []
    lines = ["", "## Failures", ""]
    for r in failed:
        axes = ", ".join(f"{a}={r.param(a)}" for a in sel.axes)
        stage = r.tags.get("rkbench.failed_stage")
        line = f"- **{r.name}** ({axes or r.run_id}) {r.status}" + (f" in stage `{stage}`" if stage else "")
        line += f": {r.tags.get('rkbench.error') or 'no rkbench.error tag (killed or still running?)'}"
        if r.tags.get("rkbench.hint"):
            line += f" — hint: {r.tags['rkbench.hint']}"
        lines.append(line.replace("\n", " "))
    return lines


def _reused(sel: Selection) -> list[str]:
    """Rows whose numbers were measured earlier, in another run (a link run of this sweep)."""
    links = [r for r in sel.runs if r.tags.get("rkbench.kind") == "link"]
    if not links:
        return []
    return ["", "## Reused measurements", "",
            "Not measured again in this sweep: the same configuration (same settings, same input file contents, "
            "same tool versions) had FINISHED before. `resume=false` measures again.", ""] + [
        f"- **{r.name}**: measured in run `{r.tags.get('rkbench.link_to', '?')}` ({r.tags.get('rkbench.measured_in', '')}) "
        f"at {r.tags.get('rkbench.measured_at', '?')}" for r in links]


def _search(sel: Selection) -> list[str]:
    """A search's target, its trials ranked by the value optuna minimised, and the best (rkbench/search.py)."""
    from rkbench import search

    tags = sel.parent.tags if sel.parent else {}
    if search.TAG not in tags:
        return []
    target = float(tags[f"{search.TAG}.min_map50_95"])
    scored = sorted(((search.objective(r.metrics, target), r) for r in sel.runs), key=lambda pair: pair[0])
    rows = []
    for score, r in scored:
        metric = search.latency_metric(r.metrics)
        place = where(metric) if metric else None
        rows.append([r.name, r.status, r.metrics.get(EVAL_MAP), metric.split("/", 1)[1] if metric else "-",
                     r.metrics.get(metric) if metric else None, place or "-",
                     "-" if score == search.FAILED else ("yes" if score < search.INFEASIBLE else "no")])
    found = search.best(sel.runs, target)
    return ["", "## Search", "",
            f"{tags[search.TAG]}; optuna ({tags.get(search.TAG + '.sampler', '?')}, "
            f"{tags.get(search.TAG + '.n_trials', '?')} trials) minimised each trial's value: its latency when it "
            f"meets the target, else {search.INFEASIBLE:g} x (1 + shortfall) ({search.FAILED:g} for a failed run). Only "
            "board latency is NPU latency.", "",
            f"**Best:** {found.line()}" if found else
            "**No trial met the target**: lower search.min_map50_95, widen the axes or add trials.", "",
            table(["trial run", "status", "map50_95", "latency", "ms", "measured on", "meets target"], rows,
                  [False, False, True, False, True, False, False])]


def _collapsed(sel: Selection) -> list[str]:
    collapsed = _distinct(sel.runs, "rkbench.collapsed")
    if not collapsed:
        return []
    return ["", "## Axes without effect on the target", "",
            "Collapsed to their defaults (one measurement, not one per value):", ""] + [f"- {c}" for c in collapsed]


def pivot_title(p: Pivot) -> str:
    fixed = ", ".join(f"{k}={v}" for k, v in p.fixed.items())
    return f"{p.metric} by {p.row}" + (f" x {p.col}" if p.col else "") + (f" ({fixed})" if fixed else "")


def pivot_table(p: Pivot) -> str:
    header = [f"{p.row} \\ {p.col}" if p.col else p.row] + (p.cols if p.col else [_label(p.metric)])
    rows = [[r] + [p.cells.get((r, c)) for c in p.cols] for r in p.rows]
    return table(header, rows, [False] + [True] * len(p.cols))


def _pivots(pivots: list[tuple[Pivot, Optional[str]]]) -> list[str]:
    lines: list[str] = []
    for p, png in pivots:
        lines += ["", f"## {pivot_title(p)}", "", pivot_table(p)]
        if png:
            lines += ["", f"![{p.metric} vs {p.row}]({png})"]
    return lines


def _latency(sel: Selection, limits: Limits) -> list[str]:
    rows = []
    for r in sel.runs:
        stems = sorted({m.removeprefix("latency/").rsplit("_", 1)[0] for m in r.metrics if m.startswith("latency/")})
        for s in stems:
            t = timing(r, s)
            rows.append([r.name, s] + [r.metrics.get(f"latency/{s}_{k}") for k in LATENCY_STATS]
                        + [t.iterations, t.seconds, as_text(*validity(r, s, limits))])
    if not rows:
        return []
    return ["", "## Latency details", "",
            f"VALID (MLPerf style): at least {limits.min_iterations} timed iterations and {limits.min_seconds:g} s, "
            f"cv at most {limits.max_cv:g}, and on a board the NPU/DDR/CPU clocks pinned (governor performance or "
            "userspace). An INVALID number never wins a fastest line or a place on the Pareto front.", "",
            table(["run", "measurement"] + list(LATENCY_STATS) + ["iterations", "seconds", "validity"], rows,
                  [False, False] + [True] * (len(LATENCY_STATS) + 2) + [False])]


def _front(fronts: list[tuple[Frontier, Optional[str]]]) -> list[str]:
    lines: list[str] = []
    for f, png in fronts:
        what = metric_label(f"latency/{f.stem}_p50")
        lines += ["", f"## Latency vs accuracy: {f.stem}", "",
                  f"x: {what}, y: mAP50-95; the front holds the configurations no VALID other one beats on both."]
        if png:
            lines += ["", f"![Pareto front, {what} vs mAP50-95]({png})"]
        lines += ["", table(["configuration", what, "mAP50-95"], [[p.label, p.latency, p.map] for p in f.front],
                            [False, True, True]) if f.front else "No configuration has a VALID latency: no front.", ""]
        for margin, floor, p in fastest(f):
            lines.append(f"- fastest configuration with mAP50-95 >= {floor:.4g} (best - {margin:g}): "
                         + (f"**{p.label}**, {p.latency:.4g} ms, mAP50-95 {p.map:.4g}" if p
                            else "none with a VALID latency"))
        left_out = [p.label for p in f.points if not p.valid]
        if left_out:
            lines.append(f"- left out, INVALID latency: {'; '.join(left_out)}")
    return lines


def _per_class(sel: Selection) -> list[str]:
    runs = [r for r in latest_per_config(sel.runs, sel.axes) if any(m.startswith("eval_class/") for m in r.metrics)]
    if not runs:
        return []
    names = sorted({m.removeprefix("eval_class/") for r in runs for m in r.metrics if m.startswith("eval_class/")})
    return ["", "## Per-class AP50-95", "",
            "COCOeval AP50-95 of each class on the target runtime (metrics `eval_class/<class>`); n/a: no ground "
            "truth of that class.", "",
            table(["class"] + [config_label(r, sel.axes) for r in runs],
                  [[n] + [r.metrics.get(f"eval_class/{n}") for r in runs] for n in names],
                  [False] + [True] * len(runs))]


# C++ runner part -> the Python runner's part that times the same thing (rknn_run is the engine call)
CPP_AS_PY = {"run": "infer"}


def python_twin(run: RunRecord, runs: list[RunRecord]) -> Optional[RunRecord]:
    """The runner=python run of the same configuration as a runner=cpp run (a `runner=python,cpp` sweep)."""
    same = {k: v for k, v in run.params.items() if k != "runner"}
    return next((o for o in runs if o.param("runner") == "python"
                 and {k: v for k, v in o.params.items() if k != "runner"} == same), None)


def _cpp(sel: Selection) -> list[str]:
    """Only when a run has C++ runner times (`latency/<where>_cpp_<part>_ms_p50`); the Python times come from the
    same run or from its runner=python twin."""
    rows = []
    for r in sel.runs:
        twin = python_twin(r, sel.runs) if r.param("runner") == "cpp" else r
        for found in filter(None, (CPP.fullmatch(m) for m in sorted(r.metrics))):
            part = CPP_AS_PY.get(found["part"], found["part"])
            py = twin.metrics.get(f"latency/{found['place']}_py_{part}_ms_p50") if twin else None
            cpp = r.metrics[found.group(0)]
            rows.append([r.name, found["place"], found["part"], py, cpp, py / cpp if py and cpp else None])
    if not rows:
        return []
    return ["", "## Python vs C++ latency", "",
            "The same configuration timed by the Python runner and the C++ runner, p50 in ms; Python / C++ above 1 "
            "means C++ is faster.", "",
            table(["run", "where", "part", "Python p50 (ms)", "C++ p50 (ms)", "Python / C++"], rows,
                  [False, False, False, True, True, True])]


def gate_table(rows: list[Row]) -> str:
    return table(["configuration", "metric", "baseline", "current", "delta", "threshold", "noise", "verdict"],
                 [[r.config, r.metric, r.baseline, r.current, r.delta, str(r.term), r.noise or None, r.verdict]
                  for r in rows], [False, False, True, True, True, True, True, False])


def _gate(rows: Optional[list[Row]], baseline: str) -> list[str]:
    if rows is None:
        return []
    failed = sum(r.fails for r in rows)
    return ["", "## Baseline gate", "",
            f"Against `{baseline}`: " + (f"**FAILED**, {failed} regression{'s' * (failed != 1)}" if failed else "passed")
            + ". A regression is worse than its threshold and than the measured noise (2 standard errors of the "
              "difference, from the runs' cv and iteration counts).", "", gate_table(rows)]


def _counts(sel: Selection) -> list[str]:
    confs = count_conf(sel.runs)
    rows = [[r.name, c] + [r.metrics.get(f"counts/c{c}/{k}") for k in COUNT_FIELDS]
            for r in sel.runs for c in confs if f"counts/c{c}/gt" in r.metrics]
    if not rows:
        return []
    return ["", "## Detections per confidence threshold", "",
            "correct: matched to an unmatched ground-truth box of its class (IoU >= 0.5, best score first); "
            "false: not matched; missed: ground truth left unmatched. false_ratio = false / (correct + false).", "",
            table(["run", "conf"] + list(COUNT_FIELDS), rows, [False, True] + [True] * len(COUNT_FIELDS))]


def render(sel: Selection, pivots: list[tuple[Pivot, Optional[str]]], generated: datetime,
           limits: Limits = Limits(), fronts: Sequence[tuple[Frontier, Optional[str]]] = (),
           gate: Optional[list[Row]] = None, baseline: str = "", studies: Sequence[str] = ()) -> str:
    """The whole report; `pivots` and `fronts` pair each with its plot file name (relative), or None;
    `gate` the baseline comparison rows, if one was asked for; `studies` the studies' own sections' lines."""
    lines = (_header(sel, generated) + _gate(gate, baseline) + _search(sel) + _where(sel) + study_section(sel)
             + _runs_table(sel, limits) + _reused(sel) + _collapsed(sel) + _failures(sel) + _pivots(pivots)
             + _front(list(fronts)) + list(studies) + _per_class(sel) + _cpp(sel) + _latency(sel, limits) + _counts(sel))
    return "\n".join(lines) + "\n"
