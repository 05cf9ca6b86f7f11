"""The small exception hierarchy. Every message says what to do about it, in one line."""

from __future__ import annotations

from typing import Optional


class RkbenchError(Exception):
    """Base class: anything rkbench raises on purpose.

    `stage` is set only where the failing stage is known (the pipeline reports `getattr(err, "stage",
    "config")`), so an error raised while exporting is reported as an export failure, not a config one."""

    def __init__(self, message: str = "", *, stage: Optional[str] = None):
        super().__init__(message)
        if stage:
            self.stage = stage


class ConfigError(RkbenchError):
    """The configuration is invalid; raised before any work starts."""


class DataError(RkbenchError):
    """A dataset, weights file or ONNX file is missing, empty or malformed."""


class UnsupportedCombination(ConfigError):
    """The options are each valid but cannot run together (e.g. batch 3 on a single core)."""


class DeviceError(RkbenchError):
    """The board (or its transport) failed: connection, push, runner, space, timeout."""

    def __init__(self, message: str, *, retryable: bool = False):
        super().__init__(message)
        self.retryable = retryable


class StageError(RkbenchError):
    """A pipeline stage failed; carries the stage name, the tool's error and a hint.

    `deterministic` says the same inputs would fail the same way again (a toolkit rule rejecting the
    graph), so the stage cache may remember the failure; the default is False (the machine: a missing
    file, a full disk, no memory), which is raised and never remembered."""

    def __init__(self, stage: str, message: str, hint: str = "", *, deterministic: bool = False):
        super().__init__(f"[{stage}] {message}" + (f" (hint: {hint})" if hint else ""), stage=stage)
        self.detail = message
        self.hint = hint
        self.deterministic = deterministic
