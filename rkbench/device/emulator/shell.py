"""The legacy `shell:` service: run the command in the board's sandbox, stream its output back.

The banner carries no `shell_v2`, so hosts use these legacy streams (adbutils' shell2 then appends
`; echo X4EXIT:$?` for the exit status). The command runs as rkbench/device/sandbox.py describes: board
paths mapped into the sandbox, output mapped back, stdout and stderr merged. Closing the stream (the host
timed out, the link dropped, Ctrl-C) sends SIGHUP to the shell only, as adbd does: whatever the shell
started in its own process group (the runner, under setsid) keeps running, orphaned, until the host kills
it. Faults: a command matching `hang_shell_matching` never answers; one matching
`kill_shell_matching` loses its processes to SIGKILL after `kill_after_s` (the OOM killer's way).
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import threading
from typing import TYPE_CHECKING

import psutil

from rkbench.device.emulator.wire import Stream

if TYPE_CHECKING:
    from rkbench.device.emulator.board import EmulatedBoard

READ_CHUNK = 64 * 1024


def serve_shell(board: "EmulatedBoard", stream: Stream, command: str) -> None:
    faults = board.faults
    if not command.strip():
        stream.write(b"rkbench emulator: interactive shell not supported; pass a command\n")
        return
    if faults.hang_shell_matching and faults.hang_shell_matching in command:
        board.fire("hang_shell")
        stream.closed.wait()     # never answers; the host gives up and closes the stream
        return
    # stdin stays open while the stream does, as adbd's raw shell reads the stream (the host sends nothing):
    # a command that reads stdin waits there, as on a board, instead of reading end-of-file at once.
    proc = board.fs.spawn(command, open_stdin=True)
    # Like adbd: the host closing the stream (timeout, Ctrl-C) or the link dying signals the shell, nothing else.
    stream.on_close(lambda: _signal(proc, signal.SIGHUP))
    if faults.kill_shell_matching and faults.kill_shell_matching in command:
        def kill() -> None:
            board.fire("kill_shell")
            kill_tree(proc.pid, include_root=False)   # the runner dies (OOM-killer style); sh reports 137
        timer = threading.Timer(faults.kill_after_s, kill)
        timer.daemon = True
        timer.start()
    assert proc.stdout is not None
    pending = b""
    try:
        while True:
            # an orphan may hold the pipe open for ever: stop reading once the host is gone
            if not select.select([proc.stdout], [], [], 0.2)[0]:
                if stream.closed.is_set():
                    break
                continue
            chunk = os.read(proc.stdout.fileno(), READ_CHUNK)
            if not chunk:
                break
            data = pending + chunk
            cut = len(data) - board.fs.held_back(data)
            pending = data[cut:]
            if cut:
                stream.write(board.fs.unmap(data[:cut]))
        if pending:
            stream.write(board.fs.unmap(pending))
    finally:
        assert proc.stdin is not None
        proc.stdin.close()
        proc.stdout.close()     # an orphan writing later gets SIGPIPE, as on a board when adbd closed the socket
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:   # a shell that ignores SIGHUP: adbd's last word is to the shell too
            _signal(proc, signal.SIGKILL)
            proc.wait()


def _signal(proc: subprocess.Popen, sig: int) -> None:
    if proc.poll() is None:
        try:
            os.kill(proc.pid, sig)
        except ProcessLookupError:
            pass


def kill_tree(pid: int, *, include_root: bool) -> None:
    """SIGKILL the processes under `pid` (and `pid` itself with include_root)."""
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
