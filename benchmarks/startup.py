"""The start-up of the commands that use a trained run, next to `import torch` alone.

    python benchmarks/startup.py                 # 7 rounds
    python benchmarks/startup.py --rounds 3

Trains the linear regression seed config, and LeNet for one epoch on a folder of 16 generated
images, into a temporary folder, then times, each a fresh process and the commands taking turns
within every round: `python -c "import torch"`, `trainer eval`, `trainer predict` and `trainer
export --format safetensors` of the first run, `trainer predict` of the second on its image
files, and `trainer validate` of the first config. Prints the median wall-clock and CPU (user + system) seconds of the
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
IMAGES_CONFIG = """name: images
model: {name: lenet}
data: {name: image_folder, root: images, batch_size: 4, val_fraction: 0.25}
loss: {name: cross_entropy}
optimizer: {name: sgd, lr: 0.01}
train: {epochs: 1}
"""


def make_images(root: Path) -> None:
    """16 small PNGs, 8 in each of two class folders."""
    from PIL import Image

    for label, colour in (("red", (200, 30, 30)), ("blue", (30, 30, 200))):
        (root / label).mkdir(parents=True)
        for i in range(8):
            Image.new("RGB", (20 + i, 20), colour).save(root / label / f"{i}.png")


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
        make_images(work / "images")
        (work / "images.yaml").write_text(IMAGES_CONFIG)
        subprocess.run([trainer, "run", "images.yaml", "--run-dir", "image-run", "-q"], cwd=work, check=True, stdout=subprocess.DEVNULL)
        commands = {
            "python -c 'import torch'": [sys.executable, "-c", "import torch"],
            "trainer eval RUN --split train": [trainer, "eval", "run", "--split", "train"],
            "trainer predict RUN --split train": [trainer, "predict", "run", "--split", "train"],
            "trainer export RUN --format safetensors": [trainer, "export", "run", "--format", "safetensors", "-o", "model.safetensors", "--force"],
            "trainer predict IMAGE_RUN IMAGE_FOLDER": [trainer, "predict", "image-run", "images"],
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
