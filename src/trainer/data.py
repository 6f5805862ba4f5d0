"""Datasets and the batch iterators the training loop consumes.

Every dataset is a factory in `DATASETS` that returns `Splits`: a train split and, when the data
has one of its own, a validation split. `build_data` turns that into batch iterators:

- `TensorBatches`, the fast path for data that fits in memory: the whole x and y live on the
  device and a batch is one indexing operation with a seeded permutation, no DataLoader;
- `LoaderBatches`, a DataLoader over a `Dataset` (image folders read from disk) that yields the
  same batches in the same order as `TensorBatches` would for the same data and seed.

Both shuffle with `torch.randperm` seeded by `epoch_seed(seed, epoch)`, so an epoch can be
replayed, or resumed from batch k, exactly. torchvision is imported only inside the factories that
need it, so `import trainer.data` stays light.
"""

from __future__ import annotations

import csv as csv_module
import gzip
import importlib.resources
import inspect
import math
import os
import shutil
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset

from trainer.errors import DataError, first_line
from trainer.registry import Registry, RegistryError, close_match

DATASETS = Registry("dataset", entry_point_group="trainer.datasets")

Data = tuple[Tensor, Tensor] | Dataset


@dataclass
class DataInfo:
    """What the rest of the runner needs to know about the data (read off the tensors)."""

    input_shape: tuple[int, ...]  # one sample, e.g. (1, 32, 32) or (100,)
    target_shape: tuple[int, ...]  # () for class labels, (k,) for regression targets
    task: str  # "classification" | "regression"
    num_classes: int | None  # classification only
    train_size: int
    val_size: int  # 0 when there is no validation split
    # how new inputs become samples like these (checkpoints keep it for `trainer predict`): see `preprocessing`
    preprocess: dict[str, Any] | None = None


@dataclass
class Splits:
    """What every dataset factory returns.

    `val=None` means the data has no validation split of its own: `build_data` splits off
    `val_fraction` of the train split. `num_classes` is set when the factory knows it (a split
    may not contain every class). `preprocess` says how a new input (a CSV row, an image file)
    becomes a sample like these, for `trainer predict`: a dict with a `kind` ("table" or
    "image") and what that kind needs (see `table_inputs`, `image_input`); None when the data
    are made, not read (predict then takes only the run's own splits).
    """

    train: Data
    val: Data | None
    num_classes: int | None = None
    preprocess: dict[str, Any] | None = None


# ---------------------------------------------------------------------------------------------
# order of samples


def epoch_seed(seed: int, epoch: int) -> int:
    """The seed of epoch `epoch`'s shuffle: `(seed * 1_000_003 + epoch) mod 2**63`.

    The large prime multiplier keeps the epochs of nearby seeds apart (seed 0 epoch 1 is not
    seed 1 epoch 0); the modulus keeps the value a valid, non-negative generator seed.
    """
    return (seed * 1_000_003 + epoch) % 2**63


def _permutation(n: int, seed: int, epoch: int) -> Tensor:
    """The shuffled order of epoch `epoch`, always computed on the CPU so every device agrees."""
    generator = torch.Generator().manual_seed(epoch_seed(seed, epoch))
    return torch.randperm(n, generator=generator)


def epoch_order(n: int, shuffle: bool, seed: int, epoch: int, rank: int = 0, world_size: int = 1, pad: bool = True) -> Tensor:
    """The samples process `rank` of `world_size` sees in epoch `epoch`, in order.

    One process sees the epoch's seeded permutation (or 0..n-1 without shuffling). With several,
    the permutation is dealt out like DistributedSampler does: rank r takes positions r, r+W,
    r+2W... of it, so the union of the ranks' k-th batches of b is exactly the k-th batch of W*b
    one process would see. `pad` repeats the first samples until n divides by W, so every rank
    takes the same number of steps (training); without it the shards may differ by one (validation).
    """
    order = _permutation(n, seed, epoch) if shuffle else torch.arange(n)
    if world_size == 1:
        return order
    if pad and n % world_size:
        extra = world_size - n % world_size
        order = torch.cat([order, order.repeat(math.ceil(extra / n))[:extra]])
    return order[rank::world_size]


def shard_size(n: int, rank: int, world_size: int, pad: bool) -> int:
    """len(epoch_order(n, ..., rank, world_size, pad)) without building it."""
    if pad:
        return math.ceil(n / world_size)
    return len(range(rank, n, world_size))


def _num_batches(n: int, batch_size: int, drop_last: bool) -> int:
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    return n // batch_size if drop_last else math.ceil(n / batch_size)


def split_indices(n: int, val_fraction: float, seed: int) -> tuple[Tensor, Tensor]:
    """Seeded random split of range(n) into (train, val) indices, each sorted.

    The val split has round(n * val_fraction) samples, at least 1 when val_fraction > 0;
    val_fraction 0 gives an empty val split. Raises DataError(key="data.val_fraction") when the
    fraction is out of [0, 1) or leaves a split empty.
    """
    if not 0 <= val_fraction < 1:
        raise DataError(f"must be at least 0 and less than 1, got {val_fraction}", key="data.val_fraction")
    n_val = max(1, round(n * val_fraction)) if val_fraction > 0 else 0
    if n_val >= n:
        raise DataError(
            f"{val_fraction} of {n} samples leaves no training samples; use a smaller fraction",
            key="data.val_fraction",
        )
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return order[n_val:].sort().values, order[:n_val].sort().values


