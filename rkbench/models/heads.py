"""Model side of the export stage: Ultralytics YOLOv8 -> ONNX with either head, YOLOv5 ONNX -> cut graph.

The `rknn` head follows rknn_model_zoo: the graph stops at the per-scale convolutions and emits, per
stride 8/16/32, the raw box distribution [1, 64, H, W], the sigmoid class scores [1, nc, H, W] and their
clipped sum [1, 1, H, W]. DFL, decode and NMS run on the CPU (models/prepost.py), so the NPU never sees
the 8400-anchor concat/transpose tail that rknn-toolkit2 handles badly."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np

from rkbench.errors import DataError

COCO_ANCHORS = np.array([[10, 13, 16, 30, 33, 23], [30, 61, 62, 45, 59, 119], [116, 90, 156, 198, 373, 326]],
                        dtype=np.float32).reshape(3, 3, 2)


def load_ultralytics(source: str):
    """An Ultralytics DetectionModel in eval mode from a .pt or a model yaml (never downloads)."""
    import torch
    from ultralytics.nn.tasks import DetectionModel, load_checkpoint

    try:
        if source.endswith((".yaml", ".yml")):
            model = DetectionModel(source, verbose=False)
        else:
            model, _ = load_checkpoint(source, device="cpu")
    except Exception as exc:  # unpickling / yaml errors come in many types
        raise DataError(f"cannot load {source} as an Ultralytics YOLOv8 model ({type(exc).__name__}: {exc}): "
                        "check it is a YOLOv8 .pt or model yaml") from None
    model = model.float().eval()
    for p in model.parameters():
        p.requires_grad_(False)
    torch.manual_seed(0)
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


def _rknn_head_module(model):
    import torch
    import torch.nn as nn

    detect = model.model[-1]

    class RknnHead(nn.Module):
        """Run the Ultralytics graph up to Detect, then only its per-scale convolution branches."""

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
    import torch

    model = load_ultralytics(model_source)
    detect = model.model[-1]
    swapped = swap_activation(model, activation)
    if head == "rknn":
        net = _rknn_head_module(model)
        output_names = [f"{kind}{s}" for s in (8, 16, 32) for kind in ("box", "cls", "sum")]
    else:  # the official graph: exactly the flags Ultralytics' exporter sets for format=onnx
        detect.export, detect.format, detect.dynamic = True, "onnx", False
        net, output_names = model, ["output0"]
    dummy = torch.zeros(batch, 3, imgsz, imgsz)
    with torch.no_grad():
        net(dummy)  # build the anchor cache before tracing, as the exporter does
        torch.onnx.export(net, dummy, str(out_path), opset_version=opset, input_names=["images"],
                          output_names=output_names, do_constant_folding=True)
    names = [str(model.names[i]) for i in sorted(model.names)] if isinstance(model.names, dict) else list(model.names)
    info = {"head": head, "num_classes": int(detect.nc), "names": names, "strides": [int(s) for s in detect.stride.tolist()],
            "reg_max": int(detect.reg_max), "input_name": "images", "output_names": output_names,
            "activation": activation, "activations_swapped": swapped, "opset": opset}
    if swapped:
        info["note"] = f"{swapped} SiLU modules replaced by {activation}: accuracy needs weights trained with {activation}"
    return info


def _shapes(model) -> dict[str, list[int]]:
    import onnx

    inferred = onnx.shape_inference.infer_shapes(model)
    out = {}
    for v in list(inferred.graph.value_info) + list(inferred.graph.output) + list(inferred.graph.input):
        out[v.name] = [d.dim_value for d in v.type.tensor_type.shape.dim]
    return out


def find_yolov5_head(model) -> list[str]:
    """The three Detect convolutions: Conv nodes that feed a Reshape and have na*(5+nc) channels."""
    consumers: dict[str, list[str]] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node.op_type)
    weights = {init.name: list(init.dims) for init in model.graph.initializer}
    shapes = _shapes(model)
    found = []
    for node in model.graph.node:
        if node.op_type != "Conv" or "Reshape" not in consumers.get(node.output[0], []):
            continue
        channels = weights.get(node.input[1], [0])[0]
        if channels % 3 == 0 and channels // 3 > 5:
            found.append((-(shapes.get(node.output[0], [0, 0, 0])[2] or 0), node.output[0]))
    if len(found) != 3:
        raise DataError(f"found {len(found)} YOLOv5 head convolutions instead of 3: name them with "
                        "model.head_outputs=[out8,out16,out32]")
    return [name for _, name in sorted(found)]  # largest map (stride 8) first


def cut_yolov5_onnx(src: Path, dst: Path, output_names: Optional[list[str]] = None) -> dict:
    import onnx
    import onnx.utils

    try:
        model = onnx.load(str(src))
    except Exception as exc:  # protobuf DecodeError and friends
        raise DataError(f"{src} is not a readable ONNX file ({type(exc).__name__}): re-export it") from None
    names = list(output_names) if output_names else find_yolov5_head(model)
    inputs = [i.name for i in model.graph.input if i.name not in {t.name for t in model.graph.initializer}]
    # Extractor looks the cut tensors up in value_info, which only shape inference fills in.
    cut = onnx.utils.Extractor(onnx.shape_inference.infer_shapes(model)).extract_model(inputs, names)
    onnx.save(cut, str(dst))
    shapes = _shapes(cut)
    channels = shapes[names[0]][1]
    imgsz = shapes[inputs[0]][-1] or None
    return {"head": "yolov5", "num_classes": channels // 3 - 5, "names": [str(i) for i in range(channels // 3 - 5)],
            "output_names": names, "input_name": inputs[0], "imgsz": imgsz, "anchors_per_scale": 3}


def anchors_from_onnx(model) -> Optional[np.ndarray]:
    """YOLOv5's export bakes anchor_grid [1, na, H, W, 2] constants into the graph: read them back."""
    from onnx import numpy_helper

    tensors = [numpy_helper.to_array(t) for t in model.graph.initializer]
    for node in model.graph.node:
        if node.op_type == "Constant":
            tensors += [numpy_helper.to_array(a.t) for a in node.attribute if a.name == "value"]
    grids = [t for t in tensors if t.ndim == 5 and t.shape[0] == 1 and t.shape[1] == 3 and t.shape[-1] == 2]
    if len(grids) != 3:
        return None
    grids.sort(key=lambda t: -t.shape[2])
    return np.stack([g[0, :, 0, 0, :] for g in grids]).astype(np.float32)


def yolov5_anchors(onnx_path: Optional[Path], checkpoint: Optional[Path], default=None) -> np.ndarray:
    """(3, 3, 2) pixel anchors: explicit config > .pt checkpoint > the ONNX's constants > COCO."""
    if default is not None:
        return np.asarray(default, dtype=np.float32).reshape(3, 3, 2)
    if checkpoint is not None:
        import torch
        try:
            ckpt = torch.load(str(checkpoint), map_location="cpu", weights_only=False)
        except ModuleNotFoundError as exc:
            raise DataError(f"reading anchors from {checkpoint.name} needs the yolov5 repo importable ({exc}): "
                            "add it to PYTHONPATH or set model.anchors") from None
        detect = (ckpt.get("ema") or ckpt["model"]).model[-1]
        return (detect.anchors * detect.stride.view(-1, 1, 1)).float().numpy().reshape(3, 3, 2)
    if onnx_path is not None:
        import onnx
        found = anchors_from_onnx(onnx.load(str(onnx_path)))
        if found is not None:
            return found
    return COCO_ANCHORS.copy()
