"""Every command on the tiny AnimateDiff model (UNetMotionModel), and the family's limits.

The motion used by most tests is trained once per module (4 steps on the
dolly clip, with its inversion stored) in a store of its own; tests that
change a store copy what they need first.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from typer.testing import CliRunner

from motionsep.config import load_settings
from motionsep.errors import IncompatibleModelError
from motionsep.model import motion
from motionsep.model.components import Components, load_components
from motionsep.model.recipes import highway_plan, skip_layout
from motionsep.store import Store
from motionsep.train import partial_dir, train_motion
from motionsep.video import probe
from motionsep_cli.app import app
from tests.test_highway import record_spatial, record_up_skips

runner = CliRunner()

MOTION = "ad"
PROMPT = "a red car on a road"
FRAMES = 4  # the tiny preset's
SIZE = 16
TRAIN_STEPS = 4
MAX_FRAMES = 32  # the motion modules' frame positions (AnimateDiff v1-5-2's)


def _train(clip: Path, model: Path, name: str, store: Store, *options: str) -> Path:
    settings = load_settings(
        preset="tiny",
        set_options=[f"model.name={model}", f"train.steps={TRAIN_STEPS}", *options],
    )
    return train_motion([clip], name, settings, store).package


@pytest.fixture(scope="module")
def ad_home(tmp_path_factory: pytest.TempPathFactory, tiny_animatediff_dir: Path) -> Path:
    """A store holding motion ``ad``, trained on tiny-animatediff with its inversion (read only)."""
    clips = Path(__file__).resolve().parents[1].parent / "shared" / "clips"
    if not (clips / "dolly.mp4").is_file():
        pytest.skip(f"reference clips not found at {clips}")
    home = tmp_path_factory.mktemp("ad_store")
    _train(clips / "dolly.mp4", tiny_animatediff_dir, MOTION, Store(home), "data.inversion=true")
    return home


@pytest.fixture
def ad_store(ad_home: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The module's store as MOTIONSEP_HOME."""
    monkeypatch.setenv("MOTIONSEP_HOME", str(ad_home))
    return ad_home


@pytest.fixture(scope="module")
def ad_components(tiny_animatediff_dir: Path) -> Components:
    return load_components(tiny_animatediff_dir)


def _ok(result: Any) -> Any:
    assert result.exit_code == 0, result.stderr
    return result


def _stderr(result: Any) -> str:
    return " ".join(result.stderr.split())


# ---------------------------------------------------------------------------
# the chain, prepare, resume


def test_animatediff_download_train_generate_on_a_fresh_store(
    clips_dir: Path, store_home: Path, tmp_path: Path
) -> None:
    _ok(runner.invoke(app, ["download", "tiny-animatediff"]))
    trained = _ok(
        runner.invoke(
            app,
            [
                "train", str(clips_dir / "dolly.mp4"), "--name", MOTION,
                "--model", "tiny-animatediff", "--preset", "tiny", "--steps", "2", "--json",
            ],
        )
    )  # fmt: skip
    assert json.loads(trained.stdout)["steps"] == 2
    package = motion.load_motion(store_home / "motions" / MOTION)
    assert package.metadata.base_model.id == "tiny-animatediff"
    assert package.metadata.base_model.family == "animatediff"
    assert all(".motion_modules." in target for target in package.metadata.lora_targets)
    assert len(package.metadata.lora_targets) == 42 * 2  # reference: to_k, to_out.0 of 42

    out = tmp_path / "out"
    generated = _ok(
        runner.invoke(
            app,
            ["generate", "--motion", MOTION, PROMPT, "--out", str(out), "--steps", "2", "--json"],
        )
    )
    (video,) = json.loads(generated.stdout)
    info = probe(Path(video["path"]))
    assert (info.frame_count, info.width, info.height) == (FRAMES, SIZE, SIZE)
    sidecar = json.loads(Path(video["sidecar"]).read_text())
    assert sidecar["motion"]["base_model"]["family"] == "animatediff"
    assert sidecar["sample"]["highway"] is True  # the reference recipe's highway


