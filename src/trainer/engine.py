"""The training loop: `fit`, `train_epoch` and `evaluate` as plain functions.

The loss stays on the device between log points: the only host syncs are one `.item()` per log
point, one at an epoch end that is not a log point, and one per validation pass.
"""

from __future__ import annotations

import json
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

    def log_train(
        self, *, step: int, epoch: int, step_in_epoch: int, loss: float, lr: float, samples_per_s: float,
        grad_norm: float | None = None,
    ) -> None: ...

    def log_val(self, *, step: int, epoch: int, metrics: dict[str, float]) -> None: ...

    def epoch_finished(
        self, *, epoch: int, epochs: int, step: int, train_loss: float | None, val: dict[str, float] | None, seconds: float
    ) -> None: ...


class Collectives(Protocol):
    """What the loop needs in a data-parallel run (trainer.distributed.Distributed): in-place
    reductions over all ranks, called at log points and epoch ends only."""

    world_size: int

    def sum(self, tensor: torch.Tensor) -> torch.Tensor: ...

    def min(self, tensor: torch.Tensor) -> torch.Tensor: ...

    def sync_buffers(self, model: nn.Module) -> None: ...


@dataclass
class TrainState:
    """Where training is: enough to report, checkpoint and resume exactly."""

    step: int = 0  # optimizer steps done
    epoch: int = 0  # epochs completed
    batch_in_epoch: int = 0  # batches done in the current epoch: where a resumed run picks up
    train_loss: float | None = None  # mean training loss of the last completed epoch
    val: dict[str, float] = field(default_factory=dict)  # metrics of the last validation
    best: dict[str, float] = field(default_factory=dict)  # best value of each metric so far
    history: list[dict[str, Any]] = field(default_factory=list)  # one entry per epoch
    running: dict[str, Any] = field(default_factory=dict)  # device-side sums between log points (see Running)
    best_checkpoint: float | None = None  # the monitored metric's value when best.pt was written
    # the history's records as JSON, encoded by to_dict: the list they came from and its last one
    _encoded: tuple[Any, Any, list[str]] | None = field(default=None, init=False, repr=False, compare=False)

    def to_dict(self) -> dict[str, Any]:
        """Plain containers and tensors only, so a checkpoint loads with weights_only=True.

        The history is one JSON string, not a list of dicts: torch.save calls back into Python
        for every pickled object, so as a list every save pickled every epoch's record again and
        the saves of a run took time growing with the square of its epochs. Each record is
        encoded once, at the first save after it is appended; what a save still writes grows by
        ~100 bytes an epoch. Records are not changed after they are appended (fit only appends);
        a history replaced by another list is encoded anew.
        """
        source, last, encoded = self._encoded or (None, None, [])
        n = len(encoded)
        if source is not self.history or n > len(self.history) or (n and self.history[n - 1] is not last):
            encoded, n = [], 0
        encoded = encoded + [json.dumps(record) for record in self.history[n:]]
        self._encoded = (self.history, self.history[-1] if self.history else None, encoded)
        return {
            "step": self.step, "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch,
            "train_loss": self.train_loss, "val": dict(self.val), "best": dict(self.best),
            "history": "[" + ",".join(encoded) + "]",
            "running": {k: [t.detach() for t in v] if k == "pending" else v for k, v in self.running.items()},
            "best_checkpoint": self.best_checkpoint,
        }  # fmt: skip

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainState:
        """The inverse of `to_dict` (also of earlier versions, whose history is a list)."""
        data = dict(data)
        if isinstance(data.get("history"), str):
            data["history"] = json.loads(data["history"])
        return cls(**data)


def _not_finite(step: int) -> TrainingFailed:
    return TrainingFailed(
        f"the training loss is not finite at step {step}; "
        "try a lower optimizer.lr or set train.grad_clip (e.g. train.grad_clip=1.0)"
    )


def _first_not_finite(losses: torch.Tensor, first_step: int) -> int | None:
    """The step of the first non-finite loss in `losses` (steps first_step, first_step+1, ...)."""
    not_finite = ~torch.isfinite(losses)
    if not bool(not_finite.any()):
        return None
    return first_step + int(torch.argmax(not_finite.to(torch.uint8)))


