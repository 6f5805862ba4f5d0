"""Tests for trainer.data: the dataset registry, splits, and the two batch iterators."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.data import TensorDataset

from trainer.data import (
    DATASETS,
    DataInfo,
    LoaderBatches,
    TensorBatches,
    build_data,
    describe_data,
    epoch_seed,
    split_indices,
)
from trainer.errors import DataError

from datafiles import make_image_folder, make_mnist, write_csv

MNIST_FILES = ["train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]


def build(name, kwargs=None, *, batch_size=8, val_fraction=0.25, shuffle=True, seed=0, model_input_shape=None):
    return build_data(
        name,
        kwargs or {},
        batch_size=batch_size,
        val_fraction=val_fraction,
        shuffle=shuffle,
        seed=seed,
        model_input_shape=model_input_shape,
    )


def all_batches(batches, epoch=0, start_batch=0):
    return list(batches.epoch(epoch, start_batch))


# ---------------------------------------------------------------------------------------------
# fixtures: small data on disk


@pytest.fixture
def small_kwargs(tmp_path):
    """Small kwargs for every registered dataset (a new dataset must add itself here)."""
    csv_path = write_csv(tmp_path / "t.csv", "a,b,y\n" + "\n".join(f"{i},{i * i % 7},{2 * i}" for i in range(12)))
    return {
        "tensors": {"x": [[1], [2], [3], [4]], "y": [[2], [4], [6], [8]]},
        "affine": {"size": 20, "features": 3},
        "random": {"size": 16, "input_shape": [5], "target_shape": [2]},
        "digits": {},
        "mnist": {"root": str(make_mnist(tmp_path / "m"))},
        "fashion_mnist": {"root": str(make_mnist(tmp_path / "f", "FashionMNIST"))},
        "csv": {"path": str(csv_path), "target": "y"},
        "image_folder": {"root": str(make_image_folder(tmp_path / "img")), "image_size": 8},
    }


# ---------------------------------------------------------------------------------------------
# every registered dataset


@pytest.mark.parametrize("name", DATASETS.names())
def test_every_dataset_builds(name, small_kwargs):
    entry = DATASETS.get(name)
    assert entry.description and "\n" not in entry.description
    assert "seed" not in entry.parameters() and "val_fraction" not in entry.parameters()

    train, val, info = build(name, small_kwargs[name], batch_size=4)

    assert isinstance(info, DataInfo)
    assert info.task in ("classification", "regression")
    assert info.train_size == train.num_samples > 0
    assert info.val_size == (val.num_samples if val is not None else 0)
    assert (info.num_classes is not None) == (info.task == "classification")
    assert len(train) == math.ceil(info.train_size / 4)
    for batches in filter(None, (train, val)):
        got = all_batches(batches)
        assert len(got) == len(batches)
        assert sum(len(x) for x, _ in got) == batches.num_samples
        x, y = got[0]
        assert x.dtype == torch.float32 and tuple(x.shape) == (len(x), *info.input_shape)
        assert tuple(y.shape) == (len(x), *info.target_shape)
        if info.task == "classification":
            assert y.dtype == torch.int64 and 0 <= int(y.min()) and int(y.max()) < info.num_classes
    assert str(info.train_size) in describe_data(info)


def test_registered_datasets_match_the_design():
    assert set(DATASETS.names()) == {
        "tensors", "affine", "random", "digits", "mnist", "fashion_mnist", "csv", "image_folder"
    }  # fmt: skip


def test_every_dataset_has_small_kwargs(small_kwargs):
    assert set(small_kwargs) == set(DATASETS.names())


def test_import_does_not_import_torchvision():
    code = "import sys, trainer.data; assert 'torchvision' not in sys.modules, 'torchvision imported'"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


# ---------------------------------------------------------------------------------------------
# build_data


def test_unknown_dataset_is_a_data_error():
    with pytest.raises(DataError, match="did you mean 'digits'") as err:
        build("digit")
    assert err.value.key == "data.name"


def test_bad_and_missing_kwargs_are_listed_together():
    with pytest.raises(DataError) as err:
        build("csv", {"pth": "x.csv", "task": "clustering"})
    assert err.value.key == "data.pth"
    message = str(err.value)
    for part in ("did you mean 'path'", "data.task", "data.path: csv() needs argument 'path'", "data.target"):
        assert part in message


def test_seed_cannot_be_set_from_the_config():
    with pytest.raises(DataError, match="no argument 'seed'"):
        build("affine", {"seed": 3})


def test_kwargs_are_coerced():
    _, _, info = build("affine", {"size": "40", "weight": "2e-1"}, val_fraction=0)
    assert info.train_size == 40


def test_val_fraction_zero_means_no_validation():
    train, val, info = build("affine", {"size": 10}, val_fraction=0)
    assert val is None and info.val_size == 0 and train.num_samples == 10
    assert "no validation" in describe_data(info)


def test_validation_batches_are_not_shuffled():
    _, val, _ = build("affine", {"size": 40}, val_fraction=0.5, shuffle=True)
    assert val.shuffle is False


def test_bad_batch_size():
    with pytest.raises(DataError) as err:
        build("affine", batch_size=0)
    assert err.value.key == "data.batch_size"


def test_describe_data():
    info = DataInfo((1, 32, 32), (), "classification", 10, 1437, 360)
    assert describe_data(info) == "1437 train / 360 val samples, input (1, 32, 32), 10 classes"
    regression = DataInfo((1,), (1,), "regression", None, 3, 0)
    assert "(1,)" in describe_data(regression) and "classes" not in describe_data(regression)


# ---------------------------------------------------------------------------------------------
# the in-memory datasets


def test_tensors_regression_with_integer_values():
    train, val, info = build("tensors", {"x": [[1], [2], [3]], "y": [[2], [4], [6]]}, val_fraction=0)
    assert info.task == "regression" and info.input_shape == (1,) and info.target_shape == (1,)
    assert train.y.dtype == torch.float32 and train.y.flatten().tolist() == [2, 4, 6]


def test_tensors_classification_from_1d_int_labels():
    _, _, info = build("tensors", {"x": [[0, 1], [1, 0], [1, 1]], "y": [0, 2, 1]}, val_fraction=0)
    assert info.task == "classification" and info.num_classes == 3 and info.target_shape == ()


def test_tensors_1d_x_and_1d_float_y_become_columns():
    train, _, info = build("tensors", {"x": [1, 2, 3], "y": [0.5, 1.0, 1.5]}, val_fraction=0)
    assert info.task == "regression" and info.input_shape == (1,) and info.target_shape == (1,)
    assert train.x.shape == (3, 1) and train.y.shape == (3, 1)


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"x": [[1], [2], [3]], "y": [[1], [2]]}, "data.y"),
        ({"x": [[1], [2, 3]], "y": [1, 2]}, "data.x"),
        ({"x": [[1], [2]], "y": [0, -1]}, "data.y"),
    ],
)
def test_tensors_errors(kwargs, key):
    with pytest.raises(DataError) as err:
        build("tensors", kwargs, val_fraction=0)
    assert err.value.key == key


def test_tensors_length_mismatch_names_both_keys():
    with pytest.raises(DataError, match=r"data\.x has 3 samples but data\.y has 2"):
        build("tensors", {"x": [[1], [2], [3]], "y": [[1], [2]]}, val_fraction=0)


def test_affine_matches_the_formula():
    train, _, info = build("affine", {"size": 50, "features": 4, "weight": 2.0, "bias": -1.0}, val_fraction=0)
    assert info.input_shape == (4,) and info.target_shape == (4,) and info.task == "regression"
    torch.testing.assert_close(train.y, 2.0 * train.x - 1.0)


def test_affine_noise_and_seed():
    clean, _, _ = build("affine", {"size": 50}, val_fraction=0, seed=1)
    noisy, _, _ = build("affine", {"size": 50, "noise": 0.1}, val_fraction=0, seed=1)
    other, _, _ = build("affine", {"size": 50}, val_fraction=0, seed=2)
    assert torch.equal(clean.x, noisy.x) and not torch.equal(clean.x, other.x)
    residual = noisy.y - (0.5 * noisy.x + 0.3)
    assert 0.05 < residual.std() < 0.2


def test_random_regression_and_classification():
    train, _, info = build("random", {"size": 64, "input_shape": [1000], "target_shape": [10]}, val_fraction=0)
    assert info.input_shape == (1000,) and info.target_shape == (10,) and info.task == "regression"
    train, _, info = build("random", {"size": 30, "input_shape": [3, 4, 4], "num_classes": 5}, val_fraction=0)
    assert info.input_shape == (3, 4, 4) and info.task == "classification" and info.num_classes == 5
    assert train.y.dtype == torch.int64 and 0 <= train.y.min() and train.y.max() < 5


def test_random_bad_shape():
    with pytest.raises(DataError) as err:
        build("random", {"input_shape": [0]})
    assert err.value.key == "data.input_shape"


def test_digits_native():
    train, val, info = build("digits", val_fraction=0, batch_size=2000)
    assert info.train_size == 1797 and info.num_classes == 10 and info.input_shape == (1, 8, 8)
    x, y = all_batches(train)[0]
    assert 0 <= x.min() and x.max() == 1 and x.dtype == torch.float32
    assert sorted(y.unique().tolist()) == list(range(10))
    # 8x8 counts of 0..16 on pixels: every value is a multiple of 1/16
    torch.testing.assert_close(x * 16, (x * 16).round())


@pytest.mark.parametrize("size", [32, 28])
def test_digits_upscaled(size):
    by_kwarg = build("digits", {"image_size": size}, val_fraction=0.2)
    by_model = build("digits", val_fraction=0.2, model_input_shape=(1, size, size))
    for train, val, info in (by_kwarg, by_model):
        assert info.input_shape == (1, size, size) and info.train_size + info.val_size == 1797
        assert info.val_size == round(1797 * 0.2)
        assert 0 <= train.x.min() and train.x.max() <= 1 and 0 <= val.x.min() and val.x.max() <= 1
    assert torch.equal(by_kwarg[0].x, by_model[0].x)


def test_digits_ignores_a_flat_model_shape():
    _, _, info = build("digits", model_input_shape=(100,))
    assert info.input_shape == (1, 8, 8)


# ---------------------------------------------------------------------------------------------
# split_indices


@pytest.mark.parametrize(("n", "fraction", "n_val"), [(100, 0.2, 20), (10, 0.25, 2), (10, 0.01, 1), (7, 0.0, 0)])
def test_split_indices_sizes_disjoint_covering(n, fraction, n_val):
    train, val = split_indices(n, fraction, seed=0)
    assert len(val) == n_val and len(train) == n - n_val
    assert sorted(train.tolist() + val.tolist()) == list(range(n))


def test_split_indices_seeded():
    a, b, c = split_indices(100, 0.3, 1), split_indices(100, 0.3, 1), split_indices(100, 0.3, 2)
    assert torch.equal(a[1], b[1]) and torch.equal(a[0], b[0])
    assert not torch.equal(a[1], c[1])


@pytest.mark.parametrize(("n", "fraction"), [(10, 1.0), (10, -0.1), (10, 1.5), (1, 0.5), (0, 0.0)])
def test_split_indices_errors(n, fraction):
    with pytest.raises(DataError) as err:
        split_indices(n, fraction, seed=0)
    assert err.value.key == "data.val_fraction"


def test_build_data_bad_val_fraction():
    with pytest.raises(DataError) as err:
        build("tensors", {"x": [1, 2], "y": [1, 2]}, val_fraction=0.9)
    assert err.value.key == "data.val_fraction"


# ---------------------------------------------------------------------------------------------
# batch iterators


def numbered(n=10, features=2):
    x = torch.arange(n * features, dtype=torch.float32).reshape(n, features)
    return x, torch.arange(n)


def test_epoch_seed():
    seeds = {epoch_seed(s, e) for s in range(5) for e in range(5)}
    assert len(seeds) == 25 and all(0 <= v < 2**63 for v in seeds)
    assert 0 <= epoch_seed(-1, 0) < 2**63


def test_tensor_batches_same_seed_same_batches():
    a, b = TensorBatches(*numbered(), 3, True, seed=5), TensorBatches(*numbered(), 3, True, seed=5)
    for (xa, ya), (xb, yb) in zip(all_batches(a, 2), all_batches(b, 2), strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    x, y = all_batches(a, 2)[0]
    assert torch.equal(x[:, 0], 2.0 * y)  # rows stay paired with their labels


def test_tensor_batches_epochs_and_seeds_differ():
    batches = TensorBatches(*numbered(50), 50, True, seed=0)
    order = [all_batches(batches, e)[0][1].tolist() for e in range(3)]
    assert order[0] != order[1] != order[2] and sorted(order[0]) == list(range(50))
    other = TensorBatches(*numbered(50), 50, True, seed=1)
    assert all_batches(other, 0)[0][1].tolist() != order[0]


def test_tensor_batches_order_is_the_documented_permutation():
    batches = TensorBatches(*numbered(20), 20, True, seed=3)
    expected = torch.randperm(20, generator=torch.Generator().manual_seed(epoch_seed(3, 4)))
    assert torch.equal(all_batches(batches, 4)[0][1], expected)


def test_tensor_batches_without_shuffle_are_in_order():
    batches = TensorBatches(*numbered(10), 4, False, seed=0)
    assert [y.tolist() for _, y in all_batches(batches, 7)] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]


@pytest.mark.parametrize("shuffle", [True, False])
@pytest.mark.parametrize("drop_last", [True, False])
def test_tensor_batches_start_batch_is_the_tail(shuffle, drop_last):
    batches = TensorBatches(*numbered(11), 3, shuffle, seed=0, drop_last=drop_last)
    full = all_batches(batches, 1)
    for k in range(len(full) + 1):
        tail = all_batches(batches, 1, start_batch=k)
        assert [y.tolist() for _, y in tail] == [y.tolist() for _, y in full[k:]]


def test_tensor_batches_last_partial_batch_and_len():
    keep = TensorBatches(*numbered(10), 4, True, seed=0)
    drop = TensorBatches(*numbered(10), 4, True, seed=0, drop_last=True)
    assert len(keep) == 3 and [len(y) for _, y in all_batches(keep)] == [4, 4, 2]
    assert len(drop) == 2 and [len(y) for _, y in all_batches(drop)] == [4, 4]
    assert keep.num_samples == drop.num_samples == 10


def test_tensor_batches_to_returns_self_and_moves():
    batches = TensorBatches(*numbered(), 4, True, seed=0)
    assert batches.to("cpu") is batches and batches.x.device.type == "cpu"


@pytest.mark.parametrize("num_workers", [0, 1])
@pytest.mark.parametrize(("shuffle", "drop_last"), [(True, False), (False, False), (True, True)])
def test_loader_batches_match_tensor_batches(num_workers, shuffle, drop_last):
    x, y = numbered(23)
    tensor = TensorBatches(x, y, 5, shuffle, seed=7, drop_last=drop_last)
    loader = LoaderBatches(TensorDataset(x, y), 5, shuffle, seed=7, drop_last=drop_last, num_workers=num_workers)
    assert loader.to("cpu") is loader
    assert len(loader) == len(tensor) and loader.num_samples == tensor.num_samples
    for epoch, start in [(0, 0), (1, 0), (1, 2), (0, 0)]:
        got, want = all_batches(loader, epoch, start), all_batches(tensor, epoch, start)
        assert len(got) == len(want)
        for (xl, yl), (xt, yt) in zip(got, want):
            assert torch.equal(xl, xt) and torch.equal(yl, yt)


def test_loader_batches_default_workers():
    loader = LoaderBatches(TensorDataset(*numbered()), 4, True, seed=0)
    assert 0 <= loader.num_workers <= 4


def test_loader_batches_leave_the_global_rng_alone():
    loader = LoaderBatches(TensorDataset(*numbered()), 4, True, seed=0, num_workers=0)
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    all_batches(loader)
    assert torch.equal(torch.rand(3), expected)


def images(n=12):
    """n numbered 3x4x5 images (the channels-last layout differs from the default for C > 1)."""
    return torch.arange(n * 60, dtype=torch.float32).reshape(n, 3, 4, 5), torch.arange(n)


@pytest.mark.parametrize("shuffle", [True, False])
def test_tensor_batches_channels_last_converts_x_once_and_keeps_the_values(shuffle):
    x, y = images()
    plain = TensorBatches(x, y, 5, shuffle, seed=3).to("cpu")
    fast = TensorBatches(x, y, 5, shuffle, seed=3).to("cpu", channels_last=True)
    assert fast.x.is_contiguous(memory_format=torch.channels_last) and not fast.x.is_contiguous()
    for (xf, yf), (xp, yp) in zip(all_batches(fast, epoch=1), all_batches(plain, epoch=1), strict=True):
        assert xf.is_contiguous(memory_format=torch.channels_last)  # sliced or indexed: still channels-last
        assert torch.equal(xf, xp) and torch.equal(yf, yp)


def test_channels_last_leaves_inputs_that_are_not_images_alone():
    batches = TensorBatches(*numbered(), 4, True, seed=0).to("cpu", channels_last=True)
    assert batches.x.is_contiguous()
    loader = LoaderBatches(TensorDataset(*numbered()), 4, True, seed=0, num_workers=0).to("cpu", channels_last=True)
    assert all(x.is_contiguous() for x, _ in all_batches(loader))


def test_loader_batches_channels_last_converts_each_batch_on_the_device():
    x, y = images()
    loader = LoaderBatches(TensorDataset(x, y), 5, True, seed=3, num_workers=0).to("cpu", channels_last=True)
    tensor = TensorBatches(x, y, 5, True, seed=3).to("cpu")
    for (xl, yl), (xt, yt) in zip(all_batches(loader), all_batches(tensor), strict=True):
        assert xl.is_contiguous(memory_format=torch.channels_last) and not xl.is_contiguous()
        assert torch.equal(xl, xt) and torch.equal(yl, yt)


# ---------------------------------------------------------------------------------------------
# mnist and fashion_mnist


@pytest.mark.parametrize(("name", "folder"), [("mnist", "MNIST"), ("fashion_mnist", "FashionMNIST")])
def test_mnist_from_idx_files(tmp_path, name, folder):
    make_mnist(tmp_path, folder)
    train, val, info = build(name, {"root": str(tmp_path)}, batch_size=100, val_fraction=0.5)
    assert info.train_size == 20 and info.val_size == 10  # the test split, not val_fraction
    assert info.input_shape == (1, 28, 28) and info.num_classes == 10 and info.task == "classification"
    raw = (tmp_path / folder / "raw" / "train-images-idx3-ubyte").read_bytes()[16:]
    first = torch.frombuffer(bytearray(raw[: 28 * 28]), dtype=torch.uint8).float().reshape(28, 28) / 255
    unshuffled = build(name, {"root": str(tmp_path)}, shuffle=False)[0]
    torch.testing.assert_close(unshuffled.x[0, 0], first)
    assert val.y.tolist() == [i % 10 for i in range(10)]


def test_mnist_resized_from_model_shape(tmp_path):
    make_mnist(tmp_path)
    train, val, info = build("mnist", {"root": str(tmp_path)}, model_input_shape=(1, 32, 32))
    assert info.input_shape == (1, 32, 32) and val.x.shape == (10, 1, 32, 32)
    assert 0 <= train.x.min() and train.x.max() <= 1


def test_mnist_from_gzipped_files(tmp_path):
    make_mnist(tmp_path, gz=True)
    _, _, info = build("mnist", {"root": str(tmp_path)})
    assert info.train_size == 20 and info.val_size == 10


@pytest.mark.parametrize(("name", "folder"), [("mnist", "MNIST"), ("fashion_mnist", "FashionMNIST")])
def test_mnist_missing_names_the_folder_and_files(tmp_path, name, folder):
    with pytest.raises(DataError) as err:
        build(name, {"root": str(tmp_path / "nowhere")})
    assert err.value.key == "data.root"
    message = str(err.value)
    assert str(tmp_path / "nowhere" / folder / "raw") in message
    assert all(f in message for f in MNIST_FILES) and ".gz" in message and "data.download=true" in message


def test_mnist_partly_missing_lists_what_is_missing(tmp_path):
    make_mnist(tmp_path)
    (tmp_path / "MNIST" / "raw" / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(DataError, match="missing: t10k-labels-idx1-ubyte"):
        build("mnist", {"root": str(tmp_path)})


def test_mnist_failed_download_is_a_data_error(tmp_path, monkeypatch):
    import torchvision.datasets

    # a closed local port: the download fails at once, as it does without internet
    monkeypatch.setattr(torchvision.datasets.MNIST, "mirrors", ["http://127.0.0.1:9/"])
    with pytest.raises(DataError, match="could not download MNIST") as err:
        build("mnist", {"root": str(tmp_path), "download": True})
    assert err.value.key == "data.root"


def test_mnist_corrupt_file_is_a_data_error(tmp_path):
    make_mnist(tmp_path)
    (tmp_path / "MNIST" / "raw" / "train-labels-idx1-ubyte").write_bytes(b"\x00\x00\x08\x09garbage")
    with pytest.raises(DataError, match="could not read MNIST"):
        build("mnist", {"root": str(tmp_path)})


# ---------------------------------------------------------------------------------------------
# csv


def test_csv_regression(tmp_path):
    path = write_csv(tmp_path / "r.csv", "x1, x2 ,price\n" + "\n".join(f"{i},{i % 3},{10 * i}" for i in range(20)))
    train, val, info = build("csv", {"path": str(path), "target": "price"}, val_fraction=0.25, shuffle=False)
    assert info.task == "regression" and info.input_shape == (2,) and info.target_shape == (1,)
    assert info.train_size == 15 and info.val_size == 5
    # the target keeps its units: it is not standardized
    assert sorted(torch.cat([train.y, val.y]).flatten().tolist()) == [10.0 * i for i in range(20)]


def test_csv_standardizes_with_train_statistics_only(tmp_path):
    rows = [f"{i ** 2},{5},{i}" for i in range(40)]  # skewed feature, constant feature
    path = write_csv(tmp_path / "s.csv", "a,const,y\n" + "\n".join(rows))
    train, val, _ = build("csv", {"path": str(path), "target": "y"}, val_fraction=0.3, seed=4)
    torch.testing.assert_close(train.x.mean(0), torch.zeros(2), atol=1e-5, rtol=0)
    torch.testing.assert_close(train.x[:, 0].std(correction=0), torch.tensor(1.0))
    assert val.x[:, 0].mean().abs() > 1e-3  # val is scaled with train's numbers, so not centred itself
    assert torch.equal(train.x[:, 1], torch.zeros(len(train.x)))  # std 0 -> divided by 1
    raw, _, _ = build("csv", {"path": str(path), "target": "y", "standardize": False}, val_fraction=0.3, seed=4)
    assert raw.x[:, 1].eq(5).all()


def test_csv_classification_labels_in_sorted_order(tmp_path):
    path = write_csv(tmp_path / "c.csv", "f,label\n1,dog\n2,cat\n3,emu\n4,cat\n")
    train, _, info = build("csv", {"path": str(path), "target": "label", "task": "classification"}, val_fraction=0)
    assert info.task == "classification" and info.num_classes == 3 and info.target_shape == ()
    by_feature = dict(zip(train.x[:, 0].argsort().tolist(), train.y.tolist()))
    assert [by_feature[i] for i in range(4)] == [1, 0, 2, 0]  # cat 0, dog 1, emu 2


def test_csv_numeric_classes_sort_as_numbers(tmp_path):
    path = write_csv(tmp_path / "n.csv", "f,k\n1,10\n2,9\n3,2\n")
    train, _, info = build(
        "csv", {"path": str(path), "target": "k", "task": "classification", "standardize": False}, val_fraction=0
    )
    assert info.num_classes == 3
    assert dict(zip(train.x[:, 0].tolist(), train.y.tolist())) == {1.0: 2, 2.0: 1, 3.0: 0}


def test_csv_missing_target_lists_the_columns(tmp_path):
    path = write_csv(tmp_path / "t.csv", "height,weight\n1,2\n")
    with pytest.raises(DataError, match="it has: height, weight") as err:
        build("csv", {"path": str(path), "target": "wieght"}, val_fraction=0)
    assert err.value.key == "data.target" and "did you mean 'weight'" in str(err.value)


def test_csv_missing_file(tmp_path):
    with pytest.raises(DataError) as err:
        build("csv", {"path": str(tmp_path / "nope.csv"), "target": "y"})
    assert err.value.key == "data.path" and "nope.csv" in str(err.value)


def test_csv_non_numeric_feature_names_column_and_line(tmp_path):
    path = write_csv(tmp_path / "t.csv", "a,colour,y\n1,2,3\n4,red,6\n")
    with pytest.raises(DataError, match=r"line 3, column 'colour'.*'red'"):
        build("csv", {"path": str(path), "target": "y"}, val_fraction=0)


def test_csv_non_numeric_regression_target(tmp_path):
    path = write_csv(tmp_path / "t.csv", "a,y\n1,2\n4,high\n")
    with pytest.raises(DataError, match="column 'y'"):
        build("csv", {"path": str(path), "target": "y"}, val_fraction=0)


def test_csv_ragged_row(tmp_path):
    path = write_csv(tmp_path / "t.csv", "a,b,y\n1,2,3\n4,5\n")
    with pytest.raises(DataError, match="line 3 has 2 fields"):
        build("csv", {"path": str(path), "target": "y"}, val_fraction=0)


def test_csv_bad_task(tmp_path):
    path = write_csv(tmp_path / "t.csv", "a,y\n1,2\n")
    with pytest.raises(DataError) as err:
        build("csv", {"path": str(path), "target": "y", "task": "clustering"})
    assert err.value.key == "data.task"
    with pytest.raises(DataError) as err:  # called directly, past the kwargs check
        DATASETS.get("csv").factory(path=str(path), target="y", task="clustering")
    assert err.value.key == "data.task"


def test_csv_with_a_byte_order_mark(tmp_path):
    # Excel's "CSV UTF-8" starts the file with a byte-order mark
    path = tmp_path / "excel.csv"
    path.write_bytes(b"\xef\xbb\xbfa,b,label\n1,2,0\n3,4,1\n")
    train, _, info = build("csv", {"path": str(path), "target": "a", "standardize": False}, val_fraction=0, shuffle=False)
    assert train.y.flatten().tolist() == [1.0, 3.0] and info.input_shape == (2,)
    with pytest.raises(DataError) as err:
        build("csv", {"path": str(path), "target": "c"}, val_fraction=0)
    assert "it has: a, b, label" in str(err.value)


def test_csv_that_is_not_utf8_says_so(tmp_path):
    path = tmp_path / "latin1.csv"
    path.write_bytes("caf\u00e9,y\n1,2\n".encode("latin-1"))
    with pytest.raises(DataError) as err:
        build("csv", {"path": str(path), "target": "y"}, val_fraction=0)
    assert err.value.key == "data.path"
    assert "latin1.csv" in str(err.value) and "not UTF-8" in str(err.value) and "save it as UTF-8" in str(err.value)


@pytest.mark.parametrize(
    ("cell", "problem"),
    [
        ("nan", "'nan' is not a finite number; fill in or drop the missing values"),
        ("NaN", "'NaN' is not a finite number; fill in or drop the missing values"),
        ("inf", "'inf' is not a finite number; replace or drop the infinite values"),
        ("-Infinity", "'-Infinity' is not a finite number; replace or drop the infinite values"),
        ("1e39", "'1e39' is too large: data is float32"),
        ("", "the cell is empty; fill in or drop the missing values"),
        ("  ", "the cell is empty; fill in or drop the missing values"),
    ],
)
@pytest.mark.parametrize("column", ["b", "y"])  # a feature, the regression target
def test_csv_missing_and_non_finite_cells_are_refused(tmp_path, cell, problem, column):
    rows = {"b": f"1,2,3\n4,{cell},6\n7,8,9\n", "y": f"1,2,3\n4,5,{cell}\n7,8,9\n"}[column]
    path = write_csv(tmp_path / "t.csv", "a,b,y\n" + rows)
    with pytest.raises(DataError) as err:
        build("csv", {"path": str(path), "target": "y"}, val_fraction=0)
    assert err.value.key == "data.path"
    assert str(err.value).startswith(f"data.path: {path} line 3, column '{column}': {problem}")


@pytest.mark.parametrize("label", ["", "nan"])
def test_csv_classification_refuses_missing_labels(tmp_path, label):
    path = write_csv(tmp_path / "c.csv", f"f,label\n1,cat\n2,{label}\n3,dog\n")
    with pytest.raises(DataError, match=r"line 3, column 'label': .*fill in or drop the missing values") as err:
        build("csv", {"path": str(path), "target": "label", "task": "classification"}, val_fraction=0)
    assert err.value.key == "data.path"


def test_run_on_a_csv_with_nan_is_bad_input_not_a_failed_run(tmp_path, cli, write_config, tiny):
    # before: the run started and failed with "the training loss is not finite ... try a lower optimizer.lr"
    write_csv(tmp_path / "t.csv", "a,b,y\n" + "\n".join(f"{i},{'nan' if i == 5 else i % 3},{i}" for i in range(12)))
    config = write_config(tiny(data={"name": "csv", "path": "t.csv", "target": "y", "batch_size": 4}))
    result = cli("run", config)
    assert result.code == 2, result.output
    assert result.stderr.strip() == (
        "error: data.path: t.csv line 7, column 'b': 'nan' is not a finite number; fill in or drop the missing values"
    )
    assert not (tmp_path / "runs").exists()


# ---------------------------------------------------------------------------------------------
# image_folder


def test_image_folder_rgb_default_size(tmp_path):
    root = make_image_folder(tmp_path / "img", per_class=4)
    train, val, info = build("image_folder", {"root": str(root)}, val_fraction=0.25, batch_size=3)
    assert isinstance(train, LoaderBatches)
    assert info.input_shape == (3, 32, 32) and info.num_classes == 2 and info.task == "classification"
    assert info.train_size == 6 and info.val_size == 2
    labels = torch.cat([y for _, y in all_batches(train)] + [y for _, y in all_batches(val)])
    assert sorted(labels.tolist()) == [0] * 4 + [1] * 4


@pytest.mark.parametrize("mode", ["RGB", "L", "RGBA", "P", "I;16"])
def test_images_are_loaded_and_resized_as_torchvision_does_bit_for_bit(tmp_path, mode):
    import numpy as np
    import torchvision.transforms as T
    from PIL import Image
    from torchvision.datasets.folder import default_loader

    from trainer.data import _load_image, image_transform

    pixels = np.random.default_rng(0).integers(0, 256, (13, 7, 3), dtype=np.uint8)
    image = Image.fromarray(pixels[:, :, 0].astype(np.uint16) * 257) if mode == "I;16" else Image.fromarray(pixels).convert(mode)
    image.save(tmp_path / "x.png")
    loaded = _load_image(str(tmp_path / "x.png"))
    assert np.array_equal(np.asarray(loaded), np.asarray(default_loader(str(tmp_path / "x.png"))))
    for size in (4, 28, 32):  # down and up
        for grayscale in (False, True):
            theirs = T.Compose([T.Resize((size, size))] + ([T.Grayscale(1)] if grayscale else []) + [T.ToTensor()])
            assert torch.equal(image_transform(size, grayscale)(loaded), theirs(loaded)), (size, grayscale)


def test_image_folder_follows_the_model_shape(tmp_path):
    root = make_image_folder(tmp_path / "img")
    _, _, info = build("image_folder", {"root": str(root)}, model_input_shape=(1, 16, 16))
    assert info.input_shape == (1, 16, 16)
    _, _, info = build("image_folder", {"root": str(root), "grayscale": False}, model_input_shape=(1, 16, 16))
    assert info.input_shape == (3, 16, 16)


def test_image_folder_missing(tmp_path):
    with pytest.raises(DataError, match="no such folder") as err:
        build("image_folder", {"root": str(tmp_path / "nope")})
    assert err.value.key == "data.root"


@pytest.mark.parametrize("with_class_folder", [False, True])
def test_image_folder_without_images(tmp_path, with_class_folder):
    if with_class_folder:
        (tmp_path / "cat").mkdir()
        (tmp_path / "cat" / "notes.txt").write_text("not an image")
    with pytest.raises(DataError, match="holds no images") as err:
        build("image_folder", {"root": str(tmp_path)})
    assert err.value.key == "data.root"


def corrupt_image(root, name="zz.png", folder="dog"):
    """An image folder with one file that has an image's name and not an image's content."""
    make_image_folder(root, per_class=4)
    (root / folder / name).write_text("not a png")
    return root / folder / name


def read_all_images(root, num_workers):
    """Iterate a whole epoch of image folder `root`; the DataError's text, or None."""
    splits = DATASETS.get("image_folder").factory(root=str(root), image_size=8)
    batches = LoaderBatches(splits.train, 3, False, seed=0, num_workers=num_workers)
    try:
        all_batches(batches)
    except DataError as err:
        assert err.key == "data.root"
        return str(err)
    return None


