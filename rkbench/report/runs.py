"""What a report is made of, read from MLflow only (the layout in ARCHITECTURE.md): the config runs of
one sweep (or every config run of the experiment), their swept axes, and pivots of a metric over two axes."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from rkbench.errors import ConfigError, DataError
from rkbench.metrics import EVAL_MAP

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
    col: str
    fixed: dict[str, str]                   # the other axes, held at these values
    rows: list[str]
    cols: list[str]
    cells: dict[tuple[str, str], float]     # (row value, col value) -> metric


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
            raise DataError(f"run {parent_run_id} not found in {tracking_uri}: pass a sweep run id "
                            "(tag rkbench.kind=sweep) or leave out --parent") from None
        parent = _record(run)
        experiment_id = run.info.experiment_id
        experiment = client.get_experiment(experiment_id).name
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


def default_pivots(sel: Selection) -> list[tuple[str, str, str]]:
    """eval/map50_95 and each latency p50 over resolution x quantization algorithm (the tables users keep),
    or over the first two swept axes; nothing when neither axis varies."""
    params = {k for r in sel.runs for k in r.params}
    algo = next((k for k in ("quant.algo", "algo") if k in params), None)
    if "resolution" in params and algo:
        row, col = "resolution", algo
    elif len(sel.axes) >= 2:
        row, col = sel.axes[0], sel.axes[1]
    else:
        return []
    if row not in sel.axes and col not in sel.axes:
        return []
    metrics = {m for r in sel.runs for m in r.metrics}
    wanted = [EVAL_MAP] + sorted(m for m in metrics if m.startswith("latency/") and m.endswith("_p50"))
    return [(m, row, col) for m in wanted if m in metrics]


def pivots(sel: Selection, spec: tuple[str, str, str]) -> list[Pivot]:
    """One table of `metric` over row x col per combination of the other axes (so a cell never mixes
    configurations); where runs repeat a configuration the latest one counts."""
    metric, row, col = spec
    metrics = {m for r in sel.runs for m in r.metrics}
    params = {k for r in sel.runs for k in r.params}
    if metric not in metrics:
        raise ConfigError(f"pivot {metric}:{row}:{col}: no run has metric {metric}: pick one of "
                          + ", ".join(sorted(metrics)[:12]))
    for p in (row, col):
        if p not in params:
            raise ConfigError(f"pivot {metric}:{row}:{col}: no run has param {p}: pick one of "
                              + ", ".join(sel.axes or sorted(params)[:12]))
    others = [a for a in sel.axes if a not in (row, col)]
    groups: dict[tuple[str, ...], list[RunRecord]] = {}
    for r in sel.runs:
        if metric in r.metrics:
            groups.setdefault(tuple(r.param(a) for a in others), []).append(r)
    out = []
    for fixed in sorted(groups, key=lambda vals: [sort_key(v) for v in vals]):
        runs = groups[fixed]
        cells = {(r.param(row), r.param(col)): r.metrics[metric] for r in runs}     # oldest first: latest wins
        out.append(Pivot(metric, row, col, dict(zip(others, fixed)),
                         sorted({k[0] for k in cells}, key=sort_key), sorted({k[1] for k in cells}, key=sort_key),
                         cells))
    return out

