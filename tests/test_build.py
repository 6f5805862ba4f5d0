"""From a config to live objects: inferred sizes, the budget, and the one-batch check."""

from __future__ import annotations

import pytest
import torch
from torch import nn
import yaml

import trainer.build
from trainer.build import build_run, check_one_batch
from trainer.config import ConfigError, config_from_dict
from trainer.engine import fit
from trainer.errors import DeviceError, UsageError
from trainer.runs import execute_run

from conftest import tiny_config


def built(**sections):
    return build_run(config_from_dict(tiny_config(**sections)))


def test_sizes_are_inferred_from_the_data():
    run = built()
    assert run.config.model.kwargs == {"hidden": 8, "in_features": 4, "out_features": 2}
    assert run.model(torch.zeros(3, 4)).shape == (3, 2)


def test_given_sizes_win_over_inferred_ones():
    run = built(model={"name": "mlp", "hidden": 8, "out_features": 2, "in_features": 4})
    assert run.config.model.kwargs["in_features"] == 4


def test_classification_sizes_and_image_size_follow_model_and_data():
    run = built(
        model={"name": "lenet"},
        data={"name": "random", "size": 20, "input_shape": [3, 32, 32], "num_classes": 4, "batch_size": 5},
        loss={"name": "cross_entropy"},
    )
    assert run.config.model.kwargs == {"num_classes": 4, "in_channels": 3}
    assert run.settings.classification is True
    digits = built(model={"name": "convnet"}, data={"name": "digits"}, loss={"name": "nll"})
    assert digits.config.data.kwargs["image_size"] == 28  # the convnet's input size
    assert digits.info.input_shape == (1, 28, 28)


def test_budget_from_max_steps_and_default_epochs():
    run = built(train={"max_steps": 10})  # 51 train samples / 16 = 4 steps per epoch, the last partial
    assert len(run.train_batches) == 4 and run.settings.epochs == 3 and run.settings.max_steps == 10
    assert built(train={}).settings.epochs == 10


def test_scheduler_length_is_filled_per_epoch_or_per_step():
    run = built(scheduler={"name": "cosine"}, train={"epochs": 5})
    assert run.config.scheduler.kwargs["T_max"] == 5 and run.settings.scheduler_interval == "epoch"
    run = built(scheduler={"name": "one_cycle", "max_lr": 0.1}, train={"epochs": 5})
    assert run.config.scheduler.kwargs["total_steps"] == 20 and run.settings.scheduler_interval == "step"
    run = built(scheduler={"name": "cosine", "interval": "step"}, train={"epochs": 5, "max_steps": 7})
    assert run.config.scheduler.kwargs["T_max"] == 7


def test_built_for_a_trained_models_use_it_has_no_optimizer_and_the_same_resolved_config():
    sections = {"scheduler": {"name": "one_cycle", "max_lr": 0.1}, "train": {"epochs": 5, "ema": True, "compile": True}}
    training = built(**sections)
    using = build_run(config_from_dict(tiny_config(**sections), training=False), training=False)
    assert using.optimizer is None and using.scheduler is None and using.ema is None
    assert training.optimizer is not None and training.scheduler is not None and training.ema is not None
    # nn.Module.compile sets _compiled_call_impl; nothing compiles before a forward pass
    assert using.model._compiled_call_impl is None and training.model._compiled_call_impl is not None
    assert using.config == training.config and using.config.scheduler.kwargs["total_steps"] == 20
    assert using.settings == training.settings


def test_a_trained_runs_config_is_not_refused_for_an_optimizer_it_will_not_build():
    config = tiny_config(optimizer={"name": "sgd", "lr": -1.0})
    with pytest.raises(ConfigError, match="optimizer.lr"):
        config_from_dict(config)
    assert config_from_dict(config, training=False).optimizer.kwargs == {"lr": -1.0}


def test_epochs_and_max_steps_stop_at_whichever_comes_first():
    run = built(train={"epochs": 10, "max_steps": 5}, scheduler={"name": "cosine"})
    assert run.settings.epochs == 2  # 4 steps per epoch: the 5th step is in epoch 2
    assert run.config.scheduler.kwargs["T_max"] == 2  # the schedule spans the epochs really run
    assert built(train={"epochs": 2, "max_steps": 500}).settings.epochs == 2


def test_plateau_cannot_step_per_batch():
    with pytest.raises(UsageError, match="scheduler.interval"):
        built(scheduler={"name": "reduce_lr_on_plateau", "interval": "step"})


def test_constructor_refusals_become_usage_errors():
    with pytest.raises(UsageError, match="optimizer"):
        built(optimizer={"name": "sgd", "lr": -1.0})


