"""LoRA adapters on a diffusers U-Net through peft: injection, queries, on/off, scale, state.

The method-specific part, which modules the motion LoRA goes on, is
:mod:`motionsep.model.tap`; this module is the toolkit underneath it.

The LoRA numerics are those of the upstream (cloneofsimo) LoRA:
``W x + up(down(x)) * scale`` with ``down ~ N(0, 1/r)``, ``up = 0`` and no
``alpha / r`` factor. With peft that is ``lora_alpha = r`` (scaling 1) and
``init_lora_weights="gaussian"``, which peft implements as
``normal_(lora_A, std=1/r)`` and ``zeros_(lora_B)``.

Every control here (scale, on/off) changes plain attributes of the existing
peft layers; nothing is re-injected, so switching per denoising step is cheap.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
import weakref
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from motionsep.errors import RecipeMismatchError

if TYPE_CHECKING:
    import torch
    from peft.tuners.lora import LoraLayer
    from torch import nn

logger = logging.getLogger(__name__)

MOTION_ADAPTER = "motion"
"""The adapter that carries the learned motion (the one a motion package stores)."""
SPATIAL_ADAPTER = "spatial"
"""The spatial LoRAs of dual-path training (dropped after training)."""

# peft's Gaussian init draws lora_A with std 1/r; upstream LoRA uses the same.
LORA_INIT = "gaussian"

MODULE_NAMES_HINT = (
    "the base model's module names differ from those of the supported families "
    "(ZeroScope / ModelScope's UNet3DConditionModel, AnimateDiff's UNetMotionModel); "
    "use one of those base models (or a U-Net with the same layout)"
)


@dataclass(frozen=True)
class LoraInjection:
    """What one injection did.

    Attributes:
        adapter_name: The peft adapter name.
        adapted: Full names of the modules that got a LoRA layer, in module order.
        rank: LoRA rank r.
        alpha: peft ``lora_alpha`` (equal to ``rank``: scaling 1, as upstream).
        trainable_parameters: Number of LoRA parameters of this adapter.
    """

    adapter_name: str
    adapted: tuple[str, ...]
    rank: int
    alpha: float
    trainable_parameters: int


# ---------------------------------------------------------------------------
# injection


def inject_lora(
    unet: nn.Module,
    targets: Iterable[str],
    rank: int,
    *,
    alpha: float | None = None,
    dropout: float = 0.0,
    adapter_name: str,
    expected: Iterable[str] | None = None,
) -> LoraInjection:
    """Injects one peft LoRA adapter on explicitly named modules and checks the result.

    Args:
        unet: The U-Net; changed in place.
        targets: Full module names to adapt (peft ``target_modules``).
        rank: LoRA rank.
        alpha: peft ``lora_alpha``; None means ``rank`` (upstream numerics).
        dropout: LoRA dropout (0 at inference).
        adapter_name: Name of the new adapter; must not exist yet.
        expected: The module names that must end up adapted; defaults to ``targets``.

    Adapters injected earlier keep their on/off state (peft alone would
    switch them off); the new one is on. Base weights are frozen, the new
    LoRA tensors trainable.

    Returns:
        The adapted names and the adapter's parameter count.

    Raises:
        RecipeMismatchError: if the adapted modules differ from ``expected``;
            the new adapter is removed again first.
        ValueError: if ``adapter_name`` is already injected or ``rank`` < 1.
    """
    from peft import LoraConfig, inject_adapter_in_model

    if rank < 1:
        raise ValueError(f"LoRA rank must be at least 1, got {rank}")
    if adapter_name in adapter_names(unet):
        raise ValueError(f"adapter {adapter_name!r} is already injected into this U-Net")
    target_list = list(targets)
    wanted = set(target_list if expected is None else expected)
    if not target_list:
        raise RecipeMismatchError(
            f"no module of this U-Net is a target of the {adapter_name} LoRA "
            f"(expected {len(wanted)} modules)",
            MODULE_NAMES_HINT,
        )
    lora_alpha = float(rank if alpha is None else alpha)
    config = LoraConfig(
        r=rank,
        lora_alpha=lora_alpha,
        lora_dropout=dropout,
        target_modules=target_list,
        init_lora_weights=LORA_INIT,
        bias="none",
    )
    enabled_before = {name: _enabled_layers(unet, name) for name in adapter_names(unet)}
    grads_before = _lora_requires_grad(unet)
    with warnings.catch_warnings():
        # A second adapter on the same model is what we want (motion + spatial).
        warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
        _LAYER_CACHE.pop(unet, None)
        try:
            inject_adapter_in_model(config, unet, adapter_name=adapter_name)
        except ValueError as exc:
            raise RecipeMismatchError(
                f"peft could not inject the {adapter_name} LoRA: {exc}", MODULE_NAMES_HINT
            ) from exc

    # peft makes the newest adapter the only active one on *every* LoRA layer,
    # which would silently switch off an adapter injected earlier; restore it.
    for name, layers in enabled_before.items():
        for layer in layers:
            _set_layer_active(layer, [*layer.active_adapters, name])
    _restore_requires_grad(grads_before)
    freeze_base(unet)

    adapted = adapted_modules(unet, adapter_name)
    try:
        _check_adapted(adapter_name, adapted, wanted)
    except RecipeMismatchError:
        # Leave the U-Net as it was, not half-adapted.
        if adapted:
            drop_adapter(unet, adapter_name)
        raise
    count = adapter_parameter_count(unet, adapter_name)
    logger.info(
        "%s LoRA: %d modules adapted, rank %d, %d trainable parameters",
        adapter_name,
        len(adapted),
        rank,
        count,
    )
    return LoraInjection(
        adapter_name=adapter_name,
        adapted=tuple(adapted),
        rank=rank,
        alpha=lora_alpha,
        trainable_parameters=count,
    )


def _check_adapted(adapter_name: str, adapted: list[str], wanted: set[str]) -> None:
    missing = sorted(wanted - set(adapted))
    extra = sorted(set(adapted) - wanted)
    if not missing and not extra:
        return
    parts = []
    if missing:
        parts.append(f"{len(missing)} expected module(s) not adapted: {_preview(missing)}")
    if extra:
        parts.append(f"{len(extra)} unexpected module(s) adapted: {_preview(extra)}")
    raise RecipeMismatchError(
        f"the {adapter_name} LoRA does not match its recipe: " + "; ".join(parts), MODULE_NAMES_HINT
    )


def _preview(names: list[str], limit: int = 5) -> str:
    shown = ", ".join(names[:limit])
    return shown if len(names) <= limit else f"{shown}, ... ({len(names) - limit} more)"


# ---------------------------------------------------------------------------
# inspection


# The LoRA layers of each U-Net, found once: walking a U-Net's modules takes
# 6-8 ms on the toy U-Net (more on ZeroScope's), and training switches
# adapters on and off several times a step. Adapters enter and leave only
# through inject_lora / drop_adapter, which drop the entry; a cached layer
# that is no longer in its parent (replaced by other code) also makes the
# walk run again.
_LAYER_CACHE: weakref.WeakKeyDictionary[nn.Module, list[tuple[str, LoraLayer, nn.Module]]] = (
    weakref.WeakKeyDictionary()
)


def _all_lora_layers(unet: nn.Module) -> list[tuple[str, LoraLayer]]:
    from peft.tuners.lora import LoraLayer

    cached = _LAYER_CACHE.get(unet)
    # each entry keeps the layer's parent: one dict lookup tells it is still there
    if cached is not None and all(
        parent._modules.get(name.rpartition(".")[2]) is layer for name, layer, parent in cached
    ):
        return [(name, layer) for name, layer, _ in cached]
    found = [(name, m) for name, m in unet.named_modules() if isinstance(m, LoraLayer)]
    _LAYER_CACHE[unet] = [
        (name, layer, unet.get_submodule(name.rpartition(".")[0])) for name, layer in found
    ]
    return found


def lora_layers(unet: nn.Module, adapter_name: str | None = None) -> list[tuple[str, LoraLayer]]:
    """Every peft LoRA layer of the U-Net (holding ``adapter_name``, if given), in module order."""
    return [
        (name, module)
        for name, module in _all_lora_layers(unet)
        if adapter_name is None or adapter_name in module.lora_A
    ]


def adapter_names(unet: nn.Module) -> list[str]:
    """Names of the LoRA adapters injected into the U-Net, in order of first appearance."""
    names: dict[str, None] = {}
    for _, layer in lora_layers(unet):
        names.update(dict.fromkeys(layer.lora_A.keys()))
    return list(names)


def adapted_modules(unet: nn.Module, adapter_name: str = MOTION_ADAPTER) -> list[str]:
    """Full names of the modules that hold a LoRA layer of ``adapter_name``."""
    return [name for name, _ in lora_layers(unet, adapter_name)]


def adapter_parameters(unet: nn.Module, adapter_name: str) -> list[torch.nn.Parameter]:
    """The LoRA tensors (down and up weights) of one adapter."""
    params: list[torch.nn.Parameter] = []
    for _, layer in lora_layers(unet, adapter_name):
        params.extend(layer.lora_A[adapter_name].parameters())
        params.extend(layer.lora_B[adapter_name].parameters())
    return params


def adapter_parameter_count(unet: nn.Module, adapter_name: str) -> int:
    """Number of LoRA parameters of one adapter."""
    return sum(p.numel() for p in adapter_parameters(unet, adapter_name))


# ---------------------------------------------------------------------------
# trainability


def freeze_base(unet: nn.Module) -> None:
    """Freezes every parameter that is not a LoRA tensor (LoRA tensors are left as they are)."""
    lora_ids = {id(p) for _, layer in lora_layers(unet) for p in _layer_lora_params(layer)}
    for param in unet.parameters():
        if id(param) not in lora_ids:
            param.requires_grad_(False)


def set_adapter_trainable(unet: nn.Module, adapter_name: str, trainable: bool) -> None:
    """Marks one adapter's LoRA tensors trainable or frozen."""
    for param in adapter_parameters(unet, adapter_name):
        param.requires_grad_(trainable)


