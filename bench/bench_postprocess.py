"""Post-processing cost per image for 640 px YOLOv8 outputs (80 classes), both head layouts, side by side.

    python bench/bench_postprocess.py [--runs 50] [--size 640] [--classes 80] [--conf 0.001 0.25]

Decode + select (confidence filter, per-class NMS) on trained-model-like score statistics: almost every
anchor under 0.001, ~1800 candidates above the 0.001 evaluation threshold, ~700 above 0.25. The random
boxes barely overlap, so NMS runs to its 300-box limit: a worst case for select. Prints median ms/image
and the ratio to the official head per threshold; the rknn head twice: DFL on every anchor, and only on
the cells its score-sum output lets through (decode_rknn_head(min_score=conf), as rknn_model_zoo does)."""

from __future__ import annotations

import argparse
import platform
import time
from typing import Callable

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
    official = np.ascontiguousarray(np.concatenate([xywh, s], 1).T[None], dtype=np.float32)  # as ORT returns it
    return rknn, official


def bench(fns: dict[str, Callable[[], object]], runs: int) -> dict[str, dict[str, float]]:
    """Time the functions interleaved (a, b, c, a, b, c, ...) so that load from other processes on a
    shared machine falls on all of them alike; one warmup call each."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for fn in fns.values():
        fn()
    for _ in range(runs):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - t0) * 1e3)
    return {name: summarize(t) for name, t in times.items()}


def measure(runs: int = 50, size: int = 640, classes: int = 80, confs: tuple[float, ...] = (0.001, 0.25)) -> list[str]:
    """Both heads side by side at each confidence threshold (0.001: mAP evaluation, 0.25: deployment);
    returns the lines to print."""
    rknn, official = outputs(size, classes, np.random.default_rng(0))
    lines = [f"post-processing (decode + select), {size} px, {classes} classes, {official.shape[-1]} anchors, "
             f"median of {runs} runs on {platform.processor() or platform.machine()} (host CPU)"]
    for conf in confs:
        candidates = int((prepost.decode_ultralytics_head(official)[1].max(1) >= conf).sum())
        t = bench({
            "rknn": lambda c=conf: prepost.select(*prepost.decode_rknn_head(rknn, classes), c, 0.7, 300),
            "rknn_skip": lambda c=conf: prepost.select(*prepost.decode_rknn_head(rknn, classes, min_score=c), c, 0.7, 300),
            "official": lambda c=conf: prepost.select(*prepost.decode_ultralytics_head(official), c, 0.7, 300),
        }, runs)
        row = lambda label, r: f"  {label:46s} p50 {r['p50']:6.2f} ms/image  (p90 {r['p90']:.2f}, cv {r['cv']:.2f})"  # noqa: E731
        ref = t["official"]["p50"]
        lines += [
            f"conf {conf:g} ({candidates} candidates, NMS to <= 300):",
            row("official head (decode + select)", t["official"]),
            row("rknn head (DFL on every anchor + select)", t["rknn"]) + f"  {t['rknn']['p50'] / ref:.2f}x official",
            row("rknn head (DFL on cells with score sum>=conf)", t["rknn_skip"]) + f"  {t['rknn_skip']['p50'] / ref:.2f}x official",
        ]
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=50)
    ap.add_argument("--size", type=int, default=640)
    ap.add_argument("--classes", type=int, default=80)
    ap.add_argument("--conf", type=float, nargs="+", default=[0.001, 0.25], help="confidence thresholds")
    args = ap.parse_args()
    print("\n".join(measure(args.runs, args.size, args.classes, tuple(args.conf))))


if __name__ == "__main__":
    main()
