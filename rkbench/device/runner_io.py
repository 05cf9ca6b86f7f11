"""The on-device runner's inputs and results: argument parsing helpers, the images list, and the result
file protocol (written to <out>.tmp, fsynced, renamed; "complete": true only when the run got to the end,
so a missing, half-written or incomplete file is how the caller tells a killed runner from a result).
Board-pushable: standard library only."""

from __future__ import annotations

import hashlib
import json
import os
import re
from typing import Any, Dict, List, Tuple


class RunnerError(Exception):
    """Bad input to the runner; the message names the fix."""


def parse_wxh(text: str) -> Tuple[int, int]:
    m = re.fullmatch(r"(\d+)x(\d+)", text.strip())
    if not m:
        raise RunnerError(f"frame size {text!r} is not WIDTHxHEIGHT: e.g. 1920x1080")
    return int(m.group(1)), int(m.group(2))



def parse_shapes(text: str) -> List[Tuple[int, ...]]:
    """'1x64x80x80,1x80x80x80' -> [(1, 64, 80, 80), (1, 80, 80, 80)]."""
    try:
        return [tuple(int(d) for d in s.split("x")) for s in text.split(",") if s.strip()]
    except ValueError:
        raise RunnerError(f"output shapes {text!r} malformed: use e.g. 1x64x80x80,1x80x80x80,1x1x80x80") from None



def read_images_file(path: str) -> List[Tuple[int, str]]:
    """Lines `image_id<TAB>path`; relative paths are relative to the images file."""
    if not os.path.isfile(path):
        raise RunnerError(f"images file {path} not found: push it with the images (lines: image_id<TAB>path)")
    base = os.path.dirname(os.path.abspath(path))
    items = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            line = line.rstrip("\n")
            if not line.strip():
                continue
            parts = line.split("\t")
            if len(parts) != 2 or not parts[0].strip().lstrip("-").isdigit():
                raise RunnerError(f"{path}:{lineno}: expected image_id<TAB>path, got {line!r}: fix the images file")
            items.append((int(parts[0]), os.path.join(base, parts[1])))
    if not items:
        raise RunnerError(f"images file {path} lists no images: write one image_id<TAB>path line per image")
    return items



def file_facts(path: str) -> Dict[str, Any]:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return {"path": path, "bytes": os.path.getsize(path), "sha256": digest.hexdigest()}


class ResultError(RunnerError):
    """A result file the caller cannot trust: missing, truncated, or written by a failed run."""


def load_result(path: str) -> Dict[str, Any]:
    """The caller's side: a complete result, or ResultError saying what went wrong on the board."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        raise ResultError(f"no result file {path}: the runner was killed or the disk is full; read its stderr") from None
    try:
        result = json.loads(text)
    except ValueError:
        raise ResultError(f"result file {path} is truncated ({len(text)} bytes): pull it again or re-run") from None
    if not isinstance(result, dict) or result.get("complete") is not True:
        error = result.get("error") if isinstance(result, dict) else None
        raise ResultError(f"runner did not complete: {error or 'no error recorded'}")
    return result


def write_json_atomic(path: str, obj: Any) -> None:
    """Write to path.tmp, fsync, rename: a reader sees the whole file or none."""
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)

