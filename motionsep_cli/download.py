"""``motionsep download``: put a base model into the store."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.progress import (
    BarColumn,
    DownloadColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.table import Column
from rich.text import Text

from motionsep_cli._console import RichProgress, emit, err_console
from motionsep_cli._options import ForceOption, JsonOption

HELP = """Put a base model into the local store.

Known names: zeroscope (default base model), modelscope, clip (for evaluate),
tiny (a small random model built locally, for tests and CPU runs), or any hub
id OWNER/REPO. Only the files a text-to-video pipeline needs are fetched
(safetensors preferred; pickled .bin weights are converted to safetensors).
An interrupted download resumes when run again. Models land in
$MOTIONSEP_HOME/models/NAME and are marked ready only after they were
verified, with the size and sha256 of every file in their record. Running
it again for an installed model checks every file against that record; a
damaged model is reported (exit 2) and --repair installs it again. HF_TOKEN
is sent for gated or private repositories; HF_ENDPOINT points at another
hub.

Examples:

  motionsep download tiny

  motionsep download zeroscope --variant fp16

  motionsep download zeroscope --repair

  motionsep download zeroscope --from ~/models/zeroscope_v2_576w

  motionsep download --list --json
"""


class _AmountColumn(ProgressColumn):
    """Sizes (``1.2/5.6 GB``) for byte tasks, counts (``3/12``) for the others."""

    def __init__(self) -> None:
        super().__init__(table_column=Column(no_wrap=True))
        self._bytes = DownloadColumn()
        self._count = MofNCompleteColumn()

    def render(self, task: Task) -> Text:
        column = self._bytes if task.fields.get("unit") == "B" else self._count
        return column.render(task)


class _SpeedColumn(ProgressColumn):
    def __init__(self) -> None:
        super().__init__(table_column=Column(no_wrap=True))
        self._speed = TransferSpeedColumn()

    def render(self, task: Task) -> Text:
        return self._speed.render(task) if task.fields.get("unit") == "B" else Text("")


class DownloadProgress(RichProgress):
    """Rich progress on stderr that shows file sizes and speed for byte tasks."""

    def __init__(self) -> None:
        super().__init__()
        self._progress = Progress(
            TextColumn("[bold]{task.description}", table_column=Column(no_wrap=True)),
            BarColumn(bar_width=20),
            _AmountColumn(),
            _SpeedColumn(),
            TimeRemainingColumn(),
            TextColumn(
                "{task.fields[info]}",
                table_column=Column(no_wrap=True, overflow="ellipsis", max_width=28),
            ),
            console=err_console,
            transient=False,
        )

    def start(self, task: str, total: float | None, unit: str = "") -> None:
        self._tasks[task] = self._progress.add_task(task, total=total, info="", unit=unit)

    def advance(self, task: str, amount: float = 1.0, **fields: Any) -> None:
        if task not in self._tasks:
            self.start(task, None)
        info = str(fields.get("file", ""))
        self._progress.update(self._tasks[task], advance=amount, info=info)


def download(
    name: Annotated[
        str | None,
        typer.Argument(
            help="zeroscope, modelscope, clip, tiny, or OWNER/REPO (store name with --from)."
        ),
    ] = None,
    revision: Annotated[
        str | None, typer.Option("--revision", help="Hub branch, tag or commit.")
    ] = None,
    variant: Annotated[
        str | None,
        typer.Option(
            "--variant", help="Weight variant, e.g. fp16 (stored as the model's weights)."
        ),
    ] = None,
    from_path: Annotated[
        Path | None, typer.Option("--from", help="Import a local diffusers folder instead.")
    ] = None,
    list_models: Annotated[
        bool, typer.Option("--list", help="Show known and installed models.")
    ] = False,
    repair: Annotated[
        bool,
        typer.Option(
            "--repair",
            help="Hash every file of an installed model against its record and install it "
            "again if one is missing or changed.",
        ),
    ] = False,
    force: ForceOption = False,
    as_json: JsonOption = False,
) -> None:
    from motionsep.config import load_settings
    from motionsep.errors import UsageError
    from motionsep.hub import download as download_model
    from motionsep.hub import import_folder
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
    with DownloadProgress() as progress:
        if from_path is not None:
            if revision is not None or repair:
                raise UsageError(
                    "--revision and --repair apply to downloads, not to --from",
                    "to replace an imported model, import it again with --force",
                )
            record = import_folder(
                store, from_path, name, force=force, variant=variant, progress=progress
            )
        else:
            record = download_model(
                store,
                name,
                revision=revision,
                variant=variant,
                force=force,
                progress=progress,
                repair=repair,
            )
    revision_note = f", revision {record.revision[:12]}" if record.revision else ""
    err_console.print(
        f"[green]ready:[/] {record.name} ({record.size_bytes / 1e6:.1f} MB{revision_note})"
    )
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
