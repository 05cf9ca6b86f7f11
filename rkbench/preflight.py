"""Checks of a whole sweep that need no export or conversion, run on every composed configuration before
the first one starts. Each raises an RkbenchError subclass whose one-line message names the fix (the
CLI prints it and exits 2), so a bad path or a wrong model/dataset pair costs a second, not an export."""

from __future__ import annotations

import importlib.util
import logging
import pickle
import re
import tempfile
import zipfile
from pathlib import Path
from typing import Any, Optional
from urllib.parse import urlparse

import yaml

from rkbench.config import RunConfig, resolve_path
from rkbench.data.datasets import Dataset, calibration_images
from rkbench.errors import ConfigError, DataError, UnsupportedCombination
from rkbench.models.heads import _Stub
from rkbench.pipeline import load_dataset
from rkbench.tracking import sqlite_path

log = logging.getLogger("rkbench.preflight")

# MLflow tracking stores by URI scheme (a plain path, no scheme, is a file store); "+driver" suffixes
# such as postgresql+psycopg2 are SQLAlchemy's and allowed.
TRACKING_SCHEMES = ("sqlite", "file", "http", "https", "postgresql", "mysql", "mssql", "databricks", "databricks-uc",
                    "uc")
QUOTE_EXAMPLE = "\"model.weights='/path/with space/best.pt'\""


def check_runs(configs: list[RunConfig]) -> None:
    """Every check below over the distinct settings of the sweep; raises on the first problem."""
    for path in sorted({m for run in configs for m in (run.model.weights, run.model.onnx) if m}):
        check_model_file(resolve_path(path))
    for run in configs:
        check_adopted_onnx(run)
    for uri in sorted({run.tracking.uri for run in configs if run.tracking.enabled}):
        check_tracking_uri(uri)
        check_tracking_server(uri)
    for cache_dir in sorted({run.cache_dir for run in configs}):
        check_writable_folder(Path(cache_dir).expanduser().resolve(), "cache_dir")
    for source, size, seed in sorted({(run.calib.source, run.calib.size, run.calib.seed) for run in configs
                                      if run.calib.source != "dataset" and run.target in ("simulator", "board")}):
        calibration_images(resolve_path(source), size, seed)
    datasets: dict[tuple, Dataset] = {}
    classes: dict[str, Optional[tuple[int, str]]] = {}
    for run in configs:
        key = (repr(run.dataset), run.cache_dir)
        if key not in datasets:
            datasets[key] = load_dataset(run.dataset, Path(run.cache_dir).expanduser().resolve())
            if not datasets[key].images:
                raise DataError(f"dataset {run.dataset.name} has no images: check dataset.* paths")
        if repr(run.model) not in classes:
            classes[repr(run.model)] = model_classes(run)
        check_classes(classes[repr(run.model)], datasets[key])


def check_model_file(path: Path) -> None:
    """Catch a truncated or wrong file in a second, not after the first export."""
    if path.suffix == ".onnx":
        import onnx
        try:
            onnx.checker.check_model(str(path))
        except Exception as exc:  # onnx raises DecodeError, ValidationError, ...
            raise DataError(f"{path} is not a valid ONNX model ({type(exc).__name__}): re-export it") from None
    elif path.suffix in (".pt", ".pth"):
        with open(path, "rb") as f:
            if f.read(4) != b"PK\x03\x04":  # torch.save writes a zip archive
                raise DataError(f"{path} is not a PyTorch checkpoint (truncated or wrong file?): re-export or copy it again")


def check_adopted_onnx(run: RunConfig) -> None:
    """A ready YOLOv8 ONNX (no weights or yaml to export from) is used as it is: its head must be the
    one asked for, read from the graph (onnx only, no torch)."""
    m = run.model
    if m.onnx and m.family == "yolov8" and not (m.weights or m.yaml):
        from rkbench.stages.export import describe_onnx_head

        found = describe_onnx_head(resolve_path(m.onnx), run.resolution)
        if found["head"] != run.export:
            raise UnsupportedCombination(f"{Path(m.onnx).name} has the {found['head']} head: set export={found['head']}")


