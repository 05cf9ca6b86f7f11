"""Confidence threshold vs correct / false / missed detection counts (the table engineers keep by hand).

Matching is greedy by score: each detection, best score first, takes the unmatched ground-truth box of
its class with the highest IoU, and is correct when that IoU >= `iou`. Because the order is by score,
the matches at a threshold are exactly the first matches of one pass over all detections above the
lowest threshold, so every image is matched once and each threshold is a cumulative count."""

from __future__ import annotations

import numpy as np

def _iou_xywh(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU matrix (len(a), len(b)) of COCO [x, y, w, h] boxes."""
    ax2, ay2 = a[:, 0] + a[:, 2], a[:, 1] + a[:, 3]
    bx2, by2 = b[:, 0] + b[:, 2], b[:, 1] + b[:, 3]
    iw = np.clip(np.minimum(ax2[:, None], bx2[None]) - np.maximum(a[:, None, 0], b[None, :, 0]), 0, None)
    ih = np.clip(np.minimum(ay2[:, None], by2[None]) - np.maximum(a[:, None, 1], b[None, :, 1]), 0, None)
    inter = iw * ih
    union = (a[:, 2] * a[:, 3])[:, None] + (b[:, 2] * b[:, 3])[None] - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def _match_image(det_boxes: np.ndarray, det_cls: np.ndarray, gt_boxes: np.ndarray, gt_cls: np.ndarray,
                 iou: float) -> np.ndarray:
    """Greedy matching of one image's detections (already sorted by descending score) -> correct flags."""
    correct = np.zeros(len(det_boxes), dtype=bool)
    if not len(gt_boxes):
        return correct
    ious = _iou_xywh(det_boxes, gt_boxes)
    ious[det_cls[:, None] != gt_cls[None, :]] = -1.0    # another class never matches
    for d in range(len(det_boxes)):
        g = int(np.argmax(ious[d]))
        if ious[d, g] >= iou:
            correct[d] = True
            ious[:, g] = -1.0                             # taken: later (lower-score) detections skip it
    return correct


def _ratio(num: int, den: int) -> float:
    return num / den if den else 0.0


def _matched(coco_gt: dict, detections: list[dict], floor: float, iou: float) -> tuple[list[dict], np.ndarray, int]:
    """The detections scoring >= floor on images of coco_gt, best score first within each image, their
    correct flags (greedy matching, see the module docstring), and the number of ground-truth boxes."""
    image_ids = {img["id"] for img in coco_gt.get("images", [])}
    gts = [a for a in coco_gt.get("annotations", []) if not a.get("iscrowd", 0) and a["image_id"] in image_ids]
    dets = [d for d in detections if d["image_id"] in image_ids and d["score"] >= floor]

    gt_img = np.array([a["image_id"] for a in gts], dtype=np.int64)
    gt_cls = np.array([a["category_id"] for a in gts], dtype=np.int64)
    gt_box = np.array([a["bbox"] for a in gts], dtype=np.float64).reshape(-1, 4)
    det_img = np.array([d["image_id"] for d in dets], dtype=np.int64)
    det_cls = np.array([d["category_id"] for d in dets], dtype=np.int64)
    det_box = np.array([d["bbox"] for d in dets], dtype=np.float64).reshape(-1, 4)
    det_score = np.array([d["score"] for d in dets], dtype=np.float64)

    # Detections grouped by image, best score first inside each image (stable for equal scores).
    order = np.lexsort((-det_score, det_img))
    det_img, det_cls, det_box = det_img[order], det_cls[order], det_box[order]
    gt_order = np.argsort(gt_img, kind="stable")
    gt_img, gt_cls, gt_box = gt_img[gt_order], gt_cls[gt_order], gt_box[gt_order]

    correct = np.zeros(len(dets), dtype=bool)
    det_starts = np.flatnonzero(np.r_[True, det_img[1:] != det_img[:-1]]) if len(dets) else np.array([], int)
    det_ends = np.r_[det_starts[1:], len(dets)]
    for s, e in zip(det_starts, det_ends):
        g0, g1 = np.searchsorted(gt_img, det_img[s], "left"), np.searchsorted(gt_img, det_img[s], "right")
        correct[s:e] = _match_image(det_box[s:e], det_cls[s:e], gt_box[g0:g1], gt_cls[g0:g1], iou)
    return [dets[i] for i in order], correct, len(gts)


def count_table(coco_gt: dict, detections: list[dict], thresholds=(0.25, 0.5, 0.63, 0.8),
                iou: float = 0.5) -> list[dict]:
    """One row per threshold (a detection counts when score >= conf): conf, gt, correct, false, missed,
    correct_ratio = correct/gt, false_ratio = false/(correct+false), missed_ratio = missed/gt.
    Ground truth with iscrowd=1 is neither counted nor matched; detections on images not in coco_gt are
    ignored; a ratio with a zero denominator is 0.0."""
    thresholds = [float(t) for t in thresholds]
    dets, correct, n_gt = _matched(coco_gt, detections, min(thresholds, default=0.0), iou)
    det_score = np.array([d["score"] for d in dets], dtype=np.float64)
    rows = []
    for t in thresholds:
        above = det_score >= t
        n_correct = int(np.count_nonzero(correct & above))
        n_false = int(np.count_nonzero(above)) - n_correct
        missed = n_gt - n_correct
        rows.append({"conf": t, "gt": n_gt, "correct": n_correct, "false": n_false, "missed": missed,
                     "correct_ratio": _ratio(n_correct, n_gt), "false_ratio": _ratio(n_false, n_correct + n_false),
                     "missed_ratio": _ratio(missed, n_gt)})
    return rows


def highest_false(coco_gt: dict, detections: list[dict], floor: float = 0.0, iou: float = 0.5) -> dict | None:
    """The highest-scoring false detection (score >= floor) under the same matching as count_table: the one
    a threshold must pass to have no false detection at all. None when every detection is correct."""
    dets, correct, _ = _matched(coco_gt, detections, floor, iou)
    false = [d for d, ok in zip(dets, correct) if not ok]
    return max(false, key=lambda d: d["score"], default=None)
