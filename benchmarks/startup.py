"""The start-up of the commands that use a trained run, next to `import torch` alone.

    python benchmarks/startup.py                 # 7 rounds
    python benchmarks/startup.py --rounds 3

Trains the linear regression seed config once into a temporary folder, then times, each a fresh
process and the commands taking turns within every round: `python -c "import torch"`, `trainer
eval`, `trainer predict` and `trainer export --format safetensors` of that run, and `trainer
validate` of the same config. Prints the median wall-clock and CPU (user + system) seconds of the
rounds; CPU is the steadier column on a machine that is busy with something else.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CONFIG = Path(__file__).resolve().parent.parent / "configs" / "linear_regression.yaml"


def timed(command: list[str], cwd: Path) -> tuple[float, float]:
    """Wall-clock and CPU seconds of `command` run to completion (it must succeed)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    subprocess.run(command, cwd=cwd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    trainer = shutil.which("trainer") or sys.exit("the trainer console script is not on PATH: pip install -e .")
    work = Path(tempfile.mkdtemp(prefix="startup-"))
    try:
        subprocess.run([trainer, "run", str(CONFIG), "--run-dir", "run", "-q"], cwd=work, check=True, stdout=subprocess.DEVNULL)
        commands = {
            "python -c 'import torch'": [sys.executable, "-c", "import torch"],
            "trainer eval RUN --split train": [trainer, "eval", "run", "--split", "train"],
            "trainer predict RUN --split train": [trainer, "predict", "run", "--split", "train"],
            "trainer export RUN --format safetensors": [trainer, "export", "run", "--format", "safetensors", "-o", "model.safetensors", "--force"],
            "trainer validate CONFIG": [trainer, "validate", str(CONFIG)],
        }
        times: dict[str, list[tuple[float, float]]] = {name: [] for name in commands}
        for _ in range(args.rounds):
            for name, command in commands.items():
                times[name].append(timed(command, work))
    finally:
        shutil.rmtree(work)
    print(f"{args.rounds} rounds, load average {os.getloadavg()[0]:.1f}")
    print("| command | wall s, median | CPU s, median |")
    print("|---|---|---|")
    for name, pairs in times.items():
        print(f"| `{name}` | {statistics.median(w for w, _ in pairs):.2f} | {statistics.median(c for _, c in pairs):.2f} |")


if __name__ == "__main__":
    main()
