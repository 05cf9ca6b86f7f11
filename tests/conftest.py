"""Shared fixtures for the board path (tests/device, tests/integration): an emulated board and a real,
private adb server connected to it.

The adb server runs on a free port with its own HOME (keys), never the user's server on 5037, and is
killed at the end of the session."""

from __future__ import annotations

import os
import socket
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest

from rkbench.device.adb import AdbTransport
from rkbench.device.emulator import EmulatedBoard, FaultPlan


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class AdbServer:
    exe: str
    port: int
    env: dict[str, str]

    def run(self, *args: str, timeout: float = 30) -> subprocess.CompletedProcess:
        return subprocess.run([self.exe, "-P", str(self.port), *args], env=self.env, capture_output=True,
                              text=True, timeout=timeout, stdin=subprocess.DEVNULL)


@pytest.fixture
def unused_port() -> int:
    return free_port()


@pytest.fixture(scope="session")
def adb_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AdbServer]:
    import adbutils
    port = free_port()
    home = tmp_path_factory.mktemp("adb-home")
    server = AdbServer(adbutils.adb_path(), port, {**os.environ, "HOME": str(home), "ANDROID_ADB_SERVER_PORT": str(port)})
    patch = pytest.MonkeyPatch()
    # adbutils runs a bare `adb start-server` when it cannot reach a server: keep even that on our port.
    patch.setenv("ANDROID_ADB_SERVER_PORT", str(port))
    try:
        started = server.run("start-server", timeout=60)
        assert started.returncode == 0, f"adb start-server failed: {started.stderr}"
        yield server
    finally:
        try:
            server.run("kill-server", timeout=15)
        except subprocess.TimeoutExpired:
            pass
        patch.undo()


@pytest.fixture(scope="session")
def stage_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One host stage cache (cache_dir) for the board tests: the model is exported once per session."""
    return tmp_path_factory.mktemp("stage-cache")


@pytest.fixture(scope="session")
def emulated_board(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmulatedBoard]:
    with EmulatedBoard(tmp_path_factory.mktemp("board") / "root") as board:
        yield board


@pytest.fixture(scope="session")
def adb_transport(adb_server: AdbServer, emulated_board: EmulatedBoard) -> Iterator[AdbTransport]:
    transport = AdbTransport(address=emulated_board.serial, adb_port=adb_server.port, connect_timeout_s=20,
                             io_timeout_s=20)
    yield transport
    adb_server.run("disconnect", emulated_board.serial, timeout=15)


@pytest.fixture
def board(emulated_board: EmulatedBoard, adb_transport: AdbTransport) -> Iterator[EmulatedBoard]:
    """The session's board with no faults; after the test the faults go and the link is back up."""
    emulated_board.faults = FaultPlan()
    emulated_board.fired.clear()
    yield emulated_board
    emulated_board.faults = FaultPlan()
    adb_transport.recover()


@pytest.fixture
def sandbox_path(board: EmulatedBoard):
    """Host path of a board path inside the emulated board's sandbox."""
    def host(remote: str) -> Path:
        path = board.fs.host_path(remote)
        assert path is not None
        return path
    return host
