"""Run folders, env.json, summary.json, and stopping a run with real signals."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from conftest import start_run, tiny_config, trainer_executable
from test_cli import in_process
from trainer.config import config_from_dict
from trainer.errors import UsageError
from trainer.runs import create_run_dir, environment, evaluate_checkpoint, execute_run, started_in


@pytest.fixture
def cli_in_process(tmp_path):
    """The `cli` fixture's calls, run in this process (see test_cli.in_process): for the runs a test
    only sets up, and for calls of a path that a console-script call beside them covers. Each saves a
    process start and a torch import, ~5 s of CPU."""

    def run(*args, cwd: Path | None = None):
        return in_process(*args, cwd=cwd or tmp_path)

    return run


def test_run_folders_are_name_then_timestamp_and_never_reused(tmp_path):
    first = create_run_dir("exp", root=tmp_path)
    second = create_run_dir("exp", root=tmp_path)  # same second: a suffix, not the same folder
    assert first.parent == second.parent == tmp_path / "exp"
    assert first != second and first.is_dir() and second.is_dir()
    assert len(first.name) == len("YYYYmmdd-HHMMSS")


def test_explicit_run_dir_may_be_new_or_empty_but_not_used(tmp_path):
    assert create_run_dir("x", run_dir=tmp_path / "new") == tmp_path / "new"
    empty = tmp_path / "empty"
    empty.mkdir()
    assert create_run_dir("x", run_dir=empty) == empty
    (empty / "summary.json").write_text("{}")
    with pytest.raises(UsageError, match="already holds a run"):
        create_run_dir("x", run_dir=empty)
    (tmp_path / "file").write_text("")
    with pytest.raises(UsageError, match="is a file"):
        create_run_dir("x", run_dir=tmp_path / "file")


def test_environment_records_versions_and_device():
    env = environment("cpu", "requested in the config")
    assert {"command", "python", "torch", "trainer", "device", "device_reason", "git_commit"} <= set(env)


def test_execute_run_writes_a_complete_folder(tmp_path):
    result = execute_run(config_from_dict(tiny_config()), root=tmp_path, quiet=True)
    assert result.status == "completed" and result.exit_code == 0
    summary = json.loads((result.run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["steps"] == 2 * 4 and summary["epochs"] == 2
    assert {"train_loss", "val_loss"} <= set(summary["final"]) and summary["wall_time_s"] > 0


def test_every_checkpoint_save_fsyncs_the_folder_once_after_its_renames(tmp_path, monkeypatch):
    # an epoch-end save that makes best.pt too renames last.pt, links best.pt, then fsyncs the
    # folder: one fsync for both, and none of them left without one
    import stat

    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        if stat.S_ISDIR(os.fstat(fd).st_mode) and os.readlink(f"/proc/self/fd/{fd}").endswith("checkpoints"):
            events.append("fsync folder")
        real_fsync(fd)

    def replace(src, dst):
        if Path(dst).parent.name == "checkpoints":
            events.append(f"rename {Path(dst).name}")
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    train = {"epochs": 4, "log_every": 2, "checkpoint_interval_s": 0}  # every epoch end saves
    config = config_from_dict(tiny_config(train=train, optimizer={"name": "sgd", "lr": 0.05}))
    result = execute_run(config, root=tmp_path, quiet=True)
    assert result.status == "completed"
    saves = " ".join(events).replace("fsync folder", "fsync folder |").split(" |")[:-1]
    assert len(saves) == 4 and " ".join(saves).count("rename last.pt") == 4
    assert {save.strip() for save in saves} <= {"rename last.pt fsync folder", "rename last.pt rename best.pt fsync folder"}
    assert "rename best.pt" in saves[0]  # the first epoch is the best so far


def test_a_failed_run_records_failed_and_keeps_the_last_good_checkpoint(tmp_path):
    # lr 1e6 diverges in the first epoch: no epoch ended well, so no checkpoint either
    config = config_from_dict(tiny_config(optimizer={"name": "sgd", "lr": 1e6}, train={"epochs": 5, "log_every": 1}))
    result = execute_run(config, root=tmp_path, quiet=True)
    assert result.status == "failed" and result.exit_code == 1 and "grad_clip" in result.error
    assert json.loads((result.run_dir / "summary.json").read_text())["status"] == "failed"


@pytest.mark.parametrize("signum,code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_stops_the_run_cleanly_and_resume_completes(cli, tmp_path, signum, code):
    # (one run for what were two tests: the stop, then what the checkpoint it saved resumes to)
    proc, run_dir = start_run(tmp_path)
    os.kill(proc.pid, signum)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == code, stderr
    assert "Traceback" not in stdout + stderr
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "interrupted" and summary["steps"] > 0
    assert 0 < summary["train_time_s"] <= summary["wall_time_s"]  # the loop ran until the signal
    assert stdout.strip().splitlines()[-1] == str(run_dir)
    # mid-epoch: it saved, and says how to resume
    assert "trainer resume" in stdout + stderr  # the console says how to resume
    saved = torch_load(run_dir / "checkpoints" / "last.pt")
    assert saved["train_state"]["step"] == summary["steps"]  # the checkpoint is the step it stopped after
    stale = run_dir / "checkpoints" / ".last.pt.abc123.tmp"  # what a SIGKILL mid-save leaves
    stale.write_bytes(b"partial")
    resumed = cli("resume", run_dir, "train.epochs=4", "-q")
    assert resumed.code == 0, resumed.output
    assert not stale.exists()
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "completed"


def test_a_closed_terminal_stops_the_run_as_sigterm_does(tmp_path):
    import pty
    import select

    config = tmp_path / "long.yaml"
    config.write_text(yaml.safe_dump(tiny_config(train={"epochs": 100000, "log_every": 1, "checkpoint_interval_s": 0})))
    folder = tmp_path / "run"
    trainer = trainer_executable()
    pid, terminal = pty.fork()  # the run's own session, with the pseudo-terminal as its controlling terminal
    if pid == 0:  # pragma: no cover - the child becomes the run
        try:
            os.chdir(tmp_path)
            os.execve(trainer, [trainer, "run", str(config), "--run-dir", str(folder)], {**os.environ, "OMP_NUM_THREADS": "1"})
        finally:
            os._exit(127)  # never a second pytest
    waited = (0, 0)
    try:
        shown = b""
        deadline = time.monotonic() + 120
        while not (folder / "checkpoints" / "last.pt").exists():  # reading what it shows, so it never waits on the terminal
            assert time.monotonic() < deadline, shown.decode(errors="replace")
            if select.select([terminal], [], [], 0.05)[0]:
                shown += os.read(terminal, 65536)
        assert b"epoch" in shown  # the live console, on a terminal
        os.close(terminal)  # the terminal goes away: the kernel sends the run SIGHUP, and its writes fail from now on
        while (waited := os.waitpid(pid, os.WNOHANG))[0] == 0:
            assert time.monotonic() < deadline, "the run went on after its terminal closed"
            time.sleep(0.05)
    finally:
        if waited[0] == 0:  # a failed check: the 100,000-epoch run must not outlive the test
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(waited[1]) == 143  # as SIGTERM: it saved and stopped
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["status"] == "interrupted" and summary["error"].startswith("stopped by SIGTERM after step ")
    assert torch_load(folder / "checkpoints" / "last.pt")["train_state"]["step"] == summary["steps"]


def test_under_nohup_a_closed_terminal_leaves_the_run_training(tmp_path):
    previous = signal.signal(signal.SIGHUP, signal.SIG_IGN)  # as nohup starts it: the run inherits the ignore
    try:
        proc, run_dir = start_run(tmp_path)
    finally:
        signal.signal(signal.SIGHUP, previous)
    try:
        proc.send_signal(signal.SIGHUP)
        wait_for_saves(run_dir / "checkpoints" / "last.pt", 3, alive=proc)  # a run taking it as a stop saves once and ends
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=60)
    finally:
        proc.kill()  # the 100,000-epoch run never outlives a failed check
    assert proc.returncode == 143, stderr
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "interrupted"


def test_a_signal_just_after_the_run_folder_is_made_still_leaves_a_summary(tmp_path, monkeypatch):
    import trainer.runs

    make = trainer.runs.create_run_dir

    def make_then_sigterm(*args, **kwargs):
        folder = make(*args, **kwargs)
        os.kill(os.getpid(), signal.SIGTERM)  # the real signal, before env.json, config.yaml or the tracker exist
        return folder

    monkeypatch.setattr(trainer.runs, "create_run_dir", make_then_sigterm)
    handler = signal.getsignal(signal.SIGTERM)
    result = execute_run(config_from_dict(tiny_config()), root=tmp_path, quiet=True)
    assert (result.status, result.exit_code) == ("interrupted", 143)
    summary = json.loads((result.run_dir / "summary.json").read_text())
    assert summary["status"] == "interrupted" and summary["steps"] == 1  # the step it was on, then a save
    assert (result.run_dir / "checkpoints" / "last.pt").is_file()
    assert signal.getsignal(signal.SIGTERM) == handler  # the one from before the run is put back


def test_a_run_folder_in_use_is_refused_to_a_second_process(cli, cli_in_process, tmp_path):
    proc, run_dir = start_run(tmp_path)
    try:
        refused = cli("resume", run_dir, "train.epochs=200000")
    finally:
        os.kill(proc.pid, signal.SIGKILL)  # no clean-up runs: the kernel drops the lock with the process
        proc.communicate(timeout=60)
    assert refused.code == 2, refused.output
    assert refused.stderr.strip().splitlines() == [
        f"error: the run folder '{run_dir}' is in use by another trainer process (pid {proc.pid}); "
        "wait for it to finish or stop it, then run this again"
    ]
    assert "resumes" not in json.loads((run_dir / "env.json").read_text())  # the refused resume wrote nothing
    resumed = cli_in_process("resume", run_dir, "train.epochs=1", "train.max_steps=1000", "-q")
    assert resumed.code == 0, resumed.output


def test_the_lock_goes_with_its_process_not_with_the_children_it_forked(tmp_path):
    import sys

    from trainer.runs import lock_run_folder

    holder = subprocess.Popen(
        [sys.executable, "-c", (
            "import os, sys, time\n"
            "from trainer.runs import lock_run_folder\n"
            "lock_run_folder(sys.argv[1])\n"
            "child = os.fork()  # as a DataLoader worker is forked while a run holds its folder\n"
            "if child == 0:\n"
            "    time.sleep(60); os._exit(0)\n"
            "print(child, flush=True)\n"
            "time.sleep(60)\n"
        ), str(tmp_path)],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    child = int(holder.stdout.readline())
    try:
        with pytest.raises(UsageError, match=f"in use by another trainer process \\(pid {holder.pid}\\)"):
            lock_run_folder(tmp_path)
        holder.kill()  # SIGKILL: its child lives on
        holder.wait()
        fd = lock_run_folder(tmp_path)  # at once, while the child still runs
        assert fd is not None
        os.close(fd)
    finally:
        os.kill(child, signal.SIGKILL)
        holder.kill()


def test_without_fcntl_there_is_no_lock_and_no_lock_file(tmp_path, monkeypatch):
    import sys

    from trainer.runs import lock_run_folder

    monkeypatch.setitem(sys.modules, "fcntl", None)  # as on Windows: the import fails
    assert lock_run_folder(tmp_path) is None
    assert not (tmp_path / ".lock").exists()


def test_a_runs_root_that_cannot_be_written_is_refused(tmp_path):
    parent = tmp_path / "runs" / "x"
    parent.mkdir(parents=True)
    _make_read_only(parent)
    try:
        with pytest.raises(UsageError, match=f"cannot create the run folder under '{parent}'"):
            create_run_dir("x", root=tmp_path / "runs")
    finally:
        subprocess.run(["chattr", "-i", str(parent)], capture_output=True)
        parent.chmod(0o755)


def test_nothing_to_train_names_the_default_budget_when_none_is_given():
    from types import SimpleNamespace

    from trainer.engine import LoopSettings, TrainState
    from trainer.runs import _nothing_to_train

    built = SimpleNamespace(config=SimpleNamespace(train=SimpleNamespace(epochs=None, max_steps=None)), settings=LoopSettings(epochs=10))
    note = _nothing_to_train(Path("run"), TrainState(step=40, epoch=10), built, {})
    assert "(10 epochs, 40 steps; train.epochs=10, the default)" in note
    assert note.endswith("trainer resume run train.epochs=20")


def test_a_run_folder_that_cannot_be_written_is_refused_before_training(tmp_path):
    folder = tmp_path / "run"
    (folder / ".lock").mkdir(parents=True)  # what the lock file would be cannot be opened for writing
    with pytest.raises(UsageError, match=f"cannot write in the run folder '{folder}'"):
        execute_run(config_from_dict(tiny_config()), run_dir=folder, quiet=True)
    assert sorted(p.name for p in folder.iterdir()) == [".lock"]


def test_resuming_a_complete_run_trains_nothing_and_changes_no_file(cli, cli_in_process, tmp_path, write_config, tiny):
    config = write_config(tiny(train={"epochs": 2}))
    folder = tmp_path / "run"
    assert cli_in_process("run", config, "--run-dir", folder, "-q").code == 0
    before = {p.name: p.read_bytes() for p in folder.rglob("*") if p.is_file() and p.name != ".lock"}
    again = cli("resume", folder)
    assert again.code == 0, again.output
    assert again.stdout.strip() == str(folder)
    assert again.stderr.strip() == (
        f"nothing to train: the run in '{folder}' is complete (2 epochs, 8 steps; train.epochs=2); its files are "
        f"unchanged. To train on, resume with a larger budget: trainer resume {folder} train.epochs=4"
    )
    assert {p.name: p.read_bytes() for p in folder.rglob("*") if p.is_file() and p.name != ".lock"} == before
    longer = cli_in_process("resume", folder, "train.epochs=3", "-q")
    assert longer.code == 0, longer.output
    assert json.loads((folder / "summary.json").read_text())["epochs"] == 3


@pytest.mark.parametrize("scheduler", [None, {"name": "cosine"}], ids=["no-schedule", "cosine"])
def test_the_command_a_complete_run_suggests_works_as_printed(cli, cli_in_process, tmp_path, write_config, tiny, scheduler):
    import shlex

    config = write_config(tiny(train={"epochs": 2}, **({"scheduler": scheduler} if scheduler else {})))
    folder = tmp_path / "run"
    assert cli_in_process("run", config, "--run-dir", folder, "-q").code == 0
    note = cli("resume", folder).stderr.strip()
    command = shlex.split(note.rsplit(": ", 1)[1])
    assert command[0] == "trainer"
    if scheduler:  # cosine's T_max was fixed from the 2-epoch budget: a longer run is a new run
        assert command[1:] == ["run", f"{folder}/config.yaml", "train.epochs=4", "scheduler.T_max=4"]
    trained = cli(*command[1:], "-q")
    assert trained.code == 0, trained.output
    summary = json.loads((tmp_path / trained.stdout.strip().splitlines()[-1] / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["epochs"] == 4


def test_a_complete_run_limited_by_max_steps_is_told_to_raise_max_steps(cli, cli_in_process, tmp_path, write_config, tiny):
    config = write_config(tiny(train={"max_steps": 6}))  # 4 steps an epoch: ends in its second epoch
    folder = tmp_path / "run"
    assert cli_in_process("run", config, "--run-dir", folder, "-q").code == 0
    again = cli("resume", folder, "train.epochs=6")  # more epochs do not lift the step limit
    assert again.code == 0, again.output
    assert again.stderr.strip().endswith(
        f"(2 epochs, 6 steps; train.epochs=6, train.max_steps=6); its files are unchanged. To train on, resume with "
        f"a larger budget: trainer resume {folder} train.max_steps=12"
    )
    assert cli_in_process("resume", folder, "train.max_steps=12", "-q").code == 0  # the hint does train on
    assert json.loads((folder / "summary.json").read_text())["steps"] > 6


# ---------------------------------------------------------------------------------------------
# resume: a run stopped after step k and resumed in a new process equals the uninterrupted run


def _flat_tensors(value, prefix=""):
    """Every tensor in a nested state dict, by path."""
    import torch

    if isinstance(value, torch.Tensor):
        return {prefix: value}
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, (list, tuple)) else []
    out = {}
    for key, inner in items:
        out.update(_flat_tensors(inner, f"{prefix}/{key}"))
    return out


def _logged(folder: Path) -> list[tuple]:
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["split"], r["loss"], r.get("accuracy"), r.get("lr")) for r in rows]


def _tensorboard(folder: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in ("train/loss", "val/loss", "train/lr")}


def _assert_same_run(a: Path, b: Path) -> None:
    import torch

    last_a = torch.load(a / "checkpoints" / "last.pt", weights_only=True)
    last_b = torch.load(b / "checkpoints" / "last.pt", weights_only=True)
    for part in ("model", "optimizer", "scheduler", "ema"):
        flat_a, flat_b = _flat_tensors(last_a.get(part) or {}), _flat_tensors(last_b.get(part) or {})
        assert flat_a.keys() == flat_b.keys()
        for key in flat_a:
            assert torch.equal(flat_a[key], flat_b[key]), (part, key)
    assert last_a["scheduler"] == last_b["scheduler"]  # step counts and learning rates, not only tensors
    assert _logged(a) == _logged(b)  # losses, accuracies and learning rates, bit for bit, no duplicates
    assert _tensorboard(a) == _tensorboard(b)  # the resumed run's events were purged past the checkpoint
    summary_a = json.loads((a / "summary.json").read_text())
    summary_b = json.loads((b / "summary.json").read_text())
    assert summary_a["final"] == summary_b["final"] and summary_a["steps"] == summary_b["steps"]
    assert summary_a.get("stopped_early") == summary_b.get("stopped_early") and summary_a.get("best_epoch") == summary_b.get("best_epoch")


def _exactness_config(tmp_path: Path, data_path: str, scheduler: bool) -> Path:
    import yaml

    from datafiles import make_image_folder

    if data_path == "memory":  # 72 train samples in batches of 16: 5 steps per epoch, the last partial
        data = {"name": "random", "size": 96, "input_shape": [4], "target_shape": [2], "batch_size": 16, "val_fraction": 0.25}
        loss = {"name": "mse"}
    else:  # the DataLoader path: 30 training images in batches of 8, 4 steps per epoch
        root = make_image_folder(tmp_path / "images", per_class=20)
        data = {"name": "image_folder", "root": str(root), "image_size": 8, "grayscale": True, "batch_size": 8, "val_fraction": 0.25}
        loss = {"name": "cross_entropy"}
    config = {
        "name": "exact",
        "model": {"name": "mlp", "hidden": 16, "dropout": 0.3},  # dropout: the torch RNG matters
        "data": data,
        "loss": loss,
        "optimizer": {"name": "adamw", "lr": 0.01},
        "train": {"epochs": 3, "log_every": 2},
    }
    if scheduler:
        config["scheduler"] = {"name": "one_cycle", "max_lr": 0.05}  # steps every batch
    path = tmp_path / "exact.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.mark.parametrize(
    "data_path,steps_per_epoch,scheduler",
    [
        pytest.param("memory", 5, True, id="memory-5-one-cycle"),
        pytest.param("dataloader", 4, False, id="dataloader-4-no-scheduler"),
        # the other two combinations add ~50 s to the suite: python -m pytest -m slow
        pytest.param("memory", 5, False, id="memory-5-no-scheduler", marks=pytest.mark.slow),
        pytest.param("dataloader", 4, True, id="dataloader-4-one-cycle", marks=pytest.mark.slow),
    ],
)
def test_resume_is_bit_exact(cli, tmp_path, data_path, steps_per_epoch, scheduler):
    config = _exactness_config(tmp_path, data_path, scheduler)
    full = cli("run", config, "--run-dir", tmp_path / "full", "-q")
    assert full.code == 0, full.output
    # k in the middle of epoch 2, and at the end of epoch 1
    for k in (steps_per_epoch + 2, steps_per_epoch):
        folder = tmp_path / f"stopped-at-{k}"
        stopped = cli("run", config, "--run-dir", folder, "-q", env={"TRAINER_STOP_AT_STEP": str(k)})
        assert stopped.code == 143, stopped.output
        assert json.loads((folder / "summary.json").read_text())["steps"] == k
        resumed = cli("resume", folder, "-q")
        assert resumed.code == 0, resumed.output
        _assert_same_run(tmp_path / "full", folder)


def test_a_run_stopped_mid_accumulation_resumes_into_the_same_early_stop_and_averaged_weights(cli, tmp_path):
    # 5 batches an epoch, 2 to a step: steps of 2, 2 and 1 batches; the validation is the EMA
    # model's; early stopping ends the run after epoch 3 (no later epoch improves by 1e9). The stop
    # comes one batch after step 4, with a batch's gradients summed and not yet stepped on
    config = _exactness_config(tmp_path, "memory", scheduler=False)
    options = ("train.epochs=10", "train.accumulate=2", "train.ema.decay=0.9", "train.early_stopping.patience=2",
               "train.early_stopping.min_delta=1e9")  # fmt: skip
    full = cli("run", config, *options, "--run-dir", tmp_path / "full")
    assert full.code == 0, full.output
    summary = json.loads((tmp_path / "full" / "summary.json").read_text())
    assert (summary["stopped_early"], summary["epochs"], summary["steps"]) == (True, 3, 9) and 1 <= summary["best_epoch"] <= 3
    assert "stopped early after epoch 3: val_loss did not improve by more than 1e+09 for 2 epochs" in full.stdout
    # eval (as predict and export) uses the averaged weights that validation chose best.pt by
    evaluated = evaluate_checkpoint(tmp_path / "full", which="best")
    assert evaluated["loss"] == pytest.approx(summary["monitor"]["best"], rel=1e-6)

    folder = tmp_path / "stopped"
    stopped = cli("run", config, *options, "--run-dir", folder, "-q", env={"TRAINER_STOP_AT_STEP": "4+1"})
    assert stopped.code == 143, stopped.output
    saved = torch_load(folder / "checkpoints" / "last.pt")
    assert saved["train_state"]["step"] == 4 and saved["train_state"]["batch_in_epoch"] == 3
    assert all(grad is not None for grad in saved["grads"]) and saved["ema"]["n_averaged"] == 4
    resumed = cli("resume", folder, "-q")
    assert resumed.code == 0, resumed.output
    _assert_same_run(tmp_path / "full", folder)

    # a finished early-stopped run resumed again trains nothing, and says how to train on
    again = cli("resume", folder)
    assert again.code == 0 and "stopped early after epoch 3" in again.output
    suggested = f"trainer resume {folder} train.early_stopping.patience=4"
    assert suggested in again.output.replace("\n", " ")
    longer = cli(*suggested.split()[1:], "-q")
    assert longer.code == 0, longer.output
    summary = json.loads((folder / "summary.json").read_text())
    assert (summary["stopped_early"], summary["epochs"]) == (True, 5)  # 2 more epochs of patience


def test_a_run_killed_outright_resumes_into_the_uninterrupted_run(cli, tmp_path):
    # SIGKILL at step 7, just after the checkpoint_every save of step 6: its fsync and rename may
    # still have been under way, so last.pt is that save or the one before it, of step 3 (epoch
    # ends save by time, and this run is younger than checkpoint_interval_s). Either way the resumed
    # run, its metrics.jsonl and its TensorBoard events are those of the run that was never killed
    config = _exactness_config(tmp_path, "memory", scheduler=True)
    every = ("train.log_every=1", "train.checkpoint_every=3")
    full = cli("run", config, *every, "--run-dir", tmp_path / "full", "-q")
    assert full.code == 0, full.output
    folder = tmp_path / "killed"
    killed = cli("run", config, *every, "--run-dir", folder, "-q", env={"TRAINER_STOP_AT_STEP": "7:SIGKILL"})
    assert killed.code == -signal.SIGKILL and not (folder / "summary.json").exists()
    resumed = cli("resume", folder, "-q")
    assert resumed.code == 0, resumed.output
    resumed_from = json.loads((folder / "env.json").read_text())["resumes"][0]
    assert resumed_from["step"] in (3, 6)
    assert Path(resumed_from["from"]).name == "last.pt"  # not best.pt, when that is the same file
    _assert_same_run(tmp_path / "full", folder)


# ---------------------------------------------------------------------------------------------
# signals, NaN, corrupt and malicious checkpoints, a folder that cannot be written


@pytest.mark.parametrize("ignore_after,survives", [(True, True), (False, False)])
def test_a_rank_past_its_run_outlives_torchruns_sigterm(ignore_after, survives):
    # under torchrun, the rank that exits first makes torchrun SIGTERM the others; one that has
    # finished its run must still get to print its result (and rank 0 to write the exit code)
    import sys

    script = (
        "import os, signal\n"
        "from trainer.runs import StopRequests\n"
        f"with StopRequests(ignore_after={ignore_after}):\n"
        "    pass\n"
        "os.kill(os.getpid(), signal.SIGTERM)\n"
        "print('reported', flush=True)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    if survives:
        assert done.returncode == 0 and done.stdout.strip() == "reported", done.stderr
    else:  # a plain run puts the default back: SIGTERM after the run ends the process as usual
        assert done.returncode == -signal.SIGTERM and done.stdout == ""


def torch_load(path: Path):
    import torch

    return torch.load(path, weights_only=True)


def test_nan_at_step_k_fails_and_keeps_the_pre_nan_checkpoint(cli, tmp_path, write_config):
    # row 6 of the data is NaN and the data is not shuffled: step 7 (batch size 1) sees it
    x = [[float(i)] for i in range(10)]
    x[6] = [float("nan")]
    config = write_config(
        {
            "model": {"name": "linear_regression"},
            "data": {"name": "tensors", "x": x, "y": [[2.0 * i] for i in range(10)], "batch_size": 1,
                     "val_fraction": 0, "shuffle": False},
            "loss": {"name": "mse"},
            "optimizer": {"name": "sgd", "lr": 0.001},
            "train": {"epochs": 2, "log_every": 5, "checkpoint_every": 3},
        }
    )  # fmt: skip
    result = cli("run", config, "--run-dir", tmp_path / "nan")
    assert result.code == 1, result.output
    # read at the save of step 9: the losses since the log point of step 5
    assert "not finite between steps 6 and 9" in result.stderr and "grad_clip" in result.stderr
    last = torch_load(tmp_path / "nan" / "checkpoints" / "last.pt")
    assert last["train_state"]["step"] == 6  # the save at step 9 was refused
    assert all(bool(v.isfinite().all()) for v in last["model"].values())
    assert json.loads((tmp_path / "nan" / "summary.json").read_text())["status"] == "failed"


def test_malicious_checkpoint_is_refused_and_nothing_runs(cli, tmp_path, write_config, tiny):
    import pickle

    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (Path.touch, (marker,))

    bad = tmp_path / "evil.pt"
    bad.write_bytes(pickle.dumps({"model": Payload()}))
    result = cli("run", write_config(tiny()), "--resume", bad)
    assert result.code == 2 and "cannot be loaded safely" in result.stderr and "evil.pt" in result.stderr
    assert not marker.exists()


def test_resume_auto_skips_a_truncated_checkpoint(cli, cli_in_process, tmp_path, write_config, tiny):
    config = write_config(tiny(train={"epochs": 2, "log_every": 1}))
    first = cli_in_process("run", config, "-q")
    assert first.code == 0
    folder = tmp_path / first.stdout.strip()
    last = folder / "checkpoints" / "last.pt"
    last.write_bytes(last.read_bytes()[:100])  # truncated
    os.utime(last, None)  # the newest file, so auto tries it first
    result = cli("run", config, "--resume", "auto", "train.epochs=3", "-q")
    assert result.code == 0, result.output
    assert (tmp_path / result.stdout.strip()) == folder  # continued in the same folder, from best.pt
    assert json.loads((folder / "summary.json").read_text())["epochs"] == 3


def test_resume_with_a_different_run_is_refused_unless_forced(cli, cli_in_process, tmp_path, write_config, tiny):
    config = write_config(tiny())
    first = cli_in_process("run", config, "-q")
    folder = tmp_path / first.stdout.strip()
    refused = cli("run", config, "--resume", folder, "data.batch_size=8", "seed=3")
    assert refused.code == 2
    assert "data.batch_size: 16 in the checkpoint, 8 now" in refused.stderr and "seed: 0" in refused.stderr
    assert "--force" in refused.stderr
    # a longer budget is not a different run
    assert cli_in_process("run", config, "--resume", folder, "train.epochs=3", "-q").code == 0


def _make_read_only(folder: Path) -> None:
    """chmod for ordinary users; root ignores it, so also the immutable attribute (chattr +i)."""
    folder.chmod(0o555)
    probe = folder / ".probe"
    try:
        probe.touch()
    except OSError:
        return
    probe.unlink()
    done = subprocess.run(["chattr", "+i", str(folder)], capture_output=True)
    if done.returncode != 0:
        pytest.fail(f"cannot make {folder} read-only on this machine: {done.stderr.decode()}")


def test_a_checkpoint_save_that_fails_names_the_path_and_keeps_the_old_one(cli, cli_in_process, tmp_path, write_config, tiny):
    config = write_config(tiny(train={"epochs": 1}))
    folder = tmp_path / "run"
    assert cli_in_process("run", config, "--run-dir", folder, "-q").code == 0
    checkpoints = folder / "checkpoints"
    before = (checkpoints / "last.pt").read_bytes()
    _make_read_only(checkpoints)
    try:
        result = cli("resume", folder, "train.epochs=2")
    finally:
        subprocess.run(["chattr", "-i", str(checkpoints)], capture_output=True)
        checkpoints.chmod(0o755)
    assert result.code == 1, result.output
    assert f"cannot write checkpoint '{checkpoints / 'last.pt'}'" in result.stderr
    assert (checkpoints / "last.pt").read_bytes() == before
    assert sorted(p.name for p in checkpoints.iterdir()) == ["best.pt", "last.pt"]  # no stray temporary file


@pytest.mark.parametrize(
    "epochs,stopped_at",
    [
        # the first epoch's save is staged, then its fsync fails on the writer thread: the run
        # learns it at the next save, not after the third epoch
        pytest.param(3, 2 * 4, id="at-the-next-save"),
        pytest.param(1, 4, id="at-the-end"),  # the run's last save: the run waits for it and fails
    ],
)  # with checkpoint_interval_s 0: every epoch end saves
def test_a_checkpoint_whose_fsync_fails_in_the_background_stops_the_run(tmp_path, monkeypatch, epochs, stopped_at):
    import errno

    real_fsync = os.fsync

    def failing_fsync(fd):  # of the checkpoints: env.json and config.yaml are fsynced too
        if "/checkpoints" in os.readlink(f"/proc/self/fd/{fd}"):
            raise OSError(errno.EIO, "Input/output error")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", failing_fsync)
    config = config_from_dict(tiny_config(train={"epochs": epochs, "checkpoint_interval_s": 0}))
    result = execute_run(config, root=tmp_path, quiet=True)
    last = result.run_dir / "checkpoints" / "last.pt"
    assert result.status == "failed" and result.exit_code == 1
    assert result.error == f"cannot write checkpoint '{last}': Input/output error"
    assert result.summary["steps"] == stopped_at
    assert json.loads((result.run_dir / "summary.json").read_text())["status"] == "failed"
    assert sorted(p.name for p in last.parent.iterdir()) == []  # nothing half-written left


def test_resume_refuses_what_it_cannot_continue(cli, cli_in_process, tmp_path, write_config, tiny):
    import torch

    config = write_config(tiny(scheduler={"name": "cosine"}))
    folder = tmp_path / cli_in_process("run", config, "-q").stdout.strip()
    # a checkpoint outside a run folder: the resumed run would have no folder of its own
    loose = tmp_path / "loose.pt"
    loose.write_bytes((folder / "checkpoints" / "last.pt").read_bytes())
    outside = cli("run", config, "--resume", loose)
    assert outside.code == 2 and "is not inside a run folder" in outside.stderr
    # a .pt that loads but is not a trainer checkpoint
    torch.save([torch.zeros(2)], folder / "checkpoints" / "other.pt")
    other = cli_in_process("run", config, "--resume", folder / "checkpoints" / "other.pt")
    assert other.code == 2 and "is not a trainer checkpoint" in other.stderr
    # a longer budget would leave the cosine schedule's T_max behind
    longer = cli_in_process("resume", folder, "train.epochs=4")
    assert longer.code == 2 and "T_max=2" in longer.stderr and "--force" in longer.stderr
    # a changed learning rate would be silently replaced by the optimizer's restored state
    new_lr = cli_in_process("resume", folder, "optimizer.lr=0.5")
    assert new_lr.code == 2 and "optimizer.lr: 0.01 in the checkpoint, 0.5 now" in new_lr.stderr
    assert "Traceback" not in outside.output + other.output + longer.output + new_lr.output


@pytest.mark.parametrize("old_format", [1, 2])
def test_resume_reads_checkpoints_of_earlier_formats_and_refuses_a_newer_one(cli, cli_in_process, tmp_path, write_config, tiny, old_format):
    import json

    import torch

    config = write_config(tiny(train={"epochs": 2, "log_every": 3}))  # 8 steps: steps 7-8 wait for a log point
    folder = tmp_path / cli_in_process("run", config, "-q").stdout.strip()
    last = folder / "checkpoints" / "last.pt"
    payload = torch.load(last, weights_only=True)
    assert payload["format"] == 3 and "history" not in payload["train_state"]
    # formats 1-2 kept a per-epoch history (a list, then JSON text) and each unread step's loss
    history = [{"epoch": 1, "step": 4}, {"epoch": 2, "step": 8}]
    payload["format"] = old_format
    payload["train_state"]["history"] = history if old_format == 1 else json.dumps(history)
    running = payload["train_state"]["running"]
    running["pending"] = [running["pending"] / 2, running["pending"] / 2] if running["pending_batches"] else []
    del running["pending_batches"]
    torch.save(payload, last)
    resumed = cli("resume", folder, "train.epochs=3", "-q")
    assert resumed.code == 0, resumed.stderr
    again = torch.load(last, weights_only=True)
    assert again["format"] == 3 and again["train_state"]["step"] == 12
    steps = [json.loads(line)["step"] for line in (folder / "metrics.jsonl").read_text().splitlines()]
    assert [s for s in steps if s > 8] == [9, 12, 12]  # the log point of step 9 read the two old losses too
    # a file a later version wrote: refused by its number, not misread
    again["format"] = 4
    torch.save(again, last)
    newer = cli_in_process("run", config, "--resume", last, "train.epochs=4")
    assert newer.code == 2 and "Traceback" not in newer.output
    assert "has format 4, and this version reads format 1, 2 or 3; it was written by a newer trainer: upgrade trainer" in newer.stderr


@pytest.mark.parametrize("found", [0, "2"])
def test_a_checkpoint_format_no_trainer_wrote_is_refused(tmp_path, found):
    import torch

    from trainer.checkpoint import trainer_checkpoint

    path = tmp_path / "last.pt"
    torch.save({"format": found, "config": {}}, path)
    with pytest.raises(UsageError) as refused:
        trainer_checkpoint(path)
    assert str(refused.value) == (
        f"checkpoint '{path}' has format {found!r}, and this version reads format 1, 2 or 3; no version of trainer wrote it"
    )


def test_resume_refuses_data_that_changed_on_disk(cli, cli_in_process, tmp_path, write_config):
    table = tmp_path / "table.csv"
    rows = [f"{i},{i % 3},{2 * i}" for i in range(40)]
    table.write_text("a,b,y\n" + "\n".join(rows) + "\n")
    config = write_config(
        {"model": {"name": "mlp", "hidden": 4}, "data": {"name": "csv", "path": str(table), "target": "y", "batch_size": 8},
         "loss": {"name": "mse"}, "optimizer": {"name": "sgd", "lr": 0.001}, "train": {"epochs": 1}}
    )  # fmt: skip
    folder = tmp_path / cli_in_process("run", config, "-q").stdout.strip()
    table.write_text("a,b,y\n" + "\n".join(rows + ["40,1,80", "41,2,82"]) + "\n")  # same config, more rows
    result = cli("resume", folder, "train.epochs=2")
    assert result.code == 2 and "the data changed" in result.stderr and "32 training samples" in result.stderr


# ---------------------------------------------------------------------------------------------
# a run folder used from another working folder


def test_resume_and_eval_read_relative_data_paths_from_where_the_run_started(cli, cli_in_process, tmp_path):
    import yaml

    project, elsewhere = tmp_path / "project", tmp_path / "elsewhere"
    (project / "data").mkdir(parents=True)
    elsewhere.mkdir()
    rows = "\n".join(f"{i / 40},{(i * 7 % 40) / 40},{i % 3}" for i in range(40))
    (project / "data" / "table.csv").write_text("a,b,y\n" + rows + "\n")
    config = tiny_config(data={"name": "csv", "path": "data/table.csv", "target": "y", "batch_size": 8}, train={"epochs": 1})
    (project / "config.yaml").write_text(yaml.safe_dump(config))
    started = cli_in_process("run", "config.yaml", "-q", cwd=project)
    assert started.code == 0, started.output
    run_dir = project / started.stdout.strip()
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["data"]["path"] == "data/table.csv"  # kept as written

    resumed = cli("resume", run_dir, "train.epochs=2", "-q", cwd=elsewhere)
    assert resumed.code == 0, resumed.output
    assert json.loads((run_dir / "summary.json").read_text())["epochs"] == 2
    evaluated = cli("eval", run_dir, "--json", cwd=elsewhere)
    assert evaluated.code == 0, evaluated.output
    assert json.loads(evaluated.stdout)["samples"] == 8
    assert not (elsewhere / "runs").exists()


def test_started_in_is_the_recorded_working_folder_while_it_exists(tmp_path):
    run, gone = tmp_path / "run", tmp_path / "gone"
    run.mkdir()
    assert started_in(run) is None  # no env.json
    (run / "env.json").write_text(json.dumps({"cwd": str(tmp_path)}))
    assert started_in(run) == tmp_path
    (run / "env.json").write_text(json.dumps({"cwd": str(gone)}))
    assert started_in(run) is None  # moved away: paths are read from the current folder


# ---------------------------------------------------------------------------------------------
# faults outside the checkpoint: a small or full disk, a read-only one, a folder moved or deleted


@contextlib.contextmanager
def small_disk(where: Path, size: str):
    """A tmpfs of `size` mounted at `where` (this needs root, as CI and the developers' machines have)."""
    where.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], check=True, capture_output=True)
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], capture_output=True)


