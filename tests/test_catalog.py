"""`trainer runs` and `trainer compare` on real run folders (completed and failed runs trained in
process, one killed outright through the console script), a folder that is not a run, and synthetic
folders for the many edge cases."""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import trainer_executable

from trainer import catalog
from trainer.config import load_config
from trainer.errors import UsageError
from trainer.runs import execute_run

BASE = {
    "name": "tiny",
    "model": {"name": "mlp", "hidden": 4},
    "data": {"name": "random", "size": 32, "input_shape": [4], "num_classes": 3, "batch_size": 8, "val_fraction": 0.25},
    "loss": {"name": "cross_entropy"},
    "optimizer": {"name": "sgd", "lr": 0.1},
    "train": {"epochs": 2, "log_every": 1},
}
# each run made once per test session: (overrides, environment)
MADE = {
    "plain": (["optimizer.lr=0.1"], {}),
    "accuracy": (["optimizer.lr=0.5", "train.monitor=val_accuracy"], {}),
    # lr 1e30 makes the loss non-finite at step 2: a run that fails while training
    "failed": (["optimizer.lr=1e30"], {}),
    # killed outright at step 5, after the save at step 4: no summary.json
    "killed": (["train.epochs=50", "train.checkpoint_every=2"], {"TRAINER_STOP_AT_STEP": "5:SIGKILL"}),
}


@pytest.fixture(scope="session")
def made(tmp_path_factory):
    """A runs folder with the MADE runs (runs/tiny/<timestamp>), a sweep's trial nested a level
    deeper (a copy of `plain`), and two folders that are not runs. Made once per test session,
    not per xdist worker: the first worker makes it under a file lock, the others read its record.
    Tests only read it; a test that changes a run copies it first.

    The runs that end by themselves train in this process, as `trainer run` does (execute_run):
    what is tested here is reading their folders, and each process start costs a torch import. The
    killed one is a real `trainer run` process, killed with SIGKILL."""
    from filelock import FileLock

    shared = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        shared = shared.parent
    work, record = shared / "catalog_runs", shared / "catalog_runs.json"
    with FileLock(str(shared / "catalog_runs.lock")):
        if not record.exists():
            work.mkdir()
            (work / "base.yaml").write_text(yaml.safe_dump(BASE, sort_keys=False))
            folders, outcomes = {}, {}
            for name, (overrides, env) in MADE.items():
                if name == "killed":  # a real process, killed outright: its folder is the newest
                    proc = subprocess.run(
                        [trainer_executable(), "run", "base.yaml", *overrides, "-q"], cwd=work, capture_output=True, text=True,
                        timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1", **env},
                    )  # fmt: skip
                    outcomes[name] = [proc.returncode, proc.stderr]
                    folders[name] = _newest(work / "runs" / "tiny")
                else:
                    result = execute_run(load_config(work / "base.yaml", overrides), root=work / "runs", quiet=True)
                    outcomes[name] = [result.exit_code, result.error]
                    folders[name] = str(result.run_dir.relative_to(work))
            trial = work / "runs" / "mysweep" / "trial-0000"
            shutil.copytree(work / folders["plain"], trial)
            (work / "runs" / "mysweep" / "sweep.yaml").write_text("config: base.yaml\n")
            folders["trial"] = "runs/mysweep/trial-0000"
            (work / "runs" / "notes").mkdir()
            (work / "runs" / "notes" / "README.txt").write_text("not a run\n")
            (work / "runs" / "half").mkdir()  # config.yaml alone: not a run either
            (work / "runs" / "half" / "config.yaml").write_text(yaml.safe_dump(BASE))
            record.write_text(json.dumps({"folders": folders, "outcomes": outcomes}))
    loaded = json.loads(record.read_text())
    assert [code for code, _ in loaded["outcomes"].values()] == [0, 0, 1, -9], loaded["outcomes"]
    return {"work": work, "root": work / "runs", **{k: work / v for k, v in loaded["folders"].items()}}


def _newest(parent: Path) -> str:
    newest = max(parent.iterdir(), key=lambda p: p.stat().st_mtime_ns)
    return str(newest.relative_to(parent.parent.parent))


