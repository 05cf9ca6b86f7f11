"""An inter-process lock for work that two rkbench processes must not do at the same time (creating an
MLflow sqlite schema, generating the demo dataset). flock is released by the kernel when the holder
dies, even by kill -9, so a crashed run never leaves a stale lock behind."""

from __future__ import annotations

import fcntl
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from rkbench.errors import ConfigError


@contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on `path` (created if missing; its folder too) for the with-block."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        f = open(path, "a")
    except OSError as exc:
        raise ConfigError(f"cannot create the lock file {path} ({exc.strerror}): make {path.parent} a writable "
                          "folder") from None
    with f:
        fcntl.flock(f, fcntl.LOCK_EX)  # blocks until the other process is done
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
