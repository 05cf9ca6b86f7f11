"""The Hydra side of `python -m rkbench`: compose + validate the whole sweep, then one pipeline run per
configuration, then the sweep's summary and exit code."""

from __future__ import annotations

import logging
import math
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig
from omegaconf.errors import OmegaConfBaseException

from rkbench import pipeline
from rkbench.config import RunConfig, register, resolve_path, to_run_config
from rkbench.errors import DataError, RkbenchError

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
OUTCOMES: list[pipeline.Outcome] = []
SWEPT: list[str] = []  # the keys a multirun sweeps over, recorded on its parent MLflow run
log = logging.getLogger("rkbench")

register()


def compose_all(argv: list[str]) -> list[RunConfig]:
    """Compose and validate every configuration the command line asks for (all sweep combinations)."""
    from hydra import compose, initialize_config_dir
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    overrides = [a for a in argv if not a.startswith("-")]
    configs = []
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        combos = [overrides]
        if "-m" in argv or "--multirun" in argv:
            # Like Hydra's basic sweeper: hydra.sweeper.params (from an experiment) first, the command line wins.
            fixed = [o.input_line for o in OverridesParser.create().parse_overrides(overrides) if not o.is_sweep_override()]
            base = compose("config", overrides=fixed, return_hydra_config=True)
            declared = {k: str(v) for k, v in (base.hydra.sweeper.get("params") or {}).items()}
            given = {o.split("=", 1)[0] for o in overrides}
            swept = [f"{k}={v}" for k, v in declared.items() if k not in given] + overrides
            parsed = OverridesParser.create().parse_overrides(swept)
            SWEPT[:] = sorted(o.get_key_element().lstrip("+") for o in parsed if o.is_sweep_override())
            combos = BasicSweeper.split_arguments(parsed, None)[0]
        for combo in combos:
            try:
                configs.append(to_run_config(compose("config", overrides=list(combo))))
            except OmegaConfBaseException as exc:
                key = getattr(exc, "full_key", "") or ""
                raise RkbenchError(f"{' '.join(combo)}: {str(exc).splitlines()[0]}"
                                   + (f": set {key}=..." if key else "")) from None
    return configs


