"""The Hydra side of `python -m rkbench`: compose + validate the whole sweep, then one pipeline run per
configuration, then the sweep's summary and exit code."""

from __future__ import annotations

import logging
import sys
import textwrap
from pathlib import Path
from typing import Optional

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from rkbench import lifecycle, pipeline, search, spec
from rkbench import preflight as checks
from rkbench import tables
from rkbench import metrics as M
from rkbench.config import BOARD_RUNTIMES, TARGETS, BoardConfig, RunConfig, axes, register, to_run_config
from rkbench.errors import RkbenchError
from rkbench.tracking import ui_command

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
log = logging.getLogger("rkbench")

register()


def _is_multirun(argv: list[str]) -> bool:
    return "-m" in argv or "--multirun" in argv


def check_added_keys(overrides: list[str]) -> None:
    """`+key=value` adds a key the schema does not have, which Hydra accepts and rkbench would silently
    ignore: only `+experiment=<study>` (a config group) and hydra's own keys may be added."""
    schema = OmegaConf.structured(RunConfig)
    absent = object()
    for o in OverridesParser.create().parse_overrides(overrides):
        key = o.key_or_group
        if (o.is_add() or o.is_force_add()) and key != "experiment" and not key.startswith(("hydra.", "hydra/")) \
                and OmegaConf.select(schema, key, default=absent) is absent:
            raise RkbenchError(f"{o.input_line}: rkbench has no key {key}, and `+` adds keys the schema does not have: "
                               "fix the name or drop it (python -m rkbench --help lists the axes)")


def _compose(argv: list[str]) -> tuple[list[RunConfig], str, list[str], Optional[int]]:
    """compose_all, plus the keys the sweep varies in command-line order (empty without -m) and, for a
    search (hydra/sweeper=optuna), its number of trials: the configurations are then its whole space."""
    from hydra import compose, initialize_config_dir

    overrides = [a for a in argv if not a.startswith("-")]
    check_added_keys(overrides)
    configs = []
    swept: list[str] = []
    trials: Optional[int] = None
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        combos = [overrides]
        fixed = [o.input_line for o in OverridesParser.create().parse_overrides(overrides) if not o.is_sweep_override()]
        base = compose("config", overrides=fixed, return_hydra_config=True)
        out_dir = str(base.hydra.sweep.dir if _is_multirun(argv) else base.hydra.run.dir)
        if _is_multirun(argv):
            declared = {k: str(v) for k, v in (base.hydra.sweeper.get("params") or {}).items()}
            combos, swept = lifecycle.expand(lifecycle.sweep_overrides(overrides, declared))
            trials = base.hydra.sweeper.get("n_trials")
        for combo in combos:
            try:
                # effective: axes without effect collapsed, combinations of the axes that apply checked
                configs.append(spec.plan(to_run_config(compose("config", overrides=list(combo)))).config)
            except OmegaConfBaseException as exc:
                key = getattr(exc, "full_key", "") or ""
                raise RkbenchError(f"{' '.join(combo)}: {str(exc).splitlines()[0]}"
                                   + (f": set {key}=..." if key else "")) from None
    return configs, out_dir, swept, trials


def compose_all(argv: list[str]) -> tuple[list[RunConfig], str]:
    """Compose and validate every configuration the command line asks for (all sweep combinations).
    Also returns the output dir of this invocation (hydra.sweep.dir or hydra.run.dir, resolved once)."""
    configs, out_dir, _, _ = _compose(argv)
    return configs, out_dir


