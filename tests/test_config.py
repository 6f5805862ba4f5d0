"""Config loading, overrides, defaults and the one-report-of-every-problem errors, in process."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from conftest import CONFIGS
from trainer.config import Config, ConfigError, config_from_dict, load_config, parse_override
from trainer.errors import UsageError

GOOD = """\
name: good
model: {name: lenet}
data: {name: digits, batch_size: 32}
loss: {name: cross_entropy}
optimizer: {name: sgd, lr: 0.05, momentum: 0.9}
"""


def write(tmp_path: Path, text: str, name: str = "c.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


@pytest.mark.parametrize("path", sorted(CONFIGS.rglob("*.yaml")), ids=lambda p: p.relative_to(CONFIGS).as_posix())
def test_every_shipped_config_loads(path):
    config = load_config(path)
    assert config.name == yaml.safe_load(path.read_text())["name"]


def test_defaults_fill_in(tmp_path):
    config = load_config(write(tmp_path, GOOD))
    assert config.seed == 0 and config.device == "auto" and config.precision == "fp32"
    assert config.data.val_fraction == 0.2 and config.data.shuffle is True and config.data.batch_size == 32
    assert config.train.log_every == 10 and config.train.epochs is None and config.scheduler is None
    assert config.optimizer.kwargs == {"lr": 0.05, "momentum": 0.9}


def test_name_defaults_to_the_file_stem(tmp_path):
    config = load_config(write(tmp_path, GOOD.replace("name: good\n", ""), name="my-exp.yaml"))
    assert config.name == "my-exp"


def test_lr_written_as_3e_minus_4_is_a_number(tmp_path):
    # YAML 1.1 reads 3e-4 (no dot) as a string
    assert yaml.safe_load("lr: 3e-4")["lr"] == "3e-4"
    config = load_config(write(tmp_path, GOOD.replace("lr: 0.05", "lr: 3e-4")))
    assert config.optimizer.kwargs["lr"] == pytest.approx(3e-4) and isinstance(config.optimizer.kwargs["lr"], float)


def test_overrides_set_nested_keys_as_yaml_scalars(tmp_path):
    config = load_config(
        write(tmp_path, GOOD),
        ["optimizer.lr=0.1", "train.epochs=3", "model.name=convnet", "data.shuffle=false", "scheduler.name=cosine"],
    )
    assert config.optimizer.kwargs["lr"] == 0.1 and config.train.epochs == 3
    assert config.model.name == "convnet" and config.data.shuffle is False and config.scheduler.name == "cosine"


def test_tilde_removes_a_key_left_over_from_another_optimizer(tmp_path):
    path = write(tmp_path, GOOD)
    with pytest.raises(ConfigError) as caught:
        load_config(path, ["optimizer.name=adam"])
    assert "adam() has no argument 'momentum'" in str(caught.value)
    assert "remove it with ~optimizer.momentum" in str(caught.value)
    config = load_config(path, ["optimizer.name=adam", "~optimizer.momentum"])
    assert config.optimizer.name == "adam" and config.optimizer.kwargs == {"lr": 0.05}
    with pytest.raises(ConfigError, match="override '~optimizer.betas'.*no such key"):
        load_config(path, ["~optimizer.betas"])


@pytest.mark.parametrize(
    "item,parts,value",
    [("a.b=1", ["a", "b"], 1), ("a=x=y", ["a"], "x=y"), ("a=[1, 2]", ["a"], [1, 2]), ("a=", ["a"], None), ("a=null", ["a"], None)],
)
def test_parse_override(item, parts, value):
    assert parse_override(item) == (parts, value)


@pytest.mark.parametrize("item", ["lr0.1", "=3", "a..b=1", "a.b c=1", "a=[1"])
def test_malformed_overrides_are_reported_naming_the_item(tmp_path, item):
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, GOOD), [item])
    assert f"override '{item}'" in str(caught.value)


def test_override_with_unknown_path_names_the_override(tmp_path):
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, GOOD), ["train.epoch=3"])
    assert "override 'train.epoch=3', train.epoch: unknown key 'epoch'; did you mean 'epochs'?" in str(caught.value)


def test_override_into_a_scalar_is_reported(tmp_path):
    with pytest.raises(ConfigError, match=r"override 'seed.x=1', seed: is 0, not a section"):
        load_config(write(tmp_path, GOOD + "seed: 0\n"), ["seed.x=1"])
    # seed left to its default: the override makes it a mapping, and the report still names the override
    with pytest.raises(ConfigError, match=r"override 'seed.x=1', seed: input should be a valid integer"):
        load_config(write(tmp_path, GOOD), ["seed.x=1"])


def test_every_problem_at_once_in_line_order(tmp_path):
    text = (
        "name: bad\n"
        "seed: zero\n"
        "model: {name: lenet, hidden_dim: 3}\n"
        "data: {name: digits, batch_size: 0}\n"
        "loss: {name: cross_entropi}\n"
        "optimizer: {name: adamw8}\n"
        "train: {epoch: 3}\n"
    )
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, text))
    report = str(caught.value)
    lines = report.splitlines()
    assert lines[0] == f"{tmp_path / 'c.yaml'} is not valid (6 problems):"
    assert [line.split(",")[0].strip() for line in lines[1:]] == [f"line {n}" for n in (2, 3, 4, 5, 6, 7)]
    assert "model.hidden_dim: lenet() has no argument 'hidden_dim'; it accepts: num_classes, in_channels" in report
    assert "loss.name: unknown loss 'cross_entropi'; did you mean 'cross_entropy'? (trainer list losses)" in report


def test_missing_required_constructor_argument(tmp_path):
    text = GOOD.replace("data: {name: digits, batch_size: 32}", "data: {name: csv}")
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, text))
    assert "data.path: csv() needs argument 'path'" in str(caught.value)
    assert "data.target: csv() needs argument 'target'" in str(caught.value)


def test_scheduler_length_is_not_required(tmp_path):
    config = load_config(write(tmp_path, GOOD + "scheduler: {name: cosine}\n"))
    assert config.scheduler.name == "cosine"
    with pytest.raises(ConfigError, match="one_cycle\\(\\) needs argument 'max_lr'"):
        load_config(write(tmp_path, GOOD + "scheduler: {name: one_cycle}\n"))


def test_python_tags_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="tag '.*python/object/apply:os.system' is not allowed"):
        load_config(write(tmp_path, "seed: !!python/object/apply:os.system ['true']\n"))


def test_yaml_syntax_error_has_a_line(tmp_path):
    with pytest.raises(ConfigError, match=r"line \d+: YAML does not parse"):
        load_config(write(tmp_path, "model: {name: lenet\nseed: 1\n"))


@pytest.mark.parametrize("text", ["- a\n- b\n", "just a string\n"])
def test_top_level_must_be_a_mapping(tmp_path, text):
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_config(write(tmp_path, text))


def test_empty_file_lists_the_missing_sections(tmp_path):
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, ""))
    for section in ("model", "data", "loss", "optimizer"):
        assert f"{section}: required section is missing" in str(caught.value)


def test_missing_file_and_folder_are_usage_errors(tmp_path):
    with pytest.raises(UsageError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(UsageError, match="is a folder"):
        load_config(tmp_path)


@pytest.mark.parametrize("name", ["../escape", "a/b", "", ".hidden"])
def test_run_name_must_be_a_folder_name(tmp_path, name):
    with pytest.raises(ConfigError, match="name"):
        load_config(write(tmp_path, GOOD.replace("name: good", f"name: '{name}'")))


def test_section_that_is_not_a_mapping(tmp_path):
    with pytest.raises(ConfigError, match=r"line 2, model: must be a mapping"):
        load_config(write(tmp_path, GOOD.replace("model: {name: lenet}", "model: lenet")))


def test_to_yaml_round_trips(tmp_path):
    config = load_config(write(tmp_path, GOOD + "scheduler: {name: step, step_size: 2}\n"))
    again = config_from_dict(yaml.safe_load(config.to_yaml()))
    assert again == config
    assert isinstance(again, Config)


# ---------------------------------------------------------------------------------------------
# performance switches

SWITCHES = {"compile": False, "channels_last": False, "cudnn_benchmark": False, "tf32": False}


def test_performance_switches_are_off_by_default(tmp_path):
    train = load_config(write(tmp_path, GOOD)).train
    assert {key: getattr(train, key) for key in SWITCHES} == SWITCHES


@pytest.mark.parametrize("compile_", [True, "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"])
def test_performance_switches_round_trip_through_the_resolved_yaml(tmp_path, compile_):
    overrides = [f"train.compile={str(compile_).lower()}", "train.channels_last=true", "train.cudnn_benchmark=true", "train.tf32=true"]
    config = load_config(write(tmp_path, GOOD), overrides)
    assert config.train.compile == compile_ and config.train.channels_last and config.train.cudnn_benchmark and config.train.tf32
    written = config.to_yaml()  # what show-config prints and the run folder's config.yaml holds
    assert config_from_dict(yaml.safe_load(written)) == config


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("max_autotune", "did you mean 'max-autotune'? accepted: false, true, default, reduce-overhead, max-autotune"),
        ("fast", "accepted: false, true, default, reduce-overhead, max-autotune, max-autotune-no-cudagraphs; got 'fast'"),
        ("1", "accepted: false, true, default"),
    ],
)
def test_a_bad_compile_value_is_one_problem_with_the_choices(tmp_path, value, expected):
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, GOOD + f"train:\n  compile: {value}\n"))
    assert len(caught.value.problems) == 1
    assert f"line 7, train.compile: {expected}" in str(caught.value)


def test_the_json_schema_knows_the_switches():
    jsonschema = pytest.importorskip("jsonschema")
    from trainer.config import json_schema

    schema = json_schema()
    base = yaml.safe_load(GOOD)
    for train in ({"compile": "reduce-overhead", "channels_last": True}, {"compile": True, "tf32": False, "cudnn_benchmark": True}):
        jsonschema.validate({**base, "train": train}, schema)
    for train in ({"compile": "fast"}, {"channels_last": "yes"}, {"tf_32": True}):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate({**base, "train": train}, schema)


def test_fused_on_an_optimizer_without_it_names_those_with_it(tmp_path):
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, GOOD.replace("{name: sgd, lr: 0.05, momentum: 0.9}", "{name: rmsprop, lr: 0.01, fused: true}")))
    message = str(caught.value)
    assert "optimizer.fused: rmsprop() has no argument 'fused'" in message
    assert "take 'fused'" in message and "adamw" in message.split("; only ")[1]  # the list follows torch's signatures


def test_fused_with_foreach_is_refused_in_torch_words(tmp_path):
    with pytest.raises(ConfigError, match=r"line 5, optimizer: adamw\(\) refused .*`fused` and `foreach` cannot be `True` together"):
        load_config(write(tmp_path, GOOD.replace("{name: sgd, lr: 0.05, momentum: 0.9}", "{name: adamw, fused: true, foreach: true}")))


# ---------------------------------------------------------------------------------------------
# keys given twice, booleans and non-finite numbers, and where override problems are located


def test_a_key_given_twice_is_a_problem_with_both_lines_among_the_others(tmp_path):
    text = (
        "name: twice\n"
        "model: {name: lenet}\n"
        "data: {name: digits, batch_size: 32, batch_size: 16}\n"
        "loss: {name: cross_entropy}\n"
        "optimizer: {name: adamw8}\n"
        "model: {name: mlp}\n"
        "train:\n"
        "  epochs: 1\n"
        "  epochs: 2\n"
    )
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, text))
    assert str(caught.value).splitlines() == [
        f"{tmp_path / 'c.yaml'} is not valid (4 problems):",
        "  line 3, data.batch_size: given twice (first on line 3); keep one",
        "  line 5, optimizer.name: unknown optimizer 'adamw8'; did you mean 'adamw'? (trainer list optimizers)",
        "  line 6, model: given twice (first on line 2); keep one",
        "  line 9, train.epochs: given twice (first on line 8); keep one",
    ]


def test_a_key_given_three_times_is_one_problem(tmp_path):
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, GOOD + "seed: 1\nseed: 2\nseed: 3\n"))
    assert [str(p) for p in caught.value.problems] == ["line 8, seed: given 3 times (also on lines 6, 7); keep one"]


def test_merge_keys_and_keys_of_different_types_are_not_duplicates(tmp_path):
    text = GOOD.replace("optimizer: {name: sgd, lr: 0.05, momentum: 0.9}", "optimizer: &opt {name: sgd, lr: 0.05, momentum: 0.9}")
    text += "x-base: {<<: *opt, lr: 0.1, 1: a, '1': b}\n"  # `lr` replaces the merged one: YAML's own override
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, text))
    assert [p.key for p in caught.value.problems] == ["x-base"]  # only: an unknown top-level key


def test_duplicate_keys_exit_2_through_the_command_line(cli, write_config):
    config = write_config(GOOD + "model: {name: mlp}\n")
    result = cli("validate", config)
    assert result.code == 2, result.output
    assert "line 6, model: given twice (first on line 2); keep one" in result.stderr
    assert "Traceback" not in result.output


def test_an_alias_that_contains_itself_is_a_problem_not_a_crash(tmp_path):
    with pytest.raises(ConfigError, match=r"line 7, x.self: contains itself through a YAML alias"):
        load_config(write(tmp_path, GOOD + "x: &x\n  self: *x\n"))


@pytest.mark.parametrize(
    ("item", "key", "expected"),
    [
        ("train.epochs=true", "train.epochs", "input should be a valid integer; got True"),
        ("data.batch_size=true", "data.batch_size", "input should be a valid integer; got True"),
        ("seed=false", "seed", "input should be a valid integer; got False"),
        ("train.checkpoint_every=true", "train.checkpoint_every", "input should be a valid integer; got True"),
        ("train.grad_clip=true", "train.grad_clip", "input should be a valid number; got True"),
        ("data.val_fraction=false", "data.val_fraction", "input should be a valid number; got False"),
    ],
)
def test_booleans_are_not_numbers(tmp_path, item, key, expected):
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, GOOD), [item])
    assert [str(p) for p in caught.value.problems] == [f"override '{item}', {key}: {expected}"]


def test_numbers_written_as_strings_still_load(tmp_path):
    overrides = ["train.epochs='3'", "train.grad_clip=1e-3", "data.val_fraction='0.5'", "optimizer.lr=3e-4", "seed=2.0"]
    config = load_config(write(tmp_path, GOOD), overrides)
    assert config.train.epochs == 3 and config.train.grad_clip == pytest.approx(1e-3) and config.seed == 2
    assert config.data.val_fraction == 0.5 and config.optimizer.kwargs["lr"] == pytest.approx(3e-4)


@pytest.mark.parametrize(
    ("item", "expected"),
    [
        ("optimizer.lr=.nan", "optimizer.lr: sgd() argument 'lr' must be a finite number, got nan"),
        ("optimizer.lr=.inf", "optimizer.lr: sgd() argument 'lr' must be a finite number, got inf"),
        ("optimizer.momentum=-.inf", "optimizer.momentum: sgd() argument 'momentum' must be a finite number, got -inf"),
        ("optimizer.lr=1e400", "optimizer.lr: sgd() argument 'lr' must be a finite number, got '1e400'"),
        ("train.grad_clip=.inf", "train.grad_clip: input should be a finite number; got inf"),
        ("data.val_fraction=.nan", "data.val_fraction: input should be a finite number; got nan"),
    ],
)
def test_non_finite_numbers_are_refused(tmp_path, item, expected):
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, GOOD), [item])
    assert [str(p) for p in caught.value.problems] == [f"override '{item}', {expected}"]


def test_non_finite_number_in_the_file_has_its_line(tmp_path):
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, GOOD.replace("lr: 0.05", "lr: .nan")))
    assert [str(p) for p in caught.value.problems] == ["line 5, optimizer.lr: sgd() argument 'lr' must be a finite number, got nan"]


def test_booleans_and_nan_exit_2_through_the_command_line(cli):
    result = cli("validate", CONFIGS / "lenet.yaml", "optimizer.lr=.nan", "train.epochs=true")
    assert result.code == 2, result.output
    assert "override 'optimizer.lr=.nan', optimizer.lr: sgd() argument 'lr' must be a finite number, got nan" in result.stderr
    assert "override 'train.epochs=true', train.epochs: input should be a valid integer; got True" in result.stderr
    assert "Traceback" not in result.output


@pytest.mark.parametrize(
    ("item", "expected"),
    [
        ("model.foo.bar=3", "model.foo: lenet() has no argument 'foo'"),
        ("data.foo.bar=1", "data.foo: digits() has no argument 'foo'"),
        ("train.foo.bar=1", "train.foo: unknown key 'foo'"),
    ],
)
def test_a_nested_override_under_an_unknown_key_names_the_override(tmp_path, item, expected):
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, GOOD + "train: {epochs: 1}\n"), [item])
    assert [str(p).split(";")[0] for p in caught.value.problems] == [f"override '{item}', {expected}"]


def test_a_constructor_refusal_names_the_override_that_caused_it(tmp_path):
    with pytest.raises(ConfigError) as caught:
        load_config(CONFIGS / "mlp.yaml", ["model.hidden=-5"])
    assert str(caught.value.problems[0]).startswith("override 'model.hidden=-5', model.hidden: mlp() refused hidden=-5: ")
    with pytest.raises(ConfigError) as caught:  # each alone is fine: both are named
        load_config(write(tmp_path, GOOD), ["optimizer.name=adamw", "~optimizer.momentum", "optimizer.fused=true", "optimizer.foreach=true"])
    assert [str(p).split(": adamw()")[0] for p in caught.value.problems] == [
        "overrides 'optimizer.fused=true', 'optimizer.foreach=true', optimizer"
    ]


def test_a_constructor_refusal_from_the_file_keeps_its_line_despite_other_overrides(tmp_path):
    text = GOOD.replace("{name: sgd, lr: 0.05, momentum: 0.9}", "{name: adamw, fused: true, foreach: true}")
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, text), ["optimizer.lr=0.1"])
    assert [str(p).split(": adamw()")[0] for p in caught.value.problems] == ["line 5, optimizer"]
    with pytest.raises(ConfigError) as caught:  # one override that alone causes it: only that one is named
        load_config(write(tmp_path, text.replace("foreach: true", "foreach: false")), ["optimizer.lr=0.1", "optimizer.foreach=true"])
    assert [str(p).split(": adamw()")[0] for p in caught.value.problems] == ["override 'optimizer.foreach=true', optimizer.foreach"]


def test_the_remove_hint_is_only_for_arguments_the_new_component_does_not_take(tmp_path):
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, GOOD), ["optimizer.name=adam", "optimizer.betas=[.nan, 0.9]"])
    report = {p.key: str(p) for p in caught.value.problems}
    assert report["optimizer.momentum"].endswith("; remove it with ~optimizer.momentum")
    assert report["optimizer.betas"].endswith("adam() argument 'betas' must be a finite number, got nan")


def test_a_config_that_is_not_a_regular_file_or_is_too_large_is_refused(tmp_path):
    from trainer.config import MAX_CONFIG_BYTES

    with pytest.raises(UsageError, match="'/dev/zero' is not a regular file"):
        load_config("/dev/zero")  # read whole, it grew until memory ran out
    big = tmp_path / "big.yaml"
    big.write_text("name: big\n" + "#" * MAX_CONFIG_BYTES)
    with pytest.raises(UsageError, match="larger than 4 MB"):
        load_config(big)


# ---------------------------------------------------------------------------------------------
# base configs: extends

BASE = """\
name: base
seed: 1
model: {name: mlp, hidden: [8, 8]}
data: {name: random, size: 32, input_shape: [4], target_shape: [2], batch_size: 16}
loss: {name: mse}
optimizer: {name: sgd, lr: 0.05, momentum: 0.9}
train:
  epochs: 3
  log_every: 5
