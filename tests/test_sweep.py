"""`trainer sweep`: sweep files, trials as run folders on a real Optuna storage, resume after a kill, workers."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from pathlib import Path
from unittest import mock

import optuna
import pytest
import torch
import yaml
from conftest import trainer_executable
from test_cli import in_process

from trainer import sweep as sweeps
from trainer.config import load_config
from trainer.runs import execute_run

BASE = {
    "name": "tiny",
    "seed": 0,
    "device": "cpu",
    "model": {"name": "mlp", "hidden": [16]},
    "data": {"name": "digits", "image_size": 8, "batch_size": 64, "val_fraction": 0.2},
    "loss": {"name": "cross_entropy"},
    "optimizer": {"name": "sgd", "lr": 0.05},
    "train": {"epochs": 2, "log_every": 5, "checkpoint_every": 3},
}
# a 2x2 grid: cells in order (0.01, 4) (0.01, 12) (0.1, 4) (0.1, 12); the second is the first to reach step 8
GRID = {"config": "base.yaml", "method": "grid", "metric": "val_accuracy", "parameters": {"optimizer.lr": [0.01, 0.1], "train.max_steps": [4, 12]}}
QUICK = {"OMP_NUM_THREADS": "1"}


def write(folder: Path, name: str, data: dict) -> Path:
    path = folder / name
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


@pytest.fixture
def sweep_dir(tmp_path: Path) -> Path:
    write(tmp_path, "base.yaml", BASE)
    write(tmp_path, "grid.yaml", GRID)
    return tmp_path


def study_of(folder: Path, name: str) -> optuna.Study:
    from optuna.storages.journal import JournalFileBackend

    storage = optuna.storages.JournalStorage(JournalFileBackend(str(folder / "runs" / name / "optuna.journal")))
    return optuna.load_study(study_name=name, storage=storage)


def states(study: optuna.Study) -> list[str]:
    return sorted(t.state.name for t in study.get_trials())


def resumes(trial_dir: Path) -> int:
    return len(json.loads((trial_dir / "env.json").read_text()).get("resumes", []))


def model_weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    return torch.load(checkpoint, map_location="cpu", weights_only=True)["model"]


def children(pid: int) -> list[int]:
    try:
        return [int(c) for task in Path(f"/proc/{pid}/task").iterdir() for c in (task / "children").read_text().split()]
    except OSError:  # it ended meanwhile
        return []


def stopped_child(pid: int, timeout: float = 120) -> int:
    """The pid of `pid`'s child once it is stopped (SIGSTOP, sent by the test aid)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for child in children(pid):
            with contextlib.suppress(OSError):
                if Path(f"/proc/{child}/stat").read_text().rsplit(")", 1)[1].split()[0] == "T":
                    return child
        time.sleep(0.05)
    raise AssertionError("no worker stopped itself in time")


