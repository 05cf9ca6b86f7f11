"""The accuracy and hybrid studies end to end on the demo, reduced (160 px, 6 images, 4 calibration images, one
analysed image): real Hydra composition of experiments/, real rknn-toolkit2 2.5.0 (accuracy_analysis,
hybrid_quantization_step1/2, its simulator), MLflow in tmp_path, then their report sections checked for shape."""

from __future__ import annotations

import json
import re

import pytest
from mlflow.tracking import MlflowClient

from rkbench.__main__ import main
from rkbench.report import build_report
from rkbench.stages.accuracy import parse_error_analysis, worst

pytestmark = pytest.mark.slow

KEPT = 2     # hybrid.layers in the reduced sweep


def common(work) -> list[str]:
    return [f"cache_dir={work / 'cache'}", f"tracking.uri=sqlite:///{work / 'mlflow.db'}", "resolution=160",
            "dataset.limit=6", "calib.size=4", "accuracy.images=1"]


@pytest.fixture(scope="module")
def studies(tmp_path_factory):
    """Both studies into one store and one cache (the hybrid study reuses the accuracy study's export)."""
    work = tmp_path_factory.mktemp("studies")
    mp = pytest.MonkeyPatch()
    mp.chdir(work)
    try:
        assert main(["+experiment=accuracy", "-m", "algo=normal", "accuracy.top_k=5"] + common(work)) == 0
        assert main(["+experiment=hybrid", "-m", f"hybrid.layers=0,{KEPT}"] + common(work)) == 0
    finally:
        mp.undo()
    return work


def _configs(work, experiment: str):
    client = MlflowClient(tracking_uri=f"sqlite:///{work / 'mlflow.db'}")
    exp = client.get_experiment_by_name(experiment)
    return client, client.search_runs([exp.experiment_id], "tags.`rkbench.kind` = 'config'")


def test_accuracy_study_logs_real_per_layer_numbers(studies):
    client, [run] = _configs(studies, "accuracy")
    m, tags = run.data.metrics, run.data.tags
    assert 0.0 < m["accuracy/worst_cosine"] < 1.0 and m["accuracy/layers"] > 100
    assert m["accuracy/worst_entire_cosine"] <= 1.0
    assert {f"accuracy/output_cosine/{o}" for o in ("box8", "cls8", "box16")} <= set(m)
    # the raw file the toolkit wrote is the run's artifact, and the metrics come from it
    raw = client.download_artifacts(run.info.run_id, "accuracy/0_error_analysis.txt", str(studies))
    layers = parse_error_analysis(open(raw).read())
    assert m["accuracy/worst_cosine"] == pytest.approx(worst(layers, 1)[0].single_cos)
    assert [r["name"] for r in json.loads(tags["rkbench.accuracy.worst"])] == [l.name for l in worst(layers, 5)]


def test_hybrid_study_keeps_the_worst_layers_in_float(studies):
    _, accuracy_runs = _configs(studies, "accuracy")
    worst_names = [r["name"] for r in json.loads(accuracy_runs[0].data.tags["rkbench.accuracy.worst"])]
    _, runs = _configs(studies, "hybrid")
    by = {(r.data.params["quantize"], r.data.params["hybrid.layers"]): r for r in runs}
    assert set(by) == {("True", "0"), ("True", str(KEPT)), ("False", "0")}   # fp16 x N collapsed into fp16
    hybrid = by[("True", str(KEPT))]
    assert hybrid.data.tags["rkbench.hybrid.layers"].split(",") == worst_names[:KEPT]
    assert hybrid.data.metrics["hybrid/layers"] == KEPT
    int8 = by[("True", "0")]
    assert hybrid.data.tags["rkbench.cache.convert"] != int8.data.tags["rkbench.cache.convert"]   # another .rknn
    for r in by.values():
        assert 0.0 < r.data.metrics["eval/map50_95"] <= 1.0


def test_report_sections_have_the_tables_shape(studies):
    uri = f"sqlite:///{studies / 'mlflow.db'}"
    text = build_report(uri, "accuracy", studies / "reports").read_text()
    section = text.split("## Per-layer accuracy")[1].split("\n## ")[0]
    header = "| rank | layer | op | single cos | single euc | entire cos | entire euc |"
    table = section.split("|   rank", 1)[1].split("\n\n")[0].splitlines()
    table[0] = "|   rank" + table[0]
    assert re.sub(r"\s+", " ", table[0]) == header
    assert len(table) == 2 + 5                                    # header, rule, top_k rows
    assert all(re.fullmatch(r"0\.\d{5}|1\.00000", ln.split("|")[4].strip()) for ln in table[2:])   # 5 decimals
    [png] = re.findall(r"!\[worst layers of [^\]]+\]\(([^)]+)\)", section)
    assert (studies / "reports" / png).stat().st_size > 0
    assert "Accumulated (entire) cosine at each model output" in section

    text = build_report(uri, "hybrid", studies / "reports").read_text()
    section = text.split("## int8 vs hybrid vs fp16")[1].split("\n## ")[0]
    rows = [ln.split("|")[1].strip() for ln in section.splitlines() if ln.startswith("| ")]
    assert rows == ["precision", "int8", "hybrid", "fp16"]
    assert re.search(rf"- keeping these {KEPT} layers in float \(`[^)]+`\) recovers [+-]\d\.\d{{4}} of the "
                     r"-?\d\.\d{4} mAP50-95 lost", section)



def test_a_link_run_carries_the_per_layer_and_hybrid_tags(studies):
    """A configuration reused in a later sweep is a link run: it must still fill the report's sections."""
    from rkbench.tracking import tracker_for

    tracker = tracker_for(f"sqlite:///{studies / 'mlflow.db'}", "hybrid")
    _, runs = _configs(studies, "hybrid")
    [measured] = [r for r in runs if r.data.params["hybrid.layers"] == str(KEPT)]
    link = tracker.link(measured, "again", tracker.start("sweep", {"rkbench.kind": "sweep"}), {})
    tags = tracker.client.get_run(link).data.tags
    assert tags["rkbench.hybrid.layers"] == measured.data.tags["rkbench.hybrid.layers"]
