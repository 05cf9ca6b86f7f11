"""Stage 3: ONNX -> .rknn with rknn-toolkit2 (quantized with a calibration set, or fp16)."""

from __future__ import annotations

import logging
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from rkbench.cache import StageCache, stage_key
from rkbench.errors import StageError
from rkbench.stages import Artifact, from_cache
from rkbench.toolkit import MEAN, STD, ConvertOptions, build_rknn, export_rknn, toolkit_version

__all__ = ["ConvertOptions", "convert", "write_calibration"]  # ConvertOptions: pipeline imports it from here

log = logging.getLogger("rkbench.convert")


def write_calibration(images: list[Path], resolution: int, out_dir: Path, channels: int = 3) -> Path:
    """Letterbox the calibration images exactly like inference does and list them for the toolkit.
    Saved as lossless PNGs of the model size, so the toolkit's own resize is the identity.

    The list holds bare file names: rknn-toolkit2 splits each line on spaces (several inputs per line)
    and resolves a relative name against the list's own folder, so a cache dir with spaces or non-ASCII
    characters in its path never reaches that split."""
    import cv2

    from rkbench.models.prepost import letterbox, load_rgb, to_gray

    out_dir.mkdir(parents=True, exist_ok=True)
    names = []
    for i, src in enumerate(images):
        boxed, _ = letterbox(load_rgb(src), resolution)
        ok, png = cv2.imencode(".png", cv2.cvtColor(boxed, cv2.COLOR_RGB2BGR) if channels == 3 else to_gray(boxed))
        if not ok:
            raise StageError("convert", f"cannot encode calibration image {src} as PNG", "check the image opens with cv2.imread")
        names.append(f"calib_{i:04d}.png")
        (out_dir / names[-1]).write_bytes(png.tobytes())  # unlike cv2.imwrite, a full disk raises here
    listing = out_dir / "dataset.txt"
    listing.write_text("\n".join(names) + "\n")
    return listing


def convert(onnx: Artifact, opts: ConvertOptions, resolution: int, calib_images: list[Path], calib_hash: str,
            cache: StageCache, head: str) -> tuple[Artifact, Any]:
    """Returns the .rknn artifact and, on a cache miss, the live toolkit object (reusable by the
    simulator, which cannot load a .rknn file); None on a hit."""
    key = stage_key("convert", onnx=onnx.sha256, opts=asdict(opts), mean=MEAN, std=STD, resolution=resolution,
                    calib=calib_hash if opts.quantize else None, toolkit=toolkit_version())
    with cache.open("convert", key) as entry:
        if entry.failure:
            raise StageError("convert", f"{entry.failure['detail']} (cached failure: delete {entry.dir} to retry)",
                             entry.failure["hint"], deterministic=True)
        if entry.hit:
            log.info("%s .rknn taken from the stage cache (converted before with these inputs)", opts.platform)
            return from_cache(entry, "rknn"), None
        work = cache.begin(entry)
        hint = ("the official Ultralytics head does not build on rknn-toolkit2 2.x: use export=rknn"
                if head == "ultralytics" else "see convert.log in the run's artifacts")
        calib_list = write_calibration(calib_images, resolution, work / "calib", opts.channels) if opts.quantize else None
        started = time.perf_counter()
        try:
            rknn = build_rknn(onnx.path, opts, calib_list, work / "convert.log", hint)
            build_s = time.perf_counter() - started
            log.info("converted in %.1f s", build_s)
            export_rknn(rknn, work / "model.rknn", work / "convert.log", hint)
        except StageError as err:
            if err.deterministic:  # the toolkit rejects this graph with these options: it will again
                cache.fail(entry, err.detail, err.hint)
            raise
        for debug_graph in work.glob("check*.onnx"):  # the toolkit's debug dumps: tens of MB, only kept on failure
            debug_graph.unlink()
        info = dict(onnx.info, build_s=round(build_s, 3), toolkit=toolkit_version(), options=asdict(opts),
                    mean=MEAN, std=STD, rknn_bytes=(work / "model.rknn").stat().st_size)
        try:
            cache.commit(entry, {"rknn": "model.rknn", "log": "convert.log"}, info)
        except BaseException:
            rknn.release()  # nobody will get it
            raise
        return from_cache(entry, "rknn"), rknn
