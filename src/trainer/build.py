"""From a checked Config to the live objects of a run: device, data, model, loss, optimizer, scheduler.

Also resolves what the config left to the data (model sizes, image size, a schedule's length), so
`trainer show-config` and the run folder's config.yaml show what was really used.
"""

from __future__ import annotations

import contextlib
import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from trainer.components import LOSSES, OPTIMIZERS, SCHEDULERS, schedule_length_kwargs, scheduler_interval
from trainer.config import DEFAULT_EPOCHS, Config
from trainer.data import DATASETS, DataInfo, build_data
from trainer.device import Precision, apply_backend_switches, resolve_device, resolve_precision
from trainer.engine import LoopSettings, seed_everything
from trainer.errors import UsageError, first_line
from trainer.models import MODELS, infer_model_kwargs
from trainer.registry import RegistryError


@dataclass
class Built:
    """Everything a run needs, built from one config."""

    config: Config  # resolved: inferred sizes and schedule length filled in
    device: torch.device
    device_reason: str
    precision: Precision
    info: DataInfo
    train_batches: Any
    val_batches: Any
    model: nn.Module
    loss_fn: nn.Module
    optimizer: torch.optim.Optimizer | None  # None when built for a trained model's use (training=False)
    scheduler: Any
    scaler: Any  # a GradScaler for fp16, else None
    settings: LoopSettings
    ema: Any = None  # train.ema: a torch.optim.swa_utils.AveragedModel of `model`, else None
    rank: int = 0  # this process's place in a data-parallel run: the batches are its share
    world_size: int = 1


def _component(kind: str, name: str, build: Any) -> Any:
    # the config check already tried these constructors; sizes read off the data may still be refused
    try:
        return build()
    except RegistryError as err:
        raise UsageError(str(err), key=f"{kind}.{err.key}" if err.key else kind) from None
    except (ValueError, TypeError, RuntimeError) as err:
        raise UsageError(f"{name}() refused its arguments: {first_line(err)}", key=kind) from None


# the dataset arguments that name files or folders on disk (csv's path; mnist's and image_folder's root)
DATA_PATH_KEYS = ("path", "root")


def build_run(
    config: Config, *, device: str | None = None, rank: int = 0, world_size: int = 1, data_dir: Path | None = None,
    training: bool = True,
) -> Built:
    """Seed, resolve the device, then build data, model, loss, optimizer and scheduler in that order.

    With `world_size` > 1 the batches are process `rank`'s share of every epoch (trainer.data.epoch_order).
    `data_dir`: the folder relative data paths are read from (default: the working folder); the
    config keeps them as written. `training=False` (eval, predict, export) builds no optimizer,
    scheduler or EMA (the first torch optimizer a process builds imports torch._dynamo, ~2 s), and
    does not compile the model (`train.compile`): compiling costs more than a pass over the data saves.
    """
    seed_everything(config.seed)
    torch_device, reason = resolve_device(device or config.device)
    precision = resolve_precision(config.precision, torch_device)
    apply_backend_switches(torch_device, cudnn_benchmark=config.train.cudnn_benchmark, tf32=config.train.tf32)
    resolved = config.model_copy(deep=True)  # what the data determines is filled in here
    resolved.device = device or config.device

    train_batches, val_batches, info = _build_data(config, resolved, data_dir=data_dir, rank=rank, world_size=world_size)
    model = _build_model(config, resolved, info, torch_device, compile=training)
    train_batches = train_batches.to(torch_device, channels_last=config.train.channels_last)
    val_batches = val_batches.to(torch_device, channels_last=config.train.channels_last) if val_batches is not None else None
    loss_fn = _component("loss", config.loss.name, lambda: LOSSES.build(config.loss.name, **config.loss.kwargs))
    steps_per_epoch = LoopSettings(epochs=1, accumulate=config.train.accumulate).steps_per_epoch(len(train_batches))
    epochs = _epochs(config, steps_per_epoch, info)
    interval, fills = _schedule(config, resolved, epochs=epochs, steps_per_epoch=steps_per_epoch)
    _check_monitor(config, has_validation=val_batches is not None, task=info.task)
    settings = _loop_settings(config, epochs, interval, classification=info.task == "classification", has_validation=val_batches is not None)
    optimizer = scheduler = ema = None
    if training:
        name = config.optimizer.name
        optimizer = _component("optimizer", name, lambda: OPTIMIZERS.build(name, model.parameters(), **config.optimizer.kwargs))
        if config.scheduler is not None:
            sched = config.scheduler
            scheduler = _component("scheduler", sched.name, lambda: SCHEDULERS.build(sched.name, optimizer, **{**sched.kwargs, **fills}))
        ema = averaged_model(model, config.train.ema.decay) if config.train.ema else None
    return Built(
        config=resolved, device=torch_device, device_reason=reason, precision=precision, info=info,
        train_batches=train_batches, val_batches=val_batches, model=model, loss_fn=loss_fn, optimizer=optimizer,
        scheduler=scheduler, scaler=precision.grad_scaler(), settings=settings, rank=rank, world_size=world_size, ema=ema,
    )  # fmt: skip


