"""Study sections from hand-made runs: rows the field notes would write (the integration test runs the studies)."""

from __future__ import annotations

from rkbench.report import studies
from rkbench.report.runs import RunRecord, Selection


def run(name: str, params: dict, metrics: dict, kind: str = "emulator", collapsed: str = "") -> RunRecord:
    return RunRecord(name, name, "FINISHED", 0, 1, dict(params, study="resolution"), metrics,
                     {"rkbench.device_kind": kind, "rkbench.collapsed": collapsed})


def table(lines: list[str]) -> list[list[str]]:
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in "\n".join(lines).splitlines() if line.startswith("|")]
    return rows[2:]


def test_resolution_puts_a_cpp_run_beside_its_python_twin():
    py = run("py", {"resolution": "640", "export": "rknn", "runner": "python", "calib.size": "16"},
             {"latency/emulator_py_total_ms_p50": 8.0, "throughput/emulator_single_fps": 120.0}, collapsed="calib.size=4 (x)")
    cpp = run("cpp", {"resolution": "640", "export": "rknn", "runner": "cpp", "calib.size": "4"},
              {"latency/emulator_cpp_total_ms_p50": 2.0, "convert/build_s": 3.0}, collapsed="board.runtime=onnxruntime (y)")
    other = run("cpp320", {"resolution": "320", "export": "rknn", "runner": "cpp", "calib.size": "4"},
                {"latency/emulator_cpp_total_ms_p50": 1.0})
    sel = Selection("uri", "resolution", None, [cpp, other, py], ["runner", "resolution", "calib.size"])
    rows = table(studies.section(sel))
    assert [(r[0], r[2], r[5], r[6], r[11]) for r in rows] == [("320", "cpp", "-", "1", "-"),
                                                               ("640", "python + cpp", "8", "2", "3")]


def test_no_section_for_a_sweep_that_is_not_a_study():
    r = run("x", {"resolution": "320"}, {})
    r.params["study"] = "default"
    assert studies.section(Selection("uri", "rkbench", None, [r], [])) == []


def test_input_puts_the_python_pre_beside_the_cpp_inputs_set_per_pass_through():
    def point(name: str, channels: str, runner: str, through: str, metrics: dict, ident: str, kind="emulator") -> RunRecord:
        r = run(name, {"channels": channels, "resolution": "160", "runner": runner, "measure.cpp_pass_through": through},
                metrics, kind)
        r.tags["rkbench.identity"] = ident
        r.params["study"] = "input"
        return r

    py = {"latency/emulator_py_pre_ms_p50": 3.0, "latency/emulator_py_infer_ms_p50": 5.0, "eval/map50_95": 0.4}
    runs = [point("py1", "1", "python", "False", py, "a"),
            point("py1-link", "1", "python", "False", py, "a"),     # pass-through collapsed for the Python runner
            point("cpp1-on", "1", "cpp", "True", {"latency/emulator_cpp_inputs_set_ms_p50": 0.1,
                                                  "latency/emulator_cpp_total_ms_p50": 2.0}, "b"),
            point("cpp1-off", "1", "cpp", "False", {"latency/emulator_cpp_inputs_set_ms_p50": 0.3}, "c"),
            point("sim3", "3", "python", "False", {"latency/simulator_infer_ms_p50": 9.0}, "d", kind="simulator")]
    rows = table(studies.section(Selection("uri", "input", None, runs, ["channels", "runner", "measure.cpp_pass_through"])))
    assert [(r[0], r[2], r[4], r[5], r[6], r[7], r[9]) for r in rows] == [
        ("1", "emulator", "off", "3", "5", "0.3", "-"), ("1", "emulator", "on", "3", "5", "0.1", "2"),
        ("3", "simulator", "-", "-", "9", "-", "-")]
