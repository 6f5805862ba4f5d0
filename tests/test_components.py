"""Tests for trainer.components: the loss, optimizer and scheduler registries derived from torch."""

import pytest
import torch
from torch import nn

from trainer.components import (
    LOSSES,
    OPTIMIZERS,
    SCHEDULERS,
    is_plateau,
    schedule_length_kwargs,
    scheduler_interval,
    snake_case,
)
from trainer.registry import RegistryError

# ---------------------------------------------------------------------------------------------
# names


@pytest.mark.parametrize(
    ("cls_name", "expected"),
    [
        ("BCEWithLogits", "bce_with_logits"),
        ("ReduceLROnPlateau", "reduce_lr_on_plateau"),
        ("KLDiv", "kl_div"),
        ("NLL", "nll"),
        ("SmoothL1", "smooth_l1"),
        ("CrossEntropy", "cross_entropy"),
        ("MSE", "mse"),
        ("CosineAnnealing", "cosine_annealing"),
        ("CosineAnnealingWarmRestarts", "cosine_annealing_warm_restarts"),
        ("OneCycle", "one_cycle"),
        ("PoissonNLL", "poisson_nll"),
        ("GaussianNLL", "gaussian_nll"),
        ("MultiLabelSoftMargin", "multi_label_soft_margin"),
        ("CTC", "ctc"),
        ("L1", "l1"),
        ("MultiStep", "multi_step"),
    ],
)
def test_snake_case(cls_name, expected):
    assert snake_case(cls_name) == expected


@pytest.mark.parametrize(
    ("registry", "name"),
    [
        (LOSSES, "cross_entropy"),
        (LOSSES, "mse"),
        (LOSSES, "nll"),
        (LOSSES, "bce_with_logits"),
        (LOSSES, "smooth_l1"),
        (LOSSES, "kl_div"),
        (OPTIMIZERS, "sgd"),
        (OPTIMIZERS, "adam"),
        (OPTIMIZERS, "adamw"),
        (SCHEDULERS, "cosine_annealing"),
        (SCHEDULERS, "cosine"),
        (SCHEDULERS, "one_cycle"),
        (SCHEDULERS, "reduce_lr_on_plateau"),
        (SCHEDULERS, "step"),
    ],
)
def test_registry_contains(registry, name):
    assert name in registry


@pytest.mark.parametrize(
    ("registry", "name", "cls"),
    [
        (LOSSES, "cross_entropy", nn.CrossEntropyLoss),
        (LOSSES, "nll", nn.NLLLoss),
        (OPTIMIZERS, "adamw", torch.optim.AdamW),
        (OPTIMIZERS, "sgd", torch.optim.SGD),
        (SCHEDULERS, "cosine", torch.optim.lr_scheduler.CosineAnnealingLR),
        (SCHEDULERS, "reduce_lr_on_plateau", torch.optim.lr_scheduler.ReduceLROnPlateau),
    ],
)
def test_names_map_to_the_torch_classes(registry, name, cls):
    assert registry.get(name).factory is cls


def test_cosine_is_an_alias_of_cosine_annealing():
    assert SCHEDULERS.get("cosine") is SCHEDULERS.get("cosine_annealing")
    assert "cosine" not in SCHEDULERS.names()


@pytest.mark.parametrize(
    ("registry", "name"),
    [
        (OPTIMIZERS, "lbfgs"),
        (OPTIMIZERS, "optimizer"),
        (SCHEDULERS, "lambda"),
        (SCHEDULERS, "multiplicative"),
        (SCHEDULERS, "sequential"),
        (SCHEDULERS, "chained_scheduler"),
        (SCHEDULERS, "lr_scheduler"),
        (LOSSES, "loss"),
    ],
)
def test_registries_leave_out_what_a_config_cannot_build(registry, name):
    assert name not in registry
    assert all("lambda" not in n and "sequential" not in n and "lbfgs" not in n for n in registry.names())


