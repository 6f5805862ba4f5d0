"""Data-parallel training: one process per device, started by torchrun (torch.distributed.run).

`torchrun --nproc_per_node N -m trainer run CONFIG` starts N copies of `trainer run`; each reads
its rank from the environment torchrun sets (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT),
joins the process group (gloo on CPU, nccl on CUDA), trains a DistributedDataParallel model on
its shard of every epoch, and only rank 0 writes the run folder. `trainer run CONFIG --nproc N`
runs that same torchrun command for one machine (`launch`).

Collectives happen at log points, epoch ends and checkpoint saves only, never per step beyond
DDP's own gradient all-reduce.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

from trainer.errors import UsageError, as_stop, stop_signals

# how long a collective may wait for a rank before the job fails; a dead rank is noticed by
# torchrun at once, this only bounds a rank that hangs
TIMEOUT = timedelta(minutes=5)

# seconds torchrun waits after passing on a signal (or after a rank died) before it kills the
# processes: they stop at the next log point, so `train.log_every` steps must fit in it for the
# save to happen; it also bounds how long a rank stuck in a collective outlives a dead one
SHUTDOWN_TIMEOUT = 50

# the exit code of rank 0, passed back to `trainer run --nproc`, which torchrun would flatten to 1
RESULT_FILE = "TRAINER_RESULT_FILE"


@dataclass(frozen=True)
class Distributed:
    """This process's place in a data-parallel job."""

    rank: int  # global: 0 is the one process that writes the run folder and prints
    world_size: int
    local_rank: int  # on this machine: picks the GPU
    nodes: int = 1  # machines (torchrun agents) in the job

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def sum(self, tensor: Any) -> Any:
        """Sum `tensor` over all ranks, in place; returns it."""
        import torch.distributed as dist

        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def max(self, tensor: Any) -> Any:
        """Maximum of `tensor` over all ranks, in place; returns it."""
        import torch.distributed as dist

        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
        return tensor

    def sync_buffers(self, model: Any) -> None:
        """Give every rank rank 0's buffers (BatchNorm's running stats, say).

        DDP copies them from rank 0 at the start of each training forward, then each rank updates
        its copy from its own batch, so after a step they differ; validation and the end of a run
        must see one set.
        """
        import torch.distributed as dist

        for buffer in model.buffers():
            dist.broadcast(buffer, src=0)

    def broadcast(self, value: Any) -> Any:
        """Rank 0's `value` on every rank (any picklable object)."""
        import torch.distributed as dist

        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def all_gather(self, value: Any) -> list[Any]:
        """Every rank's `value` (any picklable object), as a list on every rank."""
        import torch.distributed as dist

        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, value)
        return out

    def gather(self, value: Any) -> list[Any] | None:
        """Every rank's `value` as a list on rank 0 (None elsewhere)."""
        import torch.distributed as dist

        out: list[Any] | None = [None] * self.world_size if self.is_main else None
        dist.gather_object(value, out, dst=0)
        return out


def from_environment() -> Distributed | None:
    """This process's rank when torchrun started it as one of several, else None."""
    try:
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local_rank = int(os.environ.get("LOCAL_RANK", str(rank)))
    except ValueError:
        raise UsageError(
            f"WORLD_SIZE, RANK and LOCAL_RANK must be integers (set by torchrun), got "
            f"{os.environ.get('WORLD_SIZE')!r}, {os.environ.get('RANK')!r}, {os.environ.get('LOCAL_RANK')!r}"
        ) from None
    if world_size <= 1:
        return None
    if not 0 <= rank < world_size:
        raise UsageError(f"RANK {rank} is outside 0..{world_size - 1} (WORLD_SIZE {world_size})")
    nodes = os.environ.get("GROUP_WORLD_SIZE", "1")  # torchrun's number of agents; only said, never relied on
    return Distributed(rank=rank, world_size=world_size, local_rank=local_rank, nodes=int(nodes) if nodes.isdigit() else 1)


def rank_device(requested: str, dist: Distributed) -> str:
    """The device of this rank: one GPU per local rank on CUDA, else the CPU."""
    import torch

    if requested == "auto":
        return f"cuda:{dist.local_rank}" if torch.cuda.is_available() else "cpu"
    if requested == "cuda":
        return f"cuda:{dist.local_rank}"
    if requested.startswith("cuda:"):
        raise UsageError(
            f"'{requested}' names one GPU, and a data-parallel run uses one GPU per process (cuda:LOCAL_RANK); "
            "set device: cuda (or auto)",
            key="device",
        )
    if requested == "mps":
        raise UsageError("data-parallel training does not run on mps; use device: cpu, cuda or auto", key="device")
    return requested


def join(dist: Distributed, device: Any) -> None:
    """Join the process group: nccl for CUDA devices, gloo otherwise."""
    import torch
    import torch.distributed as tdist

    if tdist.is_initialized():
        return
    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    try:
        tdist.init_process_group(backend=backend, rank=dist.rank, world_size=dist.world_size, timeout=TIMEOUT)
    except (RuntimeError, ValueError) as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise UsageError(
            f"cannot join the {dist.world_size}-process group as rank {dist.rank} ({backend}, "
            f"MASTER_ADDR={os.environ.get('MASTER_ADDR')}, MASTER_PORT={os.environ.get('MASTER_PORT')}): {first}"
        ) from None


def leave() -> None:
    """Leave the process group, if this process joined one."""
    import torch.distributed as tdist

    if tdist.is_available() and tdist.is_initialized():
        tdist.destroy_process_group()


