"""The ssh transport against a real sshd (Debian openssh-server) started here on a loopback port, with a
throwaway host key and user key, running as the current user: quoting, exit status, push/pull integrity,
the deploy cache, ~/.ssh/config, a timeout and a dropped link that both kill the command's process group,
a link cut mid-push, a full disk, the login failures that name their fix, doctor, and target=board runs.
The "board" is this machine: its folder is in tmp_path. Without sshd the tests skip, saying so."""

from __future__ import annotations

import getpass
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import psutil
import pytest

from rkbench.device.deploy import deploy_with_report
from rkbench.device.ssh import SshTransport, resolve_target, ssh_transport
from rkbench.device.transport import sha256_file
from rkbench.errors import DeviceError

SSHD = shutil.which("sshd") or "/usr/sbin/sshd"
KEYGEN = shutil.which("ssh-keygen")


@dataclass
class Sshd:
    port: int
    user_key: Path
    known_hosts: Path
    folder: Path
    log: Path

    def transport(self, **kwargs) -> SshTransport:
        return ssh_transport(f"127.0.0.1:{self.port}", key_file=str(self.user_key), known_hosts=str(self.known_hosts),
                             config_file=self.folder / "no-ssh-config", connect_timeout_s=10, **kwargs)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _keygen(path: Path) -> str:
    subprocess.run([KEYGEN, "-q", "-t", "ed25519", "-N", "", "-C", "rkbench-test", "-f", str(path)], check=True,
                   stdin=subprocess.DEVNULL, timeout=30)
    return path.with_name(path.name + ".pub").read_text().strip()


def _sshd_config(folder: Path, port: int) -> str:
    # The board's python3 is this venv's python (board.runtime=onnxruntime needs its onnxruntime): its folder
    # goes first on the session's PATH, as a board's login would put a venv there. SHLVL=1 keeps bash from
    # reading this machine's ~/.bashrc (bash reads it under sshd only at level 1), which may move PATH.
    path = f"{Path(sys.executable).parent}:/usr/local/bin:/usr/bin:/bin"
    return "\n".join([
        f"ListenAddress 127.0.0.1:{port}", f"HostKey {folder / 'host_key'}", f"PidFile {folder / 'sshd.pid'}",
        f"AuthorizedKeysFile {folder / 'authorized_keys'}", "StrictModes no", "UsePAM no",
        "PasswordAuthentication no", "KbdInteractiveAuthentication no", "PermitRootLogin prohibit-password",
        "Subsystem sftp internal-sftp", f"SetEnv PATH={path} SHLVL=1", "LogLevel ERROR", ""])


@pytest.fixture(scope="module")
def sshd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sshd]:
    if not os.path.exists(SSHD) or not KEYGEN:
        pytest.skip("no sshd/ssh-keygen here (apt-get install openssh-server): the ssh transport tests need a real sshd")
    if os.geteuid() == 0 and not os.path.isdir("/run/sshd"):
        os.makedirs("/run/sshd", mode=0o755)   # sshd's privilege separation folder, as Debian's ssh.service makes it
    folder = tmp_path_factory.mktemp("sshd")
    host_pub = _keygen(folder / "host_key")
    (folder / "authorized_keys").write_text(_keygen(folder / "user_key") + "\n")
    port = _free_port()
    (folder / "sshd_config").write_text(_sshd_config(folder, port))
    (folder / "known_hosts").write_text(f"[127.0.0.1]:{port} {' '.join(host_pub.split()[:2])}\n")
    log = folder / "sshd.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([SSHD, "-D", "-e", "-f", str(folder / "sshd_config")], stdin=subprocess.DEVNULL,
                                stdout=out, stderr=out)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.skip(f"sshd did not start here: {log.read_text()[-300:]}")
                time.sleep(0.05)
        yield Sshd(port, folder / "user_key", folder / "known_hosts", folder, log)
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.fixture(scope="module")
def ssh(sshd: Sshd) -> Iterator[SshTransport]:
    transport = sshd.transport()
    yield transport
    transport.close()


