"""Post-processing cost per image for 640 px YOLOv8 outputs (80 classes), both head layouts, side by side.

    python bench/bench_postprocess.py [--runs 50] [--size 640] [--classes 80]

Decode + select (confidence filter, per-class NMS) on realistic score statistics: most anchors near zero,
a few hundred above the 0.001 evaluation threshold. Prints median ms/image and the ratio between heads."""

from __future__ import annotations

import argparse
import platform
import time

import numpy as np

from rkbench.models import prepost
from rkbench.stats import summarize


def outputs(size: int, nc: int, rng: np.random.Generator) -> tuple[list[np.ndarray], np.ndarray]:
    """Matching rknn-head outputs and official-head output for the same random predictions."""
    rknn = []
    for stride in (8, 16, 32):
        h = w = size // stride
        dist = rng.normal(0, 2, (1, 64, h, w)).astype(np.float32)
        # Like a trained model: almost every score under the 0.001 eval threshold, ~2000 candidates above.
        cls = (rng.random((1, nc, h, w)) * 1e-3).astype(np.float32)
        flat = cls.reshape(nc, -1)
        hot = rng.choice(h * w, size=max(1, 2000 * h * w // 8400), replace=False)
        flat[rng.integers(0, nc, hot.size), hot] = rng.random(hot.size) ** 3
        rknn += [dist, cls, np.clip(cls.sum(1, keepdims=True), 0, 1)]
    b, s = prepost.decode_rknn_head(rknn, nc)
    xywh = np.concatenate([(b[:, :2] + b[:, 2:]) / 2, b[:, 2:] - b[:, :2]], 1)
    official = np.concatenate([xywh, s], 1).T[None].astype(np.float32)
    return rknn, official


def bench(fn, runs: int) -> dict[str, float]:
    fn()  # warmup
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return summarize(times)


def measure(runs: int = 50, size: int = 640, classes: int = 80) -> list[str]:
    """Both heads side by side; returns the lines to print."""
    rknn, official = outputs(size, classes, np.random.default_rng(0))
    r = bench(lambda: prepost.select(*prepost.decode_rknn_head(rknn, classes), 0.001, 0.7, 300), runs)
    u = bench(lambda: prepost.select(*prepost.decode_ultralytics_head(official), 0.001, 0.7, 300), runs)
    return [
        f"post-processing, {size} px, {classes} classes, {official.shape[-1]} anchors, median of {runs} runs on "
        f"{platform.processor() or platform.machine()} (host CPU)",
        f"rknn head (DFL + decode + select):     p50 {r['p50']:7.2f} ms/image  (p90 {r['p90']:.2f}, cv {r['cv']:.2f})",
        f"official head (decode + select):      p50 {u['p50']:7.2f} ms/image  (p90 {u['p90']:.2f}, cv {u['cv']:.2f})",
        f"ratio rknn/official: {r['p50'] / u['p50']:.2f}x (the price of doing DFL on the CPU)",
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=50)
    ap.add_argument("--size", type=int, default=640)
    ap.add_argument("--classes", type=int, default=80)
    args = ap.parse_args()
    print("\n".join(measure(args.runs, args.size, args.classes)))


if __name__ == "__main__":
    main()
