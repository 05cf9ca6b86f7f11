"""MLflow layout (see ARCHITECTURE.md): experiment = study, a parent run per multirun, a child run per
configuration. Explicit MlflowClient calls, no global active run, so nesting is never implicit."""

from __future__ import annotations

import functools
import logging
import subprocess
import time
from pathlib import Path
from typing import Optional

log = logging.getLogger("rkbench.tracking")


def git_sha() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5,
                              cwd=Path(__file__).parent).stdout.strip() or "unknown"
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"


class Tracker:
    def __init__(self, uri: str, experiment: str):
        import mlflow
        from mlflow.tracking import MlflowClient

        self.uri = uri
        self.client = MlflowClient(tracking_uri=uri)
        self._entities = mlflow.entities
        found = self.client.get_experiment_by_name(experiment)
        if found is None:
            # Keep artifacts beside a sqlite store (not in whatever ./mlruns the cwd has).
            location = None
            if uri.startswith("sqlite:///"):
                location = (Path(uri[len("sqlite:///"):]).expanduser().resolve().parent / "mlartifacts").as_uri()
            self.experiment_id = self.client.create_experiment(experiment, artifact_location=location)
        else:
            self.experiment_id = found.experiment_id
        self._parents: dict[str, Optional[str]] = {}

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
                                                   if k.startswith(("rkbench.device_kind", "rkbench.measure", "versions."))}}),
                            parent=parent)
        self.log(run_id, dict(measured.data.metrics), params=dict(measured.data.params))
        self.end(run_id, "FINISHED")
        return run_id

    @staticmethod
    def started_at(run) -> str:
        return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime((run.info.start_time or 0) / 1000))


    def start(self, name: str, tags: dict[str, str], parent: Optional[str] = None) -> str:
        tags = dict(tags, **{"mlflow.runName": name})
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

    def text(self, run_id: str, text: str, name: str) -> None:
        self.client.log_text(run_id, text, name)

    def end(self, run_id: str, status: str) -> None:
        self.client.set_terminated(run_id, status)


@functools.lru_cache(maxsize=None)
def tracker_for(uri: str, experiment: str) -> Tracker:
    """One client per store and experiment per process (a sweep's jobs share it)."""
    return Tracker(uri, experiment)
