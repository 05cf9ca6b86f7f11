"""One run, left to right: plan -> identity -> (reuse) -> export -> simplify -> convert -> evaluate -> MLflow.

A configuration is first reduced to what it measures (rkbench.spec.plan: axes without effect on the
target collapse) and given an identity from its settings and the bytes of every input file. A run with
that identity already FINISHED in MLflow is reused, not measured again: inside a sweep a lightweight
link run under the sweep's parent points at it, and the measured run stays where it is.

A failure inside a stage (RkbenchError) becomes data: the run is logged FAILED with the error and a
hint, and a sweep goes on. A bug (any other exception) also marks the run FAILED, then propagates."""

from __future__ import annotations

import importlib.metadata as md
import json
import logging
import platform as host_platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional

from rkbench import metrics as M
from rkbench import spec
from rkbench.config import DatasetConfig, ModelConfig, RunConfig, axes, flatten, resolve_path
from rkbench.data.datasets import Dataset, load_coco, load_yolo
from rkbench.errors import RkbenchError
from rkbench.stages import Artifact

log = logging.getLogger("rkbench")

OUTCOME_FILE = "rkbench_outcome.json"   # in each Hydra job's output dir: what the sweep summary reads


@dataclass
class RunContext:
    """Where a run sits in an invocation (filled from Hydra by cli.py; pipeline code never reads Hydra)."""

    multirun: bool = False
    sweep_dir: str = ""                 # the multirun's dir: the parent run is found by it
    overrides: list[str] = field(default_factory=list)
    output_dir: Optional[Path] = None   # the job's own dir: rkbench_outcome.json goes there
    swept: list[str] = field(default_factory=list)   # keys the sweep varies, command-line order: the run name


@dataclass
class Outcome:
    status: str                       # FINISHED | FAILED | REUSED
    run_id: Optional[str]             # the run logged by this job (a link run when reused in a sweep)
    name: str
    identity: str = ""
    metrics: dict[str, float] = field(default_factory=dict)
    error: str = ""
    cache: dict[str, str] = field(default_factory=dict)   # stage -> hit | miss
    measured_run: Optional[str] = None     # REUSED: the run that measured these numbers ...
    measured_at: str = ""                  # ... and when
    collapsed: str = ""                    # axes that had no effect on the target
    parent: Optional[str] = None           # the sweep's parent run
    seconds: float = 0.0                   # wall time of this configuration (the sweep's ETA)
    models: dict[str, str] = field(default_factory=dict)   # onnx | rknn -> its file in the stage cache

    def save(self, folder: Optional[Path]) -> None:
        if folder is not None:
            folder.mkdir(parents=True, exist_ok=True)
            (folder / OUTCOME_FILE).write_text(json.dumps(asdict(self), indent=1))

    @classmethod
    def load(cls, path: Path) -> "Outcome":
        return cls(**json.loads(path.read_text()))


_LOADED: dict[tuple[str, Path], Dataset] = {}


def forget_datasets() -> None:
    """A new invocation loads its datasets afresh (files may have changed since the last one)."""
    _LOADED.clear()


def load_dataset(cfg: DatasetConfig, cache_root: Path) -> Dataset:
    """Loaded once per invocation and settings: preflight, the no-op resume check and every job of a
    sweep share it (and its fingerprint, which reads every image)."""
    key = (repr(cfg), cache_root)
    if key not in _LOADED:
        _LOADED[key] = _load(cfg, cache_root)
    return _LOADED[key]


def _load(cfg: DatasetConfig, cache_root: Path) -> Dataset:
    if cfg.kind == "demo":
        from rkbench.data.demo import demo_dataset
        if cfg.frame:   # large frames (the tiling study): their own folder, so the demo images stay as they are
            w, h = cfg.frame
            root = Path(cfg.root) if cfg.root else cache_root / "datasets" / f"demo_frames_{w}x{h}"
            return demo_dataset(root, n_val=cfg.frames, limit=cfg.limit, frame=(w, h))
        return demo_dataset(Path(cfg.root) if cfg.root else cache_root / "datasets" / "demo", limit=cfg.limit)
    if cfg.kind == "coco":
        return load_coco(resolve_path(cfg.annotations), resolve_path(cfg.images), cfg.limit)
    return load_yolo(resolve_path(cfg.root), cfg.split, cfg.limit)


