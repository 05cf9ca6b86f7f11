#!/usr/bin/env python3
"""The on-device runner: pushed to the board with the modules it imports flat (detect, prepost,
backends, stats, modes, sampling, runner_io), run with the board's Python (3.8+), writing one JSON
result file.

    python3 runner.py --spec spec.json --mode latency --model m.rknn --out result.json [--images list.txt]

The spec file holds the inference spec (rkbench.models.detect.InferenceSpec: input size, head, classes,
category ids, batch, thresholds, runtime, core mask ...), the same object the host evaluates with, and
the measure settings (warmup, iterations, frames ...); a flag given on the command line overrides a
measure setting, for use by hand. Modes: see modes.py. While measuring, a thread samples the NPU load,
the CPU load, the runner's resident memory, the NPU / DDR / CPU clocks and the temperatures (sampling.py).

The result is written atomically and carries "complete": true only when the run got to the end (see
runner_io.py). On failure the exit status is non-zero and stderr ends with one line `runner: error: ...`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import sys
import time
from typing import Any, Dict, List, Optional

import numpy as np

# The pushed copies (on PYTHONPATH / beside this file) win over an installed rkbench, so a board run
# always uses the exact pre/post-processing that was deployed with it.
try:
    import backends  # type: ignore[no-redef]
except ImportError:  # run from the rkbench package on the host
    from rkbench.runtimes import backends
try:
    import detect  # type: ignore[no-redef]
except ImportError:
    from rkbench.models import detect
try:
    import modes  # type: ignore[no-redef]
except ImportError:
    from rkbench.device import modes
try:
    import runner_io  # type: ignore[no-redef]
except ImportError:
    from rkbench.device import runner_io
try:
    import sampling  # type: ignore[no-redef]
except ImportError:
    from rkbench.device import sampling

RunnerError = runner_io.RunnerError
RUNNER_VERSION = "1"
SCHEMA_VERSION = 1
MODES = ("latency", "eval", "throughput", "tiling")


def versions() -> Dict[str, Optional[str]]:
    cv2 = sys.modules.get("cv2")
    return {"runner": RUNNER_VERSION, "python": platform.python_version(), "numpy": np.__version__,
            "opencv": getattr(cv2, "__version__", None),
            "onnxruntime": backends.dist_version("onnxruntime"),
            "rknnlite": backends.dist_version("rknn-toolkit-lite2") or backends.dist_version("rknn_toolkit_lite2")}


# ------------------------------------------------------------------------------------------------- main

# Measure settings: spec file "measure" section, overridden by a flag given on the command line.
MEASURE_DEFAULTS = {"warmup": 5, "iterations": 50, "min_seconds": 2.0, "frames": 100, "cores": "auto",
                    "frame_size": "1920x1080", "overlap": 0.2, "sample_interval": sampling.SAMPLE_INTERVAL_S,
                    "tile_mode": "native", "tile_grid": "2x2"}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="runner.py", description="rkbench on-device runner: one mode, one JSON result.")
    p.add_argument("--spec", required=True, help="JSON: {\"inference\": InferenceSpec, \"measure\": {...}}")
    p.add_argument("--mode", required=True, choices=MODES)
    p.add_argument("--model", required=True, help=".rknn (rknnlite) or .onnx (onnxruntime, null)")
    p.add_argument("--out", required=True, help="result JSON (written to OUT.tmp, then renamed)")
    p.add_argument("--where", default="board", choices=("board", "emulator", "host"), help="recorded as is")
    p.add_argument("--image", default=None, help="one image (latency/throughput/tiling)")
    p.add_argument("--images", default=None, help="file of image_id<TAB>path lines (eval; others cycle it)")
    p.add_argument("--detections", default=None, help="eval output (default: OUT with .detections.json)")
    p.add_argument("--output-shapes", default=None, help="null runtime without an .onnx: 1x64x80x80,1x80x80x80,...")
    p.add_argument("--sysfs-root", default=os.environ.get("RKBENCH_BOARD_ROOT", ""),
                   help="prefix for /sys and /proc/device-tree reads (default $RKBENCH_BOARD_ROOT)")
    p.add_argument("--warmup", type=int, help="untimed calls first")
    p.add_argument("--iterations", type=int, help="latency/tiling: at least this many")
    p.add_argument("--min-seconds", type=float, help="latency/tiling: and at least this long")
    p.add_argument("--frames", type=int, help="throughput: frames through the pool")
    p.add_argument("--cores", help="throughput: core masks, one worker each, e.g. 0,1,2")
    p.add_argument("--frame-size", help="tiling: synthetic frame size without --image(s)")
    p.add_argument("--overlap", type=float, help="tiling: tile overlap fraction")
    p.add_argument("--tile-mode", choices=("native", "resized"), help="tiling: overlapping model-size tiles, or a grid")
    p.add_argument("--tile-grid", help="tiling, --tile-mode resized: COLSxROWS, e.g. 2x2")
    p.add_argument("--sample-interval", type=float, help="seconds between system samples")
    return p


def load_spec(args: argparse.Namespace) -> detect.InferenceSpec:
    """Read the spec file; fill the measure settings into args (a flag given wins)."""
    try:
        with open(args.spec, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError) as exc:
        raise RunnerError(f"spec file {args.spec} unreadable ({exc}): push the spec rkbench wrote") from None
    measure = dict(MEASURE_DEFAULTS, **(data.get("measure") or {}))
    for key, value in measure.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    try:
        spec = detect.InferenceSpec.from_dict(data.get("inference") or {})
    except detect.SpecError as exc:
        raise RunnerError(str(exc)) from None
    if args.warmup < 0 or args.iterations < 1 or args.frames < 1:
        raise RunnerError("warmup must be >= 0, iterations and frames >= 1")
    if not os.path.isfile(args.model):
        raise RunnerError(f"model {args.model} not found: push it first")
    return spec


def run(args: argparse.Namespace) -> Dict[str, Any]:
    spec = load_spec(args)
    shapes = runner_io.parse_shapes(args.output_shapes) if args.output_shapes else None

    def make(core_mask: str) -> Any:
        return backends.make_runtime(spec.runtime, args.model, mean=spec.mean, std=spec.std, core_mask=core_mask,
                                     where=args.where, threads=spec.threads, output_shapes=shapes)

    sampler = sampling.SystemSampler(args.sysfs_root, args.sample_interval)
    result: Dict[str, Any] = {"mode": args.mode, "where": args.where, "board": sampling.board_facts(args.sysfs_root),
                              "spec": spec.to_dict()}
    masks = [m.strip() for m in str(args.cores).split(",") if m.strip()] if args.mode == "throughput" else [spec.core_mask]
    if not masks:
        raise RunnerError("--cores is empty: pass core masks, one worker each, e.g. 0,1,2")
    runtimes: List[Any] = []
    try:
        for mask in masks:   # one runtime per worker: each RKNNLite context bound to its own core(s)
            runtimes.append(make(mask))
        result["runtime"] = {"kind": spec.runtime, "version": runtimes[0].version(), "core_masks": masks,
                             "threads": spec.threads}
        detectors = [detect.Detector(spec, r) for r in runtimes]
        if args.mode == "latency":
            result["latency"] = modes.run_latency(args, detectors[0], sampler)
        elif args.mode == "eval":
            result["eval"] = modes.run_eval(args, detectors[0], sampler)
        elif args.mode == "tiling":
            result["tiling"] = modes.run_tiling(args, detectors[0], sampler)
        else:
            result["throughput"] = modes.run_throughput(args, detectors, masks, sampler)
    finally:
        for runtime in runtimes:
            runtime.close()
    result["system"] = sampler.result()   # clocks, temperatures, memory and loads of every mode
    result["model"] = runner_io.file_facts(args.model)
    return result


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    started = time.time()
    header = {"schema": SCHEMA_VERSION, "complete": False, "hostname": socket.gethostname(), "where": args.where,
              "mode": args.mode, "versions": versions(), "options": vars(args),
              "modules": {"detect": os.path.abspath(detect.__file__), "prepost": os.path.abspath(detect.prepost.__file__),
                          "backends": os.path.abspath(backends.__file__)},
              "started": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(started))}
    try:
        body = run(args)
    except KeyboardInterrupt:
        print("runner: error: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - one line for the caller, and a result saying it failed
        message = " ".join(f"{type(exc).__name__}: {exc}".split())
        try:
            runner_io.write_json_atomic(args.out, dict(header, error=message))
        except OSError:
            pass
        print(f"runner: error: {message}", file=sys.stderr)
        return 1
    header.update(body)
    header.update(options=vars(args), versions=versions(), complete=True, wall_s=time.time() - started,
                  finished=time.strftime("%Y-%m-%dT%H:%M:%S"))
    runner_io.write_json_atomic(args.out, header)
    return 0


if __name__ == "__main__":
    sys.exit(main())
