"""Tests for trainer.checkpoint: atomic save and safe (weights_only) load."""

import errno
import os
import pathlib
import stat

import pytest
import torch
from torch import nn

from trainer.checkpoint import atomic_link, atomic_save, load_checkpoint
from trainer.errors import UsageError


class TouchOnLoad:
    """Unpickling this creates a file: what a malicious checkpoint would do."""

    def __init__(self, target: pathlib.Path) -> None:
        self.target = target

    def __reduce__(self):
        return (pathlib.Path.touch, (self.target,))


def training_state() -> dict:
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(4, 3)).sum().backward()
    optimizer.step()
    return {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "epoch": 3,
        "step": 120,
        "best": 0.25,
        "name": "lenet-digits",
        "history": [1.0, 0.5],
    }


def files_in(folder: pathlib.Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_round_trip_of_a_training_state(tmp_path):
    state = training_state()
    path = tmp_path / "last.pt"
    atomic_save(state, path)
    loaded = load_checkpoint(path)
    assert loaded.keys() == state.keys()
    for key in ("epoch", "step", "best", "name", "history"):
        assert loaded[key] == state[key]
    for key, tensor in state["model"].items():
        assert torch.equal(loaded["model"][key], tensor)
    model = nn.Linear(3, 2)
    model.load_state_dict(loaded["model"])
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    optimizer.load_state_dict(loaded["optimizer"])
    buf = optimizer.state_dict()["state"][0]["momentum_buffer"]
    assert torch.equal(buf, state["optimizer"]["state"][0]["momentum_buffer"])


def test_save_creates_missing_folders(tmp_path):
    path = tmp_path / "run" / "checkpoints" / "best.pt"
    atomic_save({"x": torch.ones(2)}, path)
    assert torch.equal(load_checkpoint(path)["x"], torch.ones(2))
    assert files_in(path.parent) == ["best.pt"]


def test_overwriting_keeps_one_file_and_no_temporary(tmp_path):
    path = tmp_path / "last.pt"
    for step in range(3):
        atomic_save({"step": step, "w": torch.full((2,), float(step))}, str(path))
    assert files_in(tmp_path) == ["last.pt"]
    loaded = load_checkpoint(path)
    assert loaded["step"] == 2
    assert torch.equal(loaded["w"], torch.full((2,), 2.0))


@pytest.mark.parametrize("error", [OSError("disk full"), KeyboardInterrupt()], ids=["oserror", "interrupt"])
def test_a_failed_save_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch, error):
    path = tmp_path / "last.pt"
    atomic_save({"step": 1}, path)
    real_save = torch.save

    def save_half_then_fail(obj, handle, *args, **kwargs):
        handle.write(b"PK\x03\x04 half a checkpoint")
        raise error

    monkeypatch.setattr(torch, "save", save_half_then_fail)
    with pytest.raises(type(error)):
        atomic_save({"step": 2}, path)
    monkeypatch.setattr(torch, "save", real_save)
    assert files_in(tmp_path) == ["last.pt"]
    assert load_checkpoint(path) == {"step": 1}


def test_a_failed_first_save_leaves_nothing(tmp_path, monkeypatch):
    def fail(obj, handle, *args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(torch, "save", fail)
    with pytest.raises(RuntimeError, match="boom"):
        atomic_save({"step": 1}, tmp_path / "last.pt")
    assert files_in(tmp_path) == []


def test_the_payload_used_below_really_runs_when_unpickled(tmp_path):
    # guards the next test: an unsafe torch.load of this file does create the marker
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"model": {}, "payload": TouchOnLoad(marker)}, path)
    torch.load(path, weights_only=False)
    assert marker.exists()


def test_a_pickled_payload_is_refused_and_not_executed(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"model": {"w": torch.ones(1)}, "payload": TouchOnLoad(marker)}, path)
    with pytest.raises(UsageError) as info:
        load_checkpoint(path)
    assert str(path) in str(info.value)
    assert not marker.exists()


def test_a_refused_payload_message_says_why_in_one_plain_line(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"payload": TouchOnLoad(tmp_path / "pwned")}, path)
    with pytest.raises(UsageError) as info:
        load_checkpoint(path)
    message = str(info.value)
    assert "pickled Python objects" in message
    assert "\n" not in message and "\x1b" not in message  # no terminal escapes from torch's message


