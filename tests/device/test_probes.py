"""Board probes and measurement conditions (issue 9), on emulated boards that are as strict as a real one:
board.python (a venv's python where the system python3 has no packages), the NPU clock under `devfreq0` or
only the SCMI clock, versions read from binary content as `strings` does, clocks / temperatures / the
runner's RSS sampled during each mode, board.pin_freq restored even on failure, the runner's log kept with
librknnrt's core mask warning as an INVALID flag, nothing fabricated by the emulator, and no conversion
for a board that runs the ONNX."""

from __future__ import annotations

import os
import shutil
import sys
import time
from pathlib import Path
from typing import Iterator

import pytest
from mlflow.tracking import MlflowClient

from rkbench.__main__ import main
from rkbench.config import ASSETS
from rkbench.device import clocks, doctor, runner_log, sampling
from rkbench.device.emulator import EmulatedBoard, FaultPlan, make_board_tree
from rkbench.device.emulator.tree import EmulatedClocks
from rkbench.device.sandbox import write_file
from rkbench.device.transport import LocalTransport
from rkbench.errors import DeviceError
from rkbench.report.runs import RunRecord
from rkbench.report.validity import validity
from rkbench.stages import board as stage

VENV_PYTHON = "/data/venv/bin/python"
MODEL = [] if (ASSETS / "demo_yolov8n.pt").exists() else ["model.weights=null", "model.yaml=yolov8n.yaml"]
SMALL = ["resolution=128", "dataset.limit=2", "measure.modes=[latency]", "measure.iterations=5",
         "measure.min_seconds=0.3", "measure.warmup=1"]


def debian_pythons(root: Path) -> None:
    """The board's python3 without packages (externally managed, as on Debian 12) and a venv's python with
    numpy, opencv and onnxruntime."""
    write_file(root / "usr/bin/python3", f'#!/bin/sh\nexec {sys.executable} -S "$@"\n', mode=0o755)
    write_file(root / VENV_PYTHON.lstrip("/"), f'#!/bin/sh\nexec {sys.executable} "$@"\n', mode=0o755)


@pytest.fixture
def local(tmp_path: Path) -> LocalTransport:
    make_board_tree(tmp_path / "board", librknnrt_version="2.5.0")
    return LocalTransport(tmp_path / "board")


# ------------------------------------------------------------------------------------ probes, fast

def test_doctor_and_the_blocking_check_use_board_python(local: LocalTransport) -> None:
    debian_pythons(local.fs.root)
    system = doctor.probe(local, "2.5.0")
    blocked = stage.blocking_findings(system, doctor.check(system), "onnxruntime")
    assert system.python and system.numpy is None and system.opencv is None
    assert {"numpy", "opencv", "onnxruntime"} <= {f.what.split()[0] for f in blocked}
    assert all("board.python" in f.fix for f in blocked if f.what.startswith(("numpy", "onnxruntime")))

    venv = doctor.probe(local, "2.5.0", python=VENV_PYTHON)
    assert venv.numpy and venv.opencv and venv.onnxruntime and venv.python_path == VENV_PYTHON
    assert stage.blocking_findings(venv, doctor.check(venv), "onnxruntime") == []
    assert venv.as_tags()["board.python_path"] == VENV_PYTHON
    # the C++ runner needs no Python: missing numpy never blocks it
    assert not [f for f in stage.blocking_findings(system, doctor.check(system), "cpp") if f.needs == "python"]


@pytest.mark.parametrize("node, source", [("devfreq0", "/sys/class/devfreq/devfreq0"),
                                          ("scmi", "/sys/kernel/debug/clk/scmi_clk_npu/clk_rate")])
def test_npu_clock_found_where_newer_kernels_put_it(tmp_path: Path, node: str, source: str) -> None:
    make_board_tree(tmp_path / "b", npu_devfreq=node)
    facts = doctor.probe(LocalTransport(tmp_path / "b"), "2.3.0")
    assert facts.npu_freq_source == source and facts.npu_freq_hz == 300_000_000
    found = sampling.clock_sources(str(tmp_path / "b"))["npu_freq"]
    assert found[0].endswith(source if node == "scmi" else source + "/cur_freq")


