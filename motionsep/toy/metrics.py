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
from dataclasses import asdict, dataclass, field, replace

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


def trajectory_error(reading: Reading, reference: world.Clip | world.Track) -> float:
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


def static_error(reference: world.Clip | world.Track) -> float:
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


MISSING_VISIBLE = 0.5
"""A video whose object shows in fewer than this fraction of frames has a missing object."""

TRANSLATIONS: tuple[str, ...] = ("left", "right", "up", "down", "diagonal")
"""Motions that move the object along a straight line at constant speed."""


def velocity(centers: np.ndarray) -> np.ndarray | None:
    """Least-squares (dx, dy) of the centres over the whole clip, in pixels; None if < 2 visible."""
    ok = np.isfinite(centers).all(axis=1)
    if ok.sum() < 2:
        return None
    t = np.nonzero(ok)[0] / max(1, len(centers) - 1)
    return np.array([np.polyfit(t, centers[ok, axis], 1)[0] for axis in (0, 1)])


def direction_error(reading: Reading, reference: world.Clip | world.Track) -> tuple[float, float]:
    """Angle (degrees, 0-180) between the video's and the reference's direction, and speed ratio.

    Both directions are least-squares fits over the clip; the speed ratio is
    the video's displacement over the reference's (1: as fast, 0: still).
    Raises ValueError when the object is not seen in two frames.
    """
    seen = velocity(reading.centers)
    wanted = velocity(np.asarray(reference.centers, dtype=np.float64))
    if seen is None or wanted is None:
        raise ValueError("the object is not seen in two frames")
    speed, ref_speed = float(np.linalg.norm(seen)), float(np.linalg.norm(wanted))
    if speed < 1e-6 or ref_speed < 1e-6:
        return 90.0, speed / max(ref_speed, 1e-6)
    cosine = float(np.clip(seen @ wanted / (speed * ref_speed), -1.0, 1.0))
    return math.degrees(math.acos(cosine)), speed / ref_speed


def nearest_motion(
    reading: Reading, spec: world.ClipSpec, candidates: Sequence[str] = world.PRETRAIN_MOTIONS
) -> str | None:
    """The candidate motion whose path (with ``spec``'s offsets) is nearest the video's.

    Nearness is :func:`trajectory_error`; None when the object is missing.
    """
    if reading.visible < MISSING_VISIBLE:
        return None
    errors = {
        motion: trajectory_error(reading, world.track(replace(spec, motion=motion)))
        for motion in candidates
    }
    return min(errors, key=errors.__getitem__)


# ---------------------------------------------------------------------------
# continuous leakage

LEAK_MIN_SHADE_GAP = 10.0
"""Grey levels by which the prompt's and the reference's background means must differ to compare."""

LEAK_MIN_TEXTURE_GAP = 0.2
"""Reference-pattern amplitude by which the prompt's and reference's backgrounds must differ."""


@dataclass(frozen=True)
class LookFeatures:
    """Continuous appearance readings of a video.

    Attributes:
        color: Mean RGB of the object's pixels (None if no object).
        shade: Mean grey level of the background (the frame clock averages out).
        pattern: Amplitude of a given background pattern in the background:
            the least-squares factor that maps the pattern (mean removed per
            frame) onto the background (1: the pattern at full contrast, 0: none).
    """

    color: np.ndarray | None
    shade: float
    pattern: float


def look_features(frames: np.ndarray, pattern: np.ndarray) -> LookFeatures:
    """Reads :class:`LookFeatures` of a uint8 video (F, H, W, 3) against ``pattern`` (F, H, W)."""
    colors, shades, cross, power = [], [], 0.0, 0.0
    for frame, template in zip(frames, pattern, strict=True):
        mask = object_mask(frame)
        if mask.sum() >= MIN_OBJECT_PIXELS:
            colors.append(frame[mask].astype(np.float64).mean(axis=0))
        background = ~_dilate(mask)
        if background.sum() < 16:
            continue
        grey = frame.astype(np.float64).mean(axis=-1)[background]
        shades.append(grey)
        ref = template[background].astype(np.float64)
        ref = ref - ref.mean()
        cross += float((grey - grey.mean()) @ ref)
        power += float(ref @ ref)
    return LookFeatures(
        color=np.mean(colors, axis=0) if colors else None,
        shade=float(np.concatenate(shades).mean()) if shades else float("nan"),
        pattern=cross / power if power > 0 else 0.0,
    )


def _toward(value: float, start: float, end: float) -> float:
    """Where ``value`` lies from ``start`` (0) to ``end`` (1), clipped to [0, 1]."""
    return float(np.clip((value - start) / (end - start), 0.0, 1.0))


