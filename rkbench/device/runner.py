#!/usr/bin/env python3
"""The on-device runner: one file pushed to the board beside prepost.py and backends.py, run with the
board's Python (3.8+), writing one JSON result file.

    python3 runner.py --mode latency --model m.rknn --size 640 --out result.json [options]

Modes: latency (pre / infer / post timed apart), eval (COCO detections of an images list), throughput
(a pool of workers, one runtime per NPU core, frames re-ordered), tiling (a large frame cut into
overlapping model-size tiles). While measuring, a thread samples the NPU load (debugfs), the CPU load
(/proc/stat) and the runner's resident memory.

The result is written to <out>.tmp and renamed, and carries "complete": true only when the run got to the
end: a missing, half-written or incomplete file is how the caller tells a killed runner from a result.
On failure the exit status is non-zero and stderr ends with one line `runner: error: ...`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import queue
import re
import socket
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

# The pushed copies (on PYTHONPATH / beside this file) win over an installed rkbench, so a board run
# always uses the exact pre/post-processing that was deployed with it.
try:
    import prepost  # type: ignore[no-redef]
except ImportError:  # run from the rkbench package on the host
    from rkbench.models import prepost
try:
    import backends  # type: ignore[no-redef]
except ImportError:
    from rkbench.runtimes import backends
try:
    import stats  # type: ignore[no-redef]
except ImportError:
    from rkbench import stats

RUNNER_VERSION = "1"
SCHEMA_VERSION = 1
MODES = ("latency", "eval", "throughput", "tiling")
MAX_DISTINCT_FRAMES = 16     # throughput keeps this many decoded images in memory and cycles them
NPU_LOAD = "/sys/kernel/debug/rknpu/load"


class RunnerError(Exception):
    """Bad input to the runner; the message names the fix."""


# ---------------------------------------------------------------------------------------------- inputs

def parse_floats(text: str, count: int, what: str) -> Tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise RunnerError(f"{what} {text!r} is not a comma-separated list of numbers: e.g. 0,0,0") from None
    if len(values) != count:
        raise RunnerError(f"{what} {text!r} needs {count} values: e.g. {','.join(['0'] * count)}")
    return values


def parse_wxh(text: str) -> Tuple[int, int]:
    m = re.fullmatch(r"(\d+)x(\d+)", text.strip())
    if not m:
        raise RunnerError(f"frame size {text!r} is not WIDTHxHEIGHT: e.g. 1920x1080")
    return int(m.group(1)), int(m.group(2))


def parse_shapes(text: str) -> List[Tuple[int, ...]]:
    """'1x64x80x80,1x80x80x80' -> [(1, 64, 80, 80), (1, 80, 80, 80)]."""
    try:
        return [tuple(int(d) for d in s.split("x")) for s in text.split(",") if s.strip()]
    except ValueError:
        raise RunnerError(f"output shapes {text!r} malformed: use e.g. 1x64x80x80,1x80x80x80,1x1x80x80") from None


def read_images_file(path: str) -> List[Tuple[int, str]]:
    """Lines `image_id<TAB>path`; relative paths are relative to the images file."""
    if not os.path.isfile(path):
        raise RunnerError(f"images file {path} not found: push it with the images (lines: image_id<TAB>path)")
    base = os.path.dirname(os.path.abspath(path))
    items = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            line = line.rstrip("\n")
            if not line.strip():
                continue
            parts = line.split("\t")
            if len(parts) != 2 or not parts[0].strip().lstrip("-").isdigit():
                raise RunnerError(f"{path}:{lineno}: expected image_id<TAB>path, got {line!r}: fix the images file")
            items.append((int(parts[0]), os.path.join(base, parts[1])))
    if not items:
        raise RunnerError(f"images file {path} lists no images: write one image_id<TAB>path line per image")
    return items


def read_category_ids(text: Optional[str]) -> Optional[List[int]]:
    """'1,2,3' or '@file.json' (a JSON list) -> category id of each class index."""
    if not text:
        return None
    try:
        if text.startswith("@"):
            with open(text[1:], encoding="utf-8") as f:
                return [int(v) for v in json.load(f)]
        return [int(v) for v in text.split(",")]
    except (OSError, ValueError, TypeError) as exc:
        raise RunnerError(f"category ids {text!r} unreadable ({exc}): pass 1,2,3 or @ids.json holding a list") from None


def read_anchors(path: Optional[str]) -> Optional[np.ndarray]:
    if not path:
        return None
    try:
        with open(path, encoding="utf-8") as f:
            return np.asarray(json.load(f), dtype=np.float32).reshape(3, -1, 2)
    except (OSError, ValueError) as exc:
        raise RunnerError(f"anchors {path} unreadable ({exc}): write a JSON list of 3 scales x na x (w, h) pixels") from None


# ----------------------------------------------------------------------------------------- statistics

summarize = stats.summarize  # one definition of the statistics, shared with the host


PARTS = ("pre", "infer", "post")


def part_stats(rows: Sequence[Tuple[float, float, float]]) -> Dict[str, Any]:
    """Per-iteration (pre, infer, post) seconds -> stats in ms per part and for their sum, plus the samples."""
    ms = {p: [r[i] * 1e3 for r in rows] for i, p in enumerate(PARTS)}
    ms["total"] = [sum(r) * 1e3 for r in rows]
    out: Dict[str, Any] = {p: summarize(v) for p, v in ms.items()}
    out["samples_ms"] = {p: [round(x, 4) for x in v] for p, v in ms.items()}
    return out


# ------------------------------------------------------------------------------------- the model path

@dataclass
class Decoder:
    """Raw outputs of one image -> candidate boxes (model pixels) and per-class scores."""

    head: str                       # rknn | ultralytics | yolov5
    size: int
    num_classes: Optional[int]      # None: read from the first outputs
    reg_max: int = 16
    anchors: Optional[np.ndarray] = None

    def classes_in(self, outputs: List[np.ndarray]) -> int:
        if self.head == "rknn":
            return int(outputs[1].shape[1])        # per scale: box, cls [1, nc, H, W], sum
        if self.head == "ultralytics":
            return int(outputs[0].shape[1]) - 4    # [1, 4 + nc, A]
        assert self.anchors is not None
        return int(outputs[0].shape[1]) // self.anchors.shape[1] - 5

    def __call__(self, outputs: List[np.ndarray]) -> Tuple[np.ndarray, np.ndarray]:
        if self.num_classes is None:
            self.num_classes = self.classes_in(outputs)
        if self.head == "rknn":
            return prepost.decode_rknn_head(outputs, self.num_classes, self.reg_max)
        if self.head == "ultralytics":
            return prepost.decode_ultralytics_head(outputs[0])
        assert self.anchors is not None
        return prepost.decode_yolov5(outputs, self.anchors, self.num_classes, self.size)


@dataclass
class Pipeline:
    """letterbox -> runtime.infer -> decode -> select -> to_original, the same steps as the host's evaluate."""

    runtime: Any
    decoder: Decoder
    size: int
    batch: int
    conf: float
    iou: float
    max_det: int

    def prepare(self, images: List[np.ndarray]) -> Tuple[np.ndarray, list]:
        """Letterboxed batch of exactly `batch` frames (the last repeated to fill) and their letterbox infos."""
        boxed, infos = [], []
        for img in images:
            b, info = prepost.letterbox(img, self.size)
            boxed.append(b)
            infos.append(info)
        boxed += [boxed[-1]] * (self.batch - len(boxed))
        return np.stack(boxed), infos

    def detect(self, outputs: List[np.ndarray], i: int, info: Any, width: int, height: int
               ) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Detections of image i of the batch, in its original pixels (xyxy, score, class)."""
        boxes, scores = self.decoder([o[i:i + 1] for o in outputs])
        boxes, conf, cls = prepost.select(boxes, scores, self.conf, self.iou, self.max_det)
        return prepost.to_original(boxes, info, width, height), conf, cls


def coco_records(image_id: int, boxes: np.ndarray, scores: np.ndarray, classes: np.ndarray,
                 category_ids: Sequence[int]) -> List[dict]:
    return [{"image_id": image_id, "category_id": int(category_ids[int(c)]),
             "bbox": [round(x1, 2), round(y1, 2), round(x2 - x1, 2), round(y2 - y1, 2)], "score": round(float(s), 5)}
            for (x1, y1, x2, y2), s, c in zip(boxes.tolist(), scores.tolist(), classes.tolist())]


class Frames:
    """Where frames come from: images on disk (cycled) or one synthetic frame held in memory."""

    def __init__(self, items: List[Tuple[int, str]], synthetic: Optional[np.ndarray] = None):
        self.items = items
        self.synthetic = synthetic

    @classmethod
    def from_args(cls, args: argparse.Namespace, synthetic_wh: Tuple[int, int]) -> "Frames":
        if args.image:
            return cls([(0, args.image)])
        if args.images:
            return cls(read_images_file(args.images))
        w, h = synthetic_wh   # deterministic noise: the model path runs in full, no file to push
        return cls([], np.random.default_rng(0).integers(0, 256, (h, w, 3), dtype=np.uint8))

    def __len__(self) -> int:
        return len(self.items) if self.items else 1

    def describe(self) -> str:
        if self.synthetic is not None:
            return f"synthetic {self.synthetic.shape[1]}x{self.synthetic.shape[0]} (in memory, no load)"
        return f"{len(self.items)} image(s) from disk, cycled"

    def load(self, k: int) -> Tuple[int, np.ndarray]:
        """Frame k (cycling): image id and RGB pixels. A synthetic frame is copied, as a decode would allocate."""
        if self.synthetic is not None:
            return 0, self.synthetic.copy()
        image_id, path = self.items[k % len(self.items)]
        return image_id, prepost.load_rgb(path)


def timed_loop(step: Callable[[int], Tuple[Tuple[float, float, float], int]], warmup: int, iterations: int,
               min_seconds: float) -> Tuple[List[Tuple[float, float, float]], List[int], float]:
    """`warmup` untimed steps, then at least `iterations` steps AND at least `min_seconds`."""
    for k in range(warmup):
        step(k)
    rows, counts = [], []
    start = time.perf_counter()
    k = 0
    while k < iterations or time.perf_counter() - start < min_seconds:
        parts, n = step(warmup + k)
        rows.append(parts)
        counts.append(n)
        k += 1
    return rows, counts, time.perf_counter() - start


# ------------------------------------------------------------------------------------------- sampling

def parse_npu_load(text: str) -> Dict[str, float]:
    """'NPU load:  Core0: 12%, Core1:  0%, Core2:  0%,' -> {'0': 12, '1': 0, '2': 0}; single-core 'NPU load: 5%'."""
    cores = re.findall(r"Core(\d+):\s*(\d+(?:\.\d+)?)%", text)
    if cores:
        return {c: float(p) for c, p in cores}
    m = re.search(r"(\d+(?:\.\d+)?)%", text)
    if m:
        return {"0": float(m.group(1))}
    raise ValueError(f"no percentages in {text.strip()!r}")


def read_text(path: str) -> Tuple[Optional[str], str]:
    """(content, '') or (None, why it could not be read)."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read(), ""
    except FileNotFoundError:
        return None, f"missing: {path}"
    except PermissionError:
        return None, f"permission denied: {path} (debugfs needs root)"
    except OSError as exc:
        return None, f"unreadable: {path} ({exc.strerror})"


