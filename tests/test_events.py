"""Tests for trainer.events: event files read back with TensorBoard's own reader."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from trainer.events import EventFile, hparam_value


def accumulator(folder: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder))
    acc.Reload()
    return acc


def test_scalars_read_back_with_their_steps_and_times(tmp_path: Path) -> None:
    events = EventFile(tmp_path)
    events.add_scalars({"train/loss": 0.5, "lr": 0.1}, step=1, wall_time=1000.0)
    events.add_scalars({"train/loss": 0.25, "lr": 0.1}, step=2, wall_time=1001.0)
    events.close()
    events.close()  # idempotent
    acc = accumulator(tmp_path)
    assert [(e.step, e.wall_time, e.value) for e in acc.Scalars("train/loss")] == [(1, 1000.0, 0.5), (2, 1001.0, 0.25)]
    assert [e.value for e in acc.Scalars("lr")] == [pytest.approx(0.1)] * 2


def test_a_file_with_purge_step_hides_what_earlier_files_logged_from_that_step_on(tmp_path: Path) -> None:
    first = EventFile(tmp_path)
    for step in range(1, 7):
        first.add_scalars({"loss": 1.0}, step)
    first.close()
    second = EventFile(tmp_path, purge_step=5)  # made in the same second: must not overwrite the first
    for step in (5, 6, 7):
        second.add_scalars({"loss": 0.5}, step)
    second.close()
    assert len(list(tmp_path.glob("events.out.tfevents.*"))) == 2
    assert [(e.step, e.value) for e in accumulator(tmp_path).Scalars("loss")] == [
        (1, 1.0), (2, 1.0), (3, 1.0), (4, 1.0), (5, 0.5), (6, 0.5), (7, 0.5)
    ]


def test_flush_makes_events_readable_before_close(tmp_path: Path) -> None:
    events = EventFile(tmp_path, flush_secs=3600)
    events.add_scalars({"loss": 1.0}, 1)
    events.flush()
    assert [e.step for e in accumulator(tmp_path).Scalars("loss")] == [1]
    events.close()


def test_hparams_session_in_the_file_itself(tmp_path: Path) -> None:
    from tensorboard.plugins.hparams import api_pb2, metadata

    events = EventFile(tmp_path)
    events.add_hparams({"data.batch_size": 64, "optimizer.lr": 0.05, "model.name": "mlp", "train.ema": None}, step=10)
    events.close()
    content = accumulator(tmp_path).PluginTagToContent("hparams")
    start = metadata.parse_session_start_info_plugin_data(content[metadata.SESSION_START_INFO_TAG])
    assert {k: v.WhichOneof("kind") for k, v in start.hparams.items()} == {
        "data.batch_size": "number_value", "optimizer.lr": "number_value",
        "model.name": "string_value", "train.ema": "string_value",
    }  # fmt: skip
    assert start.hparams["data.batch_size"].number_value == 64
    assert start.hparams["train.ema"].string_value == "None"
    end = metadata.parse_session_end_info_plugin_data(content[metadata.SESSION_END_INFO_TAG])
    assert end.status == api_pb2.Status.Value("STATUS_SUCCESS")


@pytest.mark.parametrize(
    "value, expected",
    [
        (64, 64),
        (np.int64(64), 64),
        (0.05, 0.05),
        (np.float32(0.5), 0.5),
        ("sgd", "sgd"),
        (True, "True"),
        (np.bool_(False), "False"),
        (None, "None"),
        ([1, 32, 32], "[1, 32, 32]"),
    ],
)
def test_hparam_values_are_numbers_or_strings(value, expected) -> None:
    converted = hparam_value(value)
    assert converted == expected and type(converted) is type(expected)
