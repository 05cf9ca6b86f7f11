"""adb's own environment picks the adb server, as adb and adbutils do: an explicit board.adb_host /
board.adb_port wins, then ADB_SERVER_SOCKET or ANDROID_ADB_SERVER_ADDRESS/HOST + ANDROID_ADB_SERVER_PORT, then
127.0.0.1:5037. The tests never let a server start on 5037."""

from __future__ import annotations

from typing import Iterator

import pytest

from rkbench.config import RunConfig
from rkbench.device import adb
from rkbench.device.adb import AdbServerAddress, server_address
from rkbench.device.emulator import EmulatedBoard
from rkbench.errors import DeviceError
from rkbench.stages import board as stage


@pytest.mark.parametrize("host, port, env, expected", [
    (None, None, {}, AdbServerAddress("127.0.0.1", 5037, "default")),
    (None, None, {"ANDROID_ADB_SERVER_PORT": "5099"}, AdbServerAddress("127.0.0.1", 5099, "ANDROID_ADB_SERVER_PORT")),
    (None, None, {"ANDROID_ADB_SERVER_ADDRESS": "10.0.0.2", "ANDROID_ADB_SERVER_PORT": "5099"},
     AdbServerAddress("10.0.0.2", 5099, "ANDROID_ADB_SERVER_ADDRESS, ANDROID_ADB_SERVER_PORT")),
    (None, None, {"ANDROID_ADB_SERVER_HOST": "10.0.0.3"}, AdbServerAddress("10.0.0.3", 5037, "ANDROID_ADB_SERVER_HOST")),
    (None, None, {"ADB_SERVER_SOCKET": "tcp:10.0.0.4:6000", "ANDROID_ADB_SERVER_PORT": "5099"},
     AdbServerAddress("10.0.0.4", 6000, "ADB_SERVER_SOCKET")),
    (None, None, {"ADB_SERVER_SOCKET": "tcp:6001"}, AdbServerAddress("127.0.0.1", 6001, "ADB_SERVER_SOCKET")),
    (None, 7000, {"ANDROID_ADB_SERVER_PORT": "5099"}, AdbServerAddress("127.0.0.1", 7000, "board.adb_port")),
    ("h", 7000, {"ADB_SERVER_SOCKET": "tcp:10.0.0.4:6000"}, AdbServerAddress("h", 7000, "board.adb_host, board.adb_port")),
])
def test_explicit_setting_beats_adb_environment_beats_default(host, port, env, expected) -> None:
    assert server_address(host, port, env) == expected


@pytest.mark.parametrize("env", [{"ADB_SERVER_SOCKET": "localfilesystem:/x"}, {"ANDROID_ADB_SERVER_PORT": "abc"}])
def test_unusable_adb_environment_names_the_variable(env) -> None:
    with pytest.raises(DeviceError, match=next(iter(env))):
        server_address(None, None, env)


@pytest.fixture
def no_server_on_5037(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Fail instead of starting (or using) an adb server on the default port; forget cached transports."""
    real = adb.ensure_adb_server

    def guarded(host: str, port: int, timeout_s: float = 30.0) -> None:
        assert port != 5037, "the adb environment was ignored: rkbench went for the default server on 5037"
        real(host, port, timeout_s)
    monkeypatch.setattr(adb, "ensure_adb_server", guarded)
    monkeypatch.setattr(stage, "_TRANSPORTS", {})
    monkeypatch.setattr(stage, "_GONE", {})
    yield


def _board_run(board: EmulatedBoard) -> RunConfig:
    run = RunConfig()
    run.target, run.board.address, run.board.reconnect_s = "board", board.serial, 5
    return run


@pytest.mark.parametrize("variable", ["ANDROID_ADB_SERVER_PORT", "ADB_SERVER_SOCKET"])
def test_sweep_takes_the_adb_server_from_the_environment(variable: str, adb_server, emulated_board: EmulatedBoard,
                                                         no_server_on_5037, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ANDROID_ADB_SERVER_PORT", raising=False)
    monkeypatch.setenv(variable, str(adb_server.port) if variable == "ANDROID_ADB_SERVER_PORT"
                       else f"tcp:127.0.0.1:{adb_server.port}")
    transport = stage.connect(_board_run(emulated_board))
    assert (transport.adb_host, transport.adb_port) == ("127.0.0.1", adb_server.port)
    assert variable in transport.describe()
    assert transport.shell(["echo", "reached"], timeout=20).output.strip() == "reached"
