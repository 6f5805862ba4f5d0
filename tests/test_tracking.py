"""Tests for trainer.tracking: a real Rich console writing to a StringIO, real files in tmp_path,
read back with TensorBoard's own reader."""

from __future__ import annotations

import io
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from rich.console import Console
from rich.progress import Progress

from trainer.tracking import Tracker, format_metric, format_seconds

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def header(epochs: int = 2, steps: int = 4, total: int | None = None, num_params: int = 61706) -> dict:
    return dict(
        name="demo",
        device="cpu",
        device_reason="no CUDA or MPS device found",
        model="lenet",
        num_params=num_params,
        data="digits: 1,437 train / 360 val",
        epochs=epochs,
        steps_per_epoch=steps,
        total_steps=epochs * steps if total is None else total,
        batch_size=64,
    )


def plain_console() -> tuple[Console, io.StringIO]:
    buf = io.StringIO()
    return Console(file=buf, force_terminal=False, width=100), buf


def live_console() -> tuple[Console, io.StringIO]:
    buf = io.StringIO()
    return Console(file=buf, force_terminal=True, width=120), buf


def train(
    tracker: Tracker, run_dir: Path | None, *, epochs: int = 2, steps: int = 4, log_every: int = 2,
    validate: bool = True, pause: float = 0.0, start: int = 0,
) -> int:
    """What the engine does: a train point every `log_every` steps and at the last, validation at
    each epoch end; `start` steps were done before (a resumed run). Returns the steps done."""
    total = epochs * steps
    tracker.run_started(run_dir=run_dir, **header(epochs, steps))
    step = start
    for epoch in range(start // steps + 1, epochs + 1):
        tracker.epoch_started(epoch=epoch, epochs=epochs, steps=steps)
        for i in range(step - (epoch - 1) * steps + 1, steps + 1):
            step += 1
            time.sleep(pause)
            if step % log_every == 0 or step == total:
                tracker.log_train(
                    step=step, epoch=epoch, step_in_epoch=i, loss=1.0 / step, lr=0.05, samples_per_s=1234.5
                )
        val = {"loss": 0.5 / epoch, "accuracy": 0.9 + epoch / 100} if validate else None
        if val:
            tracker.log_val(step=step, epoch=epoch, metrics=val)
        tracker.epoch_finished(epoch=epoch, epochs=epochs, step=step, train_loss=1.0 / step, val=val, seconds=1.5)
    return step


def simulate(tracker: Tracker, run_dir: Path | None, epochs: int = 2, steps: int = 4) -> None:
    """A whole run: training, then HParams and the final summary."""
    step = train(tracker, run_dir, epochs=epochs, steps=steps)
    tracker.log_hparams(
        {"optimizer.lr": 0.05, "model.name": "lenet", "train.grad_clip": None, "data.batch_size": 64,
         "train.epochs": 2, "data.shuffle": True, "data.input_shape": [1, 32, 32]},
        {"val_loss": 0.25, "val_accuracy": 0.92},
    )  # fmt: skip
    tracker.finished(
        status="completed", run_dir=run_dir, best={"val_loss": 0.25, "val_accuracy": 0.92},
        final={"train_loss": 0.125, "val_loss": 0.25}, steps=step, epochs=epochs, seconds=3.0,
    )  # fmt: skip


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def accumulator(run_dir: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir))
    acc.Reload()
    return acc


def bar_counts(out: str, total: int) -> list[int]:
    """The `N/total` step counts the live bar showed, in order."""
    return [int(n) for n in re.findall(rf"(?<!epoch )\b(\d+)/{total}\b", ANSI.sub("", out))]


# --------------------------------------------------------------------------- files


