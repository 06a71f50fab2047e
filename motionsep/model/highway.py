"""The appearance highway (AH): U-Net skips that start before the temporal attention.

In a stock ``CrossAttnDownBlock3D`` every layer runs resnet -> temp_conv ->
spatial attention -> temporal attention and hands the output of the temporal
attention to the up path as a skip. The highway hands over the output of the
layer's *spatial* attention instead, so appearance reaches the decoder without
passing through the motion-adapted temporal layers, and multiplies some skips
by beta (DESIGN.md section 4). :func:`motionsep.model.recipes.highway_plan`
says which skips; this module makes it so, with module hooks on the stock
diffusers blocks:

- a forward hook on each spatial ``attentions[j]`` of an affected down block
  keeps that layer's output while its block runs;
- a forward pre-hook and a forward hook on each affected down block open and
  close that window; the forward hook swaps and scales entries of the returned
  skip tuple and drops what was kept.

The hidden state a block passes on to the next block is never touched, only the
skips the up blocks receive. Nothing is kept between forward passes, so the
highway holds no activations once a forward has returned.

Example::

    with recipe_highway(unet, "paper") as highway:
        for step, t in enumerate(timesteps):
            highway.enabled = step < pli_steps  # phased LoRA integration
            eps = unet(latents, t, encoder_hidden_states=text).sample
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from motionsep.errors import IncompatibleModelError
from motionsep.model.recipes import HighwayPlan, Skip, highway_plan, skip_layout

if TYPE_CHECKING:
    from torch import nn
    from torch.utils.hooks import RemovableHandle

    from motionsep.config import Recipe


@dataclass(frozen=True)
class _BlockPlan:
    """What the highway does to the skip tuple of one down block.

    Attributes:
        names: Skip names in the order the block returns them.
        reroute: Positions in that tuple to replace by the spatial output of the
            same layer (position == layer index for layer skips).
        scale: Position -> factor.
    """

    names: tuple[str, ...]
    reroute: frozenset[int]
    scale: dict[int, float]


def _spatial_output(output: Any) -> torch.Tensor:
    """The hidden state of a ``Transformer2DModel`` result, however it was returned."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, tuple):
        return output[0]
    return output.sample


def _block_plans(unet: nn.Module, plan: HighwayPlan) -> dict[int, _BlockPlan]:
    """Checks ``plan`` against ``unet`` and groups it per down block.

    Raises:
        IncompatibleModelError: If the plan names a skip this U-Net lacks, or
            asks for something the highway cannot do to it.
    """
    layout = {skip.name: skip for skip in skip_layout(unet)}
    named = set(plan.reroute) | set(plan.scale)
    unknown = sorted(named - layout.keys())
    if unknown:
        raise IncompatibleModelError(
            f"the appearance highway plan names skips this U-Net does not have: "
            f"{', '.join(unknown)} (it has {', '.join(layout)})",
            "resolve the plan for this U-Net with motionsep.model.recipes.highway_plan(unet, ...)",
        )
    not_reroutable = sorted(
        name
        for name in plan.reroute
        if layout[name].layer is None or not layout[name].has_spatial_attention
    )
    if not_reroutable:
        raise IncompatibleModelError(
            "the appearance highway can only reroute layer skips of down blocks with "
            f"spatial attention; cannot reroute {', '.join(not_reroutable)}",
            "drop these names from the plan's reroute set",
        )
    if "conv_in" in plan.scale:
        # conv_in's output is also the input of down_blocks[0]: scaling it at
        # its source would change the encoder path, not only the skip.
        raise IncompatibleModelError(
            "the appearance highway cannot scale the conv_in skip",
            "drop conv_in from the plan's scale factors",
        )

    per_block: dict[int, list[Skip]] = {}
    for skip in layout.values():
        if skip.down_block is not None:
            per_block.setdefault(skip.down_block, []).append(skip)
    plans: dict[int, _BlockPlan] = {}
    for index, skips in per_block.items():
        names = tuple(skip.name for skip in skips)
        reroute = frozenset(pos for pos, name in enumerate(names) if name in plan.reroute)
        scale = {pos: plan.scale[name] for pos, name in enumerate(names) if name in plan.scale}
        if reroute or scale:
            plans[index] = _BlockPlan(names=names, reroute=reroute, scale=scale)
    return plans


