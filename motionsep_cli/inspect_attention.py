"""``motionsep inspect-attention``: what the motion LoRA changes in temporal attention."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from motionsep_cli._options import JsonOption, SeedOption, not_done

HELP = """Record frame-to-frame temporal attention with and without the motion and
plot base, motion and difference maps, plus what the appearance highway carries.

Example:

  motionsep inspect-attention --motion dolly "a wolf on a snowy mountain" --out attn/
"""


def inspect_attention(
    prompt: Annotated[str, typer.Argument(help="Prompt to sample with.")],
    motion: Annotated[str, typer.Option("--motion", help="Motion name.")],
    out: Annotated[Path | None, typer.Option("--out", help="Output folder.")] = None,
    seed: SeedOption = None,
    as_json: JsonOption = False,
) -> None:
    not_done("inspect-attention", 8, "inspect-attention")
