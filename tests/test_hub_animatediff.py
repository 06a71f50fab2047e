"""`motionsep download animatediff`: a Stable Diffusion 1.5 base and a motion adapter, joined.

Two repositories are served by the loopback hub of tests/_hub_server.py,
both cut from the tiny AnimateDiff model: an "SD 1.5" repository (its
``unet/`` UNet2DConditionModel, VAE, text encoder, tokenizer and a PNDM
scheduler, with the model index, safety checker and feature extractor of
the real one) and a "motion adapter" repository (``config.json`` and
weights at the top, as guoyww/animatediff-motion-adapter-v1-5-2 has them).
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from motionsep.errors import DamagedModelError, HubAccessError, HubUnreachableError, UsageError
from motionsep.hub import (
    MOTION_ADAPTER_REPO,
    SD15_REPO,
    download,
    install_animatediff,
    plan_files,
)
from motionsep.model.components import load_components
from motionsep.store import MODEL_RECORD, Store
from motionsep_cli.app import app
from tests._hub_server import FakeHub, Repo, folder_files, running_hub, store_entries

runner = CliRunner()

UNET_WEIGHTS = "unet/diffusion_pytorch_model.safetensors"
ADAPTER_WEIGHTS = "diffusion_pytorch_model.safetensors"

# stable-diffusion-v1-5/stable-diffusion-v1-5's model index and scheduler config
SD15_INDEX = {
    "_class_name": "StableDiffusionPipeline",
    "_diffusers_version": "0.6.0",
    "feature_extractor": ["transformers", "CLIPImageProcessor"],
    "safety_checker": ["stable_diffusion", "StableDiffusionSafetyChecker"],
    "scheduler": ["diffusers", "PNDMScheduler"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "unet": ["diffusers", "UNet2DConditionModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}
SD15_SCHEDULER = {
    "_class_name": "PNDMScheduler",
    "_diffusers_version": "0.6.0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
    "clip_sample": False,
}
# Files of the real repository that motionsep must not fetch.
UNWANTED = {
    "safety_checker/config.json": b'{"_name_or_path": "CompVis/stable-diffusion-safety-checker"}',
    "safety_checker/model.safetensors": b"safety checker weights: never fetched",
    "feature_extractor/preprocessor_config.json": b'{"crop_size": 224}',
    "v1-5-pruned-emaonly.safetensors": b"single-file checkpoint: never fetched",
    "README.md": b"# Stable Diffusion v1-5\n",
}


def _json(value: object) -> bytes:
    return json.dumps(value, indent=2).encode()


def sd15_files(tiny_dir: Path, scheduler: dict[str, object] | None = None) -> dict[str, bytes]:
    """The tiny AnimateDiff model without its adapter, laid out like the SD 1.5 repository."""
    files = {p: d for p, d in folder_files(tiny_dir).items() if not p.startswith("motion_adapter/")}
    files["model_index.json"] = _json(SD15_INDEX)
    files["scheduler/scheduler_config.json"] = _json(scheduler or SD15_SCHEDULER)
    return files | UNWANTED


def adapter_files(tiny_dir: Path) -> dict[str, bytes]:
    """The tiny model's motion adapter, laid out like the adapter repository."""
    return {
        "config.json": (tiny_dir / "motion_adapter" / "config.json").read_bytes(),
        ADAPTER_WEIGHTS: (tiny_dir / "motion_adapter" / ADAPTER_WEIGHTS).read_bytes(),
        "README.md": b"# motion adapter\n",
    }


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeHub]:
    with running_hub(monkeypatch) as server:
        yield server


@pytest.fixture
def repos(hub: FakeHub, tiny_animatediff_dir: Path) -> tuple[Repo, Repo]:
    """The default base and motion adapter, served under their real ids."""
    hub.repos[SD15_REPO] = Repo(sd15_files(tiny_animatediff_dir))
    hub.repos[MOTION_ADAPTER_REPO] = Repo(adapter_files(tiny_animatediff_dir))
    return hub.repos[SD15_REPO], hub.repos[MOTION_ADAPTER_REPO]


