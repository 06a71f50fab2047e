"""Motion customization measured exactly: ``motionsep toy experiment`` and ``motionsep demo``.

For a held-out motion the toy base model never saw, reference clips are
rendered with one fixed look. A motion is trained on them under each recipe,
then videos are generated for prompts with other looks, with the appearance
highway on and off, and every video is scored with the toy metrics: does the
object move like the references (motion fidelity), does it look like the
prompt (appearance), or like the references (leakage)?

Everything runs through the same library calls as the commands: clips are
written as mp4 files with prompt sidecars, ``train_motion`` prepares and
trains them, ``generate_videos`` samples, so the experiment measures the tool
as users run it.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from motionsep import __version__
from motionsep.errors import UsageError
from motionsep.progress import Progress, or_null
from motionsep.toy import metrics, world

REFERENCE_LOOK = ("red", "square", "white", "striped")
"""The one look every reference clip has."""

# Prompt looks that differ from the reference in every attribute.
PROMPT_LOOKS: tuple[tuple[str, str, str, str], ...] = (
    ("blue", "circle", "dark", "plain"),
    ("green", "triangle", "gray", "checked"),
    ("yellow", "circle", "gray", "plain"),
    ("purple", "triangle", "dark", "checked"),
    ("orange", "circle", "dark", "checked"),
    ("green", "circle", "gray", "plain"),
)

RECIPES = ("motiondirector", "paper", "reference")
TOY_PRESET = "toy"


@dataclass
class ToyRun:
    """One generation condition of the experiment, with its scores."""

    motion: str
    seed: int
    recipe: str | None
    highway: bool
    scores: list[metrics.Score] = field(default_factory=list)
    specs: list[world.ClipSpec] = field(default_factory=list)
    frames: list[np.ndarray] = field(default_factory=list, repr=False)
    train_seconds: float = 0.0

    @property
    def label(self) -> str:
        if self.recipe is None:
            return "base model"
        return f"{self.recipe} + highway" if self.highway else self.recipe


def reference_specs(motion: str, count: int, seed: int) -> list[world.ClipSpec]:
    """``count`` reference clips of ``motion``, all with :data:`REFERENCE_LOOK`."""
    return [
        world.ClipSpec(*REFERENCE_LOOK, motion=motion, seed=seed * 1000 + k) for k in range(count)
    ]


def prompt_specs(motion: str, count: int) -> list[world.ClipSpec]:
    """The held-out-look prompts of ``motion`` (first ``count`` of :data:`PROMPT_LOOKS`)."""
    if not 1 <= count <= len(PROMPT_LOOKS):
        raise UsageError(f"prompts must be between 1 and {len(PROMPT_LOOKS)} (got {count})")
    return [world.ClipSpec(*look, motion=motion) for look in PROMPT_LOOKS[:count]]


def write_clips(specs: Sequence[world.ClipSpec], folder: Path) -> list[Path]:
    """Writes clips as mp4 files with ``NAME.txt`` prompt and ``NAME.json`` ground truth."""
    from motionsep.video import write_video

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index, spec in enumerate(specs):
        clip = world.render(spec)
        stem = f"{spec.motion}-{index:02d}"
        path = write_video(clip.frames, folder / f"{stem}.mp4", fps=world.FPS, value_range=(0, 255))
        (folder / f"{stem}.txt").write_text(spec.prompt + "\n")
        truth = {
            "spec": spec.to_dict(),
            "prompt": spec.prompt,
            "centers": clip.centers.round(3).tolist(),
            "sizes": clip.sizes.round(3).tolist(),
        }
        (folder / f"{stem}.json").write_text(json.dumps(truth, indent=2) + "\n")
        paths.append(path)
    return paths


def _settings(
    store_home: Path | None, overrides: dict[str, Any], set_options: list[str] | None
) -> Any:
    """The toy preset under ``overrides``; ``store_home`` None keeps the user's store."""
    from motionsep.config import load_settings

    tree = dict(overrides) if store_home is None else {"store": {"home": store_home}, **overrides}
    return load_settings(preset=TOY_PRESET, overrides=tree, set_options=set_options)


