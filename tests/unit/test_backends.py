"""Runtimes: ONNX Runtime normalisation and layout, the null runtime's shapes, RKNNLite core masks and
return-code checks (against a stand-in rknnlite module: the real one exists only on aarch64 boards)."""

from __future__ import annotations

import ast
import sys
import types
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import pytest
from onnx import TensorProto, helper, numpy_helper

from rkbench.runtimes import backends
from rkbench.runtimes.backends import (CORE_MASKS, BackendError, NullRuntime, OnnxRuntimeRuntime, RknnLiteRuntime,
                                       make_runtime)

STRIDES = (8, 16, 32)


def make_rknn_head_model(path: Path, size: int = 64, num_classes: int = 3, reg_max: int = 16, seed: int = 0) -> Path:
    """A tiny detector with rknn_model_zoo's YOLOv8 output layout: per stride 8/16/32 a box distribution
    [1, 4*reg_max, H, W], sigmoid class scores [1, nc, H, W] and their clipped sum [1, 1, H, W]. Each cell
    sees the average colour of its patch, so different images give different detections."""
    rng = np.random.default_rng(seed)
    nodes, inits, outputs = [], [], []
    for s in STRIDES:
        h = size // s
        pool, box, logit, cls, total = f"pool{s}", f"box{s}", f"logit{s}", f"cls{s}", f"sum{s}"
        nodes.append(helper.make_node("AveragePool", ["images"], [pool], kernel_shape=[s, s], strides=[s, s]))
        inits += [numpy_helper.from_array(rng.normal(0, 2.0, (4 * reg_max, 3, 1, 1)).astype(np.float32), f"wb{s}"),
                  numpy_helper.from_array(rng.normal(0, 1.0, (4 * reg_max,)).astype(np.float32), f"bb{s}"),
                  numpy_helper.from_array(rng.normal(0, 4.0, (num_classes, 3, 1, 1)).astype(np.float32), f"wc{s}"),
                  numpy_helper.from_array(rng.normal(-1.0, 1.0, (num_classes,)).astype(np.float32), f"bc{s}")]
        nodes += [helper.make_node("Conv", [pool, f"wb{s}", f"bb{s}"], [box]),
                  helper.make_node("Conv", [pool, f"wc{s}", f"bc{s}"], [logit]),
                  helper.make_node("Sigmoid", [logit], [cls]),
                  helper.make_node("ReduceSum", [cls, "axis1"], [f"raw{s}"], keepdims=1),
                  helper.make_node("Clip", [f"raw{s}", "zero", "one"], [total])]
        outputs += [helper.make_tensor_value_info(box, TensorProto.FLOAT, ["n", 4 * reg_max, h, h]),
                    helper.make_tensor_value_info(cls, TensorProto.FLOAT, ["n", num_classes, h, h]),
                    helper.make_tensor_value_info(total, TensorProto.FLOAT, ["n", 1, h, h])]
    inits += [numpy_helper.from_array(np.array([1], np.int64), "axis1"),
              numpy_helper.from_array(np.array(0, np.float32), "zero"),
              numpy_helper.from_array(np.array(1, np.float32), "one")]
    graph = helper.make_graph(nodes, "rknn_head", [helper.make_tensor_value_info("images", TensorProto.FLOAT,
                                                                                  ["n", 3, size, size])],
                              outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def make_identity_model(path: Path, height: int, width: int) -> Path:
    """Output = input: shows exactly what the runtime fed the graph."""
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "identity",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, height, width])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 3, height, width])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def frames(n: int, h: int, w: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, h, w, 3), dtype=np.uint8)


def test_onnxruntime_normalises_and_transposes(tmp_path):
    model = make_identity_model(tmp_path / "id.onnx", 4, 6)   # not square: a wrong transpose shows
    batch = frames(2, 4, 6)
    mean, std = (10.0, 20.0, 30.0), (50.0, 60.0, 70.0)
    with OnnxRuntimeRuntime(str(model), mean, std, threads=1) as rt:
        (out,) = rt.infer(batch)
    expected = ((batch.astype(np.float32) - np.array(mean, np.float32)) / np.array(std, np.float32)).transpose(0, 3, 1, 2)
    assert out.dtype == np.float32 and out.shape == (2, 3, 4, 6)
    np.testing.assert_allclose(out, expected, rtol=1e-6)
    assert out[1, 2, 3, 5] == pytest.approx((batch[1, 3, 5, 2] - 30.0) / 70.0)   # channel 2 = blue of pixel (3, 5)


