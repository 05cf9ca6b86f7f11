from __future__ import annotations

import json
import logging
import shutil
import struct
import zlib
from pathlib import Path

import cv2
import pytest

from rkbench.data import demo
from rkbench.data.datasets import COCO80_NAMES, MAX_PIXELS, Dataset, calibration_images, load_coco, load_yolo
from rkbench.data.demo import demo_dataset, generate_demo, render
from rkbench.errors import DataError
from rkbench.models.prepost import load_rgb

N_VAL = 6


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("demo")
    generate_demo(root, n_train=2, n_val=N_VAL, seed=0)
    return root


@pytest.fixture
def copy(demo_root, tmp_path) -> Path:
    """A private copy of the demo folder to break; its data.yaml points at the copy."""
    dst = tmp_path / "d"
    shutil.copytree(demo_root, dst)
    (dst / "data.yaml").write_text((dst / "data.yaml").read_text().replace(str(demo_root.resolve()), str(dst.resolve())))
    return dst


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _coco(root: Path) -> Dataset:
    return load_coco(root / "annotations" / "instances_val.json", root / "images" / "val")


def _edit_json(root: Path, edit) -> Path:
    ann = root / "annotations" / "instances_val.json"
    gt = json.loads(ann.read_text())
    edit(gt)
    ann.write_text(json.dumps(gt))
    return ann


def _raises(fn, *args, match: str) -> None:
    with pytest.raises(DataError, match=match) as e:
        fn(*args)
    assert "\n" not in str(e.value), "DataError messages are one line"


# ---------------------------------------------------------------------------------------------------------
# demo generator

def test_same_seed_writes_identical_files(tmp_path, demo_root):
    generate_demo(tmp_path / "a", n_train=2, n_val=N_VAL, seed=0, yaml_root=demo_root)
    assert _files(tmp_path / "a") == _files(demo_root)
    generate_demo(tmp_path / "b", n_train=0, n_val=2, seed=1)
    assert (tmp_path / "b/images/val/val_00000.png").read_bytes() != (demo_root / "images/val/val_00000.png").read_bytes()


def test_val_split_does_not_depend_on_train_size(tmp_path, demo_root):
    generate_demo(tmp_path, n_train=0, n_val=N_VAL, seed=0)
    ours, theirs = _files(tmp_path), _files(demo_root)
    val = [k for k in theirs if "val" in k]
    assert val and all(ours[k] == theirs[k] for k in val)
    assert not any("train" in k for k in ours)


def test_demo_content_covers_sizes_classes_and_aspects():
    shapes, sizes = [], set()
    for i in range(40):
        img, s = render(0, "val", i)
        sizes.add(img.shape[:2])
        shapes += s
        assert 1 <= len(s) <= 6
        h, w = img.shape[:2]
        assert all(0 <= x.box[0] and 0 <= x.box[1] and x.box[0] + x.box[2] <= w and x.box[1] + x.box[3] <= h for x in s)
    areas = [x.box[2] * x.box[3] for x in shapes]
    assert min(areas) < 32 ** 2 and max(areas) > 96 ** 2 and any(32 ** 2 <= a < 96 ** 2 for a in areas)
    assert {x.cls for x in shapes} == {0, 1, 2, 3}
    assert len({h / w for h, w in sizes}) >= 3      # portrait, landscape and square


def test_demo_dataset_generates_once_and_reuses(tmp_path):
    root = tmp_path / "cache" / "demo"
    ds = demo_dataset(root, n_val=4)
    assert ds.name == "demo" and len(ds.images) == 4 and ds.class_names == list(demo.CLASS_NAMES)
    assert ds.category_ids == [1, 2, 3, 4] and [r.id for r in ds.images] == [1, 2, 3, 4]
    stamp = (root / "images/val/val_00000.png").stat().st_mtime_ns
    assert demo_dataset(root, n_val=4).fingerprint() == ds.fingerprint()
    assert (root / "images/val/val_00000.png").stat().st_mtime_ns == stamp          # not regenerated
    assert [p.name for p in root.parent.iterdir()] == ["demo"]                     # no temp dirs left
    assert f"path: {root}" in (root / "data.yaml").read_text()                     # the final place, not the temp one


def test_demo_dataset_regenerates_stale_version_and_refuses_foreign_folder(tmp_path):
    root = tmp_path / "demo"
    demo_dataset(root, n_val=2)
    marker = json.loads((root / demo.MARKER).read_text())
    (root / demo.MARKER).write_text(json.dumps(dict(marker, version=-1)))
    assert len(demo_dataset(root, n_val=3).images) == 3
    assert json.loads((root / demo.MARKER).read_text())["version"] == demo.GENERATOR_VERSION
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    _raises(demo_dataset, foreign, match="not an rkbench demo folder")
    assert (foreign / "notes.txt").exists()


