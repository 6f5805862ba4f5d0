"""Tests for trainer.device: device resolution (CUDA and MPS mocked), precision settings and the CUDA backend switches."""

import pytest
import torch
from torch import nn

from trainer.device import apply_backend_switches, resolve_device, resolve_precision
from trainer.errors import DeviceError, UsageError


@pytest.fixture
def machine(monkeypatch):
    """Pretend the machine has `cuda` CUDA devices and MPS or not."""

    def configure(cuda: int = 0, mps: bool = False) -> None:
        names = [f"Fake GPU {i}" for i in range(cuda)]

        def get_device_name(index=0):
            if index is None:
                index = 0
            if isinstance(index, torch.device):
                index = index.index or 0
            return names[index]

        monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda > 0)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: cuda)
        monkeypatch.setattr(torch.cuda, "get_device_name", get_device_name)
        monkeypatch.setattr(torch.backends.mps, "is_available", lambda: mps)

    return configure


# ---------------------------------------------------------------------------------------------
# auto


def test_auto_picks_cuda_first(machine):
    machine(cuda=2, mps=True)
    device, reason = resolve_device("auto")
    assert device == torch.device("cuda", 0)
    assert "CUDA" in reason and "Fake GPU 0" in reason


def test_auto_picks_mps_without_cuda(machine):
    machine(cuda=0, mps=True)
    device, reason = resolve_device("auto")
    assert device == torch.device("mps")
    assert "MPS" in reason


def test_auto_falls_back_to_cpu_and_says_why(machine):
    machine(cuda=0, mps=False)
    device, reason = resolve_device("auto")
    assert device == torch.device("cpu")
    assert "no CUDA or MPS" in reason


def test_auto_on_this_machine_is_cpu():
    # the test machine really has neither: nothing mocked
    if torch.cuda.is_available() or torch.backends.mps.is_available():
        pytest.skip("this machine has an accelerator")
    assert resolve_device("auto")[0] == torch.device("cpu")


# ---------------------------------------------------------------------------------------------
# explicit devices


@pytest.mark.parametrize("cuda", [0, 2])
def test_cpu_is_always_given_when_asked(machine, cuda):
    machine(cuda=cuda, mps=True)
    device, reason = resolve_device("cpu")
    assert device == torch.device("cpu")
    assert reason


@pytest.mark.parametrize(
    ("requested", "expected"),
    [("cuda", torch.device("cuda", 0)), ("cuda:0", torch.device("cuda", 0)), ("cuda:1", torch.device("cuda", 1)), (" CUDA:1 ", torch.device("cuda", 1))],
)
def test_cuda_index_with_two_devices(machine, requested, expected):
    machine(cuda=2)
    device, reason = resolve_device(requested)
    assert device == expected
    assert f"Fake GPU {expected.index}" in reason


def test_cuda_index_beyond_the_devices_names_the_devices_there_are(machine):
    machine(cuda=2)
    with pytest.raises(DeviceError) as info:
        resolve_device("cuda:3")
    message = str(info.value)
    assert "cuda:3" in message
    assert "2 CUDA device(s): cuda:0, cuda:1" in message
    assert info.value.key == "device"


@pytest.mark.parametrize("requested", ["cuda", "cuda:0"])
def test_cuda_when_unavailable_is_an_error_not_a_cpu_fallback(machine, requested):
    machine(cuda=0, mps=True)
    with pytest.raises(DeviceError) as info:
        resolve_device(requested)
    assert "CUDA is not available" in str(info.value)
    assert isinstance(info.value, UsageError)  # exit code 2


def test_mps_when_available(machine):
    machine(mps=True)
    assert resolve_device("mps")[0] == torch.device("mps")


def test_mps_when_unavailable_is_an_error(machine):
    machine(cuda=1, mps=False)
    with pytest.raises(DeviceError, match="MPS is not available"):
        resolve_device("mps")


