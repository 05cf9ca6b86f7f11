"""Pre- and post-processing shared by every runtime: host, simulator and board.

This file is pushed to the board next to the runner, so it imports numpy and cv2 only (no rkbench,
no torch) and keeps to Python 3.8 syntax. Same letterbox, decode and NMS everywhere = comparable mAP."""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Sequence, Tuple, Union

import numpy as np

Boxes = np.ndarray  # (N, 4) float32 xyxy

_NMS_BLOCK = 32          # candidates whose IoU rows are computed together in nms()
_MAX_CANDIDATES = 30000  # select() keeps at most this many (highest-score) candidates for NMS


@dataclass
class LetterboxInfo:
    """model_xy = orig_xy * scale + pad"""

    scale: float
    pad_x: float
    pad_y: float


def load_rgb(path) -> np.ndarray:
    """HxWx3 uint8 RGB. ValueError (this file imports no rkbench, so no DataError) naming the file when it
    does not decode, truncated files included: datasets reject those up front, this is the last check."""
    import cv2

    # imdecode, not imread: Ultralytics replaces cv2.imread on import with a version that tries to
    # pip-install pi-heif when a file does not decode; and imread returns a truncated JPEG as a partly
    # grey image with only a warning, where imdecode returns None.
    img = cv2.imdecode(np.fromfile(str(path), dtype=np.uint8), cv2.IMREAD_COLOR)
    if img is None:
        raise ValueError(f"cannot read image {path} (truncated, damaged or not an image): replace or remove it")
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


def letterbox(img_rgb: np.ndarray, size: Union[int, Tuple[int, int]], color: int = 114) -> Tuple[np.ndarray, LetterboxInfo]:
    """Resize keeping the aspect ratio, pad to size (h, w) with a centred border, like Ultralytics."""
    import cv2

    out_h, out_w = (size, size) if isinstance(size, int) else size
    h, w = img_rgb.shape[:2]
    scale = min(out_h / h, out_w / w)
    new_w, new_h = int(round(w * scale)), int(round(h * scale))
    resized = img_rgb if (new_w, new_h) == (w, h) else cv2.resize(img_rgb, (new_w, new_h), interpolation=cv2.INTER_LINEAR)
    pad_x, pad_y = (out_w - new_w) / 2.0, (out_h - new_h) / 2.0
    top, left = int(round(pad_y - 0.1)), int(round(pad_x - 0.1))
    out = np.full((out_h, out_w, 3), color, dtype=np.uint8)
    out[top:top + new_h, left:left + new_w] = resized
    return out, LetterboxInfo(scale, float(left), float(top))


def to_original(boxes: Boxes, info: LetterboxInfo, orig_w: int, orig_h: int) -> Boxes:
    """Undo the letterbox and clip to the image."""
    out = np.asarray(boxes, dtype=np.float32).copy()
    out[:, [0, 2]] = (out[:, [0, 2]] - info.pad_x) / info.scale
    out[:, [1, 3]] = (out[:, [1, 3]] - info.pad_y) / info.scale
    out[:, [0, 2]] = out[:, [0, 2]].clip(0, orig_w)
    out[:, [1, 3]] = out[:, [1, 3]].clip(0, orig_h)
    return out


def _grid(h: int, w: int) -> Tuple[np.ndarray, np.ndarray]:
    """Cell indices (x, y) in row-major order, as flat arrays."""
    gy, gx = np.meshgrid(np.arange(h, dtype=np.float32), np.arange(w, dtype=np.float32), indexing="ij")
    return gx.reshape(-1), gy.reshape(-1)