def cpu_times() -> Optional[Tuple[int, int]]:
    """(busy, total) jiffies of all CPUs from /proc/stat, None where there is none."""
    text, _ = read_text("/proc/stat")
    if not text or not text.startswith("cpu "):
        return None
    values = [int(v) for v in text.splitlines()[0].split()[1:]]
    idle = values[3] + (values[4] if len(values) > 4 else 0)   # idle + iowait
    return sum(values) - idle, sum(values)


def peak_rss_mib() -> Tuple[Optional[float], str]:
    text, _ = read_text("/proc/self/status")
    m = re.search(r"^VmHWM:\s*(\d+)\s*kB", text or "", re.M)
    if m:
        return int(m.group(1)) / 1024, "VmHWM"
    try:
        import resource
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "getrusage"   # kB on Linux
    except (ImportError, OSError):
        return None, "unavailable"


class SystemSampler:
    """A thread sampling NPU load per core, CPU load and RSS while a measurement runs. Missing sources are
    recorded with the reason, never fatal."""

    def __init__(self, sysfs_root: str, interval: float):
        self.npu_path = board_path(sysfs_root, NPU_LOAD)
        self.interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sampler", daemon=True)
        self._npu: Dict[str, List[float]] = {}
        self._npu_problem = ""
        self._cpu: List[float] = []
        self._rss: List[float] = []
        self._last_cpu: Optional[Tuple[int, int]] = None
        self.samples = 0

    def __enter__(self) -> "SystemSampler":
        self._last_cpu = cpu_times()   # CPU load counts from here: model loading and warmup stay out
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while True:
            self.sample()
            if self._stop.wait(self.interval):
                self.sample()   # a last sample at the end: short runs still get one CPU delta
                return

    def sample(self) -> None:
        self.samples += 1
        text, why = read_text(self.npu_path)
        if text is None:
            self._npu_problem = why
        else:
            try:
                for core, pct in parse_npu_load(text).items():
                    self._npu.setdefault(core, []).append(pct)
            except ValueError as exc:
                self._npu_problem = f"unparsable: {self.npu_path} ({exc})"
        now = cpu_times()
        if now is not None and self._last_cpu is not None and now[1] > self._last_cpu[1]:
            self._cpu.append(100.0 * (now[0] - self._last_cpu[0]) / (now[1] - self._last_cpu[1]))
        self._last_cpu = now
        status, _ = read_text("/proc/self/status")
        m = re.search(r"^VmRSS:\s*(\d+)\s*kB", status or "", re.M)
        if m:
            self._rss.append(int(m.group(1)) / 1024)

    def result(self) -> Dict[str, Any]:
        if self._npu:
            npu: Dict[str, Any] = {"available": True, "path": self.npu_path,
                                   "per_core": {c: {"mean_pct": float(np.mean(v)), "max_pct": float(np.max(v)),
                                                    "samples": len(v)} for c, v in sorted(self._npu.items())}}
        else:
            npu = {"available": False, "path": self.npu_path, "reason": self._npu_problem or "no samples"}
        cpu: Dict[str, Any] = ({"available": True, "mean_pct": float(np.mean(self._cpu)), "max_pct": float(np.max(self._cpu)),
                                "samples": len(self._cpu)} if self._cpu
                               else {"available": False, "reason": "no /proc/stat deltas"})
        peak, source = peak_rss_mib()
        return {"interval_s": self.interval, "samples": self.samples, "npu_load": npu, "cpu_load": cpu,
                "memory": {"peak_rss_mib": peak, "source": source,
                           "rss_mib_max_sampled": max(self._rss) if self._rss else None}}