def _loop_settings(config: Config, epochs: int | float, interval: str, *, classification: bool, has_validation: bool) -> LoopSettings:
    """The loop's settings from `train`; by default the val loss is monitored, or the train loss
    without validation (_check_monitor refuses an explicit val_* monitor then)."""
    train = config.train
    monitor = train.monitor or ("val_loss" if has_validation else "train_loss")
    stopping = train.early_stopping
    return LoopSettings(
        epochs=epochs, max_steps=train.max_steps, log_every=train.log_every, grad_clip=train.grad_clip,
        classification=classification, scheduler_interval=interval, accumulate=train.accumulate,
        monitor=monitor, mode=train.mode or ("max" if "accuracy" in monitor else "min"),
        patience=stopping.patience if stopping else None, min_delta=stopping.min_delta if stopping else 0.0,
    )  # fmt: skip


def averaged_model(model: nn.Module, decay: float) -> nn.Module:
    """An exponential moving average of `model`'s weights, and of its buffers (BatchNorm's
    statistics then match the averaged weights): a copy that `update_parameters(model)` moves
    toward the model by 1 - `decay`, the first time all the way."""
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)


def _build_data(config: Config, resolved: Config, *, data_dir: Path | None, rank: int, world_size: int) -> tuple[Any, Any, DataInfo]:
    """The train and validation batches (this rank's shares) and what the data is; fills in `image_size`."""
    model_input_shape = MODELS.get(config.model.name).info.get("input_shape")
    train_batches, val_batches, info = build_data(
        config.data.name,
        _under(data_dir, config.data.kwargs),
        batch_size=config.data.batch_size,
        val_fraction=config.data.val_fraction,
        shuffle=config.data.shuffle,
        seed=config.seed,
        model_input_shape=tuple(model_input_shape) if model_input_shape else None,
    )
    if world_size > 1:
        train_batches.shard(rank, world_size, pad=True)  # every rank takes the same number of steps
        if val_batches is not None:
            val_batches.shard(rank, world_size, pad=False)  # every sample counted once
    if "image_size" in DATASETS.get(config.data.name).parameters() and config.data.kwargs.get("image_size") is None:
        setattr(resolved.data, "image_size", info.input_shape[-1])
    if config.train.channels_last and len(info.input_shape) != 3:
        raise UsageError(
            f"needs image data, batches of shape (N, C, H, W); data '{config.data.name}' gives samples of shape "
            f"{tuple(info.input_shape)}; set train.channels_last=false",
            key="train.channels_last",
        )
    return train_batches, val_batches, info


def _build_model(config: Config, resolved: Config, info: DataInfo, device: torch.device, *, compile: bool) -> nn.Module:
    """The model with the sizes the data determines (filled into `resolved`), on `device`."""
    for key, value in infer_model_kwargs(config.model.name, config.model.kwargs, info).items():
        setattr(resolved.model, key, value)
    return build_model(resolved, device, compile=compile)


def build_model(resolved: Config, device: torch.device, *, compile: bool = True) -> nn.Module:
    """The model of a resolved config (its sizes filled in, as config.yaml and checkpoints hold it) on
    `device`, channels-last if the config says so, and compiled if it says so and `compile`. Builds
    no data: `trainer predict` makes a checkpoint's model with it when the training data are gone."""
    name = resolved.model.name
    model = _component("model", name, lambda: MODELS.build(name, **resolved.model.kwargs))
    model = model.to(device)
    if resolved.train.channels_last:
        model = model.to(memory_format=torch.channels_last)  # 4-D weights only (convolutions)
    if compile and resolved.train.compile is not False:
        compile_model(model, resolved.train.compile)  # in place, compiled on the first call: the one-batch check
    return model


