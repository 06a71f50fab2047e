"""The toy world: procedural clips of one coloured shape moving on a background.

Every clip is fully described by a :class:`ClipSpec` (object colour and shape,
background shade and texture, motion, and a seed for the small random
offsets), renders deterministically, and comes with its prompt and its ground
truth (object mask, centre and size per frame). The palette is fixed and
chosen so that segmentation is exact: objects are saturated colours, and
backgrounds are achromatic shades.

Motions are split in two: the pretraining motions the toy base model learns,
and held-out motions it never sees, which are what motion customization has
to learn from a few reference clips.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass

import numpy as np

from motionsep.config import TOY_TRAIL_OPACITY

SIZE = 32
"""Frame width and height in pixels."""

FRAMES = 8
"""Frames per clip."""

FPS = 4

# Saturated object colours; backgrounds are grey levels, so an object pixel
# is simply a pixel with colour in it.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (225, 40, 40),
    "green": (40, 200, 60),
    "blue": (50, 90, 235),
    "yellow": (235, 215, 40),
    "purple": (160, 60, 215),
    "orange": (245, 140, 30),
}

SHAPES: tuple[str, ...] = ("square", "circle", "triangle")

# Grey level of each background shade; textures alternate it with a second
# level `TEXTURE_CONTRAST` away (towards mid-grey).
BACKGROUNDS: dict[str, int] = {"gray": 128, "dark": 40, "white": 215}
TEXTURES: tuple[str, ...] = ("plain", "striped", "checked")
TEXTURE_CONTRAST = 45
TEXTURE_PERIOD = 12.0

# Looks the world renders but no caption or prompt can name: the toy
# vocabulary has no word for them and pretraining never draws them. The leak
# protocol gives its reference clips such a look, so a model can draw it for
# a prompt only if an adapter absorbed it from the references. They are
# chosen so that the shipped toy VAE, trained on the named looks alone, still
# carries them through its latents (a round trip keeps magenta at about
# (184, 66, 183) and 66-81 % of the dots' contrast; cyan came back green and
# horizontal stripes were erased, so those were not used).
UNNAMED_COLORS: dict[str, tuple[int, int, int]] = {"magenta": (210, 50, 210)}
UNNAMED_TEXTURES: tuple[str, ...] = ("dotted",)
"""``dotted``: a square dot where both a vertical and a horizontal stripe would be."""

PRETRAIN_MOTIONS: tuple[str, ...] = (
    "static",
    "left",
    "right",
    "up",
    "down",
    "zoom-in",
    "zoom-out",
)
HELD_OUT_MOTIONS: tuple[str, ...] = ("diagonal", "orbit", "bounce", "dolly")
MOTIONS: tuple[str, ...] = PRETRAIN_MOTIONS + HELD_OUT_MOTIONS

MOTION_PHRASES: dict[str, str] = {
    "static": "standing still",
    "left": "moving left",
    "right": "moving right",
    "up": "moving up",
    "down": "moving down",
    "zoom-in": "growing bigger",
    "zoom-out": "shrinking smaller",
    "diagonal": "moving diagonally",
    "orbit": "orbiting around",
    "bounce": "bouncing sideways",
    "dolly": "dolly zooming",
}

# Geometry of the motions, in pixels. A translation sweeps 18 px over the
# clip (about 2.6 px, or 0.64 latent cells, per frame at 8 frames).
SWEEP = 18.0
MAX_SPEED = 2.0
BASE_SIZE = 10.0
ZOOM_SIZES = (6.0, 16.0)

CLOCK = 12.0
"""The frame clock: the background brightens by ``2 * CLOCK`` grey levels over every clip.

