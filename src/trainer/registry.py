"""One small generic registry: name -> factory, a one-line description, and a kwargs check.

Models, datasets, losses, optimizers and schedulers all live in a `Registry`. Adding one is a
single decorated function or class:

    @MODELS.register("lenet", input_shape=(1, 32, 32))
    def lenet(num_classes: int = 10, in_channels: int = 1) -> nn.Module:
        "LeNet-5 as in the PyTorch tutorial."
"""

from __future__ import annotations

import difflib
import functools
import inspect
import math
import re
import types
import typing
from dataclasses import dataclass, field
from typing import Annotated, Any, Callable, Iterator

from pydantic import BeforeValidator, FiniteFloat, StrictBool, StrictStr, TypeAdapter, ValidationError


class RegistrationError(ValueError):
    """A second factory under a name that is taken (a plugin naming its model like a built-in)."""


class RegistryError(ValueError):
    """A name or keyword argument that a registry does not know; `key` is the offending name."""

    def __init__(self, message: str, key: str | None = None) -> None:
        super().__init__(message)
        self.key = key


def close_match(word: str, choices: typing.Iterable[str]) -> str | None:
    """The closest of `choices` to `word`, if any is close enough to be a likely typo."""
    matches = difflib.get_close_matches(str(word), list(choices), n=1, cutoff=0.6)
    return matches[0] if matches else None


def doc_summary(obj: Any, limit: int | None = None) -> str:
    """The first sentence of `obj`'s docstring on one line; past `limit` characters, cut at a word with "..."."""
    paragraph = " ".join((inspect.getdoc(obj) or "").strip().split("\n\n")[0].split())
    paragraph = re.sub(r":\w+:`~?([^`]*)`|`([^`]*)`_?", r"\1\2", paragraph)  # reST roles and literals, as in torch's
    # a sentence ends at a full stop before a capital or the end, not inside "e.g. the"
    sentence = re.match(r".*?[.!?](?=\s+[^a-z]|$)", paragraph)
    text = sentence.group() if sentence else paragraph
    if limit is None or len(text) <= limit:
        return text
    return text[: limit + 1].rsplit(" ", 1)[0].rstrip(",;:") + "..."


@dataclass
class Entry:
    """One registered factory and what the CLI shows about it."""

    name: str
    factory: Callable[..., Any]
    description: str
    info: dict[str, Any] = field(default_factory=dict)  # registry-specific extras (input_shape, ...)
    skip_params: tuple[str, ...] = ()  # constructor parameters the runner fills in itself

    def parameters(self) -> dict[str, inspect.Parameter]:
        """The keyword arguments a config may give, by name."""
        target = self.factory.__init__ if inspect.isclass(self.factory) else self.factory
        params = list(inspect.signature(target).parameters.values())
        if inspect.isclass(self.factory):
            params = params[1:]  # self
        return {
            p.name: p
            for p in params
            if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name not in self.skip_params
        }

    def required(self) -> list[str]:
        """Arguments without a default that the config must give."""
        return [n for n, p in self.parameters().items() if p.default is inspect.Parameter.empty]

    def type_hints(self) -> dict[str, Any]:
        target = self.factory.__init__ if inspect.isclass(self.factory) else self.factory
        try:
            return typing.get_type_hints(target)
        except Exception:  # unresolvable forward references in third-party signatures
            return {}


