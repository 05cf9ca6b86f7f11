"""describe_onnx_head: what a ready ONNX is, from its graph alone (no torch), and one line when it is not a
YOLOv8 detector rkbench can decode."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import onnx
import pytest
from onnx import helper

import rkbench
from rkbench.errors import DataError, UnsupportedCombination
from rkbench.stages.export import adopt_yolov8_onnx, describe_onnx_head


def graph_file(tmp_path: Path, outputs: list[list], size=64, name: str = "model.onnx") -> Path:
    """An ONNX with the given input size and output shapes (Identity/Constant nodes: only the
    declared shapes matter here)."""
    x = helper.make_tensor_value_info("images", onnx.TensorProto.FLOAT, [1, 3, size, size])
    outs = [helper.make_tensor_value_info(f"out{i}", onnx.TensorProto.FLOAT, s) for i, s in enumerate(outputs)]
    nodes = [helper.make_node("Identity", ["images"], [f"out{i}"]) for i in range(len(outputs))]
    path = tmp_path / name
    onnx.save(helper.make_model(helper.make_graph(nodes, "g", [x], outs)), str(path))
    return path


def rknn_head(nc: int, size: int = 64, reg_max: int = 16) -> list[list]:
    return [s for g in (size // 8, size // 16, size // 32)
            for s in ([1, 4 * reg_max, g, g], [1, nc, g, g], [1, 1, g, g])]


def test_official_and_rknn_heads_are_recognised(tmp_path):
    official = describe_onnx_head(graph_file(tmp_path, [[1, 84, 84]], name="u.onnx"), 64)
    assert (official["head"], official["num_classes"], official["input_size"]) == ("ultralytics", 80, 64)
    rknn = describe_onnx_head(graph_file(tmp_path, rknn_head(3), name="r.onnx"), 64)
    assert (rknn["head"], rknn["num_classes"], rknn["reg_max"], rknn["input_name"]) == ("rknn", 3, 16, "images")


def test_a_classifier_is_named_for_what_it_is(tmp_path):
    # Before: "set export=ultralytics", then a ValueError traceback once that was set.
    with pytest.raises(DataError) as err:
        describe_onnx_head(graph_file(tmp_path, [[1, 10]]), 64)
    message = str(err.value)
    assert "is not a YOLOv8 detector" in message and "[1, 10]" in message and "[1, 4+nc, 84]" in message
    assert "export=" not in message and "\n" not in message


def test_nine_outputs_of_the_wrong_shapes(tmp_path):
    # Before: adopted, then "cannot reshape" while decoding.
    wrong = rknn_head(3, size=128)   # grids 16/8/4 where a 64 px input has 8/4/2
    with pytest.raises(DataError, match=r"H = W = 8, 4, 2 \(rknn head\)"):
        describe_onnx_head(graph_file(tmp_path, wrong), 64)


def test_input_size_and_head_mismatches_name_the_setting(tmp_path):
    with pytest.raises(UnsupportedCombination, match="takes 64 px input: set resolution=64"):
        describe_onnx_head(graph_file(tmp_path, [[1, 84, 84]]), 320)
    with pytest.raises(UnsupportedCombination, match="set export=rknn"):
        adopt_yolov8_onnx(graph_file(tmp_path, rknn_head(3)), tmp_path / "out.onnx", 64, "ultralytics")
    with pytest.raises(DataError, match="dynamic input size"):
        describe_onnx_head(graph_file(tmp_path, [[1, 84, 84]], size="s"), 64)
    (tmp_path / "junk.onnx").write_bytes(b"not a protobuf")
    with pytest.raises(DataError, match="not a readable ONNX file"):
        describe_onnx_head(tmp_path / "junk.onnx", 64)


def test_does_not_import_torch(tmp_path):
    path = graph_file(tmp_path, rknn_head(3))
    code = ("import sys\nfrom rkbench.stages.export import describe_onnx_head\n"
            f"print(describe_onnx_head({str(path)!r}, 64)['head'], 'torch' in sys.modules)")
    env = dict(os.environ, PYTHONPATH=str(Path(rkbench.__file__).resolve().parents[1]))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.stdout.split() == ["rknn", "False"], out.stderr[-2000:]