def test_a_disk_too_small_for_the_run_folder_is_bad_input_and_leaves_nothing(cli, tmp_path, write_config, tiny):
    config = write_config(tiny())
    with small_disk(tmp_path / "disk", "8k") as disk:  # two pages: the lock and env.json fit, config.yaml does not
        result = cli("run", config, "--run-dir", disk / "run")
        assert result.code == 2, result.output
        assert result.stderr.strip().splitlines() == [
            f"error: cannot write the run folder '{disk / 'run'}': No space left on device (config.yaml); "
            "free some space or choose another folder (--run-dir, or run from elsewhere)"
        ]
        assert list(disk.iterdir()) == []


@contextlib.contextmanager
def ext4_disk(where: Path):
    """A small loop-mounted ext4 that remounts itself read-only on an error, as real disks are set up;
    yields a function that raises such an error (ext4's own trigger_fs_error)."""
    image = where.with_suffix(".img")
    subprocess.run(["dd", "if=/dev/zero", f"of={image}", "bs=1M", "count=16", "status=none"], check=True)
    subprocess.run(["mkfs.ext4", "-q", str(image)], check=True)
    where.mkdir()
    subprocess.run(["mount", "-o", "loop,errors=remount-ro", str(image), str(where)], check=True, capture_output=True)
    device = Path(subprocess.run(["findmnt", "-no", "SOURCE", str(where)], capture_output=True, text=True).stdout.strip()).name
    try:
        yield lambda: Path(f"/sys/fs/ext4/{device}/trigger_fs_error").write_text("1")
    finally:
        subprocess.run(["umount", "-l", str(where)], capture_output=True)


