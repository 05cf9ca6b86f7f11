"""What one configuration is, stated once.

1. Where each axis applies (APPLIES): an axis that has no effect on the chosen target is collapsed to
   its default, and the run is tagged with what was collapsed and why. Two configurations that differ
   only in such axes are then one configuration: one measurement, not two runs with noise between them.
2. The inference spec (rkbench.models.detect.InferenceSpec) of a run: built from the effective config
   and the exported model's own facts (input size, class count), used by every detection path.
3. The run identity: a hash of the effective config's semantic settings, the content hashes of every
   input file (weights, ONNX, yaml, dataset images and ground truth, calibration images) and the tool
   versions that produce the numbers. Retrain into the same path, and the identity changes.

Nothing here imports torch, the toolkit or MLflow: a resumed sweep decides what to skip without them."""

from __future__ import annotations

import copy
import hashlib
import importlib.metadata as md
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

from rkbench.cache import sha256_file
from rkbench.config import RunConfig, check_cores, flatten, resolve_path
from rkbench.data.datasets import Dataset, calibration_images
from rkbench.models.detect import InferenceSpec

# Bump when a change in rkbench alters what a run measures (decode, evaluation, export graphs, ...):
# every earlier run then stops matching and is measured again.
MEASUREMENT_VERSION = 3

# Keys that say where results go, how long to wait or how the board is reached (adb or ssh, the ssh login),
# not what is measured.
NON_SEMANTIC = ("tracking.", "search.", "cache_dir", "resume", "study", "farm", "board.adb_host", "board.adb_port",
                "board.timeout_s", "board.reconnect_s", "board.transport", "board.ssh_")
# Keys the Ray launcher sets per job on a farm: boards of one SoC are interchangeable there, so the board
# that measured a run is its tag rkbench.board, and a resumed farm sweep reuses it whichever board is free.
FARM_ASSIGNED = ("board.address", "board.serial")
# Tool versions that shape the numbers of any run.
VERSIONED = ("onnx", "onnxruntime", "onnxslim", "torch", "ultralytics", "numpy", "pycocotools", "opencv-python")


def uses_rknn(run: RunConfig) -> bool:
    """The .rknn is what gets measured: the simulator, or a board running it with RKNNLite or the C++ runner."""
    return run.target == "simulator" or (run.target == "board" and (run.board.runtime == "rknnlite" or run.runner == "cpp"))


def quantizes(run: RunConfig) -> bool:
    return uses_rknn(run) and run.quantize


# axis keys -> (does it apply to this run?, why not). One table: the README's axis table says the same.
APPLIES: list[tuple[tuple[str, ...], Callable[[RunConfig], bool], str]] = [
    (("platform", "quantize", "batch"), uses_rknn,
     "only the .rknn uses it, and target={target}{runtime} runs the ONNX"),
    (("algo", "quant_method", "quant_dtype", "calib.size", "calib.source", "calib.seed"), quantizes,
     "only an int8 .rknn is calibrated (target={target}{runtime}, quantize={quantize})"),
    (("accuracy.analysis", "accuracy.images", "accuracy.top_k", "hybrid.layers"), quantizes,
     "per-layer quantization error and hybrid quantization need an int8 .rknn (target={target}{runtime}, "
     "quantize={quantize})"),
    (("core_mask",), lambda r: r.target == "board" and uses_rknn(r),
     "NPU cores are chosen only on a board running the .rknn (target={target}{runtime})"),
    (("eval.float_reference",), lambda r: r.target != "onnxruntime",
     "target=onnxruntime is the float reference itself"),
    (("measure.iterations", "measure.min_seconds", "measure.modes", "measure.workers", "measure.cores",
      "measure.frames", "measure.tile_frame", "measure.tile_overlap", "measure.tile_mode", "measure.tile_grid",
      "measure.tile_source", "board.serial", "board.address", "board.remote_root", "board.pin_freq", "runner"),
     lambda r: r.target == "board", "only the board runner uses it (target={target})"),
    # rknn-toolkit2 profiles the .rknn: a board running the ONNX converts nothing for it
    (("measure.toolkit_perf",), lambda r: r.target == "board" and uses_rknn(r),
     "only the .rknn is profiled, and target={target}{runtime} runs the ONNX"),
    (("measure.threads",), lambda r: r.target == "board" and r.runner == "python" and r.board.runtime == "onnxruntime",
     "only ONNX Runtime on a board uses it (target={target}{runtime})"),
    (("board.python", "board.runtime"), lambda r: r.target == "board" and r.runner == "python",
     "only the Python runner on a board uses it (target={target}, runner={runner})"),
    (("measure.cpp_outputs", "measure.cpp_zero_copy", "measure.cpp_pass_through"), lambda r: r.target == "board" and r.runner == "cpp",
     "only the C++ runner on a board uses it (target={target}, runner={runner})"),
]


