"""The `trainer` command line: the only module that imports Typer and turns exceptions into exit codes.

Exit codes: 0 done; 1 a run that failed while training; 2 bad input; 130 SIGINT; 143 SIGTERM (or SIGHUP, a closed terminal).
torch is imported inside the commands, so `trainer --help` stays fast.
"""

from __future__ import annotations

import os
import sys
from enum import Enum
from pathlib import Path
from typing import Callable, List, Optional

import typer
from trainer.console import ViewConsole, say

app = typer.Typer(
    name="trainer",
    help="Train PyTorch models from a YAML config: trainer run configs/lenet.yaml",
    no_args_is_help=True,
    add_completion=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)

EXIT_FAILED, EXIT_USAGE = 1, 2
# views only: a closed pipe or a full disk under them silences them, never changes the exit code
err_console = ViewConsole(stderr=True, highlight=False, soft_wrap=True)


def _under_torchrun() -> bool:
    """Whether torchrun started this process as one of several (cheap: no torch import)."""
    return os.environ.get("WORLD_SIZE", "1") not in ("", "1")


def _other_rank() -> bool:
    """Whether this process is a data-parallel rank other than 0: it prints nothing, rank 0 speaks for the job."""
    return _under_torchrun() and os.environ.get("RANK", "0") not in ("", "0")


def _first_of_another_node() -> bool:
    """Whether this is the first process of a machine other than rank 0's (torchrun on several):
    rank 0's messages are in its own machine's log, so this one speaks in this machine's."""
    return os.environ.get("LOCAL_RANK") == "0" and os.environ.get("GROUP_RANK", "0") not in ("", "0")


def _fail(message: str, code: int) -> None:
    # markup off: messages repeat user input, which may contain [brackets]
    if not _other_rank():
        err_console.print(f"error: {message}", markup=False, style="bold red" if code != EXIT_USAGE else None)
    elif _first_of_another_node():
        err_console.print(f"error: rank {os.environ['RANK']}: {message}", markup=False)
    raise typer.Exit(code)


def _guarded(action: Callable[[], None]) -> None:
    """Run a command body, mapping our exceptions to a message and an exit code (never a traceback)."""
    code = 0
    try:
        _guarded_body(action)
    except typer.Exit as done:
        code = done.exit_code
        raise
    finally:
        if _under_torchrun():  # under `trainer run --nproc`, rank 0 reports its exit code
            from trainer.distributed import record_exit_code

            record_exit_code(code)


def _guarded_body(action: Callable[[], None]) -> None:
    from trainer.errors import Terminated, TrainingFailed, UsageError, first_line

    try:
        action()
    except typer.Exit:
        raise
    except UsageError as err:
        _fail(str(err), EXIT_USAGE)
    except TrainingFailed as err:
        _fail(str(err), EXIT_FAILED)
    except KeyboardInterrupt:
        if not _other_rank():
            err_console.print("interrupted (SIGINT)")
        raise typer.Exit(130)
    except Terminated as stop:  # predict, export: their temporary files are gone, an --output untouched
        err_console.print(f"stopped ({stop}) before its output was complete")
        raise typer.Exit(128 + stop.signum)
    except Exception as err:
        # a bug in trainer, not in the input: one line, and the traceback only on request
        if os.environ.get("TRAINER_DEBUG"):
            raise
        if _other_rank():  # a failure of this rank alone (out of memory, say): rank 0 cannot tell it
            err_console.print(f"error: rank {os.environ['RANK']}: {type(err).__name__}: {first_line(err)}", markup=False)
            raise typer.Exit(EXIT_FAILED)
        _fail(
            f"internal error, a bug in trainer: {type(err).__name__}: {err}\n"
            "  rerun with TRAINER_DEBUG=1 for the traceback, and please report it",
            EXIT_FAILED,
        )


