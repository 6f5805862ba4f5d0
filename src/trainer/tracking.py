"""Rich console output, TensorBoard and ``metrics.jsonl`` behind one small object.

TensorBoard's protos are imported lazily inside :class:`trainer.events.EventFile` so that
``import trainer.tracking`` (and therefore the CLI's start-up, ``trainer list``, ``trainer
show-config``...) stays cheap.

The training loop calls the tracker only at log points (every ``log_every`` optimizer steps) and at
epoch ends, never per step: nothing here assumes per-step calls, and the ETA is computed from the
epoch's elapsed time rather than from Rich's sampled speed, which needs frequent updates.

Two display modes:

* live: a Rich progress bar per epoch, used when the console is a terminal and not ``quiet``;
* plain: one plain text line per log interval, no ANSI codes, for CI logs and redirected output.

``quiet`` prints nothing except errors and the final one-line result; files are still written.
"""

from __future__ import annotations

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

from trainer.events import EventFile

__all__ = ["Tracker", "format_metric", "format_seconds"]

METRICS_FILE = "metrics.jsonl"
_JSON = json.JSONEncoder(allow_nan=False)  # json.dumps(..., allow_nan=False) builds one per call

# Short style names the rest of the project may pass to `message`.
_STYLE_ALIASES = {
    "error": "bold red",
    "warning": "yellow",
    "success": "green",
    "info": "cyan",
}
_STATUS_STYLES = {"completed": "green", "failed": "red", "interrupted": "yellow"}


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


# --------------------------------------------------------------------------- the tracker


