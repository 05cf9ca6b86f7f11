"""The C++ runner (cpp/): the librknnrt API subset's struct layouts against Rockchip's published header,
and the runner built with zig and run against the replay stand-in librknnrt: its detections equal the
Python Detector's on the same images (decode + NMS parity), latency results, the one-line errors. The
aarch64 build runs under qemu-user where it is installed (skipped with the reason otherwise)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import cv2
import numpy as np
import pytest

pytest.importorskip("ziglang", reason="the zig toolchain is not installed: pip install ziglang")

from rkbench import cpp  # noqa: E402
from rkbench.data import demo  # noqa: E402
from rkbench.models.detect import Detector, InferenceSpec  # noqa: E402
from rkbench.runtimes.backends import OnnxRuntimeRuntime  # noqa: E402
from tests.unit.test_backends import make_rknn_head_model  # noqa: E402

# Sizes and offsets on LP64 (aarch64 and x86_64 alike), derived from Rockchip's rknn_api.h (rknpu2 runtime,
# as published in airockchip/rknn-toolkit2 rknpu2/runtime/Linux/librknn_api/include/rknn_api.h and
# airockchip/rknn_model_zoo 3rdparty/rknpu2/include/rknn_api.h): field order and types from its structs,
# RKNN_MAX_DIMS 16, RKNN_MAX_NAME_LEN 256, enums 4 bytes, C alignment rules.
EXPECTED = {
    "rknn_context": (8, {}),
    "rknn_input_output_num": (8, {"n_input": 0, "n_output": 4}),
    "rknn_tensor_attr": (376, {"index": 0, "n_dims": 4, "dims": 8, "name": 72, "n_elems": 328, "size": 332, "fmt": 336,
                               "type": 340, "qnt_type": 344, "fl": 348, "zp": 352, "scale": 356, "w_stride": 360,
                               "size_with_stride": 364, "pass_through": 368, "h_stride": 372}),
    "rknn_sdk_version": (512, {"api_version": 0, "drv_version": 256}),
    "rknn_input": (32, {"index": 0, "buf": 8, "size": 16, "pass_through": 20, "type": 24, "fmt": 28}),
    "rknn_output": (24, {"want_float": 0, "is_prealloc": 1, "index": 4, "buf": 8, "size": 16}),
    "rknn_mem_size": (64, {"total_weight_size": 0, "total_internal_size": 4, "total_dma_allocated_size": 8,
                           "total_sram_size": 16, "free_sram_size": 20, "reserved": 24}),
    "rknn_tensor_mem": (40, {"virt_addr": 0, "phys_addr": 8, "fd": 16, "offset": 20, "size": 24, "flags": 28,
                             "priv_data": 32}),
}
# Enum values from the same header.
EXPECTED_ENUMS = {"RKNN_QUERY_IN_OUT_NUM": 0, "RKNN_QUERY_INPUT_ATTR": 1, "RKNN_QUERY_OUTPUT_ATTR": 2,
                  "RKNN_QUERY_SDK_VERSION": 5, "RKNN_QUERY_MEM_SIZE": 6, "RKNN_TENSOR_FLOAT32": 0, "RKNN_TENSOR_INT8": 2, "RKNN_TENSOR_UINT8": 3,
                  "RKNN_TENSOR_NCHW": 0, "RKNN_TENSOR_NHWC": 1, "RKNN_TENSOR_QNT_AFFINE_ASYMMETRIC": 2,
                  "RKNN_NPU_CORE_AUTO": 0, "RKNN_NPU_CORE_0": 1, "RKNN_NPU_CORE_1": 2, "RKNN_NPU_CORE_2": 4,
                  "RKNN_NPU_CORE_0_1": 3, "RKNN_NPU_CORE_0_1_2": 7, "RKNN_NPU_CORE_ALL": 0xFFFF}

SIZE, CLASSES = 64, 3
ZIG = [sys.executable, "-m", "ziglang"]


def _layout_program(static: bool) -> str:
    """C printing every size / offset / enum value (static=False), or asserting them at compile time."""
    lines = ['#include <stddef.h>', '#include <stdio.h>', '#include "rknn_api_subset.h"', "int main(void) {"]
    checks = []
    for struct, (size, fields) in EXPECTED.items():
        checks.append((f"sizeof({struct})", f"{struct}", size))
        checks += [(f"offsetof({struct}, {f})", f"{struct}.{f}", off) for f, off in fields.items()]
    checks += [(f"(long){name}", name, value) for name, value in EXPECTED_ENUMS.items()]
    for expr, label, value in checks:
        lines.append(f'_Static_assert({expr} == {value}, "{label}");' if static
                     else f'printf("{label} %ld\\n", (long){expr});')
    return "\n".join(lines + ["return 0; }"]) + "\n"


def test_struct_layouts_match_the_published_header(tmp_path: Path) -> None:
    src = tmp_path / "layout.c"
    src.write_text(_layout_program(static=False))
    exe = tmp_path / "layout"
    subprocess.run(ZIG + ["cc", "-target", "x86_64-linux-gnu", "-I", str(cpp.SOURCES), "-o", str(exe), str(src)],
                   check=True, capture_output=True)
    got = dict(line.rsplit(" ", 1) for line in subprocess.run([str(exe)], check=True, capture_output=True,
                                                                text=True).stdout.splitlines())
    want = {s: size for s, (size, _) in EXPECTED.items()}
    want.update({f"{s}.{f}": off for s, (_, fields) in EXPECTED.items() for f, off in fields.items()})
    want.update(EXPECTED_ENUMS)
    assert {k: int(v) for k, v in got.items()} == want
    # aarch64 (the boards): the same numbers, checked by the compiler, nothing to run
    static = tmp_path / "layout_static.c"
    static.write_text(_layout_program(static=True))
    done = subprocess.run(ZIG + ["cc", "-target", "aarch64-linux-gnu", "-I", str(cpp.SOURCES), "-c",
                                 "-o", str(tmp_path / "layout_static.o"), str(static)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_fnv1a64_known_values() -> None:
    # the published FNV-1a 64 test vectors; the stand-in computes the same in C
    assert cpp.fnv1a64(b"") == 0xCBF29CE484222325
    assert cpp.fnv1a64(b"a") == 0xAF63DC4C8601EC8C
    assert cpp.fnv1a64(b"foobar") == 0x85944171F73967E8


# ----------------------------------------------------------------------------------------- the runner

@pytest.fixture(scope="session")
def build_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cpp_cache")


@pytest.fixture(scope="session")
def x86(build_cache: Path) -> tuple:
    return cpp.build("x86_64", build_cache), cpp.build_standin("x86_64", build_cache)


@pytest.fixture(scope="session")
def case(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A tiny rknn-head ONNX model, demo images of different sizes, their tensors and a replay folder."""
    root = tmp_path_factory.mktemp("cpp_case")
    model = make_rknn_head_model(root / "head.onnx", size=SIZE, num_classes=CLASSES)
    items = []
    for i in range(4):
        img, _ = demo.render(7, "val", i)
        img = img[: img.shape[0] - 37 * i, : img.shape[1] - 23 * i]  # odd sizes: letterbox padding both ways
        path = root / f"img{i}.png"
        cv2.imwrite(str(path), img)
        items.append((100 + i, str(path)))
    inputs, tensors = cpp.prepare_inputs(root / "replay", items, SIZE)
    replay = cpp.write_replay(root / "replay", model, tensors)
    return {"root": root, "model": model, "items": items, "inputs": inputs, "replay": replay, "tensors": tensors}


