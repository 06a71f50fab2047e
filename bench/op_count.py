"""How many tensor operations a toy step runs, and the step's time per operation.

Counts the ATen operations (after autograd: forward, backward and optimizer;
a ``TorchDispatchMode`` sees each one) of one step of

* toy-animatediff motion training: ``motionsep train`` on three rendered
  ``diagonal`` toy clips with the ``toy-animatediff`` preset and the recipe of
  the inner-loop bench's experiment unit (``--recipe``, default
  motiondirector), run in this process; the step is the dual-path step of
  ``motionsep.train.Trainer``;
* toy-animatediff pretraining: a U-Net step with the shipped model's recorded
  settings (batch 16, 8 frames, 32x32 pixels), as ``bench/inner_loop.py``
  runs it,

and times the same kind of step without the counting (median over
``--steps`` steps after warm-up; the counted step comes after them, since
steps after a dispatch mode was active ran slower). Seconds per step divided by operations per
step is the time one operation costs on average, arithmetic and overhead
together: far above the arithmetic of these small operations means the step
is bound by per-operation overhead. Writes ``bench/results/op_count-cpu.json``::

    python bench/op_count.py [--steps 20] [--recipe motiondirector]
"""

from __future__ import annotations

import argparse
import collections
import itertools
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench_common import RESULTS, environment, print_table

TOP = 12


def _counted(run_step: Callable[[], Any]) -> collections.Counter[str]:
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.ops: collections.Counter[str] = collections.Counter()

        def __torch_dispatch__(
            self, func: Any, types: Any, args: Any = (), kwargs: Any = None
        ) -> Any:
            self.ops[str(func.overloadpacket.__name__)] += 1
            return func(*args, **(kwargs or {}))

    mode = Count()
    with mode:
        run_step()
    return mode.ops


def _row(label: str, ops: collections.Counter[str], seconds: list[float]) -> dict[str, Any]:
    total = sum(ops.values())
    median = statistics.median(seconds)
    return {
        "step": label,
        "ops_per_step": total,
        "seconds_per_step": round(median, 4),
        "microseconds_per_op": round(1e6 * median / total, 2),
        "timed_steps": len(seconds),
        "top_ops": dict(ops.most_common(TOP)),
    }


def training_step(steps: int, recipe: str) -> dict[str, Any]:
    """Counts and times the dual-path step of a real ``motionsep train`` run, in this process."""
    import os

    import motionsep.train as train_module

    plain_step = train_module.Trainer.step
    # counted last: a step after a dispatch mode was active ran slower here
    warmup = 3
    counted_at = warmup + steps + 1
    calls = itertools.count(1)
    seconds: list[float] = []
    counted: dict[str, collections.Counter[str]] = {}

    def step(trainer: Any, index: int) -> dict[str, float]:
        number = next(calls)
        losses: dict[str, float] = {}
        if number == counted_at:
            counted["ops"] = _counted(lambda: losses.update(plain_step(trainer, index)))
            return losses
        started = time.perf_counter()
        losses = plain_step(trainer, index)
        if number > warmup:
            seconds.append(time.perf_counter() - started)
        return losses

    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        os.environ["MOTIONSEP_HOME"] = str(root / "home")
        _cli("toy", "clips", str(root / "clips"), "--motion", "diagonal")
        train_module.Trainer.step = step  # type: ignore[method-assign,assignment]
        try:
            _cli(
                "train",
                str(root / "clips"),
                "--name",
                "opcount",
                "--preset",
                "toy-animatediff",
                "--set",
                f"lora.recipe={recipe}",
                "--set",
                f"train.steps={warmup + 1 + steps}",
            )
        finally:
            train_module.Trainer.step = plain_step  # type: ignore[method-assign]
    return _row(f"toy-animatediff motion training ({recipe})", counted["ops"], seconds)


def _cli(*args: str) -> None:
    """Runs a motionsep command line in this process (its own argv, as a script has it)."""
    from motionsep_cli.app import main as cli

    argv = sys.argv
    sys.argv = ["motionsep", *args]
    try:
        cli()
    except SystemExit as exc:
        if exc.code:
            raise
    finally:
        sys.argv = argv


def pretraining_step(steps: int) -> dict[str, Any]:
    """Counts and times a U-Net step of the toy-animatediff pretraining."""
    from inner_loop import _pretrain_run, _pretrain_step

    run = _pretrain_run()
    for index in range(2):
        _pretrain_step(run, index)
    seconds = []
    for index in range(2, 2 + steps):
        started = time.perf_counter()
        _pretrain_step(run, index)
        seconds.append(time.perf_counter() - started)
    ops = _counted(lambda: _pretrain_step(run, 2 + steps))
    return _row("toy-animatediff pretraining (batch 16)", ops, seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20, help="timed steps per kind")
    parser.add_argument("--recipe", default="motiondirector", help="motion LoRA recipe")
    args = parser.parse_args()

    rows = [training_step(args.steps, args.recipe), pretraining_step(max(3, args.steps // 4))]
    lines = []
    for row in rows:
        lines.append(
            f"{row['step']:<45} {row['ops_per_step']:>9,} {row['seconds_per_step']:>8.3f}"
            f" {row['microseconds_per_op']:>7.1f}"
        )
        lines.append("   " + ", ".join(f"{name} {count}" for name, count in row["top_ops"].items()))
    print_table(f"{'step':<45} {'ops/step':>9} {'s/step':>8} {'us/op':>7}", lines)
    out = RESULTS / "op_count-cpu.json"
    record = {"environment": environment(), "steps": args.steps, "rows": rows}
    out.write_text(json.dumps(record, indent=1) + "\n")
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
