"""Data parallelism with torch DDP, over processes started by a standard launcher.

``torchrun``, ``accelerate launch --multi_gpu`` and SLURM (``srun torchrun ...``) start one process
per device with RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT in the environment;
``medpeft train --devices N`` starts N local processes the same way (``torch.distributed.run``).

The recipe is independent of the number of processes:

- ``train.batch_size`` is the global batch. Every process draws the same seeded order, cuts it into
  the same global batches, and takes a contiguous part of each. Each part's loss is weighted by its
  share of the batch, so DDP's average of the gradients is the single-process gradient of the whole
  batch, and a run gives the same weights (within float tolerance) on 1 or N processes.
- Evaluation deals whole batches of the single-process order round-robin and gathers the outputs
  into dataset order: every image is computed exactly as in one process, none is padded or repeated,
  so the metrics equal a single-process evaluation's exactly.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace

import torch
import torch.distributed as dist
from torch.utils.data import Sampler

from medpeft.errors import ConfigError


@dataclass(frozen=True)
class Processes:
    """This process's place among the processes of one run (rank 0 of 1 when not distributed)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    owns_group: bool = False
    """Whether ``start`` created the process group (and ``stop`` destroys it)."""

    @classmethod
    def from_env(cls) -> Processes:
        """This process's place as the launcher's environment tells it (rank 0 of 1 without a launcher)."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world == 1:
            return SINGLE
        return cls(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))

    @property
    def main(self) -> bool:
        """The process that writes the run directory and prints."""
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def all_gather(self, obj) -> list:
        """`obj` of every process, in rank order (picklable objects of any size)."""
        if self.world == 1:
            return [obj]
        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def broadcast_buffers(self, model: torch.nn.Module) -> None:
        """Rank 0's buffers (e.g. BatchNorm running statistics, which each process updates from its own
        images) to every process, so that all of them evaluate the model that rank 0 saves."""
        if self.world > 1:
            for buffer in model.buffers():
                dist.broadcast(buffer, 0)

    def sum(self, value: float) -> float:
        """`value` summed over the processes."""
        if self.world == 1:
            return value
        total = torch.tensor([value], dtype=torch.float64)
        dist.all_reduce(total)
        return float(total)


SINGLE = Processes()


def start(device: torch.device) -> tuple[Processes, torch.device]:
    """Join the launcher's process group (if there is one) and pick this process's device: on CUDA,
    the GPU of its local rank (NCCL); otherwise the CPU (gloo)."""
    procs = Processes.from_env()
    if procs.world == 1:
        return procs, device
    if device.type == "cuda":
        if procs.local_rank >= torch.cuda.device_count():
            raise ConfigError(f"process {procs.rank} has local rank {procs.local_rank}, but this machine has "
                              f"{torch.cuda.device_count()} GPUs: start at most one process per GPU")
        device = torch.device("cuda", procs.local_rank)
        torch.cuda.set_device(device)
    if dist.is_initialized():
        return procs, device
    # On GPUs NCCL for CUDA tensors and gloo for the CPU ones (gathered outputs, the logged loss).
    dist.init_process_group("cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo",
                            device_id=device if device.type == "cuda" else None)
    return replace(procs, owns_group=True), device


def stop(procs: Processes) -> None:
    """Leave the process group if ``start`` created it."""
    if procs.owns_group:
        dist.destroy_process_group()


def check_launcher_precision(precision: str) -> None:
    """``accelerate launch --mixed_precision X`` must agree with train.precision (the one setting used)."""
    asked = os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
    if asked not in ("no", precision):
        raise ConfigError(f"accelerate launch asks for mixed precision '{asked}' but train.precision is "
                          f"'{precision}': set --set train.precision={asked} or launch without --mixed_precision")


class BatchPlan(Sampler):
    """Batches of dataset indices for one process.

    The order is the same on every process: a permutation drawn from `generator` when shuffling (as
    ``RandomSampler``), else dataset order; it is cut into batches of `batch_size`. With ``split``
    (training) each batch is cut into `world` contiguous, near-equal parts and this process takes its
    part; without (evaluation) whole batches are dealt round-robin. A training part that would be
    empty (a last batch smaller than the number of processes) is the batch's first image, with a
    share of 0 (see ``share``), so that every process still takes part in the step.
    """

    def __init__(self, n: int, batch_size: int, shuffle: bool, generator: torch.Generator | None,
                 procs: Processes = SINGLE, split: bool = True):
        self.n, self.batch_size, self.shuffle, self.generator = n, batch_size, shuffle, generator
        self.procs, self.split = procs, split

    def _batches(self) -> list[torch.Tensor]:
        order = torch.randperm(self.n, generator=self.generator) if self.shuffle else torch.arange(self.n)
        return list(order.split(self.batch_size))

    def __iter__(self):
        rank, world = self.procs.rank, self.procs.world
        batches = self._batches()
        if not self.split:
            yield from (batch.tolist() for batch in batches[rank::world])
            return
        for batch in batches:
            part = batch.tensor_split(world)[rank]
            yield (part if len(part) else batch[:1]).tolist()

    def __len__(self) -> int:
        batches = -(-self.n // self.batch_size)
        if self.split:
            return batches
        return len(range(self.procs.rank, batches, self.procs.world))

    def share(self, step: int) -> tuple[int, int]:
        """(images of this process's part, images of the global batch) at `step` of a split plan."""
        total = min(self.batch_size, self.n - step * self.batch_size)
        rank, world = self.procs.rank, self.procs.world
        return total // world + (rank < total % world), total