def _spec(conf: float = 0.001, iou: float = 0.7, max_det: int = 300) -> InferenceSpec:
    return InferenceSpec(input_size=SIZE, head="rknn", num_classes=CLASSES, category_ids=(1, 3, 7), conf=conf,
                         iou=iou, max_det=max_det, runtime="rknnlite")


def _write_spec(path: Path, spec: InferenceSpec, **measure) -> Path:
    path.write_text(json.dumps({"inference": spec.to_dict(), "measure": dict({"warmup": 1, "iterations": 3,
                                                                              "min_seconds": 0.0}, **measure)}))
    return path


def _run(runner: Path, lib: Path, spec: Path, mode: str, model: Path, out: Path, *extra: str, prefix=()) -> tuple:
    cmd = [*prefix, str(runner), "--spec", str(spec), "--mode", mode, "--model", str(model), "--out", str(out),
           "--lib", str(lib), *extra]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    result = json.loads(out.read_text()) if out.exists() else None
    return done, result


def _python_detections(case: dict, spec: InferenceSpec) -> list:
    runtime = OnnxRuntimeRuntime(str(case["model"]))
    try:
        return Detector(spec, runtime).evaluate(case["items"])[0]
    finally:
        runtime.close()


def _assert_same_detections(mine: list, theirs: list) -> None:
    assert len(mine) == len(theirs) > 0
    boxes_a = np.array([d["bbox"] for d in mine])
    boxes_b = np.array([d["bbox"] for d in theirs])
    assert [(d["image_id"], d["category_id"]) for d in mine] == [(d["image_id"], d["category_id"]) for d in theirs]
    assert np.abs(np.array([d["score"] for d in mine]) - np.array([d["score"] for d in theirs])).max() <= 1.01e-5
    # measured: identical to the last rounded digit on x86_64 and aarch64 (float32 decode in both)
    assert np.abs(boxes_a - boxes_b).max() <= 1e-3


@pytest.mark.parametrize("conf,iou,max_det", [(0.001, 0.7, 300), (0.3, 0.45, 300), (0.001, 0.5, 5)])
def test_eval_detections_equal_the_python_detector(x86, case, tmp_path: Path, conf, iou, max_det) -> None:
    runner, lib = x86
    spec = _spec(conf, iou, max_det)
    done, result = _run(runner, lib, _write_spec(tmp_path / "spec.json", spec), "eval", case["replay"],
                        tmp_path / "eval.json", "--inputs", str(case["inputs"]))
    assert done.returncode == 0, done.stderr
    assert result["complete"] is True and result["replayed"] is True
    assert "stand-in" in result["versions"]["librknnrt"]
    mine = json.loads(Path(result["eval"]["detections_file"]).read_text())
    assert result["eval"]["images"] == 4 and result["eval"]["detections"] == len(mine)
    _assert_same_detections(mine, _python_detections(case, spec))


