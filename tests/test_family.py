"""The base-model family seam: which family a folder or U-Net is, and the AnimateDiff layout."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from motionsep.config import load_settings
from motionsep.errors import ModelFormatError
from motionsep.model import recipes
from motionsep.model.components import (
    check_model_folder,
    load_components,
    unet_config_hash,
)
from motionsep.model.family import (
    ANIMATEDIFF,
    MOTION_ADAPTER_FOLDER,
    ZEROSCOPE,
    folder_family,
    join_motion_unet,
    split_motion_unet,
)


def test_each_tiny_model_is_of_its_family(tiny_model_dir: Path, tiny_animatediff_dir: Path) -> None:
    assert folder_family(tiny_model_dir) is ZEROSCOPE
    assert folder_family(tiny_animatediff_dir) is ANIMATEDIFF
    components = load_components(tiny_animatediff_dir)
    assert type(components.unet).__name__ == "UNetMotionModel"
    assert components.family is ANIMATEDIFF
    index = json.loads((tiny_animatediff_dir / "model_index.json").read_text())
    assert index["_class_name"] == "AnimateDiffPipeline"
    assert index[MOTION_ADAPTER_FOLDER] == ["diffusers", "MotionAdapter"]


def test_animatediff_temporal_transformers_are_the_motion_modules(tiny_animatediff_unet) -> None:
    names = recipes.temporal_transformer_names(tiny_animatediff_unet)
    # 4 down blocks x 2 layers, one mid-block module, 4 up blocks x 3 layers
    assert len(names) == 8 + 1 + 12
    assert all(".motion_modules." in name for name in names)
    assert names[0] == "down_blocks.0.motion_modules.0"
    assert "mid_block.motion_modules.0" in names
    # the spatial LoRAs of dual-path training never touch a motion module
    spatial = recipes.spatial_lora_targets(tiny_animatediff_unet)
    assert spatial and not any(".motion_modules." in name for name in spatial)


def test_folder_config_hashes_like_the_loaded_animatediff_unet(tiny_animatediff_dir: Path) -> None:
    """What generate checks (the folder) and what train records (the model) must agree."""
    components = load_components(tiny_animatediff_dir)
    from_folder = check_model_folder(tiny_animatediff_dir)
    assert unet_config_hash(from_folder) == unet_config_hash(dict(components.unet.config))


def test_split_gives_back_the_unet_and_adapter_it_joined(tiny_animatediff_dir: Path) -> None:
    from diffusers import MotionAdapter, UNet2DConditionModel

    unet2d = UNet2DConditionModel.from_pretrained(tiny_animatediff_dir / "unet")
    adapter = MotionAdapter.from_pretrained(tiny_animatediff_dir / MOTION_ADAPTER_FOLDER)
    back2d, back_adapter = split_motion_unet(join_motion_unet(unet2d, adapter))
    for original, back in ((unet2d, back2d), (adapter, back_adapter)):
        theirs = back.state_dict()
        assert original.state_dict().keys() == theirs.keys()
        assert all(torch.equal(v, theirs[k]) for k, v in original.state_dict().items())
    assert dict(join_motion_unet(back2d, back_adapter).config) == dict(
        join_motion_unet(unet2d, adapter).config
    )


def test_motion_unet_takes_one_text_per_video(tiny_animatediff_unet) -> None:
    torch.manual_seed(0)
    latents = torch.randn(2, 4, 5, 8, 8)
    text = torch.randn(2, 77, 32)
    per_video = tiny_animatediff_unet(latents, 10, encoder_hidden_states=text).sample
    per_frame = tiny_animatediff_unet(
        latents, 10, encoder_hidden_states=text.repeat_interleave(5, dim=0)
    ).sample
    positional = tiny_animatediff_unet(latents, 10, text).sample
    assert torch.equal(per_video, per_frame)
    assert torch.equal(per_video, positional)
    # the two videos differ only by their text: each must get its own
    swapped = tiny_animatediff_unet(latents, 10, encoder_hidden_states=text.flip(0)).sample
    assert not torch.allclose(per_video[0], swapped[0])


def test_sd_folder_without_motion_adapter_is_refused(
    tiny_animatediff_dir: Path, tmp_path: Path
) -> None:
    copy = tmp_path / "sd"
    shutil.copytree(tiny_animatediff_dir, copy)
    shutil.rmtree(copy / MOTION_ADAPTER_FOLDER)
    with pytest.raises(ModelFormatError, match="motion adapter") as caught:
        check_model_folder(copy)
    assert "motionsep download animatediff" in (caught.value.hint or "")


def test_animatediff_preset_uses_the_family_defaults() -> None:
    settings = load_settings(preset="animatediff")
    assert settings.model.name == "animatediff"
    sample = settings.sample
    assert (sample.width, sample.height, sample.frames, sample.fps) == (
        ANIMATEDIFF.width,
        ANIMATEDIFF.height,
        ANIMATEDIFF.frames,
        ANIMATEDIFF.fps,
    )
    assert (settings.data.width, settings.data.height, settings.data.frames) == (
        ANIMATEDIFF.width,
        ANIMATEDIFF.height,
        ANIMATEDIFF.frames,
    )


def test_the_faster_dtype_lookup_gives_what_diffusers_gives(tiny_animatediff_dir: Path) -> None:
    """Every forward asks ``unet.dtype``; a wrong answer casts the time embedding wrongly."""
    from diffusers.models import modeling_utils

    from motionsep.model import dtype_lookup

    unet = load_components(tiny_animatediff_dir).unet  # loading installs the lookup
    assert modeling_utils.get_parameter_dtype is dtype_lookup.parameter_dtype
    diffusers_dtype = dtype_lookup._original
    assert diffusers_dtype is not None

    def both(module: torch.nn.Module) -> tuple[torch.dtype, torch.dtype]:
        return dtype_lookup.parameter_dtype(module), diffusers_dtype(module)

    assert both(unet) == (torch.float32, torch.float32)
    assert unet.dtype == torch.float32
    half = unet.half()
    assert both(half) == (torch.float16, torch.float16)
    # kept-in-fp32 modules are skipped: the first of them is conv_in, left in fp32
    half.conv_in.float()
    half._keep_in_fp32_modules = ["conv_in"]
    assert both(half) == (torch.float16, torch.float16)
    half._keep_in_fp32_modules = None
    assert both(half) == (torch.float32, torch.float32)
    # layerwise casting: stored in fp16, computed in fp32 (a hook deep inside)
    cast = load_components(tiny_animatediff_dir).unet
    cast.enable_layerwise_casting(storage_dtype=torch.float16, compute_dtype=torch.float32)
    assert both(cast) == (torch.float32, torch.float32)
    assert next(cast.parameters()).dtype == torch.float16  # the hook, not the weights, decides
