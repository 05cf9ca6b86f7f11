"""Is a latency number fit to be compared? MLPerf style: each measurement is VALID or INVALID, with
the reasons, judged from MLflow data only. An INVALID number is shown, marked, and never wins a "best"
or "fastest" line.

A measurement `latency/<stem>_<stat>` (stem e.g. `simulator_infer_ms`, `board_py_total_ms`) is INVALID when
- it has fewer timed iterations than `min_iterations`, or they took less than `min_seconds` in all
  (clocks ramp up, caches warm: a short run measures the start, not the steady state);
- its coefficient of variation (std / mean) is above `max_cv` (the p50 of a spread that wide is not
  repeatable);
- it was taken on a real board whose NPU, DDR or CPU frequency governor (tags `board.*_governor` from
  the doctor probe) is neither `performance` nor `userspace`: the clock was not pinned. Governors the probe
  could not read are not held against the run;
- the iteration count or the cv was not recorded at all (it cannot be checked, so it is not trusted);
- on a real board, the NPU or DDR clock sampled during the latency mode (`system/board_latency_{npu,ddr}_freq_mhz_
  {min,max}`) moved: a floating governor or thermal throttling changed the clock under the measurement;
- the runner's log had a librknnrt warning saying the run was not what its parameters say (tags
  `rkbench.warning.*` in rkbench.device.runner_log.INVALIDATING, e.g. a core mask that fell back to auto).

Iterations come from the metric `latency/<stem>_count` when logged, else from the run's `rkbench.measure`
tag ("<where>: ..., N calls" for host and simulator, "latency: W warmup + N timed iterations of batch B in
S s" for the board runner); seconds from that tag, else iterations x mean."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Optional

from rkbench.device.runner_log import INVALIDATING
from rkbench.report.runs import RunRecord, latency_stem

PINNED = ("performance", "userspace")
GOVERNORS = ("board.npu_governor", "board.ddr_governor", "board.cpu_governor")

HOST_CALLS = re.compile(r"(?:^|\| )(\w+): [^|]*?\b(\d+) calls\b")
RUNNER_LOOP = re.compile(r"latency: \d+ warmup \+ (\d+) timed iterations of batch \d+ in ([\d.]+) s")


@dataclass(frozen=True)
class Limits:
    min_iterations: int = 20
    min_seconds: float = 1.0
    max_cv: float = 0.2


@dataclass(frozen=True)
class Timing:
    iterations: Optional[int]
    seconds: Optional[float]
    cv: Optional[float]


def timing(run: RunRecord, stem: str) -> Timing:
    """Iterations, timed seconds and cv of the measurement `latency/<stem>_*` (None where not recorded)."""
    m, tag = run.metrics, run.tags.get("rkbench.measure", "")
    iterations: Optional[int] = int(m[f"latency/{stem}_count"]) if f"latency/{stem}_count" in m else None
    seconds = None
    place = stem.split("_", 1)[0]
    if iterations is None and stem.startswith(f"{place}_py_"):       # the board runner's latency loop
        found = RUNNER_LOOP.search(tag)
        if found and run.tags.get("rkbench.device_kind") == place:
            iterations, seconds = int(found.group(1)), float(found.group(2))
    if iterations is None:
        iterations = next((int(n) for w, n in HOST_CALLS.findall(tag) if w == place), None)
    mean = m.get(f"latency/{stem}_mean", m.get(f"latency/{stem}_p50"))
    if seconds is None and iterations is not None and mean is not None:
        seconds = iterations * mean / 1000.0
    return Timing(iterations, seconds, m.get(f"latency/{stem}_cv"))


def validity(run: RunRecord, stem: Optional[str] = None, limits: Limits = Limits()) -> tuple[bool, list[str]]:
    """(valid, reasons it is not) for the measurement `latency/<stem>_*`, by default the run's end-to-end
    latency at the place it was measured (runs.latency_stem). A run without one is not valid."""
    stem = stem or latency_stem(run)
    if stem is None:
        return False, ["no latency measured"]
    t = timing(run, stem)
    reasons = []
    if t.iterations is None:
        reasons.append("iteration count not recorded")
    elif t.iterations < limits.min_iterations:
        reasons.append(f"{t.iterations} iterations < {limits.min_iterations}")
    if t.seconds is not None and t.seconds < limits.min_seconds:
        reasons.append(f"{t.seconds:.2g} s timed < {limits.min_seconds:g} s")
    if t.cv is None or math.isnan(t.cv):
        reasons.append("cv not recorded")
    elif t.cv > limits.max_cv:
        reasons.append(f"cv {t.cv:.2f} > {limits.max_cv:g}")
    if stem.startswith("board_") and run.tags.get("rkbench.device_kind") == "board":
        for tag in GOVERNORS:
            # board.cpu_governor is "policy0:schedutil,policy4:performance"; the others one name
            loose = sorted({g.rpartition(":")[2] for g in run.tags.get(tag, "").split(",") if g} - set(PINNED))
            if loose:
                reasons.append(f"{tag.removeprefix('board.')} {'/'.join(loose)}: clock not pinned "
                               "(set it to performance)")
        for clock in ("npu", "ddr"):
            low = run.metrics.get(f"system/board_latency_{clock}_freq_mhz_min")
            high = run.metrics.get(f"system/board_latency_{clock}_freq_mhz_max")
            if low is not None and high is not None and low < high:
                reasons.append(f"{clock} clock moved {low:.0f}-{high:.0f} MHz while measuring (board.pin_freq=true "
                               "pins it; a pinned clock that still drops is thermal throttling)")
    for tag, why in INVALIDATING.items():
        if tag in run.tags:
            core_mask = run.params.get("core_mask")
            reasons.append(f"{why}{f' (logged as core_mask={core_mask})' if core_mask else ''}: {run.tags[tag]}")
    return not reasons, reasons


def as_text(valid: bool, reasons: list[str]) -> str:
    return "VALID" if valid else "INVALID: " + "; ".join(reasons)
