"""The local store: base models, prepared data and motions under one root.

Layout under ``$MOTIONSEP_HOME`` (default: the user's cache directory)::

    models/NAME/        a diffusers text-to-video folder + motionsep-model.json
    motions/NAME/       a motion package (see motionsep.model.motion)
    prepared/KEY/       cached latents and prompts of prepared clips

Everything is written into a temporary sibling folder and renamed into place,
so a half-written entry is never visible under its name. Entries that one
process writes at a time are guarded by :func:`lock`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import socket
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from motionsep.errors import DamagedModelError, ModelNotFoundError, StoreLockedError, UsageError

MODEL_RECORD = "motionsep-model.json"
MODEL_CHECKED = ".motionsep-checked.json"
"""Per file of an installed model: the size, mtime and sha256 last found to match its record."""
_TMP_PREFIX = ".tmp-"
PARTIAL_PREFIX = ".partial-"
"""A run in progress (checkpoints, metrics) lives in ``PARTIAL_PREFIX + NAME`` beside its result."""


@dataclass(frozen=True)
class ModelRecord:
    """What the store knows about an installed base model."""

    name: str
    path: Path
    source: str
    revision: str | None
    size_bytes: int
    created: str

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form, for ``--json`` output."""
        return {
            "name": self.name,
            "path": str(self.path),
            "source": self.source,
            "revision": self.revision,
            "size_bytes": self.size_bytes,
            "created": self.created,
        }


_BUILTIN_MODELS: dict[str, str] = {}


def register_builtin_model(name: str, locator: str) -> None:
    """Names a model that ships inside a package.

    Args:
        name: The model name (``toy``).
        locator: ``"module:function"``; the function returns the model's
            folder. It is imported only when the name is looked up, so the
            store depends on no model code (``motionsep/__init__.py``
            registers the toy model).
    """
    _BUILTIN_MODELS[name] = locator


def builtin_model_path(name: str) -> Path | None:
    """The folder of a registered built-in model, or None (also when its files are missing).

    A model of the same name installed in the store takes precedence.
    """
    import importlib

    locator = _BUILTIN_MODELS.get(name)
    if locator is None:
        return None
    module, function = locator.split(":")
    path = Path(getattr(importlib.import_module(module), function)())
    return path if (path / "model_index.json").is_file() else None


def folder_size(path: Path) -> int:
    """Total bytes of the files under ``path``."""
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file's bytes, read in chunks."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def file_manifest(folder: Path) -> dict[str, dict[str, Any]]:
    """Size and sha256 of every file of a model folder (but its record), by relative path."""
    manifest = {}
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder).as_posix()
        if path.is_file() and rel not in (MODEL_RECORD, MODEL_CHECKED):
            manifest[rel] = {"size": path.stat().st_size, "sha256": file_sha256(path)}
    return manifest


def model_problems(folder: Path, full: bool = False) -> list[str]:
    """What no longer matches the file list an installed model's record wrote.

    Missing files and changed sizes are found from the file system alone.
    Contents are hashed when a file's size or modification time differs
    from the last time it was found intact (kept in :data:`MODEL_CHECKED`),
    or for every file with ``full``: a file edited in place is caught on
    its next use, a bit that rots on disk by ``motionsep download NAME``.
    Models installed before records listed their files have nothing to
    check and pass.
    """
    try:
        record = json.loads((folder / MODEL_RECORD).read_text(encoding="utf-8"))
        files = dict(record.get("files") or {})
    except (OSError, UnicodeDecodeError, ValueError, TypeError, AttributeError) as exc:
        return [f"its record {MODEL_RECORD} is unreadable ({exc})"]
    checked_file = folder / MODEL_CHECKED
    try:
        checked = dict(json.loads(checked_file.read_text(encoding="utf-8")))
    except (OSError, UnicodeDecodeError, ValueError, TypeError):
        checked = {}
    problems, intact = [], {}
    for rel, want in files.items():
        path = folder / rel
        if not path.is_file():
            problems.append(f"{rel} is missing")
            continue
        stat = path.stat()
        if stat.st_size != want["size"]:
            problems.append(f"{rel} has {stat.st_size} bytes, not the {want['size']} installed")
            continue
        stamp = [stat.st_size, stat.st_mtime_ns, want["sha256"]]
        if (not full and checked.get(rel) == stamp) or file_sha256(path) == want["sha256"]:
            intact[rel] = stamp
        else:
            problems.append(f"{rel} does not match the sha256 recorded when it was installed")
    if intact != checked:
        # a store shared read-only still works: the check just runs again next time
        with contextlib.suppress(OSError):
            atomic_write_bytes(checked_file, (json.dumps(intact) + "\n").encode())
    return problems


