"""tests/device: every test is bounded by a watchdog so a protocol bug cannot hang CI (the board and adb
server fixtures are shared with tests/integration, in tests/conftest.py)."""

from __future__ import annotations

import faulthandler
import sys
from typing import Iterator

import pytest

TEST_WATCHDOG_S = 120


@pytest.fixture(autouse=True)
def _watchdog() -> Iterator[None]:
    # Dumps every thread's stack and exits if one test runs away (no pytest-timeout needed).
    faulthandler.dump_traceback_later(TEST_WATCHDOG_S, exit=True, file=sys.stderr)
    yield
    faulthandler.cancel_dump_traceback_later()
