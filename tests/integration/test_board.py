"""target=board end to end, through the real entry point and a real adb server, against the emulated board:
doctor, deploy (a second run pushes nothing), the runner's four modes, eval equal to host ONNX Runtime,
and the faults (runner killed, disk full, connection lost, timeout) as FAILED children or retries.
Plus the PC-side toolkit perf logic against a fake RKNN object (no board can run it here)."""

from __future__ import annotations

import faulthandler
import json
import sys
import threading
import time
from pathlib import Path
from typing import Iterator

import psutil
import pytest
from mlflow.tracking import MlflowClient

from rkbench.__main__ import main
from rkbench.config import ASSETS, RunConfig
from rkbench.device.doctor import BoardFacts, Finding
from rkbench.device.emulator import EmulatedBoard, FaultPlan
from rkbench.errors import DeviceError
from rkbench.models import prepost
from rkbench.device import session
from rkbench.device import toolkit_perf as perf
from rkbench.stages import board as stage

pytestmark = pytest.mark.slow

EXPERIMENT = "board"
TILE_FRAME = (320, 256)
RESOLUTION = 128
# The demo weights when they exist (real detections, so mAP means something); random weights otherwise.
MODEL = [] if (ASSETS / "demo_yolov8n.pt").exists() else ["model.weights=null", "model.yaml=yolov8n.yaml"]
MODES = "measure.modes=[latency,eval,throughput,tiling]"
SMALL = ["measure.iterations=5", "measure.min_seconds=0.2", "measure.warmup=1", "measure.frames=6",
         "measure.workers=2", f"measure.tile_frame=[{TILE_FRAME[0]},{TILE_FRAME[1]}]"]


@pytest.fixture(autouse=True)
def _watchdog() -> Iterator[None]:
    faulthandler.dump_traceback_later(600, exit=True, file=sys.stderr)
    yield
    faulthandler.cancel_dump_traceback_later()


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, stage_cache: Path) -> Path:
    path = tmp_path_factory.mktemp("board")
    (path / "cache").symlink_to(stage_cache, target_is_directory=True)   # exports shared with the other board tests
    return path


@pytest.fixture
def quiet_board(emulated_board: EmulatedBoard, workdir: Path, monkeypatch) -> Iterator[EmulatedBoard]:
    """The session's emulated board without faults before and after the test (run from workdir, where Hydra
    writes its folders)."""
    monkeypatch.chdir(workdir)
    emulated_board.faults = FaultPlan()
    emulated_board.fired.clear()
    yield emulated_board
    emulated_board.faults = FaultPlan()


def common(workdir: Path, board: EmulatedBoard, adb_port: int) -> list[str]:
    return [f"cache_dir={workdir / 'cache'}", f"tracking.uri=sqlite:///{workdir / 'mlflow.db'}",
            f"tracking.experiment={EXPERIMENT}", "dataset.limit=6", "calib.size=4", "target=board",
            f"board.address={board.serial}", "board.runtime=onnxruntime", f"board.adb_port={adb_port}", *MODEL]


def client(workdir: Path) -> MlflowClient:
    return MlflowClient(tracking_uri=f"sqlite:///{workdir / 'mlflow.db'}")


def runs(workdir: Path, kind: str = "config") -> list:
    c = client(workdir)
    exp = c.get_experiment_by_name(EXPERIMENT)
    return c.search_runs([exp.experiment_id], filter_string=f"tags.`rkbench.kind` = '{kind}'",
                         order_by=["attributes.start_time ASC"])


def newest(workdir: Path):
    return runs(workdir)[-1]


def artifact_json(workdir: Path, run_id: str, path: str, dst: Path) -> dict:
    return json.loads(Path(client(workdir).download_artifacts(run_id, path, str(dst))).read_text())