def check_model(folder: Path, name: str, full: bool = False) -> None:
    """Raises :class:`DamagedModelError` if an installed model's files changed."""
    problems = model_problems(folder, full)
    if problems:
        shown = "; ".join(problems[:5]) + (
            f"; and {len(problems) - 5} more" if len(problems) > 5 else ""
        )
        raise DamagedModelError(
            f"the model {name!r} in {folder} is damaged: {shown}",
            f"repair it with `motionsep download {name} --repair` (or --force to reinstall it)",
        )


def validate_name(name: str, what: str = "name") -> str:
    """Accepts names that are safe as a single folder name."""
    allowed = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.")
    if not name or name.startswith(".") or not set(name) <= allowed or len(name) > 100:
        raise UsageError(
            f"invalid {what} {name!r}",
            "use letters, digits, '-', '_' and '.', not starting with '.', at most 100 characters",
        )
    return name


NO_MOTION = "none"
"""What ``generate --motion none`` means: the base model alone (so no motion may be called that)."""


def validate_motion_name(name: str, what: str = "motion name") -> str:
    """A valid store name that is not :data:`NO_MOTION` (any case)."""
    validate_name(name, what)
    if name.lower() == NO_MOTION:
        raise UsageError(
            f"invalid {what} {name!r}: `--motion {NO_MOTION}` means the base model alone",
            "choose another name",
        )
    return name


@dataclass(frozen=True)
class Leftover:
    """A folder in the store that is not a finished entry.

    Attributes:
        path: The folder.
        kind: ``unfinished training`` (resumable with ``train --resume``) or
            ``cut-off write`` (a temporary folder an interrupted write left).
        name: The entry it belongs to (for a cut-off write, with its random suffix).
        size_bytes: Its size on disk.
    """

    path: Path
    kind: str
    name: str
    size_bytes: int