def rows_by_name(output: str) -> dict[str, dict]:
    return {row["name"]: row for row in json.loads(output)}


def name_of(made, key: str) -> str:
    return made[key].relative_to(made["root"]).as_posix()


# ---------------------------------------------------------------------------------------------
# trainer runs, through the console script


def test_runs_lists_each_run_with_its_status_and_skips_folders_that_are_not_runs(cli, made):
    result = cli("runs", "--json", cwd=made["work"])  # ROOT defaults to runs
    assert result.code == 0, result.output
    rows = rows_by_name(result.stdout)
    assert set(rows) == {name_of(made, k) for k in ("plain", "accuracy", "failed", "killed", "trial")}
    assert rows[name_of(made, "trial")]["name"] == "mysweep/trial-0000"  # nested a level deeper
    assert {k: rows[name_of(made, k)]["status"] for k in ("plain", "accuracy", "failed", "killed")} == {
        "plain": "completed", "accuracy": "completed", "failed": "failed", "killed": "interrupted",
    }  # fmt: skip
    plain, failed, killed = (rows[name_of(made, k)] for k in ("plain", "failed", "killed"))
    assert (plain["epochs"], plain["steps"]) == (2, 6)  # 24 training samples, batch 8, 2 epochs
    assert plain["monitor"] == "val_loss" and plain["best_value"] == pytest.approx(plain["best"]["val_loss"])
    assert plain["wall_time_s"] > 0
    assert "not finite" in failed["error"]
    # killed at step 5: what is known comes from the tail of metrics.jsonl (flushed at the save of step 4)
    assert killed["steps"] in (4, 5) and killed["best"] == {} and "summary.json" in killed["error"]
    # the keys that differ among the listed runs, and only those
    assert set(plain["config"]) == {"optimizer.lr", "train.epochs", "train.checkpoint_every", "train.monitor"}
    assert [rows[name_of(made, k)]["config"]["optimizer.lr"] for k in ("plain", "accuracy", "failed")] == [0.1, 0.5, 1e30]
    listed = json.loads(result.stdout)  # sorted by start time by default
    assert [r["started"] for r in listed] == sorted(r["started"] for r in listed)


def test_runs_prints_a_table_with_the_differing_keys_as_columns(cli, made):
    result = cli("runs", made["root"])
    assert result.code == 0, result.output
    lines = result.stdout.splitlines()
    heading = lines[0].split()
    assert heading[:5] == ["run", "started", "status", "epochs", "steps"] and "optimizer.lr" in heading
    assert len(lines) == 6 and "Traceback" not in result.output
    row = next(line for line in lines if line.startswith(name_of(made, "failed")))
    assert " failed " in row and "1e+30" in row
    assert "notes" not in result.stdout and "half" not in result.stdout
    assert "\x1b[" not in result.stdout  # no colours in a pipe


def test_runs_sorts_by_a_metric_best_first_by_a_column_and_by_a_config_key(cli, made):
    by_accuracy = json.loads(cli("runs", made["root"], "--sort", "val_accuracy", "--json").stdout)
    accuracies = [r["best"]["val_accuracy"] for r in by_accuracy if "val_accuracy" in r["best"]]
    assert accuracies == sorted(accuracies, reverse=True) and by_accuracy[-1]["best"] == {}  # unknown last
    by_lr = json.loads(cli("runs", made["root"], "--sort", "optimizer.lr", "--json").stdout)
    assert [r["config"]["optimizer.lr"] for r in by_lr] == sorted(r["config"]["optimizer.lr"] for r in by_lr)
    wrong = cli("runs", made["root"], "--sort", "val_acuracy")
    assert wrong.code == 2 and wrong.stdout == ""
    assert "--sort" in wrong.stderr and "val_acuracy" in wrong.stderr
    for accepted in ("started", "wall_time", "val_accuracy", "optimizer.lr"):
        assert accepted in wrong.stderr
    assert "Traceback" not in wrong.stderr


