"""The Hydra side of `python -m rkbench`: compose + validate the whole sweep, then one pipeline run per
configuration, then the sweep's summary and exit code."""

from __future__ import annotations

import logging
import math
import sys
from pathlib import Path
from typing import Optional

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.types import RunMode
from omegaconf import DictConfig
from omegaconf.errors import OmegaConfBaseException

from rkbench import lifecycle, pipeline, spec
from rkbench import preflight as checks
from rkbench import metrics as M
from rkbench.config import RunConfig, register, to_run_config
from rkbench.errors import RkbenchError

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
                # effective: axes without effect collapsed, combinations of the axes that apply checked
                configs.append(spec.plan(to_run_config(compose("config", overrides=list(combo)))).config)
            except OmegaConfBaseException as exc:
                key = getattr(exc, "full_key", "") or ""
                raise RkbenchError(f"{' '.join(combo)}: {str(exc).splitlines()[0]}"
                                   + (f": set {key}=..." if key else "")) from None
    return configs, out_dir


def preflight(argv: list[str]) -> tuple[list[RunConfig], str]:
    """Config and data checks for the whole sweep, before any export or conversion (rkbench/preflight.py).
    Returns the effective configurations and the invocation's output dir."""
    from hydra.errors import HydraException

    try:
        configs, out_dir = compose_all(argv)
    except HydraException as exc:
        raise RkbenchError(checks.hydra_message(exc)) from None
    checks.check_runs(configs)
    return configs, out_dir


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


def already_measured(configs: list[RunConfig], multirun: bool) -> Optional[list[pipeline.Outcome]]:
    """The no-op resume: every configuration's identity already FINISHED and, for a sweep, one earlier
    sweep holds them all, so there is nothing to run and no membership to record. Read from the sqlite
    store directly (rkbench/ledger.py); None sends the invocation down the normal path."""
    from rkbench.ledger import holding_sweep, measured_runs
    from rkbench.tracking import sqlite_path

    stores = {(r.tracking.uri, r.tracking.experiment) for r in configs}
    if not all(r.resume and r.tracking.enabled for r in configs) or len(stores) != 1:
        return None
    datasets: dict[tuple, object] = {}
    keys = []
    for run in configs:
        where = (repr(run.dataset), run.cache_dir)
        if where not in datasets:
            datasets[where] = pipeline.load_dataset(run.dataset, Path(run.cache_dir).expanduser().resolve())
        keys.append(spec.identity(spec.plan(run), datasets[where]).key)
    [(uri, experiment)] = stores
    found = measured_runs(sqlite_path(uri), experiment, sorted(set(keys)))
    if found is None or (multirun and holding_sweep(found) is None):
        return None
    return [pipeline.Outcome("REUSED", found[k].run_id, found[k].name, k, found[k].metrics,
                             measured_run=found[k].run_id, measured_at=found[k].started) for k in keys]


def reap_orphans(configs: list[RunConfig]) -> None:
    """Runs left RUNNING by a process that died (kill -9) are marked KILLED before new ones start."""
    from rkbench.tracking import tracker_for

    for uri, exp in sorted({(r.tracking.uri, r.tracking.experiment) for r in configs if r.tracking.enabled}):
        reaped = tracker_for(uri, exp).reap_orphans()
        if reaped:
            print(f"rkbench: marked {len(reaped)} MLflow run(s) KILLED whose process died: {', '.join(reaped)}",
                  file=sys.stderr)


def _pin(key: str, value: str) -> str:
    return f"{key}='{value}'" if "'" not in value else f'{key}="{value}"'


def run_sweep(argv: list[str]) -> int:
    hydra_flags = {"--help", "-h", "--hydra-help", "--cfg", "-c", "--info", "--version", "--shell-completion"}
    if hydra_flags.intersection(argv):
        sys.argv = [sys.argv[0]] + argv
        hydra_entry()
        return 0
    try:
        configs, out_dir = preflight(argv)
    except RkbenchError as err:
        print(f"rkbench: error: {err}", file=sys.stderr)
        return 2
    done = already_measured(configs, bool(_is_multirun(argv)))
    if done is not None:
        print(format_outcomes(done))
        print(f"rkbench: all {len(done)} configuration(s) were measured before"
              + (" and one earlier sweep holds every one" if _is_multirun(argv) else "")
              + ": nothing to run (resume=false measures again)")
        return 0
    reap_orphans(configs)
    for stale in Path(out_dir).glob(f"**/{pipeline.OUTCOME_FILE}"):   # a pinned dir used before
        stale.unlink()
    # Hydra's argparse wants its flags before the overrides; users put -m anywhere. The output dir is
    # pinned to the one preflight resolved, so the summary reads the outcomes from where the jobs wrote.
    flags = [a for a in argv if a in ("-m", "--multirun")]
    pinned = _pin("hydra.sweep.dir" if flags else "hydra.run.dir", out_dir)
    sys.argv = [sys.argv[0]] + flags + [a for a in argv if a not in flags] + [pinned]
    try:
        hydra_entry()
    except BaseException as exc:  # Ctrl-C or a bug: the parent run must not stay RUNNING forever
        if flags and configs[0].tracking.enabled:
            lifecycle.abort(configs[0].tracking.uri, configs[0].tracking.experiment, out_dir)
        if isinstance(exc, KeyboardInterrupt):   # __main__ prints one line with how many completed
            raise KeyboardInterrupt(len(lifecycle.outcomes(Path(out_dir)))) from None
        raise
    return finish(out_dir)
