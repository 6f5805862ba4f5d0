"""What the training loop reports to: the console and the run's metric files, behind one :class:`Tracker`.

:class:`ConsoleOutput` prints the run: a live Rich progress bar over all of the run's steps when
the console is a terminal, plain lines without ANSI codes otherwise (CI logs, redirected output),
and with ``quiet`` nothing but errors. :class:`MetricFiles` writes ``metrics.jsonl`` and the
TensorBoard event file (:mod:`trainer.events`, whose protos load only when a run writes one, so
``import trainer.tracking`` stays cheap).

The loop calls the tracker only at log points (every ``log_every`` optimizer steps) and at epoch
ends, never per step: nothing here assumes per-step calls, and the ETA comes from the run's own
elapsed time rather than from Rich's sampled speed, which needs frequent updates.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from pathlib import Path
from typing import IO, Any

from rich.console import Console, Group
from rich.errors import MissingStyle, StyleSyntaxError
from rich.panel import Panel
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from trainer.console import ViewConsole
from trainer.errors import TrainingFailed
from trainer.events import EventFile

__all__ = ["ConsoleOutput", "MetricFiles", "Pictures", "SweepView", "Tracker", "format_metric", "format_seconds", "run_pictures"]

METRICS_FILE = "metrics.jsonl"
CONFUSION_FILE = "confusion.csv"
# TensorBoard's dashboards order tag groups (a tag's part before its first '/') by the tags' names,
# with '/' and digits before letters; '~' sorts after every letter, so the groups read train, val,
# then the run's best values, and the optional weight histograms before them
TRAIN, VAL, BEST, WEIGHTS = "train", "val", "~best", "weights"
_JSON = json.JSONEncoder(allow_nan=False)  # json.dumps(..., allow_nan=False) builds one per call

# Short style names the rest of the project may pass to `message`.
_STYLE_ALIASES = {
    "error": "bold red",
    "warning": "yellow",
    "success": "green",
    "info": "cyan",
}
_STATUS_STYLES = {"completed": "green", "failed": "red", "interrupted": "yellow", "pruned": "yellow"}


# --------------------------------------------------------------------------- formatting helpers


def _as_float(value: Any) -> float:
    """A Python float from a float, int, NumPy scalar or one-element tensor.

    The loop passes Python floats already; converting again guarantees that a tensor is never
    printed or serialised (``float()`` of a tensor would be a device sync, but only at log points).
    """
    return float(value)


def _fmt_number(value: float) -> str:
    return f"{value:.4g}"


def format_metric(name: str, value: float) -> str:
    """``value`` formatted for display: accuracies as a percentage, anything else with 4 digits."""
    value = _as_float(value)
    if "acc" in name.lower() and math.isfinite(value):
        return f"{value * 100:.2f}%"
    return _fmt_number(value)


def _fmt_rate(samples_per_s: float) -> str:
    samples_per_s = _as_float(samples_per_s)
    return f"{samples_per_s:,.0f}" if math.isfinite(samples_per_s) else str(samples_per_s)


def format_seconds(seconds: float) -> str:
    """A short wall-time string: ``4.2s``, ``3m 07s``, ``1h 02m 03s``."""
    seconds = max(0.0, _as_float(seconds))
    if seconds < 60:
        return f"{seconds:.1f}s"
    whole = int(round(seconds))
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h {minutes:02d}m {secs:02d}s"
    return f"{minutes}m {secs:02d}s"


def _count(n: int, noun: str) -> str:
    """``1 step``, ``2 steps``, ``1,000 steps``."""
    return f"{n:,} {noun}" if n == 1 else f"{n:,} {noun}s"


def _budget(epochs: int, steps_per_epoch: int, total_steps: int, batch_size: int, processes: int) -> str:
    """``40 epochs x 3 steps = 120 steps, batch size 1`` for the header."""
    budget = f"{_count(epochs, 'epoch')} x {_count(steps_per_epoch, 'step')}"
    if total_steps != epochs * steps_per_epoch:
        budget += f" (stops after {_count(total_steps, 'step')})"
    else:
        budget += f" = {_count(total_steps, 'step')}"
    if processes > 1:
        return budget + f", batch size {batch_size:,} per process x {processes} processes = {batch_size * processes:,}"
    return budget + f", batch size {batch_size:,}"


def _label(name: str) -> str:
    """``val_loss`` / ``best/val_loss`` -> ``val loss`` / ``best val loss`` for display."""
    return name.replace("/", " ").replace("_", " ")


def _fmt_metrics(metrics: dict[str, float] | None, prefix: str = "") -> str:
    if not metrics:
        return ""
    return "  ".join(f"{prefix}{_label(k)} {format_metric(k, v)}" for k, v in metrics.items())


def _json_number(value: Any) -> float | None:
    """Strict JSON has no NaN/Infinity; a non-finite value (a diverged loss) is written as null."""
    value = _as_float(value)
    return value if math.isfinite(value) else None


# --------------------------------------------------------------------------- the console


class ConsoleOutput:
    """The run on a console: a live progress bar, plain lines, or (``quiet``) errors only.

    Live (a terminal, not quiet): one bar over all of the run's steps, with the epoch, the last
    loss and samples/s, elapsed time and ETA; epoch lines and messages print above it. Plain: the
    same lines without the bar, and a train line at log points that no epoch line follows at once.

    Args:
        console: where to print; a stdout ``Console`` by default.
        quiet: print nothing but ``message(..., style="error")``.
        refresh_per_second: upper bound on the live display's redraw rate.
        plain_interval: the least seconds between two plain-mode train lines.
        start_step: the step a resumed run continues after; its bar starts there.
    """

    def __init__(
        self,
        console: Console | None = None,
        *,
        quiet: bool = False,
        refresh_per_second: float = 4,
        plain_interval: float = 1.0,
        start_step: int = 0,
    ) -> None:
        self.console = console if console is not None else ViewConsole(stderr=False)
        self.quiet = quiet
        self.live = self.console.is_terminal and not quiet
        self.refresh_per_second = refresh_per_second
        self.plain_interval = plain_interval
        self._start_step = start_step
        self._total: int | None = None  # the run's last step
        self._epochs: int | None = None
        self._steps: int | None = None  # steps of the current epoch
        self._progress: Progress | None = None
        self._task: Any = None
        self._bar_t0 = 0.0
        self._last_val: tuple[int, dict[str, float]] | None = None
        self._logged_in_epoch = False  # epoch lines follow the log interval, so tiny epochs don't flood
        self._last_plain_line = -math.inf

    # ----------------------------------------------------------------- lines

    def _print(self, renderable: Any, **options: Any) -> None:
        # soft_wrap: a long line stays one line in a log file instead of being folded at 80 columns.
        try:
            self.console.print(renderable, **{"soft_wrap": not self.live, "highlight": False, **options})
        except OSError:  # a closed pipe, a full disk: the console is only a view of the run, which goes on
            self._lost()

    def _lost(self) -> None:
        """The console cannot be written: print nothing more."""
        self.quiet, self.live = True, False
        with contextlib.suppress(Exception):
            self._stop_bar()
        if isinstance(self.console, ViewConsole):
            self.console.lost()
        else:
            self.console.quiet = True

    def _line(self, text: str, style: str | None = None) -> None:
        """One line; Text (not a markup string) so brackets in paths or messages print verbatim."""
        self._print(Text(text, style=self._style(style) or ""))

    def _style(self, style: str | None) -> str | None:
        if not style:
            return None
        style = _STYLE_ALIASES.get(style, style)
        try:
            self.console.get_style(style)
        except (MissingStyle, StyleSyntaxError):
            return None  # an unknown style must never turn a log line into a crash
        return style

    def message(self, text: str, style: str | None = None) -> None:
        """Print one line; ``quiet`` silences it unless ``style="error"``."""
        if self.quiet and style != "error":
            return
        self._line(text, style)

    # ----------------------------------------------------------------- the live bar

    def _start_bar(self, epoch: str) -> None:
        self._progress = Progress(
            TextColumn("[bold]epoch {task.fields[epoch]}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}"),
            TextColumn("{task.fields[rate]} samples/s"),
            TimeElapsedColumn(),
            TextColumn("ETA {task.fields[eta]}"),
            console=self.console,
            # Bounded: the bar redraws on its own clock, never faster than this.
            refresh_per_second=self.refresh_per_second,
            # The final summary takes the bar's place.
            transient=True,
        )
        self._task = self._progress.add_task(
            "train", total=self._total, completed=self._start_step, epoch=epoch, loss="-", rate="-", eta="-"
        )
        try:
            self._progress.start()
        except OSError:
            self._lost()
        self._bar_t0 = time.perf_counter()

    def _advance(self, step: int, **fields: str) -> None:
        if self._progress is not None:
            self._progress.update(self._task, completed=step, eta=self._eta(step), **fields)

    def _eta(self, step: int) -> str:
        # From the run's own pace since the bar started: right from the first update, however sparse.
        done = step - self._start_step
        if done <= 0:
            return "-"
        elapsed = time.perf_counter() - self._bar_t0
        return format_seconds(elapsed / done * max(0, (self._total or 0) - step))

    def _stop_bar(self) -> None:
        if self._progress is not None:
            try:
                self._progress.stop()
            finally:
                self._progress = None
                self._task = None

    # ----------------------------------------------------------------- the loop's calls

    def run_started(
        self,
        *,
        name: str,
        run_dir: Path | None,
        device: str,
        device_reason: str,
        model: str,
        num_params: int,
        data: str,
        epochs: int,
        steps_per_epoch: int,
        total_steps: int,
        batch_size: int,
        processes: int = 1,
    ) -> None:
        """Print a short header: run name and folder, device and why, model, data, budget.

        With several `processes` (data-parallel), `batch_size` is each one's and the header gives the global batch.
        """
        self._epochs, self._steps, self._total = epochs, steps_per_epoch, total_steps
        if self.quiet:
            return
        reason = device_reason if device_reason.startswith(f"{device}:") else f"{device}: {device_reason}"
        rows = [
            ("run", f"{name}" + (f"  {run_dir}" if run_dir is not None else "  (no run folder)")),
            ("device", reason),
            ("model", f"{model}, {_count(num_params, 'parameter')}"),
            ("data", data),
            ("train", _budget(epochs, steps_per_epoch, total_steps, batch_size, processes)),
        ]
        if self.live:
            grid = Table.grid(padding=(0, 2))
            grid.add_column(style="bold cyan")
            grid.add_column()
            for key, value in rows:
                grid.add_row(key, Text(value))
            self._print(grid, soft_wrap=False)
        else:
            for key, value in rows:
                self._line(f"{key:<7}{value}")

    def epoch_started(self, *, epoch: int, epochs: int, steps: int) -> None:
        """Start an epoch (1-based); live, the bar's epoch field moves on (the first one starts the bar)."""
        self._epochs, self._steps = epochs, steps
        if self._total is None:  # no header: the epochs' steps
            self._total = epochs * steps
        if not self.live:
            return
        if self._progress is None:
            self._start_bar(f"{epoch}/{epochs}")
        else:
            self._progress.update(self._task, epoch=f"{epoch}/{epochs}")

    def log_train(self, *, step: int, epoch: int, step_in_epoch: int, loss: float, lr: float, samples_per_s: float) -> None:
        """Show a training log point (``step``: global optimizer steps done, 1-based)."""
        self._logged_in_epoch = True
        if self.quiet:
            return
        if self.live:
            self._advance(step, loss=_fmt_number(loss), rate=_fmt_rate(samples_per_s))
            return
        if step_in_epoch == self._steps or step == self._total:
            return  # the epoch's line follows at once, with its loss
        # plain lines are bounded like the live display's refresh: a fast model logging every 10
        # steps would otherwise spend its time printing
        now = time.perf_counter()
        if now - self._last_plain_line < self.plain_interval:
            return
        self._last_plain_line = now
        epochs = f"/{self._epochs}" if self._epochs else ""
        steps = f"/{self._steps}" if self._steps else ""
        self._line(
            f"epoch {epoch}{epochs}  step {step_in_epoch}{steps}  loss {_fmt_number(loss)}  "
            f"lr {_fmt_number(lr)}  {_fmt_rate(samples_per_s)} samples/s"
        )

    def log_val(self, *, epoch: int, metrics: dict[str, float]) -> None:
        """Keep validation metrics for the epoch's line."""
        self._last_val = (epoch, metrics)

    def epoch_finished(
        self, *, epoch: int, epochs: int, step: int, train_loss: float | None, val: dict[str, float] | None, seconds: float
    ) -> None:
        """One line for the epoch, when a log point fell in it or it is the last."""
        if val is None and self._last_val is not None and self._last_val[0] == epoch:
            val = self._last_val[1]
        logged, self._logged_in_epoch = self._logged_in_epoch, False
        if self.quiet:
            return
        if not logged and train_loss is not None:
            # an epoch shorter than the log interval: its loss is the newest there is
            self._advance(step, loss=_fmt_number(_as_float(train_loss)))
        else:
            self._advance(step)
        if not (logged or epoch == epochs):
            return
        parts = [f"epoch {epoch}/{epochs}"]
        if train_loss is not None:
            parts.append(f"train loss {_fmt_number(_as_float(train_loss))}")
        if val:
            parts.append(_fmt_metrics(val, prefix="val "))
        parts.append(format_seconds(seconds))
        self._line("  ".join(parts))

    def finished(
        self, *, status: str, run_dir: Path | None, best: dict[str, float], final: dict[str, float], steps: int,
        epochs: int, seconds: float, hint: str | None = None,
    ) -> None:
        """Report the end of the run: status, folder, best/final metrics, wall time, `hint`.

        Live: a Rich panel. Plain: a few plain lines, the first one ``<status>: <run_dir>``.
        Quiet: nothing (the caller prints the run folder).
        """
        self._stop_bar()
        if self.quiet:
            return
        budget = f"{_count(epochs, 'epoch')}, {_count(steps, 'step')} in {format_seconds(seconds)}"
        if self.live:
            self._panel(status, run_dir, best, final, budget, hint)
            return
        self._line(f"{status}: {run_dir}" if run_dir is not None else status)
        if best:
            self._line(f"  best   {_fmt_metrics(best)}")
        if final:
            self._line(f"  final  {_fmt_metrics(final)}")
        self._line(f"  {budget}")
        if hint:
            self._line(f"  {hint}")

    def _panel(
        self, status: str, run_dir: Path | None, best: dict[str, float], final: dict[str, float], budget: str, hint: str | None
    ) -> None:
        color = _STATUS_STYLES.get(status, "cyan")
        grid = Table.grid(padding=(0, 2))
        grid.add_column(style="bold")
        grid.add_column()
        grid.add_row("status", Text(status, style=f"bold {color}"))
        grid.add_row("run folder", Text(str(run_dir) if run_dir is not None else "-"))
        if best:
            grid.add_row("best", Text(_fmt_metrics(best)))
        if final:
            grid.add_row("final", Text(_fmt_metrics(final)))
        grid.add_row("time", Text(budget))
        body: Any = grid
        if hint:
            body = Group(grid, Text(""), Text.assemble(("view it: ", "dim"), (hint, "bold")))
        self._print(Panel(body, title=f"run {status}", border_style=color, expand=False), soft_wrap=False)

    def close(self) -> None:
        """Take the live bar off the console. Idempotent."""
        self._stop_bar()


