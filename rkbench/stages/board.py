"""Stage: measure on a Rockchip board over adb, or on the emulated board that speaks the same protocol.

    probe (doctor facts, tagged on the run; blocking findings stop here with their fix)
    -> deploy (content-addressed: model, runner bundle, images, images list; what is there is skipped)
    -> one runner call per measure mode (latency, eval, throughput, tiling): result pulled, checked
       complete, logged at once through `record`, so a later failure loses nothing already measured
    -> optional PC-side rknn-toolkit2 eval_perf / eval_memory (real boards only)

Retries: a mode whose connection dropped, whose runner was killed by a signal, or whose result came back
missing or incomplete runs once more, from scratch, into a new result file (a measurement is never
stitched from two runs). A timeout, or an error the runner reported itself, is not retried. Every failure
is a DeviceError naming the fix; the pipeline turns it into a FAILED run and the sweep goes on."""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
import posixpath
import re
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from rkbench.config import NPU_CORES, RunConfig
from rkbench.data.datasets import Dataset
from rkbench.device.deploy import cache_path, deploy_with_report
from rkbench.device.doctor import BoardFacts, Finding, check, host_toolkit_version, probe
from rkbench.device.transport import AdbTransport, Transport
from rkbench.errors import DeviceError
from rkbench.stages import Artifact
from rkbench.models.detect import InferenceSpec
from rkbench.stages.evaluate import score

log = logging.getLogger("rkbench.board")

Attach = Callable[[Path, str], None]
Record = Callable[[dict[str, float], dict[str, str]], None]

STATS = ("p50", "p90", "p99", "mean", "std", "min", "cv")
PARTS = ("pre", "infer", "post", "total")
# Characters of board paths per `sha256sum` round trip during deploy: keeps one adb shell command under
# the 4 KiB that old adbd versions accept for a service request.
COMMAND_BUDGET = 3000
SIGNAL_EXIT = 128            # sh reports a process killed by signal N as 128 + N

# One adb transport per board per process: deploy remembers what it placed per transport object, so a
# sweep checks and pushes each file once.
_TRANSPORTS: dict[tuple, Transport] = {}


def connect(run: RunConfig) -> Transport:
    b = run.board
    key = (b.serial, b.address, b.adb_host, b.adb_port)
    if key not in _TRANSPORTS:
        _TRANSPORTS[key] = AdbTransport(b.serial, b.address, b.adb_host, b.adb_port)
    return _TRANSPORTS[key]


# ------------------------------------------------------------------------------------------------ probe

def blocking_findings(facts: BoardFacts, findings: list[Finding], runtime: str) -> list[Finding]:
    """What stops a run with this runtime. ONNX Runtime on the board's CPU does not touch the NPU stack,
    so SoC, librknnrt and toolkit versions only matter for rknnlite."""
    if runtime == "rknnlite":
        found = [f for f in findings if f.level == "error"]
        if facts.python is not None and facts.toolkit_lite2 is None:
            found.append(Finding("error", "rknn-toolkit-lite2 is not installed for the board's python3",
                                 "pip install the rknn_toolkit_lite2 wheel on the board, or set board.runtime=onnxruntime"))
        return found
    if facts.python is None:
        return [Finding("error", "no python3 on the board", "install python3 there or set board.python=/path/to/python3")]
    if facts.onnxruntime is None:
        return [Finding("error", "onnxruntime is not installed for the board's python3",
                        "pip install onnxruntime on the board, or set board.runtime=rknnlite")]
    return []


def inspect_board(transport: Transport, run: RunConfig) -> tuple[BoardFacts, dict[str, str]]:
    facts = probe(transport, host_toolkit_version(), remote_root=run.board.remote_root)
    findings = check(facts, expected_soc=run.platform)
    where = "emulator" if facts.emulated else "board"
    tags = dict(facts.as_tags(), **{"rkbench.device_kind": where, "rkbench.runtime": run.board.runtime})
    if findings:
        tags["board.findings"] = "; ".join(f"{f.level}: {f.what}" for f in findings)
    blocking = blocking_findings(facts, findings, run.board.runtime)
    if blocking:
        raise DeviceError(f"{transport.describe()} cannot run board.runtime={run.board.runtime}: "
                          + "; ".join(f"{f.what} (fix: {f.fix})" for f in blocking))
    return facts, tags


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
    pythonpath: str            # board dirs of the modules the runner imports flat
    images: str                # images list: image_id<TAB>path relative to the list
    spec: str                  # the run's spec file: inference spec + measure settings
    pushed: int = 0
    skipped: int = 0
    pushed_bytes: int = 0
    seconds: float = 0.0


