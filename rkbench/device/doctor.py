"""Board doctor: read what a board runs (SoC, kernel, NPU driver, librknnrt, rknn_server, Python,
frequencies, free space), flag the known traps with their fix, and tag every board run with the facts.

    python -m rkbench doctor board.address=192.168.1.222:5555      (the entry point maps to `main`)

One shell command gathers everything (one round trip over adb): a constant script whose only inputs are
positional arguments, so nothing from the config is spliced into shell text."""

from __future__ import annotations

import argparse
import re
import sys
from dataclasses import dataclass, field
from typing import Optional

from rkbench import tables
from rkbench.device.transport import Transport, open_transport
from rkbench.errors import DeviceError

# $1 = remote root, $2 = Python snippet, $3 = the board's Python (board.python). Prints key=value lines;
# absent things print nothing or empty.
_PROBE_SCRIPT = r"""
kv() { printf '%s=%s\n' "$1" "$2"; }
# Rockchip's documented version check: strings FILE | grep "<name> version"; grep -a where strings is missing
version_in() {  # "<name> version: 2.3.0 (e80ac5c build@2024-11-07T12:52:53)"; the build part is optional
  if command -v strings >/dev/null 2>&1; then strings "$1" 2>/dev/null | grep -i -o -E "$2 version: [^ ]+( \([^)]*\))?" | head -n 1
  else grep -a -i -o -E "$2 version: [^ ]+( \([^)]*\))?" "$1" 2>/dev/null | head -n 1; fi
}
root="$1"; py="$3"
kv compatible "$(tr '\000' ';' < /proc/device-tree/compatible 2>/dev/null)"
kv kernel "$(uname -r 2>/dev/null)"
kv machine "$(uname -m 2>/dev/null)"
kv npu_driver "$(cat /sys/kernel/debug/rknpu/version 2>/dev/null)"
kv npu_load "$(cat /sys/kernel/debug/rknpu/load 2>/dev/null)"
for f in /usr/lib/librknnrt.so /usr/lib64/librknnrt.so /vendor/lib64/librknnrt.so /vendor/lib/librknnrt.so; do
  if [ -f "$f" ]; then
    kv librknnrt_path "$f"
    kv librknnrt "$(version_in "$f" librknnrt)"
    break
  fi
done
for f in "$(command -v rknn_server 2>/dev/null)" /usr/bin/rknn_server /vendor/bin/rknn_server; do
  if [ -n "$f" ] && [ -f "$f" ]; then
    kv rknn_server "$(version_in "$f" rknn_server)"
    break
  fi
done
# the NPU's devfreq node: <addr>.npu on vendor kernels, devfreq0 on some newer ones (rknn_model_zoo's
# scaling_frequency.sh); else only the SCMI clock's rate in debugfs (no governor)
npu=""
for d in /sys/class/devfreq/*npu* /sys/class/devfreq/devfreq0; do
  if [ -z "$npu" ] && [ -f "$d/cur_freq" ]; then npu="$d"; fi
done
if [ -n "$npu" ]; then
  kv npu_freq_source "$npu"
  kv npu_freq "$(cat "$npu/cur_freq" 2>/dev/null)"
  kv npu_governor "$(cat "$npu/governor" 2>/dev/null)"
elif [ -f /sys/kernel/debug/clk/scmi_clk_npu/clk_rate ]; then
  kv npu_freq_source /sys/kernel/debug/clk/scmi_clk_npu/clk_rate
  kv npu_freq "$(cat /sys/kernel/debug/clk/scmi_clk_npu/clk_rate 2>/dev/null)"
fi
if [ -d /sys/class/devfreq/dmc ]; then
  kv dmc 1
  kv ddr_freq "$(cat /sys/class/devfreq/dmc/cur_freq 2>/dev/null)"
  kv ddr_governor "$(cat /sys/class/devfreq/dmc/governor 2>/dev/null)"
else
  kv dmc 0
fi
for p in /sys/devices/system/cpu/cpufreq/policy*; do
  if [ -d "$p" ]; then
    kv "cpu.${p##*/}" "$(cat "$p/scaling_cur_freq" 2>/dev/null) $(cat "$p/scaling_governor" 2>/dev/null)"
  fi
done
for z in /sys/class/thermal/thermal_zone*; do
  if [ -f "$z/temp" ]; then
    t="$(cat "$z/type" 2>/dev/null || echo "${z##*/}")"
    kv "thermal.$t" "$(cat "$z/temp" 2>/dev/null)"
    kv "thermal_zone.$t" "$z"
  fi
done
# the runner's launcher starts it with setsid (its own process group, killable on timeout / lost link)
kv setsid "$(command -v setsid 2>/dev/null)"
d="$root"
while [ ! -d "$d" ]; do d="$(dirname "$d")"; done
kv df "$(df -Pk "$d" 2>/dev/null | tail -n 1)"
if command -v "$py" >/dev/null 2>&1; then "$py" -c "$2" 2>/dev/null; fi
true
"""

