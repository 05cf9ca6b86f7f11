"""The named studies (experiments/<study>.yaml): each composes from its own file, runs on the demo in a reduced
form (one or two points per axis, real export / conversion / simulator / emulated board, tiny resolution), and
its report section has the shape of the field notes' table. One stage cache for every study, so a point two
studies share is converted once."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from rkbench.__main__ import main
from rkbench.cli import compose_all
from rkbench.config import ASSETS
from rkbench.models import prepost
from rkbench.report import build_report, studies
from rkbench.report.runs import RunRecord, Selection, load_selection

pytestmark = pytest.mark.slow

STUDIES = ("resolution", "thresholds", "threadpool", "tiling", "batch", "quantization", "input")
EXPERIMENTS = Path(__file__).resolve().parents[2] / "experiments"
RES = 128
MODEL = [] if (ASSETS / "demo_yolov8n.pt").exists() else ["model.weights=null", "model.yaml=yolov8n.yaml"]
BOARD_SMALL = ["board.runtime=onnxruntime", "measure.iterations=2", "measure.min_seconds=0.1", "measure.warmup=1"]
# the reduced sweep of each study: command-line values replace the file's sweep for the same keys
REDUCED = {
    "resolution": ["resolution=96,128", "export=rknn"],
    "thresholds": [f"resolution={RES}"],
    "quantization": [f"resolution={RES}", "algo=normal,kl_divergence", "quant_method=channel", "calib.size=4"],
    "batch": [f"resolution={RES}", "batch=1,3", "core_mask=auto"],
    "input": [f"resolution={RES}", "channels=3,1"],
    "threadpool": [f"resolution={RES}", "measure.workers=1,2", "measure.cores=0_1_2", "measure.frames=8", *BOARD_SMALL],
    "tiling": [f"resolution={RES}", "measure.tile_mode=native,resized", "dataset.frame=[320,192]", "dataset.frames=2",
               *BOARD_SMALL],
}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("studies")


def uri(workdir: Path) -> str:
    return f"sqlite:///{workdir / 'mlflow.db'}"


@pytest.fixture(scope="module")
def board_args(request, workdir: Path) -> list[str]:
    """The emulated board behind the session's adb server, only for the studies that need one."""
    board = request.getfixturevalue("emulated_board")
    server = request.getfixturevalue("adb_server")
    return ["target=board", f"board.address={board.serial}", f"board.adb_port={server.port}"]


def run_study(name: str, workdir: Path, extra: list[str] = ()) -> Selection:
    argv = [f"+experiment={name}", "-m", f"cache_dir={workdir / 'cache'}", f"tracking.uri={uri(workdir)}",
            "dataset.limit=4", "calib.size=4", *MODEL, *REDUCED[name], *extra]
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(workdir)            # Hydra writes multirun/ in the working directory
        assert main(argv) == 0
    return load_selection(uri(workdir), name)


def section(sel) -> tuple[list[str], list[list[str]]]:
    """The study section's markdown table: header cells and rows of cells."""
    lines = studies.section(sel)
    assert lines[1] == f"## Study: {studies.study_of(sel)}"
    rows = [[c.strip() for c in line.strip().strip("|").split("|")] for line in "\n".join(lines).splitlines()
            if line.startswith("|")]
    return rows[0], rows[2:]


def test_every_study_declares_its_sweep_and_composes():
    found = {p.stem for p in EXPERIMENTS.glob("*.yaml")}
    assert set(STUDIES) <= found
    board = ["board.address=127.0.0.1:5555"]
    for name in STUDIES:
        text = (EXPERIMENTS / f"{name}.yaml").read_text()
        assert f"study: {name}" in text and "sweeper:" in text, name
        runs, _ = compose_all([f"+experiment={name}", "-m", *board])
        assert len(runs) > 1 and {r.study for r in runs} == {name} and {r.tracking.experiment for r in runs} == {name}
        assert name in studies.SECTIONS
    tiling = compose_all(["+experiment=tiling", "-m", *board])[0]
    assert {r.measure.tile_mode for r in tiling} == {"native", "resized"} and tiling[0].dataset.frame == [1920, 1080]
    # the field notes' frames: 6 overlapping native 640 tiles vs 4 resized ones
    assert len(prepost.tiles(1920, 1080, 640, tiling[0].measure.tile_overlap)) == 6
    assert len(prepost.grid_tiles(1920, 1080, *tiling[0].measure.tile_grid)) == 4
    assert {(r.measure.workers, r.measure.cores) for r in compose_all(["+experiment=threadpool", "-m", *board])[0]} \
        == {(w, c) for w in (1, 2, 3, 6) for c in ("0_1_2", "0")}


