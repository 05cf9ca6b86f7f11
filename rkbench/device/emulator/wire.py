"""The device side of the adb transport protocol: packets, the CNXN handshake and multiplexed streams.

Checked against the adb servers of Debian (29.0.6) and adbutils' bundled binary (36.0.0):
- 24-byte little-endian header: command, arg0, arg1, data_length, data_crc32, magic = command ^ 0xffffffff.
  With protocol version 0x01000001 the checksum is not checked, so we send 0.
- The host sends CNXN; we answer with our CNXN (no AUTH) and the device's banner.
- Streams: OPEN(host_id, 0, "service\\0") -> OKAY(our_id, host_id) or CLSE(0, host_id). Every WRTE we
  send waits for the host's OKAY before the next; every WRTE the host sends is answered with OKAY.

What a service does with its stream (shell.py, sync.py) is not this module's business: the device
behind a `Connection` names the banner and hands out a handler per service name.
"""

from __future__ import annotations

import logging
import socket
import struct
import threading
from typing import Callable, Optional, Protocol

log = logging.getLogger("rkbench.emulator")


def _cmd(name: bytes) -> int:
    return struct.unpack("<I", name)[0]


A_CNXN, A_OPEN, A_OKAY, A_WRTE, A_CLSE, A_AUTH = (_cmd(n) for n in (b"CNXN", b"OPEN", b"OKAY", b"WRTE", b"CLSE", b"AUTH"))
A_VERSION = 0x01000001          # skips the data checksum
MAX_PAYLOAD = 256 * 1024
HEADER = struct.Struct("<6I")

Handler = Callable[["Stream"], None]


class Device(Protocol):
    """What a connection needs from the board behind it."""

    @property
    def banner(self) -> str: ...

    def service(self, name: str) -> Optional[Handler]:
        """The handler serving `name` ("shell:...", "sync:"), None to refuse it."""


class StreamClosed(Exception):
    """The stream or its connection went away."""


class Stream:
    """One service stream: what the host writes is read by the service, what the service writes goes out
    as WRTE packets."""

    def __init__(self, conn: "Connection", local_id: int, remote_id: int):
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
                    raise StreamClosed()
                self._cond.wait(0.5)
            data = bytes(self._buf[:n])
            del self._buf[:n]
            return data

    # device -> host: one WRTE in flight, the next waits for the host's OKAY
    def write(self, data: bytes) -> None:
        for i in range(0, len(data), self.conn.max_payload):
            if self.closed.is_set():
                raise StreamClosed()
            self._acked.clear()
            self.conn.send(A_WRTE, self.local_id, self.remote_id, data[i:i + self.conn.max_payload])
            while not self._acked.wait(0.5):
                if self.closed.is_set():
                    raise StreamClosed()

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
            except StreamClosed:
                pass


class Connection:
    """One TCP connection from an adb server: a reader loop multiplexing streams."""

    def __init__(self, device: Device, sock: socket.socket):
        self.device, self.sock = device, sock
        self.max_payload = 4096          # until the host's CNXN says more
        self._send_lock = threading.Lock()
        self._streams: dict[int, Stream] = {}
        self._next_id = 1
        self.dead = threading.Event()

    def send(self, command: int, arg0: int, arg1: int, data: bytes = b"") -> None:
        packet = HEADER.pack(command, arg0, arg1, len(data), 0, command ^ 0xFFFFFFFF) + data
        try:
            with self._send_lock:
                self.sock.sendall(packet)
        except OSError as exc:
            self.drop()
            raise StreamClosed() from exc

    def forget(self, stream: Stream) -> None:
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
                raise StreamClosed()
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
        except (StreamClosed, OSError):
            pass
        finally:
            self.drop()

    def _handle(self, command: int, arg0: int, arg1: int, data: bytes) -> None:
        if command == A_CNXN:
            self.max_payload = max(4096, min(arg1, MAX_PAYLOAD))
            self.send(A_CNXN, min(arg0, A_VERSION), MAX_PAYLOAD, self.device.banner.encode())
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
        handler = self.device.service(service)
        if handler is None:
            log.info("refusing service %r", service)
            self.send(A_CLSE, 0, remote_id)
            return
        stream = Stream(self, self._next_id, remote_id)
        self._next_id += 1
        self._streams[stream.local_id] = stream
        self.send(A_OKAY, stream.local_id, remote_id)
        threading.Thread(target=self._run_service, args=(handler, stream), daemon=True,
                         name=f"emu-{service[:20]}").start()

    @staticmethod
    def _run_service(handler: Handler, stream: Stream) -> None:
        try:
            handler(stream)
        except StreamClosed:
            pass
        except Exception:  # a service bug must not take the board down; the host sees the stream close
            log.exception("emulated service failed")
        finally:
            stream.close()
