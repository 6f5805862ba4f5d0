"""The command line through the real console script in a subprocess, as a user meets it."""

from __future__ import annotations

import functools
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import CONFIGS, REPO, Result
from datafiles import make_mnist

SEED_CONFIGS = sorted(p.relative_to(CONFIGS).as_posix() for p in CONFIGS.glob("*.yaml"))
MNIST_CONFIGS = sorted(p.relative_to(CONFIGS).as_posix() for p in CONFIGS.glob("mnist/*.yaml"))


def run_folder(result) -> Path:
    """`trainer run` prints the run folder as its last line on stdout (relative to where it ran)."""
    return result.cwd / result.stdout.strip().splitlines()[-1]


def metrics(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def summary(folder: Path) -> dict:
    return json.loads((folder / "summary.json").read_text())


@functools.cache
def _command(app):
    """The click command of a Typer app, built once: CliRunner.invoke builds it anew at every call."""
    import typer.main

    return typer.main.get_command(app)


def in_process(*args, cwd: Path) -> Result:
    """`trainer ARGS...` run in this process through Typer's CliRunner, from `cwd`.

    For the many cases of one code path (bad configs, bad overrides): each through the console script
    paid a process start and a torch import, ~5 s of CPU, for a check of a few milliseconds. The tests
    that start the console script itself keep the exit codes and messages a user meets covered. An
    exception that escaped the command would be a traceback there: it fails the test here."""
    import contextlib
    import traceback
    from unittest import mock

    import typer.testing
    from typer.testing import CliRunner

    from trainer.cli import app

    with contextlib.chdir(cwd), mock.patch.object(typer.testing, "_get_command", _command):
        result = CliRunner(env={"COLUMNS": "120", "TRAINER_DEBUG": None}).invoke(app, [str(a) for a in args])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise AssertionError("".join(traceback.format_exception(*result.exc_info)))
    return Result(result.exit_code, result.stdout, result.stderr, cwd)


# ---------------------------------------------------------------------------------------------
# every shipped config runs


def test_the_design_seed_configs_are_all_there():
    expected = {"linear_regression.yaml", "mlp.yaml", "two_layer_net.yaml", "lenet.yaml", "convnet.yaml", "sqrt2.yaml"}
    assert expected <= set(SEED_CONFIGS)
    assert {"mnist/lenet.yaml", "mnist/convnet.yaml"} <= set(MNIST_CONFIGS)


class SeedRuns:
    """The seed configs' runs by config name, each run on first use (see `seed_runs`)."""

    # two_layer_net and mlp log every step here so their curves can be compared with the notebooks'
    OVERRIDES = {"two_layer_net.yaml": ["train.log_every=1"], "mlp.yaml": ["train.log_every=1"]}

    def __init__(self, shared: Path) -> None:
        self.shared = shared
        self.work = shared / "seed_runs"

    def __getitem__(self, name: str):
        from types import SimpleNamespace

        from filelock import FileLock

        from conftest import trainer_executable

        record = self.shared / f"seed_run_{name}.json"
        with FileLock(str(self.shared / f"seed_run_{name}.lock")):
            if not record.exists():
                self.work.mkdir(exist_ok=True)
                proc = subprocess.run(
                    [trainer_executable(), "run", str(CONFIGS / name), *self.OVERRIDES.get(name, [])],
                    cwd=self.work, capture_output=True, text=True, timeout=600,
                    # one thread: the other worker has the other core, and two threads on one busy core
                    # made the ConvNet's run ten times slower (145 s of the suite's 15 minutes)
                    env={**os.environ, "OMP_NUM_THREADS": "1"},
                )  # fmt: skip
                result = {"returncode": proc.returncode, "stdout": proc.stdout, "stderr": proc.stderr, "cwd": str(self.work)}
                record.write_text(json.dumps(result))
        return SimpleNamespace(**{**json.loads(record.read_text()), "cwd": self.work})


@pytest.fixture(scope="session")
def seed_runs(tmp_path_factory):
    """Each seed config run once, in full, through the console script (shared by the checks below).

    Once per test session, not per xdist worker, and each config on its own: the first worker to ask
    for a config runs it under that config's file lock in the folder the workers share, and the others
    read what it recorded. (One lock for all of them made the other worker wait for every seed run,
    several minutes, before its first check of one.)
    """
    shared = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        shared = shared.parent  # the session's folder, above each worker's own
    return SeedRuns(shared)


@pytest.mark.parametrize("name", SEED_CONFIGS)
def test_seed_config_runs_to_completion(seed_runs, name):
    proc = seed_runs[name]
    assert proc.returncode == 0, proc.stdout + proc.stderr
    folder = proc.cwd / proc.stdout.strip().splitlines()[-1]
    assert folder.parts[-3:-1] == ("runs", yaml.safe_load((CONFIGS / name).read_text())["name"])
    for file in ("config.yaml", "env.json", "metrics.jsonl", "summary.json", "checkpoints/last.pt", "checkpoints/best.pt"):
        assert (folder / file).exists(), file
    assert list(folder.glob("events.out.tfevents.*"))
    assert summary(folder)["status"] == "completed"
    assert "Traceback" not in proc.stdout + proc.stderr


def _folder(seed_runs, name) -> Path:
    proc = seed_runs[name]
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.cwd / proc.stdout.strip().splitlines()[-1]


def test_linear_regression_predicts_8_at_4(seed_runs):
    from trainer.models import MODELS

    state = torch.load(_folder(seed_runs, "linear_regression.yaml") / "checkpoints/last.pt", weights_only=True)
    model = MODELS.build("linear_regression")
    model.load_state_dict(state["model"])
    assert model(torch.tensor([[4.0]])).item() == pytest.approx(8.0, abs=0.5)
    assert state["train_state"]["epoch"] == 40


def test_two_layer_net_follows_the_notebook_curve(seed_runs):
    folder = _folder(seed_runs, "two_layer_net.yaml")
    train = {m["step"]: m["loss"] for m in metrics(folder) if m["split"] == "train"}
    assert train[1] > 1e6  # N(0,1) weights: the notebook starts near 1e7
    assert 1e2 < train[100] < 1e4  # ~1e3 at step 100
    assert train[500] < 1e-2
    assert max(train) == 500
    assert summary(folder)["final"]["train_loss"] < 1e-2


def test_sqrt2_finds_the_square_root(seed_runs):
    state = torch.load(_folder(seed_runs, "sqrt2.yaml") / "checkpoints/last.pt", weights_only=True)
    assert abs(state["model"]["x"].item() - math.sqrt(2)) < 1e-3


def test_lenet_on_digits_reaches_95_percent(seed_runs):
    result = summary(_folder(seed_runs, "lenet.yaml"))
    assert result["final"]["val_accuracy"] >= 0.95
    assert result["epochs"] == 10


def test_convnet_on_digits_learns(seed_runs):
    assert summary(_folder(seed_runs, "convnet.yaml"))["final"]["val_accuracy"] >= 0.9


def test_mlp_fits_its_one_sample_as_the_notebook_did(seed_runs):
    folder = _folder(seed_runs, "mlp.yaml")
    train = {m["step"]: m["loss"] for m in metrics(folder) if m["split"] == "train"}
    assert 0.2 < train[1] < 0.6  # the notebook starts near 0.37
    assert train[500] < 1e-5 and summary(folder)["final"]["train_loss"] < 1e-5
    assert max(train) == 500


def test_mlp_on_1024_samples_learns_slowly(seed_runs):
    folder = _folder(seed_runs, "mlp_1024.yaml")
    train = [m["loss"] for m in metrics(folder) if m["split"] == "train"]
    # plain SGD at the notebook's lr 0.01 is slow on this problem: ~0.39 -> ~0.27 in 500 steps
    assert train[-1] < 0.8 * train[0]
    assert summary(folder)["steps"] == 500


def test_tensorboard_events_hold_the_expected_tags_and_steps(seed_runs):
    folder = _folder(seed_runs, "lenet.yaml")
    events = EventAccumulator(str(folder))
    events.Reload()
    scalars = set(events.Tags()["scalars"])
    assert {"train/loss", "val/loss", "val/accuracy", "train/lr", "train/samples_per_s"} <= scalars
    # 10 epochs of 23 steps (1437 samples / 64), a train point every 10 steps plus the last
    assert [e.step for e in events.Scalars("train/loss")] == [*range(10, 230, 10), 230]
    assert [e.step for e in events.Scalars("val/loss")] == list(range(23, 231, 23))
    accuracy = events.Scalars("val/accuracy")[-1].value
    assert accuracy == pytest.approx(summary(folder)["final"]["val_accuracy"], abs=1e-6)
    # the cosine schedule moved the learning rate down from 0.05
    lrs = [e.value for e in events.Scalars("train/lr")]
    assert lrs[0] == pytest.approx(0.05) and lrs[-1] < 0.01
    assert events.PluginTagToContent("hparams")  # the HParams tab has this run


def test_metrics_jsonl_matches_design(seed_runs):
    rows = metrics(_folder(seed_runs, "lenet.yaml"))
    assert {"step", "epoch", "split", "loss"} <= set(rows[0])
    assert {r["split"] for r in rows} == {"train", "val"}
    assert all("accuracy" in r for r in rows if r["split"] == "val")


def test_run_folder_config_is_the_resolved_config(seed_runs):
    folder = _folder(seed_runs, "lenet.yaml")
    resolved = yaml.safe_load((folder / "config.yaml").read_text())
    assert resolved["model"] == {"name": "lenet", "num_classes": 10, "in_channels": 1}
    assert resolved["data"]["image_size"] == 32
    assert resolved["scheduler"]["T_max"] == 10
    assert resolved["train"]["log_every"] == 10
    env = json.loads((folder / "env.json").read_text())
    assert env["device"] == "cpu" and env["torch"] == torch.__version__ and "run" in env["command"]


# ---------------------------------------------------------------------------------------------
# MNIST configs on IDX files the test writes


@pytest.mark.parametrize("name", MNIST_CONFIGS)
def test_mnist_configs_run_on_small_idx_files(cli, tmp_path, name):
    raw_config = yaml.safe_load((CONFIGS / name).read_text())
    folder = "FashionMNIST" if raw_config["data"]["name"] == "fashion_mnist" else "MNIST"
    make_mnist(tmp_path / "data", folder=folder)
    result = cli("run", CONFIGS / name, "train.epochs=1", "data.batch_size=8")
    assert result.code == 0, result.output
    done = summary(run_folder(result))
    assert done["status"] == "completed" and done["epochs"] == 1
    assert "val_accuracy" in done["final"]  # the test split is the validation split


def test_mnist_missing_files_is_a_clear_error(cli):
    result = cli("run", CONFIGS / "mnist/lenet.yaml")
    assert result.code == 2
    assert "data.root" in result.stderr and "train-images-idx3-ubyte" in result.stderr
    assert "Traceback" not in result.output
    assert not (Path(result.stdout.strip() or ".") / "summary.json").exists()


# ---------------------------------------------------------------------------------------------
# overrides, options and the other commands


def test_overrides_shorten_a_run(cli):
    result = cli("run", CONFIGS / "lenet.yaml", "train.epochs=1", "optimizer.lr=3e-2", "model.name=lenet")
    assert result.code == 0, result.output
    folder = run_folder(result)
    resolved = yaml.safe_load((folder / "config.yaml").read_text())
    assert resolved["train"]["epochs"] == 1 and resolved["optimizer"]["lr"] == 0.03
    assert summary(folder)["epochs"] == 1


def test_run_dir_writes_exactly_there_and_refuses_a_used_one(cli, tmp_path, write_config, tiny):
    config = write_config(tiny())
    target = tmp_path / "my-run"
    first = in_process("run", config, "--run-dir", target, cwd=tmp_path)  # the refusal below is the console script's
    assert first.code == 0, first.output
    assert run_folder(first) == target.resolve() and (target / "summary.json").exists()
    before = (target / "metrics.jsonl").read_bytes()
    second = cli("run", config, "--run-dir", target)
    assert second.code == 2
    assert "already holds a run" in second.stderr and "Traceback" not in second.output
    assert (target / "metrics.jsonl").read_bytes() == before  # nothing already on disk lost


def test_two_runs_never_share_a_folder(cli, write_config, tiny, tmp_path):
    config = write_config(tiny())
    first, second = in_process("run", config, "-q", cwd=tmp_path), cli("run", config, "-q")
    assert first.code == second.code == 0
    assert run_folder(first) != run_folder(second)
    assert run_folder(first).parent == run_folder(second).parent


def test_quiet_prints_only_the_run_folder(cli, write_config, tiny):
    result = cli("run", write_config(tiny()), "--quiet")
    assert result.code == 0
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1 and (result.cwd / lines[0] / "summary.json").exists()


def test_plain_output_when_not_a_terminal(cli, write_config, tiny):
    result = cli("run", write_config(tiny()))
    assert result.code == 0
    assert "\x1b[" not in result.stdout  # no ANSI codes in a log file
    assert "epoch 2/2" in result.stdout and "loss" in result.stdout
    assert "no CUDA or MPS device found" in result.stdout  # the device and why
    assert "tensorboard --logdir runs" in result.stdout


def test_device_option_overrides_config(cli, write_config, tiny):
    result = cli("run", write_config(tiny()), "--device", "cpu", "-q")
    assert result.code == 0
    assert json.loads((run_folder(result) / "env.json").read_text())["device"] == "cpu"


def test_list_models_shows_every_model(cli):
    from trainer.models import MODELS

    result = cli("list-models")
    assert result.code == 0
    # the built-in ones: other test modules register models of their own in this process
    built_in = [entry.name for entry in MODELS if entry.factory.__module__.startswith("trainer.")]
    assert len(built_in) >= 6
    for name in built_in:
        assert name in result.stdout
    assert "61,706" in result.stdout  # LeNet-5's parameter count
    assert "1x32x32" in result.stdout


@pytest.mark.parametrize("kind,expected", [("datasets", "digits"), ("losses", "cross_entropy"), ("optimizers", "adamw"), ("schedulers", "cosine")])
def test_list_registries(tmp_path, kind, expected):
    # in process: test_list_models_shows_every_model starts the console script for the same command
    result = in_process("list", kind, cwd=tmp_path)
    assert result.code == 0 and expected in result.stdout


def test_list_unknown_kind_is_usage_error(cli):
    result = cli("list", "widgets")
    assert result.code == 2 and "Traceback" not in result.output


def test_show_config_prints_inferred_sizes(cli, tmp_path):
    csv = tmp_path / "table.csv"
    csv.write_text("a,b,c,target\n" + "\n".join(f"{i},{i % 3},{i * 0.5},{2 * i}" for i in range(20)) + "\n")
    config = tmp_path / "csv.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "model": {"name": "mlp", "hidden": 16},
                "data": {"name": "csv", "path": str(csv), "target": "target"},
                "loss": {"name": "mse"},
                "optimizer": {"name": "adam", "lr": "3e-4"},
            }
        )
    )
    result = cli("show-config", config)
    assert result.code == 0, result.output
    shown = yaml.safe_load(result.stdout)
    assert shown["model"]["in_features"] == 3 and shown["model"]["out_features"] == 1
    assert shown["optimizer"]["lr"] == pytest.approx(3e-4)  # a string to PyYAML, a number here
    assert shown["name"] == "csv" and shown["train"]["log_every"] == 10  # defaults filled in
    # and the MLP on the CSV trains with no sizes in the YAML
    assert in_process("run", config, "train.epochs=1", "-q", cwd=tmp_path).code == 0


