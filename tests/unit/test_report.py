from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import pytest

from rkbench.errors import DataError
from rkbench.report import build_report
from rkbench.report.__main__ import main
from rkbench.report.markdown import table
from rkbench.report.runs import Pivot, RunRecord, Selection, pivots, swept_axes
from rkbench.tracking import Tracker

MAP = {("320", "normal"): 0.30, ("320", "kl_divergence"): 0.31, ("640", "normal"): 0.40, ("640", "kl_divergence"): 0.42}
T0 = 1_700_000_000_000     # explicit start times (ms): the order of runs must not depend on clock resolution


@dataclass
class Store:
    uri: str
    sweep: str           # the latest sweep run
    old_sweep: str       # an earlier sweep run
    old_child: str


def _child(tracker: Tracker, parent: str | None, name: str, start: int, params: dict, metrics: dict, tags: dict,
           status: str) -> str:
    base = {"rkbench.kind": "config", "mlflow.runName": name, **({"mlflow.parentRunId": parent} if parent else {})}
    run_id = tracker.client.create_run(tracker.experiment_id, start_time=start, tags=base, run_name=name).info.run_id
    tracker.log(run_id, metrics, {"model.name": "demo_yolov8n", "calib.size": 16, **params},
                dict(tags, **{"rkbench.status": status}))
    tracker.end(run_id, status)
    return run_id


FLOAT = {"320": 0.32, "640": 0.43}
INVALID = ("640", "normal")      # its simulator time spreads too wide (cv 0.5): it never wins a fastest line


def _measure(*places: str, calls: int = 120) -> str:
    """An rkbench.measure tag as the pipeline writes it for host / simulator timings."""
    return " | ".join(f"{w}: rt-1.0, one timed runtime.infer call per batch during evaluation, {calls} calls, first 2 "
                      "left out as warmup, measured 2024-01-01T00:00:00; not NPU latency" for w in places)


def _finished(tracker: Tracker, parent: str, res: str, algo: str, start: int) -> str:
    slower = 1.1 if algo == "kl_divergence" else 1.0
    spread = {"p50": 1.0, "p90": 1.2, "p99": 1.5, "mean": 1.05, "std": 0.1, "min": 0.9}
    latency = {f"latency/simulator_infer_ms_{k}": v * int(res) / 32 * slower for k, v in spread.items()}
    host = {f"latency/host_infer_ms_{k}": v * int(res) / 64 for k, v in spread.items()}     # float: no algo
    cv = {"latency/simulator_infer_ms_cv": 0.5 if (res, algo) == INVALID else 0.05, "latency/host_infer_ms_cv": 0.05}
    counts = {f"counts/c{c}/{k}": v for c, scale in (("0.25", 1.0), ("0.5", 0.5))
              for k, v in {"gt": 40.0, "correct": 30 * scale, "false": 6 * scale, "missed": 40 - 30 * scale,
                           "correct_ratio": 30 * scale / 40, "false_ratio": 6 / 36, "missed_ratio": 1 - 30 * scale / 40}.items()}
    classes = {"eval_class/circle": MAP[(res, algo)] + 0.1, "eval_class/square": MAP[(res, algo)] - 0.1}
    metrics = {"eval/map50_95": MAP[(res, algo)], "eval/map50": MAP[(res, algo)] + 0.2, "convert/build_s": 3.5,
               "eval_float/map50_95": FLOAT[res], "convert/rknn_mib": 3.25, **latency, **host, **cv, **counts, **classes}
    tags = {"rkbench.device_kind": "simulator", "rkbench.soc": "rk3588", "rkbench.runtime": "rknn-simulator",
            "versions.rknn-toolkit2": "2.5.0", "rkbench.measure": _measure("host", "simulator")}
    return _child(tracker, parent, f"r{res}-{algo}", start, {"resolution": res, "algo": algo}, metrics, tags, "FINISHED")


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Store:
    root = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{root}/mlflow.db"
    tracker = Tracker(uri, "rkbench")
    client, exp = tracker.client, tracker.experiment_id

    old = client.create_run(exp, start_time=T0, tags={"rkbench.kind": "sweep", "mlflow.runName": "old sweep",
                                                       "rkbench.swept": "resolution"}).info.run_id
    old_child = _finished(tracker, old, "320", "normal", T0 + 1)
    tracker.end(old, "FINISHED")

    sweep = client.create_run(exp, start_time=T0 + 10_000, tags={"rkbench.kind": "sweep", "mlflow.runName": "sweep",
                                                                 "rkbench.swept": "resolution,algo"}).info.run_id
    start = T0 + 10_001
    for res in ("320", "640"):
        for algo in ("normal", "kl_divergence"):
            _finished(tracker, sweep, res, algo, start)
            start += 1
    _child(tracker, sweep, "r640-mmse", start, {"resolution": "640", "algo": "mmse"}, {},
           {"rkbench.error": "rknn.build failed: out of memory", "rkbench.hint": "lower calib.size",
            "rkbench.failed_stage": "convert"}, "FAILED")
    tracker.end(sweep, "FAILED")

    lone = Tracker(uri, "lone")       # a single run (no -m): a config run without a parent
    _child(lone, None, "single", T0, {"resolution": "320", "algo": "normal"}, {"eval/map50_95": 0.25},
           {"rkbench.device_kind": "host"}, "FINISHED")
    return Store(uri, sweep, old, old_child)