# ---------------------------------------------------------------------------------------------
# batch iterators


class TensorBatches:
    """In-memory fast path: whole x, y tensors (moved to the device once), batched by indexing with a
    seeded per-epoch permutation. No DataLoader, no per-sample Python."""

    def __init__(self, x: Tensor, y: Tensor, batch_size: int, shuffle: bool, seed: int, drop_last: bool = False):
        if len(x) != len(y):
            raise ValueError(f"x has {len(x)} samples but y has {len(y)}")
        self.x, self.y = x, y
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.drop_last = drop_last
        self.num_samples = len(x)
        self.rank, self.world_size, self.pad = 0, 1, True
        self._len = _num_batches(self.num_samples, batch_size, drop_last)

    def shard(self, rank: int, world_size: int, *, pad: bool) -> TensorBatches:
        """From now on yield only process `rank`'s share of every epoch (see `epoch_order`); returns self."""
        self.rank, self.world_size, self.pad = rank, world_size, pad
        self._len = _num_batches(shard_size(self.num_samples, rank, world_size, pad), self.batch_size, self.drop_last)
        return self

    def to(self, device: torch.device | str, channels_last: bool = False) -> TensorBatches:
        """Move x and y to `device`, a 4-D x in channels-last memory format if asked (once, not per batch); returns self."""
        self.x, self.y = self.x.to(device), self.y.to(device)
        if channels_last and self.x.ndim == 4:
            self.x = self.x.contiguous(memory_format=torch.channels_last)  # indexing and slicing keep the format
        return self

    def __len__(self) -> int:
        """Batches per epoch."""
        return self._len

    def epoch(self, epoch: int, start_batch: int = 0) -> Iterator[tuple[Tensor, Tensor]]:
        """The batches of epoch `epoch`, skipping the first `start_batch` (to resume mid-epoch)."""
        order = None  # plain slices (views, no copy) when neither shuffled nor sharded
        if self.shuffle or self.world_size > 1:
            order = epoch_order(self.num_samples, self.shuffle, self.seed, epoch, self.rank, self.world_size, self.pad)
            order = order.to(self.x.device)
        size = self.num_samples if order is None else len(order)
        for b in range(start_batch, self._len):
            lo, hi = b * self.batch_size, min((b + 1) * self.batch_size, size)
            if order is None:
                yield self.x[lo:hi], self.y[lo:hi]  # views: no copy when not shuffling
            else:
                index = order[lo:hi]
                yield self.x[index], self.y[index]


class _EpochSampler(DistributedSampler):
    """A DistributedSampler that yields `epoch_order` (the order `TensorBatches` uses), from sample
    `start` on; with one process, simply that epoch's permutation.

    It runs in the main process (workers only load samples), so `set_epoch` and `start` before
    each `iter(loader)` take effect even with persistent workers.
    """

    def __init__(self, n: int, shuffle: bool, seed: int, rank: int = 0, world_size: int = 1, pad: bool = True) -> None:
        # not super().__init__: it wants a dataset and draws its own permutation; these are the
        # attributes DistributedSampler's users read
        self.n, self.shuffle, self.seed = n, shuffle, seed
        self.rank, self.num_replicas, self.pad = rank, world_size, pad
        self.num_samples = shard_size(n, rank, world_size, pad)  # this rank's samples per epoch
        self.total_size = self.num_samples * world_size if pad else n
        self.drop_last = False
        self.epoch = 0
        self.start = 0

    def __iter__(self) -> Iterator[int]:
        order = epoch_order(self.n, self.shuffle, self.seed, self.epoch, self.rank, self.num_replicas, self.pad)
        return iter(order[self.start :].tolist())

    def __len__(self) -> int:
        return max(0, self.num_samples - self.start)


def _ignore_sigint(worker_id: int) -> None:
    # Ctrl-C and a closed terminal's SIGHUP reach the whole process group; the main process finishes
    # its step and saves a checkpoint, which needs the workers alive (they would exit on the
    # KeyboardInterrupt, or on the handler they inherited from the main process)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)


