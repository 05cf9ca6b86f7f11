"""Stage: run a model over the evaluation images (shared letterbox / decode / NMS), score with COCO.

The detections of a (model, runtime, dataset, eval settings) tuple are cached: a warm re-run does
not run the simulator again. Host and simulator times measured here are tagged as such."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from rkbench.cache import StageCache, stage_key
from rkbench.config import EvalConfig
from rkbench.data.datasets import Dataset
from rkbench.eval.coco import coco_metrics
from rkbench.eval.counts import count_table
from rkbench.models import prepost
from rkbench.runtimes.backends import Runtime
from rkbench.stages import Artifact, from_cache


@dataclass(frozen=True)
class Decoder:
    """How to turn one image's raw outputs into candidate boxes; read from the export info."""

    head: str                   # rknn | ultralytics | yolov5
    num_classes: int
    resolution: int
    reg_max: int = 16
    anchors: tuple = ()

    @classmethod
    def from_export(cls, info: dict, resolution: int) -> "Decoder":
        head = "yolov5" if info.get("family") == "yolov5" else info["head"]
        anchors = tuple(map(tuple, np.asarray(info["anchors"]).reshape(3, -1).tolist())) if head == "yolov5" else ()
        return cls(head, int(info["num_classes"]), resolution, int(info.get("reg_max", 16)), anchors)

    def __call__(self, outputs: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        if self.head == "rknn":
            return prepost.decode_rknn_head(outputs, self.num_classes, self.reg_max)
        if self.head == "ultralytics":
            return prepost.decode_ultralytics_head(outputs[0])
        anchors = np.asarray(self.anchors, dtype=np.float32).reshape(3, -1, 2)
        return prepost.decode_yolov5(outputs, anchors, self.num_classes, self.resolution)


@dataclass
class Evaluation:
    artifact: Artifact              # detections.json
    metrics: dict[str, float]       # eval/*, counts/*
    infer_ms: list[float]           # per batch, warmup excluded
    where: str                      # host | simulator
    runtime: str


def detect(runtime: Runtime, dataset: Dataset, decoder: Decoder, batch: int, cfg: EvalConfig
           ) -> tuple[list[dict], list[float]]:
    """All images through runtime.infer in batches of `batch` (the last one padded by repeating)."""
    detections: list[dict] = []
    infer_ms: list[float] = []
    images = dataset.images
    for start in range(0, len(images), batch):
        chunk = images[start:start + batch]
        boxed, infos = zip(*(prepost.letterbox(prepost.load_rgb(rec.path), decoder.resolution) for rec in chunk))
        frames = list(boxed) + [boxed[-1]] * (batch - len(chunk))
        t0 = time.perf_counter()
        outputs = runtime.infer(np.stack(frames))
        infer_ms.append((time.perf_counter() - t0) * 1e3)
        for i, (rec, info) in enumerate(zip(chunk, infos)):
            boxes, scores = decoder([o[i:i + 1] for o in outputs])
            boxes, conf, cls = prepost.select(boxes, scores, cfg.conf, cfg.iou, cfg.max_det)
            boxes = prepost.to_original(boxes, info, rec.width, rec.height)
            for (x1, y1, x2, y2), s, c in zip(boxes.tolist(), conf.tolist(), cls.tolist()):
                detections.append({"image_id": rec.id, "category_id": dataset.category_ids[int(c)],
                                   "bbox": [round(x1, 2), round(y1, 2), round(x2 - x1, 2), round(y2 - y1, 2)],
                                   "score": round(float(s), 5)})
    return detections, infer_ms


def score(dataset: Dataset, detections: list[dict], cfg: EvalConfig, prefix: str) -> dict[str, float]:
    metrics = {f"{prefix}/{k}": v for k, v in coco_metrics(dataset.coco_gt, detections).items()}
    if prefix == "eval":  # count tables for the target runtime only, not for the float reference
        for row in count_table(dataset.coco_gt, detections, tuple(cfg.count_thresholds)):
            for k, v in row.items():
                if k != "conf":
                    metrics[f"counts/c{row['conf']:g}/{k}"] = float(v)
    return metrics


def evaluate(model: Artifact, make_runtime: Callable[[], Runtime], runtime_id: str, where: str,
             dataset: Dataset, decoder: Decoder, batch: int, cfg: EvalConfig, cache: StageCache,
             prefix: str = "eval") -> Evaluation:
    key = stage_key("evaluate", model=model.sha256, runtime=runtime_id, dataset=dataset.fingerprint(),
                    decoder=asdict(decoder), batch=batch, eval=asdict(cfg))
    entry = cache.lookup("evaluate", key)
    if not entry.hit:
        runtime = make_runtime()
        try:
            detections, infer_ms = detect(runtime, dataset, decoder, batch, cfg)
            version = runtime.version()
        finally:
            runtime.close()
        work = cache.begin(entry)
        (work / "detections.json").write_text(json.dumps(detections))
        cache.commit(entry, {"detections": "detections.json"},
                     {"infer_ms": infer_ms, "runtime": runtime_id, "runtime_version": version, "where": where,
                      "images": len(dataset.images), "batch": batch,
                      "measured": time.strftime("%Y-%m-%dT%H:%M:%S")})
    art = from_cache(entry, "detections")
    detections = json.loads(Path(art.path).read_text())
    return Evaluation(art, score(dataset, detections, cfg, prefix), art.info["infer_ms"], where, runtime_id)
