"""The host side of the on-device runners: deploy a configuration's files into the board's
content-addressed cache (model, runner bundle, spec file, images, images list: what is there is
skipped; for the C++ runner its binary, host-prepared input tensors and, on the emulated board, the
replay stand-in), then run one runner mode at a time and pull its result.

Retries: a mode whose connection dropped, whose runner was killed by a signal, or whose result came back
missing or incomplete runs once more, from scratch, into a new result file (a measurement is never
stitched from two runs). A timeout, or an error the runner reported itself, is not retried."""

from __future__ import annotations

import hashlib
import json
import logging
import posixpath
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from rkbench.config import NPU_CORES, RunConfig
from rkbench.data.datasets import Dataset
from rkbench.device.deploy import cache_path, deploy_with_report
from rkbench.device.transport import Transport
from rkbench.errors import DeviceError
from rkbench.models.detect import InferenceSpec

log = logging.getLogger("rkbench.board")

# Characters of board paths per `sha256sum` round trip during deploy: keeps one adb shell command under
# the 4 KiB that old adbd versions accept for a service request.
COMMAND_BUDGET = 3000
SIGNAL_EXIT = 128            # sh reports a process killed by signal N as 128 + N


# ----------------------------------------------------------------------------------------------- deploy

def bundle_files() -> dict[str, Path]:
    """The on-device runner and the board-pushable modules it imports flat (found where Python loads them)."""
    from rkbench import stats
    from rkbench.device import modes, runner, runner_io, sampling
    from rkbench.models import detect, prepost
    from rkbench.runtimes import backends

    return {"runner": Path(runner.__file__), **{m.__name__.rsplit(".", 1)[-1]: Path(m.__file__) for m in
                                                 (detect, prepost, backends, stats, modes, runner_io, sampling)}}


def write_local(folder: Path, name: str, text: str) -> Path:
    """A generated input file at a content-addressed local path (same text, same file)."""
    path = folder / hashlib.sha256(text.encode()).hexdigest()[:16] / name
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(name + ".tmp")
        tmp.write_text(text)
        tmp.replace(path)
    return path


def image_ref(remote_root: str, remote_image: str) -> str:
    """An image's path relative to any file in the board cache (the images list lies in a sibling cache
    dir). Relative, because the runner reads it from a file: the emulator maps board paths only in
    command text, and a real board needs no mapping."""
    return posixpath.relpath(remote_image, posixpath.dirname(cache_path(remote_root, "0" * 64, "x")))


def path_groups(files: dict[str, Path], remote_root: str, budget: int = COMMAND_BUDGET) -> list[dict[str, Path]]:
    """Files in groups whose board paths (<root>/cache/<16 hex>/<name>, quoted) fit one shell command."""
    groups: list[dict[str, Path]] = []
    current: dict[str, Path] = {}
    size = 0
    for name, path in files.items():
        cost = len(remote_root) + len(path.name) + 32
        if current and size + cost > budget:
            groups.append(current)
            current, size = {}, 0
        current[name] = path
        size += cost
    return groups + ([current] if current else [])


@dataclass
class Deployed:
    model: str
    runner: str
    pythonpath: str            # board dirs of the modules the runner imports flat ("" for the C++ runner)
    images: str                # Python: images list (image_id<TAB>path); C++: inputs list (prepared tensors)
    spec: str                  # the run's spec file: inference spec + measure settings
    pushed: int = 0
    skipped: int = 0
    pushed_bytes: int = 0
    seconds: float = 0.0
    kind: str = "python"       # which runner: python | cpp
    lib: str = ""              # cpp: the librknnrt to load ("" = the board's own, from the loader's path)


def spec_file(run: RunConfig, spec: InferenceSpec) -> str:
    """What the runner reads: the inference spec (the same object the host evaluates with) and how to measure."""
    m = run.measure
    width, height = m.tile_frame
    measure = {"warmup": m.warmup, "iterations": m.iterations, "min_seconds": m.min_seconds, "frames": m.frames,
               "cores": ",".join(worker_masks(run)), "frame_size": f"{width}x{height}", "overlap": m.tile_overlap}
    if run.runner == "cpp":   # the C++ runner's own settings (the Python runner never sees them)
        measure["outputs"] = m.cpp_outputs
        measure["zero_copy"] = bool(m.cpp_zero_copy)
    else:                     # tiling is the Python runner's (the C++ runner refuses keys it does not know)
        measure.update(tile_mode=m.tile_mode, tile_grid="x".join(map(str, m.tile_grid)))
    return json.dumps({"inference": spec.to_dict(), "measure": measure}, indent=1, sort_keys=True)


