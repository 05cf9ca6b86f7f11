"""Stage: measure on a Rockchip board over adb, or on the emulated board that speaks the same protocol.

    probe (doctor facts, tagged on the run; blocking findings stop here with their fix)
    -> deploy (content-addressed: model, runner bundle, images, images list; what is there is skipped;
       runner=cpp: the C++ runner built for the board's machine, the .rknn, tensors letterboxed on the host,
       and on the emulated board the replay stand-in librknnrt with the ONNX Runtime outputs it serves)
    -> one runner call per measure mode (latency, eval, throughput, tiling; the C++ runner: latency, eval):
       result pulled, checked complete, logged at once through `record`, so a later failure loses nothing
       already measured
    -> optional PC-side rknn-toolkit2 eval_perf / eval_memory (real boards only)

Retries: a mode whose connection dropped, whose runner was killed by a signal, or whose result came back
missing or incomplete runs once more, from scratch, into a new result file (a measurement is never
stitched from two runs). A timeout, or an error the runner reported itself, is not retried. Every failure
is a DeviceError naming the fix; the pipeline turns it into a FAILED run and the sweep goes on."""


from __future__ import annotations

import dataclasses
import json
import logging
import os
import posixpath
import secrets
import time
from pathlib import Path
from typing import Any, Callable, Optional

from rkbench import metrics as M
from rkbench.config import RunConfig
from rkbench.data.datasets import Dataset
from rkbench.device.adb import AdbTransport
from rkbench.device.doctor import BoardFacts, Finding, check, host_toolkit_version, probe
from rkbench.device.session import BoardSession, cpp_arch, deploy_cpp, deploy_inputs
from rkbench.device.toolkit_perf import toolkit_perf
from rkbench.device.transport import Transport
from rkbench.errors import DeviceError
from rkbench.stages import Artifact
from rkbench.stages.evaluate import score

log = logging.getLogger("rkbench.board")

Attach = Callable[[Path, str], None]
Record = Callable[[dict[str, float], dict[str, str]], None]

# the timed parts of each runner's latency loop: `latency/<where>_<runner>_<part>_ms_<stat>`
PARTS = {"py": ("pre", "infer", "post", "total"), "cpp": ("inputs_set", "run", "outputs_get", "total"),
         # measure.cpp_zero_copy: the input copied into io memory, the outputs read out of it
         "cpp_zero_copy": ("input_copy", "run", "output_read", "total")}
CPP_MODES = ("latency", "eval")
CPP_REPLAY = "replay stand-in (ONNX Runtime outputs recorded on the host for these input bytes), not librknnrt"

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
    so SoC, librknnrt and toolkit versions only matter for rknnlite and the C++ runner (runtime "cpp"), which
    needs no Python; on the emulated board the C++ runner loads the replay stand-in, not the board's librknnrt."""
    if runtime == "cpp":
        return [] if facts.emulated else [f for f in findings if f.level == "error" and "python3" not in f.what]
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
    runtime = "librknnrt" if run.runner == "cpp" else run.board.runtime
    tags = dict(facts.as_tags(), **{"rkbench.device_kind": where, "rkbench.runtime": runtime,
                                    "rkbench.runner": run.runner})
    if run.runner == "cpp":
        tags["rkbench.cpp_engine"] = (CPP_REPLAY if facts.emulated else
                                      f"librknnrt {facts.librknnrt_build or '(version unknown)'} from the loader's path")
    if findings:
        tags["board.findings"] = "; ".join(f"{f.level}: {f.what}" for f in findings)
    setting = "runner=cpp" if run.runner == "cpp" else f"board.runtime={run.board.runtime}"
    blocking = blocking_findings(facts, findings, "cpp" if run.runner == "cpp" else run.board.runtime)
    if blocking:
        raise DeviceError(f"{transport.describe()} cannot run {setting}: "
                          + "; ".join(f"{f.what} (fix: {f.fix})" for f in blocking))
    return facts, tags


# ----------------------------------------------------------------------------------------------- metrics

def _system_metrics(result: dict[str, Any], mode: str, where: str) -> dict[str, float]:
    system = result.get("system") or {}
    out: dict[str, float] = {}
    npu = system.get("npu_load") or {}
    if npu.get("available"):
        cores = npu["per_core"]
        for core, stats in cores.items():
            out[M.system(where, mode, f"npu{core}_load_pct")] = stats["mean_pct"]
        out[M.system(where, mode, "npu_load_pct")] = sum(s["mean_pct"] for s in cores.values()) / len(cores)
    cpu = system.get("cpu_load") or {}
    if cpu.get("available"):
        out[M.system(where, mode, "cpu_load_pct")] = cpu["mean_pct"]
    peak = (system.get("memory") or {}).get("peak_rss_mib")
    if peak is not None:
        out[M.system(where, mode, "peak_rss_mib")] = peak
    return out


