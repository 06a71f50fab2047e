"""A static HTML page of generated videos, side by side (``motionsep report``).

One self-contained folder: ``index.html`` plus the media it shows under
``media/``, all linked relatively, no server, no network, no script from
elsewhere. The page shows the reference clips on top (the motion that was
asked for), then one section per group of videos, grouped the way
``evaluate`` groups them (motion, recipe, highway, PLI, seed set), each video
looping with its prompt, seed and scores beside it, and the groups' table of
means (± 95 % interval over seeds where the source has one). The training
loss curve of each motion the videos name (from the store) and any
``inspect-attention`` maps in the folder are shown below.

It reads three kinds of folder:

- a ``toy experiment`` or ``demo`` report folder (``results.json``; the
  experiment's videos are the frames its runs kept, written here as GIFs);
- any folder of generated videos with their JSON sidecars (``generate``
  output, an ``evaluate --ablation`` folder), with scores from an
  ``evaluate --json`` file when one is given.

Browsers play GIF and H.264 mp4 in yuv420p. motionsep writes its mp4 that
way; any other video is re-encoded into the report (PNG-frame folders become
GIFs), so every tile plays.

A small inline script marks each video as it loads (``data-loaded``, size,
duration) and says on the page how many loaded, so a broken tile is seen.
"""

from __future__ import annotations

import html
import json
import math
import os
import shutil
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from motionsep.errors import UsageError
from motionsep.outputs import (
    MEDIA_DIR,
    METRIC_TITLES,
    REPORT_FILE,
    find_eval_videos,
    group_key,
    read_sidecar,
    read_video,
    sidecar_path,
)
from motionsep.progress import Progress, or_null
from motionsep.store import Store, validate_motion_name
from motionsep.userfiles import OutputKind, new_folder

TILE_PX = 192
"""Displayed width of a tile; small videos are scaled up without smoothing."""


@dataclass
class Tile:
    """One video on the page.

    Attributes:
        media: The file in the report folder (relative to it).
        caption: Lines under the video (prompt, seed, ...).
        scores: Metric name -> value (None: not computed).
    """

    media: str
    caption: list[str]
    scores: dict[str, float | None] = field(default_factory=dict)


@dataclass
class Section:
    """A group of tiles with a title."""

    title: str
    tiles: list[Tile] = field(default_factory=list)


@dataclass
class Table:
    """A table of numbers: a header row and rows of cells (already formatted)."""

    title: str
    header: list[str]
    rows: list[list[str]]


