"""The `sync:` service: file transfer framing inside one stream, on the board's sandbox paths.

Requests are an id and a little-endian length: STAT (mode, size, mtime; zeros for a missing file), LIST
(DENT entries then DONE), SEND "path,mode" (DATA chunks <= 64 KiB, DONE with the mtime; answered OKAY,
or FAIL+message with the partial file removed), RECV (DATA chunks, DONE; FAIL+message) and QUIT. Paths
map into the sandbox as rkbench/device/sandbox.py says; any other path is refused (FAIL), so sync and
shell never disagree. Faults: a dropped connection mid-SEND, a full disk, a truncated RECV.
"""

from __future__ import annotations

import os
import struct
from typing import TYPE_CHECKING, Optional

from rkbench.device.emulator.wire import Stream, StreamClosed
from rkbench.device.sandbox import BOARD_PREFIXES

if TYPE_CHECKING:
    from rkbench.device.emulator.board import EmulatedBoard

SYNC_DATA_MAX = 64 * 1024


def serve_sync(board: "EmulatedBoard", stream: Stream) -> None:
    while True:
        request = stream.read_exact(8)
        rid, length = request[:4], struct.unpack("<I", request[4:])[0]
        if rid == b"QUIT":
            return
        if length > 1024:
            _fail(stream, "path too long")
            return
        path = stream.read_exact(length).decode("utf-8", "replace")
        if rid == b"STAT":
            stream.write(b"STAT" + _stat(board, path))
        elif rid == b"LIST":
            _list(board, stream, path)
        elif rid == b"SEND":
            if not _send(board, stream, path):
                return
        elif rid == b"RECV":
            if not _recv(board, stream, path):
                return
        else:
            _fail(stream, f"unknown sync request {rid!r}")
            return


def _fail(stream: Stream, message: str) -> None:
    data = message.encode()
    stream.write(b"FAIL" + struct.pack("<I", len(data)) + data)


def _stat(board: "EmulatedBoard", remote: str) -> bytes:
    host = board.fs.host_path(remote)
    try:
        if host is None:
            raise FileNotFoundError(remote)
        st = host.lstat()
    except OSError:
        return struct.pack("<III", 0, 0, 0)
    return struct.pack("<III", st.st_mode & 0xFFFFFFFF, st.st_size & 0xFFFFFFFF, int(st.st_mtime) & 0xFFFFFFFF)


def _list(board: "EmulatedBoard", stream: Stream, remote: str) -> None:
    host = board.fs.host_path(remote)
    entries = sorted(host.iterdir()) if host is not None and host.is_dir() else []
    out = bytearray()
    for entry in entries:
        st = entry.lstat()
        name = entry.name.encode()
        out += b"DENT" + struct.pack("<IIII", st.st_mode & 0xFFFFFFFF, st.st_size & 0xFFFFFFFF,
                                     int(st.st_mtime) & 0xFFFFFFFF, len(name)) + name
    stream.write(bytes(out) + b"DONE" + struct.pack("<IIII", 0, 0, 0, 0))


def _send(board: "EmulatedBoard", stream: Stream, spec: str) -> bool:
    """SEND "path,mode": DATA chunks then DONE(mtime) -> OKAY; a failure -> FAIL, partial file removed."""
    remote, _, mode_text = spec.rpartition(",")
    if not remote or not mode_text.isdigit():
        remote, mode_text = spec, str(0o100644)
    host = board.fs.host_path(remote)
    out = None
    error: Optional[str] = None
    if host is None:
        error = f"{remote}: outside the emulated board's filesystem ({', '.join(BOARD_PREFIXES)})"
    else:
        try:
            host.parent.mkdir(parents=True, exist_ok=True)   # adbd creates missing parents too
            host.unlink(missing_ok=True)
            out = host.open("wb")
        except OSError as exc:
            error = f"open failed: {exc.strerror}"
    mtime = 0
    try:
        mtime, error = _receive_data(board, stream, out, error)
    except StreamClosed:
        error = "connection lost"
        raise
    finally:
        if out is not None:
            out.close()
            if error is not None:
                host.unlink(missing_ok=True)   # adbd removes a partial file, before it answers
    if error is not None:
        _fail(stream, error)
        return False
    os.utime(host, (mtime, mtime))
    host.chmod(int(mode_text) & 0o777)
    stream.write(b"OKAY" + struct.pack("<I", 0))
    return True


def _receive_data(board: "EmulatedBoard", stream: Stream, out, error: Optional[str]) -> tuple[int, Optional[str]]:
    """Read DATA chunks into `out` until DONE; returns (mtime, error). Like adbd, a write failure keeps
    draining until DONE before it is reported; a framing error is reported at once."""
    faults = board.faults
    received = 0
    while True:
        head = stream.read_exact(8)
        rid, value = head[:4], struct.unpack("<I", head[4:])[0]
        if rid == b"DONE":
            return value, error
        if rid != b"DATA":
            return 0, error or f"invalid data message {rid!r}"
        if value > SYNC_DATA_MAX:
            return 0, error or "too much data"
        chunk = stream.read_exact(value)
        received += len(chunk)
        if (faults.drop_push_after_bytes is not None and received >= faults.drop_push_after_bytes
                and board.fire("drop_push", "drop_push_times")):
            stream.conn.drop()
            raise StreamClosed()
        if error is None and faults.free_bytes is not None and received > faults.free_bytes:
            board.fire("disk_full")
            error = "write failed: No space left on device"
        if error is None:
            out.write(chunk)


def _recv(board: "EmulatedBoard", stream: Stream, remote: str) -> bool:
    host = board.fs.host_path(remote)
    if host is None or not host.is_file():
        _fail(stream, "open failed: No such file or directory")
        return False
    limit: Optional[int] = None
    if board.faults.truncate_pull_bytes is not None and board.fire("truncate_pull", "truncate_pull_times"):
        limit = board.faults.truncate_pull_bytes
    sent = 0
    with host.open("rb") as f:
        while limit is None or sent < limit:
            chunk = f.read(SYNC_DATA_MAX if limit is None else min(SYNC_DATA_MAX, limit - sent))
            if not chunk:
                break
            stream.write(b"DATA" + struct.pack("<I", len(chunk)) + chunk)
            sent += len(chunk)
    stream.write(b"DONE" + struct.pack("<I", 0))
    return True