def _part_metrics(section: dict[str, Any], where: str, group: str = "latency", runner: str = "py",
                  parts: str = "") -> dict[str, float]:
    """The runner's per-part timings as `<group>/<where>_<runner>_<part>_ms_<stat>` (PARTS[parts or runner])."""
    out: dict[str, float] = {}
    for part in PARTS[parts or runner]:
        named = M.latency_stats(where, f"{runner}_{part}", section[part])
        out.update({f"{group}/{k.split('/', 1)[1]}": v for k, v in named.items()})
    return out


def mode_metrics(mode: str, result: dict[str, Any], where: str) -> dict[str, float]:
    """Metrics of one timing mode's result (eval is scored separately)."""
    out: dict[str, float] = {}
    if mode == "latency" and runner_of(result) == "cpp":
        lat = result["latency"]
        out.update(_part_metrics(lat, where, runner="cpp", parts=parts_of(result)))
        out[f"throughput/{where}_cpp_fps"] = float(lat["fps"])
        out[f"latency/{where}_cpp_init_ms"] = float(lat["init"]["ms"])   # rknn_init + queries, once per run
    elif mode == "latency":
        lat = result["latency"]
        out.update(_part_metrics(lat, where))
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
        out.update({k: v for k, v in _part_metrics(tl, where, "tiling").items() if k.endswith(("_p50", "_mean"))})
    out.update(_system_metrics(result, mode, where))
    return out


def describe_mode(mode: str, result: dict[str, Any], run: RunConfig) -> str:
    """One clause of the rkbench.measure tag: how this mode measured."""
    m = run.measure
    if mode == "latency":
        lat = result["latency"]
        parts = "/".join(p for p in PARTS[parts_of(result)] if p != "total")
        return (f"latency: {lat['warmup']} warmup + {lat['iterations']} timed iterations of batch {lat['batch']} in "
                f"{lat['timed_s']:.2f} s (asked >= {m.iterations} and >= {m.min_seconds:g} s), {parts} timed "
                f"apart, {lat['source']}{_cpp_settings(result)}")
    if mode == "eval":
        ev = result["eval"]
        return (f"eval: {ev['images']} images in batches of {ev['batch']}, {ev['detections']} detections"
                f"{_cpp_settings(result)}")
    if mode == "throughput":
        tp = result["throughput"]
        masks = ",".join(w["core_mask"] for w in tp["workers"])
        runtime = result.get("runtime") or {}
        threads = (f", {runtime.get('threads') or 'default'} ONNX Runtime threads each"
                   if runtime.get("kind") == "onnxruntime" else "")
        return (f"throughput: {len(tp['workers'])} workers (core masks {masks}{threads}), {tp['frames']} frames in "
                f"{tp['wall_s']:.2f} s, {tp['warmup_per_worker']} warmup per worker, in order={tp['in_order']}")
    tl = result["tiling"]
    tiles = (f"{tl['tiles_per_frame']} tiles of a {tl['tile_grid']} grid letterboxed to {tl['tile']} px"
             if tl.get("tile_mode") == "resized" else f"{tl['tiles_per_frame']} tiles of {tl['tile']} px (overlap {tl['overlap']:g})")
    scored = f", merged detections of {tl['images']} images scored (tiling/map50_95)" if tl.get("images") else ""
    return (f"tiling: {tl['frame'][0]}x{tl['frame'][1]} frame (the last one) in {tiles}, {tl['warmup']} warmup + "
            f"{tl['frames']} frames from {tl['source']}{scored}")


def _cpp_settings(result: dict[str, Any]) -> str:
    """The C++ runner's measure settings as it reports them ("" for the Python runner)."""
    if runner_of(result) != "cpp":
        return ""
    runtime = result.get("runtime") or {}
    io = ", zero-copy io memory (rknn_create_mem + rknn_set_io_mem)" if runtime.get("zero_copy") else ""
    return f", outputs {runtime.get('outputs', '?')}{io}"


def parts_of(result: dict[str, Any]) -> str:
    """The PARTS key of a result: "py", "cpp", or "cpp_zero_copy" when the C++ runner used io memory."""
    if runner_of(result) == "cpp" and (result.get("runtime") or {}).get("zero_copy"):
        return "cpp_zero_copy"
    return runner_of(result)


def runner_of(result: dict[str, Any]) -> str:
    """"cpp" for a C++ runner result (its header says so), else "py"."""
    return "cpp" if result.get("runner") == "cpp" else "py"


