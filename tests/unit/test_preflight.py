"""Preflight: the sweep-wide checks that fail in one line (exit 2) before any export, on real files,
folders, a real read-only mount and real Hydra parse errors."""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import sys
import textwrap
from dataclasses import replace
from pathlib import Path

import cv2
import onnx
import pytest
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import OverrideParseException
from onnx import TensorProto, helper

from rkbench import preflight
from rkbench.__main__ import main
from rkbench.config import CalibConfig, DatasetConfig, ModelConfig, RunConfig, TrackingConfig, to_run_config
from rkbench.data.datasets import COCO80_NAMES
from rkbench.data.demo import demo_dataset, generate_demo
from rkbench.errors import RkbenchError

REPO = Path(__file__).resolve().parents[2]
DEMO_PT = "builtin:demo_yolov8n.pt"


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("demo") / "demo"
    demo_dataset(root, n_val=4)
    return root


@pytest.fixture
def run(demo, tmp_path) -> RunConfig:
    """The demo model on a 4-image demo set, everything written under tmp_path."""
    return to_run_config(RunConfig(model=ModelConfig(weights=DEMO_PT), dataset=DatasetConfig(root=str(demo)),
                                   cache_dir=str(tmp_path / "cache"),
                                   tracking=TrackingConfig(uri=f"sqlite:///{tmp_path}/mlflow.db")))


def fails(configs: list[RunConfig], match: str) -> str:
    with pytest.raises(RkbenchError, match=match) as e:
        preflight.check_runs(configs)
    assert "\n" not in str(e.value)
    return str(e.value)


def test_a_sound_sweep_passes(run):
    preflight.check_runs([run, replace(run, resolution=640)])


def test_cache_dir_that_is_a_file(run, tmp_path):
    (tmp_path / "cache").write_text("not a folder")
    fails([run], match=f"cache_dir: {tmp_path / 'cache'} is a file, not a folder: point cache_dir at a folder")
    (tmp_path / "cache").unlink()
    (tmp_path / "file").write_text("")
    fails([replace(run, cache_dir=str(tmp_path / "file" / "cache"))], match="cache_dir: cannot write in .*Not a directory")


READ_ONLY_CHECK = """
    import sys
    from rkbench import preflight
    from rkbench.errors import ConfigError
    try:
        preflight.check_writable_folder(preflight.Path(sys.argv[1]), "cache_dir")
    except ConfigError as exc:
        print(exc)
"""


def test_read_only_cache_dir_stops_even_root(tmp_path):
    """chmod does not stop root: a read-only bind mount does, made in a private mount namespace (unshare)
    so nothing outlives the test."""
    folder = tmp_path / "ro"
    folder.mkdir()
    script = (f"mount --bind {folder} {folder} && mount -o remount,ro,bind {folder} && "
              f"exec {sys.executable} -c '{textwrap.dedent(READ_ONLY_CHECK)}' {folder}")
    if not shutil.which("unshare"):
        pytest.skip("no unshare(1): cannot make a read-only mount that stops root")
    done = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", script], capture_output=True,
                          text=True, env=dict(os.environ, PYTHONPATH=str(REPO)), timeout=120)
    if "mount" in done.stderr and done.returncode != 0:
        pytest.skip(f"cannot make a read-only bind mount here: {done.stderr.strip()}")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == (f"cache_dir: cannot write in {folder} (Read-only file system): point cache_dir "
                                   "at a writable folder")


@pytest.mark.parametrize("uri, match", [
    ("foo://bar", r"tracking.uri=foo://bar: MLflow has no store for 'foo://': use sqlite:///mlflow.db"),
    ("sqlite://mlflow.db", r"is not a sqlite file: use sqlite:///relative.db or sqlite:////absolute/path.db"),
])
def test_bad_tracking_uri(run, uri, match):
    fails([replace(run, tracking=TrackingConfig(uri=uri))], match=match)


def test_good_tracking_uris_pass():
    for uri in ("http://127.0.0.1:5000", "postgresql+psycopg2://u@h/db", "databricks", "mlruns", "file:///data/mlruns"):
        preflight.check_tracking_uri(uri)


def test_calib_source_must_be_a_folder(run, demo):
    calib = replace(run.calib, source=str(demo / "data.yaml"))
    fails([replace(run, calib=calib)], match="calib.source=.*data.yaml is a file: set calib.source to a folder")
    preflight.check_runs([replace(run, calib=calib, target="onnxruntime")])   # nothing to calibrate: not checked
    preflight.check_runs([replace(run, calib=CalibConfig(source=str(demo / "images" / "val")))])


