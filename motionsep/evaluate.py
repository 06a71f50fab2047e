"""Evaluation: score videos, group them, report; and the paper's ablation.

:func:`evaluate_videos` scores each generated video with the metrics of
:mod:`motionsep.metrics` and groups the scores by what produced them, read
from the JSON sidecar that ``generate`` writes beside every video: motion,
recipe, highway, PLI and seed set. :func:`run_ablation` generates the rows of
the paper's ablation table (base model, MotionDirector, TAP, TAP + AH,
TAP + AH + PLI) and evaluates them, reusing videos generated before with the
same settings.

Reference clips. Motion fidelity and appearance leakage compare a video with
reference clips (the clips the motion was learned from). Reference frames
are taken as training takes them (``data.frames``, ``data.frame_step``,
``data.fps``; all frames of a shorter clip). With several references a video
is scored against each and keeps the highest fidelity and the highest
leakage (the clip it follows best, the clip it copies most).

The library never prints; progress goes through :mod:`motionsep.progress`
(task ``"evaluate"``, and generation's tasks during an ablation).
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from motionsep import metrics
from motionsep import sample as sampling
from motionsep.config import Recipe, Settings
from motionsep.errors import ModelNotFoundError, UsageError, VideoError
from motionsep.launch import SINGLE, Shard
from motionsep.progress import Progress, or_null

if TYPE_CHECKING:
    import torch

    from motionsep.model.components import Components
    from motionsep.model.motion import MotionPackage
    from motionsep.store import Store

METRICS = ("text_alignment", "temporal_consistency", "motion_fidelity", "appearance_leakage")
"""Metric names, in report order."""

METRIC_TITLES = {
    "text_alignment": "CLIP-T",
    "temporal_consistency": "temporal consistency",
    "motion_fidelity": "motion fidelity",
    "appearance_leakage": "appearance leakage",
}

METRIC_OPTIONS = {
    "motion": "motion_fidelity",
    "leakage": "appearance_leakage",
    "clip-t": "text_alignment",
    "consistency": "temporal_consistency",
}
"""``evaluate --metrics`` names -> metric names."""

CLIP_METRICS = frozenset({"appearance_leakage", "text_alignment", "temporal_consistency"})
"""Metrics that compare CLIP embeddings (motion fidelity tracks points and needs no CLIP)."""

PNG_FRAME_GLOB = "*.png"


def parse_metrics(names: Iterable[str] | None) -> tuple[str, ...] | None:
    """``evaluate --metrics`` values (repeatable or comma-separated) -> metric names.

    Returns None for none given (every metric that can run).

    Raises:
        UsageError: for an unknown name, listing the known ones.
    """
    if not names:
        return None
    chosen: list[str] = []
    for part in (p.strip() for name in names for p in name.split(",")):
        if part not in METRIC_OPTIONS:
            raise UsageError(
                f"unknown metric {part!r}",
                f"choose from {', '.join(METRIC_OPTIONS)} (comma-separated or repeated)",
            )
        if METRIC_OPTIONS[part] not in chosen:
            chosen.append(METRIC_OPTIONS[part])
    return tuple(name for name in METRICS if name in chosen)


# ---------------------------------------------------------------------------
# finding and reading videos


def find_eval_videos(paths: Iterable[str | Path]) -> list[Path]:
    """Expands files and folders into videos: video files and PNG-frame folders.

    The media of a ``motionsep report`` page inside a folder (``report/``
    beside ``index.html``) are copies, not videos of their own, and are left
    out, as are ``inspect-attention`` folders (PNG maps, not frames) found
    inside a folder.

    Raises:
        VideoError: for a missing path or a folder without videos.
    """
    from motionsep.inspect import is_inspection_folder
    from motionsep.report import is_report_media
    from motionsep.video import find_videos

    found = find_videos(paths, frame_folders=True)
    videos = [p for p in found if not is_report_media(p) and not is_inspection_folder(p)]
    if found and not videos:
        raise VideoError(
            f"no videos in {', '.join(str(p) for p in found)}: report media or "
            "inspect-attention maps only",
            "pass the folder of generated videos",
        )
    return videos


def check_video(path: Path) -> None:
    """Checks cheaply that ``path`` is a readable video (file or PNG folder).

    Raises:
        VideoError: naming the file.
    """
    from motionsep.video import is_frame_folder, probe

    if path.is_dir():
        if not is_frame_folder(path):
            raise VideoError(
                f"{path} is a folder without PNG frames, not a video",
                "pass video files, folders of videos, or folders of PNG frames",
                path=str(path),
            )
        return
    probe(path)


def read_video(path: Path) -> np.ndarray:
    """Every frame of a video file or PNG-frame folder, ``uint8`` RGB ``(F, H, W, 3)``.

    Raises:
        VideoError: naming the file when it cannot be read, or when the PNG
            frames differ in size.
    """
    from motionsep.video import read_frames

    if not path.is_dir():
        return read_frames(path)
    import cv2

    frames = []
    for frame_file in sorted(path.glob(PNG_FRAME_GLOB)):
        image = cv2.imread(str(frame_file), cv2.IMREAD_COLOR)
        if image is None:
            raise VideoError(f"{frame_file} is not a readable PNG", path=str(frame_file))
        frames.append(image[..., ::-1])
    if len({f.shape for f in frames}) > 1:
        raise VideoError(f"the PNG frames in {path} differ in size", path=str(path))
    return np.ascontiguousarray(np.stack(frames))


def read_reference(path: Path, settings: Settings) -> np.ndarray:
    """A reference clip's frames, sampled as training samples them (``data.*``).

    A clip shorter than ``data.frames`` (at its frame step or rate) gives all
    its frames.
    """
    from motionsep.video import probe, read_frames, sample_indices

    if path.is_dir():
        return read_video(path)
    data = settings.data
    info = probe(path)
    try:
        indices = sample_indices(info, data.frames, frame_step=data.frame_step, fps=data.fps)
    except VideoError:
        return read_frames(path)
    return read_frames(path, indices)


def read_sidecar(video: Path) -> dict[str, Any] | None:
    """The JSON sidecar ``generate`` wrote beside a video, or None when there is none.

    Raises:
        UsageError: for a sidecar that is not JSON or whose fields do not fit
            (see :func:`motionsep.sample.check_sidecar`), naming it.
    """
    sidecar = sampling.sidecar_path(video)
    if not sidecar.is_file():
        return None
    try:
        data = json.loads(sidecar.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UsageError(f"sidecar {sidecar} is not JSON ({exc})", sampling.SIDECAR_HINT) from exc
    return sampling.check_sidecar(data, sidecar)


# ---------------------------------------------------------------------------
# report data


@dataclass(frozen=True)
class GroupKey:
    """What produced a video, as far as its sidecar tells.

    Attributes:
        motion: Motion name; None for the base model or without a sidecar.
        recipe: The motion's recipe.
        highway: Whether the appearance highway was on.
        pli: Phased LoRA integration fraction; None when off.
        seeds: The seed set of the run that made it (``sample.seed`` to
            ``sample.seed + num_videos - 1``), as text such as ``0-3``.
        variant: The ablation row, for videos made by :func:`run_ablation`.
        known: False for videos without a sidecar.
    """

    motion: str | None = None
    recipe: str | None = None
    highway: bool | None = None
    pli: float | None = None
    seeds: str = ""
    variant: str | None = None
    known: bool = True

    @property
    def label(self) -> str:
        """A short name of the group for tables and plots."""
        if not self.known:
            return "no sidecar"
        if self.variant:
            return self.variant
        if self.motion is None:
            text = "base model"
        else:
            text = f"{self.motion} ({self.recipe})"
            if self.highway:
                text += " +AH"
            if self.pli is not None:
                text += f" +PLI {self.pli:g}"
        return f"{text} seeds {self.seeds}" if self.seeds else text

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {
            "label": self.label,
            "motion": self.motion,
            "recipe": self.recipe,
            "highway": self.highway,
            "pli": self.pli,
            "seeds": self.seeds,
        }


def group_key(sidecar: dict[str, Any] | None) -> GroupKey:
    """The group of a video from its sidecar (see :class:`GroupKey`)."""
    if sidecar is None:
        return GroupKey(known=False)
    motion = sidecar.get("motion") or {}
    sample = sidecar.get("sample") or {}
    ablation = sidecar.get("ablation") or {}
    seeds = ablation.get("seeds")
    if seeds is None and "base_seed" in sample:
        first = int(sample["base_seed"])
        seeds = list(range(first, first + int(sample.get("num_videos") or 1)))
    return GroupKey(
        motion=motion.get("name"),
        recipe=motion.get("recipe"),
        highway=bool(sample.get("highway")) if motion else None,
        pli=sample.get("pli") if motion else None,
        seeds=_seed_text(seeds or []),
        variant=ablation.get("variant"),
    )


def _seed_text(seeds: Sequence[int]) -> str:
    ordered = sorted(set(int(s) for s in seeds))
    if not ordered:
        return ""
    if ordered == list(range(ordered[0], ordered[-1] + 1)) and len(ordered) > 1:
        return f"{ordered[0]}-{ordered[-1]}"
    return ",".join(str(s) for s in ordered)


@dataclass(frozen=True)
class VideoScores:
    """The scores of one video.

    Attributes:
        path: The video file or PNG folder.
        prompt: The prompt it was scored against (None: no text alignment).
        seed: Its seed, from the sidecar.
        group: What produced it.
        frames: Its frame count.
        text_alignment: CLIP-T x100; None without a prompt.
        temporal_consistency: x100; None for a single frame.
        motion_fidelity: In [-1, 1], best over the references; None without references.
        appearance_leakage: x100, highest over the references; None without references.
        fidelity_reference: Name of the reference clip of ``motion_fidelity``.
        leakage_reference: Name of the reference clip of ``appearance_leakage``.
    """

    path: Path
    prompt: str | None
    seed: int | None
    group: GroupKey
    frames: int
    text_alignment: float | None = None
    temporal_consistency: float | None = None
    motion_fidelity: float | None = None
    appearance_leakage: float | None = None
    fidelity_reference: str | None = None
    leakage_reference: str | None = None

    def metric(self, name: str) -> float | None:
        """The value of metric ``name`` (one of :data:`METRICS`)."""
        value = getattr(self, name)
        return None if value is None else float(value)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {
            "path": str(self.path),
            "prompt": self.prompt,
            "seed": self.seed,
            "group": self.group.label,
            "frames": self.frames,
            **{name: self.metric(name) for name in METRICS},
            "fidelity_reference": self.fidelity_reference,
            "leakage_reference": self.leakage_reference,
        }


@dataclass(frozen=True)
class GroupScores:
    """Mean and standard deviation of each metric over one group's videos.

    The standard deviation is the population one (``ddof=0``; 0 for a single
    video). Videos without a value for a metric (no prompt, no reference) are
    left out of that metric; a metric no video has is None.

    Attributes:
        key: The group.
        count: Its videos.
        mean: Metric name -> mean, or None.
        std: Metric name -> standard deviation, or None.
    """

    key: GroupKey
    count: int
    mean: dict[str, float | None]
    std: dict[str, float | None]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {**self.key.to_dict(), "count": self.count, "mean": self.mean, "std": self.std}


def summarize(videos: Sequence[VideoScores]) -> list[GroupScores]:
    """Groups video scores by :class:`GroupKey`, in order of first appearance."""
    groups: dict[GroupKey, list[VideoScores]] = {}
    for video in videos:
        groups.setdefault(video.group, []).append(video)
    result = []
    for key, members in groups.items():
        mean: dict[str, float | None] = {}
        std: dict[str, float | None] = {}
        for name in METRICS:
            values = [v for m in members if (v := m.metric(name)) is not None]
            mean[name] = float(np.mean(values)) if values else None
            std[name] = float(np.std(values)) if values else None
        result.append(GroupScores(key=key, count=len(members), mean=mean, std=std))
    return result


@dataclass
class EvaluationReport:
    """Scores of every video and of every group.

    Attributes:
        videos: One entry per video, in input order.
        groups: One entry per group, in order of first appearance.
        references: The reference clips used.
        clip_model: The CLIP folder used (None: no CLIP metric was computed).
        skipped: Metric name -> why it was not computed (its values are None).
    """

    videos: list[VideoScores]
    groups: list[GroupScores]
    references: list[Path] = field(default_factory=list)
    clip_model: Path | None = None
    skipped: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (``--json``)."""
        return {
            "videos": [v.to_dict() for v in self.videos],
            "groups": [g.to_dict() for g in self.groups],
            "references": [str(p) for p in self.references],
            "clip_model": str(self.clip_model) if self.clip_model else None,
            "skipped": dict(self.skipped),
        }

    def write_csv(self, path: Path | str) -> Path:
        """Writes one row per video and one per group (column ``row``) to a CSV file."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        columns = ["row", "label", "path", "prompt", "seed", "motion", "recipe", "highway"]
        columns += ["pli", "seeds", "count"]
        for name in METRICS:
            columns += [name, f"{name}_std"]
        with path.open("w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=columns)
            writer.writeheader()
            for video in self.videos:
                writer.writerow(
                    {
                        "row": "video",
                        "label": video.group.label,
                        "path": str(video.path),
                        "prompt": video.prompt,
                        "seed": video.seed,
                        **_key_columns(video.group),
                        "count": 1,
                        **{name: _cell(video.metric(name)) for name in METRICS},
                    }
                )
            for group in self.groups:
                row = {"row": "group", "label": group.key.label, **_key_columns(group.key)}
                row["count"] = group.count
                for name in METRICS:
                    row[name] = _cell(group.mean[name])
                    row[f"{name}_std"] = _cell(group.std[name])
                writer.writerow(row)
        return path

    def plot(self, path: Path | str, width_px: int = 1200, height_px: int = 400) -> Path:
        """Writes a bar chart of the groups' means (error bars: std), one panel per metric.

        Args:
            path: The PNG file.
            width_px: Image width in pixels.
            height_px: Image height in pixels.
        """
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        dpi = 100
        figure, axes = plt.subplots(
            1, len(METRICS), figsize=(width_px / dpi, height_px / dpi), dpi=dpi
        )
        labels = [g.key.label for g in self.groups]
        positions = np.arange(len(labels))
        colors = [f"C{i % 10}" for i in range(len(labels))]
        for axis, name in zip(axes, METRICS, strict=True):
            means = [g.mean[name] for g in self.groups]
            stds = [g.std[name] for g in self.groups]
            heights = [m if m is not None else 0.0 for m in means]
            errors = [s if s is not None else 0.0 for s in stds]
            axis.bar(positions, heights, yerr=errors, color=colors, capsize=3)
            axis.set_title(METRIC_TITLES[name], fontsize=9)
            axis.set_xticks(positions)
            axis.set_xticklabels(labels, rotation=30, ha="right", fontsize=7)
            axis.tick_params(axis="y", labelsize=7)
            if all(m is None for m in means):
                axis.text(0.5, 0.5, "n/a", ha="center", va="center", transform=axis.transAxes)
        figure.tight_layout()
        # No bbox_inches="tight": the image keeps exactly the requested size.
        figure.savefig(path, dpi=dpi)
        plt.close(figure)
        return path


def _key_columns(key: GroupKey) -> dict[str, Any]:
    return {
        "motion": key.motion,
        "recipe": key.recipe,
        "highway": key.highway,
        "pli": key.pli,
        "seeds": key.seeds,
    }


def _cell(value: float | None) -> str:
    return "" if value is None else f"{value:.6g}"


# ---------------------------------------------------------------------------
# evaluation


@dataclass
class _Reference:
    path: Path
    frames: np.ndarray
    embeds: torch.Tensor | None
    tracks: dict[int, metrics.PointTracks] = field(default_factory=dict)


def evaluate_videos(
    videos: Iterable[str | Path],
    settings: Settings,
    *,
    references: Iterable[str | Path] | None = None,
    prompt: str | None = None,
    scorer: metrics.ClipScorer | None = None,
    metric_names: Sequence[str] | None = None,
    progress: Progress | None = None,
) -> EvaluationReport:
    """Scores videos and groups the scores.

    Args:
        videos: Video files, PNG-frame folders, or folders of those.
        settings: ``eval.*`` (CLIP model, tracking), ``data.*`` (reference
            sampling), ``model.device`` and ``store.home``.
        references: Reference clips or folders; None skips motion fidelity
            and appearance leakage.
        prompt: The prompt of every video; None: each video's sidecar prompt
            (a video with neither gets no text alignment).
        scorer: A loaded CLIP to use instead of ``settings.eval.clip_model``.
        metric_names: The metrics to compute (names in :data:`METRICS`);
            None: every one that can run. CLIP is loaded only for the CLIP
            metrics; when none is installed and ``metric_names`` is None,
            motion fidelity is computed alone and the report's ``skipped``
            says why the others are missing.
        progress: Receives the ``"evaluate"`` task (videos).

    Returns:
        The report.

    Raises:
        VideoError: naming any input that is not a readable video, before
            anything is loaded.
        ModelNotFoundError: if ``metric_names`` asks for a CLIP metric and
            the CLIP model is not installed (with the ``motionsep download
            clip`` hint).
    """
    from motionsep.video import find_videos

    events = or_null(progress)
    paths = find_eval_videos(videos)
    reference_paths = find_videos(list(references)) if references else []
    for path in [*paths, *reference_paths]:
        check_video(path)
    wanted, skipped, scorer = _metrics_to_compute(
        metric_names, bool(reference_paths), scorer, settings, events
    )
    use_clip = scorer is not None and bool(wanted & CLIP_METRICS)

    loaded = []
    for path in reference_paths:
        frames = read_reference(path, settings)
        ref_embeds = scorer.image_embeddings(frames) if use_clip and scorer is not None else None
        loaded.append(_Reference(path, frames, ref_embeds))

    sidecars = [read_sidecar(path) for path in paths]
    prompts = [prompt if prompt is not None else (s or {}).get("prompt") for s in sidecars]
    text_embeds = (
        _prompt_embeddings(prompts, scorer, events)
        if "text_alignment" in wanted and scorer is not None
        else {}
    )

    scores = []
    events.start("evaluate", total=len(paths), unit="video")
    for path, sidecar, text in zip(paths, sidecars, prompts, strict=True):
        frames = read_video(path)
        embeds = scorer.image_embeddings(frames) if use_clip and scorer is not None else None
        fidelity, leakage = _against_references(frames, embeds, loaded, wanted, settings)
        alignment = None
        if embeds is not None and text is not None and text in text_embeds:
            alignment = metrics.text_alignment(embeds, text_embeds[text])
        consistency = None
        if embeds is not None and "temporal_consistency" in wanted:
            consistency = metrics.temporal_consistency(embeds)
        scores.append(
            VideoScores(
                path=path,
                prompt=text,
                seed=(sidecar or {}).get("seed"),
                group=group_key(sidecar),
                frames=len(frames),
                text_alignment=alignment,
                temporal_consistency=consistency,
                motion_fidelity=None if fidelity is None else fidelity[0],
                appearance_leakage=None if leakage is None else leakage[0],
                fidelity_reference=None if fidelity is None else fidelity[1],
                leakage_reference=None if leakage is None else leakage[1],
            )
        )
        events.advance("evaluate", video=path.name)
    events.finish("evaluate")
    return EvaluationReport(
        videos=scores,
        groups=summarize(scores),
        references=reference_paths,
        clip_model=scorer.folder if use_clip and scorer is not None else None,
        skipped=skipped,
    )


def _prompt_embeddings(
    prompts: list[str | None], scorer: metrics.ClipScorer, events: Progress
) -> dict[str, torch.Tensor]:
    """CLIP text embeddings of the distinct prompts (videos without one get no CLIP-T)."""
    missing = sum(p is None for p in prompts)
    if missing:
        events.log(
            f"{missing} video(s) have no sidecar prompt and no --prompt: no text alignment for them"
        )
    distinct = sorted({p for p in prompts if p is not None})
    if not distinct:
        return {}
    embedded = scorer.text_embeddings(distinct)
    return {text: embedded[i] for i, text in enumerate(distinct)}


def _metrics_to_compute(
    metric_names: Sequence[str] | None,
    have_references: bool,
    scorer: metrics.ClipScorer | None,
    settings: Settings,
    events: Progress,
) -> tuple[set[str], dict[str, str], metrics.ClipScorer | None]:
    """Which metrics run, why the others do not, and the CLIP scorer (loaded only if needed).

    Raises:
        ModelNotFoundError: a CLIP metric asked for by name with no CLIP installed.
        UsageError: nothing at all can be computed.
    """
    from motionsep.store import Store

    wanted = set(METRICS if metric_names is None else metric_names)
    skipped: dict[str, str] = {}
    if not have_references:
        for name in ("motion_fidelity", "appearance_leakage"):
            if name in wanted:
                skipped[name] = "no reference clips (--reference)"
        wanted -= {"motion_fidelity", "appearance_leakage"}
    if scorer is None and wanted & CLIP_METRICS:
        try:
            scorer = metrics.load_clip_scorer(
                settings.eval.clip_model,
                Store(settings.store.home),
                device=settings.model.device,
                batch_size=settings.eval.batch_size,
            )
        except ModelNotFoundError as exc:
            if metric_names is not None:
                raise
            reason = f"no CLIP model: {exc.message}" + (f"; {exc.hint}" if exc.hint else "")
            for name in sorted(wanted & CLIP_METRICS):
                skipped[name] = reason
            wanted -= CLIP_METRICS
            events.log(
                "no CLIP model: computing motion fidelity only "
                f"({exc.hint or 'motionsep download clip'} adds the other metrics)"
            )
    if not wanted:
        reasons = "; ".join(f"{METRIC_TITLES[n]}: {why}" for n, why in skipped.items())
        raise UsageError(
            f"no metric can be computed ({reasons})",
            "pass --reference CLIPS for motion fidelity, or `motionsep download clip` for the "
            "CLIP metrics",
        )
    return wanted, skipped, scorer


def _against_references(
    frames: np.ndarray,
    embeds: torch.Tensor | None,
    loaded: list[_Reference],
    wanted: set[str],
    settings: Settings,
) -> tuple[tuple[float, str] | None, tuple[float, str] | None]:
    """(motion fidelity, leakage), each the best over the references with that reference's name."""
    track = settings.eval
    fidelity: tuple[float, str] | None = None
    leakage: tuple[float, str] | None = None
    generated_tracks: dict[int, metrics.PointTracks] = {}
    for ref in loaded:
        if "motion_fidelity" in wanted:
            count = min(len(frames), len(ref.frames))
            if count not in generated_tracks:
                generated_tracks[count] = _tracks(frames, count, settings)
            if count not in ref.tracks:
                ref.tracks[count] = _tracks(ref.frames, count, settings)
            value = metrics.motion_fidelity(
                generated_tracks[count], ref.tracks[count], stationary_px=track.stationary_px
            )
            if fidelity is None or value > fidelity[0]:
                fidelity = (value, ref.path.name)
        if "appearance_leakage" in wanted and embeds is not None and ref.embeds is not None:
            leak = metrics.appearance_leakage(embeds, ref.embeds)
            if leakage is None or leak > leakage[0]:
                leakage = (leak, ref.path.name)
    return fidelity, leakage