@dataclass
class _Placement:
    """One configuration's deploy: files placed group by group, board paths and what was pushed collected."""

    transport: Transport
    root: str
    started: float = field(default_factory=time.perf_counter)
    paths: dict[str, str] = field(default_factory=dict)
    local: dict[str, Path] = field(default_factory=dict)
    pushed: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)

    def place(self, files: dict[str, Path]) -> None:
        """Files in groups whose `sha256sum` command stays short (path_groups)."""
        for group in path_groups(files, self.root):
            report = deploy_with_report(self.transport, group, self.root)
            self.paths.update(report.paths)
            self.pushed.extend(report.pushed)
            self.skipped.extend(report.skipped)
        self.local.update(files)

    def ref(self, name: str) -> str:
        """A placed file's path relative to any file in the board cache."""
        return image_ref(self.root, self.paths[name])

    def deployed(self, **fields: Any) -> Deployed:
        return Deployed(**fields, pushed=len(self.pushed), skipped=len(self.skipped),
                        pushed_bytes=sum(self.local[n].stat().st_size for n in self.pushed),
                        seconds=time.perf_counter() - self.started)


def deploy_inputs(transport: Transport, run: RunConfig, model: Path, spec: InferenceSpec, dataset: Dataset,
                  work: Path) -> Deployed:
    """The Python runner: the model, the runner bundle, the spec file, the images and their list."""
    placing = _Placement(transport, run.board.remote_root)
    placing.place({"model": model, **bundle_files(), "spec": write_local(work, "spec.json", spec_file(run, spec))})
    placing.place({f"image{rec.id}": rec.path for rec in dataset.images})
    listing = "".join(f"{rec.id}\t{placing.ref(f'image{rec.id}')}\n" for rec in dataset.images)
    placing.place({"images": write_local(work, "images.txt", listing)})
    paths = placing.paths
    return placing.deployed(model=paths["model"], runner=paths["runner"],
                            pythonpath=":".join(dict.fromkeys(posixpath.dirname(p) for k, p in paths.items()
                                                              if k in bundle_files() and k != "runner")),
                            images=paths["images"], spec=paths["spec"])


# `uname -m` on the board -> the C++ runner's build (rkbench.cpp.TARGETS)
ARCHES = {"aarch64": "aarch64", "arm64": "aarch64", "x86_64": "x86_64"}


def cpp_arch(machine: Optional[str], where: str) -> str:
    if machine not in ARCHES:
        raise DeviceError(f"the {where}'s machine is {machine or 'unknown (uname -m)'}, and the C++ runner is built for "
                          f"{', '.join(sorted(set(ARCHES.values())))} only: use runner=python there")
    return ARCHES[machine]


def deploy_cpp(transport: Transport, run: RunConfig, model: Path, spec: InferenceSpec, dataset: Dataset, work: Path,
               arch: str, replay_onnx: Optional[Path] = None) -> Deployed:
    """The C++ runner: its binary for `arch`, the spec file, the .rknn, and the evaluation images letterboxed
    here into raw tensors with their inputs list. With `replay_onnx` (the emulated board, no NPU) also the
    replay stand-in librknnrt and the ONNX Runtime outputs of exactly those tensors, which it serves."""
    from rkbench import cpp

    try:
        binary = cpp.build(arch, Path(run.cache_dir))
        standin = cpp.build_standin(arch, Path(run.cache_dir)) if replay_onnx else None
    except cpp.BuildError as exc:
        raise DeviceError(f"cannot build the C++ runner: {exc}") from exc
    listing = "".join(f"{rec.id}\t{rec.path}\n" for rec in dataset.images)
    folder = work / "cpp" / hashlib.sha256(f"{spec.input_size}\n{listing}".encode()).hexdigest()[:16]
    inputs, tensors = cpp.prepare_inputs(folder, [(rec.id, str(rec.path)) for rec in dataset.images], spec.input_size)

    placing = _Placement(transport, run.board.remote_root)
    placing.place({"model": model, "runner": binary, "spec": write_local(work, "spec.json", spec_file(run, spec))})
    lines = [line.split("\t") for line in inputs.read_text().splitlines()]   # image_id, tensor path, letterbox...
    placing.place({f"input{f[0]}": inputs.parent / f[1] for f in lines})
    # the inputs list with board paths: each tensor relative to the list, like images.txt
    text = "".join("\t".join([f[0], placing.ref(f"input{f[0]}"), *f[2:]]) + "\n" for f in lines)
    placing.place({"inputs": write_local(work, "inputs.txt", text)})
    fields = dict(runner=placing.paths["runner"], pythonpath="", images=placing.paths["inputs"],
                  spec=placing.paths["spec"], kind="cpp", model=placing.paths["model"])
    if replay_onnx is not None:
        description = cpp.write_replay(folder / "replay", replay_onnx, tensors)
        records = {f"record{p.stem}": p for p in sorted(description.parent.glob("*.out"))}
        placing.place({"standin": standin, **records})
        text = description.read_text() + "".join(f"record {name[6:]} {placing.ref(name)}\n" for name in records)
        placing.place({"replay": write_local(work, cpp.REPLAY_MODEL, text)})
        fields.update(model=placing.paths["replay"], lib=placing.paths["standin"])
    return placing.deployed(**fields)


# ---------------------------------------------------------------------------------------------- run modes

def worker_masks(run: RunConfig) -> list[str]:
    """Throughput: the NPU core of each of measure.workers workers, round robin over measure.cores, keeping
    only cores the SoC has (a single-core SoC takes auto)."""
    cores = NPU_CORES.get(run.platform, 1)
    usable = [c for c in run.measure.cores.split("_") if int(c) < cores] if cores > 1 else []
    usable = usable or ["auto"]
    return [usable[i % len(usable)] for i in range(run.measure.workers)]


