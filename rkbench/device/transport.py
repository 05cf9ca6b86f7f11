"""One way to reach a board: run a command, push, pull, hash.

`Transport` is the interface the stages use; this module also holds the helpers every transport shares
and `LocalTransport`, which runs on this machine over a board-like sandbox directory (the path
convention of rkbench/device/sandbox.py, which the emulated board uses too). `AdbTransport`, a real adb
server through adbutils, lives in rkbench/device/adb.py (also importable from here), `SshTransport`
(sshd through paramiko) in rkbench/device/ssh.py; `open_transport` picks one from board.transport. Commands are
argument lists, each quoted with shlex.quote, so no config value or path ever reaches a shell unquoted; a
command that needs pipes passes a constant script: `["sh", "-c", SCRIPT, "sh", value1, value2]`.

Only idempotent operations retry (push, pull, stat, hash); a command - a measurement - never does.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import os
import shlex
import shutil
import signal
import subprocess
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable, Optional, TypeVar

from rkbench.device.sandbox import BoardRoot
from rkbench.errors import DeviceError

if TYPE_CHECKING:
    from rkbench.config import BoardConfig

log = logging.getLogger("rkbench.device")
T = TypeVar("T")

# Prints "<sha256>  <path>" for each argument that is a regular file; missing files print nothing.
_SHA_SCRIPT = 'for f in "$@"; do if [ -f "$f" ]; then sha256sum "$f" || exit 2; fi; done'


@dataclass
class ShellResult:
    exit_code: int
    output: str          # stdout and stderr, merged (legacy adb shell has one stream)

    @property
    def ok(self) -> bool:
        return self.exit_code == 0


def command_line(args: list[str]) -> str:
    if not args:
        raise ValueError("empty command")
    return " ".join(shlex.quote(str(a)) for a in args)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def retry(action: Callable[[], T], *, what: str, attempts: int = 3, delay_s: float = 0.5,
          recover: Optional[Callable[[], None]] = None) -> T:
    """Run an idempotent action again after a retryable DeviceError (never use it for a measurement)."""
    for attempt in range(1, attempts + 1):
        try:
            return action()
        except DeviceError as exc:
            if not exc.retryable or attempt == attempts:
                raise
            log.warning("%s failed (attempt %d/%d): %s; retrying", what, attempt, attempts, exc)
            time.sleep(delay_s * attempt)
            if recover is not None:
                try:
                    recover()
                except DeviceError as again:
                    if not again.retryable:
                        raise
    raise AssertionError("unreachable")


class BoardGone(DeviceError):
    """The board stayed away for board.reconnect_s: the rest of a sweep's configurations on it fail at once."""


def wait_until_back(attempt: Callable[[float], T], total_s: float, what: str) -> T:
    """Call `attempt(timeout_s)` until it stops raising a retryable DeviceError: exponential backoff (1, 2, 4 ..
    30 s), one line per failed attempt, BoardGone once `total_s` seconds have passed in all."""
    started = time.monotonic()
    delay = 1.0
    for n in itertools.count(1):
        left = total_s - (time.monotonic() - started)
        try:
            result = attempt(max(0.5, min(1.0, left)))      # a short look; the backoff does the waiting
        except DeviceError as exc:
            if not exc.retryable:
                raise
            waited = time.monotonic() - started
            if waited + 0.05 >= total_s:
                raise BoardGone(f"{what} did not come back within board.reconnect_s={total_s:g}s ({n} attempt"
                                f"{'s' if n > 1 else ''}; last: {exc}): check power and cable/network, then run the "
                                "sweep again (finished configurations are reused)") from exc
            pause = min(delay, 30.0, total_s - waited)
            log.warning("%s unreachable, attempt %d (%.1fs of board.reconnect_s=%gs): %s; next try in %.1fs",
                        what, n, waited, total_s, str(exc)[:160], pause)
            time.sleep(pause)
            delay *= 2
            continue
        if n > 1:
            log.warning("%s is back after %.1fs (%d attempts)", what, time.monotonic() - started, n)
        return result
    raise AssertionError("unreachable")   # itertools.count never ends


