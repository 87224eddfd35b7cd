"""Data-parallel training over several processes: torch DistributedDataParallel, launched by torchrun.

`train.processes: N` (N > 1) makes a `train@` stage start itself again under `torch.distributed.run`
(torchrun) with N processes on this machine; a user with several machines runs the same command under
their own `torchrun --nnodes ...`. Each process joins the process group (gloo on the CPU, nccl on CUDA with
one GPU per process, `LOCAL_RANK`), and `training.fit` splits every batch across them:

* Every process draws the same seeded permutation and builds the whole batch (the augmentation draws
  stay those of a one-process run), then trains on its own contiguous part of it. The loss of each part is
  weighted by its share of the batch, so DDP's gradient average is the gradient of the whole batch's mean
  loss: a step is the one-process step up to floating-point summation order.
* What is not the same: BatchNorm statistics in training mode are computed per part (gloo has no
  SyncBatchNorm on the CPU), and the running statistics are rank 0's (DDP broadcasts its buffers). A model
  without BatchNorm (a linear head on cached features) trains to the same weights; a convolutional
  network lands within seed noise of the one-process run (`tests/test_distributed.py`).
* Validation runs in every process on the same weights, so early stopping, the learning-rate schedule and
  the best-epoch choice agree without messages; only rank 0 writes outputs and the MLflow run.

torch is imported inside the functions: stage modules import this one before their params are validated.
"""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, NoReturn

import numpy as np

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistContext:
    """This process's place in the process group."""

    rank: int
    world_size: int
    local_rank: int
    backend: str

    @property
    def lead(self) -> bool:
        return self.rank == 0


def launched() -> bool:
    """Whether torchrun (or another launcher setting its variables) started this process."""
    return "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ


def relaunch(processes: int, module: str, argv: list[str]) -> NoReturn:
    """Replace this process by `torchrun --standalone --nproc-per-node <processes> -m <module> <argv>`.

    `--standalone` picks a free rendezvous port on this machine, so stages started at once (a DVC queue) do
    not collide. The exit status is torchrun's: any process failing fails the stage.
    """
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}"]
    cmd += ["-m", module, *argv]
    log.info("train.processes = %d: relaunching under torchrun: %s", processes, " ".join(cmd))
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, cmd)


def init_from_env(device: torch.device) -> tuple[DistContext | None, torch.device]:
    """Join the process group torchrun set up (gloo on the CPU, nccl on CUDA), or None outside torchrun.

    Returns:
        The context (None for a single process) and the device this process trains on (`cuda:LOCAL_RANK`
        on CUDA: one GPU per process).

    Raises:
        RuntimeError: more processes than GPUs on CUDA, naming the fix.
    """
    import torch
    import torch.distributed as dist

    if not launched() or int(os.environ["WORLD_SIZE"]) < 2:
        return None, device
    local_rank = int(os.environ["LOCAL_RANK"])
    if device.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise RuntimeError(
                f"train.processes: process {local_rank} has no GPU ({torch.cuda.device_count()} visible); set "
                "train.processes to at most the number of GPUs, or train.device: cpu"
            )
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend)
    ctx = DistContext(dist.get_rank(), dist.get_world_size(), local_rank, backend)
    if not ctx.lead:  # one voice in the log: the other processes report warnings and errors only
        logging.getLogger().setLevel(logging.WARNING)
    return ctx, device


def current() -> DistContext | None:
    """The process group this process trains in, when there are at least two processes."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return None
    return DistContext(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)), dist.get_backend())


def part(n: int, ctx: DistContext) -> slice:
    """This process's contiguous part of a batch of `n` (sizes differ by at most one, earlier ranks larger)."""
    bounds = np.cumsum([0] + [n // ctx.world_size + (r < n % ctx.world_size) for r in range(ctx.world_size)])
    return slice(int(bounds[ctx.rank]), int(bounds[ctx.rank + 1]))


def all_sum(values: list[float], device: torch.device) -> list[float]:
    """The sum over processes of each value (float64)."""
    import torch
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def sync_buffers(model: torch.nn.Module) -> None:
    """Rank 0's buffers (BatchNorm running statistics) in every process, so validation agrees everywhere."""
    import torch.distributed as dist

    for b in model.buffers():
        dist.broadcast(b, src=0)


def wrap(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """`model` in DistributedDataParallel over its parameters that require gradients now.

    `find_unused_parameters`: some strategies leave trainable parameters out of the forward pass (a text
    encoder's pooler under mean pooling), which DDP would otherwise report as an unfinished reduction.
    """
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=True
    )


def finish() -> None:
    """Leave the process group (at the end of a stage)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
