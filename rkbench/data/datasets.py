"""Evaluation datasets: a COCO json + image folder, or an Ultralytics YOLO layout, as one `Dataset`.

Both loaders validate everything up front (files, image headers, boxes, ids) so a bad dataset fails
before any export or conversion starts, with a DataError that names the fix. That includes images that
would only fail when decoded: pixel bombs (refused from the header size, before any decoding) and
truncated files (header intact, end cut off). Such an image rejects the whole dataset at preflight
rather than being counted as missed at evaluation: a silently smaller dataset would change the mAP."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import yaml
from PIL import Image, UnidentifiedImageError

from rkbench.errors import DataError
from rkbench.models.prepost import load_rgb

log = logging.getLogger("rkbench.data")

IMAGE_SUFFIXES = (".bmp", ".jpeg", ".jpg", ".png", ".tif", ".tiff", ".webp")
BOX_TOLERANCE_PX = 1.0      # COCO/YOLO boxes may overshoot the border by rounding; more is an error
YOLO_TOLERANCE = 1e-3       # same for normalised YOLO coordinates
MAX_PIXELS = 8192 * 8192    # larger images are refused from their header: decoded they need > 200 MB each
END_MARKERS = {"JPEG": b"\xff\xd9", "PNG": b"IEND"}   # what a file cut short (header intact) has lost
TAIL_BYTES = 4096           # where the end marker is looked for (then a full decode): one page per image

# The 80 COCO classes in Ultralytics' order and their official COCO category ids (1..90 with gaps), so a
# YOLO-layout copy of COCO (e.g. coco128) yields detections with the real COCO category ids.
COCO80_NAMES = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
    "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee",
    "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard",
    "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors",
    "teddy bear", "hair drier", "toothbrush")
COCO80_TO_91 = (
    1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 27, 28, 31, 32, 33,
    34, 35, 36, 37, 38, 39, 40, 41, 42, 43, 44, 46, 47, 48, 49, 50, 51, 52, 53, 54, 55, 56, 57, 58, 59, 60, 61,
    62, 63, 64, 65, 67, 70, 72, 73, 74, 75, 76, 77, 78, 79, 80, 81, 82, 84, 85, 86, 87, 88, 89, 90)


@dataclass(frozen=True)
class ImageRecord:
    id: int            # COCO image id
    path: Path
    width: int
    height: int


@dataclass
class Dataset:
    name: str
    images: list[ImageRecord]
    class_names: list[str]     # index = model class index
    category_ids: list[int]    # COCO category_id of each model class index
    coco_gt: dict              # COCO-format ground truth: images, annotations, categories
    _fingerprint: Optional[tuple[tuple, str]] = field(default=None, init=False, repr=False, compare=False)

    def fingerprint(self) -> str:
        """sha256 over the ground truth, the class mapping and every image file's bytes (in id order).
        Identity and the evaluate cache key both ask for it: the bytes are read again only when a file's
        size, mtime or inode changed since the last call on this object."""
        try:
            stats = [(r.id, r.path.stat()) for r in self.images]
            stamp: Optional[tuple] = tuple((i, s.st_size, s.st_mtime_ns, s.st_ino) for i, s in stats)
        except OSError:
            stamp = None   # _hash names the missing file
        if stamp is None or self._fingerprint is None or self._fingerprint[0] != stamp:
            self._fingerprint = (stamp, self._hash())
        return self._fingerprint[1]

    def _hash(self) -> str:
        h = hashlib.sha256()
        h.update(json.dumps(self.coco_gt, sort_keys=True, separators=(",", ":")).encode())
        h.update(json.dumps([self.class_names, self.category_ids]).encode())
        for rec in sorted(self.images, key=lambda r: r.id):
            h.update(f"\n{rec.id}\n".encode())
            try:
                with open(rec.path, "rb") as f:
                    for block in iter(lambda: f.read(1 << 20), b""):
                        h.update(block)
            except OSError as e:
                raise DataError(f"cannot read image {rec.path} ({e.strerror}): restore the file or reload the dataset") from e
        return h.hexdigest()


# ---------------------------------------------------------------------------------------------------------
# helpers shared by both loaders

def image_size(path: Path) -> tuple[int, int]:
    """(width, height) from the image header, EXIF rotation applied like cv2.imread does; DataError if
    unreadable, over MAX_PIXELS or truncated."""
    try:
        with Image.open(path) as im:   # lazy: reads the header only
            w, h = im.size
            fmt = im.format
            if w * h > MAX_PIXELS:     # before getexif(), which decodes a PNG to find its EXIF chunk
                raise DataError(f"image {path} is {w}x{h} ({w * h:,} pixels), over the {MAX_PIXELS:,} pixel "
                                "limit: downscale it or leave it out")
            if im.getexif().get(0x0112) in (5, 6, 7, 8):   # orientations that swap width and height
                w, h = h, w
    except FileNotFoundError as e:
        raise DataError(f"image not found: {path}: check the image folder / file names in the annotations") from e
    except Image.DecompressionBombError as e:   # PIL refuses > 2x its own limit already in open()
        raise DataError(f"image {path} is over the {MAX_PIXELS:,} pixel limit ({e}): downscale it or leave it "
                        "out") from None
    # ImportError: with Ultralytics imported, Image.open is patched to load pi-heif for files PIL cannot identify
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, ImportError) as e:
        reason = f"{type(e).__name__}: {str(e).splitlines()[0]}" if str(e) else type(e).__name__
        raise DataError(f"unreadable image {path} ({reason}): replace or remove the file") from e
    if w <= 0 or h <= 0:
        raise DataError(f"image {path} has size {w}x{h}: replace or remove the file")
    if not _complete(path, fmt):
        raise DataError(f"image {path} is truncated (its {fmt} end marker is missing and it does not decode): "
                        "copy it again or remove it")
    return w, h


def _complete(path: Path, fmt: str) -> bool:
    """False for a JPEG/PNG cut short. cv2.imread decodes those as a partly grey image without an error,
    so the end marker is looked for in the file's tail; when it is not there (data appended after the
    image, e.g. a phone's motion photo), the file is decoded the way evaluation will decode it."""
    marker = END_MARKERS.get(fmt)
    if marker is None:
        return True
    with open(path, "rb") as f:
        f.seek(0, 2)
        f.seek(max(0, f.tell() - TAIL_BYTES))
        if marker in f.read():
            return True
    try:
        load_rgb(path)
        return True
    except ValueError:
        return False


