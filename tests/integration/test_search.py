"""Search, not only grid (experiments/search.yaml, rkbench/search.py): optuna through hydra-optuna-sweeper
picks the trials, each job returns the value optuna minimises, the trials are logged like any sweep and
the report has a Search section with the best configuration. The tiny search runs the real demo on the
rknn-toolkit2 simulator, so its latency is simulator time and must say so."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from rkbench import search

SIM = "latency/simulator_infer_ms_p50"


def trial(name: str, map50_95: float, ms: float) -> SimpleNamespace:
    return SimpleNamespace(name=name, run_id=name, metrics={"eval/map50_95": map50_95, SIM: ms,
                                                           "latency/host_infer_ms_p50": ms / 10})


def test_the_objective_is_the_latency_where_measured_when_the_target_is_met():
    assert search.objective(trial("a", 0.71, 42.0).metrics, 0.7) == 42.0          # simulator, not the host's
    slow_miss, close_miss = (search.objective(trial(n, m, 1.0).metrics, 0.7) for n, m in (("b", 0.2), ("c", 0.69)))
    assert 1e9 > slow_miss > close_miss > 42.0 * 1000                              # a miss loses to any hit
    failed = (search.objective({"eval/map50_95": 0.9}, 0.7), search.objective({SIM: 3.0}, 0.7))  # no latency / mAP
    assert failed[0] == failed[1] > search.objective({"eval/map50_95": 0.0, SIM: 1.0}, 1.0)      # worst of all


def test_best_is_the_fastest_trial_that_meets_the_target_and_says_where_it_was_timed():
    trials = [trial("fast but poor", 0.5, 10.0), trial("slow", 0.8, 90.0), trial("ok", 0.72, 40.0)]
    found = search.best(trials, 0.7)
    assert (found.name, found.latency_ms, found.latency_metric) == ("ok", 40.0, SIM)
    assert "simulator time: not NPU latency" in found.line()
    assert search.best(trials, 0.9) is None


def test_the_search_study_composes_its_whole_space_for_preflight(tmp_path, monkeypatch):
    from rkbench.cli import preflight

    monkeypatch.chdir(tmp_path)    # preflight loads the demo dataset into ./.rkbench_cache
    runs, _, swept, trials = preflight(["+experiment=search", "-m"])
    assert len(runs) == 5 * 3 * 2 and trials == 8 and swept == ["resolution", "algo", "quant_method"]
    assert {(r.study, r.search.min_map50_95, r.tracking.experiment) for r in runs} == {("search", 0.75, "search")}


@pytest.mark.slow
def test_a_tiny_search_on_the_demo_logs_its_trials_and_reports_the_best(tmp_path: Path, monkeypatch, capsys):
    from mlflow.tracking import MlflowClient

    from rkbench.__main__ import main

    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    target = 0.3     # int8 demo at 4 images: mAP50-95 ~0.05 at 64 px, ~0.28 at 96, ~0.45 at 128 (seed 0 tries 96 and 128)
    args = ["+experiment=search", "-m", f"tracking.uri={uri}", f"cache_dir={tmp_path / 'cache'}", "dataset.limit=4",
            "calib.size=4", "algo=normal", "quant_method=channel", "resolution=choice(64,96,128)",
            f"search.min_map50_95={target}", "hydra.sweeper.n_trials=3"]
    assert main(args) == 0
    out = capsys.readouterr().out

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("search")
    [parent] = client.search_runs([exp.experiment_id], "tags.`rkbench.kind` = 'sweep'")
    children = client.search_runs([exp.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert parent.info.status == "FINISHED" and len(children) == 3 and "configuration 3/3" in out
    assert {c.data.tags["rkbench.status"] for c in children} <= {"FINISHED", "REUSED"}
    assert parent.data.tags["rkbench.search.min_map50_95"] == str(target) and parent.data.metrics["search/trials"] == 3
    assert "search.min_map50_95" not in children[0].data.params     # how runs are scored, not what they measured

    # the best: the fastest child meeting the target, worked out here from the logged metrics
    met = [c for c in children if c.data.metrics["eval/map50_95"] >= target]
    assert 0 < len(met) < len(children), "the search should have both met and missed the target"
    best = min(met, key=lambda c: c.data.metrics[SIM])
    assert parent.data.metrics["search/simulator_infer_ms_p50"] == best.data.metrics[SIM]
    assert parent.data.tags["rkbench.search.best"].startswith(f"{best.info.run_name} (")
    # optuna was told the same values: its best trial is that one
    result = yaml.safe_load((tmp_path / parent.data.tags["rkbench.sweep_dir"] / "optimization_results.yaml").read_text())
    assert result["best_value"] == pytest.approx(best.data.metrics[SIM])
    assert best.info.run_name == f"demo_yolov8n {result['best_params']['resolution']}"

    assert main(["report", "--tracking-uri", uri, "--experiment", "search", "--out", str(tmp_path / "r"),
                 "--no-plots"]) == 0
    [md] = (tmp_path / "r").glob("*.md")
    text = md.read_text()
    section = text.split("## Search", 1)[1].split("\n## ", 1)[0]
    assert f"**Best:** {best.info.run_name}" in section and "simulator time: not NPU latency" in section
    assert section.count("| no ") == len(children) - len(met)
