"""A board behind an adb server (USB serial, or `adb connect IP:PORT`), through adbutils.

Commands use the legacy `shell:` service with `; echo MARK$?` for the exit status and a deadline on the
whole command; files use the `sync:` service (STAT, SEND, RECV v1) directly on the adb stream, so a
failure is mapped to a DeviceError naming the fix (retryable when the link may come back). Whether the
board is emulated is read from what it announces (its adb model), never from emulator code.
"""

from __future__ import annotations

import os
import socket
import stat
import struct
import subprocess
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Mapping, Optional

from rkbench.device.transport import (EXIT_MARK, ShellResult, Transport, command_line, split_exit, sync_fail_message,
                                      timeout_message)
from rkbench.errors import DeviceError

if TYPE_CHECKING:
    from adbutils import AdbConnection

SYNC_DATA_MAX = 64 * 1024
# The model the emulated board announces in its banner (ro.product.model=rkbench-emulator), as
# `adb devices -l` shows it (adb turns '-' into '_'). A real board announces its own model.
EMULATED_MODEL = "rkbench_emulator"


DEFAULT_HOST, DEFAULT_PORT = "127.0.0.1", 5037


@dataclass(frozen=True)
class AdbServerAddress:
    host: str
    port: int
    source: str          # where it came from: "board.adb_port", "ANDROID_ADB_SERVER_PORT", "default", ...


def server_address(host: Optional[str] = None, port: Optional[int] = None,
                   env: Optional[Mapping[str, str]] = None) -> AdbServerAddress:
    """The adb server to use, as adb and adbutils pick it: an explicit setting (board.adb_host /
    board.adb_port) wins; else adb's environment: ADB_SERVER_SOCKET (tcp:PORT or tcp:HOST:PORT), then
    ANDROID_ADB_SERVER_ADDRESS (adb) or ANDROID_ADB_SERVER_HOST (adbutils) and ANDROID_ADB_SERVER_PORT;
    else 127.0.0.1:5037."""
    env = os.environ if env is None else env
    env_host: Optional[tuple[str, str]] = None          # (value, variable)
    env_port: Optional[tuple[int, str]] = None
    socket_spec = env.get("ADB_SERVER_SOCKET")
    if socket_spec:
        parts = socket_spec.split(":")
        if parts[0] != "tcp" or len(parts) not in (2, 3) or not parts[-1].isdigit():
            raise DeviceError(f"ADB_SERVER_SOCKET={socket_spec!r} is not tcp:PORT or tcp:HOST:PORT: fix or unset it, "
                              "or set board.adb_host/board.adb_port")
        env_host = (parts[1], "ADB_SERVER_SOCKET") if len(parts) == 3 and parts[1] else None
        env_port = (int(parts[-1]), "ADB_SERVER_SOCKET")
    else:
        env_host = next(((env[n], n) for n in ("ANDROID_ADB_SERVER_ADDRESS", "ANDROID_ADB_SERVER_HOST") if env.get(n)), None)
        text = env.get("ANDROID_ADB_SERVER_PORT")
        if text:
            if not text.isdigit():
                raise DeviceError(f"ANDROID_ADB_SERVER_PORT={text!r} is not a port number: fix or unset it")
            env_port = (int(text), "ANDROID_ADB_SERVER_PORT")
    chosen_host = (host, "board.adb_host") if host else env_host or (DEFAULT_HOST, "default")
    chosen_port = (port, "board.adb_port") if port else env_port or (DEFAULT_PORT, "default")
    sources = [s for s in dict.fromkeys((chosen_host[1], chosen_port[1])) if s != "default"] or ["default"]
    return AdbServerAddress(chosen_host[0], chosen_port[0], ", ".join(sources))


def _local_server(host: str) -> bool:
    return host in ("127.0.0.1", "localhost", "::1")


def _server_up(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1.0):
            return True
    except OSError:
        return False


def ensure_adb_server(host: str, port: int, timeout_s: float = 30.0) -> None:
    """Start an adb server on host:port if none answers (only on this machine)."""
    if _server_up(host, port):
        return
    if not _local_server(host):
        raise DeviceError(f"no adb server answers at {host}:{port}: start one there (`adb -P {port} start-server`) "
                          "or fix board.adb_host/board.adb_port")
    import adbutils
    exe = adbutils.adb_path()
    # adb refuses -P beside ADB_SERVER_SOCKET: the port chosen here is the one the server must listen on
    env = {k: v for k, v in os.environ.items() if k != "ADB_SERVER_SOCKET"}
    try:
        subprocess.run([exe, "-P", str(port), "start-server"], stdin=subprocess.DEVNULL, capture_output=True,
                       timeout=timeout_s, check=True, env=env)
    except (OSError, subprocess.SubprocessError) as exc:
        raise DeviceError(f"could not start an adb server on port {port} with {exe} ({exc}): "
                          "install adb (platform-tools) or start the server by hand") from exc
    if not _server_up(host, port):
        raise DeviceError(f"adb server on port {port} did not come up: run `{exe} -P {port} start-server` by hand and read its error")


