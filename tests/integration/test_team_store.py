"""The team store (README "Team store"), with real processes: PostgreSQL (the pgserver wheel, on a unix
socket), `mlflow server` on PostgreSQL with a served artifact store on a free port, and `python -m rkbench`
sweeps pointed at it by MLFLOW_TRACKING_URI alone, two of them at once from two processes.

Skipped, saying why, when pgserver or psycopg2 is not installed or PostgreSQL does not start."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest

from tests.conftest import free_port

REPO = Path(__file__).resolve().parents[2]
SWEEP = ["-m", "target=onnxruntime", "dataset.limit=4", "tracking.experiment=team"]   # host float: no conversion


@dataclass
class TeamStore:
    url: str            # what MLFLOW_TRACKING_URI is set to
    artifacts: Path     # the server's --artifacts-destination


def _wait_healthy(url: str, server: subprocess.Popen, log: Path, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.poll() is not None:
            pytest.fail(f"mlflow server exited with {server.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as answer:
                if answer.status == 200:
                    return
        except OSError:
            time.sleep(0.3)
    pytest.fail(f"mlflow server not healthy after {timeout_s} s:\n{log.read_text()[-3000:]}")


def _stop(server: subprocess.Popen) -> None:
    """The server and its workers (own process group). SIGKILL: a graceful uvicorn shutdown waits seconds
    for the clients' keep-alive connections, and a throwaway store has nothing to flush."""
    if server.poll() is None:
        os.killpg(server.pid, signal.SIGKILL)
        server.wait(timeout=10)


@pytest.fixture(scope="module")
def team_store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TeamStore]:
    pgserver = pytest.importorskip("pgserver", reason="PostgreSQL for the team store tests: pip install -e '.[test]'")
    pytest.importorskip("psycopg2", reason="the PostgreSQL driver: pip install -e '.[test]' (psycopg2-binary)")
    root = tmp_path_factory.mktemp("team")
    try:   # as root, pgserver runs postgres as its own system user (postgres refuses to run as root)
        pg = pgserver.get_server(root / "pgdata", cleanup_mode="delete")
        pg.psql("CREATE DATABASE mlflow;")
    except Exception as exc:  # noqa: BLE001 - whatever stops PostgreSQL from starting is the skip reason
        pytest.skip(f"PostgreSQL did not start (pgserver): {type(exc).__name__}: {exc}")
    try:
        # postgresql+psycopg2: SQLAlchemy 2.1 maps a bare postgresql:// to psycopg 3
        db = pg.get_uri("mlflow").replace("postgresql://", "postgresql+psycopg2://", 1)
        port = free_port()
        log = root / "mlflow-server.log"
        # rkbench needs none of MLflow's GenAI job runners (extra processes on a 2-core CI machine)
        env = dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
        with open(log, "w") as out:
            server = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--backend-store-uri", db,
                                       "--artifacts-destination", str(root / "artifacts"), "--host", "127.0.0.1",
                                       "--port", str(port), "--workers", "2"],
                                      stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                      start_new_session=True, cwd=root, env=env)
        try:
            url = f"http://127.0.0.1:{port}"
            _wait_healthy(url, server, log, timeout_s=90)   # creates and migrates the schema on first start
            yield TeamStore(url, root / "artifacts")
        finally:
            _stop(server)
    finally:
        pg.cleanup()


def rkbench(store: TeamStore, cwd: Path, *args: str) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "RKBENCH_"))}
    env.update(PYTHONPATH=str(REPO), MLFLOW_TRACKING_URI=store.url)
    return subprocess.Popen([sys.executable, "-m", "rkbench", *args], cwd=cwd, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)


def finished(proc: subprocess.Popen) -> str:
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, f"rc {proc.returncode}\n{out[-3000:]}\n{err[-3000:]}"
    assert "database is locked" not in out + err
    return out


def runs_of(client, experiment_id: str) -> list:
    return client.search_runs([experiment_id], max_results=1000)


