"""What a folder of generated videos holds, as ``evaluate`` and ``report`` both read it.

``generate`` writes each video (an mp4 or gif file, or a folder of PNG
frames) with a JSON sidecar ``NAME.json`` beside it. This module finds those
videos in files and folders (leaving out the copies inside a report page and
``inspect-attention`` maps), reads them and their sidecars, and groups them
by what produced them (motion, recipe, highway, PLI, seed set). It is the one
home of these rules: :mod:`motionsep.evaluate` scores what it finds and
:mod:`motionsep.report` shows it, and neither imports the other.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from motionsep.errors import UsageError, VideoError

SIDECAR_SUFFIX = ".json"
"""The sidecar of ``NAME.mp4`` (or ``NAME.gif``, or the PNG folder ``NAME``) is ``NAME.json``."""

REPORT_FILE = "index.html"
"""The page of a ``motionsep report`` folder."""

MEDIA_DIR = "media"
"""The report folder's copies of the videos and images it shows."""

PNG_FRAME_GLOB = "*.png"

METRICS = ("text_alignment", "temporal_consistency", "motion_fidelity", "appearance_leakage")
"""Metric names, in report order."""

METRIC_TITLES = {
    "text_alignment": "CLIP-T",
    "temporal_consistency": "temporal consistency",
    "motion_fidelity": "motion fidelity",
    "appearance_leakage": "appearance leakage",
}


def sidecar_path(target: Path) -> Path:
    """The JSON sidecar beside a video file or PNG folder: ``NAME.json``."""
    suffix = target.suffix if target.suffix.lower() in {".mp4", ".gif"} else ""
    return target.with_name(target.name.removesuffix(suffix) + SIDECAR_SUFFIX)


def is_report_media(path: Path) -> bool:
    """Whether ``path`` is one of a report page's copies (``.../media/`` beside ``index.html``)."""
    parent = Path(path).parent
    return parent.name == MEDIA_DIR and (parent.parent / REPORT_FILE).is_file()


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


def read_sidecar(video: Path) -> dict[str, Any] | None:
    """The JSON sidecar ``generate`` wrote beside a video, or None when there is none.

    Raises:
        UsageError: for a sidecar that is not JSON or whose fields do not fit
            (see :func:`check_sidecar`), naming it.
    """
    sidecar = sidecar_path(video)
    if not sidecar.is_file():
        return None
    try:
        data = json.loads(sidecar.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UsageError(f"sidecar {sidecar} is not JSON ({exc})", SIDECAR_HINT) from exc
    return check_sidecar(data, sidecar)


# The sidecar fields that readers (evaluate, report) rely on -> the JSON types each may
# have; any of them may also be missing or null.
SIDECAR_FIELDS: dict[str, tuple[type, ...]] = {
    "prompt": (str,),
    "seed": (int,),
    "motion": (dict,),
    "motion.name": (str,),
    "motion.recipe": (str,),
    "sample": (dict,),
    "sample.highway": (bool,),
    "sample.pli": (int, float),
    "sample.base_seed": (int,),
    "sample.num_videos": (int,),
    "ablation": (dict,),
    "ablation.seeds": (list,),
    "ablation.variant": (str,),
}
SIDECAR_HINT = (
    "a sidecar is the JSON file generate writes beside each video; fix it, or move it away "
    "to use the video without one"
)


def check_sidecar(content: Any, sidecar: Path) -> dict[str, Any]:
    """``content`` (a parsed sidecar) if its fields have the types :data:`SIDECAR_FIELDS` says.

    Raises:
        UsageError: naming the sidecar file and the first field that does not fit.
    """
    if not isinstance(content, dict):
        raise UsageError(
            f"sidecar {sidecar} holds a {type(content).__name__}, not a JSON object", SIDECAR_HINT
        )
    for name, types in SIDECAR_FIELDS.items():
        parent, _, key = name.rpartition(".")
        holder = content.get(parent) if parent else content
        value = holder.get(key) if isinstance(holder, dict) else None
        wrong_bool = isinstance(value, bool) and bool not in types
        if value is not None and (wrong_bool or not isinstance(value, types)):
            expected = " or ".join(_JSON_TYPE_NAMES[t] for t in types)
            raise UsageError(
                f"sidecar {sidecar}: {name} is {json.dumps(value)[:80]}, not {expected}",
                SIDECAR_HINT,
            )
    seeds = (content.get("ablation") or {}).get("seeds") or []
    if any(isinstance(seed, bool) or not isinstance(seed, int) for seed in seeds):
        raise UsageError(f"sidecar {sidecar}: ablation.seeds holds a non-integer", SIDECAR_HINT)
    return content


_JSON_TYPE_NAMES = {
    str: "a string",
    int: "an integer",
    float: "a number",
    bool: "true or false",
    dict: "an object",
    list: "a list",
}


# ---------------------------------------------------------------------------
# grouping


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
        variant: The ablation row, for videos made by ``evaluate --ablation``.
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
