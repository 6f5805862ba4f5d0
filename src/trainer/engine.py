"""The training loop: `fit`, `train_epoch` and `evaluate` as plain functions.

The loss stays on the device between log points: the only host syncs are one `.item()` per log
point, one per epoch for the epoch's mean loss, and one per validation pass.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

import numpy as np
import torch
from torch import nn

from trainer.components import is_plateau
from trainer.device import Precision
from trainer.errors import TrainingFailed


class Batches(Protocol):
    """What the loop needs from the data (trainer.data.TensorBatches / LoaderBatches)."""

    num_samples: int

    def __len__(self) -> int: ...

    def epoch(self, epoch: int, start_batch: int = 0) -> Any: ...


class Tracker(Protocol):
    """What the loop reports to (trainer.tracking.Tracker); called at log points and epoch ends only."""

    def epoch_started(self, *, epoch: int, epochs: int, steps: int) -> None: ...

    def log_train(self, *, step: int, epoch: int, step_in_epoch: int, loss: float, lr: float, samples_per_s: float) -> None: ...

    def log_val(self, *, step: int, epoch: int, metrics: dict[str, float]) -> None: ...

    def epoch_finished(
        self, *, epoch: int, epochs: int, step: int, train_loss: float | None, val: dict[str, float] | None, seconds: float
    ) -> None: ...


@dataclass
class TrainState:
    """Where training is: enough to report, checkpoint and resume."""

    step: int = 0  # optimizer steps done
    epoch: int = 0  # epochs completed
    train_loss: float | None = None  # mean training loss of the last epoch
    val: dict[str, float] = field(default_factory=dict)  # metrics of the last validation
    best: dict[str, float] = field(default_factory=dict)  # best value of each metric so far
    history: list[dict[str, Any]] = field(default_factory=list)  # one entry per epoch


@dataclass
class LoopSettings:
    """How the loop runs; built from the config's `train` section by the caller."""

    epochs: int
    max_steps: int | None = None
    log_every: int = 10
    grad_clip: float | None = None
    classification: bool = False
    scheduler_interval: str = "epoch"  # 'epoch' | 'step'

    def last_step(self, steps_per_epoch: int) -> int:
        """The optimizer step the run ends on: the epochs' worth, or max_steps if that comes first."""
        steps = self.epochs * steps_per_epoch
        return steps if self.max_steps is None else min(steps, self.max_steps)


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (all devices) so a run repeats exactly."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def current_lr(optimizer: torch.optim.Optimizer) -> float:
    lr = optimizer.param_groups[0]["lr"]
    return float(lr) if not isinstance(lr, torch.Tensor) else lr.item()


def _check_finite(loss: float, step: int, since: int) -> None:
    if not math.isfinite(loss):
        where = f"step {step}" if since >= step else f"steps {since}-{step}"
        raise TrainingFailed(
            f"the training loss became {loss} at {where}; "
            "try a lower optimizer.lr or set train.grad_clip (e.g. train.grad_clip=1.0)"
        )


class LogWindow:
    """The training loss summed on the device since the last log point, read back only when logged."""

    def __init__(self, device: torch.device, first_step: int) -> None:
        self.loss_sum = torch.zeros((), device=device)
        self.batches = self.samples = 0
        self.reset(first_step)

    def add(self, loss: torch.Tensor, samples: int) -> None:
        self.loss_sum += loss
        self.batches += 1
        self.samples += samples

    def reset(self, first_step: int) -> None:
        self.loss_sum.zero_()
        self.batches = self.samples = 0
        self.first_step = first_step
        self.started = time.perf_counter()


def train_epoch(
    model: nn.Module,
    batches: Batches,
    loss_fn: nn.Module,
    optimizer: torch.optim.Optimizer,
    state: TrainState,
    settings: LoopSettings,
    *,
    precision: Precision,
    window: LogWindow,
    last_step: int,
    scaler: Any = None,
    scheduler: Any = None,
    tracker: Tracker | None = None,
) -> float | None:
    """One pass over `batches` (or until `last_step`); returns the epoch's mean training loss."""
    model.train()
    epoch_sum = torch.zeros_like(window.loss_sum)
    epoch_batches = 0
    for step_in_epoch, (inputs, targets) in enumerate(batches.epoch(state.epoch), start=1):
        # forward
        with precision.autocast():
            loss = loss_fn(model(inputs), targets)

        # backward and step
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            if settings.grad_clip:
                scaler.unscale_(optimizer)
                nn.utils.clip_grad_norm_(model.parameters(), settings.grad_clip)
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            if settings.grad_clip:
                nn.utils.clip_grad_norm_(model.parameters(), settings.grad_clip)
            optimizer.step()
        if scheduler is not None and settings.scheduler_interval == "step":
            scheduler.step()
        state.step += 1

        # accumulate on the device: no host sync between log points
        detached = loss.detach().float()
        epoch_sum += detached
        epoch_batches += 1
        window.add(detached, targets.shape[0])

        # log
        if state.step % settings.log_every == 0 or state.step == last_step:
            mean = (window.loss_sum / window.batches).item()
            _check_finite(mean, state.step, window.first_step)
            elapsed = time.perf_counter() - window.started
            if tracker is not None:
                tracker.log_train(
                    step=state.step,
                    epoch=state.epoch + 1,
                    step_in_epoch=step_in_epoch,
                    loss=mean,
                    lr=current_lr(optimizer),
                    samples_per_s=window.samples / elapsed if elapsed > 0 else 0.0,
                )
            window.reset(state.step + 1)
        if state.step >= last_step:
            break
    return (epoch_sum / epoch_batches).item() if epoch_batches else None


