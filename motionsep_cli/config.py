"""``motionsep config``: show the settings that a command would use."""

from __future__ import annotations

from typing import Annotated

import typer

from motionsep_cli._console import emit
from motionsep_cli._options import ConfigOption, JsonOption, PresetOption, SetOption

HELP = """Print the resolved settings (YAML, or JSON with --json).

Precedence, lowest first: defaults < --preset < --config < MOTIONSEP_* env
vars (nested with __, e.g. MOTIONSEP_TRAIN__STEPS=500) < --set. The output is
a valid --config file.

Examples:

  motionsep config --preset dolly --set train.steps=500

  motionsep config --fields
"""


def config(
    preset: PresetOption = None,
    config: ConfigOption = None,
    set_options: SetOption = None,
    fields: Annotated[
        bool, typer.Option("--fields", help="List every setting with its meaning.")
    ] = False,
    presets: Annotated[bool, typer.Option("--presets", help="List the built-in presets.")] = False,
    as_json: JsonOption = False,
) -> None:
    from motionsep.config import available_presets, iter_fields, load_settings

    if presets:
        names = available_presets()
        emit(names, as_json, lines=names)
        return
    if fields:
        rows = dict(iter_fields())
        emit(rows, as_json, lines=[f"{name}: {text}" for name, text in rows.items()])
        return
    settings = load_settings(preset=preset, config_file=config, set_options=set_options)
    if as_json:
        emit(settings.to_dict(), True)
    else:
        emit(None, False, lines=[settings.to_yaml().rstrip("\n")])
