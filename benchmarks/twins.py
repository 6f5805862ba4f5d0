"""The seed configs written by hand: what a notebook would run instead of `trainer run configs/X.yaml`.

    python benchmarks/twins.py two_layer_net          # trains; last line: {"config", "steps", "seconds"}
    python benchmarks/twins.py lenet --max-steps 30   # stop after 30 steps, as train.max_steps=30 would

One function a config, registered in TWINS: plain PyTorch (nn.Linear / nn.Sequential, or the
registry's LeNet and ConvNet), torch.optim and loss modules, and the loop of the tutorials
(loops.bare_loop), trained on the same data, from the same seed, for the same steps as the config,
so the parameters come out as trainer's do (tests/test_benchmarks.py checks it against each run's
last.pt). What each does beyond stepping is what the config makes trainer do: the digits twins
validate after every epoch and LeNet's steps its cosine schedule; none reads its loss at log
points, so the loop is the floor trainer is measured against. "seconds" times the loop alone,
from the first batch to the last step's loss read.

The small twins make their data with torch as trainer's datasets do (the same generator draws),
rather than importing trainer.data, whose import (~80 ms with trainer's registry) would be a
noticeable part of a 2-second process; the digits twins import trainer.data's digits and split,
which the data ships with, where it is nothing next to their training. Every config has seed 0:
loops.slices shuffles each epoch as trainer does for that seed.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from loops import bare_loop, slices  # noqa: E402

SEED = 0  # every seed config's


@dataclass
class Trained:
    steps: int
    seconds: float  # the training loop's
    params: list[torch.Tensor]  # the model's state, in state_dict order


def train(net, loss_fn, opt, data, *, batch: int, epochs: float, max_steps: int | None, val=None, schedule=None) -> Trained:
    """`epochs` epochs of `data` (x, y) in shuffled batches, or `max_steps` steps if that comes
    first; after each epoch, the loss and accuracy on `val` (x, y) and a step of the scheduler
    `schedule(epochs)` makes, when given."""
    x, y = data
    per_epoch = math.ceil(len(x) / batch)
    steps = epochs * per_epoch if max_steps is None else min(epochs * per_epoch, max_steps)
    epochs = math.ceil(steps / per_epoch)  # as trainer's budget: a scheduler's length depends on it
    scheduler = schedule(epochs) if schedule else None
    start = time.perf_counter()
    if val is None and scheduler is None:
        bare_loop(net, loss_fn, opt, steps, lambda epoch: slices(x, y, epoch, batch))
    else:
        for epoch in range(epochs):
            bare_loop(net, loss_fn, opt, min(per_epoch, steps - epoch * per_epoch), lambda _: slices(x, y, epoch, batch))
            if val is not None:
                evaluate(net, loss_fn, *val, batch)
            if scheduler is not None:
                scheduler.step()
    seconds = time.perf_counter() - start
    if isinstance(net, nn.Module):
        return Trained(steps, seconds, list(net.state_dict().values()))
    return Trained(steps, seconds, [p.detach() for group in opt.param_groups for p in group["params"]])


def evaluate(net: nn.Module, loss_fn, x: torch.Tensor, y: torch.Tensor, batch: int) -> tuple[float, float]:
    """The notebooks' test loop: mean loss and accuracy over (x, y) in order."""
    net.eval()
    total, correct = torch.zeros(()), torch.zeros((), dtype=torch.long)
    with torch.no_grad():
        for i in range(0, len(x), batch):
            out = net(x[i : i + batch])
            total += loss_fn(out, y[i : i + batch]) * len(out)
            correct += (out.argmax(1) == y[i : i + batch]).sum()
    net.train()
    return total.item() / len(x), correct.item() / len(x)


# ---------------------------------------------------------------------------------------------
# the twins: one a config


def linear_regression(max_steps: int | None = None) -> Trained:
    """Learn y = 2x from x = 1, 2, 3, one point a step: Linear(1, 1), SGD lr 0.1, MSE, 40 epochs."""
    x, y = torch.tensor([[1.0], [2.0], [3.0]]), torch.tensor([[2.0], [4.0], [6.0]])
    torch.manual_seed(SEED)
    net = nn.Linear(1, 1)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    return train(net, nn.MSELoss(), opt, (x, y), batch=1, epochs=40, max_steps=max_steps)


