"""The sweep lifecycle as a Hydra Callback, and the sweep arithmetic shared with preflight.

    on_multirun_start  open the sweep's parent MLflow run,
                       tagged with its multirun dir so that every job finds it (in any process)
    (jobs)             each job logs its child run under that parent and writes rkbench_outcome.json
    on_multirun_end    close the parent with the counts of its jobs' outcomes

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
    """Every combination of the sweep overrides (cartesian product, command-line order) and the swept keys."""
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
    return [list(c) for c in itertools.product(*choices.values())], sorted(swept)


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
        tracker.start(f"sweep {Path(sweep_dir).name or sweep_dir}",
                      {"rkbench.kind": "sweep", "rkbench.study": str(config.study), "rkbench.sweep_dir": sweep_dir,
                       "rkbench.git_sha": git_sha(), "rkbench.swept": ",".join(swept)})

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
        status = sweep_status(found)
        tracker.log(parent, counts, tags={"rkbench.status": status})
        tracker.end(parent, status)
        print(f"MLflow: parent run {parent} in {tracker.uri}")


def abort(config_uri: str, experiment: str, sweep_dir: str) -> None:
    """Ctrl-C or a bug ended the sweep: its parent must not stay RUNNING forever."""
    from rkbench.tracking import tracker_for

    tracker = tracker_for(config_uri, experiment)
    parent = tracker.sweep_parent(sweep_dir)
    if parent is not None:
        tracker.log(parent, tags={"rkbench.status": "KILLED"})
        tracker.end(parent, "KILLED")