class LoaderBatches:
    """DataLoader path for datasets that are not tensors in memory (image_folder). Same interface as
    TensorBatches, and the same order for the same seed: a sampler that yields the same permutation."""

    def __init__(
        self,
        dataset: Dataset,
        batch_size: int,
        shuffle: bool,
        seed: int,
        drop_last: bool = False,
        num_workers: int | None = None,
    ):
        self.dataset = dataset
        self.batch_size = batch_size
        self.drop_last = drop_last
        self.num_samples = len(dataset)
        self._len = _num_batches(self.num_samples, batch_size, drop_last)
        if num_workers is None:
            num_workers = max(0, min(4, (os.cpu_count() or 1) - 1))  # leave a core for the loop
        self.num_workers = num_workers
        self.device: torch.device | None = None
        self.channels_last = False
        self._sampler = _EpochSampler(self.num_samples, shuffle, seed)
        self._loader: DataLoader | None = None  # built on first use, once the device is known

    def shard(self, rank: int, world_size: int, *, pad: bool) -> LoaderBatches:
        """From now on yield only process `rank`'s share of every epoch (see `epoch_order`); returns self."""
        sampler = self._sampler
        self._sampler = _EpochSampler(sampler.n, sampler.shuffle, sampler.seed, rank, world_size, pad)
        self._len = _num_batches(len(self._sampler), self.batch_size, self.drop_last)
        self._loader = None
        return self

    def to(self, device: torch.device | str, channels_last: bool = False) -> LoaderBatches:
        """Batches will be copied to `device` (pinned, non-blocking when it is CUDA), 4-D inputs then
        converted to channels-last memory format there if asked; returns self."""
        self.device = torch.device(device)
        self.channels_last = channels_last
        self._loader = None  # pin_memory depends on the device
        return self

    def __len__(self) -> int:
        """Batches per epoch."""
        return self._len

    def _get_loader(self) -> DataLoader:
        if self._loader is None:
            self._loader = DataLoader(
                self.dataset,
                batch_size=self.batch_size,
                sampler=self._sampler,
                drop_last=self.drop_last,
                num_workers=self.num_workers,
                persistent_workers=self.num_workers > 0,
                pin_memory=self._cuda,
                # the workers' base seed would otherwise be drawn from (and advance) the global RNG
                generator=torch.Generator().manual_seed(self._sampler.seed),
                worker_init_fn=_ignore_sigint,
            )
        return self._loader

    @property
    def _cuda(self) -> bool:
        return self.device is not None and self.device.type == "cuda"

    def epoch(self, epoch: int, start_batch: int = 0) -> Iterator[tuple[Tensor, Tensor]]:
        """The batches of epoch `epoch` on the device, skipping the first `start_batch`."""
        loader = self._get_loader()
        self._sampler.set_epoch(epoch)
        # start on a batch boundary so the remaining batches are exactly the tail of the full epoch
        self._sampler.start = start_batch * self.batch_size
        for x, y in loader:
            if self.device is not None:
                x = x.to(self.device, non_blocking=self._cuda)
                y = y.to(self.device, non_blocking=self._cuda)
            if self.channels_last and x.ndim == 4:
                x = x.contiguous(memory_format=torch.channels_last)  # on the device, after the copy
            yield x, y


# ---------------------------------------------------------------------------------------------
# building


def _factory_call(
    name: str, kwargs: dict[str, Any], *, val_fraction: float, seed: int, model_input_shape: tuple[int, ...] | None
) -> tuple[Any, dict[str, Any]]:
    """Dataset `name`'s factory and its checked kwargs, with what the runner fills in (see build_data)."""
    try:
        factory = DATASETS.get(name).factory
    except RegistryError as err:
        raise DataError(str(err), key="data.name") from None
    kwargs, problems = DATASETS.check_kwargs(name, kwargs)
    problems += [(arg, f"{name}() needs argument '{arg}'") for arg in DATASETS.missing_kwargs(name, kwargs)]
    if problems:
        (first, message), rest = problems[0], problems[1:]
        raise DataError("; ".join([message] + [f"data.{arg}: {msg}" for arg, msg in rest]), key=f"data.{first}")
    accepts = inspect.signature(factory).parameters
    image_shape = model_input_shape if model_input_shape is not None and len(model_input_shape) == 3 else None
    if "seed" in accepts:
        kwargs["seed"] = seed
    if "val_fraction" in accepts:
        kwargs["val_fraction"] = val_fraction
    if "image_size" in accepts and kwargs.get("image_size") is None and image_shape:
        kwargs["image_size"] = image_shape[-1]
    if "grayscale" in accepts and kwargs.get("grayscale") is None and image_shape:
        kwargs["grayscale"] = image_shape[0] == 1
    return factory, kwargs