def test_onnxruntime_matches_a_direct_session(tmp_path):
    model = make_rknn_head_model(tmp_path / "head.onnx")
    batch = frames(2, 64, 64)
    rt = make_runtime("onnxruntime", str(model), where="emulator", threads=1)
    assert (rt.name, rt.where) == ("onnxruntime", "emulator") and rt.version().startswith("onnxruntime ")
    got = rt.infer(batch)
    session = onnxruntime.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    want = session.run(None, {"images": np.ascontiguousarray((batch / 255.0).astype(np.float32).transpose(0, 3, 1, 2))})
    assert [g.shape for g in got] == [(2, 64, 8, 8), (2, 3, 8, 8), (2, 1, 8, 8), (2, 64, 4, 4), (2, 3, 4, 4),
                                      (2, 1, 4, 4), (2, 64, 2, 2), (2, 3, 2, 2), (2, 1, 2, 2)]
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)
    rt.close()


def test_onnxruntime_errors_name_the_fix(tmp_path):
    with pytest.raises(BackendError, match="not found"):
        OnnxRuntimeRuntime(str(tmp_path / "missing.onnx"))
    (tmp_path / "junk.onnx").write_bytes(b"not a graph")
    with pytest.raises(BackendError, match="re-export"):
        OnnxRuntimeRuntime(str(tmp_path / "junk.onnx"))
    rt = OnnxRuntimeRuntime(str(make_rknn_head_model(tmp_path / "head.onnx")))
    with pytest.raises(BackendError, match="uint8"):
        rt.infer(frames(1, 64, 64).astype(np.float32))
    with pytest.raises(BackendError, match="must match"):
        rt.infer(frames(1, 48, 64))


def test_null_runtime_shapes(tmp_path):
    model = make_rknn_head_model(tmp_path / "head.onnx", size=64, num_classes=5)
    null = make_runtime("null", str(model))
    outs = null.infer(frames(3, 64, 64))
    assert [o.shape for o in outs][:3] == [(3, 64, 8, 8), (3, 5, 8, 8), (3, 1, 8, 8)] and len(outs) == 9
    assert all(o.dtype == np.float32 and not o.any() for o in outs)
    given = NullRuntime("model.rknn", output_shapes=[(1, 84, 2100)])
    assert [o.shape for o in given.infer(frames(2, 8, 8))] == [(2, 84, 2100)]
    with pytest.raises(BackendError, match="output shapes"):
        NullRuntime("model.rknn")


class FakeRKNNLite:
    """Stands in for rknnlite.api.RKNNLite (constants as in rknn-toolkit-lite2); records every call."""
    NPU_CORE_AUTO, NPU_CORE_0, NPU_CORE_1, NPU_CORE_2 = 0, 1, 2, 4
    NPU_CORE_0_1, NPU_CORE_0_1_2, NPU_CORE_ALL = 3, 7, 0xFFFF
    load_ret = 0
    init_ret = 0
    outputs: object = "echo"
    instances: list = []

    def __init__(self, verbose=False):
        self.calls = []
        type(self).instances.append(self)

    def load_rknn(self, path):
        self.calls.append(("load_rknn", path))
        return self.load_ret

    def init_runtime(self, core_mask=0):
        self.calls.append(("init_runtime", core_mask))
        return self.init_ret

    def inference(self, inputs, data_format=None):
        self.calls.append(("inference", inputs, data_format))
        if self.outputs == "echo":
            return [inputs[0].astype(np.int8)]
        return self.outputs

    def get_sdk_version(self):
        return "==========\nRKNN VERSION:\n  API: 2.3.0 (c949ad889d@2024-11-07T11:35:33)\n  DRV: 0.9.8\n=========="

    def release(self):
        self.calls.append(("release",))


@pytest.fixture
def fake_rknnlite(monkeypatch):
    api = types.ModuleType("rknnlite.api")
    api.RKNNLite = type("RKNNLite", (FakeRKNNLite,), {"instances": []})
    package = types.ModuleType("rknnlite")
    package.api = api
    monkeypatch.setitem(sys.modules, "rknnlite", package)
    monkeypatch.setitem(sys.modules, "rknnlite.api", api)
    return api.RKNNLite