def wait_for_saves(last: Path, count: int = 1, alive: subprocess.Popen | None = None) -> None:
    """Wait until the run has replaced checkpoint `last` `count` times (saves may come faster than
    this looks), with `alive`: asserting that process keeps running meanwhile."""
    seen, changes = last.stat().st_ino, 0
    deadline = time.monotonic() + 120
    while changes < count:
        assert alive is None or alive.poll() is None, alive.communicate()
        assert time.monotonic() < deadline, f"the run saved {changes} of {count} checkpoints in 120 s"
        time.sleep(0.02)
        if (inode := last.stat().st_ino) != seen:
            seen, changes = inode, changes + 1


def remount_repaired(where: Path) -> None:
    """What an admin does once the disk is back: check it and mount it read-write again."""
    image = where.with_suffix(".img")
    subprocess.run(["umount", str(where)], check=True, capture_output=True)
    subprocess.run(["e2fsck", "-fy", str(image)], capture_output=True)
    subprocess.run(["mount", "-o", "loop", str(image), str(where)], check=True, capture_output=True)


@pytest.mark.parametrize("fault", ["full", "read-only"])
def test_a_disk_that_fails_mid_run_fails_the_run_and_resume_works_once_it_is_back(cli_in_process, tmp_path, fault):
    with small_disk(tmp_path / "disk", "8m") if fault == "full" else ext4_disk(tmp_path / "disk") as disk_or_trigger:
        disk = tmp_path / "disk"
        proc, folder = start_run(disk)
        if fault == "read-only":
            # a checkpoint's folder is fsynced after its rename, in the background, so last.pt shows before
            # it is durable, and an ext4 that errors drops a rename not yet committed; saves run in order:
            # once the next has replaced it, the first is on disk
            wait_for_saves(folder / "checkpoints" / "last.pt")
        if fault == "full":  # another process fills the disk
            subprocess.run(["dd", "if=/dev/zero", f"of={disk / 'filler'}", "bs=64k"], capture_output=True)
        else:  # the filesystem turns read-only under the run
            disk_or_trigger()
        stdout, stderr = proc.communicate(timeout=120)
        reason = "No space left on device" if fault == "full" else "Read-only file system"
        assert proc.returncode == 1, stderr
        assert "Traceback" not in stderr and "internal error" not in stderr
        assert stderr.startswith("error: ") and reason in stderr
        assert stdout.strip().splitlines()[-1] == str(folder)  # the run folder is still the last line
        if fault == "full":
            (disk / "filler").unlink()
        else:
            proc = None
            remount_repaired(disk)
        last = torch_load(folder / "checkpoints" / "last.pt")  # the last good checkpoint
        leftovers = [p.name for p in folder.rglob("*.tmp")]
        if fault == "full":
            assert not leftovers  # no half-written temporaries
        else:  # a read-only filesystem refuses the delete of a save's temporary too: only ever its hidden one
            assert all(name.startswith(".") for name in leftovers), leftovers
        more = f"train.max_steps={last['train_state']['step'] + 8}"
        resumed = cli_in_process("resume", folder, more, "-q")
        assert resumed.code == 0, resumed.output
        assert json.loads((folder / "summary.json").read_text())["status"] == "completed"


