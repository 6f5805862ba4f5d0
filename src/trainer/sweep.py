"""Sweeps: many runs of one config as one experiment, on Optuna.

A sweep file names a base config and the keys that vary. Every trial is an ordinary run folder,
`<runs>/<sweep>/trial-0003/`; Optuna's storage (a journal file in the sweep folder, or a database
named by --storage) holds which trials exist and how they ended. Running the same command again
continues the sweep: finished trials stay as they are, an interrupted trial resumes from its own
last.pt, failed trials are re-run only when asked.

Grid cells and random draws are planned up front and queued in the storage (Optuna's
`enqueue_trial`); a worker takes the next one by moving it from WAITING to RUNNING, which the
storage grants to one worker only, so two workers never run the same cell. TPE draws each trial
when it starts, from the trials finished so far. A trial records its owner (host, process and
that process's start time): a RUNNING trial whose owner on this host is gone was interrupted,
and the next sweep command on this host resumes it.
"""

from __future__ import annotations

import difflib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trainer.config import ConfigError, Problem, dump_yaml, read_yaml_file
from trainer.errors import TrainingFailed, UsageError, as_stop, first_line, stop_signals

SWEEP_KEYS = ("config", "name", "method", "trials", "metric", "mode", "seed", "set", "parameters", "prune")
METHODS = ("grid", "random", "tpe")
DISTRIBUTIONS = ("choice", "uniform", "log_uniform", "int")
METRICS = ("val_loss", "val_accuracy", "train_loss")  # train.monitor's choices
PRUNERS = ("none", "median")
MAX_GRID_CELLS = 10_000  # a bigger grid is a typo more often than a plan; --trials caps it
SWEEP_FILE, BEST_FILE, JOURNAL_FILE = "sweep.yaml", "best.yaml", "optuna.journal"
STORAGE_ENV = "TRAINER_SWEEP_STORAGE"  # the storage URL, to workers: not on their command line, where ps shows a password


# ---------------------------------------------------------------------------------------------
# the sweep file


@dataclass(frozen=True)
class Parameter:
    """One varying config key: a list of values (`choice`), or a range (`uniform`, `log_uniform`, `int`)."""

    key: str  # dotted config key, e.g. optimizer.lr
    kind: str  # choice | uniform | log_uniform | int
    values: tuple[Any, ...] = ()  # choice's values
    low: float = 0.0
    high: float = 0.0

    def size(self) -> int:
        """How many values a grid takes."""
        return len(self.values) if self.kind == "choice" else int(self.high) - int(self.low) + 1

    def value(self, position: int) -> Any:
        """A grid's value number `position` (an int range is never listed: it may be huge)."""
        return self.values[position] if self.kind == "choice" else int(self.low) + position

    def grid(self) -> list[Any]:
        """The values a grid takes."""
        return [self.value(i) for i in range(self.size())]

    def distribution(self) -> Any:
        from optuna.distributions import (
            CategoricalDistribution,
            FloatDistribution,
            IntDistribution,
        )

        if self.kind == "choice":
            return CategoricalDistribution(list(self.values))
        if self.kind == "int":
            return IntDistribution(int(self.low), int(self.high))
        return FloatDistribution(self.low, self.high, log=self.kind == "log_uniform")

    def written(self) -> Any:
        """As sweep.yaml holds it."""
        return list(self.values) if self.kind == "choice" else {self.kind: [self.low, self.high]}


@dataclass
class Sweep:
    """A checked sweep file."""

    name: str
    config: Path  # the base config, absolute
    method: str
    trials: int | None  # random/tpe: how many; grid: a cap on the cells (None: every cell)
    metric: str | None  # None until the first trial's build tells (train.monitor's own default)
    mode: str | None  # min | max
    seed: int
    prune: str
    fixed: dict[str, Any] = field(default_factory=dict)  # `set:`: dotted key -> value, for every trial
    parameters: list[Parameter] = field(default_factory=list)
    base: dict[str, Any] = field(default_factory=dict)  # the base config as resolved: a change to it is a change of the sweep

    def resolved(self) -> dict[str, Any]:
        """What sweep.yaml and the study record: a later command compares its own with it."""
        return {
            "name": self.name, "config": str(self.config), "method": self.method, "trials": self.trials,
            "metric": self.metric, "mode": self.mode, "seed": self.seed, "prune": self.prune,
            "set": dict(self.fixed), "parameters": {p.key: p.written() for p in self.parameters}, "base": self.base,
        }  # fmt: skip

    @classmethod
    def from_resolved(cls, data: dict[str, Any]) -> Sweep:
        """Back from sweep.yaml (written by `resolved`, so trusted)."""
        parameters = []
        for key, spec in data["parameters"].items():
            if isinstance(spec, list):
                parameters.append(Parameter(key, "choice", tuple(spec)))
            else:
                ((kind, (low, high)),) = spec.items()
                parameters.append(Parameter(key, kind, low=low, high=high))
        return cls(
            name=data["name"], config=Path(data["config"]), method=data["method"], trials=data["trials"],
            metric=data["metric"], mode=data["mode"], seed=data["seed"], prune=data["prune"],
            fixed=dict(data["set"]), parameters=parameters, base=data["base"],
        )  # fmt: skip

    def trial_values(self, params: dict[str, Any]) -> dict[str, Any]:
        """The dotted keys a trial sets in the base config: `set`, its parameters, and the metric as train.monitor."""
        ranked = {"train.monitor": self.metric, "train.mode": self.mode} if self.metric else {}
        return {**self.fixed, **params, **ranked}

    def grid_size(self) -> int:
        size = 1
        for p in self.parameters:
            size *= p.size()
        return size

    def planned(self) -> list[dict[str, Any]]:
        """The trials' parameters, known up front for grid and random (in order); [] for tpe."""
        if self.method == "grid":
            total = self.grid_size()
            if self.trials is None or self.trials >= total:
                indices: list[int] | range = range(total)
            else:  # a capped grid: cells drawn at random, so the cap does not vary only the last key
                indices = _draw_cells(total, self.trials, self.seed)
            return [{p.key: value for p, value in zip(self.parameters, _cell(self.parameters, i))} for i in indices]
        if self.method == "random":
            optuna = _optuna()
            draws = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=self.seed))
            distributions = {p.key: p.distribution() for p in self.parameters}
            return [draws.ask(distributions).params for _ in range(self.trials or 0)]
        return []


