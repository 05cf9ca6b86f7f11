"""Pre/post-processing shared by host and board: letterbox, decoders, NMS, tiling."""

from __future__ import annotations

import numpy as np
import pytest

from rkbench.models import prepost


def test_letterbox_round_trip():
    img = np.zeros((240, 320, 3), np.uint8)
    boxed, info = prepost.letterbox(img, 320)
    assert boxed.shape == (320, 320, 3)
    assert info.scale == 1.0 and (info.pad_x, info.pad_y) == (0.0, 40.0)
    assert (boxed[:40] == 114).all() and (boxed[40:280] == 0).all()
    orig = np.array([[10.0, 20.0, 110.0, 220.0]], np.float32)
    model = orig * info.scale + np.array([info.pad_x, info.pad_y] * 2, np.float32)
    np.testing.assert_allclose(prepost.to_original(model, info, 320, 240), orig, atol=1e-4)


def test_letterbox_downscale_and_clip():
    img = np.full((100, 400, 3), 7, np.uint8)
    boxed, info = prepost.letterbox(img, 64)
    assert boxed.shape == (64, 64, 3) and info.scale == pytest.approx(0.16)
    out = prepost.to_original(np.array([[-5.0, -5.0, 70.0, 70.0]], np.float32), info, 400, 100)
    assert out.min() >= 0 and out[0, 2] <= 400 and out[0, 3] <= 100


def _rknn_outputs(size: int, nc: int, cell: tuple[int, int], ltrb: tuple[int, int, int, int], cls: int):
    """Outputs of a 'perfect' rknn head: one confident cell on stride 8, a peaked distribution."""
    outs = []
    for stride in (8, 16, 32):
        h = w = size // stride
        box = np.full((1, 64, h, w), -20.0, np.float32)
        scores = np.zeros((1, nc, h, w), np.float32)
        if stride == 8:
            for side, bin_ in enumerate(ltrb):
                box[0, side * 16 + bin_, cell[1], cell[0]] = 20.0
            scores[0, cls, cell[1], cell[0]] = 0.9
        outs += [box, scores, np.clip(scores.sum(1, keepdims=True), 0, 1)]
    return outs


def test_dfl_decode_recovers_the_box():
    boxes, scores = prepost.decode_rknn_head(_rknn_outputs(64, 3, (2, 3), (1, 2, 3, 4), 2), 3)
    assert boxes.shape == (64 + 16 + 4, 4) and scores.shape == (84, 3)
    best = scores.max(1).argmax()
    cx, cy = (2 + 0.5) * 8, (3 + 0.5) * 8
    np.testing.assert_allclose(boxes[best], [cx - 8, cy - 16, cx + 24, cy + 32], atol=1e-3)
    b, s, c = prepost.select(boxes, scores, 0.25, 0.7)
    assert len(b) == 1 and c[0] == 2 and s[0] == pytest.approx(0.9)


def test_official_head_decode():
    out = np.zeros((1, 4 + 2, 3), np.float32)
    out[0, :4, 1] = [50, 40, 20, 10]
    out[0, 5, 1] = 0.8
    boxes, scores = prepost.decode_ultralytics_head(out)
    np.testing.assert_allclose(boxes[1], [40, 35, 60, 45])
    assert scores.shape == (3, 2) and scores[1, 1] == pytest.approx(0.8)


def _iou(a, b):
    iw = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def test_nms_matches_brute_force():
    rng = np.random.default_rng(0)
    xy = rng.uniform(0, 80, (200, 2))
    boxes = np.concatenate([xy, xy + rng.uniform(5, 30, (200, 2))], 1).astype(np.float32)
    scores = rng.uniform(0, 1, 200).astype(np.float32)
    keep = prepost.nms(boxes, scores, 0.5)
    ref, alive = [], list(np.argsort(-scores, kind="stable"))
    while alive:
        i = alive.pop(0)
        ref.append(i)
        alive = [j for j in alive if _iou(boxes[i], boxes[j]) <= 0.5]
    assert keep.tolist() == ref


def test_select_is_per_class():
    boxes = np.array([[0, 0, 10, 10], [0, 0, 10, 10], [1, 1, 11, 11]], np.float32)
    scores = np.array([[0.9, 0.0], [0.0, 0.8], [0.7, 0.0]], np.float32)
    b, s, c = prepost.select(boxes, scores, 0.25, 0.5)
    assert sorted(c.tolist()) == [0, 1] and s.tolist() == pytest.approx([0.9, 0.8])


def test_yolov5_decode_centre_cell():
    anchors = np.array([[[10, 13], [16, 30], [33, 23]]] * 3, np.float32)
    outs = []
    for stride in (8, 16, 32):
        h = 64 // stride
        raw = np.full((1, 3 * 7, h, h), -30.0, np.float32)  # nc = 2
        if stride == 8:
            raw[0, 0:4, 2, 1] = 0.0      # anchor 0: sigmoid 0.5 for x, y, w, h
            raw[0, 4, 2, 1] = 30.0       # objectness 1
            raw[0, 6, 2, 1] = 30.0       # class 1
        outs.append(raw)
    boxes, scores = prepost.decode_yolov5(outs, anchors, 2, 64)
    best = scores.max(1).argmax()
    cx, cy = (0.5 * 2 - 0.5 + 1) * 8, (0.5 * 2 - 0.5 + 2) * 8   # grid x=1, y=2
    np.testing.assert_allclose(boxes[best], [cx - 5, cy - 6.5, cx + 5, cy + 6.5], atol=1e-3)
    assert scores[best].argmax() == 1


def test_tiles_cover_the_frame_and_merge_dedups():
    corners = prepost.tiles(1920, 1080, 640, 0.2)
    covered = np.zeros((1080, 1920), bool)
    for x, y in corners:
        covered[y:y + 640, x:x + 640] = True
    assert covered.all() and all(x + 640 <= 1920 and y + 640 <= 1080 for x, y in corners)
    # the same object seen by two overlapping tiles is reported once
    obj = np.array([[600, 100, 700, 200]], np.float32)
    per_tile = [(obj - [x, y, x, y], np.array([0.9], np.float32), np.array([1])) for x, y in corners[:2]]
    b, s, c = prepost.merge_tiles(per_tile, corners[:2], 0.5)
    assert len(b) == 1 and np.allclose(b[0], obj[0])
