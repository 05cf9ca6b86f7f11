"""The C++ runner's measurement conditions without Python on the board: the runner's launcher samples the
clocks, temperatures, loads and the runner's own memory with a sh loop (shell_sampler.py), from the files
the board probe found; and doctor checks for the launcher's setsid."""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from rkbench.device import doctor, sampling, shell_sampler
from rkbench.device.emulator import EmulatedBoard, make_board_tree
from rkbench.device.emulator.tree import EmulatedClocks
from rkbench.device.session import launched
from rkbench.device.transport import LocalTransport
from rkbench.stages import board as stage
from tests.device.test_probes import _argv, _run

# a stand-in runner with a name of its own and ~120 MiB resident, well above any shell's
BIG = "import time; block = b'x' * (120 << 20); time.sleep(0.8)"


@pytest.fixture
def local(tmp_path: Path) -> LocalTransport:
    make_board_tree(tmp_path / "board", librknnrt_version="2.5.0")
    return LocalTransport(tmp_path / "board")


def test_the_launcher_samples_probed_clocks_and_the_runners_own_memory(local: LocalTransport, tmp_path: Path) -> None:
    root = local.fs.root
    facts = doctor.probe(local, "2.5.0")
    plan = shell_sampler.ShellSampling(shell_sampler.probed_sources(facts), interval=0.05)
    # the probe finds what the Python runner's sampler finds, at the same board paths
    python_side = sampling.clock_sources(str(root))
    assert plan.sources.keys() == python_side.keys() and {"npu_freq", "ddr_freq", "temp_soc_thermal"} <= plan.sources.keys()
    assert {n: p for n, (p, *_) in plan.sources.items()} == {n: "/" + str(Path(p).relative_to(root))
                                                             for n, (p, *_) in python_side.items()}
    runner = root / "data/local/tmp/rkbench/bin/fake_runner"     # the runner's binary name is what /proc shows
    runner.parent.mkdir(parents=True)
    runner.symlink_to(sys.executable)
    clocks = EmulatedClocks(root, interval=0.02)
    clocks.start()
    try:
        started = time.monotonic()
        result = local.shell(launched(["/data/local/tmp/rkbench/bin/fake_runner", "-S", "-c", BIG],
                                      "/data/local/tmp/rkbench/run/t.pid", "/data/local/tmp/rkbench/t.samples", plan),
                             timeout=60)
        elapsed = time.monotonic() - started
    finally:
        clocks.stop()
    assert result.ok, result.output
    system = shell_sampler.parse_samples((root / "data/local/tmp/rkbench/t.samples").read_text(), plan, runner.name)
    memory = system["memory"]
    assert memory["process"] == "fake_runner" and memory["pid"] and memory["rss_samples"] >= 3
    assert 120 < memory["peak_rss_mib"] < 200 and memory["rss_mib_mean"] <= memory["peak_rss_mib"]  # not the shell's ~2 MiB
    assert {"npu_freq", "ddr_freq", "cpu_policy0_freq", "temp_soc_thermal"} <= system["clocks"].keys()
    assert system["clocks"]["npu_freq"]["governors"] == ["rknpu_ondemand"] and 300 <= system["clocks"]["npu_freq"]["min"]
    assert 30 < system["clocks"]["temp_soc_thermal"]["max"] < 80 and system["cpu_load"]["available"]
    assert not system["npu_load"]["available"] and "missing" in system["npu_load"]["reason"]
    # real timestamps: the samples span the runner's life, about one interval apart
    assert 0.6 < system["window_s"] <= elapsed and 0.04 <= system["interval_measured_s"] < 0.2
    assert system["samples"] >= 8 and "whole process" in system["window"]
    assert not (root / "data/local/tmp/rkbench/run/t.pid").exists()


def test_doctor_and_the_blocking_check_want_setsid(local: LocalTransport, tmp_path: Path) -> None:
    assert doctor.probe(local, "2.5.0").setsid           # this machine has it
    tools = tmp_path / "bin"     # a PATH with the probe's tools, setsid left out
    tools.mkdir()
    for tool in ("sh", "tr", "uname", "cat", "grep", "head", "tail", "df", "dirname", "strings"):
        if shutil.which(tool):
            (tools / tool).symlink_to(shutil.which(tool))
    result = local.shell(["env", f"PATH={tools}", "sh", "-c", doctor._PROBE_SCRIPT, "sh", "/data/local/tmp/rkbench",
                          "", "python3"], timeout=60)
    facts = doctor.parse_probe(result.output, "t", "/data/local/tmp/rkbench", "2.5.0")
    assert facts.setsid is None
    missing = [f for f in doctor.check(facts) if "setsid" in f.what]
    assert len(missing) == 1 and missing[0].level == "error" and "util-linux" in missing[0].fix
    for runtime in ("cpp", "onnxruntime", "rknnlite"):   # every runner and runtime is launched with it
        assert missing[0] in stage.blocking_findings(facts, doctor.check(facts), runtime), runtime
    facts.emulated = True     # the emulated board too: its launcher is the same sh script
    assert missing[0] in stage.blocking_findings(facts, doctor.check(facts), "cpp")
    assert "setsid" in doctor.format_report(facts, missing)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, stage_cache: Path) -> Path:
    path = tmp_path_factory.mktemp("cppsample")
    (path / "cache").symlink_to(stage_cache, target_is_directory=True)   # exports shared with the other board tests
    return path


@pytest.fixture(scope="module")
def board(tmp_path_factory) -> EmulatedBoard:
    with EmulatedBoard(tmp_path_factory.mktemp("cppsample") / "root") as emulated:
        yield emulated


def test_a_cpp_run_logs_the_system_metrics_a_python_run_logs(workdir, adb_server, board, tmp_path) -> None:
    def system(runner: str) -> tuple[dict, dict, str]:
        code, run = _run(workdir, _argv(workdir, board, adb_server.port, f"runner={runner}",
                                        "board.runtime=onnxruntime", "measure.warmup=1"))
        assert code == 0 and run.data.tags["rkbench.status"] == "FINISHED", run.data.tags.get("rkbench.error")
        return {k: v for k, v in run.data.metrics.items() if k.startswith("system/")}, run.data.tags, run.info.run_id

    py, _, _ = system("python")
    cpp, tags, run_id = system("cpp")
    assert tags["rkbench.runner"] == "cpp"
    assert sorted(cpp) == sorted(py)     # the same families, the same names
    assert {"system/emulator_latency_npu_freq_mhz_min", "system/emulator_latency_temp_soc_thermal_c_max",
            "system/emulator_latency_cpu_load_pct", "system/emulator_latency_peak_rss_mib"} <= cpp.keys()
    assert 0 < cpp["system/emulator_latency_rss_mib_mean"] <= cpp["system/emulator_latency_peak_rss_mib"]
    assert "system samples: the runner's whole process" in tags["rkbench.measure"]
    # the memory is the C++ runner's own process (after setsid's exec), not its launcher shell's
    client = MlflowClient(tracking_uri=f"sqlite:///{workdir / 'mlflow.db'}")
    result = json.loads(Path(client.download_artifacts(run_id, "board/latency.json", str(tmp_path))).read_text())
    memory = result["system"]["memory"]
    assert memory["process"] == "rkbench_runner" and memory["rss_samples"] >= 1 and memory["pid"] > 0
    # sleep 0.2 plus the sample's reads, stamped by /proc/uptime (10 ms steps)
    assert result["system"]["window_s"] > 0 and result["system"]["interval_measured_s"] > sampling.SAMPLE_INTERVAL_S - 0.011
