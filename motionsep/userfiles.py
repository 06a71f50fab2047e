"""Files and folders at paths the user names: created exclusively, replaced only when ours.

Every command that writes where the user points (``generate --out``,
``motions export --out``, ``report --out``, ``toy clips OUT``, ``evaluate
--csv``/``--plot``, ``toy pretrain``/``toy snapshot --out``) goes through
here, under three rules:

- **Nothing is replaced without asking.** A path that exists is refused
  unless ``--force``. A folder is replaced, even with ``--force``, only when
  motionsep wrote it as that kind of output, which it knows from the marker
  file :data:`MARKER_FILE` it writes into every such folder (kind, version
  and the files it wrote), and only when nothing else has been put in it
  since. A symbolic link is never replaced, and nothing is ever written
  inside the store (its motions, models and caches) or over a folder that
  holds it.
- **Complete or absent.** The content is written under a hidden temporary
  name beside the target and then given its name in one step; a failure
  leaves nothing under the target's name.
- **Exclusive.** Without ``--force`` the name is taken with a hard link (or
  ``O_EXCL`` where the file system has no links, or a rename that fails on a
  non-empty folder), which fails if the name exists, so of two runs writing
  the same name at the same moment exactly one succeeds and the other is
  told so; nothing either wrote is lost.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
from collections.abc import Iterator, Sequence
from enum import Enum
from pathlib import Path
from typing import Any

from motionsep.errors import OutputExistsError, UsageError
from motionsep.store import share_like_umask, temporary_sibling

MARKER_FILE = ".motionsep-output.json"
"""Written into every folder output: ``{"kind", "version", "files"}``."""

_NO_LINKS = {errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS, errno.EMLINK}
"""What ``link()`` says on a file system without hard links (FAT, some network mounts)."""
_NAME_TAKEN = {errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR, errno.EISDIR}
"""What ``rename()`` of a folder says when the target name holds something."""


class OutputKind(str, Enum):
    """The kinds of folder motionsep writes at a user's path (each a marker's ``kind``)."""

    REPORT = "report"
    EXPORT = "export"
    CLIPS = "clips"
    MODEL = "model"
    DEMO = "demo"

    @property
    def noun(self) -> str:
        """How messages name it."""
        return _NOUNS[self.value]


_NOUNS = {
    "report": "report page",
    "export": "motion export",
    "clips": "folder of clips",
    "model": "model folder",
    "demo": "demo folder",
}


# ---------------------------------------------------------------------------
# checks


def check_outside_store(path: Path, store_home: Path) -> None:
    """Refuses a path inside the store (or a folder that holds the store).

    Raises:
        UsageError: naming the path and the store.
    """
    target, home = Path(path).expanduser().resolve(), Path(store_home).expanduser().resolve()
    if target == home or home in target.parents or target in home.parents:
        raise UsageError(
            f"{path} is inside the motionsep store ({home}) or holds it; nothing is written "
            "there from an output path",
            f"pass a path outside {home}",
        )


def check_new_files(paths: Sequence[Path], *, force: bool, instead: str = "another --out") -> None:
    """Refuses paths that exist, unless ``force`` and each is a plain file.

    Raises:
        OutputExistsError: for an existing path without ``force``.
        UsageError: with ``force``, for a folder or symbolic link at a path.
    """
    for path in paths:
        if not os.path.lexists(path):
            continue
        if not force:
            raise OutputExistsError(
                f"{path} already exists; it was left as it is",
                f"pass --force to replace it, or {instead}",
                path=str(path),
            )
        if Path(path).is_symlink() or Path(path).is_dir():
            what = "a symbolic link" if Path(path).is_symlink() else "a folder"
            raise UsageError(
                f"{path} is {what}; --force replaces only a file there, so it was left as it is",
                f"pass {instead}",
            )


def check_new_folder(
    path: Path,
    kind: OutputKind,
    *,
    force: bool,
    store_home: Path,
    instead: str = "another --out",
    empty_is_new: bool = False,
) -> bool:
    """Whether writing the folder output ``path`` replaces one; refuses what it must not.

    Absent: written fresh (False). An existing folder is refused without
    ``force`` (an empty one too, unless ``empty_is_new``: then it is written
    fresh). With ``force`` it is replaced (True) if it is empty, or if it is a
    ``kind`` output motionsep wrote (its marker) holding nothing but the
    files it wrote.

    Args:
        path: The folder to write.
        kind: What motionsep writes there.
        force: The user asked to replace an existing one.
        store_home: The store, which no output may lie in or hold.
        instead: What the hint suggests passing instead.
        empty_is_new: Take an existing empty folder as if it were absent
            (``toy clips OUT`` into a folder made for it).

    Raises:
        OutputExistsError: an existing folder without ``force``.
        UsageError: a path inside the store, a file or symbolic link, or a
            folder that is not motionsep's ``kind`` output or holds other files.
    """
    path = Path(path)
    check_outside_store(path, store_home)
    if path.is_symlink() or (os.path.lexists(path) and not path.is_dir()):
        what = "a symbolic link" if path.is_symlink() else "a file"
        raise UsageError(f"{path} is {what}, not a folder; it was left as it is", f"pass {instead}")
    if not path.exists():
        return False
    empty = not any(path.iterdir())
    if empty and empty_is_new:
        return False
    if not force:
        raise OutputExistsError(
            f"{path} already exists; it was left as it is",
            f"pass --force to replace it (only a {kind.noun} motionsep wrote is replaced), "
            f"or {instead}",
            path=str(path),
        )
    if not empty:
        _check_own_folder(path, kind, instead)
    return True


def _check_own_folder(path: Path, kind: OutputKind, instead: str) -> None:
    """Refuses to replace a folder unless its marker says ``kind`` and lists everything in it."""
    marker = read_marker(path)
    if marker is None:
        raise UsageError(
            f"{path} is not a {kind.noun} motionsep wrote (no {MARKER_FILE} in it); "
            "it was left as it is",
            f"pass {instead}, or move the folder away yourself",
        )
    if marker.get("kind") != kind.value:
        raise UsageError(
            f"{path} is a {OutputKind(marker['kind']).noun} motionsep wrote, not a "
            f"{kind.noun}; it was left as it is",
            f"pass {instead}",
        )
    listed = set(marker.get("files", []))
    for entry in _entries(path):
        if entry.relative_to(path).as_posix() not in listed:
            raise UsageError(
                f"{path} holds {entry}, which motionsep did not write there; the folder was "
                "left as it is",
                f"move {entry} out of it, or pass {instead}",
            )


def read_marker(folder: Path) -> dict[str, Any] | None:
    """The marker of a folder output motionsep wrote, or None (absent, unreadable, not ours)."""
    marker = Path(folder) / MARKER_FILE
    if marker.is_symlink() or not marker.is_file():
        return None
    try:
        data = json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    kinds = {k.value for k in OutputKind}
    if not isinstance(data, dict) or data.get("kind") not in kinds:
        return None
    if not isinstance(data.get("files"), list):
        return None
    return data


def _entries(folder: Path) -> list[Path]:
    """Every file and symbolic link under ``folder`` except the marker (links not followed)."""
    found = []
    for root, dirs, files in os.walk(folder, followlinks=False):
        here = Path(root)
        found += [here / d for d in dirs if (here / d).is_symlink()]
        found += [here / f for f in files if not (here == folder and f == MARKER_FILE)]
    return sorted(found)


# ---------------------------------------------------------------------------
# writing


def publish(pairs: Sequence[tuple[Path, Path]], *, replace: bool = False) -> None:
    """Gives each written temporary file or folder its final name, all or none.

    Args:
        pairs: ``(temporary, final)``; each temporary a sibling of its final
            path (:func:`motionsep.store.temporary_sibling`).
        replace: Replace what is at a final name (``--force``, checked before).
            Otherwise a final name that holds anything, even one another
            process took a moment ago, is kept, and the names this call took
            are given back.

    Raises:
        OutputExistsError: without ``replace``, naming the path that was taken.
    """
    done: list[tuple[Path, tuple[int, int]]] = []
    try:
        for tmp, final in pairs:
            info = os.lstat(tmp)
            if replace:
                _replace(tmp, final)
            else:
                _claim(tmp, final)
            done.append((final, (info.st_dev, info.st_ino)))
    except BaseException:
        if not replace:
            for final, identity in reversed(done):
                _give_back(final, identity)
        raise


def _claim(tmp: Path, final: Path) -> None:
    """Moves ``tmp`` to ``final`` only if nothing is there (atomically)."""
    taken = OutputExistsError(
        f"{final} already exists (another run wrote it meanwhile?); it was left as it is",
        "pass another --out",
        path=str(final),
    )
    if tmp.is_dir():
        # rename() onto a non-empty folder or a file fails; onto an empty folder
        # it succeeds, which loses nothing.
        try:
            tmp.rename(final)
        except OSError as exc:
            if exc.errno in _NAME_TAKEN:
                raise taken from None
            raise
        return
    try:
        os.link(tmp, final)
        return
    except FileExistsError:
        raise taken from None
    except OSError as exc:
        if exc.errno not in _NO_LINKS:
            raise
    try:
        os.close(os.open(final, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    except FileExistsError:
        raise taken from None
    tmp.replace(final)


def _replace(tmp: Path, final: Path) -> None:
    if not tmp.is_dir():
        tmp.replace(final)
        return
    old = temporary_sibling(final, "old") if os.path.lexists(final) else None
    if old is not None:
        final.rename(old)
    try:
        tmp.rename(final)
    except BaseException:
        if old is not None and not os.path.lexists(final):
            old.rename(final)  # the replaced folder comes back
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _give_back(final: Path, identity: tuple[int, int]) -> None:
    """Removes ``final`` if it is still what this process put there."""
    try:
        info = os.lstat(final)
    except FileNotFoundError:
        return
    if (info.st_dev, info.st_ino) != identity:
        return
    if Path(final).is_dir():
        shutil.rmtree(final, ignore_errors=True)
    else:
        Path(final).unlink(missing_ok=True)


def discard(path: Path) -> None:
    """Removes a temporary file or folder, if it is still there."""
    if Path(path).is_dir() and not Path(path).is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        Path(path).unlink(missing_ok=True)


@contextlib.contextmanager
def new_file(path: Path, *, force: bool, instead: str = "another --out") -> Iterator[Path]:
    """Yields a temporary path to write; when the block succeeds it becomes ``path``.

    Refused up front if ``path`` exists (without ``force``), and again at the
    end if it appeared meanwhile (:func:`publish`).

    Raises:
        OutputExistsError: ``path`` exists (or appeared) without ``force``.
        UsageError: with ``force``, ``path`` is a folder or symbolic link.
    """
    path = Path(path).expanduser()
    check_new_files([path], force=force, instead=instead)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_sibling(path)
    try:
        yield tmp
        publish([(tmp, path)], replace=force)
    finally:
        discard(tmp)


def write_new_file(path: Path, data: bytes, *, force: bool, instead: str = "another --out") -> Path:
    """Writes ``data`` to ``path`` as :func:`new_file` does; returns ``path``."""
    with new_file(path, force=force, instead=instead) as tmp, tmp.open("wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    return Path(path).expanduser()


@contextlib.contextmanager
def new_folder(
    path: Path,
    kind: OutputKind,
    *,
    force: bool,
    store_home: Path,
    instead: str = "another --out",
    empty_is_new: bool = False,
) -> Iterator[Path]:
    """Yields a temporary folder to fill; when the block succeeds it becomes ``path``.

    The folder gets its marker (listing every file written into it) last.
    What may be replaced is decided by :func:`check_new_folder`, up front and
    again just before the swap; without a replacement the name is taken
    exclusively.

    Raises:
        OutputExistsError: ``path`` exists without ``force`` (see
            :func:`check_new_folder`), or appeared meanwhile.
        UsageError: as :func:`check_new_folder`.
    """
    path = Path(path).expanduser()
    check_new_folder(
        path, kind, force=force, store_home=store_home, instead=instead, empty_is_new=empty_is_new
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_sibling(path)
    tmp.mkdir()
    try:
        yield tmp
        _write_marker(tmp, kind)
        share_like_umask(tmp)
        replacing = check_new_folder(
            path,
            kind,
            force=force,
            store_home=store_home,
            instead=instead,
            empty_is_new=empty_is_new,
        )
        publish([(tmp, path)], replace=replacing)
    finally:
        discard(tmp)


def write_marker(folder: Path, kind: OutputKind) -> None:
    """Marks ``folder``, filled in place, as a ``kind`` output holding what is in it now."""
    _write_marker(folder, kind)


def _write_marker(folder: Path, kind: OutputKind) -> None:
    import motionsep

    files = [entry.relative_to(folder).as_posix() for entry in _entries(folder)]
    record = {"kind": kind.value, "version": motionsep.__version__, "files": files}
    (folder / MARKER_FILE).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
