"""The exceptions `cli.py` turns into exit codes: UsageError -> 2, TrainingFailed -> 1."""

from __future__ import annotations


class UsageError(Exception):
    """Bad input: a config, an argument, a device or data that is not there. Exit code 2.

    `key` is the dotted config key at fault, when there is one (`data.root`).
    """

    def __init__(self, message: str, key: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.key = key

    def __str__(self) -> str:
        return f"{self.key}: {self.message}" if self.key else self.message


class DataError(UsageError):
    """A dataset that cannot be found or read."""


class DeviceError(UsageError):
    """A device or precision this machine cannot give."""


def first_line(err: BaseException) -> str:
    """The first line of an exception's message (torch appends C++ frames), or its type's name."""
    lines = str(err).strip().splitlines()
    return lines[0] if lines else type(err).__name__


class TrainingFailed(Exception):
    """A run that failed while training (a non-finite loss, say). Exit code 1."""
