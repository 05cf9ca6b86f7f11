"""Every metric name rkbench logs, defined here and nowhere else.

One scheme: `<group>/<name>`. Where a number was measured is part of its name wherever it can differ
(`latency/simulator_infer_ms_p50` vs `latency/board_py_infer_ms_p50`), so no host or simulator time can
be read as NPU latency. Stages, the board stage (which turns the runner's JSON into metrics), the
console table and the report all build and read names through this module."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

WHERE = {
    "board": "on the board's NPU (the only place NPU latency is measured)",
    "emulator": "on the emulated board (ONNX Runtime on this host behind the adb wire protocol; for the C++ runner a "
                "replay stand-in of librknnrt): not NPU latency",
    "simulator": "with the rknn-toolkit2 simulator on the host: quantized accuracy is real, its times are not NPU latency",
    "host": "with ONNX Runtime on the host CPU (float reference): not NPU latency",
}
STATS = ("p50", "p90", "p99", "mean", "std", "min", "cv", "count")   # count: how many timed calls


@dataclass(frozen=True)
class Group:
    name: str
    what: str
    where: str          # the place it is measured; "name" = in the metric name itself


GROUPS = {g.name: g for g in (
    Group("eval", "COCO metrics of the target runtime (map50_95, map50, map75, map_small/medium/large, ar1/10/100)",
          "the run's device kind (tag rkbench.device_kind)"),
    Group("eval_class", "AP50-95 of each class on the target runtime: eval_class/<class name>",
          "the run's device kind"),
    Group("eval_float", "COCO metrics of the float ONNX (the reference beside an int8 run)", "host"),
    Group("counts", "correct / false / missed detections at each confidence threshold: counts/c<conf>/<field>",
          "the run's device kind"),
    Group("latency", "per-call times in ms: latency/<where>_<part>_ms_<stat>, part = infer (host, simulator) or "
          "py_pre / py_infer / py_post / py_total (board, Python runner) or cpp_inputs_set / cpp_run / cpp_outputs_get "
          "/ cpp_total (board, C++ runner; cpp_input_copy / cpp_output_read instead of inputs_set / outputs_get with "
          "measure.cpp_zero_copy); <where>_cpp_init_ms: the C++ runner's rknn_init + attr queries, once per run; "
          "<where>_cpp_frame_ms_<stat>: an iteration's total per image when batch > 1",
          "name"),
    Group("throughput", "frames per second: single stream (<where>_single_fps; C++ runner <where>_cpp_single_fps), a "
          "worker pool (<where>_fps; C++ runner, one rknn context per worker: <where>_cpp_fps), frame latency and "
          "per-core share (<where>[_cpp]_frame_ms_p50, _share_core<mask>)", "name"),
    Group("tiling", "a large frame cut into model-size tiles: <where>_fps, tiles_per_frame, per-part times; with "
          "measure.tile_source=dataset the COCO metrics of the merged detections (tiling/map50_95, ...) on the run's "
          "device kind", "name"),
    Group("system", "NPU load per core, CPU load, the runner's peak and mean RSS, NPU/DDR/CPU clocks and temperatures "
          "(min/max) while a board mode ran: system/<where>_<mode>_<what>",
          "name"),
    Group("memory", "rknn-toolkit2 eval_memory: weight / internal / other / total MiB; memory/<where>_npu_<weight|"
          "internal|dma_allocated|sram_total|sram_free>_mb: the C++ runner's RKNN_QUERY_MEM_SIZE (on the emulator: "
          "what the replay stand-in allocated)", "board"),
    Group("perf", "rknn-toolkit2 eval_perf per-layer times (perf_debug)", "board"),
    Group("deploy", "files pushed / skipped, MiB pushed and seconds to deploy a configuration", "the link to the board"),
    Group("convert", "rknn-toolkit2 build seconds and .rknn size", "host"),
    Group("export", "exported ONNX size", "host"),
    Group("calib", "calibration images actually used", "host"),
    Group("accuracy", "rknn-toolkit2 accuracy_analysis, int8 vs float per layer: worst_cosine / worst_euclidean (the "
          "layer with the lowest single-layer cosine), worst_entire_cosine (errors accumulated from the input), "
          "output_cosine/<output> (accumulated, at each model output), layers, q_zero_layers, images", "simulator"),
    Group("hybrid", "hybrid quantization: layers kept in float16 (their names: tag rkbench.hybrid.layers)", "host"),
    Group("sweep", "on the parent run: configurations by status (finished, failed, reused); best_map50_95 and "
          "fastest_<place>_..._p50 of its children", "host"),
    Group("search", "on the parent run of a search (hydra/sweeper=optuna, rkbench/search.py): trials, feasible (trials "
          "meeting search.min_map50_95) and the best trial's latency search/<where>_<part>_ms_p50", "name"),
)}


def group(name: str) -> Optional[Group]:
    return GROUPS.get(name.split("/", 1)[0])


def where(name: str) -> Optional[str]:
    """The place a metric was measured when its name says it (board, emulator, simulator, host)."""
    head, _, rest = name.partition("/")
    if head == "eval_float":
        return "host"
    if head == "accuracy":
        return "simulator"
    place = rest.split("_", 1)[0]
    return place if place in WHERE else None


def latency(place: str, part: str, stat: str) -> str:
    return f"latency/{place}_{part}_ms_{stat}"


def latency_stats(place: str, part: str, stats: dict[str, float]) -> dict[str, float]:
    return {latency(place, part, k): float(v) for k, v in stats.items() if k in STATS}


def counts(conf: float, field: str) -> str:
    return f"counts/c{conf:g}/{field}"


def system(place: str, mode: str, what: str) -> str:
    return f"system/{place}_{mode}_{what}"


EVAL_MAP = "eval/map50_95"
# The short result table: the first of each that a run has.
KEY_METRICS = (EVAL_MAP, "eval_float/map50_95", "eval/map50", latency("board", "py_infer", "p50"),
               latency("board", "cpp_run", "p50"), latency("emulator", "py_infer", "p50"),
               latency("emulator", "cpp_run", "p50"), "throughput/board_fps", "throughput/emulator_fps",
               latency("simulator", "infer", "p50"), latency("host", "infer", "p50"), "convert/build_s")
