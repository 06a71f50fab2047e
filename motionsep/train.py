"""``train``: learn a motion LoRA from prepared clips (dual-path, resumable).

The loop of DESIGN.md section 4 (MotionDirector's dual path):

* spatial path, skipped on ``train.spatial_skip_prob`` of the steps: the
  spatial LoRA of the step's clip learns to denoise one random frame, with the
  motion LoRA switched off;
* temporal path: the motion LoRA learns to denoise the whole clip, with the
  spatial LoRA on but frozen; loss = MSE(eps_pred, eps) + MSE of the
  appearance-debiased difference alpha * x - beta * x[anchor].

Every random choice of a step (clip, timestep, noise, frame, anchor, skip,
dropout) is drawn from generators seeded by ``(seed, step, rank)``, so a run
resumed from a checkpoint continues bit-identically.

While training, the run lives in ``motions/.partial-NAME/`` (checkpoints,
metrics); the package appears as ``motions/NAME`` only when it is complete.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from motionsep import runs
from motionsep.config import Settings
from motionsep.errors import DiskFullError, MotionsepError, UsageError, is_disk_full
from motionsep.progress import Progress, or_null
from motionsep.runs import TrainingInterruptedError, latest_checkpoint
from motionsep.store import Store, atomic_write_bytes

if TYPE_CHECKING:
    import torch

    from motionsep.data import PreparedDataset
    from motionsep.model.components import Components

METRICS_FILE = "metrics.jsonl"
CHECKPOINT_TENSOR_FILES = ("adapters.safetensors", "optimizer.safetensors", "rng.safetensors")
# What a resume may change: how long the run goes, how often it saves, previews and
# reports, and how it is spread and sped up. Any other setting is part of the run
# its checkpoint belongs to (recorded in the checkpoint, compared on --resume).
RESUME_FREE_SETTINGS = frozenset(
    {
        "train.steps",
        "train.checkpoint_every",
        "train.preview_every",
        "train.report_to",
        "train.num_processes",
        "train.gradient_checkpointing",
        "train.channels_last",
        "train.cudnn_benchmark",
    }
)


class TrainingDivergedError(MotionsepError):
    """The loss became NaN or infinite."""


@dataclass
class TrainResult:
    """What a finished training produced."""

    name: str
    package: Path
    steps: int
    final_loss: float | None
    resumed_from: int | None
    seconds: float
    metrics: list[dict[str, float]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form, for ``--json``."""
        return {
            "name": self.name,
            "package": str(self.package),
            "steps": self.steps,
            "final_loss": self.final_loss,
            "resumed_from": self.resumed_from,
            "seconds": round(self.seconds, 3),
        }


# ---------------------------------------------------------------------------
# run folders and checkpoints


def partial_dir(store: Store, name: str) -> Path:
    """The run folder of an unfinished training of ``name`` (checkpoints, metrics)."""
    return store.partial_motion_dir(name)


# ---------------------------------------------------------------------------
# the loop


def _diverged(
    trainer: Trainer, loss: float, step: int, last_saved: int, run_dir: Path
) -> TrainingDivergedError:
    """The error for a non-finite loss: damaged inputs, or an optimizer that diverged."""
    cause = trainer.nonfinite_inputs()
    if cause is not None:
        return TrainingDivergedError(
            f"the loss became {loss} at step {step} because {cause}; training stopped",
            "the inputs are damaged, not the learning rate: rebuild the clips' latents with "
            "`motionsep prepare CLIPS --rebuild`, check the base model with "
            "`motionsep download NAME` (it hashes every file), then train again",
        )
    kept = (
        f"the last good checkpoint (step {last_saved}) is kept in {run_dir}; --resume continues "
        "from it"
        if last_saved
        else "no checkpoint was written yet, so start again without --resume"
    )
    return TrainingDivergedError(
        f"the loss became {loss} at step {step}; training stopped",
        "lower --lr, or use --set train.mixed_precision=bf16 or no; " + kept,
    )


