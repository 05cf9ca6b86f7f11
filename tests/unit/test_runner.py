"""The on-device runner, run the way a board runs it: as a script in a flat folder holding only the bundle
the board stage pushes (runner.py and the modules it imports flat; rkbench itself made unimportable),
driven by a spec file, with ONNX Runtime on a tiny model whose outputs have the RKNN head layout, so
letterbox, DFL decode, NMS and tiling all run for real."""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import pytest

from rkbench.device import modes, runner_io, sampling
from rkbench.device.session import bundle_files
from rkbench.models.detect import InferenceSpec, SpecError
from test_backends import make_rknn_head_model

SIZE = 64
IMAGES = {7: (80, 60), 9: (50, 90), 11: (100, 100), 13: (120, 70)}   # image id -> (width, height)
NPU_LOAD = "NPU load:  Core0: 37%, Core1:  5%, Core2:  0%,\n"


@dataclass
class Board:
    dir: Path        # the flat folder the runner runs in
    env: dict
    images: Path     # images list file
    sysfs: Path      # fake board root

    def run(self, mode: str, *args: str, out: str = "result.json", size: int = SIZE, **inference
            ) -> tuple[subprocess.CompletedProcess, dict | None]:
        """The runner with a spec file holding the inference spec (`inference` overrides its fields)."""
        spec = dict(dict(input_size=size, head="rknn", num_classes=3, category_ids=[1, 5, 9], runtime="onnxruntime",
                         threads=1), **inference)
        (self.dir / f"{out}.spec.json").write_text(json.dumps({"inference": spec}))
        cmd = [sys.executable, "runner.py", "--spec", f"{out}.spec.json", "--mode", mode, "--model", "model.onnx",
               "--where", "emulator", "--sysfs-root", str(self.sysfs), "--out", out, *args]
        proc = subprocess.run(cmd, cwd=self.dir, env=self.env, capture_output=True, text=True, timeout=120)
        path = self.dir / out
        return proc, (json.loads(path.read_text()) if path.exists() else None)

    def ok(self, mode: str, *args: str, **inference) -> dict:
        proc, result = self.run(mode, *args, **inference)
        assert proc.returncode == 0, proc.stderr
        assert result is not None and result["complete"] is True
        return result


