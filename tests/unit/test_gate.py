"""`python -m rkbench report --baseline ID --gate ...`: the CI gate on model changes, against sweeps
fabricated in an MLflow sqlite store (tmp_path)."""

from __future__ import annotations

import pytest

from rkbench.report.__main__ import main
from rkbench.tracking import Tracker
from tests.unit.test_report import T0, _child, md_tables

LAT = "latency/board_py_total_ms"
GATE = "eval/map50_95:-0.01,latency/board_py_total_ms_p50:+5%"


def _sweep(tracker: Tracker, name: str, start: int, configs: dict[str, dict], iterations: int = 0) -> str:
    """A sweep over resolution: resolution -> metrics (an empty dict: the configuration FAILED).
    `iterations` > 0 records the board runner's iteration count in rkbench.measure."""
    sweep = tracker.client.create_run(tracker.experiment_id, start_time=start, tags={
        "rkbench.kind": "sweep", "mlflow.runName": name, "rkbench.swept": "resolution"}).info.run_id
    tags = {"rkbench.device_kind": "board"}
    if iterations:
        tags["rkbench.measure"] = f"latency: 5 warmup + {iterations} timed iterations of batch 1 in 9.00 s (asked)"
    for i, (res, metrics) in enumerate(configs.items()):
        _child(tracker, sweep, f"{name}-{res}", start + 1 + i, {"resolution": res, "model.weights": name}, metrics,
               tags, "FINISHED" if metrics else "FAILED")
    return sweep


def _metrics(map50_95: float, p50: float, cv: float = 0.1) -> dict:
    return {"eval/map50_95": map50_95, f"{LAT}_p50": p50, f"{LAT}_mean": p50, f"{LAT}_cv": cv}


@pytest.fixture(scope="module")
def db(tmp_path_factory) -> str:
    return f"sqlite:///{tmp_path_factory.mktemp('gate')}/mlflow.db"


@pytest.fixture
def store(db, request) -> Tracker:
    """One experiment per test in one store (creating a store takes seconds)."""
    return Tracker(db, request.node.name)


def _gate(store, tmp_path, baseline: str, current: str, gate: str = GATE) -> list[str]:
    return ["--tracking-uri", store.uri, "--out", str(tmp_path / "out"), "--no-plots",
            "--parent", current, "--baseline", baseline, "--gate", gate]


def _rows(out: str) -> dict[tuple[str, str], dict[str, str]]:
    """The printed diff table: (configuration, metric) -> column -> cell."""
    lines = [ln for ln in out.splitlines() if ln.startswith("|")]
    cells = [[c.strip() for c in ln.strip()[1:-1].split(" | ")] for ln in lines]
    header, body = cells[0], cells[2:]
    return {(r[0], r[1]): dict(zip(header, r)) for r in body}


def test_a_real_regression_fails_the_gate(store, tmp_path, capsys):
    base = _sweep(store, "base", T0, {"320": _metrics(0.50, 10.0), "640": _metrics(0.60, 20.0)})
    # configurations in another order, plus one the baseline does not have: matched by their params
    cur = _sweep(store, "cur", T0 + 100, {"960": _metrics(0.7, 40.0), "640": _metrics(0.55, 20.0),
                                          "320": _metrics(0.50, 10.0)})
    assert main(_gate(store, tmp_path, base, cur)) == 1
    rows = _rows(capsys.readouterr().out)
    assert list(rows[("resolution=640", "eval/map50_95")].values())[2:] == \
        ["0.6", "0.55", "-0.05", "-0.01", "-", "REGRESSION"]
    assert rows[("resolution=320", "eval/map50_95")]["verdict"] == "ok"
    assert rows[("resolution=960", "eval/map50_95")]["verdict"] == "new"
    [md] = (tmp_path / "out").glob("*.md")
    gate = md_tables(md.read_text())["Baseline gate"]
    assert ["resolution=640", "eval/map50_95", "0.6", "0.55", "-0.05", "-0.01", "-", "REGRESSION"] in gate
    assert f"Against `{base}`: **FAILED**, 1 regression." in md.read_text()


