"""Resuming a run: the checks every rank agrees on before any collective load, and resuming on another number of
ranks, ZeRO stage or precision (a "reshard").

Agreement. Each rank checks what it needs from the checkpoint on its own filesystem view (state.json, the
rank files of the data position, DeepSpeed's files for the saved layout); the ranks then exchange their
verdicts (one all-gather of small objects over the host side of the group) and either all go on or all raise
the same one-line UserError, so no rank enters DeepSpeed's collective load while another has stopped (a hang
until the group's timeout).

Resharding. The saved layout is (world size, effective ZeRO stage, precision). The same layout loads through
DeepSpeed's own load_checkpoint, bit-exact as before. Another layout goes through a state without layout
(FullState): every parameter's fp32 value (DeepSpeed's ZeRO-to-fp32 path: checkpoint.load_full_state_dict),
Adam's two moments per parameter, stitched from the ranks' flat partitions by the same slice maps DeepSpeed's
universal-checkpoint converter reads (param_slice_mappings at ZeRO 1/2 and for BF16_Optimizer; per-parameter
ceil(numel / world) slices at ZeRO-3; the torch optimizer's own per-parameter state at stage 0), Adam's step
count, the LR schedule and the engine's step counters. That state is then written into the new engine where
its optimizer keeps it: the torch AdamW's state at stage 0, the fp32 partitions and their moment buffers at
ZeRO 1/2 and BF16_Optimizer (as DeepSpeed's universal loader does, from memory instead of per-parameter files),
the ZeRO-3 partitions. Low-precision weights are the fp32 values rounded, as DeepSpeed's own update makes them.
fp16's dynamic loss scale starts again from its initial value (it re-adapts within a few steps).

Not resharded: the per-rank random state (rank r takes the old rank r's where there was one, else a fresh
seed; dropout draws differ from an unresharded run anyway), and the data position, which the loader carries
over from the global sample position (data.TrainLoader.load_resharded, sharding.remaining_samples).

Tests: tests/test_reshard.py on gloo ranks (CPU): the agreement, the FullState of every layout against
DeepSpeed's live gather, writing it into other layouts, losses across 2 -> 1 -> 2 ranks. On GPUs two things
differ. The verdicts' all-gather is a host collective on the group's gloo side (process_group_backend); it runs
in every resumed run, so bench/gpu_check.py's `resume` rows run it on a CUDA world. Writing a FullState copies
host tensors into device partitions (copy_, .to(device), torch's optimizer load_state_dict; the fused AdamW's
step on the device: _step_tensor): correct by construction, but no GPU check reshards yet.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml

from contrastive import checkpoint
from contrastive.distributed import WorldInfo, host_all_gather_object
from contrastive.errors import UserError

MOMENT_KEYS = ("exp_avg", "exp_avg_sq")


@dataclass(frozen=True)
class Layout:
    """How a checkpoint's DeepSpeed state is split: the same layout loads as saved, another one is resharded."""

    world_size: int
    zero_stage: int  # the stage DeepSpeed ran (half precision at stage 0 runs as stage 1: engine.deepspeed_config)
    precision: str

    def __str__(self) -> str:
        return f"{self.world_size} rank(s), ZeRO stage {self.zero_stage}, {self.precision}"


def effective_stage(zero_stage: int, precision: str) -> int:
    return 1 if precision in ("bf16", "fp16") and zero_stage == 0 else zero_stage


def saved_layout(ckpt: Path) -> Layout:
    """The layout a checkpoint was saved with, from its state.json and config.yaml (older checkpoints: the
    number of rank files)."""
    state = json.loads((ckpt / checkpoint.STATE_FILE).read_text())
    config = yaml.safe_load((ckpt / checkpoint.CONFIG_FILE).read_text()) if (ckpt / checkpoint.CONFIG_FILE).is_file() \
        else {}
    ds = config.get("deepspeed", {})
    precision = ds.get("precision", "fp32")
    world_size = state.get("world_size") or len(list(ckpt.glob("rank_*.json")))
    return Layout(int(world_size), effective_stage(int(state.get("zero_stage", ds.get("zero_stage", 0))), precision),
                  precision)