def _direct_unet(tiny_dir: Path) -> torch.nn.Module:
    """The same parts joined without motionsep's store: diffusers' own loaders."""
    from diffusers import MotionAdapter, UNet2DConditionModel

    from motionsep.model.family import join_motion_unet

    unet2d = UNet2DConditionModel.from_pretrained(tiny_dir, subfolder="unet")
    adapter = MotionAdapter.from_pretrained(tiny_dir, subfolder="motion_adapter")
    # frozen like load_components' U-Net: CPU kernels differ in the last bit otherwise
    return join_motion_unet(unet2d, adapter).eval().requires_grad_(False)


def _output(unet: torch.nn.Module) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(1, 4, 3, 8, 8, generator=generator)
    text = torch.randn(1, 8, 32, generator=generator)
    with torch.no_grad():
        return unet(latents, torch.tensor([500]), encoder_hidden_states=text).sample


# -- file selection (no server) ---------------------------------------------------------------

SD15_MAIN = [  # stable-diffusion-v1-5/stable-diffusion-v1-5 at main
    ".gitattributes",
    "README.md",
    "feature_extractor/preprocessor_config.json",
    "model_index.json",
    "safety_checker/config.json",
    "safety_checker/model.fp16.safetensors",
    "safety_checker/model.safetensors",
    "safety_checker/pytorch_model.bin",
    "scheduler/scheduler_config.json",
    "text_encoder/config.json",
    "text_encoder/model.fp16.safetensors",
    "text_encoder/model.safetensors",
    "text_encoder/pytorch_model.bin",
    "tokenizer/merges.txt",
    "tokenizer/special_tokens_map.json",
    "tokenizer/tokenizer_config.json",
    "tokenizer/vocab.json",
    "unet/config.json",
    "unet/diffusion_pytorch_model.bin",
    "unet/diffusion_pytorch_model.fp16.safetensors",
    "unet/diffusion_pytorch_model.non_ema.safetensors",
    "unet/diffusion_pytorch_model.safetensors",
    "v1-5-pruned-emaonly.ckpt",
    "v1-5-pruned-emaonly.safetensors",
    "v1-inference.yaml",
    "vae/config.json",
    "vae/diffusion_pytorch_model.bin",
    "vae/diffusion_pytorch_model.fp16.safetensors",
    "vae/diffusion_pytorch_model.safetensors",
]
ADAPTER_MAIN = [  # guoyww/animatediff-motion-adapter-v1-5-2 at main
    ".gitattributes",
    "README.md",
    "config.json",
    "diffusion_pytorch_model.fp16.safetensors",
    "diffusion_pytorch_model.safetensors",
]


def test_plan_takes_only_what_animatediff_needs_from_sd15_and_the_adapter() -> None:
    base = plan_files(SD15_MAIN, kind="text-to-video", variant="fp16")
    assert not any(p.startswith(("safety_checker/", "feature_extractor/")) for p in base.files)
    assert not any("/" not in p and p != "model_index.json" for p in base.files)
    assert "unet/diffusion_pytorch_model.fp16.safetensors" in base.files
    assert not base.converts
    adapter = plan_files(ADAPTER_MAIN, kind="motion-adapter")
    assert adapter.files == ("config.json", "diffusion_pytorch_model.safetensors")


# -- the default install ---------------------------------------------------------------------


def test_animatediff_installs_sd15_and_the_adapter_as_one_model_that_loads(
    hub: FakeHub, repos: tuple[Repo, Repo], tiny_animatediff_dir: Path, store_home: Path
) -> None:
    sd15, adapter = repos
    result = runner.invoke(app, ["download", "animatediff", "--json"])
    assert result.exit_code == 0, result.stderr
    record = json.loads(result.stdout)
    folder = Path(record["path"])
    assert folder == store_home / "models" / "animatediff"
    assert record["revision"] == sd15.sha
    assert SD15_REPO in record["source"] and MOTION_ADAPTER_REPO in record["source"]
    sources = json.loads((folder / MODEL_RECORD).read_text())["sources"]
    assert sources == [
        {"role": "base", "repo": SD15_REPO, "revision": sd15.sha},
        {"role": "motion_adapter", "repo": MOTION_ADAPTER_REPO, "revision": adapter.sha},
    ]
    # only what the pipeline needs, each file fetched once
    assert all(hub.gets[path] == 0 for path in UNWANTED)
    assert not (folder / "safety_checker").exists() and not (folder / "README.md").exists()
    assert set(hub.gets.values()) == {1}
    assert (folder / "motion_adapter" / ADAPTER_WEIGHTS).is_file()
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == "AnimateDiffPipeline" and "safety_checker" not in index
    scheduler = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["_class_name"] == "DDIMScheduler"
    assert scheduler["beta_schedule"] == "linear" and scheduler["clip_sample"] is False

    parts = load_components(folder)
    assert type(parts.unet).__name__ == "UNetMotionModel"
    assert torch.equal(_output(parts.unet), _output(_direct_unet(tiny_animatediff_dir)))
    from diffusers import AnimateDiffPipeline

    pipeline = AnimateDiffPipeline.from_pretrained(folder)
    assert type(pipeline.unet).__name__ == "UNetMotionModel"
    assert type(pipeline.scheduler).__name__ == "DDIMScheduler"
    assert store_entries(store_home) == ["animatediff"]


