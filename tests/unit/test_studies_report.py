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
