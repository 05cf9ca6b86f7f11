"""hydra/launcher=ray: conversions with 2 workers vs 1, side by side in one run; then a model of the wall
time of N boards x M configurations, built from job times measured on a farm of emulated boards.

    python bench/bench_farm.py [--sweep "resolution=256,320 algo=normal,kl_divergence"] [--skip-farm]

1. host: the same conversion-heavy sweep, cold (own empty cache and store), on a local Ray cluster with
   1 CPU slot and then with 2 (`hydra.launcher.num_cpus`); both include Ray's start and the workers'
   imports. Speed-up = wall(1) / wall(2). On a 2-core machine shared with other work, expect less than 2.
2. farm: one sweep of 6 configurations (C++ runner, conversion on the host, latency + eval on the board)
   on 3 emulated boards (two rk3588, one rk3566) behind a private adb server. From it: each job's time
   (its MLflow run, start to end) and the fixed cost (Ray start, imports: wall minus the jobs' span).
   The model schedules M jobs (durations cycled from the measured ones, longest first) on min(N, CPUs)
   slots, each job needing a free board of its SoC, plus the fixed cost; it is checked against the measured
   wall at N=3, M=6. Emulated boards run ONNX Runtime / a replay stand-in, not an NPU: the board part of a
   real job is longer, the host part (conversion) is the same."""

from __future__ import annotations

import argparse
import heapq
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def sweep(args: list[str], cwd: Path) -> float:
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "rkbench", "-m", "hydra/launcher=ray", *args], cwd=cwd,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"sweep failed ({proc.returncode}): {' '.join(args)}\n{proc.stdout[-1500:]}\n{proc.stderr[-2000:]}")
    return time.perf_counter() - start


def host_speedup(spec: str, work: Path) -> None:
    demo = work / "demo"
    subprocess.run([sys.executable, "-c", "from rkbench.data.demo import demo_dataset; from pathlib import Path; "
                    f"demo_dataset(Path({str(demo)!r}))"], cwd=ROOT, check=True)
    walls = {}
    for cpus in (1, 2):
        run = work / f"cpus{cpus}"
        walls[cpus] = sweep([*spec.split(), f"hydra.launcher.num_cpus={cpus}", f"cache_dir={run / 'cache'}",
                             f"tracking.uri=sqlite:///{run / 'mlflow.db'}", f"dataset.root={demo}", "dataset.limit=4",
                             "eval.float_reference=false", f"hydra.sweep.dir={run / 'multirun'}"], ROOT)
    print(f"host, cold sweep `{spec}` (simulator target, 4 images), measured on this machine ({os.cpu_count()} CPUs):")
    print(f"  1 Ray worker  {walls[1]:7.1f} s\n  2 Ray workers {walls[2]:7.1f} s\n  speed-up      {walls[1] / walls[2]:7.2f}x")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def farm_jobs(work: Path) -> tuple[float, float, list[tuple[str, float]]]:
    """A 6-configuration farm sweep on 3 emulated boards: its wall time, the span of its jobs (first start to
    last end, from MLflow) and each job's (SoC, seconds)."""
    import adbutils
    import yaml
    from mlflow.tracking import MlflowClient

    from rkbench.device.emulator import EmulatedBoard

    port = free_port()
    env = {**os.environ, "HOME": str(work / "adb-home"), "ANDROID_ADB_SERVER_PORT": str(port)}
    (work / "adb-home").mkdir()
    adb = [adbutils.adb_path(), "-P", str(port)]
    subprocess.run(adb + ["start-server"], env=env, check=True, capture_output=True)
    boards = {"rk3588-a": "rk3588", "rk3588-b": "rk3588", "rk3566-a": "rk3566"}
    cases = [("rk3588", m) for m in ("0_1_2", "0_1", "0", "auto")] + [("rk3566", m) for m in ("0", "auto")]
    started = [EmulatedBoard(work / name, soc=soc, librknnrt_version="2.5.0") for name, soc in boards.items()]
    try:
        for b in started:
            b.start()
        conf = work / "conf"
        (conf / "farm").mkdir(parents=True)
        (conf / "experiment").mkdir()
        (conf / "farm" / "bench.yaml").write_text(yaml.safe_dump({"adb_port": port, "boards": [
            {"name": name, "soc": b.soc, "address": b.serial} for name, b in zip(boards, started)]}))
        for soc, mask in cases:
            (conf / "experiment" / f"{soc}_{mask}.yaml").write_text(f"# @package _global_\nplatform: {soc}\ncore_mask: '{mask}'\n")
        os.environ["ANDROID_ADB_SERVER_PORT"] = str(port)
        wall = sweep(["hydra.launcher.num_cpus=3", f"hydra.searchpath=[file://{conf}]", "farm=bench",
                      "+experiment=" + ",".join(f"{s}_{m}" for s, m in cases), f"cache_dir={work / 'cache'}",
                      f"tracking.uri=sqlite:///{work / 'mlflow.db'}", "target=board", "runner=cpp", "resolution=64",
                      "dataset.limit=4", "calib.size=2", "eval.float_reference=false", "measure.modes=[latency,eval]",
                      "measure.iterations=5", "measure.min_seconds=0.2", f"hydra.sweep.dir={work / 'multirun'}"], work)
    finally:
        for b in started:
            b.stop()
        subprocess.run(adb + ["kill-server"], env=env, capture_output=True)
    client = MlflowClient(tracking_uri=f"sqlite:///{work / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("rkbench").experiment_id],
                              "tags.`rkbench.kind` = 'config'")
    span = (max(r.info.end_time for r in runs) - min(r.info.start_time for r in runs)) / 1000
    return wall, span, [(r.data.params["platform"], (r.info.end_time - r.info.start_time) / 1000) for r in runs]


