"""``motionsep evaluate``: text alignment, motion fidelity, appearance leakage."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from motionsep_cli._options import JsonOption, not_done

HELP = """Score generated videos: CLIP text alignment, temporal consistency,
motion fidelity against reference clips, and appearance leakage.

Example:

  motionsep evaluate outputs/ --reference clips/ --json
"""


def evaluate(
    videos: Annotated[list[Path], typer.Argument(help="Videos or folders of videos.")],
    reference: Annotated[
        list[Path] | None, typer.Option("--reference", help="Reference clips or folders.")
    ] = None,
    as_json: JsonOption = False,
) -> None:
    not_done("evaluate", 7, "evaluate")