def _gone(pid: int, within_s: float = 5.0) -> bool:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        time.sleep(0.05)
    return False


def _wait_for(path: Path, within_s: float = 10.0) -> str:
    deadline = time.monotonic() + within_s
    while not (path.exists() and path.read_text().strip()):
        assert time.monotonic() < deadline, f"{path} never written"
        time.sleep(0.02)
    return path.read_text()


# ------------------------------------------------------------------------------------------------ commands

def test_exit_status_merged_output_and_signals(ssh: SshTransport) -> None:
    result = ssh.shell(["sh", "-c", "echo out; echo err >&2; exit 3"], timeout=20)
    assert result.exit_code == 3
    assert result.output.split() == ["out", "err"]
    assert ssh.shell(["true"], timeout=20).ok
    assert ssh.shell(["sh", "-c", "kill -9 $$"], timeout=20).exit_code == 128 + 9   # as the runner's OOM kill reads
    assert not ssh.emulated and ssh.describe().startswith("ssh:")


def test_quoting_never_runs_paths_or_values(ssh: SshTransport, tmp_path: Path) -> None:
    echoed = ssh.shell(["echo", "$(id)", "'", '"', "a;b", "*", "$HOME", "`id`", "a  b"], timeout=20)
    assert echoed.output == "$(id) ' \" a;b * $HOME `id` a  b\n"
    local = tmp_path / "weights.bin"
    local.write_bytes(b"payload")
    board = tmp_path / "board"
    remote = f"{board}/q/a b $(touch PWNED) `touch PWNED2`; touch PWNED3 \"x'.bin"
    ssh.push(local, remote)
    assert Path(remote).read_bytes() == b"payload"
    assert ssh.shell(["cat", remote], timeout=20).output == "payload"
    assert not list(tmp_path.rglob("PWNED*")) and not list(Path.home().glob("PWNED*"))


def test_push_pull_integrity_mode_and_missing_files(ssh: SshTransport, tmp_path: Path) -> None:
    local = tmp_path / "model.bin"
    local.write_bytes(random.Random(7).randbytes(700 * 1024))
    local.chmod(0o755)
    remote = f"{tmp_path}/board/deep/er/model.bin"
    assert not ssh.exists(remote)
    ssh.push(local, remote)
    assert ssh.exists(remote) and not Path(remote + ".partial").exists()
    assert ssh.sha256(remote) == sha256_file(local)
    assert os.stat(remote).st_mode & 0o777 == 0o755          # an executable (the C++ runner) stays one
    back = tmp_path / "back" / "model.bin"
    ssh.pull(remote, back)
    assert sha256_file(back) == sha256_file(local)
    with pytest.raises(DeviceError, match="no such file") as info:
        ssh.pull(f"{tmp_path}/board/missing.json", tmp_path / "x")
    assert not info.value.retryable
    assert ssh.sha256(f"{tmp_path}/board/missing.json") is None


def test_deploy_cache_skips_what_the_board_has(sshd: Sshd, tmp_path: Path) -> None:
    files = {}
    for i in range(3):
        files[f"f{i}"] = tmp_path / f"f{i}.bin"
        files[f"f{i}"].write_bytes(random.Random(i).randbytes(5000))
    root = f"{tmp_path}/board"
    first = sshd.transport()
    try:
        report = deploy_with_report(first, files, root)
        assert sorted(report.pushed) == ["f0", "f1", "f2"] and not report.skipped
        for name, remote in report.paths.items():
            assert sha256_file(Path(remote)) == sha256_file(files[name])
    finally:
        first.close()
    second = sshd.transport()        # a new link (a new process): the board's hashes decide
    try:
        files["f3"] = tmp_path / "f3.bin"
        files["f3"].write_bytes(b"new")
        again = deploy_with_report(second, files, root)
        assert again.pushed == ["f3"] and sorted(again.skipped) == ["f0", "f1", "f2"]
    finally:
        second.close()