def describe_runner(result: dict[str, Any], where: str) -> str:
    v = result.get("versions") or {}
    if runner_of(result) == "cpp":
        note = ("; replayed ONNX Runtime outputs recorded on the host: the stand-in's times on the host CPU, not NPU "
                "latency") if result.get("replayed") else ""
        return f"{where}: C++ runner {v.get('runner', '?')} on {v.get('librknnrt', '?')} (driver {v.get('driver', '?')}){note}"
    runtime = (result.get("runtime") or {}).get("version", "?")
    note = "; ONNX Runtime on the host CPU, not NPU latency" if where == "emulator" else ""
    return (f"{where}: {runtime} via runner {v.get('runner', '?')} on Python {v.get('python', '?')} "
            f"(numpy {v.get('numpy', '?')}, opencv {v.get('opencv', '?')}){note}")


# ------------------------------------------------------------------------------------------------ the stage

def runner_modes(run: RunConfig) -> tuple[list[str], list[str]]:
    """The measure.modes this runner does, and a one-line note for those it leaves to the Python runner: the
    C++ runner does latency and eval; the rest of a runner=python,cpp sweep still runs on the Python side."""
    if run.runner != "cpp":
        return list(run.measure.modes), []
    modes = [m for m in run.measure.modes if m in CPP_MODES]
    left = [m for m in run.measure.modes if m not in CPP_MODES]
    if not modes:
        raise DeviceError(f"measure.modes={run.measure.modes} has no mode of the C++ runner (latency, eval): add "
                          "latency or eval, or use runner=python")
    if not left:
        return modes, []
    note = f"{', '.join(left)}: not run, the C++ runner does latency and eval only (runner=python measures them)"
    log.warning(note)
    return modes, [note]


def run_on_board(run: RunConfig, onnx: Artifact, rknn_art: Optional[Artifact], dataset: Dataset,
                 cache_root: Path, attach: Attach, record: Record) -> tuple[dict[str, float], dict[str, str]]:
    """Probe, deploy and measure one configuration on the board (see the module docstring). `rknn_art` is
    None where the board runs the ONNX and no toolkit perf was asked for."""
    from rkbench.spec import inference_spec

    transport = connect(run)
    log.info("probing %s", transport.describe())
    facts, tags = inspect_board(transport, run)
    where = tags["rkbench.device_kind"]
    record({}, tags)
    metrics: dict[str, float] = {}

    modes, skipped = runner_modes(run)
    uses_rknn = run.board.runtime == "rknnlite" or run.runner == "cpp"
    model = rknn_art.path if uses_rknn else onnx.path
    spec = inference_spec(run, onnx.info, dataset, "rknnlite" if uses_rknn else run.board.runtime)
    if not uses_rknn:   # ONNX Runtime's intra-op threads per runtime (the threadpool study: one core per worker)
        spec = dataclasses.replace(spec, threads=run.measure.threads)
    log.info("deploying %s, the %s runner and %d images to the %s (files already there are skipped)", model.name,
             run.runner, len(dataset.images), where)
    work = cache_root / "board" / "inputs"
    if run.runner == "cpp":   # the emulated board has no NPU: the stand-in serves ONNX Runtime outputs of the inputs
        deployed = deploy_cpp(transport, run, model, spec, dataset, work, cpp_arch(facts.machine, where),
                              replay_onnx=onnx.path if facts.emulated else None)
    else:
        deployed = deploy_inputs(transport, run, model, spec, dataset, work)
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
    for mode in modes:
        log.info("measuring %s on the %s with the %s runner (%s)", mode, where, run.runner, tags["rkbench.runtime"])
        result = session.run_mode(mode)
        attach(session.local_dir / f"{mode}.json", "board")
        if mode == "eval":
            detections_file = session.local_dir / "eval.detections.json"
            found = score(dataset, json.loads(detections_file.read_text()), run.eval, "eval")
            attach(detections_file, "detections")
        else:
            found = mode_metrics(mode, result, where)
        if mode == "tiling" and result["tiling"].get("detections_file"):   # each image tiled: mAP of the merged tiles
            detections_file = session.local_dir / "tiling.detections.json"
            found.update(score(dataset, json.loads(detections_file.read_text()), run.eval, "tiling"))
            attach(detections_file, "detections")
        if not how:
            how.append(describe_runner(result, where))
        retried = " (second attempt)" if session.attempts[mode] > 1 else ""
        how.append(describe_mode(mode, result, run) + retried)
        metrics.update(found)
        tags["rkbench.measure"] = " | ".join(how + skipped)
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
