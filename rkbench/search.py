"""Search, not only grid: hydra-optuna-sweeper picks the configurations (experiments/search.yaml) and each
trial's job returns `objective()`, which optuna minimises:

    the run's p50 latency where it was measured   when its eval/map50_95 >= search.min_map50_95
    INFEASIBLE * (1 + shortfall)                  when it misses the target (worse than any latency in ms)
    FAILED                                        when it has no mAP or no latency (a FAILED run)

The latency is the run's own, named by where it was measured (board, emulator, simulator, host: the first
latency of metrics.KEY_METRICS it has); on the demo without a board that is simulator time, never NPU
latency. The trials are a sweep like any other (parent run, child runs, links for repeated trials);
`SearchCallback` records the target on the parent and, at the end, the best trial, which the report's
Search section shows."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Optional

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from rkbench import metrics as M

log = logging.getLogger("rkbench")

INFEASIBLE = 1e6   # ms: any configuration that meets the target beats every one that does not
# Worse than any trial that ran. Not nan: optuna 2.10 turns nan into a failed trial, and a search whose every
# trial failed then ends in a traceback (no best trial) instead of a FAILED sweep.
FAILED = 3 * INFEASIBLE
TAG = "rkbench.search"   # on the parent: the target; TAG + ".best": the best trial


def latency_metric(metrics: dict[str, float]) -> Optional[str]:
    """The p50 latency a run is judged by: the first of metrics.KEY_METRICS it has (board first)."""
    return next((m for m in M.KEY_METRICS if m.startswith("latency/") and m in metrics), None)


def objective(metrics: dict[str, float], min_map50_95: float) -> float:
    latency = latency_metric(metrics)
    if latency is None or M.EVAL_MAP not in metrics:
        return FAILED
    shortfall = min_map50_95 - metrics[M.EVAL_MAP]
    return metrics[latency] if shortfall <= 0 else INFEASIBLE * (1 + shortfall)


@dataclass
class Best:
    name: str
    run_id: str
    latency_metric: str
    latency_ms: float
    map50_95: float

    def where(self) -> str:
        """`simulator time: not NPU latency` / `board NPU latency`: what the number is, in words."""
        place = M.where(self.latency_metric) or "?"
        return "board NPU latency" if place == "board" else f"{place} time: not NPU latency"

    def line(self) -> str:
        return (f"{self.name} ({self.run_id}): {self.latency_metric.split('/', 1)[1]} {self.latency_ms:.4g} ms "
                f"({self.where()}), mAP50-95 {self.map50_95:.4g}")


def best(runs: Iterable[Any], min_map50_95: float) -> Optional[Best]:
    """The fastest run (anything with .name, .run_id, .metrics: outcomes or report records) that meets the
    target; None when none does."""
    scored = [(objective(r.metrics, min_map50_95), r) for r in runs]
    feasible = [(score, r) for score, r in scored if score < INFEASIBLE]
    if not feasible:
        return None
    _, r = min(feasible, key=lambda pair: pair[0])
    metric = latency_metric(r.metrics)
    return Best(r.name, r.run_id or "", metric, r.metrics[metric], r.metrics[M.EVAL_MAP])


def is_search(config: DictConfig) -> bool:
    return "optuna" in str(config.hydra.sweeper.get("_target_", "")).lower()


def describe(min_map50_95: float) -> str:
    return f"minimise the p50 latency where measured, subject to {M.EVAL_MAP} >= {min_map50_95:g}"


class SearchCallback(Callback):
    """Registered in conf/config.yaml after the sweep callback: on start the parent run already exists (and
    Hydra ends callbacks in reverse order, so at the end it is still open)."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        if not (is_search(config) and config.tracking.enabled):
            return
        from rkbench.tracking import tracker_for

        tracker = tracker_for(config.tracking.uri, config.tracking.experiment)
        parent = tracker.sweep_parent(str(config.hydra.sweep.dir))
        if parent is not None:
            sweeper = config.hydra.sweeper
            tracker.log(parent, tags={TAG: describe(config.search.min_map50_95),
                                      f"{TAG}.min_map50_95": str(config.search.min_map50_95),
                                      f"{TAG}.sampler": f"{sweeper.sampler._target_} seed {sweeper.sampler.get('seed')}",
                                      f"{TAG}.n_trials": str(sweeper.n_trials)})

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if not is_search(config):
            return
        from rkbench.lifecycle import outcomes

        trials = outcomes(Path(str(config.hydra.sweep.dir)))
        found = best(trials, config.search.min_map50_95)
        met = sum(1 for o in trials if objective(o.metrics, config.search.min_map50_95) < INFEASIBLE)
        log.info("search (%s): %d trials, %d meet the target; best: %s", describe(config.search.min_map50_95),
                 len(trials), met, found.line() if found else "none meets the target")
        if not config.tracking.enabled:
            return
        from rkbench.tracking import tracker_for

        tracker = tracker_for(config.tracking.uri, config.tracking.experiment)
        parent = tracker.sweep_parent(str(config.hydra.sweep.dir))
        if parent is not None:
            metrics = {"search/trials": float(len(trials)), "search/feasible": float(met)}
            if found:
                metrics[f"search/{found.latency_metric.split('/', 1)[1]}"] = found.latency_ms
            tracker.log(parent, metrics, tags={f"{TAG}.best": found.line() if found else "none meets the target"})
