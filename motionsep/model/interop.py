"""Motion LoRAs in other programs' formats: import them as packages, export packages as them.

Three formats are read and two are written:

**upstream** (read and write): the cloneofsimo LoRA list that the paper's
released code and MotionDirector save. One flat list ``[up0, down0, up1,
down1, ...]``, one (up, down) pair per adapted ``nn.Linear``, in the order in
which ``unet.named_modules()`` meets the adapted layers: temporal transformers
in module order (``transformer_in``, ``down_blocks.*``, ``up_blocks.*``, and
``mid_block`` last, because the U-Net registers ``up_blocks`` before
``mid_block``); within a temporal transformer, ``attn1`` before ``attn2`` and
within an attention ``to_q, to_k, to_v, to_out.0``; the ``ff`` layers
(``ff.net.0.proj``, ``ff.net.2``) after ``attn2``. ``up`` is ``(out, r)`` and
``down`` is ``(r, in)``; the layer computes ``W x + up(down(x))`` (no
``alpha / r`` factor; peft's ``lora_B`` is ``up`` and ``lora_A`` is ``down``
with ``lora_alpha = r``). Which layers are in the list depends on the recipe:

- ``reference`` (the paper's released checkpoints): ``attn1.to_k``,
  ``attn1.to_out.0``, ``attn2.to_k``, ``attn2.to_out.0`` of every temporal
  transformer, 4 layers (8 tensors) each;
- ``paper``: written as the reference layout with all-zero ``to_out.0`` pairs
  (so the paper's scripts load it); on import such a list is read back as a
  ``paper`` motion, and a list of the ``to_k`` pairs alone is read as one too;
- ``motiondirector``: every Linear of ``attn1``, ``attn2`` and ``ff``, 10 layers
  (20 tensors) per temporal transformer.

On import, the recipe is inferred from the number of tensors; ``--format
motiondirector`` insists on MotionDirector's layout. Files are accepted as

- ``.pt`` / ``.pth``: a pickle, read only through ``torch.load(weights_only=True)``,
  holding a list (or tuple) of tensors, or a dict of tensors keyed as below;
- ``.safetensors`` keyed either as cloneofsimo's ``save_safeloras`` writes it,
  ``"unet:<i>:up"`` / ``"unet:<i>:down"`` for pair ``i`` (metadata ``unet``:
  ``'["TransformerTemporalModel"]'`` and ``"unet:<i>:rank"``), or by list
  position, ``"0"``, ``"1"``, ... (``"2i"`` is ``up`` of pair ``i``,
  ``"2i+1"`` its ``down``).

Export writes ``.safetensors`` in the ``save_safeloras`` layout unless the
output name ends in ``.pt``/``.pth``: then a pickle holding only a list of
``torch.nn.Parameter`` tensors, which the paper's ``infer.py`` (it calls
``torch.load`` and assigns each element as a module weight) loads as it is.

**peft** (read and write): a standard peft adapter folder,
``adapter_config.json`` + ``adapter_model.safetensors`` with keys
``base_model.model.<module>.lora_A.weight`` / ``lora_B.weight``, loadable with
``peft.PeftModel.from_pretrained(unet, folder)``.

**diffusers** (read and write; AnimateDiff motions): what
``AnimateDiffPipeline.save_lora_weights`` writes and ``load_lora_weights``
reads, one ``pytorch_lora_weights.safetensors`` (in a folder) with keys
``unet.<module>.lora_A.weight`` / ``lora_B.weight`` and the adapter's ``r``,
``lora_alpha`` and ``target_modules`` in its metadata (without them diffusers
takes alpha = rank). ZeroScope motions are not written this way: diffusers'
``TextToVideoSDPipeline`` has no LoRA loader for its ``UNet3DConditionModel``.

**animatediff** (read): the original AnimateDiff MotionLoRA layout (``.ckpt``
pickles or ``.safetensors``), keys such as
``down_blocks.0.motion_modules.0.temporal_transformer.transformer_blocks.0.attention_blocks.0.processor.to_q_lora.down.weight``:
``attention_blocks.0`` / ``.1`` are ``attn1`` / ``attn2``, ``to_out_lora`` is
``to_out.0``, ``down`` / ``up`` are ``lora_A`` / ``lora_B``, scale 1 (alpha =
rank). diffusers has no converter for it, so the keys are renamed here.

Both named layouts (diffusers, animatediff) give the recipe by which
projections they adapt: ``to_k`` only is ``paper``, ``to_k`` + ``to_out.0`` is
``reference``, ``to_q``/``to_k``/``to_v``/``to_out.0`` (with or without the
``ff`` layers) is ``motiondirector``. They must cover every temporal
transformer of the base U-Net; only the mid block's may be missing.

Every import is checked against the base U-Net of its family (module names
and Linear shapes, from its config alone: no weights are loaded) before
anything is written; a mismatch names what was expected and what was found,
and a LoRA of the other family (AnimateDiff onto ZeroScope or the reverse) is
named as such.
"""

from __future__ import annotations

import json
import logging
import math
import pickle
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from motionsep.config import Recipe
from motionsep.errors import ModelFormatError, PackageError, UsageError
from motionsep.model import lora, recipes
from motionsep.model.components import check_model_folder, unet_config_hash
from motionsep.model.family import ANIMATEDIFF, FAMILIES, ZEROSCOPE, Family, family_of
from motionsep.model.motion import (
    BaseModelRecord,
    MotionMetadata,
    MotionPackage,
    file_sha256,
    save_motion,
)
from motionsep.store import Store
from motionsep.userfiles import (
    OutputKind,
    check_outside_store,
    new_folder,
    write_new_file,
)

if TYPE_CHECKING:
    import torch
    from torch import nn

logger = logging.getLogger(__name__)

PICKLE_SUFFIXES = (".pt", ".pth")
SAFETENSORS_SUFFIX = ".safetensors"
UPSTREAM_SUFFIXES = (*PICKLE_SUFFIXES, SAFETENSORS_SUFFIX)

# cloneofsimo's save_safeloras groups tensors by the pipeline attribute they
# belong to and records the ancestor classes its injector searched.
SAFELORAS_MODEL = "unet"
SAFELORAS_TARGETS = ["TransformerTemporalModel"]

PEFT_CONFIG_FILE = "adapter_config.json"
PEFT_WEIGHTS_FILE = "adapter_model.safetensors"
PEFT_KEY_PREFIX = "base_model.model."

# What AnimateDiffPipeline.save_lora_weights writes and load_lora_weights reads.
DIFFUSERS_WEIGHTS_FILE = "pytorch_lora_weights.safetensors"
DIFFUSERS_KEY_PREFIX = "unet."
DIFFUSERS_METADATA_KEY = "lora_adapter_metadata"

# The original AnimateDiff MotionLoRAs are .ckpt pickles (or .safetensors).
ANIMATEDIFF_SUFFIXES = (*PICKLE_SUFFIXES, ".ckpt", SAFETENSORS_SUFFIX)
# An AnimateDiff checkpoint may wrap its LoRA tensors and carry its config: its loader
# unwraps the one and drops the other, and so does the import.
ANIMATEDIFF_WRAPPER_KEY = "state_dict"
ANIMATEDIFF_CONFIG_KEY = "animatediff_config"