class _Retry(Exception):
    """This attempt failed in a way that a fresh attempt may not (link dropped, runner killed, result lost)."""


def _runner_message(output: str) -> str:
    """The runner's own `runner: error: ...` line (it names the fix), else the last line of its output."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    errors = [line for line in lines if "error:" in line]
    message = (errors or lines or ["(no output)"])[-1][:500]
    if "No module named" in message:   # before the runner could report anything: its imports failed
        message += ("; the runner needs numpy and opencv (pip install numpy opencv-python-headless on the board) "
                    "and its engine (onnxruntime or rknn-toolkit-lite2)")
    return message


@dataclass
class BoardSession:
    """One configuration's runs of the on-device runner: builds commands, runs them, pulls results."""

    transport: Transport
    run: RunConfig
    deployed: Deployed
    dataset: Dataset
    where: str
    local_dir: Path
    remote_dir: str
    attempts: dict[str, int] = field(default_factory=dict)

    def command(self, mode: str, out: str, detections: str) -> list[str]:
        """Everything about the model and how to measure is in the spec file; the command says what to do."""
        d = self.deployed
        if d.kind == "cpp":   # latency and eval, both from the prepared inputs
            args = [d.runner, "--spec", d.spec, "--mode", mode, "--model", d.model, "--out", out, "--where",
                    self.where, "--inputs", d.images, "--detections", detections]
            return args + (["--lib", d.lib] if d.lib else [])
        args = ["env", f"PYTHONPATH={d.pythonpath}", self.run.board.python, d.runner, "--spec", d.spec,
                "--mode", mode, "--model", d.model, "--out", out, "--where", self.where]
        if mode == "eval":
            args += ["--images", d.images, "--detections", detections]
        elif mode in ("latency", "throughput"):
            args += ["--images", d.images]
        elif mode == "tiling" and self.run.measure.tile_source == "dataset":   # each image tiled, detections scored
            args += ["--images", d.images, "--detections", detections]
        return args   # tiling otherwise: a synthetic frame of measure.tile_frame

    def run_mode(self, mode: str) -> dict[str, Any]:
        """The complete result of one mode; at most two attempts, each from scratch."""
        failures: list[str] = []
        for attempt in (1, 2):
            self.attempts[mode] = attempt
            try:
                return self._attempt(mode, attempt)
            except _Retry as why:
                failures.append(str(why))
                log.warning("%s on %s, attempt %d: %s", mode, self.where, attempt, why)
                if attempt == 1:
                    self.transport.recover()
        raise DeviceError(f"{failures[1]} (the first attempt failed too: {failures[0]})")

    def _attempt(self, mode: str, attempt: int) -> dict[str, Any]:
        from rkbench.device.runner_io import ResultError, load_result

        out = f"{self.remote_dir}/{mode}-{attempt}.json"
        detections = f"{self.remote_dir}/{mode}-{attempt}.detections.json"
        timeout = self.run.board.timeout_s
        started = time.monotonic()
        try:
            result = self.transport.shell(self.command(mode, out, detections), timeout=timeout)
        except DeviceError as exc:
            if time.monotonic() - started >= timeout:
                raise DeviceError(f"runner {mode} did not finish within {timeout:g}s on the {self.where}: raise "
                                  "board.timeout_s or lower measure.iterations/min_seconds/frames") from exc
            raise _Retry(f"connection lost while the runner ran {mode} ({exc})") from exc
        code = result.exit_code
        if code in (126, 127) and self.deployed.kind == "cpp":
            raise DeviceError(f"the C++ runner cannot start on the {self.where} (exit {code}): it needs glibc >= 2.17 "
                              f"(Android boards are not a target yet): use runner=python there")
        if code == 127:
            raise DeviceError(f"{self.run.board.python} (or env) not found on the {self.where}: install python3 "
                              "there or set board.python=/path/to/python3")
        if code >= SIGNAL_EXIT:
            raise _Retry(f"runner {mode} was killed on the {self.where} (signal {code - SIGNAL_EXIT}): look for the "
                         "OOM killer in the board's dmesg, free memory there or lower measure.workers")
        if code != 0:
            raise DeviceError(f"runner {mode} failed on the {self.where} (exit {code}): {_runner_message(result.output)}")
        local = self.local_dir / f"{mode}.json"
        try:
            self.transport.pull(out, local)
            loaded = load_result(str(local))
            if mode == "eval" or (mode == "tiling" and loaded["tiling"].get("detections_file")):
                self.transport.pull(detections, self.local_dir / f"{mode}.detections.json")
        except (DeviceError, ResultError) as exc:
            raise _Retry(f"result of runner {mode} unusable: {exc}") from exc
        return loaded

    def cleanup(self) -> None:
        try:
            self.transport.shell(["rm", "-rf", self.remote_dir], timeout=60)
        except DeviceError as exc:   # results are already here; a stale folder on the board is harmless
            log.warning("could not remove %s on the board: %s", self.remote_dir, exc)
