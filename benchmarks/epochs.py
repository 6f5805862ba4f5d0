"""What does an epoch end cost? Runs a config with many short epochs three ways.

    python benchmarks/epochs.py                               # configs/two_layer_net.yaml, 5 rounds
    python benchmarks/epochs.py --config configs/sqrt2.yaml train.epochs=2000 --pin 1

The seed experiments are tutorial loops over a few dozen samples, so every step is an epoch:
two_layer_net.yaml is 500 epochs of one step. Everything trainer does once an epoch (the
epoch-end checkpoint above all, written and fsynced as the contract asks) is paid per step there,
which overhead.py, with its 250-step epochs, does not show. In alternating rounds, each run in a
fresh process, it times the training loop of:

  loop            the hand-written loop over the same model, data, loss and optimizer as built
                  by trainer (its on-device batches), with no epoch-end work at all
  trainer         `trainer run` as a user gets it: console (plain, to /dev/null), TensorBoard,
                  metrics.jsonl, last.pt at every epoch end
  no-checkpoints  the same run with the checkpoint saves left out (not a user option: it shows
                  how much of the gap is the checkpoint)

and prints the median seconds, the milliseconds each epoch adds over `loop`, and the ratio to
`loop` (median of each round's own ratio).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from overhead import bare_loop, run_config  # noqa: E402

VARIANTS = ["loop", "trainer", "no-checkpoints"]
DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "two_layer_net.yaml"


def run_loop(config) -> float:
    """The loop of the tutorials over trainer's built parts: seconds for the config's steps."""
    from trainer.build import build_run
    from trainer.engine import seed_everything

    seed_everything(config.seed)
    built = build_run(config)
    built.model.train()
    steps = built.settings.last_step(len(built.train_batches))
    return bare_loop(built.model, built.loss_fn, built.optimizer, steps, built.train_batches.epoch)


def child(variant: str, config_path: Path, overrides: list[str], pin: int | None) -> None:
    """One measured run in this process; prints one JSON line."""
    import torch

    from trainer.config import load_config

    if pin is not None:
        os.sched_setaffinity(0, {pin})
        torch.set_num_threads(1)
    config = load_config(config_path, overrides)
    if variant == "loop":
        seconds, saved = run_loop(config), 0
    else:
        seconds, saved = run_config(config, saves=variant == "trainer")
    print(json.dumps({"seconds": seconds, "checkpoints": saved}))


def measure(variant: str, config: Path, overrides: list[str], pin: int | None) -> float:
    """Seconds of training of one run of `variant`, in a process of its own."""
    pinning = ["--pin", str(pin)] if pin is not None else []
    out = subprocess.run(
        [sys.executable, __file__, "--child", variant, "--config", str(config), *pinning, *overrides],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    if out.returncode != 0:
        raise SystemExit(f"{variant} on {config} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])["seconds"]


def main() -> None:
    """Alternate the variants over the rounds and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG)
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, as for trainer run")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--pin", type=int, default=None, metavar="CPU", help="run each variant on this one CPU, one thread (Linux)")
    parser.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.config, args.overrides, args.pin)
        return

    from trainer.build import build_run
    from trainer.config import load_config

    built = build_run(load_config(args.config, args.overrides))
    steps_per_epoch = len(built.train_batches)
    steps = built.settings.last_step(steps_per_epoch)
    epochs = -(-steps // steps_per_epoch)
    print(f"{args.config.name} {' '.join(args.overrides)}: {steps} steps in {epochs} epochs of {steps_per_epoch}; {args.rounds} rounds"
          + (f", pinned to CPU {args.pin}" if args.pin is not None else ""))  # fmt: skip
    seconds: dict[str, list[float]] = {v: [] for v in VARIANTS}
    for r in range(args.rounds):
        for variant in VARIANTS[r % len(VARIANTS) :] + VARIANTS[: r % len(VARIANTS)]:  # rotate the order each round
            seconds[variant].append(measure(variant, args.config, args.overrides, args.pin))
        print(f"  round {r + 1}/{args.rounds} done", file=sys.stderr)

    loop = seconds["loop"]
    print("\n| variant | seconds (median) | ms per epoch over loop | vs loop |")
    print("|---|---|---|---|")
    for variant, values in seconds.items():
        extra = (statistics.median(values) - statistics.median(loop)) / epochs * 1000
        ratio = statistics.median(a / b for a, b in zip(loop, values))
        print(f"| {variant} | {statistics.median(values):.3f} | {extra:.2f} | {ratio:.3f}x |")


if __name__ == "__main__":
    main()