def test_unavailable_device_is_an_error_not_a_fallback(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(DeviceError, match="CUDA is not available"):
        build_run(config_from_dict(tiny_config(device="cuda")))
    with pytest.raises(DeviceError, match="fp16"):
        build_run(config_from_dict(tiny_config(precision="fp16")))


def test_one_batch_check_passes_and_changes_nothing():
    run = built(model={"name": "mlp", "hidden": 8, "dropout": 0.5})
    before = [p.detach().clone() for p in run.model.parameters()]
    rng = torch.get_rng_state()
    check_one_batch(run)
    assert all(torch.equal(a, b) for a, b in zip(before, run.model.parameters()))
    assert all(p.grad is None for p in run.model.parameters())
    assert torch.equal(torch.get_rng_state(), rng)


@pytest.mark.parametrize(
    "optimizer, says",
    [
        ({"name": "sparseadam"}, "SparseAdam does not support dense gradients"),
        ({"name": "adam", "differentiable": True}, "leaf Variable"),
        ({"name": "adam", "capturable": True}, "If capturable=True"),
    ],
)
def test_optimizer_arguments_refused_only_when_stepping_fail_the_check(optimizer, says):
    run = built(optimizer={**optimizer, "lr": 0.01})
    with pytest.raises(UsageError) as caught:
        check_one_batch(run)
    assert caught.value.key == "optimizer" and says in caught.value.message
    assert caught.value.message.startswith(f"{optimizer['name']}(") and "trainer list optimizers" in caught.value.message


def test_the_optimizer_check_leaves_the_model_and_the_optimizer_alone():
    run = built(optimizer={"name": "adam", "lr": 0.1})
    before = [p.detach().clone() for p in run.model.parameters()]
    check_one_batch(run)
    assert all(torch.equal(a, b) for a, b in zip(before, run.model.parameters()))
    assert not run.optimizer.state  # no moments, no step count: the run's first step is its first


def test_an_optimizer_that_cannot_step_is_refused_before_a_run_folder_exists(cli, write_config, tmp_path):
    result = cli("run", write_config(tiny_config(optimizer={"name": "sparseadam", "lr": 0.01})))
    assert result.code == 2, result.output
    assert result.stderr.strip().splitlines() == [
        "error: optimizer: sparseadam(lr=0.01) cannot update model 'mlp': SparseAdam does not support dense gradients, "
        "please consider Adam instead; change its arguments or choose another optimizer (trainer list optimizers)"
    ]
    assert not (tmp_path / "runs").exists()


def test_one_batch_check_leaves_batchnorm_statistics_alone():
    import dataclasses

    run = built()
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 2))
    run = dataclasses.replace(run, model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    check_one_batch(run)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # running_mean, _var, count


def test_lenet_fed_28x28_names_the_fix():
    run = built(model={"name": "lenet"}, data={"name": "digits", "image_size": 28}, loss={"name": "cross_entropy"})
    with pytest.raises(UsageError) as caught:
        check_one_batch(run)
    message = str(caught.value)
    assert "lenet" in message and "(1, 28, 28)" in message and "data.image_size=32" in message


def test_mlp_with_the_wrong_input_size_is_reported():
    run = built(model={"name": "mlp", "in_features": 7})
    with pytest.raises(UsageError, match=r"model: 'mlp' cannot take inputs of shape \(16, 4\)"):
        check_one_batch(run)


def test_class_labels_against_mse_suggest_cross_entropy():
    run = built(
        model={"name": "mlp", "hidden": 8},
        data={"name": "random", "size": 32, "input_shape": [4], "num_classes": 3, "batch_size": 8},
        loss={"name": "mse"},
    )
    with pytest.raises(UsageError) as caught:
        check_one_batch(run)
    assert "loss.name" in str(caught.value) and "cross_entropy" in str(caught.value)


def test_a_broadcasting_regression_loss_is_a_mismatch():
    # targets (N,) against outputs (N, 1): torch only warns, and the loss is silently wrong
    run = built(
        model={"name": "linear_regression", "out_features": 1},
        data={"name": "random", "size": 32, "input_shape": [1], "target_shape": [], "batch_size": 8},
    )
    with pytest.raises(UsageError, match=r"targets \(8,\)"):
        check_one_batch(run)


def test_batch_larger_than_the_data_still_trains_one_partial_batch():
    run = built(data={"name": "random", "size": 10, "input_shape": [4], "target_shape": [2], "batch_size": 64, "val_fraction": 0})
    assert len(run.train_batches) == 1


def test_an_explicit_monitor_must_exist():
    no_val = {"name": "random", "size": 32, "input_shape": [4], "target_shape": [2], "batch_size": 8, "val_fraction": 0}
    with pytest.raises(UsageError, match="train.monitor: 'val_loss' needs a validation split"):
        built(data=no_val, train={"monitor": "val_loss"})
    with pytest.raises(UsageError, match="train.monitor: 'val_accuracy' needs class labels"):
        built(train={"monitor": "val_accuracy"})
    assert built(data=no_val).config.train.monitor is None  # the default follows the data


# ---------------------------------------------------------------------------------------------
# performance switches

# LeNet on random 3-channel images: convolutions whose weights and inputs channels_last changes
IMAGES = {
    "model": {"name": "lenet"},
    "data": {"name": "random", "size": 96, "input_shape": [3, 32, 32], "num_classes": 4, "batch_size": 16},
    "loss": {"name": "cross_entropy"},
}


def trained(steps: int = 10, train: dict | None = None, **sections):
    """Build, check one batch and train `steps` optimizer steps in process."""
    run = built(train={"max_steps": steps, "log_every": 5, **(train or {})}, **sections)
    check_one_batch(run)
    fit(
        run.model, run.train_batches, run.val_batches, run.loss_fn, run.optimizer, run.settings,
        precision=run.precision, scheduler=run.scheduler, scaler=run.scaler,
    )  # fmt: skip
    return run


def assert_same_parameters(a: dict, b: dict, atol: float) -> None:
    assert list(a) == list(b)  # the same keys, in the same order
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=atol, msg=key)


