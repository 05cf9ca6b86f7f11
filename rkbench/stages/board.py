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
from rkbench.device import clocks, runner_log
from rkbench.device.doctor import BoardFacts, Finding, check, host_toolkit_version, probe
from rkbench.device.shell_sampler import ShellSampling, probed_sources
from rkbench.device.session import BoardSession, cpp_arch, deploy_cpp, deploy_inputs, kill_runners
from rkbench.device.toolkit_perf import toolkit_perf
from rkbench.device.transport import BoardGone, Transport, open_transport, wait_until_back
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
CPP_MODES = ("latency", "eval", "throughput")
# Why the C++ runner has no tiling mode (said on the run when tiling is asked with runner=cpp)
CPP_NO_TILING = ("tiling: not run by the C++ runner: tiling cuts tiles out of decoded frames on the board, and the "
                 "C++ runner takes only tensors the host prepared (no image codec on the board); runner=python "
                 "measures it")
# RKNN_QUERY_MEM_SIZE fields of the C++ runner's result -> memory/<where>_npu_<name>_mb
CPP_MEMORY = {"weight_bytes": "weight", "internal_bytes": "internal", "dma_allocated_bytes": "dma_allocated",
              "sram_total_bytes": "sram_total", "sram_free_bytes": "sram_free"}
CPP_REPLAY = "replay stand-in (ONNX Runtime outputs recorded on the host for these input bytes), not librknnrt"

# One transport per board per process: deploy remembers what it placed per transport object, so a
# sweep checks and pushes each file once.
_TRANSPORTS: dict[tuple, Transport] = {}
# Boards that stayed away for board.reconnect_s, with why: the sweep's later configurations on them fail at
# once with that reason instead of waiting again each.
_GONE: dict[tuple, str] = {}


def _board_key(run: RunConfig) -> tuple:
    b = run.board
    return (b.transport, b.serial, b.address, b.adb_host, b.adb_port, b.ssh_user, b.ssh_port, b.ssh_key,
            b.ssh_known_hosts)


def connect(run: RunConfig) -> Transport:
    """The board's transport, its link checked: a board that dropped is waited for (backoff, at most
    board.reconnect_s in all); one that stays away fails this and every later configuration on it."""
    b = run.board
    key = _board_key(run)
    if key in _GONE:
        raise DeviceError(_GONE[key])
    what = f"board {b.address or b.serial}"

    def attempt(timeout_s: float) -> Transport:
        if key not in _TRANSPORTS:
            _TRANSPORTS[key] = open_transport(b)
        else:
            _TRANSPORTS[key].reconnect(timeout_s)
        return _TRANSPORTS[key]

    try:
        return wait_until_back(attempt, b.reconnect_s, what)
    except BoardGone as exc:
        raise _gone(key, exc) from exc


def _gone(key: tuple, exc: BoardGone) -> BoardGone:
    """Remember a board that stayed away; the error this and every later configuration on it fails with."""
    _GONE[key] = (f"{exc} [since {time.strftime('%H:%M:%S')}: every later board configuration of this sweep fails "
                  "with this reason, without waiting again]")
    return BoardGone(_GONE[key])


# ------------------------------------------------------------------------------------------------ probe

def blocking_findings(facts: BoardFacts, findings: list[Finding], runtime: str) -> list[Finding]:
    """What stops a run with this runtime. ONNX Runtime on the board's CPU does not touch the NPU stack,
    so SoC, librknnrt and toolkit versions only matter for rknnlite and the C++ runner (runtime "cpp"), which
    needs no Python; on the emulated board the C++ runner loads the replay stand-in, not the board's librknnrt.
    The Python runner needs board.python with numpy and opencv (findings that need "python"); both need the
    launcher's setsid (findings that need "runner")."""
    errors = [f for f in findings if f.level == "error"]
    launcher = [f for f in errors if f.needs == "runner"]   # both runners, every runtime (setsid)
    if runtime == "cpp":
        return launcher + ([] if facts.emulated else [f for f in errors if f.needs == "npu"])
    found = errors if runtime == "rknnlite" else launcher + [f for f in errors if f.needs == "python"]
    if facts.python is None:
        return found
    engine = "rknn-toolkit-lite2" if runtime == "rknnlite" else "onnxruntime"
    if (facts.toolkit_lite2 if runtime == "rknnlite" else facts.onnxruntime) is None:
        other = "onnxruntime" if runtime == "rknnlite" else "rknnlite"
        found.append(Finding("error", f"{engine} is not installed for the board's {facts.python_path} (board.python)",
                             f"pip install {'the rknn_toolkit_lite2 wheel' if runtime == 'rknnlite' else engine} for "
                             f"{facts.python_path} on the board, point board.python at a "
                             f"Python that has it, or set board.runtime={other}", "python"))
    return found


