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


def rank_and_world_size(group=None) -> tuple[int, int]:
    """This process's rank in `group` and the group's size; (0, 1) without an initialised process group."""
    if group is None and not (dist.is_available() and dist.is_initialized()):
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def all_gather_with_grad(tensor_BD: torch.Tensor, group=None) -> torch.Tensor:
    """Concatenate `tensor_BD` from every rank along dim 0, keeping the graph.

    Backward sums each rank's gradient for its own slice over all ranks (reduce-scatter), so a feature
    receives the gradient of every rank's loss term that used it. World size 1 returns the input.
    Shapes: (B, D) per rank -> (world_size * B, D); every rank must pass the same B.
    """
    if rank_and_world_size(group)[1] == 1:
        return tensor_BD
    return _AllGather.apply(group, tensor_BD)


class _AllGather(torch.autograd.Function):
    # Not torch.distributed.nn.functional.all_gather: on gloo its backward emulates reduce-scatter with
    # scatters addressed by group rank, which fails for any group other than the default one.

    @staticmethod
    def forward(ctx, group, tensor_BD):
        ctx.group = group
        tensor_BD = tensor_BD.contiguous()
        out = tensor_BD.new_empty((rank_and_world_size(group)[1] * tensor_BD.shape[0], *tensor_BD.shape[1:]))
        dist.all_gather_into_tensor(out, tensor_BD, group=group)
        return out

    @staticmethod
    def backward(ctx, grad_GD):
        grad_GD = grad_GD.contiguous()
        out = grad_GD.new_empty((grad_GD.shape[0] // rank_and_world_size(ctx.group)[1], *grad_GD.shape[1:]))
        dist.reduce_scatter_tensor(out, grad_GD, group=ctx.group)
        return None, out


def all_gather_no_grad(tensor_B: torch.Tensor, group=None) -> torch.Tensor:
    """Concatenate `tensor_B` from every rank along dim 0, outside autograd (for use inside backward passes)."""
    _, world_size = rank_and_world_size(group)
    if world_size == 1:
        return tensor_B
    tensor_B = tensor_B.contiguous()
    out = tensor_B.new_empty((world_size * tensor_B.shape[0], *tensor_B.shape[1:]))
    dist.all_gather_into_tensor(out, tensor_B, group=group)
    return out


def all_reduce_softmax_stats_(peak: torch.Tensor, total: torch.Tensor, group=None) -> None:
    """Combine per-rank softmax statistics in place: `peak` becomes the max over ranks and `total` (a sum
    of exp(x - peak) on each rank) the sum over ranks of exp(x - new peak); elementwise, without overflow."""
    if rank_and_world_size(group)[1] == 1:
        return
    new_peak = peak.clone()
    dist.all_reduce(new_peak, op=dist.ReduceOp.MAX, group=group)
    total.mul_((peak - new_peak).exp_())
    dist.all_reduce(total, group=group)
    peak.copy_(new_peak)


def _global_rank(group, group_rank: int) -> int:
    return group_rank if group is None else dist.get_global_rank(group, group_rank)


class _NeighbourShift(torch.autograd.Function):
    """Send each tensor `shift` ranks around the ring and receive the one sent by the rank `shift` behind;
    backward sends each gradient back the way its tensor came."""

    @staticmethod
    def forward(ctx, group, shifts, *tensors):
        ctx.group, ctx.shifts = group, shifts
        return tuple(_ring_send_recv(tensors, shifts, group))

    @staticmethod
    def backward(ctx, *grads):
        back = _NeighbourShift.apply(ctx.group, tuple(-k for k in ctx.shifts), *grads)
        return (None, None, *back)


def _ring_send_recv(tensors, shifts, group) -> list[torch.Tensor]:
    rank, world_size = rank_and_world_size(group)
    ops, received = [], []
    for tensor, shift in zip(tensors, shifts):
        tensor = tensor.contiguous()  # gloo refuses strided buffers (e.g. the expanded gradient of a sum)
        out = torch.empty_like(tensor)
        ops.append(dist.P2POp(dist.isend, tensor, _global_rank(group, (rank + shift) % world_size), group))
        ops.append(dist.P2POp(dist.irecv, out, _global_rank(group, (rank - shift) % world_size), group))
        received.append(out)
    for request in dist.batch_isend_irecv(ops):
        request.wait()
    return received


def neighbour_shift_with_grad(tensors: list[torch.Tensor], shifts: list[int], group=None) -> list[torch.Tensor]:
    """For each tensor, send it to rank (rank + shift) and return the one received from rank (rank - shift).

    Autograd-correct: the gradient of a received tensor goes back to the rank that sent it. Every rank must
    pass tensors of the same shapes. Used by SigLIP to pass text features around the ring.
    """
    return list(_NeighbourShift.apply(group, tuple(shifts), *tensors))


def all_reduce_mean(value: torch.Tensor, group=None) -> torch.Tensor:
    """Mean of a (detached) tensor over ranks, for logging."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(group) == 1:
        return value
    value = value.detach().clone()
    dist.all_reduce(value, group=group)
    return value / dist.get_world_size(group)


# ---------------------------------------------------------------- host-side collectives
# NCCL reduces only device tensors: a collective on a host tensor raises. The default process group of a CUDA
# world is therefore started with both backends (process_group_backend), so that the helpers below, which work
# on host tensors and objects (log records, evaluation results, shard counts, resume checks), take gloo there
# and NCCL never sees a host tensor. Covered on gloo by tests/test_gpu_path.py and, with NCCL, by
# bench/gpu_check.py.

def process_group_backend(*, cuda: bool) -> str:
    """The default group's backend: NCCL for device tensors plus gloo for host tensors on GPUs; gloo on CPUs."""
    return "cpu:gloo,cuda:nccl" if cuda else "gloo"


def host_all_gather(rows_N: torch.Tensor, group=None) -> torch.Tensor:
    """Concatenate host tensors along dim 0 in rank order; ranks may pass different numbers of rows (same
    trailing shape and dtype). World size 1 returns the input."""
    _, world_size = rank_and_world_size(group)
    if world_size == 1:
        return rows_N
    assert rows_N.device.type == "cpu", "host_all_gather takes host tensors (device tensors: all_gather_no_grad)"
    sizes = [torch.zeros(1, dtype=torch.int64) for _ in range(world_size)]
    dist.all_gather(sizes, torch.tensor([rows_N.shape[0]], dtype=torch.int64), group=group)
    counts = [int(s) for s in sizes]
    padded = rows_N.new_zeros((max(counts), *rows_N.shape[1:]))
    padded[:rows_N.shape[0]] = rows_N
    gathered = [torch.empty_like(padded) for _ in range(world_size)]
    dist.all_gather(gathered, padded, group=group)
    return torch.cat([g[:n] for g, n in zip(gathered, counts)])


def host_all_gather_object(obj, group=None) -> list:
    """Every rank's picklable `obj`, in rank order (over gloo on a CUDA world)."""
    _, world_size = rank_and_world_size(group)
    if world_size == 1:
        return [obj]
    out = [None] * world_size
    dist.all_gather_object(out, obj, group=group)
    return out


def host_broadcast_object(obj, *, src: int = 0, group=None):
    """Rank `src`'s picklable `obj` on every rank (the others' `obj` is ignored)."""
    if rank_and_world_size(group)[1] == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, group=group, device=torch.device("cpu"))
    return box[0]
