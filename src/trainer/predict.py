"""`trainer predict`: a saved model on new CSV rows or image files, or on one split of its run's data.

New inputs go through the preprocessing the run's data had, as the checkpoint keeps it under
`preprocess` (see `trainer.data.preprocessing`): the model is built from the checkpoint's config
alone and no training data are read. A checkpoint written before trainer kept it has its run's
data built again from the config, as `trainer eval` does.

Inputs that have targets (a CSV with the target column, images in class sub-folders, a split)
also get the loss and accuracy, computed by `trainer.engine.evaluate` itself: the same numbers
`trainer eval` prints for the same rows.
"""

from __future__ import annotations

import csv
import glob
import json
import math
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Callable, Iterator

from trainer.errors import DataError, UsageError, output_in_place

FORMATS = ("csv", "jsonl")
SPLITS = ("val", "test", "train")  # test: the held-out split, as in trainer eval
# torchvision ImageFolder's IMG_EXTENSIONS: a folder or glob of images takes the files it would take
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
_GLOB_CHARS = set("*?[")


@dataclass
class Loaded:
    """A saved model ready to predict, and what goes with it."""

    path: Path  # the checkpoint file
    step: int | None
    config: Any  # the resolved Config saved in the checkpoint
    model: Any
    device: Any
    precision: Any
    loss_fn: Any
    preprocess: dict[str, Any]  # the data's recipe for new inputs (trainer.data.preprocessing)
    built: Any = None  # the whole run, data included, when it was built (--split, an old checkpoint)

    @property
    def classification(self) -> bool:
        return self.preprocess["task"] == "classification"

    def class_names(self) -> list[str]:
        """The names predictions are given as: the data's own (CSV labels, folder names), else the indices."""
        names = self.preprocess.get("classes")
        return [str(n) for n in names] if names else [str(i) for i in range(self.preprocess["num_classes"])]


@dataclass
class Prediction:
    """What `predict` did: the outputs went to the file or stream; this is what to tell the user."""

    checkpoint: Path
    step: int | None
    count: int
    metrics: dict[str, float]  # loss (and accuracy) when the inputs had targets, else empty
    notes: list[str] = field(default_factory=list)


def load_model(target: Path, *, which: str | None = None, device: str | None = None, need_data: bool = False) -> Loaded:
    """The model saved in `target` (a checkpoint file or a run folder, see `trainer.runs.checkpoint_of`).

    Without `need_data`, and with a checkpoint that keeps its preprocessing, only the model is built
    (from the checkpoint's config) and no data is read. Otherwise the whole run is built again
    (`trainer.runs.load_trained`); a checkpoint of before `preprocess` whose data are gone is a
    UsageError saying what is missing.
    """
    from trainer.checkpoint import trainer_checkpoint
    from trainer.runs import checkpoint_of, load_trained

    if need_data:
        return _from_built(load_trained(target, which=which, device=device))
    path = checkpoint_of(target, which)
    payload = trainer_checkpoint(path)
    if payload.get("preprocess") is None:
        try:
            return _from_built(load_trained(target, which=which, device=device))
        except DataError as err:
            raise UsageError(
                f"checkpoint '{path}' is from a trainer that did not keep the data's preprocessing in checkpoints, "
                f"so predict builds it again from the run's data, which is not there: {err}. Put the data back where "
                "the run's config.yaml says, or train the run again with this version of trainer"
            ) from None
    return _model_only(path, payload, device)


def _from_built(trained: Any) -> Loaded:
    built = trained.built
    step = trained.payload.get("train_state", {}).get("step")
    return Loaded(
        trained.path, step, built.config, built.model, built.device, built.precision, built.loss_fn,
        trained.payload.get("preprocess") or built.info.preprocess, built,
    )  # fmt: skip


