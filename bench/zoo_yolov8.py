"""Reference: the YOLOv8 post-processing of rknn_model_zoo's Python demo, re-implemented for side-by-side
benchmarks and equivalence tests (behaviour only; no text taken from it).

Source: https://github.com/airockchip/rknn_model_zoo, examples/yolov8/python/yolov8.py (functions dfl,
box_process, filter_boxes, nms_boxes, post_process; OBJ_THRESH 0.25 / NMS_THRESH 0.45 for deployment,
0.001 / 0.65 for the mAP test; IMG_SIZE (640, 640) as (width, height)). What it does, and so what this does:

- outputs: per branch (strides 8, 16, 32) box distribution [1, 4*reg_max, H, W], class scores [1, nc, H, W]
  and score sum [1, 1, H, W]; the score sum is ignored, every anchor is decoded.
- DFL per branch: softmax over the reg_max bins of each side, then its expectation. The zoo does this in
  torch (float32); `dfl="numpy"` (the default) is the numpy equivalent (same float32 math, agreeing to
  ~1e-6), `dfl="torch"` runs it in torch as the zoo does.
- box: (cell + 0.5 -/+ distance) * stride -> xyxy in input pixels; the grid is integer, so the boxes come out
  float64. The x stride is taken from the height and the y stride from the width (equal for square inputs).
- filter: best class per anchor (argmax), kept where its score >= the threshold (objectness is a ones array).
- NMS per class, no cap on the count: score-descending order from argsort reversed, IoU from xywh with 1e-5
  added to the intersection's sides, a box is dropped when its IoU with the kept box exceeds the threshold.
- returns (boxes, classes, scores), class by class; (None, None, None) when nothing survives.
  Classes are visited in ascending order here (the zoo iterates a Python set of the class ids).
"""

from __future__ import annotations

from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np

OBJ_THRESH = 0.25
NMS_THRESH = 0.45
MAP_OBJ_THRESH = 0.001   # the zoo's settings for its COCO mAP test
MAP_NMS_THRESH = 0.65
IMG_SIZE = (640, 640)    # (width, height)
BRANCHES = 3


def dfl_numpy(position: np.ndarray) -> np.ndarray:
    """[n, 4*m, h, w] logits -> [n, 4, h, w] expected distances (softmax over the m bins), float32."""
    n, c, h, w = position.shape
    bins = c // 4
    logits = position.astype(np.float32).reshape(n, 4, bins, h, w)
    prob = np.exp(logits - logits.max(axis=2, keepdims=True))
    prob /= prob.sum(axis=2, keepdims=True)
    weights = np.arange(bins, dtype=np.float32).reshape(1, 1, bins, 1, 1)
    return (prob * weights).sum(axis=2)


def dfl_torch(position: np.ndarray) -> np.ndarray:
    """The same in torch, as the zoo computes it."""
    import torch

    x = torch.tensor(position)
    n, c, h, w = x.shape
    bins = c // 4
    prob = x.reshape(n, 4, bins, h, w).softmax(2)
    weights = torch.arange(bins, dtype=torch.float32).reshape(1, 1, bins, 1, 1)
    return (prob * weights).sum(2).numpy()


