"""Checkpoints: atomic save (temp file, fsync, rename, fsync the folder), with the waits for the disk
on a background thread, and safe load (weights_only)."""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import random
import re
import shutil
import struct
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from trainer.errors import TrainingFailed, UsageError, first_line

CHECKPOINT_FORMAT = 3  # bumped when the layout of the dict changes (3: no history; the pending losses as one sum)
# not bumped for `preprocess` (what predict needs of the data): a key added that every reader may
# ignore; a file without it (formats 1-3 of before) is still read, and predict rebuilds it from the data
READABLE_FORMATS = (1, 2, 3)  # what this version loads: an older trainer refuses a newer file by its number


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
    path = Path(path)  # its folder must exist: a run folder deleted mid-run is not made again here
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


def discard(staged: StagedFile) -> None:
    """Drop a staged file that will not be committed."""
    os.close(staged.fd)
    staged.tmp.unlink(missing_ok=True)


def atomic_save(obj: Any, path: Path) -> None:
    """torch.save `obj` to `path` so that a crash leaves either the old file or the new one, never half of one."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
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


def capture_torch_rng() -> tuple[Any, Any]:
    """torch's generator states as they come (copies, ~2 us): the CPU's, and CUDA's once it is in use."""
    # a run that never used CUDA has no CUDA generator state to keep (and is_available() costs ~15 us)
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    return torch.get_rng_state(), cuda


def rng_state(torch_captured: tuple[Any, Any] | None = None) -> dict[str, Any]:
    """Every random number generator the run draws from, as bytes and plain values; torch's as
    `torch_captured` earlier, when given (Python's and NumPy's are read now: NumPy's costs ~80 us)."""
    py_version, py_state, py_gauss = random.getstate()
    numpy_state = np.random.get_state()
    torch_state, cuda = torch_captured or capture_torch_rng()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = numpy_state
    # bytes, not tensors or 625 ints: torch.save calls back into Python once per pickled object
    # and writes a zip record per tensor
    state = {
        "python": [py_version, struct.pack(f"<{len(py_state)}I", *py_state), py_gauss],
        "numpy": [np_name, np_keys.astype("<u4").tobytes(), np_pos, np_has_gauss, np_gauss],
        "torch": torch_state.numpy().tobytes(),
    }
    if cuda is not None:
        state["cuda"] = cuda
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


def training_state(
    built: Any, state: Any, running_by_rank: list[dict[str, Any]] | None = None, config: dict[str, Any] | None = None,
    rng: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Everything a run needs to continue exactly: plain state dicts, tensors and numbers only,
    so the file loads with weights_only=True.

    `config`: `built.config` as JSON, when the caller keeps it (it does not change during a run);
    `rng`: what `rng_state` gave, when the caller took it earlier.
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
        "ema": built.ema.state_dict() if built.ema is not None else None,
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
        "rng": rng if rng is not None else rng_state(),
        "config": config if config is not None else built.config.model_dump(mode="json"),
        # how new inputs become samples like the data's (trainer.data.preprocessing): predict needs no training data
        "preprocess": getattr(getattr(built, "info", None), "preprocess", None),
        "versions": {"trainer": __version__, "torch": str(torch.__version__)},
    }
    if running_by_rank is not None:
        payload["running_by_rank"] = running_by_rank
    if built.settings.between_steps(state, len(built.train_batches)):  # mid-accumulation: the gradients so far
        payload["grads"] = [p.grad for p in built.model.parameters()]
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
        if built.ema is not None and payload.get("ema") is not None:
            built.ema.load_state_dict(payload["ema"])
        for param, grad in zip(built.model.parameters(), payload.get("grads") or []):
            param.grad = grad.to(param.device) if grad is not None else None
        state = TrainState.from_dict(payload["train_state"])
        if built.world_size > 1:
            state.running = dict(payload["running_by_rank"][built.rank])
        set_rng_state(payload["rng"])
    except (KeyError, RuntimeError, ValueError, TypeError) as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise UsageError(f"checkpoint '{path}' does not fit this config: {first}") from None
    return state


def served_weights(payload: dict[str, Any]) -> dict[str, Any]:
    """The weights a checkpoint's model is used with (eval, predict, export): the averaged ones of a
    run with train.ema, which validation chose best.pt by; else the trained ones."""
    averaged = payload.get("ema")
    if not averaged:
        return payload["model"]
    return {key[len("module.") :]: value for key, value in averaged.items() if key.startswith("module.")}


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


