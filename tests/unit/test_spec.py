"""The run spec: where each axis applies, the run identity (settings + the bytes of every input file +
tool versions), and the inference spec built from the config and the exported model."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace

import pytest

from rkbench.config import ASSETS, BoardConfig, CalibConfig, RunConfig, TrackingConfig
from rkbench.data.demo import demo_dataset
from rkbench.spec import identity, inference_spec, plan


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return demo_dataset(tmp_path_factory.mktemp("demo"), limit=4)


def key(run: RunConfig, dataset) -> str:
    return identity(plan(run), dataset).key


def test_axes_without_effect_collapse_and_say_why():
    p = plan(RunConfig(core_mask="0", batch=2))                   # simulator: batch applies, core mask does not
    assert p.config.core_mask == "auto" and p.config.batch == 2
    assert "core_mask=0 (NPU cores are chosen only on a board" in p.tag()
    ort = plan(RunConfig(target="onnxruntime", algo="mmse", batch=4, calib=CalibConfig(size=8)))
    assert (ort.config.algo, ort.config.batch, ort.config.calib.size) == ("normal", 1, 16)
    assert set(ort.collapsed) == {"algo", "batch", "calib.size"}
    fp16 = plan(RunConfig(quantize=False, algo="kl_divergence"))
    assert fp16.config.algo == "normal" and "quantize=False" in fp16.collapsed["algo"]
    board = plan(RunConfig(target="board", board=BoardConfig(address="1.2.3.4:5555"), core_mask="0_1_2", batch=3))
    assert board.collapsed == {} and board.config.core_mask == "0_1_2"
    onnx_board = plan(RunConfig(target="board", board=BoardConfig(address="1.2.3.4:5555", runtime="onnxruntime"),
                                core_mask="1"))
    assert onnx_board.config.core_mask == "auto" and "board.runtime=onnxruntime" in onnx_board.collapsed["core_mask"]


def test_runner_applies_only_to_a_board_and_cpp_runs_the_rknn(dataset):
    sim = plan(RunConfig(runner="cpp"))
    assert sim.config.runner == "python" and "only the board runner uses it (target=simulator)" in sim.collapsed["runner"]
    assert key(RunConfig(runner="cpp"), dataset) == key(RunConfig(), dataset)
    board = BoardConfig(address="1.2.3.4:5555", runtime="onnxruntime")
    cpp = plan(RunConfig(target="board", runner="cpp", board=board, core_mask="1", quantize=False))
    # the C++ runner drives librknnrt: the .rknn's axes apply, the Python runner's runtime does not
    assert cpp.config.runner == "cpp" and cpp.config.core_mask == "1" and cpp.config.quantize is False
    assert cpp.config.board.runtime == "rknnlite" and "runner=cpp" in cpp.collapsed["board.runtime"]
    python = RunConfig(target="board", board=BoardConfig(address="1.2.3.4:5555"))
    assert key(python, dataset) != key(replace(python, runner="cpp"), dataset)


def test_cpp_measure_settings_apply_only_to_the_cpp_runner_on_a_board(dataset):
    from rkbench.config import MeasureConfig
    from rkbench.device.session import spec_file

    board = BoardConfig(address="1.2.3.4:5555")
    int8 = MeasureConfig(cpp_outputs="int8")
    python = plan(RunConfig(target="board", board=board, measure=int8))
    assert python.config.measure.cpp_outputs == "float" and "runner=python" in python.collapsed["measure.cpp_outputs"]
    cpp = plan(RunConfig(target="board", runner="cpp", board=board, measure=int8))
    assert cpp.config.measure.cpp_outputs == "int8" and not cpp.collapsed
    assert key(cpp.config, dataset) != key(replace(cpp.config, measure=MeasureConfig()), dataset)
    spec = inference_spec(cpp.config, {"imgsz": 64, "head": "rknn", "num_classes": len(dataset.category_ids)}, dataset,
                          "rknnlite")
    measure = json.loads(spec_file(cpp.config, spec))["measure"]
    assert measure["outputs"] == "int8" and measure["zero_copy"] is False
    zero_copy = plan(RunConfig(target="board", board=board, measure=MeasureConfig(cpp_zero_copy=True)))
    assert zero_copy.config.measure.cpp_zero_copy is False and "measure.cpp_zero_copy" in zero_copy.collapsed
    through = MeasureConfig(cpp_pass_through=True)
    assert "measure.cpp_pass_through" in plan(RunConfig(target="board", board=board, measure=through)).collapsed
    through_cpp = plan(RunConfig(target="board", runner="cpp", board=board, measure=through))
    assert through_cpp.config.measure.cpp_pass_through is True and not through_cpp.collapsed
    assert key(through_cpp.config, dataset) != key(replace(through_cpp.config, measure=MeasureConfig()), dataset)
    assert json.loads(spec_file(through_cpp.config, spec))["measure"]["pass_through"] is True
    assert "outputs" not in json.loads(spec_file(python.config, spec))["measure"]   # the Python runner's file as before


def test_identity_ignores_where_results_go_and_collapsed_axes(dataset):
    base = RunConfig()
    assert key(base, dataset) == key(replace(base, tracking=TrackingConfig(uri="sqlite:///elsewhere.db"),
                                             cache_dir="/somewhere/else", resume=False), dataset)
    assert key(base, dataset) == key(replace(base, core_mask="0_1_2"), dataset)          # no effect on the simulator
    assert key(base, dataset) != key(replace(base, algo="mmse"), dataset)
    assert key(base, dataset) != key(replace(base, resolution=640), dataset)


def test_identity_follows_file_contents_not_paths(dataset, tmp_path):
    weights = tmp_path / "best.pt"
    shutil.copy(ASSETS / "demo_yolov8n.pt", weights)
    run = RunConfig()
    run.model.weights = str(weights)
    before = key(run, dataset)
    weights.write_bytes(weights.read_bytes() + b"retrained")          # retrained into the same path
    assert key(run, dataset) != before
    other = demo_dataset(tmp_path / "demo", limit=4)
    image = other.images[0].path
    assert key(run, other) == key(run, dataset) != before            # same bytes elsewhere: same identity
    image.write_bytes(image.read_bytes()[:-1] + b"\0")                 # one image changed
    assert key(run, other) != key(run, dataset)


def test_inference_spec_takes_the_model_facts_from_the_export(dataset):
    run = plan(RunConfig(batch=2, core_mask="0_1_2", target="board", board=BoardConfig(address="x:5555"))).config
    info = {"head": "rknn", "num_classes": 4, "reg_max": 16, "input_shape": [1, 3, 320, 320]}
    spec = inference_spec(run, info, dataset, "rknnlite")
    assert (spec.input_size, spec.num_classes, spec.batch, spec.core_mask) == (320, 4, 2, "0_1_2")
    assert spec.category_ids == tuple(dataset.category_ids)
    host = inference_spec(run, info, dataset, "onnxruntime")
    assert (host.batch, host.core_mask) == (1, "auto")              # the ONNX has a batch of 1, no NPU cores