def preflight(argv: list[str]) -> tuple[list[RunConfig], str, list[str], Optional[int]]:
    """Config and data checks for the whole sweep, before any export or conversion (rkbench/preflight.py).
    Returns the effective configurations, the invocation's output dir, the swept keys and a search's
    number of trials (None for a grid)."""
    from hydra.errors import HydraException

    try:
        configs, out_dir, swept, trials = _compose(argv)
    except HydraException as exc:
        raise RkbenchError(checks.hydra_message(exc)) from None
    checks.check_runs(configs)
    on_ray = _is_multirun(argv) and "hydra/launcher=ray" in argv
    if not on_ray and any(r.farm and r.target == "board" and not (r.board.address or r.board.serial) for r in configs):
        raise RkbenchError("farm=... hands out its boards only to a sweep on Ray: add `-m hydra/launcher=ray`, or "
                           "name one board with board.address=IP:5555")
    return configs, out_dir, swept, trials


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
def hydra_entry(cfg: DictConfig) -> float:
    hc = HydraConfig.get()
    multirun = hc.mode == RunMode.MULTIRUN
    sweep = hc.job.env_set    # RKBENCH_SWEEP_SIZE and RKBENCH_SWEPT, pinned by run_sweep for every job
    ctx = pipeline.RunContext(multirun=multirun, sweep_dir=hc.sweep.dir if multirun else "",
                              overrides=list(hc.overrides.task), output_dir=Path(hc.runtime.output_dir),
                              swept=[k for k in sweep.get("RKBENCH_SWEPT", "").split(",") if k] if multirun else [])
    run = to_run_config(cfg)
    if multirun and sweep.get("RKBENCH_SWEEP_SIZE"):
        log.info("%s: %s", lifecycle.position(hc.job.num, int(sweep.RKBENCH_SWEEP_SIZE), Path(hc.sweep.dir)),
                 pipeline.run_name(run, ctx))
    outcome = pipeline.run(run, ctx)
    return search.objective(outcome.metrics, run.search.min_map50_95)  # what optuna minimises (rkbench/search.py)


def _cell(o: pipeline.Outcome, metric: str) -> str:
    return f"{o.metrics[metric]:.4g}" if metric in o.metrics else "-"


def format_outcomes(outcomes: list[pipeline.Outcome]) -> str:
    """The short result table printed after a run or sweep: the key metrics that any run has. Reused
    numbers are shown too, with the run and time they were measured in."""
    shown = [m for m in M.KEY_METRICS if m == M.EVAL_MAP or any(m in o.metrics for o in outcomes)]
    head = ["run", "status", *[m.split("/", 1)[1] if m.startswith("eval/") else m for m in shown], "cache"]
    rows = []
    for o in outcomes:
        cache = " ".join(f"{s}:{h}" for s, h in o.cache.items()) or "-"
        rows.append([o.name, o.status, *[_cell(o, m) for m in shown], cache])
    lines = tables.text(head, rows).splitlines()
    notes = [f"  {o.name}: {o.error}" for o in outcomes if o.status == "FAILED"]
    reused = [f"  {o.name}: measured in MLflow run {o.measured_run} at {o.measured_at}" for o in outcomes
              if o.status == "REUSED"]
    collapsed = sorted({f"  {o.collapsed}" for o in outcomes if o.collapsed})
    places = [f"{where}: measured {note}" for where, note in M.WHERE.items() if any(M.where(m) == where for m in shown)]
    return "\n".join(lines + (["failures:"] + notes if notes else [])
                     + (["reused (not measured again; resume=false measures again):"] + reused if reused else [])
                     + (["no effect on the target, collapsed:"] + collapsed if collapsed else [])
                     + (["; ".join(places) + ". Only board numbers are NPU latency."] if places else []))


def _shown_path(path: str) -> str:
    """A cache path relative to the working directory when it is below it (shorter to read and copy)."""
    try:
        return str(Path(path).relative_to(Path.cwd()))
    except ValueError:
        return path


def format_mlflow(outcomes: list[pipeline.Outcome], run: RunConfig, parent_name: str) -> str:
    """Where the numbers are: the parent and child run ids, the sweep's best and fastest configurations,
    the command that browses the store, and the model files in the stage cache."""
    lines = []
    if run.tracking.enabled:
        lines.append(f"MLflow experiment {run.tracking.experiment} in {run.tracking.uri}:")
        lines += [f"  parent  {p}  {parent_name}" for p in dict.fromkeys(o.parent for o in outcomes if o.parent)]
        for o in outcomes:
            if o.run_id:
                measured = f"  (measured in {o.measured_run})" if o.measured_run not in (None, o.run_id) else ""
                lines.append(f"  run     {o.run_id}  {o.name}{measured}")
        if len(outcomes) > 1:
            metrics, tags = lifecycle.summary(outcomes)
            for metric, value in metrics.items():
                name = metric.split("/", 1)[1]
                lines.append(f"  {name} {value:.4g}: {tags['rkbench.' + name]}")
        lines.append(f"  browse: {ui_command(run.tracking.uri)}")
    models = [o for o in outcomes if o.models]
    if models:
        lines.append("models in the stage cache" + (" (logged to MLflow once per content: tags rkbench.artifact.*)"
                                                   if run.tracking.enabled else "") + ":")
        lines += [f"  {o.name}: {'  '.join(_shown_path(p) for p in o.models.values())}" for o in models]
    return "\n".join(lines)


