"""Typed configuration of one run. Hydra composes conf/ onto these dataclasses; `validate` runs before
any work, so a bad sweep fails in one line instead of after an hour of conversions."""

from __future__ import annotations

import functools
import importlib.metadata as md
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from rkbench.errors import ConfigError, UnsupportedCombination

ASSETS = Path(__file__).resolve().parent / "assets"
BUILTIN_PREFIX = "builtin:"  # "builtin:demo_yolov8n.pt" -> the file shipped in rkbench/assets

HEADS = ("rknn", "ultralytics")
ACTIVATIONS = ("silu", "relu")
SIMPLIFIERS = ("none", "onnxslim", "onnxsim")
ALGOS = ("normal", "kl_divergence", "mmse")
QUANT_DTYPES = ("w8a8", "w8a16", "w16a16i_dfp", "w4a16")
TARGETS = ("simulator", "onnxruntime", "board")
FAMILIES = ("yolov8", "yolov5")
CORE_MASKS = ("auto", "0", "1", "2", "0_1", "0_1_2", "all")
QUANT_GROUPS = tuple(range(32, 257, 32))    # quant_method=group<N>
BOARD_RUNTIMES = ("rknnlite", "onnxruntime")
BOARD_TRANSPORTS = ("adb", "ssh")            # how the board is reached: rkbench/device/adb.py, rkbench/device/ssh.py
CPP_OUTPUTS = ("float", "int8")            # measure.cpp_outputs: want_float=1, or int8 dequantised by the runner
RUNNERS = ("python", "cpp")                 # the on-device runner: rkbench/device/runner.py or cpp/rkbench_runner.cpp
# NPU cores per SoC: core masks other than auto only exist on the multi-core parts.
NPU_CORES = {"rk3588": 3, "rk3576": 2}
# Platforms of rknn-toolkit2 2.x; the installed toolkit's own list wins when it can be read.
TOOLKIT2_PLATFORMS = ("rv1103", "rv1103b", "rv1106", "rv1106b", "rv1126b", "rk2118", "rk3562", "rk3566",
                      "rk3568", "rk3576", "rk3588")
LEGACY_PLATFORMS = ("rv1126", "rv1109", "rk1808", "rk3399pro")  # rknn-toolkit (v1) only


@dataclass
class ModelConfig:
    name: str = "demo_yolov8n"
    family: str = "yolov8"                  # yolov8 | yolov5
    weights: Optional[str] = None           # Ultralytics .pt; YOLOv5: checkpoint to read anchors from
    yaml: Optional[str] = None              # Ultralytics model yaml (random weights: latency studies only)
    onnx: Optional[str] = None              # a ready ONNX (YOLOv5: exported by the yolov5 repo)
    anchors: Optional[list[list[float]]] = None   # YOLOv5 anchors in pixels, 3 rows of 6
    head_outputs: Optional[list[str]] = None      # YOLOv5: the three head conv tensors (auto-detected)
    opset: int = 12


@dataclass
class DatasetConfig:
    name: str = "demo"
    kind: str = "demo"                      # demo | coco | yolo
    root: Optional[str] = None              # demo: where to generate; yolo: data.yaml or its folder
    annotations: Optional[str] = None       # coco: instances json
    images: Optional[str] = None            # coco: image folder
    split: str = "val"
    limit: Optional[int] = None             # first N images (sorted by id); None = all
    frame: Optional[list[int]] = None       # demo: W, H of generated large frames instead of the demo images (tiling)
    frames: int = 8                         # demo with frame: how many frames


@dataclass
class CalibConfig:
    size: int = 16
    source: str = "dataset"                 # dataset (the eval images) | a folder of images
    seed: int = 0


@dataclass
class EvalConfig:
    conf: float = 0.001
    iou: float = 0.7
    max_det: int = 300
    count_thresholds: list[float] = field(default_factory=lambda: [0.25, 0.5, 0.63, 0.8])
    float_reference: bool = True            # also score the float ONNX with ONNX Runtime


BOARD_MODES = ("latency", "eval", "throughput", "tiling")
TILE_MODES = ("native", "resized")
TILE_SOURCES = ("synthetic", "dataset")