_NONE = 2**62  # "no bad step" in a min-reduction over ranks


def _agreed_step(step: int | None, dist: Collectives | None, device: Any) -> int | None:
    """The earliest bad step of any rank (a collective: every rank must call it), or None."""
    if dist is None:
        return step
    earliest = int(dist.min(torch.tensor([_NONE if step is None else step], device=device)).item())
    return None if earliest == _NONE else earliest


def check_finite(running: dict[str, Any], dist: Collectives | None = None) -> None:
    """Raise TrainingFailed naming the first step whose loss was not finite (one host sync).

    `running` is `TrainState.running`; the runner calls this before writing a checkpoint, so a
    NaN never overwrites the last good one. Only the losses not folded in yet need a look: every
    fold is followed by a read of a sum that holds them, which raises on a non-finite value.
    With `dist`, every rank must call it, and all raise together.
    """
    pending = running.get("pending")
    step = None
    if pending:
        # without folding: a fold here would change the order of the float sums, and a resumed
        # run would log different numbers
        step = _first_not_finite(_stacked(pending), running["pending_first_step"])
    step = _agreed_step(step, dist, running["grad_norm"].device)
    if step is not None:
        raise _not_finite(step)


def _stacked(losses: list[torch.Tensor]) -> torch.Tensor:
    """The kept losses as one fp32 tensor (two device ops when they are fp32 already)."""
    # they are the steps' own loss tensors: the stack must not record a graph. Grad mode is switched
    # by hand, as torch.no_grad() as a decorator adds a third to the cost of a log point's read
    grad = torch.is_grad_enabled()
    torch.set_grad_enabled(False)
    try:
        stacked = torch.stack(losses)
    finally:
        torch.set_grad_enabled(grad)
    return stacked if stacked.dtype == torch.float32 else stacked.float()


def fold_pending(running: dict[str, Any]) -> tuple[torch.Tensor, int] | None:
    """Add the losses of the steps since the last fold to the window and epoch sums (one host sync).

    Returns the folded losses and the step of the first, for the caller's finiteness check.
    """
    pending = running.get("pending")
    if not pending:
        return None
    losses = _stacked(pending)
    total = losses.sum().item()  # a read point's one wait for the device: the sums are Python floats
    running["window_loss"] += total
    running["epoch_loss"] += total
    running["window_batches"] += len(pending)
    running["epoch_batches"] += len(pending)
    first = running["pending_first_step"]
    running["pending_first_step"] += len(pending)
    pending.clear()
    return losses, first


def _raise_not_finite(folded: tuple[torch.Tensor, int] | None, step: int, dist: Collectives | None, device: Any) -> None:
    """A read sum was not finite: name the first bad step among the losses just folded (of any rank)."""
    bad = _first_not_finite(*folded) if folded is not None else None
    bad = _agreed_step(bad, dist, device)
    raise _not_finite(bad if bad is not None else step)