def test_eval_int8_outputs_dequantised(x86, case, tmp_path: Path) -> None:
    """want_float=0: the runner dequantises (q - zp) * scale itself; with a replay whose outputs are int8 the
    detections are those of the dequantised outputs (checked here for running and the class ids only)."""
    runner, lib = x86
    replay = tmp_path / "replay_int8"
    shutil.copytree(case["replay"].parent, replay)
    lines = (replay / cpp.REPLAY_MODEL).read_text().splitlines()
    # sigmoid and DFL logits span about [-10, 10]: one scale for every output keeps the test simple
    lines = [ln.replace("float32 nchw 0 0", "int8 nchw 0 0.08") if ln.startswith("output") else ln for ln in lines]
    (replay / cpp.REPLAY_MODEL).write_text("\n".join(lines) + "\n")
    inputs = replay / "inputs.txt"
    done, result = _run(runner, lib, _write_spec(tmp_path / "spec.json", _spec(0.3), outputs="int8"), "eval",
                        replay / cpp.REPLAY_MODEL, tmp_path / "eval.json", "--inputs", str(inputs))
    assert done.returncode == 0, done.stderr
    assert result["runtime"]["outputs"] == "int8"
    dets = json.loads(Path(result["eval"]["detections_file"]).read_text())
    assert dets and {d["category_id"] for d in dets} <= {1, 3, 7}
    from rkbench.config import RunConfig
    from rkbench.stages.board import describe_mode

    assert describe_mode("eval", result, RunConfig()).endswith(", outputs int8")   # in rkbench.measure
    # an outputs setting the runner does not know: one line naming the config key
    done, result = _run(runner, lib, _write_spec(tmp_path / "bad.json", _spec(), outputs="int4"), "eval",
                        replay / cpp.REPLAY_MODEL, tmp_path / "bad_eval.json", "--inputs", str(inputs))
    assert done.returncode == 1 and result["complete"] is False
    assert done.stderr.strip().splitlines()[-1] == ("runner: error: measure setting outputs=int4 unknown: use float "
                                                    "or int8 (config measure.cpp_outputs)")


def test_latency_result(x86, case, tmp_path: Path) -> None:
    runner, lib = x86
    done, result = _run(runner, lib, _write_spec(tmp_path / "spec.json", _spec(), iterations=7), "latency",
                        case["replay"], tmp_path / "lat.json", "--inputs", str(case["inputs"]))
    assert done.returncode == 0, done.stderr
    lat = result["latency"]
    assert result["complete"] is True and lat["iterations"] >= 7 and lat["warmup"] == 1
    for part in ("inputs_set", "run", "outputs_get", "total"):
        assert lat[part]["count"] == lat["iterations"] and 0 <= lat[part]["min"] <= lat[part]["p50"] <= lat[part]["p99"]
    assert len(lat["samples_ms"]["run"]) == lat["iterations"]
    assert result["runtime"]["driver"] == "none (replay)"
    assert lat["init"]["ms"] >= 0 and "rknn_init" in lat["init"]["covers"]


def test_latency_metrics_carry_the_init_time(x86, case, tmp_path: Path) -> None:
    from rkbench.stages.board import mode_metrics

    runner, lib = x86
    done, result = _run(runner, lib, _write_spec(tmp_path / "spec.json", _spec()), "latency", case["replay"],
                        tmp_path / "lat.json", "--inputs", str(case["inputs"]))
    assert done.returncode == 0, done.stderr
    metrics = mode_metrics("latency", result, "emulator")
    assert metrics["latency/emulator_cpp_init_ms"] == result["latency"]["init"]["ms"]
    assert not [k for k in metrics if k.startswith("latency/emulator_cpp_init_ms_")]  # one value, no stats


def _int8_replay(case: dict, folder: Path) -> Path:
    """The case's replay with every output declared int8 (one scale: logits span about [-10, 10])."""
    shutil.copytree(case["replay"].parent, folder)
    lines = (folder / cpp.REPLAY_MODEL).read_text().splitlines()
    lines = [ln.replace("float32 nchw 0 0", "int8 nchw 0 0.08") if ln.startswith("output") else ln for ln in lines]
    (folder / cpp.REPLAY_MODEL).write_text("\n".join(lines) + "\n")
    return folder / cpp.REPLAY_MODEL


