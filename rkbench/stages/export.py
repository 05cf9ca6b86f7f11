"""Stage 1: model source -> ONNX with the chosen head, resolution and activation."""

from __future__ import annotations

import importlib.metadata as md
import shutil
from pathlib import Path
from typing import Optional

from rkbench.cache import StageCache, sha256_file, stage_key
from rkbench.config import ModelConfig, resolve_path
from rkbench.errors import DataError, RkbenchError, StageError, UnsupportedCombination
from rkbench.stages import Artifact, from_cache

EXPORT_CODE_VERSION = 2  # bump when heads.py changes the graphs it writes
STRIDES = (8, 16, 32)


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


def _dims(value) -> list:
    """A tensor's shape from the graph, None for a symbolic (dynamic) dimension."""
    return [d.dim_value or None for d in value.type.tensor_type.shape.dim]


def _rknn_head(shapes: list[list], grids: list[int]) -> Optional[tuple[int, int]]:
    """(num_classes, reg_max) if the outputs are rknn_model_zoo's per-scale triples, else None."""
    if len(shapes) != 3 * len(grids):
        return None
    box, cls = shapes[0], shapes[1]
    if len(box) != 4 or len(cls) != 4 or not box[1] or not cls[1] or box[1] % 4:
        return None
    expected = [s for g in grids for s in ([1, box[1], g, g], [1, cls[1], g, g], [1, 1, g, g])]
    same = all(len(a) == 4 and a[0] in (1, None) and a[1:] == e[1:] for a, e in zip(shapes, expected))
    return (cls[1], box[1] // 4) if same else None


def describe_onnx_head(path: Path, resolution: int) -> dict:
    """What a ready YOLOv8 ONNX is, read from its graph alone (onnx, never torch: preflight calls this
    before any conversion): {"head", "num_classes", "reg_max", "input_size", "input_name", "output_names"}.
    Raises DataError saying what was found and what was expected, UnsupportedCombination when its fixed
    input size is not `resolution`."""
    import onnx

    path = Path(path)
    try:
        graph = onnx.load(str(path), load_external_data=False).graph
    except Exception as exc:  # protobuf/IO errors come in many types: all mean "not an ONNX we can read"
        raise DataError(f"{path} is not a readable ONNX file ({type(exc).__name__}): export it again") from exc
    weights = {i.name for i in graph.initializer}
    inputs = [i for i in graph.input if i.name not in weights]  # old exporters also list weights as inputs
    shape = _dims(inputs[0]) if len(inputs) == 1 else []
    if len(shape) != 4 or shape[0] not in (1, None) or shape[1] != 3 or shape[2] != shape[3]:
        raise DataError(f"{path.name} takes {[_dims(i) for i in inputs]}: expected one image input [1, 3, S, S] "
                        "(an Ultralytics YOLOv8 export)")
    size = shape[3]
    if size is None:
        raise DataError(f"{path.name} has a dynamic input size: export it with a fixed imgsz={resolution} (dynamic=False)")
    if size != resolution:
        raise UnsupportedCombination(f"{path.name} takes {size} px input: set resolution={size}")
    shapes = [_dims(o) for o in graph.output]
    grids = [size // s for s in STRIDES]
    anchors = sum(g * g for g in grids)
    found = {"input_size": size, "input_name": inputs[0].name, "output_names": [o.name for o in graph.output]}
    if len(shapes) == 1 and len(shapes[0]) == 3 and shapes[0][0] in (1, None) and (shapes[0][1] or 0) > 4 \
            and shapes[0][2] == anchors:
        return dict(found, head="ultralytics", num_classes=shapes[0][1] - 4, reg_max=16)
    rknn = _rknn_head(shapes, grids)
    if rknn:
        return dict(found, head="rknn", num_classes=rknn[0], reg_max=rknn[1])
    shown = ", ".join(str([d if d else "?" for d in s]) for s in shapes)
    raise DataError(f"{path.name} is not a YOLOv8 detector at {size} px: its outputs are {shown}; expected one "
                    f"[1, 4+nc, {anchors}] (official head) or, per stride 8/16/32, box [1, 4*reg_max, H, W], classes "
                    f"[1, nc, H, W], score sum [1, 1, H, W] with H = W = {', '.join(map(str, grids))} (rknn head): give a YOLOv8 detection ONNX")


def adopt_yolov8_onnx(src: Path, dst: Path, resolution: int, head: str) -> dict:
    """A ready YOLOv8 ONNX is used as it is: its head layout and size come from the graph."""
    found = describe_onnx_head(src, resolution)
    if found["head"] != head:
        raise UnsupportedCombination(f"{src.name} has the {found['head']} head: set export={found['head']}")
    shutil.copyfile(src, dst)
    nc = found["num_classes"]
    return {"head": head, "num_classes": nc, "names": [str(i) for i in range(nc)], "reg_max": found["reg_max"],
            "input_name": found["input_name"], "output_names": found["output_names"]}


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


def grayscale(onnx_in: Artifact, cache: StageCache) -> Artifact:
    """The 1-channel model of `channels=1` (heads.to_grayscale), cached by the 3-channel model's content."""
    key = stage_key("grayscale", src=onnx_in.sha256, code=EXPORT_CODE_VERSION)
    with cache.open("grayscale", key) as entry:
        if not entry.hit:
            import onnx

            from rkbench.models.heads import to_grayscale

            out = cache.begin(entry) / "model.onnx"
            try:
                gray = to_grayscale(onnx.load(str(onnx_in.path)))
            except ValueError as exc:
                raise StageError("export", f"cannot derive a 1-channel model: {exc}", "use channels=3") from None
            onnx.save(gray, str(out))
            shape = list(onnx_in.info.get("input_shape") or [])
            info = dict(onnx_in.info, channels=1, **({"input_shape": shape[:1] + [1] + shape[2:]} if len(shape) == 4 else {}))
            cache.commit(entry, {"onnx": out.name}, info)
        return from_cache(entry, "onnx")
