"""Tests for trainer.tracking: real files in tmp_path, read back with TensorBoard's own reader."""

from __future__ import annotations

import io
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from rich.console import Console

from trainer.tracking import Tracker, format_metric, format_seconds

ANSI = re.compile(r"\x1b\[")

HEADER = dict(
    name="demo",
    device="cpu",
    device_reason="no CUDA or MPS device found",
    model="lenet",
    num_params=61706,
    data="digits: 1,437 train / 360 val",
    epochs=2,
    steps_per_epoch=4,
    total_steps=8,
    batch_size=64,
)


def plain_console() -> tuple[Console, io.StringIO]:
    buf = io.StringIO()
    return Console(file=buf, force_terminal=False, width=100), buf


def live_console() -> tuple[Console, io.StringIO]:
    buf = io.StringIO()
    return Console(file=buf, force_terminal=True, width=100), buf


def simulate(tracker: Tracker, run_dir: Path | None, epochs: int = 2, steps: int = 4) -> None:
    """What the engine does: log every 2 steps, validate at each epoch end."""
    tracker.run_started(run_dir=run_dir, **HEADER)
    step = 0
    for epoch in range(1, epochs + 1):
        tracker.epoch_started(epoch=epoch, epochs=epochs, steps=steps)
        for i in range(1, steps + 1):
            step += 1
            if i % 2 == 0:
                tracker.log_train(
                    step=step, epoch=epoch, step_in_epoch=i, loss=1.0 / step, lr=0.05,
                    samples_per_s=1234.5,
                )
        val = {"loss": 0.5 / epoch, "accuracy": 0.9 + epoch / 100}
        tracker.log_val(step=step, epoch=epoch, metrics=val)
        tracker.epoch_finished(
            epoch=epoch, epochs=epochs, step=step, train_loss=1.0 / step, val=val, seconds=1.5
        )
    tracker.log_hparams(
        {"optimizer.lr": 0.05, "model.name": "lenet", "train.grad_clip": None,
         "train.epochs": 2, "data.shuffle": True, "data.input_shape": [1, 32, 32]},
        {"best/val_loss": 0.25, "best/val_accuracy": 0.92},
    )
    tracker.finished(
        status="completed", run_dir=run_dir, best={"val_loss": 0.25, "val_accuracy": 0.92},
        final={"train_loss": 0.125, "val_loss": 0.25}, steps=step, epochs=epochs, seconds=3.0,
    )


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def accumulator(run_dir: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir))
    acc.Reload()
    return acc


def test_metrics_jsonl_lines_in_order(tmp_path: Path) -> None:
    console, _ = plain_console()
    with Tracker(tmp_path, console=console) as tracker:
        simulate(tracker, tmp_path)
    records = read_jsonl(tmp_path / "metrics.jsonl")
    assert [(r["split"], r["step"], r["epoch"]) for r in records] == [
        ("train", 2, 1), ("train", 4, 1), ("val", 4, 1),
        ("train", 6, 2), ("train", 8, 2), ("val", 8, 2),
    ]
    assert list(records[0]) == ["step", "epoch", "split", "loss", "lr", "samples_per_s", "time"]
    assert list(records[2]) == ["step", "epoch", "split", "loss", "accuracy", "time"]
    assert records[0]["loss"] == 0.5 and records[0]["lr"] == 0.05
    assert records[2]["accuracy"] == pytest.approx(0.91)
    assert all(isinstance(r["time"], float) for r in records)


def test_jsonl_appends_and_non_finite_is_null(tmp_path: Path) -> None:
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n')
    with Tracker(tmp_path, console=plain_console()[0], tensorboard=False) as tracker:
        tracker.log_train(step=2, epoch=1, step_in_epoch=2, loss=float("nan"), lr=0.1,
                          samples_per_s=10.0)
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert lines[0] == '{"step": 1}'
    assert "NaN" not in lines[1]  # strict JSON, readable by jq and friends
    assert json.loads(lines[1])["loss"] is None
    assert not list(tmp_path.glob("events.out.tfevents.*"))


