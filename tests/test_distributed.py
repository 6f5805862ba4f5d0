"""Data-parallel runs: real `trainer run --nproc 2` and real torchrun processes, gloo over loopback.

Every process here talks over loopback only (MASTER_ADDR and GLOO_SOCKET_IFNAME=lo). Two torchrun
agents with their own working folders and loopback addresses stand for two machines.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
import torch

from conftest import start_run
from trainer.checkpoint import state_digest
from trainer.distributed import Distributed, from_environment, launch_command, rank_device
from trainer.distributed import _free_port as free_port  # the port --nproc gives torchrun
from trainer.errors import UsageError

# loopback only; one thread a process: a run's two processes share CI's two cores with the other
# xdist worker, where more threads only wait for each other
LOOPBACK = {"MASTER_ADDR": "127.0.0.1", "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1"}

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch built without torch.distributed")


def classification(model: dict, input_shape: list[int], *, size=128, batch_size=16, epochs=2, **train) -> dict:
    return {
        "name": "ddp",
        "model": model,
        "data": {"name": "random", "size": size, "input_shape": input_shape, "num_classes": 3,
                 "batch_size": batch_size, "val_fraction": 0.25},
        "loss": {"name": "cross_entropy"},
        "optimizer": {"name": "sgd", "lr": 0.05, "momentum": 0.9},
        "train": {"epochs": epochs, "log_every": 1, **train},
    }  # fmt: skip


MLP = ({"name": "mlp", "hidden": 16}, [8])
LENET = ({"name": "lenet", "num_classes": 3}, [1, 32, 32])


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def points(folder: Path) -> list[dict]:
    """metrics.jsonl without what depends on the clock."""
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in row.items() if k not in ("time", "samples_per_s")} for row in rows]


def test_the_launch_port_is_free_and_outside_the_ephemeral_range():
    # ports the kernel hands to outgoing connections (another run's gloo sockets) are drawn from
    # the ephemeral range: a port picked there could be taken before torchrun binds it
    import random
    import socket

    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    state = random.getstate()
    ports = [free_port() for _ in range(20)]
    assert random.getstate() == state  # the run's seeded RNG is not drawn from
    assert all(10000 <= port < low for port in ports)
    with socket.socket() as s:
        s.bind(("127.0.0.1", ports[0]))  # still free


def test_without_the_ephemeral_range_the_kernel_picks_the_port(monkeypatch):
    # no /proc (not Linux) or an unreadable range: port 0, a port the kernel knows is free
    import socket

    real_read_text = Path.read_text

    def no_proc(self, *args, **kwargs):
        if str(self).startswith("/proc/"):
            raise FileNotFoundError(self)
        return real_read_text(self, *args, **kwargs)

    monkeypatch.setattr(Path, "read_text", no_proc)
    port = free_port()
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))  # it is free
    low, high = (int(v) for v in real_read_text(Path("/proc/sys/net/ipv4/ip_local_port_range")).split())
    assert low <= port <= high  # the kernel's own choice, not one drawn below the range


# ---------------------------------------------------------------------------------------------
# whole runs


def check_one_run_folder(code: int, stdout: str, stderr: str, root: Path) -> Path:
    """A 2-process run that made one folder, printed by rank 0 alone, with identical parameters on both ranks."""
    assert code == 0, stderr
    folders = list(root.iterdir())
    assert len(folders) == 1  # rank 1 made none of its own
    folder = folders[0]
    # rank 0 alone speaks: one header, and the folder as the last line
    assert stdout.strip().splitlines()[-1].endswith(str(Path(root.name) / folder.name))
    assert stdout.count("device cpu") == 1
    assert "batch size 16 per process x 2 processes = 32" in stdout
    assert "Traceback" not in stderr
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["status"] == "completed"
    # both ranks ended with bit-identical parameters, and they are the ones saved
    digests = summary["processes"]["parameters_sha256"]
    assert summary["processes"]["world_size"] == 2 and len(digests) == 2
    assert digests[0] == digests[1] == state_digest(load(folder / "checkpoints" / "last.pt")["model"])
    assert json.loads((folder / "env.json").read_text())["distributed"] == {"world_size": 2, "backend": "gloo"}
    return folder


# the run that the stopped, resumed and two-node runs below must end exactly like: 96 training
# samples in global batches of 32, so 3 steps an epoch, 9 in all; last.pt every 2 steps
STOPPABLE = classification(*MLP, epochs=3, checkpoint_every=2, log_every=2)


@pytest.fixture(scope="session")
def reference(tmp_path_factory) -> Path:
    """The folder of STOPPABLE, run uninterrupted by `trainer run --nproc 2`.

    Once per test session, not per xdist worker: the first worker to get here runs it under a
    file lock in the folder the workers share; the others wait for it and read its folder.
    """
    import shutil

    import yaml
    from filelock import FileLock

    from conftest import trainer_executable

    shared = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        shared = shared.parent  # the session's folder, above each worker's own
    work, folder = shared / "ddp-reference", shared / "ddp-reference" / "run"
    with FileLock(str(shared / "ddp-reference.lock")):
        if not (work / "done").exists():
            shutil.rmtree(work, ignore_errors=True)  # a failed attempt of another worker
            work.mkdir()
            (work / "config.yaml").write_text(yaml.safe_dump(STOPPABLE, sort_keys=False))
            done = subprocess.run(
                [trainer_executable(), "run", work / "config.yaml", "--nproc", "2", "--run-dir", folder],
                cwd=work, capture_output=True, text=True, timeout=300, env={**os.environ, **LOOPBACK},
            )  # fmt: skip
            assert done.returncode == 0, done.stderr
            (work / "done").touch()
    return folder


def same_end(folder: Path, reference: Path) -> None:
    """`folder`'s run ended exactly as the reference run: every parameter and optimizer tensor
    equal bit for bit, and the same logged numbers, step for step."""
    a, b = load(reference / "checkpoints" / "last.pt"), load(folder / "checkpoints" / "last.pt")
    assert a["train_state"]["step"] == b["train_state"]["step"] == 9
    assert a["model"].keys() == b["model"].keys()
    for name, value in a["model"].items():
        assert torch.equal(b["model"][name], value), name
    for index, state in a["optimizer"]["state"].items():
        assert torch.equal(b["optimizer"]["state"][index]["momentum_buffer"], state["momentum_buffer"]), index
    assert points(folder) == points(reference)


def follows(two: Path, one: Path, steps: int) -> None:
    """The run in `two` (2 processes at batch b) followed the run in `one` (1 process at batch 2b)."""
    a, b = load(two / "checkpoints" / "last.pt"), load(one / "checkpoints" / "last.pt")
    assert a["train_state"]["step"] == b["train_state"]["step"] == steps
    for name, value in b["model"].items():
        assert torch.allclose(a["model"][name], value, rtol=0, atol=1e-5), name
    # the logged losses and validation metrics are the global ones: averaged over the ranks
    for p, q in zip(points(two), points(one), strict=True):
        assert p.keys() == q.keys() and p["step"] == q["step"]
        for key in ("loss", "accuracy"):
            if key in q:
                assert p[key] == pytest.approx(q[key], abs=1e-5)


def test_mlp_in_two_processes_at_batch_b_follows_one_process_at_batch_2b(cli, write_config, tmp_path, reference):
    # the MLP in 2 processes at batch 16 is the reference run
    config = STOPPABLE | {"data": STOPPABLE["data"] | {"batch_size": 32}}
    one = cli("run", write_config(config), "--run-dir", tmp_path / "one", env=LOOPBACK)
    assert one.code == 0, one.stderr
    follows(reference, tmp_path / "one", steps=9)


def test_lenet_in_two_processes_at_batch_b_follows_one_process_at_batch_2b(cli, write_config, tmp_path):
    two = cli("run", write_config(classification(*LENET, batch_size=16), "two"), "--nproc", "2",
              "--runs-root", tmp_path / "two", env=LOOPBACK)  # fmt: skip
    two_folder = check_one_run_folder(two.code, two.stdout, two.stderr, tmp_path / "two" / "ddp")
    one = cli("run", write_config(classification(*LENET, batch_size=32), "one"), "--run-dir", tmp_path / "one", env=LOOPBACK)
    assert one.code == 0, one.stderr
    follows(two_folder, tmp_path / "one", steps=6)


def test_the_dataloader_path_shards_like_the_in_memory_path(cli, write_config, tmp_path):
    # image_folder goes through a DataLoader with a DistributedSampler: 2 processes at batch 6
    # follow 1 process at batch 12, as on the in-memory path
    from datafiles import make_image_folder

    root = make_image_folder(tmp_path / "images", per_class=24)

    def config(batch_size: int, name: str) -> Path:
        return write_config(classification({"name": "mlp", "hidden": 16}, [1, 8, 8]) | {
            "data": {"name": "image_folder", "root": str(root), "image_size": 8, "grayscale": True,
                     "batch_size": batch_size, "val_fraction": 0.25},
        }, name)  # fmt: skip

    two = cli("run", config(6, "two"), "--nproc", "2", "--run-dir", tmp_path / "two", env=LOOPBACK)
    one = cli("run", config(12, "one"), "--run-dir", tmp_path / "one", env=LOOPBACK)
    assert two.code == 0 and one.code == 0, two.stderr + one.stderr
    a, b = load(tmp_path / "two" / "checkpoints" / "last.pt"), load(tmp_path / "one" / "checkpoints" / "last.pt")
    assert a["train_state"]["step"] == b["train_state"]["step"] == 6  # 36 training images, 3 global batches an epoch
    for name, value in b["model"].items():
        assert torch.allclose(a["model"][name], value, rtol=0, atol=1e-5), name


def test_stop_at_step_k_and_resume_with_two_processes_equals_the_uninterrupted_run(cli, write_config, tmp_path, reference):
    config = write_config(STOPPABLE)
    # the signal reaches rank 1 alone after step 1; the ranks agree at the next log point (every 2
    # steps here), so both stop after step 2
    cut = cli("run", config, "--nproc", "2", "--run-dir", tmp_path / "cut",
              env={**LOOPBACK, "TRAINER_STOP_AT_STEP": "1@1"})  # fmt: skip
    assert cut.code == 143, cut.stderr
    assert "stopped by SIGTERM after step 2" in cut.stderr
    saved = tmp_path / "cut" / "checkpoints" / "last.pt"
    assert load(saved)["train_state"]["step"] == 2

    # another number of processes would deal out other shards: refused, and nothing changes on disk
    before = saved.read_bytes()
    refused = cli("resume", tmp_path / "cut", env=LOOPBACK)
    assert refused.code == 2
    assert "written by a run in 2 processes (--nproc 2)" in refused.stderr
    assert "resume with 2 processes" in refused.stderr and "Traceback" not in refused.stderr
    assert saved.read_bytes() == before

    resumed = cli("resume", tmp_path / "cut", "--nproc", "2", env=LOOPBACK)
    assert resumed.code == 0, resumed.stderr
    same_end(tmp_path / "cut", reference)


def test_accumulation_in_two_processes_follows_the_big_batch_and_resumes_exactly(cli, write_config, tmp_path, reference):
    # batches of 8 a process, 2 accumulated: the reference's global batch of 32 a step. The stop
    # reaches rank 1 one batch after step 2, mid-accumulation; the ranks keep no per-rank
    # gradients in a checkpoint, so they agree to stop where they next agree, after a step: the
    # epoch's end after step 3 (log points, every 2 steps, come later)
    config = write_config(STOPPABLE | {"data": STOPPABLE["data"] | {"batch_size": 8}, "train": STOPPABLE["train"] | {"accumulate": 2}})
    whole = cli("run", config, "--nproc", "2", "--run-dir", tmp_path / "whole", env=LOOPBACK)
    assert whole.code == 0, whole.stderr
    follows(tmp_path / "whole", reference, steps=9)

    cut = cli("run", config, "--nproc", "2", "--run-dir", tmp_path / "cut", env={**LOOPBACK, "TRAINER_STOP_AT_STEP": "2+1@1"})
    assert cut.code == 143, cut.stderr
    assert "stopped by SIGTERM after step 3" in cut.stderr
    assert "grads" not in load(tmp_path / "cut" / "checkpoints" / "last.pt")
    resumed = cli("resume", tmp_path / "cut", "--nproc", "2", env=LOOPBACK)
    assert resumed.code == 0, resumed.stderr
    same_end(tmp_path / "cut", tmp_path / "whole")


BATCHNORM_PLUGIN = """
from torch import nn

