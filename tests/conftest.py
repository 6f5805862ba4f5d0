"""Shared fixtures: the real `trainer` console script in a subprocess, configs written to disk."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"


def trainer_executable() -> str:
    """The console script installed next to this Python (the one a user runs)."""
    candidate = Path(sys.executable).with_name("trainer")
    found = str(candidate) if candidate.exists() else shutil.which("trainer")
    if not found:
        raise RuntimeError("the `trainer` console script is not installed: pip install -e '.[test]'")
    return found


@dataclass
class Result:
    code: int
    stdout: str
    stderr: str
    cwd: Path

    @property
    def output(self) -> str:
        return self.stdout + self.stderr


@pytest.fixture
def cli(tmp_path: Path):
    """Run `trainer ARGS...` in a subprocess with `tmp_path` as the working folder (so runs/ lands there)."""

    def run(*args: Any, cwd: Path | None = None, timeout: float = 300, env: dict[str, str] | None = None) -> Result:
        # one thread: beside the other xdist worker, torch's second thread only waits for a core
        full_env = {**os.environ, "COLUMNS": "120", "OMP_NUM_THREADS": "1", **(env or {})}
        proc = subprocess.run(
            [trainer_executable(), *map(str, args)],
            cwd=cwd or tmp_path,
            capture_output=True,
            text=True,
            timeout=timeout,
            env=full_env,
        )
        return Result(proc.returncode, proc.stdout, proc.stderr, Path(cwd or tmp_path))

    return run


@pytest.fixture
def write_config(tmp_path: Path):
    """Write a config (a dict, or YAML text) to tmp_path/<name>.yaml and return its path."""

    def write(content: dict[str, Any] | str, name: str = "config") -> Path:
        path = tmp_path / f"{name}.yaml"
        text = content if isinstance(content, str) else yaml.safe_dump(content, sort_keys=False)
        path.write_text(text)
        return path

    return write


def tiny_config(**sections: Any) -> dict[str, Any]:
    """A config that trains in well under a second: an MLP on 64 random samples."""
    config: dict[str, Any] = {
        "name": "tiny",
        "model": {"name": "mlp", "hidden": 8},
        "data": {"name": "random", "size": 64, "input_shape": [4], "target_shape": [2], "batch_size": 16},
        "loss": {"name": "mse"},
        "optimizer": {"name": "sgd", "lr": 0.01},
        "train": {"epochs": 2, "log_every": 2},
    }
    config.update(sections)
    return config


@pytest.fixture
def tiny():
    """Factory for the tiny config dict (keyword arguments replace whole sections)."""
    return tiny_config


def start_run(tmp_path: Path, *args: Any, env: dict[str, str] | None = None, **sections: Any) -> tuple[subprocess.Popen, Path]:
    """Start `trainer run` of the tiny config (`sections` replace its sections; `args` are added to
    the command) into tmp_path/run, and wait until its first last.pt exists: training has started.

    The default train section runs for hours and saves at every epoch end."""
    sections.setdefault("train", {"epochs": 100000, "log_every": 1, "checkpoint_interval_s": 0})
    path = tmp_path / "long.yaml"
    path.write_text(yaml.safe_dump(tiny_config(**sections)))
    folder = tmp_path / "run"
    proc = start_trainer("run", path, "--run-dir", folder, *args, cwd=tmp_path, env=env)
    deadline = time.monotonic() + 120
    while not (folder / "checkpoints" / "last.pt").exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the run saved no checkpoint in 120 s"
        time.sleep(0.1)
    return proc, folder


# a model whose forward takes two seconds when SLOW_FORWARD is set: a window in which a command that
# uses a trained run (predict, export) is caught mid-write by a real signal (which ends the sleep)
SLOW_PLUGIN = """
import os
import time

from torch import nn
from trainer import register_model


class SlowNet(nn.Linear):
    def forward(self, x):
        if os.environ.get("SLOW_FORWARD"):
            time.sleep(2)
        return super().forward(x)


@register_model("slow_net", input_shape=(4,))
def slow_net(in_features: int = 4, out_features: int = 2) -> nn.Module:
    \"\"\"A linear layer whose forward sleeps two seconds when SLOW_FORWARD is set.\"\"\"
    return SlowNet(in_features, out_features)
"""


def stopped_mid_write(cli: Any, tmp_path: Path, *args: str, pattern: str, signals: tuple[int, ...]) -> Result:
    """Train a slow_net run (SLOW_PLUGIN) at tmp_path/run, start `trainer ARGS... --plugins slow.py`
    with SLOW_FORWARD set and an empty tmp_path/out, send it `signals` as soon as a file matching
    `pattern` shows in out/ (the command is writing), and return how it ended."""
    (tmp_path / "slow.py").write_text(SLOW_PLUGIN)
    (tmp_path / "slow.yaml").write_text(yaml.safe_dump(tiny_config(model={"name": "slow_net"}, train={"epochs": 1})))
    assert cli("run", "slow.yaml", "--plugins", "slow.py", "--run-dir", "run", "-q").code == 0
    (tmp_path / "out").mkdir()
    proc = start_trainer(*args, "--plugins", "slow.py", cwd=tmp_path, env={"SLOW_FORWARD": "1"})
    deadline = time.monotonic() + 120
    while not list((tmp_path / "out").glob(pattern)):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, f"no {pattern} in out/ in 120 s"
        time.sleep(0.01)
    for signum in signals:
        proc.send_signal(signum)
    stdout, stderr = proc.communicate(timeout=120)
    return Result(proc.returncode, stdout, stderr, tmp_path)


def start_trainer(*args: Any, cwd: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    """`trainer ARGS...` started in a subprocess (text pipes), for a test to signal."""
    return subprocess.Popen(
        [trainer_executable(), *map(str, args)], cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
    )  # fmt: skip


@pytest.fixture(scope="session")
def postgres_server():
    """A real PostgreSQL server (tests/postgres.py), started the first time a test asks for it in
    this pytest process (each xdist worker has its own) and stopped at the end of the session.
    Missing binaries fail the test, never skip it: CI must run what needs the server."""
    from postgres import PostgresUnavailable, start_server

    try:
        server = start_server()
    except PostgresUnavailable as error:
        raise pytest.fail.Exception(str(error), pytrace=False) from None
    yield server
    server.stop()


@pytest.fixture(scope="session")
def postgres_url(postgres_server) -> str:
    """`postgresql://trainer:PASSWORD@127.0.0.1:PORT/trainer`, a database on that server, for
    `--storage`. Shared by the worker's tests: give each test its own study or sweep name, or
    take a database of its own with `postgres_server.create_database(NAME)`."""
    return postgres_server.url