# numpy and opencv: the runner's pre/post-processing; the engines: onnxruntime / rknn-toolkit-lite2
_PY_SNIPPET = """
import sys
print("python=" + sys.version.split()[0])
try:
    from importlib import metadata
except ImportError:
    metadata = None
for key, dist in (("toolkit_lite2", "rknn-toolkit-lite2"), ("onnxruntime", "onnxruntime")):
    try:
        print(key + "=" + metadata.version(dist))
    except Exception:
        pass
for key, module in (("numpy", "numpy"), ("opencv", "cv2")):
    try:
        print(key + "=" + __import__(module).__version__)
    except Exception:
        pass
"""

LOW_SPACE_MIB = 512
STABLE_GOVERNORS = ("performance", "userspace")


@dataclass
class BoardFacts:
    transport: str
    remote_root: str
    emulated: bool = False                   # the rkbench emulator (or a local directory), not real hardware
    soc: Optional[str] = None
    compatible: list[str] = field(default_factory=list)
    kernel: Optional[str] = None
    machine: Optional[str] = None            # `uname -m`: aarch64 on the boards (the C++ runner's build)
    npu_driver: Optional[str] = None
    npu_load: Optional[str] = None
    librknnrt: Optional[str] = None          # "2.3.0"
    librknnrt_build: Optional[str] = None    # "2.3.0 (c949ad889d@2024-11-07T11:35:33)"
    librknnrt_path: Optional[str] = None
    rknn_server: Optional[str] = None
    toolkit_lite2: Optional[str] = None
    onnxruntime: Optional[str] = None
    python: Optional[str] = None             # the version of board.python, None when it is not there
    python_path: str = "python3"             # board.python: the interpreter probed (a venv's python works)
    numpy: Optional[str] = None
    opencv: Optional[str] = None
    npu_freq_source: Optional[str] = None    # the devfreq node (or SCMI clock) the NPU frequency comes from
    npu_freq_hz: Optional[int] = None
    npu_governor: Optional[str] = None
    dmc: bool = False
    ddr_freq_hz: Optional[int] = None
    ddr_governor: Optional[str] = None
    cpu_freq_khz: dict[str, int] = field(default_factory=dict)      # cpufreq policy -> kHz
    cpu_governor: dict[str, str] = field(default_factory=dict)
    thermal_c: dict[str, float] = field(default_factory=dict)      # thermal zone type -> degrees C
    thermal_zones: dict[str, str] = field(default_factory=dict)    # thermal zone type -> its /sys/class/thermal dir
    setsid: Optional[str] = None            # `command -v setsid`: the runner's launcher needs it
    free_mib: Optional[float] = None
    host_toolkit: Optional[str] = None      # rknn-toolkit2 on the host (builds the models)

    def as_tags(self) -> dict[str, str]:
        """`board.*` tags for every run measured on this board (unknown facts are left out)."""
        tags = {"board.transport": self.transport, "board.dmc": str(self.dmc).lower(),
                "board.emulated": str(self.emulated).lower(), "board.python_path": self.python_path}
        if self.emulated:   # the emulated board runs on this machine: its kernel is the host's, not a board's
            tags["board.emulated_facts"] = EMULATED_FACTS
        for key in ("soc", "kernel", "machine", "npu_driver", "librknnrt", "rknn_server", "toolkit_lite2", "onnxruntime",
                    "python", "numpy", "opencv", "npu_freq_source", "npu_freq_hz", "npu_governor", "ddr_freq_hz",
                    "ddr_governor"):
            if key == "kernel" and self.emulated:
                continue
            value = getattr(self, key)
            if value not in (None, ""):
                tags[f"board.{key}"] = str(value)
        if self.cpu_freq_khz:
            tags["board.cpu_freq_khz"] = ",".join(f"{p}:{f}" for p, f in sorted(self.cpu_freq_khz.items()))
        if self.cpu_governor:
            tags["board.cpu_governor"] = ",".join(f"{p}:{g}" for p, g in sorted(self.cpu_governor.items()))
        if self.thermal_c:
            tags["board.thermal_c"] = ",".join(f"{z}:{c:g}" for z, c in sorted(self.thermal_c.items()))
        if self.free_mib is not None:
            tags["board.free_mib"] = f"{self.free_mib:.0f}"
        return tags