def _list_images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def _read_json(path: Path) -> Any:
    if not path.is_file():
        raise DataError(f"annotation file not found: {path}: set dataset.annotations to an existing COCO json")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path} is not valid JSON ({e}): re-download or re-export the annotations") from e


def _check_box(bbox: Any, width: int, height: int, where: str) -> list[float]:
    if not (isinstance(bbox, (list, tuple)) and len(bbox) == 4
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in bbox)):
        raise DataError(f"{where}: bbox {bbox!r} is not [x, y, w, h] numbers: fix the annotation")
    x, y, w, h = (float(v) for v in bbox)
    if w <= 0 or h <= 0:
        raise DataError(f"{where}: bbox {bbox!r} has non-positive width/height: fix or drop the annotation")
    t = BOX_TOLERANCE_PX
    if x < -t or y < -t or x + w > width + t or y + h > height + t:
        raise DataError(f"{where}: bbox {bbox!r} lies outside the {width}x{height} image: fix the annotation "
                        "(boxes are [x, y, w, h] in pixels)")
    return [x, y, w, h]


def _limited(images: list[dict], limit: Optional[int]) -> list[dict]:
    images = sorted(images, key=lambda i: i["id"])
    return images if limit is None else images[:limit]


# ---------------------------------------------------------------------------------------------------------
# COCO json