def _score_run(
    run: ToyRun,
    frames: Sequence[np.ndarray],
    specs: Sequence[world.ClipSpec],
    references: list[world.Clip],
) -> None:
    for video, spec in zip(frames, specs, strict=True):
        reading = metrics.read_video(video)
        # the reference clips differ only by small offsets; score against the closest
        best = min(references, key=lambda ref: metrics.trajectory_error(reading, ref))
        run.scores.append(
            metrics.score(reading, spec, reference=best, reference_look=references[0].spec)
        )
        run.specs.append(spec)
        run.frames.append(video)


def _generate(
    settings: Any, package: Any, specs: Sequence[world.ClipSpec], components: Any, seed: int
) -> list[np.ndarray]:
    from motionsep.sample import generate_videos

    settings = settings.model_copy(deep=True)
    settings.sample.seed = seed
    settings.sample.num_videos = 1
    videos = generate_videos([s.prompt for s in specs], settings, package, components=components)
    return [v.frames for v in videos]


def run_experiment(
    out: Path,
    motions: Sequence[str],
    seeds: int = 3,
    recipes: Sequence[str] = RECIPES,
    references: int = 3,
    prompts: int = 4,
    set_options: list[str] | None = None,
    progress: Progress | None = None,
    fresh: bool = False,
) -> dict[str, Any]:
    """Runs the experiment; writes ``results.json``, ``results.md`` and ``frames.png`` to ``out``.

    Args:
        out: Report folder (created; clips and the experiment's own motion
            store go inside it).
        motions: Held-out motions to learn.
        seeds: Repeats with different reference clips and training seeds.
        recipes: Recipes to compare.
        references: Reference clips per motion.
        prompts: Held-out-look prompts per motion.
        set_options: ``--set`` overrides on top of the toy preset (e.g. train.steps=100).
        progress: Receives "experiment" (one unit per trained motion) and the
            library's own tasks.
        fresh: Redo every unit; otherwise units already finished in
            ``out/runs`` under the same settings are reused, so a stopped
            experiment continues where it was.

    Returns:
        The results (rows with mean and 95% interval over seeds).
    """
    from motionsep.model.components import load_components
    from motionsep.store import Store

    unknown = [m for m in motions if m not in world.MOTIONS]
    if unknown:
        raise UsageError(
            f"unknown toy motion(s): {', '.join(unknown)}",
            f"choose from the held-out motions {', '.join(world.HELD_OUT_MOTIONS)}",
        )
    bad_recipes = [r for r in recipes if r not in RECIPES]
    if bad_recipes:
        raise UsageError(
            f"unknown recipe(s): {', '.join(bad_recipes)}", f"choose from {', '.join(RECIPES)}"
        )
    if seeds < 1:
        raise UsageError(f"--seeds must be at least 1 (got {seeds})")
    events = or_null(progress)
    out.mkdir(parents=True, exist_ok=True)
    store_home = out / "store"
    base_settings = _settings(store_home, {}, set_options)
    components = load_components(Store(store_home).resolve_model(base_settings.model.name))
    runs: list[ToyRun] = []
    started = time.monotonic()
    saved = _SavedRuns(
        out / "runs",
        {
            "version": __version__,
            "set": list(set_options or []),
            "references": references,
            "prompts": prompts,
        },
        fresh=fresh,
    )
    events.start("experiment", total=len(motions) * seeds * len(recipes), unit="motion")
    for motion in motions:
        specs = prompt_specs(motion, prompts)
        for seed in range(seeds):
            ref_specs = reference_specs(motion, references, seed)
            ref_clips = [world.render(s) for s in ref_specs]
            clip_dir = out / "clips" / f"{motion}-seed{seed}"
            paths = write_clips(ref_specs, clip_dir)
            base_unit = f"{motion}-seed{seed}-base"
            base_runs = saved.load(base_unit)
            if base_runs is None:
                base = ToyRun(motion, seed, None, False)
                _score_run(
                    base, _generate(base_settings, None, specs, components, seed), specs, ref_clips
                )
                base_runs = [base]
                saved.save(base_unit, base_runs)
            runs.extend(base_runs)
            for recipe in recipes:
                unit = f"{motion}-seed{seed}-{recipe}"
                unit_runs = saved.load(unit)
                if unit_runs is None:
                    unit_runs = _train_and_score(
                        motion,
                        seed,
                        recipe,
                        paths,
                        specs,
                        ref_clips,
                        components,
                        store_home,
                        set_options,
                        progress,
                    )
                    saved.save(unit, unit_runs)
                runs.extend(unit_runs)
                events.advance("experiment")
    if saved.reused:
        events.log(
            f"reused {saved.reused} finished run(s) from {out / 'runs'} (--fresh redoes them)"
        )
    events.finish("experiment")
    results = summarize_runs(runs)
    results["settings"] = {
        "motions": list(motions),
        "seeds": seeds,
        "recipes": list(recipes),
        "references": references,
        "prompts": prompts,
        "reference_look": REFERENCE_LOOK,
        "set": set_options or [],
        "seconds": round(time.monotonic() - started, 1),
    }
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "results.md").write_text(results_markdown(results))
    write_frames_grid(runs, out / "frames.png")
    return results