# Module-name fragments only one family's temporal layers have: how a LoRA's
# family shows in its tensor names before any shape is compared.
FAMILY_MARKERS: dict[str, tuple[str, ...]] = {
    ANIMATEDIFF.name: (".motion_modules.", ".temporal_transformer."),
    ZEROSCOPE.name: (".temp_attentions.", "transformer_in."),
}

_SAFELORAS_KEY = re.compile(r"^(?P<model>[^:]+):(?P<index>\d+):(?P<direction>up|down)$")
_PEFT_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<kind>A|B)\.weight$")
# An attention-processor LoRA key (AnimateDiff's, and diffusers' before peft).
_PROCESSOR_KEY = re.compile(
    r"^(?P<module>.+?)(?:\.processor)?\.(?P<projection>to_q|to_k|to_v|to_out)_lora\."
    r"(?P<direction>down|up)\.weight$"
)
_ATTENTION_BLOCK = re.compile(r"\.attention_blocks\.(?P<index>\d+)(?=\.|$)")
_FLOAT_DTYPES = ("float32", "float16", "bfloat16", "float64")
# Names under the U-Net's mid block (a MotionLoRA may leave its motion module out).
MID_BLOCK_PREFIX = "mid_block."
_PREVIEW = 4


class ImportFormat(str, Enum):
    """What ``motions import`` reads."""

    AUTO = "auto"
    UPSTREAM = "upstream"
    MOTIONDIRECTOR = "motiondirector"
    PEFT = "peft"
    DIFFUSERS = "diffusers"
    ANIMATEDIFF = "animatediff"


class ExportFormat(str, Enum):
    """What ``motions export`` writes."""

    PEFT = "peft"
    UPSTREAM = "upstream"
    DIFFUSERS = "diffusers"


@dataclass(frozen=True)
class LinearLayer:
    """One Linear layer of the base U-Net that a LoRA can adapt.

    Attributes:
        name: Full module name.
        in_features: Input width (``down`` is ``(r, in_features)``).
        out_features: Output width (``up`` is ``(out_features, r)``).
    """

    name: str
    in_features: int
    out_features: int


@dataclass(frozen=True)
class ConvertedMotion:
    """A motion LoRA read from another format, checked against a base U-Net.

    Attributes:
        recipe: The recipe its layers belong to.
        rank: LoRA rank.
        alpha: peft ``lora_alpha`` (the rank, for upstream lists: scaling 1).
        targets: Adapted module names, in module order.
        state: The LoRA tensors with peft keys (``<module>.lora_A.weight``), fp32.
        notes: What the conversion decided, for the user (e.g. how the recipe was inferred).
    """

    recipe: Recipe
    rank: int
    alpha: float
    targets: list[str]
    state: dict[str, torch.Tensor]
    notes: list[str] = field(default_factory=list)


# ---------------------------------------------------------------------------
# the base U-Net


def unet_skeleton(unet_config: Mapping[str, Any]) -> nn.Module:
    """A U-Net built from its config on the meta device: names and shapes, no memory.

    Args:
        unet_config: The config of the U-Net a model folder loads as
            (:func:`~motionsep.model.components.check_model_folder`); its
            ``_class_name`` says the family.

    Raises:
        ModelFormatError: for a U-Net class of no supported family.
    """
    import diffusers
    import torch

    class_name = unet_config.get("_class_name")
    family = next((f for f in FAMILIES.values() if f.unet_class == class_name), None)
    if family is None:
        raise ModelFormatError(
            f"a {class_name!r} U-Net is not a video U-Net motionsep supports",
            "use a ZeroScope / ModelScope or an AnimateDiff base model (--model)",
        )
    with torch.device("meta"):
        unet_class = getattr(diffusers, family.unet_class)
        return cast("nn.Module", unet_class.from_config(dict(unet_config)))


def names_family(names: Sequence[str]) -> Family | None:
    """The family whose temporal layers a LoRA's module or tensor names belong to, if any says."""
    for family in FAMILIES.values():
        markers = FAMILY_MARKERS[family.name]
        if any(marker in f".{name}" for name in names for marker in markers):
            return family
    return None


def check_family(names: Sequence[str], unet: nn.Module, source: str) -> None:
    """Refuses a LoRA whose names belong to the other family than the base U-Net's.

    Raises:
        UsageError: naming both families and what to pass instead.
    """
    base = family_of(unet)
    found = names_family(names)
    if found is None or found is base:
        return
    raise UsageError(
        f"{source} is a LoRA for {found.title}, but the base model is {base.title}",
        f"pass a base model of the {found.name} family with --model, or use a motion LoRA "
        f"trained on {base.name}",
    )


def recipe_layers(unet: nn.Module, recipe: Recipe | str) -> list[LinearLayer]:
    """The Linear layers a recipe adapts, in ``named_modules()`` (= upstream list) order."""
    layers = []
    for name in recipes.motion_lora_targets(unet, recipe):
        module = cast("nn.Linear", unet.get_submodule(name))
        layers.append(LinearLayer(name, int(module.in_features), int(module.out_features)))
    return layers


# ---------------------------------------------------------------------------
# reading upstream files


def read_upstream_file(path: Path) -> list[torch.Tensor]:
    """Reads an upstream LoRA file into its flat tensor list ``[up0, down0, ...]``.

    ``.pt``/``.pth`` files go through ``torch.load(weights_only=True)`` only, so
    a pickle that holds code or objects is refused without running anything.

    Raises:
        UsageError: if the file is missing, of another kind, refused by
            ``weights_only``, or holds anything but tensors in an accepted layout.
    """
    path = Path(path)
    if not path.is_file():
        raise UsageError(
            f"{path} is not a file",
            "pass an upstream LoRA file (.pt or .safetensors), or a peft adapter folder",
        )
    suffix = path.suffix.lower()
    if suffix in PICKLE_SUFFIXES:
        return _tensors_from_object(_load_pickle(path), path)
    if suffix == SAFETENSORS_SUFFIX:
        tensors, metadata = _load_safetensors(path)
        return _tensors_from_mapping(tensors, path, metadata)
    raise UsageError(
        f"{path}: unknown LoRA file type {path.suffix!r}",
        "upstream LoRAs are .pt or .safetensors files; a peft adapter is a folder "
        f"with {PEFT_CONFIG_FILE}",
    )


def _load_pickle(path: Path) -> Any:
    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        text = str(exc)
        reason = next(
            (line.strip() for line in text.splitlines() if "Unsupported" in line),
            "it is not a plain PyTorch tensor file",
        )
        raise UsageError(
            f"{path} was refused by torch.load(weights_only=True): {reason}",
            "upstream checkpoints hold only a list of tensors; nothing in the file was run. "
            "Convert trusted files to .safetensors elsewhere, or ask their author for one",
        ) from exc
    except (RuntimeError, EOFError, ValueError) as exc:
        raise UsageError(
            f"{path} is not a readable PyTorch file: {exc}",
            "check that the download is complete",
        ) from exc


def _load_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            metadata = dict(handle.metadata() or {})
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
    except (SafetensorError, OSError) as exc:
        raise UsageError(
            f"{path} is not a readable safetensors file: {exc}",
            "check that the download is complete",
        ) from exc
    return tensors, metadata


def _type_name(value: Any) -> str:
    return type(value).__name__