def test_resume_on_a_full_disk_is_refused_and_changes_nothing(cli, cli_in_process, tmp_path, write_config, tiny):
    config = write_config(tiny(train={"epochs": 1}))
    with small_disk(tmp_path / "disk", "2m") as disk:
        folder = disk / "run"
        assert cli_in_process("run", config, "--run-dir", folder, "-q").code == 0
        subprocess.run(["dd", "if=/dev/zero", f"of={disk / 'filler'}", "bs=64k"], capture_output=True)
        before = {p: p.read_bytes() for p in folder.rglob("*") if p.is_file() and p.name != ".lock"}
        refused = cli("resume", folder, "train.epochs=2")
        assert refused.code == 2, refused.output
        assert f"cannot write the run folder '{folder}': No space left on device" in refused.stderr
        assert {p: p.read_bytes() for p in folder.rglob("*") if p.is_file() and p.name != ".lock"} == before
        (disk / "filler").unlink()
        assert cli_in_process("resume", folder, "train.epochs=2", "-q").code == 0


def test_a_run_folder_moved_mid_run_fails_and_is_not_made_again(cli_in_process, tmp_path):
    proc, folder = start_run(tmp_path)
    moved = tmp_path / "moved"
    folder.rename(moved)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 1, stderr
    assert f"the run folder '{folder}' was moved to '{moved}' while the run trained" in stderr
    assert not folder.exists()  # not made again holding only last.pt and summary.json
    assert json.loads((moved / "summary.json").read_text())["status"] == "failed"  # written where it went
    step = torch_load(moved / "checkpoints" / "last.pt")["train_state"]["step"]
    resumed = cli_in_process("resume", moved, f"train.max_steps={step + 8}", "-q")
    assert resumed.code == 0, resumed.output