def test_a_rerun_is_a_no_op_and_repair_restores_a_damaged_file(
    hub: FakeHub, repos: tuple[Repo, Repo], tmp_path: Path
) -> None:
    store = Store(tmp_path)
    first = download(store, "animatediff", endpoint=hub.endpoint)
    before = Counter(hub.gets)
    again = download(store, "animatediff", endpoint=hub.endpoint)
    assert again == first
    assert hub.gets == before, "a rerun fetched files again"
    # the same name with another adapter: refused, not silently kept or replaced
    with pytest.raises(UsageError, match="--name"):
        install_animatediff(store, adapter="acme/other-adapter", endpoint=hub.endpoint)

    weights = first.path / "motion_adapter" / ADAPTER_WEIGHTS
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(DamagedModelError, match="motion_adapter/"):
        download(store, "animatediff", endpoint=hub.endpoint)
    repaired = download(store, "animatediff", endpoint=hub.endpoint, repair=True)
    assert weights.read_bytes() == repos[1].files[ADAPTER_WEIGHTS]
    assert repaired.revision == repos[0].sha
    assert hub.gets[ADAPTER_WEIGHTS] == before[ADAPTER_WEIGHTS] + 1


def test_an_interrupted_download_resumes_without_fetching_finished_files(
    hub: FakeHub, repos: tuple[Repo, Repo], tmp_path: Path
) -> None:
    store = Store(tmp_path)
    hub.cut_at[UNET_WEIGHTS] = 5_000_000  # every try is cut: the client gives up
    with pytest.raises(HubUnreachableError) as failure:
        download(store, "animatediff", endpoint=hub.endpoint)
    assert UNET_WEIGHTS in failure.value.message
    assert hub.waits, "gave up without retrying the cut file"
    assert "rerun" in str(failure.value.hint) and "--from PATH" in str(failure.value.hint)
    assert store_entries(tmp_path) == [".partial-animatediff"]
    assert hub.gets[ADAPTER_WEIGHTS] == 1  # the smaller adapter weights came first

    hub.cut_at.clear()
    before = Counter(hub.gets)
    record = download(store, "animatediff", endpoint=hub.endpoint)
    finished = [p for p in before if p != UNET_WEIGHTS]
    assert all(hub.gets[p] == before[p] for p in finished), "finished files were fetched again"
    assert (record.path / UNET_WEIGHTS).read_bytes() == repos[0].files[UNET_WEIGHTS]
    assert store_entries(tmp_path) == ["animatediff"]


def test_a_gated_adapter_is_named_with_what_to_do(
    hub: FakeHub, repos: tuple[Repo, Repo], tmp_path: Path
) -> None:
    repos[1].token = "hf_secret"
    with pytest.raises(HubAccessError) as failure:
        download(Store(tmp_path), "animatediff", endpoint=hub.endpoint)
    assert MOTION_ADAPTER_REPO in failure.value.message
    assert "HF_TOKEN" in str(failure.value.hint)
    assert store_entries(tmp_path) == []


# -- other bases and adapters ------------------------------------------------------------------