def test_versions_come_from_binary_content_as_strings_finds_them(local: LocalTransport) -> None:
    server = (local.fs.root / "usr/bin/rknn_server").read_bytes()
    assert server.startswith(b"\x7fELF") and b"rknn_server version: 2.5.0 (" in server   # not a script
    facts = doctor.probe(local, "2.5.0")
    assert facts.rknn_server == "2.5.0" and facts.librknnrt == "2.5.0"
    assert facts.librknnrt_build == "2.5.0 (c949ad889d@2024-11-07T11:35:33)"
    old_release = local.fs.root / "usr/lib/librknnrt.so"      # an older library: no build part after the version
    old_release.write_bytes(b"\x7fELF\x02\x01\x01\0" + b"\0" * 56 + b"\x01librknnrt version: 1.6.0\0\x02\0")
    assert doctor.probe(local, "2.5.0").librknnrt == "1.6.0"


def test_versions_without_strings_fall_back_to_grep(local: LocalTransport, tmp_path: Path) -> None:
    """Boards without binutils: the probe finds the same versions with grep -a."""
    tools = tmp_path / "bin"     # a PATH with the probe's tools, strings left out
    tools.mkdir()
    for tool in ("sh", "tr", "uname", "cat", "grep", "head", "tail", "df", "dirname"):
        if shutil.which(tool):
            (tools / tool).symlink_to(shutil.which(tool))
    assert not (tools / "strings").exists()
    result = local.shell(["env", f"PATH={tools}", "sh", "-c", doctor._PROBE_SCRIPT, "sh", "/data/local/tmp/rkbench",
                          "", "python3"], timeout=60)
    facts = doctor.parse_probe(result.output, "t", "/data/local/tmp/rkbench", "2.5.0")
    assert facts.librknnrt_build == "2.5.0 (c949ad889d@2024-11-07T11:35:33)" and facts.rknn_server == "2.5.0"


def test_sampler_follows_clocks_temperatures_and_the_runners_rss(local: LocalTransport) -> None:
    root = local.fs.root
    emulated = EmulatedClocks(root, interval=0.02)

    def sample(seconds: float) -> dict:
        with sampling.SystemSampler(str(root), 0.02) as sampler:
            end = time.perf_counter() + seconds
            while time.perf_counter() < end:
                sum(range(10_000))     # some load for the governors to follow
        return sampler.result()

    emulated.start()
    try:
        floating = sample(0.4)
        pinned = clocks.pin(local)
        time.sleep(0.1)
        held = sample(0.3)
        clocks.restore(local, pinned)
    finally:
        emulated.stop()
    assert not floating["npu_load"]["available"]              # the emulator has no NPU load node
    assert {"npu_freq", "ddr_freq", "cpu_policy0_freq", "temp_soc_thermal"} <= set(floating["clocks"])
    assert floating["clocks"]["npu_freq"]["governors"] == ["rknpu_ondemand"]
    assert held["clocks"]["npu_freq"]["min"] == held["clocks"]["npu_freq"]["max"] == 1000.0
    assert held["clocks"]["cpu_policy4_freq"]["min"] == 2256.0 and held["clocks"]["ddr_freq"]["max"] == 2112.0
    assert 30 < held["clocks"]["temp_soc_thermal"]["max"] < 80
    memory = held["memory"]
    assert memory["pid"] == os.getpid() and memory["rss_samples"] >= 2
    assert 10 < memory["rss_mib_mean"] <= memory["peak_rss_mib"]
    assert (root / "sys/class/devfreq/fdab0000.npu/governor").read_text().strip() == "rknpu_ondemand"


def test_pin_freq_puts_back_what_it_changed_when_a_governor_cannot_be_written(local: LocalTransport) -> None:
    root = local.fs.root
    governor = root / "sys/devices/system/cpu/cpufreq/policy4/scaling_governor"
    governor.unlink()
    governor.symlink_to("/proc/version")     # readable, and no one can write it (not even root, as adbd may be)
    with pytest.raises(DeviceError, match="adb root.*board.pin_freq=false"):
        clocks.pin(local)
    assert (root / "sys/class/devfreq/fdab0000.npu/governor").read_text().strip() == "rknpu_ondemand"
    assert (root / "sys/class/devfreq/dmc/governor").read_text().strip() == "dmc_ondemand"
    assert (root / "sys/devices/system/cpu/cpufreq/policy0/scaling_governor").read_text().strip() == "schedutil"