class Store:
    """The folders of one store root.

    Args:
        home: The store root; created on first write.

    Raises:
        UsageError: if ``home``, or a folder above it, is a file.
    """

    def __init__(self, home: Path) -> None:
        self.home = Path(home).expanduser()
        existing = next((p for p in (self.home, *self.home.parents) if p.exists()), None)
        if existing is not None and not existing.is_dir():
            where = "is a file" if existing == self.home else f"is inside {existing}, a file"
            raise UsageError(
                f"the store root {self.home} {where}, not a folder",
                "point MOTIONSEP_HOME (or store.home) at a folder, or at a path to create one",
            )

    def partial_motion_dir(self, name: str) -> Path:
        """Where an unfinished training of motion ``name`` keeps its checkpoints."""
        return self.motions_dir / f"{PARTIAL_PREFIX}{name}"

    def partial_model_dir(self, name: str) -> Path:
        """Where an unfinished download or pretraining of model ``name`` keeps its files."""
        return self.models_dir / f"{PARTIAL_PREFIX}{self.model_folder_name(name)}"

    def motion_lock(self, name: str, what: str) -> contextlib.AbstractContextManager[None]:
        """The lock every writer of motion ``name`` holds (training, rm, rename, import).

        Args:
            name: The motion.
            what: The holder's action, named in the error a second holder gets.
        """
        return lock(self.motions_dir / f".{name}.lock", what)

    @contextlib.contextmanager
    def motion_change(self, name: str, action: str) -> Iterator[None]:
        """Holds the motion's lock (the one ``train`` takes) for a change to a finished motion.

        Raises:
            StoreLockedError: naming the action and who holds the lock.
        """
        try:
            with self.motion_lock(name, f"a command on motion {name!r}"):
                yield
        except StoreLockedError as exc:
            raise StoreLockedError(
                f"cannot {action}: {exc.message} (a training of {name!r}, or another command "
                "on it)",
                exc.hint,
            ) from None

    def model_lock(self, name: str, what: str) -> contextlib.AbstractContextManager[None]:
        """The lock every installer of model ``name`` holds (download, import)."""
        return lock(self.models_dir / f".{self.model_folder_name(name)}.lock", what)

    def motion_leftovers(self) -> list[Leftover]:
        """Unfinished trainings and cut-off writes among the motions, sorted by path."""
        if not self.motions_dir.is_dir():
            return []
        found = []
        for path in sorted(self.motions_dir.iterdir()):
            if path.name.startswith(PARTIAL_PREFIX):
                name, kind = path.name[len(PARTIAL_PREFIX) :], "unfinished training"
            elif path.name.startswith(_TMP_PREFIX):
                name, kind = path.name[len(_TMP_PREFIX) :], "cut-off write"
            else:
                continue
            found.append(Leftover(path, kind, name, folder_size(path)))
        return found

    @property
    def models_dir(self) -> Path:
        """Base models."""
        return self.home / "models"

    @property
    def motions_dir(self) -> Path:
        """Motion packages."""
        return self.home / "motions"

    def new_motion_path(self, name: str, force: bool, when: str = "") -> Path:
        """Where a new motion ``name`` goes; refuses a bad name, or a taken one without ``force``.

        Args:
            name: The motion's name.
            force: Replace a motion of that name.
            when: When the replacing happens, for the hint (e.g. " when training ends").

        Raises:
            UsageError: for a bad name, or an existing motion without ``force``.
        """
        validate_motion_name(name)
        folder = self.motions_dir / name
        if folder.exists() and not force:
            raise UsageError(
                f"a motion named {name!r} already exists ({folder})",
                f"choose another --name, or pass --force to replace it{when}",
            )
        return folder

    @property
    def prepared_dir(self) -> Path:
        """Prepared (encoded) training data."""
        return self.home / "prepared"

    # -- models -------------------------------------------------------------

    @staticmethod
    def model_folder_name(name: str) -> str:
        """Folder name of a model: hub ids ``OWNER/REPO`` become ``OWNER--REPO``."""
        return validate_name(name.replace("/", "--"), "model name")

    def model_path(self, name: str) -> Path:
        """Where the model ``name`` lives (whether or not it is installed)."""
        return self.models_dir / self.model_folder_name(name)

    def model_record(self, name: str) -> ModelRecord | None:
        """The record of an installed, verified model, or None."""
        path = self.model_path(name)
        record_file = path / MODEL_RECORD
        if not record_file.is_file():
            return None
        data = json.loads(record_file.read_text())
        return ModelRecord(
            name=data["name"],
            path=path,
            source=data.get("source", ""),
            revision=data.get("revision"),
            size_bytes=int(data.get("size_bytes", 0)),
            created=data.get("created", ""),
        )

    def installed_models(self) -> list[ModelRecord]:
        """Every verified model in the store, by name."""
        if not self.models_dir.is_dir():
            return []
        records = []
        for path in sorted(self.models_dir.iterdir()):
            if path.name.startswith(".") or not (path / MODEL_RECORD).is_file():
                continue
            record = self.model_record(path.name.replace("--", "/"))
            if record is not None:
                records.append(record)
        return records

    def resolve_model(self, name_or_path: str) -> Path:
        """The folder of a base model given by store name, hub id or path.

        Raises:
            ModelNotFoundError: with the command that installs it.
        """
        candidate = Path(name_or_path).expanduser()
        looks_like_path = name_or_path.startswith((".", "/", "~")) or candidate.exists()
        if looks_like_path:
            if (candidate / "model_index.json").is_file():
                return candidate
            raise ModelNotFoundError(
                f"{candidate} is not a diffusers model folder (no model_index.json)",
                "pass a folder saved by diffusers, or a name from `motionsep download --list`",
            )
        record = self.model_record(name_or_path)
        if record is not None:
            check_model(record.path, record.name)
            return record.path
        builtin = builtin_model_path(name_or_path)
        if builtin is not None:
            return builtin
        installed = [r.name for r in self.installed_models()]
        hint = f"install it with `motionsep download {name_or_path}`"
        if installed:
            hint += f"; installed models: {', '.join(installed)}"
        raise ModelNotFoundError(
            f"model {name_or_path!r} is not in the store ({self.models_dir})", hint
        )

    def write_model_record(
        self, folder: Path, name: str, source: str, revision: str | None
    ) -> None:
        """Marks a model folder as verified and ready (call last, before renaming)."""
        files = file_manifest(folder)
        record = {
            "name": name,
            "source": source,
            "revision": revision,
            "size_bytes": sum(item["size"] for item in files.values()),
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "files": files,
        }
        (folder / MODEL_RECORD).write_text(json.dumps(record, indent=2) + "\n")


