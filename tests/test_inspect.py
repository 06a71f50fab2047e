"""``inspect-attention``: the recording processor, the base/motion comparison, plots, memory.

Everything runs on the tiny model at 16x16 pixels (8x8 latents), 4 frames and
3 DDIM steps. Motion packages: a zero-initialised paper LoRA (peft's Gaussian
init: up weights zero, so the motion computes exactly the base model) and the
same LoRA after a few AdamW steps of the denoising loss (tiny preset rate).
"""

from __future__ import annotations

import importlib.util
import json
import multiprocessing
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from motionsep.config import Recipe
from motionsep.errors import UsageError
from motionsep.inspect import (
    PLOT_BOTTOM,
    PLOT_CELL,
    PLOT_LEFT,
    PLOT_RIGHT,
    PLOT_TOP,
    AttentionInspection,
    inspect_attention,
    kl_divergence,
    parse_steps,
    save_inspection,
)
from motionsep.model import lora, motion, tap
from motionsep.model.attention import (
    RecordingAttnProcessor,
    match_layers,
    record_temporal_attention,
    temporal_attention_names,
)
from motionsep.model.components import Components, load_components, load_unet, unet_config_hash
from motionsep.sample import generation_settings
from motionsep_cli.app import app

RANK = 4
SIZE = 16
FRAMES = 4
STEPS = 3
PROMPT = "a wolf on a snowy mountain"
PROJECT_ROOT = Path(__file__).resolve().parents[1]

runner = CliRunner()


def _trained_settings(model_dir: Path) -> dict[str, Any]:
    return {
        "model": {"name": str(model_dir), "dtype": "fp32"},
        "lora": {"recipe": "paper", "rank": RANK},
        "sample": {
            "steps": STEPS,
            "guidance": 6.0,
            "width": SIZE,
            "height": SIZE,
            "frames": FRAMES,
        },
    }


