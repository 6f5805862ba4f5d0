"""Each seed config as `trainer run` and as its hand-written twin, whole process against whole process.

    python benchmarks/seeds.py                                  # all six configs, 5 rounds
    python benchmarks/seeds.py --configs two_layer_net,mlp --rounds 3 --threads 1
    python benchmarks/seeds.py --configs mlp --pin 1 mlp:data.size=1 mlp:data.val_fraction=0

In every round, for each config (in an order that alternates round to round), two processes:

  trainer  `trainer run configs/X.yaml --quiet --run-dir <temporary folder>`: what a user runs,
           TensorBoard and the checkpoints included; its loop time is summary.json's train_time_s
  twin     `python benchmarks/twins.py X`: the same model, data, seed and steps in plain PyTorch
           (twins.py); its loop time is what it prints on its last line

and after them a one-step pair: `trainer run configs/linear_regression.yaml train.max_steps=1`
against `twins.py linear_regression --max-steps 1`, a process that imports torch, makes the data,
the model and the optimizer and steps it once: what any PyTorch program pays before its first step.

It prints, per config, the median seconds of each whole process and of each training loop, and
trainer's speed as a fraction of the twin's (the twin's seconds over trainer's; 1.00 = as fast):
the median of each round's own ratio, since this VM's speed drifts within minutes and runs seconds
apart drift together. A process's time is mostly start-up (import torch alone is 1-2 s) for the
small configs and mostly training for the digits ones.

KEY=VALUE overrides go to trainer's side only, `CONFIG:KEY=VALUE` to that config's run only: they
bring a config in line with its twin while the YAML is being changed. A round whose trainer run and
twin took different numbers of steps stops the benchmark. `--threads N` sets OMP_NUM_THREADS for
both sides: on a loaded 2-core VM torch's default of one thread a core can make a step ten times
slower than one thread does. `--pin CPU` runs both on that one CPU with one thread.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from twins import TWINS  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TWINS_SCRIPT = Path(__file__).resolve().with_name("twins.py")
ONE_STEP = "linear_regression"  # the config of the one-step pair
SIDES = ("trainer", "twin")


def environment(threads: int | None, pin: int | None) -> tuple[dict[str, str], object]:
    """The environment and the pre-exec hook of every measured process."""
    env = dict(os.environ)
    if pin is not None:
        threads = 1
    if threads:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    return env, (lambda: os.sched_setaffinity(0, {pin})) if pin is not None else None


def timed(command: list[str], env: dict[str, str], preexec) -> tuple[float, str]:
    """Seconds of the whole process, and what it printed."""
    start = time.perf_counter()
    out = subprocess.run(command, capture_output=True, text=True, env=env, preexec_fn=preexec, cwd=ROOT, check=False)
    seconds = time.perf_counter() - start
    if out.returncode != 0:
        raise SystemExit(f"{' '.join(map(str, command))} failed (exit {out.returncode}):\n{out.stderr[-2000:]}")
    return seconds, out.stdout


def run_trainer(config: str, overrides: list[str], max_steps: int | None, run_dir: Path, env, preexec) -> dict:
    trainer = Path(sys.executable).with_name("trainer")  # not a shim in front of it
    steps = [f"train.max_steps={max_steps}"] if max_steps is not None else []
    yaml = ROOT / "configs" / f"{config}.yaml"
    command = [str(trainer), "run", str(yaml), "--quiet", "--run-dir", str(run_dir), *overrides, *steps]
    seconds, _ = timed(command, env, preexec)
    summary = json.loads((run_dir / "summary.json").read_text())
    return {"process": seconds, "loop": summary["train_time_s"], "steps": summary["steps"]}


def run_twin(config: str, max_steps: int | None, env, preexec) -> dict:
    steps = ["--max-steps", str(max_steps)] if max_steps is not None else []
    seconds, printed = timed([sys.executable, str(TWINS_SCRIPT), config, *steps], env, preexec)
    result = json.loads(printed.strip().splitlines()[-1])
    return {"process": seconds, "loop": result["seconds"], "steps": result["steps"]}


def overrides_for(config: str, overrides: list[str]) -> list[str]:
    """The overrides that apply to `config`: KEY=VALUE, and CONFIG:KEY=VALUE for this config."""
    picked = []
    for override in overrides:
        prefix, sep, rest = override.partition(":")
        if not sep or "=" in prefix:
            picked.append(override)
        elif prefix == config:
            picked.append(rest)
    return picked


def ratio(results: list[dict], key: str) -> float:
    """The median over rounds of the twin's seconds over trainer's (train_time_s has 4 decimals: a
    one-step loop may read 0)."""
    return statistics.median(r["twin"][key] / max(r["trainer"][key], 5e-5) for r in results)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("overrides", nargs="*", metavar="[CONFIG:]KEY=VALUE", help="overrides for trainer's side")
    parser.add_argument("--configs", default=",".join(TWINS), help=f"comma-separated, of: {', '.join(TWINS)}")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--max-steps", type=int, default=None, help="cut every run short (train.max_steps; the twins' --max-steps)")
    parser.add_argument("--no-one-step", dest="one_step", action="store_false", help="leave out the one-step pair")
    parser.add_argument("--threads", type=int, default=0, help="OMP_NUM_THREADS of both sides (default: torch's)")
    parser.add_argument("--pin", type=int, default=None, metavar="CPU", help="run both sides on this one CPU, one thread (Linux)")
    args = parser.parse_args()
    configs = args.configs.split(",")
    unknown = [c for c in configs if c not in TWINS]
    if unknown:
        parser.error(f"no twin for {', '.join(unknown)}; there are: {', '.join(TWINS)}")

    import torch

    env, preexec = environment(args.threads, args.pin)
    threads = env.get("OMP_NUM_THREADS", f"torch's default ({torch.get_num_threads()})")
    pinned = f", pinned to CPU {args.pin}" if args.pin is not None else ""
    cut = f", max {args.max_steps} steps" if args.max_steps is not None else ""
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, threads {threads}{pinned}; {args.rounds} rounds{cut}"
          + (f"; trainer overrides: {' '.join(args.overrides)}" if args.overrides else ""))  # fmt: skip

    # (row name, config, overrides, max_steps)
    rows = [(c, c, overrides_for(c, args.overrides), args.max_steps) for c in configs]
    if args.one_step:
        rows.append((f"{ONE_STEP}, 1 step", ONE_STEP, overrides_for(ONE_STEP, args.overrides), 1))
    results: dict[str, list[dict]] = {row[0]: [] for row in rows}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for i, (name, config, overrides, max_steps) in enumerate(rows):
                measured = {}
                for side in SIDES if (r + i) % 2 == 0 else reversed(SIDES):  # alternate who goes first
                    if side == "trainer":
                        run_dir = Path(tmp) / f"{config}-{r}-{i}"
                        measured[side] = run_trainer(config, overrides, max_steps, run_dir, env, preexec)
                    else:
                        measured[side] = run_twin(config, max_steps, env, preexec)
                if measured["trainer"]["steps"] != measured["twin"]["steps"]:
                    raise SystemExit(
                        f"{name}: trainer took {measured['trainer']['steps']} steps and its twin {measured['twin']['steps']}; "
                        f"configs/{config}.yaml and twins.{config} differ (an override can bring them in line)"
                    )
                results[name].append(measured)
            print(f"  round {r + 1}/{args.rounds} done", file=sys.stderr)

    print("\n| config | steps | trainer process s | twin process s | process vs twin | trainer loop s | twin loop s | loop vs twin |")
    print("|---|---|---|---|---|---|---|---|")
    for name, runs in results.items():
        med = {(side, key): statistics.median(run[side][key] for run in runs) for side in SIDES for key in ("process", "loop")}
        print(f"| {name} | {runs[0]['twin']['steps']} | {med['trainer', 'process']:.3f} | {med['twin', 'process']:.3f} | "
              f"{ratio(runs, 'process'):.2f}x | {med['trainer', 'loop']:.4f} | {med['twin', 'loop']:.4f} | {ratio(runs, 'loop'):.2f}x |")  # fmt: skip


if __name__ == "__main__":
    main()
