"""The motion package: what ``train`` writes and ``generate`` reads.

A motion package is a folder (usually ``$MOTIONSEP_HOME/motions/NAME/``)::

    adapter.safetensors     the motion LoRA only, peft state-dict keys
    motion.json             metadata (see MotionMetadata) + sha256 of every other file
    inversion.safetensors   optional: DDIM inversion noise (noise prior)
    preview.mp4, metrics.jsonl, loss.png, checkpoints/...   optional

It is written into a temporary sibling folder and renamed into place, so a
half-written package is never visible under its name. Loading verifies the
format version and every recorded checksum and never writes to the folder.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any, cast

import motionsep
from motionsep.config import Recipe
from motionsep.errors import (
    IncompatibleModelError,
    MotionNotFoundError,
    PackageError,
    RecipeMismatchError,
    UsageError,
)
from motionsep.model import lora, recipes, tap
from motionsep.model.components import unet_config_hash
from motionsep.model.family import FAMILIES, ZEROSCOPE, Family
from motionsep.store import Store, atomic_folder, file_sha256, validate_motion_name

if TYPE_CHECKING:
    import torch
    from torch import nn

FORMAT = "motionsep.motion"
FORMAT_VERSION = 1
METADATA_FILE = "motion.json"
ADAPTER_FILE = "adapter.safetensors"
INVERSION_FILE = "inversion.safetensors"

_REPAIR_HINT = (
    "the package is damaged: train the motion again (`motionsep train ... --name NAME --force`) "
    "or re-import it from its source"
)


@dataclass(frozen=True)
class ClipRecord:
    """One training clip, as recorded in the package.

    Attributes:
        name: File name of the clip.
        sha256: Hex digest of the clip file.
        frames: Indices of the source frames used for training.
        prompt: The clip's prompt.
    """

    name: str
    sha256: str
    frames: list[int]
    prompt: str = ""


@dataclass(frozen=True)
class BaseModelRecord:
    """The base model a motion was trained on.

    Attributes:
        id: Store name, hub id or path the model was given as (``zeroscope``).
        revision: Hub revision (commit), if known.
        unet_config_hash: :func:`~motionsep.model.components.unet_config_hash`
            of its U-Net config.
        family: Its base-model family (:mod:`motionsep.model.family`):
            ``zeroscope`` or ``animatediff``. Packages written before families
            existed record none and are ZeroScope ones.
    """

    id: str
    revision: str | None
    unet_config_hash: str
    family: str = ZEROSCOPE.name


def _recorded_family(base: Mapping[str, Any]) -> str:
    """The family a ``base_model`` record names; ZeroScope when it names none (older packages).

    Raises:
        ValueError: for a family this motionsep does not know.
    """
    family = base.get("family") or ZEROSCOPE.name
    if family not in FAMILIES:
        raise ValueError(f"base_model.family is {family!r}, expected one of {', '.join(FAMILIES)}")
    return str(family)


@dataclass(frozen=True)
class MotionMetadata:
    """Everything ``motion.json`` records besides the file checksums.

    Attributes:
        recipe: The recipe the motion LoRA was trained with.
        lora_targets: Full names of the adapted modules, in module order.
        lora_rank: LoRA rank.
        lora_alpha: peft ``lora_alpha`` (equal to the rank: upstream numerics).
        base_model: The base model it was trained on.
        clips: The training clips.
        prompts: Training prompts (validation prompts may be in ``settings``).
        settings: The resolved settings tree (``Settings.to_dict()``).
        training: Facts of the run: steps done, seconds, processes, ...
        final_loss: Mean loss at the end of training, if known.
        recipe_settings: The recipe resolved to data; filled in from the recipe
            when empty.
        motionsep_version: Version that wrote the package.
        created: UTC time of writing (ISO 8601); filled in when empty.
    """

    recipe: Recipe
    lora_targets: list[str]
    lora_rank: int
    lora_alpha: float
    base_model: BaseModelRecord
    clips: list[ClipRecord] = field(default_factory=list)
    prompts: list[str] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)
    final_loss: float | None = None
    recipe_settings: dict[str, Any] = field(default_factory=dict)
    motionsep_version: str = motionsep.__version__
    created: str = ""

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (without the format fields and checksums)."""
        return {
            "recipe": self.recipe.value,
            "recipe_settings": self.recipe_settings or recipe_settings(self.recipe),
            "lora": {
                "targets": list(self.lora_targets),
                "rank": self.lora_rank,
                "alpha": self.lora_alpha,
                "init": lora.LORA_INIT,
            },
            "base_model": {
                "id": self.base_model.id,
                "revision": self.base_model.revision,
                "unet_config_hash": self.base_model.unet_config_hash,
                "family": self.base_model.family,
            },
            "clips": [
                {"name": c.name, "sha256": c.sha256, "frames": list(c.frames), "prompt": c.prompt}
                for c in self.clips
            ],
            "prompts": list(self.prompts),
            "settings": self.settings,
            "training": self.training,
            # JSON has no NaN; a diverged run records null.
            "final_loss": self.final_loss
            if self.final_loss is not None and math.isfinite(self.final_loss)
            else None,
            "motionsep_version": self.motionsep_version,
            "created": self.created or time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> MotionMetadata:
        """Parses the metadata part of ``motion.json``.

        Raises:
            KeyError, TypeError, ValueError: on a missing or malformed field.
        """
        lora_fields = data["lora"]
        base = data["base_model"]
        rank, alpha = int(lora_fields["rank"]), float(lora_fields["alpha"])
        if rank < 1 or not math.isfinite(alpha) or alpha <= 0:
            raise ValueError(
                f"lora.rank is {rank} and lora.alpha {alpha}: a LoRA needs a rank of 1 or more "
                "and a finite alpha above 0"
            )
        return cls(
            recipe=Recipe(data["recipe"]),
            lora_targets=[str(t) for t in lora_fields["targets"]],
            lora_rank=rank,
            lora_alpha=alpha,
            base_model=BaseModelRecord(
                id=str(base["id"]),
                revision=base.get("revision"),
                unet_config_hash=str(base["unet_config_hash"]),
                family=_recorded_family(base),
            ),
            clips=[
                ClipRecord(
                    name=str(c["name"]),
                    sha256=str(c["sha256"]),
                    frames=[int(i) for i in c.get("frames", [])],
                    prompt=str(c.get("prompt", "")),
                )
                for c in data.get("clips", [])
            ],
            prompts=[str(p) for p in data.get("prompts", [])],
            settings=dict(data.get("settings", {})),
            training=dict(data.get("training", {})),
            final_loss=None if data.get("final_loss") is None else float(data["final_loss"]),
            recipe_settings=dict(data.get("recipe_settings", {})),
            motionsep_version=str(data.get("motionsep_version", "")),
            created=str(data.get("created", "")),
        )


@dataclass(frozen=True)
class MotionPackage:
    """A verified motion package.

    Attributes:
        path: The package folder.
        metadata: What ``motion.json`` records.
        files: Relative path (posix) -> sha256 of every file besides ``motion.json``.
        adapter_state: The motion LoRA tensors (peft keys), read from the
            verified bytes of ``adapter.safetensors``.
    """

    path: Path
    metadata: MotionMetadata
    files: dict[str, str]
    adapter_state: dict[str, torch.Tensor]

    @property
    def name(self) -> str:
        """The motion's name (its folder name)."""
        return self.path.name

    def has_file(self, relative: str) -> bool:
        """Whether the package records the file (e.g. ``inversion.safetensors``)."""
        return relative in self.files

    def file_path(self, relative: str) -> Path:
        """Path of a recorded file.

        Raises:
            PackageError: if the package has no such file.
        """
        if relative not in self.files:
            raise PackageError(
                f"motion {self.name!r} has no {relative}",
                f"files in the package: {', '.join(sorted(self.files))}",
            )
        return self.path / relative


def recipe_settings(recipe: Recipe | str) -> dict[str, Any]:
    """A recipe's resolved settings as JSON-ready data (what motion.json records)."""
    spec = recipes.get_recipe(recipe)
    reroute = spec.reroute_blocks
    return {
        "projections": list(spec.projections),
        "feed_forward": spec.feed_forward,
        "reroute_blocks": reroute if isinstance(reroute, str) else list(reroute),
        "beta": spec.beta,
        "beta_on": spec.beta_on,
        "beta_consumers": [list(pair) for pair in spec.beta_consumers],
        "pli": spec.pli,
    }


def _is_inside(name: str) -> bool:
    """Whether a recorded name is a plain relative path that stays inside the package."""
    relative = PurePosixPath(name)
    return bool(relative.parts) and not relative.is_absolute() and ".." not in relative.parts


def _checked_extra(name: str) -> str:
    relative = PurePosixPath(name).as_posix()
    if not _is_inside(name) or relative in {METADATA_FILE, ADAPTER_FILE}:
        raise UsageError(
            f"invalid extra file name {name!r} for a motion package",
            f"use a relative path inside the package, not {METADATA_FILE} or {ADAPTER_FILE}",
        )
    return relative


def _package_files(folder: Path) -> list[str]:
    return sorted(
        path.relative_to(folder).as_posix()
        for path in folder.rglob("*")
        if path.is_file() and path.relative_to(folder).as_posix() != METADATA_FILE
    )


# ---------------------------------------------------------------------------
# save


def save_motion(
    folder: Path,
    adapter_state: Mapping[str, torch.Tensor],
    metadata: MotionMetadata,
    extra_files: Mapping[str, Path | bytes] | None = None,
    overwrite: bool = False,
) -> Path:
    """Writes a motion package; it appears under ``folder`` only once complete.

    Args:
        folder: The package folder to create, e.g. ``store.motions_dir / "dolly"``.
        adapter_state: The motion LoRA tensors (:func:`lora.adapter_state_dict`).
        metadata: What to record in ``motion.json``.
        extra_files: Relative path -> source file, folder or bytes, e.g.
            ``{"inversion.safetensors": path, "preview.mp4": path}``; all are
            checksummed.
        overwrite: Replace an existing package (only after the new one is complete).

    Returns:
        The package folder.

    Raises:
        UsageError: if ``folder`` exists and ``overwrite`` is false, or an
            extra file name is invalid.
        PackageError: if the adapter tensors do not match the recorded targets.
    """
    from safetensors.torch import save_file

    folder = Path(folder)
    validate_motion_name(folder.name)
    extras = {_checked_extra(name): source for name, source in (extra_files or {}).items()}
    adapted = {key.split(".lora_", 1)[0] for key in adapter_state}
    if adapted != set(metadata.lora_targets):
        raise PackageError(
            "the adapter tensors do not match the recorded LoRA targets "
            f"({len(adapted)} adapted modules vs {len(metadata.lora_targets)} targets)",
            "pass the targets of the injected adapter (LoraInjection.adapted)",
        )
    tensors = {key: value.detach().to("cpu").contiguous() for key, value in adapter_state.items()}

    with atomic_folder(folder, overwrite=overwrite) as tmp:
        save_file(tensors, str(tmp / ADAPTER_FILE), metadata={"format": FORMAT})
        for name, source in extras.items():
            target = tmp / name
            target.parent.mkdir(parents=True, exist_ok=True)
            if isinstance(source, bytes):
                target.write_bytes(source)
            elif Path(source).is_dir():
                shutil.copytree(source, target)
            else:
                shutil.copyfile(source, target)
        checksums = {name: file_sha256(tmp / name) for name in _package_files(tmp)}
        document = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            **metadata.to_dict(),
            "files": checksums,
        }
        # Written last: a folder without motion.json is never a package.
        (tmp / METADATA_FILE).write_text(
            json.dumps(document, indent=2, allow_nan=False) + "\n", encoding="utf-8"
        )
    return folder


