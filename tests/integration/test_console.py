"""What an engineer sees on the console and finds in MLflow, through the real entry point (Hydra, the
exporter, rknn-toolkit2 and its simulator, ONNX Runtime, MLflow sqlite in a temp folder). Small: 6 images
at 96-128 px. The first run is a real process on a pseudo-terminal (the bars); the others run in-process."""

from __future__ import annotations

import fcntl
import os
import pty
import struct
import subprocess
import sys
import termios
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from rkbench.__main__ import main

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("console")


def store(workdir) -> str:
    return f"sqlite:///{workdir / 'shared' / 'mlflow.db'}"


def small(workdir) -> list[str]:
    return [f"cache_dir={workdir / 'cache'}", "tracking.experiment=console", "dataset.limit=6", "calib.size=4"]


def config_runs(uri: str, experiment: str = "console", kind: str = "config"):
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(experiment)
    return client, client.search_runs([exp.experiment_id], filter_string=f"tags.`rkbench.kind` = '{kind}'",
                                      order_by=["attributes.start_time ASC"])


def on_a_terminal(argv: list[str], cwd: Path, env: dict[str, str]) -> tuple[int, str, str]:
    """`python -m rkbench` with stdout piped (a log) and stderr on a pseudo-terminal, as in a shell."""
    reader, writer = pty.openpty()
    fcntl.ioctl(writer, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 160, 0, 0))
    proc = subprocess.Popen([sys.executable, "-m", "rkbench", *argv], cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=writer, stdin=subprocess.DEVNULL, text=True)
    os.close(writer)
    shown = []
    while True:
        try:
            chunk = os.read(reader, 65536)
        except OSError:          # EIO: the process closed the terminal
            break
        if not chunk:
            break
        shown.append(chunk)
    out = proc.stdout.read()
    proc.wait(timeout=600)
    os.close(reader)
    return proc.returncode, out, b"".join(shown).decode(errors="replace")


def test_a_run_says_what_it_does_and_where_its_numbers_and_models_are(workdir):
    env = dict(os.environ, PYTHONPATH=str(REPO), MLFLOW_TRACKING_URI=store(workdir))
    (workdir / "shared").mkdir()
    code, out, terminal = on_a_terminal(small(workdir) + ["resolution=96"], workdir, env)
    assert code == 0, out[-3000:] + terminal[-3000:]
    # the stages in words, in the log (stdout) ...
    assert "evaluating 6 images with ONNX Runtime on the host CPU (float reference)" in out
    assert "converting for rk3588 with rknn-toolkit2 2.5.0 (int8, normal, 4 calibration images)" in out
    assert "evaluating 6 images on the rknn-toolkit2 simulator" in out
    assert "cache miss" not in out and "cache hit" not in out
    # ... and as bars on the terminal: images with rate and ETA, the time ticking while the toolkit converts
    assert "evaluating 6 images on the rknn-toolkit2 simulator:" in terminal and "img/s" in terminal
    assert "converting for rk3588 with rknn-toolkit2 2.5.0 (int8, normal, 4 calibration images): 00:0" in terminal

    # MLflow's own variable chose the store; nothing went to ./mlflow.db
    assert not (workdir / "mlflow.db").exists()
    client, [run] = config_runs(store(workdir))
    run_id = run.info.run_id
    assert run.info.run_name == "demo_yolov8n 96 calib.size=4"
    assert f"run     {run_id}  demo_yolov8n 96 calib.size=4" in out
    assert f"browse: mlflow ui --backend-store-uri sqlite:///{workdir / 'shared' / 'mlflow.db'}" in out
    # the models are in the run's artifacts, and their stage-cache files are printed
    held = {a.path for a in client.list_artifacts(run_id, "model")}
    assert held == {"model/model.onnx", "model/model.rknn"}
    assert run.data.tags["rkbench.artifact.rknn"] == f"{run_id}/model/model.rknn"
    models = out.split("models in the stage cache")[1]
    for line in [ln for ln in models.splitlines()[1:] if ln.strip()]:
        for path in line.split(": ", 1)[1].split():
            assert (workdir / path).is_file() and path.endswith((".onnx", ".rknn")), path


def test_the_same_model_is_logged_once_and_a_second_run_shows_the_stored_numbers(workdir, monkeypatch, capsys):
    monkeypatch.chdir(workdir)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store(workdir))
    assert main(small(workdir) + ["resolution=96", "resume=false"]) == 0
    client, (first, again) = config_runs(store(workdir))
    assert client.list_artifacts(again.info.run_id, "model") == []           # same bytes: not copied again
    for kind in ("onnx", "rknn"):
        assert again.data.tags[f"rkbench.artifact.{kind}"] == first.data.tags[f"rkbench.artifact.{kind}"]
    capsys.readouterr()

    assert main(small(workdir) + ["resolution=96"]) == 0
    out = capsys.readouterr().out
    row = next(ln for ln in out.splitlines() if ln.startswith("demo_yolov8n 96 calib.size=4"))
    assert "REUSED" in row and f"{again.data.metrics['eval/map50_95']:.4g}" in row
    assert f"run     {again.info.run_id}" in out and "mlflow ui --backend-store-uri sqlite:///" in out


def test_a_sweep_shows_its_progress_and_its_parent_holds_the_best_and_fastest(workdir, monkeypatch, capsys):
    monkeypatch.chdir(workdir)
    uri = f"sqlite:///{workdir / 'sweep.db'}"
    assert main(["-m"] + small(workdir) + [f"tracking.uri={uri}", "target=onnxruntime", "resolution=96,128"]) == 0
    captured = capsys.readouterr()
    out = captured.out
    assert "configuration 1/2: demo_yolov8n 96" in out and "configuration 2/2, ETA " in out
    assert "img/s" not in captured.err                                   # not a terminal: no bars
    client, children = config_runs(uri)
    _, [parent] = config_runs(uri, kind="sweep")
    assert sorted(r.info.run_name for r in children) == ["demo_yolov8n 128", "demo_yolov8n 96"]
    assert parent.info.run_name == "console: resolution"
    best = max(children, key=lambda r: r.data.metrics["eval/map50_95"])
    fastest = min(children, key=lambda r: r.data.metrics["latency/host_infer_ms_p50"])
    assert parent.data.metrics["sweep/best_map50_95"] == best.data.metrics["eval/map50_95"]
    assert parent.data.tags["rkbench.best_map50_95"] == f"{best.info.run_name} ({best.info.run_id})"
    assert parent.data.metrics["sweep/fastest_host_infer_ms_p50"] == fastest.data.metrics["latency/host_infer_ms_p50"]
    assert parent.data.tags["rkbench.fastest_host_infer_ms_p50"] == f"{fastest.info.run_name} ({fastest.info.run_id})"
    assert f"parent  {parent.info.run_id}  console: resolution" in out
    assert all(f"run     {r.info.run_id}  {r.info.run_name}" in out for r in children)
    assert f"mlflow ui --backend-store-uri sqlite:///{workdir / 'sweep.db'}" in out