def inspect_board(transport: Transport, run: RunConfig) -> tuple[BoardFacts, dict[str, str]]:
    facts = probe(transport, host_toolkit_version(), remote_root=run.board.remote_root, python=run.board.python)
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
    memory = system.get("memory") or {}
    for key in ("peak_rss_mib", "rss_mib_mean"):   # VmHWM at the end, VmRSS sampled (the runner's own pid)
        if memory.get(key) is not None:
            out[M.system(where, mode, key)] = memory[key]
    for name, clock in (system.get("clocks") or {}).items():   # npu_freq_mhz_min, temp_soc_thermal_c_max, ...
        for stat in ("min", "max"):
            out[M.system(where, mode, f"{name}_{clock['unit'].lower()}_{stat}")] = float(clock[stat])
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
        out[f"throughput/{where}_cpp_single_fps"] = float(lat["fps"])
        out[f"latency/{where}_cpp_init_ms"] = float(lat["init"]["ms"])   # rknn_init + queries, once per run
        if lat["batch"] > 1:   # an iteration's total per image of its batch
            out.update(M.latency_stats(where, "cpp_frame", lat["frame"]))
    elif mode == "latency":
        lat = result["latency"]
        out.update(_part_metrics(lat, where))
        out[f"throughput/{where}_single_fps"] = float(lat["fps"])
    elif mode == "throughput":
        tp = result["throughput"]
        pool = f"{where}_cpp" if runner_of(result) == "cpp" else where   # the C++ pool beside the Python one
        out[f"throughput/{pool}_fps"] = float(tp["fps"])
        out[f"throughput/{pool}_workers"] = float(len(tp["workers"]))
        for k in ("p50", "p90"):
            out[f"throughput/{pool}_frame_ms_{k}"] = float(tp["frame_latency_ms"][k])
        share: dict[str, float] = {}
        for worker in tp["workers"]:
            share[worker["core_mask"]] = share.get(worker["core_mask"], 0.0) + float(worker["share"])
        out.update({f"throughput/{pool}_share_core{mask}": s for mask, s in share.items()})
    elif mode == "tiling":
        tl = result["tiling"]
        out[f"tiling/{where}_fps"] = float(tl["fps"])
        out["tiling/tiles_per_frame"] = float(tl["tiles_per_frame"])
        out.update({k: v for k, v in _part_metrics(tl, where, "tiling").items() if k.endswith(("_p50", "_mean"))})
    out.update(_system_metrics(result, mode, where))
    memory = result.get("memory") or {}
    if mode in ("latency", "throughput") and memory.get("reported"):   # the C++ runner's RKNN_QUERY_MEM_SIZE
        out.update({f"memory/{where}_npu_{name}_mb": memory[key] / 2**20 for key, name in CPP_MEMORY.items()})
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
                f"{tp['wall_s']:.2f} s, {tp['warmup_per_worker']} warmup per worker, in order={tp['in_order']}"
                f"{', one rknn context per worker' if runner_of(result) == 'cpp' else ''}{_cpp_settings(result)}")
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
    through = ", pass-through input (quantised before the clock)" if runtime.get("pass_through") else ""
    memory = result.get("memory") or {}
    npu_memory = "" if memory.get("reported", True) else f", NPU memory not reported (rknn_query code {memory.get('code')})"
    sampled = ", system samples: the runner's whole process (its launcher's sh loop)" if (result.get("system") or {}).get("window") else ""
    return f", outputs {runtime.get('outputs', '?')}{io}{through}{npu_memory}{sampled}"


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

def keep_runner_log(session: BoardSession, mode: str, attach: Attach, tags: dict[str, str], record: Record) -> None:
    """The runner's stdout and stderr as artifact board/<mode>.log; known librknnrt warnings as tags."""
    if mode not in session.logs:   # the runner never answered (timeout, link lost)
        return
    text = session.logs[mode]
    path = session.local_dir / f"{mode}.log"
    path.write_text(text)
    attach(path, "board")
    found = {k: v for k, v in runner_log.warnings(mode, text).items() if k not in tags}
    if found:
        log.warning("runner %s: %s", mode, "; ".join(found.values()))
        tags.update(found)
        record({}, found)