@dataclass
class Trainer:
    """One motion training's state and its dual-path step (the benches drive it directly).

    Attributes:
        settings: The resolved settings.
        components: The base model, with the motion and spatial LoRAs injected.
        dataset: The prepared clips (names clips in error messages).
        spatial_adapters: The spatial LoRA names (one shared, or one per clip).
        optimizer: Over every adapter's parameters.
        scheduler: The learning-rate schedule.
        accelerator: accelerate's Accelerator (device, autocast, processes).
        latents: Per clip, its VAE latents (C, F, h, w).
        prompts: Per clip, its prompt embedding (L, D).
    """

    settings: Settings
    components: Components
    dataset: PreparedDataset
    spatial_adapters: list[str]
    optimizer: Any
    scheduler: Any
    accelerator: Any
    latents: list[torch.Tensor]
    prompts: list[torch.Tensor]

    @property
    def rank(self) -> int:
        return int(self.accelerator.process_index)

    def generator(self, step: int, stream: int) -> torch.Generator:
        """A CPU generator determined by (seed, step, rank, stream) alone."""
        import torch

        seed = self.settings.train.seed
        mixed = (seed * 1_000_003 + step * 8_191 + self.rank * 131 + stream) % (2**63 - 1)
        return torch.Generator().manual_seed(mixed)

    def nonfinite_inputs(self) -> str | None:
        """What holds NaN or inf among the clips' tensors and the base U-Net, or None.

        Run only after a non-finite loss (it reads every tensor), to tell
        damaged inputs from a diverging optimizer.
        """
        import torch

        for index, (latents, prompt) in enumerate(zip(self.latents, self.prompts, strict=True)):
            for what, tensor in (("latents", latents), ("prompt embedding", prompt)):
                if not bool(torch.isfinite(tensor).all()):
                    clip = self.dataset.clips[index]
                    return f"the prepared {what} of clip {clip.source} hold NaN or inf"
        for name, param in self.components.unet.named_parameters():
            if "lora_" not in name and not bool(torch.isfinite(param).all()):
                return f"the base model's U-Net weight {name} holds NaN or inf"
        return None

    def step(self, step: int) -> dict[str, float]:
        """One optimizer step; returns the losses of this process."""
        import torch
        import torch.nn.functional as F
        from torch.profiler import record_function  # labels for bench/profile_train.py

        from motionsep.model import lora, tap

        train = self.settings.train
        unet = self.components.unet
        device = self.accelerator.device
        scheduler = self.components.scheduler
        choice = self.generator(step, 0)
        torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=choice)))  # LoRA dropout
        clip = int(torch.randint(len(self.latents), (1,), generator=choice))
        batch = train.batch_size
        latents = self.latents[clip].unsqueeze(0).expand(batch, -1, -1, -1, -1)
        prompt = self.prompts[clip].unsqueeze(0).expand(batch, -1, -1).to(device)
        frames = latents.shape[2]
        noise = torch.randn(latents.shape, generator=choice)
        timesteps = torch.randint(
            0, scheduler.config.num_train_timesteps, (batch,), generator=choice
        )
        skip_spatial = float(torch.rand((1,), generator=choice)) < train.spatial_skip_prob
        frame = int(torch.randint(frames, (1,), generator=choice))
        anchor = int(torch.randint(frames, (1,), generator=choice))
        latents, noise, timesteps = latents.to(device), noise.to(device), timesteps.to(device)
        noisy = scheduler.add_noise(latents, noise, timesteps)
        spatial_name = self.spatial_adapters[clip % len(self.spatial_adapters)]
        losses: dict[str, float] = {}

        # Each path's backward runs inside that path's adapter state: with
        # gradient checkpointing, recomputation must see the same adapters.
        with self._only_spatial(spatial_name), self.accelerator.autocast():
            if not skip_spatial:
                one = slice(frame, frame + 1)
                with (
                    lora.adapter_enabled(unet, False, tap.MOTION_ADAPTER),
                    record_function("motionsep.spatial_path"),
                ):
                    pred = unet(noisy[:, :, one], timesteps, encoder_hidden_states=prompt).sample
                    loss_spatial = F.mse_loss(pred.float(), noise[:, :, one].float())
                    losses["loss_spatial"] = float(loss_spatial.detach())
                    if math.isfinite(losses["loss_spatial"]):
                        self.accelerator.backward(loss_spatial)
            with (
                _frozen(lora.adapter_parameters(unet, spatial_name)),
                record_function("motionsep.temporal_path"),
            ):
                pred = unet(noisy, timesteps, encoder_hidden_states=prompt).sample.float()
                target = noise.float()
                loss_plain = F.mse_loss(pred, target)
                alpha, beta = train.debias_alpha, train.debias_beta
                loss_debias = F.mse_loss(
                    alpha * pred - beta * pred[:, :, anchor : anchor + 1],
                    alpha * target - beta * target[:, :, anchor : anchor + 1],
                )
                loss_temporal = loss_plain + loss_debias
                losses["loss_temporal"] = float(loss_temporal.detach())
                losses["loss"] = losses["loss_temporal"] + losses.get("loss_spatial", 0.0)
                if not math.isfinite(losses["loss"]):
                    self.optimizer.zero_grad(set_to_none=True)
                    return losses
                self.accelerator.backward(loss_temporal)
        with record_function("motionsep.optimizer"):
            params = [p for group in self.optimizer.param_groups for p in group["params"]]
            if self.accelerator.num_processes > 1:
                self._average_gradients(params)
            max_norm = self.settings.optim.max_grad_norm
            if max_norm is not None:
                self.accelerator.clip_grad_norm_(params, max_norm)
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
        return losses

    @contextmanager
    def _only_spatial(self, name: str) -> Iterator[None]:
        """Only the step's clip's spatial LoRA is on (per-clip spatial LoRAs)."""
        from motionsep.model import lora

        others = [a for a in self.spatial_adapters if a != name]
        for other in others:
            lora.set_adapter_enabled(self.components.unet, False, other)
        try:
            yield
        finally:
            for other in others:
                lora.set_adapter_enabled(self.components.unet, True, other)

    def _average_gradients(self, params: list[torch.nn.Parameter]) -> None:
        """Mean of every process's gradients; a skipped path contributes zeros."""
        import torch
        import torch.distributed as dist

        for param in params:
            if param.grad is None:
                param.grad = torch.zeros_like(param)
            dist.all_reduce(param.grad, op=dist.ReduceOp.SUM)
            param.grad /= self.accelerator.num_processes


