"""The one detection path, used identically by host evaluation, the simulator and the on-device runner:

    letterbox -> runtime.infer -> decode -> select -> original pixels -> COCO records

An InferenceSpec says how a model is fed and read. It is built once per run from the configuration and
the exported model (which records its real input size and class count), frozen, and written as JSON:
the on-device runner reads the same file instead of a flag per setting.

Board-pushable: numpy and prepost only, no rkbench imports (the board's Python may be 3.8)."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np

try:
    import prepost  # type: ignore[no-redef]  # the copy pushed beside the runner
except ImportError:
    from rkbench.models import prepost

SPEC_VERSION = 1
HEADS = ("rknn", "ultralytics", "yolov5")


class SpecError(ValueError):
    """An inference spec that cannot be run; the message names the fix."""


@dataclass(frozen=True)
class InferenceSpec:
    input_size: int                         # square model input in pixels, read from the exported graph
    head: str                               # rknn | ultralytics | yolov5
    num_classes: int                        # read from the exported graph
    category_ids: Tuple[int, ...]           # COCO category id of each class index (the dataset's)
    reg_max: int = 16                       # YOLOv8 DFL bins
    anchors: Tuple[Tuple[float, ...], ...] = ()   # YOLOv5: 3 rows of (w, h) pairs in pixels
    batch: int = 1                          # images per runtime.infer call (rknn_batch_size of a .rknn)
    conf: float = 0.001
    iou: float = 0.7
    max_det: int = 300
    runtime: str = "onnxruntime"            # onnxruntime | rknn-simulator | rknnlite | null
    core_mask: str = "auto"                 # rknnlite only; "auto" everywhere else
    threads: int = 0                        # onnxruntime intra-op threads (0 = its default)
    # onnxruntime only (a .rknn has them folded in); one value per model input channel: 3 (RGB) or 1 (gray)
    mean: Tuple[float, ...] = (0.0, 0.0, 0.0)
    std: Tuple[float, ...] = (255.0, 255.0, 255.0)
    version: int = field(default=SPEC_VERSION)

    def __post_init__(self) -> None:
        if self.head not in HEADS:
            raise SpecError(f"head {self.head!r} is not one of {', '.join(HEADS)}: re-export the model")
        if self.input_size <= 0 or self.input_size % 32:
            raise SpecError(f"input_size {self.input_size} is not a positive multiple of 32: re-export the model")
        if self.batch < 1:
            raise SpecError(f"batch {self.batch} must be >= 1")
        if len(self.category_ids) != self.num_classes:
            raise SpecError(f"the model has {self.num_classes} classes but {len(self.category_ids)} category ids "
                            "were given: evaluate on a dataset with the model's classes")
        if not len(self.mean) == len(self.std) in (1, 3):
            raise SpecError(f"mean {self.mean} / std {self.std}: give one value per input channel, 3 (RGB) or 1 (gray)")
        if self.head == "yolov5" and len(self.anchors) != 3:
            raise SpecError("a yolov5 head needs 3 rows of anchors (w, h pairs in pixels per scale)")

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: Dict[str, Any]) -> "InferenceSpec":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise SpecError(f"unknown inference spec keys {', '.join(unknown)}: push the runner that wrote this spec")
        if data.get("version", SPEC_VERSION) != SPEC_VERSION:
            raise SpecError(f"spec version {data.get('version')} != {SPEC_VERSION}: push the matching runner")
        tuples = {"category_ids": lambda v: tuple(int(x) for x in v),
                  "anchors": lambda v: tuple(tuple(float(x) for x in row) for row in v),
                  "mean": lambda v: tuple(float(x) for x in v), "std": lambda v: tuple(float(x) for x in v)}
        try:
            return cls(**{k: tuples[k](v) if k in tuples else v for k, v in data.items()})
        except TypeError as exc:
            raise SpecError(f"inference spec incomplete ({exc}): write it with rkbench") from None


# ------------------------------------------------------------------------------------------- the path

class Detector:
    """A runtime plus the spec it was built for: frames in, detections in original pixels out."""

    def __init__(self, spec: InferenceSpec, runtime: Any):
        self.spec = spec
        self.runtime = runtime
        self._anchors = (np.asarray(spec.anchors, dtype=np.float32).reshape(3, -1, 2) if spec.head == "yolov5"
                         else None)

    def prepare(self, images: Sequence[np.ndarray]) -> Tuple[np.ndarray, list]:
        """Letterboxed batch of exactly spec.batch frames (the last one repeated to fill) and their infos."""
        boxed, infos = [], []
        for img in images:
            b, info = prepost.letterbox(img, self.spec.input_size)
            boxed.append(b if len(self.spec.mean) == 3 else prepost.to_gray(b))   # a 1-channel model takes gray
            infos.append(info)
        boxed += [boxed[-1]] * (self.spec.batch - len(boxed))
        return np.stack(boxed), infos

    def decode(self, outputs: List[np.ndarray], i: int) -> Tuple[np.ndarray, np.ndarray]:
        """Image i of a batch: candidate boxes (model pixels, xyxy) and per-class scores."""
        s = self.spec
        mine = [o[i:i + 1] for o in outputs]
        if s.head == "rknn":   # DFL only on cells that can pass conf: the same boxes, less work
            return prepost.decode_rknn_head(mine, s.num_classes, s.reg_max, min_score=s.conf)
        if s.head == "ultralytics":
            return prepost.decode_ultralytics_head(mine[0])
        return prepost.decode_yolov5(mine, self._anchors, s.num_classes, s.input_size)

    def detect(self, outputs: List[np.ndarray], i: int, info: Any, width: int, height: int
               ) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Image i of a batch: boxes in its original pixels (xyxy), scores, class indices."""
        boxes, scores = self.decode(outputs, i)
        boxes, conf, cls = prepost.select(boxes, scores, self.spec.conf, self.spec.iou, self.spec.max_det)
        return prepost.to_original(boxes, info, width, height), conf, cls

    def records(self, image_id: int, boxes: np.ndarray, scores: np.ndarray, classes: np.ndarray) -> List[dict]:
        """COCO results format in original pixels."""
        ids = self.spec.category_ids
        return [{"image_id": image_id, "category_id": int(ids[int(c)]),
                 "bbox": [round(x1, 2), round(y1, 2), round(x2 - x1, 2), round(y2 - y1, 2)], "score": round(float(s), 5)}
                for (x1, y1, x2, y2), s, c in zip(boxes.tolist(), scores.tolist(), classes.tolist())]

    def evaluate(self, items: Iterable[Tuple[int, str]], on_batch: Optional[Any] = None
                 ) -> Tuple[List[dict], List[Tuple[float, float, float]]]:
        """Every (image_id, path) through the path in batches of spec.batch. Returns the COCO detections
        and, per batch, the seconds spent in (pre-processing, runtime.infer, post-processing)."""
        items = list(items)
        detections: List[dict] = []
        rows: List[Tuple[float, float, float]] = []
        for start in range(0, len(items), self.spec.batch):
            chunk = items[start:start + self.spec.batch]
            t0 = time.perf_counter()
            images = [prepost.load_rgb(path) for _, path in chunk]
            x, infos = self.prepare(images)
            t1 = time.perf_counter()
            outputs = self.runtime.infer(x)
            t2 = time.perf_counter()
            for j, ((image_id, _), img, info) in enumerate(zip(chunk, images, infos)):
                detections.extend(self.records(image_id, *self.detect(outputs, j, info, img.shape[1], img.shape[0])))
            rows.append((t1 - t0, t2 - t1, time.perf_counter() - t2))
            if on_batch is not None:
                on_batch(len(chunk))
        return detections, rows
