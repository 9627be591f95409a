"""Checkpoints in the run directory: written atomically, pruned, found again by `latest`, loaded without pickles."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from contrastive.errors import UserError

CKPT_DIR = "checkpoints"
LATEST = "latest"
MODEL_FILE = "model.safetensors"
ARCH_FILE = "model.json"  # open_clip architecture + preprocess config of the weights beside it
STATE_FILE = "state.json"  # step, data position and other plain-JSON training state
CONFIG_FILE = "config.yaml"


def checkpoint_name(step: int) -> str:
    return f"step_{step:08d}"


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def save_model_weights(model: torch.nn.Module, directory: Path, *, model_cfg: dict, preprocess_cfg: dict) -> None:
    """Full weights as safetensors plus the architecture needed to rebuild the module."""
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(state, str(directory / MODEL_FILE))
    (directory / ARCH_FILE).write_text(json.dumps({"model_cfg": model_cfg, "preprocess_cfg": preprocess_cfg}, indent=2))


def publish_checkpoint(run_dir: Path, tmp_dir: Path, step: int, *, keep: int) -> Path:
    """Move a fully written temporary checkpoint into place, point `latest` at it, prune old ones."""
    ckpt_root = run_dir / CKPT_DIR
    final = ckpt_root / checkpoint_name(step)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp_dir, final)
    atomic_write_text(ckpt_root / LATEST, final.name + "\n")
    for old in sorted(p for p in ckpt_root.glob("step_*") if p.is_dir())[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def new_checkpoint_dir(run_dir: Path, step: int) -> Path:
    tmp = run_dir / CKPT_DIR / f".tmp_{checkpoint_name(step)}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def save_training_checkpoint(run_dir: Path, *, step: int, model, optimizer, scheduler, state: dict,
                             config_yaml: str, model_cfg: dict, preprocess_cfg: dict, keep: int) -> Path:
    """Single-process checkpoint: weights (safetensors), optimizer/scheduler tensors (torch.save of tensors only)."""
    tmp = new_checkpoint_dir(run_dir, step)
    save_model_weights(model, tmp, model_cfg=model_cfg, preprocess_cfg=preprocess_cfg)
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, tmp / "optimizer.pt")
    (tmp / STATE_FILE).write_text(json.dumps(dict(state, step=step), indent=2))
    (tmp / CONFIG_FILE).write_text(config_yaml)
    return publish_checkpoint(run_dir, tmp, step, keep=keep)


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


def load_training_checkpoint(path: Path, *, model, optimizer, scheduler) -> dict:
    model.load_state_dict(load_file(str(path / MODEL_FILE)))
    opt = torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True)
    optimizer.load_state_dict(opt["optimizer"])
    scheduler.load_state_dict(opt["scheduler"])
    return json.loads((path / STATE_FILE).read_text())


def find_weights(path: str | Path) -> Path:
    """A run directory, a checkpoint directory, or a model.safetensors file -> the checkpoint directory."""
    path = Path(path)
    if path.is_file() and path.name == MODEL_FILE:
        path = path.parent
    if not path.exists():
        raise UserError(f"--model {path} does not exist")
    if (path / MODEL_FILE).is_file() and (path / ARCH_FILE).is_file():
        return path
    pointer = path / CKPT_DIR / LATEST
    if pointer.is_file():
        ckpt = path / CKPT_DIR / pointer.read_text().strip()
        if (ckpt / MODEL_FILE).is_file():
            return ckpt
    if (path / CONFIG_FILE).is_file():
        raise UserError(f"--model {path} is a run directory without checkpoints yet")
    raise UserError(f"--model {path} is not a run directory, a checkpoint or an exported model")


def load_for_inference(path: str | Path) -> tuple[Any, dict]:
    """Rebuild a model with its weights for evaluation; returns (ModelBundle in eval mode, info)."""
    from contrastive.config import ModelConfig
    from contrastive.models import build_model

    ckpt = find_weights(path)
    arch = json.loads((ckpt / ARCH_FILE).read_text())
    bundle = build_model(ModelConfig(name="checkpoint"), model_cfg=arch["model_cfg"],
                         preprocess_cfg=arch.get("preprocess_cfg"))
    missing, unexpected = bundle.model.load_state_dict(load_file(str(ckpt / MODEL_FILE)), strict=False)
    if missing or unexpected:
        raise UserError(f"checkpoint {ckpt} does not match its architecture "
                        f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    bundle.model.eval()
    state = json.loads((ckpt / STATE_FILE).read_text()) if (ckpt / STATE_FILE).is_file() else {}
    return bundle, {"checkpoint": str(ckpt), "step": state.get("step")}