@contextmanager
def _frozen(params: list[torch.nn.Parameter]) -> Iterator[None]:
    flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in zip(params, flags, strict=True):
            p.requires_grad_(flag)


def _trainable_state(unet: torch.nn.Module, adapters: list[str]) -> dict[str, torch.Tensor]:
    from motionsep.model import lora

    state: dict[str, torch.Tensor] = {}
    for adapter in adapters:
        for key, value in lora.adapter_state_dict(unet, adapter).items():
            state[f"{adapter}::{key}"] = value.detach().to("cpu", copy=True).contiguous()
    return state


def _load_trainable_state(unet: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    from motionsep.model import lora

    by_adapter: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        adapter, name = key.split("::", 1)
        by_adapter.setdefault(adapter, {})[name] = value
    for adapter, tensors in by_adapter.items():
        lora.load_adapter_state_dict(unet, tensors, adapter)


def _save_checkpoint(trainer: Trainer, run_dir: Path, step: int, adapters: list[str]) -> Path:
    optimizer_tensors, optimizer_meta = runs.flatten_optimizer(trainer.optimizer.state_dict())
    rng_tensors, rng_meta = runs.rng_states()
    scheduler = {k: v for k, v in trainer.scheduler.state_dict().items() if k != "lr_lambdas"}
    return runs.save_checkpoint(
        run_dir,
        step,
        {
            "adapters.safetensors": _trainable_state(trainer.components.unet, adapters),
            "optimizer.safetensors": optimizer_tensors,
            "rng.safetensors": rng_tensors,
        },
        {
            "optimizer": optimizer_meta,
            "scheduler": scheduler,
            "rng": rng_meta,
            "run": run_settings(trainer.settings),
            "clips": [clip.sha256 for clip in trainer.dataset.clips],
        },
    )


def run_settings(settings: Settings) -> dict[str, Any]:
    """The settings that make a training run what it is, flat (``section.field``).

    The base model's name, ``data``, ``lora``, ``optim`` and ``train`` except
    :data:`RESUME_FREE_SETTINGS`.
    """
    values = settings.to_dict()
    flat = {
        f"{section}.{key}": value
        for section in ("data", "lora", "optim", "train")
        for key, value in values[section].items()
    }
    flat["model.name"] = values["model"]["name"]
    return {key: value for key, value in flat.items() if key not in RESUME_FREE_SETTINGS}


_OTHER_RUN_HINT = (
    "resume with the command line the run began with (plus --resume), or start over with --force"
)


def _check_run_settings(path: Path, settings: Settings) -> None:
    """Refuses to resume from a checkpoint written under other :func:`run_settings`.

    Checkpoints of older versions record none and are not checked.

    Raises:
        UsageError: naming the settings that differ.
    """
    recorded = runs.read_state(path).get("run")
    if not isinstance(recorded, dict):
        return
    current = run_settings(settings)
    changed = sorted(
        k for k in recorded.keys() | current.keys() if recorded.get(k) != current.get(k)
    )
    if changed:
        more = f" and {len(changed) - 6} more" if len(changed) > 6 else ""
        raise UsageError(
            f"the checkpoint {path} belongs to a run with other settings "
            f"({', '.join(changed[:6])}{more})",
            _OTHER_RUN_HINT,
        )


def _check_run_clips(path: Path, dataset: PreparedDataset) -> None:
    """Refuses to resume from a checkpoint of a run on other clips (older ones record none).

    Raises:
        UsageError: naming the checkpoint.
    """
    clips = runs.read_state(path).get("clips")
    if isinstance(clips, list) and clips != [clip.sha256 for clip in dataset.clips]:
        raise UsageError(f"the checkpoint {path} belongs to a run on other clips", _OTHER_RUN_HINT)


def _load_checkpoint(trainer: Trainer, path: Path) -> int:
    from safetensors.torch import load_file

    state = json.loads((path / "state.json").read_text())
    _load_trainable_state(trainer.components.unet, load_file(path / "adapters.safetensors"))
    optimizer_state = runs.unflatten_optimizer(
        load_file(path / "optimizer.safetensors"), state["optimizer"]
    )
    trainer.optimizer.load_state_dict(optimizer_state)
    scheduler_state = trainer.scheduler.state_dict()
    scheduler_state.update(state["scheduler"])
    trainer.scheduler.load_state_dict(scheduler_state)
    runs.restore_rng(load_file(path / "rng.safetensors"), state["rng"])
    return int(state["step"])


def _lr_lambda(settings: Settings) -> Any:
    optim, steps = settings.optim, settings.train.steps
    warmup = optim.warmup_steps

    def factor(step: int) -> float:
        if optim.scheduler == "constant":
            return 1.0
        if step < warmup:
            return (step + 1) / max(1, warmup)
        if optim.scheduler == "constant_with_warmup":
            return 1.0
        progress = (step - warmup) / max(1, steps - warmup)
        if optim.scheduler == "linear":
            return max(0.0, 1.0 - progress)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def _mixed_precision(settings: Settings, device_type: str) -> str:
    choice = settings.train.mixed_precision
    if choice == "auto":
        return "fp16" if device_type == "cuda" else "no"
    if choice != "no" and device_type == "cpu":
        raise UsageError(
            f"train.mixed_precision={choice} needs a GPU; this run is on the CPU",
            "use --set train.mixed_precision=no (or auto)",
        )
    return choice


def enable_gradient_checkpointing(unet: torch.nn.Module) -> None:
    """Gradient checkpointing per transformer (the 3D U-Net has no switch of its own)."""
    from functools import partial

    from torch.utils.checkpoint import checkpoint

    from motionsep.model import recipes

    for name in recipes.temporal_transformer_names(unet) + recipes.spatial_transformer_names(unet):
        module = unet.get_submodule(name)
        plain = module.forward

        def forward(*args: Any, _plain: Any = plain, **kwargs: Any) -> Any:
            return checkpoint(partial(_plain, **kwargs), *args, use_reentrant=False)

        module.forward = forward


def use_channels_last(unet: torch.nn.Module) -> None:
    """Stores every convolution weight channels-last (2D: NHWC, 3D: NDHWC), in place."""
    import torch

    for module in unet.modules():
        if isinstance(module, torch.nn.Conv3d):
            layout = torch.channels_last_3d
        elif isinstance(module, torch.nn.Conv2d):
            layout = torch.channels_last
        else:
            continue
        module.weight.data = module.weight.data.contiguous(memory_format=layout)


# ---------------------------------------------------------------------------
# entry point


def use_attention_kernel(unet: Any, kernel: str, device: torch.device) -> None:
    """Sets the U-Net's attention kernel for training (``train.attention``).

    ``math`` is diffusers' ``AttnProcessor`` (batched matmul, softmax,
    matmul); ``sdpa`` leaves diffusers' default, torch's fused
    ``scaled_dot_product_attention``. On the CPU the fused kernel's backward
    pass is slow on the toy's short sequences (8 frames, 64 cells), so
    ``auto`` takes ``math`` there.
    """
    if kernel == "sdpa" or (kernel == "auto" and device.type != "cpu"):
        return
    from diffusers.models.attention_processor import AttnProcessor

    unet.set_attn_processor(AttnProcessor())


def check_training_base(settings: Settings, store: Store) -> Path:
    """Checks the base model and what training asks of it, before anything loads.

    Cheap (configs only): ``train`` calls it before relaunching several
    processes and :func:`train_motion` again; ``prepare`` calls it before an
    inversion (which runs the U-Net over ``data.frames`` frames).

    Returns:
        The base model's folder.

    Raises:
        ModelNotFoundError, ModelFormatError: for a missing or unusable model.
        UsageError: if ``data.frames`` is more than its U-Net can take at once.
    """
    from motionsep.model.components import check_model_folder
    from motionsep.sample import check_frames

    folder = store.resolve_model(settings.model.name)
    check_frames(check_model_folder(folder), settings.data.frames, "data.frames")
    return folder


def train_motion(
    inputs: list[Path],
    name: str,
    settings: Settings,
    store: Store,
    *,
    resume: bool = False,
    force: bool = False,
    progress: Progress | None = None,
    resume_command: str | None = None,
) -> TrainResult:
    """Trains a motion and installs it in the store as ``name``.

    Args:
        inputs: Clips, folders, manifests (prepared first, cached) or prepared
            dataset folders / ``manifest.json`` files.
        name: The motion's name in the store.
        settings: Every setting; ``lora``, ``optim`` and ``train`` drive training.
        store: The store.
        resume: Continue from the newest checkpoint of an unfinished run.
        force: Replace an existing motion of that name (when training ends), and
            discard an unfinished run of it (once the new inputs are checked).
        progress: Receives a "train" task (and "prepare" if clips need it).
        resume_command: The command line that resumes, shown on Ctrl-C.

    Raises:
        UsageError: an existing name, or an unfinished checkpointed run of it,
            without ``force``; ``resume`` without a checkpoint; more frames
            than the base model takes (see :func:`check_training_base`).
        TrainingInterruptedError: on Ctrl-C, after writing a checkpoint (exit 130).
        TrainingDivergedError: when the loss becomes NaN or infinite.
    """
    from accelerate import Accelerator

    from motionsep.devices import resolve_device

    store.new_motion_path(name, force, when=" when training ends")
    check_training_base(settings, store)
    device_type = resolve_device(settings.model.device).type
    precision = _mixed_precision(settings, device_type)
    if device_type == "cuda":
        import torch

        torch.backends.cudnn.benchmark = settings.train.cudnn_benchmark
    tracker = settings.train.report_to
    _check_tracker(tracker)
    accelerator = Accelerator(
        cpu=device_type == "cpu",
        mixed_precision=precision,
        log_with=None if tracker == "none" else tracker,
        project_dir=str(store.home / "logs" / name) if tracker != "none" else None,
    )
    with ExitStack() as stack:
        if accelerator.is_main_process:
            stack.enter_context(store.motion_lock(name, f"training of motion {name!r}"))
        try:
            return _train_locked(
                inputs,
                name,
                settings,
                store,
                accelerator,
                precision,
                resume,
                force,
                progress,
                resume_command,
            )
        except OSError as exc:
            if not is_disk_full(exc):
                raise
            raise _disk_full(exc, partial_dir(store, name), name, resume_command) from exc


def _resume_hint(name: str, resume_command: str | None) -> str:
    """The command that resumes a training of ``name``."""
    return resume_command or f"motionsep train ... --name {name} --resume"


def _disk_full(exc: OSError, run_dir: Path, name: str, resume_command: str | None) -> DiskFullError:
    """What a full disk during training means: which checkpoint is kept, how to go on."""
    where = f" (writing {exc.filename})" if exc.filename else ""
    kept = latest_checkpoint(run_dir)
    if kept is None:
        return DiskFullError(
            f"the disk filled up while training motion {name!r}{where}; no checkpoint had "
            "been written yet",
            "free some space and start the training again",
        )
    return DiskFullError(
        f"the disk filled up while training motion {name!r}{where}; the checkpoint of step "
        f"{kept[0]} is kept in {kept[1]}",
        f"free some space, then resume with: {_resume_hint(name, resume_command)}",
    )


def _train_locked(
    inputs: list[Path],
    name: str,
    settings: Settings,
    store: Store,
    accelerator: Any,
    precision: str,
    resume: bool,
    force: bool,
    progress: Progress | None,
    resume_command: str | None,
) -> TrainResult:
    """Training in phases: which run -> inputs -> adapters and optimizer -> loop -> package."""
    main = accelerator.is_main_process
    events = or_null(progress if main else None)
    run_dir = partial_dir(store, name)
    checkpoint = _resume_point(run_dir, name, resume, force, settings, events)
    components, weight_dtype = _load_base(settings, store, accelerator.device, precision)
    dataset = _inputs(inputs, settings, store, components, accelerator, events)
    if checkpoint is not None:
        _check_run_clips(checkpoint[1], dataset)
    # Only now that the new run's inputs are good is an older run of this name
    # discarded (refused above unless --force; a run with no checkpoint holds nothing).
    if not resume and run_dir.exists() and main:
        shutil.rmtree(run_dir)
    accelerator.wait_for_everyone()
    trainer, adapters = _build_trainer(
        settings, components, dataset, accelerator, weight_dtype, events
    )
    start = 0
    if checkpoint is not None:
        start = _load_checkpoint(trainer, checkpoint[1])
        events.log(f"resuming from step {start} ({checkpoint[1]})")
    metrics = _read_metrics(run_dir, upto=start)
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "settings.yaml").write_text(settings.to_yaml())
        _write_metrics(run_dir, metrics)
    started = time.monotonic()
    command = _resume_hint(name, resume_command)
    _loop(trainer, run_dir, start, metrics, adapters, name, command, events)
    seconds = time.monotonic() - started

    final_loss = _mean([m["loss_temporal"] for m in metrics[-10:]])
    package = store.motions_dir / name
    if main:
        training = {
            "steps": settings.train.steps,
            "seconds": round(seconds, 2),
            "resumed_from": start or None,
            "processes": accelerator.num_processes,
            "precision": precision,
        }
        package = _write_package(
            trainer, name, settings, store, dataset, metrics, run_dir, force, training, final_loss
        )
        shutil.rmtree(run_dir, ignore_errors=True)
    accelerator.wait_for_everyone()
    return TrainResult(
        name=name,
        package=package,
        steps=settings.train.steps,
        final_loss=final_loss,
        resumed_from=start or None,
        seconds=seconds,
        metrics=metrics,
    )


