"""Stage: run a model over the evaluation images through the one detection path
(rkbench.models.detect.Detector, the same code the on-device runner uses), then score with COCO.

The detections of a (model, runtime, dataset, inference spec) tuple are cached: a warm re-run does not
run the simulator again. The timings stored with them say when they were measured, so a cache hit is
never presented as a new measurement."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from rkbench.cache import StageCache, stage_key
from rkbench.config import EvalConfig
from rkbench.data.datasets import Dataset
from rkbench.eval.coco import coco_metrics, per_class_ap
from rkbench.eval.counts import count_table, highest_false
from rkbench.models.detect import Detector, InferenceSpec
from rkbench.runtimes.backends import Runtime
from rkbench.progress import bar
from rkbench.stages import Artifact, from_cache

log = logging.getLogger("rkbench.evaluate")

# How the console says where an evaluation runs (the `where` of Evaluation).
PLACES = {"simulator": "on the rknn-toolkit2 simulator", "host": "with ONNX Runtime on the host CPU"}


@dataclass
class Evaluation:
    artifact: Artifact              # detections.json
    metrics: dict[str, float]       # eval/*, counts/*
    infer_ms: list[float]           # one runtime.infer call per batch, every call (the caller drops warmup)
    where: str                      # host | simulator
    runtime: str
    measured: str                   # when infer_ms was measured (an earlier run's time on a cache hit)
    cached: bool


def score(dataset: Dataset, detections: list[dict], cfg: EvalConfig, prefix: str) -> dict[str, float]:
    metrics = {f"{prefix}/{k}": v for k, v in coco_metrics(dataset.coco_gt, detections).items()}
    if prefix == "eval":  # count tables and per-class AP for the target runtime only, not the float reference
        metrics.update({f"eval_class/{name}": ap for name, ap in per_class_ap(dataset.coco_gt, detections).items()})
        for row in count_table(dataset.coco_gt, detections, tuple(cfg.count_thresholds)):
            for k, v in row.items():
                if k != "conf":
                    metrics[f"counts/c{row['conf']:g}/{k}"] = float(v)
        worst = highest_false(dataset.coco_gt, detections, min(cfg.count_thresholds, default=0.0))
        if worst is not None:   # the thresholds study's "highest-scoring false detection"
            metrics.update({f"counts/top_false/{k}": float(worst[k]) for k in ("score", "image_id", "category_id")})
    return metrics


def evaluate(model: Artifact, make_runtime: Callable[[], Runtime], runtime_id: str, where: str,
             dataset: Dataset, spec: InferenceSpec, cfg: EvalConfig, cache: StageCache,
             prefix: str = "eval") -> Evaluation:
    key = stage_key("evaluate", model=model.sha256, runtime=runtime_id, dataset=dataset.fingerprint(),
                    spec=spec.to_dict())
    what = f"{len(dataset.images)} images {PLACES[where]}" + (" (float reference)" if prefix == "eval_float" else "")
    with cache.open("evaluate", key) as entry:   # one process evaluates, a concurrent one waits and hits
        if entry.hit:
            log.info("detections of %s taken from the stage cache (evaluated before with these inputs)", what)
        else:
            log.info("evaluating %s", what)
            runtime = make_runtime()
            try:
                with bar(len(dataset.images), f"evaluating {what}", "img") as progress:
                    detections, rows = Detector(spec, runtime).evaluate(((rec.id, rec.path) for rec in dataset.images),
                                                                        on_batch=progress.update)
                version = runtime.version()
            finally:
                runtime.close()
            work = cache.begin(entry)
            (work / "detections.json").write_text(json.dumps(detections))
            cache.commit(entry, {"detections": "detections.json"},
                         {"infer_ms": [r[1] * 1e3 for r in rows], "runtime": runtime_id, "runtime_version": version,
                          "where": where, "images": len(dataset.images), "batch": spec.batch,
                          "measured": time.strftime("%Y-%m-%dT%H:%M:%S")})
        art = from_cache(entry, "detections")
    detections = json.loads(Path(art.path).read_text())
    return Evaluation(art, score(dataset, detections, cfg, prefix), art.info["infer_ms"], where, runtime_id,
                      art.info.get("measured", "?"), art.cached)