# ------------------------------------------------------------------------------------------------ modes

def run_latency(args: argparse.Namespace, pipe: Pipeline, sampler: SystemSampler) -> Dict[str, Any]:
    frames = Frames.from_args(args, (1280, 720))

    def step(k: int) -> Tuple[Tuple[float, float, float], int]:
        t0 = time.perf_counter()
        images = [frames.load(k * pipe.batch + j)[1] for j in range(pipe.batch)]
        x, infos = pipe.prepare(images)
        t1 = time.perf_counter()
        outputs = pipe.runtime.infer(x)
        t2 = time.perf_counter()
        n = sum(len(pipe.detect(outputs, j, info, img.shape[1], img.shape[0])[0])
                for j, (img, info) in enumerate(zip(images, infos)))
        return (t1 - t0, t2 - t1, time.perf_counter() - t2), n

    with sampler:
        rows, counts, seconds = timed_loop(step, args.warmup, args.iterations, args.min_seconds)
    out = {"unit": "ms", "per": f"iteration of batch {pipe.batch}", "batch": pipe.batch, "warmup": args.warmup,
           "iterations": len(rows), "timed_s": seconds, "source": frames.describe(),
           "fps": pipe.batch * len(rows) / sum(sum(r) for r in rows),
           "detections_per_iteration": summarize(counts)}
    out.update(part_stats(rows))
    return out


