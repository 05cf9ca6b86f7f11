"""What an emulated board holds: the files doctor and the runner read on a real Rockchip board.

The device tree's compatible string, the NPU driver's debugfs (version, a stand-in load node), devfreq
nodes for the NPU and (optionally) the DDR controller `dmc`, cpufreq policies, and stand-ins for
librknnrt.so and rknn_server that carry the version strings the real binaries embed, under a sandbox
laid out as rkbench/device/sandbox.py maps it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from rkbench.device.sandbox import BoardRoot, write_file

# Board facts per SoC: device-tree compatible, the NPU devfreq node name, the cpufreq policies.
SOCS = {
    "rk3588": ("rockchip,rk3588-evb1-lp4-v10", "fdab0000.npu", ("policy0", "policy4", "policy6")),
    "rk3576": ("rockchip,rk3576-evb1-v10", "27700000.npu", ("policy0", "policy4")),
    "rk3568": ("rockchip,rk3568-evb1-ddr4-v10", "fde40000.npu", ("policy0",)),
    "rk3566": ("rockchip,rk3566-evb2-lp4x-v10", "fde40000.npu", ("policy0",)),
    "rk3562": ("rockchip,rk3562-evb1-lp4x-v10", "ff300000.npu", ("policy0",)),
}


def make_board_tree(root: Path, soc: str = "rk3588", *, librknnrt_version: str = "2.3.0",
                    rknn_server_version: Optional[str] = None, npu_driver: str = "0.9.8", dmc: bool = True) -> BoardRoot:
    """Write the files a board has into root (idempotent; root/data is left alone)."""
    if soc not in SOCS:
        raise ValueError(f"emulated SoC {soc!r} unknown: use one of {', '.join(SOCS)}")
    board, npu_node, policies = SOCS[soc]
    box = BoardRoot(root)
    r = box.root
    write_file(r / "proc/device-tree/compatible", f"{board}\0rockchip,{soc}\0")
    write_file(r / "sys/kernel/debug/rknpu/version", f"RKNPU driver: v{npu_driver}\n")
    write_file(r / "sys/kernel/debug/rknpu/load", "NPU load:  Core0:  0%, Core1:  0%, Core2:  0%,\n")
    npu = r / "sys/class/devfreq" / npu_node
    for name, value in (("cur_freq", "1000000000"), ("governor", "rknpu_ondemand"), ("min_freq", "300000000"),
                        ("max_freq", "1000000000"),
                        ("available_frequencies", "300000000 400000000 500000000 600000000 700000000 800000000 900000000 1000000000")):
        write_file(npu / name, value + "\n")
    dmc_dir = r / "sys/class/devfreq/dmc"
    if dmc:
        write_file(dmc_dir / "cur_freq", "2112000000\n")
        write_file(dmc_dir / "governor", "dmc_ondemand\n")
    else:
        for f in dmc_dir.glob("*"):
            f.unlink()
        if dmc_dir.exists():
            dmc_dir.rmdir()
    for i, policy in enumerate(policies):
        cpu = r / "sys/devices/system/cpu/cpufreq" / policy
        write_file(cpu / "scaling_cur_freq", ("1800000" if i == 0 else "2256000") + "\n")
        write_file(cpu / "scaling_governor", "schedutil\n")
    # Stand-ins carrying the version strings the real binaries embed.
    write_file(r / "usr/lib/librknnrt.so", b"\x7fELF\x02\x01\x01\0" + b"\0" * 56
           + f"\0librknnrt version: {librknnrt_version} (c949ad889d@2024-11-07T11:35:33)\0".encode())
    server = rknn_server_version or librknnrt_version
    write_file(r / "usr/bin/rknn_server",
           f'#!/bin/sh\necho "start rknn server, version:{server} (e80ac5c build@2024-11-07T12:52:53)"\n', mode=0o755)
    box.ensure_python()
    (r / "data/local/tmp").mkdir(parents=True, exist_ok=True)
    return box
