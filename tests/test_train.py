"""train: the loss goes down, Ctrl-C and SIGKILL resume exactly, two processes, bad input."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
import torch
from click.testing import Result
from safetensors.torch import load_file
from typer.testing import CliRunner

from motionsep import train
from motionsep.config import load_settings
from motionsep.model.motion import load_motion
from motionsep.store import Store
from motionsep.train import latest_checkpoint, partial_dir, train_motion
from motionsep.video import probe
from motionsep_cli.app import app
from tests._progress import LoggedProgress

runner = CliRunner()


def _env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MOTIONSEP_")}
    env.update(MOTIONSEP_HOME=str(home), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    return env


def _train_args(clip: Path, model: Path, name: str, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "motionsep_cli", "train", str(clip), "--name", name,
        "--preset", "tiny", "--model", str(model), *extra,
    ]  # fmt: skip


def _in_process(args: list[str], home: Path) -> Result:
    """The command line ``args`` (as `_train_args` makes it) run in this process.

    The same code as the console script, without a fresh interpreter's 5 s of
    imports: for the steps of a test that are not about the process itself
    (its signals, its exit), such as the rerun after a Ctrl-C.
    """
    assert args[:3] == [sys.executable, "-m", "motionsep_cli"], args
    with mock.patch.object(sys, "argv", ["motionsep", *args[3:]]):  # as the script sees it
        return runner.invoke(app, args[3:], env={"MOTIONSEP_HOME": str(home)})


def _adapter(home: Path, name: str) -> dict:
    return load_file(home / "motions" / name / "adapter.safetensors")


def _assert_no_half_written_state(home: Path, name: str) -> None:
    motions = home / "motions"
    if (motions / name).exists():
        load_motion(motions / name)  # a visible package is always complete
    for entry in motions.iterdir() if motions.is_dir() else []:
        assert not entry.name.startswith(".tmp-"), f"temporary folder left visible: {entry}"
    checkpoints = partial_dir(Store(home), name) / "checkpoints"
    for checkpoint in checkpoints.iterdir() if checkpoints.is_dir() else []:
        if checkpoint.name.startswith("step-"):
            assert (checkpoint / "state.json").is_file()
            load_file(checkpoint / "adapters.safetensors")


def _wait_for_step(home: Path, name: str, step: int, process: subprocess.Popen, timeout: float):
    metrics = partial_dir(Store(home), name) / "metrics.jsonl"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, process.communicate()[1]
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= step:
            return
        time.sleep(0.05)
    raise AssertionError(f"training did not reach step {step} in {timeout}s")


def test_training_lowers_the_temporal_loss(
    clips_dir: Path, tiny_model_dir: Path, tmp_path: Path
) -> None:
    settings = load_settings(
        preset="tiny", set_options=[f"model.name={tiny_model_dir}", "train.preview_every=15"]
    )
    store = Store(tmp_path)
    result = train_motion([clips_dir / "dolly.mp4"], "dolly", settings, store)
    temporal = [row["loss_temporal"] for row in result.metrics]
    assert len(temporal) == settings.train.steps == 30
    first, last = sum(temporal[:10]) / 10, sum(temporal[-10:]) / 10
    print(f"temporal loss: first 10 steps {first:.3f}, last 10 steps {last:.3f}")
    assert last < 0.9 * first

    package = load_motion(result.package)
    assert package.metadata.recipe.value == "reference"  # the default recipe
    assert package.metadata.settings["train"]["steps"] == 30
    assert package.metadata.clips[0].name == "dolly"
    assert package.has_file("loss.png") and package.has_file("metrics.jsonl")
    preview = probe(package.file_path("preview.mp4"))  # the last preview, at step 30
    assert (preview.frame_count, preview.width, preview.height) == (4, 16, 16)
    assert all(".to_k." in key or ".to_out.0." in key for key in package.adapter_state)
    assert not partial_dir(store, "dolly").exists(), "the run folder is gone once done"


@pytest.fixture(scope="module")
def interrupted_training(
    clips_dir: Path, tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Any]:
    """A training run straight through, and the same run stopped by Ctrl-C after step 7."""
    clip = clips_dir / "dolly.mp4"
    extra = ["--steps", "12", "--set", "train.checkpoint_every=5", "--set", "lora.dropout=0.1"]
    root = tmp_path_factory.mktemp("sigint")
    home = root / "interrupted"
    args = _train_args(clip, tiny_model_dir, "m", *extra)
    process = subprocess.Popen(
        args, env=_env(home), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    _wait_for_step(home, "m", 7, process, timeout=240)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    # the run straight through needs no process of its own (one thread, as in the subprocess)
    straight = root / "straight"
    through = _in_process([*args, "--verbose"], straight)
    assert through.exit_code == 0, through.output
    return {
        "straight": straight,
        "verbose": through.stderr,
        "home": home,
        "args": args,
        "typo": _train_args(clips_dir / "dolyl.mp4", tiny_model_dir, "m", *extra),
        "returncode": process.returncode,
        "stderr": stderr,
    }


def test_sigint_stops_training_with_a_checkpoint_and_a_rerun_loses_nothing(
    interrupted_training: dict[str, Any],
) -> None:
    run = interrupted_training
    assert "spatial_skip_prob:" in run["verbose"]  # --verbose: every resolved setting
    assert run["returncode"] == 130, run["stderr"]
    assert "--resume" in run["stderr"]
    home = run["home"]
    checkpoint = latest_checkpoint(partial_dir(Store(home), "m"))
    assert checkpoint is not None and 7 <= checkpoint[0] < 12
    assert not (home / "motions" / "m").exists()
    checkpoints = sorted(p.name for p in (partial_dir(Store(home), "m") / "checkpoints").iterdir())
    # a rerun without --resume, even one with a mistyped clip, loses nothing
    for rerun, says in (
        (run["typo"], "unfinished training of 'm'"),
        (run["args"], "--force to discard it"),
        ([*run["typo"], "--force"], "dolyl.mp4"),  # --force discards only once inputs are good
    ):
        refused = _in_process(rerun, home)
        assert refused.exit_code == 2, refused.output
        assert says in " ".join(refused.stderr.split())
        kept = sorted(p.name for p in (partial_dir(Store(home), "m") / "checkpoints").iterdir())
        assert kept == checkpoints


def test_sigint_then_resume_is_bit_identical_to_one_run(
    interrupted_training: dict[str, Any], tmp_path: Path
) -> None:
    run = interrupted_training
    # resume a copy: the fixture's interrupted store stays as Ctrl-C left it
    # for the other test, whichever order they run in
    home, args = tmp_path / "home", run["args"]
    shutil.copytree(run["home"], home)
    checkpoint = latest_checkpoint(partial_dir(Store(home), "m"))
    assert checkpoint is not None
    resumed = _in_process([*args, "--resume"], home)
    assert resumed.exit_code == 0, resumed.output
    assert f"resuming from step {checkpoint[0]}" in resumed.stderr
    # the start-up summary: a few lines, where the motion goes and how to resume
    summary = resumed.stderr.split("resuming from")[0]
    assert "spatial_skip_prob" not in summary and len(summary.splitlines()) < 15
    assert f"saves to {home / 'motions' / 'm'}" in summary
    assert "reference recipe" in summary and "resume   motionsep train" in summary
    a, b = _adapter(run["straight"], "m"), _adapter(home, "m")
    assert a.keys() == b.keys()
    for key in a:
        assert (a[key] == b[key]).all(), f"{key} differs after resume"
    metrics = (home / "motions" / "m" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in metrics] == list(range(1, 13))


def _kill_and_resume(clip: Path, model: Path, home: Path, seed: int) -> None:
    rng = random.Random(seed)
    args = _train_args(clip, model, "k", "--steps", "8", "--set", "train.checkpoint_every=2")
    process = subprocess.Popen(
        args, env=_env(home), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    _wait_for_step(home, "k", rng.randint(1, 7), process, timeout=240)
    time.sleep(rng.uniform(0.0, 0.6))
    process.kill()
    process.wait()
    _assert_no_half_written_state(home, "k")
    if (home / "motions" / "k").exists():
        return  # killed after the package was complete
    resume = ["--resume"] if latest_checkpoint(partial_dir(Store(home), "k")) else []
    finished = _in_process([*args, *resume], home)  # the resume needs no process of its own
    assert finished.exit_code == 0, finished.output
    load_motion(home / "motions" / "k")
    _assert_no_half_written_state(home, "k")


@pytest.mark.parametrize("trial", range(2))
def test_sigkill_at_a_random_moment_always_resumes(
    trial: int, clips_dir: Path, tiny_model_dir: Path, tmp_path: Path
) -> None:
    _kill_and_resume(clips_dir / "dolly.mp4", tiny_model_dir, tmp_path, seed=trial)


@pytest.mark.slow
@pytest.mark.parametrize("trial", range(10))
def test_sigkill_ten_trials(
    trial: int, clips_dir: Path, tiny_model_dir: Path, tmp_path: Path
) -> None:
    _kill_and_resume(clips_dir / "dolly.mp4", tiny_model_dir, tmp_path, seed=100 + trial)


def test_two_processes_train_one_motion(
    clips_dir: Path, tiny_model_dir: Path, tmp_path: Path
) -> None:
    args = _train_args(
        clips_dir / "dolly.mp4", tiny_model_dir, "ddp", "--steps", "4", "--num-processes", "2"
    )
    clips = tmp_path / "clips"
    clips.mkdir()
    for name in ("dolly", "zoom-in"):
        shutil.copy(clips_dir / f"{name}.mp4", clips)
        shutil.copy(clips_dir / f"{name}.txt", clips)
    args[4] = str(clips)
    result = subprocess.run(args, env=_env(tmp_path), capture_output=True, text=True, timeout=400)
    assert result.returncode == 0, result.stderr
    assert "launching 2 processes" in result.stderr
    package = load_motion(tmp_path / "motions" / "ddp")
    assert package.metadata.training["processes"] == 2
    assert len(package.metadata.clips) == 2
    # only the main process wrote: one metrics line per step
    assert len((tmp_path / "motions" / "ddp" / "metrics.jsonl").read_text().splitlines()) == 4


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--preset", "nope"], "unknown preset 'nope'"),
        (["--recipe", "fancy"], "fancy"),
        (["--set", "train.steps=0"], "train.steps"),
    ],
)
def test_bad_settings_exit_2_and_change_nothing(
    extra: list[str], message: str, clips_dir: Path, tiny_model_dir: Path, tmp_path: Path
) -> None:
    args = _train_args(clips_dir / "dolly.mp4", tiny_model_dir, "bad", *extra)
    result = subprocess.run(args, env=_env(tmp_path), capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert message in result.stderr
    assert not (tmp_path / "motions").exists()


def test_a_2d_unet_is_refused(clips_dir: Path, tiny_model_dir: Path, tmp_path: Path) -> None:
    model = tmp_path / "model2d"
    shutil.copytree(tiny_model_dir, model)
    config = json.loads((model / "unet" / "config.json").read_text())
    config["_class_name"] = "UNet2DConditionModel"
    (model / "unet" / "config.json").write_text(json.dumps(config))
    home = tmp_path / "home"
    result = _in_process(_train_args(clips_dir / "dolly.mp4", model, "m"), home)
    assert result.exit_code == 2, result.output
    assert "UNet3DConditionModel" in result.stderr
    assert not (home / "motions" / "m").exists()


def test_existing_name_is_refused_without_force(
    clips_dir: Path, tiny_model_dir: Path, tmp_path: Path
) -> None:
    existing = tmp_path / "motions" / "taken"
    existing.mkdir(parents=True)
    (existing / "motion.json").write_text("{}")
    result = _in_process(_train_args(clips_dir / "dolly.mp4", tiny_model_dir, "taken"), tmp_path)
    assert result.exit_code == 2
    assert "already exists" in result.stderr and "--force" in result.stderr
    assert (existing / "motion.json").read_text() == "{}"
    assert sorted(p.name for p in (tmp_path / "motions").iterdir()) == ["taken"]


def test_a_second_training_of_the_same_name_is_locked_out(
    clips_dir: Path, tiny_model_dir: Path, tmp_path: Path
) -> None:
    from motionsep.errors import StoreLockedError
    from motionsep.store import lock

    settings = load_settings(preset="tiny", set_options=[f"model.name={tiny_model_dir}"])
    store = Store(tmp_path)
    with (
        lock(store.motions_dir / ".m.lock", "another run"),
        pytest.raises(StoreLockedError, match="training of motion 'm' is already running"),
    ):
        train_motion([clips_dir / "dolly.mp4"], "m", settings, store)


def _blow_up_at(monkeypatch: pytest.MonkeyPatch, at: int) -> None:
    """Makes the motion LoRA infinite before step ``at``: what a far too large lr does."""
    from motionsep import train
    from motionsep.model import lora, tap

    step = train.Trainer.step

    def blow_up(self: train.Trainer, number: int) -> dict[str, float]:
        if number == at:
            with torch.no_grad():
                for param in lora.adapter_parameters(self.components.unet, tap.MOTION_ADAPTER):
                    param.fill_(float("inf"))
        return step(self, number)

    monkeypatch.setattr(train.Trainer, "step", blow_up)


def test_a_diverging_loss_stops_with_the_step_and_keeps_the_checkpoint(
    clips_dir: Path, tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from motionsep import train

    settings = load_settings(
        preset="tiny",
        set_options=[f"model.name={tiny_model_dir}", "train.steps=6", "train.checkpoint_every=1"],
    )
    _blow_up_at(monkeypatch, 4)
    store = Store(tmp_path)
    with pytest.raises(train.TrainingDivergedError) as info:
        train_motion([clips_dir / "dolly.mp4"], "nan", settings, store)
    message = str(info.value)
    assert "at step" in message and "lower --lr" in message
    assert not (store.motions_dir / "nan").exists()
    checkpoint = latest_checkpoint(partial_dir(store, "nan"))
    assert checkpoint is not None, "the last good checkpoint is kept"
    assert f"step {checkpoint[0]}" in message


def test_gradient_checkpointing_trains_the_same_adapter(
    clips_dir: Path, tiny_model_dir: Path, tmp_path: Path
) -> None:
    adapters = []
    for flag in ("false", "true"):
        settings = load_settings(
            preset="tiny",
            set_options=[
                f"model.name={tiny_model_dir}",
                "train.steps=3",
                "lora.dropout=0.1",
                f"train.gradient_checkpointing={flag}",
            ],
        )
        store = Store(tmp_path / flag)
        result = train_motion([clips_dir / "dolly.mp4"], "ckpt", settings, store)
        adapters.append(load_file(result.package / "adapter.safetensors"))
    plain, checkpointed = adapters
    assert plain.keys() == checkpointed.keys()
    for key in plain:
        assert torch.allclose(plain[key], checkpointed[key], atol=1e-6), key


def test_the_speed_levers_follow_the_plain_loss_curve(
    clips_dir: Path, tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The CPU defaults (plain-matmul attention, list-at-once AdamW), fused AdamW and
    channels-last weights: the same run as the plain one to float rounding.

    The plain run is torch's fused attention kernel and the per-tensor AdamW
    loop (the defaults before they changed). Tolerance: every step's loss
    within 1e-4 relative and every adapter tensor within 1e-4 absolute of the
    plain run over 12 steps (the plain run repeats itself bit for bit; these
    levers change only the order of float operations).
    """
    import motionsep.train as training

    optimizers: list[tuple[bool | None, bool | None]] = []
    layouts: list[bool] = []
    kernels: list[str] = []
    real_adamw, real_channels_last = torch.optim.AdamW, training.use_channels_last
    real_kernel = training.use_attention_kernel

    def adamw(*args: Any, **kwargs: Any) -> Any:
        if not runs:  # the plain run: torch's own CPU default, one tensor at a time
            kwargs["foreach"] = False
        optimizers.append((kwargs.get("fused"), kwargs.get("foreach")))
        return real_adamw(*args, **kwargs)

    def channels_last(unet: torch.nn.Module) -> None:
        real_channels_last(unet)
        convs = [m for m in unet.modules() if isinstance(m, torch.nn.Conv2d | torch.nn.Conv3d)]
        layouts.append(
            all(
                m.weight.is_contiguous(
                    memory_format=torch.channels_last_3d
                    if isinstance(m, torch.nn.Conv3d)
                    else torch.channels_last
                )
                for m in convs
            )
        )

    def kernel(unet: torch.nn.Module, name: str, device: torch.device) -> None:
        real_kernel(unet, name, device)
        kernels.append(type(next(iter(unet.attn_processors.values()))).__name__)

    monkeypatch.setattr(torch.optim, "AdamW", adamw)
    monkeypatch.setattr(training, "use_channels_last", channels_last)
    monkeypatch.setattr(training, "use_attention_kernel", kernel)
    runs: list[tuple[Any, dict[str, torch.Tensor]]] = []
    for levers in (
        ["train.attention=sdpa"],
        [],
        ["optim.fused=true", "train.channels_last=true"],
    ):
        settings = load_settings(
            preset="tiny",
            set_options=[
                f"model.name={tiny_model_dir}",
                "train.steps=12",
                "lora.dropout=0.1",
                "optim.lr=1e-3",
                *levers,
            ],
        )
        result = train_motion(
            [clips_dir / "dolly.mp4"], "fast", settings, Store(tmp_path / str(len(runs)))
        )
        runs.append((result, load_file(result.package / "adapter.safetensors")))
    # the levers were on where asked: CPU defaults are list-at-once AdamW and plain attention
    assert optimizers == [(None, False), (None, True), (True, None)]
    assert kernels == ["AttnProcessor2_0", "AttnProcessor", "AttnProcessor"]
    assert layouts == [True]
    plain, plain_adapter = runs[0]
    plain_losses = [row["loss"] for row in plain.metrics]
    assert len(plain_losses) == 12
    assert plain_losses[-1] != plain_losses[0]  # the runs did train
    for fast, fast_adapter in runs[1:]:
        fast_losses = [row["loss"] for row in fast.metrics]
        assert fast_losses == pytest.approx(plain_losses, rel=1e-4)
        assert plain_adapter.keys() == fast_adapter.keys()
        for key in plain_adapter:
            assert torch.allclose(plain_adapter[key], fast_adapter[key], atol=1e-4), key