class Running:
    """The training loss kept on the device between log points, so the loop never waits per step.

    Each step only appends its loss tensor to a list; at log points and epoch ends the list is
    summed in two device ops, read once, and added to the window and epoch sums (Python floats).
    All of it lives in `TrainState.running`, so a checkpoint taken between log points resumes into
    exactly the numbers the uninterrupted run would have logged.
    """

    def __init__(self, state: TrainState, device: torch.device, dist: Collectives | None = None) -> None:
        self.dist, self.device = dist, device
        v = self.values = state.running
        for name in ("window_loss", "epoch_loss"):
            v[name] = float(v.get(name, 0.0))  # float32 tensors in checkpoints of earlier versions
        v["grad_norm"] = v.get("grad_norm", torch.zeros(())).to(device)
        v.pop("nonfinite_at", None)  # kept by checkpoints of earlier versions; no longer needed
        v["pending"] = [t.to(device) for t in v.get("pending", [])]  # losses of steps not yet folded in
        for name in ("window_batches", "window_samples", "epoch_batches"):
            v.setdefault(name, 0)
        v.setdefault("pending_first_step", state.step + 1)
        self.pending: list[torch.Tensor] = v["pending"]
        self.window_started = time.perf_counter()
        self.clipping = False  # whether pre-clip gradient norms are being collected

    def add(self, loss: torch.Tensor, samples: int, grad_norm: torch.Tensor | None) -> None:
        """Record one step; no device op beyond the gradient-norm max when clipping.

        `loss` is kept as it is, not detached: a detach is a dispatcher op of its own, each step.
        After the backward pass it holds no activations, only its graph's nodes until the next read.
        """
        self.pending.append(loss)
        self.values["window_samples"] += samples
        if grad_norm is not None:
            self.clipping = True
            self.values["grad_norm"] = torch.maximum(self.values["grad_norm"], grad_norm.detach().float())

    def read_window(self) -> dict[str, float]:
        """The mean loss (and max pre-clip gradient norm) since the last log point; then start a new window."""
        folded = fold_pending(self.values)
        v = self.values
        loss = self._mean(v["window_loss"], v["window_batches"])
        if not math.isfinite(loss):
            _raise_not_finite(folded, v["pending_first_step"] - 1, self.dist, self.device)
        elapsed = time.perf_counter() - self.window_started
        samples = v["window_samples"] * (self.dist.world_size if self.dist is not None else 1)  # all ranks' batches are equal
        out = {"loss": loss, "samples_per_s": samples / elapsed if elapsed > 0 else 0.0}
        if self.clipping:
            out["grad_norm"] = v["grad_norm"].item()
            v["grad_norm"].zero_()
        v["window_loss"] = 0.0
        v["window_batches"] = v["window_samples"] = 0
        self.window_started = time.perf_counter()
        return out

    def _mean(self, total: float, count: int) -> float:
        """total / count, over all ranks in a data-parallel run (one all-reduce)."""
        if self.dist is None:
            return total / max(count, 1)
        both = self.dist.sum(torch.tensor([total, count], dtype=torch.float64, device=self.device))
        return (both[0] / both[1].clamp(min=1)).item()

    def read_epoch(self) -> float | None:
        """The epoch's mean training loss; then start a new epoch."""
        folded = fold_pending(self.values)
        v = self.values
        mean = self._mean(v["epoch_loss"], v["epoch_batches"]) if v["epoch_batches"] else None
        if mean is not None and not math.isfinite(mean):
            _raise_not_finite(folded, v["pending_first_step"] - 1, self.dist, self.device)
        v["epoch_loss"] = 0.0
        v["epoch_batches"] = 0
        return mean



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

    def done(self, state: TrainState, steps_per_epoch: int) -> bool:
        """Whether `state` has reached the end of the run: its epochs, or its last step."""
        return state.epoch >= self.epochs or state.step >= self.last_step(steps_per_epoch)


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (all devices) so a run repeats exactly."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def current_lr(optimizer: torch.optim.Optimizer) -> float:
    lr = optimizer.param_groups[0]["lr"]
    return float(lr) if not isinstance(lr, torch.Tensor) else lr.item()


def train_epoch(
    model: nn.Module,
    batches: Batches,
    loss_fn: nn.Module,
    optimizer: torch.optim.Optimizer,
    state: TrainState,
    settings: LoopSettings,
    *,
    precision: Precision,
    running: Running,
    last_step: int,
    scaler: Any = None,
    scheduler: Any = None,
    tracker: Tracker | None = None,
    after_step: Callable[[TrainState], None] | None = None,
) -> None:
    """Train over the rest of the current epoch (from `state.batch_in_epoch`) or until `last_step`."""
    model.train()
    autocast = precision.autocast if precision.dtype is not None else None  # fp32: no context to enter each step
    for inputs, targets in batches.epoch(state.epoch, start_batch=state.batch_in_epoch):
        # forward
        if autocast is None:
            loss = loss_fn(model(inputs), targets)
        else:
            with autocast():
                loss = loss_fn(model(inputs), targets)

        # backward and step
        optimizer.zero_grad(set_to_none=True)
        grad_norm = None
        if scaler is not None:
            scaler.scale(loss).backward()
            if settings.grad_clip:
                scaler.unscale_(optimizer)
                grad_norm = nn.utils.clip_grad_norm_(model.parameters(), settings.grad_clip)
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            if settings.grad_clip:
                grad_norm = nn.utils.clip_grad_norm_(model.parameters(), settings.grad_clip)
            optimizer.step()
        if scheduler is not None and settings.scheduler_interval == "step":
            scheduler.step()
        state.step += 1
        state.batch_in_epoch += 1

        # keep the loss on the device: no host sync between log points
        running.add(loss, targets.shape[0], grad_norm)

        # log
        if state.step % settings.log_every == 0 or state.step == last_step:
            window = running.read_window()
            if tracker is not None:
                tracker.log_train(
                    step=state.step, epoch=state.epoch + 1, step_in_epoch=state.batch_in_epoch,
                    lr=current_lr(optimizer), **window,
                )  # fmt: skip

        # checkpoints and stop requests (the runner's hook)
        if after_step is not None:
            after_step(state)
        if state.step >= last_step:
            break


