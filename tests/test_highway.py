"""The appearance highway on the tiny U-Net: the skips the up blocks receive.

What the up blocks receive and what the spatial attentions emit are recorded
here with the tests' own hooks, independently of motionsep.model.highway.
"""

from __future__ import annotations

import functools
import gc
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from motionsep.errors import IncompatibleModelError
from motionsep.model.highway import AppearanceHighway, appearance_highway, recipe_highway
from motionsep.model.recipes import HighwayPlan, highway_plan, skip_layout

ATTENTION_DOWN_BLOCKS = (0, 1, 2)


def make_inputs(batch: int = 1, frames: int = 2, size: int = 8) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1234)
    return {
        "sample": torch.randn(batch, 4, frames, size, size, generator=generator),
        "timestep": torch.tensor(500),
        "encoder_hidden_states": torch.randn(batch, 7, 32, generator=generator),
    }


def predict(unet: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return unet(**inputs).sample


def hook_state(unet: nn.Module) -> dict[str, tuple[int, ...]]:
    """Ids of every hook on every module, to compare before and after."""
    kinds = (
        "_forward_hooks",
        "_forward_pre_hooks",
        "_forward_hooks_with_kwargs",
        "_forward_hooks_always_called",
        "_forward_pre_hooks_with_kwargs",
        "_backward_hooks",
    )
    return {
        f"{name}:{kind}": tuple(getattr(module, kind))
        for name, module in unet.named_modules()
        for kind in kinds
    }


@contextmanager
def record_up_skips(unet: nn.Module) -> Iterator[dict[str, torch.Tensor]]:
    """Skip name -> tensor, as the up blocks receive it in ``res_hidden_states_tuple``."""
    consumers = {skip.consumer: skip.name for skip in skip_layout(unet)}
    received: dict[str, torch.Tensor] = {}

    def make_hook(up_index: int) -> Any:
        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            skips = kwargs["res_hidden_states_tuple"]
            # Resnet r of an up block pops the r-th skip from the end.
            for resnet in range(len(skips)):
                received[consumers[(up_index, resnet)]] = skips[-1 - resnet]

        return hook

    handles = [
        block.register_forward_pre_hook(make_hook(index), with_kwargs=True)
        for index, block in enumerate(unet.up_blocks)
    ]
    try:
        yield received
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def record_spatial(unet: nn.Module) -> Iterator[dict[str, torch.Tensor]]:
    """Layer skip name -> output of that layer's spatial attention."""
    outputs: dict[str, torch.Tensor] = {}
    handles = []
    for index, block in enumerate(unet.down_blocks):
        for layer, attention in enumerate(getattr(block, "attentions", ())):
            name = f"down_blocks.{index}.layers.{layer}"

            def hook(module: nn.Module, args: Any, output: Any, name: str = name) -> None:
                outputs[name] = output[0]

            handles.append(attention.register_forward_hook(hook))
    try:
        yield outputs
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def record_mid_input(unet: nn.Module) -> Iterator[list[torch.Tensor]]:
    """The hidden state the down path hands to the mid block."""
    seen: list[torch.Tensor] = []

    def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
        seen.append(args[0])

    handle = unet.mid_block.register_forward_pre_hook(hook)
    try:
        yield seen
    finally:
        handle.remove()


@pytest.mark.parametrize(
    ("recipe", "beta", "shape"),
    [
        ("paper", None, (1, 3, 16)),
        ("paper", 2.0, (2, 2, 8)),
        ("reference", None, (1, 2, 8)),
        ("reference", 1.0, (2, 3, 8)),
    ],
)
def test_up_blocks_receive_the_planned_skips(
    tiny_unet: nn.Module, recipe: str, beta: float | None, shape: tuple[int, int, int]
) -> None:
    batch, frames, size = shape
    inputs = make_inputs(batch, frames, size)
    plan = highway_plan(tiny_unet, recipe, beta)
    assert plan.reroute

    with record_up_skips(tiny_unet) as stock_skips, record_mid_input(tiny_unet) as stock_mid:
        predict(tiny_unet, inputs)
    with (
        recipe_highway(tiny_unet, recipe, beta),
        record_up_skips(tiny_unet) as received,
        record_spatial(tiny_unet) as spatial,
        record_mid_input(tiny_unet) as mid,
    ):
        predict(tiny_unet, inputs)

    assert received.keys() == stock_skips.keys() == {s.name for s in skip_layout(tiny_unet)}
    for name, skip in received.items():
        assert skip.shape[0] == batch * frames, name
        factor = plan.scale.get(name, 1.0)
        if name in plan.reroute:
            expected = spatial[name] * factor if factor != 1.0 else spatial[name]
            assert not torch.equal(expected, stock_skips[name]), name
        else:
            expected = stock_skips[name] * factor if factor != 1.0 else stock_skips[name]
        assert torch.equal(skip, expected), name
    # The encoder path itself is untouched: only what the up blocks receive changes.
    assert torch.equal(mid[0], stock_mid[0])


def test_reference_scales_a_skip_it_does_not_reroute(tiny_unet: nn.Module) -> None:
    plan = highway_plan(tiny_unet, "reference")
    assert "down_blocks.1.downsamplers.0" in plan.scale
    assert "down_blocks.1.downsamplers.0" not in plan.reroute


def test_motiondirector_leaves_outputs_bit_identical(tiny_unet: nn.Module) -> None:
    inputs = make_inputs()
    before = hook_state(tiny_unet)
    stock = predict(tiny_unet, inputs)
    with recipe_highway(tiny_unet, "motiondirector") as highway:
        assert highway.installed
        assert hook_state(tiny_unet) == before
        assert torch.equal(predict(tiny_unet, inputs), stock)


def test_highway_changes_output_and_respects_beta(tiny_unet: nn.Module) -> None:
    inputs = make_inputs()
    stock = predict(tiny_unet, inputs)
    outputs = {}
    for beta in (1.0, 1.1, 1.5):
        with recipe_highway(tiny_unet, "paper", beta):
            outputs[beta] = predict(tiny_unet, inputs)
    assert not torch.allclose(outputs[1.1], stock)
    assert not torch.allclose(outputs[1.0], outputs[1.1])
    assert not torch.allclose(outputs[1.1], outputs[1.5])
    with recipe_highway(tiny_unet, "paper"):
        assert torch.equal(predict(tiny_unet, inputs), outputs[1.1])


def test_restores_stock_unet_on_exit(tiny_unet: nn.Module) -> None:
    inputs = make_inputs()
    before = hook_state(tiny_unet)
    stock = predict(tiny_unet, inputs)
    with recipe_highway(tiny_unet, "paper") as highway:
        assert highway.installed
        assert hook_state(tiny_unet) != before
        predict(tiny_unet, inputs)
    assert not highway.installed
    assert hook_state(tiny_unet) == before
    assert torch.equal(predict(tiny_unet, inputs), stock)


def test_restores_stock_unet_after_an_exception(tiny_unet: nn.Module) -> None:
    inputs = make_inputs()
    before = hook_state(tiny_unet)
    stock = predict(tiny_unet, inputs)

    def fail(module: nn.Module, args: Any, output: Any) -> None:
        raise RuntimeError("boom inside down_blocks.1")

    # Fails in the middle of a down block, after its first spatial output was kept.
    failing = tiny_unet.down_blocks[1].temp_attentions[1].register_forward_hook(fail)
    with recipe_highway(tiny_unet, "paper") as highway:
        with pytest.raises(RuntimeError, match="boom"):
            predict(tiny_unet, inputs)
        # The failed block forward dropped what it had kept.
        assert highway.stored_tensors == 0

    entered: list[AppearanceHighway] = []

    def fail_inside_highway() -> None:
        with recipe_highway(tiny_unet, "paper") as highway:
            entered.append(highway)
            predict(tiny_unet, inputs)

    with pytest.raises(RuntimeError, match="boom"):
        fail_inside_highway()
    failing.remove()
    assert not entered[0].installed
    assert hook_state(tiny_unet) == before
    assert torch.equal(predict(tiny_unet, inputs), stock)


def test_enabled_flag_switches_per_step(tiny_unet: nn.Module) -> None:
    inputs = make_inputs()
    stock = predict(tiny_unet, inputs)
    with recipe_highway(tiny_unet, "paper") as on:
        with_highway = predict(tiny_unet, inputs)
    with recipe_highway(tiny_unet, "paper", enabled=False) as highway:
        assert torch.equal(predict(tiny_unet, inputs), stock)
        for enabled, expected in ((True, with_highway), (False, stock), (True, with_highway)):
            highway.enabled = enabled
            assert torch.equal(predict(tiny_unet, inputs), expected)
            assert highway.stored_tensors == 0
    assert not on.installed


def test_works_with_grad_enabled(tiny_unet: nn.Module) -> None:
    inputs = make_inputs()
    with recipe_highway(tiny_unet, "paper"):
        without_grad = predict(tiny_unet, inputs)
        with torch.enable_grad():
            with_grad = tiny_unet(**inputs).sample
    assert torch.allclose(with_grad, without_grad, atol=1e-6)


@pytest.mark.parametrize(
    "plan",
    [
        HighwayPlan(reroute=frozenset({"down_blocks.9.layers.0"}), scale={}),
        HighwayPlan(reroute=frozenset(), scale={"mid_block": 1.1}),
        HighwayPlan(reroute=frozenset({"down_blocks.1.downsamplers.0"}), scale={}),
        HighwayPlan(reroute=frozenset({"down_blocks.3.layers.0"}), scale={}),
        HighwayPlan(reroute=frozenset(), scale={"conv_in": 1.1}),
    ],
    ids=["unknown-block", "not-a-skip", "downsampler", "no-attention", "conv-in"],
)
def test_rejects_a_plan_that_does_not_fit(tiny_unet: nn.Module, plan: HighwayPlan) -> None:
    before = hook_state(tiny_unet)
    with (
        pytest.raises(IncompatibleModelError, match="highway"),
        appearance_highway(tiny_unet, plan),
    ):
        pass
    assert hook_state(tiny_unet) == before


def test_install_twice_is_refused(tiny_unet: nn.Module) -> None:
    highway = AppearanceHighway(tiny_unet, highway_plan(tiny_unet, "paper"))
    with highway, pytest.raises(RuntimeError, match="already installed"):
        highway.install()
    assert not highway.installed


# diffusers 0.42 keeps a `gradient_checkpointing` attribute on the 3D down
# blocks but their forward never reads it, so the tests checkpoint by hand, in
# the three ways a training loop can.


def checkpoint_block_forward(unet: nn.Module) -> None:
    """Checkpoints each down block's forward; the block's own hooks run once."""
    for block in unet.down_blocks:
        block.forward = functools.partial(checkpoint, block.forward, use_reentrant=False)


def checkpoint_transformers(unet: nn.Module) -> None:
    """Checkpoints every spatial and temporal transformer of the down path."""
    for index in ATTENTION_DOWN_BLOCKS:
        block = unet.down_blocks[index]
        for module in (*block.attentions, *block.temp_attentions):
            module.forward = functools.partial(checkpoint, module.forward, use_reentrant=False)


class CheckpointedBlock(nn.Module):
    """Checkpoints a whole block module: its hooks run again on recomputation."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.block = block
        self.has_cross_attention = getattr(block, "has_cross_attention", False)

    def forward(self, **kwargs: Any) -> Any:
        return checkpoint(self.block, use_reentrant=False, **kwargs)


def checkpoint_block_modules(unet: nn.Module) -> None:
    for index, block in enumerate(unet.down_blocks):
        unet.down_blocks[index] = CheckpointedBlock(block)


def gradients(unet: nn.Module, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    unet.zero_grad(set_to_none=True)
    sample = inputs["sample"].clone().requires_grad_(True)
    output = unet(**{**inputs, "sample": sample}).sample
    (output.square().mean()).backward()
    grads = {name: p.grad for name, p in unet.named_parameters() if p.grad is not None}
    grads["sample"] = sample.grad
    return grads


@pytest.mark.parametrize(
    "wrap",
    [checkpoint_block_forward, checkpoint_transformers, checkpoint_block_modules],
    ids=["block-forward", "transformers", "block-modules"],
)
def test_gradient_checkpointing_gives_the_same_gradients(tiny_unet: nn.Module, wrap: Any) -> None:
    inputs = make_inputs()
    tiny_unet.requires_grad_(True)
    with recipe_highway(tiny_unet, "paper"):
        expected = gradients(tiny_unet, inputs)

    calls = {"forward": 0, "total": 0}

    def count(module: nn.Module, args: Any, output: Any) -> None:
        calls["total"] += 1

    counter = (
        tiny_unet.down_blocks[0].attentions[0].transformer_blocks[0].register_forward_hook(count)
    )
    with recipe_highway(tiny_unet, "paper") as highway:
        wrap(tiny_unet)
        tiny_unet.zero_grad(set_to_none=True)
        sample = inputs["sample"].clone().requires_grad_(True)
        output = tiny_unet(**{**inputs, "sample": sample}).sample
        calls["forward"] = calls["total"]
        assert highway.stored_tensors == 0
        output.square().mean().backward()
        assert highway.stored_tensors == 0
    counter.remove()
    # The checkpoint really recomputed the spatial attention during backward.
    assert calls["total"] > calls["forward"] == 1

    grads = {name: p.grad for name, p in tiny_unet.named_parameters() if p.grad is not None}
    grads["sample"] = sample.grad
    assert {name.replace(".block.", ".") for name in grads} == expected.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, expected[name.replace(".block.", ".")], msg=name)


def test_holds_no_activations_after_forward(tiny_unet: nn.Module) -> None:
    inputs = make_inputs()
    refs: list[weakref.ref[torch.Tensor]] = []

    def keep_weakly(module: nn.Module, args: Any, output: Any) -> None:
        refs.append(weakref.ref(output[0]))

    handles = [
        attention.register_forward_hook(keep_weakly)
        for index in ATTENTION_DOWN_BLOCKS
        for attention in tiny_unet.down_blocks[index].attentions
    ]
    with recipe_highway(tiny_unet, "paper") as highway:
        output = predict(tiny_unet, inputs)
        assert highway.stored_tensors == 0
        assert len(refs) == 6
        assert all(ref() is None for ref in refs)
        del output

        refs.clear()
        with torch.enable_grad():
            sample = inputs["sample"].clone().requires_grad_(True)
            output = tiny_unet(**{**inputs, "sample": sample}).sample
            assert highway.stored_tensors == 0
            output.sum().backward()
        del output, sample
        gc.collect()
        assert all(ref() is None for ref in refs)
    for handle in handles:
        handle.remove()
