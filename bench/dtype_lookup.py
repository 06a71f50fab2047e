"""What ``unet.dtype`` costs: diffusers' ``get_parameter_dtype`` against motionsep's lookup.

Every U-Net forward asks for its dtype. On each model below (the U-Net of
the built-in ``toy-animatediff`` model, then the same with the motion and
three spatial LoRAs of dual-path training injected, as ``train`` has it; on
the CPU) it times diffusers' function and
:func:`motionsep.model.dtype_lookup.parameter_dtype` (best of ``--repeats``
rounds of 100 calls), checks that both give the same dtype, and sets them
against one no-grad forward pass of the U-Net (batch 1, 8 frames, 32x32
pixels). Writes ``bench/results/dtype_lookup-cpu.json``::

    python bench/dtype_lookup.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from typing import Any

from bench_common import RESULTS, environment, print_table

CALLS = 100


def _best_ms(call: Callable[[], Any], repeats: int, calls: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        for _ in range(calls):
            call()
        best = min(best, (time.perf_counter() - started) / calls)
    return round(best * 1000, 3)


def _measure(label: str, unet: Any, repeats: int) -> dict[str, Any]:
    import torch

    from motionsep.model import dtype_lookup

    diffusers_dtype = dtype_lookup._original
    ours = dtype_lookup.parameter_dtype
    assert diffusers_dtype(unet) == ours(unet), "the two lookups disagree"
    sample = torch.randn(1, 4, 8, 8, 8)
    text = torch.randn(1, 77, int(unet.config.cross_attention_dim))
    with torch.no_grad():
        forward_ms = _best_ms(
            lambda: unet(sample, 10, encoder_hidden_states=text), max(2, repeats // 2), 3
        )
    return {
        "model": label,
        "modules": sum(1 for _ in unet.modules()),
        "diffusers_ms": _best_ms(lambda: diffusers_dtype(unet), repeats, CALLS),
        "motionsep_ms": _best_ms(lambda: ours(unet), repeats, CALLS),
        "forward_ms": forward_ms,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    from motionsep.config import Recipe
    from motionsep.model import tap
    from motionsep.model.components import load_components
    from motionsep.toy.model import builtin_animatediff_path

    rows = []
    unet = load_components(builtin_animatediff_path()).unet  # installs the lookup
    rows.append(_measure("toy-animatediff U-Net", unet, args.repeats))
    tap.inject_motion_lora(unet, Recipe.PAPER, 8)
    for index in range(3):
        tap.inject_spatial_lora(unet, 8, adapter_name=f"spatial_{index}")
    rows.append(_measure("the same with the LoRAs of training", unet, args.repeats))

    header = f"{'model':<38} {'modules':>8} {'diffusers':>10} {'motionsep':>10} {'forward':>9}"
    lines = [
        f"{row['model']:<38} {row['modules']:>8} {row['diffusers_ms']:>8.2f}ms"
        f" {row['motionsep_ms']:>8.2f}ms {row['forward_ms']:>7.1f}ms"
        for row in rows
    ]
    print_table(header, lines)
    record = {"environment": environment(), "repeats": args.repeats, "rows": rows}
    out = RESULTS / "dtype_lookup-cpu.json"
    out.write_text(json.dumps(record, indent=1) + "\n")
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