def test_a_change_within_the_measured_noise_passes(store, tmp_path, capsys):
    """+8% latency against a +5% threshold, but the runs spread with cv 0.1 and their iteration count is not
    recorded: the difference is within the noise, so it passes."""
    base = _sweep(store, "base", T0, {"320": _metrics(0.5, 10.0)})
    cur = _sweep(store, "cur", T0 + 100, {"320": _metrics(0.5, 10.8)})
    assert main(_gate(store, tmp_path, base, cur)) == 0
    row = _rows(capsys.readouterr().out)[("resolution=320", f"{LAT}_p50")]
    assert (row["delta"], row["threshold"], row["verdict"]) == ("0.8", "+5%", "within noise")
    assert float(row["noise"]) == pytest.approx(2 * 1.2533 * 0.1 * (10 ** 2 + 10.8 ** 2) ** 0.5, rel=1e-3)


def test_the_same_change_over_many_iterations_is_a_regression(store, tmp_path, capsys):
    """400 timed iterations each: the p50s are known to about 1.25 x cv / 20; +8% is beyond that and beyond 5%."""
    base = _sweep(store, "base", T0, {"320": _metrics(0.5, 10.0)}, iterations=400)
    cur = _sweep(store, "cur", T0 + 100, {"320": _metrics(0.5, 10.8)}, iterations=400)
    assert main(_gate(store, tmp_path, base, cur)) == 1
    row = _rows(capsys.readouterr().out)[("resolution=320", f"{LAT}_p50")]
    assert row["verdict"] == "REGRESSION" and float(row["noise"]) < 0.5


def test_a_configuration_that_now_fails_fails_the_gate(store, tmp_path, capsys):
    base = _sweep(store, "base", T0, {"320": _metrics(0.5, 10.0), "640": _metrics(0.6, 20.0)})
    cur = _sweep(store, "cur", T0 + 100, {"320": _metrics(0.52, 9.0), "640": {}})
    assert main(_gate(store, tmp_path, base, cur, "eval/map50_95:-0.01")) == 1
    rows = _rows(capsys.readouterr().out)
    assert rows[("resolution=640", "eval/map50_95")]["verdict"] == "missing"
    assert rows[("resolution=320", "eval/map50_95")]["verdict"] == "better"


def test_a_single_run_baseline(store, tmp_path, capsys):
    base = _sweep(store, "base", T0, {"320": _metrics(0.5, 10.0)})
    [run] = store.client.search_runs([store.experiment_id], f"tags.`mlflow.parentRunId` = '{base}'")
    cur = _sweep(store, "cur", T0 + 100, {"320": _metrics(0.495, 10.1)})
    assert main(_gate(store, tmp_path, run.info.run_id, cur)) == 0
    assert _rows(capsys.readouterr().out)[("resolution=320", "eval/map50_95")]["verdict"] == "ok"


@pytest.mark.parametrize("gate, message", [
    ("eval/map50_95:0.01", "is not METRIC:+TOLERANCE or METRIC:-TOLERANCE[%]"),
    ("eval/nothing:-0.01", "the baseline has no such metric"),
    (None, "--baseline and --gate go together"),
])
def test_gate_errors_are_one_line_exit_2(store, tmp_path, capsys, gate, message):
    base = _sweep(store, "base", T0, {"320": _metrics(0.5, 10.0)})
    argv = _gate(store, tmp_path, base, base, gate or "")
    assert main(argv[:-2] if gate is None else argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err


def test_no_matching_configuration_is_an_error(store, tmp_path, capsys):
    base = _sweep(store, "base", T0, {"320": _metrics(0.5, 10.0)})
    cur = _sweep(store, "cur", T0 + 100, {"640": _metrics(0.5, 10.0)})
    assert main(_gate(store, tmp_path, base, cur)) == 2
    assert "no configuration matches the baseline on resolution" in capsys.readouterr().err