def _model_only(path: Path, payload: dict[str, Any], device: str | None) -> Loaded:
    """The checkpoint's model from its config and weights, with its loss and precision; no data."""
    from trainer.build import build_model
    from trainer.checkpoint import served_weights
    from trainer.components import LOSSES
    from trainer.config import ConfigError, config_from_dict
    from trainer.device import apply_backend_switches, resolve_device, resolve_precision

    try:
        config = config_from_dict(payload["config"], source=f"the config inside {path}", training=False)
    except (KeyError, ConfigError) as err:
        raise UsageError(f"checkpoint '{path}' has no usable config: {err}") from None
    torch_device, _ = resolve_device(device or config.device)
    precision = resolve_precision(config.precision, torch_device)
    apply_backend_switches(torch_device, cudnn_benchmark=config.train.cudnn_benchmark, tf32=config.train.tf32)
    # not compiled: compiling costs more than a few batches of predictions save
    model = build_model(config, torch_device, compile=False)
    try:
        model.load_state_dict(served_weights(payload))
    except (KeyError, RuntimeError) as err:
        raise UsageError(f"checkpoint '{path}' does not fit its model: {str(err).splitlines()[0]}") from None
    loss_fn = LOSSES.build(config.loss.name, **config.loss.kwargs)  # the config check built it once already
    step = payload.get("train_state", {}).get("step")
    return Loaded(path, step, config, model, torch_device, precision, loss_fn, payload["preprocess"])


# ---------------------------------------------------------------------------------------------
# the inputs, as batches


class Batches:
    """Inputs in batches on the model's device, as `trainer.engine.evaluate` takes them: (inputs,
    targets) pairs, targets None when there are none. `load(lo, hi)` gives inputs lo..hi-1 on the CPU."""

    def __init__(self, load: Callable[[int, int], Any], count: int, targets: Any, batch_size: int, loaded: Loaded) -> None:
        self.load, self.num_samples, self.targets, self.batch_size = load, count, targets, batch_size
        self.device = loaded.device
        self.channels_last = bool(loaded.config.train.channels_last)  # as the run's batches were

    def __len__(self) -> int:
        return math.ceil(self.num_samples / self.batch_size)

    def epoch(self, epoch: int = 0) -> Iterator[tuple[Any, Any]]:
        import torch

        for lo in range(0, self.num_samples, self.batch_size):
            hi = min(lo + self.batch_size, self.num_samples)
            x = self.load(lo, hi).to(self.device)
            if self.channels_last and x.ndim == 4:
                x = x.contiguous(memory_format=torch.channels_last)
            yield x, (self.targets[lo:hi].to(self.device) if self.targets is not None else None)


@dataclass
class Inputs:
    """What predict runs the model on: batches, one id per input, and what to tell about them."""

    batches: Any  # Batches, or a run's TensorBatches / LoaderBatches for a split
    ids: list[Any]  # a row index, or a file path
    has_targets: bool
    notes: list[str] = field(default_factory=list)


def file_inputs(spec: str, loaded: Loaded, batch_size: int) -> Inputs:
    """INPUT as the run's samples: a CSV file for a run on a table; an image file, a folder of
    images (at any depth) or a glob of them for a run on images."""
    from trainer.data import image_input, table_inputs

    recipe = loaded.preprocess
    kind, path = recipe["kind"], Path(os.path.expanduser(spec))
    images = _image_files(spec, path)
    if kind == "table":
        columns = ", ".join(recipe["features"])
        if images:
            raise UsageError(
                f"'{spec}' names images, and the run's model takes rows of the columns {columns} (inputs of shape "
                f"{tuple(recipe['input_shape'])}), which images cannot be made to fit; give a CSV file with those columns"
            )
        if not path.is_file():
            what = "is a folder" if path.is_dir() else "does not exist"
            raise UsageError(f"INPUT '{spec}' {what}; give a CSV file with the columns {columns}")
        table = table_inputs(str(spec), recipe)
        notes = [f"note: ignored column(s) the run does not use: {', '.join(table.ignored)}"] if table.ignored else []
        if table.note:
            notes.append(f"note: {table.note}; no loss or accuracy")
        batches = Batches(lambda lo, hi: table.x[lo:hi], len(table.x), table.y, batch_size, loaded)
        return Inputs(batches, list(range(len(table.x))), table.y is not None, notes)
    if kind != "image":
        shape = tuple(recipe["input_shape"])
        raise UsageError(
            f"run's data '{recipe['dataset']}' (inputs of shape {shape}) are made by trainer, not read from files, "
            f"so there is no recipe to turn '{spec}' into inputs like them; use --split val or --split train"
        )
    if images is None and path.is_file():
        raise UsageError(
            f"'{spec}' is not an image file ({', '.join(IMAGE_SUFFIXES)}), and the run's model takes images of shape "
            f"{tuple(recipe['input_shape'])}; give an image file, a folder or a glob of images"
        )
    if images is None:
        raise UsageError(f"INPUT '{spec}' does not exist; give an image file, a folder or a glob of images (quoted), or --split")
    if not images:
        raise UsageError(f"no image files ({', '.join(IMAGE_SUFFIXES)}) in '{spec}'")
    targets = _folder_targets(path, images, loaded) if path.is_dir() and loaded.classification else None

    def load(lo: int, hi: int) -> Any:
        import torch

        return torch.stack([image_input(file, recipe) for file in images[lo:hi]])

    return Inputs(Batches(load, len(images), targets, batch_size, loaded), images, targets is not None)


