"""Property-based test of `trainer validate`: bad input is an exit code 2 with a message, never a traceback.

Hypothesis takes one of the shipped configs (configs/*.yaml and configs/mnist/*.yaml), applies 1-3
random mutations to it (a key deleted or renamed at any depth, a value swapped for one of another
type, a random scalar set at an existing or new path, a boundary number -- 0, negative, nan, inf,
beyond int64 or float -- where a number goes, another registered component name) and adds 0-3
`KEY=VALUE` / `~KEY` overrides (real and random dotted keys, random values, malformed items),
then runs `trainer validate CONFIG OVERRIDES...` in process through Typer's CliRunner. The only
outcomes allowed are success (exit 0) or a clean exit 2 whose output is an "error: ..." message
without a traceback (DESIGN.md, "Bad input"). Any other exception, or any other exit code, fails
the test with the mutated YAML, the overrides and the full traceback.

Sizes that only make validate slow or exhaust memory (a dataset `size`, `image_size`, `hidden`,
`input_shape`, ...) are capped after mutation (see `_bounded`): that is a limit of the test, not
of the runner. `download: true` is turned off so the test never touches the network, and data
paths are kept relative to a temporary working folder so nothing is written into the repository.

Runs:

    python -m pytest tests/test_cli_fuzz.py
        derandomized, FUZZ_EXAMPLES_DEFAULT (1000) examples: the same examples on every run (CI);
        about 25 s on a 2-core CPU when nothing fails (shrinking a failure adds some 10-30 s).

    TRAINER_FUZZ_EXAMPLES=2000 python -m pytest tests/test_cli_fuzz.py
        a deeper run with that many examples, randomized (a new seed each run; hypothesis prints
        `--hypothesis-seed=N` and a `@reproduce_failure` blob for a failure, so it can be replayed).

Hypothesis stops at the first failing example of a run (after shrinking it): fix it and run again
to find the next. The judgement is made on the normal run (an internal error is exit code 1 there);
only when it fails is the example run again with TRAINER_DEBUG=1, to put the traceback in the report.
The explicit cases at the end pin down the mutations most likely to slip through.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import math
import os
import re
import tempfile
import traceback
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
import typer.main
import typer.testing
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from trainer.cli import app
from trainer.config import read_config_file, registries

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
SHIPPED: dict[str, Any] = {  # with their bases merged in: a copy in a temporary folder has no ../lenet.yaml
    p.relative_to(CONFIGS).as_posix(): read_config_file(p)[0]
    for p in sorted(CONFIGS.glob("*.yaml")) + sorted(CONFIGS.glob("mnist/*.yaml"))
}

FUZZ_EXAMPLES_DEFAULT = 500  # ~10 s on 2 cores; TRAINER_FUZZ_EXAMPLES=20000 for a deep, random run
_DEEP = os.environ.get("TRAINER_FUZZ_EXAMPLES")
FUZZ_SETTINGS = settings(
    max_examples=int(_DEEP) if _DEEP else FUZZ_EXAMPLES_DEFAULT,
    deadline=None,
    derandomize=not _DEEP,
    database=None,  # nothing written into the repository; failures print a reproduce blob instead
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)


# ---------------------------------------------------------------------------------------------
# vocabulary: the keys and names a user would plausibly type, read off the schema and registries

_REGISTRIES = registries()
COMPONENT_NAMES: dict[str, list[str]] = {
    section: sorted({*reg.names(), *(a for e in reg for a in reg.aliases_of(e.name))}) for section, reg in _REGISTRIES.items()
}
ALL_NAMES = sorted({n for names in COMPONENT_NAMES.values() for n in names})


def _config_keys(node: Any) -> set[str]:
    if isinstance(node, dict):
        return {str(k) for k in node} | {k for v in node.values() for k in _config_keys(v)}
    return set()


KNOWN_KEYS = sorted(
    {k for cfg in SHIPPED.values() for k in _config_keys(cfg)}
    | {"scheduler", "interval", "max_steps", "grad_clip", "precision", "device", "shuffle", "epochs", "log_every"}
    | {p for reg in _REGISTRIES.values() for e in reg for p in e.parameters()}
)

# numbers above these make validate slow or exhaust memory; capped (recursively, numeric strings too)
SIZE_CAPS = {
    "size": 2000,
    "batch_size": 2000,
    "features": 512,
    "hidden": 512,
    "num_classes": 512,
    "in_features": 512,
    "out_features": 512,
    "in_channels": 16,
    "image_size": 64,
    "input_shape": 512,
    "target_shape": 512,
}
SHAPE_KEYS = {"input_shape", "target_shape"}
SHAPE_MAX_ELEMENTS = 4096  # one sample of `random` data at most this many numbers


# ---------------------------------------------------------------------------------------------
# keeping the generated configs cheap (and off the network and out of the repository)


# numbers from here on cannot be allocated at all: torch refuses them at once, so they stay (and must be
# reported as bad input, not crash)
_UNALLOCATABLE = 2**63


def _cap_number(value: Any, cap: int) -> Any:
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, (int, float)):
        return cap if cap < value < _UNALLOCATABLE else value  # nan compares False: kept
    if isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            return value
        return str(cap) if cap < number < _UNALLOCATABLE else value
    if isinstance(value, list):
        return [_cap_number(v, cap) for v in value]
    if isinstance(value, dict):
        return {k: _cap_number(v, cap) for k, v in value.items()}
    return value


def _shape_product(shape: list[Any]) -> float:
    total = 1.0
    for d in shape:
        try:
            total *= abs(float(d)) if not isinstance(d, (bool, list, dict)) and d is not None else 1.0
        except (ValueError, OverflowError):
            total = math.inf
    return total


def _bounded(node: Any, key: Any = None) -> Any:
    """`node` with sizes capped, `download` off and data paths kept inside the working folder."""
    if isinstance(key, str) and key in SIZE_CAPS:
        node = _cap_number(node, SIZE_CAPS[key])
        if key in SHAPE_KEYS and isinstance(node, list) and not math.isnan(_shape_product(node)):
            if _shape_product(node) > SHAPE_MAX_ELEMENTS:
                node = [_cap_number(d, 16) for d in node[:3]]
    if key == "download" and node is True:
        return False
    if key in ("root", "path") and isinstance(node, str) and (node.startswith(("/", "~", "\\")) or ".." in node):
        return "data"
    if isinstance(node, dict):
        return {k: _bounded(v, k) for k, v in node.items()}
    if isinstance(node, list):
        return [_bounded(v, key) for v in node]  # a list under `hidden`: each item is a size
    return node


def _bounded_override(item: str) -> str:
    """The same caps for a `key=value` override (value parsed as YAML, rewritten only if it changes)."""
    if "=" not in item or item.startswith("~"):
        return item
    key, raw = item.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except Exception:  # not valid YAML (or too deep, or too many digits): left for the runner to report
        return item
    last = key.strip().split(".")[-1]
    # a section given whole (data={size: 1e9}) is checked as if the dict were that section
    bounded = _bounded({last: value})[last]
    if bounded == value or (isinstance(value, float) and math.isnan(value)):
        return item
    return f"{key}={_flow(bounded)}"


def _flow(value: Any) -> str:
    text = yaml.safe_dump(value, default_flow_style=True, width=10_000, allow_unicode=True).strip()
    return text[: -len("...")].strip() if text.endswith("...") else text


# ---------------------------------------------------------------------------------------------
# strategies

IDENT = st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,10}", fullmatch=True)
ODD_KEYS = st.sampled_from(["", " ", "a.b", "1x", "with space", "Name", "MODEL", "__init__", "~x", "=", "-"])
KEYS = st.one_of(st.sampled_from(KNOWN_KEYS), IDENT, ODD_KEYS)

TEXT = st.text(alphabet="abcxyz019_-.: []{}',\"#!&*%@`|>", max_size=12)
INTERESTING_STRINGS = st.sampled_from(
    ["", " ", "1e-3", "3e-4", "-1", "0", "1e9", "1e400", "nan", "inf", "-inf", "true", "yes", "null", "~", "[1",
     "{a: 1}", "cuda", "cuda:1", "mps", "cpu", "auto", "bf16", "fp16", "fp8", "step", "epoch", "regression",
     "classification", "normal", "default", "sum", "mean", "none", "data", "x", "0x10", "1_000", "é"]
)  # fmt: skip
STRINGS = st.one_of(INTERESTING_STRINGS, st.sampled_from(ALL_NAMES), TEXT)

INTS = st.one_of(
    st.integers(-3, 5),
    st.sampled_from([0, -1, 2**31, 2**32, 2**63 - 1, 2**63, 2**64, 10**9, 10**30, -(10**30), 10**400, -(10**400)]),
    st.integers(-(2**80), 2**80),
)
FLOATS = st.one_of(
    st.sampled_from([0.0, -0.0, 0.5, -0.5, 1.5, 1e-300, 1e300, -1e300, 1e9, float("inf"), float("-inf"), float("nan")]),
    st.floats(allow_nan=True, allow_infinity=True),
)
SCALARS = st.one_of(INTS, FLOATS, st.booleans(), st.none(), STRINGS)
BOUNDARY_NUMBERS = st.one_of(
    st.sampled_from([0, -1, 1, 2, 0.0, 0.5, -0.5, 1.5, 2**31, 2**63, 2**64, 10**30, -(10**30), 10**400, 1e300, -1e300]),
    st.sampled_from([float("inf"), float("-inf"), float("nan"), 1e-300, "1e-3", "-1", "1e9", "nan", True]),
    INTS,
    FLOATS,
)
# values a user would type for a size, a rate or a count: the ones most likely to get past the schema
PLAUSIBLE = st.one_of(st.integers(-2, 100), st.sampled_from([0.0, 0.1, 0.5, 0.9, 1.0, 1e-3, "1e-3", 2.5, [1, 2], [3]]))
VALUES = st.recursive(
    SCALARS,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3),
        st.dictionaries(st.one_of(st.sampled_from(KNOWN_KEYS), IDENT), inner, max_size=3),
        st.fixed_dictionaries({"name": st.one_of(st.sampled_from(ALL_NAMES), STRINGS)}, optional={"x": inner}),
    ),
    max_leaves=6,
)
# the strategies the draws below use, built once: hypothesis checks a strategy when it is first drawn
# from, so one built anew at every draw is checked anew (a quarter of the generation's CPU)
ANY_VALUE = st.one_of(SCALARS, SCALARS, SCALARS, VALUES)
SCALAR_OR_PLAUSIBLE = st.one_of(SCALARS, PLAUSIBLE)
OVERRIDE_TEXT = st.text(alphabet="abz.=~[]{}:,'\" -_019", max_size=14)
DOTTED_PARTS = st.lists(KEYS.filter(lambda k: re.fullmatch(r"[A-Za-z_]\w*", k) is not None), min_size=1, max_size=3)
OVERRIDE_RAW = st.one_of(st.just(None), st.just(None), INTERESTING_STRINGS, st.text(alphabet="az09.-e[]{}:, ", max_size=8))


def _paths(node: Any, prefix: tuple = ()) -> list[tuple]:
    """Every key of every mapping and every item of every list, as a path from the root, last first.

    (Hypothesis favours the first items of a list it samples from; the top-level `name` and `seed`
    would otherwise be picked far more often than the components' arguments.)"""
    return list(reversed(_all_paths(node, prefix)))


def _all_paths(node: Any, prefix: tuple = ()) -> list[tuple]:
    found = []
    if isinstance(node, dict):
        for k, v in node.items():
            found.append((*prefix, k))
            found += _all_paths(v, (*prefix, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            found.append((*prefix, i))
            found += _all_paths(v, (*prefix, i))
    return found


def _containers(node: Any, prefix: tuple = ()) -> list[tuple]:
    """The paths of every mapping (where a key can be added), the root included."""
    found = [prefix] if isinstance(node, dict) else []
    if isinstance(node, dict):
        for k, v in node.items():
            found += _containers(v, (*prefix, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            found += _containers(v, (*prefix, i))
    return found


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _get(node: Any, path: tuple) -> Any:
    for part in path:
        node = node[part]
    return node


@st.composite
def typos(draw: Any, word: str) -> str:
    """A near-miss of `word`: a letter dropped, doubled, swapped or changed, a case change or a suffix."""
    if not word:
        return draw(IDENT)
    i = draw(st.integers(0, len(word) - 1))
    kind = draw(st.sampled_from(["drop", "double", "swap", "change", "upper", "suffix", "prefix"]))
    if kind == "drop":
        return word[:i] + word[i + 1 :] or "_"
    if kind == "double":
        return word[:i] + word[i] + word[i:]
    if kind == "swap" and len(word) > 1:
        i = min(i, len(word) - 2)
        return word[:i] + word[i + 1] + word[i] + word[i + 2 :]
    if kind == "change":
        return word[:i] + draw(st.sampled_from("aeiosx_1")) + word[i + 1 :]
    if kind == "upper":
        return word.upper() if word != word.upper() else word.lower()
    if kind == "prefix":
        return draw(st.sampled_from(["_", "my_", "x"])) + word
    return word + draw(st.sampled_from(["s", "_", "2", "_dim", "8"]))


def _value_for(draw: Any, path: tuple, old: Any = None, other_type: bool = False) -> Any:
    """A random value for the key at `path`; component names are often real names (or typos of them).

    Mostly scalars: a config that still passes the schema reaches the builders and the forward pass.
    """
    key = path[-1] if path else None
    if key == "name" and draw(st.booleans()):
        section = path[0] if len(path) == 2 and path[0] in COMPONENT_NAMES else None
        name = draw(st.sampled_from(COMPONENT_NAMES[section] if section else ALL_NAMES))
        return draw(typos(name)) if draw(st.sampled_from([False, False, False, True])) else name
    strategy = ANY_VALUE
    if other_type:
        strategy = strategy.filter(lambda v: type(v) is not type(old) or (isinstance(v, dict) and v != old))
    return draw(strategy)


_OWN_KEYS = {
    (): ["name", "seed", "device", "precision", "model", "data", "loss", "optimizer", "scheduler", "train"],
    ("train",): ["epochs", "max_steps", "log_every", "grad_clip"],
    ("data",): ["batch_size", "val_fraction", "shuffle"],
    ("scheduler",): ["interval"],
}


def _key_for(draw: Any, config: Any, parent_path: tuple) -> str:
    """A key to add under `parent_path`: usually one the schema or the component's constructor knows."""
    known = list(_OWN_KEYS.get(parent_path, []))
    if len(parent_path) == 1 and parent_path[0] in _REGISTRIES:
        name = _get(config, parent_path).get("name")
        registry = _REGISTRIES[parent_path[0]]
        if isinstance(name, str) and name in registry:
            known += list(registry.get(name).parameters())
    if known and draw(st.sampled_from([True, True, True, False])):
        return draw(st.sampled_from(known))
    return draw(KEYS)


@st.composite
def mutated_configs(draw: Any) -> tuple[str, Any, list[str], list[str]]:
    """(shipped config name, mutated config, overrides, a description of each mutation)."""
    source = draw(st.sampled_from(sorted(SHIPPED)))
    config = copy.deepcopy(SHIPPED[source])
    steps: list[str] = []
    for _ in range(draw(st.sampled_from([1, 2, 1, 3]))):
        # (hypothesis favours the first choices: the gentle mutations come first, so more configs get past the
        # schema and reach the builders and the forward pass)
        kind = draw(st.sampled_from(["number", "set", "retype", "component", "number", "set", "retype", "delete", "rename"]))
        keys = [p for p in _paths(config) if not isinstance(p[-1], int)]
        if kind == "number":
            # a boundary number where a number is, or for a constructor argument not given yet
            numeric = [p for p in _paths(config) if _is_number(_get(config, p))]
            for section in _REGISTRIES:
                body = config.get(section) if isinstance(config, dict) else None
                if isinstance(body, dict) and isinstance(body.get("name"), str) and body["name"] in _REGISTRIES[section]:
                    numeric += [(section, a) for a in _REGISTRIES[section].get(body["name"]).parameters() if a not in body]
            if numeric:
                path = draw(st.sampled_from(numeric))
                _get(config, path[:-1])[path[-1]] = value = draw(BOUNDARY_NUMBERS)
                steps.append(f"set {'.'.join(map(str, path))} = {value!r}")
        elif kind == "component":
            # another registered name for a section, its arguments kept (a model that does not fit the data, ...)
            sections = [k for k in _REGISTRIES if isinstance(config, dict) and isinstance(config.get(k), dict)]
            if sections:
                section = draw(st.sampled_from(sections))
                config[section]["name"] = name = draw(st.sampled_from(COMPONENT_NAMES[section]))
                steps.append(f"set {section}.name = {name!r}")
        elif kind in ("delete", "rename") and keys:
            path = draw(st.sampled_from(keys))
            parent = _get(config, path[:-1])
            if kind == "delete":
                del parent[path[-1]]
                steps.append(f"delete {'.'.join(map(str, path))}")
            else:
                new = draw(st.one_of(typos(str(path[-1])), KEYS))
                # rename in place, keeping the order of the keys
                items = [(new if k == path[-1] else k, v) for k, v in parent.items()]
                parent.clear()
                parent.update(items)
                steps.append(f"rename {'.'.join(map(str, path))} -> {new!r}")
        elif kind == "retype":
            paths = _paths(config)
            leaves = [p for p in paths if not isinstance(_get(config, p), (dict, list))]
            # (a document that is not a mapping at all is one of the explicit cases below)
            candidates = leaves if draw(st.sampled_from([True, False])) else paths
            path = draw(st.sampled_from(candidates)) if candidates else ()
            old = _get(config, path)
            value = _value_for(draw, path, old, other_type=True)
            if path:
                _get(config, path[:-1])[path[-1]] = value
            else:
                config = value  # the whole document: a list, a scalar, null
            steps.append(f"replace {'.'.join(map(str, path)) or '<document>'} with {value!r}")
        else:  # set a scalar at an existing or a new path
            containers = list(reversed(_containers(config)))
            if not containers:
                continue
            parent_path = draw(st.sampled_from(containers))
            parent = _get(config, parent_path)
            existing = [k for k in parent if isinstance(k, str)]
            key = draw(st.sampled_from(existing)) if existing and draw(st.booleans()) else _key_for(draw, config, parent_path)
            path = (*parent_path, key)
            if draw(st.sampled_from([False] * 7 + [True])):  # a new section with the key inside it
                inner = draw(KEYS)
                parent[key] = {inner: _value_for(draw, (*path, inner))}
                path = (*path, inner)
            else:
                parent[key] = _value_for(draw, path) if key == "name" else draw(SCALAR_OR_PLAUSIBLE)
            steps.append(f"set {'.'.join(map(str, path))} = {_get(config, path)!r}")
    config = _bounded(config)
    overrides = [_bounded_override(o) for o in draw(st.lists(override_items(config), max_size=3))]
    return source, config, overrides, steps


MALFORMED_OVERRIDES = st.sampled_from(
    ["lr0.1", "=3", "a..b=1", "~x", "x=[1", "~", "=", ".=1", "a.=1", ".a=1", "~a.b=1", "model.name", "~model..name",
     "optimizer.lr==0.1", "1a=2", "a b=1", "model=", "train.epochs=", "data.name=~", "model.name=[", "seed=&a",
     "seed=*a", "x=!!python/object:os.system ''", "data={name: digits", "~seed", "~train", "~model.name",
     "model.name.x=1", "seed.x=1", "data.x.y=1", "optimizer.lr=1e-3", "train.epochs=0", "data.batch_size=true",
     "precision=bf16", "device=cuda", "scheduler.name=step", "model.name=lenet", "data.name=random", "-", "--help"]
)  # fmt: skip


@st.composite
def override_items(draw: Any, config: Any) -> str:
    kind = draw(st.sampled_from(["set", "set", "set", "delete", "set", "malformed", "text"]))
    if kind == "malformed":
        return draw(MALFORMED_OVERRIDES)
    if kind == "text":
        return draw(OVERRIDE_TEXT)
    keys = [p for p in _paths(config) if all(isinstance(k, str) for k in p)]
    if keys and draw(st.sampled_from([True, True, True, False])):
        path = draw(st.sampled_from(keys))
    else:
        path = tuple(draw(DOTTED_PARTS))
    if draw(st.sampled_from([False, False, False, True])) and len(path) > 1:
        path = (*path[:-1], draw(typos(path[-1])))
    dotted = ".".join(path)
    if kind == "delete":
        return f"~{dotted}"
    raw = draw(OVERRIDE_RAW)
    return f"{dotted}={_flow(_value_for(draw, path)) if raw is None else raw}"


# ---------------------------------------------------------------------------------------------
# running `trainer validate` in process and judging the outcome


def _all_output(result: Any) -> str:
    """stdout and stderr: click >= 8.2 interleaves both in `output` and also keeps `stderr` apart."""
    try:
        err = result.stderr
    except ValueError:  # older click without a separate stderr: it is already in `output`
        err = ""
    return result.output if err in result.output else result.output + err


# CliRunner.invoke builds the click command from the Typer app anew at every call (typer.testing's
# _get_command): a third of a quick validate's CPU, 500 times over. The app is complete at import,
# so the command is built once and reused, as the console script's one call uses it
_command_of = functools.lru_cache(maxsize=None)(typer.main.get_command)


def validate(config: Any, overrides: list[str], *, text: str | None = None) -> None:
    """Write `config` (or raw YAML `text`) to a temp file, run `trainer validate` on it in process, and
    assert the outcome is a success or a clean exit 2 with an error message."""
    if text is None:
        text = yaml.safe_dump(config, sort_keys=False, default_flow_style=None, allow_unicode=True, width=100)
    with (
        tempfile.TemporaryDirectory(prefix="trainer-fuzz-") as tmp,
        contextlib.chdir(tmp),
        mock.patch.object(typer.testing, "_get_command", _command_of),
    ):
        path = Path(tmp) / "config.yaml"
        path.write_text(text, encoding="utf-8")
        args = ["validate", str(path), *overrides]
        result = CliRunner(env={"TRAINER_DEBUG": None}).invoke(app, args)
        debug = None
        if result.exit_code not in (0, 2) or not isinstance(result.exception, (SystemExit, type(None))):
            # the same again with TRAINER_DEBUG=1, which lets an internal error through, for its traceback
            debug = CliRunner(env={"TRAINER_DEBUG": "1"}).invoke(app, args)
    output = _all_output(result)
    exc = result.exception
    unhandled = exc is not None and not isinstance(exc, SystemExit)
    tb = ""
    for run in (result, debug):
        if run is not None and run.exc_info and not isinstance(run.exception, SystemExit):
            tb = "".join(traceback.format_exception(*run.exc_info))
            break
    report = (
        f"\n--- config.yaml ---\n{text}--- overrides ---\n{overrides!r}\n--- exit code: {result.exit_code} ---"
        f"\n--- output ---\n{output}" + (f"--- traceback ---\n{tb}" if tb else "")
    )
    assert not unhandled, f"unhandled {type(exc).__name__}: {exc}{report}"
    assert result.exit_code in (0, 2), f"exit code {result.exit_code}, expected 0 or 2{report}"
    if result.exit_code == 2:
        assert output.strip(), f"exit code 2 without a message{report}"
        assert "error" in output.lower(), f"exit code 2 without 'error' in the message{report}"
        assert "Traceback" not in output, f"a traceback in the message{report}"


@FUZZ_SETTINGS
@given(case=mutated_configs())
def test_validate_never_crashes_on_mutated_configs(case: tuple[str, Any, list[str], list[str]]) -> None:
    source, config, overrides, steps = case
    try:
        validate(config, overrides)
    except AssertionError as err:
        raise AssertionError(f"from configs/{source}, mutations: {steps}\n{err}") from None


# ---------------------------------------------------------------------------------------------
# explicit cases: mutations that are likely to slip past the checks


def _shipped(source: str, /, **sections: Any) -> dict[str, Any]:
    config = copy.deepcopy(SHIPPED[source])
    config.update(sections)
    return config


EXPLICIT_CASES = {
    "model-is-a-list": (_shipped("lenet.yaml", model=[1, 2]), []),
    "model-null": (_shipped("lenet.yaml", model=None), []),
    "data-name-int": (_shipped("lenet.yaml", data={"name": 5}), []),
    "optimizer-lr-negative": (_shipped("lenet.yaml", optimizer={"name": "sgd", "lr": -1}), []),
    "optimizer-lr-nan": (_shipped("lenet.yaml", optimizer={"name": "sgd", "lr": float("nan")}), []),
    "optimizer-lr-string-number": (_shipped("lenet.yaml", optimizer={"name": "sgd", "lr": "1e-3"}), []),
    "adam-betas-one-value": (_shipped("convnet.yaml", optimizer={"name": "adam", "betas": [0.9]}), []),
    "adam-betas-out-of-range": (_shipped("convnet.yaml", optimizer={"name": "adam", "betas": [2, 3]}), []),
    "epochs-1e9-string": (_shipped("lenet.yaml", train={"epochs": "1e9"}), []),
    "epochs-1e9-float": (_shipped("lenet.yaml", train={"epochs": 1.0e9}), []),
    "epochs-huge-int": (_shipped("lenet.yaml", train={"epochs": 10**30}), []),
    "max-steps-huge-one-cycle": (
        _shipped("mlp.yaml", train={"max_steps": 2**63}, scheduler={"name": "one_cycle", "max_lr": 0.1}),
        [],
    ),
    "mlp-hidden-negative": (_shipped("mlp.yaml", model={"name": "mlp", "hidden": -3}), []),
    "mlp-hidden-zero": (_shipped("mlp.yaml", model={"name": "mlp", "hidden": 0}), []),
    "mlp-hidden-list-with-string": (_shipped("mlp.yaml", model={"name": "mlp", "hidden": [8, "x"]}), []),
    "mlp-dropout-above-one": (_shipped("mlp.yaml", model={"name": "mlp", "dropout": 2.0}), []),
    "lenet-num-classes-zero": (_shipped("lenet.yaml", model={"name": "lenet", "num_classes": 0}), []),
    "lenet-in-channels-negative": (_shipped("lenet.yaml", model={"name": "lenet", "in_channels": -1}), []),
    "batch-size-true-override": (_shipped("lenet.yaml"), ["data.batch_size=true"]),
    "scheduler-step-without-step-size": (_shipped("lenet.yaml", scheduler={"name": "step"}), []),
    "scheduler-cyclic-on-adam": (
        _shipped("convnet.yaml", scheduler={"name": "cyclic", "base_lr": 0.001, "max_lr": 0.1}),
        [],
    ),
    "scheduler-plateau-per-step": (_shipped("lenet.yaml", scheduler={"name": "reduce_lr_on_plateau", "interval": "step"}), []),
    "scheduler-null-name": (_shipped("lenet.yaml", scheduler={"name": None}), []),
    "seed-negative": (_shipped("lenet.yaml", seed=-1), []),
    "seed-huge": (_shipped("lenet.yaml", seed=2**70), []),
    "seed-string": (_shipped("lenet.yaml", seed="abc"), []),
    "precision-bf16": (_shipped("lenet.yaml", precision="bf16"), []),
    "precision-fp16-on-cpu": (_shipped("lenet.yaml", precision="fp16"), []),
    "device-cuda": (_shipped("lenet.yaml", device="cuda:3"), []),
    "device-int": (_shipped("lenet.yaml", device=0), []),
    "name-empty": (_shipped("lenet.yaml", name=""), []),
    "name-int": (_shipped("lenet.yaml", name=5), []),
    "dotted-top-level-key": (_shipped("lenet.yaml", **{"a.b": 1}), []),
    "grad-clip-negative": (_shipped("lenet.yaml", train={"epochs": 1, "grad_clip": -1}), []),
    "train-is-a-list": (_shipped("lenet.yaml", train=[1]), []),
    "digits-image-size-zero": (_shipped("lenet.yaml"), ["data.image_size=0"]),
    "digits-image-size-negative": (_shipped("lenet.yaml"), ["data.image_size=-4"]),
    "val-fraction-one": (_shipped("lenet.yaml"), ["data.val_fraction=1"]),
    "tensors-empty": (_shipped("linear_regression.yaml", data={"name": "tensors", "x": [], "y": []}), []),
    "tensors-ragged": (_shipped("linear_regression.yaml", data={"name": "tensors", "x": [[1], [2, 3]], "y": [1, 2]}), []),
    "tensors-x-scalar": (_shipped("linear_regression.yaml", data={"name": "tensors", "x": 3, "y": [1]}), []),
    "tensors-x-strings": (_shipped("linear_regression.yaml", data={"name": "tensors", "x": ["a"], "y": [1.0]}), []),
    "tensors-labels-negative": (_shipped("linear_regression.yaml", data={"name": "tensors", "x": [1, 2], "y": [0, -1]}), []),
    "scalar-root-init-string": (_shipped("sqrt2.yaml", model={"name": "scalar_root", "init": "abc"}), []),
    "random-shape-zero": (_shipped("two_layer_net.yaml"), ["data.input_shape=[0]"]),
    "random-shape-scalar": (_shipped("two_layer_net.yaml"), ["data.input_shape=7"]),
    "random-num-classes-zero": (_shipped("two_layer_net.yaml"), ["data.num_classes=0"]),
    "affine-size-zero": (_shipped("mlp.yaml"), ["data.size=0"]),
    "cross-entropy-weight-list": (_shipped("lenet.yaml", loss={"name": "cross_entropy", "weight": [1.0, 2.0]}), []),
    "cross-entropy-label-smoothing-two": (_shipped("lenet.yaml", loss={"name": "cross_entropy", "label_smoothing": 2}), []),
    "loss-ctc": (_shipped("lenet.yaml", loss={"name": "ctc"}), []),
    "loss-mse-on-classes": (_shipped("lenet.yaml", loss={"name": "mse"}), []),
    "model-lenet-on-vectors": (_shipped("mlp.yaml"), ["model.name=lenet"]),
    "mnist-download-string": (_shipped("mnist/lenet.yaml"), ["data.download=yes"]),
    "mnist-root-int": (_shipped("mnist/lenet.yaml"), ["data.root=5"]),
    "csv-missing-file": (_shipped("mlp.yaml", data={"name": "csv", "path": "nope.csv", "target": "y"}), []),
    "image-folder-missing": (_shipped("lenet.yaml", data={"name": "image_folder", "root": "nope"}), []),
    "optimizer-muon": (_shipped("mlp.yaml", optimizer={"name": "muon"}), []),
    "override-set-inside-scalar": (_shipped("lenet.yaml"), ["seed.x=1"]),
    "override-malformed-items": (_shipped("lenet.yaml"), ["lr0.1", "=3", "a..b=1", "~x", "x=[1"]),
    "override-remove-model": (_shipped("lenet.yaml"), ["~model"]),
    "override-whole-section-scalar": (_shipped("lenet.yaml"), ["model=3"]),
    "override-yaml-tag": (_shipped("lenet.yaml"), ["seed=!!python/object/apply:os.getcwd []"]),
    # numbers no torch integer or float can hold: refused by torch or by float() at once, no allocation
    "seed-above-uint64": (_shipped("lenet.yaml"), ["seed=18446744073709551616"]),
    "seed-below-int64": (_shipped("lenet.yaml"), ["seed=-9223372036854775809"]),
    "lr-int-beyond-float": (_shipped("lenet.yaml"), ["optimizer.lr=" + "9" * 400]),
    "momentum-int-beyond-float": (_shipped("lenet.yaml", optimizer={"name": "sgd", "lr": 0.1, "momentum": 10**400}), []),
    "scalar-root-init-beyond-float": (_shipped("sqrt2.yaml", model={"name": "scalar_root", "init": 10**400}), []),
    "tensors-x-int-beyond-float": (_shipped("linear_regression.yaml"), ["data.x=[[1], [2], [" + "9" * 400 + "]]"]),
    "tensors-y-int-beyond-float": (_shipped("linear_regression.yaml"), ["data.y=[[1.5], [2], [" + "9" * 400 + "]]"]),
    "affine-size-beyond-int64": (_shipped("mlp.yaml"), ["data.size=18446744073709551616"]),
    "affine-features-beyond-int64": (_shipped("mlp.yaml"), ["data.features=18446744073709551616"]),
    "random-input-shape-beyond-int64": (_shipped("two_layer_net.yaml"), ["data.input_shape=[18446744073709551616]"]),
    "random-num-classes-beyond-int64": (_shipped("two_layer_net.yaml"), ["data.num_classes=18446744073709551616"]),
    "digits-image-size-beyond-int64": (_shipped("lenet.yaml"), ["data.image_size=18446744073709551616"]),
    # sizes torch tries (and fails) to allocate: bad input all the same, exit 2 with a message
    "random-size-int64-max": (_shipped("two_layer_net.yaml"), ["data.size=9223372036854775807"]),
    # (10**7: far beyond any address space, so refused even where memory is overcommitted)
    "digits-image-size-10-million": (_shipped("lenet.yaml"), ["data.image_size=10000000"]),
    # YAML that PyYAML (or Python's int()) refuses with something else than a YAMLError
    "override-nested-too-deep": (_shipped("lenet.yaml"), ["model=" + "[" * 2000 + "]" * 2000]),
    "override-int-with-5000-digits": (_shipped("lenet.yaml"), ["seed=" + "9" * 5000]),
}
RAW_YAML_CASES = {
    "empty-file": "",
    "document-is-a-list": "- 1\n- 2\n",
    "document-is-a-scalar": "42\n",
    "yaml-syntax-error": "model: {name: lenet\n",
    "python-tag": "model: !!python/object/apply:os.getcwd []\n",
    "duplicate-keys": (
        "name: a\nname: b\nmodel: {name: lenet}\ndata: {name: digits}\nloss: {name: cross_entropy}\n"
        "optimizer: {name: sgd, lr: 0.1}\n"
    ),
    "non-string-key": "1: 2\nmodel: {name: lenet}\n",
    "null-key": "~: 2\nmodel: {name: lenet}\n",
    "anchors": "model: &m {name: lenet}\ndata: *m\nloss: *m\noptimizer: *m\n",
    "binary": "model: !!binary aGVsbG8=\n",
    "nested-too-deep": "model: " + "[" * 1000 + "]" * 1000 + "\n",
    "mapping-nested-too-deep": "model: " + "{a: " * 1000 + "1" + "}" * 1000 + "\n",
    "int-with-5000-digits": "seed: " + "9" * 5000 + "\n" + yaml.safe_dump(SHIPPED["lenet.yaml"]),
}


@pytest.mark.parametrize("config, overrides", list(EXPLICIT_CASES.values()), ids=list(EXPLICIT_CASES))
def test_validate_tricky_configs(config: Any, overrides: list[str]) -> None:
    validate(config, overrides)


@pytest.mark.parametrize("text", list(RAW_YAML_CASES.values()), ids=list(RAW_YAML_CASES))
def test_validate_tricky_yaml(text: str) -> None:
    validate(None, [], text=text)
