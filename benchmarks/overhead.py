"""How much does `trainer` cost next to a hand-written loop?

    python benchmarks/overhead.py                  # 5 rounds, 2000 steps, all models: a few minutes
    python benchmarks/overhead.py --rounds 9 --steps 4000 --models lenet
    python benchmarks/overhead.py --pin 1          # each run on CPU 1 with one thread: less noise

Trains the same model on the same in-memory data with the same seed, alternating the variants in
every round (each run in a fresh process, so one variant's memory or warm caches do not help the next):

  slicing     a hand-written loop that slices batches from tensors with a seeded permutation
  dataloader  a hand-written loop over DataLoader(TensorDataset)
  trainer     `trainer` with its console (plain mode, to /dev/null) and TensorBoard on, log_every 10
  quiet       `trainer` with console and TensorBoard off
  lightning   PyTorch Lightning with its TensorBoard logger and progress bar, when it is installed

and prints the median steps/s of the training loop, the spread (min-max over rounds), the ratio
to `slicing`, and the peak resident memory of the process. The ratios are medians of each round's
own ratio (a variant against the slicing loop of the same round): this VM's speed drifts by tens
of percent within minutes, and pairing runs that are seconds apart takes most of that out. Then it times `trainer --help`, a
one-step `trainer run` and `python -c "import torch"` as whole commands, alternating, and prints
their medians. Models, at batch 64: linear regression (1 -> 1), an MLP 784-128-10, LeNet-5.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from loops import bare_loop, slices  # noqa: E402,F401  (epochs.py and instructions.py import them from here)

BATCH = 64
MODELS = {
    # name: (trainer model config, input shape, classes or None for regression)
    "linreg": ({"name": "linear_regression"}, (1,), None),
    "mlp": ({"name": "mlp", "hidden": 128}, (784,), 10),
    "lenet": ({"name": "lenet"}, (1, 32, 32), 10),
}
VARIANTS = ["slicing", "dataloader", "trainer", "quiet", "lightning"]
SAMPLES = 64 * 250  # 250 steps per epoch
IMPORT_TORCH, ONE_STEP_LOOP = "python -c 'import torch'", "hand-written loop (one step)"


def make_data(model: str, seed: int = 0):
    import torch

    _, shape, classes = MODELS[model]
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(SAMPLES, *shape, generator=g)
    y = torch.randint(classes, (SAMPLES,), generator=g) if classes else torch.randn(SAMPLES, 1, generator=g)
    return x, y


def build_model(model: str):
    from trainer.models import MODELS as REGISTRY

    config, _, classes = MODELS[model]
    kwargs = {k: v for k, v in config.items() if k != "name"}
    if model == "mlp":
        kwargs.update(in_features=784, out_features=10)
    return REGISTRY.build(config["name"], **kwargs)


def loss_for(model: str):
    import torch

    return torch.nn.CrossEntropyLoss() if MODELS[model][2] else torch.nn.MSELoss()


# ---------------------------------------------------------------------------------------------
# the variants: each returns the seconds its training loop took for `steps` optimizer steps


def hand_loop(model: str, steps: int, epoch_batches, clock=time.perf_counter) -> float:
    """The forty-line loop of the tutorials; `epoch_batches(x, y, epoch)` yields its batches.
    `clock()` is called where the loop starts and where it ends (instructions.py counts between)."""
    import torch

    torch.manual_seed(0)
    x, y = make_data(model)
    net, loss_fn = build_model(model), loss_for(model)
    opt = torch.optim.SGD(net.parameters(), lr=0.01)
    return bare_loop(net, loss_fn, opt, steps, lambda epoch: epoch_batches(x, y, epoch), clock)


def run_slicing(model: str, steps: int) -> float:
    return hand_loop(model, steps, slices)


def run_dataloader(model: str, steps: int) -> float:
    from torch.utils.data import DataLoader, TensorDataset

    loaders = {}

    def batches(x, y, epoch):
        # one loader for the run, as a hand-written loop would make it
        loader = loaders.setdefault("loader", DataLoader(TensorDataset(x, y), batch_size=BATCH, shuffle=True))
        return iter(loader)

    return hand_loop(model, steps, batches)


def trainer_config(model: str, steps: int):
    """The `trainer` config of the same model, data, loss and optimizer as the hand-written loops."""
    from trainer.config import config_from_dict

    config, shape, classes = MODELS[model]
    data = {"name": "random", "size": SAMPLES, "input_shape": list(shape), "batch_size": BATCH, "val_fraction": 0}
    data.update({"num_classes": classes} if classes else {"target_shape": [1]})
    return config_from_dict(
        {
            "name": f"bench-{model}",
            "model": config,
            "data": data,
            "loss": {"name": "cross_entropy" if classes else "mse"},
            "optimizer": {"name": "sgd", "lr": 0.01},
            "train": {"max_steps": steps},
        }
    )


def run_trainer(model: str, steps: int, *, quiet: bool) -> float:
    return run_config(trainer_config(model, steps), quiet=quiet)[0]


def run_config(config, *, quiet: bool = False, saves: bool = True) -> tuple[float, int]:
    """`trainer run` of `config` in a temporary folder, its console (plain) to /dev/null; `quiet`
    turns console and TensorBoard off. Returns the seconds of training and the number of
    checkpoint files left. `saves=False` leaves the checkpoint saves out (not a user option: it
    shows what they cost)."""
    from rich.console import Console

    import trainer.checkpoint
    import trainer.runs
    from trainer.runs import execute_run

    # in trainer.checkpoint since the runs.py split; in trainer.runs before it
    checkpoints = getattr(trainer.runs, "Checkpoints", None) or trainer.checkpoint.Checkpoints
    save = checkpoints.save
    if not saves:
        checkpoints.save = lambda self, state, best=False: None
    try:
        with tempfile.TemporaryDirectory() as tmp, open(os.devnull, "w") as devnull:
            console = Console(file=devnull, force_terminal=False)
            result = execute_run(config, root=Path(tmp), quiet=quiet, tensorboard=not quiet, console=console)
            saved = len(list(result.run_dir.glob("checkpoints/*.pt")))
    finally:
        checkpoints.save = save
    assert result.status == "completed", result.error
    return result.summary["train_time_s"], saved


def run_lightning(model: str, steps: int) -> float:
    import lightning as L  # noqa: N812
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    torch.manual_seed(0)
    x, y = make_data(model)
    net, loss_fn = build_model(model), loss_for(model)

    class Module(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = net

        def training_step(self, batch, batch_idx):
            xb, yb = batch
            loss = loss_fn(self.net(xb), yb)
            self.log("train_loss", loss, prog_bar=True)
            return loss

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)

    with tempfile.TemporaryDirectory() as tmp:
        trainer = L.Trainer(max_steps=steps, accelerator="cpu", devices=1, default_root_dir=tmp,
                            enable_checkpointing=False, log_every_n_steps=10)  # fmt: skip
        loader = DataLoader(TensorDataset(x, y), batch_size=BATCH, shuffle=True)
        start = time.perf_counter()
        trainer.fit(Module(), loader)
        return time.perf_counter() - start


def child(variant: str, model: str, steps: int, threads: int | None, pin: int | None) -> None:
    """One measured run in this process; prints one JSON line."""
    import torch

    if pin is not None:
        os.sched_setaffinity(0, {pin})  # one core, one thread: the steadiest numbers a shared VM gives
        threads = 1
    if threads:
        torch.set_num_threads(threads)
    runner = {
        "slicing": lambda: run_slicing(model, steps),
        "dataloader": lambda: run_dataloader(model, steps),
        "trainer": lambda: run_trainer(model, steps, quiet=False),
        "quiet": lambda: run_trainer(model, steps, quiet=True),
        "lightning": lambda: run_lightning(model, steps),
    }[variant]
    seconds = runner()
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"steps_per_s": steps / seconds, "peak_mb": peak_mb}))


# ---------------------------------------------------------------------------------------------
# the driver


def lightning_installed() -> bool:
    try:
        import lightning  # noqa: F401
    except ImportError:
        return False
    return True


def measure(variant: str, model: str, steps: int, threads: int | None, pin: int | None) -> dict:
    pinning = ["--pin", str(pin)] if pin is not None else []
    out = subprocess.run(
        [sys.executable, __file__, "--child", variant, model, "--steps", str(steps), "--threads", str(threads or 0), *pinning],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    if out.returncode != 0:
        raise SystemExit(f"{variant} on {model} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def time_command(args: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(args, capture_output=True, check=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--threads", type=int, default=0, help="torch threads per run (default: torch's)")
    parser.add_argument("--pin", type=int, default=None, metavar="CPU", help="run each variant on this one CPU, one thread (Linux)")
    parser.add_argument("--child", nargs=2, metavar=("VARIANT", "MODEL"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child[0], args.child[1], args.steps, args.threads, args.pin)
        return

    import torch

    variants = [v for v in VARIANTS if v != "lightning" or lightning_installed()]
    threads = 1 if args.pin is not None else args.threads or torch.get_num_threads()
    pinned = f" pinned to CPU {args.pin}" if args.pin is not None else ""
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, threads {threads}{pinned}; "
          f"{args.rounds} rounds x {args.steps} steps, batch {BATCH}; lightning: "
          f"{'yes' if 'lightning' in variants else 'not installed'}")  # fmt: skip
    models = args.models.split(",")
    results: dict[tuple[str, str], list[dict]] = {}
    for r in range(args.rounds):
        for model in models:
            order = variants[r % len(variants) :] + variants[: r % len(variants)]  # rotate the order each round
            for variant in order:
                results.setdefault((model, variant), []).append(measure(variant, model, args.steps, args.threads, args.pin))
        print(f"  round {r + 1}/{args.rounds} done", file=sys.stderr)

    def paired(model: str, variant: str, base: str) -> float:
        """The median over rounds of variant's steps/s over base's in the same round."""
        a, b = results[(model, variant)], results[(model, base)]
        return statistics.median(x["steps_per_s"] / y["steps_per_s"] for x, y in zip(a, b))

    print(f"\n| model | variant | steps/s (median) | spread (min-max) | vs slicing | peak MB |")
    print("|---|---|---|---|---|---|")
    for model in models:
        for variant in variants:
            runs = results[(model, variant)]
            rates = [m["steps_per_s"] for m in runs]
            peak = statistics.median(m["peak_mb"] for m in runs)
            print(f"| {model} | {variant} | {statistics.median(rates):,.0f} | {min(rates):,.0f}-{max(rates):,.0f} | "
                  f"{paired(model, variant, 'slicing'):.3f}x | {peak:,.0f} |")  # fmt: skip
    print("\n| model | trainer / quiet (console and TensorBoard on vs off) | trainer / lightning |")
    print("|---|---|---|")
    for model in models:
        vs_lightning = f"{paired(model, 'trainer', 'lightning'):.2f}x" if "lightning" in variants else "-"
        print(f"| {model} | {paired(model, 'trainer', 'quiet'):.3f} | {vs_lightning} |")

    # start-up, as whole commands
    trainer_exe = str(Path(sys.executable).with_name("trainer"))
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "one_step.yaml"
        config.write_text(
            "model: {name: linear_regression}\n"
            "data: {name: random, size: 64, input_shape: [1], target_shape: [1], val_fraction: 0}\n"
            "loss: {name: mse}\noptimizer: {name: sgd}\ntrain: {max_steps: 1}\n"
        )
        # the floor for a one-step run: torch.optim imports torch._dynamo on the first step (~0.9 s)
        one_step_loop = (
            "import torch\n"
            "m = torch.nn.Linear(1, 1); o = torch.optim.SGD(m.parameters(), lr=0.01)\n"
            "torch.nn.functional.mse_loss(m(torch.randn(64, 1)), torch.randn(64, 1)).backward(); o.step()\n"
        )
        commands = {
            IMPORT_TORCH: [sys.executable, "-c", "import torch"],
            ONE_STEP_LOOP: [sys.executable, "-c", one_step_loop],
            "trainer --help": [trainer_exe, "--help"],
            "trainer run (one step)": [trainer_exe, "run", str(config), "-q", "--runs-root", str(Path(tmp) / "runs")],
        }
        times: dict[str, list[float]] = {name: [] for name in commands}
        for _ in range(args.rounds):
            for name, command in commands.items():
                times[name].append(time_command(command))
    def paired_time(name: str, base: str) -> float:
        return statistics.median(a / b for a, b in zip(times[name], times[base]))

    print("\n| command | seconds (median) | vs import torch | vs the one-step loop |")
    print("|---|---|---|---|")
    for name, values in times.items():
        vs_torch, vs_loop = paired_time(name, IMPORT_TORCH), paired_time(name, ONE_STEP_LOOP)
        print(f"| `{name}` | {statistics.median(values):.3f} | {vs_torch:.2f}x | {vs_loop:.2f}x |")


if __name__ == "__main__":
    main()
