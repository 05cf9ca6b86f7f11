"""The demo dataset: coloured shapes on textured backgrounds, generated deterministically.

It makes the default `python -m rkbench` run self-contained (no download): four classes (circle,
square, triangle, cross), COCO small/medium/large objects, 1-6 objects per image with limited overlap,
and image sizes of different aspect so letterboxing is exercised. Every image is drawn from its own
seed (seed, split, index), so the val split is the same whatever the size of the train split.

Layout written by `generate_demo` (Ultralytics-style, plus COCO json):
    images/{train,val}/*.png  labels/{train,val}/*.txt  annotations/instances_{train,val}.json  data.yaml
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import cv2
import numpy as np

from rkbench.data.datasets import Dataset, load_coco
from rkbench.errors import DataError
from rkbench.locks import folder_lock

GENERATOR_VERSION = 1           # bump when the drawing changes: cached demo folders are then regenerated
MARKER = ".rkbench-demo.json"
CLASS_NAMES = ("circle", "square", "triangle", "cross")
IMAGE_SIZES = ((320, 240), (240, 320), (288, 352), (352, 288), (320, 320))    # (width, height)
# sqrt(box area) ranges: COCO small < 32, medium 32..96, large > 96
SIZE_RANGES = ((14.0, 30.0), (34.0, 90.0), (100.0, 170.0))
SIZE_WEIGHTS = (0.35, 0.45, 0.20)
MAX_IOU = 0.1                   # limited overlap between any two objects ...
MAX_COVER = 0.25                # ... and no object hidden by more than a quarter
SPLIT_CODES = {"train": 1, "val": 2}


@dataclass
class Shape:
    cls: int
    polygon: np.ndarray         # (N, 2) float vertices in image pixels
    box: tuple[float, float, float, float]   # x, y, w, h (tight around the polygon)


# ---------------------------------------------------------------------------------------------------------
# drawing

def _hsv_colour(rng: np.random.Generator, sat: tuple[float, float], val: tuple[float, float]) -> np.ndarray:
    hsv = np.array([[[rng.uniform(0, 180), rng.uniform(*sat) * 255, rng.uniform(*val) * 255]]], np.uint8)
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR)[0, 0].astype(np.float32)


def _background(rng: np.random.Generator, w: int, h: int) -> np.ndarray:
    """Muted textures (the shapes are saturated): noise, gradient, stripes, checkerboard or smooth blobs."""
    a, b = (_hsv_colour(rng, (0.0, 0.45), (0.25, 0.9)) for _ in range(2))
    kind = rng.integers(5)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    if kind == 0:
        img = np.broadcast_to(a, (h, w, 3)) + rng.normal(0, rng.uniform(8, 30), (h, w, 3))
    elif kind == 1:
        t = rng.uniform(0, math.pi)
        ramp = xx * math.cos(t) + yy * math.sin(t)
        ramp = (ramp - ramp.min()) / max(float(np.ptp(ramp)), 1.0)
        img = a + ramp[..., None] * (b - a)
    elif kind == 2:
        t, period = rng.uniform(0, math.pi), rng.uniform(8, 40)
        wave = 0.5 + 0.5 * np.sin((xx * math.cos(t) + yy * math.sin(t)) * 2 * math.pi / period)
        img = a + wave[..., None] * (b - a)
    elif kind == 3:
        cell = int(rng.integers(16, 48))
        check = ((xx // cell + yy // cell) % 2)[..., None]
        img = a + check * (b - a)
    else:
        small = rng.uniform(0, 1, (max(2, h // 40), max(2, w // 40), 3)).astype(np.float32)
        blobs = cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC)
        img = a + blobs * (b - a)
    return np.asarray(img, np.float32)


def _outline(cls: int, size: float, rng: np.random.Generator) -> np.ndarray:
    """Vertices of one shape centred at the origin, roughly `size` across before rotation."""
    aspect = math.sqrt(rng.uniform(0.8, 1.25))
    sx, sy = size * aspect / 2, size / aspect / 2
    if cls == 0:        # circle (slightly elliptical, axis-aligned so its box is exact)
        t = np.linspace(0, 2 * math.pi, 64, endpoint=False)
        return np.stack([sx * np.cos(t), sy * np.sin(t)], 1)
    if cls == 1:        # square (a little rectangular), rotated up to 25 degrees
        pts = np.array([[-sx, -sy], [sx, -sy], [sx, sy], [-sx, sy]])
        angle = rng.uniform(-25, 25)
    elif cls == 2:      # triangle, any rotation
        t = np.array([0, 2 * math.pi / 3, 4 * math.pi / 3]) + rng.uniform(0, 2 * math.pi)
        pts = np.stack([sx * 1.15 * np.cos(t), sy * 1.15 * np.sin(t)], 1)
        angle = 0.0
    else:               # cross (plus sign), arms a third of the size thick, rotated up to 20 degrees
        k = rng.uniform(0.15, 0.2)
        u = np.array([[-k, -1], [k, -1], [k, -k], [1, -k], [1, k], [k, k], [k, 1], [-k, 1], [-k, k], [-1, k],
                      [-1, -k], [-k, -k]])
        pts = u * [sx, sy]
        angle = rng.uniform(-20, 20)
    r = math.radians(angle)
    rot = np.array([[math.cos(r), -math.sin(r)], [math.sin(r), math.cos(r)]])
    return pts @ rot.T


def _overlaps(box: tuple[float, float, float, float], others: list[Shape]) -> bool:
    x, y, w, h = box
    for o in others:
        ox, oy, ow, oh = o.box
        iw = max(0.0, min(x + w, ox + ow) - max(x, ox))
        ih = max(0.0, min(y + h, oy + oh) - max(y, oy))
        inter = iw * ih
        if inter / (w * h + ow * oh - inter) > MAX_IOU or inter / min(w * h, ow * oh) > MAX_COVER:
            return True
    return False


def _place(rng: np.random.Generator, w: int, h: int, placed: list[Shape]) -> Optional[Shape]:
    cls = int(rng.integers(len(CLASS_NAMES)))
    lo, hi = SIZE_RANGES[rng.choice(len(SIZE_RANGES), p=SIZE_WEIGHTS)]
    outline = _outline(cls, rng.uniform(lo, min(hi, 0.75 * min(w, h))), rng)
    (x0, y0), (x1, y1) = outline.min(0), outline.max(0)
    for _ in range(30):
        cx, cy = rng.uniform(1 - x0, w - 1 - x1), rng.uniform(1 - y0, h - 1 - y1)
        box = (round(cx + x0, 2), round(cy + y0, 2), round(x1 - x0, 2), round(y1 - y0, 2))
        if not _overlaps(box, placed):
            return Shape(cls, outline + [cx, cy], box)
    return None


def _draw(img: np.ndarray, shape: Shape, rng: np.random.Generator) -> None:
    x, y, w, h = (int(v) for v in shape.box)
    local = img[y:y + h + 1, x:x + w + 1].reshape(-1, 3).mean(0).astype(np.float32)
    colour = _hsv_colour(rng, (0.6, 1.0), (0.5, 1.0))
    for _ in range(20):          # saturated and far from the background under it
        if np.linalg.norm(colour - local) > 110:
            break
        colour = _hsv_colour(rng, (0.6, 1.0), (0.5, 1.0))
    else:
        colour = 255.0 - local
    pts = np.round(shape.polygon * 16).astype(np.int32)          # 4 fractional bits: sub-pixel edges
    cv2.fillPoly(img, [pts], colour.tolist(), cv2.LINE_AA, shift=4)
    if rng.uniform() < 0.3:      # a darker rim on some shapes
        cv2.polylines(img, [pts], True, (colour * 0.5).tolist(), 1, cv2.LINE_AA, shift=4)


def render(seed: int, split: str, index: int, frame: Optional[tuple[int, int]] = None) -> tuple[np.ndarray, list[Shape]]:
    """One BGR uint8 image and its shapes; a pure function of (seed, split, index, frame). `frame` (W, H): a
    large frame with as many objects per area as the demo images (the tiling study's 1920x1080 frames)."""
    rng = np.random.default_rng([seed, SPLIT_CODES[split], index])
    w, h = IMAGE_SIZES[rng.integers(len(IMAGE_SIZES))]
    objects = (1, 7)
    if frame is not None:
        w, h = frame
        per = w * h / (320 * 320)
        objects = (max(1, round(per)), max(2, round(6 * per)))
    img = np.clip(_background(rng, w, h), 0, 255).astype(np.uint8)   # uint8: cv2 anti-aliases only 8-bit
    shapes: list[Shape] = []
    for _ in range(int(rng.integers(*objects))):
        shape = _place(rng, w, h, shapes)
        if shape is not None:
            _draw(img, shape, rng)
            shapes.append(shape)
    noisy = img + rng.normal(0, rng.uniform(0, 8), img.shape)      # sensor-like noise over everything
    out = np.clip(noisy, 0, 255).astype(np.uint8)
    if rng.uniform() < 0.3:
        out = cv2.GaussianBlur(out, (3, 3), 0)
    return out, shapes


# ---------------------------------------------------------------------------------------------------------
# writing

def _write_split(out_dir: Path, split: str, n: int, seed: int, frame: Optional[tuple[int, int]] = None) -> None:
    img_dir, lbl_dir = out_dir / "images" / split, out_dir / "labels" / split
    img_dir.mkdir(parents=True, exist_ok=True)
    lbl_dir.mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for i in range(n):
        img, shapes = render(seed, split, i, frame)
        h, w = img.shape[:2]
        name = f"{split}_{i:05d}"
        if not cv2.imwrite(str(img_dir / f"{name}.png"), img):
            raise DataError(f"cannot write {img_dir / name}.png: check free space and permissions")
        lines = []
        for s in shapes:
            x, y, bw, bh = s.box
            lines.append(f"{s.cls} {(x + bw / 2) / w:.6f} {(y + bh / 2) / h:.6f} {bw / w:.6f} {bh / h:.6f}\n")
            annotations.append({"id": len(annotations) + 1, "image_id": i + 1, "category_id": s.cls + 1,
                                "bbox": [x, y, bw, bh], "area": round(bw * bh, 4), "iscrowd": 0})
        (lbl_dir / f"{name}.txt").write_text("".join(lines))
        images.append({"id": i + 1, "file_name": f"{name}.png", "width": w, "height": h})
    gt = {"images": images, "annotations": annotations,
          "categories": [{"id": c + 1, "name": n_, "supercategory": "shape"} for c, n_ in enumerate(CLASS_NAMES)]}
    (out_dir / "annotations").mkdir(exist_ok=True)
    (out_dir / "annotations" / f"instances_{split}.json").write_text(json.dumps(gt, sort_keys=True))


def generate_demo(out_dir: Path, n_train: int, n_val: int, seed: int = 0, yaml_root: Optional[Path] = None,
                  frame: Optional[tuple[int, int]] = None) -> Path:
    """Write the demo dataset into out_dir; returns the data.yaml. Same arguments -> identical files.
    yaml_root: the absolute `path:` written into data.yaml (default out_dir), for a folder that is moved
    into place after generation."""
    out_dir = Path(out_dir)
    if n_train < 0 or n_val < 1:
        raise DataError(f"n_train={n_train}, n_val={n_val}: need n_train >= 0 and n_val >= 1")
    out_dir.mkdir(parents=True, exist_ok=True)
    _write_split(out_dir, "val", n_val, seed, frame)
    if n_train:
        _write_split(out_dir, "train", n_train, seed)
    root = Path(yaml_root if yaml_root is not None else out_dir).resolve()
    names = "".join(f"  {i}: {n}\n" for i, n in enumerate(CLASS_NAMES))
    # Ultralytics resolves a relative `path:` against its datasets dir, so write it absolute
    text = (f"# rkbench demo dataset (generator v{GENERATOR_VERSION}, seed {seed})\n"
            f"path: {root}\ntrain: {'images/train' if n_train else 'images/val'}\nval: images/val\n"
            f"nc: {len(CLASS_NAMES)}\nnames:\n{names}")
    (out_dir / "data.yaml").write_text(text)
    return out_dir / "data.yaml"


def _marker_ok(root: Path, n_val: int, seed: int, frame: Optional[tuple[int, int]] = None) -> bool:
    try:
        m = json.loads((root / MARKER).read_text())
    except (OSError, ValueError):
        return False
    return (m.get("version") == GENERATOR_VERSION and m.get("n_val") == n_val and m.get("seed") == seed
            and m.get("frame") == (list(frame) if frame else None))


def _generate_in_place(root: Path, n_val: int, seed: int, frame: Optional[tuple[int, int]] = None) -> None:
    """Generate into a temp folder, then rename it to root: an interrupted generation leaves no half-written
    dataset behind."""
    if root.exists() and not (root / MARKER).exists() and any(root.iterdir()):
        raise DataError(f"{root} exists and is not an rkbench demo folder: point dataset.root at an empty or new folder")
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.", dir=root.parent))
        try:
            generate_demo(tmp, 0, n_val, seed, yaml_root=root, frame=frame)
            marker = {"version": GENERATOR_VERSION, "n_val": n_val, "seed": seed, "n_train": 0,
                      "frame": list(frame) if frame else None}
            (tmp / MARKER).write_text(json.dumps(marker))
            if root.exists():       # an older generator version (or other size): replace it
                stale = Path(tempfile.mkdtemp(prefix=f".{root.name}.stale.", dir=root.parent))
                os.replace(root, stale / "old")
                shutil.rmtree(stale, ignore_errors=True)
            os.replace(tmp, root)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    except OSError as exc:  # read-only place, disk full
        raise DataError(f"cannot write the demo dataset in {root.parent} ({exc.strerror}): set cache_dir (or "
                        "dataset.root) to a writable folder with free space") from None


def demo_dataset(root: Path, n_val: int = 48, seed: int = 0, limit: Optional[int] = None,
                 frame: Optional[tuple[int, int]] = None) -> Dataset:
    """The demo val split under root, generated on first use. Concurrent runs are safe: the first one
    generates under a lock on root's parent folder, the others wait for it and then use its folder (a second
    generation would replace the folder under the first run's feet)."""
    root = Path(root).resolve()
    if not _marker_ok(root, n_val, seed, frame):
        with folder_lock(root.parent, "cache_dir (or dataset.root)"):
            if not _marker_ok(root, n_val, seed, frame):   # not generated meanwhile by the process we waited for
                _generate_in_place(root, n_val, seed, frame)
    ds = load_coco(root / "annotations" / "instances_val.json", root / "images" / "val", limit)
    ds.name = "demo"
    return ds
