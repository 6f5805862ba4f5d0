"""`trainer runs` on a thousand run folders: the whole command, and the reading alone.

    python benchmarks/runs_table.py                  # 1,000 folders, 7 rounds
    python benchmarks/runs_table.py --runs 200 --rounds 3

Generates run folders as trainer writes them (config.yaml of the LeNet config with a learning rate
of its own, and batch size and seed varied, env.json, summary.json, a 230-line metrics.jsonl and a 250 KB checkpoint each;
every tenth run killed, without summary.json), half of them as one sweep's trials nested a level
deeper. Then times, in fresh processes, `trainer runs ROOT` printing the table to a pipe and
`trainer runs ROOT --json`, and in this process `catalog.list_runs` (find, read, differing keys,
sort). Prints the median wall-clock seconds of the rounds, with the fastest and slowest, and the
median CPU seconds (user + system), which another busy process on the machine changes less. The
folders are read from the page cache after the first round; a cold disk adds its seeks.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CONFIG = """name: {name}
seed: {seed}
device: auto
precision: fp32
model: {{name: lenet, num_classes: 10, in_channels: 1}}
data: {{name: digits, batch_size: {batch}, val_fraction: 0.2, shuffle: true, image_size: 32}}
loss: {{name: cross_entropy}}
optimizer: {{name: sgd, lr: {lr}, momentum: 0.9}}
scheduler: {{name: cosine, t_max: 230, interval: step}}
train: {{epochs: 10, max_steps: null, log_every: 10, grad_clip: null, checkpoint_interval_s: 10.0, checkpoint_every: null,
  monitor: null, mode: null, compile: false, channels_last: false, cudnn_benchmark: false, tf32: false}}
"""


def make_runs(root: Path, count: int) -> None:
    """`count` run folders under `root`: half as runs/lenet/<timestamp>, half as trials of one sweep."""
    metrics = "".join(
        json.dumps({"step": s, "epoch": 1 + s // 23, "split": "train", "loss": 2.3 / s, "lr": 0.05, "samples_per_s": 17000.0,
                    "time": 1796116724.0 + s}) + "\n"
        for s in range(10, 2310, 10)
    )  # fmt: skip
    checkpoint = b"\0" * 250_000  # never read: a read would show in the time
    for i in range(count):
        folder = root / ("lenet" if i % 2 else "sweep") / (f"20261201-{i // 2:06d}" if i % 2 else f"trial-{i // 2:04d}")
        (folder / "checkpoints").mkdir(parents=True)
        # a random search's learning rates: every run's differs (its optimizer section is its own)
        lr, batch = round(10 ** (-3 + 2 * ((i * 0.618034) % 1)), 6), (32, 64)[i // 4 % 2]
        (folder / "config.yaml").write_text(CONFIG.format(name="lenet", seed=i % 3, batch=batch, lr=lr))
        env = {"run_id": f"{i:032x}", "command": ["trainer", "run", "configs/lenet.yaml"], "cwd": "/work",
               "started": f"2026-12-01T{i // 3600 % 24:02d}:{i // 60 % 60:02d}:{i % 60:02d}+00:00", "python": "3.11.7",
               "torch": "2.14.1", "trainer": "0.1.0", "cuda": None, "device": "cpu", "device_reason": "auto", "git_commit": None,
               "distributed": None}  # fmt: skip
        (folder / "env.json").write_text(json.dumps(env, indent=2))
        (folder / "metrics.jsonl").write_text(metrics)
        (folder / "checkpoints" / "last.pt").write_bytes(checkpoint)
        (folder / ".lock").write_text("1\n")
        if i % 10 == 9:
            continue  # killed: no summary.json
        summary = {"status": "failed" if i % 10 == 8 else "completed", "error": None,
                   "final": {"train_loss": 0.02 + i / 1e5, "val_loss": 0.1 + i / 1e4, "val_accuracy": 0.97 - i / 1e5},
                   "best": {"val_loss": 0.1 + i / 1e4, "val_accuracy": 0.97 - i / 1e5, "train_loss": 0.02 + i / 1e5},
                   "steps": 230, "epochs": 10, "wall_time_s": 1.3 + i / 1000, "device": "cpu", "train_time_s": 1.2}  # fmt: skip
        (folder / "summary.json").write_text(json.dumps(summary, indent=2))


def trainer_command(*args: str) -> list[str]:
    """`trainer ARGS` with this Python (the console script's `python -m trainer`)."""
    return [sys.executable, "-m", "trainer", *args]


def time_command(command: list[str]) -> tuple[float, float]:
    """Wall-clock and CPU (user + system) seconds of one process running `command`."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} exited {done.returncode}: {done.stderr}")
    return seconds, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def time_reading(root: Path) -> tuple[float, float]:
    from trainer import catalog

    catalog._PARSED.clear()  # as in a new command: no config parsed yet
    started, cpu = time.perf_counter(), time.process_time()
    catalog.list_runs(root)
    return time.perf_counter() - started, time.process_time() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=1000, help="run folders to generate")
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="runs-table-"))
    try:
        make_runs(root, args.runs)
        time_command(trainer_command("runs", str(root)))  # warm the page cache and the bytecode
        empty = root / "empty"
        empty.mkdir()
        times: dict[str, list[tuple[float, float]]] = {
            "trainer runs ROOT": [], "trainer runs ROOT --json": [], "catalog.list_runs (in process)": [],
            "trainer runs EMPTY (start-up alone)": [],
        }  # fmt: skip
        for _ in range(args.rounds):
            times["trainer runs ROOT"].append(time_command(trainer_command("runs", str(root))))
            times["trainer runs ROOT --json"].append(time_command(trainer_command("runs", str(root), "--json")))
            times["catalog.list_runs (in process)"].append(time_reading(root))
            times["trainer runs EMPTY (start-up alone)"].append(time_command(trainer_command("runs", str(empty))))
        print(f"{args.runs:,} run folders, {args.rounds} rounds")
        print("| what | wall s, median | wall s, min-max | CPU s, median |")
        print("|---|---|---|---|")
        for name, measured in times.items():
            wall, cpu = [m[0] for m in measured], [m[1] for m in measured]
            print(f"| {name} | {statistics.median(wall):.3f} | {min(wall):.3f}-{max(wall):.3f} | {statistics.median(cpu):.3f} |")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