# Axes whose values name themselves (640, kl_divergence, rk3576, w8a16, relu, onnxruntime): run names show
# them bare; any other key is shown as key=value.
SELF_NAMED = ("resolution", "activation", "platform", "algo", "quant_dtype", "target")


def model_stem(model: ModelConfig) -> str:
    """The model file's stem (`demo_yolov8n`, `best`); YOLOv5 is measured from its ONNX."""
    source = model.onnx if model.family == "yolov5" else (model.weights or model.yaml or model.onnx)
    return resolve_path(source).stem if source else model.name


def _shown(key: str, value: str) -> str:
    if key == "quantize":
        return "int8" if value.lower() == "true" else "fp16"
    return value if key in SELF_NAMED else f"{key}={value}"


def run_name(run: RunConfig, ctx: RunContext) -> str:
    """Model file stem + the values of the keys this sweep varies (command-line order), or, for a single
    run, of the axes that differ from their defaults: `demo_yolov8n 640 kl_divergence`. Never paths nor
    settings that were not swept (dataset.limit, cache_dir)."""
    if ctx.swept:
        given = dict(o.lstrip("+~").split("=", 1) for o in ctx.overrides if "=" in o)
        values = [(k, given[k]) for k in ctx.swept if k in given and k != "model"]   # the stem names the model
    else:
        mine, default = flatten(run), flatten(RunConfig())
        values = [(k, mine[k]) for k in axes() if mine[k] != default[k]]
    return " ".join([model_stem(run.model)] + [_shown(k, v) for k, v in values])


def _latency(ev, warmup: int) -> tuple[dict[str, float], str]:
    from rkbench.stats import summarize

    timed = ev.infer_ms[warmup:] if len(ev.infer_ms) > warmup else ev.infer_ms
    metrics = M.latency_stats(ev.where, "infer", summarize(timed))
    when = (f"measured {ev.measured} and reused from the evaluate cache, not re-measured in this run" if ev.cached
            else f"measured {ev.measured}")
    how = (f"{ev.where}: {ev.runtime}, one timed runtime.infer call per batch during evaluation, {len(timed)} "
           f"calls, first {len(ev.infer_ms) - len(timed)} left out as warmup, {when}; not NPU latency")
    return metrics, how


