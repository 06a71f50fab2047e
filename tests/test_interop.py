"""``motions import`` / ``motions export``: upstream (cloneofsimo) lists, MotionDirector, peft.

Upstream files are built here from the tiny model in the documented order by a
walk written the way cloneofsimo's injector finds layers (every Linear under a
``TransformerTemporalModel`` whose name contains a target, in
``named_modules()`` order), not with motionsep's own recipe code, and loaded
back the way the upstream loader does (each list element becomes a module
weight), so the tests check the format against the upstream semantics.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from typer.testing import CliRunner

from motionsep.config import Recipe
from motionsep.model import lora, motion, tap
from motionsep.model.components import Components, load_components, load_unet, unet_config_hash
from motionsep.model.interop import recipe_layers, unet_skeleton
from motionsep.sample import generate_videos, generation_settings
from motionsep_cli.app import app

RANK = 4
TEMPORAL_TRANSFORMERS = 17  # the tiny model has ZeroScope's block layout
SAMPLE = {"steps": 2, "guidance": 6.0, "width": 16, "height": 16, "frames": 4, "seed": 3}

# What cloneofsimo's injector matches inside each TransformerTemporalModel
# (substrings of the module name), per upstream program.
UPSTREAM_NEEDLES = {
    "reference": ("attn1.to_k", "attn2.to_k", "attn1.to_out", "attn2.to_out"),
    "motiondirector": ("attn1", "attn2", "ff"),
}

runner = CliRunner()


# ---------------------------------------------------------------------------
# upstream semantics, written independently of motionsep


def upstream_order(unet: nn.Module, program: str) -> list[tuple[str, nn.Linear]]:
    """The Linear layers an upstream injector adapts, in the order its list holds them."""
    layers = []
    for name, module in unet.named_modules():
        if type(module).__name__ != "TransformerTemporalModel":
            continue
        for sub, child in module.named_modules():
            if isinstance(child, nn.Linear) and any(n in sub for n in UPSTREAM_NEEDLES[program]):
                layers.append((f"{name}.{sub}", child))
    return layers


class UpstreamLoraLinear(nn.Module):
    """cloneofsimo's LoraInjectedLinear at inference: ``W x + up(down(x)) * scale``."""

    def __init__(self, linear: nn.Linear, rank: int) -> None:
        super().__init__()
        self.linear = linear
        self.lora_down = nn.Linear(linear.in_features, rank, bias=False)
        self.lora_up = nn.Linear(rank, linear.out_features, bias=False)
        self.scale = 1.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x) + self.lora_up(self.lora_down(x)) * self.scale


def load_like_upstream(unet: nn.Module, loras: list[Any], program: str = "reference") -> None:
    """Injects a list as the upstream loader does: element by element, as module weights."""
    for name, linear in upstream_order(unet, program):
        parent_name, _, child = name.rpartition(".")
        wrapped = UpstreamLoraLinear(linear, int(loras[1].shape[0]))
        # Assigning the element itself, as upstream does: it must be a Parameter.
        wrapped.lora_up.weight = loras.pop(0)
        wrapped.lora_down.weight = loras.pop(0)
        setattr(unet.get_submodule(parent_name), child, wrapped)
    assert loras == [], f"{len(loras)} tensors left over"


def read_like_upstream(path: Path) -> list[Any]:
    """``torch.load`` for .pt; cloneofsimo's parse_safeloras for .safetensors."""
    if path.suffix == ".pt":
        return list(torch.load(path))
    tensors = load_file(str(path))
    count = len(tensors) // 2
    result: list[Any] = []
    for index in range(count):
        result.append(nn.Parameter(tensors[f"unet:{index}:up"]))
        result.append(nn.Parameter(tensors[f"unet:{index}:down"]))
    return result


def random_upstream_list(unet: nn.Module, program: str, seed: int = 1) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    tensors = []
    for _, linear in upstream_order(unet, program):
        tensors.append(torch.randn(linear.out_features, RANK, generator=generator) * 0.3)
        tensors.append(torch.randn(RANK, linear.in_features, generator=generator) * 0.3)
    return tensors


