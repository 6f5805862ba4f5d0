"""What do TensorBoard's pictures cost? Each picture alone, then whole runs with pictures on and off.

    python benchmarks/pictures.py                     # lenet.yaml and mlp.yaml, 5 rounds
    python benchmarks/pictures.py --rounds 7 --pin 1  # each run on CPU 1, one thread

1. Each picture drawn on its own in this process (median of 30 after one warm-up): the confusion
   matrix and the misclassified grid as LeNet-5 on the digits draws them, the predictions of
   mlp.yaml (100 values), LeNet-5's weight and gradient histograms and its graph; in
   milliseconds and as a share of a LeNet-5 epoch (the median epoch of the `off` runs below).
2. Whole runs, each in a fresh process, `train.pictures` on and off alternating within each round:
   configs/lenet.yaml (10 epochs of 23 steps) and configs/mlp.yaml (500 epochs of one step, where
   the cadence must keep pictures rare). Prints the median seconds of the training loop
   (summary.json's train_time_s), on/off (the median of each round's own ratio), the epochs
   pictures were drawn at, and the seconds the `on` runs spent in the pictures' hooks (observer,
   its per-batch callback, validated, finish: every picture, the graph, Pillow's import), timed
   inside the run. On a busy machine the on/off ratio is mostly noise between processes; the
   time spent in the hooks is not.
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

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
VARIANTS = ["on", "off"]


def child(config_path: Path, pictures: bool, pin: int | None) -> None:
    """One run in this process; prints its training seconds, epochs and drawings as one JSON line."""
    import torch
    from rich.console import Console

    from trainer.config import load_config
    from trainer.runs import execute_run

    if pin is not None:
        os.sched_setaffinity(0, {pin})
    torch.set_num_threads(1)
    spent = time_the_hooks()
    config = load_config(config_path, [f"train.pictures={str(pictures).lower()}"])
    with tempfile.TemporaryDirectory() as tmp, open(os.devnull, "w") as devnull:
        result = execute_run(config, root=Path(tmp), console=Console(file=devnull, force_terminal=False))
        assert result.status == "completed", result.error
        drawn = drawings(result.run_dir)
    summary = result.summary
    print(json.dumps({"seconds": summary["train_time_s"], "epochs": summary["epochs"], "drawn": drawn, "hooks": spent[0]}))


def time_the_hooks() -> list[float]:
    """Wrap the loop's entry points into trainer.tracking.Pictures (none calls another) with a
    clock; returns the list whose one number they add their seconds to."""
    from trainer.tracking import Pictures

    spent = [0.0]

    def timed(method):
        def wrapper(*args, **kwargs):
            started = time.perf_counter()
            try:
                return method(*args, **kwargs)
            finally:
                spent[0] += time.perf_counter() - started

        return wrapper

    for name in ("observer", "_observe", "validated", "finish"):
        setattr(Pictures, name, timed(getattr(Pictures, name)))
    return spent


def drawings(run_dir: Path) -> int:
    """How many epochs a run drew its pictures at (its images' steps)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir), size_guidance={"images": 0})
    events.Reload()
    return len({e.step for tag in events.Tags()["images"] for e in events.Images(tag)})


def measure(config: Path, variant: str, pin: int | None) -> dict:
    pinning = ["--pin", str(pin)] if pin is not None else []
    out = subprocess.run(
        [sys.executable, __file__, "--child", variant, "--config", str(config), *pinning],
        capture_output=True, text=True, check=False, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    if out.returncode != 0:
        raise SystemExit(f"{config.name} with pictures {variant} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def median_ms(draw, repeats: int = 30) -> float:
    draw()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        draw()
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1000


def each_picture(pin: int | None) -> dict[str, float]:
    """Milliseconds of each picture alone, drawn from a trained LeNet-5's validation."""
    import numpy as np
    import torch

    from trainer import pictures
    from trainer.build import build_run
    from trainer.config import load_config
    from trainer.models import LeNet

    if pin is not None:
        os.sched_setaffinity(0, {pin})
    torch.set_num_threads(1)
    pictures.warm_up()
    rng = np.random.default_rng(0)
    counts = np.diag(rng.integers(29, 52, 10)) + (rng.random((10, 10)) < 0.06)  # 359 samples, ~8 mistakes
    names = [str(d) for d in range(10)]
    built = build_run(load_config(CONFIGS / "lenet.yaml", []))
    images = next(iter(built.val_batches.epoch(0)))[0][:8].float().numpy()
    captions = [("true: 3", "pred: 8 (97%)")] * len(images)
    targets = rng.normal(size=(1, 100))
    model = LeNet(num_classes=10)
    model(torch.zeros(2, 1, 32, 32)).sum().backward()  # gradients for the histograms
    example = torch.zeros(1, 1, 32, 32)

    def histograms() -> None:
        for _, p in model.named_parameters():
            pictures.histogram(p)
            pictures.histogram(p.grad)

    return {
        "confusion matrix (10 classes)": median_ms(lambda: pictures.confusion_matrix(counts, names, title="confusion matrix, epoch 10 (step 230): 351 of 359 right (97.8%)")),
        "misclassified (8 digits)": median_ms(lambda: pictures.image_grid(images, captions, title="misclassified, epoch 10: all 8, the most confident first")),
        "predictions (100 values)": median_ms(lambda: pictures.predictions_plot(targets * 0.5 + 0.3, targets, title="predictions against targets, epoch 500: 1 training sample")),
        "histograms (LeNet-5, 10 tensors x 2)": median_ms(histograms),
        "graph (LeNet-5, torch.fx; once a run)": median_ms(lambda: pictures.model_graph(model.eval(), example), repeats=10),
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--configs", default="lenet,mlp", help="comma-separated names in configs/")
    parser.add_argument("--pin", type=int, default=None, metavar="CPU", help="run everything on this one CPU, one thread (Linux)")
    parser.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--config", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.config, args.child == "on", args.pin)
        return

    configs = [CONFIGS / f"{name}.yaml" for name in args.configs.split(",")]
    results: dict[str, dict[str, list[dict]]] = {c.stem: {v: [] for v in VARIANTS} for c in configs}
    for r in range(args.rounds):
        for config in configs:
            for variant in VARIANTS if r % 2 == 0 else VARIANTS[::-1]:  # alternate which goes first
                results[config.stem][variant].append(measure(config, variant, args.pin))
        print(f"  round {r + 1}/{args.rounds} done", file=sys.stderr)

    epoch_ms = None
    print(f"\nwhole runs, {args.rounds} rounds" + (f", pinned to CPU {args.pin}" if args.pin is not None else ""))
    print("\n| config | epochs | on: loop s | off: loop s | on vs off | drawn at (epochs) | in the hooks s | hooks' share of the on loop |")
    print("|---|---|---|---|---|---|---|---|")
    for name, runs in results.items():
        on, off = [r["seconds"] for r in runs["on"]], [r["seconds"] for r in runs["off"]]
        epochs = runs["off"][0]["epochs"]
        drawn = statistics.median(r["drawn"] for r in runs["on"])
        ratio = statistics.median(a / b for a, b in zip(on, off))
        hooks = statistics.median(r["hooks"] for r in runs["on"])
        share = statistics.median(r["hooks"] / r["seconds"] for r in runs["on"])
        print(f"| {name} | {epochs} | {statistics.median(on):.3f} | {statistics.median(off):.3f} | {ratio:.3f}x | {drawn:g} | {hooks:.3f} | {share:.1%} |")
        if name == "lenet":
            epoch_ms = statistics.median(off) / epochs * 1000

    print("\n| picture | ms (median of 30) |" + (" share of a LeNet-5 epoch |" if epoch_ms else ""))
    print("|---|---|" + ("---|" if epoch_ms else ""))
    for picture, ms in each_picture(args.pin).items():
        share = f" {ms / epoch_ms:.1%} |" if epoch_ms else ""
        print(f"| {picture} | {ms:.2f} |{share}")
    if epoch_ms:
        print(f"\na LeNet-5 epoch (the `off` runs' median loop over 10 epochs): {epoch_ms:.0f} ms")


if __name__ == "__main__":
    main()