def mlp_bn(in_features: int = 8, num_classes: int = 3) -> nn.Module:
    \"\"\"An MLP with BatchNorm: running statistics that DDP does not average.\"\"\"
    return nn.Sequential(nn.Linear(in_features, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, num_classes))
"""


def test_batchnorm_statistics_are_one_set_for_validation_and_the_end_of_the_run(cli, write_config, tmp_path):
    site = tmp_path / "site"
    (site / "bn_plugin").mkdir(parents=True)
    (site / "bn_plugin" / "__init__.py").write_text(BATCHNORM_PLUGIN)
    (site / "bn_plugin-0.1.dist-info").mkdir()
    (site / "bn_plugin-0.1.dist-info" / "METADATA").write_text("Metadata-Version: 2.1\nName: bn-plugin\nVersion: 0.1\n")
    (site / "bn_plugin-0.1.dist-info" / "entry_points.txt").write_text("[trainer.models]\nmlp_bn = bn_plugin:mlp_bn\n")
    config = write_config(classification({"name": "mlp_bn"}, [8]))
    result = cli("run", config, "--nproc", "2", "--run-dir", tmp_path / "bn", env={**LOOPBACK, "PYTHONPATH": str(site)})
    assert result.code == 0, result.stderr
    summary = json.loads((tmp_path / "bn" / "summary.json").read_text())
    saved = load(tmp_path / "bn" / "checkpoints" / "last.pt")["model"]
    digests = summary["processes"]["parameters_sha256"]
    assert digests[0] == digests[1] == state_digest(saved)  # running_mean and running_var included
    assert saved["1.num_batches_tracked"].item() == 6


def test_a_bad_config_fails_once_before_any_process_starts(cli, write_config):
    config = write_config(classification(*MLP) | {"optimizer": {"name": "adamw8"}})
    started = time.perf_counter()
    result = cli("run", config, "--nproc", "2", env=LOOPBACK)
    assert result.code == 2
    assert result.stderr.count("unknown optimizer 'adamw8'") == 1
    assert time.perf_counter() - started < 30  # no torchrun, no process group to time out


# ---------------------------------------------------------------------------------------------
# two torchrun agents as two nodes


def torchrun_executable() -> list[str]:
    """torch's `torchrun` console script next to this Python (the command a user types)."""
    found = Path(sys.executable).with_name("torchrun")
    return [str(found)] if found.exists() else [sys.executable, "-m", "torch.distributed.run"]