def test_runs_filters_by_status_and_names_the_accepted_ones(cli, made):
    two = json.loads(cli("runs", made["root"], "--status", "failed,interrupted", "--json").stdout)
    assert sorted((r["status"], r["name"]) for r in two) == [("failed", name_of(made, "failed")), ("interrupted", name_of(made, "killed"))]
    none = cli("runs", made["root"], "--status", "running")
    assert none.code == 0 and "no running runs under" in none.stdout and "5 run(s) in all" in none.stdout
    wrong = cli("runs", made["root"], "--status", "crashed")
    assert wrong.code == 2 and "'crashed'" in wrong.stderr
    assert "completed, failed, interrupted, pruned, running, unreadable" in wrong.stderr


def test_runs_writes_csv(cli, made):
    result = cli("runs", made["root"], "--csv", "--sort", "name")
    assert result.code == 0, result.output
    rows = list(csv.DictReader(io.StringIO(result.stdout)))
    assert [r["name"] for r in rows] == sorted(r["name"] for r in rows) and len(rows) == 5
    failed = next(r for r in rows if r["status"] == "failed")
    assert failed["optimizer.lr"] == "1e+30" and "not finite" in failed["error"]
    assert {"monitor", "best", "wall_time_s", "train.monitor"} <= set(rows[0])
    both = cli("runs", made["root"], "--csv", "--json")
    assert both.code == 2 and "--json and --csv" in both.stderr


def test_runs_on_a_missing_or_empty_root(cli, tmp_path):
    missing = cli("runs", tmp_path / "nowhere")
    assert missing.code == 2 and "nowhere" in missing.stderr and "does not exist" in missing.stderr
    assert "Traceback" not in missing.stderr
    (tmp_path / "empty").mkdir()
    empty = cli("runs", tmp_path / "empty")
    assert empty.code == 0 and empty.stdout.strip() == f"no runs under {tmp_path / 'empty'}"
    assert cli("runs", tmp_path / "empty", "--json").stdout.strip() == "[]"
    (tmp_path / "file").write_text("x")
    with pytest.raises(UsageError, match="is a file, not a folder"):
        catalog.list_runs(tmp_path / "file")


def test_runs_lists_a_corrupt_run_as_unreadable_without_failing(cli, made, tmp_path):
    root = tmp_path / "runs"
    shutil.copytree(made["plain"], root / "broken-summary")
    shutil.copytree(made["plain"], root / "broken-config")
    shutil.copytree(made["plain"], root / "fine")
    (root / "broken-summary" / "summary.json").write_text('{"status": "compl')
    (root / "broken-config" / "config.yaml").write_text("model: {name: [\n")
    result = cli("runs", root, "--json")
    assert result.code == 0, result.output
    rows = rows_by_name(result.stdout)
    assert rows["broken-summary"]["status"] == "unreadable" and "summary.json" in rows["broken-summary"]["error"]
    assert rows["broken-config"]["status"] == "unreadable" and "config.yaml" in rows["broken-config"]["error"]
    assert rows["fine"]["status"] == "completed"


def test_runs_shows_a_live_run_as_running_without_disturbing_it(cli, made, tmp_path):
    from trainer.runs import lock_run_folder

    folder = tmp_path / "runs" / "live"
    shutil.copytree(made["killed"], folder)
    # a process holding the run folder's lock as trainer run does
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys; from trainer.runs import lock_run_folder; lock_run_folder(sys.argv[1]); "
         "print('locked', flush=True); sys.stdin.read()", str(folder)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "locked"
        result = cli("runs", tmp_path / "runs", "--json")
        assert json.loads(result.stdout)[0]["status"] == "running"
        with pytest.raises(UsageError, match="in use by another trainer process"):
            os.close(lock_run_folder(folder))  # the lock is still the live run's
        assert holder.poll() is None
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)
    assert json.loads(cli("runs", tmp_path / "runs", "--json").stdout)[0]["status"] == "interrupted"


def test_runs_imports_no_torch(made):
    out = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "trainer", "runs", str(made["root"]), "--sort", "val_loss"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    imported = {line.split("|")[-1].strip() for line in out.stderr.splitlines() if line.startswith("import time:")}
    assert "trainer.catalog" in imported and "yaml" in imported
    assert not {m for m in imported if m.split(".")[0] in ("torch", "numpy", "torchvision", "tensorboard")}
    assert name_of(made, "plain") in out.stdout


# ---------------------------------------------------------------------------------------------
# trainer compare, through the console script


