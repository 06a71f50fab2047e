"""``motionsep demo``: the whole pipeline on the built-in toy model, on a CPU."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from motionsep_cli._console import RichProgress, emit, err_console
from motionsep_cli._options import JsonOption, SetOption

HELP = """Learn a motion and generate it with new looks, on a built-in toy model (CPU, a minute).

Renders three reference clips of a motion the toy model never saw (a red
square moving diagonally on a striped white background), trains a motion on
them with the recipe of the model's preset into the store (as toy-MOTION),
generates videos of other looks with and without it, scores them with the
toy metrics (motion fidelity, leakage, appearance), and writes a report
folder: clips/, videos/, frames.png, results.md, results.json, and
report/index.html (the references and the videos playing side by side;
--no-report skips it). The default model is toy-animatediff (AnimateDiff
layout: its temporal attention carries the motion); --model toy runs the
ZeroScope layout. An earlier demo in --out, and the motion toy-MOTION, are
kept unless --force. One seed: for what the recipes do over seeds, see
`motionsep toy experiment` and the README's tables.

Examples:

  motionsep demo

  motionsep demo --motion orbit --out orbit-demo/

  motionsep generate --motion toy-diagonal "a green circle moving diagonally on a plain
  gray background"
"""


def demo(
    out: Annotated[Path, typer.Option("--out", help="Report folder.")] = Path("motionsep-demo"),
    motion: Annotated[
        str, typer.Option("--motion", help="Held-out motion: diagonal, orbit, bounce or dolly.")
    ] = "diagonal",
    prompts: Annotated[int, typer.Option("--prompts", min=1, max=6, help="New looks.")] = 3,
    model: Annotated[
        str,
        typer.Option(
            "--model",
            help="Built-in toy model: toy-animatediff (AnimateDiff layout, the default) or toy "
            "(ZeroScope layout); each with its preset of the same name.",
        ),
    ] = "toy-animatediff",
    force: Annotated[
        bool,
        typer.Option(
            "--force",
            help="Replace an earlier demo in --out (only a folder the demo wrote, with nothing "
            "added) and its motion toy-MOTION in the store.",
        ),
    ] = False,
    set_options: SetOption = None,
    no_report: Annotated[
        bool, typer.Option("--no-report", help="Skip the HTML page (report/index.html).")
    ] = False,
    as_json: JsonOption = False,
) -> None:
    from motionsep.config import load_settings
    from motionsep.report import write_report
    from motionsep.toy.experiment import run_demo
    from motionsep.userfiles import OutputKind, check_new_folder, write_marker

    store_home = load_settings().store.home
    # an earlier demo is replaced only with --force, and only if the demo wrote all of it
    if check_new_folder(
        out, OutputKind.DEMO, force=force, store_home=store_home, empty_is_new=True
    ):
        import shutil

        shutil.rmtree(out)
    with RichProgress() as progress:
        results = run_demo(
            out,
            motion=motion,
            prompts=prompts,
            set_options=set_options,
            progress=progress,
            model=model,
            force=force,
        )
    if not no_report:
        page = write_report(out, out / "report", force=True)
        err_console.print(f"[green]page:[/] {escape(str(page))} (open it in a browser)")
    write_marker(out, OutputKind.DEMO)
    err_console.print((out / "results.md").read_text(), markup=False, soft_wrap=True)
    name = results["settings"]["name"]
    err_console.print(
        f"report in {escape(str(out))}/ (frames.png, videos/); "
        f"try: motionsep generate --motion {name} "
        f'"a green circle {_phrase(motion)} on a plain gray background"'
    )
    emit(results, as_json, lines=[str(out / "results.md")])


def _phrase(motion: str) -> str:
    from motionsep.toy.world import MOTION_PHRASES

    return MOTION_PHRASES.get(motion, motion)
