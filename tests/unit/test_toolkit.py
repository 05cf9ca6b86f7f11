"""rkbench.toolkit with the real rknn-toolkit2 on a one-convolution ONNX (builds in well under a second):
which failures are the model's (deterministic, cached by convert) and which the machine's (never cached)."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from rkbench.errors import StageError
from rkbench.stages.convert import write_calibration
from rkbench.toolkit import ConvertOptions, _attempt, build_rknn, export_rknn

FP16 = ConvertOptions("rk3588", False, "normal", "channel", "w8a8", 1)
INT8 = ConvertOptions("rk3588", True, "normal", "channel", "w8a8", 1)


@pytest.fixture
def conv_onnx(tmp_path) -> Path:
    weights = numpy_helper.from_array(np.random.RandomState(0).randn(8, 3, 3, 3).astype(np.float32), "w")
    graph = helper.make_graph([helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1])], "conv",
                              [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 3, 32, 32])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 8, 32, 32])], [weights])
    path = tmp_path / "conv.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 12)]), str(path))
    return path


def calibration(folder: Path) -> Path:
    folder.mkdir(parents=True)
    images = []
    for i in range(2):
        images.append(folder / f"source {i}.jpg")
        cv2.imwrite(str(images[-1]), np.random.RandomState(i).randint(0, 255, (40, 50, 3), np.uint8))
    return write_calibration(images, 32, folder / "letterboxed")


def test_int8_build_with_spaces_and_non_ascii_in_every_path(tmp_path, conv_onnx):
    work = tmp_path / "my runs é" / "build"
    listing = calibration(work / "calib")
    assert listing.read_text().split() == ["calib_0000.png", "calib_0001.png"]   # no folder, nothing to split
    rknn = build_rknn(conv_onnx, INT8, listing, work / "convert.log", "hint")
    try:
        export_rknn(rknn, work / "model.rknn", work / "convert.log", "hint")
    finally:
        rknn.release()
    assert (work / "model.rknn").stat().st_size > 0


def test_a_toolkit_rejection_is_deterministic(tmp_path, conv_onnx):
    with pytest.raises(StageError, match="Invalid target_platform 'rk9999'") as err:
        build_rknn(conv_onnx, ConvertOptions("rk9999", False, "normal", "channel", "w8a8", 1), None,
                   tmp_path / "convert.log", "pick a platform rknn-toolkit2 knows")
    assert err.value.deterministic and err.value.stage == "convert"
    assert err.value.hint == "pick a platform rknn-toolkit2 knows"


def test_a_missing_model_file_is_the_machine(tmp_path):
    with pytest.raises(StageError, match="not exists") as err:
        build_rknn(tmp_path / "gone.onnx", FP16, None, tmp_path / "convert.log", "hint")
    assert not err.value.deterministic and "run again" in err.value.hint


def test_a_missing_calibration_image_is_the_machine(tmp_path, conv_onnx):
    listing = calibration(tmp_path / "calib")
    (listing.parent / "calib_0001.png").unlink()
    with pytest.raises(StageError, match="calib_0001.png is invalid") as err:
        build_rknn(conv_onnx, INT8, listing, tmp_path / "convert.log", "hint")
    assert not err.value.deterministic


def test_an_unwritable_output_is_the_machine(tmp_path, conv_onnx):
    rknn = build_rknn(conv_onnx, FP16, None, tmp_path / "convert.log", "hint")
    with pytest.raises(StageError, match=r"export_rknn failed.*\[Errno") as err:
        export_rknn(rknn, tmp_path / "no such folder" / "model.rknn", tmp_path / "convert.log", "hint")
    assert not err.value.deterministic


def test_memory_and_os_errors_are_the_machine():
    def out_of_memory():
        raise MemoryError()

    def wrapped_by_the_toolkit():
        raise ValueError("Traceback (most recent call last):\n  File \"rknn/api/x.py\"\nMemoryError\n")

    assert _attempt(out_of_memory) == ("MemoryError: ", True)
    assert _attempt(wrapped_by_the_toolkit)[1]
    assert _attempt(lambda: 0) == ("", False) and _attempt(lambda: -1) == ("returned -1", False)
