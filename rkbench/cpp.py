"""The C++ on-device runner (cpp/rkbench_runner.cpp) and its replay stand-in librknnrt (cpp/fake_librknnrt.c):
building them with the pip-installed zig toolchain, and the host side of the replay.

    python -m rkbench runner build --arch aarch64 [--cache DIR]   # prints the runner binary's path
    python -m rkbench.cpp build --arch aarch64 [--cache DIR]      # the same
    python -m rkbench.cpp build --arch x86_64 --stand-in          # prints the stand-in library's path

Builds are cached under <cache>/cpp/<key>/ where key hashes the sources, the target and the toolchain
version. zig links libc++ statically, so the runner needs only the board's glibc (2.17 or newer) and
libdl; librknnrt is opened at run time.

Replay (for machines without an NPU): prepare_inputs() letterboxes images into raw uint8 NHWC tensors
and writes the runner's inputs file; write_replay() runs the ONNX model with ONNX Runtime on exactly
those tensors and stores the outputs keyed by the FNV-1a 64 hash of the input bytes, which the stand-in
recomputes on rknn_inputs_set (for a batch: the bytes of its images in order; with pass-through: the
int8 tensor the runner hands over, pass_through_bytes)."""

from __future__ import annotations

import argparse
import hashlib
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Iterable, List, Sequence, Tuple

SOURCES = Path(__file__).resolve().parent.parent / "cpp"
RUNNER_SOURCES = ("rkbench_runner.cpp", "rknn_api_subset.h")
STANDIN_SOURCES = ("fake_librknnrt.c", "rknn_api_subset.h")
# glibc 2.17 symbols only: the runner then starts on old board images (Debian 10, Ubuntu 18.04) too
TARGETS = {"aarch64": "aarch64-linux-gnu.2.17", "x86_64": "x86_64-linux-gnu.2.17"}
DEFAULT_CACHE = Path(".rkbench_cache")  # the default cache_dir of rkbench.config
REPLAY_MODEL = "model.replay"
FNV_OFFSET, FNV_PRIME = 0xCBF29CE484222325, 0x100000001B3


class BuildError(RuntimeError):
    """The toolchain is missing or the compile failed; the message names the fix."""


def _zig() -> List[str]:
    try:
        import ziglang  # noqa: F401  - only to check it is installed
    except ImportError:
        raise BuildError("the zig toolchain is not installed: pip install ziglang") from None
    return [sys.executable, "-m", "ziglang"]


def zig_version() -> str:
    out = subprocess.run(_zig() + ["version"], capture_output=True, text=True)
    return out.stdout.strip()


def _key(names: Sequence[str], target: str, flags: Sequence[str]) -> str:
    h = hashlib.sha256()
    for name in names:
        h.update(name.encode() + b"\0" + (SOURCES / name).read_bytes() + b"\0")
    h.update(" ".join([target, zig_version(), *flags]).encode())
    return h.hexdigest()[:16]


def _cached_build(arch: str, cache_dir: Path, names: Sequence[str], output: str, command: List[str]) -> Path:
    """Compile once per (sources, target, toolchain): built in a temp folder, renamed into place."""
    if arch not in TARGETS:
        raise BuildError(f"arch {arch!r} unknown: use one of {', '.join(TARGETS)}")
    target = TARGETS[arch]
    flags = command + ["-target", target]
    entry = Path(cache_dir) / "cpp" / _key(names, target, flags)
    if (entry / output).is_file():
        return entry / output
    entry.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".build-", dir=entry.parent))
    try:
        cmd = _zig() + flags + ["-o", str(tmp / output), *[str(SOURCES / n) for n in names if not n.endswith(".h")]]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise BuildError(f"building {output} for {arch} failed: {done.stderr.strip()[-2000:]}")
        try:
            tmp.rename(entry)
        except OSError:  # another process built the same key first: use its copy
            pass
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return entry / output