The 3D U-Net has no frame-position embedding; it can tell frames apart only
through the zero padding of its temporal convolutions, and the object alone
(a few percent of the pixels, in four of seven motions) teaches that too
slowly: a model trained without the clock put every frame's object in the
same place at the start of sampling and drew translations as static. The
clock is in every pixel of every clip: with it the U-Net draws the clock
from pure noise after 200 training steps (``bench/toy_frame_order.py``).
That alone did not make the object follow the prompt's direction (issue
10); see the motion trail below. The clock is far below the gaps between background shades (40, 128,
215) and constant within a frame, so segmentation reads clips as before.
"""


@dataclass(frozen=True)
class ClipSpec:
    """Everything that determines one toy clip."""

    color: str
    shape: str
    background: str
    texture: str
    motion: str
    seed: int = 0
    speed: float = 1.0
    """How fast the motion runs relative to the named motion (captions never say)."""

    def __post_init__(self) -> None:
        for value, allowed, what in (
            (self.color, (*COLORS, *UNNAMED_COLORS), "color"),
            (self.shape, SHAPES, "shape"),
            (self.background, BACKGROUNDS, "background"),
            (self.texture, (*TEXTURES, *UNNAMED_TEXTURES), "texture"),
            (self.motion, MOTIONS, "motion"),
        ):
            if value not in allowed:
                raise ValueError(f"unknown toy {what} {value!r}; choose from {', '.join(allowed)}")
        if not 0.0 < self.speed <= MAX_SPEED:
            raise ValueError(f"toy speed must be in (0, {MAX_SPEED}] (got {self.speed})")
        if self.seed < 0:
            raise ValueError(f"a toy clip's seed must be 0 or more (got {self.seed})")

    @property
    def named(self) -> bool:
        """Whether the toy vocabulary has a word for every part of the look."""
        return self.color in COLORS and self.texture in TEXTURES

    @property
    def prompt(self) -> str:
        """The clip's caption, e.g. ``a red circle moving right on a striped gray background``.

        Raises:
            ValueError: The look is unnamed (see :data:`UNNAMED_COLORS`); such
                clips are captioned by their motion alone (:func:`motion_caption`).
        """
        if not self.named:
            raise ValueError(
                f"the toy vocabulary has no words for {self.color} or {self.texture}; "
                "caption the clip with motion_caption()"
            )
        return prompt_for(self.color, self.shape, self.background, self.texture, self.motion)

    @property
    def appearance(self) -> tuple[str, str, str, str]:
        """(color, shape, background, texture)."""
        return (self.color, self.shape, self.background, self.texture)

    def with_appearance(self, color: str, shape: str, background: str, texture: str) -> ClipSpec:
        """The same motion, seed and speed with another look."""
        return ClipSpec(color, shape, background, texture, self.motion, self.seed, self.speed)

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def prompt_for(color: str, shape: str, background: str, texture: str, motion: str) -> str:
    """The caption of a toy clip (the same wording the toy model was trained on)."""
    article = "an" if color[0] in "aeiou" else "a"
    return (
        f"{article} {color} {shape} {MOTION_PHRASES[motion]} on a {texture} {background} background"
    )


def partial_prompt(
    spec: ClipSpec,
    keep_object: bool,
    keep_color: bool,
    keep_background: bool,
    keep_motion: bool = True,
) -> str:
    """The caption of ``spec`` with some of its look left out.

    ``keep_object=False`` drops the whole noun phrase (``moving right on a
    striped gray background``), ``keep_color=False`` the colour word
    (``a circle moving right ...``), ``keep_background=False`` the
    background phrase (``a red circle moving right``), ``keep_motion=False``
    the motion phrase (``a red circle on a striped gray background``: the
    frames alone then tell which way the object moves). Pretraining on such
    captions teaches the model what to draw when a caption leaves part of
    the look open, which is what a reference clip captioned by its motion
    alone asks for.
    """
    if not spec.named:
        return motion_caption(spec.motion) if keep_motion else ""
    words = []
    if keep_object:
        if keep_color:
            words += ["an" if spec.color[0] in "aeiou" else "a", spec.color]
        else:
            words.append("a")
        words.append(spec.shape)
    if keep_motion:
        words.append(MOTION_PHRASES[spec.motion])
    if keep_background:
        words.append(f"on a {spec.texture} {spec.background} background")
    return " ".join(words)


def motion_caption(motion: str) -> str:
    """A caption that names only the motion, e.g. ``moving diagonally``."""
    return MOTION_PHRASES[motion]


def color_rgb(color: str) -> tuple[int, int, int]:
    """The RGB of a named or unnamed object colour."""
    return COLORS[color] if color in COLORS else UNNAMED_COLORS[color]


def vocabulary() -> list[str]:
    """Every word a toy prompt can contain."""
    words: set[str] = {"a", "an", "on", "background"}
    words.update(COLORS, SHAPES, BACKGROUNDS, TEXTURES)
    for phrase in MOTION_PHRASES.values():
        words.update(phrase.split())
    return sorted(words)


@dataclass
class Clip:
    """A rendered clip and its ground truth.

    Attributes:
        spec: What was rendered.
        frames: uint8 array (F, H, W, 3).
        masks: float32 array (F, H, W), the object's coverage of each pixel.
        centers: float32 array (F, 2), object centre (x, y) in pixels.
        sizes: float32 array (F,), object size (side of its bounding square) in pixels.
        trails: float32 array (F, H, W), the motion trail's opacity outside the object.
    """

    spec: ClipSpec
    frames: np.ndarray
    masks: np.ndarray
    centers: np.ndarray
    sizes: np.ndarray
    trails: np.ndarray


def trajectory(
    motion: str, frames: int, rng: np.random.Generator, lag: float = 0.0, speed: float = 1.0
) -> tuple[np.ndarray, ...]:
    """Object centres (F, 2), sizes (F,) and background scale (F,) of a motion.

    Small random offsets (start position, size) come from ``rng`` so that the
    model learns the motion, not one fixed path. ``lag`` (in frames) evaluates
    the path that much earlier (before frame 0 the path is extended
    smoothly): the motion trail is drawn from it. ``speed`` scales the
    distance a translation sweeps and the size range of a zoom (about the
    same midpoint); the held-out motions ignore it.
    """
    t = np.linspace(0.0, 1.0, frames) - lag / max(1, frames - 1)
    mid = SIZE / 2.0
    size0 = BASE_SIZE + rng.uniform(-1.5, 1.5)
    sizes = np.full(frames, size0)
    bg_scale = np.ones(frames)
    # offsets across and along the motion
    across = rng.uniform(-6.0, 6.0)
    along = rng.uniform(-1.5, 1.5)
    sweep = (t - 0.5) * SWEEP * speed + along
    xs = np.full(frames, mid)
    ys = np.full(frames, mid)
    if motion == "static":
        xs += rng.uniform(-6.0, 6.0)
        ys += rng.uniform(-6.0, 6.0)
    elif motion in ("left", "right"):
        xs = mid + (sweep if motion == "right" else -sweep)
        ys = ys + across
    elif motion in ("up", "down"):
        ys = mid + (sweep if motion == "down" else -sweep)
        xs = xs + across
    elif motion in ("zoom-in", "zoom-out"):
        small, big = ZOOM_SIZES
        phase = t if motion == "zoom-in" else 1.0 - t
        grow = (small + big) / 2.0 + (big - small) * speed * (phase - 0.5)
        sizes = np.maximum(grow, 1.0)
        xs += rng.uniform(-2.0, 2.0)
        ys += rng.uniform(-2.0, 2.0)
    elif motion == "diagonal":
        xs = mid + sweep * 0.8
        ys = mid + sweep * 0.8
    elif motion == "orbit":
        # three quarters of a turn, starting on the left of the centre
        angle = math.pi + t * 1.5 * math.pi
        xs = mid + 7.0 * np.cos(angle)
        ys = mid + 7.0 * np.sin(angle)
        sizes = np.full(frames, 8.0 + rng.uniform(-1.0, 1.0))
    elif motion == "bounce":
        there_and_back = 1.0 - np.abs(2.0 * t - 1.0)
        xs = mid + (there_and_back - 0.5) * SWEEP + along
        ys = ys + across
    elif motion == "dolly":
        sizes = np.maximum(7.0 + 7.0 * t, 1.0)
        bg_scale = 1.6 - 0.9 * t
        xs += rng.uniform(-2.0, 2.0)
        ys += rng.uniform(-2.0, 2.0)
    else:  # pragma: no cover - ClipSpec validates motions
        raise ValueError(motion)
    centers = np.stack([xs, ys], axis=1)
    return centers.astype(np.float32), sizes.astype(np.float32), bg_scale.astype(np.float32)


TRAIL_LAGS = (0.5, 1.0, 1.5, 2.0, 2.5)
"""How far back (in frames) the motion trail samples the object's path."""

