"""The board path through a real adb server to the emulated board: commands, files, deploy, doctor, faults."""

from __future__ import annotations

import random
import time
from pathlib import Path

import pytest

from rkbench.device import doctor
from rkbench.device.adb import AdbTransport
from rkbench.device.deploy import deploy, deploy_with_report
from rkbench.device.emulator import EmulatedBoard, FaultPlan
from rkbench.device.emulator import tree
from rkbench.device.transport import sha256_file
from rkbench.errors import DeviceError

REMOTE = "/data/local/tmp/rkbench/test"


@pytest.fixture
def big_file(tmp_path: Path) -> Path:
    """300 KiB: several 64 KiB sync chunks and more than one 256 KiB adb payload."""
    path = tmp_path / "model.bin"
    path.write_bytes(random.Random(7).randbytes(300 * 1024))
    return path


def test_shell_exit_status_and_merged_output(board: EmulatedBoard, adb_transport: AdbTransport) -> None:
    result = adb_transport.shell(["sh", "-c", "echo out; echo err >&2; exit 3"], timeout=20)
    assert result.exit_code == 3
    assert result.output.split() == ["out", "err"]
    assert adb_transport.shell(["true"], timeout=20).ok


def test_board_python_is_the_host_interpreter_with_onnxruntime(board: EmulatedBoard, adb_transport: AdbTransport) -> None:
    result = adb_transport.shell(["python3", "-c", "import onnxruntime, sys; print(sys.version_info[0])"], timeout=60)
    assert result.ok, result.output
    assert result.output.strip() == "3"


def test_adbutils_shell2_reads_legacy_exit_status(board: EmulatedBoard, adb_transport: AdbTransport) -> None:
    device = adb_transport._device()
    assert "shell_v2" not in device.get_features()
    assert device.shell2("sh -c 'echo hi; exit 5'", timeout=20).returncode == 5


def test_push_pull_stat_multichunk(board: EmulatedBoard, adb_transport: AdbTransport, big_file: Path,
                                   tmp_path: Path, sandbox_path) -> None:
    remote = f"{REMOTE}/push/model.bin"
    assert not adb_transport.exists(remote)
    adb_transport.push(big_file, remote)
    assert adb_transport.exists(remote)
    assert sandbox_path(remote).read_bytes() == big_file.read_bytes()
    assert adb_transport.sha256(remote) == sha256_file(big_file)
    back = tmp_path / "back" / "model.bin"
    adb_transport.pull(remote, back)
    assert back.read_bytes() == big_file.read_bytes()
    assert adb_transport._stat(remote)[1] == 300 * 1024


def test_pull_of_missing_file_names_it(board: EmulatedBoard, adb_transport: AdbTransport, tmp_path: Path) -> None:
    with pytest.raises(DeviceError, match="no-such-file") as info:
        adb_transport.pull(f"{REMOTE}/no-such-file", tmp_path / "x")
    assert not info.value.retryable


def test_quoting_never_runs_paths_or_values(board: EmulatedBoard, adb_transport: AdbTransport, tmp_path: Path,
                                            sandbox_path) -> None:
    local = tmp_path / "weights.bin"
    local.write_bytes(b"payload")
    remote = f"{REMOTE}/q/a b $(touch PWNED) `touch PWNED2`; touch PWNED3.bin"
    adb_transport.push(local, remote)
    assert sandbox_path(remote).read_bytes() == b"payload"
    result = adb_transport.shell(["cat", remote], timeout=20)
    assert result.ok and result.output == "payload"
    echoed = adb_transport.shell(["echo", "$(id)", "'", '"', "a;b", "*"], timeout=20)
    assert echoed.output.strip() == "$(id) ' \" a;b *"
    assert not list(board.root.rglob("PWNED*"))


def test_deploy_skips_what_the_board_has(board: EmulatedBoard, adb_transport: AdbTransport, adb_server,
                                         big_file: Path, tmp_path: Path, sandbox_path) -> None:
    small = tmp_path / "runner.py"
    small.write_text("print('hi')\n")
    root = "/data/local/tmp/rkbench/deploytest"
    first = deploy_with_report(adb_transport, {"model": big_file, "runner": small}, root)
    assert sorted(first.pushed) == ["model", "runner"] and not first.skipped
    digest = sha256_file(big_file)
    assert first.paths["model"] == f"{root}/cache/{digest[:16]}/model.bin"
    assert sandbox_path(first.paths["model"]).read_bytes() == big_file.read_bytes()

    # Same process, same transport: remembered, no board round trip at all.
    again = deploy_with_report(adb_transport, {"model": big_file, "runner": small}, root)
    assert sorted(again.skipped) == ["model", "runner"] and not again.pushed

    # A fresh transport (a new process) finds the files by hash on the board.
    other = AdbTransport(address=board.serial, adb_port=adb_server.port, connect_timeout_s=20, io_timeout_s=20)
    sandbox_path(first.paths["runner"]).write_text("tampered\n")
    third = deploy_with_report(other, {"model": big_file, "runner": small}, root)
    assert third.skipped == ["model"] and third.pushed == ["runner"]
    assert sandbox_path(first.paths["runner"]).read_text() == "print('hi')\n"
    assert deploy(other, {"model": big_file}, root) == {"model": first.paths["model"]}


