"""The motion library: list, describe, remove and rename the motions in the store.

Listing reads only each package's ``motion.json`` (fast, even with large
inversion files beside it); :func:`show_motion` verifies every checksum.
Removing and renaming take the same lock file that ``train`` holds while it
writes a motion (``motions/.NAME.lock``), so neither runs under a training of
that name, and both are atomic: a package is either fully under its name or
not there at all. Import and export of other formats live in
:mod:`motionsep.model.interop`.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from motionsep.errors import UsageError
from motionsep.model.motion import (
    METADATA_FILE,
    MotionMetadata,
    MotionPackage,
    installed_motions,
    load_motion,
    resolve_motion,
)
from motionsep.store import Store, folder_size, validate_motion_name

# Preview files a package may carry, in order of preference.
PREVIEW_FILES = ("preview.mp4", "preview.gif")

# The fields of every ``motions list --json`` object. Every key is always
# present (null when unknown); scripts may rely on the names and types.
LIST_FIELDS: dict[str, str] = {
    "base_model": "base model id the motion was trained on (store name, hub id or path)",
    "base_model_revision": "hub commit of the base model, or null",
    "clips": "file names of the training clips (empty for imported motions)",
    "created": "UTC time the package was written, ISO 8601",
    "error": "null, or why motion.json could not be read (then most fields are null)",
    "final_loss": "mean training loss at the end, or null",
    "imported_from": "null, or {format, source, sha256} of the file it was imported from",
    "lora_targets": "number of adapted Linear layers",
    "motionsep_version": "motionsep version that wrote the package",
    "name": "motion name (its folder name)",
    "path": "absolute path of the package folder",
    "preview": "path of the preview video, or null",
    "rank": "LoRA rank",
    "recipe": "paper, reference or motiondirector",
    "size_bytes": "total size of the package's files",
}


@dataclass(frozen=True)
class MotionSummary:
    """One motion as ``motions list`` shows it (read from ``motion.json``, not verified).

    Attributes:
        name: Folder name.
        path: Package folder.
        size_bytes: Total size of its files.
        metadata: Parsed metadata, or None if ``motion.json`` is unreadable.
        files: Recorded files (relative path -> sha256).
        error: Why the metadata could not be read, if it could not.
    """

    name: str
    path: Path
    size_bytes: int
    metadata: MotionMetadata | None
    files: dict[str, str] = field(default_factory=dict)
    error: str | None = None

    @property
    def preview(self) -> Path | None:
        """The preview video, if the package records one."""
        for name in PREVIEW_FILES:
            if name in self.files:
                return self.path / name
        return None

    def to_dict(self) -> dict[str, Any]:
        """The ``motions list --json`` object: exactly the keys of :data:`LIST_FIELDS`."""
        meta = self.metadata
        imported = meta.training.get("imported") if meta is not None else None
        row: dict[str, Any] = {
            "base_model": meta.base_model.id if meta else None,
            "base_model_revision": meta.base_model.revision if meta else None,
            "clips": [clip.name for clip in meta.clips] if meta else [],
            "created": (meta.created or None) if meta else None,
            "error": self.error,
            "final_loss": meta.final_loss if meta else None,
            "imported_from": (
                {key: imported.get(key) for key in ("format", "source", "sha256")}
                if isinstance(imported, Mapping)
                else None
            ),
            "lora_targets": len(meta.lora_targets) if meta else None,
            "motionsep_version": (meta.motionsep_version or None) if meta else None,
            "name": self.name,
            "path": str(self.path.resolve()),
            "preview": str(self.preview.resolve()) if self.preview else None,
            "rank": meta.lora_rank if meta else None,
            "recipe": meta.recipe.value if meta else None,
            "size_bytes": self.size_bytes,
        }
        return row


def summarize(folder: Path) -> MotionSummary:
    """Reads a package's ``motion.json`` without verifying checksums; never raises for damage."""
    folder = Path(folder)
    size = folder_size(folder) if folder.is_dir() else 0
    try:
        document = json.loads((folder / METADATA_FILE).read_text(encoding="utf-8"))
        metadata = MotionMetadata.from_dict(document)
        files = {str(k): str(v) for k, v in dict(document.get("files", {})).items()}
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        error = f"unreadable motion.json: {exc}"
        return MotionSummary(folder.name, folder, size, None, error=error)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        return MotionSummary(
            folder.name, folder, size, None, error=f"malformed motion.json: {exc!r}"
        )
    return MotionSummary(folder.name, folder, size, metadata, files)


def list_motions(store: Store) -> list[MotionSummary]:
    """Every motion package in the store, sorted by name."""
    return [summarize(store.motions_dir / name) for name in installed_motions(store)]


def show_motion(store: Store, name_or_path: str) -> tuple[MotionSummary, MotionPackage]:
    """A motion's summary and its verified package.

    Raises:
        MotionNotFoundError: listing the installed motions.
        PackageError: if the package is damaged (naming the file).
    """
    folder = resolve_motion(store, name_or_path)
    package = load_motion(folder)
    return summarize(folder), package


def _package_folder(store: Store, name: str) -> Path:
    """The store folder of the motion NAME (a store name, never a path)."""
    validate_motion_name(name)
    return resolve_motion(store, name)


def remove_motion(store: Store, name: str) -> Path:
    """Deletes a motion package from the store.

    The folder is first renamed to a hidden temporary name (atomic), then
    deleted, so an interrupted removal never leaves half a package under the name.

    Returns:
        The path the package had.

    Raises:
        MotionNotFoundError: if there is no such motion.
        StoreLockedError: while a training of that name (or another command) holds its lock.
    """
    folder = _package_folder(store, name)
    with store.motion_change(name, f"remove motion {name!r}"):
        trash = folder.with_name(f".tmp-{name}-removed-{uuid.uuid4().hex[:8]}")
        folder.rename(trash)
        shutil.rmtree(trash)
    return folder


def rename_motion(store: Store, old: str, new: str) -> Path:
    """Renames a motion; refuses to replace an existing entry.

    Checksums in ``motion.json`` are relative to the folder, so the package
    stays valid. The new name is claimed with an (atomic) ``mkdir`` and the
    package renamed over that empty folder, so a concurrent writer of NEW
    makes the rename fail instead of being overwritten.

    Returns:
        The new package folder.

    Raises:
        MotionNotFoundError: if OLD is not a motion.
        UsageError: if NEW is invalid or already exists.
        StoreLockedError: while a training (or another command) holds OLD or NEW.
    """
    source = _package_folder(store, old)
    validate_motion_name(new, "new motion name")
    target = store.motions_dir / new
    if old == new:
        raise UsageError(f"motion {old!r} already has that name")

    def refuse() -> UsageError:
        return UsageError(
            f"a motion named {new!r} already exists ({target})",
            f"choose another name, or remove it first: `motionsep motions rm {new}`",
        )

    if target.exists():
        raise refuse()
    with (
        store.motion_change(old, f"rename motion {old!r}"),
        store.motion_change(new, f"rename to {new!r}"),
    ):
        try:
            target.mkdir()
        except FileExistsError:
            raise refuse() from None
        try:
            source.replace(target)
        except OSError as exc:
            # rmdir removes only our own, still empty claim; a NEW that another
            # writer filled in the meantime stays, and is reported.
            with contextlib.suppress(OSError):
                target.rmdir()
            if target.exists():
                raise refuse() from exc
            raise
    return target
