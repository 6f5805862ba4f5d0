"""The config: pydantic models (the one place defaults live), YAML loading with base configs
(`extends`), `key=value` overrides and error reports that list every problem at once, with file and
line, dotted key, value and choices.

The config knows nothing about the loop. Component names and their keyword arguments are checked
against the registries here, before anything is built.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator
from pydantic_core import PydanticCustomError

from trainer.errors import UsageError
from trainer.registry import Registry, close_match

# ---------------------------------------------------------------------------------------------
# the schema: every default, with its unit or accepted values


def _refuse_bool(error_type: str, message: str) -> BeforeValidator:
    """pydantic's lax mode reads `true` as 1 for an int or float field; YAML users mean a switch, so refuse it
    with pydantic's own message for a value that is not a number ("3" and "3e-4" stay accepted)."""

    def check(value: Any) -> Any:
        if isinstance(value, bool):
            raise PydanticCustomError(error_type, message)
        return value

    return BeforeValidator(check)


Int = Annotated[int, _refuse_bool("int_type", "Input should be a valid integer")]
Float = Annotated[float, _refuse_bool("float_type", "Input should be a valid number")]
# the whole optional is checked before the union, so `true` gets one message, not one per member
OptionalInt = Annotated[int | None, _refuse_bool("int_type", "Input should be a valid integer")]
OptionalFloat = Annotated[float | None, _refuse_bool("float_type", "Input should be a valid number")]


class Component(BaseModel):
    """`{name: ..., <keyword arguments of its constructor>}`; the arguments are checked against the registry."""

    model_config = ConfigDict(extra="allow", allow_inf_nan=False)

    name: str  # a registered name: `trainer list <kind>`

    @property
    def kwargs(self) -> dict[str, Any]:
        """The constructor's keyword arguments (every key but the runner's own)."""
        return dict(self.model_extra or {})


class ModelConfig(Component):
    """The model; sizes the data determines (in_features, num_classes, ...) may be left out."""


class DataConfig(Component):
    """The dataset, with the keys every dataset takes."""

    batch_size: Int = Field(64, gt=0)  # samples per optimizer step
    val_fraction: Float = Field(0.2, ge=0, lt=1)  # share held out for validation (datasets without a split); 0: none
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


class EarlyStopping(BaseModel):
    """`train.early_stopping`: stop when `train.monitor` stops improving."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    patience: Int = Field(5, gt=0)  # epochs without improvement before the run stops
    min_delta: Float = Field(0.0, ge=0)  # an improvement of the monitored metric by less than this does not count


class EMA(BaseModel):
    """`train.ema`: an exponential moving average of the weights, which validation and best.pt use."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    decay: Float = Field(0.999, gt=0, lt=1)  # per optimizer step: ema = decay * ema + (1 - decay) * weights


def _switch(value: Any) -> Any:
    """`true` turns a section on with its defaults, `false` off."""
    if value is True:
        return {}
    return None if value is False else value


