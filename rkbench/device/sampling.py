"""What the board was doing while the runner measured: NPU load per core (debugfs), CPU load
(/proc/stat), the runner's resident memory (/proc/<pid>/status VmRSS, VmHWM), NPU / DDR / CPU
frequencies and their governors (devfreq, cpufreq) and temperatures (thermal zones), sampled by one thread
during each mode; and the device tree / devfreq / cpufreq state at start. Missing sources are recorded
with the reason, never fatal. Board-pushable: numpy only."""

from __future__ import annotations

import glob
import os
import re
import threading
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

NPU_LOAD = "/sys/kernel/debug/rknpu/load"
SAMPLE_INTERVAL_S = 0.2   # seconds between samples, both runners (the C++ runner's: shell_sampler.py)
# The NPU's devfreq node: <addr>.npu on vendor kernels, devfreq0 on some newer ones; else only the SCMI
# clock's rate (rknn_model_zoo's scaling_frequency.sh looks in the same places, in this order).
NPU_DEVFREQ = ("/sys/class/devfreq/*npu*", "/sys/class/devfreq/devfreq0")
SCMI_NPU = "/sys/kernel/debug/clk/scmi_clk_npu/clk_rate"
# name -> (value file, governor file or None, factor to the unit, unit)
Source = Tuple[str, Optional[str], float, str]


def clock_sources(sysfs_root: str) -> Dict[str, Source]:
    """What to sample for frequencies and temperatures on this board: npu_freq, ddr_freq,
    cpu_<policy>_freq (MHz) and temp_<zone type> (degrees C), each only where its file exists."""
    out: Dict[str, Source] = {}
    npu = [d for pattern in NPU_DEVFREQ for d in sorted(glob.glob(board_path(sysfs_root, pattern)))
           if os.path.isfile(os.path.join(d, "cur_freq"))]
    if npu:
        out["npu_freq"] = (os.path.join(npu[0], "cur_freq"), os.path.join(npu[0], "governor"), 1e-6, "MHz")
    elif os.path.isfile(board_path(sysfs_root, SCMI_NPU)):
        out["npu_freq"] = (board_path(sysfs_root, SCMI_NPU), None, 1e-6, "MHz")
    dmc = board_path(sysfs_root, "/sys/class/devfreq/dmc")
    if os.path.isfile(os.path.join(dmc, "cur_freq")):
        out["ddr_freq"] = (os.path.join(dmc, "cur_freq"), os.path.join(dmc, "governor"), 1e-6, "MHz")
    for policy in sorted(glob.glob(board_path(sysfs_root, "/sys/devices/system/cpu/cpufreq/policy*"))):
        out[f"cpu_{os.path.basename(policy)}_freq"] = (os.path.join(policy, "scaling_cur_freq"),
                                                       os.path.join(policy, "scaling_governor"), 1e-3, "MHz")
    for zone in sorted(glob.glob(board_path(sysfs_root, "/sys/class/thermal/thermal_zone*"))):
        kind = (_first_line("", os.path.join(zone, "type")) or os.path.basename(zone)).replace("-", "_")
        out[f"temp_{kind}"] = (os.path.join(zone, "temp"), None, 1e-3, "C")
    return out


def parse_npu_load(text: str) -> Dict[str, float]:
    """'NPU load:  Core0: 12%, Core1:  0%, Core2:  0%,' -> {'0': 12, '1': 0, '2': 0}; single-core 'NPU load: 5%'."""
    cores = re.findall(r"Core(\d+):\s*(\d+(?:\.\d+)?)%", text)
    if cores:
        return {c: float(p) for c, p in cores}
    m = re.search(r"(\d+(?:\.\d+)?)%", text)
    if m:
        return {"0": float(m.group(1))}
    raise ValueError(f"no percentages in {text.strip()!r}")


