"""Pre- and post-processing shared by every runtime: host, simulator and board.

This file is pushed to the board next to the runner, so it imports numpy and cv2 only (no rkbench,
no torch) and keeps to Python 3.8 syntax. Same letterbox, decode and NMS everywhere = comparable mAP."""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np

Boxes = np.ndarray  # (N, 4) float32 xyxy

_NMS_BLOCK = 32          # candidates whose IoU rows are computed together in _nms_blocked()
_MAX_CANDIDATES = 30000  # select() keeps at most this many (highest-score) candidates for NMS
_MAX_PAIRS = 1 << 20     # nms() beyond this many candidate pairs (see _sweep): the blocked variant
_ROUNDS = 8              # vectorised greedy rounds in _resolve_greedy before its plain-Python pass


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

    min_score > 0: on a scale where fewer than half the cells have a class score >= min_score, only those
    are decoded (DFL included) and returned, in order; select(conf_thr >= min_score) gives the same
    detections either way (boxes to float32 rounding: numpy's reductions round by array size).
    rknn_model_zoo's C demo skips on the score-sum output instead: a looser bound, and one quantised
    separately on the NPU, which can drop a cell whose best score passes.
    0 (default) returns every anchor, in the official head's order."""
    if len(outputs) % 3:
        raise ValueError(f"rknn head expects 3 outputs per scale, got {len(outputs)}")
    # The input size follows from the largest map: stride 8 on the first scale.
    input_h = outputs[0].shape[2] * 8
    bins = np.arange(reg_max, dtype=np.float32)
    all_boxes, all_scores = [], []
    for i in range(0, len(outputs), 3):
        box, cls = outputs[i], outputs[i + 1]  # outputs[i + 2], the score sum, is not needed
        h, w = box.shape[2], box.shape[3]
        stride = input_h / h
        dist = box.reshape(4, reg_max, h * w)
        scores = cls.reshape(num_classes, h * w)
        gx, gy = _grid(h, w)
        cells = np.flatnonzero(scores.max(axis=0) >= min_score) if min_score > 0 else None
        if cells is not None and 2 * cells.size < h * w:  # the gathers below cost more than they save otherwise
            # np.take keeps C order; fancy indexing on the last axis would not (and slows the math below)
            dist, scores = np.take(dist, cells, axis=2), np.take(scores, cells, axis=1)
            gx, gy = gx[cells], gy[cells]
        # DFL: softmax over the bins, then its expectation = (bins . e) / sum(e), one matmul
        dist = dist.astype(np.float32, copy=False)
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
    """Greedy NMS; keep indices in score-descending order; stop after `limit` kept (0 = no limit).
    A box is dropped when its IoU with a kept, higher-scoring box exceeds iou_thr (ties in score: lower
    index first)."""
    return _greedy_nms(np.asarray(boxes, dtype=np.float32), np.asarray(scores), None, iou_thr, limit)


def _greedy_nms(b: Boxes, scores: np.ndarray, classes: Optional[np.ndarray], iou_thr: float, limit: int = 0
                ) -> np.ndarray:
    """Exactly the one-box-at-a-time greedy result (per class when `classes` is given), without a Python
    step per box: the IoU is computed only for the pairs of a class that overlap enough along one axis to
    possibly pass iou_thr (a sort and a searchsorted find them, _sweep), and the greedy order is resolved
    on the pairs above iou_thr (_resolve_greedy)."""
    n = len(scores)
    order = np.argsort(-scores, kind="stable")
    if n < 2:
        return order.astype(np.int64)[:limit if limit > 0 else None]
    # IoU <= overlap along an axis / either box's extent on it, so a pair can pass iou_thr only when the box
    # starting later starts before the other's end minus iou_thr of the other's extent (float64 and 0.999:
    # slack for the float32 rounding of the IoU). Sweep along the axis where that leaves fewer pairs.
    reach = 0.999 * max(float(iou_thr), 0.0)
    sweeps = [_sweep(b[:, axis], b[:, axis + 2], reach, classes) + (axis,) for axis in (0, 1)]
    by_lo, count, pairs, axis = min(sweeps, key=lambda sw: sw[2])
    if pairs > _MAX_PAIRS or iou_thr < 0:  # thousands of boxes of one class on one spot: bound the memory;
        return _nms_blocked(b, scores, classes, iou_thr, limit)  # < 0: disjoint boxes suppress each other too
    if pairs:
        over_i, over_j = _overlapping_pairs(b[by_lo], count, pairs, axis, reach, iou_thr)
        rank = np.empty(n, dtype=np.int32)
        rank[order] = np.arange(n, dtype=np.int32)
        rank = rank[by_lo]  # in sweep order, like the pairs
        ri, rj = rank[over_i], rank[over_j]
        order = order[_resolve_greedy(n, np.minimum(ri, rj), np.maximum(ri, rj))]
    return order.astype(np.int64)[:limit if limit > 0 else None]


def _sweep(lo: np.ndarray, hi: np.ndarray, reach: float, classes: Optional[np.ndarray]
           ) -> Tuple[np.ndarray, np.ndarray, int]:
    """Boxes sorted by (class, lo) and, for each in that order, how many of the next ones have the same class
    and start before its hi - reach * extent: _greedy_nms's candidate pairs. Integer keys (class, rank of lo
    among the lo values) keep the comparison exact whatever the coordinates' magnitude."""
    hi = hi.astype(np.float64)
    values = np.unique(lo)
    key = np.searchsorted(values, lo)
    end = np.searchsorted(values, hi - reach * (hi - lo))  # lo_j < bound <=> rank of lo_j < end
    if classes is not None:
        base = classes.astype(np.int64) * len(values)
        key, end = key + base, end + base
    order = np.argsort(key, kind="stable")
    count = np.maximum(np.searchsorted(key[order], end[order]) - np.arange(1, len(lo) + 1), 0)
    return order, count, int(count.sum())


def _overlapping_pairs(b: Boxes, count: np.ndarray, pairs: int, axis: int, reach: float, iou_thr: float
                       ) -> Tuple[np.ndarray, np.ndarray]:
    """The candidate pairs (i, j > i) of _sweep, boxes `b` in its order, whose IoU exceeds iou_thr. Box i's
    partners are i+1 .. i+count[i]; values of the i side come from np.repeat (a sequential copy, cheaper
    than a gather)."""
    n = len(b)
    first = np.cumsum(count) - count  # first pair of each box
    j = np.arange(pairs, dtype=np.int32) + np.repeat((np.arange(1, n + 1) - first).astype(np.int32), count)
    lo, hi, o_lo, o_hi = b[:, axis], b[:, axis + 2], b[:, 1 - axis], b[:, 3 - axis]
    ext = o_hi - o_lo
    # the other axis first (cheap, usually drops most pairs): overlap there must also beat reach * extents
    ov = np.minimum(np.repeat(o_hi, count), o_hi[j])
    ov -= np.maximum(np.repeat(o_lo, count), o_lo[j])
    keep = np.flatnonzero(ov > reach * np.maximum(np.repeat(ext, count), ext[j]))
    i = (np.searchsorted(first, keep, side="right") - 1).astype(np.int32)
    j, ov = j[keep], np.maximum(ov[keep], 0)
    inter = np.minimum(hi[i], hi[j]) - lo[j]  # lo[j] >= lo[i] in sweep order
    np.maximum(inter, 0, out=inter)
    inter *= ov
    areas = np.maximum(hi - lo, 0) * np.maximum(ext, 0)
    over = np.flatnonzero(inter / (areas[i] + areas[j] - inter + 1e-9) > iou_thr)
    return i[over], j[over]


def _resolve_greedy(n: int, better: np.ndarray, worse: np.ndarray) -> np.ndarray:
    """Greedy NMS on ranks 0..n-1 (0 = best score) given the suppressing pairs (better rank, worse rank):
    a box is kept iff no kept better box overlaps it; returns the kept ranks, ascending. Decided in
    vectorised rounds: a box with a kept better neighbour is dropped, one whose better neighbours are all
    dropped is kept. The best undecided box is decided every round and overlap clusters are shallow, so a
    few rounds settle it; what a long chain leaves after _ROUNDS goes through one plain-Python pass."""
    state = np.zeros(n, dtype=np.int8)  # 0 undecided, 1 kept, 2 dropped
    has_better = np.zeros(n, dtype=bool)
    has_better[worse] = True
    state[~has_better] = 1
    for _ in range(_ROUNDS):
        if not better.size:
            return np.flatnonzero(state == 1)
        s = state[better]
        dropped = np.zeros(n, dtype=bool)
        dropped[worse[s == 1]] = True
        waiting = np.zeros(n, dtype=bool)
        waiting[worse[s == 0]] = True
        open_ = state == 0
        state[open_ & dropped] = 2
        state[open_ & ~dropped & ~waiting] = 1
        live = state[worse] == 0
        better, worse = better[live], worse[live]
    # every undecided box still has an edge from a better one; settle them in rank order
    by_worse = np.argsort(worse, kind="stable")
    st = state.tolist()
    for w, bt in zip(worse[by_worse].tolist(), better[by_worse].tolist()):
        if st[w] == 0:
            st[w] = 1  # kept unless a kept better box overlaps it (all better boxes are settled by now)
        if st[bt] == 1:
            st[w] = 2
    return np.flatnonzero(np.asarray(st, dtype=np.int8) == 1)


def _nms_blocked(b: Boxes, scores: np.ndarray, classes: Optional[np.ndarray], iou_thr: float, limit: int = 0
                 ) -> np.ndarray:
    """The greedy result computed in blocks of _NMS_BLOCK candidates (IoU of a block against all later
    candidates in one array expression); classes kept apart by the class offset. Memory stays O(block * n)
    where _greedy_nms's pairs would not, and it stops at `limit`."""
    if classes is not None and len(b):
        # shift each class by more than any box's extent (boxes may start below 0): classes never overlap
        offset = float(max(np.abs(b).max(), 1.0)) * 2 + 1.0
        b = b + (classes.astype(np.int64)[:, None] * offset).astype(np.float32)
    order = np.argsort(-scores, kind="stable")
    b = b[order]
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
    """Best class per candidate, confidence filter, per-class NMS, max_det."""
    conf = scores.max(axis=1)
    idx = np.flatnonzero(conf >= conf_thr)
    if len(idx) > _MAX_CANDIDATES:  # bound the NMS work on pathological outputs (e.g. untrained weights)
        idx = idx[np.argsort(-conf[idx], kind="stable")[:_MAX_CANDIDATES]]
    b, c = boxes[idx], conf[idx]
    k = scores[idx].argmax(axis=1)  # argmax on the survivors only: over all anchors it costs more than NMS
    return _nms_per_class(b, c, k, iou_thr, max_det)


def _nms_per_class(b: Boxes, s: np.ndarray, k: np.ndarray, iou_thr: float, limit: int = 0
                   ) -> Tuple[Boxes, np.ndarray, np.ndarray]:
    """Per-class NMS in one pass; all classes' kept boxes score-descending, the first `limit` of them."""
    b = np.asarray(b, dtype=np.float32)
    k = np.asarray(k).astype(np.int64, copy=False)
    keep = _greedy_nms(b, np.asarray(s), k, iou_thr, limit)
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


def to_gray(img_rgb: np.ndarray) -> np.ndarray:
    """RGB uint8 -> H x W x 1 gray (ITU-R 601 weights, cv2's), the input of a 1-channel model."""
    import cv2

    return cv2.cvtColor(img_rgb, cv2.COLOR_RGB2GRAY)[..., None]


def grid_tiles(width: int, height: int, cols: int, rows: int) -> List[Tuple[int, int, int, int]]:
    """A cols x rows grid of (x, y, w, h) windows covering the frame without overlap (each one letterboxed to the
    model size: "resized" tiles, e.g. a 1920x1080 frame as 4 tiles of 960x540 down to 640)."""
    xs = [round(i * width / cols) for i in range(cols + 1)]
    ys = [round(j * height / rows) for j in range(rows + 1)]
    return [(xs[i], ys[j], xs[i + 1] - xs[i], ys[j + 1] - ys[j]) for j in range(rows) for i in range(cols)]


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
