"""Run folders: creating them without ever reusing one, env.json, summary.json, and one run start to end."""

from __future__ import annotations

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
from typing import Any

from trainer import __version__
from trainer.errors import TrainingFailed, UsageError

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
    raise UsageError(f"cannot find a free run folder name under '{parent}'")


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


def environment(device: str, device_reason: str) -> dict[str, Any]:
    """What env.json records: command line, versions, device, git commit."""
    import torch

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
    }


# ---------------------------------------------------------------------------------------------
# one run, start to end


class Stopped(Exception):
    """SIGINT or SIGTERM arrived; `exit_code` is 130 or 143."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.exit_code = 128 + signum


@dataclass
class RunResult:
    status: str  # completed | failed | interrupted
    run_dir: Path
    summary: dict[str, Any]
    error: str | None = None  # what stopped a failed or interrupted run
    exit_code: int = 0  # 0 completed, 1 failed while training, 130 SIGINT, 143 SIGTERM


def _raise_stopped(signum: int, frame: Any) -> None:
    raise Stopped(signum)


def execute_run(
    config: Any,
    *,
    run_dir: Path | None = None,
    root: Path = Path("runs"),
    device: str | None = None,
    quiet: bool = False,
    console: Any = None,
) -> RunResult:
    """Build and train one config, writing its run folder.

    Bad input raises UsageError before the folder exists. Once training starts, a failure
    (TrainingFailed), SIGINT or SIGTERM is recorded in summary.json and returned, not raised;
    any other exception is recorded and re-raised.
    """
    from trainer.build import build_run, check_one_batch
    from trainer.checkpoint import atomic_save, training_state
    from trainer.data import describe_data
    from trainer.engine import TrainState, fit
    from trainer.models import count_parameters
    from trainer.tracking import Tracker

    built = build_run(config, device=device)
    check_one_batch(built)
    folder = create_run_dir(built.config.name, root=root, run_dir=run_dir)
    (folder / "config.yaml").write_text(built.config.to_yaml(), encoding="utf-8")
    write_json(folder / "env.json", environment(str(built.device), built.device_reason))

    settings = built.settings
    state = TrainState()
    status, error, exit_code = "failed", None, 1
    started = time.perf_counter()
    previous = signal.signal(signal.SIGTERM, _raise_stopped)
    # an explicit --run-dir is not under a runs root, so the hint names the folder itself
    logdir = folder if run_dir is not None else Path(root)
    tracker = Tracker(folder, console=console, quiet=quiet, tensorboard_logdir=logdir)
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
            steps_per_epoch=len(built.train_batches),
            total_steps=settings.last_step(len(built.train_batches)),
            batch_size=built.config.data.batch_size,
        )

        def save_checkpoints(state: TrainState, improved: bool) -> None:
            payload = training_state(built, state)
            atomic_save(payload, folder / "checkpoints" / "last.pt")
            if improved:
                atomic_save(payload, folder / "checkpoints" / "best.pt")

        fit(
            built.model, built.train_batches, built.val_batches, built.loss_fn, built.optimizer, settings,
            precision=built.precision, scheduler=built.scheduler, tracker=tracker, state=state,
            on_epoch_end=save_checkpoints,
        )  # fmt: skip
        status, exit_code = "completed", 0
    except KeyboardInterrupt:
        status, error, exit_code = "interrupted", "stopped by SIGINT", 128 + signal.SIGINT
    except Stopped as err:
        status, error, exit_code = "interrupted", f"stopped by {err}", err.exit_code
    except TrainingFailed as err:
        status, error = "failed", str(err)
    except Exception as err:
        error = f"{type(err).__name__}: {err}"
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)
        seconds = time.perf_counter() - started
        summary = _summary(status, error, state, seconds, built)
        write_json(folder / "summary.json", summary)
        if status == "completed":
            tracker.log_hparams(_hparams(built.config), {f"best/{k}": v for k, v in summary["best"].items()})
        tracker.finished(
            status=status, run_dir=folder, best=summary["best"], final=summary["final"],
            steps=summary["steps"], epochs=summary["epochs"], seconds=seconds,
        )  # fmt: skip
        tracker.close()
    return RunResult(status, folder, summary, error, exit_code)


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
    """Flat `section.key` hyperparameters for TensorBoard's HParams tab."""
    flat: dict[str, Any] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else k, v)
        elif isinstance(value, list):
            flat[prefix] = str(value)
        else:
            flat[prefix] = value

    walk("", config.model_dump(mode="json"))
    return flat