def _resume_point(
    run_dir: Path, name: str, resume: bool, force: bool, settings: Settings, events: Progress
) -> tuple[int, Path] | None:
    """The checkpoint to resume from (with ``resume``), after refusing what must be refused.

    Raises:
        UsageError: ``resume`` without an intact checkpoint, or with one past
            ``train.steps`` or of a run with other settings; a new run over an
            unfinished one without ``force``.
    """
    total_steps = settings.train.steps
    checkpoint = (
        runs.intact_checkpoint(run_dir, CHECKPOINT_TENSOR_FILES, events.log) if resume else None
    )
    if resume and checkpoint is None:
        newest = latest_checkpoint(run_dir)
        problem = (
            None if newest is None else runs.checkpoint_problem(newest[1], CHECKPOINT_TENSOR_FILES)
        )
        raise UsageError(
            f"there is no {'intact ' if newest else ''}checkpoint to resume for motion "
            f"{name!r} (looked in {run_dir})"
            + (f"; {newest[1].name} is damaged: {problem}" if newest and problem else ""),
            "start the training again with --force (it discards the damaged run)"
            if newest
            else "start the training without --resume",
        )
    if checkpoint is not None:
        _check_run_settings(checkpoint[1], settings)
    if checkpoint is not None and checkpoint[0] > total_steps:
        raise UsageError(
            f"the checkpoint of motion {name!r} is at step {checkpoint[0]}, past train.steps = "
            f"{total_steps} ({checkpoint[1]})",
            f"resume with --steps {checkpoint[0]} or more (the run's own number of steps)",
        )
    unfinished = None if resume else latest_checkpoint(run_dir)
    if unfinished is not None and not force:
        raise UsageError(
            f"an unfinished training of {name!r} is in {run_dir} "
            f"(checkpoint at step {unfinished[0]})",
            "continue it with --resume, or pass --force to discard it and start over",
        )
    return checkpoint