def two_nodes(tmp_path: Path, *command: Any, env: dict[str, str] | None = None) -> list[subprocess.Popen]:
    """Start `torchrun ... COMMAND` twice, as the two nodes of one job: each agent in a working
    folder of its own (tmp_path/node0, node1) with its own loopback address, one process each,
    meeting at a c10d rendezvous on 127.0.0.1. Ranks follow the agents' addresses: node0 (the
    lower, 127.0.0.1) runs global rank 0."""
    port, job = free_port(), f"test-{uuid.uuid4().hex[:8]}"
    agents = []
    for n in (0, 1):
        node = tmp_path / f"node{n}"
        node.mkdir(parents=True, exist_ok=True)
        launcher = [
            *torchrun_executable(), "--nnodes", "2", "--nproc-per-node", "1", "--rdzv-backend", "c10d",
            "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", job, "--local-addr", f"127.0.0.{n + 1}",
            *map(str, command),
        ]  # fmt: skip
        agents.append(subprocess.Popen(
            launcher, cwd=node, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env={**os.environ, **LOOPBACK, "COLUMNS": "120", **(env or {})},
        ))  # fmt: skip
    return agents


def ended(agents: list[subprocess.Popen], timeout: float = 300) -> list[tuple[int, str, str]]:
    """Each agent's exit code, stdout and stderr once both have exited. An agent still running
    after `timeout` (a test that failed) is stopped: SIGTERM reaches its process through torchrun."""
    try:
        outputs = [agent.communicate(timeout=timeout) for agent in agents]
    finally:
        for agent in agents:
            if agent.poll() is None:
                agent.terminate()
                try:
                    agent.communicate(timeout=60)
                except subprocess.TimeoutExpired:
                    agent.kill()
    return [(agent.returncode, out, err) for agent, (out, err) in zip(agents, outputs)]


