"""``motionsep motions``: list, show, remove, rename, import and export motions."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.markup import escape

from motionsep.library import LIST_FIELDS
from motionsep.model.interop import ExportFormat, ImportFormat
from motionsep_cli._console import emit, err_console
from motionsep_cli._options import ForceOption, JsonOption, ModelOption

if TYPE_CHECKING:
    from motionsep.library import MotionSummary
    from motionsep.store import Store

HELP = """Manage the motions in the store: list, show, rm, rename, import, export.

Motions live in $MOTIONSEP_HOME/motions/NAME. `import` brings in the paper's
released checkpoints (cloneofsimo LoRA lists), MotionDirector temporal LoRAs,
peft adapters, diffusers LoRAs and AnimateDiff MotionLoRAs; `export` writes a
motion as a peft adapter folder, an upstream LoRA file the paper's own scripts
load, or (AnimateDiff motions) a LoRA AnimateDiffPipeline.load_lora_weights loads.

Examples:

  motionsep motions list

  motionsep motions list --json | jq -r '.[] | select(.recipe == "paper") | .name'

  motionsep motions import dolly_zoom_unet.pt --name dolly-upstream

  motionsep motions export dolly --format peft --out dolly-peft/

  motionsep motions import v2_lora_ZoomIn.ckpt --name zoom-in --model animatediff
"""

LIST_HELP = """List the motions in the store.

The table goes to stderr, the names to stdout (one per line). With --json,
stdout is one JSON list of objects, sorted by name, with sorted keys; every
object has exactly these fields (null when unknown):

{fields}

Only motion.json is read (fast); `motions show NAME` verifies the files.

Examples:

  motionsep motions list

  motionsep motions list --json | jq -r '.[].name'
"""

SHOW_HELP = """Show one motion and verify its files (sha256 of every file).

Prints the fields of `motions list` plus the LoRA targets, prompts and
training facts. Exit code 1 when the package is damaged.

Examples:

  motionsep motions show dolly

  motionsep motions show dolly --json | jq .lora.targets
"""

RM_HELP = """Remove the motion NAME from the store.

Asks for confirmation unless --yes; without a terminal on stdin it refuses
(exit 2) unless --yes is given. Refuses while a training of NAME runs.

Examples:

  motionsep motions rm dolly

  motionsep motions rm dolly --yes
"""

RENAME_HELP = """Rename the motion OLD to NEW (atomic; never replaces an existing NEW).

Refuses while a training of OLD or NEW runs. The package stays valid: its
checksums do not depend on the name.

Examples:

  motionsep motions rename dolly dolly-v1
"""

IMPORT_HELP = """Import a motion LoRA from another program as the motion NAME.

Formats (--format; auto: a folder with adapter_config.json is peft, one with
pytorch_lora_weights.safetensors diffusers; a file is animatediff or diffusers
when its tensor names say so, else upstream):

  upstream        the paper's released checkpoints: cloneofsimo LoRA lists
                  [up0, down0, up1, down1, ...] over the temporal transformers'
                  attn1/attn2 to_k and to_out.0 (recipe reference), as .pt
                  (read only with torch.load(weights_only=True)) or .safetensors
                  (keys "unet:<i>:up"/"unet:<i>:down", or "0", "1", ...). The
                  recipe follows from the tensor count; a list whose to_out.0
                  pairs are all zero (what `export` writes for a paper motion)
                  becomes a paper motion again.

  motiondirector  a MotionDirector temporal LoRA (.pt list over attn1, attn2
                  q/k/v/out and ff of every temporal transformer).

  peft            a peft adapter folder (adapter_config.json +
                  adapter_model.safetensors) of one recipe's modules.

  diffusers       an AnimateDiff LoRA as save_lora_weights writes it: a
                  folder with pytorch_lora_weights.safetensors (or the file),
                  keys unet.<module>.lora_A.weight / .lora_B.weight, alpha
                  from its adapter metadata (without: alpha = rank).

  animatediff     an original AnimateDiff MotionLoRA (.ckpt, read only with
                  torch.load(weights_only=True), or .safetensors), keys like
                  ...motion_modules.0.temporal_transformer.transformer_blocks
                  .0.attention_blocks.0.processor.to_q_lora.down.weight;
                  scale 1.