def spec_file(run: RunConfig, spec: InferenceSpec) -> str:
    """What the runner reads: the inference spec (the same object the host evaluates with) and how to measure."""
    m = run.measure
    width, height = m.tile_frame
    measure = {"warmup": m.warmup, "iterations": m.iterations, "min_seconds": m.min_seconds, "frames": m.frames,
               "cores": ",".join(worker_masks(run)), "frame_size": f"{width}x{height}", "overlap": m.tile_overlap}
    return json.dumps({"inference": spec.to_dict(), "measure": measure}, indent=1, sort_keys=True)


def deploy_inputs(transport: Transport, run: RunConfig, model: Path, spec: InferenceSpec, dataset: Dataset,
                  work: Path) -> Deployed:
    root = run.board.remote_root
    t0 = time.perf_counter()
    files: dict[str, Path] = {"model": model, **bundle_files(),
                              "spec": write_local(work, "spec.json", spec_file(run, spec))}
    images = {f"image{rec.id}": rec.path for rec in dataset.images}
    groups = [files] + path_groups(images, root)
    paths: dict[str, str] = {}
    pushed: list[str] = []
    skipped: list[str] = []
    local = dict(files, **images)

    def place(group: dict[str, Path]) -> None:
        report = deploy_with_report(transport, group, root)
        paths.update(report.paths)
        pushed.extend(report.pushed)
        skipped.extend(report.skipped)

    for group in groups:
        place(group)
    listing = "".join(f"{rec.id}\t{image_ref(root, paths[f'image{rec.id}'])}\n" for rec in dataset.images)
    local["images"] = write_local(work, "images.txt", listing)
    place({"images": local["images"]})
    return Deployed(model=paths["model"], runner=paths["runner"],
                    pythonpath=":".join(dict.fromkeys(posixpath.dirname(p) for k, p in paths.items()
                                                      if k in bundle_files() and k != "runner")),
                    images=paths["images"], spec=paths["spec"], pushed=len(pushed), skipped=len(skipped),
                    pushed_bytes=sum(local[n].stat().st_size for n in pushed), seconds=time.perf_counter() - t0)


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
        args = ["env", f"PYTHONPATH={d.pythonpath}", self.run.board.python, d.runner, "--spec", d.spec,
                "--mode", mode, "--model", d.model, "--out", out, "--where", self.where]
        if mode == "eval":
            args += ["--images", d.images, "--detections", detections]
        elif mode in ("latency", "throughput"):
            args += ["--images", d.images]
        return args   # tiling: a synthetic frame of measure.tile_frame

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
            if mode == "eval":
                self.transport.pull(detections, self.local_dir / "eval.detections.json")
        except (DeviceError, ResultError) as exc:
            raise _Retry(f"result of runner {mode} unusable: {exc}") from exc
        return loaded

    def cleanup(self) -> None:
        try:
            self.transport.shell(["rm", "-rf", self.remote_dir], timeout=60)
        except DeviceError as exc:   # results are already here; a stale folder on the board is harmless
            log.warning("could not remove %s on the board: %s", self.remote_dir, exc)


# ----------------------------------------------------------------------------------------------- metrics

def _system_metrics(result: dict[str, Any], mode: str, where: str) -> dict[str, float]:
    system = result.get("system") or {}
    out: dict[str, float] = {}
    prefix = f"system/{where}_{mode}"
    npu = system.get("npu_load") or {}
    if npu.get("available"):
        cores = npu["per_core"]
        for core, stats in cores.items():
            out[f"{prefix}_npu{core}_load_pct"] = stats["mean_pct"]
        out[f"{prefix}_npu_load_pct"] = sum(s["mean_pct"] for s in cores.values()) / len(cores)
    cpu = system.get("cpu_load") or {}
    if cpu.get("available"):
        out[f"{prefix}_cpu_load_pct"] = cpu["mean_pct"]
    peak = (system.get("memory") or {}).get("peak_rss_mib")
    if peak is not None:
        out[f"{prefix}_peak_rss_mib"] = peak
    return out


def _part_metrics(section: dict[str, Any], prefix: str) -> dict[str, float]:
    return {f"{prefix}_{part}_ms_{k}": float(section[part][k]) for part in PARTS for k in STATS if k in section[part]}


