"""A progress sink for tests that keeps the log lines (the rest ignored)."""

from __future__ import annotations

from motionsep.progress import NullProgress


class LoggedProgress(NullProgress):
    """Keeps every ``log`` message in ``lines``."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def log(self, message: str) -> None:
        self.lines.append(message)
