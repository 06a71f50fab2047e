"""``motionsep evaluate``: text alignment, temporal consistency, motion fidelity, leakage."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.markup import escape

from motionsep_cli._console import RichProgress, emit, err_console, relaunch_as
from motionsep_cli._options import (
    ConfigOption,
    ForceOption,
    JsonOption,
    NumProcessesOption,
    PresetOption,
    SetOption,
)

if TYPE_CHECKING:
    from motionsep.evaluate import EvaluationReport

HELP = """Score generated videos: CLIP text alignment (CLIP-T), temporal consistency,
motion fidelity against reference clips, and appearance leakage.

VIDEOS are mp4/gif files, folders of PNG frames (generate --format png), or
folders of those. Each video's prompt comes from the JSON sidecar generate
wrote beside it unless --prompt is given. Videos are grouped by motion,
recipe, highway, PLI and seed set (from the sidecars); the table (stderr)
shows every video and each group's mean ± std. stdout gets one line per group,
or the whole report as JSON with --json.

--metrics picks what to compute: motion (motion fidelity: point tracks against
the references, no CLIP), leakage (CLIP image similarity to the references),
clip-t (CLIP text alignment), consistency (CLIP similarity of neighbouring
frames). CLIP is loaded only for the last three. Without --metrics, everything
that can run is computed: with no CLIP model in the store that is motion
fidelity alone, and the table says why the other columns are empty (`motionsep
download clip`, or --clip-model PATH, adds them).

With --ablation, generates the paper's ablation for --motion over the prompts
of --prompts-file and --seeds seeds (base model, MotionDirector when a motion
NAME-motiondirector or another motiondirector motion of the same clips is
installed, TAP, TAP + AH, TAP + AH + PLI) into --out, then evaluates it into
one table. Videos generated before with identical settings are reused.

Examples:

  motionsep evaluate outputs/ --reference clips/ --json

  motionsep evaluate outputs/ --reference clips/dolly.mp4 --csv scores.csv --plot scores.png

  motionsep evaluate outputs/ --reference clips/dolly.mp4 --metrics motion

  motionsep evaluate --ablation --motion dolly --prompts-file prompts.txt --seeds 4 \
      --reference clips/dolly.mp4
