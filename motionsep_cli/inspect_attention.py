"""``motionsep inspect-attention``: what the motion LoRA changes in temporal attention."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape

from motionsep_cli._console import RichProgress, emit, err_console
from motionsep_cli._options import (
    ConfigOption,
    JsonOption,
    ModelOption,
    PresetOption,
    SeedOption,
    SetOption,
)

HELP = """Record frame-to-frame temporal attention with and without the motion and
plot base, motion and difference maps, plus what the appearance highway carries.

Samples PROMPT twice from the same seed: with the base model (motion LoRA off,
no highway) and with the motion (its LoRA on every step, the recipe's highway
unless --set sample.highway=false). With --video the clip is noised to each
chosen step's timestep instead (same noise for both runs). Only the
conditional (prompt) pass is recorded; maps are averaged over heads and
spatial positions.

Writes into --out (default attention/MOTION-PROMPT-SEED/): base.png,
motion.png, difference.png (layers x steps grids), summary.json (per layer and
step: entropy, diagonal mass, KL(motion || base); per rerouted skip: cosine
between the spatial-attention output and the temporal-attention output it
replaces) and maps.npz; files of an earlier inspection there are kept unless
--force. Paths go to stdout (the summary with --json),
progress to stderr.

Examples:

  motionsep inspect-attention --motion dolly "a wolf on a snowy mountain" --out attn/

  motionsep inspect-attention --motion dolly "a red car" --layers 'up_blocks.*' --steps 0,10,-1

  motionsep inspect-attention --motion dolly "a red car" --video clips/dolly.mp4 --json

  motionsep inspect-attention --motion dolly "a red car" --set sample.highway=false   # TAP alone
"""


def inspect_attention(
    prompt: Annotated[str, typer.Argument(help="Prompt to sample (or condition the clip) with.")],
    motion: Annotated[
        str, typer.Option("--motion", help="Motion name in the store, or path to a motion folder.")
    ],
    video: Annotated[
        Path | None,
        typer.Option("--video", help="Noise this clip to each step instead of sampling."),
    ] = None,
    layers: Annotated[
        str | None,
        typer.Option(
            "--layers",
            help="Glob or regex over temporal attention names, e.g. 'up_blocks.*' or "
            "'attn1$' (default: all, transformer_in included).",
        ),
    ] = None,
    steps: Annotated[
        str | None,
        typer.Option(
            "--steps",
            help="Denoising step indices to record, e.g. 0,15,-1, or all "
            "(default: first, middle, last).",
        ),
    ] = None,
    seed: SeedOption = None,
    out: Annotated[
        Path | None,
        typer.Option("--out", "-o", help="Output folder (default attention/MOTION-PROMPT-SEED/)."),
    ] = None,
    model: ModelOption = None,
    force: Annotated[
        bool,
        typer.Option("--force", help="Replace the five files of an earlier inspection in --out."),
    ] = False,
    as_json: JsonOption = False,
    preset: PresetOption = None,
    config: ConfigOption = None,
    set_options: SetOption = None,
) -> None:
    from motionsep.errors import UsageError
    from motionsep.inspect import inspect_attention as run_inspection
    from motionsep.inspect import inspection_files, save_inspection
    from motionsep.sample import load_motion_and_settings, resolve_model, slugify
    from motionsep.userfiles import check_new_files

    overrides: dict[str, Any] = {"model": {"name": model}, "sample": {"seed": seed}}
    package, settings = load_motion_and_settings(
        motion, preset=preset, config_file=config, set_options=set_options, overrides=overrides
    )
    if package is None:
        raise UsageError(
            "inspect-attention compares a motion with the base model: it needs a motion",
            "pass --motion NAME (see `motionsep motions list`)",
        )
    sample = settings.sample
    target = (
        out
        if out is not None
        else Path("attention") / (f"{package.name}-{slugify(prompt, 40)}-{sample.seed}")
    )
    check_new_files(inspection_files(target).paths(), force=force)  # before any work
    ref = resolve_model(settings, package)
    source = f"clip {escape(str(video))}" if video is not None else f"{sample.steps} DDIM steps"
    err_console.print(
        f"inspecting motion {package.name} ({package.metadata.recipe.value}) on {escape(ref.id)}: "
        f"{source}, {sample.frames} frames {sample.width}x{sample.height}, seed {sample.seed}"
    )
    with RichProgress() as progress:
        inspection = run_inspection(
            prompt,
            settings,
            package,
            video=video,
            layers=layers,
            steps=steps,
            model=ref,
            progress=progress,
        )
        files = save_inspection(inspection, target, force=force)
    summary = {**inspection.summary(), "files": {k: str(v) for k, v in files.named().items()}}
    emit(summary, as_json, lines=[str(path) for path in files.paths()])
