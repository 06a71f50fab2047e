"""Generation: our own DDIM sampling loop over stock diffusers components.

diffusers' ``TextToVideoSDPipeline`` is deprecated, so motionsep owns the loop
(DESIGN.md section 2). One call of :func:`generate_videos`:

1. resolves the sample settings against the motion package
   (:func:`resolve_plan`): the highway and phased LoRA integration (PLI) as the
   package's recipe says unless ``sample.highway``, ``sample.highway_beta`` or
   ``sample.pli`` override it;
2. injects the motion LoRA once (and removes it again at the end), installs
   the appearance highway hooks once, then switches both per denoising step:
   motion LoRA + highway for the first ``ceil(pli * steps)`` steps, the plain
   base model after (:func:`lora.adapter_enabled` and the highway's
   ``enabled`` flag; nothing is re-injected);
3. runs DDIM (eta 0) with classifier-free guidance in one batched U-Net call
   per step (unconditional and conditional halves concatenated), several
   videos per batch;
4. decodes the latents with the VAE a few frames at a time (VAE slicing) into
   ``uint8`` frames.

Seeds. Video ``k`` (0-based) of *every* prompt starts from noise drawn by a
CPU ``torch.Generator`` seeded with ``seed + k``, as one
``torch.randn((1, C, F, h, w))`` in float32. The noise is drawn on the CPU
so that the same seed starts from the same noise on CPU, CUDA and MPS, and it
does not depend on how videos are grouped into batches. (Prompt ``"a"`` and
prompt ``"b"`` with the same ``k`` therefore start from the same noise, which
makes prompts comparable.)

Noise prior. With ``sample.noise_prior = p > 0`` the initial latent is
``sqrt(p) * inv + sqrt(1 - p) * noise``, where ``inv`` is the motion package's
stored DDIM inversion (``inversion.safetensors``, tensor ``"inversion"`` of
shape ``(N, C, F, h, w)`` for ``N`` training clips); video ``k`` uses clip
``k mod N``.

The library never prints; progress goes through :mod:`motionsep.progress`
(tasks ``"videos"`` and ``"denoise"``).
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import re
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

import motionsep
from motionsep.config import Settings, VideoFormat, load_settings
from motionsep.errors import PackageError, UsageError
from motionsep.launch import SINGLE, Shard
from motionsep.model import lora, tap
from motionsep.model.motion import INVERSION_FILE, MotionPackage
from motionsep.model.recipes import get_recipe
from motionsep.progress import Progress, or_null

if TYPE_CHECKING:
    import torch
    from torch import nn

    from motionsep.model.components import Components
    from motionsep.model.highway import AppearanceHighway

INVERSION_KEY = "inversion"
SIDECAR_SUFFIX = ".json"

# Settings of a motion's training run that describe the machine it ran on,
# not the motion; they must not leak into generation on another machine.
_MACHINE_SETTINGS: tuple[tuple[str, ...], ...] = (("store",), ("model", "device"))


# ---------------------------------------------------------------------------
# settings


def generation_settings(
    package: MotionPackage | None,
    *,
    preset: str | None = None,
    config_file: Path | str | None = None,
    set_options: list[str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Settings:
    """The settings of a generation, starting from those the motion was trained with.

    Layers, lowest first: defaults < the motion's training settings (named
    ``motion NAME`` in errors) < preset < config file < environment < CLI
    flags (``overrides``) < ``--set``. The motion's store location and device
    are left out (they describe the training machine). The model is the
    package's base model unless ``overrides`` or ``--set`` name another one.

    Args:
        package: The motion, or None for the base model alone.
        preset: A preset name or path.
        config_file: A YAML or TOML settings file.
        set_options: ``section.field=value`` strings.
        overrides: Values of dedicated CLI flags, nested by section; None
            values do not override.

    Raises:
        SettingsError: listing every invalid field and the layer that set it.
    """
    cli = copy.deepcopy(dict(overrides or {}))
    base: tuple[str, Mapping[str, Any]] | None = None
    if package is not None:
        trained = copy.deepcopy(package.metadata.settings)
        for path in _MACHINE_SETTINGS:
            _pop_path(trained, path)
        base = (f"motion {package.name}", trained)
        model = dict(cli.get("model") or {})
        if model.get("name") is None:
            # The motion dictates its base model; a preset's model.name (say,
            # zeroscope in `--preset dolly`) must not silently replace it.
            model["name"] = package.metadata.base_model.id
            if model.get("revision") is None:
                model["revision"] = package.metadata.base_model.revision
        cli["model"] = model
    return load_settings(
        base=base, preset=preset, config_file=config_file, overrides=cli, set_options=set_options
    )


def load_motion_and_settings(
    motion: str | None,
    *,
    preset: str | None = None,
    config_file: Path | str | None = None,
    set_options: list[str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> tuple[MotionPackage | None, Settings]:
    """Finds a motion in the store and builds the settings of using it.

    The store that holds the motion may itself be set by the preset, config
    file, environment or ``--set``, so those layers are read once without the
    motion to find it, then :func:`generation_settings` builds the real tree.

    Args:
        motion: A motion name or package path; None (or ``"none"``) for the
            base model alone.
        preset, config_file, set_options, overrides: As :func:`generation_settings`.

    Raises:
        MotionNotFoundError: listing the installed motions.
        PackageError: for a damaged package.
        SettingsError: listing every invalid field.
    """
    from motionsep.model.motion import load_motion, resolve_motion
    from motionsep.store import NO_MOTION, Store

    package = None
    if motion is not None and motion.lower() != NO_MOTION:
        located = load_settings(
            preset=preset, config_file=config_file, overrides=overrides, set_options=set_options
        )
        package = load_motion(resolve_motion(Store(located.store.home), motion))
    settings = generation_settings(
        package,
        preset=preset,
        config_file=config_file,
        set_options=set_options,
        overrides=overrides,
    )
    return package, settings


def _pop_path(tree: dict[str, Any], path: tuple[str, ...]) -> None:
    node: Any = tree
    for key in path[:-1]:
        node = node.get(key) if isinstance(node, dict) else None
    if isinstance(node, dict):
        node.pop(path[-1], None)


def read_prompts_file(path: Path | str) -> list[str]:
    """Prompts from a text file: one per line; blank lines and ``#`` comments are skipped.

    Raises:
        UsageError: if the file cannot be read.
    """
    path = Path(path).expanduser()
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(
            f"cannot read prompts file {path}: {exc}", "pass a UTF-8 text file"
        ) from exc
    return [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]


def gather_prompts(
    prompts: Sequence[str], prompts_file: Path | str | None, settings: Settings
) -> tuple[list[str], bool]:
    """The prompts of a generate request: given ones, then the file's, else the preset's.

    Returns:
        The prompts, and whether they are the settings' preset prompts
        (``sample.prompts``) because none were given.

    Raises:
        UsageError: no prompt given and the settings have none.
    """
    chosen = list(prompts)
    if prompts_file is not None:
        chosen += read_prompts_file(prompts_file)
    if chosen:
        return chosen, False
    if not settings.sample.prompts:
        raise UsageError(
            "no prompt given",
            'pass a prompt, e.g. motionsep generate --motion NAME "a wolf on a snowy mountain"',
        )
    return list(settings.sample.prompts), True


def format_of_output(out: Path | str | None) -> VideoFormat | None:
    """The video format an ``--out`` file name asks for (``.mp4``, ``.gif``), or None."""
    suffix = Path(out).suffix.lower() if out is not None else ""
    return VideoFormat(suffix[1:]) if suffix in {".mp4", ".gif"} else None


# ---------------------------------------------------------------------------
# the plan


@dataclass(frozen=True)
class SamplingPlan:
    """The sample settings resolved against a motion: what the loop does.

    Attributes:
        steps: DDIM steps.
        guidance: Classifier-free guidance scale (1 means no guidance pass).
        width: Video width in pixels.
        height: Video height in pixels.
        frames: Frames per video.
        negative_prompt: Text of the unconditional half of guidance.
        recipe: The motion's recipe; None without a motion.
        lora_scale: Motion LoRA scale; None without a motion.
        highway: Whether the appearance highway is installed.
        highway_beta: Its scale, None when the highway is off.
        pli: Phased LoRA integration fraction; None when every step uses the motion.
        motion_steps: Steps (the first ones) that use the motion LoRA and the
            highway; 0 without a motion.
        noise_prior: Weight p of the stored inversion in the initial latent.
        noise_prior_source: Where ``noise_prior`` came from: ``"setting"``,
            ``"recipe"``, or why the recipe's default was not used.
    """

    steps: int
    guidance: float
    width: int
    height: int
    frames: int
    negative_prompt: str
    recipe: str | None
    lora_scale: float | None
    highway: bool
    highway_beta: float | None
    pli: float | None
    motion_steps: int
    noise_prior: float
    noise_prior_source: str = "setting"

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (what sidecars record under ``sample``)."""
        return {
            "scheduler": "ddim",
            "eta": 0.0,
            "steps": self.steps,
            "guidance": self.guidance,
            "width": self.width,
            "height": self.height,
            "frames": self.frames,
            "negative_prompt": self.negative_prompt,
            "recipe": self.recipe,
            "lora_scale": self.lora_scale,
            "highway": self.highway,
            "highway_beta": self.highway_beta,
            "pli": self.pli,
            "motion_steps": self.motion_steps,
            "noise_prior": self.noise_prior,
            "noise_prior_source": self.noise_prior_source,
        }


