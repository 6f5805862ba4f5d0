"""Where does `trainer`'s time go next to a hand-written loop? One process, parts switched off one by one.

    python benchmarks/breakdown.py                    # linear regression, 15 rounds: about a minute
    python benchmarks/breakdown.py --pin 1 --rounds 25 --model mlp

overhead.py runs every variant in a fresh process, as a user would; their start-up and memory
layout differ from run to run, and on a shared VM a few percent drown in that. Here all variants
run in one process, warmed up once, alternating within each round, so a part that costs 1-2% shows.
Each row adds one part of `trainer` to the row before it:

  slicing         the hand-written slicing loop (overhead.py's)
  data            the same loop over trainer's in-memory batches: the data path
  fit-one-log     trainer.engine.fit alone, with one log point: the loop's own per-step work
  fit             fit at the default log_every (10): the log points' reads
  quiet-no-saves  a whole `trainer run`, console and TensorBoard off, checkpoint saves left out
  quiet           the same with its checkpoint at every epoch end
  trainer         the same with console and TensorBoard on

and prints the median seconds, the median of each round's ratio to `slicing` (slicing's time over
the variant's) with its interquartile range, and how much lower that ratio is than the row
before's: what the part added costs. The interquartile ranges say how far to trust a difference.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from overhead import MODELS, hand_loop, run_config, run_slicing, run_trainer, trainer_config  # noqa: E402

VARIANTS = ["slicing", "data", "fit-one-log", "fit", "quiet-no-saves", "quiet", "trainer"]


def run_fit(model: str, steps: int, *, log_every: int | None = None) -> float:
    """trainer.engine.fit alone on the built run: no console, files or checkpoints."""
    from trainer.build import build_run
    from trainer.engine import fit

    built = build_run(trainer_config(model, steps))
    settings = built.settings if log_every is None else dataclasses.replace(built.settings, log_every=log_every)
    start = time.perf_counter()
    fit(built.model, built.train_batches, None, built.loss_fn, built.optimizer, settings, precision=built.precision)
    return time.perf_counter() - start


def run_data(model: str, steps: int) -> float:
    """The hand-written loop, fed by trainer's in-memory batches instead of its own slices."""
    from trainer.build import build_run

    batches = build_run(trainer_config(model, steps)).train_batches
    return hand_loop(model, steps, lambda x, y, epoch: batches.epoch(epoch))


def main() -> None:
    """Warm up, alternate the variants over the rounds, print the table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="linreg", choices=list(MODELS))
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--pin", type=int, default=None, metavar="CPU", help="run on this one CPU, one thread (Linux)")
    args = parser.parse_args()

    import torch

    if args.pin is not None:
        os.sched_setaffinity(0, {args.pin})
        torch.set_num_threads(1)
    model, steps = args.model, args.steps
    runners = {
        "slicing": lambda: run_slicing(model, steps),
        "data": lambda: run_data(model, steps),
        "fit-one-log": lambda: run_fit(model, steps, log_every=steps),
        "fit": lambda: run_fit(model, steps),
        "quiet-no-saves": lambda: run_config(trainer_config(model, steps), quiet=True, saves=False)[0],
        "quiet": lambda: run_trainer(model, steps, quiet=True),
        "trainer": lambda: run_trainer(model, steps, quiet=False),
    }
    for run in runners.values():  # imports, torch's first-step set-up, warm caches for all
        run()
    seconds: dict[str, list[float]] = {v: [] for v in VARIANTS}
    for r in range(args.rounds):
        for variant in VARIANTS[r % len(VARIANTS) :] + VARIANTS[: r % len(VARIANTS)]:  # rotate the order each round
            seconds[variant].append(runners[variant]())
        print(f"  round {r + 1}/{args.rounds} done", file=sys.stderr)

    pinned = f", pinned to CPU {args.pin}" if args.pin is not None else ""
    print(f"{model}, {steps} steps at batch 64, {args.rounds} rounds in one process{pinned}; torch {torch.__version__}\n")
    print("| variant | seconds (median) | vs slicing (IQR) | costs (drop in the ratio from the row above) |")
    print("|---|---|---|---|")
    base = seconds["slicing"]
    previous = None
    for variant in VARIANTS:
        ratios = [b / x for b, x in zip(base, seconds[variant])]
        q1, _, q3 = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else (ratios[0],) * 3
        ratio = statistics.median(ratios)
        adds = "" if previous is None else f"{previous - ratio:+.3f}"
        print(f"| {variant} | {statistics.median(seconds[variant]):.3f} | {ratio:.3f}x ({q1:.3f}-{q3:.3f}) | {adds} |")
        previous = ratio


if __name__ == "__main__":
    main()
