"""The accuracy and hybrid pieces that need no toolkit run: reading the error_analysis.txt rknn-toolkit2 2.5.0
wrote (tests/fixtures: the real file of the demo model at 160 px), ranking layers, the config axis and where
it applies, and the report's int8 vs hybrid vs fp16 arithmetic."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rkbench import spec
from rkbench.config import RunConfig, validate
from rkbench.errors import ConfigError, StageError, UnsupportedCombination
from rkbench.report.accuracy import hybrid as hybrid_section
from rkbench.report.accuracy import recovery_line
from rkbench.report.runs import RunRecord, Selection
from rkbench.stages.accuracy import Analysis, average, metrics, parse_error_analysis, worst, worst_tag

REAL = Path(__file__).parents[1] / "fixtures" / "error_analysis_rknn_toolkit2_2.5.0.txt"


@pytest.fixture(scope="module")
def layers():
    return parse_error_analysis(REAL.read_text())


def test_real_file_rows_and_their_special_cases(layers):
    assert len(layers) == 182                       # every "[Op] name" row; the name -> file table is not read
    first = layers[2]
    assert (first.kind, first.name) == ("Conv", "/model.0/conv/Conv_output_0")
    assert (first.entire_cos, first.entire_euc, first.single_cos, first.single_euc) == (0.99998, 2.36675, 0.99998, 2.36675)
    cls32 = next(l for l in layers if l.name == "cls32_int8")
    assert cls32.q_zero and cls32.single_cos is None          # "q_zero | q_zero": quantized output all zeros
    sum32 = next(l for l in layers if l.name == "sum32")
    assert sum32.q_zero and sum32.entire_cos is None and sum32.single_cos == 1.0
    fused = next(l for l in layers if l.name == "/cv3.2/cv3.2.2/Conv_output_0")
    assert fused.single_cos is None and not fused.q_zero      # no numbers at all


def test_worst_ranks_model_layers_by_single_cosine(layers):
    top = worst(layers, 3)
    assert [l.name for l in top] == ["sum16_int8", "cls16_int8", "/model.15/cv1/act/Mul_output_0"]
    assert [l.single_cos for l in top] == sorted(l.single_cos for l in top)
    assert all(l.kind not in ("Input", "exDataConvert") for l in worst(layers, 50))   # conversions never compete
    assert len(worst(layers, 10_000)) == sum(1 for l in layers if l.is_layer and l.single_cos is not None)


def test_average_over_images_and_metrics(layers):
    shifted = [l.__class__(l.kind, l.name, *(None if v is None else v - 0.1 for v in
                                             (l.entire_cos, l.entire_euc, l.single_cos, l.single_euc)), q_zero=l.q_zero)
               for l in layers]
    mean = average([layers, shifted])
    assert len(mean) == len({l.name for l in layers})
    conv = next(l for l in mean if l.name == "/model.0/conv/Conv_output_0")
    assert conv.single_cos == pytest.approx(0.99998 - 0.05)
    found = metrics(Analysis(layers, 1, [], Path("log"), "k", False), ["box8", "cls32", "sum16"])
    assert found["accuracy/worst_cosine"] == worst(layers, 1)[0].single_cos
    assert found["accuracy/q_zero_layers"] == sum(l.q_zero for l in layers)
    assert "accuracy/output_cosine/box8" in found and "accuracy/output_cosine/cls32" not in found   # q_zero output
    rows = json.loads(worst_tag(Analysis(layers, 1, [], Path("log"), "k", False), 5))
    assert [r["name"] for r in rows] == [l.name for l in worst(layers, 5)]
    assert len(worst_tag(Analysis(layers * 40, 1, [], Path("log"), "k", False), 10_000)) <= 8000   # an MLflow tag


def test_unknown_layout_is_refused():
    with pytest.raises(StageError, match="pin rknn-toolkit2"):
        parse_error_analysis("[Conv] x 0.9 | 1.0 0.8 | 2.0 0.7 | 3.0\n")
    with pytest.raises(StageError, match="no layer rows"):
        parse_error_analysis("layer_name simulator_error\n")


def test_hybrid_axis_is_validated_and_applies_only_to_int8():
    for bad, error in (({"hybrid": {"layers": -1}}, ConfigError), ({"accuracy": {"images": 0}}, ConfigError),
                       ({"hybrid": {"layers": 2}, "quant_dtype": "w8a16"}, UnsupportedCombination)):
        run = RunConfig()
        for key, value in bad.items():
            if isinstance(value, dict):
                for k, v in value.items():
                    setattr(getattr(run, key), k, v)
            else:
                setattr(run, key, value)
        with pytest.raises(error):
            validate(run)
    fp16 = RunConfig(quantize=False)
    fp16.hybrid.layers = 4
    fp16.accuracy.analysis = True
    plan = spec.plan(fp16)
    assert plan.config.hybrid.layers == 0 and not plan.config.accuracy.analysis
    assert "hybrid.layers" in plan.collapsed and "accuracy.analysis" in plan.collapsed
    int8 = RunConfig()
    int8.hybrid.layers = 4
    assert spec.plan(int8).config.hybrid.layers == 4 and not spec.plan(int8).collapsed


def _run(name: str, quantize: bool, layers: int, mAP: float, tags: dict | None = None) -> RunRecord:
    return RunRecord(name, name, "FINISHED", 0, None, {"quantize": str(quantize), "hybrid.layers": str(layers),
                                                        "resolution": "160"},
                     {"eval/map50_95": mAP, **({"hybrid/layers": float(layers)} if layers else {})}, tags or {})


def test_hybrid_section_recovery_line():
    int8, fp16 = _run("i", True, 0, 0.60), _run("f", False, 0, 0.64)
    hyb = _run("h", True, 2, 0.63, {"rkbench.hybrid.layers": "a,b"})
    assert recovery_line(int8, hyb, fp16) == ("- keeping these 2 layers in float (`a`, `b`) recovers +0.0300 of the "
                                              "0.0400 mAP50-95 lost (75%): int8 0.6000, hybrid 0.6300, fp16 0.6400")
    lines = hybrid_section(Selection("u", "e", None, [int8, hyb, fp16], ["quantize", "hybrid.layers"]))
    rows = [ln for ln in "\n".join(lines).splitlines() if ln.startswith("| ") and not ln.startswith("| precision")]
    assert [r.split("|")[1].strip() for r in rows] == ["int8", "hybrid", "fp16"]
    assert hybrid_section(Selection("u", "e", None, [int8, fp16], ["quantize"])) == []   # no hybrid run: no section



class _Recorder:
    """Stands in for rknn.api.RKNN to check the glue around the two hybrid steps (the real toolkit runs them in
    tests/integration/test_accuracy_study.py): step1 writes the config the toolkit writes, step2 reads it."""

    seen: dict = {}

    def __init__(self, verbose=False):
        pass

    def config(self, **_):
        return 0

    def load_onnx(self, model):
        return 0

    def hybrid_quantization_step1(self, dataset, rknn_batch_size=None):
        Path("model.quantization.cfg").write_text("custom_quantize_layers: {}\nquantize_parameters:\n"
                                                  "    /a_output_0: {dtype: int8}\n    b_int8: {dtype: int8}\n")
        Path("model.model").write_text("m")
        Path("model.data").write_text("d")
        return 0

    def hybrid_quantization_step2(self, model_input, data_input, model_quantization_cfg):
        import yaml
        _Recorder.seen = yaml.safe_load(Path(model_quantization_cfg).read_text())
        return 0 if Path(model_input).exists() and Path(data_input).exists() else -1

    def release(self):
        pass


def test_hybrid_steps_edit_the_generated_config(tmp_path, monkeypatch):
    from rkbench.toolkit import ConvertOptions, _build_hybrid

    monkeypatch.chdir(tmp_path)
    opts = ConvertOptions("rk3588", True, "normal", "channel", "w8a8", 1, hybrid=("b_int8",))
    rknn, step, error, _ = _build_hybrid(_Recorder, tmp_path / "model.onnx", opts, tmp_path / "dataset.txt")
    assert rknn is not None and not error
    assert _Recorder.seen["custom_quantize_layers"] == {"b_int8": "float16"}
    assert "/a_output_0" in _Recorder.seen["quantize_parameters"]
    assert list(tmp_path.iterdir()) == []          # step1's files stay in their temporary folder
    unknown = ConvertOptions("rk3588", True, "normal", "channel", "w8a8", 1, hybrid=("nope",))
    rknn, step, error, machine = _build_hybrid(_Recorder, tmp_path / "model.onnx", unknown, tmp_path / "dataset.txt")
    assert rknn is None and step == "hybrid_quantization_step1" and "nope" in error and not machine