def test_animatediff_prepare_encodes_and_inverts_the_clip(
    clips_dir: Path, tiny_animatediff_dir: Path, store_home: Path
) -> None:
    args = [
        "prepare", str(clips_dir / "dolly.mp4"), "--preset", "tiny",
        "--model", str(tiny_animatediff_dir), "--set", "data.inversion=true", "--json",
    ]  # fmt: skip
    data = json.loads(_ok(runner.invoke(app, args)).stdout)
    (clip,) = data["clips"]
    assert clip["cached"] is False and Path(data["manifest"]).is_relative_to(store_home)
    entry = Path(clip["entry"])
    latents = load_file(entry / "latents.safetensors")["latents"]
    assert tuple(latents.shape) == (4, FRAMES, SIZE // 2, SIZE // 2)  # (C, F, h, w)
    (inversion,) = list(entry.glob("inversion-*.safetensors"))
    assert load_file(inversion)["inversion"].shape == latents.shape
    again = json.loads(_ok(runner.invoke(app, args)).stdout)
    assert again["clips"][0]["cached"] is True


def test_animatediff_resume_after_an_interruption_is_bit_identical(
    clips_dir: Path, tiny_animatediff_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from motionsep import train

    clip = clips_dir / "dolly.mp4"
    options = ["train.steps=3", "train.checkpoint_every=1", "lora.dropout=0.1"]
    store = Store(tmp_path)  # one store: the later runs read the first one's prepared clip
    straight = _train(clip, tiny_animatediff_dir, "straight", store, *options)

    step = train.Trainer.step

    def stop_at_step_3(self: train.Trainer, number: int) -> dict[str, float]:
        if number == 2:  # 0-based: the third step
            raise KeyboardInterrupt  # as Ctrl-C would, after the checkpoint of step 2
        return step(self, number)

    monkeypatch.setattr(train.Trainer, "step", stop_at_step_3)
    with pytest.raises((KeyboardInterrupt, train.TrainingInterruptedError)):
        _train(clip, tiny_animatediff_dir, "m", store, *options)
    monkeypatch.setattr(train.Trainer, "step", step)
    assert (partial_dir(store, "m") / "checkpoints" / "step-2").is_dir()
    assert not (store.motions_dir / "m").exists()
    settings = load_settings(
        preset="tiny", set_options=[f"model.name={tiny_animatediff_dir}", *options]
    )
    resumed = train_motion([clip], "m", settings, store, resume=True)
    assert resumed.resumed_from == 2 and [row["step"] for row in resumed.metrics] == [1, 2, 3]
    a, b = (
        load_file(straight / "adapter.safetensors"),
        load_file(resumed.package / "adapter.safetensors"),
    )
    assert a.keys() == b.keys() and a
    for key in a:
        assert torch.equal(a[key], b[key]), f"{key} differs after resume"


@pytest.mark.slow
def test_animatediff_two_processes_train_one_motion(
    clips_dir: Path, tiny_animatediff_dir: Path, tmp_path: Path
) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MOTIONSEP_")}
    env.update(MOTIONSEP_HOME=str(tmp_path), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    args = [
        sys.executable, "-m", "motionsep_cli", "train", str(clips_dir / "dolly.mp4"),
        "--name", "ddp", "--preset", "tiny", "--model", str(tiny_animatediff_dir),
        "--steps", "2", "--num-processes", "2",
    ]  # fmt: skip
    result = subprocess.run(args, env=env, capture_output=True, text=True, timeout=400)
    assert result.returncode == 0, result.stderr
    assert "launching 2 processes" in result.stderr
    package = motion.load_motion(tmp_path / "motions" / "ddp")
    assert package.metadata.training["processes"] == 2
    assert package.metadata.base_model.family == "animatediff"
    assert len((tmp_path / "motions" / "ddp" / "metrics.jsonl").read_text().splitlines()) == 2


# ---------------------------------------------------------------------------
# generate


def _generate(
    components: Components, package: motion.MotionPackage, **sample: Any
) -> list[torch.Tensor]:
    from motionsep.sample import generate_videos, generation_settings

    batch_size = sample.pop("batch_size", 4)
    settings = generation_settings(package, overrides={"sample": {"steps": 2, **sample}})
    videos = generate_videos(
        [PROMPT], settings, package, components=components, batch_size=batch_size
    )
    return [video.latents for video in videos]


def test_animatediff_generate_highway_beta_pli_noise_prior_seeds_and_batches(
    ad_home: Path, ad_components: Components
) -> None:
    package = motion.load_motion(ad_home / "motions" / MOTION)
    (full,) = _generate(ad_components, package, seed=3, noise_prior=0.0)
    (again,) = _generate(ad_components, package, seed=3, noise_prior=0.0)
    assert torch.equal(full, again)
    (no_highway,) = _generate(ad_components, package, seed=3, noise_prior=0.0, highway=False)
    (beta,) = _generate(ad_components, package, seed=3, noise_prior=0.0, highway_beta=1.5)
    # (2 steps of this linspace schedule are t = 999 and 0: PLI needs more to show)
    (phased,) = _generate(ad_components, package, seed=3, noise_prior=0.0, pli=0.5, steps=4)
    (full_4,) = _generate(ad_components, package, seed=3, noise_prior=0.0, steps=4)
    assert not torch.allclose(phased, full_4, atol=1e-4)
    (prior,) = _generate(ad_components, package, seed=3, noise_prior=0.5)
    (base,) = _generate(
        ad_components, package, seed=3, noise_prior=0.0, lora_scale=0.0, highway=False
    )
    variants = {"full": full, "no highway": no_highway, "beta": beta}
    variants |= {"prior": prior, "base": base}
    names = list(variants)
    for i, first in enumerate(names):
        for second in names[i + 1 :]:
            assert not torch.allclose(variants[first], variants[second], atol=1e-4), (first, second)

    batched = _generate(ad_components, package, seed=3, noise_prior=0.0, num_videos=3, batch_size=3)
    alone = _generate(ad_components, package, seed=4, noise_prior=0.0, batch_size=1)
    assert torch.allclose(batched[0], full, atol=1e-4)  # video k has seed 3 + k, whatever the batch
    assert torch.allclose(batched[1], alone[0], atol=1e-4)
    assert not torch.allclose(batched[1], batched[2], atol=1e-3)


def test_animatediff_generate_cli_records_every_control(ad_store: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    args = [
        "generate", "--motion", MOTION, PROMPT, "--out", str(out), "--num-videos", "2",
        "--batch-size", "2", "--seed", "7", "--highway-beta", "1.3", "--pli", "0.5",
        "--noise-prior", "0.3", "--steps", "2", "--json",
    ]  # fmt: skip
    videos = json.loads(_ok(runner.invoke(app, args)).stdout)
    assert [v["seed"] for v in videos] == [7, 8]
    sample = json.loads(Path(videos[1]["sidecar"]).read_text())["sample"]
    assert sample["highway"] is True and sample["highway_beta"] == 1.3
    assert sample["pli"] == 0.5 and sample["motion_steps"] == 1
    assert sample["noise_prior"] == 0.3
    off = _ok(
        runner.invoke(app, [*args[:4], "--out", str(tmp_path / "off"), "--no-highway", "--json"])
    )
    (video,) = json.loads(off.stdout)
    assert json.loads(Path(video["sidecar"]).read_text())["sample"]["highway"] is False


def test_animatediff_generates_sizes_that_are_no_power_of_two(
    ad_store: Path, tmp_path: Path
) -> None:
    """Multiples of 8 that halve to odd latent sizes still run (diffusers forwards upsample
    sizes), highway included; so nothing beyond multiples of 8 is refused."""
    for size in ("40x24", "24x56"):
        out = tmp_path / f"{size}.mp4"
        args = ["generate", "--motion", MOTION, PROMPT, "--size", size, "--out", str(out)]
        args += ["--noise-prior", "0", "--steps", "2"]
        _ok(runner.invoke(app, args))
        width, height = (int(v) for v in size.split("x"))
        info = probe(out)
        assert (info.width, info.height, info.frame_count) == (width, height, FRAMES)
    bad = runner.invoke(app, ["generate", "--motion", MOTION, PROMPT, "--size", "36x32"])
    assert bad.exit_code == 2 and "multiple" in bad.stderr


# ---------------------------------------------------------------------------
# evaluate, report, inspect-attention, motions


def test_animatediff_evaluate_and_report_on_the_generated_folder(
    ad_store: Path, clips_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "outputs"
    args = ["generate", "--motion", MOTION, PROMPT, "--out", str(out), "-n", "2", "--steps", "2"]
    _ok(runner.invoke(app, args))
    scored = _ok(
        runner.invoke(
            app,
            ["evaluate", str(out), "--reference", str(clips_dir / "dolly.mp4"), "--json",
             "--no-report"],
        )
    )  # fmt: skip
    report = json.loads(scored.stdout)
    assert len(report["videos"]) == 2
    assert all(v["motion_fidelity"] is not None for v in report["videos"])
    page = _ok(runner.invoke(app, ["report", str(out), "--json"]))
    index = Path(json.loads(page.stdout)["report"])
    assert index.is_file() and MOTION in index.read_text()


def test_animatediff_inspect_attention_maps_the_motion_modules(
    ad_store: Path, clips_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "attn"
    args = ["inspect-attention", "--motion", MOTION, PROMPT, "--out", str(out), "--set"]
    args += ["sample.steps=3"]
    summary = json.loads(
        _ok(
            runner.invoke(app, [*args, "--layers", r"up_blocks\.3\.", "--steps", "0,-1", "--json"])
        ).stdout
    )
    layers = [entry["layer"] for entry in summary["layers"]]
    # up_blocks[3]: 3 motion modules, attn1 and attn2 each, at 2 steps
    assert len(set(layers)) == 6 and len(layers) == 12
    assert all(name.startswith("up_blocks.3.motion_modules.") for name in layers)
    skips = summary["highway"]["skips"]
    assert {s["temporal"] for s in skips} == {
        "down_blocks.2.motion_modules.0",
        "down_blocks.2.motion_modules.1",
    }  # the reference recipe reroutes down_blocks[2]
    for name in ("base.png", "motion.png", "difference.png", "maps.npz"):
        assert (out / name).is_file()

    video = _ok(
        runner.invoke(
            app,
            # the same --out: --force replaces the first inspection
            [
                *args,
                "--force",
                "--video",
                str(clips_dir / "dolly.mp4"),
                "--layers",
                "mid_block.*",
                "--json",
            ],
        )
    )
    data = json.loads(video.stdout)
    assert data["mode"] == "video"
    assert {e["layer"] for e in data["layers"]} == {
        "mid_block.motion_modules.0.transformer_blocks.0.attn1",
        "mid_block.motion_modules.0.transformer_blocks.0.attn2",
    }
    bad = runner.invoke(app, [*args, "--force", "--layers", "temp_attentions"])
    assert bad.exit_code == 2 and "matches none" in bad.stderr


def test_animatediff_motions_list_and_show(ad_store: Path) -> None:
    listed = json.loads(_ok(runner.invoke(app, ["motions", "list", "--json"])).stdout)
    assert [row["name"] for row in listed] == [MOTION]
    shown = _ok(runner.invoke(app, ["motions", "show", MOTION, "--json"]))
    data = json.loads(shown.stdout)
    assert data["name"] == MOTION
    assert "tiny_animatediff" in json.dumps(data) or "tiny-animatediff" in json.dumps(data)


# ---------------------------------------------------------------------------
# limits


def test_animatediff_more_frames_than_motion_positions_exit_2_before_any_work(
    ad_store: Path, clips_dir: Path, tiny_animatediff_dir: Path, tmp_path: Path
) -> None:
    frames = str(MAX_FRAMES + 1)
    out = tmp_path / "out"
    generate = runner.invoke(
        app, ["generate", "--motion", MOTION, PROMPT, "--frames", frames, "--out", str(out)]
    )
    assert generate.exit_code == 2, generate.stderr
    message = _stderr(generate)
    assert (
        f"sample.frames is {frames}" in message and f"only {MAX_FRAMES} frame positions" in message
    )
    assert f"at most {MAX_FRAMES} frames" in message and "Traceback" not in generate.stderr
    assert not out.exists()

    inspect = runner.invoke(
        app,
        ["inspect-attention", "--motion", MOTION, PROMPT, "--set", f"sample.frames={frames}",
         "--out", str(out)],
    )  # fmt: skip
    assert inspect.exit_code == 2 and "sample.frames" in inspect.stderr
    assert not out.exists()

    home = tmp_path / "fresh"
    train = runner.invoke(
        app,
        ["train", str(clips_dir / "dolly.mp4"), "--name", "long", "--preset", "tiny",
         "--model", str(tiny_animatediff_dir), "--set", f"data.frames={frames}"],
        env={"MOTIONSEP_HOME": str(home)},
    )  # fmt: skip
    assert train.exit_code == 2, train.stderr
    assert f"data.frames is {frames}" in _stderr(train) and "--set data.frames=N" in _stderr(train)
    assert not home.exists() or not any(home.rglob("*.safetensors"))  # nothing prepared

    prepare = runner.invoke(
        app,
        ["prepare", str(clips_dir / "dolly.mp4"), "--preset", "tiny",
         "--model", str(tiny_animatediff_dir), "--set", "data.inversion=true",
         "--set", f"data.frames={frames}"],
        env={"MOTIONSEP_HOME": str(home)},
    )  # fmt: skip
    assert prepare.exit_code == 2 and f"data.frames is {frames}" in _stderr(prepare)
    assert not home.exists() or not any(home.rglob("*.safetensors"))

    # exactly the limit is fine as far as the check goes
    from motionsep.model.family import unet_config
    from motionsep.sample import check_frames

    check_frames(unet_config(tiny_animatediff_dir), MAX_FRAMES, "sample.frames")


def _with_family(source: Path, target: Path, family: str | None) -> Path:
    """A copy of a package whose motion.json records another family (None: no family at all,
    as packages written before families existed). motion.json is not checksummed."""
    shutil.copytree(source, target)
    document = json.loads((target / motion.METADATA_FILE).read_text())
    if family is None:
        document["base_model"].pop("family")
    else:
        document["base_model"]["family"] = family
    (target / motion.METADATA_FILE).write_text(json.dumps(document))
    return target


def test_animatediff_motion_on_a_zeroscope_base_and_back_names_the_families(
    ad_store: Path, tiny_model_dir: Path, tiny_animatediff_dir: Path, tmp_path: Path
) -> None:
    on_zeroscope = runner.invoke(
        app, ["generate", "--motion", MOTION, "--model", str(tiny_model_dir), PROMPT,
              "--out", str(tmp_path / "out")],
    )  # fmt: skip
    assert on_zeroscope.exit_code == 2, on_zeroscope.stderr
    message = _stderr(on_zeroscope)
    assert "trained on an AnimateDiff base" in message and "this is a ZeroScope" in message
    assert f"use --model {tiny_animatediff_dir}" in message
    assert "Traceback" not in on_zeroscope.stderr and not (tmp_path / "out").exists()

    # a package that records no family is a ZeroScope one (written before families)
    old = _with_family(ad_store / "motions" / MOTION, tmp_path / "old", None)
    assert motion.load_motion(old).metadata.base_model.family == "zeroscope"
    on_animatediff = runner.invoke(app, ["generate", "--motion", str(old), PROMPT])
    assert on_animatediff.exit_code == 2
    message = _stderr(on_animatediff)
    assert "trained on a ZeroScope" in message and "this is an AnimateDiff base" in message

    unknown = _with_family(ad_store / "motions" / MOTION, tmp_path / "unknown", "sora")
    with pytest.raises(motion.PackageError, match=r"base_model\.family"):
        motion.load_motion(unknown)

    # the library refuses the same before injecting anything
    from motionsep.model.components import load_unet

    unet = load_unet(tiny_model_dir)
    with pytest.raises(IncompatibleModelError, match="AnimateDiff base"):
        motion.apply_motion(unet, motion.load_motion(ad_store / "motions" / MOTION))
    assert not any("lora_" in name for name, _ in unet.named_parameters())


# ---------------------------------------------------------------------------
# the highway and ablations on the motion U-Net


@pytest.mark.parametrize("recipe", ["paper", "reference"])
def test_animatediff_highway_reroutes_and_scales_exactly_the_planned_skips(
    tiny_animatediff_unet: nn.Module, recipe: str
) -> None:
    from motionsep.model.highway import recipe_highway

    unet = tiny_animatediff_unet
    generator = torch.Generator().manual_seed(1234)
    inputs = {
        "sample": torch.randn(2, 4, 3, 8, 8, generator=generator),
        "timestep": torch.tensor(500),
        "encoder_hidden_states": torch.randn(2, 7, 32, generator=generator),
    }
    plan = highway_plan(unet, recipe)
    layer_skips = {s.name for s in skip_layout(unet) if s.layer is not None and s.down_block < 3}
    if recipe == "paper":  # every layer skip of the three attention down blocks, scaled by 1.1
        assert plan.reroute == layer_skips and set(plan.scale) == layer_skips
    else:  # down_blocks[2]'s layers; beta on what up_blocks[1] and resnet 0 of up_blocks[2] take
        assert plan.reroute == {"down_blocks.2.layers.0", "down_blocks.2.layers.1"}
        assert "down_blocks.1.downsamplers.0" in plan.scale
    with torch.no_grad(), record_up_skips(unet) as stock:
        stock_out = unet(**inputs).sample
    with (
        torch.no_grad(),
        recipe_highway(unet, recipe),
        record_up_skips(unet) as received,
        record_spatial(unet) as spatial,
    ):
        out = unet(**inputs).sample
    assert received.keys() == stock.keys() == {s.name for s in skip_layout(unet)}
    for name, skip in received.items():
        factor = plan.scale.get(name, 1.0)
        source = spatial[name] if name in plan.reroute else stock[name]
        expected = source * factor if factor != 1.0 else source
        assert torch.equal(skip, expected), name
        if name in plan.reroute:
            assert not torch.allclose(spatial[name], stock[name]), name
    assert not torch.allclose(out, stock_out)
    with torch.no_grad():  # hooks removed: the stock output again, bit for bit
        assert torch.equal(unet(**inputs).sample, stock_out)


def test_animatediff_ablations_uniform_attention_works_and_conv_bypass_is_refused(
    tiny_animatediff_unet: nn.Module,
) -> None:
    from motionsep.model.ablations import bypass_temporal_convs, uniform_temporal_attention

    unet = tiny_animatediff_unet
    generator = torch.Generator().manual_seed(0)
    inputs = {
        "sample": torch.randn(1, 4, 3, 8, 8, generator=generator),
        "timestep": torch.tensor(500),
        "encoder_hidden_states": torch.randn(1, 7, 32, generator=generator),
    }
    with torch.no_grad():
        stock = unet(**inputs).sample
        with uniform_temporal_attention(unet) as names:
            uniform = unet(**inputs).sample
        assert len(names) == 42 and all(".motion_modules." in n for n in names)
        mid, up = "mid_block.motion_modules.0", "up_blocks.0.motion_modules.0"
        assert names.index(f"{mid}.transformer_blocks.0.attn2") + 1 == names.index(
            f"{up}.transformer_blocks.0.attn1"
        )  # forward order: the mid block runs before the up blocks
        assert not torch.allclose(uniform, stock)
        assert torch.equal(unet(**inputs).sample, stock)
    with (
        pytest.raises(IncompatibleModelError, match="no temporal convolution") as info,
        bypass_temporal_convs(unet),
    ):
        pass
    assert "motion modules are the only path between frames" in str(info.value)