"""

_ABLATION = "Ablation"
# Fidelity lies in [-1, 1]; the CLIP scores are x100.
_DIGITS = {"motion_fidelity": 3}
_OUTPUT = "Output"


def evaluate(
    videos: Annotated[
        list[Path] | None,
        typer.Argument(help="Videos, PNG-frame folders, or folders of them.", show_default=False),
    ] = None,
    reference: Annotated[
        list[Path] | None,
        typer.Option(
            "--reference",
            "-r",
            help="Reference clips or folders (repeatable): motion fidelity and leakage.",
        ),
    ] = None,
    prompt: Annotated[
        str | None,
        typer.Option("--prompt", help="Prompt of every video (default: each video's sidecar)."),
    ] = None,
    clip_model: Annotated[
        str | None,
        typer.Option("--clip-model", help="CLIP model: store name (clip), hub id, or folder."),
    ] = None,
    metric_options: Annotated[
        list[str] | None,
        typer.Option(
            "--metrics",
            "-m",
            help="motion, leakage, clip-t, consistency (comma-separated or repeated; "
            "default: all that can run).",
        ),
    ] = None,
    as_json: JsonOption = False,
    csv_file: Annotated[
        Path | None,
        typer.Option(
            "--csv", help="Write every video and group row to this CSV.", rich_help_panel=_OUTPUT
        ),
    ] = None,
    plot_file: Annotated[
        Path | None,
        typer.Option(
            "--plot", help="Write a bar chart of the groups (PNG).", rich_help_panel=_OUTPUT
        ),
    ] = None,
    ablation: Annotated[
        bool,
        typer.Option(
            "--ablation",
            help="Generate and evaluate the paper's ablation.",
            rich_help_panel=_ABLATION,
        ),
    ] = False,
    motion: Annotated[
        str | None,
        typer.Option(
            "--motion",
            help="The motion of the ablation (name or folder).",
            rich_help_panel=_ABLATION,
        ),
    ] = None,
    prompts_file: Annotated[
        Path | None,
        typer.Option(
            "--prompts-file",
            help="Prompts of the ablation, one per line.",
            rich_help_panel=_ABLATION,
        ),
    ] = None,
    seeds: Annotated[
        int,
        typer.Option("--seeds", help="Seeds per prompt and row.", min=1, rich_help_panel=_ABLATION),
    ] = 1,
    out: Annotated[
        Path | None,
        typer.Option(
            "--out",
            "-o",
            help="Folder of the ablation's videos (default outputs/ablation-MOTION).",
            rich_help_panel=_ABLATION,
        ),
    ] = None,
    batch_size: Annotated[
        int | None,
        typer.Option(
            "--batch-size",
            help="Videos denoised together (sample.batch_size, default 4).",
            min=1,
            rich_help_panel=_ABLATION,
        ),
    ] = None,
    num_processes: NumProcessesOption = 1,
    force: ForceOption = False,
    no_report: Annotated[
        bool,
        typer.Option(
            "--no-report",
            help="Skip the HTML page (FOLDER/report/index.html when VIDEOS is one folder, or "
            "the ablation's --out).",
            rich_help_panel=_OUTPUT,
        ),
    ] = False,
    preset: PresetOption = None,
    config: ConfigOption = None,
    set_options: SetOption = None,
) -> None:
    from motionsep.config import load_settings
    from motionsep.errors import UsageError
    from motionsep.evaluate import parse_metrics
    from motionsep.userfiles import check_new_files

    metric_names = parse_metrics(metric_options)
    overrides: dict[str, Any] = {"eval": {"clip_model": clip_model}}
    settings = load_settings(
        preset=preset, config_file=config, overrides=overrides, set_options=set_options
    )
    # Refuse what would not be written before any video is scored or generated.
    check_new_files([p for p in (csv_file, plot_file) if p is not None], force=force)
    page = _PageCheck(settings.store.home, enabled=not no_report)
    if ablation:
        if videos:
            raise UsageError(
                "--ablation generates its own videos; do not pass VIDEOS with it",
                "drop the video arguments, or drop --ablation to score them",
            )
        if motion is None or prompts_file is None:
            raise UsageError(
                "--ablation needs --motion NAME and --prompts-file FILE",
                "e.g. motionsep evaluate --ablation --motion dolly --prompts-file prompts.txt",
            )
        relaunch_as(num_processes)
        shared = _ablation(
            motion,
            prompts_file,
            seeds,
            out,
            reference,
            batch_size,
            overrides,
            preset,
            config,
            set_options,
            as_json,
            metric_names,
            page,
        )
        if shared is None:
            return  # another process of the run scores and reports
        report = shared
    else:
        if not videos:
            raise UsageError(
                "no videos given", "pass videos or folders, e.g. motionsep evaluate outputs/"
            )
        from motionsep.evaluate import evaluate_videos

        page.check(videos[0] if len(videos) == 1 and videos[0].is_dir() else None)
        with RichProgress() as progress:
            report = evaluate_videos(
                videos,
                settings,
                references=reference,
                prompt=prompt,
                metric_names=metric_names,
                progress=progress,
            )
        if as_json:
            emit(report.to_dict(), True)
    _show(report, title="ablation" if ablation else "evaluation")
    page.write(_report_folder(videos, report), report, reference or [])
    if csv_file is not None:
        err_console.print(f"wrote {report.write_csv(csv_file, force=force)}", markup=False)
    if plot_file is not None:
        err_console.print(f"wrote {report.plot(plot_file, force=force)}", markup=False)
    if not as_json:
        emit(None, False, lines=_summary_lines(report))


class _PageCheck:
    """The HTML page evaluate writes into FOLDER/report: checked before the work, written after.

    The page replaces only a report page motionsep wrote there (its marker),
    and says so; anything else at FOLDER/report stops the command before any
    video is scored.
    """

    def __init__(self, store_home: Path, enabled: bool) -> None:
        self.store_home = store_home
        self.enabled = enabled

    def check(self, folder: Path | None) -> None:
        """Refuses a FOLDER/report that is not a page motionsep wrote (before any work)."""
        from motionsep.userfiles import OutputKind, check_new_folder

        if not self.enabled or folder is None:
            return
        check_new_folder(
            folder / "report",
            OutputKind.REPORT,
            force=True,
            store_home=self.store_home,
            instead="--no-report",
        )

    def write(self, folder: Path | None, report: EvaluationReport, references: list[Path]) -> None:
        from motionsep.report import write_report
        from motionsep.userfiles import read_marker

        if not self.enabled or folder is None:
            return
        self.check(folder)
        replacing = read_marker(folder / "report") is not None
        with RichProgress() as progress:
            page = write_report(
                folder,
                folder / "report",
                scores=report.to_dict(),
                references=references,
                force=True,
                store_home=self.store_home,
                progress=progress,
            )
        again = " (it replaces the page written there before)" if replacing else ""
        err_console.print(f"[green]page:[/] {escape(str(page))}{again} (open it in a browser)")


def _report_folder(videos: list[Path] | None, report: EvaluationReport) -> Path | None:
    """Where the HTML page goes: VIDEOS when it is one folder, or the ablation's folder."""
    import os

    if videos:
        return videos[0] if len(videos) == 1 and videos[0].is_dir() else None
    # the ablation: its rows are folders of one output folder
    return (
        Path(os.path.commonpath([v.path.resolve() for v in report.videos]))
        if report.videos
        else None
    )


