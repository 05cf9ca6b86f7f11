"""Model side of the export stage: Ultralytics YOLOv8 -> ONNX with either head, YOLOv5 ONNX -> cut graph.

The `rknn` head follows rknn_model_zoo: the graph stops at the per-scale convolutions and emits, per
stride 8/16/32, the raw box distribution [1, 64, H, W], the sigmoid class scores [1, nc, H, W] and their
clipped sum [1, 1, H, W]. DFL, decode and NMS run on the CPU (models/prepost.py), so the NPU never sees
the 8400-anchor concat/transpose tail that rknn-toolkit2 handles badly.

Nothing here downloads: weights are loaded with torch.load from a path that must exist (Ultralytics'
own loader fetches missing official names and pip-installs modules a pickle names)."""

from __future__ import annotations

import ast
import logging
import pickle
import types
from pathlib import Path
from typing import Any, Optional

import numpy as np

from rkbench.errors import ConfigError, DataError

log = logging.getLogger(__name__)

HEADS = ("ultralytics", "rknn")
ACTIVATIONS = ("silu", "relu")
COCO_ANCHORS = np.array([[10, 13, 16, 30, 33, 23], [30, 61, 62, 45, 59, 119], [116, 90, 156, 198, 373, 326]],
                        dtype=np.float32).reshape(3, 3, 2)


# ----------------------------------------------------------------------------------------------- YOLOv8

def _load_checkpoint(path: Path):
    """The model of an Ultralytics .pt, without Ultralytics' download / auto-install fallbacks."""
    import torch

    if not path.is_file():
        raise DataError(f"weights file {path} not found: check model.weights (nothing is downloaded)")
    try:
        ckpt = torch.load(str(path), map_location="cpu", weights_only=False)
    except ModuleNotFoundError as exc:
        if (exc.name or "").split(".")[0] in ("models", "utils"):
            raise DataError(f"{path.name} is a checkpoint of the ultralytics/yolov5 repo: export it to ONNX with "
                            "that repo and set model=yolov5 with model.onnx") from None
        raise DataError(f"{path.name} needs the module {exc.name!r}: re-save it with ultralytics "
                        "(YOLO(path).save(...)) or export an ONNX") from None
    except Exception as exc:  # zip / pickle / EOF errors: all mean a damaged file
        raise DataError(f"{path.name} is not a readable PyTorch checkpoint ({type(exc).__name__}): "
                        "re-download or re-export the weights") from None
    model = (ckpt.get("ema") or ckpt.get("model")) if isinstance(ckpt, dict) else ckpt
    if not isinstance(model, torch.nn.Module):
        raise DataError(f"{path.name} holds no model under 'ema' or 'model': save it with YOLO(...).save(path)")
    return model


def load_ultralytics(source: str):
    """An Ultralytics DetectionModel (fp32, eval) from a .pt or a model yaml (a file or a built-in name)."""
    import torch
    from ultralytics.nn.modules import Detect
    from ultralytics.nn.tasks import DetectionModel

    if source.endswith((".yaml", ".yml")):
        # Random initial weights: seed a private RNG so the same yaml gives the same ONNX bytes.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            try:
                model = DetectionModel(source, verbose=False)
            except FileNotFoundError:
                raise DataError(f"model yaml {source} not found: give a yaml path or a built-in name "
                                "such as yolov8n.yaml") from None
            except Exception as exc:  # yaml / parse errors
                raise DataError(f"cannot build a model from {source} ({type(exc).__name__}: {exc}): "
                                "check the yaml is an Ultralytics detection model") from None
    else:
        model = _load_checkpoint(Path(source))
    detect = model.model[-1] if hasattr(model, "model") else None
    if type(detect) is not Detect or getattr(detect, "end2end", False):  # Segment/Pose/v10 heads differ
        raise DataError(f"{source} is not a YOLOv8-style detection model (last layer "
                        f"{type(detect).__name__}): use a YOLOv8 detect .pt or yaml")
    model = model.float().eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def swap_activation(model, activation: str) -> int:
    """Replace every SiLU module with ReLU (in place); returns how many were swapped."""
    import torch.nn as nn

    if activation == "silu":
        return 0
    swapped = 0
    for module in model.modules():
        for name, child in module.named_children():
            if isinstance(child, nn.SiLU):
                setattr(module, name, nn.ReLU())
                swapped += 1
    return swapped


