"""Tests for the pictures in TensorBoard (trainer.pictures, trainer.tracking.Pictures): real runs,
read back with TensorBoard's own EventAccumulator, their PNGs decoded with Pillow."""

from __future__ import annotations

import csv
import functools
import io
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from rich.console import Console
from torch import nn

from trainer import register_model
from trainer.build import build_run
from trainer.config import config_from_dict
from trainer.pictures import MAX_CLASSES, confusion_matrix, encode_png
from trainer.runs import execute_run

REPO = Path(__file__).resolve().parents[1]


@register_model("noisy_line", input_shape=(1,))
def noisy_line() -> nn.Module:
    """Linear(1, 1) whose every forward draws from torch's generator, in eval mode too."""

    class Noisy(nn.Linear):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return super().forward(x) + 1e-3 * torch.randn_like(x)

    return Noisy(1, 1)


@register_model("tiny_cnn_digits", input_shape=(1, 8, 8))
def tiny_cnn_digits() -> nn.Module:
    """A one-conv net for the 8x8 digits: a LeNet-5 epoch's pictures at a fraction of its cost."""

    class TinyCNN(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(1, 4, 3, padding=1)
            self.fc = nn.Linear(4 * 64, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(torch.relu(self.conv(x)).flatten(1))

    return TinyCNN()


@register_model("branchy", input_shape=(4,))
def branchy() -> nn.Module:
    """A forward that branches on a tensor's value: torch.fx cannot trace it."""

    class Branchy(nn.Linear):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return super().forward(x) if x.sum() > 0 else super().forward(-x)

    return Branchy(4, 2)


def digits(**train) -> dict:
    """A small CNN on the embedded 8x8 digits, one epoch by default: far from all right, so mistakes to draw."""
    return {
        "name": "digits", "model": {"name": "tiny_cnn_digits"},
        "data": {"name": "digits", "image_size": 8, "batch_size": 64, "val_fraction": 0.2},
        "loss": {"name": "cross_entropy"}, "optimizer": {"name": "sgd", "lr": 0.05, "momentum": 0.9},
        "train": {"epochs": 1, "log_every": 10, **train},
    }  # fmt: skip


def line(**train) -> dict:
    """The notebooks' linear regression: x = 1, 2, 3 -> y = 2x, no validation."""
    return {
        "name": "line", "model": {"name": "linear_regression"},
        "data": {"name": "tensors", "x": [[1.0], [2.0], [3.0]], "y": [[2.0], [4.0], [6.0]], "batch_size": 1, "val_fraction": 0},
        "loss": {"name": "mse"}, "optimizer": {"name": "sgd", "lr": 0.1}, "train": {"epochs": 3, "log_every": 3, **train},
    }  # fmt: skip


def run(tmp_path: Path, config: dict, name: str = "run", **options):
    console_text = io.StringIO()
    result = execute_run(
        config_from_dict(config), run_dir=tmp_path / name, console=Console(file=console_text, width=200), **options
    )
    assert result.status == "completed", result.error
    result.console = console_text.getvalue()
    return result


def events(folder: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(folder), size_guidance={"images": 0, "histograms": 0, "scalars": 0})
    accumulator.Reload()
    return accumulator


def decoded(image_event):
    """The event's PNG as a Pillow RGB image; checks the sizes the event states."""
    from PIL import Image

    picture = Image.open(io.BytesIO(image_event.encoded_image_string))
    picture.load()
    assert picture.format == "PNG" and picture.mode == "RGB"
    assert picture.size == (image_event.width, image_event.height)
    return picture


def colours(picture) -> int:
    return len(picture.getcolors(maxcolors=1 << 20))


def compare_tag_names(a: str, b: str) -> int:
    """TensorBoard's ordering of tags (webapp/metrics/utils compareTagNames): '/' and digits
    break words and sort first, numbers compare as numbers."""
    i = j = 0
    while True:
        if i == len(a):
            return 0 if j == len(b) else -1
        if j == len(b):
            return 1
        if a[i].isdigit() and b[j].isdigit():
            i2, j2 = i, j
            while i2 < len(a) and a[i2].isdigit():
                i2 += 1
            while j2 < len(b) and b[j2].isdigit():
                j2 += 1
            if int(a[i:i2]) != int(b[j:j2]):
                return -1 if int(a[i:i2]) < int(b[j:j2]) else 1
            i, j = i2, j2
            continue
        broken_a, broken_b = a[i] == "/" or a[i].isdigit(), b[j] == "/" or b[j].isdigit()
        if broken_a != broken_b:
            return -1 if broken_a else 1
        if a[i] != b[j]:
            return -1 if a[i] < b[j] else 1
        i, j = i + 1, j + 1


def dashboard_groups(tags: list[str]) -> list[str]:
    """The tag groups in the order TensorBoard's dashboards show them: their tags sorted, a group
    where its first tag falls."""
    ordered = sorted(tags, key=functools.cmp_to_key(compare_tag_names))
    return list(dict.fromkeys(tag.split("/", 1)[0] for tag in ordered))


# --------------------------------------------------------------------------- classification


def test_a_classification_run_draws_its_confusion_matrix_and_mistakes_and_writes_confusion_csv(tmp_path):
    result = run(tmp_path, digits(histograms_every=1))
    acc = events(result.run_dir)
    last_step = result.summary["steps"]
    assert set(acc.Tags()["images"]) == {"val/confusion_matrix", "val/misclassified"}
    for tag in ("val/confusion_matrix", "val/misclassified"):
        (image,) = acc.Images(tag)  # one epoch: drawn once, at its end
        assert image.step == last_step
        picture = decoded(image)
        assert picture.width >= 300 and picture.height >= 140
        assert colours(picture) > 20  # text, shaded cells, digits: not a blank canvas
    matrix = decoded(acc.Images("val/confusion_matrix")[0])
    assert matrix.height >= 10 * 28  # ten rows of cells
    grid = decoded(acc.Images("val/misclassified")[0])
    assert grid.height >= 4 * 64  # 16 of the mistakes, four to a row

    with open(result.run_dir / "confusion.csv", newline="") as file:
        rows = list(csv.reader(file))
    assert rows[0] == ["true \\ predicted", *[str(d) for d in range(10)]]
    assert [row[0] for row in rows[1:]] == [str(d) for d in range(10)]
    counts = np.array([[int(n) for n in row[1:]] for row in rows[1:]])
    assert counts.sum() == 359  # the validation split of the 1,797 digits
    assert np.trace(counts) / counts.sum() == pytest.approx(result.summary["final"]["val_accuracy"], abs=1e-9)
    assert np.trace(counts) < counts.sum()  # there were mistakes to draw


def test_scalar_groups_read_train_val_then_best_in_tensorboards_order(tmp_path):
    result = run(tmp_path, digits(histograms_every=1))
    acc = events(result.run_dir)
    scalars = acc.Tags()["scalars"]
    assert set(scalars) == {
        "train/loss", "train/lr", "train/samples_per_s", "val/loss", "val/accuracy",
        "~best/val_loss", "~best/val_accuracy", "~best/train_loss",
    }  # fmt: skip
    every = scalars + acc.Tags()["images"] + acc.Tags()["histograms"]
    assert dashboard_groups(every) == ["train", "val", "weights", "~best"]
    train = sorted((t for t in scalars if t.startswith("train/")), key=functools.cmp_to_key(compare_tag_names))
    assert train == ["train/loss", "train/lr", "train/samples_per_s"]


def test_class_names_come_from_the_data_and_tables_get_no_image_grid(tmp_path):
    rows = ["a,b,kind"] + [f"{i % 7},{(i * 3) % 5},{['setosa', 'virginica', 'versicolor'][i % 3]}" for i in range(60)]
    (tmp_path / "flowers.csv").write_text("\n".join(rows) + "\n")
    config = {
        "name": "flowers", "model": {"name": "mlp", "hidden": 8},
        "data": {"name": "csv", "path": str(tmp_path / "flowers.csv"), "target": "kind", "task": "classification", "batch_size": 16, "val_fraction": 0.25},
        "loss": {"name": "cross_entropy"}, "optimizer": {"name": "sgd", "lr": 0.1}, "train": {"epochs": 2},
    }  # fmt: skip
    result = run(tmp_path, config)
    with open(result.run_dir / "confusion.csv", newline="") as file:
        table = list(csv.reader(file))
    assert table[0][1:] == [row[0] for row in table[1:]] == ["setosa", "versicolor", "virginica"]
    assert sum(int(n) for row in table[1:] for n in row[1:]) == 15
    assert events(result.run_dir).Tags()["images"] == ["val/confusion_matrix"]


class TwoRanks:
    """What trainer.distributed.Distributed gives the pictures, for a run of two processes whose
    shares of the validation set were alike: `sum` (an all-reduce, which every rank must call)
    doubles the tensor."""

    world_size = 2

    def __init__(self) -> None:
        self.sums = 0

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        self.sums += 1
        return tensor.mul_(2)


def test_in_a_data_parallel_run_every_rank_reduces_the_confusion_matrix_and_rank_0_writes_it(tmp_path):
    from trainer.engine import TrainState, evaluate
    from trainer.tracking import Tracker, run_pictures

    built = build_run(config_from_dict(digits()))
    for rank, folder in ((0, tmp_path / "rank0"), (1, None)):  # rank 1's tracker writes no files
        tracker, dist = Tracker(folder, quiet=True, tensorboard=folder is not None, jsonl=folder is not None), TwoRanks()
        pictures, state = run_pictures(built, tracker), TrainState(step=23, epoch=1)
        evaluate(built.model, built.val_batches, built.loss_fn, precision=built.precision, classification=True,
                 observe=pictures.observer(state))  # fmt: skip
        pictures.validated(state, trained=built.model, validated=built.model, dist=dist)
        tracker.finished(status="completed", run_dir=folder, best={}, final={}, steps=23, epochs=1, seconds=1.0)
        tracker.close()
        assert dist.sums == 1, f"rank {rank}"
    with open(tmp_path / "rank0" / "confusion.csv", newline="") as file:
        assert sum(int(n) for row in list(csv.reader(file))[1:] for n in row[1:]) == 2 * 359
    assert "val/confusion_matrix" in events(tmp_path / "rank0").Tags()["images"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rank0"]


# --------------------------------------------------------------------------- regression


def test_a_regression_without_validation_plots_its_predictions_on_the_training_data(tmp_path):
    result = run(tmp_path, line(epochs=3))
    acc = events(result.run_dir)
    assert acc.Tags()["images"] == ["train/predictions"]
    steps = [image.step for image in acc.Images("train/predictions")]
    assert steps[0] == 3 and steps[-1] == 9  # the first epoch end and the last
    picture = decoded(acc.Images("train/predictions")[-1])
    assert colours(picture) > 10 and picture.width >= 320
    assert not (result.run_dir / "confusion.csv").exists()


def test_a_regression_with_validation_plots_the_validation_set(tmp_path):
    config = {
        "name": "affine", "model": {"name": "mlp", "hidden": 8},
        "data": {"name": "affine", "size": 40, "features": 3, "batch_size": 8, "val_fraction": 0.25},
        "loss": {"name": "mse"}, "optimizer": {"name": "sgd", "lr": 0.05}, "train": {"epochs": 2},
    }  # fmt: skip
    acc = events(run(tmp_path, config).run_dir)
    assert acc.Tags()["images"] == ["val/predictions"]
    assert decoded(acc.Images("val/predictions")[-1]).width >= 320


def test_many_tiny_epochs_draw_the_first_and_last_and_far_from_every_one(tmp_path):
    # 200 epochs of 3 one-sample steps: drawing costs more than an epoch, so the cadence keeps it rare
    result = run(tmp_path, line(epochs=200, log_every=100))
    steps = [image.step for image in events(result.run_dir).Images("train/predictions")]
    assert steps[0] == 3 and steps[-1] == 600
    assert len(steps) <= 100


def test_pictures_take_no_random_numbers_so_a_run_trains_the_same_with_and_without(tmp_path):
    # every forward of noisy_line draws from torch's generator: a picture's forward pass over the
    # training data (and the graph's) would shift the training's draws if it took any
    config = line(epochs=6)
    config["model"] = {"name": "noisy_line"}
    with_pictures = run(tmp_path, config, "on")
    config["train"]["pictures"] = False
    without = run(tmp_path, config, "off")
    assert events(with_pictures.run_dir).Tags()["images"] == ["train/predictions"]
    on = torch.load(with_pictures.run_dir / "checkpoints" / "last.pt", weights_only=True)["model"]
    off = torch.load(without.run_dir / "checkpoints" / "last.pt", weights_only=True)["model"]
    assert all(torch.equal(on[k], off[k]) for k in on)


# --------------------------------------------------------------------------- graph, histograms, off


def graph_events(folder: Path) -> int:
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    return sum(bool(e.graph_def) for path in sorted(folder.glob("events.out.tfevents.*")) for e in EventFileLoader(str(path)).Load())


def test_the_graph_is_written_once_per_run_and_not_again_on_resume(tmp_path, monkeypatch):
    config = config_from_dict(digits(epochs=2))
    monkeypatch.setenv("TRAINER_STOP_AT_STEP", "30")  # in the second epoch, after the graph
    stopped = execute_run(config, run_dir=tmp_path / "run", quiet=True)
    assert stopped.status == "interrupted"
    monkeypatch.delenv("TRAINER_STOP_AT_STEP")
    assert execute_run(config, resume=tmp_path / "run", quiet=True).status == "completed"
    assert graph_events(tmp_path / "run") == 1
    graph = events(tmp_path / "run").Graph()
    nodes = {node.name: node for node in graph.node}
    assert nodes["TinyCNN/conv"].op == "Conv2d" and list(nodes["TinyCNN/conv"].input) == ["input/x"]
    assert nodes["TinyCNN/relu"].op == "relu" and list(nodes["TinyCNN/relu"].input) == ["TinyCNN/conv"]
    shape = nodes["TinyCNN/fc"].attr["_output_shapes"].list.shape[0]
    assert [d.size for d in shape.dim] == [1, 10]


def test_a_model_torch_fx_cannot_trace_is_told_once_and_the_run_goes_on(tmp_path):
    config = {
        "name": "branchy", "model": {"name": "branchy"},
        "data": {"name": "random", "size": 32, "input_shape": [4], "target_shape": [2], "batch_size": 8},
        "loss": {"name": "mse"}, "optimizer": {"name": "sgd", "lr": 0.01}, "train": {"epochs": 2, "log_every": 1},
    }  # fmt: skip
    result = run(tmp_path, config)
    assert result.console.count("no model graph in TensorBoard: torch.fx cannot trace Branchy") == 1
    acc = events(result.run_dir)
    assert not acc.Tags()["graph"] and acc.Tags()["images"] == ["val/predictions"]


def test_histograms_every_n_epochs_of_weights_and_gradients_only_when_asked(tmp_path):
    config = {
        "name": "hist", "model": {"name": "mlp", "hidden": 8},
        "data": {"name": "random", "size": 32, "input_shape": [4], "target_shape": [2], "batch_size": 8},
        "loss": {"name": "mse"}, "optimizer": {"name": "sgd", "lr": 0.01}, "train": {"epochs": 4, "histograms_every": 2},
    }  # fmt: skip
    result = run(tmp_path, config, "every2")
    acc = events(result.run_dir)
    names = [name for name, _ in build_run(config_from_dict(config)).model.named_parameters()]
    assert sorted(acc.Tags()["histograms"]) == sorted([f"weights/{n}" for n in names] + [f"weights/{n}.grad" for n in names])
    steps_per_epoch = result.summary["steps"] // 4
    for tag in acc.Tags()["histograms"]:
        histograms = acc.Histograms(tag)
        assert [h.step for h in histograms] == [2 * steps_per_epoch, 4 * steps_per_epoch]
        assert histograms[-1].histogram_value.num > 0
    weight = acc.Histograms(f"weights/{names[0]}")[-1].histogram_value
    assert weight.min < weight.max and sum(weight.bucket) == weight.num
    config["train"].pop("histograms_every")
    assert events(run(tmp_path, config, "never").run_dir).Tags()["histograms"] == []


def test_pictures_off_draws_nothing_and_writes_no_confusion_csv(tmp_path):
    result = run(tmp_path, digits(pictures=False))
    acc = events(result.run_dir)
    assert acc.Tags()["images"] == [] and not acc.Tags()["graph"] and acc.Tags()["histograms"] == []
    assert not (result.run_dir / "confusion.csv").exists()
    assert "val/accuracy" in acc.Tags()["scalars"]


# --------------------------------------------------------------------------- the drawings themselves


def test_the_png_writer_round_trips_every_pixel():
    from PIL import Image

    pixels = np.random.default_rng(0).integers(0, 256, (37, 53, 3), dtype=np.uint8)
    image = Image.open(io.BytesIO(encode_png(pixels)))
    assert image.size == (53, 37) and np.array_equal(np.asarray(image.convert("RGB")), pixels)


def test_a_confusion_matrix_is_drawn_up_to_max_classes():
    counts = np.eye(MAX_CLASSES, dtype=np.int64) * 3
    assert confusion_matrix(counts, [str(k) for k in range(MAX_CLASSES)], title="many") is not None
    beyond = np.eye(MAX_CLASSES + 1, dtype=np.int64)
    assert confusion_matrix(beyond, [str(k) for k in range(MAX_CLASSES + 1)], title="too many") is None


# --------------------------------------------------------------------------- the dashboard


@pytest.mark.browser
def test_the_screenshot_script_shows_the_images_tab_of_a_real_run(tmp_path):
    if not shutil.which("chromium"):
        pytest.skip("Debian's chromium is not installed (.ci/run installs it): apt-get install chromium")
    result = run(tmp_path, digits())
    out = tmp_path / "images.png"
    done = subprocess.run(
        ["bash", REPO / "scripts" / "dashboard_screenshot.sh", result.run_dir, out],
        capture_output=True, text=True, timeout=240, env={**os.environ, "OMP_NUM_THREADS": "1"}, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    from PIL import Image

    shot = Image.open(out)
    shot.load()
    assert shot.format == "PNG" and shot.width >= 800 and shot.height >= 600
    assert colours(shot.convert("RGB")) > 50  # the page with its pictures, not a blank or error page
