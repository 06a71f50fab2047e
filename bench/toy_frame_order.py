"""Does a toy model know which frame is which? A seconds-long check for pretraining runs.

The 3D U-Net has no frame-position embedding: the only way it can tell frame 0
from frame 7 is the zero padding of its temporal convolutions. Without that,
a sampler starting from noise cannot put the object on the left in the first
frame and on the right in the last, and "moving right" comes out static or
random. This script feeds the U-Net the *same* noise in every frame with a
translation prompt and reads the object in its one-step clean-video
prediction. Any movement across frames then comes from absolute frame
position alone. It prints, per model and timestep: how much the prediction
differs between frames (relative to its size) and the object's slope along
the asked direction in pixels per frame (the toy world's translations move
18 px over 7 frame steps: 2.57 px/frame; 0 means no sense of frame order),
and the slope of the background's brightness (the world's frame clock rises
by 2 * CLOCK grey levels over the clip: 3.43 levels/frame). The last column
asks whether the U-Net reads the direction words at all: how much its output
changes when "right" becomes "left", relative to "red" becoming "blue" (on
ordinary noise, different in every frame)::

    python bench/toy_frame_order.py /work/toyrun/model motionsep/toy/weights
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np

DIRECTIONS = {"right": (1, 0), "left": (-1, 0), "down": (0, 1), "up": (0, -1)}


def frame_order(folder: Path, timesteps: list[int], samples: int, seed: int) -> list[dict]:
    import torch

    from motionsep.model.components import encode_prompts, load_components
    from motionsep.sample import decode_latents
    from motionsep.toy import metrics, world

    components = load_components(folder)
    alphas = components.scheduler.alphas_cumprod
    latent = world.SIZE // components.vae_scale_factor
    channels = components.unet.config.in_channels
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for t in timesteps:
        alpha = alphas[t]
        spreads, slopes, clocks = [], [], []
        for motion, (ux, uy) in DIRECTIONS.items():
            spec = world.ClipSpec("red", "square", "gray", "plain", motion, 0)
            cond = encode_prompts(components, [spec.prompt] * samples)
            one = torch.randn(samples, channels, 1, latent, latent, generator=generator)
            x = one.expand(-1, -1, world.FRAMES, -1, -1).contiguous()
            with torch.no_grad():
                eps = components.unet(
                    x, torch.full((samples,), t), encoder_hidden_states=cond
                ).sample
            x0 = (x - (1 - alpha).sqrt() * eps) / alpha.sqrt()
            spreads.append(float((x0 - x0.mean(2, keepdim=True)).norm() / x0.norm()))
            for video in decode_latents(components.vae, x0, frames_per_call=64):
                reading = metrics.read_video(video)
                grey = video.astype(np.float32).mean(axis=-1)
                shade = [
                    float(np.median(g[~metrics.object_mask(f)]))
                    for g, f in zip(grey, video, strict=True)
                ]
                clocks.append(float(np.polyfit(np.arange(len(shade)), shade, 1)[0]))
                ok = np.isfinite(reading.centers).all(axis=1)
                if ok.sum() > 3:
                    frames = np.nonzero(ok)[0]
                    along = reading.centers[ok] @ np.array([ux, uy], dtype=np.float32)
                    slopes.append(float(np.polyfit(frames, along, 1)[0]))
        rows.append(
            {
                "sensitivity": text_sensitivity(components, t, samples, seed),
                "model": str(folder),
                "t": t,
                "spread": float(np.mean(spreads)),
                "slope": float(np.mean(slopes)) if slopes else float("nan"),
                "read": len(slopes),
                "clock": float(np.mean(clocks)),
            }
        )
    return rows


def text_sensitivity(components: Any, t: int, samples: int, seed: int) -> float:
    """|U-Net(left) - U-Net(right)| / |U-Net(blue) - U-Net(red)| on the same noise."""
    import torch

    from motionsep.model.components import encode_prompts
    from motionsep.toy import world

    latent = world.SIZE // components.vae_scale_factor
    channels = components.unet.config.in_channels
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(samples, channels, world.FRAMES, latent, latent, generator=generator)

    def output(color: str, motion: str) -> Any:
        prompt = world.ClipSpec(color, "circle", "gray", "plain", motion, 0).prompt
        cond = encode_prompts(components, [prompt] * samples)
        with torch.no_grad():
            return components.unet(x, torch.full((samples,), t), encoder_hidden_states=cond).sample

    base = output("red", "right")
    direction = (output("red", "left") - base).norm()
    color = (output("blue", "right") - base).norm()
    return float(direction / color)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("models", type=Path, nargs="+", help="toy model folders")
    parser.add_argument("--timesteps", type=int, nargs="+", default=[999, 800, 600])
    parser.add_argument("--samples", type=int, default=8, help="noises per direction")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    import torch

    torch.set_num_threads(1)
    print(
        "| model | t | frame spread | slope along the asked direction (px/frame) | read "
        "| clock slope (grey/frame) | direction / colour sensitivity |"
    )
    print("|---|---|---|---|---|---|---|")
    for folder in args.models:
        for row in frame_order(folder, args.timesteps, args.samples, args.seed):
            print(
                f"| {row['model']} | {row['t']} | {row['spread']:.3f} | {row['slope']:+.2f} "
                f"| {row['read']}/{4 * args.samples} | {row['clock']:+.2f} "
                f"| {row['sensitivity']:.2f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