def decode_rknn_head(outputs: Sequence[np.ndarray], num_classes: int, reg_max: int = 16,
                     min_score: float = 0.0) -> Tuple[Boxes, np.ndarray]:
    """rknn_model_zoo YOLOv8 layout, per scale: box distribution [1, 4*reg_max, H, W] (raw),
    class scores [1, nc, H, W] (sigmoid), score sum [1, 1, H, W]. DFL = softmax expectation.

    min_score > 0 uses the score sum as rknn_model_zoo does: a cell whose clipped class-score sum is below
    min_score has no class score above it, so on a scale where fewer than half the cells pass only those
    are decoded and returned. select(conf_thr >= min_score) gives the same detections either way.
    0 (default) returns every anchor, in the official head's order."""
    if len(outputs) % 3:
        raise ValueError(f"rknn head expects 3 outputs per scale, got {len(outputs)}")
    # The input size follows from the largest map: stride 8 on the first scale.
    input_h = outputs[0].shape[2] * 8
    bins = np.arange(reg_max, dtype=np.float32)
    all_boxes, all_scores = [], []
    for i in range(0, len(outputs), 3):
        box, cls, total = outputs[i], outputs[i + 1], outputs[i + 2]
        h, w = box.shape[2], box.shape[3]
        stride = input_h / h
        dist = box.reshape(4, reg_max, h * w).astype(np.float32)
        scores = cls.reshape(num_classes, h * w)
        gx, gy = _grid(h, w)
        cells = np.flatnonzero(total.reshape(h * w) >= min_score) if min_score > 0 else None
        if cells is not None and 2 * cells.size < h * w:  # the gathers below cost more than they save otherwise
            # np.take keeps C order; fancy indexing on the last axis would not (and slows the math below)
            dist, scores = np.take(dist, cells, axis=2), np.take(scores, cells, axis=1)
            gx, gy = gx[cells], gy[cells]
        # DFL: softmax over the bins, then its expectation = (bins . e) / sum(e), one matmul
        e = dist - dist.max(axis=1, keepdims=True)
        np.exp(e, out=e)
        ltrb = np.matmul(bins, e) / e.sum(axis=1)  # (4, cells)
        gx, gy = gx + 0.5, gy + 0.5  # anchor points are the cell centres
        all_boxes.append(np.stack([gx - ltrb[0], gy - ltrb[1], gx + ltrb[2], gy + ltrb[3]], axis=1) * stride)
        all_scores.append(scores)
    # (nc, N) joined row by row, returned as its (N, nc) transpose: a transposing copy costs more than select
    scores = np.concatenate(all_scores, axis=1).astype(np.float32, copy=False).T
    return np.concatenate(all_boxes).astype(np.float32), scores


def decode_ultralytics_head(output: np.ndarray) -> Tuple[Boxes, np.ndarray]:
    """Official head [1, 4+nc, A]: xywh in pixels, sigmoid class scores. The scores are a transposed
    view of `output` (copying 8400 x 80 floats costs more than select)."""
    o = output.reshape(output.shape[-2], output.shape[-1]).astype(np.float32, copy=False)
    xy, wh = o[0:2].T, o[2:4].T
    return np.concatenate([xy - wh / 2, xy + wh / 2], axis=1), o[4:].T


def decode_yolov5(outputs: Sequence[np.ndarray], anchors: np.ndarray, num_classes: int, input_size: int) -> Tuple[Boxes, np.ndarray]:
    """Raw YOLOv5 head convs [1, na*(5+nc), H, W] per scale; anchors (3, na, 2) in pixels.
    xy = (2*sig - 0.5 + grid) * stride, wh = (2*sig)^2 * anchor, scores = obj * cls."""
    anchors = np.asarray(anchors, dtype=np.float32).reshape(len(outputs), -1, 2)
    na = anchors.shape[1]
    all_boxes, all_scores = [], []
    for level, out in enumerate(outputs):
        h, w = out.shape[2], out.shape[3]
        stride = input_size / h
        p = 1.0 / (1.0 + np.exp(-out.reshape(na, 5 + num_classes, h * w).astype(np.float32)))
        gx, gy = _grid(h, w)
        cx = (p[:, 0] * 2 - 0.5 + gx) * stride
        cy = (p[:, 1] * 2 - 0.5 + gy) * stride
        bw = (p[:, 2] * 2) ** 2 * anchors[level, :, 0:1]
        bh = (p[:, 3] * 2) ** 2 * anchors[level, :, 1:2]
        all_boxes.append(np.stack([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2], axis=-1).reshape(-1, 4))
        all_scores.append((p[:, 5:] * p[:, 4:5]).transpose(0, 2, 1).reshape(-1, num_classes))
    return np.concatenate(all_boxes).astype(np.float32), np.concatenate(all_scores).astype(np.float32)