def test_image_folder_corrupt_image_is_one_line_naming_the_file(tmp_path):
    bad = corrupt_image(tmp_path / "img")
    expected = f"data.root: cannot read image '{bad}' (cannot identify image file); remove or replace it"
    assert read_all_images(tmp_path / "img", num_workers=0) == expected
    # read by a worker process, whose exception torch re-raises with the worker's traceback in its
    # message. In a subprocess: after a worker's exception torch takes 5 s per worker to shut the
    # workers down in a live process, and skips that at exit
    code = "import sys, test_data; print(test_data.read_all_images(sys.argv[1], num_workers=2))"
    result = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "img")],
        capture_output=True, text=True, cwd=Path(__file__).parent, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == expected


def test_image_folder_truncated_image(tmp_path):
    from PIL import Image

    root = make_image_folder(tmp_path / "img")
    whole = tmp_path / "whole.png"
    Image.effect_noise((64, 64), 50).save(whole)
    (root / "cat" / "0.png").write_bytes(whole.read_bytes()[:400])  # sorts first: build_data reads it for the shapes
    with pytest.raises(DataError, match=r"cannot read image '.*0\.png' \(.*truncated.*\); remove or replace it"):
        build("image_folder", {"root": str(root)}, val_fraction=0)


def test_run_with_a_corrupt_image_fails_in_one_line(tmp_path, cli, write_config, tiny):
    corrupt_image(tmp_path / "img")  # the last file: read mid-run, after the one-batch check
    data = {"name": "image_folder", "root": "img", "image_size": 8, "batch_size": 3, "val_fraction": 0, "shuffle": False}
    config = write_config(tiny(data=data, loss={"name": "cross_entropy"}))
    expected = "error: data.root: cannot read image 'img/dog/zz.png' (cannot identify image file); remove or replace it"

    # found while training: a failed run (exit 1) that records why, not "internal error ... Original Traceback"
    result = cli("run", config)
    assert result.code == 1, result.output
    assert result.stderr.strip() == expected
    run_dir = Path(result.stdout.strip().splitlines()[-1])
    summary = json.loads((tmp_path / run_dir / "summary.json").read_text())
    assert summary["status"] == "failed" and summary["error"] == expected.removeprefix("error: ")

    corrupt_image(tmp_path / "first", name="0.png", folder="cat")  # the first file: in validate's batch
    result = cli("validate", config, "data.root=first")
    assert result.code == 2, result.output
    assert result.stderr.strip() == expected.replace("img/dog/zz.png", "first/cat/0.png")