# What the emulated board's facts are (tag board.emulated_facts on its runs).
EMULATED_FACTS = ("soc, npu driver, librknnrt, rknn_server, NPU/DDR/CPU frequencies and governors, temperatures: the "
                  "emulator's stand-in files (frequencies and temperatures emulated from this machine's CPU load); "
                  "machine and python: this machine's; kernel left out (this machine's, not a board's); no NPU load")


@dataclass
class Finding:
    level: str      # error | warning | info
    what: str
    fix: str
    needs: str = "npu"   # what it blocks: "npu" (the NPU stack: rknnlite, C++ runner), "python" (the Python runner)
    #                      or "runner" (both runners: the launcher)


def _int(text: Optional[str]) -> Optional[int]:
    return int(text) if text and text.strip().isdigit() else None


def _version(text: Optional[str]) -> Optional[tuple[int, ...]]:
    match = re.search(r"(\d+)\.(\d+)(?:\.(\d+))?", text or "")
    return tuple(int(g or 0) for g in match.groups()) if match else None


def parse_probe(output: str, transport: str, remote_root: str, host_toolkit: Optional[str]) -> BoardFacts:
    values: dict[str, str] = {}
    for line in output.splitlines():
        key, sep, value = line.partition("=")
        if sep and key and key not in values:
            values[key] = value.strip()
    facts = BoardFacts(transport=transport, remote_root=remote_root, host_toolkit=host_toolkit)
    facts.compatible = [c for c in values.get("compatible", "").split(";") if c]
    socs = [c.split(",", 1)[1] for c in facts.compatible if c.startswith("rockchip,") and "-" not in c]
    facts.soc = socs[-1] if socs else None
    facts.kernel = values.get("kernel") or None
    facts.machine = values.get("machine") or None
    driver = re.search(r"v?(\d+\.\d+\.\d+)", values.get("npu_driver", ""))
    facts.npu_driver = driver.group(1) if driver else None
    facts.npu_load = values.get("npu_load") or None
    rt = re.search(r"librknnrt version: (\S+)(.*)", values.get("librknnrt", ""), re.I)
    if rt:
        facts.librknnrt = rt.group(1)
        facts.librknnrt_build = (rt.group(1) + rt.group(2)).strip()
    facts.librknnrt_path = values.get("librknnrt_path") or None
    server = re.search(r"version:\s*(\S+)", values.get("rknn_server", ""))
    facts.rknn_server = server.group(1) if server else None
    facts.toolkit_lite2 = values.get("toolkit_lite2") or None
    facts.onnxruntime = values.get("onnxruntime") or None
    facts.python = values.get("python") or None
    facts.numpy = values.get("numpy") or None
    facts.opencv = values.get("opencv") or None
    facts.npu_freq_source = values.get("npu_freq_source") or None
    facts.npu_freq_hz = _int(values.get("npu_freq"))
    facts.npu_governor = values.get("npu_governor") or None
    facts.dmc = values.get("dmc") == "1"
    facts.ddr_freq_hz = _int(values.get("ddr_freq"))
    facts.ddr_governor = values.get("ddr_governor") or None
    facts.setsid = values.get("setsid") or None
    for key, value in values.items():
        if key.startswith("cpu."):
            freq, _, governor = value.partition(" ")
            if _int(freq) is not None:
                facts.cpu_freq_khz[key[4:]] = int(freq)
            if governor:
                facts.cpu_governor[key[4:]] = governor
        elif key.startswith("thermal.") and _int(value) is not None:
            facts.thermal_c[key[8:]] = int(value) / 1000     # millidegrees
        elif key.startswith("thermal_zone.") and value:
            facts.thermal_zones[key[13:]] = value
    df = values.get("df", "").split()
    if len(df) >= 4 and df[3].isdigit():
        facts.free_mib = int(df[3]) / 1024
    return facts


