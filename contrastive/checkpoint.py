"""Checkpoints in the run directory: DeepSpeed state plus ours, published atomically, pruned, found by `latest`.

Layout: RUN/checkpoints/step_XXXXXXXX/ holds DeepSpeed's files for that tag (module and ZeRO-partitioned
optimizer states), `state.json` (step, time, counters; rank 0), `rank_NNNNN.json` (each rank's data position
and RNG state), `model.json` (open_clip architecture + preprocess config) and `config.yaml` (the resolved run
config). It is written under checkpoints/.incoming/ and moved into place only when complete, and
RUN/checkpoints/latest is replaced atomically afterwards, so a run killed at any moment leaves the previous
checkpoint intact. Nothing is unpickled on load beyond tensors and allow-listed DeepSpeed classes.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file

from contrastive.errors import UserError

CKPT_DIR = "checkpoints"
INCOMING = ".incoming"
LATEST = "latest"
MODEL_FILE = "model.safetensors"  # full weights (exports and consolidated checkpoints)
ARCH_FILE = "model.json"  # open_clip architecture + preprocess config of the weights beside it
STATE_FILE = "state.json"  # step and other plain-JSON training state shared by all ranks
CONFIG_FILE = "config.yaml"
DS_MODEL_FILE = "mp_rank_00_model_states.pt"  # ZeRO 0-2; ZeRO-3 shards it per rank


def checkpoint_name(step: int) -> str:
    return f"step_{step:08d}"


def rank_file(rank: int) -> str:
    return f"rank_{rank:05d}.json"


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def save_checkpoint(engine, run_dir: Path, *, step: int, rank: int, shared_state: dict, rank_state: dict,
                    config_yaml: str, model_cfg: dict, preprocess_cfg: dict, keep: int) -> Path:
    """Collective: every rank calls it. Returns the published checkpoint directory."""
    root = run_dir / CKPT_DIR
    incoming = root / INCOMING
    tag = checkpoint_name(step)
    if rank == 0:
        shutil.rmtree(incoming / tag, ignore_errors=True)
        incoming.mkdir(parents=True, exist_ok=True)
    _barrier()
    engine.save_checkpoint(str(incoming), tag=tag, save_latest=False)
    atomic_write_text(incoming / tag / rank_file(rank), json.dumps(rank_state))
    _barrier()
    final = root / tag
    if rank == 0:
        staged = incoming / tag
        # Pretrained towers (issue 10): copy what they need besides weights (HF config, tokenizer) into the
        # checkpoint and point the saved architecture there, so it loads without the original directory.
        from contrastive.pretrained import save_model_assets

        model_cfg = save_model_assets(model_cfg, staged)
        (staged / ARCH_FILE).write_text(json.dumps({"model_cfg": model_cfg, "preprocess_cfg": preprocess_cfg}, indent=2))
        (staged / CONFIG_FILE).write_text(config_yaml)
        (staged / STATE_FILE).write_text(json.dumps(dict(shared_state, step=step), indent=2))
        if final.exists():
            shutil.rmtree(final)
        os.replace(staged, final)
        atomic_write_text(root / LATEST, tag + "\n")
        for old in sorted(p for p in root.glob("step_*") if p.is_dir())[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return final


def resolve_checkpoint(run_dir: Path, resume: str) -> Path | None:
    """`latest` -> the newest complete checkpoint of run_dir (None if there is none yet); a path -> that path."""
    if not resume:
        return None
    if resume == "latest":
        pointer = run_dir / CKPT_DIR / LATEST
        if not pointer.is_file():
            return None
        path = run_dir / CKPT_DIR / pointer.read_text().strip()
    else:
        path = Path(resume)
    if not (path / STATE_FILE).is_file():
        raise UserError(f"train.resume={resume!r}: {path} is not a checkpoint directory (no {STATE_FILE})")
    return path


def load_checkpoint(engine, path: Path, *, rank: int) -> tuple[dict, dict]:
    """Collective: restore engine (weights, optimizer, LR schedule) from `path`; returns (shared, rank) state."""
    rank_path = path / rank_file(rank)
    if not rank_path.is_file():
        raise UserError(f"checkpoint {path} has no state for rank {rank}: resume with the world size it was saved with")
    load_path, _ = engine.load_checkpoint(str(path.parent), tag=path.name, load_optimizer_states=True,
                                          load_lr_scheduler_states=True)
    if load_path is None:
        raise UserError(f"DeepSpeed could not load checkpoint {path}")
    return json.loads((path / STATE_FILE).read_text()), json.loads(rank_path.read_text())


# ---------------------------------------------------------------- weights for inference and export

def _is_checkpoint(path: Path) -> bool:
    return (path / ARCH_FILE).is_file() and ((path / MODEL_FILE).is_file() or any(path.glob("*model_states.pt")))


def find_weights(path: str | Path) -> Path:
    """A run directory (its latest checkpoint), a checkpoint directory, or a model.safetensors file -> a directory."""
    path = Path(path)
    if path.is_file() and path.name == MODEL_FILE:
        path = path.parent
    if not path.exists():
        raise UserError(f"--model {path} does not exist")
    if _is_checkpoint(path):
        return path
    pointer = path / CKPT_DIR / LATEST
    if pointer.is_file():
        ckpt = path / CKPT_DIR / pointer.read_text().strip()
        if _is_checkpoint(ckpt):
            return ckpt
    if (path / CONFIG_FILE).is_file():
        raise UserError(f"--model {path} is a run directory without checkpoints yet")
    raise UserError(f"--model {path} is not a run directory, a checkpoint or an exported model")


class _SafeTorch:
    """Stands in for the `torch` module inside DeepSpeed's zero_to_fp32 so its loads are weights-only."""

    def __getattr__(self, name):
        return getattr(torch, name)

    @staticmethod
    def load(*args, **kwargs):
        from contrastive.engine import safe_torch_load

        return safe_torch_load(*args, **kwargs)


