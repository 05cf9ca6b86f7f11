"""Entry point.

    python -m rkbench [overrides]             one configuration (the embedded demo by default)
    python -m rkbench -m resolution=320,640   a sweep: one MLflow parent run, one child per configuration
    python -m rkbench report [--help]         markdown report from MLflow
    python -m rkbench doctor board.address=IP:5555

Every configuration of a sweep is composed and validated before the first one starts. The subcommands
are routed before the pipeline is imported, so `report` does not pay for torch and the toolkit."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["report"]:
        from rkbench.report.__main__ import main as report_main
        return report_main(argv[1:])
    if argv[:1] == ["doctor"]:
        from rkbench.device.doctor import main as doctor_main
        return doctor_main(argv[1:])
    from rkbench.cli import run_sweep
    return run_sweep(argv)


if __name__ == "__main__":
    sys.exit(main())
