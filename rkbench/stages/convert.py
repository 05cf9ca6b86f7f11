"""Stage 3: ONNX -> .rknn with rknn-toolkit2 (quantized with a calibration set, or fp16)."""

from __future__ import annotations

import importlib.metadata as md
import logging
import os
import re
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional

from rkbench.cache import StageCache, stage_key
from rkbench.errors import StageError
from rkbench.stages import Artifact, from_cache

log = logging.getLogger("rkbench.convert")

# The shipped models take RGB uint8 and normalise to [0, 1]: mean/std are folded into the .rknn.
MEAN = (0.0, 0.0, 0.0)
STD = (255.0, 255.0, 255.0)


@dataclass(frozen=True)
class ConvertOptions:
    platform: str
    quantize: bool
    algo: str
    method: str
    dtype: str
    batch: int
    optimization_level: int = 3

    def toolkit_config(self) -> dict[str, Any]:
        return dict(mean_values=[list(MEAN)], std_values=[list(STD)], target_platform=self.platform,
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
    with open(log_path, "ab") as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        try:
            yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
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


def build_rknn(onnx_path: Path, opts: ConvertOptions, calib_list: Optional[Path], log_path: Path, hint: str):
    """config -> load_onnx -> build on a fresh RKNN object; returns it live (simulator-ready)."""
    from rknn.api import RKNN

    log.info("rknn-toolkit2 %s: building %s (toolkit log: %s)", toolkit_version(), onnx_path.name, log_path)
    step = "config"
    # The toolkit drops debug graphs (check*.onnx) into the cwd when a build fails: keep them in the entry.
    with captured_output(log_path), working_dir(log_path.parent):
        rknn = RKNN(verbose=True)
        try:
            ret = rknn.config(**opts.toolkit_config())
            if ret == 0:
                step = "load_onnx"
                ret = rknn.load_onnx(model=str(onnx_path))
            if ret == 0:
                step = "build"
                ret = rknn.build(do_quantization=opts.quantize, dataset=str(calib_list) if opts.quantize else None,
                                 rknn_batch_size=opts.batch if opts.batch > 1 else None)
            error = "" if ret == 0 else f"returned {ret}"
        except Exception as exc:  # the toolkit raises bare ValueError/RuntimeError from compiled code
            error = _exception_summary(exc)
        if error:
            rknn.release()
    if error:
        raise StageError("convert", f"rknn-toolkit2 {toolkit_version()} {step} failed: {error}. {_errors_from_log(log_path)}".strip(), hint)
    return rknn


def write_calibration(images: list[Path], resolution: int, out_dir: Path) -> Path:
    """Letterbox the calibration images exactly like inference does and list them for the toolkit.
    Saved as lossless PNGs of the model size, so the toolkit's own resize is the identity."""
    import cv2

    from rkbench.models.prepost import letterbox, load_rgb

    out_dir.mkdir(parents=True, exist_ok=True)
    lines = []
    for i, src in enumerate(images):
        boxed, _ = letterbox(load_rgb(src), resolution)
        dst = out_dir / f"calib_{i:04d}.png"
        cv2.imwrite(str(dst), cv2.cvtColor(boxed, cv2.COLOR_RGB2BGR))
        lines.append(str(dst.resolve()))
    listing = out_dir / "dataset.txt"
    listing.write_text("\n".join(lines) + "\n")
    return listing


def convert(onnx: Artifact, opts: ConvertOptions, resolution: int, calib_images: list[Path], calib_hash: str,
            cache: StageCache, head: str) -> tuple[Artifact, Any]:
    """Returns the .rknn artifact and, on a cache miss, the live toolkit object (reusable by the
    simulator, which cannot load a .rknn file); None on a hit."""
    key = stage_key("convert", onnx=onnx.sha256, opts=asdict(opts), mean=MEAN, std=STD, resolution=resolution,
                    calib=calib_hash if opts.quantize else None, toolkit=toolkit_version())
    entry = cache.lookup("convert", key)
    # The toolkit is deterministic: a failure is kept too, so a re-run does not convert again to fail again.
    if entry.failure:
        raise StageError("convert", f"{entry.failure['detail']} (cached failure: delete {entry.dir} to retry)",
                         entry.failure["hint"])
    if entry.hit:
        return from_cache(entry, "rknn"), None
    work = cache.begin(entry)
    hint = ("the official Ultralytics head does not build on rknn-toolkit2 2.x: use export=rknn"
            if head == "ultralytics" else "see convert.log in the run's artifacts")
    calib_list = write_calibration(calib_images, resolution, work / "calib") if opts.quantize else None
    started = time.perf_counter()
    try:
        rknn = build_rknn(onnx.path, opts, calib_list, work / "convert.log", hint)
        build_s = time.perf_counter() - started
        out = work / "model.rknn"
        with captured_output(work / "convert.log"):
            exported = rknn.export_rknn(str(out))
        if exported != 0:
            rknn.release()
            raise StageError("convert", f"export_rknn failed: {_errors_from_log(work / 'convert.log')}", hint)
    except StageError as err:
        cache.fail(entry, err.detail, err.hint)
        raise
    info = dict(onnx.info, build_s=round(build_s, 3), toolkit=toolkit_version(), options=asdict(opts),
                mean=MEAN, std=STD, rknn_bytes=out.stat().st_size)
    cache.commit(entry, {"rknn": out.name, "log": "convert.log"}, info)
    return from_cache(entry, "rknn"), rknn