def check_tracking_uri(uri: str) -> None:
    """MLflow answers an unknown scheme with an obscure registry error, deep in the first run."""
    scheme = urlparse(uri).scheme
    if scheme and scheme.split("+")[0] not in TRACKING_SCHEMES:
        raise ConfigError(f"tracking.uri={uri}: MLflow has no store for '{scheme}://': use sqlite:///mlflow.db, a "
                          "folder path, http(s)://host:5000, postgresql://... or mysql://...")
    if scheme == "sqlite":
        db = sqlite_path(uri)
        if db is None:  # sqlite://x.db is an in-memory database: every result would be lost at exit
            raise ConfigError(f"tracking.uri={uri} is not a sqlite file: use sqlite:///relative.db or "
                              "sqlite:////absolute/path.db (three or four slashes)")
        check_writable_folder(db.parent, "tracking.uri")


def check_tracking_server(uri: str) -> None:
    """A tracking server that does not answer would cost MLflow's retries (minutes) in the first run."""
    if urlparse(uri).scheme not in ("http", "https"):
        return
    import urllib.error
    import urllib.request

    try:
        urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=10).close()
    except urllib.error.HTTPError:
        return      # it answers (a proxy or auth in front may refuse /health): MLflow will say more
    except OSError as exc:
        raise ConfigError(f"tracking.uri={uri}: no MLflow server answers ({getattr(exc, 'reason', exc)}): start it "
                          "(README, Team store) or fix MLFLOW_TRACKING_URI / tracking.uri") from None


def check_writable_folder(folder: Path, key: str) -> None:
    """The folder exists or can be made, and a file can be written in it (a real write: root ignores
    permission bits, not read-only mounts)."""
    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"{key}: {folder} is a file, not a folder: point {key} at a folder (or move the file away)")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as exc:
        raise ConfigError(f"{key}: cannot write in {folder} ({exc.strerror}): point {key} at a writable "
                          "folder") from None


def check_classes(found: Optional[tuple[int, str]], dataset: Dataset) -> None:
    """`found` is model_classes(run). A model with more classes than the dataset crashes after export (a
    class index without a category); one with fewer finishes with mAP 0. Either way the pair is wrong."""
    if found is None:
        return
    nc, where = found
    if nc != len(dataset.class_names):
        raise ConfigError(f"model has {nc} classes ({where}) but dataset {dataset.name} has "
                          f"{len(dataset.class_names)}: use a model trained on this dataset, or a dataset with the "
                          "model's classes")


# ---------------------------------------------------------------------------------------------------------
# the class count of a model source, read without torch