def md_tables(text: str) -> dict[str, list[list[str]]]:
    """Each '## heading' -> its first markdown table as rows of cells (header first, rule dropped)."""
    out: dict[str, list[list[str]]] = {}
    for section in re.split(r"^## ", text, flags=re.M)[1:]:
        heading, _, body = section.partition("\n")
        rows = [[c.strip() for c in line.strip()[1:-1].split(" | ")] for line in body.splitlines()
                if line.startswith("|")]
        if rows:
            out[heading.strip()] = [r for r in rows if not set("".join(r)) <= set("-:| ")]
    return out


@pytest.fixture(scope="module")
def report(store, tmp_path_factory) -> Path:
    return build_report(store.uri, "rkbench", tmp_path_factory.mktemp("reports"))


def test_latest_sweep_is_the_default_and_its_runs_are_the_rows(report, store):
    assert report.name == f"rkbench-{store.sweep[:8]}.md"
    text = report.read_text()
    runs = md_tables(text)["Runs"]
    header, rows = runs[0], {r[0]: dict(zip(runs[0], r)) for r in runs[1:]}
    assert header[:4] == ["run", "status", "resolution", "algo"]       # swept axes only, not constant params
    assert "model.name" not in header and "calib.size" not in header
    assert set(rows) == {"r320-normal", "r320-kl_divergence", "r640-normal", "r640-kl_divergence", "r640-mmse"}
    best = rows["r640-kl_divergence"]
    assert (best["status"], best["resolution"], best["algo"]) == ("FINISHED", "640", "kl_divergence")
    assert (best["map50_95"], best["map50"], best["convert/build_s"]) == ("0.42", "0.62", "3.5")
    assert best["latency/simulator_infer_ms_p50"] == "22"
    assert (best["correct@0.25"], best["false@0.25"], best["missed@0.25"]) == ("30", "6", "10")
    failed = rows["r640-mmse"]
    assert failed["status"] == "FAILED" and failed["map50_95"] == "-"
    assert "sweep" in text and "old sweep" not in text


def test_failure_line_carries_error_and_hint(report):
    text = report.read_text()
    assert ("- **r640-mmse** (resolution=640, algo=mmse) FAILED in stage `convert`: "
            "rknn.build failed: out of memory — hint: lower calib.size") in text.splitlines()


