"""Does ``torch.compile`` pay for the toy experiment unit's training on the CPU?

The unit's training (``motionsep train`` of the ``toy-animatediff`` preset with
the motiondirector recipe, on the toy world's diagonal clips) is run twice in
fresh child processes: as shipped (eager), and with the U-Net's forward
wrapped in ``torch.compile`` (inductor, static shapes). Every step's seconds
are recorded; the table gives the first step (where compilation happens), the
slowest step after it (a recompilation, most likely where the dual-path
step first switches to another clip's spatial LoRA: a new graph), the median
step, and the whole run. ``torch.compile`` is not a
setting of motionsep; this bench is the evidence for why not on the CPU::

    python bench/compile_train.py [--steps 30]

Writes ``bench/results/compile_train-cpu.json`` with the library versions, the
machine and the commit. Run it on an idle machine; it took 25 minutes on 2
cores with ``--steps 30``, almost all of it compiling.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench_common import RESULTS, environment

MOTION = "diagonal"


def worker(mode: str, clips: str, steps: int) -> dict[str, Any]:
    """Trains in this process (eager or compiled); the seconds of every step."""
    import torch

    import motionsep.train as train
    from motionsep_cli.app import app

    if mode == "compiled":
        build = train._build_trainer

        def compiled_build(*args: Any, **kwargs: Any) -> Any:
            trainer, names = build(*args, **kwargs)
            unet = trainer.components.unet
            unet.forward = torch.compile(unet.forward, dynamic=False)
            return trainer, names

        train._build_trainer = compiled_build
    seconds: list[float] = []
    losses: list[float] = []
    step = train.Trainer.step

    def timed_step(self: Any, index: int) -> dict[str, float]:
        started = time.perf_counter()
        result = step(self, index)
        seconds.append(time.perf_counter() - started)
        losses.append(result["loss"])
        return result

    train.Trainer.step = timed_step  # type: ignore[method-assign,assignment]
    command = ["train", clips, "--name", mode, "--preset", "toy-animatediff"]
    command += ["--set", "lora.recipe=motiondirector", "--set", f"train.steps={steps}"]
    try:
        app(command)
    except SystemExit as exc:
        if exc.code:
            raise
    return {"seconds": [round(s, 4) for s in seconds], "losses": losses}


def _in_child(mode: str, clips: Path, steps: int, home: Path) -> dict[str, Any]:
    # a cold compile cache, as every session here starts with one
    env = dict(os.environ, MOTIONSEP_HOME=str(home), TORCHINDUCTOR_CACHE_DIR=str(home / "inductor"))
    done = subprocess.run(
        [sys.executable, __file__, "--worker", mode, str(clips), str(steps)],
        env=env,
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def _summary(run: dict[str, Any]) -> dict[str, Any]:
    seconds = run["seconds"]
    return {
        "first_step_s": seconds[0],
        "slowest_later_step_s": max(seconds[1:]),
        "median_step_s": round(statistics.median(seconds), 4),
        "total_s": round(sum(seconds), 1),
        "final_loss": run["losses"][-1],
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=30, help="training steps per run")
    parser.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        mode, clips, steps = args.worker
        print(json.dumps(worker(mode, clips, int(steps))))
        return
    with tempfile.TemporaryDirectory() as tmp:
        clips = Path(tmp) / "clips"
        env = dict(os.environ, MOTIONSEP_HOME=str(Path(tmp) / "home"))
        subprocess.run(
            [sys.executable, "-m", "motionsep_cli", "toy", "clips", str(clips), "--motion", MOTION],
            env=env,
            check=True,
            capture_output=True,
        )
        runs = {
            mode: _in_child(mode, clips, args.steps, Path(tmp) / f"home-{mode}")
            for mode in ("eager", "compiled")
        }
    record = {
        "environment": environment(),
        "steps": args.steps,
        "runs": runs,
        "summary": {mode: _summary(run) for mode, run in runs.items()},
    }
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / "compile_train-cpu.json"
    out.write_text(json.dumps(record, indent=1) + "\n")
    eager, compiled = record["summary"]["eager"], record["summary"]["compiled"]
    print(f"{'':22} {'eager':>10} {'compiled':>10}")
    for key in ("first_step_s", "slowest_later_step_s", "median_step_s", "total_s", "final_loss"):
        print(f"{key:22} {eager[key]:>10.4g} {compiled[key]:>10.4g}")
    speedup = eager["median_step_s"] / compiled["median_step_s"]
    print(f"median step speed-up {speedup:.2f}x; wrote {out}")


if __name__ == "__main__":
    main()
