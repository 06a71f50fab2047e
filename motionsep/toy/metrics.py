"""Exact toy metrics: read a video back through the world's known palette.

Backgrounds are grey and objects are saturated, so the object is the set of
pixels with colour in them. From that segmentation each frame gives the
object's colour, centre, size and fill ratio (which tells the shape), and the
remaining pixels give the background's shade and texture. The metrics compare
those readings with the prompt (appearance), with the reference clips'
appearance (leakage), and with the reference motion (motion fidelity).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

from motionsep.toy import world

CHROMA_THRESHOLD = 100.0
"""max(RGB) - min(RGB) above which a pixel counts as object.

The palette's least saturated colour has 155; the motion trail, at most
``world.TRAIL_OPACITY`` of the object's colour, stays below 91.
"""

MIN_OBJECT_PIXELS = 6
"""An object smaller than this (in pixels) counts as not drawn."""

MOVE_THRESHOLD = 4.0
"""Net displacement (pixels, first to last frame) below which a video counts as static."""

ZOOM_THRESHOLD = 0.25
"""|log(size_last / size_first)| above which a size change counts as a zoom."""


@dataclass
class Reading:
    """What segmentation sees in one video.

    Attributes:
        color: Nearest palette colour of the object, None if no object.
        shape: Shape by fill ratio, None if no object.
        background: Nearest background shade.
        texture: plain, striped or checked.
        centers: (F, 2) object centre per frame (NaN where no object).
        sizes: (F,) object size per frame (sqrt of the area; NaN where no object).
        motion: Which pretraining motion the trajectory looks like (None if no object).
        visible: Fraction of frames with an object.
    """

    color: str | None
    shape: str | None
    background: str
    texture: str
    centers: np.ndarray
    sizes: np.ndarray
    motion: str | None
    visible: float

    def to_dict(self) -> dict[str, object]:
        out = asdict(self)
        out["centers"] = [[_finite(x), _finite(y)] for x, y in self.centers.tolist()]
        out["sizes"] = [_finite(s) for s in self.sizes.tolist()]
        return out


def _finite(value: float) -> float | None:
    return None if not np.isfinite(value) else round(float(value), 3)


def object_mask(frame: np.ndarray) -> np.ndarray:
    """Boolean (H, W): the largest 4-connected patch of pixels with colour in them.

    Keeping only the largest patch drops the specks of colour that sampling
    noise leaves on a generated background.
    """
    rgb = frame.astype(np.float32)
    chroma = rgb.max(axis=-1) - rgb.min(axis=-1)
    return _largest_component(chroma > CHROMA_THRESHOLD)


def _largest_component(mask: np.ndarray) -> np.ndarray:
    labels = np.zeros(mask.shape, dtype=np.int32)
    height, width = mask.shape
    best_label, best_size, label = 0, 0, 0
    for y0, x0 in zip(*np.nonzero(mask), strict=True):
        if labels[y0, x0]:
            continue
        label += 1
        labels[y0, x0] = label
        stack, size = [(y0, x0)], 0
        while stack:
            y, x = stack.pop()
            size += 1
            for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= ny < height and 0 <= nx < width and mask[ny, nx] and not labels[ny, nx]:
                    labels[ny, nx] = label
                    stack.append((ny, nx))
        if size > best_size:
            best_label, best_size = label, size
    return labels == best_label if best_size else np.zeros_like(mask)


def _nearest(value: np.ndarray, palette: dict[str, object]) -> str:
    names = list(palette)
    refs = np.asarray([palette[n] for n in names], dtype=np.float32)
    refs = refs.reshape(len(names), -1)
    distances = np.linalg.norm(refs - value.reshape(1, -1), axis=1)
    return names[int(np.argmin(distances))]


SQUARE_FILL = (1.0 + math.pi / 4) / 2
"""Box fill ratio above which a (non-triangle) object is a square; a circle fills pi/4."""


def _shape_evidence(mask: np.ndarray) -> tuple[bool, float]:
    """Whether the mask looks like a triangle, and how much of its bounding box it fills.

    A triangle (apex up) has much less of its area in the top half of its box;
    a square fills its box, a circle fills pi/4 of it.
    """
    ys, xs = np.nonzero(mask)
    top, bottom = ys.min(), ys.max()
    box = (xs.max() - xs.min() + 1) * (bottom - top + 1)
    middle = (top + bottom) / 2.0
    upper = float((ys < middle).sum())
    lower = float((ys > middle).sum())
    return upper < 0.6 * max(lower, 1.0), float(mask.sum() / box)


def _shape_from_evidence(evidence: list[tuple[bool, float]]) -> str:
    """square, circle or triangle over a video's frames.

    A triangle when most frames say so; otherwise the mean fill ratio decides,
    since a circle of a few pixels fills its box anywhere from 0.65 to 0.95 in
    single frames.
    """
    triangles = sum(is_triangle for is_triangle, _ in evidence)
    if 2 * triangles > len(evidence):
        return "triangle"
    fill = float(np.mean([fill for is_triangle, fill in evidence if not is_triangle]))
    return "square" if fill > SQUARE_FILL else "circle"


TEXTURE_SCALES = (0.7, 1.0, 1.6)
"""Texture scales the templates try (the dolly motion rescales the background)."""

TEXTURE_CORRELATION = 0.35
"""Correlation with a texture template above which the background has that texture."""


def _texture_templates(size: int) -> dict[str, list[np.ndarray]]:
    templates: dict[str, list[np.ndarray]] = {}
    for texture in world.TEXTURES:
        if texture == "plain":
            continue
        templates[texture] = [
            world.background_image("dark", texture, scale, size) for scale in TEXTURE_SCALES
        ]
    return templates


def _texture(grey: np.ndarray, background: np.ndarray) -> str:
    """plain, striped or checked: the rendered pattern that best correlates with the background.

    Correlating with the whole pattern (at the phase the world renders it)
    integrates over every background pixel, so sampling noise in a generated
    video does not read as texture.
    """
    values = grey[background]
    if values.size < 16 or values.std() < 1e-6:
        return "plain"
    best, best_corr = "plain", TEXTURE_CORRELATION
    for texture, patterns in _texture_templates(grey.shape[0]).items():
        for pattern in patterns:
            ref = pattern[background]
            if ref.std() < 1e-6:
                continue
            corr = abs(float(np.corrcoef(values, ref)[0, 1]))
            if corr > best_corr:
                best, best_corr = texture, corr
    return best


def classify_motion(centers: np.ndarray, sizes: np.ndarray) -> str | None:
    """The pretraining motion a trajectory looks like, or None when the object is missing."""
    ok = np.isfinite(centers).all(axis=1) & np.isfinite(sizes)
    if ok.sum() < 2:
        return None
    index = np.nonzero(ok)[0]
    t = index / max(1, len(centers) - 1)
    span = t[-1] - t[0]
    if span <= 0:
        return None
    # least-squares slope over the visible frames, scaled to the whole clip
    dx = np.polyfit(t, centers[ok, 0], 1)[0]
    dy = np.polyfit(t, centers[ok, 1], 1)[0]
    dlog = np.polyfit(t, np.log(np.maximum(sizes[ok], 1e-3)), 1)[0]
    if max(abs(dx), abs(dy)) >= MOVE_THRESHOLD:
        if abs(dx) >= abs(dy):
            return "right" if dx > 0 else "left"
        return "down" if dy > 0 else "up"
    if abs(dlog) >= ZOOM_THRESHOLD:
        return "zoom-in" if dlog > 0 else "zoom-out"
    return "static"


def read_video(frames: np.ndarray) -> Reading:
    """Segments a uint8 video (F, H, W, 3) of the toy world."""
    count = frames.shape[0]
    centers = np.full((count, 2), np.nan, dtype=np.float32)
    sizes = np.full(count, np.nan, dtype=np.float32)
    colors: list[np.ndarray] = []
    shape_evidence: list[tuple[bool, float]] = []
    greys: list[np.ndarray] = []
    textures: list[str] = []
    for index, frame in enumerate(frames):
        mask = object_mask(frame)
        grey = frame.astype(np.float32).mean(axis=-1)
        background = ~_dilate(mask)
        if background.sum() > 8:
            greys.append(grey[background])
            textures.append(_texture(grey, background))
        if mask.sum() < MIN_OBJECT_PIXELS:
            continue
        ys, xs = np.nonzero(mask)
        centers[index] = (xs.mean() + 0.5, ys.mean() + 0.5)
        sizes[index] = math.sqrt(mask.sum())
        colors.append(frame[mask].astype(np.float32).mean(axis=0))
        # a shape cut by the frame's edge has the wrong fill ratio
        if not (mask[0].any() or mask[-1].any() or mask[:, 0].any() or mask[:, -1].any()):
            shape_evidence.append(_shape_evidence(mask))
    background_grey = np.concatenate(greys) if greys else np.full(1, 128.0)
    color = _nearest(np.mean(colors, axis=0), world.COLORS) if colors else None  # type: ignore[arg-type]
    shape = _shape_from_evidence(shape_evidence) if shape_evidence else None
    # a tie goes to the texture seen first (not to string-hash order, which differs per process)
    texture = Counter(textures).most_common(1)[0][0] if textures else "plain"
    return Reading(
        color=color,
        shape=shape,
        background=_nearest_shade(background_grey, texture),
        texture=texture,
        centers=centers,
        sizes=sizes,
        motion=classify_motion(centers, sizes),
        visible=float(np.isfinite(sizes).mean()),
    )


def _nearest_shade(grey: np.ndarray, texture: str) -> str:
    """The background shade whose grey levels are nearest those seen.

    A plain background is one level (compared through the median); a textured
    one alternates two, compared through the 10th and 90th percentiles.
    """
    low, high = np.percentile(grey, [10, 90])
    median = float(np.median(grey))
    best, best_distance = "gray", float("inf")
    for name, base in world.BACKGROUNDS.items():
        other = base + world.TEXTURE_CONTRAST if base < 128 else base - world.TEXTURE_CONTRAST
        if texture == "plain":
            distance = abs(median - base)
        else:
            distance = abs(low - min(base, other)) + abs(high - max(base, other))
        if distance < best_distance:
            best, best_distance = name, distance
    return best


def _dilate(mask: np.ndarray) -> np.ndarray:
    """The mask grown by one pixel (so anti-aliased edges don't count as background)."""
    grown = mask.copy()
    grown[1:, :] |= mask[:-1, :]
    grown[:-1, :] |= mask[1:, :]
    grown[:, 1:] |= mask[:, :-1]
    grown[:, :-1] |= mask[:, 1:]
    return grown


def trajectory_error(reading: Reading, reference: world.Clip) -> float:
    """Mean distance (pixels) between the video's motion and the reference's.

    Both trajectories are taken relative to their first frame, so the error
    measures the motion, not where the object is. Size changes count too:
    a log size ratio difference of 1 costs ``world.SIZE / 2`` pixels. A video
    without a visible object scores the error of standing still plus a
    half-frame penalty.
    """
    ref_path = reference.centers - reference.centers[:1]
    ref_scale = np.log(reference.sizes / reference.sizes[0])
    ok = np.isfinite(reading.centers).all(axis=1) & np.isfinite(reading.sizes)
    if ok.sum() < 2:
        return float(np.linalg.norm(ref_path, axis=1).mean() + world.SIZE / 2.0)
    first = int(np.nonzero(ok)[0][0])
    path = reading.centers - reading.centers[first]
    scale = np.log(reading.sizes / reading.sizes[first])
    # the reference is re-based at the same frame
    ref_path = reference.centers - reference.centers[first]
    ref_scale = np.log(reference.sizes / reference.sizes[first])
    position = np.linalg.norm(path[ok] - ref_path[ok], axis=1)
    size = np.abs(scale[ok] - ref_scale[ok]) * world.SIZE / 2.0
    return float((position + size).mean())


def static_error(reference: world.Clip) -> float:
    """The trajectory error of an object that does not move at all (the no-motion baseline)."""
    still = Reading(
        color=None,
        shape=None,
        background="gray",
        texture="plain",
        centers=np.repeat(reference.centers[:1], len(reference.centers), axis=0),
        sizes=np.repeat(reference.sizes[:1], len(reference.sizes), axis=0),
        motion="static",
        visible=1.0,
    )
    return trajectory_error(still, reference)


@dataclass
class Score:
    """Toy metrics of one generated video.

    Attributes:
        color_ok, shape_ok, background_ok: Appearance matches the prompt.
        motion_ok: The trajectory's class is the prompt's (pretraining motions only).
        trajectory_error: Pixels off the reference trajectory (held-out motions; see
            :func:`trajectory_error`).
        motion_fidelity: 1 - trajectory_error / static_error: 1 is the reference
            motion, 0 is no better than standing still.
        leaked: Per attribute, whether the reference look shows instead of the prompt's
            (only attributes where the two differ).
    """

    color_ok: bool
    shape_ok: bool
    background_ok: bool
    motion_ok: bool | None
    trajectory_error: float | None
    motion_fidelity: float | None
    leaked: dict[str, bool]

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def score(
    reading: Reading,
    prompt: world.ClipSpec,
    reference: world.Clip | None = None,
    reference_look: world.ClipSpec | None = None,
) -> Score:
    """Scores a reading against the prompt's spec (and a reference clip, if any)."""
    motion_ok = reading.motion == prompt.motion if prompt.motion in world.PRETRAIN_MOTIONS else None
    error = fidelity = None
    if reference is not None:
        error = trajectory_error(reading, reference)
        baseline = static_error(reference)
        fidelity = 1.0 - error / baseline if baseline > 0 else None
    leaked: dict[str, bool] = {}
    if reference_look is not None:
        pairs = {
            "color": (reading.color, prompt.color, reference_look.color),
            "shape": (reading.shape, prompt.shape, reference_look.shape),
            "background": (
                (reading.background, reading.texture),
                (prompt.background, prompt.texture),
                (reference_look.background, reference_look.texture),
            ),
        }
        for name, (seen, wanted, ref) in pairs.items():
            if wanted != ref:
                leaked[name] = seen == ref
    return Score(
        color_ok=reading.color == prompt.color,
        shape_ok=reading.shape == prompt.shape,
        background_ok=(reading.background, reading.texture) == (prompt.background, prompt.texture),
        motion_ok=motion_ok,
        trajectory_error=error,
        motion_fidelity=fidelity,
        leaked=leaked,
    )


def summarize(scores: Sequence[Score]) -> dict[str, float | None]:
    """Rates over a set of scores (None where no score has that metric)."""

    def rate(values: list[bool]) -> float | None:
        return float(np.mean(values)) if values else None

    def mean(values: list[float]) -> float | None:
        return float(np.mean(values)) if values else None

    leaks = [v for s in scores for v in s.leaked.values()]
    return {
        "videos": float(len(scores)),
        "color": rate([s.color_ok for s in scores]),
        "shape": rate([s.shape_ok for s in scores]),
        "background": rate([s.background_ok for s in scores]),
        "motion": rate([s.motion_ok for s in scores if s.motion_ok is not None]),
        "trajectory_error": mean(
            [s.trajectory_error for s in scores if s.trajectory_error is not None]
        ),
        "motion_fidelity": mean(
            [s.motion_fidelity for s in scores if s.motion_fidelity is not None]
        ),
        "leakage": rate(leaks),
    }
