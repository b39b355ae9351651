"""User-facing errors: each names the problem and says what to do about it."""

from __future__ import annotations

import logging


class BulbsegError(Exception):
    """An error meant for the user: ``message`` says what went wrong, ``hint`` what to do."""

    def __init__(self, message: str, hint: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message} — {self.hint}" if self.hint else self.message


class InputError(BulbsegError):
    """A file, array, shape or value the user supplied cannot be used."""


class ModelError(BulbsegError):
    """A model file or card is missing, corrupt, unsafe or does not fit the data."""


class TrainingError(BulbsegError):
    """Training could not produce a valid model (NaN loss, no data, failed validation)."""


class CancelledError(BulbsegError):
    """A long job was stopped by the user before it finished."""


def log_failure(logger: logging.Logger, error: BaseException, what: str = "job") -> None:
    """Log a job that raised ``error`` (the user is shown one sentence elsewhere).

    A :class:`BulbsegError` is the user's problem, already explained: DEBUG. ``MemoryError``:
    WARNING. Anything else is a bug: ERROR with its traceback, so it reaches the terminal and
    napari's log where it can be reported.
    """
    if isinstance(error, BulbsegError):
        level = logging.DEBUG
    elif isinstance(error, MemoryError):
        level = logging.WARNING
    else:
        level = logging.ERROR
    exc_info = (type(error), error, error.__traceback__)
    logger.log(level, "%s failed: %s", what, error, exc_info=exc_info)
