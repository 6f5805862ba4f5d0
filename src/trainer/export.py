"""`trainer export`: a trained run as one file another program loads without trainer (a torch.export
program, an ONNX model, or the weights as safetensors), checked against the eager model before it is
written.

Every export is made on the CPU in float32 with the model in eval mode, and is written through a
temporary file that is renamed into place only once the file itself, loaded back, gave the eager
model's outputs on a few samples of the run's data.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trainer.errors import UsageError, first_line, output_in_place

FORMATS = {
    "pt2": "a torch.export program (torch.export.load)",
    "onnx": "an ONNX model (onnxruntime)",
    "safetensors": "the weights (safetensors) with config.yaml beside them",
}
ONNX_PACKAGES = ("onnx", "onnxscript", "onnxruntime")
EXTRA = "pip install 'trainer[export]'"

TOLERANCE = 1e-4  # max abs difference to the eager model (fp32), scaled by outputs larger than 1
CHECK_SAMPLES = 5  # samples of the run's data the export is checked on
EXAMPLE_SAMPLES = 2  # the batch the export traces: fewer than the check's, so the check runs another size
INPUT_NAME, OUTPUT_NAME = "input", "output"  # the ONNX model's names


class ExportMismatch(Exception):
    """The exported file's outputs differ from the eager model's beyond the tolerance (exit code 1:
    the input was fine, the exporter's result is not)."""


@dataclass
class Exported:
    """What `export_run` wrote, and how it was checked."""

    path: Path
    format: str
    model: str
    checkpoint: Path
    step: int | None
    input_shape: tuple[int, ...]  # one sample's; the batch dimension is dynamic
    dtype: str
    split: str  # the data the check ran on: val or train
    samples: int
    max_abs_diff: float
    limit: float
    seconds: float  # export, check and write, without loading the run
    extra: list[Path] = field(default_factory=list)  # files written beside `path` (config.yaml)


def format_of(fmt: str | None, output: Path | None) -> str:
    """The format asked for: `fmt`, else the suffix of `output` (model.onnx means onnx), else pt2."""
    by_suffix = {f".{name}": name for name in FORMATS}
    implied = by_suffix.get(Path(output).suffix.lower()) if output is not None else None
    if fmt is None:
        return implied or "pt2"
    if fmt not in FORMATS:
        raise UsageError(f"unknown format '{fmt}'; choose one of {', '.join(FORMATS)}", key="--format")
    if implied is not None and implied != fmt:
        raise UsageError(
            f"--output '{output}' names a .{implied} file but --format is {fmt}; "
            f"give --output a .{fmt} name, or leave out --format"
        )
    return fmt


def run_folder_of(target: Path) -> Path:
    """The run folder of `target`: itself, or the folder of a checkpoint file (above its checkpoints/)."""
    target = Path(target)
    if target.is_dir():
        return target
    return target.parent.parent if target.parent.name == "checkpoints" else target.parent


def default_output(target: Path, fmt: str) -> Path:
    """`<run>/export/model.<format>`."""
    return run_folder_of(target) / "export" / f"model.{fmt}"


def require_onnx() -> None:
    """Import the ONNX packages, or say which are missing and how to install them (exit code 2)."""
    import importlib

    missing = []
    for name in ONNX_PACKAGES:
        try:
            importlib.import_module(name)
        except ImportError as err:
            missing.append(name if isinstance(err, ModuleNotFoundError) and err.name == name else f"{name} ({first_line(err)})")
    if missing:
        raise UsageError(
            f"--format onnx needs the ONNX packages, and {', '.join(missing)} cannot be imported here; "
            f"install them with {EXTRA}"
        )


def _outputs_of(fmt: str, output: Path) -> list[Path]:
    """Every file an export to `output` writes."""
    return [output, output.with_name("config.yaml")] if fmt == "safetensors" else [output]


def export_run(
    target: Path, *, fmt: str | None = None, output: Path | None = None, which: str | None = None, force: bool = False
) -> Exported:
    """Export the model saved in `target` (a run folder or checkpoint; `which` = best or last) to
    `output` (default `<run>/export/model.<format>`), after checking the file against the eager model.

    Raises UsageError for bad input (nothing is loaded or written), ExportMismatch when the
    exported file's outputs differ from the model's (nothing is written).
    """
    from trainer.runs import checkpoint_of, load_trained

    fmt = format_of(fmt, output)
    if fmt == "onnx":
        require_onnx()  # before the run is loaded: the answer comes at once
    _refuse_missing_best(target, which)
    checkpoint_of(target, which)  # a folder that is no run fails here
    output = Path(output) if output is not None else default_output(target, fmt)
    if output.is_dir():
        raise UsageError(f"--output '{output}' is a folder; give a file name such as {output / f'model.{fmt}'}")
    taken = [str(p) for p in _outputs_of(fmt, output) if p.exists()]
    if taken and not force:
        raise UsageError(
            f"{' and '.join(taken)} already exist{'s' if len(taken) == 1 else ''}; "
            "add --force to replace, or give another --output"
        )
    trained = load_trained(target, which=which, device="cpu")
    started = time.perf_counter()
    model = _eval_fp32(trained.built.model)
    batch, split = check_batch(trained.built)
    config = trained.payload.get("config") or trained.built.config.model_dump(mode="json")
    created = _make_folder(output.parent)
    try:
        diff, limit = export_module(model, batch, fmt, output, config=config, name=trained.built.config.model.name, split=split)
    except BaseException:
        if created:
            with contextlib.suppress(OSError):
                output.parent.rmdir()  # only if still empty: nothing partial left
        raise
    return Exported(
        path=output, format=fmt, model=trained.built.config.model.name, checkpoint=trained.path,
        step=trained.payload.get("train_state", {}).get("step"), input_shape=tuple(batch.shape[1:]),
        dtype=str(batch.dtype).removeprefix("torch."), split=split, samples=len(batch), max_abs_diff=diff, limit=limit,
        seconds=time.perf_counter() - started, extra=_outputs_of(fmt, output)[1:],
    )  # fmt: skip


def _refuse_missing_best(target: Path, which: str | None) -> None:
    folder = Path(target) / "checkpoints"
    if which == "best" and (folder / "last.pt").is_file() and not (folder / "best.pt").is_file():
        raise UsageError(
            f"'{target}' has no best.pt yet (a run writes it at an epoch end with a monitored metric); "
            "leave out --best, or use --last, to export its last.pt",
            key="--best",
        )


def _make_folder(folder: Path) -> bool:
    """Create `folder` if needed; whether it was created here."""
    if folder.is_dir():
        return False
    try:
        folder.mkdir(parents=True)
    except FileExistsError:
        raise UsageError(f"cannot write into '{folder}': it is a file, not a folder", key="--output") from None
    except OSError as err:
        raise UsageError(f"cannot create the folder '{folder}': {err.strerror}", key="--output") from None
    return True


def _eval_fp32(model: Any) -> Any:
    """The model as it is exported: eval mode, float32, not compiled (train.compile wraps it in place)."""
    if getattr(model, "_compiled_call_impl", None) is not None:
        model._compiled_call_impl = None
    return model.float().eval()


def check_batch(built: Any) -> tuple[Any, str]:
    """A few samples of the run's data (val if it has any, else train) on the CPU, and their split.

    At least EXAMPLE_SAMPLES + 1 rows (a smaller set is repeated): the export traces the first
    EXAMPLE_SAMPLES and the check runs all of them, another batch size.
    """
    import torch

    batches, split = (built.val_batches, "val") if built.val_batches is not None and len(built.val_batches) else (built.train_batches, "train")
    rows, count = [], 0
    for inputs, _ in batches.epoch(0):
        rows.append(inputs.detach().to("cpu"))
        count += len(inputs)
        if count >= CHECK_SAMPLES:
            break
    if not rows:
        raise UsageError("the run's data has no samples to check the export on")
    batch = torch.cat(rows)[:CHECK_SAMPLES]
    while len(batch) < EXAMPLE_SAMPLES + 1:
        batch = torch.cat([batch, batch])[: EXAMPLE_SAMPLES + 1]
    batch = batch.contiguous()
    return (batch.float() if batch.is_floating_point() else batch), split


def export_module(
    model: Any, batch: Any, fmt: str, output: Path, *, config: dict[str, Any], name: str, split: str = "val"
) -> tuple[float, float]:
    """Export `model` (eval, CPU, fp32) to `output` with a dynamic first dimension, tracing the
    first EXAMPLE_SAMPLES rows of `batch`; load the file back, run it on all of `batch` and compare
    with the eager model: (max abs difference, the limit it was held to). The file is renamed into
    place only when the difference is within the limit. `config`: the run's resolved config.
    """
    import torch

    with torch.no_grad():
        expected = model(batch)
    if not isinstance(expected, torch.Tensor):
        raise UsageError(
            f"model '{name}' returns {type(expected).__name__}, not one tensor; export needs a forward() that returns a tensor"
        )
    written: list[Path] = []
    try:
        tmp = _temporary(output)
        written.append(tmp)
        if fmt == "pt2":
            got = _pt2(model, batch, tmp, name)
        elif fmt == "onnx":
            got = _onnx(model, batch, tmp, name)
        else:
            config_tmp = _temporary(output.with_name("config.yaml"))
            written.append(config_tmp)
            got = _safetensors(model, batch, tmp, config_tmp, config, name)
        diff, limit = compare(got, expected)
        if not diff <= limit:  # NaN included
            raise ExportMismatch(
                f"the {fmt} export of model '{name}' gives outputs that differ from the model's by {_number(diff)} "
                f"on {len(batch)} samples of the {split} split (limit {_number(limit)}); nothing was written. "
                "A model that draws random numbers in eval mode cannot pass; otherwise try another --format"
            )
        output_in_place()  # both files or neither
        if fmt == "safetensors":
            _commit(written[1], output.with_name("config.yaml"))
        _commit(tmp, output)
    finally:
        for path in written:
            path.unlink(missing_ok=True)
    return diff, limit


def compare(got: Any, expected: Any) -> tuple[float, float]:
    """(max abs difference, limit): the limit is TOLERANCE, times the largest output's magnitude
    when that is above 1 (float32 holds about 7 significant digits: an output near 50,000 is only
    known to about 0.004)."""
    import torch

    got = torch.as_tensor(got)
    if got.shape != expected.shape:
        return float("inf"), TOLERANCE
    scale = max(1.0, float(expected.abs().max())) if expected.numel() else 1.0
    diff = float((got.to(expected.dtype) - expected).abs().max()) if expected.numel() else 0.0
    return diff, TOLERANCE * scale


def _number(value: float) -> str:
    return f"{value:.3g}" if value else "0"


def _temporary(path: Path) -> Path:
    """A new empty file beside `path`: same folder (the rename stays on one filesystem), same suffix
    (torch.export.save wants .pt2), and the permissions the umask gives (mkstemp's are 0600)."""
    for _ in range(100):
        tmp = path.with_name(f".{path.stem}.{secrets.token_hex(4)}.tmp{path.suffix}")
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            return tmp
        except FileExistsError:
            continue
        except OSError as err:
            raise UsageError(f"cannot write into '{path.parent}': {err.strerror}", key="--output") from None
    raise UsageError(f"cannot create a temporary file in '{path.parent}'", key="--output")


def _commit(tmp: Path, path: Path) -> None:
    with open(tmp, "rb") as file:
        os.fsync(file.fileno())
    os.replace(tmp, path)


@contextlib.contextmanager
def _quiet_exporter():
    """Keep torch's and the ONNX exporter's chatter (graph dumps, warnings, progress) out of the
    command's output; TRAINER_DEBUG=1 lets it through."""
    if os.environ.get("TRAINER_DEBUG"):
        yield
        return
    import warnings

    sink = io.StringIO()
    logging.disable(logging.WARNING)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
            warnings.simplefilter("ignore")
            yield
    finally:
        logging.disable(logging.NOTSET)


def _cannot_export(fmt: str, name: str, err: BaseException) -> UsageError:
    """A model the exporter refuses, as one line: the innermost cause (the ONNX exporter wraps
    torch.export's error in a page of advice)."""
    if os.environ.get("TRAINER_DEBUG"):
        raise err
    cause = err
    while cause.__cause__ is not None:
        cause = cause.__cause__
    return UsageError(
        f"model '{name}' cannot be exported as {fmt}: {type(cause).__name__}: {first_line(cause)}; "
        f"--format safetensors saves its weights whatever its forward() does"
    )


def _dynamic_batch() -> Any:
    import torch

    return ({0: torch.export.Dim("batch")},)


def _pt2(model: Any, batch: Any, path: Path, name: str) -> Any:
    """torch.export program with a dynamic batch, saved; returns the saved file's outputs on `batch`."""
    import torch

    try:
        with _quiet_exporter():
            program = torch.export.export(model, (batch[:EXAMPLE_SAMPLES],), dynamic_shapes=_dynamic_batch())
    except Exception as err:
        raise _cannot_export("pt2", name, err) from None
    with _quiet_exporter():
        torch.export.save(program, path)
        loaded = torch.export.load(path)
    with torch.no_grad():
        return loaded.module()(batch)


def _onnx(model: Any, batch: Any, path: Path, name: str) -> Any:
    """ONNX through torch.export (dynamo=True), dynamic batch, weights inside the one file; returns
    onnxruntime's outputs of the saved file on `batch`."""
    import onnxruntime
    import torch

    try:
        with _quiet_exporter():
            program = torch.onnx.export(
                model, (batch[:EXAMPLE_SAMPLES],), dynamo=True, dynamic_shapes=_dynamic_batch(),
                input_names=[INPUT_NAME], output_names=[OUTPUT_NAME], verbose=False,
            )  # fmt: skip
            # one self-contained file (external data would be a second file the rename leaves behind; limit 2 GB)
            program.save(path, external_data=False)
    except Exception as err:
        raise _cannot_export("onnx", name, err) from None
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (got,) = session.run([OUTPUT_NAME], {INPUT_NAME: batch.numpy()})
    return torch.from_numpy(got)


def _safetensors(model: Any, batch: Any, path: Path, config_path: Path, config: dict[str, Any], name: str) -> Any:
    """The state_dict as safetensors (the config as JSON in its metadata) and config.yaml; returns
    the outputs of a model built afresh from the config with the saved file's weights on `batch`."""
    import torch
    from safetensors.torch import load_file, save_file

    from trainer import __version__
    from trainer.config import dump_yaml
    from trainer.models import MODELS

    state = model.state_dict()
    odd = [key for key, value in state.items() if not isinstance(value, torch.Tensor)]
    if odd:
        raise UsageError(f"model '{name}' has state that is not a tensor ({', '.join(odd[:3])}); safetensors holds tensors only")
    # clones: safetensors refuses tensors that share memory (tied weights); contiguous: it stores rows as they lie
    tensors = {key: value.detach().to("cpu").contiguous().clone() for key, value in state.items()}
    metadata = {"format": "pt", "trainer": __version__, "model": name, "config": json.dumps(config)}
    save_file(tensors, str(path), metadata=metadata)
    config_path.write_text(dump_yaml(config), encoding="utf-8")
    fresh = MODELS.build(config["model"]["name"], **{k: v for k, v in config["model"].items() if k != "name"})
    fresh.load_state_dict(load_file(str(path)))
    with torch.no_grad():
        return fresh.float().eval()(batch)
