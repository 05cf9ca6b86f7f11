"""The runner's processes on the board: adbd signals only the shell when a stream closes, so a runner
would be orphaned; BoardSession runs it in its own process group with a pid file and kills that group on
timeout, on a lost link (once reconnected) and on Ctrl-C. Through a real adb server to the emulated board."""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from pathlib import Path
from typing import Callable

import psutil
import pytest

from rkbench.config import RunConfig
from rkbench.device.adb import AdbTransport
from rkbench.device.emulator import EmulatedBoard
from rkbench.device.session import BoardSession, Deployed, kill_runners
from rkbench.errors import DeviceError

ROOT = "/data/local/tmp/rkbench-proc"
# A runner stand-in: records its pid and its child's (a worker, same process group), then blocks.
FAKE_RUNNER = 'echo $$ >> "$1"; sleep 60 & echo $! >> "$1"; wait\n'


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def wait_for(check: Callable[[], bool], seconds: float = 10) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.05)
    return check()


def pids_in(path: Path) -> list[int]:
    return [int(p) for p in path.read_text().split()] if path.exists() else []


@pytest.fixture
def fake_session(board: EmulatedBoard, adb_transport: AdbTransport, sandbox_path, tmp_path: Path):
    """A BoardSession whose runner command is FAKE_RUNNER (pushed under the remote root) and the file its pids
    land in; every pid still alive after the test is killed (the test must not leave processes)."""
    script = tmp_path / "runner.sh"
    script.write_text(FAKE_RUNNER)
    remote_script = f"{ROOT}/cache/fake/runner.sh"
    adb_transport.push(script, remote_script)
    pids_remote = f"{ROOT}/pids-{tmp_path.name}"
    run = RunConfig()
    run.board.remote_root, run.board.timeout_s, run.board.reconnect_s = ROOT, 1.5, 20
    session = BoardSession(adb_transport, run, Deployed(model="", runner="", pythonpath="", images="", spec=""),
                           dataset=None, where="emulator", local_dir=tmp_path, remote_dir=f"{ROOT}/results/{tmp_path.name}")
    session.command = lambda mode, out, detections: ["sh", remote_script, pids_remote]   # type: ignore[method-assign]
    pids = sandbox_path(pids_remote)
    yield session, pids
    for pid in pids_in(pids):
        if alive(pid):
            os.kill(pid, signal.SIGKILL)


def test_closing_the_stream_signals_only_the_shell(board: EmulatedBoard, adb_transport: AdbTransport,
                                                   sandbox_path) -> None:
    """As adbd: the shell gets SIGHUP, a command it started keeps running (orphaned) once the host gives up."""
    marker = f"{ROOT}/orphan-pid"
    with pytest.raises(DeviceError, match="did not finish"):
        adb_transport.shell(["sh", "-c", 'mkdir -p "${1%/*}"; echo $$ > "$1"; sleep 30', "sh", marker],
                            timeout=1.0)
    pid = int(sandbox_path(marker).read_text())
    try:
        time.sleep(0.5)
        assert alive(pid), "the emulator killed more than the shell: a real adbd leaves this process running"
    finally:
        os.kill(pid, signal.SIGKILL)


def test_timed_out_runner_group_is_killed(fake_session, caplog: pytest.LogCaptureFixture) -> None:
    session, pids = fake_session
    with pytest.raises(DeviceError, match=r"did not finish within 1.5s.*process group was killed"):
        session.run_mode("latency")
    assert len(pids_in(pids)) == 2                       # the runner and its worker
    assert wait_for(lambda: not any(alive(p) for p in pids_in(pids)), 5)
    assert session.attempts["latency"] == 1              # a timeout is not retried
    assert "latency timed out" in caplog.text


def test_runner_orphaned_by_a_lost_link_is_killed_on_reconnect(fake_session, board: EmulatedBoard,
                                                                caplog: pytest.LogCaptureFixture) -> None:
    session, pids = fake_session
    caplog.set_level(logging.WARNING, logger="rkbench")

    def drop_once_running() -> None:
        if wait_for(lambda: len(pids_in(pids)) >= 2):
            board.drop_connections()
    threading.Thread(target=drop_once_running, daemon=True).start()
    first: list[int] = []

    def first_runner_dead_before_second() -> bool:
        first[:] = first or pids_in(pids)[:2]
        return len(pids_in(pids)) >= 4 and not any(alive(p) for p in first)
    checker_result: list[bool] = []
    checker = threading.Thread(target=lambda: checker_result.append(wait_for(first_runner_dead_before_second, 30)),
                               daemon=True)
    checker.start()
    with pytest.raises(DeviceError, match="did not finish within"):     # the second attempt hangs too
        session.run_mode("latency")
    checker.join(timeout=30)
    assert session.attempts["latency"] == 2
    assert checker_result == [True], "the first runner was still running when the second one started"
    assert f"killed runner process group(s) {first[0]}" in caplog.text and "lost its link" in caplog.text
    assert wait_for(lambda: not any(alive(p) for p in pids_in(pids)), 5)


def test_ctrl_c_kills_the_runner_group(fake_session) -> None:
    session, pids = fake_session
    session.run.board.timeout_s = 30

    def interrupt_once_running() -> None:
        if wait_for(lambda: len(pids_in(pids)) >= 2):
            os.kill(os.getpid(), signal.SIGINT)
    threading.Thread(target=interrupt_once_running, daemon=True).start()
    with pytest.raises(KeyboardInterrupt):
        session.run_mode("latency")
    assert len(pids_in(pids)) == 2
    assert wait_for(lambda: not any(alive(p) for p in pids_in(pids)), 5)


def test_kill_runners_leaves_foreign_pids_alone(board: EmulatedBoard, adb_transport: AdbTransport,
                                                 sandbox_path, tmp_path: Path) -> None:
    """A stale pid file whose pid now belongs to another program (reboot, pid reuse) kills nothing."""
    stranger = psutil.Popen(["sleep", "30"])
    try:
        pidfile = sandbox_path(f"{ROOT}/run/stale.pid")
        pidfile.parent.mkdir(parents=True, exist_ok=True)
        pidfile.write_text(f"{stranger.pid}\n")
        assert kill_runners(adb_transport, ROOT, "test") == []
        assert alive(stranger.pid) and not pidfile.exists()
    finally:
        stranger.kill()
        stranger.wait()
