"""``motionsep prepare``: clips into cached training data."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from motionsep_cli._console import RichProgress, emit, err_console
from motionsep_cli._options import (
    ConfigOption,
    JsonOption,
    ModelOption,
    PresetOption,
    SetOption,
    settings_from_cli,
)

HELP = """Decode, sample, resize and VAE-encode clips into cached training data.

CLIPS are video files, folders of videos, or a manifest (CSV or JSONL with
path and prompt columns). Each clip's prompt comes from the manifest, a
sidecar NAME.txt beside the clip, or --prompt. Every problem with the clips is
reported at once, before any work starts. Running it again with the same
inputs is a cache hit; a changed clip or setting re-encodes only what changed.
Every cache entry carries the sha256 of its latents, checked whenever it is
used: a damaged entry is reported, never used, and --rebuild replaces it.
`train` runs this step itself; use it alone to check clips early.
The path of the dataset manifest goes to stdout.

Examples:

  motionsep prepare clips/ --preset dolly

  motionsep prepare ../shared/clips/dolly.mp4 --preset tiny --set data.inversion=true --json
"""


def prepare(
    clips: Annotated[list[Path], typer.Argument(help="Video files, folders, or a manifest.")],
    prompt: Annotated[
        str | None, typer.Option("--prompt", help="Prompt for clips without one.")
    ] = None,
    out: Annotated[
        Path | None, typer.Option("--out", help="Write the cache here instead of the store.")
    ] = None,
    rebuild: Annotated[
        bool,
        typer.Option(
            "--rebuild",
            help="Encode every clip again, replacing its cache entry (e.g. a damaged one).",
        ),
    ] = False,
    model: ModelOption = None,
    preset: PresetOption = None,
    config: ConfigOption = None,
    set_options: SetOption = None,
    as_json: JsonOption = False,
) -> None:
    from motionsep.data import prepare as prepare_clips
    from motionsep.store import Store
    from motionsep.train import check_training_base

    settings = settings_from_cli(
        preset, config, set_options, {"model": {"name": model}, "data": {"prompt": prompt}}
    )
    if settings.data.inversion:  # the inversion runs the U-Net over data.frames frames
        check_training_base(settings, Store(settings.store.home))
    with RichProgress() as progress:
        dataset = prepare_clips(
            clips, settings, Store(settings.store.home), out=out, progress=progress, rebuild=rebuild
        )
    err_console.print(
        f"[green]prepared[/] {len(dataset.clips)} clip(s), {dataset.cache_hits} from the cache"
    )
    result = {
        "manifest": str(dataset.manifest),
        "clips": [{**clip.to_dict(), "cached": clip.cached} for clip in dataset.clips],
    }
    emit(result, as_json, lines=[str(dataset.manifest)])