def test_two_torchrun_agents_as_two_nodes_train_one_run_written_by_global_rank_0(write_config, tmp_path, reference):
    (code0, out0, err0), (code1, out1, err1) = ended(two_nodes(tmp_path, "-m", "trainer", "run", write_config(STOPPABLE)))
    assert code1 == 0, err1
    # node0 holds global rank 0: it chose the run folder's name, printed and wrote it all
    folder = check_one_run_folder(code0, out0, err0, tmp_path / "node0" / "runs" / "ddp")
    # rank 1 was given that folder as the relative path rank 0 printed, so any file it wrote or
    # folder it made would be under its own working folder: there is nothing, not even a runs/
    assert out1 == "" and list((tmp_path / "node1").iterdir()) == []
    # sharded by global rank, the two nodes trained exactly as two processes on one machine
    same_end(folder, reference)


def test_a_two_node_run_stopped_by_sigterm_to_both_agents_resumes_exactly(tmp_path, reference, write_config):
    config, folder = write_config(STOPPABLE), tmp_path / "shared" / "run"  # one path that both nodes see
    # each process waits after step 3 until a signal reaches it, so the signals land before the run ends
    agents = two_nodes(tmp_path, "-m", "trainer", "run", config, "--run-dir", folder, env={"TRAINER_STOP_AT_STEP": "3:wait"})
    deadline = time.monotonic() + 120
    while not (folder / "checkpoints" / "last.pt").exists():  # step 2's
        assert all(agent.poll() is None for agent in agents), ended(agents)
        assert time.monotonic() < deadline, "the run saved no checkpoint in 120 s"
        time.sleep(0.05)
    for agent in agents:
        agent.send_signal(signal.SIGTERM)  # as SLURM does at a job's time limit: every node's agent
    (_, out0, err0), _ = ended(agents)
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["status"] == "interrupted", err0
    assert summary["error"] == "stopped by SIGTERM after step 3"
    assert load(folder / "checkpoints" / "last.pt")["train_state"]["step"] == 3
    # the hint names torchrun, not --nproc: this run's processes were on two machines
    assert f"resume with: trainer resume {folder}, started by torchrun on each of its 2 nodes" in out0

    # `trainer resume` under the same torchrun command on both nodes, here as torchrun --no-python
    # running the console script
    from conftest import trainer_executable

    for code, out, err in ended(two_nodes(tmp_path / "again", "--no-python", trainer_executable(), "resume", folder)):
        assert code == 0, err
    assert json.loads((folder / "summary.json").read_text())["status"] == "completed"
    same_end(folder, reference)


