"""The stage cache under faults, with the real exporter, rknn-toolkit2 and real processes and files: the
demo model at 64 px, two calibration images."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import onnx
import pytest
from onnx import helper as onnx_helper

import rkbench
from rkbench.cache import StageCache
from rkbench.config import ModelConfig
from rkbench.errors import DataError, StageError
from rkbench.runtimes.simulator import SimulatorRuntime
from rkbench.stages import Artifact
from rkbench.stages.convert import ConvertOptions, convert
from rkbench.stages.export import export

pytestmark = pytest.mark.slow

RES = 64
INT8 = ConvertOptions("rk3588", True, "normal", "channel", "w8a8", 1)
DEMO = ModelConfig(weights="builtin:demo_yolov8n.pt")
REPO = str(Path(rkbench.__file__).resolve().parents[1])   # child processes import this checkout


def calibration(folder: Path, n: int = 2) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        paths.append(folder / f"img {i}.jpg")
        cv2.imwrite(str(paths[-1]), np.random.RandomState(i).randint(0, 255, (48, 80, 3), np.uint8))
    return paths


def test_int8_conversion_in_a_path_with_spaces_and_non_ascii(tmp_path):
    # rknn-toolkit2 splits each calibration list line on spaces: an absolute path under "my runs é"
    # failed with "Unsupport file .../my", and that failure was cached.
    root = tmp_path / "my runs é" / ".rkbench_cache"
    cache = StageCache(root)
    model = export(DEMO, RES, "rknn", "silu", cache)
    images = calibration(tmp_path / "my runs é" / "calib")
    rknn, live = convert(model, INT8, RES, images, "calib-a", cache, "rknn")
    live.release()
    assert rknn.path.stat().st_size == rknn.info["rknn_bytes"] > 0
    assert not list(rknn.path.parent.glob("check*.onnx"))   # the toolkit's debug graphs (2 x 12 MB) went
    again, live = convert(model, INT8, RES, images, "calib-a", cache, "rknn")
    assert again.cached and live is None
    # a hit rebuilds the simulator from the entry's own calibration list (what the pipeline does)
    sim = SimulatorRuntime(onnx_path=model.path, opts=INT8, calib_list=again.path.parent / "calib" / "dataset.txt",
                           log_path=again.path.parent / "simulator.log")
    try:
        outputs = sim.infer(np.zeros((1, RES, RES, 3), np.uint8))
    finally:
        sim.close()
    assert [o.shape for o in outputs][:3] == [(1, 64, 8, 8), (1, 4, 8, 8), (1, 1, 8, 8)]


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> dict[str, Artifact]:
    """The demo model exported once per head, in a cache of its own."""
    cache = StageCache(tmp_path_factory.mktemp("exported"))
    return {head: export(DEMO, RES, head, "silu", cache) for head in ("rknn", "ultralytics")}


def entries(root: Path, stage: str = "convert") -> list[str]:
    folder = root / stage
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


CONVERT_ONCE = """
import json, sys
from pathlib import Path
from rkbench.cache import StageCache, sha256_file
from rkbench.stages import Artifact
from rkbench.stages.convert import ConvertOptions, convert
root, onnx_path, *images = sys.argv[1:]
onnx = Artifact("export", Path(onnx_path), sha256_file(Path(onnx_path)), "k", True, {"head": "rknn"})
cache = StageCache(Path(root))
rknn, live = convert(onnx, ConvertOptions("rk3588", True, "normal", "channel", "w8a8", 1), 64,
                     [Path(p) for p in images], "calib-a", cache, "rknn")