def test_a_truncated_file_is_a_usage_error_naming_it(tmp_path):
    path = tmp_path / "last.pt"
    atomic_save(training_state(), path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(UsageError) as info:
        load_checkpoint(path)
    assert str(path) in str(info.value)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    "content, says",
    [
        (b"", "checkpoint '{}' is empty (0 bytes): not a checkpoint, or one whose writing never finished"),
        (b"name: lenet\nseed: 0\n", "'{}' is not a checkpoint: torch.save writes a zip archive, and this file starts with b'name'"),
    ],
    ids=["empty", "yaml"],
)
def test_a_file_that_is_not_a_checkpoint_says_so(tmp_path, content, says):
    path = tmp_path / "last.pt"
    path.write_bytes(content)
    with pytest.raises(UsageError) as info:
        load_checkpoint(path)
    assert str(info.value) == says.format(path)  # not "cannot be loaded safely: it holds pickled Python objects"


def test_a_checkpoint_that_cannot_be_opened_names_the_reason(tmp_path, monkeypatch):
    import trainer.checkpoint

    path = tmp_path / "last.pt"
    atomic_save(training_state(), path)

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")  # what a file of another user gives

    monkeypatch.setattr(trainer.checkpoint, "open", refuse, raising=False)
    with pytest.raises(UsageError) as info:
        load_checkpoint(path)
    assert str(info.value) == f"checkpoint '{path}' cannot be read: Permission denied"


def test_a_missing_file_is_a_usage_error(tmp_path):
    path = tmp_path / "nope.pt"
    with pytest.raises(UsageError) as info:
        load_checkpoint(path)
    assert str(path) in str(info.value)
    assert "does not exist" in str(info.value)


def test_a_folder_is_not_a_checkpoint(tmp_path):
    with pytest.raises(UsageError):
        load_checkpoint(tmp_path)


# ---------------------------------------------------------------------------------------------
# SIGKILL in the middle of checkpoint writes

# one process imports torch once and forks a writer for each kill: a process start with its torch
# import cost ~5 s of CPU, ten times, for writes of a few milliseconds
_WRITERS = """
import os, sys, torch
from pathlib import Path
from trainer.checkpoint import atomic_save
path = Path(sys.argv[1])
for line in sys.stdin:  # a line: the number to count on from, in a new writer process
    child = os.fork()
    if child == 0:
        i = int(line)
        print("writer", os.getpid(), flush=True)
        while True:
            i += 1
            atomic_save({"i": i, "weights": torch.full((512, 1024), float(i))}, path)  # 2 MB a write
            print(i, flush=True)
    os.waitpid(child, 0)  # until the test has killed it
    print("reaped", flush=True)
"""


