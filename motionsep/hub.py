"""Getting base models into the store: built-in builders now, the hub later.

``tiny`` is built here, offline and deterministically. Downloading from the
hub (zeroscope, modelscope, clip, OWNER/REPO) and importing local folders are
issue #4 and raise :class:`~motionsep.errors.NotImplementedYetError` until then.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from motionsep.errors import NotImplementedYetError, UsageError
from motionsep.progress import Progress, or_null
from motionsep.store import ModelRecord, Store, atomic_folder


@dataclass(frozen=True)
class KnownModel:
    """A base model motionsep knows by a short name."""

    name: str
    repo_id: str | None
    description: str


KNOWN_MODELS: dict[str, KnownModel] = {
    "zeroscope": KnownModel(
        "zeroscope", "cerspense/zeroscope_v2_576w", "ZeroScope v2 576w text-to-video (default)"
    ),
    "modelscope": KnownModel(
        "modelscope", "ali-vilab/text-to-video-ms-1.7b", "ModelScope text-to-video 1.7B"
    ),
    "clip": KnownModel("clip", "openai/clip-vit-base-patch32", "CLIP ViT-B/32 for evaluate"),
    "tiny": KnownModel(
        "tiny", None, "tiny random ZeroScope-shaped model for tests (built locally)"
    ),
}


def install_tiny(
    store: Store, force: bool = False, progress: Progress | None = None
) -> ModelRecord:
    """Builds the tiny model and installs it in the store as ``tiny``.

    Args:
        store: Where to install it.
        force: Rebuild even if it is installed.
        progress: Receives a "build tiny" task.

    Returns:
        The record of the installed model.
    """
    from motionsep.model.components import TINY_SEED, build_tiny_components, save_components

    existing = store.model_record("tiny")
    if existing is not None and not force:
        return existing
    events = or_null(progress)
    events.start("build tiny", total=2, unit="step")
    with atomic_folder(store.model_path("tiny"), overwrite=True) as tmp:
        parts = build_tiny_components(seed=TINY_SEED)
        events.advance("build tiny")
        save_components(parts, tmp)
        store.write_model_record(tmp, "tiny", source=f"built-in (seed {TINY_SEED})", revision=None)
        events.advance("build tiny")
    events.finish("build tiny")
    record = store.model_record("tiny")
    assert record is not None  # written just above
    return record


def download(
    store: Store,
    name: str,
    revision: str | None = None,
    variant: str | None = None,
    force: bool = False,
    progress: Progress | None = None,
) -> ModelRecord:
    """Puts the model ``name`` into the store and returns its record.

    Raises:
        NotImplementedYetError: for hub models, until issue #4 lands.
    """
    if name == "tiny":
        if revision or variant:
            raise UsageError("the built-in tiny model has no revisions or variants")
        return install_tiny(store, force=force, progress=progress)
    raise NotImplementedYetError(
        f"downloading {name!r} from the hub is not implemented yet (issue #4)",
        "only `motionsep download tiny` works in this version",
    )


def list_models(store: Store) -> list[dict[str, object]]:
    """Known and installed models, for ``download --list``."""
    installed = {record.name: record for record in store.installed_models()}
    rows: list[dict[str, object]] = []
    for known in KNOWN_MODELS.values():
        record = installed.pop(known.name, None)
        rows.append(
            {
                "name": known.name,
                "repo_id": known.repo_id,
                "description": known.description,
                "installed": record is not None,
                "size_bytes": record.size_bytes if record else None,
                "revision": record.revision if record else None,
                "path": str(record.path) if record else None,
            }
        )
    for record in installed.values():
        rows.append(
            {
                "name": record.name,
                "repo_id": record.source,
                "description": "",
                "installed": True,
                "size_bytes": record.size_bytes,
                "revision": record.revision,
                "path": str(Path(record.path)),
            }
        )
    return rows