print(json.dumps({"cached": rknn.cached, "sha256": rknn.sha256}))
"""


def test_two_processes_converting_one_configuration_build_it_once(tmp_path, exported):
    # Before: the second run's begin() wiped the first one's build folder mid-build and a
    # FileNotFoundError was cached as the configuration's failure.
    images = [str(p) for p in calibration(tmp_path / "calib")]
    env = dict(os.environ, PYTHONPATH=REPO)
    runs = [subprocess.Popen([sys.executable, "-c", CONVERT_ONCE, str(tmp_path / "cache"), str(exported["rknn"].path),
                              *images], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for _ in range(2)]
    results = []
    for run in runs:
        out, err = run.communicate(timeout=300)
        assert run.returncode == 0, err[-2000:]
        results.append(json.loads(out.strip().splitlines()[-1]))
    assert sorted(r["cached"] for r in results) == [False, True]      # one built, the other waited and hit
    assert results[0]["sha256"] == results[1]["sha256"]
    assert len(entries(tmp_path / "cache")) == 1                     # no temp folder left behind


def test_truncated_artifact_is_rebuilt_on_the_next_hit(tmp_path, caplog):
    # Before: a truncated model.onnx was trusted: wrong size metrics, or "re-export" on every run.
    cache = StageCache(tmp_path)
    first = export(DEMO, RES, "rknn", "silu", cache)
    size = first.path.stat().st_size
    with open(first.path, "r+b") as f:
        f.truncate(size // 2)
    with caplog.at_level(logging.WARNING, logger="rkbench.cache"):
        again = export(DEMO, RES, "rknn", "silu", StageCache(tmp_path))
    assert "discarded and rebuilt" in caplog.text and not again.cached
    assert again.path.stat().st_size == size and again.sha256 == first.sha256


def test_a_missing_input_is_not_remembered_as_a_failure(tmp_path, exported):
    # A file that vanishes mid-build (another process cleaning up) is the machine, not the model.
    gone = tmp_path / "gone.onnx"
    model = Artifact("export", gone, exported["rknn"].sha256, "k", True, dict(exported["rknn"].info))
    cache = StageCache(tmp_path / "cache")
    images = calibration(tmp_path / "calib")
    with pytest.raises(StageError, match="not exists") as err:
        convert(model, INT8, RES, images, "calib-a", cache, "rknn")
    assert not err.value.deterministic and "run again" in err.value.hint
    assert entries(tmp_path / "cache") == []                          # nothing cached, nothing half left
    shutil.copyfile(exported["rknn"].path, gone)
    rknn, live = convert(model, INT8, RES, images, "calib-a", cache, "rknn")   # the next run builds
    live.release()
    assert not rknn.cached and rknn.path.exists()


def test_a_toolkit_rule_error_is_remembered_and_a_damaged_record_is_redone(tmp_path, exported, caplog):
    cache_dir = tmp_path / "cache"
    images = calibration(tmp_path / "calib")

    def official_head(cache):
        with pytest.raises(StageError, match="seperate_conv_rs_split") as err:
            convert(exported["ultralytics"], INT8, RES, images, "calib-a", cache, "ultralytics")
        assert err.value.stage == "convert" and "export=rknn" in err.value.hint
        return err.value

    assert official_head(StageCache(cache_dir)).deterministic
    again = StageCache(cache_dir)
    assert "cached failure" in str(official_head(again)) and again.hits == ["convert"]
    [key] = entries(cache_dir)
    (cache_dir / "convert" / key / "failure.json").write_bytes(b"")   # a full disk while recording it
    redo = StageCache(cache_dir)
    with caplog.at_level(logging.WARNING, logger="rkbench.cache"):
        assert "cached failure" not in str(official_head(redo))
    assert redo.misses == ["convert"] and "is empty or invalid" in caplog.text
    assert json.loads((cache_dir / "convert" / key / "failure.json").read_text())["hint"]


def test_a_non_yolo_onnx_fails_export_in_one_line_and_leaves_no_folder(tmp_path):
    classifier = tmp_path / "classifier.onnx"   # a real, runnable classifier: pooled RGB -> 10 logits
    x = onnx_helper.make_tensor_value_info("images", onnx.TensorProto.FLOAT, [1, 3, RES, RES])
    y = onnx_helper.make_tensor_value_info("logits", onnx.TensorProto.FLOAT, [1, 10])
    weights = onnx.numpy_helper.from_array(np.ones((3, 10), np.float32), "w")
    graph = onnx_helper.make_graph([onnx_helper.make_node("GlobalAveragePool", ["images"], ["pooled"]),
                                    onnx_helper.make_node("Flatten", ["pooled"], ["flat"]),
                                    onnx_helper.make_node("MatMul", ["flat", "w"], ["logits"])],
                                   "classifier", [x], [y], [weights])
    onnx.save(onnx_helper.make_model(graph, opset_imports=[onnx_helper.make_opsetid("", 12)]), str(classifier))
    cache = StageCache(tmp_path / "cache")
    with pytest.raises(DataError) as err:
        export(ModelConfig(onnx=str(classifier)), RES, "rknn", "silu", cache)
    assert err.value.stage == "export" and "[1, 10]" in str(err.value) and "\n" not in str(err.value)
    assert entries(tmp_path / "cache", "export") == []


class SmallDisk:
    """A real file system that can be filled and freed: a tmpfs where mounting is allowed (root), else
    this process's file size limit (RLIMIT_FSIZE: writes past it fail with EFBIG, as on a full disk)."""

    def __init__(self, folder: Path):
        self.folder = folder
        folder.mkdir()
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=48m", "tmpfs", str(folder)],
                                 capture_output=True) if shutil.which("mount") else None
        self.tmpfs = bool(mounted and mounted.returncode == 0)
        if not self.tmpfs:
            self.resource = pytest.importorskip("resource", reason="cannot mount a tmpfs and no RLIMIT_FSIZE here")

    def fill(self, room: int) -> None:
        if self.tmpfs:
            (self.folder / "filler").write_bytes(b"\0" * (shutil.disk_usage(self.folder).free - room))
        else:
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)   # else the kernel kills the process at the limit
            self.saved = self.resource.getrlimit(self.resource.RLIMIT_FSIZE)
            self.resource.setrlimit(self.resource.RLIMIT_FSIZE, (room, self.saved[1]))

    def free(self) -> None:
        if self.tmpfs:
            (self.folder / "filler").unlink()
        else:
            self.resource.setrlimit(self.resource.RLIMIT_FSIZE, self.saved)
            signal.signal(signal.SIGXFSZ, signal.SIG_DFL)

    def close(self) -> None:
        if self.tmpfs:
            subprocess.run(["umount", "-l", str(self.folder)], check=True)


@pytest.fixture
def small_disk(tmp_path):
    disk = SmallDisk(tmp_path / "disk")
    yield disk
    disk.close()


def test_a_full_disk_fails_in_one_line_keeps_nothing_and_the_next_run_builds(tmp_path, exported, small_disk):
    root = small_disk.folder / "cache"
    images = calibration(tmp_path / "calib")
    small_disk.fill(room=256 * 1024)
    try:
        with pytest.raises(StageError) as err:
            convert(exported["rknn"], INT8, RES, images, "calib-a", StageCache(root), "rknn")
    finally:
        small_disk.free()
    message = str(err.value)
    assert "no space left" in message and str(root) in message and "cache_dir=" in message and "\n" not in message
    assert err.value.stage == "convert" and not err.value.deterministic
    assert entries(root) == []                          # no half entry, no failure remembered
    cache = StageCache(root)
    rknn, live = convert(exported["rknn"], INT8, RES, images, "calib-a", cache, "rknn")
    live.release()
    assert cache.misses == ["convert"] and rknn.path.stat().st_size == rknn.info["rknn_bytes"]
    assert entries(root) == [rknn.cache_key[:16]]
