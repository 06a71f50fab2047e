"""prepare: real clips into cached latents; cache hits; every bad input at once."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from motionsep import video
from motionsep.config import load_settings
from motionsep.data import ClipInputError, load_prepared, prepare
from motionsep.store import Store
from motionsep_cli.app import app

CLIP_NAMES = ["car-turn", "dolly", "zoom-in", "zoom-out"]


def _settings(tiny_model_dir: Path, home: Path, *extra: str):
    return load_settings(
        preset="tiny",
        set_options=[f"model.name={tiny_model_dir}", f"store.home={home}", *extra],
    )


def _entries(home: Path) -> list[Path]:
    root = home / "prepared" / "entries"
    return sorted(p for p in root.iterdir() if not p.name.startswith(".")) if root.is_dir() else []


def test_real_clips_give_latents_of_the_expected_shape_and_a_cache_hit(
    clips_dir: Path, tiny_model_dir: Path, tmp_path: Path
) -> None:
    settings = _settings(tiny_model_dir, tmp_path)
    store = Store(tmp_path)
    before = video.decode_stats().decodes
    dataset = prepare([clips_dir], settings, store)
    assert video.decode_stats().decodes - before == 4
    assert [clip.name for clip in dataset.clips] == CLIP_NAMES
    for index, clip in enumerate(dataset.clips):
        assert clip.prompt == (clips_dir / f"{clip.name}.txt").read_text().strip()
        tensors = dataset.load(index)
        # tiny preset: 4 frames of 16x16, VAE downsamples by 2 into 4 channels
        assert tensors["latents"].shape == (4, 4, 8, 8)
        assert tensors["prompt_embeds"].shape == (77, 32)
        assert torch.isfinite(tensors["latents"]).all()
        assert clip.indices == [0, 4, 8, 12]
    assert dataset.cache_hits == 0

    before = video.decode_stats().decodes
    again = prepare([clips_dir], settings, store)
    assert video.decode_stats().decodes == before, "a cache hit decodes nothing"
    assert again.cache_hits == 4
    assert again.manifest == dataset.manifest
    for index in range(4):
        assert torch.equal(again.load(index)["latents"], dataset.load(index)["latents"])


def test_changes_invalidate_exactly_what_changed(
    clips_dir: Path, tiny_model_dir: Path, tmp_path: Path
) -> None:
    clips = tmp_path / "clips"
    clips.mkdir()
    for name in ("dolly", "zoom-in"):
        shutil.copy(clips_dir / f"{name}.mp4", clips)
        shutil.copy(clips_dir / f"{name}.txt", clips)
    store = Store(tmp_path / "home")
    settings = _settings(tiny_model_dir, store.home)
    prepare([clips], settings, store)
    assert len(_entries(store.home)) == 2

    # another clip's bytes under one name: only that clip is encoded again
    shutil.copy(clips_dir / "zoom-out.mp4", clips / "zoom-in.mp4")
    before = video.decode_stats().per_file
    dataset = prepare([clips], settings, store)
    after = video.decode_stats().per_file
    changed = str((clips / "zoom-in.mp4").resolve())
    untouched = str((clips / "dolly.mp4").resolve())
    assert after.get(changed, 0) - before.get(changed, 0) == 1
    assert after.get(untouched, 0) == before.get(untouched, 0)
    assert [clip.cached for clip in dataset.clips] == [True, False]

    # a changed prompt re-encodes that clip only
    (clips / "dolly.txt").write_text("a cup on a table")
    dataset = prepare([clips], settings, store)
    assert [clip.cached for clip in dataset.clips] == [False, True]

    # a changed frame setting re-encodes everything
    dataset = prepare([clips], _settings(tiny_model_dir, store.home, "data.frames=2"), store)
    assert [clip.cached for clip in dataset.clips] == [False, False]
    assert dataset.load(0)["latents"].shape[1] == 2


def test_every_bad_input_is_reported_before_any_work(
    clips_dir: Path, tiny_model_dir: Path, tmp_path: Path
) -> None:
    clips = tmp_path / "clips"
    (clips / "other").mkdir(parents=True)
    shutil.copy(clips_dir / "dolly.mp4", clips / "good.mp4")
    (clips / "good.txt").write_text("a good clip")
    (clips / "text.mp4").write_text("this is not a video")
    (clips / "text.txt").write_text("prompt")
    (clips / "broken.mp4").write_bytes((clips_dir / "dolly.mp4").read_bytes()[:3000])
    (clips / "broken.txt").write_text("prompt")
    shutil.copy(clips_dir / "zoom-in.mp4", clips / "noprompt.mp4")
    shutil.copy(clips_dir / "zoom-out.mp4", clips / "other" / "good.mp4")
    (clips / "other" / "good.txt").write_text("same name")
    shutil.copy(clips_dir / "dolly.mp4", clips / "latin.mp4")
    (clips / "latin.txt").write_bytes("a café".encode("latin-1"))
    store = Store(tmp_path / "home")
    settings = _settings(tiny_model_dir, store.home)

    with pytest.raises(ClipInputError) as info:
        prepare([clips, clips / "other" / "good.mp4", tmp_path / "missing.mp4"], settings, store)
    message = info.value.message
    assert "missing.mp4: no such file" in message
    assert "noprompt.mp4: no prompt" in message
    assert "same name 'good'" in message
    assert "latin.txt: the prompt is not UTF-8 text" in message
    assert info.value.exit_code == 2
    assert _entries(store.home) == []

    # with names and prompts fixed, the undecodable files are all listed together
    shutil.rmtree(clips / "other")
    (clips / "noprompt.txt").write_text("fixed")
    (clips / "latin.txt").write_text("a café")
    with pytest.raises(ClipInputError) as info:
        prepare([clips], settings, store)
    message = info.value.message
    assert "text.mp4" in message and "broken.mp4" in message
    assert message.startswith("2 problems")
    assert _entries(store.home) == []


def test_too_few_frames_names_the_setting(
    clips_dir: Path, tiny_model_dir: Path, tmp_path: Path
) -> None:
    settings = _settings(tiny_model_dir, tmp_path, "data.frames=16", "data.frame_step=2")
    with pytest.raises(ClipInputError, match=r"dolly\.mp4") as info:
        prepare([clips_dir / "dolly.mp4"], settings, Store(tmp_path))
    assert "data.frame" in info.value.message
    assert _entries(tmp_path) == []


def test_manifests_give_prompts(clips_dir: Path, tiny_model_dir: Path, tmp_path: Path) -> None:
    csv_file = tmp_path / "clips.csv"
    csv_file.write_text(f"path,prompt\n{clips_dir / 'dolly.mp4'},a dolly shot of a cup\n")
    jsonl_file = tmp_path / "more.jsonl"
    jsonl_file.write_text(
        json.dumps({"path": str(clips_dir / "zoom-in.mp4"), "prompt": "zoom"}) + "\n"
    )
    store = Store(tmp_path / "home")
    dataset = prepare([csv_file, jsonl_file], _settings(tiny_model_dir, store.home), store)
    assert [(c.name, c.prompt) for c in dataset.clips] == [
        ("dolly", "a dolly shot of a cup"),
        ("zoom-in", "zoom"),
    ]
    assert dataset.clips[0].prompt_source == "manifest clips.csv"


def test_inversion_is_stored_and_reused(
    clips_dir: Path, tiny_model_dir: Path, tmp_path: Path
) -> None:
    store = Store(tmp_path)
    settings = _settings(tiny_model_dir, tmp_path, "data.inversion=true", "data.inversion_steps=3")
    dataset = prepare([clips_dir / "dolly.mp4"], settings, store)
    path = dataset.inversion_path(0, 3)
    assert path is not None
    from safetensors.torch import load_file

    noise = load_file(path)["inversion"]
    latents = dataset.load(0)["latents"]
    assert noise.shape == latents.shape
    assert not torch.equal(noise, latents)
    assert torch.isfinite(noise).all()
    mtime = path.stat().st_mtime_ns
    again = prepare([clips_dir / "dolly.mp4"], settings, store)
    assert again.inversion_path(0, 3) == path
    assert path.stat().st_mtime_ns == mtime


def test_prepared_manifest_reopens(clips_dir: Path, tiny_model_dir: Path, tmp_path: Path) -> None:
    store = Store(tmp_path)
    out = tmp_path / "out"
    dataset = prepare(
        [clips_dir / "dolly.mp4"], _settings(tiny_model_dir, tmp_path), store, out=out
    )
    assert dataset.manifest == out / "manifest.json"
    reopened = load_prepared(out)
    assert reopened.clips[0].sha256 == dataset.clips[0].sha256
    assert torch.equal(reopened.load(0)["latents"], dataset.load(0)["latents"])


def test_prepare_command_prints_the_manifest(
    clips_dir: Path, tiny_model_dir: Path, store_home: Path
) -> None:
    runner = CliRunner()
    args = [
        "prepare",
        str(clips_dir / "dolly.mp4"),
        "--preset",
        "tiny",
        "--model",
        str(tiny_model_dir),
    ]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.stderr
    manifest = Path(result.stdout.strip())
    assert manifest.is_file()
    assert manifest.is_relative_to(store_home)
    result = runner.invoke(app, [*args, "--json"])
    data = json.loads(result.stdout)
    assert data["clips"][0]["cached"] is True

    result = runner.invoke(app, ["prepare", str(store_home / "nope.mp4"), "--preset", "tiny"])
    assert result.exit_code == 2
    assert "nope.mp4: no such file" in result.stderr


def test_ddim_inversion_follows_the_ddim_update(tiny_model_dir: Path) -> None:
    """With a noise predictor that always says 0, each inverse DDIM step only
    rescales x by sqrt(alpha_next / alpha_now), so the whole inversion is
    x * sqrt(alpha_last / alpha_first): checks the schedule and the update."""
    from types import SimpleNamespace

    from motionsep.data import ddim_invert
    from motionsep.model.components import load_components

    parts = load_components(tiny_model_dir)

    class ZeroNoise(torch.nn.Module):
        dtype = torch.float32
        device = torch.device("cpu")

        def forward(self, sample, t, encoder_hidden_states):  # type: ignore[no-untyped-def]
            return SimpleNamespace(sample=torch.zeros_like(sample))

    parts.unet = ZeroNoise()  # type: ignore[assignment]
    latents = torch.randn(1, 4, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    steps = 5
    noise = ddim_invert(parts, latents, steps)
    alphas = parts.scheduler.alphas_cumprod.double()
    last = int(parts.scheduler.timesteps[0])
    expected = latents.double() * (alphas[last] / parts.scheduler.final_alpha_cumprod).sqrt()
    assert torch.allclose(noise.double(), expected, atol=1e-5)


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete"])
def test_a_damaged_cache_entry_is_named_never_used_and_rebuilt(
    damage: str, clips_dir: Path, tiny_model_dir: Path, tmp_path: Path
) -> None:
    from motionsep.errors import DamagedCacheError

    store = Store(tmp_path / "home")
    settings = _settings(tiny_model_dir, store.home)
    first = prepare([clips_dir / "dolly.mp4"], settings, store)
    latents = first.clips[0].latents_path
    good = latents.read_bytes()
    if damage == "flip":
        data = bytearray(good)
        data[-5] ^= 0x01  # one bit of one latent value
        latents.write_bytes(bytes(data))
    elif damage == "truncate":
        latents.write_bytes(good[: len(good) // 2])
    else:
        latents.unlink()

    with pytest.raises(DamagedCacheError) as info:
        prepare([clips_dir / "dolly.mp4"], settings, store)
    assert str(first.clips[0].entry) in info.value.message
    assert "--rebuild" in info.value.hint
    with pytest.raises(DamagedCacheError):
        first.load(0)  # a dataset prepared earlier refuses it too (train from a manifest)

    result = CliRunner().invoke(
        app,
        ["prepare", str(clips_dir / "dolly.mp4"), "--rebuild", "--preset", "tiny", "--json",
         "--model", str(tiny_model_dir)],
        env={"MOTIONSEP_HOME": str(store.home)},
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert [clip["cached"] for clip in json.loads(result.stdout)["clips"]] == [False]
    assert latents.read_bytes() == good  # encoding is deterministic: the entry is whole again
    again = prepare([clips_dir / "dolly.mp4"], settings, store)
    assert again.cache_hits == 1