def write_images(folder: Path) -> None:
    rng = np.random.default_rng(3)
    colours = {7: (0, 0, 0), 9: (255, 255, 255), 11: (200, 30, 30)}
    for image_id, (w, h) in IMAGES.items():
        if image_id in colours:
            img = np.zeros((h, w, 3), np.uint8) + np.array(colours[image_id], np.uint8)
            img[: h // 2, : w // 3] = 255 - img[: h // 2, : w // 3]   # some structure, so boxes differ per cell
        else:
            img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        cv2.imwrite(str(folder / f"{image_id}.png"), cv2.cvtColor(img, cv2.COLOR_RGB2BGR))


@pytest.fixture(scope="module")
def board(tmp_path_factory) -> Board:
    root = tmp_path_factory.mktemp("board")
    flat = root / "rkbench"
    flat.mkdir()
    for path in bundle_files().values():    # exactly what the board stage pushes
        shutil.copy(path, flat / path.name)
    assert sorted(p.name for p in flat.iterdir()) == ["backends.py", "detect.py", "modes.py", "prepost.py", "runner.py",
                                                       "runner_io.py", "sampling.py", "stats.py"]
    make_rknn_head_model(flat / "model.onnx", size=SIZE, num_classes=3)
    (flat / "img").mkdir()
    write_images(flat / "img")
    (flat / "images.txt").write_text("".join(f"{i}\timg/{i}.png\n" for i in IMAGES))
    # rkbench is importable on this host (editable install / cwd): a shadow package makes the runner take
    # its flat siblings, as on a board where only the three files exist
    shadow = root / "shadow" / "rkbench"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError('rkbench is not on the board')\n")
    sysfs = root / "sysfs"
    (sysfs / "sys/kernel/debug/rknpu").mkdir(parents=True)
    (sysfs / "sys/kernel/debug/rknpu/load").write_text(NPU_LOAD)
    (sysfs / "sys/class/devfreq/fdab0000.npu").mkdir(parents=True)
    (sysfs / "sys/class/devfreq/fdab0000.npu/cur_freq").write_text("1000000000\n")
    env = dict(os.environ, PYTHONPATH=str(shadow.parent), OMP_NUM_THREADS="1")
    env.pop("RKBENCH_BOARD_ROOT", None)
    return Board(flat, env, flat / "images.txt", sysfs)


def test_latency_stats_are_consistent(board):
    r = board.ok("latency", "--image", "img/11.png", "--warmup", "2", "--iterations", "5", "--min-seconds", "0.3")
    lat = r["latency"]
    assert lat["iterations"] >= 5 and lat["timed_s"] >= 0.3        # N iterations AND T seconds
    for part in ("pre", "infer", "post", "total"):
        s = lat[part]
        assert s["count"] == lat["iterations"] == len(lat["samples_ms"][part])
        assert 0 < s["min"] <= s["p50"] <= s["p90"] <= s["p99"] and s["std"] >= 0
    assert lat["total"]["mean"] == pytest.approx(lat["pre"]["mean"] + lat["infer"]["mean"] + lat["post"]["mean"])
    assert lat["fps"] == pytest.approx(1e3 / lat["total"]["mean"])
    assert r["where"] == "emulator" and r["mode"] == "latency" and r["hostname"]
    assert r["runtime"]["kind"] == "onnxruntime" and r["runtime"]["version"].startswith("onnxruntime")
    assert {"runner", "python", "numpy", "onnxruntime", "rknnlite"} <= set(r["versions"])
    assert r["versions"]["rknnlite"] is None and r["versions"]["onnxruntime"]
    # self-contained: the runner ran on its flat siblings, not on the rkbench package
    assert {Path(p).parent for p in r["modules"].values()} == {board.dir.resolve()}
    # sysfs sampling read the fake board's files
    npu = r["system"]["npu_load"]
    assert npu["available"] and npu["per_core"]["0"]["mean_pct"] == 37 and npu["per_core"]["1"]["max_pct"] == 5
    assert r["system"]["memory"]["peak_rss_mib"] > 10 and r["system"]["cpu_load"]["available"]
    assert r["board"]["devfreq"]["fdab0000.npu"]["cur_freq"] == "1000000000"
    assert r["model"]["sha256"] and r["model"]["bytes"] == (board.dir / "model.onnx").stat().st_size


def eval_detections(board: Board, **inference) -> tuple[dict, list[dict]]:
    r = board.ok("eval", "--images", "images.txt", **inference)
    return r, json.loads(Path(board.dir / r["eval"]["detections_file"]).read_text())


def test_eval_writes_coco_detections(board):
    from pycocotools.coco import COCO

    r, dets = eval_detections(board)
    assert r["eval"]["images"] == len(IMAGES) and r["eval"]["detections"] == len(dets) > 0
    assert r["eval"]["infer"]["count"] == len(IMAGES)
    assert {d["image_id"] for d in dets} <= set(IMAGES) and {d["category_id"] for d in dets} <= {1, 5, 9}
    for d in dets:
        x, y, w, h = d["bbox"]
        width, height = IMAGES[d["image_id"]]
        assert 0 <= x and 0 <= y and w >= 0 and h >= 0 and x + w <= width + 0.01 and y + h <= height + 0.01
        assert 0.001 <= d["score"] <= 1
    assert max(sum(d["image_id"] == i for d in dets) for i in IMAGES) <= 300
    gt = COCO()
    gt.dataset = {"images": [{"id": i, "width": w, "height": h} for i, (w, h) in IMAGES.items()],
                  "annotations": [], "categories": [{"id": c, "name": str(c)} for c in (1, 5, 9)]}
    gt.createIndex()
    assert len(gt.loadRes(dets).getAnnIds()) == len(dets)                 # valid COCO results
    assert r["system"]["memory"]["rss_samples"] >= 1               # sampled during eval too


def test_eval_batches_give_the_detections_of_single_images(board):
    _, single = eval_detections(board, conf=0.5)
    r, batched = eval_detections(board, conf=0.5, batch=3)     # 4 images: the last batch padded
    assert r["eval"]["infer"]["count"] == 2 and len(batched) == len(single) > 0
    key = lambda d: (d["image_id"], d["category_id"], -d["score"])          # noqa: E731
    for a, b in zip(sorted(single, key=key), sorted(batched, key=key)):
        assert (a["image_id"], a["category_id"]) == (b["image_id"], b["category_id"])
        np.testing.assert_allclose(a["bbox"], b["bbox"], atol=0.05)


@pytest.mark.parametrize("batch", [1, 3])
def test_throughput_reorders_and_counts_every_frame(board, batch):
    _, dets = eval_detections(board, conf=0.5)
    per_image = [sum(d["image_id"] == i for d in dets) for i in IMAGES]   # images.txt order
    assert len(set(per_image)) > 1, "test images must give different detection counts"
    frames = 14   # with batch 3 the last job holds 2 frames
    r = board.ok("throughput", "--images", "images.txt", "--cores", "0,1,2", "--frames", str(frames), "--warmup", "1",
                 conf=0.5, batch=batch)
    tp = r["throughput"]
    assert tp["frames"] == frames and sum(w["frames"] for w in tp["workers"]) == frames
    assert [w["core_mask"] for w in tp["workers"]] == ["0", "1", "2"] == r["runtime"]["core_masks"]
    assert sum(w["share"] for w in tp["workers"]) == pytest.approx(1.0)
    assert tp["in_order"] and tp["frame_detections"] == [per_image[i % len(IMAGES)] for i in range(frames)]
    assert tp["fps"] == pytest.approx(frames / tp["wall_s"]) and tp["frame_latency_ms"]["count"] == frames


def test_reorderer_releases_in_frame_order():
    order = list(range(50))
    random.Random(0).shuffle(order)
    reorder = modes.Reorderer()
    released = [i for index in order for i, item in reorder.push(index, index * 10) if item == i * 10]
    assert released == list(range(50)) and not reorder.held
    assert reorder.early_arrivals > 0 and reorder.max_held > 1


def test_tiling_covers_the_frame(board):
    r = board.ok("tiling", "--frame-size", "200x150", "--overlap", "0.25", "--iterations", "2", "--min-seconds", "0")
    t = r["tiling"]
    assert t["frame"] == [200, 150] and t["tile"] == SIZE and t["tiles_per_frame"] == len(t["tile_origins"]) > 1
    covered = np.zeros((150, 200), bool)
    for x, y in t["tile_origins"]:
        assert 0 <= x <= 200 - SIZE and 0 <= y <= 150 - SIZE
        covered[y:y + SIZE, x:x + SIZE] = True
    assert covered.all()
    assert t["frames"] >= 2 and t["infer"]["count"] == t["frames"]
    for d in t["last_frame_detections"]:
        x, y, w, h = d["bbox"]
        assert 0 <= x and 0 <= y and x + w <= 200.01 and y + h <= 150.01 and 0 <= d["class"] < 3
    counts = t["detections_per_frame"]          # the same synthetic frame every time: the same detections
    assert counts["min"] == counts["p99"] == len(t["last_frame_detections"]) > 0


def test_resized_tiles_grid_the_frame_and_dataset_frames_are_all_scored(board):
    r = board.ok("tiling", "--frame-size", "200x150", "--tile-mode", "resized", "--tile-grid", "2x2", "--iterations", "2",
                 "--min-seconds", "0")["tiling"]
    assert r["tile_mode"] == "resized" and r["tiles_per_frame"] == 4 and "detections_file" not in r
    assert r["tile_windows"] == [[0, 0, 100, 75], [100, 0, 100, 75], [0, 75, 100, 75], [100, 75, 100, 75]]
    # frames from the images list: each image once in the detections file, even those the timed loop missed
    t = board.ok("tiling", "--images", str(board.images), "--iterations", "1", "--min-seconds", "0", "--warmup", "0",
                 "--detections", "tiles.json")["tiling"]
    assert t["frames"] == 1 and t["images"] == len(IMAGES)
    dets = json.loads((board.dir / "tiles.json").read_text())
    assert {d["image_id"] for d in dets} <= set(IMAGES) and {d["category_id"] for d in dets} <= {1, 5, 9}
    for d in dets:
        w, h = IMAGES[d["image_id"]]
        x, y, bw, bh = d["bbox"]
        assert 0 <= x and 0 <= y and x + bw <= w + 0.01 and y + bh <= h + 0.01


def test_missing_sysfs_is_recorded_not_fatal(board, tmp_path):
    r = board.ok("latency", "--iterations", "2", "--min-seconds", "0", "--warmup", "0", "--sysfs-root", str(tmp_path))
    npu = r["system"]["npu_load"]
    assert npu["available"] is False and npu["reason"].startswith("missing:")
    assert r["board"]["compatible"] is None and r["latency"]["source"].startswith("synthetic")


def test_null_runtime_measures_the_harness(board):
    r = board.ok("latency", "--iterations", "3", "--min-seconds", "0", "--image", "img/9.png", runtime="null")
    assert r["runtime"]["kind"] == "null" and r["latency"]["infer"]["count"] == 3
    assert r["latency"]["detections_per_iteration"]["mean"] == 0     # zero outputs: no class clears conf


def test_spec_file_round_trips_and_refuses_what_cannot_run(board):
    spec = InferenceSpec(input_size=64, head="yolov5", num_classes=2, category_ids=(3, 7), batch=2, conf=0.25,
                         anchors=((10, 13, 16, 30, 33, 23),) * 3, runtime="rknnlite", core_mask="0_1")
    assert InferenceSpec.from_dict(json.loads(spec.to_json())) == spec
    with pytest.raises(SpecError, match="2 classes but 3 category ids"):
        InferenceSpec(input_size=64, head="rknn", num_classes=2, category_ids=(1, 2, 3))
    with pytest.raises(SpecError, match="unknown inference spec keys size"):
        InferenceSpec.from_dict(dict(spec.to_dict(), size=64))
    # the runner says the same in one line, before loading a model
    proc, _ = board.run("eval", "--images", "images.txt", out="bad.json", category_ids=[1, 2])
    assert proc.returncode == 1 and "3 classes but 2 category ids" in proc.stderr.strip().splitlines()[-1]


def test_npu_load_formats():
    assert sampling.parse_npu_load(NPU_LOAD) == {"0": 37.0, "1": 5.0, "2": 0.0}
    assert sampling.parse_npu_load("NPU load:  12%\n") == {"0": 12.0}          # single-core NPUs
    with pytest.raises(ValueError):
        sampling.parse_npu_load("garbage")


def test_failure_exit_code_and_incomplete_result(board):
    proc, result = board.run("eval", "--images", "nope.txt", out="bad.json")
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines()[-1].startswith("runner: error: RunnerError: images file")
    assert result is not None and result["complete"] is False and "images file" in result["error"]
    with pytest.raises(runner_io.ResultError, match="images file"):
        runner_io.load_result(str(board.dir / "bad.json"))
    # a worker failing in the pool: every thread leaves, the error names the worker's core and the fix
    proc, result = board.run("throughput", "--cores", "0,1", "--frames", "4", out="bad.json", size=32)
    assert proc.returncode == 1 and len(proc.stderr.strip().splitlines()) == 1
    assert "worker" in proc.stderr and "in warmup" in proc.stderr and "size must match" in proc.stderr


def test_load_result_tells_missing_truncated_and_complete(board, tmp_path):
    r = board.ok("latency", "--iterations", "1", "--min-seconds", "0", "--warmup", "0")
    good = board.dir / "result.json"
    assert runner_io.load_result(str(good))["latency"]["iterations"] == r["latency"]["iterations"]
    truncated = tmp_path / "truncated.json"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(runner_io.ResultError, match="truncated"):
        runner_io.load_result(str(truncated))
    with pytest.raises(runner_io.ResultError, match="no result"):
        runner_io.load_result(str(tmp_path / "absent.json"))
    assert not list(board.dir.glob("*.tmp"))
