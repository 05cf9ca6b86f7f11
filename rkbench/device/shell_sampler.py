"""What the board was doing while the C++ runner ran, without Python on the board: a POSIX sh loop that the
runner's launcher (session.py) starts beside it reads the files the Python runner's sampler thread reads
(sampling.py) every SAMPLE_INTERVAL_S and writes them, timestamped from /proc/uptime, to a samples file
the host pulls with the result and summarises into the same "system" section (same metric names).

Why a shell loop and not a thread in the C++ runner: the files to read are found once from the board probe
(the same discovery doctor and the Python sampler use), the runner stays a pure measurement of librknnrt,
and the launcher already knows the runner's pid (its own, after setsid's exec). The price, said on every
result ("window"): the loop covers the runner's whole process (rknn_init, warmup, the measurement, writing
the result), not the timed loop only as the Python runner's sampler does."""

from __future__ import annotations

import posixpath
from dataclasses import dataclass
from typing import Any, Optional

from rkbench.device import sampling
from rkbench.device.doctor import BoardFacts

# $1 the runner's pid, $2 seconds between samples, $3 the NPU load file, $4 clock sources, one
# `name<TAB>value file<TAB>governor file or -` line each. One sample: `t<TAB>uptime`, the /proc/stat cpu line,
# Name/VmRSS/VmHWM of the runner, the NPU load line (or why not), a `clock` line per source. Builtins only
# (read, printf) but for sleep, so a sample costs one fork. Ends when the runner's /proc entry is gone.
SAMPLE_LOOP = r"""
sample() {
  set -f
  pid=$1; every=$2; npu=$3; src=$4; ws=$IFS; tn='	
'
  printf 'pid\t%s\n' "$pid"
  while [ -d "/proc/$pid" ]; do
    read -r up _ < /proc/uptime && printf 't\t%s\n' "$up"
    read -r line < /proc/stat && printf 'stat\t%s\n' "$line"
    while read -r k v _; do
      case "$k" in Name:|VmRSS:|VmHWM:) printf 'proc\t%s\t%s\n' "${k%:}" "$v";; esac
    done < "/proc/$pid/status"
    if [ ! -e "$npu" ]; then printf 'npu_error\tmissing: %s\n' "$npu"
    elif read -r line < "$npu"; then printf 'npu\t%s\n' "$line"
    else printf 'npu_error\tunreadable: %s (debugfs needs root)\n' "$npu"; fi
    IFS=$tn; set -- $src; IFS=$ws
    while [ $# -ge 3 ]; do
      v=; g=
      read -r v < "$2"; [ "$3" = - ] || read -r g < "$3"
      printf 'clock\t%s\t%s\t%s\n' "$1" "$v" "$g"
      shift 3
    done
    sleep "$every"
  done
}
"""

WINDOW = ("the C++ runner's whole process (rknn_init, warmup, measurement, result), sampled by the launcher's sh "
          "loop from /proc/uptime-stamped reads")


@dataclass(frozen=True)
class ShellSampling:
    """What the launcher's loop reads: the clock sources found by the board probe, every `interval` s."""

    sources: dict[str, sampling.Source]
    interval: float = sampling.SAMPLE_INTERVAL_S

    def args(self) -> list[str]:
        """The loop's $2..$4 (its $1, the runner's pid, the launcher knows)."""
        lines = "".join(f"{name}\t{path}\t{governor or '-'}\n" for name, (path, governor, _, _) in self.sources.items())
        return [f"{self.interval:g}", sampling.NPU_LOAD, lines]


