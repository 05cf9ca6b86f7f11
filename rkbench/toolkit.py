"""rknn-toolkit2 below the stages: the options of a build, one build on a fresh RKNN object, the toolkit's
console output, and which of its failures are about the model (deterministic) or the machine (transient).

Used by the convert stage and by the simulator runtime (which rebuilds from the ONNX on a cache hit)."""

from __future__ import annotations

import importlib.metadata as md
import logging
import os
import re
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from rkbench.errors import StageError
from rkbench.progress import elapsed

log = logging.getLogger("rkbench.toolkit")

# The shipped models take RGB uint8 and normalise to [0, 1]: mean/std are folded into the .rknn.
MEAN = (0.0, 0.0, 0.0)
STD = (255.0, 255.0, 255.0)

# The toolkit flattens every Python exception into a ValueError carrying the traceback text (or logs an
# "E" line and returns -1), so its failures can only be told apart by their words:
# - about the machine: a file missing or unreadable ("Model file X not exists!", "The image of X is
#   invalid!" for a calibration image we wrote ourselves, "Dataset file X not found!"), any OS error
#   ("[Errno 28] No space left on device"), memory. The next run may succeed: raised, never cached.
# - anything else is the toolkit rejecting this graph with these options (e.g. the rule
#   `_p_seperate_conv_rs_split` on the official head): rknn-toolkit2 is deterministic, the same ONNX and
#   options fail the same way, so the convert stage caches it.
MACHINE_FAULT = re.compile(r"\[Errno \d+\]|No space left|Disk quota|File too large|MemoryError|Cannot allocate memory"
                           r"|bad_alloc|not exists?!|not found!|The image of .* is invalid")


@dataclass(frozen=True)
class ConvertOptions:
    platform: str
    quantize: bool
    algo: str
    method: str
    dtype: str
    batch: int
    optimization_level: int = 3
    hybrid: tuple[str, ...] = ()        # layers kept in float16 (hybrid quantization); () = plain int8
    channels: int = 3                   # 1: a gray model (mean/std of one channel)


    def describe(self, calib_images: int) -> str:
        """In words, for the console: "int8, normal, 16 calibration images" or "fp16"."""
        if not self.quantize:
            words = ["fp16"]
        else:
            words = ["int8" if self.dtype == "w8a8" else self.dtype, self.algo, f"{calib_images} calibration images"]
        hybrid = [f"hybrid: {len(self.hybrid)} layers in float16"] if self.quantize and self.hybrid else []
        return ", ".join(words + hybrid + ([f"batch {self.batch}"] if self.batch > 1 else []))

    def toolkit_config(self) -> dict[str, Any]:
        return dict(mean_values=[list(MEAN[:self.channels])], std_values=[list(STD[:self.channels])], target_platform=self.platform,
                    quantized_dtype=self.dtype, quantized_algorithm=self.algo, quantized_method=self.method,
                    optimization_level=self.optimization_level)


def toolkit_version() -> str:
    return md.version("rknn-toolkit2")


def _errors_from_log(log_path: Path, limit: int = 6) -> str:
    """The toolkit's own error lines (it logs them, then returns -1 or raises a bare ValueError)."""
    if not log_path.exists():
        return ""
    text = re.sub(r"\x1b\[[0-9;]*m", "", log_path.read_text(errors="replace"))
    lines = [ln.strip() for ln in text.splitlines()
             if (re.match(r"^\s*E\b", ln) or "Error" in ln) and not re.search(r"Traceback|toolkit2 version", ln)]
    if not lines:  # no error line: the last thing the toolkit said is the best clue
        lines = text.strip().splitlines()[-1:]
    return " | ".join(dict.fromkeys(lines))[-1500:]