def test_unknown_optimizer_suggests_a_close_match():
    with pytest.raises(RegistryError, match=r"did you mean 'adamw'\? \(trainer list optimizers\)"):
        OPTIMIZERS.get("adamw8")


def test_lr_in_a_string_is_coerced_for_torch_optimizers():
    coerced, problems = OPTIMIZERS.check_kwargs("adam", {"lr": "3e-4", "betas": [0.9, 0.99]})
    assert problems == []
    assert coerced == {"lr": 0.0003, "betas": (0.9, 0.99)}


def test_the_runner_filled_arguments_are_not_config_keys():
    assert "params" not in OPTIMIZERS.get("sgd").parameters()
    assert "optimizer" not in SCHEDULERS.get("step").parameters()
    _, problems = OPTIMIZERS.check_kwargs("sgd", {"params": []})
    assert problems and "has no argument 'params'" in problems[0][1]


@pytest.mark.parametrize("registry", [LOSSES, OPTIMIZERS, SCHEDULERS], ids=lambda r: r.plural)
def test_every_entry_has_a_tidy_description(registry):
    for entry in registry:
        assert entry.description.strip(), entry.name
        assert "\n" not in entry.description
        assert len(entry.description) <= 93, entry.name
        # a whole sentence, or one that is cut says so (torch's first lines stop mid-sentence)
        assert entry.description.endswith((".", "...")), entry.description


def test_a_long_torch_description_is_cut_with_an_ellipsis():
    assert LOSSES.get("nll").description == "The negative log likelihood loss."
    assert LOSSES.get("cross_entropy").description.endswith("between input logits and target.")
    assert LOSSES.get("mse").description.startswith("Creates a criterion that measures the mean squared error")
    assert LOSSES.get("mse").description.endswith("...")


# ---------------------------------------------------------------------------------------------
# losses

# losses that need constructor arguments; a new one must be added here
LOSS_ARGS: dict[str, dict] = {}


@pytest.mark.parametrize("name", LOSSES.names())
def test_every_loss_builds(name):
    kwargs = LOSS_ARGS.get(name, {})
    missing = LOSSES.missing_kwargs(name, kwargs)
    if missing:
        pytest.fail(f"loss '{name}' needs {missing}; add minimal arguments to LOSS_ARGS in {__file__}")
    loss = LOSSES.build(name, **kwargs)
    assert isinstance(loss, nn.Module)


def test_cross_entropy_and_mse_compute_the_torch_values():
    torch.manual_seed(0)
    logits, labels = torch.randn(4, 3), torch.tensor([0, 2, 1, 1])
    assert torch.equal(LOSSES.build("cross_entropy")(logits, labels), nn.functional.cross_entropy(logits, labels))
    pred, target = torch.tensor([1.0, 2.0]), torch.tensor([0.0, 0.0])
    assert LOSSES.build("mse")(pred, target).item() == 2.5
    assert LOSSES.build("mse", reduction="sum")(pred, target).item() == 5.0


# ---------------------------------------------------------------------------------------------
# optimizers


def dense_problem():
    model = nn.Linear(3, 2)
    x = torch.randn(5, 3)
    return model, lambda: model(x).pow(2).sum()


def sparse_problem():
    model = nn.Embedding(10, 3, sparse=True)
    idx = torch.tensor([1, 4, 4, 7])
    return model, lambda: model(idx).pow(2).sum()


def matrix_only_problem():
    model = nn.Linear(3, 2, bias=False)
    x = torch.randn(5, 3)
    return model, lambda: model(x).pow(2).sum()


# optimizers that cannot train an ordinary Linear layer, with the reason and the model they can train
SPECIAL_PROBLEMS = {
    "sparseadam": (sparse_problem, "SparseAdam refuses dense gradients: an Embedding(sparse=True)"),
    "muon": (matrix_only_problem, "Muon only supports 2-D parameters: a Linear without bias"),
}