def _cell(parameters: list[Parameter], index: int) -> list[Any]:
    """The grid cell number `index` (row-major: the last key varies fastest)."""
    values = []
    for p in reversed(parameters):
        index, position = divmod(index, p.size())
        values.append(p.value(position))
    return values[::-1]


def _draw_cells(total: int, count: int, seed: int) -> list[int]:
    """`count` distinct cells of `total`, drawn one at a time: a larger count keeps the first ones."""
    rng, drawn, seen = random.Random(seed), [], set()
    while len(drawn) < count:
        cell = rng.randrange(total)
        if cell not in seen:
            seen.add(cell)
            drawn.append(cell)
    return drawn


def load_sweep(path: str | Path, *, trials: int | None = None) -> Sweep:
    """Read and check a sweep file and its base config; every problem at once (ConfigError), with the
    line and key in the sweep file. `trials` (the --trials option) replaces the file's."""
    from trainer.config import load_config

    path = Path(path)
    data, lines = read_yaml_file(path, "sweep")
    source = str(path)
    problems: list[Problem] = list(lines.problems)

    def problem(key: str, message: str) -> None:
        problems.append(Problem(key, message, lines.where(key)[0]))

    for key in data:
        if key not in SWEEP_KEYS:
            close = difflib.get_close_matches(str(key), SWEEP_KEYS, n=1)
            hint = f"did you mean '{close[0]}'? " if close else ""
            problem(str(key), f"unknown key '{key}'; {hint}accepted keys: {', '.join(SWEEP_KEYS)}")
    config = _config_path(data, path, problem)
    method = _choice(data, "method", METHODS, "grid", problem)
    trials = _positive_int(data, "trials", problem) if trials is None else trials
    metric = _choice(data, "metric", METRICS, None, problem)
    mode = _choice(data, "mode", ("min", "max"), None, problem)
    prune = _choice(data, "prune", PRUNERS, "none", problem) if data.get("prune") is not None else "none"
    seed = data.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        problem("seed", f"must be a whole number, got {seed!r}")
    fixed = _mapping(data, "set", problem)
    parameters = _parameters(data, method, problem)
    if method in ("random", "tpe") and trials is None and "trials" not in data:
        problem("method", f"method {method} needs trials: N (how many trials to run), in the file or as --trials N")
    if problems:
        raise ConfigError(source, problems)

    base = load_config(config)  # a bad base config is reported as itself, with its own lines
    metric = metric or base.train.monitor
    mode = mode or (("max" if "accuracy" in metric else "min") if metric else None)
    sweep = Sweep(
        name=str(data.get("name") or path.stem), config=config.resolve(), method=method, trials=trials, metric=metric,
        mode=mode, seed=base.seed if seed is None else seed, prune=prune, fixed=fixed, parameters=parameters,
        base=base.model_dump(mode="json"),
    )  # fmt: skip
    problems += _trial_problems(sweep, lines)
    if method == "grid" and sweep.grid_size() > MAX_GRID_CELLS and trials is None:
        problem("parameters", f"the grid has {sweep.grid_size():,} cells, more than {MAX_GRID_CELLS:,}; cap it with trials: N (or --trials N), or use method: random")
    if problems:
        raise ConfigError(source, problems)
    return sweep


def _config_path(data: dict[str, Any], path: Path, problem: Callable[[str, str], None]) -> Path:
    value = data.get("config")
    if not isinstance(value, str) or not value:
        problem("config", "needs the base config file, relative to the sweep file (config: ../configs/lenet.yaml)")
        return path
    config = (path.parent / value) if not Path(value).is_absolute() else Path(value)
    if not config.is_file():
        problem("config", f"'{value}' is not a file (looked for {config}); the path is relative to the sweep file")
    return config


