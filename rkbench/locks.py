"""An inter-process lock for work that two rkbench processes must not do at the same time (creating an
MLflow sqlite schema, generating the demo dataset). The lock is taken on the folder the work happens
in, so no lock file is left behind; flock is released by the kernel when the holder dies, even by
kill -9, so a crashed run never leaves a stale lock either."""

from __future__ import annotations

import fcntl
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from rkbench.errors import ConfigError


@contextmanager
def folder_lock(folder: Path, setting: str) -> Iterator[None]:
    """Hold an exclusive lock on `folder` (created if missing) for the with-block; `setting` is the config
    key that chose the folder, for the error message."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    except OSError as exc:
        raise ConfigError(f"cannot create or open the folder {folder} ({exc.strerror}): set {setting} to a "
                          "writable place") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # blocks until the other process is done
        yield
    finally:
        os.close(fd)                    # closing releases the lock
