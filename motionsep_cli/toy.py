"""``motionsep toy``: the built-in toy world (clips, pretraining, experiment)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape

from motionsep_cli._console import RichProgress, emit, err_console
from motionsep_cli._options import (
    ConfigOption,
    ForceOption,
    JsonOption,
    PresetOption,
    SetOption,
    settings_from_cli,
)

HELP = """The toy world: a small world where motion customization runs on a CPU and can be scored.

One coloured shape (square, circle, triangle) moves on a grey background
(plain, striped, checked) in 32x32 clips of 8 frames. The built-in `toy`
model was pretrained on the motions static, left, right, up, down, zoom-in
and zoom-out; diagonal, orbit, bounce and dolly are held out for motion
customization. Segmentation with the known palette reads every video's
object colour, path and background, which the toy metrics compare with the
prompt and the reference clips. Whether recipes separate motion from
appearance on the shipped toy model is what `toy experiment` measures; the
README has its tables.

Examples:

  motionsep toy clips refs/ --motion diagonal --count 3

  motionsep toy experiment --motions diagonal --seeds 3 --out toy-report/

  motionsep toy pretrain --name toy-mine
"""

app = typer.Typer(no_args_is_help=True, help=HELP)


@app.command("clips")
def clips(
    out: Annotated[Path, typer.Argument(help="Folder to write the clips into.")],
    motion: Annotated[str, typer.Option("--motion", help="Motion of the clips.")] = "diagonal",
    count: Annotated[int, typer.Option("--count", min=1, help="How many clips.")] = 3,
    color: Annotated[str, typer.Option("--color")] = "red",
    shape: Annotated[str, typer.Option("--shape")] = "square",
    background: Annotated[str, typer.Option("--background")] = "white",
    texture: Annotated[str, typer.Option("--texture")] = "striped",
    seed: Annotated[
        int, typer.Option("--seed", min=0, help="Seed of the small random offsets.")
    ] = 0,
    force: Annotated[
        bool,
        typer.Option(
            "--force",
            help="Replace OUT, only if it holds clips this command wrote and nothing else.",
        ),
    ] = False,
    as_json: JsonOption = False,
) -> None:
    """Render toy clips as mp4 files, each with its prompt (NAME.txt) and ground truth (NAME.json).

    The folder can go straight to `motionsep train ... --preset toy`. OUT must
    be new or empty: a folder with files in it is refused unless --force, and
    even then replaced only if it holds the clips of an earlier `toy clips`
    and nothing else. The clips appear all at once, or not at all.

    Example: motionsep toy clips refs/ --motion orbit --color blue --shape circle
    """
    from motionsep.config import load_settings
    from motionsep.errors import UsageError
    from motionsep.toy import world
    from motionsep.toy.experiment import write_clips
    from motionsep.userfiles import OutputKind, new_folder

    try:
        specs = [
            world.ClipSpec(color, shape, background, texture, motion, seed=seed * 1000 + k)
            for k in range(count)
        ]
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    store_home = load_settings().store.home
    with new_folder(
        out,
        OutputKind.CLIPS,
        force=force,
        store_home=store_home,
        instead="another OUT",
        empty_is_new=True,
    ) as folder:
        written = write_clips(specs, folder)
    paths = [out / path.name for path in written]
    err_console.print(f"[green]wrote[/] {len(paths)} clips: {escape(specs[0].prompt)}")
    emit([str(p) for p in paths], as_json, lines=[str(p) for p in paths])


@app.command("pretrain")
def pretrain(
    name: Annotated[
        str, typer.Option("--name", help="Install the model in the store under this name.")
    ] = "toy",
    out: Annotated[
        Path | None,
        typer.Option("--out", help="Write the model folder here instead of into the store."),
    ] = None,
    steps: Annotated[int | None, typer.Option("--steps", help="U-Net steps.")] = None,
    vae_steps: Annotated[int | None, typer.Option("--vae-steps", help="VAE steps.")] = None,
    batch: Annotated[int | None, typer.Option("--batch", help="Clips per U-Net step.")] = None,
    lr: Annotated[float | None, typer.Option("--lr", help="U-Net learning rate.")] = None,
    seed: Annotated[int | None, typer.Option("--seed", help="Seed of all data and noise.")] = None,
    probe_every: Annotated[
        int | None,
        typer.Option("--probe-every", help="Sample and score the model every N U-Net steps."),
    ] = None,
    probe_count: Annotated[
        int | None, typer.Option("--probe-count", help="Videos per probe (and the final one).")
    ] = None,
    checkpoint_every: Annotated[
        int | None, typer.Option("--checkpoint-every", help="Checkpoint every N steps.")
    ] = None,
    head_width: Annotated[
        int | None,
        typer.Option(
            "--head-width",
            help="Width of each attention head (diffusers' attention_head_dim; ZeroScope: 64).",
        ),
    ] = None,
    speed_jitter: Annotated[
        float | None,
        typer.Option(
            "--speed-jitter", help="Vary each clip's speed by up to this share (never captioned)."
        ),
    ] = None,
    attribute_dropout: Annotated[
        float | None,
        typer.Option(
            "--attribute-dropout",
            help="Leave the object, colour and background out of captions this often (each).",
        ),
    ] = None,
    motion_dropout: Annotated[
        float | None,
        typer.Option(
            "--motion-dropout",
            help="Leave the motion phrase out of captions this often (the frames must then "
            "tell each other which way the object moves).",
        ),
    ] = None,
    trail_opacity: Annotated[
        float | None,
        typer.Option(
            "--trail-opacity", help="Opacity of the motion trail behind the object (0: none)."
        ),
    ] = None,
    conv_skip: Annotated[
        float | None,
        typer.Option(
            "--conv-skip",
            help="Share of U-Net steps trained with every temporal convolution bypassed "
            "(stochastic depth: the temporal attention must carry motion alone there; "
            "1 leaves them at their identity initialisation, so only the attention mixes frames).",
        ),
    ] = None,
    conv_keep: Annotated[
        str | None,
        typer.Option(
            "--conv-keep",
            help="Temporal convolutions under these module paths (comma-separated, e.g. "
            "'down_blocks.0.temp_convs.0') are never bypassed by --conv-skip.",
        ),
    ] = None,
    vae_from: Annotated[
        str | None,
        typer.Option(
            "--vae-from",
            help="Take a trained VAE from this toy model folder ('toy': the built-in one) "
            "instead of training one; needs --vae-steps 0.",
        ),
    ] = None,
    init_from: Annotated[
        str | None,
        typer.Option(
            "--init-from",
            help="Start the U-Net and text encoder from this toy model folder ('toy': the "
            "built-in one) instead of random weights: fine-tune it under new levers.",
        ),
    ] = None,
    family: Annotated[
        str | None,
        typer.Option(
            "--family",
            help="zeroscope (a 3D U-Net, the built-in toy's family) or animatediff (motion "
            "modules with frame positions and no temporal convolution; start it from the 3D "
            "toy's spatial layers with --init-from toy).",
        ),
    ] = None,
    device: Annotated[str, typer.Option("--device", help="cpu, cuda, cuda:N.")] = "cpu",
    workers: Annotated[
        int, typer.Option("--workers", min=0, help="Processes rendering clips ahead (0: inline).")
    ] = 0,
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue from the newest checkpoint.")
    ] = False,
    force: ForceOption = False,
    as_json: JsonOption = False,
    preset: PresetOption = None,
    config: ConfigOption = None,
    set_options: SetOption = None,
) -> None:
    """Pretrain a toy base model on the toy world (from scratch: about 2 h on 2 CPU cores).

    First the VAE, then the U-Net (a 3D one; a motion U-Net with --family
    animatediff) and the text encoder; the exported model
    is an exponential moving average. Everything is seeded: a rerun draws the
    same clips and noise. Checkpoints go to models/.partial-NAME (or
    OUT.partial); Ctrl-C writes one, and --resume continues bit for bit. The
    settings and the command are recorded in the model's toy.json. With
    --init-from it fine-tunes a trained toy model instead of starting from
    random weights.

    Example: motionsep toy pretrain --name toy-mine --probe-every 500
    """
    from motionsep.store import Store, validate_name
    from motionsep.toy.pretrain import PretrainConfig, command_line
    from motionsep.toy.pretrain import pretrain as run_pretrain

    values = {
        "steps": steps,
        "vae_steps": vae_steps,
        "batch": batch,
        "lr": lr,
        "seed": seed,
        "probe_every": probe_every,
        "probe_count": probe_count,
        "checkpoint_every": checkpoint_every,
        "head_width": head_width,
        "speed_jitter": speed_jitter,
        "attribute_dropout": attribute_dropout,
        "vae_from": vae_from,
        "init_from": init_from,
        "trail_opacity": trail_opacity,
        "conv_skip": conv_skip,
        "conv_keep": conv_keep,
        "motion_dropout": motion_dropout,
        "family": family,
    }
    settings = settings_from_cli(preset, config, set_options, {"pretrain": values})
    run_config = PretrainConfig.from_settings(settings.pretrain)
    where = ["--out", str(out)] if out is not None else ["--name", name]
    command = command_line(where, run_config, device, workers)
    store = Store(settings.store.home)
    if out is not None:
        target, run_dir, finalize = out, out.with_name(out.name + ".partial"), None
    else:
        validate_name(name, "model name")
        target = store.model_path(name)
        run_dir = store.partial_model_dir(name)

        def finalize(folder: Path) -> None:
            store.write_model_record(folder, name, source="motionsep toy pretrain", revision=None)

    with RichProgress() as progress:
        result = run_pretrain(
            target,
            run_dir,
            run_config,
            resume=resume,
            force=force,
            device=device,
            workers=workers,
            command=command,
            finalize=finalize,
            remove_run=True,
            progress=progress,
        )
    probe = result.probe or {}
    err_console.print(
        f"[green]pretrained[/] {escape(str(result.folder))} in {result.seconds / 60:.1f} min; "
        "held-in probe: "
        + ", ".join(
            f"{k} {probe[k]:.2f}" for k in ("color", "direction") if probe.get(k) is not None
        )
    )
    emit(result.to_dict(), as_json, lines=[str(result.folder)])


@app.command("snapshot")
def snapshot(
    run: Annotated[Path, typer.Argument(help="The run folder of a pretraining (NAME.partial).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Model folder to write.")],
    step: Annotated[
        int | None, typer.Option("--step", help="That step's checkpoint (default: the newest).")
    ] = None,
    force: ForceOption = False,
    as_json: JsonOption = False,
) -> None:
    """Write the newest intact checkpoint of an unfinished pretraining as a model folder.

    The averaged U-Net and text encoder and the VAE, as the end of the run
    would write them; toy.json records the run's settings and the step. Use it
    to probe a run while it goes on (the run is not touched).

    Example: motionsep toy snapshot models/.partial-toy-mine --out snap && motionsep toy
    probe --attention --model snap
    """
    from motionsep.toy.pretrain import export_checkpoint

    folder = export_checkpoint(run, out, force=force, step=step)
    step = json.loads((folder / "toy.json").read_text())["exported_from"]["step"]
    err_console.print(f"[green]snapshot[/] of step {step}: {escape(str(folder))}")
    emit({"model": str(folder), "step": step}, as_json, lines=[str(folder)])


@app.command("probe")
def probe(
    model: Annotated[
        str, typer.Option("--model", "-m", help="Toy model: store name or folder.")
    ] = "toy",
    count: Annotated[
        int | None,
        typer.Option(
            "--count",
            min=1,
            help="Videos to sample (default 112, the seven pretraining motions in turn); "
            "with --attention, clips to measure (default 28).",
        ),
    ] = None,
    seed: Annotated[
        int, typer.Option("--seed", help="Seed of the looks and the noise (both modes).")
    ] = 1000,
    steps: Annotated[
        int, typer.Option("--steps", min=1, help="DDIM steps (ignored with --attention).")
    ] = 25,
    guidance: Annotated[
        float, typer.Option("--guidance", help="Guidance scale (ignored with --attention).")
    ] = 6.0,
    attention: Annotated[
        bool,
        typer.Option(
            "--attention",
            help="Measure whether the model uses its temporal attention instead of sampling.",
        ),
    ] = False,
    as_json: JsonOption = False,
) -> None:
    """Sample held-in prompts from a toy model and score them, or gate its temporal attention.

    Reports how often the object has the prompt's colour, shape and
    background, and moves the way the prompt says (all seven pretraining
    motions; "direction" counts only left, right, up and down).

    With --attention it samples nothing: it noises held-in clips at timesteps
    100, 300, 500, 700 and 900 with fixed noise and reports the denoising
    loss of the intact model, and its ratio when every temporal attention is
    made uniform (each frame takes the mean of all frames:
    uniform_attention_loss_ratio) and when every temporal convolution is
    bypassed (no_temporal_conv_loss_ratio), plus the entropy of each temporal
    attention layer (nats; ln 8 = 2.08 is uniform over 8 frames). A ratio near
    1 means the model does not use what was removed; a model whose attention
    carries motion should reach uniform_attention_loss_ratio >= 1.25. About
    20 s on 2 CPU cores.

    Examples:

      motionsep toy probe --model toy-mine --count 112

      motionsep toy probe --attention --json
    """
    from motionsep.config import load_settings
    from motionsep.model.components import load_components
    from motionsep.store import Store

    store = Store(load_settings().store.home)
    components = load_components(store.resolve_model(model))
    if attention:
        _attention_gate(components, count, seed, as_json)
        return
    from motionsep.toy.probe import probe as run_probe

    count = 112 if count is None else count
    with err_console.status(f"sampling {count} videos"):
        summary = run_probe(components, count=count, seed=seed, steps=steps, guidance=guidance)
    result = {k: v for k, v in summary.items() if k not in ("frames", "specs")}
    lines = [
        f"{key}: {result[key]:.3f}"
        for key in ("color", "shape", "background", "motion", "direction")
        if result.get(key) is not None
    ]
    for asked, drawn in result["confusion"].items():
        counts = ", ".join(f"{k} {n}" for k, n in sorted(drawn.items(), key=lambda kv: -kv[1]))
        lines.append(f"asked {asked}: drew {counts}")
    emit(result, as_json, lines=lines)


def _attention_gate(components: Any, count: int | None, seed: int, as_json: bool) -> None:
    """``probe --attention``: runs the gate and renders its report."""
    from motionsep.toy.attention_gate import GATE_CLIPS, UNIFORM_BAR, attention_gate

    with RichProgress() as progress:
        result = attention_gate(
            components, clips=GATE_CLIPS if count is None else count, seed=seed, progress=progress
        )
    ratio = result["uniform_attention_loss_ratio"]
    verdict = "meets" if ratio >= UNIFORM_BAR else "below"
    lines = [
        f"uniform_attention_loss_ratio: {ratio:.3f} ({verdict} the bar {UNIFORM_BAR}; "
        "near 1: the temporal attention is not used)",
        f"no_temporal_conv_loss_ratio: {result['no_temporal_conv_loss_ratio']:.3f}",
        f"no_temporal_mixing_loss_ratio: {result['no_temporal_mixing_loss_ratio']:.3f} "
        "(both: what frame-to-frame information beyond the mean of the frames is worth)",
        f"loss: {result['loss']:.5f} (intact; {result['clips']} clips at timesteps "
        + ", ".join(str(t) for t in result["timesteps"])
        + ")",
        f"mean_entropy: {result['mean_entropy']:.3f} of max {result['max_entropy']:.3f} nats",
    ]
    lines += [
        f"t={row['timestep']}: uniform {row['uniform_attention_loss_ratio']:.3f}, "
        f"no conv {row['no_temporal_conv_loss_ratio']:.3f}, loss {row['loss']:.5f}"
        for row in result["per_timestep"]
    ]
    lines += [f"{layer['entropy']:.3f}  {layer['name']}" for layer in result["layers"]]
    emit(result, as_json, lines=lines)


@app.command("experiment")
def experiment(
    out: Annotated[Path, typer.Option("--out", help="Report folder.")] = Path("toy-experiment"),
    protocol: Annotated[
        str,
        typer.Option(
            "--protocol",
            help="named: references in a look their captions name in full (200 steps); "
            "leak: references in a look no word names (magenta, dotted), captioned by the "
            "motion alone, 500 steps.",
        ),
    ] = "named",
    motions: Annotated[
        list[str] | None,
        typer.Option(
            "--motions", help="Held-out motions to learn (repeatable; default: all four)."
        ),
    ] = None,
    seeds: Annotated[int, typer.Option("--seeds", min=1, help="Repeats per condition.")] = 3,
    recipes: Annotated[
        list[str] | None,
        typer.Option(
            "--recipes",
            help="Recipes to compare (repeatable; default: motiondirector paper reference).",
        ),
    ] = None,
    references: Annotated[
        int, typer.Option("--references", min=1, help="Reference clips per motion and seed.")
    ] = 3,
    prompts: Annotated[
        int, typer.Option("--prompts", min=1, help="New-look prompts per motion.")
    ] = 4,
    fresh: Annotated[
        bool, typer.Option("--fresh", help="Redo the runs already finished in OUT.")
    ] = False,
    model: Annotated[
        str | None,
        typer.Option(
            "--model",
            help="Base model to customize: toy (ZeroScope layout, the default) or "
            "toy-animatediff (AnimateDiff layout).",
        ),
    ] = None,
    units: Annotated[
        Path | None,
        typer.Option(
            "--units",
            help="Also keep each finished unit's scores (a few KB of JSON, no frames) in "
            "this folder, and reuse the units found there: commit it and a later run "
            "continues the table. A unit is reused only if it was made under the same "
            "resolved settings, model weights, protocol and counts; a folder holding the "
            "protocol's units made another way is refused, never written over.",
        ),
    ] = None,
    jobs: Annotated[
        int,
        typer.Option(
            "--jobs",
            min=1,
            help="Worker processes making units side by side, each with an equal share of "
            "the threads. On 2 cores, 2 jobs made 1.6x the units per hour of one job "
            "(2 units; bench/inner_loop.py, README). A unit made with fewer threads "
            "rounds differently, and training carries that into the scores: close to one "
            "job's (largest difference 0.014 in motion fidelity in the bench), not equal.",
        ),
    ] = 1,
    set_options: SetOption = None,
    no_report: Annotated[
        bool, typer.Option("--no-report", help="Skip the HTML page (OUT/report/index.html).")
    ] = False,
    as_json: JsonOption = False,
) -> None:
    """Learn held-out motions under each recipe; measure motion, appearance and leakage.

    For each motion and seed: reference clips in one look, a motion trained
    per recipe, videos of new looks with the highway on and off, and the base
    model on the same prompts and noise. Every recipe row reports its paired
    difference from the base model (Δ, mean ± 95% interval over seeds); a
    positive control row (the base model drawing motions it was pretrained
    on) shows how high the motion metrics go. Leakage is continuous: 0 is the
    prompt's look, 1 the references' look (object colour, background shade
    and texture). Writes results.md, results.json, frames.png and
    report/index.html (seed 0's videos of every condition side by side) to OUT.
    Each finished run is kept in OUT/runs: run the same command again after a
    stop and it continues (a change of settings redoes what it touches).
    Times on 2 CPU cores (toy-animatediff): one motion, one recipe, one seed about 1.5 min
    (named) or 3.5 min (leak); --jobs 2 makes two at a time.

    Examples:

      motionsep toy experiment --motions diagonal --motions orbit --seeds 3

      motionsep toy experiment --protocol leak --motions diagonal --recipes motiondirector

      motionsep toy experiment --model toy-animatediff --jobs 2
    """
    from motionsep.config import load_settings
    from motionsep.toy import world
    from motionsep.toy.experiment import RECIPES, run_experiment
    from motionsep.userfiles import OutputKind, check_new_folder

    if not no_report:  # a page that may not be replaced stops the experiment before it starts
        store_home = load_settings().store.home
        check_new_folder(
            out / "report",
            OutputKind.REPORT,
            force=True,
            store_home=store_home,
            instead="--no-report",
        )
    with RichProgress() as progress:
        results = run_experiment(
            out,
            motions or list(world.HELD_OUT_MOTIONS),
            seeds=seeds,
            recipes=recipes or list(RECIPES),
            references=references,
            prompts=prompts,
            set_options=set_options,
            progress=progress,
            fresh=fresh,
            protocol=protocol,
            model=model,
            units=units,
            jobs=jobs,
        )
    err_console.print((out / "results.md").read_text(), markup=False, soft_wrap=True)
    if not no_report:
        from motionsep.report import write_report

        page = write_report(out, out / "report", force=True)
        err_console.print(f"[green]page:[/] {escape(str(page))} (open it in a browser)")
    emit(results, as_json, lines=[str(out / "results.md")])
