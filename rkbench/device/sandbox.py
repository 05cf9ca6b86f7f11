"""A board's filesystem inside a host directory: the path convention `LocalTransport` and the emulated
board share, so sync and shell never disagree about where a board path lives.

The sandbox directory holds a board-like tree (root/proc/device-tree/..., root/sys/...,
root/data/local/tmp/...). Absolute paths under the board prefixes (`BOARD_PREFIXES`: /data, /sys, /vendor,
/proc/device-tree, the librknnrt/rknn_server/python3 files) map to root + path; any other path is outside
the board (file transfers refuse it).

Commands run with /bin/sh on the host, in root (cwd and HOME), after the same prefix substitution on the
command text, with root/usr/bin first on PATH (a `python3` there execs the host's Python, so the
on-device runner runs with ONNX Runtime) and RKBENCH_BOARD_ROOT=root in the environment for programs
that read board paths from files; sandbox paths in the output are mapped back to board paths. This is a
path convention, not a security boundary: commands run as the host user. Output is raw (no pty, no
CRLF), stdout and stderr merged.
"""

from __future__ import annotations

import os
import posixpath
import re
import subprocess
import sys
from pathlib import Path
from typing import Optional

BOARD_PREFIXES = ("/data", "/sys", "/vendor", "/proc/device-tree", "/usr/lib/librknnrt.so",
                  "/usr/bin/rknn_server", "/usr/bin/python3")
# A board prefix at the start of a path word: not preceded by a path character, followed by / or a non-path one.
_PREFIX_RE = re.compile(r"(?<![\w.~/-])(" + "|".join(re.escape(p) for p in BOARD_PREFIXES) + r")(?=[/\s'\"`;|&()<>:]|$)")
_SAFE_ROOT = re.compile(r"^[A-Za-z0-9_./+-]+$")


class BoardRoot:
    """Maps board paths into a sandbox directory (see the module docstring)."""

    def __init__(self, root: Path):
        self.root = Path(root).resolve()
        if not _SAFE_ROOT.match(str(self.root)):
            # The root is spliced into shell command text; quoting survives only with plain characters.
            raise ValueError(f"board sandbox path {self.root} has characters a shell would interpret: use a plain path")
        self._marker = str(self.root).encode() + b"/"

    def host_path(self, remote: str) -> Optional[Path]:
        """Host path of a board path, or None when it lies outside the board prefixes."""
        path = posixpath.normpath(remote)
        for prefix in BOARD_PREFIXES:
            if path == prefix or path.startswith(prefix + "/"):
                return self.root / path.lstrip("/")
        return None

    def rewrite(self, command: str) -> str:
        return _PREFIX_RE.sub(lambda m: str(self.root) + m.group(1), command)

    def unmap(self, output: bytes) -> bytes:
        """Sandbox paths in command output back to board paths ("<root>/data/x" -> "/data/x")."""
        return output.replace(self._marker, b"/")

    def held_back(self, output: bytes) -> int:
        """How many trailing bytes could start a sandbox path split across two reads."""
        for k in range(min(len(self._marker) - 1, len(output)), 0, -1):
            if output.endswith(self._marker[:k]):
                return k
        return 0

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(HOME=str(self.root), RKBENCH_BOARD_ROOT=str(self.root),
                   PATH=f"{self.root / 'usr/bin'}{os.pathsep}{env.get('PATH', '/usr/bin:/bin')}")
        return env

    def spawn(self, command: str, *, open_stdin: bool = False) -> subprocess.Popen:
        """Start a board command line in the sandbox: stdout and stderr merged into one pipe, in its own
        session (so a timeout or a fault can kill the whole process group). `open_stdin`: stdin is a pipe
        the caller keeps open (adbd's raw shell reads the stream: a command reading stdin waits)."""
        return subprocess.Popen(["/bin/sh", "-c", self.rewrite(command)],
                                stdin=subprocess.PIPE if open_stdin else subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=self.root,
                                env=self.env(), start_new_session=True)

    def ensure_python(self) -> None:
        """root/usr/bin/python3: the host's interpreter (a wrapper, so a venv keeps its packages)."""
        write_file(self.root / "usr/bin/python3", f'#!/bin/sh\nexec {sys.executable} "$@"\n', mode=0o755)


def write_file(path: Path, content: str | bytes, mode: int = 0o644) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = content.encode() if isinstance(content, str) else content
    path.write_bytes(data)
    path.chmod(mode)
