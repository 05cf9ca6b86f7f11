"""What a report is made of, read from MLflow only (the layout in ARCHITECTURE.md): the config runs of
one sweep (or every config run of the experiment), their swept axes, and pivots of a metric over two axes."""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from rkbench.errors import ConfigError, DataError
from rkbench.metrics import EVAL_MAP, where

MISSING = "-"   # a param a run does not have


@dataclass
class RunRecord:
    run_id: str
    name: str
    status: str                 # tag rkbench.status, else MLflow's own status
    start_ms: int
    end_ms: Optional[int]
    params: dict[str, str]
    metrics: dict[str, float]
    tags: dict[str, str]

    def param(self, key: str) -> str:
        return self.params.get(key, MISSING)


@dataclass
class Selection:
    tracking_uri: str
    experiment: str
    parent: Optional[RunRecord]     # the sweep run, None when the report covers every config run
    runs: list[RunRecord]           # config runs, oldest first
    axes: list[str] = field(default_factory=list)


@dataclass
class Pivot:
    metric: str
    row: str
    col: Optional[str]                      # None: one column (only the row axis varies)
    fixed: dict[str, str]                   # the other axes, held at these values
    rows: list[str]
    cols: list[str]                         # [""] when col is None
    cells: dict[tuple[str, str], float]     # (row value, col value) -> metric
    reference: dict[tuple[str, str], float] = field(default_factory=dict)   # the same cells' float reference


def _record(run) -> RunRecord:
    tags = dict(run.data.tags)
    return RunRecord(run.info.run_id, tags.get("mlflow.runName") or run.info.run_name or run.info.run_id[:8],
                     tags.get("rkbench.status") or run.info.status, int(run.info.start_time or 0),
                     run.info.end_time, dict(run.data.params), dict(run.data.metrics), tags)


def _search(client, experiment_id: str, filter_string: str, order_by: list[str] | None = None,
            limit: int | None = None) -> list[RunRecord]:
    """Every matching run (MLflow pages results), or the first `limit`."""
    out: list[RunRecord] = []
    token = None
    while True:
        page = client.search_runs([experiment_id], filter_string=filter_string, order_by=order_by,
                                  max_results=limit or 1000, page_token=token)
        out += [_record(r) for r in page]
        token = page.token
        if not token or (limit and len(out) >= limit):
            return out[:limit] if limit else out


def _check_store(tracking_uri: str) -> None:
    """MLflow would silently create an empty store at a mistyped path; say so instead."""
    if tracking_uri.startswith("sqlite:///"):
        path = Path(tracking_uri[len("sqlite:///"):])
    elif tracking_uri.startswith("file:"):
        path = Path(tracking_uri.removeprefix("file://").removeprefix("file:"))
    else:
        return      # a tracking server (or a plain path MLflow resolves itself): it answers for itself
    if not path.exists():
        raise DataError(f"no MLflow store at {path}: run a sweep first (python -m rkbench -m resolution=320,640) "
                        "or pass --tracking-uri")


