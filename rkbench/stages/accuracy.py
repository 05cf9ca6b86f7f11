"""Per-layer quantization error with rknn-toolkit2's accuracy_analysis on the simulator, and the layers a
hybrid quantization keeps in float16.

accuracy_analysis runs the float model ('golden') and the quantized one (the simulator) on an image and
writes error_analysis.txt: per layer, the cosine and euclidean distance of the quantized output to the
float one, 'entire' (errors accumulated from the input) and 'single' (the layer fed the float input:
its own quantization error). 'single' ranks the layers to keep in higher precision; 'entire' at the model
outputs says what reaches the decoder. Host-side, real numbers: the simulator is the quantized model.

The analysis is a cached stage (`<cache>/accuracy/<key>/`) keyed like convert plus the analysed images."""

from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable, Optional

from rkbench.cache import StageCache, stage_key
from rkbench.errors import StageError
from rkbench.stages import Artifact
from rkbench.stages.convert import write_calibration
from rkbench.toolkit import MEAN, STD, ConvertOptions, accuracy_analysis, build_rknn, toolkit_version

log = logging.getLogger("rkbench.accuracy")

# Rows that are not layers of the model: the input itself and the toolkit's int8 <-> float conversions.
NOT_LAYERS = ("Input", "exDataConvert")
# "[Conv] /model.0/conv/Conv_output_0   0.99998 | 2.36675   0.99998 | 2.36675" (entire cos | euc, single cos
# | euc); "q_zero" where the quantized output is all zeros (cosine undefined); no numbers where the toolkit
# computed none (a layer fused into the next).
ROW = re.compile(r"^\[(?P<kind>[^\]]+)\]\s+(?P<name>\S+)(?P<rest>.*)$")
PAIR = re.compile(r"(\S+)\s*\|\s*(\S+)")
Q_ZERO = "q_zero"


@dataclass(frozen=True)
class LayerError:
    kind: str                       # the toolkit's op type: Conv, exSwish, Sigmoid, ...
    name: str                       # output tensor name, a key of the hybrid .quantization.cfg
    entire_cos: Optional[float]     # None: q_zero or not computed
    entire_euc: Optional[float]
    single_cos: Optional[float]
    single_euc: Optional[float]
    q_zero: bool = False            # the quantized output was all zeros on some analysed image

    @property
    def is_layer(self) -> bool:
        return self.kind not in NOT_LAYERS


def _number(text: str) -> Optional[float]:
    return None if text == Q_ZERO else float(text)


def parse_error_analysis(text: str) -> list[LayerError]:
    """The rows of an error_analysis.txt written by rknn-toolkit2 2.x, in model order (the name -> file
    table some versions append after them is not read)."""
    layers = []
    for line in text.splitlines():
        row = ROW.match(line.strip())
        if not row:
            continue
        pairs = PAIR.findall(row["rest"])
        if len(pairs) not in (0, 2):
            raise StageError("accuracy", f"unreadable error_analysis.txt row: {line.strip()!r}",
                             "this rknn-toolkit2 writes another layout: pin rknn-toolkit2==2.5.0")
        values = [_number(v) for pair in pairs for v in pair] or [None] * 4
        zero = any(Q_ZERO in pair for pair in pairs)
        layers.append(LayerError(row["kind"], row["name"], *values, q_zero=zero))
    if not layers:
        raise StageError("accuracy", "error_analysis.txt has no layer rows",
                         "see accuracy.log in the run's artifacts")
    return layers


def _mean(values: list[Optional[float]]) -> Optional[float]:
    present = [v for v in values if v is not None]
    return sum(present) / len(present) if present else None


