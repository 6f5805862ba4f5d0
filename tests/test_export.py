"""trainer export: every built-in model in every format, each file loaded back by its own loader on
another batch size; the console script's output and errors; a pt2 and an ONNX file used from a
Python without trainer; the loading snippets of docs/export.md run against real exports."""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import signal
import site
import subprocess
import sys
import venv
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml

from conftest import CONFIGS, REPO, stopped_mid_write, tiny_config, trainer_executable
from trainer.config import config_from_dict, load_config, registries
from trainer.errors import UsageError
from trainer.export import ExportMismatch, export_module, export_run
from trainer.runs import execute_run, load_trained

FORMATS = ("pt2", "onnx", "safetensors")
MODEL_NAMES = registries()["model"].names()
ROUND_TRIP = 1e-5  # the round trip's tolerance, scaled like the export's check by outputs above 1


# ---------------------------------------------------------------------------------------------
# helpers


def tiny_run_config(name: str) -> dict:
    """One step of model `name` on random data of its input shape: class labels when it takes
    num_classes, else one regression target."""
    entry = registries()["model"].get(name)
    classify = "num_classes" in entry.parameters()
    data = {"name": "random", "size": 16, "input_shape": list(entry.info.get("input_shape") or [4]), "batch_size": 8, "val_fraction": 0.25}
    data.update({"num_classes": 3} if classify else {"target_shape": [1]})
    return {
        "name": name, "device": "cpu", "model": {"name": name}, "data": data,
        "loss": {"name": "cross_entropy" if classify else "mse"}, "optimizer": {"name": "sgd", "lr": 0.01},
        "train": {"max_steps": 1},
    }  # fmt: skip


class TinyRuns:
    """A run folder per model, trained in this process on first use (one step: well under a second)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.folders: dict[str, Path] = {}

    def __getitem__(self, name: str) -> Path:
        if name not in self.folders:
            config = config_from_dict(tiny_run_config(name), source=f"the tiny {name} config")
            result = execute_run(config, run_dir=self.root / name, quiet=True, tensorboard=False)
            assert result.status == "completed", result.error
            self.folders[name] = result.run_dir
        return self.folders[name]


@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory) -> TinyRuns:
    return TinyRuns(tmp_path_factory.mktemp("tiny_runs"))


def within(got: torch.Tensor, expected: torch.Tensor, tolerance: float = ROUND_TRIP) -> float:
    """The max abs difference, asserted within `tolerance` (times the outputs' magnitude above 1)."""
    assert got.shape == expected.shape
    diff = float((got - expected).abs().max())
    assert diff <= tolerance * max(1.0, float(expected.abs().max())), diff
    return diff


def load_and_run(fmt: str, path: Path, x: torch.Tensor) -> torch.Tensor:
    """The outputs of the exported file at `path` on `x`, through the format's own loader."""
    if fmt == "pt2":
        with torch.no_grad():
            return torch.export.load(path).module()(x)
    if fmt == "onnx":
        import onnxruntime

        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        assert [i.name for i in session.get_inputs()] == ["input"] and session.get_inputs()[0].shape[0] == "batch"
        return torch.from_numpy(session.run(["output"], {"input": x.numpy()})[0])
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), "pt") as file:
        config = json.loads(file.metadata()["config"])
    assert yaml.safe_load(path.with_name("config.yaml").read_text()) == config
    model = registries()["model"].build(config["model"]["name"], **{k: v for k, v in config["model"].items() if k != "name"})
    model.load_state_dict(load_file(str(path)))
    with torch.no_grad():
        return model.eval()(x)


def eager(run: Path, x: torch.Tensor, which: str | None = None) -> torch.Tensor:
    """The trained model's own outputs on `x` (eval mode, CPU)."""
    model = load_trained(run, which=which, device="cpu").built.model.eval()
    with torch.no_grad():
        return model(x)


def python_without(folder: Path, *distributions: str) -> Path:
    """A Python environment in `folder` with every package this one has except `distributions`
    (really not installed there: no files, no metadata), and trainer's console script if trainer
    is kept. Each top-level entry of site-packages is linked, bar the distributions' own."""
    venv.EnvBuilder(symlinks=True, with_pip=False).create(folder)
    left_out = {"..", *(Path(str(f)).parts[0] for name in distributions for f in importlib.metadata.distribution(name).files or [])}
    (target,) = folder.glob("lib/python*/site-packages")
    for source in site.getsitepackages():
        for entry in Path(source).iterdir():
            if entry.name not in left_out and not (target / entry.name).exists():
                (target / entry.name).symlink_to(entry)
    python = folder / "bin" / "python"
    if "trainer" not in distributions:
        script = Path(trainer_executable()).read_text().splitlines()
        (folder / "bin" / "trainer").write_text("\n".join([f"#!{python}", *script[1:]]) + "\n")
        (folder / "bin" / "trainer").chmod(0o755)
    return python


