"""The runner's measure modes, each over a Detector (the one detection path, rkbench.models.detect):

    latency     pre / infer / post timed apart per iteration (warmup, then >= N iterations and >= T s)
    eval        COCO detections of an images list (Detector.evaluate, as on the host)
    throughput  a pool of workers, one runtime per NPU core mask, frames re-ordered on the way out
    tiling      a large frame cut into overlapping model-size tiles, detections merged

Board-pushable: numpy and the pushed modules only."""

from __future__ import annotations

import argparse
import os
import queue
import threading
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

try:
    import prepost  # type: ignore[no-redef]  # the copy pushed beside the runner
except ImportError:  # run from the rkbench package on the host
    from rkbench.models import prepost
try:
    import stats  # type: ignore[no-redef]  # the copy pushed beside the runner
except ImportError:  # run from the rkbench package on the host
    from rkbench import stats
try:
    import runner_io  # type: ignore[no-redef]  # the copy pushed beside the runner
except ImportError:  # run from the rkbench package on the host
    from rkbench.device import runner_io
try:
    import sampling  # type: ignore[no-redef]  # the copy pushed beside the runner
except ImportError:  # run from the rkbench package on the host
    from rkbench.device import sampling

MAX_DISTINCT_FRAMES = 16     # throughput keeps this many decoded images in memory and cycles them
PARTS = ("pre", "infer", "post")
summarize = stats.summarize  # one definition of the statistics, shared with the host


def part_stats(rows: Sequence[Tuple[float, float, float]]) -> Dict[str, Any]:
    """Per-iteration (pre, infer, post) seconds -> stats in ms per part and for their sum, plus the samples."""
    ms = {p: [r[i] * 1e3 for r in rows] for i, p in enumerate(PARTS)}
    ms["total"] = [sum(r) * 1e3 for r in rows]
    out: Dict[str, Any] = {p: summarize(v) for p, v in ms.items()}
    out["samples_ms"] = {p: [round(x, 4) for x in v] for p, v in ms.items()}
    return out



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
            return cls(runner_io.read_images_file(args.images))
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



def run_latency(args: argparse.Namespace, det: Any, sampler: sampling.SystemSampler) -> Dict[str, Any]:
    frames = Frames.from_args(args, (1280, 720))

    def step(k: int) -> Tuple[Tuple[float, float, float], int]:
        t0 = time.perf_counter()
        images = [frames.load(k * det.spec.batch + j)[1] for j in range(det.spec.batch)]
        x, infos = det.prepare(images)
        t1 = time.perf_counter()
        outputs = det.runtime.infer(x)
        t2 = time.perf_counter()
        n = sum(len(det.detect(outputs, j, info, img.shape[1], img.shape[0])[0])
                for j, (img, info) in enumerate(zip(images, infos)))
        return (t1 - t0, t2 - t1, time.perf_counter() - t2), n

    with sampler:
        rows, counts, seconds = timed_loop(step, args.warmup, args.iterations, args.min_seconds)
    out = {"unit": "ms", "per": f"iteration of batch {det.spec.batch}", "batch": det.spec.batch, "warmup": args.warmup,
           "iterations": len(rows), "timed_s": seconds, "source": frames.describe(),
           "fps": det.spec.batch * len(rows) / sum(sum(r) for r in rows),
           "detections_per_iteration": summarize(counts)}
    out.update(part_stats(rows))
    return out


def run_eval(args: argparse.Namespace, det: Any, sampler: sampling.SystemSampler) -> Dict[str, Any]:
    if not args.images:
        raise runner_io.RunnerError("--mode eval needs --images FILE (lines: image_id<TAB>path)")
    items = runner_io.read_images_file(args.images)
    with sampler:
        detections, rows = det.evaluate(items)
    path = args.detections or os.path.splitext(args.out)[0] + ".detections.json"
    runner_io.write_json_atomic(path, detections)
    out = {"images": len(items), "detections": len(detections), "detections_file": path, "batch": det.spec.batch,
           "unit": "ms", "per": f"batch of {det.spec.batch}"}
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


def _worker(wid: int, det: Any, warm: np.ndarray, warmup: int, barrier: threading.Barrier,
            jobs: "queue.Queue", results: "queue.Queue") -> None:
    """Warm up, wait for the start, then letterbox + infer + decode + select jobs until a None arrives."""
    try:
        x, _ = det.prepare([warm])
        for _ in range(warmup):
            det.runtime.infer(x)
        barrier.wait()
        while True:
            job = jobs.get()
            if job is None:
                return
            t0 = time.perf_counter()
            x, infos = det.prepare([img for _, img in job])
            outputs = det.runtime.infer(x)
            counts = [len(det.detect(outputs, j, info, img.shape[1], img.shape[0])[0])
                      for j, ((_, img), info) in enumerate(zip(job, infos))]
            busy = time.perf_counter() - t0
            for (index, _), n in zip(job, counts):
                results.put((index, wid, n, busy / len(job)))
    except threading.BrokenBarrierError:
        return   # another worker failed its warmup and reported why
    except BaseException as exc:  # noqa: BLE001 - reported to the main thread, which raises it
        barrier.abort()
        results.put((-1, wid, f"{type(exc).__name__}: {exc}", 0.0))