def _train_and_score(
    motion: str,
    seed: int,
    recipe: str,
    paths: list[Path],
    specs: Sequence[world.ClipSpec],
    ref_clips: list[world.Clip],
    components: Any,
    store_home: Path,
    set_options: list[str] | None,
    progress: Progress | None,
) -> list[ToyRun]:
    """Trains ``motion`` under ``recipe`` and scores it with the highway off (and on)."""
    from motionsep.model.motion import load_motion
    from motionsep.model.recipes import get_recipe
    from motionsep.store import Store
    from motionsep.train import train_motion

    name = f"{motion}-{recipe}-seed{seed}"
    settings = _settings(
        store_home, {"lora": {"recipe": recipe}, "train": {"seed": seed}}, set_options
    )
    t0 = time.monotonic()
    result = train_motion(paths, name, settings, Store(store_home), force=True, progress=progress)
    seconds = time.monotonic() - t0
    package = load_motion(result.package)
    # a recipe without a highway (motiondirector) is run once
    highways = (False, True) if get_recipe(recipe).has_highway else (False,)
    runs = []
    for highway in highways:
        run = ToyRun(motion, seed, recipe, highway, train_seconds=seconds)
        gen = settings.model_copy(deep=True)
        gen.sample.highway = highway
        _score_run(run, _generate(gen, package, specs, components, seed), specs, ref_clips)
        runs.append(run)
    return runs


class _SavedRuns:
    """Finished experiment units in ``folder``, so that a stopped experiment resumes.

    Each unit (the base model, or one recipe trained and scored, for one motion
    and seed) is a JSON file of scores and specs plus an ``.npz`` of its frames.
    A unit is reused only if it was made under the same ``fingerprint``
    (motionsep version, ``--set`` options, reference and prompt counts).
    """

    def __init__(self, folder: Path, fingerprint: dict[str, Any], fresh: bool = False) -> None:
        self.folder = folder
        self.fingerprint = fingerprint
        self.fresh = fresh
        self.reused = 0

    def load(self, unit: str) -> list[ToyRun] | None:
        record_path, frames_path = self.folder / f"{unit}.json", self.folder / f"{unit}.npz"
        if self.fresh or not (record_path.is_file() and frames_path.is_file()):
            return None
        try:
            record = json.loads(record_path.read_text())
            if record.get("fingerprint") != self.fingerprint:
                return None
            with np.load(frames_path) as frames:
                runs = [
                    ToyRun(
                        motion=item["motion"],
                        seed=item["seed"],
                        recipe=item["recipe"],
                        highway=item["highway"],
                        scores=[metrics.Score(**score) for score in item["scores"]],
                        specs=[world.ClipSpec(**spec) for spec in item["specs"]],
                        frames=list(frames[f"arr_{index}"]),
                        train_seconds=item["train_seconds"],
                    )
                    for index, item in enumerate(record["runs"])
                ]
        except (OSError, ValueError, KeyError, TypeError):
            return None  # unreadable (e.g. cut off mid-write): redo the unit
        self.reused += 1
        return runs

    def save(self, unit: str, runs: Sequence[ToyRun]) -> None:
        import io

        from motionsep.store import atomic_write_bytes

        frames = io.BytesIO()
        np.savez_compressed(frames, *[np.stack(run.frames) for run in runs])
        atomic_write_bytes(self.folder / f"{unit}.npz", frames.getvalue())
        record = {
            "fingerprint": self.fingerprint,
            "runs": [
                {
                    "motion": run.motion,
                    "seed": run.seed,
                    "recipe": run.recipe,
                    "highway": run.highway,
                    "train_seconds": run.train_seconds,
                    "scores": [score.to_dict() for score in run.scores],
                    "specs": [spec.to_dict() for spec in run.specs],
                }
                for run in runs
            ],
        }
        atomic_write_bytes(self.folder / f"{unit}.json", (json.dumps(record) + "\n").encode())


