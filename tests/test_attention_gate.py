"""Temporal ablations (uniform attention, bypassed temporal convs) and the toy attention gate."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from typer.testing import CliRunner

from motionsep.errors import IncompatibleModelError
from motionsep.model.ablations import (
    UniformAttnProcessor,
    bypass_temporal_convs,
    temporal_conv_names,
    uniform_temporal_attention,
)
from motionsep.model.attention import temporal_attention_names
from motionsep_cli.app import app

FRAMES = 4


def _inputs(unet: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded latents (1, C, F, 8, 8) and text (1, 8, D) for the tiny U-Net."""
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(1, unet.config.in_channels, FRAMES, 8, 8, generator=generator)
    text = torch.randn(1, 8, unet.config.cross_attention_dim, generator=generator)
    return latents, text


def _eps(unet: Any) -> torch.Tensor:
    latents, text = _inputs(unet)
    with torch.no_grad():
        return unet(latents, 500, encoder_hidden_states=text).sample


# ---------------------------------------------------------------------------
# uniform temporal attention


@pytest.mark.parametrize(("residual", "rescale"), [(False, 1.0), (True, 2.0)])
def test_uniform_attention_is_stock_attention_with_equal_logits(
    tiny_unet: Any, residual: bool, rescale: float
) -> None:
    name = temporal_attention_names(tiny_unet)[4]
    attn = tiny_unet.get_submodule(name)
    attn.residual_connection, attn.rescale_output_factor = residual, rescale
    x = torch.randn(6, FRAMES, attn.to_q.in_features, generator=torch.Generator().manual_seed(1))
    uniform = UniformAttnProcessor()
    with torch.no_grad():
        # trained-looking weights: attention chooses frames, uniform does not
        assert not torch.allclose(attn.processor(attn, x), uniform(attn, x), atol=1e-4)
        # zero queries make every logit equal, so stock softmax is uniform
        attn.to_q.weight.zero_()
        torch.testing.assert_close(uniform(attn, x), attn.processor(attn, x))


def test_uniform_attention_changes_the_unet_only_through_its_logits(tiny_unet: Any) -> None:
    stock = _eps(tiny_unet)
    with uniform_temporal_attention(tiny_unet) as names:
        ablated = _eps(tiny_unet)
    assert names == temporal_attention_names(tiny_unet)
    assert any(n.startswith("transformer_in.") for n in names)
    assert (ablated - stock).abs().max() > 1e-3
    for name in names:
        tiny_unet.get_submodule(name).to_q.weight.data.zero_()
    zeroed = _eps(tiny_unet)
    with uniform_temporal_attention(tiny_unet):
        torch.testing.assert_close(_eps(tiny_unet), zeroed, atol=1e-5, rtol=1e-4)


def test_uniform_attention_restores_every_processor_even_after_an_error(tiny_unet: Any) -> None:
    before = dict(tiny_unet.attn_processors)
    stock = _eps(tiny_unet)

    def interrupted() -> None:
        with uniform_temporal_attention(tiny_unet) as names:
            processors = [tiny_unet.get_submodule(n).processor for n in names]
            assert all(isinstance(p, UniformAttnProcessor) for p in processors)
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        interrupted()
    after = tiny_unet.attn_processors
    assert after.keys() == before.keys()
    assert all(after[key] is before[key] for key in before)
    assert torch.equal(_eps(tiny_unet), stock)


# ---------------------------------------------------------------------------
# bypassed temporal convolutions


def _last_convs(unet: Any) -> list[torch.nn.Conv3d]:
    return [unet.get_submodule(name).conv4[-1] for name in temporal_conv_names(unet)]


def test_bypass_is_the_model_with_zeroed_temporal_convs(tiny_unet: Any) -> None:
    names = temporal_conv_names(tiny_unet)
    assert any(n.startswith("mid_block.") for n in names) and len(names) == 22
    for conv in _last_convs(tiny_unet):
        for parameter in conv.parameters():  # weight and bias
            parameter.data.zero_()
    with bypass_temporal_convs(tiny_unet):
        bypassed = _eps(tiny_unet)
    # the conv stack then adds exactly zero to its input
    assert torch.equal(bypassed, _eps(tiny_unet))

    generator = torch.Generator().manual_seed(2)
    for conv in _last_convs(tiny_unet):
        conv.weight.data = 0.1 * torch.randn(conv.weight.shape, generator=generator)
    assert (_eps(tiny_unet) - bypassed).abs().max() > 1e-3
    with bypass_temporal_convs(tiny_unet):
        assert torch.equal(_eps(tiny_unet), bypassed)


