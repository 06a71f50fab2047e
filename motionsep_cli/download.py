"""``motionsep download``: put a base model into the store."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from motionsep_cli._console import RichProgress, emit, err_console
from motionsep_cli._options import ForceOption, JsonOption

HELP = """Put a base model into the local store.

Known names: zeroscope (default base model), modelscope, clip (for evaluate),
tiny (a small random model built locally, for tests and CPU runs), or any hub
id OWNER/REPO. Models land in $MOTIONSEP_HOME/models/NAME and are marked ready
only after they were verified.

Examples:

  motionsep download tiny

  motionsep download zeroscope --variant fp16

  motionsep download --list --json
"""


def download(
    name: Annotated[
        str | None, typer.Argument(help="zeroscope, modelscope, clip, tiny, or OWNER/REPO.")
    ] = None,
    revision: Annotated[
        str | None, typer.Option("--revision", help="Hub branch, tag or commit.")
    ] = None,
    variant: Annotated[
        str | None, typer.Option("--variant", help="Weight variant, e.g. fp16.")
    ] = None,
    from_path: Annotated[
        Path | None, typer.Option("--from", help="Import a local diffusers folder instead.")
    ] = None,
    list_models: Annotated[
        bool, typer.Option("--list", help="Show known and installed models.")
    ] = False,
    force: ForceOption = False,
    as_json: JsonOption = False,
) -> None:
    from motionsep.config import load_settings
    from motionsep.errors import NotImplementedYetError, UsageError
    from motionsep.hub import download as download_model
    from motionsep.hub import list_models as known_and_installed
    from motionsep.store import Store

    store = Store(load_settings().store.home)
    if list_models:
        rows = known_and_installed(store)
        if not as_json:
            _print_table(rows)
        emit(rows, as_json, lines=[str(r["path"]) for r in rows if r["installed"]])
        return
    if name is None:
        raise UsageError("name the model to download", "e.g. `motionsep download tiny`, or --list")
    if from_path is not None:
        raise NotImplementedYetError(
            "`motionsep download --from` is not implemented yet (issue #4)",
            "nothing was imported",
        )
    with RichProgress() as progress:
        record = download_model(
            store, name, revision=revision, variant=variant, force=force, progress=progress
        )
    err_console.print(f"[green]ready:[/] {record.name} ({record.size_bytes / 1e6:.1f} MB)")
    emit(record.to_dict(), as_json, lines=[str(record.path)])


def _print_table(rows: list[dict[str, object]]) -> None:
    from rich.table import Table

    table = Table(title="models")
    for column in ("name", "source", "installed", "size", "revision"):
        table.add_column(column)
    for row in rows:
        size = row["size_bytes"]
        table.add_row(
            str(row["name"]),
            str(row["repo_id"] or "built-in"),
            "yes" if row["installed"] else "no",
            f"{int(size) / 1e6:.1f} MB" if isinstance(size, int) else "-",
            str(row["revision"] or "-"),
        )
    err_console.print(table)