def _map_adb_error(exc: BaseException, action: str, where: str) -> DeviceError:
    """adbutils / socket errors -> DeviceError with the fix; retryable when the link may come back."""
    from adbutils.errors import AdbConnectionError, AdbTimeout
    text = str(exc) or type(exc).__name__
    if isinstance(exc, AdbConnectionError):
        return DeviceError(f"{action}: adb server unreachable ({text}): start it (`adb start-server`) or fix "
                           "board.adb_host/board.adb_port")
    if "unauthorized" in text:
        return DeviceError(f"{action}: {where} is unauthorized: accept the RSA key prompt on the board "
                           "(or put the host's adbkey.pub in /data/misc/adb/adb_keys)")
    if "not found" in text or "offline" in text or "no devices" in text:
        return DeviceError(f"{action}: {where} is {text.strip()}: check power and cable/network, then "
                           "`adb connect IP:5555`", retryable=True)
    if isinstance(exc, (AdbTimeout, socket.timeout, TimeoutError)):
        return DeviceError(f"{action}: {where} stopped answering ({text}): check the link", retryable=True)
    if isinstance(exc, (OSError, EOFError)):
        return DeviceError(f"{action}: connection to {where} lost ({text}): check the link", retryable=True)
    return DeviceError(f"{action} on {where} failed: {text}; run `python -m rkbench doctor` to check the board",
                       retryable=True)