def build_data(
    name: str,
    kwargs: dict[str, Any],
    *,
    batch_size: int,
    val_fraction: float,
    shuffle: bool,
    seed: int,
    model_input_shape: tuple[int, ...] | None = None,
) -> tuple[TensorBatches | LoaderBatches, TensorBatches | LoaderBatches | None, DataInfo]:
    """Build dataset `name` from its config kwargs: (train batches, val batches or None, DataInfo).

    The runner fills in what a config cannot set: the `seed` of factories that draw random
    numbers, `val_fraction` for factories that split themselves (csv), and, when the model's
    input is an image shape (C, H, W), `image_size=None` -> W and image_folder's
    `grayscale=None` -> (C == 1). A factory that returns no val split gets `val_fraction` of its
    train split held out. Validation batches are never shuffled.
    """
    factory, kwargs = _factory_call(name, kwargs, val_fraction=val_fraction, seed=seed, model_input_shape=model_input_shape)
    if batch_size < 1:
        raise DataError(f"must be at least 1, got {batch_size}", key="data.batch_size")
    try:
        splits: Splits = factory(**kwargs)
    except DataError:
        raise
    except (TypeError, ValueError, OverflowError, RuntimeError, MemoryError) as err:
        # sizes torch cannot hold or allocate (size: 1e19, image_size: 10000000)
        given = ", ".join(f"{k}={v!r}" for k, v in kwargs.items() if k not in ("seed", "val_fraction"))
        raise DataError(f"dataset '{name}' cannot be built with {given}: {first_line(err)}", key="data") from None

    train, val = splits.train, splits.val
    if val is None:
        train_idx, val_idx = split_indices(_length(train), val_fraction, seed)
        if len(val_idx):
            train, val = _take(train, train_idx), _take(train, val_idx)
    if val is not None and _length(val) == 0:
        val = None

    info = _data_info(train, val, splits.num_classes)
    info.preprocess = preprocessing(name, info, splits.preprocess)
    train_batches = _batches(train, batch_size, shuffle, seed)
    val_batches = _batches(val, batch_size, False, seed) if val is not None else None
    return train_batches, val_batches, info


def describe_data(info: DataInfo) -> str:
    """One short console line, e.g. '1437 train / 360 val samples, input (1, 32, 32), 10 classes'."""
    if info.val_size:
        sizes = f"{info.train_size} train / {info.val_size} val samples"
    else:
        sizes = f"{info.train_size} train samples, no validation"
    if info.task == "classification":
        return f"{sizes}, input {info.input_shape}, {info.num_classes} classes"
    return f"{sizes}, input {info.input_shape}, target {info.target_shape}"


def preprocessing(name: str, info: DataInfo, given: dict[str, Any] | None) -> dict[str, Any]:
    """What a checkpoint keeps so `trainer predict` needs no training data: the factory's recipe
    (`given`, else kind "none"), the dataset's name and the shapes, task and class count of its samples."""
    return {
        "kind": "none",
        **(given or {}),
        "dataset": name,
        "input_shape": list(info.input_shape),
        "target_shape": list(info.target_shape),
        "task": info.task,
        "num_classes": info.num_classes,
    }


def _length(data: Data) -> int:
    return len(data[0]) if isinstance(data, tuple) else len(data)


def _take(data: Data, index: Tensor) -> Data:
    if isinstance(data, tuple):
        return data[0][index], data[1][index]
    return Subset(data, index.tolist())


def _batches(data: Data, batch_size: int, shuffle: bool, seed: int) -> TensorBatches | LoaderBatches:
    if isinstance(data, tuple):
        return TensorBatches(data[0], data[1], batch_size, shuffle, seed)
    return LoaderBatches(data, batch_size, shuffle, seed)


def _data_info(train: Data, val: Data | None, num_classes: int | None) -> DataInfo:
    if isinstance(train, tuple):
        x, y = train[0][0], train[1][0]
    else:
        x, y = train[0]
        y = torch.as_tensor(y)  # ImageFolder gives Python int labels
    classification = y.ndim == 0 and not (y.is_floating_point() or y.is_complex())
    if classification and num_classes is None:
        # only tensors reach here: Dataset factories always know their classes
        num_classes = 1 + max(int(part[1].max()) for part in (train, val) if part is not None)
    return DataInfo(
        input_shape=tuple(x.shape),
        target_shape=tuple(y.shape),
        task="classification" if classification else "regression",
        num_classes=num_classes if classification else None,
        train_size=_length(train),
        val_size=_length(val) if val is not None else 0,
    )


def _resize(x: Tensor, size: int) -> Tensor:
    """Bilinear resize of (N, C, H, W) images to size x size (no-op when already that size)."""
    if size < 1:
        raise DataError(f"must be at least 1, got {size}", key="data.image_size")
    if x.shape[-2:] == (size, size):
        return x
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)


# ---------------------------------------------------------------------------------------------
# the datasets


@DATASETS.register("tensors")
def tensors(x: list, y: list) -> Splits:
    """Inline data from the config: x, y as nested lists (1-D int y -> class labels, else regression)."""
    try:
        xs = torch.tensor(x, dtype=torch.float32)
    except (TypeError, ValueError, OverflowError) as err:
        raise DataError(f"must be a list of numbers or equal-length lists of numbers ({err})", key="data.x") from None
    labels = all(isinstance(v, int) and not isinstance(v, bool) for v in y)
    try:
        ys = torch.tensor(y, dtype=torch.int64 if labels else torch.float32)
    except (TypeError, ValueError, OverflowError) as err:
        raise DataError(f"must be a list of numbers or equal-length lists of numbers ({err})", key="data.y") from None
    if len(xs) == 0:
        raise DataError("has no samples", key="data.x")
    if len(xs) != len(ys):
        raise DataError(f"data.x has {len(xs)} samples but data.y has {len(ys)}", key="data.y")
    if labels and int(ys.min()) < 0:
        raise DataError(f"class labels must be 0 or more, got {int(ys.min())}", key="data.y")
    if xs.ndim == 1:
        xs = xs[:, None]  # one feature per sample
    if ys.ndim == 1 and not labels:
        ys = ys[:, None]  # one regression target per sample
    return Splits(train=(xs, ys), val=None)


