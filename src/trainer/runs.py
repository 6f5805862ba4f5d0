"""Run folders: creating them without ever reusing one, env.json, summary.json, and one run start to end."""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Callable

from trainer import __version__, plugins
from trainer.errors import TrainingFailed, UsageError, as_stop, first_line, stop_signals

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
        foreign = sorted(p.name for p in run_dir.iterdir() if not _written_by_trainer(p.name)) if run_dir.is_dir() else []
        if foreign:  # `--run-dir /` or a home folder: trainer would write its files among someone else's
            shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
            raise UsageError(
                f"--run-dir '{run_dir}' holds files trainer did not write ({shown}); give a new or empty folder, "
                "or leave out --run-dir"
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


def _written_by_trainer(name: str) -> bool:
    """Whether a run folder's entry `name` is one trainer writes (what a run stopped early may leave)."""
    temporary = name.startswith(".") and name.endswith(".tmp")  # of write_json, left by a kill mid-write
    return name in (*RUN_FILES, "checkpoints", LOCK_FILE) or name.startswith("events.out.tfevents.") or temporary


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
    """Write strict JSON (a non-finite number as null), atomically (see `write_text`)."""
    write_text(path, json.dumps(_finite(data), indent=2, default=str, allow_nan=False) + "\n")


def write_text(path: Path, text: str) -> None:
    """Write through a temporary file, an fsync and a rename, so a reader never sees half a file
    and a disk that fails later (full, turned read-only) keeps it; a failed write leaves no temporary."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as file:
            file.write(text)
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp, path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise OSError(err.errno, err.strerror, str(path)) from None  # a failed write() names no file
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _finite(value: Any) -> Any:
    """`value` with NaN and infinities as None: strict JSON parsers refuse them."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


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
        "plugins": plugins.loaded(),  # path and SHA-256 of each: a later command on the run checks them
    }


# ---------------------------------------------------------------------------------------------
# one run, start to end


class Stopped(Exception):
    """SIGINT or SIGTERM (or SIGHUP, taken as SIGTERM) arrived; `exit_code` is 130 or 143."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.exit_code = 128 + signum


class Pruned(Exception):
    """The `on_epoch` hook of a sweep's trial asked the run to stop: it is not worth finishing."""


class StopRequests:
    """While active, SIGINT and SIGTERM ask the loop to stop after the current step (it saves
    last.pt first); a second SIGINT stops at once. SIGHUP (the terminal closed) asks as SIGTERM
    does, unless it is ignored (`nohup`).

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
        self.signum = as_stop(signum)

    def __enter__(self) -> StopRequests:
        for signum in stop_signals():
            self._previous[signum] = signal.signal(signum, self._handle)
        outer = getattr(self._previous[signal.SIGTERM], "__self__", None)
        if isinstance(outer, StopRequests) and outer.signum is not None:
            self.signum = outer.signum  # asked of an outer listener (a sweep's worker, building the trial's run)
        return self

    def __exit__(self, *exc: Any) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, signal.SIG_IGN if self.ignore_after else handler)


@dataclass
class RunResult:
    status: str  # completed | failed | interrupted | pruned
    run_dir: Path
    summary: dict[str, Any]
    error: str | None = None  # what stopped a failed or interrupted run
    exit_code: int = 0  # 0 completed, 1 failed while training, 130 SIGINT, 143 SIGTERM
    note: str | None = None  # what the user should know of a run that did nothing (already complete)


# a test aid: send this process SIGTERM (or the signal named after a colon) right after step K,
# so the tests interrupt a run at an exact step through the real signal path; `K+B` sends it B
# batches later, mid-accumulation (train.accumulate > B); `K[:SIG]@R` sends it in data-parallel
# rank R only; `K:wait` sends none but waits after step K until a signal comes from outside (a
# minute at most), so a test can signal torchrun's agents before step K+1
_STOP_AT_STEP = "TRAINER_STOP_AT_STEP"


def _injected_stop(stop: StopRequests, accumulate: int) -> Callable[[Any, bool], None]:
    """The test aid as a per-batch check of (state, between steps) (read once: the loop must not
    consult the environment each step)."""
    spec, _, rank = os.environ.get(_STOP_AT_STEP, "").partition("@")
    at, _, name = spec.partition(":")
    step, _, extra = at.partition("+")
    if not step.isdigit() or not (extra or "0").isdigit() or (rank and rank != os.environ.get("RANK", "0")):
        return lambda state, between: None
    target, batches = int(step), int(extra or 0)

    def due(state: Any, between: bool) -> bool:
        return state.step == target and (between and state.batch_in_epoch % accumulate == batches if batches else not between)

    if name == "wait":
        return lambda state, between: _wait_for_signal(stop) if due(state, between) else None
    signum = getattr(signal, name or "SIGTERM")
    return lambda state, between: os.kill(os.getpid(), signum) if due(state, between) else None


def _wait_for_signal(stop: StopRequests) -> None:
    deadline = time.monotonic() + 60
    while stop.signum is None and time.monotonic() < deadline:
        time.sleep(0.01)


class RunFolder:
    """A run folder held by a directory descriptor, which follows it if it is moved or deleted mid-run."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))

    def now(self) -> Path | None:
        """Where the folder is now: its own path, where it was moved to, or None once it is deleted."""
        held = os.fstat(self.fd)
        if held.st_nlink == 0:
            return None
        for candidate in (self.path, Path(os.readlink(f"/proc/self/fd/{self.fd}")) if os.path.isdir("/proc/self/fd") else None):
            try:
                found = os.stat(candidate) if candidate is not None else None
            except OSError:
                continue
            if found is not None and (found.st_dev, found.st_ino) == (held.st_dev, held.st_ino):
                return candidate
        return None

    def problem(self) -> str | None:
        """Why the run cannot go on writing here (moved or deleted), or None."""
        now = self.now()
        if now == self.path:
            return None
        if now is None:
            return f"the run folder '{self.path}' was deleted or moved while the run trained; its records are not where they were"
        return (
            f"the run folder '{self.path}' was moved to '{now}' while the run trained; its files up to now "
            f"are there: trainer resume {now}"
        )

    def close(self) -> None:
        os.close(self.fd)