def host_toolkit_version() -> Optional[str]:
    from importlib import metadata
    try:
        return metadata.version("rknn-toolkit2")
    except metadata.PackageNotFoundError:
        return None


def probe(transport: Transport, host_toolkit_version: Optional[str], *, remote_root: str = "/data/local/tmp/rkbench",
          timeout: float = 60.0, python: str = "python3") -> BoardFacts:
    """`python`: board.python, the interpreter the runner uses (on Debian boards often a venv's python)."""
    result = transport.shell(["sh", "-c", _PROBE_SCRIPT, "sh", remote_root, _PY_SNIPPET, python], timeout=timeout)
    if not result.ok:
        raise DeviceError(f"board probe failed on {transport.describe()} (exit {result.exit_code}): "
                          f"{result.output.strip()[-300:]}; check that the board has a POSIX sh")
    facts = parse_probe(result.output, transport.describe(), remote_root, host_toolkit_version)
    facts.emulated = transport.emulated
    facts.python_path = python
    return facts


def check(facts: BoardFacts, *, expected_soc: Optional[str] = None) -> list[Finding]:
    """Known traps, each with its fix. `expected_soc`: the platform the models are built for."""
    found: list[Finding] = []
    add = lambda level, what, fix: found.append(Finding(level, what, fix))  # noqa: E731
    if facts.soc is None:
        add("error", "SoC unknown: /proc/device-tree/compatible is unreadable",
            "check this is a Rockchip board and the transport reaches it (`adb shell cat /proc/device-tree/compatible`)")
    elif expected_soc and facts.soc != expected_soc:
        add("error", f"board is {facts.soc} but the models are built for {expected_soc}",
            f"set platform={facts.soc} (or use a {expected_soc} board)")
    rt, toolkit = _version(facts.librknnrt), _version(facts.host_toolkit)
    if facts.librknnrt is None:
        add("error", "librknnrt.so not found (or no version string in it)",
            "install librknnrt.so from rknn-toolkit2's rknpu2 runtime into /usr/lib (Android: /vendor/lib64)")
    elif toolkit and rt and toolkit > rt:
        need = ".".join(map(str, toolkit))
        add("error", f"models built by rknn-toolkit2 {facts.host_toolkit} are newer than the board's librknnrt "
            f"{facts.librknnrt} (rknn_init fails: 'Invalid RKNN model version')",
            f"update librknnrt.so and rknn_server on the board to >= {need} (rknpu2 runtime)")
    server = _version(facts.rknn_server)
    if facts.rknn_server is None:
        add("info", "rknn_server not found",
            "only needed to run models from the host with rknn-toolkit2 (connected-board mode); RKNNLite does not")
    elif rt and server and server[:2] != rt[:2]:
        add("warning", f"rknn_server {facts.rknn_server} and librknnrt {facts.librknnrt} come from different releases",
            "install both from the same rknpu2 runtime release")
    lite = _version(facts.toolkit_lite2)
    if lite and rt and lite[:2] > rt[:2]:
        add("warning", f"rknn-toolkit-lite2 {facts.toolkit_lite2} is newer than librknnrt {facts.librknnrt}",
            f"update librknnrt.so on the board to >= {facts.toolkit_lite2}")
    py = facts.python_path
    if facts.python is None:
        found.append(Finding("error", f"no {py} on the board (board.python)",
                             "install python3 there, or set board.python=/path/to/venv/bin/python", "python"))
    else:
        for name, pip in (("numpy", "numpy"), ("opencv", "opencv-python-headless")):
            if getattr(facts, name) is None:
                found.append(Finding("error", f"{name} is not installed for the board's {py} (the runner needs it)",
                                     f"{py} -m pip install {pip} on the board, or set board.python to a Python "
                                     "that has it", "python"))
        if facts.toolkit_lite2 is None:
            add("info", f"rknn-toolkit-lite2 not installed for the board's {py}",
                "pip install the rknn_toolkit_lite2 wheel for the board's Python (runtime=rknnlite needs it)")
    if facts.setsid is None:
        found.append(Finding("error", "no setsid on the board: the runner's launcher starts the runner in its own "
                             "process group with it (so a timeout or a lost link can kill it)",
                             "install util-linux (apt install util-linux), or a busybox/toybox that has setsid",
                             "runner"))
    if facts.npu_driver is None:
        add("warning", "NPU driver version unreadable (/sys/kernel/debug/rknpu/version)",
            "run adbd as root (`adb root`) or read it from `dmesg | grep -i rknpu`")
    if not facts.dmc:
        add("warning", "no /sys/class/devfreq/dmc: the DDR frequency cannot be fixed",
            "rknn-toolkit2 eval_perf crashes here; call it with fix_freq=False")
    unstable = [g for g in (facts.npu_governor, facts.ddr_governor, *facts.cpu_governor.values())
                if g and g not in STABLE_GOVERNORS]
    if unstable:
        add("info", f"frequency governors {', '.join(sorted(set(unstable)))} let clocks float: latency varies run to run",
            "for stable numbers run with board.pin_freq=true (performance governors while measuring, restored after)")
    if facts.free_mib is not None and facts.free_mib < LOW_SPACE_MIB:
        add("warning", f"only {facts.free_mib:.0f} MiB free under {facts.remote_root}",
            f"free space there (old models pile up in {facts.remote_root}/cache) or set board.remote_root elsewhere")
    return found


