"""One report section per named study (experiments/<study>.yaml), each shaped like the table the field notes
keep by hand. The study is the sweep's tag `rkbench.study` (else the runs' `study` param); a report of any
other sweep gets no study section. Every row says where its numbers were measured (`rkbench.device_kind`):
host and simulator times rank configurations, they are not NPU latency."""

from __future__ import annotations

import re
from collections import Counter
from typing import Callable, Optional

from rkbench import tables
from rkbench.metrics import EVAL_MAP
from rkbench.report.runs import RunRecord, Selection

FLOAT_MAP = "eval_float/map50_95"
CORES = ("0", "1", "2")
COUNT_FIELDS = ("gt", "correct", "false", "missed", "correct_ratio", "false_ratio", "missed_ratio")


def study_of(sel: Selection) -> str:
    if sel.parent and sel.parent.tags.get("rkbench.study"):
        return sel.parent.tags["rkbench.study"]
    found = Counter(r.param("study") for r in sel.runs)
    return found.most_common(1)[0][0] if found else ""


def place(r: RunRecord) -> str:
    return r.tags.get("rkbench.device_kind", "-")


def _num(value: str) -> float:
    try:
        return float(value)
    except ValueError:
        return float("inf")


def _sorted(runs: list[RunRecord], keys: tuple[str, ...]) -> list[RunRecord]:
    """Numeric axes in numeric order, the others as given."""
    return sorted(runs, key=lambda r: tuple((_num(r.param(k)), r.param(k)) for k in keys))


def own_latency(r: RunRecord, part: str = "total") -> Optional[float]:
    """The p50 (ms) of one call at the place the run was measured: the Python runner's `part` on a board or the
    emulator, one runtime.infer call on the simulator or the host."""
    where = place(r)
    if where in ("board", "emulator"):
        return r.metrics.get(f"latency/{where}_py_{part}_ms_p50")
    return r.metrics.get(f"latency/{where}_infer_ms_p50")


def fps(r: RunRecord) -> tuple[Optional[float], str]:
    """Frames per second and how it was had: the runner's single-stream fps on a board, else 1000 / p50."""
    where = place(r)
    for name in (f"throughput/{where}_single_fps", f"throughput/{where}_cpp_fps"):
        if name in r.metrics:
            return r.metrics[name], "measured"
    p50 = own_latency(r)
    return (1000.0 / p50, "1000 / p50") if p50 else (None, "-")


def _drop(r: RunRecord, metric: str = "map50_95") -> Optional[float]:
    a, b = r.metrics.get(f"eval/{metric}"), r.metrics.get(f"eval_float/{metric}")
    return None if a is None or b is None else a - b


def _section(title: str, intro: str, header: list[str], rows: list[list], numeric: list[bool],
             notes: tuple[str, ...] = ()) -> list[str]:
    body = tables.markdown(header, rows, numeric) if rows else "No run of this study has the numbers yet."
    return ["", f"## Study: {title}", "", intro, "", body] + (["", *[f"- {n}" for n in notes]] if notes else [])


# ------------------------------------------------------------------------------------------------ the studies

def runner_twins(runs: list[RunRecord], axes: list[str]) -> list[tuple[RunRecord, Optional[RunRecord]]]:
    """Each run with, for a runner=python run, its runner=cpp twin (the same swept values but the runner) folded
    into the same row, as the field notes put Python and C++ side by side; a cpp run without a twin keeps its row.
    The swept axes are compared, less those either run collapsed (settings only one runner uses)."""
    def collapsed(r: RunRecord) -> set[str]:
        return set(re.findall(r"(?:^|; )([\w.]+)=", r.tags.get("rkbench.collapsed", "")))

    def twins(a: RunRecord, b: RunRecord) -> bool:
        keys = [k for k in axes if k != "runner" and k not in collapsed(a) | collapsed(b)]
        return all(a.param(k) == b.param(k) for k in keys)

    cpp = [r for r in runs if r.param("runner") == "cpp" and place(r) in ("board", "emulator")]
    twin = {id(r): next((c for c in cpp if twins(c, r)), None) for r in runs if r.param("runner") == "python"}
    paired = {id(c) for c in twin.values() if c is not None}
    return [(r, twin.get(id(r))) for r in runs if id(r) not in paired]