def _load_base(
    settings: Settings, store: Store, device: torch.device, precision: str
) -> tuple[Components, torch.dtype]:
    """The base model in the dtype its frozen weights train in (fp32 on the CPU)."""
    import torch

    from motionsep.devices import resolve_dtype
    from motionsep.model.components import load_components

    model_dir = store.resolve_model(settings.model.name)
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(precision, torch.float32)
    if precision == "no":
        weight_dtype = resolve_dtype(settings.model.dtype, device)
        if weight_dtype != torch.float32 and device.type == "cpu":
            weight_dtype = torch.float32
    return load_components(model_dir, dtype=weight_dtype, device=device), weight_dtype


def _inputs(
    inputs: list[Path],
    settings: Settings,
    store: Store,
    components: Components,
    accelerator: Any,
    events: Progress,
) -> PreparedDataset:
    """The prepared clips: one prepared dataset as given, or raw clips prepared (cached).

    The main process prepares; the others then read the cache.
    """
    from motionsep.data import load_prepared, prepare

    prepared = [p for p in inputs if _is_prepared(p)]
    raw = [p for p in inputs if not _is_prepared(p)]
    if prepared and raw:
        raise UsageError("give either clips or one prepared dataset, not both")
    if prepared:
        if len(prepared) != 1:
            raise UsageError("give one prepared dataset (its folder or manifest.json)")
        return load_prepared(prepared[0])
    dataset = None
    if accelerator.is_main_process:
        dataset = prepare(raw, settings, store, progress=events, components=components)
    accelerator.wait_for_everyone()
    if dataset is None:
        dataset = prepare(raw, settings, store, components=components)  # cache hits only
    return dataset


