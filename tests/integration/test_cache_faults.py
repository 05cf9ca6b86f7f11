"""The stage cache under faults, with the real exporter, rknn-toolkit2 and real processes and files: the
demo model at 64 px, two calibration images."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from rkbench.cache import StageCache
from rkbench.config import ModelConfig
from rkbench.runtimes.simulator import SimulatorRuntime
from rkbench.stages.convert import ConvertOptions, convert
from rkbench.stages.export import export

pytestmark = pytest.mark.slow

RES = 64
INT8 = ConvertOptions("rk3588", True, "normal", "channel", "w8a8", 1)
DEMO = ModelConfig(weights="builtin:demo_yolov8n.pt")


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
    onnx = export(DEMO, RES, "rknn", "silu", cache)
    images = calibration(tmp_path / "my runs é" / "calib")
    rknn, live = convert(onnx, INT8, RES, images, "calib-a", cache, "rknn")
    live.release()
    assert rknn.path.stat().st_size == rknn.info["rknn_bytes"] > 0
    again, live = convert(onnx, INT8, RES, images, "calib-a", cache, "rknn")
    assert again.cached and live is None
    # a hit rebuilds the simulator from the entry's own calibration list (what the pipeline does)
    sim = SimulatorRuntime(onnx_path=onnx.path, opts=INT8, calib_list=again.path.parent / "calib" / "dataset.txt",
                           log_path=again.path.parent / "simulator.log")
    try:
        outputs = sim.infer(np.zeros((1, RES, RES, 3), np.uint8))
    finally:
        sim.close()
    assert [o.shape for o in outputs][:3] == [(1, 64, 8, 8), (1, 4, 8, 8), (1, 1, 8, 8)]
