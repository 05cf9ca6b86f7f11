from __future__ import annotations

import os
import platform
from pathlib import Path

import psutil

from rkbench.tracking import Tracker, sqlite_path


def test_nested_runs_and_resume_lookup(tmp_path):
    tracker = Tracker(f"sqlite:///{tmp_path}/mlflow.db", "study")
    parent = tracker.start("sweep", {"rkbench.kind": "sweep"})
    child = tracker.start("cfg", {"rkbench.kind": "config", "rkbench.identity": "abc"}, parent=parent)
    tracker.log(child, {"eval/map50_95": 0.5}, {"resolution": "320"}, {"rkbench.status": "FINISHED"})
    assert tracker.finished_run("abc") is None          # still running: not finished
    tracker.end(child, "FINISHED")
    assert tracker.finished_run("abc").info.run_id == child
    assert tracker.finished_run("abc", within=parent).info.run_id == child
    assert tracker.finished_run("abc", within="another-sweep") is None
    assert tracker.finished_run("other") is None
    run = tracker.client.get_run(child)
    assert run.data.tags["mlflow.parentRunId"] == parent
    assert run.data.metrics["eval/map50_95"] == 0.5 and run.data.params["resolution"] == "320"
    assert tracker.client.get_experiment(tracker.experiment_id).artifact_location == (tmp_path / "mlartifacts").as_uri()


def test_runs_record_the_process_that_owns_them(tmp_path):
    tracker = Tracker(f"sqlite:///{tmp_path}/mlflow.db", "study")
    tags = tracker.client.get_run(tracker.start("cfg", {"rkbench.kind": "config"})).data.tags
    assert tags["rkbench.host"] == platform.node() and tags["rkbench.pid"] == str(os.getpid())
    assert abs(float(tags["rkbench.pid_started"]) - psutil.Process().create_time()) < 0.01


def test_sqlite_path():
    assert sqlite_path("sqlite:////abs/m.db") == Path("/abs/m.db")
    assert sqlite_path("sqlite:///rel.db?timeout=5") == Path("rel.db").resolve()
    assert sqlite_path("sqlite://") is None and sqlite_path("sqlite:///:memory:") is None
    assert sqlite_path("http://host:5000") is None