@dataclass
class ActiveRun:
    """One run while it trains: what its named steps share."""

    built: Any
    folder: Path
    state: Any  # the loop's TrainState
    tracker: Any
    stop: StopRequests
    started: float  # perf_counter time of the command's start
    dist: Any = None  # trainer.distributed.Distributed in a data-parallel run
    resumed_from: Path | None = None
    held: RunFolder | None = None  # rank 0's hold on the folder
    checkpoints: Any = None
    fit_started: float | None = None
    digests: list[str] | None = None  # each rank's parameters at the end of a data-parallel run
    on_epoch: Callable[[Any, dict[str, float]], bool] | None = None  # a sweep's hook: True stops the run (pruned)

    @property
    def main(self) -> bool:
        """The one process that writes files and prints."""
        return self.dist is None or self.dist.is_main


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
    started: float | None = None,
    on_epoch: Callable[[Any, dict[str, float]], bool] | None = None,
) -> RunResult:
    """Build and train one config, writing its run folder (or continuing one, with `resume`).

    Bad input raises UsageError before anything is written. Once training starts, a failure
    (TrainingFailed), SIGINT or SIGTERM is recorded in summary.json and returned, not raised; any
    other exception is recorded and re-raised. The run folder is locked while this runs (see
    `lock_run_folder`). `data_dir`: where relative data paths are read from (`started_in` of the
    run folder, for a resume of it). `started`: the perf_counter time the command started at,
    which summary.json's wall_time_s counts from (default: now). `on_epoch(state, metrics)`: called
    after each epoch's validation; True stops the run after saving last.pt, with status `pruned`.
    """
    started = time.perf_counter() if started is None else started

    if resume is not None and run_dir is not None:
        raise UsageError("--run-dir and --resume do not go together: a resumed run continues in its own folder")
    with contextlib.ExitStack() as cleanup:  # the signal handlers and the folder's lock, however the run ends
        dist, device = _join_processes(config, device)
        built = _on_every_rank(dist, lambda: _build(config, device, data_dir, dist))
        # from before the run folder exists: a signal from here on stops the run after a step, with its
        # summary.json, never leaving a folder without one (building the data above stays interruptible)
        stop = cleanup.enter_context(StopRequests(ignore_after=dist is not None))
        if resume is not None:
            opened = _open_resumed(built, resume, root=root, force=force, cleanup=cleanup, dist=dist)
            if isinstance(opened, RunResult):
                return opened
            folder, state, resumed_from = opened
        else:
            folder, state, resumed_from = _open_new(built, root=root, run_dir=run_dir, cleanup=cleanup, dist=dist), None, None
        try:
            tracker = _make_tracker(built, folder, root, state, console=console, quiet=quiet, tensorboard=tensorboard, dist=dist)
            held = RunFolder(folder) if dist is None or dist.is_main else None
        except OSError as err:
            raise _cannot_set_up(folder, err, new=resume is None) from None
        if held is not None:
            cleanup.callback(held.close)
        run = ActiveRun(built, folder, state, tracker, stop, started, dist, resumed_from, held, on_epoch=on_epoch)
        return _train_and_record(run)