def _epochs(config: Config, steps_per_epoch: int, info: DataInfo) -> int | float:
    """The budget in epochs: `train.epochs`, or as many as max_steps needs (whichever limit comes first)."""
    if steps_per_epoch == 0:
        raise UsageError(
            f"the training split is empty or smaller than one batch ({info.train_size} samples, batch_size "
            f"{config.data.batch_size})",
            key="data.batch_size",
        )
    train = config.train
    epochs = train.epochs or (DEFAULT_EPOCHS if train.max_steps is None else math.inf)
    if train.max_steps is not None:
        epochs = min(epochs, math.ceil(train.max_steps / steps_per_epoch))
    return epochs


def _schedule(config: Config, resolved: Config, *, epochs: int | float, steps_per_epoch: int) -> tuple[str, dict[str, Any]]:
    """When the scheduler steps, and the schedule length it left out, filled from the budget (also into `resolved`)."""
    sched = config.scheduler
    if sched is None:
        return "epoch", {}
    interval = sched.interval or scheduler_interval(sched.name)
    if interval == "step" and SCHEDULERS.get(sched.name).name == "reduce_lr_on_plateau":
        raise UsageError(
            "reduce_lr_on_plateau steps with the validation loss, once per epoch; "
            "leave out scheduler.interval or set it to epoch",
            key="scheduler.interval",
        )
    total_steps = LoopSettings(epochs=epochs, max_steps=config.train.max_steps).last_step(steps_per_epoch)
    fills = schedule_length_kwargs(sched.name, sched.kwargs, interval=interval, epochs=epochs, total_steps=total_steps)
    for key, value in fills.items():
        setattr(resolved.scheduler, key, value)
    resolved.scheduler.interval = interval
    return interval, fills


def _check_monitor(config: Config, *, has_validation: bool, task: str) -> None:
    """train.monitor must name a metric the run will have."""
    monitor = config.train.monitor or ""
    if monitor.startswith("val_") and not has_validation:
        raise UsageError(
            f"'{monitor}' needs a validation split, and data.val_fraction is 0; use train_loss or set data.val_fraction",
            key="train.monitor",
        )
    if monitor == "val_accuracy" and task != "classification":
        raise UsageError(
            f"'{monitor}' needs class labels, and data '{config.data.name}' gives regression targets; use val_loss",
            key="train.monitor",
        )


COMPILE_BACKEND: Any = "inductor"  # torch.compile's backend; tests swap in "eager" or a stub


def compile_model(model: nn.Module, setting: bool | str) -> None:
    """`train.compile`: torch.compile `model` in place (nn.Module.compile), so its state_dict keys stay
    plain and checkpoints load into compiled and uncompiled models alike. Nothing is compiled until
    the first forward pass."""
    mode = None if setting is True or setting == "default" else setting
    model.compile(backend=COMPILE_BACKEND, mode=mode)


def _compile_failed(built: Built, err: BaseException) -> UsageError:
    cause = getattr(err, "inner_exception", None) or err  # what the backend raised (BackendCompilerFailed wraps it)
    return UsageError(
        f"torch.compile could not compile model '{built.config.model.name}' on {built.device.type}: "
        f"{type(cause).__name__}: {first_line(cause)}; set train.compile=false to train without compiling",
        key="train.compile",
    )


_REGRESSION_LOSSES = {"mse", "l1", "smooth_l1", "huber"}
_CLASS_LOSSES = {"cross_entropy", "nll", "multi_margin"}


def _under(data_dir: Path | None, kwargs: dict[str, Any]) -> dict[str, Any]:
    """`kwargs` with its relative data paths read from `data_dir`."""
    if data_dir is None:
        return kwargs
    out = dict(kwargs)
    for key in DATA_PATH_KEYS:
        value = out.get(key)
        if isinstance(value, str) and value and not Path(os.path.expanduser(value)).is_absolute():
            out[key] = str(Path(data_dir) / value)
    return out


