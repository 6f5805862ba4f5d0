"""How much work does `trainer` add to a hand-written loop? Instructions, counted by valgrind.

    python benchmarks/instructions.py                         # linreg, 2000 steps: ~2 minutes
    python benchmarks/instructions.py --models mlp --steps 250  # slow: 2000 MLP steps took over 25 min a variant

Wall-clock ratios on a shared VM move by tens of percent from run to run (overhead.py shows the
spread); the number of instructions a loop executes hardly moves. Each variant runs once, in its
own process, under `valgrind --tool=callgrind --instr-atstart=no`: counting is switched on where
its training loop starts and off where it ends (with callgrind_control), so imports, building and
start-up are not counted, and every thread is (the checkpoint writer's too). It prints the
instructions per optimizer step and the ratio slicing / variant: 1.000 means the same work as the
hand-written loop, 0.950 means 5% more.

  slicing   overhead.py's hand-written loop, slicing batches from tensors (the baseline)
  loop      trainer.engine.fit alone: trainer's loop, no console, files or checkpoints
  quiet     `trainer` (trainer.runs.execute_run), console and TensorBoard off: metrics.jsonl and
            the checkpoints at every epoch end (2000 steps at batch 64: 8 epochs)
  trainer   `trainer` with its console (plain, to /dev/null) and TensorBoard on

Instructions are not time: they leave out cache misses, which are what cold code such as a
checkpoint save mostly costs. And under valgrind a run is ~50x slower, so what `trainer` does on a
clock (writing held log points out every second, the console's bounded line rate) happens far
more often than in a real run: quiet and trainer are upper bounds.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from overhead import MODELS, hand_loop, run_trainer, slices, trainer_config  # noqa: E402

VARIANTS = ["slicing", "loop", "quiet", "trainer"]


# ---------------------------------------------------------------------------------------------
# the measured process (under valgrind)


def counting_switch(flag: Path):
    """A function that asks the driver to switch counting on (first call) or off (second) and waits until it has."""
    calls = []

    def switch() -> float:
        state = "on" if not calls else "off"
        calls.append(state)
        flag.write_text(state)
        while flag.read_text() != f"{state}-done":
            time.sleep(0.01)
        return time.perf_counter()

    return switch


def child(variant: str, model: str, steps: int, flag: Path) -> None:
    import torch

    torch.set_num_threads(1)
    switch = counting_switch(flag)
    if variant == "slicing":
        hand_loop(model, steps, slices, clock=switch)
        return
    import trainer.engine

    fit = trainer.engine.fit

    def counted_fit(*args, **kwargs):
        switch()
        try:
            return fit(*args, **kwargs)
        finally:
            switch()

    if variant == "loop":
        from trainer.build import build_run

        built = build_run(trainer_config(model, steps))
        counted_fit(built.model, built.train_batches, None, built.loss_fn, built.optimizer, built.settings, precision=built.precision)
    else:
        trainer.engine.fit = counted_fit  # execute_run imports it when it runs
        run_trainer(model, steps, quiet=variant == "quiet")


# ---------------------------------------------------------------------------------------------
# the driver


def count(variant: str, model: str, steps: int, folder: Path) -> int:
    """Instructions executed by `variant`'s training loop of `steps` steps on `model`."""
    flag, out = folder / f"{variant}-{model}.flag", folder / f"{variant}-{model}.callgrind"
    flag.write_text("")
    command = [
        "valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={out}",
        sys.executable, __file__, "--child", variant, model, "--steps", str(steps), "--flag", str(flag),
    ]  # fmt: skip
    env = {**os.environ, "PYTHONHASHSEED": "0"}  # the same dict layouts in every run
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    while proc.poll() is None:
        state = flag.read_text()
        if state in ("on", "off"):
            subprocess.run(["callgrind_control", "-i", state, str(proc.pid)], capture_output=True, check=True)
            flag.write_text(f"{state}-done")
        time.sleep(0.05)
    if proc.returncode != 0:
        raise SystemExit(f"{variant} on {model} failed:\n{proc.stderr.read()[-2000:]}")
    totals = [line for line in out.read_text().splitlines() if line.startswith("totals:")]
    return int(totals[-1].split()[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--models", default="linreg", help=f"comma-separated, of: {', '.join(MODELS)}")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="runs at a time (counts do not depend on it)")
    parser.add_argument("--child", nargs=2, metavar=("VARIANT", "MODEL"), help=argparse.SUPPRESS)
    parser.add_argument("--flag", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child[0], args.child[1], args.steps, args.flag)
        return
    if shutil.which("valgrind") is None or shutil.which("callgrind_control") is None:
        raise SystemExit("valgrind is not installed (apt-get install valgrind); overhead.py measures time without it")
    models = args.models.split(",")
    unknown = [m for m in models if m not in MODELS]
    if unknown:
        raise SystemExit(f"unknown model {unknown[0]!r}; accepted: {', '.join(MODELS)}")

    import torch

    print(f"torch {torch.__version__}, one thread; {args.steps} steps at batch 64, counted by callgrind")
    jobs = [(variant, model) for model in models for variant in VARIANTS]
    with tempfile.TemporaryDirectory() as tmp, ThreadPoolExecutor(args.jobs) as pool:
        counts = dict(zip(jobs, pool.map(lambda job: count(*job, args.steps, Path(tmp)), jobs)))
    print("\n| model | variant | instructions per step | vs slicing (slicing / variant) |")
    print("|---|---|---|---|")
    for model in models:
        base = counts[("slicing", model)]
        for variant in VARIANTS:
            n = counts[(variant, model)]
            print(f"| {model} | {variant} | {n / args.steps:,.0f} | {base / n:.3f} |")


if __name__ == "__main__":
    main()
