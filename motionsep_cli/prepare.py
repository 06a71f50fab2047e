"""``motionsep prepare``: clips into cached training data."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from motionsep_cli._options import ConfigOption, ModelOption, PresetOption, SetOption, not_done

HELP = """Decode, sample, resize and VAE-encode clips into cached training data.

CLIPS are video files, folders of videos, or a manifest (CSV or JSONL with
path and prompt). Each clip's prompt comes from the manifest, a sidecar
NAME.txt, or --prompt. Running it again with the same inputs is a cache hit.
`train` runs this step itself; use it alone to check clips early.

Example:

  motionsep prepare clips/ --preset dolly --model zeroscope
"""


def prepare(
    clips: Annotated[list[Path], typer.Argument(help="Video files, folders, or a manifest.")],
    prompt: Annotated[
        str | None, typer.Option("--prompt", help="Prompt for clips without one.")
    ] = None,
    out: Annotated[
        Path | None, typer.Option("--out", help="Write here instead of the store.")
    ] = None,
    model: ModelOption = None,
    preset: PresetOption = None,
    config: ConfigOption = None,
    set_options: SetOption = None,
) -> None:
    not_done("prepare", 4, "download and prepare")