def compare_rows(output: str) -> dict[str, list[str]]:
    """Each printed row by its first cell (two spaces or more separate the cells)."""
    import re

    rows = {}
    for line in output.splitlines():
        cells = re.split(r"\s{2,}", line.strip())
        if len(cells) > 1:
            rows.setdefault(cells[0], cells[1:])
    return rows


def test_compare_shows_the_config_diff_and_marks_the_better_metric(cli, made):
    result = cli("compare", made["plain"], made["accuracy"])
    assert result.code == 0, result.output
    rows = compare_rows(result.stdout)
    assert "2 key(s) differ" in result.stdout
    assert rows["optimizer.lr"] == ["0.1", "0.5"] and rows["train.monitor"] == ["null", "val_accuracy"]
    assert "model.hidden" not in rows  # the same in both
    plain, accuracy = (json.loads((made[k] / "summary.json").read_text()) for k in ("plain", "accuracy"))
    # lower is better for a loss, higher for an accuracy: the better side carries the '*'
    for kind, metric, better in [("best", "val_loss", min), ("final", "train_loss", min), ("best", "val_accuracy", max)]:
        values = [plain[kind][metric], accuracy[kind][metric]]
        cells = rows[f"{kind} {metric}"]
        if values[0] == values[1]:
            assert not any(c.endswith("*") for c in cells)
        else:
            assert [c.endswith(" *") for c in cells] == [v == better(values) for v in values], (metric, values, cells)
    assert rows["monitor"] == ["val_loss (min)", "val_accuracy (max)"]
    assert rows["status"] == ["completed", "completed"]


def test_compare_a_failed_and_a_killed_run_and_a_missing_key(cli, made, tmp_path):
    edited = tmp_path / "edited"
    shutil.copytree(made["plain"], edited)
    config = yaml.safe_load((edited / "config.yaml").read_text())
    del config["train"]["log_every"]
    config["scheduler"] = {"name": "cosine"}
    (edited / "config.yaml").write_text(yaml.safe_dump(config))
    result = cli("compare", made["failed"], made["killed"], edited)
    assert result.code == 0, result.output
    rows = compare_rows(result.stdout)
    assert rows["status"] == ["failed", "interrupted", "completed"]
    assert rows["train.log_every"] == ["1", "1", "(missing)"]
    assert rows["scheduler.name"] == ["(missing)", "(missing)", "cosine"]
    assert rows["optimizer.lr"] == ["1e+30", "0.1", "0.1"]


def test_compare_refuses_a_folder_that_is_not_a_run_and_a_single_run(cli, made):
    notes = cli("compare", made["plain"], made["root"] / "notes")
    assert notes.code == 2 and str(made["root"] / "notes") in notes.stderr
    assert "not a run folder" in notes.stderr and "config.yaml and env.json" in notes.stderr
    one = cli("compare", made["plain"])
    assert one.code == 2 and "two run folders or more" in one.stderr
    assert all("Traceback" not in r.stderr for r in (notes, one))
    with pytest.raises(UsageError, match="trial-0000"):  # a sweep's folder: the runs it holds are named
        catalog.compare_runs([made["plain"], made["root"] / "mysweep"])
    with pytest.raises(UsageError, match="does not exist"):
        catalog.compare_runs([made["plain"], made["root"] / "gone"])


# ---------------------------------------------------------------------------------------------
# catalog.py on synthetic folders


def write_run(folder: Path, config: dict | str, summary: dict | None = None, env: dict | None = None, metrics: list | None = None) -> Path:
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text(config if isinstance(config, str) else yaml.safe_dump(config, sort_keys=False))
    (folder / "env.json").write_text(json.dumps(env or {"started": "2026-12-01T10:15:00+00:00"}))
    if summary is not None:
        (folder / "summary.json").write_text(json.dumps(summary))
    if metrics is not None:
        (folder / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics))
    return folder


def summary_of(status="completed", **best) -> dict:
    return {"status": status, "error": None, "final": dict(best), "best": dict(best), "steps": 10, "epochs": 2, "wall_time_s": 1.5}