def test_metrics_jsonl_lines_in_order(tmp_path: Path) -> None:
    console, _ = plain_console()
    with Tracker(tmp_path, console=console) as tracker:
        simulate(tracker, tmp_path)
    records = read_jsonl(tmp_path / "metrics.jsonl")
    assert [(r["split"], r["step"], r["epoch"]) for r in records] == [
        ("train", 2, 1), ("train", 4, 1), ("val", 4, 1),
        ("train", 6, 2), ("train", 8, 2), ("val", 8, 2),
    ]  # fmt: skip
    assert list(records[0]) == ["step", "epoch", "split", "loss", "lr", "samples_per_s", "time"]
    assert list(records[2]) == ["step", "epoch", "split", "loss", "accuracy", "time"]
    assert records[0]["loss"] == 0.5 and records[0]["lr"] == 0.05
    assert records[2]["accuracy"] == pytest.approx(0.91)
    assert all(isinstance(r["time"], float) for r in records)


def test_jsonl_appends_and_non_finite_is_null(tmp_path: Path) -> None:
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n')
    with Tracker(tmp_path, console=plain_console()[0], tensorboard=False) as tracker:
        tracker.log_train(step=2, epoch=1, step_in_epoch=2, loss=float("nan"), lr=0.1, samples_per_s=10.0)
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert lines[0] == '{"step": 1}'
    assert "NaN" not in lines[1]  # strict JSON, readable by jq and friends
    assert json.loads(lines[1])["loss"] is None
    assert not list(tmp_path.glob("events.out.tfevents.*"))


def test_a_resumed_run_drops_the_points_logged_after_its_checkpoint(tmp_path: Path) -> None:
    with Tracker(tmp_path, quiet=True) as tracker:
        for step in range(1, 7):
            tracker.log_train(step=step, epoch=1, step_in_epoch=step, loss=1.0, lr=0.1, samples_per_s=1.0)
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 7, "spl')  # the interrupted run's half-written last line
    with Tracker(tmp_path, quiet=True, resume_step=4) as tracker:
        for step in (5, 6):
            tracker.log_train(step=step, epoch=1, step_in_epoch=step, loss=0.5, lr=0.1, samples_per_s=1.0)
    assert [(r["step"], r["loss"]) for r in read_jsonl(tmp_path / "metrics.jsonl")] == [
        (1, 1.0), (2, 1.0), (3, 1.0), (4, 1.0), (5, 0.5), (6, 0.5)
    ]
    loss = [(e.step, e.value) for e in accumulator(tmp_path).Scalars("train/loss")]
    assert loss == [(1, 1.0), (2, 1.0), (3, 1.0), (4, 1.0), (5, 0.5), (6, 0.5)]


def test_tensorboard_scalars_and_hparams_in_run_folder(tmp_path: Path) -> None:
    with Tracker(tmp_path, console=plain_console()[0]) as tracker:
        simulate(tracker, tmp_path)
    assert [p for p in tmp_path.iterdir() if p.is_dir()] == []  # no add_hparams sub-folder
    assert len(list(tmp_path.glob("events.out.tfevents.*"))) == 1

    acc = accumulator(tmp_path)
    scalars = set(acc.Tags()["scalars"])
    assert {"train/loss", "val/loss", "val/accuracy", "train/lr", "train/samples_per_s",
            "~best/val_loss", "~best/val_accuracy"} <= scalars  # fmt: skip

    def series(tag: str) -> list[tuple[int, float]]:
        return [(e.step, e.value) for e in acc.Scalars(tag)]

    assert series("train/loss") == [(s, pytest.approx(1.0 / s)) for s in (2, 4, 6, 8)]
    assert series("train/lr") == [(s, pytest.approx(0.05)) for s in (2, 4, 6, 8)]
    assert series("train/samples_per_s") == [(s, pytest.approx(1234.5)) for s in (2, 4, 6, 8)]
    assert series("val/loss") == [(4, pytest.approx(0.5)), (8, pytest.approx(0.25))]
    assert series("val/accuracy") == [(4, pytest.approx(0.91)), (8, pytest.approx(0.92))]
    assert series("~best/val_loss") == [(8, pytest.approx(0.25))]

    from tensorboard.plugins.hparams import api_pb2, metadata

    content = acc.PluginTagToContent("hparams")
    start = metadata.parse_session_start_info_plugin_data(content[metadata.SESSION_START_INFO_TAG])
    assert start.hparams["optimizer.lr"].number_value == pytest.approx(0.05)
    # a number (min/max filter, numeric sort) holding the integer exactly
    assert start.hparams["data.batch_size"].WhichOneof("kind") == "number_value"
    assert start.hparams["data.batch_size"].number_value == 64
    assert start.hparams["model.name"].string_value == "lenet"
    assert start.hparams["train.grad_clip"].string_value == "None"
    assert start.hparams["data.shuffle"].string_value == "True"
    assert start.hparams["data.input_shape"].string_value == "[1, 32, 32]"
    end = metadata.parse_session_end_info_plugin_data(content[metadata.SESSION_END_INFO_TAG])
    assert end.status == api_pb2.Status.Value("STATUS_SUCCESS")


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
        # an epoch end writes by time too: a run of one-step epochs must not pay two writes each
        assert lines()[3:] == []
    assert lines()[3:] == [(4, "train"), (4, "val")]  # and closing writes what is left
    with Tracker(tmp_path / "eager", quiet=True, flush_secs=0) as tracker:
        tracker.log_train(step=1, epoch=1, step_in_epoch=1, loss=0.5, lr=0.1, samples_per_s=1.0)
        assert read_jsonl(tmp_path / "eager" / "metrics.jsonl")[0]["loss"] == 0.5  # on disk, not yet closed


