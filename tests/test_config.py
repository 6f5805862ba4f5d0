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
