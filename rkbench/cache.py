"""Content-addressed stage cache (the dvc.lock idea).

A stage's key = stage name + its resolved config slice + the hashes of its inputs + the versions of the
code and tools that produce it. Its outputs live in `<root>/<stage>/<key[:16]>/` beside a meta.json that
records each output's sha256. The faults it is built for:

- a killed or failing build: an entry is built in a temp folder beside its final place (same file
  system) and renamed into place whole, so the final folder is complete or absent, never half written;
- two processes building the same key: a per-key lock (`<root>/.locks/`); the second one waits, then
  finds the first one's entry as a hit instead of wiping its build folder;
- a damaged entry (an empty meta.json or failure.json after a full disk, a truncated artifact): every
  lookup re-reads meta.json and re-hashes the outputs; a damaged entry is a miss, logged as a warning,
  and the rebuild replaces it;
- a full disk: one StageError naming the cache dir; nothing half written is left and nothing is
  remembered, so the next run after freeing space builds normally."""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

from rkbench.errors import RkbenchError, StageError

try:
    import fcntl
except ImportError:  # Windows: no per-key lock; entries are still renamed into place whole
    fcntl = None

log = logging.getLogger("rkbench.cache")

NO_SPACE = {errno.ENOSPC, errno.EFBIG, getattr(errno, "EDQUOT", errno.ENOSPC)}
# rknn-toolkit2 turns OSErrors into ValueErrors carrying the traceback text: the errno is only in the words.
NO_SPACE_TEXT = ("No space left on device", "Disk quota exceeded", "File too large")


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def stage_key(stage: str, **parts: Any) -> str:
    """Stable hash of everything that determines a stage's output."""
    blob = json.dumps({"stage": stage, **parts}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def out_of_space(exc: Optional[BaseException]) -> bool:
    """Whether exc, or an exception it wraps, is a write refused for lack of room."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if (isinstance(exc, OSError) and exc.errno in NO_SPACE) or any(t in str(exc) for t in NO_SPACE_TEXT):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def _read_json(path: Path, keys: tuple[str, ...]) -> Optional[dict]:
    """A cache record, or None when absent; an empty or invalid one (full disk, killed writer) is None too."""
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text())
        if isinstance(data, dict) and all(k in data for k in keys):
            return data
    except (OSError, ValueError):
        pass
    log.warning("cache: %s is empty or invalid: the entry is discarded and rebuilt", path)
    return None


def _write_json(path: Path, data: dict) -> None:
    # fsync before the folder is renamed into place: a crash must not leave a renamed entry with an empty file
    with open(path, "w") as f:
        json.dump(data, f, indent=2, default=str)
        f.flush()
        os.fsync(f.fileno())


def _verified_meta(folder: Path) -> Optional[dict]:
    """meta.json of a committed entry if it parses and every output still has the recorded sha256."""
    meta = _read_json(folder / "meta.json", ("outputs", "info"))
    if meta is None:
        return None
    try:
        for out in meta["outputs"].values():
            path = folder / out["file"]
            if not path.is_file() or sha256_file(path) != out["sha256"]:
                log.warning("cache: %s is missing or changed since it was cached (truncated?): the entry is "
                            "discarded and rebuilt", path)
                return None
    except (AttributeError, KeyError, TypeError):
        log.warning("cache: %s lists its outputs wrongly: the entry is discarded and rebuilt", folder / "meta.json")
        return None
    return meta


@dataclass
class Entry:
    stage: str
    key: str
    dir: Path                        # the final place
    hit: bool                        # a verified meta.json or a remembered failure
    meta: Optional[dict] = None      # the verified meta.json (of a hit, or of what commit() installed)
    failure: Optional[dict] = None   # a remembered deterministic failure: {"detail", "hint"}
    work: Optional[Path] = None      # the temp build folder, from begin() until commit() or fail()
    locked: bool = False             # opened with StageCache.open(): this process holds the key's lock


class StageCache:
    def __init__(self, root: Path):
        self.root = Path(root)
        self.hits: list[str] = []
        self.misses: list[str] = []

    def lookup(self, stage: str, key: str) -> Entry:
        """The verified entry of a key. Only reads: a damaged entry is replaced when its rebuild commits."""
        folder = self.root / stage / key[:16]
        failure = _read_json(folder / "failure.json", ("detail", "hint"))
        meta = _verified_meta(folder) if failure is None else None
        entry = Entry(stage, key, folder, hit=meta is not None or failure is not None, meta=meta, failure=failure)
        (self.hits if entry.hit else self.misses).append(stage)
        log.debug("cache %s %s %s", "hit " if entry.hit else "miss", stage, key[:16])
        return entry

    @contextmanager
    def open(self, stage: str, key: str) -> Iterator[Entry]:
        """lookup() with the key's lock held for the whole block: a miss is built (begin, then commit or
        fail) while a second process asking for the same key waits here, then finds a hit. Whatever
        the block raises, its temp folder goes; a full disk becomes one StageError naming the cache."""
        entry = None
        try:
            with self._lock(stage, key):
                entry = self.lookup(stage, key)
                entry.locked = True
                yield entry
        except BaseException as exc:
            if out_of_space(exc):
                raise StageError(stage, f"no space left writing the cache {self.root}",
                                 "free space there (rknn-toolkit2 also writes to TMPDIR) or set cache_dir=<a folder on "
                                 "a disk with room>") from exc
            if isinstance(exc, RkbenchError) and not getattr(exc, "stage", None):
                exc.stage = stage  # raised while building this stage's entry: this stage is what failed
            raise
        finally:
            if entry is not None and entry.work is not None:
                shutil.rmtree(entry.work, ignore_errors=True)

    def begin(self, entry: Entry) -> Path:
        """A fresh temp build folder beside the entry's final place (same file system: commit renames it)."""
        entry.dir.parent.mkdir(parents=True, exist_ok=True)
        if entry.locked:  # nobody else builds this key now: its temp folders were left by killed builds
            for stale in entry.dir.parent.glob(f".{entry.key[:16]}.*"):
                shutil.rmtree(stale, ignore_errors=True)
        entry.work = Path(tempfile.mkdtemp(prefix=f".{entry.key[:16]}.", dir=entry.dir.parent))
        return entry.work

    def fail(self, entry: Entry, detail: str, hint: str) -> None:
        """Remember a deterministic failure (beside the build's logs) so a re-run does not redo the work to
        fail again. Only for failures the same inputs would repeat: see StageError.deterministic."""
        if entry.work is None:
            self.begin(entry)
        _write_json(entry.work / "failure.json", {"detail": detail, "hint": hint})
        self._install(entry)

    def commit(self, entry: Entry, outputs: dict[str, str], info: dict[str, Any]) -> dict:
        """Record the outputs (file names inside the work folder) with their hashes, then rename the folder
        into place."""
        meta = {
            "stage": entry.stage,
            "key": entry.key,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "outputs": {name: {"file": f, "sha256": sha256_file(entry.work / f)} for name, f in outputs.items()},
            "info": info,
        }
        _write_json(entry.work / "meta.json", meta)
        entry.meta = meta
        self._install(entry)
        return entry.meta

    def _install(self, entry: Entry) -> None:
        """Rename the work folder into place under the key's lock (taken here for callers without open())."""
        with nullcontext() if entry.locked else self._lock(entry.stage, entry.key):
            if entry.dir.exists():
                # under open() a folder here is the damaged one lookup() rejected; otherwise it may be a
                # good entry another process committed meanwhile
                kept = None if entry.locked else _verified_meta(entry.dir)
                if kept is not None:  # same inputs: keep theirs
                    shutil.rmtree(entry.work, ignore_errors=True)
                    entry.work, entry.meta = None, kept
                    return
                shutil.rmtree(entry.dir)  # damaged, a half entry of an older rkbench, or a failure being retried
            os.rename(entry.work, entry.dir)
            entry.work = None

    @contextmanager
    def _lock(self, stage: str, key: str) -> Iterator[None]:
        """One writer per key across processes; the kernel releases a flock when its holder dies."""
        if fcntl is None:
            yield
            return
        locks = self.root / ".locks"
        locks.mkdir(parents=True, exist_ok=True)
        with open(locks / f"{stage}-{key[:16]}.lock", "a") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                log.info("cache: waiting for another process building %s %s", stage, key[:16])
                fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)