def _tracks(frames: np.ndarray, count: int, settings: Settings) -> metrics.PointTracks:
    chosen = frames[metrics.even_indices(len(frames), count)]
    return metrics.point_tracks(chosen, settings.eval.track_grid, settings.eval.track_size)


# ---------------------------------------------------------------------------
# ablation


ABLATION_BASE = "base model"
ABLATION_MOTIONDIRECTOR = "MotionDirector"
ABLATION_TAP = "TAP"
ABLATION_TAP_AH = "TAP + AH"
ABLATION_TAP_AH_PLI = "TAP + AH + PLI"
ABLATION_ROWS = (
    ABLATION_BASE,
    ABLATION_MOTIONDIRECTOR,
    ABLATION_TAP,
    ABLATION_TAP_AH,
    ABLATION_TAP_AH_PLI,
)
"""Rows of the ablation table, in the paper's order."""


@dataclass(frozen=True)
class AblationRow:
    """One row of the ablation: which motion and which sample settings.

    Attributes:
        name: Row name (one of :data:`ABLATION_ROWS`).
        motion: The motion, or None for the base model.
        highway: ``sample.highway`` for the row.
        pli: ``sample.pli`` for the row (1.0: every step uses the motion).
    """

    name: str
    motion: MotionPackage | None
    highway: bool
    pli: float

    @property
    def slug(self) -> str:
        """Folder name of the row's videos."""
        return sampling.slugify(self.name)


