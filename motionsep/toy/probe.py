"""Sample the toy model and score what it draws (used while and after pretraining)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from motionsep.toy import metrics, world

if TYPE_CHECKING:
    from motionsep.model.components import Components

PROBE_STEPS = 25
PROBE_GUIDANCE = 6.0


def sample_specs(
    components: Components,
    prompts: Sequence[str],
    seed: int,
    steps: int = PROBE_STEPS,
    guidance: float = PROBE_GUIDANCE,
    batch_size: int = 16,
) -> np.ndarray:
    """Generates one toy video per prompt with motionsep's own DDIM loop.

    Returns:
        uint8 frames (N, F, H, W, 3).
    """
    import torch

    from motionsep.config import load_settings
    from motionsep.model.components import encode_prompts
    from motionsep.sample import decode_latents, denoise, resolve_plan

    plan = resolve_plan(
        load_settings(preset="toy", overrides={"sample": {"steps": steps, "guidance": guidance}}),
        None,
    )
    factor = components.vae_scale_factor
    shape = (
        components.unet.config.in_channels,
        world.FRAMES,
        world.SIZE // factor,
        world.SIZE // factor,
    )
    videos = []
    for start in range(0, len(prompts), batch_size):
        chunk = list(prompts[start : start + batch_size])
        noise = torch.stack(
            [
                torch.randn(shape, generator=torch.Generator().manual_seed(seed + start + i))
                for i in range(len(chunk))
            ]
        )
        cond = encode_prompts(components, chunk)
        uncond = encode_prompts(components, [""] * len(chunk)) if guidance != 1 else None
        latents = denoise(components, noise, cond, uncond, plan)
        videos.append(decode_latents(components.vae, latents, frames_per_call=64))
    return np.concatenate(videos)


def held_in_specs(count: int, seed: int) -> list[world.ClipSpec]:
    """``count`` prompts over the pretraining motions, motions in turn, looks at random."""
    rng = np.random.default_rng([seed, 7])
    specs = []
    for index in range(count):
        spec = world.random_spec(rng)
        motion = world.PRETRAIN_MOTIONS[index % len(world.PRETRAIN_MOTIONS)]
        specs.append(world.ClipSpec(*spec.appearance, motion=motion, seed=spec.seed))
    return specs


def probe(
    components: Components, count: int = 56, seed: int = 1000, **sampling: Any
) -> dict[str, Any]:
    """Samples ``count`` held-in prompts and scores them with the toy metrics.

    Returns:
        The summary rates (color, shape, background, motion) plus
        ``direction``: motion accuracy over the four translations alone, and
        ``confusion``: per asked-for motion, how often each motion was drawn.
    """
    specs = held_in_specs(count, seed)
    frames = sample_specs(components, [s.prompt for s in specs], seed, **sampling)
    readings = [metrics.read_video(v) for v in frames]
    scores = [metrics.score(r, s) for r, s in zip(readings, specs, strict=True)]
    summary: dict[str, Any] = dict(metrics.summarize(scores))
    summary["direction_videos"] = sum(s.motion in ("left", "right", "up", "down") for s in specs)
    moving = [
        sc
        for sc, sp in zip(scores, specs, strict=True)
        if sp.motion in ("left", "right", "up", "down")
    ]
    summary["direction"] = float(np.mean([bool(s.motion_ok) for s in moving])) if moving else None
    # what each asked-for motion came out as ("none": no object found)
    confusion: dict[str, dict[str, int]] = {}
    for reading, spec in zip(readings, specs, strict=True):
        row = confusion.setdefault(spec.motion, {})
        drawn = reading.motion or "none"
        row[drawn] = row.get(drawn, 0) + 1
    summary["confusion"] = confusion
    summary["frames"] = frames
    summary["specs"] = specs
    return summary
