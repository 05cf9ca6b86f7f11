"""Report sections of the accuracy and hybrid studies, from MLflow only.

- Per-layer accuracy: for each run with an accuracy_analysis (tag rkbench.accuracy.worst), the top-k layers
  with the lowest single-layer cosine (table + bar plot of 1 - cosine), and the accumulated cosine at each
  model output (metrics accuracy/output_cosine/<output>) side by side.
- int8 vs hybrid vs fp16: per configuration of the other swept axes, mAP50-95 of each precision, the layers
  kept in float16, board latency where a board ran it, and one line: keeping these N layers in float
  recovers X of the Y mAP lost.

Cosines are printed with 5 decimals: they sit at 0.99xxx, where 4 significant digits read as 1."""

from __future__ import annotations

import json
import math
from typing import Callable, Optional

from rkbench import tables
from rkbench.metrics import EVAL_MAP
from rkbench.report.runs import RunRecord, Selection, latest_per_config

WORST_TAG = "rkbench.accuracy.worst"     # written by rkbench.stages.accuracy (no import: the report needs no toolkit)
HYBRID_TAG = "rkbench.hybrid.layers"
OUTPUT_COSINE = "accuracy/output_cosine/"
PRECISION_AXES = ("quantize", "hybrid.layers")
BOARD_LATENCY = ("latency/board_py_infer_ms_p50", "latency/board_cpp_run_ms_p50")

Plot = Callable[[object, str], str]      # (figure, file stem) -> the PNG's name beside the report


def _cos(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.5f}"


def worst_rows(run: RunRecord) -> list[dict]:
    """The top-k rows the run logged (empty when it has no analysis or the tag is not JSON)."""
    try:
        rows = json.loads(run.tags.get(WORST_TAG, "[]"))
    except ValueError:
        return []
    return rows if isinstance(rows, list) else []


def worst_figure(run: RunRecord, rows: list[dict]):
    """Horizontal bars of 1 - single-layer cosine, worst on top, log scale (the values span decades)."""
    import matplotlib

    from rkbench.report.plots import STYLE, _figure

    with matplotlib.rc_context(STYLE):
        fig, ax = _figure(f"worst layers, single-layer error\n{run.name}", "1 - cosine (int8 vs float, log)", "", None)
        ax.title.set_fontsize(8)
        names = [r["name"][-40:] for r in rows][::-1]
        values = [max(1.0 - r["single_cos"], 1e-7) for r in rows][::-1]
        ax.barh(range(len(rows)), values, color="tab:red")
        ax.set_yticks(range(len(rows)), labels=names, fontsize=7)
        ax.set_xscale("log")
        fig.tight_layout()
    return fig


def per_layer(sel: Selection, plot: Optional[Plot] = None) -> list[str]:
    runs = [r for r in sel.runs if worst_rows(r)]
    if not runs:
        return []
    lines = ["", "## Per-layer accuracy (rknn-toolkit2 accuracy_analysis)", "",
             "Measured with the rknn-toolkit2 simulator on the host: each layer's int8 output against the float "
             "model on the same image (mean over the analysed images). single: the layer fed the float input, its "
             "own quantization error (what hybrid quantization fixes); entire: errors accumulated from the input. "
             "q_zero layers (quantized output all zeros) have no cosine and are not ranked. The toolkit's "
             "error_analysis.txt of each image is in the run's artifacts (accuracy/)."]
    for r in runs:
        rows = worst_rows(r)
        m = r.metrics
        lines += ["", f"### {r.name}", "",
                  f"{len(rows)} worst of {m.get('accuracy/layers', math.nan):.0f} layers over "
                  f"{m.get('accuracy/images', math.nan):.0f} image(s); lowest accumulated cosine "
                  f"{_cos(m.get('accuracy/worst_entire_cosine'))}; q_zero layers "
                  f"{m.get('accuracy/q_zero_layers', 0):.0f}" + (f"; layers kept in float16: {r.tags[HYBRID_TAG]}"
                                                                 if r.tags.get(HYBRID_TAG) else ""), "",
                  tables.markdown(["rank", "layer", "op", "single cos", "single euc", "entire cos", "entire euc"],
                                  [[i + 1, row["name"], row["kind"], _cos(row["single_cos"]), row["single_euc"],
                                    _cos(row["entire_cos"]), row["entire_euc"]] for i, row in enumerate(rows)],
                                  [True, False, False, True, True, True, True])]
        if plot:
            lines += ["", f"![worst layers of {r.name}]({plot(worst_figure(r, rows), f'worst_layers_{r.name}')})"]
    outputs = sorted({k.removeprefix(OUTPUT_COSINE) for r in runs for k in r.metrics if k.startswith(OUTPUT_COSINE)})
    if outputs:
        lines += ["", "Accumulated (entire) cosine at each model output, int8 vs float:", "",
                  tables.markdown(["output"] + [r.name for r in runs],
                                  [[o] + [_cos(r.metrics.get(OUTPUT_COSINE + o)) for r in runs] for o in outputs],
                                  [False] + [True] * len(runs))]
    return lines


