"""End to end through the real entry point: Hydra composes conf/, the real exporter, rknn-toolkit2 and its
simulator, ONNX Runtime, pycocotools and MLflow (sqlite in tmp_path). Small: 6 images, 96-128 px."""

from __future__ import annotations

import pytest
from mlflow.tracking import MlflowClient

from rkbench.__main__ import main

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("pipeline")


def common(workdir) -> list[str]:
    return [f"cache_dir={workdir / 'cache'}", f"tracking.uri=sqlite:///{workdir / 'mlflow.db'}",
            "tracking.experiment=it", "dataset.limit=6", "calib.size=4"]


def runs(workdir, kind: str = "config", parent: str | None = None):
    client = MlflowClient(tracking_uri=f"sqlite:///{workdir / 'mlflow.db'}")
    exp = client.get_experiment_by_name("it")
    query = f"tags.`rkbench.kind` = '{kind}'" + (f" and tags.`mlflow.parentRunId` = '{parent}'" if parent else "")
    return client.search_runs([exp.experiment_id], filter_string=query)


def members(workdir, parent: str):
    return runs(workdir, "config", parent) + runs(workdir, "link", parent)


def test_single_run_logs_quantized_and_float_accuracy(workdir, monkeypatch, capsys):
    monkeypatch.chdir(workdir)
    assert main(common(workdir) + ["resolution=128"]) == 0
    out = capsys.readouterr().out
    assert "Only board numbers are NPU latency" in out
    [run] = runs(workdir)
    m, tags = run.data.metrics, run.data.tags
    assert run.info.status == "FINISHED"
    for key in ("eval/map50_95", "eval/map50", "eval_float/map50_95", "counts/c0.25/gt", "convert/build_s",
                "latency/simulator_infer_ms_p50", "latency/host_infer_ms_p50"):
        assert key in m, key
    assert m["counts/c0.25/gt"] > 0
    assert 0.0 <= m["eval/map50_95"] <= 1.0
    assert tags["rkbench.device_kind"] == "simulator"
    assert "not NPU latency" in tags["rkbench.measure"]
    assert tags["versions.rknn-toolkit2"] == "2.5.0"
    assert run.data.params["resolution"] == "128"


def test_sweep_records_failures_and_resumes(workdir, monkeypatch, capsys):
    monkeypatch.chdir(workdir)
    sweep = common(workdir) + ["-m", "resolution=96,128", "export=rknn,ultralytics"]
    assert main(sweep) == 1                      # the official head fails to convert: exit says so
    parents = runs(workdir, "sweep")
    assert len(parents) == 1 and parents[0].info.status == "FAILED"
    assert parents[0].data.tags["rkbench.swept"] == "export,resolution"
    first = parents[0].info.run_id
    # resolution=128 export=rknn was FINISHED by the single run above: not measured again, but linked into
    # this sweep (a link run pointing at the measured one), which stays where it was
    in_sweep = members(workdir, first)
    assert len(in_sweep) == 4
    [link] = [r for r in in_sweep if r.data.tags["rkbench.kind"] == "link"]
    [single] = [r for r in runs(workdir) if "mlflow.parentRunId" not in r.data.tags]
    assert link.data.tags["rkbench.link_to"] == single.info.run_id and link.data.params["resolution"] == "128"
    assert link.data.metrics["eval/map50_95"] == single.data.metrics["eval/map50_95"]
    assert link.data.tags["rkbench.measured_at"] and link.data.tags["rkbench.status"] == "REUSED"
    failed = [r for r in in_sweep if r.info.status == "FAILED"]
    assert len(failed) == 2
    for r in failed:
        assert r.data.params["export"] == "ultralytics"
        assert "rknn-toolkit2 2.5.0" in r.data.tags["rkbench.error"]
        assert "export=rknn" in r.data.tags["rkbench.hint"]
    out = capsys.readouterr().out
    assert "FAILED" in out and "REUSED" in out and f"measured in MLflow run {single.info.run_id}" in out

    # Same command again: finished configurations are reused; failed ones fail from the cache.
    assert main(sweep) == 1
    out = capsys.readouterr().out
    assert out.count("REUSED") == 2
    assert "convert:miss" not in out and "export:miss" not in out
    latest = max(runs(workdir, "sweep"), key=lambda r: r.info.start_time)
    under = members(workdir, latest.info.run_id)
    assert sorted(r.data.tags["rkbench.status"] for r in under) == ["FAILED", "FAILED", "REUSED", "REUSED"]
    # the first sweep keeps all four of its configurations
    assert len(members(workdir, first)) == 4


def test_rerun_without_resume_hits_every_stage(workdir, monkeypatch, capsys):
    monkeypatch.chdir(workdir)
    assert main(common(workdir) + ["resolution=128", "resume=false"]) == 0
    out = capsys.readouterr().out
    assert "convert:hit" in out and "export:hit" in out and "evaluate:hit" in out
    assert "miss" not in out.split("cache")[-1]