@pytest.mark.parametrize("outputs", ["float", "int8"])
def test_zero_copy_detections_identical_to_the_normal_path(x86, case, tmp_path: Path, outputs) -> None:
    runner, lib = x86
    model = case["replay"] if outputs == "float" else _int8_replay(case, tmp_path / "replay_int8")
    dets = {}
    for zero_copy in (False, True):
        spec = _write_spec(tmp_path / f"spec_{zero_copy}.json", _spec(), outputs=outputs, zero_copy=zero_copy)
        done, result = _run(runner, lib, spec, "eval", model, tmp_path / f"eval_{zero_copy}.json",
                            "--inputs", str(case["inputs"]))
        assert done.returncode == 0, done.stderr
        assert result["runtime"]["zero_copy"] is zero_copy and result["runtime"]["outputs"] == outputs
        parts = ("input_copy", "output_read") if zero_copy else ("inputs_set", "outputs_get")
        assert all(result["eval"][p]["count"] == 4 for p in parts)
        dets[zero_copy] = json.loads(Path(result["eval"]["detections_file"]).read_text())
    assert dets[True] == dets[False] and len(dets[True]) > 0


def test_zero_copy_latency_parts_and_metrics(x86, case, tmp_path: Path) -> None:
    from rkbench.config import RunConfig
    from rkbench.stages.board import describe_mode, mode_metrics

    runner, lib = x86
    done, result = _run(runner, lib, _write_spec(tmp_path / "spec.json", _spec(), zero_copy=True), "latency",
                        case["replay"], tmp_path / "lat.json", "--inputs", str(case["inputs"]))
    assert done.returncode == 0, done.stderr
    lat = result["latency"]
    for part in ("input_copy", "run", "output_read", "total"):
        assert lat[part]["count"] == lat["iterations"] >= 3
    assert "inputs_set" not in lat and "rknn_set_io_mem" in lat["init"]["covers"]
    metrics = mode_metrics("latency", result, "emulator")
    assert {"latency/emulator_cpp_input_copy_ms_p50", "latency/emulator_cpp_output_read_ms_p50",
            "latency/emulator_cpp_run_ms_p50", "latency/emulator_cpp_init_ms"} <= set(metrics)
    text = describe_mode("latency", result, RunConfig())
    assert "input_copy/run/output_read timed apart" in text and text.endswith("zero-copy io memory (rknn_create_mem + rknn_set_io_mem)")
    # a zero_copy that is not a boolean: one line naming the config key
    done, _ = _run(runner, lib, _write_spec(tmp_path / "bad.json", _spec(), zero_copy="yes"), "latency",
                   case["replay"], tmp_path / "bad.json.out", "--inputs", str(case["inputs"]))
    assert done.returncode == 1 and "(config measure.cpp_zero_copy)" in done.stderr.strip().splitlines()[-1]


def test_missing_library_is_one_clear_line(x86, case, tmp_path: Path) -> None:
    runner, _ = x86
    spec = _write_spec(tmp_path / "spec.json", _spec())
    done, result = _run(runner, tmp_path / "nowhere" / "librknnrt.so", spec, "latency", case["replay"],
                        tmp_path / "r.json", "--inputs", str(case["inputs"]))
    assert done.returncode != 0
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("runner: error: cannot load ") and "pass --lib PATH" in last
    assert result["complete"] is False and "cannot load" in result["error"]
    # a library without the API (the C maths library): the missing symbol named
    libm = next((p for p in ("/lib/x86_64-linux-gnu/libm.so.6", "/usr/lib/x86_64-linux-gnu/libm.so.6")
                 if Path(p).exists()), None)
    if libm:
        done, _ = _run(runner, Path(libm), spec, "latency", case["replay"], tmp_path / "r2.json",
                       "--inputs", str(case["inputs"]))
        assert done.returncode != 0 and "has no symbol rknn_init" in done.stderr.strip().splitlines()[-1]


def test_unrecorded_input_fails_in_rknn_run(x86, case, tmp_path: Path) -> None:
    runner, lib = x86
    other = tmp_path / "other.bin"
    other.write_bytes(bytes(SIZE * SIZE * 3))  # never recorded: the stand-in has no outputs for it
    done, result = _run(runner, lib, _write_spec(tmp_path / "spec.json", _spec()), "latency", case["replay"],
                        tmp_path / "r.json", "--input", str(other))
    assert done.returncode == 1
    assert done.stderr.strip().splitlines()[-1].startswith("runner: error: rknn_run failed with code -8")
    assert "no recorded outputs" in done.stderr and result["complete"] is False


def test_spec_the_runner_cannot_honour(x86, case, tmp_path: Path) -> None:
    runner, lib = x86
    data = {"inference": dict(_spec().to_dict(), colour="red"), "measure": {}}
    (tmp_path / "spec.json").write_text(json.dumps(data))
    done, _ = _run(runner, lib, tmp_path / "spec.json", "eval", case["replay"], tmp_path / "r.json",
                   "--inputs", str(case["inputs"]))
    assert done.returncode == 1 and "unknown inference spec key colour" in done.stderr


def test_record_lines_find_outputs_in_other_folders(x86, case, tmp_path: Path) -> None:
    """As the board deploy lays them out: each recorded output in its own folder, named by `record` lines."""
    runner, lib = x86
    lines = [ln for ln in case["replay"].read_text().splitlines()]
    for k, out in enumerate(sorted(case["replay"].parent.glob("*.out"))):
        (tmp_path / f"c{k}").mkdir()
        shutil.copy(out, tmp_path / f"c{k}" / out.name)
        lines.append(f"record {out.stem} ../c{k}/{out.name}")
    (tmp_path / "desc").mkdir()
    model = tmp_path / "desc" / cpp.REPLAY_MODEL
    model.write_text("\n".join(lines) + "\n")
    spec = _spec()
    done, result = _run(runner, lib, _write_spec(tmp_path / "spec.json", spec), "eval", model, tmp_path / "eval.json",
                        "--inputs", str(case["inputs"]))
    assert done.returncode == 0, done.stderr
    _assert_same_detections(json.loads(Path(result["eval"]["detections_file"]).read_text()),
                            _python_detections(case, spec))


