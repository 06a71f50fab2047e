"""The progress protocol between the library and whoever shows progress.

Library functions that take long accept ``progress: Progress | None``. They
call :meth:`Progress.start` once per task, :meth:`Progress.advance` as work
completes and :meth:`Progress.finish` at the end. The CLI renders this with
rich on stderr; Python users can pass their own or nothing.
"""

from __future__ import annotations

from typing import Any, Protocol


class Progress(Protocol):
    """Receives progress events from long-running library calls."""

    def start(self, task: str, total: float | None, unit: str = "") -> None:
        """A task begins; ``total`` is None when its length is unknown."""

    def advance(self, task: str, amount: float = 1.0, **fields: Any) -> None:
        """Work on ``task`` progressed by ``amount``; ``fields`` are shown beside it."""

    def finish(self, task: str) -> None:
        """The task ended."""

    def log(self, message: str) -> None:
        """A line worth showing to the user (never the result itself)."""


class NullProgress:
    """A progress sink that ignores everything."""

    def start(self, task: str, total: float | None, unit: str = "") -> None:
        return None

    def advance(self, task: str, amount: float = 1.0, **fields: Any) -> None:
        return None

    def finish(self, task: str) -> None:
        return None

    def log(self, message: str) -> None:
        return None


def or_null(progress: Progress | None) -> Progress:
    """Returns ``progress`` or a sink that ignores events."""
    return progress if progress is not None else NullProgress()