def _join_processes(config: Any, device: str | None) -> tuple[Any, str | None]:
    """In a data-parallel run (torchrun started this process as one rank of several): join the
    process group, and this rank's device."""
    from trainer import distributed

    dist = distributed.from_environment()
    if dist is None:
        return None, device
    import torch

    device = distributed.rank_device(device or config.device, dist)
    distributed.join(dist, torch.device(device))
    return dist, device


def _build(config: Any, device: str | None, data_dir: Path | None, dist: Any) -> Any:
    """The run's parts (this rank's share of the data), with one batch pushed through them."""
    from trainer.build import build_run, check_one_batch

    built = build_run(config, device=device, data_dir=data_dir, **({"rank": dist.rank, "world_size": dist.world_size} if dist else {}))
    check_one_batch(built)
    return built


def _on_every_rank(dist: Any, act: Callable[[], Any]) -> Any:
    """`act()` on every rank; bad input met on any rank is raised on all of them. On several
    machines one may lack what the others have (the data on its own disk): rank 0 then tells
    which rank and machine, and no rank waits for the failed one in a collective."""
    if dist is None:
        return act()
    import socket

    result, error = None, None
    try:
        result = act()
    except UsageError as err:
        error = str(err)
    failures = [(rank, host, message) for rank, (host, message) in enumerate(dist.all_gather((socket.gethostname(), error))) if message]
    if error:
        raise UsageError(error)
    if failures:
        rank, host, message = failures[0]
        raise UsageError(f"on rank {rank} (host {host}): {message}")
    return result


def _open_new(built: Any, *, root: Path, run_dir: Path | None, cleanup: contextlib.ExitStack, dist: Any) -> Path:
    """A new run folder, locked, with env.json and config.yaml."""
    folder = _shared(dist, lambda: create_run_dir(built.config.name, root=root, run_dir=run_dir))

    def write_files() -> None:
        try:
            _lock(folder, cleanup, None)
            # the run's identity: its checkpoints carry it, so a resume cannot take another run's
            write_json(folder / "env.json", {"run_id": uuid.uuid4().hex, **environment(str(built.device), built.device_reason, dist)})
            write_text(folder / "config.yaml", built.config.to_yaml())
        except OSError as err:
            raise _cannot_set_up(folder, err, new=True) from None

    _on_main(dist, write_files)
    return folder