def average(per_image: list[list[LayerError]]) -> list[LayerError]:
    """One row per layer over several images: the mean of each distance where it was computed; q_zero if
    any image had it. Layers are matched by name (the same model: the same rows)."""
    rows: dict[str, list[LayerError]] = {}
    for layers in per_image:
        for layer in layers:
            rows.setdefault(layer.name, []).append(layer)
    return [LayerError(same[0].kind, name, *(_mean([getattr(s, f) for s in same])
                                             for f in ("entire_cos", "entire_euc", "single_cos", "single_euc")),
                       q_zero=any(s.q_zero for s in same)) for name, same in rows.items()]


def worst(layers: list[LayerError], n: int) -> list[LayerError]:
    """The n layers with the lowest single-layer cosine (their own quantization error), ties by the larger
    euclidean distance. Only model layers with a computed cosine compete."""
    ranked = [l for l in layers if l.is_layer and l.single_cos is not None]
    return sorted(ranked, key=lambda l: (l.single_cos, -(l.single_euc or 0.0)))[:n]


@dataclass(frozen=True)
class Analysis:
    layers: list[LayerError]        # averaged over the analysed images
    images: int
    files: list[Path]               # the toolkit's own files: <i>_error_analysis.txt, <i>_map_name_to_file.txt
    log: Path
    cache_key: str
    cached: bool


def analyse(onnx: Artifact, opts: ConvertOptions, resolution: int, calib_images: list[Path], calib_hash: str,
            images: list[Path], images_hash: str, cache: StageCache) -> Analysis:
    """accuracy_analysis of the int8 (or hybrid, opts.hybrid) model built from this ONNX, one call per image;
    cached: the same inputs give the same file."""
    key = stage_key("accuracy", onnx=onnx.sha256, opts=asdict(opts), mean=MEAN, std=STD, resolution=resolution,
                    calib=calib_hash, images=images_hash, toolkit=toolkit_version())
    hint = "see accuracy.log in the run's artifacts"
    with cache.open("accuracy", key) as entry:
        if entry.failure:
            raise StageError("accuracy", f"{entry.failure['detail']} (cached failure: delete {entry.dir} to retry)",
                             entry.failure["hint"], deterministic=True)
        if not entry.hit:
            work = cache.begin(entry)
            calib_list = write_calibration(calib_images, resolution, work / "calib")
            inputs = write_calibration(images, resolution, work / "inputs")   # letterboxed like inference
            log.info("accuracy_analysis of %d image(s) on the rknn-toolkit2 %s simulator (%s)", len(images),
                     toolkit_version(), opts.describe(len(calib_images)))
            try:
                rknn = build_rknn(onnx.path, opts, calib_list, work / "accuracy.log", hint)
                try:
                    files = accuracy_analysis(rknn, [inputs.parent / n for n in inputs.read_text().split()], work,
                                              work / "accuracy.log", hint)
                finally:
                    rknn.release()
            except StageError as err:   # the build under the analysis failed: this stage failed
                if err.deterministic:
                    cache.fail(entry, err.detail, err.hint)
                raise StageError("accuracy", err.detail, err.hint, deterministic=err.deterministic) from err
            outputs = {"log": "accuracy.log"}
            for f in files + [f.with_name(f.name.replace("error_analysis", "map_name_to_file")) for f in files]:
                if f.exists():
                    outputs[f.stem] = f.name
            cache.commit(entry, outputs, {"images": len(images), "options": asdict(opts)})
        else:
            log.info("accuracy_analysis taken from the stage cache (analysed before with these inputs)")
        out = entry.meta["outputs"]
        files = [entry.dir / out[k]["file"] for k in sorted(out) if k.endswith("error_analysis")]
        per_image = [parse_error_analysis(f.read_text(errors="replace")) for f in files]
        kept = [entry.dir / o["file"] for k, o in sorted(out.items()) if k != "log"]
        return Analysis(average(per_image), len(files), kept, entry.dir / out["log"]["file"], key, entry.hit)