class Checkpoints:
    """last.pt and best.pt of one run, saved by time; a save never leaves a NaN state or a
    half-written file behind.

    An epoch end saves when `train.checkpoint_interval_s` seconds have passed since the last save
    (0: every epoch end); the runner also saves at the run's end, on SIGINT/SIGTERM and every
    `train.checkpoint_every` steps. An epoch that is the best so far but not saved at once is kept
    as a copy in memory, and written as best.pt by the next save. In a data-parallel run every rank
    calls each method at the same step; rank 0 writes the files.
    """

    def __init__(self, built: Any, folder: Path, dist: Any = None, check_folder: Callable[[], str | None] | None = None) -> None:
        self.built, self.folder, self.dist = built, folder, dist
        self.check_folder = check_folder  # on rank 0 before each save: why the run folder cannot be written to, or None
        self.main = dist is None or dist.is_main
        train = built.config.train
        self.monitor, self.mode = built.settings.monitor, built.settings.mode
        self.interval_s = train.checkpoint_interval_s
        self.every_steps = train.checkpoint_every or 0
        self.config = built.config.model_dump(mode="json")
        self.run_id = _read_run_id(folder.parent / "env.json") if self.main else None
        self.last_saved = time.monotonic()  # the run's start (or resume) counts as a save
        self.best_copy: dict[str, Any] | None = None  # the best epoch's state, when it was not saved at once
        self.spare: dict[str, Any] | None = None  # a written best copy, whose tensors the next one is copied into
        self.writes = BackgroundWrites()
        if self.main:
            folder.mkdir(exist_ok=True)
        # a process killed mid-save (SIGKILL, power loss) leaves its temporary file; only one run writes here
        for stale in folder.glob(".*.pt.*.tmp") if self.main else []:
            stale.unlink(missing_ok=True)

    def due(self, step: int | None = None) -> bool:
        """Whether a save is due: at an epoch end (`step` None) by time, within an epoch by step count."""
        if step is not None:
            return bool(self.every_steps) and step % self.every_steps == 0
        return time.monotonic() - self.last_saved >= self.interval_s

    def epoch_end(self, state: Any, metrics: dict[str, float], *, save: bool) -> None:
        """Record the epoch's monitored metric; save last.pt (and best.pt) if `save`, else keep a
        copy of a new best epoch for the next save."""
        is_best = state.best_epoch == state.epoch  # the loop's watch_monitor
        if save:
            self.save(state, best=is_best)
        elif is_best:
            self.best_copy = self._copy(state)

    def save(self, state: Any, *, best: bool = False) -> None:
        """Save last.pt, and best.pt: this same state if `best`, else a best epoch kept since the
        last save. The wait for the disk goes on in the background; an error of the previous
        save's background part stops the run here, or in `finish`."""
        from trainer.engine import check_finite

        check_finite(state.running, self.dist)  # a non-finite loss must not overwrite the last good checkpoint
        payload = self._payload(state)
        error = self._write(payload, best) if self.main else None
        self.last_saved = time.monotonic()
        self.best_copy, self.spare = None, self.best_copy or self.spare  # its tensors are reused by the next copy
        self._raise(error)

    def _payload(self, state: Any, rng: dict[str, Any] | None = None) -> dict[str, Any]:
        running_by_rank = self.dist.gather(_on_cpu(state.running)) if self.dist is not None else None
        payload = training_state(self.built, state, running_by_rank, self.config, rng)
        payload["run_id"] = self.run_id  # env.json's: a resume refuses another run's checkpoint
        return payload

    def _copy(self, state: Any) -> dict[str, Any]:
        """This epoch's checkpoint, copied so training cannot change it, into the tensors of the
        previous copy. It runs at every new best epoch, which may be every epoch, so it copies only
        what is the live objects' own (training_state builds the rest anew) and takes torch's
        generator state; Python's and NumPy's are read when the copy is written."""
        payload = self._payload(state, rng={})
        previous = self.best_copy or self.spare or {}
        payload["model"] = _copied(payload["model"], into=previous.get("model"))
        optimizer = payload["optimizer"]  # its param_groups are built anew; its state is the live one
        payload["optimizer"] = {**optimizer, "state": _copied(optimizer["state"], into=previous.get("optimizer", {}).get("state"))}
        payload["ema"] = _copied(payload["ema"], into=previous.get("ema"))
        payload["scheduler"], payload["scaler"] = _copied(payload["scheduler"]), _copied(payload["scaler"])
        payload["rng"] = capture_torch_rng()
        return payload

    def _kept_best(self) -> dict[str, Any]:
        return {**self.best_copy, "rng": rng_state(self.best_copy["rng"])}

    def _write(self, payload: dict[str, Any], best: bool) -> str | None:
        """Write the files (their fsync and rename in the background); why they cannot be, or None."""
        error = self.writes.wait()  # the previous save is on disk before this one starts: at most one in flight
        moved = self.check_folder() if self.check_folder is not None else None
        if moved:  # what the writes met, said plainly
            return moved
        if error is not None:
            return _cannot_write(*error)
        last, best_path = self.folder / "last.pt", self.folder / "best.pt"
        staged = kept = None
        try:
            staged = stage(serialize(payload), last)
            if self.best_copy is not None and not best:
                kept = stage(serialize(self._kept_best()), best_path)
        except (OSError, RuntimeError) as err:  # torch's zip writer reports a full disk as a RuntimeError
            if staged is not None:
                discard(staged)
            return _cannot_write(best_path if staged is not None else last, err)
        # with best.pt, the folder's fsync comes once, after both renames
        self.writes.submit(last, commit, staged, sync_folder=not (best or kept))
        if best:  # best.pt is this same state: a second name for last.pt's new file
            self.writes.submit(best_path, link_or_copy, last, best_path)
        elif kept is not None:
            self.writes.submit(best_path, commit, kept)
        return None

    def finish(self) -> None:
        """Wait until every checkpoint asked for is on disk; stop the run if one could not be written.
        In a data-parallel run every rank calls it."""
        error = self.writes.wait() if self.main else None
        moved = self.check_folder() if error is not None and self.check_folder is not None else None
        self._raise(moved or (_cannot_write(*error) if error is not None else None))

    def close(self) -> None:
        """Wait for the writes in flight (after a failure elsewhere: their own errors are not news)."""
        self.writes.close()

    def _raise(self, error: str | None) -> None:
        if self.dist is not None:
            error = self.dist.broadcast(error)  # every rank stops if rank 0 could not write
        if error:
            raise TrainingFailed(error)