DEMO_MOTION = "diagonal"


def run_demo(
    out: Path,
    motion: str = DEMO_MOTION,
    name: str | None = None,
    prompts: int = 3,
    set_options: list[str] | None = None,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """The whole pipeline on the built-in toy model, in a few minutes on a CPU.

    Renders three reference clips of a held-out ``motion`` (one look), trains
    the motion with the ``paper`` recipe into the store as ``name``
    (default ``toy-MOTION``), generates ``prompts`` videos with new looks
    with and without the motion, scores them with the toy metrics, and
    writes a report folder: ``clips/``, ``videos/``, ``frames.png``,
    ``results.md`` and ``results.json``.

    Returns:
        The results: rows for the base model and the learned motion.
    """
    from motionsep.model.components import load_components
    from motionsep.model.motion import load_motion
    from motionsep.sample import generate_videos, save_videos
    from motionsep.store import Store
    from motionsep.train import train_motion

    if motion not in world.MOTIONS:
        raise UsageError(
            f"unknown toy motion {motion!r}", f"choose from {', '.join(world.HELD_OUT_MOTIONS)}"
        )
    events = or_null(progress)
    started = time.monotonic()
    name = name or f"toy-{motion}"
    settings = _settings(None, {}, set_options)
    store = Store(settings.store.home)
    out.mkdir(parents=True, exist_ok=True)
    ref_specs = reference_specs(motion, 3, seed=0)
    ref_clips = [world.render(s) for s in ref_specs]
    events.log(f"reference clips: {ref_specs[0].prompt} (3 clips) -> {out / 'clips'}")
    paths = write_clips(ref_specs, out / "clips")
    t0 = time.monotonic()
    result = train_motion(paths, name, settings, store, force=True, progress=progress)
    train_seconds = time.monotonic() - t0
    package = load_motion(result.package)
    components = load_components(store.resolve_model(settings.model.name))
    specs = prompt_specs(motion, prompts)
    runs = []
    for label, pkg in (("base", None), ("motion", package)):
        recipe = (
            None if pkg is None else str(getattr(pkg.metadata.recipe, "value", pkg.metadata.recipe))
        )
        run = ToyRun(motion, 0, recipe, pkg is not None)
        run.train_seconds = train_seconds if pkg is not None else 0.0
        gen = settings.model_copy(deep=True)
        gen.sample.num_videos = 1
        videos = generate_videos(
            [s.prompt for s in specs], gen, pkg, components=components, progress=progress
        )
        save_videos(videos, out / "videos" / label, fps=world.FPS)
        _score_run(run, [v.frames for v in videos], specs, ref_clips)
        runs.append(run)
    results = summarize_runs(runs)
    results["settings"] = {
        "motion": motion,
        "name": name,
        "reference_look": REFERENCE_LOOK,
        "prompts": [s.prompt for s in specs],
        "seeds": 1,
        "set": set_options or [],
        "seconds": round(time.monotonic() - started, 1),
    }
    results["videos"] = asdict_runs(runs)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "results.md").write_text(results_markdown(results))
    write_frames_grid(runs, out / "frames.png", per_condition=prompts)
    return results


# ---------------------------------------------------------------------------
# statistics and reports

# two-sided 95% Student t quantiles by degrees of freedom
_T95 = {
    1: 12.706,
    2: 4.303,
    3: 3.182,
    4: 2.776,
    5: 2.571,
    6: 2.447,
    7: 2.365,
    8: 2.306,
    9: 2.262,
    10: 2.228,
}

METRIC_KEYS = ("motion_fidelity", "trajectory_error", "color", "shape", "background", "leakage")