class TrainConfig(BaseModel):
    """The training budget and loop settings."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    epochs: OptionalInt = Field(None, gt=0)  # passes over the training data; 10 when neither this nor max_steps is set
    max_steps: OptionalInt = Field(None, gt=0)  # optimizer steps; the run stops at whichever limit comes first
    log_every: Int = Field(10, gt=0)  # optimizer steps between train-loss points (console, TensorBoard, metrics.jsonl)
    histograms_every: OptionalInt = Field(None, gt=0)  # epochs between TensorBoard histograms of the weights and their gradients; null: none
    pictures: bool = True  # TensorBoard images of what validation saw (confusion matrix, mistakes, predictions), the model graph, confusion.csv
    grad_clip: OptionalFloat = Field(None, gt=0)  # max L2 norm of all gradients; null: no clipping
    checkpoint_interval_s: Float = Field(10.0, ge=0)  # seconds: an epoch end saves last.pt when this long has passed since the last save; 0: every epoch end
    checkpoint_every: OptionalInt = Field(None, gt=0)  # optimizer steps between saves of last.pt within epochs; null: none
    monitor: Literal["val_loss", "val_accuracy", "train_loss"] | None = None  # best.pt's metric; null: val_loss, or train_loss without validation
    mode: Literal["min", "max"] | None = None  # best is the min or max of `monitor`; null: max for accuracy, else min
    compile: bool | CompileMode = False  # torch.compile the model: false | true | default | reduce-overhead | max-autotune | max-autotune-no-cudagraphs
    channels_last: bool = False  # false | true: channels-last model and 4-D inputs; image data (N, C, H, W) only
    cudnn_benchmark: bool = False  # false | true: torch.backends.cudnn.benchmark; CUDA only, not bit-exact
    tf32: bool = False  # false | true: TF32 matmuls and cuDNN convolutions; CUDA only; false: full fp32
    early_stopping: Annotated[EarlyStopping | None, BeforeValidator(_switch)] = None  # {patience, min_delta} on `monitor`, or true; null: never stop early
    accumulate: Int = Field(1, gt=0)  # batches per optimizer step: gradients of N batches summed, each loss divided by N
    ema: Annotated[EMA | None, BeforeValidator(_switch)] = None  # {decay}, or true: validate and keep best.pt with averaged weights; null: none

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

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    name: str = Field("run", min_length=1)  # run name: the run folder is runs/<name>/<timestamp>; default: the file's stem
    seed: Int = Field(0, ge=0, lt=2**63)  # seeds python, numpy and torch, the data split and the data order
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
    # a file that extends base files may leave out the sections they give
    schema["properties"]["extends"] = {
        "anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}],
        "description": "base config files merged under this one, in order; paths relative to this file's folder",
    }
    schema["if"] = {"required": ["extends"]}
    schema["else"] = {"required": schema.pop("required")}
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
    also: tuple[str, ...] = ()  # further override items it came from (fused=true with foreach=true)
    file: str | None = None  # the base file (`extends`) the line is in; None: the config file itself

    def location(self) -> str:
        parts = []
        if self.override is not None:
            items = [self.override, *self.also]
            parts.append(("overrides " if self.also else "override ") + ", ".join(f"'{item}'" for item in items))
        elif self.line is not None:
            parts.append(f"{self.file} line {self.line}" if self.file else f"line {self.line}")
        elif self.file:
            parts.append(self.file)
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
        # the config file's own lines first, then each base file's, then the overrides
        self.problems = sorted(problems, key=lambda p: (p.override is not None, p.file or "", p.line or 0, p.key))
        super().__init__(self.report(), key=self.problems[0].key if self.problems else None)

    def report(self) -> str:
        count = len(self.problems)
        head = f"{self.source} is not valid ({count} problem{'s' if count != 1 else ''}):"
        return "\n".join([head, *(f"  {p}" for p in self.problems)])

    def __str__(self) -> str:
        return self.report()


# ---------------------------------------------------------------------------------------------
# YAML with line numbers


_MERGE_TAG = "tag:yaml.org,2002:merge"  # `<<: *base`: keys after it replace the merged ones, by design


class _LineMap:
    """Dotted key -> 1-based line of that key in the file (and the base file it is in); and keys a file gives twice."""

    def __init__(self) -> None:
        self.lines: dict[str, int] = {}
        self.files: dict[str, str] = {}  # dotted key -> the base file that gave its value last; absent: the config file
        self.origin: dict[str, str] = {}  # dotted key -> override item that set it
        self.problems: list[Problem] = []  # keys given more than once in one mapping
        self._seen: set[int] = set()  # mappings already checked (an alias repeats its anchor's node)
        self._open: set[int] = set()  # nodes on the current path: `a: &x {b: *x}` contains itself
        self.cyclic = False  # such a self-containing value was found; nothing further can be checked
        self._keys = yaml.SafeLoader("")  # constructs scalar keys, so `1` and `"1"` stay different keys

    def add_node(self, node: yaml.Node, prefix: str = "") -> None:
        if id(node) in self._open:
            self.cyclic = True
            self.problems.append(Problem(prefix, "contains itself through a YAML alias; a config cannot be recursive", self.lines.get(prefix)))
            return
        self._open.add(id(node))
        if isinstance(node, yaml.MappingNode):
            self._duplicates(node, prefix)
            for key_node, value_node in node.value:
                key = f"{prefix}.{key_node.value}" if prefix else str(key_node.value)
                self.lines[key] = key_node.start_mark.line + 1  # the last one wins, as in the loaded data
                self.add_node(value_node, key)
        elif isinstance(node, yaml.SequenceNode):  # mappings inside lists: only for keys given twice
            for i, item in enumerate(node.value):
                if prefix == "extends":  # a missing base is reported on its own line
                    self.lines[f"extends[{i}]"] = item.start_mark.line + 1
                self.add_node(item, f"{prefix}[{i}]")
        self._open.discard(id(node))

    def _duplicates(self, node: yaml.MappingNode, prefix: str) -> None:
        """One problem per key that `node` gives more than once (PyYAML keeps the last, silently)."""
        if id(node) in self._seen:
            return
        self._seen.add(id(node))
        found: dict[Any, list[tuple[str, int]]] = {}
        for key_node, _ in node.value:
            if key_node.tag == _MERGE_TAG:
                continue
            try:
                key = self._keys.construct_object(key_node, deep=True)
                hash(key)
            except Exception:  # an unusual key: compare it as written
                key = (key_node.tag, str(key_node.value))
            found.setdefault(key, []).append((str(key_node.value), key_node.start_mark.line + 1))
        for places in found.values():
            if len(places) < 2:
                continue
            written, line = places[-1]
            dotted = f"{prefix}.{written}" if prefix else written
            earlier = [str(n) for _, n in places[:-1]]
            if len(places) == 2:
                message = f"given twice (first on line {earlier[0]}); keep one"
            else:
                message = f"given {len(places)} times (also on lines {', '.join(earlier)}); keep one"
            self.problems.append(Problem(dotted, message, line))

    def where(self, key: str) -> tuple[int | None, str | None]:
        """The line of `key`, or of its closest parent that is in the file; or the override that set it
        or created it (`model.foo.bar=3` made `model.foo`, which the file does not have)."""
        _, line, override = self.locate(key)
        return line, override

    def locate(self, key: str) -> tuple[str | None, int | None, str | None]:
        """As `where`, with the base file of that line first (None: the config file itself)."""
        parts = key.split(".") if key else []
        while parts:
            dotted = ".".join(parts)
            if dotted in self.origin:
                return None, None, self.origin[dotted]
            if dotted in self.lines:
                return self.files.get(dotted), self.lines[dotted], None
            created = [item for k, item in self.origin.items() if k.startswith(dotted + ".")]
            if created:
                return None, None, created[0]
            parts.pop()
        return None, None, None

    def stamp(self, file: str) -> None:
        """Mark every key and problem of this map as written in the base file `file`."""
        for key in self.lines:
            self.files.setdefault(key, file)
        for problem in self.problems:
            if problem.file is None and problem.override is None:
                problem.file = file

    def take(self, key: str, other: _LineMap, *, below: bool) -> None:
        """`key` now has its value from `other`'s file: take its line from `other`; with `below`, the
        keys under it too, forgetting the ones this map had there (its value was replaced whole)."""

        def under(k: str) -> bool:
            return k == key or k.startswith((key + ".", key + "["))

        if below:
            for k in [k for k in self.lines if under(k)]:
                del self.lines[k]
                self.files.pop(k, None)
        taken = [k for k in other.lines if under(k)] if below else [key]
        for k in taken:
            if k not in other.lines:
                continue
            self.lines[k] = other.lines[k]
            if k in other.files:
                self.files[k] = other.files[k]
            else:
                self.files.pop(k, None)


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
    if lines.cyclic:
        raise ConfigError(source, lines.problems)
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
    problems, parsed = [], []
    for item in overrides:
        try:
            parsed.append((item, *parse_override(item)))
        except ValueError as err:
            problems.append(Problem("", str(err), override=item))
    return problems + set_keys(data, parsed, lines)


def set_keys(data: dict[str, Any], items: list[tuple[str, list[str], Any]], lines: _LineMap) -> list[Problem]:
    """Set each (label, key parts, value) in `data` (in place); a problem of a key names its label."""
    problems = []
    for item, parts, value in items:
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


MAX_CONFIG_BYTES = 4 * 2**20  # a config is a few KB; inline `tensors` data of a few thousand rows fits


def load_config(path: str | Path, overrides: list[str] | None = None, *, values: dict[str, Any] | None = None) -> Config:
    """Read (with its bases, `extends`), override and check a config file. Raises ConfigError (every
    problem) or UsageError.

    `values`: dotted key -> value, set before `overrides` (a sweep's trial); a problem they cause names its key.
    """
    data, lines = read_config_file(path)
    data.setdefault("name", Path(path).stem)
    items = [(key, key.split("."), value) for key, value in (values or {}).items()]
    original = _copy(data)
    problems = set_keys(data, items, lines)
    return config_from_dict(data, source=str(path), overrides=overrides or [], lines=lines, original=original, problems=problems)


def read_yaml_file(path: str | Path, what: str) -> tuple[dict[str, Any], _LineMap]:
    """A YAML mapping from a file (a config, a sweep file), with the line of each key; UsageError or
    ConfigError when it cannot be one."""
    path = Path(path)
    source = str(path)
    example = "configs/lenet.yaml" if what == "config" else "sweeps/lenet.yaml"
    try:
        exists = path.exists()
    except (OSError, ValueError) as err:  # a name too long, or with a NUL byte
        raise UsageError(f"cannot read {what} file '{source}': {getattr(err, 'strerror', None) or err}") from None
    if not exists:
        raise UsageError(f"{what} file '{source}' does not exist; see the examples in {example.split('/')[0]}/")
    if path.is_dir():
        raise UsageError(f"'{source}' is a folder; give a YAML {what} file such as {example}")
    if not path.is_file():  # /dev/zero, a pipe: it may never end
        raise UsageError(f"{what} file '{source}' is not a regular file (a device, a pipe or a socket); give a YAML file such as {example}")
    try:
        with open(path, "rb") as file:
            raw = file.read(MAX_CONFIG_BYTES + 1)
        text = raw.decode("utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise UsageError(f"cannot read {what} file '{source}': {err}") from None
    if len(raw) > MAX_CONFIG_BYTES:
        raise UsageError(
            f"{what} file '{source}' is larger than {MAX_CONFIG_BYTES // 2**20} MB: not a config; "
            "a config names its data (data.path, data.root) rather than holding it"
        )
    data, lines = _parse_yaml(text, source)
    if data is None:
        data = {}
    if not isinstance(data, dict):
        keys = "(model:, data:, ...)" if what == "config" else "(config:, parameters:, ...)"
        raise ConfigError(source, [Problem("", f"the file must be a mapping of keys {keys}, got {type(data).__name__}", 1)])
    return data, lines


MAX_BASE_FILES = 100  # files one config may read through `extends`: a few in practice; this stops a blow-up


def read_config_file(path: str | Path) -> tuple[dict[str, Any], _LineMap]:
    """A config file with its base files (`extends`) merged under it, without `extends`, and the file
    and line that gave each key its value; ConfigError for every problem of `extends` at once."""
    data, lines = read_yaml_file(path, "config")
    problems: list[Problem] = []
    data, lines = _with_bases(Path(path), str(path), data, lines, chain=[], read=[], problems=problems)
    if problems:
        raise ConfigError(str(path), problems)
    return data, lines


def _with_bases(
    path: Path, label: str, data: dict[str, Any], lines: _LineMap, *,
    chain: list[tuple[Path, str]], read: list[Path], problems: list[Problem],
) -> tuple[dict[str, Any], _LineMap]:
    """`data` (the file `path`, shown as `label`) merged over its bases, in order; `chain`: the files
    that extend it, to find a cycle; `read`: every base file read so far."""
    if "extends" not in data:
        return data, lines
    value = data.pop("extends")
    file, line = lines.files.get("extends"), lines.lines.get("extends")
    names = value if isinstance(value, list) else [value]
    if not all(isinstance(name, str) and name.strip() for name in names):
        problems.append(Problem(
            "extends", "must be a YAML file, or a list of them, relative to this file's folder, "
            f"such as `extends: base.yaml` or `extends: [../lenet.yaml, fast.yaml]`; got {value!r}", line, file=file,
        ))  # fmt: skip
        return data, lines
    chain = [*chain, (path.resolve(), label)]
    merged, merged_lines = {}, _LineMap()
    for i, name in enumerate(names):
        base_path = path.parent / name
        base_label = os.path.normpath(os.path.join(os.path.dirname(label), name))
        message = _base_file_problem(name, base_path, base_label, label, chain, read)
        if message is not None:
            problems.append(Problem("extends", message, lines.lines.get(f"extends[{i}]", line), file=file))
            continue
        read.append(base_path)
        try:
            base, base_lines = read_yaml_file(base_path, "config")
        except ConfigError as err:  # it does not parse, or is not a mapping: its own line, in its own file
            for problem in err.problems:
                problem.file = problem.file or base_label
            problems.extend(err.problems)
            continue
        except UsageError as err:  # a folder, a device, too large, unreadable
            problems.append(Problem("extends", str(err), lines.lines.get(f"extends[{i}]", line), file=file))
            continue
        base_lines.stamp(base_label)
        base, base_lines = _with_bases(
            base_path, base_label, base, base_lines, chain=chain, read=read, problems=problems
        )
        _merge(merged, merged_lines, base, base_lines)
        merged_lines.problems += base_lines.problems
    _merge(merged, merged_lines, data, lines)
    merged_lines.problems += lines.problems
    return merged, merged_lines


def _base_file_problem(
    name: str, path: Path, label: str, extender: str, chain: list[tuple[Path, str]], read: list[Path]
) -> str | None:
    """Why the base file `name` (at `path`, shown as `label`) named in `extender` cannot be read, or None."""
    if Path(name).suffix.lower() not in (".yaml", ".yml"):
        return (
            f"'{name}' is not a YAML file: `extends` names .yaml or .yml files, read with safe_load, and never "
            "imports code (your own models and datasets come from --plugins)"
        )
    try:
        resolved, exists = path.resolve(), path.exists()
    except (OSError, ValueError) as err:  # a name too long, a NUL byte
        return f"cannot read base file '{label}': {getattr(err, 'strerror', None) or err}"
    for start, (ancestor, _) in enumerate(chain):
        if ancestor == resolved:
            cycle = " -> ".join([shown for _, shown in chain[start:]] + [chain[start][1]])
            return f"'{name}' makes a cycle: {cycle}; a config cannot extend itself, directly or through its bases"
    if not exists:
        folder = path.parent
        others = [p.name for p in folder.glob("*.y*ml")] if folder.is_dir() else []
        guess = close_match(Path(name).name, others)
        hint = f"did you mean '{os.path.join(os.path.dirname(name), guess)}'? " if guess else ""
        return f"base file '{label}' does not exist; {hint}the path is relative to the folder of {extender}"
    if len(read) >= MAX_BASE_FILES:
        return f"more than {MAX_BASE_FILES} base files through `extends`; a config extends a few"
    return None


def _merge(data: dict[str, Any], lines: _LineMap, over: dict[str, Any], over_lines: _LineMap, prefix: str = "") -> None:
    """Merge `over` into `data` (in place) and the lines of its keys into `lines`: a mapping merges key
    by key, anything else (a list, a scalar, null) replaces. A component section that names another
    component (`optimizer: {name: adam}` over sgd) replaces whole: the base's arguments were for sgd()."""
    for key, value in over.items():
        dotted = f"{prefix}.{key}" if prefix else str(key)
        old = data.get(key)
        if isinstance(old, dict) and isinstance(value, dict) and not _other_component(dotted, old, value):
            _merge(old, lines, value, over_lines, dotted)
            lines.take(dotted, over_lines, below=False)
        else:
            data[key] = value
            lines.take(dotted, over_lines, below=True)


def _other_component(dotted: str, old: dict[str, Any], new: dict[str, Any]) -> bool:
    names = old.get("name"), new.get("name")
    return dotted in _SECTION_OWN_KEYS and all(isinstance(n, str) for n in names) and names[0] != names[1]


def config_from_dict(
    data: dict[str, Any], *, source: str = "config", overrides: list[str] | None = None, lines: _LineMap | None = None,
    original: dict[str, Any] | None = None, problems: list[Problem] | None = None, training: bool = True,
) -> Config:
    """Check a config given as a dict (after YAML loading); raise ConfigError listing every problem.

    `training=False` (a trained run's config, for eval, predict and export) does not try the optimizer's
    and scheduler's constructors: those commands never build them, and the first torch optimizer built
    imports torch._dynamo (~2 s)."""
    lines = lines or _LineMap()
    # as the file has it: a constructor's refusal is pinned on the overrides that caused it
    original = _copy(data) if original is None else original
    data = _copy(data)
    problems = list(lines.problems) + list(problems or [])  # keys the file gives twice
    problems += apply_overrides(data, overrides or [], lines)
    problems += _schema_problems(data)
    problems += _component_problems(data, origin=lines.origin, original=original, training=training)
    for problem in problems:
        if problem.override is None and problem.line is None:
            problem.file, problem.line, problem.override = lines.locate(problem.key)
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


def _section_model(path: list[str]) -> type[BaseModel]:
    """The pydantic model of the config section at `path` ([] the top level, ['train', 'ema'], ...)."""
    model: type[BaseModel] = Config
    for part in path:
        annotation = model.model_fields[part].annotation
        members = [annotation, *get_args(annotation)]
        while any(get_args(m) for m in members):  # Annotated[X | None, ...]
            members = [a for m in members for a in (get_args(m) or [m])]
        model = next(m for m in members if isinstance(m, type) and issubclass(m, BaseModel))
    return model


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
        # the key itself as written (it may look like a union tag: `Int`); the sections above it
        name = str(error["loc"][-1])
        section = loc[:-1] if loc and loc[-1] == name else loc
        key = ".".join([*section, name])
        # component sections pass extra keys to constructors; the others forbid them
        accepted = list(_section_model(section).model_fields)
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


def _component_problems(
    data: dict[str, Any], origin: dict[str, str] | None = None, original: dict[str, Any] | None = None, training: bool = True
) -> list[Problem]:
    """Unknown component names, and constructor arguments a component does not take, lacks, or that its
    constructor refuses.

    `origin`: dotted key -> the override item that set it; sections whose name an override changed get a
    `~key` hint for their leftover arguments. `original`: the config before the overrides.
    """
    origin = origin or {}
    renamed = {k.split(".")[0] for k in origin if k.endswith(".name")}
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
        entry = registry.get(name)
        accepted = entry.parameters()
        for arg, message in arg_problems:
            # an argument the new component does not take was left over from the old one
            hint = f"; remove it with ~{section}.{arg}" if section in renamed and arg not in accepted else ""
            problems.append(Problem(f"{section}.{arg}", message + _elsewhere(registry, entry, section, arg) + hint))
        body.update(coerced)  # `lr: 3e-4` arrives as a string; store the number
        filled_by_runner = _runner_filled(section, name)
        missing = [m for m in registry.missing_kwargs(name, kwargs) if m not in filled_by_runner]
        for arg in missing:
            problems.append(
                Problem(f"{section}.{arg}", f"{entry.name}() needs argument '{arg}'; add `{arg}: ...` under {section}")
            )
        if not arg_problems and not missing and (training or section not in ("optimizer", "scheduler")):
            from trainer.components import constructor_problem

            refused = constructor_problem(section, name, coerced)
            if refused is not None:
                problems.append(_refusal_problem(section, name, registry, coerced, refused, origin, original or {}))
    return problems


def _refusal_problem(
    section: str,
    name: str,
    registry: Registry,
    kwargs: dict[str, Any],
    refused: tuple[str, str],
    origin: dict[str, str],
    original: dict[str, Any],
) -> Problem:
    """A constructor's refusal; when torch's message names no argument, the overrides that caused it.

    An overridden argument is to blame when putting back the file's value (or removing it, when the file
    has none) lets the constructor accept the rest; if no single one does, all of them together.
    """
    key, message = refused
    overridden = [arg for arg in kwargs if f"{section}.{arg}" in origin]
    if key != section or not overridden:
        return Problem(key, message)  # a named argument is located like any key (line, or its override)
    from trainer.components import constructor_problem

    file_body = original.get(section) if isinstance(original.get(section), dict) else {}

    def accepted_without(args: list[str]) -> bool:
        restored = {k: v for k, v in kwargs.items() if k not in args}
        from_file = {arg: file_body[arg] for arg in args if arg in file_body}
        coerced, arg_problems = registry.check_kwargs(name, from_file)
        if arg_problems:
            return False
        restored.update(coerced)
        return constructor_problem(section, name, restored) is None

    blamed = [arg for arg in overridden if accepted_without([arg])]
    if not blamed and len(overridden) > 1 and accepted_without(overridden):
        blamed = overridden
    if not blamed:
        return Problem(key, message)
    items = [origin[f"{section}.{arg}"] for arg in blamed]
    key = f"{section}.{blamed[0]}" if len(blamed) == 1 else section
    return Problem(key, message, override=items[0], also=tuple(items[1:]))


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
