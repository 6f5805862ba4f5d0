"""Tests for trainer.registry: names, aliases, close-match messages, kwargs checks and coercion."""

import typing
from typing import Literal, Union

import pytest
import torch

from trainer.registry import Registry, RegistryError, doc_summary


def make_registry() -> Registry:
    reg = Registry("optimizer")

    @reg.register("adamw", aliases=["adam_w"])
    def adamw(lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), steps: int = 10) -> dict:
        """AdamW, for the tests.

        More text that is not the description.
        """
        return {"lr": lr, "betas": betas, "steps": steps}

    @reg.register("sgd", description="plain SGD")
    def sgd(params, lr: float, momentum: float = 0.0, nesterov: bool = False) -> dict:
        return {"params": params, "lr": lr, "momentum": momentum, "nesterov": nesterov}

    return reg


@pytest.fixture
def reg() -> Registry:
    return make_registry()


# ---------------------------------------------------------------------------------------------
# names, aliases, descriptions


def test_get_returns_the_registered_factory_and_description(reg):
    entry = reg.get("adamw")
    assert entry.name == "adamw"
    assert entry.factory(lr=0.5)["lr"] == 0.5
    assert entry.description == "AdamW, for the tests."  # first docstring line only
    assert reg.get("sgd").description == "plain SGD"
    assert reg.names() == ["adamw", "sgd"]
    assert len(reg) == 2


def test_description_is_the_first_sentence_even_where_it_wraps():
    reg = Registry("model")

    @reg.register("net")
    def net():
        """A small net for the tests, whose first sentence
        runs on to a second line. More text.

        Not the description either.
        """

    assert reg.get("net").description == "A small net for the tests, whose first sentence runs on to a second line."


def test_doc_summary_cuts_a_long_sentence_at_a_word_with_an_ellipsis():
    class Loss:
        """Creates a criterion that measures the loss given :math:`x` and `y`
        (e.g. the L1 distance), and more after that.
        """

    whole = "Creates a criterion that measures the loss given x and y (e.g. the L1 distance), and more after that."
    assert doc_summary(Loss) == whole
    assert doc_summary(Loss, limit=80) == whole[:79] + "..."  # the comma after "distance)" goes with the cut
    assert doc_summary(Loss, limit=60) == "Creates a criterion that measures the loss given x and y..."
    assert doc_summary(lambda: None) == ""


def test_register_returns_the_function_unchanged():
    reg = Registry("model")

    def f(x: int = 1):
        return x

    assert reg.register("f")(f) is f
    assert reg.register()(lambda: 2) is not None
    assert "<lambda>" in reg  # default name: the function's own name


def test_alias_resolves_to_the_canonical_entry(reg):
    assert "adam_w" in reg
    assert reg.get("adam_w") is reg.get("adamw")
    assert reg.aliases_of("adamw") == ["adam_w"]
    assert reg.names() == ["adamw", "sgd"]  # aliases are not listed as entries


@pytest.mark.parametrize("name", ["adamw", "adam_w"])
def test_duplicate_registration_is_refused(reg, name):
    with pytest.raises(ValueError, match="already registered"):
        reg.add(name, lambda: None)
    assert reg.get("adamw").factory(lr=1.0)["lr"] == 1.0  # the original survives


def test_unknown_name_suggests_a_close_match_and_the_list_command(reg):
    with pytest.raises(RegistryError) as info:
        reg.get("adamw8")
    assert str(info.value) == "unknown optimizer 'adamw8'; did you mean 'adamw'? (trainer list optimizers)"


def test_unknown_name_without_close_match_has_no_guess(reg):
    with pytest.raises(RegistryError) as info:
        reg.get("zzzzzz")
    message = str(info.value)
    assert "did you mean" not in message
    assert "unknown optimizer 'zzzzzz'" in message
    assert "(trainer list optimizers)" in message


def test_custom_plural_is_used_in_the_hint():
    reg = Registry("loss", plural="losses")
    reg.add("mse", lambda: None)
    with pytest.raises(RegistryError, match=r"\(trainer list losses\)"):
        reg.get("msee")


def test_non_string_name_is_a_registry_error_listing_choices(reg):
    with pytest.raises(RegistryError, match="adamw, sgd"):
        reg.get(3)


# ---------------------------------------------------------------------------------------------
# check_kwargs


def test_unknown_argument_lists_what_is_accepted_with_a_close_match(reg):
    coerced, problems = reg.check_kwargs("adamw", {"lr": 0.1, "betaz": [0.9, 0.99]})
    assert coerced == {"lr": 0.1}
    assert problems == [
        ("betaz", "adamw() has no argument 'betaz'; did you mean 'betas'? it accepts: lr, betas, steps")
    ]


def test_unknown_argument_without_close_match(reg):
    _, problems = reg.check_kwargs("adamw", {"qqqq": 1})
    assert len(problems) == 1
    key, message = problems[0]
    assert key == "qqqq"
    assert "did you mean" not in message
    assert "it accepts: lr, betas, steps" in message