def _open_resumed(
    built: Any, resume: str | Path, *, root: Path, force: bool, cleanup: contextlib.ExitStack, dist: Any
) -> tuple[Path, Any, Path] | RunResult:
    """The folder, training state and checkpoint of the run `resume` names, restored into `built`;
    or the result of a run that is complete already (nothing is written then)."""
    from trainer import distributed
    from trainer.checkpoint import find_checkpoint, refuse_changed_run, restore

    checkpoint, payload = find_checkpoint(resume, name=built.config.name, root=root)
    folder = checkpoint.parent.parent
    if checkpoint.parent.name != "checkpoints" or not (folder / "config.yaml").is_file():
        raise UsageError(
            f"--resume '{checkpoint}' is not inside a run folder (<run>/checkpoints/*.pt); "
            "a resumed run continues in the folder it came from"
        )
    refuse_changed_run(payload["config"], built.config.model_dump(mode="json"), checkpoint, force=force)
    _refuse_another_runs_checkpoint(payload, folder, checkpoint, force=force)

    def lock() -> None:
        try:
            _lock(folder, cleanup, None)
        except OSError as err:
            raise _cannot_set_up(folder, err, new=False) from None

    _on_main(dist, lock)
    state = restore(built, payload, checkpoint)
    if state.stopped_early and (built.settings.patience is None or state.stale_epochs < built.settings.patience):
        state.stopped_early = False  # resumed with a larger patience (or none): it trains on
    recorded = _read_json(folder / "summary.json")
    if built.settings.done(state, len(built.train_batches)) and recorded.get("status") == "completed" and recorded.get("steps") == state.step:
        # a finished run resumed again (a script that re-runs --resume auto until done): leave it as it is;
        # an interrupted one whose budget was lowered below its steps goes on, to be recorded as completed
        if dist is not None:
            distributed.leave()
        return RunResult("completed", folder, recorded, note=_nothing_to_train(folder, state, built, payload["config"]))

    def write_files() -> None:
        try:
            _note_resume(folder, checkpoint, state.step)
            write_text(folder / "config.yaml", built.config.to_yaml())
        except OSError as err:
            raise _cannot_set_up(folder, err, new=False) from None

    _on_main(dist, write_files)
    return folder, state, checkpoint


def _cannot_set_up(folder: Path, err: OSError, *, new: bool) -> UsageError:
    """A run folder the disk cannot take (full, read-only) before training: bad input. What a new
    run wrote is removed again (the folder too, unless it was a --run-dir that existed)."""
    if new:
        for entry in (p for p in folder.iterdir() if _written_by_trainer(p.name)) if folder.is_dir() else []:
            shutil.rmtree(entry) if entry.is_dir() else entry.unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            folder.rmdir()  # only if empty: a --run-dir is kept, with what was in it
    return UsageError(
        f"cannot write the run folder '{folder}': {_os_reason(err)}; free some space or choose another folder "
        "(--run-dir, or run from elsewhere)"
    )


def _os_reason(err: OSError) -> str:
    """'No space left on device (env.json)': the OS error and the file it met."""
    where = f" ({Path(err.filename).name})" if getattr(err, "filename", None) else ""
    return f"{err.strerror or err}{where}"


def _refuse_another_runs_checkpoint(payload: dict[str, Any], folder: Path, checkpoint: Path, *, force: bool) -> None:
    """A checkpoint copied in from another run of the same config would resume at its own step,
    leaving a gap or a repeat in this folder's metrics."""
    ours, theirs = _read_json(folder / "env.json").get("run_id"), payload.get("run_id")
    if ours and theirs and ours != theirs and not force:
        raise UsageError(
            f"checkpoint '{checkpoint}' belongs to another run (run id {theirs[:12]}, and '{folder}' is run {ours[:12]}): "
            "resuming it here would mix two runs' records; resume the folder it came from, or pass --force"
        )


def _make_tracker(
    built: Any, folder: Path, root: Path, state: Any, *, console: Any, quiet: bool, tensorboard: bool, dist: Any
) -> Any:
    """The run's console and metric files; the other ranks of a data-parallel run print and write nothing."""
    from trainer.tracking import Tracker

    if dist is not None and not dist.is_main:
        return Tracker(None, console=console, quiet=True, tensorboard=False, jsonl=False)
    # an explicit --run-dir is not under a runs root, so the hint names the folder itself
    logdir = Path(root) if folder.parent.parent == Path(root) else folder
    resume_step = state.step if state is not None else 0
    return Tracker(folder, console=console, quiet=quiet, tensorboard=tensorboard, tensorboard_logdir=logdir, resume_step=resume_step)