def _tensors_from_object(value: Any, path: Path) -> list[torch.Tensor]:
    import torch

    if isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            if not isinstance(item, torch.Tensor):
                raise UsageError(
                    f"{path}: element {index} of the list is a {_type_name(item)}, not a tensor",
                    "upstream checkpoints hold only tensors: [up0, down0, up1, down1, ...]",
                )
        return list(value)
    if isinstance(value, Mapping):
        for key, item in value.items():
            if not isinstance(item, torch.Tensor):
                raise UsageError(
                    f"{path}: the value of key {key!r} is a {_type_name(item)}, not a tensor",
                    "upstream checkpoints hold only tensors",
                )
        return _tensors_from_mapping({str(k): v for k, v in value.items()}, path, {})
    raise UsageError(
        f"{path} holds a {_type_name(value)}, not a list of tensors",
        "upstream checkpoints are a list of tensors [up0, down0, up1, down1, ...]",
    )


def _tensors_from_mapping(
    tensors: Mapping[str, torch.Tensor], path: Path, metadata: Mapping[str, str]
) -> list[torch.Tensor]:
    """A keyed file back into the upstream list (see the module docstring for the keys)."""
    keys = list(tensors)
    if not keys:
        raise UsageError(f"{path} holds no tensors")
    if all(key.isdigit() for key in keys):
        indices = sorted(int(key) for key in keys)
        if indices != list(range(len(indices))):
            raise UsageError(
                f"{path}: list positions {_gaps(indices)} are missing",
                'a list stored by position needs keys "0", "1", ..., "N-1"',
            )
        return [tensors[str(i)] for i in range(len(indices))]
    matches = {key: match for key in keys if (match := _SAFELORAS_KEY.match(key))}
    odd = [key for key in keys if key not in matches]
    if not odd:
        return _tensors_from_safeloras(tensors, matches, path, metadata)
    hint = (
        "this looks like a peft / diffusers state dict: import the peft adapter folder "
        f"({PEFT_CONFIG_FILE} + {PEFT_WEIGHTS_FILE}) with --format peft"
        if any(".lora_A." in key or ".lora_B." in key for key in keys)
        else 'upstream files are keyed "unet:<i>:up" / "unet:<i>:down" (cloneofsimo '
        'save_safeloras) or by list position "0", "1", ...'
    )
    raise UsageError(f"{path}: unexpected tensor names {_preview(odd)}", hint)


def _tensors_from_safeloras(
    tensors: Mapping[str, torch.Tensor],
    matches: Mapping[str, re.Match[str]],
    path: Path,
    metadata: Mapping[str, str],
) -> list[torch.Tensor]:
    groups: dict[str, dict[int, dict[str, str]]] = {}
    for key, match in matches.items():
        pairs = groups.setdefault(match["model"], {})
        pairs.setdefault(int(match["index"]), {})[match["direction"]] = key
    if set(groups) != {SAFELORAS_MODEL}:
        raise UsageError(
            f"{path} holds LoRAs for {', '.join(sorted(groups))}; a motion LoRA is one "
            f"{SAFELORAS_MODEL!r} group",
            f'only tensors named "{SAFELORAS_MODEL}:<i>:up" / "{SAFELORAS_MODEL}:<i>:down" '
            "can be imported (a text-encoder LoRA is not part of a motion)",
        )
    pairs = groups[SAFELORAS_MODEL]
    indices = sorted(pairs)
    if indices != list(range(len(indices))):
        raise UsageError(f"{path}: LoRA pairs {_gaps(indices)} are missing")
    result: list[torch.Tensor] = []
    for index in indices:
        pair = pairs[index]
        for direction in ("up", "down"):
            if direction not in pair:
                raise UsageError(f"{path}: {SAFELORAS_MODEL}:{index}:{direction} is missing")
            result.append(tensors[pair[direction]])
        recorded = metadata.get(f"{SAFELORAS_MODEL}:{index}:rank")
        rank = int(result[-1].shape[0]) if result[-1].dim() == 2 else None
        if recorded and recorded.isdigit() and rank is not None and int(recorded) != rank:
            raise UsageError(
                f"{path}: pair {index} records rank {recorded} but its down tensor has "
                f"shape {tuple(result[-1].shape)}"
            )
    return result


def _gaps(indices: Sequence[int]) -> str:
    missing = sorted(set(range(max(indices) + 1)) - set(indices))
    more = " ..." if len(missing) > _PREVIEW else ""
    return ", ".join(str(i) for i in missing[:_PREVIEW]) + more


def _value_problem(tensor: torch.Tensor) -> str | None:
    """What makes a LoRA tensor unusable (a dtype motionsep cannot compute with, NaN or
    inf), or None."""
    dtype = str(tensor.dtype).removeprefix("torch.")
    if dtype not in _FLOAT_DTYPES:
        return f"is {dtype}, which motionsep cannot compute with (use {', '.join(_FLOAT_DTYPES)})"
    if not bool(tensor.isfinite().all()):
        return "holds NaN or inf"
    return None