"""


def test_extends_merges_mappings_key_by_key_and_replaces_lists_and_scalars(tmp_path):
    write(tmp_path, BASE, "base.yaml")
    child = write(tmp_path, "extends: base.yaml\nname: child\nmodel: {hidden: [3]}\noptimizer: {lr: 0.1}\ntrain: {epochs: 2}\n")
    config = load_config(child)
    assert config.name == "child" and config.seed == 1
    assert config.model.kwargs == {"hidden": [3]}  # the list replaced, not appended to
    assert config.optimizer.kwargs == {"lr": 0.1, "momentum": 0.9}
    assert (config.train.epochs, config.train.log_every) == (2, 5)
    assert list(config.data.kwargs["input_shape"]) == [4] and config.data.batch_size == 16


def test_several_bases_apply_in_order_then_the_file_then_overrides_and_sweep_values(tmp_path):
    write(tmp_path, BASE, "base.yaml")
    write(tmp_path, "seed: 2\noptimizer: {lr: 0.2}\ntrain: {epochs: 4}\n", "fast.yaml")
    write(tmp_path, "seed: 3\ntrain: {epochs: 5, log_every: 1}\n", "long.yaml")
    child = write(tmp_path, "extends: [base.yaml, fast.yaml, long.yaml]\nname: child\ntrain: {log_every: 2}\n")
    config = load_config(child)
    assert (config.seed, config.optimizer.kwargs["lr"], config.train.epochs, config.train.log_every) == (3, 0.2, 5, 2)
    config = load_config(child, ["seed=7", "train.log_every=9"], values={"optimizer.lr": 0.3})
    assert (config.seed, config.optimizer.kwargs["lr"], config.train.epochs, config.train.log_every) == (7, 0.3, 5, 9)


def test_a_base_can_extend_a_base_each_path_relative_to_its_own_file(tmp_path):
    write(tmp_path, BASE, "base.yaml")
    (tmp_path / "mid").mkdir()
    (tmp_path / "mid" / "mid.yaml").write_text("extends: ../base.yaml\noptimizer: {lr: 0.01}\n")
    (tmp_path / "deep").mkdir()
    child = write(tmp_path / "deep", "extends: ../mid/mid.yaml\ntrain: {epochs: 1}\n", "child.yaml")
    config = load_config(child)
    assert config.name == "base"  # a name from a base is kept, as any key: a variant gives its own
    assert (config.optimizer.kwargs, config.train.epochs, config.train.log_every) == ({"lr": 0.01, "momentum": 0.9}, 1, 5)


def test_a_section_naming_another_component_replaces_the_base_section_and_null_replaces_too(tmp_path):
    write(tmp_path, BASE + "scheduler: {name: step, step_size: 2}\n", "base.yaml")
    child = write(tmp_path, "extends: base.yaml\noptimizer: {name: adam, lr: 0.001}\nscheduler: null\n")
    config = load_config(child)
    assert config.optimizer.name == "adam" and config.optimizer.kwargs == {"lr": 0.001}  # no sgd momentum left
    assert config.scheduler is None
    # a problem in the replacing section is on the file's line; the base's keys there are gone
    child.write_text("extends: base.yaml\noptimizer: {name: adam, lr: -1}\n")
    with pytest.raises(ConfigError) as caught:
        load_config(child)
    assert [str(p).split(": adam()")[0] for p in caught.value.problems] == ["line 2, optimizer.lr"]


def test_a_problem_from_a_base_names_the_base_file_and_its_line(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "bases").mkdir()
    base = BASE.replace("lr: 0.05", "lr: -1").replace("  epochs: 3\n", "  epochs: 3\n  epoch: 3\n") + "seed: 5\n"
    write(tmp_path / "bases", base, "base.yaml")
    write(tmp_path, "extends: bases/base.yaml\nname: child\nmodel: {hidden: 0.5}\n", "child.yaml")
    with pytest.raises(ConfigError) as caught:
        load_config("child.yaml")
    assert caught.value.source == "child.yaml"
    assert [p.location() for p in caught.value.problems] == [
        "line 3, model.hidden",  # the file's own lines keep their format
        "bases/base.yaml line 6, optimizer.lr",
        "bases/base.yaml line 9, train.epoch",
        "bases/base.yaml line 11, seed",
    ]
    assert str(caught.value.problems[-1]) == "bases/base.yaml line 11, seed: given twice (first on line 2); keep one"
    # overriding the bad value in the file fixes it; an override still names itself
    write(tmp_path, "extends: bases/base.yaml\noptimizer: {lr: 0.1}\ntrain: {epochs: 3}\n", "child.yaml")
    with pytest.raises(ConfigError) as caught:
        load_config("child.yaml", ["optimizer.lr=-2"])
    assert [p.location() for p in caught.value.problems] == [
        "bases/base.yaml line 9, train.epoch",  # the file gives train, not train.epoch: still the base's line
        "bases/base.yaml line 11, seed",
        "override 'optimizer.lr=-2', optimizer.lr",
    ]


def test_a_cycle_of_extends_is_an_error_naming_the_cycle(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write(tmp_path, BASE, "base.yaml")
    write(tmp_path, "extends: b.yaml\nname: a\n", "a.yaml")
    write(tmp_path, "name: b\nextends:\n  - base.yaml\n  - a.yaml\n", "b.yaml")
    write(tmp_path, "extends: self.yaml\n", "self.yaml")
    with pytest.raises(ConfigError) as caught:
        load_config("a.yaml")
    assert [str(p) for p in caught.value.problems] == [
        "b.yaml line 4, extends: 'a.yaml' makes a cycle: a.yaml -> b.yaml -> a.yaml; "
        "a config cannot extend itself, directly or through its bases"
    ]
    with pytest.raises(ConfigError, match=r"line 1, extends: 'self.yaml' makes a cycle: self.yaml -> self.yaml;"):
        load_config("self.yaml")


def test_a_missing_base_is_named_with_the_line_that_names_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write(tmp_path, BASE, "base.yaml")
    write(tmp_path, "name: child\nextends:\n  - base.yaml\n  - bsae.yaml\n  - nothing/like/it.yaml\n", "child.yaml")
    with pytest.raises(ConfigError) as caught:
        load_config("child.yaml")
    assert [str(p) for p in caught.value.problems] == [
        "line 4, extends: base file 'bsae.yaml' does not exist; did you mean 'base.yaml'? "
        "the path is relative to the folder of child.yaml",
        "line 5, extends: base file 'nothing/like/it.yaml' does not exist; the path is relative to the folder of child.yaml",
    ]


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("3", "must be a YAML file, or a list of them, relative to this file's folder, such as `extends: base.yaml`"),
        ("[base.yaml, 3]", "must be a YAML file, or a list of them"),
        ("{path: base.yaml}", "must be a YAML file, or a list of them"),
        ("", "must be a YAML file, or a list of them"),
        ("trainer.models", "'trainer.models' is not a YAML file: `extends` names .yaml or .yml files, read with safe_load"),
        ("evil.py", "'evil.py' is not a YAML file"),
    ],
)
def test_a_bad_extends_value_is_refused_with_its_line(tmp_path, value, expected):
    write(tmp_path, BASE, "base.yaml")
    (tmp_path / "evil.py").write_text("raise SystemExit('imported')\n")
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, f"name: child\nextends: {value}\n"))
    assert len(caught.value.problems) == 1 and str(caught.value.problems[0]).startswith(f"line 2, extends: {expected}")


def test_a_base_is_read_with_safe_load_only(tmp_path):
    write(tmp_path, "seed: !!python/object/apply:os.system ['touch pwned']\n", "base.yaml")
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, "extends: base.yaml\n"))
    assert str(caught.value.problems[0]).startswith(f"{tmp_path / 'base.yaml'} line 1: the YAML tag ")
    assert not (tmp_path / "pwned").exists() and not Path("pwned").exists()


def test_show_config_prints_the_merged_config_without_extends(cli, tmp_path):
    (tmp_path / "lenet_fast.yaml").write_text(
        f"extends: {CONFIGS / 'lenet.yaml'}\nname: lenet-fast\noptimizer: {{lr: 0.01}}\ntrain: {{epochs: 2}}\n"
    )
    result = cli("show-config", "lenet_fast.yaml")
    assert result.code == 0, result.output
    shown = yaml.safe_load(result.stdout)
    assert "extends" not in shown and shown["name"] == "lenet-fast"
    assert shown["optimizer"] == {"name": "sgd", "lr": 0.01, "momentum": 0.9}
    assert shown["data"]["name"] == "digits" and shown["train"]["epochs"] == 2 and shown["train"]["log_every"] == 10
    assert shown["scheduler"]["name"] == "cosine" and shown["scheduler"]["T_max"] == 2  # filled from the merged epochs


def test_the_json_schema_lets_a_file_that_extends_leave_out_sections():
    import jsonschema

    from trainer.config import json_schema

    validator = jsonschema.Draft202012Validator(json_schema())
    assert not list(validator.iter_errors({"extends": "../lenet.yaml", "train": {"epochs": 3}}))
    assert not list(validator.iter_errors({"extends": ["a.yaml", "b.yml"]}))
    assert [e.message for e in validator.iter_errors({"train": {"epochs": 3}})][0] == "'model' is a required property"
    assert list(validator.iter_errors({"extends": 3}))


@pytest.mark.parametrize("value", ['"base\\0.yaml"', "x" * 300 + ".yaml"], ids=["nul-byte", "name-too-long"])
def test_a_base_name_the_system_cannot_open_is_a_problem_not_a_crash(tmp_path, value):
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, f"extends: {value}\n"))
    assert str(caught.value.problems[0]).startswith("line 1, extends: cannot read base file ")


def test_the_training_options_are_off_by_default_and_true_turns_one_on_with_its_defaults(tmp_path):
    train = load_config(write(tmp_path, GOOD)).train
    assert (train.early_stopping, train.accumulate, train.ema) == (None, 1, None)
    train = load_config(write(tmp_path, GOOD), ["train.early_stopping=true", "train.ema=true", "train.accumulate=4"]).train
    assert (train.early_stopping.patience, train.early_stopping.min_delta, train.ema.decay, train.accumulate) == (5, 0.0, 0.999, 4)
    # a key of a section that is off turns it on with the other defaults
    train = load_config(write(tmp_path, GOOD), ["train.ema.decay=0.9"]).train
    assert train.ema.decay == 0.9 and train.early_stopping is None


def test_a_training_option_written_wrong_is_located_with_its_choices(tmp_path):
    text = GOOD + "train:\n  early_stopping: {patience: 0, min_dlta: 0.1}\n  accumulate: 0\n  ema: {decay: 1.0}\n"
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, text))
    report = str(caught.value)
    assert "line 7, train.early_stopping.min_dlta: unknown key 'min_dlta'; did you mean 'min_delta'? accepted keys: patience, min_delta" in report
    assert "line 7, train.early_stopping.patience: input should be greater than 0; got 0" in report
    assert "line 8, train.accumulate: input should be greater than 0; got 0" in report
    assert "line 9, train.ema.decay: input should be less than 1; got 1.0" in report
