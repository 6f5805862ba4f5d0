"""The time of a 2x2 grid on the digits with 1 and with 2 workers: `trainer sweep` as a user runs it.

    python benchmarks/sweep_workers.py                 # sweeps/lenet.yaml (LeNet, 3 epochs a trial), 3 rounds
    python benchmarks/sweep_workers.py --rounds 5 --set train.epochs=1

Each round runs the sweep once with --workers 1 and once with --workers 2 (the order alternating
round to round), each in a new temporary runs root, and records the whole command's wall seconds.
It prints the median of each, and the speed-up of 2 workers (the median of each round's ratio).
With two workers each trial trains on one thread (the cores are split between the workers).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def sweep_seconds(sweep_file: Path, workers: int) -> float:
    with tempfile.TemporaryDirectory() as runs:
        started = time.perf_counter()
        subprocess.run(
            ["trainer", "sweep", str(sweep_file), "--workers", str(workers), "--runs-root", runs, "--quiet"],
            check=True, stdout=subprocess.DEVNULL,
        )  # fmt: skip
        return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sweep", type=Path, default=ROOT / "sweeps" / "lenet.yaml")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--set", action="append", default=[], help="KEY=VALUE added to the sweep's set:")
    args = parser.parse_args()
    spec = yaml.safe_load(args.sweep.read_text())
    spec["config"] = str((args.sweep.parent / spec["config"]).resolve())
    for item in args.set:
        key, value = item.split("=", 1)
        spec.setdefault("set", {})[key] = yaml.safe_load(value)
    with tempfile.TemporaryDirectory() as folder:
        sweep_file = Path(folder) / args.sweep.name
        sweep_file.write_text(yaml.safe_dump(spec))
        times: dict[int, list[float]] = {1: [], 2: []}
        for round_ in range(args.rounds):
            for workers in (1, 2) if round_ % 2 == 0 else (2, 1):
                times[workers].append(sweep_seconds(sweep_file, workers))
                print(f"round {round_ + 1}: {workers} worker(s) {times[workers][-1]:.1f}s", flush=True)
    one, two = (statistics.median(times[w]) for w in (1, 2))
    ratio = statistics.median(a / b for a, b in zip(times[1], times[2]))
    print(f"\n{args.sweep.name}, {args.rounds} rounds: 1 worker {one:.1f}s, 2 workers {two:.1f}s (median); 2 workers {ratio:.2f}x as fast")


if __name__ == "__main__":
    main()
