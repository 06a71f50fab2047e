"""The one place where exceptions become a message and an exit code.

Exit codes: 0 success, 1 the work failed, 2 bad usage or input, 130
interrupted. Tracebacks are shown only with ``MOTIONSEP_DEBUG=1``.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import typer
from rich.text import Text
from typer.core import TyperGroup

from motionsep.errors import MotionsepError, is_disk_full
from motionsep_cli._console import err_console

EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


def debug_enabled() -> bool:
    """Whether the user asked for tracebacks."""
    return os.environ.get("MOTIONSEP_DEBUG", "").lower() in {"1", "true", "yes", "on"}


def report(exc: BaseException) -> int:
    """Prints a clear message for ``exc`` on stderr and returns the exit code.

    Every piece of text that comes from the exception is printed literally:
    a path such as ``clips/[/x].mp4`` or a value ``[red]`` is not rich markup.
    """
    if isinstance(exc, MotionsepError):
        _say("[bold red]error:[/]", exc.message)
        if exc.hint:
            _say("[yellow]hint:[/]", exc.hint)
        return exc.exit_code
    if isinstance(exc, KeyboardInterrupt):
        err_console.print("interrupted")
        return EXIT_INTERRUPTED
    if is_disk_full(exc):
        _say("[bold red]error:[/]", f"the disk is full{_writing(exc)}")
        _say(
            "[yellow]hint:[/]",
            "free some space and run the command again. Files are written whole or not at "
            "all: everything finished before this is kept, nothing half-written is left",
        )
        return EXIT_FAILURE
    if isinstance(exc, PermissionError):
        _say("[bold red]error:[/]", f"permission denied{_writing(exc, 'on')}")
        _say("[yellow]hint:[/]", "check the path and its permissions, or choose another one")
        return EXIT_USAGE
    _say("[bold red]internal error:[/]", f"{type(exc).__name__}: {exc}")
    _say("[yellow]hint:[/]", "rerun with MOTIONSEP_DEBUG=1 for the traceback and report it")
    return EXIT_FAILURE


def _say(label: str, text: str) -> None:
    """``label`` (markup) followed by ``text`` printed as it is."""
    err_console.print(Text.assemble(Text.from_markup(label), " ", text), soft_wrap=True)


def _writing(exc: OSError, preposition: str = "while writing") -> str:
    """`` while writing PATH`` for an ``OSError`` that names its file, else nothing."""
    return f" {preposition} {exc.filename}" if exc.filename else ""


def leave_if_stopped_worker(code: Any) -> None:
    """Ends a launched process that was stopped (exit 130) at once, without teardown.

    Its launcher is waiting for it to go, and every file it wrote is complete
    and closed; tearing down the interpreter (collecting a loaded model's
    objects) can take many seconds on a busy machine. Anything else returns.
    """
    from motionsep.launch import in_distributed_run

    if code == EXIT_INTERRUPTED and in_distributed_run():
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(EXIT_INTERRUPTED)


class MotionsepGroup(TyperGroup):
    """Top-level command group that maps every exception through :func:`report`."""

    def invoke(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)
        except (typer.TyperException, typer.Exit, typer.Abort):
            raise  # usage errors and exits that the command line already handles
        except (Exception, KeyboardInterrupt) as exc:
            if debug_enabled():
                raise
            raise typer.Exit(report(exc)) from None
