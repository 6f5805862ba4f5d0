"""The benchmark scripts still run: each variant's measured process, for a few steps."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def first_column(printed: str) -> list[str]:
    """The first cell of each row of the markdown tables in `printed`, headers included."""
    return [line.split("|")[1].strip() for line in printed.splitlines() if line.startswith("| ") and "---" not in line]


@pytest.mark.parametrize("variant", ["slicing", "dataloader", "trainer"])  # quiet differs from trainer by one flag
def test_overhead_measures_each_variant(variant):
    out = subprocess.run(
        [sys.executable, BENCHMARKS / "overhead.py", "--child", variant, "linreg", "--steps", "20"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["steps_per_s"] > 0 and result["peak_mb"] > 0


@pytest.mark.parametrize("variant", ["slicing", "loop", "trainer"])  # quiet differs from trainer by one flag
def test_instructions_switches_counting_on_and_off_around_the_loop(tmp_path, variant):
    # the measured process without valgrind: this test plays the driver's part of the handshake
    flag = tmp_path / "flag"
    flag.write_text("")
    proc = subprocess.Popen(
        [sys.executable, BENCHMARKS / "instructions.py", "--child", variant, "linreg", "--steps", "20", "--flag", flag],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    switched = []
    deadline = time.monotonic() + 120
    while proc.poll() is None and time.monotonic() < deadline:
        state = flag.read_text()
        if state in ("on", "off"):
            switched.append(state)
            flag.write_text(f"{state}-done")
        time.sleep(0.01)
    if proc.poll() is None:
        proc.kill()  # stuck: the assertions below say how far it got
    _, stderr = proc.communicate(timeout=10)
    assert proc.returncode == 0, stderr
    assert switched == ["on", "off"]


def test_instructions_without_valgrind_says_so_in_one_line():
    import os

    out = subprocess.run(
        [sys.executable, BENCHMARKS / "instructions.py"], capture_output=True, text=True, timeout=120,
        env={**os.environ, "PATH": "/nonexistent"},  # no valgrind on it
    )  # fmt: skip
    assert out.returncode == 1
    assert out.stderr.strip() == (
        "valgrind is not installed (apt-get install valgrind); overhead.py measures time without it"
    )


@pytest.mark.parametrize("variant,checkpoints", [("loop", 0), ("trainer", 2), ("no-checkpoints", 0)])
def test_epochs_measures_each_variant(variant, checkpoints):
    config = Path(__file__).resolve().parents[1] / "configs" / "sqrt2.yaml"  # one-step epochs
    out = subprocess.run(
        [sys.executable, BENCHMARKS / "epochs.py", "--child", variant, "--config", config, "train.epochs=20"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["seconds"] > 0 and result["checkpoints"] == checkpoints  # trainer: last.pt and best.pt


def test_epochs_prints_its_table_with_the_overrides_applied():
    config = Path(__file__).resolve().parents[1] / "configs" / "sqrt2.yaml"
    out = subprocess.run(
        [sys.executable, BENCHMARKS / "epochs.py", "--rounds", "1", "--config", config, "train.epochs=7"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "sqrt2.yaml train.epochs=7: 7 steps in 7 epochs of 1" in out.stdout
    rows = first_column(out.stdout)
    assert rows == ["variant", "loop", "trainer", "no-checkpoints"]


def test_breakdown_prints_every_part():
    out = subprocess.run(
        [sys.executable, BENCHMARKS / "breakdown.py", "--rounds", "2", "--steps", "20"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    rows = first_column(out.stdout)
    assert rows == ["variant", "slicing", "data", "fit-one-log", "fit", "quiet-no-saves", "quiet", "trainer"]


# the new configs/mlp.yaml (one sample, full batch, no validation): no-ops once it is in
MLP_AS_TWINS = ["data.size=1", "data.batch_size=1", "data.val_fraction=0"]


@pytest.mark.parametrize(
    "name,max_steps",
    [("linear_regression", None), ("sqrt2", None), ("mlp", 25), ("two_layer_net", 25), ("lenet", 25), ("convnet", 25)],
)  # 25 steps: LeNet's and ConvNet's second epoch (23 steps each), after a validation and a schedule step
def test_twin_ends_with_the_parameters_of_its_trainer_run(tmp_path, name, max_steps):
    # the same model, data, seed and steps: the same numbers, bit for bit
    import torch

    from trainer.config import load_config
    from trainer.runs import execute_run

    sys.path.insert(0, str(BENCHMARKS))
    from twins import TWINS

    overrides = (MLP_AS_TWINS if name == "mlp" else []) + ([f"train.max_steps={max_steps}"] if max_steps else [])
    config = load_config(Path(__file__).resolve().parents[1] / "configs" / f"{name}.yaml", overrides)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the digits models at two threads on two busy cores: ten times slower
    try:
        result = execute_run(config, root=tmp_path, quiet=True, tensorboard=False)
        twin = TWINS[name](max_steps)
    finally:
        torch.set_num_threads(threads)
    saved = torch.load(result.run_dir / "checkpoints" / "last.pt", weights_only=True)["model"]
    assert twin.steps == result.summary["steps"]
    assert len(twin.params) == len(saved)
    for (key, ours), theirs in zip(saved.items(), twin.params):
        assert torch.equal(ours, theirs), key


def test_seeds_prints_a_row_per_config_with_numbers():
    out = subprocess.run(
        [sys.executable, BENCHMARKS / "seeds.py", "--rounds", "1", "--configs", "sqrt2", "--no-one-step", "--threads", "1"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert first_column(out.stdout) == ["config", "sqrt2"]
    row = next(line for line in out.stdout.splitlines() if line.startswith("| sqrt2 "))
    cells = [cell.strip() for cell in row.strip("|").split("|")][1:]
    assert int(cells[0]) == 200  # the config's steps, taken by both
    assert all(float(cell.removesuffix("x")) > 0 for cell in cells[1:])


def test_seeds_overrides_go_to_every_config_or_the_one_named():
    sys.path.insert(0, str(BENCHMARKS))
    from seeds import overrides_for

    given = ["train.log_every=5", "mlp:data.size=1", "sqrt2:train.epochs=2", "optimizer.name=a:b"]
    assert overrides_for("mlp", given) == ["train.log_every=5", "data.size=1", "optimizer.name=a:b"]
    assert overrides_for("lenet", given) == ["train.log_every=5", "optimizer.name=a:b"]


def test_event_writer_times_both_writers():
    out = subprocess.run(
        [sys.executable, str(BENCHMARKS / "event_writer.py"), "--rounds", "1", "--events", "20"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert [line.split(":")[0] for line in lines] == ["tensorboard RecordWriter", "trainer EventFile"]
    assert all(float(line.split(": ")[1].split()[0]) > 0 for line in lines)