def box_process(position: np.ndarray, dfl: Callable[[np.ndarray], np.ndarray] = dfl_numpy,
                img_size: Tuple[int, int] = IMG_SIZE) -> np.ndarray:
    """One branch: [1, 4*m, h, w] -> [1, 4, h, w] xyxy boxes in input pixels (float64)."""
    gh, gw = position.shape[2:4]
    gx, gy = np.meshgrid(np.arange(gw), np.arange(gh))
    grid = np.stack([gx, gy])[None]                                   # [1, 2, h, w] integer
    stride = np.array([img_size[1] // gh, img_size[0] // gw]).reshape(1, 2, 1, 1)
    dist = dfl(position)
    top_left = (grid + 0.5 - dist[:, :2]) * stride
    bottom_right = (grid + 0.5 + dist[:, 2:]) * stride
    return np.concatenate([top_left, bottom_right], axis=1)


def _cells_last(x: np.ndarray) -> np.ndarray:
    """[1, ch, h, w] -> [h*w, ch]"""
    return x.transpose(0, 2, 3, 1).reshape(-1, x.shape[1])


def filter_boxes(boxes: np.ndarray, class_probs: np.ndarray, thresh: float
                 ) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    best = class_probs.max(axis=-1) * np.ones(len(class_probs), np.float32)  # objectness = 1
    classes = class_probs.argmax(axis=-1)
    keep = np.nonzero(best >= thresh)
    return boxes[keep], classes[keep], best[keep]


def nms_boxes(boxes: np.ndarray, scores: np.ndarray, thresh: float) -> np.ndarray:
    """Greedy NMS of one class; indices of the kept boxes, best first."""
    x, y = boxes[:, 0], boxes[:, 1]
    w, h = boxes[:, 2] - x, boxes[:, 3] - y
    areas = w * h
    order = scores.argsort()[::-1]
    kept: List[int] = []
    while order.size:
        i, rest = order[0], order[1:]
        kept.append(i)
        iw = np.maximum(0.0, np.minimum(x[i] + w[i], x[rest] + w[rest]) - np.maximum(x[i], x[rest]) + 1e-5)
        ih = np.maximum(0.0, np.minimum(y[i] + h[i], y[rest] + h[rest]) - np.maximum(y[i], y[rest]) + 1e-5)
        inter = iw * ih
        iou = inter / (areas[i] + areas[rest] - inter)
        order = rest[iou <= thresh]
    return np.array(kept)


def post_process(outputs: Sequence[np.ndarray], obj_thresh: float = OBJ_THRESH, nms_thresh: float = NMS_THRESH,
                 dfl: Callable[[np.ndarray], np.ndarray] = dfl_numpy, img_size: Tuple[int, int] = IMG_SIZE
                 ) -> Tuple[Optional[np.ndarray], Optional[np.ndarray], Optional[np.ndarray]]:
    """rknn-head outputs of one image -> (boxes xyxy [N, 4], classes [N], scores [N]) or (None, None, None)."""
    per_branch = len(outputs) // BRANCHES
    boxes = np.concatenate([_cells_last(box_process(outputs[per_branch * b], dfl, img_size))
                            for b in range(BRANCHES)])
    class_probs = np.concatenate([_cells_last(outputs[per_branch * b + 1]) for b in range(BRANCHES)])
    boxes, classes, scores = filter_boxes(boxes, class_probs, obj_thresh)
    out_b, out_c, out_s = [], [], []
    for k in np.unique(classes):
        idx = np.nonzero(classes == k)
        b, c, s = boxes[idx], classes[idx], scores[idx]
        keep = nms_boxes(b, s, nms_thresh)
        if len(keep):
            out_b.append(b[keep])
            out_c.append(c[keep])
            out_s.append(s[keep])
    if not out_c:
        return None, None, None
    return np.concatenate(out_b), np.concatenate(out_c), np.concatenate(out_s)


def differences(zoo_result: Tuple[Optional[np.ndarray], Optional[np.ndarray], Optional[np.ndarray]],
                boxes: np.ndarray, scores: np.ndarray, classes: np.ndarray, atol: float = 1e-3) -> List[str]:
    """How post_process's (boxes, classes, scores) differs from rkbench's select() result (boxes, scores,
    classes), as sets of detections: [] when they hold the same boxes (within atol pixels; the zoo's are
    float64, rkbench's float32), classes and scores (exactly: both are the input's float32 values)."""
    zb, zc, zs = zoo_result
    if zb is None:
        zb, zc, zs = np.zeros((0, 4)), np.zeros(0, np.int64), np.zeros(0, np.float32)

    def canonical(b, s, c):
        order = np.lexsort((b[:, 0], -np.asarray(s, np.float64), c))
        return np.asarray(b, np.float64)[order], np.asarray(s)[order], np.asarray(c)[order]

    zb, zs, zc = canonical(zb, zs, zc)
    rb, rs, rc = canonical(boxes, scores, classes)
    if len(zb) != len(rb):
        return [f"{len(zb)} zoo detections, {len(rb)} rkbench"]
    out = []
    if not np.array_equal(zc, rc):
        out.append(f"classes differ at {np.flatnonzero(zc != rc)[:5].tolist()}")
    if not np.array_equal(zs.astype(np.float32), rs.astype(np.float32)):
        out.append(f"scores differ at {np.flatnonzero(zs.astype(np.float32) != rs.astype(np.float32))[:5].tolist()}")
    far = np.flatnonzero(np.abs(zb - rb).max(axis=1) > atol) if len(zb) else []
    if len(far):
        out.append(f"{len(far)} boxes differ by more than {atol} px, first at {int(far[0])}: "
                   f"{zb[far[0]].round(3).tolist()} vs {rb[far[0]].round(3).tolist()}")
    return out