def format_report(facts: BoardFacts, findings: list[Finding]) -> str:
    rows = [("transport", facts.transport + (" (emulated: no NPU)" if facts.emulated else "")), ("soc", facts.soc), ("compatible", " ".join(facts.compatible)),
            ("kernel", facts.kernel and facts.kernel + (" (this machine's, not a board's)" if facts.emulated else "")),
            ("machine", facts.machine), ("npu driver", facts.npu_driver),
            ("librknnrt", facts.librknnrt_build and f"{facts.librknnrt_build} ({facts.librknnrt_path})"),
            ("rknn_server", facts.rknn_server), ("rknn-toolkit2 (host)", facts.host_toolkit),
            ("rknn-toolkit-lite2", facts.toolkit_lite2), ("onnxruntime", facts.onnxruntime),
            ("python", facts.python and f"{facts.python} ({facts.python_path})"),
            ("numpy / opencv", f"{facts.numpy or 'missing'} / {facts.opencv or 'missing'}"),
            ("npu", facts.npu_freq_hz and f"{facts.npu_freq_hz / 1e6:.0f} MHz {facts.npu_governor or ''} ({facts.npu_freq_source})"),
            ("ddr (dmc)", f"{facts.ddr_freq_hz / 1e6:.0f} MHz {facts.ddr_governor or ''}" if facts.ddr_freq_hz else "absent"),
            ("cpu", ", ".join(f"{p} {f / 1e3:.0f} MHz {facts.cpu_governor.get(p, '')}".strip()
                              for p, f in sorted(facts.cpu_freq_khz.items()))),
            ("temperature", ", ".join(f"{z} {c:.1f} C" for z, c in sorted(facts.thermal_c.items()))),
            ("npu load", facts.npu_load), ("setsid", facts.setsid or "missing"),
            ("free", facts.free_mib is not None and f"{facts.free_mib:.0f} MiB under {facts.remote_root}")]
    lines = ["Board facts"] + ["  " + line for line in tables.text(["fact", "value"], [[k, v or "-"] for k, v in rows])
                               .splitlines()]
    lines.append("Findings" if findings else "Findings: none")
    for f in sorted(findings, key=lambda f: ("error", "warning", "info").index(f.level)):
        lines.append(f"  {f.level.upper():7s} {f.what}\n          fix: {f.fix}")
    return "\n".join(lines)