def test_resolution(workdir):
    header, rows = section(run_study("resolution", workdir))
    assert header[:6] == ["resolution", "export", "runner", "where", "status", "latency p50 (ms)"]
    assert {"mAP50-95", "float mAP50-95", "conversion (s)", ".rknn (MiB)", "fps"} <= set(header)
    assert [r[0] for r in rows] == ["96", "128"] and {r[3] for r in rows} == {"simulator"}
    col = {h: i for i, h in enumerate(header)}
    for r in rows:
        assert float(r[col["latency p50 (ms)"]]) > 0 and float(r[col["conversion (s)"]]) > 0
        assert r[col["fps from"]] == "1000 / p50"     # not a measured fps: the simulator's call time
    report = Path(build_report(uri(workdir), "resolution", workdir / "reports", plots=False)).read_text()
    assert "## Study: resolution" in report and report.index("## Study: resolution") < report.index("## Runs")


def test_thresholds_with_the_highest_scoring_false_detection(workdir):
    sel = run_study("thresholds", workdir)
    header, rows = section(sel)
    assert header[:4] == ["resolution", "where", "conf", "gt"] and "top false score" in header
    assert [float(r[2]) for r in rows] == [0.25, 0.5, 0.63, 0.8]
    col = {h: i for i, h in enumerate(header)}
    for r in rows:
        assert int(r[col["correct"]]) + int(r[col["missed"]]) == int(r[col["gt"]])
    top = sel.runs[0].metrics.get("counts/top_false/score")
    if top is not None:    # shown exactly on the rows whose threshold it passes
        assert [r[col["top false score"]] != "-" for r in rows] == [top >= float(r[2]) for r in rows]


def test_quantization(workdir):
    header, rows = section(run_study("quantization", workdir))
    assert header[:4] == ["algo", "quant_method", "calib.size", "calib.source"]
    assert {"mAP50-95", "mAP50", "mAP75", "int8 - float (50-95)"} <= set(header)
    assert sorted(r[0] for r in rows) == ["kl_divergence", "normal"]
    col = {h: i for i, h in enumerate(header)}
    for r in rows:
        assert float(r[col["int8 - float (50-95)"]]) == pytest.approx(
            float(r[col["mAP50-95"]]) - float(r[col["float mAP50-95"]]), abs=2e-3)


def test_batch(workdir):
    sel = run_study("batch", workdir)
    header, rows = section(sel)
    assert header[:4] == ["batch", "core mask", "where", "status"] and "infer per frame (ms)" in header
    assert [r[0] for r in rows] == ["1", "3"] and {r[3] for r in rows} == {"FINISHED"}
    col = {h: i for i, h in enumerate(header)}
    three = rows[1]
    assert float(three[col["infer per frame (ms)"]]) == pytest.approx(float(three[col["call p50 (ms)"]]) / 3, rel=1e-3)


def test_threadpool_on_the_emulated_board(workdir, board_args):
    sel = run_study("threadpool", workdir, board_args)
    header, rows = section(sel)
    assert header == ["workers", "cores", "where", "status", "fps", "frame p50 (ms)", "NPU0 %", "NPU1 %", "NPU2 %",
                      "CPU %", "peak RSS (MiB)"]
    assert [r[0] for r in rows] == ["1", "2"] and {r[2] for r in rows} == {"emulator"}
    assert all(float(r[4]) > 0 and float(r[10]) > 0 for r in rows)
    assert all("1 ONNX Runtime threads each" in r.tags["rkbench.measure"] for r in sel.runs)   # one core per worker
    # the 1 vs 2 workers throughput ratio, measured
    assert any(re.fullmatch(r"- cores 0_1_2 \(emulator\): 2 workers / 1 worker = \d+\.\d\dx fps", line)
               for line in "\n".join(studies.section(sel)).splitlines())


