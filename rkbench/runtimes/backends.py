"""One Runtime interface over the engines a model runs on: ONNX Runtime, RKNNLite (the board's NPU) and a
null runtime that returns zeros, so a measurement of it is the harness's own overhead (MLPerf style).

This file is pushed to Rockchip boards beside the on-device runner: numpy is its only import at load
time, the engines are imported inside the classes that need them, and the syntax stays Python 3.8
(Debian 11 boards). On the host its errors join rkbench's hierarchy; on a board they are RuntimeErrors.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from typing import List, Optional, Sequence, Tuple

import numpy as np

try:  # host: a backend failure is an RkbenchError (the pipeline logs it as data); board: stands alone
    from rkbench.errors import RkbenchError as _ErrorBase
except ImportError:
    _ErrorBase = RuntimeError  # type: ignore[misc,assignment]


class BackendError(_ErrorBase):  # type: ignore[valid-type,misc]
    """A runtime could not load or run a model; the message names the fix in one line."""


CORE_MASKS = ("auto", "0", "1", "2", "0_1", "0_1_2", "all")
# core mask string -> name of the RKNNLite class constant it selects (rknn-toolkit-lite2 init_runtime)
RKNNLITE_CORE_MASKS = {
    "auto": "NPU_CORE_AUTO",
    "0": "NPU_CORE_0",
    "1": "NPU_CORE_1",
    "2": "NPU_CORE_2",
    "0_1": "NPU_CORE_0_1",
    "0_1_2": "NPU_CORE_0_1_2",
    "all": "NPU_CORE_ALL",
}


def check_core_mask(core_mask: str) -> str:
    if core_mask not in CORE_MASKS:
        raise BackendError(f"core mask {core_mask!r} unknown: use one of {', '.join(CORE_MASKS)}")
    return core_mask


def _check_model_file(model_path: str) -> None:
    if not os.path.isfile(model_path):
        raise BackendError(f"model file {model_path} not found: push or export the model first")


def _check_batch(batch: np.ndarray) -> None:
    if batch.ndim != 4 or batch.shape[-1] not in (1, 3) or batch.dtype != np.uint8:   # 1: a gray model
        raise BackendError(f"runtime input must be N x H x W x 3 uint8 RGB (x 1 gray), got {batch.dtype} {tuple(batch.shape)}: "
                           "pass letterboxed frames stacked with np.stack")


class Runtime(ABC):
    """Runs one model. `infer` takes letterboxed uint8 RGB frames and returns float32 outputs."""

    name: str = ""      # "onnxruntime" | "rknnlite" | "null" | "rknn-simulator"
    where: str = "host"  # "host" | "board" | "emulator" | "simulator"

    @abstractmethod
    def infer(self, batch: np.ndarray) -> List[np.ndarray]:
        """batch: N x H x W x 3 uint8 RGB. Normalisation and layout are the runtime's business."""

    @abstractmethod
    def version(self) -> str:
        """Engine name and version, one line."""

    def close(self) -> None:
        """Release the engine; the default has nothing to release."""

    def __enter__(self) -> "Runtime":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class OnnxRuntimeRuntime(Runtime):
    """ONNX Runtime on the CPU: the float reference on the host, the stand-in engine on the emulated board."""

    name = "onnxruntime"

    def __init__(self, model_path: str, mean: Sequence[float] = (0, 0, 0), std: Sequence[float] = (255, 255, 255),
                 threads: int = 0, where: str = "host"):
        try:
            import onnxruntime
        except ImportError:
            raise BackendError("onnxruntime is not installed: pip install onnxruntime (or use runtime rknnlite on a board)") from None
        _check_model_file(model_path)
        opts = onnxruntime.SessionOptions()
        opts.intra_op_num_threads = int(threads)   # 0 = ONNX Runtime's default (one per core)
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 3
        try:
            self._session = onnxruntime.InferenceSession(model_path, sess_options=opts,
                                                         providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own untyped errors for bad graphs
            raise BackendError(f"onnxruntime could not load {model_path}: {exc}; re-export the ONNX model") from exc
        inputs = self._session.get_inputs()
        if len(inputs) != 1:
            raise BackendError(f"{model_path} has {len(inputs)} inputs: export a detector with one image input")
        self._input = inputs[0].name
        self._dtype = np.float16 if inputs[0].type == "tensor(float16)" else np.float32
        self._mean = np.asarray(mean, dtype=np.float32).reshape(1, 1, 1, -1)   # one per input channel
        self._std = np.asarray(std, dtype=np.float32).reshape(1, 1, 1, -1)
        self._version = onnxruntime.__version__
        self.where = where

    def infer(self, batch: np.ndarray) -> List[np.ndarray]:
        _check_batch(batch)
        if batch.shape[-1] != self._mean.shape[-1]:
            raise BackendError(f"{batch.shape[-1]}-channel frames for mean/std of {self._mean.shape[-1]} channels: give "
                               "one mean and std value per model input channel")
        x = (batch.astype(np.float32) - self._mean) / self._std
        x = np.ascontiguousarray(x.transpose(0, 3, 1, 2), dtype=self._dtype)
        try:
            outputs = self._session.run(None, {self._input: x})
        except Exception as exc:  # shape/type mismatches come back as onnxruntime's own exception types
            raise BackendError(f"onnxruntime could not run input {x.shape}: {exc}; batch and size must match "
                               "the model's input") from exc
        return [np.asarray(o, dtype=np.float32) for o in outputs]

    def version(self) -> str:
        return f"onnxruntime {self._version}"

    def close(self) -> None:
        self._session = None


def rknnlite_core_mask(rknnlite_class: object, core_mask: str) -> int:
    """The RKNNLite constant for a core mask string."""
    return int(getattr(rknnlite_class, RKNNLITE_CORE_MASKS[check_core_mask(core_mask)]))


def dist_version(name: str) -> Optional[str]:
    """Installed version of a distribution, None when absent (never imports the package)."""
    try:
        from importlib.metadata import PackageNotFoundError, version
    except ImportError:  # Python < 3.8
        return None
    try:
        return version(name)
    except PackageNotFoundError:
        return None


class RknnLiteRuntime(Runtime):
    """rknn-toolkit-lite2 on the board: the .rknn has mean/std folded in and takes uint8 NHWC as is."""

    name = "rknnlite"

    def __init__(self, model_path: str, core_mask: str = "auto", where: str = "board"):
        try:
            from rknnlite.api import RKNNLite
        except ImportError:
            raise BackendError("rknnlite is not installed: pip install the rknn_toolkit_lite2 wheel for this Python "
                               "(rknn-toolkit2/rknn-toolkit-lite2/packages), or use runtime onnxruntime") from None
        mask = rknnlite_core_mask(RKNNLite, core_mask)
        _check_model_file(model_path)
        rknn = RKNNLite(verbose=False)
        ret = rknn.load_rknn(model_path)
        if ret != 0:
            rknn.release()
            raise BackendError(f"RKNNLite.load_rknn({model_path}) returned {ret}: re-convert the model with the "
                               "rknn-toolkit2 version that matches this board's rknn-toolkit-lite2")
        ret = rknn.init_runtime(core_mask=mask)
        if ret != 0:
            rknn.release()
            raise BackendError(f"RKNNLite.init_runtime(core_mask={core_mask}) returned {ret}: check the model's "
                               "target_platform is this SoC, librknnrt.so matches the toolkit version, and the core "
                               "mask exists here (use core_mask=auto)")
        self._rknn = rknn
        self.core_mask = core_mask
        self.where = where

    def infer(self, batch: np.ndarray) -> List[np.ndarray]:
        _check_batch(batch)
        outputs = self._rknn.inference(inputs=[np.ascontiguousarray(batch)], data_format=["nhwc"])
        if outputs is None:
            raise BackendError("RKNNLite.inference returned None: the input shape must match the model "
                               "(batch = rknn_batch_size, size = the converted resolution); see the librknnrt log")
        return [np.asarray(o, dtype=np.float32) for o in outputs]

    def version(self) -> str:
        parts = [f"rknn-toolkit-lite2 {dist_version('rknn-toolkit-lite2') or 'unknown'}"]
        try:  # "API: x.y.z (...)" and "DRV: x.y.z" lines between separator rules
            sdk = self._rknn.get_sdk_version()
        except Exception:  # noqa: BLE001 - an old librknnrt may not answer; the version is informational
            sdk = None
        if sdk:
            parts += [line.strip() for line in str(sdk).splitlines() if ":" in line and "VERSION" not in line]
        return "; ".join(parts)

    def close(self) -> None:
        if self._rknn is not None:
            self._rknn.release()
            self._rknn = None


def onnx_output_shapes(model_path: str) -> List[Tuple[int, ...]]:
    """Output shapes of an ONNX graph; symbolic dimensions read as 1."""
    _check_model_file(model_path)
    try:
        import onnx
    except ImportError:
        onnx = None
    if onnx is not None:
        graph = onnx.load(model_path, load_external_data=False).graph
        return [tuple(d.dim_value if d.HasField("dim_value") else 1 for d in o.type.tensor_type.shape.dim)
                for o in graph.output]
    try:
        import onnxruntime
    except ImportError:
        raise BackendError(f"cannot read the output shapes of {model_path} without onnx or onnxruntime: "
                           "pass output shapes to the null runtime") from None
    session = onnxruntime.InferenceSession(model_path, providers=["CPUExecutionProvider"])
    return [tuple(d if isinstance(d, int) else 1 for d in o.shape) for o in session.get_outputs()]


class NullRuntime(Runtime):
    """Zeros of the model's output shapes: timing it measures everything around the engine."""

    name = "null"

    def __init__(self, model_path: Optional[str] = None, output_shapes: Optional[Sequence[Sequence[int]]] = None,
                 where: str = "host"):
        if output_shapes is None:
            if not model_path or not model_path.endswith(".onnx"):
                raise BackendError("the null runtime needs output shapes: pass output_shapes or an .onnx model")
            output_shapes = onnx_output_shapes(model_path)
        if not output_shapes:
            raise BackendError("the null runtime got no output shapes: pass at least one, e.g. 1x64x80x80")
        self.output_shapes = [tuple(int(d) for d in s) for s in output_shapes]
        self.where = where

    def infer(self, batch: np.ndarray) -> List[np.ndarray]:
        _check_batch(batch)
        n = batch.shape[0]
        return [np.zeros((n,) + s[1:], dtype=np.float32) for s in self.output_shapes]

    def version(self) -> str:
        return f"null (numpy {np.__version__})"


RUNTIME_KINDS = ("onnxruntime", "rknnlite", "null")


def make_runtime(kind: str, model_path: str, *, mean: Sequence[float] = (0, 0, 0),
                 std: Sequence[float] = (255, 255, 255), core_mask: str = "auto", where: str = "host",
                 threads: int = 0, output_shapes: Optional[Sequence[Sequence[int]]] = None) -> Runtime:
    """A runtime by name. mean/std apply to ONNX Runtime only (a .rknn has them folded in); core_mask to
    RKNNLite only; threads = ONNX Runtime intra-op threads (0 = its default); output_shapes to null only."""
    check_core_mask(core_mask)
    if kind == "onnxruntime":
        return OnnxRuntimeRuntime(model_path, mean, std, threads, where)
    if kind == "rknnlite":
        return RknnLiteRuntime(model_path, core_mask, where)
    if kind == "null":
        return NullRuntime(model_path, output_shapes, where)
    raise BackendError(f"runtime {kind!r} unknown: use one of {', '.join(RUNTIME_KINDS)}")
