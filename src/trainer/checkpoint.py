"""Checkpoints: atomic save (temp file, fsync, rename, fsync the folder) and safe load (weights_only)."""

from __future__ import annotations

import os
import pickle
import re
import tempfile
from pathlib import Path
from typing import Any

import torch

from trainer.errors import UsageError


def atomic_save(obj: Any, path: Path) -> None:
    """torch.save `obj` to `path` so that a crash leaves either the old file or the new one, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save(obj, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _fsync_dir(folder: Path) -> None:
    # the rename is durable only once the folder's entry is on disk (not possible on every OS)
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def training_state(built: Any, state: Any) -> dict[str, Any]:
    """What a checkpoint holds: plain state dicts and numbers, loadable with weights_only=True."""
    from trainer import __version__

    return {
        "model": built.model.state_dict(),
        "optimizer": built.optimizer.state_dict(),
        "scheduler": built.scheduler.state_dict() if built.scheduler is not None else None,
        "step": state.step,
        "epoch": state.epoch,
        "config": built.config.model_dump(mode="json"),
        "versions": {"trainer": __version__, "torch": torch.__version__},
    }


def load_checkpoint(path: Path, map_location: Any = "cpu") -> dict[str, Any]:
    """Load a checkpoint with `weights_only=True`: tensors and plain containers only, nothing executed."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"checkpoint '{path}' does not exist")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # a pickled payload, a truncated zip, not a checkpoint at all
        text = re.sub(r"\x1b\[[0-9;]*m", "", str(err)).strip()  # torch's message carries terminal escapes
        first = text.splitlines()[0] if text else type(err).__name__
        if isinstance(err, pickle.UnpicklingError) and "Weights only load failed" in text:  # a refused global
            found = re.search(r"GLOBAL ([\w.]+)", text)
            first = "it holds pickled Python objects, not only tensors" + (f" ({found.group(1)})" if found else "")
        raise UsageError(f"checkpoint '{path}' cannot be loaded safely: {first}") from None