def pli_steps(pli: float | None, steps: int) -> int:
    """Denoising steps that use the motion: ``ceil(pli * steps)``, all of them for None.

    The product is rounded to 9 decimals first, so that e.g. ``0.3 * 10``
    (``3.0000000000000004`` in floating point) gives 3, not 4.
    """
    if pli is None:
        return steps
    return min(steps, max(1, math.ceil(round(pli * steps, 9))))


def resolve_plan(settings: Settings, package: MotionPackage | None) -> SamplingPlan:
    """Resolves ``settings.sample`` against a motion's recipe.

    ``sample.highway`` None means the recipe's highway, ``sample.highway_beta``
    None the recipe's beta, ``sample.pli`` None the recipe's PLI. Without a
    motion there is no LoRA, no highway and no PLI.

    Raises:
        UsageError: for a noise prior without a motion.
    """
    sample = settings.sample
    common: dict[str, Any] = {
        "steps": sample.steps,
        "guidance": sample.guidance,
        "width": sample.width,
        "height": sample.height,
        "frames": sample.frames,
        "negative_prompt": sample.negative_prompt,
        "noise_prior": sample.noise_prior or 0.0,
    }
    if package is None:
        if (sample.noise_prior or 0.0) > 0:
            raise UsageError(
                "the noise prior needs a motion: it mixes in the motion's stored inversion",
                "pass --motion NAME, or --noise-prior 0 with --motion none",
            )
        return SamplingPlan(
            **common,
            recipe=None,
            lora_scale=None,
            highway=False,
            highway_beta=None,
            pli=None,
            motion_steps=0,
        )
    spec = get_recipe(package.metadata.recipe)
    common["noise_prior"], common["noise_prior_source"] = _noise_prior(sample, spec, package)
    highway = spec.has_highway if sample.highway is None else sample.highway
    # A recipe without a highway (motiondirector) has no skips to reroute even
    # when asked for one: record the truth, not the request.
    highway = highway and spec.has_highway
    beta = (spec.beta if sample.highway_beta is None else sample.highway_beta) if highway else None
    pli = spec.pli if sample.pli is None else sample.pli
    if pli is not None and pli >= 1.0:
        pli = None  # every step uses the motion: the same as no PLI
    return SamplingPlan(
        **common,
        recipe=spec.name.value,
        lora_scale=sample.lora_scale,
        highway=highway,
        highway_beta=beta,
        pli=pli,
        motion_steps=pli_steps(pli, sample.steps),
    )