# ------------------------------------------------------------------------------------------------ faults

def test_timeout_kills_the_commands_process_group(ssh: SshTransport, tmp_path: Path) -> None:
    pids = tmp_path / "pids"
    started = time.monotonic()
    with pytest.raises(DeviceError, match="did not finish within 1.5s") as info:
        ssh.shell(["sh", "-c", 'sleep 60 & echo "$$ $!" > "$1"; wait', "sh", str(pids)], timeout=1.5)
    assert time.monotonic() - started < 10
    assert not info.value.retryable                      # a timeout is not retried
    shell_pid, child_pid = map(int, pids.read_text().split())
    assert _gone(shell_pid) and _gone(child_pid), "the command outlived its timeout on the board"
    assert ssh.shell(["echo", "still usable"], timeout=20).output == "still usable\n"


def test_ctrl_c_kills_the_commands_process_group(ssh: SshTransport, tmp_path: Path) -> None:
    pids = tmp_path / "pids"

    def interrupt() -> None:
        _wait_for(pids)
        signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)

    assert threading.current_thread() is threading.main_thread()
    threading.Thread(target=interrupt, daemon=True).start()
    with pytest.raises(KeyboardInterrupt):
        ssh.shell(["sh", "-c", 'sleep 60 & echo "$$ $!" > "$1"; wait', "sh", str(pids)], timeout=30)
    shell_pid, child_pid = map(int, pids.read_text().split())
    assert _gone(shell_pid) and _gone(child_pid), "the command outlived Ctrl-C on the board"


def test_runner_group_can_be_killed_by_pgid(ssh: SshTransport, tmp_path: Path) -> None:
    """What the session does for a runner in its own process group: start it, read its pgid, `kill -- -PGID`."""
    pidfile = tmp_path / "runner.pid"
    script = 'setsid sh -c \'sleep 60 & echo "$$ $!" > "$1"; wait\' sh "$1" & wait'
    done = threading.Event()
    outcome: dict = {}

    def run() -> None:
        outcome["result"] = ssh.shell(["sh", "-c", script, "sh", str(pidfile)], timeout=30)
        done.set()

    threading.Thread(target=run, daemon=True).start()
    group, child = map(int, _wait_for(pidfile).split())
    killed = ssh.shell(["kill", "-TERM", "--", f"-{group}"], timeout=20)
    assert killed.ok, killed.output
    assert done.wait(20) and outcome["result"].exit_code == 0
    assert _gone(group) and _gone(child)


def test_dropped_link_is_a_retryable_device_error_and_the_command_dies(sshd: Sshd, tmp_path: Path) -> None:
    transport = sshd.transport()
    pids = tmp_path / "pids"
    try:
        def cut() -> None:
            _wait_for(pids)
            transport._client.get_transport().sock.shutdown(socket.SHUT_RDWR)   # the cable is pulled

        threading.Thread(target=cut, daemon=True).start()
        with pytest.raises(DeviceError, match="connection to .* lost") as info:
            transport.shell(["sh", "-c", 'sleep 60 & echo "$$ $!" > "$1"; wait', "sh", str(pids)], timeout=30)
        assert info.value.retryable
        shell_pid, child_pid = map(int, pids.read_text().split())
        assert not _gone(child_pid, within_s=0.5), "sshd alone does not stop a command without a pty"
        assert transport.orphans
        transport.recover()                                 # the link is back: the orphaned group is killed
        assert not transport.orphans
        assert _gone(shell_pid) and _gone(child_pid)
        assert transport.shell(["true"], timeout=20).ok
    finally:
        transport.close()


