"""Dual encoders built from open_clip model configs, with their transforms and tokenizer."""
from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from contrastive.config import ModelConfig
from contrastive.errors import UserError

# Our own model configs, in open_clip's JSON schema; registered with open_clip on first use.
MODEL_CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs" / "models"
_registered = False


def register_model_configs() -> None:
    global _registered
    if _registered:
        return
    import open_clip

    if MODEL_CONFIG_DIR.is_dir():
        open_clip.add_model_config(MODEL_CONFIG_DIR)
    _registered = True


@dataclass
class ModelBundle:
    """What training and evaluation need for one architecture."""

    model: nn.Module
    preprocess_train: Callable
    preprocess_val: Callable
    tokenizer: Callable
    # The open_clip model config (architecture) and preprocess config, as exported.
    model_cfg: dict
    preprocess_cfg: dict


def get_open_clip_config(name: str) -> dict:
    """The open_clip architecture config for `name`, or a UserError listing close matches."""
    import open_clip

    register_model_configs()
    cfg = open_clip.get_model_config(name)
    if cfg is None:
        names = open_clip.list_models()
        close = [n for n in names if name.lower().split("-")[0] in n.lower()][:8] or names[:8]
        raise UserError(f"model.name {name!r} is not an open_clip model config; e.g. {', '.join(close)} "
                        f"(ours are in {MODEL_CONFIG_DIR})")
    return copy.deepcopy(cfg)


def build_model(cfg: ModelConfig, *, model_cfg: dict | None = None, preprocess_cfg: dict | None = None) -> ModelBundle:
    """Build a randomly initialised dual encoder for `cfg.name`, or for an explicit architecture dict
    (`model_cfg`, as saved beside checkpoints) with its saved `preprocess_cfg`."""
    import open_clip
    from open_clip.transform import PreprocessCfg, image_transform_v2, merge_preprocess_dict

    arch = copy.deepcopy(model_cfg) if model_cfg is not None else get_open_clip_config(cfg.name)
    if cfg.force_quick_gelu:
        arch["quick_gelu"] = True
    if cfg.patch_dropout is not None:
        arch["vision_cfg"]["patch_dropout"] = cfg.patch_dropout
    # DeepSpeed cannot flatten 0-dim parameters (ZeRO views them as bytes), so keep logit scale/bias 1-D.
    arch["nonscalar_logit_scale"] = True
    if cfg.init_logit_bias is not None:
        arch["init_logit_bias"] = cfg.init_logit_bias
    model = _instantiate(arch)

    pp_dict = merge_preprocess_dict(PreprocessCfg(), {"size": arch["vision_cfg"].get("image_size", 224)})
    pp_dict = merge_preprocess_dict(pp_dict, getattr(model.visual, "preprocess_cfg", {}))
    if preprocess_cfg:
        pp_dict = merge_preprocess_dict(pp_dict, preprocess_cfg)
    pp = PreprocessCfg(**pp_dict)
    try:
        preprocess_train = image_transform_v2(pp, is_train=True, aug_cfg=dict(cfg.aug) if cfg.aug else None)
    except TypeError as e:
        raise UserError(f"model.aug has an unknown key: {e}") from None
    preprocess_val = image_transform_v2(pp, is_train=False)
    tokenizer = open_clip.get_tokenizer(cfg.name) if model_cfg is None else _tokenizer_for(arch)
    return ModelBundle(model=model, preprocess_train=preprocess_train, preprocess_val=preprocess_val,
                       tokenizer=tokenizer, model_cfg=arch, preprocess_cfg=pp_dict)


def _instantiate(arch: dict) -> nn.Module:
    """Build the open_clip model class for an architecture dict, as open_clip's factory does."""
    from open_clip.model import CLIP, CustomTextCLIP

    arch = copy.deepcopy(arch)
    custom_text = arch.pop("custom_text", False) or "hf_model_name" in arch.get("text_cfg", {})
    if "hf_model_name" in arch.get("text_cfg", {}):
        arch["text_cfg"].setdefault("hf_model_pretrained", False)
    if "timm_model_name" in arch.get("vision_cfg", {}):
        arch["vision_cfg"].setdefault("timm_model_pretrained", False)
    if "multimodal_cfg" in arch:
        raise UserError("CoCa models (multimodal_cfg) are not supported for contrastive training")
    model_class = CustomTextCLIP if custom_text else CLIP
    return model_class(**arch, output_dict=True)


def _tokenizer_for(arch: dict) -> Callable:
    import open_clip

    text_cfg = arch.get("text_cfg", {})
    if text_cfg.get("hf_tokenizer_name"):
        return open_clip.HFTokenizer(text_cfg["hf_tokenizer_name"], context_length=text_cfg.get("context_length", 77),
                                     **(text_cfg.get("tokenizer_kwargs") or {}))
    return open_clip.SimpleTokenizer(context_length=text_cfg.get("context_length", 77))


def embed_dim(model: nn.Module) -> int:
    return int(model.text_projection.shape[-1] if hasattr(model, "text_projection") and model.text_projection is not None
               else model.visual.output_dim)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: no weight decay on gains, biases, embeddings of positions and the logit scale/bias."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim < 2 or "bn" in name or "ln" in name or "bias" in name or "logit_scale" in name \
                or "positional_embedding" in name or "class_embedding" in name:
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