def test_bypass_removes_its_hooks_even_after_an_error(tiny_unet: Any) -> None:
    for conv in _last_convs(tiny_unet):
        conv.weight.data.normal_(0, 0.1, generator=torch.Generator().manual_seed(3))
    stock = _eps(tiny_unet)

    def interrupted() -> None:
        with bypass_temporal_convs(tiny_unet):
            assert not torch.equal(_eps(tiny_unet), stock)
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        interrupted()
    names = temporal_conv_names(tiny_unet)
    assert all(not tiny_unet.get_submodule(n)._forward_hooks for n in names)
    assert torch.equal(_eps(tiny_unet), stock)


def test_ablations_refuse_a_model_without_temporal_layers() -> None:
    plain = torch.nn.Sequential(torch.nn.Linear(2, 2))
    with pytest.raises(IncompatibleModelError, match="no temporal attention"):
        uniform_temporal_attention(plain).__enter__()
    with pytest.raises(IncompatibleModelError, match="no temporal convolution"):
        bypass_temporal_convs(plain).__enter__()


# ---------------------------------------------------------------------------
# the gate on the shipped toy model


def _shipped() -> bool:
    from motionsep.store import builtin_model_path

    return builtin_model_path("toy") is not None


needs_shipped = pytest.mark.skipif(not _shipped(), reason="the pretrained toy model is not shipped")


@needs_shipped
def test_attention_gate_command_reports_both_ratios_reproducibly(store_home: Path) -> None:
    args = ["toy", "probe", "--attention", "--count", "3", "--seed", "3"]
    first = CliRunner().invoke(app, [*args, "--json"])
    assert first.exit_code == 0, first.output
    report = json.loads(first.stdout)
    for key in (
        "uniform_attention_loss_ratio",
        "no_temporal_conv_loss_ratio",
        "no_temporal_mixing_loss_ratio",
        "loss",
    ):
        assert math.isfinite(report[key]) and report[key] > 0, key
    assert report["uniform_attention_loss_ratio"] == pytest.approx(
        report["uniform_attention_loss"] / report["loss"]
    )
    assert report["clips"] == 3 and report["seed"] == 3
    assert len(report["per_timestep"]) == len(report["timesteps"]) == 5
    assert len(report["layers"]) == 34  # attn1 and attn2 of 17 temporal transformers
    assert report["max_entropy"] == pytest.approx(math.log(8))
    assert 0 < report["mean_entropy"] <= report["max_entropy"]
    # the shipped model leans on its temporal convolutions; with the attention made uniform
    # as well, nothing but the mean of the frames passes between them: worse still
    assert report["no_temporal_conv_loss_ratio"] > 1.2
    assert report["no_temporal_mixing_loss_ratio"] >= report["no_temporal_conv_loss_ratio"] * 0.95

    again = CliRunner().invoke(app, [*args, "--json"])
    assert json.loads(again.stdout) == report

    plain = CliRunner().invoke(app, ["toy", "probe", "--attention", "--count", "1"])
    assert plain.exit_code == 0, plain.output
    assert "uniform_attention_loss_ratio:" in plain.stdout
    assert "transformer_in.transformer_blocks.0.attn1" in plain.stdout


def test_attention_gate_on_an_animatediff_toy_ablates_only_its_motion_modules() -> None:
    """No temporal convolution to bypass: that ratio is 1 by construction, and uniform
    attention over the 42 motion-module attentions is the only ablation that bites."""
    from motionsep.toy.attention_gate import attention_gate
    from motionsep.toy.pretrain import PretrainConfig, build_run, components_of, export_parts

    config = PretrainConfig(family="animatediff", vae_steps=0, init_from="toy", vae_from="toy")
    components = components_of(export_parts(build_run(config, torch.device("cpu"))))
    report = attention_gate(components, clips=2, timesteps=(500,), batch_size=2)
    assert report["no_temporal_conv_loss_ratio"] == 1.0
    assert report["no_temporal_mixing_loss"] == report["uniform_attention_loss"]
    assert report["uniform_attention_loss"] != report["loss"]  # the motion modules do act
    assert math.isfinite(report["uniform_attention_loss_ratio"])
    assert len(report["layers"]) == 42
    assert all(".motion_modules." in layer["name"] for layer in report["layers"])
