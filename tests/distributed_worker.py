"""The part of tests/test_distributed.py that runs in each of two spawned processes (kept apart so
that a spawned process imports torch and this module only)."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from benchmark.distributed import World


def collectives(rank: int, init_file: str) -> None:
    """Runs in each of 2 spawned processes; any failed assertion fails the spawn."""
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    world = World(rank, 2, torch.device("cpu"))
    torch.manual_seed(0)
    inputs, targets = torch.randn(8, 5), torch.randn(8, 3)
    model = nn.Linear(5, 3)
    only_rank1 = nn.Parameter(torch.ones(2))
    never_used = nn.Parameter(torch.ones(2))

    # the gradient of the whole batch, as one process computes it
    nn.functional.mse_loss(model(inputs), targets).backward()
    full = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()

    share = slice(4 * rank, 4 * rank + 4)
    loss = nn.functional.mse_loss(model(inputs[share]), targets[share])
    if rank == 1:
        loss = loss + (only_rank1 * 3.0).sum()
    loss.backward()
    world.average_gradients([*model.parameters(), only_rank1, never_used])
    for averaged, expected in zip(model.parameters(), full):
        torch.testing.assert_close(averaged.grad, expected, rtol=0, atol=1e-6)
    assert torch.equal(only_rank1.grad, torch.full((2,), 1.5))  # (0 + 3) / 2 in both processes
    assert never_used.grad is None

    # running statistics of training modules are averaged; frozen (eval-mode) modules are left alone
    holder = nn.Module()
    holder.norm = nn.BatchNorm1d(5)
    holder.frozen = nn.BatchNorm1d(5).eval()
    holder.frozen.running_mean.fill_(float(rank))
    holder.norm(inputs[share])
    world.average_buffers(holder)
    reference = nn.BatchNorm1d(5)
    reference(inputs[:4])
    mean_rank0 = reference.running_mean.clone()
    reference = nn.BatchNorm1d(5)
    reference(inputs[4:])
    torch.testing.assert_close(holder.norm.running_mean, (mean_rank0 + reference.running_mean) / 2, rtol=0, atol=1e-7)
    assert torch.equal(holder.frozen.running_mean, torch.full((5,), float(rank)))

    # confusion counts add up exactly; process 0's weights reach every process; objects come in rank order
    counts = torch.full((2, 2), rank + 1, dtype=torch.int64)
    assert torch.equal(world.sum_(counts), torch.full((2, 2), 3, dtype=torch.int64))
    different = nn.Linear(2, 2)
    nn.init.constant_(different.weight, float(rank))
    world.broadcast_state(different)
    assert torch.equal(different.weight, torch.zeros(2, 2))
    assert world.gather({"rank": rank}) == [{"rank": 0}, {"rank": 1}]
    assert torch.equal(world.mean(torch.tensor([float(rank)])), torch.tensor([0.5]))
    dist.destroy_process_group()
