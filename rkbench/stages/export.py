"""Stage 1: model source -> ONNX with the chosen head, resolution and activation."""

from __future__ import annotations

import importlib.metadata as md
from pathlib import Path

from rkbench.cache import StageCache, sha256_file, stage_key
from rkbench.config import ModelConfig, resolve_path
from rkbench.errors import DataError, RkbenchError, StageError, UnsupportedCombination
from rkbench.stages import Artifact, from_cache

EXPORT_CODE_VERSION = 2  # bump when heads.py changes the graphs it writes


def _source_hash(model: ModelConfig) -> dict[str, str]:
    out = {}
    for key in ("weights", "onnx"):
        value = getattr(model, key)
        if value:
            out[key] = sha256_file(resolve_path(value))
    if model.yaml:
        p = resolve_path(model.yaml)
        out["yaml"] = sha256_file(p) if p.exists() else model.yaml  # Ultralytics built-in yaml names
    return out


def adopt_yolov8_onnx(src: Path, dst: Path, resolution: int, head: str) -> dict:
    """A ready YOLOv8 ONNX is used as it is: read its head layout and size from the graph."""
    import onnx

    graph = onnx.load(str(src)).graph
    dims = lambda v: [d.dim_value for d in v.type.tensor_type.shape.dim]  # noqa: E731
    outputs = [dims(o) for o in graph.output]
    found = "ultralytics" if len(outputs) == 1 else "rknn" if len(outputs) == 9 else None
    if found is None:
        raise UnsupportedCombination(f"{src.name} has {len(outputs)} outputs: expected 1 (official head) or 9 (rknn_model_zoo head)")
    if found != head:
        raise UnsupportedCombination(f"{src.name} has the {found} head: set export={found}")
    size = dims(graph.input[0])[-1]
    if size != resolution:
        raise UnsupportedCombination(f"{src.name} takes {size} px input: set resolution={size}")
    nc = outputs[0][1] - 4 if found == "ultralytics" else outputs[1][1]
    dst.write_bytes(src.read_bytes())
    return {"head": found, "num_classes": nc, "names": [str(i) for i in range(nc)], "reg_max": 16,
            "input_name": graph.input[0].name, "output_names": [o.name for o in graph.output]}


def export(model: ModelConfig, resolution: int, head: str, activation: str, cache: StageCache) -> Artifact:
    from rkbench.models import heads

    if model.family == "yolov5" and head != "rknn":
        raise UnsupportedCombination("YOLOv5 ONNX is cut at the head convolutions (DFL-free anchor decode on the CPU): "
                                     "use export=rknn", stage="export")
    key = stage_key("export", model=model.__dict__, resolution=resolution, head=head, activation=activation,
                    sources=_source_hash(model), code=EXPORT_CODE_VERSION,
                    torch=md.version("torch"), ultralytics=md.version("ultralytics"), onnx=md.version("onnx"))
    with cache.open("export", key) as entry:  # a failure leaves no folder behind and is not remembered
        if not entry.hit:
            out = cache.begin(entry) / "model.onnx"
            try:
                if model.family == "yolov5":
                    info = heads.cut_yolov5_onnx(resolve_path(model.onnx), out, model.head_outputs)
                    anchors = heads.yolov5_anchors(resolve_path(model.onnx),
                                                   resolve_path(model.weights) if model.weights else None,
                                                   default=model.anchors)
                    info["anchors"] = anchors.tolist()
                    if info.get("imgsz") and info["imgsz"] != resolution:
                        raise UnsupportedCombination(f"the YOLOv5 ONNX has a fixed {info['imgsz']} px input: set resolution={info['imgsz']} or re-export it at {resolution}")
                elif model.weights or model.yaml:
                    source = str(resolve_path(model.weights)) if model.weights else model.yaml
                    info = heads.export_yolov8_onnx(source, out, imgsz=resolution, head=head, activation=activation,
                                                    opset=model.opset)
                else:
                    info = adopt_yolov8_onnx(resolve_path(model.onnx), out, resolution, head)
            except RkbenchError:
                raise  # already says what to do; cache.open() tags it with this stage
            except Exception as exc:  # torch / onnx errors come in many types; all mean this export failed
                raise StageError("export", f"{type(exc).__name__}: {exc}", "check the model source loads with ultralytics.YOLO(path)") from exc
            info["family"] = model.family
            cache.commit(entry, {"onnx": out.name}, info)
        return from_cache(entry, "onnx")