@dataclass
class MeasureConfig:
    warmup: int = 2                         # timed calls left out of the stats (host, simulator, board)
    iterations: int = 20                    # board latency mode: at least this many iterations ...
    min_seconds: float = 2.0                # ... and at least this long
    modes: list[str] = field(default_factory=lambda: ["latency", "eval"])   # on the board
    workers: int = 3                        # throughput mode: pool size (one runtime per worker)
    cores: str = "0_1_2"                    # throughput mode: NPU core of each worker, round robin
    threads: int = 0                        # board.runtime=onnxruntime: intra-op threads per runtime (0 = its default)
    frames: int = 30                        # throughput / tiling: frames to push through
    tile_frame: list[int] = field(default_factory=lambda: [1920, 1080])   # tiling mode: frame W, H
    tile_overlap: float = 0.2
    tile_mode: str = "native"               # tiling: native (overlapping model-size tiles) | resized (a grid, letterboxed)
    tile_grid: list[int] = field(default_factory=lambda: [2, 2])   # tiling, tile_mode=resized: columns, rows
    tile_source: str = "synthetic"          # tiling: synthetic (one frame of tile_frame) | dataset (its images, scored)
    toolkit_perf: bool = False              # PC-side RKNN.eval_perf / eval_memory over adb (real board only)
    cpp_outputs: str = "float"              # runner=cpp: float (librknnrt dequantises) or int8 (the runner does)
    cpp_zero_copy: bool = False             # runner=cpp: io memory via rknn_create_mem + rknn_set_io_mem
    cpp_pass_through: bool = False          # runner=cpp: input quantised before the clock, rknn_input.pass_through=1


@dataclass
class AccuracyConfig:
    analysis: bool = False                  # rknn-toolkit2 accuracy_analysis: per-layer cosine / euclidean vs float
    images: int = 1                         # dataset images analysed (the first N); distances averaged over them
    top_k: int = 10                         # worst layers kept in the tag rkbench.accuracy.worst (the report's table)


@dataclass
class HybridConfig:
    layers: int = 0                         # keep the N worst layers of accuracy_analysis in float16; 0 = plain int8


@dataclass
class BoardConfig:
    serial: Optional[str] = None
    address: Optional[str] = None           # network adb, e.g. 192.168.1.222:5555
    adb_host: Optional[str] = None          # unset: adb's environment (ADB_SERVER_SOCKET, ANDROID_ADB_SERVER_*) or 127.0.0.1
    adb_port: Optional[int] = None          # unset: adb's environment or 5037
    remote_root: str = "/data/local/tmp/rkbench"
    python: str = "python3"
    runtime: str = "rknnlite"               # rknnlite on a real board; onnxruntime on the emulator
    # adb | ssh (sshd and no adbd, as on many Debian boards: board.address is then HOST, USER@HOST[:PORT] or a
    # Host of ~/.ssh/config). ssh_*: unset = what ~/.ssh/config says, else ssh's defaults. Never a password.
    transport: str = "adb"
    ssh_user: Optional[str] = None
    ssh_port: Optional[int] = None
    ssh_key: Optional[str] = None           # private key file (else IdentityFile, ssh-agent, ~/.ssh/id_*)
    ssh_known_hosts: Optional[str] = None   # default ~/.ssh/known_hosts; an unknown board is refused
    timeout_s: float = 600.0
    reconnect_s: float = 120.0              # after the board drops: wait this long in all (backoff) before giving up
    pin_freq: bool = False                  # performance governor on NPU/DDR/CPU while measuring, restored after


@dataclass
class SearchConfig:
    """hydra/sweeper=optuna (experiments/search.yaml): each trial's job returns its p50 latency where measured,
    when its mAP50-95 meets this target (rkbench/search.py). Not part of a run's identity."""
    min_map50_95: float = 0.0