ConfigArg = typer.Argument(..., help="A YAML config file, e.g. configs/lenet.yaml", show_default=False)
OverridesArg = typer.Argument(None, help="KEY=VALUE overrides, e.g. optimizer.lr=0.1 train.epochs=3", show_default=False)


def _load(config: Path, overrides: Optional[List[str]]):
    from trainer.config import load_config

    return load_config(config, overrides or [])


PluginsOpt = typer.Option(
    None, "--plugins", help="Your own models and datasets: Python files or modules, comma-separated (also TRAINER_PLUGINS)"
)


# the options of the commands on a trained run: eval, predict, export
TargetArg = typer.Argument(..., help="A run folder or a checkpoint file", show_default=False)
BestOpt = typer.Option(False, "--best", help="Use the run folder's best.pt (the default when it exists)")
LastOpt = typer.Option(False, "--last", help="Use the run folder's last.pt")
DeviceOpt = typer.Option(None, "--device", help="auto, cpu, cuda, cuda:N, mps")
PluginForceOpt = typer.Option(False, "--force", help="Go on with a plugin file that changed since the run")


def _which(best: bool, last: bool) -> Optional[str]:
    """The checkpoint --best / --last pick in a run folder (None: best.pt when there is one)."""
    from trainer.errors import UsageError

    if best and last:
        raise UsageError("--best and --last exclude each other")
    return "best" if best else "last" if last else None


def _on_trained_run(target: Path, best: bool, last: bool, plugins: Optional[str], force: bool) -> Optional[str]:
    """What eval, predict and export do first: the plugins the run needs, checked; the checkpoint --best/--last pick."""
    which = _which(best, last)
    _plugins(plugins, target if target.exists() else None, force)
    return which


def _plugins(option: Optional[str], run: Optional[Path] = None, force: bool = False) -> None:
    """Import the plugins; for a command on a run (a folder or a checkpoint in one), first check that
    the plugins it was trained with are loaded and unchanged."""
    from trainer.plugins import load_plugins, refuse_missing_plugins

    load_plugins(option)
    if run is not None:
        from trainer.runs import _read_json

        folder = run if run.is_dir() else run.parent.parent
        refuse_missing_plugins(_read_json(folder / "env.json").get("plugins"), force=force, folder=folder)


