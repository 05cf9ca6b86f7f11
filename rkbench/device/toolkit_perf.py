"""PC-side per-layer times and memory of a .rknn on a real board, through rknn-toolkit2's
connected-board mode (rknn_server on the board): eval_perf (perf_debug) and eval_memory."""

from __future__ import annotations

import csv
import json
import logging
import re
from pathlib import Path
from typing import Any, Callable, Optional

from rkbench.errors import DeviceError

log = logging.getLogger("rkbench.board")


_LAYER_HEADER = re.compile(r"^\s*ID\s+OpType\b")
_TOTAL_US = re.compile(r"Total Operator Elapsed (?:Per Frame )?Time\(us\)\s*:\s*([\d.]+)")


def perf_rows(perf: Any) -> list[dict[str, str]]:
    """Per-layer rows of eval_perf's result: the printed layer table (ID OpType ... FullName), or the first
    list of per-layer dicts in a dict result."""
    if isinstance(perf, dict):
        for value in perf.values():
            items = value if isinstance(value, list) else list(value.values()) if isinstance(value, dict) else []
            if items and all(isinstance(i, dict) for i in items):
                return [{str(k): str(v) for k, v in i.items()} for i in items]
        return []
    rows: list[dict[str, str]] = []
    columns: Optional[list[str]] = None
    for line in str(perf or "").splitlines():
        if columns is None:
            if _LAYER_HEADER.match(line):
                columns = line.split()
            continue
        parts = line.split()
        if not parts or not parts[0].isdigit():
            if rows:
                break                      # the table ends at its closing rule
            continue
        head = parts[:len(columns) - 1]
        rows.append(dict(zip(columns, head + [" ".join(parts[len(columns) - 1:])])))
    return rows


def perf_total_ms(perf: Any, rows: list[dict[str, str]]) -> Optional[float]:
    """Total per-frame operator time: the printed total, else the sum of the layers' Time(us)."""
    match = _TOTAL_US.search(perf if isinstance(perf, str) else json.dumps(perf, default=str))
    if match:
        return float(match.group(1)) / 1e3
    times = [r.get("Time(us)", "") for r in rows]
    if times and all(re.fullmatch(r"[\d.]+", t) for t in times):
        return sum(float(t) for t in times) / 1e3
    return None


def memory_metrics(detail: Any) -> dict[str, float]:
    """eval_memory's byte counts (rknn-toolkit2 2.x keys) -> memory/{weight,internal,other,total}_mib."""
    if not isinstance(detail, dict):
        return {}
    weight, internal, total = (detail.get(k) for k in ("total_weight_allocation", "total_internal_allocation",
                                                         "total_model_allocation"))
    out = {name: float(v) / 2**20 for name, v in (("memory/weight_mib", weight), ("memory/internal_mib", internal),
                                                  ("memory/total_mib", total)) if isinstance(v, (int, float))}
    if len(out) == 3:
        out["memory/other_mib"] = out["memory/total_mib"] - out["memory/weight_mib"] - out["memory/internal_mib"]
    return out


def _eval_perf(rknn: Any, dmc: bool) -> tuple[Any, bool]:
    """eval_perf with frequencies fixed; where that fails on a board without /sys/class/devfreq/dmc (the
    toolkit reads dmc/cur_freq to fix them), again without. Returns (result, frequencies fixed)."""
    try:
        perf = rknn.eval_perf(is_print=False, fix_freq=True)
        error = "" if perf is not None else "returned nothing"
    except Exception as exc:  # noqa: BLE001 - the toolkit raises bare Exceptions from its board link
        perf, error = None, f"{type(exc).__name__}: {exc}"
    if perf is not None:
        return perf, True
    if dmc and "dmc" not in error and "cur_freq" not in error:
        raise DeviceError(f"rknn-toolkit2 eval_perf failed ({error}): check rknn_server runs on the board and "
                          "matches librknnrt (`python -m rkbench doctor`)")
    log.warning("eval_perf with fix_freq=True failed (%s); the board has no dmc devfreq node: again with fix_freq=False", error)
    try:
        perf = rknn.eval_perf(is_print=False, fix_freq=False)
    except Exception as exc:  # noqa: BLE001
        raise DeviceError(f"rknn-toolkit2 eval_perf failed even with fix_freq=False ({type(exc).__name__}: {exc}): "
                          "check rknn_server on the board (`python -m rkbench doctor`)") from exc
    if perf is None:
        raise DeviceError("rknn-toolkit2 eval_perf returned nothing with fix_freq=False: check rknn_server on the board")
    return perf, False


def toolkit_perf(rknn_path: Path, platform: str, device_id: str, dmc: bool, out_dir: Path,
                 make_rknn: Optional[Callable[[], Any]] = None) -> tuple[dict[str, float], dict[str, str], list[Path]]:
    """PC-side per-layer times and memory through rknn-toolkit2's connected-board mode (rknn_server on the
    board). Returns (metrics, tags, files to attach)."""
    if make_rknn is None:
        from rknn.api import RKNN
        make_rknn = RKNN
    rknn = make_rknn()
    try:
        if rknn.load_rknn(str(rknn_path)) != 0:
            raise DeviceError(f"rknn-toolkit2 could not load {rknn_path}: convert it again with this toolkit")
        if rknn.init_runtime(target=platform, device_id=device_id, perf_debug=True, eval_mem=True) != 0:
            raise DeviceError(f"rknn-toolkit2 init_runtime(target={platform}, device_id={device_id}) failed: start "
                              "rknn_server on the board (same release as librknnrt; `python -m rkbench doctor`)")
        perf, fixed = _eval_perf(rknn, dmc)
        try:
            memory = rknn.eval_memory(is_print=False)
        except Exception as exc:  # noqa: BLE001
            raise DeviceError(f"rknn-toolkit2 eval_memory failed ({type(exc).__name__}: {exc}): check rknn_server "
                              "on the board (`python -m rkbench doctor`)") from exc
    finally:
        rknn.release()
    out_dir.mkdir(parents=True, exist_ok=True)
    raw = out_dir / "eval_perf.txt"
    raw.write_text(perf if isinstance(perf, str) else json.dumps(perf, indent=1, default=str))
    files = [raw]
    rows = perf_rows(perf)
    metrics = memory_metrics(memory)
    if rows:
        table = out_dir / "eval_perf_layers.csv"
        columns = list(dict.fromkeys(k for r in rows for k in r))
        with table.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=columns)
            writer.writeheader()
            writer.writerows(rows)
        files.append(table)
        metrics["perf/board_layers"] = float(len(rows))
    total = perf_total_ms(perf, rows)
    if total is not None:
        metrics["perf/board_layers_total_ms"] = total
    tags = {"rkbench.toolkit_perf": "eval_perf (perf_debug: per-layer times, slower than a normal run) and "
                                    "eval_memory through rknn-toolkit2 and rknn_server",
            "rkbench.toolkit_perf.fix_freq": "true" if fixed else
            "false: the board has no /sys/class/devfreq/dmc/cur_freq, frequencies were not fixed"}
    if not memory_metrics(memory):
        tags["rkbench.toolkit_memory"] = json.dumps(memory, default=str)[:4000]
    return metrics, tags, files