def test_sigkill_during_writes_leaves_the_old_or_the_new_checkpoint(tmp_path):
    import random
    import signal
    import subprocess
    import sys
    import time

    path = tmp_path / "last.pt"
    atomic_save({"i": 0, "weights": torch.zeros(512, 1024)}, path)
    rng = random.Random(0)
    seen = set()
    writers = subprocess.Popen([sys.executable, "-c", _WRITERS, str(path)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        for kill in range(10):
            last = load_checkpoint(path)["i"]
            writers.stdin.write(f"{last * 1000}\n")
            writers.stdin.flush()
            started = writers.stdout.readline().split()
            assert started[0] == "writer", started
            writers.stdout.readline()  # one write done: every kill finds the file moved on, however slow the disk
            time.sleep(rng.uniform(0.0, 0.3))  # somewhere in the middle of a later write, most of the time
            os.kill(int(started[1]), signal.SIGKILL)
            while writers.stdout.readline().strip() != "reaped":  # the writer's last lines, then its end
                pass
            state = load_checkpoint(path)  # never a torn file
            assert torch.equal(state["weights"], torch.full((512, 1024), float(state["i"])))
            seen.add(state["i"])
    finally:
        writers.kill()
        writers.wait(timeout=30)
    assert len(seen) > 5  # the writer really was overwriting the file between kills
    leftovers = [p.name for p in tmp_path.iterdir() if p.name != "last.pt"]
    assert all(name.startswith(".last.pt.") and name.endswith(".tmp") for name in leftovers)


def test_best_linked_to_last_keeps_its_state_when_last_moves_on(tmp_path):
    last, best = tmp_path / "last.pt", tmp_path / "best.pt"
    atomic_save({"step": 1}, last)
    assert atomic_link(last, best)
    atomic_save({"step": 2}, last)  # a new file under the old name
    assert load_checkpoint(best)["step"] == 1 and load_checkpoint(last)["step"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.pt", "last.pt"]


def test_background_writes_wait_for_the_disk_off_the_callers_thread_and_in_order(tmp_path, monkeypatch):
    import threading

    from trainer.checkpoint import BackgroundWrites, commit, link_or_copy, serialize, stage

    synced_on = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced_on.append(threading.current_thread().name), real_fsync(fd))[1])
    writes = BackgroundWrites()
    last, best = tmp_path / "last.pt", tmp_path / "best.pt"
    for step in (1, 2):
        data = serialize({"step": step})
        writes.submit(last, commit, stage(data, last))  # the bytes are in a temporary file already
        writes.submit(best, link_or_copy, last, best)  # must see this step's last.pt, not the one before
    assert writes.close() is None
    assert load_checkpoint(last) == {"step": 2} and load_checkpoint(best) == {"step": 2}
    assert synced_on and all(name.startswith("trainer-checkpoints") for name in synced_on)
    assert files_in(tmp_path) == ["best.pt", "last.pt"]


def test_best_is_a_copy_where_the_filesystem_has_no_hard_links(tmp_path, monkeypatch):
    from trainer.checkpoint import link_or_copy

    def no_links(source, target):
        raise OSError(errno.EPERM, "Operation not permitted")  # FAT, exFAT, some network filesystems

    last, best = tmp_path / "last.pt", tmp_path / "best.pt"
    atomic_save({"step": 1}, last)
    monkeypatch.setattr(os, "link", no_links)
    link_or_copy(last, best)
    atomic_save({"step": 2}, last)
    assert load_checkpoint(best) == {"step": 1} and load_checkpoint(last) == {"step": 2}
    assert files_in(tmp_path) == ["best.pt", "last.pt"]


def test_a_best_save_fsyncs_the_folder_once_after_both_renames(tmp_path, monkeypatch):
    # last.pt's rename and best.pt's link share one fsync of the folder: durable together, after both
    from trainer.checkpoint import commit, link_or_copy, serialize, stage

    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append("fsync folder" if stat.S_ISDIR(os.fstat(fd).st_mode) else "fsync file")
        real_fsync(fd)

    def replace(src, dst):
        events.append(f"rename to {pathlib.Path(dst).name}")
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    last, best = tmp_path / "last.pt", tmp_path / "best.pt"
    commit(stage(serialize({"step": 1}), last), sync_folder=False)
    link_or_copy(last, best)
    assert events == ["fsync file", "rename to last.pt", "rename to best.pt", "fsync folder"]
    assert load_checkpoint(best) == {"step": 1} and os.stat(best).st_ino == os.stat(last).st_ino


def test_after_a_failed_write_best_is_not_linked_to_the_old_last(tmp_path, monkeypatch):
    # last.pt's fsync fails: best.pt of that save must not become a second name for the old last.pt
    from trainer.checkpoint import BackgroundWrites, commit, link_or_copy, serialize, stage

    last, best = tmp_path / "last.pt", tmp_path / "best.pt"
    atomic_save({"step": 1}, last)
    atomic_save({"step": 0}, best)  # the best epoch so far was an earlier one
    real_fsync = os.fsync

    def failing_fsync(fd):
        if not stat.S_ISDIR(os.fstat(fd).st_mode):
            raise OSError(errno.EIO, "Input/output error")
        real_fsync(fd)

    writes = BackgroundWrites()
    monkeypatch.setattr(os, "fsync", failing_fsync)
    writes.submit(last, commit, stage(serialize({"step": 2}), last), sync_folder=False)
    writes.submit(best, link_or_copy, last, best)
    path, error = writes.wait()
    assert path == last and error.errno == errno.EIO
    assert load_checkpoint(last) == {"step": 1} and load_checkpoint(best) == {"step": 0}
    monkeypatch.setattr(os, "fsync", real_fsync)  # the disk is back: the next save goes through whole
    writes.submit(last, commit, stage(serialize({"step": 3}), last), sync_folder=False)
    writes.submit(best, link_or_copy, last, best)
    assert writes.close() is None
    assert load_checkpoint(last) == {"step": 3} and load_checkpoint(best) == {"step": 3}
    assert files_in(tmp_path) == ["best.pt", "last.pt"]


def test_a_copy_of_best_that_fails_still_fsyncs_the_folder(tmp_path, monkeypatch):
    # the rename of last.pt before it left the folder's fsync to this call
    import shutil

    from trainer.checkpoint import link_or_copy

    last, best = tmp_path / "last.pt", tmp_path / "best.pt"
    atomic_save({"step": 1}, last)
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(stat.S_ISDIR(os.fstat(fd).st_mode)), real_fsync(fd))[1])
    monkeypatch.setattr(os, "link", lambda source, target: (_ for _ in ()).throw(OSError(errno.EPERM, "no hard links")))
    monkeypatch.setattr(shutil, "copyfileobj", lambda source, target: (_ for _ in ()).throw(OSError(errno.ENOSPC, "No space left on device")))
    with pytest.raises(OSError, match="No space"):
        link_or_copy(last, best)
    assert synced == [True]  # the folder, once
    assert files_in(tmp_path) == ["last.pt"]  # no temporary file left