def load_coco(ann_file: Path, image_dir: Path, limit: int | None = None) -> Dataset:
    """COCO instances json + its image folder. Model class i <-> the i-th category by ascending id."""
    ann_file, image_dir = Path(ann_file), Path(image_dir)
    data = _read_json(ann_file)
    if not isinstance(data, dict) or not all(isinstance(data.get(k), list) for k in ("images", "annotations", "categories")):
        raise DataError(f"{ann_file} lacks the 'images', 'annotations' and 'categories' lists: use a COCO "
                        "instances_*.json (detection annotations)")
    if not image_dir.is_dir():
        raise DataError(f"image folder not found: {image_dir}: set dataset.images to the folder the json's file_names are in")
    try:
        categories = sorted(({"id": int(c["id"]), "name": str(c["name"])} for c in data["categories"]),
                            key=lambda c: c["id"])
    except (KeyError, TypeError, ValueError) as e:
        raise DataError(f"{ann_file}: a category lacks an integer 'id' or a 'name': fix 'categories'") from e
    if not categories:
        raise DataError(f"{ann_file} has no categories: use a COCO detection json")
    if limit is not None and limit < 1:
        raise DataError(f"limit={limit}: use a positive number of images or None for all")

    try:
        entries = [{"id": int(i["id"]), "file_name": str(i["file_name"]), "width": int(i["width"]),
                    "height": int(i["height"])} for i in data["images"]]
    except (KeyError, TypeError, ValueError) as e:
        raise DataError(f"{ann_file}: an image entry lacks id/file_name/width/height: fix 'images'") from e
    if len({e["id"] for e in entries}) != len(entries):
        raise DataError(f"{ann_file}: duplicate image ids: give every image a unique id")
    all_ids = {e["id"] for e in entries}
    entries = _limited(entries, limit)
    if not entries:
        raise DataError(f"{ann_file} lists no images: point dataset.annotations at a non-empty json")

    records = []
    for e in entries:
        path = image_dir / e["file_name"]
        w, h = image_size(path)
        if (w, h) != (e["width"], e["height"]):
            raise DataError(f"{path} is {w}x{h} but {ann_file.name} says {e['width']}x{e['height']}: "
                            "the image folder does not belong to these annotations")
        records.append(ImageRecord(e["id"], path, w, h))

    sizes = {r.id: (r.width, r.height) for r in records}
    known_cats = {c["id"] for c in categories}
    annotations = []
    for n, a in enumerate(data["annotations"]):
        where = f"{ann_file.name} annotation #{n}" + (f" (id {a.get('id')})" if isinstance(a, dict) else "")
        if not isinstance(a, dict) or "image_id" not in a or "category_id" not in a or "bbox" not in a:
            raise DataError(f"{where} lacks image_id/category_id/bbox: fix the annotation")
        if a["image_id"] not in all_ids:
            raise DataError(f"{where} refers to image id {a['image_id']} that is not in 'images': fix or drop it")
        if a["category_id"] not in known_cats:
            raise DataError(f"{where} has category_id {a['category_id']} that is not in 'categories': fix or drop it")
        if a["image_id"] not in sizes:      # left out by `limit`
            continue
        box = _check_box(a["bbox"], *sizes[a["image_id"]], where)
        # keep what bbox evaluation reads; 'area' stays COCO's (segment area), it picks small/medium/large.
        # ids are renumbered from 1: pycocotools mis-matches a gt with id 0 and collapses duplicate ids
        annotations.append({"id": len(annotations) + 1, "image_id": int(a["image_id"]),
                            "category_id": int(a["category_id"]), "bbox": box,
                            "area": float(a.get("area", box[2] * box[3])), "iscrowd": int(a.get("iscrowd", 0))})

    gt = {"images": entries, "annotations": annotations, "categories": categories}
    return Dataset(name=ann_file.stem, images=records, class_names=[c["name"] for c in categories],
                   category_ids=[c["id"] for c in categories], coco_gt=gt)


# ---------------------------------------------------------------------------------------------------------
# Ultralytics YOLO layout

def _find_yaml(path: Path) -> Path:
    if path.is_file():
        return path
    if not path.is_dir():
        raise DataError(f"YOLO dataset not found: {path}: set dataset.root to a data.yaml (or its folder)")
    if (path / "data.yaml").is_file():
        return path / "data.yaml"
    found = sorted(path.glob("*.yaml")) + sorted(path.glob("*.yml"))
    if len(found) != 1:
        raise DataError(f"{path} holds {len(found)} yaml files, need exactly one (or a data.yaml): "
                        "set dataset.root to the data yaml itself")
    return found[0]