def test_close_is_idempotent_and_exception_leaves_files_flushed(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        with Tracker(tmp_path, console=plain_console()[0], flush_secs=3600) as tracker:
            tracker.epoch_started(epoch=1, epochs=1, steps=10)
            tracker.log_train(step=3, epoch=1, step_in_epoch=3, loss=0.75, lr=0.1, samples_per_s=100.0)
            raise ValueError("crash mid-epoch")
    tracker.close()
    tracker.close()
    assert [r["loss"] for r in read_jsonl(tmp_path / "metrics.jsonl")] == [0.75]
    assert [(e.step, e.value) for e in accumulator(tmp_path).Scalars("train/loss")] == [(3, 0.75)]
    # Logging after close is harmless (e.g. a late message from an error handler) and writes nothing.
    tracker.log_train(step=4, epoch=1, step_in_epoch=4, loss=0.5, lr=0.1, samples_per_s=1.0)
    tracker.log_val(step=4, epoch=1, metrics={"loss": 0.5})
    tracker.flush()
    tracker.message("still fine")
    assert len(read_jsonl(tmp_path / "metrics.jsonl")) == 1


def test_no_run_dir_writes_nothing(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    console, buf = plain_console()
    with Tracker(None, console=console) as tracker:
        simulate(tracker, None)
    assert list(tmp_path.iterdir()) == []
    assert "completed" in buf.getvalue()
    assert "tensorboard" not in buf.getvalue()


# --------------------------------------------------------------------------- plain output


def test_plain_mode_prints_each_point_once_without_ansi(tmp_path: Path) -> None:
    console, buf = plain_console()
    with Tracker(tmp_path, console=console, plain_interval=0) as tracker:
        simulate(tracker, tmp_path)
    out = buf.getvalue()
    assert not ANSI.search(out)
    # mid-epoch points get a train line; the epoch's last one is in the epoch's line
    assert [line for line in out.splitlines() if "samples/s" in line] == [
        "epoch 1/2  step 2/4  loss 0.5  lr 0.05  1,234 samples/s",
        "epoch 2/2  step 2/4  loss 0.1667  lr 0.05  1,234 samples/s",
    ]
    assert [line for line in out.splitlines() if line.startswith("epoch") and "train loss" in line] == [
        "epoch 1/2  train loss 0.25  val loss 0.5  val accuracy 91.00%  1.5s",
        "epoch 2/2  train loss 0.125  val loss 0.25  val accuracy 92.00%  1.5s",
    ]
    assert "device cpu: no CUDA or MPS device found" in out
    assert "model  lenet, 61,706 parameters" in out
    assert "train  2 epochs x 4 steps = 8 steps, batch size 64" in out
    assert out.splitlines()[-5:] == [
        f"completed: {tmp_path}",
        "  best   val loss 0.25  val accuracy 92.00%",
        "  final  train loss 0.125  val loss 0.25",
        "  2 epochs, 8 steps in 3.0s",
        f"  tensorboard --logdir {tmp_path}",
    ]


def test_plain_train_lines_are_bounded_in_rate(tmp_path: Path) -> None:
    console, buf = plain_console()
    with Tracker(tmp_path, console=console, plain_interval=3600) as tracker:
        train(tracker, tmp_path, epochs=3, steps=8, log_every=2)
    lines = buf.getvalue().splitlines()
    # the first point, then nothing for an hour; every epoch still gets its line
    assert [line.split("  loss")[0] for line in lines if "samples/s" in line] == ["epoch 1/3  step 2/8"]
    assert len([line for line in lines if "train loss" in line]) == 3
    assert len([r for r in read_jsonl(tmp_path / "metrics.jsonl") if r["split"] == "train"]) == 12  # files get all


def test_plain_forty_short_epochs_print_forty_lines_each_loss_once(tmp_path: Path) -> None:
    # configs/linear_regression.yaml: 40 epochs of 3 steps, a train point every 3 steps
    console, buf = plain_console()
    with Tracker(tmp_path, console=console, plain_interval=0) as tracker:
        train(tracker, tmp_path, epochs=40, steps=3, log_every=3, validate=False)
    body = buf.getvalue().splitlines()[5:]  # after the header
    assert len(body) == 40
    assert body[0] == "epoch 1/40  train loss 0.3333  1.5s"
    assert body[-1] == "epoch 40/40  train loss 0.008333  1.5s"
    assert all(re.fullmatch(rf"epoch {i}/40  train loss \S+  1\.5s", line) for i, line in enumerate(body, 1))


def test_plain_one_step_epochs_print_a_line_per_log_interval(tmp_path: Path) -> None:
    # configs/two_layer_net.yaml: 500 one-step epochs, a train point every 50 steps
    console, buf = plain_console()
    with Tracker(tmp_path, console=console, plain_interval=0) as tracker:
        train(tracker, tmp_path, epochs=500, steps=1, log_every=50, validate=False)
    body = buf.getvalue().splitlines()[5:]
    assert [line.split("  ")[0] for line in body] == [f"epoch {e}/500" for e in range(50, 501, 50)]
    assert all("samples/s" not in line for line in body)


def test_a_run_stopped_by_max_steps_mid_epoch_prints_its_last_point_once(tmp_path: Path) -> None:
    console, buf = plain_console()
    with Tracker(tmp_path, console=console, plain_interval=0) as tracker:
        tracker.run_started(run_dir=tmp_path, **header(epochs=2, steps=10, total=15))
        tracker.epoch_started(epoch=2, epochs=2, steps=10)
        tracker.log_train(step=15, epoch=2, step_in_epoch=5, loss=0.5, lr=0.1, samples_per_s=1.0)
        tracker.epoch_finished(epoch=2, epochs=2, step=15, train_loss=0.5, val=None, seconds=1.0)
    lines = buf.getvalue().splitlines()
    assert "train  2 epochs x 10 steps (stops after 15 steps), batch size 64" in lines
    assert lines[5:] == ["epoch 2/2  train loss 0.5  1.0s"]


def test_counts_of_one_are_singular(tmp_path: Path) -> None:
    console, buf = plain_console()
    with Tracker(tmp_path, console=console) as tracker:
        tracker.run_started(run_dir=tmp_path, **header(epochs=1, steps=1, num_params=1))
        tracker.finished(status="completed", run_dir=tmp_path, best={}, final={}, steps=1, epochs=1, seconds=0.5)
    out = buf.getvalue()
    assert "model  lenet, 1 parameter\n" in out
    assert "train  1 epoch x 1 step = 1 step, batch size 64" in out
    assert "  1 epoch, 1 step in 0.5s" in out


def test_message_prints_text_verbatim(tmp_path: Path) -> None:
    console, buf = plain_console()
    tracker = Tracker(None, console=console)
    tracker.message("shape [1, 32, 32] is [bold]fine[/bold]", style="no-such-style")
    tracker.close()
    assert buf.getvalue() == "shape [1, 32, 32] is [bold]fine[/bold]\n"


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


# --------------------------------------------------------------------------- live output


def test_live_mode_runs_and_shows_final_panel(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    run_dir = Path("runs/demo/20240101-000000")
    console, buf = live_console()
    tracker = Tracker(run_dir, console=console, refresh_per_second=20, tensorboard_logdir=Path("runs"))
    assert tracker.live
    simulate(tracker, run_dir)
    tracker.close()
    out = buf.getvalue()
    assert "run completed" in out
    assert str(run_dir) in out
    assert "tensorboard --logdir runs" in out
    assert "92.00%" in out
    assert "epoch 2/2  train loss 0.125" in out  # epoch lines print above the bar
    assert (tmp_path / run_dir / "metrics.jsonl").exists()


def test_live_bar_advances_over_a_run_of_one_step_epochs(tmp_path: Path) -> None:
    # configs/two_layer_net.yaml: 500 one-step epochs; a bar per epoch ended before its first redraw
    console, buf = live_console()
    with Tracker(tmp_path, console=console, refresh_per_second=50) as tracker:
        train(tracker, tmp_path, epochs=500, steps=1, log_every=50, validate=False, pause=0.001)
    out = ANSI.sub("", buf.getvalue())
    counts = bar_counts(out, 500)
    assert counts == sorted(counts)
    assert len(set(counts) - {0, 500}) >= 3, counts  # it moved between start and end
    assert counts[-1] == 500
    assert re.search(r"epoch \d+/500 .*loss \S+ 1,234 samples/s", out)
    assert "ETA" in out


def test_live_bar_of_a_resumed_run_starts_at_its_checkpoint(tmp_path: Path) -> None:
    console, buf = live_console()
    with Tracker(tmp_path, console=console, resume_step=30) as tracker:
        train(tracker, tmp_path, epochs=4, steps=10, log_every=5, start=30)
    counts = bar_counts(buf.getvalue(), 40)
    assert counts[0] == 30 and counts[-1] == 40
    assert "epoch 4/4" in buf.getvalue()


def test_live_mode_leaves_no_display_behind_after_an_exception(tmp_path: Path) -> None:
    console, buf = live_console()
    with pytest.raises(RuntimeError):
        with Tracker(tmp_path, console=console) as tracker:
            tracker.epoch_started(epoch=1, epochs=1, steps=10)
            tracker.log_train(step=1, epoch=1, step_in_epoch=1, loss=1.0, lr=0.1, samples_per_s=5)
            raise RuntimeError("boom")
    with Progress(console=console):  # Rich allows one live display per console at a time
        pass
    console.print("after")
    assert buf.getvalue().endswith("after\n")  # no bar redrawn below later output


# --------------------------------------------------------------------------- cost and formatting


def test_import_does_not_load_tensorboard() -> None:
    code = (
        "import sys, trainer.tracking\n"
        "bad = [m for m in sys.modules if m.startswith(('torch.utils.tensorboard', 'tensorboard'))]\n"
        "print(bad)\n"
        "sys.exit(1 if bad else 0)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_logging_a_run_does_not_load_torch_tensorboard_or_its_tensor_utilities(tmp_path: Path) -> None:
    # torch.utils.tensorboard's hparams() imports TensorBoard's tensor utilities and boto3: ~0.3 s
    # at the end of every run
    code = (
        "import sys; from pathlib import Path; from trainer.tracking import Tracker\n"
        f"with Tracker(Path({str(tmp_path)!r}), quiet=True) as t:\n"
        "    t.log_train(step=1, epoch=1, step_in_epoch=1, loss=0.5, lr=0.1, samples_per_s=1.0)\n"
        "    t.log_hparams({'optimizer.lr': 0.1}, {'train_loss': 0.5})\n"
        "print([m for m in sys.modules if m.startswith(('torch.utils.tensorboard', 'tensorboard.util', 'boto3'))])\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
    assert accumulator(tmp_path).PluginTagToContent("hparams")


def test_formatting() -> None:
    assert format_metric("loss", 0.123456) == "0.1235"
    assert format_metric("val_accuracy", 0.9512) == "95.12%"
    assert format_seconds(4.24) == "4.2s"
    assert format_seconds(187) == "3m 07s"
    assert format_seconds(3723) == "1h 02m 03s"
