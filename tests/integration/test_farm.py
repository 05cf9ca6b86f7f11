"""hydra/launcher=ray with a farm of three emulated boards (two rk3588, one rk3566) behind one real adb
server: a sweep of six configurations with the C++ runner (the .rknn and its core mask reach the board),
one rk3588 board pulled out in the middle of a run, its configuration finished on the other rk3588.

The six configurations are not a grid (an rk3566 has one NPU core, so rk3566 x core_mask=0_1_2 would be
refused by preflight): each is a `+experiment=` file of a search path written by the test."""

from __future__ import annotations

import json
import re
import threading
from typing import Iterator

import pytest
import yaml
from mlflow.tracking import MlflowClient

from rkbench.__main__ import main
from rkbench.config import ASSETS
from rkbench.device.emulator import EmulatedBoard

ray = pytest.importorskip("ray", reason="pip install -e '.[farm]' (ray) runs the farm tests")

pytestmark = pytest.mark.slow

EXPERIMENT = "farm"
BOARDS = (("rk3588-a", "rk3588"), ("rk3588-b", "rk3588"), ("rk3566-a", "rk3566"))
CASES = [("rk3588", "0_1_2"), ("rk3588", "0_1"), ("rk3588", "0"), ("rk3588", "auto"), ("rk3566", "0"), ("rk3566", "auto")]
MODEL = [] if (ASSETS / "demo_yolov8n.pt").exists() else ["model.weights=null", "model.yaml=yolov8n.yaml"]


@pytest.fixture(scope="module")
def boards(tmp_path_factory) -> Iterator[dict[str, EmulatedBoard]]:
    root = tmp_path_factory.mktemp("farm-boards")
    # librknnrt as new as the host's rknn-toolkit2 (2.5.0): doctor has nothing to object to
    started = {name: EmulatedBoard(root / name, soc=soc, librknnrt_version="2.5.0") for name, soc in BOARDS}
    for board in started.values():
        board.start()
    yield started
    for board in started.values():
        board.stop()


def _pull_at_second_eval(boards: dict[str, EmulatedBoard]) -> list[str]:
    """The first rk3588 board asked to run eval for a second configuration (another spec file; a retried
    eval of the same one does not count) goes away right then (listener closed, links dropped), after that
    configuration's latency was measured on it: a board lost mid-run."""
    killed: list[str] = []
    lock = threading.Lock()
    specs: dict[str, set[str]] = {name: set() for name in boards}
    for name, board in boards.items():
        def service(command: str, name: str = name, board: EmulatedBoard = board, serve=board.service):
            spec = re.search(r"--spec (\S+)", command)
            if name.startswith("rk3588") and command.startswith("shell:") and "--mode eval" in command and spec:
                with lock:
                    specs[name].add(spec[1])
                    pull = len(specs[name]) == 2 and not killed
                    if pull:
                        killed.append(name)
                if pull:
                    threading.Thread(target=board.stop, daemon=True).start()
                    return None
            return serve(command)
        board.service = service
    return killed


def _specs_on(board: EmulatedBoard) -> list[dict]:
    """The inference specs the board was given (the runner reads its core mask from there)."""
    return [json.loads(p.read_text()) for p in board.root.rglob("spec.json")]


def test_doctor_checks_every_board_of_the_farm_at_once(boards, adb_server, unused_port, tmp_path, capsys):
    inventory = tmp_path / "lab.yaml"
    inventory.write_text(yaml.safe_dump({"adb_port": adb_server.port, "boards": [
        *({"name": name, "soc": soc, "address": boards[name].serial} for name, soc in BOARDS),
        {"name": "rk3588-off", "soc": "rk3588", "address": f"127.0.0.1:{unused_port}"}]}))
    assert main(["doctor", f"farm={inventory}"]) == 1
    out = capsys.readouterr().out
    for name, soc in BOARDS:
        assert f"== {name} ({soc}, adb {boards[name].serial})" in out
    assert "== rk3588-off (rk3588, adb 127.0.0.1:" in out and "error: " in out
    assert out.rstrip().endswith("farm lab: 3 of 4 boards ready; not ready: rk3588-off")