def run_eval(args: argparse.Namespace, pipe: Pipeline, category_ids: Optional[List[int]]) -> Dict[str, Any]:
    if not args.images:
        raise RunnerError("--mode eval needs --images FILE (lines: image_id<TAB>path)")
    items = read_images_file(args.images)
    detections: List[dict] = []
    rows = []
    for start in range(0, len(items), pipe.batch):
        chunk = items[start:start + pipe.batch]
        t0 = time.perf_counter()
        images = [prepost.load_rgb(path) for _, path in chunk]
        x, infos = pipe.prepare(images)
        t1 = time.perf_counter()
        outputs = pipe.runtime.infer(x)
        t2 = time.perf_counter()
        for j, ((image_id, _), img, info) in enumerate(zip(chunk, images, infos)):
            boxes, scores, classes = pipe.detect(outputs, j, info, img.shape[1], img.shape[0])
            if category_ids is None:
                category_ids = list(range(pipe.decoder.num_classes or 0))
            if classes.size and int(classes.max()) >= len(category_ids):
                raise RunnerError(f"class index {int(classes.max())} has no category id ({len(category_ids)} given): "
                                  "pass --category-ids with one id per model class")
            detections.extend(coco_records(image_id, boxes, scores, classes, category_ids))
        rows.append((t1 - t0, t2 - t1, time.perf_counter() - t2))
    path = args.detections or os.path.splitext(args.out)[0] + ".detections.json"
    write_json_atomic(path, detections)
    out = {"images": len(items), "detections": len(detections), "detections_file": path, "batch": pipe.batch,
           "unit": "ms", "per": f"batch of {pipe.batch}"}
    out.update(part_stats(rows))
    return out


