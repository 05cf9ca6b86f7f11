"""CLI: python -m rkbench.report (also routed from `python -m rkbench report`)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from rkbench.errors import ConfigError, RkbenchError
from rkbench.report.validity import Limits


def _pivot(text: str) -> tuple[str, str, str]:
    parts = text.rsplit(":", 2)
    if len(parts) != 3 or not all(parts):
        raise argparse.ArgumentTypeError(f"'{text}' is not METRIC:ROW:COL, e.g. eval/map50_95:resolution:algo")
    return parts[0], parts[1], parts[2]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rkbench report",
                                description="Markdown report (with PNG plots) of a sweep, read from MLflow only.")
    p.add_argument("--tracking-uri", default=os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///mlflow.db",
                   help="MLflow store (default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db)")
    p.add_argument("--experiment", default="rkbench", help="MLflow experiment = study (default: %(default)s)")
    p.add_argument("--out", default="reports/", type=Path, help="output folder (default: %(default)s)")
    p.add_argument("--parent", metavar="RUN_ID", help="sweep run to report (default: the latest sweep, "
                                                      "else every config run of the experiment)")
    p.add_argument("--pivot", metavar="METRIC:ROW:COL", action="append", type=_pivot,
                   help="table of METRIC over params ROW x COL; repeatable (default: eval/map50_95 and latency "
                        "p50 over resolution x algo)")
    p.add_argument("--no-plots", action="store_true", help="markdown only, no PNG plots")
    p.add_argument("--baseline", metavar="RUN_ID", help="sweep or config run to compare with (needs --gate); "
                                                        "exit 1 on a regression")
    p.add_argument("--gate", metavar="TERMS", help="METRIC:-TOL or METRIC:+TOL[%%], comma-separated: the sign is "
                                                   "the bad direction, e.g. eval/map50_95:-0.01,latency/"
                                                   "board_py_total_ms_p50:+5%%")
    limits = Limits()
    p.add_argument("--min-iterations", type=int, default=limits.min_iterations,
                   help="a latency with fewer timed iterations is INVALID (default: %(default)s)")
    p.add_argument("--min-seconds", type=float, default=limits.min_seconds,
                   help="... or timed for less than this (default: %(default)s)")
    p.add_argument("--max-cv", type=float, default=limits.max_cv,
                   help="... or with a larger coefficient of variation (default: %(default)s)")
    return p


def main(argv: list[str] | None = None) -> int:
    """0: report written (and the gate passed); 1: the gate found a regression; 2: an error."""
    args = parser().parse_args(argv)
    try:
        if bool(args.baseline) != bool(args.gate):
            raise ConfigError("--baseline and --gate go together: pass both, e.g. --baseline RUN_ID "
                              "--gate eval/map50_95:-0.01")
        from rkbench.report import write_report
        from rkbench.report.gate import compare, parse
        from rkbench.report.markdown import gate_table
        from rkbench.report.runs import load_selection

        limits = Limits(args.min_iterations, args.min_seconds, args.max_cv)
        terms = parse(args.gate) if args.gate else []
        current = load_selection(args.tracking_uri, args.experiment, args.parent)
        rows = compare(load_selection(args.tracking_uri, args.experiment, args.baseline), current, terms) \
            if args.baseline else None
        path = write_report(current, args.out, args.pivot, not args.no_plots, limits, rows, args.baseline or "")
    except RkbenchError as err:
        print(f"rkbench report: error: {err}", file=sys.stderr)
        return 2
    if rows is not None:
        print(gate_table(rows))
    print(path)
    return 1 if rows and any(r.fails for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
