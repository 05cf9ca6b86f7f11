"""board.pin_freq: the NPU, DDR (dmc) and CPU governors set to `performance` (their highest frequency)
while a configuration is measured, and restored afterwards, also when the measurement fails.

The governor files are the ones rknn_model_zoo's scaling_frequency.sh writes: the NPU's devfreq node
(`<addr>.npu` on vendor kernels, `devfreq0` on some newer ones; a board with only the SCMI clock has no
governor to set), `/sys/class/devfreq/dmc`, and every cpufreq policy. Writing them needs root on a real
board (`adb root`, or adbd running as root)."""

from __future__ import annotations

from dataclasses import dataclass, field

from rkbench.device.transport import Transport
from rkbench.errors import DeviceError

# Prints `node<TAB>governor file<TAB>previous governor` before writing each; exit 3 at the first governor it
# cannot write (those already written are listed, so they can be restored). Then, a second later (a kernel
# moves the clock when the governor changes, but not always before `cat` runs), `pinned<TAB>node<TAB>governor
# <TAB>frequency` as read back.
_PIN_SCRIPT = r"""
written=""
set_one() {  # $1 node name, $2 governor file, $3 frequency file
  [ -f "$2" ] || return 0
  printf 'node\t%s\t%s\t%s\n' "$1" "$2" "$(cat "$2")"
  if ! echo performance > "$2" 2>/dev/null; then printf 'denied\t%s\n' "$2"; exit 3; fi
  written="$written$1|$2|$3
"
}
npu=""
for d in /sys/class/devfreq/*npu* /sys/class/devfreq/devfreq0; do
  if [ -z "$npu" ] && [ -f "$d/governor" ]; then npu="$d"; fi
done
[ -n "$npu" ] && set_one npu "$npu/governor" "$npu/cur_freq"
set_one ddr /sys/class/devfreq/dmc/governor /sys/class/devfreq/dmc/cur_freq
for p in /sys/devices/system/cpu/cpufreq/policy*; do
  set_one "${p##*/}" "$p/scaling_governor" "$p/scaling_cur_freq"
done
sleep 1
printf '%s' "$written" | while IFS='|' read -r node gov freq; do
  printf 'pinned\t%s\t%s\t%s\n' "$node" "$(cat "$gov")" "$(cat "$freq" 2>/dev/null)"
done
true
"""

# $1 governor file, $2 governor, ... pairs: written back in order; failures reported, the rest still restored
_RESTORE_SCRIPT = r"""
status=0
while [ $# -ge 2 ]; do
  echo "$2" > "$1" 2>/dev/null || { printf 'not restored\t%s\t%s\n' "$1" "$2"; status=3; }
  shift 2
done
exit $status
"""


@dataclass
class Pinned:
    previous: list[tuple[str, str]] = field(default_factory=list)    # (governor file, governor before)
    values: dict[str, tuple[str, str]] = field(default_factory=dict)  # node -> (governor, frequency as read back)

    def describe(self) -> str:
        """`npu performance 1000 MHz, ddr performance 2112 MHz, policy0 performance 1800 MHz` (tag board.pinned)."""
        def mhz(node: str, freq: str) -> str:
            if not freq.isdigit():
                return "?"
            return f"{int(freq) / (1e3 if node.startswith('policy') else 1e6):.0f} MHz"   # cpufreq is in kHz
        return ", ".join(f"{node} {gov} {mhz(node, freq)}" for node, (gov, freq) in self.values.items())


def pin(transport: Transport, timeout: float = 60.0) -> Pinned:
    """Performance governors everywhere; on a governor that cannot be written, what was written is restored
    and the error names the fix."""
    result = transport.shell(["sh", "-c", _PIN_SCRIPT], timeout=timeout)
    pinned = Pinned()
    denied = ""
    for line in result.output.splitlines():
        kind, *fields = line.split("\t")
        if kind == "node" and len(fields) == 3:
            pinned.previous.append((fields[1], fields[2]))
        elif kind == "pinned" and len(fields) == 3:
            pinned.values[fields[0]] = (fields[1], fields[2])
        elif kind == "denied" and fields:
            denied = fields[0]
    if not result.ok:
        pinned.previous = pinned.previous[:-1] if denied else pinned.previous   # the denied one was not changed
        restore(transport, pinned, timeout)
        raise DeviceError(f"board.pin_freq: cannot write {denied or 'the governors'} on {transport.describe()} "
                          f"(exit {result.exit_code}): run adbd as root (`adb root`) or set board.pin_freq=false")
    return pinned


def restore(transport: Transport, pinned: Pinned, timeout: float = 60.0) -> None:
    """The governors as they were before `pin`, last written first."""
    if not pinned.previous:
        return
    args = [a for path, gov in reversed(pinned.previous) for a in (path, gov)]
    result = transport.shell(["sh", "-c", _RESTORE_SCRIPT, "sh", *args], timeout=timeout)
    if not result.ok:
        raise DeviceError(f"board.pin_freq: governors not restored on {transport.describe()}: "
                          f"{result.output.strip()[:300]}; set them back by hand (echo GOVERNOR > FILE)")
