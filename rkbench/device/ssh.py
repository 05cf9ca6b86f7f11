"""A board behind sshd (Debian images for RK3588 boards often run sshd and no adbd), through paramiko.

Commands: one `exec` channel each, stdout and stderr merged (as adb's legacy shell). The command line is
wrapped in `sh -c` that first prints its process group (sshd starts every session with setsid, so the
group is the command and everything it starts) and last prints the exit status (`$?`, 128 + N for a
process killed by signal N: sshd's exit-signal message is not read by paramiko). Closing a channel does
not stop a command that has no pty - real adbd behaves the same - so rkbench stops it itself: past its
timeout or on Ctrl-C the group is killed (`kill -KILL -PGID` on a second channel), and the group of a
command whose link dropped is killed as soon as the link is back.

Files go over SFTP (sshd's sftp subsystem, OpenSSH's default): written to `<path>.partial`, given the
local file's mode and renamed, so a cut push never leaves a file under its final name.

Login: `board.address` is a host name (one from ~/.ssh/config works: HostName, Port, User, IdentityFile
and ProxyCommand are honoured) or an IP, optionally `user@host:port`; board.ssh_user / ssh_port / ssh_key
win over both. Keys come from board.ssh_key, else ~/.ssh/config's IdentityFile, ssh-agent and ~/.ssh/id_*.
rkbench never takes a password. Host keys are checked against ~/.ssh/known_hosts (or
board.ssh_known_hosts); an unknown board is refused with the command that trusts it.
"""

from __future__ import annotations

import errno
import getpass
import logging
import os
import posixpath
import re
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Optional, TypeVar

from rkbench.device.transport import (EXIT_MARK, ShellResult, Transport, command_line, split_exit, sync_fail_message,
                                      timeout_message)
from rkbench.errors import DeviceError

if TYPE_CHECKING:
    import paramiko

log = logging.getLogger("rkbench.device")
T = TypeVar("T")

_PGID_MARK = "RKBENCH_PGID:"
# $1 is the command line (already quoted), run by the login shell as sshd itself would; its process group
# (field 5 of /proc/$$/stat) comes first. stderr joins stdout here: two ssh streams arrive in no fixed order.
_WRAP = ('exec 2>&1; read -r _ _ _ _ g _ < /proc/$$/stat; echo "' + _PGID_MARK + '$g"; '
         '"${SHELL:-sh}" -c "$1"; echo "' + EXIT_MARK + '$?"')
DEFAULT_SSH_CONFIG = Path("~/.ssh/config")


@dataclass(frozen=True)
class SshTarget:
    """Where and as whom to log in, after ~/.ssh/config and the board.ssh_* settings."""

    host: str                      # what to connect to (HostName of an alias)
    port: int
    user: str
    key_files: tuple[str, ...] = ()
    proxy_command: Optional[str] = None
    name: str = ""                 # as given in board.address (an alias keeps its name in messages)

    def describe(self) -> str:
        return f"ssh:{self.user}@{self.name or self.host}:{self.port}"


def resolve_target(address: str, *, user: Optional[str] = None, port: Optional[int] = None,
                   key_file: Optional[str] = None, config_file: Path = DEFAULT_SSH_CONFIG) -> SshTarget:
    """board.address (`host`, `user@host`, `host:port`) + ~/.ssh/config + explicit settings -> SshTarget."""
    import paramiko

    given_user, _, hostport = address.rpartition("@")
    if hostport.startswith("["):                 # [IPv6]:PORT
        host, _, given_port = hostport[1:].partition("]")
        given_port = given_port.lstrip(":")
    elif hostport.count(":") == 1:
        host, _, given_port = hostport.partition(":")
    else:                                        # a name, IPv4, or a bare IPv6 address
        host, given_port = hostport, ""
    if not host or (given_port and not given_port.isdigit()):
        raise DeviceError(f"board.address={address!r} is not HOST, USER@HOST or HOST:PORT: fix board.address")
    seen: dict = {}
    config_file = Path(config_file).expanduser()
    if config_file.is_file():
        seen = paramiko.SSHConfig.from_path(str(config_file)).lookup(host)
    if key_file:
        keys: tuple[str, ...] = (os.path.expanduser(key_file),)
        if not os.path.isfile(keys[0]):
            raise DeviceError(f"board.ssh_key={key_file} is not a file: give the private key's path, or leave it unset")
    else:   # as ssh does, IdentityFile entries that do not exist are passed over
        keys = tuple(k for k in map(os.path.expanduser, seen.get("identityfile", [])) if os.path.isfile(k))
    return SshTarget(host=seen.get("hostname", host), port=int(port or given_port or seen.get("port", 22)),
                     user=user or given_user or seen.get("user") or getpass.getuser(), key_files=keys,
                     proxy_command=seen.get("proxycommand"), name=host)