def test_tiling_on_the_emulated_board(workdir, board_args):
    sel = run_study("tiling", workdir, board_args)
    header, rows = section(sel)
    assert header[:6] == ["tile mode", "resolution", "where", "status", "tiles / frame", "fps"]
    assert {"mAP50-95", "NPU load %"} <= set(header)
    got = {r[0]: r for r in rows}
    assert set(got) == {"native", "resized"} and {r[2] for r in rows} == {"emulator"}
    assert int(float(got["native"][4])) == len(prepost.tiles(320, 192, RES, 0.0)) and int(float(got["resized"][4])) == 4
    for r in rows:
        assert 0 <= float(r[6]) <= 1 and float(r[5]) > 0


def test_input_gray_model_through_the_simulator(workdir):
    sel = run_study("input", workdir)
    header, rows = section(sel)
    assert header[:5] == ["channels", "resolution", "where", "status", "pass-through"] and "py infer p50 (ms)" in header
    # runner and pass-through collapse off-board: 8 points, one row (one measured run) per channel count
    assert len(sel.runs) == 8 and sum(r.status == "REUSED" for r in sel.runs) == 6
    assert [r[0] for r in rows] == ["1", "3"] and {r[3] for r in rows} == {"FINISHED"} and {r[4] for r in rows} == {"-"}
    assert all(float(r[header.index("py infer p50 (ms)")]) > 0 for r in rows)
    assert not any("TODO" in line for line in studies.section(sel))
    gray = next(r for r in sel.runs if r.param("channels") == "1")
    assert "eval/map50_95" in gray.metrics and "eval_float/map50_95" in gray.metrics   # int8 and float, both gray


def detections(workdir: Path, run: RunRecord, dst: Path) -> list[tuple]:
    """A board run's eval detections (the artifact the host scored), in a fixed order."""
    from mlflow.tracking import MlflowClient

    path = MlflowClient(tracking_uri=uri(workdir)).download_artifacts(run.run_id, "detections/eval.detections.json", str(dst))
    return sorted((d["image_id"], d["category_id"], d["score"], *d["bbox"]) for d in json.loads(Path(path).read_text()))


def test_input_pass_through_on_the_emulated_board(workdir, board_args, tmp_path):
    """RGB vs gray x pass-through: the Python runner's pre beside the C++ runner's inputs_set; the C++ runner's
    detections of the gray model (replayed from the gray tensors it was given) are the Python runner's."""
    sel = run_study("input", workdir, [*board_args, *BOARD_SMALL, "dataset.limit=2"])
    header, rows = section(sel)
    col = {h: i for i, h in enumerate(header)}
    assert [(r[0], r[col["pass-through"]]) for r in rows] == [("1", "off"), ("1", "on"), ("3", "off"), ("3", "on")]
    assert {r[col["where"]] for r in rows} == {"emulator"} and {r[col["status"]] for r in rows} == {"FINISHED"}
    for r in rows:
        assert float(r[col["py pre p50 (ms)"]]) > 0 and float(r[col["C++ inputs_set p50 (ms)"]]) > 0
    for channels in ("1", "3"):
        runs = [r for r in sel.runs if r.param("channels") == channels and r.status == "FINISHED"]
        py = next(r for r in runs if r.param("runner") == "python")
        theirs = np.array(detections(workdir, py, tmp_path / py.run_id))
        for cpp in (r for r in runs if r.param("runner") == "cpp"):
            assert cpp.metrics["eval/map50_95"] == pytest.approx(py.metrics["eval/map50_95"], abs=0.001), channels
            mine = np.array(detections(workdir, cpp, tmp_path / cpp.run_id))
            assert mine.shape == theirs.shape and len(theirs) > 0, channels
            assert np.abs(mine - theirs).max() <= 1e-3, channels
