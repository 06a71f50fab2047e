"""Motion customization in the toy world: ``motionsep toy experiment`` and ``motionsep demo``.

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
"""The one look every reference clip of the ``named`` protocol has."""

# Prompt looks that differ from the reference in every attribute.
PROMPT_LOOKS: tuple[tuple[str, str, str, str], ...] = (
    ("blue", "circle", "dark", "plain"),
    ("green", "triangle", "gray", "checked"),
    ("yellow", "circle", "gray", "plain"),
    ("purple", "triangle", "dark", "checked"),
    ("orange", "circle", "dark", "checked"),
    ("green", "circle", "gray", "plain"),
)

LEAK_REFERENCE_LOOK = ("magenta", "square", "white", "dotted")
"""The ``leak`` protocol's reference look: colour and texture the toy vocabulary cannot name."""

# The leak protocol's prompts: no purple (the nearest named colour to magenta)
# and no white background, so every feature of the reference look is far away.
LEAK_PROMPT_LOOKS: tuple[tuple[str, str, str, str], ...] = (
    ("blue", "circle", "dark", "plain"),
    ("green", "triangle", "gray", "checked"),
    ("yellow", "circle", "gray", "plain"),
    ("orange", "triangle", "dark", "checked"),
    ("green", "circle", "dark", "plain"),
    ("blue", "triangle", "gray", "checked"),
)

CEILING_MOTIONS = ("right", "down", "zoom-in", "zoom-out")
"""Pretraining motions the base model draws for the positive control (the metric's ceiling)."""


@dataclass(frozen=True)
class Protocol:
    """How reference clips are made and captioned, and the customization budget.

    Attributes:
        name: ``named`` or ``leak``.
        reference_look: The one look of every reference clip.
        prompt_looks: The looks asked for at generation (different in every attribute).
        motion_only_captions: Caption reference clips by their motion alone.
        settings: Settings the protocol puts on top of the toy preset (``--set`` wins).
        summary: One line for reports.
    """

    name: str
    reference_look: tuple[str, str, str, str]
    prompt_looks: tuple[tuple[str, str, str, str], ...]
    motion_only_captions: bool
    settings: dict[str, Any]
    summary: str

    def caption(self, spec: world.ClipSpec) -> str:
        return world.motion_caption(spec.motion) if self.motion_only_captions else spec.prompt


PROTOCOLS: dict[str, Protocol] = {
    "named": Protocol(
        name="named",
        reference_look=REFERENCE_LOOK,
        prompt_looks=PROMPT_LOOKS,
        motion_only_captions=False,
        settings={},
        summary="reference clips in a look the captions name in full (red square, striped white)",
    ),
    "leak": Protocol(
        name="leak",
        reference_look=LEAK_REFERENCE_LOOK,
        prompt_looks=LEAK_PROMPT_LOOKS,
        motion_only_captions=True,
        # upstream's budget is 1000 steps at lr 5e-4; the toy runs its preset
        # lr (1e-3) for the same lr x steps
        settings={"train": {"steps": 500}},
        summary=(
            "reference clips in a look no word names (magenta square, dotted white), "
            "captioned by the motion alone; upstream's budget: 1000 steps at lr 5e-4"
        ),
    ),
}

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


def get_protocol(name: str) -> Protocol:
    """The protocol called ``name``; UsageError names the choices."""
    if name not in PROTOCOLS:
        raise UsageError(f"unknown protocol {name!r}", f"choose from {', '.join(PROTOCOLS)}")
    return PROTOCOLS[name]


def reference_specs(
    motion: str, count: int, seed: int, look: tuple[str, str, str, str] = REFERENCE_LOOK
) -> list[world.ClipSpec]:
    """``count`` reference clips of ``motion``, all with one ``look``."""
    return [world.ClipSpec(*look, motion=motion, seed=seed * 1000 + k) for k in range(count)]


def prompt_specs(
    motion: str, count: int, looks: Sequence[tuple[str, str, str, str]] = PROMPT_LOOKS
) -> list[world.ClipSpec]:
    """The held-out-look prompts of ``motion`` (the first ``count`` of ``looks``)."""
    if not 1 <= count <= len(looks):
        raise UsageError(f"prompts must be between 1 and {len(looks)} (got {count})")
    return [world.ClipSpec(*look, motion=motion) for look in looks[:count]]


def ceiling_specs(count: int, looks: Sequence[tuple[str, str, str, str]]) -> list[world.ClipSpec]:
    """Prompts of pretraining motions (:data:`CEILING_MOTIONS` in turn) for the positive control."""
    return [
        world.ClipSpec(*looks[k % len(looks)], motion=CEILING_MOTIONS[k % len(CEILING_MOTIONS)])
        for k in range(count)
    ]


