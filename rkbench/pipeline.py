"""One run, left to right: dataset -> export -> simplify -> convert -> evaluate -> MLflow.

A failure inside a stage (RkbenchError) becomes data: the run is logged FAILED with the error and a
hint, and a sweep goes on. A bug (any other exception) also marks the run FAILED, then propagates."""

from __future__ import annotations

import hashlib
import importlib.metadata as md
import logging
import platform as host_platform
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from omegaconf import OmegaConf

from rkbench.cache import StageCache, sha256_file
from rkbench.config import DatasetConfig, RunConfig, flatten, resolve_path
from rkbench.data.datasets import Dataset, calibration_images, load_coco, load_yolo
from rkbench.errors import RkbenchError
from rkbench.stages.convert import ConvertOptions, convert
from rkbench.stages.evaluate import Decoder, Evaluation, evaluate
from rkbench.stages.export import export
from rkbench.stages.simplify import simplify
from rkbench.stats import summarize
from rkbench.tracking import NON_SEMANTIC, Tracker, fingerprint, git_sha, versions

log = logging.getLogger("rkbench")


@dataclass
class RunContext:
    """Where a run sits in a sweep (filled from Hydra by __main__; pipeline code never reads Hydra)."""

    multirun: bool = False
    sweep_id: str = ""
    overrides: list[str] = field(default_factory=list)
    job: int = 0
    swept: list[str] = field(default_factory=list)   # keys with sweep values (resolution=320,640 -> resolution)


@dataclass
class Outcome:
    status: str                       # FINISHED | FAILED | SKIPPED
    run_id: Optional[str]
    name: str
    metrics: dict[str, float] = field(default_factory=dict)
    error: str = ""
    cache: dict[str, str] = field(default_factory=dict)   # stage -> hit | miss


@dataclass
class Sweep:
    """Process-wide state of one multirun: its parent MLflow run and what each child did."""

    sweep_id: str
    parent_id: Optional[str]
    tracker: Optional[Tracker]
    outcomes: list[Outcome] = field(default_factory=list)


SWEEP: Optional[Sweep] = None


def load_dataset(cfg: DatasetConfig, cache_root: Path) -> Dataset:
    if cfg.kind == "demo":
        from rkbench.data.demo import demo_dataset
        return demo_dataset(Path(cfg.root) if cfg.root else cache_root / "datasets" / "demo", limit=cfg.limit)
    if cfg.kind == "coco":
        return load_coco(resolve_path(cfg.annotations), resolve_path(cfg.images), cfg.limit)
    return load_yolo(resolve_path(cfg.root), cfg.split, cfg.limit)


def run_name(run: RunConfig, ctx: RunContext) -> str:
    axes = [o for o in ctx.overrides if not o.startswith(NON_SEMANTIC + ("+experiment", "hydra."))]
    return f"{run.model.name}" + (f" {' '.join(axes)}" if axes else f" {run.resolution}px {run.algo} {run.target}")


def _latency(ev: Evaluation, warmup: int, batch: int) -> tuple[dict[str, float], str]:
    timed = ev.infer_ms[warmup:] if len(ev.infer_ms) > warmup else ev.infer_ms
    stats = summarize(timed)
    metrics = {f"latency/{ev.where}_infer_ms_{k}": v for k, v in stats.items() if k != "count"}
    how = (f"{ev.where}: {ev.runtime}, one timed runtime.infer call per batch of {batch} during evaluation, "
           f"{len(timed)} calls, first {len(ev.infer_ms) - len(timed)} left out as warmup; not NPU latency")
    return metrics, how