@dataclass
class AblationResult:
    """What :func:`run_ablation` did.

    Attributes:
        report: The evaluation, one group per row.
        rows: The rows that ran, in order.
        generated: Videos generated by this call.
        reused: Videos found from an earlier call with identical settings.
        notes: Rows left out and why.
    """

    report: EvaluationReport
    rows: list[str]
    generated: int
    reused: int
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {
            **self.report.to_dict(),
            "rows": self.rows,
            "generated": self.generated,
            "reused": self.reused,
            "notes": self.notes,
        }


def find_motiondirector(store: Store, package: MotionPackage) -> MotionPackage | None:
    """The MotionDirector baseline of a motion, if one is installed.

    Looked for in this order: a motion named ``NAME-motiondirector``; then
    any installed motion with recipe ``motiondirector`` trained on the same
    clips (the same set of clip sha256 digests, not empty) over the same
    base-model architecture. Either must have recipe ``motiondirector``.
    """
    from motionsep.model.motion import METADATA_FILE, installed_motions, load_motion

    wanted_clips = {c.sha256 for c in package.metadata.clips}
    wanted_unet = package.metadata.base_model.unet_config_hash

    def describes_baseline(folder: Path, by_name: bool) -> bool:
        try:
            data = json.loads((folder / METADATA_FILE).read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            return False
        if data.get("recipe") != Recipe.MOTIONDIRECTOR.value:
            return False
        if by_name:
            return True
        clips = {c.get("sha256") for c in data.get("clips") or []}
        unet = (data.get("base_model") or {}).get("unet_config_hash")
        return bool(wanted_clips) and clips == wanted_clips and unet == wanted_unet

    named = f"{package.name}-motiondirector"
    candidates = [(named, True)]
    candidates += [(n, False) for n in installed_motions(store) if n not in (named, package.name)]
    for name, by_name in candidates:
        folder = store.motions_dir / name
        if (folder / METADATA_FILE).is_file() and describes_baseline(folder, by_name):
            return load_motion(folder)
    return None


def ablation_key(
    plan: sampling.SamplingPlan,
    motion: MotionPackage | None,
    model: sampling.ModelRef,
    dtype: str,
    prompt: str,
    seed: int,
    fps: int,
) -> str:
    """sha256 of everything that decides an ablation video: the settings actually used.

    The resolved sampling plan, the motion's adapter digest and recipe, the
    base model's id and revision, the weights dtype, the prompt, the seed and
    the frame rate of the file.
    """
    blob = {
        "plan": plan.to_dict(),
        "motion": None
        if motion is None
        else {
            "adapter_sha256": motion.files.get("adapter.safetensors"),
            "recipe": motion.metadata.recipe.value,
        },
        "model": {"id": model.id, "revision": model.revision},
        "dtype": dtype,
        "prompt": prompt,
        "seed": seed,
        "fps": fps,
        "format": "mp4",
    }
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()


def run_ablation(
    package: MotionPackage,
    prompts: Sequence[str],
    settings: Settings,
    *,
    out: Path | str,
    seeds: int = 1,
    references: Iterable[str | Path] | None = None,
    batch_size: int | None = None,
    scorer: metrics.ClipScorer | None = None,
    metric_names: Sequence[str] | None = None,
    shard: Shard | None = None,
    progress: Progress | None = None,
) -> AblationResult | None:
    """Generates the paper's ablation over prompts and seeds, then evaluates it.

    Rows (:data:`ABLATION_ROWS`): the base model alone; the MotionDirector
    baseline when one is installed (:func:`find_motiondirector`; otherwise
    left out with a note); the motion with TAP only (no highway, no PLI);
    TAP + AH (the recipe's highway); TAP + AH + PLI (``eval.ablation_pli``).
    Every row uses the same sample settings (``settings.sample``: steps,
    guidance, size, frames) and the seeds ``sample.seed`` to
    ``sample.seed + seeds - 1``; the base model starts without noise prior.

    Videos go to ``OUT/ROW/PROMPT-SEED-KEY.mp4`` with a sidecar, where KEY
    starts :func:`ablation_key`; a video whose file and sidecar already exist
    is reused, so an interrupted or repeated run generates only what is
    missing.

    Args:
        package: The motion (recipe ``paper`` or ``reference``).
        prompts: The prompts.
        settings: From :func:`motionsep.sample.generation_settings` for the motion.
        out: Folder of the videos.
        seeds: Videos per prompt and row.
        references: Reference clips for motion fidelity and leakage.
        batch_size: Videos denoised together (None: ``sample.batch_size``).
        scorer: A loaded CLIP to use instead of ``settings.eval.clip_model``.
        metric_names: As :func:`evaluate_videos`.
        shard: This process's share when several processes split the
            generation (:func:`motionsep.launch.current_shard`): batch i of
            the missing videos is this process's when ``i % count == rank``;
            the main process then scores every video.
        progress: Receives generation's and evaluation's tasks.

    Returns:
        The result; None in the other processes of a shared run.

    Raises:
        UsageError: for a motiondirector motion, no prompts, or fewer than one seed.
    """
    from motionsep.devices import resolve_device, resolve_dtype
    from motionsep.store import Store

    prompts, references = list(prompts), list(references) if references else []
    _check_ablation_request(package, prompts, seeds, references)
    events = or_null(progress)
    out = Path(out).expanduser()
    store = Store(settings.store.home)

    rows, notes = _ablation_rows(store, package, settings)
    for note in notes:
        events.log(note)

    model = sampling.resolve_model(settings, package)
    dtype = str(resolve_dtype(settings.model.dtype, resolve_device(settings.model.device)))
    dtype = dtype.removeprefix("torch.")
    seed_list = [settings.sample.seed + k for k in range(seeds)]
    fps = settings.sample.fps

    batch = settings.sample.batch_size if batch_size is None else batch_size
    context = _AblationContext(out, model, dtype, seed_list, fps, batch, progress)
    paths, batches = _ablation_work(rows, prompts, settings, package, context)
    shard = shard or SINGLE
    shard.barrier()  # every process has listed the missing videos before any is written
    for work in shard.take(batches):
        _generate_ablation_batch(work, context)
    shard.barrier()  # every process's videos are written before any is scored
    if not shard.is_main:
        return None
    generated = sum(len(work.videos) for work in batches)
    reused = len(paths) - generated

    report = evaluate_videos(
        paths,
        settings,
        references=references or None,
        scorer=scorer,
        metric_names=metric_names,
        progress=progress,
    )
    return AblationResult(
        report=report, rows=[r.name for r in rows], generated=generated, reused=reused, notes=notes
    )


def _check_ablation_request(
    package: MotionPackage, prompts: list[str], seeds: int, references: list[str | Path]
) -> None:
    """Everything wrong with an ablation request, found before any video is generated."""
    if package.metadata.recipe is Recipe.MOTIONDIRECTOR:
        raise UsageError(
            f"motion {package.name!r} has recipe motiondirector; the ablation needs a TAP motion",
            "pass a motion trained with recipe paper or reference; the MotionDirector row "
            f"comes from a motion named {package.name}-motiondirector",
        )
    if not prompts:
        raise UsageError("the ablation needs prompts", "pass --prompts-file with one per line")
    if seeds < 1:
        raise UsageError(f"--seeds must be at least 1, got {seeds}")
    # a bad reference fails now, not after an hour of generation
    for path in find_eval_videos(references) if references else []:
        check_video(path)


def _ablation_rows(
    store: Store, package: MotionPackage, settings: Settings
) -> tuple[list[AblationRow], list[str]]:
    """The ablation's rows (the MotionDirector row only when a baseline is installed) and notes."""
    notes: list[str] = []
    baseline = find_motiondirector(store, package)
    rows = [AblationRow(ABLATION_BASE, None, False, 1.0)]
    if baseline is not None:
        rows.append(AblationRow(ABLATION_MOTIONDIRECTOR, baseline, False, 1.0))
    else:
        notes.append(
            f"no MotionDirector baseline installed: train one with `motionsep train CLIPS "
            f"--name {package.name}-motiondirector --set lora.recipe=motiondirector`"
        )
    rows += [
        AblationRow(ABLATION_TAP, package, False, 1.0),
        AblationRow(ABLATION_TAP_AH, package, True, 1.0),
        AblationRow(ABLATION_TAP_AH_PLI, package, True, settings.eval.ablation_pli),
    ]
    return rows, notes


@dataclass
class _AblationContext:
    """What every row of one ablation shares; ``components`` are loaded on first need."""

    out: Path
    model: sampling.ModelRef
    dtype: str
    seeds: list[int]
    fps: int
    batch_size: int
    progress: Progress | None
    components: Components | None = None


@dataclass(frozen=True)
class _AblationBatch:
    """Missing videos of one row and seed that are denoised together: (prompt, key, target)."""

    row: AblationRow
    settings: Settings
    videos: list[tuple[str, str, Path]]


def _ablation_work(
    rows: list[AblationRow],
    prompts: list[str],
    settings: Settings,
    package: MotionPackage,
    context: _AblationContext,
) -> tuple[list[Path], list[_AblationBatch]]:
    """Every video path of the ablation, and the batches of those still to generate.

    A video whose file and sidecar (with its key) exist is reused. The
    missing videos of each row and seed are cut into batches of
    ``context.batch_size`` in prompt order, the batches one process would
    denoise, so processes that share the batches make the same videos.
    """
    model, paths, batches = context.model, [], []
    for row in rows:
        row_settings = _row_settings(settings, row)
        plan = sampling.resolve_plan(row_settings, row.motion)
        if row.motion is not None and row.motion is not package:
            # The baseline must share the base model's architecture; say so before generating.
            sampling.resolve_model(row_settings, row.motion)
        for seed in context.seeds:
            missing: list[tuple[str, str, Path]] = []
            for text in prompts:
                key = ablation_key(plan, row.motion, model, context.dtype, text, seed, context.fps)
                name = f"{sampling.slugify(text, 40)}-{seed}-{key[:12]}.mp4"
                target = context.out / row.slug / name
                paths.append(target)
                if not _reusable(target, key):
                    missing.append((text, key, target))
            seed_settings = row_settings.model_copy(deep=True)
            seed_settings.sample.seed = seed
            seed_settings.sample.num_videos = 1
            for start in range(0, len(missing), context.batch_size):
                chunk = missing[start : start + context.batch_size]
                batches.append(_AblationBatch(row, seed_settings, chunk))
    return paths, batches


def _generate_ablation_batch(batch: _AblationBatch, context: _AblationContext) -> None:
    """Generates and writes one batch of ablation videos."""
    if context.components is None:
        or_null(context.progress).log(f"loading {context.model.id} from {context.model.path}")
        context.components = sampling.load_generation_model(batch.settings, context.model)
    videos = sampling.generate_videos(
        [text for text, _, _ in batch.videos],
        batch.settings,
        batch.row.motion,
        components=context.components,
        model=context.model,
        batch_size=context.batch_size,
        progress=context.progress,
    )
    for video, (_, key, target) in zip(videos, batch.videos, strict=True):
        record = {
            **video.record,
            "ablation": {"variant": batch.row.name, "key": key, "seeds": context.seeds},
        }
        sampling.save_videos([dataclasses.replace(video, record=record)], target, fps=context.fps)


def _row_settings(settings: Settings, row: AblationRow) -> Settings:
    """The settings of one row: the row's highway and PLI win over every layer."""
    row_settings = settings.model_copy(deep=True)
    row_settings.sample.highway = row.highway
    row_settings.sample.pli = row.pli
    if row.motion is None:
        row_settings.sample.noise_prior = 0.0
    return row_settings


def _reusable(target: Path, key: str) -> bool:
    if not target.is_file():
        return False
    sidecar = read_sidecar(target)
    return bool(sidecar) and (sidecar or {}).get("ablation", {}).get("key") == key


def format_value(value: float | None, std: float | None = None, digits: int = 2) -> str:
    """A metric for tables: ``12.34 ± 0.56``, or ``-`` when missing."""
    if value is None or not math.isfinite(value):
        return "-"
    text = f"{value:.{digits}f}"
    return text if std is None else f"{text} ± {std:.{digits}f}"
