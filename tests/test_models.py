"""Tests for trainer.models: every registered model builds, runs forward and backward; model facts."""

import math

import pytest
import torch

from trainer.data import DataInfo
from trainer.models import MODELS, count_parameters, infer_model_kwargs

# Models whose output size is not given by a `num_classes` or `out_features` argument: the shape of
# one output row with default arguments. A new model of that kind must be added here.
OUTPUT_SHAPES = {"scalar_root": (1,)}
# Models registered without an `input_shape`: the shape of one sample to test them with.
INPUT_SHAPES: dict[str, tuple[int, ...]] = {}


def input_shape_of(entry) -> tuple[int, ...]:
    shape = entry.info.get("input_shape") or INPUT_SHAPES.get(entry.name)
    if shape is None:
        pytest.fail(f"model '{entry.name}' has no input_shape; register one or add it to INPUT_SHAPES in {__file__}")
    return tuple(shape)


def expected_output_shape(entry) -> tuple[int, ...]:
    params = entry.parameters()
    for size_arg in ("num_classes", "out_features"):
        if size_arg in params:
            return (params[size_arg].default,)
    if entry.name not in OUTPUT_SHAPES:
        pytest.fail(
            f"model '{entry.name}' has neither num_classes nor out_features; add its output shape to OUTPUT_SHAPES in {__file__}"
        )
    return OUTPUT_SHAPES[entry.name]


@pytest.mark.parametrize("entry", list(MODELS), ids=lambda e: e.name)
def test_every_model_builds_with_defaults_and_runs_forward_and_backward(entry):
    torch.manual_seed(0)
    assert MODELS.missing_kwargs(entry.name, []) == [], "every built-in model must build with defaults"
    model = MODELS.build(entry.name)
    assert isinstance(model, torch.nn.Module)
    params = list(model.parameters())
    assert params, "a model with nothing to train"
    x = torch.randn(3, *input_shape_of(entry))
    out = model(x)
    assert out.shape == (3, *expected_output_shape(entry))
    assert torch.isfinite(out).all()
    out.float().pow(2).sum().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, f"{entry.name}: no gradient reaches {name}"
        assert torch.isfinite(p.grad).all(), f"{entry.name}: non-finite gradient in {name}"
        assert p.grad.abs().sum() > 0, f"{entry.name}: zero gradient in {name}"


@pytest.mark.parametrize("entry", list(MODELS), ids=lambda e: e.name)
def test_every_model_has_a_description(entry):
    assert entry.description.strip()


def test_lenet_has_the_tutorial_parameter_count():
    assert count_parameters(MODELS.build("lenet")) == 61_706


def test_lenet_takes_other_channels_and_classes():
    model = MODELS.build("lenet", num_classes=3, in_channels=3)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 3)


def test_count_parameters_ignores_frozen_ones():
    model = MODELS.build("linear_regression")
    assert count_parameters(model) == 2
    model[1].bias.requires_grad_(False)
    assert count_parameters(model) == 1


def test_convnet_outputs_log_probabilities():
    torch.manual_seed(0)
    out = MODELS.build("convnet")(torch.randn(4, 1, 28, 28))
    assert (out <= 0).all()
    assert torch.allclose(out.exp().sum(dim=1), torch.ones(4), atol=1e-5)


def test_two_layer_net_normal_init_has_unit_std_weights_and_no_bias():
    torch.manual_seed(0)
    model = MODELS.build("two_layer_net", init="normal")
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(1000, 100), (100, 10)]
    assert all(m.bias is None for m in linears)
    weights = torch.cat([p.flatten() for p in model.parameters()])
    assert weights.numel() == 1000 * 100 + 100 * 10
    assert weights.std().item() == pytest.approx(1.0, abs=0.02)
    assert weights.mean().item() == pytest.approx(0.0, abs=0.02)


def test_two_layer_net_default_init_is_torch_default_scale():
    torch.manual_seed(0)
    model = MODELS.build("two_layer_net", init="default")
    first = next(p for p in model.parameters())
    assert first.abs().max().item() <= 1 / math.sqrt(1000) + 1e-6


def test_two_layer_net_refuses_an_unknown_init():
    _, problems = MODELS.check_kwargs("two_layer_net", {"init": "xavier"})
    assert problems and "expects one of 'normal', 'default'" in problems[0][1]


def test_mlp_hidden_list_builds_that_many_layers():
    model = MODELS.build("mlp", in_features=4, hidden=[8, 6], out_features=2)
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(4, 8), (8, 6), (6, 2)]
    assert model(torch.randn(5, 4)).shape == (5, 2)


def test_scalar_root_outputs_x_squared_minus_value_per_sample():
    model = MODELS.build("scalar_root", init=3.0, value=2.0)
    out = model(torch.randn(5, 1))
    assert out.shape == (5, 1)
    assert torch.equal(out, torch.full((5, 1), 7.0))
    out.sum().backward()
    assert model.x.grad.item() == pytest.approx(5 * 2 * 3.0)  # d/dx sum(x^2 - 2) over 5 samples


# ---------------------------------------------------------------------------------------------
# infer_model_kwargs


def info(input_shape, target_shape=(), task="classification", num_classes=None):
    return DataInfo(input_shape, target_shape, task, num_classes, 100, 20)


def test_infer_fills_in_and_out_features_for_regression():
    assert infer_model_kwargs("mlp", {}, info((4,), (2,), "regression")) == {"in_features": 4, "out_features": 2}


def test_infer_scalar_regression_target_is_one_output():
    assert infer_model_kwargs("linear_regression", {}, info((3,), (), "regression")) == {
        "in_features": 3,
        "out_features": 1,
    }


def test_infer_flattens_image_inputs_for_an_mlp_classifier():
    inferred = infer_model_kwargs("mlp", {}, info((1, 8, 8), (), "classification", 10))
    assert inferred == {"in_features": 64, "out_features": 10}
    model = MODELS.build("mlp", **inferred)
    assert model(torch.randn(2, 1, 8, 8)).shape == (2, 10)


def test_infer_fills_num_classes_and_in_channels_for_images():
    inferred = infer_model_kwargs("lenet", {}, info((3, 32, 32), (), "classification", 7))
    assert inferred == {"num_classes": 7, "in_channels": 3}
    assert MODELS.build("lenet", **inferred)(torch.randn(2, 3, 32, 32)).shape == (2, 7)


@pytest.mark.parametrize(
    ("name", "given", "data"),
    [
        ("mlp", {"in_features": 5, "out_features": 9}, info((4,), (2,), "regression")),
        ("lenet", {"num_classes": 10, "in_channels": 1}, info((3, 32, 32), (), "classification", 7)),
    ],
)
def test_infer_never_overrides_a_size_the_config_gave(name, given, data):
    assert infer_model_kwargs(name, given, data) == {}


def test_infer_fills_only_what_is_missing():
    inferred = infer_model_kwargs("lenet", {"num_classes": 10}, info((3, 32, 32), (), "classification", 7))
    assert inferred == {"in_channels": 3}


def test_infer_nothing_for_a_model_without_size_arguments():
    assert infer_model_kwargs("scalar_root", {}, info((1,), (), "regression")) == {}


def test_infer_no_in_channels_from_flat_inputs():
    assert "in_channels" not in infer_model_kwargs("lenet", {}, info((64,), (), "classification", 10))