@contextmanager
def captured_output(log_path: Path):
    """Send the toolkit's console output (printed from compiled code, so fd-level) to its log file."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with open(log_path, "ab") as log_file:
        os.dup2(log_file.fileno(), 1)
        os.dup2(log_file.fileno(), 2)
        try:
            yield
        finally:
            try:  # flushing into a log on a full disk fails: the console must come back all the same
                sys.stdout.flush()
                sys.stderr.flush()
            finally:
                os.dup2(saved[0], 1)
                os.dup2(saved[1], 2)
                os.close(saved[0])
                os.close(saved[1])


@contextmanager
def working_dir(path: Path):
    """contextlib.chdir for Python 3.10."""
    before = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(before)


def _exception_summary(exc: Exception) -> str:
    """The toolkit wraps its tracebacks in a ValueError: keep the failing rule/frame and the last line."""
    lines = [ln.strip() for ln in str(exc).strip().splitlines() if ln.strip()]
    frames = [ln for ln in lines if ln.startswith("File ")]
    return " ".join(([frames[-1]] if frames else []) + lines[-1:]) or type(exc).__name__


def _attempt(call) -> tuple[str, bool]:
    """One toolkit call: ("", False) when it returned 0, else (what went wrong, whether the machine failed)."""
    try:
        ret = call()
        return ("" if ret == 0 else f"returned {ret}"), False
    except (OSError, MemoryError) as exc:  # raised before the toolkit could wrap it: the machine
        return f"{type(exc).__name__}: {exc}", True
    except Exception as exc:  # the toolkit raises bare ValueError/RuntimeError from compiled code
        return _exception_summary(exc), bool(MACHINE_FAULT.search(str(exc)))


def _failure(step: str, error: str, machine: bool, log_path: Path, hint: str, stage: str = "convert") -> StageError:
    logged = _errors_from_log(log_path)
    machine = machine or bool(MACHINE_FAULT.search(logged))
    return StageError(stage, f"rknn-toolkit2 {toolkit_version()} {step} failed: {error}. {logged}".strip(),
                      "a file went missing, the disk filled or memory ran out during the build: fix that and run "
                      "again" if machine else hint, deterministic=not machine)


def build_rknn(onnx_path: Path, opts: ConvertOptions, calib_list: Optional[Path], log_path: Path, hint: str):
    """config -> load_onnx -> build on a fresh RKNN object; returns it live (simulator-ready).
    Raises StageError("convert"), deterministic unless the toolkit's words say the machine failed."""
    calib = len(calib_list.read_text().splitlines()) if calib_list else 0
    what = f"converting for {opts.platform} with rknn-toolkit2 {toolkit_version()} ({opts.describe(calib)})"
    log.info("%s; its output goes to convert.log", what)
    # The toolkit drops debug graphs (check*.onnx) into the cwd when a build fails: keep them in the entry.
    with elapsed(what), captured_output(log_path), working_dir(log_path.parent):
        from rknn.api import RKNN   # seconds: it imports torch (and prints), so inside the ticking line

        if opts.quantize and opts.hybrid:
            rknn, step, error, machine = _build_hybrid(RKNN, onnx_path, opts, calib_list)
        else:
            rknn = RKNN(verbose=True)
            step, error, machine = _steps(rknn, (
                ("config", lambda: rknn.config(**opts.toolkit_config())),
                ("load_onnx", lambda: rknn.load_onnx(model=str(onnx_path))),
                ("build", lambda: rknn.build(do_quantization=opts.quantize,
                                             dataset=str(calib_list) if opts.quantize else None,
                                             rknn_batch_size=opts.batch if opts.batch > 1 else None))))
    if error:
        raise _failure(step, error, machine, log_path, hint)
    return rknn


def _steps(rknn, steps) -> tuple[str, str, bool]:
    """Toolkit calls in order until one fails: (its step, what went wrong, machine fault); the object is
    released on failure."""
    for step, call in steps:
        error, machine = _attempt(call)
        if error:
            rknn.release()
            return step, error, machine
    return "", "", False


