"""trainer predict: new CSV rows and image files through the preprocessing their run trained with,
equal to `trainer eval` and to the model on the dataset's own samples; bad input refused whole.

The runs are tiny (2-3 steps), trained in process once per module; the checks users meet go
through the console script (--split val: test_plugins), the many small bad-input cases and the eval
that predictions are compared with through Typer's CliRunner.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import re
import shutil
import signal
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import Result, stopped_mid_write
from datafiles import make_image_folder
from PIL import Image

from trainer.config import config_from_dict
from trainer.runs import execute_run, load_trained

LABELS = ("bird", "cat", "dog")


def _train(root: Path, **config) -> Path:
    config = {"loss": {"name": "cross_entropy"}, "optimizer": {"name": "sgd", "lr": 0.1}, "train": {"max_steps": 3}, **config}
    result = execute_run(config_from_dict(config), root=root / "runs", quiet=True, tensorboard=False)
    assert result.exit_code == 0, result.error
    return result.run_dir


def _table(path: Path, rows: int = 60) -> Path:
    """A table of three features and a text label that depends on them."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(rows, 3, generator=g) * torch.tensor([1.0, 2.0, 0.5]) + torch.tensor([0.0, 5.0, 1.0])
    lines = ["a,b,c,kind"]
    for a, b, c in x.tolist():
        label = LABELS[int(a > 0) + int(c > 1)]
        lines.append(f"{a:.4f},{b:.4f},{c:.4f},{label}")
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("predict")


@pytest.fixture(scope="module")
def csv_run(work):
    """A classification run on a CSV table, a quarter of its rows held out; data paths absolute."""
    table = _table(work / "table.csv")
    data = {"name": "csv", "path": str(table), "target": "kind", "task": "classification", "batch_size": 8, "val_fraction": 0.25}
    run = _train(work, name="table", model={"name": "mlp", "hidden": 8}, data=data)
    return SimpleNamespace(run=run, table=table)


@pytest.fixture(scope="module")
def csv_eval(csv_run, work):
    """`trainer eval RUN --json` of the CSV run, in process (what predict is compared with; eval's
    console script is test_cli's)."""
    result = invoke("eval", csv_run.run, "--json", cwd=work)
    assert result.code == 0, result.stderr
    return json.loads(result.stdout)


@pytest.fixture(scope="module")
def image_run(work):
    """LeNet on a small image_folder (two classes of RGB PNGs of different sizes), made gray at 32x32."""
    root = make_image_folder(work / "pictures", per_class=3)
    data = {"name": "image_folder", "root": str(root), "batch_size": 4, "val_fraction": 0.0}
    return SimpleNamespace(run=_train(work, name="pictures", model={"name": "lenet"}, data=data, train={"max_steps": 2}), root=root)


@pytest.fixture(scope="module")
def digits_run(work):
    """LeNet on the embedded digits, upscaled from 8x8 to 32x32."""
    return _train(work, name="digits", model={"name": "lenet"}, data={"name": "digits", "batch_size": 32}, train={"max_steps": 2})


@contextlib.contextmanager
def moved_away(path: Path):
    """The training data gone for the duration: predict must not need it."""
    hidden = path.with_name(path.name + ".away")
    path.rename(hidden)
    try:
        yield
    finally:
        hidden.rename(path)


def invoke(*args, cwd: Path) -> Result:
    """`trainer ARGS...` in this process through Typer's CliRunner (the bad-input cases: one code path each)."""
    import traceback

    from typer.testing import CliRunner

    from trainer.cli import app

    with contextlib.chdir(cwd):
        result = CliRunner(env={"COLUMNS": "200", "TRAINER_DEBUG": None}).invoke(app, [str(a) for a in args])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise AssertionError("".join(traceback.format_exception(*result.exc_info)))
    return Result(result.exit_code, result.stdout, result.stderr, cwd)


def metrics_of(stderr: str) -> dict[str, float]:
    found = re.search(r"^loss (\S+?)(?:, accuracy (\S+))?$", stderr, re.MULTILINE)
    assert found, stderr
    return {"loss": float(found[1]), **({"accuracy": float(found[2])} if found[2] else {})}


def val_rows(table: Path) -> tuple[list[str], list[list[str]]]:
    """The header and the rows of the run's validation split, in its order."""
    from trainer.data import split_indices

    header, *rows = list(csv.reader(table.open()))
    _, val = split_indices(len(rows), 0.25, 0)
    return header, [rows[i] for i in val.tolist()]


# ---------------------------------------------------------------------------------------------
# a table