def test_a_dead_link_during_files_is_retried_after_reconnecting(sshd: Sshd, tmp_path: Path) -> None:
    transport = sshd.transport()
    local = tmp_path / "a.bin"
    local.write_bytes(b"x" * 4096)
    try:
        transport.push(local, f"{tmp_path}/board/a.bin")
        transport._client.get_transport().sock.shutdown(socket.SHUT_RDWR)
        transport.pull(f"{tmp_path}/board/a.bin", tmp_path / "back.bin")     # retry: recover, then pull
        assert (tmp_path / "back.bin").read_bytes() == local.read_bytes()
    finally:
        transport.close()


def _empty(folder: Path) -> Path:
    (folder / "empty_known_hosts").write_text("")
    return folder / "empty_known_hosts"


def test_link_cut_mid_push_is_retried_and_never_leaves_a_partial_file(sshd: Sshd, tmp_path: Path) -> None:
    transport = sshd.transport()
    local = tmp_path / "model.bin"
    local.write_bytes(random.Random(3).randbytes(24 * 2**20))
    remote = Path(f"{tmp_path}/board/cut/model.bin")
    partial = remote.with_name("model.bin.partial")

    def cut() -> None:
        deadline = time.monotonic() + 20
        while not (partial.exists() and partial.stat().st_size > 2**20) and time.monotonic() < deadline:
            time.sleep(0.001)
        transport._client.get_transport().sock.shutdown(socket.SHUT_RDWR)

    try:
        cutter = threading.Thread(target=cut, daemon=True)
        cutter.start()
        transport.push(local, str(remote))
        cutter.join(20)
        assert sha256_file(remote) == sha256_file(local) and not partial.exists()
    finally:
        transport.close()


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 256 KiB tmpfs as the board's folder (root only: mount)."""
    folder = tmp_path / "small"
    folder.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(folder)],
                                           capture_output=True, timeout=20).returncode != 0:
        pytest.skip("a full disk needs a small tmpfs, and mounting one needs root")
    try:
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], timeout=20)


def test_full_disk_fails_at_once_naming_the_fix(ssh: SshTransport, small_disk: Path, tmp_path: Path) -> None:
    local = tmp_path / "model.bin"
    local.write_bytes(random.Random(5).randbytes(600 * 1024))
    with pytest.raises(DeviceError, match="disk is full .*KiB free.*board.remote_root") as info:
        ssh.push(local, f"{small_disk}/cache/model.bin")
    assert not info.value.retryable
    assert not list(small_disk.rglob("*.bin*"))          # the partial file is gone: the space is back
    assert ssh.shell(["true"], timeout=20).ok


def test_an_unwritable_remote_root_names_a_folder_the_user_owns(ssh: SshTransport, tmp_path: Path) -> None:
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(DeviceError, match=f"board.remote_root to a folder {getpass.getuser()} can write") as info:
        ssh.push(tmp_path / "file", f"{tmp_path}/file/cache/x.bin")
    assert not info.value.retryable


def test_login_failures_name_the_fix(sshd: Sshd, tmp_path: Path) -> None:
    with pytest.raises(DeviceError, match="ssh-keyscan -p") as unknown:
        ssh_transport(f"127.0.0.1:{sshd.port}", key_file=str(sshd.user_key), known_hosts=str(_empty(tmp_path)),
                      config_file=tmp_path / "none", connect_timeout_s=10)
    assert not unknown.value.retryable
    other = tmp_path / "other_key"
    _keygen(other)
    with pytest.raises(DeviceError, match="authorized_keys .*board.ssh_key") as refused:
        ssh_transport(f"127.0.0.1:{sshd.port}", key_file=str(other), known_hosts=str(sshd.known_hosts),
                      config_file=tmp_path / "none", connect_timeout_s=10)
    assert not refused.value.retryable
    locked = tmp_path / "locked_key"
    subprocess.run([KEYGEN, "-q", "-t", "ed25519", "-N", "a passphrase", "-f", str(locked)], check=True, timeout=30)
    with pytest.raises(DeviceError, match="encrypted: load it into ssh-agent"):
        ssh_transport(f"127.0.0.1:{sshd.port}", key_file=str(locked), known_hosts=str(sshd.known_hosts),
                      config_file=tmp_path / "none", connect_timeout_s=10)
    with pytest.raises(DeviceError, match="sshd runs there") as down:
        ssh_transport(f"127.0.0.1:{_free_port()}", key_file=str(sshd.user_key), known_hosts=str(sshd.known_hosts),
                      config_file=tmp_path / "none", connect_timeout_s=5)
    assert down.value.retryable


