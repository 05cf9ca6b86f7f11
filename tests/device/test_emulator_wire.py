"""The emulated board at the packet level (no adb server): handshake, flow control, sync framing, path mapping."""

from __future__ import annotations

import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Iterator

import pytest

from rkbench.device.emulator import EmulatedBoard
from rkbench.device.emulator.wire import A_CLSE, A_CNXN, A_OKAY, A_OPEN, A_VERSION, A_WRTE
from rkbench.device.sandbox import BoardRoot

HEADER = struct.Struct("<6I")
REPO = Path(__file__).resolve().parents[2]


class WireHost:
    """The host side of the adb transport protocol, just enough to poke the board."""

    def __init__(self, port: int):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=5)

    def send(self, command: int, arg0: int, arg1: int, data: bytes = b"") -> None:
        self.sock.sendall(HEADER.pack(command, arg0, arg1, len(data), 0, command ^ 0xFFFFFFFF) + data)

    def _exact(self, n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = self.sock.recv(n - len(data))
            assert chunk, "board closed the connection"
            data += chunk
        return data

    def recv(self) -> tuple[int, int, int, bytes]:
        command, arg0, arg1, length, _crc, magic = HEADER.unpack(self._exact(HEADER.size))
        assert magic == command ^ 0xFFFFFFFF
        return command, arg0, arg1, self._exact(length) if length else b""

    def handshake(self) -> bytes:
        self.send(A_CNXN, A_VERSION, 1024 * 1024, b"host::features=shell_v2,cmd\0")
        command, version, max_payload, banner = self.recv()
        assert (command, version, max_payload) == (A_CNXN, A_VERSION, 256 * 1024)
        return banner

    def open(self, host_id: int, service: str) -> int:
        self.send(A_OPEN, host_id, 0, service.encode() + b"\0")
        command, board_id, to, _ = self.recv()
        assert (command, to) == (A_OKAY, host_id)
        return board_id


@pytest.fixture
def wire(tmp_path: Path) -> Iterator[tuple[EmulatedBoard, WireHost]]:
    with EmulatedBoard(tmp_path / "root") as board:
        host = WireHost(board.port)
        yield board, host
        host.sock.close()


def test_handshake_answers_cnxn_without_auth(wire) -> None:
    _board, host = wire
    banner = host.handshake().decode()
    assert banner.startswith("device::")
    assert "ro.product.name=rk3588" in banner and banner.endswith("features=cmd")


def test_each_wrte_waits_for_the_hosts_okay(wire) -> None:
    _board, host = wire
    host.handshake()
    board_id = host.open(1, "shell:head -c 300000 /dev/zero")
    received = 0
    while True:
        command, arg0, arg1, data = host.recv()
        if command == A_CLSE:
            break
        assert (command, arg0, arg1) == (A_WRTE, board_id, 1)
        received += len(data)
        host.sock.settimeout(0.3)
        with pytest.raises(socket.timeout):     # nothing more until we acknowledge
            host.sock.recv(1)
        host.sock.settimeout(5)
        host.send(A_OKAY, 1, board_id)
    assert received == 300000


def test_unknown_service_is_refused_with_clse(wire) -> None:
    _board, host = wire
    host.handshake()
    host.send(A_OPEN, 7, 0, b"jdwp:1234\0")
    assert host.recv()[:3] == (A_CLSE, 0, 7)


def test_sync_refuses_data_chunks_over_64k(wire) -> None:
    board, host = wire
    host.handshake()
    board_id = host.open(3, "sync:")
    path = b"/data/local/tmp/big,33188"
    host.send(A_WRTE, 3, board_id, b"SEND" + struct.pack("<I", len(path)) + path
              + b"DATA" + struct.pack("<I", 70000) + bytes(70000))
    assert host.recv()[0] == A_OKAY
    command, _, _, data = host.recv()
    assert command == A_WRTE and data[:4] == b"FAIL" and b"too much data" in data
    assert not (board.root / "data/local/tmp/big").exists()


def test_sync_stat_of_missing_and_outside_paths_is_zero(wire) -> None:
    _board, host = wire
    host.handshake()
    board_id = host.open(4, "sync:")
    for path in (b"/data/local/tmp/absent", b"/etc/passwd"):
        host.send(A_WRTE, 4, board_id, b"STAT" + struct.pack("<I", len(path)) + path)
        assert host.recv()[0] == A_OKAY
        command, _, _, data = host.recv()
        assert command == A_WRTE and data == b"STAT" + bytes(12)
        host.send(A_OKAY, 4, board_id)


def test_board_paths_map_into_the_sandbox(tmp_path: Path) -> None:
    fs = BoardRoot(tmp_path)
    root = str(fs.root)
    assert fs.rewrite("cat '/data/local/tmp/a b' /sys/class/x>/data/o") == \
        f"cat '{root}/data/local/tmp/a b' {root}/sys/class/x>{root}/data/o"
    for untouched in ("/database/x", "foo/data/x", "/usr/bin/python3.11", "/tmp/data", "/system/bin/sh"):
        assert fs.rewrite(untouched) == untouched
    assert fs.host_path("/data/local/tmp/x") == fs.root / "data/local/tmp/x"
    assert fs.host_path("/data/../etc/passwd") is None and fs.host_path("/etc/passwd") is None
    out = f"{root}/data/x and {root}/usr/lib/librknnrt.so".encode()
    assert fs.unmap(out) == b"/data/x and /usr/lib/librknnrt.so"
    assert fs.held_back(f"abc {root[:5]}".encode()) == 5 and fs.held_back(b"abc") == 0


def test_sandbox_path_with_shell_characters_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="plain path"):
        BoardRoot(tmp_path / "it's here")


def test_command_line_entry_point_serves_a_board(tmp_path: Path, unused_port: int) -> None:
    port = unused_port
    proc = subprocess.Popen([sys.executable, "-m", "rkbench.device.emulator", "--root", str(tmp_path / "root"),
                             "--port", str(port), "--no-dmc"], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        assert f"adb connect 127.0.0.1:{port}" in proc.stdout.readline()
        host = WireHost(port)
        assert b"rkbench-emulator" in host.handshake()
        host.sock.close()
        assert not (tmp_path / "root/sys/class/devfreq/dmc").exists()
    finally:
        proc.terminate()
        proc.wait(timeout=10)



def test_a_board_going_away_refuses_tcp_at_once(tmp_path: Path) -> None:
    """A board that went away takes no connection from the moment its listener closes (the farm drains a board
    by exactly this check), not only once stop() has joined its threads: close() alone left the kernel
    accepting while the accept thread sat in accept()."""
    board = EmulatedBoard(tmp_path / "root")
    board.start()
    socket.create_connection(("127.0.0.1", board.port), timeout=2).close()
    time.sleep(0.1)                              # the accept thread is back in accept()
    closing, release = threading.Event(), threading.Event()

    def slow_teardown() -> None:                 # stop() is past the listener, tearing down the rest
        closing.set()
        release.wait(5)

    board.drop_connections = slow_teardown       # type: ignore[method-assign]
    stopper = threading.Thread(target=board.stop)
    stopper.start()
    try:
        assert closing.wait(5)
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", board.port), timeout=2).close()
    finally:
        release.set()
        stopper.join()
