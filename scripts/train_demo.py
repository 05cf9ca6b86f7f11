"""Train the shipped demo detector (rkbench/assets/demo_yolov8n.pt) on the generated demo dataset.

Regenerate the weights (CPU, offline, about 24 minutes on 2 cores):
    python scripts/train_demo.py --epochs 36 --n-train 384

A YOLOv8n built from 'yolov8n.yaml' (no pretrained weights), SiLU, imgsz 320. Nothing is downloaded:
plots and AMP are off (they would fetch Arial.ttf / yolo11n.pt), Ultralytics' settings live in a temp
YOLO_CONFIG_DIR with every integration (MLflow, ...) and analytics off, so the user's own
Ultralytics settings and MLflow store are untouched. Everything but the final weights goes to --work
(a temp dir unless given). Prints the Ultralytics val mAP50-95 / mAP50 on the demo val split (the same
images `python -m rkbench` evaluates on) and the training time.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "rkbench" / "assets" / "demo_yolov8n.pt"


def offline_ultralytics(config_dir: Path):
    """Import Ultralytics with its settings in config_dir, integrations and analytics off, fonts never fetched."""
    os.environ["YOLO_CONFIG_DIR"] = str(config_dir)     # read when ultralytics is first imported
    os.environ["YOLO_OFFLINE"] = "1"
    if "ultralytics" in sys.modules:
        raise RuntimeError("import train_demo before ultralytics: YOLO_CONFIG_DIR must be set first")
    import ultralytics
    import ultralytics.data.utils
    from ultralytics.utils import SETTINGS

    off = ("sync", "mlflow", "clearml", "comet", "dvc", "raytune", "tensorboard", "wandb", "hub")
    SETTINGS.update({key: False for key in off if key in SETTINGS})
    # check_det_dataset() fetches Arial.ttf for its plots; with plots=False the font is never used
    ultralytics.data.utils.check_font = lambda *a, **k: None
    return ultralytics


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=36)
    ap.add_argument("--n-train", type=int, default=384, help="generated training images")
    ap.add_argument("--n-val", type=int, default=48, help="val images (48 = what `python -m rkbench` uses)")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--imgsz", type=int, default=320)
    ap.add_argument("--workers", type=int, default=2)
    # from scratch, AdamW at 0.002 learns faster than what optimizer=auto picks for short runs (AdamW 0.00125)
    ap.add_argument("--optimizer", default="AdamW")
    ap.add_argument("--lr0", type=float, default=0.002, help="ignored by optimizer=auto")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--work", type=Path, default=None, help="working dir (default: a temp dir, removed afterwards)")
    args = ap.parse_args(argv)

    work = args.work or Path(tempfile.mkdtemp(prefix="rkbench-train-demo-"))
    work.mkdir(parents=True, exist_ok=True)
    offline_ultralytics(work / "ultralytics-config")
    from ultralytics import YOLO

    sys.path.insert(0, str(REPO))
    from rkbench.data.demo import generate_demo

    data = generate_demo(work / "demo", args.n_train, args.n_val, seed=args.seed)
    model = YOLO("yolov8n.yaml")        # architecture only: random init, nc taken from data.yaml
    t0 = time.perf_counter()
    model.train(data=str(data), epochs=args.epochs, imgsz=args.imgsz, batch=args.batch, device="cpu",
                workers=args.workers, optimizer=args.optimizer, lr0=args.lr0, seed=args.seed, deterministic=True,
                pretrained=False, amp=False, plots=False, val=False, cache="ram", project=str(work / "runs"),
                name="train", exist_ok=True, verbose=False)
    train_s = time.perf_counter() - t0
    best = Path(model.trainer.best)     # already stripped (EMA weights, fp16, no optimizer) by Ultralytics

    args.out.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(best, args.out)
    shipped = YOLO(str(args.out))
    assert list(shipped.names.values()) == ["circle", "square", "triangle", "cross"], shipped.names
    metrics = shipped.val(data=str(data), imgsz=args.imgsz, batch=args.batch, device="cpu", plots=False,
                          project=str(work / "runs"), name="val", exist_ok=True, verbose=False)
    print(f"saved {args.out} ({args.out.stat().st_size / 2**20:.1f} MiB)")
    print(f"train_time_s={train_s:.0f} epochs={args.epochs} n_train={args.n_train} "
          f"val_map50_95={metrics.box.map:.4f} val_map50={metrics.box.map50:.4f}")
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