TRAIL_OPACITY = TOY_TRAIL_OPACITY
"""Opacity of the trail right behind the object; it fades linearly along the lags.

The trail is motion blur, as a camera with a slow shutter records it: faint
copies of the object where it just was. It makes the direction of motion
visible in every single frame (behind a rightward mover, to the left of it),
so the per-frame spatial layers, the only ones that read the text, are
trained to draw something that depends on the direction word; without it the
U-Net learned the colour word but not the direction word (issue 10). The
opacity keeps the trail's colour saturation (at most 0.42 x 215) below the
segmentation's object threshold, so metrics read the object alone.
"""


_SUPERSAMPLE = 4


@functools.lru_cache(maxsize=4)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Sub-pixel sample positions (in pixel units) of a size x size frame."""
    n = size * _SUPERSAMPLE
    coords = (np.arange(n, dtype=np.float32) + 0.5) / _SUPERSAMPLE
    return np.meshgrid(coords, coords)


def shape_mask(shape: str, cx: float, cy: float, size: float, resolution: int = SIZE) -> np.ndarray:
    """Coverage (H, W) in [0, 1] of a shape with the given centre and size, anti-aliased."""
    gx, gy = _grid(resolution)
    dx, dy = gx - cx, gy - cy
    half = size / 2.0
    if shape == "square":
        inside = (np.abs(dx) <= half) & (np.abs(dy) <= half)
    elif shape == "circle":
        inside = dx * dx + dy * dy <= half * half
    elif shape == "triangle":
        # apex up; the base is as wide as the triangle is tall
        height_frac = (dy + half) / (2.0 * half)
        inside = (np.abs(dy) <= half) & (np.abs(dx) <= half * height_frac)
    else:
        raise ValueError(f"unknown shape {shape!r}")
    return _downsample(inside.astype(np.float32), resolution)


def _downsample(fine: np.ndarray, resolution: int) -> np.ndarray:
    return fine.reshape(resolution, _SUPERSAMPLE, resolution, _SUPERSAMPLE).mean(axis=(1, 3))


@functools.lru_cache(maxsize=256)
def background_image(
    background: str, texture: str, scale: float = 1.0, resolution: int = SIZE
) -> np.ndarray:
    """The background as a float32 grey image (H, W) in 0..255 (cached: do not modify)."""
    level = float(BACKGROUNDS[background])
    other = level + TEXTURE_CONTRAST if level < 128 else level - TEXTURE_CONTRAST
    if texture == "plain":
        return np.full((resolution, resolution), level, dtype=np.float32)
    gx, gy = _grid(resolution)
    period = TEXTURE_PERIOD * scale
    # textures scale about the frame centre (the dolly motion changes the scale)
    u = np.floor((gx - resolution / 2.0) / (period / 2.0))
    v = np.floor((gy - resolution / 2.0) / (period / 2.0))
    if texture == "striped":
        pattern = u % 2
    elif texture == "dotted":
        pattern = (u % 2) * (v % 2)
    else:
        pattern = (u + v) % 2
    fine = np.where(pattern > 0, other, level).astype(np.float32)
    return _downsample(fine, resolution)


@dataclass(frozen=True)
class Track:
    """Where a clip's object is and how big, frame by frame, without rendering it.

    Attributes:
        centers: float32 (F, 2), object centre (x, y) in pixels.
        sizes: float32 (F,), object size in pixels.
        bg_scale: float32 (F,), the background texture's scale.
    """

    centers: np.ndarray
    sizes: np.ndarray
    bg_scale: np.ndarray


def track(spec: ClipSpec, frames: int = FRAMES) -> Track:
    """The object's path in :func:`render` of ``spec`` (same offsets), cheaply."""
    rng = np.random.default_rng([spec.seed, MOTIONS.index(spec.motion)])
    return Track(*trajectory(spec.motion, frames, rng, speed=spec.speed))


