"""The console side of `python -m rkbench` without running a configuration: help, refused `+` keys, the
MLflow store from the environment, run and sweep names, the sweep's headline and progress, and the bars."""

from __future__ import annotations

from pathlib import Path

import fcntl
import io
import os
import pty
import struct
import termios
import time

import pytest

from rkbench import config, lifecycle, progress
from rkbench.__main__ import main
from rkbench.cli import check_added_keys, compose_all
from rkbench.config import ModelConfig, RunConfig
from rkbench.errors import RkbenchError
from rkbench.pipeline import Outcome, RunContext, run_name


def axis_line(out: str, key: str) -> str:
    [line] = [ln for ln in out.splitlines() if ln.split()[:1] == [key]]
    return line


def test_help_is_rkbenchs_own_and_lists_every_axis_from_the_schema(capsys, monkeypatch):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "powered by Hydra" not in out and out.startswith("usage: python -m rkbench")
    for command in ("rkbench report", "rkbench doctor", "python -m rkbench.device.emulator"):
        assert command in out
    for values in (config.HEADS, config.ACTIVATIONS, config.SIMPLIFIERS, config.ALGOS, config.QUANT_DTYPES,
                   config.TARGETS, config.CORE_MASKS, config.toolkit_platforms()):
        assert all(v in out for v in values), values
    # where each axis applies comes from rkbench.spec.APPLIES
    assert "target=board board.runtime=rknnlite" in axis_line(out, "core_mask")
    assert axis_line(out, "algo").endswith(
        "target=simulator, target=board board.runtime=rknnlite or runner=cpp with quantize=true")
    assert axis_line(out, "runner").endswith("target=board")
    assert axis_line(out, "board.runtime").endswith("target=board runner=python")
    assert axis_line(out, "resolution").endswith("every target")
    assert axis_line(out, "measure.modes").endswith("target=board")
    studies = sorted(f.stem for f in (Path(__file__).resolve().parents[2] / "experiments").glob("*.yaml"))
    assert {"accuracy", "calibration", "card", "heads", "hybrid", "resolution", "thresholds", "threadpool", "tiling"} <= set(studies)
    assert f"+experiment={'|'.join(studies)}" in out       # every study file, listed from experiments/
    examples = out.split("Examples:")[1].strip().splitlines()
    assert sum(line.strip().startswith("python -m rkbench") for line in examples) == 3
    assert main(["-h"]) == 0 and capsys.readouterr().out == out
    # generated, so a new accepted value shows up without touching the help
    monkeypatch.setattr(config, "ALGOS", config.ALGOS + ("percentile",))
    assert main(["--help"]) == 0 and "percentile" in axis_line(capsys.readouterr().out, "algo")
    with pytest.raises(SystemExit):         # Hydra's own help, which exits itself
        main(["--hydra-help"])
    assert "Hydra" in capsys.readouterr().out