@app.command()
def run(
    config: Path = ConfigArg,
    overrides: Optional[List[str]] = OverridesArg,
    device: Optional[str] = typer.Option(None, "--device", help="Override the config's device: auto, cpu, cuda, cuda:N, mps"),
    run_dir: Optional[Path] = typer.Option(None, "--run-dir", help="Write the run exactly here (a new or empty folder)"),
    runs_root: Path = typer.Option(Path("runs"), "--runs-root", help="Where run folders go: <root>/<name>/<timestamp>"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Print only the run folder"),
    resume: Optional[str] = typer.Option(
        None, "--resume", help="Continue from a checkpoint file, a run folder, or 'auto' (the newest that loads)"
    ),
    force: bool = typer.Option(False, "--force", help="Resume even if the run differs from the checkpoint's (seed, model, data, optimizer, ...)"),
    nproc: int = typer.Option(1, "--nproc", min=1, help="Train data-parallel in N processes on this machine (torchrun); data.batch_size is per process"),
    plugins: Optional[str] = PluginsOpt,
) -> None:
    """Train a model from CONFIG; prints the run folder."""

    def action() -> None:
        _plugins(plugins, Path(resume) if resume and Path(resume).exists() else None, force)
        cfg = _load(config, overrides)  # a bad config fails here, once, before any process starts
        if nproc > 1:
            _launch(nproc)
        _train(cfg, run_dir, runs_root, device, quiet, resume, force)

    _guarded(action)


def _launch(nproc: int) -> None:
    """Run this same command in `nproc` processes through torch.distributed.run, and exit with rank 0's code."""
    from trainer.distributed import launch
    from trainer.errors import UsageError

    if _under_torchrun():
        raise UsageError("--nproc starts its own processes; under torchrun, leave it out", key="--nproc")
    raise typer.Exit(launch(nproc, _without_nproc(sys.argv[1:])))


def _without_nproc(args: list[str]) -> list[str]:
    """The command line minus its --nproc option: what each process runs."""
    out, skip = [], False
    for arg in args:
        if skip:
            skip = False
        elif arg == "--nproc":
            skip = True
        elif not arg.startswith("--nproc="):
            out.append(arg)
    return out


@app.command()
def resume(
    run_dir: Path = typer.Argument(..., help="A run folder, e.g. runs/lenet/20261122-101500", show_default=False),
    overrides: Optional[List[str]] = OverridesArg,
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Print only the run folder"),
    force: bool = typer.Option(False, "--force", help="Resume even if the run differs from the checkpoint's (seed, model, data, optimizer, ...)"),
    nproc: int = typer.Option(1, "--nproc", min=1, help="Resume in N processes (torchrun); as many as the run had"),
    plugins: Optional[str] = PluginsOpt,
) -> None:
    """Continue an interrupted run in its own folder, from its newest checkpoint that loads."""

    def action() -> None:
        from trainer.errors import UsageError
        from trainer.runs import started_in

        if not (run_dir / "config.yaml").is_file():
            raise UsageError(f"'{run_dir}' is not a run folder: it has no config.yaml")
        _plugins(plugins, run_dir, force)
        cfg = _load(run_dir / "config.yaml", overrides)
        if nproc > 1:
            _launch(nproc)
        _train(cfg, None, run_dir.parent.parent, None, quiet, str(run_dir), force, data_dir=started_in(run_dir))

    _guarded(action)


def _train(cfg, run_dir, runs_root, device, quiet, resume_from, force, data_dir=None) -> None:
    from trainer.runs import execute_run

    from trainer import PROCESS_STARTED

    result = execute_run(
        cfg, run_dir=run_dir, root=runs_root, device=device, quiet=quiet, resume=resume_from, force=force,
        data_dir=data_dir, started=PROCESS_STARTED,
    )  # fmt: skip
    if _other_rank():
        if result.exit_code:
            raise typer.Exit(result.exit_code)
        return
    if result.error:
        err_console.print(f"error: {result.error}" if result.exit_code == EXIT_FAILED else result.error, markup=False)
    if result.note and not quiet:
        err_console.print(result.note, markup=False)
    # the last line on stdout is the run folder, for scripts, whatever the status
    say(str(result.run_dir))
    if result.exit_code:
        raise typer.Exit(result.exit_code)


@app.command("eval")
def eval_(
    target: Path = TargetArg,
    split: str = typer.Option("val", "--split", help="val (the held-out split; MNIST's test split), test (the same) or train"),
    best: bool = BestOpt,
    last: bool = LastOpt,
    device: Optional[str] = DeviceOpt,
    as_json: bool = typer.Option(False, "--json", help="Print the metrics as one JSON object"),
    plugins: Optional[str] = PluginsOpt,
    force: bool = PluginForceOpt,
) -> None:
    """Evaluate a saved model on its data and print its metrics."""

    def action() -> None:
        import json

        from trainer.runs import evaluate_checkpoint

        which = _on_trained_run(target, best, last, plugins, force)
        metrics = evaluate_checkpoint(target, split=split, which=which, device=device)
        if as_json:
            say(json.dumps(metrics))
            return
        out = ViewConsole(highlight=False, soft_wrap=True)
        out.print(f"{metrics['checkpoint']} (step {metrics['step']}), {metrics['split']} split, {metrics['samples']} samples", markup=False)
        for name in ("loss", "accuracy"):
            if name in metrics:
                value = f"{metrics[name]:.2%}" if name == "accuracy" else f"{metrics[name]:.6g}"
                out.print(f"  {name} {value}", markup=False)

    _guarded(action)


@app.command()
def validate(config: Path = ConfigArg, overrides: Optional[List[str]] = OverridesArg, plugins: Optional[str] = PluginsOpt) -> None:
    """Check CONFIG, build everything and push one batch through; trains nothing."""

    def action() -> None:
        from trainer.build import build_run, check_one_batch
        from trainer.data import describe_data
        from trainer.models import count_parameters

        _plugins(plugins)
        cfg = _load(config, overrides)
        built = build_run(cfg)
        check_one_batch(built)
        out = ViewConsole(highlight=False, soft_wrap=True)
        out.print(f"{config}: valid", markup=False)
        out.print(
            f"  model {built.config.model.name} ({count_parameters(built.model):,} parameters) on {built.device}; "
            f"data {built.config.data.name}: {describe_data(built.info)}",
            markup=False,
        )
        out.print(
            f"  {built.settings.epochs} epochs x {built.settings.steps_per_epoch(len(built.train_batches))} steps"
            + (f", at most {built.settings.max_steps} steps" if built.settings.max_steps else ""),
            markup=False,
        )

    _guarded(action)


@app.command("show-config")
def show_config(config: Path = ConfigArg, overrides: Optional[List[str]] = OverridesArg, plugins: Optional[str] = PluginsOpt) -> None:
    """Print the fully resolved config as YAML: defaults and inferred sizes filled in."""

    def action() -> None:
        from trainer.build import build_run

        _plugins(plugins)
        cfg = _load(config, overrides)
        built = build_run(cfg)
        sys.stdout.write(built.config.to_yaml())

    _guarded(action)


@app.command()
def schema() -> None:
    """Print the JSON Schema of a config, for editor completion and inline errors."""

    def action() -> None:
        import json

        from trainer.config import json_schema

        sys.stdout.write(json.dumps(json_schema(), indent=2) + "\n")

    _guarded(action)


@app.command("list-models")
def list_models(plugins: Optional[str] = PluginsOpt) -> None:
    """The registered models: name, description, input shape, parameter count."""

    def action() -> None:
        _plugins(plugins)
        _print_registry("models")

    _guarded(action)


class Kind(str, Enum):
    models = "models"
    datasets = "datasets"
    losses = "losses"
    optimizers = "optimizers"
    schedulers = "schedulers"


@app.command("list")
def list_(
    kind: Optional[Kind] = typer.Argument(None, help="models, datasets, losses, optimizers or schedulers"),
    plugins: Optional[str] = PluginsOpt,
) -> None:
    """List a registry (all of them when KIND is left out)."""

    def action() -> None:
        _plugins(plugins)
        for k in [kind] if kind else list(Kind):
            _print_registry(k.value)

    _guarded(action)


def _print_registry(kind: str) -> None:
    from rich.table import Table

    from trainer.config import registries

    registry = {r.plural: r for r in registries().values()}[kind]
    table = Table(title=kind, title_justify="left", show_edge=False, pad_edge=False)
    table.add_column("name", style="bold", no_wrap=True)
    if kind == "models":
        from trainer.models import count_parameters

        table.add_column("input", no_wrap=True)
        table.add_column("parameters", justify="right", no_wrap=True)
    table.add_column("description")
    for entry in registry:
        aliases = registry.aliases_of(entry.name)
        name = entry.name + (f" ({', '.join(aliases)})" if aliases else "")
        if kind == "models":
            shape = entry.info.get("input_shape")
            try:
                params = f"{count_parameters(entry.factory()):,}"
            except Exception:  # a plugin model that needs arguments to build
                params = "?"
            table.add_row(name, "x".join(map(str, shape)) if shape else "any", params, entry.description)
        else:
            table.add_row(name, entry.description)
    ViewConsole().print(table)


@app.command("runs")
def runs_(
    root: Path = typer.Argument(Path("runs"), help="The folder to look for run folders in, at any depth"),
    sort: str = typer.Option("started", "--sort", help="A column (name, started, status, epochs, steps, best, wall_time), a metric (val_loss: best first) or a config key"),
    status: Optional[str] = typer.Option(None, "--status", help="Only runs of this status: completed, failed, interrupted, pruned, running, unreadable (several with commas)"),
    as_json: bool = typer.Option(False, "--json", help="Print the runs as a JSON list"),
    as_csv: bool = typer.Option(False, "--csv", help="Print the runs as CSV"),
) -> None:
    """The runs table: one row per run folder under ROOT, with the config keys that differ."""

    def action() -> None:
        import json

        from trainer import catalog
        from trainer.errors import UsageError

        if as_json and as_csv:
            raise UsageError("--json and --csv exclude each other; give one")
        table = catalog.list_runs(root, sort=sort, status=status)
        if as_json:
            say(json.dumps(catalog.records(table), indent=2))
        elif as_csv:
            say(catalog.to_csv(table), end="")
        elif not table.runs:
            what = f"no {status} runs" if status else "no runs"
            say(f"{what} under {root}" + (f" ({table.total} run(s) in all)" if table.total else ""))
        else:
            grid, note = catalog.runs_grid(table, width=catalog.terminal_width())
            catalog.show(grid, *([note] if note else []))

    _guarded(action)


@app.command()
def compare(
    runs: List[Path] = typer.Argument(..., help="Two run folders or more, e.g. runs/lenet/20261201-101500 runs/lenet/20261201-103000", show_default=False),
) -> None:
    """What differs between runs: the config keys, then final and best metrics, the better marked."""

    def action() -> None:
        from trainer import catalog

        catalog.show(*catalog.compare_grids(catalog.compare_runs(runs)))

    _guarded(action)


@app.command()
def sweep(
    sweep_file: Path = typer.Argument(..., help="A sweep file, e.g. sweeps/lenet.yaml", show_default=False),
    workers: int = typer.Option(1, "--workers", min=1, help="Trials run at once, each in its own process (threads split between them)"),
    trials: Optional[int] = typer.Option(None, "--trials", min=1, help="How many trials (random/tpe); caps a grid's cells. Replaces the file's trials"),
    storage: Optional[str] = typer.Option(None, "--storage", help="A database URL shared by several machines, e.g. postgresql://user:pw@host/db (default: a journal file in the sweep folder)"),
    retry_failed: bool = typer.Option(False, "--retry-failed", help="Run failed trials again, each in a new trial folder"),
    force: bool = typer.Option(False, "--force", help="Go on with a sweep whose sweep file (or base config) changed since it started"),
    runs_root: Path = typer.Option(Path("runs"), "--runs-root", help="Where the sweep folder goes: <root>/<sweep name>"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Print only the sweep folder"),
    plugins: Optional[str] = PluginsOpt,
) -> None:
    """Run many trials of a config as one experiment (Optuna); the same command again continues it."""

    def action() -> None:
        _plugins(plugins)
        from trainer.sweep import run_sweep
        from trainer.tracking import SweepView, format_metric

        view = SweepView(err_console, quiet=quiet)  # run_sweep tells it the metric, once the sweep file is read
        try:
            result = run_sweep(
                sweep_file, workers=workers, trials=trials, storage=storage, retry_failed=retry_failed, force=force,
                root=runs_root, view=view,
            )  # fmt: skip
        finally:
            view.close()
        if not quiet:
            counts = ", ".join(f"{n} {state}" for state, n in sorted(result.counts.items()))
            err_console.print(f"sweep {result.folder.name}: {counts or 'no trials'}", markup=False)
            for row in result.failed:
                err_console.print(f"  failed: {row['trial']}: {row['error']}", markup=False)
            if result.best is not None:
                best = result.best
                params = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in best["params"].items())
                err_console.print(f"best: {best['folder'].name}, {view.metric} {format_metric(view.metric, best['value'])} ({params})", markup=False)
                err_console.print(f"  run folder:  {best['folder']}\n  best config: {result.folder / 'best.yaml'}", markup=False)
            err_console.print(f"  tensorboard --logdir {result.folder}", markup=False)
            if result.exit_code in (130, 143):
                err_console.print("stopped; run the same command again to go on", markup=False)
        say(str(result.folder))
        if result.exit_code:
            raise typer.Exit(result.exit_code)

    _guarded(action)


@app.command()
def export(
    target: Path = TargetArg,
    fmt: Optional[str] = typer.Option(None, "--format", help="pt2 (torch.export, the default), onnx (needs trainer[export]) or safetensors (the weights and config.yaml)"),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="The file to write (default: <run>/export/model.<format>)"),
    best: bool = BestOpt,
    last: bool = LastOpt,
    force: bool = typer.Option(False, "--force", help="Replace an existing output; go on with a plugin file that changed since the run"),
    plugins: Optional[str] = PluginsOpt,
) -> None:
    """Export a trained model as a file other programs load, checked against the model first; prints its path."""

    def action() -> None:
        from trainer.errors import terminated_raises
        from trainer.export import FORMATS, ExportMismatch, export_run

        which = _on_trained_run(target, best, last, plugins, force)
        try:
            with terminated_raises():  # a SIGTERM leaves no temporary file behind
                done = export_run(target, fmt=fmt, output=output, which=which, force=force)
        except ExportMismatch as err:  # the input was fine; the exporter's result is wrong
            _fail(str(err), EXIT_FAILED)
        shape = ", ".join(["batch", *map(str, done.input_shape)])
        step = f" (step {done.step})" if done.step is not None else ""
        for line in (
            f"exported model {done.model} from {done.checkpoint}{step}",
            f"  format  {done.format}: {FORMATS[done.format]}",
            f"  input   ({shape}) {done.dtype}; the batch dimension is dynamic",
            f"  checked on {done.samples} samples of the {done.split} split: max abs difference "
            f"{done.max_abs_diff:.3g} (limit {done.limit:.3g})",
            *(f"  beside  {path}" for path in done.extra),
            f"  took    {done.seconds:.1f} s",
        ):
            err_console.print(line, markup=False)
        say(str(done.path))

    _guarded(action)


