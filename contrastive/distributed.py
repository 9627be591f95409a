"""Process groups, rank helpers (torchrun, deepspeed and Slurm variables) and the autograd-correct all-gather."""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class WorldInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def world_from_env(env: dict | None = None) -> WorldInfo:
    """Ranks from torchrun/deepspeed (RANK, WORLD_SIZE, LOCAL_RANK) or Slurm (SLURM_PROCID, ...)."""
    env = os.environ if env is None else env
    if "RANK" in env and "WORLD_SIZE" in env:
        return WorldInfo(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)))
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        return WorldInfo(int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0)))
    return WorldInfo()


def current_world(group=None) -> WorldInfo:
    if not (dist.is_available() and dist.is_initialized()):
        return WorldInfo()
    return WorldInfo(dist.get_rank(group), dist.get_world_size(group), int(os.environ.get("LOCAL_RANK", 0)))


def all_gather_with_grad(tensor_BD: torch.Tensor, group=None) -> torch.Tensor:
    """Concatenate `tensor_BD` from every rank along dim 0, keeping the graph.

    Backward sums each rank's gradient for its own slice over all ranks (reduce-scatter), so a feature
    receives the gradient of every rank's loss term that used it. World size 1 returns the input.
    Shapes: (B, D) per rank -> (world_size * B, D); every rank must pass the same B.
    """
    if group is None and not (dist.is_available() and dist.is_initialized()):
        return tensor_BD
    if dist.get_world_size(group) == 1:
        return tensor_BD
    import torch.distributed.nn.functional as dist_fn

    return torch.cat(dist_fn.all_gather(tensor_BD, group=group), dim=0)


def all_reduce_mean(value: torch.Tensor, group=None) -> torch.Tensor:
    """Mean of a (detached) tensor over ranks, for logging."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(group) == 1:
        return value
    value = value.detach().clone()
    dist.all_reduce(value, group=group)
    return value / dist.get_world_size(group)