def test_keys_added_with_plus_that_the_schema_lacks_are_refused(capsys):
    for added in ("+foo=1", "+model.foo=2", "++eval.thresh=0.3"):
        with pytest.raises(RkbenchError, match="adds keys the schema does not have"):
            compose_all([added])
    assert main(["+foo=1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "+foo=1: rkbench has no key foo" in err
    runs, _ = compose_all(["+experiment=card", "-m"])           # a config group, not a key
    assert len(runs) == 4
    [run], _ = compose_all(["++resolution=640"])                  # forced onto a key the schema has
    assert run.resolution == 640
    check_added_keys(["+hydra.job.env_set.X=1", "+hydra/job_logging=disabled"])   # Hydra's own


def test_tracking_uri_is_mlflows_own_variable_unless_given(monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:////srv/mlflow/shared.db")
    assert compose_all([])[0][0].tracking.uri == "sqlite:////srv/mlflow/shared.db"
    assert compose_all(["tracking.uri=sqlite:///here.db"])[0][0].tracking.uri == "sqlite:///here.db"
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    assert compose_all([])[0][0].tracking.uri == "sqlite:///mlflow.db"


def test_run_names_are_the_model_stem_and_the_swept_values():
    run = RunConfig(resolution=640, algo="kl_divergence")
    noise = ["dataset.limit=6", "cache_dir=/data/cache", "tracking.uri=sqlite:////data/m.db"]
    sweep = RunContext(multirun=True, overrides=noise + ["resolution=640", "algo=kl_divergence"],
                       swept=["resolution", "algo"])
    assert run_name(run, sweep) == "demo_yolov8n 640 kl_divergence"
    # keys whose value alone says nothing keep their name; quantize reads as int8 / fp16
    iou = RunContext(multirun=True, overrides=noise + ["eval.iou=0.6", "quantize=false"],
                     swept=["eval.iou", "quantize"])
    assert run_name(RunConfig(), iou) == "demo_yolov8n eval.iou=0.6 fp16"
    # a single run: the axes that differ from their defaults, never paths or unswept settings
    own = RunConfig(model=ModelConfig(name="yolov8", weights="/data/runs/train3/weights/best.pt"), resolution=640,
                    core_mask="0_1_2", target="board")
    assert run_name(own, RunContext(overrides=noise + ["resolution=640"])) == "best 640 core_mask=0_1_2 board"
    assert run_name(RunConfig(), RunContext()) == "demo_yolov8n"


def outcome(name: str, run_id: str, **metrics: float) -> Outcome:
    return Outcome("FINISHED", run_id, name, metrics=metrics)


def test_the_sweep_parent_is_named_after_the_study_and_holds_the_best_and_fastest():
    assert lifecycle.sweep_name("card", "card", ["resolution", "algo"]) == "card: resolution x algo"
    assert lifecycle.sweep_name("default", "rkbench", ["resolution"]) == "rkbench: resolution"
    found = [outcome("m 320 normal", "a", **{"eval/map50_95": 0.70, "latency/simulator_infer_ms_p50": 9.0,
                                            "latency/host_infer_ms_p50": 1.0}),
             outcome("m 640 normal", "b", **{"eval/map50_95": 0.75, "latency/simulator_infer_ms_p50": 30.0,
                                            "latency/host_infer_ms_p50": 3.0}),
             Outcome("FAILED", "c", "m 640 mmse", error="convert failed")]
    metrics, tags = lifecycle.summary(found)
    # the host time of a simulator run is its float reference, not where it was measured
    assert metrics == {"sweep/best_map50_95": 0.75, "sweep/fastest_simulator_infer_ms_p50": 9.0}
    assert tags == {"rkbench.best_map50_95": "m 640 normal (b)",
                    "rkbench.fastest_simulator_infer_ms_p50": "m 320 normal (a)"}


def test_sweep_position_with_an_eta_from_the_configurations_done(tmp_path):
    assert lifecycle.position(0, 5, tmp_path) == "configuration 1/5"
    reused = Outcome("REUSED", "0", "c0", seconds=0.2)
    reused.save(tmp_path / "0")
    assert lifecycle.position(1, 5, tmp_path) == "configuration 2/5"           # nothing measured yet
    for num, seconds in ((1, 50.0), (2, 70.0)):
        Outcome("FINISHED", str(num), f"c{num}", seconds=seconds).save(tmp_path / str(num))
    assert lifecycle.position(3, 5, tmp_path) == "configuration 4/5, ETA 2 min 00 s"   # 60 s for each of 2 left


def terminal() -> tuple[int, io.TextIOWrapper]:
    """A pseudo-terminal 120 columns wide: (the end to read, the end rkbench writes to)."""
    reader, writer = pty.openpty()
    fcntl.ioctl(writer, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))
    os.set_blocking(reader, False)
    return reader, os.fdopen(writer, "w")


def drain(reader: int) -> str:
    chunks = []
    while True:
        try:
            chunks.append(os.read(reader, 65536))
        except OSError:          # nothing more for now (EAGAIN), or the writing end is closed (EIO)
            return b"".join(chunks).decode(errors="replace")


def test_bars_are_drawn_on_a_terminal_and_nowhere_else():
    reader, tty = terminal()
    with tty, progress.bar(6, "evaluating 6 images", "img", tty) as bar:
        for _ in range(6):
            bar.update(1)
    shown = drain(reader)
    assert "evaluating 6 images" in shown and "/6 [" in shown and "img/s" in shown
    log = io.StringIO()                     # a CI log or a pipe: not a terminal
    with progress.bar(6, "evaluating 6 images", "img", log) as bar:
        bar.update(6)
    with progress.elapsed("converting", log):
        pass
    assert log.getvalue() == ""


def test_a_ticking_line_redraws_the_time_while_a_silent_call_runs():
    reader, tty = terminal()
    shown = ""
    with tty, progress.elapsed("converting", tty, every_s=0.01):
        for _ in range(1000):        # the line redraws from its own thread while this one waits
            shown += drain(reader)
            if shown.count("converting: 00:0") >= 2:
                break
            time.sleep(0.01)
    assert shown.count("converting: 00:0") >= 2, shown
    assert progress.duration(42) == "42 s" and progress.duration(125) == "2 min 05 s"
    assert progress.duration(3720) == "1 h 02 min"