@app.command()
def predict(
    target: Path = TargetArg,
    inputs: Optional[str] = typer.Argument(
        None, help="A CSV file with the run's feature columns, an image file, a folder of images or a quoted glob ('imgs/*.png')", show_default=False
    ),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Write the predictions to this file (default: stdout), whole or not at all"),
    fmt: Optional[str] = typer.Option(None, "--format", help="csv (the default) or jsonl (the default for an --output ending in .jsonl)"),
    split: Optional[str] = typer.Option(None, "--split", help="Predict on the run's own data instead of INPUT: val (or test) or train"),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Inputs per forward pass (default: the run's data.batch_size)"),
    best: bool = BestOpt,
    last: bool = LastOpt,
    device: Optional[str] = DeviceOpt,
    plugins: Optional[str] = PluginsOpt,
    force: bool = PluginForceOpt,
) -> None:
    """Predict with a saved model on new CSV rows or images, preprocessed as its training data were."""

    def action() -> None:
        from trainer.errors import terminated_raises
        from trainer.predict import describe, predict

        which = _on_trained_run(target, best, last, plugins, force)
        with terminated_raises():  # a SIGTERM leaves no temporary file behind
            result = predict(
                target, inputs, split=split, which=which, device=device,
                batch_size=batch_size, output=output, fmt=fmt, stream=sys.stdout,
            )  # fmt: skip
        for line in describe(result, output):
            err_console.print(line, markup=False)

    _guarded(action)


def main() -> None:  # pragma: no cover - `python -m trainer`
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