def _yolo_names(names: Any, yaml_file: Path) -> list[str]:
    if isinstance(names, list) and names:
        return [str(n) for n in names]
    if isinstance(names, dict) and names:
        try:
            keys = sorted(int(k) for k in names)
        except (TypeError, ValueError) as e:
            raise DataError(f"{yaml_file}: 'names' keys must be class indices 0..nc-1") from e
        if keys != list(range(len(keys))):
            raise DataError(f"{yaml_file}: 'names' keys must be the class indices 0..nc-1 without gaps: renumber them")
        return [str(names[k] if k in names else names[str(k)]) for k in keys]
    raise DataError(f"{yaml_file} has no 'names': add the class names (list, or dict index -> name)")


def _split_images(spec: Any, root: Path, yaml_file: Path, split: str) -> list[Path]:
    """A split is a folder, a .txt listing images, or a list of those (Ultralytics' rules)."""
    images: list[Path] = []
    for item in spec if isinstance(spec, list) else [spec]:
        p = Path(str(item))
        p = p if p.is_absolute() else root / p
        if p.is_dir():
            images += _list_images(p)
        elif p.is_file() and p.suffix == ".txt":
            for line in p.read_text().splitlines():
                line = line.strip()
                if line:
                    q = Path(line)
                    images.append(q if q.is_absolute() else (p.parent / q if line.startswith("./") else root / q))
        else:
            raise DataError(f"{yaml_file}: {split} split {p} does not exist: fix '{split}:' or 'path:' in the yaml "
                            "(a relative 'path:' is taken relative to the yaml's folder)")
    return images


def _label_path(image: Path) -> Path:
    """Ultralytics' convention: the last /images/ in the path becomes /labels/, the suffix .txt."""
    parts = list(image.parts)
    for i in range(len(parts) - 2, -1, -1):
        if parts[i] == "images":
            parts[i] = "labels"
            break
    return Path(*parts).with_suffix(".txt")


def _image_ids(images: list[Path]) -> list[int]:
    """Numeric file stems (COCO-style 000000000139.jpg) keep their number as id; otherwise 1..N in path order."""
    stems = [p.stem for p in images]
    if all(s.isdigit() for s in stems) and len({int(s) for s in stems}) == len(stems):
        return [int(s) for s in stems]
    return list(range(1, len(images) + 1))


def _yolo_boxes(label_file: Path, width: int, height: int, nc: int) -> list[tuple[int, list[float]]]:
    if not label_file.is_file():
        return []                       # no label file = an image without objects (Ultralytics' rule)
    boxes = []
    for n, line in enumerate(label_file.read_text().splitlines(), start=1):
        fields = line.split()
        if not fields:
            continue
        where = f"{label_file}:{n}"
        if len(fields) != 5:
            raise DataError(f"{where} has {len(fields)} fields, expected 'class cx cy w h' (5): fix the label line")
        try:
            cls_f, cx, cy, w, h = (float(v) for v in fields)
        except ValueError as e:
            raise DataError(f"{where}: non-numeric field in {line!r}: fix the label line") from e
        if not cls_f.is_integer() or not 0 <= cls_f < nc:
            raise DataError(f"{where}: class {fields[0]} is not one of 0..{nc - 1} from 'names': fix the label or the yaml")
        t = YOLO_TOLERANCE
        if not all(math.isfinite(v) for v in (cx, cy, w, h)) or w <= 0 or h <= 0:
            raise DataError(f"{where}: box {fields[1:]} has non-positive width/height: fix or drop the line")
        if cx - w / 2 < -t or cy - h / 2 < -t or cx + w / 2 > 1 + t or cy + h / 2 > 1 + t:
            raise DataError(f"{where}: box {fields[1:]} is outside 0..1: YOLO labels are normalised cx cy w h")
        x0, y0 = max(0.0, (cx - w / 2) * width), max(0.0, (cy - h / 2) * height)
        x1, y1 = min(float(width), (cx + w / 2) * width), min(float(height), (cy + h / 2) * height)
        boxes.append((int(cls_f), [x0, y0, x1 - x0, y1 - y0]))
    return boxes