@DATASETS.register("affine", skip_params=("seed",))
def affine(
    size: int = 1000, features: int = 1, weight: float = 0.5, bias: float = 0.3, noise: float = 0.0, seed: int = 0
) -> Splits:
    """Synthetic regression: x ~ N(0,1) of shape (size, features), y = weight * x + bias + noise * N(0,1)."""
    _check_positive(size=size, features=features)
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(size, features, generator=generator)
    y = weight * x + bias + noise * torch.randn(size, features, generator=generator)
    return Splits(train=(x, y), val=None)


@DATASETS.register("random", skip_params=("seed",))
def random(
    size: int = 64,
    input_shape: tuple[int, ...] = (1000,),
    target_shape: tuple[int, ...] = (10,),
    num_classes: int | None = None,
    seed: int = 0,
) -> Splits:
    """Random N(0,1) inputs with N(0,1) regression targets, or class labels when num_classes is set."""
    _check_positive(size=size, **({} if num_classes is None else {"num_classes": num_classes}))
    for key, shape in (("input_shape", input_shape), ("target_shape", target_shape if num_classes is None else ())):
        if any(d < 1 for d in shape):
            raise DataError(f"dimensions must be at least 1, got {list(shape)}", key=f"data.{key}")
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(size, *input_shape, generator=generator)
    if num_classes is None:
        y = torch.randn(size, *target_shape, generator=generator)
    else:
        y = torch.randint(num_classes, (size,), generator=generator)
    return Splits(train=(x, y), val=None, num_classes=num_classes)


@DATASETS.register("digits")
def digits(image_size: int | None = None) -> Splits:
    """The embedded UCI optical digits: 1797 real handwritten 8x8 digits, upscaled to image_size."""
    with importlib.resources.files("trainer").joinpath("assets/digits.npz").open("rb") as f, np.load(f) as npz:
        images, labels = npz["images"], npz["labels"]
    x = torch.from_numpy(images).float().div_(16).unsqueeze(1)  # pixel counts 0..16 -> [0, 1]
    size = 8 if image_size is None else image_size
    x = _resize(x, size)
    recipe = _grayscale_recipe(native_size=8, image_size=size, classes=[str(d) for d in range(10)])
    return Splits(train=(x, torch.from_numpy(labels).long()), val=None, num_classes=10, preprocess=recipe)


@DATASETS.register("mnist")
def mnist(root: str = "data", download: bool = False, image_size: int | None = None) -> Splits:
    """MNIST through torchvision: train split to train, test split to validate (val_fraction does not apply)."""
    return _torchvision_mnist("MNIST", root, download, image_size)


@DATASETS.register("fashion_mnist")
def fashion_mnist(root: str = "data", download: bool = False, image_size: int | None = None) -> Splits:
    """Fashion-MNIST through torchvision: train split to train, test split to validate (val_fraction does not apply)."""
    return _torchvision_mnist("FashionMNIST", root, download, image_size)


def _torchvision_mnist(class_name: str, root: str, download: bool, image_size: int | None) -> Splits:
    """Load both splits of torchvision's MNIST-like `class_name` into memory as float tensors."""
    import torchvision.datasets

    cls = getattr(torchvision.datasets, class_name)
    root = os.path.expanduser(root)
    raw = Path(root) / class_name / "raw"  # where torchvision looks: <root>/<class name>/raw
    expected = [Path(name).stem for name, _ in cls.resources]  # the resources are the .gz names
    _gunzip_missing(raw, expected)
    try:
        train = cls(root, train=True, download=download)
        test = cls(root, train=False)
    except (RuntimeError, OSError, ValueError, TypeError, AssertionError) as err:
        missing = [name for name in expected if not (raw / name).is_file()]
        files = ", ".join(expected)
        if missing and not download:
            partly = f"; missing: {', '.join(missing)}" if len(missing) < len(expected) else ""
            message = (
                f"{class_name} not found: {raw} must hold {files} (optionally as .gz){partly}. "
                "Put the files there, or set data.download=true on a machine with internet"
            )
        elif missing:
            # torchvision's message lists every mirror tried; its last line is the underlying error
            reason = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
            message = (
                f"could not download {class_name} into {raw} ({reason}); "
                f"without internet, put {files} (optionally as .gz) there by hand"
            )
        else:
            message = f"could not read {class_name} from {raw}: {type(err).__name__}: {err}"
        raise DataError(message, key="data.root") from None
    size = 28 if image_size is None else image_size

    def to_tensors(split: Any) -> tuple[Tensor, Tensor]:
        x = split.data.float().div_(255).unsqueeze(1)  # uint8 (N, 28, 28) -> float (N, 1, 28, 28)
        return _resize(x, size), split.targets.long()

    recipe = _grayscale_recipe(native_size=28, image_size=size, classes=list(train.classes))
    return Splits(train=to_tensors(train), val=to_tensors(test), num_classes=len(train.classes), preprocess=recipe)