# ---------------------------------------------------------------------------
# load


def load_motion(path: Path) -> MotionPackage:
    """Reads and verifies a motion package; never writes to it.

    Args:
        path: The package folder.

    Returns:
        The verified package with its adapter tensors.

    Raises:
        PackageError: if ``motion.json`` is missing or malformed, the format
            version is unknown, a recorded file is missing, or a checksum
            does not match (naming the file).
    """
    from safetensors import SafetensorError
    from safetensors.torch import load as load_safetensors

    path = Path(path)
    metadata_file = path / METADATA_FILE
    if not metadata_file.is_file():
        raise PackageError(
            f"{path} is not a motion package: {METADATA_FILE} is missing", _REPAIR_HINT
        )
    try:
        document = json.loads(metadata_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise PackageError(f"{metadata_file} is not valid JSON: {exc}", _REPAIR_HINT) from exc
    if not isinstance(document, dict) or document.get("format") != FORMAT:
        raise PackageError(f"{metadata_file} is not a motionsep motion description", _REPAIR_HINT)
    version = document.get("format_version")
    if not isinstance(version, int) or version < 1:
        raise PackageError(
            f"{metadata_file} has no valid format_version ({version!r})", _REPAIR_HINT
        )
    if version > FORMAT_VERSION:
        raise PackageError(
            f"motion {path.name!r} has package format {version}; this motionsep "
            f"({motionsep.__version__}) reads format {FORMAT_VERSION} at most",
            "upgrade motionsep (`pip install -U motionsep`)",
        )
    try:
        metadata = MotionMetadata.from_dict(document)
        files = {str(k): str(v) for k, v in dict(document["files"]).items()}
    except (KeyError, TypeError, ValueError) as exc:
        raise PackageError(
            f"{metadata_file} is missing or has a malformed field: {exc}", _REPAIR_HINT
        ) from exc
    if ADAPTER_FILE not in files:
        raise PackageError(f"{metadata_file} records no {ADAPTER_FILE}", _REPAIR_HINT)

    adapter_bytes = b""
    for name, expected in sorted(files.items()):
        if not _is_inside(name):
            raise PackageError(
                f"{metadata_file} records an invalid file name {name!r}", _REPAIR_HINT
            )
        file = path / name
        if not file.is_file():
            raise PackageError(
                f"motion {path.name!r} is incomplete: {name} is missing", _REPAIR_HINT
            )
        if name == ADAPTER_FILE:
            # Hash the very bytes we parse, so what is checked is what is used.
            adapter_bytes = file.read_bytes()
            actual = hashlib.sha256(adapter_bytes).hexdigest()
        else:
            actual = file_sha256(file)
        if actual != expected:
            raise PackageError(
                f"motion {path.name!r} is damaged: {name} does not match its checksum "
                f"(sha256 {actual[:12]}..., recorded {expected[:12]}...)",
                _REPAIR_HINT,
            )
    try:
        adapter_state = load_safetensors(adapter_bytes)
    except SafetensorError as exc:
        raise PackageError(f"{path / ADAPTER_FILE} cannot be read: {exc}", _REPAIR_HINT) from exc
    return MotionPackage(path=path, metadata=metadata, files=files, adapter_state=adapter_state)


# ---------------------------------------------------------------------------
# apply


def config_family(unet_config: Mapping[str, Any]) -> Family | None:
    """The family of a U-Net config (its ``_class_name``), or None for an unknown class."""
    class_name = unet_config.get("_class_name")
    return next((f for f in FAMILIES.values() if f.unet_class == class_name), None)


def _short_title(family: Family) -> str:
    """``a ZeroScope / ModelScope`` or ``an AnimateDiff``: the family's name with its article."""
    title = family.title.split(" (")[0]
    return f"{'an' if title[0] in 'AEIOU' else 'a'} {title}"


def check_base_model(
    package: MotionPackage, unet_config: Mapping[str, Any], family: Family | None = None
) -> None:
    """Checks that a U-Net config is the architecture the motion was trained on.

    The family is compared first, so a motion used on a base of the other
    family is named as such rather than as a mere architecture mismatch.

    Args:
        package: The motion.
        unet_config: The base model's U-Net config (for AnimateDiff the joined
            ``UNetMotionModel``'s, as :func:`~motionsep.model.components.check_model_folder`
            returns it).
        family: The base model's family; read from ``unet_config`` when None.

    Raises:
        IncompatibleModelError: naming the expected model and how to install it.
    """
    expected = package.metadata.base_model
    revision = f" (revision {expected.revision})" if expected.revision else ""
    install = f"use --model {expected.id}; install it with `motionsep download {expected.id}`"
    given = family or config_family(unet_config)
    trained = FAMILIES[expected.family]
    if given is not None and given is not trained:
        raise IncompatibleModelError(
            f"motion {package.name!r} was trained on {_short_title(trained)} base "
            f"({expected.id!r}{revision}), this is {_short_title(given)} base: a motion LoRA "
            "only fits the family of U-Net it was trained on",
            f"{install}, or train the motion again on this base (`motionsep train CLIPS "
            f"--name NAME --model MODEL`)",
        )
    if unet_config_hash(dict(unet_config)) == expected.unet_config_hash:
        return
    raise IncompatibleModelError(
        f"motion {package.name!r} was trained on base model {expected.id!r}{revision}, whose "
        "U-Net architecture differs from the model given",
        install,
    )


def apply_motion(
    unet: nn.Module,
    package: MotionPackage,
    base_model_config: Mapping[str, Any] | None = None,
    *,
    scale: float = 1.0,
    trainable: bool = False,
    adapter_name: str = tap.MOTION_ADAPTER,
) -> lora.LoraInjection:
    """Injects a package's motion LoRA into a base U-Net and loads its weights.

    The base model is checked before anything is injected, so an
    incompatible model is left untouched. (A package whose tensors do not fit
    leaves a half-set adapter behind: load the U-Net again after that error.)

    Args:
        unet: The base U-Net of either family; changed in place.
        package: A package from :func:`load_motion`.
        base_model_config: The base model's U-Net config; defaults to ``unet.config``.
        scale: Motion LoRA scale (``--lora-scale``; 0 gives the base model).
        trainable: Leave the LoRA tensors trainable (default: frozen, for inference).
        adapter_name: peft adapter name.

    Returns:
        The injection result.

    Raises:
        IncompatibleModelError: if the U-Net is not the architecture the motion was trained on.
        PackageError: if the adapter tensors do not fit the recorded targets.
    """
    if base_model_config is None:
        base_model_config = cast("Mapping[str, Any]", unet.config)
    check_base_model(package, base_model_config)
    metadata = package.metadata
    try:
        injection = lora.inject_lora(
            unet,
            metadata.lora_targets,
            metadata.lora_rank,
            alpha=metadata.lora_alpha,
            adapter_name=adapter_name,
        )
        lora.load_adapter_state_dict(unet, package.adapter_state, adapter_name)
    except RecipeMismatchError as exc:
        raise PackageError(
            f"motion {package.name!r} does not fit this U-Net: {exc.message}", _REPAIR_HINT
        ) from exc
    lora.set_adapter_trainable(unet, adapter_name, trainable)
    if scale != 1.0:
        lora.set_lora_scale(unet, scale, adapter_name)
    return injection


# ---------------------------------------------------------------------------
# store


def installed_motions(store: Store) -> list[str]:
    """Names of the motion packages in the store (folders with a motion.json)."""
    if not store.motions_dir.is_dir():
        return []
    return sorted(
        path.name
        for path in store.motions_dir.iterdir()
        if not path.name.startswith(".") and (path / METADATA_FILE).is_file()
    )


def resolve_motion(store: Store, name_or_path: str) -> Path:
    """The folder of a motion given by store name or by path to a package folder.

    Raises:
        MotionNotFoundError: listing the installed motions.
    """
    candidate = Path(name_or_path).expanduser()
    if name_or_path.startswith((".", "/", "~")) or "/" in name_or_path:
        if (candidate / METADATA_FILE).is_file():
            return candidate
        raise MotionNotFoundError(
            f"{candidate} is not a motion package (no {METADATA_FILE})",
            "pass a folder written by `motionsep train`, or a motion name",
        )
    folder = store.motions_dir / name_or_path
    if (folder / METADATA_FILE).is_file():
        return folder
    installed = installed_motions(store)
    hint = f"installed motions: {', '.join(installed)}" if installed else "no motions installed yet"
    raise MotionNotFoundError(
        f"motion {name_or_path!r} is not in the store ({store.motions_dir})",
        f"{hint}; train one with `motionsep train CLIPS --name {name_or_path}`",
    )
