"""An emulated Rockchip board: the device side of the adb wire protocol over TCP.

A real adb server connects to it with `adb connect 127.0.0.1:PORT`, exactly as it would to a board's adbd
over Ethernet, so everything from adbutils down to the TCP stream is the real thing; only the NPU is not.

Wire (checked against the adb servers of Debian (29.0.6) and adbutils' bundled binary (36.0.0)):
- 24-byte little-endian header: command, arg0, arg1, data_length, data_crc32, magic = command ^ 0xffffffff.
  With protocol version 0x01000001 the checksum is not checked, so we send 0.
- The host sends CNXN; we answer with our CNXN (no AUTH) and a banner without `shell_v2`, so the host
  uses legacy `shell:` streams (adbutils' shell2 then appends `; echo X4EXIT:$?` for the exit status).
- Streams: OPEN(host_id, 0, "service\\0") -> OKAY(our_id, host_id) or CLSE(0, host_id). Every WRTE we
  send waits for the host's OKAY before the next; every WRTE the host sends is answered with OKAY.
- `sync:` carries its own framing inside the stream bytes: STAT, LIST, SEND (DATA chunks <= 64 KiB, DONE
  with the mtime, answered OKAY or FAIL+message), RECV (DATA chunks, DONE; FAIL+message) and QUIT.

Board filesystem: a sandbox directory laid out like a board (`make_board_tree`), with board paths mapped
into it by `BoardRoot` (rkbench/device/sandbox.py, shared with LocalTransport): sync requests map them and
refuse any other path (FAIL), shell commands run in the sandbox with the same mapping.

Faults (`FaultPlan`) make the failure paths testable: drop the TCP connection mid-push, SIGKILL a
running command's processes, truncate a pulled file, a full disk, a command that never ends.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import psutil

from rkbench.device.sandbox import BOARD_PREFIXES, BoardRoot, write_file

log = logging.getLogger("rkbench.emulator")


def _cmd(name: bytes) -> int:
    return struct.unpack("<I", name)[0]


A_CNXN, A_OPEN, A_OKAY, A_WRTE, A_CLSE, A_AUTH = (_cmd(n) for n in (b"CNXN", b"OPEN", b"OKAY", b"WRTE", b"CLSE", b"AUTH"))
A_VERSION = 0x01000001          # skips the data checksum
MAX_PAYLOAD = 256 * 1024
SYNC_DATA_MAX = 64 * 1024
HEADER = struct.Struct("<6I")

EMULATOR_MODEL = "rkbench-emulator"     # ro.product.model in the banner; `adb devices -l` shows rkbench_emulator

# Board facts per SoC: device-tree compatible and the NPU devfreq node name.
_SOCS = {
    "rk3588": ("rockchip,rk3588-evb1-lp4-v10", "fdab0000.npu", ("policy0", "policy4", "policy6")),
    "rk3576": ("rockchip,rk3576-evb1-v10", "27700000.npu", ("policy0", "policy4")),
    "rk3568": ("rockchip,rk3568-evb1-ddr4-v10", "fde40000.npu", ("policy0",)),
    "rk3566": ("rockchip,rk3566-evb2-lp4x-v10", "fde40000.npu", ("policy0",)),
    "rk3562": ("rockchip,rk3562-evb1-lp4x-v10", "ff300000.npu", ("policy0",)),
}


def make_board_tree(root: Path, soc: str = "rk3588", *, librknnrt_version: str = "2.3.0",
                    rknn_server_version: Optional[str] = None, npu_driver: str = "0.9.8", dmc: bool = True) -> BoardRoot:
    """Write the files a board has into root (idempotent; root/data is left alone)."""
    if soc not in _SOCS:
        raise ValueError(f"emulated SoC {soc!r} unknown: use one of {', '.join(_SOCS)}")
    board, npu_node, policies = _SOCS[soc]
    box = BoardRoot(root)
    r = box.root
    write_file(r / "proc/device-tree/compatible", f"{board}\0rockchip,{soc}\0")
    write_file(r / "sys/kernel/debug/rknpu/version", f"RKNPU driver: v{npu_driver}\n")
    write_file(r / "sys/kernel/debug/rknpu/load", "NPU load:  Core0:  0%, Core1:  0%, Core2:  0%,\n")
    npu = r / "sys/class/devfreq" / npu_node
    for name, value in (("cur_freq", "1000000000"), ("governor", "rknpu_ondemand"), ("min_freq", "300000000"),
                        ("max_freq", "1000000000"),
                        ("available_frequencies", "300000000 400000000 500000000 600000000 700000000 800000000 900000000 1000000000")):
        write_file(npu / name, value + "\n")
    dmc_dir = r / "sys/class/devfreq/dmc"
    if dmc:
        write_file(dmc_dir / "cur_freq", "2112000000\n")
        write_file(dmc_dir / "governor", "dmc_ondemand\n")
    else:
        for f in dmc_dir.glob("*"):
            f.unlink()
        if dmc_dir.exists():
            dmc_dir.rmdir()
    for i, policy in enumerate(policies):
        cpu = r / "sys/devices/system/cpu/cpufreq" / policy
        write_file(cpu / "scaling_cur_freq", ("1800000" if i == 0 else "2256000") + "\n")
        write_file(cpu / "scaling_governor", "schedutil\n")
    # Stand-ins carrying the version strings the real binaries embed.
    write_file(r / "usr/lib/librknnrt.so", b"\x7fELF\x02\x01\x01\0" + b"\0" * 56
           + f"\0librknnrt version: {librknnrt_version} (c949ad889d@2024-11-07T11:35:33)\0".encode())
    server = rknn_server_version or librknnrt_version
    write_file(r / "usr/bin/rknn_server",
           f'#!/bin/sh\necho "start rknn server, version:{server} (e80ac5c build@2024-11-07T12:52:53)"\n', mode=0o755)
    box.ensure_python()
    (r / "data/local/tmp").mkdir(parents=True, exist_ok=True)
    return box


@dataclass
class FaultPlan:
    """Faults the emulated board injects; counts are how many times a one-shot fault fires."""
    drop_push_after_bytes: Optional[int] = None   # drop the TCP connection once a SEND got this many bytes
    drop_push_times: int = 1
    truncate_pull_bytes: Optional[int] = None     # RECV sends only this many bytes, then DONE
    truncate_pull_times: int = 1
    free_bytes: Optional[int] = None              # SEND fails "No space left on device" past this file size
    kill_shell_matching: Optional[str] = None     # SIGKILL the processes of a command containing this text
    kill_after_s: float = 0.3
    hang_shell_matching: Optional[str] = None     # a command containing this text never answers


class _Closed(Exception):
    """The stream or its connection went away."""


class _Stream:
    def __init__(self, conn: "_Connection", local_id: int, remote_id: int):
        self.conn, self.local_id, self.remote_id = conn, local_id, remote_id
        self._buf = bytearray()
        self._cond = threading.Condition()
        self._acked = threading.Event()
        self.closed = threading.Event()
        self._on_close: list[Callable[[], None]] = []

    # host -> device
    def feed(self, data: bytes) -> None:
        with self._cond:
            self._buf += data
            self._cond.notify_all()

    def read_exact(self, n: int) -> bytes:
        with self._cond:
            while len(self._buf) < n:
                if self.closed.is_set():
                    raise _Closed()
                self._cond.wait(0.5)
            data = bytes(self._buf[:n])
            del self._buf[:n]
            return data

    # device -> host: one WRTE in flight, the next waits for the host's OKAY
    def write(self, data: bytes) -> None:
        for i in range(0, len(data), self.conn.max_payload):
            if self.closed.is_set():
                raise _Closed()
            self._acked.clear()
            self.conn.send(A_WRTE, self.local_id, self.remote_id, data[i:i + self.conn.max_payload])
            while not self._acked.wait(0.5):
                if self.closed.is_set():
                    raise _Closed()

    def acked(self) -> None:
        self._acked.set()

    def on_close(self, callback: Callable[[], None]) -> None:
        self._on_close.append(callback)
        if self.closed.is_set():
            callback()

    def close(self, *, notify_host: bool = True) -> None:
        if self.closed.is_set():
            return
        self.closed.set()
        with self._cond:
            self._cond.notify_all()
        self.conn.forget(self)
        for callback in self._on_close:
            callback()
        if notify_host and not self.conn.dead.is_set():
            try:
                self.conn.send(A_CLSE, self.local_id, self.remote_id)
            except _Closed:
                pass


class _Connection:
    """One TCP connection from an adb server: a reader loop multiplexing streams."""

    def __init__(self, board: "EmulatedBoard", sock: socket.socket):
        self.board, self.sock = board, sock
        self.max_payload = 4096          # until the host's CNXN says more
        self._send_lock = threading.Lock()
        self._streams: dict[int, _Stream] = {}
        self._next_id = 1
        self.dead = threading.Event()

    def send(self, command: int, arg0: int, arg1: int, data: bytes = b"") -> None:
        packet = HEADER.pack(command, arg0, arg1, len(data), 0, command ^ 0xFFFFFFFF) + data
        try:
            with self._send_lock:
                self.sock.sendall(packet)
        except OSError as exc:
            self.drop()
            raise _Closed() from exc

    def forget(self, stream: _Stream) -> None:
        self._streams.pop(stream.local_id, None)

    def drop(self) -> None:
        """Close the TCP connection (also the 'cable pulled' fault); every stream dies with it."""
        if self.dead.is_set():
            return
        self.dead.set()
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()
        for stream in list(self._streams.values()):
            stream.close(notify_host=False)

    def _recv_exact(self, n: int) -> bytes:
        data = bytearray()
        while len(data) < n:
            chunk = self.sock.recv(n - len(data))
            if not chunk:
                raise _Closed()
            data += chunk
        return bytes(data)

    def serve(self) -> None:
        try:
            while not self.dead.is_set():
                command, arg0, arg1, length, _crc, magic = HEADER.unpack(self._recv_exact(HEADER.size))
                if magic != command ^ 0xFFFFFFFF:
                    log.warning("bad packet magic from the host; dropping the connection")
                    break
                self._handle(command, arg0, arg1, self._recv_exact(length) if length else b"")
        except (_Closed, OSError):
            pass
        finally:
            self.drop()

    def _handle(self, command: int, arg0: int, arg1: int, data: bytes) -> None:
        if command == A_CNXN:
            self.max_payload = max(4096, min(arg1, MAX_PAYLOAD))
            self.send(A_CNXN, min(arg0, A_VERSION), MAX_PAYLOAD, self.board.banner.encode())
        elif command == A_OPEN:
            self._open(arg0, data.rstrip(b"\0").decode("utf-8", "replace"))
        elif command == A_OKAY:
            stream = self._streams.get(arg1)
            if stream:
                stream.acked()
        elif command == A_WRTE:
            stream = self._streams.get(arg1)
            if stream:
                stream.feed(data)
                self.send(A_OKAY, stream.local_id, stream.remote_id)
        elif command == A_CLSE:
            stream = self._streams.get(arg1)
            if stream:
                stream.close(notify_host=False)
        # AUTH and anything else: ignored (we never asked for AUTH).

    def _open(self, remote_id: int, service: str) -> None:
        handler: Optional[Callable[[_Stream], None]]
        if service.startswith("shell:"):
            handler = lambda s: self.board.serve_shell(s, service[len("shell:"):])  # noqa: E731
        elif service == "sync:":
            handler = self.board.serve_sync
        else:
            handler = None
        if handler is None:
            log.info("refusing service %r", service)
            self.send(A_CLSE, 0, remote_id)
            return
        stream = _Stream(self, self._next_id, remote_id)
        self._next_id += 1
        self._streams[stream.local_id] = stream
        self.send(A_OKAY, stream.local_id, remote_id)
        threading.Thread(target=self._run_service, args=(handler, stream), daemon=True,
                         name=f"emu-{service[:20]}").start()

    @staticmethod
    def _run_service(handler: Callable[[_Stream], None], stream: _Stream) -> None:
        try:
            handler(stream)
        except _Closed:
            pass
        except Exception:  # a service bug must not take the board down; the host sees the stream close
            log.exception("emulated service failed")
        finally:
            stream.close()


def _kill_tree(pid: int, *, include_root: bool) -> None:
    try:
        root = psutil.Process(pid)
        victims = root.children(recursive=True) + ([root] if include_root else [])
    except psutil.NoSuchProcess:
        return
    for proc in victims:
        try:
            proc.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass


class EmulatedBoard:
    """A board on 127.0.0.1:PORT speaking adb. `with EmulatedBoard(root) as board: board.serial`."""

    def __init__(self, root: Path, soc: str = "rk3588", port: int = 0, faults: Optional[FaultPlan] = None, *,
                 host: str = "127.0.0.1", librknnrt_version: str = "2.3.0", dmc: bool = True):
        self.fs = make_board_tree(Path(root), soc, librknnrt_version=librknnrt_version, dmc=dmc)
        self.root = self.fs.root
        self.soc = soc
        self.faults = faults or FaultPlan()
        self.fired: Counter[str] = Counter()      # fault name -> times it fired (tests assert on it)
        self._fault_lock = threading.Lock()
        self._host, self._port = host, port
        self._listener: Optional[socket.socket] = None
        self._connections: list[_Connection] = []
        self._threads: list[threading.Thread] = []

    @property
    def banner(self) -> str:
        return (f"device::ro.product.name={self.soc};ro.product.model={EMULATOR_MODEL};"
                f"ro.product.device={self.soc};features=cmd")

    @property
    def port(self) -> int:
        return self._port

    @property
    def serial(self) -> str:
        return f"{self._host}:{self._port}"

    def start(self) -> int:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((self._host, self._port))
        listener.listen(8)
        listener.settimeout(0.5)
        self._listener = listener
        self._port = listener.getsockname()[1]
        thread = threading.Thread(target=self._accept_loop, daemon=True, name="emu-accept")
        thread.start()
        self._threads.append(thread)
        log.info("emulated %s board on %s (root %s)", self.soc, self.serial, self.root)
        return self._port

    def stop(self) -> None:
        listener, self._listener = self._listener, None
        if listener:
            listener.close()
        self.drop_connections()
        self._connections.clear()
        for thread in self._threads:
            thread.join(timeout=5)
        self._threads.clear()

    def __enter__(self) -> "EmulatedBoard":
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def drop_connections(self) -> None:
        """Pull the cable: close every adb connection (the board keeps listening)."""
        for conn in list(self._connections):
            conn.drop()

    def _accept_loop(self) -> None:
        while (listener := self._listener) is not None:
            try:
                sock, _addr = listener.accept()
            except socket.timeout:
                continue
            except OSError:
                break
            sock.settimeout(None)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn = _Connection(self, sock)
            self._connections = [c for c in self._connections if not c.dead.is_set()] + [conn]
            threading.Thread(target=conn.serve, daemon=True, name="emu-conn").start()

    def _fire(self, name: str, times_attr: Optional[str] = None) -> bool:
        """Record a fault firing; one-shot faults decrement their remaining count."""
        with self._fault_lock:
            if times_attr is not None:
                left = getattr(self.faults, times_attr)
                if left <= 0:
                    return False
                setattr(self.faults, times_attr, left - 1)
            self.fired[name] += 1
            return True

    # ---- shell: ------------------------------------------------------------------------------------
    def serve_shell(self, stream: _Stream, command: str) -> None:
        faults = self.faults
        if not command.strip():
            stream.write(b"rkbench emulator: interactive shell not supported; pass a command\n")
            return
        if faults.hang_shell_matching and faults.hang_shell_matching in command:
            self._fire("hang_shell")
            stream.closed.wait()     # never answers; the host gives up and closes the stream
            return
        proc = self.fs.spawn(command)
        # The host closing the stream (timeout, Ctrl-C) or the connection dying ends the command, like adbd.
        stream.on_close(lambda: _kill_tree(proc.pid, include_root=True))
        if faults.kill_shell_matching and faults.kill_shell_matching in command:
            def kill() -> None:
                self._fire("kill_shell")
                _kill_tree(proc.pid, include_root=False)   # the runner dies (OOM-killer style); sh reports 137
            timer = threading.Timer(faults.kill_after_s, kill)
            timer.daemon = True
            timer.start()
        assert proc.stdout is not None
        pending = b""
        try:
            while True:
                chunk = os.read(proc.stdout.fileno(), 64 * 1024)
                if not chunk:
                    break
                data = pending + chunk
                cut = len(data) - self.fs.held_back(data)
                pending = data[cut:]
                if cut:
                    stream.write(self.fs.unmap(data[:cut]))
            if pending:
                stream.write(self.fs.unmap(pending))
        finally:
            proc.stdout.close()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                _kill_tree(proc.pid, include_root=True)
                proc.wait()

    # ---- sync: -------------------------------------------------------------------------------------
    def serve_sync(self, stream: _Stream) -> None:
        while True:
            request = stream.read_exact(8)
            rid, length = request[:4], struct.unpack("<I", request[4:])[0]
            if rid == b"QUIT":
                return
            if length > 1024:
                self._sync_fail(stream, "path too long")
                return
            path = stream.read_exact(length).decode("utf-8", "replace")
            if rid == b"STAT":
                stream.write(b"STAT" + self._stat(path))
            elif rid == b"LIST":
                self._list(stream, path)
            elif rid == b"SEND":
                if not self._send(stream, path):
                    return
            elif rid == b"RECV":
                if not self._recv(stream, path):
                    return
            else:
                self._sync_fail(stream, f"unknown sync request {rid!r}")
                return

    @staticmethod
    def _sync_fail(stream: _Stream, message: str) -> None:
        data = message.encode()
        stream.write(b"FAIL" + struct.pack("<I", len(data)) + data)

    def _stat(self, remote: str) -> bytes:
        host = self.fs.host_path(remote)
        try:
            if host is None:
                raise FileNotFoundError(remote)
            st = host.lstat()
        except OSError:
            return struct.pack("<III", 0, 0, 0)
        return struct.pack("<III", st.st_mode & 0xFFFFFFFF, st.st_size & 0xFFFFFFFF, int(st.st_mtime) & 0xFFFFFFFF)

    def _list(self, stream: _Stream, remote: str) -> None:
        host = self.fs.host_path(remote)
        entries = sorted(host.iterdir()) if host is not None and host.is_dir() else []
        out = bytearray()
        for entry in entries:
            st = entry.lstat()
            name = entry.name.encode()
            out += b"DENT" + struct.pack("<IIII", st.st_mode & 0xFFFFFFFF, st.st_size & 0xFFFFFFFF,
                                         int(st.st_mtime) & 0xFFFFFFFF, len(name)) + name
        stream.write(bytes(out) + b"DONE" + struct.pack("<IIII", 0, 0, 0, 0))

    def _send(self, stream: _Stream, spec: str) -> bool:
        """SEND "path,mode": DATA chunks then DONE(mtime) -> OKAY; a failure -> FAIL, partial file removed."""
        remote, _, mode_text = spec.rpartition(",")
        if not remote or not mode_text.isdigit():
            remote, mode_text = spec, str(0o100644)
        host = self.fs.host_path(remote)
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
            mtime, error = self._receive_data(stream, out, error)
        except _Closed:
            error = "connection lost"
            raise
        finally:
            if out is not None:
                out.close()
                if error is not None:
                    host.unlink(missing_ok=True)   # adbd removes a partial file, before it answers
        if error is not None:
            self._sync_fail(stream, error)
            return False
        os.utime(host, (mtime, mtime))
        host.chmod(int(mode_text) & 0o777)
        stream.write(b"OKAY" + struct.pack("<I", 0))
        return True

    def _receive_data(self, stream: _Stream, out, error: Optional[str]) -> tuple[int, Optional[str]]:
        """Read DATA chunks into `out` until DONE; returns (mtime, error). Like adbd, a write failure keeps
        draining until DONE before it is reported; a framing error is reported at once."""
        faults = self.faults
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
                    and self._fire("drop_push", "drop_push_times")):
                stream.conn.drop()
                raise _Closed()
            if error is None and faults.free_bytes is not None and received > faults.free_bytes:
                self._fire("disk_full")
                error = "write failed: No space left on device"
            if error is None:
                out.write(chunk)

    def _recv(self, stream: _Stream, remote: str) -> bool:
        host = self.fs.host_path(remote)
        if host is None or not host.is_file():
            self._sync_fail(stream, "open failed: No such file or directory")
            return False
        limit: Optional[int] = None
        if self.faults.truncate_pull_bytes is not None and self._fire("truncate_pull", "truncate_pull_times"):
            limit = self.faults.truncate_pull_bytes
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


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rkbench.device.emulator",
                                     description="Serve an emulated Rockchip board over the adb protocol.")
    parser.add_argument("--root", required=True, type=Path, help="sandbox directory holding the board's files")
    parser.add_argument("--port", type=int, default=5555)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--soc", default="rk3588", choices=sorted(_SOCS))
    parser.add_argument("--librknnrt-version", default="2.3.0")
    parser.add_argument("--no-dmc", action="store_true", help="leave out /sys/class/devfreq/dmc (eval_perf trap)")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(asctime)s %(message)s")
    board = EmulatedBoard(args.root, args.soc, args.port, host=args.host,
                          librknnrt_version=args.librknnrt_version, dmc=not args.no_dmc)
    board.start()
    print(f"emulated {args.soc} board listening; connect with: adb connect {board.serial}", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        board.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