def test_ssh_config_alias_is_honoured(sshd: Sshd, tmp_path: Path) -> None:
    config = tmp_path / "config"
    config.write_text(f"Host rk3588-lab\n  HostName 127.0.0.1\n  Port {sshd.port}\n  User {getpass.getuser()}\n"
                      f"  IdentityFile {sshd.user_key}\n")
    target = resolve_target("rk3588-lab", config_file=config)
    assert (target.host, target.port, target.key_files) == ("127.0.0.1", sshd.port, (str(sshd.user_key),))
    assert resolve_target("me@rk3588-lab:2222", config_file=config).port == 2222
    assert resolve_target("me@rk3588-lab:2222", config_file=config).user == "me"
    v6 = resolve_target("[fe80::1]:2200", config_file=config)
    assert (v6.host, v6.port) == ("fe80::1", 2200)
    with pytest.raises(DeviceError, match="board.ssh_key"):
        resolve_target("rk3588-lab", key_file=str(tmp_path / "missing"), config_file=config)
    transport = SshTransport(target, known_hosts=str(sshd.known_hosts), connect_timeout_s=10)
    try:
        assert transport.shell(["echo", "hi"], timeout=20).output == "hi\n"
        assert transport.describe() == f"ssh:{target.user}@rk3588-lab:{sshd.port}"
    finally:
        transport.close()