def _shown(value: Any, limit: int = 40) -> str:
    """``repr(value)``, cut to ``limit`` characters (a config value can be anything)."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[: limit - 3]}..."


def _preview(items: Sequence[str], limit: int = _PREVIEW) -> str:
    shown = ", ".join(repr(item) for item in items[:limit])
    return shown if len(items) <= limit else f"{shown}, ... ({len(items) - limit} more)"


# ---------------------------------------------------------------------------
# converting upstream lists


def _layer_counts(layouts: Mapping[Recipe, list[LinearLayer]], transformers: int) -> str:
    parts = []
    for recipe, layers in layouts.items():
        per = len(layers) // max(transformers, 1)
        parts.append(
            f"{2 * len(layers)} for {recipe.value} ({per} layers x {transformers} temporal "
            "transformers, up and down each)"
        )
    return "; ".join(parts)


def convert_upstream(
    tensors: Sequence[torch.Tensor],
    unet: nn.Module,
    *,
    motiondirector: bool = False,
    source: str = "the file",
) -> ConvertedMotion:
    """Checks an upstream list against a U-Net and turns it into peft tensors.

    Args:
        tensors: ``[up0, down0, up1, down1, ...]`` (see the module docstring).
        unet: The base U-Net (a :func:`unet_skeleton` is enough).
        motiondirector: Require MotionDirector's layout instead of inferring the recipe.
        source: How errors name the input.

    Returns:
        The motion with its recipe inferred from the tensor count (a reference
        layout whose ``to_out.0`` pairs are all zero is a ``paper`` motion).

    Raises:
        UsageError: naming the expected and the found count, or every layer
            whose tensors do not fit (expected and found shapes).
    """
    import torch

    transformers = len(recipes.temporal_transformer_names(unet))
    wanted = (
        [Recipe.MOTIONDIRECTOR]
        if motiondirector
        else [Recipe.REFERENCE, Recipe.PAPER, Recipe.MOTIONDIRECTOR]
    )
    layouts = {recipe: recipe_layers(unet, recipe) for recipe in wanted}
    count = len(tensors)
    matching = [r for r in wanted if 2 * len(layouts[r]) == count]
    if not matching:
        kind = "a MotionDirector temporal LoRA" if motiondirector else "an upstream motion LoRA"
        raise UsageError(
            f"{source} holds {count} tensors; {kind} for this base model "
            f"({family_of(unet).title}) has " + _layer_counts(layouts, transformers),
            "is it a LoRA for this base model (--model), and the temporal LoRA (not a spatial "
            "or text-encoder one)?",
        )
    recipe = matching[0]
    layers = layouts[recipe]
    rank = _check_shapes(tensors, layers, source)

    notes = [f"{count} tensors: {recipe.value} layout, rank {rank}"]
    pairs = {layer.name: (tensors[2 * i], tensors[2 * i + 1]) for i, layer in enumerate(layers)}
    if recipe is Recipe.REFERENCE:
        unused = [name for name in pairs if name.endswith(".to_out.0")]
        if all(not pairs[name][0].any() and not pairs[name][1].any() for name in unused):
            # How motionsep exports a paper motion for the paper's scripts.
            recipe = Recipe.PAPER
            for name in unused:
                del pairs[name]
            notes.append("every to_out.0 LoRA is zero: imported as a paper (to_k only) motion")
    state: dict[str, torch.Tensor] = {}
    for name, (up, down) in pairs.items():
        state[f"{name}.lora_A.weight"] = down.detach().to("cpu", torch.float32).contiguous()
        state[f"{name}.lora_B.weight"] = up.detach().to("cpu", torch.float32).contiguous()
    return ConvertedMotion(
        recipe=recipe,
        rank=rank,
        alpha=float(rank),
        targets=list(pairs),
        state=state,
        notes=notes,
    )


def _check_shapes(
    tensors: Sequence[torch.Tensor], layers: Sequence[LinearLayer], source: str
) -> int:
    """Checks every (up, down) pair against its layer; returns the common rank."""
    rank = int(tensors[1].shape[0]) if tensors[1].dim() == 2 else 0
    # The rank if the file holds [down, up] pairs instead: to say so in the error.
    swapped_rank = int(tensors[0].shape[0]) if tensors[0].dim() == 2 else 0
    problems: list[str] = []
    swapped = 0
    for index, layer in enumerate(layers):
        up, down = tensors[2 * index], tensors[2 * index + 1]
        expected_up = (layer.out_features, rank)
        expected_down = (rank, layer.in_features)
        found_up, found_down = tuple(up.shape), tuple(down.shape)
        if (found_up, found_down) != (expected_up, expected_down):
            problems.append(
                f"pair {index} ({layer.name}): expected up {expected_up} and down "
                f"{expected_down}, found {found_up} and {found_down}"
            )
        if (found_up, found_down) == (
            (swapped_rank, layer.in_features),
            (layer.out_features, swapped_rank),
        ):
            swapped += 1
        for which, tensor in (("up", up), ("down", down)):
            problem = _value_problem(tensor)
            if problem:
                problems.append(f"pair {index} ({layer.name}): {which} {problem}")
    if not problems:
        if rank < 1:
            raise UsageError(
                f"{source}: its LoRA has rank {rank} (down of pair 0 is "
                f"{tuple(tensors[1].shape)}); a LoRA's rank is 1 or more",
                "is the file damaged? Export it again from the program that trained it",
            )
        return rank
    hint = (
        "the file holds [down, up] pairs; upstream lists are [up0, down0, up1, down1, ...]"
        if swapped == len(layers)
        else "every pair must have one rank r: up (out, r), down (r, in), in upstream list order"
    )
    shown = "; ".join(problems[:_PREVIEW])
    more = f"; ... ({len(problems) - _PREVIEW} more)" if len(problems) > _PREVIEW else ""
    raise UsageError(f"{source} does not fit the base U-Net: {shown}{more}", hint)


# ---------------------------------------------------------------------------
# peft folders


def read_peft_folder(path: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Reads a peft adapter folder: its config and its tensors (keys as saved).

    Raises:
        UsageError: if a file is missing, not JSON, or pickled weights only.
    """
    path = Path(path)
    config_file = path / PEFT_CONFIG_FILE
    if not path.is_dir() or not config_file.is_file():
        raise UsageError(
            f"{path} is not a peft adapter folder ({PEFT_CONFIG_FILE} is missing)",
            f"pass the folder that holds {PEFT_CONFIG_FILE} and {PEFT_WEIGHTS_FILE}",
        )
    weights_file = path / PEFT_WEIGHTS_FILE
    if not weights_file.is_file():
        pickled = (path / "adapter_model.bin").is_file()
        raise UsageError(
            f"{path}: {PEFT_WEIGHTS_FILE} is missing"
            + (" (it holds pickled adapter_model.bin only)" if pickled else ""),
            "save the adapter with safetensors (peft's default, safe_serialization=True)",
        )
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UsageError(f"{config_file} is not valid JSON: {exc}") from exc
    if not isinstance(config, dict):
        raise UsageError(f"{config_file} does not hold a JSON object")
    tensors, _ = _load_safetensors(weights_file)
    return config, tensors


def _peft_rank(
    config: Mapping[str, Any], source: str, where: str = PEFT_CONFIG_FILE
) -> tuple[int, float]:
    """A peft adapter config's rank and alpha, refusing what a motion LoRA cannot reproduce.

    ``where`` names the config in messages (the file, or a LoRA file's metadata).
    """
    if config.get("peft_type") != "LORA":
        raise UsageError(
            f"{source} is a {config.get('peft_type')!r} adapter, not a LoRA",
            "only peft LoRA adapters hold a motion",
        )
    unsupported = [
        option
        for option in ("use_dora", "use_rslora", "fan_in_fan_out", "rank_pattern", "alpha_pattern")
        if config.get(option)
    ]
    if config.get("bias", "none") != "none":
        unsupported.append(f"bias={config['bias']!r}")
    if config.get("modules_to_save"):
        unsupported.append("modules_to_save")
    if unsupported:
        raise UsageError(
            f"{source} uses {', '.join(unsupported)}, which a motion LoRA cannot reproduce",
            "export a plain LoRA (one rank, no bias, no DoRA/rsLoRA)",
        )
    if "r" not in config:
        raise UsageError(f"{source}: {where} has no 'r' (the LoRA rank)")
    rank, alpha = config["r"], config.get("lora_alpha", config["r"])
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise UsageError(
            f"{source}: {where} gives 'r' = {_shown(rank)}; a LoRA's rank is a whole number, "
            "1 or more",
            "is the adapter damaged? Export it again from the program that trained it",
        )
    if (
        isinstance(alpha, bool)
        or not isinstance(alpha, (int, float))
        or not math.isfinite(alpha)
        or alpha <= 0
    ):
        raise UsageError(
            f"{source}: {where} gives 'lora_alpha' = {_shown(alpha)}; it must be a finite "
            "number above 0 (the LoRA's output is scaled by lora_alpha / r)",
            "is the adapter damaged? Export it again from the program that trained it",
        )
    return rank, float(alpha)