def test_bad_input_on_one_node_alone_is_told_by_rank_0_and_nothing_is_created(tmp_path, write_config, tiny):
    # a table that node0 has and node1 has not: a data folder on each machine's own disk
    config = write_config(tiny(data={"name": "csv", "path": "table.csv", "target": "y", "batch_size": 4}))
    (tmp_path / "node0").mkdir()
    (tmp_path / "node0" / "table.csv").write_text("x,y\n" + "".join(f"{i},{2 * i}\n" for i in range(16)))
    (code0, out0, err0), (code1, _, err1) = ended(two_nodes(tmp_path, "-m", "trainer", "run", config))
    # rank 0 could read its table, yet it tells rank 1's problem, once, as bad input (its process
    # exits 2; torchrun reports any failed process as 1)
    assert code0 != 0 and code1 != 0, err0
    assert err0.count("error: on rank 1 (host ") == 1
    assert "data.path: no such file: table.csv" in err0
    # and node1's own log says it too: rank 0's is on another machine
    assert err1.count("error: rank 1: data.path: no such file: table.csv") == 1
    assert "internal error" not in err0 and "another process of the run is gone" not in err0
    # no run folder was made on either node
    assert out0 == "" and sorted(p.name for p in tmp_path.glob("node*/*")) == ["table.csv"]


