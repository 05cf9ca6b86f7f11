"""Faults the emulated board injects, so the failure paths are testable: drop the TCP connection
mid-push, truncate a pulled file, a full disk (sync.py); SIGKILL a running command's processes, a
command that never ends (shell.py). `EmulatedBoard.fire` counts each firing in `board.fired`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


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
