"""Pipeline stages: plain typed functions, one per step of a run. export, simplify and convert return an
Artifact (a file, its content hash and what the stage learned); evaluate returns an Evaluation (metrics
and the detections Artifact); the board stage returns metrics and tags."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Artifact:
    """A stage's output file, its content hash, what the stage learned, and how it was obtained."""

    stage: str
    path: Path
    sha256: str
    cache_key: str
    cached: bool
    info: dict[str, Any] = field(default_factory=dict)


def from_cache(entry, output: str) -> Artifact:
    """The Artifact recorded in a committed cache entry (rkbench.cache.Entry)."""
    meta = entry.meta
    out = meta["outputs"][output]
    return Artifact(entry.stage, entry.dir / out["file"], out["sha256"], entry.key, entry.hit, meta["info"])
