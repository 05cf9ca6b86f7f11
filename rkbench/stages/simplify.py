"""Stage 2: ONNX -> simplified ONNX (onnxslim, onnxsim, or passed through)."""

from __future__ import annotations

import importlib.metadata as md

from rkbench.cache import StageCache, stage_key
from rkbench.errors import StageError
from rkbench.stages import Artifact, from_cache


def _tool_version(method: str) -> str:
    try:
        return md.version(method) if method != "none" else "-"
    except md.PackageNotFoundError:
        raise StageError("simplify", f"{method} is not installed",
                         f"pip install {method}" + (" ml_dtypes" if method == "onnxsim" else "") + " or use simplify=onnxslim") from None


def simplify(onnx_in: Artifact, method: str, cache: StageCache) -> Artifact:
    if method == "none":
        return onnx_in
    key = stage_key("simplify", src=onnx_in.sha256, method=method, version=_tool_version(method))
    with cache.open("simplify", key) as entry:  # a failure leaves no folder behind and is not remembered
        if not entry.hit:
            import onnx

            out = cache.begin(entry) / "model.onnx"
            model = onnx.load(str(onnx_in.path))
            try:
                if method == "onnxslim":
                    import onnxslim
                    slim = onnxslim.slim(model)
                else:
                    import onnxsim
                    slim, ok = onnxsim.simplify(model)
                    if not ok:
                        raise RuntimeError("onnxsim could not validate the simplified model")
            except ImportError as exc:
                raise StageError("simplify", f"{method} failed to import: {exc}", "use simplify=onnxslim (onnxsim needs ml_dtypes)") from exc
            except Exception as exc:  # the simplifiers raise assorted errors on graphs they cannot fold
                raise StageError("simplify", f"{type(exc).__name__}: {exc}", "use simplify=none to keep the exported graph") from exc
            onnx.save(slim, str(out))
            info = dict(onnx_in.info, nodes_before=len(model.graph.node), nodes_after=len(slim.graph.node))
            cache.commit(entry, {"onnx": out.name}, info)
        return from_cache(entry, "onnx")