def load_full_state_dict(ckpt: str | Path) -> dict[str, torch.Tensor]:
    """Full fp32 weights of a checkpoint directory.

    The module's own states (DeepSpeed's mp_rank_00 file, ZeRO 0-2) hold every parameter and buffer in the
    dtype it trained in; where an optimizer kept an fp32 master copy, that copy replaces them: consolidated
    from ZeRO partitions by DeepSpeed's zero_to_fp32, or, for its BF16_Optimizer (bf16 weights, which zero_to_fp32
    does not read), from each rank's fp32 partition and its slice map. Parameters the optimizer does not hold
    (frozen ones, which zero_to_fp32 leaves out at ZeRO stage 1) keep the module's values."""
    from contrastive.engine import safe_torch_load

    ckpt = Path(ckpt)
    if (ckpt / MODEL_FILE).is_file():
        return load_file(str(ckpt / MODEL_FILE))
    if not any(ckpt.glob("*model_states.pt")):
        raise UserError(f"{ckpt} holds no weights ({MODEL_FILE} or DeepSpeed's model states)")
    state: dict[str, torch.Tensor] = {}
    if (ckpt / DS_MODEL_FILE).is_file():  # not at ZeRO-3, whose per-rank model files hold no weights
        module = safe_torch_load(ckpt / DS_MODEL_FILE)["module"]
        state = {k: v.float() if v.is_floating_point() else v for k, v in module.items()}
    optim_files = sorted(ckpt.glob("*_pp_rank_*_optim_states.pt"), key=_rank_of)
    if optim_files and "single_partition_of_fp32_groups" in safe_torch_load(optim_files[0])["optimizer_state_dict"]:
        state.update(_fp32_from_bf16_optimizer(optim_files, state))  # BF16_Optimizer (bf16 at ZeRO stage 1)
    elif optim_files:
        state.update(_zero_to_fp32(ckpt))
    return {k: v.contiguous() for k, v in state.items()}


def _rank_of(path: Path) -> int:
    return int(path.name.split("_pp_rank_")[1].split("_")[0])


def _fp32_from_bf16_optimizer(files: list[Path], module: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Each parameter's fp32 master value from BF16_Optimizer checkpoint files in rank order: every rank holds a
    contiguous partition of each parameter group and a map (name -> start, numel) of the fragments in it, so a
    parameter is its fragments concatenated in rank order (as DeepSpeed's universal-checkpoint converter reads it)."""
    from contrastive.engine import safe_torch_load

    fragments: dict[str, list[torch.Tensor]] = {}
    for path in files:
        optim = safe_torch_load(path)["optimizer_state_dict"]
        for partition, mapping in zip(optim["single_partition_of_fp32_groups"], optim["param_slice_mappings"]):
            for name, address in dict(mapping).items():
                fragments.setdefault(name, []).append(partition.narrow(0, address.start, address.numel))
    return {name: torch.cat(parts).detach().reshape(module[name].shape) for name, parts in fragments.items()}


def _zero_to_fp32(ckpt: Path) -> dict[str, torch.Tensor]:
    from contrastive.engine import import_deepspeed

    import_deepspeed()
    from deepspeed.utils import zero_to_fp32

    original = zero_to_fp32.torch
    zero_to_fp32.torch = _SafeTorch()
    try:
        return zero_to_fp32.get_fp32_state_dict_from_zero_checkpoint(str(ckpt.parent), tag=ckpt.name)
    finally:
        zero_to_fp32.torch = original


def load_arch(ckpt: str | Path) -> dict:
    """model.json of a checkpoint, with paths to files inside the checkpoint (a text tower's) made absolute."""
    from contrastive.pretrained import resolve_model_assets

    arch = json.loads((Path(ckpt) / ARCH_FILE).read_text())
    arch["model_cfg"] = resolve_model_assets(arch["model_cfg"], ckpt)
    return arch