def test_report_from_mlflow(workdir, monkeypatch):
    monkeypatch.chdir(workdir)
    assert main(["report", "--tracking-uri", f"sqlite:///{workdir / 'mlflow.db'}", "--experiment", "it",
                 "--out", str(workdir / "reports"), "--no-plots"]) == 0
    [md] = list((workdir / "reports").glob("*.md"))
    text = md.read_text()
    assert "map50_95" in text and "ultralytics" in text and "export=rknn" in text


@pytest.mark.parametrize("overrides, fragment", [
    (["resolution=100"], "multiple of 32"),
    (["-m", "resolution=96,100"], "multiple of 32"),
    (["platform=rk9999"], "platform"),
    (["batch=3", "core_mask=1", "target=board", "board.address=192.168.1.222:5555"], "falls back to auto"),
])
def test_bad_input_fails_before_any_work(workdir, monkeypatch, capsys, overrides, fragment):
    monkeypatch.chdir(workdir)
    assert main(common(workdir) + overrides) == 2
    err = capsys.readouterr().err
    assert fragment in err and err.count("\n") == 1


def test_corrupt_weights_and_empty_dataset(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    bad = tmp_path / "best.pt"
    bad.write_bytes(b"not a checkpoint")
    base = [f"cache_dir={tmp_path / 'cache'}", f"tracking.uri=sqlite:///{tmp_path / 'm.db'}"]
    assert main(base + ["model=yolov8", f"model.weights={bad}"]) == 2
    assert "not a PyTorch checkpoint" in capsys.readouterr().err
    bad_onnx = tmp_path / "x.onnx"
    bad_onnx.write_bytes(b"\x08\x07garbage")
    assert main(base + [f"model.onnx={bad_onnx}", "model.weights=null"]) == 2
    assert "ONNX" in capsys.readouterr().err
    empty = tmp_path / "data"
    (empty / "images" / "val").mkdir(parents=True)
    (empty / "data.yaml").write_text("path: .\ntrain: images/val\nval: images/val\nnames: {0: a}\n")
    assert main(base + ["dataset=yolo", f"dataset.root={empty / 'data.yaml'}"]) == 2
    assert "image" in capsys.readouterr().err


def _single(tmp_path, *overrides: str):
    """One run in its own store; returns the MLflow run."""
    base = [f"cache_dir={tmp_path / 'cache'}", f"tracking.uri=sqlite:///{tmp_path / 'm.db'}", "tracking.experiment=one"]
    assert main(base + list(overrides)) == 0
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'm.db'}")
    [run] = client.search_runs([client.get_experiment_by_name("one").experiment_id])
    return run


def test_yolo_folder_dataset_scores_like_the_coco_json(tmp_path, monkeypatch):
    """The demo split read as Ultralytics folders (data.yaml, images/, labels/) gives the COCO-json mAP."""
    from rkbench.data.demo import generate_demo

    monkeypatch.chdir(tmp_path)
    data_yaml = generate_demo(tmp_path / "shapes", n_train=0, n_val=6)
    as_yolo = _single(tmp_path / "a", "dataset=yolo", f"dataset.root={data_yaml}", "target=onnxruntime", "resolution=128")
    as_coco = _single(tmp_path / "b", "dataset=coco", f"dataset.annotations={tmp_path / 'shapes/annotations/instances_val.json'}",
                      f"dataset.images={tmp_path / 'shapes/images/val'}", "target=onnxruntime", "resolution=128")
    assert as_yolo.data.metrics["eval/map50_95"] == pytest.approx(as_coco.data.metrics["eval/map50_95"], abs=1e-6)
    assert as_yolo.data.metrics["eval/map50_95"] > 0.2


def test_yolov5_onnx_is_cut_converted_and_simulated(tmp_path, monkeypatch):
    from tests.fixtures.yolov5 import export_tiny_yolov5

    monkeypatch.chdir(tmp_path)
    onnx_path = export_tiny_yolov5(tmp_path / "yolov5_tiny.onnx", size=64, nc=4)
    run = _single(tmp_path, "model=yolov5", f"model.onnx={onnx_path}", "resolution=64", "dataset.limit=3", "calib.size=2")
    assert run.info.status == "FINISHED" and "eval/map50_95" in run.data.metrics   # random weights: mAP ~0
    assert run.data.metrics["convert/build_s"] > 0


def test_fp16_model(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run = _single(tmp_path, "quantize=false", "resolution=96", "dataset.limit=4", "calib.size=2")
    m = run.data.metrics
    # fp16 on the simulator tracks the float reference closely (int8 may not)
    assert abs(m["eval/map50_95"] - m["eval_float/map50_95"]) < 0.02


def test_default_run_has_meaningful_accuracy(tmp_path, monkeypatch):
    """`python -m rkbench` as shipped: the demo model scores mAP50-95 >= 0.5 in float, and int8 on the
    simulator stays close (48 val images, 320 px, rk3588, normal)."""
    monkeypatch.chdir(tmp_path)
    run = _single(tmp_path)
    m = run.data.metrics
    assert m["eval_float/map50_95"] >= 0.5
    assert abs(m["eval/map50_95"] - m["eval_float/map50_95"]) < 0.03
    assert m["counts/c0.25/gt"] > 100
