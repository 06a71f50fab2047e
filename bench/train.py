"""Seconds per training step and peak memory, beside a naive re-encoding loop.

Drives the real training step of ``motionsep.train`` (dual path, debiased
loss, AdamW over LoRA tensors) on in-memory components:

* tiny model on the CPU (fp32): cached latents, with and without gradient
  checkpointing, and a naive variant that VAE-encodes the clip's frames at
  every step instead of reading cached latents;
* with a CUDA device: the full ZeroScope U-Net architecture with random
  weights at 384x384, 16 frames, LoRA rank 32, fp16 autocast, with and
  without gradient checkpointing, and the naive variant with a random
  Stable-Diffusion-sized VAE.

Each configuration runs in a fresh subprocess so peak memory is its own
(CPU: peak resident set size; CUDA: torch.cuda.max_memory_allocated)::

    python bench/train.py [--steps 10] [--skip-cpu] [--skip-cuda]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

CONFIGS = {
    "cpu": ["tiny", "tiny+ckpt", "tiny naive-vae"],
    "cuda": ["zeroscope", "zeroscope+ckpt", "zeroscope naive-vae"],
}

SD_VAE = {
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "layers_per_block": 2,
    "latent_channels": 4,
    "sample_size": 384,
}


def build_trainer(name: str, set_options: tuple[str, ...] = ()) -> tuple[Any, Any, Any]:
    """The real Trainer of configuration ``name`` on in-memory components.

    Returns:
        The trainer, its device and the VAE (None unless ``naive`` needs it).
    """
    import torch
    from accelerate import Accelerator
    from diffusers import AutoencoderKL, DDIMScheduler

    from motionsep.config import load_settings
    from motionsep.model import lora, tap
    from motionsep.model.components import (
        SCHEDULER_CONFIG,
        Components,
        build_tiny_components,
        build_zeroscope_unet,
    )
    from motionsep.train import Trainer, enable_gradient_checkpointing

    cuda = name.startswith("zeroscope")
    device = torch.device("cuda" if cuda else "cpu")
    if cuda:
        settings = load_settings(
            preset="dolly", set_options=["train.mixed_precision=fp16", *set_options]
        )
        unet = build_zeroscope_unet(device=device, dtype=torch.float16)
        vae = AutoencoderKL(**SD_VAE).to(device, torch.float16) if "naive" in name else None
        size, frames, text = 384, 16, (77, 1024)
        dtype = torch.float16
    else:
        settings = load_settings(
            preset="tiny", set_options=["data.width=64", "data.height=64", *set_options]
        )
        parts = build_tiny_components()
        unet, vae = parts["unet"], parts["vae"]
        size, frames, text = 64, settings.data.frames, (77, 32)
        dtype = torch.float32
    accelerator = Accelerator(cpu=not cuda, mixed_precision="fp16" if cuda else "no")
    components = Components(
        unet=unet,
        vae=vae,
        text_encoder=None,
        tokenizer=None,
        scheduler=DDIMScheduler(**SCHEDULER_CONFIG),
        path=Path(),
    )
    torch.manual_seed(0)
    tap.inject_motion_lora(unet, settings.lora.recipe, settings.lora.rank, dropout=0.1)
    tap.inject_spatial_lora(unet, settings.lora.spatial_rank, dropout=0.1)
    for adapter in (tap.MOTION_ADAPTER, tap.SPATIAL_ADAPTER):
        for param in lora.adapter_parameters(unet, adapter):
            param.data = param.data.float()
    if "ckpt" in name:
        enable_gradient_checkpointing(unet)
    unet.train()
    params = [
        p
        for a in (tap.MOTION_ADAPTER, tap.SPATIAL_ADAPTER)
        for p in lora.adapter_parameters(unet, a)
    ]
    optimizer = accelerator.prepare_optimizer(torch.optim.AdamW(params, lr=5e-4))
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


def run_one(name: str, steps: int) -> dict[str, Any]:
    import torch

    trainer, device, vae = build_trainer(name)
    cuda = device.type == "cuda"
    size, frames = (384, 16) if cuda else (64, trainer.settings.data.frames)
    dtype = torch.float16 if cuda else torch.float32
    pixels = torch.rand(frames, 3, size, size) * 2 - 1

    def one_step(step: int) -> None:
        if "naive" in name:
            with torch.no_grad():
                encoded = vae.encode(pixels.to(device, dtype)).latent_dist.sample()
            trainer.latents = [(encoded * 0.18215).permute(1, 0, 2, 3).to("cpu")]
        trainer.step(step)

    one_step(0)  # warm-up: allocator, kernels, optimizer state
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    for step in range(1, steps + 1):
        one_step(step)
    if cuda:
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    seconds = (time.perf_counter() - started) / steps
    return {"config": name, "seconds_per_step": seconds, "peak_mib": peak, "device": str(device)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--skip-cpu", action="store_true")
    parser.add_argument("--skip-cuda", action="store_true")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_one(args.one, args.steps)))
        return

    import torch

    groups = [] if args.skip_cpu else ["cpu"]
    if not args.skip_cuda:
        if torch.cuda.is_available():
            groups.append("cuda")
        else:
            print("ZeroScope on CUDA: skipped, no CUDA device here\n")
    for group in groups:
        memory = "peak RSS MiB" if group == "cpu" else "peak CUDA MiB"
        print(f"{group}: {args.steps} timed steps after one warm-up step")
        print(f"{'config':<22} {'s/step':>9} {memory:>14}")
        for name in CONFIGS[group]:
            out = subprocess.run(
                [sys.executable, __file__, "--one", name, "--steps", str(args.steps)],
                capture_output=True,
                text=True,
            )
            if out.returncode != 0:
                print(f"{name:<22} failed: {out.stderr.strip().splitlines()[-1:]}")
                continue
            row = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"{name:<22} {row['seconds_per_step']:>9.3f} {row['peak_mib']:>14.0f}")
        print()


if __name__ == "__main__":
    main()
