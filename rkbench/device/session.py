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
from rkbench.device import shell_sampler
from rkbench.device.deploy import cache_path, deploy_with_report
from rkbench.device.transport import ShellResult, Transport, wait_for_link
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
        measure["pass_through"] = bool(m.cpp_pass_through)
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
    replay stand-in librknnrt and the ONNX Runtime outputs of exactly those tensors (per batch, and of
    their pass-through bytes with measure.cpp_pass_through), which it serves."""
    from rkbench import cpp

    try:
        binary = cpp.build(arch, Path(run.cache_dir))
        standin = cpp.build_standin(arch, Path(run.cache_dir)) if replay_onnx else None
    except cpp.BuildError as exc:
        raise DeviceError(f"cannot build the C++ runner: {exc}") from exc
    listing = "".join(f"{rec.id}\t{rec.path}\n" for rec in dataset.images)
    channels = len(spec.mean)   # 1: a gray model takes gray tensors (the Detector's to_gray after the letterbox)
    folder = work / "cpp" / hashlib.sha256(f"{spec.input_size}\n{channels}\n{listing}".encode()).hexdigest()[:16]
    inputs, tensors = cpp.prepare_inputs(folder, [(rec.id, str(rec.path)) for rec in dataset.images], spec.input_size,
                                         channels)

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
        # what the runner will hand over: batches of spec.batch, and their pass-through tensors when asked for
        through = bool(run.measure.cpp_pass_through)
        description = cpp.write_replay(folder / f"replay-b{spec.batch}{'-pt' if through else ''}", replay_onnx, tensors,
                                       spec.mean, spec.std, batch=spec.batch, pass_through=through)
        records = {f"record{p.stem}": p for p in sorted(description.parent.glob("*.out"))}
        placing.place({"standin": standin, **records})
        text = description.read_text() + "".join(f"record {name[6:]} {placing.ref(name)}\n" for name in records)
        placing.place({"replay": write_local(work, cpp.REPLAY_MODEL, text)})
        fields.update(model=placing.paths["replay"], lib=placing.paths["standin"])
    return placing.deployed(**fields)


# ------------------------------------------------------------------------------------ runner processes
# adbd (and sshd) signal only the shell when a stream closes (timeout, lost link, Ctrl-C): a runner started
# by that shell is orphaned and keeps the NPU busy. So the runner (Python or C++) runs in its own session
# and process group (setsid; not forked again, as the shell's background child is no group leader), its pid
# is in <remote_root>/run/<name>.pid while it runs, and the host kills that group itself (kill_runners).
RUN_DIR = "run"
# The C++ runner's launch also samples the board beside it (shell_sampler.py: $2 the samples file, then the
# loop's interval, NPU load file and clock sources); the launcher waits for the loop, so the file is complete.
_LAUNCH = shell_sampler.SAMPLE_LOOP + r"""
command -v setsid >/dev/null 2>&1 || { echo "runner: error: setsid not found on the board: install util-linux (or a busybox/toybox with setsid)"; exit 125; }
f=$1; samples=$2; shift 2
if [ -n "$samples" ]; then every=$1; npu=$2; src=$3; shift 3; fi
mkdir -p "${f%/*}" || exit 125
setsid "$@" &
pid=$!
echo "$pid" > "$f"
if [ -n "$samples" ]; then sample "$pid" "$every" "$npu" "$src" > "$samples" 2>/dev/null & spid=$!; fi
wait "$pid"
code=$?
rm -f "$f"
if [ -n "$samples" ]; then wait "$spid"; fi
exit "$code"
"""
# Kills the group of every pid file in $1 whose process is ours: its command line names $2 (remote_root),
# so a pid reused after a reboot is left alone. A group whose leader is gone still gets the signal: Linux
# does not hand out a pid that is still some group's id, so that group is ours.
_KILL = r"""
for f in "$1"/*.pid; do
  [ -f "$f" ] || continue
  pid=$(cat "$f"); rm -f "$f"
  case "$pid" in ""|*[!0-9]*) continue;; esac
  if [ -r "/proc/$pid/cmdline" ] && ! tr '\0' ' ' < "/proc/$pid/cmdline" | grep -qF -- "$2"; then continue; fi
  { kill -9 "-$pid" 2>/dev/null || kill -9 "$pid" 2>/dev/null; } && echo "killed $pid"
done
true
"""


def launched(args: list[str], pidfile: str, samples: str = "",
             plan: Optional[shell_sampler.ShellSampling] = None) -> list[str]:
    """`args` run in their own process group with their pid in `pidfile` while they run; exit status kept.
    With `samples` and `plan`, the launcher's sh loop samples the board into the file `samples` meanwhile."""
    sampled = [samples, *plan.args()] if samples and plan else [""]
    return ["sh", "-c", _LAUNCH, "sh", pidfile, *sampled, *args]


def kill_runners(transport: Transport, remote_root: str, why: str) -> list[int]:
    """Kill every runner rkbench started under remote_root that still runs (the whole process group);
    returns their pids. Cheap when none is left: one shell round trip."""
    result = transport.shell(["sh", "-c", _KILL, "sh", posixpath.join(remote_root, RUN_DIR), remote_root], timeout=30)
    pids = [int(line.split()[1]) for line in result.output.splitlines() if line.startswith("killed ")]
    if pids:
        log.warning("killed runner process group(s) %s on %s (%s)", ", ".join(map(str, pids)), transport.describe(), why)
    return pids


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
    logs: dict[str, str] = field(default_factory=dict)      # mode -> the runner's stdout and stderr (last attempt)
    sampling: Optional[shell_sampler.ShellSampling] = None   # the C++ runner's: sampled by its launcher

    def command(self, mode: str, out: str, detections: str) -> list[str]:
        """Everything about the model and how to measure is in the spec file; the command says what to do."""
        d = self.deployed
        if d.kind == "cpp":   # latency, eval and throughput, all from the prepared inputs
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
                if attempt == 1:   # the link may be back; the first runner may still run there (orphaned)
                    wait_for_link(self.transport, self.run.board.reconnect_s)
                    kill_runners(self.transport, self.run.board.remote_root, f"{mode} lost its link")
        raise DeviceError(f"{failures[1]} (the first attempt failed too: {failures[0]})")

    def _runner(self, mode: str, attempt: int, out: str, detections: str) -> ShellResult:
        """One runner call; on a timeout or Ctrl-C its process group is killed on the board before this returns."""
        pidfile = posixpath.join(self.run.board.remote_root, RUN_DIR, f"{posixpath.basename(self.remote_dir)}-{mode}-{attempt}.pid")
        timeout = self.run.board.timeout_s
        started = time.monotonic()
        try:
            return self.transport.shell(launched(self.command(mode, out, detections), pidfile, self._samples(out),
                                                 self.sampling), timeout=timeout)
        except KeyboardInterrupt:
            self._kill_quietly(f"Ctrl-C during {mode}")
            raise
        except DeviceError as exc:
            if time.monotonic() - started >= timeout:
                self._kill_quietly(f"{mode} timed out")
                raise DeviceError(f"runner {mode} did not finish within {timeout:g}s on the {self.where} (its process "
                                  "group was killed there): raise board.timeout_s or lower "
                                  "measure.iterations/min_seconds/frames") from exc
            raise _Retry(f"connection lost while the runner ran {mode} ({exc})") from exc

    def _samples(self, out: str) -> str:
        """The board file the launcher's sampling loop writes for the result `out` ("" without sampling)."""
        return out[:-len(".json")] + ".samples" if self.sampling else ""

    def _kill_quietly(self, why: str) -> None:
        try:
            kill_runners(self.transport, self.run.board.remote_root, why)
        except DeviceError as exc:   # the link is gone too: the next configuration kills it on reconnect
            log.warning("could not kill the runner on the %s (%s): %s; it is killed before the next configuration",
                        self.where, why, exc)

    def _attempt(self, mode: str, attempt: int) -> dict[str, Any]:
        from rkbench.device.runner_io import ResultError, load_result

        out = f"{self.remote_dir}/{mode}-{attempt}.json"
        detections = f"{self.remote_dir}/{mode}-{attempt}.detections.json"
        result = self._runner(mode, attempt, out, detections)
        self.logs[mode] = result.output
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
            if self.sampling:   # the C++ runner's system section, from its launcher's samples
                samples = self.local_dir / f"{mode}.samples"
                self.transport.pull(self._samples(out), samples)
                loaded["system"] = shell_sampler.parse_samples(samples.read_text(), self.sampling,
                                                               posixpath.basename(self.deployed.runner))
                local.write_text(json.dumps(loaded, indent=1))   # the result artifact carries it too
        except (DeviceError, ResultError) as exc:
            raise _Retry(f"result of runner {mode} unusable: {exc}") from exc
        return loaded

    def cleanup(self) -> None:
        try:
            self.transport.shell(["rm", "-rf", self.remote_dir], timeout=60)
        except DeviceError as exc:   # results are already here; a stale folder on the board is harmless
            log.warning("could not remove %s on the board: %s", self.remote_dir, exc)