def test_two_sweeps_at_once_then_resume_links_and_report(team_store: TeamStore, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    from mlflow.tracking import MlflowClient

    from rkbench.__main__ import main

    # two sweeps from two processes at once, one cwd and stage cache, on a fresh experiment (both create it)
    first, second = (rkbench(team_store, tmp_path, *SWEEP, f"resolution={r}") for r in ("64,96", "128,160"))
    for out in (finished(first), finished(second)):
        assert f"browse: open {team_store.url}" in out and "View run" not in out

    client = MlflowClient(tracking_uri=team_store.url)
    exp = client.get_experiment_by_name("team")
    runs = runs_of(client, exp.experiment_id)
    sweeps = {r.info.run_id: r for r in runs if r.data.tags["rkbench.kind"] == "sweep"}
    configs = [r for r in runs if r.data.tags["rkbench.kind"] == "config"]
    assert len(sweeps) == 2 and {r.info.status for r in sweeps.values()} == {"FINISHED"}
    children = {p: sorted(r.info.run_name for r in configs if r.data.tags["mlflow.parentRunId"] == p) for p in sweeps}
    assert sorted(children.values()) == [["demo_yolov8n 128", "demo_yolov8n 160"], ["demo_yolov8n 64", "demo_yolov8n 96"]]
    assert len(configs) == 4 and {r.info.status for r in configs} == {"FINISHED"}          # none lost, none twice
    assert len({r.data.tags["rkbench.identity"] for r in configs}) == 4
    assert all(s.data.metrics["sweep/finished"] == 2 for s in sweeps.values())
    # the models went to the server's artifact store (proxied: the client never sees the folder)
    holder, _, _ = configs[0].data.tags["rkbench.artifact.onnx"].partition("/")
    assert [f.path for f in client.list_artifacts(holder, "model")] == ["model/model.onnx"]
    assert list(team_store.artifacts.rglob("model.onnx"))

    # in this process from here: the same sweep again is a no-op, decided through the server as from sqlite
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", team_store.url)
    assert main([*SWEEP, "resolution=64,96"]) == 0
    assert "nothing to run" in capsys.readouterr().out
    assert len(runs_of(client, exp.experiment_id)) == len(runs)

    # a sweep over both: four links to the measured runs under a new parent, no new measurement
    assert main([*SWEEP, "resolution=64,96,128,160"]) == 0
    assert capsys.readouterr().out.count("REUSED") == 4
    after = runs_of(client, exp.experiment_id)
    links = [r for r in after if r.data.tags["rkbench.kind"] == "link"]
    [union] = [r for r in after if r.data.tags["rkbench.kind"] == "sweep" and r.info.run_id not in sweeps]
    assert len(after) == len(runs) + 5 and union.info.status == "FINISHED"
    assert {r.data.tags["mlflow.parentRunId"] for r in links} == {union.info.run_id}
    assert sorted(r.data.tags["rkbench.link_to"] for r in links) == sorted(r.info.run_id for r in configs)

    # the report of that sweep (the latest), read from the server
    assert main(["report", "--tracking-uri", team_store.url, "--experiment", "team", "--out", str(tmp_path / "reports"),
                 "--no-plots"]) == 0
    [md] = (tmp_path / "reports").glob("*.md")
    text = md.read_text()
    assert all(f"demo_yolov8n {r}" in text for r in (64, 96, 128, 160)) and "Reused measurements" in text


def test_a_tracking_server_that_does_not_answer_stops_the_sweep_before_any_work(tmp_path: Path, monkeypatch, capsys):
    from rkbench.__main__ import main

    monkeypatch.chdir(tmp_path)
    url = f"http://127.0.0.1:{free_port()}"     # nothing listens there
    assert main([*SWEEP, "resolution=64", f"tracking.uri={url}", f"cache_dir={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert f"tracking.uri={url}: no MLflow server answers" in err and "Team store" in err


def test_the_resume_lookup_through_mlflow_agrees_with_the_sqlite_one(tmp_path: Path) -> None:
    """ledger.measured_runs_via_client (tracking servers) and ledger.measured_runs (sqlite, read directly)
    answer the same on the same store: measured runs, the sweeps holding them (FINISHED ones only), metrics."""
    from rkbench.ledger import holding_sweep, measured_runs, measured_runs_via_client
    from rkbench.tracking import Tracker

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = Tracker(uri, "ledger")

    def sweep(status: str, children: dict[str, str]) -> str:
        parent = tracker.start("sweep", {"rkbench.kind": "sweep"})
        for identity, kind in children.items():
            run = tracker.start(identity, {"rkbench.kind": kind, "rkbench.identity": identity}, parent=parent)
            tracker.log(run, {"eval/map50_95": 0.5})
            tracker.end(run, "FINISHED")
        tracker.end(parent, status)
        return parent

    first = sweep("FINISHED", {"a": "config", "b": "config"})
    second = sweep("FINISHED", {"a": "link", "b": "link"})
    sweep("KILLED", {"a": "link"})                        # a killed sweep holds nothing
    db = tmp_path / "mlflow.db"
    direct, client = measured_runs(db, "ledger", ["a", "b"]), measured_runs_via_client(uri, "ledger", ["a", "b"])
    assert direct == client and direct is not None
    assert client["a"].parents == {first, second} and client["a"].metrics == {"eval/map50_95": 0.5}
    assert holding_sweep(client) == holding_sweep(direct) == min(first, second)
    assert measured_runs_via_client(uri, "ledger", ["a", "c"]) is None                # c never measured
    assert measured_runs(db, "ledger", ["a", "c"]) is None
    assert measured_runs_via_client(uri, "no such experiment", ["a"]) is None
