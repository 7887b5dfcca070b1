"""Process groups and model wrapping for runs launched by ``torchrun`` (DDP or FSDP2).

A plain ``python``/``delvm`` launch is a world of one: no process group, no wrapper. Under
``torchrun`` the RANK / WORLD_SIZE / LOCAL_RANK variables it sets select the rank; CPU runs use
gloo, GPU runs NCCL. Multi-node runs use torchrun's own rendezvous flags (``--nnodes``,
``--rdzv-endpoint``), nothing here.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass
class World:
    rank: int
    size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_world() -> World:
    """Join the torchrun process group if there is one; pick this rank's device."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return World(rank=rank, size=size, device=device)


def wrap_model(model: nn.Module, world: World, parallel: str) -> nn.Module:
    """DDP (replicated weights) or FSDP2 ``fully_shard`` (sharded weights, per block)."""
    if world.size == 1:
        return model
    if parallel == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for block in model.blocks:
            fully_shard(block)
        return fully_shard(model)
    device_ids = [world.device.index] if world.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=device_ids)


def all_reduce_mean(value: torch.Tensor, world: World) -> torch.Tensor:
    """Mean of a tensor over ranks (for logging and metrics)."""
    if world.size > 1:
        value = value.clone()
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
        value /= world.size
    return value


def barrier(world: World) -> None:
    if world.size > 1:
        dist.barrier()