def _noise_prior(sample: Any, spec: Any, package: MotionPackage) -> tuple[float, str]:
    """The noise prior's weight and where it came from (setting, recipe, or why not)."""
    from motionsep.model.motion import INVERSION_FILE

    if sample.noise_prior is not None:
        return sample.noise_prior, "setting"
    if spec.noise_prior == 0:
        return 0.0, "recipe"
    if INVERSION_FILE not in package.files:
        return 0.0, (
            f"the {spec.name.value} recipe's {spec.noise_prior:g} is not used: the motion stores "
            "no inversion (train with --set data.inversion=true)"
        )
    return spec.noise_prior, "recipe"


# ---------------------------------------------------------------------------
# initial latents


def video_seed(seed: int, video_index: int) -> int:
    """The seed of video ``video_index`` (0-based) of a prompt: ``seed + video_index``."""
    return seed + video_index


def load_inversion(package: MotionPackage) -> torch.Tensor:
    """The motion's stored DDIM inversion ``(N, C, F, h, w)``, float32 on the CPU.

    Raises:
        UsageError: if the package has none.
        PackageError: if the file does not hold a 5-D ``"inversion"`` tensor.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not package.has_file(INVERSION_FILE):
        raise UsageError(
            f"motion {package.name!r} has no stored inversion ({INVERSION_FILE}), "
            "which the noise prior needs",
            "train the motion with --set data.inversion=true, or use --noise-prior 0",
        )
    path = package.file_path(INVERSION_FILE)
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as exc:
        raise PackageError(f"{path} cannot be read: {exc}") from exc
    inversion = tensors.get(INVERSION_KEY)
    if inversion is None or inversion.ndim != 5:
        found = "no such tensor" if inversion is None else f"shape {tuple(inversion.shape)}"
        raise PackageError(
            f"{path} must hold a tensor {INVERSION_KEY!r} of shape (clips, channels, frames, "
            f"height, width); found {found}",
            "train the motion again with --set data.inversion=true",
        )
    return inversion.float()


def check_inversion(
    inversion: torch.Tensor, latent_shape: Sequence[int], plan: SamplingPlan, name: str
) -> None:
    """Checks that a stored inversion fits the latents asked for.

    Args:
        inversion: ``(N, C, F, h, w)``.
        latent_shape: ``(C, F, h, w)`` of one video's latents.
        plan: The resolved plan (for the message).
        name: The motion's name (for the message).

    Raises:
        UsageError: naming both shapes and the flags that make them agree.
    """
    stored = tuple(inversion.shape[1:])
    if stored == tuple(latent_shape):
        return
    channels, frames, height, width = stored
    scale = plan.height // latent_shape[2]
    raise UsageError(
        f"motion {name!r}: its stored inversion is {frames} frames of {width}x{height} latents "
        f"({width * scale}x{height * scale} pixels, {channels} channels); this generation "
        f"asks for {plan.frames} frames at {plan.width}x{plan.height}",
        f"use --frames {frames} --size {width * scale}x{height * scale}, or --noise-prior 0",
    )


def initial_latents(
    latent_shape: Sequence[int],
    seed: int,
    *,
    inversion: torch.Tensor | None = None,
    noise_prior: float = 0.0,
) -> torch.Tensor:
    """The starting latent of one video, float32 on the CPU.

    ``noise`` is ``torch.randn((1, *latent_shape))`` from a CPU generator
    seeded with ``seed``; the result is ``sqrt(p) * inversion + sqrt(1 - p) *
    noise`` (just ``noise`` for p = 0, exactly ``inversion`` for p = 1).

    Args:
        latent_shape: ``(C, F, h, w)``.
        seed: The video's seed (:func:`video_seed`).
        inversion: One clip's inversion ``(C, F, h, w)``; needed when p > 0.
        noise_prior: p in [0, 1].

    Returns:
        A tensor ``(1, C, F, h, w)``.
    """
    import torch

    generator = torch.Generator(device="cpu").manual_seed(seed)
    noise = torch.randn((1, *latent_shape), generator=generator, dtype=torch.float32)
    if noise_prior <= 0.0:
        return noise
    if inversion is None:
        raise ValueError("a noise prior above 0 needs an inversion")
    prior = inversion.to(torch.float32).reshape(1, *latent_shape)
    return math.sqrt(noise_prior) * prior + math.sqrt(1.0 - noise_prior) * noise


# ---------------------------------------------------------------------------
# the model


@dataclass(frozen=True)
class ModelRef:
    """The base model of a generation, as sidecars record it.

    Attributes:
        id: Store name, hub id or path as given (``settings.model.name``).
        path: The diffusers folder it was loaded from.
        revision: The hub commit recorded by the store, or ``settings.model.revision``.
    """

    id: str
    path: Path
    revision: str | None


def check_frames(unet_config: Mapping[str, Any], frames: int, setting: str) -> None:
    """Checks that one forward of the U-Net can take ``frames`` frames.

    AnimateDiff's motion modules add one of ``motion_max_seq_length`` learned
    frame positions to every frame (32 for v1-5-2), so longer clips fail
    deep inside the U-Net; ZeroScope has no such limit.

    Args:
        unet_config: The U-Net config (the joined one for AnimateDiff).
        frames: Frames asked for.
        setting: The setting that asked (``sample.frames``, ``data.frames``),
            named in the message.

    Raises:
        UsageError: naming the limit and the setting to lower.
    """
    from motionsep.model.motion import config_family

    family = config_family(unet_config)
    if family is None:
        return
    limit = family.max_frames(dict(unet_config))
    if limit is None or frames <= limit:
        return
    flag = "--frames N" if setting == "sample.frames" else f"--set {setting}=N"
    raise UsageError(
        f"{setting} is {frames}, but the motion modules of this {family.title.split(' (')[0]} "
        f"base know only {limit} frame positions (motion_max_seq_length): it cannot take "
        f"more than {limit} frames at once",
        f"use at most {limit} frames ({flag}, N <= {limit})",
    )


def resolve_model(settings: Settings, package: MotionPackage | None = None) -> ModelRef:
    """Finds the base model folder and checks it against the motion before loading.

    Raises:
        ModelNotFoundError: with the command that installs it.
        IncompatibleModelError: if the motion was trained on another family or
            U-Net architecture, naming the model it needs.
        ModelFormatError: if the folder is not a text-to-video model.
        UsageError: if ``sample.frames`` is more than the U-Net can take.
    """
    from motionsep.model.components import check_model_folder
    from motionsep.model.motion import check_base_model
    from motionsep.store import Store

    store = Store(settings.store.home)
    name = settings.model.name
    folder = store.resolve_model(name)
    unet_config = check_model_folder(folder)
    if package is not None:
        check_base_model(package, unet_config)
    check_frames(unet_config, settings.sample.frames, "sample.frames")
    revision = settings.model.revision
    if not Path(name).expanduser().exists():
        record = store.model_record(name)
        if record is not None and record.revision:
            revision = record.revision
    return ModelRef(id=name, path=folder, revision=revision)


def load_generation_model(
    settings: Settings, ref: ModelRef, *, offload: bool = False
) -> Components:
    """Loads a model's components in the settings' dtype.

    On the CPU with ``offload`` (they move to the accelerator only while
    used), else on ``settings.model.device``.
    """
    from motionsep.devices import resolve_device, resolve_dtype
    from motionsep.model.components import load_components

    device = resolve_device(settings.model.device)
    dtype = resolve_dtype(settings.model.dtype, device)
    return load_components(ref.path, dtype=dtype, device="cpu" if offload else device)


@contextlib.contextmanager
def _placed(module: nn.Module, device: torch.device, offload: bool) -> Iterator[nn.Module]:
    """Keeps ``module`` on ``device`` inside the block; with offload, on the CPU after."""
    module.to(device)
    try:
        yield module
    finally:
        if offload and device.type != "cpu":
            module.to("cpu")
            _empty_cache(device)


def _empty_cache(device: torch.device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.empty_cache()
    elif device.type == "mps":
        torch.mps.empty_cache()


# ---------------------------------------------------------------------------
# denoising and decoding


def _text_embeddings(
    components: Components, texts: Sequence[str], device: torch.device, offload: bool
) -> dict[str, torch.Tensor]:
    """CLIP embeddings of each distinct text, on the CPU."""
    from motionsep.model.components import encode_prompts

    unique = list(dict.fromkeys(texts))
    with _placed(components.text_encoder, device, offload):
        embeds = encode_prompts(components, unique).to("cpu")
    return {text: embeds[i : i + 1] for i, text in enumerate(unique)}


def denoise(
    components: Components,
    latents: torch.Tensor,
    cond: torch.Tensor,
    uncond: torch.Tensor | None,
    plan: SamplingPlan,
    *,
    highway: AppearanceHighway | None = None,
    motion: bool = False,
    on_step: Any = None,
) -> torch.Tensor:
    """Runs the DDIM loop (eta 0) from ``latents``; returns the clean latents.

    Latents and the scheduler arithmetic stay in float32 whatever the U-Net's
    dtype, so fp16 weights do not round the trajectory at every step.

    Args:
        components: The model; the U-Net must already sit on its device.
        latents: ``(B, C, F, h, w)`` starting latents.
        cond: ``(B, L, D)`` prompt embeddings.
        uncond: ``(B, L, D)`` negative-prompt embeddings; None when
            ``plan.guidance == 1`` (no guidance pass).
        plan: Steps, guidance, and how many first steps use the motion.
        highway: The installed highway, switched per step (or None).
        motion: Whether the U-Net holds the motion adapter to switch per step.
        on_step: Called as ``on_step(step_index)`` after every step.
    """
    import torch
    from diffusers import DDIMScheduler

    unet = components.unet
    device, dtype = unet.device, unet.dtype
    # A private scheduler: set_timesteps mutates it, the caller's stays as it was.
    scheduler = DDIMScheduler.from_config(components.scheduler.config)
    scheduler.set_timesteps(plan.steps, device="cpu")
    guided = uncond is not None
    text = cond if uncond is None else torch.cat([uncond, cond])
    text = text.to(device, dtype)
    sample = latents.to(device, torch.float32) * scheduler.init_noise_sigma
    timesteps = list(scheduler.timesteps)
    # Two phases (PLI): the motion's first steps, then the base model's. The
    # adapter switch walks every module, so it happens once per phase rather
    # than once per step; the highway flag is a plain attribute.
    phases = ((True, 0, plan.motion_steps), (False, plan.motion_steps, len(timesteps)))
    with torch.no_grad():
        for use_motion, first, stop in phases:
            if first >= stop:
                continue
            if highway is not None:
                highway.enabled = use_motion
            with lora.adapter_enabled(unet, use_motion) if motion else contextlib.nullcontext():
                for index in range(first, stop):
                    t = timesteps[index]
                    model_input = torch.cat([sample, sample]) if guided else sample
                    eps = unet(
                        model_input.to(dtype), t.to(device), encoder_hidden_states=text
                    ).sample.to(torch.float32)
                    if guided:
                        eps_uncond, eps_cond = eps.chunk(2)
                        eps = eps_uncond + plan.guidance * (eps_cond - eps_uncond)
                    sample = scheduler.step(eps, t, sample, eta=0.0).prev_sample
                    if on_step is not None:
                        on_step(index)
    return sample


def decode_pixels(vae: Any, latents: torch.Tensor, frames_per_call: int) -> torch.Tensor:
    """VAE-decodes video latents ``(B, C, F, h, w)`` into float pixels ``(B, F, 3, H, W)``.

    The decoder's own range, about [-1, 1], in fp32 on the CPU. Decodes
    ``frames_per_call`` frames per VAE call (VAE slicing), so the decoder's
    activations stay small whatever the video length.
    """
    import torch

    batch, channels, frames, height, width = latents.shape
    scaled = latents / vae.config.scaling_factor
    flat = scaled.permute(0, 2, 1, 3, 4).reshape(batch * frames, channels, height, width)
    images = []
    with torch.no_grad():
        for start in range(0, flat.shape[0], frames_per_call):
            chunk = flat[start : start + frames_per_call].to(vae.device, vae.dtype)
            images.append(vae.decode(chunk).sample.to("cpu", torch.float32))
    pixels = torch.cat(images)
    return pixels.reshape(batch, frames, 3, pixels.shape[-2], pixels.shape[-1])


def decode_latents(vae: Any, latents: torch.Tensor, frames_per_call: int) -> np.ndarray:
    """VAE-decodes video latents ``(B, C, F, h, w)`` into ``uint8`` frames ``(B, F, H, W, 3)``
    (:func:`decode_pixels`, then quantized)."""
    import torch

    pixels = decode_pixels(vae, latents, frames_per_call)
    pixels = ((pixels + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)
    return pixels.permute(0, 1, 3, 4, 2).contiguous().numpy()


# ---------------------------------------------------------------------------
# generate


@dataclass(frozen=True)
class GeneratedVideo:
    """One generated video.

    Attributes:
        prompt: Its prompt.
        prompt_index: Position of the prompt in the call's list.
        video_index: k: which video of its prompt (seed = base seed + k).
        seed: The seed of its starting noise.
        frames: ``uint8`` frames ``(F, H, W, 3)``.
        latents: Its final (denoised) latents ``(C, F, h, w)``, float32 on the CPU.
        record: What its sidecar records: prompt, seed, resolved sample
            settings, motion and model identity, full settings, versions.
    """

    prompt: str
    prompt_index: int
    video_index: int
    seed: int
    frames: np.ndarray = field(repr=False)
    latents: torch.Tensor = field(repr=False)
    record: dict[str, Any] = field(repr=False)


@dataclass(frozen=True)
class _Job:
    prompt: str
    prompt_index: int
    video_index: int
    seed: int


def motion_record(package: MotionPackage | None) -> dict[str, Any] | None:
    """Identity of a motion for sidecars: name, path, adapter sha256, recipe, base model."""
    if package is None:
        return None
    base = package.metadata.base_model
    return {
        "name": package.name,
        "path": str(package.path),
        "adapter_sha256": package.files.get("adapter.safetensors"),
        "recipe": package.metadata.recipe.value,
        "lora_rank": package.metadata.lora_rank,
        "base_model": {
            "id": base.id,
            "revision": base.revision,
            "unet_config_hash": base.unet_config_hash,
            "family": base.family,
        },
        "motionsep_version": package.metadata.motionsep_version,
    }


def generate_videos(
    prompts: Sequence[str], settings: Settings, motion: MotionPackage | None = None, **options: Any
) -> list[GeneratedVideo]:
    """Every video of :func:`iter_videos` as a list (same arguments, same errors)."""
    return list(iter_videos(prompts, settings, motion, **options))


def iter_videos(
    prompts: Sequence[str],
    settings: Settings,
    motion: MotionPackage | None = None,
    *,
    components: Components | None = None,
    model: ModelRef | None = None,
    offload: bool | None = None,
    batch_size: int | None = None,
    shard: Shard | None = None,
    progress: Progress | None = None,
) -> Iterator[GeneratedVideo]:
    """Generates ``settings.sample.num_videos`` videos of every prompt, yielding each when done.

    Nothing is kept between batches, so a caller that writes each video as
    it comes (:class:`VideoWriter`) keeps what finished when the run stops,
    and memory does not grow with the number of prompts. Closing the
    iterator early puts the model back as it was.

    Args:
        prompts: The prompts; video k of each uses seed ``sample.seed + k``.
        settings: The resolved settings (see :func:`generation_settings`).
        motion: A verified motion package, or None for the base model alone.
        components: Already loaded components to use instead of loading
            ``settings.model.name`` (they come back without the motion adapter;
            without ``offload`` they are left on the device); the sidecar then
            names ``model`` (or ``settings.model.name``) as their source.
        model: The resolved model (:func:`resolve_model`); found from the
            settings when None.
        offload: Keep each component on the CPU except while it is used
            (small GPUs); slower. None: ``sample.offload``.
        batch_size: Videos denoised together (each takes two U-Net rows with
            guidance). Grouping does not change a video's starting noise;
            results agree across batch sizes to float rounding. None:
            ``sample.batch_size``.
        shard: This process's share when several processes split the work
            (:func:`motionsep.launch.current_shard`): the batches are formed
            as in one process and batch i is this process's when
            ``i % shard.count == shard.rank``, so each video is made once,
            with the same batch mates, whichever process makes it.
        progress: Receives the ``"videos"`` and ``"denoise"`` tasks.

    Yields:
        One :class:`GeneratedVideo` per (prompt, k) of this process's share,
        prompts in order.

    Raises:
        UsageError: for no prompts, a bad batch size, or a noise prior the
            motion cannot serve (no inversion, or one of another shape).
        MotionNotFoundError, ModelNotFoundError, IncompatibleModelError:
            see :func:`resolve_model`.
    """

    from motionsep.model.highway import recipe_highway
    from motionsep.model.motion import apply_motion

    prompts = list(prompts)
    offload = settings.sample.offload if offload is None else offload
    batch_size = settings.sample.batch_size if batch_size is None else batch_size
    plan, model, latent_shape, inversion = _checked_request(
        prompts, settings, motion, components, model, batch_size
    )
    events = or_null(progress)
    components, device = _loaded(components, settings, model, offload, events)
    unet = components.unet
    guided = plan.guidance != 1.0
    embeds = _text_embeddings(
        components, [plan.negative_prompt, *prompts] if guided else prompts, device, offload
    )
    numbered, batches = _batches(prompts, settings.sample, batch_size, shard)
    base_record = _base_record(settings, plan, motion, model, unet.dtype, device)

    events.start("videos", total=sum(len(b) for _, b in numbered), unit="video")
    events.start("denoise", total=len(numbered) * plan.steps, unit="step")
    with contextlib.ExitStack() as stack:
        if motion is not None:
            apply_motion(unet, motion)
            stack.callback(lora.drop_adapter, unet, tap.MOTION_ADAPTER)
            stack.enter_context(lora.lora_scale(unet, plan.lora_scale or 0.0))
        highway = None
        if plan.highway and motion is not None:
            highway = stack.enter_context(
                recipe_highway(unet, motion.metadata.recipe, plan.highway_beta, enabled=True)
            )
        for number, batch in numbered:
            yield from _generate_batch(
                batch,
                f"{number}/{batches}",
                _Generation(components, plan, device, offload, latent_shape, inversion, highway),
                embeds,
                settings.data.vae_batch_size,
                base_record,
                motion is not None,
                events,
            )
    events.finish("denoise")
    events.finish("videos")


def _loaded(
    components: Components | None,
    settings: Settings,
    model: ModelRef,
    offload: bool,
    events: Progress,
) -> tuple[Components, torch.device]:
    """The components to generate with (loaded now when not given) and the device they run on."""
    from motionsep.devices import resolve_device

    if components is None:
        events.log(f"loading {model.id} from {model.path}")
        components = load_generation_model(settings, model, offload=offload)
        return components, resolve_device(settings.model.device)
    device = components.unet.device if not offload else resolve_device(settings.model.device)
    return components, device


def _jobs(prompts: Sequence[str], num_videos: int, seed: int) -> list[_Job]:
    """Every video of a run in order: each prompt, then k, with seed ``seed + k``."""
    return [
        _Job(prompt, p, k, video_seed(seed, k))
        for p, prompt in enumerate(prompts)
        for k in range(num_videos)
    ]


def _batches(
    prompts: list[str], sample: Any, batch_size: int, shard: Shard | None
) -> tuple[list[tuple[int, list[_Job]]], int]:
    """This process's batches of (prompt, k) jobs, numbered from 1, and how many there are in all.

    The batches are cut from every job in order, whichever process asks, so a
    video's batch mates do not depend on how many processes share the run.
    """
    jobs = _jobs(prompts, sample.num_videos, sample.seed)
    batches = [jobs[i : i + batch_size] for i in range(0, len(jobs), batch_size)]
    return (shard or SINGLE).take(list(enumerate(batches, start=1))), len(batches)


def _checked_request(
    prompts: list[str],
    settings: Settings,
    motion: MotionPackage | None,
    components: Components | None,
    model: ModelRef | None,
    batch_size: int,
) -> tuple[SamplingPlan, ModelRef, tuple[int, ...], torch.Tensor | None]:
    """Everything that can be wrong with a request, checked before any weights load.

    Returns:
        The sampling plan, the model, the latent shape of one video and the
        motion's inversion latents (None without a noise prior).
    """
    if not prompts:
        raise UsageError(
            "no prompt given", 'pass one or more prompts, e.g. "a wolf on a snowy mountain"'
        )
    if batch_size < 1:
        raise UsageError(f"batch size must be at least 1, got {batch_size}")
    plan = resolve_plan(settings, motion)
    if model is None:
        model = (
            resolve_model(settings, motion)
            if components is None
            else ModelRef(settings.model.name, components.path, settings.model.revision)
        )
    latent_shape = _latent_shape(plan, components, model.path)
    inversion = None
    if plan.noise_prior > 0:
        assert motion is not None  # resolve_plan refuses a prior without a motion
        inversion = load_inversion(motion)
        check_inversion(inversion, latent_shape, plan, motion.name)
    return plan, model, latent_shape, inversion


@dataclass(frozen=True)
class _Generation:
    """What every batch of one :func:`iter_videos` run shares."""

    components: Components
    plan: SamplingPlan
    device: torch.device
    offload: bool
    latent_shape: tuple[int, ...]
    inversion: torch.Tensor | None
    highway: Any


def _generate_batch(
    batch: list[_Job],
    label: str,
    run: _Generation,
    embeds: dict[str, torch.Tensor],
    vae_batch_size: int,
    base_record: dict[str, Any],
    with_motion: bool,
    events: Progress,
) -> list[GeneratedVideo]:
    """Denoises and decodes one batch of videos (starting noise, guidance, highway, VAE)."""
    import torch

    plan, inversion, components = run.plan, run.inversion, run.components
    start = torch.cat(
        [
            initial_latents(
                run.latent_shape,
                job.seed,
                inversion=None
                if inversion is None
                else inversion[job.video_index % len(inversion)],
                noise_prior=plan.noise_prior,
            )
            for job in batch
        ]
    )
    cond = torch.cat([embeds[job.prompt] for job in batch])
    guided = plan.guidance != 1.0
    uncond = embeds[plan.negative_prompt].expand_as(cond) if guided else None

    def on_step(index: int) -> None:
        events.advance("denoise", batch=label)

    with _placed(components.unet, run.device, run.offload):
        latents = denoise(
            components,
            start,
            cond,
            uncond,
            plan,
            highway=run.highway,
            motion=with_motion,
            on_step=on_step,
        )
    with _placed(components.vae, run.device, run.offload):
        frames = decode_latents(components.vae, latents, vae_batch_size)
    latents = latents.to("cpu")
    videos = []
    for row, job in enumerate(batch):
        record = {
            "prompt": job.prompt,
            "prompt_index": job.prompt_index,
            "video_index": job.video_index,
            "seed": job.seed,
            "inversion_clip": None if inversion is None else job.video_index % len(inversion),
            **base_record,
        }
        events.advance("videos", prompt=_short_prompt(job.prompt), seed=job.seed)
        videos.append(
            GeneratedVideo(
                prompt=job.prompt,
                prompt_index=job.prompt_index,
                video_index=job.video_index,
                seed=job.seed,
                frames=frames[row],
                latents=latents[row].clone(),
                record=record,
            )
        )
    return videos


def _latent_shape(
    plan: SamplingPlan, components: Components | None, folder: Path
) -> tuple[int, int, int, int]:
    """``(C, F, h, w)`` of one video's latents, from loaded components or the model's configs.

    Raises:
        UsageError: if the size is not a multiple of the VAE's downsampling
            factor, or (given components) too many frames for the U-Net.
    """
    if components is not None:
        check_frames(components.unet.config, plan.frames, "sample.frames")
        channels = int(components.unet.config.in_channels)
        scale = components.vae_scale_factor
    else:
        unet_config = json.loads((folder / "unet" / "config.json").read_text())
        vae_config = json.loads((folder / "vae" / "config.json").read_text())
        channels = int(unet_config.get("in_channels", 4))
        scale = 2 ** (len(vae_config.get("block_out_channels", [0] * 4)) - 1)
    if plan.width % scale or plan.height % scale:
        raise UsageError(
            f"size {plan.width}x{plan.height} is not a multiple of the VAE's factor {scale}",
            f"use a width and height divisible by {scale}",
        )
    return channels, plan.frames, plan.height // scale, plan.width // scale


def _base_record(
    settings: Settings,
    plan: SamplingPlan,
    motion: MotionPackage | None,
    model: ModelRef,
    dtype: torch.dtype,
    device: torch.device,
) -> dict[str, Any]:
    return {
        "sample": {
            **plan.to_dict(),
            "base_seed": settings.sample.seed,
            "num_videos": settings.sample.num_videos,
            "fps": settings.sample.fps,
            "format": settings.sample.format.value,
        },
        "motion": motion_record(motion),
        "model": {
            "id": model.id,
            "path": str(model.path),
            "revision": model.revision,
            "dtype": str(dtype).removeprefix("torch."),
            "device": str(device),
        },
        "settings": settings.to_dict(),
        "motionsep_version": motionsep.__version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def _short_prompt(prompt: str, limit: int = 32) -> str:
    return prompt if len(prompt) <= limit else prompt[: limit - 3] + "..."


# ---------------------------------------------------------------------------
# writing


@dataclass(frozen=True)
class SavedVideo:
    """Where one video went.

    Attributes:
        path: The mp4 or gif file, or the folder of PNG frames.
        sidecar: The JSON file beside it with every setting used.
        video: The generated video.
    """

    path: Path
    sidecar: Path
    video: GeneratedVideo

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary (``--json`` output)."""
        return _summary(self.path, self.video.prompt, self.video.seed, self.video.video_index)


