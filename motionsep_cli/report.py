"""``motionsep report``: a static HTML page of generated videos, side by side."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from motionsep_cli._console import emit, err_console
from motionsep_cli._options import ForceOption, JsonOption

HELP = """Write one static HTML page of the videos in FOLDER, to open in any browser.

FOLDER is a `motionsep demo` or `toy experiment` report folder, or any folder
of generated videos with their sidecars (`generate` output, an `evaluate
--ablation` folder). The page shows the reference clips on top, then each
group of videos (motion, recipe, highway, PLI, seeds, as `evaluate` groups
them) looping side by side with prompt, seed and scores, and the table of the
groups. It is self-contained (FOLDER/report/ by default: index.html and
media/, relative links, no server, no network). Videos a browser cannot play
are re-encoded to H.264. `demo` and `toy experiment` write it themselves.

Examples:

  motionsep report motionsep-demo/

  motionsep report outputs/ablation-dolly --scores scores.json --reference clips/dolly.mp4

  motionsep evaluate outputs/ --reference clips/ --json > scores.json && \\
      motionsep report outputs/ --scores scores.json
"""


def report(
    folder: Annotated[Path, typer.Argument(help="Demo/experiment folder or folder of videos.")],
    out: Annotated[
        Path | None, typer.Option("--out", "-o", help="Report folder (default FOLDER/report).")
    ] = None,
    scores: Annotated[
        Path | None,
        typer.Option("--scores", help="An `evaluate --json` file: show its scores and groups."),
    ] = None,
    reference: Annotated[
        list[Path] | None,
        typer.Option("--reference", "-r", help="Reference clips to show on top (repeatable)."),
    ] = None,
    force: ForceOption = False,
    as_json: JsonOption = False,
) -> None:
    from motionsep.report import write_report

    page = write_report(folder, out, scores=scores, references=reference or [], force=force)
    err_console.print(f"[green]report:[/] {escape(str(page))} (open it in a browser)")
    emit({"report": str(page)}, as_json, lines=[str(page)])