def execute(plan: spec.RunPlan, dataset: Dataset, cache, attach: Callable[[Path, str], None],
            record: Callable[[dict[str, float], dict[str, str]], None],
            keep_model: Callable[[str, Artifact], None]) -> tuple[dict[str, float], dict[str, str]]:
    """The stages of one configuration. Returns (metrics, tags); `record` logs partial results at once
    (board modes), so a later failure loses nothing already measured; `keep_model` gets the .onnx and the
    .rknn as soon as they exist. Stages are imported here, so a reused run never pays for torch or the
    toolkit."""
    from rkbench.runtimes.backends import make_runtime
    from rkbench.runtimes.simulator import SimulatorRuntime
    from rkbench.stages.convert import ConvertOptions, convert
    from rkbench.stages.evaluate import evaluate
    from rkbench.stages.export import export
    from rkbench.stages.simplify import simplify

    run = plan.config
    metrics: dict[str, float] = {}
    tags: dict[str, str] = {}
    onnx = export(run.model, run.resolution, run.export, run.activation, cache)
    onnx = simplify(onnx, run.simplify, cache)
    if run.channels == 1:   # the input study: the gray model derived from the 3-channel one
        from rkbench.stages.export import grayscale
        onnx = grayscale(onnx, cache)
    log.info("ONNX (%s head, %d px, simplify=%s) %s", run.export, run.resolution, run.simplify,
             "taken from the stage cache" if onnx.cached else "exported")
    keep_model("onnx", onnx)
    tags.update({"rkbench.cache.export": onnx.cache_key[:16]})
    metrics["export/onnx_mib"] = onnx.path.stat().st_size / 2**20
    if run.activation != "silu":
        tags["rkbench.note"] = (f"activation swapped to {run.activation} on weights trained with SiLU: latency is "
                                "meaningful, accuracy needs weights trained with that activation")

    host_latency: list[str] = []
    ort_id = f"onnxruntime-{md.version('onnxruntime')}"

    channels = int(onnx.info.get("channels", 3))

    def ort() -> object:   # mean/std per input channel of the model (channels=1: the gray model)
        return make_runtime("onnxruntime", str(onnx.path), where="host", mean=(0.0,) * channels, std=(255.0,) * channels)

    if run.target == "onnxruntime" or run.eval.float_reference:
        prefix = "eval" if run.target == "onnxruntime" else "eval_float"
        ref = evaluate(onnx, ort, ort_id, "host", dataset, spec.inference_spec(run, onnx.info, dataset, "onnxruntime"),
                       run.eval, cache, prefix)
        metrics.update(ref.metrics)
        lat, how = _latency(ref, run.measure.warmup)
        metrics.update(lat)
        host_latency.append(how)
        record(dict(ref.metrics, **lat), {})  # kept even if the conversion below fails
        if prefix == "eval":
            attach(ref.artifact.path, "detections")

    if spec.uses_rknn(run):   # a board running the ONNX converts nothing (toolkit_perf collapses there too)
        opts = ConvertOptions(run.platform, run.quantize, run.algo, run.quant_method, run.quant_dtype, run.batch,
                              channels=run.channels)
        calib = spec.calibration_set(run, dataset) if run.quantize else []
        if run.quantize:
            metrics["calib/images"] = float(len(calib))
        if spec.quantizes(run) and (run.hybrid.layers or run.accuracy.analysis):
            from rkbench.stages.accuracy import run_studies
            analysed = [image.path for image in dataset.images[:run.accuracy.images]]
            opts, found, found_tags = run_studies(run, onnx, opts, calib, spec.files_hash(calib), analysed,
                                                  spec.files_hash(analysed), cache, attach)
            metrics.update(found)
            tags.update(found_tags)
            record(found, found_tags)   # kept even if the conversion below fails
        rknn_art, live = convert(onnx, opts, run.resolution, calib, spec.files_hash(calib), cache, run.export)
        keep_model("rknn", rknn_art)
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
                from rkbench.toolkit import toolkit_version
                ev = evaluate(rknn_art, sim, f"rknn-simulator-{toolkit_version()}", "simulator", dataset,
                              spec.inference_spec(run, onnx.info, dataset, "rknn-simulator"), run.eval, cache)
                metrics.update(ev.metrics)
                lat, how = _latency(ev, run.measure.warmup)
                metrics.update(lat)
                host_latency.append(how)
                attach(ev.artifact.path, "detections")
            else:
                from rkbench.stages.board import run_on_board
                board_metrics, board_tags = run_on_board(run, onnx, rknn_art, dataset, cache.root, attach, record)
                metrics.update(board_metrics)
                tags.update(board_tags)
        finally:
            if live is not None:   # built for nothing (evaluation came from the cache)
                live.release()
    elif run.target == "board":
        from rkbench.stages.board import run_on_board
        board_metrics, board_tags = run_on_board(run, onnx, None, dataset, cache.root, attach, record)
        metrics.update(board_metrics)
        tags.update(board_tags)

    tags.setdefault("rkbench.device_kind", "simulator" if run.target == "simulator" else "host")
    tags.setdefault("rkbench.runtime", {"simulator": "rknn-simulator", "onnxruntime": "onnxruntime"}.get(run.target, run.target))
    tags["rkbench.measure"] = " | ".join(host_latency + ([tags["rkbench.measure"]] if "rkbench.measure" in tags else []))
    tags["rkbench.host"] = f"{host_platform.node()} {host_platform.machine()} {host_platform.processor() or ''}".strip()
    return metrics, tags


def _reuse(tracker, done, name: str, ident: spec.Identity, parent: Optional[str], plan: spec.RunPlan) -> Outcome:
    """A FINISHED run with this identity exists: link it into this sweep (the measured run is not moved)."""
    measured_at = tracker.started_at(done)
    link_id = tracker.link(done, name, parent, {"rkbench.identity": ident.key, "rkbench.collapsed": plan.tag()}) \
        if parent else None
    log.info("reuse %s: measured in MLflow run %s at %s (resume=false to measure again)", name,
             done.info.run_id, measured_at)
    return Outcome("REUSED", link_id or done.info.run_id, name, ident.key, dict(done.data.metrics),
                   measured_run=done.info.run_id, measured_at=measured_at, collapsed=plan.tag(), parent=parent)


