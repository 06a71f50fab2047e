"""What the training benches share: the real Trainer on in-memory models, and the record.

Both base-model families are built: configuration names starting with
``tiny`` run the family's tiny model on the CPU, the others the full-size
U-Net on CUDA; a name containing ``animatediff`` is the AnimateDiff family.

``bench/train.py`` and ``bench/profile_train.py`` import it (a script's own
folder is first on ``sys.path``).
"""

from __future__ import annotations

import platform
import subprocess
import time
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"


def environment() -> dict[str, Any]:
    """Device, driver, library versions and the commit, for the record."""
    import diffusers
    import peft
    import torch

    root = Path(__file__).resolve().parents[1]
    commit = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True
    ).stdout.strip()
    dirty = bool(
        subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root,
            capture_output=True,
            text=True,
        ).stdout.strip()
    )
    info: dict[str, Any] = {
        "commit": commit + ("+dirty" if dirty else ""),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "peft": peft.__version__,
        "python": platform.python_version(),
        "cpu": platform.processor() or platform.machine(),
        "cpu_threads": torch.get_num_threads(),
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
        info["cuda"] = torch.version.cuda
        smi = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
        )
        info["driver"] = smi.stdout.strip() if smi.returncode == 0 else None
    else:
        info.update(gpu=None, cuda=None, driver=None)  # measured on the CPU alone
    return info


SD_VAE = {
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "layers_per_block": 2,
    "latent_channels": 4,
    "sample_size": 384,
}


FAMILIES = ("zeroscope", "animatediff")
"""Base-model families the benches build (``--family``)."""


def family_of_config(name: str) -> str:
    """The family a bench configuration name runs on (``tiny-animatediff+ckpt``: animatediff)."""
    return "animatediff" if "animatediff" in name else "zeroscope"


def on_cuda(name: str) -> bool:
    """Whether a configuration runs the full-size U-Net on CUDA (the tiny ones run on the CPU)."""
    return not name.startswith("tiny")


def build_trainer(name: str, set_options: tuple[str, ...] = ()) -> tuple[Any, Any, Any]:
    """The real Trainer of configuration ``name`` on in-memory components.

    ``tiny...`` configurations run the tiny model of their family on the CPU;
    the others the full-size U-Net with random weights on CUDA: ZeroScope v2
    at 384x384, 16 frames (the ``dolly`` preset), or AnimateDiff (SD 1.5 + the
    v1-5-2 motion adapter) at its native 512x512, 16 frames (the
    ``animatediff`` preset); both fp16 autocast, LoRA rank 32.

    Returns:
        The trainer, its device and the VAE (None unless ``naive`` needs it).
    """
    import torch
    from accelerate import Accelerator
    from diffusers import AutoencoderKL, DDIMScheduler

    from motionsep.config import load_settings
    from motionsep.model import lora, tap
    from motionsep.model.components import (
        ANIMATEDIFF_SCHEDULER_CONFIG,
        SCHEDULER_CONFIG,
        Components,
        build_animatediff_unet,
        build_tiny_components,
        build_zeroscope_unet,
    )
    from motionsep.model.family import ANIMATEDIFF
    from motionsep.train import Trainer, enable_gradient_checkpointing, use_channels_last

    cuda = on_cuda(name)
    animatediff = family_of_config(name) == "animatediff"
    device = torch.device("cuda" if cuda else "cpu")
    if cuda:
        settings = load_settings(
            preset="animatediff" if animatediff else "dolly",
            set_options=["train.mixed_precision=fp16", *set_options],
        )
        build = build_animatediff_unet if animatediff else build_zeroscope_unet
        unet = build(device=device, dtype=torch.float16)
        size, frames = settings.data.width, settings.data.frames
        text = (77, int(unet.config.cross_attention_dim))
        vae_config = {**SD_VAE, "sample_size": size}
        vae = AutoencoderKL(**vae_config).to(device, torch.float16) if "naive" in name else None
        dtype = torch.float16
    else:
        settings = load_settings(
            preset="tiny", set_options=["data.width=64", "data.height=64", *set_options]
        )
        parts = build_tiny_components(family=ANIMATEDIFF if animatediff else None)
        unet, vae = parts["unet"], parts["vae"]
        size, frames, text = 64, settings.data.frames, (77, 32)
        dtype = torch.float32
    scheduler_config = ANIMATEDIFF_SCHEDULER_CONFIG if animatediff else SCHEDULER_CONFIG
    accelerator = Accelerator(cpu=not cuda, mixed_precision="fp16" if cuda else "no")
    components = Components(
        unet=unet,
        vae=vae,
        text_encoder=None,
        tokenizer=None,
        scheduler=DDIMScheduler(**scheduler_config),
        path=Path(),
    )
    torch.manual_seed(0)
    tap.inject_motion_lora(unet, settings.lora.recipe, settings.lora.rank, dropout=0.1)
    tap.inject_spatial_lora(unet, settings.lora.spatial_rank, dropout=0.1)
    for adapter in (tap.MOTION_ADAPTER, tap.SPATIAL_ADAPTER):
        for param in lora.adapter_parameters(unet, adapter):
            param.data = param.data.float()
    if settings.train.gradient_checkpointing:
        enable_gradient_checkpointing(unet)
    unet.train()
    params = [
        p
        for a in (tap.MOTION_ADAPTER, tap.SPATIAL_ADAPTER)
        for p in lora.adapter_parameters(unet, a)
    ]
    if settings.train.channels_last:
        use_channels_last(unet)
    if cuda:
        torch.backends.cudnn.benchmark = settings.train.cudnn_benchmark
    optimizer = accelerator.prepare_optimizer(
        torch.optim.AdamW(params, lr=5e-4, fused=settings.optim.fused or None)
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer.optimizer, lambda _: 1.0)
    latent = size // (8 if cuda else 2)
    trainer = Trainer(
        settings=settings,
        components=components,
        dataset=None,  # type: ignore[arg-type]
        spatial_adapters=[tap.SPATIAL_ADAPTER],
        optimizer=optimizer,
        scheduler=scheduler,
        accelerator=accelerator,
        latents=[torch.randn(4, frames, latent, latent, dtype=dtype)],
        prompts=[torch.randn(*text, dtype=dtype)],
    )
    return trainer, device, vae


def print_table(header: str, lines: list[str]) -> None:
    """A fixed-width table: the header, a rule as wide, then one line per row."""
    print(header)
    print("-" * len(header))
    for line in lines:
        print(line)
