"""The emulated board itself: a TCP listener that adb servers connect to (`adb connect 127.0.0.1:PORT`),
its banner, which service serves which stream, and the fault bookkeeping.

Layers: wire.py (adb packets and streams) -> shell.py / sync.py (the services) -> the sandbox
(rkbench/device/sandbox.py for path mapping, tree.py for the board's files); faults.py says what can go
wrong on purpose.
"""

from __future__ import annotations

import logging
import socket
import threading
from collections import Counter
from pathlib import Path
from typing import Optional

from rkbench.device.emulator.faults import FaultPlan
from rkbench.device.emulator.shell import serve_shell
from rkbench.device.emulator.sync import serve_sync
from rkbench.device.emulator.tree import EmulatedClocks, make_board_tree
from rkbench.device.emulator.wire import Connection, Handler

log = logging.getLogger("rkbench.emulator")

# ro.product.model in the banner; `adb devices -l` shows it as rkbench_emulator, which is how a host
# (rkbench/device/adb.py) tells this board from a real one.
EMULATOR_MODEL = "rkbench-emulator"


class EmulatedBoard:
    """A board on 127.0.0.1:PORT speaking adb. `with EmulatedBoard(root) as board: board.serial`."""

    def __init__(self, root: Path, soc: str = "rk3588", port: int = 0, faults: Optional[FaultPlan] = None, *,
                 host: str = "127.0.0.1", librknnrt_version: str = "2.3.0", dmc: bool = True,
                 npu_devfreq: Optional[str] = None):
        self.fs = make_board_tree(Path(root), soc, librknnrt_version=librknnrt_version, dmc=dmc, npu_devfreq=npu_devfreq)
        self.clocks = EmulatedClocks(self.fs.root)   # frequencies follow the governors, temperatures the load
        self.root = self.fs.root
        self.soc = soc
        self.faults = faults or FaultPlan()
        self.fired: Counter[str] = Counter()      # fault name -> times it fired (tests assert on it)
        self._fault_lock = threading.Lock()
        self._host, self._port = host, port
        self._listener: Optional[socket.socket] = None
        self._connections: list[Connection] = []
        self._threads: list[threading.Thread] = []

    @property
    def banner(self) -> str:
        """No `shell_v2` among the features: hosts use legacy `shell:` streams."""
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
        self.clocks.start()
        thread = threading.Thread(target=self._accept_loop, daemon=True, name="emu-accept")
        thread.start()
        self._threads.append(thread)
        log.info("emulated %s board on %s (root %s)", self.soc, self.serial, self.root)
        return self._port

    def stop(self) -> None:
        listener, self._listener = self._listener, None
        if listener:
            # close() alone leaves the kernel socket listening while the accept thread is blocked in accept():
            # the board would still take TCP connections after it "went away". shutdown() wakes accept and
            # stops the listening.
            try:
                listener.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            listener.close()
        self.drop_connections()
        self._connections.clear()
        self.clocks.stop()
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
            conn = Connection(self, sock)
            self._connections = [c for c in self._connections if not c.dead.is_set()] + [conn]
            threading.Thread(target=conn.serve, daemon=True, name="emu-conn").start()

    def service(self, name: str) -> Optional[Handler]:
        """shell:<command> and sync: are served; anything else (jdwp:, tcpip:, ...) is refused."""
        if name.startswith("shell:"):
            return lambda stream: serve_shell(self, stream, name[len("shell:"):])
        if name == "sync:":
            return lambda stream: serve_sync(self, stream)
        return None

    def fire(self, name: str, times_attr: Optional[str] = None) -> bool:
        """Record a fault firing; one-shot faults decrement their remaining count."""
        with self._fault_lock:
            if times_attr is not None:
                left = getattr(self.faults, times_attr)
                if left <= 0:
                    return False
                setattr(self.faults, times_attr, left - 1)
            self.fired[name] += 1
            return True
