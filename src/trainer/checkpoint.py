"""Checkpoints: atomic save (temp file, fsync, rename, fsync the folder), with the waits for the disk
on a background thread, and safe load (weights_only)."""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import random
import re
import shutil
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from trainer.errors import UsageError

CHECKPOINT_FORMAT = 2  # bumped when the layout of the dict changes (2: train_state.history is JSON text)
READABLE_FORMATS = (1, 2)  # what this version loads: an older trainer refuses a newer file by its number


def serialize(obj: Any) -> memoryview:
    """`obj` as the bytes torch.save writes: read now, so the training that goes on cannot change it."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getbuffer()


@dataclass
class StagedFile:
    """Bytes written to a temporary file next to `path`, not yet on disk for sure nor renamed."""

    path: Path
    tmp: Path
    fd: int


def stage(data: bytes | memoryview | Path, path: Path) -> StagedFile:
    """Write `data` (bytes, or the contents of the file it names) to a temporary file in `path`'s
    folder: a read-only folder or a full disk fails here, in the caller's thread; `commit` makes it
    durable and puts it in place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        if isinstance(data, Path):
            with open(data, "rb") as source, open(fd, "wb", closefd=False) as target:
                shutil.copyfileobj(source, target)  # in chunks: a checkpoint of GBs is never all in memory
        else:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
    except BaseException:
        os.close(fd)
        Path(tmp_name).unlink(missing_ok=True)
        raise
    return StagedFile(path, Path(tmp_name), fd)


def commit(staged: StagedFile, *, sync_folder: bool = True) -> None:
    """fsync the staged file, rename it over its path and fsync the folder: after a crash the
    path holds the old contents or the new, never half of them.

    `sync_folder=False` leaves the folder's fsync to a call that follows at once (`link_or_copy`
    of best.pt, in the same folder): one fsync makes both renames durable.
    """
    try:
        try:
            os.fsync(staged.fd)
        finally:
            os.close(staged.fd)
        os.replace(staged.tmp, staged.path)
    except BaseException:
        staged.tmp.unlink(missing_ok=True)
        raise
    if sync_folder:
        _fsync_dir(staged.path.parent)


def atomic_save(obj: Any, path: Path) -> None:
    """torch.save `obj` to `path` so that a crash leaves either the old file or the new one, never half of one."""
    commit(stage(serialize(obj), path))


def link_or_copy(source: Path, path: Path) -> None:
    """Make `path` hold what `source` holds now: a hard link, or a copy where the filesystem has no
    hard links (read back from `source`, so no caller has to keep the bytes in memory meanwhile).
    Either way the folder is fsynced, also when this fails: a `commit(sync_folder=False)` of
    `source` just before relies on it."""
    try:
        if not atomic_link(source, path):
            commit(stage(Path(source), path))
    except BaseException:
        _fsync_dir(Path(path).parent)
        raise


class BackgroundWrites:
    """Calls that wait for the disk (fsync), run in order on one thread while training goes on.

    Once a call fails, the calls after it are skipped until `wait()`: best.pt must not be linked
    to a last.pt whose new state never got there. `wait()` blocks until all submitted calls are
    done and returns the first one's error as (path, exception), or None; a checkpoint is on disk
    for sure only after it.
    """

    def __init__(self) -> None:
        self._executor: Any = None
        self._pending: list[tuple[Path, Any]] = []
        self._failed = False  # set on the writer thread; read there too, and reset by wait()

    def submit(self, path: Path, fn: Callable[..., None], *args: Any, **kwargs: Any) -> None:
        """Run `fn(*args, **kwargs)` on the writer thread after the calls before it; `path` names it in errors."""
        if self._executor is None:
            from concurrent.futures import ThreadPoolExecutor

            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="trainer-checkpoints")
        self._pending.append((path, self._executor.submit(self._run, fn, *args, **kwargs)))

    def _run(self, fn: Callable[..., None], *args: Any, **kwargs: Any) -> None:
        if self._failed:
            return
        try:
            fn(*args, **kwargs)
        except BaseException:
            self._failed = True
            raise

    def wait(self) -> tuple[Path, Exception] | None:
        pending, self._pending = self._pending, []
        error = None
        for path, future in pending:
            try:
                future.result()
            except (OSError, RuntimeError) as err:
                error = error or (path, err)
        self._failed = False  # every call has run or been skipped: the next save starts afresh
        return error

    def close(self) -> tuple[Path, Exception] | None:
        """Wait for the pending calls and stop the thread."""
        try:
            return self.wait()
        finally:
            if self._executor is not None:
                self._executor.shutdown()


def atomic_link(source: Path, path: Path) -> bool:
    """Make `path` a second name for `source`'s current contents, atomically; False where the
    filesystem has no hard links. A later atomic_save to `source` makes a new file, so `path`
    keeps what it linked (best.pt stays the best epoch while last.pt moves on)."""
    tmp = path.with_name(f".{path.name}.link.tmp")
    try:
        tmp.unlink(missing_ok=True)
        os.link(source, tmp)
        os.replace(tmp, path)
    except OSError:
        tmp.unlink(missing_ok=True)
        return False
    _fsync_dir(path.parent)
    return True


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