def test_known_runner_warnings_become_tags() -> None:
    out = "I RKNN: init\nE RKNN: [10:02:03.456] Not support core mask: 7, fallback to single core auto mode\n"
    assert runner_log.warnings("latency", out) == {
        "rkbench.warning.core_mask_fallback":
            "latency: E RKNN: [10:02:03.456] Not support core mask: 7, fallback to single core auto mode"}
    assert runner_log.warnings("latency", "I RKNN: init\n") == {}


# --------------------------------------------------------------------- end to end, emulated boards

@pytest.fixture(scope="module")
def workdir(tmp_path_factory, stage_cache: Path) -> Path:
    path = tmp_path_factory.mktemp("probes")
    (path / "cache").symlink_to(stage_cache, target_is_directory=True)   # exports shared with the other board tests
    return path


def _argv(workdir: Path, board: EmulatedBoard, adb_port: int, *extra: str) -> list[str]:
    return [f"cache_dir={workdir / 'cache'}", f"tracking.uri=sqlite:///{workdir / 'mlflow.db'}",
            "tracking.experiment=probes", "target=board", f"board.address={board.serial}",
            f"board.adb_port={adb_port}", *MODEL, *SMALL, *extra]


def _run(workdir: Path, argv: list[str]) -> tuple[int, object]:
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(workdir)
        code = main(argv)
    client = MlflowClient(tracking_uri=f"sqlite:///{workdir / 'mlflow.db'}")
    exp = client.get_experiment_by_name("probes")
    return code, client.search_runs([exp.experiment_id], filter_string="tags.`rkbench.kind` = 'config'",
                                    order_by=["attributes.start_time DESC"])[0]


@pytest.fixture(scope="module")
def debian_board(tmp_path_factory) -> Iterator[EmulatedBoard]:
    with EmulatedBoard(tmp_path_factory.mktemp("debian") / "root") as board:
        debian_pythons(board.root)
        yield board


def test_a_venv_board_run_pins_samples_and_restores_its_clocks(workdir, adb_server, debian_board, tmp_path) -> None:
    root = debian_board.root
    code, run = _run(workdir, _argv(workdir, debian_board, adb_server.port, "board.runtime=onnxruntime",
                                    f"board.python={VENV_PYTHON}", "board.pin_freq=true", "measure.toolkit_perf=true"))
    m, tags = run.data.metrics, run.data.tags
    assert code == 0 and tags["rkbench.status"] == "FINISHED", tags.get("rkbench.error")
    assert tags["board.python_path"] == VENV_PYTHON and tags["board.numpy"] and tags["board.opencv"]
    # no .rknn for a board running the ONNX: toolkit_perf collapses, nothing is converted
    assert "measure.toolkit_perf" in tags["rkbench.collapsed"] and "convert/build_s" not in m
    assert "rkbench.cache.convert" not in tags
    # pinned while measuring, recorded, and put back afterwards
    assert "npu performance 1000 MHz" in tags["board.pinned"] and tags["board.npu_governor"] == "performance"
    assert m["system/emulator_latency_npu_freq_mhz_min"] == m["system/emulator_latency_npu_freq_mhz_max"] == 1000
    assert m["system/emulator_latency_cpu_policy6_freq_mhz_min"] == 2256
    assert "system/emulator_latency_temp_soc_thermal_c_max" in m
    assert (root / "sys/class/devfreq/fdab0000.npu/governor").read_text().strip() == "rknpu_ondemand"
    assert (root / "sys/devices/system/cpu/cpufreq/policy6/scaling_governor").read_text().strip() == "schedutil"
    # the runner's own memory, sampled; nothing the emulator cannot know
    assert 10 < m["system/emulator_latency_rss_mib_mean"] <= m["system/emulator_latency_peak_rss_mib"]
    assert "system/emulator_latency_npu_load_pct" not in m and "board.kernel" not in tags
    assert "stand-in" in tags["board.emulated_facts"] and tags["board.rknn_server"] == "2.3.0"
    client = MlflowClient(tracking_uri=f"sqlite:///{workdir / 'mlflow.db'}")
    log = Path(client.download_artifacts(run.info.run_id, "board/latency.log", str(tmp_path)))
    assert log.exists()