def read_text(path: str) -> Tuple[Optional[str], str]:
    """(content, '') or (None, why it could not be read)."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read(), ""
    except FileNotFoundError:
        return None, f"missing: {path}"
    except PermissionError:
        return None, f"permission denied: {path} (debugfs needs root)"
    except OSError as exc:
        return None, f"unreadable: {path} ({exc.strerror})"


def cpu_times(text: Optional[str] = None) -> Optional[Tuple[int, int]]:
    """(busy, total) jiffies of all CPUs from /proc/stat (or its text read elsewhere), None where there is none."""
    if text is None:
        text, _ = read_text("/proc/stat")
    if not text or not text.startswith("cpu "):
        return None
    values = [int(v) for v in text.splitlines()[0].split()[1:]]
    idle = values[3] + (values[4] if len(values) > 4 else 0)   # idle + iowait
    return sum(values) - idle, sum(values)


def cpu_load(times: List[Tuple[int, int]]) -> List[float]:
    """Percent busy between consecutive (busy, total) readings (equal totals: no tick passed, left out)."""
    return [100.0 * (b[0] - a[0]) / (b[1] - a[1]) for a, b in zip(times, times[1:]) if b[1] > a[1]]


def status_mib(pid: int, field: str) -> Optional[float]:
    """VmRSS / VmHWM of a process from /proc/<pid>/status, in MiB (None where unreadable)."""
    text, _ = read_text(f"/proc/{pid}/status")
    m = re.search(r"^" + field + r":\s*(\d+)\s*kB", text or "", re.M)
    return int(m.group(1)) / 1024 if m else None


def peak_rss_mib() -> Tuple[Optional[float], str]:
    peak = status_mib(os.getpid(), "VmHWM")
    if peak is not None:
        return peak, "VmHWM"
    try:
        import resource
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "getrusage"   # kB on Linux
    except (ImportError, OSError):
        return None, "unavailable"


class SystemSampler:
    """A thread sampling NPU load per core, CPU load, the runner's RSS, frequencies, governors and
    temperatures while a measurement runs. Missing sources are recorded with the reason, never fatal."""

    def __init__(self, sysfs_root: str, interval: float):
        self.npu_path = board_path(sysfs_root, NPU_LOAD)
        self.pid = os.getpid()     # the runner's own process
        self.sources = clock_sources(sysfs_root)
        self._clocks: Dict[str, List[float]] = {name: [] for name in self.sources}
        self._governors: Dict[str, List[str]] = {name: [] for name in self.sources}
        self.interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sampler", daemon=True)
        self._npu: Dict[str, List[float]] = {}
        self._npu_problem = ""
        self._cpu: List[float] = []
        self._rss: List[float] = []
        self._last_cpu: Optional[Tuple[int, int]] = None
        self.samples = 0

    def __enter__(self) -> "SystemSampler":
        self._last_cpu = cpu_times()   # CPU load counts from here: model loading and warmup stay out
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while True:
            self.sample()
            if self._stop.wait(self.interval):
                self.sample()   # a last sample at the end: short runs still get one CPU delta
                return

    def sample(self) -> None:
        self.samples += 1
        text, why = read_text(self.npu_path)
        if text is None:
            self._npu_problem = why
        else:
            try:
                for core, pct in parse_npu_load(text).items():
                    self._npu.setdefault(core, []).append(pct)
            except ValueError as exc:
                self._npu_problem = f"unparsable: {self.npu_path} ({exc})"
        now = cpu_times()
        if now is not None and self._last_cpu is not None and now[1] > self._last_cpu[1]:
            self._cpu.append(100.0 * (now[0] - self._last_cpu[0]) / (now[1] - self._last_cpu[1]))
        self._last_cpu = now
        rss = status_mib(self.pid, "VmRSS")
        if rss is not None:
            self._rss.append(rss)
        for name, (path, governor_path, factor, _unit) in self.sources.items():
            value = _first_line("", path)
            if value and value.isdigit():
                self._clocks[name].append(int(value) * factor)
            governor = _first_line("", governor_path) if governor_path else None
            if governor and governor not in self._governors[name]:
                self._governors[name].append(governor)

    def result(self) -> Dict[str, Any]:
        peak, source = peak_rss_mib()
        if peak is not None and self._rss and max(self._rss) > peak:   # the kernel updates VmHWM lazily
            peak, source = max(self._rss), "VmRSS sampled (above VmHWM)"
        return summary(self.interval, self.samples, npu_summary(self.npu_path, self._npu, self._npu_problem),
                       self._cpu, clock_summary(self.sources, self._clocks, self._governors),
                       dict(memory_summary(self._rss, peak, source), pid=self.pid))


def npu_summary(path: str, per_core: Dict[str, List[float]], problem: str) -> Dict[str, Any]:
    if not per_core:
        return {"available": False, "path": path, "reason": problem or "no samples"}
    return {"available": True, "path": path,
            "per_core": {c: {"mean_pct": float(np.mean(v)), "max_pct": float(np.max(v)), "samples": len(v)}
                         for c, v in sorted(per_core.items())}}


def clock_summary(sources: Dict[str, Source], values: Dict[str, List[float]],
                  governors: Dict[str, List[str]]) -> Dict[str, Any]:
    return {name: {"path": path, "unit": unit, "min": min(v), "max": max(v), "mean": float(np.mean(v)),
                   "samples": len(v), "governors": governors.get(name, [])}
            for name, (path, _, _, unit) in sources.items() for v in [values.get(name)] if v}


def memory_summary(rss: List[float], peak: Optional[float], source: str) -> Dict[str, Any]:
    return {"peak_rss_mib": peak, "source": source, "rss_mib_mean": float(np.mean(rss)) if rss else None,
            "rss_mib_max_sampled": max(rss) if rss else None, "rss_samples": len(rss)}


def summary(interval: float, samples: int, npu: Dict[str, Any], cpu: List[float], clocks: Dict[str, Any],
            memory: Dict[str, Any]) -> Dict[str, Any]:
    """A result's "system" section, the same for both runners (stages/board.py turns it into metrics)."""
    load: Dict[str, Any] = ({"available": True, "mean_pct": float(np.mean(cpu)), "max_pct": float(np.max(cpu)),
                             "samples": len(cpu)} if cpu else {"available": False, "reason": "no /proc/stat deltas"})
    return {"interval_s": interval, "samples": samples, "npu_load": npu, "cpu_load": load, "clocks": clocks,
            "memory": memory}