@dataclass
class TrackingConfig:
    uri: str = "sqlite:///mlflow.db"       # conf/config.yaml takes MLflow's MLFLOW_TRACKING_URI when it is set
    experiment: str = "rkbench"
    enabled: bool = True


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    # The sweep axes, top-level so a sweep reads `resolution=320,640 algo=normal,mmse`.
    resolution: int = 320
    activation: str = "silu"
    export: str = "rknn"
    simplify: str = "onnxslim"
    platform: str = "rk3588"
    quantize: bool = True                   # False = fp16 model
    algo: str = "normal"
    quant_method: str = "channel"           # layer | channel | group32..group256
    quant_dtype: str = "w8a8"
    batch: int = 1                          # rknn_batch_size
    core_mask: str = "auto"
    target: str = "simulator"
    runner: str = "python"                  # target=board: python (runner.py) or cpp (C++ runner on librknnrt)
    channels: int = 3                       # model input channels: 3 (RGB) or 1 (gray model derived from the RGB one)
    calib: CalibConfig = field(default_factory=CalibConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    measure: MeasureConfig = field(default_factory=MeasureConfig)
    accuracy: AccuracyConfig = field(default_factory=AccuracyConfig)
    hybrid: HybridConfig = field(default_factory=HybridConfig)
    board: BoardConfig = field(default_factory=BoardConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    search: SearchConfig = field(default_factory=SearchConfig)
    cache_dir: str = ".rkbench_cache"
    resume: bool = True                     # skip configurations already FINISHED in MLflow
    study: str = "default"
    farm: Optional[dict[str, Any]] = None   # board inventory, farm=<name>: conf/farm/<name>.yaml (hydra/launcher=ray)


def register() -> None:
    ConfigStore.instance().store(name="rkbench_schema", node=RunConfig)


def to_run_config(cfg: DictConfig | RunConfig) -> RunConfig:
    """DictConfig from Hydra -> validated RunConfig object."""
    run = cfg if isinstance(cfg, RunConfig) else OmegaConf.to_object(cfg)
    if not isinstance(run, RunConfig):
        raise ConfigError("config did not compose onto the rkbench schema: keep `rkbench_schema` first in conf/config.yaml defaults")
    validate(run)
    return run


def resolve_path(value: str) -> Path:
    if value.startswith(BUILTIN_PREFIX):
        return ASSETS / value[len(BUILTIN_PREFIX):]
    return Path(value).expanduser()


@functools.lru_cache(maxsize=1)
def toolkit_platforms() -> tuple[str, ...]:
    """Platforms the installed rknn-toolkit2 documents in RKNN.config (falls back to the 2.x list). Read
    from the source file, not imported: importing rknn.api costs seconds (it imports torch)."""
    try:
        doc = md.distribution("rknn-toolkit2").locate_file("rknn/api/rknn.py").read_text(errors="replace")
        line = doc.split(":param target_platform:")[1].split(":param")[0]
        found = tuple(re.findall(r"\b(r[kv]\d{4}[a-z]?)\b", line))
        return found or TOOLKIT2_PLATFORMS
    except (md.PackageNotFoundError, OSError, IndexError):
        return TOOLKIT2_PLATFORMS


def axes() -> dict[str, str]:
    """The sweep axes and their allowed values, from the constants `validate` checks against, so
    `python -m rkbench --help` and run names cannot drift from what is accepted."""
    return {
        "resolution": "a multiple of 32",
        "channels": "3 (RGB), 1 (gray: the first conv's weights summed over RGB)",
        "export": ", ".join(HEADS),
        "activation": ", ".join(ACTIVATIONS),
        "simplify": ", ".join(SIMPLIFIERS),
        "platform": ", ".join(toolkit_platforms()),
        "quantize": "true (int8), false (fp16)",
        "batch": "rknn_batch_size >= 1",
        "algo": ", ".join(ALGOS),
        "quant_method": f"layer, channel, group{QUANT_GROUPS[0]} .. group{QUANT_GROUPS[-1]} (step {QUANT_GROUPS[0]})",
        "quant_dtype": ", ".join(QUANT_DTYPES),
        "calib.size": "calibration images >= 1",
        "calib.source": "dataset (the eval images) or a folder of images",
        "core_mask": ", ".join(CORE_MASKS),
        "hybrid.layers": "0 (int8) or N >= 1: the N worst layers of accuracy_analysis kept in float16",
        "accuracy.analysis": "true, false (rknn-toolkit2 accuracy_analysis per layer on the simulator)",
        "eval.float_reference": "true, false (also score the float ONNX on the host)",
        "target": ", ".join(TARGETS),
        "runner": f"{', '.join(RUNNERS)} (the on-device runner of target=board)",
        "board.runtime": ", ".join(BOARD_RUNTIMES),
        "measure.modes": f"a list of {', '.join(BOARD_MODES)}",
    }


def check_cores(run: RunConfig) -> None:
    """Core mask against the SoC and the batch: only where the core mask applies (rkbench.spec.plan)."""
    cores = NPU_CORES.get(run.platform, 1)
    if run.core_mask == "auto":
        return
    used = 3 if run.core_mask == "all" else len(run.core_mask.split("_"))
    highest = used - 1 if run.core_mask == "all" else max(int(c) for c in run.core_mask.split("_"))
    if highest >= cores:
        raise UnsupportedCombination(f"core_mask={run.core_mask} needs {highest + 1} NPU cores but {run.platform} has {cores}: use core_mask=auto")
    if run.batch > 1 and used == 1:
        raise UnsupportedCombination(f"batch={run.batch} with single-core core_mask={run.core_mask} falls back to auto on the board: use core_mask=0_1_2 (or auto), or batch=1")


def _choice(name: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise ConfigError(f"{name}={value!r} is not one of {', '.join(map(str, allowed))}: pick one of those")


def _must_exist(key: str, value: Optional[str]) -> None:
    if value is not None and not resolve_path(value).exists():
        raise ConfigError(f"{key}={value} does not exist: give the path of an existing file")


def validate(run: RunConfig) -> None:
    """Every check that can fail without doing work. Raises ConfigError naming the fix."""
    if run.resolution <= 0 or run.resolution % 32:
        raise ConfigError(f"resolution={run.resolution} is not a positive multiple of 32 (the YOLO stride): try {max(32, round(run.resolution / 32) * 32)}")
    _choice("activation", run.activation, ACTIVATIONS)
    _choice("export", run.export, HEADS)
    _choice("simplify", run.simplify, SIMPLIFIERS)
    _choice("algo", run.algo, ALGOS)
    _choice("quant_dtype", run.quant_dtype, QUANT_DTYPES)
    _choice("target", run.target, TARGETS)
    _choice("runner", run.runner, RUNNERS)
    _choice("core_mask", run.core_mask, CORE_MASKS)
    _choice("channels", run.channels, (3, 1))
    _choice("model.family", run.model.family, FAMILIES)
    group = re.fullmatch(r"group(\d+)", run.quant_method)
    if run.quant_method not in ("layer", "channel") and not (group and int(group[1]) in QUANT_GROUPS):
        raise ConfigError(f"quant_method={run.quant_method!r} is not layer, channel or groupN (N a multiple of 32 in 32..256)")
    if run.platform in LEGACY_PLATFORMS:
        raise ConfigError(f"platform={run.platform} needs the legacy rknn-toolkit (v1), not rknn-toolkit2: pick one of {', '.join(toolkit_platforms())}")
    _choice("platform", run.platform, toolkit_platforms())
    if run.batch < 1:
        raise ConfigError(f"batch={run.batch}: rknn_batch_size must be >= 1")
    if run.calib.size < 1:
        raise ConfigError(f"calib.size={run.calib.size}: need at least one calibration image")
    if run.calib.source != "dataset":
        _must_exist("calib.source", run.calib.source)
    if run.accuracy.images < 1 or run.accuracy.top_k < 1:
        raise ConfigError(f"accuracy.images={run.accuracy.images}, accuracy.top_k={run.accuracy.top_k}: both must be >= 1")
    if run.hybrid.layers < 0:
        raise ConfigError(f"hybrid.layers={run.hybrid.layers}: use 0 (plain int8) or the number of layers to keep in float16")
    if run.hybrid.layers and run.quantize and run.quant_dtype != "w8a8":
        raise UnsupportedCombination(f"hybrid.layers={run.hybrid.layers} keeps layers of an int8 model in float16: "
                                     f"use quant_dtype=w8a8 (not {run.quant_dtype}) or hybrid.layers=0")

    m = run.model
    sources = [s for s in (m.weights, m.yaml, m.onnx) if s]
    if m.family == "yolov5" and not m.onnx:
        raise ConfigError("YOLOv5 models come as ONNX exported by the yolov5 repo: set model.onnx=/path/yolov5s.onnx")
    if not sources:
        raise ConfigError("model has no source: set model.weights=/path/best.pt, model.yaml=yolov8n.yaml or model.onnx=/path/x.onnx")
    _must_exist("model.weights", m.weights)
    _must_exist("model.onnx", m.onnx)
    if m.yaml and m.yaml.endswith((".yaml", ".yml")) and "/" in m.yaml:
        _must_exist("model.yaml", m.yaml)
    if m.onnx and m.family == "yolov8" and run.activation != "silu":
        raise UnsupportedCombination("activation can only be swapped when exporting from weights/yaml: drop model.onnx or use activation=silu")
    if m.anchors is not None and (len(m.anchors) != 3 or any(len(row) != 6 for row in m.anchors)):
        raise ConfigError("model.anchors must be 3 rows of 6 numbers (w,h pairs per scale, pixels), as in the yolov5 yaml")

    # the board's transport before the adb-worded board.address check below
    _choice("board.transport", run.board.transport, BOARD_TRANSPORTS)
    if run.target == "board" and run.board.transport == "ssh" and not run.board.address:
        raise ConfigError("board.transport=ssh needs board.address=HOST (USER@HOST:PORT, or a Host of ~/.ssh/config)")
    if run.board.transport == "ssh" and not run.board.remote_root.startswith("/"):
        raise ConfigError(f"board.remote_root={run.board.remote_root} is not absolute (nothing expands ~ on the board): "
                          "use e.g. /home/<user>/rkbench")
    for key, value in (("board.ssh_key", run.board.ssh_key), ("board.ssh_known_hosts", run.board.ssh_known_hosts)):
        if value and not Path(value).expanduser().is_file():
            raise ConfigError(f"{key}={value} is not a file: give the path of an existing file, or leave it unset")

    d = run.dataset
    _choice("dataset.kind", d.kind, ("demo", "coco", "yolo"))
    if d.kind == "coco" and not (d.annotations and d.images):
        raise ConfigError("dataset=coco needs dataset.annotations=/path/instances_val2017.json and dataset.images=/path/val2017")
    if d.kind == "yolo" and not d.root:
        raise ConfigError("dataset=yolo needs dataset.root=/path/data.yaml (Ultralytics layout, e.g. coco128.yaml)")
    for key, value in (("dataset.annotations", d.annotations), ("dataset.images", d.images)):
        _must_exist(key, value)
    if d.kind == "yolo":
        _must_exist("dataset.root", d.root)
    if d.frame is not None and (d.kind != "demo" or len(d.frame) != 2 or min(d.frame) < 32 or d.frames < 1):
        raise ConfigError(f"dataset.frame={d.frame}: only the demo dataset renders frames; give [width, height] (>= 32) "
                          "and dataset.frames >= 1")
    if d.limit is not None and d.limit < 1:
        raise ConfigError(f"dataset.limit={d.limit}: use a positive number or null for all images")

    if run.target == "board" and not (run.board.serial or run.board.address or run.farm):
        raise ConfigError("target=board needs board.serial=<adb serial>, board.address=IP:5555 or farm=<inventory> "
                          "with hydra/launcher=ray")
    for mode in run.measure.modes:
        _choice("measure.modes", mode, BOARD_MODES)
    _choice("board.runtime", run.board.runtime, BOARD_RUNTIMES)
    b = run.board
    if b.timeout_s <= 0 or b.reconnect_s < 0:
        raise ConfigError(f"board.timeout_s={b.timeout_s:g} must be > 0 and board.reconnect_s={b.reconnect_s:g} >= 0 "
                          "(seconds; 0 = do not wait for a board that dropped)")
    if b.adb_port is not None and not 0 < b.adb_port < 65536:
        raise ConfigError(f"board.adb_port={b.adb_port} is not a TCP port: use 1..65535, or leave it unset for adb's "
                          "ANDROID_ADB_SERVER_PORT / 5037")
    _choice("measure.cpp_outputs", run.measure.cpp_outputs, CPP_OUTPUTS)
    _choice("measure.tile_mode", run.measure.tile_mode, TILE_MODES)
    _choice("measure.tile_source", run.measure.tile_source, TILE_SOURCES)
    if len(run.measure.tile_grid) != 2 or min(run.measure.tile_grid) < 1:
        raise ConfigError(f"measure.tile_grid={run.measure.tile_grid}: give [columns, rows], each >= 1, e.g. [2, 2]")
    if run.measure.threads < 0:
        raise ConfigError(f"measure.threads={run.measure.threads}: use 0 (ONNX Runtime's default) or a thread count")
    if run.measure.workers < 1 or not re.fullmatch(r"[0-2](_[0-2])*", run.measure.cores):
        raise ConfigError("measure.workers must be >= 1 and measure.cores like 0_1_2 (NPU core per worker)")
    if not 0.0 <= run.eval.conf < 1.0 or not 0.0 < run.eval.iou <= 1.0:
        raise ConfigError("eval.conf must be in [0, 1) and eval.iou in (0, 1]")
    if not 0.0 <= run.search.min_map50_95 <= 1.0:
        raise ConfigError(f"search.min_map50_95={run.search.min_map50_95}: a mAP50-95 target in [0, 1]")


def flatten(run: RunConfig) -> dict[str, str]:
    """Dotted params for MLflow (values < 500 chars)."""
    out: dict[str, str] = {}

    def walk(prefix: str, node: Any) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(f"{prefix}.{k}" if prefix else k, v)
        else:
            out[prefix] = str(node)[:499]

    walk("", asdict(run))
    return out