class Registry:
    """Name -> factory for one kind of component (`kind` is used in messages: 'model', ...).

    With `entry_point_group`, installed packages add entries through Python entry points, e.g. in
    their pyproject.toml: `[project.entry-points."trainer.models"] my_net = "my_pkg.models:my_net"`.
    The entry point's name is the registered name; `input_shape` and other info are read from
    attributes of the factory. Plugins load on first use, never from a dotted path in a config.
    """

    def __init__(self, kind: str, plural: str | None = None, entry_point_group: str | None = None) -> None:
        self.kind = kind
        self.plural = plural or f"{kind}s"
        self.entry_point_group = entry_point_group
        self._entries: dict[str, Entry] = {}
        self._aliases: dict[str, str] = {}
        self._plugins_loaded = entry_point_group is None
        self.plugin_errors: dict[str, str] = {}  # entry point name -> why it did not load

    def _load_plugins(self) -> None:
        if self._plugins_loaded:
            return
        self._plugins_loaded = True
        from importlib.metadata import entry_points

        for point in entry_points(group=self.entry_point_group):
            if point.name in self._entries or point.name in self._aliases:
                self.plugin_errors[point.name] = f"{self.kind} '{point.name}' is built in; the plugin {point.value} is ignored"
                continue
            try:
                factory = point.load()
                if point.name in self._entries:  # the plugin's module registered itself on import
                    continue
                info = {key: getattr(factory, key) for key in ("input_shape",) if hasattr(factory, key)}
                self.add(point.name, factory, **info)
            except Exception as err:  # a broken plugin must not break the built-ins
                self.plugin_errors[point.name] = f"plugin {point.value} failed to load: {type(err).__name__}: {err}"

    def register(
        self,
        name: str | None = None,
        *,
        description: str | None = None,
        aliases: typing.Sequence[str] = (),
        skip_params: typing.Sequence[str] = (),
        **info: Any,
    ) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        """Decorator: register a factory under `name` (default: its own name)."""

        def decorate(factory: Callable[..., Any]) -> Callable[..., Any]:
            self.add(
                name or factory.__name__,
                factory,
                description=description,
                aliases=aliases,
                skip_params=skip_params,
                **info,
            )
            return factory

        return decorate

    def add(
        self,
        name: str,
        factory: Callable[..., Any],
        *,
        description: str | None = None,
        aliases: typing.Sequence[str] = (),
        skip_params: typing.Sequence[str] = (),
        **info: Any,
    ) -> None:
        """Register `factory` under `name` (and `aliases`); by default its docstring's first sentence describes it."""
        if name in self._entries or name in self._aliases:
            raise RegistrationError(f"{self.kind} '{name}' is already registered (trainer list {self.plural}); choose another name")
        self._entries[name] = Entry(
            name=name,
            factory=factory,
            description=description or doc_summary(factory),
            info=dict(info),
            skip_params=tuple(skip_params),
        )
        for alias in aliases:
            self._aliases[alias] = name

    def __contains__(self, name: object) -> bool:
        self._load_plugins()
        return name in self._entries or name in self._aliases

    def __iter__(self) -> Iterator[Entry]:
        self._load_plugins()
        return iter(sorted(self._entries.values(), key=lambda e: e.name))

    def __len__(self) -> int:
        self._load_plugins()
        return len(self._entries)

    def names(self) -> list[str]:
        self._load_plugins()
        return sorted(self._entries)

    def aliases_of(self, name: str) -> list[str]:
        return sorted(a for a, target in self._aliases.items() if target == name)

    def get(self, name: str) -> Entry:
        """The entry for `name` or an alias of it; a RegistryError with a close match otherwise."""
        if not isinstance(name, str):
            raise RegistryError(
                f"{self.kind} name must be a string, got {name!r}; choose one of: {', '.join(self.names())}"
            )
        self._load_plugins()
        if name in self._aliases:
            name = self._aliases[name]
        if name not in self._entries:
            raise RegistryError(self.unknown_message(name))
        return self._entries[name]

    def unknown_message(self, name: str) -> str:
        self._load_plugins()
        if name in self.plugin_errors:
            return f"{self.kind} '{name}' is not available: {self.plugin_errors[name]}"
        if "." in name or ":" in name:  # a module path, as Hydra's _target_ or Lightning's class_path take
            return (
                f"unknown {self.kind} '{name}': a config names registered {self.plural} only and never imports code; "
                f"register yours in a plugin file and pass it on the command line: --plugins my_{self.plural}.py "
                "(docs/plugins.md)"
            )
        guess = close_match(name, list(self._entries) + list(self._aliases))
        hint = f"did you mean '{guess}'? " if guess else ""
        return f"unknown {self.kind} '{name}'; {hint}(trainer list {self.plural})"

    def check_kwargs(self, name: str, kwargs: dict[str, Any]) -> tuple[dict[str, Any], list[tuple[str, str]]]:
        """Check `kwargs` against the factory's signature and coerce them to its parameter types.

        Returns the coerced kwargs and a list of (argument, message) problems; nothing is built.
        """
        entry = self.get(name)
        params = entry.parameters()
        hints = entry.type_hints()
        coerced: dict[str, Any] = {}
        problems: list[tuple[str, str]] = []
        accepted = ", ".join(params) or "no arguments"
        for key, value in kwargs.items():
            if key not in params:
                guess = close_match(key, params)
                hint = f"did you mean '{guess}'? " if guess else ""
                problems.append((key, f"{entry.name}() has no argument '{key}'; {hint}it accepts: {accepted}"))
                continue
            try:
                coerced[key] = coerce(value, params[key], hints.get(key))
            except ValueError as err:
                problems.append((key, f"{entry.name}() argument '{key}' {err}"))
        return coerced, problems

    def missing_kwargs(self, name: str, given: typing.Iterable[str]) -> list[str]:
        """Required arguments of `name` that are not in `given`."""
        given = set(given)
        return [p for p in self.get(name).required() if p not in given]

    def build(self, name: str, *args: Any, **kwargs: Any) -> Any:
        """Check and coerce `kwargs`, then call the factory; `args` are what the runner passes itself
        (an optimizer's parameters, a scheduler's optimizer) and are not checked."""
        coerced, problems = self.check_kwargs(name, kwargs)
        if problems:
            raise RegistryError("; ".join(msg for _, msg in problems), key=problems[0][0])
        return self.get(name).factory(*args, **coerced)


# ---------------------------------------------------------------------------------------------
# coercion of YAML values to constructor parameter types, by pydantic


