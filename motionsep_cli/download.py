"""``motionsep download``: put a base model into the store."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

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

if TYPE_CHECKING:
    from motionsep.progress import Progress as ProgressSink
    from motionsep.store import ModelRecord, Store

HELP = """Put a base model into the local store.

Known names: zeroscope (default base model), modelscope, animatediff
(Stable Diffusion 1.5 + the AnimateDiff motion adapter v1-5-2), clip (for
evaluate), tiny and tiny-animatediff (small random models built locally, for
tests and CPU runs), or any hub id OWNER/REPO. Only the files a
text-to-video pipeline needs are fetched (safetensors preferred; pickled
.bin weights are converted to safetensors). An interrupted download resumes
when run again. Models land in $MOTIONSEP_HOME/models/NAME and are marked
ready only after they were verified, with the size and sha256 of every file
in their record. Running it again for an installed model checks every file
against that record; a damaged model is reported (exit 2) and --repair
installs it again. HF_TOKEN is sent for gated or private repositories;
HF_ENDPOINT points at another hub.

animatediff joins two sources into one model: a Stable Diffusion 1.5 base
(unet, vae, text encoder, tokenizer, scheduler; no safety checker) and a
motion adapter, stored under motion_adapter/. --base OWNER/REPO takes another
SD 1.5 fine-tune from the hub (stored as animatediff--OWNER--REPO), --from
PATH a local SD 1.5 folder (stored as animatediff--FOLDER), --adapter another
motion adapter (a hub id or a folder); --name chooses the store name. A base
that is not SD 1.5-shaped (SDXL, a video model) or an adapter that does not
fit it is refused (exit 2) before any weights are fetched. --revision pins
the base.

Examples:

  motionsep download tiny

  motionsep download zeroscope --variant fp16

  motionsep download zeroscope --repair

  motionsep download zeroscope --from ~/models/zeroscope_v2_576w

  motionsep download animatediff --variant fp16

  motionsep download animatediff --base OWNER/REPO

  motionsep download animatediff --from ~/models/my-sd15 --name my-animatediff

  motionsep download animatediff --adapter ~/models/my-motion-adapter --name animatediff-mine

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
            help="zeroscope, modelscope, animatediff, clip, tiny, tiny-animatediff, or "
            "OWNER/REPO (store name with --from, but for animatediff)."
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
        Path | None,
        typer.Option(
            "--from",
            help="Import a local diffusers folder instead (with animatediff: the SD 1.5 base).",
        ),
    ] = None,
    base: Annotated[
        str | None,
        typer.Option(
            "--base",
            help="With animatediff: the SD 1.5 model OWNER/REPO to put the motion adapter on "
            "(stored as animatediff--OWNER--REPO).",
        ),
    ] = None,
    adapter: Annotated[
        str | None,
        typer.Option(
            "--adapter",
            help="With animatediff: the motion adapter, OWNER/REPO or a local folder "
            "(default guoyww/animatediff-motion-adapter-v1-5-2).",
        ),
    ] = None,
    store_name: Annotated[
        str | None,
        typer.Option("--name", help="With animatediff: the store name of the joined model."),
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
    from motionsep.hub import ANIMATEDIFF_NAME, install_animatediff
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
        if name == ANIMATEDIFF_NAME:
            record = install_animatediff(
                store,
                base=base,
                base_folder=from_path,
                adapter=adapter,
                name=store_name,
                revision=revision,
                variant=variant,
                force=force,
                progress=progress,
                repair=repair,
            )
        elif base is not None or adapter is not None or store_name is not None:
            raise UsageError(
                "--base, --adapter and --name apply to animatediff",
                "e.g. `motionsep download animatediff --base OWNER/REPO`",
            )
        else:
            record = _install(store, progress, name, from_path, revision, variant, force, repair)
    revision_note = f", revision {record.revision[:12]}" if record.revision else ""
    err_console.print(
        f"[green]ready:[/] {record.name} ({record.size_bytes / 1e6:.1f} MB{revision_note})"
    )
    emit(record.to_dict(), as_json, lines=[str(record.path)])


def _install(
    store: Store,
    progress: ProgressSink,
    name: str,
    from_path: Path | None,
    revision: str | None,
    variant: str | None,
    force: bool,
    repair: bool,
) -> ModelRecord:
    """One model: downloaded by name or hub id, or imported from a folder."""
    from motionsep.errors import UsageError
    from motionsep.hub import download as download_model
    from motionsep.hub import import_folder

    if from_path is None:
        return download_model(
            store,
            name,
            revision=revision,
            variant=variant,
            force=force,
            progress=progress,
            repair=repair,
        )
    if revision is not None or repair:
        raise UsageError(
            "--revision and --repair apply to downloads, not to --from",
            "to replace an imported model, import it again with --force",
        )
    return import_folder(store, from_path, name, force=force, variant=variant, progress=progress)


def _print_table(rows: list[dict[str, object]]) -> None:
    from rich.table import Table

    table = Table(title="models")
    for column in ("name", "source", "installed", "size", "revision"):
        table.add_column(column)
    for row in rows:
        size = row["size_bytes"]
        source = str(row["repo_id"] or "built-in")
        if row.get("adapter_repo_id"):
            source += f" + {row['adapter_repo_id']}"
        table.add_row(
            str(row["name"]),
            source,
            "yes" if row["installed"] else "no",
            f"{int(size) / 1e6:.1f} MB" if isinstance(size, int) else "-",
            str(row["revision"] or "-"),
        )
    err_console.print(table)
