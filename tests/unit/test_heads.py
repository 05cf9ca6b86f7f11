"""Head exports: the rknn head must give the official head's float detections; YOLOv5 cut + anchors."""

from __future__ import annotations

import logging
import os
import sys
import types
from collections import Counter

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn as nn

from rkbench.config import resolve_path
from rkbench.errors import ConfigError, DataError
from rkbench.models import heads, prepost
from tests.fixtures.yolov5 import export_tiny_yolov5

DEMO = str(resolve_path("builtin:demo_yolov8n.pt"))

# A YOLOv8-shaped network small enough to export in well under a second (C2f included: the exporter
# swaps its forward).
TINY_YAML = """\
nc: 3
backbone:
  - [-1, 1, Conv, [8, 3, 2]]
  - [-1, 1, Conv, [8, 3, 2]]
  - [-1, 1, C2f, [8, True]]
  - [-1, 1, Conv, [16, 3, 2]]
  - [-1, 1, Conv, [16, 3, 2]]
  - [-1, 1, Conv, [16, 3, 2]]
head:
  - [[3, 4, 5], 1, Detect, [nc]]
"""


def _run(path, img):
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = img.transpose(2, 0, 1)[None].astype(np.float32) / 255.0
    return sess.run(None, {sess.get_inputs()[0].name: x})