# ---------------------------------------------------------------------------------------------
# a rank that dies, a signal to the launcher


def _rank_pid(launcher: subprocess.Popen, rank: int) -> int:
    """The pid of the worker process with RANK=rank under this launcher (read from /proc)."""
    children = {launcher.pid}
    for _ in range(3):  # launcher -> torchrun -> workers
        for pid in map(int, filter(str.isdigit, os.listdir("/proc"))):
            try:
                parent = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            if parent in children:
                children.add(pid)
    for pid in children - {launcher.pid}:
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in environ and b"LOCAL_RANK=" + str(rank).encode() in environ:
            return pid
    raise AssertionError(f"no process with RANK={rank} under {launcher.pid}")


def _start_long_run(tmp_path: Path) -> tuple[subprocess.Popen, Path]:
    """A 2-process run that trains for minutes, once its first checkpoint (step 20) is written."""
    config = classification(*MLP, size=4096, epochs=1000, checkpoint_every=20)
    sections = {k: v for k, v in config.items() if k in ("model", "data", "loss", "optimizer", "train")}
    return start_run(tmp_path, "--nproc", "2", env=LOOPBACK, **sections)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds the rank's process in /proc")
@pytest.mark.parametrize("rank", [0, 1])
def test_killing_one_rank_ends_the_job_and_leaves_a_loadable_checkpoint(rank, write_config, tmp_path):
    launcher, folder = _start_long_run(tmp_path)
    os.kill(_rank_pid(launcher, rank), signal.SIGKILL)
    killed = time.monotonic()
    _, stderr = launcher.communicate(timeout=90)
    # the bound is 60 s; torchrun would SIGKILL a rank stuck in a collective after 50 s, so
    # a run that takes more than 30 s here has a rank that did not notice its peer was gone
    assert time.monotonic() - killed < 30
    assert launcher.returncode not in (0, None)
    assert "Traceback" not in stderr
    assert f"rank {rank}" in stderr if rank == 0 else "another process of the run is gone" in stderr
    assert load(folder / "checkpoints" / "last.pt")["train_state"]["step"] > 0


def test_sigterm_to_the_launcher_stops_every_rank_after_the_same_step(write_config, tmp_path):
    launcher, folder = _start_long_run(tmp_path)
    launcher.send_signal(signal.SIGTERM)
    stdout, stderr = launcher.communicate(timeout=90)
    assert launcher.returncode == 143, stderr
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["status"] == "interrupted"
    saved = load(folder / "checkpoints" / "last.pt")
    assert saved["train_state"]["step"] == summary["steps"]
    assert f"stopped by SIGTERM after step {summary['steps']}" in stderr
    assert "--nproc 2" in stdout  # the resume hint keeps the number of processes