def test_where_measured_says_simulator_is_not_npu_latency(report):
    text = report.read_text()
    where = text.split("## Where it was measured")[1].split("\n## ")[0]
    assert "`simulator` (4 runs)" in where and "not NPU latency" in where
    assert "`host`" not in where                                 # the lone host run is another experiment
    assert "rknn-toolkit2 2.5.0" in where


def test_default_pivots_and_plots(report):
    tables = md_tables(report.read_text())
    pivot = tables["eval/map50_95 by resolution x algo"]
    assert pivot[0] == ["resolution \\ algo", "kl_divergence", "normal"]    # mmse has no metric: no column
    assert pivot[1:] == [["320", "0.31", "0.3"], ["640", "0.42", "0.4"]]
    latency = tables["latency/simulator_infer_ms_p50 by resolution x algo"]
    assert latency[1:] == [["320", "11", "10"], ["640", "22", "20"]]
    pngs = sorted(report.parent.glob("*.png"))
    assert [p.name for p in pngs] == [f"{report.stem}-{name}.png" for name in (
        "01-eval-map50_95_by_resolution_x_algo", "02-eval_float-map50_95_by_resolution",
        "03-latency-host_infer_ms_p50_by_resolution", "04-latency-simulator_infer_ms_p50_by_resolution_x_algo",
        "05-pareto_simulator_infer_ms")]
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 2000 for p in pngs)
    assert f"]({pngs[0].name})" in report.read_text()


def test_host_float_metrics_are_not_pivoted_over_axes_that_only_change_the_rknn(report):
    """The float ONNX on the host cannot depend on algo: one column over resolution, not one line per algo
    (nor one table per algo value)."""
    tables = md_tables(report.read_text())
    assert tables["eval_float/map50_95 by resolution"] == [["resolution", "eval_float/map50_95"], ["320", "0.32"],
                                                           ["640", "0.43"]]
    assert tables["latency/host_infer_ms_p50 by resolution"][1:] == [["320", "5"], ["640", "10"]]
    assert not [t for t in tables if t.startswith(("eval_float/", "latency/host")) and "algo" in t]


def test_pivots_follow_the_axes_the_sweep_varied(tmp_path):
    """The heads study sweeps export x resolution: resolution (numeric) is the row, export the column; the
    float metrics depend on the export, so they are pivoted over both."""
    tracker = Tracker(f"sqlite:///{tmp_path}/mlflow.db", "heads")
    sweep = tracker.client.create_run(tracker.experiment_id, start_time=T0, tags={
        "rkbench.kind": "sweep", "mlflow.runName": "heads", "rkbench.swept": "export,resolution"}).info.run_id
    for i, (export, res) in enumerate([(e, r) for e in ("rknn", "ultralytics") for r in ("320", "640")]):
        _child(tracker, sweep, f"{export}-{res}", T0 + 1 + i, {"export": export, "resolution": res, "algo": "normal"},
               {"eval_float/map50_95": int(res) / 1000 + (export == "rknn") / 100, "latency/host_infer_ms_p50": 5.0},
               {"rkbench.device_kind": "simulator"}, "FINISHED")
    path = build_report(tracker.uri, "heads", tmp_path / "out", plots=False)
    tables = md_tables(path.read_text())
    assert tables["eval_float/map50_95 by resolution x export"] == [
        ["resolution \\ export", "rknn", "ultralytics"], ["320", "0.33", "0.32"], ["640", "0.65", "0.64"]]
    assert "latency/host_infer_ms_p50 by resolution x export" in tables
    assert not [t for t in tables if "algo" in t]


def test_runs_table_has_the_quantization_loss_rknn_size_and_latency_validity(report):
    runs = md_tables(report.read_text())["Runs"]
    rows = {r[0]: dict(zip(runs[0], r)) for r in runs[1:]}
    assert rows["r640-kl_divergence"]["map50_95 - float"] == "-0.01"
    assert rows["r320-normal"]["map50_95 - float"] == "-0.02"
    assert rows["r320-normal"]["convert/rknn_mib"] == "3.25"
    assert rows["r640-normal"]["latency"] == "INVALID" and rows["r640-kl_divergence"]["latency"] == "VALID"
    assert rows["r640-mmse"]["latency"] == "-"