def test_truncated_dataset_image_exits_2_in_one_line(demo, tmp_path, capsys):
    """End to end through the CLI's preflight: the dataset loader refuses the file before any export."""
    root = tmp_path / "d"
    generate_demo(root, 0, 3)
    png = root / "images" / "val" / "val_00001.png"
    jpg = png.with_suffix(".jpg")
    cv2.imwrite(str(jpg), cv2.imread(str(png)))
    png.unlink()
    jpg.write_bytes(jpg.read_bytes()[:-300])
    rc = main(["model=yolov8", f"model.weights={DEMO_PT}", "dataset=yolo", f"dataset.root={root / 'data.yaml'}",
               f"cache_dir={tmp_path / 'cache'}", f"tracking.uri=sqlite:///{tmp_path}/mlflow.db"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err == [f"rkbench: error: image {jpg} is truncated (its JPEG end marker is missing and it "
                               "does not decode): copy it again or remove it"]


# ---------------------------------------------------------------------------------------------------------
# class counts

def test_pt_class_count_is_read_without_torch():
    code = ("import sys; from pathlib import Path; from rkbench.preflight import checkpoint_classes; "
            "from rkbench.config import resolve_path; "
            f"print(checkpoint_classes(resolve_path('{DEMO_PT}'))[0], 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env=dict(os.environ, PYTHONPATH=str(REPO))).stdout
    assert out.split() == ["4", "False"]


def test_builtin_yaml_class_count():
    assert preflight.yaml_classes("yolov8n.yaml") == (80, "yolov8n.yaml nc")
    assert preflight.builtin_yaml("yolov8n.yaml").name == "yolov8.yaml"
    assert preflight.yaml_classes("no_such_model.yaml") is None


def onnx_with_outputs(path: Path, shapes: list[list[int]]) -> Path:
    """A real, checkable ONNX whose outputs have the given shapes (constant zeros)."""
    nodes, outputs = [], []
    for i, shape in enumerate(shapes):
        value = helper.make_tensor(f"v{i}", TensorProto.FLOAT, shape, [0.0] * math.prod(shape))
        nodes.append(helper.make_node("Constant", [], [f"out{i}"], value=value))
        outputs.append(helper.make_tensor_value_info(f"out{i}", TensorProto.FLOAT, shape))
    images = helper.make_tensor_value_info("images", TensorProto.FLOAT, [1, 3, 32, 32])
    model = helper.make_model(helper.make_graph(nodes, "g", [images], outputs), opset_imports=[helper.make_opsetid("", 12)])
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def rknn_head(nc: int) -> list[list[int]]:
    return [s for hw in (4, 2, 1) for s in ([1, 64, hw, hw], [1, nc, hw, hw], [1, 1, hw, hw])]


@pytest.mark.parametrize("family, shapes, nc", [
    ("yolov8", [[1, 84, 21]], 80),                       # official head [1, 4+nc, A]
    ("yolov8", rknn_head(7), 7),                         # rknn_model_zoo head, class scores [1, nc, H, W]
    ("yolov5", [[1, 63, 7]], 2),                         # yolov5 repo export [1, A, 5+nc]
    ("yolov5", [[1, 3 * 85, h, h] for h in (4, 2, 1)], 80),   # cut head convs [1, na*(5+nc), H, W]
    ("yolov8", [[1, 84, 21], [1, 4]], None),              # unknown layout: not checked
])
def test_onnx_class_count(tmp_path, family, shapes, nc):
    path = onnx_with_outputs(tmp_path / "m.onnx", shapes)
    assert preflight.onnx_classes(path, family) == (None if nc is None else (nc, "m.onnx output shape"))


def test_class_count_mismatch_fails_before_export(run, demo, tmp_path):
    fails([replace(run, model=ModelConfig(yaml="yolov8n.yaml"))],
          match="model has 80 classes \\(yolov8n.yaml nc\\) but dataset demo has 4: use a model trained on this "
                "dataset, or a dataset with the model's classes")
    coco80 = tmp_path / "coco80"
    shutil.copytree(demo, coco80)
    names = "".join(f"  {i}: {n}\n" for i, n in enumerate(COCO80_NAMES))
    (coco80 / "data.yaml").write_text(f"path: {coco80}\nval: images/val\nnames:\n{names}")
    fails([replace(run, dataset=DatasetConfig(name="coco80", kind="yolo", root=str(coco80)))],
          match="model has 4 classes \\(demo_yolov8n.pt model.yaml nc\\) but dataset data has 80")
    onnx4 = onnx_with_outputs(tmp_path / "four.onnx", [[1, 8, 21]])
    preflight.check_runs([replace(run, model=ModelConfig(name="x", onnx=str(onnx4)), export="ultralytics", resolution=32)])


# ---------------------------------------------------------------------------------------------------------
# Hydra

def parse_error(*overrides: str) -> OverrideParseException:
    with pytest.raises(OverrideParseException) as e:
        OverridesParser.create().parse_overrides(list(overrides))
    return e.value


def test_unquoted_path_with_a_space_says_to_quote_it():
    split = preflight.hydra_message(parse_error("model.weights=/path/with", "space/best.pt"))
    assert split == ("'space/best.pt' is not a key=value override (a value with a space, split by the shell?): quote "
                     "the value for Hydra and the whole override for the shell, e.g. "
                     "\"model.weights='/path/with space/best.pt'\"")
    lexer = preflight.hydra_message(parse_error("model.weights=~/my file.pt"))
    assert lexer.startswith("cannot parse the override 'model.weights=~/my file.pt' (LexerNoViableAltException:")
    assert lexer.endswith("e.g. \"model.weights='/path/with space/best.pt'\"") and "\n" not in lexer


def test_other_hydra_messages_are_kept():
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        with pytest.raises(HydraException) as e:
            compose("config", overrides=["model=nope"])
    assert "pick one of demo, yolov5, yolov8" in preflight.hydra_message(e.value)