# ---------------------------------------------------------------------------------------------
# the pieces, in process


def test_from_environment_reads_torchruns_variables(monkeypatch):
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "GROUP_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    assert from_environment() is None
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert from_environment() is None  # one process under torchrun is a plain run
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert from_environment() == Distributed(rank=3, world_size=4, local_rank=1)
    monkeypatch.setenv("GROUP_WORLD_SIZE", "2")  # torchrun's number of nodes (agents)
    assert from_environment() == Distributed(rank=3, world_size=4, local_rank=1, nodes=2)
    monkeypatch.setenv("RANK", "4")
    with pytest.raises(UsageError, match="RANK 4 is outside 0..3"):
        from_environment()


def test_torchrun_variables_that_are_not_numbers_are_refused(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(UsageError, match="must be integers.*'two'"):
        from_environment()


def test_each_process_runs_the_command_without_its_nproc():
    from trainer.cli import _without_nproc

    assert _without_nproc(["run", "c.yaml", "--nproc", "2", "-q"]) == ["run", "c.yaml", "-q"]
    assert _without_nproc(["run", "--nproc=4", "c.yaml", "x=1"]) == ["run", "c.yaml", "x=1"]


def test_nproc_under_torchrun_is_refused(cli, write_config):
    result = cli("run", write_config(classification(*MLP)), "--nproc", "2", env={**LOOPBACK, "WORLD_SIZE": "2", "RANK": "0"})
    assert result.code == 2
    assert "--nproc starts its own processes; under torchrun, leave it out" in result.stderr


def test_each_rank_takes_its_own_gpu(monkeypatch):
    # no GPU here: torch.cuda is mocked to say there are some
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    rank = Distributed(rank=5, world_size=8, local_rank=1)
    assert rank_device("auto", rank) == "cuda:1"
    assert rank_device("cuda", rank) == "cuda:1"
    assert rank_device("cpu", rank) == "cpu"
    with pytest.raises(UsageError, match="one GPU per process"):
        rank_device("cuda:0", rank)
    with pytest.raises(UsageError, match="does not run on mps"):
        rank_device("mps", rank)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert rank_device("auto", rank) == "cpu"


def test_the_launch_command_is_torchrun_over_loopback():
    command = launch_command(2, ["run", "c.yaml", "optimizer.lr=0.1"], 29999)
    assert command[:3] == [sys.executable, "-m", "trainer.distributed"]
    assert command[command.index("--nproc_per_node") + 1] == "2"
    assert command[command.index("--master_addr") + 1] == "127.0.0.1"
    assert command[-5:] == ["-m", "trainer", "run", "c.yaml", "optimizer.lr=0.1"]


def test_cuda_ranks_join_with_nccl_on_their_own_gpu_and_cpu_ranks_with_gloo(monkeypatch):
    # no GPU here: the CUDA calls are mocked, and so is the group's start, to see what join asks for
    import torch.distributed as tdist

    from trainer.distributed import join

    calls: list = []
    monkeypatch.setattr(tdist, "is_initialized", lambda: False)
    monkeypatch.setattr(tdist, "init_process_group", lambda **kw: calls.append(("init", kw["backend"], kw["rank"], kw["world_size"])))
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: calls.append(("set_device", str(device))))
    rank = Distributed(rank=3, world_size=4, local_rank=1)
    join(rank, torch.device("cuda:1"))
    assert calls == [("set_device", "cuda:1"), ("init", "nccl", 3, 4)]
    calls.clear()
    join(rank, torch.device("cpu"))
    assert calls == [("init", "gloo", 3, 4)]