def test_a_background_write_that_fails_is_reported_with_its_path_and_keeps_the_old_file(tmp_path, monkeypatch):
    from trainer.checkpoint import BackgroundWrites, commit, serialize, stage

    last = tmp_path / "last.pt"
    atomic_save({"step": 1}, last)

    def failing_fsync(fd):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "fsync", failing_fsync)
    writes = BackgroundWrites()
    writes.submit(last, commit, stage(serialize({"step": 2}), last))
    path, error = writes.close()
    assert path == last and error.errno == errno.EIO
    assert load_checkpoint(last) == {"step": 1}
    assert files_in(tmp_path) == ["last.pt"]  # no temporary file left


def test_staging_in_a_folder_that_cannot_be_written_fails_in_the_callers_thread(tmp_path):
    from trainer.checkpoint import serialize, stage

    (tmp_path / "file").write_text("")
    with pytest.raises(OSError):
        stage(serialize({"step": 1}), tmp_path / "file" / "last.pt")  # a file where the folder should be


def _draws() -> tuple:
    import random

    import numpy as np

    return random.random(), float(np.random.rand()), float(torch.rand(()))


def test_random_states_round_trip_through_a_weights_only_file(tmp_path):
    import random

    import numpy as np

    from trainer.checkpoint import rng_state, set_rng_state

    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    random.gauss(0, 1)  # a cached gaussian is part of the state too
    atomic_save({"rng": rng_state()}, tmp_path / "last.pt")
    expected = _draws()
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    set_rng_state(load_checkpoint(tmp_path / "last.pt")["rng"])
    assert _draws() == expected


def test_random_states_of_earlier_checkpoints_still_restore():
    import random

    import numpy as np

    from trainer.checkpoint import set_rng_state

    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    py_version, py_state, py_gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    cpu = torch.get_rng_state()
    expected = _draws()
    for python_state in (list(py_state), torch.tensor(py_state, dtype=torch.int64)):  # as earlier versions saved it
        set_rng_state({
            "python": [py_version, python_state, py_gauss],
            "numpy": [np_name, torch.from_numpy(np_keys.astype(np.int64)), np_pos, np_has_gauss, np_gauss],
            "torch": cpu,
        })  # fmt: skip
        assert _draws() == expected


# ---------------------------------------------------------------------------------------------
# cadence: when a run saves


