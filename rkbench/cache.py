"""Content-addressed stage cache (the dvc.lock idea).

A stage's key = stage name + its resolved config slice + the hashes of its inputs + the versions of the
code and tools that produce it. Its outputs live in `<root>/<stage>/<key[:16]>/` beside a meta.json;
a directory only counts once meta.json exists, and it is written last, so a killed run leaves no
half-written artifact behind that a later run would trust."""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger("rkbench.cache")


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


@dataclass
class Entry:
    stage: str
    key: str
    dir: Path
    hit: bool

    @property
    def meta(self) -> dict:
        return json.loads((self.dir / "meta.json").read_text())

    @property
    def failure(self) -> dict | None:
        """A recorded deterministic failure (detail, hint), or None."""
        path = self.dir / "failure.json"
        return json.loads(path.read_text()) if path.exists() else None


class StageCache:
    def __init__(self, root: Path):
        self.root = Path(root)
        self.hits: list[str] = []
        self.misses: list[str] = []

    def lookup(self, stage: str, key: str) -> Entry:
        d = self.root / stage / key[:16]
        hit = (d / "meta.json").exists() or (d / "failure.json").exists()
        (self.hits if hit else self.misses).append(stage)
        log.info("cache %s %s %s", "hit " if hit else "miss", stage, key[:16])
        return Entry(stage, key, d, hit)

    def begin(self, entry: Entry) -> Path:
        """A clean work dir for a miss (whatever a killed run left there is discarded)."""
        if entry.dir.exists():
            shutil.rmtree(entry.dir)
        entry.dir.mkdir(parents=True)
        return entry.dir

    def fail(self, entry: Entry, detail: str, hint: str) -> None:
        """Remember a deterministic failure so a re-run does not redo the work to fail again."""
        entry.dir.mkdir(parents=True, exist_ok=True)
        (entry.dir / "failure.json").write_text(json.dumps({"detail": detail, "hint": hint}))

    def commit(self, entry: Entry, outputs: dict[str, str], info: dict[str, Any]) -> dict:
        """Record the outputs (file names inside the entry dir) with their hashes; meta.json last."""
        meta = {
            "stage": entry.stage,
            "key": entry.key,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "outputs": {name: {"file": f, "sha256": sha256_file(entry.dir / f)} for name, f in outputs.items()},
            "info": info,
        }
        tmp = entry.dir / "meta.json.tmp"
        tmp.write_text(json.dumps(meta, indent=2, default=str))
        tmp.replace(entry.dir / "meta.json")
        return meta