def convert_peft(
    config: Mapping[str, Any],
    tensors: Mapping[str, torch.Tensor],
    unet: nn.Module,
    *,
    source: str = "the adapter",
) -> ConvertedMotion:
    """Checks a peft LoRA adapter against a U-Net; its modules must be one recipe's.

    Raises:
        UsageError: for an adapter type or option motionsep cannot reproduce
            (DoRA, rsLoRA, per-module ranks, bias), unknown tensor names, modules
            that are no recipe's, or wrong shapes.
    """

    rank, alpha = _peft_rank(config, source)
    modules: dict[str, dict[str, torch.Tensor]] = {}
    odd = []
    for key, tensor in tensors.items():
        match = _PEFT_KEY.match(key.removeprefix(PEFT_KEY_PREFIX))
        if match is None:
            odd.append(key)
            continue
        modules.setdefault(match["module"], {})[match["kind"]] = tensor
    if odd:
        raise UsageError(
            f"{source}: unexpected tensor names {_preview(odd)}",
            "a peft LoRA adapter holds only <module>.lora_A.weight / lora_B.weight tensors",
        )
    check_family(list(modules), unet, source)
    found = set(modules)
    layouts = {recipe: recipe_layers(unet, recipe) for recipe in Recipe}
    recipe = next((r for r, layers in layouts.items() if {x.name for x in layers} == found), None)
    if recipe is None:
        closest = min(layouts, key=lambda r: len(found ^ {x.name for x in layouts[r]}))
        expected = {x.name for x in layouts[closest]}
        parts = [f"{len(found)} adapted modules match no recipe's layout"]
        if found - expected:
            parts.append(f"not temporal attention targets: {_preview(sorted(found - expected))}")
        if expected - found:
            parts.append(f"missing for {closest.value}: {_preview(sorted(expected - found))}")
        raise UsageError(
            f"{source}: " + "; ".join(parts),
            "expected the temporal transformers' to_k (paper), to_k + to_out.0 (reference) or "
            "to_q/k/v/out.0 + ff (motiondirector) of this base model (--model)",
        )
    _, state = _checked_pairs(modules, layouts[recipe], source, rank=rank)
    return ConvertedMotion(
        recipe=recipe,
        rank=rank,
        alpha=alpha,
        targets=[layer.name for layer in layouts[recipe]],
        state=state,
        notes=[f"peft adapter: {recipe.value} layout, rank {rank}, alpha {alpha:g}"],
    )


# ---------------------------------------------------------------------------
# named layouts: diffusers LoRAs and AnimateDiff MotionLoRAs


@dataclass(frozen=True)
class NamedLora:
    """LoRA tensors keyed by the module they adapt, read from a named layout, not yet checked.

    Attributes:
        modules: Module name (peft naming) -> ``{"A": down (r, in), "B": up (out, r)}``.
        alpha: peft ``lora_alpha`` from the file's adapter metadata; None when the
            file records none (scale 1: alpha = rank).
        layout: How the names were written, for notes (``diffusers`` or ``animatediff``).
    """

    modules: dict[str, dict[str, torch.Tensor]]
    alpha: float | None
    layout: str


def peft_module_key(key: str) -> tuple[str, str] | None:
    """``(module, "A" | "B")`` of a LoRA tensor name, in the U-Net's own module names.

    Reads peft names (``<module>.lora_A.weight``) and attention-processor names
    (``<attention>.processor.to_q_lora.down.weight``); AnimateDiff's
    ``temporal_transformer.`` level and ``attention_blocks.0`` / ``.1`` become
    the U-Net's ``attn1`` / ``attn2``. None for any other name.
    """
    match = _PROCESSOR_KEY.match(key)
    if match is not None:
        projection = "to_out.0" if match["projection"] == "to_out" else match["projection"]
        kind = "A" if match["direction"] == "down" else "B"
        return f"{_unet_module(match['module'])}.{projection}", kind
    match = _PEFT_KEY.match(key)
    if match is not None:
        return _unet_module(match["module"]), match["kind"]
    return None


def _unet_module(path: str) -> str:
    path = path.replace(".temporal_transformer.", ".")
    return _ATTENTION_BLOCK.sub(lambda m: f".attn{int(m['index']) + 1}", path)


def read_named_lora(path: Path) -> NamedLora:
    """Reads a diffusers LoRA (folder or file) or an AnimateDiff MotionLoRA file.

    A folder must hold ``pytorch_lora_weights.safetensors``; pickles
    (``.ckpt``, ``.pt``, ``.pth``) go through ``torch.load(weights_only=True)``
    only. An AnimateDiff checkpoint's ``state_dict`` wrapper and its
    ``animatediff_config`` entry are dropped, as AnimateDiff's loader does.

    Raises:
        UsageError: if the file is missing or unreadable, holds anything but
            U-Net LoRA tensors, or its adapter metadata asks for what a motion
            LoRA cannot reproduce.
    """
    path = Path(path)
    weights = path / DIFFUSERS_WEIGHTS_FILE if path.is_dir() else path
    if not weights.is_file():
        raise UsageError(
            f"{path} holds no {DIFFUSERS_WEIGHTS_FILE}"
            if path.is_dir()
            else f"{path} is not a file",
            f"pass the folder AnimateDiffPipeline.save_lora_weights wrote, or a LoRA file "
            f"({', '.join(ANIMATEDIFF_SUFFIXES)})",
        )
    suffix = weights.suffix.lower()
    if suffix == SAFETENSORS_SUFFIX:
        tensors, metadata = _load_safetensors(weights)
        content: Any = tensors
    elif suffix in ANIMATEDIFF_SUFFIXES:
        content, metadata = _load_pickle(weights), {}
    else:
        raise UsageError(
            f"{weights}: unknown LoRA file type {weights.suffix!r}",
            f"AnimateDiff and diffusers LoRAs are {', '.join(ANIMATEDIFF_SUFFIXES)} files",
        )
    modules = _named_modules(_lora_mapping(content, weights), weights)
    alpha = _metadata_alpha(metadata, weights)
    layout = (
        "diffusers" if all(k.startswith(DIFFUSERS_KEY_PREFIX) for k in modules) else "animatediff"
    )
    return NamedLora(
        modules={k.removeprefix(DIFFUSERS_KEY_PREFIX): v for k, v in modules.items()},
        alpha=alpha,
        layout=layout,
    )