def test_a_run_folder_deleted_mid_run_fails_saying_so(tmp_path):
    import shutil

    proc, folder = start_run(tmp_path)
    proc.send_signal(signal.SIGSTOP)  # as `rm -rf` would look to a slower run: the whole folder gone at once
    shutil.rmtree(folder)
    proc.send_signal(signal.SIGCONT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 1, stderr
    assert f"the run folder '{folder}' was deleted or moved while the run trained" in stderr
    assert "summary.json could not be written" in stderr
    assert not folder.exists()


def test_a_run_dir_holding_other_files_is_refused_and_left_untouched(cli, tmp_path, write_config, tiny):
    home = tmp_path / "home"
    home.mkdir()
    (home / "notes.txt").write_text("mine")
    result = cli("run", write_config(tiny()), "--run-dir", home)
    assert result.code == 2, result.output
    assert f"--run-dir '{home}' holds files trainer did not write (notes.txt)" in result.stderr
    assert [p.name for p in home.iterdir()] == ["notes.txt"]


def test_resume_refuses_a_checkpoint_from_another_run_of_the_same_config(cli, cli_in_process, tmp_path, write_config, tiny):
    import shutil

    config = write_config(tiny(train={"epochs": 1}))
    short, long = tmp_path / "short", tmp_path / "long"
    assert cli_in_process("run", config, "--run-dir", short, "-q").code == 0
    assert cli_in_process("run", config, "--run-dir", long, "train.epochs=3", "-q").code == 0
    shutil.copy(long / "checkpoints" / "last.pt", short / "checkpoints" / "last.pt")
    before = (short / "metrics.jsonl").read_text()
    refused = cli("resume", short, "train.epochs=4")
    assert refused.code == 2, refused.output
    assert "belongs to another run" in refused.stderr and "--force" in refused.stderr
    assert (short / "metrics.jsonl").read_text() == before
    assert cli_in_process("resume", short, "train.epochs=4", "--force", "-q").code == 0


def test_json_files_are_strict_json(tmp_path):
    from trainer.runs import write_json

    write_json(tmp_path / "summary.json", {"final": {"val_loss": float("inf"), "train_loss": float("nan")}, "steps": 3})

    def refuse(name):
        raise ValueError(f"{name} is not JSON")

    data = json.loads((tmp_path / "summary.json").read_text(), parse_constant=refuse)
    assert data == {"final": {"val_loss": None, "train_loss": None}, "steps": 3}


def test_metrics_deleted_mid_run_fails_the_run_saying_so(tmp_path):
    proc, folder = start_run(tmp_path)
    (folder / "metrics.jsonl").unlink()
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 1, stderr
    assert f"'{folder / 'metrics.jsonl'}' was deleted while the run trained: its points are lost" in stderr
    assert json.loads((folder / "summary.json").read_text())["status"] == "failed"
