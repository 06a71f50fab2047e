"""AnimateDiff interop: diffusers' AnimateDiffPipeline, diffusers LoRAs, AnimateDiff MotionLoRAs.

The reference side is always diffusers itself (``AnimateDiffPipeline`` built
from the model folder, ``load_lora_weights``) or a hand-written peft
injection, never motionsep's own code. MotionLoRA files are written here in
AnimateDiff's original key layout by a mapping spelled out in this file.
"""

from __future__ import annotations

import pickle
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from typer.testing import CliRunner

from motionsep.config import Recipe
from motionsep.errors import UsageError
from motionsep.model import lora, motion, recipes, tap
from motionsep.model.components import check_model_folder, load_unet, unet_config_hash
from motionsep.model.interop import NamedLora, convert_named, unet_skeleton
from motionsep.sample import generate_videos
from motionsep_cli.app import app

RANK = 4
ALPHA = 8.0  # not the rank: the exported metadata must carry it
SEED = 3
PROMPT = "a red car"
SAMPLE = {"steps": 3, "guidance": 6.0, "width": 16, "height": 16, "frames": 4, "seed": SEED}

# Every temporal attention projection and ff layer of a motion module, by name.
MOTION_LAYER = re.compile(
    r"^(?:(?:down|up)_blocks\.\d+|mid_block)\.motion_modules\.\d+\.transformer_blocks\.0\."
    r"(?P<layer>attn[12]\.(?:to_q|to_k|to_v|to_out\.0)|ff\.net\.0\.proj|ff\.net\.2)$"
)
RECIPE_LAYERS = {
    "paper": {"attn1.to_k", "attn2.to_k"},
    "reference": {"attn1.to_k", "attn1.to_out.0", "attn2.to_k", "attn2.to_out.0"},
    "motiondirector": {
        f"{attention}.{projection}"
        for attention in ("attn1", "attn2")
        for projection in ("to_q", "to_k", "to_v", "to_out.0")
    }
    | {"ff.net.0.proj", "ff.net.2"},
}

runner = CliRunner()