def precision(run: RunRecord) -> Optional[str]:
    if run.param("quantize") == "False":
        return "fp16"
    if run.param("quantize") != "True" or run.param("hybrid.layers") == "-":
        return None
    return "int8" if run.param("hybrid.layers") == "0" else "hybrid"


def recovery_line(int8: RunRecord, hybrid: RunRecord, fp16: RunRecord) -> str:
    """keeping these N layers in float recovers X of the Y mAP lost (Y: fp16 - int8, X: hybrid - int8)."""
    a, b, c = (r.metrics.get(EVAL_MAP) for r in (int8, hybrid, fp16))
    kept = [n for n in hybrid.tags.get(HYBRID_TAG, "").split(",") if n]
    if None in (a, b, c):
        return f"- {hybrid.name}: no mAP50-95 for one of int8 / hybrid / fp16 (failed run?)"
    lost, gained = c - a, b - a
    share = f" ({gained / lost:.0%})" if lost > 0 else ""
    return (f"- keeping these {len(kept)} layers in float ({', '.join(f'`{n}`' for n in kept)}) recovers "
            f"{gained:+.4f} of the {lost:.4f} mAP50-95 lost{share}: int8 {a:.4f}, hybrid {b:.4f}, fp16 {c:.4f}")


def int8_only_axes() -> frozenset[str]:
    """Axes an fp16 run collapses to their defaults (spec.APPLIES): they cannot match int8 to fp16 runs."""
    from rkbench import spec

    return frozenset(k for keys, applies, _ in spec.APPLIES if applies is spec.quantizes for k in keys)


def hybrid(sel: Selection) -> list[str]:
    """One table per configuration of the other swept axes (runs matched on them)."""
    others = [a for a in sel.axes if a not in PRECISION_AXES and a not in int8_only_axes()]
    groups: dict[tuple, dict[str, list[RunRecord]]] = {}
    for r in latest_per_config(sel.runs, sel.axes):
        kind = precision(r)
        if kind:
            groups.setdefault(tuple(r.param(a) for a in others), {}).setdefault(kind, []).append(r)
    groups = {k: g for k, g in groups.items() if "hybrid" in g}
    if not groups:
        return []
    latency = [m for m in BOARD_LATENCY if any(m in r.metrics for r in sel.runs)]
    lines = ["", "## int8 vs hybrid vs fp16", "",
             "mAP50-95 on the target runtime (the simulator, or a board); hybrid keeps the int8 model's worst layers "
             "(lowest single-layer cosine of accuracy_analysis) in float16. Latency only where a board ran the model: "
             "simulator times are not NPU latency."]
    for key, g in groups.items():
        fp16 = next(iter(g.get("fp16", [])), None)
        rows = []
        for kind in ("int8", "hybrid", "fp16"):
            for r in g.get(kind, []):
                drop = (r.metrics.get(EVAL_MAP) - fp16.metrics[EVAL_MAP]
                        if fp16 and EVAL_MAP in r.metrics and EVAL_MAP in fp16.metrics else None)
                kept = {"int8": 0.0, "fp16": "all"}.get(kind, r.metrics.get("hybrid/layers"))
                rows.append([kind, kept, r.metrics.get(EVAL_MAP),
                             drop, r.metrics.get("convert/rknn_mib")] + [r.metrics.get(m) for m in latency])
        title = ", ".join(f"{a}={v}" for a, v in zip(others, key))
        lines += [""] + ([f"### {title}", ""] if title else []) + [tables.markdown(
            ["precision", "layers in float16", "mAP50-95", "mAP50-95 - fp16", ".rknn MiB"] + latency, rows,
            [False] + [True] * (4 + len(latency))), ""]
        for h in g["hybrid"]:
            if fp16 and g.get("int8"):
                lines.append(recovery_line(g["int8"][0], h, fp16))
            else:
                lines.append(f"- {h.name}: no int8 and fp16 run of this configuration to compare with "
                             "(sweep quantize=true,false hybrid.layers=0,N)")
    return lines


def sections(sel: Selection, plot: Optional[Plot] = None) -> list[str]:
    return per_layer(sel, plot) + hybrid(sel)
