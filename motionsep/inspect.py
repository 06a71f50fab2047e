"""``inspect-attention``: what the motion LoRA changes in temporal attention, what AH carries.

One call of :func:`inspect_attention` runs the same sampling twice from the
same starting noise and records the frame-to-frame temporal attention maps
(:mod:`motionsep.model.attention`) at the chosen denoising steps:

- **base**: the motion adapter switched off and no appearance highway, i.e.
  the plain base model;
- **motion**: the motion LoRA at the plan's scale on *every* step (phased LoRA
  integration is ignored, so that every recorded step shows the motion) and
  the recipe's highway if the plan has it (``sample.highway`` can turn it off).

With ``video`` the given clip is VAE-encoded and noised to each chosen step's
timestep (``scheduler.add_noise``, the same noise for both runs) and the U-Net
is called once per step, instead of sampling.

What is recorded. With classifier-free guidance the U-Net batch is
``[unconditional; conditional]``; only the conditional half (the prompt's
pass) is recorded. In ``video`` mode only the conditional pass is run. Maps
are averaged over heads and spatial positions (rows: query frames, columns:
key frames; every row sums to 1).

Why the highway matters for comparisons: AH changes only the skips the up
blocks receive. At the first sampled step (and at every step with ``video``)
the maps of ``transformer_in``, the down blocks and the mid block are
therefore the same with or without it, but the up blocks' inputs change, so
their maps differ even with a zero motion LoRA; later sampled steps differ
everywhere because the latents drift apart. To isolate TAP, inspect with
``sample.highway=false`` (both runs then have no highway).

Summary numbers, per layer and step (see :data:`DEFINITIONS`): ``entropy``
(mean entropy in nats of the individual attention distributions: per head,
position and query frame), ``map_entropy`` (mean row entropy of the averaged
map), ``diagonal`` (mean attention a frame pays to itself), and
``kl_motion_base`` = KL(motion || base) of the averaged maps, rows smoothed
with ``KL_EPSILON``. For each skip the recipe's highway reroutes: the cosine
similarity between the spatial-attention output (what AH hands to the up
block) and the temporal-attention output it replaces, in both runs.

The library never prints; progress goes to the ``"attention"`` task.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

import motionsep
from motionsep.errors import UsageError
from motionsep.model import lora, tap
from motionsep.progress import Progress, or_null

if TYPE_CHECKING:
    import torch
    from torch import nn
    from torch.utils.hooks import RemovableHandle

    from motionsep.config import Settings
    from motionsep.model.attention import AttentionRecorder
    from motionsep.model.components import Components
    from motionsep.model.highway import AppearanceHighway
    from motionsep.model.motion import MotionPackage
    from motionsep.model.recipes import Skip
    from motionsep.sample import ModelRef, SamplingPlan

# Added to every probability before the KL divergence (rows renormalised), so
# a key frame one map ignores entirely gives a large but finite divergence.
KL_EPSILON = 1e-8

RUNS = ("base", "motion")

DEFINITIONS: dict[str, str] = {
    "map": "F x F temporal attention averaged over heads and spatial positions of the "
    "conditional pass; row i = query frame i, column j = key frame j; rows sum to 1",
    "entropy": "mean over heads, spatial positions and query frames of the entropy "
    "-sum_j p_j ln p_j of each attention distribution (nats; ln F = uniform)",
    "map_entropy": "mean over query frames of the entropy of the averaged map's row (nats); "
    ">= entropy, since averaging flattens",
    "diagonal": "mean over query frames of the averaged map's diagonal: attention a frame "
    "pays to itself (1/F = uniform)",
    "kl_motion_base": "KL(motion || base) = mean over query frames i of sum_j m_ij "
    "ln(m_ij / b_ij), m = motion map, b = base map, each row smoothed as "
    f"(p + eps) / (1 + F eps) with eps = {KL_EPSILON:g} (nats; 0 when the maps are equal)",
    "max_abs_difference": "max over the map of |motion - base|",
    "highway.cosine": "cosine similarity between the spatial-attention output "
    "(down_blocks.i.attentions.j) and the temporal-attention output it replaces "
    "(the stock skip: down_blocks.i.temp_attentions.j on ZeroScope, "
    "down_blocks.i.motion_modules.j on AnimateDiff), over the whole conditional "
    "half (all frames, channels and positions)",
    "highway.relative_change": "||temporal - spatial|| / ||spatial|| for the same tensors",
}

# Plot geometry in pixels (at PLOT_DPI): the grids are exactly
# LEFT + steps * CELL + RIGHT wide and TOP + layers * CELL + BOTTOM high.
PLOT_DPI = 100
PLOT_CELL = 100
PLOT_LEFT = 300
PLOT_RIGHT = 100
PLOT_TOP = 70
PLOT_BOTTOM = 20


# ---------------------------------------------------------------------------
# numbers


def parse_steps(spec: str | Sequence[int] | None, total: int) -> list[int]:
    """The denoising step indices to record, ascending and without repeats.

    Args:
        spec: ``"0,10,-1"`` (comma-separated; negative counts from the end,
            -1 is the last step), ``"all"``, a list of ints, or None for the
            first, middle and last step.
        total: Number of denoising steps.

    Raises:
        UsageError: for text that is not a list of ints or an index out of range.
    """
    if total < 1:
        raise UsageError(f"there are no denoising steps to record ({total} steps)")
    if spec is None:
        items: list[int] = [0, total // 2, total - 1]
    elif isinstance(spec, str):
        text = spec.strip().lower()
        if text == "all":
            return list(range(total))
        try:
            items = [int(part) for part in text.split(",") if part.strip()]
        except ValueError:
            raise UsageError(
                f"--steps {spec!r} is not a comma-separated list of step indices",
                "for example --steps 0,15,29 (negative counts from the end), or --steps all",
            ) from None
    else:
        items = [int(item) for item in spec]
    if not items:
        raise UsageError("--steps names no step", "for example --steps 0,15,29")
    resolved = set()
    for item in items:
        if not -total <= item < total:
            raise UsageError(
                f"step {item} is out of range: sampling has {total} steps (0..{total - 1})",
                "pass indices from 0 to steps - 1, or negative ones from the end",
            )
        resolved.add(item % total)
    return sorted(resolved)


def _smoothed(rows: np.ndarray, eps: float) -> np.ndarray:
    return (rows + eps) / (1.0 + rows.shape[-1] * eps)


def row_entropy(attention_map: np.ndarray) -> float:
    """Mean entropy (nats) of the rows of an ``F x F`` map."""
    p = np.clip(np.asarray(attention_map, dtype=np.float64), 0.0, None)
    logs = np.log(np.where(p > 0, p, 1.0))
    return float(-(p * logs).sum(axis=-1).mean())


def diagonal_mass(attention_map: np.ndarray) -> float:
    """Mean over query frames of the attention a frame pays to itself."""
    return float(np.diagonal(np.asarray(attention_map, dtype=np.float64)).mean())


def kl_divergence(p: np.ndarray, q: np.ndarray, eps: float = KL_EPSILON) -> float:
    """KL(p || q) of two row-stochastic maps, averaged over rows, in nats.

    Both maps are smoothed row by row as ``(x + eps) / (1 + F * eps)`` first,
    so the result is finite and exactly 0 when ``p`` equals ``q``.
    """
    ps = _smoothed(np.asarray(p, dtype=np.float64), eps)
    qs = _smoothed(np.asarray(q, dtype=np.float64), eps)
    return float((ps * (np.log(ps) - np.log(qs))).sum(axis=-1).mean())


def short_layer_name(name: str) -> str:
    """A plot label: ``down_blocks.0.temp_attentions.1.attn2`` for the only transformer block."""
    return name.replace(".transformer_blocks.0.", ".")


# ---------------------------------------------------------------------------
# the result


@dataclass(frozen=True)
class SkipSimilarity:
    """What one rerouted skip carries at one step, in both runs.

    Attributes:
        skip: Skip name (``down_blocks.i.layers.j``).
        spatial: The spatial attention whose output AH hands to the up block.
        temporal: The temporal attention whose output (the stock skip) it replaces.
        step: Denoising step index.
        timestep: The scheduler timestep of that step.
        cosine: Run -> cosine similarity of the two outputs.
        relative_change: Run -> ``||temporal - spatial|| / ||spatial||``.
    """

    skip: str
    spatial: str
    temporal: str
    step: int
    timestep: int
    cosine: dict[str, float]
    relative_change: dict[str, float]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {
            "skip": self.skip,
            "spatial": self.spatial,
            "temporal": self.temporal,
            "step": self.step,
            "timestep": self.timestep,
            **{
                run: {
                    "cosine": finite_or_none(self.cosine[run]),
                    "relative_change": finite_or_none(self.relative_change[run]),
                }
                for run in RUNS
                if run in self.cosine
            },
        }


@dataclass(frozen=True)
class AttentionInspection:
    """Recorded temporal attention of one prompt (or clip), base model vs motion.

    Attributes:
        prompt: The prompt.
        seed: Seed of the starting noise (the noise added to the clip with ``video``).
        mode: ``sample`` (denoising from noise) or ``video`` (a noised clip).
        video: The clip, in ``video`` mode.
        layers: Recorded temporal attention names, in forward order.
        steps: Recorded step indices.
        timesteps: Their scheduler timesteps.
        base_maps: ``(layers, steps, F, F)`` float64 maps of the base run.
        motion_maps: The same for the motion run.
        base_entropy: ``(layers, steps)`` mean entropy of the individual
            distributions in the base run.
        motion_entropy: The same for the motion run.
        highway: Per rerouted skip and step, what AH hands over instead.
        record: Plan, motion, model and settings of the inspection.
    """

    prompt: str
    seed: int
    mode: str
    video: Path | None
    layers: tuple[str, ...]
    steps: tuple[int, ...]
    timesteps: tuple[int, ...]
    base_maps: np.ndarray = field(repr=False)
    motion_maps: np.ndarray = field(repr=False)
    base_entropy: np.ndarray = field(repr=False)
    motion_entropy: np.ndarray = field(repr=False)
    highway: tuple[SkipSimilarity, ...] = ()
    record: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def frames(self) -> int:
        """F: frames per map side."""
        return int(self.base_maps.shape[-1])

    def entries(self) -> list[dict[str, Any]]:
        """One summary record per (layer, step): both runs' numbers and their KL."""
        rows = []
        for li, layer in enumerate(self.layers):
            for si, step in enumerate(self.steps):
                base, motion = self.base_maps[li, si], self.motion_maps[li, si]
                rows.append(
                    {
                        "layer": layer,
                        "step": step,
                        "timestep": self.timesteps[si],
                        "base": _map_numbers(base, float(self.base_entropy[li, si])),
                        "motion": _map_numbers(motion, float(self.motion_entropy[li, si])),
                        "kl_motion_base": kl_divergence(motion, base),
                        "max_abs_difference": float(np.abs(motion - base).max()),
                    }
                )
        return rows

    def summary(self) -> dict[str, Any]:
        """The JSON summary (what ``summary.json`` holds and ``--json`` prints)."""
        return {
            "prompt": self.prompt,
            "seed": self.seed,
            "mode": self.mode,
            "video": None if self.video is None else str(self.video),
            "frames": self.frames,
            "steps": list(self.steps),
            "timesteps": list(self.timesteps),
            "recorded": "conditional pass only (the conditional half of a guidance batch)",
            "definitions": DEFINITIONS,
            "kl_epsilon": KL_EPSILON,
            "layers": self.entries(),
            "highway": {
                "on_in_motion_run": bool(self.record.get("sample", {}).get("highway")),
                "skips": [item.to_dict() for item in self.highway],
            },
            **self.record,
        }


