"""The training loop: `fit`, `train_epoch` and `evaluate` as plain functions.

The loss is summed on the device between log points: the host waits for it once per log point,
once at an epoch end and once per validation pass, never per step.
"""

from __future__ import annotations

import functools
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


class Pictures(Protocol):
    """What the loop shows of its model after validation (trainer.tracking.Pictures): called at epoch ends only."""

    def observer(self, state: TrainState) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], None] | None:
        """A callback for this epoch's validation batches, `(inputs, outputs, targets)`, or None when
        it needs none; on every rank of a data-parallel run."""
        ...

    def validated(self, state: TrainState, *, trained: nn.Module, validated: nn.Module, dist: Collectives | None) -> None:
        """After the epoch's validation (`state.val` is set): `trained` is the bare model (its
        gradients are the last step's), `validated` the one validation ran (the EMA model with
        train.ema); on every rank of a data-parallel run."""
        ...


class Collectives(Protocol):
    """What the loop needs in a data-parallel run (trainer.distributed.Distributed): in-place
    reductions over all ranks, called at log points and epoch ends only."""

    world_size: int

    def sum(self, tensor: torch.Tensor) -> torch.Tensor: ...

    def sync_buffers(self, model: nn.Module) -> None: ...


@dataclass
class TrainState:
    """Where training is: enough to report, checkpoint and resume exactly. The per-epoch history
    is in metrics.jsonl, not here."""

    step: int = 0  # optimizer steps done
    epoch: int = 0  # epochs completed
    batch_in_epoch: int = 0  # batches done in the current epoch: where a resumed run picks up
    train_loss: float | None = None  # mean training loss of the last completed epoch
    val: dict[str, float] = field(default_factory=dict)  # metrics of the last validation
    best: dict[str, float] = field(default_factory=dict)  # best value of each metric so far
    running: dict[str, Any] = field(default_factory=dict)  # the loss sums between log points (see RunningLoss)
    best_checkpoint: float | None = None  # the monitored metric's value of the epoch best.pt holds
    best_epoch: int | None = None  # the epoch best.pt holds (1-based)
    patience_best: float | None = None  # early stopping: the monitored value that last improved by more than min_delta
    stale_epochs: int = 0  # early stopping: epochs since then
    stopped_early: bool = False  # early stopping ended the run

    def to_dict(self) -> dict[str, Any]:
        """Plain containers and tensors only, so a checkpoint loads with weights_only=True."""
        running = {k: v.detach().clone() if isinstance(v, torch.Tensor) else v for k, v in self.running.items()}
        return {
            "step": self.step, "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch,
            "train_loss": self.train_loss, "val": dict(self.val), "best": dict(self.best),
            "running": running, "best_checkpoint": self.best_checkpoint, "best_epoch": self.best_epoch,
            "patience_best": self.patience_best, "stale_epochs": self.stale_epochs, "stopped_early": self.stopped_early,
        }  # fmt: skip

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainState:
        """The inverse of `to_dict`; the history that earlier checkpoints kept is dropped."""
        data = {k: v for k, v in data.items() if k != "history"}
        return cls(**data)


def _not_finite(first: int, last: int) -> TrainingFailed:
    where = f"at step {last}" if first >= last else f"between steps {first} and {last}"
    return TrainingFailed(
        f"the training loss is not finite {where}; "
        "try a lower optimizer.lr or set train.grad_clip (e.g. train.grad_clip=1.0)"
    )


def _pending_steps(running: dict[str, Any]) -> tuple[int, int]:
    """The first and last step whose losses are in the device sum."""
    first = running["pending_first_step"]
    return first, first + running["pending_batches"] - 1


def check_finite(running: dict[str, Any], dist: Collectives | None = None) -> None:
    """Raise TrainingFailed if a loss not yet read (in `TrainState.running`) is not finite: one
    host sync. The runner calls it before a checkpoint, so a NaN never overwrites the last good
    one. With `dist` every rank must call it, and all raise together."""
    pending = running.get("pending")
    if pending is None:
        return
    total = pending.double()
    if dist is not None:
        total = dist.sum(total.reshape(1))
    if not math.isfinite(total.sum().item()):
        raise _not_finite(*_pending_steps(running))


