"""TensorBoard's own synchronous record writer against trainer's (src/trainer/events.py), per event.

    python benchmarks/event_writer.py            # 7 alternating rounds of 2,000 events each

Both build the same event (three scalars, as a train log point writes) and append it to a file;
TensorBoard's RecordWriter checksums it in pure Python, trainer's EventFile with google-crc32c.
Prints the median microseconds per event of each. At the log points of a linear-regression run
(log_every 10, ~100 us a step), 10 us an event is 1% of the run.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

SCALARS = {"train/loss": 0.5, "lr": 0.1, "samples_per_s": 1000.0}


def tensorboard_writer(folder: Path, events: int) -> float:
    from tensorboard.compat.proto import event_pb2, summary_pb2
    from tensorboard.summary.writer.record_writer import RecordWriter

    value = summary_pb2.Summary.Value
    with open(folder / "tensorboard.tfevents", "wb") as file:
        writer = RecordWriter(file)
        started = time.perf_counter()
        for step in range(events):
            summary = summary_pb2.Summary(value=[value(tag=k, simple_value=v) for k, v in SCALARS.items()])
            writer.write(event_pb2.Event(wall_time=time.time(), step=step, summary=summary).SerializeToString())
        file.flush()
        return (time.perf_counter() - started) / events


def trainer_writer(folder: Path, events: int) -> float:
    from trainer.events import EventFile

    writer = EventFile(folder)
    started = time.perf_counter()
    for step in range(events):
        writer.add_scalars(SCALARS, step)
    writer.flush()
    seconds = (time.perf_counter() - started) / events
    writer.close()
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--events", type=int, default=2000)
    args = parser.parse_args()
    times: dict[str, list[float]] = {"tensorboard RecordWriter": [], "trainer EventFile": []}
    for _ in range(args.rounds):
        with tempfile.TemporaryDirectory() as folder:
            times["tensorboard RecordWriter"].append(tensorboard_writer(Path(folder), args.events))
            times["trainer EventFile"].append(trainer_writer(Path(folder), args.events))
    for name, seconds in times.items():
        print(f"{name}: {statistics.median(seconds) * 1e6:.1f} us per event (median of {args.rounds})")


if __name__ == "__main__":
    main()