# --------------------------------------------------------------------------- the metric files


def _truncate_metrics(path: Path, last_step: int) -> None:
    """Keep the points up to `last_step` (and drop a half-written last line), atomically."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] <= last_step:
            kept.append(line)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(f"{line}\n" for line in kept), encoding="utf-8")
    os.replace(tmp, path)


@contextlib.contextmanager
def _naming(path: str):
    """An OSError from a write names `path` (a failed write() or flush() names no file)."""
    try:
        yield
    except OSError as err:
        if getattr(err, "filename", None):
            raise
        raise OSError(err.errno, err.strerror, path) from None


class MetricFiles:
    """A run folder's ``metrics.jsonl`` and TensorBoard event file (scalars and HParams).

    Args:
        run_dir: the run folder; ``None`` writes no files at all.
        tensorboard: write a TensorBoard event file into ``run_dir``.
        jsonl: append one JSON object per logged point to ``run_dir/metrics.jsonl``.
        resume_step: the step a resumed run continues after: points logged past it by the
            interrupted run are dropped from metrics.jsonl and purged from TensorBoard.
        flush_secs: the most seconds a train point waits in memory before it is written
            (points are also written at epoch ends and on :meth:`flush`).
    """

    def __init__(
        self, run_dir: Path | None, *, tensorboard: bool = True, jsonl: bool = True, resume_step: int = 0, flush_secs: float = 1.0
    ) -> None:
        self._file: IO[str] | None = None
        self._writer: EventFile | None = None
        self.flush_secs = flush_secs
        self._flushed = time.monotonic()
        self._points: list[tuple[Any, ...]] = []  # train points not yet written (see flush)
        self._last_step = 0
        self._closed = False
        self.run_dir = Path(run_dir) if run_dir is not None else None
        if run_dir is None:
            return
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        if jsonl:
            if resume_step:
                _truncate_metrics(run_dir / METRICS_FILE, resume_step)
            # Append: a resumed run continues the same file instead of erasing its history.
            self._file = open(run_dir / METRICS_FILE, "a", encoding="utf-8")
        if tensorboard:
            # the run folder itself, so `tensorboard --logdir runs` lists the run as <name>/<timestamp>;
            # purge_step: TensorBoard hides what the interrupted run logged after the checkpoint
            self._writer = EventFile(run_dir, purge_step=resume_step + 1 if resume_step else None)

    @property
    def tensorboard(self) -> bool:
        """Whether the run has an event file (what the final hint is about)."""
        return self._writer is not None

    def _write_json(self, record: dict[str, Any]) -> None:
        if self._file is not None and not self._file.closed:
            self._file.write(_JSON.encode(record) + "\n")

    def _add_scalars(self, values: dict[str, float], step: int, wall_time: float | None = None) -> None:
        if self._writer is not None and not self._closed:
            self._writer.add_scalars({tag: _as_float(v) for tag, v in values.items()}, step, wall_time)

    def _write_points(self) -> None:
        """The train points logged since the last flush, to metrics.jsonl and TensorBoard."""
        points, self._points = self._points, []
        for step, epoch, loss, lr, samples_per_s, grad_norm, wall_time in points:
            record = {"step": step, "epoch": epoch, "split": "train", "loss": _json_number(loss), "lr": _json_number(lr),
                      "samples_per_s": _json_number(samples_per_s)}  # fmt: skip
            scalars = {f"{TRAIN}/loss": loss, f"{TRAIN}/lr": lr, f"{TRAIN}/samples_per_s": samples_per_s}
            if grad_norm is not None:
                record["grad_norm"] = _json_number(grad_norm)
                scalars[f"{TRAIN}/grad_norm"] = _as_float(grad_norm)
            record["time"] = round(wall_time, 3)
            self._write_json(record)
            self._add_scalars(scalars, step, wall_time)

    def flush(self) -> None:
        """Write out the points held in memory to metrics.jsonl and TensorBoard, and flush both.

        Raises OSError naming the file that cannot be written (a full or read-only disk), and
        TrainingFailed when metrics.jsonl was deleted under the run (its points would go nowhere)."""
        if self._closed:
            return
        self._write_points()
        if self._file is not None and not self._file.closed:
            with _naming(self._file.name):
                self._file.flush()
                if os.fstat(self._file.fileno()).st_nlink == 0:
                    raise TrainingFailed(
                        f"'{self._file.name}' was deleted while the run trained: its points are lost; "
                        "the checkpoints and TensorBoard's file are kept"
                    )
        if self._writer is not None:
            with _naming(str(self._writer.path)):
                self._writer.flush()
        self._flushed = time.monotonic()

    def log_train(
        self, *, step: int, epoch: int, loss: float, lr: float, samples_per_s: float, grad_norm: float | None = None
    ) -> None:
        """Record a train point: ``split: "train"`` in metrics.jsonl, ``train/loss``, ``train/lr``,
        ``train/samples_per_s`` (and ``train/grad_norm``) in TensorBoard."""
        self._last_step = step
        if self._closed or (self._file is None and self._writer is None):
            return
        # written out in batches by flush(): one at a time, between the loop's steps, a point
        # costs several times more (measured ~75 us against ~20 us)
        self._points.append((step, epoch, loss, lr, samples_per_s, grad_norm, time.time()))
        if time.monotonic() - self._flushed > self.flush_secs:
            self.flush()

    def log_val(self, *, step: int, epoch: int, metrics: dict[str, float]) -> None:
        """Record validation metrics: ``split: "val"`` in metrics.jsonl, ``val/<name>`` in TensorBoard."""
        self._last_step = max(self._last_step, step)
        if self._closed:
            return
        self._write_points()  # the file stays in step order
        record: dict[str, Any] = {"step": step, "epoch": epoch, "split": "val"}
        record.update({k: _json_number(v) for k, v in metrics.items()})
        record["time"] = round(time.time(), 3)
        self._write_json(record)
        self._add_scalars({f"{VAL}/{name}": value for name, value in metrics.items()}, step)

    def add_image(self, tag: str, picture: Any, step: int) -> None:
        """A :class:`trainer.pictures.Picture` in TensorBoard's Images tab."""
        if self._writer is not None and not self._closed:
            self._write_points()  # the file stays in step order
            self._writer.add_image(tag, picture.png, width=picture.width, height=picture.height, step=step)

    def add_histograms(self, histograms: dict[str, dict[str, Any]], step: int) -> None:
        """Histograms (see :meth:`trainer.events.EventFile.add_histograms`) as one event."""
        if self._writer is not None and not self._closed and histograms:
            self._write_points()
            self._writer.add_histograms(histograms, step)

    def add_graph(self, graph_def: bytes) -> None:
        """The model's graph (a serialized ``GraphDef``) in TensorBoard's Graphs tab."""
        if self._writer is not None and not self._closed:
            self._writer.add_graph(graph_def)

    def epoch_finished(self, *, step: int) -> None:
        # by time, like log points: a run of one-step epochs must not pay two writes an epoch (the
        # runner flushes before each checkpoint, so a resumed run finds every point up to it)
        self._last_step = max(self._last_step, step)
        if time.monotonic() - self._flushed > self.flush_secs:
            self.flush()

    def log_hparams(self, hparams: dict[str, Any], best: dict[str, float]) -> None:
        """Fill TensorBoard's HParams tab in the run's own event file, at the last step logged.

        ``best`` (``{"val_loss": ...}``) is written as scalars ``~best/val_loss``..., which the
        HParams table shows as the run's metrics. Only the session start/end summaries are written, not the experiment
        summary: TensorBoard picks the experiment summary of one arbitrary run and would hide
        the hparams of runs with other keys, whereas without it the columns are the union over
        all runs under --logdir.
        """
        if self._writer is None or self._closed:
            return
        self._write_points()
        # in this run's own file: SummaryWriter.add_hparams writes a sub-folder, a second "run"
        self._writer.add_hparams(hparams, self._last_step)
        self._add_scalars({f"{BEST}/{k}": v for k, v in best.items()}, self._last_step)
        self.flush()

    def close(self) -> None:
        """Write the points still in memory and close both files. Idempotent."""
        if self._closed:
            return
        # Each step guarded so that a failure in one (e.g. a full disk) still closes the others.
        try:
            self._write_points()
        finally:
            self._closed = True
            try:
                if self._writer is not None:
                    self._writer.close()
            finally:
                if self._file is not None and not self._file.closed:
                    self._file.close()


