"""A cheaper ``ModelMixin.dtype`` for diffusers models: the same answer, no exception per module.

Every U-Net forward of both families asks for its own dtype
(``t_emb.to(dtype=self.dtype)``). diffusers answers with
``get_parameter_dtype``, which first walks every submodule for a
layerwise-casting hook with ``hasattr(submodule, "_diffusers_hook")``; on a
module without that attribute, torch's ``Module.__getattr__`` raises and
``hasattr`` catches an AttributeError, once per module. On the toy
AnimateDiff U-Net (1,347 modules, more with LoRA layers) that walk takes
milliseconds, a few percent of a CPU forward pass; on a GPU it is host time
every step. ``python bench/dtype_lookup.py`` times both.

:func:`install` replaces diffusers' ``get_parameter_dtype`` (the name
``ModelMixin.dtype`` calls) with :func:`parameter_dtype`, which looks for the
hook registry in each module's ``__dict__`` (where diffusers' ``HookRegistry``
keeps it: a plain attribute) and then takes the first floating-point
parameter or buffer, skipping ``_keep_in_fp32_modules``, as diffusers does
(a module with neither goes to diffusers' own function).
``tests/test_family.py`` checks that both give the same dtype for plain,
half-precision, kept-in-fp32 and layerwise-cast models.
"""

from __future__ import annotations

from typing import Any

_HOOK_ATTRIBUTE = "_diffusers_hook"
_LAYERWISE_CASTING = "layerwise_casting"
_original: Any = None


def parameter_dtype(module: Any) -> Any:
    """The dtype diffusers' ``get_parameter_dtype`` gives, found without its AttributeErrors."""
    import torch

    if isinstance(module, torch.nn.Module):
        # the modules in named_modules' order (depth first, parent before its
        # children), without building their names. A module shared by two
        # parents is looked at twice, which finds the same hook first; a
        # cycle cannot occur, since .to() and state_dict() would recurse forever
        stack = [module]
        while stack:
            submodule = stack.pop()
            registry = submodule.__dict__.get(_HOOK_ATTRIBUTE)
            if registry is not None:
                hook = registry.get_hook(_LAYERWISE_CASTING)
                if hook is not None:
                    return hook.compute_dtype
            children = reversed(submodule._modules.values())
            stack.extend(child for child in children if child is not None)
    kept = getattr(module, "_keep_in_fp32_modules", None) or ()
    last = None
    for name, param in module.named_parameters():
        last = param.dtype
        if kept and any(part in name for part in kept):
            continue
        if param.is_floating_point():
            return param.dtype
    for buffer in module.buffers():
        last = buffer.dtype
        if buffer.is_floating_point():
            return buffer.dtype
    if last is None and _original is not None:
        return _original(module)  # no parameters or buffers: diffusers' own fallbacks
    return last


def install() -> None:
    """Makes ``ModelMixin.dtype`` use :func:`parameter_dtype` (idempotent, this process)."""
    global _original
    from diffusers.models import modeling_utils

    if modeling_utils.get_parameter_dtype is not parameter_dtype:
        _original = modeling_utils.get_parameter_dtype
        modeling_utils.get_parameter_dtype = parameter_dtype
