"""The one place where a model is wrapped for training: process group, DeepSpeed engine, freezing, checkpointing."""
from __future__ import annotations

import copy
import datetime
import math
import os
import re
import socket
from typing import Callable

import torch
import torch.distributed as dist

from contrastive.config import DEFAULT_DIST_TIMEOUT_S, Config, DeepSpeedConfig, resolve_auto
from contrastive.distributed import WorldInfo, process_group_backend, world_from_env
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


def import_deepspeed():
    """Import DeepSpeed without its start-up chatter on machines without a GPU (it would otherwise warn that no
    CUDA runtime is found and that it falls back to its CPU accelerator, on every rank)."""
    import logging

    if "deepspeed" not in __import__("sys").modules and not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    import deepspeed
    from deepspeed.utils import logger

    logger.setLevel(logging.WARNING)
    return deepspeed


def init_distributed(*, timeout_s: float = DEFAULT_DIST_TIMEOUT_S) -> WorldInfo:
    """Start the default process group from torchrun/deepspeed/Slurm variables (a 1-rank group otherwise).

    Under srun, RANK/WORLD_SIZE/LOCAL_RANK come from SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID, the master
    is the job's first node and the port is derived from the job id, so every task agrees without talking.
    On GPUs the group has NCCL for device tensors and gloo for host tensors (process_group_backend), so the
    host-side collectives of logging, evaluation and resume checks are legal; `timeout_s` bounds every
    collective (train.dist_timeout_s), so a dead peer ends the job instead of hanging it.
    """
    deepspeed = import_deepspeed()

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
    deepspeed.init_distributed(dist_backend=process_group_backend(cuda=torch.cuda.is_available()), verbose=False,
                               timeout=datetime.timedelta(seconds=timeout_s))
    return world


def device_for(world: WorldInfo) -> torch.device:
    """This rank's training device. On CUDA, TF32 is allowed for fp32 matmuls and convolutions (the fp32 parts
    of amp_bf16 and fp32 runs), as open_clip and timm trainers do."""
    if torch.cuda.is_available():
        torch.cuda.set_device(world.local_rank)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        return torch.device("cuda", world.local_rank)
    return torch.device("cpu")


