"""User-facing errors: one clear message, a non-zero exit, no traceback."""

from __future__ import annotations


class FlameError(Exception):
    """A mistake in the user's input (config, corpus, checkpoint, CLI). Printed without a traceback."""

    exit_code = 1

    def __init__(self, message: str, hint: str | None = None):
        self.message = message
        self.hint = hint
        super().__init__(message if hint is None else f"{message}\n  hint: {hint}")


class ConfigError(FlameError):
    """A bad configuration value or key; raised before any model or data is built."""

    exit_code = 2

    def __init__(self, problems: list[str] | str):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        if len(self.problems) == 1:
            msg = f"config error: {self.problems[0]}"
        else:
            msg = "config errors:\n" + "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(msg)


class DataError(FlameError):
    """A corpus, store or data-state problem."""


class CheckpointError(FlameError):
    """A checkpoint that cannot be used for what was asked."""