def hydra_message(exc: Exception) -> str:
    """Hydra's composition errors in one line that names the fix."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    first = lines[0]
    if "Available options" in str(exc):      # unknown group option: list the options
        options = lines[lines.index(next(ln for ln in lines if ln.startswith("Available options"))) + 1:]
        return f"{first}: pick one of {', '.join(o for o in options if not o.startswith(('Config search', 'provider=')))}"
    if first.startswith("Could not override"):
        return f"{first} No such key: check its spelling (`python -m rkbench --cfg job` prints every key)"
    cause = exc.__cause__
    return f"{first}: {str(cause).splitlines()[0]}" if cause else first


def preflight(argv: list[str]) -> None:
    """Config and data checks for the whole sweep, before any export or conversion."""
    from hydra.errors import HydraException

    try:
        configs = compose_all(argv)
    except HydraException as exc:
        raise RkbenchError(hydra_message(exc)) from None
    for path in sorted({m for run in configs for m in (run.model.weights, run.model.onnx) if m}):
        check_model_file(resolve_path(path))
    seen = set()
    for run in configs:
        key = (repr(run.dataset), run.cache_dir)
        if key not in seen:
            seen.add(key)
            ds = pipeline.load_dataset(run.dataset, Path(run.cache_dir).expanduser().resolve())
            if not ds.images:
                raise RkbenchError(f"dataset {run.dataset.name} has no images: check dataset.* paths")


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


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
def hydra_entry(cfg: DictConfig) -> float:
    hc = HydraConfig.get()
    multirun = hc.mode == RunMode.MULTIRUN
    ctx = pipeline.RunContext(multirun=multirun, sweep_id=hc.sweep.dir if multirun else hc.run.dir,
                              overrides=list(hc.overrides.task), job=hc.job.num if multirun else 0,
                              swept=list(SWEPT))
    outcome = pipeline.run(to_run_config(cfg), ctx)
    OUTCOMES.append(outcome)
    return outcome.metrics.get("eval/map50_95", math.nan)  # what a sweeper (e.g. optuna) would optimise


KEY_METRICS = ("eval/map50_95", "eval_float/map50_95", "eval/map50", "latency/board_py_infer_ms_p50",
               "latency/emulator_py_infer_ms_p50", "throughput/board_fps", "throughput/emulator_fps",
               "latency/simulator_infer_ms_p50", "latency/host_infer_ms_p50", "convert/build_s")
WHERE_NOTE = {"host": "latency/host_* = ONNX Runtime on this PC's CPU", "simulator": "latency/simulator_* = "
              "rknn-toolkit2 simulator on this PC", "emulator": "*/emulator_* = the emulated board (ONNX Runtime "
              "on this PC behind adb)", "board": "*/board_* = the board's NPU"}


def format_outcomes(outcomes: list[pipeline.Outcome]) -> str:
    """The short result table printed after a run or sweep: the key metrics that any run has."""
    shown = [m for m in KEY_METRICS if m == "eval/map50_95" or any(m in o.metrics for o in outcomes)]
    head = ["run", "status", *[m.split("/", 1)[1] if m.startswith("eval/") else m for m in shown], "cache"]
    rows = [head]
    for o in outcomes:
        cells = [o.name, o.status]
        cells += [f"{o.metrics[m]:.4g}" if m in o.metrics else "-" for m in shown]
        cells.append(" ".join(f"{s}:{h}" for s, h in o.cache.items()) or "-")
        rows.append(cells)
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    notes = [f"  {o.name}: {o.error}" for o in outcomes if o.status == "FAILED"]
    places = [note for where, note in WHERE_NOTE.items() if any(where in m for m in shown)]
    footer = "; ".join(places) + (". Only board numbers are NPU latency." if places else "")
    return "\n".join(lines + (["failures:"] + notes if notes else []) + ([footer] if footer else []))


def finish_sweep() -> int:
    sweep = pipeline.SWEEP
    failed = [o for o in OUTCOMES if o.status == "FAILED"]
    if sweep and sweep.tracker and sweep.parent_id:
        counts = {f"sweep/{s.lower()}": float(sum(o.status == s for o in sweep.outcomes))
                  for s in ("FINISHED", "FAILED", "SKIPPED")}
        sweep.tracker.log(sweep.parent_id, counts, tags={"rkbench.status": "FAILED" if failed else "FINISHED"})
        sweep.tracker.end(sweep.parent_id, "FAILED" if failed else "FINISHED")
        print(f"MLflow: parent run {sweep.parent_id} in {sweep.tracker.uri}")
    if OUTCOMES:
        print(format_outcomes(OUTCOMES))
    if failed:
        print(f"rkbench: {len(failed)} of {len(OUTCOMES)} configurations FAILED (see the table above)", file=sys.stderr)
    return 1 if failed else 0


def run_sweep(argv: list[str]) -> int:
    hydra_flags = {"--help", "-h", "--hydra-help", "--cfg", "-c", "--info", "--version", "--shell-completion"}
    if not hydra_flags.intersection(argv):
        try:
            preflight(argv)
        except RkbenchError as err:
            print(f"rkbench: error: {err}", file=sys.stderr)
            return 2
    OUTCOMES.clear()
    pipeline.SWEEP = None
    # Hydra's argparse wants its flags before the overrides; users put -m anywhere.
    flags = [a for a in argv if a in ("-m", "--multirun")]
    sys.argv = [sys.argv[0]] + flags + [a for a in argv if a not in flags]
    try:
        hydra_entry()
    except BaseException:  # Ctrl-C or a bug: the parent run must not stay RUNNING forever
        sweep = pipeline.SWEEP
        if sweep and sweep.tracker and sweep.parent_id:
            sweep.tracker.end(sweep.parent_id, "KILLED")
        raise
    return finish_sweep()
