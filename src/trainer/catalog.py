"""`trainer runs` and `trainer compare`: run folders read into rows, the config keys that differ
between runs, and which run did better.

Fast on thousands of run folders: a row reads summary.json, config.yaml and env.json (and the last
line of metrics.jsonl when there is no summary.json), never a checkpoint, and nothing here imports
torch.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import struct
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Iterable

import yaml

from trainer.errors import UsageError
from trainer.runs import LOCK_FILE

STATUSES = ("completed", "failed", "interrupted", "pruned", "running", "unreadable")
_ENDED = ("completed", "failed", "interrupted", "pruned")  # what summary.json records (pruned: a sweep's pruner stopped the trial)
COLUMNS = ("name", "started", "status", "epochs", "steps", "best", "wall_time")
RUN_FOLDER_HOLDS = (
    "a run folder holds config.yaml and env.json (and summary.json once the run has ended), "
    "as trainer run writes it under runs/<name>/<timestamp>"
)
MISSING = object()  # a config key a run does not have (not the same as a key set to null)
_TAIL_BYTES = 8192  # the end of metrics.jsonl read for a run without summary.json
_STALE_S = 1.0  # env.json newer than summary.json by this much: a resume started after the summary was written

try:  # libyaml's loader reads a config about eight times faster than the pure-Python one
    _YamlLoader: Any = yaml.CSafeLoader
except AttributeError:  # pragma: no cover - PyYAML built without libyaml
    _YamlLoader = yaml.SafeLoader


@dataclass
class Run:
    """One run folder as the runs table shows it."""

    path: Path
    name: str  # the folder's path relative to the root it was found under
    status: str  # one of STATUSES
    started: str | None = None  # env.json's ISO time
    epochs: int | None = None
    steps: int | None = None
    monitor: str | None = None  # the metric best.pt follows (train.monitor, or its default)
    mode: str = "min"  # whether lower (min) or higher (max) of `monitor` is better
    best: dict[str, Any] = field(default_factory=dict)
    final: dict[str, Any] = field(default_factory=dict)
    wall_time_s: float | None = None
    config: dict[str, Any] = field(default_factory=dict)  # dotted keys
    error: str | None = None  # what stopped a failed run, or what could not be read

    @property
    def best_value(self) -> Any:
        return self.best.get(self.monitor) if self.monitor else None


# ---------------------------------------------------------------------------------------------
# finding and reading run folders


def is_run_folder(folder: Path) -> bool:
    """Whether `folder` holds a run: config.yaml and env.json, which a run writes before it trains."""
    return (Path(folder) / "config.yaml").is_file() and (Path(folder) / "env.json").is_file()


def find_runs(root: Path) -> list[Path]:
    """Every run folder under `root`, at any depth (a sweep's trials are runs/<sweep>/trial-0000),
    `root` itself included; the walk does not go into a run folder (its checkpoints)."""
    found = []
    for folder, subfolders, files in os.walk(root):
        if "config.yaml" in files and "env.json" in files:
            found.append(Path(folder))
            subfolders.clear()
        else:
            subfolders.sort()
    return found


def read_run(folder: Path, name: str | None = None) -> Run:
    """The row of one run folder; a file that cannot be read or parsed gives status `unreadable`,
    with the file named in `error`, never an exception."""
    folder = Path(folder)
    run = Run(folder, name or str(folder), "unreadable")
    try:
        # os.path, not pathlib: a Path per file was a tenth of a thousand-run table's time
        where = str(folder)
        env = _read_mapping(where, "env.json", json.loads)
        config = _read_mapping(where, "config.yaml", parse_config)
        summary = _read_mapping(where, "summary.json", json.loads, missing_ok=True)
    except _Unreadable as err:
        run.error = str(err)
        return run
    run.config = config
    run.started = env.get("started") if isinstance(env.get("started"), str) else None
    _read_outcome(run, folder, env, summary)
    _set_monitor(run, config)
    return run


_PARSED: dict[str, dict[str, Any]] = {}  # a config's (or a top-level section's) text -> its flat keys


def parse_config(text: str) -> dict[str, Any]:
    """A config.yaml's text as flat dotted keys (see `flatten`); raises YAMLError, or TypeError
    for a text that is not a mapping.

    YAML construction costs ~1.5 ms a config, most of a thousand-run table. Runs share most of
    their config's top-level sections (a sweep varies a few keys), so each section's text is parsed
    once; a text with anchors or documents markers, or a section that is not one key, is parsed whole.
    """
    if text in _PARSED:
        return _PARSED[text]
    sections = _sections(text)
    flat: dict[str, Any] | None = {}
    for section in sections or ():
        if section not in _PARSED:
            try:
                parsed = yaml.load(section, Loader=_YamlLoader)
            except yaml.YAMLError:  # only the whole text can say what is wrong, and where
                parsed = None
            _PARSED[section] = flatten(parsed) if isinstance(parsed, dict) and len(parsed) == 1 else None
        if _PARSED[section] is None:
            flat = None
            break
        flat.update(_PARSED[section])
    if sections is None or flat is None:
        whole = yaml.load(text, Loader=_YamlLoader)
        if not isinstance(whole, dict):
            raise TypeError("is empty" if whole is None else f"holds {type(whole).__name__}, not a mapping of keys")
        flat = flatten(whole)
    _PARSED[text] = flat
    return flat


def _sections(text: str) -> list[str] | None:
    """The text of each top-level key with the indented lines under it; None where splitting could
    change the meaning (anchors and aliases, several documents, directives) or there are no keys."""
    if "&" in text or "*" in text or "\t" in text:
        return None
    sections: list[list[str]] = [[]]
    for line in text.splitlines():
        if line.startswith(("---", "...", "%", "-", "?", "[", "{", '"', "'")):
            return None
        if line and not line[0].isspace() and not line.startswith("#"):
            sections.append([])
        sections[-1].append(line)
    preamble = "".join(sections[0]).strip()
    if preamble and not all(not line.strip() or line.lstrip().startswith("#") for line in sections[0]):
        return None
    return ["\n".join(lines) + "\n" for lines in sections[1:]] or None


class _Unreadable(Exception):
    """A run file that cannot be read or is not what trainer writes."""


def _read_mapping(folder: str, name: str, parse: Any, missing_ok: bool = False) -> dict[str, Any] | None:
    try:
        with open(os.path.join(folder, name), encoding="utf-8") as file:
            text = file.read()
    except FileNotFoundError:
        if missing_ok:
            return None
        raise _Unreadable(f"{name} is missing") from None
    except (OSError, UnicodeDecodeError) as err:
        raise _Unreadable(f"{name} cannot be read: {getattr(err, 'strerror', None) or err}") from None
    try:
        data = parse(text)
    except (ValueError, yaml.YAMLError) as err:
        raise _Unreadable(f"{name} is not valid {name.rpartition('.')[2].upper()}: {str(err).splitlines()[0]}") from None
    except TypeError as err:
        raise _Unreadable(f"{name} {err}") from None
    if not isinstance(data, dict):
        raise _Unreadable(f"{name} {'is empty' if data is None else f'holds {type(data).__name__}, not a mapping of keys'}")
    return data


def _read_outcome(run: Run, folder: Path, env: dict[str, Any], summary: dict[str, Any] | None) -> None:
    """Status, epochs, steps, metrics and wall time, from summary.json or, without a current one,
    from the lock and the last line of metrics.jsonl."""
    if summary is not None:
        run.best = _metrics(summary.get("best"))
        run.final = _metrics(summary.get("final"))
    current = summary is not None and not _summary_is_stale(folder, env)
    if lock_held(folder):
        run.status = "running"
    elif current:
        status = summary.get("status")
        run.status = status if status in _ENDED else "unreadable"
        if run.status == "unreadable":
            run.error = f"summary.json has status {status!r}, not {', '.join(_ENDED)}"
        elif status != "completed":
            run.error = summary.get("error") if isinstance(summary.get("error"), str) else None
    else:
        run.status = "interrupted"  # killed: no summary.json (or only the one of an earlier command)
        run.error = "ended without summary.json (killed?)"
    if current and run.status != "running":
        run.epochs, run.steps = _int(summary.get("epochs")), _int(summary.get("steps"))
        wall = summary.get("wall_time_s")
        run.wall_time_s = float(wall) if isinstance(wall, (int, float)) and not isinstance(wall, bool) else None
        return
    last = _last_metrics_line(os.path.join(folder, "metrics.jsonl"))
    if last:
        run.steps = _int(last.get("step"))
        epoch = _int(last.get("epoch"))
        # a val line ends its epoch; a train line is inside one
        run.epochs = epoch if epoch is None or last.get("split") == "val" else epoch - 1
    began = _command_started(env)
    if began is not None:
        end = time.time() if run.status == "running" else last.get("time") if last else None
        run.wall_time_s = round(end - began, 3) if isinstance(end, (int, float)) and end >= began else None


def _summary_is_stale(folder: Path, env: dict[str, Any]) -> bool:
    """Whether summary.json is from a command before the last resume (which noted itself in env.json
    and then was killed): a resume rewrites env.json when it starts and summary.json when it ends."""
    if not env.get("resumes"):
        return False
    try:
        return os.stat(os.path.join(folder, "env.json")).st_mtime > os.stat(os.path.join(folder, "summary.json")).st_mtime + _STALE_S
    except OSError:
        return False


def _command_started(env: dict[str, Any]) -> float | None:
    """When the folder's latest command started (the last resume's time, or the run's start)."""
    resumes = env.get("resumes")
    stamp = resumes[-1].get("time") if isinstance(resumes, list) and resumes and isinstance(resumes[-1], dict) else env.get("started")
    moment = _parse_time(stamp)
    return moment.timestamp() if moment else None


def _parse_time(stamp: Any) -> datetime | None:
    if not isinstance(stamp, str):
        return None
    try:
        moment = datetime.fromisoformat(stamp)
    except ValueError:
        return None
    return moment if moment.tzinfo else moment.astimezone()


def _last_metrics_line(path: str) -> dict[str, Any] | None:
    """The last complete line of metrics.jsonl, read from its end (the file grows with the run)."""
    try:
        with open(path, "rb") as file:
            size = file.seek(0, os.SEEK_END)
            file.seek(max(0, size - _TAIL_BYTES))
            tail = file.read()
    except OSError:
        return None
    for line in reversed(tail.splitlines()):
        try:
            point = json.loads(line)
        except ValueError:
            continue  # half a line: the process was killed mid-write, or the read began mid-line
        if isinstance(point, dict):
            return point
    return None


def _metrics(value: Any) -> dict[str, Any]:
    """summary.json's `best` or `final`: metric names to numbers (None where a value was not finite)."""
    if not isinstance(value, dict):
        return {}
    return {str(k): v for k, v in value.items() if v is None or (isinstance(v, (int, float)) and not isinstance(v, bool))}


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _set_monitor(run: Run, config: dict[str, Any]) -> None:
    """The metric the run's best.pt followed (train.monitor), and its direction (train.mode), as
    the loop decides them when they are null: val_loss when the run validates, else train_loss."""
    monitor, mode = config.get("train.monitor"), config.get("train.mode")
    if not isinstance(monitor, str):
        if run.best or run.final:
            validates = "val_loss" in run.best or "val_loss" in run.final
        else:  # no summary.json yet
            validates = config.get("data.val_fraction") != 0
        monitor = "val_loss" if validates else "train_loss"
    run.monitor = monitor
    run.mode = mode if mode in ("min", "max") else metric_mode(monitor)


def metric_mode(metric: str) -> str:
    """Whether a metric is better higher (max: accuracy) or lower (min: losses)."""
    return "max" if "accuracy" in metric else "min"


def lock_held(folder: Path) -> bool:
    """Whether a live trainer process holds `folder`'s lock (see runs.lock_run_folder). Only asks:
    a lock is never taken here, so a run starting or resuming at this moment is not refused.

    Not for a process that may hold the lock itself: closing any descriptor of the file releases
    the calling process's own POSIX locks on it (`trainer runs` and `compare` hold none)."""
    try:
        fd = os.open(os.path.join(folder, LOCK_FILE), os.O_RDONLY)
    except OSError:
        return False  # no .lock: a run folder that nothing ever trained in, or copied without it
    try:
        return _locked_by_another(fd)
    finally:
        os.close(fd)


def _locked_by_another(fd: int) -> bool:
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows: trainer takes no lock there
        return False
    if sys.platform.startswith("linux") and struct.calcsize("l") == 8:
        # F_GETLK only asks who holds the lock; struct flock on 64-bit Linux: short type, short whence,
        # (padding), off_t start, off_t len, pid_t pid, (padding)
        layout = "hhxxxxqqixxxx"
        answer = fcntl.fcntl(fd, fcntl.F_GETLK, struct.pack(layout, fcntl.F_WRLCK, os.SEEK_SET, 0, 0, 0))
        return struct.unpack(layout, answer)[0] != fcntl.F_UNLCK
    try:  # elsewhere: a shared lock taken for an instant and let go at once
        fcntl.lockf(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:
        return True
    fcntl.lockf(fd, fcntl.LOCK_UN)
    return False


# ---------------------------------------------------------------------------------------------
# the config keys that differ


def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """{'optimizer': {'lr': 0.1}} -> {'optimizer.lr': 0.1}; lists, null and empty mappings stay values."""
    if not isinstance(value, dict) or (not value and prefix):
        return {prefix: value}
    flat: dict[str, Any] = {}
    for key, inner in value.items():
        flat.update(flatten(inner, f"{prefix}.{key}" if prefix else str(key)))
    return flat


def differing_keys(configs: Iterable[dict[str, Any]]) -> list[str]:
    """The dotted keys whose values differ between the flattened configs, or that some lack; in
    the order the configs list them."""
    configs = list(configs)
    keys: dict[str, None] = {}
    for config in configs:
        keys.update(dict.fromkeys(config))
    return [k for k in keys if len({_identity(c.get(k, MISSING)) for c in configs}) > 1]


def _identity(value: Any) -> Any:
    """A value as something hashable that tells settings apart (1, 1.0 and true are three)."""
    if value is MISSING:
        return MISSING
    if value is None or isinstance(value, (str, int, float)):
        return type(value), value
    return json.dumps(value, sort_keys=True, default=str)


def format_value(value: Any) -> str:
    """A config value as YAML writes it: null, true, 0.05, [1, 2], text as is; '(missing)' when absent."""
    if value is MISSING:
        return "(missing)"
    if isinstance(value, str):
        return value
    if isinstance(value, float) and math.isfinite(value):
        short = f"{value:g}"  # 1e+06, not 1000000.0; only where nothing is lost
        return short if float(short) == value and len(short) < len(repr(value)) else repr(value)
    return json.dumps(value, default=str, separators=(", ", ": "))


# ---------------------------------------------------------------------------------------------
# the runs table


@dataclass
class RunsTable:
    root: Path
    runs: list[Run]  # after the status filter, sorted
    keys: list[str]  # the config keys that differ among `runs`
    total: int  # run folders found before the filter


def list_runs(root: Path, *, sort: str = "started", status: str | None = None) -> RunsTable:
    """The run folders under `root`, read, filtered by status (a comma-separated list) and sorted."""
    root = Path(root)
    if not root.exists():
        raise UsageError(f"'{root}' does not exist; give the folder trainer run wrote into (runs, or its --runs-root)", key="ROOT")
    if not root.is_dir():
        raise UsageError(f"'{root}' is a file, not a folder of runs", key="ROOT")
    wanted = _statuses(status)
    folders = find_runs(root)
    runs = [read_run(f, f.relative_to(root).as_posix() if f != root else str(root)) for f in folders]
    total = len(runs)
    if wanted:
        runs = [r for r in runs if r.status in wanted]
    keys = differing_keys(r.config for r in runs if r.status != "unreadable")
    return RunsTable(root, sort_runs(runs, sort, keys), keys, total)


def _statuses(status: str | None) -> set[str]:
    if status is None:
        return set()
    wanted = {s.strip() for s in status.split(",") if s.strip()}
    unknown = sorted(wanted - set(STATUSES))
    if unknown or not wanted:
        raise UsageError(
            f"unknown status {', '.join(repr(s) for s in unknown) or repr(status)}; accepted: {', '.join(STATUSES)} "
            "(several with commas: failed,interrupted)",
            key="--status",
        )
    return wanted


def sort_runs(runs: list[Run], by: str, keys: list[str]) -> list[Run]:
    """`runs` sorted by a column, a metric (the run's best value; the better first) or a differing
    config key; a run without the value goes last. Ties keep the start order."""
    runs = sorted(runs, key=lambda r: (_parse_time(r.started) is None, _timestamp(r), r.name))
    if by in ("started", ""):
        return runs
    metrics = _metric_names(runs)
    if by not in COLUMNS and by not in metrics and by not in keys:
        accepted = [*COLUMNS, *metrics, *keys]
        raise UsageError(
            f"cannot sort by '{by}'; accepted: {', '.join(accepted)} (a column, a metric, or a config key that differs)",
            key="--sort",
        )
    if by == "best":
        return _by_number(runs, lambda r: r.best_value, lambda r: r.mode)
    if by in ("epochs", "steps", "wall_time"):
        attribute = "wall_time_s" if by == "wall_time" else by
        return _by_number(runs, lambda r: getattr(r, attribute), lambda r: "min")
    if by == "name":
        return sorted(runs, key=lambda r: r.name)
    if by == "status":
        return sorted(runs, key=lambda r: STATUSES.index(r.status))
    if by in metrics:
        direction = _direction(by, runs)
        return _by_number(runs, lambda r: r.best.get(by), lambda r: direction)
    present = [r for r in runs if r.config.get(by, MISSING) is not MISSING]
    rest = [r for r in runs if r.config.get(by, MISSING) is MISSING]
    return sorted(present, key=lambda r: _config_order(r.config[by])) + rest


def _timestamp(run: Run) -> float:
    moment = _parse_time(run.started)
    return moment.timestamp() if moment else 0.0


def _by_number(runs: list[Run], value: Any, mode: Any) -> list[Run]:
    def key(run: Run) -> tuple[bool, float]:
        number = value(run)
        if not isinstance(number, (int, float)) or isinstance(number, bool) or not math.isfinite(number):
            return True, 0.0
        return False, -number if mode(run) == "max" else number

    return sorted(runs, key=key)


def _config_order(value: Any) -> tuple[int, Any]:
    """Numbers by value, then text, then anything else by its text; never a TypeError between types."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return 0, value
    return (1, value) if isinstance(value, str) else (2, format_value(value))


def _metric_names(runs: list[Run]) -> list[str]:
    names: dict[str, None] = {}
    for run in runs:
        names.update(dict.fromkeys(run.best))
        names.update(dict.fromkeys(run.final))
    return list(names)


def _direction(metric: str, runs: list[Run]) -> str:
    """A metric's direction: the runs' train.mode when they monitor it with one mode, else its name's."""
    modes = {r.mode for r in runs if r.monitor == metric}
    return modes.pop() if len(modes) == 1 else metric_mode(metric)


def records(table: RunsTable) -> list[dict[str, Any]]:
    """The rows as plain data, for --json: every differing config key, all best and final metrics."""
    return [
        {
            "name": r.name, "path": str(r.path), "started": r.started, "status": r.status, "epochs": r.epochs,
            "steps": r.steps, "monitor": r.monitor, "mode": r.mode, "best_value": r.best_value,
            "wall_time_s": r.wall_time_s, "best": r.best, "final": r.final,
            "config": {k: r.config[k] for k in table.keys if k in r.config}, "error": r.error,
        }
        for r in table.runs
    ]  # fmt: skip


def to_csv(table: RunsTable) -> str:
    """The rows as CSV: the table's columns, the monitored metric's name and value, one column per
    differing config key (empty where a run lacks it), and the error."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["name", "started", "status", "epochs", "steps", "monitor", "best", "wall_time_s", *table.keys, "error"])
    for r in table.runs:
        config = [format_value(r.config[k]) if k in r.config else "" for k in table.keys]
        writer.writerow([r.name, r.started, r.status, r.epochs, r.steps, r.monitor, r.best_value, r.wall_time_s, *config, r.error])
    return out.getvalue()


# ---------------------------------------------------------------------------------------------
# comparing runs


@dataclass
class Comparison:
    runs: list[Run]
    labels: list[str]  # each run's column heading: its path below the runs' common folder
    common: Path | None  # the folder the labels are relative to
    keys: list[str]  # the config keys that differ
    metrics: list[tuple[str, str, list[Any], set[int]]]  # (final|best, metric, a value per run, the better runs)


def compare_runs(paths: list[Path]) -> Comparison:
    """What differs between run folders: config keys, then final and best metrics with the better marked."""
    if len(paths) < 2:
        raise UsageError(f"compare needs two run folders or more, got {len(paths)}; e.g. trainer compare runs/a/1 runs/a/2", key="RUN")
    runs = []
    for path in paths:
        _check_run_folder(Path(path))
        run = read_run(Path(path), str(path))
        if run.status == "unreadable":
            raise UsageError(f"'{path}' cannot be read: {run.error}", key="RUN")
        runs.append(run)
    keys = differing_keys(r.config for r in runs)
    common, labels = _labels([Path(p) for p in paths])
    metrics = []
    for kind in ("final", "best"):
        names: dict[str, None] = {}
        for run in runs:
            names.update(dict.fromkeys(getattr(run, kind)))
        for metric in names:
            values = [getattr(run, kind).get(metric, MISSING) for run in runs]
            metrics.append((kind, metric, values, better(values, _direction(metric, runs))))
    return Comparison(runs, labels, common, keys, metrics)


def _check_run_folder(path: Path) -> None:
    if not path.exists():
        raise UsageError(f"'{path}' does not exist; {RUN_FOLDER_HOLDS}", key="RUN")
    if is_run_folder(path):
        return
    inside = find_runs(path) if path.is_dir() else []  # a runs root or a sweep's folder
    hint = f"; it holds {len(inside)} run folder(s), e.g. '{inside[0]}': compare those, or list them with trainer runs {path}" if inside else ""
    raise UsageError(f"'{path}' is not a run folder: {RUN_FOLDER_HOLDS}{hint}", key="RUN")


def better(values: list[Any], mode: str) -> set[int]:
    """The positions of the best values (all of them when tied); none unless two runs have a finite value."""
    finite = {i: v for i, v in enumerate(values) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}
    if len(finite) < 2 or len(set(finite.values())) < 2:
        return set()
    top = max(finite.values()) if mode == "max" else min(finite.values())
    return {i for i, v in finite.items() if v == top}


def _labels(paths: list[Path]) -> tuple[Path | None, list[str]]:
    """Column headings: the paths below their common folder (runs/lenet/1, runs/lenet/2 -> 1, 2)."""
    resolved = [p.resolve() for p in paths]
    try:
        common = Path(os.path.commonpath(resolved))
    except ValueError:
        return None, [str(p) for p in paths]
    labels = [p.relative_to(common).as_posix() for p in resolved]
    if any(label in ("", ".") for label in labels) or len(set(labels)) < len(labels):
        return None, [str(p) for p in paths]
    try:
        shown = common.relative_to(Path.cwd())
    except ValueError:
        shown = common
    return shown, labels


# ---------------------------------------------------------------------------------------------
# rendering: aligned columns drawn here, not with rich.table, whose layout of a thousand rows
# took 2-3 s (benchmarks/runs_table.py); Rich prints the result, with its styles


def format_metric(value: Any) -> str:
    if value is MISSING:
        return "-"
    if value is None:
        return "not finite"  # summary.json writes a NaN or infinite value as null
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def format_count(value: int | None) -> str:
    return "-" if value is None else f"{value:,}"


def format_duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


def format_started(stamp: str | None) -> str:
    moment = _parse_time(stamp)
    return moment.strftime("%Y-%m-%d %H:%M:%S") if moment else "-"


_GAP = "  "  # between columns: plain spaces read on any terminal, ASCII or not, and in a pipe


@dataclass
class Grid:
    """Rows of text cells drawn as aligned columns under a bold heading row."""

    headings: list[str]
    rows: list[list[str]] = field(default_factory=list)
    right: set[int] = field(default_factory=set)  # columns aligned right (numbers)
    styles: dict[tuple[int, int], str] = field(default_factory=dict)  # (row, column) -> a Rich style

    def widths(self) -> list[int]:
        return [max([len(h), *(len(row[i]) for row in self.rows)]) for i, h in enumerate(self.headings)]

    def width(self) -> int:
        return sum(self.widths()) + len(_GAP) * (len(self.headings) - 1)

    def text(self) -> Any:
        """The grid as one rich.text.Text, styled by spans: a Text per cell made a thousand rows slow."""
        from rich.text import Text

        widths = self.widths()
        lines, spans, at = [], [], 0
        for r, cells in enumerate([self.headings, *self.rows]):
            parts = []
            for c, (cell, width) in enumerate(zip(cells, widths)):
                padded = cell.rjust(width) if c in self.right else cell if c == len(cells) - 1 else cell.ljust(width)
                style = "bold" if r == 0 else self.styles.get((r - 1, c))
                start = at + sum(len(p) + len(_GAP) for p in parts)
                if style and cell:
                    spans.append((start, start + len(padded), style))
                parts.append(padded)
            line = _GAP.join(parts).rstrip()
            lines.append(line)
            at += len(line) + 1
        out = Text("\n".join(lines))
        for start, end, style in spans:
            out.stylize(style, start, end)
        return out


MAX_KEY_COLUMNS = 8  # config columns in the printed table; --json and --csv hold every key
_STATUS_STYLES = {"failed": "red", "interrupted": "yellow", "pruned": "blue", "running": "cyan", "unreadable": "magenta"}


def runs_grid(table: RunsTable, width: int | None = None) -> tuple[Grid, str | None]:
    """The runs table, with as many differing config keys as fit in `width` columns (at most
    MAX_KEY_COLUMNS), and a note naming the keys it leaves out."""
    monitors = {r.monitor for r in table.runs}
    single = monitors.pop() if len(monitors) == 1 else None  # one metric for all: its name heads the column
    grid = Grid(["run", "started", "status", "epochs", "steps", f"best {single}" if single else "best", "wall"], right={3, 4, 6})
    for i, r in enumerate(table.runs):
        grid.rows.append([
            r.name, format_started(r.started), r.status, format_count(r.epochs), format_count(r.steps),
            _best_cell(r, with_name=single is None), format_duration(r.wall_time_s),
        ])  # fmt: skip
        if r.status in _STATUS_STYLES:
            grid.styles[(i, 2)] = _STATUS_STYLES[r.status]
    core = len(grid.headings)
    for key in _key_order(table)[:MAX_KEY_COLUMNS]:
        grid.headings.append(key)
        for run, row in zip(table.runs, grid.rows):
            row.append(_config_cell(run, key))
        if width is not None and grid.width() > width:  # the terminal has no room for it
            grid.headings.pop()
            for row in grid.rows:
                row.pop()
            break
    shown = grid.headings[core:]
    left_out = [k for k in table.keys if k not in shown]
    note = None
    if left_out:
        named = ", ".join(left_out[:5]) + (", ..." if len(left_out) > 5 else "")
        note = f"{len(left_out)} more config key(s) differ ({named}); --csv or --json shows them all"
    return grid, note


def _best_cell(run: Run, with_name: bool) -> str:
    if not run.monitor or run.monitor not in run.best:
        return "-"
    value = format_metric(run.best_value)
    return f"{run.monitor} {value}" if with_name else value


def _config_cell(run: Run, key: str) -> str:
    if run.status == "unreadable":
        return ""
    value = run.config.get(key, MISSING)
    return "-" if value is MISSING else format_value(value)


def _key_order(table: RunsTable) -> list[str]:
    """The differing keys, those every run sets first (a sweep's parameters), then the rest, each
    in config order."""
    readable = [r for r in table.runs if r.status != "unreadable"]
    everywhere = [k for k in table.keys if all(k in r.config for r in readable)]
    return everywhere + [k for k in table.keys if k not in everywhere]


def compare_grids(comparison: Comparison) -> list[Any]:
    """What `trainer compare` prints: the config diff, then the runs' outcome and metrics, the
    better value of each metric marked with '*'."""
    where = f" (runs in {comparison.common})" if comparison.common is not None else ""
    runs = comparison.runs
    out: list[Any] = []
    if comparison.keys:
        out.append(f"config: {len(comparison.keys)} key(s) differ{where}")
        diff = Grid(["key", *comparison.labels])
        diff.rows = [[key, *(format_value(r.config.get(key, MISSING)) for r in runs)] for key in comparison.keys]
        out += [diff, ""]
    else:
        out += [f"config: no key differs{where}", ""]
    out.append("results (* marks the better value)")
    results = Grid(["", *comparison.labels])
    results.rows = [
        ["status", *(r.status for r in runs)],
        ["epochs", *(format_count(r.epochs) for r in runs)],
        ["steps", *(format_count(r.steps) for r in runs)],
        ["wall time", *(format_duration(r.wall_time_s) for r in runs)],
        ["monitor", *(f"{r.monitor} ({r.mode})" if r.monitor else "-" for r in runs)],
    ]
    for kind, metric, values, marked in comparison.metrics:
        for i in marked:
            results.styles[(len(results.rows), i + 1)] = "bold green"
        results.rows.append([f"{kind} {metric}", *(format_metric(v) + (" *" if i in marked else "") for i, v in enumerate(values))])
    out.append(results)
    return out


def show(*parts: Any) -> None:
    """Print grids and lines on stdout through a view console (a closed pipe stops nothing).
    Lines are never wrapped by Rich: a terminal wraps what is too wide for it, a pipe keeps it."""
    from trainer.console import ViewConsole

    out = ViewConsole(highlight=False, soft_wrap=True)
    for part in parts:
        if isinstance(part, Grid):
            out.print(part.text())
        else:
            out.print(part, markup=False, style="bold" if part.startswith(("config:", "results")) else None)


def terminal_width() -> int | None:
    """The terminal's width when stdout is one; None for a pipe or a file (no limit)."""
    from trainer.console import ViewConsole

    out = ViewConsole()
    return out.width if out.is_terminal else None