@pytest.fixture
def graphs(monkeypatch):
    """Compile with a backend that records the graphs torch.compile hands it and runs them as traced
    (the real inductor takes ~15-30 s per model on a 2-core CPU; it has its own slow tests below)."""
    seen = []

    def recording(gm, example_inputs, **options):
        seen.append(options.get("mode"))
        return gm.forward

    monkeypatch.setattr(trainer.build, "COMPILE_BACKEND", recording)
    torch.compiler.reset()  # nothing compiled by an earlier test is reused
    yield seen
    torch.compiler.reset()


@pytest.mark.parametrize(("setting", "mode"), [(True, None), ("max-autotune", "max-autotune")])
def test_compiled_run_matches_eager_and_checkpoints_keep_plain_keys(tmp_path, graphs, setting, mode):
    runs = {}
    for name, compile_ in [("eager", False), ("compiled", setting)]:
        config = config_from_dict(tiny_config(name=name, train={"epochs": 2, "log_every": 2, "compile": compile_}))
        result = execute_run(config, root=tmp_path, quiet=True, tensorboard=False)
        assert result.exit_code == 0, result.error
        runs[name] = torch.load(result.run_dir / "checkpoints" / "last.pt", weights_only=True)
    assert graphs and set(graphs) == {mode}  # the model really went through torch.compile, in that mode
    assert not any("_orig_mod" in key for key in runs["compiled"]["model"])
    assert_same_parameters(runs["compiled"]["model"], runs["eager"]["model"], atol=1e-6)
    assert runs["compiled"]["config"]["train"]["compile"] == setting  # and config.yaml says so


def test_a_compiled_model_still_gets_the_shape_hint(graphs):
    run = built(model={"name": "lenet"}, data={"name": "digits", "image_size": 28}, loss={"name": "cross_entropy"}, train={"compile": True})
    with pytest.raises(UsageError, match=r"data.image_size=32"):
        check_one_batch(run)  # the check runs uncompiled first: the same message as without compile
    assert not graphs


def test_a_failing_compiler_is_one_line_naming_train_compile(monkeypatch):
    def broken(gm, example_inputs, **options):
        raise RuntimeError("No working C++ compiler found\n(a long torch stack follows)")

    monkeypatch.setattr(trainer.build, "COMPILE_BACKEND", broken)
    torch.compiler.reset()
    run = built(train={"compile": True})
    with pytest.raises(UsageError) as caught:
        check_one_batch(run)
    assert caught.value.key == "train.compile"
    message = str(caught.value)
    assert "\n" not in message and "No working C++ compiler found" in message and "set train.compile=false" in message


def test_without_a_cpp_compiler_validate_fails_in_one_line(cli, write_config, tmp_path):
    # the real inductor, up to the point where it looks for g++ (no cached kernels to fall back on)
    no_compiler = {"CXX": "/nonexistent/g++", "TORCHINDUCTOR_FORCE_DISABLE_CACHES": "1", "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor")}
    result = cli("validate", write_config(tiny_config()), "train.compile=true", env=no_compiler)
    assert result.code == 2, result.output
    assert "error: train.compile: torch.compile could not compile model 'mlp' on cpu:" in result.stderr
    assert "C++ compiler" in result.stderr and "Traceback" not in result.output


