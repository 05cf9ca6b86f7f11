"""MLflow layout (see ARCHITECTURE.md): experiment = study, a parent run per multirun, a child run per
configuration. Explicit MlflowClient calls, no global active run, so nesting is never implicit."""

from __future__ import annotations

import hashlib
import importlib.metadata as md
import json
import logging
import subprocess
import time
from pathlib import Path
from typing import Optional

from rkbench.config import RunConfig, flatten

log = logging.getLogger("rkbench.tracking")

# Keys that say where results go, not what is measured: left out of the fingerprint.
NON_SEMANTIC = ("tracking.", "cache_dir", "resume", "study", "board.adb_host", "board.adb_port", "board.timeout_s")
VERSIONED = ("rknn-toolkit2", "onnx", "onnxruntime", "onnxslim", "torch", "ultralytics", "numpy", "mlflow")


def fingerprint(run: RunConfig) -> str:
    params = {k: v for k, v in flatten(run).items() if not k.startswith(NON_SEMANTIC)}
    return hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:20]


def versions() -> dict[str, str]:
    out = {}
    for pkg in VERSIONED:
        try:
            out[f"versions.{pkg}"] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    try:
        out["versions.rkbench"] = md.version("rkbench")
    except md.PackageNotFoundError:
        pass
    return out


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

    def finished_run(self, fp: str) -> Optional[str]:
        runs = self.client.search_runs([self.experiment_id],
                                       filter_string=f"tags.`rkbench.fingerprint` = '{fp}' and attributes.status = 'FINISHED'",
                                       max_results=1)
        return runs[0].info.run_id if runs else None

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