def write_clips(
    specs: Sequence[world.ClipSpec], folder: Path, captions: Sequence[str] | None = None
) -> list[Path]:
    """Writes clips as mp4 files with ``NAME.txt`` captions and ``NAME.json`` ground truth.

    ``captions`` default to each clip's full prompt.
    """
    from motionsep.video import write_video

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    captions = [s.prompt for s in specs] if captions is None else list(captions)
    for index, (spec, caption) in enumerate(zip(specs, captions, strict=True)):
        clip = world.render(spec)
        stem = f"{spec.motion}-{index:02d}"
        path = write_video(clip.frames, folder / f"{stem}.mp4", fps=world.FPS, value_range=(0, 255))
        (folder / f"{stem}.txt").write_text(caption + "\n")
        truth = {
            "spec": spec.to_dict(),
            "prompt": caption,
            "centers": clip.centers.round(3).tolist(),
            "sizes": clip.sizes.round(3).tolist(),
        }
        (folder / f"{stem}.json").write_text(json.dumps(truth, indent=2) + "\n")
        paths.append(path)
    return paths


def _settings(
    store_home: Path | None,
    overrides: dict[str, Any],
    set_options: list[str] | None,
    preset: str = TOY_PRESET,
) -> Any:
    """The toy preset under ``overrides``; ``store_home`` None keeps the user's store."""
    from motionsep.config import load_settings

    tree = dict(overrides) if store_home is None else {"store": {"home": store_home}, **overrides}
    return load_settings(preset=preset, overrides=tree, set_options=set_options)


def _score_run(
    run: ToyRun,
    frames: Sequence[np.ndarray],
    specs: Sequence[world.ClipSpec],
    references: dict[str, list[world.Clip]],
) -> None:
    """Scores each video against the closest reference clip of its own motion."""
    for video, spec in zip(frames, specs, strict=True):
        reading = metrics.read_video(video)
        own = references[spec.motion]
        # the reference clips differ only by small offsets; score against the closest
        best = min(own, key=lambda ref: metrics.trajectory_error(reading, ref))
        run.scores.append(
            metrics.score(reading, spec, reference=best, reference_look=own[0].spec, frames=video)
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
    protocol: str = "named",
    model: str | None = None,
    units: Path | None = None,
    jobs: int = 1,
) -> dict[str, Any]:
    """Runs the experiment; writes ``results.json``, ``results.md`` and ``frames.png`` to ``out``.

    Every condition of one seed generates from the same prompts and the same
    noise as the base model, so each recipe row also reports its paired
    difference from the base model. A positive control (the base model
    drawing pretraining motions, scored against references of those motions)
    shows how high the motion metrics go for a motion the model knows.

    Args:
        out: Report folder (created; clips and the experiment's own motion
            store go inside it).
        motions: Held-out motions to learn.
        seeds: Repeats with different reference clips, training seeds and noise.
        recipes: Recipes to compare.
        references: Reference clips per motion.
        prompts: Held-out-look prompts per motion.
        set_options: ``--set`` overrides on top of the toy preset and the
            protocol (e.g. train.steps=100).
        progress: Receives "experiment" (one unit per trained motion) and the
            library's own tasks.
        fresh: Redo every unit; otherwise units already finished in
            ``out/runs`` under the same settings are reused, so a stopped
            experiment continues where it was.
        protocol: ``named`` or ``leak`` (see :data:`PROTOCOLS`).
        model: The base model (default: the toy preset's, ``toy``).
        units: A second home for each finished unit's record (scores and
            specs, a few KB of JSON, no frames), e.g. a folder kept in git:
            a unit found there under the same settings and model weights is
            reused, so a later session continues the table from it.
        jobs: Worker processes that make the units (one motion and seed each:
            its base model run and every recipe), each with an equal share of
            torch's threads. The toy's small operations leave a second
            thread mostly idle, so two jobs on 2 cores made 1.6x the units
            per hour of the old code's one job (``bench/inner_loop.py``, 2
            units). A worker's float rounding can differ from one process's
            (fewer threads), and training carries that into the scores:
            close, not equal.

    Returns:
        The results (rows with mean and 95% interval over seeds).
    """
    chosen = get_protocol(protocol)
    _check_request(motions, recipes, seeds, references)
    if out.exists() and not out.is_dir():
        raise UsageError(
            f"{out} is a file; the experiment writes a report folder there",
            "pass a folder (new, or an earlier experiment's to continue it) to --out",
        )
    events = or_null(progress)
    out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    if jobs < 1:
        raise UsageError(f"--jobs must be at least 1 (got {jobs})")
    opening: dict[str, Any] = {
        "out": out,
        "protocol": chosen,
        "references": references,
        "prompts": prompts,
        "set_options": set_options,
        "model": model,
        "units": units,
    }
    experiment = _Experiment.open(**opening, progress=progress, fresh=fresh)
    runs: list[ToyRun] = []
    events.start("experiment", total=len(motions) * seeds * len(recipes), unit="motion")
    for seed in range(seeds):
        runs.extend(experiment.ceiling(seed))
    made = 0
    if jobs > 1:
        made = _units_in_workers(experiment, opening, motions, seeds, recipes, jobs, events)
        experiment.saved.fresh = False  # read back what the workers just made
    for motion in motions:
        for seed in range(seeds):
            runs.extend(experiment.base(motion, seed))
            for recipe in recipes:
                runs.extend(experiment.recipe(motion, seed, recipe))
                events.advance("experiment")
    experiment.saved.reused -= made
    if experiment.saved.reused:
        events.log(
            f"reused {experiment.saved.reused} finished run(s) from {out / 'runs'} "
            "(--fresh redoes them)"
        )
    events.finish("experiment")
    results = summarize_runs(runs)
    results["settings"] = {
        "protocol": chosen.name,
        "protocol_summary": chosen.summary,
        "training": _budget(experiment.settings()),
        "motions": list(motions),
        "seeds": seeds,
        "recipes": list(recipes),
        "references": references,
        "prompts": prompts,
        "reference_look": chosen.reference_look,
        "set": set_options or [],
        "model": experiment.model,
        "seconds": round(time.monotonic() - started, 1),
        "reused_units": experiment.saved.reused,
        "unit_seconds": round(experiment.saved.unit_seconds(), 1),
    }
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "results.md").write_text(results_markdown(results))
    write_frames_grid(
        runs,
        out / "frames.png",
        references=[reference_specs(m, 1, 0, chosen.reference_look)[0] for m in motions],
    )
    return results