def mode_metrics(mode: str, result: dict[str, Any], where: str) -> dict[str, float]:
    """Metrics of one timing mode's result (eval is scored separately)."""
    out: dict[str, float] = {}
    if mode == "latency":
        lat = result["latency"]
        out.update(_part_metrics(lat, f"latency/{where}_py"))
        out[f"throughput/{where}_single_fps"] = float(lat["fps"])
    elif mode == "throughput":
        tp = result["throughput"]
        out[f"throughput/{where}_fps"] = float(tp["fps"])
        out[f"throughput/{where}_workers"] = float(len(tp["workers"]))
        for k in ("p50", "p90"):
            out[f"throughput/{where}_frame_ms_{k}"] = float(tp["frame_latency_ms"][k])
        share: dict[str, float] = {}
        for worker in tp["workers"]:
            share[worker["core_mask"]] = share.get(worker["core_mask"], 0.0) + float(worker["share"])
        out.update({f"throughput/{where}_share_core{mask}": s for mask, s in share.items()})
    elif mode == "tiling":
        tl = result["tiling"]
        out[f"tiling/{where}_fps"] = float(tl["fps"])
        out["tiling/tiles_per_frame"] = float(tl["tiles_per_frame"])
        out.update({k: v for k, v in _part_metrics(tl, f"tiling/{where}_py").items() if k.endswith(("_p50", "_mean"))})
    out.update(_system_metrics(result, mode, where))
    return out


def describe_mode(mode: str, result: dict[str, Any], run: RunConfig) -> str:
    """One clause of the rkbench.measure tag: how this mode measured."""
    m = run.measure
    if mode == "latency":
        lat = result["latency"]
        return (f"latency: {lat['warmup']} warmup + {lat['iterations']} timed iterations of batch {lat['batch']} in "
                f"{lat['timed_s']:.2f} s (asked >= {m.iterations} and >= {m.min_seconds:g} s), pre/infer/post timed "
                f"apart, {lat['source']}")
    if mode == "eval":
        ev = result["eval"]
        return f"eval: {ev['images']} images in batches of {ev['batch']}, {ev['detections']} detections"
    if mode == "throughput":
        tp = result["throughput"]
        masks = ",".join(w["core_mask"] for w in tp["workers"])
        return (f"throughput: {len(tp['workers'])} workers (core masks {masks}), {tp['frames']} frames in "
                f"{tp['wall_s']:.2f} s, {tp['warmup_per_worker']} warmup per worker, in order={tp['in_order']}")
    tl = result["tiling"]
    return (f"tiling: {tl['frame'][0]}x{tl['frame'][1]} frame in {tl['tiles_per_frame']} tiles of {tl['tile']} px "
            f"(overlap {tl['overlap']:g}), {tl['warmup']} warmup + {tl['frames']} frames")


def describe_runner(result: dict[str, Any], where: str) -> str:
    v = result.get("versions") or {}
    runtime = (result.get("runtime") or {}).get("version", "?")
    note = "; ONNX Runtime on the host CPU, not NPU latency" if where == "emulator" else ""
    return (f"{where}: {runtime} via runner {v.get('runner', '?')} on Python {v.get('python', '?')} "
            f"(numpy {v.get('numpy', '?')}, opencv {v.get('opencv', '?')}){note}")


# ----------------------------------------------------------------------------------- PC-side toolkit perf

_LAYER_HEADER = re.compile(r"^\s*ID\s+OpType\b")
_TOTAL_US = re.compile(r"Total Operator Elapsed (?:Per Frame )?Time\(us\)\s*:\s*([\d.]+)")


def perf_rows(perf: Any) -> list[dict[str, str]]:
    """Per-layer rows of eval_perf's result: the printed layer table (ID OpType ... FullName), or the first
    list of per-layer dicts in a dict result."""
    if isinstance(perf, dict):
        for value in perf.values():
            items = value if isinstance(value, list) else list(value.values()) if isinstance(value, dict) else []
            if items and all(isinstance(i, dict) for i in items):
                return [{str(k): str(v) for k, v in i.items()} for i in items]
        return []
    rows: list[dict[str, str]] = []
    columns: Optional[list[str]] = None
    for line in str(perf or "").splitlines():
        if columns is None:
            if _LAYER_HEADER.match(line):
                columns = line.split()
            continue
        parts = line.split()
        if not parts or not parts[0].isdigit():
            if rows:
                break                      # the table ends at its closing rule
            continue
        head = parts[:len(columns) - 1]
        rows.append(dict(zip(columns, head + [" ".join(parts[len(columns) - 1:])])))
    return rows