def _layer_lora_params(layer: LoraLayer) -> Iterator[torch.nn.Parameter]:
    for attr in layer.adapter_layer_names:
        container = getattr(layer, attr)
        if hasattr(container, "parameters"):
            yield from container.parameters()


def _lora_requires_grad(unet: nn.Module) -> dict[torch.nn.Parameter, bool]:
    return {p: p.requires_grad for _, layer in lora_layers(unet) for p in _layer_lora_params(layer)}


def _restore_requires_grad(flags: Mapping[torch.nn.Parameter, bool]) -> None:
    for param, flag in flags.items():
        param.requires_grad_(flag)


# ---------------------------------------------------------------------------
# on/off and scale


def _set_layer_active(layer: LoraLayer, names: Iterable[str]) -> None:
    """Sets a layer's active adapters without touching requires_grad.

    peft's ``set_adapter`` also flips ``requires_grad`` (active: trainable,
    inactive: frozen), which would unfreeze an inference-only adapter or
    freeze a spatial LoRA mid-training; trainability is ours to decide.
    """
    wanted = set(names)
    chosen = [name for name in layer.lora_A if name in wanted]
    if list(layer.active_adapters) == chosen:
        return
    if isinstance(getattr(layer, "_active_adapter", None), list | str):
        # Where peft keeps the active adapters: setting it is set_adapter without
        # its requires_grad walk (0.2 ms a layer; dual-path training switches
        # the per-clip spatial LoRAs of every layer twice a step).
        layer._active_adapter = chosen
        return
    flags = {p: p.requires_grad for p in _layer_lora_params(layer)}
    layer.set_adapter(chosen)
    _restore_requires_grad(flags)