def _lora_mapping(content: Any, path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a named LoRA file, without AnimateDiff's wrapper and config entry."""
    import torch

    if isinstance(content, Mapping) and isinstance(content.get(ANIMATEDIFF_WRAPPER_KEY), Mapping):
        content = content[ANIMATEDIFF_WRAPPER_KEY]
    if not isinstance(content, Mapping):
        raise UsageError(
            f"{path} holds a {_type_name(content)}, not tensors keyed by name",
            "a diffusers or AnimateDiff LoRA maps tensor names to tensors; a list of "
            "tensors is an upstream LoRA (--format upstream)",
        )
    tensors = {}
    for key, value in content.items():
        if key == ANIMATEDIFF_CONFIG_KEY:
            continue
        if not isinstance(value, torch.Tensor):
            raise UsageError(
                f"{path}: the value of key {key!r} is a {_type_name(value)}, not a tensor",
                "a LoRA file holds only tensors",
            )
        tensors[str(key)] = value
    if not tensors:
        raise UsageError(f"{path} holds no tensors")
    return tensors


def _named_modules(
    tensors: Mapping[str, torch.Tensor], path: Path
) -> dict[str, dict[str, torch.Tensor]]:
    """Groups tensors by module; names keep a ``unet.`` prefix when the file has one."""
    modules: dict[str, dict[str, torch.Tensor]] = {}
    odd = []
    others = sorted({key.split(".", 1)[0] for key in tensors if key.startswith("text_encoder")})
    if others:
        raise UsageError(
            f"{path} holds LoRAs for {', '.join(others)} besides the U-Net",
            "a motion LoRA adapts only the U-Net's temporal layers; save the U-Net's LoRA alone",
        )
    for key, tensor in tensors.items():
        prefix = DIFFUSERS_KEY_PREFIX if key.startswith(DIFFUSERS_KEY_PREFIX) else ""
        parsed = peft_module_key(key.removeprefix(prefix))
        if parsed is None:
            odd.append(key)
            continue
        module, kind = parsed
        modules.setdefault(prefix + module, {})[kind] = tensor
    if odd:
        raise UsageError(
            f"{path}: unexpected tensor names {_preview(odd)}",
            "a diffusers LoRA holds unet.<module>.lora_A.weight / lora_B.weight tensors; an "
            "AnimateDiff MotionLoRA holds <attention>.processor.to_q_lora.down.weight / "
            ".up.weight tensors",
        )
    return modules


def _metadata_alpha(metadata: Mapping[str, str], path: Path) -> float | None:
    """``lora_alpha`` of diffusers' adapter metadata (``unet.r``, ``unet.lora_alpha``, ...)."""
    text = metadata.get(DIFFUSERS_METADATA_KEY)
    if not text:
        return None
    try:
        document = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UsageError(f"{path}: its {DIFFUSERS_METADATA_KEY} is not valid JSON: {exc}") from exc
    if not isinstance(document, dict):
        raise UsageError(f"{path}: its {DIFFUSERS_METADATA_KEY} is not a JSON object")
    config = {
        key.removeprefix(DIFFUSERS_KEY_PREFIX): value
        for key, value in document.items()
        if key.startswith(DIFFUSERS_KEY_PREFIX)
    }
    if not config:
        return None
    _, alpha = _peft_rank(
        {"peft_type": "LORA", **config}, str(path), f"its {DIFFUSERS_METADATA_KEY} metadata"
    )
    return alpha


def _recipe_of(modules: Sequence[str], source: str) -> tuple[Recipe, bool]:
    """The recipe whose projections a LoRA adapts, and whether it adapts the ``ff`` layers."""
    projections: set[str] = set()
    feed_forward = False
    for name in modules:
        if ".ff." in name:
            feed_forward = True
        elif match := re.search(r"\.attn[12]\.(?P<projection>to_q|to_k|to_v|to_out\.0)$", name):
            projections.add(match["projection"])
    for recipe in Recipe:
        spec = recipes.get_recipe(recipe)
        if set(spec.projections) == projections and (spec.feed_forward or not feed_forward):
            return recipe, feed_forward
    described = ", ".join(sorted(projections)) or "no attention projection"
    raise UsageError(
        f"{source} adapts {described}"
        + (" and the ff layers" if feed_forward else "")
        + "; that is no recipe's set of projections",
        "motionsep reads LoRAs of to_k (paper), to_k + to_out.0 (reference) or to_q, to_k, "
        "to_v, to_out.0, with or without the ff layers (motiondirector), of every temporal "
        "attention",
    )


def convert_named(
    named: NamedLora, unet: nn.Module, *, source: str = "the file"
) -> ConvertedMotion:
    """Checks a named LoRA against a U-Net and infers its recipe from the projections it adapts.

    It must adapt the same projections in every temporal transformer of the
    base U-Net; the mid block's may be missing (MotionLoRAs trained without
    it), and a ``motiondirector`` LoRA may leave out the ``ff`` layers
    (AnimateDiff's MotionLoRAs do): those layers stay the base model's.

    Raises:
        UsageError: for a LoRA of the other family, a set of projections that
            is no recipe's, modules the base U-Net lacks or that are missing,
            or wrong shapes.
    """
    check_family(list(named.modules), unet, source)
    recipe, feed_forward = _recipe_of(list(named.modules), source)
    layers = [
        layer for layer in recipe_layers(unet, recipe) if feed_forward or ".ff." not in layer.name
    ]
    found = set(named.modules)
    unknown = sorted(found - {layer.name for layer in layers})
    missing = [layer.name for layer in layers if layer.name not in found]
    mid_only = all(name.startswith(MID_BLOCK_PREFIX) for name in missing)
    if unknown or not mid_only:
        parts = []
        if unknown:
            parts.append(f"not temporal attention targets of this base model: {_preview(unknown)}")
        if not mid_only:
            parts.append(f"missing for {recipe.value}: {_preview(missing)}")
        raise UsageError(
            f"{source} does not fit the base U-Net ({family_of(unet).title}): " + "; ".join(parts),
            "is it a motion LoRA for this base model (--model)?",
        )
    layers = [layer for layer in layers if layer.name in found]
    rank, state = _checked_pairs(named.modules, layers, source)
    alpha = float(rank) if named.alpha is None else named.alpha
    notes = [f"{named.layout} layout: {recipe.value} ({len(layers)} layers), rank {rank}"]
    if named.alpha is None:
        notes.append(f"no adapter metadata: alpha = rank ({rank}), scale 1")
    if missing:
        notes.append("no LoRA on the mid block's temporal transformer: it stays the base model's")
    if recipe is Recipe.MOTIONDIRECTOR and not feed_forward:
        notes.append("no LoRA on the ff layers: they stay the base model's")
    return ConvertedMotion(
        recipe=recipe,
        rank=rank,
        alpha=alpha,
        targets=[layer.name for layer in layers],
        state=state,
        notes=notes,
    )


def _checked_pairs(
    modules: Mapping[str, Mapping[str, torch.Tensor]],
    layers: Sequence[LinearLayer],
    source: str,
    rank: int | None = None,
) -> tuple[int, dict[str, torch.Tensor]]:
    """Checks every (A, B) pair against its layer; returns the rank and the fp32 peft state.

    ``rank`` is the one the adapter's config states; without it the first
    ``lora_A`` says it.
    """
    import torch

    if rank is None:
        first = modules[layers[0].name].get("A")
        rank = int(first.shape[0]) if first is not None and first.dim() == 2 else 0
    problems = []
    for layer in layers:
        pair = modules[layer.name]
        for kind, shape in (("A", (rank, layer.in_features)), ("B", (layer.out_features, rank))):
            item = pair.get(kind)
            if item is None:
                problems.append(f"{layer.name}.lora_{kind}.weight is missing")
            elif tuple(item.shape) != shape:
                problems.append(
                    f"{layer.name}.lora_{kind}.weight: expected {shape}, found {tuple(item.shape)}"
                )
            elif problem := _value_problem(item):
                problems.append(f"{layer.name}.lora_{kind}.weight {problem}")
    if not problems and rank < 1:
        problems.append(
            f"{layers[0].name}.lora_A.weight has rank {rank}; a LoRA's rank is 1 or more"
        )
    if problems:
        more = f"; ... ({len(problems) - _PREVIEW} more)" if len(problems) > _PREVIEW else ""
        raise UsageError(
            f"{source} does not fit the base U-Net (rank {rank}): "
            + "; ".join(problems[:_PREVIEW])
            + more,
            "every layer needs lora_A (r, in) and lora_B (out, r) of one rank r",
        )
    state = {
        f"{layer.name}.lora_{kind}.weight": modules[layer.name][kind]
        .detach()
        .to("cpu", torch.float32)
        .contiguous()
        for layer in layers
        for kind in ("A", "B")
    }
    return rank, state


# ---------------------------------------------------------------------------
# import


@dataclass(frozen=True)
class ImportResult:
    """What :func:`import_motion` wrote.

    Attributes:
        path: The new package folder.
        recipe: The recipe the motion was imported as.
        rank: LoRA rank.
        format: The format that was read.
        notes: How the input was interpreted.
    """

    path: Path
    recipe: Recipe
    rank: int
    format: ImportFormat
    notes: list[str]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form, for ``--json``."""
        return {
            "name": self.path.name,
            "path": str(self.path),
            "recipe": self.recipe.value,
            "rank": self.rank,
            "format": self.format.value,
            "notes": list(self.notes),
        }


def detect_format(source: Path) -> ImportFormat:
    """The format of an import source, from its layout and its tensor names.

    A folder is ``diffusers`` when it holds ``pytorch_lora_weights.safetensors``
    and no ``adapter_config.json``, else ``peft``. A file is ``animatediff``
    when its tensors have attention-processor names (``..._lora.down.weight``),
    ``diffusers`` when they are ``unet.<module>.lora_A.weight`` / ``lora_B``,
    else ``upstream``. Pickles are read for that with
    ``torch.load(weights_only=True)`` only.
    """
    source = Path(source)
    if source.is_dir():
        diffusers = (source / DIFFUSERS_WEIGHTS_FILE).is_file()
        peft = (source / PEFT_CONFIG_FILE).is_file()
        return ImportFormat.DIFFUSERS if diffusers and not peft else ImportFormat.PEFT
    keys = _tensor_names(source)
    if any(_PROCESSOR_KEY.match(key.removeprefix(DIFFUSERS_KEY_PREFIX)) for key in keys):
        return ImportFormat.ANIMATEDIFF
    if any(key.startswith(DIFFUSERS_KEY_PREFIX) and _PEFT_KEY.match(key) for key in keys):
        return ImportFormat.DIFFUSERS
    return ImportFormat.UPSTREAM


def _tensor_names(path: Path) -> list[str]:
    """The keys of a LoRA file, for :func:`detect_format` (none for lists and unknown types)."""
    suffix = path.suffix.lower()
    if suffix == SAFETENSORS_SUFFIX:
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), framework="pt", device="cpu") as handle:
                return list(handle.keys())
        except (SafetensorError, OSError):
            return []  # the reader of the format says what is wrong
    if suffix not in ANIMATEDIFF_SUFFIXES or not path.is_file():
        return []
    content = _load_pickle(path)
    if isinstance(content, Mapping) and isinstance(content.get(ANIMATEDIFF_WRAPPER_KEY), Mapping):
        content = content[ANIMATEDIFF_WRAPPER_KEY]
    return [str(key) for key in content] if isinstance(content, Mapping) else []


def _source_digest(source: Path, fmt: ImportFormat) -> str:
    if source.is_dir():
        name = PEFT_WEIGHTS_FILE if fmt is ImportFormat.PEFT else DIFFUSERS_WEIGHTS_FILE
        return file_sha256(source / name)
    return file_sha256(source)


def import_motion(
    store: Store,
    source: Path,
    name: str,
    *,
    model: str,
    fmt: ImportFormat = ImportFormat.AUTO,
    force: bool = False,
) -> ImportResult:
    """Imports a motion LoRA from another format as a motion package in the store.

    Everything is read and checked against the base model before the store is
    touched; on any error nothing is written.

    Args:
        store: The store to write ``motions/NAME`` into.
        source: An upstream / MotionDirector / AnimateDiff file, a diffusers LoRA
            (folder or file), or a peft adapter folder.
        name: The new motion's name.
        model: Base model (store name, hub id or folder) the LoRA belongs to.
        fmt: The input format; ``auto``: see :func:`detect_format`.
        force: Replace an existing motion of that name.

    Returns:
        Where the package was written and how the input was read.

    Raises:
        UsageError: bad name, existing name without ``force``, unreadable or
            mismatching input, a LoRA of the other base-model family (see
            :func:`read_upstream_file`, :func:`convert_upstream`,
            :func:`convert_peft`, :func:`read_named_lora`, :func:`convert_named`).
        ModelNotFoundError, ModelFormatError: if the base model cannot be used.
        StoreLockedError: while a training (or another command) holds the name.
    """
    folder = store.new_motion_path(name, force)
    source = Path(source).expanduser()
    if not source.exists():
        raise UsageError(f"{source} does not exist")
    fmt = detect_format(source) if fmt is ImportFormat.AUTO else fmt
    model_folder = store.resolve_model(model)
    unet_config = check_model_folder(model_folder)
    unet = unet_skeleton(unet_config)
    label = str(source)
    if fmt is ImportFormat.PEFT:
        config, tensors = read_peft_folder(source)
        converted = convert_peft(config, tensors, unet, source=label)
    elif fmt in (ImportFormat.DIFFUSERS, ImportFormat.ANIMATEDIFF):
        converted = convert_named(read_named_lora(source), unet, source=label)
    else:
        converted = convert_upstream(
            read_upstream_file(source),
            unet,
            motiondirector=fmt is ImportFormat.MOTIONDIRECTOR,
            source=label,
        )
    revision = None
    if not Path(model).expanduser().exists():
        record = store.model_record(model)
        revision = record.revision if record is not None else None
    metadata = MotionMetadata(
        recipe=converted.recipe,
        lora_targets=converted.targets,
        lora_rank=converted.rank,
        lora_alpha=converted.alpha,
        base_model=BaseModelRecord(
            id=model,
            revision=revision,
            unet_config_hash=unet_config_hash(unet_config),
            family=family_of(unet).name,
        ),
        settings={"lora": {"recipe": converted.recipe.value, "rank": converted.rank}},
        training={
            "imported": {
                "format": fmt.value,
                "source": source.name,
                "sha256": _source_digest(source, fmt),
                "notes": list(converted.notes),
            }
        },
    )
    with store.motion_change(name, f"import motion {name!r}"):
        save_motion(folder, converted.state, metadata, overwrite=force)
    logger.info("imported %s as motion %r (%s)", source, name, "; ".join(converted.notes))
    return ImportResult(
        path=folder, recipe=converted.recipe, rank=converted.rank, format=fmt, notes=converted.notes
    )


# ---------------------------------------------------------------------------
# export


def upstream_tensors(package: MotionPackage) -> list[torch.Tensor]:
    """The package's LoRA as an upstream list ``[up0, down0, ...]`` (fp32).

    A ``paper`` motion is written in the reference layout with all-zero
    ``to_out.0`` pairs right after each ``to_k`` pair (the paper's scripts
    inject to_k and to_out.0). Temporal attentions are self-attentions, so
    ``to_out.0`` maps the ``to_k`` output width back to its input width.
    ``lora_alpha / r`` is folded into ``up`` (upstream has no such factor).

    Raises:
        PackageError: if a recorded target has no tensors.
    """
    import torch

    metadata = package.metadata
    state = package.adapter_state
    factor = metadata.lora_alpha / metadata.lora_rank
    result: list[torch.Tensor] = []
    for target in metadata.lora_targets:
        try:
            down = state[f"{target}.lora_A.weight"].to(torch.float32)
            up = state[f"{target}.lora_B.weight"].to(torch.float32)
        except KeyError as exc:
            raise PackageError(
                f"motion {package.name!r} has no LoRA tensors for {target}",
                "train the motion again or re-import it",
            ) from exc
        result += [up * factor if factor != 1.0 else up, down]
        if metadata.recipe is Recipe.PAPER and target.endswith(".to_k"):
            rank, width = down.shape
            result += [torch.zeros(width, rank), torch.zeros(rank, up.shape[0])]
    return [tensor.contiguous() for tensor in result]


def export_motion(
    package: MotionPackage,
    fmt: ExportFormat,
    out: Path,
    *,
    force: bool = False,
    store_home: Path | None = None,
) -> Path:
    """Writes a motion in another format (atomically: the output appears complete or not at all).

    The name is taken exclusively (:mod:`motionsep.userfiles`): an existing
    output is refused without ``force``; with it a folder is replaced only if
    it is an export motionsep wrote (its marker) and holds nothing else, a
    file only if it is a file. Nothing is written inside the store.

    Args:
        package: A verified package (:func:`~motionsep.model.motion.load_motion`).
        fmt: ``peft`` (a folder), ``diffusers`` (a folder ``AnimateDiffPipeline.
            load_lora_weights`` reads; AnimateDiff motions only) or ``upstream`` (a
            ``.safetensors`` file, or a ``.pt``/``.pth`` pickle when the name asks for it).
        out: Where to write.
        force: Replace an existing output (as above).
        store_home: The store to keep out of (default: the settings' ``store.home``).

    Returns:
        The written path.

    Raises:
        UsageError: if ``out`` exists without ``force`` or may not be replaced,
            lies inside the store, an upstream name has another suffix, a
            ZeroScope motion is asked for as ``diffusers`` or an AnimateDiff
            one as ``upstream``.
    """
    out = Path(out).expanduser()
    if store_home is None:
        from motionsep.config import load_settings

        store_home = load_settings().store.home
    if fmt is ExportFormat.DIFFUSERS:
        check_diffusers_exportable(package)
    elif fmt is ExportFormat.UPSTREAM:
        check_upstream_exportable(package)
    if fmt in (ExportFormat.PEFT, ExportFormat.DIFFUSERS):
        with new_folder(out, OutputKind.EXPORT, force=force, store_home=store_home) as tmp:
            if fmt is ExportFormat.PEFT:
                _write_peft(package, tmp)
            else:
                _write_diffusers(package, tmp)
        return out
    suffix = out.suffix.lower()
    if suffix not in UPSTREAM_SUFFIXES:
        raise UsageError(
            f"--out {out} has no upstream suffix",
            "name the file .safetensors (cloneofsimo save_safeloras layout) or .pt (a pickled "
            "list of tensors, what the paper's infer.py loads)",
        )
    check_outside_store(out, store_home)
    tensors = upstream_tensors(package)
    return write_new_file(
        out, _upstream_bytes(tensors, pickled=suffix in PICKLE_SUFFIXES), force=force
    )


def _upstream_bytes(tensors: Sequence[torch.Tensor], *, pickled: bool) -> bytes:
    import io

    import torch
    from safetensors.torch import save

    if pickled:
        buffer = io.BytesIO()
        # Parameters, because the upstream loader assigns each element as a
        # module weight (nn.Module refuses a plain tensor there).
        torch.save([torch.nn.Parameter(t, requires_grad=False) for t in tensors], buffer)
        return buffer.getvalue()
    named: dict[str, torch.Tensor] = {}
    metadata = {SAFELORAS_MODEL: json.dumps(SAFELORAS_TARGETS)}
    for index in range(len(tensors) // 2):
        up, down = tensors[2 * index], tensors[2 * index + 1]
        named[f"{SAFELORAS_MODEL}:{index}:up"] = up
        named[f"{SAFELORAS_MODEL}:{index}:down"] = down
        metadata[f"{SAFELORAS_MODEL}:{index}:rank"] = str(down.shape[0])
    return save(named, metadata=metadata)


def _write_peft(package: MotionPackage, out: Path) -> None:
    from peft import LoraConfig
    from safetensors.torch import save_file

    metadata = package.metadata
    config = LoraConfig(
        r=metadata.lora_rank,
        lora_alpha=metadata.lora_alpha,
        lora_dropout=0.0,
        target_modules=list(metadata.lora_targets),
        init_lora_weights=lora.LORA_INIT,
        bias="none",
        base_model_name_or_path=metadata.base_model.id,
        revision=metadata.base_model.revision,
    )
    tensors = {
        f"{PEFT_KEY_PREFIX}{key}": value.contiguous()
        for key, value in package.adapter_state.items()
    }
    config.save_pretrained(str(out))
    config_file = out / PEFT_CONFIG_FILE
    document = json.loads(config_file.read_text(encoding="utf-8"))
    # peft keeps target_modules as a set; a sorted list diffs and reads better.
    document["target_modules"] = sorted(metadata.lora_targets)
    config_file.write_text(json.dumps(document, indent=2, sort_keys=True) + "\n")
    save_file(tensors, str(out / PEFT_WEIGHTS_FILE), metadata={"format": "pt"})


def motion_family(package: MotionPackage) -> Family:
    """A motion's base family; its adapted module names tell it even where the record
    does not (packages written before motion.json recorded it read as ZeroScope ones)."""
    metadata = package.metadata
    return names_family(metadata.lora_targets) or FAMILIES[metadata.base_model.family]


def check_upstream_exportable(package: MotionPackage) -> None:
    """Refuses the paper's cloneofsimo list for an AnimateDiff motion (only the paper's
    ZeroScope scripts read that layout).

    Raises:
        UsageError: naming the formats AnimateDiff tools load.
    """
    family = motion_family(package)
    if family is ZEROSCOPE:
        return
    raise UsageError(
        f"motion {package.name!r} is a {family.title} motion; the upstream format is the "
        "paper's list for ZeroScope's temporal transformers",
        "export it with --format diffusers (AnimateDiffPipeline.load_lora_weights) or "
        "--format peft",
    )


def check_diffusers_exportable(package: MotionPackage) -> None:
    """Refuses to write a motion of a family that no diffusers pipeline loads LoRAs into.

    Raises:
        UsageError: for a ZeroScope motion (``TextToVideoSDPipeline``'s
            ``UNet3DConditionModel`` has no LoRA loader), naming the formats that work.
    """
    family = motion_family(package)
    if family is ANIMATEDIFF:
        return
    raise UsageError(
        f"motion {package.name!r} is a {family.title} motion; the diffusers LoRA format is for "
        "AnimateDiff motions (diffusers' TextToVideoSDPipeline cannot load LoRAs into its "
        "UNet3DConditionModel)",
        "export it with --format peft (peft.PeftModel.from_pretrained(unet, FOLDER)) or "
        "--format upstream (the paper's scripts)",
    )


def _write_diffusers(package: MotionPackage, out: Path) -> None:
    """``AnimateDiffPipeline.save_lora_weights`` with the adapter metadata (r, alpha, targets)."""
    from diffusers import AnimateDiffPipeline

    metadata = package.metadata
    layers = {key: value.contiguous() for key, value in package.adapter_state.items()}
    adapter = {
        "r": metadata.lora_rank,
        "lora_alpha": metadata.lora_alpha,
        "target_modules": list(metadata.lora_targets),
    }
    AnimateDiffPipeline.save_lora_weights(
        str(out),
        unet_lora_layers=layers,
        unet_lora_adapter_metadata=adapter,
        weight_name=DIFFUSERS_WEIGHTS_FILE,
    )
