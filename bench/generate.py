"""Seconds per video and peak memory of ``generate``.

Two tables:

1. **Tiny model on the CPU** (always): the whole ``generate_videos`` call
   (text encoding, DDIM with guidance, VAE decode) on the tiny random model
   with a random motion LoRA (recipe ``paper``), with and without the
   appearance highway, and the base model. Each configuration runs in a fresh
   child process so that its peak memory is its own: *peak RSS* is the
   child's ``ru_maxrss`` (resident set size, everything: Python, torch, the
   model, activations); *above import* subtracts the child's RSS right after
   importing torch and motionsep, i.e. what loading and generating added.
2. **Full ZeroScope U-Net on CUDA** (only when a CUDA device is present): the
   U-Net denoising loop of ``motionsep.sample.denoise`` (DDIM, guidance in one
   batched call) with random weights (no download), random text embeddings of
   ZeroScope's shape (77 x 1024), 576x320, 24 frames, 30 steps, fp16, one
   video. Rows: base U-Net; with the paper motion LoRA (rank 32); with the LoRA
   and the appearance highway. Time from CUDA events, best of ``--repeats``;
   memory from ``torch.cuda.max_memory_allocated``. The highway must add less
   than 2 % to the time of the LoRA row.

``--family animatediff`` runs both tables on the AnimateDiff family: the tiny
AnimateDiff model on the CPU, and on CUDA the full AnimateDiff U-Net (Stable
Diffusion 1.5 + the v1-5-2 motion adapter, 1.31 B parameters, random weights,
text 77 x 768) at its native 512x512, 16 frames, 25 steps (the
``animatediff`` preset's), with AnimateDiff's linear-beta DDIM schedule.

Usage::

    python bench/generate.py [--family zeroscope|animatediff] [--size 32x32] [--frames 8]
        [--steps 10] [--threads 1]
    python bench/generate.py --skip-cpu [--repeats 2]   # only the CUDA table (GPU machine)
    python bench/generate.py --check-loop   # the CUDA table's code, tiny U-Net on the CPU
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

HIGHWAY_BUDGET = 0.02
CPU_CONFIGS = ("base", "lora", "lora+highway")


def _rss_mb() -> float:
    """Current resident set size in MiB (Linux /proc; 0 where unavailable)."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, IndexError, ValueError):
        return 0.0
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_rss_mb() -> float:
    # ru_maxrss is KiB on Linux, bytes on macOS.
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


# ---------------------------------------------------------------------------
# CPU: one configuration per child process


def _child(config: str, args: argparse.Namespace) -> None:
    import torch

    import motionsep.sample as sample
    from motionsep.config import Recipe
    from motionsep.hub import install_tiny
    from motionsep.model import lora, motion, tap
    from motionsep.model.components import load_components, load_unet, unet_config_hash
    from motionsep.store import Store

    after_import = _rss_mb()
    torch.set_num_threads(args.threads)
    width, height = (int(v) for v in args.size.split("x"))
    with tempfile.TemporaryDirectory() as tmp:
        tiny = "tiny" if args.family == "zeroscope" else f"tiny-{args.family}"
        model_dir = install_tiny(Store(Path(tmp) / "store"), name=tiny).path
        package = None
        if config != "base":
            unet = load_unet(model_dir)
            injection = tap.inject_motion_lora(unet, Recipe.PAPER, 4)
            with torch.no_grad():
                for param in lora.adapter_parameters(unet, tap.MOTION_ADAPTER):
                    param.normal_(std=0.2)
            metadata = motion.MotionMetadata(
                recipe=Recipe.PAPER,
                lora_targets=list(injection.adapted),
                lora_rank=4,
                lora_alpha=4.0,
                base_model=motion.BaseModelRecord(
                    str(model_dir), None, unet_config_hash(dict(unet.config)), args.family
                ),
            )
            folder = Path(tmp) / "motions" / "bench"
            package = motion.load_motion(
                motion.save_motion(folder, lora.adapter_state_dict(unet), metadata)
            )
            del unet
        overrides: dict[str, Any] = {
            "model": {"name": str(model_dir), "device": "cpu", "dtype": "fp32"},
            "sample": {
                "steps": args.steps,
                "guidance": 12.0,
                "width": width,
                "height": height,
                "frames": args.frames,
                "num_videos": args.videos,
                "highway": config == "lora+highway",
            },
        }
        settings = sample.generation_settings(package, overrides=overrides)
        components = load_components(model_dir)
        # One warm-up video (first calls allocate and pick kernels).
        warm = settings.model_copy(deep=True)
        warm.sample.num_videos = 1
        sample.generate_videos(["warm-up"], warm, package, components=components)
        start = time.perf_counter()
        sample.generate_videos(["a wolf on a snowy mountain"], settings, package,
                               components=components, batch_size=1)  # fmt: skip
        seconds = time.perf_counter() - start
    print(
        json.dumps(
            {
                "config": config,
                "seconds_per_video": seconds / args.videos,
                "peak_rss_mb": _peak_rss_mb(),
                "above_import_mb": _peak_rss_mb() - after_import,
            }
        )
    )