class RunningLoss:
    """The training loss summed on the device between reads, so the loop never waits per step.

    A read (a log point, an epoch end) takes the device sum once and adds it to the log window's
    and the epoch's sums. All of it lives in `TrainState.running`, so a checkpoint taken between
    log points resumes into exactly the numbers the uninterrupted run would have logged.
    """

    def __init__(self, state: TrainState, device: torch.device, dist: Collectives | None = None) -> None:
        self.dist, self.device = dist, device
        v = self.values = state.running
        pending = v.get("pending", torch.zeros(()))
        if isinstance(pending, list):  # checkpoints of format 1-2 kept each step's loss
            v["pending_batches"] = len(pending)
            pending = torch.stack(pending).float().sum() if pending else torch.zeros(())
        v["pending"] = pending.to(device=device, dtype=torch.float32)
        v["grad_norm"] = v.get("grad_norm", torch.zeros(())).to(device)
        for name in ("window_loss", "epoch_loss"):
            v[name] = float(v.get(name, 0.0))
        for name in ("pending_batches", "window_batches", "window_samples", "epoch_batches"):
            v.setdefault(name, 0)
        v.setdefault("pending_first_step", state.step + 1)
        v.pop("nonfinite_at", None)
        self.window_started = time.perf_counter()
        self.clipping = False  # whether pre-clip gradient norms are being collected

    def add(self, loss: torch.Tensor, samples: int, grad_norm: torch.Tensor | None, steps: int = 1) -> None:
        """Record one batch (its loss, divided by the batches of its step) and the `steps` it ends: device ops only."""
        v = self.values
        v["pending"] += loss.detach()
        v["pending_batches"] += steps
        v["window_samples"] += samples
        if grad_norm is not None:
            self.clipping = True
            torch.maximum(v["grad_norm"], grad_norm.detach().float(), out=v["grad_norm"])

    def _fold(self) -> tuple[int, int]:
        """Add the device sum to the window's and the epoch's (a read's one wait for the device);
        returns the steps it held."""
        v = self.values
        steps = _pending_steps(self.values)
        if v["pending_batches"]:
            total = v["pending"].item()
            v["window_loss"] += total
            v["epoch_loss"] += total
            v["window_batches"] += v["pending_batches"]
            v["epoch_batches"] += v["pending_batches"]
            v["pending_first_step"] += v["pending_batches"]
            v["pending_batches"] = 0
            v["pending"].zero_()
        return steps

    def _mean(self, total: float, count: int, steps: tuple[int, int]) -> float:
        """total / count, over all ranks in a data-parallel run (one all-reduce); a non-finite
        total stops the run, naming the steps just read (every earlier one was read finite)."""
        total, count = self._all_ranks(total, count)
        if not math.isfinite(total):
            raise _not_finite(*steps)
        return total / max(count, 1)

    def _all_ranks(self, total: float, count: int) -> tuple[float, int]:
        if self.dist is None:
            return total, count
        both = self.dist.sum(torch.tensor([total, count], dtype=torch.float64, device=self.device))
        return both[0].item(), int(both[1].item())

    def read_window(self) -> dict[str, float]:
        """The mean loss (and max pre-clip gradient norm) since the last log point; then start a new window."""
        steps = self._fold()
        v = self.values
        loss = self._mean(v["window_loss"], v["window_batches"], steps)
        elapsed = time.perf_counter() - self.window_started
        samples = v["window_samples"] * (self.dist.world_size if self.dist is not None else 1)  # all ranks' batches are equal
        out = {"loss": loss, "samples_per_s": samples / elapsed if elapsed > 0 else 0.0}
        if self.clipping:
            out["grad_norm"] = v["grad_norm"].item()
            v["grad_norm"].zero_()
        v["window_loss"], v["window_batches"], v["window_samples"] = 0.0, 0, 0
        self.window_started = time.perf_counter()
        return out

    def read_epoch(self) -> float | None:
        """The epoch's mean training loss; then start a new epoch."""
        steps = self._fold()
        v = self.values
        mean = self._mean(v["epoch_loss"], v["epoch_batches"], steps) if v["epoch_batches"] else None
        v["epoch_loss"], v["epoch_batches"] = 0.0, 0
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
    accumulate: int = 1  # batches per optimizer step
    monitor: str = "val_loss"  # the metric best.pt and early stopping follow
    mode: str = "min"  # 'min' | 'max': which way `monitor` improves
    patience: int | None = None  # early stopping: epochs without improvement before the run stops; None: never
    min_delta: float = 0.0  # early stopping: an improvement smaller than this does not count

    def steps_per_epoch(self, batches: int) -> int:
        """Optimizer steps in an epoch of `batches` batches: one per `accumulate`, and one for the rest."""
        return -(-batches // self.accumulate)

    def last_step(self, batches_per_epoch: int) -> int:
        """The optimizer step the run ends on: the epochs' worth, or max_steps if that comes first."""
        steps = self.epochs * self.steps_per_epoch(batches_per_epoch)
        return steps if self.max_steps is None else min(steps, self.max_steps)

    def done(self, state: TrainState, batches_per_epoch: int) -> bool:
        """Whether `state` has reached the end of the run: its epochs, its last step, or early stopping."""
        return state.stopped_early or state.epoch >= self.epochs or state.step >= self.last_step(batches_per_epoch)

    def between_steps(self, state: TrainState, batches_per_epoch: int) -> bool:
        """Whether the gradients hold batches not yet stepped on (an epoch's last batch always steps)."""
        return state.batch_in_epoch % self.accumulate != 0 and state.batch_in_epoch < batches_per_epoch


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (all devices) so a run repeats exactly."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def current_lr(optimizer: torch.optim.Optimizer) -> float:
    lr = optimizer.param_groups[0]["lr"]
    return float(lr) if not isinstance(lr, torch.Tensor) else lr.item()


def forward_backward(
    model: nn.Module, loss_fn: nn.Module, inputs: Any, targets: Any, *, precision: Precision, scaler: Any, share: int = 1,
    sync: bool = True,
) -> torch.Tensor:
    """One batch's loss (divided by `share`, the batches its step sums) and its gradients; under
    DDP, without `sync` the gradients are not all-reduced (DDP reads `no_sync()` in its forward)."""
    if not sync and hasattr(model, "no_sync"):
        with model.no_sync():
            return forward_backward(model, loss_fn, inputs, targets, precision=precision, scaler=scaler, share=share)
    with precision.autocast():
        loss = loss_fn(model(inputs), targets)
    if share > 1:
        loss = loss / share
    scaler.scale(loss).backward()
    return loss


def train_epoch(
    model: nn.Module,
    batches: Batches,
    loss_fn: nn.Module,
    optimizer: torch.optim.Optimizer,
    state: TrainState,
    settings: LoopSettings,
    *,
    precision: Precision,
    running: RunningLoss,
    last_step: int,
    scaler: Any,
    scheduler: Any = None,
    tracker: Tracker | None = None,
    after_batch: Callable[[TrainState], None] | None = None,
    update_ema: Callable[[], None] | None = None,
) -> None:
    """Train over the rest of the current epoch (from `state.batch_in_epoch`) or until `last_step`.

    With `settings.accumulate` N, each optimizer step sums the gradients of N batches (the epoch's
    last step those left over), each batch's loss divided by their number; under DDP only the
    stepping batch all-reduces them.
    """
    if not model.training:  # validation puts it back itself: a walk over every module costs ~30 us an epoch
        model.train()
    accumulate, num_batches = settings.accumulate, len(batches)
    for inputs, targets in batches.epoch(state.epoch, start_batch=state.batch_in_epoch):
        position = state.batch_in_epoch % accumulate  # this batch's place among those of its step
        state.batch_in_epoch += 1
        steps = position == accumulate - 1 or state.batch_in_epoch == num_batches

        # forward and backward (gradients add up until the step)
        if position == 0:
            optimizer.zero_grad(set_to_none=True)
        # the mean over the step's batches, as one batch of all of them would give
        share = min(accumulate, num_batches - state.batch_in_epoch + position + 1)
        # DDP: the stepping batch all-reduces the gradients' sum
        loss = forward_backward(model, loss_fn, inputs, targets, precision=precision, scaler=scaler, share=share, sync=steps)
        if not steps:
            running.add(loss, targets.shape[0], None, steps=0)
            if after_batch is not None:
                after_batch(state)
            continue

        # step
        grad_norm = None
        if settings.grad_clip:
            scaler.unscale_(optimizer)
            grad_norm = nn.utils.clip_grad_norm_(model.parameters(), settings.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        if update_ema is not None:
            update_ema()
        if scheduler is not None and settings.scheduler_interval == "step":
            scheduler.step()
        state.step += 1
        running.add(loss, targets.shape[0], grad_norm)

        # log
        if state.step % settings.log_every == 0 or state.step == last_step:
            window = running.read_window()
            if tracker is not None:
                tracker.log_train(
                    step=state.step, epoch=state.epoch + 1, step_in_epoch=settings.steps_per_epoch(state.batch_in_epoch),
                    lr=current_lr(optimizer), **window,
                )  # fmt: skip

        # checkpoints and stop requests (the runner's hook)
        if after_batch is not None:
            after_batch(state)
        if state.step >= last_step:
            break


@torch.no_grad()
def evaluate(
    model: nn.Module, batches: Batches, loss_fn: nn.Module, *, precision: Precision, classification: bool,
    dist: Collectives | None = None, observe: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], None] | None = None,
) -> dict[str, float]:
    """Mean loss (weighted by batch size) and, for classification, accuracy over `batches`
    (over every rank's share of them with `dist`); `observe(inputs, outputs, targets)` sees each batch."""
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
        loss_sum += loss.float() * targets.shape[0]
        if classification:
            correct += (outputs.argmax(dim=1) == targets).sum()
        if observe is not None:
            observe(inputs, outputs, targets)
        seen += targets.shape[0]
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


