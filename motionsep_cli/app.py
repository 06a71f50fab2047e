"""Assembles the ``motionsep`` command from one module per subcommand."""

from __future__ import annotations

from typing import Annotated

import typer

from motionsep import __version__
from motionsep_cli import (
    config,
    demo,
    download,
    evaluate,
    generate,
    inspect_attention,
    motions,
    prepare,
    report,
    toy,
    train,
)
from motionsep_cli._errors import MotionsepGroup, leave_if_stopped_worker

app = typer.Typer(
    name="motionsep",
    cls=MotionsepGroup,
    help="Learn a motion from a few clips; generate it with any appearance.\n\n"
    "Implements temporal attention purification and the appearance highway "
    "(arXiv 2501.16714). Results go to stdout, progress to stderr.\n\n"
    "Quick start (CPU, no download):  motionsep demo",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

for module, name in (
    (demo, "demo"),
    (download, "download"),
    (prepare, "prepare"),
    (train, "train"),
    (generate, "generate"),
    (evaluate, "evaluate"),
    (inspect_attention, "inspect-attention"),
    (report, "report"),
    (config, "config"),
):
    function = getattr(module, module.__name__.rsplit(".", 1)[-1])
    app.command(name=name, help=module.HELP)(function)
app.add_typer(motions.app, name="motions", help=motions.HELP)
app.add_typer(toy.app, name="toy", help=toy.HELP)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"motionsep {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option("--version", callback=_version, is_eager=True, help="Print the version."),
    ] = False,
) -> None:
    """Learn a motion from a few clips; generate it with any appearance."""


def main() -> None:
    """Console-script entry point."""
    try:
        app()
    except SystemExit as exc:
        leave_if_stopped_worker(exc.code)
        raise
