"""MLflow layout (see ARCHITECTURE.md): experiment = study, a parent run per multirun, a child run per
configuration. Explicit MlflowClient calls, no global active run, so nesting is never implicit."""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import platform
import subprocess
import time
from pathlib import Path
from typing import Optional

import psutil

from rkbench.locks import folder_lock

log = logging.getLogger("rkbench.tracking")


def git_sha() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5,
                              cwd=Path(__file__).parent).stdout.strip() or "unknown"
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"


def ui_command(uri: str) -> str:
    """The command that browses this store; a sqlite file by its absolute path, so it works from anywhere."""
    db = sqlite_path(uri)
    return f"mlflow ui --backend-store-uri {'sqlite:///' + str(db) if db else uri}"


def sqlite_path(uri: str) -> Optional[Path]:
    """The database file of a sqlite:/// URI (None for other stores and in-memory sqlite)."""
    if not uri.startswith("sqlite:///"):
        return None
    path = uri[len("sqlite:///"):].split("?", 1)[0]
    return Path(path).expanduser().resolve() if path and path != ":memory:" else None


def owner_tags() -> dict[str, str]:
    """Who runs this process: host, pid and the pid's start time (a reused pid has another start time)."""
    return {"rkbench.host": platform.node(), "rkbench.pid": str(os.getpid()),
            "rkbench.pid_started": f"{psutil.Process().create_time():.3f}"}


def _process_alive(pid: int, started: Optional[str]) -> bool:
    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:   # killed, not yet waited for by its parent: gone
            return False
        return started is None or abs(proc.create_time() - float(started)) < 0.01
    except psutil.NoSuchProcess:
        return False
    except (psutil.AccessDenied, ValueError):        # cannot tell: leave the run alone
        return True