def _image_files(spec: str, path: Path) -> list[str] | None:
    """The image files INPUT names, sorted: a folder's (at any depth), a glob's, or an image file's
    own; None when INPUT is some other file (or nothing)."""
    if path.is_dir():
        found = (os.path.join(root, name) for root, _, names in os.walk(path) for name in names)
        return sorted(f for f in found if f.lower().endswith(IMAGE_SUFFIXES))
    if not path.exists() and _GLOB_CHARS & set(spec):
        found = glob.glob(os.path.expanduser(spec), recursive=True)
        return sorted(f for f in found if os.path.isfile(f) and f.lower().endswith(IMAGE_SUFFIXES))
    if path.is_file() and spec.lower().endswith(IMAGE_SUFFIXES):
        return [spec]
    return None


def _folder_targets(folder: Path, images: list[str], loaded: Loaded) -> Any:
    """Class labels from the folder layout the run's image_folder data had (FOLDER/<class>/<file>),
    when every image is in a sub-folder named after one of the run's classes; else None."""
    import torch

    index = {name: i for i, name in enumerate(loaded.class_names())}
    labels = []
    for file in images:
        parts = Path(file).relative_to(folder).parts
        if len(parts) != 2 or parts[0] not in index:
            return None
        labels.append(index[parts[0]])
    return torch.tensor(labels, dtype=torch.int64)


def split_inputs(loaded: Loaded, split: str, batch_size: int) -> Inputs:
    """One split of the run's own data, in its order (the train split unshuffled)."""
    from trainer.data import LoaderBatches, TensorBatches

    if split not in SPLITS:
        raise UsageError(f"unknown split '{split}'; accepted: val, test, train", key="--split")
    built = loaded.built
    batches = built.train_batches if split == "train" else built.val_batches
    if batches is None or batches.num_samples == 0:
        raise UsageError("the run has no validation split (data.val_fraction is 0); try --split train", key="--split")
    shuffled = split == "train" and built.config.data.shuffle
    if isinstance(batches, TensorBatches) and (shuffled or batch_size != batches.batch_size):
        batches = TensorBatches(batches.x, batches.y, batch_size, False, built.config.seed)
    elif isinstance(batches, LoaderBatches) and (shuffled or batch_size != batches.batch_size):
        batches = LoaderBatches(batches.dataset, batch_size, False, built.config.seed).to(built.device, batches.channels_last)
    return Inputs(batches, _split_ids(batches), True)


def _split_ids(batches: Any) -> list[Any]:
    """The image file of each sample of an image_folder split, else its position in the split."""
    dataset = getattr(batches, "dataset", None)
    indices = getattr(dataset, "indices", None)
    samples = getattr(getattr(dataset, "dataset", dataset), "samples", None)
    if samples is None:
        return list(range(batches.num_samples))
    return [samples[i][0] for i in (indices if indices is not None else range(len(samples)))]


# ---------------------------------------------------------------------------------------------
# running the model and writing rows


def _tapped(batches: Any, seen: list[Any]) -> Any:
    """`batches` whose epoch() also leaves each batch's targets in seen[0] (for the target column)."""

    class Tapped:
        num_samples = batches.num_samples

        def __len__(self) -> int:
            return len(batches)

        def epoch(self, epoch: int = 0, start_batch: int = 0) -> Iterator[tuple[Any, Any]]:
            for x, y in batches.epoch(0):
                seen[0] = y
                yield x, y

    return Tapped()