def _map_numbers(attention_map: np.ndarray, entropy: float) -> dict[str, float]:
    return {
        "entropy": entropy,
        "map_entropy": row_entropy(attention_map),
        "diagonal": diagonal_mass(attention_map),
    }


# ---------------------------------------------------------------------------
# highway probe


def skip_sources(unet: Any, skip: Skip) -> tuple[str, str]:
    """The spatial attention and the temporal transformer of a down-block layer skip.

    The first is what the highway hands to the up block, the second what the
    stock U-Net does (its ``temp_attentions.j`` on ZeroScope, its
    ``motion_modules.j`` on AnimateDiff: the layer's temporal transformer, as
    the family names it).
    """
    from motionsep.model.family import family_of

    if skip.down_block is None or skip.layer is None:
        raise ValueError(f"{skip.name} is not the skip of a down-block layer")
    family = family_of(unet)
    prefix = f"down_blocks.{skip.down_block}."
    temporal = [n for n in family.temporal_transformer_names(unet) if n.startswith(prefix)]
    return family.spatial_attention_name(skip.down_block, skip.layer), temporal[skip.layer]


class _SkipProbe:
    """Forward hooks comparing spatial and temporal attention outputs of rerouted skips.

    The spatial output is held only until its layer's temporal attention has
    run (a few microseconds of one block's forward), then dropped.
    """

    def __init__(self, unet: nn.Module, skips: Sequence[Skip], steps: Sequence[int], half: bool):
        self.unet = unet
        self.skips = list(skips)
        self.steps = frozenset(steps)
        self.half = half
        self.step: int | None = None
        self.run = RUNS[0]
        self.values: dict[tuple[str, int, str], tuple[float, float]] = {}
        self._held: dict[str, torch.Tensor] = {}
        self._handles: list[RemovableHandle] = []

    def modules(self, skip: Skip) -> tuple[str, str]:
        return skip_sources(self.unet, skip)

    def _active(self) -> bool:
        return self.step is not None and self.step in self.steps

    def _rows(self, output: Any) -> torch.Tensor:
        tensor = output[0] if isinstance(output, tuple) else getattr(output, "sample", output)
        if self.half:
            tensor = tensor[tensor.shape[0] // 2 :]
        return tensor.detach().reshape(-1).double()

    def install(self) -> _SkipProbe:
        for skip in self.skips:
            spatial, temporal = self.modules(skip)
            self._handles.append(
                self.unet.get_submodule(spatial).register_forward_hook(self._keep(skip.name))
            )
            self._handles.append(
                self.unet.get_submodule(temporal).register_forward_hook(self._compare(skip.name))
            )
        return self

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._held.clear()

    def _keep(self, name: str) -> Any:
        def keep(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            if self._active():
                self._held[name] = self._rows(output)

        return keep

    def _compare(self, name: str) -> Any:
        def compare(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            spatial = self._held.pop(name, None)
            if spatial is None or self.step is None:
                return
            temporal = self._rows(output)
            norm = float(spatial.norm())
            denominator = norm * float(temporal.norm())
            cosine = float(spatial @ temporal) / denominator if denominator > 0 else float("nan")
            change = float((temporal - spatial).norm()) / norm if norm > 0 else float("nan")
            self.values[(name, self.step, self.run)] = (cosine, change)

        return compare


@contextlib.contextmanager
def _probe(
    unet: nn.Module, skips: Sequence[Skip], steps: Sequence[int], half: bool
) -> Iterator[_SkipProbe]:
    probe = _SkipProbe(unet, skips, steps, half).install()
    try:
        yield probe
    finally:
        probe.remove()


# ---------------------------------------------------------------------------
# inspection


def inspect_attention(
    prompt: str,
    settings: Settings,
    motion: MotionPackage,
    *,
    video: Path | str | None = None,
    layers: str | Sequence[str] | None = None,
    steps: str | Sequence[int] | None = None,
    components: Components | None = None,
    model: ModelRef | None = None,
    chunk_elements: int | None = None,
    progress: Progress | None = None,
) -> AttentionInspection:
    """Records temporal attention with the base model and with the motion, same seed.

    Args:
        prompt: The prompt.
        settings: Resolved settings (:func:`motionsep.sample.generation_settings`);
            ``sample`` gives steps, guidance, size, frames, seed, LoRA scale
            and highway; ``sample.num_videos`` and ``sample.pli`` are ignored
            (one video; the motion on every step).
        motion: A verified motion package.
        video: A clip to noise to each recorded step's timestep instead of sampling.
        layers: ``--layers`` glob/regex or names (:func:`~motionsep.model.attention.match_layers`).
        steps: ``--steps`` (see :func:`parse_steps`); None: first, middle, last.
        components: Loaded components to use (the motion adapter is removed
            again at the end); loaded from ``settings.model`` when None.
        model: The resolved model; found from the settings when None.
        chunk_elements: Most attention-probability elements computed at once.
        progress: Receives the ``"attention"`` task (one unit per U-Net call).

    Returns the recorded maps and numbers.

    Raises:
        UsageError: for bad ``layers``/``steps``, a size the VAE cannot take,
            or a clip that cannot be read (VideoError).
        MotionNotFoundError, ModelNotFoundError, IncompatibleModelError:
            see :func:`motionsep.sample.resolve_model`.
    """
    from motionsep.model.attention import DEFAULT_CHUNK_ELEMENTS
    from motionsep.model.recipes import get_recipe
    from motionsep.sample import load_generation_model, resolve_plan

    events = or_null(progress)
    plan = resolve_plan(settings, motion)
    seed = settings.sample.seed
    recorded_steps = parse_steps(steps, plan.steps)
    # Everything that can be wrong with the request is checked before the
    # (for ZeroScope, slow) loading of the weights.
    model, selected, latent_shape, clip, inversion = _checked_request(
        settings, motion, plan, components, model, layers, video
    )

    if components is None:
        events.log(f"loading {model.id} from {model.path}")
        components = load_generation_model(settings, model)
    unet = components.unet
    timesteps = _timesteps(components, plan.steps)

    noise, clip_latents, cond, uncond = _starting_point(
        prompt, settings, plan, components, latent_shape, inversion, clip
    )
    guided = uncond is not None
    spec = get_recipe(motion.metadata.recipe)
    skips = _rerouted_skips(unet, spec)

    inputs = _RunInputs(
        components=components,
        plan=plan,
        layers=tuple(selected),
        steps=tuple(recorded_steps),
        noise=noise,
        clip_latents=clip_latents,
        cond=cond,
        uncond=uncond,
        chunk_elements=chunk_elements or DEFAULT_CHUNK_ELEMENTS,
    )
    maps, entropies, probe = _record_runs(inputs, motion, spec.name, skips, guided, events)

    base_maps, base_entropy = _stacked(maps["base"], entropies["base"], selected, recorded_steps)
    motion_maps, motion_entropy = _stacked(
        maps["motion"], entropies["motion"], selected, recorded_steps
    )
    highway_items = _highway_items(skips, recorded_steps, timesteps, probe)
    record = _inspection_record(plan, seed, motion, model, unet, settings)
    return AttentionInspection(
        prompt=prompt,
        seed=seed,
        mode="sample" if clip_latents is None else "video",
        video=None if video is None else Path(video),
        layers=tuple(selected),
        steps=tuple(recorded_steps),
        timesteps=tuple(timesteps[step] for step in recorded_steps),
        base_maps=base_maps,
        motion_maps=motion_maps,
        base_entropy=base_entropy,
        motion_entropy=motion_entropy,
        highway=highway_items,
        record=record,
    )


def _checked_request(
    settings: Settings,
    motion: MotionPackage,
    plan: SamplingPlan,
    components: Components | None,
    model: ModelRef | None,
    layers: str | Sequence[str] | None,
    video: Path | str | None,
) -> tuple[ModelRef, list[str], tuple[int, ...], torch.Tensor | None, torch.Tensor | None]:
    """The model, the selected layers, the latent shape, the clip and the inversion, checked."""
    from motionsep.model.attention import match_layers
    from motionsep.sample import (
        ModelRef,
        check_frames,
        check_inversion,
        load_inversion,
        resolve_model,
    )

    if components is not None:  # resolve_model checks the frames of a model folder
        check_frames(components.unet.config, plan.frames, "sample.frames")
    if model is None:
        model = (
            resolve_model(settings, motion)
            if components is None
            else ModelRef(settings.model.name, components.path, settings.model.revision)
        )
    names, channels, scale = _model_facts(components, model.path)
    selected = match_layers(names, layers)
    latent_shape = _latent_shape(channels, scale, plan.frames, plan.width, plan.height)
    clip = None if video is None else _read_clip(Path(video), settings, plan.width, plan.height)
    inversion = None
    if clip is None and plan.noise_prior > 0:
        inversion = load_inversion(motion)
        check_inversion(inversion, latent_shape, plan, motion.name)
    return model, selected, latent_shape, clip, inversion


def _rerouted_skips(unet: Any, spec: Any) -> list[Any]:
    """The U-Net skips the recipe's highway reroutes (none without a highway)."""
    from motionsep.model.recipes import highway_plan, skip_layout

    reroute = highway_plan(unet, spec.name).reroute if spec.has_highway else frozenset()
    return [skip for skip in skip_layout(unet) if skip.name in reroute]


def _timesteps(components: Components, steps: int) -> list[int]:
    """The timesteps of a DDIM run of ``steps`` steps with the model's scheduler settings."""
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler.from_config(components.scheduler.config)
    scheduler.set_timesteps(steps, device="cpu")
    return [int(t) for t in scheduler.timesteps]


def _stacked(
    maps: dict[tuple[str, int], np.ndarray],
    entropies: dict[tuple[str, int], float],
    layers: Sequence[str],
    steps: Sequence[int],
) -> tuple[np.ndarray, np.ndarray]:
    """One run's maps (layer, step, F, F) and entropies (layer, step) as arrays."""
    grid = np.stack([np.stack([maps[(layer, step)] for step in steps]) for layer in layers])
    entropy = np.array([[entropies[(layer, step)] for step in steps] for layer in layers])
    return grid, entropy


def _starting_point(
    prompt: str,
    settings: Settings,
    plan: SamplingPlan,
    components: Components,
    latent_shape: Sequence[int],
    inversion: torch.Tensor | None,
    clip: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor | None]:
    """Starting noise, the clip's latents (video mode), and the prompt embeddings.

    Returns:
        (noise, clip latents or None, conditional embedding, unconditional
        embedding or None when there is no guidance: in video mode, or at
        guidance 1).
    """
    import torch

    from motionsep.data import encode_frames
    from motionsep.model.components import encode_prompts
    from motionsep.sample import initial_latents

    seed = settings.sample.seed
    noise = initial_latents(
        latent_shape,
        seed,
        inversion=None if inversion is None else inversion[0],
        noise_prior=0.0 if inversion is None else plan.noise_prior,
    )
    clip_latents = None
    if clip is not None:
        clip_latents = encode_frames(components, clip, settings.data.vae_batch_size)
        clip_latents = clip_latents.unsqueeze(0).to("cpu", torch.float32)

    guided = plan.guidance != 1.0 and clip_latents is None
    texts = [plan.negative_prompt, prompt] if guided else [prompt]
    embeds = encode_prompts(components, texts).to("cpu")
    uncond, cond = (embeds[0:1], embeds[1:2]) if guided else (None, embeds[0:1])

    return noise, clip_latents, cond, uncond


def _record_runs(
    inputs: _RunInputs,
    motion: MotionPackage,
    recipe: str,
    skips: list[Any],
    guided: bool,
    events: Progress,
) -> tuple[
    dict[str, dict[tuple[str, int], np.ndarray]],
    dict[str, dict[tuple[str, int], float]],
    _SkipProbe,
]:
    """Runs the base and the motion run, recording attention maps, entropies and skips."""
    from motionsep.model.attention import record_temporal_attention
    from motionsep.model.highway import recipe_highway
    from motionsep.model.motion import apply_motion

    plan, unet = inputs.plan, inputs.components.unet
    recorded_steps = list(inputs.steps)
    calls = plan.steps if inputs.clip_latents is None else len(recorded_steps)
    events.start("attention", total=len(RUNS) * calls, unit="step")
    maps: dict[str, dict[tuple[str, int], np.ndarray]] = {}
    entropies: dict[str, dict[tuple[str, int], float]] = {}
    with contextlib.ExitStack() as stack:
        apply_motion(unet, motion)
        stack.callback(lora.drop_adapter, unet, tap.MOTION_ADAPTER)
        stack.enter_context(lora.lora_scale(unet, plan.lora_scale or 0.0))
        probe = stack.enter_context(_probe(unet, skips, recorded_steps, guided))
        for run in RUNS:
            probe.run = run
            with contextlib.ExitStack() as run_stack:
                use_motion = run == "motion"
                run_stack.enter_context(lora.adapter_enabled(unet, use_motion))
                highway = None
                if use_motion and plan.highway:
                    highway = run_stack.enter_context(
                        recipe_highway(unet, recipe, plan.highway_beta, enabled=True)
                    )
                recorder = run_stack.enter_context(
                    record_temporal_attention(
                        unet,
                        layers=inputs.layers,
                        steps=inputs.steps,
                        conditional_half=guided,
                        chunk_elements=inputs.chunk_elements,
                    )
                )
                _run(inputs, run, recorder, probe, highway, events)
                maps[run] = {key: value.numpy() for key, value in recorder.mean_maps().items()}
                entropies[run] = {key: s.mean_entropy() for key, s in recorder.stats.items()}
    events.finish("attention")

    return maps, entropies, probe


def _highway_items(
    skips: list[Any], recorded_steps: list[int], timesteps: list[int], probe: _SkipProbe
) -> tuple[SkipSimilarity, ...]:
    """Per rerouted skip and recorded step: how alike the skip's two sources are, per run."""
    return tuple(
        SkipSimilarity(
            skip=skip.name,
            spatial=probe.modules(skip)[0],
            temporal=probe.modules(skip)[1],
            step=step,
            timestep=timesteps[step],
            cosine={run: probe.values[(skip.name, step, run)][0] for run in RUNS},
            relative_change={run: probe.values[(skip.name, step, run)][1] for run in RUNS},
        )
        for skip in skips
        for step in recorded_steps
    )


def _inspection_record(
    plan: SamplingPlan,
    seed: int,
    motion: MotionPackage,
    model: ModelRef,
    unet: Any,
    settings: Settings,
) -> dict[str, Any]:
    """How an inspection was made (sampling plan, motion, model, settings), for its JSON."""
    from motionsep.sample import motion_record

    return {
        "sample": {
            **plan.to_dict(),
            "seed": seed,
            "note": "the motion run uses the motion on every step (pli ignored)",
        },
        "motion": motion_record(motion),
        "model": {
            "id": model.id,
            "path": str(model.path),
            "revision": model.revision,
            "dtype": str(unet.dtype).removeprefix("torch."),
            "device": str(unet.device),
        },
        "settings": settings.to_dict(),
        "motionsep_version": motionsep.__version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


@dataclass(frozen=True)
class _RunInputs:
    """What the base and the motion run share."""

    components: Components
    plan: SamplingPlan
    layers: tuple[str, ...]
    steps: tuple[int, ...]
    noise: torch.Tensor
    clip_latents: torch.Tensor | None
    cond: torch.Tensor
    uncond: torch.Tensor | None
    chunk_elements: int


def _run(
    inputs: _RunInputs,
    run: str,
    recorder: AttentionRecorder,
    probe: _SkipProbe,
    highway: AppearanceHighway | None,
    events: Progress,
) -> None:
    """One run: the DDIM loop from ``inputs.noise``, or one U-Net call per step on the clip.

    The adapter state and the highway are set by the caller for the whole run.
    """
    import torch
    from diffusers import DDIMScheduler

    from motionsep.sample import denoise

    plan = inputs.plan

    def at_step(index: int | None) -> None:
        recorder.step = index
        probe.step = index

    if inputs.clip_latents is None:
        # denoise calls on_step after step `index`: the next call is step index + 1.
        def on_step(index: int) -> None:
            at_step(index + 1 if index + 1 < plan.steps else None)
            events.advance("attention", run=run, step=index)

        at_step(0)
        motion_steps = plan.steps if run == "motion" else 0
        denoise(
            inputs.components,
            inputs.noise,
            inputs.cond,
            inputs.uncond,
            dataclasses.replace(plan, motion_steps=motion_steps, pli=None),
            highway=highway,
            motion=False,  # the caller switched the adapter for the whole run
            on_step=on_step,
        )
    else:
        unet = inputs.components.unet
        scheduler = DDIMScheduler.from_config(inputs.components.scheduler.config)
        scheduler.set_timesteps(plan.steps, device="cpu")
        text = inputs.cond.to(unet.device, unet.dtype)
        with torch.no_grad():
            for index in inputs.steps:
                at_step(index)
                t = scheduler.timesteps[index]
                noisy = scheduler.add_noise(inputs.clip_latents, inputs.noise, t.reshape(1))
                unet(noisy.to(unet.device, unet.dtype), t.to(unet.device), text)
                events.advance("attention", run=run, step=index)
    at_step(None)


def _model_facts(components: Components | None, folder: Path) -> tuple[list[str], int, int]:
    """Temporal attention names, latent channels and VAE factor, without loading weights.

    Without components the U-Net of the folder's family is built on the meta
    device from its config (no memory, no weights), so a bad ``--layers``
    fails before the model loads.
    """
    from motionsep.model.attention import temporal_attention_names

    if components is not None:
        unet: Any = components.unet
        scale = components.vae_scale_factor
    else:
        unet = _meta_unet(folder)
        vae_config = json.loads((folder / "vae" / "config.json").read_text())
        scale = 2 ** (len(vae_config.get("block_out_channels", [0] * 4)) - 1)
    return temporal_attention_names(unet), int(unet.config.in_channels), scale


def _meta_unet(folder: Path) -> Any:
    """The U-Net a model folder loads as (either family), on the meta device: names, no weights."""
    import diffusers
    import torch

    from motionsep.model.family import folder_family, unet_config

    family = folder_family(folder)
    unet_class = getattr(diffusers, family.unet_class)
    config = unet_config(folder)  # AnimateDiff: the joined U-Net's config
    with torch.device("meta"):
        return unet_class.from_config(config)


def _latent_shape(
    channels: int, scale: int, frames: int, width: int, height: int
) -> tuple[int, int, int, int]:
    """``(C, F, h, w)`` of one video's latents.

    Raises:
        UsageError: if the size is not a multiple of the VAE's downsampling factor.
    """
    if width % scale or height % scale:
        raise UsageError(
            f"size {width}x{height} is not a multiple of the VAE's factor {scale}",
            f"use a width and height divisible by {scale}",
        )
    return channels, frames, height // scale, width // scale


def _read_clip(path: Path, settings: Settings, width: int, height: int) -> torch.Tensor:
    """The clip's frames ``(F, 3, H, W)`` in [-1, 1], at the sample's frames and size."""
    from motionsep.video import load_clip

    return load_clip(
        path,
        frames=settings.sample.frames,
        frame_step=settings.data.frame_step,
        fps=settings.data.fps,
        width=width,
        height=height,
    )


# ---------------------------------------------------------------------------
# plots and files


def grid_size(layers: int, steps: int) -> tuple[int, int]:
    """``(width, height)`` in pixels of a PNG grid of ``layers`` rows and ``steps`` columns."""
    return (
        PLOT_LEFT + steps * PLOT_CELL + PLOT_RIGHT,
        PLOT_TOP + layers * PLOT_CELL + PLOT_BOTTOM,
    )


def plot_grid(
    maps: np.ndarray,
    layers: Sequence[str],
    column_titles: Sequence[str],
    title: str,
    *,
    difference: bool = False,
    vmax: float | None = None,
) -> bytes:
    """A PNG grid (layers x steps) of ``F x F`` maps, exactly :func:`grid_size` pixels.

    Args:
        maps: ``(layers, steps, F, F)``.
        layers: Row labels (full layer names; shortened for display).
        column_titles: One per step.
        title: Figure title.
        difference: Diverging colours, symmetric around 0.
        vmax: Top of the colour scale (for difference maps: of ``|value|``);
            None: the largest value in ``maps``.
    """
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    rows, columns = maps.shape[:2]
    width, height = grid_size(rows, columns)
    figure = Figure(figsize=(width / PLOT_DPI, height / PLOT_DPI), dpi=PLOT_DPI)
    top = float(np.abs(maps).max()) if vmax is None else vmax
    top = top if top > 0 else 1e-12  # an all-zero difference still draws
    limits = (-top, top) if difference else (0.0, top)
    cmap = "RdBu_r" if difference else "viridis"
    pad = 6  # pixels between cells
    image = None
    for r in range(rows):
        for c in range(columns):
            left = (PLOT_LEFT + c * PLOT_CELL + pad / 2) / width
            bottom = (PLOT_BOTTOM + (rows - 1 - r) * PLOT_CELL + pad / 2) / height
            axes = figure.add_axes(
                (left, bottom, (PLOT_CELL - pad) / width, (PLOT_CELL - pad) / height)
            )
            image = axes.imshow(
                maps[r, c], cmap=cmap, vmin=limits[0], vmax=limits[1], interpolation="nearest"
            )
            axes.set_xticks([])
            axes.set_yticks([])
            if c == 0:
                axes.set_ylabel(
                    short_layer_name(layers[r]), rotation=0, ha="right", va="center", fontsize=7
                )
            if r == 0:
                axes.set_title(column_titles[c], fontsize=8)
    if image is not None:
        bar_height = min(rows * PLOT_CELL, 400) - pad
        bar = figure.add_axes(
            (
                (PLOT_LEFT + columns * PLOT_CELL + 20) / width,
                (height - PLOT_TOP - bar_height - pad / 2) / height,
                15 / width,
                bar_height / height,
            )
        )
        figure.colorbar(image, cax=bar)
        bar.tick_params(labelsize=7)
    figure.suptitle(title, fontsize=9, x=0.01, ha="left", y=1 - 12 / height, va="top")
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=PLOT_DPI)
    return buffer.getvalue()


@dataclass(frozen=True)
class InspectionFiles:
    """Where :func:`save_inspection` wrote an inspection.

    Attributes:
        base: PNG grid of the base model's maps.
        motion: PNG grid of the motion's maps.
        difference: PNG grid of motion minus base.
        summary: The JSON summary.
        maps: ``.npz`` with ``base``, ``motion`` (layers, steps, F, F), ``layers``, ``steps``.
    """

    base: Path
    motion: Path
    difference: Path
    summary: Path
    maps: Path

    def paths(self) -> list[Path]:
        """Every file, in a fixed order."""
        return [self.base, self.motion, self.difference, self.summary, self.maps]

    def named(self) -> dict[str, Path]:
        """``{"base": path, ...}`` (what the summary records under ``files``)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


def is_inspection_folder(path: Path) -> bool:
    """Whether ``path`` is a folder :func:`save_inspection` wrote (PNG maps, not frames)."""
    maps = ("base.png", "motion.png", "difference.png")
    return (path / "summary.json").is_file() and any((path / name).is_file() for name in maps)


def inspection_files(out: Path | str) -> InspectionFiles:
    """The five files an inspection writes into the folder ``out``."""
    out = Path(out).expanduser()
    return InspectionFiles(
        base=out / "base.png",
        motion=out / "motion.png",
        difference=out / "difference.png",
        summary=out / "summary.json",
        maps=out / "maps.npz",
    )


def save_inspection(
    inspection: AttentionInspection, out: Path | str, *, force: bool = False
) -> InspectionFiles:
    """Writes the PNG grids, ``summary.json`` and ``maps.npz`` into the folder ``out``.

    The five files take their names together and exclusively: one that exists
    is refused unless ``force`` (which replaces those five files only).

    Raises:
        OutputExistsError: one of the five files exists, without ``force``.
    """
    from motionsep.store import temporary_sibling
    from motionsep.userfiles import check_new_files, discard, publish

    files = inspection_files(out)
    check_new_files(files.paths(), force=force)
    pairs = zip(inspection.steps, inspection.timesteps, strict=True)
    titles = [f"step {step} (t={timestep})" for step, timestep in pairs]
    shared = float(max(inspection.base_maps.max(), inspection.motion_maps.max()))
    where = inspection.prompt if inspection.video is None else inspection.video.name
    motion_name = inspection.record.get("motion", {}).get("name", "motion")
    contents: dict[Path, bytes] = {}
    contents[files.base] = plot_grid(
        inspection.base_maps,
        inspection.layers,
        titles,
        f"base model: temporal attention (query frame x key frame), {where}",
        vmax=shared,
    )
    contents[files.motion] = plot_grid(
        inspection.motion_maps,
        inspection.layers,
        titles,
        f"motion {motion_name}: temporal attention, {where}",
        vmax=shared,
    )
    contents[files.difference] = plot_grid(
        inspection.motion_maps - inspection.base_maps,
        inspection.layers,
        titles,
        f"motion {motion_name} minus base",
        difference=True,
    )
    summary = {**inspection.summary(), "files": {k: str(v) for k, v in files.named().items()}}
    contents[files.summary] = (json.dumps(summary, indent=2) + "\n").encode()
    buffer = io.BytesIO()
    np.savez(
        buffer,
        base=inspection.base_maps,
        motion=inspection.motion_maps,
        layers=np.array(inspection.layers),
        steps=np.array(inspection.steps),
        timesteps=np.array(inspection.timesteps),
    )
    contents[files.maps] = buffer.getvalue()
    files.summary.parent.mkdir(parents=True, exist_ok=True)
    written = []
    try:
        for final, data in contents.items():
            tmp = temporary_sibling(final)
            written.append((tmp, final))
            tmp.write_bytes(data)
        publish(written, replace=force)
    finally:
        for tmp, _ in written:
            discard(tmp)
    return files


def finite_or_none(value: float) -> float | None:
    """JSON has no NaN: a non-finite number becomes None."""
    return value if math.isfinite(value) else None