def _build_trainer(
    settings: Settings,
    components: Components,
    dataset: PreparedDataset,
    accelerator: Any,
    weight_dtype: torch.dtype,
    events: Progress,
) -> tuple[Trainer, list[str]]:
    """Injects the motion and spatial LoRAs, builds the optimizer, loads the clips.

    Returns:
        The trainer and the names of every adapter it trains (motion first).
    """
    import torch

    from motionsep.model import lora, tap

    unet = components.unet
    lora_settings = settings.lora
    torch.manual_seed(settings.train.seed)  # the LoRA initialisation is part of the run
    motion = tap.inject_motion_lora(
        unet, lora_settings.recipe, lora_settings.rank, dropout=lora_settings.dropout
    )
    clip_count = len(dataset.clips)
    spatial_names = (
        [tap.SPATIAL_ADAPTER]
        if lora_settings.shared_spatial or clip_count == 1
        else [f"{tap.SPATIAL_ADAPTER}_{i}" for i in range(clip_count)]
    )
    for spatial in spatial_names:
        tap.inject_spatial_lora(
            unet, lora_settings.spatial_rank, dropout=lora_settings.dropout, adapter_name=spatial
        )
    adapters = [tap.MOTION_ADAPTER, *spatial_names]
    for adapter in adapters:  # trainable LoRA tensors in fp32 even when the base is fp16
        for param in lora.adapter_parameters(unet, adapter):
            param.data = param.data.float()
    if settings.train.gradient_checkpointing:
        enable_gradient_checkpointing(unet)
    if settings.train.channels_last:
        use_channels_last(unet)
    use_attention_kernel(unet, settings.train.attention, accelerator.device)
    unet.train()
    events.log(
        f"motion LoRA ({lora_settings.recipe.value}): {len(motion.adapted)} modules, "
        f"{motion.trainable_parameters:,} parameters; spatial LoRAs: {len(spatial_names)}"
    )
    optim = settings.optim
    optimizer = torch.optim.AdamW(
        [
            {"params": lora.adapter_parameters(unet, tap.MOTION_ADAPTER), "lr": optim.lr},
            {
                "params": [p for s in spatial_names for p in lora.adapter_parameters(unet, s)],
                "lr": optim.spatial_lr,
            },
        ],
        betas=optim.betas,
        weight_decay=optim.weight_decay,
        eps=optim.eps,
        fused=optim.fused or None,
        # torch picks the one-kernel-per-list update only on CUDA; on the CPU it
        # saves a loop over every LoRA tensor each step (same arithmetic)
        foreach=None if optim.fused or accelerator.device.type != "cpu" else True,
    )
    lr_schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(settings))
    # prepared so that fp16 steps go through the gradient scaler; the scheduler
    # is stepped by hand (accelerate would step it once per process)
    optimizer = accelerator.prepare_optimizer(optimizer)
    tensors = [dataset.load(i) for i in range(clip_count)]
    trainer = Trainer(
        settings=settings,
        components=components,
        dataset=dataset,
        spatial_adapters=spatial_names,
        optimizer=optimizer,
        scheduler=lr_schedule,
        accelerator=accelerator,
        latents=[t["latents"].to(weight_dtype) for t in tensors],
        prompts=[t["prompt_embeds"].to(weight_dtype) for t in tensors],
    )
    return trainer, adapters


