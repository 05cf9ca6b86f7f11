"""Cold vs warm sweep, measured side by side in one run, then post-processing cost per image.

    python bench/bench_sweep.py [--images N] [--sweep "resolution=320,640 algo=normal,kl_divergence"]

1. cold: empty cache, empty MLflow store -> every export, conversion and evaluation runs;
2. warm, resume: the same command again -> every configuration is reused (identity match; one earlier
   sweep holds them all, so it is decided from the sqlite store without MLflow or a Hydra launch);
3. warm, resume=false: every configuration is measured again, every stage a cache hit;
4. the resume run once more under `python -X importtime`, untimed: which heavy modules the reuse path
   imported (it should import neither torch nor rknn-toolkit2).
Each is a fresh `python -m rkbench` process, so start-up (imports, Hydra, MLflow) is included.
Target (issue: one run spec): the resumed card sweep >= 20x faster than its cold run."""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import bench_postprocess  # beside this file

ROOT = Path(__file__).resolve().parent.parent
HEAVY = ("torch", "rknn.api", "ultralytics", "onnxslim")


def timed(cmd: list[str], cwd: Path) -> tuple[float, str, str]:
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    if proc.returncode not in (0, 1):
        sys.exit(f"command failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stderr[-2000:]}")
    return elapsed, proc.stdout, proc.stderr


def imported(importtime_log: str) -> list[str]:
    names = {line.split("|")[-1].strip() for line in importtime_log.splitlines() if line.startswith("import time:")}
    return [m for m in HEAVY if m in names]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=None, help="evaluation images per configuration (default: all 48)")
    ap.add_argument("--sweep", default="resolution=320,640 algo=normal,kl_divergence")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        base = [sys.executable, "-m", "rkbench", "-m", *args.sweep.split(), f"cache_dir={work / 'cache'}",
                f"tracking.uri=sqlite:///{work / 'mlflow.db'}", f"hydra.sweep.dir={work / 'multirun'}"]
        base += [f"dataset.limit={args.images}"] if args.images else []
        # The demo dataset is generated once up front so that the cold run times the pipeline only.
        subprocess.run([sys.executable, "-c", "from rkbench.data.demo import demo_dataset; from pathlib import Path; "
                        f"demo_dataset(Path({str(work / 'cache' / 'datasets' / 'demo')!r}))"], cwd=ROOT, check=True)
        cold, out_cold, _ = timed(base, ROOT)
        resume, out_resume, _ = timed(base, ROOT)
        rerun, out_rerun, _ = timed(base + ["resume=false"], ROOT)
        _, _, log = timed([sys.executable, "-X", "importtime", *base[1:]], ROOT)
    n = out_cold.count("FINISHED")
    print(f"sweep: {args.sweep} ({n} configurations, {args.images or 'all'} images each, host {sys.platform})")
    print(f"cold (all stages run)            {cold:8.1f} s")
    print(f"warm, resume (all reused)        {resume:8.1f} s   cold/warm = {cold / resume:6.1f}x   "
          f"(target >= 20x; {out_resume.count('REUSED')} REUSED)")
    print(f"warm, resume=false (cache hits)  {rerun:8.1f} s   cold/warm = {cold / rerun:6.1f}x")
    print(f"conversions: cold {out_cold.count('convert:miss')}, resume {out_resume.count('convert:miss')}, "
          f"resume=false {out_rerun.count('convert:miss')}")
    print(f"heavy imports on the resume path: {', '.join(imported(log)) or 'none'} (of {', '.join(HEAVY)})")
    print()
    print("\n".join(bench_postprocess.measure()))


if __name__ == "__main__":
    main()