def _train_and_record(run: ActiveRun) -> RunResult:
    """Train, then record how it ended in summary.json and on the console, however it ends."""
    from trainer.engine import TrainState

    run.state = run.state or TrainState()
    ended = Ended("failed", None, 1)
    try:
        _train(run)
        ended = Ended("completed", None, 0)
    except KeyboardInterrupt:
        ended = Ended("interrupted", "stopped at once by a second SIGINT", 128 + signal.SIGINT)
    except Stopped as err:
        ended = Ended("interrupted", f"stopped by {err} after step {run.state.step}", err.exit_code)
    except Pruned:
        ended = Ended("pruned", f"pruned after epoch {run.state.epoch}", 0)
    except (TrainingFailed, UsageError) as err:  # a UsageError here: data unreadable mid-run (a corrupt image)
        ended = Ended("failed", _folder_problem(run) or str(err), 1)
    except OSError as err:  # a full or read-only disk under metrics.jsonl or TensorBoard's file
        ended = Ended("failed", _folder_problem(run) or _cannot_write_files(run, err), 1)
    except Exception as err:
        from trainer import distributed

        if run.dist is None or not distributed.lost_peer(err):
            ended = Ended("failed", f"{type(err).__name__}: {err}", 1)
            raise
        # another rank died (torchrun stops the job) or its collective failed
        ended = Ended("failed", f"another process of the run is gone: {first_line(err)}", 1)
    finally:
        summary = _record(run, ended)
    return RunResult(ended.status, run.folder, summary, ended.error, ended.exit_code)


def _folder_problem(run: ActiveRun) -> str | None:
    """A run folder moved or deleted: what the failed writes that follow come from, said plainly."""
    return run.held.problem() if run.held is not None else None


def _cannot_write_files(run: ActiveRun, err: Exception) -> str:
    if isinstance(err, OSError):
        return f"cannot write the run's files in '{run.folder}': {_os_reason(err)}"
    return str(err)


@dataclass
class Ended:
    """How a run ended."""

    status: str  # completed | failed | interrupted
    error: str | None
    exit_code: int

    def failed_to_write(self, what: str) -> None:
        """A record of the run could not be written: the run failed, and the message says which."""
        if self.error and what in self.error:
            return
        self.error = f"{self.error}; {what}" if self.error else what
        if self.status == "completed":
            self.status, self.exit_code = "failed", 1


def _train(run: ActiveRun) -> None:
    """The loop with the runner's hooks: checkpoints by time and step count, and stop requests."""
    from trainer import distributed
    from trainer.checkpoint import Checkpoints
    from trainer.engine import fit
    from trainer.errors import TrainingFailed
    from trainer.tracking import run_pictures

    built, settings, tracker, dist = run.built, run.built.settings, run.tracker, run.dist
    batches_per_epoch = len(built.train_batches)
    last_step = settings.last_step(batches_per_epoch)
    _report_start(run, last_step)
    check_folder = run.held.problem if run.held is not None else None
    checkpoints = run.checkpoints = Checkpoints(built, run.folder / "checkpoints", dist, check_folder=check_folder)
    injected_stop = _injected_stop(run.stop, settings.accumulate)

    def agreed(signum: int | None, save: bool = False) -> tuple[int | None, bool]:
        """The signal to stop on, and whether to save, agreed by all ranks (one all-reduce)."""
        if dist is None:
            return signum, save
        import torch

        both = dist.max(torch.tensor([signum or 0, int(save)], device=built.device))
        return int(both[0]) or None, bool(both[1])

    def after_batch(state: Any) -> None:
        between = settings.between_steps(state, batches_per_epoch)  # gradients accumulated, not yet stepped on
        injected_stop(state, between)
        # at an epoch's last batch (or the run's) the epoch-end hook saves, after validation
        if state.batch_in_epoch >= batches_per_epoch or state.step >= last_step:
            return
        signum = run.stop.signum
        if dist is not None:  # the ranks agree at log points only: all must stop after the same step
            signum = agreed(signum)[0] if not between and state.step % settings.log_every == 0 else None
        if signum is not None or (not between and checkpoints.due(state.step)):
            tracker.flush()  # the files hold every point up to the checkpoint
            checkpoints.save(state)
        if signum is not None:
            checkpoints.finish()
            raise Stopped(signum)

    def on_epoch_end(state: Any, metrics: dict[str, float]) -> None:
        done = settings.done(state, batches_per_epoch)
        signum, save = agreed(run.stop.signum, done or checkpoints.due())
        prune = run.on_epoch is not None and run.on_epoch(state, metrics) and not done  # the last epoch reports too
        if save or signum is not None or prune:
            tracker.flush()
        checkpoints.epoch_end(state, metrics, save=save or signum is not None or prune)
        if signum is not None and not done:
            checkpoints.finish()
            raise Stopped(signum)
        if prune:
            checkpoints.finish()
            raise Pruned()

    run.fit_started = time.perf_counter()
    fit(
        distributed.wrap(built.model, built.device) if dist is not None else built.model,  # DDP shares built.model
        built.train_batches, built.val_batches, built.loss_fn, built.optimizer, settings,
        precision=built.precision, scheduler=built.scheduler, scaler=built.scaler, tracker=tracker,
        state=run.state, after_batch=after_batch, on_epoch_end=on_epoch_end, dist=dist, ema=built.ema,
        pictures=run_pictures(built, tracker),
    )  # fmt: skip
    checkpoints.finish()
    if dist is not None:
        run.digests = _rank_digests(built, dist)
        if dist.is_main and len(set(run.digests)) > 1:
            raise TrainingFailed(
                "the processes' parameters differ at the end of training (a parameter or buffer updated "
                "outside DistributedDataParallel?); the checkpoints hold rank 0's"
            )


