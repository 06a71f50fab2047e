"""The motion package: save, verify, load, apply; damage and wrong models are caught."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from motionsep.config import Recipe
from motionsep.errors import (
    IncompatibleModelError,
    MotionNotFoundError,
    PackageError,
    UsageError,
)
from motionsep.model import lora, motion, tap
from motionsep.model.components import TINY_UNET_CONFIG, load_unet, unet_config_hash
from motionsep.store import Store

RANK = 4


def unet_inputs() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return {
        "sample": torch.randn(1, 4, 4, 8, 8, generator=generator),
        "timestep": torch.tensor(300),
        "encoder_hidden_states": torch.randn(1, 6, 32, generator=generator),
    }


def run(unet: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return unet(**unet_inputs()).sample


def snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    """Every file's bytes and mtime, to prove a folder was not touched."""
    return {
        path.relative_to(folder).as_posix(): (path.read_bytes(), path.stat().st_mtime_ns)
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


@pytest.fixture
def trained(tiny_unet: nn.Module) -> tuple[nn.Module, motion.MotionMetadata]:
    """The tiny U-Net with a motion LoRA whose weights are nonzero, and its metadata."""
    torch.manual_seed(0)
    injection = tap.inject_motion_lora(tiny_unet, Recipe.PAPER, RANK)
    for param in lora.adapter_parameters(tiny_unet, tap.MOTION_ADAPTER):
        with torch.no_grad():
            param.normal_(std=0.2)
    metadata = motion.MotionMetadata(
        recipe=Recipe.PAPER,
        lora_targets=list(injection.adapted),
        lora_rank=injection.rank,
        lora_alpha=injection.alpha,
        base_model=motion.BaseModelRecord(
            id="tiny", revision=None, unet_config_hash=unet_config_hash(dict(tiny_unet.config))
        ),
        clips=[motion.ClipRecord(name="dolly.mp4", sha256="ab" * 32, frames=[0, 1, 2, 3])],
        prompts=["a person walking"],
        settings={"lora": {"recipe": "paper", "rank": RANK}},
        training={"steps": 3},
        final_loss=0.125,
    )
    return tiny_unet, metadata


@pytest.fixture
def package(trained: tuple[nn.Module, motion.MotionMetadata], store_home: Path) -> Path:
    unet, metadata = trained
    return motion.save_motion(
        Store(store_home).motions_dir / "dolly",
        lora.adapter_state_dict(unet),
        metadata,
        extra_files={
            motion.INVERSION_FILE: b"not really safetensors, only checksummed",
            "metrics.jsonl": b'{"step": 1, "loss": 0.5}\n',
        },
    )


def test_round_trip_gives_identical_outputs(
    trained: tuple[nn.Module, motion.MotionMetadata], package: Path, tiny_model_dir: Path
) -> None:
    unet, metadata = trained
    before = snapshot(package)
    loaded = motion.load_motion(package)
    assert loaded.metadata.recipe is Recipe.PAPER
    assert loaded.metadata.lora_targets == metadata.lora_targets
    assert loaded.metadata.clips == metadata.clips
    assert loaded.metadata.final_loss == 0.125
    assert set(loaded.files) == {motion.ADAPTER_FILE, motion.INVERSION_FILE, "metrics.jsonl"}
    assert loaded.file_path(motion.INVERSION_FILE).is_file()

    fresh = load_unet(tiny_model_dir)
    base = run(fresh)
    result = motion.apply_motion(fresh, loaded)
    assert result.adapted == tuple(metadata.lora_targets)
    assert not any(p.requires_grad for p in fresh.parameters())  # inference by default
    assert torch.equal(run(fresh), run(unet))
    with lora.adapter_enabled(fresh, False):
        assert torch.equal(run(fresh), base)
    assert snapshot(package) == before  # loading never writes

    document = json.loads((package / motion.METADATA_FILE).read_text())
    assert document["format_version"] == motion.FORMAT_VERSION
    assert document["lora"] == {
        "targets": metadata.lora_targets,
        "rank": RANK,
        "alpha": RANK,
        "init": "gaussian",
    }
    assert document["recipe_settings"]["projections"] == ["to_k"]
    assert document["base_model"]["unet_config_hash"] == metadata.base_model.unet_config_hash


def test_flipped_byte_is_caught(package: Path) -> None:
    adapter = package / motion.ADAPTER_FILE
    data = bytearray(adapter.read_bytes())
    data[len(data) // 2] ^= 0x01
    adapter.write_bytes(bytes(data))
    before = snapshot(package)
    with pytest.raises(PackageError) as caught:
        motion.load_motion(package)
    assert motion.ADAPTER_FILE in str(caught.value)
    assert "train" in str(caught.value)  # says how to fix it
    assert caught.value.exit_code == 1
    assert snapshot(package) == before


def test_missing_file_is_caught(package: Path) -> None:
    (package / motion.INVERSION_FILE).unlink()
    before = snapshot(package)
    with pytest.raises(PackageError, match=r"inversion\.safetensors is missing") as caught:
        motion.load_motion(package)
    assert caught.value.exit_code == 1
    assert snapshot(package) == before


def test_newer_format_is_refused(package: Path) -> None:
    metadata_file = package / motion.METADATA_FILE
    document = json.loads(metadata_file.read_text())
    document["format_version"] = motion.FORMAT_VERSION + 1
    metadata_file.write_text(json.dumps(document))
    with pytest.raises(PackageError, match="upgrade motionsep"):
        motion.load_motion(package)


def test_other_base_model_is_refused(package: Path) -> None:
    from diffusers import UNet3DConditionModel

    before = snapshot(package)
    loaded = motion.load_motion(package)
    torch.manual_seed(0)
    other = UNet3DConditionModel(**{**TINY_UNET_CONFIG, "block_out_channels": [32, 64, 64, 128]})
    with pytest.raises(IncompatibleModelError) as caught:
        motion.apply_motion(other, loaded)
    assert "'tiny'" in str(caught.value)
    assert "motionsep download tiny" in str(caught.value)
    assert caught.value.exit_code == 2
    assert lora.adapter_names(other) == []  # nothing was injected
    assert snapshot(package) == before


def test_save_refuses_to_overwrite(
    trained: tuple[nn.Module, motion.MotionMetadata], package: Path
) -> None:
    unet, metadata = trained
    before = snapshot(package)
    with pytest.raises(UsageError, match="already exists"):
        motion.save_motion(package, lora.adapter_state_dict(unet), metadata)
    assert snapshot(package) == before

    motion.save_motion(package, lora.adapter_state_dict(unet), metadata, overwrite=True)
    assert set(motion.load_motion(package).files) == {motion.ADAPTER_FILE}
    assert [p.name for p in package.parent.iterdir()] == ["dolly"]


def test_failed_save_leaves_no_package(
    trained: tuple[nn.Module, motion.MotionMetadata],
    store_home: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    unet, metadata = trained
    motions_dir = Store(store_home).motions_dir

    def disk_full(path: Path) -> str:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(motion, "file_sha256", disk_full)
    with pytest.raises(OSError, match="No space left"):
        motion.save_motion(
            motions_dir / "dolly",
            lora.adapter_state_dict(unet),
            metadata,
            extra_files={"preview.mp4": b"\x00" * 64},
        )
    assert list(motions_dir.iterdir()) == []  # neither the package nor its temporary folder


def test_adapter_must_match_recorded_targets(
    trained: tuple[nn.Module, motion.MotionMetadata], store_home: Path
) -> None:
    unet, metadata = trained
    state = lora.adapter_state_dict(unet)
    state = {k: v for k, v in state.items() if not k.startswith("transformer_in.")}
    with pytest.raises(PackageError, match="recorded LoRA targets"):
        motion.save_motion(Store(store_home).motions_dir / "broken", state, metadata)
    assert not (Store(store_home).motions_dir / "broken").exists()


def test_resolve_motion_by_name(package: Path, store_home: Path) -> None:
    store = Store(store_home)
    assert motion.resolve_motion(store, "dolly") == package
    assert motion.resolve_motion(store, str(package)) == package
    assert motion.installed_motions(store) == ["dolly"]
    with pytest.raises(MotionNotFoundError, match="installed motions: dolly") as caught:
        motion.resolve_motion(store, "zoom-in")
    assert caught.value.exit_code == 2