def restore_clocks(transport: Transport, pinned: clocks.Pinned) -> None:
    """Governors back as they were; a failure here is logged, never hides the measurement's own error."""
    try:
        clocks.restore(transport, pinned)
    except DeviceError as exc:
        log.error("%s", exc)



def runner_modes(run: RunConfig) -> tuple[list[str], list[str]]:
    """The measure.modes this runner does, and a one-line note for those it leaves to the Python runner: the
    C++ runner does latency, eval and throughput; tiling stays with the Python runner (CPP_NO_TILING)."""
    if run.runner != "cpp":
        return list(run.measure.modes), []
    modes = [m for m in run.measure.modes if m in CPP_MODES]
    if not modes:
        raise DeviceError(f"measure.modes={run.measure.modes} has no mode of the C++ runner ({', '.join(CPP_MODES)}): "
                          "add one, or use runner=python")
    if "tiling" not in run.measure.modes:
        return modes, []
    log.warning(CPP_NO_TILING)
    return modes, [CPP_NO_TILING]


def run_on_board(run: RunConfig, onnx: Artifact, rknn_art: Optional[Artifact], dataset: Dataset,
                 cache_root: Path, attach: Attach, record: Record) -> tuple[dict[str, float], dict[str, str]]:
    """Probe, deploy and measure one configuration on the board (see the module docstring). `rknn_art` is
    None where the board runs the ONNX. With board.pin_freq the governors are
    pinned first, so the probe's board.* tags show the clocks as measured, and restored however the measurement
    ends (Ctrl-C too)."""
    transport = connect(run)
    try:
        if not run.board.pin_freq:
            return _on_board(run, transport, onnx, rknn_art, dataset, cache_root, attach, record)
        pinned = clocks.pin(transport)
        record({}, {"board.pinned": pinned.describe()})
        try:
            metrics, tags = _on_board(run, transport, onnx, rknn_art, dataset, cache_root, attach, record)
        finally:
            restore_clocks(transport, pinned)
        return metrics, dict(tags, **{"board.pinned": pinned.describe()})
    except BoardGone as exc:   # waited board.reconnect_s while the runner's link was down: the board is away
        raise _gone(_board_key(run), exc) from exc


def _on_board(run: RunConfig, transport: Transport, onnx: Artifact, rknn_art: Optional[Artifact], dataset: Dataset,
              cache_root: Path, attach: Attach, record: Record) -> tuple[dict[str, float], dict[str, str]]:
    from rkbench.spec import inference_spec

    # A runner left running by a configuration that lost its link (or a host process cut off) would share the NPU
    kill_runners(transport, run.board.remote_root, "left over before this configuration")
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
                           remote_dir=posixpath.join(run.board.remote_root, "results", token),
                           # no Python (no sampler thread) on the board for the C++ runner: its launcher samples
                           sampling=ShellSampling(probed_sources(facts)) if run.runner == "cpp" else None)
    session.local_dir.mkdir(parents=True, exist_ok=True)
    mkdir = transport.shell(["mkdir", "-p", session.remote_dir], timeout=60)
    if not mkdir.ok:
        raise DeviceError(f"cannot create {session.remote_dir} on the {where}: {mkdir.output.strip()[:200]}; "
                          "set board.remote_root to a writable directory such as /data/local/tmp/rkbench")

    how: list[str] = []
    for mode in modes:
        log.info("measuring %s on the %s with the %s runner (%s)", mode, where, run.runner, tags["rkbench.runtime"])
        try:
            result = session.run_mode(mode)
        finally:   # the runner's log is kept whether the mode worked or not
            keep_runner_log(session, mode, attach, tags, record)
        attach(session.local_dir / f"{mode}.json", "board")
        if mode == "eval":
            detections_file = session.local_dir / "eval.detections.json"
            found = score(dataset, json.loads(detections_file.read_text()), run.eval, "eval")
            found.update(_system_metrics(result, mode, where))
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
        elif transport.kind != "adb":
            tags["rkbench.toolkit_perf"] = (f"skipped: rknn-toolkit2 reaches boards over adb only, not {transport.kind} "
                                            "(board.transport=adb for eval_perf / eval_memory)")
        else:
            found, perf_tags, files = toolkit_perf(rknn_art.path, run.platform, getattr(transport, "serial", ""),
                                                   facts.dmc, session.local_dir / "toolkit_perf")
            for path in files:
                attach(path, "perf")
            metrics.update(found)
            tags.update(perf_tags)
            record(found, perf_tags)
    return metrics, tags
