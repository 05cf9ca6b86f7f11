"""The MLflow store and the demo dataset under concurrent starts, kill -9 and Ctrl-C, with real processes.

Concurrent starts use a barrier: every child imports what it needs, says `ready`, and waits for `go` on
stdin, so the racy part starts at the same moment in all of them (no sleeps, no timing assertions)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

from mlflow.tracking import MlflowClient

from rkbench.tracking import Tracker

REPO = Path(__file__).resolve().parents[2]


def spawn(code: str, *args: str, cwd: Path | None = None) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code), *args], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=cwd)


def all_at_once(procs: list[subprocess.Popen]) -> list[tuple[int, str, str]]:
    """Release the barrier once every child is ready; (returncode, stdout, stderr) of each."""
    for p in procs:
        assert p.stdout.readline().strip() == "ready", p.communicate()[1]
    for p in procs:
        p.stdin.write("go\n")
        p.stdin.flush()
    results = []
    for p in procs:
        out, err = p.communicate(timeout=300)
        results.append((p.returncode, out, err))
    return results


LOG_RUNS = """
    import sys
    from rkbench.tracking import Tracker
    print("ready", flush=True)
    sys.stdin.readline()
    tracker = Tracker(sys.argv[1], "race")
    for i in range(3):
        run = tracker.start(f"{sys.argv[2]}-{i}", {"rkbench.kind": "config"})
        tracker.log(run, {"eval/map50_95": 0.5}, {"resolution": "320"}, {"rkbench.status": "FINISHED"})
        tracker.end(run, "FINISHED")
    print("done")
"""


def test_concurrent_starts_on_a_fresh_sqlite_store_all_succeed(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    results = all_at_once([spawn(LOG_RUNS, uri, f"p{n}") for n in range(3)])
    for rc, out, err in results:
        assert rc == 0 and out.strip().endswith("done"), err[-2000:]
    client = MlflowClient(tracking_uri=uri)
    [exp] = [e for e in client.search_experiments() if e.name == "race"]
    runs = client.search_runs([exp.experiment_id])
    assert sorted(r.info.run_name for r in runs) == sorted(f"p{n}-{i}" for n in range(3) for i in range(3))
    assert {r.info.status for r in runs} == {"FINISHED"}


LOAD_DEMO = """
    import sys
    from rkbench.data.demo import demo_dataset
    print("ready", flush=True)
    sys.stdin.readline()
    ds = demo_dataset(sys.argv[1], n_val=24)
    print(" ".join(str(r.path.stat().st_ino) for r in ds.images))
"""


def test_concurrent_demo_generation_shares_one_folder(tmp_path):
    """Both processes see the demo folder missing and start together: the second must wait for the first
    and use its folder, not generate its own and rename it over the folder the first is reading."""
    root = tmp_path / "cache" / "datasets" / "demo"
    results = all_at_once([spawn(LOAD_DEMO, str(root)) for _ in range(2)])
    for rc, _, err in results:
        assert rc == 0, err[-2000:]
    first, second = (out.split() for _, out, _ in results)
    assert len(first) == 24 and first == second, "the second process replaced the first one's images"
    assert [p.name for p in root.parent.iterdir()] == ["demo"]   # no temp folders or lock files left


OWN_RUNS = """
    import sys
    from rkbench.tracking import Tracker
    tracker = Tracker(sys.argv[1], "reap")
    parent = tracker.start("sweep", {"rkbench.kind": "sweep"})
    child = tracker.start("cfg", {"rkbench.kind": "config"}, parent=parent)
    print(parent, child, flush=True)
    sys.stdin.readline()        # RUNNING until killed
"""


def test_reap_marks_runs_of_a_killed_process_killed_and_leaves_live_and_foreign_runs(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    victim = spawn(OWN_RUNS, uri)
    parent, child = victim.stdout.readline().split()
    survivor = spawn(OWN_RUNS, uri)
    live_runs = survivor.stdout.readline().split()
    victim.send_signal(signal.SIGKILL)
    victim.wait()

    tracker = Tracker(uri, "reap")
    mine = tracker.start("here", {"rkbench.kind": "config"})
    foreign = tracker.start("other host", {"rkbench.kind": "config"})
    tracker.log(foreign, tags={"rkbench.host": "another-machine", "rkbench.pid": str(victim.pid)})
    reused = tracker.start("pid reused", {"rkbench.kind": "config"})   # our pid, but another process's start
    tracker.log(reused, tags={"rkbench.pid_started": "12.000"})
    try:
        assert sorted(tracker.reap_orphans()) == sorted([parent, child, reused])
        for run_id in (parent, child, reused):
            run = tracker.client.get_run(run_id)
            assert run.info.status == "KILLED" and run.data.tags["rkbench.status"] == "KILLED"
            assert "ended while the run was RUNNING" in run.data.tags["rkbench.error"]
        for run_id in (*live_runs, mine, foreign):
            assert tracker.client.get_run(run_id).info.status == "RUNNING"
        assert tracker.reap_orphans() == []
    finally:
        survivor.kill()
        survivor.wait()


def test_ctrl_c_prints_one_line_keeps_finished_runs_and_the_same_command_resumes(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    args = ["-m", "resolution=64,96", "target=onnxruntime", "simplify=none", "dataset.limit=4",
            f"cache_dir={tmp_path / 'cache'}", f"tracking.uri={uri}", "tracking.experiment=ctrlc"]
    env = dict(os.environ, PYTHONPATH=str(REPO))
    with open(tmp_path / "stderr.txt", "w") as err_file:
        proc = subprocess.Popen([sys.executable, "-m", "rkbench", *args], cwd=tmp_path, env=env, text=True,
                                stdout=subprocess.PIPE, stderr=err_file)
        started = 0
        for line in proc.stdout:
            started += ": MLflow run " in line
            if started == 2:                # the second configuration's run is started: it is exporting
                break
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=300)
    err = (tmp_path / "stderr.txt").read_text()
    assert proc.returncode == 130, err[-3000:]
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("rkbench: interrupted (Ctrl-C) after 1 completed configuration(s)")
    assert last.endswith("python -m rkbench " + " ".join(args))

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("ctrlc")
    status = {r.data.params.get("resolution", "sweep"): r.info.status for r in client.search_runs([exp.experiment_id])}
    assert status == {"64": "FINISHED", "96": "KILLED", "sweep": "KILLED"}

    again = subprocess.run([sys.executable, "-m", "rkbench", *args], cwd=tmp_path, env=env, text=True,
                           capture_output=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "REUSED" in again.stdout