def perf_total_ms(perf: Any, rows: list[dict[str, str]]) -> Optional[float]:
    """Total per-frame operator time: the printed total, else the sum of the layers' Time(us)."""
    match = _TOTAL_US.search(perf if isinstance(perf, str) else json.dumps(perf, default=str))
    if match:
        return float(match.group(1)) / 1e3
    times = [r.get("Time(us)", "") for r in rows]
    if times and all(re.fullmatch(r"[\d.]+", t) for t in times):
        return sum(float(t) for t in times) / 1e3
    return None


def memory_metrics(detail: Any) -> dict[str, float]:
    """eval_memory's byte counts (rknn-toolkit2 2.x keys) -> memory/{weight,internal,other,total}_mib."""
    if not isinstance(detail, dict):
        return {}
    weight, internal, total = (detail.get(k) for k in ("total_weight_allocation", "total_internal_allocation",
                                                         "total_model_allocation"))
    out = {name: float(v) / 2**20 for name, v in (("memory/weight_mib", weight), ("memory/internal_mib", internal),
                                                  ("memory/total_mib", total)) if isinstance(v, (int, float))}
    if len(out) == 3:
        out["memory/other_mib"] = out["memory/total_mib"] - out["memory/weight_mib"] - out["memory/internal_mib"]
    return out


def _eval_perf(rknn: Any, dmc: bool) -> tuple[Any, bool]:
    """eval_perf with frequencies fixed; where that fails on a board without /sys/class/devfreq/dmc (the
    toolkit reads dmc/cur_freq to fix them), again without. Returns (result, frequencies fixed)."""
    try:
        perf = rknn.eval_perf(is_print=False, fix_freq=True)
        error = "" if perf is not None else "returned nothing"
    except Exception as exc:  # noqa: BLE001 - the toolkit raises bare Exceptions from its board link
        perf, error = None, f"{type(exc).__name__}: {exc}"
    if perf is not None:
        return perf, True
    if dmc and "dmc" not in error and "cur_freq" not in error:
        raise DeviceError(f"rknn-toolkit2 eval_perf failed ({error}): check rknn_server runs on the board and "
                          "matches librknnrt (`python -m rkbench doctor`)")
    log.warning("eval_perf with fix_freq=True failed (%s); the board has no dmc devfreq node: again with fix_freq=False", error)
    try:
        perf = rknn.eval_perf(is_print=False, fix_freq=False)
    except Exception as exc:  # noqa: BLE001
        raise DeviceError(f"rknn-toolkit2 eval_perf failed even with fix_freq=False ({type(exc).__name__}: {exc}): "
                          "check rknn_server on the board (`python -m rkbench doctor`)") from exc
    if perf is None:
        raise DeviceError("rknn-toolkit2 eval_perf returned nothing with fix_freq=False: check rknn_server on the board")
    return perf, False


def toolkit_perf(rknn_path: Path, platform: str, device_id: str, dmc: bool, out_dir: Path,
                 make_rknn: Optional[Callable[[], Any]] = None) -> tuple[dict[str, float], dict[str, str], list[Path]]:
    """PC-side per-layer times and memory through rknn-toolkit2's connected-board mode (rknn_server on the
    board). Returns (metrics, tags, files to attach)."""
    if make_rknn is None:
        from rknn.api import RKNN
        make_rknn = RKNN
    rknn = make_rknn()
    try:
        if rknn.load_rknn(str(rknn_path)) != 0:
            raise DeviceError(f"rknn-toolkit2 could not load {rknn_path}: convert it again with this toolkit")
        if rknn.init_runtime(target=platform, device_id=device_id, perf_debug=True, eval_mem=True) != 0:
            raise DeviceError(f"rknn-toolkit2 init_runtime(target={platform}, device_id={device_id}) failed: start "
                              "rknn_server on the board (same release as librknnrt; `python -m rkbench doctor`)")
        perf, fixed = _eval_perf(rknn, dmc)
        try:
            memory = rknn.eval_memory(is_print=False)
        except Exception as exc:  # noqa: BLE001
            raise DeviceError(f"rknn-toolkit2 eval_memory failed ({type(exc).__name__}: {exc}): check rknn_server "
                              "on the board (`python -m rkbench doctor`)") from exc
    finally:
        rknn.release()
    out_dir.mkdir(parents=True, exist_ok=True)
    raw = out_dir / "eval_perf.txt"
    raw.write_text(perf if isinstance(perf, str) else json.dumps(perf, indent=1, default=str))
    files = [raw]
    rows = perf_rows(perf)
    metrics = memory_metrics(memory)
    if rows:
        table = out_dir / "eval_perf_layers.csv"
        columns = list(dict.fromkeys(k for r in rows for k in r))
        with table.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=columns)
            writer.writeheader()
            writer.writerows(rows)
        files.append(table)
        metrics["perf/board_layers"] = float(len(rows))
    total = perf_total_ms(perf, rows)
    if total is not None:
        metrics["perf/board_layers_total_ms"] = total
    tags = {"rkbench.toolkit_perf": "eval_perf (perf_debug: per-layer times, slower than a normal run) and "
                                    "eval_memory through rknn-toolkit2 and rknn_server",
            "rkbench.toolkit_perf.fix_freq": "true" if fixed else
            "false: the board has no /sys/class/devfreq/dmc/cur_freq, frequencies were not fixed"}
    if not memory_metrics(memory):
        tags["rkbench.toolkit_memory"] = json.dumps(memory, default=str)[:4000]
    return metrics, tags, files


