"""The config: pydantic models (the one place defaults live), YAML loading, `key=value` overrides
and error reports that list every problem at once, with file line, dotted key, value and choices.

The config knows nothing about the loop. Component names and their keyword arguments are checked
against the registries here, before anything is built.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from trainer.errors import UsageError
from trainer.registry import Registry, close_match

# ---------------------------------------------------------------------------------------------
# the schema: every default, with its unit or accepted values


class Component(BaseModel):
    """`{name: ..., <keyword arguments of its constructor>}`; the arguments are checked against the registry."""

    model_config = ConfigDict(extra="allow")

    name: str  # a registered name: `trainer list <kind>`

    @property
    def kwargs(self) -> dict[str, Any]:
        """The constructor's keyword arguments (every key but the runner's own)."""
        return dict(self.model_extra or {})


class ModelConfig(Component):
    """The model; sizes the data determines (in_features, num_classes, ...) may be left out."""


class DataConfig(Component):
    """The dataset, with the keys every dataset takes."""

    batch_size: int = Field(64, gt=0)  # samples per optimizer step
    val_fraction: float = Field(0.2, ge=0, lt=1)  # share held out for validation (datasets without a split); 0: none
    shuffle: bool = True  # reshuffle the training data every epoch (seeded)


class LossConfig(Component):
    """A torch.nn loss by snake_case name: cross_entropy, mse, nll, ..."""


class OptimizerConfig(Component):
    """A torch.optim optimizer by lowercase name: sgd, adam, adamw, ..."""


class SchedulerConfig(Component):
    """A torch.optim.lr_scheduler scheduler by snake_case name: cosine, step, one_cycle, ..."""

    interval: Literal["epoch", "step"] | None = None  # when it steps; null: per step for one_cycle/cyclic, else per epoch


CompileMode = Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"]  # torch.compile's modes
COMPILE_MODES: tuple[str, ...] = get_args(CompileMode)


class TrainConfig(BaseModel):
    """The training budget and loop settings."""

    model_config = ConfigDict(extra="forbid")

    epochs: int | None = Field(None, gt=0)  # passes over the training data; 10 when neither this nor max_steps is set
    max_steps: int | None = Field(None, gt=0)  # optimizer steps; the run stops at whichever limit comes first
    log_every: int = Field(10, gt=0)  # optimizer steps between train-loss points (console, TensorBoard, metrics.jsonl)
    grad_clip: float | None = Field(None, gt=0)  # max L2 norm of all gradients; null: no clipping
    checkpoint_every: int | None = Field(None, gt=0)  # optimizer steps between saves of last.pt (also at every epoch end)
    monitor: Literal["val_loss", "val_accuracy", "train_loss"] | None = None  # best.pt's metric; null: val_loss, or train_loss without validation
    mode: Literal["min", "max"] | None = None  # best is the min or max of `monitor`; null: max for accuracy, else min
    compile: bool | CompileMode = False  # torch.compile the model: false | true | default | reduce-overhead | max-autotune | max-autotune-no-cudagraphs
    channels_last: bool = False  # false | true: channels-last model and 4-D inputs; image data (N, C, H, W) only
    cudnn_benchmark: bool = False  # false | true: torch.backends.cudnn.benchmark; CUDA only, not bit-exact
    tf32: bool = False  # false | true: TF32 matmuls and cuDNN convolutions; CUDA only; false: full fp32

    @field_validator("compile", mode="before")
    @classmethod
    def _compile_mode(cls, value: Any) -> Any:
        if isinstance(value, bool) or (isinstance(value, str) and value in COMPILE_MODES):
            return value
        guess = close_match(value, COMPILE_MODES) if isinstance(value, str) else None
        hint = f"did you mean '{guess}'? " if guess else ""
        raise ValueError(f"{hint}accepted: false, true, {', '.join(COMPILE_MODES)}")


DEFAULT_EPOCHS = 10


class Config(BaseModel):
    """A whole run."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field("run", min_length=1)  # run name: the run folder is runs/<name>/<timestamp>; default: the file's stem
    seed: int = Field(0, ge=0, lt=2**63)  # seeds python, numpy and torch, the data split and the data order
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"  # bf16/fp16: autocast; fp16 adds a GradScaler (CUDA only)
    model: ModelConfig
    data: DataConfig
    loss: LossConfig
    optimizer: OptimizerConfig
    scheduler: SchedulerConfig | None = None  # optional
    train: TrainConfig = Field(default_factory=TrainConfig)

    @field_validator("name")
    @classmethod
    def _folder_name(cls, value: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", value):
            raise ValueError("must be a folder name: letters, digits, '.', '_' or '-', starting with a letter or digit")
        return value

    @field_validator("device")
    @classmethod
    def _device_name(cls, value: str) -> str:
        if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", value.strip().lower()):
            raise ValueError("accepted: auto, cpu, cuda, cuda:N, mps")
        return value.strip().lower()

    def to_yaml(self) -> str:
        """The config as YAML, defaults filled in, in the order of the schema."""
        return dump_yaml(self.model_dump(mode="json"))


def dump_yaml(data: dict[str, Any]) -> str:
    """Block-style YAML with short mappings of scalars kept on one line for readability."""
    return yaml.safe_dump(data, sort_keys=False, default_flow_style=None, width=100)


def json_schema() -> dict[str, Any]:
    """The JSON Schema of a config, with each component's `name` limited to what is registered.

    For editors: a YAML language server validates and completes configs against it.
    """
    schema = Config.model_json_schema()
    schema["title"] = "trainer config"
    definitions = schema.get("$defs", {})
    section_models = {
        "model": ModelConfig, "data": DataConfig, "loss": LossConfig, "optimizer": OptimizerConfig, "scheduler": SchedulerConfig,
    }  # fmt: skip
    for section, registry in registries().items():
        names = sorted({*registry.names(), *(a for n in registry.names() for a in registry.aliases_of(n))})
        name_property = definitions[section_models[section].__name__]["properties"]["name"]
        name_property["enum"] = names
        name_property["description"] = f"a registered {registry.kind}: trainer list {registry.plural}"
    return schema


# sections whose `name` picks a factory from a registry, and keys in them that are the runner's own
_SECTION_OWN_KEYS = {
    "model": set(),
    "data": set(DataConfig.model_fields) - {"name"},
    "loss": set(),
    "optimizer": set(),
    "scheduler": set(SchedulerConfig.model_fields) - {"name"},
}


def registries() -> dict[str, Registry]:
    """The registry behind each component section (imports torch)."""
    from trainer.components import LOSSES, OPTIMIZERS, SCHEDULERS
    from trainer.data import DATASETS
    from trainer.models import MODELS

    return {"model": MODELS, "data": DATASETS, "loss": LOSSES, "optimizer": OPTIMIZERS, "scheduler": SCHEDULERS}


# ---------------------------------------------------------------------------------------------
# problems and their report


@dataclass
class Problem:
    """One thing wrong with a config: where, which key, what."""

    key: str  # dotted key, '' for the whole file
    message: str
    line: int | None = None  # 1-based line in the file
    override: str | None = None  # the KEY=VALUE item it came from

    def location(self) -> str:
        parts = []
        if self.override is not None:
            parts.append(f"override '{self.override}'")
        elif self.line is not None:
            parts.append(f"line {self.line}")
        if self.key:
            parts.append(self.key)
        return ", ".join(parts)

    def __str__(self) -> str:
        where = self.location()
        return f"{where}: {self.message}" if where else self.message


class ConfigError(UsageError):
    """A config with one or more problems; str() is the whole report."""

    def __init__(self, source: str, problems: list[Problem]) -> None:
        self.source = source
        self.problems = sorted(problems, key=lambda p: (p.override is not None, p.line or 0, p.key))
        super().__init__(self.report(), key=self.problems[0].key if self.problems else None)

    def report(self) -> str:
        count = len(self.problems)
        head = f"{self.source} is not valid ({count} problem{'s' if count != 1 else ''}):"
        return "\n".join([head, *(f"  {p}" for p in self.problems)])

    def __str__(self) -> str:
        return self.report()


# ---------------------------------------------------------------------------------------------
# YAML with line numbers


class _LineMap:
    """Dotted key -> 1-based line of that key in the file."""

    def __init__(self) -> None:
        self.lines: dict[str, int] = {}
        self.origin: dict[str, str] = {}  # dotted key -> override item that set it

    def add_node(self, node: yaml.Node, prefix: str = "") -> None:
        if isinstance(node, yaml.MappingNode):
            for key_node, value_node in node.value:
                key = f"{prefix}.{key_node.value}" if prefix else str(key_node.value)
                self.lines[key] = key_node.start_mark.line + 1
                self.add_node(value_node, key)

    def where(self, key: str) -> tuple[int | None, str | None]:
        """The line of `key`, or of its closest parent that is in the file; or the override that set it."""
        parts = key.split(".") if key else []
        while parts:
            dotted = ".".join(parts)
            if dotted in self.origin:
                return None, self.origin[dotted]
            if dotted in self.lines:
                return self.lines[dotted], None
            parts.pop()
        # an override that created this section by setting a key inside it (seed.x=1 made `seed` a mapping)
        for dotted, item in self.origin.items():
            if key and dotted.startswith(key + "."):
                return None, item
        return None, None


def _parse_yaml(text: str, source: str) -> tuple[Any, _LineMap]:
    lines = _LineMap()
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.constructor.ConstructorError as err:
        mark = err.problem_mark or err.context_mark
        line = mark.line + 1 if mark else None
        tag = re.search(r"tag '([^']*)'", str(err))
        what = f"the YAML tag '{tag.group(1)}'" if tag else "a YAML tag"
        raise ConfigError(
            source,
            [Problem("", f"{what} is not allowed: configs are plain YAML (safe_load); nothing in it was run", line)],
        ) from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        line = mark.line + 1 if mark else None
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(source, [Problem("", f"YAML does not parse: {problem}", line)]) from None
    except RecursionError:
        raise ConfigError(source, [Problem("", "the YAML is nested too deeply to be a config")]) from None
    except ValueError as err:  # e.g. an integer with more digits than Python converts
        raise ConfigError(source, [Problem("", f"YAML does not load: {err}")]) from None
    if node is not None:
        lines.add_node(node)
    return data, lines


# ---------------------------------------------------------------------------------------------
# overrides


_DELETE = object()  # the value of a `~key` override: remove the key


def parse_override(item: str) -> tuple[list[str], Any]:
    """`optimizer.lr=0.1` -> (['optimizer', 'lr'], 0.1); the value is read as a YAML scalar.

    `~optimizer.momentum` removes a key (handy after switching optimizer.name=adam).
    """
    if item.startswith("~") and "=" not in item:
        parts = item[1:].split(".")
        if any(not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", p) for p in parts):
            raise ValueError(f"'{item[1:]}' is not a dotted key such as optimizer.momentum")
        return parts, _DELETE
    if "=" not in item:
        raise ValueError("expected KEY=VALUE, such as optimizer.lr=0.1 (or ~KEY to remove a key)")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key:
        raise ValueError("the key before '=' is empty; expected KEY=VALUE, such as optimizer.lr=0.1")
    parts = key.split(".")
    if any(not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", p) for p in parts):
        raise ValueError(f"'{key}' is not a dotted key such as train.epochs")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as err:
        first = (getattr(err, "problem", None) or str(err)).splitlines()[0]
        raise ValueError(f"the value '{raw}' is not valid YAML: {first}") from None
    except RecursionError:
        raise ValueError("the value is nested too deeply") from None
    return parts, value


def apply_overrides(data: dict[str, Any], overrides: list[str], lines: _LineMap) -> list[Problem]:
    """Set each `key=value` in `data` (in place); malformed items become problems."""
    problems = []
    for item in overrides:
        try:
            parts, value = parse_override(item)
        except ValueError as err:
            problems.append(Problem("", str(err), override=item))
            continue
        node = data
        for i, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                where = ".".join(parts[: i + 1])
                problems.append(Problem(where, f"is {child!r}, not a section; cannot set '{'.'.join(parts)}'", override=item))
                break
            node = child
        else:
            if value is _DELETE:
                if parts[-1] not in node:
                    problems.append(Problem(".".join(parts), "cannot remove it: the config has no such key", override=item))
                    continue
                del node[parts[-1]]
            else:
                node[parts[-1]] = value
            lines.origin[".".join(parts)] = item
    return problems


# ---------------------------------------------------------------------------------------------
# loading and checking


def load_config(path: str | Path, overrides: list[str] | None = None) -> Config:
    """Read, override and check a config file. Raises ConfigError (every problem) or UsageError."""
    path = Path(path)
    source = str(path)
    if not path.exists():
        raise UsageError(f"config file '{source}' does not exist; see the examples in configs/")
    if path.is_dir():
        raise UsageError(f"'{source}' is a folder; give a YAML config file such as configs/lenet.yaml")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise UsageError(f"cannot read config file '{source}': {err}") from None
    data, lines = _parse_yaml(text, source)
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(source, [Problem("", f"the file must be a mapping of keys (model:, data:, ...), got {type(data).__name__}", 1)])
    data.setdefault("name", path.stem)
    return config_from_dict(data, source=source, overrides=overrides or [], lines=lines)


def config_from_dict(
    data: dict[str, Any], *, source: str = "config", overrides: list[str] | None = None, lines: _LineMap | None = None
) -> Config:
    """Check a config given as a dict (after YAML loading); raise ConfigError listing every problem."""
    lines = lines or _LineMap()
    data = _copy(data)
    problems = apply_overrides(data, overrides or [], lines)
    problems += _schema_problems(data)
    problems += _component_problems(data, renamed={k.split(".")[0] for k in lines.origin if k.endswith(".name")})
    for problem in problems:
        if problem.override is None and problem.line is None:
            problem.line, problem.override = lines.where(problem.key)
    if problems:
        raise ConfigError(source, _dedupe(problems))
    return Config.model_validate(data)


def _copy(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_copy(v) for v in value]
    return value


def _dedupe(problems: list[Problem]) -> list[Problem]:
    seen, unique = set(), []
    for p in problems:
        if (p.key, p.message) not in seen:
            seen.add((p.key, p.message))
            unique.append(p)
    return unique


def _schema_problems(data: dict[str, Any]) -> list[Problem]:
    try:
        Config.model_validate(data)
    except ValidationError as err:
        return [_problem_from_pydantic(e, data) for e in err.errors()]
    return []


_SECTION_EXAMPLES = {
    "model": "model: {name: lenet}",
    "data": "data: {name: digits}",
    "loss": "loss: {name: cross_entropy}",
    "optimizer": "optimizer: {name: sgd, lr: 0.05}",
}


def _problem_from_pydantic(error: dict[str, Any], data: dict[str, Any]) -> Problem:
    loc = [str(p) for p in error["loc"]]
    # pydantic tags union members in the location (scheduler.SchedulerConfig...); keep the user's keys only
    loc = [p for p in loc if not p[:1].isupper() and p not in ("int", "float", "str", "bool", "none")]
    key = ".".join(loc)
    kind = error["type"]
    if kind == "missing":
        if len(loc) == 1 and loc[0] in _SECTION_EXAMPLES:
            return Problem(key, f"required section is missing; add e.g. `{_SECTION_EXAMPLES[loc[0]]}`")
        return Problem(key, "required key is missing")
    if kind == "extra_forbidden":
        parent, _, name = key.rpartition(".")
        # only the top level and `train` forbid extra keys; component sections pass them to constructors
        accepted = list((TrainConfig if parent == "train" else Config).model_fields)
        guess = close_match(name, accepted)
        hint = f"did you mean '{guess}'? " if guess else ""
        return Problem(key, f"unknown key '{name}'; {hint}accepted keys: {', '.join(accepted)}")
    if kind in ("model_type", "model_attributes_type", "dict_type"):
        return Problem(key, f"must be a mapping such as {{name: ...}}, got {error.get('input')!r}")
    message = error["msg"]
    if message.startswith("Value error, "):
        message = message[len("Value error, ") :]
    message = message[0].lower() + message[1:]
    return Problem(key, f"{message}; got {error.get('input')!r}")


def _component_problems(data: dict[str, Any], renamed: set[str] = frozenset()) -> list[Problem]:
    """Unknown component names, and constructor arguments a component does not take or lacks.

    `renamed`: sections whose name an override changed; their leftover arguments get a `~key` hint.
    """
    problems: list[Problem] = []
    regs = None
    for section, own_keys in _SECTION_OWN_KEYS.items():
        body = data.get(section)
        if not isinstance(body, dict) or not isinstance(body.get("name"), str):
            continue  # reported by the schema check
        regs = regs or registries()
        registry = regs[section]
        name = body["name"]
        if name not in registry:
            problems.append(Problem(f"{section}.name", registry.unknown_message(name)))
            continue
        kwargs = {k: v for k, v in body.items() if k != "name" and k not in own_keys}
        coerced, arg_problems = registry.check_kwargs(name, kwargs)
        hint = "; remove it with ~{section}.{arg}" if section in renamed else ""
        entry = registry.get(name)
        problems += [
            Problem(f"{section}.{arg}", message + _elsewhere(registry, entry, section, arg) + hint.format(section=section, arg=arg))
            for arg, message in arg_problems
        ]
        body.update(coerced)  # `lr: 3e-4` arrives as a string; store the number
        filled_by_runner = _runner_filled(section, name)
        missing = [m for m in registry.missing_kwargs(name, kwargs) if m not in filled_by_runner]
        for arg in missing:
            problems.append(
                Problem(f"{section}.{arg}", f"{entry.name}() needs argument '{arg}'; add `{arg}: ...` under {section}")
            )
        if not arg_problems and not missing:
            from trainer.components import constructor_problem

            refused = constructor_problem(section, name, coerced)
            if refused is not None:
                problems.append(Problem(*refused))
    return problems


def _elsewhere(registry: Registry, entry: Any, section: str, arg: str) -> str:
    """For `fused` or `foreach` given to an optimizer without it: the optimizers that take it."""
    if section != "optimizer" or arg not in ("fused", "foreach") or arg in entry.parameters():
        return ""
    having = [n for n in registry.names() if arg in registry.get(n).parameters()]
    return f"; only {', '.join(having)} take '{arg}'" if having else ""


def _runner_filled(section: str, name: str) -> set[str]:
    """Required constructor arguments the runner supplies itself (a schedule's length)."""
    if section != "scheduler":
        return set()
    from trainer.components import schedule_length_kwargs

    return set(schedule_length_kwargs(name, {}, interval="epoch", epochs=1, total_steps=1))