def _enabled_layers(unet: nn.Module, adapter_name: str) -> list[LoraLayer]:
    return [
        layer
        for _, layer in lora_layers(unet, adapter_name)
        if adapter_name in layer.active_adapters
    ]


def _require_adapter(unet: nn.Module, adapter_name: str) -> list[LoraLayer]:
    layers = [layer for _, layer in lora_layers(unet, adapter_name)]
    if not layers:
        raise _no_such_adapter(unet, adapter_name)
    return layers


def _no_such_adapter(unet: nn.Module, adapter_name: str) -> ValueError:
    injected = ", ".join(adapter_names(unet)) or "none"
    return ValueError(f"no LoRA adapter {adapter_name!r} in this U-Net (injected: {injected})")


def is_adapter_enabled(unet: nn.Module, adapter_name: str = MOTION_ADAPTER) -> bool:
    """Whether the adapter takes part in the forward pass (on all of its layers)."""
    return all(
        adapter_name in layer.active_adapters for layer in _require_adapter(unet, adapter_name)
    )


def set_adapter_enabled(unet: nn.Module, enabled: bool, adapter_name: str = MOTION_ADAPTER) -> None:
    """Switches one adapter on or off; other adapters and trainability are kept.

    Off means the adapter's layers compute exactly the base layer (no LoRA
    compute at all), so the output equals the base model's bit for bit.

    Raises:
        ValueError: if the adapter is not injected.
    """
    for layer in _require_adapter(unet, adapter_name):
        others = [name for name in layer.active_adapters if name != adapter_name]
        _set_layer_active(layer, [*others, adapter_name] if enabled else others)


@contextlib.contextmanager
def adapter_enabled(
    unet: nn.Module, enabled: bool, adapter_name: str = MOTION_ADAPTER
) -> Iterator[None]:
    """Switches an adapter on or off inside the block and always restores its state.

    Example (phased LoRA integration)::

        with adapter_enabled(unet, step < cutoff):
            noise_pred = unet(latents, t, encoder_hidden_states=text).sample
    """
    before = is_adapter_enabled(unet, adapter_name)
    set_adapter_enabled(unet, enabled, adapter_name)
    try:
        yield
    finally:
        set_adapter_enabled(unet, before, adapter_name)


def get_lora_scale(unet: nn.Module, adapter_name: str = MOTION_ADAPTER) -> float:
    """The adapter's current scale (1.0 after injection)."""
    layer = _require_adapter(unet, adapter_name)[0]
    # peft stores scale * alpha / r; alpha / r is the injection-time factor.
    return float(
        layer.scaling[adapter_name] * layer.r[adapter_name] / layer.lora_alpha[adapter_name]
    )


