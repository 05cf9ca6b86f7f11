"""A board that drops between configurations: the next one waits for it (backoff, one line per attempt,
bounded by board.reconnect_s) and goes on; one that stays away fails every later configuration at once, with
one reason. A board of its own (stopped and restarted on its port) behind the session's adb server."""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Iterator

import pytest

from rkbench.config import RunConfig
from rkbench.device.emulator import EmulatedBoard
from rkbench.errors import DeviceError
from rkbench.stages import board as stage


@pytest.fixture
def own_board(tmp_path: Path, adb_server, monkeypatch: pytest.MonkeyPatch) -> Iterator[EmulatedBoard]:
    monkeypatch.setattr(stage, "_TRANSPORTS", {})
    monkeypatch.setattr(stage, "_GONE", {})
    board = EmulatedBoard(tmp_path / "root")
    board.start()
    try:
        yield board
    finally:
        board.stop()
        adb_server.run("disconnect", board.serial, timeout=15)


def _run(board: EmulatedBoard, adb_port: int, reconnect_s: float) -> RunConfig:
    run = RunConfig()
    run.target, run.board.address, run.board.adb_port, run.board.reconnect_s = "board", board.serial, adb_port, reconnect_s
    return run


def _pull_the_plug(board: EmulatedBoard, adb_server) -> None:
    """Stop the board and wait until the adb server no longer lists it as a ready device."""
    board.stop()
    deadline = time.monotonic() + 15
    while f"{board.serial}\tdevice" in adb_server.run("devices").stdout:
        assert time.monotonic() < deadline, "the adb server still lists the stopped board"
        time.sleep(0.1)


def test_next_configuration_waits_for_a_dropped_board(own_board: EmulatedBoard, adb_server,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="rkbench")
    run = _run(own_board, adb_server.port, reconnect_s=40)
    transport = stage.connect(run)
    assert transport.shell(["echo", "up"], timeout=20).ok
    _pull_the_plug(own_board, adb_server)
    back = threading.Timer(3.0, own_board.start)
    back.start()
    started = time.monotonic()
    assert stage.connect(run) is transport                 # the same transport: deploy's memory is kept
    waited = time.monotonic() - started
    back.join()
    assert 2.5 < waited < 30
    assert transport.shell(["echo", "back"], timeout=20).output.strip() == "back"
    attempts = [r.getMessage() for r in caplog.records if "unreachable, attempt" in r.getMessage()]
    assert attempts and all("board.reconnect_s=40s" in line and "next try in" in line for line in attempts)
    assert "\n" not in "".join(attempts)                     # one line each
    pauses = [float(line.rsplit("next try in ", 1)[1].rstrip("s")) for line in attempts]
    assert pauses == sorted(pauses) and (len(pauses) < 2 or pauses[1] == 2 * pauses[0])   # exponential backoff
    assert any("is back after" in r.getMessage() for r in caplog.records)


def test_board_that_stays_away_fails_the_rest_at_once(own_board: EmulatedBoard, adb_server) -> None:
    run = _run(own_board, adb_server.port, reconnect_s=3)
    stage.connect(run)
    _pull_the_plug(own_board, adb_server)
    started = time.monotonic()
    with pytest.raises(DeviceError, match=r"did not come back within board.reconnect_s=3s") as first:
        stage.connect(run)
    assert 2.5 < time.monotonic() - started < 20
    for _ in range(3):                                     # the sweep's later configurations: no waiting again
        started = time.monotonic()
        with pytest.raises(DeviceError) as later:
            stage.connect(run)
        assert time.monotonic() - started < 0.5
        assert str(later.value) == str(first.value) and "without waiting again" in str(later.value)


def test_reconnect_bound_is_typed_and_validated() -> None:
    from omegaconf import OmegaConf
    from omegaconf.errors import ValidationError

    from rkbench.config import validate
    from rkbench.errors import ConfigError

    with pytest.raises(ValidationError):
        OmegaConf.merge(OmegaConf.structured(RunConfig), {"board": {"reconnect_s": "soon"}})
    run = RunConfig()
    run.model.yaml = "yolov8n.yaml"
    validate(run)
    run.board.reconnect_s = -1
    with pytest.raises(ConfigError, match="board.reconnect_s=-1"):
        validate(run)