def test_validate_builds_and_pushes_one_batch(cli):
    result = cli("validate", CONFIGS / "lenet.yaml")
    assert result.code == 0, result.output
    assert "valid" in result.stdout and "61,706" in result.stdout
    assert not (Path(result.stdout) / "runs").exists()


def test_validate_reports_a_shape_mismatch_in_words(cli):
    result = cli("validate", CONFIGS / "lenet.yaml", "data.image_size=28")
    assert result.code == 2
    assert "lenet" in result.stderr and "data.image_size=32" in result.stderr
    assert "Traceback" not in result.output


def test_help_does_not_import_torch():
    code = (
        "import sys; from typer.testing import CliRunner; from trainer.cli import app; "
        "r = CliRunner().invoke(app, ['--help']); assert r.exit_code == 0, r.output; "
        "print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    assert out.stdout.strip() == "False"


def test_python_dash_m_trainer_works(tmp_path):
    out = subprocess.run([sys.executable, "-m", "trainer", "--help"], capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 0 and "run" in out.stdout


# ---------------------------------------------------------------------------------------------
# bad input: one clear message, no traceback, exit 2, nothing written


BAD_CONFIGS = {
    "unknown model": ({"model": {"name": "lenett"}}, ["model.name", "lenett", "did you mean 'lenet'"]),
    "unknown dataset": ({"data": {"name": "digitz"}}, ["data.name", "digitz", "did you mean 'digits'"]),
    "unknown loss": ({"loss": {"name": "cross_entropi"}}, ["loss.name", "did you mean 'cross_entropy'"]),
    "unknown optimizer": ({"optimizer": {"name": "adamw8", "lr": 0.1}}, ["optimizer.name", "did you mean 'adamw'", "trainer list optimizers"]),
    "unknown scheduler": ({"scheduler": {"name": "cosin"}}, ["scheduler.name", "did you mean 'cosine'"]),
    "unknown top key": ({"trian": {"epochs": 1}}, ["trian", "did you mean 'train'"]),
    "unknown train key": ({"train": {"epoch": 1}}, ["train.epoch", "did you mean 'epochs'"]),
    "unknown model arg": ({"model": {"name": "lenet", "hidden_dim": 3}}, ["model.hidden_dim", "lenet() has no argument 'hidden_dim'", "num_classes, in_channels"]),
    "wrong type": ({"data": {"name": "digits", "batch_size": "lots"}}, ["data.batch_size", "'lots'"]),
    "wrong arg type": ({"optimizer": {"name": "sgd", "lr": "fast"}}, ["optimizer.lr", "expects a number", "'fast'"]),
    "zero batch": ({"data": {"name": "digits", "batch_size": 0}}, ["data.batch_size", "greater than 0"]),
    "bad precision": ({"precision": "fp8"}, ["precision", "fp8", "fp16"]),
    "bad device name": ({"device": "tpu"}, ["device", "tpu", "cuda:N"]),
    "missing section": ({"loss": None}, ["loss"]),
}


@pytest.mark.parametrize("case", sorted(BAD_CONFIGS))
def test_bad_config_exits_2_naming_the_key(write_config, tmp_path, case):
    overrides, expected = BAD_CONFIGS[case]
    config = {
        "name": "bad",
        "model": {"name": "lenet"},
        "data": {"name": "digits"},
        "loss": {"name": "cross_entropy"},
        "optimizer": {"name": "sgd", "lr": 0.1},
    }
    for key, value in overrides.items():
        if value is None:
            config.pop(key)
        else:
            config[key] = value
    result = in_process("run", write_config(config), cwd=tmp_path)
    assert result.code == 2, result.output
    assert "Traceback" not in result.output
    for text in expected:
        assert text in result.stderr, (text, result.stderr)
    assert not (tmp_path / "runs").exists()  # nothing was written


# (overrides on configs/lenet.yaml, the dotted key the message must name, other text it must hold)
BAD_OVERRIDES = {
    "malformed item": (["optimizer.lr0.1"], "override 'optimizer.lr0.1'", "KEY=VALUE"),
    "empty key": (["=3"], "override '=3'", "key before '=' is empty"),
    "bad dotted key": (["a..b=1"], "override 'a..b=1'", "dotted key"),
    "value not yaml": (["optimizer.betas=[0.9"], "override 'optimizer.betas=[0.9'", "not valid YAML"),
    "unknown path": (["train.epoch=3"], "train.epoch", "did you mean 'epochs'"),
    "unknown top key": (["sed=3"], "sed", "did you mean 'seed'"),
    "wrong type": (["optimizer.lr=abc"], "optimizer.lr", "expects a number"),
    "wrong bool": (["data.shuffle=maybe"], "data.shuffle", "'maybe'"),
    "negative batch": (["data.batch_size=-1"], "data.batch_size", "greater than 0"),
    "fraction out of range": (["data.val_fraction=1.5"], "data.val_fraction", "less than 1"),
    "zero log interval": (["train.log_every=0"], "train.log_every", "greater than 0"),
    "unknown model": (["model.name=lenett"], "model.name", "did you mean 'lenet'"),
    "leftover argument": (["optimizer.name=adam"], "optimizer.momentum", "remove it with ~optimizer.momentum"),
    "remove missing key": (["~optimizer.betas"], "optimizer.betas", "no such key"),
    "into a scalar": (["seed.x=1"], "seed", "not a section"),
    "negative lr": (["optimizer.lr=-1"], "optimizer.lr", "Invalid learning rate"),
    "unavailable device": (["device=cuda:1"], "device", "CUDA is not available"),
    "fp16 on cpu": (["precision=fp16"], "precision", "use precision=bf16"),
    "image size mismatch": (["data.image_size=28"], "data.image_size=32", "lenet"),
    "labels against mse": (["loss.name=mse"], "loss.name", "cross_entropy"),
    "csv without path": (["data.name=csv"], "data.path", "csv() needs argument 'path'"),
    "missing scheduler arg": (["scheduler.name=one_cycle"], "scheduler.max_lr", "needs argument 'max_lr'"),
    "plateau per step": (["scheduler.name=reduce_lr_on_plateau", "scheduler.interval=step"], "scheduler.interval", "once per epoch"),
    "bad interval": (["scheduler.interval=batch"], "scheduler.interval", "'batch'"),
    "bad run name": (["name=../up"], "name", "folder name"),
}


@pytest.mark.parametrize("case", sorted(BAD_OVERRIDES))
def test_bad_override_exits_2_naming_the_key(tmp_path, case):
    overrides, key, text = BAD_OVERRIDES[case]
    result = in_process("run", CONFIGS / "lenet.yaml", *overrides, cwd=tmp_path)
    assert result.code == 2, result.output
    assert "Traceback" not in result.output
    assert key in result.stderr and text in result.stderr, result.stderr
    assert not (tmp_path / "runs").exists()


def test_a_bad_override_through_the_console_script(cli, tmp_path):
    # the cases above run in process; this one as a user meets it
    overrides, key, text = BAD_OVERRIDES["unknown path"]
    result = cli("run", CONFIGS / "lenet.yaml", *overrides)
    assert result.code == 2, result.output
    assert "Traceback" not in result.output
    assert key in result.stderr and text in result.stderr, result.stderr
    assert not (tmp_path / "runs").exists()


def test_data_errors_exit_2_naming_what_is_there(cli, tmp_path, write_config):
    table = tmp_path / "table.csv"
    table.write_text("a,b,label\n1,2,x\n3,4,y\n")
    config = write_config(
        {"model": {"name": "mlp"}, "data": {"name": "csv", "path": str(table), "target": "y"},
         "loss": {"name": "mse"}, "optimizer": {"name": "sgd"}}
    )  # fmt: skip
    result = cli("run", config)
    assert result.code == 2 and "data.target" in result.stderr and "a, b, label" in result.stderr
    assert "Traceback" not in result.output
    (tmp_path / "images" / "cats").mkdir(parents=True)
    result = in_process("run", config, "data.name=image_folder", f"data.root={tmp_path / 'images'}", "~data.path", "~data.target", cwd=tmp_path)
    assert result.code == 2 and "data.root" in result.stderr and "no images" in result.stderr.lower(), result.stderr
    assert "Traceback" not in result.output


def test_every_problem_is_reported_at_once_with_lines(cli, write_config):
    config = write_config(
        "name: bad\n"
        "model: {name: lenet, hidden_dim: 3}\n"
        "data: {name: digits}\n"
        "loss: {name: cross_entropy}\n"
        "optimizer: {name: adamw8}\n"
    )
    result = cli("run", config)
    assert result.code == 2
    assert "is not valid (2 problems)" in result.stderr
    assert "line 2, model.hidden_dim" in result.stderr
    assert "line 5, optimizer.name: unknown optimizer 'adamw8'; did you mean 'adamw'?" in result.stderr


def test_missing_config_file(cli, tmp_path):
    result = cli("run", tmp_path / "nope.yaml")
    assert result.code == 2 and "nope.yaml" in result.stderr and "does not exist" in result.stderr
    assert "Traceback" not in result.output


def test_yaml_that_does_not_parse(cli, write_config):
    result = cli("run", write_config("model: {name: lenet\ndata: [\n"))
    assert result.code == 2 and "YAML does not parse" in result.stderr and "line" in result.stderr
    assert "Traceback" not in result.output


def test_python_tag_is_refused_and_not_run(cli, write_config, tmp_path):
    marker = tmp_path / "pwned"
    config = write_config(f"name: !!python/object/apply:os.system ['touch {marker}']\nmodel: {{name: lenet}}\n")
    result = cli("run", config)
    assert result.code == 2 and "not allowed" in result.stderr
    assert not marker.exists()


def test_unavailable_device_is_refused(cli, write_config, tiny):
    result = cli("run", write_config(tiny()), "--device", "cuda")
    assert result.code == 2
    assert "device" in result.stderr and "CUDA is not available" in result.stderr
    assert "Traceback" not in result.output


def test_non_finite_loss_exits_1(cli, write_config, tiny):
    config = tiny(optimizer={"name": "sgd", "lr": 1e6}, train={"epochs": 3, "log_every": 1})
    result = cli("run", write_config(config))
    assert result.code == 1, result.output
    assert "train.grad_clip" in result.stderr and "step" in result.stderr
    assert "Traceback" not in result.output
    done = summary(run_folder(result))
    assert done["status"] == "failed" and "step" in done["error"]


# ---------------------------------------------------------------------------------------------
# third-party models and datasets through entry points


def _install_fake_plugin(site: Path) -> None:
    """A distribution on PYTHONPATH with `trainer.models` and `trainer.datasets` entry points."""
    (site / "my_plugin").mkdir(parents=True)
    (site / "my_plugin" / "__init__.py").write_text(
        "import torch\n"
        "from torch import nn\n"
        "from trainer.data import Splits\n\n"
        "def wide_linear(in_features: int = 3, out_features: int = 1) -> nn.Module:\n"
        '    """A plugin model: one linear layer."""\n'
        "    return nn.Sequential(nn.Flatten(), nn.Linear(in_features, out_features))\n\n"
        "wide_linear.input_shape = (3,)\n\n"
        "def ramp(size: int = 32) -> Splits:\n"
        '    """A plugin dataset: y = sum of x."""\n'
        "    x = torch.linspace(0, 1, size * 3).reshape(size, 3)\n"
        "    return Splits(train=(x, x.sum(1, keepdim=True)), val=None)\n\n"
        "def broken():\n"
        "    raise RuntimeError('never called')\n"
    )
    info = site / "my_plugin-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: my-plugin\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(
        "[trainer.models]\nwide_linear = my_plugin:wide_linear\nghost = my_plugin:missing_function\n\n"
        "[trainer.datasets]\nramp = my_plugin:ramp\n"
    )


def test_plugins_join_through_entry_points(cli, tmp_path, write_config):
    site = tmp_path / "site"
    _install_fake_plugin(site)
    env = {"PYTHONPATH": str(site)}
    listed = cli("list-models", env=env)
    assert listed.code == 0 and "wide_linear" in listed.stdout and "A plugin model" in listed.stdout
    config = write_config(
        {
            "model": {"name": "wide_linear"},
            "data": {"name": "ramp", "batch_size": 8},
            "loss": {"name": "mse"},
            "optimizer": {"name": "sgd", "lr": 0.1},
            "train": {"epochs": 2},
        }
    )
    ran = cli("run", config, "-q", env=env)
    assert ran.code == 0, ran.output
    # a plugin that does not load is reported by name when asked for, and breaks nothing else
    broken = cli("validate", config, "model.name=ghost", env=env)
    assert broken.code == 2 and "model 'ghost' is not available" in broken.stderr and "missing_function" in broken.stderr


def test_a_dotted_import_path_is_not_a_model_name(write_config, tmp_path):
    config = write_config(
        {
            "model": {"name": "os:system"},
            "data": {"name": "digits"},
            "loss": {"name": "cross_entropy"},
            "optimizer": {"name": "sgd"},
        }
    )
    result = in_process("validate", config, cwd=tmp_path)
    assert result.code == 2 and "unknown model 'os:system'" in result.stderr


# ---------------------------------------------------------------------------------------------
# the JSON Schema for editors


def test_schema_accepts_the_shipped_configs_and_catches_typos(cli):
    import jsonschema

    result = cli("schema")
    assert result.code == 0
    schema = json.loads(result.stdout)
    for path in sorted(CONFIGS.rglob("*.yaml")):
        jsonschema.validate(yaml.safe_load(path.read_text()), schema)
    bad = yaml.safe_load((CONFIGS / "lenet.yaml").read_text())
    bad["optimizer"]["name"] = "adamw8"
    with pytest.raises(jsonschema.ValidationError, match="adamw8"):
        jsonschema.validate(bad, schema)
    bad = yaml.safe_load((CONFIGS / "lenet.yaml").read_text())
    bad["train"]["epoch"] = 3
    with pytest.raises(jsonschema.ValidationError, match="epoch"):
        jsonschema.validate(bad, schema)


# ---------------------------------------------------------------------------------------------
# trainer eval


def test_eval_reproduces_the_runs_validation_metrics(seed_runs, cli):
    folder = _folder(seed_runs, "lenet.yaml")
    result = cli("eval", folder, "--last", "--json", env={"PYTHONPROFILEIMPORTTIME": "1"})
    assert result.code == 0, result.output
    assert "torch._dynamo" not in result.stderr  # no optimizer built: the first one imports it (~2 s)
    metrics = json.loads(result.stdout)
    final = summary(folder)["final"]
    assert metrics["loss"] == pytest.approx(final["val_loss"], rel=1e-6)
    assert metrics["accuracy"] == pytest.approx(final["val_accuracy"])
    assert metrics["step"] == 230 and metrics["samples"] == 359
    best = in_process("eval", folder, cwd=folder)  # best.pt by default, in words (the same command, in process)
    assert best.code == 0 and "best.pt" in best.stdout and "accuracy" in best.stdout


def test_eval_bad_input(cli, tmp_path, seed_runs):
    missing = cli("eval", tmp_path / "missing.pt")
    assert missing.code == 2 and "Traceback" not in missing.output
    # the same path to exit 2 for the others: in process
    empty = in_process("eval", tmp_path, cwd=tmp_path)
    assert empty.code == 2 and "holds no best.pt or last.pt" in empty.stderr
    folder = _folder(seed_runs, "lenet.yaml")
    split = in_process("eval", folder, "--split", "holdout", cwd=tmp_path)
    assert split.code == 2 and "unknown split 'holdout'; accepted: val, test, train" in split.stderr
    both = in_process("eval", folder, "--best", "--last", cwd=tmp_path)
    assert both.code == 2 and "exclude each other" in both.stderr
    no_val = in_process("eval", _folder(seed_runs, "sqrt2.yaml"), cwd=tmp_path)
    assert no_val.code == 2 and "--split train" in no_val.stderr


def test_show_config_is_exactly_the_run_folders_config_yaml(seed_runs, cli):
    folder = _folder(seed_runs, "lenet.yaml")
    shown = cli("show-config", CONFIGS / "lenet.yaml")
    assert shown.code == 0
    assert shown.stdout == (folder / "config.yaml").read_text()


# ---------------------------------------------------------------------------------------------
# a console that cannot be written is a view that went away: the run goes on


def test_a_pipe_closed_by_its_reader_does_not_stop_the_run(tmp_path, write_config, tiny):
    from conftest import trainer_executable

    config = write_config(tiny(train={"epochs": 30, "log_every": 1}))
    proc = subprocess.Popen(
        [trainer_executable(), "run", str(config), "--run-dir", str(tmp_path / "run")],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    first = proc.stdout.readline()  # what `trainer run ... | head -1` reads before it exits
    proc.stdout.close()
    stderr = proc.stderr.read()
    assert proc.wait(timeout=300) == 0, stderr
    assert first.startswith("run") and stderr == ""
    assert summary(tmp_path / "run") | {"error": None} == summary(tmp_path / "run")
    assert summary(tmp_path / "run")["status"] == "completed" and summary(tmp_path / "run")["epochs"] == 30
    assert (tmp_path / "run" / "checkpoints" / "last.pt").is_file()


def test_stdout_on_a_full_disk_does_not_stop_the_run(tmp_path, write_config, tiny):
    from conftest import trainer_executable

    config = write_config(tiny())
    with open("/dev/full", "w") as full:
        proc = subprocess.run(
            [trainer_executable(), "run", str(config), "--run-dir", str(tmp_path / "run")],
            cwd=tmp_path, stdout=full, stderr=subprocess.PIPE, text=True, timeout=300,
        )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == "" and summary(tmp_path / "run")["status"] == "completed"


def test_a_bad_config_still_exits_2_when_stderr_cannot_be_written(tmp_path):
    from conftest import trainer_executable

    with open("/dev/full", "w") as full:
        proc = subprocess.run([trainer_executable(), "validate", "/dev/zero"], stdout=full, stderr=full, timeout=120)
    assert proc.returncode == 2


def test_wall_time_counts_the_whole_command(cli, write_config, tiny, tmp_path):
    import time

    started = time.monotonic()
    result = cli("run", write_config(tiny()), "--run-dir", tmp_path / "run", "-q")
    elapsed = time.monotonic() - started
    assert result.code == 0, result.output
    recorded = summary(tmp_path / "run")
    # from trainer's own start: importing torch and building come before the loop's first step
    assert recorded["train_time_s"] < recorded["wall_time_s"] <= elapsed
    assert recorded["wall_time_s"] > 0.5 * elapsed