class AppearanceHighway:
    """Hooks that turn a stock 3D U-Net's skips into the appearance highway.

    Prefer the context managers :func:`appearance_highway` and
    :func:`recipe_highway`, which always remove the hooks. Setting
    :attr:`enabled` to False makes the installed hooks pass everything through
    unchanged, which is how phased LoRA integration switches the highway off
    for later denoising steps without reinstalling anything.

    Gradient checkpointing: spatial outputs are kept only while their down
    block's own forward is running (between its pre-hook and its forward hook).
    A recomputation that re-enters only the block's inner modules during
    backward keeps nothing; one that re-enters the whole block module rebuilds
    the same skips and drops them again. No tensor outlives the block forward
    that made it.

    Args:
        unet: A diffusers ``UNet3DConditionModel`` (or one with its block layout).
        plan: The skips to reroute and scale, from
            :func:`motionsep.model.recipes.highway_plan` for this U-Net.
        enabled: Whether the highway acts from the start.

    Raises:
        IncompatibleModelError: If ``plan`` does not fit ``unet``.
    """

    def __init__(self, unet: nn.Module, plan: HighwayPlan, *, enabled: bool = True) -> None:
        self.unet = unet
        self.plan = plan
        self.enabled = enabled
        self._block_plans = _block_plans(unet, plan)
        self._handles: list[RemovableHandle] = []
        self._installed = False
        # Down block index -> layer -> spatial-attention output of the running forward.
        self._store: dict[int, dict[int, torch.Tensor]] = {}

    @property
    def installed(self) -> bool:
        """Whether the highway is installed (a plan without skips installs no hooks)."""
        return self._installed

    @property
    def stored_tensors(self) -> int:
        """How many spatial-attention outputs are held right now (0 between forwards)."""
        return sum(len(layers) for layers in self._store.values())

    def install(self) -> AppearanceHighway:
        """Registers the hooks; returns self.

        Raises:
            RuntimeError: If this highway is already installed.
        """
        if self._installed:
            raise RuntimeError("this appearance highway is already installed")
        try:
            for index, block_plan in self._block_plans.items():
                block = self.unet.get_submodule(f"down_blocks.{index}")
                for layer in sorted(block_plan.reroute):
                    spatial = self.unet.get_submodule(f"down_blocks.{index}.attentions.{layer}")
                    self._handles.append(
                        spatial.register_forward_hook(self._make_capture_hook(index, layer))
                    )
                self._handles.append(block.register_forward_pre_hook(self._make_open_hook(index)))
                self._handles.append(
                    block.register_forward_hook(self._make_rewrite_hook(index), always_call=True)
                )
        except BaseException:
            self.remove()
            raise
        self._installed = True
        return self

    def remove(self) -> None:
        """Removes every hook and drops anything held; safe to call twice."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._store.clear()
        self._installed = False

    def __enter__(self) -> AppearanceHighway:
        return self.install()

    def __exit__(self, *exc_info: object) -> None:
        self.remove()

    def _make_open_hook(self, index: int) -> Any:
        def open_window(module: nn.Module, args: tuple[Any, ...]) -> None:
            # A fresh dict per block forward: whatever an interrupted earlier
            # forward left behind is dropped here at the latest.
            if self.enabled:
                self._store[index] = {}
            else:
                self._store.pop(index, None)

        return open_window

    def _make_capture_hook(self, index: int, layer: int) -> Any:
        def capture(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            layers = self._store.get(index)
            # Outside its block's forward (e.g. checkpoint recomputation of the
            # attention alone during backward) the output feeds no skip.
            if layers is not None:
                layers[layer] = _spatial_output(output)

        return capture

    def _make_rewrite_hook(self, index: int) -> Any:
        block_plan = self._block_plans[index]

        def rewrite(module: nn.Module, args: tuple[Any, ...], output: Any) -> Any:
            # The window must close even if the forward or this rewrite fails,
            # or the store would keep activations alive.
            captured = self._store.pop(index, None)
            if output is None or captured is None or not self.enabled:
                return None
            hidden_states, skips = output
            if len(skips) != len(block_plan.names):
                raise IncompatibleModelError(
                    f"down_blocks.{index} returned {len(skips)} skips, the highway expected "
                    f"{len(block_plan.names)} ({', '.join(block_plan.names)})",
                    "the appearance highway supports stock diffusers 3D down blocks only",
                )
            new_skips = list(skips)
            for position in block_plan.reroute:
                spatial = captured.get(position)
                if spatial is None:
                    raise IncompatibleModelError(
                        f"down_blocks.{index}.attentions.{position} did not run during its "
                        "block's forward, so the highway has no spatial output for "
                        f"{block_plan.names[position]}",
                        "the appearance highway supports stock diffusers 3D down blocks only",
                    )
                if spatial.shape != skips[position].shape:
                    raise IncompatibleModelError(
                        f"spatial output of down_blocks.{index}.attentions.{position} has shape "
                        f"{tuple(spatial.shape)}, the skip it replaces "
                        f"{tuple(skips[position].shape)}",
                    )
                new_skips[position] = spatial
            for position, factor in block_plan.scale.items():
                new_skips[position] = new_skips[position] * factor
            return hidden_states, tuple(new_skips)

        return rewrite


@contextmanager
def appearance_highway(
    unet: nn.Module, plan: HighwayPlan, *, enabled: bool = True
) -> Iterator[AppearanceHighway]:
    """Runs ``unet`` with the appearance highway of ``plan`` inside the block.

    Every hook is removed on exit, also when the block raises.

    Args:
        unet: A diffusers ``UNet3DConditionModel``.
        plan: Skips to reroute and scale, resolved for this U-Net.
        enabled: Whether the highway acts from the start; toggle it per
            denoising step through the yielded handle's ``enabled``.

    Yields:
        The installed :class:`AppearanceHighway`.

    Raises:
        IncompatibleModelError: If ``plan`` does not fit ``unet``.
    """
    highway = AppearanceHighway(unet, plan, enabled=enabled)
    highway.install()
    try:
        yield highway
    finally:
        highway.remove()


def recipe_highway(
    unet: nn.Module,
    recipe: Recipe | str,
    beta: float | None = None,
    *,
    enabled: bool = True,
) -> AbstractContextManager[AppearanceHighway]:
    """:func:`appearance_highway` for a recipe's plan (see ``highway_plan``).

    A recipe without a highway (``motiondirector``) installs no hooks at all.

    Args:
        unet: A diffusers ``UNet3DConditionModel``.
        recipe: The recipe whose highway to use.
        beta: Overrides the recipe's highway scale.
        enabled: Whether the highway acts from the start.
    """
    return appearance_highway(unet, highway_plan(unet, recipe, beta), enabled=enabled)