def cpu_table(args: argparse.Namespace) -> None:
    print(
        f"Tiny {args.family} model, CPU ({args.threads} thread(s)), {args.size}, "
        f"{args.frames} frames, "
        f"{args.steps} DDIM steps, guidance 12, {args.videos} videos, whole generate call "
        "(text encoder + U-Net loop + VAE decode)"
    )
    print(f"{'config':<14} {'s/video':>9} {'peak RSS MiB':>13} {'above import MiB':>17}")
    for config in CPU_CONFIGS:
        command = [sys.executable, __file__, "--child", config, *_passthrough(args)]
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            print(f"{config:<14} failed:\n{done.stderr}")
            continue
        row = json.loads(done.stdout.strip().splitlines()[-1])
        print(
            f"{config:<14} {row['seconds_per_video']:>9.3f} {row['peak_rss_mb']:>13.0f} "
            f"{row['above_import_mb']:>17.0f}"
        )


def _passthrough(args: argparse.Namespace) -> list[str]:
    return [
        "--size", args.size, "--frames", str(args.frames), "--steps", str(args.steps),
        "--videos", str(args.videos), "--threads", str(args.threads), "--family", args.family,
    ]  # fmt: skip


# ---------------------------------------------------------------------------
# CUDA: the full-size U-Net of a family


def cuda_table(args: argparse.Namespace) -> None:
    """The full U-Net of ``--family`` on CUDA, at that family's benchmark size, fp16.

    ZeroScope v2: 576x320, 24 frames, 30 steps; AnimateDiff (SD 1.5 + v1-5-2):
    512x512, 16 frames, 25 steps.
    """
    import torch

    if not torch.cuda.is_available():
        print(
            f"\n{args.family} on CUDA: skipped, no CUDA device here "
            "(torch.cuda.is_available() is False)"
        )
        return
    from motionsep.model.components import (
        ANIMATEDIFF_SCHEDULER_CONFIG,
        build_animatediff_unet,
        build_zeroscope_unet,
    )

    device = torch.device("cuda")
    torch.manual_seed(0)
    gpu = torch.cuda.get_device_name(device)
    if args.family == "animatediff":
        unet = build_animatediff_unet(device=device, dtype=torch.float16)
        title = (
            f"AnimateDiff U-Net (SD 1.5 + v1-5-2 motion adapter, random weights), {gpu}, "
            "fp16, 512x512, 16 frames, 25 DDIM steps"
        )
        unet_loop_table(unet, title, width=512, height=512, frames=16, steps=25,
                        text_dim=768, lora_rank=32, repeats=args.repeats,
                        scheduler_config=ANIMATEDIFF_SCHEDULER_CONFIG)  # fmt: skip
        return
    unet = build_zeroscope_unet(device=device, dtype=torch.float16)
    title = f"ZeroScope v2 U-Net (random weights), {gpu}, fp16, 576x320, 24 frames, 30 DDIM steps"
    unet_loop_table(unet, title, width=576, height=320, frames=24, steps=30,
                    text_dim=1024, lora_rank=32, repeats=args.repeats)  # fmt: skip