@contextlib.contextmanager
def atomic_folder(final: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yields a temporary folder that becomes ``final`` only if the block succeeds.

    The temporary folder is a sibling of ``final`` (same file system, so the
    rename is atomic). On error it is removed and ``final`` is untouched. With
    ``overwrite``, an existing ``final`` is replaced only after the new
    content is complete.

    Raises:
        UsageError: if ``final`` exists and ``overwrite`` is false.
    """
    final = Path(final)
    if final.exists() and not overwrite:
        raise UsageError(f"{final} already exists", "choose another name or pass --force")
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f"{_TMP_PREFIX}{final.name}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
        share_like_umask(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if final.exists():
        old = final.parent / f"{_TMP_PREFIX}{final.name}-old-{uuid.uuid4().hex[:8]}"
        final.rename(old)
    tmp.rename(final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def temporary_sibling(final: Path, tag: str = "") -> Path:
    """A hidden, unused name beside ``final`` to write it under first.

    ``.tmp-NAME-RANDOM[-TAG]SUFFIX``: the suffix is kept, so writers that read
    the format from the name (video, image) write the right one.
    """
    final = Path(final)
    tag = f"-{tag}" if tag else ""
    return final.with_name(f"{_TMP_PREFIX}{final.name}-{uuid.uuid4().hex[:8]}{tag}{final.suffix}")


def current_umask() -> int:
    """The process umask, read without changing it where the OS allows (Linux)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def share_like_umask(folder: Path) -> None:
    """Gives every file under ``folder`` the mode a plain ``open()`` would (0644 under 022).

    safetensors writes its files 0600 whatever the umask, which would make a
    store shared on one machine unreadable to the other users; a file is only
    ever widened up to what the umask allows, never narrowed, and hard-linked
    files (whose mode belongs to their other name too) are left alone.
    """
    mode = 0o666 & ~current_umask()
    for path in folder.rglob("*"):
        # a hard link shares its mode with a file that is not ours (a hub cache, --from)
        if path.is_file() and not path.is_symlink() and path.stat().st_nlink == 1:
            current = path.stat().st_mode & 0o777
            if current | mode != current:
                path.chmod(current | mode)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Writes a file through a temporary sibling and an atomic rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{_TMP_PREFIX}{path.name}-{uuid.uuid4().hex[:8]}")
    try:
        with tmp.open("wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def lock(path: Path, what: str) -> Iterator[None]:
    """An exclusive lock on ``path``, held by the operating system.

    The lock (``filelock``, an ``flock`` on POSIX) belongs to this process
    and dies with it: a run that crashed or was killed leaves nothing to
    clean up (its lock file stays behind, unlocked, and is reused). Who
    holds it (pid, host, since when) is written beside it in ``PATH.owner``
    for the message a second run gets.

    Args:
        path: The lock file (created next to the entry it guards).
        what: Named in the error, e.g. "training of motion 'dolly'".

    Raises:
        StoreLockedError: if another process (or another ``lock`` here) holds it.
    """
    from filelock import FileLock, Timeout

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    owner = path.with_name(path.name + ".owner")
    held = FileLock(str(path), timeout=0, thread_local=False, is_singleton=False)
    try:
        held.acquire()
    except Timeout:
        try:
            holder = json.loads(owner.read_text(encoding="utf-8"))
            who = f"pid {holder['pid']} on {holder['host']}"
        except (OSError, ValueError, TypeError, KeyError):
            who = "another process"
        raise StoreLockedError(
            f"{what} is already running ({who})",
            "wait for it to finish: the lock is released the moment that process ends",
        ) from None
    try:
        me = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}
        atomic_write_bytes(owner, json.dumps(me).encode())
        yield
    finally:
        owner.unlink(missing_ok=True)
        # Unlinked while still held: a run that opens the path now makes a new
        # file and takes that, which is safe because this one's work is done;
        # one that opened the old file before finds it locked and says so.
        path.unlink(missing_ok=True)
        held.release()
