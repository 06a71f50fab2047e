"""``motionsep train``: learn a motion from clips."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from motionsep.config import Recipe
from motionsep_cli._console import RichProgress, emit, err_console, relaunch_as
from motionsep_cli._options import (
    ConfigOption,
    ForceOption,
    JsonOption,
    ModelOption,
    PresetOption,
    SeedOption,
    SetOption,
    settings_from_cli,
)

if TYPE_CHECKING:
    from motionsep.config import Settings
    from motionsep.store import Store

HELP = """Learn the motion shared by CLIPS as a motion LoRA named NAME.

Raw clips (files, folders, CSV/JSONL manifests) go through `prepare` first,
from its cache when they were prepared before; a prepared dataset folder works
too. The result is a motion package in $MOTIONSEP_HOME/motions/NAME that
`generate` uses; it appears only once training has finished.

Checkpoints are written every train.checkpoint_every steps. Ctrl-C writes one
and prints the command that resumes (exit 130); --resume continues from the
newest checkpoint and ends bit-identical to an uninterrupted run. A new run of
a name with an unfinished, checkpointed run is refused (exit 2) unless you
--resume it or pass --force, which discards it only once the new run's clips
and settings have been checked; --force also replaces a finished motion of
that name when the new training ends.

A short summary (model, recipe, clips, steps, rank, learning rate, where the
motion goes, the command that resumes) is printed on stderr before training;
--verbose prints every resolved setting instead. All of them are saved in the
package (and `motionsep config` shows them without training).

Examples:

  motionsep train clips/ --name dolly --preset dolly

  motionsep train ../shared/clips/dolly.mp4 --name smoke --preset tiny --steps 10

  motionsep train clips/ --name dolly --preset dolly --resume
"""


def train(
    clips: Annotated[
        list[Path], typer.Argument(help="Clips, folders, manifests or prepared data.")
    ],
    name: Annotated[str, typer.Option("--name", help="Name of the motion to create.")],
    recipe: Annotated[
        Recipe | None,
        typer.Option(
            "--recipe",
            help="Which layers learn the motion: reference (default), paper, motiondirector.",
        ),
    ] = None,
    steps: Annotated[int | None, typer.Option("--steps", help="Optimizer steps.")] = None,
    rank: Annotated[int | None, typer.Option("--rank", help="Motion LoRA rank.")] = None,
    lr: Annotated[
        float | None, typer.Option("--lr", help="Learning rate of the motion LoRA.")
    ] = None,
    seed: SeedOption = None,
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue from the newest checkpoint.")
    ] = False,
    force: ForceOption = False,
    num_processes: Annotated[
        int | None,
        typer.Option("--num-processes", help="Data-parallel processes (relaunches with torchrun)."),
    ] = None,
    preview_every: Annotated[
        int | None, typer.Option("--preview-every", help="Render a preview every N steps.")
    ] = None,
    report_to: Annotated[
        str | None,
        typer.Option(
            "--report-to",
            help="tensorboard, wandb or none: losses per path, lr and steps/s every step, "
            "previews, the settings; logs in $MOTIONSEP_HOME/logs/NAME "
            "(pip install 'motionsep[tensorboard]').",
        ),
    ] = None,
    model: ModelOption = None,
    preset: PresetOption = None,
    config: ConfigOption = None,
    set_options: SetOption = None,
    verbose: Annotated[
        bool, typer.Option("--verbose", "-v", help="Print every resolved setting first.")
    ] = False,
    as_json: JsonOption = False,
) -> None:
    from motionsep.launch import is_main_process
    from motionsep.store import Store
    from motionsep.train import check_training_base, resume_command_line, train_motion

    overrides = {
        "model": {"name": model},
        "lora": {"recipe": recipe, "rank": rank},
        "optim": {"lr": lr},
        "train": {
            "steps": steps,
            "seed": seed,
            "num_processes": num_processes,
            "preview_every": preview_every,
            "report_to": report_to,
        },
    }
    settings = settings_from_cli(preset, config, set_options, overrides)
    store = Store(settings.store.home)
    if settings.train.num_processes > 1:  # refuse a bad base before launching processes
        check_training_base(settings, store)
    relaunch_as(settings.train.num_processes)
    command = resume_command_line(sys.argv[1:])
    if is_main_process():
        if verbose:
            err_console.print("[bold]settings[/]")
            err_console.print(settings.to_yaml().rstrip(), markup=False, highlight=False)
        else:
            for line in _summary(settings, clips, name, store, command):
                err_console.print(line, markup=False, highlight=False, soft_wrap=True)
    if is_main_process():
        with RichProgress() as progress:
            result = train_motion(
                clips,
                name,
                settings,
                store,
                resume=resume,
                force=force,
                progress=progress,
                resume_command=command,
            )
    else:
        result = train_motion(clips, name, settings, store, resume=resume, force=force)
    if is_main_process():
        loss = "n/a" if result.final_loss is None else f"{result.final_loss:.4f}"
        err_console.print(
            f"[green]trained[/] {result.name}: {result.steps} steps in {result.seconds:.1f}s, "
            f"final temporal loss {loss}"
        )
        emit(result.to_dict(), as_json, lines=[str(result.package)])


def _summary(
    settings: Settings, clips: list[Path], name: str, store: Store, command: str
) -> list[str]:
    """What a person checks before a long run, in a few lines."""
    lora, optim, train, data = settings.lora, settings.optim, settings.train, settings.data
    inputs = ", ".join(str(c) for c in clips[:3]) + (
        f" and {len(clips) - 3} more" if len(clips) > 3 else ""
    )
    return [
        f"train {name}: {lora.recipe.value} recipe on {settings.model.name}",
        f"  clips    {inputs} ({data.width}x{data.height}, {data.frames} frames)",
        f"  steps    {train.steps}, batch {train.batch_size}, seed {train.seed}, "
        f"checkpoint every {train.checkpoint_every}",
        f"  lora     rank {lora.rank}, lr {optim.lr:g} ({optim.scheduler})",
        f"  saves to {store.motions_dir / name}",
        f"  resume   {command}",
        "  (--verbose prints every setting; `motionsep config` shows them without training)",
    ]