@pytest.mark.slow
def test_inductor_compiled_lenet_run_matches_eager(cli, write_config):
    # `trainer run` with the real inductor: ~35 s on a 2-core CPU (compiles train, last-batch and eval graphs)
    config = write_config(tiny_config(**IMAGES, train={"max_steps": 10, "log_every": 5}))
    checkpoints = {}
    for setting in ("false", "true"):
        result = cli("run", config, f"train.compile={setting}", "--quiet")
        assert result.code == 0, result.output
        folder = result.cwd / result.stdout.strip().splitlines()[-1]
        checkpoints[setting] = torch.load(folder / "checkpoints" / "last.pt", weights_only=True)
        assert yaml.safe_load((folder / "config.yaml").read_text())["train"]["compile"] is (setting == "true")
    assert_same_parameters(checkpoints["true"]["model"], checkpoints["false"]["model"], atol=1e-5)


@pytest.mark.slow
def test_inductor_compiled_mlp_trains_like_eager():
    torch.compiler.reset()
    eager = trained(steps=8)
    compiled = trained(steps=8, train={"compile": True})
    assert_same_parameters(compiled.model.state_dict(), eager.model.state_dict(), atol=1e-5)


def test_channels_last_run_matches_the_default_and_converts_once():
    default = trained(**IMAGES)
    fast = trained(train={"channels_last": True}, **IMAGES)
    for name in ("conv1", "conv2"):
        weight = getattr(fast.model, name).weight
        assert weight.is_contiguous(memory_format=torch.channels_last) and not weight.is_contiguous()
    assert fast.train_batches.x.is_contiguous(memory_format=torch.channels_last)  # the whole x, once
    inputs, _ = next(iter(fast.train_batches.epoch(0)))
    assert inputs.is_contiguous(memory_format=torch.channels_last)
    assert_same_parameters(fast.model.state_dict(), default.model.state_dict(), atol=1e-5)
    moved = built(**IMAGES).model.state_dict()  # the runs did learn something
    assert max((fast.model.state_dict()[k] - moved[k]).abs().max() for k in moved) > 1e-3


def test_channels_last_on_data_that_is_not_images_is_refused():
    with pytest.raises(UsageError) as caught:
        built(train={"channels_last": True})
    assert caught.value.key == "train.channels_last"
    assert "needs image data" in str(caught.value) and "(4,)" in str(caught.value)


def test_backend_switches_are_applied_where_the_device_is_resolved(monkeypatch):
    calls = []
    monkeypatch.setattr(trainer.build, "apply_backend_switches", lambda device, **flags: calls.append((device, flags)))
    built(train={"cudnn_benchmark": True, "tf32": True})
    assert calls == [(torch.device("cpu"), {"cudnn_benchmark": True, "tf32": True})]


def test_backend_switches_change_nothing_on_the_cpu():
    flags = (torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    run = built(train={"cudnn_benchmark": True, "tf32": not flags[1]})
    assert run.device.type == "cpu"
    assert (torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == flags


@pytest.mark.parametrize(
    "optimizer",
    [
        {"name": "sgd", "lr": 0.1, "momentum": 0.9},
        {"name": "adam", "lr": 0.01},
        {"name": "adamw", "lr": 0.01, "weight_decay": 0.1},
        {"name": "adagrad", "lr": 0.1},
    ],
    ids=lambda o: o["name"],
)
def test_fused_optimizers_follow_the_for_loop_trajectory_on_cpu(optimizer):
    plain = trained(steps=12, optimizer={**optimizer, "foreach": False})
    fused = trained(steps=12, optimizer={**optimizer, "fused": True})
    assert fused.optimizer.defaults["fused"] is True
    assert_same_parameters(fused.model.state_dict(), plain.model.state_dict(), atol=1e-6)
    start = built(optimizer=optimizer).model.state_dict()
    assert max((plain.model.state_dict()[k] - start[k]).abs().max() for k in start) > 1e-3


def test_only_relative_data_paths_are_read_from_data_dir(tmp_path):
    from trainer.build import _under

    assert _under(None, {"path": "t.csv"}) == {"path": "t.csv"}
    assert _under(tmp_path, {"path": "t.csv", "target": "y"}) == {"path": str(tmp_path / "t.csv"), "target": "y"}
    assert _under(tmp_path, {"root": "/data/mnist"}) == {"root": "/data/mnist"}
    assert _under(tmp_path, {"root": "~/data"}) == {"root": "~/data"}  # the user's home, wherever the run started