class Reorderer:
    """Releases results in frame order: early arrivals wait until every frame before them is done."""

    def __init__(self) -> None:
        self.next = 0
        self.held: Dict[int, Any] = {}
        self.early_arrivals = 0
        self.max_held = 0

    def push(self, index: int, item: Any) -> List[Tuple[int, Any]]:
        if index != self.next:
            self.early_arrivals += 1
        self.held[index] = item
        self.max_held = max(self.max_held, len(self.held))
        ready = []
        while self.next in self.held:
            ready.append((self.next, self.held.pop(self.next)))
            self.next += 1
        return ready


def _worker(wid: int, pipe: Pipeline, warm: np.ndarray, warmup: int, barrier: threading.Barrier,
            jobs: "queue.Queue", results: "queue.Queue") -> None:
    """Warm up, wait for the start, then letterbox + infer + decode + select jobs until a None arrives."""
    try:
        x, _ = pipe.prepare([warm])
        for _ in range(warmup):
            pipe.runtime.infer(x)
        barrier.wait()
        while True:
            job = jobs.get()
            if job is None:
                return
            t0 = time.perf_counter()
            x, infos = pipe.prepare([img for _, img in job])
            outputs = pipe.runtime.infer(x)
            counts = [len(pipe.detect(outputs, j, info, img.shape[1], img.shape[0])[0])
                      for j, ((_, img), info) in enumerate(zip(job, infos))]
            busy = time.perf_counter() - t0
            for (index, _), n in zip(job, counts):
                results.put((index, wid, n, busy / len(job)))
    except threading.BrokenBarrierError:
        return   # another worker failed its warmup and reported why
    except BaseException as exc:  # noqa: BLE001 - reported to the main thread, which raises it
        barrier.abort()
        results.put((-1, wid, f"{type(exc).__name__}: {exc}", 0.0))


def run_throughput(args: argparse.Namespace, pipes: List[Pipeline], masks: List[str], sampler: SystemSampler
                   ) -> Dict[str, Any]:
    """Frames in order through a queue to one worker per runtime (per core mask); results re-ordered."""
    frames = Frames.from_args(args, (1280, 720))
    distinct = [frames.load(i)[1] for i in range(min(len(frames), MAX_DISTINCT_FRAMES, args.frames))]
    batch = pipes[0].batch
    jobs: "queue.Queue" = queue.Queue(maxsize=2 * len(pipes))
    results: "queue.Queue" = queue.Queue()
    barrier = threading.Barrier(len(pipes) + 1)
    abort = threading.Event()
    enqueued: Dict[int, float] = {}
    workers = [threading.Thread(target=_worker, args=(w, p, distinct[0], args.warmup, barrier, jobs, results),
                                name=f"worker{w}", daemon=True) for w, p in enumerate(pipes)]

    def feed() -> None:   # frames in order, `batch` consecutive frames per job; the bounded queue paces it
        for start in range(0, args.frames, batch):
            if abort.is_set():
                return
            job = [(i, distinct[i % len(distinct)]) for i in range(start, min(start + batch, args.frames))]
            now = time.perf_counter()
            for i, _ in job:
                enqueued[i] = now
            jobs.put(job)
        for _ in workers:
            jobs.put(None)

    def fail(wid: int, message: str) -> RunnerError:
        """Stop feeding, let every worker leave (so no runtime is closed under a running inference)."""
        abort.set()
        while True:
            try:
                jobs.get_nowait()
            except queue.Empty:
                break
        for _ in workers:
            jobs.put(None)
        for t in workers:
            t.join(timeout=30)
        return RunnerError(f"worker {wid} (core mask {masks[wid]}) failed: {message}")

    for t in workers:
        t.start()
    try:
        barrier.wait()
    except threading.BrokenBarrierError:
        _, wid, message, _ = results.get()
        raise fail(wid, f"in warmup: {message}") from None
    reorder = Reorderer()
    per_worker = [{"core_mask": m, "frames": 0, "busy_s": 0.0} for m in masks]
    frame_detections: List[int] = []
    released: List[int] = []
    latency_ms: List[float] = []
    feeder = threading.Thread(target=feed, name="feeder", daemon=True)
    with sampler:
        start = time.perf_counter()
        feeder.start()
        while len(released) < args.frames:
            index, wid, n, busy = results.get()
            if index < 0:
                raise fail(wid, n)
            per_worker[wid]["frames"] += 1
            per_worker[wid]["busy_s"] += busy
            for i, count in reorder.push(index, n):
                released.append(i)
                frame_detections.append(count)
                latency_ms.append((time.perf_counter() - enqueued[i]) * 1e3)
        wall = time.perf_counter() - start
    feeder.join()
    for t in workers:
        t.join()
    for w in per_worker:
        w["share"] = w["frames"] / args.frames
    return {"workers": per_worker, "frames": args.frames, "batch": batch, "warmup_per_worker": args.warmup,
            "wall_s": wall, "fps": args.frames / wall, "distinct_images": len(distinct),
            "source": frames.describe() + " (decoded before the clock starts)",
            "in_order": released == list(range(args.frames)), "early_arrivals": reorder.early_arrivals,
            "max_reorder_held": reorder.max_held, "frame_detections": frame_detections,
            "frame_latency_ms": summarize(latency_ms)}