def _recording(model: Any, on_outputs: Callable[[Any], None]) -> Any:
    """`model`, reporting each batch's outputs to `on_outputs`: evaluate computes the metrics while
    the rows are written, from the same forward passes."""
    from torch import nn

    class Recording(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = model

        def forward(self, x: Any) -> Any:
            outputs = self.inner(x)
            on_outputs(outputs)
            return outputs

    return Recording()


def run_model(loaded: Loaded, inputs: Inputs, on_rows: Callable[[Any, Any], None]) -> dict[str, float]:
    """Run the model over the inputs, calling `on_rows(outputs, targets)` per batch; returns the loss
    (and accuracy) of `trainer.engine.evaluate` when the inputs have targets, else {}."""
    import torch

    from trainer.engine import evaluate

    seen: list[Any] = [None]
    batches = _tapped(inputs.batches, seen)
    if inputs.has_targets:
        model = _recording(loaded.model, lambda outputs: on_rows(outputs, seen[0]))
        return evaluate(model, batches, loaded.loss_fn, precision=loaded.precision, classification=loaded.classification)
    loaded.model.eval()
    with torch.no_grad():
        for x, _ in batches.epoch(0):
            with loaded.precision.autocast():
                on_rows(loaded.model(x), None)
    return {}


def _number(value: float) -> str:
    """A float32 as the shortest text that reads back as the same float32."""
    import numpy as np

    return str(np.float32(value))


def _json_number(value: float) -> float | None:
    return float(_number(value)) if math.isfinite(value) else None  # JSON has no NaN


class RowWriter:
    """Prediction rows into a temporary file; `finish` moves it to the output (or copies it to a
    stream), whole: an error on the way leaves no output file, and nothing half printed."""

    def __init__(self, loaded: Loaded, ids: list[Any], fmt: str, output: Path | None) -> None:
        self.classification = loaded.classification
        self.names = loaded.class_names() if self.classification else []
        self.ids, self.fmt, self.output = ids, fmt, output
        self.count = 0
        folder = output.parent if output is not None else None
        fd, name = tempfile.mkstemp(prefix=f".{output.name}." if output else ".predictions.", suffix=".tmp", dir=folder)
        self.tmp = Path(name)
        self.file: IO[str] = open(fd, "w", newline="", encoding="utf-8")
        self.csv = csv.writer(self.file, lineterminator="\n") if fmt == "csv" else None
        self.columns: list[str] | None = None

    def rows(self, outputs: Any, targets: Any) -> None:
        """One row per input of a batch: its id, the prediction and the probabilities (or the outputs)."""
        import torch

        outputs = outputs.detach().float().cpu()
        outputs = outputs.reshape(len(outputs), -1)
        if self.classification:
            if outputs.shape[1] != len(self.names):
                raise UsageError(f"the model gives {outputs.shape[1]} outputs per input, and the run has {len(self.names)} classes")
            values, predicted = torch.softmax(outputs, dim=1).numpy(), outputs.argmax(dim=1).tolist()
        else:
            values, predicted = outputs.numpy(), None
        truth = targets.detach().cpu().reshape(len(outputs), -1).tolist() if targets is not None else None
        if self.columns is None:
            self._start(values.shape[1], len(truth[0]) if truth else 0)
        for i, row in enumerate(values):
            ident = self.ids[self.count]
            self.count += 1
            if self.classification:
                target = [self.names[int(truth[i][0])]] if truth else []
                self._write(ident, target, [self.names[predicted[i]]], row)
            else:
                target = [_number(v) for v in truth[i]] if truth else []
                self._write(ident, target, [], row)

    def _start(self, width: int, target_width: int) -> None:
        if self.classification:
            targets, outputs = ["target"] * bool(target_width), ["prediction"] + [f"prob_{name}" for name in self.names]
        else:
            targets = _numbered("target", target_width)
            outputs = _numbered("prediction", width)
        self.columns = ["id", *targets, *outputs]
        if self.csv is not None:
            self.csv.writerow(self.columns)

    def _write(self, ident: Any, target: list[str], prediction: list[str], values: Any) -> None:
        if self.csv is not None:
            self.csv.writerow([ident, *target, *prediction, *map(_number, values)])
            return
        record: dict[str, Any] = {"id": ident}
        if target:
            record["target"] = target[0] if self.classification else _json_value([float(t) for t in target])
        if self.classification:
            record["prediction"] = prediction[0]
            record["probabilities"] = {name: _json_number(v) for name, v in zip(self.names, values)}
        else:
            record["prediction"] = _json_value(values)
        self.file.write(json.dumps(record) + "\n")

    def finish(self, stream: IO[str] | None) -> None:
        """The output in place: renamed over `output`, or copied to `stream`."""
        self.file.close()
        try:
            if self.output is not None:
                output_in_place()
                os.replace(self.tmp, self.output)
                return
            with open(self.tmp, encoding="utf-8") as source:
                try:
                    shutil.copyfileobj(source, stream)
                    stream.flush()
                except OSError:  # a closed pipe (`| head`): the reader has what it wanted
                    from trainer.console import silence

                    silence(stream)
        finally:
            self.tmp.unlink(missing_ok=True)

    def discard(self) -> None:
        self.file.close()
        self.tmp.unlink(missing_ok=True)


def _numbered(name: str, width: int) -> list[str]:
    return [name] if width == 1 else [f"{name}_{i}" for i in range(width)]


def _json_value(values: Any) -> Any:
    numbers = [_json_number(float(v)) for v in values]
    return numbers[0] if len(numbers) == 1 else numbers


# ---------------------------------------------------------------------------------------------
# the command


def output_format(fmt: str | None, output: Path | None) -> str:
    """--format, or jsonl for an --output ending in .jsonl, else csv."""
    if fmt is None:
        return "jsonl" if output is not None and output.suffix.lower() in (".jsonl", ".ndjson") else "csv"
    if fmt not in FORMATS:
        raise UsageError(f"unknown format '{fmt}'; accepted: {', '.join(FORMATS)}", key="--format")
    return fmt


def predict(
    target: Path, spec: str | None = None, *, split: str | None = None, which: str | None = None, device: str | None = None,
    batch_size: int | None = None, output: Path | None = None, fmt: str | None = None, stream: IO[str] | None = None,
) -> Prediction:
    """Predict with the model saved in `target` on INPUT `spec` (see `file_inputs`) or on `split` of
    its run's data; the rows go to `output`, or to `stream` (stdout), as CSV or JSON lines.

    Everything is read and run before the output appears: bad input is a UsageError and leaves no
    file. `batch_size` defaults to the run's data.batch_size, which makes the loss the very number
    `trainer eval` gives for the same rows in the same order.
    """
    if (spec is None) == (split is None):
        raise UsageError("give INPUT (a CSV file, an image file, a folder or a glob of images) or --split val|train, one of them")
    if batch_size is not None and batch_size < 1:
        raise UsageError(f"must be at least 1, got {batch_size}", key="--batch-size")
    fmt = output_format(fmt, output)
    if output is not None:
        _check_output(output, spec)
    loaded = load_model(target, which=which, device=device, need_data=split is not None)
    size = batch_size or loaded.config.data.batch_size
    inputs = split_inputs(loaded, split, size) if split is not None else file_inputs(spec, loaded, size)
    writer = None
    try:
        writer = RowWriter(loaded, inputs.ids, fmt, output)
        metrics = run_model(loaded, inputs, writer.rows)
    except BaseException:
        if writer is not None:
            writer.discard()
        raise
    writer.finish(stream)
    return Prediction(loaded.path, loaded.step, writer.count, metrics, inputs.notes)


def _check_output(output: Path, spec: str | None) -> None:
    """An --output that can be written, and is not the input."""
    if output.is_dir():
        raise UsageError(f"'{output}' is a folder; give a file name", key="--output")
    if not output.parent.is_dir():
        raise UsageError(f"the folder of '{output}' does not exist; create it first", key="--output")
    if spec is not None and output.exists() and Path(os.path.expanduser(spec)).resolve() == output.resolve():
        raise UsageError(f"'{output}' is the input; write the predictions to another file", key="--output")


def describe(result: Prediction, output: Path | None) -> list[str]:
    """What predict tells on stderr: the notes, how many predictions from which checkpoint, and the metrics."""
    lines = list(result.notes)
    where = f" to {output}" if output is not None else ""
    lines.append(f"{result.count} predictions{where}, checkpoint {result.checkpoint} (step {result.step})")
    if result.metrics:
        # full precision, as `trainer eval --json` gives them: the same rows give the same numbers
        lines.append(", ".join(f"{name} {value!r}" for name, value in result.metrics.items()))
    return lines