def lost_peer(err: BaseException) -> bool:
    """Whether `err` is a collective that failed because another rank is gone or broken."""
    import torch.distributed as tdist

    text = str(err)
    return isinstance(err, getattr(tdist, "DistError", ())) or "gloo" in text or "NCCL" in text


def wrap(model: Any, device: Any) -> Any:
    """`model` in DistributedDataParallel (it shares the parameters; checkpoints save `model`)."""
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


# ---------------------------------------------------------------------------------------------
# trainer run --nproc N


def _free_port() -> int:
    """A loopback port that is free now, for torchrun to bind a second later.

    Drawn below the kernel's ephemeral range: the outgoing connections of other processes (another
    run's gloo sockets) are given ports from that range, and one could take the port in between.
    """
    import random

    try:
        ephemeral_low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        ephemeral_low = 0
    draw = random.SystemRandom().randrange  # not the global RNG: a run's seed owns that
    candidates = [draw(10000, ephemeral_low) for _ in range(20)] if ephemeral_low > 11000 else []
    for port in candidates:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))  # the kernel picks one, from the ephemeral range
        return s.getsockname()[1]


def launch_command(nproc: int, trainer_args: list[str], port: int) -> list[str]:
    """The command `trainer run ... --nproc N` runs: torch.distributed.run (torchrun) starting N
    processes on this machine, over loopback, each running `python -m trainer <trainer_args>`."""
    return [
        sys.executable, "-m", "trainer.distributed",
        "--nnodes", "1", "--nproc_per_node", str(nproc),
        "--master_addr", "127.0.0.1", "--master_port", str(port),
        "--shutdown_timeout", str(SHUTDOWN_TIMEOUT),
        "-m", "trainer", *trainer_args,
    ]  # fmt: skip


def launch(nproc: int, trainer_args: list[str]) -> int:
    """Run `trainer <trainer_args>` in `nproc` processes through torch.distributed.run; its exit code.

    The exit code is rank 0's (torchrun reports any failure as 1); 1 when rank 0 never reported
    one (it was killed). SIGINT, SIGTERM and SIGHUP (as SIGTERM) are passed on to torchrun, which
    passes them to every rank; the ranks agree to stop after the same step, rank 0 saves last.pt,
    and all exit with 130 or 143. torchrun runs in a session of its own, so a Ctrl-C in the
    terminal reaches it once, through this process.
    """
    env = dict(os.environ)
    env.setdefault("MASTER_ADDR", "127.0.0.1")
    if sys.platform.startswith("linux"):
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")  # one machine: gloo talks over loopback only
    # torchrun would set 1 and print a banner about it; share the cores instead
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    with tempfile.TemporaryDirectory(prefix="trainer-") as tmp:
        result_file = Path(tmp) / "exit_code"
        env[RESULT_FILE] = str(result_file)
        process = subprocess.Popen(launch_command(nproc, trainer_args, _free_port()), env=env, start_new_session=True)
        received: list[int] = []

        def forward(signum: int, frame: Any) -> None:
            # a closed terminal (SIGHUP) must not leave the job running in its own session
            signum = as_stop(signum)
            received.append(signum)
            process.send_signal(signum)

        previous = {s: signal.signal(s, forward) for s in stop_signals()}  # SIGHUP left alone under nohup
        try:
            code = process.wait()
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
        try:
            return int(result_file.read_text())
        except (OSError, ValueError):
            pass
    if code != 0 and received:
        print("error: the processes were stopped before rank 0 could save and report", file=sys.stderr)
    return 0 if code == 0 else 1


def _torchrun(argv: list[str]) -> int:
    """torch.distributed.run's main, reporting a failed rank in one line instead of a traceback."""
    import logging

    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun_main

    for name in list(logging.Logger.manager.loggerDict):
        if name.startswith("torch.distributed"):
            logging.getLogger(name).setLevel(logging.CRITICAL)  # its one-line failure log is replaced below
    try:
        torchrun_main(argv)
    except ChildFailedError as err:
        reported = os.environ.get(RESULT_FILE) and Path(os.environ[RESULT_FILE]).exists()
        if not reported:  # rank 0 did not get to say why: say which rank ended first, and how
            rank, failure = err.get_first_failure()
            others = "; the other processes were stopped" if len(err.failures) > 1 or failure.local_rank else ""
            print(f"error: process rank {rank} (pid {failure.pid}) {_how(failure.exitcode)}{others}", file=sys.stderr)
        return 1
    except SignalException as err:
        return 128 + int(err.sigval)
    return 0


def _how(exitcode: int) -> str:
    if exitcode < 0:
        try:
            return f"was killed by {signal.Signals(-exitcode).name}"
        except ValueError:
            return f"was killed by signal {-exitcode}"
    return f"exited with code {exitcode}"


def started_by_nproc() -> bool:
    """Whether `trainer run --nproc` started this process (not torchrun run by hand)."""
    return bool(os.environ.get(RESULT_FILE))


def record_exit_code(code: int) -> None:
    """Rank 0 tells `trainer run --nproc` its exit code (a no-op outside it)."""
    path = os.environ.get(RESULT_FILE)
    if path and os.environ.get("RANK", "0") == "0":
        try:
            Path(path).write_text(str(code))
        except OSError:
            pass


if __name__ == "__main__":  # what `trainer run --nproc N` starts: torchrun, with one-line failures
    raise SystemExit(_torchrun(sys.argv[1:]))