@dataclass
class Page:
    """Everything the page shows."""

    title: str
    references: list[Tile] = field(default_factory=list)
    sections: list[Section] = field(default_factory=list)
    tables: list[Table] = field(default_factory=list)
    images: list[tuple[str, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


# ---------------------------------------------------------------------------
# entry point


def write_report(
    source: Path,
    out: Path | None = None,
    *,
    scores: Path | dict[str, Any] | None = None,
    references: Sequence[Path] = (),
    force: bool = False,
    store_home: Path | None = None,
    progress: Progress | None = None,
) -> Path:
    """Writes the report of ``source`` and returns its ``index.html``.

    The page reads only files inside ``source`` (a link that leads out of it
    is left out, with a note on the page and through ``progress``) and the
    loss curves of the store's motions that its sidecars name (by a valid
    motion name only).

    Args:
        source: A ``toy experiment``/``demo`` folder, or a folder of videos
            with sidecars.
        out: The report folder (default ``SOURCE/report``), written atomically
            with a marker (:mod:`motionsep.userfiles`).
        scores: An ``evaluate --json`` file (or its content) whose per-video
            scores and groups to show.
        references: Reference clips to show on top (a demo or experiment
            folder brings its own).
        force: Replace an existing report folder, only one motionsep wrote
            (its marker) and only if nothing else was put in it.
        store_home: The store (default: the settings' ``store.home``): its
            motions' loss curves are shown, and nothing is written inside it.
        progress: Receives a line for each file left out.

    Raises:
        UsageError: ``source`` is not a folder or holds no videos; ``out``
            exists without ``force``, is not a report page motionsep wrote,
            holds other files, or lies inside the store.
    """
    source = Path(source).expanduser()
    if not source.is_dir():
        raise UsageError(f"{source} is not a folder", "pass the folder the videos are in")
    if source.resolve() == Path(source.resolve().anchor):
        raise UsageError(
            f"{source} is the root of the file system; report reads FOLDER and every folder in it",
            "pass the folder the videos are in",
        )
    scores = read_scores(scores) if isinstance(scores, (str, Path)) else scores
    _check_references(references)
    out = Path(out).expanduser() if out is not None else source / "report"
    if store_home is None:
        from motionsep.config import load_settings

        store_home = load_settings().store.home
    reader = _Reader(source, Path(store_home), or_null(progress))
    with new_folder(out, OutputKind.REPORT, force=force, store_home=store_home) as tmp:
        media = _Media(tmp)
        if reader.file(source / "results.json"):
            page = _toy_page(source, media, reader)
        else:
            page = _videos_page(source, media, scores, reader)
        page.references += [media.video(Path(p), [Path(p).name]) for p in references]
        page.notes += reader.notes
        (tmp / REPORT_FILE).write_text(render(page), encoding="utf-8")
    return out / REPORT_FILE


class _Reader:
    """What the page may read: files inside the source folder, and store motions by name.

    Links are resolved before the check, so a link (or a sidecar's motion
    name) cannot pull files from elsewhere into the page.
    """

    def __init__(self, source: Path, store_home: Path, progress: Progress) -> None:
        self.source = source
        self.root = source.resolve()
        self.motions_dir = Store(store_home).motions_dir.resolve()
        self.progress = progress
        self.notes: list[str] = []

    def inside(self, path: Path, root: Path | None = None) -> bool:
        """Whether ``path`` (links resolved) lies in the source folder (or ``root``)."""
        root = self.root if root is None else root
        resolved = Path(path).resolve()
        return resolved == root or root in resolved.parents

    def file(self, path: Path) -> bool:
        """Whether ``path`` exists and may be read; a link out of the folder is noted."""
        if not path.exists():
            return False
        if self.inside(path):
            return True
        self.note(f"left out {path}: it leads out of {self.source} (to {path.resolve()})")
        return False

    def files(self, paths: Iterable[Path]) -> list[Path]:
        """The ones of ``paths`` that may be read (see :meth:`file`)."""
        return [path for path in paths if self.file(path)]

    def sidecar(self, video: Path) -> dict[str, Any] | None:
        """The video's sidecar, if it lies in the folder (None otherwise)."""
        return read_sidecar(video) if self.file(sidecar_path(video)) else None

    def motion_file(self, name: object, file: str) -> Path | None:
        """``file`` of the store's motion ``name`` (a valid motion name only), if it exists."""
        try:
            validate_motion_name(str(name))
        except UsageError:
            self.note(f"left out the loss curve of motion {name!r}: not a valid motion name")
            return None
        path = self.motions_dir / str(name) / file
        if not path.is_file() or not self.inside(path, self.motions_dir):
            return None
        return path

    def note(self, text: str) -> None:
        self.notes.append(text)
        self.progress.log(text)


# ---------------------------------------------------------------------------
# media


class _Media:
    """Copies or converts media into the report folder, each under a fresh name."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.count = 0
        (root / MEDIA_DIR).mkdir(parents=True, exist_ok=True)

    def _name(self, stem: str, suffix: str) -> Path:
        self.count += 1
        safe = "".join(c if c.isalnum() or c in "-_" else "-" for c in stem)[:60]
        return Path(MEDIA_DIR) / f"{self.count:04d}-{safe}{suffix}"

    def video(self, path: Path, caption: list[str], scores: dict[str, Any] | None = None) -> Tile:
        """A tile of a video file or PNG-frame folder, re-encoded if a browser cannot play it."""
        if path.is_dir():
            return self.frames(read_video(path), path.name, caption, scores)
        suffix = path.suffix.lower()
        playable = suffix == ".gif"
        if suffix == ".mp4":
            playable = _is_h264_yuv420p(path)
        if not playable:
            return self.frames(read_video(path), path.stem, caption, scores, fmt="mp4")
        target = self._name(path.stem, suffix)
        shutil.copyfile(path, self.root / target)
        return Tile(target.as_posix(), caption, dict(scores or {}))

    def frames(
        self,
        frames: np.ndarray,
        stem: str,
        caption: list[str],
        scores: dict[str, Any] | None = None,
        fmt: str = "gif",
        fps: float = 8,
    ) -> Tile:
        """A tile of frames (F, H, W, 3) uint8, written as a GIF (or H.264 mp4)."""
        from motionsep.video import write_video

        target = self._name(stem, f".{fmt}")
        write_video(frames, self.root / target, fps=fps, format=fmt, value_range=(0, 255))
        return Tile(target.as_posix(), caption, dict(scores or {}))

    def image(self, path: Path) -> str:
        target = self._name(path.stem, path.suffix.lower())
        shutil.copyfile(path, self.root / target)
        return target.as_posix()


def _is_h264_yuv420p(path: Path) -> bool:
    """Whether every browser plays this mp4 (H.264 in yuv420p), read from one open."""
    import av

    with av.open(str(path)) as container:
        context = container.streams.video[0].codec_context
        return context.name == "h264" and str(context.pix_fmt) == "yuv420p"


# ---------------------------------------------------------------------------
# sources


def _toy_page(source: Path, media: _Media, reader: _Reader) -> Page:
    """A ``toy experiment`` or ``demo`` folder: its references, videos and table."""
    results = json.loads((source / "results.json").read_text(encoding="utf-8"))
    settings = results.get("settings", {})
    demo = "protocol" not in settings
    page = Page(title=("motionsep demo" if demo else "toy experiment") + f": {source.name}")
    clips_dir = source / "clips"
    for clip_dir in sorted({p.parent for p in reader.files(clips_dir.rglob("*.mp4"))}):
        clips = reader.files(sorted(clip_dir.glob("*.mp4")))
        # the demo's clips are all shown; of an experiment's units, the first of each
        for clip in clips if clip_dir == clips_dir else clips[:1]:
            caption = [clip_dir.name if clip_dir != clips_dir else clip.name]
            page.references.append(media.video(clip, [*caption, _caption(clip, reader)]))
    if demo:
        folders = [p for p in (source / "videos").glob("*") if p.is_dir()]
        for folder in sorted(reader.files(folders)):
            section = Section(folder.name)
            for video in reader.files(sorted(folder.glob("*.mp4"))):
                section.tiles.append(media.video(video, [_caption(video, reader)]))
            page.sections.append(section)
    else:
        page.sections += _experiment_sections(source, media, reader)
    page.tables.append(_rows_table(results.get("rows", [])))
    if (source / "frames.png").is_file() and reader.file(source / "frames.png"):
        page.images.append(("frames, left to right", media.image(source / "frames.png")))
    if demo and settings.get("name"):
        page.images += _motion_images([settings["name"]], media, reader)
    return page


def _experiment_sections(source: Path, media: _Media, reader: _Reader) -> list[Section]:
    """One section per (motion, condition) of a toy experiment, seed 0's videos as GIFs."""
    sections: dict[str, Section] = {}
    for unit in reader.files(sorted((source / "runs").glob("*.json"))):
        frames_file = unit.with_suffix(".npz")
        if not frames_file.is_file() or not reader.file(frames_file):
            continue
        stored = np.load(frames_file)
        for index, run in enumerate(json.loads(unit.read_text(encoding="utf-8"))["runs"]):
            if run.get("seed") != 0 or f"arr_{index}" not in stored.files:
                continue
            label = _condition(run)
            section = sections.setdefault(label, Section(label))
            videos = stored[f"arr_{index}"]
            for video, spec, score in zip(videos, run["specs"], run["scores"], strict=False):
                big = video.repeat(4, axis=1).repeat(4, axis=2)
                caption = [
                    f"{spec['color']} {spec['shape']} on {spec['texture']} {spec['background']}"
                ]
                numbers = {
                    "motion fidelity": score.get("motion_fidelity"),
                    "leakage": (score.get("leakage") or {}).get("mean")
                    if isinstance(score.get("leakage"), dict)
                    else score.get("leakage"),
                }
                section.tiles.append(media.frames(big, label, caption, numbers, fps=4))
    return list(sections.values())


def _condition(run: dict[str, Any]) -> str:
    motion = run.get("motion", "")
    recipe = run.get("recipe")
    if recipe is None:
        return f"{motion} | base model"
    return f"{motion} | {recipe}" + (" + highway" if run.get("highway") else "")


def _videos_page(
    source: Path, media: _Media, scores: Path | dict[str, Any] | None, reader: _Reader
) -> Page:
    """Any folder of videos with sidecars, grouped as ``evaluate`` groups them."""
    by_path, groups_table = _read_scores(scores)
    page = Page(title=f"videos: {source.name}")
    sections: dict[str, Section] = {}
    motions: list[object] = []
    for path in _all_videos(source, reader):
        sidecar = reader.sidecar(path)
        label = group_key(sidecar).label
        name = ((sidecar or {}).get("motion") or {}).get("name")
        if name and name not in motions:
            motions.append(name)
        numbers = {
            METRIC_TITLES[name]: value
            for name, value in by_path.get(str(path.resolve()), {}).items()
            if name in METRIC_TITLES
        }
        tile = media.video(path, [_caption(path, reader)], numbers)
        sections.setdefault(label, Section(label)).tiles.append(tile)
    page.sections = list(sections.values())
    page.images += _motion_images(motions, media, reader)
    page.images += _attention_images(source, media, reader)
    if groups_table:
        page.tables.append(_groups_table(groups_table))
    if not page.sections:
        raise UsageError(f"{source} holds no videos", "pass a folder that generate wrote into")
    return page


def _read_scores(
    scores: Path | dict[str, Any] | None,
) -> tuple[dict[str, dict[str, Any]], list[dict[str, Any]]]:
    """An ``evaluate --json`` report's scores by resolved video path, and its groups."""
    if scores is None:
        return {}, []
    report = check_scores(scores) if isinstance(scores, dict) else read_scores(scores)
    by_path = {str(Path(v["path"]).resolve()): v for v in report.get("videos", [])}
    return by_path, list(report.get("groups", []))


def read_scores(path: Path | str) -> dict[str, Any]:
    """An ``evaluate --json`` file, checked (see :func:`check_scores`).

    Raises:
        UsageError: the file is missing, not JSON, or not of that shape, naming it.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise UsageError(f"--scores {path} is not a file", _SCORES_HINT)
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UsageError(f"--scores {path} is not JSON ({exc})", _SCORES_HINT) from exc
    return check_scores(content, f"--scores {path}")


def check_scores(content: Any, source: str = "the scores") -> dict[str, Any]:
    """``content`` if it has the shape ``evaluate --json`` writes, as far as the page reads it.

    Raises:
        UsageError: naming the first entry that does not fit.
    """
    if not isinstance(content, dict):
        raise UsageError(f"{source} holds a {type(content).__name__}, not scores", _SCORES_HINT)
    for key in ("videos", "groups"):
        if not isinstance(content.get(key, []), list):
            raise UsageError(f"{source}: {key!r} is not a list", _SCORES_HINT)
    for index, video in enumerate(content.get("videos", [])):
        if not isinstance(video, dict) or not isinstance(video.get("path"), str):
            raise UsageError(f"{source}: videos[{index}] has no 'path'", _SCORES_HINT)
    for index, group in enumerate(content.get("groups", [])):
        tables = [group.get(k) for k in ("mean", "std")] if isinstance(group, dict) else [None]
        numbers = all(
            isinstance(table, dict)
            and all(v is None or isinstance(v, (int, float)) for v in table.values())
            for table in tables
        )
        if not numbers:
            raise UsageError(
                f"{source}: groups[{index}] needs 'mean' and 'std', each metric -> a number",
                _SCORES_HINT,
            )
    return content


_SCORES_HINT = "pass the file `motionsep evaluate FOLDER --json > scores.json` wrote"


def _check_references(references: Sequence[Path]) -> None:
    """Refuses a reference clip that cannot be shown (missing, no frames, not a video)."""
    from motionsep.evaluate import check_video

    for reference in references:
        path = Path(reference).expanduser()
        if not path.exists():
            raise UsageError(f"--reference {path} does not exist", "pass a video file")
        check_video(path)


def _groups_table(groups: list[dict[str, Any]]) -> Table:
    names = list(METRIC_TITLES)
    return Table(
        "groups (mean ± std over videos)",
        ["group", "videos", *(METRIC_TITLES[n] for n in names)],
        [
            [
                str(g.get("label") or _group_label(g)),
                str(g.get("count", "")),
                *(_mean_std(g["mean"].get(n), g["std"].get(n)) for n in names),
            ]
            for g in groups
        ],
    )


def _motion_images(names: list[object], media: _Media, reader: _Reader) -> list[tuple[str, str]]:
    """The loss curve of each named motion that is in the store and has one."""
    found = []
    for name in names:
        curve = reader.motion_file(name, "loss.png")
        if curve is not None:
            found.append((f"training loss of motion {name}", media.image(curve)))
    return found


def _attention_images(source: Path, media: _Media, reader: _Reader) -> list[tuple[str, str]]:
    """``inspect-attention`` maps (base.png, motion.png, difference.png) found in ``source``."""
    found = []
    for summary in reader.files(sorted(source.rglob("summary.json"))):
        for name in ("base", "motion", "difference"):
            image = summary.parent / f"{name}.png"
            if image.is_file() and reader.file(image):
                title = f"temporal attention, {name}: {summary.parent.name}"
                found.append((title, media.image(image)))
    return found


def _all_videos(source: Path, reader: _Reader) -> list[Path]:
    """Every video in ``source`` and its subfolders (an ablation keeps one folder per row).

    Hidden folders (a report being written) are not searched; a video that
    leads out of ``source`` is left out.
    """
    from motionsep.errors import VideoError

    folders = [source]
    for root, dirs, _ in os.walk(source):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        folders += [Path(root) / d for d in dirs]
    found: dict[Path, None] = {}
    for folder in folders:
        try:
            videos = find_eval_videos([folder])
        except VideoError:
            continue
        kept = reader.files(video for video in videos if video.resolve() != folder.resolve())
        found.update({video: None for video in kept if video.resolve() not in _resolved(found)})
    return list(found)


def _resolved(paths: Iterable[Path]) -> set[Path]:
    return {path.resolve() for path in paths}


def _group_label(group: dict[str, Any]) -> str:
    parts = [str(group.get(k)) for k in ("motion", "recipe") if group.get(k)]
    if group.get("highway"):
        parts.append("highway")
    return " + ".join(parts) or "base model"


def _caption(video: Path, reader: _Reader) -> str:
    sidecar = reader.sidecar(video) or {}
    prompt = sidecar.get("prompt")
    seed = sidecar.get("seed")
    if prompt is None:
        return video.name
    return f"{prompt} (seed {seed})" if seed is not None else str(prompt)


def _rows_table(rows: list[dict[str, Any]]) -> Table:
    """The toy results' rows: fidelity, leakage, colour; Δ columns against the base model."""
    header = ["motion", "condition", "seeds", "motion fidelity", "Δ fidelity vs base"]
    header += ["leakage", "Δ leakage vs base", "colour right"]
    body = []
    for row in rows:
        paired = row.get("vs_base") or {}
        body.append(
            [
                str(row.get("motion", "")),
                str(row.get("condition", "")),
                str(row.get("seeds", "")),
                _interval(row.get("motion_fidelity")),
                _interval(paired.get("motion_fidelity")),
                _interval(row.get("leakage")),
                _interval(paired.get("leakage")),
                _interval(row.get("color")),
            ]
        )
    return Table("results (mean ± 95 % interval over seeds)", header, body)


def _interval(value: Any) -> str:
    if isinstance(value, dict):
        mean, ci = value.get("mean"), value.get("ci95")
        if mean is None:
            return "-"
        return f"{mean:.2f}" + (f" ± {ci:.2f}" if ci is not None else "")
    return "-" if value is None else f"{value:.2f}"


def _mean_std(mean: float | None, std: float | None) -> str:
    if mean is None:
        return "-"
    return f"{mean:.3g}" + (f" ± {std:.2g}" if std is not None else "")


# ---------------------------------------------------------------------------
# HTML


_STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }
h1 { font-size: 1.3em; } h2 { font-size: 1.05em; margin-top: 1.6em; }
.grid { display: flex; flex-wrap: wrap; gap: 12px; }
figure { margin: 0; width: %(px)dpx; }
figure video, figure img.media { width: %(px)dpx; image-rendering: pixelated; background: #eee; }
figcaption { font-size: 0.8em; line-height: 1.3; }
.scores { color: #555; }
table { border-collapse: collapse; font-size: 0.85em; }
td, th { border: 1px solid #ccc; padding: 3px 8px; text-align: right; }
td:first-child, th:first-child, td:nth-child(2) { text-align: left; }
#status { font-size: 0.85em; color: #555; }
"""

_SCRIPT = """
(function () {
  var media = document.querySelectorAll('video');
  var status = document.getElementById('status');
  function update() {
    var done = document.querySelectorAll('video[data-loaded="1"]').length;
    var bad = document.querySelectorAll('video[data-loaded="error"]').length;
    status.textContent = done + ' of ' + media.length + ' videos loaded' +
      (bad ? ', ' + bad + ' failed' : '');
  }
  media.forEach(function (v) {
    function loaded() {
      v.dataset.loaded = '1';
      v.dataset.width = v.videoWidth;
      v.dataset.height = v.videoHeight;
      v.dataset.duration = v.duration;
      update();
    }
    if (v.readyState >= 1) { loaded(); }
    v.addEventListener('loadedmetadata', loaded);
    v.addEventListener('error', function () { v.dataset.loaded = 'error'; update(); });
  });
  update();
})();
"""


def render(page: Page) -> str:
    """The page as one HTML document (links relative to the report folder)."""
    parts = [
        "<!doctype html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{html.escape(page.title)}</title>",
        f"<style>{_STYLE % {'px': TILE_PX}}</style></head><body>",
        f"<h1>{html.escape(page.title)}</h1>",
        '<p id="status">videos not loaded yet</p>',
    ]
    parts += [f"<p>{html.escape(note)}</p>" for note in page.notes]
    if page.references:
        parts.append('<h2>reference clips: the motion that was asked for</h2><div class="grid">')
        parts += [_tile(tile) for tile in page.references]
        parts.append("</div>")
    for section in page.sections:
        count = len(section.tiles)
        parts.append(
            f'<h2 class="group">{html.escape(section.title)} ({count} video{"s" * (count != 1)})'
            '</h2><div class="grid">'
        )
        parts += [_tile(tile) for tile in section.tiles]
        parts.append("</div>")
    for table in page.tables:
        parts.append(_table(table))
    for title, image in page.images:
        parts.append(
            f"<h2>{html.escape(title)}</h2>"
            f'<img src="{html.escape(image)}" alt="{html.escape(title)}">'
        )
    parts.append(f"<script>{_SCRIPT}</script></body></html>")
    return "\n".join(parts) + "\n"


def _tile(tile: Tile) -> str:
    source = html.escape(tile.media)
    if tile.media.endswith(".mp4"):
        media = f'<video src="{source}" autoplay loop muted playsinline></video>'
    else:
        media = f'<img class="media" src="{source}" alt="">'
    lines = [html.escape(line) for line in tile.caption]
    shown = [
        f"{html.escape(name)} {value:.3g}"
        for name, value in tile.scores.items()
        if isinstance(value, (int, float)) and math.isfinite(value)
    ]
    if shown:
        lines.append(f'<span class="scores">{" · ".join(shown)}</span>')
    return f"<figure>{media}<figcaption>{'<br>'.join(lines)}</figcaption></figure>"


def _table(table: Table) -> str:
    head = "".join(f"<th>{html.escape(cell)}</th>" for cell in table.header)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(cell)}</td>" for cell in row) + "</tr>"
        for row in table.rows
    )
    return (
        f"<h2>{html.escape(table.title)}</h2>"
        f'<table class="groups"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'
    )
