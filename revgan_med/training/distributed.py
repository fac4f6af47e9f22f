"""Data-parallel training with torch.distributed, launched by ``torchrun`` (one process per GPU or CPU).

``torchrun --nproc_per_node=4 -m revgan_med train ...`` sets RANK / WORLD_SIZE / LOCAL_RANK (and the
rendezvous address); `init_distributed` reads them, joins the process group (nccl on CUDA, gloo on
CPU) and picks this rank's device. Every rank samples its own share of the patches
(`ResumableDistributedSampler`), gradients are averaged across ranks before every optimiser step
(`average_gradients`), every rank validates its share of the validation cases (`gather_lists`), and
only rank 0 logs and writes checkpoints.

Gradients are averaged explicitly rather than by wrapping the networks in DistributedDataParallel:
a GAN iteration calls the generator through both ``forward`` and ``inverse`` and the discriminators
in both phases, while DDP's reducer follows only ``forward`` calls and expects one backward per
forward. One flat all-reduce per phase gives the same averaged gradients as DDP.
"""

from __future__ import annotations

import datetime
import itertools
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import Dataset, DistributedSampler

from revgan_med.runtime import resolve_device


@dataclass(frozen=True)
class DistributedContext:
    """Where this process stands: its rank among ``world_size`` processes and its device."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    owns_group: bool = False  # this context joined the process group, so it leaves it

    @property
    def is_main(self) -> bool:
        """Rank 0 logs and writes checkpoints (every rank validates its share of the cases)."""
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed(
    device: str = "auto", *, timeout_s: float = 1800.0, backend: str = "auto"
) -> DistributedContext:
    """Join the process group described by torchrun's environment variables (a no-op without them).

    `timeout_s` bounds every collective, barriers included: validation shares the cases out, but the
    ranks wait for the slowest share (one large volume can outlast NCCL's default of 10 min). `backend`
    ``auto`` is nccl on CUDA and gloo on the CPU; gloo also reduces CUDA tensors, e.g. for several
    ranks sharing one GPU, which NCCL refuses.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    resolved = resolve_device(device, local_rank)
    owns_group = world_size > 1 and not dist.is_initialized()
    if owns_group:
        if resolved.type == "cuda":
            torch.cuda.set_device(resolved)
        _bind_world_defaults_before_the_group()
        dist.init_process_group(
            backend=("nccl" if resolved.type == "cuda" else "gloo") if backend == "auto" else backend,
            timeout=datetime.timedelta(seconds=timeout_s),
        )
    return DistributedContext(rank, world_size, local_rank, resolved, owns_group=owns_group)


def _bind_world_defaults_before_the_group() -> None:
    """Import ``torch.distributed.nn`` while no process group exists.

    Its functions take ``group=group.WORLD`` as a default argument, bound at import. The first optimiser
    step imports it (through ``torch._dynamo``); imported after `init_process_group`, those defaults
    keep the group alive past `destroy_process_group`, and its gloo threads are then torn down at
    interpreter exit, which now and then aborts a finished rank with SIGABRT.
    """
    import torch.distributed.nn  # noqa: F401


def shutdown_distributed(context: DistributedContext) -> None:
    """Leave the process group if `init_distributed` joined it (a caller's own group stays)."""
    if context.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def barrier(context: DistributedContext) -> None:
    """Wait for every rank (e.g. while rank 0 validates and writes a checkpoint)."""
    if context.enabled:
        dist.barrier()


def gather_lists(items: list, context: DistributedContext) -> list:
    """Every rank's `items` (picklable), concatenated in rank order, on every rank."""
    if not context.enabled:
        return items
    parts: list[list | None] = [None] * context.world_size
    dist.all_gather_object(parts, items)
    return [item for part in parts for item in part or ()]


def broadcast_module(module: nn.Module, context: DistributedContext) -> None:
    """Copy rank 0's parameters and buffers to every rank (same start even if initialisation differs)."""
    if context.enabled:
        for tensor in itertools.chain(module.parameters(), module.buffers()):
            dist.broadcast(tensor.data, src=0)


def average_gradients(parameters: Iterable[nn.Parameter], context: DistributedContext) -> None:
    """Replace every gradient by its mean over the ranks, with one all-reduce of a flat buffer.

    Parameters without a gradient are skipped; every rank runs the same graph, so they agree.
    """
    if not context.enabled:
        return
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1).float() for g in grads])
    dist.all_reduce(flat)
    flat /= context.world_size
    for grad, chunk in zip(grads, torch.split(flat, [g.numel() for g in grads]), strict=True):
        grad.copy_(chunk.view_as(grad))


def all_reduce_mean(values: dict[str, float], context: DistributedContext) -> dict[str, float]:
    """Average logged scalars over the ranks (the same keys on every rank)."""
    if not context.enabled or not values:
        return values
    keys = sorted(values)
    tensor = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=context.device)
    dist.all_reduce(tensor)
    return {k: float(v) / context.world_size for k, v in zip(keys, tensor.tolist(), strict=True)}


class ResumableDistributedSampler(DistributedSampler):
    """`DistributedSampler` (shuffled by seed + epoch, one share per rank) that can start mid-epoch.

    ``set_epoch(epoch, start=k)`` skips the first ``k`` indices of this rank's share, so a resumed
    run sees exactly the samples the interrupted one had not yet seen, without loading the others.
    """

    def __init__(self, dataset: Dataset, *, context: DistributedContext, seed: int) -> None:
        super().__init__(
            dataset,
            num_replicas=context.world_size,
            rank=context.rank,
            shuffle=True,
            seed=seed,
            drop_last=False,
        )
        self.start = 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        super().set_epoch(epoch)
        self.start = start

    def __iter__(self) -> Iterator[int]:
        return itertools.islice(super().__iter__(), self.start, None)

    def __len__(self) -> int:
        return max(0, super().__len__() - self.start)