def _ablation(
    motion: str,
    prompts_file: Path,
    seeds: int,
    out: Path | None,
    reference: list[Path] | None,
    batch_size: int | None,
    overrides: dict[str, Any],
    preset: str | None,
    config: Path | None,
    set_options: list[str] | None,
    as_json: bool,
    metric_names: tuple[str, ...] | None,
    page: _PageCheck,
) -> EvaluationReport | None:
    """Runs the ablation; None in the processes of a shared run that do not score it."""
    from motionsep.devices import resolve_device
    from motionsep.errors import UsageError
    from motionsep.evaluate import run_ablation
    from motionsep.launch import current_shard
    from motionsep.sample import load_motion_and_settings, read_prompts_file

    package, settings = load_motion_and_settings(
        motion, preset=preset, config_file=config, set_options=set_options, overrides=overrides
    )
    if package is None:
        raise UsageError("--ablation needs a learned motion", "pass --motion NAME")
    prompts = read_prompts_file(prompts_file)
    target = out if out is not None else Path("outputs") / f"ablation-{package.name}"
    shard = current_shard(resolve_device(settings.model.device).type)
    if shard.is_main:
        page.check(target)
        err_console.print(
            f"ablation of motion {package.name} ({package.metadata.recipe.value}): "
            f"{len(prompts)} prompt(s) x {seeds} seed(s) into {escape(str(target))}"
            + (f", {shard.count} processes" if shard.count > 1 else "")
        )
    with RichProgress(enabled=shard.is_main) as progress:
        result = run_ablation(
            package,
            prompts,
            settings,
            out=target,
            seeds=seeds,
            references=reference,
            batch_size=batch_size,
            metric_names=metric_names,
            shard=shard,
            progress=progress,
        )
    if result is None:
        return None
    err_console.print(f"generated {result.generated} video(s), reused {result.reused}")
    if as_json:
        emit(result.to_dict(), True)
    return result.report


def _show(report: EvaluationReport, title: str) -> None:
    from rich.table import Table

    from motionsep.evaluate import format_value
    from motionsep.outputs import METRIC_TITLES, METRICS

    table = Table(title=title, show_lines=False)
    table.add_column("video / group")
    table.add_column("n", justify="right")
    for name in METRICS:
        table.add_column(METRIC_TITLES[name], justify="right")
    for video in report.videos:
        table.add_row(
            f"{video.path.name}  [dim]{video.group.label}[/]",
            "",
            *(format_value(video.metric(n), digits=_DIGITS.get(n, 2)) for n in METRICS),
        )
    table.add_section()
    for group in report.groups:
        table.add_row(
            f"[bold]{group.key.label}[/]",
            str(group.count),
            *(format_value(group.mean[n], group.std[n], digits=_DIGITS.get(n, 2)) for n in METRICS),
        )
    err_console.print(table)
    for name, why in report.skipped.items():
        err_console.print(f"[yellow]{METRIC_TITLES[name]} not computed:[/] {escape(why)}")


def _summary_lines(report: EvaluationReport) -> list[str]:
    from motionsep.evaluate import format_value
    from motionsep.outputs import METRICS

    lines = []
    for group in report.groups:
        values = "  ".join(
            f"{name}={format_value(group.mean[name], group.std[name], _DIGITS.get(name, 2))}"
            for name in METRICS
        )
        lines.append(f"{group.key.label}\tn={group.count}\t{values}")
    return lines