# hybrid_quantization_step1 writes <onnx stem>.{model,data,quantization.cfg} into the cwd; custom_quantize_layers
# in the .cfg maps a tensor name (a key of its quantize_parameters, as accuracy_analysis names layers) to the
# dtype it keeps.
HYBRID_DTYPE = "float16"


def _build_hybrid(RKNN, onnx_path: Path, opts: ConvertOptions, calib_list: Path):
    """hybrid_quantization_step1 (quantize, write the config) -> keep opts.hybrid in float16 -> step2 on a
    fresh object (as the toolkit's examples do), in a temporary folder: its files are tens of MB and the
    simulator rebuilds inside a committed cache entry. Returns (live object or None, step, error, machine)."""
    import tempfile

    import yaml

    first = RKNN(verbose=True)
    stem = Path(onnx_path).stem
    with tempfile.TemporaryDirectory(prefix="rkbench-hybrid-") as tmp, working_dir(Path(tmp)):
        step, error, machine = _steps(first, (
            ("config", lambda: first.config(**opts.toolkit_config())),
            ("load_onnx", lambda: first.load_onnx(model=str(onnx_path))),
            ("hybrid_quantization_step1", lambda: first.hybrid_quantization_step1(
                dataset=str(calib_list), rknn_batch_size=opts.batch if opts.batch > 1 else None))))
        if error:
            return None, step, error, machine
        first.release()
        cfg_path = Path(f"{stem}.quantization.cfg")
        cfg = yaml.safe_load(cfg_path.read_text())
        unknown = [name for name in opts.hybrid if name not in cfg["quantize_parameters"]]
        if unknown:
            return None, "hybrid_quantization_step1", f"layers {', '.join(unknown)} are not in its quantize_parameters", False
        cfg["custom_quantize_layers"] = {name: HYBRID_DTYPE for name in opts.hybrid}
        cfg_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        second = RKNN(verbose=True)
        step, error, machine = _steps(second, (
            ("config", lambda: second.config(**opts.toolkit_config())),
            ("hybrid_quantization_step2", lambda: second.hybrid_quantization_step2(
                model_input=f"{stem}.model", data_input=f"{stem}.data", model_quantization_cfg=str(cfg_path)))))
    return (None if error else second), step, error, machine


def accuracy_analysis(rknn, images: list[Path], out_dir: Path, log_path: Path, hint: str) -> list[Path]:
    """rknn-toolkit2 accuracy_analysis of a built (simulator) model, one call per image (the toolkit takes one
    image per model input). Keeps each call's error_analysis.txt and map_name_to_file.txt as
    <out_dir>/<i>_<name>; the per-layer snapshots (tens of MB per image) are deleted. Returns the
    error_analysis files in image order; raises StageError("accuracy") like a build."""
    import shutil

    kept = []
    for i, image in enumerate(images):
        snap = out_dir / f"snapshot_{i}"
        with captured_output(log_path), working_dir(out_dir):
            error, machine = _attempt(lambda: rknn.accuracy_analysis(inputs=[str(image)], output_dir=str(snap)))
        if error:
            shutil.rmtree(snap, ignore_errors=True)
            raise _failure("accuracy_analysis", error, machine, log_path, hint, stage="accuracy")
        for name in ("error_analysis.txt", "map_name_to_file.txt"):
            if (snap / name).exists():
                (snap / name).rename(out_dir / f"{i}_{name}")
        shutil.rmtree(snap)
        kept.append(out_dir / f"{i}_error_analysis.txt")
    return kept


def export_rknn(rknn, out: Path, log_path: Path, hint: str) -> None:
    """Write the built model to `out`; on failure release the object and raise like build_rknn."""
    with captured_output(log_path):
        error, machine = _attempt(lambda: rknn.export_rknn(str(out)))
    if error:
        rknn.release()
        raise _failure("export_rknn", error, machine, log_path, hint)
