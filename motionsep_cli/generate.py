"""``motionsep generate``: new videos with a learned motion."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from motionsep_cli._options import (
    ConfigOption,
    JsonOption,
    ModelOption,
    PresetOption,
    SeedOption,
    SetOption,
    not_done,
)

HELP = """Generate videos of PROMPT with the motion NAME (or `none` for the base model).

Paths of the written videos go to stdout, one per line, so the output can be
piped into other tools; each video gets a JSON sidecar with every setting.

Examples:

  motionsep generate --motion dolly "a wolf on a snowy mountain"

  motionsep generate --motion dolly --num-videos 4 --seed 7 "a red car" --out outputs/
"""


def generate(
    prompts: Annotated[list[str] | None, typer.Argument(help="One or more prompts.")] = None,
    motion: Annotated[str, typer.Option("--motion", help="Motion name, or none.")] = "none",
    prompts_file: Annotated[
        Path | None, typer.Option("--prompts-file", help="One prompt per line.")
    ] = None,
    num_videos: Annotated[
        int | None, typer.Option("--num-videos", help="Videos per prompt.")
    ] = None,
    seed: SeedOption = None,
    out: Annotated[Path | None, typer.Option("--out", help="Output folder or file.")] = None,
    model: ModelOption = None,
    as_json: JsonOption = False,
    preset: PresetOption = None,
    config: ConfigOption = None,
    set_options: SetOption = None,
) -> None:
    not_done("generate", 6, "generate")
