"""notebooks/compare_runs.ipynb executed against a real sweep, so it cannot rot: two sweeps through the real
entry point (ONNX Runtime target, no toolkit, 6 images), then the notebook run by nbclient on a kernel of
this interpreter, pointed at the first sweep through its environment variables."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import nbformat
from ipykernel.kernelspec import write_kernel_spec
from jupyter_client.kernelspec import KernelSpecManager
from mlflow.tracking import MlflowClient
from nbclient import NotebookClient

import rkbench
from rkbench.__main__ import main

ROOT = Path(rkbench.__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks" / "compare_runs.ipynb"
KERNEL = "rkbench-test"


def sweeps(uri: str) -> list[str]:
    """Sweep (parent) run ids, oldest first."""
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("rkbench")
    runs = client.search_runs([exp.experiment_id], "tags.`rkbench.kind` = 'sweep'", order_by=["attributes.start_time ASC"])
    return [r.info.run_id for r in runs]


def use_this_python(tmp_path: Path, monkeypatch) -> None:
    """A kernel spec for sys.executable, found first through JUPYTER_PATH: neither a user's nor the
    system's `python3` kernel (perhaps another Python) is picked, and a fresh venv from
    `pip install -e '.[test]'` needs no registration step."""
    write_kernel_spec(tmp_path / "kernels" / KERNEL)
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path))
    # connection files and the IPython profile in tmp_path too: no startup script of the user's runs
    monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(tmp_path / "runtime"))
    monkeypatch.setenv("IPYTHONDIR", str(tmp_path / "ipython"))
    assert KernelSpecManager().get_kernel_spec(KERNEL).argv[0] == sys.executable


def outputs(nb, kind: str) -> list[str]:
    """Every output of one MIME type (or stream text) in cell order."""
    found = []
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            if kind == "stream" and out.output_type == "stream":
                found.append(out.text)
            elif kind in out.get("data", {}):
                found.append(out.data[kind])
    return found


def test_notebook_shows_one_sweep(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    common = ["target=onnxruntime", "dataset.limit=6", f"cache_dir={tmp_path / 'cache'}", f"tracking.uri={uri}"]
    assert main(["-m", "resolution=96,128", "eval.iou=0.6,0.7"] + common) == 0
    # a later sweep in the same experiment: its rows must not show up in the first sweep's notebook
    assert main(["-m", "resolution=96", "eval.iou=0.5"] + common) == 0
    first, later = sweeps(uri)

    # The kernel inherits this environment: the notebook's parameters and this checkout's rkbench.
    monkeypatch.setenv("RKBENCH_TRACKING_URI", uri)
    monkeypatch.setenv("RKBENCH_EXPERIMENT", "rkbench")
    monkeypatch.setenv("RKBENCH_SWEEP", first)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT)] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    use_this_python(tmp_path, monkeypatch)
    nb = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(nb, kernel_name=KERNEL, timeout=300, resources={"metadata": {"path": str(tmp_path)}}).execute()

    assert not [o for c in nb.cells for o in c.get("outputs", []) if o.output_type == "error"]
    text = "".join(outputs(nb, "stream"))
    assert f"({first}), 4 configuration runs" in text and later not in text
    assert "swept axes: eval.iou, resolution" in text
    runs_table = outputs(nb, "text/html")[0]
    # one header row and the first sweep's four configurations; the later sweep's eval.iou=0.5 is not there
    assert runs_table.count("<tr") == 1 + 4
    assert "<td>0.6</td>" in runs_table and "<td>0.7</td>" in runs_table and "<td>0.5</td>" not in runs_table
    pivots = outputs(nb, "text/markdown")
    assert any(t.startswith("**eval/map50_95** by ") and "resolution" in t.splitlines()[0] and "128" in t for t in pivots)
    assert any(t.startswith("**Pareto front, latency/host_infer_ms_p50**") for t in pivots)
    # one plot per pivot table, then the latency vs mAP plot
    assert len(outputs(nb, "image/png")) == len(pivots)
    assert all(png.startswith("iVBORw0KGgo") for png in outputs(nb, "image/png"))     # base64 of the PNG header