@pytest.fixture(scope="module")
def stopped_after_step_4(
    clips_dir: Path, tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Any]:
    """Six steps straight through, and the same run stopped by Ctrl-C after the
    checkpoint of step 4 (checkpoints every 2 steps); built once, copied by each test."""
    from motionsep import train

    clip = [clips_dir / "dolly.mp4"]
    options = [f"model.name={tiny_model_dir}", "train.steps=6", "train.checkpoint_every=2"]
    settings = load_settings(preset="tiny", set_options=options)
    root = tmp_path_factory.mktemp("stopped")
    straight = train_motion(clip, "m", settings, Store(root / "straight"))
    step = train.Trainer.step

    def stop_at_step_5(self: train.Trainer, number: int) -> dict[str, float]:
        if number == 5:
            raise KeyboardInterrupt  # as Ctrl-C would, after the checkpoint of step 4
        return step(self, number)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(train.Trainer, "step", stop_at_step_5)
        with pytest.raises((KeyboardInterrupt, train.TrainingInterruptedError)):
            train_motion(clip, "m", settings, Store(root / "stopped"))
    return {
        "clip": clip,
        "settings": settings,
        "straight": straight.package.parent.parent,
        "stopped": root / "stopped",
    }


@pytest.mark.parametrize("damage", ["garbage", "nan"])
def test_resume_passes_over_a_damaged_checkpoint_to_the_older_one(
    damage: str, stopped_after_step_4: dict[str, Any], tmp_path: Path
) -> None:
    import json as json_module

    from safetensors.torch import save_file

    from motionsep import runs
    from motionsep.data import file_sha256

    run = stopped_after_step_4
    clip, settings = run["clip"], run["settings"]
    # damage a copy: the fixture's store stays as Ctrl-C left it for the other case
    shutil.copytree(run["stopped"], tmp_path / "damaged")
    store = Store(tmp_path / "damaged")
    newest = partial_dir(store, "m") / "checkpoints" / "step-4"
    adapters = newest / "adapters.safetensors"
    if damage == "garbage":
        adapters.write_bytes(b"\x00garbage" * 100)
    else:  # well-formed, checksum updated, but NaN inside
        tensors = {k: torch.full_like(v, float("nan")) for k, v in load_file(adapters).items()}
        save_file(tensors, str(adapters))
        state = json_module.loads((newest / "state.json").read_text())
        state["files"]["adapters.safetensors"] = file_sha256(adapters)
        state[runs.STATE_DIGEST_KEY] = runs.state_digest(state)
        (newest / "state.json").write_text(json_module.dumps(state))

    logged = LoggedProgress()
    resumed = train_motion(clip, "m", settings, store, resume=True, progress=logged)
    assert any("step-4 is damaged" in line for line in logged.lines), logged.lines
    assert any("resuming from step 2" in line for line in logged.lines), logged.lines
    a, b = _adapter(run["straight"], "m"), _adapter(store.home, "m")
    for key in a:
        assert (a[key] == b[key]).all(), f"{key} differs after falling back"
    assert resumed.metrics[-1]["step"] == 6