def check_one_batch(built: Built) -> None:
    """Push one real batch through forward, loss and backward; a shape or type mismatch becomes a
    UsageError that names the model, the shapes and the config key that would fix it.

    With `train.compile` the batch goes through uncompiled first (for the same messages), then
    compiled: the model is compiled here, before a run folder exists, and a compiler that fails
    is a UsageError naming train.compile. Nothing is learned: gradients are cleared, and the RNG
    state and the model's buffers (BatchNorm's running statistics) are restored afterwards.
    """
    rng = torch.get_rng_state()
    buffers = [b.detach().clone() for b in built.model.buffers()]

    def undo() -> None:
        built.optimizer.zero_grad(set_to_none=True)
        torch.set_rng_state(rng)
        with torch.no_grad():
            for buffer, saved in zip(built.model.buffers(), buffers):
                buffer.copy_(saved)

    inputs, targets = next(iter(built.train_batches.epoch(0)))
    compiled = built.config.train.compile is not False
    outputs = None
    try:
        uncompiled = torch.compiler.set_stance("force_eager") if compiled else contextlib.nullcontext()
        with warnings.catch_warnings(record=True) as caught, uncompiled:
            warnings.simplefilter("always")
            with built.precision.autocast():
                outputs = built.model(inputs)
                loss = built.loss_fn(outputs, targets)
            loss.backward()
        # torch only warns when a regression loss broadcasts (N, 1) against (N,): the result is wrong all the same
        for warning in caught:
            if "target size" in str(warning.message):
                raise RuntimeError(str(warning.message).split(". ")[0])
        check_optimizer_step(built)  # raises UsageError, which the except below lets through
    except (RuntimeError, ValueError, IndexError, TypeError) as err:
        raise UsageError(_mismatch_message(built, err, inputs, targets, outputs)) from None
    finally:
        undo()
    if not compiled:
        return
    try:
        with built.precision.autocast():
            loss = built.loss_fn(built.model(inputs), targets)
        loss.backward()
    except Exception as err:  # the same batch passed uncompiled: what failed is the compiler (no C++ compiler, ...)
        raise _compile_failed(built, err) from None
    finally:
        undo()


def check_optimizer_step(built: Built) -> None:
    """One step of a new optimizer built from the same config, on copies of one parameter of each
    shape rank per group, with the gradients the check's batch left: arguments torch refuses only
    when stepping (sparseadam on dense gradients, capturable or differentiable on a CPU model) fail
    here, before a run folder exists. The model and the run's optimizer are not touched."""
    optimizer = built.optimizer
    groups = []
    for group in optimizer.param_groups:
        smallest: dict[int, torch.Tensor] = {}
        for param in group["params"]:
            if param.grad is not None and (param.dim() not in smallest or param.numel() < smallest[param.dim()].numel()):
                smallest[param.dim()] = param
        copies = []
        for param in smallest.values():
            copy = param.detach().clone().requires_grad_(True)
            copy.grad = param.grad.detach().clone()
            copies.append(copy)
        if copies:
            groups.append({**{k: v for k, v in group.items() if k != "params"}, "params": copies})
    if not groups:
        return
    try:
        OPTIMIZERS.build(built.config.optimizer.name, groups, **built.config.optimizer.kwargs).step()
    except (RuntimeError, ValueError, TypeError, AssertionError) as err:
        given = built.config.optimizer.model_dump()
        call = f"{given.pop('name')}({', '.join(f'{k}={v!r}' for k, v in given.items())})"
        raise UsageError(
            f"{call} cannot update model '{built.config.model.name}': {first_line(err).rstrip('.')}; "
            "change its arguments or choose another optimizer (trainer list optimizers)",
            key="optimizer",
        ) from None


def _dtype(t: torch.Tensor) -> str:
    return str(t.dtype).replace("torch.", "")


def _mismatch_message(built: Built, err: Exception, inputs: torch.Tensor, targets: torch.Tensor, outputs: Any) -> str:
    config, info = built.config, built.info
    model_name, loss_name, data_name = config.model.name, config.loss.name, config.data.name
    first = first_line(err)
    if outputs is None:  # the forward pass failed
        expected = MODELS.get(model_name).info.get("input_shape")
        hint = ""
        if expected and len(expected) == 3 and tuple(expected) != tuple(info.input_shape):
            hint = f"; set data.image_size={expected[-1]} (model {model_name} takes {tuple(expected)} images)"
        elif expected:
            hint = f"; check the size arguments under model: (its default input is {tuple(expected)})"
        return (
            f"model: '{model_name}' cannot take inputs of shape {tuple(inputs.shape)} from data '{data_name}' "
            f"(one sample: {tuple(info.input_shape)}): {first}{hint}"
        )
    hint = ""
    if info.task == "classification" and loss_name in _REGRESSION_LOSSES:
        hint = f"; data '{data_name}' gives class labels: use loss.name=cross_entropy (or nll after a log-softmax)"
    elif info.task == "regression" and loss_name in _CLASS_LOSSES:
        hint = f"; data '{data_name}' gives regression targets: use loss.name=mse"
    return (
        f"loss.name: '{loss_name}' cannot compare the output of model '{model_name}' {tuple(outputs.shape)} "
        f"with targets {tuple(targets.shape)} ({_dtype(targets)}) from data '{data_name}': {first}{hint}"
    )