def test_null_mode_serves_zeros_for_any_input(x86, case, tmp_path: Path) -> None:
    runner, lib = x86
    shapes = [ln.split()[3:3 + int(ln.split()[2])] for ln in case["replay"].read_text().splitlines()
              if ln.startswith("output")]
    model = cpp.write_null_replay(tmp_path / "null", SIZE, [list(map(int, s)) for s in shapes])
    other = tmp_path / "other.bin"
    other.write_bytes(bytes(SIZE * SIZE * 3))  # never recorded: null mode does not look
    done, result = _run(runner, lib, _write_spec(tmp_path / "spec.json", _spec()), "latency", model,
                        tmp_path / "r.json", "--input", str(other))
    assert done.returncode == 0, done.stderr
    assert "NULL mode" in result["versions"]["librknnrt"] and result["latency"]["iterations"] >= 3
    # and with zero-copy io memory (bench/bench_runner.py compares the two paths' overheads)
    done, result = _run(runner, lib, _write_spec(tmp_path / "zc.json", _spec(), zero_copy=True), "latency", model,
                        tmp_path / "zc_out.json", "--input", str(other))
    assert done.returncode == 0, done.stderr
    assert result["latency"]["input_copy"]["count"] == result["latency"]["iterations"]


# ------------------------------------------------------- threads, pass-through, batch, heads, NPU memory

def _python_counts(case: dict, spec: InferenceSpec) -> dict:
    """Detections per image id of the Python Detector (what each throughput frame must find too)."""
    counts: dict = {}
    for d in _python_detections(case, spec):
        counts[d["image_id"]] = counts.get(d["image_id"], 0) + 1
    return counts


def test_throughput_one_context_per_worker(x86, case, tmp_path: Path) -> None:
    from rkbench.stages.board import describe_mode, mode_metrics
    from rkbench.config import RunConfig

    runner, lib = x86
    spec = _spec(0.3)
    done, result = _run(runner, lib, _write_spec(tmp_path / "spec.json", spec, cores="0,1,2", frames=7), "throughput",
                        case["replay"], tmp_path / "tp.json", "--inputs", str(case["inputs"]))
    assert done.returncode == 0, done.stderr
    tp = result["throughput"]
    assert [w["core_mask"] for w in tp["workers"]] == ["0", "1", "2"] and result["runtime"]["core_masks"] == ["0", "1", "2"]
    assert sum(w["frames"] for w in tp["workers"]) == tp["frames"] == 7 and tp["fps"] > 0
    assert sum(w["share"] for w in tp["workers"]) == pytest.approx(1.0) and tp["frame_latency_ms"]["count"] == 7
    # frame k is input k % 4: each finds what the Python Detector finds on that image
    counts = _python_counts(case, spec)
    ids = [item[0] for item in case["items"]]
    assert tp["batch_detections"] == [counts.get(ids[k % 4], 0) for k in range(7)]
    metrics = mode_metrics("throughput", result, "emulator")
    assert metrics["throughput/emulator_cpp_fps"] == tp["fps"] and metrics["throughput/emulator_cpp_workers"] == 3
    assert "throughput/emulator_fps" not in metrics   # the Python pool's name stays the Python runner's
    assert sum(metrics[f"throughput/emulator_cpp_share_core{c}"] for c in "012") == pytest.approx(1.0)
    assert describe_mode("throughput", result, RunConfig()).startswith("throughput: 3 workers (core masks 0,1,2)")
    # a worker whose core mask the library refuses: named, one line
    done, result = _run(runner, lib, _write_spec(tmp_path / "bad.json", spec, cores="0,7"), "throughput",
                        case["replay"], tmp_path / "bad_tp.json", "--inputs", str(case["inputs"]))
    assert done.returncode == 1 and "core_mask 7 unknown" in done.stderr.strip().splitlines()[-1]


