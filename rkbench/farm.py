"""A board farm and distributed sweeps on Ray (`hydra/launcher=ray`, optionally `farm=<inventory>`).

    inventory   conf/farm/<name>.yaml, a Hydra group (farm=<name>): boards, each with a name, SoC, network adb address
    resources   every board is one unit of the Ray custom resource `board:<soc>`; a configuration with
                target=board asks for one unit of its platform's resource, anything else for CPUs
    scheduling  the driver hands each board job one free board of its SoC (one run per board at a time),
                the job's overrides get that board's address, its MLflow run the board's name
    drain       a board job that FAILED on a board that no longer answers: the board is drained, the
                failed attempt leaves the sweep (tag rkbench.kind=attempt, kept in MLflow) and the
                configuration runs again on another board of its SoC, or stays FAILED with the reason

The parent run, resume and the per-job rkbench_outcome.json are the pipeline's own (rkbench/lifecycle.py,
rkbench/pipeline.py): a Ray worker runs the same Hydra job as the basic launcher, in the same job dir.
Hydra finds the launcher class in hydra_plugins/rkbench_farm (conf/hydra/launcher/ray.yaml)."""

from __future__ import annotations

import copy
import logging
import math
import os
import socket
import sys
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import yaml

from rkbench.errors import ConfigError

log = logging.getLogger("rkbench.farm")

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
TRANSPORTS = ("adb",)          # network adb; the inventory names the transport so others can join


@dataclass(frozen=True)
class Board:
    name: str
    soc: str
    address: str                 # IP:PORT of the board's adbd
    transport: str = "adb"
    adb_host: str = "127.0.0.1"  # the adb server this host talks through
    adb_port: int = 5037
    reconnect_s: float = 10.0    # a dropped board: wait this long before the farm drains it (other boards can take the run)

    @property
    def resource(self) -> str:
        return f"board:{self.soc}"

    def overrides(self) -> list[str]:
        """What a job needs to reach this board (board.* keys of the run config)."""
        return [f"board.address={self.address}", f"board.adb_host={self.adb_host}", f"board.adb_port={self.adb_port}",
                f"board.reconnect_s={self.reconnect_s:g}"]

    def reachable(self, timeout_s: float = 3.0) -> bool:
        """The board's adbd accepts TCP: a board that dropped (power, cable, crash) does not."""
        host, _, port = self.address.rpartition(":")
        try:
            with socket.create_connection((host, int(port)), timeout=timeout_s):
                return True
        except (OSError, ValueError):
            return False


@dataclass
class Farm:
    name: str
    boards: list[Board]

    def resources(self) -> dict[str, float]:
        return {k: float(v) for k, v in Counter(b.resource for b in self.boards).items()}


def load_farm(name: str, conf_dir: Path = CONF_DIR) -> Farm:
    """`lab` -> conf/farm/lab.yaml (what `farm=lab` composes into a sweep's config); a .yaml path as is."""
    path = Path(name).expanduser() if name.endswith((".yaml", ".yml")) else conf_dir / "farm" / f"{name}.yaml"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in (conf_dir / "farm").glob("*.yaml"))) or "none"
        raise ConfigError(f"farm={name}: no inventory {path} (have: {known}): write conf/farm/{name}.yaml")
    return farm_from(yaml.safe_load(path.read_text()) or {}, path.stem)


def farm_from(data: dict, name: str) -> Farm:
    """An inventory: `boards:` (name, soc, address; transport, adb_host, adb_port, reconnect_s), and defaults for them."""
    from rkbench.config import toolkit_platforms

    defaults = {k: v for k, v in data.items() if k in ("transport", "adb_host", "adb_port", "reconnect_s")}
    boards = []
    for i, entry in enumerate(data.get("boards") or []):
        try:
            board = Board(**{**defaults, **entry})
        except TypeError as exc:
            raise ConfigError(f"farm={name}: board {i + 1}: {exc}: give name, soc, address (and transport, adb_host, "
                              "adb_port)") from None
        if board.soc not in toolkit_platforms():
            raise ConfigError(f"farm={name}: board {board.name}: soc={board.soc} is not an rknn-toolkit2 platform: use "
                              f"one of {', '.join(toolkit_platforms())}")
        if board.transport not in TRANSPORTS:
            raise ConfigError(f"farm={name}: board {board.name}: transport={board.transport} is not one of "
                              f"{', '.join(TRANSPORTS)}")
        boards.append(board)
    names = [b.name for b in boards]
    if not boards or len(set(names)) != len(names):
        raise ConfigError(f"farm={name}: needs a `boards:` list with unique names (got {names})")
    return Farm(name, boards)


