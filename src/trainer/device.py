"""Device and precision resolution: `auto` -> cuda -> mps -> cpu, autocast settings, and the CUDA backend flags."""

from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass
from typing import Any

import torch

from trainer.errors import DeviceError

PRECISIONS = ("fp32", "bf16", "fp16")


def _mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def resolve_device(requested: str) -> tuple[torch.device, str]:
    """The torch.device for a config's `device` value, and a short reason for the console.

    Asking for a device that is not there is a DeviceError, never a silent fallback to the CPU.
    """
    requested = str(requested).strip().lower()
    if requested == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", 0), f"auto: CUDA is available ({torch.cuda.get_device_name(0)})"
        if _mps_available():
            return torch.device("mps"), "auto: Apple MPS is available (no CUDA)"
        return torch.device("cpu"), "auto: no CUDA or MPS device found"
    if requested == "cpu":
        return torch.device("cpu"), "requested in the config"
    match = re.fullmatch(r"cuda(?::(\d+))?", requested)
    if match:
        if not torch.cuda.is_available():
            raise DeviceError(
                f"'{requested}' was requested but CUDA is not available on this machine "
                "(torch.cuda.is_available() is False); use device=cpu or device=auto",
                key="device",
            )
        index = int(match.group(1) or 0)
        count = torch.cuda.device_count()
        if index >= count:
            raise DeviceError(
                f"'{requested}' was requested but this machine has {count} CUDA device(s): "
                f"{', '.join(f'cuda:{i}' for i in range(count))}",
                key="device",
            )
        return torch.device("cuda", index), f"requested in the config ({torch.cuda.get_device_name(index)})"
    if requested == "mps":
        if not _mps_available():
            raise DeviceError("'mps' was requested but Apple MPS is not available; use device=cpu or device=auto", key="device")
        return torch.device("mps"), "requested in the config"
    raise DeviceError(f"unknown device '{requested}'; accepted: auto, cpu, cuda, cuda:N, mps", key="device")


@dataclass(frozen=True)
class Precision:
    """How the forward pass runs: `dtype` None means plain fp32 (no autocast)."""

    name: str
    device_type: str
    dtype: Any  # torch.dtype | None

    @property
    def uses_grad_scaler(self) -> bool:
        # fp16 gradients underflow without loss scaling; bf16 has fp32's range and needs none
        return self.name == "fp16"

    def autocast(self) -> contextlib.AbstractContextManager:
        """The autocast context for the forward pass and loss (a no-op for fp32)."""
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device_type, dtype=self.dtype)

    def grad_scaler(self) -> Any:
        """A GradScaler for fp16 on CUDA, else None."""
        if not self.uses_grad_scaler:
            return None
        return torch.amp.GradScaler(self.device_type)


def resolve_precision(name: str, device: torch.device) -> Precision:
    """Precision settings for `name` on `device`; fp16 needs CUDA (use bf16 elsewhere)."""
    if name not in PRECISIONS:
        raise DeviceError(f"unknown precision '{name}'; accepted: {', '.join(PRECISIONS)}", key="precision")
    if name == "fp32":
        return Precision(name, device.type, None)
    if name == "fp16" and device.type != "cuda":
        raise DeviceError(
            f"precision 'fp16' needs a CUDA device (loss scaling with a GradScaler); on {device.type} use precision=bf16",
            key="precision",
        )
    dtype = torch.bfloat16 if name == "bf16" else torch.float16
    return Precision(name, device.type, dtype)


def apply_backend_switches(device: torch.device, *, cudnn_benchmark: bool, tf32: bool) -> None:
    """Set the process-wide CUDA backend flags from `train.cudnn_benchmark` and `train.tf32`.

    On a CUDA device both are set to the config's values, so a run's numerics follow its config and
    not whatever ran before in the process (torch's own default lets cuDNN convolutions use TF32).
    On any other device they do nothing, and nothing is changed.
    """
    if device.type != "cuda":
        return
    torch.backends.cudnn.benchmark = cudnn_benchmark
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32
