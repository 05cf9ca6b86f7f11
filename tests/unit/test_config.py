"""Config composition and validation: every bad input fails before any work, naming the fix."""

from __future__ import annotations

import pytest
from hydra import compose, initialize_config_dir

from rkbench.cli import CONF_DIR, compose_all
from rkbench.config import RunConfig, flatten, register, to_run_config, toolkit_platforms
from rkbench.spec import plan
from rkbench.errors import ConfigError, RkbenchError, UnsupportedCombination

register()


def composed(*overrides: str) -> RunConfig:
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return to_run_config(compose("config", overrides=list(overrides)))


def test_default_composes_to_the_embedded_demo():
    run = composed()
    assert run.model.weights == "builtin:demo_yolov8n.pt"
    assert (run.resolution, run.algo, run.platform, run.target, run.export) == (320, "normal", "rk3588", "simulator", "rknn")


@pytest.mark.parametrize("override, fragment", [
    ("resolution=330", "multiple of 32"),
    ("platform=rk9999", "platform"),
    ("platform=rv1126", "legacy rknn-toolkit"),
    ("algo=minmax", "algo"),
    ("quant_method=group33", "quant_method"),
    ("export=onnx", "export"),
    ("simplify=onnxoptimizer", "simplify"),
    ("target=board", "board.serial"),
    ("model.weights=/nonexistent/best.pt", "does not exist"),
    ("calib.size=0", "calibration"),
    ("measure.cpp_outputs=int4", "measure.cpp_outputs"),
    ("calib.source=/nonexistent/calib_images", "calib.source"),
])
def test_invalid_values_are_rejected_with_a_fix(override, fragment):
    with pytest.raises(ConfigError, match=fragment):
        composed(override)


ON_BOARD = ("target=board", "board.address=192.168.1.222:5555")


@pytest.mark.parametrize("overrides, fragment", [
    (("batch=3", "core_mask=0"), "falls back to auto"),
    (("platform=rk3568", "core_mask=0_1_2"), "rk3568 has 1"),
    (("platform=rk3576", "core_mask=2"), "3 NPU cores"),
])
def test_unsupported_combinations(overrides, fragment):
    """Where the core mask applies (a board running the .rknn), combinations are checked ..."""
    with pytest.raises(UnsupportedCombination, match=fragment):
        plan(composed(*overrides, *ON_BOARD))
    # ... and where it has no effect (the simulator) the core mask collapses instead of failing the run
    collapsed = plan(composed(*overrides))
    assert collapsed.config.core_mask == "auto" and "core_mask" in collapsed.collapsed


def test_multi_core_masks_accept_batches():
    assert plan(composed("batch=3", "core_mask=0_1_2", *ON_BOARD)).config.batch == 3


def test_platform_list_comes_from_the_installed_toolkit():
    platforms = toolkit_platforms()
    assert {"rk3588", "rk3568", "rk3566", "rk3576", "rk3562"} <= set(platforms)


def test_sweep_is_expanded_and_every_combination_validated():
    runs, _ = compose_all(["-m", "resolution=320,640", "algo=normal,kl_divergence"])
    assert sorted((r.resolution, r.algo) for r in runs) == [(320, "kl_divergence"), (320, "normal"),
                                                          (640, "kl_divergence"), (640, "normal")]
    with pytest.raises(ConfigError, match="multiple of 32"):
        compose_all(["-m", "resolution=320,330"])


def test_experiment_declares_its_own_sweep():
    runs, _ = compose_all(["+experiment=card", "-m"])
    assert {(r.resolution, r.algo) for r in runs} == {(320, "normal"), (320, "kl_divergence"),
                                                     (640, "normal"), (640, "kl_divergence")}
    assert all(r.study == "card" and r.tracking.experiment == "card" for r in runs)
    # the command line wins over the experiment's declared axis
    assert {r.resolution for r in compose_all(["+experiment=card", "-m", "resolution=416"])[0]} == {416}


def test_missing_mandatory_value_names_the_key():
    with pytest.raises(RkbenchError, match="model.weights"):
        compose_all(["model=yolov8"])


def test_flatten_gives_dotted_params():
    params = flatten(composed("algo=mmse"))
    assert params["algo"] == "mmse" and params["model.family"] == "yolov8" and params["calib.size"] == "16"


@pytest.mark.parametrize("name, size", [("card", 4), ("heads", 4), ("calibration", 9)])
def test_every_experiment_composes(name, size):
    runs, _ = compose_all([f"+experiment={name}", "-m"])
    assert len(runs) == size and all(r.study == name for r in runs)


@pytest.mark.parametrize("argv, fragment", [
    (["resolutoin=320"], "check its spelling"),
    (["model=yolov9"], "pick one of demo, yolov5, yolov8"),
    (["-m", "resolution=320,abc"], "could not be converted to Integer"),
])
def test_composition_errors_name_the_fix(argv, fragment, capsys):
    from rkbench.__main__ import main

    assert main(argv) == 2
    err = capsys.readouterr().err
    assert fragment in err and err.count("\n") == 1
