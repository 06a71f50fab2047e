"""`motionsep download tiny`: built offline, deterministic, loads with diffusers."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from motionsep.errors import ModelFormatError
from motionsep.model.components import (
    TINY_UNET_CONFIG,
    ZEROSCOPE_UNET_CONFIG,
    build_zeroscope_unet,
    check_model_folder,
    count_parameters,
    load_components,
    unet_config_hash,
)
from motionsep_cli.app import app

runner = CliRunner()


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_download_tiny_into_an_empty_store_is_fast_and_loads(store_home: Path) -> None:
    from diffusers import AutoencoderKL, DDIMScheduler, UNet3DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    started = time.monotonic()
    result = runner.invoke(app, ["download", "tiny", "--json"])
    elapsed = time.monotonic() - started
    assert result.exit_code == 0, result.stderr
    assert elapsed < 60
    folder = Path(json.loads(result.stdout)["path"])
    assert folder == store_home / "models" / "tiny"

    # Plain diffusers/transformers load it, with nothing of motionsep in between.
    unet = UNet3DConditionModel.from_pretrained(folder, subfolder="unet", use_safetensors=True)
    vae = AutoencoderKL.from_pretrained(folder, subfolder="vae", use_safetensors=True)
    text_encoder = CLIPTextModel.from_pretrained(folder, subfolder="text_encoder")
    tokenizer = CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer")
    DDIMScheduler.from_pretrained(folder, subfolder="scheduler")
    assert 3e6 < count_parameters(unet) < 8e6

    ids = tokenizer(["a wolf on a snowy mountain"], padding="max_length", return_tensors="pt")
    with torch.no_grad():
        text = text_encoder(ids.input_ids)[0]
        frames = torch.randn(2, 3, 32, 32)
        latents = vae.encode(frames).latent_dist.mean
        video = latents.reshape(1, 2, 4, 16, 16).permute(0, 2, 1, 3, 4)
        out = unet(video, torch.tensor([500]), encoder_hidden_states=text).sample
    assert out.shape == video.shape
    assert torch.isfinite(out).all()
    # no pickles in the store
    assert not list(folder.rglob("*.bin")) and not list(folder.rglob("*.pt"))


def test_tiny_build_is_deterministic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    hashes = []
    for attempt in ("a", "b"):
        monkeypatch.setenv("MOTIONSEP_HOME", str(tmp_path / attempt))
        assert runner.invoke(app, ["download", "tiny"]).exit_code == 0
        folder = tmp_path / attempt / "models" / "tiny"
        hashes.append(
            {
                part: _sha256(next((folder / part).glob("*.safetensors")))
                for part in ("unet", "vae", "text_encoder")
            }
        )
    assert hashes[0] == hashes[1]


def test_downloading_again_is_a_no_op(store_home: Path) -> None:
    assert runner.invoke(app, ["download", "tiny"]).exit_code == 0
    weights = store_home / "models" / "tiny" / "unet" / "diffusion_pytorch_model.safetensors"
    before = weights.stat().st_mtime_ns
    result = runner.invoke(app, ["download", "tiny"])
    assert result.exit_code == 0
    assert weights.stat().st_mtime_ns == before


def test_load_components_gives_frozen_eval_modules(tiny_model_dir: Path) -> None:
    parts = load_components(tiny_model_dir)
    assert parts.vae_scale_factor == 2
    for module in (parts.unet, parts.vae, parts.text_encoder):
        assert not module.training
        assert not any(p.requires_grad for p in module.parameters())


def test_a_2d_unet_folder_is_refused(tiny_model_dir: Path, tmp_path: Path) -> None:
    import shutil

    copy = tmp_path / "model"
    shutil.copytree(tiny_model_dir, copy)
    config = json.loads((copy / "unet" / "config.json").read_text())
    config["_class_name"] = "UNet2DConditionModel"
    (copy / "unet" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelFormatError, match="UNet3DConditionModel"):
        check_model_folder(copy)


def test_tiny_unet_has_the_zeroscope_block_layout() -> None:
    for key in ("down_block_types", "up_block_types", "layers_per_block"):
        assert TINY_UNET_CONFIG[key] == ZEROSCOPE_UNET_CONFIG[key]
    assert unet_config_hash(TINY_UNET_CONFIG) != unet_config_hash(ZEROSCOPE_UNET_CONFIG)


def test_full_zeroscope_architecture_builds_without_weights() -> None:
    unet = build_zeroscope_unet(device="meta")
    assert 1.40e9 < count_parameters(unet) < 1.42e9