def test_another_base_from_the_hub_keeps_its_prediction_type_and_is_listed(
    hub: FakeHub, repos: tuple[Repo, Repo], tiny_animatediff_dir: Path, store_home: Path
) -> None:
    v_scheduler = {**SD15_SCHEDULER, "prediction_type": "v_prediction"}
    hub.repos["acme/sd15-v"] = Repo(sd15_files(tiny_animatediff_dir, v_scheduler))
    result = runner.invoke(app, ["download", "animatediff", "--base", "acme/sd15-v", "--json"])
    assert result.exit_code == 0, result.stderr
    folder = Path(json.loads(result.stdout)["path"])
    assert folder.name == "animatediff--acme--sd15-v"
    parts = load_components(folder)
    assert parts.scheduler.config.prediction_type == "v_prediction"
    assert parts.scheduler.config.beta_schedule == "linear"

    listed = runner.invoke(app, ["download", "--list", "--json"])
    rows = {row["name"]: row for row in json.loads(listed.stdout)}
    assert rows["animatediff"]["adapter_repo_id"] == MOTION_ADAPTER_REPO
    assert not rows["animatediff"]["installed"]
    joined = rows["animatediff--acme--sd15-v"]
    assert joined["installed"] and joined["repo_id"] == "acme/sd15-v"
    assert joined["adapter_repo_id"] == MOTION_ADAPTER_REPO
    # the store name reaches the recorded sources: a rerun by name is a no-op
    before = Counter(hub.gets)
    again = runner.invoke(app, ["download", "animatediff--acme--sd15-v"])
    assert again.exit_code == 0, again.stderr
    assert "already installed" in again.stderr and hub.gets == before


def test_from_puts_the_adapter_on_a_local_sd15_folder_and_leaves_it_as_it_was(
    hub: FakeHub, repos: tuple[Repo, Repo], tiny_animatediff_dir: Path, store_home: Path
) -> None:
    local = store_home.parent / "my-sd15"
    for path, data in sd15_files(tiny_animatediff_dir).items():
        (local / path).parent.mkdir(parents=True, exist_ok=True)
        (local / path).write_bytes(data)
    result = runner.invoke(app, ["download", "animatediff", "--from", str(local), "--json"])
    assert result.exit_code == 0, result.stderr
    record = json.loads(result.stdout)
    assert Path(record["path"]).name == "animatediff--my-sd15"
    assert record["revision"] is None and str(local.resolve()) in record["source"]
    load_components(Path(record["path"]))
    # the assembled configs were rewritten as new files, not through links to the source
    assert json.loads((local / "model_index.json").read_text()) == SD15_INDEX
    assert json.loads((local / "scheduler" / "scheduler_config.json").read_text()) == SD15_SCHEDULER
    assert hub.gets[UNET_WEIGHTS] == 0  # the base came from the folder


def test_pickled_adapter_weights_are_converted(
    hub: FakeHub, repos: tuple[Repo, Repo], tiny_animatediff_dir: Path, tmp_path: Path
) -> None:
    from safetensors.torch import load_file

    state = load_file(str(tiny_animatediff_dir / "motion_adapter" / ADAPTER_WEIGHTS))
    pickle = tmp_path / "adapter.bin"
    torch.save(state, pickle)
    files = adapter_files(tiny_animatediff_dir)
    del files[ADAPTER_WEIGHTS]
    files["diffusion_pytorch_model.bin"] = pickle.read_bytes()
    hub.repos["acme/old-adapter"] = Repo(files)
    record = install_animatediff(
        Store(tmp_path / "store"), adapter="acme/old-adapter", endpoint=hub.endpoint
    )
    assert not list(record.path.rglob("*.bin"))
    converted = load_file(str(record.path / "motion_adapter" / ADAPTER_WEIGHTS))
    assert converted.keys() == state.keys()
    assert all(torch.equal(converted[k], state[k]) for k in state)
    load_components(record.path)


def test_an_animatediff_folder_imports_as_it_is(
    tiny_animatediff_dir: Path, store_home: Path
) -> None:
    result = runner.invoke(app, ["download", "mine", "--from", str(tiny_animatediff_dir), "--json"])
    assert result.exit_code == 0, result.stderr
    folder = Path(json.loads(result.stdout)["path"])
    assert (folder / "motion_adapter" / ADAPTER_WEIGHTS).is_file()
    assert type(load_components(folder).unet).__name__ == "UNetMotionModel"


# -- refused before any weights are fetched -------------------------------------------------


def _sdxl_like(files: dict[str, bytes]) -> dict[str, bytes]:
    unet = json.loads(files["unet/config.json"])
    unet |= {
        "cross_attention_dim": 2048,
        "addition_embed_type": "text_time",
        "block_out_channels": [32, 64, 64],
        "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
        "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    }
    index = {**SD15_INDEX, "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"]}
    return files | {"unet/config.json": _json(unet), "model_index.json": _json(index)}