def test_a_key_in_ssh_agent_is_used_when_none_is_set(sshd: Sshd, tmp_path: Path, monkeypatch) -> None:
    agent, add = shutil.which("ssh-agent"), shutil.which("ssh-add")
    if not (agent and add):
        pytest.skip("no ssh-agent here (apt-get install openssh-client)")
    sock = tmp_path / "agent.sock"
    proc = subprocess.Popen([agent, "-D", "-a", str(sock)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_for_socket(sock)
        monkeypatch.setenv("SSH_AUTH_SOCK", str(sock))
        subprocess.run([add, "-q", str(sshd.user_key)], check=True, timeout=20, capture_output=True)
        monkeypatch.setenv("HOME", str(tmp_path))          # no ~/.ssh/id_* of this machine: only the agent's key
        transport = ssh_transport(f"127.0.0.1:{sshd.port}", known_hosts=str(sshd.known_hosts),
                                  config_file=tmp_path / "none", connect_timeout_s=10)
        try:
            assert transport.target.key_files == () and transport.shell(["true"], timeout=20).ok
        finally:
            transport.close()
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def _wait_for_socket(path: Path, within_s: float = 10.0) -> None:
    deadline = time.monotonic() + within_s
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.02)


def test_ssh_config_proxy_command_is_honoured(sshd: Sshd, tmp_path: Path) -> None:
    """A board behind a jump host: ProxyCommand `ssh -W %h:%p` (here through the same sshd)."""
    client = shutil.which("ssh")
    if not client:
        pytest.skip("no ssh client here (apt-get install openssh-client)")
    config = tmp_path / "config"
    config.write_text(f"Host rk3588-behind-jump\n  HostName 127.0.0.1\n  Port {sshd.port}\n  IdentityFile {sshd.user_key}\n"
                      f"  ProxyCommand {client} -F /dev/null -q -i {sshd.user_key} -o IdentitiesOnly=yes "
                      f"-o UserKnownHostsFile={sshd.known_hosts} -o StrictHostKeyChecking=yes -o BatchMode=yes "
                      f"-p {sshd.port} -W %h:%p 127.0.0.1\n")
    target = resolve_target("rk3588-behind-jump", config_file=config)
    assert target.proxy_command and f"-W 127.0.0.1:{sshd.port}" in target.proxy_command
    transport = SshTransport(target, known_hosts=str(sshd.known_hosts), connect_timeout_s=10)
    try:
        assert transport.shell(["sh", "-c", "echo $SSH_CLIENT"], timeout=20).output.startswith("127.0.0.1 ")
    finally:
        transport.close()


# ------------------------------------------------------------------------------------------------ settings

@pytest.mark.parametrize("board, fragment", [
    (dict(transport="scp"), "board.transport"),
    (dict(transport="ssh"), "board.transport=ssh needs board.address"),
    (dict(transport="ssh", address="rk", ssh_key="/nonexistent/id_ed25519"), "board.ssh_key"),
    (dict(transport="ssh", address="rk", ssh_known_hosts="/nonexistent/known_hosts"), "board.ssh_known_hosts"),
    (dict(transport="ssh", address="rk", remote_root="~/rkbench"), "not absolute"),
])
def test_ssh_settings_are_checked_before_any_work(board: dict, fragment: str) -> None:
    from rkbench.config import BoardConfig, ModelConfig, RunConfig, validate
    from rkbench.errors import ConfigError

    with pytest.raises(ConfigError, match=fragment):
        validate(RunConfig(model=ModelConfig(yaml="yolov8n.yaml"), target="board", board=BoardConfig(**board)))
    validate(RunConfig(model=ModelConfig(yaml="yolov8n.yaml"), target="board",
                       board=BoardConfig(transport="ssh", address="me@rk3588:2222")))


def test_doctor_over_ssh(sshd: Sshd, capsys: pytest.CaptureFixture[str]) -> None:
    from rkbench.device import doctor

    argv = ["board.transport=ssh", f"board.address=127.0.0.1:{sshd.port}", f"board.ssh_key={sshd.user_key}",
            f"board.ssh_known_hosts={sshd.known_hosts}", f"board.remote_root={sshd.folder}", "--host-toolkit", "2.5.0"]
    code = doctor.main(argv)
    out = capsys.readouterr().out
    assert f"ssh:{getpass.getuser()}@127.0.0.1:{sshd.port}" in out
    assert code == 1 and "Rockchip" in out        # this machine is no RK3588: doctor says so, over ssh


# ------------------------------------------------------------------------------------------------ a board run

@dataclass
class BoardRuns:
    folder: Path
    argv: list[str]

    def run(self, *extra: str) -> dict:
        """One `python -m rkbench` on the ssh board (a fresh transport, as in a new process); its MLflow run."""
        from mlflow.tracking import MlflowClient

        from rkbench.__main__ import main
        from rkbench.stages import board as stage

        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(stage, "_TRANSPORTS", {})
            patch.chdir(self.folder)              # Hydra writes its folders in the working directory
            assert main(self.argv + list(extra)) == 0
        client = MlflowClient(tracking_uri=f"sqlite:///{self.folder / 'mlflow.db'}")
        return client.search_runs([client.get_experiment_by_name("ssh").experiment_id],
                                  order_by=["attributes.start_time DESC"])[0]


@pytest.fixture(scope="module")
def board_runs(sshd: Sshd, tmp_path_factory: pytest.TempPathFactory) -> BoardRuns:
    """target=board, board.transport=ssh, the Python runner on this machine's python with ONNX Runtime."""
    from rkbench.config import ASSETS

    folder = tmp_path_factory.mktemp("ssh_board")
    model = [] if (ASSETS / "demo_yolov8n.pt").exists() else ["model.weights=null", "model.yaml=yolov8n.yaml"]
    return BoardRuns(folder, [
        f"cache_dir={folder / 'cache'}", f"tracking.uri=sqlite:///{folder / 'mlflow.db'}", "tracking.experiment=ssh",
        "dataset.limit=4", "calib.size=2", "resolution=160", "target=board", "runner=python", "board.transport=ssh",
        f"board.address=127.0.0.1:{sshd.port}", f"board.ssh_key={sshd.user_key}",
        f"board.ssh_known_hosts={sshd.known_hosts}", f"board.remote_root={folder / 'board'}",
        f"board.python={sys.executable}", "board.runtime=onnxruntime", "measure.modes=[latency,eval]",
        "measure.iterations=5", "measure.min_seconds=0.2", "measure.warmup=1", "eval.float_reference=false", *model])


@pytest.mark.slow
def test_board_run_over_ssh_logs_board_metrics(sshd: Sshd, board_runs: BoardRuns) -> None:
    run = board_runs.run()
    m, tags = run.data.metrics, run.data.tags
    assert tags["rkbench.status"] == "FINISHED" and tags["rkbench.device_kind"] == "board"
    assert tags["board.transport"] == f"ssh:{getpass.getuser()}@127.0.0.1:{sshd.port}"
    assert 0 < m["latency/board_py_infer_ms_min"] <= m["latency/board_py_infer_ms_p50"]
    assert m["throughput/board_single_fps"] > 0 and m["system/board_latency_peak_rss_mib"] > 10
    assert "eval/map50_95" in m and m["counts/c0.25/gt"] > 0
    assert m["deploy/pushed"] >= 3 and not any(k.startswith("latency/emulator_") for k in m)
    cached = list((board_runs.folder / "board" / "cache").glob("*/runner.py"))
    assert len(cached) == 1            # the runner ran from the board's cache folder, pushed over SFTP


def _runners(folder: Path, attempt: str) -> list[psutil.Process]:
    """The Python runner processes of this folder's board writing `attempt` (e.g. latency-1.json)."""
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        cmdline = proc.info["cmdline"] or []
        if any(part.endswith("runner.py") for part in cmdline) and str(folder) in " ".join(cmdline) \
                and any(part.endswith(attempt) for part in cmdline):
            found.append(proc)
    return found


def _running(proc: psutil.Process) -> bool:
    try:
        return proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _poll(find, within_s: float = 60) -> list:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        found = find()
        if found:
            return found
        time.sleep(0.01)
    return []


@pytest.mark.slow
def test_link_dropped_while_the_runner_runs_is_retried_and_the_first_runner_dies(board_runs: BoardRuns) -> None:
    """Measured again (resume=false) in a new process: the board's cache is reused; the link drops while the
    latency runner runs, that runner is killed once the link is back, before the mode runs once more from
    scratch (sshd alone would leave it running, busy, beside the second one)."""
    from rkbench.stages import board as stage

    seen: dict[str, list] = {}

    def drop() -> None:
        seen["first"] = _poll(lambda: _runners(board_runs.folder, "latency-1.json"))
        for transport in list(stage._TRANSPORTS.values()):
            transport._client.get_transport().sock.shutdown(socket.SHUT_RDWR)
        seen["second"] = _poll(lambda: _runners(board_runs.folder, "latency-2.json"))
        seen["first_alive_then"] = [p for p in seen["first"] if _running(p)]

    cutter = threading.Thread(target=drop, daemon=True)
    cutter.start()
    run = board_runs.run("resume=false", "measure.min_seconds=2")
    cutter.join(10)
    m, tags = run.data.metrics, run.data.tags
    assert seen["first"] and seen["second"], "the two latency runners were not both seen"
    assert not seen["first_alive_then"], "the first runner still ran when the second started"
    assert tags["rkbench.status"] == "FINISHED" and "(second attempt)" in tags["rkbench.measure"]
    # a new process, the board's cache checked by hash: only the spec file (min_seconds changed) is new
    assert m["deploy/pushed"] == 1 and m["deploy/skipped"] >= 3
    assert m["latency/board_py_infer_ms_p50"] > 0
