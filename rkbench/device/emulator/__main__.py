"""`python -m rkbench.device.emulator --root DIR --port 5555`: serve an emulated board until Ctrl-C."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path
from typing import Optional

from rkbench.device.emulator.board import EmulatedBoard
from rkbench.device.emulator.tree import SOCS


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rkbench.device.emulator",
                                     description="Serve an emulated Rockchip board over the adb protocol.")
    parser.add_argument("--root", required=True, type=Path, help="sandbox directory holding the board's files")
    parser.add_argument("--port", type=int, default=5555)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--soc", default="rk3588", choices=sorted(SOCS))
    parser.add_argument("--librknnrt-version", default="2.3.0")
    parser.add_argument("--no-dmc", action="store_true", help="leave out /sys/class/devfreq/dmc (eval_perf trap)")
    parser.add_argument("--npu-devfreq", default=None,
                        help="the NPU's devfreq node: the SoC's <addr>.npu (default), devfreq0, or scmi (no node)")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(asctime)s %(message)s")
    board = EmulatedBoard(args.root, args.soc, args.port, host=args.host,
                          librknnrt_version=args.librknnrt_version, dmc=not args.no_dmc, npu_devfreq=args.npu_devfreq)
    board.start()
    print(f"emulated {args.soc} board listening; connect with: adb connect {board.serial}", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        board.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
