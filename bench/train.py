"""Seconds per training step and peak memory, per speed lever, beside a naive loop.

Drives the real training step of ``motionsep.train`` (dual path, debiased
loss, AdamW over LoRA tensors) on in-memory components
(``bench_common.build_trainer``):

* tiny model on the CPU (fp32, 64x64): cached latents, with and without
  gradient checkpointing, fused AdamW + channels-last, and a naive variant
  that VAE-encodes the clip's frames at every step;
* with a CUDA device: the full ZeroScope U-Net architecture with random
  weights at 384x384, 16 frames, LoRA rank 32, fp16 autocast (the ``dolly``
  preset), one row per lever (gradient checkpointing, fused AdamW,
  channels-last, cuDNN benchmark, all of them), and the naive variant with a
  random Stable-Diffusion-sized VAE.

``--family animatediff`` runs the same rows on the AnimateDiff family: the
tiny AnimateDiff model on the CPU, and on CUDA the full AnimateDiff U-Net
(Stable Diffusion 1.5 + the v1-5-2 motion adapter, 1.31 B parameters, random
weights) at its native 512x512, 16 frames (the ``animatediff`` preset).

The spatial path runs on a fixed schedule (every step, ``train.spatial_skip_prob=0``)
so each row pays for both paths. Each configuration runs in a fresh
subprocess (peak memory is its own): one warm-up step, then ``--repeats``
timings of ``--steps`` steps, each step's loss checked finite; the median
is reported. Memory: CPU peak resident set; CUDA peak allocated and reserved.
Writes ``bench/results/train-DEVICE.json`` (``train-DEVICE-animatediff.json``
for that family) with the device, driver, versions and the commit::

    python bench/train.py [--family zeroscope|animatediff] [--steps 10] [--repeats 3]
        [--skip-cpu] [--skip-cuda]
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import statistics
import subprocess
import sys
import time
from typing import Any

from bench_common import FAMILIES, RESULTS, build_trainer, environment, on_cuda

BOTH_PATHS = ("train.spatial_skip_prob=0",)
CPU_LEVERS: dict[str, tuple[str, ...]] = {
    "": (),
    "+ckpt": ("train.gradient_checkpointing=true",),
    "+fused+channels-last": ("optim.fused=true", "train.channels_last=true"),
    " naive-vae": (),
}
CUDA_LEVERS: dict[str, tuple[str, ...]] = {
    "": (),
    "+ckpt": ("train.gradient_checkpointing=true",),
    "+fused": ("optim.fused=true",),
    "+channels-last": ("train.channels_last=true",),
    "+cudnn-benchmark": ("train.cudnn_benchmark=true",),
    "+all-levers": ("optim.fused=true", "train.channels_last=true", "train.cudnn_benchmark=true"),
    " naive-vae": (),
}


def levers(family: str) -> dict[str, dict[str, tuple[str, ...]]]:
    """Configuration name -> its settings, per device group, for one family.

    ZeroScope's names are ``tiny...`` and ``zeroscope...`` (as before families);
    AnimateDiff's ``tiny-animatediff...`` and ``animatediff...``.
    """
    tiny = "tiny" if family == "zeroscope" else f"tiny-{family}"
    return {
        "cpu": {tiny + suffix: options for suffix, options in CPU_LEVERS.items()},
        "cuda": {family + suffix: options for suffix, options in CUDA_LEVERS.items()},
    }


LEVERS = {
    group: {k: v for f in FAMILIES for k, v in levers(f)[group].items()}
    for group in ("cpu", "cuda")
}


def run_one(name: str, steps: int, repeats: int) -> dict[str, Any]:
    import torch

    group = "cuda" if on_cuda(name) else "cpu"
    trainer, device, vae = build_trainer(name, (*BOTH_PATHS, *LEVERS[group][name]))
    cuda = device.type == "cuda"
    data = trainer.settings.data
    size, frames = (data.width, data.frames) if cuda else (64, data.frames)
    dtype = torch.float16 if cuda else torch.float32
    pixels = torch.rand(frames, 3, size, size) * 2 - 1

    def one_step(step: int) -> float:
        if "naive" in name:
            with torch.no_grad():
                encoded = vae.encode(pixels.to(device, dtype)).latent_dist.sample()
            trainer.latents = [(encoded * 0.18215).permute(1, 0, 2, 3).to("cpu")]
        return trainer.step(step)["loss"]

    one_step(0)  # warm-up: allocator, kernels, optimizer state
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    timings, losses, step = [], [], 1
    for _ in range(repeats):
        started = time.perf_counter()
        for _ in range(steps):
            losses.append(one_step(step))
            step += 1
        if cuda:
            torch.cuda.synchronize()
        timings.append((time.perf_counter() - started) / steps)
    if not all(math.isfinite(loss) for loss in losses):
        raise SystemExit(f"{name}: a timed step's loss was not finite")
    row: dict[str, Any] = {
        "config": name,
        "settings": list(LEVERS[group][name]),
        "seconds_per_step": statistics.median(timings),
        "seconds_per_step_repeats": timings,
        "device": str(device),
    }
    if cuda:
        row["peak_allocated_gib"] = torch.cuda.max_memory_allocated() / 2**30
        row["peak_reserved_gib"] = torch.cuda.max_memory_reserved() / 2**30
    else:
        row["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--family",
        choices=FAMILIES,
        default="zeroscope",
        help="base-model family whose U-Net is timed (default zeroscope)",
    )
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-cpu", action="store_true")
    parser.add_argument("--skip-cuda", action="store_true")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_one(args.one, args.steps, args.repeats)))
        return

    import torch

    groups = [] if args.skip_cpu else ["cpu"]
    if not args.skip_cuda:
        if torch.cuda.is_available():
            groups.append("cuda")
        else:
            print(f"{args.family} on CUDA: skipped, no CUDA device here\n")
    for group in groups:
        memory = "peak RSS GiB" if group == "cpu" else "alloc / reserved GiB"
        print(f"{group}: median of {args.repeats} x {args.steps} steps after one warm-up step")
        print(f"{'config':<28} {'s/step':>9} {memory:>22}")
        rows = []
        for name in levers(args.family)[group]:
            command = [sys.executable, __file__, "--one", name]
            command += ["--steps", str(args.steps), "--repeats", str(args.repeats)]
            out = subprocess.run(command, capture_output=True, text=True)
            if out.returncode != 0:
                print(f"{name:<28} failed: {out.stderr.strip().splitlines()[-1:]}")
                rows.append({"config": name, "failed": out.stderr.strip()[-2000:]})
                continue
            row = json.loads(out.stdout.strip().splitlines()[-1])
            rows.append(row)
            memory_text = (
                f"{row['peak_rss_gib']:.2f}"
                if group == "cpu"
                else f"{row['peak_allocated_gib']:.1f} / {row['peak_reserved_gib']:.1f}"
            )
            print(f"{name:<28} {row['seconds_per_step']:>9.3f} {memory_text:>22}")
        suffix = "" if args.family == "zeroscope" else f"-{args.family}"
        target = RESULTS / f"train-{group}{suffix}.json"
        target.parent.mkdir(parents=True, exist_ok=True)
        record = {"rows": rows, "steps": args.steps, "repeats": args.repeats}
        target.write_text(json.dumps({**record, "environment": environment()}, indent=2) + "\n")
        print(f"wrote {target}\n")


if __name__ == "__main__":
    main()