@pytest.fixture(scope="module")
def first_run(workdir: Path, adb_server, emulated_board: EmulatedBoard):
    """One configuration with every mode (and toolkit_perf asked for, which collapses: this board runs the ONNX)."""
    emulated_board.faults = FaultPlan()
    argv = common(workdir, emulated_board, adb_server.port) + [f"resolution={RESOLUTION}", MODES, *SMALL,
                                                               "measure.toolkit_perf=true"]
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(workdir)        # Hydra writes its outputs/ and multirun/ folders in the working directory
        assert main(argv) == 0
    return newest(workdir)


def test_every_mode_runs_on_the_emulator_and_eval_matches_host_onnxruntime(first_run, workdir, emulated_board, tmp_path):
    run = first_run
    m, tags = run.data.metrics, run.data.tags
    assert run.info.status == "FINISHED" and tags["rkbench.status"] == "FINISHED"
    assert tags["rkbench.device_kind"] == "emulator" and tags["rkbench.runtime"] == "onnxruntime"
    assert tags["board.soc"] == "rk3588" and tags["board.emulated"] == "true" and tags["board.dmc"] == "true"
    assert "not NPU latency" in tags["rkbench.measure"]
    # toolkit_perf profiles the .rknn, and this board runs the ONNX: collapsed, nothing converted
    assert "measure.toolkit_perf" in tags["rkbench.collapsed"] and "convert/build_s" not in m

    for part in ("pre", "infer", "post", "total"):
        for stat in ("p50", "p90", "p99", "mean", "std", "min", "cv"):
            assert f"latency/emulator_py_{part}_ms_{stat}" in m, (part, stat)
    assert 0 < m["latency/emulator_py_infer_ms_min"] <= m["latency/emulator_py_infer_ms_p50"] <= m["latency/emulator_py_infer_ms_p99"]
    assert not any(k.startswith("latency/board_") for k in m)   # nothing from the emulator passes as a board

    # Same ONNX, same pre/post code (pushed to the board), same ONNX Runtime: the same mAP as the host.
    assert abs(m["eval/map50_95"] - m["eval_float/map50_95"]) <= 0.005
    assert m["counts/c0.25/gt"] > 0
    if not MODEL:   # the trained demo weights find the shapes
        assert m["eval/map50_95"] > 0.1

    assert m["throughput/emulator_fps"] > 0 and m["throughput/emulator_workers"] == 2
    assert sum(v for k, v in m.items() if k.startswith("throughput/emulator_share_core")) == pytest.approx(1.0)
    assert m["tiling/emulator_fps"] > 0
    assert m["tiling/tiles_per_frame"] == len(prepost.tiles(*TILE_FRAME, RESOLUTION, 0.2))
    for mode in ("latency", "throughput", "tiling"):
        assert m[f"system/emulator_{mode}_peak_rss_mib"] > 10
        assert 0 <= m[f"system/emulator_{mode}_cpu_load_pct"] <= 100
        assert f"system/emulator_{mode}_npu_load_pct" not in m   # no NPU, no load node: nothing fabricated
        assert f"system/emulator_{mode}_npu_freq_mhz_max" in m      # emulated clocks, tagged as such
    assert "board.kernel" not in tags and "stand-in" in tags["board.emulated_facts"]
    assert m["deploy/pushed"] >= 1

    latency = artifact_json(workdir, run.info.run_id, "board/latency.json", tmp_path)
    assert latency["complete"] is True and latency["where"] == "emulator"
    # The runner imported the pushed prepost.py / backends.py from the board cache, not this checkout.
    for module in latency["modules"].values():
        assert module.startswith(str(emulated_board.root / "data/local/tmp/rkbench/cache")), module
    detections = artifact_json(workdir, run.info.run_id, "detections/eval.detections.json", tmp_path)
    assert detections and {"image_id", "category_id", "bbox", "score"} <= set(detections[0])


