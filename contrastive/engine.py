"""The one place where a model is wrapped for training: process group, DeepSpeed engine, freezing, checkpointing."""
from __future__ import annotations

import copy
import os
import re
import socket
from typing import Callable

import torch
import torch.distributed as dist

from contrastive.config import Config, DeepSpeedConfig
from contrastive.distributed import WorldInfo, world_from_env
from contrastive.errors import UserError
from contrastive.models import param_groups


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def slurm_master_addr(env: dict) -> str | None:
    """First host of SLURM_JOB_NODELIST (e.g. 'node[1-2]' -> 'node1'), expanded with scontrol when present."""
    nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
    if not nodelist:
        return None
    import shutil
    import subprocess

    if shutil.which("scontrol"):
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True)
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.split()[0]
    m = re.match(r"([^\[,]+)(?:\[(\d+))?", nodelist)
    return m.group(1) + (m.group(2) or "") if m else None


def init_distributed() -> WorldInfo:
    """Start the default process group from torchrun/deepspeed/Slurm variables (a 1-rank group otherwise).

    Under srun, RANK/WORLD_SIZE/LOCAL_RANK come from SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID, the master
    is the job's first node and the port is derived from the job id, so every task agrees without talking.
    """
    import deepspeed

    if dist.is_available() and dist.is_initialized():
        return WorldInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))
    env = os.environ
    world = world_from_env()
    if "RANK" not in env:
        env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"] = str(world.rank), str(world.world_size), str(world.local_rank)
    if "MASTER_ADDR" not in env:
        env["MASTER_ADDR"] = slurm_master_addr(env) or "127.0.0.1"
    if "MASTER_PORT" not in env:
        job = env.get("SLURM_JOB_ID")
        env["MASTER_PORT"] = str(20000 + int(job) % 20000) if job else str(_free_port())
    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo", verbose=False)
    return world


def device_for(world: WorldInfo) -> torch.device:
    if torch.cuda.is_available():
        torch.cuda.set_device(world.local_rank)
        return torch.device("cuda", world.local_rank)
    return torch.device("cpu")


def deep_merge(base: dict, extra: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in extra.items():
        out[key] = deep_merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def deepspeed_config(cfg: Config, world: WorldInfo) -> dict:
    """Our config -> DeepSpeed's. DeepSpeed's own gradient accumulation boundary is used, but each
    micro-step's loss covers the whole accumulated batch (see train.train_step), hence no loss scaling by it."""
    ds: DeepSpeedConfig = cfg.deepspeed
    micro = cfg.train.batch_size // (world.world_size * cfg.train.accum_steps)
    if micro * world.world_size * cfg.train.accum_steps != cfg.train.batch_size:
        raise UserError(f"train.batch_size={cfg.train.batch_size} must be divisible by ranks ({world.world_size}) "
                        f"x train.accum_steps ({cfg.train.accum_steps})")
    out = {
        "train_batch_size": cfg.train.batch_size,
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": cfg.train.accum_steps,
        "gradient_clipping": cfg.optim.grad_clip,
        "zero_optimization": {"stage": ds.zero_stage},
        "bf16": {"enabled": ds.precision == "bf16"},
        "fp16": {"enabled": ds.precision == "fp16", "initial_scale_power": 16},
        "steps_per_print": 10 ** 9,
        "wall_clock_breakdown": False,
    }
    return deep_merge(out, ds.extra)


def freeze(model: torch.nn.Module, patterns: list[str]) -> list[str]:
    """Freeze parameters whose names match any regex; returns the frozen names."""
    frozen = []
    for name, p in model.named_parameters():
        if any(re.search(pat, name) for pat in patterns):
            p.requires_grad_(False)
            frozen.append(name)
    if patterns and not frozen:
        raise UserError(f"optim.freeze patterns {patterns} match no parameter (names look like "
                        f"{', '.join(n for n, _ in list(model.named_parameters())[:3])})")
    return frozen


def build_engine(model: torch.nn.Module, cfg: Config, world: WorldInfo, lr_lambda: Callable[[int], float]):
    """Wrap `model` in a DeepSpeed engine with AdamW (no decay on gains/biases/logit scale) and our LR schedule."""
    import deepspeed

    if cfg.model.grad_checkpointing:
        model.set_grad_checkpointing(True)
    groups = [g for g in param_groups(model, cfg.optim.weight_decay) if g["params"]]
    fused = {"fused": True} if torch.cuda.is_available() else {}
    optimizer = torch.optim.AdamW(groups, lr=cfg.optim.lr, betas=(cfg.optim.beta1, cfg.optim.beta2),
                                  eps=cfg.optim.eps, **fused)
    engine, _, _, scheduler = deepspeed.initialize(
        model=model, optimizer=optimizer, config=deepspeed_config(cfg, world),
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda))
    engine.checkpoint_engine = SafeCheckpointEngine(engine.checkpoint_engine)
    return engine, scheduler


# ---------------------------------------------------------------- safe loading of DeepSpeed checkpoints

def _deepspeed_safe_globals() -> list:
    """Classes DeepSpeed pickles into checkpoints besides tensors; allow-listed for weights_only loading."""
    import argparse
    import collections

    allowed = [argparse.Namespace, collections.OrderedDict, set, frozenset, torch.Size]
    try:
        from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler

        allowed += [LossScaler, DynamicLossScaler]
    except ImportError:  # pragma: no cover
        pass
    try:
        from deepspeed.runtime.zero.config import ZeroStageEnum

        allowed.append(ZeroStageEnum)
    except ImportError:  # pragma: no cover
        pass
    try:
        from deepspeed.utils.tensor_fragment import fragment_address

        allowed.append(fragment_address)
    except ImportError:  # pragma: no cover
        pass
    return allowed


def safe_torch_load(path, map_location="cpu", **kwargs):
    """torch.load with weights_only=True: tensors and allow-listed DeepSpeed classes only, never arbitrary code."""
    kwargs.pop("weights_only", None)
    with torch.serialization.safe_globals(_deepspeed_safe_globals()):
        return torch.load(path, map_location=map_location, weights_only=True, **kwargs)


class SafeCheckpointEngine:
    """Wraps DeepSpeed's torch checkpoint engine so that resuming never unpickles arbitrary objects."""

    def __init__(self, inner):
        self.inner = inner

    def load(self, path: str, map_location=None):
        return safe_torch_load(path, map_location=map_location)

    def __getattr__(self, name):
        return getattr(self.inner, name)
