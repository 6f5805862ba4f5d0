"""`--plugins`: your own model and dataset from a file, through the real console script."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

PLUGIN = '''
import torch
from torch import nn

from trainer import register_dataset, register_model
from trainer.data import Splits


@register_model("tiny_cnn", input_shape=(1, 8, 8))
def tiny_cnn(num_classes: int = 10, width: int = 4) -> nn.Module:
    """A one-conv net for 8x8 images."""
    return nn.Sequential(nn.Conv2d(1, width, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(width * 64, num_classes))


@register_dataset("blobs")
def blobs(size: int = 96, classes: int = 3) -> Splits:
    """Gaussian blobs of 4 features, one per class."""
    generator = torch.Generator().manual_seed(0)
    y = torch.arange(size) % classes
    x = torch.randn(size, 4, generator=generator) + 3 * y[:, None].float()
    return Splits(train=(x, y), val=None)
'''
QUICK = {"OMP_NUM_THREADS": "1"}


def config(**sections) -> dict:
    base = {
        "name": "mine", "device": "cpu", "model": {"name": "tiny_cnn", "width": 3},
        "data": {"name": "digits", "image_size": 8, "batch_size": 64}, "loss": {"name": "cross_entropy"},
        "optimizer": {"name": "sgd", "lr": 0.05}, "train": {"max_steps": 6, "checkpoint_every": 2},
    }  # fmt: skip
    return {**base, **sections}


@pytest.fixture
def plugin(tmp_path: Path) -> Path:
    path = tmp_path / "my_models.py"
    path.write_text(PLUGIN)
    (tmp_path / "cnn.yaml").write_text(yaml.safe_dump(config()))
    return path


def test_a_plugin_model_trains_resumes_and_evaluates(plugin: Path, cli) -> None:
    listed = cli("list-models", "--plugins", plugin.name)
    assert listed.code == 0 and "tiny_cnn" in listed.stdout and "A one-conv net for 8x8 images." in listed.stdout
    # stopped after step 4, then resumed: the plugin is named again, and checked against the run's record
    stopped = cli("run", "cnn.yaml", "--plugins", plugin.name, env={**QUICK, "TRAINER_STOP_AT_STEP": "4"})
    assert stopped.code == 143, stopped.output
    run = stopped.cwd / stopped.stdout.strip().splitlines()[-1]
    recorded = json.loads((run / "env.json").read_text())["plugins"]
    assert [(Path(e["path"]).name, len(e["sha256"])) for e in recorded] == [("my_models.py", 64)]

    without = cli("resume", run)
    assert without.code == 2 and f"trained with the plugin {plugin}; give it again: --plugins {plugin}" in without.stderr
    resumed = cli("resume", run, "--plugins", plugin, env=QUICK)
    assert resumed.code == 0, resumed.output
    assert json.loads((run / "summary.json").read_text())["steps"] == 6
    evaluated = cli("eval", run, "--json", env={"TRAINER_PLUGINS": str(plugin)})
    assert evaluated.code == 0 and json.loads(evaluated.stdout)["samples"] == 359
    predicted = cli("predict", run, "--split", "val", "--plugins", plugin, env=QUICK)
    assert predicted.code == 0, predicted.output
    rows = predicted.stdout.strip().splitlines()
    assert len(rows) == 1 + 359 and "prediction" in rows[0].split(",")
    assert f"accuracy {json.loads(evaluated.stdout)['accuracy']}" in predicted.stderr  # eval's, on the same rows

    # a plugin file changed since the run: told before anything runs; --force goes on (here the export)
    plugin.write_text(PLUGIN + "\n# changed\n")
    changed = cli("eval", run, "--plugins", plugin)
    assert changed.code == 2 and "plugin file changed since the run" in changed.stderr and "--force" in changed.stderr
    exported = cli("export", run, "--format", "pt2", "--plugins", plugin, "--force", env=QUICK)
    assert exported.code == 0, exported.output
    program = torch.export.load(exported.cwd / exported.stdout.strip().splitlines()[-1])
    assert program.module()(torch.rand(5, 1, 8, 8)).shape == (5, 10)


def test_a_plugin_dataset_trains_a_builtin_model(plugin: Path, cli) -> None:
    (plugin.parent / "blobs.yaml").write_text(yaml.safe_dump(config(
        model={"name": "mlp", "hidden": [8]}, data={"name": "blobs", "size": 60, "batch_size": 20}, train={"max_steps": 3},
    )))  # fmt: skip
    shown = cli("show-config", "blobs.yaml", "--plugins", plugin.name)
    assert shown.code == 0 and yaml.safe_load(shown.stdout)["model"]["in_features"] == 4  # sizes inferred as for a built-in
    result = cli("run", "blobs.yaml", "--plugins", plugin.name, env=QUICK)
    assert result.code == 0, result.output
    run = result.cwd / result.stdout.strip().splitlines()[-1]
    assert json.loads((run / "summary.json").read_text())["steps"] == 3
    evaluated = cli("eval", run, "--json", "--plugins", plugin.name, env=QUICK)
    assert evaluated.code == 0 and json.loads(evaluated.stdout)["samples"] == 12  # a fifth of 60 held out
    predicted = cli("predict", run, "--split", "val", "--plugins", plugin.name, env=QUICK)
    assert predicted.code == 0 and len(predicted.stdout.strip().splitlines()) == 1 + 12
    exported = cli("export", run, "--format", "safetensors", "--plugins", plugin.name, env=QUICK)
    assert exported.code == 0, exported.output


def test_a_plugin_is_checked_like_a_builtin(plugin: Path, cli) -> None:
    (plugin.parent / "bad.yaml").write_text(yaml.safe_dump(config(model={"name": "tiny_cnn", "widht": 3})))
    result = cli("validate", "bad.yaml", "--plugins", plugin.name)
    assert result.code == 2 and "tiny_cnn() has no argument 'widht'; did you mean 'width'?" in result.stderr


def test_a_yaml_file_never_imports_code(tmp_path: Path, cli) -> None:
    (tmp_path / "dotted.yaml").write_text(yaml.safe_dump(config(model={"name": "my_pkg.models.TinyCNN"})))
    result = cli("validate", "dotted.yaml")
    assert result.code == 2
    assert "a config names registered models only and never imports code" in result.stderr and "--plugins" in result.stderr


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("x = (\n", "plugin broken.py, line 1: SyntaxError: '(' was never closed"),
        ("import torch\n\nraise RuntimeError('no GPU here')\n", "plugin broken.py, line 3: RuntimeError: no GPU here"),
        (
            "from trainer import register_model\n\n@register_model('lenet')\ndef lenet():\n    pass\n",
            "plugin broken.py: model 'lenet' is already registered (trainer list models); choose another name",
        ),
    ],
    ids=["syntax-error", "raises", "takes-a-builtin-name"],
)
def test_a_plugin_that_fails_to_import_is_one_line(tmp_path: Path, cli, source: str, expected: str) -> None:
    (tmp_path / "broken.py").write_text(source)
    result = cli("list-models", "--plugins", "broken.py")
    assert result.code == 2
    assert result.stderr.strip() == f"error: {expected}"


def test_a_missing_plugin_is_named(tmp_path: Path, cli) -> None:
    result = cli("list-models", "--plugins", "nowhere.py")
    assert result.code == 2 and "'nowhere.py' is not a file" in result.stderr
    module = cli("list-models", "--plugins", "no_such_module")
    assert module.code == 2 and "no file or module 'no_such_module'" in module.stderr


def test_the_plugin_example_in_the_docs_validates(tmp_path: Path, cli) -> None:
    import re

    doc = (Path(__file__).parents[1] / "docs" / "plugins.md").read_text()
    (tmp_path / "my_models.py").write_text(re.search(r"```python\n(.*?)```", doc, re.S).group(1))
    (tmp_path / "my.yaml").write_text(re.search(r"```yaml\n(.*?)```", doc, re.S).group(1))
    result = cli("validate", "my.yaml", "--plugins", "my_models.py")
    assert result.code == 0, result.output
    assert "model tiny_cnn" in result.stdout
    blobs = cli("validate", "my.yaml", "--plugins", "my_models.py", "model.name=mlp", "~model.width", "data.name=blobs", "~data.image_size")
    assert blobs.code == 0, blobs.output