def saved_steps(tmp_path, monkeypatch, **train):
    """Train a linear regression (4 steps an epoch) with `train`; the step of each checkpoint written,
    and of last.pt and best.pt at the end."""
    import trainer.checkpoint
    from trainer.config import config_from_dict
    from trainer.runs import execute_run

    from conftest import tiny_config

    written = []
    real_serialize = trainer.checkpoint.serialize

    def serialize(payload):
        written.append(payload["train_state"]["step"])
        return real_serialize(payload)

    monkeypatch.setattr(trainer.checkpoint, "serialize", serialize)
    # y = 2x from 4 points, one a step: the loss falls every epoch, so the highest is the first epoch's
    data = {"name": "tensors", "x": [[1.0], [2.0], [3.0], [4.0]], "y": [[2.0], [4.0], [6.0], [8.0]], "batch_size": 1,
            "val_fraction": 0, "shuffle": False}  # fmt: skip
    config = tiny_config(model={"name": "linear_regression"}, data=data, train={"log_every": 100, **train})
    result = execute_run(config_from_dict(config), root=tmp_path, quiet=True)
    assert result.status == "completed", result.error
    checkpoints = result.run_dir / "checkpoints"
    steps = {name: torch.load(checkpoints / name, weights_only=True)["train_state"]["step"] for name in ("last.pt", "best.pt")}
    return written, steps


def test_epoch_ends_save_by_time_and_the_run_end_always_saves(tmp_path, monkeypatch):
    # the run takes well under the default 10 s: its one save is the run's end
    written, steps = saved_steps(tmp_path, monkeypatch, epochs=4)
    assert written == [16] and steps == {"last.pt": 16, "best.pt": 16}
    # 0: every epoch end
    written, _ = saved_steps(tmp_path / "every", monkeypatch, epochs=4, checkpoint_interval_s=0)
    assert written == [4, 8, 12, 16]


def test_best_holds_the_best_epoch_even_when_it_was_not_saved_at_once(tmp_path, monkeypatch):
    # "best" is the highest train loss, the first epoch's: kept in memory, written as best.pt at the run's end
    written, steps = saved_steps(tmp_path, monkeypatch, epochs=4, monitor="train_loss", mode="max")
    assert steps == {"last.pt": 16, "best.pt": 4} and sorted(written) == [4, 16]


def test_checkpoint_every_saves_within_epochs_and_brings_a_kept_best_along(tmp_path, monkeypatch):
    written, steps = saved_steps(tmp_path, monkeypatch, epochs=3, checkpoint_every=6, monitor="train_loss", mode="max")
    # step 6: last.pt, and best.pt from epoch 1 (kept since step 4); step 12: the end
    assert written == [6, 4, 12] and steps == {"last.pt": 12, "best.pt": 4}


def test_a_killed_run_loses_at_most_the_interval(tmp_path):
    import signal
    import time

    from conftest import start_run

    proc, folder = start_run(tmp_path, train={"epochs": 100000, "log_every": 1000, "checkpoint_interval_s": 0.5})
    last = folder / "checkpoints" / "last.pt"
    first = torch.load(last, weights_only=True)["train_state"]["step"]
    time.sleep(1.5)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    # saves kept coming every half second or so while it trained: the newest is later than the first
    assert torch.load(last, weights_only=True)["train_state"]["step"] > first


def test_a_resume_with_another_accumulation_or_ema_is_refused_and_older_checkpoints_are_not(tmp_path):
    from trainer.checkpoint import refuse_changed_run

    saved = {"seed": 0, "train": {"accumulate": 2, "ema": {"decay": 0.9}, "early_stopping": {"patience": 2}}}
    changed = {"seed": 0, "train": {"accumulate": 4, "ema": None, "early_stopping": {"patience": 9}}}
    with pytest.raises(UsageError) as caught:
        refuse_changed_run(saved, changed, tmp_path / "last.pt", force=False)
    message = str(caught.value)
    assert "train.accumulate: 2 in the checkpoint, 4 now" in message and "train.ema.decay" in message
    assert "early_stopping" not in message  # the patience may change on a resume
    refuse_changed_run(saved, changed, tmp_path / "last.pt", force=True)
    # a checkpoint from before these options has neither key: the defaults are no difference
    refuse_changed_run({"seed": 0, "train": {}}, {"seed": 0, "train": {"accumulate": 1, "ema": None}}, tmp_path / "last.pt", force=False)