@pytest.mark.parametrize("requested", ["gpu", "tpu", "cuda:x", "cuda1", ""])
def test_unknown_device_lists_the_choices(machine, requested):
    machine(cuda=1, mps=True)
    with pytest.raises(DeviceError) as info:
        resolve_device(requested)
    assert "accepted: auto, cpu, cuda, cuda:N, mps" in str(info.value)


# ---------------------------------------------------------------------------------------------
# precision


def test_fp32_does_not_autocast():
    precision = resolve_precision("fp32", torch.device("cpu"))
    assert precision.dtype is None
    assert not precision.uses_grad_scaler
    assert precision.grad_scaler() is None
    with precision.autocast():
        assert not torch.is_autocast_enabled("cpu")
        out = nn.Linear(4, 2)(torch.randn(3, 4))
    assert out.dtype == torch.float32


def test_bf16_on_cpu_autocasts_linear_layers():
    precision = resolve_precision("bf16", torch.device("cpu"))
    assert precision.dtype == torch.bfloat16
    assert not precision.uses_grad_scaler
    layer = nn.Linear(4, 2)
    with precision.autocast():
        out = layer(torch.randn(3, 4))
    assert out.dtype == torch.bfloat16
    assert layer.weight.dtype == torch.float32  # weights stay fp32; only the computation is cast
    assert layer(torch.randn(3, 4)).dtype == torch.float32  # and only inside the context


def test_fp16_on_cpu_is_refused_suggesting_bf16():
    with pytest.raises(DeviceError) as info:
        resolve_precision("fp16", torch.device("cpu"))
    assert "precision=bf16" in str(info.value)
    assert info.value.key == "precision"


def test_fp16_on_cuda_uses_a_grad_scaler(machine):
    machine(cuda=1)
    device, _ = resolve_device("cuda")
    precision = resolve_precision("fp16", device)
    assert precision.dtype == torch.float16
    assert precision.device_type == "cuda"
    assert precision.uses_grad_scaler


def test_bf16_on_cuda_needs_no_grad_scaler():
    precision = resolve_precision("bf16", torch.device("cuda", 0))
    assert precision.dtype == torch.bfloat16
    assert not precision.uses_grad_scaler


@pytest.mark.parametrize("name", ["fp8", "float32", "half", ""])
def test_unknown_precision_lists_the_choices(name):
    with pytest.raises(DeviceError, match="accepted: fp32, bf16, fp16"):
        resolve_precision(name, torch.device("cpu"))


# ---------------------------------------------------------------------------------------------
# train.cudnn_benchmark and train.tf32


def _backend_flags() -> dict[str, bool]:
    return {
        "cudnn.benchmark": torch.backends.cudnn.benchmark,
        "cuda.matmul.allow_tf32": torch.backends.cuda.matmul.allow_tf32,
        "cudnn.allow_tf32": torch.backends.cudnn.allow_tf32,
    }


@pytest.fixture
def backend_flags():
    """The process-wide backend flags, restored after the test."""
    saved = (torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    yield _backend_flags
    torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@pytest.mark.parametrize(("cudnn_benchmark", "tf32"), [(True, True), (True, False), (False, True), (False, False)])
def test_backend_switches_set_the_flags_on_cuda(machine, backend_flags, cudnn_benchmark, tf32):
    machine(cuda=1)
    device, _ = resolve_device("auto")
    # start from the opposite of what is asked, so every flag has to be set
    torch.backends.cudnn.benchmark = not cudnn_benchmark
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = not tf32
    apply_backend_switches(device, cudnn_benchmark=cudnn_benchmark, tf32=tf32)
    assert backend_flags() == {"cudnn.benchmark": cudnn_benchmark, "cuda.matmul.allow_tf32": tf32, "cudnn.allow_tf32": tf32}


@pytest.mark.parametrize("requested", ["cpu", "mps"])
def test_backend_switches_do_nothing_off_cuda(machine, backend_flags, requested):
    machine(cuda=0, mps=True)
    device, _ = resolve_device(requested)
    before = backend_flags()
    apply_backend_switches(device, cudnn_benchmark=not before["cudnn.benchmark"], tf32=not before["cuda.matmul.allow_tf32"])
    assert backend_flags() == before