@pytest.mark.parametrize("name", OPTIMIZERS.names())
def test_every_optimizer_builds_and_takes_a_step_that_changes_the_parameters(name):
    torch.manual_seed(0)
    assert OPTIMIZERS.missing_kwargs(name, []) == [], f"optimizer '{name}' needs arguments"
    make_problem, _reason = SPECIAL_PROBLEMS.get(name, (dense_problem, ""))
    model, loss_fn = make_problem()
    before = [p.detach().clone() for p in model.parameters()]
    optimizer = OPTIMIZERS.build(name, model.parameters())
    assert isinstance(optimizer, torch.optim.Optimizer)
    optimizer.zero_grad()
    loss_fn().backward()
    optimizer.step()
    for old, new in zip(before, model.parameters()):
        assert not torch.equal(old, new), f"{name}: a step left the parameters unchanged"
        assert torch.isfinite(new).all()


@pytest.mark.parametrize("name", sorted(SPECIAL_PROBLEMS))
def test_special_optimizers_really_refuse_an_ordinary_model(name):
    # if torch lifts the restriction, SPECIAL_PROBLEMS is no longer needed for this optimizer
    model, loss_fn = dense_problem()
    with pytest.raises((ValueError, RuntimeError)):
        optimizer = OPTIMIZERS.build(name, model.parameters())
        loss_fn().backward()
        optimizer.step()


def test_one_sgd_step_is_w_minus_lr_times_grad():
    torch.manual_seed(0)
    model, loss_fn = dense_problem()
    # lr a power of two: lr * grad is exact in float32, so any correct update order gives the same bits
    optimizer = OPTIMIZERS.build("sgd", model.parameters(), lr="0.25")
    loss_fn().backward()
    expected = [(p - 0.25 * p.grad).detach() for p in model.parameters()]
    optimizer.step()
    for want, got in zip(expected, model.parameters()):
        assert torch.equal(got.detach(), want)


def test_optimizer_kwargs_reach_the_torch_optimizer():
    model = nn.Linear(2, 1)
    optimizer = OPTIMIZERS.build("adamw", model.parameters(), lr="3e-4", betas=[0.8, "0.9"], weight_decay=0)
    group = optimizer.param_groups[0]
    assert group["lr"] == 3e-4
    assert group["betas"] == (0.8, 0.9)
    assert group["weight_decay"] == 0.0


# ---------------------------------------------------------------------------------------------
# schedulers

# the arguments each scheduler needs beyond those schedule_length_kwargs fills in; a new scheduler
# with required arguments must be added here. Values make the lr move within a few steps.
SCHEDULER_ARGS = {
    "cosine_annealing_warm_restarts": {"T_0": 2},
    "cyclic": {"base_lr": 0.01, "max_lr": 0.1, "step_size_up": 2},
    "exponential": {"gamma": 0.5},
    "multi_step": {"milestones": [1, 2]},
    "one_cycle": {"max_lr": 0.1},
    "step": {"step_size": 1},
    "reduce_lr_on_plateau": {"patience": 0},
    "constant": {"total_iters": 2},
}