def _train_a_few_steps(unet: Any, steps: int = 4) -> None:
    """AdamW steps (tiny preset rate) of the denoising loss on a clip whose content moves."""
    from diffusers import DDIMScheduler

    from motionsep.model.components import SCHEDULER_CONFIG

    scheduler = DDIMScheduler(**SCHEDULER_CONFIG)
    generator = torch.Generator().manual_seed(1)
    base = torch.randn((1, 4, 1, SIZE // 2, SIZE // 2), generator=generator)
    # A pattern sliding one latent cell per frame: something temporal to learn.
    clip = torch.cat([torch.roll(base, shifts=f, dims=-1) for f in range(FRAMES)], dim=2)
    text = torch.randn((1, 77, 32), generator=generator)
    params = lora.adapter_parameters(unet, tap.MOTION_ADAPTER)
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    for _ in range(steps):
        noise = torch.randn(clip.shape, generator=generator)
        t = torch.randint(0, 1000, (1,), generator=generator)
        noisy = scheduler.add_noise(clip, noise, t)
        loss = torch.nn.functional.mse_loss(
            unet(noisy, t, encoder_hidden_states=text).sample, noise
        )
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def _save_package(folder: Path, model_dir: Path, *, trained: bool) -> Path:
    unet = load_unet(model_dir)
    torch.manual_seed(0)
    injection = tap.inject_motion_lora(unet, Recipe.PAPER, RANK)
    if trained:
        _train_a_few_steps(unet)
    metadata = motion.MotionMetadata(
        recipe=Recipe.PAPER,
        lora_targets=list(injection.adapted),
        lora_rank=injection.rank,
        lora_alpha=injection.alpha,
        base_model=motion.BaseModelRecord(
            id=str(model_dir), revision=None, unet_config_hash=unet_config_hash(dict(unet.config))
        ),
        settings=_trained_settings(model_dir),
    )
    return motion.save_motion(folder, lora.adapter_state_dict(unet), metadata)


@pytest.fixture(scope="module")
def packages(
    tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, motion.MotionPackage]:
    root = tmp_path_factory.mktemp("inspect_motions")
    return {
        name: motion.load_motion(
            _save_package(root / name, tiny_model_dir, trained=name == "trained")
        )
        for name in ("zero", "trained")
    }


@pytest.fixture(scope="module")
def components(tiny_model_dir: Path) -> Components:
    return load_components(tiny_model_dir)


def _inspect(
    package: motion.MotionPackage, components: Components, *set_options: str, **kwargs: Any
) -> AttentionInspection:
    settings = generation_settings(package, set_options=list(set_options))
    return inspect_attention(PROMPT, settings, package, components=components, **kwargs)


def _forward(unet: Any, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    sample = torch.randn((2, 4, FRAMES, 8, 8), generator=generator)
    text = torch.randn((2, 77, 32), generator=generator)
    with torch.no_grad():
        return unet(sample, 500, encoder_hidden_states=text).sample


# ---------------------------------------------------------------------------
# the recording processor


def test_recorder_gives_stock_outputs_and_restores_the_processors(tiny_model_dir: Path) -> None:
    unet = load_unet(tiny_model_dir)
    tap.inject_motion_lora(unet, Recipe.PAPER, RANK)
    with torch.no_grad():
        for param in lora.adapter_parameters(unet, tap.MOTION_ADAPTER):
            param.normal_(std=0.3)
    before = dict(unet.attn_processors)
    stock = _forward(unet)
    names = temporal_attention_names(unet)
    assert len(names) == 34 and names[0].startswith("transformer_in.")
    with record_temporal_attention(unet, conditional_half=True) as recorder:
        recorder.step = 0
        recorded = _forward(unet)
        installed = unet.attn_processors
        temporal = {f"{name}.processor" for name in names}
        assert all(isinstance(installed[key], RecordingAttnProcessor) for key in temporal)
        assert all(installed[key] is before[key] for key in before if key not in temporal)
    assert torch.equal(recorded, stock), "the recorder must not change the U-Net's output"
    after = unet.attn_processors
    assert after.keys() == before.keys()
    assert all(after[key] is before[key] for key in before)
    assert len(recorder.stats) == 34

    with pytest.raises(RuntimeError, match="boom"), record_temporal_attention(unet):
        raise RuntimeError("boom")
    assert all(unet.attn_processors[key] is before[key] for key in before)


def test_recorded_map_is_the_mean_of_diffusers_own_probabilities(tiny_model_dir: Path) -> None:
    """Ground truth from the stock AttnProcessor's get_attention_scores, LoRA applied."""
    from diffusers.models.attention_processor import AttnProcessor

    unet = load_unet(tiny_model_dir)
    tap.inject_motion_lora(unet, Recipe.PAPER, RANK)
    with torch.no_grad():
        for param in lora.adapter_parameters(unet, tap.MOTION_ADAPTER):
            param.normal_(std=0.3)
    layer = "up_blocks.1.temp_attentions.0.transformer_blocks.0.attn1"
    module: Any = unet.get_submodule(layer)
    captured: list[torch.Tensor] = []
    scores = module.get_attention_scores

    def capture(query: torch.Tensor, key: torch.Tensor, mask: Any = None) -> torch.Tensor:
        probs = scores(query, key, mask)
        captured.append(probs)
        return probs

    original = module.processor
    module.set_processor(AttnProcessor())
    module.get_attention_scores = capture
    try:
        # A tiny chunk budget exercises the chunked accumulation too.
        with record_temporal_attention(
            unet, layers=[layer], conditional_half=True, chunk_elements=64
        ) as recorder:
            recorder.step = 0
            _forward(unet)
    finally:
        del module.get_attention_scores
        module.set_processor(original)
    (probs,) = captured  # (rows * heads, F, F), rows = batch * H * W, batch-major
    heads = module.heads
    per_row = probs.reshape(-1, heads, FRAMES, FRAMES)
    expected = per_row[per_row.shape[0] // 2 :].double().mean(dim=(0, 1))  # conditional half
    got = recorder.mean_maps()[(layer, 0)]
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)


def test_layer_patterns_and_step_lists() -> None:
    names = [
        "transformer_in.transformer_blocks.0.attn1",
        "down_blocks.0.temp_attentions.0.transformer_blocks.0.attn2",
        "up_blocks.1.temp_attentions.2.transformer_blocks.0.attn1",
    ]
    assert match_layers(names, "up_blocks.*") == names[2:]  # glob and regex alike
    assert match_layers(names, "*attn1") == [names[0], names[2]]  # a glob only
    assert match_layers(names, r"attn2$") == [names[1]]  # a regex only
    with pytest.raises(UsageError, match="matches none"):
        match_layers(names, "mid_block")
    assert parse_steps(None, 30) == [0, 15, 29]
    assert parse_steps("0, -1, 29", 30) == [0, 29]
    assert parse_steps("all", 3) == [0, 1, 2]
    with pytest.raises(UsageError, match="out of range"):
        parse_steps("30", 30)
    with pytest.raises(UsageError, match="comma-separated"):
        parse_steps("0;5", 30)


def test_kl_direction_and_epsilon() -> None:
    base = np.array([[0.5, 0.5], [0.5, 0.5]])
    motion_map = np.array([[1.0, 0.0], [0.5, 0.5]])
    assert kl_divergence(base, base) == 0.0
    # KL(motion || base): row 0 contributes ln 2, row 1 nothing; mean over rows.
    assert kl_divergence(motion_map, base) == pytest.approx(np.log(2) / 2, rel=1e-6)
    # The other direction meets a zero of the motion map: finite thanks to eps.
    assert np.isfinite(kl_divergence(base, motion_map))


# ---------------------------------------------------------------------------
# base vs motion


def test_zero_lora_gives_identical_maps_and_zero_kl(
    packages: dict[str, motion.MotionPackage], components: Components
) -> None:
    # The highway off in both runs: AH changes the up blocks' inputs, so it
    # would change their maps even with a LoRA that does nothing.
    inspection = _inspect(packages["zero"], components, "sample.highway=false", steps="all")
    rows = np.concatenate([inspection.base_maps, inspection.motion_maps]).sum(axis=-1)
    assert np.abs(rows - 1.0).max() < 1e-5
    assert np.array_equal(inspection.base_maps, inspection.motion_maps)
    entries = inspection.entries()
    assert len(entries) == 34 * STEPS
    assert all(entry["kl_motion_base"] == 0.0 for entry in entries)

    # With the recipe's highway on in the motion run, the first step's maps
    # before the up path are still the base model's; the up blocks' are not.
    with_highway = _inspect(packages["zero"], components, steps="0")
    assert with_highway.record["sample"]["highway"] is True
    for index, layer in enumerate(with_highway.layers):
        same = np.array_equal(with_highway.base_maps[index], with_highway.motion_maps[index])
        assert same == (not layer.startswith("up_blocks.")), layer


def test_trained_motion_changes_the_maps(
    packages: dict[str, motion.MotionPackage], components: Components
) -> None:
    inspection = _inspect(packages["trained"], components, "sample.highway=false")
    assert inspection.steps == (0, 1, 2)
    rows = np.concatenate([inspection.base_maps, inspection.motion_maps]).sum(axis=-1)
    assert np.abs(rows - 1.0).max() < 1e-5
    entries = inspection.entries()
    kls = np.array([entry["kl_motion_base"] for entry in entries])
    print(f"KL(motion || base) after 4 steps: min {kls.min():.3g}, max {kls.max():.3g}")
    assert (kls > 0).all()
    assert kls.max() > 1e-6
    assert not np.array_equal(inspection.base_maps, inspection.motion_maps)
    # The highway numbers exist for every rerouted skip (6 on the tiny U-Net) and step.
    assert len(inspection.highway) == 6 * 3
    assert all(-1.0 <= item.cosine["base"] <= 1.0 for item in inspection.highway)


def test_video_mode_noises_the_clip_with_the_same_noise(
    packages: dict[str, motion.MotionPackage], components: Components, tmp_path: Path
) -> None:
    from motionsep.video import write_video

    frames = np.zeros((8, SIZE * 2, SIZE * 2, 3), dtype=np.uint8)
    for f in range(8):
        frames[f, 8:20, 2 + 3 * f : 10 + 3 * f] = (230, 60, 20)
    clip = tmp_path / "square.mp4"
    write_video(frames, clip, fps=8)
    inspection = _inspect(packages["zero"], components, video=clip, steps="0,-1")
    assert inspection.mode == "video" and inspection.steps == (0, 2)
    # Every step is one U-Net call on the same noised clip in both runs: with a
    # zero LoRA only the highway (the up path) can differ, at every step.
    for index, layer in enumerate(inspection.layers):
        same = np.array_equal(inspection.base_maps[index], inspection.motion_maps[index])
        assert same == (not layer.startswith("up_blocks.")), layer


# ---------------------------------------------------------------------------
# files and the command line


def test_cli_writes_pngs_of_the_expected_size_and_a_summary(
    packages: dict[str, motion.MotionPackage], store_home: Path, tmp_path: Path
) -> None:
    motion.save_motion(
        store_home / "motions" / "wolfish",
        packages["trained"].adapter_state,
        packages["trained"].metadata,
    )
    out = tmp_path / "attn"
    args = ["inspect-attention", "--motion", "wolfish", PROMPT, "--out", str(out)]
    result = runner.invoke(app, [*args, "--layers", "up_blocks.1.*", "--steps", "0,-1", "--json"])
    assert result.exit_code == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["steps"] == [0, 2]
    layers = {entry["layer"] for entry in summary["layers"]}
    assert len(layers) == 6 and all(name.startswith("up_blocks.1.") for name in layers)
    for entry in summary["layers"]:
        assert set(entry["base"]) == {"entropy", "map_entropy", "diagonal"}
        assert entry["kl_motion_base"] >= 0
    assert "kl_motion_base" in summary["definitions"]
    assert json.loads((out / "summary.json").read_text())["layers"] == summary["layers"]
    expected = (PLOT_LEFT + 2 * PLOT_CELL + PLOT_RIGHT, PLOT_TOP + 6 * PLOT_CELL + PLOT_BOTTOM)
    for name in ("base", "motion", "difference"):
        path = Path(summary["files"][name])
        with Image.open(path) as image:
            image.load()
            assert image.format == "PNG"
            assert image.size == expected
    maps = np.load(out / "maps.npz")
    assert maps["base"].shape == (6, 2, FRAMES, FRAMES)

    before = {path: path.read_bytes() for path in out.iterdir()}
    again = runner.invoke(app, [*args, "--layers", "up_blocks.1.*", "--steps", "0"])
    assert again.exit_code == 2  # an earlier inspection is kept, before any work
    assert "already exists" in again.stderr and "--force" in again.stderr
    assert {path: path.read_bytes() for path in out.iterdir()} == before
    bad = runner.invoke(app, [*args, "--layers", "nothing_like_this", "--force"])
    assert bad.exit_code == 2
    assert "matches none" in bad.stderr


def test_save_inspection_writes_the_five_files(
    packages: dict[str, motion.MotionPackage], components: Components, tmp_path: Path
) -> None:
    inspection = _inspect(packages["zero"], components, layers="transformer_in.*", steps="0")
    files = save_inspection(inspection, tmp_path / "out")
    assert [path.name for path in files.paths()] == [
        "base.png",
        "motion.png",
        "difference.png",
        "summary.json",
        "maps.npz",
    ]
    assert all(path.is_file() for path in files.paths())
    from motionsep.errors import OutputExistsError

    before = {path: path.read_bytes() for path in files.paths()}
    with pytest.raises(OutputExistsError, match="already exists"):
        save_inspection(inspection, tmp_path / "out")
    assert {path: path.read_bytes() for path in files.paths()} == before
    save_inspection(inspection, tmp_path / "out", force=True)  # replaces its own five files
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(
        p.name for p in files.paths()
    )


# ---------------------------------------------------------------------------
# memory


def _measure(queue: Any, argv: list[str]) -> None:
    spec = importlib.util.spec_from_file_location(
        "inspect_memory", PROJECT_ROOT / "bench" / "inspect_memory.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    try:
        queue.put(module.main(argv))
    except BaseException as exc:
        queue.put({"error": repr(exc)})


def test_recording_every_layer_keeps_peak_memory_of_plain_sampling(
    tiny_model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Peak RSS of a forked child per mode (the peak counter reset after loading and warm-up).

    glibc's malloc thresholds are pinned in both children, so RSS follows live
    memory rather than the allocator's history. The resident baseline of a
    forked child (library pages touched) still wanders by tens of MB, so the
    peak is compared as the plain run's peak plus the difference of the two
    runs' working memory (peak minus RSS at the reset).
    """
    if "fork" not in multiprocessing.get_all_start_methods():
        pytest.skip("needs fork (Linux) to measure without re-importing torch")
    context = multiprocessing.get_context("fork")
    results = {}
    for mode in ("plain", "record"):
        queue = context.Queue()
        # 32x32, 12 frames: the same 124 MB of probabilities as 48x48 with 8 frames
        # (temporal attention grows with frames squared), in about 70 % of the time
        argv = ["--model", str(tiny_model_dir), "--mode", mode, "--size", "32", "--frames", "12"]
        process = context.Process(target=_measure, args=(queue, argv))
        process.start()
        results[mode] = queue.get(timeout=300)
        process.join(timeout=60)
        assert "error" not in results[mode], results[mode]
    plain, record = results["plain"], results["record"]
    with capsys.disabled():
        print(
            f"\npeak RSS: plain {plain['peak_rss_mb']:.0f} MB (working {plain['working_mb']:.0f}), "
            f"recording 34 layers x 3 steps {record['peak_rss_mb']:.0f} MB "
            f"(working {record['working_mb']:.0f}); keeping every probability would take "
            f"{record['naive_mb']:.0f} MB"
        )
    assert record["layers"] == 34 and record["recorded_steps"] == 3
    assert record["peak_reset"], "the peak counter could not be reset (not Linux?)"
    extra = record["working_mb"] - plain["working_mb"]
    assert plain["peak_rss_mb"] + extra <= 1.10 * plain["peak_rss_mb"]
    # The check can tell: keeping the probabilities instead of running sums
    # would need more than the 10% allowed.
    assert record["naive_mb"] > 0.10 * plain["peak_rss_mb"]