def board_path(sysfs_root: str, path: str) -> str:
    return os.path.join(sysfs_root, path.lstrip("/")) if sysfs_root else path


def _first_line(sysfs_root: str, path: str) -> Optional[str]:
    text, _ = read_text(board_path(sysfs_root, path))
    return text.strip() if text is not None else None


def board_facts(sysfs_root: str) -> Dict[str, Any]:
    """Device tree, NPU driver, devfreq and cpufreq state at measurement time (None where absent)."""
    compat, _ = read_text(board_path(sysfs_root, "/proc/device-tree/compatible"))
    facts: Dict[str, Any] = {"compatible": [c for c in compat.split("\0") if c] if compat else None,
                             "rknpu_version": _first_line(sysfs_root, "/sys/kernel/debug/rknpu/version"),
                             "devfreq": {}, "cpufreq": {}}
    for group, base, names in (("devfreq", "/sys/class/devfreq", ("cur_freq", "governor")),
                               ("cpufreq", "/sys/devices/system/cpu/cpufreq", ("scaling_cur_freq", "scaling_governor"))):
        directory = board_path(sysfs_root, base)
        entries = sorted(os.listdir(directory)) if os.path.isdir(directory) else []
        for entry in entries:
            facts[group][entry] = {n: _first_line(sysfs_root, f"{base}/{entry}/{n}") for n in names}
    return facts

