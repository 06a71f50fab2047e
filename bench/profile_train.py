"""Where a training step's time goes: torch.profiler over a few steps, per path.

Drives the real dual-path step (``motionsep.train.Trainer``) with both paths
every step (``train.spatial_skip_prob=0``: a fixed schedule, so the spatial
path's cost is always in the number) on in-memory components:

* ``--model tiny`` (default on the CPU): the tiny seeded model, 64x64;
* ``--model zeroscope`` (default with CUDA): the full ZeroScope U-Net with
  random weights at 384x384, 16 frames, LoRA rank 32, fp16 autocast (the
  ``dolly`` preset), as ``bench/train.py`` builds it;
* ``--model tiny-animatediff`` / ``--model animatediff``: the same for the
  AnimateDiff family (the full one: SD 1.5 + the v1-5-2 motion adapter at
  512x512, 16 frames, the ``animatediff`` preset; CUDA only).

The step labels its parts with ``record_function`` (``motionsep.spatial_path``,
``motionsep.temporal_path``, ``motionsep.optimizer``). The table gives, per
step: each part's host (CPU) and device time, the top operators by device
time (CPU time on the CPU), and the host-device synchronisations: the
operators that read a tensor's value on the host (``aten::_local_scalar_dense``:
``float(loss)``, ``.item()``; this count includes reads of CPU tensors, such as
AdamW's per-tensor step counters, which cost no synchronisation), plus, with
CUDA, every op that
``torch.cuda.set_sync_debug_mode`` flags and the host-to-device copies.
It writes ``bench/results/profile_train-MODEL-DEVICE.json`` with the device,
driver, library versions and the commit::

    python bench/profile_train.py [--model tiny|zeroscope|tiny-animatediff|animatediff]
        [--steps 3] [--top 15]
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path
from typing import Any

from bench_common import RESULTS, build_trainer, environment, on_cuda

LABELS = ("motionsep.spatial_path", "motionsep.temporal_path", "motionsep.optimizer")
SYNC_OPS = ("aten::_local_scalar_dense",)


def _device_time(event: Any) -> float:
    """Self device time of a profiler event in microseconds (0 without a device)."""
    return float(getattr(event, "self_device_time_total", 0.0) or 0.0)


def _total_device_time(event: Any) -> float:
    return float(getattr(event, "device_time_total", 0.0) or 0.0)


def profile(model: str, steps: int, top: int) -> dict[str, Any]:
    import math

    import torch
    from torch.profiler import ProfilerActivity, profile

    trainer, device, _ = build_trainer(model, ("train.spatial_skip_prob=0",))
    cuda = device.type == "cuda"
    for step in range(2):  # warm-up: allocator, kernels, optimizer state
        trainer.step(step)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    flagged = 0
    losses = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if cuda:
            torch.cuda.set_sync_debug_mode("warn")
        started = time.perf_counter()
        with profile(activities=activities, record_shapes=False) as prof:
            for step in range(2, 2 + steps):
                losses.append(trainer.step(step)["loss"])
            if cuda:
                torch.cuda.synchronize()
        wall = (time.perf_counter() - started) / steps
        if cuda:
            torch.cuda.set_sync_debug_mode(0)
        flagged = sum("synchronizing" in str(w.message) for w in caught)
    if not all(math.isfinite(loss) for loss in losses):
        raise SystemExit(f"a timed step's loss was not finite: {losses}")
    events = prof.key_averages()
    parts = {}
    for label in LABELS:
        found = [e for e in events if e.key == label]
        parts[label.removeprefix("motionsep.")] = {
            "cpu_ms": sum(e.cpu_time_total for e in found) / 1e3 / steps,
            "device_ms": sum(_total_device_time(e) for e in found) / 1e3 / steps,
        }
    ops = [e for e in events if not e.key.startswith("motionsep.") and e.key != "ProfilerStep*"]
    ops.sort(key=(_device_time if cuda else lambda e: e.self_cpu_time_total), reverse=True)
    top_ops = [
        {
            "op": e.key,
            "calls_per_step": e.count / steps,
            "self_cpu_ms": e.self_cpu_time_total / 1e3 / steps,
            "self_device_ms": _device_time(e) / 1e3 / steps,
        }
        for e in ops[:top]
    ]
    syncs = sum(e.count for e in events if e.key in SYNC_OPS) / steps
    copies = sum(e.count for e in events if "Memcpy HtoD" in e.key) / steps
    kernels = sum(e.count for e in events if e.device_type.name == "CUDA") / steps if cuda else 0
    return {
        "model": model,
        "device": str(device),
        "steps": steps,
        "wall_seconds_per_step": wall,
        "cpu_ms_per_step": sum(e.self_cpu_time_total for e in events) / 1e3 / steps,
        "device_ms_per_step": sum(_device_time(e) for e in events) / 1e3 / steps,
        "parts": parts,
        "host_reads_per_step": syncs,
        "sync_debug_flags_per_step": flagged / steps if cuda else None,
        "host_to_device_copies_per_step": copies if cuda else None,
        "device_kernels_per_step": kernels if cuda else None,
        "peak_allocated_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
        "peak_reserved_gib": torch.cuda.max_memory_reserved() / 2**30 if cuda else None,
        "losses": losses,
        "top_ops": top_ops,
        "environment": environment(),
    }


def print_table(result: dict[str, Any]) -> None:
    print(
        f"{result['model']} on {result['device']}: {result['steps']} profiled steps, "
        f"{result['wall_seconds_per_step']:.3f} s/step (profiler on)"
    )
    print(
        f"per step: host {result['cpu_ms_per_step']:.1f} ms of op time, "
        f"device {result['device_ms_per_step']:.1f} ms; host reads of tensor values "
        f"{result['host_reads_per_step']:.0f}"
        + (
            f", sync-debug flags {result['sync_debug_flags_per_step']:.0f}, "
            f"HtoD copies {result['host_to_device_copies_per_step']:.0f}, "
            f"kernels {result['device_kernels_per_step']:.0f}"
            if result["sync_debug_flags_per_step"] is not None
            else ""
        )
    )
    print(f"\n{'part':<16} {'host ms':>10} {'device ms':>10}")
    for name, part in result["parts"].items():
        print(f"{name:<16} {part['cpu_ms']:>10.1f} {part['device_ms']:>10.1f}")
    print(f"\n{'op':<44} {'calls':>7} {'self host ms':>13} {'self dev ms':>12}")
    for op in result["top_ops"]:
        print(
            f"{op['op'][:44]:<44} {op['calls_per_step']:>7.0f} {op['self_cpu_ms']:>13.2f} "
            f"{op['self_device_ms']:>12.2f}"
        )


def main() -> None:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("tiny", "zeroscope", "tiny-animatediff", "animatediff"))
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--top", type=int, default=15)
    parser.add_argument("--out", type=Path, help="JSON path (default bench/results/...).")
    args = parser.parse_args()
    model = args.model or ("zeroscope" if torch.cuda.is_available() else "tiny")
    if on_cuda(model) and not torch.cuda.is_available():
        raise SystemExit(f"--model {model} needs a CUDA device; none here")
    result = profile(model, args.steps, args.top)
    print_table(result)
    device = "cuda" if result["device"].startswith("cuda") else "cpu"
    out = args.out or RESULTS / f"profile_train-{model}-{device}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