def test_csv_rows_with_shuffled_columns_equal_eval_without_the_training_csv(cli, csv_run, csv_eval, tmp_path):
    header, rows = val_rows(csv_run.table)
    order = ["kind", "c", "a", "b"]  # the target first, the features shuffled, and a column the run never saw
    with (tmp_path / "new.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["comment", *order])
        writer.writerows([[f"row {i}", *(row[header.index(name)] for name in order)] for i, row in enumerate(rows)])

    with moved_away(csv_run.table):  # the model alone, built from the checkpoint without its data
        result = cli("predict", csv_run.run, "new.csv", "--output", "out.csv", env={"PYTHONPROFILEIMPORTTIME": "1"})
    assert result.code == 0, result.output
    assert "torch._dynamo" not in result.stderr  # no optimizer built: the first one imports it (~2 s)
    assert metrics_of(result.stderr) == {"loss": csv_eval["loss"], "accuracy": csv_eval["accuracy"]}
    assert "ignored column(s) the run does not use: comment" in result.stderr
    assert result.stdout == ""
    out = list(csv.DictReader((tmp_path / "out.csv").open()))
    assert list(out[0]) == ["id", "target", "prediction", "prob_bird", "prob_cat", "prob_dog"]
    assert [r["id"] for r in out] == [str(i) for i in range(len(rows))]
    assert [r["target"] for r in out] == [row[3] for row in rows]
    for r in out:
        probs = {name: float(r[f"prob_{name}"]) for name in LABELS}
        assert r["prediction"] == max(probs, key=probs.get)
        assert sum(probs.values()) == pytest.approx(1, abs=1e-6)
    accuracy = sum(r["prediction"] == r["target"] for r in out) / len(out)
    assert accuracy == csv_eval["accuracy"]


def test_split_val_equals_eval_and_the_rows_on_disk(csv_run, csv_eval, tmp_path):
    # in process: test_plugins runs --split val through the console script
    result = invoke("predict", csv_run.run, "--split", "val", "--format", "jsonl", cwd=tmp_path)
    assert result.code == 0, result.output
    assert metrics_of(result.stderr) == {"loss": csv_eval["loss"], "accuracy": csv_eval["accuracy"]}
    records = [json.loads(line) for line in result.stdout.splitlines()]
    header, rows = val_rows(csv_run.table)
    assert [r["id"] for r in records] == list(range(len(rows)))
    assert [r["target"] for r in records] == [row[3] for row in rows]

    # the same rows from a file (in process): the same probabilities, bit for bit
    from trainer.predict import predict

    (tmp_path / "val.csv").write_text("\n".join(",".join(r) for r in [header, *rows]) + "\n")
    stream = io.StringIO()
    predict(csv_run.run, str(tmp_path / "val.csv"), fmt="jsonl", stream=stream)
    assert [json.loads(line) for line in stream.getvalue().splitlines()] == records


def test_csv_without_the_target_column_gives_predictions_and_no_metrics(csv_run, tmp_path):
    _, rows = val_rows(csv_run.table)
    (tmp_path / "unlabelled.csv").write_text("b,a,c\n" + "".join(f"{r[1]},{r[0]},{r[2]}\n" for r in rows[:5]))
    result = invoke("predict", csv_run.run, "unlabelled.csv", cwd=tmp_path)
    assert result.code == 0, result.output
    out = list(csv.DictReader(io.StringIO(result.stdout)))
    assert list(out[0]) == ["id", "prediction", "prob_bird", "prob_cat", "prob_dog"] and len(out) == 5
    assert "loss" not in result.stderr and "5 predictions" in result.stderr


def test_bad_csv_input_is_refused_and_writes_nothing(csv_run, tmp_path):
    _, rows = val_rows(csv_run.table)
    (tmp_path / "two.csv").write_text("a,c,kind\n" + "".join(f"{r[0]},{r[2]},{r[3]}\n" for r in rows))
    result = invoke("predict", csv_run.run, "two.csv", "-o", "out.csv", cwd=tmp_path)
    assert result.code == 2
    assert "two.csv has no column 'b'; the run needs the feature columns a, b, c (in any order" in result.stderr
    assert "Traceback" not in result.output and not (tmp_path / "out.csv").exists()

    (tmp_path / "bad.csv").write_text("a,b,c\n1,2,3\n1,x,3\n")
    result = invoke("predict", csv_run.run, "bad.csv", "-o", "out.csv", cwd=tmp_path)
    assert result.code == 2 and "bad.csv line 3, column 'b': expected a number, got 'x'" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.csv", "two.csv"]  # no output, no temporary file

    (tmp_path / "new.csv").write_text("a,b,c,kind\n0,5,1,cat\n1,4,1,horse\n")
    result = invoke("predict", csv_run.run, "new.csv", cwd=tmp_path)  # a label the run never saw: predictions, no metrics
    assert result.code == 0, result.output
    assert "new.csv line 3, column 'kind': 'horse' is not one of the run's classes (bird, cat, dog); no loss or accuracy" in result.stderr
    assert len(result.stdout.splitlines()) == 3

    picture = tmp_path / "p.png"
    Image.new("RGB", (8, 8)).save(picture)
    result = invoke("predict", csv_run.run, picture, cwd=tmp_path)
    assert result.code == 2 and "images cannot be made to fit" in result.stderr and "a, b, c" in result.stderr

    for args, says in [
        (["new.csv", "--split", "val"], "give INPUT"),
        ([], "give INPUT"),
        (["new.csv", "-o", "new.csv"], "is the input"),
        (["new.csv", "-o", "nowhere/out.csv"], "does not exist"),
        (["missing.csv"], "INPUT 'missing.csv' does not exist"),
        (["--split", "holdout"], "unknown split 'holdout'"),
        (["new.csv", "--format", "xml"], "unknown format 'xml'"),
        (["new.csv", "--best", "--last"], "exclude each other"),
    ]:
        result = invoke("predict", csv_run.run, *args, cwd=tmp_path)
        assert result.code == 2 and says in result.stderr, (args, result.output)


def test_regression_and_generated_data(tmp_path):
    from trainer.predict import predict
    from trainer.runs import evaluate_checkpoint

    g = torch.Generator().manual_seed(1)
    x = torch.rand(40, 2, generator=g) * 10
    table = tmp_path / "reg.csv"
    table.write_text("u,v,y\n" + "".join(f"{u:.3f},{v:.3f},{2 * u - v:.3f}\n" for u, v in x.tolist()))
    data = {"name": "csv", "path": str(table), "target": "y", "batch_size": 16, "val_fraction": 0.25}
    run = _train(tmp_path, name="reg", model={"name": "mlp", "hidden": 4}, data=data, loss={"name": "mse"}, optimizer={"name": "sgd", "lr": 0.01})
    stream = io.StringIO()
    got = predict(run, split="val", stream=stream)
    assert got.metrics == {"loss": evaluate_checkpoint(run)["loss"]}
    out = list(csv.DictReader(io.StringIO(stream.getvalue())))
    assert list(out[0]) == ["id", "target", "prediction"] and len(out) == 10

    # data trainer makes (no files to read): --split only, and a file is refused saying so
    tiny = {"name": "random", "size": 16, "input_shape": [4], "target_shape": [2], "batch_size": 8, "val_fraction": 0}
    run = _train(tmp_path, name="random", model={"name": "mlp", "hidden": 4}, data=tiny, loss={"name": "mse"})
    stream = io.StringIO()
    predict(run, split="train", stream=stream)
    out = list(csv.DictReader(io.StringIO(stream.getvalue())))
    assert list(out[0]) == ["id", "target_0", "target_1", "prediction_0", "prediction_1"] and len(out) == 16
    result = invoke("predict", run, table, cwd=tmp_path)
    assert result.code == 2 and "data 'random'" in result.stderr and "use --split" in result.stderr


def test_a_checkpoint_from_before_preprocess_rebuilds_it_from_the_data_or_says_what_is_missing(csv_run, tmp_path):
    from trainer.predict import predict

    payload = torch.load(csv_run.run / "checkpoints" / "best.pt", weights_only=True)
    assert payload["preprocess"]["features"] == ["a", "b", "c"] and payload["format"] == 3
    del payload["preprocess"]
    old = tmp_path / "old.pt"
    torch.save(payload, old)
    header, rows = val_rows(csv_run.table)
    (tmp_path / "val.csv").write_text("\n".join(",".join(r) for r in [header, *rows]) + "\n")

    new, before = io.StringIO(), io.StringIO()
    predict(csv_run.run, str(tmp_path / "val.csv"), stream=new)
    predict(old, str(tmp_path / "val.csv"), stream=before)
    assert before.getvalue() == new.getvalue()
    with moved_away(csv_run.table):
        result = invoke("predict", old, "val.csv", cwd=tmp_path)
    assert result.code == 2
    assert "did not keep the data's preprocessing" in result.stderr and f"no such file: {csv_run.table}" in result.stderr


# ---------------------------------------------------------------------------------------------
# images


def _probabilities(rows: list[dict[str, str]], names: list[str]) -> torch.Tensor:
    return torch.tensor([[float(r[f"prob_{n}"]) for n in names] for r in rows])


def test_image_files_equal_the_model_on_the_dataset_without_the_training_folder(cli, image_run, tmp_path):
    trained = load_trained(image_run.run)  # the run as eval builds it: data from the folder
    dataset = trained.built.train_batches.dataset
    trained.built.model.eval()
    with torch.no_grad():
        expected = {
            Path(path).relative_to(image_run.root).as_posix(): torch.softmax(trained.built.model(dataset[i][0][None]), 1)[0]
            for i, (path, _) in enumerate(dataset.samples)
        }
    shutil.copytree(image_run.root, tmp_path / "new")  # the same files, class sub-folders and all

    with moved_away(image_run.root):
        result = cli("predict", image_run.run, "new", env={"PYTHONPROFILEIMPORTTIME": "1"})
    assert result.code == 0, result.output
    # images read with Pillow alone: any part of torchvision imports torch._dynamo (~2 s)
    assert "torchvision" not in result.stderr and "torch._dynamo" not in result.stderr
    rows = list(csv.DictReader(io.StringIO(result.stdout)))
    assert [r["id"] for r in rows] == [f"new/{name}" for name in sorted(expected)]
    got = _probabilities(rows, ["cat", "dog"])
    torch.testing.assert_close(got, torch.stack([expected[n] for n in sorted(expected)]), rtol=0, atol=1e-6)
    assert [r["target"] for r in rows] == [n.split("/")[0] for n in sorted(expected)]  # from the sub-folders
    assert "loss" in result.stderr and "accuracy" in result.stderr

    # one file, and a glob, give the same row
    one = invoke("predict", image_run.run, "new/dog/11.png", cwd=tmp_path)
    globbed = invoke("predict", image_run.run, "new/*/11.png", "--format", "jsonl", cwd=tmp_path)
    assert one.code == 0 and globbed.code == 0, one.output + globbed.output
    [row] = [{k: v for k, v in r.items() if k != "target"} for r in rows if r["id"] == "new/dog/11.png"]
    assert list(csv.DictReader(io.StringIO(one.stdout))) == [row]  # no target: a file alone names no class
    record = json.loads(globbed.stdout)
    assert record["id"] == "new/dog/11.png" and "target" not in record
    assert record["probabilities"]["dog"] == float(row["prob_dog"])


def test_an_unreadable_image_is_named_and_leaves_no_output(cli, image_run, tmp_path):
    (tmp_path / "in").mkdir()
    shutil.copy(image_run.root / "cat" / "00.png", tmp_path / "in" / "a.png")
    (tmp_path / "in" / "b.png").write_bytes(b"not a picture")
    (tmp_path / "out").mkdir()
    result = cli("predict", image_run.run, "in", "--output", "out/predictions.csv")
    assert result.code == 2
    assert "cannot read image 'in/b.png' (cannot identify image file)" in result.stderr
    assert "Traceback" not in result.stderr and list((tmp_path / "out").iterdir()) == []

    for args, says in [
        (["in/a.png.csv"], "INPUT 'in/a.png.csv' does not exist"),
        (["in/*.jpg"], "no image files"),
    ]:
        result = invoke("predict", image_run.run, *args, cwd=tmp_path)
        assert result.code == 2 and says in result.stderr, (args, result.output)
    (tmp_path / "t.csv").write_text("a\n1\n")
    result = invoke("predict", image_run.run, "t.csv", cwd=tmp_path)
    assert result.code == 2 and "is not an image file" in result.stderr and "(1, 32, 32)" in result.stderr


def test_digit_files_on_disk_equal_the_embedded_digits(cli, digits_run, tmp_path):
    from trainer.data import digits

    native = digits(8).train[0][:6]  # the 8x8 images in [0, 1], as the dataset reads them
    for i, image in enumerate(native):
        pixels = (image[0].numpy() * 255).round().astype(np.uint8)  # 8-bit PNG: 1/510 of rounding at most
        Image.fromarray(pixels, "L").save(tmp_path / f"digit{i}.png")
    trained = load_trained(digits_run)
    trained.built.model.eval()
    with torch.no_grad():
        expected = torch.softmax(trained.built.model(digits(32).train[0][:6]), 1)  # the run's own samples, 32x32

    result = cli("predict", digits_run, "digit*.png", "--format", "jsonl", "--batch-size", "4")
    assert result.code == 0, result.output
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["id"] for r in records] == [f"digit{i}.png" for i in range(6)]
    got = torch.tensor([[r["probabilities"][str(d)] for d in range(10)] for r in records])
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-4)
    assert [r["prediction"] for r in records] == [str(int(k)) for k in expected.argmax(1)]


def test_a_closed_terminal_mid_prediction_leaves_no_output(cli, tmp_path):
    result = stopped_mid_write(  # SLOW_FORWARD: two seconds a batch
        cli, tmp_path, "predict", "run", "--split", "train", "-o", "out/predictions.csv",
        pattern=".predictions.csv.*.tmp", signals=(signal.SIGHUP, signal.SIGHUP),  # a closed terminal's: often two
    )  # fmt: skip
    assert result.code == 143, result.stderr  # taken as SIGTERM
    assert result.stderr.strip().splitlines()[-1] == "stopped (SIGTERM) before its output was complete" and result.stdout == ""
    assert list((tmp_path / "out").iterdir()) == []
