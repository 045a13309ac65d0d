"""User-facing errors.

Every problem caused by the user's input (an unknown name, an impossible sparsity, a missing
dataset) raises a :class:`PrunelabError` with one readable message that says what was wrong and
what to do. The CLI prints these without a traceback and exits with status 2.
"""

from __future__ import annotations

import difflib
import errno
from collections.abc import Iterable


class PrunelabError(Exception):
    """Base class of errors caused by bad input; the message is meant for the user."""


class UnknownNameError(PrunelabError, KeyError):
    """A method, model, dataset or option name that is not registered."""

    def __init__(self, kind: str, name: str, valid: Iterable[str]):
        valid = sorted(valid)
        close = difflib.get_close_matches(name, valid, n=3, cutoff=0.5)
        hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
        message = f"unknown {kind} {name!r}.{hint} Valid {kind}s: {', '.join(valid)}."
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:  # KeyError would otherwise quote the message
        return self.message


class InvalidValueError(PrunelabError, ValueError):
    """An option with a value outside its allowed range."""


class NothingToPruneError(PrunelabError):
    """The model has no parameter that the chosen method can prune."""


class DatasetNotFoundError(PrunelabError, FileNotFoundError):
    """A dataset is not on disk and could not be downloaded."""


class CheckpointError(PrunelabError):
    """A checkpoint file is missing, corrupt, or belongs to another model."""


class ConfigError(PrunelabError, ValueError):
    """A configuration (file, flags or a config object built in Python) that does not validate."""


class DiskFullError(PrunelabError, OSError):
    """No space left on the device (or over quota) while writing results: stop, don't retry."""


class TrainingDivergedError(PrunelabError):
    """The training loss became NaN or infinite."""


def did_you_mean(name: str, valid: Iterable[str]) -> str:
    """Return ' Did you mean X?' for the closest valid name, or an empty string."""
    close = difflib.get_close_matches(name, list(valid), n=1, cutoff=0.5)
    return f" Did you mean {close[0]!r}?" if close else ""


def is_disk_full(exc: BaseException) -> bool:
    """Whether ``exc`` means the disk (or the user's quota) is full."""
    if isinstance(exc, DiskFullError):
        return True
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    return "database or disk is full" in str(exc)  # SQLite's SQLITE_FULL