def nms(boxes: Boxes, scores: np.ndarray, iou_thr: float, limit: int = 0) -> np.ndarray:
    """Greedy NMS; keep indices in score-descending order; stop after `limit` kept (0 = no limit),
    which bounds the work when thousands of low-score candidates survive a 0.001 threshold.

    Exactly the one-box-at-a-time greedy result, computed in blocks: the IoU of the next `_NMS_BLOCK`
    candidates against all later ones comes from one array expression, and the per-box step is a
    boolean OR. That keeps numpy calls per kept box at ~2 instead of ~15 (the loop was the cost)."""
    order = np.argsort(-scores, kind="stable")
    b = np.asarray(boxes, dtype=np.float32)[order]
    x1, y1, x2, y2 = b[:, 0], b[:, 1], b[:, 2], b[:, 3]
    areas = np.maximum(x2 - x1, 0) * np.maximum(y2 - y1, 0)
    n = len(order)
    suppressed = np.zeros(n, dtype=bool)
    keep: List[int] = []
    for start in range(0, n, _NMS_BLOCK):
        stop = min(start + _NMS_BLOCK, n)
        rows = np.arange(start, stop)[~suppressed[start:stop]]
        if not rows.size:
            continue
        r = rows[:, None]
        iw = np.maximum(np.minimum(x2[r], x2[start:]) - np.maximum(x1[r], x1[start:]), 0)
        ih = np.maximum(np.minimum(y2[r], y2[start:]) - np.maximum(y1[r], y1[start:]), 0)
        inter = iw * ih
        over = inter / (areas[r] + areas[start:] - inter + 1e-9) > iou_thr  # (rows, n - start)
        for j, i in enumerate(rows):
            if suppressed[i]:  # by a box kept earlier in this block
                continue
            keep.append(int(order[i]))
            if len(keep) == limit:
                return np.asarray(keep, dtype=np.int64)
            suppressed[start:] |= over[j]
    return np.asarray(keep, dtype=np.int64)


def select(boxes: Boxes, scores: np.ndarray, conf_thr: float, iou_thr: float, max_det: int = 300
           ) -> Tuple[Boxes, np.ndarray, np.ndarray]:
    """Best class per candidate, confidence filter, per-class NMS (class offset), max_det."""
    conf = scores.max(axis=1)
    idx = np.flatnonzero(conf >= conf_thr)
    if len(idx) > _MAX_CANDIDATES:  # bound the NMS work on pathological outputs (e.g. untrained weights)
        idx = idx[np.argsort(-conf[idx], kind="stable")[:_MAX_CANDIDATES]]
    b, c = boxes[idx], conf[idx]
    k = scores[idx].argmax(axis=1)  # argmax on the survivors only: over all anchors it costs more than NMS
    return _nms_per_class(b, c, k, iou_thr, max_det)


def _nms_per_class(b: Boxes, s: np.ndarray, k: np.ndarray, iou_thr: float, limit: int = 0
                   ) -> Tuple[Boxes, np.ndarray, np.ndarray]:
    """Per-class NMS in one pass: shift each class's boxes by class * (2 * max |coordinate| + 1), more
    than any box's extent (boxes may start below 0), so boxes of different classes never overlap."""
    k = k.astype(np.int64)
    offset = float(max(np.abs(b).max(), 1.0)) * 2 + 1.0 if len(b) else 0.0
    keep = nms(b + (k[:, None] * offset).astype(np.float32), s, iou_thr, limit=limit)
    return b[keep], s[keep], k[keep]


def tiles(width: int, height: int, tile: int, overlap: float) -> List[Tuple[int, int]]:
    """Top-left corners of tile x tile windows covering the frame with at least `overlap` overlap."""
    def starts(length: int) -> List[int]:
        if length <= tile:
            return [0]
        step = max(1, int(tile * (1.0 - overlap)))
        out = list(range(0, length - tile, step))
        return out + [length - tile]
    return [(x, y) for y in starts(height) for x in starts(width)]


def merge_tiles(per_tile: Sequence[Tuple[Boxes, np.ndarray, np.ndarray]], origins: Sequence[Tuple[int, int]],
                iou_thr: float) -> Tuple[Boxes, np.ndarray, np.ndarray]:
    """Shift each tile's detections to frame coordinates and merge the overlaps with per-class NMS."""
    if len(per_tile) != len(origins):
        raise ValueError(f"{len(per_tile)} tile results for {len(origins)} tile origins: pass one origin per tile")
    if not per_tile:
        return np.zeros((0, 4), np.float32), np.zeros(0, np.float32), np.zeros(0, np.int64)
    b = np.concatenate([bx + np.array([x, y, x, y], np.float32) for (bx, _, _), (x, y) in zip(per_tile, origins)])
    s = np.concatenate([sc for _, sc, _ in per_tile])
    k = np.concatenate([cl for _, _, cl in per_tile])
    return _nms_per_class(b, s, k, iou_thr)
