"""``motionsep generate``: new videos with a learned motion."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape

from motionsep.config import VideoFormat
from motionsep_cli._console import RichProgress, emit, err_console, relaunch_as
from motionsep_cli._options import (
    ConfigOption,
    JsonOption,
    ModelOption,
    NumProcessesOption,
    PresetOption,
    SeedOption,
    SetOption,
)

HELP = """Generate videos of PROMPT with the motion NAME (or `none` for the base model).

Defaults come from the settings the motion was trained with (its preset's
steps, guidance, size and frames); --preset, --config, MOTIONSEP_* variables,
the flags below and --set override them, in that order. The base model is the
one the motion was trained on unless --model names another.

Each video is written as an H.264 mp4 (or a gif, or a folder of PNG frames)
with a JSON sidecar NAME.json beside it holding every setting actually used,
the seed, the motion's adapter hash and the model. In an --out folder every
video gets a new name (-2, -3, ... when one is taken); an --out FILE.mp4 that
exists, or whose FILE.json does, is refused unless --force. Video k of each prompt uses
seed S + k. The paths go to stdout, one per line (a JSON list with --json),
so the output can be piped: `motionsep generate ... | xargs -n1 open`.
Progress goes to stderr.

Examples:

  motionsep generate --motion dolly "a wolf on a snowy mountain"

  motionsep generate --motion dolly --num-videos 4 --seed 7 "a red car" --out outputs/

  motionsep generate --motion none "a red car" --seed 7      # the base model, to compare

  motionsep generate --motion dolly --pli 0.5 --noise-prior 0.3 --prompts-file prompts.txt
