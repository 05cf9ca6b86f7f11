"""Push files into a content-addressed cache on the board: `<remote_root>/cache/<sha256[:16]>/<file name>`.

A file whose hash is already there is not pushed again (one `sha256sum` over all files per deploy), and a
file this process already placed on a transport is not even checked again. The file name keeps its
suffix because runtimes dispatch on it (.rknn / .onnx)."""

from __future__ import annotations

import logging
import posixpath
import weakref
from dataclasses import dataclass, field
from pathlib import Path

from rkbench.device.transport import Transport, sha256_file
from rkbench.errors import DeviceError

log = logging.getLogger("rkbench.device")

# transport -> {remote path: sha256} placed (pushed or found) in this process
_PLACED: "weakref.WeakKeyDictionary[Transport, dict[str, str]]" = weakref.WeakKeyDictionary()
# (path, size, mtime_ns) -> sha256: big models are hashed once per process
_LOCAL_HASHES: dict[tuple[str, int, int], str] = {}


@dataclass
class DeployReport:
    paths: dict[str, str] = field(default_factory=dict)    # logical name -> remote path
    pushed: list[str] = field(default_factory=list)        # logical names pushed now
    skipped: list[str] = field(default_factory=list)       # logical names already on the board


def _local_sha256(path: Path) -> str:
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _LOCAL_HASHES:
        _LOCAL_HASHES[key] = sha256_file(path)
    return _LOCAL_HASHES[key]


def cache_path(remote_root: str, digest: str, name: str) -> str:
    return posixpath.join(remote_root, "cache", digest[:16], name)


def deploy_with_report(transport: Transport, files: dict[str, Path],
                       remote_root: str = "/data/local/tmp/rkbench") -> DeployReport:
    report = DeployReport()
    placed = _PLACED.setdefault(transport, {})
    wanted: dict[str, tuple[Path, str]] = {}          # logical name -> (local, sha256)
    for name, local in files.items():
        local = Path(local)
        if not local.is_file():
            raise DeviceError(f"cannot deploy {name}: {local} is not a file; check the stage that produces it")
        digest = _local_sha256(local)
        wanted[name] = (local, digest)
        report.paths[name] = cache_path(remote_root, digest, local.name)

    unknown = sorted({report.paths[n] for n, (_, d) in wanted.items() if placed.get(report.paths[n]) != d})
    on_board = transport.sha256_many(unknown) if unknown else {}
    for name, (local, digest) in wanted.items():
        remote = report.paths[name]
        # `placed` also covers the same file under two logical names in this call.
        if placed.get(remote) == digest or on_board.get(remote) == digest:
            report.skipped.append(name)
        else:
            transport.push(local, remote)
            report.pushed.append(name)
        placed[remote] = digest
    log.info("deploy to %s: pushed %d, skipped %d (already on the board)", transport.describe(),
             len(report.pushed), len(report.skipped))
    return report


def deploy(transport: Transport, files: dict[str, Path], remote_root: str = "/data/local/tmp/rkbench") -> dict[str, str]:
    """Logical name -> remote path of each file, pushing only what the board does not have yet."""
    return deploy_with_report(transport, files, remote_root).paths