def test_flatten_and_differing_keys():
    a = catalog.flatten({"model": {"name": "mlp", "hidden": [8, 8]}, "scheduler": None, "train": {"ema": {}}})
    assert a == {"model.name": "mlp", "model.hidden": [8, 8], "scheduler": None, "train.ema": {}}
    b = {**a, "model.hidden": [8, 16], "seed": 1}
    c = {**a, "seed": 1.0}
    assert catalog.differing_keys([a, a]) == []
    assert catalog.differing_keys([a, b, c]) == ["model.hidden", "seed"]  # a list, and a key one run lacks
    assert catalog.differing_keys([{"x": 1}, {"x": 1.0}, {"x": True}]) == ["x"]  # three settings, not one


def test_parse_config_by_sections_equals_a_whole_parse():
    texts = [
        "name: a\nseed: 0\nmodel: {name: mlp, hidden: 8}\ntrain: {epochs: 2, max_steps: null,\n  monitor: null}\n",
        "# a comment\n\nname: a\ndata:\n  name: tensors\n  x:\n  - [1.0]\n  - [2.0]\n",
        "base: &b {lr: 0.1}\noptimizer: *b\n",  # an alias: parsed whole
        "name: a\nname: b\n",  # a repeated key: the last one, as PyYAML has it
    ]
    for text in texts:
        assert catalog.parse_config(text) == catalog.flatten(yaml.safe_load(text)), text
    with pytest.raises(yaml.YAMLError):
        catalog.parse_config("model: {name: [\n")
    with pytest.raises(TypeError):
        catalog.parse_config("- a\n- b\n")


def test_read_run_statuses_from_summary_lock_and_metrics(tmp_path):
    config = {"data": {"val_fraction": 0.2}, "train": {"monitor": None, "mode": None}}
    done = catalog.read_run(write_run(tmp_path / "done", config, summary_of(val_loss=0.5, val_accuracy=0.9)))
    assert (done.status, done.monitor, done.mode, done.best_value, done.steps) == ("completed", "val_loss", "min", 0.5, 10)
    stopped = catalog.read_run(write_run(tmp_path / "stopped", config, {**summary_of(train_loss=1.0), "status": "interrupted", "error": "stopped by SIGTERM after step 3"}))
    assert stopped.status == "interrupted" and "SIGTERM" in stopped.error
    metrics = [{"step": 3, "epoch": 1, "split": "train", "loss": 1.0, "time": 1796119200.0},
               {"step": 4, "epoch": 1, "split": "val", "loss": 0.9, "time": 1796119210.0}]  # fmt: skip
    killed = write_run(tmp_path / "killed", config, None, {"started": "2026-12-01T10:00:00+00:00"}, metrics)
    with open(killed / "metrics.jsonl", "a") as file:
        file.write('{"step": 5, "epo')  # half a line, as a kill mid-write leaves
    row = catalog.read_run(killed)
    assert (row.status, row.steps, row.epochs, row.monitor) == ("interrupted", 4, 1, "val_loss")
    assert row.wall_time_s == pytest.approx(1796119210.0 - 1796119200.0 + (1796119200.0 - 1796119200.0))
    pruned = catalog.read_run(write_run(tmp_path / "pruned", config, {**summary_of(val_loss=0.7), "status": "pruned", "error": "pruned after epoch 1"}))
    assert (pruned.status, pruned.error, pruned.best_value) == ("pruned", "pruned after epoch 1", 0.7)  # a sweep's pruner stopped it
    odd = catalog.read_run(write_run(tmp_path / "odd", config, {**summary_of(), "status": "exploded"}))
    assert odd.status == "unreadable" and "exploded" in odd.error
    listed = write_run(tmp_path / "list", "- 1\n", summary_of())
    assert catalog.read_run(listed).status == "unreadable" and "config.yaml" in catalog.read_run(listed).error
    (tmp_path / "noenv").mkdir()
    assert not catalog.is_run_folder(tmp_path / "noenv")


