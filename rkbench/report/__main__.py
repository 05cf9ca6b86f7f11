"""CLI: python -m rkbench.report (also routed from `python -m rkbench report`)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from rkbench.errors import RkbenchError


def _pivot(text: str) -> tuple[str, str, str]:
    parts = text.rsplit(":", 2)
    if len(parts) != 3 or not all(parts):
        raise argparse.ArgumentTypeError(f"'{text}' is not METRIC:ROW:COL, e.g. eval/map50_95:resolution:algo")
    return parts[0], parts[1], parts[2]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rkbench report",
                                description="Markdown report (with PNG plots) of a sweep, read from MLflow only.")
    p.add_argument("--tracking-uri", default="sqlite:///mlflow.db", help="MLflow store (default: %(default)s)")
    p.add_argument("--experiment", default="rkbench", help="MLflow experiment = study (default: %(default)s)")
    p.add_argument("--out", default="reports/", type=Path, help="output folder (default: %(default)s)")
    p.add_argument("--parent", metavar="RUN_ID", help="sweep run to report (default: the latest sweep, "
                                                      "else every config run of the experiment)")
    p.add_argument("--pivot", metavar="METRIC:ROW:COL", action="append", type=_pivot,
                   help="table of METRIC over params ROW x COL; repeatable (default: eval/map50_95 and latency "
                        "p50 over resolution x algo)")
    p.add_argument("--no-plots", action="store_true", help="markdown only, no PNG plots")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        from rkbench.report import build_report

        path = build_report(args.tracking_uri, args.experiment, args.out, args.parent, args.pivot, not args.no_plots)
    except RkbenchError as err:
        print(f"rkbench report: error: {err}", file=sys.stderr)
        return 2
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
