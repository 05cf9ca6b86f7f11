"""The sweep lifecycle as a Hydra Callback, and the sweep arithmetic shared with preflight.

    on_multirun_start  open the sweep's parent MLflow run,
                       tagged with its multirun dir so that every job finds it (in any process)
    (jobs)             each job logs its child run under that parent and writes rkbench_outcome.json
    on_multirun_end    close the parent with the counts of its jobs' outcomes and its best and fastest
                       configurations (metrics sweep/*, tags naming the child runs)

No process-wide state: the parent is found through MLflow by the multirun dir, the outcomes through
the job dirs, so the same holds for launchers that run jobs elsewhere."""

from __future__ import annotations

import itertools
import logging
from pathlib import Path
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

log = logging.getLogger("rkbench")


def sweep_overrides(command_line: list[str], declared: dict[str, Any]) -> list[str]:
    """Like Hydra's basic sweeper: hydra.sweeper.params (from an experiment file) first, the command line wins."""
    given = {o.split("=", 1)[0] for o in command_line}
    return [f"{k}={v}" for k, v in declared.items() if k not in given] + list(command_line)


def expand(overrides: list[str]) -> tuple[list[list[str]], list[str]]:
    """Every combination of the sweep overrides (cartesian product) and the swept keys, both in
    command-line order."""
    parsed = OverridesParser.create().parse_overrides(overrides)
    choices: dict[str, list[str]] = {}
    swept = []
    for o in parsed:
        key = o.get_key_element()
        if o.is_sweep_override():
            choices[key] = [f"{key}={v}" for v in o.sweep_string_iterator()]
            swept.append(key.lstrip("+"))
        else:
            choices[key] = [o.input_line]
    return [list(c) for c in itertools.product(*choices.values())], swept


def outcomes(sweep_dir: Path) -> list:
    """The outcome of each job of a multirun (or the one run of a run dir), in job order."""
    from rkbench.pipeline import OUTCOME_FILE, Outcome

    single = sweep_dir / OUTCOME_FILE
    if single.exists():
        return [Outcome.load(single)]
    files = sweep_dir.rglob(OUTCOME_FILE)   # job dirs: hydra.sweep.subdir, the job number by default
    return [Outcome.load(p) for p in sorted(files, key=lambda p: (int(p.parent.name) if p.parent.name.isdigit() else 0, str(p)))]


def sweep_status(found: list) -> str:
    return "FAILED" if any(o.status == "FAILED" for o in found) else "FINISHED"


def sweep_name(study: str, experiment: str, swept: list[str]) -> str:
    """The parent run's name: the study (else the experiment) and what it sweeps, `card: resolution x algo`."""
    return f"{experiment if study == 'default' else study}: {' x '.join(swept) or 'one configuration'}"


def summary(found: list) -> tuple[dict[str, float], dict[str, str]]:
    """The sweep's headline numbers for its parent run: the best eval/map50_95 and, per place, the fastest
    p50 latency where each child was measured (its first latency among the key metrics: board, emulator,
    simulator, host), each with a tag naming the child run that has it."""
    from rkbench import metrics as M

    metrics: dict[str, float] = {}
    tags: dict[str, str] = {}
    scored = [o for o in found if M.EVAL_MAP in o.metrics]
    if scored:
        best = max(scored, key=lambda o: o.metrics[M.EVAL_MAP])
        metrics["sweep/best_map50_95"] = best.metrics[M.EVAL_MAP]
        tags["rkbench.best_map50_95"] = f"{best.name} ({best.run_id})"
    fastest: dict[str, Any] = {}
    for o in found:
        own = next((m for m in M.KEY_METRICS if m.startswith("latency/") and m in o.metrics), None)
        if own and (own not in fastest or o.metrics[own] < fastest[own].metrics[own]):
            fastest[own] = o
    for metric, o in fastest.items():
        name = f"fastest_{metric.split('/', 1)[1]}"
        metrics[f"sweep/{name}"] = o.metrics[metric]
        tags[f"rkbench.{name}"] = f"{o.name} ({o.run_id})"
    return metrics, tags


def position(job_num: int, size: int, sweep_dir: Path) -> str:
    """`configuration 3/8, ETA 4 min 10 s`: the mean time of the configurations measured so far, for each
    one left (a REUSED one takes a blink and says nothing about the next)."""
    from rkbench.progress import duration

    measured = [o.seconds for o in outcomes(sweep_dir) if o.status != "REUSED"]
    eta = f", ETA {duration(sum(measured) / len(measured) * (size - job_num))}" if measured else ""
    return f"configuration {job_num + 1}/{size}{eta}"


class SweepCallback(Callback):
    """Registered in conf/config.yaml under hydra.callbacks."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        if not config.tracking.enabled:
            return
        from rkbench.tracking import git_sha, tracker_for

        tracker = tracker_for(config.tracking.uri, config.tracking.experiment)
        declared = {k: str(v) for k, v in (config.hydra.sweeper.get("params") or {}).items()}
        _, swept = expand(sweep_overrides(list(config.hydra.overrides.task), declared))
        sweep_dir = str(config.hydra.sweep.dir)
        tracker.start(sweep_name(str(config.study), str(config.tracking.experiment), swept),
                      {"rkbench.kind": "sweep", "rkbench.study": str(config.study), "rkbench.sweep_dir": sweep_dir,
                       "rkbench.git_sha": git_sha(), "rkbench.swept": ",".join(sorted(swept))})

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if not config.tracking.enabled:
            return
        from rkbench.tracking import tracker_for

        tracker = tracker_for(config.tracking.uri, config.tracking.experiment)
        sweep_dir = str(config.hydra.sweep.dir)
        parent = tracker.sweep_parent(sweep_dir)
        if parent is None:
            return
        found = outcomes(Path(sweep_dir))
        counts = {f"sweep/{s.lower()}": float(sum(o.status == s for o in found)) for s in ("FINISHED", "FAILED", "REUSED")}
        best, named = summary(found)
        status = sweep_status(found)
        tracker.log(parent, dict(counts, **best), tags=dict(named, **{"rkbench.status": status}))
        tracker.end(parent, status)


def abort(config_uri: str, experiment: str, sweep_dir: str) -> None:
    """Ctrl-C or a bug ended the sweep: its parent must not stay RUNNING forever."""
    from rkbench.tracking import tracker_for

    tracker = tracker_for(config_uri, experiment)
    parent = tracker.sweep_parent(sweep_dir)
    if parent is not None:
        tracker.log(parent, tags={"rkbench.status": "KILLED"})
        tracker.end(parent, "KILLED")