def load_selection(tracking_uri: str, experiment: str, parent_run_id: str | None = None) -> Selection:
    """The given sweep's config runs; by default the latest sweep of the experiment, else all config runs."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    _check_store(tracking_uri)
    client = MlflowClient(tracking_uri=tracking_uri)
    parent = None
    if parent_run_id:
        try:
            run = client.get_run(parent_run_id)
        except MlflowException:
            raise DataError(f"run {parent_run_id} not found in {tracking_uri}: pass a sweep or config run id "
                            "from that store") from None
        parent = _record(run)
        experiment_id = run.info.experiment_id
        experiment = client.get_experiment(experiment_id).name
        if parent.tags.get("rkbench.kind") in ("config", "link"):     # one configuration run, not a sweep
            return Selection(tracking_uri, experiment, None, [parent], [])
    else:
        found = client.get_experiment_by_name(experiment)
        if found is None:
            names = ", ".join(sorted(e.name for e in client.search_experiments())) or "none"
            raise DataError(f"experiment '{experiment}' not found in {tracking_uri} (have: {names}): "
                            "pass --experiment")
        experiment_id = found.experiment_id
        latest = _search(client, experiment_id, "tags.`rkbench.kind` = 'sweep'", ["attributes.start_time DESC"], 1)
        parent = latest[0] if latest else None

    if parent:
        runs = _search(client, experiment_id, f"tags.`mlflow.parentRunId` = '{parent.run_id}'")
        if not runs:
            raise DataError(f"sweep run {parent.run_id} ({parent.name}) has no config runs: pick another with --parent")
    else:
        runs = _search(client, experiment_id, "tags.`rkbench.kind` = 'config'")
        if not runs:
            raise DataError(f"experiment '{experiment}' in {tracking_uri} has no rkbench runs: run a sweep first "
                            "(python -m rkbench -m resolution=320,640)")
    runs.sort(key=lambda r: (r.start_ms, r.name))
    sel = Selection(tracking_uri, experiment, parent, runs)
    sel.axes = swept_axes(parent, runs)
    return sel


def swept_axes(parent: Optional[RunRecord], runs: list[RunRecord]) -> list[str]:
    """The parent's rkbench.swept keys (a config group like `model` stands for its differing `model.*`
    params), then any other param whose value differs between the runs."""
    keys = sorted({k for r in runs for k in r.params})
    differs = [k for k in keys if len({r.param(k) for r in runs}) > 1]
    axes: list[str] = []
    declared = [k.strip() for k in (parent.tags.get("rkbench.swept", "") if parent else "").split(",") if k.strip()]
    for key in declared:
        axes += [key] if key in keys else [k for k in differs if k.startswith(key + ".")]
    return list(dict.fromkeys(axes + differs))


def sort_key(value: str) -> tuple:
    """Numbers in numeric order, then strings; the missing marker last."""
    if value == MISSING:
        return (2, 0.0, value)
    try:
        return (0, float(value), value)
    except ValueError:
        return (1, 0.0, value)


def varying(sel: Selection, metric: str) -> list[str]:
    """The axes (swept ones first) that take more than one value among the runs that have `metric`."""
    runs = [r for r in sel.runs if metric in r.metrics]
    return [a for a in sel.axes if len({r.param(a) for r in runs}) > 1]


def host_float(metric: str) -> bool:
    """Measured on the float ONNX on the host: ONNX Runtime's mAP and time, the exported ONNX's size."""
    return metric.startswith(("eval_float/", "export/")) or where(metric) == "host"


@functools.cache
def onnx_independent_axes() -> frozenset[str]:
    """Axes that do not change the float ONNX or how the host runs it: the ones spec.APPLIES says have no
    effect on target=onnxruntime (they only change the .rknn or the board)."""
    from rkbench.config import RunConfig
    from rkbench.spec import APPLIES

    host = RunConfig(target="onnxruntime")
    return frozenset(k for keys, applies, _ in APPLIES if not applies(host) for k in keys)


def can_depend(metric: str, axis: str) -> bool:
    return not (host_float(metric) and axis in onnx_independent_axes())


def default_pivots(sel: Selection) -> list[tuple[str, str, Optional[str]]]:
    """eval/map50_95, eval_float/map50_95 and each latency p50 over the axes the sweep varied: the row is
    the first numeric varying axis (resolution, calib.size: it becomes the plot's x axis), else the first
    varying one; the column is the next varying axis, or none (one column) when only one varies.

    Rule for metrics that cannot depend on an axis, judged from what the metric measures, not from its
    values: a host float number (eval_float/*, latency/host_*, export/*) never has as row, column or split
    an axis that only changes the .rknn or the board (algo, calib.*, platform, core_mask, ...; from
    spec.APPLIES), so it is pivoted over the remaining axes, and skipped when none is left. Equal values
    are no reason to skip: that kl_divergence changes nothing is a finding, and the same host time
    measured twice differs by noise alone."""
    metrics = {m for r in sel.runs for m in r.metrics}
    wanted = [EVAL_MAP, "eval_float/map50_95"] + sorted(m for m in metrics if m.startswith("latency/")
                                                         and m.endswith("_p50"))
    out: list[tuple[str, str, Optional[str]]] = []
    for metric in (m for m in wanted if m in metrics):
        axes = [a for a in varying(sel, metric) if can_depend(metric, a)]
        if not axes:
            continue
        runs = [r for r in sel.runs if metric in r.metrics]
        row = next((a for a in axes if numeric([r.param(a) for r in runs])), axes[0])
        col = next((a for a in axes if a != row), None)
        out.append((metric, row, col))
    return out


def numeric(values: list[str]) -> bool:
    return all(sort_key(v)[0] == 0 for v in values)


def reference(metric: str) -> Optional[str]:
    """The float reference of a target-runtime metric: eval/map50_95 -> eval_float/map50_95."""
    return "eval_float/" + metric.removeprefix("eval/") if metric.startswith("eval/") else None


def pivots(sel: Selection, spec: tuple[str, str, Optional[str]]) -> list[Pivot]:
    """One table of `metric` over row x col per combination of the other axes (so a cell never mixes
    configurations); where runs repeat a configuration the latest one counts. col None: one column."""
    metric, row, col = spec
    metrics = {m for r in sel.runs for m in r.metrics}
    params = {k for r in sel.runs for k in r.params}
    name = f"{metric}:{row}:{col}" if col else f"{metric}:{row}"
    if metric not in metrics:
        raise ConfigError(f"pivot {name}: no run has metric {metric}: pick one of " + ", ".join(sorted(metrics)[:12]))
    for p in (row, col):
        if p and p not in params:
            raise ConfigError(f"pivot {name}: no run has param {p}: pick one of " + ", ".join(sel.axes or sorted(params)[:12]))
    # axes the metric cannot depend on do not split it either: those runs measured the same thing
    others = [a for a in sel.axes if a not in (row, col) and can_depend(metric, a)]
    groups: dict[tuple[str, ...], list[RunRecord]] = {}
    for r in sel.runs:
        if metric in r.metrics:
            groups.setdefault(tuple(r.param(a) for a in others), []).append(r)
    ref = reference(metric)
    out = []
    for fixed in sorted(groups, key=lambda vals: [sort_key(v) for v in vals]):
        runs = groups[fixed]
        at = {(r.param(row), r.param(col) if col else ""): r for r in runs}     # oldest first: latest wins
        out.append(Pivot(metric, row, col, dict(zip(others, fixed)),
                         sorted({k[0] for k in at}, key=sort_key), sorted({k[1] for k in at}, key=sort_key),
                         {k: r.metrics[metric] for k, r in at.items()},
                         {k: r.metrics[ref] for k, r in at.items() if ref in r.metrics}))
    return out


# ----------------------------------------------------------------------------------- configurations

def latest_per_config(runs: list[RunRecord], axes: list[str]) -> list[RunRecord]:
    """One run per configuration (its values of `axes`), the latest; runs are oldest first."""
    return list({tuple(r.param(a) for a in axes): r for r in runs}.values())


def config_label(run: RunRecord, axes: list[str]) -> str:
    return ", ".join(f"{a}={run.param(a)}" for a in axes) or run.name


def latency_stem(run: RunRecord) -> Optional[str]:
    """The run's end-to-end latency at the place it was measured (tag rkbench.device_kind), as
    `<where>_<part>_ms`: the runner's py_total or cpp_total on a board, else the timed infer call; None without one."""
    place = run.tags.get("rkbench.device_kind")
    return next((s for s in (f"{place}_py_total_ms", f"{place}_cpp_total_ms", f"{place}_infer_ms") if f"latency/{s}_p50" in run.metrics),
                None) if place else None