def test_pareto_front_and_fastest_lines_leave_invalid_latencies_out(report):
    text = report.read_text()
    front = md_tables(text)["Latency vs accuracy: simulator_infer_ms"]
    assert front == [["configuration", "simulator infer p50 (ms)", "mAP50-95"],
                     ["resolution=320, algo=normal", "10", "0.3"], ["resolution=320, algo=kl_divergence", "11", "0.31"],
                     ["resolution=640, algo=kl_divergence", "22", "0.42"]]
    lines = [ln for ln in text.splitlines() if ln.startswith("- fastest configuration")]
    # r640-normal (20 ms, 0.40) would be the fastest with mAP >= 0.40, but its latency is INVALID
    assert lines == [
        "- fastest configuration with mAP50-95 >= 0.41 (best - 0.01): **resolution=640, algo=kl_divergence**, 22 ms, mAP50-95 0.42",
        "- fastest configuration with mAP50-95 >= 0.4 (best - 0.02): **resolution=640, algo=kl_divergence**, 22 ms, mAP50-95 0.42",
        "- fastest configuration with mAP50-95 >= 0.37 (best - 0.05): **resolution=640, algo=kl_divergence**, 22 ms, mAP50-95 0.42"]
    assert "- left out, INVALID latency: resolution=640, algo=normal" in text
    assert "![Pareto front, simulator infer p50 (ms) vs mAP50-95](" in text


def test_per_class_ap_section(report):
    table = md_tables(report.read_text())["Per-class AP50-95"]
    assert table[0] == ["class", "resolution=320, algo=normal", "resolution=320, algo=kl_divergence",
                        "resolution=640, algo=normal", "resolution=640, algo=kl_divergence"]
    assert table[1:] == [["circle", "0.4", "0.41", "0.5", "0.52"], ["square", "0.2", "0.21", "0.3", "0.32"]]


def _png_text(path: Path) -> dict:
    from PIL import Image

    with Image.open(path) as img:
        return dict(img.text)


def test_host_and_simulator_time_plots_say_not_npu_latency(report):
    pngs = {p.name.split("-", 3)[-1]: _png_text(p) for p in report.parent.glob("*.png")}
    timed = [n for n in pngs if "latency" in n or "pareto" in n]
    assert len(timed) == 3
    assert all(pngs[n]["Caveat"] == "host/simulator time: not NPU latency" for n in timed)
    assert not [n for n in pngs if n not in timed and "Caveat" in pngs[n]]        # mAP plots have none
def test_counts_and_latency_sections(report):
    tables = md_tables(report.read_text())
    counts = tables["Detections per confidence threshold"]
    assert counts[0][:6] == ["run", "conf", "gt", "correct", "false", "missed"]
    assert ["r320-normal", "0.5", "40", "15", "3", "25"] == counts[[r[:2] for r in counts].index(["r320-normal", "0.5"])][:6]
    latency = tables["Latency details"]
    assert latency[0] == ["run", "measurement", "p50", "p90", "p99", "mean", "std", "min", "cv", "iterations",
                          "seconds", "validity"]
    rows = {tuple(r[:2]): r for r in latency[1:]}
    assert rows["r320-normal", "simulator_infer_ms"][2:4] == ["10", "12"]
    assert rows["r320-normal", "simulator_infer_ms"][9:] == ["120", "1.26", "VALID"]
    assert rows["r640-normal", "simulator_infer_ms"][-1] == "INVALID: cv 0.50 > 0.2"
    assert rows["r320-normal", "host_infer_ms"][-1] == "INVALID: 0.63 s timed < 1 s"