def _read_run_id(env_json: Path) -> str | None:
    try:
        return json.loads(env_json.read_text(encoding="utf-8")).get("run_id")
    except (OSError, ValueError, AttributeError):
        return None  # a folder of an earlier version, or a damaged env.json: checkpoints without an id


def _copied(payload: Any, into: Any = None) -> Any:
    """`payload` with every container and tensor copied: what training changes next cannot reach it.
    Tensors are copied into those of an earlier copy `into` where they match: no new memory each epoch."""
    if isinstance(payload, torch.Tensor):
        if isinstance(into, torch.Tensor) and into.shape == payload.shape and into.dtype == payload.dtype and into.device == payload.device:
            return into.copy_(payload)
        return payload.detach().clone()
    if isinstance(payload, dict):
        old = into if isinstance(into, dict) else {}
        return type(payload)((k, _copied(v, into=old.get(k))) for k, v in payload.items())
    if isinstance(payload, (list, tuple)):
        old = into if isinstance(into, (list, tuple)) and len(into) == len(payload) else [None] * len(payload)
        return type(payload)(_copied(v, into=o) for v, o in zip(payload, old))
    return payload


def _cannot_write(path: Path, err: Exception) -> str:
    reason = getattr(err, "strerror", None) or first_line(err)
    return f"cannot write checkpoint '{path}': {reason}"


def _on_cpu(running: dict[str, Any]) -> dict[str, Any]:
    """A rank's `TrainState.running` with its tensors on the CPU, to gather into rank 0's checkpoint."""
    return {k: v.detach().cpu() if isinstance(v, torch.Tensor) else v for k, v in running.items()}


# ---------------------------------------------------------------------------------------------
# resuming


def find_checkpoint(spec: str | Path, *, name: str, root: Path) -> tuple[Path, dict[str, Any]]:
    """The checkpoint `--resume` names (a file, a run folder, or `auto`) and its contents.

    `auto` and a run folder pick the newest checkpoint that loads, skipping corrupt ones.
    """
    spec_path = Path(spec)
    if str(spec) == "auto":
        candidates = sorted(Path(root).glob(f"{name}/*/checkpoints/*.pt"), key=_recency, reverse=True)
        where = f"under {Path(root) / name}"
    elif spec_path.is_dir():
        folder = spec_path / "checkpoints" if (spec_path / "checkpoints").is_dir() else spec_path
        candidates = sorted(folder.glob("*.pt"), key=_recency, reverse=True)
        where = f"in {folder}"
    elif spec_path.exists():
        return spec_path, trainer_checkpoint(spec_path)
    else:
        raise UsageError(f"--resume '{spec}' does not exist; give a checkpoint file, a run folder or auto")
    skipped = []
    for candidate in candidates:
        try:
            return candidate, trainer_checkpoint(candidate)
        except UsageError as err:
            skipped.append(str(err))
    detail = "".join(f"\n  skipped: {s}" for s in skipped)
    raise UsageError(f"no checkpoint that loads {where}{detail}")


