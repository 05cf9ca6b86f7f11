"""Read-only lookups of measured runs straight from an MLflow sqlite store, for the no-op resume.

Re-running a sweep whose every configuration is already measured, by runs that one earlier sweep
already holds, changes nothing: there is no run to start and no membership to record. Deciding that
through MLflow costs ~2 s of imports, more than everything else on that path; these few queries over
MLflow's stable core tables (experiments, runs, tags, latest_metrics) cost milliseconds. The database is
opened read-only; any doubt (another schema, an error) returns None and the normal path, through MLflow,
decides. A store that is not a sqlite file (a tracking server on PostgreSQL) is asked the same question
through MLflow's client (`measured_runs_via_client`), so a finished sweep run again is a no-op there too."""

from __future__ import annotations

import sqlite3
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional


@dataclass
class Measured:
    run_id: str
    name: str
    started: str
    parents: set[str] = field(default_factory=set)    # the sweeps holding it (measured there or linked)
    metrics: dict[str, float] = field(default_factory=dict)


def _started(start_ms: Optional[int]) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime((start_ms or 0) / 1000))


def _connect(db: Path) -> sqlite3.Connection:
    return sqlite3.connect(f"{db.as_uri()}?mode=ro", uri=True, timeout=5)


def measured_runs(db: Optional[Path], experiment: str, identities: list[str]) -> Optional[dict[str, Measured]]:
    """identity -> the newest FINISHED measured run with it; None unless every identity has one."""
    if db is None or not db.is_file():
        return None
    marks = ",".join("?" * len(identities))
    try:
        with _connect(db) as con:
            row = con.execute("SELECT experiment_id FROM experiments WHERE name = ? AND lifecycle_stage = 'active'",
                              (experiment,)).fetchone()
            if row is None:
                return None
            rows = con.execute(
                "SELECT t.value, r.run_uuid, r.name, r.start_time, k.value FROM runs r "
                "JOIN tags t ON t.run_uuid = r.run_uuid AND t.key = 'rkbench.identity' "
                "JOIN tags k ON k.run_uuid = r.run_uuid AND k.key = 'rkbench.kind' "
                f"WHERE r.experiment_id = ? AND r.lifecycle_stage = 'active' AND r.status = 'FINISHED' "
                f"AND t.value IN ({marks}) ORDER BY r.start_time", (row[0], *identities)).fetchall()
            found: dict[str, Measured] = {}
            holders: dict[str, set[str]] = {}
            for identity, run_id, name, start, kind in rows:
                if kind == "config":   # newest measured run wins (ordered by start time)
                    found[identity] = Measured(run_id, name or run_id, _started(start))
                holders.setdefault(identity, set()).add(run_id)
            if set(found) != set(identities):
                return None
            for identity, m in found.items():
                ids = sorted(holders[identity])
                parents = con.execute(
                    f"SELECT t.value FROM tags t JOIN runs p ON p.run_uuid = t.value AND p.status = 'FINISHED' "
                    f"AND p.lifecycle_stage = 'active' WHERE t.key = 'mlflow.parentRunId' "
                    f"AND t.run_uuid IN ({','.join('?' * len(ids))})", ids).fetchall()
                m.parents = {p for (p,) in parents}
                m.metrics = {k: v for k, v in con.execute(
                    "SELECT key, value FROM latest_metrics WHERE run_uuid = ?", (m.run_id,)).fetchall()}
            return found
    except sqlite3.Error:
        return None


def measured_runs_via_client(uri: str, experiment: str, identities: list[str]) -> Optional[dict[str, Measured]]:
    """`measured_runs` through MLflow's client, for a tracking server or any store that is not a sqlite
    file: one search per identity, one lookup per parent. None on any error (server down, ...): the
    normal path then decides, and says what is wrong."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    try:
        client = MlflowClient(tracking_uri=uri)
        exp = client.get_experiment_by_name(experiment)
        if exp is None or exp.lifecycle_stage != "active":
            return None
        found: dict[str, Measured] = {}
        parent_finished: dict[str, bool] = {}
        for identity in identities:
            runs = client.search_runs([exp.experiment_id], max_results=1000, order_by=["attributes.start_time DESC"],
                                      filter_string=f"tags.`rkbench.identity` = '{identity}' "
                                                    "and attributes.status = 'FINISHED'")
            measured = [r for r in runs if r.data.tags.get("rkbench.kind") == "config"]
            if not measured:
                return None
            newest = measured[0]
            m = Measured(newest.info.run_id, newest.info.run_name or newest.info.run_id, _started(newest.info.start_time),
                         metrics=dict(newest.data.metrics))
            for parent in {r.data.tags.get("mlflow.parentRunId") for r in runs} - {None}:
                if parent not in parent_finished:
                    run = client.get_run(parent)
                    parent_finished[parent] = run.info.status == "FINISHED" and run.info.lifecycle_stage == "active"
                if parent_finished[parent]:
                    m.parents.add(parent)
            found[identity] = m
        return found
    except (MlflowException, OSError):
        return None


def holding_sweep(found: dict[str, Measured]) -> Optional[str]:
    """A FINISHED sweep that already holds every one of these runs (measured in it or linked), if any."""
    common = set.intersection(*(m.parents for m in found.values())) if found else set()
    return sorted(common)[0] if common else None