def test_doctor_probe_through_adb(board: EmulatedBoard, adb_transport: AdbTransport) -> None:
    facts = doctor.probe(adb_transport, "2.5.0")
    assert facts.soc == "rk3588"
    assert facts.npu_driver == "0.9.8"
    assert facts.librknnrt == "2.3.0" and facts.librknnrt_path == "/usr/lib/librknnrt.so"
    assert facts.rknn_server == "2.3.0"
    # the emulated clocks follow this machine's load under the ondemand governors: a step of the table, not a constant
    assert facts.dmc and facts.ddr_freq_hz in tree.DDR_HZ and facts.npu_freq_hz in tree.NPU_HZ
    assert set(facts.cpu_freq_khz) == {"policy0", "policy4", "policy6"}
    assert facts.python and facts.onnxruntime and facts.free_mib and facts.free_mib > 0
    findings = doctor.check(facts, expected_soc="rk3588")
    errors = [f for f in findings if f.level == "error"]
    assert [f.fix for f in errors] == ["update librknnrt.so and rknn_server on the board to >= 2.5.0 (rknpu2 runtime)"]
    tags = facts.as_tags()
    assert tags["board.soc"] == "rk3588" and tags["board.librknnrt"] == "2.3.0"
    assert tags["board.emulated"] == "true" and adb_transport.model() == "rkbench_emulator"
    assert all(k.startswith("board.") for k in tags)
    assert "update librknnrt.so" in doctor.format_report(facts, findings)


def test_doctor_cli(board: EmulatedBoard, adb_server, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["--address", board.serial, "--adb-port", str(adb_server.port), "--host-toolkit", "2.3.0",
            "--platform", "rk3588"]
    assert doctor.main(argv) == 0
    assert "rk3588" in capsys.readouterr().out
    assert doctor.main(argv[:-1] + ["rk3568"]) == 1


# ---- faults ----------------------------------------------------------------------------------------

def test_dropped_connection_mid_push_is_retried(board: EmulatedBoard, adb_transport: AdbTransport,
                                                big_file: Path, sandbox_path) -> None:
    board.faults = FaultPlan(drop_push_after_bytes=100 * 1024, drop_push_times=1)
    remote = f"{REMOTE}/drop/model.bin"
    adb_transport.push(big_file, remote)
    assert board.fired["drop_push"] == 1
    assert sandbox_path(remote).read_bytes() == big_file.read_bytes()


def test_connection_dropped_every_time_is_a_retryable_device_error(board: EmulatedBoard, adb_transport: AdbTransport,
                                                                   big_file: Path, sandbox_path) -> None:
    board.faults = FaultPlan(drop_push_after_bytes=100 * 1024, drop_push_times=99)
    remote = f"{REMOTE}/drop-always/model.bin"
    with pytest.raises(DeviceError) as info:
        adb_transport.push(big_file, remote)
    assert info.value.retryable
    assert board.fired["drop_push"] == adb_transport.attempts
    assert not sandbox_path(remote).exists()       # no partial file left behind


def test_disk_full_names_the_fix(board: EmulatedBoard, adb_transport: AdbTransport, big_file: Path,
                                 sandbox_path) -> None:
    board.faults = FaultPlan(free_bytes=50 * 1024)
    remote = f"{REMOTE}/full/model.bin"
    with pytest.raises(DeviceError, match="No space left on device") as info:
        adb_transport.push(big_file, remote)
    assert not info.value.retryable
    assert "board.remote_root" in str(info.value) and "free space" in str(info.value)
    assert board.fired["disk_full"] == 1
    assert not sandbox_path(remote).exists()


def test_killed_command_reports_nonzero_exit(board: EmulatedBoard, adb_transport: AdbTransport) -> None:
    board.faults = FaultPlan(kill_shell_matching="rkbench-victim", kill_after_s=0.3)
    started = time.monotonic()
    result = adb_transport.shell(["sh", "-c", "sleep 30; echo rkbench-victim done"], timeout=20)
    assert result.exit_code == 137      # 128 + SIGKILL, as for the OOM killer
    assert "done" not in result.output
    assert time.monotonic() - started < 10
    assert board.fired["kill_shell"] == 1


def test_truncated_pull_is_detected_and_retried(board: EmulatedBoard, adb_transport: AdbTransport,
                                                big_file: Path, tmp_path: Path) -> None:
    remote = f"{REMOTE}/trunc/model.bin"
    adb_transport.push(big_file, remote)
    board.faults = FaultPlan(truncate_pull_bytes=70 * 1024, truncate_pull_times=1)
    adb_transport.pull(remote, tmp_path / "once.bin")
    assert board.fired["truncate_pull"] == 1
    assert (tmp_path / "once.bin").read_bytes() == big_file.read_bytes()

    board.faults = FaultPlan(truncate_pull_bytes=70 * 1024, truncate_pull_times=99)
    with pytest.raises(DeviceError, match="incomplete") as info:
        adb_transport.pull(remote, tmp_path / "always.bin")
    assert info.value.retryable
    assert not (tmp_path / "always.bin").exists() and not list(tmp_path.glob("*.partial"))


def test_hung_command_times_out_and_board_stays_usable(board: EmulatedBoard, adb_transport: AdbTransport) -> None:
    board.faults = FaultPlan(hang_shell_matching="rkbench-hang")
    started = time.monotonic()
    with pytest.raises(DeviceError, match="did not finish within 1.5s") as info:
        adb_transport.shell(["echo", "rkbench-hang"], timeout=1.5)
    assert 1.4 < time.monotonic() - started < 8
    assert not info.value.retryable
    assert board.fired["hang_shell"] == 1
    assert adb_transport.shell(["echo", "alive"], timeout=20).output.strip() == "alive"



def test_a_command_reading_stdin_waits_as_on_a_board(board: EmulatedBoard, adb_transport: AdbTransport) -> None:
    """adbd's raw shell gives the command the stream as stdin and the host sends nothing: `read` waits."""
    with pytest.raises(DeviceError, match="did not finish within 1s"):
        adb_transport.shell(["sh", "-c", "read line; echo read-returned"], timeout=1.0)
    assert adb_transport.shell(["echo", "alive"], timeout=20).output.strip() == "alive"
