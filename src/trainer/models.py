"""The built-in models, each one decorated function registered under a short name.

`input_shape` is the shape of one sample the model expects (None where its sizes are arguments).
Arguments named `in_features`, `out_features`, `in_channels` and `num_classes` are read off the
data when the config leaves them out (see `infer_model_kwargs`).
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from trainer.registry import Registry

MODELS = Registry("model", entry_point_group="trainer.models")

# the argument names the runner fills in from the data when the config does not give them
INFERABLE = ("in_features", "out_features", "in_channels", "num_classes")


@MODELS.register("linear_regression", input_shape=(1,))
def linear_regression(in_features: int = 1, out_features: int = 1) -> nn.Module:
    """A single linear layer: y = w x + b."""
    return nn.Sequential(nn.Flatten(), nn.Linear(in_features, out_features))


@MODELS.register("mlp", input_shape=(100,))
def mlp(in_features: int = 100, hidden: int | list[int] = 300, out_features: int = 100, dropout: float = 0.0) -> nn.Module:
    """Fully connected layers with ReLU between them (default 100 -> 300 -> 100)."""
    sizes = [in_features, *([hidden] if isinstance(hidden, int) else hidden), out_features]
    layers: list[nn.Module] = [nn.Flatten()]
    for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(n_in, n_out))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
    return nn.Sequential(*layers)


@MODELS.register("two_layer_net", input_shape=(1000,))
def two_layer_net(
    in_features: int = 1000,
    hidden: int = 100,
    out_features: int = 10,
    bias: bool = False,
    init: Literal["normal", "default"] = "normal",
) -> nn.Module:
    """Linear -> ReLU -> Linear without bias, N(0,1) weights as in the tensor-tutorial notebook."""
    model = nn.Sequential(
        nn.Flatten(), nn.Linear(in_features, hidden, bias=bias), nn.ReLU(), nn.Linear(hidden, out_features, bias=bias)
    )
    if init == "normal":
        # the notebook draws w1, w2 ~ N(0,1); its loss curve (1e7 -> <1e-2 at lr 1e-6) depends on that scale
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(0.0, 1.0)
    return model


class LeNet(nn.Module):
    """LeNet-5 as in the PyTorch 60-minute tutorial: 32x32 input, conv 6@5, conv 16@5, fc 120, 84."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 6, 5)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.fc1 = nn.Linear(16 * 5 * 5, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = torch.flatten(x, 1)
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        return self.fc3(x)


@MODELS.register("lenet", input_shape=(1, 32, 32))
def lenet(num_classes: int = 10, in_channels: int = 1) -> nn.Module:
    """LeNet-5 (conv 6@5, pool, conv 16@5, pool, fc 120, 84); 32x32 images."""
    return LeNet(num_classes, in_channels)


class ConvNet(nn.Module):
    """The MNIST ConvNet of the notebooks: conv 10@5, pool, conv 20@3, fc 500, log-softmax output."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 10, 5)  # 28 -> 24, pooled to 12
        self.conv2 = nn.Conv2d(10, 20, 3)  # 12 -> 10
        self.fc1 = nn.Linear(20 * 10 * 10, 500)
        self.fc2 = nn.Linear(500, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.relu(self.conv2(x))
        x = torch.flatten(x, 1)
        x = F.relu(self.fc1(x))
        return F.log_softmax(self.fc2(x), dim=1)


@MODELS.register("convnet", input_shape=(1, 28, 28))
def convnet(num_classes: int = 10, in_channels: int = 1) -> nn.Module:
    """Conv 10@5, pool, conv 20@3, fc 500, log-softmax; 28x28 images (pair with the nll loss)."""
    return ConvNet(num_classes, in_channels)


class ScalarRoot(nn.Module):
    """One learnable number x; every output is x**2 - value, so training towards 0 finds sqrt(value)."""

    def __init__(self, init: float = 1.0, value: float = 2.0) -> None:
        super().__init__()
        self.x = nn.Parameter(torch.tensor(float(init)))
        self.value = value

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        # the inputs only set the batch size: the model is a function of its one parameter
        return (self.x**2 - self.value).expand(inputs.shape[0], 1)


@MODELS.register("scalar_root", input_shape=(1,))
def scalar_root(init: float = 1.0, value: float = 2.0) -> nn.Module:
    """One learnable x with output x^2 - value: trained to 0 it finds sqrt(value)."""
    return ScalarRoot(init, value)


def infer_model_kwargs(name: str, given: dict[str, Any], info: Any) -> dict[str, Any]:
    """Sizes the data determines, for the arguments of model `name` the config left out.

    `info` is a `trainer.data.DataInfo`. Returns only the inferred arguments.
    """
    params = MODELS.get(name).parameters()
    flat_in = math.prod(info.input_shape) if info.input_shape else 1
    if info.task == "classification":
        out = info.num_classes
    else:
        out = math.prod(info.target_shape) if info.target_shape else 1
    candidates = {
        "in_features": flat_in,
        "out_features": out,
        "in_channels": info.input_shape[0] if len(info.input_shape) == 3 else None,
        "num_classes": info.num_classes,
    }
    return {k: v for k, v in candidates.items() if k in params and k not in given and v is not None}


def count_parameters(model: nn.Module) -> int:
    """Trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