def _loop(
    trainer: Trainer,
    run_dir: Path,
    start: int,
    metrics: list[dict[str, Any]],
    adapters: list[str],
    name: str,
    resume_command: str,
    events: Progress,
) -> None:
    """Steps ``start`` .. ``train.steps``: metrics, previews, checkpoints, Ctrl-C, divergence.

    Appends each step's record to ``metrics``.

    Raises:
        TrainingDivergedError: a non-finite loss.
        TrainingInterruptedError: after Ctrl-C, once a checkpoint is written.
    """
    settings, accelerator = trainer.settings, trainer.accelerator
    main = accelerator.is_main_process
    total_steps = settings.train.steps
    tracking = settings.train.report_to != "none"
    if tracking:
        accelerator.init_trackers(name, config=_hyperparameters(settings))
        events.log(f"{settings.train.report_to} logs: {accelerator.project_dir}")
    interrupted = runs.InterruptFlag()
    events.start("train", total=total_steps, unit="step")
    events.advance("train", start)
    last_saved = start
    with interrupted.installed():
        for step in range(start, total_steps):
            step_started = time.monotonic()
            losses = trainer.step(step)
            if not math.isfinite(losses["loss"]):
                raise _diverged(trainer, losses["loss"], step + 1, last_saved, run_dir)
            record = {
                "step": step + 1,
                **{k: round(v, 6) for k, v in losses.items()},
                "lr": trainer.optimizer.param_groups[0]["lr"],
                "seconds": round(time.monotonic() - step_started, 4),
            }
            metrics.append(record)
            if main:
                with (run_dir / METRICS_FILE).open("a") as handle:
                    handle.write(json.dumps(record) + "\n")
            if tracking:
                seconds = max(record["seconds"], 1e-9)
                logged = {f"train/{k}": v for k, v in losses.items()}
                logged |= {"train/lr": record["lr"], "train/steps_per_second": 1.0 / seconds}
                accelerator.log(logged, step=step + 1)
            done = step + 1
            events.advance("train", 1, loss=losses["loss_temporal"])
            every = settings.train.preview_every
            if main and every and (done % every == 0 or done == total_steps):
                preview, frames = _render_preview(
                    trainer, run_dir / "previews" / f"step-{done}.mp4"
                )
                events.log(f"preview: {preview}")
                if tracking:
                    _log_preview(accelerator, frames, done)
            if done % settings.train.checkpoint_every == 0 or done == total_steps:
                if main:
                    _save_checkpoint(trainer, run_dir, done, adapters)
                last_saved = done
                accelerator.wait_for_everyone()
            if interrupted.requested:
                if main and last_saved != done:
                    _save_checkpoint(trainer, run_dir, done, adapters)
                raise TrainingInterruptedError(
                    f"training of {name!r} interrupted at step {done}; checkpoint written",
                    f"resume with: {resume_command}",
                )
    if tracking:
        accelerator.end_training()
    events.finish("train")


def _is_prepared(path: Path) -> bool:
    path = Path(path)
    return path.name == "manifest.json" or (path.is_dir() and (path / "manifest.json").is_file())


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _read_metrics(run_dir: Path, upto: int) -> list[dict[str, Any]]:
    path = run_dir / METRICS_FILE
    if not path.is_file() or upto == 0:
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut off by a crash
        if row.get("step", 0) <= upto:
            rows.append(row)
    return rows


def _write_metrics(run_dir: Path, metrics: list[dict[str, Any]]) -> None:
    text = "".join(json.dumps(row) + "\n" for row in metrics)
    atomic_write_bytes(run_dir / METRICS_FILE, text.encode())


def _write_package(
    trainer: Trainer,
    name: str,
    settings: Settings,
    store: Store,
    dataset: PreparedDataset,
    metrics: list[dict[str, Any]],
    run_dir: Path,
    force: bool,
    training: dict[str, Any],
    final_loss: float | None,
) -> Path:
    import torch
    from safetensors.torch import save

    from motionsep.model import lora
    from motionsep.model.components import unet_config_hash
    from motionsep.model.motion import (
        BaseModelRecord,
        ClipRecord,
        MotionMetadata,
        save_motion,
    )

    unet = trainer.components.unet
    adapter = {
        k: v.detach().float().cpu().contiguous() for k, v in lora.adapter_state_dict(unet).items()
    }
    record = (
        store.model_record(settings.model.name) if not Path(settings.model.name).exists() else None
    )
    metadata = MotionMetadata(
        recipe=settings.lora.recipe,
        lora_targets=lora.adapted_modules(unet),
        lora_rank=settings.lora.rank,
        lora_alpha=float(settings.lora.rank),
        base_model=BaseModelRecord(
            id=settings.model.name,
            revision=record.revision if record else None,
            unet_config_hash=unet_config_hash(dict(unet.config)),
            family=trainer.components.family.name,
        ),
        clips=[ClipRecord(c.name, c.sha256, c.indices, c.prompt) for c in dataset.clips],
        prompts=[c.prompt for c in dataset.clips],
        settings=settings.to_dict(),
        training=training,
        final_loss=final_loss,
    )
    extra: dict[str, Path | bytes] = {METRICS_FILE: run_dir / METRICS_FILE}
    previews = sorted(
        (run_dir / "previews").glob("step-*.mp4"), key=lambda p: int(p.stem.split("-")[1])
    )
    if previews:
        extra["preview.mp4"] = previews[-1]
    plot = _loss_plot(metrics)
    if plot is not None:
        extra["loss.png"] = plot
    steps = settings.data.inversion_steps
    inversions = [dataset.inversion_path(i, steps) for i in range(len(dataset.clips))]
    if settings.data.inversion and all(p is not None for p in inversions):
        from safetensors.torch import load_file

        stacked = torch.stack([load_file(p)["inversion"] for p in inversions if p is not None])
        extra["inversion.safetensors"] = save({"inversion": stacked.contiguous()})
    return save_motion(
        store.motions_dir / name, adapter, metadata, extra_files=extra, overwrite=force
    )