For diffusers and animatediff the recipe follows from the projections the LoRA
adapts: to_k (paper), to_k + to_out.0 (reference), to_q/k/v/out.0 with or
without ff (motiondirector). Every temporal transformer must be covered; only
the mid block's may be missing (it then stays the base model's).

Every tensor is checked against the base model (--model, default: the
settings' model) before anything is written; a mismatch names what was
expected and what was found, exits 2 and leaves the store untouched. A LoRA
for the other base-model family (AnimateDiff onto ZeroScope, or the reverse)
is refused as such.

Examples:

  motionsep motions import dolly_zoom_unet.pt --name dolly-upstream

  motionsep motions import checkpoint-500/temporal/lora/500_unet.pt --name run \\
      --format motiondirector --model zeroscope

  motionsep motions import my-peft-adapter/ --name dolly2 --format peft

  motionsep motions import v2_lora_PanLeft.ckpt --name pan-left --model animatediff
"""

EXPORT_HELP = """Write the motion NAME in another program's format.

  peft      a folder with adapter_config.json + adapter_model.safetensors;
            load it with peft.PeftModel.from_pretrained(unet, FOLDER).

  upstream  one file in the paper's (cloneofsimo) LoRA list format. A name
            ending in .safetensors (preferred) gets save_safeloras keys
            "unet:<i>:up"/"unet:<i>:down"; a name ending in .pt gets a pickle
            of only a list of tensors, which the paper's infer.py loads (it
            looks for a file whose name contains "unet", e.g. lora/500_unet.pt).
            A paper motion is written in the reference layout with zero LoRA
            weights on to_out.0, the projection its recipe does not adapt.

  diffusers an AnimateDiff motion as a folder holding
            pytorch_lora_weights.safetensors (keys unet.<module>.lora_A.weight
            / .lora_B.weight; rank, alpha and targets in its metadata):
            AnimateDiffPipeline.load_lora_weights(FOLDER, adapter_name="m")
            then draws what `generate --no-highway` draws. ZeroScope motions
            are refused (exit 2): diffusers' TextToVideoSDPipeline cannot
            load LoRAs; use peft or upstream for them.

An existing --out is refused (exit 2) unless --force; even then a folder is
replaced only if it is an export motionsep wrote (it keeps a
.motionsep-output.json marker) holding nothing else, and nothing is ever
written inside the store.

Examples:

  motionsep motions export dolly --format peft --out dolly-peft/

  motionsep motions export dolly --format upstream --out dolly_unet.safetensors

  motionsep motions export dolly --format upstream --out lora/500_unet.pt

  motionsep motions export ad-dolly --format diffusers --out ad-dolly-lora/