def test_demo_dataset_in_a_place_that_cannot_be_written():
    """/proc stops even root: the folder exists but nothing can be made in it."""
    _raises(demo_dataset, Path("/proc/rkbench-demo"), match="cannot write the demo dataset in /proc "
            r"\(No such file or directory\): set cache_dir \(or dataset.root\) to a writable folder")


# ---------------------------------------------------------------------------------------------------------
# loaders

def _boxes(ds: Dataset) -> dict[int, list[tuple[int, list[float]]]]:
    out: dict[int, list] = {}
    for a in ds.coco_gt["annotations"]:
        out.setdefault(a["image_id"], []).append((a["category_id"], a["bbox"]))
    return {k: sorted(v) for k, v in out.items()}


def test_coco_and_yolo_loaders_agree_on_the_demo(demo_root):
    coco, yolo = _coco(demo_root), load_yolo(demo_root / "data.yaml", "val")
    assert coco.images == yolo.images
    assert coco.class_names == yolo.class_names == list(demo.CLASS_NAMES)
    assert coco.category_ids == yolo.category_ids == [1, 2, 3, 4]
    a, b = _boxes(coco), _boxes(yolo)
    assert a.keys() == b.keys() and sum(map(len, a.values())) >= N_VAL
    for image_id in a:
        assert [c for c, _ in a[image_id]] == [c for c, _ in b[image_id]]
        for (_, ba), (_, bb) in zip(a[image_id], b[image_id]):
            assert bb == pytest.approx(ba, abs=0.01)
    # the image sizes come from the files, not from the json
    first = coco.images[0]
    assert cv2.imread(str(first.path)).shape[:2] == (first.height, first.width)


def test_yolo_accepts_the_folder_and_limit_keeps_the_first_ids(demo_root):
    ds = load_yolo(demo_root, "train", limit=1)
    assert [r.id for r in ds.images] == [1] and ds.images[0].path.name == "train_00000.png"
    assert {a["image_id"] for a in ds.coco_gt["annotations"]} == {1}
    coco = load_coco(demo_root / "annotations/instances_val.json", demo_root / "images/val", limit=2)
    assert [r.id for r in coco.images] == [1, 2] and [i["id"] for i in coco.coco_gt["images"]] == [1, 2]
    assert {a["image_id"] for a in coco.coco_gt["annotations"]} <= {1, 2}


def test_yolo_coco80_names_map_to_official_category_ids(copy):
    names = "".join(f"  {i}: {n}\n" for i, n in enumerate(COCO80_NAMES))
    (copy / "data.yaml").write_text(f"path: {copy}\nval: images/val\nnames:\n{names}")
    ds = load_yolo(copy / "data.yaml")
    assert len(ds.category_ids) == 80 and ds.category_ids[:12] == [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 13]
    assert ds.category_ids[-1] == 90
    # demo class 0 (circle) became "person" (id 1), class 2 (triangle) "car" (id 3)
    assert {a["category_id"] for a in ds.coco_gt["annotations"]} <= {1, 2, 3, 4}


def test_relative_yaml_path_is_taken_from_the_yaml_folder(copy):
    (copy / "data.yaml").write_text("path: .\nval: images/val\nnames: [circle, square, triangle, cross]\n")
    assert len(load_yolo(copy / "data.yaml").images) == N_VAL


def test_coco_annotation_ids_are_renumbered_for_pycocotools(copy):
    _edit_json(copy, lambda gt: [a.update(id=0) for a in gt["annotations"]])      # id 0 / duplicates break COCOeval
    anns = _coco(copy).coco_gt["annotations"]
    assert [a["id"] for a in anns] == list(range(1, len(anns) + 1))


# ---------------------------------------------------------------------------------------------------------
# malformed input -> DataError with a one-line fix

def test_coco_missing_files_and_folders(copy):
    _raises(load_coco, copy / "nope.json", copy / "images/val", match="annotation file not found")
    _raises(load_coco, copy / "annotations/instances_val.json", copy / "nope", match="image folder not found")
    (copy / "images/val/val_00001.png").unlink()
    _raises(_coco, copy, match="image not found")


