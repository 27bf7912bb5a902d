"""Data-parallel gated fine-tuning over the processes of ``torchrun`` or ``accelerate launch``.

Both launchers start one process per device and describe it in the environment (``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``); :func:`process_group` joins
them with ``torch.distributed`` (NCCL on CUDA, gloo on the CPU) and the training loop wraps the
model in :class:`~torch.nn.parallel.DistributedDataParallel`. Head gates are ordinary parameters of
the model, so their gradients are all-reduced with the weights and every rank ends with the same
logits.

Every rank draws the same shuffled sequence of global batches (``finetune.batch_size`` examples)
and takes its own rows of each (:func:`shard`), so a step sees the same examples as a one-process
step and the schedules (learning rate, DSP temperature) follow the same global step count.
Without a launcher (``WORLD_SIZE`` unset or 1) everything here is a no-op.
"""
from __future__ import annotations

import datetime
import os
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch
from torch import nn


@dataclass(frozen=True)
class Distributed:
    """Where this process stands in a launch: its rank, how many ranks, its device index on its host."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0 writes every file; the others only train."""
        return self.rank == 0

    @property
    def device(self) -> torch.device:
        """This rank's GPU (``LOCAL_RANK``), or the CPU; one process keeps the current CUDA device."""
        if torch.cuda.is_available():
            return torch.device("cuda", self.local_rank) if self.enabled else torch.device("cuda")
        return torch.device("cpu")


def launched() -> Distributed:
    """This process's place in the launch, read from the launcher's environment variables."""
    try:
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local_rank = int(os.environ.get("LOCAL_RANK", str(rank)))
    except ValueError as err:
        raise ValueError(f"RANK/WORLD_SIZE/LOCAL_RANK must be integers ({err})") from None
    if not 0 <= rank < max(world_size, 1):
        raise ValueError(f"RANK={rank} is outside WORLD_SIZE={world_size}")
    return Distributed(rank, max(world_size, 1), local_rank)


def is_main_process() -> bool:
    """False only in the non-zero ranks of a multi-process launch."""
    return launched().is_main


@contextmanager
def process_group(timeout_minutes: float = 60) -> Iterator[Distributed]:
    """Join the launch's process group for the duration of the block (nothing to join in one process).

    The timeout bounds how long a rank waits in a collective: ranks other than 0 wait while rank 0
    evaluates and writes checkpoints, so it is longer than NCCL's 10-minute default.
    """
    dist = launched()
    if not dist.enabled:
        yield dist
        return
    if torch.cuda.is_available():
        torch.cuda.set_device(dist.local_rank)
    owned = not torch.distributed.is_initialized()
    if owned:
        torch.distributed.init_process_group(
            "nccl" if torch.cuda.is_available() else "gloo",
            timeout=datetime.timedelta(minutes=timeout_minutes),
        )
    try:
        yield dist
        if owned:
            # No rank tears the group down while a peer may still talk to it: a gloo peer whose
            # connection closes mid-operation aborts ("terminate called without an active exception").
            torch.distributed.barrier()
    finally:
        if owned:
            torch.distributed.destroy_process_group()


def per_rank_batch_size(batch_size: int, dist: Distributed) -> int:
    """``batch_size`` split over the ranks; the effective batch stays ``batch_size``."""
    if batch_size % dist.world_size:
        raise ValueError(f"finetune.batch_size: {batch_size} is not divisible by the {dist.world_size} "
                         "processes of this launch (the effective batch must stay the configured one)")
    return batch_size // dist.world_size


def rank_seed(seed: int, rank: int) -> int:
    """The seed of ``rank``'s random draws (Gumbel noise, dropout).

    Rank 0 keeps ``seed``, so a one-process launch repeats a plain run; the other ranks get distinct
    seeds derived from (seed, rank), the same on every launch.
    """
    if rank == 0:
        return seed
    return int(np.random.SeedSequence([seed, rank]).generate_state(1)[0])


def seed_gate_noise_(gates: nn.Module, seed: int, dist: Distributed) -> None:
    """Give each rank its own Gumbel (or hard-concrete) noise, reproducible for a seed and rank.

    Rank 0 keeps the noise the gates were built with (a one-process run's); rank r reseeds the
    gates' CPU ``noise_generator`` with ``rank_seed(seed, r)``. Identical noise on every rank would
    make N ranks draw one mask sample per step instead of N.
    """
    generator = getattr(gates, "noise_generator", None)
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"{type(gates).__name__} has no noise_generator to seed per rank")
    if dist.rank:
        generator.manual_seed(rank_seed(seed, dist.rank))


def shard(batch: dict[str, torch.Tensor], dist: Distributed) -> tuple[dict[str, torch.Tensor], float]:
    """This rank's rows of a global batch, and the weight of its loss.

    DistributedDataParallel averages gradients over ranks. With the loss of ``n_r`` of the batch's
    ``n`` rows scaled by ``n_r * world_size / n``, that average is the gradient of the global batch's
    mean loss even when ``n`` does not split evenly (an epoch's last batch). A rank left without a
    row still has to join the all-reduce: it runs one row with weight 0.
    """
    n = len(batch["labels"])
    rows = torch.arange(n).tensor_split(dist.world_size)[dist.rank]
    weight = len(rows) * dist.world_size / n
    if len(rows) == 0:
        rows, weight = torch.arange(1), 0.0
    return {key: value[rows] for key, value in batch.items()}, weight


def wrap(model: nn.Module, dist: Distributed) -> nn.Module:
    """``model`` inside DistributedDataParallel (it broadcasts rank 0's parameters and buffers first)."""
    from torch.nn.parallel import DistributedDataParallel

    device = next(model.parameters()).device
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def mean_over_ranks(value: torch.Tensor, dist: Distributed) -> float:
    """The mean of a scalar over the ranks (the global batch's loss from the ranks' weighted losses)."""
    if not dist.enabled:
        return float(value)
    total = value.detach().float().reshape(1).clone()
    torch.distributed.all_reduce(total)
    return float(total) / dist.world_size


def check_same_on_every_rank(tensor: torch.Tensor, what: str, dist: Distributed) -> None:
    """Raise RuntimeError unless ``tensor`` is bitwise equal on every rank (DDP keeps them in sync)."""
    if not dist.enabled:
        return
    local = tensor.detach().to(dist.device)
    if local.dtype == torch.bool:  # gloo gathers no bool tensors
        local = local.to(torch.uint8)
    gathered = [torch.empty_like(local) for _ in range(dist.world_size)]
    torch.distributed.all_gather(gathered, local)
    differ = [rank for rank, other in enumerate(gathered) if not torch.equal(other, gathered[0])]
    if differ:
        raise RuntimeError(f"{what} differs between rank 0 and rank(s) {differ}: the ranks fell out of sync")


def barrier(dist: Distributed) -> None:
    if dist.enabled:
        torch.distributed.barrier()