"""

_SAMPLING = "Sampling"
_OUTPUT = "Output"


def _parse_size(size: str | None) -> tuple[int | None, int | None]:
    from motionsep.errors import UsageError

    if size is None:
        return None, None
    width, sep, height = size.lower().partition("x")
    if not sep or not width.strip().isdigit() or not height.strip().isdigit():
        raise UsageError(f"--size {size!r} is not WIDTHxHEIGHT", "for example: --size 576x320")
    return int(width), int(height)


def generate(
    motion: Annotated[
        str,
        typer.Option(
            "--motion", help="Motion name in the store, path to a motion folder, or none."
        ),
    ],
    prompts: Annotated[
        list[str] | None,
        typer.Argument(help="Prompts; none given: the validation prompts of the motion's preset."),
    ] = None,
    prompts_file: Annotated[
        Path | None,
        typer.Option("--prompts-file", help="More prompts, one per line ('#' comments)."),
    ] = None,
    num_videos: Annotated[
        int | None,
        typer.Option("--num-videos", "-n", help="Videos per prompt.", rich_help_panel=_SAMPLING),
    ] = None,
    seed: SeedOption = None,
    frames: Annotated[
        int | None,
        typer.Option("--frames", help="Frames per video.", rich_help_panel=_SAMPLING),
    ] = None,
    size: Annotated[
        str | None,
        typer.Option(
            "--size", help="WIDTHxHEIGHT, multiples of 8, e.g. 576x320.", rich_help_panel=_SAMPLING
        ),
    ] = None,
    steps: Annotated[
        int | None,
        typer.Option("--steps", help="DDIM denoising steps.", rich_help_panel=_SAMPLING),
    ] = None,
    guidance: Annotated[
        float | None,
        typer.Option(
            "--guidance", help="Classifier-free guidance scale.", rich_help_panel=_SAMPLING
        ),
    ] = None,
    negative_prompt: Annotated[
        str | None,
        typer.Option("--negative-prompt", help="Negative prompt.", rich_help_panel=_SAMPLING),
    ] = None,
    lora_scale: Annotated[
        float | None,
        typer.Option(
            "--lora-scale",
            help="Motion LoRA scale; 0 keeps only the highway.",
            rich_help_panel=_SAMPLING,
        ),
    ] = None,
    highway: Annotated[
        bool | None,
        typer.Option(
            "--highway/--no-highway",
            help="Appearance highway on or off (default: as the motion's recipe says).",
            show_default=False,
            rich_help_panel=_SAMPLING,
        ),
    ] = None,
    highway_beta: Annotated[
        float | None,
        typer.Option(
            "--highway-beta",
            help="Highway scale (default: the recipe's).",
            rich_help_panel=_SAMPLING,
        ),
    ] = None,
    pli: Annotated[
        float | None,
        typer.Option(
            "--pli",
            help="Phased LoRA integration: motion for the first fraction F of steps, "
            "base model after.",
            rich_help_panel=_SAMPLING,
        ),
    ] = None,
    noise_prior: Annotated[
        float | None,
        typer.Option(
            "--noise-prior",
            help="Weight p of the motion's stored inversion in the starting noise (0-1; default: "
            "the recipe's, 0.2 for reference when the motion stores an inversion, else 0).",
            rich_help_panel=_SAMPLING,
        ),
    ] = None,
    out: Annotated[
        Path | None,
        typer.Option(
            "--out",
            "-o",
            help="Output folder (default outputs/), or a .mp4/.gif file for one video.",
            rich_help_panel=_OUTPUT,
        ),
    ] = None,
    video_format: Annotated[
        VideoFormat | None,
        typer.Option(
            "--format", help="mp4 (H.264), gif, or png (frame folder).", rich_help_panel=_OUTPUT
        ),
    ] = None,
    fps: Annotated[
        int | None, typer.Option("--fps", help="Frame rate.", rich_help_panel=_OUTPUT)
    ] = None,
    model: ModelOption = None,
    offload: Annotated[
        bool | None,
        typer.Option(
            "--offload/--no-offload",
            help="Move each model part to the GPU only while used (small GPUs; sample.offload).",
        ),
    ] = None,
    batch_size: Annotated[
        int | None,
        typer.Option(
            "--batch-size",
            help="Videos denoised together; 1 for small GPUs (sample.batch_size, default 4).",
            min=1,
        ),
    ] = None,
    num_processes: NumProcessesOption = 1,
    force: Annotated[
        bool,
        typer.Option(
            "--force",
            help="Replace an existing --out FILE.mp4/.gif and its sidecar (never an unrelated "
            "FILE.json).",
            rich_help_panel=_OUTPUT,
        ),
    ] = False,
    as_json: JsonOption = False,
    preset: PresetOption = None,
    config: ConfigOption = None,
    set_options: SetOption = None,
) -> None:
    from motionsep.devices import resolve_device
    from motionsep.errors import is_disk_full
    from motionsep.launch import current_shard
    from motionsep.sample import (
        VideoWriter,
        format_of_output,
        gather_prompts,
        iter_videos,
        load_motion_and_settings,
        resolve_model,
    )
    from motionsep.userfiles import check_outside_store

    relaunch_as(num_processes)
    width, height = _parse_size(size)
    video_format = video_format or format_of_output(out)
    overrides: dict[str, Any] = {
        "model": {"name": model},
        "sample": {
            "num_videos": num_videos,
            "seed": seed,
            "frames": frames,
            "width": width,
            "height": height,
            "steps": steps,
            "guidance": guidance,
            "negative_prompt": negative_prompt,
            "lora_scale": lora_scale,
            "highway": highway,
            "highway_beta": highway_beta,
            "pli": pli,
            "noise_prior": noise_prior,
            "format": video_format,
            "fps": fps,
            "offload": offload,
            "batch_size": batch_size,
        },
    }
    package, settings = load_motion_and_settings(
        motion, preset=preset, config_file=config, set_options=set_options, overrides=overrides
    )
    sample = settings.sample

    shard = current_shard(resolve_device(settings.model.device).type)
    say = err_console.print if shard.is_main else _quiet

    all_prompts, from_preset = gather_prompts(prompts or [], prompts_file, settings)
    if from_preset:
        say(f"no prompt given: using the {len(all_prompts)} preset prompt(s)")
    if package is None and highway:
        say("[yellow]note:[/] --highway has no effect with --motion none")
    target = out if out is not None else Path("outputs")
    total = len(all_prompts) * sample.num_videos
    # Fail on a bad --out before spending minutes on denoising.
    check_outside_store(target, settings.store.home)
    writer = VideoWriter(target, sample.format, sample.fps, count=total, force=force)
    planned = None
    if shard.count > 1:
        # every process names every video before any process writes one
        planned = writer.reserve(all_prompts, sample.num_videos, sample.seed)
        shard.barrier()
    ref = resolve_model(settings, package)
    what = f"motion {package.name} ({package.metadata.recipe.value})" if package else "no motion"
    say(
        f"generating {total} video(s) with {what} on "
        f"{escape(ref.id)}: {sample.frames} frames {sample.width}x{sample.height}, "
        f"{sample.steps} steps, guidance {sample.guidance:g}"
        + (f", {shard.count} processes" if shard.count > 1 else "")
    )
    try:
        with RichProgress(enabled=shard.is_main) as progress:
            videos = iter_videos(
                all_prompts,
                settings,
                package,
                model=ref,
                shard=shard,
                progress=progress,
            )
            for video in videos:
                writer.write(video)  # each video is kept the moment it is done
    except (KeyboardInterrupt, OSError) as exc:
        if isinstance(exc, OSError) and not is_disk_full(exc):
            raise
        stop = "interrupted" if isinstance(exc, KeyboardInterrupt) else "disk full"
        err_console.print(
            f"{stop}: {len(writer.saved)} of {total} video(s) were written"
            + (f" by process {shard.rank}" if shard.count > 1 else "")
            + ", each complete with its sidecar",
            markup=False,
        )
        _emit_saved([item.to_dict() for item in writer.saved], as_json)
        raise
    shard.barrier()
    if planned is None:
        _emit_saved([item.to_dict() for item in writer.saved], as_json)
    elif shard.is_main:
        _emit_saved(planned, as_json)


def _quiet(*_: Any, **__: Any) -> None:
    """Where the other processes' messages go (only the main process talks)."""


def _emit_saved(saved: list[dict[str, Any]], as_json: bool) -> None:
    emit(saved, as_json, lines=[item["path"] for item in saved])