class AdbTransport(Transport):
    """A board behind an adb server: USB serial, or `address` (IP:PORT) for `adb connect`."""

    kind = "adb"

    def __init__(self, serial: Optional[str] = None, address: Optional[str] = None, adb_host: Optional[str] = None,
                 adb_port: Optional[int] = None, *, connect_timeout_s: float = 15.0, io_timeout_s: float = 60.0):
        """adb_host / adb_port None: adb's environment, else 127.0.0.1:5037 (server_address)."""
        import adbutils
        self.address = address
        server = server_address(adb_host, adb_port)
        self.adb_host, self.adb_port, self.server_source = server.host, server.port, server.source
        self.connect_timeout_s, self.io_timeout_s = connect_timeout_s, io_timeout_s
        ensure_adb_server(self.adb_host, self.adb_port)
        self._client = adbutils.AdbClient(host=self.adb_host, port=self.adb_port)
        if address:
            self._connect(address)
        self.serial = serial or address or self._only_device()
        self._wait_ready()

    # ---- link ------------------------------------------------------------------------------------
    def _connect(self, address: str) -> None:
        try:
            answer = self._client.connect(address, timeout=self.connect_timeout_s)
        except Exception as exc:  # adbutils raises AdbError/AdbTimeout/OSError
            raise _map_adb_error(exc, f"adb connect {address}", address) from exc
        if "connected to" not in answer:
            raise DeviceError(f"adb connect {address}: {answer.strip()}: check the board is on, reachable and "
                              "adbd listens on TCP (`setprop service.adb.tcp.port 5555` on the board)", retryable=True)

    def _only_device(self) -> str:
        try:
            ready = [d.serial for d in self._client.list() if d.state == "device"]
        except Exception as exc:
            raise _map_adb_error(exc, "adb devices", "the adb server") from exc
        if len(ready) != 1:
            raise DeviceError(f"{len(ready)} boards attached ({', '.join(ready) or 'none'}): "
                              "set board.serial=<serial> or board.address=IP:5555")
        return ready[0]

    def _state(self) -> Optional[str]:
        try:
            return next((d.state for d in self._client.list() if d.serial == self.serial), None)
        except Exception as exc:
            raise _map_adb_error(exc, "adb devices", "the adb server") from exc

    def _wait_ready(self, timeout_s: Optional[float] = None) -> None:
        timeout_s = self.connect_timeout_s if timeout_s is None else timeout_s
        deadline = time.monotonic() + timeout_s
        state = self._state()
        while state != "device":
            if state == "unauthorized":
                raise DeviceError(f"{self.serial} is unauthorized: accept the RSA key prompt on the board")
            if time.monotonic() > deadline:
                raise DeviceError(f"{self.serial} is {state or 'absent'} after {timeout_s:.1f}s: "
                                  "check power and cable/network, then `adb connect IP:5555`", retryable=True)
            if state is None and self.address:
                self._connect(self.address)
            time.sleep(0.2)
            state = self._state()

    def model(self) -> Optional[str]:
        """The model the board announced (`adb devices -l`; adb turns '-' into '_')."""
        try:
            info = next((d for d in self._client.list(extended=True) if d.serial == self.serial), None)
        except Exception as exc:
            raise _map_adb_error(exc, "adb devices -l", "the adb server") from exc
        return info.tags.get("model") if info else None

    @property
    def emulated(self) -> bool:
        """What the board says it is: the emulated board announces EMULATED_MODEL."""
        return self.model() == EMULATED_MODEL

    def recover(self) -> None:
        """After a dropped link: wait for the server to reconnect (it does for TCP), else connect again."""
        self._wait_ready()

    def reconnect(self, timeout_s: float) -> None:
        self._wait_ready(timeout_s)

    def _device(self):
        return self._client.device(self.serial)

    def describe(self) -> str:
        return f"adb:{self.serial} (server {self.adb_host}:{self.adb_port} from {self.server_source})"

    # ---- commands --------------------------------------------------------------------------------
    def shell(self, args: list[str], timeout: float) -> ShellResult:
        """Legacy `shell:` with `; echo MARK$?` for the exit status, and a deadline on the whole command."""
        command = command_line(args)
        deadline = time.monotonic() + timeout
        try:
            conn = self._device().open_shell(f"{command}; echo {EXIT_MARK}$?")
        except Exception as exc:
            raise _map_adb_error(exc, "open shell", self.serial) from exc
        chunks = []
        try:
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise socket.timeout()
                conn.conn.settimeout(left)
                chunk = conn.conn.recv(65536)
                if not chunk:
                    break
                chunks.append(chunk)
        except socket.timeout:
            raise DeviceError(timeout_message(command, timeout, self.serial)) from None
        except OSError as exc:
            raise DeviceError(f"connection to {self.serial} lost while running `{command[:80]}` ({exc}): "
                              "check the link; the command may still be running on the board") from exc
        finally:
            conn.close()      # adbd then signals the shell only: BoardSession kills the runner's group
        output = b"".join(chunks).decode("utf-8", "replace")
        return split_exit(output, command, self.serial)

    @contextmanager
    def _sync(self, action: str) -> Iterator["AdbConnection"]:
        """A `sync:` stream; adbutils/socket errors inside become DeviceError with the fix."""
        try:
            conn = self._device().open_transport(timeout=self.io_timeout_s)
            try:
                conn.send_command("sync:")
                conn.check_okay()
                yield conn
            finally:
                conn.close()
        except DeviceError:
            raise
        except Exception as exc:  # AdbError, AdbTimeout, OSError, EOFError
            raise _map_adb_error(exc, action, self.serial) from exc

    @staticmethod
    def _request(conn: "AdbConnection", rid: bytes, path: str) -> None:
        data = path.encode()
        conn.conn.sendall(rid + struct.pack("<I", len(data)) + data)

    def _push_once(self, local: Path, remote: str) -> None:
        """SEND v1: "path,mode", DATA chunks of at most 64 KiB, DONE with the mtime; OKAY or FAIL+message."""
        mode = stat.S_IFREG | (local.stat().st_mode & 0o777)
        with self._sync(f"push {local.name} -> {remote}") as conn:
            try:
                self._request(conn, b"SEND", f"{remote},{mode}")
                with local.open("rb") as f:
                    for chunk in iter(lambda: f.read(SYNC_DATA_MAX), b""):
                        conn.conn.sendall(b"DATA" + struct.pack("<I", len(chunk)) + chunk)
                conn.conn.sendall(b"DONE" + struct.pack("<I", int(local.stat().st_mtime)))
            except OSError:
                pass        # the board may have failed early (disk full) and closed: its answer says why
            status = conn.read_exact(8)
            if status[:4] == b"FAIL":
                message = conn.read_exact(struct.unpack("<I", status[4:])[0]).decode("utf-8", "replace")
                raise DeviceError(sync_fail_message("push", remote, message))
            if status[:4] != b"OKAY":
                raise DeviceError(f"push {local.name} -> {remote}: unexpected answer {status!r}", retryable=True)
        size = self._stat(remote)[1]
        if size != local.stat().st_size & 0xFFFFFFFF:
            raise DeviceError(f"push {local.name} -> {remote}: {size} bytes arrived of {local.stat().st_size}",
                              retryable=True)

    def _stat(self, remote: str) -> tuple[int, int, int]:
        """STAT v1: mode, size (low 32 bits), mtime; all 0 when the file does not exist."""
        with self._sync(f"stat {remote}") as conn:
            self._request(conn, b"STAT", remote)
            answer = conn.read_exact(16)
        if answer[:4] != b"STAT":
            raise DeviceError(f"stat {remote}: unexpected answer {answer[:4]!r}", retryable=True)
        return struct.unpack("<III", answer[4:])

    def _exists_once(self, remote: str) -> bool:
        return self._stat(remote)[0] != 0

    def _pull_once(self, remote: str, local: Path) -> None:
        """RECV v1: DATA chunks then DONE, or FAIL with a message."""
        with self._sync(f"pull {remote}") as conn, local.open("wb") as f:
            self._request(conn, b"RECV", remote)
            while True:
                head = conn.read_exact(8)
                rid, length = head[:4], struct.unpack("<I", head[4:])[0]
                if rid == b"DONE":
                    return
                if rid == b"FAIL":
                    message = conn.read_exact(length).decode("utf-8", "replace")
                    raise DeviceError(f"pull {remote} from {self.serial} failed: {message}; check the step that "
                                      "should write it (its output is in the run's log)")
                if rid != b"DATA" or length > SYNC_DATA_MAX:
                    raise DeviceError(f"pull {remote}: garbled sync answer {rid!r}", retryable=True)
                f.write(conn.read_exact(length))