def build(arch: str, cache_dir: Path = DEFAULT_CACHE) -> Path:
    """The runner binary for `arch` (aarch64 for boards, x86_64 for this machine)."""
    return _cached_build(arch, cache_dir, RUNNER_SOURCES, "rkbench_runner",
                         ["c++", "-std=c++17", "-O2", "-s", "-Wall", "-Wextra", "-pthread", "-ldl"])


def build_standin(arch: str, cache_dir: Path = DEFAULT_CACHE) -> Path:
    """The replay stand-in librknnrt.so for `arch` (never pushed to a real board)."""
    return _cached_build(arch, cache_dir, STANDIN_SOURCES, "librknnrt.so",
                         ["cc", "-std=c11", "-O2", "-s", "-Wall", "-Wextra", "-shared", "-fPIC", "-lm"])


# ------------------------------------------------------------------------------------------- replay

def fnv1a64(data: bytes) -> int:
    """FNV-1a 64 of the bytes, as the stand-in computes it (numpy-free, fast enough for a few images)."""
    h = FNV_OFFSET
    for b in data:
        h = ((h ^ b) * FNV_PRIME) & 0xFFFFFFFFFFFFFFFF
    return h


def prepare_inputs(folder: Path, items: Iterable[Tuple[int, str]], input_size: int, channels: int = 3) -> Tuple[Path, list]:
    """Letterbox each (image_id, path) like the Detector and write it as a raw uint8 NHWC tensor (channels=1: gray
    after the letterbox, as the Detector feeds a 1-channel model); returns the inputs file (image_id, tensor path,
    original size, letterbox) and the tensors in order."""
    from rkbench.models import prepost

    folder = Path(folder)
    (folder / "inputs").mkdir(parents=True, exist_ok=True)
    lines, tensors = [], []
    for image_id, path in items:
        img = prepost.load_rgb(path)
        boxed, info = prepost.letterbox(img, input_size)
        if channels == 1:
            boxed = prepost.to_gray(boxed)
        name = f"inputs/{image_id}.bin"
        (folder / name).write_bytes(boxed.tobytes())
        # repr() keeps every bit of the float: the runner maps back with exactly the Detector's letterbox
        lines.append("\t".join([str(image_id), name, str(img.shape[1]), str(img.shape[0]),
                                repr(float(info.scale)), repr(info.pad_x), repr(info.pad_y)]))
        tensors.append(boxed)
    inputs = folder / "inputs.txt"
    inputs.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return inputs, tensors


def input_quantisation(mean: Sequence[float] = (0, 0, 0), std: Sequence[float] = (255, 255, 255)) -> Tuple[int, float]:
    """(zero point, scale) of an int8 .rknn's input as rknn_query reports it: the normalised range of uint8
    pixels ((0 - mean) / std .. (255 - mean) / std, over the channels) spread over int8. mean 0, std 255:
    (-128, 1/255), what Rockchip's YOLO models report."""
    import numpy as np

    m, sd = np.asarray(mean, dtype=np.float32), np.asarray(std, dtype=np.float32)
    lo, hi = float(((0 - m) / sd).min()), float(((255 - m) / sd).max())
    scale = np.float32((hi - lo) / 255)
    return int(round(-128 - lo / float(scale))), float(scale)


def pass_through_bytes(nhwc, mean: Sequence[float] = (0, 0, 0), std: Sequence[float] = (255, 255, 255)) -> bytes:
    """A batch of uint8 NHWC images as the NPU takes them with rknn_input.pass_through=1: int8 NHWC,
    q = round(((x - mean) / std) / scale) + zp, in float32 step by step exactly as the C++ runner's
    Model::prepare computes it from the attr (so the host can record what the board will send)."""
    import numpy as np

    zp, scale = input_quantisation(mean, std)
    v = np.asarray(nhwc, dtype=np.uint8).astype(np.float32)
    v = ((v - np.asarray(mean, dtype=np.float32)) / np.asarray(std, dtype=np.float32)) / np.float32(scale)
    return np.clip(np.rint(v) + np.float32(zp), -128, 127).astype(np.int8).tobytes()


