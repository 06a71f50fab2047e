"""Trainable parameters of each recipe's motion LoRA on the full ZeroScope U-Net.

Builds the ZeroScope v2 U-Net architecture on the meta device (random
architecture only: no download, no memory), injects the motion LoRA of every
recipe at rank 32 and the spatial LoRA of dual-path training, and prints a
table. Runs in seconds on a CPU::

    python bench/trainable_params.py [--rank 32]
"""

from __future__ import annotations

import argparse
import logging

from motionsep.config import Recipe
from motionsep.model import lora, tap
from motionsep.model.components import build_zeroscope_unet, count_parameters


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rank", type=int, default=32, help="LoRA rank (upstream default 32)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    base = count_parameters(build_zeroscope_unet(device="meta"))
    print(f"ZeroScope v2 U-Net (meta device): {base:,} base parameters, LoRA rank {args.rank}\n")
    header = f"{'adapter':<22} {'adapted modules':>16} {'trainable params':>17} {'% of U-Net':>11}"
    print(header)
    print("-" * len(header))
    for recipe in Recipe:
        # A fresh U-Net per recipe: each one gets exactly one motion adapter.
        unet = build_zeroscope_unet(device="meta")
        result = tap.inject_motion_lora(unet, recipe, args.rank)
        _row(f"motion/{recipe.value}", result, base)
    unet = build_zeroscope_unet(device="meta")
    _row("spatial", tap.inject_spatial_lora(unet, args.rank), base)


def _row(label: str, result: lora.LoraInjection, base: int) -> None:
    share = 100.0 * result.trainable_parameters / base
    print(
        f"{label:<22} {len(result.adapted):>16} {result.trainable_parameters:>17,} {share:>10.3f}%"
    )


if __name__ == "__main__":
    main()