def rng_state() -> dict[str, Any]:
    """Every random number generator the run draws from, as bytes and plain values."""
    py_version, py_state, py_gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    # bytes, not tensors or 625 ints: torch.save calls back into Python once per pickled object
    # and writes a zip record per tensor
    state = {
        "python": [py_version, struct.pack(f"<{len(py_state)}I", *py_state), py_gauss],
        "numpy": [np_name, np_keys.astype("<u4").tobytes(), np_pos, np_has_gauss, np_gauss],
        "torch": torch.get_rng_state().numpy().tobytes(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what `rng_state` saved (or the tensors and lists of earlier versions)."""
    version, values, gauss = state["python"]
    if isinstance(values, bytes):
        values = struct.unpack(f"<{len(values) // 4}I", values)
    elif isinstance(values, torch.Tensor):
        values = values.tolist()
    random.setstate((version, tuple(values), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    keys = np.frombuffer(keys, dtype="<u4") if isinstance(keys, bytes) else keys.numpy()
    np.random.set_state((name, keys.astype(np.uint32), pos, has_gauss, cached))
    cpu = state["torch"]
    torch.set_rng_state(torch.frombuffer(bytearray(cpu), dtype=torch.uint8) if isinstance(cpu, bytes) else cpu)
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def state_digest(state_dict: dict[str, Any]) -> str:
    """SHA-256 of a state dict's names and tensor bytes: equal digests, bit-identical parameters."""
    digest = hashlib.sha256()
    for name, tensor in state_dict.items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def training_state(built: Any, state: Any, running_by_rank: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """Everything a run needs to continue exactly: plain state dicts, tensors and numbers only,
    so the file loads with weights_only=True.

    A data-parallel run passes every rank's `TrainState.running` (its own losses since the last
    log point): each rank resumes with its own. Everything else is the same on every rank.
    """
    from trainer import __version__

    payload = {
        "format": CHECKPOINT_FORMAT,
        "model": built.model.state_dict(),
        "optimizer": built.optimizer.state_dict(),
        "scheduler": built.scheduler.state_dict() if built.scheduler is not None else None,
        "scaler": built.scaler.state_dict() if built.scaler is not None else None,
        "train_state": state.to_dict(),
        # the data order is a pure function of these: epoch `epoch`'s permutation from `seed`,
        # resumed after `batch_in_epoch` batches; a data-parallel run shards that same permutation
        "data_order": {
            "seed": built.config.seed,
            "epoch": state.epoch,
            "batch_in_epoch": state.batch_in_epoch,
            "batch_size": built.config.data.batch_size,
            "num_samples": built.train_batches.num_samples,
            "shuffle": built.config.data.shuffle,
            "world_size": built.world_size,  # each rank's share depends on it
        },
        "rng": rng_state(),
        "config": built.config.model_dump(mode="json"),
        "versions": {"trainer": __version__, "torch": str(torch.__version__)},
    }
    if running_by_rank is not None:
        payload["running_by_rank"] = running_by_rank
    return payload


def restore(built: Any, payload: dict[str, Any], path: Path) -> Any:
    """Load a checkpoint's states into the built run; returns its TrainState. RNGs are restored last."""
    from trainer.engine import TrainState

    order = payload.get("data_order", {})
    if order.get("num_samples") not in (None, built.train_batches.num_samples):
        raise UsageError(
            f"checkpoint '{path}' was trained on {order['num_samples']} training samples, the data now gives "
            f"{built.train_batches.num_samples}: the data changed, so the data order cannot continue"
        )
    saved_world = order.get("world_size", 1)
    if saved_world != built.world_size:
        def runs(n: int) -> str:
            return "one process" if n == 1 else f"{n} processes (--nproc {n})"

        raise UsageError(
            f"checkpoint '{path}' was written by a run in {runs(saved_world)}, and this run has {runs(built.world_size)}: "
            f"each process's share of the data depends on their number; resume with {runs(saved_world)}"
        )
    try:
        built.model.load_state_dict(payload["model"])
        built.optimizer.load_state_dict(payload["optimizer"])
        if built.scheduler is not None and payload.get("scheduler") is not None:
            built.scheduler.load_state_dict(payload["scheduler"])
        if built.scaler is not None and payload.get("scaler") is not None:
            built.scaler.load_state_dict(payload["scaler"])
        state = TrainState.from_dict(payload["train_state"])
        if built.world_size > 1:
            state.running = dict(payload["running_by_rank"][built.rank])
        set_rng_state(payload["rng"])
    except (KeyError, RuntimeError, ValueError, TypeError) as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise UsageError(f"checkpoint '{path}' does not fit this config: {first}") from None
    return state


def load_checkpoint(path: Path, map_location: Any = "cpu") -> dict[str, Any]:
    """Load a checkpoint with `weights_only=True`: tensors and plain containers only, nothing executed."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"checkpoint '{path}' does not exist")
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError as err:
        raise UsageError(f"checkpoint '{path}' cannot be read: {err.strerror}") from None
    if not head:
        raise UsageError(f"checkpoint '{path}' is empty (0 bytes): not a checkpoint, or one whose writing never finished")
    if not head.startswith((b"PK", b"\x80")):  # a zip archive; or a pickle, as torch.save wrote before 1.6
        raise UsageError(f"'{path}' is not a checkpoint: torch.save writes a zip archive, and this file starts with {head!r}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # a pickled payload, a truncated zip, not a checkpoint at all
        text = re.sub(r"\x1b\[[0-9;]*m", "", str(err)).strip()  # torch's message carries terminal escapes
        first = text.splitlines()[0] if text else type(err).__name__
        if isinstance(err, pickle.UnpicklingError) and "Weights only load failed" in text:  # a refused global
            found = re.search(r"GLOBAL ([\w.]+)", text)
            first = "it holds pickled Python objects, not only tensors" + (f" ({found.group(1)})" if found else "")
        raise UsageError(f"checkpoint '{path}' cannot be loaded safely: {first}") from None