# ---------------------------------------------------------------------------------------------
# data-parallel shares


@pytest.mark.parametrize("n", [96, 100, 101])
@pytest.mark.parametrize("world_size", [2, 3])
def test_ranks_kth_batches_together_are_one_processes_kth_batch(n, world_size):
    b = 4
    one = TensorBatches(*numbered(n), b * world_size, True, seed=5)
    ranks = [TensorBatches(*numbered(n), b, True, seed=5).shard(r, world_size, pad=True) for r in range(world_size)]
    assert len({len(r) for r in ranks}) == 1  # every rank takes the same number of steps
    for epoch in (0, 1):
        whole = [set(y.tolist()) for _, y in all_batches(one, epoch)]
        shares = [all_batches(r, epoch) for r in ranks]
        for k, batch in enumerate(whole):
            together = [set(share[k][1].tolist()) for share in shares]
            union = set().union(*together)
            if k < len(whole) - 1 or n % (b * world_size) == 0:
                assert union == batch and sum(map(len, together)) == len(batch)  # disjoint: exactly the global batch
            else:
                # the last: padding repeats the epoch's first samples so every rank has as many
                assert union >= batch and union - batch <= whole[0]


def test_validation_shares_count_every_sample_once():
    shares = [TensorBatches(*numbered(11), 2, False, seed=0).shard(r, 3, pad=False) for r in range(3)]
    seen = [y.item() for s in shares for _, ys in all_batches(s) for y in ys]
    assert sorted(seen) == list(range(11))
    assert [s.num_samples for s in shares] == [11, 11, 11]  # the whole split's size on every rank


@pytest.mark.parametrize("shuffle", [True, False])
def test_sharded_loader_batches_match_sharded_tensor_batches(shuffle):
    x, y = numbered(23)
    for rank in (0, 1):
        tensor = TensorBatches(x, y, 5, shuffle, seed=7).shard(rank, 2, pad=True)
        loader = LoaderBatches(TensorDataset(x, y), 5, shuffle, seed=7, num_workers=0).shard(rank, 2, pad=True)
        assert len(loader) == len(tensor) == 3
        for epoch, start in [(0, 0), (1, 1)]:
            got, want = all_batches(loader, epoch, start), all_batches(tensor, epoch, start)
            assert [t[1].tolist() for t in got] == [t[1].tolist() for t in want]