def test_core_mask_table(fake_rknnlite, tmp_path):
    model = tmp_path / "m.rknn"
    model.write_bytes(b"RKNN")
    expected = {"auto": 0, "0": 1, "1": 2, "2": 4, "0_1": 3, "0_1_2": 7, "all": 0xFFFF}
    assert set(expected) == set(CORE_MASKS)
    for mask, constant in expected.items():
        rt = make_runtime("rknnlite", str(model), core_mask=mask, where="board")
        assert rt._rknn.calls[:2] == [("load_rknn", str(model)), ("init_runtime", constant)]
        assert (rt.name, rt.where, rt.core_mask) == ("rknnlite", "board", mask)
    with pytest.raises(BackendError, match="use one of auto"):
        make_runtime("rknnlite", str(model), core_mask="3")


def test_rknnlite_infers_nhwc_uint8_and_checks_return_codes(fake_rknnlite, tmp_path):
    model = tmp_path / "m.rknn"
    model.write_bytes(b"RKNN")
    rt = RknnLiteRuntime(str(model), "0_1_2")
    batch = frames(2, 8, 8)[:, :, ::-1]          # a non-contiguous view must reach the NPU contiguous
    (out,) = rt.infer(batch)
    _, inputs, data_format = rt._rknn.calls[-1]
    assert data_format == ["nhwc"] and inputs[0].flags["C_CONTIGUOUS"] and inputs[0].dtype == np.uint8
    assert out.dtype == np.float32 and out.shape == (2, 8, 8, 3)
    assert "rknn-toolkit-lite2" in rt.version() and "API: 2.3.0" in rt.version() and "DRV: 0.9.8" in rt.version()
    fake_rknnlite.outputs = None
    with pytest.raises(BackendError, match="input shape must match"):
        rt.infer(batch)
    rt.close()
    assert rt._rknn is None

    fake_rknnlite.load_ret = -1
    with pytest.raises(BackendError, match="re-convert"):
        RknnLiteRuntime(str(model))
    assert fake_rknnlite.instances[-1].calls[-1] == ("release",)
    fake_rknnlite.load_ret, fake_rknnlite.init_ret = 0, -1
    with pytest.raises(BackendError, match="target_platform"):
        RknnLiteRuntime(str(model), "2")
    assert fake_rknnlite.instances[-1].calls[-1] == ("release",)


def test_rknnlite_missing_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "rknnlite", None)    # import fails as on a host without the wheel
    monkeypatch.setitem(sys.modules, "rknnlite.api", None)
    with pytest.raises(BackendError, match="rknn_toolkit_lite2 wheel"):
        make_runtime("rknnlite", str(tmp_path / "m.rknn"))


def test_make_runtime_rejects_unknown_kind(tmp_path):
    with pytest.raises(BackendError, match="use one of onnxruntime, rknnlite, null"):
        make_runtime("tensorrt", str(tmp_path / "m.onnx"))


def test_backend_errors_join_the_rkbench_hierarchy_on_the_host():
    from rkbench.errors import RkbenchError
    assert issubclass(BackendError, RkbenchError)


def board_pushable_problems(path: Path) -> list[str]:
    """Python 3.8 grammar; at import time only the standard library and numpy, unless the import is
    guarded by `except ImportError` (rkbench on the host, the flat siblings on a board)."""
    source = path.read_text()
    ast.parse(source, feature_version=(3, 8))
    tree = ast.parse(source)
    problems = []
    stdlib = set(sys.stdlib_module_names) | {"numpy"}
    for node in tree.body:
        if isinstance(node, ast.Try) and any(isinstance(h.type, ast.Name) and h.type.id == "ImportError"
                                             for h in node.handlers):
            continue
        for sub in ast.walk(node) if isinstance(node, (ast.Import, ast.ImportFrom, ast.If, ast.Try)) else []:
            names = ([a.name for a in sub.names] if isinstance(sub, ast.Import)
                     else [sub.module or ""] if isinstance(sub, ast.ImportFrom) and sub.level == 0 else [])
            problems += [n for n in names if n.split(".")[0] not in stdlib]
    return problems


@pytest.mark.parametrize("module", ["rkbench/runtimes/backends.py", "rkbench/device/runner.py"])
def test_board_pushable(module):
    root = Path(backends.__file__).resolve().parents[2]
    assert board_pushable_problems(root / module) == []
