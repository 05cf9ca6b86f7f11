"""An emulated Rockchip board: the device side of the adb wire protocol over TCP.

A real adb server connects to it with `adb connect 127.0.0.1:PORT`, exactly as it would to a board's adbd
over Ethernet, so everything from adbutils down to the TCP stream is the real thing; only the NPU is not.
Shell commands run with this machine's /bin/sh and Python (ONNX Runtime stands in for the NPU) inside a
sandbox directory laid out like a board. Test and development tooling only: production code reaches any
board, this one included, through rkbench/device/adb.py and never imports this package.

    python -m rkbench.device.emulator --root DIR --port 5555      (__main__.py)

Modules, from the socket up:
- wire.py   adb packets (CNXN/OPEN/OKAY/WRTE/CLSE), one connection per adb server, flow-controlled streams
- shell.py  the legacy `shell:` service: commands in the sandbox, output streamed back, SIGHUP to the
            shell (only) on close, as adbd
- sync.py   the `sync:` service: STAT, LIST, SEND, RECV, QUIT on sandbox paths
- tree.py   the board's files: device tree, debugfs, devfreq, cpufreq, thermal, librknnrt / rknn_server stand-ins;
            EmulatedClocks: frequencies that follow the governors, temperatures that follow the load
- faults.py FaultPlan: dropped links, killed or hung commands, truncated pulls, a full disk
- board.py  EmulatedBoard: the listener, the banner, service dispatch, fault bookkeeping
The board-path <-> sandbox mapping is rkbench/device/sandbox.py, shared with LocalTransport.
"""

from rkbench.device.emulator.board import EMULATOR_MODEL, EmulatedBoard
from rkbench.device.emulator.faults import FaultPlan
from rkbench.device.emulator.tree import make_board_tree
from rkbench.device.emulator.wire import A_CLSE, A_CNXN, A_OKAY, A_OPEN, A_VERSION, A_WRTE
from rkbench.device.sandbox import BOARD_PREFIXES, BoardRoot

__all__ = ["A_CLSE", "A_CNXN", "A_OKAY", "A_OPEN", "A_VERSION", "A_WRTE", "BOARD_PREFIXES", "BoardRoot",
           "EMULATOR_MODEL", "EmulatedBoard", "FaultPlan", "make_board_tree"]