def deep_merge(base: dict, extra: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in extra.items():
        out[key] = deep_merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def deepspeed_config(cfg: Config, world: WorldInfo) -> dict:
    """Our config (resolved: config.resolve_auto) -> DeepSpeed's. DeepSpeed's own gradient accumulation boundary
    is used, but each micro-step's loss covers the whole accumulated batch (see train.train_step), hence no loss
    scaling by it.

    Nothing in it makes the host wait for the device: DeepSpeed's throughput timer (on by default) calls
    cuda.synchronize() twice per micro-step, so it is off, as is its wall-clock breakdown. With half-precision
    weights, gradients are reduced across ranks in fp32 and bf16 accumulates micro-steps in fp32 (its
    BF16_Optimizer, which DeepSpeed builds for ZeRO stage 1 only). Half-precision weights at zero_stage 0 run as
    stage 1 (the same arithmetic, with the optimizer state split over ranks), so that their fp32 master copy is
    reachable through DeepSpeed's safe_set_full_fp32_param (see clamp_logit_scale_). tests/test_gpu_path.py
    checks the dtypes DeepSpeed ends up with; bench/gpu_check.py counts the host syncs on a GPU.
    """
    ds: DeepSpeedConfig = cfg.deepspeed
    if ds.precision == "auto":
        raise ValueError(f"deepspeed.precision={ds.precision!r}: resolve the config first (config.resolve_auto)")
    micro = cfg.train.batch_size // (world.world_size * cfg.train.accum_steps)
    if micro * world.world_size * cfg.train.accum_steps != cfg.train.batch_size:
        raise UserError(f"train.batch_size={cfg.train.batch_size} must be divisible by ranks ({world.world_size}) "
                        f"x train.accum_steps ({cfg.train.accum_steps})")
    half = ds.precision in ("bf16", "fp16")
    out = {
        "train_batch_size": cfg.train.batch_size,
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": cfg.train.accum_steps,
        "gradient_clipping": cfg.optim.grad_clip,
        "zero_optimization": {"stage": 1 if half and ds.zero_stage == 0 else ds.zero_stage},
        "bf16": {"enabled": ds.precision == "bf16"},
        "fp16": {"enabled": ds.precision == "fp16", "initial_scale_power": 16},
        "steps_per_print": 10 ** 9,
        "wall_clock_breakdown": False,
        "timers": {"throughput": {"enabled": False, "synchronized": False}},
    }
    if half:
        out["communication_data_type"] = "fp32"
    if ds.precision == "bf16" and out["zero_optimization"]["stage"] == 1:
        out["data_types"] = {"grad_accum_dtype": "fp32"}
    if ds.precision == "amp_bf16":  # fp32 weights and optimizer; DeepSpeed runs the forward under bf16 autocast
        out["torch_autocast"] = {"enabled": True, "dtype": "bfloat16"}
    return deep_merge(out, ds.extra)


def check_precision_runs_here(precision: str) -> None:
    """Refuse in one line a deepspeed.precision that this machine's accelerator cannot run, which DeepSpeed (or
    torch's autocast, for amp_bf16) would refuse with a traceback at start-up: above all fp16 on a CPU without
    fp16 instructions (oneDNN's AVX512-FP16 or AMX-FP16; most CPUs lack them)."""
    import_deepspeed()
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator()
    runs = {"fp16": accelerator.is_fp16_supported, "bf16": accelerator.is_bf16_supported,
            "amp_bf16": accelerator.is_bf16_supported}.get(precision)
    if runs is not None and not runs():
        instead = "bf16, amp_bf16 or fp32" if precision == "fp16" else "fp16 or fp32"
        raise UserError(f"deepspeed.precision={precision} does not run on this {accelerator.device_name()} "
                        f"(DeepSpeed finds no {precision.removeprefix('amp_')} support); use {instead}")


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
    """Wrap `model` in a DeepSpeed engine with AdamW (no decay on gains/biases/logit scale) and our LR schedule.
    `cfg`'s `auto` values are resolved for this machine as train.train resolves them."""
    deepspeed = import_deepspeed()
    cfg = resolve_auto(cfg, cuda=torch.cuda.is_available())
    check_precision_runs_here(cfg.deepspeed.precision)

    if cfg.model.grad_checkpointing:
        model.set_grad_checkpointing(True)
    if cfg.model.compile:
        compile_towers(model, backend=cfg.model.compile_backend)
    groups = [g for g in param_groups(model, cfg.optim.weight_decay) if g["params"]]
    # The fused kernel also skips a non-finite step on the device (found_inf), which train.sync_every > 1 needs.
    fused = {"fused": True} if torch.cuda.is_available() or cfg.train.sync_every > 1 else {}
    optimizer = torch.optim.AdamW(groups, lr=cfg.optim.lr, betas=(cfg.optim.beta1, cfg.optim.beta2),
                                  eps=cfg.optim.eps, **fused)
    engine, _, _, scheduler = deepspeed.initialize(
        model=model, optimizer=optimizer, config=deepspeed_config(cfg, world),
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda))
    engine.checkpoint_engine = SafeCheckpointEngine(engine.checkpoint_engine)
    _without_host_syncs(engine, optimizer, cfg, world)
    clamp_logit_scale_(engine, max_logit_scale=cfg.model.max_logit_scale)  # an init above the cap starts at it
    return engine, scheduler