def run_throughput(args: argparse.Namespace, dets: List[Any], masks: List[str], sampler: sampling.SystemSampler
                   ) -> Dict[str, Any]:
    """Frames in order through a queue to one worker per runtime (per core mask); results re-ordered."""
    frames = Frames.from_args(args, (1280, 720))
    distinct = [frames.load(i)[1] for i in range(min(len(frames), MAX_DISTINCT_FRAMES, args.frames))]
    batch = dets[0].spec.batch
    jobs: "queue.Queue" = queue.Queue(maxsize=2 * len(dets))
    results: "queue.Queue" = queue.Queue()
    barrier = threading.Barrier(len(dets) + 1)
    abort = threading.Event()
    enqueued: Dict[int, float] = {}
    workers = [threading.Thread(target=_worker, args=(w, d, distinct[0], args.warmup, barrier, jobs, results),
                                name=f"worker{w}", daemon=True) for w, d in enumerate(dets)]

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

    def fail(wid: int, message: str) -> runner_io.RunnerError:
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
        return runner_io.RunnerError(f"worker {wid} (core mask {masks[wid]}) failed: {message}")

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


def tile_windows(args: argparse.Namespace, width: int, height: int, size: int) -> List[Tuple[int, int, int, int]]:
    """(x, y, w, h) of each tile: overlapping model-size windows (native), or a grid letterboxed down (resized)."""
    if args.tile_mode == "resized":
        cols, rows = runner_io.parse_wxh(args.tile_grid)
        return prepost.grid_tiles(width, height, cols, rows)
    return [(x, y, size, size) for x, y in prepost.tiles(width, height, size, args.overlap)]


def run_tiling(args: argparse.Namespace, det: Any, sampler: sampling.SystemSampler) -> Dict[str, Any]:
    """Each frame cut into tiles, the tiles' detections merged in frame pixels. With --images the frames are
    those images and every image's merged detections are written as COCO records (an image the timed loop
    did not reach is run once more, untimed), so the host scores the tiling."""
    frames = Frames.from_args(args, runner_io.parse_wxh(args.frame_size))
    last: Dict[str, Any] = {}
    records: Dict[int, List[dict]] = {}

    def frame_detections(k: int) -> Tuple[Tuple[float, float, float], int, int]:
        t0 = time.perf_counter()
        image_id, frame = frames.load(k)
        height, width = frame.shape[:2]
        windows = tile_windows(args, width, height, det.spec.input_size)
        crops = [frame[y:y + h, x:x + w] for x, y, w, h in windows]
        batches = [det.prepare(crops[s:s + det.spec.batch]) for s in range(0, len(crops), det.spec.batch)]
        t1 = time.perf_counter()
        outputs = [det.runtime.infer(x) for x, _ in batches]
        t2 = time.perf_counter()
        per_tile = []
        for b, (outs, (_, infos)) in enumerate(zip(outputs, batches)):
            for j, info in enumerate(infos):
                crop = crops[b * det.spec.batch + j]
                per_tile.append(det.detect(outs, j, info, crop.shape[1], crop.shape[0]))
        boxes, scores, classes = prepost.merge_tiles(per_tile, [(x, y) for x, y, _, _ in windows], det.spec.iou)
        t3 = time.perf_counter()
        if frames.items:
            records[image_id] = det.records(image_id, np.asarray(boxes), np.asarray(scores), np.asarray(classes))
        last.update(frame=[width, height], windows=[[int(v) for v in w] for w in windows],
                    detections=[{"bbox": [round(x1, 2), round(y1, 2), round(x2 - x1, 2), round(y2 - y1, 2)],
                                 "score": round(float(s), 5), "class": int(c)}
                                for (x1, y1, x2, y2), s, c in zip(np.asarray(boxes).tolist(), np.asarray(scores).tolist(),
                                                                  np.asarray(classes).tolist())])
        return (t1 - t0, t2 - t1, t3 - t2), len(last["detections"]), image_id

    def step(k: int) -> Tuple[Tuple[float, float, float], int]:
        parts, n, _ = frame_detections(k)
        return parts, n

    with sampler:
        rows, counts, seconds = timed_loop(step, args.warmup, args.iterations, args.min_seconds)
    out = {"unit": "ms", "per": "frame", "frame": last["frame"], "tile": det.spec.input_size, "overlap": args.overlap,
           "tile_mode": args.tile_mode, "tiles_per_frame": len(last["windows"]), "tile_windows": last["windows"],
           "tile_origins": [w[:2] for w in last["windows"]],
           "batch": det.spec.batch, "warmup": args.warmup, "frames": len(rows), "timed_s": seconds,
           "source": frames.describe(), "fps": len(rows) / sum(sum(r) for r in rows),
           "detections_per_frame": summarize(counts), "last_frame_detections": last["detections"]}
    if args.tile_mode == "resized":
        out["tile_grid"] = args.tile_grid
    if frames.items:   # every image once: the detections the host scores
        for k, (image_id, _) in enumerate(frames.items):
            if image_id not in records:
                frame_detections(k)
        path = args.detections or os.path.splitext(args.out)[0] + ".detections.json"
        runner_io.write_json_atomic(path, [d for image_id, _ in frames.items for d in records[image_id]])
        out.update(detections_file=path, images=len(frames.items))
    out.update(part_stats(rows))
    return out
