"""Head exports: the rknn head must give the official head's float detections; YOLOv5 cut + anchors."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from rkbench.config import resolve_path
from rkbench.errors import DataError
from rkbench.models import heads, prepost
from tests.fixtures.yolov5 import export_tiny_yolov5

DEMO = str(resolve_path("builtin:demo_yolov8n.pt"))


def _run(path, img):
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = img.transpose(2, 0, 1)[None].astype(np.float32) / 255.0
    return sess.run(None, {sess.get_inputs()[0].name: x})


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("heads")
    info_r = heads.export_yolov8_onnx(DEMO, tmp / "r.onnx", 96, "rknn")
    info_u = heads.export_yolov8_onnx(DEMO, tmp / "u.onnx", 96, "ultralytics")
    return tmp, info_r, info_u


def test_rknn_head_layout(exported):
    tmp, info, _ = exported
    model = onnx.load(str(tmp / "r.onnx"))
    shapes = [[d.dim_value for d in o.type.tensor_type.shape.dim] for o in model.graph.output]
    assert shapes == [[1, 64, 12, 12], [1, 4, 12, 12], [1, 1, 12, 12], [1, 64, 6, 6], [1, 4, 6, 6], [1, 1, 6, 6],
                      [1, 64, 3, 3], [1, 4, 3, 3], [1, 1, 3, 3]]
    assert info["names"] == ["circle", "square", "triangle", "cross"] and info["num_classes"] == 4
    assert "ReduceSum" in {n.op_type for n in model.graph.node}


def test_rknn_head_gives_the_official_detections(exported):
    tmp, info, _ = exported
    rng = np.random.default_rng(1)
    img = rng.integers(0, 255, (96, 96, 3), dtype=np.uint8)
    br, sr = prepost.decode_rknn_head(_run(tmp / "r.onnx", img), info["num_classes"])
    bu, su = prepost.decode_ultralytics_head(_run(tmp / "u.onnx", img)[0])
    np.testing.assert_allclose(br, bu, atol=1e-3)
    np.testing.assert_allclose(sr, su, atol=1e-5)


def test_export_is_deterministic(exported, tmp_path):
    tmp, _, _ = exported
    heads.export_yolov8_onnx(DEMO, tmp_path / "again.onnx", 96, "rknn")
    assert (tmp_path / "again.onnx").read_bytes() == (tmp / "r.onnx").read_bytes()


def test_relu_swap_changes_the_graph(tmp_path):
    info = heads.export_yolov8_onnx(DEMO, tmp_path / "relu.onnx", 64, "rknn", activation="relu")
    ops = {n.op_type for n in onnx.load(str(tmp_path / "relu.onnx")).graph.node}
    assert "Relu" in ops and "Sigmoid" in ops and info["activations_swapped"] > 0 and "trained" in info["note"]


def test_corrupt_weights_raise_data_error(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"nope")
    with pytest.raises(DataError, match="YOLOv8"):
        heads.export_yolov8_onnx(str(bad), tmp_path / "x.onnx", 64, "rknn")


def test_yolov5_cut_and_decode_match_the_full_graph(tmp_path):
    full = export_tiny_yolov5(tmp_path / "v5.onnx")
    info = heads.cut_yolov5_onnx(full, tmp_path / "cut.onnx")
    assert info["num_classes"] == 2 and info["imgsz"] == 64 and len(info["output_names"]) == 3
    anchors = heads.yolov5_anchors(full, None)
    np.testing.assert_allclose(anchors, heads.COCO_ANCHORS * 0.5)   # read back from the graph's constants
    img = np.random.default_rng(2).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    boxes, scores = prepost.decode_yolov5(_run(tmp_path / "cut.onnx", img), anchors, 2, 64)
    ref = _run(full, img)[0][0]                                  # [N, 5+nc] xywh, obj, cls
    ref_boxes = np.concatenate([ref[:, :2] - ref[:, 2:4] / 2, ref[:, :2] + ref[:, 2:4] / 2], 1)
    np.testing.assert_allclose(boxes, ref_boxes, atol=1e-3)
    np.testing.assert_allclose(scores, ref[:, 5:] * ref[:, 4:5], atol=1e-5)
    assert heads.yolov5_anchors(None, None).shape == (3, 3, 2)
    assert np.allclose(heads.yolov5_anchors(full, None, default=[[1] * 6] * 3), 1)