def model(fixed: float, jobs: list[tuple[str, float]], boards: dict[str, int], configs: int, cpus: int) -> float:
    """Greedy list scheduling, longest job first: a job starts when a CPU slot and a board of its SoC are free."""
    todo = sorted((jobs[i % len(jobs)] for i in range(configs)), key=lambda j: -j[1])
    free = {soc: [0.0] * n for soc, n in boards.items()}         # when each board is next free
    slots = [0.0] * min(cpus, sum(boards.values()))
    heapq.heapify(slots)
    end = 0.0
    for soc, seconds in todo:
        slot = heapq.heappop(slots)
        board = min(range(len(free[soc])), key=lambda i: free[soc][i])
        finish = max(slot, free[soc][board]) + seconds
        free[soc][board] = finish
        heapq.heappush(slots, finish)
        end = max(end, finish)
    return fixed + end


def farm_model(work: Path) -> None:
    wall, span, jobs = farm_jobs(work)
    fixed = wall - span
    print("\nfarm, measured on 3 emulated boards (2x rk3588, 1x rk3566), 6 configurations, 3 Ray CPU slots:")
    print(f"  wall {wall:.1f} s = fixed cost (process start, Ray start, worker imports) {fixed:.1f} s + jobs' span {span:.1f} s")
    print("  job times (host conversion + emulated board): " + ", ".join(f"{soc} {s:.1f} s" for soc, s in sorted(jobs)))
    print(f"  the model at N=3, M=6: {model(fixed, jobs, {'rk3588': 2, 'rk3566': 1}, 6, 3):.1f} s (measured {wall:.1f} s)")
    rk3588 = [j for j in jobs if j[0] == "rk3588"]
    sizes = (6, 24, 96, 384)
    print("\nmodel (simulated from the rk3588 job times above; N rk3588 boards, M configurations), wall in minutes:")
    print("  " + "N boards x CPU slots".ljust(26) + "".join(f"M={m:<9d}" for m in sizes))
    for n in (1, 2, 4, 8, 16):
        for cpus, label in ((os.cpu_count() or 2, "this host"), (n, "1 per board")):
            row = [model(fixed, rk3588, {"rk3588": n}, m, cpus) / 60 for m in sizes]
            print(f"  {n:>2} x {cpus:<3} ({label})".ljust(28) + "".join(f"{w:<11.1f}" for w in row))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sweep", default="resolution=256,320 algo=normal,kl_divergence")
    ap.add_argument("--skip-farm", action="store_true")
    ap.add_argument("--skip-host", action="store_true")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        if not args.skip_host:
            host_speedup(args.sweep, Path(tmp) / "host")
        if not args.skip_farm:
            (Path(tmp) / "farm").mkdir()
            farm_model(Path(tmp) / "farm")


if __name__ == "__main__":
    main()