def clamp_logit_scale_(engine, *, max_logit_scale: float) -> None:
    """Clamp the model's logit_scale parameter to log(max_logit_scale) in place, as open_clip does after each
    step, wherever its value lives: the module's parameter (the only copy when DeepSpeed steps our AdamW
    itself), the fp32 master copy DeepSpeed's optimizers keep for half-precision weights and ZeRO (which
    would otherwise overwrite a clamp of the module's copy at the next step), and under ZeRO-3 this rank's
    partitions of both. Collective under ZeRO 1 and 2 (every rank calls it); device operations only.
    Clamping the parameter, not the forward's value, keeps its gradient alive at the cap, so the scale can
    come back down (tests/test_gpu_path.py, every ZeRO stage)."""
    param = dict(engine.module.named_parameters()).get("logit_scale")
    if param is None or not param.requires_grad:
        return
    cap = math.log(max_logit_scale)
    from deepspeed.utils import (safe_get_full_fp32_param, safe_get_local_fp32_param, safe_set_full_fp32_param,
                                 safe_set_local_fp32_param)

    with torch.no_grad():
        if hasattr(param, "ds_id"):  # ZeRO-3: this rank's partitions (the clamp is elementwise, padding included)
            safe_set_local_fp32_param(param, safe_get_local_fp32_param(param).clamp(max=cap))
            param.ds_tensor.data.clamp_(max=cap)
            return
        master = safe_get_full_fp32_param(param)  # ZeRO 1/2, bf16: all-reduced; None when there is no other copy
        if master is not None:
            safe_set_full_fp32_param(param, master.clamp(max=cap))
        param.data.clamp_(max=cap)


# ---------------------------------------------------------------- speed: compiled towers, a step without host syncs

def compile_towers(model: torch.nn.Module, *, backend: str = "inductor") -> None:
    """torch.compile the image tower and the text tower in place (Module.compile keeps parameter names, so
    checkpoints and exports are unchanged); the glue between them (projections, normalisation) stays eager."""
    text = model.text if getattr(model, "text", None) is not None else getattr(model, "transformer", None)
    for tower in (model.visual, text):  # CustomTextCLIP has .text, CLIP the text blocks in .transformer
        if tower is not None:
            tower.compile(backend=backend)


def _clip_grad_norm_on_device(parameters: list, max_norm: float) -> None:
    torch.nn.utils.clip_grad_norm_([p for p in parameters if p.grad is not None], max_norm)


def _without_host_syncs(engine, optimizer, cfg: Config, world: WorldInfo) -> None:
    """When DeepSpeed steps our AdamW itself (ZeRO 0, fp32 or amp_bf16 weights): replace its gradient clipping
    (a norm and a multiply per parameter, and two blocking host-to-device copies that make the host wait for
    the device) by torch's multi-tensor clip_grad_norm_, the same arithmetic up to the order of summation; and
    on one rank skip its flatten/all-reduce/copy-back of every gradient, an average over that single rank."""
    plain = engine.optimizer is optimizer
    if cfg.train.sync_every > 1 and not plain:
        raise UserError(f"train.sync_every={cfg.train.sync_every} needs deepspeed.zero_stage=0 and deepspeed.precision "
                        f"fp32 or amp_bf16 (DeepSpeed's bf16/fp16 and ZeRO optimizers read gradient norms on the host "
                        f"every step anyway); got zero_stage={cfg.deepspeed.zero_stage}, "
                        f"precision={cfg.deepspeed.precision}")
    if not plain:
        return
    if cfg.optim.grad_clip > 0:
        params = [p for p in engine.module.parameters() if p.requires_grad]
        engine.clip_fp32_gradients = lambda: _clip_grad_norm_on_device(params, cfg.optim.grad_clip)
    if world.world_size == 1:
        engine.enable_backward_allreduce = False


def skip_update_if(engine, nonfinite: torch.Tensor) -> None:
    """Make the next optimizer step a no-op on the device where `nonfinite` (a 0-dim bool tensor) is true:
    fused AdamW reads `found_inf` (as under torch's GradScaler) and leaves weights, moments and step count."""
    engine.optimizer.found_inf = nonfinite.detach().float().reshape(())


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
