"""Post-processing cost per image for 640 px YOLOv8 outputs (80 classes), side by side with rknn_model_zoo.

    python bench/bench_postprocess.py [--runs 50] [--size 640] [--classes 80] [--thresholds 0.25:0.45 0.001:0.65]

Rknn-head outputs with trained-model-like score statistics: almost every anchor under 0.001, ~1800
candidates above the 0.001 evaluation threshold, ~700 above 0.25. For each CONF:NMS pair (the zoo's
deployment and mAP-test settings by default) it runs rknn_model_zoo's examples/yolov8/python/yolov8.py
post_process (zoo_yolov8.py beside this file: DFL in torch as the zoo ships it, and in numpy) and rkbench's
decode_rknn_head(min_score=conf) + select() on the same outputs, checks that they return the same boxes
(select uncapped: the zoo has no max_det), and prints median ms/image and how many times faster rkbench is.
Then, as before, rkbench's rknn head (with and without min_score) against the official head's [1, 84, 8400]
output, capped at max_det 300 as evaluation runs them (the random boxes barely overlap: NMS runs to the
cap, a worst case).

Torch, OpenMP and BLAS run single-threaded unless the environment says otherwise: idle pool threads
spin-wait after each call, and on a small shared machine that time is stolen from whatever runs next."""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):  # before numpy and torch load
    os.environ.setdefault(_var, "1")

import argparse
import platform
import time
from typing import Callable

import numpy as np

import zoo_yolov8  # beside this file
from rkbench.models import prepost
from rkbench.stats import summarize

UNCAPPED = 1 << 30  # max_det that never cuts


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


def measure(runs: int = 50, size: int = 640, classes: int = 80,
            thresholds: tuple[tuple[float, float], ...] = ((0.25, 0.45), (0.001, 0.65))) -> list[str]:
    """Zoo against rkbench, then the official head, at each (conf, NMS IoU); returns the lines to print.
    Raises AssertionError when rkbench's boxes differ from the zoo's."""
    rknn, official = outputs(size, classes, np.random.default_rng(0))
    size_xy = (rknn[0].shape[3] * 8, rknn[0].shape[2] * 8)
    zoo_dfls = {"torch": zoo_yolov8.dfl_torch, "numpy": zoo_yolov8.dfl_numpy}
    try:
        import torch  # noqa: F401
    except ImportError:
        del zoo_dfls["torch"]
    lines = [f"post-processing, {size} px, {classes} classes, {official.shape[-1]} anchors, median of {runs} runs "
             f"on {platform.processor() or platform.machine()} (host CPU, OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']})"]
    row = lambda label, r: f"  {label:50s} p50 {r['p50']:6.2f} ms/image  (p90 {r['p90']:.2f}, cv {r['cv']:.2f})"  # noqa: E731
    for conf, iou in thresholds:
        def rkbench(cap: int = UNCAPPED, c: float = conf, i: float = iou):
            return prepost.select(*prepost.decode_rknn_head(rknn, classes, min_score=c), c, i, cap)

        zoo = {f"zoo_{name}": (lambda f=f, c=conf, i=iou: zoo_yolov8.post_process(rknn, c, i, f, size_xy))
               for name, f in zoo_dfls.items()}
        for name, fn in zoo.items():
            diff = zoo_yolov8.differences(fn(), *rkbench())
            assert not diff, f"conf {conf:g} / NMS {iou:g}: rkbench differs from {name}: " + "; ".join(diff)
        # two groups, each interleaved: what runs right after the zoo starts with cold caches
        t = bench({**zoo, "rkbench": rkbench}, runs)
        t.update(bench({
            "rknn_300": lambda: rkbench(300),
            "rknn_all_300": lambda c=conf, i=iou: prepost.select(*prepost.decode_rknn_head(rknn, classes), c, i, 300),
            "official_300": lambda c=conf, i=iou: prepost.select(*prepost.decode_ultralytics_head(official), c, i, 300),
        }, runs))
        ours = t["rkbench"]["p50"]
        lines.append(f"conf {conf:g} / NMS {iou:g}: {len(rkbench()[0])} boxes, the same from zoo and rkbench")
        lines += [row(f"rknn_model_zoo post_process (DFL in {name[4:]})", t[name])
                  + f"  rkbench {t[name]['p50'] / ours:.1f}x faster" for name in zoo]
        lines.append(row("rkbench decode_rknn_head(min_score=conf) + select", t["rkbench"]))
        ref = t["official_300"]["p50"]
        lines += [
            row("  max_det 300: official head (decode + select)", t["official_300"]),
            row("  max_det 300: rknn head, min_score=conf", t["rknn_300"]) + f"  {t['rknn_300']['p50'] / ref:.2f}x official",
            row("  max_det 300: rknn head, DFL on every anchor", t["rknn_all_300"])
            + f"  {t['rknn_all_300']['p50'] / ref:.2f}x official",
        ]
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=50)
    ap.add_argument("--size", type=int, default=640)
    ap.add_argument("--classes", type=int, default=80)
    ap.add_argument("--thresholds", nargs="+", default=["0.25:0.45", "0.001:0.65"], metavar="CONF:NMS",
                    help="confidence and NMS IoU thresholds (default: the zoo's deployment and mAP-test settings)")
    args = ap.parse_args()
    pairs = tuple((float(c), float(i)) for c, i in (t.split(":") for t in args.thresholds))
    print("\n".join(measure(args.runs, args.size, args.classes, pairs)))


if __name__ == "__main__":
    main()