def finish(out_dir: str, configs: list[RunConfig], swept: list[str]) -> int:
    found = lifecycle.outcomes(Path(out_dir))
    if found:
        print(format_outcomes(found))
        print(format_mlflow(found, configs[0], lifecycle.sweep_name(configs[0].study, configs[0].tracking.experiment,
                                                                     swept)))
    failed = [o for o in found if o.status == "FAILED"]
    if failed:
        print(f"rkbench: {len(failed)} of {len(found)} configurations FAILED (see the table above)", file=sys.stderr)
    return 1 if failed else 0


def already_measured(configs: list[RunConfig], multirun: bool) -> Optional[list[pipeline.Outcome]]:
    """The no-op resume: every configuration's identity already FINISHED and, for a sweep, one earlier
    sweep holds them all, so there is nothing to run and no membership to record. Read from a sqlite
    store directly, from any other store (a tracking server) through MLflow's client (rkbench/ledger.py);
    None sends the invocation down the normal path. The outcomes name the measured runs, and the holding
    sweep as their parent."""
    from rkbench.ledger import holding_sweep, measured_runs, measured_runs_via_client
    from rkbench.tracking import sqlite_path

    stores = {(r.tracking.uri, r.tracking.experiment) for r in configs}
    if not all(r.resume and r.tracking.enabled for r in configs) or len(stores) != 1:
        return None
    keys = [spec.identity(spec.plan(run), pipeline.load_dataset(run.dataset, Path(run.cache_dir).expanduser().resolve())).key
            for run in configs]
    [(uri, experiment)] = stores
    db = sqlite_path(uri)   # a sqlite file is read directly; a tracking server (team store) through MLflow
    found = (measured_runs(db, experiment, sorted(set(keys))) if db
             else measured_runs_via_client(uri, experiment, sorted(set(keys))))
    holder = holding_sweep(found) if found is not None and multirun else None
    if found is None or (multirun and holder is None):
        return None
    return [pipeline.Outcome("REUSED", found[k].run_id, found[k].name, k, found[k].metrics,
                             measured_run=found[k].run_id, measured_at=found[k].started, parent=holder) for k in keys]


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


# Where an axis can have an effect: a target, and for a board the runner and runtime that run the model there
# (place, runner, board.runtime); the C++ runner has no board.runtime of its own (librknnrt).
PLACES = ([(f"target={t}", "python", "rknnlite") for t in TARGETS if t != "board"]
          + [(f"board.runtime={r}", "python", r) for r in BOARD_RUNTIMES] + [("runner=cpp", "cpp", "rknnlite")])


def applies_to(key: str) -> str:
    """Where an axis has an effect, worked out from rkbench.spec.APPLIES, so the help cannot drift from it."""
    if key == "target":
        return "-"
    rule = next((applies for keys, applies, _ in spec.APPLIES if key in keys), None)
    if rule is None:
        return "every target"

    def applies(place: str, runner: str, runtime: str, quantize: bool) -> bool:
        target = place.split("=")[1] if place.startswith("target=") else "board"
        return rule(RunConfig(target=target, runner=runner, quantize=quantize, board=BoardConfig(runtime=runtime)))

    where = [p for p in PLACES if applies(*p, True)]
    words = [place for place, _, _ in where if place.startswith("target=")]
    board = [place for place, _, _ in where if not place.startswith("target=")]
    on_board = [place for place, _, _ in PLACES if not place.startswith("target=")]
    python = [place for place, runner, _ in PLACES if runner == "python" and not place.startswith("target=")]
    # a board where only some of its runners / runtimes are affected names them
    if board == on_board:
        words.append("target=board")
    elif board == python:
        words.append("target=board runner=python")
    elif board:
        words.append("target=board " + " or ".join(board))
    int8 = any(not applies(*p, False) for p in where)
    return ", ".join(words) + (" with quantize=true" if int8 else "")


def _as_typed(value: object) -> str:
    """A value the way it is typed on the command line: true, 320, [latency,eval]."""
    if isinstance(value, bool):
        return str(value).lower()
    if OmegaConf.is_list(value):
        return f"[{','.join(map(str, value))}]"
    return str(value)