def _get(obj: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def _set(obj: Any, dotted: str, value: Any) -> None:
    *path, last = dotted.split(".")
    for part in path:
        obj = getattr(obj, part)
    setattr(obj, last, value)


@dataclass(frozen=True)
class RunPlan:
    config: RunConfig              # effective: every axis without effect reset to its default
    collapsed: dict[str, str]      # axis -> "given value: why it has no effect"

    def tag(self) -> str:
        return "; ".join(f"{k}={v}" for k, v in sorted(self.collapsed.items()))


def plan(run: RunConfig) -> RunPlan:
    """The effective configuration of a validated RunConfig (the input is not modified). Combinations
    are checked only between axes that apply: batch=2 core_mask=0 is fine where the core mask has no effect."""
    default = RunConfig()
    effective = copy.deepcopy(run)
    collapsed: dict[str, str] = {}
    runtime = ("" if run.target != "board" else " runner=cpp" if run.runner == "cpp"
               else f" board.runtime={run.board.runtime}")
    for keys, applies, why in APPLIES:
        if applies(run):
            continue
        for key in keys:
            given, reset = _get(run, key), _get(default, key)
            if given != reset:
                reason = why.format(target=run.target, runtime=runtime, quantize=run.quantize, runner=run.runner)
                collapsed[key] = f"{given} ({reason})"
                _set(effective, key, copy.deepcopy(reset))
    check_cores(effective)
    return RunPlan(effective, collapsed)


# ------------------------------------------------------------------------------------------ identity

def _versions(run: RunConfig) -> dict[str, str]:
    names = VERSIONED + (("rknn-toolkit2",) if uses_rknn(run) or run.measure.toolkit_perf else ())
    out = {}
    for name in names:
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = "-"
    return out


def calibration_set(run: RunConfig, dataset: Dataset) -> list[Path]:
    source = dataset if run.calib.source == "dataset" else resolve_path(run.calib.source)
    return calibration_images(source, run.calib.size, run.calib.seed)


def files_hash(paths: list[Path]) -> str:
    """One hash over the contents of several files, in order."""
    return hashlib.sha256("".join(sha256_file(p) for p in paths).encode()).hexdigest()


def input_hashes(run: RunConfig, dataset: Dataset) -> dict[str, str]:
    """Content hashes of every file the run reads."""
    m = run.model
    out = {}
    for key in ("weights", "onnx"):
        value = getattr(m, key)
        if value:
            out[f"model.{key}"] = sha256_file(resolve_path(value))
    if m.yaml:
        path = resolve_path(m.yaml)
        out["model.yaml"] = sha256_file(path) if path.is_file() else m.yaml   # an Ultralytics built-in name
    out["dataset"] = dataset.fingerprint()
    if quantizes(run):
        out["calib"] = files_hash(calibration_set(run, dataset))
    return out


@dataclass(frozen=True)
class Identity:
    key: str                      # 20 hex chars, the tag rkbench.identity
    inputs: dict[str, str]        # content hashes that went into it
    versions: dict[str, str]


def identity(plan_: RunPlan, dataset: Dataset) -> Identity:
    run = plan_.config
    ignored = NON_SEMANTIC + (FARM_ASSIGNED if run.farm else ())
    settings = {k: v for k, v in flatten(run).items() if not k.startswith(ignored)}
    inputs = input_hashes(run, dataset)
    versions = _versions(run)
    blob = json.dumps({"settings": settings, "inputs": inputs, "versions": versions,
                       "measurement": MEASUREMENT_VERSION}, sort_keys=True)
    return Identity(hashlib.sha256(blob.encode()).hexdigest()[:20], inputs, versions)


# ---------------------------------------------------------------------------------------- inference

def inference_spec(run: RunConfig, export_info: dict, dataset: Dataset, runtime: str,
                   batch: Optional[int] = None) -> InferenceSpec:
    """The spec of one runtime of this run; the model's own facts come from the export stage."""
    head = "yolov5" if export_info.get("family") == "yolov5" else export_info["head"]
    anchors = (tuple(map(tuple, np.asarray(export_info["anchors"], dtype=float).reshape(3, -1).tolist()))
               if head == "yolov5" else ())
    rknn = runtime in ("rknnlite", "rknn-simulator")
    return InferenceSpec(
        input_size=int(export_info.get("imgsz") or (export_info.get("input_shape") or [0])[-1] or run.resolution),
        head=head,
        num_classes=int(export_info["num_classes"]), category_ids=tuple(dataset.category_ids),
        reg_max=int(export_info.get("reg_max", 16)), anchors=anchors,
        batch=batch if batch is not None else (run.batch if rknn else 1),
        conf=run.eval.conf, iou=run.eval.iou, max_det=run.eval.max_det, runtime=runtime,
        core_mask=run.core_mask if runtime == "rknnlite" else "auto",
        # mean/std per input channel of the exported model (channels=1: the gray model)
        mean=(0.0,) * int(export_info.get("channels", 3)), std=(255.0,) * int(export_info.get("channels", 3)))

