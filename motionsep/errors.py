"""Typed errors. Each says what went wrong and what to do next.

The CLI maps them to a message and an exit code in one place
(``motionsep_cli/_errors.py``): ``exit_code`` 2 means bad usage or bad input,
1 means the work itself failed.
"""

from __future__ import annotations

import errno
from typing import TypeGuard

DISK_FULL_ERRNOS = frozenset(
    code for code in (errno.ENOSPC, getattr(errno, "EDQUOT", None)) if code is not None
)
"""``OSError.errno`` values that mean the disk (or the user's quota) is full."""


class MotionsepError(Exception):
    """Base class of every error motionsep raises on purpose.

    Args:
        message: What went wrong, naming the thing (file, field, model) at fault.
        hint: What the user can do about it; shown on its own line.
    """

    exit_code = 1

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message}\n{self.hint}"


class UsageError(MotionsepError):
    """The command was given something it cannot use (bad path, bad value)."""

    exit_code = 2


class OutputExistsError(UsageError):
    """A file or folder the command was to write exists (or appeared meanwhile) and was kept.

    Args:
        message: What exists, naming it.
        hint: What to do about it.
        path: The path that was kept.
    """

    def __init__(self, message: str, hint: str | None = None, path: str | None = None) -> None:
        super().__init__(message, hint)
        self.path = path


class SettingsError(UsageError):
    """One or more settings are invalid; the message lists every bad field."""


class ModelNotFoundError(UsageError):
    """A base model name or path does not resolve to a usable model."""


class ModelFormatError(UsageError):
    """A model folder exists but is not a text-to-video model we can use."""


class MotionNotFoundError(UsageError):
    """A motion name is not in the store."""


class PackageError(MotionsepError):
    """A motion package is damaged, incomplete or of an unknown format."""


class IncompatibleModelError(UsageError):
    """A motion was trained on a different base model than the one given."""


class RecipeMismatchError(MotionsepError):
    """Injecting a recipe's LoRA did not adapt exactly the modules it names."""


class DamagedCacheError(MotionsepError):
    """A cached file no longer matches the checksum recorded when it was written."""


class DamagedModelError(MotionsepError):
    """An installed base model's files no longer match what was installed."""

    exit_code = 2


class StoreLockedError(MotionsepError):
    """Another process holds the lock on a store entry."""


class HubRepoNotFoundError(UsageError):
    """A hub repository or revision does not exist (or is private and no token was sent)."""


class HubAccessError(MotionsepError):
    """The hub refused access: a gated or private repository without a valid token."""


class HubFileMissingError(MotionsepError):
    """A file the model needs is listed by the hub but cannot be fetched from it."""


class HubUnreachableError(MotionsepError):
    """The hub could not be reached, or a download was cut off; a rerun resumes."""


class DiskFullError(MotionsepError):
    """Not enough free disk space; the message says how much is needed and where."""


class VideoError(UsageError):
    """A clip cannot be used: missing, not a video, corrupt, empty, or too short.

    Args:
        message: What is wrong, naming the file.
        hint: What to do about it.
        path: The file at fault as the caller named it, when there is one.
    """

    def __init__(self, message: str, hint: str | None = None, path: str | None = None) -> None:
        super().__init__(message, hint)
        self.path = path


def is_disk_full(exc: BaseException) -> TypeGuard[OSError]:
    """Whether ``exc`` is an ``OSError`` saying the disk or the user's quota is full."""
    return isinstance(exc, OSError) and exc.errno in DISK_FULL_ERRNOS