# ------------------------------------------------------------------------------------------ doctor

def doctor(ref: str) -> int:
    """`python -m rkbench doctor farm=lab`: every board probed at once, one report per board."""
    from rkbench.device.adb import AdbTransport
    from rkbench.device.doctor import check, format_report, host_toolkit_version, probe
    from rkbench.errors import DeviceError

    farm = load_farm(ref)
    toolkit = host_toolkit_version()

    def one(board: Board) -> tuple[str, bool]:
        try:
            transport = AdbTransport(address=board.address, adb_host=board.adb_host, adb_port=board.adb_port,
                                     connect_timeout_s=10, io_timeout_s=30)
            facts = probe(transport, toolkit)
        except DeviceError as exc:
            return f"error: {exc}", False
        findings = check(facts, expected_soc=board.soc)
        return format_report(facts, findings), not any(f.level == "error" for f in findings)

    with ThreadPoolExecutor(max_workers=len(farm.boards)) as pool:
        results = list(pool.map(one, farm.boards))
    for board, (text, _) in zip(farm.boards, results):
        print(f"== {board.name} ({board.soc}, {board.transport} {board.address})\n{text}\n")
    bad = [b.name for b, (_, ok) in zip(farm.boards, results) if not ok]
    print(f"farm {farm.name}: {len(farm.boards) - len(bad)} of {len(farm.boards)} boards ready"
          + (f"; not ready: {', '.join(bad)}" if bad else ""))
    return 1 if bad else 0


# ------------------------------------------------------------------------------------------ launcher

@dataclass
class RayOptions:
    address: Optional[str] = None        # an existing cluster ("auto", "ray://head:10001"); None starts a local one
    num_cpus: Optional[int] = None       # local cluster: CPU slots (None: every CPU)
    cpus_per_job: float = 1.0            # a host job (export, conversion, simulator)
    cpus_per_board_job: float = 1.0      # a board job also exports and converts on the host first
    object_store_mib: int = 75           # local cluster: results are small (a job's outcome)
    log_to_driver: bool = True


@dataclass
class Job:
    idx: int
    overrides: list[str]
    soc: Optional[str]                       # a board job: the SoC it needs; None: CPUs only


def _run_job(hydra_context: Any, sweep_config: Any, task_function: Any, singleton_state: Any, cwd: str) -> tuple:
    """On a Ray worker: the same Hydra job as the basic launcher (job dir, env_set, logging, callbacks)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.core.singleton import Singleton
    from hydra.core.utils import run_job, setup_globals

    if os.path.isdir(cwd):   # relative sweep dir, cache and sqlite store resolve as on the driver
        os.chdir(cwd)
    setup_globals()
    Singleton.set_state(singleton_state)
    HydraConfig.instance().set_config(sweep_config)
    ret = run_job(hydra_context=hydra_context, task_function=task_function, config=sweep_config,
                  job_dir_key="hydra.sweep.dir", job_subdir_key="hydra.sweep.subdir")
    return ret, str(ret.hydra_cfg.hydra.runtime.output_dir) if ret.hydra_cfg else ""


class BoardPool:
    """Free boards per SoC; a drained board is never handed out again. Least-used first, so every board works."""

    def __init__(self, farm: Optional[Farm]):
        self.boards = list(farm.boards) if farm else []
        self.busy: set[str] = set()
        self.drained: dict[str, str] = {}
        self.used: Counter[str] = Counter()

    def live(self, soc: str) -> list[Board]:
        return [b for b in self.boards if b.soc == soc and b.name not in self.drained]

    def take(self, soc: str) -> Optional[Board]:
        free = [b for b in self.live(soc) if b.name not in self.busy]
        if not free:
            return None
        board = min(free, key=lambda b: self.used[b.name])
        self.busy.add(board.name)
        self.used[board.name] += 1
        return board

    def give_back(self, board: Board) -> None:
        self.busy.discard(board.name)

    def drain(self, board: Board, why: str) -> None:
        self.drained[board.name] = why
        log.warning("farm: board %s (%s) drained: %s", board.name, board.address, why)


def _start_ray(opts: Any, farm: Optional[Farm]) -> bool:
    """Connect to `address`, or start a local cluster with the farm's board resources. True: we started it."""
    import ray

    if ray.is_initialized():
        return False
    if opts.address:
        ray.init(address=opts.address, log_to_driver=opts.log_to_driver)
    else:
        ray.init(num_cpus=opts.num_cpus, resources=farm.resources() if farm else None, include_dashboard=False,
                 object_store_memory=opts.object_store_mib * 2**20, log_to_driver=opts.log_to_driver,
                 # workers import rkbench and hydra_plugins as the driver does
                 runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}})
    have = ray.cluster_resources()
    missing = {r: n for r, n in (farm.resources() if farm else {}).items() if have.get(r, 0) < n}
    if missing:
        raise ConfigError(f"the Ray cluster at {opts.address} lacks board resources {missing}: start the node that "
                          "reaches those boards with `ray start --resources='{\"board:rk3588\": 2}'` (one unit per board)")
    return True