def mlp(max_steps: int | None = None) -> Trained:
    """100 -> 300 -> 100 with ReLU, learning y = 0.5x + 0.3 from one sample x ~ N(0, 1):
    SGD lr 0.01, MSE, 500 full-batch steps."""
    g = torch.Generator().manual_seed(SEED)
    x = torch.randn(1, 100, generator=g)
    y = 0.5 * x + 0.3
    torch.manual_seed(SEED)
    net = nn.Sequential(nn.Linear(100, 300), nn.ReLU(), nn.Linear(300, 100))
    opt = torch.optim.SGD(net.parameters(), lr=0.01)
    return train(net, nn.MSELoss(), opt, (x, y), batch=1, epochs=math.inf, max_steps=min(500, max_steps or 500))


def two_layer_net(max_steps: int | None = None) -> Trained:
    """The tensor tutorial: 64 random x (1000) and y (10), 1000 -> 100 -> 10, ReLU, no bias,
    N(0, 1) weights; SGD lr 1e-6 on the summed squared error, 500 steps."""
    g = torch.Generator().manual_seed(SEED)
    x, y = torch.randn(64, 1000, generator=g), torch.randn(64, 10, generator=g)
    torch.manual_seed(SEED)
    net = nn.Sequential(nn.Linear(1000, 100, bias=False), nn.ReLU(), nn.Linear(100, 10, bias=False))
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0.0, 1.0)
    opt = torch.optim.SGD(net.parameters(), lr=1e-6)
    return train(net, nn.MSELoss(reduction="sum"), opt, (x, y), batch=64, epochs=math.inf, max_steps=min(500, max_steps or 500))


def sqrt2(max_steps: int | None = None) -> Trained:
    """sqrt(2) by gradient descent: one learnable x from 1.0, output x^2 - 2 trained to 0 with MSE,
    SGD lr 0.01, 200 steps."""
    x = torch.tensor(1.0, requires_grad=True)
    opt = torch.optim.SGD([x], lr=0.01)

    def net(inputs: torch.Tensor) -> torch.Tensor:
        return (x**2 - 2.0).expand(inputs.shape[0], 1)

    data = torch.zeros(1, 1), torch.zeros(1, 1)
    return train(net, nn.MSELoss(), opt, data, batch=1, epochs=200, max_steps=max_steps)


def _digits(image_size: int) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """The embedded digits at `image_size`, 20% held out as trainer holds them out."""
    from trainer.data import digits, split_indices

    x, y = digits(image_size).train
    train_idx, val_idx = split_indices(len(x), 0.2, SEED)
    return (x[train_idx], y[train_idx]), (x[val_idx], y[val_idx])


def lenet(max_steps: int | None = None) -> Trained:
    """LeNet-5 on the digits at 32x32, batch 64: SGD lr 0.05, momentum 0.9, cross entropy, a cosine
    schedule over 10 epochs, validated after each."""
    from trainer.models import LeNet

    data, val = _digits(32)
    torch.manual_seed(SEED)
    net = LeNet(num_classes=10)
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)

    def schedule(epochs: int) -> torch.optim.lr_scheduler.LRScheduler:
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)

    return train(net, nn.CrossEntropyLoss(), opt, data, batch=64, epochs=10, max_steps=max_steps, val=val, schedule=schedule)


def convnet(max_steps: int | None = None) -> Trained:
    """The notebooks' ConvNet on the digits at 28x28, batch 64: Adam lr 1e-3, NLL on its
    log-softmax, 8 epochs, validated after each."""
    from trainer.models import ConvNet

    data, val = _digits(28)
    torch.manual_seed(SEED)
    net = ConvNet(num_classes=10)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    return train(net, nn.NLLLoss(), opt, data, batch=64, epochs=8, max_steps=max_steps, val=val)


TWINS = {f.__name__: f for f in (linear_regression, mlp, two_layer_net, sqrt2, lenet, convnet)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("config", choices=list(TWINS))
    parser.add_argument("--max-steps", type=int, default=None, help="stop after this many steps (as train.max_steps)")
    args = parser.parse_args()
    trained = TWINS[args.config](args.max_steps)
    print(json.dumps({"config": args.config, "steps": trained.steps, "seconds": trained.seconds}))


if __name__ == "__main__":
    main()