def test_explicit_parent_and_pivot_without_plots(store, tmp_path):
    path = build_report(store.uri, "ignored-when-parent-given", tmp_path, parent_run_id=store.old_sweep,
                        pivot=[("eval/map50", "algo", "resolution")], plots=False)
    tables = md_tables(path.read_text())
    assert [r[0] for r in tables["Runs"][1:]] == ["r320-normal"]
    assert tables["eval/map50 by algo x resolution"] == [["algo \\ resolution", "320"], ["normal", "0.5"]]
    assert not list(path.parent.glob("*.png")) and "![" not in path.read_text()


def test_lone_config_runs_without_a_sweep(store, tmp_path):
    path = build_report(store.uri, "lone", tmp_path, plots=False)
    text = path.read_text()
    assert path.name == "lone-all.md" and "every config run" in text
    assert md_tables(text)["Runs"][1][:2] == ["single", "FINISHED"]
    assert "`host` (1 run)" in text and "not NPU latency" in text


def test_cli(store, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["--tracking-uri", store.uri, "--out", str(out), "--pivot",
                 "latency/simulator_infer_ms_p90:algo:resolution", "--no-plots"]) == 0
    path = Path(capsys.readouterr().out.strip())
    assert path.is_file() and path.is_relative_to(out)
    assert md_tables(path.read_text())["latency/simulator_infer_ms_p90 by algo x resolution"][1] == \
        ["kl_divergence", "13.2", "26.4"]


