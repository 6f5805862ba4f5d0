"""The hand-written loop every benchmark measures trainer against, and its batches.

It imports nothing but `time` (torch inside the functions), so a process that runs only a hand
loop (twins.py) pays for torch and nothing of the benchmarks' own tooling.
"""

from __future__ import annotations

import time


def bare_loop(net, loss_fn, opt, steps: int, epoch_batches, clock=time.perf_counter) -> float:
    """`steps` optimizer steps over `epoch_batches(epoch)`, epoch after epoch, and nothing else:
    seconds between the two `clock()` calls."""
    done, epoch = 0, 0
    start = clock()
    while done < steps:
        for xb, yb in epoch_batches(epoch):
            loss = loss_fn(net(xb), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            done += 1
            if done == steps:
                break
        epoch += 1
    loss.item()  # wait for the device, as the others do at their end
    return clock() - start


def slices(x, y, epoch: int, batch: int = 64):
    """Batches of `batch` indexed from the tensors with a permutation seeded by `epoch`: the order
    trainer's in-memory batches take for seed 0 (its epoch_seed(0, epoch) is `epoch`)."""
    import torch

    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(epoch))
    for i in range(0, len(x), batch):
        idx = perm[i : i + batch]
        yield x[idx], y[idx]
