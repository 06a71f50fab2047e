"""Ablations of a video U-Net's temporal layers, to measure what they contribute.

Two context managers, each acting through a seam diffusers offers and putting
the model back exactly as it was on exit, also when the block raises:

- :func:`uniform_temporal_attention` gives every temporal attention a
  :class:`UniformAttnProcessor` (through ``Attention.set_processor``): each
  frame attends to all frames with the same weight ``1/F``, so the layer still
  mixes frames but cannot choose which;
- :func:`bypass_temporal_convs` puts a forward hook on every
  ``TemporalConvLayer`` that returns the layer's input unchanged (the layer
  computes ``input + conv stack(input)``, so this removes the conv stack).
  Only ZeroScope-family U-Nets have temporal convolutions; an AnimateDiff
  U-Net is refused (its motion modules are its only path between frames).

Both work on a U-Net of either family (:mod:`motionsep.model.family`); on
AnimateDiff the temporal attentions are those of the motion modules.

If the loss of a trained model barely moves under an ablation, the model does
not use what was ablated.

Example::

    with uniform_temporal_attention(unet):
        eps = unet(latents, t, encoder_hidden_states=text).sample
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, cast

from motionsep.errors import IncompatibleModelError
from motionsep.model.attention import temporal_attention_names

if TYPE_CHECKING:
    import torch
    from torch import nn
    from torch.utils.hooks import RemovableHandle


class UniformAttnProcessor:
    """Attention with every probability equal: each query takes the mean of the values.

    The output is ``to_out(mean over key positions of to_v(context))`` for every
    query position, which is exactly what diffusers' ``AttnProcessor`` computes
    when all attention logits are equal. The rest follows ``AttnProcessor``:
    spatial norm, 4-D inputs, group norm, cross norm, the residual connection
    and ``rescale_output_factor``. Temporal attention takes no mask.
    """

    def __call__(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        """The uniformly attended output of ``attn`` for ``hidden_states``.

        Raises:
            ValueError: if an attention mask is passed (uniform attention over
                masked keys is not defined here).
        """
        if attention_mask is not None:
            raise ValueError("uniform attention takes no attention mask")
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch, channels, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channels, height * width).transpose(1, 2)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        # the output projection acts per position, so it can run on the mean once
        mean_value = attn.to_v(encoder_hidden_states).mean(dim=1, keepdim=True)
        output = attn.to_out[1](attn.to_out[0](mean_value))
        output = output.expand(-1, hidden_states.shape[1], -1)
        if input_ndim == 4:
            output = output.transpose(-1, -2).reshape(batch, channels, height, width)
        if attn.residual_connection:
            output = output + residual
        return cast("torch.Tensor", output / attn.rescale_output_factor)


@contextmanager
def uniform_temporal_attention(unet: nn.Module) -> Iterator[list[str]]:
    """Replaces every temporal attention of ``unet`` by uniform attention inside the block.

    Every attention module named by
    :func:`motionsep.model.attention.temporal_attention_names` (attn1 and attn2
    of every temporal transformer: ``transformer_in`` included on ZeroScope,
    every motion module on AnimateDiff) gets a
    :class:`UniformAttnProcessor`; on exit each gets back the very processor
    object it had.

    Yields:
        The names of the replaced attention modules, in forward order.

    Raises:
        IncompatibleModelError: if ``unet`` has no temporal attention.
    """
    names = temporal_attention_names(unet)
    if not names:
        raise IncompatibleModelError(
            f"{type(unet).__name__} has no temporal attention to make uniform",
            "pass a video U-Net: ZeroScope / ModelScope (UNet3DConditionModel) or "
            "AnimateDiff (UNetMotionModel)",
        )
    originals: dict[str, Any] = {}
    uniform = UniformAttnProcessor()
    try:
        for name in names:
            module: Any = unet.get_submodule(name)  # a diffusers Attention
            originals[name] = module.processor
            module.set_processor(uniform)
        yield names
    finally:
        for name, processor in originals.items():
            cast(Any, unet.get_submodule(name)).set_processor(processor)


def temporal_conv_names(unet: nn.Module) -> list[str]:
    """Full names of every ``TemporalConvLayer`` (the blocks' ``temp_convs``), in module order."""
    from diffusers.models.resnet import TemporalConvLayer

    return [name for name, module in unet.named_modules() if isinstance(module, TemporalConvLayer)]


def _return_input(
    module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any
) -> Any:
    """Forward hook: the layer's output becomes its input (hidden_states)."""
    return args[0] if args else kwargs["hidden_states"]


@contextmanager
def bypass_temporal_convs(
    unet: nn.Module, names: Sequence[str] | None = None
) -> Iterator[list[str]]:
    """Makes every ``TemporalConvLayer`` of ``unet`` (or those ``names``) return its input.

    A ``TemporalConvLayer`` returns ``input + conv stack(input)`` in the
    input's layout, so replacing its output by its input removes the temporal
    convolutions and nothing else. The forward hooks are removed on exit.

    Yields:
        The names of the bypassed layers, in module order.

    Raises:
        IncompatibleModelError: if ``unet`` has no temporal convolution (an
            AnimateDiff U-Net never has one).
    """
    from motionsep.model.family import FAMILIES

    family = next((f for f in FAMILIES.values() if f.owns(unet)), None)
    if family is not None and not family.temporal_convolutions:
        raise IncompatibleModelError(
            f"an {family.title} U-Net has no temporal convolution to bypass: its motion "
            "modules are the only path between frames",
            "ablate its temporal attention instead (uniform_temporal_attention), or bypass "
            "temporal convolutions on a ZeroScope / ModelScope U-Net",
        )
    names = temporal_conv_names(unet) if names is None else list(names)
    if not names and not temporal_conv_names(unet):
        raise IncompatibleModelError(
            f"{type(unet).__name__} has no temporal convolution to bypass",
            "pass a UNet3DConditionModel (ZeroScope / ModelScope layout)",
        )
    handles: list[RemovableHandle] = []
    try:
        for name in names:
            module = unet.get_submodule(name)
            handles.append(module.register_forward_hook(_return_input, with_kwargs=True))
        yield names
    finally:
        for handle in handles:
            handle.remove()