def resolution(sel: Selection) -> list[str]:
    rows = []
    for r, twin in runner_twins(_sorted(sel.runs, ("export", "resolution")), sel.axes):
        where = place(r)
        value, how = fps(r)
        cpp = twin or r
        runner = (f"{r.param('runner')}{' + cpp' if twin else ''}" if where in ("board", "emulator") else "-")
        rows.append([r.param("resolution"), r.param("export"), runner, where, r.status, own_latency(r),
                     cpp.metrics.get(f"latency/{where}_cpp_total_ms_p50"), value, how, r.metrics.get(EVAL_MAP),
                     r.metrics.get(FLOAT_MAP), r.metrics.get("convert/build_s", cpp.metrics.get("convert/build_s")),
                     r.metrics.get("convert/rknn_mib", cpp.metrics.get("convert/rknn_mib"))])
    return _section(
        "resolution", "Input resolution x export path. latency: p50 of one frame at the place in `where` (board / "
        "emulator: the Python runner's pre + infer + post; simulator / host: one runtime.infer call, not NPU latency); "
        "C++: the C++ runner's total where runner=cpp ran; conversion: rknn-toolkit2 build on the host.",
        ["resolution", "export", "runner", "where", "status", "latency p50 (ms)", "C++ latency p50 (ms)", "fps",
         "fps from", "mAP50-95", "float mAP50-95", "conversion (s)", ".rknn (MiB)"], rows,
        [True, False, False, False, False, True, True, True, False, True, True, True, True],
        ("Non-square inputs (1280x736) are not swept: `resolution` is one square size through export, spec and "
         "letterbox.",))


def thresholds(sel: Selection) -> list[str]:
    rows = []
    for r in _sorted(sel.runs, ("resolution",)):
        confs = sorted({m.split("/")[1][1:] for m in r.metrics if m.startswith("counts/c")}, key=float)
        top = r.metrics.get("counts/top_false/score")
        for c in confs:
            shown = top is not None and top >= float(c)
            rows.append([r.param("resolution"), place(r), float(c)]
                        + [r.metrics.get(f"counts/c{c}/{k}") for k in COUNT_FIELDS]
                        + ([top, int(r.metrics["counts/top_false/image_id"]), int(r.metrics["counts/top_false/category_id"])]
                           if shown else [None, None, None]))
    return _section(
        "thresholds", "Confidence threshold x resolution: a detection counts when its score >= conf; correct: matched "
        "to a ground-truth box of its class with IoU >= 0.5 (best score first), false: not matched, missed: ground "
        "truth left unmatched; false_ratio = false / (correct + false). The highest-scoring false detection is the "
        "score a threshold must pass to have no false detection (- : none above this threshold).",
        ["resolution", "where", "conf", *COUNT_FIELDS, "top false score", "its image id", "its category id"], rows,
        [True, False, True] + [True] * len(COUNT_FIELDS) + [True, True, True])


def threadpool(sel: Selection) -> list[str]:
    rows, by_cores = [], {}
    for r in _sorted(sel.runs, ("measure.cores", "measure.workers")):
        where = place(r)
        sys_ = lambda what: r.metrics.get(f"system/{where}_throughput_{what}")   # noqa: E731
        value = r.metrics.get(f"throughput/{where}_fps")
        rows.append([r.param("measure.workers"), r.param("measure.cores"), where, r.status, value,
                     r.metrics.get(f"throughput/{where}_frame_ms_p50")]
                    + [sys_(f"npu{k}_load_pct") for k in CORES] + [sys_("cpu_load_pct"), sys_("peak_rss_mib")])
        if value:
            by_cores.setdefault(r.param("measure.cores"), {})[r.param("measure.workers")] = (value, where)
    notes = []
    for cores, found in sorted(by_cores.items()):
        if "1" in found:
            base, where = found["1"]
            notes += [f"cores {cores} ({where}): {w} workers / 1 worker = {v / base:.2f}x fps"
                      for w, (v, _) in sorted(found.items(), key=lambda kv: _num(kv[0])) if w != "1"]
    return _section(
        "threadpool", "Worker pool x NPU core assignment (the Python runner's throughput mode: one runtime per worker, "
        "frames re-ordered). NPU load per core, CPU % and peak RSS are sampled on the board while the pool ran (the "
        "emulated board runs ONNX Runtime on the host CPU: its NPU load is the emulator's, not an NPU's).",
        ["workers", "cores", "where", "status", "fps", "frame p50 (ms)", "NPU0 %", "NPU1 %", "NPU2 %", "CPU %",
         "peak RSS (MiB)"], rows, [True, False, False, False] + [True] * 7, tuple(notes))