class Tracker:
    """Console progress, TensorBoard scalars and ``metrics.jsonl`` for one run.

    Args:
        run_dir: the run folder; ``None`` writes no files at all (``trainer validate``).
        console: where to print; a stdout ``Console`` by default.
        quiet: print nothing but errors and the final one-line result (files are still written).
        tensorboard: write a TensorBoard event file into ``run_dir``.
        jsonl: append one JSON object per logged point to ``run_dir/metrics.jsonl``.
        refresh_per_second: upper bound on the live display's redraw rate.
        plain_interval: the least seconds between two plain-mode train lines (files get every point).
        flush_secs: the most seconds a train point waits in memory before it is written to
            metrics.jsonl and TensorBoard (they are also written at epoch ends).
        resume_step: the step a resumed run continues after: points logged past it by the
            interrupted run are dropped from metrics.jsonl and purged from TensorBoard.
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
        self.run_dir = Path(run_dir) if run_dir is not None else None
        # what the final hint tells the user to pass to `tensorboard --logdir`
        self.tensorboard_logdir = tensorboard_logdir
        self.console = console if console is not None else Console(stderr=False)
        self.quiet = quiet
        self.live = self.console.is_terminal and not quiet
        self.refresh_per_second = refresh_per_second

        self._closed = False
        self._progress: Progress | None = None
        self._task: Any = None
        self._epoch_t0 = 0.0
        self._epoch = 0
        self._epochs: int | None = None
        self._steps: int | None = None  # steps of the current epoch
        self._last_step = 0
        self._last_val: tuple[int, dict[str, float]] | None = None
        self._logged_in_epoch = False  # epoch lines follow the log interval, so tiny epochs don't flood
        self.plain_interval = plain_interval
        self._last_plain_line = -math.inf

        self._file: IO[str] | None = None
        self.flush_secs = flush_secs
        self._flushed = time.monotonic()
        self._points: list[tuple[Any, ...]] = []  # train points not yet written (see flush)
        self._writer: EventFile | None = None
        if self.run_dir is not None:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            if jsonl:
                if resume_step:
                    _truncate_metrics(self.run_dir / METRICS_FILE, resume_step)
                # Append: a resumed run continues the same file instead of erasing its history.
                self._file = open(self.run_dir / METRICS_FILE, "a", encoding="utf-8")
            if tensorboard:
                # the run folder itself, so `tensorboard --logdir runs` lists the run as <name>/<timestamp>;
                # purge_step: TensorBoard hides what the interrupted run logged after the checkpoint
                self._writer = EventFile(self.run_dir, purge_step=resume_step + 1 if resume_step else None)

    # ----------------------------------------------------------------- context manager

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # ----------------------------------------------------------------- internal output

    def _print(self, renderable: Any) -> None:
        # soft_wrap: a long line stays one line in a log file instead of being folded at 80 columns.
        self.console.print(renderable, soft_wrap=not self.live, highlight=False)

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

    def _write_json(self, record: dict[str, Any]) -> None:
        if self._file is not None and not self._file.closed:
            self._file.write(_JSON.encode(record) + "\n")

    def _write_points(self) -> None:
        """The train points logged since the last flush, to metrics.jsonl and TensorBoard."""
        points, self._points = self._points, []
        for step, epoch, loss, lr, samples_per_s, grad_norm, wall_time in points:
            record = {"step": step, "epoch": epoch, "split": "train", "loss": _json_number(loss), "lr": _json_number(lr),
                      "samples_per_s": _json_number(samples_per_s)}  # fmt: skip
            scalars = {"train/loss": loss, "lr": lr, "samples_per_s": samples_per_s}
            if grad_norm is not None:
                record["grad_norm"] = _json_number(grad_norm)
                scalars["train/grad_norm"] = _as_float(grad_norm)
            record["time"] = round(wall_time, 3)
            self._write_json(record)
            self._add_scalars(scalars, step, wall_time)

    def flush(self) -> None:
        """Write out the points held in memory (at most `flush_secs` old) to metrics.jsonl and
        TensorBoard; also at epoch ends, and by the runner before each checkpoint, so that a
        resumed run finds every point up to its checkpoint."""
        if self._closed:
            return
        self._write_points()
        if self._file is not None and not self._file.closed:
            self._file.flush()
        if self._writer is not None:
            self._writer.flush()
        self._flushed = time.monotonic()

    def _add_scalars(self, values: dict[str, float], step: int, wall_time: float | None = None) -> None:
        if self._writer is not None and not self._closed:
            self._writer.add_scalars({tag: _as_float(v) for tag, v in values.items()}, step, wall_time)

    def _stop_progress(self) -> None:
        if self._progress is not None:
            try:
                self._progress.stop()
            finally:
                self._progress = None
                self._task = None

    # ----------------------------------------------------------------- public API

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
        self._epochs = epochs
        self._steps = steps_per_epoch
        if self.quiet:
            return
        reason = device_reason if device_reason.startswith(f"{device}:") else f"{device}: {device_reason}"
        budget = f"{epochs} epochs x {steps_per_epoch:,} steps"
        if total_steps != epochs * steps_per_epoch:
            budget += f" (stops after {total_steps:,} steps)"
        else:
            budget += f" = {total_steps:,} steps"
        if processes > 1:
            budget += f", batch size {batch_size:,} per process x {processes} processes = {batch_size * processes:,}"
        else:
            budget += f", batch size {batch_size:,}"
        rows = [
            ("run", f"{name}" + (f"  {run_dir}" if run_dir is not None else "  (no run folder)")),
            ("device", reason),
            ("model", f"{model}, {num_params:,} parameters"),
            ("data", data),
            ("train", budget),
        ]
        if self.live:
            grid = Table.grid(padding=(0, 2))
            grid.add_column(style="bold cyan")
            grid.add_column()
            for key, value in rows:
                grid.add_row(key, Text(value))
            self.console.print(grid)
        else:
            for key, value in rows:
                self._line(f"{key:<7}{value}")

    def epoch_started(self, *, epoch: int, epochs: int, steps: int) -> None:
        """Start an epoch (1-based). Live mode: a progress bar for this epoch's steps."""
        self._epoch, self._epochs, self._steps = epoch, epochs, steps
        self._epoch_t0 = time.perf_counter()
        if not self.live:
            return
        self._stop_progress()  # an epoch that never reported its end must not leave a bar behind
        self._progress = Progress(
            TextColumn("[bold]epoch {task.fields[epoch]}/{task.fields[epochs]}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}"),
            TextColumn("{task.fields[rate]} samples/s"),
            TimeElapsedColumn(),
            TextColumn("ETA {task.fields[eta]}"),
            console=self.console,
            # Bounded: the bar redraws on its own clock, never faster than this.
            refresh_per_second=self.refresh_per_second,
            # The bar is replaced by the epoch's summary line when the epoch ends.
            transient=True,
        )
        self._task = self._progress.add_task(
            "train", total=steps, epoch=epoch, epochs=epochs, loss="-", rate="-", eta="-"
        )
        self._progress.start()

    def log_train(
        self,
        *,
        step: int,
        epoch: int,
        step_in_epoch: int,
        loss: float,
        lr: float,
        samples_per_s: float,
        grad_norm: float | None = None,
    ) -> None:
        """Record a training log point (``step``: global optimizer steps done, 1-based).

        Writes ``{"step", "epoch", "split": "train", "loss", "lr", "samples_per_s", "time"}`` to
        metrics.jsonl and the TensorBoard scalars ``train/loss``, ``lr``, ``samples_per_s``; with
        gradient clipping also ``grad_norm``, the largest pre-clip norm since the last point.
        """
        loss, lr, samples_per_s = _as_float(loss), _as_float(lr), _as_float(samples_per_s)
        self._last_step = step
        self._logged_in_epoch = True
        if self._file is not None or self._writer is not None:
            # written out in batches by flush(): one at a time, between the loop's steps, a point
            # costs several times more (measured ~75 us against ~20 us)
            self._points.append((step, epoch, loss, lr, samples_per_s, grad_norm, time.time()))
            if time.monotonic() - self._flushed > self.flush_secs:
                self.flush()
        if self.quiet:
            return
        if self.live:
            if self._progress is not None:
                self._progress.update(
                    self._task,
                    completed=step_in_epoch,
                    loss=_fmt_number(loss),
                    rate=_fmt_rate(samples_per_s),
                    eta=self._eta(step_in_epoch),
                )
            return
        # plain lines are bounded like the live display's refresh: a fast model logging every 10
        # steps would otherwise spend its time printing (the epoch's last point always prints)
        now = time.perf_counter()
        if now - self._last_plain_line < self.plain_interval and step_in_epoch != self._steps:
            return
        self._last_plain_line = now
        epochs = f"/{self._epochs}" if self._epochs else ""
        steps = f"/{self._steps}" if self._steps else ""
        self._line(
            f"epoch {epoch}{epochs}  step {step_in_epoch}{steps}  loss {_fmt_number(loss)}  "
            f"lr {_fmt_number(lr)}  {_fmt_rate(samples_per_s)} samples/s"
        )

    def _eta(self, step_in_epoch: int) -> str:
        # From the epoch's own elapsed time: correct from the first log point on, however sparse.
        if not self._steps or step_in_epoch <= 0:
            return "-"
        elapsed = time.perf_counter() - self._epoch_t0
        remaining = elapsed / step_in_epoch * max(0, self._steps - step_in_epoch)
        return format_seconds(remaining)

    def log_val(self, *, step: int, epoch: int, metrics: dict[str, float]) -> None:
        """Record validation metrics: metrics.jsonl ``split: "val"`` and TensorBoard ``val/<name>``.

        Prints nothing itself; the values appear in the epoch's summary line.
        """
        values = {k: _as_float(v) for k, v in metrics.items()}
        self._last_step = max(self._last_step, step)
        self._last_val = (epoch, values)
        self._write_points()  # the file stays in step order
        record: dict[str, Any] = {"step": step, "epoch": epoch, "split": "val"}
        record.update({k: _json_number(v) for k, v in values.items()})
        record["time"] = round(time.time(), 3)
        self._write_json(record)
        self._add_scalars({f"val/{name}": value for name, value in values.items()}, step)

    def epoch_finished(
        self,
        *,
        epoch: int,
        epochs: int,
        step: int,
        train_loss: float | None,
        val: dict[str, float] | None,
        seconds: float,
    ) -> None:
        """Close the epoch's bar, print one summary line for the epoch and flush the files."""
        self._stop_progress()
        self._last_step = max(self._last_step, step)
        if val is None and self._last_val is not None and self._last_val[0] == epoch:
            val = self._last_val[1]
        self.flush()
        logged, self._logged_in_epoch = self._logged_in_epoch, False
        if self.quiet or not (logged or epoch == epochs):
            return
        parts = [f"epoch {epoch}/{epochs}"]
        if train_loss is not None:
            parts.append(f"train loss {_fmt_number(_as_float(train_loss))}")
        if val:
            parts.append(_fmt_metrics(val, prefix="val "))
        parts.append(format_seconds(seconds))
        self._line("  ".join(parts))

    def log_hparams(
        self, hparams: dict[str, float | int | str | bool | None], metrics: dict[str, float]
    ) -> None:
        """Fill TensorBoard's HParams tab for this run, in the run's own event file.

        ``hparams`` are flattened config values (None and lists become strings); ``metrics`` are
        tags such as ``best/val_loss``, also written as scalars so the HParams table shows them.

        Only the session start/end summaries are written, not the experiment summary: TensorBoard
        picks the experiment summary of one arbitrary run and would hide the hparams of runs with
        other keys, whereas without it the columns are the union over all runs under --logdir.
        """
        if self._writer is None or self._closed:
            return
        self._write_points()
        values = {str(k): _as_float(v) for k, v in metrics.items()}
        # in this run's own file: SummaryWriter.add_hparams writes a sub-folder, a second "run"
        self._writer.add_hparams(hparams, self._last_step)
        self._add_scalars(values, self._last_step)
        self.flush()

    def message(self, text: str, style: str | None = None) -> None:
        """Print one console line; ``quiet`` silences it unless ``style="error"``."""
        if self.quiet and style != "error":
            return
        self._line(text, style)

    def finished(
        self,
        *,
        status: str,
        run_dir: Path | None,
        best: dict[str, float],
        final: dict[str, float],
        steps: int,
        epochs: int,
        seconds: float,
    ) -> None:
        """Report the end of the run: status, folder, best/final metrics, wall time, TB hint.

        Live: a Rich panel. Plain: a few plain lines, the first one ``<status>: <run_dir>``.
        Quiet: only that first line.
        """
        self._stop_progress()
        self.flush()
        head = f"{status}: {run_dir}" if run_dir is not None else status
        if self.quiet:
            return  # the caller prints the run folder; quiet means nothing else
        budget = f"{epochs} epochs, {steps:,} steps in {format_seconds(seconds)}"
        hint = None
        if run_dir is not None and self._writer is not None:
            hint = f"tensorboard --logdir {self.tensorboard_logdir or run_dir}"
        if not self.live:
            self._line(head)
            if best:
                self._line(f"  best   {_fmt_metrics(best)}")
            if final:
                self._line(f"  final  {_fmt_metrics(final)}")
            self._line(f"  {budget}")
            if hint:
                self._line(f"  {hint}")
            return
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
        self.console.print(Panel(body, title=f"run {status}", border_style=color, expand=False))

    def close(self) -> None:
        """Stop the live display, flush and close the event file and metrics.jsonl. Idempotent."""
        if self._closed:
            return
        # Each step guarded so that a failure in one (e.g. a full disk) still closes the others.
        try:
            self._write_points()  # the points still in memory
        finally:
            self._closed = True
            self._close_outputs()

    def _close_outputs(self) -> None:
        try:
            self._stop_progress()
        finally:
            try:
                if self._writer is not None:
                    self._writer.close()
            finally:
                if self._file is not None and not self._file.closed:
                    self._file.close()