def mean_interval(values: Sequence[float]) -> tuple[float, float | None]:
    """Mean and the half-width of its 95% interval (Student t; None for one value)."""
    array = np.asarray(values, dtype=np.float64)
    mean = float(array.mean())
    if len(array) < 2:
        return mean, None
    t = _T95.get(len(array) - 1, 1.96)
    return mean, float(t * array.std(ddof=1) / math.sqrt(len(array)))


def summarize_runs(runs: Sequence[ToyRun]) -> dict[str, Any]:
    """Rows per (motion, condition): each metric's mean over seeds with its 95% interval."""
    groups: dict[tuple[str, str], list[ToyRun]] = {}
    for run in runs:
        groups.setdefault((run.motion, run.label), []).append(run)
    rows = []
    for (motion, label), members in groups.items():
        row: dict[str, Any] = {"motion": motion, "condition": label, "seeds": len(members)}
        for key in METRIC_KEYS:
            per_seed = [metrics.summarize(m.scores)[key] for m in members]
            present = [v for v in per_seed if v is not None]
            if present:
                mean, half = mean_interval(present)
                row[key] = {"mean": mean, "ci95": half, "per_seed": present}
            else:
                row[key] = None
        row["train_seconds"] = float(np.mean([m.train_seconds for m in members]))
        rows.append(row)
    return {"rows": rows}


def results_markdown(results: dict[str, Any]) -> str:
    """The results as a markdown table (mean ± 95% interval over seeds)."""
    header = (
        "| motion | condition | motion fidelity ↑ | trajectory error (px) ↓ | color ↑ | shape ↑ "
        "| background ↑ | leakage ↓ |"
    )
    lines = [header, "|" + "---|" * 8]
    for row in results["rows"]:
        cells = [row["motion"], row["condition"]]
        for key in METRIC_KEYS:
            value = row[key]
            if value is None:
                cells.append("–")
            elif value["ci95"] is None:
                cells.append(f"{value['mean']:.2f}")
            else:
                cells.append(f"{value['mean']:.2f} ± {value['ci95']:.2f}")
        lines.append("| " + " | ".join(cells) + " |")
    settings = results.get("settings", {})
    look = ", ".join(settings.get("reference_look", REFERENCE_LOOK))
    note = (
        f"\nMean over {settings.get('seeds', '?')} seed(s), ± the 95% interval (Student t). "
        "Motion fidelity: 1 - trajectory error / error of standing still "
        "(1 = the reference motion, 0 = no better than not moving). "
        f"Leakage: how often the reference look ({look}) shows instead of the prompt's.\n"
    )
    return "\n".join(lines) + "\n" + note


def write_frames_grid(runs: Sequence[ToyRun], path: Path, per_condition: int = 2) -> Path:
    """A PNG: one row per (motion, condition) video (first seed), frames left to right."""
    from PIL import Image, ImageDraw

    rows: list[tuple[str, np.ndarray]] = []
    for run in runs:
        if run.seed != 0:
            continue
        for video, spec in list(zip(run.frames, run.specs, strict=True))[:per_condition]:
            rows.append((f"{run.motion} | {run.label} | {spec.color} {spec.shape}", video))
    if not rows:
        raise UsageError("no videos to draw")
    scale, label_width = 3, 260
    frame = rows[0][1].shape[1] * scale
    count = rows[0][1].shape[0]
    image = Image.new("RGB", (label_width + count * (frame + 2), len(rows) * (frame + 2)), "white")
    draw = ImageDraw.Draw(image)
    for r, (label, video) in enumerate(rows):
        y = r * (frame + 2)
        draw.text((4, y + frame // 2 - 6), label, fill="black")
        for f in range(count):
            tile = Image.fromarray(video[f]).resize((frame, frame), Image.Resampling.NEAREST)
            image.paste(tile, (label_width + f * (frame + 2), y))
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path


def asdict_runs(runs: Sequence[ToyRun]) -> list[dict[str, Any]]:
    """Per-video scores (for JSON)."""
    return [
        {
            "motion": run.motion,
            "seed": run.seed,
            "condition": run.label,
            "videos": [
                {"prompt": spec.prompt, **asdict(score)}
                for spec, score in zip(run.specs, run.scores, strict=True)
            ],
        }
        for run in runs
    ]