def _units_in_workers(
    experiment: _Experiment,
    opening: dict[str, Any],
    motions: Sequence[str],
    seeds: int,
    recipes: Sequence[str],
    jobs: int,
    events: Any,
) -> int:
    """Makes the missing units in ``jobs`` worker processes; they save them as usual.

    One task is one motion and seed (its base run and every recipe), so two
    workers never write the same reference clips. The caller then reads every
    unit back from the saved records, exactly as on a rerun.

    Returns:
        How many units the workers made.
    """
    import multiprocessing

    import torch

    tasks = []
    for motion in motions:
        for seed in range(seeds):
            names = [
                experiment.unit(motion, f"seed{seed}", "base"),
                *(experiment.unit(motion, f"seed{seed}", r) for r in recipes),
            ]
            if experiment.saved.fresh or not all(experiment.saved.has(n) for n in names):
                tasks.append((motion, seed))
    if not tasks:
        return 0
    made = 0
    workers = min(jobs, len(tasks))
    threads = max(1, torch.get_num_threads() // workers)
    events.log(
        f"{len(tasks)} motion x seed task(s) in {workers} worker processes, "
        f"{threads} thread(s) each"
    )
    # spawn, not fork: the parent holds torch's thread pool
    context = multiprocessing.get_context("spawn")
    worker_args = (opening, list(recipes), threads, experiment.saved.fresh)
    pool = context.Pool(workers, _worker_open, worker_args)
    try:
        for motion, seed, seconds, count in pool.imap_unordered(_worker_task, tasks):
            made += count
            events.log(f"{motion} seed {seed}: {len(recipes)} recipe(s) in {seconds:.0f} s")
            events.advance("experiment", len(recipes))
        pool.close()
    except BaseException:
        # Ctrl-C or a failed unit: stop the other workers now (their finished
        # units are saved; a rerun continues from them)
        pool.terminate()
        raise
    finally:
        pool.join()
    return made


_WORKER: dict[str, Any] = {}


def _worker_open(opening: dict[str, Any], recipes: list[str], threads: int, fresh: bool) -> None:
    """A worker's own experiment: same settings; it skips the units already saved."""
    import torch

    torch.set_num_threads(threads)
    _WORKER["experiment"] = _Experiment.open(**opening, progress=None, fresh=fresh)
    _WORKER["recipes"] = recipes


def _worker_task(task: tuple[str, int]) -> tuple[str, int, float, int]:
    """Makes one motion and seed's missing units: (motion, seed, seconds, units made)."""
    motion, seed = task
    started = time.monotonic()
    experiment: _Experiment = _WORKER["experiment"]
    before = experiment.saved.reused
    experiment.base(motion, seed)
    for recipe in _WORKER["recipes"]:
        experiment.recipe(motion, seed, recipe)
    made = 1 + len(_WORKER["recipes"]) - (experiment.saved.reused - before)
    return motion, seed, time.monotonic() - started, made


def _check_request(
    motions: Sequence[str], recipes: Sequence[str], seeds: int, references: int
) -> None:
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
    if references < 1:
        raise UsageError(f"--references must be at least 1 (got {references})")


@dataclass
class _Experiment:
    """One experiment's shared state: the protocol, the base model and the finished units."""

    out: Path
    protocol: Protocol
    references: int
    prompts: int
    set_options: list[str] | None
    progress: Progress | None
    components: Any
    saved: _SavedRuns
    model: str

    @classmethod
    def open(
        cls,
        out: Path,
        protocol: Protocol,
        references: int,
        prompts: int,
        set_options: list[str] | None,
        progress: Progress | None,
        fresh: bool,
        model: str | None = None,
        units: Path | None = None,
    ) -> _Experiment:
        from motionsep.model.components import load_components
        from motionsep.store import Store

        overrides = _model_override(protocol.settings, model)
        base_settings = _settings(out / "store", overrides, set_options)
        folder = Store(out / "store").resolve_model(base_settings.model.name)
        components = load_components(folder)
        fingerprint = {
            "version": __version__,
            "protocol": protocol.name,
            "settings": settings_digest(base_settings),
            "references": references,
            "prompts": prompts,
            "model": base_settings.model.name,
            "weights": weights_digest(folder),
        }
        saved = _SavedRuns(out / "runs", fingerprint, fresh=fresh, mirror=units)
        return cls(
            out,
            protocol,
            references,
            prompts,
            set_options,
            progress,
            components,
            saved,
            base_settings.model.name,
        )

    @property
    def store_home(self) -> Path:
        return self.out / "store"

    def settings(self, overrides: dict[str, Any] | None = None) -> Any:
        from motionsep.config import deep_merge

        tree = deep_merge(_model_override(self.protocol.settings, self.model), overrides or {})
        return _settings(self.store_home, tree, self.set_options)

    def unit(self, *parts: object) -> str:
        return "-".join([self.protocol.name, *(str(p) for p in parts)])

    def reference_clips(self, motion: str, seed: int) -> list[world.Clip]:
        specs = reference_specs(motion, self.references, seed, self.protocol.reference_look)
        return [world.render(s) for s in specs]

    def ceiling(self, seed: int) -> list[ToyRun]:
        """The base model drawing pretraining motions, scored against references of them."""
        specs = ceiling_specs(self.prompts, self.protocol.prompt_looks)
        return self._base_unit(self.unit("ceiling", f"seed{seed}"), CEILING_LABEL, specs, seed)

    def base(self, motion: str, seed: int) -> list[ToyRun]:
        """The base model on ``motion``'s prompts (the pairing partner of every recipe)."""
        specs = prompt_specs(motion, self.prompts, self.protocol.prompt_looks)
        return self._base_unit(self.unit(motion, f"seed{seed}", "base"), motion, specs, seed)

    def _base_unit(
        self, unit: str, label: str, specs: list[world.ClipSpec], seed: int
    ) -> list[ToyRun]:
        runs = self.saved.load(unit)
        if runs is None:
            started = time.monotonic()
            motions = dict.fromkeys(spec.motion for spec in specs)
            refs = {motion: self.reference_clips(motion, seed) for motion in motions}
            run = ToyRun(label, seed, None, False)
            frames = _generate(self.settings(), None, specs, self.components, seed)
            _score_run(run, frames, specs, refs)
            runs = [run]
            self.saved.save(unit, runs, time.monotonic() - started)
        return runs

    def recipe(self, motion: str, seed: int, recipe: str) -> list[ToyRun]:
        """Trains ``motion`` under ``recipe`` and scores it with the highway off (and on)."""
        from motionsep.model.motion import load_motion
        from motionsep.model.recipes import get_recipe
        from motionsep.store import Store
        from motionsep.train import train_motion

        unit = self.unit(motion, f"seed{seed}", recipe)
        runs = self.saved.load(unit)
        if runs is not None:
            return runs
        started = time.monotonic()
        ref_specs = reference_specs(motion, self.references, seed, self.protocol.reference_look)
        paths = write_clips(
            ref_specs,
            self.out / "clips" / self.unit(motion, f"seed{seed}"),
            [self.protocol.caption(s) for s in ref_specs],
        )
        settings = self.settings({"lora": {"recipe": recipe}, "train": {"seed": seed}})
        t0 = time.monotonic()
        result = train_motion(
            paths, unit, settings, Store(self.store_home), force=True, progress=self.progress
        )
        seconds = time.monotonic() - t0
        package = load_motion(result.package)
        specs = prompt_specs(motion, self.prompts, self.protocol.prompt_looks)
        references = {motion: [world.render(s) for s in ref_specs]}
        # a recipe without a highway (motiondirector) is run once
        highways = (False, True) if get_recipe(recipe).has_highway else (False,)
        runs = []
        for highway in highways:
            run = ToyRun(motion, seed, recipe, highway, train_seconds=seconds)
            gen = settings.model_copy(deep=True)
            gen.sample.highway = highway
            frames = _generate(gen, package, specs, self.components, seed)
            _score_run(run, frames, specs, references)
            runs.append(run)
        self.saved.save(unit, runs, time.monotonic() - started)
        return runs


def _model_override(tree: dict[str, Any], model: str | None) -> dict[str, Any]:
    """``tree`` with ``model.name`` set when a model was asked for."""
    from motionsep.config import deep_merge

    return tree if model is None else deep_merge(tree, {"model": {"name": model}})


UNIT_SECTIONS = ("model", "data", "lora", "optim", "train", "sample", "eval")
"""The settings sections an experiment unit is made from (its fingerprint's digest)."""


def settings_digest(settings: Any) -> str:
    """SHA-256 over the resolved settings a unit is made under, for unit fingerprints.

    The settings as resolved (preset, protocol, ``--set``), so that a unit is
    reused whenever it would be made the same way, however the settings were
    spelled, and never after the preset itself changed. Only the sections a
    unit is made from count (not ``store`` or ``pretrain``), and not the
    recipe and training seed, which each unit sets itself. A new field in
    those sections changes every digest: `tests/test_toy.py` checks that the
    committed records still match, so such a change is seen, not a silent rerun.
    """
    import hashlib

    dumped = settings.model_dump(mode="json")
    tree = {section: dumped[section] for section in UNIT_SECTIONS}
    tree["lora"].pop("recipe", None)
    tree["train"].pop("seed", None)
    return hashlib.sha256(json.dumps(tree, sort_keys=True).encode()).hexdigest()


def weights_digest(folder: Path) -> str:
    """SHA-256 over a model folder's weight files (names and bytes), for unit fingerprints."""
    import hashlib

    digest = hashlib.sha256()
    for path in sorted(folder.rglob("*.safetensors")):
        digest.update(path.relative_to(folder).as_posix().encode() + b"\0")
        with path.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


CEILING_LABEL = "held-in (ceiling)"
"""The motion column of the positive control's rows."""


class _SavedRuns:
    """Finished experiment units, so that a stopped experiment resumes.

    Each unit (the base model, or one recipe trained and scored, for one motion
    and seed) is a JSON record of scores and specs in ``folder``, next to an
    ``.npz`` of its frames for the pictures. With ``mirror``, the record (not
    the frames) is also kept there, and a record found only there is reused
    too: its runs have scores but no frames. A unit is reused only if it was
    made under the same ``fingerprint`` (motionsep version, the resolved
    settings, reference and prompt counts, the base model and its weights).
    """

    def __init__(
        self,
        folder: Path,
        fingerprint: dict[str, Any],
        fresh: bool = False,
        mirror: Path | None = None,
    ) -> None:
        self.folder = folder
        self.fingerprint = fingerprint
        self.fresh = fresh
        self.mirror = mirror
        self.reused = 0
        self._seconds: dict[str, float] = {}
        self._refuse_foreign_records()

    def _refuse_foreign_records(self) -> None:
        """Refuses a ``mirror`` that holds this protocol's units made another way.

        Records are named by unit alone, so making the units again under other
        settings would write over them: committed results, lost without asking.
        """
        if self.mirror is None or not self.mirror.is_dir():
            return
        protocol = self.fingerprint["protocol"]
        differing: set[str] = set()
        count = 0
        for path in sorted(self.mirror.glob(f"{protocol}-*.json")):
            try:
                theirs = json.loads(path.read_text()).get("fingerprint")
            except (OSError, ValueError, AttributeError):
                continue  # not a unit record: left alone, never written over
            if not isinstance(theirs, dict) or theirs == self.fingerprint:
                continue
            count += 1
            keys = set(theirs) | set(self.fingerprint)
            differing |= {key for key in keys if theirs.get(key) != self.fingerprint.get(key)}
        if count:
            what = ", ".join(sorted(differing))
            raise UsageError(
                f"{self.mirror} holds {count} unit record(s) of the {protocol} protocol made "
                f"under other settings (differing: {what}); making these units would write "
                "over them",
                "pass another --units folder for these settings (one folder per table), "
                "or run with the settings those records were made under",
            )

    @property
    def _places(self) -> list[Path]:
        return [self.folder] + ([self.mirror] if self.mirror is not None else [])

    def has(self, unit: str) -> bool:
        """Whether ``unit`` is saved under this fingerprint (here or in the mirror)."""
        return any(self._record(place / f"{unit}.json") is not None for place in self._places)

    def unit_seconds(self) -> float:
        """Seconds the units of this experiment took when they were made (reused ones too)."""
        return sum(self._seconds.values())

    def load(self, unit: str) -> list[ToyRun] | None:
        if self.fresh:
            return None
        for place in self._places:
            runs = self._read(place / f"{unit}.json", self.folder / f"{unit}.npz")
            if runs is not None:
                self.reused += 1
                if self.mirror is not None and not (self.mirror / f"{unit}.json").is_file():
                    self._write_record(self.mirror, unit, runs)
                return runs
        return None

    def _record(self, record_path: Path) -> tuple[list[ToyRun], float] | None:
        """The runs (without frames) and seconds of a record made under this fingerprint."""
        if not record_path.is_file():
            return None
        try:
            record = json.loads(record_path.read_text())
            if record.get("fingerprint") != self.fingerprint:
                return None
            runs = [
                ToyRun(
                    motion=item["motion"],
                    seed=item["seed"],
                    recipe=item["recipe"],
                    highway=item["highway"],
                    scores=[metrics.Score(**score) for score in item["scores"]],
                    specs=[world.ClipSpec(**spec) for spec in item["specs"]],
                    train_seconds=item["train_seconds"],
                )
                for item in record["runs"]
            ]
            return runs, float(record.get("seconds", 0.0))
        except (OSError, ValueError, KeyError, TypeError):
            return None  # unreadable (e.g. cut off mid-write): redo the unit

    def _read(self, record_path: Path, frames_path: Path) -> list[ToyRun] | None:
        found = self._record(record_path)
        if found is None:
            return None
        runs, self._seconds[record_path.stem] = found
        try:
            with np.load(frames_path) as frames:
                for index, run in enumerate(runs):
                    run.frames = list(frames[f"arr_{index}"])
        except (OSError, ValueError, KeyError):
            for run in runs:  # scores without pictures (e.g. a committed record)
                run.frames = []
        return runs

    def save(self, unit: str, runs: Sequence[ToyRun], seconds: float = 0.0) -> None:
        import io

        from motionsep.store import atomic_write_bytes

        self._seconds[unit] = seconds
        frames = io.BytesIO()
        np.savez_compressed(frames, *[np.stack(run.frames) for run in runs])
        atomic_write_bytes(self.folder / f"{unit}.npz", frames.getvalue())
        self._write_record(self.folder, unit, runs)
        if self.mirror is not None:
            self._write_record(self.mirror, unit, runs)

    def _write_record(self, folder: Path, unit: str, runs: Sequence[ToyRun]) -> None:
        from motionsep.store import atomic_write_bytes

        record = {
            "fingerprint": self.fingerprint,
            "seconds": round(self._seconds.get(unit, 0.0), 1),
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
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(folder / f"{unit}.json", (json.dumps(record, indent=1) + "\n").encode())


DEMO_MOTION = "diagonal"
DEMO_MODELS = ("toy-animatediff", "toy")
"""The built-in toy models the demo runs on (each with its own preset), default first."""


def run_demo(
    out: Path,
    motion: str = DEMO_MOTION,
    name: str | None = None,
    prompts: int = 3,
    set_options: list[str] | None = None,
    progress: Progress | None = None,
    model: str = DEMO_MODELS[0],
    force: bool = False,
) -> dict[str, Any]:
    """The whole pipeline on a built-in toy model, in a few minutes on a CPU.

    Renders three reference clips of a held-out ``motion`` (one look), trains
    the motion with the recipe of ``model``'s preset into the store as ``name``
    (default ``toy-MOTION``), generates ``prompts`` videos with new looks
    with and without the motion, scores them with the toy metrics, and
    writes a report folder: ``clips/``, ``videos/``, ``frames.png``,
    ``results.md`` and ``results.json``.

    A motion ``name`` already in the store is replaced only with ``force``.

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
    if model not in DEMO_MODELS:
        raise UsageError(f"unknown demo model {model!r}", f"choose from {', '.join(DEMO_MODELS)}")
    events = or_null(progress)
    started = time.monotonic()
    name = name or f"toy-{motion}"
    settings = _settings(None, {}, set_options, preset=model)
    store = Store(settings.store.home)
    try:  # refused before any work
        store.new_motion_path(name, force)
    except UsageError as error:
        raise UsageError(
            f"a motion named {name!r} is already in the store (an earlier demo?)",
            f"pass --force to replace it, or remove it with `motionsep motions rm {name}`",
        ) from error
    out.mkdir(parents=True, exist_ok=True)
    ref_specs = reference_specs(motion, 3, seed=0)
    ref_clips = {motion: [world.render(s) for s in ref_specs]}
    events.log(f"reference clips: {ref_specs[0].prompt} (3 clips) -> {out / 'clips'}")
    paths = write_clips(ref_specs, out / "clips")
    t0 = time.monotonic()
    result = train_motion(paths, name, settings, store, force=force, progress=progress)
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
        "model": settings.model.name,
        "recipe": str(getattr(settings.lora.recipe, "value", settings.lora.recipe)),
        "reference_look": REFERENCE_LOOK,
        "prompts": [s.prompt for s in specs],
        "seeds": 1,
        "set": set_options or [],
        "seconds": round(time.monotonic() - started, 1),
    }
    results["videos"] = asdict_runs(runs)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "results.md").write_text(results_markdown(results))
    write_frames_grid(runs, out / "frames.png", per_condition=prompts, references=ref_specs[:1])
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

METRIC_KEYS = (
    "motion_fidelity",
    "trajectory_error",
    "angle_error",
    "speed_ratio",
    "missing",
    "nearest_target",
    "leakage",
    "leakage_color",
    "leakage_shade",
    "leakage_texture",
    "palette_leak",
    "color",
    "shape",
    "background",
)

PAIRED_KEYS = ("motion_fidelity", "leakage", "missing", "angle_error", "nearest_target")
"""Metrics whose difference from the base model (same seed, prompts and noise) rows report."""


def mean_interval(values: Sequence[float]) -> tuple[float, float | None]:
    """Mean and the half-width of its 95% interval (Student t; None for one value)."""
    array = np.asarray(values, dtype=np.float64)
    mean = float(array.mean())
    if len(array) < 2:
        return mean, None
    t = _T95.get(len(array) - 1, 1.96)
    return mean, float(t * array.std(ddof=1) / math.sqrt(len(array)))


def _budget(settings: Any) -> str:
    """The customization budget every recipe was trained with, for the table's note."""
    optim = settings.optim
    rates = f"lr {optim.lr:g}"
    if optim.spatial_lr != optim.lr:
        rates += f" (spatial {optim.spatial_lr:g})"
    steps = settings.train.steps
    return f"{steps} step{'s' if steps != 1 else ''} at {rates}, rank {settings.lora.rank}"


def run_summary(run: ToyRun) -> dict[str, float | None]:
    """One run's metrics, plus ``nearest_target``: the share of videos nearest their own motion."""
    summary = metrics.summarize(run.scores)
    nearest = [
        score.nearest == spec.motion for score, spec in zip(run.scores, run.specs, strict=True)
    ]
    summary["nearest_target"] = float(np.mean(nearest)) if nearest else None
    return summary


def _stat(values: Sequence[float | None]) -> dict[str, Any] | None:
    present = [v for v in values if v is not None]
    if not present:
        return None
    mean, half = mean_interval(present)
    return {"mean": mean, "ci95": half, "per_seed": present}


def summarize_runs(runs: Sequence[ToyRun]) -> dict[str, Any]:
    """Rows per (motion, condition): each metric's mean over seeds with its 95% interval.

    A recipe row also has ``vs_base``: per metric in :data:`PAIRED_KEYS`, the
    per-seed difference from the base model's row of the same motion and
    seed (same prompts, same noise), with its mean and 95% interval.
    """
    groups: dict[tuple[str, str], list[ToyRun]] = {}
    for run in runs:
        groups.setdefault((run.motion, run.label), []).append(run)
    summaries = {id(run): run_summary(run) for run in runs}
    base = {(r.motion, r.seed): summaries[id(r)] for r in runs if r.recipe is None}
    rows = []
    for (motion, label), members in groups.items():
        row: dict[str, Any] = {"motion": motion, "condition": label, "seeds": len(members)}
        for key in METRIC_KEYS:
            row[key] = _stat([summaries[id(m)][key] for m in members])
        nearest: dict[str, int] = {}
        own = 0
        for member in members:
            for score, spec in zip(member.scores, member.specs, strict=True):
                nearest[score.nearest or "none"] = nearest.get(score.nearest or "none", 0) + 1
                own += score.nearest == spec.motion
        row["nearest"] = dict(sorted(nearest.items(), key=lambda kv: -kv[1]))
        row["nearest_own"] = own
        if members[0].recipe is not None:
            row["vs_base"] = {
                key: _stat(
                    [
                        _difference(summaries[id(m)], base.get((m.motion, m.seed)), key)
                        for m in members
                    ]
                )
                for key in PAIRED_KEYS
            }
        row["train_seconds"] = float(np.mean([m.train_seconds for m in members]))
        rows.append(row)
    return {"rows": rows}


def _difference(
    summary: dict[str, float | None], base: dict[str, float | None] | None, key: str
) -> float | None:
    if base is None or summary[key] is None or base[key] is None:
        return None
    return float(summary[key]) - float(base[key])  # type: ignore[arg-type]


def _cell(value: dict[str, Any] | None, digits: int = 2, signed: bool = False) -> str:
    if value is None:
        return "–"
    text = f"{value['mean']:+.{digits}f}" if signed else f"{value['mean']:.{digits}f}"
    return text if value["ci95"] is None else f"{text} ± {value['ci95']:.{digits}f}"


def _nearest_cell(row: dict[str, Any]) -> str:
    counts = row.get("nearest") or {}
    total = sum(counts.values())
    if not total:
        return "–"
    top = next(iter(counts))
    return f"{top} {counts[top]}/{total} (own {row.get('nearest_own', 0)}/{total})"


def results_markdown(results: dict[str, Any]) -> str:
    """The results as a markdown table (mean ± 95% interval over seeds)."""
    header = (
        "| motion | condition | motion fidelity ↑ | Δ fidelity vs base | leakage ↓ "
        "| Δ leakage vs base | missing | angle error (°) | speed ratio | nearest motion "
        "| color ↑ | background ↑ |"
    )
    lines = [header, "|" + "---|" * 12]
    for row in results["rows"]:
        paired = row.get("vs_base", {})
        cells = [
            row["motion"],
            row["condition"],
            _cell(row["motion_fidelity"]),
            _cell(paired.get("motion_fidelity"), signed=True),
            _cell(row["leakage"]),
            _cell(paired.get("leakage"), signed=True),
            _cell(row["missing"]),
            _cell(row["angle_error"], digits=0),
            _cell(row["speed_ratio"]),
            _nearest_cell(row),
            _cell(row["color"]),
            _cell(row["background"]),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    settings = results.get("settings", {})
    look = ", ".join(settings.get("reference_look", REFERENCE_LOOK))
    note = (
        f"\nProtocol `{settings.get('protocol', 'named')}`"
        + (f" ({settings['protocol_summary']})" if settings.get("protocol_summary") else "")
        + (f"; trained {settings['training']}" if settings.get("training") else "")
        + f". Mean over {settings.get('seeds', '?')} seed(s), ± the 95% interval (Student t); "
        "Δ columns: the paired difference from the base model on the same prompts and noise, "
        "per seed. Motion fidelity: 1 - trajectory error / error of standing still "
        "(1 = the reference motion, 0 = no better than not moving), over videos with an "
        "object; missing: share of videos without one. Angle error and speed ratio: "
        "direction and speed against the reference (translations). Nearest motion: the most "
        "common motion (of the pretraining motions and the reference's own) nearest each "
        "video's path, and how many videos are nearest their own motion. Leakage: how far "
        f"the look moved from the prompt's (0) toward the reference look ({look}) (1), "
        "mean over object colour, background shade and texture.\n"
    )
    return "\n".join(lines) + "\n" + note


def write_frames_grid(
    runs: Sequence[ToyRun],
    path: Path,
    per_condition: int = 2,
    references: Sequence[world.ClipSpec] = (),
) -> Path:
    """A PNG: one row per (motion, condition) video (first seed), frames left to right.

    Each of ``references`` is rendered as a row above them, so the motion
    that was asked for is in the picture.
    """
    from PIL import Image, ImageDraw

    rows: list[tuple[str, np.ndarray]] = [
        (f"{spec.motion} | reference | {spec.color} {spec.shape}", world.render(spec).frames)
        for spec in references
    ]
    for run in runs:
        if run.seed != 0 or not run.frames:  # a unit reused from its record alone has none
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