def run_tiling(args: argparse.Namespace, pipe: Pipeline, sampler: SystemSampler) -> Dict[str, Any]:
    frames = Frames.from_args(args, parse_wxh(args.frame_size))
    last: Dict[str, Any] = {}

    def step(k: int) -> Tuple[Tuple[float, float, float], int]:
        t0 = time.perf_counter()
        _, frame = frames.load(k)
        height, width = frame.shape[:2]
        origins = prepost.tiles(width, height, pipe.size, args.overlap)
        crops = [frame[y:y + pipe.size, x:x + pipe.size] for x, y in origins]
        batches = [pipe.prepare(crops[s:s + pipe.batch]) for s in range(0, len(crops), pipe.batch)]
        t1 = time.perf_counter()
        outputs = [pipe.runtime.infer(x) for x, _ in batches]
        t2 = time.perf_counter()
        per_tile = []
        for b, (outs, (_, infos)) in enumerate(zip(outputs, batches)):
            for j, info in enumerate(infos):
                crop = crops[b * pipe.batch + j]
                per_tile.append(pipe.detect(outs, j, info, crop.shape[1], crop.shape[0]))
        boxes, scores, classes = prepost.merge_tiles(per_tile, origins, pipe.iou)
        t3 = time.perf_counter()
        last.update(frame=[width, height], origins=[[int(x), int(y)] for x, y in origins],
                    detections=[{"bbox": [round(x1, 2), round(y1, 2), round(x2 - x1, 2), round(y2 - y1, 2)],
                                 "score": round(float(s), 5), "class": int(c)}
                                for (x1, y1, x2, y2), s, c in zip(np.asarray(boxes).tolist(), np.asarray(scores).tolist(),
                                                                  np.asarray(classes).tolist())])
        return (t1 - t0, t2 - t1, t3 - t2), len(last["detections"])

    with sampler:
        rows, counts, seconds = timed_loop(step, args.warmup, args.iterations, args.min_seconds)
    out = {"unit": "ms", "per": "frame", "frame": last["frame"], "tile": pipe.size, "overlap": args.overlap,
           "tiles_per_frame": len(last["origins"]), "tile_origins": last["origins"], "batch": pipe.batch,
           "warmup": args.warmup, "frames": len(rows), "timed_s": seconds, "source": frames.describe(),
           "fps": len(rows) / sum(sum(r) for r in rows), "detections_per_frame": summarize(counts),
           "last_frame_detections": last["detections"]}
    out.update(part_stats(rows))
    return out


# ------------------------------------------------------------------------------------------ environment

def board_path(sysfs_root: str, path: str) -> str:
    return os.path.join(sysfs_root, path.lstrip("/")) if sysfs_root else path


def _first_line(sysfs_root: str, path: str) -> Optional[str]:
    text, _ = read_text(board_path(sysfs_root, path))
    return text.strip() if text is not None else None


def board_facts(sysfs_root: str) -> Dict[str, Any]:
    """Device tree, NPU driver, devfreq and cpufreq state at measurement time (None where absent)."""
    compat, _ = read_text(board_path(sysfs_root, "/proc/device-tree/compatible"))
    facts: Dict[str, Any] = {"compatible": [c for c in compat.split("\0") if c] if compat else None,
                             "rknpu_version": _first_line(sysfs_root, "/sys/kernel/debug/rknpu/version"),
                             "devfreq": {}, "cpufreq": {}}
    for group, base, names in (("devfreq", "/sys/class/devfreq", ("cur_freq", "governor")),
                               ("cpufreq", "/sys/devices/system/cpu/cpufreq", ("scaling_cur_freq", "scaling_governor"))):
        directory = board_path(sysfs_root, base)
        entries = sorted(os.listdir(directory)) if os.path.isdir(directory) else []
        for entry in entries:
            facts[group][entry] = {n: _first_line(sysfs_root, f"{base}/{entry}/{n}") for n in names}
    return facts