def test_a_summary_older_than_the_last_resume_is_not_the_status(tmp_path):
    env = {"started": "2026-12-01T10:00:00+00:00", "resumes": [{"step": 4, "time": "2026-12-01T11:00:00+00:00"}]}
    folder = write_run(tmp_path / "resumed", {}, summary_of(status="failed", train_loss=1.0), env)
    os.utime(folder / "summary.json", (1_000_000, 1_000_000))
    os.utime(folder / "env.json", (1_000_100, 1_000_100))  # the resume started after the summary was written
    assert catalog.read_run(folder).status == "interrupted"
    os.utime(folder / "summary.json", (1_000_200, 1_000_200))  # and ended with a summary of its own
    assert catalog.read_run(folder).status == "failed"


def test_sorting_puts_unknown_values_last_and_refuses_unknown_names(tmp_path):
    for name, lr, loss in [("a", 0.1, 0.5), ("b", 0.01, None), ("c", 1.0, 0.2)]:
        best = {"val_loss": loss} if loss is not None else {}
        write_run(tmp_path / name, {"optimizer": {"lr": lr}, "data": {"val_fraction": 0.2}}, summary_of(**best))
    table = catalog.list_runs(tmp_path, sort="val_loss")
    assert [r.name for r in table.runs] == ["c", "a", "b"]
    assert [r.name for r in catalog.list_runs(tmp_path, sort="best").runs] == ["c", "a", "b"]
    assert [r.name for r in catalog.list_runs(tmp_path, sort="optimizer.lr").runs] == ["b", "a", "c"]
    with pytest.raises(UsageError, match="accepted: name, started"):
        catalog.list_runs(tmp_path, sort="loss")
    with pytest.raises(UsageError, match="unknown status 'done'"):
        catalog.list_runs(tmp_path, status="done")


def test_better_marks_the_lower_loss_the_higher_accuracy_and_ties():
    assert catalog.better([0.5, 0.2, 0.3], "min") == {1}
    assert catalog.better([0.5, 0.9, 0.9], "max") == {1, 2}
    assert catalog.better([0.5, 0.5], "min") == set()  # nothing is better
    assert catalog.better([0.5, None, catalog.MISSING], "min") == set()  # one value: nothing to compare
    assert catalog.better([float("nan"), 0.3, 0.4], "min") == {1}
    assert catalog.metric_mode("val_accuracy") == "max" and catalog.metric_mode("val_loss") == "min"


def test_compare_follows_train_mode_for_the_monitored_metric(tmp_path):
    # a run that monitors val_loss with mode max (a made-up metric's sense): compare follows the config
    config = {"train": {"monitor": "val_loss", "mode": "max"}}
    a = write_run(tmp_path / "a", config, summary_of(val_loss=0.5))
    b = write_run(tmp_path / "b", config, summary_of(val_loss=0.7))
    comparison = catalog.compare_runs([a, b])
    assert ("best", "val_loss", [0.5, 0.7], {1}) in comparison.metrics
    assert comparison.keys == [] and comparison.labels == ["a", "b"]


def test_the_terminal_table_keeps_the_keys_that_fit_and_names_the_rest(tmp_path):
    for i in range(3):
        write_run(tmp_path / f"r{i}", {"optimizer": {"lr": 0.1 * (i + 1)}, "model": {"hidden": 2**i, "name": f"a-long-model-name-{i}"}}, summary_of(val_loss=i))
    table = catalog.list_runs(tmp_path)
    wide, note = catalog.runs_grid(table)
    assert wide.headings[7:] == ["optimizer.lr", "model.hidden", "model.name"] and note is None
    narrow, note = catalog.runs_grid(table, width=wide.width() - 5)
    assert narrow.headings[7:] == ["optimizer.lr", "model.hidden"] and narrow.width() <= wide.width() - 5
    assert "1 more config key(s) differ (model.name)" in note
    text = narrow.text().plain.splitlines()
    assert len(text) == 4 and text[1].startswith("r0  ") and "0.30000000000000004" in text[3]


def test_the_benchmark_generates_folders_the_table_reads(tmp_path):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    try:
        import runs_table
    finally:
        sys.path.pop(0)
    runs_table.make_runs(tmp_path, 20)
    table = catalog.list_runs(tmp_path)
    assert len(table.runs) == 20 and {r.status for r in table.runs} == {"completed", "failed", "interrupted"}
    assert "optimizer.lr" in table.keys and all(r.status != "unreadable" for r in table.runs)