def run(run_cfg: RunConfig, ctx: RunContext, dataset: Optional[Dataset] = None) -> Outcome:
    from rkbench.cache import StageCache
    from rkbench.tracking import git_sha, tracker_for

    started = time.monotonic()
    plan = spec.plan(run_cfg)
    run_cfg = plan.config
    cache_root = Path(run_cfg.cache_dir).expanduser().resolve()
    cache = StageCache(cache_root)
    dataset = dataset or load_dataset(run_cfg.dataset, cache_root)
    ident = spec.identity(plan, dataset)
    tracker = tracker_for(run_cfg.tracking.uri, run_cfg.tracking.experiment) if run_cfg.tracking.enabled else None
    parent = tracker.sweep_parent(ctx.sweep_dir) if (tracker and ctx.multirun) else None
    name = run_name(run_cfg, ctx)
    if plan.collapsed:
        log.info("%s: no effect on this target, collapsed: %s", name, plan.tag())

    # resume=false measures again, but a sweep still measures each identity once (collapsed axes).
    done = tracker.finished_run(ident.key, within=None if run_cfg.resume else parent) if tracker else None
    if done is not None and (run_cfg.resume or parent):
        outcome = _reuse(tracker, done, name, ident, parent, plan)
        outcome.seconds = time.monotonic() - started
        outcome.save(ctx.output_dir)
        return outcome

    run_id: Optional[str] = None

    def attach(path: Path, subdir: str) -> None:
        if tracker and path.exists():
            tracker.artifact(run_id, path, subdir)

    def record(metrics: dict[str, float], tags: dict[str, str]) -> None:
        if tracker:
            tracker.log(run_id, metrics, tags=tags)

    models: dict[str, str] = {}

    def keep_model(kind: str, art: Artifact) -> None:
        models[kind] = str(art.path)
        if tracker:
            tracker.model_file(run_id, kind, art.path, art.sha256)

    try:   # from the run's creation on: a Ctrl-C at any point (even while logging) marks it KILLED
        if tracker:
            inputs = {f"rkbench.input.{k}": v[:16] for k, v in ident.inputs.items()}
            run_id = tracker.start(name, {"rkbench.kind": "config", "rkbench.identity": ident.key, "rkbench.study": run_cfg.study,
                                          "rkbench.git_sha": git_sha(), "rkbench.dataset": f"{dataset.name} ({len(dataset.images)} images)",
                                          "rkbench.soc": run_cfg.platform, "rkbench.target": run_cfg.target,
                                          "rkbench.collapsed": plan.tag(), "rkbench.sweep_dir": ctx.sweep_dir, **inputs,
                                          **{f"versions.{k}": v for k, v in ident.versions.items()},
                                          "versions.rkbench_measurement": str(spec.MEASUREMENT_VERSION)},
                                   parent=parent)
            # search.* is how a search scores the run, not what it measured: not a param (else it reads as an axis)
            tracker.log(run_id, params={k: v for k, v in flatten(run_cfg).items() if not k.startswith("search.")})
            from omegaconf import OmegaConf
            tracker.text(run_id, OmegaConf.to_yaml(OmegaConf.structured(run_cfg)), "config.yaml")
            log.info("%s: MLflow run %s", name, run_id)
        metrics, tags = execute(plan, dataset, cache, attach, record, keep_model)
        outcome = Outcome("FINISHED", run_id, name, ident.key, metrics, collapsed=plan.tag())
        if tracker:
            tracker.log(run_id, metrics, tags=dict(tags, **{"rkbench.status": "FINISHED",
                                                           "rkbench.cache.hits": ",".join(cache.hits),
                                                           "rkbench.cache.misses": ",".join(cache.misses)}))
            tracker.end(run_id, "FINISHED")
    except RkbenchError as err:
        log.error("run %s FAILED: %s", name, err)
        outcome = Outcome("FAILED", run_id, name, ident.key, error=str(err), collapsed=plan.tag())
        if tracker and run_id:
            tracker.log(run_id, tags={"rkbench.status": "FAILED", "rkbench.error": getattr(err, "detail", str(err)),
                                      "rkbench.hint": getattr(err, "hint", ""),
                                      "rkbench.failed_stage": getattr(err, "stage", None) or "config"})
            tracker.end(run_id, "FAILED")
    except BaseException as exc:
        if tracker and run_id:
            status = "KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED"
            tracker.log(run_id, tags={"rkbench.status": status, "rkbench.error": f"{type(exc).__name__}: {exc}"})
            tracker.end(run_id, status)
        raise
    outcome.cache = {s: "hit" for s in cache.hits} | {s: "miss" for s in cache.misses}
    outcome.parent, outcome.models, outcome.seconds = parent, models, time.monotonic() - started
    outcome.save(ctx.output_dir)
    return outcome