def _grayscale_recipe(*, native_size: int, image_size: int, classes: list[str]) -> dict[str, Any]:
    """How an image file becomes a sample of an in-memory grayscale dataset (digits, MNIST): see `image_input`."""
    return {"kind": "image", "resize": "tensor", "native_size": native_size, "image_size": image_size, "channels": 1, "classes": classes}


def _gunzip_missing(folder: Path, names: list[str]) -> None:
    """Unpack `name.gz` next to it when only the .gz is there: torchvision reads the unpacked files only."""
    for name in names:
        packed, unpacked = folder / f"{name}.gz", folder / name
        if packed.is_file() and not unpacked.exists():
            try:
                with gzip.open(packed, "rb") as src, open(unpacked, "wb") as dst:
                    shutil.copyfileobj(src, dst)
            except OSError as err:
                unpacked.unlink(missing_ok=True)
                raise DataError(f"could not unpack {packed}: {err}", key="data.root") from None


@DATASETS.register("csv", skip_params=("seed", "val_fraction"))
def csv(
    path: str,
    target: str,
    task: Literal["regression", "classification"] = "regression",
    standardize: bool = True,
    seed: int = 0,
    val_fraction: float = 0.0,
) -> Splits:
    """A CSV table with a header row: numeric feature columns and one target column."""
    if task not in ("regression", "classification"):
        raise DataError(f"must be 'regression' or 'classification', got {task!r}", key="data.task")
    header, rows = _read_csv(path)
    if target not in header:
        guess = close_match(target, header)
        hint = f"did you mean '{guess}'? " if guess else ""
        raise DataError(f"{path} has no column '{target}'; {hint}it has: {', '.join(header)}", key="data.target")
    if len(header) < 2:
        raise DataError(f"{path} has no feature columns besides the target '{target}'", key="data.path")
    t = header.index(target)
    features = [(j, name) for j, name in enumerate(header) if j != t]
    x = torch.tensor(
        [[_number(row[j], path, name, line) for j, name in features] for line, row in rows], dtype=torch.float32
    )
    values = [row[t] for _, row in rows]
    num_classes = classes = None
    if task == "classification":
        for line, row in rows:  # an empty or NaN label would silently become a class of its own
            _missing(row[t], path, target, line)
        classes = sorted(set(values), key=_label_sort_key(values))
        num_classes = len(classes)
        index = {value: i for i, value in enumerate(classes)}
        y = torch.tensor([index[v] for v in values], dtype=torch.int64)
    else:
        y = torch.tensor([[_number(row[t], path, target, line)] for line, row in rows], dtype=torch.float32)

    train_idx, val_idx = split_indices(len(x), val_fraction, seed)
    mean = std = None
    if standardize:
        # train statistics only: the val split must not leak into the features the model trains on
        mean, std = x[train_idx].mean(0), x[train_idx].std(0, correction=0)
        std = torch.where(std > 0, std, torch.ones_like(std))  # a constant column is only centred
        x = standardized(x, mean, std)
    recipe = {
        "kind": "table", "features": [name for _, name in features], "target": target,
        "mean": mean, "std": std,  # float32 tensors: predict repeats the arithmetic bit for bit
        "classes": classes,  # the label texts, in class-index order
    }  # fmt: skip
    return Splits(
        train=(x[train_idx], y[train_idx]), val=(x[val_idx], y[val_idx]), num_classes=num_classes, preprocess=recipe
    )