def usage() -> str:
    """`python -m rkbench --help`: generated from the schema and validation constants (rkbench/config.py)
    and rkbench.spec.APPLIES, so the axes and their values cannot drift from what is accepted."""
    defaults = OmegaConf.structured(RunConfig())
    rows = [("KEY", "VALUES; DEFAULT", "APPLIES TO")]
    rows += [(k, f"{v}; default {_as_typed(OmegaConf.select(defaults, k))}", applies_to(k)) for k, v in axes().items()]
    lines = []
    for key, values, where in rows:
        wrapped = textwrap.wrap(values, 52) or [""]
        lines.append(f"  {key:<22}{wrapped[0]:<54}{where}")
        lines += [f"  {'':<22}{more}" for more in wrapped[1:]]

    def choices(group: str) -> str:
        return "|".join(sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml")))

    return "\n".join([
        "usage: python -m rkbench [-m] [KEY=VALUE ...]     one configuration; with -m, every combination of",
        "                                                  the comma-separated values (a sweep)",
        "       python -m rkbench report [--help]          markdown report and plots of a sweep, from MLflow",
        "       python -m rkbench doctor board.address=IP:5555   what a board is, version mismatches and fixes",
        "       python -m rkbench runner build --arch aarch64   the C++ runner's binary for a board (runner=cpp)",
        "       python -m rkbench.device.emulator --help   an emulated board behind a real adb server",
        "",
        "Sweep axes (every value is checked before the first configuration starts; an axis without effect",
        "on the target is collapsed to its default and the run tagged rkbench.collapsed):",
        *lines,
        "",
        f"Groups: model={choices('model')}  dataset={choices('dataset')}  studies: +experiment={choices('experiment')}",
        f"Sweeps on Ray: -m hydra/launcher=ray; board farms: farm={choices('farm')} (python -m rkbench doctor farm=<name>)",
        "MLflow: tracking.uri=..., else $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db; tracking.experiment=rkbench",
        "",
        "Examples:",
        "  python -m rkbench                                               the embedded demo, one configuration",
        "  python -m rkbench -m resolution=320,640 algo=normal,kl_divergence   4 runs under one MLflow parent run",
        "  python -m rkbench model=yolov8 model.weights=/path/best.pt dataset=yolo dataset.root=/data/coco128.yaml",
        "",
        "--cfg job prints the composed configuration; --hydra-help is Hydra's own help.",
    ])


def run_sweep(argv: list[str]) -> int:
    if {"-h", "--help"}.intersection(argv):
        print(usage())
        return 0
    hydra_flags = {"--hydra-help", "--cfg", "-c", "--info", "--version", "--shell-completion"}
    if hydra_flags.intersection(argv):
        sys.argv = [sys.argv[0]] + argv
        hydra_entry()
        return 0
    pipeline.forget_datasets()
    try:
        configs, out_dir, swept, trials = preflight(argv)
    except RkbenchError as err:
        print(f"rkbench: error: {err}", file=sys.stderr)
        return 2
    multirun = _is_multirun(argv)
    done = already_measured(configs, multirun) if trials is None else None   # a search runs its trials
    if done is not None:
        print(format_outcomes(done))
        print(format_mlflow(done, configs[0], "the earlier sweep that holds every configuration"))
        print(f"rkbench: all {len(done)} configuration(s) were measured before"
              + (" and one earlier sweep holds every one" if multirun else "")
              + ": nothing to run (resume=false measures again)")
        return 0
    reap_orphans(configs)
    for stale in Path(out_dir).glob(f"**/{pipeline.OUTCOME_FILE}"):   # a pinned dir used before
        stale.unlink()
    # Hydra's argparse wants its flags before the overrides; users put -m anywhere. The output dir is
    # pinned to the one preflight resolved, so the summary reads the outcomes from where the jobs wrote;
    # a sweep's size and swept keys travel to every job in its config (hydra.job.env_set).
    flags = [a for a in argv if a in ("-m", "--multirun")]
    pinned = [_pin("hydra.sweep.dir", out_dir), f"hydra.job.env_set.RKBENCH_SWEEP_SIZE={trials or len(configs)}",
              _pin("hydra.job.env_set.RKBENCH_SWEPT", ",".join(swept))] if flags else [_pin("hydra.run.dir", out_dir)]
    sys.argv = [sys.argv[0]] + flags + [a for a in argv if a not in flags] + pinned
    try:
        hydra_entry()
    except BaseException as exc:  # Ctrl-C or a bug: the parent run must not stay RUNNING forever
        if flags and configs[0].tracking.enabled:
            lifecycle.abort(configs[0].tracking.uri, configs[0].tracking.experiment, out_dir)
        if isinstance(exc, KeyboardInterrupt):   # __main__ prints one line with how many completed
            raise KeyboardInterrupt(len(lifecycle.outcomes(Path(out_dir)))) from None
        raise
    return finish(out_dir, configs, swept)