@pytest.mark.parametrize("name", SCHEDULERS.names())
def test_every_scheduler_builds_and_moves_the_learning_rate(name):
    interval = scheduler_interval(name)
    kwargs = dict(SCHEDULER_ARGS.get(name, {}))
    kwargs.update(schedule_length_kwargs(name, kwargs, interval=interval, epochs=4, total_steps=20))
    missing = SCHEDULERS.missing_kwargs(name, kwargs)
    if missing:
        pytest.fail(f"scheduler '{name}' needs {missing}; add minimal arguments to SCHEDULER_ARGS in {__file__}")
    model = nn.Linear(2, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    scheduler = SCHEDULERS.build(name, optimizer, **kwargs)
    lrs = [optimizer.param_groups[0]["lr"]]
    for _ in range(4):
        optimizer.step()
        if is_plateau(scheduler):
            scheduler.step(1.0)
        else:
            scheduler.step()
        lrs.append(optimizer.param_groups[0]["lr"])
    assert len(set(lrs)) > 1, f"{name}: the learning rate never moved: {lrs}"
    assert all(lr >= 0 for lr in lrs)


def test_is_plateau():
    optimizer = torch.optim.SGD(nn.Linear(1, 1).parameters(), lr=0.1)
    assert is_plateau(SCHEDULERS.build("reduce_lr_on_plateau", optimizer))
    assert not is_plateau(SCHEDULERS.build("step", optimizer, step_size=1))


@pytest.mark.parametrize("name", SCHEDULERS.names() + ["cosine"])
def test_scheduler_interval(name):
    expected = "step" if SCHEDULERS.get(name).name in ("one_cycle", "cyclic") else "epoch"
    assert scheduler_interval(name) == expected


def test_scheduler_interval_of_the_per_step_ones():
    assert scheduler_interval("one_cycle") == "step"
    assert scheduler_interval("cyclic") == "step"
    assert scheduler_interval("cosine") == "epoch"
    assert scheduler_interval("step") == "epoch"


@pytest.mark.parametrize("name", ["cosine", "cosine_annealing"])
def test_schedule_length_fills_cosine_t_max_from_the_budget(name):
    assert schedule_length_kwargs(name, {}, interval="epoch", epochs=5, total_steps=50) == {"T_max": 5}
    assert schedule_length_kwargs(name, {}, interval="step", epochs=5, total_steps=50) == {"T_max": 50}


def test_schedule_length_never_overrides_a_given_value():
    assert schedule_length_kwargs("cosine", {"T_max": 3}, interval="epoch", epochs=5, total_steps=50) == {}
    assert schedule_length_kwargs("one_cycle", {"total_steps": 7}, interval="step", epochs=5, total_steps=50) == {}


def test_schedule_length_for_one_cycle_and_polynomial():
    assert schedule_length_kwargs("one_cycle", {"max_lr": 1}, interval="step", epochs=5, total_steps=50) == {
        "total_steps": 50
    }
    assert schedule_length_kwargs("polynomial", {}, interval="epoch", epochs=5, total_steps=50) == {"total_iters": 5}
    assert schedule_length_kwargs("step", {}, interval="epoch", epochs=5, total_steps=50) == {}


def test_linear_keeps_torchs_default_length():
    # LinearLR is mostly a short warm-up; the runner does not stretch it over the whole run
    assert schedule_length_kwargs("linear", {}, interval="epoch", epochs=10, total_steps=100) == {}


def test_losses_with_their_own_parameters_are_not_offered():
    # the optimizer is built from the model's parameters, so a loss's own layer would never train
    assert "linear_cross_entropy" not in LOSSES


def test_cosine_filled_from_epochs_reaches_eta_min_at_the_last_epoch():
    optimizer = torch.optim.SGD(nn.Linear(1, 1).parameters(), lr=0.1)
    kwargs = schedule_length_kwargs("cosine", {}, interval="epoch", epochs=5, total_steps=50)
    scheduler = SCHEDULERS.build("cosine", optimizer, **kwargs)
    for _ in range(5):
        optimizer.step()
        scheduler.step()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)


def test_one_cycle_filled_from_total_steps_runs_exactly_that_many_steps():
    optimizer = torch.optim.SGD(nn.Linear(1, 1).parameters(), lr=0.1, momentum=0.9)
    kwargs = schedule_length_kwargs("one_cycle", {}, interval="step", epochs=2, total_steps=6)
    scheduler = SCHEDULERS.build("one_cycle", optimizer, max_lr=0.1, **kwargs)
    for _ in range(5):  # total_steps counts the initial lr as one step
        optimizer.step()
        scheduler.step()