def _report_start(run: ActiveRun, last_step: int) -> None:
    """The console's header, and where a resumed run picks up."""
    from trainer.data import describe_data
    from trainer.models import count_parameters

    built = run.built
    run.tracker.run_started(
        name=built.config.name, run_dir=run.folder, device=str(built.device), device_reason=built.device_reason,
        model=built.config.model.name, num_params=count_parameters(built.model),
        data=f"{built.config.data.name}: {describe_data(built.info)}", epochs=built.settings.epochs,
        steps_per_epoch=built.settings.steps_per_epoch(len(built.train_batches)), total_steps=last_step,
        batch_size=built.config.data.batch_size * built.settings.accumulate,
        processes=built.world_size,
    )  # fmt: skip
    if run.state.step:
        run.tracker.message(f"resumed from {run.resumed_from} at step {run.state.step} (epoch {run.state.epoch + 1})")


def _record(run: ActiveRun, ended: Ended) -> dict[str, Any]:
    """summary.json and the console's last lines, however the run ended; returns the summary. A
    record that cannot be written (a full disk) makes `ended` a failure that says so."""
    from trainer import distributed

    if run.checkpoints is not None:
        run.checkpoints.close()
    tracker = run.tracker
    try:  # the metric files first, so summary.json tells if they could not be written
        if ended.status in ("completed", "pruned"):
            tracker.log_hparams(_hparams(run.built.config), run.state.best)
        tracker.flush()
    except (OSError, TrainingFailed) as err:  # the disk failed under them, or metrics.jsonl was deleted
        ended.failed_to_write(_cannot_write_files(run, err))
    now = time.perf_counter()
    summary = _summary(ended.status, ended.error, run.state, now - run.started, run.built)
    summary["train_time_s"] = round(now - run.fit_started, 4) if run.fit_started is not None else 0.0  # the loop alone
    if run.checkpoints is not None:  # best.pt's metric: what a sweep ranks its trials by
        summary["monitor"] = {"metric": run.checkpoints.monitor, "mode": run.checkpoints.mode, "best": _finite(run.state.best_checkpoint)}
        summary["best_epoch"] = run.state.best_epoch  # the epoch best.pt holds
        summary["stopped_early"] = run.state.stopped_early
    if run.dist is not None:
        summary["processes"] = {"world_size": run.dist.world_size, "parameters_sha256": run.digests}
    if run.main:
        _write_summary(run, summary, ended)
    try:
        tracker.finished(
            status=ended.status, run_dir=run.folder, best=summary["best"], final=summary["final"],
            steps=summary["steps"], epochs=summary["epochs"], seconds=now - run.started,
        )  # fmt: skip
        if run.state.stopped_early:
            tracker.message(_stopped_early(run))
        if ended.status == "interrupted" and (run.folder / "checkpoints" / "last.pt").exists():
            tracker.message(f"resume with: {_resume_command(run)}")
        tracker.close()
    except (OSError, TrainingFailed) as err:  # the metric files' last points, on a disk that failed under them
        ended.failed_to_write(_cannot_write_files(run, err))
        with contextlib.suppress(OSError, TrainingFailed):
            tracker.close()
    if run.dist is not None and ended.status != "failed":
        distributed.leave()  # after a failure the other ranks may be gone; torchrun ends this one
    return summary


