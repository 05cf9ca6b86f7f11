"""What an emulated board holds: the files doctor, the runner's sampler and board.pin_freq read or write on
a real Rockchip board.

The device tree's compatible string, the NPU driver's version in debugfs, devfreq nodes for the NPU (named
like the SoC's vendor kernel, `devfreq0` like some newer kernels, or only the SCMI clock's rate in debugfs)
and (optionally) the DDR controller `dmc`, cpufreq policies, thermal zones, and stand-ins for librknnrt.so
and rknn_server that embed their version strings in binary content, as the real binaries do (Rockchip's
check: `strings /usr/bin/rknn_server | grep "rknn_server version"`), under a sandbox laid out as
rkbench/device/sandbox.py maps it.

There is no NPU, so there is no NPU load node (the runner records it as missing). Frequencies and
temperatures are emulated by `EmulatedClocks` from the governors and this machine's CPU load: a governor
written by board.pin_freq takes effect as on a board, and nothing read from these files is a measurement
(runs on the emulator say so in the tag board.emulated_facts).
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Optional

import psutil

from rkbench.device.sandbox import BoardRoot, write_file

# Board facts per SoC: device-tree compatible, the NPU devfreq node name, the cpufreq policies with their
# frequencies (kHz), the NPU cores.
SOCS = {
    "rk3588": ("rockchip,rk3588-evb1-lp4-v10", "fdab0000.npu", {"policy0": 1800000, "policy4": 2256000, "policy6": 2256000}, 3),
    "rk3576": ("rockchip,rk3576-evb1-v10", "27700000.npu", {"policy0": 1800000, "policy4": 2208000}, 2),
    "rk3568": ("rockchip,rk3568-evb1-ddr4-v10", "fde40000.npu", {"policy0": 1992000}, 1),
    "rk3566": ("rockchip,rk3566-evb2-lp4x-v10", "fde40000.npu", {"policy0": 1800000}, 1),
    "rk3562": ("rockchip,rk3562-evb1-lp4x-v10", "ff300000.npu", {"policy0": 2000000}, 1),
}
NPU_HZ = (300000000, 400000000, 500000000, 600000000, 700000000, 800000000, 900000000, 1000000000)
DDR_HZ = (528000000, 1068000000, 1560000000, 2112000000)
SCMI_NPU = "sys/kernel/debug/clk/scmi_clk_npu/clk_rate"
THERMAL_ZONES = ("soc-thermal", "npu-thermal")


def make_board_tree(root: Path, soc: str = "rk3588", *, librknnrt_version: str = "2.3.0",
                    rknn_server_version: Optional[str] = None, npu_driver: str = "0.9.8", dmc: bool = True,
                    npu_devfreq: Optional[str] = None) -> BoardRoot:
    """Write the files a board has into root (idempotent; root/data is left alone). `npu_devfreq`: the NPU's
    devfreq node name (default the SoC's `<addr>.npu`; "devfreq0" as on some newer kernels; "scmi" for no
    devfreq node, only the SCMI clock's rate in debugfs)."""
    if soc not in SOCS:
        raise ValueError(f"emulated SoC {soc!r} unknown: use one of {', '.join(SOCS)}")
    board, npu_node, policies, _cores = SOCS[soc]
    box = BoardRoot(root)
    r = box.root
    write_file(r / "proc/device-tree/compatible", f"{board}\0rockchip,{soc}\0")
    write_file(r / "sys/kernel/debug/rknpu/version", f"RKNPU driver: v{npu_driver}\n")
    (r / "sys/kernel/debug/rknpu/load").unlink(missing_ok=True)   # no NPU, so no load to read
    devfreq = r / "sys/class/devfreq"
    for old in list(devfreq.glob("*npu*")) + [devfreq / "devfreq0", r / SCMI_NPU]:
        _remove(old)
    name = npu_devfreq or npu_node
    if name == "scmi":
        write_file(r / SCMI_NPU, f"{NPU_HZ[0]}\n")
    else:
        _devfreq(devfreq / name, NPU_HZ, "rknpu_ondemand")
    _remove(devfreq / "dmc")
    if dmc:
        _devfreq(devfreq / "dmc", DDR_HZ, "dmc_ondemand")
    for policy, top in policies.items():
        cpu = r / "sys/devices/system/cpu/cpufreq" / policy
        steps = " ".join(str(top * k // 6 // 1000 * 1000) for k in range(2, 7))
        for f, value in (("scaling_available_frequencies", steps), ("scaling_min_freq", steps.split()[0]),
                         ("scaling_max_freq", str(top)), ("scaling_cur_freq", steps.split()[0]),
                         ("scaling_governor", "schedutil"), ("scaling_setspeed", "<unsupported>"),
                         ("scaling_available_governors", "userspace performance schedutil powersave")):
            write_file(cpu / f, value + "\n")
    for i, zone in enumerate(THERMAL_ZONES):
        write_file(r / f"sys/class/thermal/thermal_zone{i}/type", zone + "\n")
        write_file(r / f"sys/class/thermal/thermal_zone{i}/temp", "40000\n")
    # Stand-ins carrying what the real binaries carry: the version string among binary content.
    elf = b"\x7fELF\x02\x01\x01\0" + b"\0" * 56
    write_file(r / "usr/lib/librknnrt.so", elf + b"\x01\x02rknn_init\0rknn_run\0\x03"
               + f"librknnrt version: {librknnrt_version} (c949ad889d@2024-11-07T11:35:33)\0".encode() + b"\0" * 16)
    server = rknn_server_version or librknnrt_version
    write_file(r / "usr/bin/rknn_server", elf + b"\x05\x06start rknn server\0\x07"
               + f"rknn_server version: {server} (e80ac5c build@2024-11-07T12:52:53)\0".encode() + b"\0" * 16,
               mode=0o755)
    box.ensure_python()
    (r / "data/local/tmp").mkdir(parents=True, exist_ok=True)
    return box


def npu_cores(root: Path) -> int:
    """The emulated SoC's NPU cores, from its device tree (what the stand-in librknnrt accepts as core masks)."""
    text = (Path(root) / "proc/device-tree/compatible").read_text(errors="replace")
    return next((cores for soc, (_, _, _, cores) in SOCS.items() if f"rockchip,{soc}\0" in text), 1)


def _devfreq(node: Path, steps: tuple[int, ...], governor: str) -> None:
    for f, value in (("available_frequencies", " ".join(map(str, steps))), ("min_freq", str(steps[0])),
                     ("max_freq", str(steps[-1])), ("cur_freq", str(steps[0])), ("governor", governor),
                     ("available_governors", f"userspace powersave performance {governor}"),
                     ("userspace/set_freq", "<unsupported>")):
        write_file(node / f, value + "\n")


def _remove(path: Path) -> None:
    if path.is_dir():
        for child in sorted(path.rglob("*"), reverse=True):
            child.rmdir() if child.is_dir() else child.unlink()
        path.rmdir()
    elif path.exists():
        path.unlink()


class EmulatedClocks:
    """Frequencies and temperatures that behave like a board's: every `interval` seconds each devfreq node
    and cpufreq policy takes the frequency its governor asks for (performance: the highest, powersave: the
    lowest, userspace: the one set, others: following this machine's CPU load), and each thermal zone warms
    with the load. Emulated, never a measurement of anything but this machine's load."""

    def __init__(self, root: Path, interval: float = 0.05):
        self.root = Path(root)
        self.interval = interval
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._temp = 40.0

    def start(self) -> None:
        psutil.cpu_percent(interval=None)    # primes the load counter
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, daemon=True, name="emu-clocks")
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.tick(psutil.cpu_percent(interval=None) / 100)
            except OSError:
                pass   # the tree is being rewritten or removed: next tick

    def tick(self, load: float) -> None:
        r = self.root
        for node in (r / "sys/class/devfreq").glob("*"):
            self._step(node, "available_frequencies", "governor", "userspace/set_freq", "cur_freq", load)
        for policy in (r / "sys/devices/system/cpu/cpufreq").glob("policy*"):
            self._step(policy, "scaling_available_frequencies", "scaling_governor", "scaling_setspeed",
                       "scaling_cur_freq", load)
        self._temp += (38.0 + 30.0 * load - self._temp) * 0.1
        for zone in (r / "sys/class/thermal").glob("thermal_zone*"):
            _replace(zone / "temp", f"{int(self._temp * 1000)}\n")

    @staticmethod
    def _step(node: Path, available: str, governor: str, setspeed: str, current: str, load: float) -> None:
        steps = sorted(int(v) for v in _read(node / available).split() if v.isdigit())
        gov = _read(node / governor).strip()
        if not steps or not gov:
            return
        wanted = _read(node / setspeed).strip()
        if gov == "performance":
            freq = steps[-1]
        elif gov == "powersave":
            freq = steps[0]
        elif gov == "userspace":
            freq = int(wanted) if wanted.isdigit() else steps[-1]
        else:   # ondemand-like: the lowest step that covers the load
            freq = next(s for s in steps if s >= steps[0] + load * (steps[-1] - steps[0]))
        _replace(node / current, f"{freq}\n")


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


def _replace(path: Path, text: str) -> None:
    """Readers never see a half-written file (a sampler reads these while they change)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