def model_classes(run: RunConfig) -> Optional[tuple[int, str]]:
    """(number of classes, where it was read) from the source the export stage uses, or None when the
    source does not say (e.g. an ONNX with dynamic output shapes)."""
    m = run.model
    if m.family == "yolov5":  # the ONNX is what runs; a .pt only lends its anchors
        return onnx_classes(resolve_path(m.onnx), "yolov5", len(m.anchors[0]) // 2 if m.anchors else 3)
    if m.weights:
        return checkpoint_classes(resolve_path(m.weights))
    if m.yaml:
        return yaml_classes(m.yaml)
    return onnx_classes(resolve_path(m.onnx), "yolov8")


class _StubUnpickler(pickle.Unpickler):
    """Every class a checkpoint names becomes an inert stub (no import, no code run, so no torch), except
    the containers the pickle fills in; tensor storages are skipped."""

    REAL = {("collections", "OrderedDict"), ("builtins", "set"), ("builtins", "frozenset"), ("builtins", "slice")}

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self.REAL:
            return super().find_class(module, name)
        return type(name, (_Stub,), {"__module__": module})

    def persistent_load(self, pid: Any) -> None:
        return None


def checkpoint_classes(path: Path) -> tuple[int, str]:
    """From an Ultralytics .pt: ckpt['model'].yaml['nc'] (or len(.names)), read from the zip's pickle."""
    try:
        with zipfile.ZipFile(path) as z:
            pkl = next(n for n in z.namelist() if n.count("/") == 1 and n.endswith("/data.pkl"))
            with z.open(pkl) as f:
                ckpt = _StubUnpickler(f).load()
        state = vars(ckpt["model"])
        nc = (state.get("yaml") or {}).get("nc") or len(state["names"])
        return int(nc), f"{path.name} model.yaml nc"
    except Exception as exc:  # another layout than Ultralytics' (zip, pickle, keys): let torch read it
        log.debug("%s: stub unpickling failed (%s), loading with torch", path, exc)
    from rkbench.models.heads import load_ultralytics
    return int(load_ultralytics(str(path)).yaml["nc"]), f"{path.name} (torch.load)"


def builtin_yaml(name: str) -> Optional[Path]:
    """An Ultralytics built-in model yaml (yolov8n.yaml -> cfg/models/v8/yolov8.yaml, the scale letter
    dropped like Ultralytics does), found without importing ultralytics."""
    spec = importlib.util.find_spec("ultralytics")
    if spec is None or not spec.submodule_search_locations:
        return None
    models = Path(list(spec.submodule_search_locations)[0]) / "cfg" / "models"
    unscaled = re.sub(r"(\d+)([nslmx])(.+)?$", r"\1\3", Path(name).stem) + Path(name).suffix
    for candidate in (Path(name).name, unscaled):
        found = sorted(models.rglob(candidate))
        if found:
            return found[0]
    return None


def yaml_classes(name: str) -> Optional[tuple[int, str]]:
    path = resolve_path(name)
    path = path if path.is_file() else builtin_yaml(name)
    if path is None:
        return None
    nc = (yaml.safe_load(path.read_text()) or {}).get("nc")
    return (int(nc), f"{name} nc") if isinstance(nc, int) else None


def onnx_classes(path: Path, family: str, anchors_per_scale: int = 3) -> Optional[tuple[int, str]]:
    """From the output shapes: official head [1, 4+nc, A]; rknn head per scale box [1, 64, H, W], classes
    [1, nc, H, W], score sum [1, 1, H, W]; YOLOv5 export [1, A, 5+nc] or cut head convs [1, na*(5+nc), H, W]."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    outs = [[d.dim_value for d in o.type.tensor_type.shape.dim] for o in graph.output]
    nc = 0
    if family == "yolov5":
        if len(outs) == 1 and len(outs[0]) == 3:
            nc = outs[0][2] - 5
        elif len(outs) == 3 and all(len(o) == 4 for o in outs):
            nc = outs[0][1] // anchors_per_scale - 5
    elif len(outs) == 1 and len(outs[0]) == 3:
        nc = outs[0][1] - 4
    elif len(outs) == 9 and len(outs[1]) == 4:
        nc = outs[1][1]
    return (nc, f"{path.name} output shape") if nc > 0 else None  # 0: dynamic or unknown layout


# ---------------------------------------------------------------------------------------------------------
# Hydra's errors

def hydra_message(exc: Exception) -> str:
    """Hydra's composition errors in one line that names the fix."""
    from hydra.errors import OverrideParseException

    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    first = lines[0]
    if isinstance(exc, OverrideParseException):  # mostly a value with a space that the shell split in two
        if "=" not in exc.override:
            return (f"'{exc.override}' is not a key=value override (a value with a space, split by the shell?): "
                    f"quote the value for Hydra and the whole override for the shell, e.g. {QUOTE_EXAMPLE}")
        return (f"cannot parse the override '{exc.override}' ({first}): quote a value with spaces or special "
                f"characters for Hydra and the whole override for the shell, e.g. {QUOTE_EXAMPLE}")
    if "Available options" in str(exc):      # unknown group option: list the options
        options = lines[lines.index(next(ln for ln in lines if ln.startswith("Available options"))) + 1:]
        return f"{first}: pick one of {', '.join(o for o in options if not o.startswith(('Config search', 'provider=')))}"
    if first.startswith("Could not override"):
        return f"{first} No such key: check its spelling (`python -m rkbench --cfg job` prints every key)"
    cause = exc.__cause__
    return f"{first}: {str(cause).splitlines()[0]}" if cause else first