def _stopped_early(run: ActiveRun) -> str:
    """Why early stopping ended the run, and which epoch best.pt holds."""
    state, settings = run.state, run.built.settings
    by = f" by more than {settings.min_delta:g}" if settings.min_delta else ""
    return (
        f"stopped early after epoch {state.epoch}: {settings.monitor} did not improve{by} for {plural(state.stale_epochs, 'epoch')} "
        f"(train.early_stopping.patience={settings.patience}); best.pt holds epoch {state.best_epoch}"
    )


def _resume_command(run: ActiveRun) -> str:
    """How to resume this run: with --nproc when trainer started its processes, else with the
    torchrun command that started them (on several nodes: on each)."""
    from trainer import distributed

    command = f"trainer resume {run.folder}"
    if run.dist is None:
        return command
    if distributed.started_by_nproc():
        return f"{command} --nproc {run.dist.world_size}"
    where = f"on each of its {run.dist.nodes} nodes" if run.dist.nodes > 1 else "on this machine"
    return f"{command}, started by torchrun {where} as this run was ({run.dist.world_size} processes in all)"


def _write_summary(run: ActiveRun, summary: dict[str, Any], ended: Ended) -> None:
    """summary.json, in the run folder wherever it was moved to; a failure is told, not raised."""
    folder = run.held.now() if run.held is not None else run.folder
    try:
        if folder is None:
            raise FileNotFoundError(errno.ENOENT, "the run folder is gone")
        write_json(folder / "summary.json", summary)
    except OSError as err:
        ended.failed_to_write(f"summary.json could not be written: {_os_reason(err)}")
        summary.update(status=ended.status, error=ended.error)


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


def _nothing_to_train(folder: Path, state: Any, built: Any, saved_config: dict[str, Any]) -> str:
    """What a resume of a finished run says: nothing was done, and a command that trains on."""
    from trainer.checkpoint import SCHEDULE_LENGTHS, flatten

    train, settings = built.config.train, built.settings
    if state.stopped_early:
        return (
            f"nothing to train: the run in '{folder}' stopped early after epoch {state.epoch} ({settings.monitor} did not "
            f"improve for {plural(state.stale_epochs, 'epoch')}); its files are unchanged. To train on, resume with a "
            f"larger patience: trainer resume {folder} train.early_stopping.patience={2 * (settings.patience or 1)}"
        )
    given = [f"train.{k}={v}" for k, v in (("epochs", train.epochs), ("max_steps", train.max_steps)) if v is not None]
    budget = ", ".join(given) or f"train.epochs={settings.epochs}, the default"
    # every limit the run has reached must grow; without train.epochs the epochs follow max_steps
    epochs = train.epochs if train.epochs is not None else (settings.epochs if train.max_steps is None else None)
    larger = []
    if settings.max_steps is not None and state.step >= settings.max_steps:
        larger.append(f"train.max_steps={2 * settings.max_steps}")
    if epochs is not None and state.epoch >= epochs:
        larger.append(f"train.epochs={2 * epochs}")
    done = (
        f"nothing to train: the run in '{folder}' is complete ({plural(state.epoch, 'epoch')}, "
        f"{plural(state.step, 'step')}; {budget}); its files are unchanged."
    )
    saved = flatten(saved_config.get("scheduler") or {}, "scheduler")
    fixed = [k for k in SCHEDULE_LENGTHS if k in saved]
    if not fixed:
        return f"{done} To train on, resume with a larger budget: trainer resume {folder} {' '.join(larger)}"
    # the restored schedule keeps its length: a longer run needs a new schedule, so a new run
    length = f"{fixed[0]}={saved[fixed[0]]}"
    longer = f"{fixed[0]}={2 * saved[fixed[0]]}"  # the budget doubles, and with it the schedule's steps
    return (
        f"{done} Its learning-rate schedule ({length}) ended with the run, so a resume cannot train on; "
        f"to train longer, start a new run: trainer run {folder / 'config.yaml'} {' '.join(larger)} {longer}"
    )


def plural(count: int, noun: str) -> str:
    """'1 epoch', '2 epochs'."""
    return f"{count:,} {noun}" + ("" if count == 1 else "s")


def _shared(dist: Any, make: Callable[[], Path]) -> Path:
    """`make()` on rank 0, its result on every rank; an error there is raised on every rank."""
    if dist is None:
        return make()
    made = _on_main(dist, make)
    return Path(dist.broadcast(str(made) if made is not None else ""))


