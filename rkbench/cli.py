"""The Hydra side of `python -m rkbench`: compose + validate the whole sweep, then one pipeline run per
configuration, then the sweep's summary and exit code."""

from __future__ import annotations

import logging
import math
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.types import RunMode
from omegaconf import DictConfig
from omegaconf.errors import OmegaConfBaseException

from rkbench import lifecycle, pipeline, spec
from rkbench import metrics as M
from rkbench.config import RunConfig, register, resolve_path, to_run_config
from rkbench.errors import DataError, RkbenchError

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
log = logging.getLogger("rkbench")

register()


def _is_multirun(argv: list[str]) -> bool:
    return "-m" in argv or "--multirun" in argv


def compose_all(argv: list[str]) -> tuple[list[RunConfig], str]:
    """Compose and validate every configuration the command line asks for (all sweep combinations).
    Also returns the output dir of this invocation (hydra.sweep.dir or hydra.run.dir, resolved once)."""
    from hydra import compose, initialize_config_dir

    overrides = [a for a in argv if not a.startswith("-")]
    configs = []
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        combos = [overrides]
        fixed = [o.input_line for o in OverridesParser.create().parse_overrides(overrides) if not o.is_sweep_override()]
        base = compose("config", overrides=fixed, return_hydra_config=True)
        out_dir = str(base.hydra.sweep.dir if _is_multirun(argv) else base.hydra.run.dir)
        if _is_multirun(argv):
            declared = {k: str(v) for k, v in (base.hydra.sweeper.get("params") or {}).items()}
            combos, _ = lifecycle.expand(lifecycle.sweep_overrides(overrides, declared))
        for combo in combos:
            try:
                run = to_run_config(compose("config", overrides=list(combo)))
                spec.plan(run)   # combinations of the axes that apply (core mask vs SoC and batch)
                configs.append(run)
            except OmegaConfBaseException as exc:
                key = getattr(exc, "full_key", "") or ""
                raise RkbenchError(f"{' '.join(combo)}: {str(exc).splitlines()[0]}"
                                   + (f": set {key}=..." if key else "")) from None
    return configs, out_dir


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


def preflight(argv: list[str]) -> str:
    """Config and data checks for the whole sweep, before any export or conversion. Returns the
    invocation's output dir."""
    from hydra.errors import HydraException

    try:
        configs, out_dir = compose_all(argv)
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
    return out_dir


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
    ctx = pipeline.RunContext(multirun=multirun, sweep_dir=hc.sweep.dir if multirun else "",
                              overrides=list(hc.overrides.task), output_dir=Path(hc.runtime.output_dir))
    outcome = pipeline.run(to_run_config(cfg), ctx)
    return outcome.metrics.get(M.EVAL_MAP, math.nan)  # what a sweeper (e.g. optuna) would optimise


def _cell(o: pipeline.Outcome, metric: str) -> str:
    return f"{o.metrics[metric]:.4g}" if metric in o.metrics else "-"


def format_outcomes(outcomes: list[pipeline.Outcome]) -> str:
    """The short result table printed after a run or sweep: the key metrics that any run has. Reused
    numbers are shown too, with the run and time they were measured in."""
    shown = [m for m in M.KEY_METRICS if m == M.EVAL_MAP or any(m in o.metrics for o in outcomes)]
    head = ["run", "status", *[m.split("/", 1)[1] if m.startswith("eval/") else m for m in shown], "cache"]
    rows = [head]
    for o in outcomes:
        cache = " ".join(f"{s}:{h}" for s, h in o.cache.items()) or "-"
        rows.append([o.name, o.status, *[_cell(o, m) for m in shown], cache])
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    notes = [f"  {o.name}: {o.error}" for o in outcomes if o.status == "FAILED"]
    reused = [f"  {o.name}: measured in MLflow run {o.measured_run} at {o.measured_at}" for o in outcomes
              if o.status == "REUSED"]
    collapsed = sorted({f"  {o.collapsed}" for o in outcomes if o.collapsed})
    places = [f"{where}: measured {note}" for where, note in M.WHERE.items() if any(M.where(m) == where for m in shown)]
    return "\n".join(lines + (["failures:"] + notes if notes else [])
                     + (["reused (not measured again; resume=false measures again):"] + reused if reused else [])
                     + (["no effect on the target, collapsed:"] + collapsed if collapsed else [])
                     + (["; ".join(places) + ". Only board numbers are NPU latency."] if places else []))


def finish(out_dir: str) -> int:
    found = lifecycle.outcomes(Path(out_dir))
    if found:
        print(format_outcomes(found))
    failed = [o for o in found if o.status == "FAILED"]
    if failed:
        print(f"rkbench: {len(failed)} of {len(found)} configurations FAILED (see the table above)", file=sys.stderr)
    return 1 if failed else 0


def _pin(key: str, value: str) -> str:
    return f"{key}='{value}'" if "'" not in value else f'{key}="{value}"'


def run_sweep(argv: list[str]) -> int:
    hydra_flags = {"--help", "-h", "--hydra-help", "--cfg", "-c", "--info", "--version", "--shell-completion"}
    if hydra_flags.intersection(argv):
        sys.argv = [sys.argv[0]] + argv
        hydra_entry()
        return 0
    try:
        out_dir = preflight(argv)
    except RkbenchError as err:
        print(f"rkbench: error: {err}", file=sys.stderr)
        return 2
    for stale in Path(out_dir).glob(f"**/{pipeline.OUTCOME_FILE}"):   # a pinned dir used before
        stale.unlink()
    # Hydra's argparse wants its flags before the overrides; users put -m anywhere. The output dir is
    # pinned to the one preflight resolved, so the summary reads the outcomes from where the jobs wrote.
    flags = [a for a in argv if a in ("-m", "--multirun")]
    pinned = _pin("hydra.sweep.dir" if flags else "hydra.run.dir", out_dir)
    sys.argv = [sys.argv[0]] + flags + [a for a in argv if a not in flags] + [pinned]
    try:
        hydra_entry()
    except BaseException:  # Ctrl-C or a bug: the parent run must not stay RUNNING forever
        if flags:
            cfg = compose_all([a for a in argv if a not in flags])[0][0]
            if cfg.tracking.enabled:
                lifecycle.abort(cfg.tracking.uri, cfg.tracking.experiment, out_dir)
        raise
    return finish(out_dir)
