"""Each on-device runner's own timing overhead, side by side in one run, against a null engine.

    python bench/bench_runner.py [--size 640] [--classes 80] [--iterations 300] [--min-seconds 2]

Both runners run here, on this machine's CPU, on the same input size and the same rknn-head output
shapes (three scales of 64 box + <classes> score + 1 sum channels), in their latency mode:

- the Python runner (rkbench/device/runner.py, the bundle rkbench pushes) with `runtime=null`: the engine
  call returns zeros (rkbench.runtimes.backends.NullRuntime); its loop times pre-processing (letterbox of a
  real image), the engine call and post-processing (decode + NMS) apart;
- the C++ runner (cpp/rkbench_runner.cpp, built with zig) against the stand-in librknnrt in NULL mode: no
  hashing, no files, zeros of the same shapes (rkbench.cpp.write_null_replay); its loop times
  rknn_inputs_set, rknn_run and rknn_outputs_get + release apart on a tensor prepared by the host; and
  once more with zero-copy io memory (measure zero_copy: the input copied into rknn_create_mem memory, the
  outputs read out of it), so the two paths' overheads compare.

The per-iteration time of each loop with a null engine is what the harness itself adds to an inference:
printed in µs and as a share of a 5 ms inference (the issue's goal: the C++ runner adds < 1%). The NULL
stand-in is for this overhead only: its numbers are never NPU latency and never reported as such."""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

import cv2

from rkbench import cpp
from rkbench.data import demo
from rkbench.device.session import bundle_files
from rkbench.models.detect import InferenceSpec

INFERENCE_MS = 5.0          # the inference the overhead is compared with
STRIDES = (8, 16, 32)