# --------------------------------------------------------------------------- pictures

MISCLASSIFIED = 16  # images in the grid of mistakes: the most confident ones
MAX_POINTS = 2000  # output values in a regression's picture
COST_RATIO = 20  # pictures are drawn again once this many times their last drawing's cost has passed


@contextlib.contextmanager
def _random_state_kept(device: Any):
    """Python's, NumPy's and torch's random states as they were before: a model run for a picture
    must not move them, or a resumed run would no longer repeat the uninterrupted one."""
    import random

    import numpy as np
    import torch

    python, numpy = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        try:
            yield
        finally:
            random.setstate(python)
            np.random.set_state(numpy)


class Pictures:
    """What validation saw, as pictures in TensorBoard: the loop's ``Pictures`` hook (see
    :mod:`trainer.engine`), made by :func:`run_pictures`.

    Classification: each validation counts the confusion matrix on the device (in a data-parallel
    run every rank's share, summed by one all-reduce), kept for ``confusion.csv`` (:meth:`finish`);
    on drawing epochs it is drawn (``val/confusion_matrix``), and for image data the most
    confident mistakes too (``val/misclassified``). Regression: on drawing epochs the predictions
    against the targets (``val/predictions``; without validation ``train/predictions``, from a
    pass over the training data). The model's graph once, at the run's first epoch end (a
    resumed run does not write it again), weight and gradient histograms every
    `histograms_every` epochs.

    Drawing epochs: this process's first, the run's last by its budget, and any other once
    COST_RATIO times the last drawing's cost has passed since it ended, so pictures take at most
    ~1/COST_RATIO of a run however short its epochs. Only the process that writes the files
    (rank 0) collects and draws, from its own share of the data.
    """

    def __init__(
        self, files: MetricFiles, output: ConsoleOutput, *, classification: bool, class_names: list[str],
        input_shape: tuple[int, ...], target_shape: tuple[int, ...], device: Any, precision: Any,
        train_batches: Any, has_validation: bool, draw: bool, histograms_every: int | None, is_last: Any,
    ) -> None:  # fmt: skip
        self.files, self.output = files, output
        self.classification, self.names = classification, class_names
        self.device, self.precision, self.train_batches = device, precision, train_batches
        self.has_validation, self.histograms_every, self.is_last = has_validation, histograms_every, is_last
        self.main = files.run_dir is not None  # the process that writes the run's files
        self.graph = draw and self.main and files.tensorboard
        self.draw = self.graph and (has_validation or not classification)  # a confusion matrix needs validation
        self.count = draw and classification and has_validation  # on every rank: the all-reduce needs them all
        self.world_size = 1
        self.image_data = len(input_shape) == 3 and input_shape[0] in (1, 3)
        self.against_input = input_shape == (1,) and target_shape in ((), (1,))  # x -> y, as the notebooks plotted
        self.confusion: Any = None  # the last validation's counts (numpy), rows true, columns predicted
        self._confusion_at = (0, 0)  # its epoch and step
        self._confusion_drawn = False
        self._counts: Any = None  # this validation's, on the device
        self._drawing = False
        self._last_drawn: float | None = None  # perf_counter time the last drawing ended
        self._cost = 0.0  # seconds the last drawing took
        self._seconds = 0.0  # collecting for this epoch's drawing
        self._mistakes: list[tuple[Any, ...]] = []
        self._values: list[tuple[Any, ...]] = []
        self._kept = self._seen = 0  # regression values kept, samples seen
        self._example: Any = None  # one input for the graph

    # ----------------------------------------------------------------- the loop's calls

    def observer(self, state: Any) -> Any:
        """The callback for this epoch's validation batches, or None when it needs none."""
        import torch

        self._drawing = self.draw and self._due(state)
        self._seconds, self._mistakes, self._values, self._kept, self._seen = 0.0, [], [], 0, 0
        classes = len(self.names)
        self._counts = torch.zeros(classes * classes, dtype=torch.long, device=self.device) if self.count else None
        if self._counts is None and not (self._drawing and self.has_validation):
            return None
        return self._observe

    def _due(self, state: Any) -> bool:
        if self._last_drawn is None or self.is_last(state):
            return True
        return time.perf_counter() - self._last_drawn >= COST_RATIO * self._cost

    def _observe(self, inputs: Any, outputs: Any, targets: Any) -> None:
        try:
            self._look(inputs, outputs, targets)
        except Exception as err:  # outputs or targets of a shape a plugin chose: the run goes on without pictures
            self.count = self.draw = self._drawing = False  # alike on every rank: their batches are alike
            self._counts = None
            self.output.message(f"pictures are off for the rest of the run: {type(err).__name__}: {err}", "warning")

    def _look(self, inputs: Any, outputs: Any, targets: Any) -> None:
        started = time.perf_counter()
        predicted = None
        if self._counts is not None:
            import torch

            predicted = outputs.argmax(dim=1)
            self._counts += torch.bincount((targets * len(self.names) + predicted).view(-1), minlength=self._counts.numel())
        if not self._drawing:
            return
        if self._example is None:
            self._example = inputs[:1].detach().clone()
        if not self.classification:
            self._keep_values(inputs, outputs, targets)
        elif self.image_data and predicted is not None:
            self._keep_mistakes(inputs, outputs, targets, predicted)
        self._seconds += time.perf_counter() - started

    def _keep_mistakes(self, inputs: Any, outputs: Any, targets: Any, predicted: Any) -> None:
        """The batch's most confident mistakes (softmax of logits or of log-probabilities: the same)."""
        wrong = (predicted != targets).nonzero().squeeze(1)
        if wrong.numel() == 0:
            return
        confidence = outputs.index_select(0, wrong).float().softmax(dim=1).amax(dim=1)
        if wrong.numel() > MISCLASSIFIED:
            confidence, top = confidence.topk(MISCLASSIFIED)
            wrong = wrong[top]
        self._mistakes.append(
            (confidence.cpu(), inputs.index_select(0, wrong).float().cpu(), targets[wrong].cpu(), predicted[wrong].cpu())
        )
        if len(self._mistakes) > 4:  # only the most confident are drawn: memory stays that of a few batches
            self._mistakes = [self._most_confident()]

    def _most_confident(self) -> tuple[Any, ...]:
        import torch

        confidence, images, truth, guess = (torch.cat(parts) for parts in zip(*self._mistakes))
        confidence, top = confidence.topk(min(MISCLASSIFIED, len(confidence)))
        return confidence, images[top], truth[top], guess[top]

    def _keep_values(self, inputs: Any, outputs: Any, targets: Any) -> None:
        """The first MAX_POINTS output values and their targets (and one-feature inputs)."""
        samples = targets.shape[0]
        self._seen += samples
        if self._kept >= MAX_POINTS:
            return
        outputs, targets = outputs.detach().float().reshape(samples, -1), targets.float().reshape(samples, -1)
        take = min(samples, -(-(MAX_POINTS - self._kept) // max(1, outputs.shape[1])))
        inputs = inputs[:take].float().reshape(take, -1).cpu() if self.against_input else None
        self._values.append((outputs[:take].cpu(), targets[:take].cpu(), inputs))
        self._kept += take * outputs.shape[1]

    def validated(self, state: Any, *, trained: Any, validated: Any, dist: Any) -> None:
        """After the epoch's validation: the confusion matrix summed over the ranks (on every
        rank), then on rank 0 the graph, histograms and this epoch's pictures."""
        if dist is not None:
            self.world_size = dist.world_size
        if self._counts is not None:
            if dist is not None:
                dist.sum(self._counts)
            classes = len(self.names)
            self.confusion = self._counts.view(classes, classes).cpu().numpy()
            self._confusion_at, self._confusion_drawn, self._counts = (state.epoch, state.step), False, None
        if not self.main:
            return
        if state.epoch == 1 and self.graph:
            self._graph(trained)
        if self.histograms_every and state.epoch % self.histograms_every == 0:
            self._histograms(trained, state.step)
        if self._drawing:
            self._draw(state, validated)

    def finish(self) -> None:
        """At the run's end (rank 0): the last validation's confusion matrix drawn if it was not
        (early stopping ends a run its budget did not), and written to confusion.csv."""
        if not self.main or self.confusion is None:
            return
        if self.draw and not self._confusion_drawn:
            self._safely(lambda: self._draw_confusion(*self._confusion_at))
        write_confusion_csv(self.files.run_dir / CONFUSION_FILE, self.confusion, self.names)

    # ----------------------------------------------------------------- drawing

    def _draw(self, state: Any, model: Any) -> None:
        from trainer import pictures

        pictures.warm_up()  # Pillow's import, once: not a cost of each drawing
        started = time.perf_counter()
        if self.classification:
            if self.confusion is not None and self._confusion_at == (state.epoch, state.step):
                self._safely(lambda: self._draw_confusion(state.epoch, state.step))
            if self._mistakes:
                self._safely(lambda: self._draw_mistakes(state))
        else:
            if not self.has_validation:
                self._training_pass(model)
            if self._values:
                self._safely(lambda: self._draw_values(state))
        self._mistakes, self._values = [], []
        self._cost = self._seconds + time.perf_counter() - started
        self._last_drawn = time.perf_counter()

    def _safely(self, draw: Any) -> None:
        """Draw; a failure (not the disk's) turns the pictures off for the rest of the run with one
        console line, and the run goes on."""
        if not self.draw:
            return
        try:
            draw()
        except OSError:
            raise
        except Exception as err:
            self.draw = False
            self.output.message(f"pictures are off for the rest of the run: drawing one failed ({type(err).__name__}: {err})", "warning")

    def _draw_confusion(self, epoch: int, step: int) -> None:
        from trainer import pictures

        right, total = int(self.confusion.trace()), int(self.confusion.sum())
        share = f" ({right / total:.1%})" if total else ""
        title = f"confusion matrix, epoch {epoch} (step {step}): {right:,} of {total:,} right{share}"
        picture = pictures.confusion_matrix(self.confusion, self.names, title=title)
        if picture is not None:
            self.files.add_image(f"{VAL}/confusion_matrix", picture, step)
        self._confusion_drawn = True

    def _draw_mistakes(self, state: Any) -> None:
        from trainer import pictures

        confidence, images, truth, guess = self._most_confident()
        wrong = int(self.confusion.sum() - self.confusion.trace()) if self.confusion is not None else len(confidence)
        captions = [
            (f"true: {self.names[t]}", f"pred: {self.names[g]} ({c:.0%})")
            for c, t, g in zip(confidence.tolist(), truth.tolist(), guess.tolist())
        ]
        shown = f"the {len(confidence)} most confident of {wrong:,} mistakes" if wrong > len(confidence) else f"all {wrong:,}, the most confident first"
        title = f"misclassified, epoch {state.epoch}: {shown}"
        if self.world_size > 1:
            title += " (from process 0's share)"
        self.files.add_image(f"{VAL}/misclassified", pictures.image_grid(images.numpy(), captions, title=title), state.step)

    def _draw_values(self, state: Any) -> None:
        import torch

        from trainer import pictures

        outputs, targets = torch.cat([v[0] for v in self._values]), torch.cat([v[1] for v in self._values])
        inputs = torch.cat([v[2] for v in self._values]).numpy() if self.against_input else None
        split, tag = ("validation", VAL) if self.has_validation else ("training", TRAIN)
        shown = len(outputs)
        samples = f"{shown:,} {split} sample{'s' if shown != 1 else ''}"
        if shown < self._seen:
            samples = f"the first {shown:,} of {self._seen:,} {split} samples"
        if self.world_size > 1:
            samples += " of process 0's share"
        title = f"predictions against targets, epoch {state.epoch}: {samples}"
        picture = pictures.predictions_plot(outputs.numpy(), targets.numpy(), inputs=inputs, title=title)
        self.files.add_image(f"{tag}/predictions", picture, state.step)

    def _training_pass(self, model: Any) -> None:
        """Predictions on the training data (a run without validation), as validation would make them."""
        import torch

        training = model.training
        model.eval()
        try:
            with _random_state_kept(self.device), torch.no_grad():
                for inputs, targets in self.train_batches.epoch(0):
                    with self.precision.autocast():
                        outputs = model(inputs)
                    if self._example is None:
                        self._example = inputs[:1].detach().clone()
                    self._keep_values(inputs, outputs, targets)
                    if self._kept >= MAX_POINTS:
                        self._seen = max(self._seen, self.train_batches.num_samples)
                        break
        finally:
            model.train(training)

    # ----------------------------------------------------------------- graph and histograms

    def _graph(self, model: Any) -> None:
        """The model's graph, traced with torch.fx; a model it cannot trace gets one console line."""
        import torch

        from trainer import pictures

        try:
            if self._example is None:
                with _random_state_kept(self.device):
                    self._example = next(iter(self.train_batches.epoch(0)))[0][:1]
            training = model.training
            model.eval()
            try:
                with _random_state_kept(self.device), torch.no_grad():
                    graph = pictures.model_graph(model, self._example)
            finally:
                model.train(training)
        except Exception as err:
            from trainer.errors import first_line

            name = type(model).__name__
            self.output.message(f"no model graph in TensorBoard: torch.fx cannot trace {name} ({first_line(err)}); the run goes on", "warning")
            return
        self.files.add_graph(graph)

    def _histograms(self, model: Any, step: int) -> None:
        """Each parameter's values and (when it has one) its last step's gradient."""
        from trainer import pictures

        histograms = {}
        for name, parameter in model.named_parameters():
            for tag, values in ((name, parameter), (f"{name}.grad", parameter.grad)):
                found = pictures.histogram(values) if values is not None else None
                if found is not None:
                    histograms[f"{WEIGHTS}/{tag}"] = found
        self.files.add_histograms(histograms, step)


def write_confusion_csv(path: Path, counts: Any, names: list[str]) -> None:
    """The confusion matrix as CSV, atomically: a header of predicted class names, then one row per
    true class, its name first."""
    import csv
    import io

    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(["true \\ predicted", *names])
    for name, row in zip(names, counts.tolist()):
        writer.writerow([name, *row])
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with _naming(str(path)):
            tmp.write_text(text.getvalue(), encoding="utf-8")
            os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def run_pictures(built: Any, tracker: Tracker) -> Pictures | None:
    """The pictures of a built run (``train.pictures``, ``train.histograms_every``) for the loop's
    `pictures` hook, attached to `tracker` (whose :meth:`Tracker.finished` writes confusion.csv);
    None when both are off."""
    train, info = built.config.train, built.info
    if not train.pictures and not train.histograms_every:
        return None
    classification = info.task == "classification"
    classes = info.num_classes or 0
    names = (info.preprocess or {}).get("classes") if classification else None
    if not (isinstance(names, list) and len(names) == classes):
        names = [str(k) for k in range(classes)]
    batches = len(built.train_batches)
    pictures = Pictures(
        tracker.files, tracker.output, classification=classification, class_names=[str(n) for n in names],
        input_shape=tuple(info.input_shape), target_shape=tuple(info.target_shape), device=built.device,
        precision=built.precision, train_batches=built.train_batches,
        has_validation=built.val_batches is not None and built.val_batches.num_samples > 0, draw=train.pictures,
        histograms_every=train.histograms_every, is_last=lambda state: built.settings.done(state, batches),
    )  # fmt: skip
    tracker.pictures = pictures
    return pictures


# --------------------------------------------------------------------------- the tracker


class Tracker:
    """Console progress, TensorBoard scalars and ``metrics.jsonl`` for one run: each call goes to
    a :class:`ConsoleOutput` (``.output``) and to :class:`MetricFiles` (``.files``).

    Args:
        run_dir: the run folder; ``None`` writes no files at all (``trainer validate``).
        console, quiet, refresh_per_second, plain_interval: see :class:`ConsoleOutput`.
        tensorboard, jsonl, resume_step, flush_secs: see :class:`MetricFiles`; a resumed run's
            progress bar also starts at `resume_step`.
        tensorboard_logdir: the folder the final hint names (default: the run folder).

    Usable as a context manager; :meth:`close` runs on exit, also after an exception.
    """

    def __init__(
        self,
        run_dir: Path | None,
        *,
        console: Console | None = None,
        quiet: bool = False,
        tensorboard: bool = True,
        jsonl: bool = True,
        refresh_per_second: float = 4,
        tensorboard_logdir: Path | None = None,
        resume_step: int = 0,
        plain_interval: float = 1.0,
        flush_secs: float = 1.0,
    ) -> None:
        self.tensorboard_logdir = tensorboard_logdir
        self.output = ConsoleOutput(
            console, quiet=quiet, refresh_per_second=refresh_per_second, plain_interval=plain_interval, start_step=resume_step
        )
        self.files = MetricFiles(run_dir, tensorboard=tensorboard, jsonl=jsonl, resume_step=resume_step, flush_secs=flush_secs)
        self.pictures: Pictures | None = None  # set by run_pictures: finished() writes its confusion.csv

    @property
    def console(self) -> Console:
        return self.output.console

    @property
    def live(self) -> bool:
        """Whether the console shows the live progress bar."""
        return self.output.live

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def run_started(self, **header: Any) -> None:
        """Print the run's header (see :meth:`ConsoleOutput.run_started`)."""
        self.output.run_started(**header)

    def epoch_started(self, *, epoch: int, epochs: int, steps: int) -> None:
        self.output.epoch_started(epoch=epoch, epochs=epochs, steps=steps)

    def log_train(
        self, *, step: int, epoch: int, step_in_epoch: int, loss: float, lr: float, samples_per_s: float,
        grad_norm: float | None = None,
    ) -> None:
        """A training log point (``step``: global optimizer steps done, 1-based; `grad_norm`: with
        gradient clipping, the largest pre-clip norm since the last point)."""
        loss, lr, samples_per_s = _as_float(loss), _as_float(lr), _as_float(samples_per_s)
        self.files.log_train(step=step, epoch=epoch, loss=loss, lr=lr, samples_per_s=samples_per_s, grad_norm=grad_norm)
        self.output.log_train(step=step, epoch=epoch, step_in_epoch=step_in_epoch, loss=loss, lr=lr, samples_per_s=samples_per_s)

    def log_val(self, *, step: int, epoch: int, metrics: dict[str, float]) -> None:
        """Validation metrics; they print in the epoch's line."""
        values = {k: _as_float(v) for k, v in metrics.items()}
        self.files.log_val(step=step, epoch=epoch, metrics=values)
        self.output.log_val(epoch=epoch, metrics=values)

    def epoch_finished(
        self, *, epoch: int, epochs: int, step: int, train_loss: float | None, val: dict[str, float] | None, seconds: float
    ) -> None:
        """Flush the files and print the epoch's line."""
        self.files.epoch_finished(step=step)
        self.output.epoch_finished(epoch=epoch, epochs=epochs, step=step, train_loss=train_loss, val=val, seconds=seconds)

    def flush(self) -> None:
        """Write the points held in memory (at most `flush_secs` old) to the files; the runner
        calls it before each checkpoint, so that a resumed run finds every point up to it."""
        self.files.flush()

    def log_hparams(self, hparams: dict[str, float | int | str | bool | None], best: dict[str, float]) -> None:
        """Fill TensorBoard's HParams tab: flattened config values and the best metrics (see :meth:`MetricFiles.log_hparams`)."""
        self.files.log_hparams(hparams, best)

    def message(self, text: str, style: str | None = None) -> None:
        """Print one console line; ``quiet`` silences it unless ``style="error"``."""
        self.output.message(text, style)

    def finished(
        self, *, status: str, run_dir: Path | None, best: dict[str, float], final: dict[str, float], steps: int,
        epochs: int, seconds: float,
    ) -> None:
        """Write confusion.csv (see :meth:`Pictures.finish`), flush the files and report the end of
        the run (see :meth:`ConsoleOutput.finished`)."""
        if self.pictures is not None:
            self.pictures.finish()
        self.files.flush()
        hint = None
        if run_dir is not None and self.files.tensorboard:
            hint = f"tensorboard --logdir {self.tensorboard_logdir or run_dir}"
        self.output.finished(
            status=status, run_dir=run_dir, best=best, final=final, steps=steps, epochs=epochs, seconds=seconds, hint=hint
        )

    def close(self) -> None:
        """Take the live bar off the console, write what is in memory and close the files. Idempotent."""
        try:
            self.output.close()
        finally:
            self.files.close()


# --------------------------------------------------------------------------- sweeps


_TRIAL_STYLES = {"complete": "green", "fail": "red", "interrupted": "yellow", "pruned": "yellow", "running": "cyan"}


class SweepView:
    """A sweep's trials as they run: a live Rich table on a terminal; off one, a plain line each time
    a trial starts or ends. `update(rows)` takes `trainer.sweep.trial_rows`."""

    def __init__(self, console: Console | None = None, *, metric: str = "metric", quiet: bool = False) -> None:
        self.console = console or ViewConsole(stderr=True, highlight=False, soft_wrap=True)
        self.metric = metric
        self.quiet = quiet
        self._states: dict[int, str] | None = None  # each trial's state as last shown; None before the first update
        self._live: Any = None
        if self.console.is_terminal and not quiet:
            from rich.live import Live

            self._live = Live(console=self.console, refresh_per_second=2, transient=False)
            self._live.start()

    def update(self, rows: list[dict[str, Any]]) -> None:
        if self.quiet:
            return
        if self._live is not None:
            try:
                self._live.update(self.table(rows))
            except OSError:
                self._live = None
            return
        first = self._states is None
        self._states = self._states or {}
        for row in rows:
            if self._states.get(row["number"]) != row["state"] and row["state"] != "waiting":
                self._states[row["number"]] = row["state"]
                if not first or row["state"] in ("running", "interrupted"):  # trials ended before this command are in the summary
                    self.console.print(self._line(row), markup=False)

    def table(self, rows: list[dict[str, Any]]) -> Table:
        """The trials as a Rich table: trial, state, parameters, the metric, epochs, time."""
        keys = list(dict.fromkeys(k for row in rows for k in row["params"]))
        table = Table(show_edge=False, pad_edge=False, box=None)
        for name in ("trial", "state", *keys, self.metric, "epochs", "time"):
            table.add_column(name, justify="right" if name not in ("trial", "state") else "left", no_wrap=True)
        for row in rows:
            state = Text(row["state"], style=_TRIAL_STYLES.get(row["state"], ""))
            value = format_metric(self.metric, row["value"]) if row["value"] is not None else ""
            seconds = format_seconds(row["seconds"]) if row["seconds"] is not None else ""
            table.add_row(row["trial"], state, *(_param_text(row["params"].get(k)) for k in keys), value, str(row["epochs"] or ""), seconds)
        return table

    def _line(self, row: dict[str, Any]) -> str:
        params = " ".join(f"{k}={_param_text(v)}" for k, v in row["params"].items())
        text = f"{row['trial']} {row['state']}: {params}"
        if row["value"] is not None and row["state"] != "running":
            text += f", {self.metric} {format_metric(self.metric, row['value'])}"
        if row["state"] not in ("running", "interrupted") and row["seconds"] is not None:
            text += f" ({format_seconds(row['seconds'])})"
        if row["state"] == "fail" and row.get("error"):
            text += f": {row['error']}"
        return text

    def close(self) -> None:
        if self._live is not None:
            with contextlib.suppress(OSError):
                self._live.stop()
            self._live = None


def _param_text(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else "" if value is None else str(value)
