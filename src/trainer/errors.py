"""The exceptions `cli.py` turns into exit codes: UsageError -> 2, TrainingFailed -> 1, Terminated
-> 128 + the signal; and which signals ask a command to stop."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any


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


class Terminated(BaseException):
    """SIGTERM (or SIGHUP) arrived in a command that writes files but trains nothing (predict,
    export): raised where the command is, so its temporary files are removed. Exit code 128 + signal.
    A BaseException, like KeyboardInterrupt, so no `except Exception` on the way swallows it."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def stop_signals() -> tuple[int, ...]:
    """The signals that ask a command to stop: SIGINT, SIGTERM, and SIGHUP (a closed terminal) unless
    it is ignored, as `nohup` leaves it: a handler of ours would undo nohup."""
    hangup = () if signal.getsignal(signal.SIGHUP) is signal.SIG_IGN else (signal.SIGHUP,)
    return (signal.SIGINT, signal.SIGTERM, *hangup)


def as_stop(signum: int) -> int:
    """A closed terminal stops what runs as SIGTERM does: SIGHUP -> SIGTERM, others as they are."""
    return signal.SIGTERM if signum == signal.SIGHUP else signum


@contextmanager
def terminated_raises() -> Iterator[None]:
    """While active, SIGTERM and SIGHUP raise Terminated (as SIGTERM) where the program is, once:
    a second one (a closed terminal often sends two) must not cut the cleanup short. See also
    `output_in_place`."""
    previous = {s: signal.signal(s, _raise_terminated) for s in stop_signals() if s != signal.SIGINT}
    previous[signal.SIGINT] = signal.getsignal(signal.SIGINT)  # raises KeyboardInterrupt; `output_in_place` may change it
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def _raise_terminated(signum: int, frame: Any) -> None:
    output_in_place()
    raise Terminated(as_stop(signum))


def output_in_place() -> None:
    """From here to the end of `terminated_raises`, SIGTERM, SIGHUP and SIGINT are ignored: the
    command puts its output in place (renames: milliseconds), which a signal must not leave half
    done, and after which it must not say it wrote nothing. A no-op outside `terminated_raises`."""
    if signal.getsignal(signal.SIGTERM) is not _raise_terminated:
        return
    for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        if s != signal.SIGHUP or signal.getsignal(s) is _raise_terminated:  # nohup's ignored SIGHUP stays so
            signal.signal(s, signal.SIG_IGN)