def test_tensorboard_scalars_and_hparams_in_run_folder(tmp_path: Path) -> None:
    with Tracker(tmp_path, console=plain_console()[0]) as tracker:
        simulate(tracker, tmp_path)
    assert [p for p in tmp_path.iterdir() if p.is_dir()] == []  # no add_hparams sub-folder
    assert len(list(tmp_path.glob("events.out.tfevents.*"))) == 1

    acc = accumulator(tmp_path)
    scalars = set(acc.Tags()["scalars"])
    assert {"train/loss", "val/loss", "val/accuracy", "lr", "samples_per_s",
            "best/val_loss", "best/val_accuracy"} <= scalars

    def series(tag: str) -> list[tuple[int, float]]:
        return [(e.step, e.value) for e in acc.Scalars(tag)]

    assert series("train/loss") == [(s, pytest.approx(1.0 / s)) for s in (2, 4, 6, 8)]
    assert series("lr") == [(s, pytest.approx(0.05)) for s in (2, 4, 6, 8)]
    assert series("samples_per_s") == [(s, pytest.approx(1234.5)) for s in (2, 4, 6, 8)]
    assert series("val/loss") == [(4, pytest.approx(0.5)), (8, pytest.approx(0.25))]
    assert series("val/accuracy") == [(4, pytest.approx(0.91)), (8, pytest.approx(0.92))]
    assert series("best/val_loss") == [(8, pytest.approx(0.25))]

    from tensorboard.plugins.hparams import api_pb2, metadata

    content = acc.PluginTagToContent("hparams")
    assert metadata.SESSION_START_INFO_TAG in content
    start = metadata.parse_session_start_info_plugin_data(content[metadata.SESSION_START_INFO_TAG])
    assert start.hparams["optimizer.lr"].number_value == pytest.approx(0.05)
    assert start.hparams["model.name"].string_value == "lenet"
    assert start.hparams["train.grad_clip"].string_value == "None"
    assert start.hparams["data.shuffle"].string_value == "True"
    assert start.hparams["data.input_shape"].string_value == "[1, 32, 32]"
    end = metadata.parse_session_end_info_plugin_data(content[metadata.SESSION_END_INFO_TAG])
    assert end.status == api_pb2.Status.Value("STATUS_SUCCESS")


def test_plain_lines_are_bounded_in_rate_but_each_epoch_ends_with_one(tmp_path: Path) -> None:
    console, buf = plain_console()
    with Tracker(tmp_path, console=console, plain_interval=3600) as tracker:
        simulate(tracker, tmp_path)
    train_lines = [line for line in buf.getvalue().splitlines() if "samples/s" in line]
    # the first point, then nothing for an hour, except each epoch's last point
    assert [line.split("  loss")[0] for line in train_lines] == [
        "epoch 1/2  step 2/4", "epoch 1/2  step 4/4", "epoch 2/2  step 4/4"
    ]
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len([r for r in rows if r["split"] == "train"]) == 4  # the files still get every point


def test_plain_mode_prints_a_line_per_log_without_ansi(tmp_path: Path) -> None:
    console, buf = plain_console()
    with Tracker(tmp_path, console=console, plain_interval=0) as tracker:
        simulate(tracker, tmp_path)
    out = buf.getvalue()
    assert not ANSI.search(out)
    train_lines = [line for line in out.splitlines() if "samples/s" in line]
    assert len(train_lines) == 4
    assert train_lines[0] == "epoch 1/2  step 2/4  loss 0.5  lr 0.05  1,234 samples/s"
    epoch_lines = [line for line in out.splitlines() if line.startswith("epoch") and "train loss" in line]
    assert epoch_lines == [
        "epoch 1/2  train loss 0.25  val loss 0.5  val accuracy 91.00%  1.5s",
        "epoch 2/2  train loss 0.125  val loss 0.25  val accuracy 92.00%  1.5s",
    ]
    assert "cpu: no CUDA or MPS device found" in out
    assert "61,706 parameters" in out
    assert f"completed: {tmp_path}" in out
    assert "tensorboard --logdir" in out