def set_lora_scale(unet: nn.Module, scale: float, adapter_name: str = MOTION_ADAPTER) -> None:
    """Sets the adapter's scale: output = W x + scale * up(down(x)).

    Scale 0 gives the base output exactly but still computes the LoRA branch;
    to skip that compute too, switch the adapter off (:func:`set_adapter_enabled`).

    Raises:
        ValueError: if the adapter is not injected.
    """
    for layer in _require_adapter(unet, adapter_name):
        layer.set_scale(adapter_name, scale)


@contextlib.contextmanager
def lora_scale(unet: nn.Module, scale: float, adapter_name: str = MOTION_ADAPTER) -> Iterator[None]:
    """Sets the adapter's scale inside the block and always restores the previous one."""
    before = get_lora_scale(unet, adapter_name)
    set_lora_scale(unet, scale, adapter_name)
    try:
        yield
    finally:
        set_lora_scale(unet, before, adapter_name)


# ---------------------------------------------------------------------------
# dropping and state dicts


def drop_adapter(unet: nn.Module, adapter_name: str) -> None:
    """Deletes an adapter from the U-Net entirely.

    Layers left without any adapter are replaced by their original base
    module, so the U-Net holds only the base weights and the other adapters
    (the state dict keys of those modules are the base model's again).

    Raises:
        ValueError: if the adapter is not injected.
    """
    layers = lora_layers(unet, adapter_name)
    if not layers:
        raise _no_such_adapter(unet, adapter_name)
    for name, layer in layers:
        others = [n for n in layer.active_adapters if n != adapter_name]
        _set_layer_active(layer, others)
        layer.delete_adapter(adapter_name)
        if not list(layer.lora_A.keys()):
            parent_name, _, child = name.rpartition(".")
            parent = unet.get_submodule(parent_name) if parent_name else unet
            setattr(parent, child, layer.get_base_layer())
    _LAYER_CACHE.pop(unet, None)
    peft_config = getattr(unet, "peft_config", None)
    if isinstance(peft_config, dict):
        peft_config.pop(adapter_name, None)
        if not peft_config:
            del unet.peft_config


def adapter_state_dict(
    unet: nn.Module, adapter_name: str = MOTION_ADAPTER
) -> dict[str, torch.Tensor]:
    """The adapter's LoRA tensors, keyed as peft saves them (adapter name stripped).

    Keys look like ``transformer_in.transformer_blocks.0.attn1.to_k.lora_A.weight``.
    Tensors are detached copies, contiguous, ready for safetensors.

    Raises:
        ValueError: if the adapter is not injected.
    """
    from peft import get_peft_model_state_dict

    _require_adapter(unet, adapter_name)
    state = get_peft_model_state_dict(unet, adapter_name=adapter_name)
    return {key: value.detach().clone().contiguous() for key, value in state.items()}


def load_adapter_state_dict(
    unet: nn.Module,
    state: Mapping[str, torch.Tensor],
    adapter_name: str = MOTION_ADAPTER,
) -> None:
    """Copies saved LoRA tensors into an injected adapter.

    The keys and shapes must match the adapter exactly (same targets, same
    rank); values are cast to the adapter's dtype.

    Raises:
        RecipeMismatchError: naming missing, unexpected or mis-shaped tensors.
        ValueError: if the adapter is not injected.
    """
    from peft import set_peft_model_state_dict

    current = adapter_state_dict(unet, adapter_name)
    missing = sorted(set(current) - set(state))
    extra = sorted(set(state) - set(current))
    shapes = sorted(
        f"{key} {tuple(state[key].shape)} vs {tuple(current[key].shape)}"
        for key in set(current) & set(state)
        if tuple(state[key].shape) != tuple(current[key].shape)
    )
    if missing or extra or shapes:
        parts = []
        if missing:
            parts.append(f"missing tensors: {_preview(missing)}")
        if extra:
            parts.append(f"unexpected tensors: {_preview(extra)}")
        if shapes:
            parts.append(f"wrong shapes (saved vs model): {_preview(shapes)}")
        raise RecipeMismatchError(
            f"the saved {adapter_name} LoRA does not fit the injected one: " + "; ".join(parts),
            "inject with the same recipe and rank the adapter was trained with",
        )
    flags = _lora_requires_grad(unet)
    result = set_peft_model_state_dict(unet, dict(state), adapter_name=adapter_name)
    _restore_requires_grad(flags)
    unexpected = [key for key in result.unexpected_keys if adapter_name in key]
    if unexpected:
        raise RecipeMismatchError(
            f"peft did not load {len(unexpected)} {adapter_name} LoRA tensor(s): "
            + _preview(unexpected)
        )
