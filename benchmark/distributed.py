"""Several processes training one run: ``torchrun --nproc-per-node=K benchmark/train.py ...``.

Data parallel with the semantics of one process: ``optim.batch_size`` is the batch of the whole step
(images per domain, all processes together). Every process draws the same sample stream as a single
process would and keeps its contiguous share of each step's batch (``BatchShare``), computes the
method's losses on it, and after ``backward()`` the gradients of every trainable parameter of the
method are averaged over the processes (``World.average_gradients``) before the optimiser steps. So
every process holds the same parameters and takes the same optimiser step as one process on the
whole batch, up to what is computed per process: BatchNorm statistics (per process on the CPU;
synchronised with ``SyncBatchNorm`` on GPUs), losses normalised by a process's own pixel counts and
batch-level quantities such as the pseudo-label confidence ratio.

Why gradients are averaged by hand instead of wrapping the model in ``DistributedDataParallel``: a
method calls its segmentor several times per step and through its parts (``forward_features``,
``head``), which a DDP wrapper does not see (it hooks ``forward`` of the wrapped module and expects
one forward per backward), and methods train heads that live outside the segmentor (projection
heads of contrastive add-ons), which must be averaged too. One flat all-reduce after ``backward()``
covers every trainable parameter of any method, needs nothing from the method, and is deterministic
for a given number of processes. The price is no overlap of communication with the backward pass,
small next to a segmentation step.

Floating-point buffers of modules in training mode (BatchNorm running statistics, a method's running
class statistics) are averaged after every optimiser step too, so the EMA teacher, updated by every
process from its student, stays the same everywhere. Evaluation is sharded: each process predicts
every K-th image and the confusion matrices are summed, which gives exactly the counts of one process.
Only process 0 logs, writes checkpoints and the run record. The backend is gloo on the CPU and NCCL on
GPUs (one GPU per process, ``cuda:LOCAL_RANK``).
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from benchmark.config import ConfigError


def default_device(local_rank: int = 0) -> torch.device:
    return torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")


@dataclass(frozen=True)
class World:
    """This process's place among the processes of one run (one process: rank 0 of 1)."""

    rank: int = 0
    size: int = 1
    device: torch.device = field(default_factory=default_device)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    def alone(self) -> World:
        """The same device without the other processes (work that process 0 does by itself)."""
        return World(0, 1, self.device)

    def mean(self, tensor: torch.Tensor) -> torch.Tensor:
        """The mean of ``tensor`` over the processes (a new tensor; ``tensor`` itself with one process)."""
        if not self.distributed:
            return tensor
        total = tensor.detach().clone()
        dist.all_reduce(total)
        return total / self.size

    def sum_(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum ``tensor`` over the processes, in place."""
        if self.distributed:
            dist.all_reduce(tensor)
        return tensor

    def average_gradients(self, parameters: Iterable[nn.Parameter]) -> None:
        """Replace every gradient by its mean over the processes. A parameter that received a
        gradient in some processes only counts as zero in the others; one that received none
        anywhere keeps ``grad = None`` (the optimiser skips it, as it would in one process)."""
        if not self.distributed:
            return
        parameters = list(parameters)
        has_grad = torch.tensor([p.grad is not None for p in parameters], dtype=torch.int32, device=self.device)
        dist.all_reduce(has_grad, op=dist.ReduceOp.MAX)
        synced = []
        for parameter, flag in zip(parameters, has_grad.tolist()):
            if flag:
                if parameter.grad is None:
                    parameter.grad = torch.zeros_like(parameter)
                synced.append(parameter.grad)
        _all_reduce_mean(synced, self.size)

    def average_buffers(self, module: nn.Module) -> None:
        """Average the floating-point buffers that training updates (those of modules in training
        mode: BatchNorm running statistics, running class statistics); frozen modules are in eval
        mode and identical everywhere already."""
        if not self.distributed:
            return
        buffers = [
            buffer
            for child in module.modules()
            if child.training
            for buffer in child.buffers(recurse=False)
            if buffer.is_floating_point()
        ]
        _all_reduce_mean(buffers, self.size)

    def broadcast_state(self, module: nn.Module) -> None:
        """Copy process 0's parameters and buffers to every process (once, before training)."""
        if not self.distributed:
            return
        for tensor in module.state_dict().values():
            dist.broadcast(tensor, src=0)

    def gather(self, obj) -> list:
        """``obj`` of every process, in rank order (picklable objects)."""
        if not self.distributed:
            return [obj]
        gathered = [None] * self.size
        dist.all_gather_object(gathered, obj)
        return gathered

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()


def _all_reduce_mean(tensors: list[torch.Tensor], size: int) -> None:
    if not tensors:
        return
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat)
    flat /= size
    offset = 0
    for tensor in tensors:
        tensor.copy_(flat[offset : offset + tensor.numel()].view_as(tensor))
        offset += tensor.numel()


def launched_processes() -> int:
    """How many processes ``torchrun`` started for this run (1 without torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def launched_rank() -> int:
    return int(os.environ.get("RANK", "0"))


def start() -> World:
    """Join the process group ``torchrun`` set up (environment ``RANK``, ``WORLD_SIZE``,
    ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``); one process without it."""
    size = launched_processes()
    if size == 1:
        return World()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = default_device(local_rank)
    if device.type == "cuda":
        visible = torch.cuda.device_count()
        if local_rank >= visible:
            raise ConfigError(
                f"process {local_rank} of this node has no GPU of its own ({visible} visible): start at most "
                f"{visible} processes per node (or hide the GPUs, CUDA_VISIBLE_DEVICES=, to train on the CPU)"
            )
        torch.cuda.set_device(device)
    dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return World(dist.get_rank(), dist.get_world_size(), device)


def synchronise_batch_norm(model: nn.Module, world: World) -> nn.Module:
    """BatchNorm over the whole step's batch on GPUs (``SyncBatchNorm`` needs CUDA; on the CPU each
    process normalises by its own share)."""
    if world.distributed and world.device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return model


def stop(world: World) -> None:
    if world.distributed and dist.is_initialized():
        dist.destroy_process_group()


def process_seed(seed: int, rank: int) -> int:
    """The seed of a process's own randomness (dropout, a method's mixing and augmentation draws):
    the run's seed in process 0, so one process is the plain run, and distinct streams elsewhere."""
    if rank == 0:
        return seed
    return int(np.random.SeedSequence([seed, rank]).generate_state(1)[0])


class BatchShare(torch.utils.data.Sampler):
    """One process's requests from an endless sampler.

    The sampler's stream is a pure function of its seed; every process walks the whole stream and
    keeps, of each step's ``global_batch`` consecutive requests, its contiguous share of
    ``global_batch // world_size``, so the processes together see exactly the batches one process
    would. ``skip_steps`` steps' worth of requests are passed over first: a resumed run continues the
    stream where the checkpoint left it, however many batches loader workers had fetched ahead.
    """

    def __init__(self, sampler, global_batch: int, rank: int = 0, world_size: int = 1, skip_steps: int = 0):
        if global_batch % world_size:
            raise ValueError(f"a batch of {global_batch} does not split over {world_size} processes")
        self.sampler = sampler
        self.global_batch = global_batch
        self.local_batch = global_batch // world_size
        self.rank = rank
        self.skip_steps = skip_steps

    def __iter__(self) -> Iterator:
        stream = itertools.islice(iter(self.sampler), self.skip_steps * self.global_batch, None)
        for position, request in enumerate(stream):
            if (position % self.global_batch) // self.local_batch == self.rank:
                yield request