def test_every_problem_is_reported_at_once(reg):
    _, problems = reg.check_kwargs("adamw", {"lr": "abc", "steps": "x", "nope": 1})
    assert [k for k, _ in problems] == ["lr", "steps", "nope"]


def test_check_kwargs_on_unknown_name_is_a_registry_error(reg):
    with pytest.raises(RegistryError, match="did you mean 'sgd'"):
        reg.check_kwargs("sgdd", {})


@pytest.mark.parametrize(
    ("key", "given", "expected"),
    [
        ("lr", "3e-4", 0.0003),
        ("lr", 1, 1.0),
        ("lr", "0.5", 0.5),
        ("steps", "3", 3),
        ("steps", 2.0, 2),
        ("steps", "4.0", 4),
        ("betas", [0.9, 0.99], (0.9, 0.99)),
        ("betas", ["0.8", 1], (0.8, 1.0)),
    ],
)
def test_values_are_coerced_to_the_parameter_type(reg, key, given, expected):
    coerced, problems = reg.check_kwargs("adamw", {key: given})
    assert problems == []
    assert coerced[key] == expected
    assert type(coerced[key]) is type(expected)
    if isinstance(expected, tuple):
        assert all(type(v) is float for v in coerced[key])


@pytest.mark.parametrize(
    ("key", "given", "phrase"),
    [
        ("lr", "abc", "expects a number, got 'abc'"),
        ("lr", True, "expects a number, got True"),
        ("lr", [1.0], "expects a number"),
        ("steps", True, "expects a whole number, got True"),
        ("steps", 2.5, "expects a whole number, got 2.5"),
        ("steps", "two", "expects a whole number, got 'two'"),
        ("betas", 0.9, "expects a list, got 0.9"),
        ("betas", [0.9, 0.99, 0.999], "expects a list of 2 values"),
        ("betas", [0.9, "x"], "expects a number, got 'x'"),
        ("betas", ["x"], "expects a list of 2 values, got ['x']"),  # the length first, then the items
        ("betas", {0.9, "x"}, "expects a list, got"),  # a YAML !!set
        ("steps", float("inf"), "expects a whole number, got inf"),  # "finite" is for float arguments
        ("steps", "1e3", "expects a whole number, got '1e3'"),  # as train.epochs: pydantic reads no exponent
    ],
)
def test_bad_values_are_problems_naming_the_argument(reg, key, given, phrase):
    coerced, problems = reg.check_kwargs("adamw", {key: given})
    assert key not in coerced
    assert len(problems) == 1
    assert problems[0][0] == key
    assert problems[0][1].startswith(f"adamw() argument '{key}' ")
    assert phrase in problems[0][1]


def test_bool_parameter_accepts_only_booleans(reg):
    assert reg.check_kwargs("sgd", {"nesterov": True}) == ({"nesterov": True}, [])
    _, problems = reg.check_kwargs("sgd", {"nesterov": "yes"})
    assert "expects true or false, got 'yes'" in problems[0][1]
    _, problems = reg.check_kwargs("sgd", {"nesterov": 1})
    assert "expects true or false" in problems[0][1]


def test_literal_choices():
    reg = Registry("scheduler")

    @reg.register("plateau")
    def plateau(mode: Literal["min", "max"] = "min"):
        return mode

    assert reg.check_kwargs("plateau", {"mode": "max"}) == ({"mode": "max"}, [])
    _, problems = reg.check_kwargs("plateau", {"mode": "mean"})
    assert problems == [("mode", "plateau() argument 'mode' expects one of 'min', 'max', got 'mean'")]


def test_int_or_list_of_int_union():
    reg = Registry("model")

    @reg.register("mlp")
    def mlp(hidden: int | list[int] = 300):
        return hidden

    assert reg.check_kwargs("mlp", {"hidden": "64"}) == ({"hidden": 64}, [])
    assert reg.check_kwargs("mlp", {"hidden": 64.0}) == ({"hidden": 64}, [])
    assert reg.check_kwargs("mlp", {"hidden": [32, "16"]}) == ({"hidden": [32, 16]}, [])
    _, problems = reg.check_kwargs("mlp", {"hidden": "wide"})
    assert len(problems) == 1
    assert "expects a whole number or list, got 'wide'" in problems[0][1]


def test_optional_accepts_none_and_coerces_the_rest():
    reg = Registry("thing")

    @reg.register("t")
    def t(clip: float | None = None, n: Union[int, None] = None):
        return clip

    assert reg.check_kwargs("t", {"clip": None, "n": None}) == ({"clip": None, "n": None}, [])
    assert reg.check_kwargs("t", {"clip": "1e-2", "n": "5"}) == ({"clip": 0.01, "n": 5}, [])
    _, problems = reg.check_kwargs("t", {"clip": "big"})
    assert "expects a number, got 'big'" in problems[0][1]