class Tracker:
    def __init__(self, uri: str, experiment: str):
        import mlflow
        from mlflow.tracking import MlflowClient

        self.uri = uri
        self._entities = mlflow.entities
        db = sqlite_path(uri)
        # MLflow creates and migrates a fresh sqlite schema on first connect; two processes doing that at
        # once fail with "table ... already exists". Later writes wait on SQLite's lock: MLflow sets
        # PRAGMA busy_timeout=20000 on every session it opens.
        with folder_lock(db.parent, "tracking.uri") if db else contextlib.nullcontext():
            self.client = MlflowClient(tracking_uri=uri)
            # Keep artifacts beside a sqlite store (not in whatever ./mlruns the cwd has).
            self.experiment_id = self._experiment(experiment, (db.parent / "mlartifacts").as_uri() if db else None)
        self._parents: dict[str, Optional[str]] = {}

    def _experiment(self, name: str, location: Optional[str]) -> str:
        from mlflow.exceptions import MlflowException

        found = self.client.get_experiment_by_name(name)
        if found is not None:
            return found.experiment_id
        try:
            return self.client.create_experiment(name, artifact_location=location)
        except MlflowException as exc:   # another process created it since the lookup (tracking server)
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
            return self.client.get_experiment_by_name(name).experiment_id

    def reap_orphans(self) -> list[str]:
        """Mark KILLED the RUNNING runs of this experiment whose process is gone (kill -9, OOM killer, power
        loss), so they do not stay RUNNING forever; returns their run ids. Only runs started on this host
        are judged (by pid and pid start time); runs of other hosts and runs without owner tags are left
        alone. Assumes one pid namespace per host name (distinct containers have distinct host names)."""
        here = platform.node()
        reaped = []
        for run in self._running():
            tags = run.data.tags
            host = tags.get("rkbench.host", "").split(" ")[0]  # the pipeline rewrites it as "node machine cpu"
            if host != here or not tags.get("rkbench.pid", "").isdigit():
                continue
            pid = int(tags["rkbench.pid"])
            if _process_alive(pid, tags.get("rkbench.pid_started")):
                continue
            reason = f"process {pid} on {host} ended while the run was RUNNING (killed or crashed)"
            self.log(run.info.run_id, tags={"rkbench.status": "KILLED", "rkbench.error": reason,
                                            "rkbench.hint": "re-run the same command: finished runs are reused"})
            self.end(run.info.run_id, "KILLED")
            log.warning("MLflow run %s (%s): %s; marked KILLED", run.info.run_id, run.info.run_name, reason)
            reaped.append(run.info.run_id)
        return reaped

    def _running(self) -> list:
        runs, token = [], None
        while True:
            page = self.client.search_runs([self.experiment_id], filter_string="attributes.status = 'RUNNING'",
                                           max_results=1000, page_token=token)
            runs += list(page)
            token = page.token
            if not token:
                return runs

    # ----------------------------------------------------------------------- identity and membership

    def finished_run(self, identity: str, within: Optional[str] = None):
        """The newest FINISHED measured run (not a link) with this identity; only under parent `within`
        when given. Returns the MLflow Run or None."""
        query = (f"tags.`rkbench.identity` = '{identity}' and tags.`rkbench.kind` = 'config' "
                 "and attributes.status = 'FINISHED'")
        if within:
            query += f" and tags.`mlflow.parentRunId` = '{within}'"
        runs = self.client.search_runs([self.experiment_id], filter_string=query, max_results=1,
                                       order_by=["attributes.start_time DESC"])
        return runs[0] if runs else None

    def sweep_parent(self, sweep_dir: str) -> Optional[str]:
        """The parent run that the sweep callback opened for this multirun dir (None without one)."""
        if sweep_dir not in self._parents:
            runs = self.client.search_runs([self.experiment_id], max_results=1, order_by=["attributes.start_time DESC"],
                                           filter_string=f"tags.`rkbench.kind` = 'sweep' and tags.`rkbench.sweep_dir` = '{sweep_dir}'")
            self._parents[sweep_dir] = runs[0].info.run_id if runs else None
        return self._parents[sweep_dir]

    def link(self, measured, name: str, parent: str, tags: dict[str, str]) -> str:
        """A lightweight child of `parent` standing for a reused run: the measured run's params and metrics
        (so the MLflow UI compares it like any child) and where and when they were measured."""
        run_id = self.start(name, dict(tags, **{"rkbench.kind": "link", "rkbench.status": "REUSED",
                                                "rkbench.link_to": measured.info.run_id,
                                                "rkbench.measured_in": measured.data.tags.get("mlflow.runName", ""),
                                                "rkbench.measured_at": self.started_at(measured),
                                                **{k: v for k, v in measured.data.tags.items()
                                                   if k.startswith(("rkbench.device_kind", "rkbench.measure",
                                                                    "rkbench.artifact.", "versions.", "board.",
                                                                    "rkbench.accuracy.", "rkbench.hybrid."))}}),
                            parent=parent)
        self.log(run_id, dict(measured.data.metrics), params=dict(measured.data.params))
        self.end(run_id, "FINISHED")
        return run_id

    @staticmethod
    def started_at(run) -> str:
        return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime((run.info.start_time or 0) / 1000))


    def start(self, name: str, tags: dict[str, str], parent: Optional[str] = None) -> str:
        tags = {**owner_tags(), **tags, "mlflow.runName": name}
        if parent:
            tags["mlflow.parentRunId"] = parent
        return self.client.create_run(self.experiment_id, tags=tags, run_name=name).info.run_id

    def log(self, run_id: str, metrics: dict[str, float] | None = None, params: dict[str, str] | None = None,
            tags: dict[str, str] | None = None) -> None:
        E = self._entities
        now = int(time.time() * 1000)
        self.client.log_batch(
            run_id,
            metrics=[E.Metric(k, float(v), now, 0) for k, v in (metrics or {}).items()],
            params=[E.Param(k, str(v)[:499]) for k, v in (params or {}).items()],
            tags=[E.RunTag(k, str(v)[:4999]) for k, v in (tags or {}).items()],
        )

    def artifact(self, run_id: str, path: Path, subdir: Optional[str] = None) -> None:
        self.client.log_artifact(run_id, str(path), subdir)

    def model_file(self, run_id: str, kind: str, path: Path, sha256: str) -> str:
        """Log a model file (kind onnx or rknn) once per content in this experiment: the first run with it
        holds it under model/; every run with it gets the tag rkbench.artifact.<kind> = <holder run
        id>/model/<file> (and rkbench.artifact.<kind>.sha256), so a sweep does not copy one model into
        every run. Returns that location."""
        held = self.client.search_runs([self.experiment_id], max_results=1,
                                       filter_string=f"tags.`rkbench.artifact.{kind}.sha256` = '{sha256}'")
        where = held[0].data.tags.get(f"rkbench.artifact.{kind}") if held else None
        if where is None:
            self.client.log_artifact(run_id, str(path), "model")
            where = f"{run_id}/model/{path.name}"
        self.log(run_id, tags={f"rkbench.artifact.{kind}": where, f"rkbench.artifact.{kind}.sha256": sha256})
        return where

    def text(self, run_id: str, text: str, name: str) -> None:
        self.client.log_text(run_id, text, name)

    def end(self, run_id: str, status: str) -> None:
        self.client.set_terminated(run_id, status)


@functools.lru_cache(maxsize=None)
def tracker_for(uri: str, experiment: str) -> Tracker:
    """One client per store and experiment per process (a sweep's jobs share it)."""
    return Tracker(uri, experiment)