def test_nan_in_the_inputs_is_named_instead_of_blaming_the_learning_rate(
    clips_dir: Path, tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from motionsep import train

    settings = load_settings(
        preset="tiny", set_options=[f"model.name={tiny_model_dir}", "train.steps=3"]
    )
    step = train.Trainer.step

    def damaged_latents(self: train.Trainer, number: int) -> dict[str, float]:
        if number == 0:  # what a flipped exponent bit in a latents file reads as
            self.latents[0][0, 0, 0, 0] = float("nan")
        return step(self, number)

    monkeypatch.setattr(train.Trainer, "step", damaged_latents)
    with pytest.raises(train.TrainingDivergedError) as info:
        train_motion([clips_dir / "dolly.mp4"], "bad", settings, Store(tmp_path))
    message = str(info.value)
    assert "dolly.mp4" in message and "NaN or inf" in message
    assert "prepare CLIPS --rebuild" in message and "lower --lr" not in message


def test_a_divergence_before_the_first_checkpoint_does_not_offer_resume(
    clips_dir: Path, tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from motionsep import train

    settings = load_settings(
        preset="tiny",
        set_options=[f"model.name={tiny_model_dir}", "train.steps=6", "train.checkpoint_every=5"],
    )
    _blow_up_at(monkeypatch, 1)
    with pytest.raises(train.TrainingDivergedError) as info:
        train_motion([clips_dir / "dolly.mp4"], "early", settings, Store(tmp_path))
    message = str(info.value)
    assert "lower --lr" in message and "no checkpoint was written yet" in message
    assert "--resume continues" not in message


def _tiny_trainer(skip_spatial: float) -> train.Trainer:
    """A Trainer on the tiny model's random weights, one random clip, AdamW at lr 1e-2."""
    from accelerate import Accelerator
    from diffusers import DDIMScheduler

    from motionsep import train
    from motionsep.model import lora, tap
    from motionsep.model.components import SCHEDULER_CONFIG, Components, build_tiny_components

    settings = load_settings(preset="tiny", set_options=[f"train.spatial_skip_prob={skip_spatial}"])
    parts = build_tiny_components()
    unet = parts["unet"]
    torch.manual_seed(0)
    tap.inject_motion_lora(unet, settings.lora.recipe, settings.lora.rank)
    tap.inject_spatial_lora(unet, settings.lora.spatial_rank)
    unet.train()
    params = [
        p
        for a in (tap.MOTION_ADAPTER, tap.SPATIAL_ADAPTER)
        for p in lora.adapter_parameters(unet, a)
    ]
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    accelerator = Accelerator(cpu=True)
    components = Components(
        unet=unet,
        vae=parts["vae"],
        text_encoder=None,
        tokenizer=None,
        scheduler=DDIMScheduler(**SCHEDULER_CONFIG),
        path=Path(),
    )
    frames = settings.data.frames
    return train.Trainer(
        settings=settings,
        components=components,
        dataset=None,  # type: ignore[arg-type]
        spatial_adapters=[tap.SPATIAL_ADAPTER],
        optimizer=accelerator.prepare_optimizer(optimizer),
        scheduler=torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0),
        accelerator=accelerator,
        latents=[torch.randn(4, frames, 16, 16)],
        prompts=[torch.randn(77, 32)],
    )


def _grads(trainer: train.Trainer, adapter: str) -> list[torch.Tensor | None]:
    from motionsep.model import lora

    unet = trainer.components.unet
    return [
        None if p.grad is None else p.grad.clone() for p in lora.adapter_parameters(unet, adapter)
    ]


def test_each_path_of_the_dual_path_step_updates_only_its_own_lora() -> None:
    """The spatial path (one frame, motion LoRA off) trains the spatial LoRA alone; the
    temporal path (the whole clip, spatial LoRA frozen) trains the motion LoRA alone."""
    from motionsep.model import tap

    trainer = _tiny_trainer(skip_spatial=0.0)
    seen: list[dict[str, list[torch.Tensor | None]]] = []
    backward = trainer.accelerator.backward

    def recording_backward(loss: torch.Tensor) -> None:
        backward(loss)
        seen.append({a: _grads(trainer, a) for a in (tap.MOTION_ADAPTER, tap.SPATIAL_ADAPTER)})

    trainer.accelerator.backward = recording_backward
    losses = trainer.step(0)
    assert set(losses) == {"loss", "loss_spatial", "loss_temporal"}
    spatial_pass, temporal_pass = seen
    assert all(g is None or not g.any() for g in spatial_pass[tap.MOTION_ADAPTER])
    assert any(g is not None and g.any() for g in spatial_pass[tap.SPATIAL_ADAPTER])
    assert any(g is not None and g.any() for g in temporal_pass[tap.MOTION_ADAPTER])
    # the temporal backward adds nothing to the spatial LoRA's gradients
    for before, after in zip(
        spatial_pass[tap.SPATIAL_ADAPTER], temporal_pass[tap.SPATIAL_ADAPTER], strict=True
    ):
        assert (before is None and after is None) or torch.equal(before, after)


def test_a_skipped_spatial_path_leaves_the_spatial_lora_as_it_was() -> None:
    from motionsep.model import lora, tap

    trainer = _tiny_trainer(skip_spatial=1.0)
    unet = trainer.components.unet
    spatial = [p.detach().clone() for p in lora.adapter_parameters(unet, tap.SPATIAL_ADAPTER)]
    motion = [p.detach().clone() for p in lora.adapter_parameters(unet, tap.MOTION_ADAPTER)]
    losses = trainer.step(0)
    assert "loss_spatial" not in losses and losses["loss"] == losses["loss_temporal"]
    after_spatial = lora.adapter_parameters(unet, tap.SPATIAL_ADAPTER)
    assert all(torch.equal(a, b) for a, b in zip(spatial, after_spatial, strict=True))
    after_motion = lora.adapter_parameters(unet, tap.MOTION_ADAPTER)
    assert any(not torch.equal(a, b) for a, b in zip(motion, after_motion, strict=True))


def test_report_to_tensorboard_logs_losses_per_path_lr_speed_and_previews(
    clips_dir: Path, tiny_model_dir: Path, tmp_path: Path
) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    settings = load_settings(
        preset="tiny",
        set_options=[
            f"model.name={tiny_model_dir}",
            "train.steps=4",
            "train.preview_every=2",
            "train.report_to=tensorboard",
            "train.spatial_skip_prob=0",
        ],
    )
    store = Store(tmp_path)
    train_motion([clips_dir / "dolly.mp4"], "tracked", settings, store)
    events = sorted((tmp_path / "logs" / "tracked").rglob("events.out.tfevents.*"))
    assert events, "no TensorBoard event file"
    scalars: dict[str, list[int]] = {}
    images: list[str] = []
    for file in events:
        run = EventAccumulator(str(file), size_guidance={"images": 0, "scalars": 0})
        run.Reload()
        for tag in run.Tags()["scalars"]:
            scalars[tag] = [event.step for event in run.Scalars(tag)]
        images += run.Tags()["images"]
    for tag in ("train/loss_temporal", "train/loss_spatial", "train/lr", "train/steps_per_second"):
        assert scalars.get(tag) == [1, 2, 3, 4], tag
    assert "preview" in images


def test_a_missing_tracker_package_is_named_with_its_install_command(
    clips_dir: Path, tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import importlib.util

    from motionsep.errors import UsageError

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a)
    )
    settings = load_settings(
        preset="tiny", set_options=[f"model.name={tiny_model_dir}", "train.report_to=wandb"]
    )
    with pytest.raises(UsageError, match=r"motionsep\[wandb\]"):
        train_motion([clips_dir / "dolly.mp4"], "w", settings, Store(tmp_path))
    assert not (tmp_path / "motions").exists() or not any((tmp_path / "motions").iterdir())


