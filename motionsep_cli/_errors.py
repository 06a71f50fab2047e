"""The one place where exceptions become a message and an exit code.

Exit codes: 0 success, 1 the work failed, 2 bad usage or input, 130
interrupted. Tracebacks are shown only with ``MOTIONSEP_DEBUG=1``.
"""

from __future__ import annotations

import os
from typing import Any

import typer
from rich.markup import escape
from typer.core import TyperGroup

from motionsep.errors import MotionsepError
from motionsep_cli._console import err_console

EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


def debug_enabled() -> bool:
    """Whether the user asked for tracebacks."""
    return os.environ.get("MOTIONSEP_DEBUG", "").lower() in {"1", "true", "yes", "on"}


def report(exc: BaseException) -> int:
    """Prints a clear message for ``exc`` on stderr and returns the exit code."""
    if isinstance(exc, MotionsepError):
        # Messages are plain text: "[up0, down0, ...]" must not be read as rich markup.
        err_console.print(f"[bold red]error:[/] {escape(exc.message)}", soft_wrap=True)
        if exc.hint:
            err_console.print(f"[yellow]hint:[/] {escape(exc.hint)}", soft_wrap=True)
        return exc.exit_code
    if isinstance(exc, KeyboardInterrupt):
        err_console.print("interrupted")
        return EXIT_INTERRUPTED
    err_console.print(
        f"[bold red]internal error:[/] {type(exc).__name__}: {exc}", markup=True, soft_wrap=True
    )
    err_console.print(
        "[yellow]hint:[/] rerun with MOTIONSEP_DEBUG=1 for the traceback and report it",
        markup=True,
    )
    return EXIT_FAILURE


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