def test_live_mode_runs_and_shows_final_panel(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    run_dir = Path("runs/demo/20240101-000000")
    console, buf = live_console()
    tracker = Tracker(run_dir, console=console, refresh_per_second=20)
    assert tracker.live
    simulate(tracker, run_dir)
    tracker.close()
    out = buf.getvalue()
    assert "run completed" in out
    assert str(run_dir) in out
    assert "tensorboard --logdir runs" in out
    assert "92.00%" in out
    assert (tmp_path / run_dir / "metrics.jsonl").exists()


def test_live_mode_close_mid_epoch_stops_progress(tmp_path: Path) -> None:
    console, _ = live_console()
    with pytest.raises(RuntimeError):
        with Tracker(tmp_path, console=console) as tracker:
            tracker.epoch_started(epoch=1, epochs=1, steps=10)
            tracker.log_train(step=1, epoch=1, step_in_epoch=1, loss=1.0, lr=0.1, samples_per_s=5)
            raise RuntimeError("boom")
    assert tracker._progress is None
    assert not console._live_stack  # no Live display left attached to the console


def test_quiet_prints_only_errors(tmp_path: Path) -> None:
    console, buf = live_console()  # quiet wins over a terminal
    with Tracker(tmp_path, console=console, quiet=True) as tracker:
        tracker.message("just chatter")
        tracker.message("something broke", style="error")
        simulate(tracker, tmp_path)
    lines = buf.getvalue().splitlines()
    # the CLI prints the run folder itself; quiet leaves only the error
    assert len(lines) == 1
    assert "something broke" in lines[0]
    assert (tmp_path / "metrics.jsonl").exists()  # files still written


def test_message_prints_text_verbatim(tmp_path: Path) -> None:
    console, buf = plain_console()
    tracker = Tracker(None, console=console)
    tracker.message("shape [1, 32, 32] is [bold]fine[/bold]", style="no-such-style")
    tracker.close()
    assert buf.getvalue() == "shape [1, 32, 32] is [bold]fine[/bold]\n"


def test_no_run_dir_writes_nothing(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    console, buf = plain_console()
    with Tracker(None, console=console) as tracker:
        simulate(tracker, None)
    assert list(tmp_path.iterdir()) == []
    assert "completed" in buf.getvalue()


def test_close_is_idempotent_and_exception_leaves_files_flushed(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        with Tracker(tmp_path, console=plain_console()[0]) as tracker:
            tracker.epoch_started(epoch=1, epochs=1, steps=10)
            tracker.log_train(step=3, epoch=1, step_in_epoch=3, loss=0.75, lr=0.1,
                              samples_per_s=100.0)
            raise ValueError("crash mid-epoch")
    assert tracker._file is not None and tracker._file.closed
    tracker.close()
    tracker.close()
    assert read_jsonl(tmp_path / "metrics.jsonl")[0]["loss"] == 0.75
    assert [(e.step, e.value) for e in accumulator(tmp_path).Scalars("train/loss")] == [(3, 0.75)]
    # Logging after close is harmless (e.g. a late message from an error handler).
    tracker.log_train(step=4, epoch=1, step_in_epoch=4, loss=0.5, lr=0.1, samples_per_s=1.0)
    tracker.message("still fine")


def test_import_does_not_load_tensorboard() -> None:
    code = (
        "import sys, trainer.tracking\n"
        "bad = [m for m in sys.modules if m.startswith(('torch.utils.tensorboard', 'tensorboard'))]\n"
        "print(bad)\n"
        "sys.exit(1 if bad else 0)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_points_reach_the_files_within_flush_secs_and_in_step_order(tmp_path: Path) -> None:
    def lines() -> list[tuple[int, str]]:
        return [(r["step"], r["split"]) for r in read_jsonl(tmp_path / "metrics.jsonl")]

    with Tracker(tmp_path, quiet=True, flush_secs=3600) as tracker:
        for step in (1, 2, 3):
            tracker.log_train(step=step, epoch=1, step_in_epoch=step, loss=1.0 / step, lr=0.1, samples_per_s=1.0)
        tracker.flush()  # what the runner does before a checkpoint
        assert lines() == [(1, "train"), (2, "train"), (3, "train")]
        assert [e.step for e in accumulator(tmp_path).Scalars("train/loss")] == [1, 2, 3]
        tracker.log_train(step=4, epoch=1, step_in_epoch=4, loss=0.25, lr=0.1, samples_per_s=1.0)
        tracker.log_val(step=4, epoch=1, metrics={"loss": 0.3})
        tracker.epoch_finished(epoch=1, epochs=1, step=4, train_loss=0.5, val={"loss": 0.3}, seconds=1.0)
        assert lines()[3:] == [(4, "train"), (4, "val")]
    with Tracker(tmp_path / "eager", quiet=True, flush_secs=0) as tracker:
        tracker.log_train(step=1, epoch=1, step_in_epoch=1, loss=0.5, lr=0.1, samples_per_s=1.0)
        assert read_jsonl(tmp_path / "eager" / "metrics.jsonl")[0]["loss"] == 0.5  # on disk, not yet closed


def test_logging_a_run_does_not_load_torch_tensorboard_or_its_tensor_utilities(tmp_path: Path) -> None:
    # torch.utils.tensorboard's hparams() imports TensorBoard's tensor utilities and boto3: ~0.3 s
    # at the end of every run
    code = (
        "import sys; from pathlib import Path; from trainer.tracking import Tracker\n"
        f"with Tracker(Path({str(tmp_path)!r}), quiet=True) as t:\n"
        "    t.log_train(step=1, epoch=1, step_in_epoch=1, loss=0.5, lr=0.1, samples_per_s=1.0)\n"
        "    t.log_hparams({'optimizer.lr': 0.1}, {'best/train_loss': 0.5})\n"
        "print([m for m in sys.modules if m.startswith(('torch.utils.tensorboard', 'tensorboard.util', 'boto3'))])\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
    assert accumulator(tmp_path).PluginTagToContent("hparams")


def test_formatting() -> None:
    assert format_metric("loss", 0.123456) == "0.1235"
    assert format_metric("val_accuracy", 0.9512) == "95.12%"
    assert format_seconds(4.25) == "4.2s" or format_seconds(4.25) == "4.3s"
    assert format_seconds(187) == "3m 07s"
    assert format_seconds(3723) == "1h 02m 03s"
