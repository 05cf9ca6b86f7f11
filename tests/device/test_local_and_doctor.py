"""LocalTransport, deploy and the doctor's rules without adb (fast)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from rkbench.device import doctor
from rkbench.device.deploy import deploy_with_report
from rkbench.device.emulator import make_board_tree
from rkbench.device.transport import LocalTransport, retry, sha256_file
from rkbench.errors import DeviceError

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def local(tmp_path: Path) -> LocalTransport:
    make_board_tree(tmp_path / "board", dmc=False, librknnrt_version="2.5.0")
    return LocalTransport(tmp_path / "board")


def test_local_shell_quotes_and_maps_paths(local: LocalTransport, tmp_path: Path) -> None:
    src = tmp_path / "in.txt"
    src.write_text("x y")
    remote = "/data/local/tmp/rkbench/a b/$(touch PWNED).txt"
    local.push(src, remote)
    result = local.shell(["sh", "-c", 'cat "$1"; echo; echo "$1"; exit 4', "sh", remote], timeout=10)
    assert result.exit_code == 4
    assert result.output == f"x y\n{remote}\n"
    assert not list(local.fs.root.rglob("PWNED"))
    assert local.sha256(remote) == sha256_file(src) and local.sha256("/data/none") is None
    local.pull(remote, tmp_path / "out.txt")
    assert (tmp_path / "out.txt").read_text() == "x y"


def test_local_shell_timeout_and_outside_paths(local: LocalTransport, tmp_path: Path) -> None:
    with pytest.raises(DeviceError, match="did not finish within 0.5s"):
        local.shell(["sleep", "5"], timeout=0.5)
    (tmp_path / "f").write_text("x")
    with pytest.raises(DeviceError, match="outside the board filesystem"):
        local.push(tmp_path / "f", "/etc/rkbench-test")


def test_deploy_pushes_once_per_content(local: LocalTransport, tmp_path: Path) -> None:
    model = tmp_path / "m.rknn"
    model.write_bytes(b"rknn" * 1000)
    alias = tmp_path / "alias" / "m.rknn"
    alias.parent.mkdir()
    alias.write_bytes(model.read_bytes())
    first = deploy_with_report(local, {"model": model, "same": alias})
    assert first.pushed == ["model"] and first.skipped == ["same"]
    assert first.paths["model"] == first.paths["same"]
    assert first.paths["model"].startswith("/data/local/tmp/rkbench/cache/")
    fresh = LocalTransport(local.fs.root)
    assert deploy_with_report(fresh, {"model": model}).skipped == ["model"]
    model.write_bytes(b"changed")
    changed = deploy_with_report(fresh, {"model": model})
    assert changed.pushed == ["model"] and changed.paths["model"] != first.paths["model"]


def test_board_code_does_not_load_the_emulator() -> None:
    """Transports, deploy, doctor and the board stage tell an emulated board by what it announces: the
    emulator package is never imported by them (a fresh interpreter, as this session has loaded it)."""
    code = ("import sys, rkbench.device.transport, rkbench.device.adb, rkbench.device.deploy, rkbench.device.doctor, "
            "rkbench.stages.board; print(sorted(m for m in sys.modules if m.startswith('rkbench.device.emulator')))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_retry_only_retries_retryable_errors() -> None:
    calls: list[int] = []

    def flaky() -> str:
        calls.append(1)
        if len(calls) < 3:
            raise DeviceError("link blip", retryable=True)
        return "ok"

    assert retry(flaky, what="t", attempts=3, delay_s=0) == "ok" and len(calls) == 3

    def broken() -> None:
        calls.append(1)
        raise DeviceError("disk full")

    calls.clear()
    with pytest.raises(DeviceError, match="disk full"):
        retry(broken, what="t", attempts=3, delay_s=0)
    assert len(calls) == 1


def test_doctor_flags_missing_dmc(local: LocalTransport) -> None:
    facts = doctor.probe(local, "2.5.0")
    assert facts.soc == "rk3588" and facts.librknnrt == "2.5.0" and not facts.dmc and facts.ddr_freq_hz is None
    findings = doctor.check(facts)
    assert any("fix_freq=False" in f.fix for f in findings)
    assert not [f for f in findings if f.level == "error"]       # toolkit 2.5.0 == runtime 2.5.0
    assert facts.as_tags()["board.dmc"] == "false"


def _facts(**overrides) -> doctor.BoardFacts:
    base = dict(transport="t", remote_root="/data/local/tmp/rkbench", soc="rk3588", librknnrt="2.3.0",
                rknn_server="2.3.0", python="3.10.12", numpy="1.26.4", opencv="4.10.0", toolkit_lite2="2.3.0", npu_driver="0.9.8", dmc=True,
                host_toolkit="2.3.0", free_mib=10_000.0, npu_governor="performance", ddr_governor="performance",
                setsid="/usr/bin/setsid")
    base.update(overrides)
    return doctor.BoardFacts(**base)


@pytest.mark.parametrize("overrides, level, text", [
    (dict(librknnrt=None), "error", "install librknnrt.so"),
    (dict(host_toolkit="2.5.0"), "error", ">= 2.5.0"),
    (dict(rknn_server="1.6.0"), "warning", "same rknpu2 runtime release"),
    (dict(toolkit_lite2="2.5.0"), "warning", "update librknnrt.so on the board to >= 2.5.0"),
    (dict(python=None, toolkit_lite2=None), "error", "install python3"),
    (dict(free_mib=100.0), "warning", "board.remote_root"),
    (dict(soc=None), "error", "/proc/device-tree/compatible"),
    (dict(npu_driver=None), "warning", "adb root"),
    (dict(npu_governor="rknpu_ondemand"), "info", "performance"),
])
def test_check_rules(overrides: dict, level: str, text: str) -> None:
    assert not doctor.check(_facts())
    findings = doctor.check(_facts(**overrides))
    assert [f.level for f in findings] == [level]
    assert text in findings[0].fix or text in findings[0].what


def test_check_expected_soc() -> None:
    [finding] = doctor.check(_facts(soc="rk3568"), expected_soc="rk3588")
    assert finding.level == "error" and "platform=rk3568" in finding.fix


def test_parse_probe_android_style_output() -> None:
    output = "\n".join([
        "compatible=rockchip,rk3566-box-demo;rockchip,rk3566;",
        "kernel=5.10.110", "machine=aarch64", "npu_driver=RKNPU driver: v0.8.2",
        "librknnrt_path=/vendor/lib64/librknnrt.so",
        "librknnrt=librknnrt version: 1.4.0 (a10f100eb@2022-09-09T09:07:14)",
        "dmc=0", "cpu.policy0=1992000 interactive",
        "df=/dev/block/dm-5 25000000 5000000 20000000 20% /data",
    ])
    facts = doctor.parse_probe(output, "adb:x", "/data/local/tmp/rkbench", "2.5.0")
    assert facts.soc == "rk3566" and facts.npu_driver == "0.8.2" and facts.librknnrt == "1.4.0"
    assert facts.machine == "aarch64" and facts.as_tags()["board.machine"] == "aarch64"
    assert facts.cpu_freq_khz == {"policy0": 1992000} and facts.cpu_governor == {"policy0": "interactive"}
    assert facts.free_mib == pytest.approx(20000000 / 1024)
    assert facts.python is None and facts.rknn_server is None
    assert any(">= 2.5.0" in f.fix for f in doctor.check(facts))