def versions() -> Dict[str, Optional[str]]:
    cv2 = sys.modules.get("cv2")
    return {"runner": RUNNER_VERSION, "python": platform.python_version(), "numpy": np.__version__,
            "opencv": getattr(cv2, "__version__", None),
            "onnxruntime": backends.dist_version("onnxruntime"),
            "rknnlite": backends.dist_version("rknn-toolkit-lite2") or backends.dist_version("rknn_toolkit_lite2")}


def file_facts(path: str) -> Dict[str, Any]:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return {"path": path, "bytes": os.path.getsize(path), "sha256": digest.hexdigest()}


class ResultError(RunnerError):
    """A result file the caller cannot trust: missing, truncated, or written by a failed run."""


def load_result(path: str) -> Dict[str, Any]:
    """The caller's side: a complete result, or ResultError saying what went wrong on the board."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        raise ResultError(f"no result file {path}: the runner was killed or the disk is full; read its stderr") from None
    try:
        result = json.loads(text)
    except ValueError:
        raise ResultError(f"result file {path} is truncated ({len(text)} bytes): pull it again or re-run") from None
    if not isinstance(result, dict) or result.get("complete") is not True:
        error = result.get("error") if isinstance(result, dict) else None
        raise ResultError(f"runner did not complete: {error or 'no error recorded'}")
    return result


def write_json_atomic(path: str, obj: Any) -> None:
    """Write to path.tmp, fsync, rename: a reader sees the whole file or none."""
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# ------------------------------------------------------------------------------------------------- main

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="runner.py", description="rkbench on-device runner: one mode, one JSON result.")
    p.add_argument("--mode", required=True, choices=MODES)
    p.add_argument("--model", required=True, help=".rknn (rknnlite) or .onnx (onnxruntime, null)")
    p.add_argument("--out", required=True, help="result JSON (written to OUT.tmp, then renamed)")
    p.add_argument("--runtime", default="rknnlite", choices=backends.RUNTIME_KINDS)
    p.add_argument("--where", default="board", choices=("board", "emulator", "host"), help="recorded as is")
    p.add_argument("--size", type=int, required=True, help="model input size (square, pixels)")
    p.add_argument("--batch", type=int, default=1, help="the model's batch dimension (rknn_batch_size)")
    p.add_argument("--head", default="rknn", choices=("rknn", "ultralytics", "yolov5"))
    p.add_argument("--num-classes", type=int, default=None, help="default: from --category-ids or the outputs")
    p.add_argument("--reg-max", type=int, default=16)
    p.add_argument("--anchors", default=None, help="yolov5: JSON file, 3 scales x na x (w, h) in pixels")
    p.add_argument("--mean", default="0,0,0", help="onnxruntime only (a .rknn has it folded in)")
    p.add_argument("--std", default="255,255,255", help="onnxruntime only")
    p.add_argument("--core-mask", default="auto", choices=backends.CORE_MASKS, help="rknnlite (latency/eval/tiling)")
    p.add_argument("--threads", type=int, default=0, help="onnxruntime intra-op threads (0 = its default)")
    p.add_argument("--output-shapes", default=None, help="null runtime without an .onnx: 1x64x80x80,1x80x80x80,...")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--iterations", type=int, default=50, help="latency/tiling: at least this many")
    p.add_argument("--min-seconds", type=float, default=2.0, help="latency/tiling: and at least this long")
    p.add_argument("--image", default=None, help="one image (latency/throughput/tiling)")
    p.add_argument("--images", default=None, help="file of image_id<TAB>path lines (eval; others cycle it)")
    p.add_argument("--category-ids", default=None, help="category id per class index: 1,2,3 or @ids.json")
    p.add_argument("--conf", type=float, default=0.001)
    p.add_argument("--iou", type=float, default=0.7)
    p.add_argument("--max-det", type=int, default=300)
    p.add_argument("--detections", default=None, help="eval output (default: OUT with .detections.json)")
    p.add_argument("--cores", default="auto", help="throughput: core masks, one worker each, e.g. 0,1,2")
    p.add_argument("--frames", type=int, default=100, help="throughput: frames through the pool")
    p.add_argument("--frame-size", default="1920x1080", help="tiling: synthetic frame size without --image(s)")
    p.add_argument("--overlap", type=float, default=0.2, help="tiling: tile overlap fraction")
    p.add_argument("--sysfs-root", default=os.environ.get("RKBENCH_BOARD_ROOT", ""),
                   help="prefix for /sys and /proc/device-tree reads (default $RKBENCH_BOARD_ROOT)")
    p.add_argument("--sample-interval", type=float, default=0.2, help="seconds between system samples")
    return p


def check_args(args: argparse.Namespace) -> None:
    if args.size <= 0 or args.batch <= 0:
        raise RunnerError("--size and --batch must be positive")
    if args.warmup < 0 or args.iterations < 1 or args.frames < 1:
        raise RunnerError("--warmup must be >= 0, --iterations and --frames >= 1")
    if args.head == "yolov5" and not args.anchors:
        raise RunnerError("--head yolov5 needs --anchors FILE (the checkpoint's anchors, JSON)")
    if not os.path.isfile(args.model):
        raise RunnerError(f"model {args.model} not found: push it first")


def run(args: argparse.Namespace) -> Dict[str, Any]:
    check_args(args)
    mean = parse_floats(args.mean, 3, "--mean")
    std = parse_floats(args.std, 3, "--std")
    category_ids = read_category_ids(args.category_ids)
    anchors = read_anchors(args.anchors)
    shapes = parse_shapes(args.output_shapes) if args.output_shapes else None
    num_classes = args.num_classes or (len(category_ids) if category_ids else None)

    def make(core_mask: str) -> Any:
        return backends.make_runtime(args.runtime, args.model, mean=mean, std=std, core_mask=core_mask,
                                     where=args.where, threads=args.threads, output_shapes=shapes)

    def pipe_for(runtime: Any) -> Pipeline:
        return Pipeline(runtime, Decoder(args.head, args.size, num_classes, args.reg_max, anchors),
                        args.size, args.batch, args.conf, args.iou, args.max_det)

    sampler = SystemSampler(args.sysfs_root, args.sample_interval)
    result: Dict[str, Any] = {"mode": args.mode, "where": args.where, "board": board_facts(args.sysfs_root)}
    masks = [m.strip() for m in args.cores.split(",") if m.strip()] if args.mode == "throughput" else [args.core_mask]
    if not masks:
        raise RunnerError("--cores is empty: pass core masks, one worker each, e.g. 0,1,2")
    runtimes: List[Any] = []
    try:
        for mask in masks:   # one runtime per worker: each RKNNLite context bound to its own core(s)
            runtimes.append(make(mask))
        result["runtime"] = {"kind": args.runtime, "version": runtimes[0].version(), "core_masks": masks,
                             "threads": args.threads}
        pipes = [pipe_for(r) for r in runtimes]
        if args.mode == "latency":
            result["latency"] = run_latency(args, pipes[0], sampler)
        elif args.mode == "eval":
            result["eval"] = run_eval(args, pipes[0], category_ids)
        elif args.mode == "tiling":
            result["tiling"] = run_tiling(args, pipes[0], sampler)
        else:
            result["throughput"] = run_throughput(args, pipes, masks, sampler)
    finally:
        for runtime in runtimes:
            runtime.close()
    if args.mode != "eval":
        result["system"] = sampler.result()
    result["model"] = file_facts(args.model)
    return result


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    started = time.time()
    header = {"schema": SCHEMA_VERSION, "complete": False, "hostname": socket.gethostname(), "where": args.where,
              "mode": args.mode, "versions": versions(), "options": vars(args),
              "modules": {"prepost": os.path.abspath(prepost.__file__), "backends": os.path.abspath(backends.__file__)},
              "started": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(started))}
    try:
        body = run(args)
    except KeyboardInterrupt:
        print("runner: error: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - one line for the caller, and a result saying it failed
        message = " ".join(f"{type(exc).__name__}: {exc}".split())
        try:
            write_json_atomic(args.out, dict(header, error=message))
        except OSError:
            pass
        print(f"runner: error: {message}", file=sys.stderr)
        return 1
    header.update(body)
    header.update(versions=versions(), complete=True, wall_s=time.time() - started,
                  finished=time.strftime("%Y-%m-%dT%H:%M:%S"))
    write_json_atomic(args.out, header)
    return 0


if __name__ == "__main__":
    sys.exit(main())
