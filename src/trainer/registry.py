"""One small generic registry: name -> factory, a one-line description, and a kwargs check.

Models, datasets, losses, optimizers and schedulers all live in a `Registry`. Adding one is a
single decorated function or class:

    @MODELS.register("lenet", input_shape=(1, 32, 32))
    def lenet(num_classes: int = 10, in_channels: int = 1) -> nn.Module:
        "LeNet-5 as in the PyTorch tutorial."
"""

from __future__ import annotations

import difflib
import inspect
import math
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator


class RegistryError(ValueError):
    """A name or keyword argument that a registry does not know; `key` is the offending name."""

    def __init__(self, message: str, key: str | None = None) -> None:
        super().__init__(message)
        self.key = key


def close_match(word: str, choices: typing.Iterable[str]) -> str | None:
    """The closest of `choices` to `word`, if any is close enough to be a likely typo."""
    matches = difflib.get_close_matches(str(word), list(choices), n=1, cutoff=0.6)
    return matches[0] if matches else None


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
        """Register `factory` under `name` (and `aliases`); the first docstring line is the default description."""
        if name in self._entries or name in self._aliases:
            raise ValueError(f"{self.kind} '{name}' is already registered")
        doc = (inspect.getdoc(factory) or "").strip().splitlines()
        self._entries[name] = Entry(
            name=name,
            factory=factory,
            description=description or (doc[0] if doc else ""),
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
# coercion of YAML values to constructor parameter types

_NONE = type(None)


def _describe(annotation: Any) -> str:
    if annotation is float:
        return "a number"
    if annotation is int:
        return "a whole number"
    if annotation is bool:
        return "true or false"
    if annotation is str:
        return "a string"
    return getattr(annotation, "__name__", None) or str(annotation).replace("typing.", "")


def coerce(value: Any, param: inspect.Parameter, annotation: Any = None) -> Any:
    """Coerce a YAML value to what `param` expects: from its annotation, else from its default.

    PyYAML reads `3e-4` as a string; a float parameter must still accept it. Raises ValueError
    with a short phrase ("expects a number, got 'abc'") when the value cannot be coerced.
    """
    if annotation is None and param.annotation is not inspect.Parameter.empty and not isinstance(param.annotation, str):
        annotation = param.annotation
    if annotation is not None:
        try:
            return _coerce_to(value, annotation)
        except _Unsupported:
            pass
    default = param.default
    if default is inspect.Parameter.empty or default is None or value is None:
        return value
    try:
        return _coerce_to(value, type(default))
    except _Unsupported:
        return value


class _Unsupported(Exception):
    """The annotation is too exotic to check; pass the value through unchanged."""


class _NotFinite(ValueError):
    """A number where a float goes, but nan or infinite: said as such, also when a union has other members."""


def _coerce_to(value: Any, annotation: Any) -> Any:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if annotation is Any:
        return value
    if origin is typing.Union or origin is types.UnionType:
        if value is None and _NONE in args:
            return None
        checkable = []
        not_finite = None
        # plain scalars first so "3" for int | float becomes 3, not 3.0
        for arg in sorted((a for a in args if a is not _NONE), key=_scalar_rank):
            try:
                return _coerce_to(value, arg)
            except _NotFinite as err:
                not_finite = err
                checkable.append(arg)
            except ValueError:
                checkable.append(arg)
            except _Unsupported:
                pass  # a tensor or callable alternative: nothing in YAML can be one
        if not_finite is not None:
            raise not_finite  # `lr: .nan` for float | Tensor: the number is the problem, not its type
        if not checkable:
            return value
        wanted = " or ".join(_describe(a) for a in checkable)
        raise ValueError(f"expects {wanted}, got {value!r}")
    if origin is typing.Literal:
        if value in args:
            return value
        raise ValueError(f"expects one of {', '.join(repr(a) for a in args)}, got {value!r}")
    if origin in (list, tuple, typing.Sequence) or annotation in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"expects a list, got {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise ValueError(f"expects a list of {len(args)} values, got {value!r}")
            items = [_coerce_to(v, a) for v, a in zip(value, args)]
        elif args:
            items = [_coerce_to(v, args[0]) for v in value]
        else:
            items = list(value)
        return tuple(items) if (origin is tuple or annotation is tuple) else items
    if annotation is bool:
        if isinstance(value, bool):
            return value
        raise ValueError(f"expects true or false, got {value!r}")
    if annotation is int:
        if isinstance(value, bool):
            raise ValueError(f"expects a whole number, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
            try:
                as_float = float(value)
            except ValueError:
                as_float = None
            if as_float is not None and as_float.is_integer():
                return int(as_float)
        raise ValueError(f"expects a whole number, got {value!r}")
    if annotation is float:
        if isinstance(value, bool):
            raise ValueError(f"expects a number, got {value!r}")
        try:
            if isinstance(value, (int, float, str)):
                number = float(value)
                if not math.isfinite(number):  # `.nan`, `.inf`, or "1e400" (a string to PyYAML) read as inf
                    shown = value if isinstance(value, float) else repr(value)
                    raise _NotFinite(f"must be a finite number, got {shown}")
                return number
        except _NotFinite:
            raise
        except ValueError:
            pass
        except OverflowError:
            raise ValueError(f"expects a number, got one too large for a float: {str(value)[:20]}...") from None
        raise ValueError(f"expects a number, got {value!r}")
    if annotation is str:
        if isinstance(value, str):
            return value
        raise ValueError(f"expects a string, got {value!r}")
    if annotation is _NONE:
        if value is None:
            return None
        raise ValueError(f"expects null, got {value!r}")
    raise _Unsupported(annotation)


def _scalar_rank(annotation: Any) -> int:
    order = {bool: 0, int: 1, float: 2, str: 4}
    return order.get(annotation, 3)