def test_pass_through_replays_only_the_recorded_npu_bytes(x86, case, tmp_path: Path) -> None:
    runner, lib = x86
    spec = _spec()
    # recorded without the pass-through tensors: the stand-in, like the NPU it replays, has no outputs for them
    done, _ = _run(runner, lib, _write_spec(tmp_path / "spec.json", spec, pass_through=True), "eval", case["replay"],
                   tmp_path / "no.json", "--inputs", str(case["inputs"]))
    assert done.returncode == 1 and "no recorded outputs" in done.stderr
    replay = cpp.write_replay(tmp_path / "pt", case["model"], case["tensors"], pass_through=True)
    assert "int8 nhwc -128 " in replay.read_text()   # the input attr of an int8 .rknn: zp -128, scale 1/255
    assert cpp.pass_through_bytes(np.array([[[[0, 128, 255]]]], np.uint8)) == bytes([0x80, 0x00, 0x7F])
    theirs = _python_detections(case, spec)
    for zero_copy in (False, True):
        done, result = _run(runner, lib, _write_spec(tmp_path / "spec.json", spec, pass_through=True, zero_copy=zero_copy),
                            "eval", replay, tmp_path / f"pt_{zero_copy}.json", "--inputs", str(case["inputs"]))
        assert done.returncode == 0, done.stderr
        assert result["runtime"]["pass_through"] is True
        _assert_same_detections(json.loads(Path(result["eval"]["detections_file"]).read_text()), theirs)
    from rkbench.config import RunConfig
    from rkbench.stages.board import describe_mode

    assert "pass-through input" in describe_mode("eval", result, RunConfig())
    # another normalisation (another zp / scale): the runner's float32 steps still give the host's bytes exactly,
    # or the stand-in would find no recorded outputs for them
    mean, std = (10.0, 20.0, 30.0), (50.0, 60.0, 70.0)
    other = cpp.write_replay(tmp_path / "pt_norm", case["model"], case["tensors"], mean, std, pass_through=True)
    zp, scale = cpp.input_quantisation(mean, std)
    assert f"int8 nhwc {zp} {scale!r}" in other.read_text() and (zp, scale) != (-128, np.float32(1 / 255))
    done, result = _run(runner, lib, _write_spec(tmp_path / "norm.json", replace(spec, mean=mean, std=std),
                                                 pass_through=True), "eval", other, tmp_path / "norm_out.json",
                        "--inputs", str(case["inputs"]))
    assert done.returncode == 0, done.stderr
    assert result["eval"]["images"] == 4 and result["eval"]["detections"] > 0