def wait_for_link(transport: "Transport", total_s: float) -> None:
    """Bring a dropped link back (reconnect with backoff, bounded by total_s); BoardGone if it stays away."""
    wait_until_back(transport.reconnect, total_s, transport.describe())


class Transport(ABC):
    kind: str = "?"
    attempts: int = 3

    @abstractmethod
    def shell(self, args: list[str], timeout: float) -> ShellResult:
        """Run a command on the board; raises DeviceError(retryable=False) past `timeout` seconds."""

    @abstractmethod
    def _push_once(self, local: Path, remote: str) -> None: ...

    @abstractmethod
    def _pull_once(self, remote: str, local: Path) -> None: ...

    @abstractmethod
    def _exists_once(self, remote: str) -> bool: ...

    @abstractmethod
    def describe(self) -> str: ...

    @property
    def emulated(self) -> bool:
        """True when no real board is behind this transport (results must say device=emulator/host)."""
        return True

    def recover(self) -> None:
        """Bring the link back after a retryable failure (reconnect); nothing to do by default."""

    def reconnect(self, timeout_s: float) -> None:
        """One try at an answering link within timeout_s (a retryable DeviceError if not); recover() by default."""
        self.recover()

    def close(self) -> None:
        """Release the link; nothing to do by default."""

    def _retry(self, action: Callable[[], T], what: str) -> T:
        return retry(action, what=what, attempts=self.attempts, recover=self.recover)

    def push(self, local: Path, remote: str) -> None:
        local = Path(local)
        if not local.is_file():
            raise DeviceError(f"cannot push {local}: not a file; check the path the stage produced")
        self._retry(lambda: self._push_once(local, remote), f"push {local.name} -> {remote}")

    def pull(self, remote: str, local: Path) -> None:
        """Copy a board file here; a copy whose sha256 differs from the board's is an error (retried)."""
        local = Path(local)
        local.parent.mkdir(parents=True, exist_ok=True)

        def once() -> None:
            partial = local.with_name(local.name + ".partial")
            try:
                self._pull_once(remote, partial)
                expected = self.sha256(remote)
                got = sha256_file(partial)
                if expected != got:
                    raise DeviceError(f"pulled {remote} is incomplete (sha256 {got[:12]} here, {str(expected)[:12]} "
                                      "on the board): the transfer was cut short; check the link and pull again",
                                      retryable=True)
                partial.replace(local)
            finally:
                partial.unlink(missing_ok=True)

        self._retry(once, f"pull {remote}")

    def exists(self, remote: str) -> bool:
        return self._retry(lambda: self._exists_once(remote), f"stat {remote}")

    def sha256(self, remote: str) -> Optional[str]:
        """sha256 hex of a board file, None when it does not exist."""
        return self.sha256_many([remote])[remote]

    def sha256_many(self, remotes: Iterable[str]) -> dict[str, Optional[str]]:
        """Hashes of several board files in one command (one round trip over adb)."""
        remotes = list(remotes)
        if not remotes:
            return {}

        def once() -> dict[str, Optional[str]]:
            result = self.shell(["sh", "-c", _SHA_SCRIPT, "sh", *remotes], timeout=120)
            if not result.ok:
                raise DeviceError(f"sha256sum failed on {self.describe()}: {result.output.strip()[:200]}; "
                                  "the board needs sha256sum (toybox/busybox/coreutils)", retryable=True)
            printed = dict(_hash_lines(result.output))      # path -> digest; missing files print nothing
            return {remote: printed.get(remote) for remote in remotes}

        return self._retry(once, "sha256 on the board")


def _hash_lines(output: str) -> list[tuple[str, str]]:
    """`sha256sum` lines "<digest>  <path>" -> (path, digest)."""
    pairs = []
    for line in output.splitlines():
        digest, _, path = line.partition("  ")
        if len(digest) == 64 and path:
            pairs.append((path, digest))
    return pairs