def clean_env() -> dict[str, str]:
    clean = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "TRAINER_DEBUG")}
    return {**clean, "OMP_NUM_THREADS": "1"}  # one thread, as the cli fixture's processes


def files_in(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# ---------------------------------------------------------------------------------------------
# every built-in model, every format, in process


def test_the_registry_has_the_built_in_models():
    assert {"linear_regression", "mlp", "two_layer_net", "lenet", "convnet", "scalar_root"} <= set(MODEL_NAMES)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("name", MODEL_NAMES)
def test_every_model_exports_and_round_trips(tiny_runs, tmp_path, name, fmt):
    run = tiny_runs[name]
    done = export_run(run, fmt=fmt, output=tmp_path / f"model.{fmt}")
    assert done.path == tmp_path / f"model.{fmt}" and done.format == fmt and done.model == name
    assert done.max_abs_diff <= done.limit and done.split == "val" and done.samples == 4
    assert done.input_shape == tuple(tiny_run_config(name)["data"]["input_shape"])
    # the file and config.yaml only: no temporary left beside them
    assert files_in(tmp_path) == (["config.yaml", "model.safetensors"] if fmt == "safetensors" else [f"model.{fmt}"])
    # 7 samples: neither the 2 the export traced nor the check's 4, so the batch dimension is dynamic
    x = torch.randn(7, *done.input_shape, generator=torch.Generator().manual_seed(1))
    within(load_and_run(fmt, done.path, x), eager(run, x))


def test_the_default_output_is_in_the_run_folder_and_an_existing_one_needs_force(tiny_runs, tmp_path):
    run = tiny_runs["mlp"]
    done = export_run(run, fmt="safetensors", which="last")
    assert done.path == run / "export" / "model.safetensors" and done.extra == [run / "export" / "config.yaml"]
    before = {p: p.read_bytes() for p in (done.path, *done.extra)}
    with pytest.raises(UsageError, match=r"model\.safetensors and .*config\.yaml already exist; add --force"):
        export_run(run, fmt="safetensors")
    assert {p: p.read_bytes() for p in before} == before
    inode = done.path.stat().st_ino
    again = export_run(run, fmt="safetensors", force=True)
    assert again.path.stat().st_ino != inode  # a new file, renamed over the old one
    x = torch.randn(3, *again.input_shape)
    within(load_and_run("safetensors", again.path, x), eager(run, x))
    assert files_in(run / "export") == ["config.yaml", "model.safetensors"]
    again.path.unlink()  # config.yaml alone may be someone else's file: kept too
    with pytest.raises(UsageError, match=r"config\.yaml already exists; add --force"):
        export_run(run, fmt="safetensors")
    assert files_in(run / "export") == ["config.yaml"]


def test_the_suffix_of_output_picks_the_format_and_a_contradiction_is_refused(tiny_runs, tmp_path):
    run = tiny_runs["linear_regression"]
    assert export_run(run, output=tmp_path / "deep" / "er" / "m.safetensors").format == "safetensors"
    assert export_run(run, output=tmp_path / "m.bin").format == "pt2"  # any other suffix: the default format
    with pytest.raises(UsageError, match=r"names a \.onnx file but --format is pt2"):
        export_run(run, fmt="pt2", output=tmp_path / "m.onnx")
    with pytest.raises(UsageError, match=r"unknown format 'tflite'; choose one of pt2, onnx, safetensors"):
        export_run(run, fmt="tflite")
    assert files_in(tmp_path) == ["deep", "m.bin"]


def test_a_run_without_validation_is_checked_on_its_one_training_sample(tmp_path):
    # the seed mlp config's shape: ONE sample, no validation split
    config = tiny_run_config("mlp")
    config["data"].update(size=1, batch_size=1, val_fraction=0)
    result = execute_run(config_from_dict(config, source="one sample"), run_dir=tmp_path / "run", quiet=True, tensorboard=False)
    done = export_run(result.run_dir, fmt="pt2")
    # the sample repeated to 3 rows: the export traces 2, the check runs 3
    assert (done.split, done.samples) == ("train", 3) and done.max_abs_diff <= done.limit
    x = torch.randn(1, *done.input_shape)
    within(load_and_run("pt2", done.path, x), eager(result.run_dir, x))  # and one row, below the traced 2


class Branchy(torch.nn.Module):
    """forward() branches on a tensor's value: torch.export cannot trace it for every input."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x) if x.sum() > 0 else -self.linear(x)


class Noisy(torch.nn.Module):
    """Dropout left on in eval mode (Monte Carlo dropout): never the same outputs twice."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.dropout(self.linear(x), 0.5, training=True)


@pytest.mark.parametrize("fmt", ["pt2", "onnx"])
def test_a_model_that_cannot_be_traced_is_one_line_and_nothing_is_written(tmp_path, fmt):
    with pytest.raises(UsageError) as caught:
        export_module(Branchy().eval(), torch.randn(5, 3), fmt, tmp_path / f"m.{fmt}", config={}, name="branchy")
    message = str(caught.value)
    assert message.startswith(f"model 'branchy' cannot be exported as {fmt}: ") and "data-dependent" in message
    assert "\n" not in message and "--format safetensors" in message
    assert files_in(tmp_path) == []


@pytest.mark.parametrize("fmt", ["pt2", "onnx"])
def test_an_export_that_differs_from_the_model_is_refused_and_nothing_is_written(tmp_path, fmt):
    with pytest.raises(ExportMismatch, match=rf"the {fmt} export of model 'noisy' gives outputs that differ .* nothing was written"):
        export_module(Noisy().eval(), torch.randn(5, 3), fmt, tmp_path / f"m.{fmt}", config={}, name="noisy")
    assert files_in(tmp_path) == []


def test_missing_onnx_packages_are_named_with_the_extra(tiny_runs, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # what an import of a package not installed meets
    with pytest.raises(UsageError) as caught:
        export_run(tiny_runs["mlp"], fmt="onnx", output=tmp_path / "m.onnx")
    assert str(caught.value) == (
        "--format onnx needs the ONNX packages, and onnxruntime cannot be imported here; "
        "install them with pip install 'trainer[export]'"
    )
    assert files_in(tmp_path) == []


# ---------------------------------------------------------------------------------------------
# the console script, on a real run of LeNet on the digits


class Shared:
    """What the console script did once per test session (not per xdist worker): the first worker
    to ask does it under a file lock in the folder the workers share; the others read its record."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def once(self, key: str, *commands: list[str], prepare=None) -> list[SimpleNamespace]:
        """Call `prepare(work folder)`, then run `trainer COMMAND` for each of `commands` in order,
        once: their exit codes and output."""
        from filelock import FileLock

        work = self.folder / "export_cli"
        record = self.folder / f"export_{key}.json"
        with FileLock(str(self.folder / f"export_{key}.lock")):
            if not record.exists():
                work.mkdir(exist_ok=True)
                if prepare is not None:
                    prepare(work)
                done = []
                for command in commands:
                    proc = subprocess.run(
                        [trainer_executable(), *command], cwd=work, capture_output=True, text=True, timeout=600,
                        env={**os.environ, "COLUMNS": "200", "OMP_NUM_THREADS": "1"},  # one thread, as the cli fixture's
                    )  # fmt: skip
                    done.append({"code": proc.returncode, "stdout": proc.stdout, "stderr": proc.stderr})
                record.write_text(json.dumps(done))
        return [SimpleNamespace(**r, output=r["stdout"] + r["stderr"], cwd=work) for r in json.loads(record.read_text())]


@pytest.fixture(scope="session")
def shared(tmp_path_factory) -> Shared:
    base = tmp_path_factory.getbasetemp()
    return Shared(base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base)


def train_lenet(work: Path) -> None:
    """configs/lenet.yaml with train.max_steps=2 into work/lenet_run, trained in this process as
    `trainer run` trains it: the exports of it are what the console script is tested on."""
    result = execute_run(load_config(CONFIGS / "lenet.yaml", ["train.max_steps=2"]), run_dir=work / "lenet_run", quiet=True)
    assert result.exit_code == 0, result.error


@pytest.fixture
def lenet_exports(shared):
    """LeNet on the digits for 2 steps (train_lenet), then `trainer export` of it in each format
    (pt2 by default, ONNX to --output, safetensors of --last): (run folder, {format: result})."""
    exports = shared.once(
        "lenet",
        ["export", "lenet_run"],
        ["export", "lenet_run", "--format", "onnx", "--output", "out/lenet.onnx"],
        ["export", "lenet_run", "--format", "safetensors", "--last"],
        prepare=train_lenet,
    )
    return exports[0].cwd / "lenet_run", dict(zip(FORMATS, exports))


def report_of(result) -> dict[str, str]:
    """The export's stderr report as {first word: rest of line}."""
    assert result.code == 0, result.output
    assert "Traceback" not in result.output and "warn" not in result.stderr.lower()
    lines = result.stderr.strip().splitlines()
    assert lines[0].startswith("exported model lenet from lenet_run/checkpoints/")
    return {line.split()[0]: line.split(None, 1)[1] for line in lines[1:]}


@pytest.mark.parametrize("fmt", FORMATS)
def test_the_console_script_exports_checks_and_reports(lenet_exports, fmt):
    run, results = lenet_exports
    result = results[fmt]
    report = report_of(result)
    path = {"pt2": "lenet_run/export/model.pt2", "onnx": "out/lenet.onnx", "safetensors": "lenet_run/export/model.safetensors"}[fmt]
    assert result.stdout == path + "\n"  # only the path on stdout, for $(trainer export RUN)
    assert report["format"].startswith(f"{fmt}: ")
    assert report["input"] == "(batch, 1, 32, 32) float32; the batch dimension is dynamic"
    diff, limit = re.fullmatch(r"on 5 samples of the val split: max abs difference (\S+) \(limit (\S+)\)", report["checked"]).groups()
    assert float(diff) <= float(limit) == 1e-4
    which = "last" if fmt == "safetensors" else "best"
    assert f"checkpoints/{which}.pt (step 2)" in result.stderr
    x = torch.rand(3, 1, 32, 32, generator=torch.Generator().manual_seed(2))
    within(load_and_run(fmt, result.cwd / path, x), eager(run, x, which))
    if fmt == "safetensors":
        assert report["beside"] == "lenet_run/export/config.yaml"
        assert yaml.safe_load((run / "export" / "config.yaml").read_text()) == yaml.safe_load((run / "config.yaml").read_text())


def test_a_folder_that_is_no_run_is_refused(cli, tmp_path):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("not a run\n")
    result = cli("export", "notes")
    assert result.code == 2 and result.stdout == ""
    assert result.stderr == "error: 'notes' holds no best.pt or last.pt; give a run folder or a checkpoint file\n"
    assert files_in(tmp_path / "notes") == ["todo.txt"]


def test_missing_onnx_packages_in_a_real_environment_without_them(tmp_path, tiny_runs):
    # a Python environment with everything this one has but onnx, onnxscript and onnxruntime
    python = python_without(tmp_path / "env", "onnx", "onnxscript", "onnxruntime")
    probe = "import importlib.util as u; print([u.find_spec(n) is None for n in ('onnx', 'onnxscript', 'onnxruntime', 'trainer')])"
    assert subprocess.run([python, "-c", probe], capture_output=True, text=True, env=clean_env()).stdout == "[True, True, True, False]\n"
    proc = subprocess.run(
        [tmp_path / "env" / "bin" / "trainer", "export", tiny_runs["mlp"], "--format", "onnx", "--output", tmp_path / "out" / "m.onnx"],
        capture_output=True, text=True, cwd=tmp_path, env=clean_env(),
    )  # fmt: skip
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr == (
        "error: --format onnx needs the ONNX packages, and onnx, onnxscript, onnxruntime cannot be imported here; "
        "install them with pip install 'trainer[export]'\n"
    )
    assert not (tmp_path / "out").exists()


NOISY_PLUGIN = '''
from torch import nn
from trainer import register_model


class NoisyNet(nn.Module):
    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.linear = nn.Linear(in_features, out_features)

    def forward(self, x):
        return nn.functional.dropout(self.linear(x), 0.5, training=True)  # Monte Carlo dropout


@register_model("noisy_net", input_shape=(4,))
def noisy_net(in_features: int = 4, out_features: int = 2) -> nn.Module:
    """A linear layer with dropout left on in eval mode."""
    return NoisyNet(in_features, out_features)
'''


def test_best_without_best_pt_is_refused_and_an_export_that_differs_from_the_model_exits_1(cli, tmp_path, write_config):
    (tmp_path / "noisy.py").write_text(NOISY_PLUGIN)
    # stopped after its first step, inside its first epoch: last.pt, and no best.pt yet
    config = write_config(tiny_config(model={"name": "noisy_net"}, train={"epochs": 5}))
    stopped = cli("run", config, "--plugins", "noisy.py", "--run-dir", "stopped", "-q", env={"TRAINER_STOP_AT_STEP": "1"})
    assert stopped.code == 143 and files_in(tmp_path / "stopped" / "checkpoints") == ["last.pt"], stopped.output

    result = cli("export", "stopped", "--best", "--plugins", "noisy.py")
    assert result.code == 2 and result.stdout == ""
    assert result.stderr.startswith("error: --best: 'stopped' has no best.pt yet") and "--last" in result.stderr

    # without --best: last.pt, whose model never gives the same outputs twice
    result = cli("export", "stopped", "--plugins", "noisy.py")
    assert result.code == 1 and result.stdout == "", result.output
    assert result.stderr.startswith("error: the pt2 export of model 'noisy_net' gives outputs that differ from the model's by ")
    assert "nothing was written" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert "export" not in files_in(tmp_path / "stopped")


def test_a_sigterm_mid_export_leaves_nothing_behind(cli, tmp_path):
    # SLOW_FORWARD: two seconds a forward, and checking the written file takes one
    result = stopped_mid_write(
        cli, tmp_path, "export", "run", "--format", "safetensors", "-o", "out/model.safetensors",
        pattern=".model.*.tmp*", signals=(signal.SIGTERM,),
    )  # fmt: skip
    assert result.code == 143, result.stderr
    assert result.stderr.strip().splitlines()[-1] == "stopped (SIGTERM) before its output was complete" and result.stdout == ""
    assert files_in(tmp_path / "out") == []  # no hidden temporaries, no model, no config.yaml


# ---------------------------------------------------------------------------------------------
# without trainer, and the docs


def doc_snippets() -> dict[str, str]:
    """The Python blocks of docs/export.md, by the format each loads."""
    blocks = re.findall(r"```python\n(.*?)```", (REPO / "docs" / "export.md").read_text(), re.DOTALL)
    kinds = {"pt2": "torch.export.load", "onnx": "onnxruntime", "safetensors": "safetensors"}
    found = {fmt: [b for b in blocks if marker in b] for fmt, marker in kinds.items()}
    assert all(len(b) == 1 for b in found.values()) and len(blocks) == 3, found
    return {fmt: b[0] for fmt, b in found.items()}


def with_path(snippet: str, fmt: str, path: Path) -> str:
    """The snippet with its example path replaced by `path`."""
    example = re.search(rf'"(runs/[^"]+/export/model\.{fmt})"', snippet)
    assert example, snippet
    return snippet.replace(example.group(1), str(path))


# runs each snippet in its own namespace and saves its x and logits for the test to compare
SNIPPET_RUNNER = """
import importlib.util, json, sys
import numpy as np
assert importlib.util.find_spec("trainer") is None, "trainer is importable"
results = {}
for name, code in json.loads(sys.argv[1]).items():
    space = {}
    exec(code, space)
    results[name] = {"x": np.asarray(space["x"]).tolist(), "logits": np.asarray(space["logits"].detach() if hasattr(space["logits"], "detach") else space["logits"]).tolist()}
assert not any(m == "trainer" or m.startswith("trainer.") for m in sys.modules), "trainer was imported"
print(json.dumps(results))
"""


def test_the_docs_pt2_and_onnx_snippets_run_without_trainer(tmp_path, lenet_exports):
    run, results = lenet_exports
    snippets = doc_snippets()
    code = {
        "pt2": with_path(snippets["pt2"], "pt2", run / "export" / "model.pt2"),
        "onnx": with_path(snippets["onnx"], "onnx", results["onnx"].cwd / "out" / "lenet.onnx"),
    }
    python = python_without(tmp_path / "env", "trainer")
    # -I: no PYTHONPATH, no user site, no current folder on sys.path (and the folder is not the repo)
    proc = subprocess.run([python, "-I", "-c", SNIPPET_RUNNER, json.dumps(code)], capture_output=True, text=True, cwd=tmp_path, env=clean_env())
    assert proc.returncode == 0, proc.stderr
    for result in json.loads(proc.stdout).values():
        x = torch.tensor(result["x"])
        assert x.shape == (3, 1, 32, 32)
        within(torch.tensor(result["logits"]), eager(run, x))


def test_the_docs_safetensors_snippet_runs(lenet_exports):
    run, _ = lenet_exports
    space: dict = {}
    exec(with_path(doc_snippets()["safetensors"], "safetensors", run / "export" / "model.safetensors"), space)
    assert space["logits"].shape == (3, 10)
    within(space["logits"].detach(), eager(run, space["x"], "last"))


def test_command_line_docs_link_the_export_page():
    text = (REPO / "docs" / "command-line.md").read_text()
    assert "trainer export RUN" in text and "(export.md)" in text