def test_sweep_on_a_farm_of_emulated_boards_survives_a_board_that_drops(boards, adb_server, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "conf" / "farm").mkdir(parents=True)
    (tmp_path / "conf" / "farm" / "emulated.yaml").write_text(yaml.safe_dump({"adb_port": adb_server.port, "reconnect_s": 2, "boards": [
        {"name": name, "soc": soc, "address": boards[name].serial} for name, soc in BOARDS]}))
    studies = tmp_path / "conf" / "experiment"
    studies.mkdir(parents=True)
    for soc, mask in CASES:
        (studies / f"{soc}_{mask}.yaml").write_text(f"# @package _global_\nplatform: {soc}\ncore_mask: '{mask}'\n")
    argv = ["-m", "hydra/launcher=ray", "hydra.launcher.num_cpus=3", f"hydra.searchpath=[file://{tmp_path / 'conf'}]",
            "+experiment=" + ",".join(f"{soc}_{mask}" for soc, mask in CASES), "farm=emulated",
            f"cache_dir={tmp_path / 'cache'}", f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}",
            f"tracking.experiment={EXPERIMENT}", "target=board", "runner=cpp", "resolution=64", "dataset.limit=4",
            "calib.size=2", "eval.float_reference=false", "measure.modes=[latency,eval]", "measure.iterations=5",
            "measure.min_seconds=0.2", "measure.warmup=1", *MODEL]
    killed = _pull_at_second_eval(boards)
    assert main(argv) == 0
    assert not ray.is_initialized()          # the local cluster the sweep started is gone

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.get_experiment_by_name(EXPERIMENT)
    [parent] = client.search_runs([exp.experiment_id], "tags.`rkbench.kind` = 'sweep'")
    children = client.search_runs([exp.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    # one FINISHED run per configuration: none lost, none measured twice
    by_case = {(r.data.params["platform"], r.data.params["core_mask"]): r for r in children}
    assert len(children) == len(CASES) and sorted(by_case) == sorted(CASES)
    assert all(r.info.status == "FINISHED" and r.data.tags["rkbench.kind"] == "config" for r in children)
    assert parent.info.status == "FINISHED" and parent.data.metrics["sweep/finished"] == len(CASES)
    # every board measured something, each run on a board of its platform, tagged with it
    assert {r.data.tags["rkbench.board"] for r in children} == {name for name, _ in BOARDS}
    assert all(r.data.tags["rkbench.board_soc"] == r.data.params["platform"] for r in children)
    assert all(r.data.tags["rkbench.board_address"] == boards[r.data.tags["rkbench.board"]].serial for r in children)
    # the rk3566 was never given a multi-core mask; the 3-core one ran on an rk3588
    masks = {s["inference"]["core_mask"] for s in _specs_on(boards["rk3566-a"])}
    assert masks and masks <= {"auto", "0"}
    assert by_case[("rk3588", "0_1_2")].data.tags["rkbench.board"].startswith("rk3588")
    # the board pulled out mid-run: its attempt left the sweep, kept in MLflow; the configuration finished elsewhere
    [gone] = killed
    [attempt] = client.search_runs([exp.experiment_id], "tags.`rkbench.kind` = 'attempt'")
    assert attempt.data.tags["rkbench.board"] == gone and "drained" in attempt.data.tags["rkbench.farm"]
    assert "mlflow.parentRunId" not in attempt.data.tags and attempt.info.status == "FAILED"
    again = by_case[(attempt.data.params["platform"], attempt.data.params["core_mask"])]
    assert again.data.tags["rkbench.board"] not in (gone, "rk3566-a")
    assert again.data.tags["rkbench.identity"] == attempt.data.tags["rkbench.identity"]   # boards of a SoC are one
    # the stage cache under concurrent jobs: each stage built once per key (other jobs waited, then hit)
    runs = children + [attempt]
    assert sum("export" in r.data.tags["rkbench.cache.misses"].split(",") for r in children) == 1
    for soc in ("rk3588", "rk3566"):
        assert sum("convert" in r.data.tags.get("rkbench.cache.misses", "").split(",")
                   for r in runs if r.data.params["platform"] == soc) == 1
    # the report reads the sweep as any other: six rows, the dropped attempt not among them
    out = tmp_path / "reports"
    assert main(["report", "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}", "--experiment", EXPERIMENT,
                 "--out", str(out), "--no-plots"]) == 0
    [md] = out.glob("*.md")
    text = md.read_text()
    rows = [line for line in text.splitlines() if "experiment=" in line and "| FINISHED |" in line]
    assert len(rows) == len(CASES) and all(any(f"experiment={soc}_{mask} " in r for r in rows) for soc, mask in CASES)
    assert attempt.info.run_id not in text
    # the same command again resumes: every configuration was measured, whichever board is free now
    capsys.readouterr()
    assert main(argv) == 0
    assert f"all {len(CASES)} configuration(s) were measured before" in capsys.readouterr().out


def test_a_farm_without_the_ray_launcher_is_refused_before_any_work(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["farm=lab", "target=board", f"cache_dir={tmp_path / 'cache'}"]) == 2
    assert "add `-m hydra/launcher=ray`" in capsys.readouterr().err


def test_inventory_is_checked_and_becomes_ray_resources():
    from rkbench.errors import ConfigError
    from rkbench.farm import BoardPool, farm_from, load_farm

    lab = load_farm("lab")
    assert lab.resources() == {"board:rk3588": 2.0, "board:rk3566": 1.0}
    assert lab.boards[0].overrides() == ["board.address=192.168.1.50:5555", "board.adb_host=127.0.0.1", "board.adb_port=5037",
                                         "board.reconnect_s=10"]
    with pytest.raises(ConfigError, match="soc=rk9999 is not an rknn-toolkit2 platform"):
        farm_from({"boards": [{"name": "x", "soc": "rk9999", "address": "h:1"}]}, "t")
    with pytest.raises(ConfigError, match="unique names"):
        farm_from({"boards": [{"name": "x", "soc": "rk3588", "address": "h:1"}] * 2}, "t")
    with pytest.raises(ConfigError, match="farm=nope: no inventory"):
        load_farm("nope")
    pool = BoardPool(lab)          # one run per board; least used first; a drained board is never handed out
    a, b = pool.take("rk3588"), pool.take("rk3588")
    assert {a.name, b.name} == {"rk3588-a", "rk3588-b"} and pool.take("rk3588") is None
    pool.give_back(a)
    pool.drain(a, "gone")
    assert pool.take("rk3588") is None and [x.name for x in pool.live("rk3588")] == [b.name]