def write_replay(folder: Path, onnx_path: Path, tensors: Sequence, mean=(0, 0, 0), std=(255, 255, 255), batch: int = 1,
                 pass_through: bool = False) -> Path:
    """Run the ONNX model with ONNX Runtime on each uint8 HxWxC tensor (C = len(mean): 3, or 1 for a gray model) and record its outputs for the
    stand-in, per batch of `batch` consecutive tensors (the last one repeated to fill, as the runner
    batches them), under the hash of the uint8 batch and, with `pass_through`, of its pass-through bytes;
    returns the replay description to pass as the runner's --model."""
    import numpy as np

    from rkbench.runtimes.backends import OnnxRuntimeRuntime

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if not tensors:
        raise ValueError("write_replay needs at least one input tensor")
    runtime = OnnxRuntimeRuntime(str(onnx_path), mean, std)
    try:   # one image at a time: the ONNX need not take batches
        images = [np.ascontiguousarray(x, dtype=np.uint8) for x in tensors]
        per_image = [[np.asarray(o, dtype=np.float32) for o in runtime.infer(x[None])] for x in images]
    finally:
        runtime.close()
    for start in range(0, len(images), batch):
        picks = [min(start + j, len(images) - 1) for j in range(batch)]
        outputs = [np.concatenate([per_image[i][k] for i in picks]) for k in range(len(per_image[0]))]
        blob = b"".join(np.ascontiguousarray(o).tobytes() for o in outputs)
        raw = np.stack([images[i] for i in picks])
        keys = [raw.tobytes()] + ([pass_through_bytes(raw, mean, std)] if pass_through else [])
        for key in keys:
            (folder / f"{fnv1a64(key):016x}.out").write_bytes(blob)
    h, w, c = images[0].shape
    shapes = [(batch, *o.shape[1:]) for o in per_image[0]]
    return _describe(folder, h, w, shapes, batch, input_quantisation(mean, std), channels=c)


def write_null_replay(folder: Path, input_size: int, output_shapes: Sequence[Sequence[int]]) -> Path:
    """A NULL-mode description: the stand-in serves zeros of these shapes, hashing nothing and reading no
    files, so a runner timed against it shows its own overhead. Never for reported numbers."""
    return _describe(Path(folder), input_size, input_size, output_shapes, extra=["null"])


def _describe(folder: Path, h: int, w: int, shapes: Sequence[Sequence[int]], batch: int = 1,
              quantisation: Tuple[int, float] = (-128, 1 / 255), extra: Sequence[str] = (), channels: int = 3) -> Path:
    zp, scale = quantisation
    lines = ["rkbench-replay 1", f"input images 4 {batch} {h} {w} {channels} int8 nhwc {zp} {scale!r}"]
    for k, shape in enumerate(shapes):
        lines.append(f"output output{k} {len(shape)} {' '.join(map(str, shape))} float32 nchw 0 0")
    folder.mkdir(parents=True, exist_ok=True)
    model = folder / REPLAY_MODEL
    model.write_text("\n".join([*lines, *extra]) + "\n", encoding="utf-8")
    return model


def main(argv: Sequence[str] | None = None, prog: str = "python -m rkbench.cpp") -> int:
    p = argparse.ArgumentParser(prog=prog, description="Build rkbench's C++ runner.")
    sub = p.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="build (or find in the cache) and print the binary's path")
    b.add_argument("--arch", default="aarch64", choices=sorted(TARGETS))
    b.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help=f"cache folder (default {DEFAULT_CACHE})")
    b.add_argument("--stand-in", action="store_true", help="the replay stand-in librknnrt.so instead of the runner")
    args = p.parse_args(argv)
    try:
        path = (build_standin if args.stand_in else build)(args.arch, args.cache)
    except BuildError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
