"""Pre/post-processing shared by host and board: letterbox, decoders, NMS, tiling."""

from __future__ import annotations

import ast
from pathlib import Path

import cv2
import numpy as np
import pytest

from bench import zoo_yolov8
from rkbench.models import prepost


def test_prepost_stays_board_pushable():
    """numpy + cv2 + stdlib only, Python 3.8 syntax: the file runs on the board's Python."""
    source = Path(prepost.__file__).read_text()
    tree = ast.parse(source, feature_version=(3, 8))
    imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    imported |= {node.module.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert imported <= {"__future__", "dataclasses", "typing", "numpy", "cv2"}


def test_letterbox_round_trip():
    img = np.zeros((240, 320, 3), np.uint8)
    boxed, info = prepost.letterbox(img, 320)
    assert boxed.shape == (320, 320, 3)
    assert info.scale == 1.0 and (info.pad_x, info.pad_y) == (0.0, 40.0)
    assert (boxed[:40] == 114).all() and (boxed[40:280] == 0).all()
    orig = np.array([[10.0, 20.0, 110.0, 220.0]], np.float32)
    model = orig * info.scale + np.array([info.pad_x, info.pad_y] * 2, np.float32)
    np.testing.assert_allclose(prepost.to_original(model, info, 320, 240), orig, atol=1e-4)


@pytest.mark.parametrize("shape,size", [((1080, 1920), 640), ((480, 270), 320), ((333, 517), (256, 320))])
def test_letterbox_places_the_image_where_to_original_says(shape, size):
    """A bright rectangle drawn in the original lands, after letterbox, where the inverse maps it back."""
    h, w = shape
    img = np.zeros((h, w, 3), np.uint8)
    rect = np.array([w * 0.2, h * 0.3, w * 0.7, h * 0.8])
    x1, y1, x2, y2 = rect.astype(int)
    img[y1:y2, x1:x2] = 255
    boxed, info = prepost.letterbox(img, size)
    out_h, out_w = (size, size) if isinstance(size, int) else size
    assert boxed.shape == (out_h, out_w, 3)
    ys, xs = np.nonzero(boxed[..., 0] > 127)
    found = np.array([[xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]], np.float32)
    back = prepost.to_original(found, info, w, h)
    np.testing.assert_allclose(back[0], [x1, y1, x2, y2], atol=1.5 / info.scale)
    # the padding is centred (within a pixel) and the image is not stretched
    new_w, new_h = round(w * info.scale), round(h * info.scale)
    assert abs(2 * info.pad_x + new_w - out_w) <= 1 and abs(2 * info.pad_y + new_h - out_h) <= 1


def test_letterbox_downscale_and_clip():
    img = np.full((100, 400, 3), 7, np.uint8)
    boxed, info = prepost.letterbox(img, 64)
    assert boxed.shape == (64, 64, 3) and info.scale == pytest.approx(0.16)
    out = prepost.to_original(np.array([[-5.0, -5.0, 70.0, 70.0]], np.float32), info, 400, 100)
    assert out.min() >= 0 and out[0, 2] <= 400 and out[0, 3] <= 100


def test_load_rgb(tmp_path):
    bgr = np.zeros((4, 6, 3), np.uint8)
    bgr[..., 0] = 200  # blue in OpenCV's order
    cv2.imwrite(str(tmp_path / "a.png"), bgr)
    rgb = prepost.load_rgb(tmp_path / "a.png")
    assert rgb.shape == (4, 6, 3) and (rgb[..., 2] == 200).all() and (rgb[..., 0] == 0).all()
    (tmp_path / "bad.jpg").write_bytes(b"not an image")
    with pytest.raises(ValueError, match="cannot read"):
        prepost.load_rgb(tmp_path / "bad.jpg")


def _rknn_outputs(size: int, nc: int, cell: tuple[int, int], dist: np.ndarray, cls: int):
    """Outputs of an rknn head with one confident cell on stride 8; dist (4, 16) = its box logits."""
    outs = []
    for stride in (8, 16, 32):
        h = w = size // stride
        box = np.full((1, 64, h, w), -20.0, np.float32)
        box[0, 0::16] = 20.0  # every side peaks on bin 0: zero distances
        scores = np.zeros((1, nc, h, w), np.float32)
        if stride == 8:
            box[0, :, cell[1], cell[0]] = dist.reshape(64)
            scores[0, cls, cell[1], cell[0]] = 0.9
        outs += [box, scores, np.clip(scores.sum(1, keepdims=True), 0, 1)]
    return outs


def _peaked(bins: tuple[int, int, int, int]) -> np.ndarray:
    dist = np.full((4, 16), -20.0, np.float32)
    dist[np.arange(4), bins] = 20.0
    return dist


def test_dfl_decode_recovers_the_box():
    boxes, scores = prepost.decode_rknn_head(_rknn_outputs(64, 3, (2, 3), _peaked((1, 2, 3, 4)), 2), 3)
    assert boxes.shape == (64 + 16 + 4, 4) and scores.shape == (84, 3)
    best = scores.max(1).argmax()
    assert best == 3 * 8 + 2  # row-major cell order, stride 8 first
    cx, cy = (2 + 0.5) * 8, (3 + 0.5) * 8
    np.testing.assert_allclose(boxes[best], [cx - 8, cy - 16, cx + 24, cy + 32], atol=1e-3)
    # every other cell predicts zero distances: a point box at its centre, on each scale's stride
    np.testing.assert_allclose(boxes[64 + 5], [(1 + 0.5) * 16, (1 + 0.5) * 16] * 2, atol=1e-3)
    b, s, c = prepost.select(boxes, scores, 0.25, 0.7)
    assert len(b) == 1 and c[0] == 2 and s[0] == pytest.approx(0.9)


def test_dfl_is_the_softmax_expectation():
    """A spread distribution: left side 25% on bin 2, 75% on bin 3 -> 2.75; top side uniform -> 7.5."""
    dist = _peaked((0, 0, 5, 9))
    dist[0] = -50.0
    dist[0, 2], dist[0, 3] = np.log(0.25), np.log(0.75)
    dist[1] = 3.0
    boxes, scores = prepost.decode_rknn_head(_rknn_outputs(64, 2, (4, 1), dist, 0), 2)
    cx, cy = 4.5 * 8, 1.5 * 8
    np.testing.assert_allclose(boxes[1 * 8 + 4], [cx - 2.75 * 8, cy - 7.5 * 8, cx + 5 * 8, cy + 9 * 8], atol=1e-3)


def test_min_score_skip_drops_cells_not_detections():
    rng = np.random.default_rng(4)
    outs = []
    for h in (8, 4, 2):
        cls = (rng.random((1, 5, h, h)) ** 8).astype(np.float32)  # mostly tiny, a few high
        outs += [rng.normal(0, 2, (1, 64, h, h)).astype(np.float32), cls, np.clip(cls.sum(1, keepdims=True), 0, 1)]
    full = prepost.decode_rknn_head(outs, 5)
    skipped = prepost.decode_rknn_head(outs, 5, min_score=0.5)
    assert len(skipped[0]) < len(full[0]) == 84
    (b0, s0, c0), (b1, s1, c1) = prepost.select(*full, 0.5, 0.6), prepost.select(*skipped, 0.5, 0.6)
    assert len(b0) > 1 and c0.tolist() == c1.tolist() and s0.tolist() == s1.tolist()
    np.testing.assert_allclose(b0, b1, rtol=1e-6)  # DFL on fewer cells may round differently (1 ulp)


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
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0  # two empty boxes do not overlap


def _brute_nms(boxes, scores, thr, limit=0):
    ref, alive = [], list(np.argsort(-scores, kind="stable"))
    while alive and (limit == 0 or len(ref) < limit):
        i = alive.pop(0)
        ref.append(int(i))
        alive = [j for j in alive if _iou(boxes[i], boxes[j]) <= thr]
    return ref


def _random_boxes(rng, n, span, size):
    xy = rng.uniform(0, span, (n, 2))
    return np.concatenate([xy, xy + rng.uniform(*size, (n, 2))], 1).astype(np.float32)


# nms() resolves the greedy order in vectorised rounds, then a plain-Python pass (_ROUNDS 0: only that pass),
# and falls back to a blocked variant past _MAX_PAIRS candidate pairs (0: always): each must be exact.
NMS_PATHS = [{}, {"_ROUNDS": 0}, {"_ROUNDS": 1}, {"_MAX_PAIRS": 0}]


@pytest.mark.parametrize("path", NMS_PATHS)
@pytest.mark.parametrize("n,span,thr,limit", [(200, 80, 0.5, 0), (300, 40, 0.3, 0), (500, 200, 0.7, 50), (7, 30, 0.5, 0),
                                              (300, 20, 0.0, 0), (150, 10, 0.9, 0),
                                              (40, 100, -0.1, 0)])
def test_nms_matches_brute_force(n, span, thr, limit, path, monkeypatch):
    for name, value in path.items():
        monkeypatch.setattr(prepost, name, value)
    rng = np.random.default_rng(n)
    boxes = _random_boxes(rng, n, span, (5, 30))
    scores = rng.uniform(0, 1, n).astype(np.float32)
    keep = prepost.nms(boxes, scores, thr, limit=limit)
    assert keep.tolist() == _brute_nms(boxes, scores, thr, limit)
    assert 0 < len(keep) < n or n < 10 or thr < 0
    # duplicated boxes, tied scores (lower index first), zero-size boxes
    boxes[n // 2:] = boxes[:n - n // 2]
    boxes[::7, 2] = boxes[::7, 0]
    scores = np.round(scores, 1)
    assert prepost.nms(boxes, scores, thr, limit=limit).tolist() == _brute_nms(boxes, scores, thr, limit)


@pytest.mark.parametrize("path", NMS_PATHS)
def test_nms_settles_a_long_chain(path, monkeypatch):
    """Each box overlaps only its neighbours, scores falling along the chain: every second box survives,
    which takes the greedy order one box at a time (more than _ROUNDS rounds)."""
    for name, value in path.items():
        monkeypatch.setattr(prepost, name, value)
    x = np.arange(200, dtype=np.float32) * 2
    boxes = np.stack([x, np.zeros_like(x), x + 10, np.full_like(x, 10)], 1)
    scores = np.linspace(1, 0.01, 200).astype(np.float32)
    assert prepost.nms(boxes, scores, 0.5).tolist() == list(range(0, 200, 2))
    assert prepost.nms(boxes, scores, 0.5, limit=3).tolist() == [0, 2, 4]
    assert prepost.nms(boxes, scores, 0.5, limit=-1).tolist() == list(range(0, 200, 2))  # < 1: no limit


def test_nms_empty():
    assert prepost.nms(np.zeros((0, 4), np.float32), np.zeros(0, np.float32), 0.5).shape == (0,)
    b, s, c = prepost.select(np.zeros((0, 4), np.float32), np.zeros((0, 3), np.float32), 0.25, 0.5)
    assert b.shape == (0, 4) and len(s) == len(c) == 0


def test_select_is_per_class():
    boxes = np.array([[0, 0, 10, 10], [0, 0, 10, 10], [1, 1, 11, 11]], np.float32)
    scores = np.array([[0.9, 0.0], [0.0, 0.8], [0.7, 0.0]], np.float32)
    b, s, c = prepost.select(boxes, scores, 0.25, 0.5)
    assert sorted(c.tolist()) == [0, 1] and s.tolist() == pytest.approx([0.9, 0.8])
    # a class-1 box up-left of the image, exactly one "max coordinate + 1" from a class-0 box: a class offset
    # that ignores negative coordinates would stack them and suppress one
    boxes = np.array([[100, 0, 160, 60], [-61, -161, -1, -101]], np.float32)
    b, s, c = prepost.select(boxes, np.array([[0.9, 0.0], [0.0, 0.8]], np.float32), 0.25, 0.5)
    assert c.tolist() == [0, 1]


@pytest.mark.parametrize("path", NMS_PATHS)
def test_select_matches_per_class_brute_force(path, monkeypatch):
    """Candidates partly outside the image (negative coordinates, as decoders produce): classes must still
    never suppress each other; conf filter and max_det apply."""
    for name, value in path.items():
        monkeypatch.setattr(prepost, name, value)
    rng = np.random.default_rng(7)
    boxes = _random_boxes(rng, 400, 100, (10, 60)) - 30
    scores = (rng.random((400, 4)) ** 3).astype(np.float32)
    b, s, c = prepost.select(boxes, scores, 0.2, 0.5, max_det=1000)
    cls, conf = scores.argmax(1), scores.max(1)
    ref = []
    for k in range(4):
        idx = np.flatnonzero((cls == k) & (conf >= 0.2))
        ref += [(conf[i], k, tuple(boxes[i])) for i in idx[_brute_nms(boxes[idx], conf[idx], 0.5)]]
    ref.sort(key=lambda r: -r[0])
    assert [(round(float(x), 6), int(k)) for x, k, _ in ref] == [(round(float(x), 6), int(k)) for x, k in zip(s, c)]
    np.testing.assert_allclose(b, np.array([r[2] for r in ref]))
    assert (s >= 0.2).all() and (np.diff(s) <= 0).all()
    top = prepost.select(boxes, scores, 0.2, 0.5, max_det=10)
    np.testing.assert_allclose(top[1], s[:10])


def _clustered_rknn_outputs(rng, size: int, nc: int, objects: int) -> list:
    """Rknn-head outputs like a trained model's: scores under 0.001 but around `objects` blobs of cells,
    where one class scores high; neighbouring cells predict boxes of similar size, so they overlap and
    NMS has work to do at both of the zoo's settings."""
    outs = []
    for stride in (8, 16, 32):
        h = w = size // stride
        dist = rng.normal(0, 3, (1, 64, 1, 1)) + rng.normal(0, 1, (1, 64, h, w))
        cls = rng.random((1, nc, h, w)) * 1e-3
        gy, gx = np.mgrid[:h, :w]
        for cx, cy, k in zip(rng.integers(0, w, objects), rng.integers(0, h, objects), rng.integers(0, nc, objects)):
            blob = (gx - cx) ** 2 + (gy - cy) ** 2 <= rng.integers(1, 4) ** 2
            cls[0, k][blob] = np.maximum(cls[0, k][blob], rng.random(int(blob.sum())) ** 2)
        cls = cls.astype(np.float32)
        outs += [dist.astype(np.float32), cls, np.clip(cls.sum(1, keepdims=True), 0, 1)]
    return outs


@pytest.mark.parametrize("size,nc,seed", [(640, 80, 0), (320, 80, 1), (320, 3, 2), (256, 1, 3)])
@pytest.mark.parametrize("conf,iou", [(zoo_yolov8.OBJ_THRESH, zoo_yolov8.NMS_THRESH),
                                      (zoo_yolov8.MAP_OBJ_THRESH, zoo_yolov8.MAP_NMS_THRESH)])
def test_same_boxes_as_rknn_model_zoo(size, nc, seed, conf, iou):
    """rknn_model_zoo's YOLOv8 post_process (re-implemented in bench/zoo_yolov8.py) and rkbench's
    decode_rknn_head(min_score) + select, uncapped, return the same detections."""
    outs = _clustered_rknn_outputs(np.random.default_rng(seed), size, nc, objects=40)
    zoo = zoo_yolov8.post_process(outs, conf, iou, img_size=(size, size))
    boxes, scores, classes = prepost.select(*prepost.decode_rknn_head(outs, nc, min_score=conf), conf, iou, 1 << 30)
    assert zoo_yolov8.differences(zoo, boxes, scores, classes) == []
    candidates = int((prepost.decode_rknn_head(outs, nc)[1].max(1) >= conf).sum())
    assert 0 < len(boxes) < candidates  # NMS suppressed boxes
    # the comparison itself notices a lost box or a changed class
    assert zoo_yolov8.differences(zoo, boxes[1:], scores[1:], classes[1:])
    assert zoo_yolov8.differences(zoo, boxes, scores, (classes + 1) % max(nc, 2))


def test_zoo_reference_dfl_matches_torch():
    """The reference's numpy DFL is the zoo's torch one."""
    torch = pytest.importorskip("torch")  # noqa: F841
    dist = np.random.default_rng(5).normal(0, 3, (1, 64, 6, 5)).astype(np.float32)
    np.testing.assert_allclose(zoo_yolov8.dfl_numpy(dist), zoo_yolov8.dfl_torch(dist), atol=1e-5)


def test_yolov5_decode_centre_cell():
    anchors = np.array([[[10, 13], [16, 30], [33, 23]]] * 3, np.float32)
    outs = []
    for stride in (8, 16, 32):
        h = 64 // stride
        raw = np.full((1, 3 * 7, h, h), -30.0, np.float32)  # nc = 2
        if stride == 8:
            raw[0, 7:11, 2, 1] = 0.0     # anchor 1: sigmoid 0.5 for x, y, w, h
            raw[0, 11, 2, 1] = 30.0      # objectness 1
            raw[0, 13, 2, 1] = 30.0      # class 1
        outs.append(raw)
    boxes, scores = prepost.decode_yolov5(outs, anchors.tolist(), 2, 64)
    assert boxes.shape == (3 * (64 + 16 + 4), 4)
    best = scores.max(1).argmax()
    assert best == 1 * 64 + 2 * 8 + 1   # anchor-major, then row-major cells (the yolov5 Detect order)
    cx, cy = (0.5 * 2 - 0.5 + 1) * 8, (0.5 * 2 - 0.5 + 2) * 8   # grid x=1, y=2
    np.testing.assert_allclose(boxes[best], [cx - 8, cy - 15, cx + 8, cy + 15], atol=1e-3)  # anchor (16, 30)
    assert scores[best].argmax() == 1 and scores[best, 1] == pytest.approx(1.0)


@pytest.mark.parametrize("w,h,tile,overlap", [(1920, 1080, 640, 0.2), (1280, 720, 640, 0.0), (500, 300, 640, 0.2),
                                              (2000, 641, 320, 0.5)])
def test_tiles_cover_the_frame_with_the_overlap(w, h, tile, overlap):
    corners = prepost.tiles(w, h, tile, overlap)
    covered = np.zeros((h, w), bool)
    for x, y in corners:
        covered[y:y + tile, x:x + tile] = True
    assert covered.all() and len(set(corners)) == len(corners)
    assert all(x + tile <= max(w, tile) and y + tile <= max(h, tile) for x, y in corners)
    for axis in (0, 1):
        starts = sorted({c[axis] for c in corners})
        assert all(tile - (b - a) >= overlap * tile for a, b in zip(starts, starts[1:]))


def test_merge_dedups_an_object_two_tiles_see():
    corners = prepost.tiles(1920, 1080, 640, 0.2)
    obj = np.array([[600, 100, 700, 200]], np.float32)
    other = np.array([[1500, 700, 1560, 760]], np.float32)
    per_tile = [(obj - [x, y, x, y], np.array([0.9 - 0.1 * i], np.float32), np.array([1])) for i, (x, y)
                in enumerate(corners[:2])]
    per_tile.append((other - [*corners[-1]] * 2, np.array([0.5], np.float32), np.array([1])))
    per_tile.append((obj - [*corners[0]] * 2, np.array([0.4], np.float32), np.array([2])))  # another class
    origins = [corners[0], corners[1], corners[-1], corners[0]]
    b, s, c = prepost.merge_tiles(per_tile, origins, 0.5)
    assert c.tolist() == [1, 1, 2] and s.tolist() == pytest.approx([0.9, 0.5, 0.4])
    np.testing.assert_allclose(b, np.concatenate([obj, other, obj]))
    assert len(prepost.merge_tiles([], [], 0.5)[0]) == 0
