"""Motion LoRA injection (TAP): targets per recipe, numerics, freezing, switches."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

from motionsep.config import Recipe
from motionsep.errors import RecipeMismatchError
from motionsep.model import lora, recipes, tap

RANK = 4
# Temporal transformers, found by name only (not by class, not through recipes.py).
TEMPORAL = re.compile(r"^(transformer_in|.*\.temp_attentions\.\d+)$")
SPATIAL = re.compile(r"^.*\.attentions\.\d+$")
# DESIGN.md section 4: which projections of a temporal attention each recipe adapts.
DESIGN_TABLE: dict[Recipe, tuple[tuple[str, ...], bool]] = {
    Recipe.PAPER: (("to_k",), False),
    Recipe.REFERENCE: (("to_k", "to_out.0"), False),
    Recipe.MOTIONDIRECTOR: (("to_q", "to_k", "to_v", "to_out.0"), True),
}


def expected_motion_modules(unet: nn.Module, recipe: Recipe) -> set[str]:
    """The DESIGN.md table applied to module names, independently of recipes.py."""
    projections, feed_forward = DESIGN_TABLE[recipe]
    names = dict(unet.named_modules())
    temporal = [name for name in names if TEMPORAL.match(name)]
    assert "transformer_in" in temporal
    assert len(temporal) == 1 + 2 * 3 + 1 + 3 * 3  # in, down (3 x 2), mid, up (3 x 3)
    expected: set[str] = set()
    for prefix in temporal:
        for name, module in names.items():
            if not name.startswith(prefix + ".transformer_blocks."):
                continue
            rest = name[len(prefix) + len(".transformer_blocks.") :].split(".", 1)[-1]
            attn = re.fullmatch(r"attn[12]\.(.+)", rest)
            if attn and attn.group(1) in projections:
                expected.add(name)
            if feed_forward and rest.startswith("ff.") and isinstance(module, nn.Linear):
                expected.add(name)
    return expected


def unet_inputs(seed: int = 0, frames: int = 4) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {
        "sample": torch.randn(1, 4, frames, 8, 8, generator=generator),
        "timestep": torch.tensor(500),
        "encoder_hidden_states": torch.randn(1, 6, 32, generator=generator),
    }


def run(unet: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return unet(**inputs).sample


def randomize(unet: nn.Module, adapter: str, seed: int) -> None:
    """Nonzero up weights, so the adapter changes the output."""
    torch.manual_seed(seed)
    for param in lora.adapter_parameters(unet, adapter):
        with torch.no_grad():
            param.normal_(std=0.2)


@pytest.mark.parametrize("recipe", list(Recipe))
def test_adapted_modules_follow_design_table(tiny_unet: nn.Module, recipe: Recipe) -> None:
    expected = expected_motion_modules(tiny_unet, recipe)
    result = tap.inject_motion_lora(tiny_unet, recipe, RANK)
    assert set(result.adapted) == expected
    assert set(lora.adapted_modules(tiny_unet, tap.MOTION_ADAPTER)) == expected
    assert result.trainable_parameters == sum(
        p.numel() for p in tiny_unet.parameters() if p.requires_grad
    )
    assert result.alpha == RANK  # scaling 1: upstream LoRA has no alpha / r factor
    if recipe is Recipe.PAPER:
        for name in result.adapted:
            assert name.endswith(".to_k")
            assert not SPATIAL.match(name.split(".transformer_blocks.")[0])
        forbidden = ("to_q", "to_v", "to_out", ".ff.")
        assert not any(part in name for name in result.adapted for part in forbidden)


def test_gaussian_init_matches_upstream(tiny_unet: nn.Module) -> None:
    torch.manual_seed(0)
    rank = 8
    tap.inject_motion_lora(tiny_unet, Recipe.MOTIONDIRECTOR, rank)
    downs, ups = [], []
    for _, layer in lora.lora_layers(tiny_unet, tap.MOTION_ADAPTER):
        downs.append(layer.lora_A[tap.MOTION_ADAPTER].weight.flatten())
        ups.append(layer.lora_B[tap.MOTION_ADAPTER].weight.flatten())
    assert torch.cat(ups).abs().max() == 0
    assert torch.cat(downs).std().item() == pytest.approx(1 / rank, rel=0.05)


@pytest.mark.parametrize("recipe", list(Recipe))
def test_zero_up_weights_give_base_output_bitwise(tiny_unet: nn.Module, recipe: Recipe) -> None:
    inputs = unet_inputs()
    base = run(tiny_unet, inputs)
    torch.manual_seed(1)
    tap.inject_motion_lora(tiny_unet, recipe, RANK)
    tap.inject_spatial_lora(tiny_unet, RANK)
    assert torch.equal(run(tiny_unet, inputs), base)


def test_lora_numerics_equal_upstream(tiny_unet: nn.Module) -> None:
    tap.inject_motion_lora(tiny_unet, Recipe.PAPER, RANK)
    randomize(tiny_unet, tap.MOTION_ADAPTER, seed=2)
    name = "down_blocks.1.temp_attentions.0.transformer_blocks.0.attn1.to_k"
    layer = tiny_unet.get_submodule(name)
    base = layer.get_base_layer()
    down = layer.lora_A[tap.MOTION_ADAPTER].weight
    up = layer.lora_B[tap.MOTION_ADAPTER].weight
    x = torch.randn(3, 5, base.in_features, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        linear = nn.functional.linear
        by_hand = linear(x, base.weight, base.bias) + linear(linear(x, down), up)
        assert torch.equal(layer(x), by_hand)  # scale 1: no alpha / r factor
        assert up.abs().max() > 0


def test_training_changes_only_lora_tensors(tiny_unet: nn.Module) -> None:
    inputs = unet_inputs(seed=4)
    torch.manual_seed(5)
    motion = tap.inject_motion_lora(tiny_unet, Recipe.PAPER, RANK)
    spatial = tap.inject_spatial_lora(tiny_unet, RANK)
    # Both adapters take part in the forward pass of the temporal path.
    assert lora.is_adapter_enabled(tiny_unet, tap.MOTION_ADAPTER)
    assert lora.is_adapter_enabled(tiny_unet, tap.SPATIAL_ADAPTER)
    before = {name: p.detach().clone() for name, p in tiny_unet.named_parameters()}
    trainable = [p for p in tiny_unet.parameters() if p.requires_grad]
    assert sum(p.numel() for p in trainable) == (
        motion.trainable_parameters + spatial.trainable_parameters
    )
    optimizer = torch.optim.AdamW(trainable, lr=1e-2, weight_decay=1e-2)
    target = torch.randn_like(before_output := run(tiny_unet, inputs))
    tiny_unet.train()
    for _ in range(3):
        optimizer.zero_grad()
        loss = nn.functional.mse_loss(tiny_unet(**inputs).sample, target)
        loss.backward()
        optimizer.step()
    tiny_unet.eval()

    changed = {n for n, p in tiny_unet.named_parameters() if not torch.equal(p, before[n])}
    base_names = {n for n in before if ".lora_" not in n}
    assert any(".to_v." in n for n in base_names)
    assert not changed & base_names, "a base weight changed"
    assert any(f"lora_B.{tap.MOTION_ADAPTER}" in n for n in changed)
    assert any(f"lora_B.{tap.SPATIAL_ADAPTER}" in n for n in changed)
    assert not torch.equal(run(tiny_unet, inputs), before_output)

    with lora.adapter_enabled(tiny_unet, False, tap.SPATIAL_ADAPTER):
        motion_only = run(tiny_unet, inputs)
    lora.drop_adapter(tiny_unet, tap.SPATIAL_ADAPTER)
    assert lora.adapter_names(tiny_unet) == [tap.MOTION_ADAPTER]
    assert not any(tap.SPATIAL_ADAPTER in n for n, _ in tiny_unet.named_parameters())
    spatial_module = tiny_unet.get_submodule(spatial.adapted[0])
    assert type(spatial_module) is nn.Linear  # back to the plain base layer
    assert torch.equal(spatial_module.weight, before[spatial.adapted[0] + ".base_layer.weight"])
    assert torch.equal(run(tiny_unet, inputs), motion_only)


def test_switching_off_and_scale_zero_give_base_output(tiny_unet: nn.Module) -> None:
    inputs = unet_inputs(seed=6)
    base = run(tiny_unet, inputs)
    tap.inject_motion_lora(tiny_unet, Recipe.PAPER, RANK)
    randomize(tiny_unet, tap.MOTION_ADAPTER, seed=7)
    adapted = run(tiny_unet, inputs)
    assert not torch.equal(adapted, base)

    with lora.adapter_enabled(tiny_unet, False):
        assert not lora.is_adapter_enabled(tiny_unet)
        assert torch.equal(run(tiny_unet, inputs), base)
    assert torch.equal(run(tiny_unet, inputs), adapted)

    with pytest.raises(RuntimeError), lora.adapter_enabled(tiny_unet, False):
        raise RuntimeError("a failing denoising step")
    assert lora.is_adapter_enabled(tiny_unet)  # restored anyway

    with lora.lora_scale(tiny_unet, 0.0):
        assert lora.get_lora_scale(tiny_unet) == 0.0
        assert torch.equal(run(tiny_unet, inputs), base)
    assert lora.get_lora_scale(tiny_unet) == 1.0
    assert torch.equal(run(tiny_unet, inputs), adapted)

    lora.set_lora_scale(tiny_unet, 0.5)
    half = run(tiny_unet, inputs)
    assert not torch.equal(half, adapted)
    assert not torch.equal(half, base)


def test_switching_keeps_trainability(tiny_unet: nn.Module) -> None:
    tap.inject_motion_lora(tiny_unet, Recipe.PAPER, RANK)
    lora.set_adapter_trainable(tiny_unet, tap.MOTION_ADAPTER, False)
    with lora.adapter_enabled(tiny_unet, False):
        pass
    assert not any(p.requires_grad for p in tiny_unet.parameters())


def test_renamed_temporal_module_is_a_mismatch(tiny_unet: nn.Module) -> None:
    attention = tiny_unet.get_submodule("up_blocks.2.temp_attentions.1.transformer_blocks.0.attn2")
    attention.key_proj = attention.to_k  # a U-Net whose module names differ from ZeroScope's
    del attention.to_k
    with pytest.raises(RecipeMismatchError) as caught:
        tap.inject_motion_lora(tiny_unet, Recipe.PAPER, RANK)
    assert "up_blocks.2.temp_attentions.1.transformer_blocks.0.attn2.to_k" in str(caught.value)
    assert "not adapted" in str(caught.value)
    assert "ZeroScope" in str(caught.value)
    assert caught.value.exit_code == 1
    assert lora.adapter_names(tiny_unet) == []  # not left half-adapted


def test_recipe_target_missing_is_a_mismatch(
    tiny_unet: nn.Module, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = recipes.motion_lora_targets
    dropped = "mid_block.temp_attentions.0.transformer_blocks.0.attn1.to_k"

    def without_one(unet: nn.Module, recipe: Recipe | str) -> list[str]:
        return [name for name in real(unet, recipe) if name != dropped]

    monkeypatch.setattr(recipes, "motion_lora_targets", without_one)
    with pytest.raises(RecipeMismatchError, match=re.escape(dropped)):
        tap.inject_motion_lora(tiny_unet, Recipe.PAPER, RANK)


def test_unet_without_temporal_transformers_is_a_mismatch() -> None:
    model = nn.Sequential(nn.Linear(4, 4))
    with pytest.raises(RecipeMismatchError, match="TransformerTemporalModel"):
        tap.inject_motion_lora(model, Recipe.PAPER, RANK)


def test_state_dict_round_trip(tiny_unet: nn.Module, tiny_model_dir) -> None:
    from motionsep.model.components import load_unet

    inputs = unet_inputs(seed=8)
    tap.inject_motion_lora(tiny_unet, Recipe.REFERENCE, RANK)
    randomize(tiny_unet, tap.MOTION_ADAPTER, seed=9)
    state = lora.adapter_state_dict(tiny_unet)
    assert all(tap.MOTION_ADAPTER not in key for key in state)
    assert len(state) == 2 * len(lora.adapted_modules(tiny_unet))

    fresh = load_unet(tiny_model_dir)
    tap.inject_motion_lora(fresh, Recipe.REFERENCE, RANK)
    lora.load_adapter_state_dict(fresh, state)
    assert torch.equal(run(fresh, inputs), run(tiny_unet, inputs))

    other = load_unet(tiny_model_dir)
    tap.inject_motion_lora(other, Recipe.PAPER, RANK)
    with pytest.raises(RecipeMismatchError, match="unexpected tensors"):
        lora.load_adapter_state_dict(other, state)


def test_layer_list_follows_injection_removal_and_replacement(tiny_unet: nn.Module) -> None:
    # lora_layers is cached per U-Net (training switches adapters several times a
    # step); a stale list would switch or save the wrong layers.
    def walked(adapter: str) -> list[str]:
        return [
            name
            for name, module in tiny_unet.named_modules()
            if hasattr(module, "lora_A") and adapter in module.lora_A
        ]

    motion = tap.inject_motion_lora(tiny_unet, Recipe.PAPER, RANK)
    assert lora.adapted_modules(tiny_unet) == walked(tap.MOTION_ADAPTER) == list(motion.adapted)
    spatial = tap.inject_spatial_lora(tiny_unet, RANK)
    assert lora.adapted_modules(tiny_unet, tap.SPATIAL_ADAPTER) == walked(tap.SPATIAL_ADAPTER)
    assert len(lora.adapted_modules(tiny_unet, tap.SPATIAL_ADAPTER)) == len(spatial.adapted) > 0
    lora.drop_adapter(tiny_unet, tap.SPATIAL_ADAPTER)
    assert lora.adapted_modules(tiny_unet, tap.SPATIAL_ADAPTER) == []
    assert lora.adapter_names(tiny_unet) == [tap.MOTION_ADAPTER]
    # a layer put back by other code is noticed
    first = motion.adapted[0]
    parent_name, _, child = first.rpartition(".")
    parent = tiny_unet.get_submodule(parent_name)
    setattr(parent, child, tiny_unet.get_submodule(first).get_base_layer())
    assert first not in lora.adapted_modules(tiny_unet)
    assert lora.adapted_modules(tiny_unet) == walked(tap.MOTION_ADAPTER)


def test_lora_targets_under_a_block_are_its_feed_forward_linears(tiny_unet: nn.Module) -> None:
    """Every transformer block's feed-forward gives its two Linear layers (diffusers'
    FeedForward: ``net.0.proj`` and ``net.2``), by their own names before and
    after peft wraps them, and nothing from any other block."""
    blocks = [
        f"{block}.ff"
        for transformer in [
            *recipes.temporal_transformer_names(tiny_unet),
            *recipes.spatial_transformer_names(tiny_unet),
        ]
        for block in recipes._block_names(tiny_unet, transformer)
    ]
    assert len(blocks) > 2
    expected = {prefix: [f"{prefix}.net.0.proj", f"{prefix}.net.2"] for prefix in blocks}
    before = {prefix: recipes._linear_names_under(tiny_unet, prefix) for prefix in blocks}
    assert before == expected
    tap.inject_motion_lora(tiny_unet, Recipe.MOTIONDIRECTOR, 2)  # adapts the feed-forwards
    tap.inject_spatial_lora(tiny_unet, 2)
    assert any(".ff.net.2.base_layer" in name for name, _ in tiny_unet.named_modules())
    after = {prefix: recipes._linear_names_under(tiny_unet, prefix) for prefix in blocks}
    assert after == expected