# ------------------------------------------------------------------------------------------------ the stage

def run_on_board(run: RunConfig, onnx: Artifact, rknn_art: Optional[Artifact], dataset: Dataset,
                 cache_root: Path, attach: Attach, record: Record) -> tuple[dict[str, float], dict[str, str]]:
    """Probe, deploy and measure one configuration on the board (see the module docstring). `rknn_art` is
    None where the board runs the ONNX and no toolkit perf was asked for."""
    from rkbench.spec import inference_spec

    transport = connect(run)
    facts, tags = inspect_board(transport, run)
    where = tags["rkbench.device_kind"]
    record({}, tags)
    metrics: dict[str, float] = {}

    model = rknn_art.path if run.board.runtime == "rknnlite" else onnx.path
    spec = inference_spec(run, onnx.info, dataset, run.board.runtime)
    deployed = deploy_inputs(transport, run, model, spec, dataset, cache_root / "board" / "inputs")
    deploy_metrics = {"deploy/pushed": float(deployed.pushed), "deploy/skipped": float(deployed.skipped),
                      "deploy/pushed_mib": deployed.pushed_bytes / 2**20, "deploy/seconds": deployed.seconds}
    metrics.update(deploy_metrics)
    record(deploy_metrics, {})

    token = f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}-{secrets.token_hex(3)}"
    session = BoardSession(transport, run, deployed, dataset, where,
                           local_dir=cache_root / "board" / "results" / token,
                           remote_dir=posixpath.join(run.board.remote_root, "results", token))
    session.local_dir.mkdir(parents=True, exist_ok=True)
    mkdir = transport.shell(["mkdir", "-p", session.remote_dir], timeout=60)
    if not mkdir.ok:
        raise DeviceError(f"cannot create {session.remote_dir} on the {where}: {mkdir.output.strip()[:200]}; "
                          "set board.remote_root to a writable directory such as /data/local/tmp/rkbench")

    how: list[str] = []
    for mode in run.measure.modes:
        result = session.run_mode(mode)
        attach(session.local_dir / f"{mode}.json", "board")
        if mode == "eval":
            detections_file = session.local_dir / "eval.detections.json"
            found = score(dataset, json.loads(detections_file.read_text()), run.eval, "eval")
            attach(detections_file, "detections")
        else:
            found = mode_metrics(mode, result, where)
        if not how:
            how.append(describe_runner(result, where))
        retried = " (second attempt)" if session.attempts[mode] > 1 else ""
        how.append(describe_mode(mode, result, run) + retried)
        metrics.update(found)
        tags["rkbench.measure"] = " | ".join(how)
        record(found, {"rkbench.measure": tags["rkbench.measure"]})
    session.cleanup()

    if run.measure.toolkit_perf and rknn_art is not None:
        if where == "emulator":
            tags["rkbench.toolkit_perf"] = "skipped: the emulated board has no NPU and no rknn_server"
        else:
            found, perf_tags, files = toolkit_perf(rknn_art.path, run.platform, getattr(transport, "serial", ""),
                                                   facts.dmc, session.local_dir / "toolkit_perf")
            for path in files:
                attach(path, "perf")
            metrics.update(found)
            tags.update(perf_tags)
            record(found, perf_tags)
    return metrics, tags