def execute(run: RunConfig, dataset: Dataset, cache: StageCache, attach: Callable[[Path, str], None],
            record: Callable[[dict[str, float], dict[str, str]], None]) -> tuple[dict[str, float], dict[str, str]]:
    """The stages of one configuration. Returns (metrics, tags); `record` logs partial results at once
    (board modes), so a later failure loses nothing already measured."""
    from rkbench.runtimes.backends import make_runtime
    from rkbench.runtimes.simulator import SimulatorRuntime

    metrics: dict[str, float] = {}
    tags: dict[str, str] = {}
    onnx = export(run.model, run.resolution, run.export, run.activation, cache)
    onnx = simplify(onnx, run.simplify, cache)
    tags.update({"rkbench.cache.export": onnx.cache_key[:16]})
    metrics["export/onnx_mib"] = onnx.path.stat().st_size / 2**20
    decoder = Decoder.from_export(onnx.info, run.resolution)
    if run.activation != "silu":
        tags["rkbench.note"] = (f"activation swapped to {run.activation} on weights trained with SiLU: latency is "
                                "meaningful, accuracy needs weights trained with that activation")

    ort_id = f"onnxruntime-{md.version('onnxruntime')}"
    host_latency: list[str] = []

    def ort() -> object:
        return make_runtime("onnxruntime", str(onnx.path), where="host")

    if run.target == "onnxruntime" or run.eval.float_reference:
        prefix = "eval" if run.target == "onnxruntime" else "eval_float"
        ref = evaluate(onnx, ort, ort_id, "host", dataset, decoder, 1, run.eval, cache, prefix)
        metrics.update(ref.metrics)
        lat, how = _latency(ref, run.measure.warmup, 1)
        metrics.update(lat)
        host_latency.append(how)
        record(dict(ref.metrics, **lat), {})  # kept even if the conversion below fails
        if prefix == "eval":
            attach(ref.artifact.path, "detections")

    if run.target in ("simulator", "board"):
        opts = ConvertOptions(run.platform, run.quantize, run.algo, run.quant_method, run.quant_dtype, run.batch)
        source = dataset if run.calib.source == "dataset" else resolve_path(run.calib.source)
        calib = calibration_images(source, run.calib.size, run.calib.seed)
        calib_hash = sha256_file_list(calib)
        rknn_art, live = convert(onnx, opts, run.resolution, calib, calib_hash, cache, run.export)
        tags["rkbench.cache.convert"] = rknn_art.cache_key[:16]
        metrics["convert/build_s"] = float(rknn_art.info["build_s"])
        metrics["convert/rknn_mib"] = rknn_art.path.stat().st_size / 2**20
        attach(rknn_art.path.parent / "convert.log", "logs")
        try:
            if run.target == "simulator":
                def sim() -> SimulatorRuntime:
                    nonlocal live
                    runtime, live = SimulatorRuntime(live, onnx_path=onnx.path, opts=opts,
                                                     calib_list=rknn_art.path.parent / "calib" / "dataset.txt",
                                                     log_path=rknn_art.path.parent / "simulator.log"), None
                    return runtime
                ev = evaluate(rknn_art, sim, f"rknn-simulator-{rknn_art.info['toolkit']}", "simulator", dataset,
                              decoder, run.batch, run.eval, cache)
                metrics.update(ev.metrics)
                lat, how = _latency(ev, run.measure.warmup, run.batch)
                metrics.update(lat)
                host_latency.append(how)
                attach(ev.artifact.path, "detections")
            else:
                from rkbench.stages.board import run_on_board
                board_metrics, board_tags = run_on_board(run, onnx, rknn_art, decoder, dataset, cache.root, attach, record)
                metrics.update(board_metrics)
                tags.update(board_tags)
        finally:
            if live is not None:   # built for nothing (evaluation came from the cache)
                live.release()

    tags.setdefault("rkbench.device_kind", "simulator" if run.target == "simulator" else "host")
    tags.setdefault("rkbench.runtime", {"simulator": "rknn-simulator", "onnxruntime": "onnxruntime"}.get(run.target, run.target))
    tags["rkbench.measure"] = " | ".join(host_latency + ([tags["rkbench.measure"]] if "rkbench.measure" in tags else []))
    tags["rkbench.host"] = f"{host_platform.node()} {host_platform.machine()} {host_platform.processor() or ''}".strip()
    return metrics, tags


def sha256_file_list(paths: list[Path]) -> str:
    """One hash over the contents of several files (the calibration set)."""
    return hashlib.sha256("".join(sha256_file(p) for p in paths).encode()).hexdigest()