def output_shapes(size: int, classes: int) -> list[list[int]]:
    """The rknn head's outputs: per scale box (64), class scores and score sum."""
    return [[1, c, size // s, size // s] for s in STRIDES for c in (64, classes, 1)]


def write_spec(path: Path, size: int, classes: int, iterations: int, min_seconds: float, **settings) -> Path:
    spec = InferenceSpec(input_size=size, head="rknn", num_classes=classes, category_ids=tuple(range(1, classes + 1)),
                         runtime="null")
    measure = {"warmup": 20, "iterations": iterations, "min_seconds": min_seconds, **settings}
    path.write_text(json.dumps({"inference": spec.to_dict(), "measure": measure}))
    return path


def run(cmd: list[str], out: Path, env: dict[str, str] | None = None) -> dict:
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        sys.exit(f"bench_runner: {cmd[0]} failed (exit {done.returncode}): {done.stderr.strip()[-500:]}")
    return json.loads(out.read_text())["latency"]


def python_runner(work: Path, spec: Path, image: Path, shapes: list[list[int]]) -> dict:
    files = bundle_files()
    dirs = dict.fromkeys(str(p.parent) for name, p in files.items() if name != "runner")
    model = work / "null.model"           # the null runtime reads no model; the runner wants a file there
    model.write_bytes(b"")
    out = work / "py.json"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(dirs))
    return run([sys.executable, str(files["runner"]), "--spec", str(spec), "--mode", "latency", "--model", str(model),
                "--out", str(out), "--where", "host", "--image", str(image),
                "--output-shapes", ",".join("x".join(map(str, s)) for s in shapes)], out, env)


def cpp_runner(work: Path, spec: Path, image: Path, size: int, shapes: list[list[int]], cache: Path) -> dict:
    arch = {"x86_64": "x86_64", "AMD64": "x86_64", "aarch64": "aarch64", "arm64": "aarch64"}[platform.machine()]
    runner, standin = cpp.build(arch, cache), cpp.build_standin(arch, cache)
    inputs, _ = cpp.prepare_inputs(work / "cpp", [(0, str(image))], size)
    model = cpp.write_null_replay(work / "null", size, shapes)
    out = work / f"{spec.stem}.cpp.json"
    return run([str(runner), "--spec", str(spec), "--mode", "latency", "--model", str(model), "--out", str(out),
                "--where", "host", "--inputs", str(inputs), "--lib", str(standin)], out)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=int, default=640, help="model input size (px)")
    p.add_argument("--classes", type=int, default=80)
    p.add_argument("--iterations", type=int, default=1000, help="at least this many timed iterations per runner")
    p.add_argument("--min-seconds", type=float, default=0.0, help="and at least this long")
    p.add_argument("--cache", type=Path, default=cpp.DEFAULT_CACHE, help="zig build cache")
    args = p.parse_args()

    shapes = output_shapes(args.size, args.classes)
    with tempfile.TemporaryDirectory(prefix="bench_runner-") as tmp:
        work = Path(tmp)
        img, _ = demo.render(0, "val", 0)
        image = work / "image.png"
        cv2.imwrite(str(image), cv2.resize(img, (640, 480)))
        spec = write_spec(work / "spec.json", args.size, args.classes, args.iterations, args.min_seconds)
        py = python_runner(work, spec, image, shapes)
        cc = cpp_runner(work, spec, image, args.size, shapes, args.cache)
        zero_copy = write_spec(work / "zero_copy.json", args.size, args.classes, args.iterations, args.min_seconds,
                               zero_copy=True)
        zc = cpp_runner(work, zero_copy, image, args.size, shapes, args.cache)

    print(f"Runner overhead against a null engine, {args.size} px input, {args.classes} classes, "
          f"{platform.machine()} ({platform.processor() or platform.platform()}), p50 per iteration:")
    rows = [("python", "pre (Detector.prepare)", py["pre"]), ("python", "infer (engine call, null)", py["infer"]),
            ("python", "post (decode + NMS)", py["post"]), ("python", "total", py["total"]),
            ("cpp", "rknn_inputs_set", cc["inputs_set"]), ("cpp", "rknn_run (null)", cc["run"]),
            ("cpp", "rknn_outputs_get + release", cc["outputs_get"]), ("cpp", "total", cc["total"]),
            ("cpp zc", "input_copy (into io memory)", zc["input_copy"]), ("cpp zc", "rknn_run (null)", zc["run"]),
            ("cpp zc", "output_read (out of io memory)", zc["output_read"]), ("cpp zc", "total", zc["total"])]
    print(f"  {'runner':7s} {'part':30s} {'µs':>10s}  {'of a 5 ms inference':>20s}  iterations")
    for runner, part, stats in rows:
        us = stats["p50"] * 1e3
        print(f"  {runner:7s} {part:30s} {us:10.2f}  {us / (INFERENCE_MS * 1e3):20.3%}  {stats['count']:.0f}")
    # like for like: what each loop adds around the engine's own work (C++: the three API calls; Python: the
    # engine call, its pre and post are real work a C++ deployment does too, on the host or after the loop)
    cc_us, py_us, py_all = (cc["total"]["p50"] * 1e3, py["infer"]["p50"] * 1e3, py["total"]["p50"] * 1e3)
    share = lambda us: us / (INFERENCE_MS * 1e3)  # noqa: E731
    print(f"Around the engine call: the C++ runner adds {cc_us:.2f} µs = {share(cc_us):.3%} of a {INFERENCE_MS:g} ms "
          f"inference (goal < 1%: {'met' if share(cc_us) < 0.01 else 'NOT met'}); the Python runner adds {py_us:.1f} µs "
          f"= {share(py_us):.2%} (its whole loop with letterbox and decode + NMS: {py_all:.0f} µs = {share(py_all):.0%})")
    zc_us = (zc["input_copy"]["p50"] + zc["output_read"]["p50"]) * 1e3
    print(f"Zero-copy io memory vs the normal path (float outputs), the runner's own work around rknn_run: "
          f"{zc_us:.2f} µs (input_copy + output_read: memcpy into and out of the io memory) vs {cc_us:.2f} µs "
          f"(three API calls) = {share(zc_us):.3%} vs {share(cc_us):.3%} of a {INFERENCE_MS:g} ms inference. On the "
          "normal path the copies happen inside librknnrt (the NULL stand-in skips them, so they are not in this "
          "number); on a board the io memory is the NPU's own DMA buffer")
    return 0


if __name__ == "__main__":
    sys.exit(main())