def _summary(path: Path, prompt: str, seed: int, video_index: int) -> dict[str, Any]:
    """What ``--json`` says of one video (written, or reserved for another process)."""
    return {
        "path": str(path),
        "sidecar": str(sidecar_path(path)),
        "prompt": prompt,
        "seed": seed,
        "video_index": video_index,
    }


def slugify(text: str, limit: int = 60) -> str:
    """A file-name-safe slug of a prompt: lowercase words joined by ``-``."""
    slug = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    return slug[:limit].rstrip("-") or "video"


class VideoWriter:
    """Writes videos (mp4, gif or PNG folder) with their JSON sidecars, one at a time.

    ``out`` ending in ``.mp4`` or ``.gif`` names the file of a single video;
    anything else is a folder, where each video goes to ``OUT/SLUG-SEED.EXT``
    (a folder for png) and nothing is overwritten: when a name (or its
    sidecar) exists already or was taken in this run, ``-2``, ``-3``, ... is
    appended. Names are chosen as videos arrive, so nothing is allocated per
    requested video up front.

    Args:
        out: The folder, or one file.
        fmt: mp4 (H.264), gif, or png (a folder of frames).
        fps: Frame rate of mp4 and gif.
        count: How many videos will come (checked against a single-file ``out``).

    Raises:
        UsageError: for a file ``out`` with several videos or of another format.
    """

    def __init__(
        self,
        out: Path | str,
        fmt: VideoFormat | str = VideoFormat.MP4,
        fps: float = 8,
        count: int = 1,
    ) -> None:
        self.fmt = VideoFormat(fmt)
        self.out = Path(out).expanduser()
        self.fps = fps
        self.suffix = "" if self.fmt is VideoFormat.PNG else f".{self.fmt.value}"
        self.single = format_of_output(self.out) is not None
        self.saved: list[SavedVideo] = []
        self._taken: set[Path] = set()
        self._reserved: dict[tuple[int, int], Path] = {}
        if self.single:
            if count != 1:
                raise UsageError(
                    f"--out {self.out} names one file but {count} videos are to be generated",
                    "pass a folder to --out",
                )
            if self.out.suffix.lower() != self.suffix:
                raise UsageError(
                    f"--out {self.out} ends in {self.out.suffix} but the format is "
                    f"{self.fmt.value}",
                    f"pass --format {self.out.suffix[1:].lower()}, or a folder to --out",
                )

    def target(self, prompt: str, seed: int) -> Path:
        """Reserves and returns the path of the next video."""
        if self.single:
            self._taken.add(self.out)
            return self.out
        stem = f"{slugify(prompt)}-{seed}"
        candidate, n = self.out / f"{stem}{self.suffix}", 1
        while candidate in self._taken or candidate.exists() or sidecar_path(candidate).exists():
            n += 1
            candidate = self.out / f"{stem}-{n}{self.suffix}"
        self._taken.add(candidate)
        return candidate

    def reserve(self, prompts: Sequence[str], num_videos: int, seed: int) -> list[dict[str, Any]]:
        """Names every video of a run up front (video k of each prompt has seed ``seed + k``).

        Several processes sharing one run each reserve the same names from
        the same folder before any of them writes (:meth:`write` then uses
        them), so a video's name does not depend on which process made it
        or when.

        Returns:
            What :meth:`SavedVideo.to_dict` will say of each video, in the
            order of the prompts and then k.
        """
        planned = []
        for job in _jobs(prompts, num_videos, seed):
            target = self.target(job.prompt, job.seed)
            self._reserved[(job.prompt_index, job.video_index)] = target
            planned.append(_summary(target, job.prompt, job.seed, job.video_index))
        return planned

    def write(self, video: GeneratedVideo) -> SavedVideo:
        """Writes one video and then its sidecar; returns where they went."""
        from motionsep.store import atomic_write_bytes
        from motionsep.video import write_video

        reserved = self._reserved.get((video.prompt_index, video.video_index))
        target = reserved or self.target(video.prompt, video.seed)
        if reserved and (target.exists() or sidecar_path(target).exists()):
            raise UsageError(
                f"{target} was written by someone else while this run was making it "
                "(another run writing to the same folder?); it was left as it is",
                "pass another --out",
            )
        target.parent.mkdir(parents=True, exist_ok=True)
        write_video(video.frames, target, fps=self.fps, format=self.fmt.value)
        sidecar = sidecar_path(target)
        record = {
            "video": target.name,  # the sidecar sits beside it
            **video.record,
            "sample": {**video.record["sample"], "fps": self.fps, "format": self.fmt.value},
        }
        atomic_write_bytes(sidecar, (json.dumps(record, indent=2) + "\n").encode())
        saved = SavedVideo(path=target, sidecar=sidecar, video=video)
        self.saved.append(saved)
        return saved


def output_targets(
    items: Sequence[tuple[str, int]], out: Path | str, fmt: VideoFormat | str
) -> list[Path]:
    """Where videos of ``(prompt, seed)`` would go (see :class:`VideoWriter`).

    Raises:
        UsageError: for a file ``out`` with several videos or of another format.
    """
    writer = VideoWriter(out, fmt, count=len(items))
    return [writer.target(prompt, seed) for prompt, seed in items]


def sidecar_path(target: Path) -> Path:
    """The JSON sidecar beside a video file or PNG folder: ``NAME.json``."""
    suffix = target.suffix if target.suffix.lower() in {".mp4", ".gif"} else ""
    return target.with_name(target.name.removesuffix(suffix) + SIDECAR_SUFFIX)


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


def save_videos(
    videos: Sequence[GeneratedVideo],
    out: Path | str,
    fmt: VideoFormat | str = VideoFormat.MP4,
    fps: float = 8,
) -> list[SavedVideo]:
    """Writes each video (mp4, gif or PNG folder) and its JSON sidecar (see :class:`VideoWriter`).

    Returns:
        The written paths, in the order of ``videos``.
    """
    writer = VideoWriter(out, fmt, fps, count=len(videos))
    return [writer.write(video) for video in videos]
