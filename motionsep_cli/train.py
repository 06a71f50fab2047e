"""``motionsep train``: learn a motion from clips."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from motionsep.config import Recipe
from motionsep_cli._options import (
    ConfigOption,
    ForceOption,
    ModelOption,
    PresetOption,
    SeedOption,
    SetOption,
    not_done,
)

HELP = """Learn the motion shared by CLIPS as a motion LoRA named NAME.

Raw clips go through `prepare` first (cached). The result is a motion package
in $MOTIONSEP_HOME/motions/NAME that `generate` uses. Checkpoints are written
as it goes; --resume continues an interrupted run.

Examples:

  motionsep train clips/ --name dolly --preset dolly

  motionsep train clip.mp4 --name smoke --preset tiny --steps 10
"""


def train(
    clips: Annotated[
        list[Path], typer.Argument(help="Clips, folders, manifests or prepared data.")
    ],
    name: Annotated[str, typer.Option("--name", help="Name of the motion to create.")],
    recipe: Annotated[
        Recipe | None, typer.Option("--recipe", help="Which layers learn the motion.")
    ] = None,
    steps: Annotated[int | None, typer.Option("--steps", help="Optimizer steps.")] = None,
    rank: Annotated[int | None, typer.Option("--rank", help="Motion LoRA rank.")] = None,
    lr: Annotated[float | None, typer.Option("--lr", help="Learning rate.")] = None,
    seed: SeedOption = None,
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue from the last checkpoint.")
    ] = False,
    force: ForceOption = False,
    model: ModelOption = None,
    preset: PresetOption = None,
    config: ConfigOption = None,
    set_options: SetOption = None,
) -> None:
    not_done("train", 5, "train")