def load_yolo(path: Path, split: str = "val", limit: int | None = None) -> Dataset:
    """Ultralytics layout: data.yaml (path/train/val/names) + images/<split> + labels/<split> (cx cy w h in 0..1)."""
    yaml_file = _find_yaml(Path(path))
    try:
        data = yaml.safe_load(yaml_file.read_text())
    except yaml.YAMLError as e:
        raise DataError(f"{yaml_file} is not valid YAML ({type(e).__name__}): fix the file") from e
    if not isinstance(data, dict):
        raise DataError(f"{yaml_file} is not a mapping with path/train/val/names: use an Ultralytics data yaml")
    names = _yolo_names(data.get("names"), yaml_file)
    if data.get(split) in (None, ""):
        raise DataError(f"{yaml_file} has no '{split}:' split: add it or choose dataset.split=val/train/test")
    if limit is not None and limit < 1:
        raise DataError(f"limit={limit}: use a positive number of images or None for all")
    root = Path(str(data.get("path") or yaml_file.parent))
    root = root if root.is_absolute() else yaml_file.parent / root
    if not root.is_dir():
        raise DataError(f"{yaml_file}: dataset folder {root} not found: set 'path:' to the dataset folder "
                        "(absolute, or relative to the yaml)")

    files = _split_images(data[split], root, yaml_file, split)
    if len(set(files)) != len(files):
        raise DataError(f"{yaml_file}: the {split} split lists some images twice: remove the duplicates")
    if not files:
        raise DataError(f"{yaml_file}: the {split} split has no images ({', '.join(IMAGE_SUFFIXES)}): "
                        f"check 'path:' and '{split}:'")
    pairs = sorted(zip(_image_ids(files), files))
    if limit is not None:
        pairs = pairs[:limit]

    category_ids = list(COCO80_TO_91) if tuple(names) == COCO80_NAMES else list(range(1, len(names) + 1))
    records, gt_images, annotations = [], [], []
    for image_id, file in pairs:
        w, h = image_size(file)
        records.append(ImageRecord(image_id, file, w, h))
        gt_images.append({"id": image_id, "file_name": str(file.relative_to(root)) if file.is_relative_to(root) else str(file),
                          "width": w, "height": h})
        for cls, box in _yolo_boxes(_label_path(file), w, h, len(names)):
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": category_ids[cls],
                                "bbox": box, "area": box[2] * box[3], "iscrowd": 0})

    gt = {"images": gt_images, "annotations": annotations,
          "categories": [{"id": c, "name": n} for c, n in zip(category_ids, names)]}
    return Dataset(name=yaml_file.stem, images=records, class_names=names, category_ids=category_ids, coco_gt=gt)


# ---------------------------------------------------------------------------------------------------------
# calibration

def calibration_images(dataset_or_dir: Union[Dataset, Path, str], n: int, seed: int) -> list[Path]:
    """n images picked with a seeded sampler from a Dataset or a folder (searched recursively), in path order.
    Fewer when fewer exist (warned): len() of the result is the number actually used, to log as a metric.
    The same inputs always give the same list. Images of a folder are checked like dataset images."""
    if n < 1:
        raise DataError(f"calibration size {n}: use at least one image (calib.size)")
    if isinstance(dataset_or_dir, Dataset):
        candidates = sorted(r.path for r in dataset_or_dir.images)
        where = f"dataset {dataset_or_dir.name}"
    else:
        folder = Path(dataset_or_dir)
        if folder.is_file():
            raise DataError(f"calib.source={folder} is a file: set calib.source to a folder of images or 'dataset'")
        if not folder.is_dir():
            raise DataError(f"calibration folder not found: {folder}: set calib.source to a folder of images or 'dataset'")
        candidates = _list_images(folder)
        where = str(folder)
    if not candidates:
        raise DataError(f"no images in {where} to calibrate with: add images or set calib.source=dataset")
    if n > len(candidates):
        log.warning("calib.size=%d but %s has %d images: calibrating with %d", n, where, len(candidates), len(candidates))
    picked = sorted(random.Random(seed).sample(candidates, min(n, len(candidates))))
    if not isinstance(dataset_or_dir, Dataset):  # a Dataset's images were checked when it was loaded
        for path in picked:
            image_size(path)
    return picked