def _gray_model(onnx_path: Path, out: Path) -> Path:
    """The 1-channel twin of the test model (its convs read per-channel average pools): weights summed over RGB."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(onnx_path))
    model.graph.input[0].type.tensor_type.shape.dim[1].dim_value = 1
    for w in model.graph.initializer:
        a = numpy_helper.to_array(w)
        if a.ndim == 4 and a.shape[1] == 3:
            w.CopyFrom(numpy_helper.from_array(a.sum(axis=1, keepdims=True), w.name))
    onnx.save(model, str(out))
    return out


def test_gray_model_detections_equal_the_python_detector(x86, case, tmp_path: Path) -> None:
    """channels=1: the host letterboxes then grays (as the Detector does), the runner takes C from the spec's
    mean/std and checks it against the input attr, on the normal, zero-copy and pass-through paths."""
    runner, lib = x86
    gray = _gray_model(case["model"], tmp_path / "gray.onnx")
    spec = replace(_spec(), mean=(0.0,), std=(255.0,))
    inputs, tensors = cpp.prepare_inputs(tmp_path / "g", case["items"], SIZE, channels=1)
    assert tensors[0].shape == (SIZE, SIZE, 1) and Path(inputs).read_text().count("\n") == 4
    runtime = OnnxRuntimeRuntime(str(gray), spec.mean, spec.std)
    try:
        theirs = Detector(spec, runtime).evaluate(case["items"])[0]
    finally:
        runtime.close()
    replay = cpp.write_replay(tmp_path / "g", gray, tensors, spec.mean, spec.std, pass_through=True)
    assert f"4 1 {SIZE} {SIZE} 1 int8 nhwc -128 " in replay.read_text()
    for through, zero_copy in ((False, False), (False, True), (True, False), (True, True)):
        done, result = _run(runner, lib, _write_spec(tmp_path / "spec.json", spec, pass_through=through, zero_copy=zero_copy),
                            "eval", replay, tmp_path / f"g_{through}_{zero_copy}.json", "--inputs", str(inputs))
        assert done.returncode == 0, done.stderr
        _assert_same_detections(json.loads(Path(result["eval"]["detections_file"]).read_text()), theirs)
    # a 3-channel spec against the 1-channel model, and the 1-channel spec against RGB tensors: one line each
    done, _ = _run(runner, lib, _write_spec(tmp_path / "rgb.json", _spec()), "eval", replay, tmp_path / "x.json",
                   "--inputs", str(inputs))
    assert done.returncode == 1 and "1-channel input, the spec has mean/std of 3" in done.stderr
    done, _ = _run(runner, lib, _write_spec(tmp_path / "spec.json", spec), "eval", replay, tmp_path / "y.json",
                   "--inputs", str(case["inputs"]))
    assert done.returncode == 1 and "the model takes" in done.stderr.splitlines()[-1]


def test_batch_eval_and_latency_per_frame(x86, case, tmp_path: Path) -> None:
    from rkbench.stages.board import mode_metrics

    runner, lib = x86
    spec = replace(_spec(), batch=3)   # 4 images: a full batch, then one padded with its last image
    replay = cpp.write_replay(tmp_path / "b3", case["model"], case["tensors"], batch=3)
    assert "input images 4 3 " in replay.read_text()
    done, result = _run(runner, lib, _write_spec(tmp_path / "spec.json", spec), "eval", replay, tmp_path / "ev.json",
                        "--inputs", str(case["inputs"]))
    assert done.returncode == 0, done.stderr
    assert result["eval"]["batch"] == 3 and result["eval"]["run"]["count"] == 2 and result["eval"]["images"] == 4
    _assert_same_detections(json.loads(Path(result["eval"]["detections_file"]).read_text()),
                            _python_detections(case, _spec()))
    done, result = _run(runner, lib, _write_spec(tmp_path / "spec.json", spec), "latency", replay, tmp_path / "lat.json",
                        "--inputs", str(case["inputs"]))
    assert done.returncode == 0, done.stderr
    lat = result["latency"]
    assert lat["per"] == "iteration of batch 3" and lat["frame"]["count"] == lat["iterations"]
    assert lat["frame"]["p50"] == pytest.approx(lat["total"]["p50"] / 3, rel=1e-9)
    assert "latency/emulator_cpp_frame_ms_p50" in mode_metrics("latency", result, "emulator")
    # a spec whose batch the model does not take: one line naming rknn_batch_size
    done, _ = _run(runner, lib, _write_spec(tmp_path / "one.json", _spec()), "latency", replay, tmp_path / "x.json",
                   "--inputs", str(case["inputs"]))
    assert done.returncode == 1 and "rknn_batch_size" in done.stderr.strip().splitlines()[-1]


def test_tiling_stays_with_the_python_runner_said_in_one_line() -> None:
    from rkbench.config import BoardConfig, MeasureConfig, RunConfig
    from rkbench.errors import DeviceError
    from rkbench.stages.board import CPP_NO_TILING, runner_modes

    def run(*modes: str) -> RunConfig:
        return RunConfig(target="board", runner="cpp", board=BoardConfig(address="1.2.3.4:5555"),
                         measure=MeasureConfig(modes=list(modes)))

    assert runner_modes(run("latency", "throughput", "tiling")) == (["latency", "throughput"], [CPP_NO_TILING])
    assert runner_modes(run("eval", "throughput")) == (["eval", "throughput"], [])
    with pytest.raises(DeviceError, match="no mode of the C\\+\\+ runner .*use runner=python"):
        runner_modes(run("tiling"))


def _head_model(path: Path, head: str, na: int = 3) -> Path:
    """A tiny ONNX with the official head ([1, 4+nc, anchors]: xywh pixels, sigmoid scores) or raw YOLOv5
    convs ([1, na*(5+nc), H, W] per stride); each cell sees the average colour of its patch."""
    from onnx import TensorProto, helper, numpy_helper
    import onnx

    rng = np.random.default_rng(3)
    nodes, inits, outputs = [], [], []
    const = lambda name, v: inits.append(numpy_helper.from_array(np.asarray(v, np.float32), name))  # noqa: E731
    for s in ((8, 16, 32) if head == "yolov5" else (8,)):
        h = SIZE // s
        nodes.append(helper.make_node("AveragePool", ["images"], [f"p{s}"], kernel_shape=[s, s], strides=[s, s]))
        ch = na * (5 + CLASSES) if head == "yolov5" else 4 + CLASSES
        const(f"w{s}", rng.normal(0, 3.0, (ch, 3, 1, 1)))
        const(f"b{s}", rng.normal(0, 1.0, (ch,)))
        if head == "yolov5":
            nodes.append(helper.make_node("Conv", [f"p{s}", f"w{s}", f"b{s}"], [f"out{s}"]))
            outputs.append(helper.make_tensor_value_info(f"out{s}", TensorProto.FLOAT, ["n", ch, h, h]))
            continue
        const("gain", np.array([SIZE, SIZE, SIZE / 2, SIZE / 2] + [1] * CLASSES).reshape(1, -1, 1, 1))
        inits.append(numpy_helper.from_array(np.array([1, 4 + CLASSES, h * h], np.int64), "shape"))
        nodes += [helper.make_node("Conv", [f"p{s}", f"w{s}", f"b{s}"], ["logits"]),
                  helper.make_node("Sigmoid", ["logits"], ["sig"]), helper.make_node("Mul", ["sig", "gain"], ["scaled"]),
                  helper.make_node("Reshape", ["scaled", "shape"], ["output0"])]
        outputs.append(helper.make_tensor_value_info("output0", TensorProto.FLOAT, [1, 4 + CLASSES, h * h]))
    graph = helper.make_graph(nodes, head, [helper.make_tensor_value_info("images", TensorProto.FLOAT,
                                                                          ["n", 3, SIZE, SIZE])], outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


@pytest.mark.parametrize("head", ["ultralytics", "yolov5"])
def test_official_and_yolov5_heads_decode_like_python(x86, case, tmp_path: Path, head) -> None:
    runner, lib = x86
    model = _head_model(tmp_path / f"{head}.onnx", head)
    anchors = ((10, 13, 16, 30, 33, 23), (30, 61, 62, 45, 59, 119), (116, 90, 156, 198, 373, 326)) if head == "yolov5" else ()
    spec = replace(_spec(0.05, 0.5), head=head, anchors=anchors)
    replay = cpp.write_replay(tmp_path / head, model, case["tensors"])
    done, result = _run(runner, lib, _write_spec(tmp_path / "spec.json", spec), "eval", replay, tmp_path / "ev.json",
                        "--inputs", str(case["inputs"]))
    assert done.returncode == 0, done.stderr
    _assert_same_detections(json.loads(Path(result["eval"]["detections_file"]).read_text()),
                            _python_detections(dict(case, model=model), spec))


def test_npu_memory_is_what_the_stand_in_allocated(x86, case, tmp_path: Path) -> None:
    from rkbench.stages.board import mode_metrics

    runner, lib = x86
    out_bytes = 4 * sum(int(np.prod(list(map(int, ln.split()[3:3 + int(ln.split()[2])]))))
                        for ln in case["replay"].read_text().splitlines() if ln.startswith("output"))
    for zero_copy, io in ((False, 0), (True, SIZE * SIZE * 3 + out_bytes)):
        done, result = _run(runner, lib, _write_spec(tmp_path / "spec.json", _spec(), zero_copy=zero_copy), "latency",
                            case["replay"], tmp_path / "lat.json", "--inputs", str(case["inputs"]))
        assert done.returncode == 0, done.stderr
        mem = result["memory"]
        assert mem["reported"] is True and "stand-in" in mem["by"]
        assert (mem["weight_bytes"], mem["internal_bytes"], mem["sram_total_bytes"]) == (0, out_bytes, 0)
        assert mem["dma_allocated_bytes"] == out_bytes + io
    metrics = mode_metrics("latency", result, "emulator")
    assert metrics["memory/emulator_npu_internal_mb"] == out_bytes / 2**20


# ----------------------------------------------------------------------------------------- aarch64

def _qemu() -> tuple:
    exe = shutil.which("qemu-aarch64-static") or shutil.which("qemu-aarch64")
    sysroot = Path("/usr/aarch64-linux-gnu")
    if not exe:
        return None, "qemu-user is not installed: apt-get install -y qemu-user-static libc6-arm64-cross"
    if not (sysroot / "lib" / "ld-linux-aarch64.so.1").exists():
        return None, "no aarch64 glibc for qemu: apt-get install -y libc6-arm64-cross"
    return [exe, "-L", str(sysroot)], ""


def test_aarch64_build_runs_under_qemu(x86, case, build_cache: Path, tmp_path: Path) -> None:
    prefix, why = _qemu()
    if prefix is None:
        pytest.skip(why)
    runner, lib = cpp.build("aarch64", build_cache), cpp.build_standin("aarch64", build_cache)
    head = runner.read_bytes()[:20]
    assert head[:4] == b"\x7fELF" and int.from_bytes(head[18:20], "little") == 183  # EM_AARCH64
    spec = _spec()
    for zero_copy in (False, True):
        done, result = _run(runner, lib, _write_spec(tmp_path / "spec.json", spec, zero_copy=zero_copy), "eval",
                            case["replay"], tmp_path / "eval.json", "--inputs", str(case["inputs"]), prefix=prefix)
        assert done.returncode == 0, done.stderr
        assert result["runtime"]["zero_copy"] is zero_copy
        _assert_same_detections(json.loads(Path(result["eval"]["detections_file"]).read_text()),
                                _python_detections(case, spec))
    # threads and pass-through bytes on the board's architecture: two contexts, the frames found as on x86_64
    replay = cpp.write_replay(tmp_path / "pt", case["model"], case["tensors"], pass_through=True)
    done, result = _run(runner, lib, _write_spec(tmp_path / "tp.json", spec, cores="0,1", frames=5, pass_through=True),
                        "throughput", replay, tmp_path / "tp_out.json", "--inputs", str(case["inputs"]), prefix=prefix)
    assert done.returncode == 0, done.stderr
    counts, ids = _python_counts(case, spec), [item[0] for item in case["items"]]
    assert result["throughput"]["batch_detections"] == [counts.get(ids[k % 4], 0) for k in range(5)]


def test_build_command_prints_the_cached_binary(x86, build_cache: Path, capsys: pytest.CaptureFixture) -> None:
    assert cpp.main(["build", "--arch", "x86_64", "--cache", str(build_cache)]) == 0
    assert Path(capsys.readouterr().out.strip()) == x86[0]  # same sources and target: the cached copy
    assert cpp.main(["build", "--arch", "x86_64", "--stand-in", "--cache", str(build_cache)]) == 0
    assert Path(capsys.readouterr().out.strip()) == x86[1]


def test_rkbench_runner_build_routes_to_the_cpp_build(x86, build_cache: Path, capsys: pytest.CaptureFixture) -> None:
    from rkbench.__main__ import main

    assert main(["runner", "build", "--arch", "x86_64", "--cache", str(build_cache)]) == 0
    assert Path(capsys.readouterr().out.strip()) == x86[0]
    with pytest.raises(SystemExit):
        main(["runner", "build", "--arch", "mips"])
    assert "python -m rkbench runner build: error: argument --arch" in capsys.readouterr().err
