"""The recipes of DESIGN.md section 4, as data, and the U-Net names they resolve to.

A recipe says which projections of every temporal transformer get the motion
LoRA, which U-Net skips the appearance highway reroutes to spatial-attention
outputs, which skips it scales by beta, and whether phased LoRA integration is
on. The helpers below turn a recipe into exact module and skip names of a
given U-Net of either family (``motionsep.model.family``: ZeroScope's
``UNet3DConditionModel`` or AnimateDiff's ``UNetMotionModel``, whose down
blocks collect skips the same way); tap.py and highway.py act on those names.

Skips are named after the module that produces them, in the order the U-Net
collects them (``down_block_res_samples``)::

    conv_in
    down_blocks.0.layers.0, down_blocks.0.layers.1, down_blocks.0.downsamplers.0
    ...
    down_blocks.3.layers.0, down_blocks.3.layers.1

Up block ``j`` consumes the last ``len(up_blocks[j].resnets)`` skips still
unconsumed, its resnet 0 taking the newest.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from motionsep.config import Recipe
from motionsep.model import family

# Projections of a temporal attention (attn1 and attn2 alike) per recipe.
PAPER_PROJECTIONS = ("to_k",)
REFERENCE_PROJECTIONS = ("to_k", "to_out.0")
MOTIONDIRECTOR_PROJECTIONS = ("to_q", "to_k", "to_v", "to_out.0")

# Spatial LoRAs of dual-path training: self-attention and feed-forward of
# every Transformer2DModel, the same for every recipe.
SPATIAL_PROJECTIONS = ("to_q", "to_k", "to_v", "to_out.0")

TEMPORAL_ATTENTIONS = ("attn1", "attn2")


@dataclass(frozen=True)
class RecipeSpec:
    """What one recipe adapts and reroutes.

    Attributes:
        name: The recipe.
        projections: Linear projections of each temporal attention (attn1 and
            attn2) that get the motion LoRA.
        feed_forward: Whether the Linear layers of each temporal transformer
            block's ``ff`` get the motion LoRA too.
        reroute_blocks: Down blocks whose layer skips the highway reroutes:
            ``"attention"`` for every down block with spatial attention, or
            explicit indices; empty for no highway.
        beta: The highway scale.
        beta_on: ``"rerouted"`` scales exactly the rerouted skips;
            ``"consumers"`` scales the skips consumed by the up-block resnets
            listed in ``beta_consumers``.
        beta_consumers: ``(up_block, resnet)`` pairs; resnet None means all of
            that block's resnets.
        pli: Default fraction of denoising steps that use the motion LoRA and
            the highway (None: all steps).
        noise_prior: Default weight of the motion's stored inversion in the
            starting noise (0: none).
    """

    name: Recipe
    projections: tuple[str, ...]
    feed_forward: bool
    reroute_blocks: Literal["attention"] | tuple[int, ...]
    beta: float
    beta_on: Literal["rerouted", "consumers"]
    beta_consumers: tuple[tuple[int, int | None], ...] = ()
    pli: float | None = None
    noise_prior: float = 0.0

    @property
    def has_highway(self) -> bool:
        """Whether the recipe reroutes any skip."""
        return self.reroute_blocks == "attention" or bool(self.reroute_blocks)


RECIPES: dict[Recipe, RecipeSpec] = {
    Recipe.PAPER: RecipeSpec(
        name=Recipe.PAPER,
        projections=PAPER_PROJECTIONS,
        feed_forward=False,
        reroute_blocks="attention",
        beta=1.1,
        beta_on="rerouted",
    ),
    # The released code: its 1280-channel rule in ZeroScope terms is "all of
    # up_blocks[1] and the first resnet of up_blocks[2]"; stated by position
    # so that it means the same on smaller U-Nets.
    Recipe.REFERENCE: RecipeSpec(
        name=Recipe.REFERENCE,
        projections=REFERENCE_PROJECTIONS,
        feed_forward=False,
        reroute_blocks=(2,),
        beta=1.1,
        beta_on="consumers",
        beta_consumers=((1, None), (2, 0)),
        # the authors' inference script starts from 0.2 of the clip's inversion
        noise_prior=0.2,
    ),
    Recipe.MOTIONDIRECTOR: RecipeSpec(
        name=Recipe.MOTIONDIRECTOR,
        projections=MOTIONDIRECTOR_PROJECTIONS,
        feed_forward=True,
        reroute_blocks=(),
        beta=1.0,
        beta_on="rerouted",
    ),
}


def get_recipe(recipe: Recipe | str) -> RecipeSpec:
    """The spec of a recipe given by enum or name."""
    return RECIPES[Recipe(recipe)]


def temporal_transformer_names(unet: Any) -> list[str]:
    """Names of every temporal transformer, in module order (its family says which).

    ZeroScope: every ``TransformerTemporalModel``, ``transformer_in`` first;
    AnimateDiff: every motion module (``AnimateDiffTransformer3D``).
    """
    return family.temporal_transformer_names(unet)


def spatial_transformer_names(unet: Any) -> list[str]:
    """Names of every spatial ``Transformer2DModel``."""
    from diffusers.models.transformers.transformer_2d import Transformer2DModel

    return [name for name, m in unet.named_modules() if isinstance(m, Transformer2DModel)]


def _linear_names_under(unet: Any, prefix: str) -> list[str]:
    """Linear layers under ``prefix``; a layer peft already wrapped counts once, by its own name."""
    from torch import nn

    try:
        root = unet.get_submodule(prefix)
    except AttributeError:
        return []
    names = []
    # walk the block alone, not the whole U-Net once per block
    for name, module in root.named_modules(prefix=prefix):
        if name == prefix or ".lora_" in name:
            continue
        if name.endswith(".base_layer"):
            names.append(name.removesuffix(".base_layer"))
        elif isinstance(module, nn.Linear):
            names.append(name)
    return names


def _block_names(unet: Any, transformer: str) -> list[str]:
    module = unet.get_submodule(transformer)
    return [f"{transformer}.transformer_blocks.{i}" for i in range(len(module.transformer_blocks))]


def motion_lora_targets(unet: Any, recipe: Recipe | str) -> list[str]:
    """Full names of the Linear layers that get the motion LoRA, in module order."""
    spec = get_recipe(recipe)
    wanted: set[str] = set()
    for transformer in temporal_transformer_names(unet):
        for block in _block_names(unet, transformer):
            for attention in TEMPORAL_ATTENTIONS:
                wanted.update(f"{block}.{attention}.{proj}" for proj in spec.projections)
            if spec.feed_forward:
                wanted.update(_linear_names_under(unet, f"{block}.ff"))
    return [name for name, _ in unet.named_modules() if name in wanted]


def spatial_lora_targets(unet: Any) -> list[str]:
    """Full names of the Linear layers that get the spatial LoRAs, in module order."""
    wanted: set[str] = set()
    for transformer in spatial_transformer_names(unet):
        for block in _block_names(unet, transformer):
            wanted.update(f"{block}.attn1.{proj}" for proj in SPATIAL_PROJECTIONS)
            wanted.update(_linear_names_under(unet, f"{block}.ff"))
    return [name for name, _ in unet.named_modules() if name in wanted]


@dataclass(frozen=True)
class Skip:
    """One U-Net skip connection.

    Attributes:
        name: ``conv_in``, ``down_blocks.i.layers.j`` or ``down_blocks.i.downsamplers.0``.
        down_block: Index of the down block that emits it (None for conv_in).
        layer: Layer index within that block (None for conv_in and downsamplers).
        has_spatial_attention: Whether that layer has a spatial attention whose
            output the highway can take instead.
        consumer: ``(up_block, resnet)`` that concatenates it.
    """

    name: str
    down_block: int | None
    layer: int | None
    has_spatial_attention: bool
    consumer: tuple[int, int]


def skip_layout(unet: Any) -> list[Skip]:
    """Every skip of the U-Net in the order ``down_block_res_samples`` holds them."""
    emitted: list[tuple[str, int | None, int | None, bool]] = [("conv_in", None, None, False)]
    for index, block in enumerate(unet.down_blocks):
        has_attention = hasattr(block, "attentions")
        for layer in range(len(block.resnets)):
            emitted.append((f"down_blocks.{index}.layers.{layer}", index, layer, has_attention))
        if block.downsamplers is not None:
            for d in range(len(block.downsamplers)):
                emitted.append((f"down_blocks.{index}.downsamplers.{d}", index, None, False))
    remaining = list(emitted)
    consumers: dict[str, tuple[int, int]] = {}
    for up_index, block in enumerate(unet.up_blocks):
        count = len(block.resnets)
        taken, remaining = remaining[-count:], remaining[:-count]
        for resnet, item in enumerate(reversed(taken)):
            consumers[item[0]] = (up_index, resnet)
    return [
        Skip(name=n, down_block=b, layer=layer, has_spatial_attention=a, consumer=consumers[n])
        for n, b, layer, a in emitted
    ]


@dataclass(frozen=True)
class HighwayPlan:
    """What the highway does to each skip, resolved for one U-Net.

    Attributes:
        reroute: Names of skips replaced by their layer's spatial-attention output.
        scale: Skip name -> factor applied to it (only skips with a factor != 1).
    """

    reroute: frozenset[str]
    scale: dict[str, float]


def highway_plan(unet: Any, recipe: Recipe | str, beta: float | None = None) -> HighwayPlan:
    """Resolves a recipe's highway to skip names of ``unet``.

    Args:
        unet: The U-Net.
        recipe: The recipe.
        beta: Overrides the recipe's highway scale.
    """
    spec = get_recipe(recipe)
    factor = spec.beta if beta is None else beta
    skips = skip_layout(unet)
    if spec.reroute_blocks == "attention":
        reroute = {s.name for s in skips if s.layer is not None and s.has_spatial_attention}
    else:
        blocks = set(spec.reroute_blocks)
        reroute = {
            s.name
            for s in skips
            if s.layer is not None and s.has_spatial_attention and s.down_block in blocks
        }
    if not reroute:
        return HighwayPlan(reroute=frozenset(), scale={})
    if spec.beta_on == "rerouted":
        scaled = reroute
    else:
        scaled = {
            s.name
            for s in skips
            for up, resnet in spec.beta_consumers
            if s.consumer[0] == up and (resnet is None or s.consumer[1] == resnet)
        }
    scale = {name: factor for name in scaled} if factor != 1.0 else {}
    return HighwayPlan(reroute=frozenset(reroute), scale=scale)