def metrics(analysis: Analysis, outputs: list[str]) -> dict[str, float]:
    """accuracy/*: the worst layer's single-layer cosine and euclidean distance, the lowest accumulated
    ('entire') cosine, the count of layers and of q_zero layers, and the entire cosine at each model output."""
    layers = [l for l in analysis.layers if l.is_layer]
    out: dict[str, float] = {"accuracy/layers": float(len(layers)),
                             "accuracy/q_zero_layers": float(sum(l.q_zero for l in analysis.layers)),
                             "accuracy/images": float(analysis.images)}
    bad = worst(layers, 1)
    if bad:
        out["accuracy/worst_cosine"] = bad[0].single_cos
        out["accuracy/worst_euclidean"] = bad[0].single_euc if bad[0].single_euc is not None else math.nan
    entire = [l.entire_cos for l in layers if l.entire_cos is not None]
    if entire:
        out["accuracy/worst_entire_cosine"] = min(entire)
    final = {l.name: l for l in analysis.layers}   # the last row of a name: the float output after conversion
    for name in outputs:
        if name in final and final[name].entire_cos is not None:
            out[f"accuracy/output_cosine/{name}"] = final[name].entire_cos
    return {k: v for k, v in out.items() if not math.isnan(v)}


WORST_TAG = "rkbench.accuracy.worst"      # JSON rows of the top-k layers: the report's table and plot
HYBRID_TAG = "rkbench.hybrid.layers"      # the layers a hybrid run kept in float16, comma-separated


def worst_tag(analysis: Analysis, top_k: int) -> str:
    """The top-k rows as compact JSON (an MLflow tag holds up to 8000 characters: rows are cut to fit)."""
    rows = [{"kind": l.kind, "name": l.name, **{f: None if getattr(l, f) is None else round(getattr(l, f), 6)
                                                 for f in ("single_cos", "single_euc", "entire_cos", "entire_euc")}}
            for l in worst(analysis.layers, top_k)]
    kept, size = [], 2                      # the brackets
    for row in rows:
        size += len(json.dumps(row, separators=(",", ":"))) + 1
        if size > 8000:
            break
        kept.append(row)
    return json.dumps(kept, separators=(",", ":"))


def hybrid_options(opts: ConvertOptions, analysis: Analysis, n: int) -> ConvertOptions:
    """The int8 options with the n worst layers of `analysis` (made without hybrid) kept in float16."""
    kept = tuple(l.name for l in worst(analysis.layers, n))
    log.info("hybrid quantization: keeping the %d layers with the lowest single-layer cosine in float16: %s",
             len(kept), ", ".join(kept))
    return replace(opts, hybrid=kept)


def run_studies(run, onnx: Artifact, opts: ConvertOptions, calib: list[Path], calib_hash: str, images: list[Path],
                images_hash: str, cache: StageCache, attach: Callable[[Path, str], None]
                ) -> tuple[ConvertOptions, dict[str, float], dict[str, str]]:
    """What the accuracy and hybrid axes add to an int8 run, before its conversion: with hybrid.layers = N the
    options that keep the N worst layers (analysis of the plain int8 model) in float16; with
    accuracy.analysis the analysis of the run's own model, as metrics, the top-k tag and artifacts."""
    found: dict[str, float] = {}
    tags: dict[str, str] = {}
    if run.hybrid.layers:
        base = analyse(onnx, opts, run.resolution, calib, calib_hash, images, images_hash, cache)
        opts = hybrid_options(opts, base, run.hybrid.layers)
        tags[HYBRID_TAG] = ",".join(opts.hybrid)
        found["hybrid/layers"] = float(len(opts.hybrid))
        tags["rkbench.cache.accuracy"] = base.cache_key[:16]
    if run.accuracy.analysis:
        own = analyse(onnx, opts, run.resolution, calib, calib_hash, images, images_hash, cache)
        found.update(metrics(own, list(onnx.info.get("output_names", []))))
        tags[WORST_TAG] = worst_tag(own, run.accuracy.top_k)
        tags["rkbench.cache.accuracy"] = own.cache_key[:16]
        for f in own.files + [own.log]:
            attach(f, "accuracy")
    return opts, found, tags
