"""The console: rich progress and logs on stderr, results on stdout."""

from __future__ import annotations

import json
import math
import sys
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

err_console = Console(stderr=True, highlight=False)


class RichProgress:
    """Renders the library's progress events (motionsep.progress.Progress) with rich."""

    def __init__(self, console: Console | None = None, enabled: bool = True) -> None:
        """``enabled=False``: show nothing (the other processes of a launched run)."""
        self._progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=console or err_console,
            transient=False,
            disable=not enabled,
        )
        self._tasks: dict[str, TaskID] = {}

    def __enter__(self) -> RichProgress:
        self._progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._progress.stop()

    def start(self, task: str, total: float | None, unit: str = "") -> None:
        self._tasks[task] = self._progress.add_task(task, total=total, info="")

    def advance(self, task: str, amount: float = 1.0, **fields: Any) -> None:
        if task not in self._tasks:
            self.start(task, None)
        info = "  ".join(f"{key} {_short(value)}" for key, value in fields.items())
        self._progress.update(self._tasks[task], advance=amount, info=info)

    def finish(self, task: str) -> None:
        task_id = self._tasks.pop(task, None)
        if task_id is not None:
            self._progress.update(task_id, total=self._progress.tasks[task_id].completed)

    def log(self, message: str) -> None:
        if not self._progress.disable:
            # the library's messages are plain text (paths may hold "[...]")
            self._progress.console.print(message, markup=False, soft_wrap=True)


def _short(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _finite(value: Any) -> Any:
    """``value`` with every NaN or infinite float replaced by None (recursively)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(item) for item in value]
    return value


def emit(result: Any, as_json: bool, lines: list[str] | None = None) -> None:
    """Writes a command's result to stdout: JSON with ``--json``, else plain lines.

    Every command writes its result through here. The JSON is strict: a
    NaN or infinite number becomes ``null`` (JSON has no such numbers), and
    values JSON cannot hold (paths) are written as strings.
    """
    if as_json:
        text = json.dumps(_finite(result), indent=2, default=str, allow_nan=False)
        sys.stdout.write(text + "\n")
    else:
        for line in lines or []:
            sys.stdout.write(f"{line}\n")
    sys.stdout.flush()


def relaunch_as(processes: int) -> None:
    """With ``processes`` > 1 in a process that was not launched: run the command again as that
    many processes and exit with their status. Otherwise nothing (this process does the work);
    a launched process is tied to its launcher first (it stops when the launcher does).
    """
    from motionsep.launch import bind_worker_to_launcher, in_distributed_run, relaunch

    if in_distributed_run():
        bind_worker_to_launcher()
    elif processes > 1:
        err_console.print(f"launching {processes} processes")
        raise SystemExit(relaunch(processes))
