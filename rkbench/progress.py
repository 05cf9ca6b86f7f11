"""What the console shows while a run works: tqdm bars on stderr, drawn only when stderr is a terminal
(tqdm's disable=None), so CI logs and pipes get the one-line INFO descriptions the stages log instead of
bar redraws. Host-side only: the board-pushable modules never import this (nor tqdm)."""

from __future__ import annotations

import os
import sys
import threading
from contextlib import contextmanager
from typing import IO, Iterator, Optional

from tqdm import tqdm


def bar(total: int, desc: str, unit: str, stream: Optional[IO[str]] = None) -> tqdm:
    """A bar with rate and ETA; `bar.update(n)` after each batch. Gone from the screen once closed: the
    stage's INFO line already said what ran."""
    return tqdm(total=total, desc=desc, unit=unit, file=stream or sys.stderr, disable=None, leave=False,
                dynamic_ncols=True)


@contextmanager
def elapsed(desc: str, stream: Optional[IO[str]] = None, every_s: float = 1.0) -> Iterator[None]:
    """A line with the time elapsed, ticking from a thread while a call with no progress of its own runs
    (an rknn-toolkit2 build). It writes to its own copy of the terminal's descriptor, because the
    toolkit's output is redirected to its log file (fd 1 and 2) while it builds."""
    stream = stream or sys.stderr
    if not stream.isatty():
        yield
        return
    stream.flush()
    stop = threading.Event()
    with os.fdopen(os.dup(stream.fileno()), "w") as tty, \
            tqdm(desc=desc, bar_format="{desc}: {elapsed}", file=tty, leave=False) as line:
        def tick() -> None:
            while not stop.wait(every_s):
                line.refresh()

        ticker = threading.Thread(target=tick, daemon=True)
        ticker.start()
        try:
            yield
        finally:
            stop.set()
            ticker.join()


def duration(seconds: float) -> str:
    """12 s, 3 min 05 s, 1 h 02 min: for ETAs and totals read by people."""
    s = int(round(seconds))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {s % 3600 // 60:02d} min"