def trainer_checkpoint(path: Path) -> dict[str, Any]:
    """A checkpoint of a format this version of trainer reads (any .pt that loads is not one)."""
    payload = load_checkpoint(path)
    found = payload.get("format") if isinstance(payload, dict) else None
    if not isinstance(payload, dict) or found is None or "config" not in payload:
        raise UsageError(
            f"checkpoint '{path}' is not a trainer checkpoint (no format number and config in it); "
            "give the last.pt or best.pt of a trainer run"
        )
    if found not in READABLE_FORMATS:
        readable = ", ".join(map(str, READABLE_FORMATS[:-1])) + f" or {READABLE_FORMATS[-1]}"
        newer = isinstance(found, int) and found > CHECKPOINT_FORMAT
        advice = "it was written by a newer trainer: upgrade trainer to read it" if newer else "no version of trainer wrote it"
        raise UsageError(f"checkpoint '{path}' has format {found!r}, and this version reads format {readable}; {advice}")
    return payload


def _recency(path: Path) -> tuple[bool, float]:
    # last.pt first: best.pt may be an older epoch written at the same save, or a hard link to last.pt
    return path.name == "last.pt", path.stat().st_mtime


# the parts of a config that make a resumed run a different run; a longer budget does not, except
# for a schedule whose length was fixed from the old budget (its restored state keeps that length)
_RUN_DEFINING = ("seed", "model", "data", "loss", "optimizer", "scheduler", "precision")
SCHEDULE_LENGTHS = ("scheduler.T_max", "scheduler.total_steps", "scheduler.total_iters")


def refuse_changed_run(saved: dict[str, Any], current: dict[str, Any], checkpoint: Path, *, force: bool) -> None:
    """Raise UsageError listing what differs in what defines the run, unless `force`.

    The optimizer's and scheduler's restored states would silently override a changed lr or
    schedule, so those count as differences too.
    """
    old, new = _run_defining(saved), _run_defining(current)
    differences = []
    for key in sorted(set(old) | set(new)):
        if old.get(key) != new.get(key):
            differences.append(f"{key}: {old.get(key, '(not set)')!r} in the checkpoint, {new.get(key, '(not set)')!r} now")
    budget = ("epochs", "max_steps")
    old_budget = {k: (saved.get("train") or {}).get(k) for k in budget}
    new_budget = {k: (current.get("train") or {}).get(k) for k in budget}
    fixed = [k for k in SCHEDULE_LENGTHS if k in old]
    if old_budget != new_budget and fixed and not differences:
        differences.append(
            f"train budget {old_budget} in the checkpoint, {new_budget} now: the scheduler's "
            f"{fixed[0].split('.')[1]}={old[fixed[0]]} was fixed from the old budget and would not follow"
        )
    if differences and not force:
        listed = "".join(f"\n  {d}" for d in differences)
        raise UsageError(
            f"the config differs from the one checkpoint '{checkpoint}' was trained with:{listed}\n"
            "resuming would not continue the same run; pass --force to resume anyway"
        )


def _run_defining(config: dict[str, Any]) -> dict[str, Any]:
    """What defines a run, flat: its sections, and the training options that change what a step is
    (an accumulation's gradients, the averaged weights); the budget and early stopping may change."""
    train = config.get("train") or {}
    return {
        **flatten({k: config.get(k) for k in _RUN_DEFINING}),
        "train.accumulate": train.get("accumulate", 1),  # checkpoints from before these options had neither
        **flatten({"train.ema": train.get("ema")}),
    }


def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """{'a': {'b': 1}} -> {'a.b': 1}; lists stay values."""
    if not isinstance(value, dict):
        return {prefix: value}
    flat: dict[str, Any] = {}
    for key, inner in value.items():
        flat.update(flatten(inner, f"{prefix}.{key}" if prefix else str(key)))
    return flat


