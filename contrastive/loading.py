"""Loading a trained model from a run directory, a checkpoint or an open_clip export: the one place that does.

checkpoint.py owns the training checkpoint layout (writing, resuming, consolidating DeepSpeed's weights),
export.py writes export formats; both sit below or beside this module and import nothing from each other.
Export file names live here because reading an export is loading.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from contrastive.errors import UserError

OPEN_CLIP_CONFIG = "open_clip_config.json"
OPEN_CLIP_WEIGHTS = "open_clip_model.safetensors"
SUMMARY = "export.json"
# Our modules keep these 1-D because DeepSpeed cannot flatten 0-dim parameters; open_clip's own are 0-dim.
_SCALARS = ("logit_scale", "logit_bias")


@dataclass
class Source:
    """A trained model on disk: full fp32 weights (our module's layout), architecture, what the run recorded."""

    path: Path
    run_dir: Path | None
    model_cfg: dict
    preprocess_cfg: dict
    state_dict: dict[str, torch.Tensor]
    state: dict = field(default_factory=dict)
    config_yaml: str = ""
    format: str = "checkpoint"

    @property
    def step(self) -> int | None:
        return self.state.get("step")


def our_layout(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.reshape(1) if k in _SCALARS and v.ndim == 0 else v for k, v in sd.items()}


def open_clip_layout(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.reshape(()) if k in _SCALARS and v.shape == (1,) else v for k, v in sd.items()}


def is_open_clip_export(path: str | Path) -> bool:
    path = Path(path)
    return (path / OPEN_CLIP_CONFIG).is_file() and (path / OPEN_CLIP_WEIGHTS).is_file()


def _float(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().float().contiguous() if v.is_floating_point() else v.detach() for k, v in sd.items()}


def load_source(path: str | Path) -> Source:
    """A run directory (its latest checkpoint), a checkpoint directory (ZeRO-sharded or not), or a directory
    written by `export --format open_clip`."""
    from safetensors.torch import load_file

    from contrastive import checkpoint

    path = Path(path)
    if is_open_clip_export(path):
        cfg = json.loads((path / OPEN_CLIP_CONFIG).read_text())
        info = json.loads((path / SUMMARY).read_text()) if (path / SUMMARY).is_file() else {}
        return Source(path=path, run_dir=None, model_cfg=cfg["model_cfg"], preprocess_cfg=cfg.get("preprocess_cfg", {}),
                      state_dict=our_layout(_float(load_file(str(path / OPEN_CLIP_WEIGHTS)))),
                      state=info.get("training_state", {}), config_yaml=info.get("training_config", ""),
                      format="open_clip")
    ckpt = checkpoint.find_weights(path)
    arch = checkpoint.load_arch(ckpt)  # a text tower's files inside the checkpoint, resolved to absolute paths
    state_file, config_file = ckpt / checkpoint.STATE_FILE, ckpt / checkpoint.CONFIG_FILE
    run_dir = ckpt.parent.parent if ckpt.parent.name == checkpoint.CKPT_DIR else None
    return Source(path=ckpt, run_dir=run_dir, model_cfg=arch["model_cfg"], preprocess_cfg=arch.get("preprocess_cfg") or {},
                  state_dict=our_layout(_float(checkpoint.load_full_state_dict(ckpt))),
                  state=json.loads(state_file.read_text()) if state_file.is_file() else {},
                  config_yaml=config_file.read_text() if config_file.is_file() else "")


def build_bundle(source: Source):
    """Our ModelBundle (eval mode) holding the source's weights, strictly loaded."""
    from contrastive.config import ModelConfig
    from contrastive.models import build_model

    bundle = build_model(ModelConfig(name="export"), model_cfg=source.model_cfg, preprocess_cfg=source.preprocess_cfg)
    missing, unexpected = bundle.model.load_state_dict(source.state_dict, strict=False)
    if missing or unexpected:
        raise UserError(f"{source.path}: weights do not match the architecture in it "
                        f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    bundle.model.eval()
    return bundle


def load_for_inference(path: str | Path) -> tuple[Any, dict]:
    """Rebuild a model with its weights for evaluation: a run directory, a checkpoint or an open_clip export.
    Returns (ModelBundle in eval mode, info: checkpoint path, step, and format for an export)."""
    source = load_source(path)
    info = {"checkpoint": str(source.path), "step": source.step}
    if source.format != "checkpoint":
        info["format"] = source.format
    return build_bundle(source), info


# ---------------------------------------------------------------- model.pretrained: a trained model to start from

LOCAL_DIR = "local-dir:"
# Weight files of an open_clip `local-dir:` folder, in the order open_clip's factory prefers them.
_OPEN_CLIP_WEIGHT_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.safetensors",
                           "open_clip_pytorch_model.bin", "open_clip_pytorch_model.pth")


def read_pretrained(spec: str) -> tuple[dict[str, torch.Tensor], dict]:
    """(state dict, preprocess config or {}) of `model.pretrained`: an open_clip checkpoint file (open_clip_train's
    epoch_N.pt, a .bin/.pth/.safetensors state dict), an open_clip `local-dir:` folder (ours from `export
    --format open_clip` among them), or one of our run or checkpoint directories. Weights-only loading throughout."""
    from contrastive import checkpoint
    from contrastive.pretrained import local_path

    path = local_path(spec[len(LOCAL_DIR):] if spec.startswith(LOCAL_DIR) else spec, what="model.pretrained")
    if path.is_file():
        return _open_clip_state_dict(path, spec), {}
    if (path / "open_clip_config.json").is_file():
        weights = next((path / f for f in _OPEN_CLIP_WEIGHT_FILES if (path / f).is_file()), None)
        if weights is None:
            raise UserError(f"model.pretrained {spec!r} has open_clip_config.json but no weights "
                            f"({' or '.join(_OPEN_CLIP_WEIGHT_FILES[:3])})")
        config = json.loads((path / "open_clip_config.json").read_text())
        return _open_clip_state_dict(weights, spec), config.get("preprocess_cfg") or {}
    if path.is_dir() and ((path / checkpoint.ARCH_FILE).is_file() or (path / checkpoint.CKPT_DIR / checkpoint.LATEST).is_file()):
        source = load_source(path)
        return source.state_dict, source.preprocess_cfg
    raise UserError(f"model.pretrained {spec!r} is not an open_clip checkpoint file, an open_clip local-dir folder "
                    f"(open_clip_config.json + weights, as `contrastive export --format open_clip` writes), "
                    f"a run directory with checkpoints or a checkpoint directory")


def _open_clip_state_dict(path: Path, spec: str) -> dict:
    from open_clip.factory import load_state_dict

    try:  # open_clip's own reader: {"state_dict": ...} of open_clip_train, DDP's "module." prefix removed
        state = load_state_dict(str(path), weights_only=True)
    except Exception as e:  # a pickle with code in it, a truncated file, not a checkpoint at all
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise UserError(f"model.pretrained {spec!r}: not a safetensors file or a weights-only state dict ({first})") from None
    if not isinstance(state, dict) or not state or not all(hasattr(v, "shape") for v in state.values()):
        raise UserError(f"model.pretrained {spec!r} holds no state dict of tensors")
    return dict(state)


def build_initialised(cfg):
    """build_model(cfg) with model.pretrained's weights, when it names any (the training entry point).
    Reading lives here, not in contrastive.models, because a run or checkpoint is read through checkpoint.py,
    which builds on models.py."""
    from contrastive.models import build_model

    return build_model(cfg, pretrained=read_pretrained(cfg.pretrained) if cfg.pretrained else None)
