"""Losses, optimizers and schedulers, derived from torch.nn, torch.optim and torch.optim.lr_scheduler.

Names are made from the class names, not listed by hand, so a new torch release brings its new
classes along: `CrossEntropyLoss` -> `cross_entropy`, `AdamW` -> `adamw`,
`CosineAnnealingLR` -> `cosine_annealing` (alias `cosine`), `ReduceLROnPlateau` -> `reduce_lr_on_plateau`.
"""

from __future__ import annotations

import inspect
import re
import warnings
from typing import Any

import torch
from torch import nn

from trainer.errors import first_line
from trainer.registry import Registry, doc_summary

LOSSES = Registry("loss", plural="losses")
OPTIMIZERS = Registry("optimizer")
SCHEDULERS = Registry("scheduler")

# they need a Python callable or other schedulers as arguments, which a YAML file cannot hold, or (a loss
# with its own Linear layer) parameters the optimizer, built from the model's, would never train
_NOT_CONFIGURABLE = {"LBFGS", "LambdaLR", "MultiplicativeLR", "SequentialLR", "ChainedScheduler", "LinearCrossEntropyLoss"}
# schedulers that move the learning rate every batch rather than every epoch
PER_STEP_SCHEDULERS = {"one_cycle", "cyclic"}
# the arguments the runner fills in itself (the optimizer it steps, the schedule's length)
_RUNNER_FILLED = ("params", "optimizer")


def snake_case(name: str) -> str:
    """`BCEWithLogits` -> `bce_with_logits`, `ReduceLROnPlateau` -> `reduce_lr_on_plateau`."""
    name = re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", name)
    name = re.sub(r"(?<=[A-Z])(?=[A-Z][a-z])", "_", name)
    return name.lower()


def _description(cls: type) -> str:
    # torch's first sentences run long (formulas, caveats): cut them to keep `trainer list` one line a row
    return doc_summary(cls, limit=90) or cls.__name__


def _register_losses() -> None:
    for cls_name, cls in sorted(vars(nn.modules.loss).items()):
        if not (inspect.isclass(cls) and issubclass(cls, nn.modules.loss._Loss)) or cls_name.startswith("_"):
            continue
        if not cls_name.endswith("Loss") or cls_name in _NOT_CONFIGURABLE:
            continue
        LOSSES.add(snake_case(cls_name[: -len("Loss")]), cls, description=_description(cls))


def _register_optimizers() -> None:
    for cls_name in sorted(dir(torch.optim)):
        cls = getattr(torch.optim, cls_name)
        if not (inspect.isclass(cls) and issubclass(cls, torch.optim.Optimizer)) or cls is torch.optim.Optimizer:
            continue
        if cls_name in _NOT_CONFIGURABLE:
            continue
        OPTIMIZERS.add(cls_name.lower(), cls, description=_description(cls), skip_params=_RUNNER_FILLED)


def _register_schedulers() -> None:
    sched = torch.optim.lr_scheduler
    base = getattr(sched, "LRScheduler", None) or sched._LRScheduler
    for cls_name in sorted(dir(sched)):
        cls = getattr(sched, cls_name)
        if not inspect.isclass(cls) or cls_name.startswith("_") or cls_name in _NOT_CONFIGURABLE:
            continue
        if not (issubclass(cls, base) or cls is sched.ReduceLROnPlateau) or cls in (base, sched._LRScheduler):
            continue
        name = snake_case(cls_name[:-2] if cls_name.endswith("LR") else cls_name)
        aliases = ["cosine"] if name == "cosine_annealing" else []
        SCHEDULERS.add(
            name, cls, description=_description(cls), aliases=aliases, skip_params=_RUNNER_FILLED
        )


_register_losses()
_register_optimizers()
_register_schedulers()


def scheduler_interval(name: str) -> str:
    """'step' for schedulers that move every batch (OneCycleLR, CyclicLR), else 'epoch'."""
    return "step" if SCHEDULERS.get(name).name in PER_STEP_SCHEDULERS else "epoch"


def schedule_length_kwargs(name: str, given: dict[str, Any], *, interval: str, epochs: int, total_steps: int) -> dict[str, Any]:
    """Arguments that fix a schedule's length, filled from the training budget when left out.

    cosine_annealing's T_max, one_cycle's total_steps and polynomial's total_iters are the
    number of scheduler steps (linear keeps torch's default: it is mostly a warm-up of a few steps): epochs for a per-epoch scheduler, optimizer steps for a per-step one.
    """
    canonical = SCHEDULERS.get(name).name
    length = total_steps if interval == "step" else epochs
    fills = {
        "cosine_annealing": {"T_max": length},
        "one_cycle": {"total_steps": length},
        "polynomial": {"total_iters": length},
    }.get(canonical, {})
    return {k: v for k, v in fills.items() if k not in given}


def is_plateau(scheduler: Any) -> bool:
    """ReduceLROnPlateau is stepped with a metric, not on its own."""
    return isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau)


# ---------------------------------------------------------------------------------------------
# trying constructors during the config check

# what torch's constructors call an argument in their messages, when it is not the argument's name
_ARGUMENT_WORDS = {"learning rate": "lr", "beta": "betas", "epsilon": "eps", "momentum": "momentum"}


def _refusal(kind: str, name: str, kwargs: dict[str, Any], err: Exception) -> tuple[str, str]:
    """(dotted key, message) for a constructor that refused its arguments (lr=-1, betas out of range)."""
    text = first_line(err)
    lowered = text.lower()
    named = [arg for arg in kwargs if arg.lower() in lowered]
    named += [arg for word, arg in _ARGUMENT_WORDS.items() if word in lowered and arg in kwargs and arg not in named]
    key = f"{kind}.{named[0]}" if len(named) == 1 else kind
    given = ", ".join(f"{k}={v!r}" for k, v in kwargs.items()) or "its defaults"
    return key, f"{name}() refused {given}: {text}"


def constructor_problem(section: str, name: str, kwargs: dict[str, Any]) -> tuple[str, str] | None:
    """Build a loss, optimizer, scheduler or model on stand-ins, so that values its constructor refuses
    (a negative lr, betas out of range, a negative layer size) are reported with the other config problems.

    Returns (dotted key, message), or None when the constructor accepts the arguments.
    """
    probe = nn.Parameter(torch.zeros(2, 2))  # 2-D: some optimizers (muon) only take matrices
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # deprecation warnings show once, when the real run builds it
        return _try_construct(section, name, kwargs, probe)


def _try_construct(section: str, name: str, kwargs: dict[str, Any], probe: nn.Parameter) -> tuple[str, str] | None:
    try:
        if section == "loss":
            LOSSES.build(name, **kwargs)
        elif section == "optimizer":
            OPTIMIZERS.build(name, [probe], **kwargs)
        elif section == "scheduler":
            kwargs = {k: v for k, v in kwargs.items() if k != "interval"}
            fills = schedule_length_kwargs(name, kwargs, interval="epoch", epochs=1, total_steps=1)
            SCHEDULERS.build(name, torch.optim.SGD([probe], lr=0.1), **kwargs, **fills)
        elif section == "model":
            from trainer.models import MODELS

            MODELS.build(name, **kwargs)
    except (ValueError, TypeError, RuntimeError, KeyError, IndexError, ZeroDivisionError, OverflowError, MemoryError) as err:
        return _refusal(section, name, kwargs, err)
    return None