def ensure_sweep(ctx: RunContext, tracker: Optional[Tracker], run: RunConfig) -> Optional[Sweep]:
    global SWEEP
    if not ctx.multirun:
        return None
    if SWEEP is None or SWEEP.sweep_id != ctx.sweep_id:
        parent = None
        if tracker:
            parent = tracker.start(f"sweep {Path(ctx.sweep_id).name or ctx.sweep_id}",
                                   {"rkbench.kind": "sweep", "rkbench.study": run.study,
                                    "rkbench.sweep_dir": ctx.sweep_id, "rkbench.git_sha": git_sha(),
                                    "rkbench.swept": ",".join(ctx.swept)})
        SWEEP = Sweep(ctx.sweep_id, parent, tracker)
    return SWEEP


def run(run_cfg: RunConfig, ctx: RunContext, dataset: Optional[Dataset] = None) -> Outcome:
    cache_root = Path(run_cfg.cache_dir).expanduser().resolve()
    cache = StageCache(cache_root)
    dataset = dataset or load_dataset(run_cfg.dataset, cache_root)
    tracker = Tracker(run_cfg.tracking.uri, run_cfg.tracking.experiment) if run_cfg.tracking.enabled else None
    sweep = ensure_sweep(ctx, tracker, run_cfg)
    name = run_name(run_cfg, ctx)
    fp = fingerprint(run_cfg)

    done = tracker.finished_run(fp) if (tracker and run_cfg.resume) else None
    if done:
        log.info("skip %s: already FINISHED in MLflow run %s (resume=false to run again)", name, done)
        outcome = Outcome("SKIPPED", done, name)
        if sweep:
            sweep.outcomes.append(outcome)
            if sweep.parent_id:  # nesting is a tag: the resumed sweep's parent then holds every configuration
                tracker.log(done, tags={"mlflow.parentRunId": sweep.parent_id, "rkbench.resumed_into": sweep.parent_id})
        return outcome

    run_id = None
    if tracker:
        run_id = tracker.start(name, {"rkbench.kind": "config", "rkbench.fingerprint": fp, "rkbench.study": run_cfg.study,
                                      "rkbench.git_sha": git_sha(), "rkbench.dataset": f"{dataset.name} ({len(dataset.images)} images)",
                                      "rkbench.soc": run_cfg.platform, "rkbench.target": run_cfg.target, **versions()},
                               parent=sweep.parent_id if sweep else None)
        tracker.log(run_id, params=flatten(run_cfg))
        tracker.text(run_id, OmegaConf.to_yaml(OmegaConf.structured(run_cfg)), "config.yaml")

    def attach(path: Path, subdir: str) -> None:
        if tracker and path.exists():
            tracker.artifact(run_id, path, subdir)

    def record(metrics: dict[str, float], tags: dict[str, str]) -> None:
        if tracker:
            tracker.log(run_id, metrics, tags=tags)

    try:
        metrics, tags = execute(run_cfg, dataset, cache, attach, record)
        outcome = Outcome("FINISHED", run_id, name, metrics)
        if tracker:
            tracker.log(run_id, metrics, tags=dict(tags, **{"rkbench.status": "FINISHED",
                                                           "rkbench.cache.hits": ",".join(cache.hits),
                                                           "rkbench.cache.misses": ",".join(cache.misses)}))
            tracker.end(run_id, "FINISHED")
    except RkbenchError as err:
        log.error("run %s FAILED: %s", name, err)
        outcome = Outcome("FAILED", run_id, name, error=str(err))
        if tracker:
            tracker.log(run_id, tags={"rkbench.status": "FAILED", "rkbench.error": getattr(err, "detail", str(err)),
                                      "rkbench.hint": getattr(err, "hint", ""),
                                      "rkbench.failed_stage": getattr(err, "stage", "config")})
            tracker.end(run_id, "FAILED")
    except BaseException as exc:
        if tracker and run_id:
            tracker.log(run_id, tags={"rkbench.status": "FAILED", "rkbench.error": f"{type(exc).__name__}: {exc}"})
            tracker.end(run_id, "KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED")
        raise
    outcome.cache = {s: "hit" for s in cache.hits} | {s: "miss" for s in cache.misses}
    if sweep:
        sweep.outcomes.append(outcome)
    return outcome
