"""A configuration is one well-defined thing: what resume, sweeps and reports do with it, end to end
through the real entry point (Hydra, exporter, ONNX Runtime, MLflow sqlite in tmp_path). ONNX Runtime
targets keep it fast; the rules are the same for the simulator and the board (tests/unit/test_spec.py)."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest
from mlflow.tracking import MlflowClient

from rkbench.__main__ import main
from rkbench.config import ASSETS

pytestmark = pytest.mark.slow


@pytest.fixture()
def work(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


def common(work) -> list[str]:
    return [f"cache_dir={work / 'cache'}", f"tracking.uri=sqlite:///{work / 'mlflow.db'}", "tracking.experiment=id",
            "dataset.limit=6", "resolution=96", "target=onnxruntime"]


def client(work) -> tuple[MlflowClient, str]:
    c = MlflowClient(tracking_uri=f"sqlite:///{work / 'mlflow.db'}")
    return c, c.get_experiment_by_name("id").experiment_id


def search(work, query: str):
    c, exp = client(work)
    return c.search_runs([exp], filter_string=query, order_by=["attributes.start_time ASC"])


def retrain_in_place(path) -> None:
    """What `yolo train ... project=runs name=best exist_ok=True` does to a path: new weights, same name."""
    import torch

    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    with torch.no_grad():
        conv = next(m for m in ckpt["model"].modules() if isinstance(m, torch.nn.Conv2d))
        conv.weight.mul_(0.5)
    torch.save(ckpt, path)


def test_retrained_weights_at_the_same_path_are_measured_again(work, capsys):
    weights = work / "runs" / "best.pt"
    weights.parent.mkdir()
    shutil.copy(ASSETS / "demo_yolov8n.pt", weights)
    argv = common(work) + [f"model.weights={weights}"]
    assert main(argv) == 0
    assert main(argv) == 0
    assert "REUSED" in capsys.readouterr().out             # same bytes: nothing to measure again
    retrain_in_place(weights)
    assert main(argv) == 0
    assert "FINISHED" in capsys.readouterr().out           # same path, new bytes: measured again
    measured = search(work, "tags.`rkbench.kind` = 'config'")
    assert len(measured) == 2
    old, new = (r.data.tags["rkbench.input.model.weights"] for r in measured)
    assert old != new and measured[0].data.tags["rkbench.identity"] != measured[1].data.tags["rkbench.identity"]
    assert measured[0].data.metrics["eval/map50_95"] != measured[1].data.metrics["eval/map50_95"]


def test_a_later_sweep_links_shared_runs_and_earlier_reports_stay_the_same(work, capsys):
    first = ["-m"] + common(work) + ["eval.iou=0.6,0.7"]
    assert main(first) == 0
    [sweep_a] = search(work, "tags.`rkbench.kind` = 'sweep'")
    report = ["report", "--tracking-uri", f"sqlite:///{work / 'mlflow.db'}", "--experiment", "id", "--no-plots",
              "--parent", sweep_a.info.run_id]
    assert main(report + ["--out", str(work / "before")]) == 0
    assert main(["-m"] + common(work) + ["eval.iou=0.7,0.65"]) == 0
    out = capsys.readouterr().out
    assert "REUSED" in out and "measured in MLflow run" in out

    assert main(report + ["--out", str(work / "after")]) == 0
    [before] = (work / "before").glob("*.md")
    [after] = (work / "after").glob("*.md")
    strip = lambda text: [ln for ln in text.splitlines() if not ln.startswith("- Generated:")]  # noqa: E731
    assert strip(before.read_text()) == strip(after.read_text())
    assert len(search(work, f"tags.`mlflow.parentRunId` = '{sweep_a.info.run_id}'")) == 2

    sweep_b = max(search(work, "tags.`rkbench.kind` = 'sweep'"), key=lambda r: r.info.start_time)
    under_b = search(work, f"tags.`mlflow.parentRunId` = '{sweep_b.info.run_id}'")
    [link] = [r for r in under_b if r.data.tags["rkbench.kind"] == "link"]
    [measured] = search(work, "tags.`rkbench.kind` = 'config' and params.`eval.iou` = '0.7'")
    assert link.data.tags["rkbench.link_to"] == measured.info.run_id
    assert measured.data.tags["mlflow.parentRunId"] == sweep_a.info.run_id        # not moved
    assert main(report[:-1] + [sweep_b.info.run_id, "--out", str(work / "b")]) == 0
    [text_b] = [p.read_text() for p in (work / "b").glob("*.md")]
    assert "## Reused measurements" in text_b and measured.info.run_id in text_b


def test_axes_without_effect_are_one_measurement(work, capsys):
    assert main(["-m"] + common(work) + ["core_mask=0,0_1_2", "algo=normal,mmse"]) == 0
    out = capsys.readouterr().out
    measured = search(work, "tags.`rkbench.kind` = 'config'")
    links = search(work, "tags.`rkbench.kind` = 'link'")
    assert len(measured) == 1 and len(links) == 3                 # four combinations, one measurement
    assert measured[0].data.params["core_mask"] == "auto" and measured[0].data.params["algo"] == "normal"
    assert "core_mask=0 (NPU cores are chosen only on a board" in measured[0].data.tags["rkbench.collapsed"]
    assert "no effect on the target, collapsed" in out
    # measured again with resume=false, the host latency says it came from the evaluate cache
    assert main(common(work) + ["resume=false"]) == 0
    again = max(search(work, "tags.`rkbench.kind` = 'config'"), key=lambda r: r.info.start_time)
    assert "reused from the evaluate cache, not re-measured" in again.data.tags["rkbench.measure"]


def test_a_finished_sweep_run_again_is_a_no_op_without_mlflow_or_torch(work):
    argv = ["-m"] + common(work) + ["eval.iou=0.6,0.7"]
    assert main(argv) == 0
    before = len(search(work, "attributes.status != 'RUNNING'"))
    probe = ("import sys; from rkbench.__main__ import main; code = main(sys.argv[1:]); "
             "print('heavy:', sorted(m for m in ('mlflow', 'torch', 'rknn.api', 'ultralytics') if m in sys.modules)); "
             "sys.exit(code)")
    proc = subprocess.run([sys.executable, "-c", probe, *argv], cwd=work, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "heavy: []" in proc.stdout                        # decided from the sqlite store, read-only
    assert proc.stdout.count("REUSED") == 2 and "nothing to run" in proc.stdout
    assert len(search(work, "attributes.status != 'RUNNING'")) == before     # no run started
