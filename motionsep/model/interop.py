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

Every import is checked against the base U-Net (module names and Linear
shapes, from its config alone: no weights are loaded) before anything is
written; a mismatch names what was expected and what was found.
"""

from __future__ import annotations

import json
import logging
import pickle
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from motionsep.config import Recipe
from motionsep.errors import PackageError, UsageError
from motionsep.model import lora, recipes
from motionsep.model.components import check_model_folder, unet_config_hash
from motionsep.model.motion import (
    BaseModelRecord,
    MotionMetadata,
    MotionPackage,
    file_sha256,
    save_motion,
)
from motionsep.store import Store, atomic_folder, atomic_write_bytes

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

_SAFELORAS_KEY = re.compile(r"^(?P<model>[^:]+):(?P<index>\d+):(?P<direction>up|down)$")
_PEFT_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<kind>A|B)\.weight$")
_FLOAT_DTYPES = ("float32", "float16", "bfloat16", "float64")
_PREVIEW = 4


class ImportFormat(str, Enum):
    """What ``motions import`` reads."""

    AUTO = "auto"
    UPSTREAM = "upstream"
    MOTIONDIRECTOR = "motiondirector"
    PEFT = "peft"


class ExportFormat(str, Enum):
    """What ``motions export`` writes."""

    PEFT = "peft"
    UPSTREAM = "upstream"


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
    """A U-Net built from its config on the meta device: names and shapes, no memory."""
    import torch
    from diffusers import UNet3DConditionModel

    with torch.device("meta"):
        return UNet3DConditionModel.from_config(dict(unet_config))


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
            f"{source} holds {count} tensors; {kind} for this base model has "
            + _layer_counts(layouts, transformers),
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
            dtype = str(tensor.dtype).removeprefix("torch.")
            if dtype not in _FLOAT_DTYPES:
                problems.append(f"pair {index} ({layer.name}): {which} is {dtype}, not a float")
            elif not bool(tensor.isfinite().all()):
                problems.append(f"pair {index} ({layer.name}): {which} holds NaN or inf")
    if not problems:
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


def _peft_rank(config: Mapping[str, Any], source: str) -> tuple[int, float]:
    """A peft adapter config's rank and alpha, refusing what a motion LoRA cannot reproduce."""
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
    try:
        rank = int(config["r"])
        alpha = float(config.get("lora_alpha", rank))
    except (KeyError, TypeError, ValueError) as exc:
        raise UsageError(f"{source}: adapter_config.json has no valid 'r' ({exc})") from exc

    return rank, alpha


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
    import torch

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
    problems = []
    for layer in layouts[recipe]:
        pair = modules[layer.name]
        for kind, shape in (("A", (rank, layer.in_features)), ("B", (layer.out_features, rank))):
            item = pair.get(kind)
            if item is None:
                problems.append(f"{layer.name}.lora_{kind}.weight is missing")
            elif tuple(item.shape) != shape:
                found_shape = tuple(item.shape)
                problems.append(
                    f"{layer.name}.lora_{kind}.weight: expected {shape}, found {found_shape}"
                )
            elif not bool(item.isfinite().all()):
                problems.append(f"{layer.name}.lora_{kind}.weight holds NaN or inf")
    if problems:
        raise UsageError(
            f"{source} does not fit the base U-Net (rank {rank}): "
            + "; ".join(problems[:_PREVIEW]),
            "is it an adapter for this base model (--model)?",
        )
    state = {
        f"{layer.name}.lora_{kind}.weight": modules[layer.name][kind]
        .detach()
        .to("cpu", torch.float32)
        .contiguous()
        for layer in layouts[recipe]
        for kind in ("A", "B")
    }
    return ConvertedMotion(
        recipe=recipe,
        rank=rank,
        alpha=alpha,
        targets=[layer.name for layer in layouts[recipe]],
        state=state,
        notes=[f"peft adapter: {recipe.value} layout, rank {rank}, alpha {alpha:g}"],
    )


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
    """``peft`` for a folder with ``adapter_config.json``, else ``upstream``."""
    return ImportFormat.PEFT if Path(source).is_dir() else ImportFormat.UPSTREAM


def _source_digest(source: Path, fmt: ImportFormat) -> str:
    return file_sha256(source / PEFT_WEIGHTS_FILE if fmt is ImportFormat.PEFT else source)


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
        source: An upstream / MotionDirector file, or a peft adapter folder.
        name: The new motion's name.
        model: Base model (store name, hub id or folder) the LoRA belongs to.
        fmt: The input format; ``auto`` picks peft for a folder, upstream for a file.
        force: Replace an existing motion of that name.

    Returns:
        Where the package was written and how the input was read.

    Raises:
        UsageError: bad name, existing name without ``force``, unreadable or
            mismatching input (see :func:`read_upstream_file`, :func:`convert_upstream`,
            :func:`convert_peft`).
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
            id=model, revision=revision, unet_config_hash=unet_config_hash(unet_config)
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
    package: MotionPackage, fmt: ExportFormat, out: Path, *, force: bool = False
) -> Path:
    """Writes a motion in another format (atomically: the output appears complete or not at all).

    Args:
        package: A verified package (:func:`~motionsep.model.motion.load_motion`).
        fmt: ``peft`` (a folder) or ``upstream`` (a ``.safetensors`` file, or a
            ``.pt``/``.pth`` pickle when the name asks for it).
        out: Where to write.
        force: Replace an existing output.

    Returns:
        The written path.

    Raises:
        UsageError: if ``out`` exists without ``force``, or an upstream name has
            another suffix.
    """
    out = Path(out).expanduser()
    if out.exists() and not force:
        raise UsageError(f"{out} already exists", "choose another --out, or pass --force")
    if fmt is ExportFormat.PEFT:
        if out.exists() and not out.is_dir():
            raise UsageError(f"{out} is a file; a peft adapter is a folder")
        _write_peft(package, out)
        return out
    suffix = out.suffix.lower()
    if suffix not in UPSTREAM_SUFFIXES:
        raise UsageError(
            f"--out {out} has no upstream suffix",
            "name the file .safetensors (cloneofsimo save_safeloras layout) or .pt (a pickled "
            "list of tensors, what the paper's infer.py loads)",
        )
    if out.is_dir():
        raise UsageError(f"{out} is a folder; the upstream format is one file")
    tensors = upstream_tensors(package)
    atomic_write_bytes(out, _upstream_bytes(tensors, pickled=suffix in PICKLE_SUFFIXES))
    return out


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
    with atomic_folder(out, overwrite=True) as tmp:
        config.save_pretrained(str(tmp))
        config_file = tmp / PEFT_CONFIG_FILE
        document = json.loads(config_file.read_text(encoding="utf-8"))
        # peft keeps target_modules as a set; a sorted list diffs and reads better.
        document["target_modules"] = sorted(metadata.lora_targets)
        config_file.write_text(json.dumps(document, indent=2, sort_keys=True) + "\n")
        save_file(tensors, str(tmp / PEFT_WEIGHTS_FILE), metadata={"format": "pt"})