def test_the_temporal_loss_is_the_plain_loss_plus_the_debiased_term_by_hand() -> None:
    """loss_temporal = MSE(pred, noise) + MSE(a*pred - b*pred[f], a*noise - b*noise[f]) for the
    step's anchor frame f, recomputed here from the U-Net's own input and output; the base
    weights never change."""
    import math

    from motionsep.model import lora, tap

    trainer = _tiny_trainer(skip_spatial=1.0)  # the temporal path alone
    unet = trainer.components.unet
    base = {n: p.detach().clone() for n, p in unet.named_parameters() if "lora_" not in n}
    seen: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def keep(module: Any, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
        seen.append((args[0].detach(), args[1].detach(), output.sample.detach().float()))

    handle = unet.register_forward_hook(keep, with_kwargs=True)
    try:
        losses = trainer.step(0)
    finally:
        handle.remove()
    ((noisy, timestep, pred),) = seen
    alphas = trainer.components.scheduler.alphas_cumprod[timestep].view(-1, 1, 1, 1, 1)
    latents = trainer.latents[0].unsqueeze(0).float()
    noise = (noisy.float() - alphas.sqrt() * latents) / (1 - alphas).sqrt()
    a, b = trainer.settings.train.debias_alpha, trainer.settings.train.debias_beta
    plain = float(((pred - noise) ** 2).mean())
    by_anchor = [
        plain
        + float(
            ((a * pred - b * pred[:, :, f : f + 1]) - (a * noise - b * noise[:, :, f : f + 1]))
            .pow(2)
            .mean()
        )
        for f in range(noise.shape[2])
    ]
    assert any(math.isclose(losses["loss_temporal"], v, rel_tol=1e-4) for v in by_anchor)
    assert not math.isclose(losses["loss_temporal"], plain, rel_tol=1e-3)
    after = {n: p for n, p in unet.named_parameters() if "lora_" not in n}
    assert all(torch.equal(base[n], after[n]) for n in base)  # the base model never trains
    assert lora.adapter_parameters(unet, tap.MOTION_ADAPTER)  # (the LoRA did, above)