@torch.no_grad()
def evaluate(
    model: nn.Module, batches: Batches, loss_fn: nn.Module, *, precision: Precision, classification: bool,
    dist: Collectives | None = None,
) -> dict[str, float]:
    """Mean loss (weighted by batch size) and, for classification, accuracy over `batches`
    (over every rank's share of them with `dist`)."""
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
    if dist is not None:
        totals = torch.stack([loss_sum.double(), correct.double(), torch.tensor(float(seen), dtype=torch.float64, device=device)])
        loss_sum, correct, seen = dist.sum(totals)[0], totals[1], int(totals[2].item())
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
    scaler: Any = None,
    tracker: Tracker | None = None,
    state: TrainState | None = None,
    after_step: Callable[[TrainState], None] | None = None,
    on_epoch_end: Callable[[TrainState, set[str]], None] | None = None,
    dist: Collectives | None = None,
) -> TrainState:
    """Train for `settings.epochs` epochs or `settings.max_steps` steps, whichever comes first.

    A `state` from a checkpoint resumes where it stopped, mid-epoch included. `after_step(state)`
    runs after every optimizer step and `on_epoch_end(state, improved)` after each epoch's
    validation, with the names of the metrics that reached a new best (the runner saves
    checkpoints in both).

    In a data-parallel run `model` is the DistributedDataParallel wrapper, `train_batches` and
    `val_batches` this rank's shares, and `dist` averages the logged losses and validation
    metrics over the ranks.
    """
    state = state or TrainState()
    running = Running(state, next(model.parameters()).device, dist)
    # validation runs each rank's share through the bare model: DDP's forward would sync buffers,
    # and the shares may differ in length by a batch
    eval_model = model.module if dist is not None else model
    last_step = settings.last_step(len(train_batches))
    while not settings.done(state, len(train_batches)):
        started = time.perf_counter()
        if tracker is not None:
            tracker.epoch_started(epoch=state.epoch + 1, epochs=settings.epochs, steps=len(train_batches))

        # train
        train_epoch(
            model, train_batches, loss_fn, optimizer, state, settings,
            precision=precision, running=running, last_step=last_step, scaler=scaler, scheduler=scheduler,
            tracker=tracker, after_step=after_step,
        )  # fmt: skip
        state.train_loss = running.read_epoch()
        state.epoch += 1
        state.batch_in_epoch = 0

        # validate
        state.val = {}
        if dist is not None:
            dist.sync_buffers(eval_model)  # one set of BatchNorm statistics for validation and checkpoints
        if val_batches is not None and val_batches.num_samples > 0:  # the same on every rank, unlike len()
            state.val = evaluate(
                eval_model, val_batches, loss_fn, precision=precision, classification=settings.classification, dist=dist
            )
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
        seconds = time.perf_counter() - started
        state.history.append({"epoch": state.epoch, "step": state.step, **metrics, "seconds": seconds})
        if tracker is not None:
            tracker.epoch_finished(
                epoch=state.epoch, epochs=settings.epochs, step=state.step,
                train_loss=state.train_loss, val=state.val or None, seconds=seconds,
            )  # fmt: skip
        if on_epoch_end is not None:
            on_epoch_end(state, improved)
    return state