def test_float_or_tensor_union_as_torch_annotates_lr():
    reg = Registry("optimizer")

    @reg.register("opt")
    def opt(lr: Union[float, torch.Tensor] = 1e-3):
        return lr

    coerced, problems = reg.check_kwargs("opt", {"lr": "3e-4"})
    assert problems == []
    assert coerced["lr"] == pytest.approx(3e-4)
    assert isinstance(coerced["lr"], float)
    _, problems = reg.check_kwargs("opt", {"lr": "fast"})
    assert problems == [("lr", "opt() argument 'lr' expects a number, got 'fast'")]


def test_tensor_and_callable_arguments_pass_unchecked_and_a_list_of_tensors_must_be_a_list():
    reg = Registry("loss")

    @reg.register("l")
    def l(weight: torch.Tensor | None = None, fn: typing.Callable | None = None, ws: list[torch.Tensor] = ()):
        return weight

    assert reg.check_kwargs("l", {"weight": [1, 2], "fn": "abs", "ws": [[1]]}) == (
        {"weight": [1, 2], "fn": "abs", "ws": [[1]]},
        [],
    )
    _, problems = reg.check_kwargs("l", {"ws": 3})
    assert problems == [("ws", "l() argument 'ws' expects a list, got 3")]


@pytest.mark.parametrize(
    ("key", "given", "shown"),
    [
        ("lr", float("nan"), "nan"),  # `.nan` in YAML
        ("lr", float("inf"), "inf"),
        ("lr", float("-inf"), "-inf"),
        ("lr", "nan", "'nan'"),  # a string PyYAML leaves for float() to read
        ("lr", "1e400", "'1e400'"),  # no dot: a string to PyYAML, and inf to float()
        ("betas", [0.9, float("inf")], "inf"),
    ],
)
def test_non_finite_numbers_are_refused_for_float_arguments(reg, key, given, shown):
    coerced, problems = reg.check_kwargs("adamw", {key: given})
    assert key not in coerced
    assert problems == [(key, f"adamw() argument '{key}' must be a finite number, got {shown}")]


def test_non_finite_numbers_are_refused_through_unions_and_defaults():
    reg = Registry("optimizer")

    @reg.register("opt")
    def opt(lr: Union[float, torch.Tensor] = 1e-3, clip: float | None = None, gamma=0.5):
        return lr

    _, problems = reg.check_kwargs("opt", {"lr": float("nan"), "clip": float("inf"), "gamma": "-inf"})
    assert problems == [
        ("lr", "opt() argument 'lr' must be a finite number, got nan"),  # not "expects a number"
        ("clip", "opt() argument 'clip' must be a finite number, got inf"),
        ("gamma", "opt() argument 'gamma' must be a finite number, got '-inf'"),
    ]
    with pytest.raises(RegistryError, match="must be a finite number, got nan"):
        reg.build("opt", lr=float("nan"))


def test_unannotated_parameter_is_coerced_from_its_default():
    reg = Registry("thing")

    @reg.register("t")
    def t(lr=0.1, n=3, anything=None):
        return lr

    assert reg.check_kwargs("t", {"lr": "2e-3", "n": "7", "anything": [1]}) == (
        {"lr": 0.002, "n": 7, "anything": [1]},
        [],
    )
    _, problems = reg.check_kwargs("t", {"lr": "abc"})
    assert "expects a number, got 'abc'" in problems[0][1]


def test_class_factories_skip_self_and_skip_params():
    reg = Registry("optimizer")

    class Opt:
        def __init__(self, params, lr: float = 0.1, *, foreach: bool | None = None) -> None:
            self.params, self.lr = params, lr

    reg.add("opt", Opt, skip_params=("params",))
    assert list(reg.get("opt").parameters()) == ["lr", "foreach"]
    _, problems = reg.check_kwargs("opt", {"params": []})
    assert "has no argument 'params'" in problems[0][1]


# ---------------------------------------------------------------------------------------------
# missing_kwargs and build


def test_missing_kwargs_lists_required_arguments_not_given(reg):
    assert reg.missing_kwargs("sgd", []) == ["params", "lr"]
    assert reg.missing_kwargs("sgd", {"lr": 0.1}) == ["params"]
    assert reg.missing_kwargs("adamw", []) == []


def test_build_coerces_kwargs_and_passes_positional_args_unchecked(reg):
    marker = object()
    built = reg.build("sgd", marker, lr="0.1", momentum="0.9")
    assert built["params"] is marker
    assert built["lr"] == 0.1 and built["momentum"] == 0.9


def test_build_through_alias(reg):
    assert reg.build("adam_w", steps="5")["steps"] == 5


def test_build_refuses_bad_kwargs_before_calling_the_factory():
    reg = Registry("model")
    calls = []

    @reg.register("m")
    def m(n: int = 1, size: int = 2):
        calls.append(n)

    with pytest.raises(RegistryError) as info:
        reg.build("m", n="x", sise=3)
    assert calls == []
    assert info.value.key == "n"
    assert "expects a whole number, got 'x'" in str(info.value)
    assert "did you mean 'size'" in str(info.value)