"""


app = typer.Typer(
    name="motions",
    help=HELP,
    no_args_is_help=True,
    context_settings={"help_option_names": ["-h", "--help"]},
)

NameArgument = Annotated[str, typer.Argument(help="Motion name in the store.")]


def _store() -> Store:
    from motionsep.config import load_settings
    from motionsep.store import Store

    return Store(load_settings().store.home)


def _stdin_is_interactive() -> bool:
    """Whether a person can answer a prompt (tests replace this)."""
    return sys.stdin.isatty()


def _size(size: int) -> str:
    if size < 1000:
        return f"{size} B"
    value = size / 1000
    units = ["kB", "MB", "GB"]
    while value >= 1000 and len(units) > 1:
        value /= 1000
        units.pop(0)
    return f"{value:.1f} {units[0]}"


def _print_table(summaries: list[MotionSummary]) -> None:
    from rich.table import Table

    table = Table(title="motions")
    for column in ("name", "recipe", "base model", "rank", "size", "created", "clips", "preview"):
        table.add_column(column)
    for summary in summaries:
        row = summary.to_dict()
        if row["error"]:
            # The full reason is in --json and `motions show`; keep the table narrow.
            table.add_row(row["name"], "[red]damaged[/]", "", "", _size(row["size_bytes"]))
            continue
        table.add_row(
            row["name"],
            row["recipe"],
            row["base_model"],
            str(row["rank"]),
            _size(row["size_bytes"]),
            (row["created"] or "-")[:10],
            str(len(row["clips"])) if row["clips"] else "imported" if row["imported_from"] else "0",
            "yes" if row["preview"] else "-",
        )
    err_console.print(table)


@app.command(
    "list",
    help=LIST_HELP.format(
        fields="\n\n".join(f"  {key}: {text}" for key, text in LIST_FIELDS.items())
    ),
)
def list_motions(as_json: JsonOption = False) -> None:
    from motionsep.library import list_motions as summaries_of

    store = _store()
    summaries = summaries_of(store)
    _report_leftovers(store)
    if as_json:
        emit([summary.to_dict() for summary in summaries], True)
        return
    if summaries:
        _print_table(summaries)
    else:
        err_console.print("no motions yet: `motionsep train CLIPS --name NAME` or `motions import`")
    emit(None, False, lines=[summary.name for summary in summaries])


def _report_leftovers(store: Store) -> None:
    """Unfinished trainings and cut-off writes, on stderr (they are not motions)."""
    for leftover in store.motion_leftovers():
        size = _size(leftover.size_bytes)
        if leftover.kind == "unfinished training":
            err_console.print(
                f"[yellow]unfinished training[/] of {leftover.name!r} in "
                f"{escape(str(leftover.path))} ({size}): "
                f"continue with `motionsep train CLIPS --name {leftover.name} --resume`, "
                "or delete the folder to discard it",
                highlight=False,
                soft_wrap=True,
            )
        else:
            err_console.print(
                f"[yellow]cut-off write[/] {escape(str(leftover.path))} ({size}): an interrupted "
                "command left it; nothing reads it, delete it to free the space",
                highlight=False,
                soft_wrap=True,
            )


@app.command("show", help=SHOW_HELP)
def show(
    name: Annotated[str, typer.Argument(help="Motion name in the store, or a package folder.")],
    as_json: JsonOption = False,
) -> None:
    from motionsep.library import show_motion

    summary, package = show_motion(_store(), name)
    meta = package.metadata
    details = {
        **summary.to_dict(),
        "verified": True,
        "files": dict(package.files),
        "lora": {
            "targets": list(meta.lora_targets),
            "rank": meta.lora_rank,
            "alpha": meta.lora_alpha,
        },
        "prompts": list(meta.prompts),
        "recipe_settings": meta.to_dict()["recipe_settings"],
        "training": meta.training,
    }
    if as_json:
        emit(details, True)
        return
    base = meta.base_model
    imported = details["imported_from"]
    lines = [
        f"name:        {summary.name}",
        f"path:        {details['path']}",
        f"recipe:      {meta.recipe.value}",
        f"base model:  {base.id}" + (f" (revision {base.revision})" if base.revision else ""),
        f"LoRA:        rank {meta.lora_rank}, alpha {meta.lora_alpha:g}, "
        f"{len(meta.lora_targets)} layers",
        f"size:        {_size(summary.size_bytes)} in {len(package.files) + 1} files (verified)",
        f"created:     {meta.created or '-'} by motionsep {meta.motionsep_version or '?'}",
        f"clips:       {', '.join(details['clips']) or '-'}",
        f"prompts:     {' | '.join(meta.prompts) or '-'}",
        f"final loss:  {meta.final_loss:.4g}" if meta.final_loss is not None else "final loss:  -",
        f"preview:     {details['preview'] or '-'}",
    ]
    if imported:
        lines.append(f"imported:    {imported['source']} ({imported['format']})")
    emit(None, False, lines=lines)


@app.command("rm", help=RM_HELP)
def rm(
    name: NameArgument,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Remove without asking.")] = False,
    as_json: JsonOption = False,
) -> None:
    from motionsep.errors import UsageError
    from motionsep.library import remove_motion, summarize
    from motionsep.model.motion import resolve_motion
    from motionsep.store import validate_motion_name

    store = _store()
    validate_motion_name(name)
    folder = resolve_motion(store, name)
    if not yes:
        if not _stdin_is_interactive():
            raise UsageError(
                f"not removing motion {name!r}: confirmation needed, and stdin is not a terminal",
                f"pass --yes to remove it: `motionsep motions rm {name} --yes`",
            )
        size = _size(summarize(folder).size_bytes)
        if not typer.confirm(f"Remove motion {name!r} ({size}, {folder})?", err=True):
            err_console.print("nothing removed")
            raise typer.Exit(1)
    removed = remove_motion(store, name)
    err_console.print(f"[green]removed:[/] motion {name!r}")
    if as_json:
        emit({"name": name, "path": str(removed.resolve()), "removed": True}, True)
    else:
        emit(None, False, lines=[str(removed)])


@app.command("rename", help=RENAME_HELP)
def rename(
    old: Annotated[str, typer.Argument(help="Current motion name.")],
    new: Annotated[str, typer.Argument(help="New motion name (must not exist).")],
    as_json: JsonOption = False,
) -> None:
    from motionsep.library import rename_motion

    target = rename_motion(_store(), old, new)
    err_console.print(f"[green]renamed:[/] {old} -> {new}")
    if as_json:
        emit({"name": new, "old_name": old, "path": str(target.resolve())}, True)
    else:
        emit(None, False, lines=[str(target)])


@app.command("import", help=IMPORT_HELP)
def import_(
    source: Annotated[
        Path,
        typer.Argument(
            help="Upstream .pt/.safetensors, AnimateDiff .ckpt/.safetensors or diffusers "
            "LoRA file, or a peft / diffusers LoRA folder."
        ),
    ],
    name: Annotated[str, typer.Option("--name", help="Name of the new motion.")],
    fmt: Annotated[
        ImportFormat,
        typer.Option(
            "--format",
            help="Input format (auto: from the folder's files or the file's tensor names).",
        ),
    ] = ImportFormat.AUTO,
    model: ModelOption = None,
    force: ForceOption = False,
    as_json: JsonOption = False,
) -> None:
    from motionsep.config import load_settings
    from motionsep.model.interop import import_motion
    from motionsep.store import Store

    settings = load_settings(overrides={"model": {"name": model}})
    result = import_motion(
        Store(settings.store.home),
        source,
        name,
        model=settings.model.name,
        fmt=fmt,
        force=force,
    )
    for note in result.notes:
        err_console.print(f"note: {note}", markup=False)
    err_console.print(
        f"[green]imported:[/] {name} ({result.recipe.value}, rank {result.rank}) "
        f"on {escape(settings.model.name)}"
    )
    if as_json:
        emit(result.to_dict(), True)
    else:
        emit(None, False, lines=[str(result.path)])


@app.command("export", help=EXPORT_HELP)
def export(
    name: Annotated[str, typer.Argument(help="Motion name in the store, or a package folder.")],
    fmt: Annotated[ExportFormat, typer.Option("--format", help="Output format.")],
    out: Annotated[
        Path,
        typer.Option("--out", "-o", help="Output folder (peft, diffusers) or file (upstream)."),
    ],
    force: ForceOption = False,
    as_json: JsonOption = False,
) -> None:
    from motionsep.model.interop import export_motion
    from motionsep.model.motion import load_motion, resolve_motion

    store = _store()
    package = load_motion(resolve_motion(store, name))
    written = export_motion(package, fmt, out, force=force, store_home=store.home)
    err_console.print(
        f"[green]exported:[/] {package.name} ({package.metadata.recipe.value}) as {fmt.value}"
    )
    if as_json:
        emit({"name": package.name, "format": fmt.value, "path": str(written.resolve())}, True)
    else:
        emit(None, False, lines=[str(written)])
