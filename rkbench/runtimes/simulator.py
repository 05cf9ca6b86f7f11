"""rknn-toolkit2's simulator as a Runtime: quantized accuracy on the host, never NPU latency.

The toolkit cannot load a .rknn file into its simulator: it runs the object that `build` made. So this
runtime takes the live object from the convert stage, or rebuilds it from the same ONNX and options."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Optional

import numpy as np

from rkbench.errors import StageError
from rkbench.runtimes.backends import Runtime
from rkbench.toolkit import ConvertOptions, build_rknn, captured_output, toolkit_version

log = logging.getLogger("rkbench.simulator")


class SimulatorRuntime(Runtime):
    name = "rknn-simulator"
    where = "simulator"

    def __init__(self, rknn: Any = None, *, onnx_path: Optional[Path] = None, opts: Optional[ConvertOptions] = None,
                 calib_list: Optional[Path] = None, log_path: Optional[Path] = None):
        if rknn is None:
            log.info("simulator: rebuilding from ONNX (rknn-toolkit2 cannot load a .rknn into its simulator)")
            rknn = build_rknn(onnx_path, opts, calib_list, log_path, "see convert.log in the run's artifacts")
        with captured_output(log_path or Path(os.devnull)):
            ret = rknn.init_runtime()  # no target: the simulator
        if ret != 0:
            rknn.release()
            raise StageError("evaluate", f"rknn simulator init_runtime returned {ret}", "check the toolkit log; the simulator needs the model built in this process")
        self._rknn = rknn
        self._log = log_path or Path(os.devnull)

    def infer(self, batch: np.ndarray) -> list[np.ndarray]:
        with captured_output(self._log):  # the simulator prints progress bars on its first calls
            outputs = self._rknn.inference(inputs=[np.ascontiguousarray(batch)], data_format="nhwc")
        if outputs is None:
            raise StageError("evaluate", "rknn simulator inference returned None", "see the toolkit log above")
        return [np.asarray(o, dtype=np.float32) for o in outputs]

    def version(self) -> str:
        return f"rknn-toolkit2 {toolkit_version()} simulator"

    def close(self) -> None:
        self._rknn.release()