def pipeline(model_dir: Path) -> Any:
    from diffusers import AnimateDiffPipeline, DDIMScheduler

    pipe = AnimateDiffPipeline.from_pretrained(model_dir)
    assert isinstance(pipe.scheduler, DDIMScheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def pipeline_video(
    pipe: Any, negative_prompt: str | None = None
) -> tuple[torch.Tensor, np.ndarray]:
    """The pipeline's final latents and its frames in [0, 1] ``(F, H, W, 3)``, decoded its way."""
    latents = pipe(
        PROMPT,
        negative_prompt=negative_prompt,
        num_frames=SAMPLE["frames"],
        height=SAMPLE["height"],
        width=SAMPLE["width"],
        num_inference_steps=SAMPLE["steps"],
        guidance_scale=SAMPLE["guidance"],
        # motionsep's documented seeding: one CPU generator per video, seeded with the seed
        generator=torch.Generator("cpu").manual_seed(SEED),
        output_type="latent",
    ).frames
    with torch.no_grad():
        video = pipe.decode_latents(latents, decode_chunk_size=16)
    frames = pipe.video_processor.postprocess_video(video=video, output_type="np")
    return latents[0], np.asarray(frames[0])


def assert_same_frames(frames_uint8: np.ndarray, frames_01: np.ndarray, tolerance: float) -> None:
    """motionsep writes 8-bit frames: equal to the float frames up to rounding and ``tolerance``."""
    assert frames_uint8.shape == frames_01.shape
    difference = np.abs(frames_uint8.astype(np.float64) / 255.0 - frames_01.astype(np.float64))
    assert difference.max() <= 0.5 / 255.0 + tolerance
    assert (np.round(frames_01 * 255.0).astype(np.uint8) != frames_uint8).mean() < 1e-3


def random_state(names: list[str], shapes: dict[str, tuple[int, int]], seed: int) -> dict:
    """Nonzero LoRA tensors per module: ``{name: (down (r, in), up (out, r))}``."""
    generator = torch.Generator().manual_seed(seed)
    return {
        name: (
            torch.randn(RANK, shapes[name][0], generator=generator) * 0.3,
            torch.randn(shapes[name][1], RANK, generator=generator) * 0.3,
        )
        for name in names
    }


def linear_shapes(unet: nn.Module) -> dict[str, tuple[int, int]]:
    return {
        name: (m.in_features, m.out_features)
        for name, m in unet.named_modules()
        if isinstance(m, nn.Linear)
    }


def save_ad_package(
    folder: Path, model_dir: Path, recipe: Recipe, *, alpha: float = ALPHA, seed: int = 0
) -> Path:
    """A motion package on tiny-animatediff with nonzero random LoRA weights."""
    unet = load_unet(model_dir)
    torch.manual_seed(seed)
    targets = recipes.motion_lora_targets(unet, recipe)
    injection = lora.inject_lora(unet, targets, RANK, alpha=alpha, adapter_name=tap.MOTION_ADAPTER)
    with torch.no_grad():
        for param in lora.adapter_parameters(unet, tap.MOTION_ADAPTER):
            param.normal_(std=0.3)
    metadata = motion.MotionMetadata(
        recipe=recipe,
        lora_targets=list(injection.adapted),
        lora_rank=RANK,
        lora_alpha=alpha,
        base_model=motion.BaseModelRecord(
            id=str(model_dir),
            revision=None,
            unet_config_hash=unet_config_hash(dict(unet.config)),
            family="animatediff",
        ),
        settings={"sample": SAMPLE},
    )
    return motion.save_motion(folder, lora.adapter_state_dict(unet), metadata)


def invoke(*args: str) -> Any:
    return runner.invoke(app, list(args))


def store_is_empty(home: Path) -> bool:
    return not (home / "motions").exists() or not any((home / "motions").iterdir())


def original_key(module: str, direction: str) -> str:
    """A U-Net module name as AnimateDiff's MotionLoRA names its LoRA tensor (see DESIGN 3b)."""
    match = re.fullmatch(
        r"(?P<head>.+\.motion_modules\.\d+)\.transformer_blocks\.0\.attn(?P<n>[12])\."
        r"(?P<projection>to_q|to_k|to_v|to_out)(?:\.0)?",
        module,
    )
    assert match is not None, module
    block = int(match["n"]) - 1  # attn1 is attention_blocks.0, attn2 attention_blocks.1
    return (
        f"{match['head']}.temporal_transformer.transformer_blocks.0.attention_blocks.{block}"
        f".processor.{match['projection']}_lora.{direction}.weight"
    )


def unet_inputs(unet: nn.Module) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return {
        "sample": torch.randn(1, 4, 4, 8, 8, generator=generator),
        "timestep": torch.tensor(300),
        "encoder_hidden_states": torch.randn(
            1, 6, unet.config.cross_attention_dim, generator=generator
        ),
    }


def run_unet(unet: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return unet(**unet_inputs(unet)).sample


# ---------------------------------------------------------------------------
# the sampler


def test_animatediff_sampler_equals_the_animatediff_pipeline(tiny_animatediff_dir: Path) -> None:
    from motionsep.config import load_settings

    settings = load_settings(
        overrides={
            "model": {"name": str(tiny_animatediff_dir), "dtype": "fp32", "device": "cpu"},
            "sample": {**SAMPLE, "negative_prompt": "blurry"},
        }
    )
    from motionsep.model.components import load_components
    from motionsep.sample import decode_pixels

    video = generate_videos([PROMPT], settings)[0]
    latents, frames = pipeline_video(pipeline(tiny_animatediff_dir), negative_prompt="blurry")
    assert float((video.latents - latents).abs().max()) <= 1e-5
    # motionsep's own decode, before it rounds to 8 bits: the pipeline's frames in [0, 1]
    vae = load_components(tiny_animatediff_dir).vae
    pixels = decode_pixels(vae, video.latents[None], frames_per_call=16)[0]
    ours = (pixels / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    assert np.abs(ours - frames).max() <= 1e-5
    assert_same_frames(video.frames, frames, 1e-5)


# ---------------------------------------------------------------------------
# export --format diffusers


def test_animatediff_diffusers_export_draws_what_generate_draws(
    tiny_animatediff_dir: Path, store_home: Path, tmp_path: Path
) -> None:
    save_ad_package(store_home / "motions" / "ad-car", tiny_animatediff_dir, Recipe.REFERENCE)
    exported = tmp_path / "ad-car-lora"
    result = invoke("motions", "export", "ad-car", "--format", "diffusers", "--out", str(exported))
    assert result.exit_code == 0, result.stderr
    assert result.stdout.strip() == str(exported)

    out = tmp_path / "frames"
    result = invoke(
        "generate", "--motion", "ad-car", "--no-highway", "--format", "png",
        "--out", str(out), "--seed", str(SEED), PROMPT,
    )  # fmt: skip
    assert result.exit_code == 0, result.stderr
    drawn = np.stack(
        [np.asarray(Image.open(p)) for p in sorted(Path(result.stdout.strip()).glob("*.png"))]
    )

    pipe = pipeline(tiny_animatediff_dir)
    _, base = pipeline_video(pipe)
    pipe.load_lora_weights(exported, adapter_name="ad-car")
    _, with_lora = pipeline_video(pipe)
    assert_same_frames(drawn, with_lora, 1e-4)
    # the LoRA (at alpha / r = 2, from the metadata) does change the pipeline's video
    assert np.abs(with_lora - base).max() > 0.05


def test_diffusers_export_is_animatediff_only_and_names_the_zeroscope_formats(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    unet = load_unet(tiny_model_dir)
    injection = tap.inject_motion_lora(unet, Recipe.REFERENCE, RANK)
    metadata = motion.MotionMetadata(
        recipe=Recipe.REFERENCE,
        lora_targets=list(injection.adapted),
        lora_rank=RANK,
        lora_alpha=float(RANK),
        base_model=motion.BaseModelRecord(
            id=str(tiny_model_dir),
            revision=None,
            unet_config_hash=unet_config_hash(dict(unet.config)),
        ),
    )
    package = motion.save_motion(tmp_path / "zs", lora.adapter_state_dict(unet), metadata)
    out = tmp_path / "zs-lora"
    result = invoke("motions", "export", str(package), "--format", "diffusers", "-o", str(out))
    assert result.exit_code == 2
    message = " ".join(result.stderr.split())
    assert "AnimateDiff motions" in message and "TextToVideoSDPipeline" in message
    assert "--format peft" in message and "--format upstream" in message
    assert not out.exists()


def test_upstream_export_is_zeroscope_only_and_names_the_animatediff_formats(
    tiny_animatediff_dir: Path, tmp_path: Path
) -> None:
    package = save_ad_package(tmp_path / "ad", tiny_animatediff_dir, Recipe.REFERENCE)
    out = tmp_path / "ad.safetensors"
    result = invoke("motions", "export", str(package), "--format", "upstream", "-o", str(out))
    assert result.exit_code == 2
    message = " ".join(result.stderr.split())
    assert "ZeroScope" in message and "--format diffusers" in message
    assert not out.exists()


# ---------------------------------------------------------------------------
# import


def test_animatediff_diffusers_lora_imports_back_with_its_alpha(
    tiny_animatediff_dir: Path, store_home: Path, tmp_path: Path
) -> None:
    original = motion.load_motion(
        save_ad_package(tmp_path / "orig", tiny_animatediff_dir, Recipe.PAPER, seed=1)
    )
    exported = tmp_path / "lora"
    assert invoke("motions", "export", str(original.path), "--format", "diffusers", "-o",
                  str(exported)).exit_code == 0  # fmt: skip
    result = invoke(
        "motions", "import", str(exported), "--name", "back", "--model", str(tiny_animatediff_dir),
        "--json",
    )  # fmt: skip
    assert result.exit_code == 0, result.stderr
    assert '"format": "diffusers"' in result.stdout and '"recipe": "paper"' in result.stdout
    back = motion.load_motion(store_home / "motions" / "back")
    assert (back.metadata.lora_rank, back.metadata.lora_alpha) == (RANK, ALPHA)
    assert back.metadata.lora_targets == original.metadata.lora_targets
    assert back.adapter_state.keys() == original.adapter_state.keys()
    for key, tensor in original.adapter_state.items():
        assert torch.equal(back.adapter_state[key], tensor)


@pytest.mark.parametrize("mid_block", [True, False], ids=["with-mid-block", "without-mid-block"])
def test_animatediff_motionlora_changes_the_output_as_the_tensors_injected_by_hand(
    mid_block: bool,
    tiny_animatediff_dir: Path,
    tiny_animatediff_unet: nn.Module,
    store_home: Path,
    tmp_path: Path,
) -> None:
    from peft import LoraConfig, inject_adapter_in_model

    unet = tiny_animatediff_unet
    base = run_unet(unet)
    names = [
        name
        for name, _ in unet.named_modules()
        if (match := MOTION_LAYER.match(name)) and not match["layer"].startswith("ff")
        if mid_block or not name.startswith("mid_block.")
    ]
    tensors = random_state(names, linear_shapes(unet), seed=2)
    source = tmp_path / "v2_lora_Car.ckpt"
    state = {
        original_key(name, direction): tensor
        for name, (down, up) in tensors.items()
        for direction, tensor in (("down", down), ("up", up))
    }
    torch.save({"state_dict": state, "animatediff_config": "motion lora"}, source)

    result = invoke("motions", "import", str(source), "--name", "car",
                    "--model", str(tiny_animatediff_dir))  # fmt: skip
    assert result.exit_code == 0, result.stderr
    notes = " ".join(result.stderr.split())
    assert "motiondirector" in notes and "ff layers" in notes
    assert ("mid block" in notes) is not mid_block
    imported = motion.load_motion(store_home / "motions" / "car")
    by_motionsep = load_unet(tiny_animatediff_dir)
    motion.apply_motion(by_motionsep, imported)

    config = LoraConfig(r=RANK, lora_alpha=RANK, target_modules=names, init_lora_weights=False)
    inject_adapter_in_model(config, unet, adapter_name="hand")
    with torch.no_grad():
        for name, (down, up) in tensors.items():
            layer = unet.get_submodule(name)
            layer.lora_A["hand"].weight.copy_(down)
            layer.lora_B["hand"].weight.copy_(up)
    by_hand = run_unet(unet)
    assert float((by_hand - base).abs().max()) > 1e-2
    assert torch.allclose(run_unet(by_motionsep), by_hand, rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    ("projections", "recipe"),
    [
        (("to_k",), "paper"),
        (("to_k", "to_out.0"), "reference"),
        (("to_q", "to_k", "to_v", "to_out.0"), "motiondirector"),
        (("to_q", "to_v"), None),
    ],
)
def test_animatediff_layout_recipe_follows_its_projections(
    projections: tuple[str, ...], recipe: str | None, tiny_animatediff_dir: Path
) -> None:
    unet = unet_skeleton(check_model_folder(tiny_animatediff_dir))
    names = [
        name
        for name, _ in unet.named_modules()
        if (match := MOTION_LAYER.match(name)) and match["layer"].split(".", 1)[1] in projections
    ]
    shapes = linear_shapes(unet)
    modules = {
        name: {"A": torch.zeros(RANK, shapes[name][0]), "B": torch.zeros(shapes[name][1], RANK)}
        for name in names
    }
    named = NamedLora(modules=modules, alpha=None, layout="animatediff")
    if recipe is None:
        with pytest.raises(UsageError, match="no recipe's set") as info:
            convert_named(named, unet)
        assert "to_k (paper)" in (info.value.hint or "")
        return
    converted = convert_named(named, unet)
    assert converted.recipe.value == recipe
    assert set(converted.targets) == set(names)
    assert converted.alpha == RANK


def test_animatediff_and_zeroscope_loras_are_refused_on_each_others_base(
    tiny_animatediff_dir: Path,
    tiny_model_dir: Path,
    tiny_animatediff_unet: nn.Module,
    store_home: Path,
    tmp_path: Path,
) -> None:
    names = [n for n, _ in tiny_animatediff_unet.named_modules() if MOTION_LAYER.match(n)]
    names = [n for n in names if ".ff." not in n]
    tensors = random_state(names, linear_shapes(tiny_animatediff_unet), seed=4)
    source = tmp_path / "v2_lora_Car.ckpt"
    torch.save({original_key(n, "down"): d for n, (d, _) in tensors.items()}
               | {original_key(n, "up"): u for n, (_, u) in tensors.items()}, source)  # fmt: skip
    result = invoke("motions", "import", str(source), "--name", "x", "--model", str(tiny_model_dir))
    assert result.exit_code == 2
    message = " ".join(result.stderr.split())
    assert "is a LoRA for AnimateDiff" in message and "base model is ZeroScope" in message
    assert store_is_empty(store_home)

    zeroscope = save_zeroscope_package(tmp_path / "zs", tiny_model_dir)
    adapter = tmp_path / "zs-peft"
    assert invoke("motions", "export", str(zeroscope), "--format", "peft", "-o",
                  str(adapter)).exit_code == 0  # fmt: skip
    result = invoke(
        "motions", "import", str(adapter), "--name", "y", "--model", str(tiny_animatediff_dir)
    )
    assert result.exit_code == 2
    message = " ".join(result.stderr.split())
    assert "is a LoRA for ZeroScope" in message and "base model is AnimateDiff" in message
    assert store_is_empty(store_home)


def save_zeroscope_package(folder: Path, model_dir: Path) -> Path:
    unet = load_unet(model_dir)
    injection = tap.inject_motion_lora(unet, Recipe.PAPER, RANK)
    metadata = motion.MotionMetadata(
        recipe=Recipe.PAPER,
        lora_targets=list(injection.adapted),
        lora_rank=RANK,
        lora_alpha=float(RANK),
        base_model=motion.BaseModelRecord(
            id=str(model_dir), revision=None, unet_config_hash=unet_config_hash(dict(unet.config))
        ),
    )
    return motion.save_motion(folder, lora.adapter_state_dict(unet), metadata)


class _Payload:
    """A pickled object whose unpickling would create a file: never unpickled by import."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (Path.touch, (self.marker,))


def test_animatediff_ckpt_with_code_is_refused_without_running_it(
    tiny_animatediff_dir: Path, store_home: Path, tmp_path: Path
) -> None:
    marker = tmp_path / "ran"
    source = tmp_path / "v2_lora_Evil.ckpt"
    with source.open("wb") as handle:
        pickle.dump({"state_dict": {"x": _Payload(marker)}}, handle, protocol=2)
    for fmt in ("auto", "animatediff"):
        result = invoke("motions", "import", str(source), "--name", "evil",
                        "--model", str(tiny_animatediff_dir), "--format", fmt)  # fmt: skip
        assert result.exit_code == 2
        assert "refused by torch.load(weights_only=True)" in " ".join(result.stderr.split())
    assert not marker.exists()
    assert store_is_empty(store_home)


# ---------------------------------------------------------------------------
# what each recipe adapts


@pytest.mark.parametrize("recipe", list(Recipe), ids=[r.value for r in Recipe])
def test_animatediff_motion_holds_lora_only_on_its_recipes_motion_module_layers(
    recipe: Recipe, tiny_animatediff_unet: nn.Module
) -> None:
    unet = tiny_animatediff_unet
    tap.inject_motion_lora(unet, recipe, RANK)
    state = lora.adapter_state_dict(unet)
    held = {key.rsplit(".lora_", 1)[0] for key in state}
    assert all(key.endswith((".lora_A.weight", ".lora_B.weight")) for key in state)

    motion_modules = {
        name for name, m in unet.named_modules() if type(m).__name__ == "AnimateDiffTransformer3D"
    }
    expected = {
        name
        for name, _ in unet.named_modules()
        if (match := MOTION_LAYER.match(name)) and match["layer"] in RECIPE_LAYERS[recipe.value]
    }
    assert held == expected
    # every motion module (down, mid and up) is adapted, and nothing outside them
    assert {name.split(".transformer_blocks.")[0] for name in held} == motion_modules
    assert any(name.startswith("mid_block.") for name in held)
    assert len(held) == len(motion_modules) * len(RECIPE_LAYERS[recipe.value])