def standardized(x: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    """(x - mean) / std: the csv dataset's standardization (std has no zeros: see `csv`)."""
    return (x - mean) / std


def _read_csv(path: str, key: str | None = "data.path") -> tuple[list[str], list[tuple[int, list[str]]]]:
    """The header and the non-blank rows (with their line numbers) of a CSV file; errors name `key`."""
    try:
        # utf-8-sig: Excel's "CSV UTF-8" starts the file with a byte-order mark, which would
        # otherwise stick to the first column's name
        with open(os.path.expanduser(path), newline="", encoding="utf-8-sig") as f:
            reader = csv_module.reader(f)
            header = [name.strip() for name in next(reader, [])]
            rows = [(reader.line_num, row) for row in reader if any(cell.strip() for cell in row)]
    except FileNotFoundError:
        raise DataError(f"no such file: {path}", key=key) from None
    except UnicodeDecodeError as err:
        byte = err.object[err.start : err.start + 1].hex()
        raise DataError(
            f"cannot read {path}: it is not UTF-8 text (it has byte 0x{byte}); save it as UTF-8 (Excel: 'CSV UTF-8')",
            key=key,
        ) from None
    except (OSError, csv_module.Error) as err:
        raise DataError(f"cannot read {path}: {err}", key=key) from None
    if not header:
        raise DataError(f"{path} is empty; it needs a header row naming the columns", key=key)
    if not rows:
        raise DataError(f"{path} has a header but no rows", key=key)
    for line, row in rows:
        if len(row) != len(header):
            raise DataError(f"{path} line {line} has {len(row)} fields but the header has {len(header)}", key=key)
    return header, rows


_FLOAT32_MAX = float(torch.finfo(torch.float32).max)


def _cell_error(path: str, column: str, line: int, problem: str, key: str | None) -> DataError:
    return DataError(f"{path} line {line}, column '{column}': {problem}", key=key)


def _missing(text: str, path: str, column: str, line: int, key: str | None = "data.path") -> None:
    """Refuse an empty cell, or one float() reads as NaN ('nan', 'NaN', ...): a missing value."""
    if not text.strip():
        raise _cell_error(path, column, line, "the cell is empty; fill in or drop the missing values", key)
    try:
        missing = math.isnan(float(text))
    except ValueError:
        return
    if missing:
        raise _cell_error(path, column, line, f"{text!r} is not a finite number; fill in or drop the missing values", key)


def _number(text: str, path: str, column: str, line: int, key: str | None = "data.path") -> float:
    """The cell as a number that float32 holds: empty, NaN, infinite and out-of-range cells are refused,
    since they would only surface later as a non-finite training loss."""
    _missing(text, path, column, line, key)
    try:
        value = float(text)
    except ValueError:
        raise _cell_error(path, column, line, f"expected a number, got {text!r}", key) from None
    if math.isinf(value) and "inf" in text.lower():
        raise _cell_error(path, column, line, f"{text!r} is not a finite number; replace or drop the infinite values", key)
    if abs(value) > _FLOAT32_MAX:
        raise _cell_error(
            path, column, line, f"{text!r} is too large: data is float32, which holds at most {_FLOAT32_MAX:.4g}", key
        )
    return value


def _label_sort_key(values: list[str]) -> Any:
    """Sort labels numerically when they all are numbers (so '10' comes after '9'), else as text."""
    try:
        for v in values:
            float(v)
    except ValueError:
        return str
    return float


@dataclass
class TableInputs:
    """The rows of a CSV file as a run's inputs (see `table_inputs`)."""

    x: Tensor  # (rows, features), in the run's column order, standardized as in training
    y: Tensor | None  # the targets, when the file has a usable target column
    ignored: list[str]  # columns the run does not use
    note: str | None  # why a target column that is there gives no targets


def table_inputs(path: str, recipe: dict[str, Any]) -> TableInputs:
    """The rows of CSV file `path` as the run that `recipe` (the csv dataset's preprocess) describes
    saw its rows: its feature columns found by name in any order, standardized with the training
    split's statistics; the target column, when there, mapped to the training labels' indices.
    Other columns are ignored. Errors name the file (no config key: the file is not the config's)."""
    header, rows = _read_csv(path, key=None)
    features, target = recipe["features"], recipe["target"]
    missing = [name for name in features if name not in header]
    if missing:
        raise DataError(
            f"{path} has no column {', '.join(map(repr, missing))}; the run needs the feature columns "
            f"{', '.join(features)} (in any order; its target column '{target}' may be there or not)",
            key=None,
        )
    twice = sorted({name for name in header if header.count(name) > 1 and (name in features or name == target)})
    if twice:
        raise DataError(f"{path} has column {', '.join(map(repr, twice))} more than once; keep one of each", key=None)
    columns = [header.index(name) for name in features]
    x = torch.tensor(
        [[_number(row[j], path, header[j], line, key=None) for j in columns] for line, row in rows], dtype=torch.float32
    )
    if recipe.get("mean") is not None:
        x = standardized(x, recipe["mean"], recipe["std"])
    y, note = _table_targets(path, rows, header.index(target), recipe) if target in header else (None, None)
    ignored = [name for name in header if name not in features and name != target]
    return TableInputs(x, y, ignored, note)


def _table_targets(path: str, rows: list[tuple[int, list[str]]], t: int, recipe: dict[str, Any]) -> tuple[Tensor | None, str | None]:
    """The target column as the training targets were made, or None and why not (an unknown label,
    an empty cell): the predictions stand without it."""
    target, classes = recipe["target"], recipe.get("classes")
    if classes is None:
        try:
            values = [[_number(row[t], path, target, line, key=None)] for line, row in rows]
        except DataError as err:
            return None, str(err)
        return torch.tensor(values, dtype=torch.float32), None
    index = {label: i for i, label in enumerate(classes)}
    for line, row in rows:
        if row[t] not in index:
            known = ", ".join(classes[:10]) + (", ..." if len(classes) > 10 else "")
            return None, f"{path} line {line}, column '{target}': {row[t]!r} is not one of the run's classes ({known})"
    return torch.tensor([index[row[t]] for _, row in rows], dtype=torch.int64), None


class ImageReadError(DataError):
    """An image file PIL cannot read (corrupt, truncated, not an image), named with data.root.

    `_load_image` raises it, often inside a DataLoader worker. torch re-raises a worker's exception
    in the main process as `ImageReadError("Caught ImageReadError in DataLoader worker process 0.
    Original Traceback ...")`; the constructor keeps only the original message (the traceback's
    last line, without the key), so the error reads the same with and without workers.
    """

    def __init__(self, message: str, key: str | None = "data.root") -> None:
        if message.startswith("Caught ") and "\nOriginal Traceback" in message:
            last = message.rstrip().splitlines()[-1]  # "trainer.data.ImageReadError: data.root: <message>"
            message = last.split(f"{type(self).__name__}: ", 1)[-1]
            if key and message.startswith(f"{key}: "):
                message = message[len(key) + 2 :]
        super().__init__(message, key=key)


def _load_image(path: str) -> Any:
    """ImageFolder's loader: torchvision's (the file as an RGB PIL image), with an unreadable file
    raised as ImageReadError naming it.

    Module-level, so DataLoader workers can unpickle it. Pillow alone: importing any part of
    torchvision imports torch._dynamo (~2 s), which `trainer predict` of image files need not pay.
    """
    from PIL import Image, UnidentifiedImageError

    try:
        with open(path, "rb") as file:
            return Image.open(file).convert("RGB")
    except UnidentifiedImageError:  # its message repeats the path, or names a file object
        reason = "cannot identify image file"
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:  # truncated, broken chunks, ...
        reason = first_line(err)
    raise ImageReadError(f"cannot read image {path!r} ({reason}); remove or replace it")


@DATASETS.register("image_folder")
def image_folder(root: str, image_size: int | None = None, grayscale: bool | None = None) -> Splits:
    """Images on disk, one sub-folder per class (torchvision ImageFolder), resized to image_size."""
    import torchvision.datasets

    if not Path(root).expanduser().is_dir():
        raise DataError(f"no such folder: {root}", key="data.root")
    size = 32 if image_size is None else image_size
    if size < 1:
        raise DataError(f"must be at least 1, got {size}", key="data.image_size")
    transform = image_transform(size, bool(grayscale))
    try:
        dataset = torchvision.datasets.ImageFolder(os.path.expanduser(root), transform=transform, loader=_load_image)
    except FileNotFoundError as err:  # no class folders, or class folders without images
        raise DataError(
            f"{root} holds no images: it needs one sub-folder per class with image files "
            f"(.png, .jpg, ...) in it ({err})",
            key="data.root",
        ) from None
    recipe = {"kind": "image", "resize": "pil", "image_size": size, "channels": 1 if grayscale else 3, "classes": list(dataset.classes)}
    return Splits(train=dataset, val=None, num_classes=len(dataset.classes), preprocess=recipe)


def image_transform(size: int, grayscale: bool) -> Any:
    """image_folder's transform of a loaded RGB image: resized to size x size, to gray if asked, to [0, 1].

    What torchvision's `Compose([Resize((size, size)), Grayscale(1), ToTensor()])` does to a PIL
    image, bit for bit (Pillow's bilinear resize, convert("L"), bytes / 255), without importing it."""
    import functools

    return functools.partial(_image_sample, size=size, grayscale=grayscale)


def _image_sample(image: Any, *, size: int, grayscale: bool) -> Tensor:
    from PIL import Image

    image = image.resize((size, size), Image.Resampling.BILINEAR)
    return _to_tensor(image.convert("L") if grayscale else image)


def _to_tensor(image: Any) -> Tensor:
    """torchvision's ToTensor of a PIL image (8 bits a channel): (C, H, W) float32 in [0, 1]."""
    pixels = np.array(image, dtype=np.uint8, copy=True)
    if pixels.ndim == 2:
        pixels = pixels[:, :, None]
    return torch.from_numpy(pixels).permute(2, 0, 1).contiguous().to(torch.float32).div(255)


def image_input(path: str, recipe: dict[str, Any]) -> Tensor:
    """Image file `path` as a sample of the data an image `recipe` (a dataset's preprocess) describes,
    (C, H, W) in [0, 1]:

    - image_folder (`resize: pil`): its own transform (`image_transform`);
    - digits, MNIST (`resize: tensor`): made gray, resized to the dataset's own size if it is another
      (8x8 digits, 28x28 MNIST; bilinear), scaled to [0, 1], then resized as the dataset resizes its images.

    An unreadable file is a DataError naming it.
    """
    try:
        image = _load_image(path)
    except ImageReadError as err:
        raise DataError(err.message, key=None) from None
    if recipe["resize"] == "pil":
        return image_transform(recipe["image_size"], recipe["channels"] == 1)(image)
    from PIL import Image

    image = image.convert("L")  # an RGB image of a gray one gives back its exact values
    native = recipe["native_size"]
    if image.size != (native, native):
        image = image.resize((native, native), Image.Resampling.BILINEAR)
    return _resize(_to_tensor(image).unsqueeze(0), recipe["image_size"])[0]


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if value < 1:
            raise DataError(f"must be at least 1, got {value}", key=f"data.{name}")