def tiling(sel: Selection) -> list[str]:
    rows = []
    for r in _sorted(sel.runs, ("measure.tile_mode", "resolution")):
        where = place(r)
        rows.append([r.param("measure.tile_mode"), r.param("resolution"), where, r.status,
                     r.metrics.get("tiling/tiles_per_frame"), r.metrics.get(f"tiling/{where}_fps"),
                     r.metrics.get("tiling/map50_95"), r.metrics.get("tiling/map50"),
                     r.metrics.get(f"tiling/{where}_py_infer_ms_p50"), r.metrics.get(f"tiling/{where}_py_total_ms_p50"),
                     r.metrics.get(f"system/{where}_tiling_npu_load_pct"),
                     r.metrics.get(f"system/{where}_tiling_cpu_load_pct")])
    return _section(
        "tiling", "Large frames cut into tiles: native = overlapping model-size windows, resized = a grid letterboxed "
        "down to the model size. mAP is COCO mAP of each frame's merged detections (per-class NMS across tiles) "
        "against the frame's ground truth; infer / total: ms per frame.",
        ["tile mode", "resolution", "where", "status", "tiles / frame", "fps", "mAP50-95", "mAP50", "infer p50 (ms)",
         "total p50 (ms)", "NPU load %", "CPU %"], rows, [False, True, False, False] + [True] * 8)


def batch(sel: Selection) -> list[str]:
    rows = []
    for r in _sorted(sel.runs, ("batch", "core_mask")):
        where = place(r)
        n = int(r.param("batch")) if r.param("batch").isdigit() else 1
        call = own_latency(r, "infer")
        total = own_latency(r, "total") if where in ("board", "emulator") else None
        given = re.search(r"core_mask=(\S+) \(", r.tags.get("rkbench.collapsed", ""))
        mask = given[1] if given else r.param("core_mask")
        if given:
            runtime = f"no effect on the {where}: measured once with auto (collapsed)"
        elif n > 1 and mask in CORES:
            runtime = "falls back to auto (refused by rkbench)"
        else:
            runtime = f"core mask {mask}"
        rows.append([r.param("batch"), mask, where, r.status, call, call / n if call else None,
                     total / n if total else None, runtime])
    return _section(
        "batch", "rknn_batch_size x NPU core mask: one call runs `batch` frames; per frame = the call's p50 / batch "
        "(simulator / host: one runtime.infer call, not NPU latency).",
        ["batch", "core mask", "where", "status", "call p50 (ms)", "infer per frame (ms)", "total per frame (ms)",
         "runtime"], rows, [True, False, False, False, True, True, True, False],
        ("rknn_batch_size > 1 with a single-core mask (0, 1, 2) falls back to auto in the runtime: rkbench refuses "
         "that combination on a board (config.check_cores) instead of measuring auto under another name.",))


def quantization(sel: Selection) -> list[str]:
    keys = ("algo", "quant_method", "calib.size", "calib.source")
    rows = [[*(r.param(k) for k in keys), place(r), r.status, r.metrics.get(EVAL_MAP), r.metrics.get("eval/map50"),
             r.metrics.get("eval/map75"), r.metrics.get(FLOAT_MAP), _drop(r), _drop(r, "map50"), r.metrics.get("calib/images")]
            for r in _sorted(sel.runs, keys)]
    scored = [(d, r) for r in sel.runs if (d := _drop(r)) is not None]
    notes = ()
    if scored:
        d, r = max(scored, key=lambda x: x[0])
        notes = (f"highest int8 - float (the least lost; above 0 is within the evaluation's noise): {', '.join(f'{k}={r.param(k)}' for k in keys)}: mAP50-95 {r.metrics[EVAL_MAP]:.4f}, "
                 f"int8 - float {d:+.4f}",)
    return _section(
        "quantization", "quantized_algorithm x quantized_method x calibration set: the int8 mAP family and its drop "
        "against the float ONNX (int8 - float; negative = lost by quantization). Calibration images: those actually used.",
        [*keys, "where", "status", "mAP50-95", "mAP50", "mAP75", "float mAP50-95", "int8 - float (50-95)",
         "int8 - float (50)", "calibration images"], rows,
        [False, False, True, False, False, False] + [True] * 7, notes)