@pytest.mark.parametrize(
    ("base", "message"),
    [
        ("acme/sdxl", "not a Stable Diffusion 1.5-shaped model"),
        ("acme/zeroscope", "already a video model"),
    ],
)
def test_a_base_that_is_not_sd15_is_refused_early_with_exit_2(
    hub: FakeHub,
    repos: tuple[Repo, Repo],
    tiny_animatediff_dir: Path,
    tiny_model_dir: Path,
    store_home: Path,
    base: str,
    message: str,
) -> None:
    hub.repos["acme/sdxl"] = Repo(_sdxl_like(sd15_files(tiny_animatediff_dir)))
    hub.repos["acme/zeroscope"] = Repo(folder_files(tiny_model_dir))
    result = runner.invoke(app, ["download", "animatediff", "--base", base])
    assert result.exit_code == 2, result.stderr
    assert message in result.stderr and base in result.stderr
    assert "Traceback" not in result.stderr
    assert not any(p.endswith(".safetensors") for p in hub.gets), "weights were fetched"
    assert store_entries(store_home) == []


def test_an_adapter_that_does_not_fit_the_base_is_refused_early(
    hub: FakeHub, repos: tuple[Repo, Repo], tiny_animatediff_dir: Path, store_home: Path
) -> None:
    files = adapter_files(tiny_animatediff_dir)
    config = json.loads(files["config.json"])
    config["block_out_channels"] = [32, 64, 64, 128]
    hub.repos["acme/wide-adapter"] = Repo(files | {"config.json": _json(config)})
    result = runner.invoke(app, ["download", "animatediff", "--adapter", "acme/wide-adapter"])
    assert result.exit_code == 2, result.stderr
    assert "does not fit" in result.stderr and "[32, 64, 64, 128]" in result.stderr
    assert not any(p.endswith(".safetensors") for p in hub.gets), "weights were fetched"
    assert store_entries(store_home) == []


def test_an_sd15_repo_by_id_points_at_download_animatediff(
    hub: FakeHub, repos: tuple[Repo, Repo], store_home: Path
) -> None:
    result = runner.invoke(app, ["download", SD15_REPO])
    assert result.exit_code == 2, result.stderr
    assert f"motionsep download animatediff --base {SD15_REPO}" in result.stderr
    assert hub.gets[UNET_WEIGHTS] == 0
    assert store_entries(store_home) == []


def test_animatediff_options_are_checked_before_anything_runs(store_home: Path) -> None:
    other = runner.invoke(app, ["download", "zeroscope", "--base", "acme/sd"])
    assert other.exit_code == 2 and "apply to animatediff" in other.stderr
    both = runner.invoke(
        app, ["download", "animatediff", "--base", "acme/sd", "--from", str(store_home.parent)]
    )
    assert both.exit_code == 2 and "--base and --from" in both.stderr
    assert store_entries(store_home) == []


def test_help_teaches_the_animatediff_usage() -> None:
    result = runner.invoke(app, ["download", "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    for usage in ("motionsep download animatediff", "--base OWNER/REPO", "--adapter"):
        assert usage in result.stdout, usage


def test_sd2_shaped_base_is_refused_and_sd15_shaped_passes(tmp_path: Path) -> None:
    """SD 2.x has SD 1.5's blocks (the adapter would join) but 1024-wide OpenCLIP text."""
    from motionsep.hub import sd15_problems
    from motionsep.model.components import SD15_UNET_CONFIG

    def folder(name: str, width: int) -> Path:
        root = tmp_path / name
        for part, config in (
            ("unet", {**SD15_UNET_CONFIG, "_class_name": "UNet2DConditionModel"}),
            ("text_encoder", {"hidden_size": width}),
        ):
            (root / part).mkdir(parents=True)
            if part == "unet":
                config["cross_attention_dim"] = width
            (root / part / "config.json").write_text(json.dumps(config))
        (root / "model_index.json").write_text(json.dumps({"_class_name": "X"}))
        return root

    assert sd15_problems(folder("sd15", 768)) == []
    (problem,) = sd15_problems(folder("sd2", 1024))
    assert "1024" in problem and "2.x" in problem
