"""The CPU inner loop: a toy pretraining step and one toy experiment unit, old code against new.

Measures, on this machine and in one run:

* this machine's matmul peak: the best GFLOP/s of square fp32 ``torch.mm``
  (sizes 64 to 1024) at torch's thread count, the yardstick for the rest;
* a toy pretraining step: the shipped ``toy-animatediff`` model's recorded
  pretraining settings (batch 16, 8 frames, 32x32 pixels), seconds per U-Net
  step over ``--steps`` steps after two warm-up steps, its FLOPs (torch's
  flop counter: matmuls, convolutions, attention) and the GFLOP/s achieved;
* one experiment unit: ``motionsep toy experiment --model toy-animatediff
  --motions diagonal --seeds 1 --recipes motiondirector`` (named protocol:
  train the motion 200 steps, generate 4 videos, score them), its seconds as
  the unit's own record gives them, its FLOPs and GFLOP/s, and its scores.

``--against REV`` runs the same measurements on the code of commit REV too (a
git worktree, put first on ``PYTHONPATH``), alternating old and new, so both
are measured side by side on the same machine at the same time; the table
gives the speed-up and how far the new code's unit scores are from the old
code's (they differ only by floating-point rounding when the speed-ups keep
the arithmetic)::

    python bench/inner_loop.py --against e39c00a [--steps 20] [--repeats 1]

Writes ``bench/results/inner_loop-cpu.json`` with the library versions, the
machine and both commits. Run it on an idle machine: a second CPU-heavy
process makes every number meaningless.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench_common import RESULTS, environment

ROOT = Path(__file__).resolve().parents[1]
UNIT_MOTION = "diagonal"
UNIT_RECIPE = "motiondirector"


def matmul_peak() -> dict[str, Any]:
    """Best fp32 matmul GFLOP/s over a few square sizes (torch's threads)."""
    import torch

    best: dict[str, Any] = {"gflops": 0.0}
    for n in (64, 128, 256, 512, 1024):
        a, b = torch.randn(n, n), torch.randn(n, n)
        for _ in range(3):
            torch.mm(a, b)
        reps = max(3, int(2e9 / (2 * n**3)))
        started = time.perf_counter()
        for _ in range(reps):
            torch.mm(a, b)
        seconds = time.perf_counter() - started
        gflops = 2 * n**3 * reps / seconds / 1e9
        if gflops > best["gflops"]:
            best = {"gflops": round(gflops, 1), "size": n}
    best["threads"] = torch.get_num_threads()
    return best


# --- workers: run in a child process whose PYTHONPATH starts with the code under test ---


def _pretrain_run() -> Any:
    from motionsep.toy.model import builtin_animatediff_path
    from motionsep.toy.pretrain import PretrainConfig, build_run

    recorded = json.loads((builtin_animatediff_path() / "toy.json").read_text())["config"]
    import torch

    config = PretrainConfig.from_dict(recorded)
    return build_run(config, torch.device("cpu"))


def _pretrain_step(run: Any, step: int) -> None:
    import numpy as np
    import torch

    torch.manual_seed(int(np.random.default_rng([run.config.seed, step, 6]).integers(2**62)))
    run.unet_step(step)


def worker_pretrain(steps: int) -> dict[str, Any]:
    """Seconds per U-Net step of the toy-animatediff pretraining (after 2 warm-up steps)."""
    run = _pretrain_run()
    for step in range(2):
        _pretrain_step(run, step)
    started = time.perf_counter()
    for step in range(2, 2 + steps):
        _pretrain_step(run, step)
    seconds = (time.perf_counter() - started) / steps
    weights = [p.detach().clone() for p in run.parts["unet"].parameters()]
    return {"seconds_per_step": round(seconds, 4), "steps": steps, "checksum": _checksum(weights)}


def worker_pretrain_flops() -> dict[str, Any]:
    from torch.utils.flop_counter import FlopCounterMode

    run = _pretrain_run()
    _pretrain_step(run, 0)
    with FlopCounterMode(display=False) as counter:
        _pretrain_step(run, 1)
    return {"flops_per_step": int(counter.get_total_flops())}


def _checksum(tensors: list[Any]) -> float:
    return float(sum(float(t.double().abs().sum()) for t in tensors))


def _unit_command(units: Path, out: Path, seeds: int = 1, jobs: int = 1) -> list[str]:
    command = [
        "toy",
        "experiment",
        "--model",
        "toy-animatediff",
        "--motions",
        UNIT_MOTION,
        "--seeds",
        str(seeds),
        "--recipes",
        UNIT_RECIPE,
        "--units",
        str(units),
        "--out",
        str(out),
    ]
    return command + (["--jobs", str(jobs)] if jobs > 1 else [])


def _unit_records(units: Path, seeds: int) -> list[dict[str, Any]]:
    found = []
    for seed in range(seeds):
        path = units / f"named-{UNIT_MOTION}-seed{seed}-{UNIT_RECIPE}.json"
        record = json.loads(path.read_text())
        scores = [
            {
                "motion_fidelity": score["motion_fidelity"],
                "trajectory_error": score["trajectory_error"],
                "leakage": score["leakage"]["mean"],
            }
            for score in record["runs"][0]["scores"]
        ]
        found.append(
            {
                "seconds": record["seconds"],
                "train_seconds": round(record["runs"][0]["train_seconds"], 2),
                "scores": scores,
            }
        )
    return found


def worker_unit(seeds: int, jobs: int) -> dict[str, Any]:
    """``seeds`` motiondirector units (and their base and ceiling runs) in a fresh store.

    Returns each unit's own record (seconds, scores) and the wall time of the
    whole command divided by the number of units (units per hour, inverted).
    """
    with tempfile.TemporaryDirectory() as tmp:
        env = dict(os.environ, MOTIONSEP_HOME=str(Path(tmp) / "home"))
        units = Path(tmp) / "units"
        command = [
            sys.executable,
            "-m",
            "motionsep_cli",
            *_unit_command(units, Path(tmp) / "out", seeds, jobs),
        ]
        started = time.perf_counter()
        subprocess.run(command, env=env, check=True, stdout=subprocess.DEVNULL)
        wall = time.perf_counter() - started
        records = _unit_records(units, seeds)
        return {
            "seconds_per_unit": round(sum(r["seconds"] for r in records) / seeds, 1),
            "wall_seconds_per_unit": round(wall / seeds, 1),
            "seeds": seeds,
            "jobs": jobs,
            "units": records,
        }


def worker_unit_flops() -> dict[str, Any]:
    """The unit's FLOPs: run once, then again in this process under torch's flop counter.

    The second run reuses the first one's ceiling and base units (generation
    only), so the counter sees the motiondirector unit alone.
    """
    from torch.utils.flop_counter import FlopCounterMode

    from motionsep_cli.app import app

    with tempfile.TemporaryDirectory() as tmp:
        os.environ["MOTIONSEP_HOME"] = str(Path(tmp) / "home")
        units = Path(tmp) / "units"
        for out, counted in (("out", False), ("out-counted", True)):
            if counted:
                (units / f"named-{UNIT_MOTION}-seed0-{UNIT_RECIPE}.json").unlink()
            counter = FlopCounterMode(display=False)
            with counter if counted else contextlib.nullcontext():
                try:
                    app(_unit_command(units, Path(tmp) / out))
                except SystemExit as exc:
                    if exc.code:
                        raise
        return {"flops_per_unit": int(counter.get_total_flops())}


WORKERS: dict[str, Callable[..., dict[str, Any]]] = {
    "pretrain": worker_pretrain,
    "pretrain-flops": worker_pretrain_flops,
    "unit": worker_unit,
    "unit-flops": worker_unit_flops,
}


def _in_child(code: Path, job: str, *args: str) -> dict[str, Any]:
    """Runs worker ``job`` in a child process on the code under ``code``."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(code), str(ROOT / "bench")]))
    done = subprocess.run(
        [sys.executable, __file__, "--worker", job, *args],
        env=env,
        cwd=code,
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def _worktree(rev: str, into: Path) -> Path:
    subprocess.run(
        ["git", "worktree", "add", "--detach", str(into), rev],
        cwd=ROOT,
        check=True,
        capture_output=True,
    )
    return into


def _commit(code: Path) -> str:
    return subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=code, capture_output=True, text=True
    ).stdout.strip()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--against", help="also measure the code of this commit (side by side)")
    parser.add_argument("--steps", type=int, default=20, help="timed pretraining steps")
    parser.add_argument("--repeats", type=int, default=1, help="measurements of each")
    parser.add_argument("--no-flops", action="store_true", help="skip the flop counts")
    parser.add_argument("--out", type=Path, default=RESULTS / "inner_loop-cpu.json")
    parser.add_argument("--seeds", type=int, default=2, help="units per measurement")
    parser.add_argument("--jobs", type=int, default=2, help="--jobs of the parallel run")
    parser.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        job = WORKERS[args.worker]
        if args.worker == "pretrain":
            result = job(args.steps)
        elif args.worker == "unit":
            result = job(args.seeds, args.jobs)
        else:
            result = job()
        print(json.dumps(result))
        return

    record: dict[str, Any] = {"environment": environment(), "matmul_peak": matmul_peak()}
    print(f"matmul peak: {record['matmul_peak']}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        codes = {"new": ROOT}
        if args.against:
            codes = {"old": _worktree(args.against, Path(tmp) / "old"), "new": ROOT}
        try:
            record["code"] = {name: _commit(code) for name, code in codes.items()}
            record["code"]["new"] = record["environment"]["commit"]
            runs = [
                ("pretrain", name, code, ["--steps", str(args.steps)])
                for name, code in codes.items()
            ]
            runs += [
                ("unit", name, code, ["--seeds", str(args.seeds), "--jobs", "1"])
                for name, code in codes.items()
            ]
            runs.append(
                ("unit", "new-jobs", ROOT, ["--seeds", str(args.seeds), "--jobs", str(args.jobs)])
            )
            for repeat in range(args.repeats):
                for what, name, code, extra in runs:
                    started = time.monotonic()
                    result = _in_child(code, what, *extra)
                    print(
                        f"{what} {name} #{repeat}: {json.dumps(result)[:160]} "
                        f"({time.monotonic() - started:.0f} s)",
                        flush=True,
                    )
                    record.setdefault(what, {}).setdefault(name, []).append(result)
            if not args.no_flops:
                record["pretrain_flops"] = _in_child(ROOT, "pretrain-flops")["flops_per_step"]
                record["unit_flops"] = _in_child(ROOT, "unit-flops")["flops_per_unit"]
        finally:
            if args.against:
                subprocess.run(
                    ["git", "worktree", "remove", "--force", str(codes["old"])],
                    cwd=ROOT,
                    capture_output=True,
                )
    summary = _summary(record)
    record["summary"] = summary
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    _print_table(record)
    print(f"\nwritten: {args.out}")


def _row(seconds: float, flops: int | None, peak: float) -> dict[str, Any]:
    row: dict[str, Any] = {"seconds": seconds}
    if flops:
        row["gflop"] = round(flops / 1e9, 2)
        row["gflops"] = round(flops / seconds / 1e9, 2)
        row["share_of_peak"] = round(flops / seconds / 1e9 / peak, 4)
    return row


def _score_gap(old: list[dict[str, Any]], new: list[dict[str, Any]]) -> float | None:
    """The largest difference between two runs' per-video scores (None where one has none)."""
    gaps = [
        abs(a[key] - b[key])
        for unit_a, unit_b in zip(old, new, strict=True)
        for a, b in zip(unit_a["scores"], unit_b["scores"], strict=True)
        for key in a
        if a[key] is not None and b[key] is not None
    ]
    return round(max(gaps), 6) if gaps else None


def _summary(record: dict[str, Any]) -> dict[str, Any]:
    """Best-of-repeats seconds per row, the speed-ups and the score differences."""
    peak = record["matmul_peak"]["gflops"]
    rows: dict[str, Any] = {}
    for name, results in record.get("pretrain", {}).items():
        seconds = min(r["seconds_per_step"] for r in results)
        rows[f"pretrain {name}"] = _row(seconds, record.get("pretrain_flops"), peak)
    for name, results in record.get("unit", {}).items():
        # latency: a unit's own record; throughput: the command's wall time per unit
        key = "wall_seconds_per_unit" if name == "new-jobs" else "seconds_per_unit"
        seconds = min(r[key] for r in results)
        rows[f"unit {name}"] = _row(seconds, record.get("unit_flops"), peak)
        rows[f"unit {name}"]["wall_seconds_per_unit"] = min(
            r["wall_seconds_per_unit"] for r in results
        )
    speedups: dict[str, Any] = {}
    if "pretrain old" in rows:
        speedups["pretrain step"] = round(
            rows["pretrain old"]["seconds"] / rows["pretrain new"]["seconds"], 2
        )
        old, new = record["pretrain"]["old"][0], record["pretrain"]["new"][0]
        speedups["pretrain weights checksum, relative difference"] = abs(
            old["checksum"] / new["checksum"] - 1
        )
    if "unit old" in rows:
        old_wall = rows["unit old"]["wall_seconds_per_unit"]
        speedups["unit latency"] = round(
            rows["unit old"]["seconds"] / rows["unit new"]["seconds"], 2
        )
        speedups["units per hour, --jobs"] = round(
            old_wall / rows["unit new-jobs"]["wall_seconds_per_unit"], 2
        )
        speedups["max score difference, new vs old"] = _score_gap(
            record["unit"]["old"][0]["units"], record["unit"]["new"][0]["units"]
        )
        speedups["max score difference, --jobs vs old"] = _score_gap(
            record["unit"]["old"][0]["units"], record["unit"]["new-jobs"][0]["units"]
        )
    return {"rows": rows, "speedups": speedups}


def _print_table(record: dict[str, Any]) -> None:
    summary = record["summary"]
    peak = record["matmul_peak"]
    print(f"\nmatmul peak {peak['gflops']} GFLOP/s (n={peak['size']}, {peak['threads']} threads)")
    print("| measurement | code | seconds | GFLOP | GFLOP/s | share of peak |")
    print("|---|---|---|---|---|---|")
    labels = {
        "pretrain": "toy-animatediff pretraining, per step",
        "unit": "experiment unit, seconds per unit",
    }
    for name, row in summary["rows"].items():
        what, code = name.split(" ", 1)
        commit = record["code"].get(code.split("-")[0], "")
        label = labels[what]
        if code == "new-jobs":
            label = "experiment units with --jobs, wall seconds per unit"
        print(
            f"| {label} | {code} {commit} | {row['seconds']:.3f} | {row.get('gflop', '-')} | "
            f"{row.get('gflops', '-')} | {row.get('share_of_peak', '-')} |"
        )
    for key, value in summary["speedups"].items():
        print(f"{key}: {value}")


if __name__ == "__main__":
    main()