def _once_per_identity(runs: list[RunRecord]) -> list[RunRecord]:
    """One run per measured configuration: the points a collapsed axis made equal share an identity (the first
    is the measured run, the others REUSED links to it)."""
    seen: dict[str, RunRecord] = {}
    for r in runs:
        seen.setdefault(r.tags.get("rkbench.identity") or r.run_id, r)
    return list(seen.values())


def input_channels(sel: Selection) -> list[str]:
    """Per channel count (and resolution): the Python runner's pre next to the C++ runner's rknn_inputs_set with
    pass-through off and on, one row per C++ run (off-board, where runner and pass-through collapse: one row)."""
    rows = []
    groups: dict[tuple[str, str], list[RunRecord]] = {}
    for r in _sorted(_once_per_identity(sel.runs), ("channels", "resolution")):
        groups.setdefault((r.param("channels"), r.param("resolution")), []).append(r)
    for (channels, resolution), runs in groups.items():
        on_board = [r for r in runs if place(r) in ("board", "emulator")]
        py = next((r for r in runs if r.param("runner") != "cpp"), None)   # off-board runner=cpp collapsed to python
        cpps = sorted((r for r in on_board if r.param("runner") == "cpp"), key=lambda r: r.param("measure.cpp_pass_through"))
        for cpp in cpps or [None]:
            first = py or cpp
            where = place(first)
            board = where in ("board", "emulator")
            c = (lambda part: cpp.metrics.get(f"latency/{where}_cpp_{part}_ms_p50")) if cpp else (lambda part: None)
            through = {"True": "on", "False": "off"}.get(cpp.param("measure.cpp_pass_through"), "-") if cpp else "-"
            rows.append([channels, resolution, where, " / ".join(dict.fromkeys(r.status for r in (py, cpp) if r)),
                         through, own_latency(py, "pre") if py and board else None, own_latency(py, "infer") if py else None,
                         c("inputs_set"), c("run"), c("total"), first.metrics.get(EVAL_MAP), first.metrics.get(FLOAT_MAP)])
    return _section(
        "input", "Model input channels: 3 (RGB) vs 1 (gray: the first conv's weights summed over RGB, exact for gray "
        "images; frames are letterboxed, then converted to gray) x the C++ runner's pass-through input (on: quantised "
        "to the input attr's int8 layout before the clock and handed over with rknn_input.pass_through=1). Board / "
        "emulator: the Python runner's pre (letterbox + gray per frame) and infer (the engine call), next to the C++ "
        "runner's rknn_inputs_set, rknn_run and total; simulator / host: one runtime.infer call, not NPU latency, "
        "and runner / pass-through have no effect there (collapsed: one row per channel count). The gray model's "
        "mAP is the RGB model's on gray images.",
        ["channels", "resolution", "where", "status", "pass-through", "py pre p50 (ms)", "py infer p50 (ms)",
         "C++ inputs_set p50 (ms)", "C++ run p50 (ms)", "C++ total p50 (ms)", "mAP50-95", "float mAP50-95"], rows,
        [True, True, False, False, False] + [True] * 7,
        ("On the emulated board the C++ runner's rknn_inputs_set is the replay stand-in's (a hash of the input "
         "bytes), not librknnrt's conversion: only a board's numbers show what pass-through saves.",))


SECTIONS: dict[str, Callable[[Selection], list[str]]] = {
    "resolution": resolution, "thresholds": thresholds, "threadpool": threadpool, "tiling": tiling, "batch": batch,
    "quantization": quantization, "input": input_channels,
}


def section(sel: Selection) -> list[str]:
    """The study's section, or nothing for a sweep that is not one of these studies."""
    found = SECTIONS.get(study_of(sel))
    return found(sel) if found and sel.runs else []