def _on_main(dist: Any, act: Callable[[], Any]) -> Any:
    """`act()` on rank 0 (None on the others); a UsageError there is raised on every rank."""
    if dist is None:
        return act()
    result, error = None, None
    try:
        result = act() if dist.is_main else None
    except UsageError as err:
        error = str(err)
    error = dist.broadcast(error)
    if error:
        raise UsageError(error)
    return result


def _rank_digests(built: Any, dist: Any) -> list[str] | None:
    """Each rank's SHA-256 of its model state (on rank 0; None elsewhere), which summary.json records.

    DDP keeps the ranks' parameters equal, and the epoch end syncs the buffers; a module that
    breaks that would have rank 0's copy saved silently. One gather at the end of the run tells.
    """
    from trainer.checkpoint import state_digest

    return dist.gather(state_digest(built.model.state_dict()))


# ---------------------------------------------------------------------------------------------
# evaluating a saved model


def evaluate_checkpoint(target: Path, *, split: str = "val", which: str | None = None, device: str | None = None) -> dict[str, Any]:
    """Metrics of a saved model on one split of its own config's data.

    `target` is a checkpoint file or a run folder (then best.pt, or last.pt with which="last").
    `split`: "val" (the held-out split; for MNIST that is the test split), "test" (the same), or "train".
    """
    from trainer.engine import evaluate

    if split not in ("val", "test", "train"):
        raise UsageError(f"unknown split '{split}'; accepted: val, test, train", key="--split")
    trained = load_trained(target, which=which, device=device)
    built = trained.built
    batches = built.train_batches if split == "train" else built.val_batches
    if batches is None or len(batches) == 0:
        raise UsageError("the run has no validation split (data.val_fraction is 0); try --split train", key="--split")
    metrics = evaluate(
        built.model, batches, built.loss_fn, precision=built.precision, classification=built.settings.classification
    )
    step = trained.payload.get("train_state", {}).get("step")
    return {"checkpoint": str(trained.path), "split": split, "step": step, "samples": batches.num_samples, **metrics}


@dataclass
class Trained:
    """A saved model, loaded: its checkpoint file, the checkpoint's contents, and its run built again
    from the config inside (model with the saved weights, data, loss)."""

    path: Path
    payload: dict[str, Any]
    built: Any


def checkpoint_of(target: Path, which: str | None = None) -> Path:
    """The checkpoint `target` names: a checkpoint file, or a run folder's best.pt (else last.pt;
    `which` = "best" or "last" picks one)."""
    target = Path(target)
    if target.is_dir():
        folder = target / "checkpoints" if (target / "checkpoints").is_dir() else target
        names = [f"{which}.pt"] if which else ["best.pt", "last.pt"]
        found = [folder / n for n in names if (folder / n).is_file()]
        if not found:
            raise UsageError(f"'{target}' holds no {' or '.join(names)}; give a run folder or a checkpoint file")
        return found[0]
    if which:
        raise UsageError("--best and --last pick a checkpoint in a run folder; give the folder, not a file")
    if not target.exists():
        raise UsageError(f"'{target}' does not exist; give a run folder or a checkpoint file")
    return target


def load_trained(target: Path, *, which: str | None = None, device: str | None = None) -> Trained:
    """The model saved in `target` (see `checkpoint_of`), built with its run's config and data."""
    from trainer.build import build_run
    from trainer.checkpoint import served_weights, trainer_checkpoint
    from trainer.config import ConfigError, config_from_dict

    path = checkpoint_of(target, which)
    payload = trainer_checkpoint(path)
    try:
        config = config_from_dict(payload["config"], source=f"the config inside {path}", training=False)
    except (KeyError, ConfigError) as err:
        raise UsageError(f"checkpoint '{path}' has no usable config: {err}") from None
    built = build_run(config, device=device, data_dir=started_in(path.parent.parent), training=False)
    try:
        built.model.load_state_dict(served_weights(payload))
    except (KeyError, RuntimeError) as err:
        raise UsageError(f"checkpoint '{path}' does not fit its model: {str(err).splitlines()[0]}") from None
    return Trained(path, payload, built)


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
    from trainer.checkpoint import flatten

    flat = flatten(config.model_dump(mode="json"))
    return {k: str(v) if isinstance(v, list) else v for k, v in flat.items()}
