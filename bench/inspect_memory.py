"""Peak memory of ``inspect-attention`` recording vs the same sampling without recording.

Run each mode in a fresh process (peak RSS is per process)::

    python bench/inspect_memory.py --model ~/.motionsep/models/tiny --mode plain
    python bench/inspect_memory.py --model ~/.motionsep/models/tiny --mode record

Both modes load the model, build a motion package (paper recipe, random
nonzero LoRA) in a temporary folder, warm up with one U-Net call at the same
size, then reset the peak-RSS counter (``/proc/self/clear_refs``) and run the
same two samplings from the same seed: the base model (adapter off, no
highway) and the motion (adapter on, the recipe's highway). ``record`` runs
them through :func:`motionsep.inspect.inspect_attention` recording every
temporal attention layer at ``--record-steps`` steps; ``plain`` calls the
sampling loop directly. On CUDA the peak allocated GPU memory is reported too.

Prints one JSON line: ``peak_rss_mb`` (the process's peak RSS over the run,
model included), ``before_mb`` (RSS when the counter was reset),
``working_mb`` (their difference), and ``naive_mb``: what keeping every
recorded probability tensor (conditional half only) would have taken instead
of running sums.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import resource
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

from motionsep.config import Recipe
from motionsep.model import lora, motion, tap
from motionsep.model.attention import temporal_attention_names
from motionsep.model.components import encode_prompts, load_components, unet_config_hash
from motionsep.model.highway import recipe_highway
from motionsep.sample import denoise, generation_settings, initial_latents, resolve_plan

PROMPT = "a wolf on a snowy mountain"


def _status_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak() -> bool:
    """Resets VmHWM to the current RSS (Linux >= 4.0); False where that is not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def _pin_malloc_thresholds() -> bool:
    """Makes glibc return freed large blocks to the OS at once (both modes alike).

    By default glibc raises its mmap threshold after a large block is freed
    and keeps later blocks of that size in the heap, so RSS reflects the
    allocation history rather than the memory in use. Fixed thresholds make
    RSS follow live memory. False where glibc is not the allocator.
    """
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        m_trim_threshold, m_mmap_threshold = -1, -3
        return bool(
            libc.mallopt(m_mmap_threshold, 128 * 1024)
            and libc.mallopt(m_trim_threshold, 128 * 1024)
        )
    except (OSError, AttributeError):
        return False


def _peak_kib() -> int:
    hwm = _status_kib("VmHWM")
    # ru_maxrss is KiB on Linux; it cannot be reset, so it is only a fallback.
    return hwm if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _package(folder: Path, model_dir: Path, unet: Any, rank: int) -> motion.MotionPackage:
    torch.manual_seed(0)
    injection = tap.inject_motion_lora(unet, Recipe.PAPER, rank)
    with torch.no_grad():
        for param in lora.adapter_parameters(unet, tap.MOTION_ADAPTER):
            param.normal_(std=0.3)
    metadata = motion.MotionMetadata(
        recipe=Recipe.PAPER,
        lora_targets=list(injection.adapted),
        lora_rank=injection.rank,
        lora_alpha=injection.alpha,
        base_model=motion.BaseModelRecord(
            id=str(model_dir), revision=None, unet_config_hash=unet_config_hash(dict(unet.config))
        ),
    )
    state = lora.adapter_state_dict(unet)
    lora.drop_adapter(unet, tap.MOTION_ADAPTER)
    return motion.load_motion(motion.save_motion(folder / "m", state, metadata))


def _attention_shapes(unet: Any, sample: torch.Tensor, text: torch.Tensor) -> dict[str, Any]:
    """(rows, frames, heads) of every temporal attention call in one forward."""
    shapes: dict[str, Any] = {}
    handles = []
    for name in temporal_attention_names(unet):
        module = unet.get_submodule(name)

        def hook(mod: Any, args: tuple[Any, ...], name: str = name) -> None:
            rows, frames = args[0].shape[:2]
            shapes[name] = (rows, frames, int(mod.heads))

        handles.append(module.register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            unet(sample, 500, encoder_hidden_states=text)
    finally:
        for handle in handles:
            handle.remove()
    return shapes


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Runs one mode and returns (and prints) its numbers."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, required=True, help="diffusers model folder")
    parser.add_argument("--mode", choices=["plain", "record"], required=True)
    parser.add_argument("--size", type=int, default=64, help="width and height in pixels")
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--steps", type=int, default=3, help="DDIM steps")
    parser.add_argument("--record-steps", default="all", help="--steps of the recording")
    parser.add_argument("--layers", default=None, help="--layers of the recording (default all)")
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    pinned = _pin_malloc_thresholds()

    # Both modes import everything before the peak is reset, so that module
    # imports do not count as working memory of either.
    import motionsep.data
    import motionsep.video  # noqa: F401
    from motionsep.inspect import inspect_attention, parse_steps

    components = load_components(args.model, device=args.device)
    unet = components.unet
    with tempfile.TemporaryDirectory() as tmp:
        package = _package(Path(tmp), args.model, unet, args.rank)
        settings = generation_settings(
            package,
            overrides={
                "model": {"name": str(args.model), "device": args.device},
                "sample": {
                    "steps": args.steps,
                    "width": args.size,
                    "height": args.size,
                    "frames": args.frames,
                    "guidance": 6.0,
                },
            },
        )
        plan = resolve_plan(settings, package)
        scale = components.vae_scale_factor
        shape = (4, args.frames, args.size // scale, args.size // scale)
        embeds = encode_prompts(components, [plan.negative_prompt, PROMPT]).to("cpu")
        text = embeds.to(unet.device)
        warm = torch.randn((2, *shape), device=unet.device)
        shapes = _attention_shapes(unet, warm, text)
        recorded = len(parse_steps(args.record_steps, args.steps))
        naive = sum(
            rows // 2 * heads * frames * frames * 4 for rows, frames, heads in shapes.values()
        )
        naive_bytes = naive * recorded * 2  # two runs

        if unet.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        reset = _reset_peak()
        before = _status_kib("VmRSS") or 0
        if args.mode == "record":
            inspect_attention(
                PROMPT,
                settings,
                package,
                layers=args.layers,
                steps=args.record_steps,
                components=components,
            )
        else:
            noise = initial_latents(shape, settings.sample.seed)
            motion.apply_motion(unet, package)
            for use_motion in (False, True):
                with contextlib.ExitStack() as stack:
                    stack.enter_context(lora.adapter_enabled(unet, use_motion))
                    highway = None
                    if use_motion:
                        highway = stack.enter_context(
                            recipe_highway(unet, package.metadata.recipe, plan.highway_beta)
                        )
                    denoise(
                        components,
                        noise,
                        embeds[1:2],
                        embeds[0:1],
                        dataclasses.replace(plan, motion_steps=plan.steps if use_motion else 0),
                        highway=highway,
                    )
            lora.drop_adapter(unet, tap.MOTION_ADAPTER)
        peak = _peak_kib()
    result = {
        "mode": args.mode,
        "size": args.size,
        "frames": args.frames,
        "steps": args.steps,
        "recorded_steps": recorded,
        "layers": len(shapes),
        "peak_reset": reset,
        "malloc_pinned": pinned,
        "peak_rss_mb": peak / 1024,
        "before_mb": before / 1024,
        "working_mb": (peak - before) / 1024,
        "naive_mb": naive_bytes / 2**20,
    }
    if unet.device.type == "cuda":
        result["cuda_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
    sys.stdout.write(json.dumps(result) + "\n")
    return result


if __name__ == "__main__":
    main()