def background_frames(spec: ClipSpec, frames: int = FRAMES, resolution: int = SIZE) -> np.ndarray:
    """The clip's background alone, float32 (F, H, W) grey levels, without the frame clock."""
    scales = track(spec, frames).bg_scale
    return np.stack(
        [background_image(spec.background, spec.texture, float(s), resolution) for s in scales]
    )


def render(
    spec: ClipSpec,
    frames: int = FRAMES,
    resolution: int = SIZE,
    trail_opacity: float = TRAIL_OPACITY,
) -> Clip:
    """Renders a clip deterministically from its spec (trail opacity: :data:`TRAIL_OPACITY`)."""
    path = track(spec, frames)
    centers, sizes, bg_scale = path.centers, path.sizes, path.bg_scale
    seed = [spec.seed, MOTIONS.index(spec.motion)]
    # the same offsets, a little earlier on the path: where the trail lies
    behind = [
        trajectory(spec.motion, frames, np.random.default_rng(seed), lag, spec.speed)
        for lag in TRAIL_LAGS
    ]
    fade = trail_opacity * (1.0 - np.arange(len(TRAIL_LAGS)) / len(TRAIL_LAGS))
    color = np.asarray(color_rgb(spec.color), dtype=np.float32)
    out = np.empty((frames, resolution, resolution, 3), dtype=np.uint8)
    masks = np.empty((frames, resolution, resolution), dtype=np.float32)
    trails = np.empty((frames, resolution, resolution), dtype=np.float32)
    clock = np.linspace(-CLOCK, CLOCK, frames, dtype=np.float32)
    for index in range(frames):
        cx, cy = centers[index]
        mask = shape_mask(spec.shape, float(cx), float(cy), float(sizes[index]), resolution)
        trail = np.zeros_like(mask)
        for (past, past_sizes, _), opacity in zip(behind, fade, strict=True):
            px, py = (float(v) for v in past[index])
            past_mask = shape_mask(spec.shape, px, py, float(past_sizes[index]), resolution)
            # only where the object was and no longer is: a still object has no trail
            trail = np.maximum(trail, opacity * np.clip(past_mask - mask, 0.0, 1.0))
        cover = mask + (1.0 - mask) * trail
        grey = background_image(spec.background, spec.texture, float(bg_scale[index]), resolution)
        grey = grey + clock[index]
        image = grey[..., None] * (1.0 - cover[..., None]) + color * cover[..., None]
        out[index] = np.clip(np.rint(image), 0, 255).astype(np.uint8)
        masks[index] = mask
        trails[index] = trail * (1.0 - mask)
    return Clip(spec=spec, frames=out, masks=masks, centers=centers, sizes=sizes, trails=trails)