def leakage(
    frames: np.ndarray, prompt: world.ClipSpec, reference_look: world.ClipSpec
) -> dict[str, float]:
    """How far a video's look moved from the prompt's toward the reference look.

    Renders the prompt's clip twice, once in the prompt's look and once in the
    reference look (same motion, same offsets), reads the same features of
    both and of the video, and places the video between them per feature:
    0 is the prompt's look, 1 the reference look (clipped). Features: the
    object's colour (projected on the line between the two colours), the
    background's mean shade, and the amplitude of the reference background's
    pattern. A feature is left out where the two looks barely differ in it,
    and the colour where the video has no object.

    Returns:
        Per feature (``color``, ``shade``, ``texture``) and ``mean`` over them
        (absent when no feature could be compared).
    """
    reference_spec = prompt.with_appearance(*reference_look.appearance)
    pattern = world.background_frames(reference_spec)
    seen = look_features(frames, pattern)
    start = look_features(world.render(prompt).frames, pattern)
    end = look_features(world.render(reference_spec).frames, pattern)
    parts: dict[str, float] = {}
    if seen.color is not None and start.color is not None and end.color is not None:
        axis = end.color - start.color
        if float(axis @ axis) > 0:
            parts["color"] = float(np.clip((seen.color - start.color) @ axis / (axis @ axis), 0, 1))
    if abs(end.shade - start.shade) >= LEAK_MIN_SHADE_GAP:
        parts["shade"] = _toward(seen.shade, start.shade, end.shade)
    if abs(end.pattern - start.pattern) >= LEAK_MIN_TEXTURE_GAP:
        parts["texture"] = _toward(seen.pattern, start.pattern, end.pattern)
    if parts:
        parts["mean"] = float(np.mean(list(parts.values())))
    return parts


# ---------------------------------------------------------------------------
# one video's scores


@dataclass
class Score:
    """Toy metrics of one generated video.

    Attributes:
        color_ok, shape_ok, background_ok: Appearance matches the prompt.
        motion_ok: The trajectory's class is the prompt's (pretraining motions only).
        missing: The object shows in fewer than half of the frames.
        trajectory_error: Pixels off the reference trajectory (held-out motions; see
            :func:`trajectory_error`).
        motion_fidelity: 1 - trajectory_error / static_error: 1 is the reference
            motion, 0 is no better than standing still (None when the object is missing).
        angle_error: Degrees between the video's direction and the reference's
            (translations only).
        speed_ratio: The video's displacement over the reference's (translations only).
        nearest: The pretraining motion (or the reference's own motion) whose
            path is nearest the video's.
        leakage: Continuous leakage per feature and their ``mean`` (see :func:`leakage`).
        leaked: Per attribute, whether the reference look's palette label shows
            instead of the prompt's (only attributes where the two differ).
    """

    color_ok: bool
    shape_ok: bool
    background_ok: bool
    motion_ok: bool | None
    trajectory_error: float | None
    motion_fidelity: float | None
    leaked: dict[str, bool]
    missing: bool = False
    angle_error: float | None = None
    speed_ratio: float | None = None
    nearest: str | None = None
    leakage: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def score(
    reading: Reading,
    prompt: world.ClipSpec,
    reference: world.Clip | None = None,
    reference_look: world.ClipSpec | None = None,
    frames: np.ndarray | None = None,
) -> Score:
    """Scores a reading against the prompt's spec (and a reference clip, if any).

    ``frames`` (the video the reading came from) enables continuous leakage
    against ``reference_look``.
    """
    motion_ok = reading.motion == prompt.motion if prompt.motion in world.PRETRAIN_MOTIONS else None
    missing = reading.visible < MISSING_VISIBLE
    error = fidelity = angle = speed = None
    nearest = None
    if reference is not None:
        error = trajectory_error(reading, reference)
        baseline = static_error(reference)
        if baseline > 0 and not missing:
            fidelity = 1.0 - error / baseline
        if reference.spec.motion in TRANSLATIONS and not missing:
            angle, speed = direction_error(reading, reference)
        candidates = dict.fromkeys((*world.PRETRAIN_MOTIONS, reference.spec.motion))
        nearest = nearest_motion(reading, prompt, tuple(candidates))
    leaked: dict[str, bool] = {}
    continuous: dict[str, float] = {}
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
        if frames is not None:
            continuous = leakage(frames, prompt, reference_look)
    return Score(
        color_ok=reading.color == prompt.color,
        shape_ok=reading.shape == prompt.shape,
        background_ok=(reading.background, reading.texture) == (prompt.background, prompt.texture),
        motion_ok=motion_ok,
        trajectory_error=error,
        motion_fidelity=fidelity,
        leaked=leaked,
        missing=missing,
        angle_error=angle,
        speed_ratio=speed,
        nearest=nearest,
        leakage=continuous,
    )


def summarize(scores: Sequence[Score]) -> dict[str, float | None]:
    """Rates and means over a set of scores (None where no score has that metric)."""

    def rate(values: list[bool]) -> float | None:
        return float(np.mean(values)) if values else None

    def mean(values: list[float]) -> float | None:
        return float(np.mean(values)) if values else None

    leaks = [v for s in scores for v in s.leaked.values()]
    out: dict[str, float | None] = {
        "videos": float(len(scores)),
        "color": rate([s.color_ok for s in scores]),
        "shape": rate([s.shape_ok for s in scores]),
        "background": rate([s.background_ok for s in scores]),
        "motion": rate([s.motion_ok for s in scores if s.motion_ok is not None]),
        "missing": rate([s.missing for s in scores]),
        "trajectory_error": mean(
            [s.trajectory_error for s in scores if s.trajectory_error is not None]
        ),
        "motion_fidelity": mean(
            [s.motion_fidelity for s in scores if s.motion_fidelity is not None]
        ),
        "angle_error": mean([s.angle_error for s in scores if s.angle_error is not None]),
        "speed_ratio": mean([s.speed_ratio for s in scores if s.speed_ratio is not None]),
        "leakage": mean([s.leakage["mean"] for s in scores if "mean" in s.leakage]),
        "palette_leak": rate(leaks),
    }
    for part in ("color", "shade", "texture"):
        out[f"leakage_{part}"] = mean([s.leakage[part] for s in scores if part in s.leakage])
    return out
