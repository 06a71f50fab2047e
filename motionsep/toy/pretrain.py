"""Pretrain the toy base model on the toy world (``motionsep toy pretrain``).

Two stages, both on clips generated on the fly from the seed:

1. the VAE learns to reconstruct single frames;
2. the 3D U-Net and the CLIP text encoder learn to denoise the frozen VAE's
   latents of whole clips, captions dropped 10% of the time so that
   classifier-free guidance works. An exponential moving average of their
   weights is what gets exported.

Every random draw of step ``n`` comes from generators seeded by ``(seed, n)``,
so a run resumed from a checkpoint sees the same data and noise as one that
never stopped. Checkpoints are safetensors plus JSON; the run folder records
the settings and the command line, and the exported model folder carries
them in ``toy.json``.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import json
import math
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from pydantic import ValidationError

from motionsep import runs
from motionsep.config import PretrainSettings
from motionsep.errors import MotionsepError, UsageError
from motionsep.model.components import tokenize
from motionsep.progress import Progress, or_null
from motionsep.runs import TrainingInterruptedError
from motionsep.store import atomic_folder, atomic_write_bytes
from motionsep.toy import world
from motionsep.userfiles import OutputKind, check_new_folder, new_folder

if TYPE_CHECKING:
    import torch

RECORD_FILE = "toy.json"
TENSORS_FILE = "state.safetensors"


class PretrainConfig(PretrainSettings):
    """Settings of a pretraining run (all recorded in the run and the model).

    The ``pretrain`` section of the settings (:class:`motionsep.config.PretrainSettings`:
    presets, config files, ``MOTIONSEP_PRETRAIN__*``, ``--set pretrain.KEY=V``
    and the command's flags, in the usual order); built directly, a bad value
    is a :class:`UsageError`.
    """

    def __init__(self, **values: Any) -> None:
        try:
            super().__init__(**values)
        except ValidationError as exc:
            raise UsageError(_validation_message(exc)) from None

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> PretrainConfig:
        """From recorded settings; keys this version does not know are left out."""
        return cls(**{k: v for k, v in values.items() if k in cls.model_fields})

    @classmethod
    def from_settings(cls, settings: PretrainSettings) -> PretrainConfig:
        return cls(**settings.model_dump())

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def clip_options(self) -> dict[str, float]:
        """The world's levers, as :func:`clip_batch` takes them."""
        return {
            "speed_jitter": self.speed_jitter,
            "attribute_dropout": self.attribute_dropout,
            "trail_opacity": self.trail_opacity,
            "motion_dropout": self.motion_dropout,
        }


def command_line(where: list[str], config: PretrainConfig, device: str, workers: int) -> list[str]:
    """The command that runs ``config`` again: ``where`` (``--name N`` or ``--out DIR``), then
    ``--set pretrain.KEY=VALUE`` for every setting off its default, whichever layer set it.
    """
    defaults = PretrainSettings().model_dump(mode="json")
    command = ["motionsep", "toy", "pretrain", *where]
    for key, value in config.to_dict().items():
        if value != defaults[key]:
            command += ["--set", f"pretrain.{key}={value}"]
    return [*command, "--device", device, "--workers", str(workers)]


def _validation_message(exc: ValidationError) -> str:
    """pydantic's first complaint, in plain words."""
    error = exc.errors()[0]
    if error["type"] == "value_error":
        return str(error["ctx"]["error"])
    where = ".".join(str(part) for part in error["loc"])
    return f"bad pretraining settings: {where}: {error['msg']}"


@dataclass
class PretrainResult:
    folder: Path
    steps: int
    seconds: float
    probe: dict[str, Any] | None

    def to_dict(self) -> dict[str, Any]:
        return {
            "folder": str(self.folder),
            "steps": self.steps,
            "seconds": round(self.seconds, 1),
            "probe": self.probe,
        }


# ---------------------------------------------------------------------------
# data


def clip_batch(
    seed: int,
    step: int,
    size: int,
    speed_jitter: float = 0.0,
    attribute_dropout: float = 0.0,
    trail_opacity: float = world.TRAIL_OPACITY,
    motion_dropout: float = 0.0,
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Frames (B, F, H, W, 3) uint8, object-and-trail masks (B, F, H, W) and captions.

    The masks weight the loss: the object and its motion trail are where the
    prompt's colour, shape and direction show. ``speed_jitter`` varies each
    clip's speed (:func:`motionsep.toy.world.random_spec`);
    ``attribute_dropout`` leaves the object phrase, the colour word and the
    background phrase each out of the caption with that probability
    (:func:`motionsep.toy.world.partial_prompt`); ``trail_opacity`` is the
    motion trail's; ``motion_dropout`` leaves the motion phrase out that
    often (its own random stream, so the other captions stay as they were).
    """
    clips = list(
        world.batch(seed, step, size, speed_jitter=speed_jitter, trail_opacity=trail_opacity)
    )
    frames = np.stack([c.frames for c in clips])
    masks = np.stack([np.maximum(c.masks, c.trails) for c in clips])
    if not attribute_dropout and not motion_dropout:
        return frames, masks, [c.spec.prompt for c in clips]
    keep = np.random.default_rng([seed, step, 8]).random((size, 3)) >= attribute_dropout
    keep_motion = np.random.default_rng([seed, step, 10]).random(size) >= motion_dropout
    captions = [
        world.partial_prompt(c.spec, bool(k[0]), bool(k[1]), bool(k[2]), bool(m))
        for c, k, m in zip(clips, keep, keep_motion, strict=True)
    ]
    return frames, masks, captions


def to_pixels(frames: np.ndarray) -> torch.Tensor:
    """uint8 (..., H, W, 3) -> float (..., 3, H, W) in [-1, 1]."""
    import torch

    tensor = torch.from_numpy(frames).float() / 127.5 - 1.0
    return tensor.movedim(-1, -3)


# ---------------------------------------------------------------------------
# the run


@dataclass
class PretrainRun:
    """A pretraining in memory: its settings, models, weight averages, optimizers and device."""

    config: PretrainConfig
    parts: dict[str, Any]
    ema: dict[str, torch.nn.Module]
    vae_opt: torch.optim.Optimizer
    opt: torch.optim.Optimizer
    device: torch.device
    prefetch: _Prefetcher | None = None

    def clips(self, step: int, size: int) -> tuple[np.ndarray, np.ndarray, list[str]]:
        """The clips of global step ``step`` (from the worker pool when there is one)."""
        if self.prefetch is not None:
            return self.prefetch.get(step, size)
        return self.render(step, size)

    def render(self, step: int, size: int) -> tuple[np.ndarray, np.ndarray, list[str]]:
        """Renders the clips of global step ``step`` here (the prefetcher's workers call it too)."""
        cfg = self.config
        return clip_batch(cfg.seed, step, size, **cfg.clip_options())

    def batch_size(self, step: int) -> int:
        return self.config.vae_batch // 2 if step < self.config.vae_steps else self.config.batch

    def generator(self, step: int, stream: int) -> torch.Generator:
        import torch

        return torch.Generator().manual_seed(
            int(np.random.default_rng([self.config.seed, step, stream]).integers(2**62))
        )

    def vae_step(self, step: int) -> dict[str, float]:
        """One VAE step: two random frames of each clip, reconstruction + a small KL."""
        import torch

        vae = self.parts["vae"]
        frames, _, _ = self.clips(step, self.config.vae_batch // 2)
        rng = np.random.default_rng([self.config.seed, step, 1])
        picks = rng.integers(0, frames.shape[1], size=(frames.shape[0], 2))
        images = np.concatenate([frames[i, picks[i]] for i in range(frames.shape[0])])
        x = to_pixels(images).to(self.device)
        for group in self.vae_opt.param_groups:
            group["lr"] = self.config.vae_lr * _warmup_cosine(step, self.config.vae_steps, 50)
        posterior = vae.encode(x).latent_dist
        z = posterior.mean + posterior.std * torch.randn(
            posterior.mean.shape, generator=self.generator(step, 2)
        ).to(self.device)
        recon = vae.decode(z).sample
        mse = torch.nn.functional.mse_loss(recon, x)
        kl = posterior.kl().mean() / z[0].numel()
        loss = mse + 1e-4 * kl
        self.vae_opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        self.vae_opt.step()
        psnr = 10 * math.log10(4.0 / max(mse.item(), 1e-10))
        return {"vae_loss": loss.item(), "psnr": psnr}

    def unet_step(self, step: int) -> dict[str, float]:
        """One denoising step on whole clips (step counts from the start of this stage)."""
        import torch

        cfg = self.config
        unet, text_encoder = self.parts["unet"], self.parts["text_encoder"]
        frames, masks, prompts = self.clips(cfg.vae_steps + step, cfg.batch)
        rng = np.random.default_rng([cfg.seed, cfg.vae_steps + step, 3])
        prompts = [p if rng.random() >= cfg.text_dropout else "" for p in prompts]
        latents = self.encode(frames)
        noise = torch.randn(latents.shape, generator=self.generator(cfg.vae_steps + step, 4))
        timesteps = self.timesteps(cfg.vae_steps + step, latents.shape[0])
        noise, timesteps = noise.to(self.device), timesteps.to(self.device)
        scheduler = self.parts["scheduler"]
        noisy = scheduler.add_noise(latents, noise, timesteps)
        ids = tokenize(self.parts["tokenizer"], prompts).to(self.device)
        for group in self.opt.param_groups:
            group["lr"] = cfg.lr * _warmup_cosine(step, cfg.steps, cfg.warmup)
        text = text_encoder(ids)[0]
        with self.conv_skipped(cfg.vae_steps + step):
            prediction = unet(noisy, timesteps, encoder_hidden_states=text).sample
        loss = self.weighted_loss(prediction, noise, masks, timesteps)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        params = [p for group in self.opt.param_groups for p in group["params"]]
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        self.opt.step()
        self.update_ema(step)
        return {"loss": loss.item()}

    def conv_skipped(self, step: int) -> contextlib.AbstractContextManager[Any]:
        """Bypasses every temporal convolution in a share ``conv_skip`` of the steps.

        Stochastic depth on the temporal convolutions: in those steps the
        U-Net has only its temporal attention to carry anything from frame
        to frame, so the attention must learn to. The exported model has all
        its layers; what the attention learned is measured by ``toy probe
        --attention`` with the convolutions in place. Those under
        ``conv_keep`` are never bypassed.
        """
        from motionsep.model.ablations import bypass_temporal_convs

        draw = np.random.default_rng([self.config.seed, step, 9]).random()
        if draw < self.config.conv_skip:
            return bypass_temporal_convs(self.parts["unet"], skippable_convs(self.config))
        return contextlib.nullcontext()

    def timesteps(self, step: int, size: int) -> torch.Tensor:
        """Training timesteps: uniform, but a share ``noisy_share`` drawn from ``noisy_from`` up.

        The noisy end is where a sampler decides where the object is in each
        frame, so it is the only place the direction word can be learned: at
        lower noise the position is legible in the noisy input itself. With
        uniform timesteps a fresh toy U-Net trained on left/right clips of one
        look learned no text-dependent motion in 400 steps; with every
        timestep at 600 or above it drew the asked direction 62% of the time
        (chance 50%) with slopes of the right sign after 400 steps. With
        half of each batch from 600 up, the shipped model's run (all looks,
        seven motions) drew the asked direction in 47% of held-in
        translations after 2000 steps, 88% after 3000 and all of them after
        4000.
        """
        import torch

        cfg = self.config
        uniform = torch.randint(0, 1000, (size,), generator=self.generator(step, 5))
        if cfg.noisy_share == 0:
            return uniform
        draw = self.generator(step, 7)
        noisy = torch.randint(cfg.noisy_from, 1000, (size,), generator=draw)
        pick = torch.rand(size, generator=draw) < cfg.noisy_share
        return torch.where(pick, noisy, uniform)

    def weighted_loss(
        self,
        prediction: torch.Tensor,
        noise: torch.Tensor,
        masks: np.ndarray,
        timesteps: torch.Tensor,
    ) -> torch.Tensor:
        """Noise MSE, weighted towards the object and by min-SNR.

        The object covers a tenth of the frame but carries everything the
        prompt asks for (colour, shape, motion), so latent cells it touches
        weigh ``1 + object_weight``. Each sample is also weighted by
        clamp(SNR, floor, gamma) / SNR: the ceiling is min-SNR (Hang et al.
        2023), which stops the many nearly-clean timesteps from dominating.
        The floor matters for motion. Measured as an error in the clean
        video, noise MSE weighs a sample by its SNR, so at the noisiest
        timesteps (SNR 0.005 to 0.1), where the sampler decides where the
        object goes in each frame, the model hears almost nothing about it.
        The floor gives those timesteps the clean-video weight
        ``x0_weight_floor`` (as v-prediction would, up to the scale). Its
        effect on direction alone is not measured yet: the runs that moved
        objects in random directions also had a collapsed text encoder.
        """
        import torch

        cfg = self.config
        coverage = torch.from_numpy(masks).float().to(self.device)  # (B, F, H, W)
        batch, count = coverage.shape[:2]
        factor = coverage.shape[-1] // prediction.shape[-1]
        cells = torch.nn.functional.max_pool2d(
            coverage.reshape(batch * count, 1, *coverage.shape[2:]), factor
        )
        cells = cells.reshape(batch, 1, count, *cells.shape[-2:])
        weight = 1.0 + cfg.object_weight * (cells > 0.05).float()
        per_sample = (weight * (prediction - noise) ** 2).sum(dim=(1, 2, 3, 4)) / (
            weight.sum(dim=(1, 2, 3, 4)) * prediction.shape[1]
        )
        alphas = self.parts["scheduler"].alphas_cumprod.to(self.device)[timesteps]
        snr = alphas / (1.0 - alphas)
        snr_weight = torch.clamp(snr, min=cfg.x0_weight_floor, max=cfg.min_snr_gamma) / snr
        return (per_sample * snr_weight).mean()

    def encode(self, frames: np.ndarray) -> torch.Tensor:
        """Scaled VAE latents (B, C, F, h, w) of clips (posterior means: no sampling)."""
        import torch

        vae = self.parts["vae"]
        batch, count = frames.shape[:2]
        with torch.no_grad():
            x = to_pixels(frames.reshape(batch * count, *frames.shape[2:])).to(self.device)
            z = vae.encode(x).latent_dist.mean * vae.config.scaling_factor
        return z.reshape(batch, count, *z.shape[1:]).permute(0, 2, 1, 3, 4).contiguous()

    def update_ema(self, step: int) -> None:
        import torch

        # a short warm-up of the average so early weights don't linger
        decay = min(self.config.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            trained = ("unet", "text_encoder") if self.config.train_text_encoder else ("unet",)
            for name in trained:
                ema: list[torch.Tensor] = list(self.ema[name].parameters())
                live: list[torch.Tensor] = list(self.parts[name].parameters())
                torch._foreach_lerp_(ema, live, 1.0 - decay)

    def set_scaling_factor(self) -> float:
        """Sets the VAE's latent scale so the U-Net sees latents of unit spread."""
        import torch

        vae = self.parts["vae"]
        vae.register_to_config(scaling_factor=1.0)
        frames, _, _ = clip_batch(self.config.seed + 1, 2**31, 64)
        z = self.encode(frames)
        factor = float(1.0 / torch.std(z).item())
        vae.register_to_config(scaling_factor=factor)
        return factor


class _Prefetcher:
    """Renders the clips of the next steps in worker processes (same clips as inline)."""

    def __init__(self, run: PretrainRun, workers: int, start: int) -> None:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        self.run = run
        # spawn, not fork: the parent may hold CUDA and thread state
        self.pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))
        self.window = 4 * workers
        self.pending: dict[int, Any] = {}
        self.next = start

    def get(self, step: int, size: int) -> tuple[np.ndarray, np.ndarray, list[str]]:
        total = self.run.config.total_steps
        self.next = max(self.next, step)
        while self.next < min(step + self.window, total):
            cfg = self.run.config
            ahead = self.run.batch_size(self.next)
            self.pending[self.next] = self.pool.submit(
                clip_batch, cfg.seed, self.next, ahead, **cfg.clip_options()
            )
            self.next += 1
        future = self.pending.pop(step, None)
        if future is None:
            return self.run.render(step, size)
        return future.result()

    def close(self) -> None:
        self.pool.shutdown(cancel_futures=True)


def _warmup_cosine(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def skippable_convs(config: PretrainConfig) -> list[str]:
    """The toy U-Net's temporal convolutions that ``conv_skip`` bypasses (all but ``conv_keep``).

    Raises:
        UsageError: a ``conv_keep`` path names no temporal convolution.
    """
    from motionsep.model.ablations import temporal_conv_names

    if config.family == "animatediff":
        return []  # no temporal convolutions (the settings refuse conv_skip and conv_keep)
    names = temporal_conv_names(_meta_unet(config.head_width))
    kept: set[str] = set()
    for path in (part.strip() for part in config.conv_keep.split(",")):
        under = {name for name in names if f"{name}.".startswith(f"{path}.")} if path else set()
        if path and not under:
            raise UsageError(
                f"conv_keep: no temporal convolution under {path!r} in the toy U-Net",
                f"name module paths such as mid_block or up_blocks.1 (its {len(names)} "
                f"temporal convolutions run from {names[0]} to {names[-1]})",
            )
        kept |= under
    return [name for name in names if name not in kept]


@functools.cache
def _meta_unet(head_width: int) -> Any:
    """The toy U-Net's layout without weights (for module names)."""
    import torch
    from diffusers import UNet3DConditionModel

    from motionsep.toy.model import unet_config

    with torch.device("meta"):
        return UNet3DConditionModel(**unet_config(head_width))


def build_run(config: PretrainConfig, device: torch.device) -> PretrainRun:
    """A fresh run of ``config`` on ``device``: models, averages and optimizers, nothing trained."""
    import torch
    from diffusers.models.attention_processor import AttnProcessor

    from motionsep.toy.model import build_components

    parts = build_components(config.seed, head_width=config.head_width, family=config.family)
    if config.vae_from:
        _load_vae(parts["vae"], config.vae_from)
    if config.init_from:
        _load_denoiser(parts, config.init_from)
    for name in ("unet", "vae", "text_encoder"):
        parts[name].to(device).train()
    ema = {
        name: copy.deepcopy(parts[name]).eval().requires_grad_(False)
        for name in ("unet", "text_encoder")
    }
    if device.type == "cpu":
        # Plain attention beats the fused CPU kernel on these sequences of 8
        # frames and 64 cells: 1.16 s instead of 1.37 s a U-Net step (batch 16).
        parts["unet"].set_attn_processor(AttnProcessor())
    if not config.train_text_encoder:
        # Trained jointly, the encoder let the direction words collapse onto
        # each other (left vs right moved its output 30x less than red vs
        # blue), so the U-Net could not learn direction; frozen random
        # features keep every word apart.
        parts["text_encoder"].eval().requires_grad_(False)
    # foreach: one call over all tensors instead of a loop per tensor (on the
    # CPU torch defaults to the loop); the same bytes (tests/test_toy.py)
    vae_opt = torch.optim.AdamW(
        parts["vae"].parameters(), lr=config.vae_lr, weight_decay=0.0, foreach=True
    )
    opt = torch.optim.AdamW(
        [
            *parts["unet"].parameters(),
            *(parts["text_encoder"].parameters() if config.train_text_encoder else ()),
        ],
        lr=config.lr,
        weight_decay=0.01,
        foreach=True,
    )
    return PretrainRun(config, parts, ema, vae_opt, opt, device)


def _model_folder(source: str, part: str, option: str) -> Path:
    """The toy model folder ``source`` names ('toy': the built-in one), checked to hold ``part``."""
    from motionsep.toy.model import BUILTIN_NAME, builtin_path

    folder = builtin_path() if source == BUILTIN_NAME else Path(source)
    if not (folder / part / "config.json").is_file():
        raise UsageError(
            f"no {'VAE' if part == 'vae' else 'U-Net'} in {folder}",
            f"give {option} a toy model folder (or 'toy', the built-in one)",
        )
    return folder


def _copy_weights(module: Any, state: dict[str, Any], folder: Path, option: str) -> None:
    try:
        module.load_state_dict({k: v.float() for k, v in state.items()})
    except RuntimeError as exc:
        raise UsageError(
            f"the weights in {folder} have other shapes than the toy model's",
            f"give {option} a model made by motionsep toy pretrain",
        ) from exc


def _load_vae(vae: Any, source: str) -> None:
    """Copies a trained VAE (weights and latent scale) from a model folder or ``toy``."""
    from diffusers import AutoencoderKL

    folder = _model_folder(source, "vae", "--vae-from")
    trained = AutoencoderKL.from_pretrained(folder / "vae")
    _copy_weights(vae, trained.state_dict(), folder, "--vae-from")
    vae.register_to_config(scaling_factor=trained.config.scaling_factor)


def _load_denoiser(parts: dict[str, Any], source: str) -> None:
    """Copies a trained U-Net and its text encoder from a model folder or ``toy``.

    Both come together: the U-Net learned the encoder's features. Another
    head width only regroups the attention's channels into other heads (the
    weights fit; what they compute changes and fine-tuning must repair it),
    except in ``transformer_in``, which diffusers gives ``attention_head_dim``
    heads of 8 channels: then that one block starts fresh with its output
    projection at zero, so it starts as the identity.

    A motion U-Net (the ``animatediff`` family) started from a 3D toy U-Net
    takes its spatial layers, every tensor of the 2D blocks under the same
    name; its motion modules keep their fresh weights.
    """
    from transformers import CLIPTextModel

    from motionsep.model.family import folder_family, load_unet

    folder = _model_folder(source, "unet", "--init-from")
    unet = parts["unet"]
    trained = load_unet(folder).state_dict()
    own = unet.state_dict()
    source_family = folder_family(folder)
    if source_family.owns(unet):
        _copy_weights(unet, _same_family_weights(unet, trained, own), folder, "--init-from")
    else:
        missing = sorted(k for k in own if ".motion_modules." not in k and k not in trained)
        if missing or source_family.name != "zeroscope":
            raise UsageError(
                f"the U-Net in {folder} ({source_family.name}) has no spatial layers for this "
                f"{type(unet).__name__}" + (f" (missing {missing[0]}, ...)" if missing else ""),
                "give --init-from a toy model of the same family, or a 3D toy model "
                "(e.g. 'toy') to start an animatediff one",
            )
        spatial = {k: v for k, v in own.items() if ".motion_modules." not in k}
        _copy_weights(unet, {**own, **{k: trained[k] for k in spatial}}, folder, "--init-from")
    encoder = CLIPTextModel.from_pretrained(folder / "text_encoder").state_dict()
    _copy_weights(parts["text_encoder"], encoder, folder, "--init-from")


def _same_family_weights(unet: Any, trained: dict[str, Any], own: dict[str, Any]) -> dict[str, Any]:
    """``trained`` for a U-Net of its own family; a 3D ``transformer_in`` of another width
    is replaced by the fresh one, its output projection zeroed (the identity)."""
    import torch

    fresh = {key for key, value in trained.items() if own.get(key, value).shape != value.shape}
    if fresh and all(key.startswith("transformer_in.") for key in fresh):
        with torch.no_grad():
            unet.transformer_in.proj_out.weight.zero_()
            unet.transformer_in.proj_out.bias.zero_()
        trained |= {k: v for k, v in unet.state_dict().items() if k.startswith("transformer_in.")}
    return trained


# ---------------------------------------------------------------------------
# checkpoints


def _save_checkpoint(
    run: PretrainRun, run_dir: Path, step: int, history: list[dict[str, Any]]
) -> None:
    tensors: dict[str, torch.Tensor] = {}
    for name in ("unet", "vae", "text_encoder"):
        for key, value in run.parts[name].state_dict().items():
            tensors[f"{name}.{key}"] = value.detach().cpu().contiguous()
    for name, module in run.ema.items():
        for key, value in module.state_dict().items():
            tensors[f"ema.{name}.{key}"] = value.detach().cpu().contiguous()
    meta: dict[str, Any] = {}
    for label, optimizer in (("vae_opt", run.vae_opt), ("opt", run.opt)):
        flat, info = runs.flatten_optimizer(optimizer.state_dict())
        tensors.update({f"{label}.{k}": v for k, v in flat.items()})
        meta[label] = info
    state = {
        "config": run.config.to_dict(),
        "scaling_factor": run.parts["vae"].config.scaling_factor,
        "optimizers": meta,
        "history": history,
    }
    runs.save_checkpoint(run_dir, step, {TENSORS_FILE: tensors}, state)


def _load_checkpoint(run: PretrainRun, path: Path) -> tuple[int, list[dict[str, Any]]]:
    from safetensors.torch import load_file

    state = runs.read_state(path)
    tensors = load_file(str(path / TENSORS_FILE))
    run.parts["vae"].register_to_config(scaling_factor=state["scaling_factor"])

    def part(prefix: str) -> dict[str, torch.Tensor]:
        return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}

    for name in ("unet", "vae", "text_encoder"):
        run.parts[name].load_state_dict(part(f"{name}."))
    for name, module in run.ema.items():
        module.load_state_dict(part(f"ema.{name}."))
    for label, optimizer in (("vae_opt", run.vae_opt), ("opt", run.opt)):
        info = state["optimizers"][label]
        flat = part(f"{label}.")
        optimizer.load_state_dict(runs.unflatten_optimizer(flat, info))
    return int(state["step"]), list(state["history"])


# ---------------------------------------------------------------------------
# export


def export_checkpoint(
    run_dir: Path, out: Path, force: bool = False, step: int | None = None
) -> Path:
    """Writes the newest intact checkpoint (or that of ``step``) of a run as a model folder.

    The averaged U-Net and text encoder and the VAE are saved as the end of
    a run would save them, and ``toy.json`` records the run's command and
    settings plus the step, so an intermediate model can be tried (or
    shipped) while the run goes on.

    Raises:
        UsageError: no checkpoint in ``run_dir``; ``out`` exists without
            ``force``, or is not a model folder written here (its marker,
            :mod:`motionsep.userfiles`), or lies inside the store.
    """
    import torch

    check_new_folder(out, OutputKind.MODEL, force=force, store_home=_store_home())

    if step is None:
        found = runs.intact_checkpoint(run_dir, (TENSORS_FILE,))
    else:
        chosen = dict(runs.list_checkpoints(run_dir)).get(step)
        found = None if chosen is None else (step, chosen)
    if found is None:
        kept = ", ".join(str(n) for n, _ in runs.list_checkpoints(run_dir)) or "none"
        what = "intact checkpoint" if step is None else f"checkpoint of step {step}"
        raise UsageError(f"no {what} in {run_dir} (kept: {kept})")
    step, path = found
    config = PretrainConfig.from_dict(runs.read_state(path)["config"])
    run = build_run(config, torch.device("cpu"))
    _load_checkpoint(run, path)
    record_file = run_dir / "run.json"
    record: dict[str, Any] = json.loads(record_file.read_text()) if record_file.is_file() else {}
    record.update(
        {"config": config.to_dict(), "exported_from": {"checkpoint": str(path), "step": step}}
    )
    _write_model(out, export_parts(run), record, force, None)
    return out


def _store_home() -> Path:
    from motionsep.config import load_settings

    return load_settings().store.home


def _write_model(
    out: Path,
    parts: dict[str, Any],
    record: dict[str, Any],
    force: bool,
    finalize: Callable[[Path], None] | None,
) -> None:
    from motionsep.model.components import save_components

    # A store entry (finalize writes its record) is the store's to replace; a
    # folder the user named is replaced only if it is a model folder written here.
    writing = (
        new_folder(out, OutputKind.MODEL, force=force, store_home=_store_home())
        if finalize is None
        else atomic_folder(out, overwrite=force)
    )
    with writing as tmp:
        # U-Net and VAE weights are stored in fp16 (half the size; diffusers
        # loads them back into fp32 models); the tiny text encoder stays fp32
        # because transformers would load it as fp16.
        stored = dict(parts)
        stored["unet"] = copy.deepcopy(parts["unet"]).half()
        stored["vae"] = copy.deepcopy(parts["vae"]).half()
        save_components(stored, tmp)
        record["weights"] = "U-Net and VAE stored in fp16, text encoder in fp32"
        (tmp / RECORD_FILE).write_text(json.dumps(record, indent=2) + "\n")
        if finalize is not None:
            finalize(tmp)


def export_parts(run: PretrainRun) -> dict[str, Any]:
    """The model to ship: trained VAE, averaged U-Net and text encoder, on the CPU."""
    parts = dict(run.parts)
    parts["unet"] = copy.deepcopy(run.ema["unet"]).cpu().eval()
    parts["text_encoder"] = copy.deepcopy(run.ema["text_encoder"]).cpu().eval()
    parts["vae"] = copy.deepcopy(run.parts["vae"]).cpu().eval()
    return parts


def components_of(parts: dict[str, Any], device: Any = None) -> Any:
    """Wraps exported parts as :class:`Components` (for probing in memory)."""
    from motionsep.model.components import Components

    unet, vae, text = parts["unet"], parts["vae"], parts["text_encoder"]
    if device is not None:
        unet, vae, text = (copy.deepcopy(m).to(device) for m in (unet, vae, text))
    return Components(
        unet=unet,
        vae=vae,
        text_encoder=text,
        tokenizer=parts["tokenizer"],
        scheduler=parts["scheduler"],
        path=Path(),
    )


def _probe_record(summary: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in summary.items() if k not in ("frames", "specs")}


# ---------------------------------------------------------------------------
# entry point


def pretrain(
    out: Path,
    run_dir: Path,
    config: PretrainConfig,
    *,
    resume: bool = False,
    force: bool = False,
    device: str = "cpu",
    workers: int = 0,
    command: list[str] | None = None,
    finalize: Callable[[Path], None] | None = None,
    remove_run: bool = False,
    progress: Progress | None = None,
) -> PretrainResult:
    """Pretrains the toy model and writes it to ``out`` as a diffusers folder.

    Args:
        out: Model folder to create (atomically, when training ends).
        run_dir: Where checkpoints and the metrics log live while training.
        config: The run's settings. With ``resume`` they must match the run's.
        resume: Continue from the newest checkpoint in ``run_dir``.
        force: Replace an existing ``out`` (only at the end; a folder the
            user named only if it is a model folder written here) and start
            over a run folder that holds an old run.
        device: torch device to train on.
        workers: Processes that render clips ahead of the training step (0:
            render inline). The clips are the same either way.
        command: The command line to record (defaults to ``sys.argv``).
        finalize: Called with the complete model folder just before it is
            renamed into place (the store writes its record there).
        remove_run: Delete ``run_dir`` once the model is in place.
        progress: Receives "pretrain vae" and "pretrain unet" tasks.

    Raises:
        UsageError: ``out`` exists without ``force``; ``resume`` without a
            checkpoint, or with other settings than the run's.
    """
    import torch

    events = or_null(progress)
    skippable_convs(config)  # a bad conv_keep fails before any folder is made
    if finalize is None:  # a folder the user named: refused now, not after the run
        check_new_folder(out, OutputKind.MODEL, force=force, store_home=_store_home())
    elif out.exists() and not force:
        raise UsageError(
            f"{out} already exists", "pass --force to replace it, or choose another --out"
        )
    existing = runs.list_checkpoints(run_dir)
    if resume and not existing:
        raise UsageError(
            f"no checkpoint to resume in {run_dir}",
            "start a new run without --resume",
        )
    if existing and not resume and not force:
        raise UsageError(
            f"{run_dir} holds an unfinished run (newest checkpoint: step {existing[-1][0]})",
            "continue it with --resume, or start over with --force",
        )
    if not resume and run_dir.exists():
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(config.seed)
    dev = torch.device(device)
    run = build_run(config, dev)
    step, history = 0, list[dict[str, Any]]()
    if resume:
        intact = runs.intact_checkpoint(run_dir, (TENSORS_FILE,), events.log)
        if intact is None:
            raise UsageError(f"every checkpoint in {run_dir} is damaged", "start over with --force")
        _, path = intact
        # settings added since the run began count as their defaults
        saved = PretrainConfig.from_dict(runs.read_state(path)["config"]).to_dict()
        current = config.to_dict()
        if saved != current:
            changed = sorted(k for k in saved if saved[k] != current.get(k))
            raise UsageError(
                f"the run in {run_dir} used other settings ({', '.join(changed)})",
                "resume with the same settings, or start over with --force",
            )
        step, history = _load_checkpoint(run, path)
    if step >= config.vae_steps:
        run.parts["vae"].eval().requires_grad_(False)
    record: dict[str, Any] = {
        "command": command if command is not None else sys.argv,
        "config": config.to_dict(),
        "device": device,
        "torch": torch.__version__,
    }
    atomic_write_bytes(run_dir / "run.json", (json.dumps(record, indent=2) + "\n").encode())
    started = time.monotonic()
    if workers > 0:
        run.prefetch = _Prefetcher(run, workers, step)
    with _progress_tasks(events, config, step), _closing(run.prefetch):
        step = _loop(run, run_dir, step, history, events, dev)
    parts = export_parts(run)
    final_probe = _probe(run, config, dev) if config.steps else None
    record["seconds"] = round(time.monotonic() - started, 1)
    record["probe"] = final_probe
    _write_model(out, parts, record, force, finalize)
    if remove_run:
        shutil.rmtree(run_dir, ignore_errors=True)
    return PretrainResult(out, step, time.monotonic() - started, final_probe)


def _loop(
    run: PretrainRun,
    run_dir: Path,
    step: int,
    history: list[dict[str, Any]],
    events: Progress,
    dev: torch.device,
) -> int:
    """Global steps ``step`` .. the end: metrics, probes, checkpoints, Ctrl-C, divergence.

    Returns:
        The step reached (the run's total).

    Raises:
        MotionsepError: a non-finite loss.
        TrainingInterruptedError: after Ctrl-C, once a checkpoint is written.
    """
    config = run.config
    log_path = run_dir / "metrics.jsonl"
    interrupted = runs.InterruptFlag()
    with interrupted.installed():
        while step < config.total_steps:
            values = _one_step(run, step, events)
            step += 1
            values["step"] = step
            history.append(values)
            with log_path.open("a") as handle:
                handle.write(json.dumps(values) + "\n")
            if not all(math.isfinite(v) for v in values.values()):
                raise MotionsepError(
                    f"the loss became NaN or infinite at step {step}",
                    "lower the learning rate (--lr / --vae-lr) and start over with --force",
                )
            unet_step = step - config.vae_steps
            if unet_step > 0 and config.probe_every and unet_step % config.probe_every == 0:
                summary = _probe(run, config, dev)
                events.log(f"step {step}: " + json.dumps(summary))
                with (run_dir / "probes.jsonl").open("a") as handle:
                    handle.write(json.dumps({"step": step, **summary}) + "\n")
            if (
                step % config.checkpoint_every == 0
                or step == config.total_steps
                or interrupted.requested
            ):
                _save_checkpoint(run, run_dir, step, history[-5:])
            if interrupted.requested:
                raise TrainingInterruptedError(
                    f"pretraining stopped at step {step}; checkpoint written to {run_dir}",
                    "continue with the same command plus --resume",
                )
    return step


def _one_step(run: PretrainRun, step: int, events: Progress) -> dict[str, float]:
    """Runs global step ``step`` (VAE stage, then U-Net stage) and returns its losses.

    The global torch generator is reseeded from (seed, step) first: the
    U-Net's temporal convolutions use dropout, and a resumed run must draw
    the same dropout masks as one that never stopped.
    """
    import torch

    config = run.config
    torch.manual_seed(int(np.random.default_rng([config.seed, step, 6]).integers(2**62)))
    if step < config.vae_steps:
        values = run.vae_step(step)
        events.advance("pretrain vae", **{k: round(v, 4) for k, v in values.items()})
        if step + 1 == config.vae_steps:
            run.parts["vae"].eval().requires_grad_(False)
            factor = run.set_scaling_factor()
            events.log(f"VAE trained ({values['psnr']:.1f} dB PSNR); latent scale {factor:.4f}")
        return values
    values = run.unet_step(step - config.vae_steps)
    events.advance("pretrain unet", **{k: round(v, 4) for k, v in values.items()})
    return values


def _probe(run: PretrainRun, config: PretrainConfig, device: torch.device) -> dict[str, Any]:
    from motionsep.toy.probe import probe

    parts = export_parts(run)
    components = components_of(parts, device)
    return _probe_record(probe(components, count=config.probe_count, steps=config.probe_steps))


@contextlib.contextmanager
def _closing(prefetch: _Prefetcher | None) -> Iterator[None]:
    try:
        yield
    finally:
        if prefetch is not None:
            prefetch.close()


@contextlib.contextmanager
def _progress_tasks(events: Progress, config: PretrainConfig, step: int) -> Iterator[None]:
    events.start("pretrain vae", total=config.vae_steps, unit="step")
    events.advance("pretrain vae", min(step, config.vae_steps))
    events.start("pretrain unet", total=config.steps, unit="step")
    events.advance("pretrain unet", max(0, step - config.vae_steps))
    try:
        yield
    finally:
        events.finish("pretrain vae")
        events.finish("pretrain unet")
