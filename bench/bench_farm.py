"""hydra/launcher=ray: conversions with 2 workers vs 1, side by side in one run; then a model of the wall
time of N boards x M configurations, built from job times measured on a farm of emulated boards.

    python bench/bench_farm.py [--sweep "resolution=256,320 algo=normal,kl_divergence,mmse"] [--skip-farm]

1. host: the same conversion-heavy sweep, cold (own empty cache and store), on a local Ray cluster with
   1 CPU slot and then with 2 (`hydra.launcher.num_cpus`); both include Ray's start and the workers'
   imports. Speed-up = wall(1) / wall(2). On a 2-core machine shared with other work, expect less than 2.
2. farm: one sweep of 6 configurations (C++ runner, conversion on the host, latency + eval on the board)
   on 3 emulated boards (two rk3588, one rk3566) behind a private adb server. From it: each job's time
   (its MLflow run, start to end) and the fixed cost (Ray start, imports: wall minus the jobs' span).
   The model schedules M jobs (longest first) on the CPU slots, each job holding a slot and a free board of
   its SoC for its whole time (as the launcher does), plus the fixed cost; with the measured job times it is
   checked against the measured wall at N=3, M=6, then run for N rk3588 boards x M configurations that
   each convert their own model (board part and conversion time as measured). Emulated boards run ONNX Runtime / a replay stand-in, not an NPU: the board part of a
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


def job_times(db: Path) -> tuple[float, list[dict]]:
    """The span of a sweep's config runs (first start to last end) and, per run, its SoC, seconds and
    conversion seconds (convert/build_s, measured on this host when it was built), from its MLflow store."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{db}")
    runs = client.search_runs([client.get_experiment_by_name("rkbench").experiment_id], "tags.`rkbench.kind` = 'config'")
    span = (max(r.info.end_time for r in runs) - min(r.info.start_time for r in runs)) / 1000
    return span, [{"soc": r.data.params["platform"], "seconds": (r.info.end_time - r.info.start_time) / 1000,
                   "convert_s": r.data.metrics.get("convert/build_s", 0.0),
                   "converted": "convert" in r.data.tags.get("rkbench.cache.misses", "").split(",")} for r in runs]


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
    print(f"host, cold sweep `{spec}` (simulator target, 4 images), measured on this machine ({os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.1f} at the end):")
    for cpus in (1, 2):
        span, jobs = job_times(work / f"cpus{cpus}" / "mlflow.db")
        busy = sum(j["seconds"] for j in jobs)
        print(f"  {cpus} Ray worker(s): wall {walls[cpus]:6.1f} s; jobs' span {span:6.1f} s, sum of job times {busy:6.1f} s "
              f"(concurrency {busy / span:.2f}), conversions {sum(j['convert_s'] for j in jobs):.1f} s")
    print(f"  speed-up (wall, 1 worker / 2 workers) {walls[1] / walls[2]:.2f}x")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def farm_jobs(work: Path) -> tuple[float, float, list[dict]]:
    """A 6-configuration farm sweep on 3 emulated boards: its wall time and job_times()."""
    import adbutils
    import yaml

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
    span, jobs = job_times(work / "mlflow.db")
    return wall, span, jobs


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
    print("  job times (host export/conversion + emulated board; * = built the conversion): "
          + ", ".join(f"{j['soc']} {j['seconds']:.1f} s{'*' if j['converted'] else ''}" for j in jobs))
    measured = [(j["soc"], j["seconds"]) for j in jobs]
    print(f"  the model with these times at N=3, M=6: {model(fixed, measured, {'rk3588': 2, 'rk3566': 1}, 6, 3):.1f} s "
          f"(measured {wall:.1f} s)")
    # every configuration of a real sweep converts its own model: a job = the board part of a job that found
    # its .rknn in the cache + a conversion as measured here
    board = min(j["seconds"] for j in jobs if not j["converted"] and j["soc"] == "rk3588")
    convert = max(j["convert_s"] for j in jobs)
    job = [("rk3588", board + convert)]
    sizes = (6, 24, 96, 384)
    print(f"\nmodel (simulated): N rk3588 boards, M configurations, each job {board:.1f} s on the board (measured, "
          f"emulated) + {convert:.1f} s conversion (measured, 64 px) holding a CPU slot and its board; wall in minutes:")
    print("  " + "N boards x CPU slots".ljust(26) + "".join(f"M={m:<9d}" for m in sizes))
    for n in (1, 2, 4, 8, 16):
        slots = {n: "1 per board", os.cpu_count() or 2: "this host"}
        if n == (os.cpu_count() or 2):
            slots[n] = "both"
        for cpus, label in sorted(slots.items()):
            row = [model(fixed, job, {"rk3588": n}, m, cpus) / 60 for m in sizes]
            print(f"  {n:>2} x {cpus:<3} ({label})".ljust(28) + "".join(f"{w:<11.2f}" for w in row))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sweep", default="resolution=256,320 algo=normal,kl_divergence,mmse")
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
