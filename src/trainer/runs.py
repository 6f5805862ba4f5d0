"""Run folders: creating them without ever reusing one, env.json, summary.json, and one run start to end."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Callable

from trainer import __version__
from trainer.errors import TrainingFailed, UsageError, first_line

RUN_FILES = ("config.yaml", "summary.json", "metrics.jsonl", "env.json")


def create_run_dir(name: str, *, root: Path = Path("runs"), run_dir: Path | None = None) -> Path:
    """A new folder for a run: `run_dir` exactly, or `root/<name>/<YYYYmmdd-HHMMSS>` (suffixed -2, -3... if taken).

    An explicit `run_dir` may exist only if it is empty of run files; a run never writes over another.
    """
    if run_dir is not None:
        run_dir = Path(run_dir)
        if run_dir.exists() and not run_dir.is_dir():
            raise UsageError(f"--run-dir '{run_dir}' is a file, not a folder")
        taken = [f for f in RUN_FILES if (run_dir / f).exists()] + (["checkpoints/"] if (run_dir / "checkpoints").exists() else [])
        if taken:
            raise UsageError(
                f"--run-dir '{run_dir}' already holds a run ({', '.join(taken)}); choose a new folder or leave out --run-dir"
            )
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise UsageError(f"cannot create --run-dir '{run_dir}': {err.strerror}") from None
        return run_dir
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    parent = Path(root) / name
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UsageError(f"cannot create the run folder under '{parent}': {err.strerror}") from None
    for attempt in range(1, 1000):
        candidate = parent / (stamp if attempt == 1 else f"{stamp}-{attempt}")
        try:
            candidate.mkdir()  # atomic: fails if another run took the name first
            return candidate
        except FileExistsError:
            continue
        except OSError as err:
            raise UsageError(f"cannot create the run folder under '{parent}': {err.strerror}") from None
    raise UsageError(f"cannot find a free run folder name under '{parent}'")


LOCK_FILE = ".lock"


def lock_run_folder(folder: Path) -> int | None:
    """Hold `folder`'s lock until the returned descriptor is closed (or the process ends, however it
    ends): a second trainer process writing into the same run folder is refused. Also the first
    write into the folder, so a folder this process cannot write to is refused here, before training.
    None where the platform has no fcntl (Windows): no lock there.

    A POSIX record lock (lockf), not flock: a flock belongs to the open file, which forked children
    (DataLoader workers) share, so after a SIGKILL they kept the folder locked until they noticed
    their parent was gone. A record lock belongs to this process alone. (It is also released when
    this process closes any descriptor of the file: nothing else here opens it.)
    """
    try:
        import fcntl
    except ImportError:
        return None
    path = Path(folder) / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as err:
        raise UsageError(f"cannot write in the run folder '{folder}': {err.strerror}; choose a folder you can write to") from None
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise UsageError(
            f"the run folder '{folder}' is in use by another trainer process (pid {holder}); "
            "wait for it to finish or stop it, then run this again"
        ) from None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd


def started_in(folder: Path) -> Path | None:
    """The working folder a run was started in (env.json's `cwd`), if it still exists: the folder its
    config's relative data paths are read from when the run is resumed or evaluated from elsewhere."""
    cwd = _read_json(Path(folder) / "env.json").get("cwd")
    return Path(cwd) if isinstance(cwd, str) and Path(cwd).is_dir() else None


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Write JSON through a temporary file and a rename, so a reader never sees half a file."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def environment(device: str, device_reason: str, dist: Any = None) -> dict[str, Any]:
    """What env.json records: command line, versions, device, git commit, and the processes of a
    data-parallel run."""
    import torch

    processes = {"world_size": dist.world_size, "backend": "nccl" if device.startswith("cuda") else "gloo"} if dist else None
    return {
        "command": sys.argv,
        "cwd": os.getcwd(),
        "started": datetime.now().astimezone().isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "trainer": __version__,
        "cuda": torch.version.cuda,
        "device": device,
        "device_reason": device_reason,
        "git_commit": _git_commit(),
        "distributed": processes,
    }


# ---------------------------------------------------------------------------------------------
# one run, start to end


class Stopped(Exception):
    """SIGINT or SIGTERM arrived; `exit_code` is 130 or 143."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.exit_code = 128 + signum


class StopRequests:
    """While active, SIGINT and SIGTERM ask the loop to stop after the current step (it saves
    last.pt first); a second SIGINT stops at once.

    `ignore_after`: once the run is over, ignore both instead of restoring the old handlers. Under
    torchrun, a rank that exits first (stopped, or failed) makes torchrun SIGTERM the others; a
    rank past its run must still report, and rank 0 write the exit code `--nproc` returns.
    torchrun's SIGKILL after its shutdown timeout still ends a rank that hangs.
    """

    def __init__(self, ignore_after: bool = False) -> None:
        self.signum: int | None = None
        self.ignore_after = ignore_after
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum

    def __enter__(self) -> StopRequests:
        for signum in (signal.SIGINT, signal.SIGTERM):
            self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, signal.SIG_IGN if self.ignore_after else handler)


@dataclass
class RunResult:
    status: str  # completed | failed | interrupted
    run_dir: Path
    summary: dict[str, Any]
    error: str | None = None  # what stopped a failed or interrupted run
    exit_code: int = 0  # 0 completed, 1 failed while training, 130 SIGINT, 143 SIGTERM
    note: str | None = None  # what the user should know of a run that did nothing (already complete)


# a test aid: send this process SIGTERM (or the signal named after a colon) right after step K,
# so the tests interrupt a run at an exact step through the real signal path; `K[:SIG]@R` sends
# it in data-parallel rank R only
_STOP_AT_STEP = "TRAINER_STOP_AT_STEP"


def _injected_stop() -> Callable[[int], None]:
    """The test aid as a per-step check (read once: the loop must not consult the environment each step)."""
    spec, _, rank = os.environ.get(_STOP_AT_STEP, "").partition("@")
    at, _, name = spec.partition(":")
    if not at.isdigit() or (rank and rank != os.environ.get("RANK", "0")):
        return lambda step: None
    target, signum = int(at), getattr(signal, name or "SIGTERM")
    return lambda step: os.kill(os.getpid(), signum) if step == target else None


def execute_run(
    config: Any,
    *,
    run_dir: Path | None = None,
    root: Path = Path("runs"),
    device: str | None = None,
    quiet: bool = False,
    console: Any = None,
    resume: str | Path | None = None,
    force: bool = False,
    tensorboard: bool = True,
    data_dir: Path | None = None,
) -> RunResult:
    """Build and train one config, writing its run folder (or continuing one, with `resume`).

    The run folder is locked while this runs (see `lock_run_folder`), however it ends. `data_dir`:
    where relative data paths are read from (`started_in` of the run folder, for a resume of it).
    """
    with contextlib.ExitStack() as cleanup:  # the signal handlers and the folder's lock, however the run ends
        return _execute_run(
            config, cleanup, run_dir=run_dir, root=root, device=device, quiet=quiet, console=console,
            resume=resume, force=force, tensorboard=tensorboard, data_dir=data_dir,
        )  # fmt: skip


def _execute_run(
    config: Any,
    cleanup: contextlib.ExitStack,
    *,
    run_dir: Path | None,
    root: Path,
    device: str | None,
    quiet: bool,
    console: Any,
    resume: str | Path | None,
    force: bool,
    tensorboard: bool,
    data_dir: Path | None,
) -> RunResult:
    """execute_run's body; what must be undone at its end goes on `cleanup`.

    Bad input raises UsageError before anything is written. Once training starts, a failure
    (TrainingFailed), SIGINT or SIGTERM is recorded in summary.json and returned, not raised;
    any other exception is recorded and re-raised.
    """
    from trainer.build import build_run, check_one_batch
    from trainer.checkpoint import restore
    from trainer.data import describe_data
    from trainer.engine import TrainState, fit
    from trainer.models import count_parameters
    from trainer.tracking import Tracker

    from trainer import distributed

    # a data-parallel run: torchrun started this process as one rank of several
    dist = distributed.from_environment()
    if dist is not None:
        import torch

        device = distributed.rank_device(device or config.device, dist)
        distributed.join(dist, torch.device(device))
    ranks = {"rank": dist.rank, "world_size": dist.world_size} if dist else {}
    built = build_run(config, device=device, data_dir=data_dir, **ranks)
    check_one_batch(built)
    main = dist is None or dist.is_main  # the one process that writes files and prints
    # from before the run folder exists: a signal from here on stops the run after a step, with its
    # summary.json, never leaving a folder without one (building the data above stays interruptible)
    stop = cleanup.enter_context(StopRequests(ignore_after=dist is not None))
    checkpoint = None
    if resume is not None:
        if run_dir is not None:
            raise UsageError("--run-dir and --resume do not go together: a resumed run continues in its own folder")
        checkpoint, payload = find_checkpoint(resume, name=built.config.name, root=root)
        folder = checkpoint.parent.parent
        if checkpoint.parent.name != "checkpoints" or not (folder / "config.yaml").is_file():
            raise UsageError(
                f"--resume '{checkpoint}' is not inside a run folder (<run>/checkpoints/*.pt); "
                "a resumed run continues in the folder it came from"
            )
        refuse_changed_run(payload["config"], built.config.model_dump(mode="json"), checkpoint, force=force)
        _lock(folder, cleanup, dist)
        state = restore(built, payload, checkpoint)
        recorded = _read_json(folder / "summary.json")
        if built.settings.done(state, len(built.train_batches)) and recorded.get("status") == "completed" and recorded.get("steps") == state.step:
            # a finished run resumed again (a script that re-runs --resume auto until done): leave it as it is;
            # an interrupted one whose budget was lowered below its steps goes on, to be recorded as completed
            if dist is not None:
                distributed.leave()
            return RunResult("completed", folder, recorded, note=_nothing_to_train(folder, state, built))
        if main:
            _note_resume(folder, checkpoint, state.step)
    else:
        folder = _shared(dist, lambda: create_run_dir(built.config.name, root=root, run_dir=run_dir))
        _lock(folder, cleanup, dist)
        if main:
            write_json(folder / "env.json", environment(str(built.device), built.device_reason, dist))
        state = TrainState()
    if main:
        (folder / "config.yaml").write_text(built.config.to_yaml(), encoding="utf-8")
    # the model the loop trains: DDP averages the gradients; checkpoints save built.model, which it shares
    model = distributed.wrap(built.model, built.device) if dist is not None else built.model

    settings = built.settings
    steps_per_epoch = len(built.train_batches)
    last_step = settings.last_step(steps_per_epoch)
    status, error, exit_code = "failed", None, 1
    started = time.perf_counter()
    # an explicit --run-dir is not under a runs root, so the hint names the folder itself
    logdir = Path(root) if folder.parent.parent == Path(root) else folder
    if main:
        tracker = Tracker(
            folder, console=console, quiet=quiet, tensorboard=tensorboard, tensorboard_logdir=logdir, resume_step=state.step
        )
    else:  # the other ranks print nothing and write no files
        tracker = Tracker(None, console=console, quiet=True, tensorboard=False, jsonl=False)
    fit_started, train_seconds = None, 0.0
    digests: list[str] | None = None  # each rank's parameters at the end of a data-parallel run
    checkpoints = None
    try:
        tracker.run_started(
            name=built.config.name,
            run_dir=folder,
            device=str(built.device),
            device_reason=built.device_reason,
            model=built.config.model.name,
            num_params=count_parameters(built.model),
            data=f"{built.config.data.name}: {describe_data(built.info)}",
            epochs=settings.epochs,
            steps_per_epoch=steps_per_epoch,
            total_steps=last_step,
            batch_size=built.config.data.batch_size,
            processes=built.world_size,
        )
        if state.step:
            tracker.message(f"resumed from {checkpoint} at step {state.step} (epoch {state.epoch + 1})")
        checkpoints = Checkpoints(built, folder / "checkpoints", dist)
        injected_stop = _injected_stop()
        every = built.config.train.checkpoint_every or 0  # read once: after_step runs every step
        log_every = settings.log_every

        def stop_signal(state: TrainState, at_epoch_end: bool = False) -> int | None:
            """The signal to stop on, agreed by all ranks at log points and epoch ends."""
            if dist is None:
                return stop.signum
            if at_epoch_end or state.step % log_every == 0 or state.step >= last_step:
                return dist.max_int(stop.signum or 0, built.device) or None
            return None  # between log points a rank goes on: all must stop after the same step

        def after_step(state: TrainState) -> None:
            injected_stop(state.step)
            signum = stop_signal(state)
            # at an epoch's last batch (or the run's) the epoch-end hook below saves, after validation
            if state.batch_in_epoch >= steps_per_epoch or state.step >= last_step:
                return
            if signum is not None or (every and state.step % every == 0):
                tracker.flush()  # the files hold every point up to the checkpoint (epoch ends flush anyway)
                checkpoints.save(state)
            if signum is not None:
                checkpoints.finish()
                raise Stopped(signum)

        def on_epoch_end(state: TrainState, improved: set[str]) -> None:
            is_best = checkpoints.record_best(state)  # first, so last.pt carries the new best value
            checkpoints.save(state, best=is_best)
            signum = stop_signal(state, at_epoch_end=True)
            if signum is not None and state.step < last_step:
                checkpoints.finish()
                raise Stopped(signum)

        fit_started = time.perf_counter()
        fit(
            model, built.train_batches, built.val_batches, built.loss_fn, built.optimizer, settings,
            precision=built.precision, scheduler=built.scheduler, scaler=built.scaler, tracker=tracker,
            state=state, after_step=after_step, on_epoch_end=on_epoch_end, dist=dist,
        )  # fmt: skip
        checkpoints.finish()
        if dist is not None:
            digests = _rank_digests(built, dist)
            if dist.is_main and len(set(digests)) > 1:
                raise TrainingFailed(
                    "the processes' parameters differ at the end of training (a parameter or buffer updated "
                    "outside DistributedDataParallel?); the checkpoints hold rank 0's"
                )
        train_seconds = time.perf_counter() - fit_started
        status, exit_code = "completed", 0
    except KeyboardInterrupt:
        status, error, exit_code = "interrupted", "stopped at once by a second SIGINT", 128 + signal.SIGINT
    except Stopped as err:
        status, error, exit_code = "interrupted", f"stopped by {err} after step {state.step}", err.exit_code
    except (TrainingFailed, UsageError) as err:  # a UsageError here: data unreadable mid-run (a corrupt image)
        status, error = "failed", str(err)
    except Exception as err:
        if dist is not None and distributed.lost_peer(err):
            # another rank died (torchrun stops the job) or its collective failed
            status, error = "failed", f"another process of the run is gone: {first_line(err)}"
        else:
            error = f"{type(err).__name__}: {err}"
            raise
    finally:
        if checkpoints is not None:
            checkpoints.close()
        seconds = time.perf_counter() - started
        if fit_started is not None and status != "completed":
            train_seconds = time.perf_counter() - fit_started  # stopped or failed: the loop until now
        summary = _summary(status, error, state, seconds, built)
        summary["train_time_s"] = round(train_seconds, 4)  # the loop alone: epochs, validation, checkpoints
        if dist is not None:
            summary["processes"] = {"world_size": dist.world_size, "parameters_sha256": digests}
        if main:
            write_json(folder / "summary.json", summary)
        if status == "completed":
            tracker.log_hparams(_hparams(built.config), {f"best/{k}": v for k, v in summary["best"].items()})
        tracker.finished(
            status=status, run_dir=folder, best=summary["best"], final=summary["final"],
            steps=summary["steps"], epochs=summary["epochs"], seconds=seconds,
        )  # fmt: skip
        if status == "interrupted" and (folder / "checkpoints" / "last.pt").exists():
            nproc = f" --nproc {built.world_size}" if dist is not None else ""
            tracker.message(f"resume with: trainer resume {folder}{nproc}")
        tracker.close()
        if dist is not None and status != "failed":
            distributed.leave()  # after a failure the other ranks may be gone; torchrun ends this one
    return RunResult(status, folder, summary, error, exit_code)


def _lock(folder: Path, cleanup: contextlib.ExitStack, dist: Any) -> None:
    """Lock the run folder (rank 0 does, for all ranks) until `cleanup` closes; a refusal is raised on every rank."""

    def take() -> Path:
        fd = lock_run_folder(folder)
        if fd is not None:
            cleanup.callback(os.close, fd)
        return folder

    _shared(dist, take)


def _read_json(path: Path) -> dict[str, Any]:
    """A run folder's JSON file (env.json, summary.json) as a dict; {} when it is missing or not one."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _nothing_to_train(folder: Path, state: Any, built: Any) -> str:
    """What a resume of a finished run says: nothing was done, and the budget that trains on."""
    train, settings = built.config.train, built.settings
    given = [f"train.{k}={v}" for k, v in (("epochs", train.epochs), ("max_steps", train.max_steps)) if v is not None]
    budget = ", ".join(given) or f"train.epochs={settings.epochs}, the default"
    # every limit the run has reached must grow; without train.epochs the epochs follow max_steps
    epochs = train.epochs if train.epochs is not None else (settings.epochs if train.max_steps is None else None)
    larger = []
    if settings.max_steps is not None and state.step >= settings.max_steps:
        larger.append(f"train.max_steps={2 * settings.max_steps}")
    if epochs is not None and state.epoch >= epochs:
        larger.append(f"train.epochs={2 * epochs}")
    return (
        f"nothing to train: the run in '{folder}' is complete ({state.epoch} epochs, {state.step} steps; {budget}); "
        f"its files are unchanged. To train on, resume with a larger budget: trainer resume {folder} {' '.join(larger)}"
    )


def _shared(dist: Any, make: Callable[[], Path]) -> Path:
    """`make()` on rank 0, its result on every rank; an error there is raised on every rank."""
    if dist is None:
        return make()
    result: Path | str
    try:
        result = make() if dist.is_main else ""
    except UsageError as err:
        result = f"error:{err}"
    result = dist.broadcast(str(result))
    if result.startswith("error:"):
        raise UsageError(result[len("error:") :])
    return Path(result)


def _rank_digests(built: Any, dist: Any) -> list[str] | None:
    """Each rank's SHA-256 of its model state (on rank 0; None elsewhere), which summary.json records.

    DDP keeps the ranks' parameters equal, and the epoch end syncs the buffers; a module that
    breaks that would have rank 0's copy saved silently. One gather at the end of the run tells.
    """
    from trainer.checkpoint import state_digest

    return dist.gather(state_digest(built.model.state_dict()))


class Checkpoints:
    """last.pt and best.pt of one run; a save never leaves a NaN state or a half-written file behind.

    In a data-parallel run every rank calls each save at the same step; rank 0 writes the file.
    """

    def __init__(self, built: Any, folder: Path, dist: Any = None) -> None:
        self.built = built
        self.folder = folder
        self.dist = dist
        self.main = dist is None or dist.is_main
        train = built.config.train
        # by default the val loss decides, or the train loss without validation (build_run refuses
        # an explicit val_* monitor then)
        self.monitor = train.monitor or ("val_loss" if built.val_batches is not None else "train_loss")
        self.mode = train.mode or ("max" if "accuracy" in self.monitor else "min")
        from trainer.checkpoint import BackgroundWrites

        self.writes = BackgroundWrites()
        # a process killed mid-save (SIGKILL, power loss) leaves its temporary file; only one run writes here
        for stale in folder.glob(".*.pt.*.tmp") if folder.is_dir() and self.main else []:
            stale.unlink(missing_ok=True)

    def save(self, state: Any, *, best: bool = False) -> None:
        """Save last.pt (and best.pt, the same state); the wait for the disk goes on in the background.

        An error of the previous save's background part stops the run here, or in `finish`.
        """
        from trainer.engine import check_finite

        check_finite(state.running, self.dist)  # a non-finite loss must not overwrite the last good checkpoint
        running_by_rank = None
        if self.dist is not None:
            running_by_rank = self.dist.gather(_on_cpu(state.running))
        error = self._write(state, running_by_rank, best) if self.main else None
        self._raise(error)

    def _write(self, state: Any, running_by_rank: list[dict[str, Any]] | None, best: bool) -> str | None:
        """Write the files (their fsync and rename in the background); why they cannot be, or None."""
        from trainer.checkpoint import commit, link_or_copy, serialize, stage, training_state

        error = self.writes.wait()  # the previous save is on disk before this one starts: at most one in flight
        if error is not None:
            return _cannot_write(*error)
        last = self.folder / "last.pt"
        try:
            staged = stage(serialize(training_state(self.built, state, running_by_rank)), last)
        except (OSError, RuntimeError) as err:  # torch's zip writer reports a full disk as a RuntimeError
            return _cannot_write(last, err)
        # with best.pt, the folder's fsync comes once, after both renames
        self.writes.submit(last, commit, staged, sync_folder=not best)
        if best:  # best.pt is this same state: a second name for last.pt's new file
            self.writes.submit(self.folder / "best.pt", link_or_copy, last, self.folder / "best.pt")
        return None

    def finish(self) -> None:
        """Wait until every checkpoint asked for is on disk; stop the run if one could not be written.
        In a data-parallel run every rank calls it."""
        error = self.writes.wait() if self.main else None
        self._raise(_cannot_write(*error) if error is not None else None)

    def close(self) -> None:
        """Wait for the writes in flight (after a failure elsewhere: their own errors are not news)."""
        self.writes.close()

    def _raise(self, error: str | None) -> None:
        if self.dist is not None:
            error = self.dist.broadcast(error)  # every rank stops if rank 0 could not write
        if error:
            raise TrainingFailed(error)

    def record_best(self, state: Any) -> bool:
        """Whether this epoch's monitored metric is the best so far; if so, remember its value."""
        value = state.history[-1].get(self.monitor)
        if value is None:
            return False
        best = state.best_checkpoint
        if best is None or (value > best if self.mode == "max" else value < best):
            state.best_checkpoint = value
            return True
        return False


def _cannot_write(path: Path, err: Exception) -> str:
    reason = getattr(err, "strerror", None) or first_line(err)
    return f"cannot write checkpoint '{path}': {reason}; the previous one is intact"


# ---------------------------------------------------------------------------------------------
# evaluating a saved model


def evaluate_checkpoint(target: Path, *, split: str = "val", which: str | None = None, device: str | None = None) -> dict[str, Any]:
    """Metrics of a saved model on one split of its own config's data.

    `target` is a checkpoint file or a run folder (then best.pt, or last.pt with which="last").
    `split`: "val" (the held-out split; for MNIST that is the test split), "test" (the same), or "train".
    """
    from trainer.build import build_run
    from trainer.config import ConfigError, config_from_dict
    from trainer.engine import evaluate

    target = Path(target)
    if target.is_dir():
        folder = target / "checkpoints" if (target / "checkpoints").is_dir() else target
        names = [f"{which}.pt"] if which else ["best.pt", "last.pt"]
        found = [folder / n for n in names if (folder / n).is_file()]
        if not found:
            raise UsageError(f"'{target}' holds no {' or '.join(names)}; give a run folder or a checkpoint file")
        path = found[0]
    elif which:
        raise UsageError("--best and --last pick a checkpoint in a run folder; give the folder, not a file")
    else:
        path = target
    payload = _trainer_checkpoint(path)
    if split not in ("val", "test", "train"):
        raise UsageError(f"unknown split '{split}'; accepted: val, test, train", key="--split")
    try:
        config = config_from_dict(payload["config"], source=f"the config inside {path}")
    except (KeyError, ConfigError) as err:
        raise UsageError(f"checkpoint '{path}' has no usable config: {err}") from None
    built = build_run(config, device=device, data_dir=started_in(path.parent.parent))
    try:
        built.model.load_state_dict(payload["model"])
    except (KeyError, RuntimeError) as err:
        raise UsageError(f"checkpoint '{path}' does not fit its model: {str(err).splitlines()[0]}") from None
    batches = built.train_batches if split == "train" else built.val_batches
    if batches is None or len(batches) == 0:
        raise UsageError(f"the run has no validation split (data.val_fraction is 0); try --split train", key="--split")
    metrics = evaluate(
        built.model, batches, built.loss_fn, precision=built.precision, classification=built.settings.classification
    )
    step = payload.get("train_state", {}).get("step")
    return {"checkpoint": str(path), "split": split, "step": step, "samples": batches.num_samples, **metrics}


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
        return spec_path, _trainer_checkpoint(spec_path)
    else:
        raise UsageError(f"--resume '{spec}' does not exist; give a checkpoint file, a run folder or auto")
    skipped = []
    for candidate in candidates:
        try:
            return candidate, _trainer_checkpoint(candidate)
        except UsageError as err:
            skipped.append(str(err))
    detail = "".join(f"\n  skipped: {s}" for s in skipped)
    raise UsageError(f"no checkpoint that loads {where}{detail}")


def _trainer_checkpoint(path: Path) -> dict[str, Any]:
    """A checkpoint of a format this version of trainer reads (any .pt that loads is not one)."""
    from trainer.checkpoint import CHECKPOINT_FORMAT, READABLE_FORMATS, load_checkpoint

    payload = load_checkpoint(path)
    found = payload.get("format") if isinstance(payload, dict) else None
    if not isinstance(payload, dict) or found is None or "config" not in payload:
        raise UsageError(
            f"checkpoint '{path}' is not a trainer checkpoint (no format number and config in it); "
            "give the last.pt or best.pt of a trainer run"
        )
    if found not in READABLE_FORMATS:
        readable = " or ".join(map(str, READABLE_FORMATS))
        newer = isinstance(found, int) and found > CHECKPOINT_FORMAT
        advice = "it was written by a newer trainer: upgrade trainer to read it" if newer else "no version of trainer wrote it"
        raise UsageError(f"checkpoint '{path}' has format {found!r}, and this version reads format {readable}; {advice}")
    return payload


def _on_cpu(running: dict[str, Any]) -> dict[str, Any]:
    """A rank's `TrainState.running` with its tensors on the CPU, to gather into rank 0's checkpoint."""
    out: dict[str, Any] = {}
    for key, value in running.items():
        if isinstance(value, list):
            out[key] = [v.detach().cpu() for v in value]
        else:
            out[key] = value.detach().cpu() if hasattr(value, "detach") else value
    return out


def _recency(path: Path) -> tuple[float, bool]:
    # best.pt is often a hard link to last.pt, with the same mtime: name last.pt, the resumed file
    return path.stat().st_mtime, path.name == "last.pt"


# the parts of a config that make a resumed run a different run; a longer budget does not, except
# for a schedule whose length was fixed from the old budget (its restored state keeps that length)
_RUN_DEFINING = ("seed", "model", "data", "loss", "optimizer", "scheduler", "precision")
_SCHEDULE_LENGTHS = ("scheduler.T_max", "scheduler.total_steps", "scheduler.total_iters")


def refuse_changed_run(saved: dict[str, Any], current: dict[str, Any], checkpoint: Path, *, force: bool) -> None:
    """Raise UsageError listing what differs in what defines the run, unless `force`.

    The optimizer's and scheduler's restored states would silently override a changed lr or
    schedule, so those count as differences too.
    """
    old, new = _flatten({k: saved.get(k) for k in _RUN_DEFINING}), _flatten({k: current.get(k) for k in _RUN_DEFINING})
    differences = []
    for key in sorted(set(old) | set(new)):
        if old.get(key) != new.get(key):
            differences.append(f"{key}: {old.get(key, '(not set)')!r} in the checkpoint, {new.get(key, '(not set)')!r} now")
    budget = ("epochs", "max_steps")
    old_budget = {k: (saved.get("train") or {}).get(k) for k in budget}
    new_budget = {k: (current.get("train") or {}).get(k) for k in budget}
    fixed = [k for k in _SCHEDULE_LENGTHS if k in old]
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


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """{'a': {'b': 1}} -> {'a.b': 1}; lists stay values."""
    if not isinstance(value, dict):
        return {prefix: value}
    flat: dict[str, Any] = {}
    for key, inner in value.items():
        flat.update(_flatten(inner, f"{prefix}.{key}" if prefix else str(key)))
    return flat


def _note_resume(folder: Path, checkpoint: Path, step: int) -> None:
    """Record the resume in env.json next to the original command."""
    path = folder / "env.json"
    env = _read_json(path)
    env.setdefault("resumes", []).append(
        {"command": sys.argv, "from": str(checkpoint), "step": step, "time": datetime.now().astimezone().isoformat(timespec="seconds")}
    )
    write_json(path, env)


def _summary(status: str, error: str | None, state: Any, seconds: float, built: Any) -> dict[str, Any]:
    final = {} if state.train_loss is None else {"train_loss": state.train_loss}
    final.update({f"val_{k}": v for k, v in state.val.items()})
    return {
        "status": status,
        "error": error,
        "final": final,
        "best": dict(state.best),
        "steps": state.step,
        "epochs": state.epoch,
        "wall_time_s": round(seconds, 3),
        "device": str(built.device),
    }


def _hparams(config: Any) -> dict[str, Any]:
    """Flat `section.key` hyperparameters for TensorBoard's HParams tab (lists as text)."""
    flat = _flatten(config.model_dump(mode="json"))
    return {k: str(v) if isinstance(v, list) else v for k, v in flat.items()}