def test_pinned_clocks_are_restored_when_the_runner_times_out(workdir, adb_server, debian_board) -> None:
    debian_board.faults = FaultPlan(hang_shell_matching="--mode latency")
    try:
        code, run = _run(workdir, _argv(workdir, debian_board, adb_server.port, "board.runtime=onnxruntime",
                                        f"board.python={VENV_PYTHON}", "board.pin_freq=true", "board.timeout_s=3",
                                        "measure.iterations=6"))
    finally:
        debian_board.faults = FaultPlan()
    assert code == 1 and run.data.tags["rkbench.status"] == "FAILED"
    assert "did not finish within 3s" in run.data.tags["rkbench.error"]
    root = debian_board.root
    assert (root / "sys/class/devfreq/fdab0000.npu/governor").read_text().strip() == "rknpu_ondemand"
    assert (root / "sys/class/devfreq/dmc/governor").read_text().strip() == "dmc_ondemand"


def test_a_core_mask_the_soc_lacks_falls_back_to_auto_and_is_invalid(workdir, adb_server, tmp_path_factory,
                                                                     tmp_path) -> None:
    """The stand-in librknnrt on an emulated rk3576 (two NPU cores) refuses core_mask=0_1_2 as librknnrt does:
    a warning, then single core auto mode. The run says so and its latency is INVALID."""
    with EmulatedBoard(tmp_path_factory.mktemp("rk3576") / "root", soc="rk3576") as board:
        code, run = _run(workdir, _argv(workdir, board, adb_server.port, "runner=cpp", "platform=rk3588",
                                        "core_mask=0_1_2"))
    tags = run.data.tags
    assert code == 0 and tags["rkbench.status"] == "FINISHED", tags.get("rkbench.error")
    assert "Not support core mask: 7" in tags["rkbench.warning.core_mask_fallback"]
    client = MlflowClient(tracking_uri=f"sqlite:///{workdir / 'mlflow.db'}")
    log = Path(client.download_artifacts(run.info.run_id, "board/latency.log", str(tmp_path))).read_text()
    assert "fallback to single core auto mode" in log
    record = RunRecord(run.info.run_id, run.info.run_name, "FINISHED", run.info.start_time, run.info.end_time,
                       run.data.params, run.data.metrics, tags)
    _, reasons = validity(record)
    assert any("single core auto mode (logged as core_mask=0_1_2)" in r for r in reasons), reasons
    clean = RunRecord(**{**record.__dict__, "tags": {k: v for k, v in tags.items() if "warning" not in k}})
    assert not any("auto mode" in r for r in validity(clean)[1])


def test_a_board_running_the_onnx_collapses_toolkit_perf_so_nothing_is_converted() -> None:
    from rkbench.config import BoardConfig, MeasureConfig, RunConfig
    from rkbench.spec import plan, uses_rknn

    onnx_board = BoardConfig(address="1.2.3.4:5555", runtime="onnxruntime")
    asked = plan(RunConfig(target="board", board=onnx_board, measure=MeasureConfig(toolkit_perf=True)))
    assert not uses_rknn(asked.config) and asked.config.measure.toolkit_perf is False
    assert "board.runtime=onnxruntime" in asked.collapsed["measure.toolkit_perf"]
    assert asked.config == plan(RunConfig(target="board", board=onnx_board)).config     # one identity
    npu = plan(RunConfig(target="board", board=BoardConfig(address="1.2.3.4:5555"), measure=MeasureConfig(toolkit_perf=True)))
    assert npu.config.measure.toolkit_perf is True and "measure.toolkit_perf" not in npu.collapsed


def test_a_board_clock_that_moved_while_measuring_makes_latency_invalid() -> None:
    stats = {f"latency/board_py_total_ms_{k}": v for k, v in (("p50", 5.0), ("mean", 5.0), ("cv", 0.01), ("count", 400))}
    tags = {"rkbench.device_kind": "board", "board.npu_governor": "performance", "board.ddr_governor": "performance",
            "rkbench.measure": "latency: 2 warmup + 400 timed iterations of batch 1 in 2.00 s"}
    pinned = dict(stats, **{"system/board_latency_npu_freq_mhz_min": 1000.0, "system/board_latency_npu_freq_mhz_max": 1000.0})
    throttled = dict(pinned, **{"system/board_latency_npu_freq_mhz_min": 700.0})
    record = RunRecord("r", "r", "FINISHED", 0, 1, {}, pinned, tags)
    assert validity(record) == (True, [])
    valid, reasons = validity(RunRecord("r", "r", "FINISHED", 0, 1, {}, throttled, tags))
    assert not valid and reasons == ["npu clock moved 700-1000 MHz while measuring (board.pin_freq=true pins it; a "
                                     "pinned clock that still drops is thermal throttling)"]