class SshTransport(Transport):
    """A board behind sshd: commands on exec channels, files over SFTP (see the module docstring)."""

    kind = "ssh"

    def __init__(self, target: SshTarget, *, known_hosts: Optional[str] = None, connect_timeout_s: float = 15.0,
                 io_timeout_s: float = 60.0):
        self.target = target
        self.known_hosts = os.path.expanduser(known_hosts) if known_hosts else None
        if self.known_hosts and not os.path.isfile(self.known_hosts):
            raise DeviceError(f"board.ssh_known_hosts={known_hosts} does not exist: give a known_hosts file, or leave "
                              "it unset for ~/.ssh/known_hosts")
        self.connect_timeout_s, self.io_timeout_s = connect_timeout_s, io_timeout_s
        self._client: Optional["paramiko.SSHClient"] = None
        self._sftp: Optional["paramiko.SFTPClient"] = None
        self._made: set[str] = set()               # board folders created through this link
        self.orphans: list[int] = []               # process groups whose link dropped: killed on reconnect
        self._connect()

    # ---- link ------------------------------------------------------------------------------------
    def describe(self) -> str:
        return self.target.describe()

    @property
    def emulated(self) -> bool:
        """A real machine answers over ssh (there is no emulated sshd board): its results say `board`."""
        return False

    def _connect(self, timeout_s: Optional[float] = None) -> None:
        import paramiko

        timeout_s = self.connect_timeout_s if timeout_s is None else timeout_s
        self.close()
        client = paramiko.SSHClient()
        client.load_system_host_keys(self.known_hosts)     # None: ~/.ssh/known_hosts
        client.set_missing_host_key_policy(paramiko.RejectPolicy())
        t = self.target
        sock = paramiko.ProxyCommand(t.proxy_command) if t.proxy_command else None
        try:
            client.connect(t.host, t.port, username=t.user, key_filename=list(t.key_files) or None, sock=sock,
                           timeout=timeout_s, banner_timeout=timeout_s, auth_timeout=timeout_s, allow_agent=True,
                           look_for_keys=not t.key_files)
        except Exception as exc:
            client.close()
            raise self._connect_error(exc) from exc
        client.get_transport().set_keepalive(10)
        self._client, self._made = client, set()
        log.info("connected to %s", self.describe())
        self._kill_orphans()

    def _connect_error(self, exc: Exception) -> DeviceError:
        import paramiko

        t, where = self.target, self.describe()
        known = self.known_hosts or "~/.ssh/known_hosts"
        if isinstance(exc, paramiko.BadHostKeyException):
            return DeviceError(f"the host key of {where} is not the one in {known}: if the board was reinstalled, "
                               f"`ssh-keygen -R {_known_name(t)}` and trust it again; otherwise do not connect")
        if isinstance(exc, paramiko.PasswordRequiredException):   # an AuthenticationException too
            return DeviceError(f"the key for {where} is encrypted: load it into ssh-agent (`ssh-add`); rkbench "
                               "never asks for passphrases")
        if isinstance(exc, paramiko.AuthenticationException):
            return DeviceError(f"{where} refused the login ({exc}): put your public key in the board's "
                               "~/.ssh/authorized_keys (`ssh-copy-id`), set board.ssh_key=PATH or load the key into "
                               "ssh-agent (rkbench never uses passwords)")
        if isinstance(exc, paramiko.SSHException) and "known_hosts" in str(exc):
            return DeviceError(f"{where} is not in {known}: check it is your board, then "
                               f"`ssh-keyscan -p {t.port} {t.host} >> {known}` (or `ssh` to it once by hand)")
        return DeviceError(f"cannot reach {where} ({str(exc) or type(exc).__name__}): check the board is on and on "
                           "the network and that sshd runs there (`systemctl status ssh`)", retryable=True)

    def _alive(self) -> bool:
        transport = self._client.get_transport() if self._client else None
        return bool(transport and transport.is_active())

    def _link_dropped(self, settle_s: float = 1.0) -> bool:
        """Whether the link is down. paramiko closes the channels of a dead link a moment before it marks the
        link inactive, so a channel that just ended is given settle_s to tell."""
        deadline = time.monotonic() + settle_s
        while self._alive():
            if time.monotonic() > deadline:
                return False
            time.sleep(0.02)
        return True

    def _ready(self) -> "paramiko.SSHClient":
        """The connected client; a link found dead is connected again first (as adb does for TCP boards)."""
        if not self._alive():
            self._connect()
        assert self._client is not None
        return self._client

    def reconnect(self, timeout_s: float) -> None:
        """One try at an answering link within timeout_s (a retryable DeviceError if not); a live link is kept.
        Connecting kills the commands orphaned by the dropped link."""
        if not self._alive():
            self._connect(timeout_s)

    def recover(self) -> None:
        """After a retryable failure: the link back within connect_timeout_s (tries every 0.5 s)."""
        deadline = time.monotonic() + self.connect_timeout_s
        while True:
            try:
                self.reconnect(max(1.0, deadline - time.monotonic()))
                return
            except DeviceError as exc:
                if not exc.retryable or time.monotonic() > deadline:
                    raise
                time.sleep(0.5)

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
        self._client, self._sftp = None, None

    def _lost(self, action: str, exc: BaseException) -> DeviceError:
        return DeviceError(f"{action}: connection to {self.describe()} lost ({str(exc) or type(exc).__name__}): "
                           "check the link", retryable=True)

    # ---- commands --------------------------------------------------------------------------------
    def shell(self, args: list[str], timeout: float) -> ShellResult:
        """The command's exit status and merged output; past `timeout` its process group is killed."""
        command = command_line(args)
        return self._run(command, timeout, what=command)

    def _run(self, command: str, timeout: float, what: str) -> ShellResult:
        deadline = time.monotonic() + timeout
        try:
            channel = self._ready().get_transport().open_session(timeout=self.connect_timeout_s)
            channel.set_combine_stderr(True)
            channel.exec_command(command_line(["sh", "-c", _WRAP, "sh", command]))
        except DeviceError:
            raise
        except Exception as exc:   # SSHException, EOFError, OSError: the link is gone
            raise self._lost(f"cannot start `{what[:80]}`", exc) from exc
        chunks: list[bytes] = []
        try:
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise socket.timeout()
                channel.settimeout(left)
                chunk = channel.recv(65536)
                if not chunk:
                    break
                chunks.append(chunk)
        except socket.timeout:
            self._kill_group(_pgid(b"".join(chunks)), why="timed out")
            raise DeviceError(timeout_message(what, timeout, self.describe())) from None
        except KeyboardInterrupt:   # Ctrl-C here must not leave the command running on the board
            self._kill_group(_pgid(b"".join(chunks)), why="was interrupted (Ctrl-C)")
            raise
        except (EOFError, OSError):
            pass        # the link went down mid-command: told apart below by the missing exit status
        finally:
            channel.close()
        output = b"".join(chunks).decode("utf-8", "replace")
        if EXIT_MARK not in output and self._link_dropped():
            group = _pgid(output.encode())
            if group:
                self.orphans.append(group)
            raise DeviceError(f"connection to {self.describe()} lost while running `{what[:80]}`: check the link; "
                              "the command is killed when the link is back", retryable=True)
        result = split_exit(output, what, self.describe())
        start = result.output.find(_PGID_MARK)
        start = result.output.find("\n", start) + 1 if start >= 0 else 0
        return ShellResult(result.exit_code, result.output[start:])

    def _kill_group(self, group: Optional[int], why: str) -> None:
        """SIGKILL to a command's process group (never the sshd session itself: sshd set it apart with setsid)."""
        if not group:
            log.warning("%s: a command %s but its process group is unknown (no /proc?): it may still run", self.describe(), why)
            return
        try:
            # no `--`: dash's kill (Debian's sh) refuses it; a negative pid after the signal is a group anywhere
            self._run(command_line(["kill", "-KILL", f"-{group}"]), self.io_timeout_s, what=f"kill -KILL -{group}")
        except DeviceError as exc:
            log.warning("%s: could not kill process group %d (%s): it may still run", self.describe(), group, exc)
            if exc.retryable:
                self.orphans.append(group)

    def _kill_orphans(self) -> None:
        groups, self.orphans = self.orphans, []      # a kill that fails on a dropped link puts its group back
        for group in groups:
            log.warning("%s: killing process group %d, left running when the link dropped", self.describe(), group)
            self._kill_group(group, why="lost its link")

    # ---- files -----------------------------------------------------------------------------------
    def _files(self, verb: str, remote: str, work: Callable[["paramiko.SFTPClient"], T]) -> T:
        """Run an SFTP step; a dead link is a retryable DeviceError, the board's refusal is not."""
        try:
            if self._sftp is None or not self._alive():
                self._sftp = self._ready().open_sftp()
            return work(self._sftp)
        except DeviceError:
            raise
        except Exception as exc:   # IOError with the server's answer, or SSHException/EOFError/OSError on a dead link
            # the board's answers carry an errno (no such file, permission); other errors may be the link's
            if not isinstance(exc, OSError) or (exc.errno is None and self._link_dropped()):
                self._sftp = None
                raise self._lost(f"{verb} {remote}", exc) from exc
            raise self._board_refused(verb, remote, exc) from exc

    def _board_refused(self, verb: str, remote: str, exc: OSError) -> DeviceError:
        action = f"{verb} {remote}"
        if exc.errno == errno.ENOENT:
            return DeviceError(f"{action}: no such file on {self.describe()}: check the step that should write it")
        if "size mismatch" in str(exc):
            return DeviceError(f"{action}: the file arrived incomplete ({exc})", retryable=True)
        text = exc.strerror or str(exc)
        if text == "Failure":   # sftp-server reports EROFS, EDQUOT and most write errors as "Failure"
            text = "Failure (sftp's answer for most write errors: check `df -h` and the folder's permissions there)"
        return DeviceError(sync_fail_message(verb, remote, text))

    def _push_once(self, local: Path, remote: str) -> None:
        parent = posixpath.dirname(remote)
        if parent and parent not in self._made:
            made = self.shell(["mkdir", "-p", parent], timeout=self.io_timeout_s)
            if not made.ok:   # adb's hint (/data/local/tmp) is Android's: name a folder this user owns
                raise DeviceError(f"cannot create {parent} on {self.describe()} ({made.output.strip()[:200]}): set "
                                  f"board.remote_root to a folder {self.target.user} can write, such as "
                                  f"/home/{self.target.user}/rkbench")
            self._made.add(parent)
        partial = remote + ".partial"
        size = local.stat().st_size

        def send(sftp: "paramiko.SFTPClient") -> None:
            try:
                sftp.put(str(local), partial, confirm=True)
                sftp.chmod(partial, local.stat().st_mode & 0o777)   # the C++ runner must stay executable
                sftp.posix_rename(partial, remote)
            except OSError as exc:
                if self._link_dropped():
                    raise
                # sftp's pipelined writes fail silently: a full disk shows as a short file ("size mismatch")
                # or a bare "Failure". Ask df while the partial file still fills the disk, then remove it.
                short = self._short_of_space(parent, size)
                try:
                    sftp.remove(partial)
                except OSError:
                    pass
                if short:
                    raise OSError(errno.ENOSPC, f"No space left on device ({short})") from exc
                raise

        self._files("push", remote, send)

    def _short_of_space(self, folder: str, size: int) -> Optional[str]:
        """"N KiB free" when the board's partition under `folder` cannot take `size` bytes (df -Pk), else None."""
        try:
            free = self.shell(["df", "-Pk", folder], timeout=self.io_timeout_s).output.splitlines()[-1].split()[3]
            return f"{free} KiB free of the {size // 1024 + 1} KiB needed" if int(free) * 1024 < size else None
        except (DeviceError, IndexError, ValueError):
            return None

    def _pull_once(self, remote: str, local: Path) -> None:
        self._files("pull", remote, lambda sftp: sftp.get(remote, str(local)))

    def _exists_once(self, remote: str) -> bool:
        def stat(sftp: "paramiko.SFTPClient") -> bool:
            try:
                sftp.stat(remote)
                return True
            except FileNotFoundError:
                return False

        return self._files("stat", remote, stat)


def _pgid(output: bytes) -> Optional[int]:
    found = re.search(_PGID_MARK.encode() + rb"(\d+)", output)
    return int(found[1]) if found else None


def _known_name(target: SshTarget) -> str:
    return target.host if target.port == 22 else f"[{target.host}]:{target.port}"


def ssh_transport(address: str, *, user: Optional[str] = None, port: Optional[int] = None,
                  key_file: Optional[str] = None, known_hosts: Optional[str] = None,
                  config_file: Path = DEFAULT_SSH_CONFIG, connect_timeout_s: float = 15.0) -> SshTransport:
    """The board at board.address, logged in as the board.ssh_* settings and ~/.ssh/config say."""
    return SshTransport(resolve_target(address, user=user, port=port, key_file=key_file, config_file=config_file),
                        known_hosts=known_hosts, connect_timeout_s=connect_timeout_s)