def probed_sources(facts: BoardFacts) -> dict[str, sampling.Source]:
    """sampling.clock_sources' names and files, from what the board probe found: the NPU's
    devfreq node (or SCMI clock), dmc, the cpufreq policies and the thermal zones."""
    out: dict[str, sampling.Source] = {}
    npu = facts.npu_freq_source
    if npu and npu.endswith("/clk_rate"):   # the SCMI clock: a rate, no governor
        out["npu_freq"] = (npu, None, 1e-6, "MHz")
    elif npu:
        out["npu_freq"] = (f"{npu}/cur_freq", f"{npu}/governor", 1e-6, "MHz")
    if facts.dmc:
        out["ddr_freq"] = ("/sys/class/devfreq/dmc/cur_freq", "/sys/class/devfreq/dmc/governor", 1e-6, "MHz")
    for policy in sorted(facts.cpu_freq_khz):
        base = f"/sys/devices/system/cpu/cpufreq/{policy}"
        out[f"cpu_{policy}_freq"] = (f"{base}/scaling_cur_freq", f"{base}/scaling_governor", 1e-3, "MHz")
    for kind, zone in sorted(facts.thermal_zones.items()):
        out[f"temp_{kind.replace('-', '_')}"] = (posixpath.join(zone, "temp"), None, 1e-3, "C")
    return out


def parse_samples(text: str, plan: ShellSampling, runner_name: str) -> dict[str, Any]:
    """The samples file as a result's "system" section (sampling.summary). Memory counts only samples whose
    process is the runner itself (`Name:` = its binary's first 15 characters), not setsid before its exec."""
    samples: list[list[str]] = []   # a sample's lines, from its `t` line on
    pid: Optional[int] = None
    for line in text.splitlines():
        if line.startswith("pid\t") and line[4:].isdigit():
            pid = int(line[4:])
        elif line.startswith("t\t"):
            samples.append([line])
        elif samples:
            samples[-1].append(line)
    stamps: list[float] = []
    times: list[tuple[int, int]] = []
    npu: dict[str, list[float]] = {}
    npu_problem = ""
    clocks: dict[str, list[float]] = {name: [] for name in plan.sources}
    governors: dict[str, list[str]] = {name: [] for name in plan.sources}
    rss: list[float] = []
    hwm: list[float] = []
    for lines in samples:
        stamps.append(float(lines[0].split("\t")[1]))
        proc: dict[str, str] = {}
        for line in lines[1:]:
            kind, _, rest = line.partition("\t")
            fields = rest.split("\t")
            if kind == "stat":
                found = sampling.cpu_times(rest)
                if found:
                    times.append(found)
            elif kind == "proc" and len(fields) == 2:
                proc[fields[0]] = fields[1]
            elif kind == "npu":
                try:
                    for core, pct in sampling.parse_npu_load(rest).items():
                        npu.setdefault(core, []).append(pct)
                except ValueError as exc:
                    npu_problem = f"unparsable: {sampling.NPU_LOAD} ({exc})"
            elif kind == "npu_error":
                npu_problem = rest
            elif kind == "clock" and len(fields) == 3 and fields[0] in plan.sources:
                name, value, governor = fields
                if value.isdigit():
                    clocks[name].append(int(value) * plan.sources[name][2])
                if governor and governor not in governors[name]:
                    governors[name].append(governor)
        if proc.get("Name") == runner_name[:15]:
            rss += [int(proc["VmRSS"]) / 1024] if proc.get("VmRSS", "").isdigit() else []
            hwm += [int(proc["VmHWM"]) / 1024] if proc.get("VmHWM", "").isdigit() else []
    peak: Optional[float] = max(hwm + rss) if hwm or rss else None
    memory = sampling.memory_summary(rss, peak, "VmHWM / VmRSS sampled by the launcher")
    memory.update(pid=pid, process=runner_name[:15])
    system = sampling.summary(plan.interval, len(samples), sampling.npu_summary(sampling.NPU_LOAD, npu, npu_problem),
                              sampling.cpu_load(times), sampling.clock_summary(plan.sources, clocks, governors), memory)
    gaps = [b - a for a, b in zip(stamps, stamps[1:])]
    system.update(window=WINDOW, window_s=round(stamps[-1] - stamps[0], 2) if stamps else 0.0,   # uptime: 10 ms steps
                  interval_measured_s=sum(gaps) / len(gaps) if gaps else None)
    return system
