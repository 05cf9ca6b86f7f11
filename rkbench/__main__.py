"""Entry point.

    python -m rkbench [overrides]             one configuration (the embedded demo by default)
    python -m rkbench -m resolution=320,640   a sweep: one MLflow parent run, one child per configuration
    python -m rkbench report [--help]         markdown report from MLflow
    python -m rkbench doctor board.address=IP:5555
    python -m rkbench runner build --arch aarch64   the C++ runner's binary (built or found in the cache)
    python -m rkbench --help                  the axes and their values (--hydra-help: Hydra's own help)

Every configuration of a sweep is composed and validated before the first one starts. The subcommands
are routed before the pipeline is imported, so `report` does not pay for torch and the toolkit."""

from __future__ import annotations

import os
import shlex
import sys


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        return dispatch(argv)
    except KeyboardInterrupt as exc:  # Ctrl-C: one line, not Python's traceback through Hydra and the toolkit
        print(interrupted(argv, exc.args[0] if exc.args and isinstance(exc.args[0], int) else 0), file=sys.stderr)
        return 130             # the shell's code for "ended by SIGINT"
    except BrokenPipeError:    # `python -m rkbench --help | head`: the reader left early, nothing went wrong
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())   # no second error when Python flushes
        return 0


def interrupted(argv: list[str], done: int) -> str:
    """`done`: configurations completed before the interrupt (cli.run_sweep re-raises with that count)."""
    if argv[:1] in (["report"], ["doctor"], ["runner"]):
        return f"rkbench: {argv[0]} interrupted (Ctrl-C)"
    # the pipeline marks the interrupted MLflow run (and a sweep's parent run) KILLED on its way out
    return (f"rkbench: interrupted (Ctrl-C) after {done} completed configuration(s), which stay in MLflow (the "
            "interrupted run is marked KILLED); run the same command again to resume, finished configurations "
            f"are reused: python -m rkbench {shlex.join(argv)}".rstrip())


def dispatch(argv: list[str]) -> int:
    if argv[:1] == ["report"]:
        from rkbench.report.__main__ import main as report_main
        return report_main(argv[1:])
    if argv[:1] == ["doctor"]:
        from rkbench.device.doctor import main as doctor_main
        return doctor_main(argv[1:])
    if argv[:1] == ["runner"]:
        from rkbench.cpp import main as cpp_main
        return cpp_main(argv[1:], prog="python -m rkbench runner")
    from rkbench.cli import run_sweep
    return run_sweep(argv)


if __name__ == "__main__":
    sys.exit(main())