def _needs(cfg: Any, farm: Optional[Farm]) -> Optional[str]:
    """The SoC a job needs: the effective platform, as in its identity (where the platform has no effect, e.g.
    board.runtime=onnxruntime, it is collapsed to the default like any axis, and so is the board it needs)."""
    from omegaconf import open_dict

    from rkbench import spec
    from rkbench.config import to_run_config

    if cfg.target != "board":
        return None
    job = copy.deepcopy(cfg)
    with open_dict(job):
        del job["hydra"]          # the task function gets the config without Hydra's node, so does the schema
    platform = spec.plan(to_run_config(job)).config.platform
    if farm is None:
        raise ConfigError("target=board under hydra/launcher=ray needs farm=<inventory> (conf/farm/<name>.yaml): "
                          "one run per board at a time is the farm's job")
    if not any(b.soc == platform for b in farm.boards):
        raise ConfigError(f"platform={platform}: farm {farm.name} has no {platform} board "
                          f"(has {', '.join(sorted({b.soc for b in farm.boards}))}): add one or drop that platform")
    return platform


def launch(launcher: Any, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> list:
    """Every job of the sweep on Ray; returns the JobReturns in job order, as the basic launcher does."""
    import ray
    from hydra.core.singleton import Singleton
    from hydra.core.utils import JobReturn, JobStatus, filter_overrides, setup_globals
    from omegaconf import OmegaConf, open_dict

    setup_globals()
    config, ctx = launcher.config, launcher.hydra_context
    Path(str(config.hydra.sweep.dir)).mkdir(parents=True, exist_ok=True)
    farm = (farm_from(OmegaConf.to_container(config.farm, resolve=True), config.hydra.runtime.choices.get("farm"))
            if config.get("farm") else None)
    opts = launcher.opts
    jobs = [Job(initial_job_idx + i, list(o), None) for i, o in enumerate(job_overrides)]

    def sweep_config(job: Job, board: Optional[Board]) -> Any:
        cfg = ctx.config_loader.load_sweep_config(config, job.overrides + (board.overrides() if board else []))
        with open_dict(cfg):
            cfg.hydra.job.id = f"ray_{job.idx}"
            cfg.hydra.job.num = job.idx
        return cfg

    for job in jobs:
        job.soc = _needs(sweep_config(job, None), farm)
    started = _start_ray(opts, farm)
    remote = ray.remote(max_retries=0)(_run_job)
    pool = BoardPool(farm)
    state = Singleton.get_state()
    returns: dict[int, JobReturn] = {}
    running: dict[Any, tuple[Job, Optional[Board]]] = {}
    pending = list(jobs)
    log.info("Ray launcher: %d jobs on %s%s", len(jobs), opts.address or "a local Ray cluster",
             f", farm {farm.name}: " + ", ".join(f"{b.name} ({b.soc})" for b in farm.boards) if farm else "")
    try:
        while pending or running:
            for job in list(pending):
                if job.soc is not None and not pool.live(job.soc):
                    pending.remove(job)
                    returns[job.idx] = _unplaceable(job, sweep_config(job, None), pool)
                    continue
                board = pool.take(job.soc) if job.soc else None
                if job.soc and board is None:
                    continue                          # every board of that SoC is busy: wait for one
                pending.remove(job)
                cfg = sweep_config(job, board)
                options = ({"resources": {board.resource: 1}, "num_cpus": opts.cpus_per_board_job} if board
                           else {"num_cpus": opts.cpus_per_job})
                log.info("\t#%d : %s%s", job.idx, " ".join(filter_overrides(job.overrides)),
                         f" -> board {board.name}" if board else "")
                ref = remote.options(**options).remote(ctx, cfg, launcher.task_function, state, os.getcwd())
                running[ref] = (job, board)
            if not running:
                continue
            [ref], _ = ray.wait(list(running), num_returns=1)
            job, board = running.pop(ref)
            try:
                ret, job_dir = ray.get(ref)
            except ray.exceptions.RayError as exc:    # the worker died: the job ran nowhere to completion
                ret, job_dir = JobReturn(status=JobStatus.FAILED, _return_value=exc), ""
            if board is not None:
                pool.give_back(board)
                if _board_dropped(job, board, job_dir, pool, config):
                    pending.insert(0, job)             # first in line for the next free board of its SoC
                    continue
                _tag_board(job_dir, board, config)
            returns[job.idx] = ret
    finally:
        if started:
            ray.shutdown()
    return [returns[j.idx] for j in jobs]


def _outcome(job_dir: str) -> Any:
    from rkbench.pipeline import OUTCOME_FILE, Outcome

    path = Path(job_dir) / OUTCOME_FILE
    return Outcome.load(path) if job_dir and path.exists() else None


def _board_dropped(job: Job, board: Board, job_dir: str, pool: BoardPool, config: Any) -> bool:
    """True when the job failed because its board went away and another board of the SoC can take it."""
    outcome = _outcome(job_dir)
    if (outcome is not None and outcome.status != "FAILED") or board.reachable():
        return False
    why = f"stopped answering during job #{job.idx}" + (f" ({outcome.error})" if outcome else "")
    pool.drain(board, why)
    again = bool(pool.live(board.soc))
    if outcome is not None and outcome.run_id and config.tracking.enabled:
        from rkbench.tracking import tracker_for

        tracker = tracker_for(config.tracking.uri, config.tracking.experiment)
        note = (f"board {board.name} ({board.address}) dropped mid-run and was drained; "
                + ("the configuration runs again on another board" if again else f"no other {board.soc} board is left"))
        tags = {"rkbench.board": board.name, "rkbench.board_address": board.address, "rkbench.farm": note}
        if again:   # the attempt leaves the sweep (its rows and counts); kept in MLflow as what happened
            tags["rkbench.kind"] = "attempt"
            tracker.client.delete_tag(outcome.run_id, "mlflow.parentRunId")
        tracker.log(outcome.run_id, tags=tags)
    if not again:
        log.error("farm: job #%d failed on %s and no other %s board is left", job.idx, board.name, board.soc)
        return False
    log.warning("farm: job #%d runs again on another %s board", job.idx, board.soc)
    return True


def _tag_board(job_dir: str, board: Board, config: Any) -> None:
    """Which board measured the run (a REUSED link points at a run that carries its own)."""
    outcome = _outcome(job_dir)
    if outcome is None or not outcome.run_id or outcome.status == "REUSED" or not config.tracking.enabled:
        return
    from rkbench.tracking import tracker_for

    tracker_for(config.tracking.uri, config.tracking.experiment).log(
        outcome.run_id, tags={"rkbench.board": board.name, "rkbench.board_address": board.address,
                              "rkbench.board_soc": board.soc})


def _unplaceable(job: Job, cfg: Any, pool: BoardPool) -> Any:
    """Every board of the job's SoC is drained: FAILED with the reason, in the job dir like any outcome."""
    from hydra.core.utils import JobReturn, JobStatus
    from rkbench.pipeline import Outcome

    why = "; ".join(f"{name}: {pool.drained[name]}" for name in pool.drained)
    error = f"no {job.soc} board left in the farm ({why}): bring one back (python -m rkbench doctor farm=...) and run the sweep again to resume"
    log.error("farm: job #%d FAILED: %s", job.idx, error)
    name = " ".join(o for o in job.overrides if not o.startswith("hydra."))
    Outcome("FAILED", None, name, error=error).save(Path(str(cfg.hydra.sweep.dir)) / str(job.idx))
    return JobReturn(status=JobStatus.COMPLETED, _return_value=math.nan, overrides=job.overrides)