def test_second_run_pushes_nothing(first_run, workdir, adb_server, quiet_board, monkeypatch):
    # A fresh transport (as in a new process): what is on the board is found by its hash, not remembered.
    monkeypatch.setattr(stage, "_TRANSPORTS", {})
    argv = common(workdir, quiet_board, adb_server.port) + [f"resolution={RESOLUTION}", "measure.modes=[latency]",
                                                            *SMALL, "resume=false"]
    assert main(argv) == 0
    run = newest(workdir)
    assert run.info.run_id != first_run.info.run_id and run.info.status == "FINISHED"
    assert run.data.metrics["deploy/pushed"] == 0
    assert run.data.metrics["deploy/skipped"] == first_run.data.metrics["deploy/pushed"] + first_run.data.metrics["deploy/skipped"]


def _drop_when_runner_starts(board: EmulatedBoard, mode: str, stop: threading.Event) -> None:
    """Pull the cable once the runner of `mode` runs on the emulated board."""
    while not stop.is_set():
        for proc in psutil.process_iter(["cmdline"]):
            cmd = proc.info["cmdline"] or []
            if any(a.endswith("runner.py") for a in cmd) and mode in cmd and any(str(board.root) in a for a in cmd):
                board.drop_connections()
                return
        time.sleep(0.02)


def test_connection_lost_while_running_is_retried_from_scratch(first_run, workdir, adb_server, quiet_board):
    stop = threading.Event()
    watcher = threading.Thread(target=_drop_when_runner_starts, args=(quiet_board, "eval", stop), daemon=True)
    watcher.start()
    argv = common(workdir, quiet_board, adb_server.port) + [f"resolution={RESOLUTION}", "measure.modes=[eval]",
                                                            *SMALL, "resume=false"]
    try:
        assert main(argv) == 0
    finally:
        stop.set()
        watcher.join(timeout=10)
    run = newest(workdir)
    assert run.info.status == "FINISHED"
    assert "eval: " in run.data.tags["rkbench.measure"] and "(second attempt)" in run.data.tags["rkbench.measure"]
    assert run.data.metrics["eval/map50_95"] == pytest.approx(first_run.data.metrics["eval/map50_95"], abs=1e-9)