def _choice(data: dict[str, Any], key: str, choices: tuple[str, ...], default: str | None, problem: Callable[[str, str], None]) -> Any:
    value = data.get(key, default)
    if value is not None and value not in choices:
        close = difflib.get_close_matches(str(value), choices, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        problem(key, f"'{value}' is not one of {', '.join(choices)}{hint}")
        return default
    return value


def _positive_int(data: dict[str, Any], key: str, problem: Callable[[str, str], None]) -> int | None:
    value = data.get(key)
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        problem(key, f"must be a whole number of at least 1, got {value!r}")
        return None
    return value


def _mapping(data: dict[str, Any], key: str, problem: Callable[[str, str], None]) -> dict[str, Any]:
    value = data.get(key) or {}
    if not isinstance(value, dict):
        problem(key, f"must be a mapping of dotted config keys to values ({key}: {{train.epochs: 5}}), got {value!r}")
        return {}
    return {str(k): v for k, v in value.items()}


def _parameters(data: dict[str, Any], method: str, problem: Callable[[str, str], None]) -> list[Parameter]:
    raw = data.get("parameters")
    if not isinstance(raw, dict) or not raw:
        problem("parameters", "needs at least one varying key, e.g. parameters: {optimizer.lr: [0.01, 0.1]}")
        return []
    parameters = []
    for key, spec in raw.items():
        where = f"parameters.{key}"
        parameter = _parameter(str(key), spec, lambda message, where=where: problem(where, message))
        if parameter is None:
            continue
        if method == "grid" and parameter.kind in ("uniform", "log_uniform"):
            problem(where, f"a grid needs a list of values; {parameter.kind} is for method random or tpe")
            continue
        parameters.append(parameter)
    return parameters


def _parameter(key: str, spec: Any, problem: Callable[[str], None]) -> Parameter | None:
    """`spec` checked: a list, or {choice: [...]}, {uniform: [lo, hi]}, {log_uniform: [lo, hi]}, {int: [lo, hi]}."""
    if isinstance(spec, dict) and len(spec) == 1:
        ((kind, values),) = spec.items()
        if kind not in DISTRIBUTIONS:
            close = difflib.get_close_matches(str(kind), DISTRIBUTIONS, n=1)
            hint = f"did you mean '{close[0]}'? " if close else ""
            problem(f"'{kind}' is not a distribution; {hint}use one of {', '.join(DISTRIBUTIONS)}, or a list of values")
            return None
    elif isinstance(spec, list):
        kind, values = "choice", spec
    else:
        problem(
            f"{spec!r} does not vary: give a list of values, or one of {{uniform: [lo, hi]}}, {{log_uniform: [lo, hi]}}, "
            "{int: [lo, hi]}, {choice: [...]}; a value for every trial goes in set:"
        )
        return None
    if kind == "choice":
        if not isinstance(values, list) or not values:
            problem("needs a non-empty list of values")
            return None
        if any(isinstance(v, (list, dict)) for v in values):
            problem("values must be numbers, strings, booleans or null (a list or mapping value cannot be a choice)")
            return None
        if len({json.dumps(v) for v in values}) < len(values):
            problem(f"{values} gives a value twice; each value once")
            return None
        return Parameter(key, "choice", tuple(values))
    numbers = isinstance(values, list) and len(values) == 2 and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
    if not numbers:
        problem(f"{kind} needs [low, high], two numbers, got {values!r}")
        return None
    low, high = values
    if kind == "int" and not all(isinstance(v, int) for v in values):
        problem(f"int needs whole numbers [low, high], got {values!r}")
    elif (low > high) if kind == "int" else (low >= high):
        problem(f"{kind} needs low {'<=' if kind == 'int' else '<'} high, got [{low}, {high}]")
    elif kind == "log_uniform" and low <= 0:
        problem(f"log_uniform needs low > 0 (a logarithm of {low} does not exist), got [{low}, {high}]")
    else:
        return Parameter(key, kind, low=low, high=high)
    return None


def _trial_problems(sweep: Sweep, lines: Any) -> list[Problem]:
    """Problems of the trials' configs: each key and each value at least once, put on the sweep file's line."""
    from trainer.config import load_config

    first = {p.key: p.value(0) if p.kind in ("choice", "int") else p.low for p in sweep.parameters}
    variants = [first]
    for p in sweep.parameters:  # every listed value, and both ends of a range, with the others at their first
        candidates = list(p.values) if p.kind == "choice" else [p.low, p.high]
        variants += [{**first, p.key: value} for value in candidates[1:] if value != first[p.key]]
    where = {key: f"set.{key}" for key in sweep.fixed} | {p.key: f"parameters.{p.key}" for p in sweep.parameters}
    where |= {"train.monitor": "metric", "train.mode": "mode"}
    found: dict[tuple[str, str], Problem] = {}
    for params in variants:
        try:
            load_config(sweep.config, values=sweep.trial_values(params))
        except ConfigError as err:
            for p in err.problems:
                key = where.get(p.override or "", "config")
                message = f"{p.key}: {p.message}" if p.key and p.key != p.override else p.message
                if p.override is None:
                    message = f"{err.source}: {p}"
                found.setdefault((key, message), Problem(key, message, lines.where(key)[0]))
    return list(found.values())


# ---------------------------------------------------------------------------------------------
# storage and study


def mask_password(url: str) -> str:
    """`url` with its password as ***, for messages and files."""
    import re

    return re.sub(r"(://[^:/@]+:)[^@]*@", r"\1***@", url)


def _optuna() -> Any:
    """optuna, imported when a sweep needs it, without its INFO lines (trainer says what happens)."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna


def open_storage(url: str | None, folder: Path) -> Any:
    """Optuna's storage: a journal file in the sweep folder, or the database `url` names (UsageError if unreachable)."""
    optuna = _optuna()
    if url is None:
        from optuna.storages.journal import JournalFileBackend

        return optuna.storages.JournalStorage(JournalFileBackend(str(folder / JOURNAL_FILE)))
    engine: dict[str, Any] = {"pool_pre_ping": True}
    if url.startswith("postgresql"):
        engine["connect_args"] = {"connect_timeout": 10}
    try:
        return _create_tables_once(lambda: optuna.storages.RDBStorage(url, engine_kwargs=engine))
    except ModuleNotFoundError as err:
        raise UsageError(
            f"--storage {mask_password(url)} needs the database driver '{err.name}': pip install 'trainer[postgres]' "
            "for PostgreSQL"
        ) from None
    except Exception as err:  # noqa: BLE001 - sqlalchemy's OperationalError, ArgumentError (a malformed URL), ...
        raise UsageError(f"cannot open --storage {mask_password(url)}: {first_line(err)}") from None


def _create_tables_once(open_: Callable[[], Any], attempts: int = 5) -> Any:
    """Open an RDB storage; on a new database, two machines starting at once both create Optuna's
    tables, and the slower one's CREATE fails on the other's: it opens again, finding them there."""
    from sqlalchemy.exc import IntegrityError, ProgrammingError

    for attempt in range(attempts):
        try:
            return open_()
        except (IntegrityError, ProgrammingError):
            if attempt == attempts - 1:
                raise
            time.sleep(0.2 * (attempt + 1))
    raise AssertionError("unreachable")


def open_study(storage: Any, sweep: Sweep, *, force: bool) -> tuple[Any, bool]:
    """The sweep's study, created or loaded; a sweep file changed since the study started is refused
    (UsageError naming the keys) unless `force`. Returns (study, whether this command must record
    the sweep in it: new, taken over, or changed). The record is written after the queue is planned
    (`record`): another machine's command waits for it, and so never plans the same cells."""
    import optuna

    direction = "maximize" if sweep.mode == "max" else "minimize"
    resolved = _comparable(sweep.resolved())
    try:
        study = optuna.create_study(storage=storage, study_name=sweep.name, direction=direction)
    except optuna.exceptions.DuplicatedStudyError:
        study = optuna.load_study(study_name=sweep.name, storage=storage)
    else:
        return study, True
    recorded = _wait_for_record(study)
    if recorded is None:  # its creator died before recording the sweep: this command takes it over
        return study, True
    changed = _changed_keys(recorded, resolved)
    if changed and not force:
        shown = "; ".join(f"{key} (was {old}, now {new})" for key, old, new in changed[:8])
        more = f" and {len(changed) - 8} more" if len(changed) > 8 else ""
        raise UsageError(
            f"the sweep '{sweep.name}' was started from a different sweep file: {shown}{more}; run with --force to go "
            "on with the file as it is now, or give the sweep a new name (name: in the sweep file)"
        )
    if changed and recorded.get("mode") != sweep.mode:
        raise UsageError(f"the sweep '{sweep.name}' ranks by mode {recorded.get('mode')}; a running sweep cannot change it, even with --force: give the sweep a new name")
    for key, was in recorded.get("parameters", {}).items():
        now = resolved["parameters"].get(key, was)
        if now != was and (isinstance(was, list) or isinstance(now, list) or set(was) != set(now)):
            raise UsageError(
                f"parameters.{key}: a running sweep cannot change a parameter's list of values or its kind, even with "
                f"--force (was {was}, now {now}; Optuna records each parameter with one set of choices); give the sweep "
                "a new name (name: in the sweep file)"
            )
    return study, bool(changed)


def record(study: Any, sweep: Sweep) -> None:
    study.set_user_attr("trainer_sweep", _comparable(sweep.resolved()))


def _comparable(resolved: dict[str, Any]) -> dict[str, Any]:
    """The parts of a sweep that define its trials: `trials` may grow or shrink between commands, and
    the base config may be elsewhere on another machine (its contents, `base`, are compared)."""
    return {k: v for k, v in resolved.items() if k not in ("trials", "config")}


def _wait_for_record(study: Any, seconds: float = 30.0) -> dict[str, Any] | None:
    """The sweep a study records; another machine may have created the study a moment ago."""
    deadline = time.monotonic() + seconds
    while True:
        recorded = study.user_attrs.get("trainer_sweep")
        if recorded is not None or time.monotonic() > deadline:
            return recorded
        time.sleep(0.5)


def _changed_keys(old: dict[str, Any], new: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    from trainer.checkpoint import flatten

    before, after = flatten(old), flatten(new)
    missing = "(none)"
    return [(k, before.get(k, missing), after.get(k, missing)) for k in sorted(set(before) | set(after)) if before.get(k, missing) != after.get(k, missing)]


def plan(study: Any, sweep: Sweep, *, retry_failed: bool) -> None:
    """Queue what is still to run: the planned cells or draws that have no trial yet, and with
    `retry_failed` a new trial (in a new folder) for each failed one not retried yet."""
    from optuna.trial import TrialState

    trials = [t for t in study.get_trials(deepcopy=False) if not t.user_attrs.get("surplus")]
    queued = {_key(_params_of(t)) for t in trials}
    for params in sweep.planned():
        if _key(params) not in queued:
            study.enqueue_trial(params)
            queued.add(_key(params))
    if retry_failed:
        retried = {t.user_attrs.get("retry_of") for t in trials}
        live = {_key(_params_of(t)) for t in trials if t.state != TrialState.FAIL}
        for t in trials:
            if t.state == TrialState.FAIL and t.number not in retried and _key(t.params) not in live:
                study.enqueue_trial(t.params, user_attrs={"retry_of": t.number})
                live.add(_key(t.params))


def _params_of(trial: Any) -> dict[str, Any]:
    """A trial's parameters: suggested, or still only queued (WAITING)."""
    return dict(trial.params) or dict(trial.system_attrs.get("fixed_params", {}))


def _key(params: dict[str, Any]) -> str:
    return json.dumps(params, sort_keys=True)


# ---------------------------------------------------------------------------------------------
# trials: who owns one, taking the next, running it


def this_process() -> dict[str, Any]:
    """The owner a trial records: it is interrupted once this process is gone."""
    return {"host": socket.gethostname(), "boot": _boot_id(), "pid": os.getpid(), "start": _start_time(os.getpid())}


def _boot_id() -> str | None:
    """This boot of this machine (Linux): a trial owned before a reboot is gone whatever its pid."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None


def _start_time(pid: int) -> str | None:
    """A process's start time (Linux), so a reused pid is not taken for the trial's owner."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def owner_gone(owner: Any, started: Any = None) -> bool:
    """Whether a RUNNING trial's owner, on this host, is no longer running (False for another host's).
    A trial with no owner yet was taken a moment ago, or by a process killed at once: gone after a minute."""
    if not isinstance(owner, dict):
        return started is None or time.time() - started.timestamp() > 60
    if owner.get("host") != socket.gethostname():
        return False
    if owner.get("boot") is not None and owner.get("boot") != _boot_id():
        return True
    pid = owner.get("pid")
    try:
        os.kill(int(pid), 0)
    except (OSError, TypeError, ValueError):
        return True
    return owner.get("start") is not None and _start_time(int(pid)) != owner.get("start")


def interrupted_trials(study: Any) -> list[int]:
    """Numbers of this host's RUNNING trials whose owner is gone: the ones to resume."""
    from optuna.trial import TrialState

    running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    return [t.number for t in running if owner_gone(t.user_attrs.get("owner"), t.datetime_start)]


def trial_folder(sweep_dir: Path, number: int) -> Path:
    return Path(sweep_dir) / f"trial-{number:04d}"


def queued(study: Any, sweep: Sweep, plan_keys: set[str] | None) -> list[Any]:
    """The WAITING trials this sweep still runs: those of its current plan (a lower --trials, or a
    parameter --force removed, leaves the others waiting) and retries."""
    from optuna.trial import TrialState

    waiting = study.get_trials(deepcopy=False, states=(TrialState.WAITING,))
    if plan_keys is None:
        return list(waiting)
    return [t for t in waiting if _key(_params_of(t)) in plan_keys or t.user_attrs.get("retry_of") is not None]


def _take_next(study: Any, sweep: Sweep, owner: dict[str, Any], plan_keys: set[str] | None) -> Any:
    """The next trial this worker runs (an Optuna Trial with its parameters suggested), or None when
    nothing is left: a queued one, or for tpe a new draw while fewer than `trials` exist."""
    from optuna.exceptions import UpdateFinishedTrialError
    from optuna.trial import TrialState

    storage, study_id = _storage_of(study)
    trial_id = None
    # Optuna's own `ask` takes the queue's first trial this way (Study._pop_waiting_trial_id), but
    # draws a new trial when the queue is empty, which a grid must not
    for waiting in queued(study, sweep, plan_keys):
        candidate = storage.get_trial_id_from_study_id_trial_number(study_id, waiting.number)
        try:
            if storage.set_trial_state_values(candidate, state=TrialState.RUNNING):  # granted to one worker only
                trial_id = candidate
                break
        except UpdateFinishedTrialError:
            continue
    if trial_id is None:
        if sweep.method != "tpe" or _used_slots(study) >= (sweep.trials or 0):
            return None
        trial_id = storage.create_new_trial(study_id)
    trial = _begin(study, sweep, trial_id, owner)
    if sweep.method == "tpe" and trial.number >= _slot_limit(study, sweep):
        trial.set_user_attr("surplus", True)  # two workers drew at once past `trials`: drop this one
        study.tell(trial, state=TrialState.FAIL)
        return None
    return trial


def _begin(study: Any, sweep: Sweep, trial_id: int, owner: dict[str, Any]) -> Any:
    """The Trial of a trial this worker has taken (new, queued or resumed): its owner recorded and its
    parameters set, again if it was resumed (the same values: a resumed trial keeps its cell)."""
    import optuna

    storage, _ = _storage_of(study)
    if sweep.method == "tpe":  # seeded by trial number: a resumed sweep draws what it would have drawn
        study.sampler = optuna.samplers.TPESampler(seed=sweep.seed + storage.get_trial_number_from_id(trial_id))
    trial = optuna.Trial(study, trial_id)  # after the sampler: a Trial tells it that it begins
    trial.set_user_attr("owner", owner)
    _suggest(trial, sweep)
    return trial


def _suggest(trial: Any, sweep: Sweep) -> None:
    """Set the trial's parameters: its queued values (grid, random, retry), or the sampler's draw (tpe)."""
    for p in sweep.parameters:
        if p.kind == "choice":
            trial.suggest_categorical(p.key, list(p.values))
        elif p.kind == "int":
            trial.suggest_int(p.key, int(p.low), int(p.high))
        else:
            trial.suggest_float(p.key, p.low, p.high, log=p.kind == "log_uniform")


def _storage_of(study: Any) -> tuple[Any, int]:
    """The study's storage and id: the queue is taken from the storage itself (Optuna's `ask` would
    sample a new trial when the queue is empty, which a grid must not)."""
    return study._storage, study._study_id


def _trial_id(study: Any, number: int) -> int:
    storage, study_id = _storage_of(study)
    return storage.get_trial_id_from_study_id_trial_number(study_id, number)


def _used_slots(study: Any) -> int:
    """Trials that count towards `trials`: all but dropped draws and failed ones that were retried."""
    trials = [t for t in study.get_trials(deepcopy=False) if not t.user_attrs.get("surplus")]
    retried = {t.user_attrs.get("retry_of") for t in trials}
    return sum(1 for t in trials if t.number not in retried)


def _slot_limit(study: Any, sweep: Sweep) -> int:
    """The trial number from which a tpe draw is one too many (numbers of dropped and retried trials do not count)."""
    trials = sorted(study.get_trials(deepcopy=False), key=lambda t: t.number)
    retried = {t.user_attrs.get("retry_of") for t in trials}
    counted = 0
    for t in trials:
        if t.user_attrs.get("surplus") or t.number in retried:
            continue
        counted += 1
        if counted > (sweep.trials or 0):
            return t.number
    return sys.maxsize


def run_trial(study: Any, trial: Any, sweep: Sweep, sweep_dir: Path, *, device: str | None, resume: bool, force: bool = False) -> int | None:
    """Train one trial in its run folder (resuming it if `resume`) and tell the study how it ended.
    Returns the run's exit code when a signal stopped it (the trial stays RUNNING, to be resumed), else None."""
    from optuna.trial import TrialState

    from trainer.config import load_config
    from trainer.runs import _read_json, execute_run, started_in

    folder = trial_folder(sweep_dir, trial.number)
    recorded = _read_json(folder / "summary.json")
    if resume and recorded.get("status") in ("failed", "pruned"):  # ended, but killed before the study heard of it
        return _tell(study, trial, sweep, recorded)
    reported = {step for t in study.get_trials(deepcopy=False) if t.number == trial.number for step in t.intermediate_values}

    def on_epoch(state: Any, metrics: dict[str, float]) -> bool:
        value = metrics.get(sweep.metric)
        if value is None:
            return False
        if state.epoch not in reported:
            trial.report(value, state.epoch)
        return sweep.prune == "median" and trial.should_prune()

    checkpoints = folder / "checkpoints"
    saved = (checkpoints / "last.pt").exists() or (checkpoints / "best.pt").exists()
    resume_from = folder if resume and saved else None
    if resume and not saved:
        _clear_started(folder)  # killed before its first checkpoint: start it again
    try:
        config = load_config(sweep.config, values=sweep.trial_values(dict(trial.params)))
        result = execute_run(
            config, run_dir=None if resume_from else folder, root=sweep_dir.parent, device=device, quiet=True,
            resume=resume_from, force=force, data_dir=started_in(folder) if resume_from else None, on_epoch=on_epoch,
        )  # fmt: skip
    except UsageError as err:
        if "in use by another trainer process" in str(err):
            return None  # another sweep command on this host took it first
        trial.set_user_attr("error", str(err))
        study.tell(trial, state=TrialState.FAIL)
        return None
    if result.status == "interrupted" and result.exit_code in (130, 143):
        return result.exit_code
    return _tell(study, trial, sweep, result.summary, error=result.error)


def _tell(study: Any, trial: Any, sweep: Sweep, summary: dict[str, Any], error: str | None = None) -> None:
    from optuna.trial import TrialState

    status = summary.get("status")
    best = (summary.get("monitor") or {}).get("best")
    if status == "completed" and best is not None:
        study.tell(trial, best, skip_if_finished=True)
    elif status == "pruned":
        study.tell(trial, state=TrialState.PRUNED, skip_if_finished=True)
    else:
        reason = error or summary.get("error") or f"the run recorded no {sweep.metric}"
        trial.set_user_attr("error", str(reason))
        study.tell(trial, state=TrialState.FAIL, skip_if_finished=True)


def _clear_started(folder: Path) -> None:
    """Remove what a trial killed before its first checkpoint wrote (its own files only)."""
    import shutil

    from trainer.runs import LOCK_FILE, _written_by_trainer

    if not folder.is_dir():
        return
    for entry in folder.iterdir():
        if _written_by_trainer(entry.name) and entry.name != LOCK_FILE:  # another process may hold it
            shutil.rmtree(entry) if entry.is_dir() else entry.unlink()


# ---------------------------------------------------------------------------------------------
# a worker process


def pruner(sweep: Sweep) -> Any:
    """`prune: median`: Optuna's MedianPruner, at every epoch end, once two trials have finished: a
    trial worse than the median of the earlier ones at the same epoch stops (Optuna's default waits
    for five trials, which a small sweep never gets past)."""
    import optuna

    if sweep.prune == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=2)
    return optuna.pruners.NopPruner()


def worker_device(device: str, index: int, cuda_count: int) -> str | None:
    """The device worker `index` trains on: its own GPU (cuda:K, round robin) when the config says
    auto or cuda and there are GPUs; None keeps the config's."""
    if device in ("auto", "cuda") and cuda_count > 0:
        return f"cuda:{index % cuda_count}"
    return None


def work(sweep_dir: Path, index: int, resume: list[int], force: bool = False) -> int:
    """One worker: trials until none is left or a signal stops it; its exit code."""
    import optuna
    import torch
    from optuna.trial import TrialState

    from trainer.runs import StopRequests

    sweep = Sweep.from_resolved(_read_yaml(sweep_dir / SWEEP_FILE))
    storage = open_storage(os.environ.get(STORAGE_ENV) or None, sweep_dir)
    study = optuna.load_study(study_name=sweep.name, storage=storage, pruner=pruner(sweep))
    device = worker_device(sweep.base.get("device", "auto"), index, torch.cuda.device_count())
    owner = this_process()
    plan_keys = {_key(p) for p in sweep.planned()} if sweep.method != "tpe" else None
    with StopRequests() as stop:  # a run's own StopRequests takes over a signal that came before it began
        queue = list(resume)
        while stop.signum is None:
            if queue:
                number = queue.pop(0)
                if study.get_trials(deepcopy=False)[number].state != TrialState.RUNNING:
                    continue  # finished meanwhile (another command on this host took it)
                trial, resumed = _begin(study, sweep, _trial_id(study, number), owner), True
            else:
                trial, resumed = _take_next(study, sweep, owner, plan_keys), False
                if trial is None:
                    return 0
            try:
                code = run_trial(study, trial, sweep, sweep_dir, device=device, resume=resumed, force=force)
            except Exception as err:  # noqa: BLE001 - a bug in one trial fails that trial; the sweep goes on
                if os.environ.get("TRAINER_DEBUG"):
                    raise
                trial.set_user_attr("error", f"internal error, a bug in trainer: {type(err).__name__}: {first_line(err)}")
                study.tell(trial, state=optuna.trial.TrialState.FAIL, skip_if_finished=True)
                continue
            if code is not None:
                return code
    return 128 + stop.signum


def _read_yaml(path: Path) -> dict[str, Any]:
    import yaml

    return yaml.safe_load(path.read_text(encoding="utf-8"))


def _worker_main(argv: list[str]) -> int:
    """`python -m trainer.sweep SWEEP_DIR INDEX [RESUME,...]`: what the sweep command starts per worker."""
    _die_with_parent()
    sweep_dir, index = Path(argv[0]), int(argv[1])
    from trainer.plugins import load_plugins

    load_plugins(None)  # TRAINER_PLUGINS, set by the sweep command
    resume = [int(n) for n in argv[2].split(",") if n] if len(argv) > 2 else []
    try:
        return work(sweep_dir, index, resume, force=len(argv) > 3 and argv[3] == "force")
    except KeyboardInterrupt:
        return 130
    except Exception as err:  # told by the sweep command; the traceback only on request
        if os.environ.get("TRAINER_DEBUG"):
            raise
        print(f"error: sweep worker {index}: {type(err).__name__}: {first_line(err)}", file=sys.stderr)
        return 1


def _die_with_parent() -> None:
    """Linux: this worker gets SIGKILL when the sweep command dies, however it dies; a killed sweep
    leaves no worker training on."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


# ---------------------------------------------------------------------------------------------
# the sweep command


@dataclass
class SweepResult:
    folder: Path
    exit_code: int
    best: dict[str, Any] | None  # number, folder, value, params of the best trial
    counts: dict[str, int]
    failed: list[dict[str, Any]]
    error: str | None = None


def run_sweep(
    path: Path, *, workers: int = 1, trials: int | None = None, storage: str | None = None, retry_failed: bool = False,
    force: bool = False, root: Path = Path("runs"), view: Any = None,
) -> SweepResult:
    """Check the sweep file, open (or continue) the sweep, run its trials in `workers` processes and
    report on `view` (tracking.SweepView). Bad input raises UsageError before anything is created."""
    sweep = load_sweep(path, trials=trials)
    _check_first_trial(sweep)
    if view is not None:
        view.metric = sweep.metric
    folder = Path(root) / sweep.name
    _refuse_foreign_folder(folder, sweep.name)
    _refuse_other_storage(folder, storage)
    _refuse_lost_journal(folder, storage)
    opened = open_storage(storage, folder) if storage else None  # an unreachable database: before any folder exists
    folder.mkdir(parents=True, exist_ok=True)
    opened = opened or open_storage(None, folder)
    study, to_record = open_study(opened, sweep, force=force)
    _write_sweep_file(folder, sweep, storage)
    plan(study, sweep, retry_failed=retry_failed)
    if to_record:
        record(study, sweep)
    resume = interrupted_trials(study)
    owner = this_process()
    storage_of, _ = _storage_of(study)
    for number in resume:  # this command's until a worker takes them
        storage_of.set_trial_user_attr(_trial_id(study, number), "owner", owner)
    exit_code = _run_workers(folder, study, sweep, workers, resume, storage, view, force)
    return _finish(folder, study, sweep, exit_code)


def _check_first_trial(sweep: Sweep) -> None:
    """Build the first trial's run and push one batch through: a metric the data cannot give, a
    model the data does not fit, fail here, before the sweep exists."""
    from trainer.build import build_run, check_one_batch
    from trainer.config import load_config

    planned = sweep.planned()[:1]
    params = planned[0] if planned else {p.key: p.value(0) if p.kind in ("choice", "int") else p.low for p in sweep.parameters}
    try:
        built = build_run(load_config(sweep.config, values=sweep.trial_values(params)), device="cpu")  # no GPU context kept here
        check_one_batch(built)
    except UsageError as err:
        raise UsageError(f"the sweep's first trial ({_params_text(params)}) cannot run: {err}") from None
    if sweep.metric is None:  # train.monitor's own default
        sweep.metric = "val_loss" if built.val_batches is not None else "train_loss"
        sweep.mode = "min"


def _refuse_foreign_folder(folder: Path, name: str) -> None:
    if folder.is_dir() and any(folder.iterdir()) and not (folder / SWEEP_FILE).exists():
        raise UsageError(
            f"'{folder}' exists and is not a sweep's folder (it has no {SWEEP_FILE}); give the sweep another name "
            "(name: in the sweep file) or another --runs-root"
        )


def _refuse_lost_journal(folder: Path, storage: str | None) -> None:
    if storage is None and any(folder.glob("trial-*")) and not (folder / JOURNAL_FILE).exists():
        raise UsageError(
            f"the sweep folder '{folder}' has trials but no {JOURNAL_FILE}, which recorded them; restore it, or give the "
            "sweep a new name (name: in the sweep file)"
        )


def _refuse_other_storage(folder: Path, storage: str | None) -> None:
    """A sweep goes on in the storage it started in: another one would start it again from nothing."""
    try:
        recorded = _read_yaml(folder / SWEEP_FILE).get("storage")
    except Exception:  # noqa: BLE001 - no readable record (a new sweep): nothing to compare
        return
    given = mask_password(storage) if storage else JOURNAL_FILE
    if recorded and recorded != given:
        where = f"--storage {recorded}" if recorded != JOURNAL_FILE else f"its journal file ({folder / JOURNAL_FILE}, no --storage)"
        raise UsageError(f"the sweep in '{folder}' keeps its trials in {where}; run it with that again, or give the sweep a new name")


def _write_sweep_file(folder: Path, sweep: Sweep, storage: str | None) -> None:
    from trainer.runs import write_text

    record = {**sweep.resolved(), "storage": mask_password(storage) if storage else JOURNAL_FILE}
    write_text(folder / SWEEP_FILE, "# the sweep as resolved by trainer; what `trainer sweep` compares a later command with\n" + dump_yaml(record))


def _run_workers(
    folder: Path, study: Any, sweep: Sweep, workers: int, resume: list[int], storage: str | None, view: Any, force: bool
) -> int:
    """Start the workers, show the trials until they are done, pass signals on; the sweep's exit code."""
    plan_keys = {_key(p) for p in sweep.planned()} if sweep.method != "tpe" else None
    pending = len(queued(study, sweep, plan_keys)) + len(resume)
    count = max(1, min(workers, pending)) if sweep.method != "tpe" else workers
    if pending == 0 and (sweep.method != "tpe" or _used_slots(study) >= (sweep.trials or 0)):
        return 0
    procs = _start_workers(folder, count, resume, storage, force)
    received: list[int] = []

    def signal_all(signum: int) -> None:
        for proc in procs:  # workers have their own process group: each signal reaches them once, from here
            if proc.poll() is None:
                proc.send_signal(signum)

    def forward(signum: int, frame: Any) -> None:
        signum = as_stop(signum)  # a closed terminal stops the workers as SIGTERM does
        received.append(signum)
        signal_all(signum)

    previous = {s: signal.signal(s, forward) for s in stop_signals()}
    died = None
    try:
        while True:
            running = any(p.poll() is None for p in procs)
            broken = [i for i, p in enumerate(procs) if p.returncode not in (None, 0) and not received]
            if broken and died is None:  # the others stop too, resumable; the next command goes on
                died = broken[0]
                signal_all(signal.SIGTERM)
            if not running:
                break
            if view is not None:
                view.update(trial_rows(study, sweep))
            time.sleep(0.5)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    if view is not None:
        view.update(trial_rows(study, sweep))
    if received:
        return 128 + received[0]
    if died is not None:
        code = procs[died].returncode
        how = f"was killed by {signal.Signals(-code).name}" if code < 0 else f"ended with exit code {code}"
        how += " (stopped by a signal sent to it alone)" if code in (130, 143) else ""
        raise TrainingFailed(f"sweep worker {died} {how}; run the same command again to go on where it stopped")
    return 0


def _start_workers(folder: Path, count: int, resume: list[int], storage: str | None, force: bool) -> list[subprocess.Popen]:
    """`count` worker processes, each in its own session, with the cores split between them and the
    storage and plugins of this command; the interrupted trials dealt out among them."""
    from trainer.plugins import ENV_VAR, loaded

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    env = dict(os.environ)
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):  # the cores split between the workers, unless set
        env.setdefault(name, str(max(1, cores // count)))
    env.pop(STORAGE_ENV, None)
    if storage:
        env[STORAGE_ENV] = storage
    if loaded():  # the workers import the plugins this command did
        env[ENV_VAR] = ",".join(entry["path"] for entry in loaded())
    procs = []
    for index in range(count):
        mine = ",".join(str(n) for n in resume[index::count])
        cmd = [sys.executable, "-m", "trainer.sweep", str(folder), str(index), mine, "force" if force else ""]
        procs.append(subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, start_new_session=True))
    return procs


def trial_rows(study: Any, sweep: Sweep) -> list[dict[str, Any]]:
    """One row per trial, for the live table and the summary: number, state, parameters, metric, seconds."""
    from optuna.trial import TrialState

    rows = []
    now = time.time()
    for t in study.get_trials(deepcopy=False):
        if t.user_attrs.get("surplus"):
            continue
        state = t.state.name.lower()
        if t.state == TrialState.RUNNING and owner_gone(t.user_attrs.get("owner"), t.datetime_start):
            state = "interrupted"
        value = t.value if t.state == TrialState.COMPLETE else (t.intermediate_values[max(t.intermediate_values)] if t.intermediate_values else None)
        started = t.datetime_start.timestamp() if t.datetime_start else None
        ended = t.datetime_complete.timestamp() if t.datetime_complete else now
        rows.append({
            "number": t.number, "trial": f"trial-{t.number:04d}", "state": state, "params": _params_of(t),
            "value": value, "epochs": len(t.intermediate_values), "seconds": (ended - started) if started else None,
            "error": t.user_attrs.get("error"),
        })  # fmt: skip
    return rows


def _finish(folder: Path, study: Any, sweep: Sweep, exit_code: int) -> SweepResult:
    """best.yaml, and what the command reports."""
    from optuna.trial import TrialState

    rows = trial_rows(study, sweep)
    counts: dict[str, int] = {}
    for row in rows:
        counts[row["state"]] = counts.get(row["state"], 0) + 1
    best = None
    if study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        top = study.best_trial  # the first of equal bests
        owner = top.user_attrs.get("owner") or {}
        best = {
            "number": top.number, "folder": trial_folder(folder, top.number), "value": top.value, "params": dict(top.params),
            "host": owner.get("host") if owner.get("host") != socket.gethostname() else None,
        }  # fmt: skip
        _write_best(folder, best, sweep)
    retried = {t.user_attrs.get("retry_of") for t in study.get_trials(deepcopy=False)}
    failed = [r for r in rows if r["state"] == "fail" and r["number"] not in retried]
    if exit_code == 0 and (failed or counts.get("interrupted")):  # done only when every trial ended
        exit_code = 1
    return SweepResult(folder, exit_code, best, counts, failed)


def _write_best(folder: Path, best: dict[str, Any], sweep: Sweep) -> None:
    from trainer.runs import write_text

    from trainer.config import load_config

    config = best["folder"] / "config.yaml"
    where = f" (trained on {best['host']})" if best["host"] else ""
    head = f"# the best trial of sweep {sweep.name}: {best['folder'].name}{where}, {sweep.metric} {best['value']:.6g}\n"
    if config.is_file():
        text = config.read_text(encoding="utf-8")
    else:  # it ran on another machine sharing the storage: the same config, from the base and its values
        text = load_config(sweep.config, values=sweep.trial_values(best["params"])).to_yaml()
    write_text(folder / BEST_FILE, head + text)


def _params_text(params: dict[str, Any]) -> str:
    return " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())


if __name__ == "__main__":
    sys.exit(_worker_main(sys.argv[1:]))
