"""The small exception hierarchy. Every message says what to do about it, in one line."""


class RkbenchError(Exception):
    """Base class: anything rkbench raises on purpose."""


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
    """A pipeline stage failed; carries the stage name, the tool's error and a hint."""

    def __init__(self, stage: str, message: str, hint: str = ""):
        super().__init__(f"[{stage}] {message}" + (f" (hint: {hint})" if hint else ""))
        self.stage = stage
        self.detail = message
        self.hint = hint
