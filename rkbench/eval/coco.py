"""COCO bbox metrics with pycocotools' COCOeval, quietly.

pycocotools prints progress on stdout and crashes on an empty result list (`loadRes` reads anns[0]), so
both COCO objects are built here from dicts with their prints captured. COCOeval's -1 ("no ground truth
in this area range") becomes NaN: it is not a score, and a 0.0 would claim the model missed everything."""

from __future__ import annotations

import contextlib
import io
import math
import re

import numpy as np

# COCOeval.stats[0:9] for iouType="bbox"; ar_small/medium/large (stats[9:12]) are not reported.
KEYS = ("map50_95", "map50", "map75", "map_small", "map_medium", "map_large", "ar1", "ar10", "ar100")


def _gt_dataset(coco_gt: dict) -> dict:
    """A copy of the ground truth with the fields COCOeval needs (id, area, iscrowd) filled in."""
    annotations = []
    for i, ann in enumerate(coco_gt.get("annotations", [])):
        w, h = ann["bbox"][2], ann["bbox"][3]
        annotations.append({"id": i + 1, "area": w * h, "iscrowd": 0, **ann})
    return {"images": list(coco_gt.get("images", [])), "categories": list(coco_gt.get("categories", [])),
            "annotations": annotations}


def _detection_dataset(gt: dict, detections: list[dict]) -> dict:
    """What COCO.loadRes would build, without mutating the caller's dicts; detections on images that are
    not in the ground truth are dropped (only the ground-truth images are evaluated)."""
    image_ids = {img["id"] for img in gt["images"]}
    annotations = []
    for det in detections:
        if det["image_id"] in image_ids:
            x, y, w, h = det["bbox"]
            annotations.append({"image_id": det["image_id"], "category_id": det["category_id"],
                                "bbox": [x, y, w, h], "score": float(det["score"]), "area": w * h,
                                "iscrowd": 0, "id": len(annotations) + 1})
    return {"images": gt["images"], "categories": gt["categories"], "annotations": annotations}


def _cocoeval(coco_gt: dict, detections: list[dict]):
    """A COCOeval (bbox) over the images of `coco_gt`, evaluated and accumulated, its prints swallowed."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    gt = _gt_dataset(coco_gt)
    with contextlib.redirect_stdout(io.StringIO()):
        cocogt, cocodt = COCO(), COCO()
        cocogt.dataset = gt
        cocogt.createIndex()
        cocodt.dataset = _detection_dataset(gt, detections)
        cocodt.createIndex()
        ev = COCOeval(cocogt, cocodt, iouType="bbox")
        ev.params.imgIds = sorted(cocogt.getImgIds())
        ev.evaluate()
        ev.accumulate()
    return ev


def coco_metrics(coco_gt: dict, detections: list[dict]) -> dict[str, float]:
    """COCOeval (bbox) over the images of `coco_gt`. Keys: map50_95 map50 map75 map_small map_medium
    map_large ar1 ar10 ar100. No detections gives 0.0 wherever ground truth exists."""
    ev = _cocoeval(coco_gt, detections)
    with contextlib.redirect_stdout(io.StringIO()):
        ev.summarize()
    stats = np.asarray(ev.stats, dtype=float)
    return {k: (math.nan if stats[i] < 0 else float(stats[i])) for i, k in enumerate(KEYS)}


def per_class_ap(coco_gt: dict, detections: list[dict]) -> dict[str, float]:
    """AP50-95 of each category of `coco_gt`, keyed by its name: COCOeval's precision for that category
    averaged over the 10 IoU thresholds and 101 recall points (area all, 100 detections per image), as
    pycocotools' summarize() does for the whole set. A category without ground truth is NaN. Characters
    that MLflow refuses in a metric name become '_' (the keys go into `eval_class/<name>`)."""
    ev = _cocoeval(coco_gt, detections)
    precision = ev.eval["precision"][:, :, :, 0, -1]      # [iou, recall, category] at area all, maxDets 100
    names = {c["id"]: c.get("name", str(c["id"])) for c in coco_gt.get("categories", [])}
    out = {}
    for k, cat_id in enumerate(ev.params.catIds):
        p = precision[:, :, k]
        out[re.sub(r"[^\w\-. /]", "_", names[cat_id])] = float(p[p > -1].mean()) if (p > -1).any() else math.nan
    return out