def _not_a_bool(value: Any) -> Any:
    if isinstance(value, bool):  # pydantic's lax int and float read true as 1
        raise ValueError("a bool")
    return value


def _whole_number_input(value: Any) -> Any:
    # `.inf` for an int says it expects a whole number; only a float argument "must be a finite number"
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError("not finite")
    return _not_a_bool(value)


# what pydantic checks in place of each scalar: ints take "3" and 3.0, floats take "3e-4" (a string to
# PyYAML) but not nan or inf, and neither takes true; a bool is only true or false
_SCALARS: dict[Any, Any] = {
    bool: StrictBool,
    int: Annotated[int, BeforeValidator(_whole_number_input)],
    float: Annotated[FiniteFloat, BeforeValidator(_not_a_bool)],
    str: StrictStr,
    types.NoneType: types.NoneType,
}
_UNIONS = (typing.Union, types.UnionType)
_WORDS = {int: "a whole number", float: "a number", bool: "true or false", str: "a string", types.NoneType: "null"}


def coerce(value: Any, param: inspect.Parameter, annotation: Any = None) -> Any:
    """Coerce a YAML value to what `param` expects: from its annotation, else from its default.

    Raises ValueError with a short phrase ("expects a number, got 'abc'") when the value cannot be coerced.
    """
    if annotation is None and param.annotation is not inspect.Parameter.empty and not isinstance(param.annotation, str):
        annotation = param.annotation
    checked = _checkable(annotation) if annotation is not None else None
    default = param.default
    if checked is None and default is not inspect.Parameter.empty and default is not None and value is not None:
        checked = _checkable(type(default))
    if checked is None:
        return value
    try:
        return _adapter(checked).validate_python(value)
    except ValidationError as err:
        raise ValueError(_problem(checked, value, err.errors())) from None


def _checkable(annotation: Any) -> Any:
    """`annotation` as pydantic is to check it, without what no YAML value can be (a tensor, a callable);
    None when nothing in it is left to check."""
    if isinstance(annotation, type) and annotation in _SCALARS:  # (a plugin's annotation may not hash)
        return _SCALARS[annotation]
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if annotation is Any or origin is typing.Literal or annotation in (list, tuple):
        return annotation
    if origin in _UNIONS:
        members = [m for m in map(_checkable, args) if m is not None]
        # `lr: float | Tensor` checks the float; `weight: Tensor | None` is left to the constructor
        return typing.Union[tuple(members)] if any(m is not types.NoneType for m in members) else None
    if origin in (list, tuple) and args:
        items = [a if a is Ellipsis else _checkable(a) for a in args]
        return origin if None in items else origin[tuple(items)]  # a list of tensors: at least a list
    return None


@functools.lru_cache(maxsize=None)
def _adapter(checkable: Any) -> TypeAdapter:
    return TypeAdapter(checkable)


def _problem(annotation: Any, value: Any, errors: list[Any]) -> str:
    """Pydantic's first error as a phrase: what the annotation expects where the value went wrong."""
    # a list of the wrong length is said before what is wrong in its items; a nan or inf number before
    # its type, also where a union has other members
    first = min(errors, key=lambda e: (e["type"] not in ("missing", "too_long"), e["type"] != "finite_number"))
    if first["type"] == "finite_number":
        shown = first["input"] if isinstance(first["input"], float) else repr(first["input"])
        return f"must be a finite number, got {shown}"
    for step in first["loc"]:  # list and tuple items by index; a union's member (by name) ends the walk
        annotation = _core(annotation)
        if not (isinstance(step, int) and isinstance(value, (list, tuple)) and step < len(value)):
            break  # (pydantic also reads a YAML !!set as a list)
        items = [a for a in typing.get_args(annotation) if a is not Ellipsis]
        annotation, value = items[min(step, len(items) - 1)], value[step]
    annotation = _core(annotation)
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
        return f"expects a number, got one too large for a float: {str(value)[:20]}..."
    return f"expects {_describe(annotation, value)}, got {value!r}"


def _core(annotation: Any) -> Any:
    """The type behind pydantic's metadata (Annotated) and an Optional's None."""
    if typing.get_origin(annotation) is typing.Annotated:
        annotation = typing.get_args(annotation)[0]
    members = [a for a in typing.get_args(annotation) if a is not types.NoneType]
    return _core(members[0]) if typing.get_origin(annotation) in _UNIONS and len(members) == 1 else annotation


def _describe(annotation: Any, value: Any) -> str:
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Literal:
        return f"one of {', '.join(map(repr, args))}"
    if origin in _UNIONS:
        members = sorted((_core(a) for a in args if a is not types.NoneType), key=lambda m: m not in _WORDS)
        return " or ".join(_WORDS.get(m) or getattr(m, "__name__", str(m)) for m in members)
    if origin is tuple and args[-1] is not Ellipsis and isinstance(value, (list, tuple)):
        return f"a list of {len(args)} values"
    if origin in (list, tuple) or annotation in (list, tuple):
        return "a list"
    return _WORDS.get(annotation, str(annotation))
