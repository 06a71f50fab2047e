"""Temporal attention purification (TAP): which modules the motion LoRA adapts.

The paper's first idea. The motion is learned by a LoRA on the temporal
transformers only, and within them only on the projections the recipe names
(:mod:`motionsep.model.recipes`): ``paper`` adapts ``to_k`` alone, so the
motion lives in *where frames attend* and the values, which carry appearance,
stay the base model's; ``reference`` (the authors' released code) adds
``to_out``; ``motiondirector`` (the baseline) adapts q, k, v, out and the
feed-forward. The spatial LoRAs of dual-path training are a second, separate
adapter on the spatial transformers, dropped after training.

Injection is checked: the modules peft adapted must be exactly the ones the
recipe's rule names, or :class:`~motionsep.errors.RecipeMismatchError` is
raised. The LoRA toolkit underneath (queries, on/off, scale, state dicts) is
:mod:`motionsep.model.lora`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, cast

from motionsep.config import Recipe
from motionsep.errors import RecipeMismatchError
from motionsep.model import recipes
from motionsep.model.lora import (
    MODULE_NAMES_HINT,
    MOTION_ADAPTER,
    SPATIAL_ADAPTER,
    LoraInjection,
    inject_lora,
)

if TYPE_CHECKING:
    from torch import nn

__all__ = [
    "MOTION_ADAPTER",
    "SPATIAL_ADAPTER",
    "inject_motion_lora",
    "inject_spatial_lora",
    "recipe_motion_modules",
]


def recipe_motion_modules(unet: nn.Module, recipe: Recipe | str) -> set[str]:
    """The module names a recipe says get the motion LoRA, whether or not they exist.

    Unlike :func:`recipes.motion_lora_targets` (which resolves to modules that
    exist), this spells out every name the recipe's rule implies, so that a
    U-Net with renamed or missing projections is caught as a mismatch.
    """
    spec = recipes.get_recipe(recipe)
    expected: set[str] = set()
    for transformer in recipes.temporal_transformer_names(unet):
        blocks = cast("nn.ModuleList", unet.get_submodule(transformer).transformer_blocks)
        for index in range(len(blocks)):
            block = f"{transformer}.transformer_blocks.{index}"
            for attention in recipes.TEMPORAL_ATTENTIONS:
                expected.update(f"{block}.{attention}.{proj}" for proj in spec.projections)
    if spec.feed_forward:
        expected.update(
            name
            for name in recipes.motion_lora_targets(unet, recipe)
            if ".ff." in name  # the ff Linear layers are found by walking, see recipes.py
        )
    return expected


def inject_motion_lora(
    unet: nn.Module,
    recipe: Recipe | str,
    rank: int,
    dropout: float = 0.0,
    adapter_name: str = MOTION_ADAPTER,
) -> LoraInjection:
    """Injects the motion LoRA of a recipe into the temporal transformers.

    Every base weight is frozen afterwards; the new LoRA tensors are trainable.

    Args:
        unet: A ``UNet3DConditionModel``; changed in place.
        recipe: Which projections to adapt (``paper``: ``to_k`` only).
        rank: LoRA rank (upstream default 32).
        dropout: LoRA dropout (upstream 0.1 in training, 0 at inference).
        adapter_name: peft adapter name.

    Returns:
        The adapted module names and the trainable parameter count.

    Raises:
        RecipeMismatchError: if the modules that got a LoRA layer are not
            exactly those the recipe names (e.g. a U-Net whose module names
            differ from ZeroScope's).
    """
    if not recipes.temporal_transformer_names(unet):
        raise RecipeMismatchError(
            "this U-Net has no TransformerTemporalModel: there is nothing for the motion LoRA "
            "to adapt",
            MODULE_NAMES_HINT,
        )
    return inject_lora(
        unet,
        recipes.motion_lora_targets(unet, recipe),
        rank,
        dropout=dropout,
        adapter_name=adapter_name,
        expected=recipe_motion_modules(unet, recipe),
    )


def inject_spatial_lora(
    unet: nn.Module,
    rank: int,
    dropout: float = 0.0,
    adapter_name: str = SPATIAL_ADAPTER,
) -> LoraInjection:
    """Injects the spatial LoRA of dual-path training as a separate adapter.

    It targets the spatial transformers' attn1 projections and feed-forward
    (:func:`recipes.spatial_lora_targets`), disjoint from the motion LoRA; both
    stay active together. Drop it with :func:`drop_adapter` after training.

    Args:
        unet: The U-Net; changed in place.
        rank: LoRA rank.
        dropout: LoRA dropout.
        adapter_name: peft adapter name (one per clip if spatial LoRAs are per clip).

    Returns:
        The adapted module names and the trainable parameter count.

    Raises:
        RecipeMismatchError: if peft adapted other modules than the targets.
    """
    return inject_lora(
        unet,
        recipes.spatial_lora_targets(unet),
        rank,
        dropout=dropout,
        adapter_name=adapter_name,
    )
