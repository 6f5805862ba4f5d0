"""From a config to live objects: inferred sizes, the budget, and the one-batch check."""

from __future__ import annotations

import pytest
import torch

from trainer.build import build_run, check_one_batch
from trainer.config import config_from_dict
from trainer.errors import DeviceError, UsageError

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
