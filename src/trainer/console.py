"""Where trainer prints: a view of the run, which a closed pipe or a full disk must not stop.

`trainer run ... | head -1` closes stdout after one line; a `tee` that dies, or stdout on a full
disk, makes every later write fail. The run's files are its record, the console only shows it, so
a console that cannot be written goes quiet and the run goes on.
"""

from __future__ import annotations

import contextlib
import os
import sys
from typing import IO, Any

from rich.console import Console


def silence(file: IO[str] | None) -> None:
    """Point `file`'s descriptor at /dev/null: what it still holds, and what Python flushes at
    exit, goes nowhere instead of failing again (and turning the exit code into 120)."""
    with contextlib.suppress(AttributeError, OSError, ValueError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, file.fileno())
        os.close(devnull)


class ViewConsole(Console):
    """A Rich console that goes quiet when it cannot be written, instead of ending the process
    (Rich's own answer to a closed pipe is SystemExit(1), with nothing said)."""

    def print(self, *objects: Any, **kwargs: Any) -> None:
        try:
            super().print(*objects, **kwargs)
        except OSError:  # not only a closed pipe: a full disk under a redirected stdout, say
            self.lost()

    def on_broken_pipe(self) -> None:
        self.lost()

    def lost(self) -> None:
        """Print nothing more, and send what is still buffered for this console nowhere."""
        self.quiet = True
        silence(self.file)


def say(text: str, *, stderr: bool = False, **print_kwargs: Any) -> None:
    """print() that a console that cannot be written does not stop."""
    stream = sys.stderr if stderr else sys.stdout
    try:
        print(text, file=stream, flush=True, **print_kwargs)
    except OSError:
        silence(stream)
