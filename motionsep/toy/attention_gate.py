"""The attention gate: does a toy model use its temporal attention? (``toy probe --attention``)

On held-in clips (the pretraining motions, looks at random), noised at fixed
timesteps with fixed noise, it measures the denoising loss (MSE of the
U-Net's noise prediction) of

- the intact model,
- the model with every temporal attention made uniform (each frame takes the
  mean of all frames: :func:`motionsep.model.ablations.uniform_temporal_attention`),
- the model with every temporal convolution bypassed
  (:func:`motionsep.model.ablations.bypass_temporal_convs`),

and reports each ablated loss as a ratio to the intact one, together with the
entropy of every temporal attention layer's probabilities in the intact pass
(:func:`motionsep.model.attention.record_temporal_attention`). A ratio near 1
means the model does not need what was ablated; an entropy near ``ln F`` means
the attention is nearly uniform anyway.

Everything is seeded: the same arguments give the same numbers.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from motionsep.errors import UsageError
from motionsep.progress import Progress, or_null
from motionsep.toy import probe, world

if TYPE_CHECKING:
    import torch

    from motionsep.model.attention import AttentionRecorder
    from motionsep.model.components import Components

GATE_CLIPS = 28
"""Default clip count: four per pretraining motion."""

GATE_SEED = 1000
GATE_TIMESTEPS = (100, 300, 500, 700, 900)
GATE_BATCH = 16

UNIFORM_BAR = 1.25
"""The uniform-attention loss ratio a toy model whose attention carries motion should reach."""

_CONDITIONS = (
    "loss",
    "uniform_attention_loss",
    "no_temporal_conv_loss",
    "no_temporal_mixing_loss",
)


def attention_gate(
    components: Components,
    clips: int = GATE_CLIPS,
    seed: int = GATE_SEED,
    timesteps: Sequence[int] = GATE_TIMESTEPS,
    batch_size: int = GATE_BATCH,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Measures how much a toy model's loss depends on its temporal attention and convolutions.

    Args:
        components: A toy model (any 3D U-Net model that draws 32x32 clips of 8 frames).
        clips: Held-in clips (:func:`motionsep.toy.probe.held_in_specs`).
        seed: Seed of the clips' looks and of the noise.
        timesteps: Training timesteps at which each clip is noised.
        batch_size: Clips per U-Net call.
        progress: Receives one ``attention gate`` task, advanced per batch.

    Returns:
        A JSON-ready dict: ``loss`` (intact), ``uniform_attention_loss``,
        ``no_temporal_conv_loss`` (means over clips and timesteps), their
        ratios to ``loss`` (``uniform_attention_loss_ratio``,
        ``no_temporal_conv_loss_ratio``; ``no_temporal_mixing_loss_ratio``
        with both at once, where frames see each other only through the
        mean of all frames), the same per timestep
        (``per_timestep``, with that timestep's mean entropy), ``layers``
        (``{name, entropy}`` per temporal attention, in forward order),
        ``mean_entropy`` (mean over layers, nats), ``max_entropy``
        (``ln F``) and the settings (``clips``, ``timesteps``, ``seed``).

    Raises:
        UsageError: if a count or timestep is out of range.
    """
    import torch

    from motionsep.model.attention import record_temporal_attention

    _check_arguments(components, clips, timesteps, batch_size)
    specs = probe.held_in_specs(clips, seed)
    latents = _encode_clips(components, specs, batch_size)
    starts = range(0, clips, batch_size)
    report = or_null(progress)
    report.start("attention gate", len(timesteps) * len(starts), "batches")
    sums = {name: np.zeros(len(timesteps)) for name in _CONDITIONS}
    unet = components.unet
    texts = [
        _prompt_embeddings(components, [spec.prompt for spec in specs[start : start + batch_size]])
        for start in starts
    ]
    with torch.no_grad(), record_temporal_attention(unet) as recorder:
        for step, timestep in enumerate(timesteps):
            for start, text in zip(starts, texts, strict=True):
                chunk = range(start, min(start + batch_size, clips))
                noise = _noise(seed, chunk, timestep, latents.shape[1:]).to(unet.device)
                t = torch.full((len(chunk),), timestep, dtype=torch.long, device=unet.device)
                noisy = components.scheduler.add_noise(latents[start : chunk.stop], noise, t)
                recorder.step = step
                losses = _ablated_losses(unet, noisy, t, text, noise, recorder)
                for name, loss in losses.items():
                    sums[name][step] += float(loss.sum())
                report.advance("attention gate", timestep=timestep)
    report.finish("attention gate")
    return _summarize(sums, recorder, clips, timesteps, seed)


def _check_arguments(
    components: Components, clips: int, timesteps: Sequence[int], batch_size: int
) -> None:
    """Raises UsageError naming the first argument out of range."""
    if clips < 1:
        raise UsageError(f"the attention gate needs at least one clip (got {clips})")
    if batch_size < 1:
        raise UsageError(f"batch_size must be >= 1 (got {batch_size})")
    train_steps = int(components.scheduler.config.num_train_timesteps)
    if not timesteps:
        raise UsageError("the attention gate needs at least one timestep")
    bad = [t for t in timesteps if not 0 <= t < train_steps]
    if bad:
        raise UsageError(
            f"timesteps {bad} are outside the scheduler's range 0..{train_steps - 1}",
            "pick training timesteps such as 100, 300, 500, 700, 900",
        )