@torch.no_grad()
def evaluate(
    model: nn.Module, batches: Batches, loss_fn: nn.Module, *, precision: Precision, classification: bool
) -> dict[str, float]:
    """Mean loss (weighted by batch size) and, for classification, accuracy over `batches`."""
    model.eval()
    device = next(model.parameters()).device
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    seen = 0
    for inputs, targets in batches.epoch(0):
        # forward
        with precision.autocast():
            outputs = model(inputs)
            loss = loss_fn(outputs, targets)
        n = targets.shape[0]
        loss_sum += loss.detach().float() * n
        if classification:
            correct += (outputs.argmax(dim=1) == targets).sum()
        seen += n
    if seen == 0:
        return {}
    metrics = {"loss": loss_sum.item() / seen}
    if classification:
        metrics["accuracy"] = correct.item() / seen
    return metrics


def update_best(best: dict[str, float], metrics: dict[str, float]) -> set[str]:
    """Record new bests in `best` (highest accuracy, lowest everything else); return the names that improved."""
    improved = set()
    for name, value in metrics.items():
        if name not in best or (value > best[name] if "accuracy" in name else value < best[name]):
            best[name] = value
            improved.add(name)
    return improved


def fit(
    model: nn.Module,
    train_batches: Batches,
    val_batches: Batches | None,
    loss_fn: nn.Module,
    optimizer: torch.optim.Optimizer,
    settings: LoopSettings,
    *,
    precision: Precision,
    scheduler: Any = None,
    tracker: Tracker | None = None,
    state: TrainState | None = None,
    on_epoch_end: Callable[[TrainState, bool], None] | None = None,
) -> TrainState:
    """Train for `settings.epochs` epochs or `settings.max_steps` steps, whichever comes first.

    `on_epoch_end(state, improved)` runs after each epoch's validation (the runner saves
    checkpoints there); `improved` says whether the val loss (else the train loss) is a new best.
    """
    state = state or TrainState()
    scaler = precision.grad_scaler()
    last_step = settings.last_step(len(train_batches))
    window = LogWindow(next(model.parameters()).device, state.step + 1)
    while state.epoch < settings.epochs and state.step < last_step:
        started = time.perf_counter()
        if tracker is not None:
            tracker.epoch_started(epoch=state.epoch + 1, epochs=settings.epochs, steps=len(train_batches))

        # train
        state.train_loss = train_epoch(
            model, train_batches, loss_fn, optimizer, state, settings,
            precision=precision, window=window, last_step=last_step, scaler=scaler, scheduler=scheduler,
            tracker=tracker,
        )  # fmt: skip
        state.epoch += 1

        # validate
        state.val = {}
        if val_batches is not None and len(val_batches) > 0:
            state.val = evaluate(model, val_batches, loss_fn, precision=precision, classification=settings.classification)
            if tracker is not None:
                tracker.log_val(step=state.step, epoch=state.epoch, metrics=state.val)

        # schedule
        if scheduler is not None and settings.scheduler_interval == "epoch":
            if is_plateau(scheduler):
                scheduler.step(state.val.get("loss", state.train_loss))
            else:
                scheduler.step()

        # bookkeeping and the epoch-end hook
        metrics = {f"val_{k}": v for k, v in state.val.items()}
        if state.train_loss is not None:
            metrics["train_loss"] = state.train_loss
        improved = update_best(state.best, metrics)
        monitor = "val_loss" if "val_loss" in metrics else "train_loss"
        seconds = time.perf_counter() - started
        state.history.append({"epoch": state.epoch, "step": state.step, **metrics, "seconds": seconds})
        if tracker is not None:
            tracker.epoch_finished(
                epoch=state.epoch, epochs=settings.epochs, step=state.step,
                train_loss=state.train_loss, val=state.val or None, seconds=seconds,
            )  # fmt: skip
        if on_epoch_end is not None:
            on_epoch_end(state, monitor in improved)
    return state