def unet_inputs() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return {
        "sample": torch.randn(1, 4, 4, 8, 8, generator=generator),
        "timestep": torch.tensor(300),
        "encoder_hidden_states": torch.randn(1, 6, 32, generator=generator),
    }


def run_unet(unet: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return unet(**unet_inputs()).sample


# ---------------------------------------------------------------------------
# fixtures


def save_package(folder: Path, model_dir: Path, recipe: Recipe, seed: int = 0) -> Path:
    """A motion package of ``recipe`` on the tiny model with nonzero random LoRA weights."""
    unet = load_unet(model_dir)
    torch.manual_seed(seed)
    injection = tap.inject_motion_lora(unet, recipe, RANK)
    with torch.no_grad():
        for param in lora.adapter_parameters(unet, tap.MOTION_ADAPTER):
            param.normal_(std=0.3)
    metadata = motion.MotionMetadata(
        recipe=recipe,
        lora_targets=list(injection.adapted),
        lora_rank=injection.rank,
        lora_alpha=injection.alpha,
        base_model=motion.BaseModelRecord(
            id=str(model_dir), revision=None, unet_config_hash=unet_config_hash(dict(unet.config))
        ),
    )
    return motion.save_motion(folder, lora.adapter_state_dict(unet), metadata)


@pytest.fixture(scope="module")
def packages(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("originals")
    return {
        recipe.value: save_package(root / recipe.value, tiny_model_dir, recipe, seed=i)
        for i, recipe in enumerate(Recipe)
    }


@pytest.fixture(scope="module")
def components(tiny_model_dir: Path) -> Components:
    return load_components(tiny_model_dir)


@pytest.fixture(scope="module")
def original_frames(
    components: Components, packages: dict[str, Path]
) -> dict[str, tuple[np.ndarray, torch.Tensor]]:
    return {
        recipe: frames(components, motion.load_motion(path))
        for recipe, path in packages.items()
        if recipe != "motiondirector"
    }


def frames(
    components: Components, package: motion.MotionPackage
) -> tuple[np.ndarray, torch.Tensor]:
    settings = generation_settings(
        package, overrides={"model": {"name": str(components.path)}, "sample": SAMPLE}
    )
    video = generate_videos(["a red car"], settings, package, components=components)[0]
    return video.frames, video.latents


def invoke(*args: str) -> Any:
    return runner.invoke(app, ["motions", *args])


def import_args(source: Path, name: str, model_dir: Path, *extra: str) -> list[str]:
    return ["import", str(source), "--name", name, "--model", str(model_dir), *extra]


def store_is_empty(home: Path) -> bool:
    return not home.exists() or not any(home.rglob("*"))


# ---------------------------------------------------------------------------
# the documented order


def test_upstream_order_is_what_cloneofsimos_injector_finds(tiny_unet: nn.Module) -> None:
    skeleton = unet_skeleton(dict(tiny_unet.config))
    reference = [layer.name for layer in recipe_layers(skeleton, Recipe.REFERENCE)]
    assert reference == [name for name, _ in upstream_order(tiny_unet, "reference")]
    assert len(reference) == 4 * TEMPORAL_TRANSFORMERS
    block = "transformer_in.transformer_blocks.0"
    assert reference[:4] == [
        f"{block}.attn1.to_k",
        f"{block}.attn1.to_out.0",
        f"{block}.attn2.to_k",
        f"{block}.attn2.to_out.0",
    ]
    # named_modules() meets up_blocks before mid_block (registered first).
    assert reference[-5].startswith("up_blocks.3.temp_attentions.2.")
    assert reference[-1] == "mid_block.temp_attentions.0.transformer_blocks.0.attn2.to_out.0"

    director = [layer.name for layer in recipe_layers(skeleton, Recipe.MOTIONDIRECTOR)]
    assert director == [name for name, _ in upstream_order(tiny_unet, "motiondirector")]
    assert len(director) == 10 * TEMPORAL_TRANSFORMERS


# ---------------------------------------------------------------------------
# round trips


@pytest.mark.parametrize("recipe", ["reference", "paper"])
@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_upstream_round_trip_gives_bit_identical_videos(
    recipe: str,
    suffix: str,
    packages: dict[str, Path],
    original_frames: dict[str, tuple[np.ndarray, torch.Tensor]],
    components: Components,
    tiny_model_dir: Path,
    store_home: Path,
    tmp_path: Path,
) -> None:
    exported = tmp_path / f"500_unet{suffix}"
    result = invoke("export", str(packages[recipe]), "--format", "upstream", "--out", str(exported))
    assert result.exit_code == 0, result.stderr
    assert result.stdout.strip() == str(exported)

    # The upstream loader takes it as it is, and computes what motionsep computes.
    original = motion.load_motion(packages[recipe])
    ours = load_unet(tiny_model_dir)
    motion.apply_motion(ours, original)
    theirs = load_unet(tiny_model_dir)
    load_like_upstream(theirs, read_like_upstream(exported))
    assert torch.allclose(run_unet(theirs), run_unet(ours), atol=1e-6, rtol=0)

    result = invoke("import", str(exported), "--name", "back", "--model", str(tiny_model_dir))
    assert result.exit_code == 0, result.stderr
    imported = motion.load_motion(store_home / "motions" / "back")
    assert imported.metadata.recipe.value == recipe
    assert imported.metadata.lora_targets == original.metadata.lora_targets
    assert imported.adapter_state.keys() == original.adapter_state.keys()
    assert all(torch.equal(imported.adapter_state[k], v) for k, v in original.adapter_state.items())

    video, latents = frames(components, imported)
    assert np.array_equal(video, original_frames[recipe][0])
    assert torch.equal(latents, original_frames[recipe][1])


def test_paper_motion_exports_as_reference_layout_with_zero_to_out(
    packages: dict[str, Path], tiny_unet: nn.Module, tmp_path: Path
) -> None:
    out = tmp_path / "paper.safetensors"
    assert (
        invoke("export", str(packages["paper"]), "--format", "upstream", "-o", str(out)).exit_code
        == 0
    )
    tensors = load_file(str(out))
    order = upstream_order(tiny_unet, "reference")
    assert len(tensors) == 2 * len(order)
    state = motion.load_motion(packages["paper"]).adapter_state
    for index, (name, linear) in enumerate(order):
        up, down = tensors[f"unet:{index}:up"], tensors[f"unet:{index}:down"]
        assert up.shape == (linear.out_features, RANK) and down.shape == (RANK, linear.in_features)
        if name.endswith("to_out.0"):
            assert not up.any() and not down.any()
        else:
            assert torch.equal(up, state[f"{name}.lora_B.weight"])
            assert torch.equal(down, state[f"{name}.lora_A.weight"])
    from safetensors import safe_open

    with safe_open(str(out), framework="pt") as handle:
        metadata = handle.metadata()
    assert json.loads(metadata["unet"]) == ["TransformerTemporalModel"]
    assert metadata["unet:0:rank"] == str(RANK)


def test_pt_export_holds_only_a_list_of_tensors(packages: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "lora" / "500_unet.pt"
    assert (
        invoke(
            "export", str(packages["reference"]), "--format", "upstream", "-o", str(out)
        ).exit_code
        == 0
    )
    loaded = torch.load(out, weights_only=True)
    assert isinstance(loaded, list) and len(loaded) == 2 * 4 * TEMPORAL_TRANSFORMERS
    assert all(isinstance(t, torch.Tensor) for t in loaded)


def test_peft_round_trip_gives_bit_identical_videos(
    packages: dict[str, Path],
    original_frames: dict[str, tuple[np.ndarray, torch.Tensor]],
    components: Components,
    tiny_model_dir: Path,
    store_home: Path,
    tmp_path: Path,
) -> None:
    from peft import PeftModel

    out = tmp_path / "dolly-peft"
    result = invoke("export", str(packages["paper"]), "--format", "peft", "--out", str(out))
    assert result.exit_code == 0, result.stderr
    assert sorted(p.name for p in out.iterdir()) == [
        ".motionsep-output.json",  # the marker: `export --force` may replace this folder
        "adapter_config.json",
        "adapter_model.safetensors",
    ]

    # Standard peft loads it and computes what motionsep computes.
    original = motion.load_motion(packages["paper"])
    ours = load_unet(tiny_model_dir)
    motion.apply_motion(ours, original)
    with_peft = PeftModel.from_pretrained(load_unet(tiny_model_dir), str(out))
    assert torch.equal(run_unet(with_peft), run_unet(ours))

    result = invoke(*import_args(out, "back", tiny_model_dir))
    assert result.exit_code == 0, result.stderr
    imported = motion.load_motion(store_home / "motions" / "back")
    assert imported.metadata.recipe is Recipe.PAPER
    video, latents = frames(components, imported)
    assert np.array_equal(video, original_frames["paper"][0])
    assert torch.equal(latents, original_frames["paper"][1])


# ---------------------------------------------------------------------------
# fixtures in the upstream format, built here


@pytest.mark.parametrize("layout", ["pt-list", "positions", "safeloras"])
def test_upstream_fixture_imports_as_reference(
    layout: str, tiny_model_dir: Path, tiny_unet: nn.Module, store_home: Path, tmp_path: Path
) -> None:
    tensors = random_upstream_list(tiny_unet, "reference")
    if layout == "pt-list":
        source = tmp_path / "car_turn.pt"
        torch.save(tensors, source)
    elif layout == "positions":
        source = tmp_path / "car_turn.safetensors"
        save_file({str(i): t for i, t in enumerate(tensors)}, str(source))
    else:
        source = tmp_path / "car_turn.safetensors"
        named = {}
        for i in range(len(tensors) // 2):
            named[f"unet:{i}:up"], named[f"unet:{i}:down"] = tensors[2 * i], tensors[2 * i + 1]
        save_file(named, str(source), metadata={"unet": '["TransformerTemporalModel"]'})

    result = invoke(*import_args(source, "car-turn", tiny_model_dir, "--json"))
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert (report["recipe"], report["rank"], report["format"]) == ("reference", RANK, "upstream")

    package = motion.load_motion(store_home / "motions" / "car-turn")
    assert package.metadata.recipe is Recipe.REFERENCE
    assert package.metadata.training["imported"]["source"] == source.name
    for index, (name, _) in enumerate(upstream_order(tiny_unet, "reference")):
        assert torch.equal(package.adapter_state[f"{name}.lora_B.weight"], tensors[2 * index])
        assert torch.equal(package.adapter_state[f"{name}.lora_A.weight"], tensors[2 * index + 1])

    # motionsep runs what the upstream loader runs.
    theirs = load_unet(tiny_model_dir)
    load_like_upstream(theirs, [nn.Parameter(t) for t in tensors])
    ours = load_unet(tiny_model_dir)
    motion.apply_motion(ours, package)
    assert torch.allclose(run_unet(ours), run_unet(theirs), atol=1e-6, rtol=0)


def test_motiondirector_lora_imports_with_its_recipe(
    tiny_model_dir: Path, tiny_unet: nn.Module, store_home: Path, tmp_path: Path
) -> None:
    tensors = random_upstream_list(tiny_unet, "motiondirector")
    source = tmp_path / "500_unet.pt"
    torch.save(tensors, source)
    result = invoke(*import_args(source, "md", tiny_model_dir, "--format", "motiondirector"))
    assert result.exit_code == 0, result.stderr
    package = motion.load_motion(store_home / "motions" / "md")
    assert package.metadata.recipe is Recipe.MOTIONDIRECTOR
    theirs = load_unet(tiny_model_dir)
    load_like_upstream(theirs, [nn.Parameter(t) for t in tensors], "motiondirector")
    ours = load_unet(tiny_model_dir)
    motion.apply_motion(ours, package)
    assert torch.allclose(run_unet(ours), run_unet(theirs), atol=1e-6, rtol=0)


# ---------------------------------------------------------------------------
# refusals: clear message, exit 2, nothing written


def refused(result: Any, home: Path, *needles: str) -> None:
    assert result.exit_code == 2, (result.exit_code, result.stderr)
    assert result.stdout == ""
    message = " ".join(result.stderr.split())
    for needle in needles:
        assert needle in message, message
    assert store_is_empty(home)


def test_wrong_count_is_refused(
    tiny_model_dir: Path, tiny_unet: nn.Module, store_home: Path, tmp_path: Path
) -> None:
    source = tmp_path / "short.pt"
    torch.save(random_upstream_list(tiny_unet, "reference")[:-2], source)
    result = invoke(*import_args(source, "short", tiny_model_dir))
    refused(result, store_home, "holds 134 tensors", "136 for reference")


def test_reference_list_is_not_a_motiondirector_lora(
    tiny_model_dir: Path, tiny_unet: nn.Module, store_home: Path, tmp_path: Path
) -> None:
    source = tmp_path / "car.pt"
    torch.save(random_upstream_list(tiny_unet, "reference"), source)
    result = invoke(*import_args(source, "car", tiny_model_dir, "--format", "motiondirector"))
    refused(result, store_home, "holds 136 tensors", "340 for motiondirector")


def test_wrong_shape_is_refused_naming_the_layer(
    tiny_model_dir: Path, tiny_unet: nn.Module, store_home: Path, tmp_path: Path
) -> None:
    tensors = random_upstream_list(tiny_unet, "reference")
    tensors[11] = torch.zeros(RANK, 7)  # down of pair 5
    source = tmp_path / "bent.safetensors"
    save_file({str(i): t for i, t in enumerate(tensors)}, str(source))
    name = upstream_order(tiny_unet, "reference")[5][0]
    result = invoke(*import_args(source, "bent", tiny_model_dir))
    refused(result, store_home, f"pair 5 ({name})", "expected up", "found", "(4, 7)")


def test_swapped_pairs_are_refused_with_a_hint(
    tiny_model_dir: Path, tiny_unet: nn.Module, store_home: Path, tmp_path: Path
) -> None:
    tensors = random_upstream_list(tiny_unet, "reference")
    swapped = [t for i in range(0, len(tensors), 2) for t in (tensors[i + 1], tensors[i])]
    source = tmp_path / "swapped.pt"
    torch.save(swapped, source)
    result = invoke(*import_args(source, "swapped", tiny_model_dir))
    refused(result, store_home, "does not fit the base U-Net", "[down, up]")


def test_pickle_with_a_string_is_refused(
    tiny_model_dir: Path, tiny_unet: nn.Module, store_home: Path, tmp_path: Path
) -> None:
    tensors = random_upstream_list(tiny_unet, "reference")
    source = tmp_path / "dict.pt"
    torch.save({**{str(i): t for i, t in enumerate(tensors)}, "note": "hello"}, source)
    result = invoke(*import_args(source, "dict", tiny_model_dir))
    refused(result, store_home, "key 'note' is a str, not a tensor")

    source = tmp_path / "list.pt"
    torch.save([*tensors[:3], "hello"], source)
    result = invoke(*import_args(source, "list", tiny_model_dir))
    refused(result, store_home, "element 3 of the list is a str, not a tensor")


class _Payload:
    """A pickled object whose unpickling would create a file: never unpickled by import."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (Path.touch, (self.marker,))


def test_pickle_with_code_is_refused_without_running_it(
    tiny_model_dir: Path, store_home: Path, tmp_path: Path
) -> None:
    marker = tmp_path / "ran"
    source = tmp_path / "evil.pt"
    with source.open("wb") as handle:
        pickle.dump([_Payload(marker)], handle, protocol=2)
    result = invoke(*import_args(source, "evil", tiny_model_dir))
    refused(result, store_home, "refused by torch.load(weights_only=True)")
    assert not marker.exists()

    source = tmp_path / "number.pt"
    torch.save(42, source)
    refused(invoke(*import_args(source, "number", tiny_model_dir)), store_home, "holds a int")


def test_peft_adapters_that_are_no_motion_are_refused(
    packages: dict[str, Path], tiny_model_dir: Path, store_home: Path, tmp_path: Path
) -> None:
    out = tmp_path / "adapter"
    assert (
        invoke("export", str(packages["reference"]), "--format", "peft", "-o", str(out)).exit_code
        == 0
    )
    config_file = out / "adapter_config.json"
    config = json.loads(config_file.read_text())

    config_file.write_text(json.dumps({**config, "use_dora": True}))
    refused(invoke(*import_args(out, "dora", tiny_model_dir)), store_home, "use_dora")

    config_file.write_text(json.dumps(config))
    weights = load_file(str(out / "adapter_model.safetensors"))
    spatial = "base_model.model.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_k"
    weights[f"{spatial}.lora_A.weight"] = torch.zeros(RANK, 32)
    weights[f"{spatial}.lora_B.weight"] = torch.zeros(32, RANK)
    save_file(weights, str(out / "adapter_model.safetensors"))
    refused(
        invoke(*import_args(out, "spatial", tiny_model_dir)),
        store_home,
        "match no recipe",
        "not temporal attention targets",
    )


def test_import_keeps_an_existing_motion_unless_forced(
    packages: dict[str, Path], tiny_model_dir: Path, store_home: Path, tmp_path: Path
) -> None:
    out = tmp_path / "ref.safetensors"
    assert (
        invoke(
            "export", str(packages["reference"]), "--format", "upstream", "-o", str(out)
        ).exit_code
        == 0
    )
    assert invoke(*import_args(out, "car", tiny_model_dir)).exit_code == 0
    adapter = store_home / "motions" / "car" / motion.ADAPTER_FILE
    before = adapter.read_bytes()
    result = invoke(*import_args(out, "car", tiny_model_dir))
    assert result.exit_code == 2 and "already exists" in result.stderr
    assert adapter.read_bytes() == before
    assert invoke(*import_args(out, "car", tiny_model_dir, "--force")).exit_code == 0


def test_export_refuses_to_overwrite_and_wrong_suffixes(
    packages: dict[str, Path], tmp_path: Path
) -> None:
    taken = tmp_path / "taken.safetensors"
    taken.write_bytes(b"keep me")
    result = invoke("export", str(packages["paper"]), "--format", "upstream", "-o", str(taken))
    assert result.exit_code == 2 and "already exists" in result.stderr
    assert taken.read_bytes() == b"keep me"
    result = invoke(
        "export", str(packages["paper"]), "--format", "upstream", "-o", str(tmp_path / "x.ckpt")
    )
    assert result.exit_code == 2 and ".safetensors" in result.stderr
    assert not (tmp_path / "x.ckpt").exists()


def test_import_refuses_while_a_training_of_that_name_runs(
    packages: dict[str, Path], tiny_model_dir: Path, store_home: Path, tmp_path: Path
) -> None:
    from motionsep.store import lock

    out = tmp_path / "ref.safetensors"
    assert (
        invoke(
            "export", str(packages["reference"]), "--format", "upstream", "-o", str(out)
        ).exit_code
        == 0
    )
    with lock(store_home / "motions" / ".car.lock", "training of motion 'car'"):
        result = invoke(*import_args(out, "car", tiny_model_dir))
    assert result.exit_code == 1
    assert "cannot import motion 'car'" in result.stderr and "already running" in result.stderr
    assert not (store_home / "motions" / "car").exists()