def _letterboxed(size: int, seed: int) -> np.ndarray:
    """A random non-square picture, letterboxed as every runtime feeds it."""
    img = np.random.default_rng(seed).integers(0, 255, (size * 3 // 4, size + 17, 3), dtype=np.uint8)
    return prepost.letterbox(img, size)[0]


def _ops(path) -> Counter:
    return Counter(n.op_type for n in onnx.load(str(path)).graph.node)


@pytest.fixture(scope="module")
def tiny_yaml(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("yaml") / "tiny.yaml"
    path.write_text(TINY_YAML)
    return str(path)


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
    assert info["output_shapes"] == shapes
    assert [o.name for o in model.graph.output] == info["output_names"] == [
        "box8", "cls8", "sum8", "box16", "cls16", "sum16", "box32", "cls32", "sum32"]
    assert info["names"] == ["circle", "square", "triangle", "cross"] and info["num_classes"] == 4
    assert info["strides"] == [8, 16, 32] and info["reg_max"] == 16 and info["input_name"] == "images"
    ops = _ops(tmp / "r.onnx")
    assert ops["ReduceSum"] == 3 and ops["Clip"] == 3 and "Softmax" not in ops  # DFL stays on the CPU


def test_rknn_head_gives_the_official_detections(exported):
    tmp, info, info_u = exported
    assert info_u["output_shapes"] == [[1, 8, 12 * 12 + 6 * 6 + 3 * 3]]
    img = _letterboxed(96, 1)
    outs = _run(tmp / "r.onnx", img)
    br, sr = prepost.decode_rknn_head(outs, info["num_classes"])
    bu, su = prepost.decode_ultralytics_head(_run(tmp / "u.onnx", img)[0])
    np.testing.assert_allclose(br, bu, atol=1e-3)
    np.testing.assert_allclose(sr, su, atol=1e-5)
    # the score-sum output really is the clipped class-score sum
    np.testing.assert_allclose(outs[2], np.clip(outs[1].sum(1, keepdims=True), 0, 1), atol=1e-5)
    # and the detections after select agree too, skipping cells by score sum or not
    conf = float(np.sort(su.max(1))[-5])  # a threshold that a handful of candidates pass
    dets_u = prepost.select(bu, su, conf, 0.7)
    for dets_r in (prepost.select(br, sr, conf, 0.7),
                   prepost.select(*prepost.decode_rknn_head(outs, 4, min_score=conf), conf, 0.7)):
        assert len(dets_r[0]) == len(dets_u[0]) > 0
        for a, b in zip(dets_r, dets_u):
            np.testing.assert_allclose(a, b, atol=1e-3)


def test_official_head_is_the_ultralytics_exporter_graph(exported):
    """The ops Ultralytics' own exporter writes for yolov8 (format=onnx, opset 12, simplify=False), as
    checked against Exporter 8.4: Split for C2f, Conv+BN fused, DFL Softmax + decode in the graph."""
    tmp, _, _ = exported
    ops = _ops(tmp / "u.onnx")
    assert "BatchNormalization" not in ops and ops["Split"] == 8 and ops["Softmax"] == 1 and ops["Conv"] == 64


def test_tiny_yaml_heads_agree_and_export_deterministically(tiny_yaml, tmp_path):
    info_r = heads.export_yolov8_onnx(tiny_yaml, tmp_path / "r.onnx", 64, "rknn")
    info_u = heads.export_yolov8_onnx(tiny_yaml, tmp_path / "u.onnx", 64, "ultralytics")
    assert info_r["names"] == ["0", "1", "2"] and info_u["output_shapes"] == [[1, 7, 84]]
    img = _letterboxed(64, 3)
    br, sr = prepost.decode_rknn_head(_run(tmp_path / "r.onnx", img), 3)
    bu, su = prepost.decode_ultralytics_head(_run(tmp_path / "u.onnx", img)[0])
    np.testing.assert_allclose(br, bu, atol=1e-3)
    np.testing.assert_allclose(sr, su, atol=1e-5)
    # random initial weights, yet the same bytes every time, whatever the caller's RNG state: the
    # content hash is a cache key; and the caller's RNG is left alone
    for head in ("rknn", "ultralytics"):
        torch.rand(7)
        state = torch.random.get_rng_state()
        heads.export_yolov8_onnx(tiny_yaml, tmp_path / "again.onnx", 64, head)
        assert torch.equal(torch.random.get_rng_state(), state)
        first = "r.onnx" if head == "rknn" else "u.onnx"
        assert (tmp_path / "again.onnx").read_bytes() == (tmp_path / first).read_bytes()


def test_demo_export_is_deterministic(exported, tmp_path):
    tmp, _, _ = exported
    heads.export_yolov8_onnx(DEMO, tmp_path / "again.onnx", 96, "rknn")
    assert (tmp_path / "again.onnx").read_bytes() == (tmp / "r.onnx").read_bytes()


def test_relu_swap_changes_the_graph(tiny_yaml, tmp_path):
    silu = heads.export_yolov8_onnx(tiny_yaml, tmp_path / "silu.onnx", 64, "rknn")
    relu = heads.export_yolov8_onnx(tiny_yaml, tmp_path / "relu.onnx", 64, "rknn", activation="relu")
    before, after = _ops(tmp_path / "silu.onnx"), _ops(tmp_path / "relu.onnx")
    # SiLU exports as Sigmoid * x; after the swap only the 3 class-score sigmoids are left
    assert before["Relu"] == 0 and before["Sigmoid"] == 3 + before["Mul"]
    assert after["Relu"] == relu["activations_swapped"] == before["Mul"] > 0
    assert after["Sigmoid"] == 3 and after["Mul"] == 0
    assert silu["activations_swapped"] == 0 and "note" not in silu and "trained with relu" in relu["note"]


def test_bad_sources_raise_data_error(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"nope")
    with pytest.raises(DataError, match="not a readable PyTorch checkpoint"):
        heads.export_yolov8_onnx(str(bad), tmp_path / "x.onnx", 64, "rknn")
    # a missing official name must fail here, not be downloaded by Ultralytics
    with pytest.raises(DataError, match="not found"):
        heads.export_yolov8_onnx(str(tmp_path / "yolov8n.pt"), tmp_path / "x.onnx", 64, "rknn")
    with pytest.raises(DataError, match="yaml"):
        heads.export_yolov8_onnx(str(tmp_path / "nothing.yaml"), tmp_path / "x.onnx", 64, "rknn")
    torch.save({"epoch": 3}, tmp_path / "empty.pt")
    with pytest.raises(DataError, match="no model"):
        heads.export_yolov8_onnx(str(tmp_path / "empty.pt"), tmp_path / "x.onnx", 64, "rknn")
    with pytest.raises(ConfigError, match="head"):
        heads.export_yolov8_onnx(DEMO, tmp_path / "x.onnx", 64, "nms")


# ----------------------------------------------------------------------------------------------- YOLOv5

def test_yolov5_cut_and_decode_match_the_full_graph(tmp_path):
    full = export_tiny_yolov5(tmp_path / "v5.onnx")
    model = onnx.load(str(full))
    onnx.helper.set_model_props(model, {"stride": "32", "names": "{0: 'cat', 1: 'dog'}"})  # as yolov5 export.py
    onnx.save(model, str(full))
    info = heads.cut_yolov5_onnx(full, tmp_path / "cut.onnx")
    assert info["num_classes"] == 2 and info["imgsz"] == 64 and info["names"] == ["cat", "dog"]
    assert info["output_shapes"] == [[1, 21, 8, 8], [1, 21, 4, 4], [1, 21, 2, 2]] and info["anchors_per_scale"] == 3
    anchors = heads.yolov5_anchors(full, None)
    np.testing.assert_allclose(anchors, heads.COCO_ANCHORS * 0.5)   # read back from the graph's constants
    img = _letterboxed(64, 2)
    boxes, scores = prepost.decode_yolov5(_run(tmp_path / "cut.onnx", img), anchors, 2, 64)
    ref = _run(full, img)[0][0]                                  # [N, 5+nc] xywh, obj, cls
    ref_boxes = np.concatenate([ref[:, :2] - ref[:, 2:4] / 2, ref[:, :2] + ref[:, 2:4] / 2], 1)
    np.testing.assert_allclose(boxes, ref_boxes, atol=1e-3)
    np.testing.assert_allclose(scores, ref[:, 5:] * ref[:, 4:5], atol=1e-5)
    # naming the tensors gives the same cut
    heads.cut_yolov5_onnx(full, tmp_path / "named.onnx", info["output_names"])
    assert [o.name for o in onnx.load(str(tmp_path / "named.onnx")).graph.output] == info["output_names"]


def test_yolov5_anchor_fallbacks_and_errors(tmp_path, caplog):
    full = export_tiny_yolov5(tmp_path / "v5.onnx")
    heads.cut_yolov5_onnx(full, tmp_path / "cut.onnx")
    with caplog.at_level(logging.WARNING, logger="rkbench.models.heads"):
        np.testing.assert_array_equal(heads.yolov5_anchors(tmp_path / "cut.onnx", None), heads.COCO_ANCHORS)
    assert "COCO anchors" in caplog.text      # the cut graph has no anchor_grid left
    assert np.allclose(heads.yolov5_anchors(full, None, default=[[1] * 6] * 3), 1)  # config wins
    with pytest.raises(DataError, match="head_outputs"):
        heads.cut_yolov5_onnx(full, tmp_path / "x.onnx", ["no_such_tensor", "b", "c"])
    (tmp_path / "broken.onnx").write_bytes(b"\x00garbage")
    with pytest.raises(DataError, match="re-export"):
        heads.cut_yolov5_onnx(tmp_path / "broken.onnx", tmp_path / "x.onnx")
    with pytest.raises(DataError, match="not found"):
        heads.yolov5_anchors(tmp_path / "missing.onnx", None)
    # a YOLOv8 graph has no YOLOv5 head to find
    heads.export_yolov8_onnx(DEMO, tmp_path / "v8.onnx", 64, "ultralytics")
    with pytest.raises(DataError, match="head_outputs"):
        heads.cut_yolov5_onnx(tmp_path / "v8.onnx", tmp_path / "x.onnx")


def _yolov5_repo_modules() -> dict[str, types.ModuleType]:
    """Classes named and nested like the yolov5 repo's (models.yolo.Model / Detect, models.common.Conv)."""
    common, yolo = types.ModuleType("models.common"), types.ModuleType("models.yolo")

    class Conv(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.act = nn.Conv2d(3, 8, 3), nn.SiLU()

    class Detect(nn.Module):
        def __init__(self, anchors_px: np.ndarray):
            super().__init__()
            self.stride = torch.tensor([8.0, 16.0, 32.0])  # plain attribute, as in yolov5
            self.register_buffer("anchors", torch.tensor(anchors_px).float() / self.stride.view(-1, 1, 1))
            self.m = nn.ModuleList(nn.Conv2d(8, 21, 1) for _ in range(3))

    class Model(nn.Module):
        def __init__(self, anchors_px: np.ndarray):
            super().__init__()
            self.model = nn.Sequential(Conv(), Detect(anchors_px))

    for cls, mod in ((Conv, common), (Detect, yolo), (Model, yolo)):
        cls.__module__, cls.__qualname__ = mod.__name__, cls.__name__
        setattr(mod, cls.__name__, cls)
    return {"models": types.ModuleType("models"), "models.common": common, "models.yolo": yolo}


def test_yolov5_anchors_from_a_checkpoint_without_the_repo(tmp_path, monkeypatch):
    anchors_px = heads.COCO_ANCHORS * np.array([1.0, 1.5], np.float32)  # autoanchor-like, not the defaults
    with monkeypatch.context() as patch:
        modules = _yolov5_repo_modules()
        for name, module in modules.items():
            patch.setitem(sys.modules, name, module)
        model = modules["models.yolo"].Model(anchors_px).half()
        torch.save({"epoch": -1, "model": model, "ema": None, "opt": {"imgsz": 640}}, tmp_path / "best.pt")
    assert "models.yolo" not in sys.modules  # the repo's classes are gone when reading it back
    np.testing.assert_allclose(heads.yolov5_anchors(None, tmp_path / "best.pt"), anchors_px, rtol=1e-3)


class _Evil:
    def __reduce__(self):
        return os.system, ("touch pwned",)


def test_yolov5_checkpoint_reader_runs_no_pickled_code(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch.save({"model": _Evil()}, tmp_path / "evil.pt")
    with pytest.raises(DataError, match="model.anchors"):
        heads.yolov5_anchors(None, tmp_path / "evil.pt")
    assert not (tmp_path / "pwned").exists()
    with pytest.raises(DataError, match="not found"):
        heads.yolov5_anchors(None, tmp_path / "missing.pt")


def test_grayscale_model_is_exact_for_gray_images():
    """channels=1: the first conv's weights summed over RGB give, on a gray image, what the RGB model gives on that
    image replicated to 3 channels; a graph whose image is not read by a plain Conv is refused."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from rkbench.models.heads import to_grayscale

    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.normal(size=(4, 3, 3, 3)).astype(np.float32), "w")
    conv = helper.make_node("Conv", ["images", "w"], ["c"], pads=[1, 1, 1, 1])
    act = helper.make_node("Sigmoid", ["c"], ["out"])
    graph = helper.make_graph([conv, act], "g", [helper.make_tensor_value_info("images", TensorProto.FLOAT, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 4, 8, 8])], [w])
    rgb = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 12)])
    gray = to_grayscale(rgb)
    assert [d.dim_value for d in gray.graph.input[0].type.tensor_type.shape.dim] == [1, 1, 8, 8]
    x = rng.random((1, 1, 8, 8), dtype=np.float32)
    run = lambda m, v: ort.InferenceSession(m.SerializeToString()).run(None, {"images": v})[0]   # noqa: E731
    np.testing.assert_allclose(run(gray, x), run(rgb, np.repeat(x, 3, axis=1)), atol=1e-5)
    assert [d.dim_value for d in rgb.graph.input[0].type.tensor_type.shape.dim][1] == 3   # the source is untouched
    graph.node[0].op_type = "ConvTranspose"
    with pytest.raises(ValueError, match="not a plain Conv"):
        to_grayscale(helper.make_model(graph))