def test_faults_in_a_sweep_fail_their_child_and_the_sweep_goes_on(first_run, workdir, adb_server, quiet_board, capsys):
    # resolution=96 needs a new model on the board (disk full); latency mode gets its runner killed, twice.
    quiet_board.faults = FaultPlan(free_bytes=64 * 1024, kill_shell_matching="--mode latency", kill_after_s=0.2)
    argv = ["-m"] + common(workdir, quiet_board, adb_server.port) + ["resolution=96,128",
                                                            "measure.modes=[latency],[eval]", "measure.iterations=5",
                                                            "measure.min_seconds=0.2", "resume=false"]
    assert main(argv) == 1
    [parent] = runs(workdir, "sweep")
    children = [r for r in runs(workdir) if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    by_axes = {(r.data.params["resolution"], r.data.params["measure.modes"]): r for r in children}
    assert sorted(by_axes) == [("128", "['eval']"), ("128", "['latency']"), ("96", "['eval']"), ("96", "['latency']")]
    for key in (("96", "['latency']"), ("96", "['eval']")):
        failed = by_axes[key]
        assert failed.info.status == "FAILED"
        assert "disk is full" in failed.data.tags["rkbench.error"]
        assert failed.data.tags["rkbench.device_kind"] == "emulator"   # recorded before the failure
    killed = by_axes[("128", "['latency']")]
    assert killed.info.status == "FAILED"
    assert "killed" in killed.data.tags["rkbench.error"] and "first attempt failed too" in killed.data.tags["rkbench.error"]
    assert killed.data.metrics["deploy/pushed"] == 1   # only its spec file was new; logged before the runner died
    assert quiet_board.fired["kill_shell"] == 2                       # retried once, from scratch
    assert by_axes[("128", "['eval']")].info.status == "FINISHED"
    assert "eval/map50_95" in by_axes[("128", "['eval']")].data.metrics
    assert parent.info.status == "FAILED" and parent.data.metrics["sweep/failed"] == 3
    assert "3 of 4 configurations FAILED" in capsys.readouterr().err


def test_a_runner_that_never_answers_times_out_without_retry(first_run, workdir, adb_server, quiet_board):
    quiet_board.faults = FaultPlan(hang_shell_matching="--mode latency")
    argv = common(workdir, quiet_board, adb_server.port) + [f"resolution={RESOLUTION}", "measure.modes=[latency]",
                                                            *SMALL, "resume=false", "board.timeout_s=2"]
    assert main(argv) == 1
    run = newest(workdir)
    assert run.info.status == "FAILED"
    assert "did not finish within 2s" in run.data.tags["rkbench.error"] and "board.timeout_s" in run.data.tags["rkbench.error"]
    assert quiet_board.fired["hang_shell"] == 1



def test_board_that_stays_away_fails_the_rest_of_the_sweep_with_one_reason(first_run, workdir, adb_server, quiet_board,
                                                                           monkeypatch):
    """The board goes away while the first configuration's runner runs and stays away: that configuration
    waits board.reconnect_s, the later ones fail at once with the same reason (not ~0.4 s each on a dead link)."""
    monkeypatch.setattr(stage, "_GONE", {})
    port = quiet_board.port

    def stop_when_runner_starts() -> None:
        while not any(any(a.endswith("runner.py") for a in (p.info["cmdline"] or []))
                      and any(str(quiet_board.root) in a for a in (p.info["cmdline"] or []))
                      for p in psutil.process_iter(["cmdline"])):
            time.sleep(0.02)
        quiet_board.stop()
    watcher = threading.Thread(target=stop_when_runner_starts, daemon=True)
    watcher.start()
    argv = ["-m"] + common(workdir, quiet_board, adb_server.port) + [
        f"resolution={RESOLUTION}", "measure.modes=[latency],[eval],[tiling]", *SMALL, "resume=false",
        "board.reconnect_s=3"]
    try:
        with monkeypatch.context() as patch:
            patch.chdir(workdir)
            assert main(argv) == 1
    finally:
        watcher.join(timeout=30)
        quiet_board.start()
    assert quiet_board.port == port
    parent = runs(workdir, "sweep")[-1]
    children = [r for r in runs(workdir) if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    first, *rest = children
    assert [r.info.status for r in children] == ["FAILED"] * 3
    assert "did not come back within board.reconnect_s=3s" in first.data.tags["rkbench.error"]
    for later in rest:
        error = later.data.tags["rkbench.error"]
        assert "did not come back within board.reconnect_s=3s" in error and "without waiting again" in error
        assert "\n" not in error
        assert (later.info.end_time - later.info.start_time) / 1000 < (first.info.end_time - first.info.start_time) / 1000


@pytest.fixture(scope="module")
def runners_sweep(workdir: Path, adb_server, emulated_board: EmulatedBoard) -> dict:
    """`runner=python,cpp` on the emulated board: the Python runner with ONNX Runtime, the C++ runner on the
    .rknn with the replay stand-in in place of librknnrt, in batches of 2 (rknn_batch_size) with its input
    handed over pass-through (settings that collapse on the Python child, which runs the ONNX). Throughput is
    asked too: each runner measures its own worker pool."""
    emulated_board.faults = FaultPlan()
    argv = ["-m"] + common(workdir, emulated_board, adb_server.port) + [
        f"resolution={RESOLUTION}", "runner=python,cpp", "measure.modes=[latency,eval,throughput]", *SMALL,
        "measure.cpp_pass_through=true", "batch=2"]
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(workdir)
        assert main(argv) == 0
    parent = runs(workdir, "sweep")[-1]
    return {r.data.params["runner"]: r for r in runs(workdir) if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}


def test_python_and_cpp_runners_side_by_side(runners_sweep, workdir, tmp_path):
    assert sorted(runners_sweep) == ["cpp", "python"]
    py, cpp = runners_sweep["python"], runners_sweep["cpp"]
    assert py.info.status == cpp.info.status == "FINISHED"
    assert py.data.tags["rkbench.identity"] != cpp.data.tags["rkbench.identity"]
    for part in ("pre", "infer", "post", "total"):
        assert f"latency/emulator_py_{part}_ms_p50" in py.data.metrics
    for part in ("inputs_set", "run", "outputs_get", "total"):
        for stat in ("p50", "p90", "p99", "mean", "min"):
            assert f"latency/emulator_cpp_{part}_ms_{stat}" in cpp.data.metrics, (part, stat)
    assert cpp.data.metrics["throughput/emulator_cpp_fps"] > 0 and cpp.data.metrics["throughput/emulator_cpp_single_fps"] > 0
    assert cpp.data.metrics["throughput/emulator_cpp_workers"] == 2   # measure.workers, one rknn context each
    assert cpp.data.metrics["memory/emulator_npu_internal_mb"] > 0    # RKNN_QUERY_MEM_SIZE of the stand-in
    assert "latency/emulator_cpp_frame_ms_p50" in cpp.data.metrics and "of batch 2" in cpp.data.tags["rkbench.measure"]
    assert not any("_py_" in k for k in cpp.data.metrics) and not any("_cpp_" in k for k in py.data.metrics)
    # the same host scoring of the same model outputs: the same mAP
    assert cpp.data.metrics["eval/map50_95"] == pytest.approx(py.data.metrics["eval/map50_95"], abs=0.001)
    # what stood in for the NPU, said on the run
    tags = cpp.data.tags
    assert tags["rkbench.runner"] == "cpp" and tags["rkbench.runtime"] == "librknnrt"
    assert tags["rkbench.cpp_engine"].startswith("replay stand-in (ONNX Runtime outputs recorded on the host")
    assert "not librknnrt" in tags["rkbench.cpp_engine"] and "not NPU latency" in tags["rkbench.measure"]
    assert "throughput: 2 workers" in tags["rkbench.measure"] and "pass-through input" in tags["rkbench.measure"]
    assert cpp.data.params["measure.cpp_pass_through"] == "True"
    assert "throughput/emulator_fps" in py.data.metrics and "throughput/emulator_fps" not in cpp.data.metrics
    assert py.data.tags["rkbench.runner"] == "python" and "rkbench.cpp_engine" not in py.data.tags
    latency = artifact_json(workdir, cpp.info.run_id, "board/latency.json", tmp_path)
    assert latency["runner"] == "cpp" and latency["replayed"] is True and latency["where"] == "emulator"


def test_cpp_runner_without_librknnrt_fails_in_one_line(runners_sweep, workdir, adb_server, quiet_board, monkeypatch):
    command = session.BoardSession.command

    def lib_missing(self, mode, out, detections):   # as on a board whose librknnrt is not where --lib says
        args = command(self, mode, out, detections)
        return args[:-1] + ["/data/local/tmp/rkbench/nowhere/librknnrt.so"] if "--lib" in args else args

    monkeypatch.setattr(session.BoardSession, "command", lib_missing)
    argv = common(workdir, quiet_board, adb_server.port) + [f"resolution={RESOLUTION}", "runner=cpp",
                                                            "measure.modes=[latency]", *SMALL, "resume=false"]
    assert main(argv) == 1
    run = newest(workdir)
    error = run.data.tags["rkbench.error"]
    assert run.info.status == "FAILED" and "\n" not in error
    assert "cannot load /data/local/tmp/rkbench/nowhere/librknnrt.so" in error
    assert "install librknnrt.so on the board" in error
    assert run.data.tags["rkbench.cpp_engine"].startswith("replay stand-in")     # recorded before the failure
    log = client(workdir).download_artifacts(run.info.run_id, "board/latency.log", str(workdir / "failed-log"))
    assert "cannot load" in Path(log).read_text()                                # the runner's own words, kept


def test_doctor_takes_the_sweeps_board_settings(adb_server, quiet_board, capsys):
    code = main(["doctor", f"board.address={quiet_board.serial}", f"board.adb_port={adb_server.port}", "platform=rk3588"])
    out = capsys.readouterr().out
    assert "emulated: no NPU" in out and "rk3588" in out and "2.3.0" in out and "MiB under /data/local/tmp/rkbench" in out
    # The emulated librknnrt (2.3.0) is older than the host's rknn-toolkit2 (2.5.0): an error with its fix.
    assert code == 1 and "update librknnrt.so" in out
    with pytest.raises(SystemExit):
        main(["doctor", "board.nonsense=1"])
    assert "board.address=..." in capsys.readouterr().err


# ---------------------------------------------------------------------------- pure logic, no board needed

def test_worker_masks_follow_the_socs_cores():
    run = RunConfig()
    run.measure.workers, run.measure.cores = 4, "0_1_2"
    assert session.worker_masks(run) == ["0", "1", "2", "0"]
    run.platform = "rk3576"
    assert session.worker_masks(run) == ["0", "1", "0", "1"]
    run.platform = "rk3568"
    assert session.worker_masks(run) == ["auto"] * 4


def test_only_what_the_runtime_uses_blocks_a_run():
    facts = BoardFacts("t", "/data/local/tmp/rkbench", soc="rk3588", python="3.11", onnxruntime="1.19", librknnrt="2.3.0")
    stale = [Finding("error", "models built by rknn-toolkit2 2.5.0 are newer than the board's librknnrt 2.3.0", "update")]
    assert stage.blocking_findings(facts, stale, "onnxruntime") == []
    assert [f.what for f in stage.blocking_findings(facts, stale, "rknnlite")][0].startswith("models built")
    assert "rknn_toolkit_lite2" in stage.blocking_findings(facts, [], "rknnlite")[0].fix
    facts.onnxruntime = None
    assert "onnxruntime" in stage.blocking_findings(facts, [], "onnxruntime")[0].what


def test_image_list_paths_are_relative_to_the_list():
    assert session.image_ref("/data/local/tmp/rkbench", "/data/local/tmp/rkbench/cache/0123456789abcdef/a b.jpg") \
        == "../0123456789abcdef/a b.jpg"


LAYER_TABLE = """
---------------------------------------------------------------------------------------------------
                                 Network Layer Information Table
---------------------------------------------------------------------------------------------------
ID   OpType           DataType Target InputShape         OutputShape        Cycles(DDR/NPU/Total)  Time(us)  MacUsage(%)  WorkLoad(0/1/2)  RW(KB)  FullName
1    InputOperator    INT8     CPU    \\                  (1,3,640,640)      0/0/0                  8         \\            0.0%/0.0%/0.0%   0       InputOperator:images
2    ConvExSwish      INT8     NPU    (1,3,640,640)      (1,16,320,320)     393040/819200/819200   1210      2.58         100.0%/0.0%/0.0% 1201    Conv:/model.0/conv/Conv
3    OutputOperator   INT8     CPU    (1,1,20,20)        \\                  0/0/0                  22        \\            0.0%/0.0%/0.0%   1       OutputOperator:output
---------------------------------------------------------------------------------------------------
Total Operator Elapsed Per Frame Time(us): 1240
Total Memory Read/Write Per Frame Size(KB): 1202.00
"""
MEMORY = {"total_weight_allocation": 3 * 2**20, "total_internal_allocation": 2 * 2**20,
          "total_model_allocation": 6 * 2**20}


class FakeRKNN:
    """rknn.api.RKNN's surface used by toolkit_perf, with the dmc trap: eval_perf(fix_freq=True) fails on a
    board without /sys/class/devfreq/dmc."""

    def __init__(self, dmc: bool = False, perf=LAYER_TABLE, init_ret: int = 0, perf_error: str = ""):
        self.dmc, self.perf, self.init_ret, self.perf_error = dmc, perf, init_ret, perf_error
        self.calls: list[tuple] = []
        self.released = False

    def load_rknn(self, path):
        self.calls.append(("load_rknn", path))
        return 0

    def init_runtime(self, **kw):
        self.calls.append(("init_runtime", kw))
        return self.init_ret

    def eval_perf(self, is_print=True, fix_freq=True):
        self.calls.append(("eval_perf", fix_freq))
        if self.perf_error:
            raise Exception(self.perf_error)
        if fix_freq and not self.dmc:
            raise Exception("cat: can't open '/sys/class/devfreq/dmc/cur_freq': No such file or directory")
        return self.perf

    def eval_memory(self, is_print=True):
        self.calls.append(("eval_memory",))
        return MEMORY

    def release(self):
        self.released = True


def test_toolkit_perf_retries_without_fixed_frequencies_when_dmc_is_missing(tmp_path):
    fake = FakeRKNN(dmc=False)
    metrics, tags, files = perf.toolkit_perf(tmp_path / "m.rknn", "rk3588", "192.168.1.222:5555", False,
                                              tmp_path / "perf", make_rknn=lambda: fake)
    assert [c for c in fake.calls if c[0] == "eval_perf"] == [("eval_perf", True), ("eval_perf", False)]
    assert fake.calls[1] == ("init_runtime", {"target": "rk3588", "device_id": "192.168.1.222:5555",
                                              "perf_debug": True, "eval_mem": True})
    assert tags["rkbench.toolkit_perf.fix_freq"].startswith("false")
    assert metrics["memory/weight_mib"] == 3 and metrics["memory/internal_mib"] == 2
    assert metrics["memory/total_mib"] == 6 and metrics["memory/other_mib"] == 1
    assert metrics["perf/board_layers"] == 3 and metrics["perf/board_layers_total_ms"] == pytest.approx(1.24)
    table = next(f for f in files if f.suffix == ".csv").read_text().splitlines()
    assert table[0].startswith("ID,OpType,DataType") and table[2].endswith("Conv:/model.0/conv/Conv")
    assert fake.released


def test_toolkit_perf_keeps_fixed_frequencies_where_it_can(tmp_path):
    fake = FakeRKNN(dmc=True, perf={"layers": [{"ID": 1, "Time(us)": 500}, {"ID": 2, "Time(us)": 250}]})
    metrics, tags, _ = perf.toolkit_perf(tmp_path / "m.rknn", "rk3588", "S", True, tmp_path, make_rknn=lambda: fake)
    assert [c for c in fake.calls if c[0] == "eval_perf"] == [("eval_perf", True)]
    assert tags["rkbench.toolkit_perf.fix_freq"] == "true"
    assert metrics["perf/board_layers"] == 2 and metrics["perf/board_layers_total_ms"] == pytest.approx(0.75)


def test_toolkit_perf_failures_name_the_fix(tmp_path):
    fake = FakeRKNN(dmc=True, perf_error="rknn_server not responding")
    with pytest.raises(DeviceError, match="rknn_server"):
        perf.toolkit_perf(tmp_path / "m.rknn", "rk3588", "S", True, tmp_path, make_rknn=lambda: fake)
    assert [c for c in fake.calls if c[0] == "eval_perf"] == [("eval_perf", True)] and fake.released
    with pytest.raises(DeviceError, match="start rknn_server"):
        perf.toolkit_perf(tmp_path / "m.rknn", "rk3588", "S", True, tmp_path, make_rknn=lambda: FakeRKNN(init_ret=-1))


def test_deploy_groups_keep_each_hash_command_short(tmp_path):
    files = {f"image{i}": tmp_path / f"{'x' * 60}_{i}.jpg" for i in range(200)}
    groups = session.path_groups(files, "/data/local/tmp/rkbench", budget=3000)
    assert len(groups) > 1 and [n for g in groups for n in g] == list(files)
    for group in groups:
        assert sum(len(f"'/data/local/tmp/rkbench/cache/0123456789abcdef/{p.name}' ") for p in group.values()) < 4096