@pytest.mark.parametrize("args, message", [
    (["--experiment", "nope"], "experiment 'nope' not found"),
    (["--pivot", "eval/nothing:resolution:algo"], "no run has metric eval/nothing"),
    (["--pivot", "eval/map50:resolution:batch"], "no run has param batch"),
    (["--parent", "0" * 32], "not found"),
])
def test_cli_errors_are_one_line_exit_2(store, tmp_path, capsys, args, message):
    assert main(["--tracking-uri", store.uri, "--out", str(tmp_path), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err and err.startswith("rkbench report: error:")


def test_missing_store_is_reported_not_created(tmp_path, capsys):
    db = tmp_path / "absent.db"
    assert main(["--tracking-uri", f"sqlite:///{db}", "--out", str(tmp_path)]) == 2
    assert "no MLflow store" in capsys.readouterr().err and not db.exists()
    with pytest.raises(DataError):
        build_report(f"sqlite:///{db}", "rkbench", tmp_path)


def _rec(name: str, start: int, metric: float | None, **params: str) -> RunRecord:
    return RunRecord(name, name, "FINISHED", start, None, params, {} if metric is None else {"m": metric}, {})


def test_pivot_splits_on_the_other_axes_and_latest_run_wins():
    runs = [_rec("a", 1, 0.1, res="320", algo="normal", batch="1"),
            _rec("b", 2, 0.2, res="640", algo="normal", batch="1"),
            _rec("c", 3, 0.3, res="320", algo="normal", batch="3"),
            _rec("d", 4, 0.4, res="320", algo="normal", batch="1"),     # re-run of "a": the later value counts
            _rec("e", 5, None, res="1280", algo="mmse", batch="1")]     # no metric (failed): no row, no column
    sel = Selection("uri", "exp", None, runs, swept_axes(None, runs))
    assert sel.axes == ["algo", "batch", "res"]
    tables = pivots(sel, ("m", "res", "algo"))
    assert [p.fixed for p in tables] == [{"batch": "1"}, {"batch": "3"}]
    assert tables[0].rows == ["320", "640"] and tables[0].cols == ["normal"]
    assert tables[0].cells == {("320", "normal"): 0.4, ("640", "normal"): 0.2}
    assert tables[1].cells == {("320", "normal"): 0.3}


def test_swept_group_stands_for_its_differing_params():
    parent = RunRecord("p", "p", "FINISHED", 0, None, {}, {}, {"rkbench.swept": "model,resolution"})
    runs = [RunRecord(n, n, "FINISHED", i, None, {"model.name": n, "model.family": "yolov8", "resolution": "320",
                                                  "seed": str(i)}, {}, {}) for i, n in enumerate(("v8n", "v8s"))]
    assert swept_axes(parent, runs) == ["model.name", "resolution", "seed"]


def test_cli_rejects_a_malformed_pivot(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--pivot", "eval/map50_95:resolution"])
    assert exc.value.code == 2 and "METRIC:ROW:COL" in capsys.readouterr().err


def test_markdown_table_formatter():
    """pandas' to_markdown (tabulate's pipe format): numbers to 4 digits, missing as -, NaN as n/a, | escaped."""
    text = table(["name", "value"], [["a|b", 0.123456], ["c", None], ["d", float("nan")], ["e", 3.0]], [False, True])
    assert text.splitlines() == [
        "| name   |   value |",
        "|:-------|--------:|",
        "| a\\|b   |  0.1235 |",
        "| c      |       - |",
        "| d      |     n/a |",
        "| e      |       3 |",
    ]


def test_plot_axes_carry_units_and_map_starts_at_zero_without_a_reference():
    from rkbench.report.plots import pivot_figure

    cells = {("320", ""): 0.70, ("640", ""): 0.72}
    bare = pivot_figure(Pivot("eval/map50_95", "resolution", None, {}, ["320", "640"], [""], cells))
    ax = bare.axes[0]
    assert (ax.get_xlabel(), ax.get_ylabel()) == ("resolution (px)", "mAP50-95")
    assert ax.get_ylim()[0] == 0.0 and not bare.texts                     # no caveat on an accuracy plot
    ref = {("320", ""): 0.75, ("640", ""): 0.76}
    with_ref = pivot_figure(Pivot("eval/map50_95", "resolution", None, {}, ["320", "640"], [""], cells, ref))
    ax = with_ref.axes[0]
    assert ax.get_ylim()[0] > 0.5                                          # zoomed: the reference is the scale
    [line] = [ln for ln in ax.get_lines() if ln.get_label() == "float reference"]
    assert list(line.get_ydata()) == [0.75, 0.76] and line.get_linestyle() == "--"
    timed = pivot_figure(Pivot("latency/simulator_infer_ms_p50", "algo", None, {}, ["normal"], [""],
                               {("normal", ""): 10.0}))
    assert timed.axes[0].get_ylabel() == "simulator infer p50 (ms)"
    assert [t.get_text() for t in timed.texts] == ["host/simulator time: not NPU latency"]


def _board_run(tracker: Tracker, parent: str, mask: str, start: int, governor: str) -> str:
    metrics = {"eval/map50_95": 0.5 + int(mask == "0_1_2") / 100,
               "latency/board_py_total_ms_p50": 9.0 - int(mask == "0_1_2"), "latency/board_py_total_ms_mean": 9.5,
               "latency/board_py_total_ms_cv": 0.03, "latency/board_py_infer_ms_p50": 6.0,
               "latency/board_cpp_total_ms_p50": 4.5, "latency/board_cpp_infer_ms_p50": 5.0}
    tags = {"rkbench.device_kind": "board", "board.npu_governor": governor,
            "board.cpu_governor": "policy0:performance,policy4:performance",
            "rkbench.measure": "board: rknnlite 2.3.0 via runner 1 on Python 3.11 | latency: 5 warmup + 200 timed "
                               "iterations of batch 1 in 3.10 s (asked >= 20 and >= 2 s), pre/infer/post timed apart"}
    return _child(tracker, parent, f"core{mask}", start, {"core_mask": mask}, metrics, tags, "FINISHED")


@pytest.fixture(scope="module")
def board_report(store, tmp_path_factory) -> Path:
    tracker = Tracker(store.uri, "board")
    sweep = tracker.client.create_run(tracker.experiment_id, start_time=T0, tags={
        "rkbench.kind": "sweep", "mlflow.runName": "cores", "rkbench.swept": "core_mask"}).info.run_id
    _board_run(tracker, sweep, "0", T0 + 1, "performance")
    _board_run(tracker, sweep, "0_1_2", T0 + 2, "simple_ondemand")        # faster, but its clock floated
    return build_report(store.uri, "board", tmp_path_factory.mktemp("board"))


def test_python_vs_cpp_table_only_with_cpp_times(board_report, report):
    table = md_tables(board_report.read_text())["Python vs C++ latency"]
    assert table[0] == ["run", "where", "part", "Python p50 (ms)", "C++ p50 (ms)", "Python / C++"]
    assert ["core0", "board", "infer", "6", "5", "1.2"] in table and ["core0", "board", "total", "9", "4.5", "2"] in table
    assert "Python vs C++" not in report.read_text()


def test_python_vs_cpp_pairs_the_runs_of_a_runner_sweep(store, tmp_path):
    """`runner=python,cpp`: one run per runner; the C++ run's times beside its Python twin's."""
    tracker = Tracker(store.uri, "runners")
    sweep = tracker.client.create_run(tracker.experiment_id, start_time=T0, tags={
        "rkbench.kind": "sweep", "mlflow.runName": "runners", "rkbench.swept": "runner"}).info.run_id
    common = {"rkbench.device_kind": "board"}
    _child(tracker, sweep, "py", T0 + 1, {"runner": "python"}, {"latency/board_py_infer_ms_p50": 6.0,
                                                               "latency/board_py_total_ms_p50": 9.0}, common, "FINISHED")
    _child(tracker, sweep, "cpp", T0 + 2, {"runner": "cpp"}, {"latency/board_cpp_run_ms_p50": 5.0,
                                                             "latency/board_cpp_total_ms_p50": 4.5}, common, "FINISHED")
    text = build_report(store.uri, "runners", tmp_path).read_text()
    table = md_tables(text)["Python vs C++ latency"]
    assert ["cpp", "board", "run", "6", "5", "1.2"] in table and ["cpp", "board", "total", "9", "4.5", "2"] in table


def test_board_clock_not_pinned_is_invalid_and_board_plots_have_no_caveat(board_report):
    text = board_report.read_text()
    details = {tuple(r[:2]): r for r in md_tables(text)["Latency details"][1:]}
    assert details["core0", "board_py_total_ms"][-3:] == ["200", "3.1", "VALID"]
    assert details["core0_1_2", "board_py_total_ms"][-1] == \
        "INVALID: npu_governor simple_ondemand: clock not pinned (set it to performance)"
    assert ("- fastest configuration with mAP50-95 >= 0.5 (best - 0.01): **core_mask=0**, 9 ms, mAP50-95 0.5"
            in text.splitlines())
    pngs = list(board_report.parent.glob("*.png"))
    assert len(pngs) >= 2 and not [p for p in pngs if "Caveat" in _png_text(p)]


def test_validity_from_count_metrics_and_what_cannot_be_checked():
    from rkbench.report.validity import Limits, validity

    def run(metrics: dict, tags: dict) -> RunRecord:
        return RunRecord("r", "r", "FINISHED", 0, None, {}, metrics, {"rkbench.device_kind": "board", **tags})

    lat = {"latency/board_py_total_ms_p50": 10.0, "latency/board_py_total_ms_mean": 10.0}
    counted = run({**lat, "latency/board_py_total_ms_count": 300, "latency/board_py_total_ms_cv": 0.05},
                  {"board.cpu_governor": "policy0:performance,policy4:schedutil", "board.npu_governor": "userspace"})
    assert validity(counted) == (False, ["cpu_governor schedutil: clock not pinned (set it to performance)"])
    assert validity(counted, limits=Limits(min_iterations=500)) == (False, [
        "300 iterations < 500", "cpu_governor schedutil: clock not pinned (set it to performance)"])
    assert validity(run(lat, {})) == (False, ["iteration count not recorded", "cv not recorded"])
    assert validity(run({}, {})) == (False, ["no latency measured"])