def unet_loop_table(
    unet: Any,
    title: str,
    *,
    width: int,
    height: int,
    frames: int,
    steps: int,
    text_dim: int,
    lora_rank: int,
    repeats: int,
    scheduler_config: dict[str, Any] | None = None,
) -> None:
    """Times ``motionsep.sample.denoise`` on one video: base, + motion LoRA, + highway.

    On CUDA the time comes from CUDA events and the memory from
    ``torch.cuda.max_memory_allocated``; elsewhere (``--check-loop``, a dry
    run of this code on the tiny U-Net) from ``time.perf_counter`` and no memory.
    """
    import torch
    from diffusers import DDIMScheduler

    from motionsep.config import Recipe
    from motionsep.model import tap
    from motionsep.model.components import SCHEDULER_CONFIG
    from motionsep.model.highway import recipe_highway
    from motionsep.sample import SamplingPlan, denoise

    unet.eval().requires_grad_(False)
    device, dtype = unet.device, unet.dtype
    on_cuda = device.type == "cuda"
    # denoise() needs only the U-Net and the scheduler of the components.
    scheduler = DDIMScheduler(**(scheduler_config or SCHEDULER_CONFIG))
    components: Any = SimpleNamespace(unet=unet, scheduler=scheduler)
    plan = SamplingPlan(
        steps=steps, guidance=12.0, width=width, height=height, frames=frames,
        negative_prompt="", recipe="paper", lora_scale=1.0, highway=False, highway_beta=None,
        pli=None, motion_steps=steps, noise_prior=0.0,
    )  # fmt: skip
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn((1, 4, frames, height // 8, width // 8), generator=generator)
    cond = torch.randn((1, 77, text_dim), generator=generator).to(device, dtype)
    uncond = torch.randn((1, 77, text_dim), generator=generator).to(device, dtype)

    def timed(highway: bool, motion: bool, run_steps: int = steps) -> tuple[float, float]:
        short = dataclasses.replace(plan, steps=run_steps, motion_steps=run_steps)
        with contextlib.ExitStack() as stack:
            handle = stack.enter_context(recipe_highway(unet, Recipe.PAPER)) if highway else None
            if on_cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                start = torch.cuda.Event(enable_timing=True)
                end = torch.cuda.Event(enable_timing=True)
                start.record()
                denoise(components, latents, cond, uncond, short, highway=handle, motion=motion)
                end.record()
                torch.cuda.synchronize()
                return start.elapsed_time(end) / 1000.0, torch.cuda.max_memory_allocated() / 2**30
            began = time.perf_counter()
            denoise(components, latents, cond, uncond, short, highway=handle, motion=motion)
            return time.perf_counter() - began, float("nan")

    print(
        f"\n{title}, guidance in one batched call (U-Net batch 2), 1 video, "
        f"U-Net loop only, best of {repeats}"
    )
    print(f"{'config':<14} {'s/video':>9} {'peak GiB':>9}")
    timed(highway=False, motion=False, run_steps=3)  # warm-up: kernels, allocator
    results = {"base": min(timed(highway=False, motion=False) for _ in range(repeats))}
    tap.inject_motion_lora(unet, Recipe.PAPER, rank=lora_rank)
    timed(highway=True, motion=True, run_steps=3)  # warm-up with the LoRA and the hooks
    lora_runs, highway_runs = [], []
    for _ in range(repeats):  # interleaved, so that drift hits both alike
        lora_runs.append(timed(highway=False, motion=True))
        highway_runs.append(timed(highway=True, motion=True))
    results["lora"] = min(lora_runs)
    results["lora+highway"] = min(highway_runs)
    for config, (seconds, memory) in results.items():
        print(f"{config:<14} {seconds:>9.2f} {memory:>9.2f}")
    overhead = results["lora+highway"][0] / results["lora"][0] - 1.0
    verdict = "ok" if overhead < HIGHWAY_BUDGET else "OVER BUDGET"
    print(f"highway overhead: {overhead * 100:+.2f} % of the LoRA row ({verdict}, budget 2 %)")


def check_loop(args: argparse.Namespace) -> None:
    """Runs the CUDA table's code on the tiny U-Net on the CPU, to check it without a GPU."""
    import torch

    from motionsep.model.components import (
        ANIMATEDIFF_SCHEDULER_CONFIG,
        TINY_UNET_CONFIG,
        build_tiny_components,
    )
    from motionsep.model.family import ANIMATEDIFF

    torch.set_num_threads(args.threads)
    animatediff = args.family == "animatediff"
    unet = build_tiny_components(family=ANIMATEDIFF if animatediff else None)["unet"]
    unet_loop_table(unet, f"check: tiny {args.family} U-Net on the CPU (not a benchmark)",
                    width=64, height=64, frames=4, steps=3,
                    text_dim=TINY_UNET_CONFIG["cross_attention_dim"], lora_rank=4, repeats=1,
                    scheduler_config=ANIMATEDIFF_SCHEDULER_CONFIG if animatediff else None,
                    )  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--family",
        choices=("zeroscope", "animatediff"),
        default="zeroscope",
        help="base-model family whose U-Nets are timed (default zeroscope)",
    )
    parser.add_argument("--size", default="32x32", help="WIDTHxHEIGHT of the CPU runs")
    parser.add_argument("--frames", type=int, default=8, help="frames of the CPU runs")
    parser.add_argument("--steps", type=int, default=10, help="DDIM steps of the CPU runs")
    parser.add_argument("--videos", type=int, default=1, help="videos timed per CPU config")
    parser.add_argument(
        "--threads", type=int, default=1, help="CPU threads (1: fair on a busy machine)"
    )
    parser.add_argument("--repeats", type=int, default=2, help="timed CUDA runs per config")
    parser.add_argument("--skip-cpu", action="store_true", help="only the CUDA table")
    parser.add_argument(
        "--check-loop", action="store_true", help="dry-run the CUDA table's code on the CPU"
    )
    parser.add_argument("--child", choices=CPU_CONFIGS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(args.child, args)
        return
    if args.check_loop:
        check_loop(args)
        return
    if not args.skip_cpu:
        cpu_table(args)
    cuda_table(args)


if __name__ == "__main__":
    main()