def _encode_clips(
    components: Components, specs: Sequence[world.ClipSpec], batch_size: int
) -> torch.Tensor:
    """Scaled VAE latents (N, C, F, h, w) of the rendered clips, as pretraining saw them."""
    import torch

    from motionsep.data import encode_frames
    from motionsep.toy.pretrain import to_pixels

    frames_per_call = batch_size * world.FRAMES
    latents = [
        encode_frames(components, to_pixels(world.render(spec).frames), frames_per_call)
        for spec in specs
    ]
    return torch.stack(latents).to(components.unet.device, components.unet.dtype)


def _prompt_embeddings(components: Components, prompts: list[str]) -> torch.Tensor:
    """Prompt embeddings in the U-Net's device and dtype."""
    from motionsep.model.components import encode_prompts

    unet = components.unet
    return encode_prompts(components, prompts).to(unet.device, unet.dtype)


def _noise(seed: int, clips: Sequence[int], timestep: int, shape: Sequence[int]) -> torch.Tensor:
    """Fixed noise per (clip, timestep): a clip's noise does not depend on the clip count."""
    import torch

    draws = []
    for clip in clips:
        clip_seed = int(np.random.default_rng([seed, clip, timestep]).integers(2**62))
        draws.append(torch.randn(tuple(shape), generator=torch.Generator().manual_seed(clip_seed)))
    return torch.stack(draws)


def _ablated_losses(
    unet: Any,
    noisy: torch.Tensor,
    t: torch.Tensor,
    text: torch.Tensor,
    noise: torch.Tensor,
    recorder: AttentionRecorder,
) -> dict[str, torch.Tensor]:
    """Per-clip noise MSE of the intact model (recording its attention) and of both ablations."""
    from motionsep.model.ablations import bypass_temporal_convs, uniform_temporal_attention
    from motionsep.model.family import family_of

    def losses() -> torch.Tensor:
        prediction = unet(noisy, t, encoder_hidden_states=text).sample
        return ((prediction.float() - noise.float()) ** 2).mean(dim=(1, 2, 3, 4)).cpu()

    intact = losses()
    recorder.step = None  # the ablated passes are not recorded
    with uniform_temporal_attention(unet):
        uniform = losses()
    if not family_of(unet).temporal_convolutions:
        # AnimateDiff: nothing to bypass, so bypassing changes nothing (ratio 1 by
        # construction) and uniform attention alone leaves frames only their mean
        return {
            "loss": intact,
            "uniform_attention_loss": uniform,
            "no_temporal_conv_loss": intact,
            "no_temporal_mixing_loss": uniform,
        }
    with bypass_temporal_convs(unet):
        no_conv = losses()
        with uniform_temporal_attention(unet):
            # frames see only the mean of all frames: what the world asks of frame-to-frame
            # information beyond that mean
            no_mixing = losses()
    return {
        "loss": intact,
        "uniform_attention_loss": uniform,
        "no_temporal_conv_loss": no_conv,
        "no_temporal_mixing_loss": no_mixing,
    }


def _summarize(
    sums: dict[str, np.ndarray],
    recorder: AttentionRecorder,
    clips: int,
    timesteps: Sequence[int],
    seed: int,
) -> dict[str, Any]:
    """The gate's JSON-ready report from the summed losses and the recorded entropies."""
    means = {name: float(total.sum()) / (clips * len(timesteps)) for name, total in sums.items()}
    frames = next(iter(recorder.stats.values())).probability_sum.shape[-1]
    layers = []
    for layer in recorder.layers:
        stats = [recorder.stats[(layer, step)] for step in range(len(timesteps))]
        entropy = sum(float(s.entropy_sum.sum()) for s in stats)
        rows = sum(s.count * s.entropy_sum.numel() for s in stats)
        layers.append({"name": layer, "entropy": entropy / rows})
    per_timestep = []
    for step, timestep in enumerate(timesteps):
        row: dict[str, Any] = {"timestep": timestep}
        row.update({name: float(total[step]) / clips for name, total in sums.items()})
        row.update(_ratios(row))
        row["mean_entropy"] = float(
            np.mean([recorder.stats[(layer, step)].mean_entropy() for layer in recorder.layers])
        )
        per_timestep.append(row)
    return {
        **means,
        **_ratios(means),
        "per_timestep": per_timestep,
        "layers": layers,
        "mean_entropy": float(np.mean([row["entropy"] for row in layers])),
        "max_entropy": math.log(frames),
        "clips": clips,
        "timesteps": list(timesteps),
        "seed": seed,
    }


def _ratios(losses: dict[str, Any]) -> dict[str, float]:
    """Each ablated loss divided by the intact one."""
    return {
        "uniform_attention_loss_ratio": losses["uniform_attention_loss"] / losses["loss"],
        "no_temporal_conv_loss_ratio": losses["no_temporal_conv_loss"] / losses["loss"],
        "no_temporal_mixing_loss_ratio": losses["no_temporal_mixing_loss"] / losses["loss"],
    }
