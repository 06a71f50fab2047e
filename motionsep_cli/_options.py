"""Options shared by several subcommands, defined once."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

SETTINGS_PANEL = "Settings"

PresetOption = Annotated[
    str | None,
    typer.Option(
        "--preset",
        help=(
            "Preset name (car-turn, zoom-in, zoom-out, dolly, animatediff, tiny, toy, "
            "toy-animatediff) or a preset YAML's path."
        ),
        rich_help_panel=SETTINGS_PANEL,
    ),
]
ConfigOption = Annotated[
    Path | None,
    typer.Option(
        "--config",
        help="YAML or TOML settings file; overrides the preset.",
        rich_help_panel=SETTINGS_PANEL,
    ),
]
SetOption = Annotated[
    list[str] | None,
    typer.Option(
        "--set",
        help="Override one setting, e.g. --set train.steps=500 (repeatable; highest precedence).",
        rich_help_panel=SETTINGS_PANEL,
    ),
]
ModelOption = Annotated[
    str | None,
    typer.Option(
        "--model",
        "-m",
        help="Base model: store name (zeroscope, tiny, ...), hub id, or folder.",
    ),
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print the result as JSON on stdout.")]
ForceOption = Annotated[bool, typer.Option("--force", help="Replace an existing entry.")]
SeedOption = Annotated[int | None, typer.Option("--seed", help="Random seed.")]


def settings_from_cli(
    preset: str | None,
    config: Path | None,
    set_options: list[str] | None,
    overrides: dict[str, Any] | None = None,
) -> Any:
    """Builds the settings from every layer; flags left at None do not override."""
    from motionsep.config import load_settings

    return load_settings(
        preset=preset, config_file=config, overrides=overrides, set_options=set_options
    )


NumProcessesOption = Annotated[
    int,
    typer.Option(
        "--num-processes",
        min=1,
        help="Processes (GPUs) sharing the videos: whole batches each, every video written once, "
        "the same files as one process. Or start the command under `accelerate launch`/torchrun.",
    ),
]