# Hydra-style keys (as in `python -m rkbench target=board board.address=...`) -> doctor options
HYDRA_KEYS = {"board.serial": "--serial", "board.address": "--address", "board.adb_host": "--adb-host",
              "board.adb_port": "--adb-port", "board.remote_root": "--remote-root", "board.python": "--python",
              "platform": "--platform"}

# board.transport=ssh and its login (rkbench/device/ssh.py)
HYDRA_KEYS.update({"board.transport": "--transport", "board.ssh_user": "--ssh-user", "board.ssh_port": "--ssh-port",
                   "board.ssh_key": "--ssh-key", "board.ssh_known_hosts": "--ssh-known-hosts"})


def hydra_style(argv: list[str], parser: argparse.ArgumentParser) -> list[str]:
    """`board.address=IP:5555` -> `--address IP:5555`, so the sweep's own overrides work here too."""
    out: list[str] = []
    for arg in argv:
        key, sep, value = arg.partition("=")
        if not sep or arg.startswith("-"):
            out.append(arg)
        elif key.lstrip("+") in HYDRA_KEYS:
            out += [HYDRA_KEYS[key.lstrip("+")], value]
        else:
            parser.error(f"{key} is not a doctor setting: use {', '.join(k + '=...' for k in HYDRA_KEYS)}")
    return out


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rkbench doctor", description="Check a board for rkbench.",
                                     epilog="Hydra-style settings work too: board.address=IP:5555 board.serial=S "
                                            "board.adb_host=H board.adb_port=P board.remote_root=DIR board.python=PY platform=rk3588")
    parser.add_argument("--serial", help="adb serial (USB)")
    parser.add_argument("--transport", choices=("adb", "ssh"), default="adb",
                        help="adb, or ssh: --address is then HOST, USER@HOST:PORT or a Host of ~/.ssh/config "
                             "(board.transport=ssh board.ssh_user=U board.ssh_port=P board.ssh_key=F work too)")
    for key in ("user", "port", "key", "known-hosts"):
        parser.add_argument(f"--ssh-{key}", type=int if key == "port" else str, help="ssh only (default: ~/.ssh/config)")
    parser.add_argument("--address", help="network adb address, IP:PORT (runs `adb connect`)")
    parser.add_argument("--adb-host", help="adb server host (default: adb's environment, else 127.0.0.1)")
    parser.add_argument("--adb-port", type=int, help="adb server port (default: ANDROID_ADB_SERVER_PORT, else 5037)")
    parser.add_argument("--remote-root", default="/data/local/tmp/rkbench")
    parser.add_argument("--python", default="python3", help="the board's Python for the runner (board.python)")
    parser.add_argument("--platform", help="SoC the models are built for (e.g. rk3588)")
    parser.add_argument("--host-toolkit", default=None, help="rknn-toolkit2 version (default: the installed one)")
    argv = list(sys.argv[1:] if argv is None else argv)
    farm = [a.split("=", 1)[1] for a in argv if a.startswith("farm=")]
    if farm:   # every board of an inventory at once (rkbench/farm.py)
        from rkbench.errors import ConfigError
        from rkbench.farm import doctor as farm_doctor
        try:
            return farm_doctor(farm[0])
        except ConfigError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    args = parser.parse_args(hydra_style(argv, parser))
    try:
        from rkbench.config import BoardConfig
        transport = open_transport(BoardConfig(
            transport=args.transport, serial=args.serial, address=args.address, adb_host=args.adb_host,
            adb_port=args.adb_port, ssh_user=args.ssh_user, ssh_port=args.ssh_port, ssh_key=args.ssh_key,
            ssh_known_hosts=args.ssh_known_hosts))
        facts = probe(transport, args.host_toolkit or host_toolkit_version(), remote_root=args.remote_root,
                      python=args.python)
    except DeviceError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    findings = check(facts, expected_soc=args.platform)
    print(format_report(facts, findings))
    return 1 if any(f.level == "error" for f in findings) else 0


if __name__ == "__main__":
    sys.exit(main())