def test_coco_bad_json_and_zero_images(copy):
    ann = copy / "annotations/instances_val.json"
    ann.write_text("{not json")
    _raises(_coco, copy, match="not valid JSON")
    ann.write_text(json.dumps({"images": [], "annotations": [], "categories": [{"id": 1, "name": "x"}]}))
    _raises(_coco, copy, match="lists no images")
    ann.write_text(json.dumps({"images": []}))
    _raises(_coco, copy, match="lacks the 'images', 'annotations' and 'categories'")


def test_unreadable_image(copy):
    (copy / "images/val/val_00002.png").write_bytes(b"this is not a png")
    _raises(_coco, copy, match="unreadable image")
    _raises(load_yolo, copy / "data.yaml", "val", match="unreadable image")


def _png_1bit(path: Path, width: int, height: int) -> None:
    """A valid black 1-bit PNG, written chunk by chunk: a few hundred KB on disk, 1.2 GB once decoded to RGB."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    rows = (b"\x00" + bytes((width + 7) // 8)) * height        # filter byte + one bit per pixel
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))


@pytest.mark.parametrize("side", [20000, 9000])     # past PIL's own bomb error, and between its warning and ours
def test_pixel_bomb_is_refused_from_its_header(copy, side):
    bomb = copy / "images/val/val_00002.png"
    _png_1bit(bomb, side, side)
    assert side * side > MAX_PIXELS
    _raises(_coco, copy, match=f"{bomb}.*over the {MAX_PIXELS:,} pixel limit")
    _raises(load_yolo, copy / "data.yaml", "val", match=f"{bomb}.*over the {MAX_PIXELS:,} pixel limit")


def _as_jpeg(png: Path) -> Path:
    jpg = png.with_suffix(".jpg")
    assert cv2.imwrite(str(jpg), cv2.imread(str(png)))
    png.unlink()
    return jpg


def test_truncated_images_are_refused_when_the_dataset_loads(copy):
    jpg = _as_jpeg(copy / "images/val/val_00002.png")
    data = jpg.read_bytes()
    jpg.write_bytes(data + bytes(100_000))              # data after the image (a phone's motion photo): fine
    assert len(load_yolo(copy / "data.yaml", "val").images) == N_VAL
    jpg.write_bytes(data[:len(data) * 2 // 3])          # header intact, end cut off
    _raises(load_yolo, copy / "data.yaml", "val", match=f"{jpg} is truncated")
    with pytest.raises(ValueError, match=f"cannot read image {jpg} \\(truncated"):
        load_rgb(jpg)
    png = copy / "images/val/val_00003.png"
    png.write_bytes(png.read_bytes()[:-200])
    _raises(load_yolo, copy / "data.yaml", "val", match=f"{jpg} is truncated")   # the first bad one, by path
    jpg.write_bytes(data)
    _raises(load_yolo, copy / "data.yaml", "val", match=f"{png} .*truncated")


def test_image_size_must_match_the_json(copy):
    _edit_json(copy, lambda gt: gt["images"][0].update(width=gt["images"][0]["width"] + 1))
    _raises(_coco, copy, match="does not belong to these annotations")


@pytest.mark.parametrize("bbox, match", [
    ([10, 10, 0, 5], "non-positive"),
    ([10, 10, 5, -2], "non-positive"),
    ([-5, 10, 20, 20], "outside"),
    ([300, 200, 100, 100], "outside"),
    ([1, 2, 3], "is not \\[x, y, w, h\\]"),
    ([1, 2, "3", 4], "is not \\[x, y, w, h\\]"),
])
def test_coco_bad_boxes(copy, bbox, match):
    _edit_json(copy, lambda gt: gt["annotations"][0].update(bbox=bbox))
    _raises(_coco, copy, match=match)


def test_coco_unknown_category_and_image_id(copy):
    _edit_json(copy, lambda gt: gt["annotations"][0].update(category_id=99))
    _raises(_coco, copy, match="category_id 99 that is not in 'categories'")
    _edit_json(copy, lambda gt: gt["annotations"][0].update(category_id=1, image_id=12345))
    _raises(_coco, copy, match="image id 12345 that is not in 'images'")


def test_yolo_missing_yaml_split_and_folders(copy, tmp_path):
    _raises(load_yolo, tmp_path / "missing", match="YOLO dataset not found")
    _raises(load_yolo, copy, "test", match="no 'test:' split")
    (copy / "data.yaml").write_text(f"path: {copy}\nval: images/nothere\nnames: [a, b, c, d]\n")
    _raises(load_yolo, copy, match="does not exist")
    (copy / "data.yaml").write_text(f"path: {copy / 'gone'}\nval: images/val\nnames: [a, b, c, d]\n")
    _raises(load_yolo, copy, match="dataset folder .* not found")
    (copy / "data.yaml").write_text(f"path: {copy}\nval: images/val\n")
    _raises(load_yolo, copy, match="has no 'names'")
    (copy / "data.yaml").write_text("val: [unclosed\n")
    _raises(load_yolo, copy, match="not valid YAML")


def test_yolo_zero_images(copy):
    (copy / "images/empty").mkdir()
    (copy / "data.yaml").write_text(f"path: {copy}\nval: images/empty\nnames: [a, b, c, d]\n")
    _raises(load_yolo, copy, match="has no images")


@pytest.mark.parametrize("line, match", [
    ("0 0.5 0.5 0.2", "4 fields, expected 'class cx cy w h'"),
    ("0 0.5 0.5 0.2 0.2 0.9", "6 fields"),
    ("7 0.5 0.5 0.2 0.2", "class 7 is not one of 0..3"),
    ("1.5 0.5 0.5 0.2 0.2", "class 1.5"),
    ("0 0.5 0.5 0 0.2", "non-positive"),
    ("0 0.95 0.5 0.2 0.2", "outside 0..1"),
    ("0 x 0.5 0.2 0.2", "non-numeric"),
])
def test_yolo_bad_label_lines(copy, line, match):
    label = copy / "labels/val/val_00003.txt"
    label.write_text(label.read_text() + line + "\n")
    _raises(load_yolo, copy, match=match)


def test_yolo_image_without_label_file_has_no_objects(copy):
    (copy / "labels/val/val_00000.txt").unlink()
    ds = load_yolo(copy)
    assert len(ds.images) == N_VAL and 1 not in {a["image_id"] for a in ds.coco_gt["annotations"]}


# ---------------------------------------------------------------------------------------------------------
# fingerprint and calibration

def test_fingerprint_follows_image_bytes_and_ground_truth(copy):
    base = _coco(copy).fingerprint()
    assert _coco(copy).fingerprint() == base
    img = copy / "images/val/val_00004.png"
    pixels = cv2.imread(str(img))
    pixels[0, 0] = 255 - pixels[0, 0]
    cv2.imwrite(str(img), pixels)
    changed = _coco(copy).fingerprint()
    assert changed != base
    _edit_json(copy, lambda gt: gt["annotations"][0]["bbox"].__setitem__(0, gt["annotations"][0]["bbox"][0] + 1))
    assert _coco(copy).fingerprint() not in (base, changed)


def test_calibration_picks_are_deterministic(demo_root, tmp_path):
    ds = _coco(demo_root)
    a = calibration_images(ds, 3, seed=0)
    assert a == calibration_images(ds, 3, seed=0) and len(a) == 3 and a == sorted(a)
    assert set(a) <= {r.path for r in ds.images}
    assert a == calibration_images(demo_root / "images/val", 3, seed=0)    # a folder gives the same picks
    assert {tuple(calibration_images(ds, 3, seed=s)) for s in range(5)} != {tuple(a)}
    assert calibration_images(ds, 100, seed=0) == sorted(r.path for r in ds.images)
    _raises(calibration_images, tmp_path / "none", 2, 0, match="calibration folder not found")
    (tmp_path / "empty").mkdir()
    _raises(calibration_images, tmp_path / "empty", 2, 0, match="no images")
    _raises(calibration_images, ds, 0, 0, match="at least one image")


def test_calibration_says_when_it_has_fewer_images_than_asked(demo_root, caplog):
    ds = _coco(demo_root)
    with caplog.at_level(logging.WARNING, logger="rkbench.data"):
        assert len(calibration_images(ds, N_VAL, seed=0)) == N_VAL
        assert not caplog.records
        assert len(calibration_images(ds, 100, seed=0)) == N_VAL      # the real number, for the caller to log
    assert [r.getMessage() for r in caplog.records] == [f"calib.size=100 but dataset instances_val has {N_VAL} images: "
                                                         f"calibrating with {N_VAL}"]


def test_calibration_folder_must_be_a_folder_of_sound_images(demo_root, tmp_path):
    _raises(calibration_images, demo_root / "data.yaml", 2, 0, match="calib.source=.*data.yaml is a file: set calib.source to a folder")
    folder = tmp_path / "calib"
    shutil.copytree(demo_root / "images/val", folder)
    jpg = _as_jpeg(folder / "val_00001.png")
    jpg.write_bytes(jpg.read_bytes()[:-500])
    _raises(calibration_images, folder, 100, 0, match=f"{jpg} is truncated")