class LocalTransport(Transport):
    """The board is a directory on this machine, laid out and mapped like the emulated board
    (rkbench/device/sandbox.py)."""

    kind = "local"

    def __init__(self, root: Path):
        self.fs = BoardRoot(Path(root))
        self.fs.root.mkdir(parents=True, exist_ok=True)
        self.fs.ensure_python()

    def _host(self, remote: str) -> Path:
        host = self.fs.host_path(remote)
        if host is None:
            raise DeviceError(f"{remote} is outside the board filesystem of {self.describe()}: "
                              "use a path under /data/local/tmp (board.remote_root)")
        return host

    def shell(self, args: list[str], timeout: float) -> ShellResult:
        command = command_line(args)
        proc = self.fs.spawn(command)
        try:
            out, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            raise DeviceError(timeout_message(command, timeout, self.describe())) from None
        return ShellResult(proc.returncode, self.fs.unmap(out).decode("utf-8", "replace"))

    def _push_once(self, local: Path, remote: str) -> None:
        host = self._host(remote)
        host.parent.mkdir(parents=True, exist_ok=True)
        try:
            shutil.copyfile(local, host)
        except OSError as exc:
            host.unlink(missing_ok=True)
            raise DeviceError(sync_fail_message("push", remote, str(exc))) from exc

    def _pull_once(self, remote: str, local: Path) -> None:
        host = self._host(remote)
        if not host.is_file():
            raise DeviceError(f"{remote} does not exist on {self.describe()}: check the step that should write it")
        shutil.copyfile(host, local)

    def _exists_once(self, remote: str) -> bool:
        return self._host(remote).exists()

    def describe(self) -> str:
        return f"local:{self.fs.root}"


EXIT_MARK = "RKBENCH_EXIT:"   # adb and ssh append `echo RKBENCH_EXIT:$?` to every command: the exit status in-band


def split_exit(output: str, what: str, where: str) -> ShellResult:
    """The command's output and the exit status its EXIT_MARK line carries; no mark: the stream ended early."""
    mark = output.rfind(EXIT_MARK)
    if mark < 0:
        raise DeviceError(f"`{what[:80]}` on {where} ended without an exit status (connection lost?): check the link "
                          "and the board's log (dmesg)")
    try:
        code = int(output[mark + len(EXIT_MARK):].strip())
    except ValueError:
        raise DeviceError(f"`{what[:80]}` on {where}: unreadable exit status: check the board's sh") from None
    return ShellResult(code, output[:mark])


def timeout_message(command: str, timeout: float, where: str) -> str:
    short = command if len(command) < 120 else command[:117] + "..."
    return (f"`{short}` did not finish within {timeout:g}s on {where}: raise board.timeout_s, "
            "or look for a hung process on the board")


def sync_fail_message(action: str, remote: str, message: str) -> str:
    parent = remote.rsplit("/", 1)[0] or "/"
    if "No space left" in message:
        return (f"{action} to {remote} failed: the board's disk is full ({message}); free space there "
                f"(`df -h {parent}`; old models pile up under <board.remote_root>/cache) or point "
                "board.remote_root at a larger partition")
    if "Read-only" in message or "Permission denied" in message:
        return f"{action} to {remote} failed ({message}): set board.remote_root to a writable directory such as /data/local/tmp/rkbench"
    return f"{action} {remote} failed on the board: {message}; check the path and the board's storage"


def open_transport(board: "BoardConfig") -> Transport:
    """The transport `board.transport` names (adb or ssh), reaching the board its settings describe."""
    if board.transport == "ssh":
        from rkbench.device.ssh import ssh_transport
        if not board.address:
            raise DeviceError("board.transport=ssh needs board.address=HOST (USER@HOST:PORT, or a Host of ~/.ssh/config)")
        return ssh_transport(board.address, user=board.ssh_user, port=board.ssh_port, key_file=board.ssh_key,
                             known_hosts=board.ssh_known_hosts)
    from rkbench.device.adb import AdbTransport
    return AdbTransport(board.serial, board.address, board.adb_host, board.adb_port)


def __getattr__(name: str):
    """`from rkbench.device.transport import AdbTransport` keeps working (the adb side moved to adb.py;
    imported on first use, as adb.py itself imports this module)."""
    if name in ("AdbTransport", "ensure_adb_server"):
        from rkbench.device import adb
        return getattr(adb, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
