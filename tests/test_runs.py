"""Run folders, env.json, summary.json, and stopping a run with real signals."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from conftest import tiny_config, trainer_executable
from trainer.config import config_from_dict
from trainer.errors import UsageError
from trainer.runs import create_run_dir, environment, execute_run


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


def test_a_failed_run_records_failed_and_keeps_the_last_good_checkpoint(tmp_path):
    # lr 1e6 diverges in the first epoch: no epoch ended well, so no checkpoint either
    config = config_from_dict(tiny_config(optimizer={"name": "sgd", "lr": 1e6}, train={"epochs": 5, "log_every": 1}))
    result = execute_run(config, root=tmp_path, quiet=True)
    assert result.status == "failed" and result.exit_code == 1 and "grad_clip" in result.error
    assert json.loads((result.run_dir / "summary.json").read_text())["status"] == "failed"


def _start_long_run(tmp_path: Path) -> tuple[subprocess.Popen, Path]:
    import yaml

    config = tiny_config(train={"epochs": 100000, "log_every": 1})
    path = tmp_path / "long.yaml"
    path.write_text(yaml.safe_dump(config))
    run_dir = tmp_path / "run"
    proc = subprocess.Popen(
        [trainer_executable(), "run", str(path), "--run-dir", str(run_dir)],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    deadline = time.monotonic() + 120
    # wait until training has really started: a checkpoint exists after the first epochs
    while not (run_dir / "checkpoints" / "last.pt").exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the run did not start training"
        time.sleep(0.1)
    return proc, run_dir


@pytest.mark.parametrize("signum,code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_stops_the_run_cleanly(tmp_path, signum, code):
    proc, run_dir = _start_long_run(tmp_path)
    os.kill(proc.pid, signum)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == code, stderr
    assert "Traceback" not in stdout + stderr
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "interrupted" and summary["steps"] > 0
    assert stdout.strip().splitlines()[-1] == str(run_dir)