def _prepare_for_export(model, imgsz: int):
    """What Ultralytics' Exporter does to a detection model before torch.onnx.export (format=onnx,
    dynamic=False, nms=False): fuse Conv+BN, Detect in export mode, C2f with the Split forward."""
    from ultralytics.nn.modules import C2f, Detect

    model = model.fuse(verbose=False)
    anchors = sum((imgsz // int(s)) ** 2 for s in model.stride.tolist())
    for m in model.modules():
        if isinstance(m, Detect):
            m.dynamic, m.export, m.format = False, True, "onnx"
            m.max_det, m.xyxy, m.shape = min(300, anchors), False, None
        elif isinstance(m, C2f):
            m.forward = m.forward_split
    return model


def _rknn_head_module(model):
    import torch
    import torch.nn as nn

    detect = model.model[-1]

    class RknnHead(nn.Module):
        """The Ultralytics graph up to Detect (as BaseModel._predict_once), then only its per-scale
        convolution branches."""

        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, x):
            saved = []
            for m in self.model.model:
                if m.f != -1:
                    x = saved[m.f] if isinstance(m.f, int) else [x if j == -1 else saved[j] for j in m.f]
                if m is detect:
                    break
                x = m(x)
                saved.append(x if m.i in self.model.save else None)
            outputs = []
            for i in range(detect.nl):
                box = detect.cv2[i](x[i])
                cls = torch.sigmoid(detect.cv3[i](x[i]))
                outputs += [box, cls, torch.clamp(cls.sum(1, keepdim=True), 0.0, 1.0)]
            return tuple(outputs)

    return RknnHead().eval()


def export_yolov8_onnx(model_source: str, out_path: Path, imgsz: int, head: str, activation: str = "silu",
                       opset: int = 12, batch: int = 1) -> dict:
    """Export with the official head (output0 [batch, 4+nc, A]) or the rknn_model_zoo head (per stride s:
    box{s} [batch, 64, H, W], cls{s} [batch, nc, H, W], sum{s} [batch, 1, H, W]). Deterministic bytes."""
    import torch

    if head not in HEADS:
        raise ConfigError(f"unknown head {head!r}: use one of {', '.join(HEADS)}")
    if activation not in ACTIVATIONS:
        raise ConfigError(f"unknown activation {activation!r}: use one of {', '.join(ACTIVATIONS)}")
    if imgsz % 32:
        raise ConfigError(f"imgsz {imgsz} is not a multiple of 32 (the largest stride): pick e.g. {imgsz // 32 * 32 or 32}")
    model = _prepare_for_export(load_ultralytics(model_source), imgsz)
    detect = model.model[-1]
    swapped = swap_activation(model, activation)
    if head == "rknn":
        net = _rknn_head_module(model)
        output_names = [f"{kind}{int(s)}" for s in detect.stride.tolist() for kind in ("box", "cls", "sum")]
    else:
        net, output_names = model, ["output0"]
    dummy = torch.zeros(batch, 3, imgsz, imgsz)
    with torch.no_grad():
        y = net(dummy)  # dry run: builds Detect's anchor cache before tracing, as the exporter does
        torch.onnx.export(net, dummy, str(out_path), opset_version=opset, input_names=["images"],
                          output_names=output_names, do_constant_folding=True)
    outputs = [y] if isinstance(y, torch.Tensor) else list(y)
    names = [str(model.names[i]) for i in sorted(model.names)] if isinstance(model.names, dict) else list(model.names)
    info = {"head": head, "num_classes": int(detect.nc), "names": names, "strides": [int(s) for s in detect.stride.tolist()],
            "reg_max": int(detect.reg_max), "input_name": "images", "input_shape": list(dummy.shape),
            "output_names": output_names, "output_shapes": [list(o.shape) for o in outputs],
            "activation": activation, "activations_swapped": swapped, "opset": opset}
    if swapped:
        info["note"] = f"{swapped} SiLU modules replaced by {activation}: accuracy needs weights trained with {activation}"
    return info


# ----------------------------------------------------------------------------------------------- YOLOv5

def _load_onnx(path: Path):
    import onnx

    if not Path(path).is_file():
        raise DataError(f"ONNX file {path} not found: check model.onnx")
    try:
        return onnx.load(str(path))
    except Exception as exc:  # protobuf DecodeError and friends
        raise DataError(f"{path} is not a readable ONNX file ({type(exc).__name__}): re-export it") from None


def _dims(value_info) -> list[int]:
    return [d.dim_value for d in value_info.type.tensor_type.shape.dim]


def _shapes(model) -> dict[str, list[int]]:
    import onnx

    inferred = onnx.shape_inference.infer_shapes(model)
    return {v.name: _dims(v) for v in list(inferred.graph.value_info) + list(inferred.graph.output)
            + list(inferred.graph.input)}


def _constants(model) -> dict[str, np.ndarray]:
    """Initializers and Constant-node values by tensor name."""
    from onnx import numpy_helper

    out = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    for node in model.graph.node:
        for attr in node.attribute if node.op_type == "Constant" else ():
            if attr.name == "value":
                out[node.output[0]] = numpy_helper.to_array(attr.t)
    return out


def _detect_convs(model) -> list[tuple[str, int, int]]:
    """(output, channels, na) of each Conv feeding a Reshape to [bs, na, 5+nc, H, W], in graph order.
    In a dynamic graph the Reshape target is computed, not constant: then na = 3 and channels = 3*(5+nc)."""
    consumers: dict[str, list] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    weights = {t.name: list(t.dims) for t in model.graph.initializer}
    consts = _constants(model)
    found = []
    for node in model.graph.node:
        reshapes = [n for n in consumers.get(node.output[0], []) if n.op_type == "Reshape"]
        if node.op_type != "Conv" or not reshapes:
            continue
        channels = weights.get(node.input[1], [0])[0]
        target = consts.get(reshapes[0].input[1])
        na, no = (int(target[1]), int(target[2])) if target is not None and target.size == 5 else (3, channels // 3)
        if na * no == channels and no > 5:
            found.append((node.output[0], channels, na))
    return found


def find_yolov5_head(model) -> tuple[list[str], int]:
    """The three Detect convolutions [1, na*(5+nc), H, W], stride 8 first, and na."""
    found = _detect_convs(model)
    if len(found) != 3 or len({c for _, c, _ in found}) != 1:
        raise DataError(f"found {len(found)} YOLOv5 head convolutions instead of 3 alike: name them with "
                        "model.head_outputs=[out8,out16,out32]")
    shapes = _shapes(model)
    # Largest map first (stride 8); graph order (the Detect loop's order) breaks ties in dynamic graphs.
    order = sorted(range(3), key=lambda i: -(shapes.get(found[i][0], [0, 0, 0])[2] or 0))
    return [found[i][0] for i in order], found[0][2]


def _onnx_class_names(model, nc: int) -> list[str]:
    """The yolov5 repo's export.py stores {'names': "{0: 'person', ...}"} in the metadata."""
    for prop in model.metadata_props:
        if prop.key == "names":
            try:
                names = ast.literal_eval(prop.value)
            except (ValueError, SyntaxError):
                break
            names = [names[k] for k in sorted(names)] if isinstance(names, dict) else list(names)
            if len(names) == nc:
                return [str(n) for n in names]
    return [str(i) for i in range(nc)]


def cut_yolov5_onnx(src: Path, dst: Path, output_names: Optional[list[str]] = None) -> dict:
    """Write the YOLOv5 graph up to its three head convolutions [1, na*(5+nc), H, W] (stride 8, 16, 32)."""
    import onnx.utils

    model = _load_onnx(src)
    if output_names:
        names = list(output_names)
        na = {out: n for out, _, n in _detect_convs(model)}.get(names[0], 3)
    else:
        names, na = find_yolov5_head(model)
    initializers = {t.name for t in model.graph.initializer}
    inputs = [i.name for i in model.graph.input if i.name not in initializers]
    # Extractor looks the cut tensors up in value_info, which only shape inference fills in.
    inferred = onnx.shape_inference.infer_shapes(model)
    known = {v.name for v in list(inferred.graph.value_info) + list(inferred.graph.output)}
    missing = [n for n in names if n not in known]
    if missing:
        raise DataError(f"{src.name} has no tensor {missing[0]!r}: set model.head_outputs to three tensor names "
                        "of the graph (e.g. from netron)")
    cut = onnx.utils.Extractor(inferred).extract_model(inputs, names)
    onnx.save(cut, str(dst))
    shapes = _shapes(cut)
    channels = shapes[names[0]][1]
    nc = channels // na - 5
    return {"head": "yolov5", "num_classes": nc, "names": _onnx_class_names(model, nc), "output_names": names,
            "output_shapes": [shapes[n] for n in names], "input_name": inputs[0],
            "imgsz": shapes[inputs[0]][-1] or None, "anchors_per_scale": na}


def anchors_from_onnx(model) -> Optional[np.ndarray]:
    """YOLOv5's export bakes anchor_grid constants [1, na, H, W, 2] (pixels) into the graph: read them back."""
    grids = [t for t in _constants(model).values() if t.ndim == 5 and t.shape[0] == 1 and t.shape[-1] == 2]
    if len(grids) != 3 or len({g.shape[1] for g in grids}) != 1:
        return None
    per_scale = [g[0, :, 0, 0, :].astype(np.float32) for g in grids]
    # stride 8 first: the largest grid; YOLOv5 keeps anchors in stride order, so area breaks ties
    order = sorted(range(3), key=lambda i: (-grids[i].shape[2], float(per_scale[i].prod(1).mean())))
    return np.stack([per_scale[i] for i in order])


class _Stub:
    """Stands in for a class of the yolov5 repo while unpickling: keeps the pickled state, runs no code."""

    def __init__(self, *args: Any, **kwargs: Any):
        pass

    def __setstate__(self, state: Any):
        self.__dict__.update(state if isinstance(state, dict) else {"_state": state})


_SAFE_BUILTINS = {"set", "frozenset", "slice", "range", "complex", "bytearray", "bytes", "dict", "list", "tuple",
                  "int", "float", "bool", "str", "object"}
_REAL_MODULES = ("torch", "collections", "numpy", "_codecs", "copyreg", "pathlib")


class _StubUnpickler(pickle.Unpickler):
    """torch/numpy objects load as themselves; every other class (models.yolo.Detect, ...) becomes an
    inert _Stub subclass, so a yolov5 checkpoint opens without the yolov5 repo."""

    def find_class(self, module: str, name: str):
        if module == "builtins":
            if name in _SAFE_BUILTINS:
                return super().find_class(module, name)
            raise pickle.UnpicklingError(f"builtins.{name} is not allowed in a checkpoint")
        if module.split(".")[0] in _REAL_MODULES:
            return super().find_class(module, name)
        return type(name, (_Stub,), {"__module__": module})


def _member(obj: Any, name: str) -> Any:
    """An attribute of a real or stubbed nn.Module: plain attribute, submodule, buffer or parameter."""
    state = vars(obj)
    if name in state:
        return state[name]
    for group in ("_modules", "_buffers", "_parameters"):
        if name in state.get(group, {}):
            return state[group][name]
    raise KeyError(name)


def anchors_from_checkpoint(checkpoint: Path) -> np.ndarray:
    """(3, na, 2) pixel anchors of a yolov5-repo .pt: Detect.anchors (stride units) * Detect.stride."""
    import torch

    if not checkpoint.is_file():
        raise DataError(f"checkpoint {checkpoint} not found: check model.weights or set model.anchors")
    module = types.SimpleNamespace(__name__="pickle", Unpickler=_StubUnpickler, load=pickle.load)
    try:
        ckpt = torch.load(str(checkpoint), map_location="cpu", weights_only=False, pickle_module=module)
        model = ckpt.get("ema") or ckpt["model"]
        layers = _member(model, "model")
        detect = layers[-1] if isinstance(layers, torch.nn.Module) else list(_member(layers, "_modules").values())[-1]
        anchors, stride = _member(detect, "anchors"), _member(detect, "stride")
        pixels = (anchors.float() * stride.float().view(-1, 1, 1)).numpy()
    except Exception as exc:  # unreadable file, or no Detect with anchors/stride where yolov5 keeps them
        raise DataError(f"cannot read YOLOv5 anchors from {checkpoint.name} ({type(exc).__name__}: {exc}): "
                        "set model.anchors (3 rows of 6, from the model yaml)") from None
    if pixels.ndim != 3 or pixels.shape[0] != 3 or pixels.shape[2] != 2:
        raise DataError(f"{checkpoint.name} has anchors of shape {list(pixels.shape)}, expected [3, na, 2]: "
                        "set model.anchors")
    return pixels.astype(np.float32)


def yolov5_anchors(onnx_path: Optional[Path], checkpoint: Optional[Path], default=None) -> np.ndarray:
    """(3, na, 2) pixel anchors. `default` (the config's model.anchors) wins when given; else the .pt
    checkpoint's Detect layer; else the ONNX's anchor_grid constants; else the COCO anchors (warned)."""
    if default is not None:
        return np.asarray(default, dtype=np.float32).reshape(3, -1, 2)
    if checkpoint is not None:
        return anchors_from_checkpoint(Path(checkpoint))
    if onnx_path is not None:
        found = anchors_from_onnx(_load_onnx(Path(onnx_path)))
        if found is not None:
            return found
        log.warning("%s has no anchor_grid constants (dynamic export?): using the COCO anchors; "
                    "set model.anchors if the model was trained with autoanchor", Path(onnx_path).name)
    return COCO_ANCHORS.copy()


def to_grayscale(model):
    """A 1-channel copy of a 3-channel ONNX model: each conv reading the image gets its weights summed over the
    input channels. A gray image G then gives exactly the activations the 3-channel model gives (G, G, G), so no
    training is needed. Raises ValueError naming what the graph lacks."""
    import copy

    from onnx import numpy_helper

    model = copy.deepcopy(model)
    graph = model.graph
    image = graph.input[0]
    dims = image.type.tensor_type.shape.dim
    if len(dims) != 4 or dims[1].dim_value != 3:
        raise ValueError(f"input {image.name} is not N x 3 x H x W")
    readers = [n for n in graph.node if image.name in n.input]
    weights = {w.name: w for w in graph.initializer}
    for node in readers:
        group = next((a.i for a in node.attribute if a.name == "group"), 1)
        if node.op_type != "Conv" or group != 1 or node.input[1] not in weights:
            raise ValueError(f"the image is read by {node.op_type} {node.name}, not a plain Conv with constant weights")
        w = numpy_helper.to_array(weights[node.input[1]])
        weights[node.input[1]].CopyFrom(numpy_helper.from_array(w.sum(axis=1, keepdims=True), node.input[1]))
    if not readers:
        raise ValueError(f"nothing reads the input {image.name}")
    dims[1].dim_value = 1
    return model
