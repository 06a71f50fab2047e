"""Toy-model pretraining: quality against steps, and seconds per step.

Runs ``motionsep.toy.pretrain`` with the given settings, probing the averaged
model every ``--probe-every`` U-Net steps on held-in prompts (toy metrics:
object colour, shape, background, motion class, and direction over the four
translations), and prints one table row per probe::

    python bench/toy_pretrain.py --run /tmp/toy-run --steps 3000 --probe-every 500
    python bench/toy_pretrain.py --run /tmp/toy-run --device cuda --workers 4

``--export FILE`` also writes the exported weights (fp16 safetensors, one
file) so that a GPU run can be brought back and installed.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any


class _Printer:
    """Prints probe results and a step rate now and then."""

    def __init__(self) -> None:
        self.started = time.monotonic()
        self.steps = 0

    def start(self, task: str, total: float | None, unit: str = "") -> None:
        return None

    def advance(self, task: str, amount: float = 1.0, **fields: Any) -> None:
        self.steps += int(amount)
        if fields and self.steps % 250 == 0:
            rate = (time.monotonic() - self.started) / self.steps
            print(f"{task} step {self.steps}: {fields} ({rate:.3f} s/step so far)", flush=True)

    def finish(self, task: str) -> None:
        return None

    def log(self, message: str) -> None:
        print(message, flush=True)


def main() -> None:
    from motionsep.toy.pretrain import PretrainConfig, pretrain

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--run", type=Path, required=True, help="run folder (model goes to RUN/model)"
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument(
        "--export", type=Path, help="also write the weights here (fp16 safetensors)"
    )
    defaults = PretrainConfig()
    for name, value in vars(defaults).items():
        flag = f"--{name.replace('_', '-')}"
        if isinstance(value, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=value)
        else:
            parser.add_argument(flag, type=type(value), default=value)
    args = parser.parse_args()
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    config = PretrainConfig.from_dict(vars(args))
    started = time.monotonic()
    result = pretrain(
        args.run / "model",
        args.run / "checkpoints-run",
        config,
        force=True,
        device=args.device,
        workers=args.workers,
        progress=_Printer(),
    )
    seconds = time.monotonic() - started
    probes = []
    probe_file = args.run / "checkpoints-run" / "probes.jsonl"
    if probe_file.is_file():
        probes = [json.loads(line) for line in probe_file.read_text().splitlines()]
    if result.probe is not None:
        probes.append({"step": result.steps, **result.probe})
    print(f"\n{config}\n{seconds:.0f} s in all ({seconds / max(1, config.total_steps):.3f} s/step)")
    print("| step | color | shape | background | motion | direction |")
    print("|---|---|---|---|---|---|")
    for probe in probes:
        cells = [probe.get(k) for k in ("color", "shape", "background", "motion", "direction")]
        print(
            f"| {probe['step']} | "
            + " | ".join(f"{c:.2f}" if c is not None else "-" for c in cells)
            + " |"
        )
    if args.export:
        from safetensors.torch import save_file

        from motionsep.model.components import load_components

        parts = load_components(args.run / "model")
        tensors = {}
        for name in ("unet", "vae", "text_encoder"):
            for key, value in getattr(parts, name).state_dict().items():
                tensors[f"{name}.{key}"] = value.detach().half().contiguous()
        meta = {
            "scaling_factor": str(parts.vae.config.scaling_factor),
            "config": json.dumps(vars(config)),
        }
        save_file(tensors, str(args.export), metadata=meta)


if __name__ == "__main__":
    main()