def start_sweep(cwd: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    return subprocess.Popen(
        [trainer_executable(), "sweep", *args], cwd=cwd, env={**os.environ, **QUICK, **(env or {})},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )  # fmt: skip


def sweep_in_process(cwd: Path, *args: str):
    """`trainer sweep ARGS...` with the command in this process (Typer's CliRunner, see
    test_cli.in_process) and its workers real processes, as the console script starts them.

    For the calls whose command line a console-script call beside them or in another test makes (a
    sweep set up, run again, gone on with; what the workers do): each saves a process start, the
    torch and optuna imports and the first trial's check, ~7 s of CPU. Every refusal, failure and
    signal a user meets stays with the console script."""
    with mock.patch.dict(os.environ, QUICK):  # the workers' environment
        return in_process("sweep", *args, cwd=cwd)


# ---------------------------------------------------------------------------------------------- crash and resume


def test_a_grid_killed_mid_trial_finishes_as_if_never_stopped(sweep_dir: Path, cli) -> None:
    # the worker freezes itself after step 8 of the first 12-step trial (trial-0001), after its save at
    # step 6; then the whole sweep is killed with SIGKILL, as a crash or an OOM killer would
    proc = start_sweep(sweep_dir, "grid.yaml", env={"TRAINER_STOP_AT_STEP": "8:SIGSTOP"})
    stopped_child(proc.pid)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    folder = sweep_dir / "runs" / "grid"
    assert states(study_of(sweep_dir, "grid")) == ["COMPLETE", "RUNNING", "WAITING", "WAITING"]
    assert not (folder / "trial-0001" / "summary.json").exists()

    again = cli("sweep", "grid.yaml", env=QUICK)
    assert again.code == 0, again.output
    assert "4 complete" in again.stderr
    study = study_of(sweep_dir, "grid")
    assert states(study) == ["COMPLETE"] * 4
    assert sorted(p.name for p in folder.glob("trial-*")) == [f"trial-000{i}" for i in range(4)]
    # nothing trained twice: only the interrupted trial was resumed, once
    assert [resumes(folder / f"trial-000{i}") for i in range(4)] == [0, 1, 0, 0]
    assert (folder / "best.yaml").is_file() and again.stdout.strip().splitlines()[-1] == str(Path("runs") / "grid")

    # the interrupted trial ends with the parameters of the same trial never interrupted (trained in
    # this process, on one thread as the worker was: the weights are compared bit for bit)
    overrides = ["optimizer.lr=0.01", "train.max_steps=12", "train.monitor=val_accuracy", "train.mode=max"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        alone = execute_run(load_config(sweep_dir / "base.yaml", overrides), run_dir=sweep_dir / "alone", quiet=True)
    finally:
        torch.set_num_threads(threads)
    assert alone.exit_code == 0, alone.error
    resumed, uninterrupted = model_weights(folder / "trial-0001/checkpoints/last.pt"), model_weights(sweep_dir / "alone/checkpoints/last.pt")
    assert resumed.keys() == uninterrupted.keys()
    assert all(torch.equal(resumed[k], uninterrupted[k]) for k in resumed)


def test_a_closed_terminal_stops_the_workers_resumably(sweep_dir: Path, cli) -> None:
    proc = start_sweep(sweep_dir, "grid.yaml", "--workers", "2", env={"TRAINER_STOP_AT_STEP": "8:SIGSTOP"})
    stopped_child(proc.pid)
    # a closed terminal's SIGHUP, which the sweep command passes on to its workers as SIGTERM: the
    # path a SIGTERM to it takes from there
    os.kill(proc.pid, signal.SIGHUP)
    while proc.poll() is None:  # a frozen worker, woken, sees its SIGTERM: it saves and stops
        for child in children(proc.pid):
            os.kill(child, signal.SIGCONT)
        time.sleep(0.2)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    assert "run the same command again" in err
    assert "RUNNING" in states(study_of(sweep_dir, "grid"))

    again = sweep_in_process(sweep_dir, "grid.yaml", "--workers", "2")  # the console script's resume: the test above
    assert again.code == 0, again.output
    assert states(study_of(sweep_dir, "grid")) == ["COMPLETE"] * 4


# ---------------------------------------------------------------------------------------------- workers


def test_two_machines_share_one_sweep_on_a_postgresql_server(sweep_dir: Path, postgres_server, cli) -> None:
    url = postgres_server.create_database("shared_sweep")
    write(sweep_dir, "grid.yaml", {**GRID, "set": {"train.max_steps": 3}, "parameters": {"optimizer.lr": [0.01, 0.02], "seed": [1, 2]}})
    # two sweep commands at once, as on two machines: each its own runs folder, one storage
    machines = [start_sweep(sweep_dir, "grid.yaml", "--storage", url, "--runs-root", root) for root in ("a", "b")]
    for proc in machines:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
    study = optuna.load_study(study_name="grid", storage=url)
    trials = study.get_trials()
    assert [t.state.name for t in trials] == ["COMPLETE"] * 4
    assert len({(t.params["optimizer.lr"], t.params["seed"]) for t in trials}) == 4
    folders = [p.name for root in ("a", "b") for p in (sweep_dir / root / "grid").glob("trial-*")]
    assert sorted(folders) == [f"trial-000{i}" for i in range(4)]  # each trial trained on one machine only
    again = sweep_in_process(sweep_dir, "grid.yaml", "--storage", url, "--runs-root", "a")
    assert again.code == 0 and "running" not in again.stderr and "4 complete" in again.stderr
    assert len(optuna.load_study(study_name="grid", storage=url).get_trials()) == 4
    elsewhere = cli("sweep", "grid.yaml", "--runs-root", "a")  # without --storage it would start again from nothing
    assert elsewhere.code == 2 and "keeps its trials in --storage postgresql://trainer:***@" in elsewhere.stderr
    recorded = (sweep_dir / "a" / "grid" / "sweep.yaml").read_text()
    assert postgres_server.password not in recorded and "storage: postgresql://trainer:***@" in recorded


def test_two_workers_never_run_the_same_cell(sweep_dir: Path) -> None:
    write(sweep_dir, "six.yaml", {**GRID, "set": {"train.max_steps": 3}, "parameters": {"optimizer.lr": [0.01, 0.02, 0.03], "seed": [1, 2]}})
    result = sweep_in_process(sweep_dir, "six.yaml", "--workers", "2")  # the console script's --workers 2: the SIGTERM test
    assert result.code == 0, result.output
    trials = study_of(sweep_dir, "six").get_trials()
    cells = [(t.params["optimizer.lr"], t.params["seed"]) for t in trials]
    assert len(cells) == 6 and len(set(cells)) == 6
    assert {t.state.name for t in trials} == {"COMPLETE"}
    for t in trials:  # each folder trained its own cell
        config = yaml.safe_load((sweep_dir / "runs" / "six" / f"trial-{t.number:04d}" / "config.yaml").read_text())
        assert (config["optimizer"]["lr"], config["seed"]) == (t.params["optimizer.lr"], t.params["seed"])


def test_worker_devices_one_gpu_each_round_robin() -> None:
    assert [sweeps.worker_device("auto", i, 2) for i in range(3)] == ["cuda:0", "cuda:1", "cuda:0"]
    assert sweeps.worker_device("cuda", 1, 4) == "cuda:1"
    assert sweeps.worker_device("auto", 0, 0) is None  # no GPU: the config's device (cpu)
    assert sweeps.worker_device("cuda:3", 0, 4) is None  # a device the config pins stays
    assert sweeps.worker_device("cpu", 1, 4) is None


def test_a_worker_stopped_alone_ends_the_sweep_unfinished(sweep_dir: Path, cli) -> None:
    write(sweep_dir, "grid.yaml", {**GRID, "parameters": {"optimizer.lr": [0.01, 0.1]}, "set": {"train.max_steps": 4}})
    # the worker gets SIGTERM after step 2 of its first trial, from no one the sweep command knows of
    stopped = cli("sweep", "grid.yaml", env={**QUICK, "TRAINER_STOP_AT_STEP": "2"})
    assert stopped.code == 1, stopped.output
    assert "sweep worker 0 ended with exit code 143 (stopped by a signal sent to it alone)" in stopped.stderr
    assert states(study_of(sweep_dir, "grid")) == ["RUNNING", "WAITING"]
    again = sweep_in_process(sweep_dir, "grid.yaml")
    assert again.code == 0 and states(study_of(sweep_dir, "grid")) == ["COMPLETE", "COMPLETE"]
    assert resumes(sweep_dir / "runs" / "grid" / "trial-0000") == 1


# ---------------------------------------------------------------------------------------------- methods, failures, changes


def test_random_and_tpe_run_their_trials_once(sweep_dir: Path, cli) -> None:
    space = {"optimizer.lr": {"log_uniform": [0.001, 0.1]}, "train.max_steps": {"int": [2, 4]}}
    write(sweep_dir, "rnd.yaml", {"config": "base.yaml", "method": "random", "trials": 3, "parameters": space})
    write(sweep_dir, "tpe.yaml", {"config": "base.yaml", "method": "tpe", "trials": 2, "parameters": space})
    for name in ("rnd", "tpe"):
        # the random sweep through the console script; the rest through the same command in process
        first = cli("sweep", "rnd.yaml", env=QUICK) if name == "rnd" else sweep_in_process(sweep_dir, "tpe.yaml")
        assert first.code == 0, first.output
        trials = study_of(sweep_dir, name).get_trials()
        assert len(trials) == (3 if name == "rnd" else 2) and {t.state.name for t in trials} == {"COMPLETE"}
        assert all(0.001 <= t.params["optimizer.lr"] <= 0.1 and 2 <= t.params["train.max_steps"] <= 4 for t in trials)
        assert first.stderr.count(" complete:") == len(trials)
        again = sweep_in_process(sweep_dir, f"{name}.yaml")  # done: nothing more runs
        assert again.code == 0 and " complete:" not in again.stderr and " running:" not in again.stderr
        assert len(study_of(sweep_dir, name).get_trials()) == len(trials)
    # more trials: the random draws so far stay, and one more runs
    more = sweep_in_process(sweep_dir, "rnd.yaml", "--trials", "4")
    assert more.code == 0, more.output
    assert more.stderr.count(" complete:") == 1 and len(study_of(sweep_dir, "rnd").get_trials()) == 4


def test_failed_trials_are_listed_and_rerun_only_when_asked(sweep_dir: Path, cli) -> None:
    write(sweep_dir, "nan.yaml", {**GRID, "set": {"train.max_steps": 3}, "parameters": {"optimizer.lr": [0.01, 1.0e30]}})
    first = cli("sweep", "nan.yaml", env=QUICK)
    assert first.code == 1, first.output
    assert "failed: trial-0001" in first.stderr and "not finite" in first.stderr
    again = sweep_in_process(sweep_dir, "nan.yaml")
    assert again.code == 1 and len(study_of(sweep_dir, "nan").get_trials()) == 2  # listed, not re-run
    retry = sweep_in_process(sweep_dir, "nan.yaml", "--retry-failed")
    trials = study_of(sweep_dir, "nan").get_trials()
    assert len(trials) == 3 and trials[2].user_attrs["retry_of"] == 1 and trials[2].params == trials[1].params
    assert (sweep_dir / "runs" / "nan" / "trial-0002" / "summary.json").is_file()
    assert retry.code == 1  # it fails again, in its own folder


def test_median_pruning_stops_a_hopeless_trial(sweep_dir: Path) -> None:
    write(sweep_dir, "prune.yaml", {**GRID, "prune": "median", "set": {"train.epochs": 3}, "parameters": {"optimizer.lr": [0.1, 0.05, 1.0e-6]}})
    result = sweep_in_process(sweep_dir, "prune.yaml")  # the pruning is the workers'
    assert result.code == 0, result.output
    trials = study_of(sweep_dir, "prune").get_trials()
    assert [t.state.name for t in trials] == ["COMPLETE", "COMPLETE", "PRUNED"]
    summary = json.loads((sweep_dir / "runs" / "prune" / "trial-0002" / "summary.json").read_text())
    assert summary["status"] == "pruned" and summary["epochs"] == 1  # of 3


def test_a_changed_sweep_file_is_refused_naming_the_keys(sweep_dir: Path, cli) -> None:
    write(sweep_dir, "grid.yaml", {**GRID, "set": {"train.max_steps": 2}, "parameters": {"optimizer.lr": [0.01, 0.1]}})
    assert sweep_in_process(sweep_dir, "grid.yaml").code == 0
    write(sweep_dir, "grid.yaml", {**GRID, "set": {"train.max_steps": 3}, "parameters": {"optimizer.lr": [0.01, 0.1]}})
    refused = cli("sweep", "grid.yaml", env=QUICK)
    assert refused.code == 2 and "Traceback" not in refused.output
    assert "set.train.max_steps (was 2, now 3)" in refused.stderr and "--force" in refused.stderr
    forced = sweep_in_process(sweep_dir, "grid.yaml", "--force")  # goes on: both cells are done already
    assert forced.code == 0, forced.output
    assert len(study_of(sweep_dir, "grid").get_trials()) == 2
    # a grid's values are Optuna's choices for the parameter, which a study keeps: never changed, even forced
    write(sweep_dir, "grid.yaml", {**GRID, "set": {"train.max_steps": 3}, "parameters": {"optimizer.lr": [0.01, 0.2]}})
    still = sweep_in_process(sweep_dir, "grid.yaml", "--force")  # the refusal's path: the console script's above
    assert still.code == 2 and "parameters.optimizer.lr: a running sweep cannot change" in still.stderr
    assert len(study_of(sweep_dir, "grid").get_trials()) == 2


# ---------------------------------------------------------------------------------------------- bad input


def test_every_problem_of_a_sweep_file_at_once_with_its_line(sweep_dir: Path, cli) -> None:
    (sweep_dir / "bad.yaml").write_text(
        "config: base.yaml\n"
        "metirc: val_accuracy\n"
        "method: grdi\n"
        "parameters:\n"
        "  optimizer.lrr: [0.1, 0.2]\n"
        "  model.hidden: {log_unifrom: [1, 2]}\n"
        "  optimizer.momentum: {uniform: [0.9, 0.1]}\n"
        "  seed: 3\n"
    )
    result = cli("sweep", "bad.yaml")
    assert result.code == 2 and "Traceback" not in result.output
    err = result.stderr
    assert "line 2, metirc: unknown key 'metirc'; did you mean 'metric'?" in err
    assert "line 3, method: 'grdi' is not one of grid, random, tpe; did you mean 'grid'?" in err
    assert "line 6, parameters.model.hidden: 'log_unifrom' is not a distribution; did you mean 'log_uniform'?" in err
    assert "line 7, parameters.optimizer.momentum: uniform needs low < high, got [0.9, 0.1]" in err
    assert "line 8, parameters.seed: 3 does not vary" in err
    assert not (sweep_dir / "runs").exists()


def test_a_parameter_that_is_not_a_config_key_gets_a_did_you_mean(sweep_dir: Path, cli) -> None:
    write(sweep_dir, "typo.yaml", {**GRID, "parameters": {"optimizer.lrr": [0.1, 0.2], "optimzer.lr": [0.1]}})
    result = cli("sweep", "typo.yaml")
    assert result.code == 2
    assert "line 5, parameters.optimizer.lrr: sgd() has no argument 'lrr'; did you mean 'lr'?" in result.stderr
    assert "did you mean 'optimizer'?" in result.stderr
    assert not (sweep_dir / "runs").exists()


def test_a_huge_grid_needs_a_cap(sweep_dir: Path, cli) -> None:
    # 20,000 cells; the file's check loads a trial config per listed value and range end, so few of those
    huge = {**GRID, "set": {"train.max_steps": 1}, "parameters": {"seed": {"int": [0, 9999]}, "optimizer.lr": [0.1, 0.2]}}
    write(sweep_dir, "huge.yaml", huge)
    refused = cli("sweep", "huge.yaml")
    assert refused.code == 2 and "20,000 cells" in refused.stderr and "trials" in refused.stderr
    assert not (sweep_dir / "runs").exists()
    capped = sweep_in_process(sweep_dir, "huge.yaml", "--trials", "2")
    assert capped.code == 0, capped.output
    assert len(study_of(sweep_dir, "huge").get_trials()) == 2


def test_an_unreachable_storage_is_named_without_its_password(sweep_dir: Path, cli) -> None:
    result = cli("sweep", "grid.yaml", "--storage", "postgresql://trainer:secret@127.0.0.1:9/sweeps")
    assert result.code == 2, result.output
    assert "cannot open --storage postgresql://trainer:***@127.0.0.1:9/sweeps" in result.stderr
    assert "secret" not in result.output and not (sweep_dir / "runs").exists()


def test_a_folder_of_runs_is_not_taken_for_a_sweep(sweep_dir: Path, cli) -> None:
    (sweep_dir / "runs" / "grid" / "20261201-101500").mkdir(parents=True)
    result = cli("sweep", "grid.yaml")
    assert result.code == 2 and "not a sweep's folder" in result.stderr
    assert [p.name for p in (sweep_dir / "runs" / "grid").iterdir()] == ["20261201-101500"]


def test_parameter_forms() -> None:
    problems: list[str] = []
    assert sweeps._parameter("a", [1, 2], problems.append).grid() == [1, 2]
    assert sweeps._parameter("a", {"int": [2, 4]}, problems.append).grid() == [2, 3, 4]
    assert sweeps._parameter("a", {"log_uniform": [0.0, 1.0]}, problems.append) is None
    assert sweeps._parameter("a", {"choice": [1, 1]}, problems.append) is None
    assert sweeps._parameter("a", {"int": [1.5, 3]}, problems.append) is None
    assert problems == [
        "log_uniform needs low > 0 (a logarithm of 0.0 does not exist), got [0.0, 1.0]",
        "[1, 1] gives a value twice; each value once",
        "int needs whole numbers [low, high], got [1.5, 3]",
    ]
    grid = [sweeps.Parameter("a", "choice", (1, 2)), sweeps.Parameter("b", "choice", ("a", "b", "c"))]
    assert [sweeps._cell(grid, i) for i in range(6)] == [
        [1, "a"], [1, "b"], [1, "c"], [2, "a"], [2, "b"], [2, "c"],
    ]  # fmt: skip
    huge = sweeps._parameter("seed", {"int": [0, 10**9]}, problems.append)  # never listed
    assert (huge.size(), huge.value(7)) == (10**9 + 1, 7)
    # a capped grid drawn again with a larger cap keeps the cells it had
    assert sweeps._draw_cells(30, 6, 0)[:5] == sweeps._draw_cells(30, 5, 0)
    assert sweeps.mask_password("postgresql://u:p@h:5/db") == "postgresql://u:***@h:5/db"
    assert sweeps.mask_password("sqlite:///x.db") == "sqlite:///x.db"