def appearances() -> list[tuple[str, str, str, str]]:
    """Every (color, shape, background, texture) of the world, in a fixed order."""
    return list(itertools.product(COLORS, SHAPES, BACKGROUNDS, TEXTURES))


def random_spec(
    rng: np.random.Generator,
    motions: tuple[str, ...] = PRETRAIN_MOTIONS,
    speed_jitter: float = 0.0,
) -> ClipSpec:
    """A clip spec with every attribute drawn uniformly.

    With ``speed_jitter`` the speed is drawn uniformly from ``1 +- speed_jitter``
    (one more draw from ``rng``; without it the draws are as they always were).
    """
    spec = ClipSpec(
        color=str(rng.choice(list(COLORS))),
        shape=str(rng.choice(SHAPES)),
        background=str(rng.choice(list(BACKGROUNDS))),
        texture=str(rng.choice(TEXTURES)),
        motion=str(rng.choice(motions)),
        seed=int(rng.integers(0, 2**31 - 1)),
    )
    if speed_jitter > 0:
        speed = float(rng.uniform(1.0 - speed_jitter, 1.0 + speed_jitter))
        spec = ClipSpec(*spec.appearance, spec.motion, spec.seed, speed)
    return spec


def batch(
    seed: int,
    step: int,
    size: int,
    motions: tuple[str, ...] = PRETRAIN_MOTIONS,
    speed_jitter: float = 0.0,
    trail_opacity: float = TRAIL_OPACITY,
) -> Iterator[Clip]:
    """``size`` random clips for training step ``step``: the same clips on every rerun."""
    rng = np.random.default_rng([seed, step])
    for _ in range(size):
        yield render(random_spec(rng, motions, speed_jitter), trail_opacity=trail_opacity)