def _loss_plot(metrics: list[dict[str, Any]]) -> bytes | None:
    if not metrics:
        return None
    import io

    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6, 3.5), dpi=100)
    axes = figure.add_subplot()
    steps = [m["step"] for m in metrics]
    for key, label in (("loss_temporal", "temporal"), ("loss_spatial", "spatial")):
        points = [(m["step"], m[key]) for m in metrics if key in m]
        if points:
            axes.plot(*zip(*points, strict=True), label=label, linewidth=1)
    axes.set_xlabel("step")
    axes.set_ylabel("loss")
    axes.set_xlim(min(steps), max(steps) if len(steps) > 1 else min(steps) + 1)
    axes.legend()
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


def _check_tracker(kind: str) -> None:
    """Refuses a tracker whose package is missing, saying how to install it."""
    import importlib.util

    package = {"tensorboard": "tensorboard", "wandb": "wandb"}.get(kind)
    if package is not None and importlib.util.find_spec(package) is None:
        raise UsageError(
            f"--report-to {kind} needs the {package} package, which is not installed",
            f"pip install 'motionsep[{package}]', or train with --report-to none",
        )


def _hyperparameters(settings: Settings) -> dict[str, Any]:
    """The settings as flat ``section.key`` values a tracker takes (lists as text)."""
    flat: dict[str, Any] = {}
    for section, values in settings.to_dict().items():
        for key, value in values.items() if isinstance(values, dict) else [("", values)]:
            name = f"{section}.{key}" if key else section
            ok = value is None or isinstance(value, (bool, int, float, str))
            flat[name] = value if ok and value is not None else str(value)
    return flat


def _log_preview(accelerator: Any, frames: Any, step: int) -> None:
    """A preview's frames, left to right in one image, to the tracker."""
    import numpy as np

    strip = np.concatenate(list(frames), axis=1)  # (H, F * W, 3)
    for tracker in accelerator.trackers:
        if hasattr(tracker, "log_images"):
            tracker.log_images({"preview": strip[None]}, step=step, dataformats="NHWC")


def _render_preview(trainer: Trainer, target: Path) -> tuple[Path, Any]:
    """Samples one video with the motion as it is now (spatial LoRAs off, highway per recipe).

    Uses the first validation prompt of the settings (else the first clip's
    prompt), the sample settings' steps and guidance, and the training size.

    Returns:
        The video file and its frames, uint8 (F, H, W, 3).
    """
    from motionsep import video
    from motionsep.model import lora
    from motionsep.model.components import encode_prompts
    from motionsep.model.highway import recipe_highway
    from motionsep.model.recipes import get_recipe
    from motionsep.sample import SamplingPlan, decode_latents, denoise, initial_latents

    settings, components = trainer.settings, trainer.components
    unet = components.unet
    spec = get_recipe(settings.lora.recipe)
    sample, data = settings.sample, settings.data
    prompt = sample.prompts[0] if sample.prompts else trainer.dataset.clips[0].prompt
    plan = SamplingPlan(
        steps=sample.steps,
        guidance=sample.guidance,
        width=data.width,
        height=data.height,
        frames=data.frames,
        negative_prompt=sample.negative_prompt,
        recipe=spec.name.value,
        lora_scale=1.0,
        highway=spec.has_highway,
        highway_beta=spec.beta if spec.has_highway else None,
        pli=None,
        motion_steps=sample.steps,
        noise_prior=0.0,
    )
    shape = trainer.latents[0].shape
    latents = initial_latents(tuple(shape), settings.train.seed)
    cond = encode_prompts(components, [prompt])
    uncond = encode_prompts(components, [sample.negative_prompt])
    was_training = unet.training
    unet.eval()
    try:
        with ExitStack() as stack:
            for spatial in trainer.spatial_adapters:
                stack.enter_context(lora.adapter_enabled(unet, False, spatial))
            highway = (
                stack.enter_context(recipe_highway(unet, spec.name)) if spec.has_highway else None
            )
            clean = denoise(components, latents, cond, uncond, plan, highway=highway)
        frames = decode_latents(components.vae, clean, data.vae_batch_size)
    finally:
        unet.train(was_training)
    written = video.write_video(frames[0], target, fps=sample.fps, format="mp4")
    return written, frames[0]


def resume_command_line(argv: list[str]) -> str:
    """``motionsep`` with the given arguments and ``--resume`` (shell-quoted)."""
    import shlex

    args = list(argv)
    if "--resume" not in args:
        args.append("--resume")
    return " ".join(shlex.quote(a) for a in ["motionsep", *args])