def validate_and_schedule(
    model: nn.Module, val_batches: Batches | None, loss_fn: nn.Module, state: TrainState, settings: LoopSettings, *,
    precision: Precision, scheduler: Any, tracker: Tracker | None, dist: Collectives | None,
    pictures: Pictures | None = None, trained: nn.Module | None = None,
) -> None:
    """The epoch end's validation pass (into `state.val`), its pictures, and scheduler step.
    `model` is the one validated; `trained` the bare trained one, when that is another (EMA)."""
    state.val = {}
    observe = pictures.observer(state) if pictures is not None else None
    if val_batches is not None and val_batches.num_samples > 0:  # the same on every rank, unlike len()
        state.val = evaluate(
            model, val_batches, loss_fn, precision=precision, classification=settings.classification, dist=dist, observe=observe
        )  # fmt: skip
        model.train()  # back from eval(); `model` is the bare one under DDP, whose wrapper stays in train mode
        if tracker is not None:
            tracker.log_val(step=state.step, epoch=state.epoch, metrics=state.val)
        for name, value in state.val.items():
            if not math.isfinite(value):  # every epoch would be "best" or none: best.pt would mean nothing
                raise TrainingFailed(
                    f"the validation {name} is not finite after epoch {state.epoch} ({value}); check the validation "
                    "data for extreme values (beyond float32's 3.4e38) or try a lower optimizer.lr"
                )
    if pictures is not None:
        pictures.validated(state, trained=trained or model, validated=model, dist=dist)
    if scheduler is not None and settings.scheduler_interval == "epoch":
        if is_plateau(scheduler):
            scheduler.step(state.val.get("loss", state.train_loss))
        else:
            scheduler.step()


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
    after_batch: Callable[[TrainState], None] | None = None,
    on_epoch_end: Callable[[TrainState, dict[str, float]], None] | None = None,
    dist: Collectives | None = None,
    pictures: Pictures | None = None,
    ema: Any = None,
) -> TrainState:
    """Train for `settings.epochs` epochs or `settings.max_steps` steps, whichever comes first, or
    until early stopping ends it.

    A `state` from a checkpoint resumes where it stopped, mid-epoch included. `after_batch(state)`
    runs after every batch and `on_epoch_end(state, metrics)` after each epoch's validation, with
    the epoch's `train_loss` and `val_*` metrics (the runner saves checkpoints in both). In a
    data-parallel run `model` is the DistributedDataParallel wrapper, the batches are this rank's
    shares, and `dist` averages the logged losses and metrics over the ranks. `pictures` draws what
    validation saw (see `Pictures`). `ema`: a torch.optim.swa_utils.AveragedModel of the bare model,
    updated after every optimizer step; validation (and so best.pt's choice) uses it.
    """
    state = state or TrainState()
    running = RunningLoss(state, next(model.parameters()).device, dist)
    scaler = scaler or torch.amp.GradScaler(precision.device_type, enabled=False)  # a no-op unless fp16
    # validation runs each rank's share through the bare model: DDP's forward would sync buffers
    bare = model.module if dist is not None else model
    eval_model = ema.module if ema is not None else bare
    update_ema = functools.partial(ema.update_parameters, bare) if ema is not None else None
    batches_per_epoch = len(train_batches)
    last_step = settings.last_step(batches_per_epoch)
    while not settings.done(state, batches_per_epoch):
        started = time.perf_counter()
        if tracker is not None:
            tracker.epoch_started(epoch=state.epoch + 1, epochs=settings.epochs, steps=settings.steps_per_epoch(batches_per_epoch))

        # train
        train_epoch(
            model, train_batches, loss_fn, optimizer, state, settings, precision=precision, running=running,
            last_step=last_step, scaler=scaler, scheduler=scheduler, tracker=tracker, after_batch=after_batch,
            update_ema=update_ema,
        )  # fmt: skip
        state.train_loss = running.read_epoch()
        state.epoch += 1
        state.batch_in_epoch = 0

        # validate and schedule
        if dist is not None:  # one set of BatchNorm statistics for validation and checkpoints
            dist.sync_buffers(bare)
            if ema is not None:
                dist.sync_buffers(ema.module)
        validate_and_schedule(
            eval_model, val_batches, loss_fn, state, settings,
            precision=precision, scheduler=scheduler, tracker=tracker, dist=dist, pictures=pictures, trained=bare,
        )  # fmt: skip

        # the best epochs, early stopping
        metrics = {f"val_{k}": v for k, v in state.val.items()}
        if state.train_loss is not None:
            metrics["train_loss"] = state.train_loss
        update_best(state.best, metrics)
        watch_monitor(state, metrics, settings, budget_left=not settings.done(state, batches_per_epoch))

        # report, and the epoch-end hook
        if tracker is not None:
            tracker.epoch_finished(
                epoch=state.epoch, epochs=settings.epochs, step=state.step, train_loss=state.train_loss,
                val=state.val or None, seconds=time.perf_counter() - started,
            )  # fmt: skip
        if on_epoch_end is not None:
            on_epoch_end(state, metrics)
    return state


def improved(value: float, reference: float | None, mode: str, min_delta: float = 0.0) -> bool:
    """Whether `value` is better than `reference` (None: nothing yet) by more than `min_delta`."""
    if reference is None:
        return True
    return value < reference - min_delta if mode == "min" else value > reference + min_delta


def watch_monitor(state: TrainState, metrics: dict[str, float], settings: LoopSettings, *, budget_left: bool = True) -> None:
    """Follow `settings.monitor` after an epoch: the best epoch (what best.pt holds) and, with
    early stopping, the epochs since it last improved by more than min_delta; `stopped_early`
    once they reach the patience before the budget ends."""
    value = metrics.get(settings.monitor)
    if value is None:
        return
    if improved(value, state.best_checkpoint, settings.mode):
        state.best_checkpoint, state.best_epoch = value, state.epoch
    if settings.patience is None:
        return
    if improved(value, state.patience_best, settings.mode, settings.min_delta):
        state.patience_best, state.stale_epochs = value, 0
    else:
        state.stale_epochs += 1
        state.stopped_early = state.stale_epochs >= settings.patience and budget_left