def deepspeed_files(layout: Layout) -> list[str]:
    """The files DeepSpeed writes for `layout` (one model-states file up to ZeRO 2, one per rank at ZeRO-3; one
    optimizer file per rank from ZeRO 1 on)."""
    ranks = range(layout.world_size)
    if layout.zero_stage == 3:
        files = [f"zero_pp_rank_{r}_mp_rank_00_model_states.pt" for r in ranks]
    else:
        files = [checkpoint.DS_MODEL_FILE]
    if layout.zero_stage >= 1:
        prefix = "bf16_" if layout.precision == "bf16" else ""  # DeepSpeed's name whenever bf16 is on
        files += [f"{prefix}zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in ranks]
    return files


@dataclass
class ResumePlan:
    """What every rank agreed to load: `path` with `saved` layout into `current`; reshard when they differ."""

    path: Path
    saved: Layout
    current: Layout

    @property
    def reshard(self) -> bool:
        return self.saved != self.current

    def rank_files(self) -> list[Path]:
        """Every old rank's file of data position and random state (each rank checks them all: a reshard, or
        another number of DataLoader workers, reads them all)."""
        return [self.path / checkpoint.rank_file(r) for r in range(self.saved.world_size)]


def _local_verdict(path: Path, *, rank: int, current: Layout) -> tuple[str | None, Layout | None]:
    """(None, saved layout) when this rank finds all it needs to resume from `path`, else (one-line reason, None)."""
    try:
        saved = saved_layout(path)
    except (OSError, ValueError, yaml.YAMLError) as exn:
        return f"cannot read {path / checkpoint.STATE_FILE}: {exn}", None
    plan = ResumePlan(path, saved, current)
    wanted = [*plan.rank_files(), *(path / name for name in deepspeed_files(saved))]
    missing = [p.name for p in wanted if not p.is_file()]
    if missing:
        return (f"checkpoint {path} is incomplete: rank {rank} finds no {', '.join(missing[:3])}"
                f"{f' (+{len(missing) - 3} more)' if len(missing) > 3 else ''}"), None
    return None, saved


def agree_on_resume(path: Path | None, *, world: WorldInfo, zero_stage: int, precision: str) -> ResumePlan | None:
    """Collective: every rank checks locally, then all ranks take the same decision (resume `path` or raise the
    same UserError), before any collective load. None: there is nothing to resume from, on every rank."""
    current = Layout(world.world_size, effective_stage(zero_stage, precision), precision)
    verdict = ("no checkpoint", None) if path is None else _local_verdict(path, rank=world.rank, current=current)
    verdicts = host_all_gather_object((str(path) if path else None, *verdict))
    paths = {p for p, _, _ in verdicts}
    if len(paths) > 1:  # `latest` was read at different moments, or the run directory differs between nodes
        named = ", ".join(sorted(str(p) for p in paths))
        raise UserError(f"ranks resolved train.resume to different checkpoints ({named}): give train.resume a "
                        f"checkpoint path, or check that every node sees the same run directory")
    if path is None:
        return None
    failed = [(r, reason) for r, (_, reason, _) in enumerate(verdicts) if reason]
    if failed:
        rank, reason = failed[0]
        others = f" (and {len(failed) - 1} other rank(s))" if len(failed) > 1 else ""
        raise UserError(f"cannot resume: {reason}{others}; resume from an earlier checkpoint with train.resume=PATH")
    return ResumePlan(path, verdicts[0][2], current)


def restore(plan: ResumePlan, *, engine, scheduler, loader, rank: int, device: torch.device) -> dict:
    """Collective: load `plan`'s checkpoint into the engine (DeepSpeed's own load for the same layout, else
    through a FullState), the loader's position and this rank's random state; returns the shared state.json."""
    from contrastive import rng

    states = [json.loads(p.read_text()) for p in plan.rank_files()]
    if plan.reshard:
        full = read_full_state(plan.path, layout=plan.saved, optimizer_names=optimizer_names(engine))
        apply_full_state(engine, scheduler, full)
        shared = json.loads((plan.path / checkpoint.STATE_FILE).read_text())
    else:
        shared, _ = checkpoint.load_checkpoint(engine, plan.path, rank=rank)
    if plan.reshard or states[0]["loader"]["num_workers"] != loader.num_workers:
        loader.load_resharded([s["loader"] for s in states])
    else:
        loader.load_state_dict(states[rank]["loader"])
    if rank < len(states):  # a rank the old run did not have keeps its fresh seed
        rng.restore(rng.from_json(states[rank]), device)
    return shared


# ---------------------------------------------------------------- a state without layout

@dataclass
class FullState:
    """A checkpoint's training state whatever the layout it was saved with."""

    weights: dict[str, torch.Tensor]  # every parameter and buffer; fp32 masters where the optimizer kept them
    moments: dict[str, dict[str, torch.Tensor]]  # trained parameter name -> {exp_avg, exp_avg_sq}, full shape, fp32
    optimizer_step: int  # Adam's step count (its bias correction)
    scheduler: dict  # the LR scheduler's state_dict
    counters: dict = field(default_factory=dict)  # DeepSpeed's global_steps, global_samples, skipped_steps


def _rank_of(path: Path) -> int:
    return int(path.name.split("zero_pp_rank_")[1].split("_")[0])


def read_full_state(ckpt: Path, *, layout: Layout, optimizer_names: list[list[str]]) -> FullState:
    """The state of `ckpt` (saved with `layout`) by parameter name. `optimizer_names`: the parameter names of each
    optimizer group in order (models.param_groups of the same model), which a stage-0 optimizer state needs to
    name its entries. Reads tensors and allow-listed DeepSpeed classes only."""
    from contrastive.engine import safe_torch_load

    weights = checkpoint.load_full_state_dict(ckpt)
    model_file = ckpt / (checkpoint.DS_MODEL_FILE if layout.zero_stage < 3
                         else "zero_pp_rank_0_mp_rank_00_model_states.pt")
    model_states = safe_torch_load(model_file)
    optim_files = sorted(ckpt.glob("*zero_pp_rank_*_optim_states.pt"), key=_rank_of)
    if layout.zero_stage == 0:
        moments, step = _moments_of_torch_optimizer(model_states["optimizer"], optimizer_names)
    elif layout.zero_stage == 3:
        moments, step = _moments_of_zero3([safe_torch_load(f)["optimizer_state_dict"] for f in optim_files],
                                          model_states["param_shapes"])
    else:
        moments, step = _moments_of_slice_maps([safe_torch_load(f)["optimizer_state_dict"] for f in optim_files])
    for name, pair in moments.items():
        for key, value in pair.items():
            pair[key] = value.reshape(weights[name].shape).float().contiguous()
    counters = {k: model_states[k] for k in ("global_steps", "global_samples", "skipped_steps") if k in model_states}
    return FullState(weights=weights, moments=moments, optimizer_step=step, scheduler=model_states["lr_scheduler"],
                     counters=counters)


def _step_of(states: dict) -> int:
    steps = {int(s["step"]) for s in states.values() if "step" in s}
    assert len(steps) <= 1, f"optimizer groups disagree on Adam's step count: {steps}"
    return steps.pop() if steps else 0


def _moments_of_torch_optimizer(optim: dict, names: list[list[str]]) -> tuple[dict, int]:
    """Stage 0: torch's optimizer state, entries numbered through the groups in order."""
    groups = optim["param_groups"]
    if [len(g["params"]) for g in groups] != [len(n) for n in names]:
        raise UserError("the checkpoint's optimizer groups do not match this model's (another model or optim.freeze?)")
    moments = {}
    for group, group_names in zip(groups, names):
        for index, name in zip(group["params"], group_names):
            state = optim["state"].get(index, {})
            moments[name] = {key: state[key] for key in MOMENT_KEYS if key in state}
    return moments, _step_of(optim["state"])


def _moments_of_slice_maps(per_rank: list[dict]) -> tuple[dict, int]:
    """ZeRO 1/2 and BF16_Optimizer: each rank's flat partition of each group holds the fragments its
    param_slice_mappings name (start, numel); a parameter is its fragments in rank order."""
    fragments: dict[str, dict[str, list[torch.Tensor]]] = {}
    for optim in per_rank:
        states = optim["base_optimizer_state"]["state"]
        for group, mapping in enumerate(optim["param_slice_mappings"]):
            state = states.get(group, {})
            for name, address in dict(mapping).items():
                for key in MOMENT_KEYS:
                    if key in state:
                        part = state[key].narrow(0, address.start, address.numel)
                        fragments.setdefault(name, {}).setdefault(key, []).append(part)
    moments = {name: {key: torch.cat(parts) for key, parts in pair.items()} for name, pair in fragments.items()}
    return moments, _step_of(per_rank[0]["base_optimizer_state"]["state"])


def _moments_of_zero3(per_rank: list[dict], param_shapes: list[dict]) -> tuple[dict, int]:
    """ZeRO-3: each rank's flat partition (its sub-groups concatenated) holds ceil(numel / world) elements of every
    parameter in turn, padded at the end (as zero_to_fp32 reads the fp32 values)."""
    world_size = len(per_rank)
    shapes = {name: shape for group in param_shapes for name, shape in group.items()}
    moments: dict[str, dict[str, torch.Tensor]] = {name: {} for name in shapes}
    for key in MOMENT_KEYS:
        states = [optim["optimizer_state_dict"]["state"] for optim in per_rank]
        if not all(key in s.get(0, {}) for s in states):
            continue
        flat = [torch.cat([s[g][key] for g in sorted(s)]) for s in states]
        offset = 0
        for name, shape in shapes.items():
            numel = math.prod(shape)
            part = math.ceil(numel / world_size)
            moments[name][key] = torch.cat([f.narrow(0, offset, part) for f in flat])[:numel]
            offset += part
    return moments, _step_of(per_rank[0]["optimizer_state_dict"]["state"])


# ---------------------------------------------------------------- writing it into an engine of another layout

def optimizer_names(engine) -> list[list[str]]:
    """The parameter names of each optimizer group, in order (the groups build_engine gave the optimizer)."""
    from contrastive.models import param_groups

    class FullShapes:
        """The module's parameters in their full shapes (ZeRO-3 leaves a rank empty partitions), for param_groups."""

        def __init__(self):
            self.params = [(name, torch.empty(getattr(p, "ds_shape", p.shape), device="meta").requires_grad_(
                p.requires_grad)) for name, p in engine.module.named_parameters()]

        def named_parameters(self):
            return iter(self.params)

    shapes = FullShapes()
    names = {id(p): n for n, p in shapes.params}
    return [[names[id(p)] for p in g["params"]] for g in param_groups(shapes, 0.0) if g["params"]]


def _step_tensor(step: int, like: torch.Tensor, optimizer) -> torch.Tensor:
    # torch's AdamW keeps `step` as a float32 tensor, on the parameter's device when fused or capturable.
    on_device = optimizer.defaults.get("fused") or optimizer.defaults.get("capturable")
    return torch.tensor(float(step), dtype=torch.float32, device=like.device if on_device else "cpu")


def apply_full_state(engine, scheduler, state: FullState) -> None:
    """Write `state` into `engine` (any ZeRO stage, precision and world size): weights, fp32 masters, moments,
    Adam's step, the LR schedule and DeepSpeed's counters. Collective at ZeRO-3 only through DeepSpeed's own
    bookkeeping; every rank calls it."""
    module = engine.module
    trained = {n for group in optimizer_names(engine) for n in group}
    missing = sorted((trained - set(state.moments)) | (set(dict(module.named_parameters())) - set(state.weights)))
    if missing or any(set(state.moments[n]) != set(MOMENT_KEYS) for n in trained if n in state.moments):
        raise UserError(f"the checkpoint holds no Adam state for {missing[:3] or 'some parameters'} (trained in "
                        f"this run): resume with the optim.freeze it was saved with")
    stage = engine.zero_optimization_stage()
    with torch.no_grad():
        if stage == 3:
            _apply_zero3(engine, state)
            params = dict(module.named_parameters())
            for name, tensor in module.state_dict(keep_vars=True).items():
                if name not in params:  # a saved buffer: not partitioned
                    tensor.data.copy_(state.weights[name])
        else:
            for name, tensor in module.state_dict(keep_vars=True).items():
                tensor.data.copy_(state.weights[name])  # the module's copy (bf16: the fp32 value rounded)
            if hasattr(engine.optimizer, "bit16_groups") or hasattr(engine.optimizer, "bf16_groups"):
                _apply_slice_maps(engine, state)
            else:
                _apply_torch_optimizer(engine, state)
    scheduler.load_state_dict(state.scheduler)
    for group, lr in zip(engine.optimizer.param_groups, scheduler.get_last_lr()):
        group["lr"] = lr  # the rate the next step uses (set by the schedule's last step in the saved run)
    for key, value in state.counters.items():
        setattr(engine, key, value)


def _apply_torch_optimizer(engine, state: FullState) -> None:
    """Stage 0 (fp32, amp_bf16): DeepSpeed steps our AdamW itself; its state goes in through load_state_dict."""
    optimizer = engine.optimizer
    names = [n for group in optimizer_names(engine) for n in group]
    params = dict(engine.module.named_parameters())
    torch_state = optimizer.state_dict()
    torch_state["state"] = {
        i: {"step": _step_tensor(state.optimizer_step, params[n], optimizer), **state.moments[n]}
        for i, n in enumerate(names)}
    optimizer.load_state_dict(torch_state)


def _apply_slice_maps(engine, state: FullState) -> None:
    """ZeRO 1/2 and BF16_Optimizer: as DeepSpeed's universal loader (load_hp_checkpoint_state_from_checkpoint_dir):
    each parameter's fragment of this rank's fp32 partition and of each moment, then the flat moment buffers."""
    from deepspeed.utils import map_to_flat_opt_states

    zero = engine.optimizer
    lp_groups = zero.bit16_groups if hasattr(zero, "bit16_groups") else zero.bf16_groups
    names = {id(p): n for n, p in engine.module.named_parameters()}
    for i, group in enumerate(zero.optimizer.param_groups):
        hp_param = group["params"][0]
        for lp in lp_groups[i]:
            mapping = lp._hp_mapping
            if mapping is None:  # no fragment of this parameter in this rank's partition
                continue
            name = names[id(lp)]
            address = mapping.lp_fragment_address
            mapping.get_hp_fragment().copy_(state.weights[name].flatten().narrow(0, address.start, address.numel))
            mapping.optim_fragment = {key: state.moments[name][key].to(hp_param.device).flatten()
                                      .narrow(0, address.start, address.numel) for key in MOMENT_KEYS}
        map_to_flat_opt_states(hp_param, lp_groups[i], zero.optimizer.state, list(MOMENT_KEYS))
        zero.optimizer.state[hp_param]["step"] = _step_tensor(state.optimizer_step, hp_param, zero.optimizer)


def _apply_zero3(engine, state: FullState) -> None:
    """ZeRO-3: as DeepSpeed's universal loader for stage 3 (load_hp_checkpoint_state_from_checkpoint_dir_stage3):
    this rank's ceil(numel / world) slice of every parameter into the flat fp32 and moment partitions, then the
    low-precision partitions from the fp32 ones; frozen parameters' own partitions directly."""
    import torch.distributed as dist

    zero = engine.optimizer
    names = {id(p): n for n, p in engine.module.named_parameters()}

    def my_slice(value: torch.Tensor, param) -> torch.Tensor:
        group = zero._get_param_partition_group(param)
        world_size, rank = dist.get_world_size(group=group), dist.get_rank(group=group)
        part = math.ceil(value.numel() / world_size)
        flat = torch.nn.functional.pad(value.flatten(), (0, part * world_size - value.numel()))
        return flat.narrow(0, rank * part, part)

    for i, group in enumerate(zero.fp16_groups):
        fp32_param = zero.fp32_partitioned_groups_flat[i]
        for key in ("fp32", *MOMENT_KEYS):
            flat, offset = torch.zeros_like(fp32_param), 0
            for param in group:
                name = names[id(param)]
                piece = my_slice(state.weights[name] if key == "fp32" else state.moments[name][key], param)
                flat.narrow(0, offset, piece.numel()).copy_(piece)
                offset += piece.numel()
            if key == "fp32":
                fp32_param.data.copy_(flat)
                zero.optimizer.state[fp32_param]["step"] = _step_tensor(state.optimizer_step, fp32_param,
                                                                        zero.optimizer)
            else:
                zero.optimizer.state[fp32_param][key] = flat
        zero.fp16_partitioned_groups_flat[i].data.copy_(fp32_param.data)
        partitions = zero.fp16_partitioned_groups[i]
        for partitioned, value in zip(partitions, zero.unflatten(zero.fp16_partitioned_groups_flat[i], partitions)):
            partitioned.data = value.data
    for name, param in engine.module.named_parameters():
        if not param.requires_grad:  # not in the optimizer: its own partition
            param.ds_tensor.data.copy_(my_slice(state.weights[name], param)[:param.ds_tensor.numel()])
